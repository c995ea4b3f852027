"""Running a comparison: the tuning, the trainings and the cells, resumable, as MLflow runs under one parent."""

from __future__ import annotations

import math
import time
from pathlib import Path

import yaml

from distalign_ray import storage
from distalign_ray.compare.grid import CROSS_COUNTRY, POOLED, CompareConfig, plan_cells, tune_dataset, validate_compare
from distalign_ray.compare.record import IMPORTED_SECONDS_TAG, import_record, load_record, write_record
from distalign_ray.compare.report import METRIC_COLUMNS, ReportContext, results_document, results_markdown, write_csv, write_results
from distalign_ray.data.prompts import held_out_ids, template_ids
from distalign_ray.methods import METHODS, Method, get_methods
from distalign_ray.paths import home_dir
from distalign_ray.tracking.mlflow_store import CODE_VERSION_TAG, EXPERIMENT, child_runs, wall_seconds


def _parent_run(name: str):
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.job = 'compare' and tags.compare = '{name}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def finished_cells(parent_id: str) -> dict[str, str]:
    """cell key -> run id of the FINISHED estimate child runs of `parent_id`."""
    runs = child_runs(parent_id, kind="estimate", finished_only=True)
    return {r.data.tags["cell"]: r.info.run_id for r in runs}


def _train(method: Method, dataset: str, seed: int, cfg: CompareConfig, adapters: str, spec, tuned: dict[str, dict]) -> str:
    """Train `method` (with its tuned values) on `dataset` with `seed` unless its adapter already exists
    (a child run per training), after the adapter it starts from."""
    import mlflow
    import ray

    from distalign_ray.evaluation.capability import capability_metrics, lm_eval_hook
    from distalign_ray.models import resolve_model
    from distalign_ray.tracking.mlflow_store import log_params, start_run
    from distalign_ray.training.finetune import log_finetune_result, run_finetune

    output = storage.join(adapters, dataset, method.name, f"seed-{seed}")
    if storage.is_complete_folder(output) and storage.exists(storage.join(output, "adapter_config.json")):
        return output
    update = {"loss_mode": method.name, "seed": seed} | tuned.get(method.name, {})
    if method.init_from:
        update["init_adapter"] = _train(METHODS[method.init_from], dataset, seed, cfg, adapters, spec, tuned)
    ft = cfg.finetune.model_copy(update=update)
    tags = {"kind": "train", "dataset": dataset, "method": method.name, "model": ft.model, "compare": cfg.name, "seed": str(seed)}
    description = f"Comparison '{cfg.name}': training {method.name} ({method.description}) on {dataset}, seed {seed}"
    with start_run(f"train:{method.name}:{dataset}:seed-{seed}", description, tags=tags, nested=True) as run:
        log_params(ft.model_dump())
        result = run_finetune(spec, ft, output, mlflow_run_id=run.info.run_id)
        log_finetune_result(result, ft)  # a cell records its binding check; the comparison table shows it
        if cfg.capability:
            model_ref = resolve_model(ft.model).__dict__
            mlflow.log_metrics(ray.get(ray.remote(num_cpus=1)(capability_metrics).remote(model_ref, output)))
        if cfg.lm_eval_tasks:
            mlflow.log_metrics(lm_eval_hook(resolve_model(ft.model).path, output, cfg.lm_eval_tasks))
    return output


def _tune(method: Method, cfg: CompareConfig, specs: dict, adapters: str, tuned: dict[str, dict]) -> dict:
    """`method`'s tuned finetune fields: a Ray Tune search (a nested MLflow sweep run), done once and kept
    in `<adapters>/tuned/<method>.yaml` with its budget and best val_mae."""
    from distalign_ray.tuning.sweep import SweepConfig, run_sweep

    record = storage.join(adapters, "tuned", f"{method.name}.yaml")
    if storage.exists(record):
        return yaml.safe_load(storage.read_text(record))
    dataset = tune_dataset(cfg)
    spec = specs[dataset]
    finetune = cfg.finetune.model_copy(update={"loss_mode": method.name, "seed": cfg.tune.seed})
    if method.init_from:  # DPO's trials start from the IFT adapter of the first seed, trained with IFT's tuned values
        start = METHODS[method.init_from]
        finetune = finetune.model_copy(update={"init_adapter": _train(start, dataset, cfg.seeds[0], cfg, adapters, spec, tuned)})
    sweep = SweepConfig(
        name=f"{cfg.name}-{method.name}",
        num_samples=cfg.tune.trials,
        scheduler=cfg.tune.scheduler,
        lr=cfg.tune.lr_per_method.get(method.name, cfg.tune.lr),
        beta=cfg.tune.beta,
        searched=list(method.tuned_fields),
        start_from_defaults=True,
        train_templates=template_ids(spec, "attribute"),
        validation_templates=held_out_ids(spec) or template_ids(spec, "attribute"),
        finetune=finetune,
        seed=cfg.tune.seed,
        min_answer_mass=cfg.tune.min_answer_mass,
        output=str(home_dir() / "compare" / cfg.name / "tuned" / f"{method.name}-best.yaml"),
    )
    result = run_sweep(spec, sweep, nested=True)
    chosen = {"values": result["best_values"], "best_val_mae": result["best_val_mae"], "trials": result["trials"], "dataset": dataset}
    storage.write_text(record, yaml.safe_dump(chosen, sort_keys=False))
    return chosen


def run_compare(cfg: CompareConfig, console=None, report: str | Path | None = None) -> list[dict]:
    import mlflow

    from distalign_ray.cluster import cluster_hardware, init_ray
    from distalign_ray.console import terminal
    from distalign_ray.estimate import run_estimate
    from distalign_ray.tracking.mlflow_store import check_tracking, log_params, start_run

    started = time.time()
    check_tracking()
    methods, specs = validate_compare(cfg)
    cells = plan_cells(cfg, methods, specs)
    record = load_record(report, cfg, cells) if report else None
    console = console or terminal()  # after the checks: bad input prints one error line, not the log's path
    init_ray()
    adapters = storage.join(storage.storage_root(), "compare", cfg.name)
    parent_id = _parent_run(cfg.name)
    if parent_id is not None:
        console.print(f"resuming comparison '{cfg.name}' (run {parent_id})")
    description = (
        f"Comparison '{cfg.name}' of methods x datasets x tasks; a child run per cell (`distalign compare --name {cfg.name}` resumes it)"
    )
    with start_run(f"compare-{cfg.name}", description, tags={"job": "compare", "compare": cfg.name}, resume_run_id=parent_id) as parent:
        if parent_id is None:
            log_params(
                cfg.model_dump(exclude={"finetune", "estimate"})
                | {"finetune": cfg.finetune.model_dump(), "estimate": cfg.estimate.model_dump()}
            )
        if record is not None:  # what the report holds and this store lacks was run elsewhere
            imported = import_record(record, finished_cells(parent.info.run_id), cfg, adapters, new_parent=parent_id is None)
            if imported:
                console.print(f"imported {imported}")
        tuning: dict[str, dict] = {}

        def publish() -> None:  # the report of everything finished so far, so an interrupted run's report is current
            if report:
                write_report(
                    parent.info.run_id,
                    report,
                    ReportContext(cfg, specs, tuning, len(cells), 0.0, time.time() - started, cluster_hardware()),
                )

        for method in methods:
            if method.trained and cfg.tune.trials:
                tuning[method.name] = _tune(method, cfg, specs, adapters, {m: t["values"] for m, t in tuning.items()})
                mlflow.log_params({f"tuned.{method.name}.{k}": v for k, v in tuning[method.name]["values"].items()})
                publish()
        tuned = {m: t["values"] for m, t in tuning.items()}
        publish()
        done = finished_cells(parent.info.run_id)
        for cell in cells:
            method, seed = cell.method, cell.seed
            if cell.key in done:
                console.print(f"skip {cell.key} (finished in run {done[cell.key]})")
                continue
            adapter = _train(method, cell.trained_on, seed, cfg, adapters, specs[cell.trained_on], tuned) if method.trained else None
            console.rule(cell.key)
            spec = specs[cell.dataset]
            est = cfg.estimate.model_copy(
                update={
                    "model": cfg.finetune.model,
                    "adapter": str(adapter) if adapter else None,
                    "task": "attribute" if cell.task == CROSS_COUNTRY else cell.task,
                    "templates": None if cell.template == POOLED else [cell.template],
                    "prompt_engineering": method.prompt_engineering,
                    "seed": seed,
                }
            )
            tags = cell.tags(cfg.name, est.samples_per_context or spec.samples_per_context)
            run_estimate(spec, est, tags=tags, run_name=cell.run_name)
            publish()
        rows = collect_results(parent.info.run_id)
        write_results(rows, home_dir() / "compare" / cfg.name / "results")
        mlflow.log_artifacts(str(home_dir() / "compare" / cfg.name / "results"), artifact_path="results")
        publish()
    console.print(results_markdown(rows))
    return rows


def write_report(parent_id: str, report: str | Path, ctx: ReportContext) -> None:
    """The Markdown report of the finished cells, beside it their results.csv (to check and re-plot) and
    the record another machine resumes from (record.py)."""
    from dataclasses import replace

    rows = collect_results(parent_id)
    seconds = compute_seconds(parent_id)
    storage.write_text(str(report), results_document(rows, replace(ctx, compute_seconds=seconds)))
    write_csv(rows, Path(report).with_suffix(".csv"))
    write_record(report, ctx.cfg, ctx.tuning, seconds)


def compute_seconds(parent_id: str) -> float:
    """Wall time of every finished step of the comparison (tuning, trainings, cells), over all invocations
    (and the machines its record came from); the pauses of a step reopened by a resume do not count."""
    import mlflow

    imported = float(mlflow.get_run(parent_id).data.tags.get(IMPORTED_SECONDS_TAG, 0.0))
    return imported + sum(wall_seconds(run) for run in child_runs(parent_id, finished_only=True))


def collect_results(parent_id: str) -> list[dict]:
    runs = child_runs(parent_id, kind="estimate", finished_only=True)
    rows = []
    for run in runs:
        tags = run.data.tags
        row = {"dataset": tags["dataset"], "task": tags["task"], "template": tags["template"], "method": tags["method"]}
        row |= {"seed": int(tags["seed"]), "samples": int(tags["samples"])}
        row.update({k: run.data.metrics.get(k, math.nan) for k in METRIC_COLUMNS})
        row["trained_on"] = tags.get("trained_on", tags["dataset"])
        row["code_version"] = tags.get(CODE_VERSION_TAG, "")
        rows.append(row)
    names = [m.name for m in get_methods(None)]
    order = {name: i for i, name in enumerate(names)}
    return sorted(rows, key=lambda r: (r["dataset"], r["task"], r["template"], order.get(r["method"], len(names)), r["seed"]))
