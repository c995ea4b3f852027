"""`distalign`: estimate, finetune, datasets, quickstart. Bad input -> one error line, exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from distalign_ray.cli_config import COMMANDS as CONFIG_COMMANDS
from distalign_ray.console import captured_output, error_stream, terminal
from distalign_ray.errors import CheckFailed, DistalignError, TrackingUnavailable
from distalign_ray.methods import METHODS, trained_method_names
from distalign_ray.paths import home_dir
from distalign_ray.storage import STORAGE_ENV, use_storage

SHORTCUT = "set:"  # flags whose dest is SHORTCUT + comma-separated field paths are `--set` shortcuts


def _shortcut(parser: argparse.ArgumentParser, flag: str, *paths: str, **kwargs) -> None:
    parser.add_argument(flag, dest=SHORTCUT + ",".join(paths), **kwargs)


def _config_args(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the output of Ray, vLLM and torch live (default: in a log file per run, also an MLflow artifact)",
    )
    parser.add_argument("--config", help=f"YAML config file (`distalign config show {command}` prints one with every field)")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help=f"set one config field, e.g. --set {'finetune.kl_weight=2' if command != 'estimate' else 'estimate.top_p=0.9'} "
        "(repeatable; applied after --config and the flags)",
    )


def load_config(args, command: str):
    """The command's validated config. Shared storage is settled here: `--storage`, else `storage:` of the
    config (file or --set), else DISTALIGN_STORAGE."""
    from distalign_ray.cli_config import command_config

    flags = {}
    for dest, value in vars(args).items():
        if dest.startswith(SHORTCUT) and value is not None:
            flags.update(dict.fromkeys(dest[len(SHORTCUT) :].split(","), value))
    cfg, storage = command_config(command, args.config, flags, args.assignments)
    location = args.storage or storage or os.environ.get(STORAGE_ENV)
    if location:
        use_storage(location)  # checked here, before any work: one line instead of a failure on a worker
    return cfg


def _spec_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dataset", help="built-in dataset name (see `distalign datasets list`)")
    group.add_argument("--spec", help="a distribution spec YAML file (format: docs/specs.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distalign", description=__doc__)
    parser.add_argument(
        "--storage",
        help="shared storage every Ray node reads: a folder all nodes mount or a URI such as s3://bucket/prefix "
        "(also `storage:` in a config file, or DISTALIGN_STORAGE; default: the project folder, one machine)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    est = sub.add_parser("estimate", help="estimate a model's output distribution per context")
    _spec_args(est)
    _shortcut(est, "--model", "estimate.model", help="alias (smollm2-135m), local HF folder, or hub id")
    _shortcut(est, "--adapter", "estimate.adapter", help="a fine-tuned adapter folder (from `distalign finetune`)")
    _shortcut(est, "--samples", "estimate.samples_per_context", type=int, help="samples per context")
    _shortcut(est, "--estimator", "estimate.estimator", choices=["sample", "readout"], help="sample (default) or readout")
    _shortcut(est, "--task", "estimate.task", choices=["attribute", "story"])
    _shortcut(est, "--max-contexts", "estimate.max_contexts", type=int, help="only the first N contexts")
    _shortcut(
        est,
        "--prompt-engineering",
        "estimate.prompt_engineering",
        action="store_true",
        default=None,
        help="state the target distribution in the prompt",
    )
    _shortcut(est, "--engine", "estimate.engine", choices=["auto", "vllm", "hf"], help="generation engine (auto: vLLM when installed)")
    _shortcut(est, "--seed", "estimate.seed", type=int)
    _config_args(est, "estimate")

    ft = sub.add_parser("finetune", help="fine-tune a LoRA adapter with the hybrid (KL + KTO) loss on Ray Train")
    _spec_args(ft)
    ft.add_argument("--output", required=True, help="adapter folder to create (must not exist or be empty)")
    _shortcut(ft, "--model", "finetune.model", help="alias (smollm2-135m), local HF folder, or hub id")
    _shortcut(
        ft,
        "--loss-mode",
        "finetune.loss_mode",
        choices=trained_method_names(),
        help="the trained method: " + ", ".join(trained_method_names()),
    )
    _shortcut(ft, "--init-adapter", "finetune.init_adapter", help="start from a saved adapter (e.g. DPO from IFT)")
    _shortcut(ft, "--epochs", "finetune.epochs", type=int, help="stage-2 epochs")
    _shortcut(ft, "--num-workers", "finetune.num_workers", type=int, help="Ray Train workers (0 = local mode)")
    _shortcut(ft, "--max-contexts", "finetune.max_contexts", type=int)
    _shortcut(ft, "--seed", "finetune.seed", type=int)
    _config_args(ft, "finetune")

    ds = sub.add_parser("datasets", help="list or show the built-in datasets")
    ds_sub = ds.add_subparsers(dest="datasets_command")
    ds_sub.add_parser("list", help="list the built-in datasets")
    show = ds_sub.add_parser("show", help="show a dataset's categories, contexts and targets")
    show.add_argument("name")

    qs = sub.add_parser("quickstart", help="before/after demo on the embedded model (<= 15 min on 2 cores)")
    _shortcut(qs, "--samples", "estimate.samples_per_context", type=int, help="samples per context per estimate")
    _shortcut(qs, "--epochs", "finetune.epochs", type=int, help="stage-2 epochs")
    _shortcut(qs, "--num-workers", "finetune.num_workers", type=int)
    _shortcut(qs, "--max-contexts", "finetune.max_contexts", "estimate.max_contexts", type=int)
    _shortcut(qs, "--model", "finetune.model", help="model to start from (default: the embedded smollm2-135m)")
    _shortcut(qs, "--output", "output", help="adapter folder to create")
    _config_args(qs, "quickstart")

    sw = sub.add_parser("sweep", help="Ray Tune search of kl_weight, kto_weight, lr, beta (ASHA; Optuna optional)")
    _spec_args(sw)
    _shortcut(sw, "--name", "name", help="sweep name (MLflow tag `sweep`, output folder)")
    _shortcut(sw, "--num-samples", "num_samples", type=int, help="number of trials")
    _shortcut(sw, "--search", "search", choices=["random", "optuna"])
    _shortcut(sw, "--scheduler", "scheduler", choices=["asha", "fifo"])
    _shortcut(sw, "--output", "output", help="where to write the best config (a `finetune:` YAML)")
    _config_args(sw, "sweep")

    cmp = sub.add_parser("compare", help="methods x datasets x tasks into one MLflow parent run (resumable)")
    _shortcut(cmp, "--name", "name", help="comparison name; rerunning the same name resumes and skips finished cells")
    _shortcut(cmp, "--datasets", "datasets", nargs="+", help="dataset names (default: gender-uk-real gender-us-real)")
    _shortcut(cmp, "--methods", "methods", nargs="+", choices=list(METHODS), help="default: all (" + " ".join(METHODS) + ")")
    _shortcut(cmp, "--tasks", "tasks", nargs="+", choices=["attribute", "story"], help="default: attribute")
    _shortcut(cmp, "--samples", "estimate.samples_per_context", type=int, help="samples per context (budget)")
    _shortcut(cmp, "--epochs", "finetune.epochs", type=int, help="stage-2 (or baseline) epochs of every method (budget)")
    _shortcut(cmp, "--max-contexts", "finetune.max_contexts", "estimate.max_contexts", type=int, help="first N contexts only (budget)")
    _shortcut(cmp, "--estimator", "estimate.estimator", choices=["sample", "readout"], help="readout: attribute task only")
    cmp.add_argument("--report", help="also write a Markdown results report to this file (e.g. docs/results.md)")
    _config_args(cmp, "compare")

    cf = sub.add_parser("config", help="show a command's config fields (defaults and descriptions)")
    cf_sub = cf.add_subparsers(dest="config_command", required=True)
    cf_show = cf_sub.add_parser("show", help="print a command's config file with every field at its default, described")
    cf_show.add_argument("config_of", choices=list(CONFIG_COMMANDS), metavar="COMMAND", help=" | ".join(CONFIG_COMMANDS))
    ui = sub.add_parser("ui", help="serve the project's MLflow store in the MLflow UI (127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def cmd_ui(args) -> int:
    from distalign_ray.tracking.mlflow_store import check_tracking, ensure_experiment, experiment_url, ui_command

    argv, env = ui_command(args.host, args.port)
    check_tracking()
    url = experiment_url(ensure_experiment(), f"http://{args.host}:{args.port}")
    print(f"MLflow UI: {url}  (store {argv[argv.index('--backend-store-uri') + 1]})", flush=True)
    os.execvpe(argv[0], argv, env)


def cmd_compare(args) -> int:
    from distalign_ray.compare.run import run_compare

    run_compare(load_config(args, "compare"), report=args.report)
    return 0


def cmd_sweep(args) -> int:
    from distalign_ray.data.specs import load_spec
    from distalign_ray.tuning.sweep import run_sweep

    cfg = load_config(args, "sweep")
    spec = load_spec(args.dataset, args.spec)
    if cfg.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise DistalignError("--search optuna needs the optuna package (pip install -e '.[tune]')") from None
    result = run_sweep(spec, cfg)
    terminal().print(f"best val_mae {result['best_val_mae']:.4f} over {result['trials']} trials; best config: {result['best_config']}")
    return 0


def cmd_datasets(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from distalign_ray.data.specs import builtin_dataset_names, load_dataset

    console = Console()
    if args.datasets_command == "show":
        spec = load_dataset(args.name)
        console.print(f"[bold]{spec.name}[/bold]: {spec.description}")
        console.print(f"categories: {spec.categories}; samples per context: {spec.samples_per_context}; target: {spec.target_kind}")
        table = Table("context", *[f"P({c})" for c in spec.categories])
        for context, target in zip(spec.contexts, spec.targets):
            table.add_row(context, *[f"{p:.3f}" for p in target])
        console.print(table)
        return 0
    table = Table("name", "attribute", "classes", "contexts", "target", "samples/context")
    for name in builtin_dataset_names():
        spec = load_dataset(name)
        table.add_row(name, spec.attribute, str(spec.num_classes), str(len(spec.contexts)), spec.target_kind, str(spec.samples_per_context))
    console.print(table)
    return 0


def cmd_config(args) -> int:
    from distalign_ray.cli_config import show_config

    print(show_config(args.config_of))
    return 0


def cmd_estimate(args) -> int:
    from distalign_ray.data.specs import load_spec
    from distalign_ray.estimate import plan_estimate, run_estimate
    from distalign_ray.tracking.mlflow_store import check_tracking

    cfg = load_config(args, "estimate")
    spec = load_spec(args.dataset, args.spec)
    check_tracking()
    plan = plan_estimate(spec, cfg)
    result = run_estimate(spec, cfg, plan=plan)
    r = result.report
    terminal().print(
        f"{spec.name} {result.method} ({cfg.estimator}): MAE {r.mae:.4f} [{r.mae_ci_low:.4f}, {r.mae_ci_high:.4f}] "
        f"KL {r.kl:.4f} JS {r.js:.4f} unmatched {r.unmatched_rate:.1%} noise floor {r.noise_floor_mae:.4f} (p {r.noise_p_value:.2f}) "
        + (f"cut at max_new_tokens {result.cut_rate:.1%} " if result.cut_rate is not None else "")
        + (f"readout MAE {result.readout.mae:.4f}; " if result.readout is not None else "")
        + f"MLflow run {result.run_id}; samples {result.samples_path}"
    )
    return 0


def cmd_finetune(args) -> int:
    from distalign_ray.data.specs import load_spec
    from distalign_ray.tracking.mlflow_store import check_tracking, log_params, start_run
    from distalign_ray.training.finetune import check_binding, describe_result, log_finetune_result, run_finetune, validate_finetune

    cfg = load_config(args, "finetune")
    spec = load_spec(args.dataset, args.spec)
    check_tracking()
    validate_finetune(spec, cfg, args.output)
    description = f"Fine-tune ({cfg.loss_mode}) of {cfg.model} on {spec.name}; adapter {args.output}"
    with start_run(
        f"finetune-{spec.name}-{cfg.loss_mode}",
        description,
        tags={"dataset": spec.name, "method": cfg.loss_mode, "model": cfg.model, "task": "attribute"},
    ) as run:
        log_params(cfg.model_dump())
        result = run_finetune(spec, cfg, args.output, mlflow_run_id=run.info.run_id)
        log_finetune_result(result, cfg)
        terminal().print("\n".join(describe_result(result)))
        terminal().print(f"adapter written to {result['adapter']}; MLflow run {run.info.run_id}")
        check_binding(result, cfg)  # a failed check ends the MLflow run as FAILED
    return 0


def cmd_quickstart(args) -> int:
    from distalign_ray.quickstart import run_quickstart

    run_quickstart(load_config(args, "quickstart"))
    return 0


COMMANDS = {
    "estimate": cmd_estimate,
    "finetune": cmd_finetune,
    "datasets": cmd_datasets,
    "quickstart": cmd_quickstart,
    "compare": cmd_compare,
    "sweep": cmd_sweep,
    "ui": cmd_ui,
    "config": cmd_config,
}


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (`ray job stop`, kill) ends a command like Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    from distalign_ray.tracking.mlflow_store import SERVER_RETRIES

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, value in SERVER_RETRIES.items():
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    runs_ray = hasattr(args, "verbose")  # the commands that run Ray have --verbose
    catch_sigterm = runs_ray and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if catch_sigterm else None
    try:
        return _run_command(args, quiet=runs_ray and not args.verbose)
    finally:
        if catch_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run_command(args, quiet: bool) -> int:
    with captured_output(home_dir() / "logs", args.command, enabled=quiet) as log:
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            # Runs end KILLED, adapters and sample tables are whole or absent; a rerun starts clean
            # (compare: resumes).
            print("distalign: interrupted", file=error_stream())
            return 130
        except TrackingUnavailable as exc:
            print(f"distalign: error: {exc}; samples drawn so far are kept under {home_dir() / 'runs'}", file=error_stream())
            return TrackingUnavailable.exit_code
        except DistalignError as exc:
            if log is not None:
                log.discard()  # bad input: nothing written
            print(f"distalign: error: {exc}", file=error_stream())
            return 2
        except CheckFailed as exc:
            print(f"distalign: check failed: {exc}", file=error_stream())
            return CheckFailed.exit_code
        except BrokenPipeError:  # the reader went away (`distalign config show ... | head`)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0


if __name__ == "__main__":
    sys.exit(main())
