"""`distalign`: estimate, finetune, datasets, quickstart. Bad input -> one error line, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from distalign_ray.errors import CheckFailed, DistalignError
from distalign_ray.storage import use_storage


def _load_config(args, section: str) -> dict:
    """The command's section of `--config` (none: {}). Shared storage is settled here: `--storage`,
    else a top-level `storage:` of the config file, else DISTALIGN_STORAGE."""
    values, storage = _read_config_file(args.config, section)
    if args.storage or storage:
        use_storage(args.storage or storage)
    return values


def _read_config_file(path: str | None, section: str) -> tuple[dict, str | None]:
    if not path:
        return {}, None
    file = Path(path)
    if not file.is_file():
        raise DistalignError(f"config file not found: {path}")
    try:
        document = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DistalignError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise DistalignError(f"config {path}: expected a mapping")
    document = dict(document)
    storage = document.pop("storage", None)
    if storage is not None and (not isinstance(storage, str) or not storage):
        raise DistalignError(f"config {path}: storage must be a folder or a URI")
    return document.get(section, document if section in ("quickstart", "compare", "sweep") else {}), storage


def _validated(model_cls, values: dict, origin: str):
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DistalignError(f"invalid {origin}: {where}: {first['msg']}") from None


def _overrides(args, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


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
    est.add_argument("--model", help="alias (smollm2-135m), local HF folder, or hub id")
    est.add_argument("--adapter", help="a fine-tuned adapter folder (from `distalign finetune`)")
    est.add_argument("--samples", dest="samples_per_context", type=int, help="samples per context")
    est.add_argument("--estimator", choices=["sample", "readout"], help="sample (default) or readout")
    est.add_argument("--task", choices=["attribute", "story"])
    est.add_argument("--max-contexts", dest="max_contexts", type=int, help="only the first N contexts")
    est.add_argument("--prompt-engineering", dest="prompt_engineering", action="store_true", default=None,
                     help="state the target distribution in the prompt")
    est.add_argument("--engine", choices=["auto", "vllm", "hf"], help="generation engine (auto: vLLM when installed)")
    est.add_argument("--seed", type=int)
    est.add_argument("--config", help="YAML with an `estimate:` section (EstimateConfig fields)")

    ft = sub.add_parser("finetune", help="fine-tune a LoRA adapter with the hybrid (KL + KTO) loss on Ray Train")
    _spec_args(ft)
    ft.add_argument("--model", help="alias (smollm2-135m), local HF folder, or hub id")
    ft.add_argument("--output", required=True, help="adapter folder to create (must not exist or be empty)")
    ft.add_argument("--loss-mode", dest="loss_mode", choices=["hybrid", "kl_only", "kto_only", "ift", "dpo"],
                    help="steering methods (hybrid, kl_only, kto_only) or baselines (ift, dpo)")
    ft.add_argument("--init-adapter", dest="init_adapter", help="start from a saved adapter (e.g. DPO from IFT)")
    ft.add_argument("--epochs", type=int, help="stage-2 epochs")
    ft.add_argument("--num-workers", dest="num_workers", type=int, help="Ray Train workers (0 = local mode)")
    ft.add_argument("--max-contexts", dest="max_contexts", type=int)
    ft.add_argument("--seed", type=int)
    ft.add_argument("--config", help="YAML with a `finetune:` section (FinetuneConfig fields)")

    ds = sub.add_parser("datasets", help="list or show the built-in datasets")
    ds_sub = ds.add_subparsers(dest="datasets_command")
    ds_sub.add_parser("list", help="list the built-in datasets")
    show = ds_sub.add_parser("show", help="show a dataset's categories, contexts and targets")
    show.add_argument("name")

    qs = sub.add_parser("quickstart", help="before/after demo on the embedded model (<= 15 min on 2 cores)")
    qs.add_argument("--samples", dest="samples_per_context", type=int, help="samples per context per estimate")
    qs.add_argument("--epochs", type=int, help="stage-2 epochs")
    qs.add_argument("--num-workers", dest="num_workers", type=int)
    qs.add_argument("--max-contexts", dest="max_contexts", type=int)
    qs.add_argument("--model", help="model to start from (default: the embedded smollm2-135m)")
    qs.add_argument("--output", help="adapter folder to create")
    qs.add_argument("--config", help="YAML with quickstart fields (dataset, finetune:, estimate:)")
    sw = sub.add_parser("sweep", help="Ray Tune search of kl_weight, kto_weight, lr, beta (ASHA; Optuna optional)")
    _spec_args(sw)
    sw.add_argument("--name", help="sweep name (MLflow tag `sweep`, output folder)")
    sw.add_argument("--num-samples", dest="num_samples", type=int, help="number of trials")
    sw.add_argument("--search", choices=["random", "optuna"])
    sw.add_argument("--scheduler", choices=["asha", "fifo"])
    sw.add_argument("--output", help="where to write the best config (a `finetune:` YAML)")
    sw.add_argument("--config", help="YAML with SweepConfig fields (ranges, templates, finetune:)")

    cmp = sub.add_parser("compare", help="methods x datasets x tasks into one MLflow parent run (resumable)")
    cmp.add_argument("--name", help="comparison name; rerunning the same name resumes and skips finished cells")
    cmp.add_argument("--datasets", nargs="+", help="dataset names (default: gender-uk-real gender-us-real)")
    cmp.add_argument("--methods", nargs="+", help="zero-shot prompt-engineering ift dpo hybrid kl_only kto_only (default: all)")
    cmp.add_argument("--tasks", nargs="+", choices=["attribute", "story"], help="default: attribute")
    cmp.add_argument("--samples", dest="samples_per_context", type=int, help="samples per context (budget)")
    cmp.add_argument("--epochs", type=int, help="training epochs of every method (budget)")
    cmp.add_argument("--max-contexts", dest="max_contexts", type=int, help="first N contexts only (budget)")
    cmp.add_argument("--estimator", choices=["sample", "readout"], help="readout: attribute task only")
    cmp.add_argument("--report", help="also write a Markdown results report to this file (e.g. docs/results.md)")
    cmp.add_argument("--config", help="YAML with CompareConfig fields (name, datasets, methods, tasks, finetune:, estimate:)")
    ui = sub.add_parser("ui", help="serve the project's MLflow store in the MLflow UI (127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def cmd_ui(args) -> int:
    from distalign_ray.tracking.mlflow_store import ui_command

    argv, env = ui_command(args.host, args.port)
    print(f"MLflow UI: http://{args.host}:{args.port}  (store {argv[argv.index('--backend-store-uri') + 1]})", flush=True)
    os.execvpe(argv[0], argv, env)


def cmd_compare(args) -> int:
    from distalign_ray.compare import CompareConfig, run_compare

    values = _load_config(args, "compare")
    values.update(_overrides(args, ["name", "datasets", "methods", "tasks"]))
    cfg = _validated(CompareConfig, values, "compare config")
    finetune = cfg.finetune.model_dump() | _overrides(args, ["max_contexts"])
    if args.epochs is not None:
        finetune.update(epochs=args.epochs, sft_epochs=min(cfg.finetune.sft_epochs, args.epochs))
    estimate = cfg.estimate.model_dump() | _overrides(args, ["samples_per_context", "max_contexts", "estimator"])
    cfg = _validated(CompareConfig, cfg.model_dump() | {"finetune": finetune, "estimate": estimate}, "compare config")
    run_compare(cfg, report=args.report)
    return 0


def cmd_sweep(args) -> int:
    from distalign_ray.data.specs import load_spec
    from distalign_ray.tuning.sweep import SweepConfig, run_sweep

    values = _load_config(args, "sweep")
    values.update(_overrides(args, ["name", "num_samples", "search", "scheduler", "output"]))
    cfg = _validated(SweepConfig, values, "sweep config")
    spec = load_spec(args.dataset, args.spec)
    if cfg.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise DistalignError("--search optuna needs the optuna package (pip install -e '.[tune]')") from None
    result = run_sweep(spec, cfg)
    print(f"best val_mae {result['best_val_mae']:.4f} over {result['trials']} trials; best config: {result['best_config']}")
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


def cmd_estimate(args) -> int:
    from distalign_ray.config import EstimateConfig
    from distalign_ray.data.specs import load_spec
    from distalign_ray.estimate import plan_estimate, run_estimate
    from distalign_ray.tracking.mlflow_store import check_tracking

    values = _load_config(args, "estimate")
    values.update(_overrides(args, ["model", "adapter", "samples_per_context", "estimator", "task", "max_contexts", "prompt_engineering", "seed"]))
    cfg = _validated(EstimateConfig, values, "estimate config")
    spec = load_spec(args.dataset, args.spec)
    check_tracking()
    plan = plan_estimate(spec, cfg)
    result = run_estimate(spec, cfg, plan=plan)
    r = result.report
    print(f"{spec.name} {result.method} ({cfg.estimator}): MAE {r.mae:.4f} [{r.mae_ci_low:.4f}, {r.mae_ci_high:.4f}] "
          f"KL {r.kl:.4f} JS {r.js:.4f} unmatched {r.unmatched_rate:.1%} noise floor {r.noise_floor_mae:.4f} "
          + (f"readout MAE {result.readout.mae:.4f}; " if result.readout is not None else "")
          + f"MLflow run {result.run_id}; samples {result.samples_path}")
    return 0


def cmd_finetune(args) -> int:
    from distalign_ray.config import FinetuneConfig
    from distalign_ray.data.specs import load_spec
    from distalign_ray.tracking.mlflow_store import check_tracking, log_params, start_run
    from distalign_ray.training.finetune import check_binding, describe_result, log_finetune_result, run_finetune, validate_finetune

    values = _load_config(args, "finetune")
    values.update(_overrides(args, ["model", "loss_mode", "init_adapter", "epochs", "num_workers", "max_contexts", "seed"]))
    cfg = _validated(FinetuneConfig, values, "finetune config")
    spec = load_spec(args.dataset, args.spec)
    check_tracking()
    validate_finetune(spec, cfg, args.output)
    with start_run(f"finetune-{spec.name}-{cfg.loss_mode}", tags={"dataset": spec.name, "method": cfg.loss_mode, "model": cfg.model, "task": "attribute"}) as run:
        log_params(cfg.model_dump())
        result = run_finetune(spec, cfg, args.output, mlflow_run_id=run.info.run_id)
        log_finetune_result(result, cfg)
        print("\n".join(describe_result(result)))
        print(f"adapter written to {result['adapter']}; MLflow run {run.info.run_id}")
        check_binding(result, cfg)  # a failed check ends the MLflow run as FAILED
    return 0


def cmd_quickstart(args) -> int:
    from distalign_ray.quickstart import QuickstartConfig, run_quickstart

    values = _load_config(args, "quickstart")
    cfg = _validated(QuickstartConfig, values, "quickstart config")
    finetune = cfg.finetune.model_dump() | _overrides(args, ["epochs", "num_workers", "max_contexts", "model"])
    estimate = cfg.estimate.model_dump() | _overrides(args, ["samples_per_context", "max_contexts"])
    cfg = _validated(QuickstartConfig, cfg.model_dump() | {"finetune": finetune, "estimate": estimate} | _overrides(args, ["output"]), "quickstart config")
    run_quickstart(cfg)
    return 0


COMMANDS = {
    "estimate": cmd_estimate,
    "finetune": cmd_finetune,
    "datasets": cmd_datasets,
    "quickstart": cmd_quickstart,
    "compare": cmd_compare,
    "sweep": cmd_sweep,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DistalignError as exc:
        print(f"distalign: error: {exc}", file=sys.stderr)
        return 2
    except CheckFailed as exc:
        print(f"distalign: check failed: {exc}", file=sys.stderr)
        return CheckFailed.exit_code


if __name__ == "__main__":
    sys.exit(main())
