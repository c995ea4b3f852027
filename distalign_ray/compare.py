"""The comparison job: methods x datasets x tasks, one MLflow parent run with a child run per cell.

Resumable: the parent run is found again by its name, finished cells (child runs with status
FINISHED) are skipped, and trained adapters are reused from `<storage>/compare/<name>/`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from distalign_ray import storage
from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.errors import DistalignError
from distalign_ray.methods import Method, get_methods
from distalign_ray.paths import home_dir

RESULT_COLUMNS = (
    "dataset",
    "task",
    "method",
    "mae",
    "mae_ci_low",
    "mae_ci_high",
    "kl",
    "js",
    "unmatched_rate",
    "noise_floor_mae",
    "noise_p_value",
    "readout_mae",
)


class CompareConfig(BaseModel):
    """The comparison grid and its budget (samples, epochs, contexts)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("compare", pattern=r"^[A-Za-z0-9_\-]+$", description="resume key: a rerun with the same name continues")
    datasets: list[str] = Field(default_factory=lambda: ["gender-uk-real", "gender-us-real"], description="built-in dataset names")
    methods: list[str] | None = Field(None, description="default: every method in the registry")
    tasks: list[str] = Field(default_factory=lambda: ["attribute"], description="attribute and/or story")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="fine-tuning settings of every trained method (loss_mode set per method)"
    )
    estimate: EstimateConfig = Field(
        default_factory=lambda: EstimateConfig(samples_per_context=40),
        description="estimation settings of every cell (task, adapter and prompt engineering set per cell)",
    )
    capability: bool = Field(True, description="perplexity / KL-from-base on neutral text for every fine-tune")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="optional lm-eval tasks (needs lm-eval and its data)")


def cell_key(dataset: str, method: str, task: str) -> str:
    return f"{dataset}|{method}|{task}"


def _parent_run(name: str):
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["distalign"],
        filter_string=f"tags.job = 'compare' and tags.compare = '{name}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def finished_cells(parent_id: str) -> dict[str, str]:
    """cell key -> run id of the FINISHED estimate child runs of `parent_id`."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["distalign"],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.kind = 'estimate' and attributes.status = 'FINISHED'",
        output_format="list",
    )
    return {r.data.tags["cell"]: r.info.run_id for r in runs}


def _train(method: Method, dataset: str, cfg: CompareConfig, adapters: str, spec) -> str:
    """Train `method` on `dataset` unless its adapter already exists (a child run per training)."""
    import mlflow
    import ray

    from distalign_ray.evaluation.capability import capability_metrics, lm_eval_hook
    from distalign_ray.models import resolve_model
    from distalign_ray.tracking.mlflow_store import log_params, start_run
    from distalign_ray.training.finetune import log_finetune_result, run_finetune

    output = storage.join(adapters, dataset, method.name)
    if storage.is_complete_folder(output) and storage.exists(storage.join(output, "adapter_config.json")):
        return output
    update = {"loss_mode": method.name}
    if method.init_from:
        update["init_adapter"] = storage.join(adapters, dataset, method.init_from)
    ft = cfg.finetune.model_copy(update=update)
    tags = {"kind": "train", "dataset": dataset, "method": method.name, "model": ft.model, "compare": cfg.name}
    description = f"Comparison '{cfg.name}': training {method.name} ({method.description}) on {dataset}"
    with start_run(f"train:{method.name}:{dataset}", description, tags=tags, nested=True) as run:
        log_params(ft.model_dump())
        result = run_finetune(spec, ft, output, mlflow_run_id=run.info.run_id)
        log_finetune_result(result, ft)  # a cell records its binding check; the comparison table shows it
        if cfg.capability:
            model_ref = resolve_model(ft.model).__dict__
            mlflow.log_metrics(ray.get(ray.remote(num_cpus=1)(capability_metrics).remote(model_ref, output)))
        if cfg.lm_eval_tasks:
            mlflow.log_metrics(lm_eval_hook(resolve_model(ft.model).path, output, cfg.lm_eval_tasks))
    return output


def validate_compare(cfg: CompareConfig):
    from distalign_ray.data.prompts import TASKS
    from distalign_ray.models import resolve_model

    methods = get_methods(cfg.methods)
    specs = {name: load_dataset(name) for name in cfg.datasets}
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise DistalignError(f"unknown task {unknown[0]!r}; choose from {TASKS}")
    if "story" in cfg.tasks and cfg.estimate.estimator == "readout":
        raise DistalignError("the readout estimator is available for the attribute task only")
    resolve_model(cfg.finetune.model)
    resolve_model(cfg.estimate.judge_model, materialize=False)
    return methods, specs


def run_compare(cfg: CompareConfig, console=None, report: str | Path | None = None) -> list[dict]:
    import mlflow

    from distalign_ray.cluster import init_ray
    from distalign_ray.console import terminal
    from distalign_ray.estimate import run_estimate
    from distalign_ray.tracking.mlflow_store import check_tracking, log_params, start_run

    console = console or terminal()
    started = time.time()
    check_tracking()
    methods, specs = validate_compare(cfg)
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
        done = finished_cells(parent.info.run_id)
        for dataset, spec in specs.items():
            for method in methods:
                adapter = _train(method, dataset, cfg, adapters, spec) if method.trained else None
                for task in cfg.tasks:
                    key = cell_key(dataset, method.name, task)
                    if key in done:
                        console.print(f"skip {key} (finished in run {done[key]})")
                        continue
                    console.rule(key)
                    est = cfg.estimate.model_copy(
                        update={
                            "model": cfg.finetune.model,
                            "adapter": str(adapter) if adapter else None,
                            "task": task,
                            "prompt_engineering": method.prompt_engineering,
                        }
                    )
                    tags = {"kind": "estimate", "cell": key, "compare": cfg.name, "method": method.name}
                    run_estimate(spec, est, tags=tags, run_name=f"{method.name}:{dataset}:{task}")
        rows = collect_results(parent.info.run_id)
        write_results(rows, home_dir() / "compare" / cfg.name / "results")
        mlflow.log_artifacts(str(home_dir() / "compare" / cfg.name / "results"), artifact_path="results")
    console.print(results_markdown(rows))
    if report:
        Path(report).write_text(results_document(rows, cfg, time.time() - started))
    return rows


def collect_results(parent_id: str) -> list[dict]:
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["distalign"],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.kind = 'estimate' and attributes.status = 'FINISHED'",
        output_format="list",
    )
    rows = []
    for run in runs:
        dataset, method, task = run.data.tags["cell"].split("|")
        row = {"dataset": dataset, "task": task, "method": method}
        row.update({k: run.data.metrics.get(k, math.nan) for k in RESULT_COLUMNS[3:]})
        rows.append(row)
    names = [m.name for m in get_methods(None)]
    return sorted(rows, key=lambda r: (r["dataset"], r["task"], names.index(r["method"]) if r["method"] in names else len(names)))


def results_markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | task | method | MAE (95% CI) | KL | JS | unmatched | noise floor (p) | readout MAE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        readout = "" if r["readout_mae"] is None or math.isnan(r["readout_mae"]) else f"{r['readout_mae']:.3f}"
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['method']} | {r['mae']:.3f} ({r['mae_ci_low']:.3f}–{r['mae_ci_high']:.3f}) | "
            f"{r['kl']:.3f} | {r['js']:.3f} | {r['unmatched_rate']:.1%} | {r['noise_floor_mae']:.3f} ({r['noise_p_value']:.2f}) | {readout} |"
        )
    return "\n".join(lines)


# The paper's headline MAEs (method doc §5: model not named, task variant not stated).
PAPER_REFERENCE_MAE = {
    ("gender-uk-real", "attribute"): 0.084,
    ("gender-us-real", "attribute"): 0.068,
    ("gender-uk-even", "attribute"): 0.046,
    ("race-us-even", "attribute"): 0.072,
    ("sentiment-us-even", "attribute"): 0.075,
    ("gender-uk-real", "story"): 0.22,
    ("gender-us-real", "story"): 0.25,
}


def results_document(rows: list[dict], cfg: CompareConfig, seconds: float) -> str:
    """The Markdown report of a comparison: budget, results, and the paper's numbers beside ours."""
    est, ft = cfg.estimate, cfg.finetune
    lines = [
        f"# Results: comparison `{cfg.name}`",
        "",
        f"Generated by `distalign compare` from a real run (MLflow parent run tagged `compare={cfg.name}`).",
        "",
        "## Budget",
        "",
        f"- model: `{ft.model}`; datasets: {', '.join(cfg.datasets)}; tasks: {', '.join(cfg.tasks)}",
        f"- samples per context: {est.samples_per_context or 'spec default'}; contexts: {est.max_contexts or 'all'}; "
        f"estimator: {est.estimator}; decoding T={est.temperature}, top-p={est.top_p}, top-k off, identical for every method",
        f"- training: SFT {ft.sft_epochs} epochs (steering methods), {ft.epochs} epochs of the method's own loss, "
        f"lr {ft.lr}, LoRA r={ft.lora.r}, {ft.num_workers} Ray Train workers",
        f"- wall time of this invocation: {seconds / 60:.1f} min on 2 CPU cores",
        "",
        "## Results (MAE with 95% bootstrap CI)",
        "",
        results_markdown(rows),
        "",
        "## Beside the paper",
        "",
        "| dataset | task | ours: best method (MAE) | ours: hybrid | paper (proposed method) |",
        "|---|---|---|---|---|",
    ]
    for dataset, task in sorted({(r["dataset"], r["task"]) for r in rows}):
        cells = [r for r in rows if r["dataset"] == dataset and r["task"] == task]
        best = min(cells, key=lambda r: r["mae"])
        hybrid = next((f"{r['mae']:.3f}" for r in cells if r["method"] == "hybrid"), "—")
        paper = PAPER_REFERENCE_MAE.get((dataset, task))
        lines.append(f"| {dataset} | {task} | {best['method']} ({best['mae']:.3f}) | {hybrid} | {paper if paper else '—'} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], folder: Path) -> None:
    """results.csv, results.md and a heatmap of MAE (methods x datasets) per task."""
    import csv

    from distalign_ray.evaluation.plots import plot_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(results_markdown(rows) + "\n")
    for task in sorted({r["task"] for r in rows}):
        cells = [r for r in rows if r["task"] == task]
        datasets = sorted({r["dataset"] for r in cells})
        methods = [m.name for m in get_methods(None) if any(r["method"] == m.name for r in cells)]
        grid = np.full((len(methods), len(datasets)), np.nan)
        for r in cells:
            grid[methods.index(r["method"]), datasets.index(r["dataset"])] = r["mae"]
        plot_heatmap(grid, methods, datasets, f"MAE by method and dataset ({task} task)", folder / f"heatmap_{task}.png")
