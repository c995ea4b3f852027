"""The comparison job: datasets x seeds x methods x tasks x templates, one MLflow parent run with a
child run per cell.

Each seed trains every trained method once (finetune.seed) and samples every cell once (estimate.seed);
the attribute task is scored per template, as the paper does. Resumable: the parent run is found
again by its name, finished cells (child runs with status FINISHED) are skipped, and trained adapters
are reused from `<storage>/compare/<name>/<dataset>/<method>/seed-<seed>`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from distalign_ray import storage
from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.data.prompts import build_prompts, held_out_ids, template_ids
from distalign_ray.data.specs import load_dataset
from distalign_ray.errors import DistalignError
from distalign_ray.methods import Method, get_methods
from distalign_ray.paths import home_dir

# One row per cell: dataset x task x template x method x seed (results.csv).
CELL_COLUMNS = ("dataset", "task", "template", "method", "seed", "samples")
METRIC_COLUMNS = (
    "mae",
    "mae_ci_low",
    "mae_ci_high",
    "mae_debiased",
    "kl",
    "js",
    "unmatched_rate",
    "cut_rate",
    "noise_floor_mae",
    "noise_p_value",
    "readout_mae",
)
RESULT_COLUMNS = CELL_COLUMNS + METRIC_COLUMNS + ("trained_on",)
POOLED = "pooled"  # the template column of a cell that pools the attribute templates


class CompareConfig(BaseModel):
    """The comparison grid and its budget (samples, epochs, contexts)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("compare", pattern=r"^[A-Za-z0-9_\-]+$", description="resume key: a rerun with the same name continues")
    datasets: list[str] = Field(default_factory=lambda: ["gender-uk-real", "gender-us-real"], description="built-in dataset names")
    methods: list[str] | None = Field(None, description="default: every method in the registry")
    tasks: list[str] = Field(default_factory=lambda: ["attribute"], description="attribute and/or story")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="one training run per trained method (as finetune.seed) and one sample per cell (as estimate.seed) "
        "for each; tables give the mean and sd over seeds",
    )
    cross_country: dict[str, str] = Field(
        default_factory=lambda: {"gender-uk-real": "gender-us-real", "gender-uk-even": "gender-us-even"},
        description="the paper's cross-country test: adapters trained on a key dataset (when compared) are also estimated "
        "on the value dataset's cross_country_template prompts against its targets (task column: cross-country)",
    )
    cross_country_template: str = Field("attribute_1", description="the template of the cross-country cells (the paper's v2)")
    per_template: bool = Field(
        True,
        description="attribute task: score each attribute template alone with samples_per_context samples (the paper's "
        "protocol); false pools the templates, splitting the samples",
    )
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="fine-tuning settings of every trained method (loss_mode set per method)"
    )
    estimate: EstimateConfig = Field(
        default_factory=lambda: EstimateConfig(samples_per_context=40),
        description="estimation settings of every cell (task, adapter and prompt engineering set per cell)",
    )
    capability: bool = Field(True, description="perplexity / KL-from-base on neutral text for every fine-tune")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="optional lm-eval tasks (needs lm-eval and its data)")


CROSS_COUNTRY = "cross-country"


@dataclass(frozen=True)
class Cell:
    """One estimate of the comparison: `method` trained on `trained_on` (if it trains), estimated on `dataset`."""

    trained_on: str
    dataset: str
    method: Method
    task: str  # attribute, story, or cross-country (an attribute estimate on another dataset)
    template: str
    seed: int

    @property
    def where(self) -> str:
        return self.dataset if self.trained_on == self.dataset else f"{self.trained_on}>{self.dataset}"

    @property
    def key(self) -> str:
        return f"{self.where}|{self.method.name}|{self.task}|{self.template}|seed-{self.seed}"

    @property
    def run_name(self) -> str:
        return f"{self.method.name}:{self.where}:{self.task}:{self.template}:seed-{self.seed}"


def plan_cells(cfg: CompareConfig, methods: list[Method], specs: dict) -> list[Cell]:
    """Every cell, in run order: per dataset and seed, each method's cells right after its training."""
    cells = []
    for dataset in cfg.datasets:
        spec = specs[dataset]
        for seed in cfg.seeds:
            for method in methods:
                for task in cfg.tasks:
                    cells += [Cell(dataset, dataset, method, task, t, seed) for t in cell_templates(spec, task, cfg.per_template)]
                abroad = cfg.cross_country.get(dataset)
                if abroad and method.trained and "attribute" in cfg.tasks:
                    cells.append(Cell(dataset, abroad, method, CROSS_COUNTRY, cfg.cross_country_template, seed))
    return cells


def cell_templates(spec, task: str, per_template: bool) -> list[str]:
    """The templates scored one by one (the spec's held-out paraphrases last: generalisation), or
    [POOLED] (the story task has one template)."""
    if task != "attribute" or not per_template:
        return [POOLED]
    return template_ids(spec, "attribute") + held_out_ids(spec)


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


def _train(method: Method, dataset: str, seed: int, cfg: CompareConfig, adapters: str, spec) -> str:
    """Train `method` on `dataset` with `seed` unless its adapter already exists (a child run per training)."""
    import mlflow
    import ray

    from distalign_ray.evaluation.capability import capability_metrics, lm_eval_hook
    from distalign_ray.models import resolve_model
    from distalign_ray.tracking.mlflow_store import log_params, start_run
    from distalign_ray.training.finetune import log_finetune_result, run_finetune

    output = storage.join(adapters, dataset, method.name, f"seed-{seed}")
    if storage.is_complete_folder(output) and storage.exists(storage.join(output, "adapter_config.json")):
        return output
    update = {"loss_mode": method.name, "seed": seed}
    if method.init_from:
        update["init_adapter"] = storage.join(adapters, dataset, method.init_from, f"seed-{seed}")
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


def validate_compare(cfg: CompareConfig):
    from distalign_ray.data.prompts import TASKS
    from distalign_ray.models import resolve_model

    methods = get_methods(cfg.methods)
    specs = {name: load_dataset(name) for name in cfg.datasets}
    for source, target in cfg.cross_country.items():
        if source in cfg.datasets:
            if target not in specs:  # estimated there, not compared on its own (plan_cells walks cfg.datasets)
                specs[target] = load_dataset(target)
            if specs[target].categories != specs[source].categories:
                raise DistalignError(f"cross_country: {source} and {target} have different categories")
            build_prompts(specs[target], "attribute", [cfg.cross_country_template])
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
        for cell in plan_cells(cfg, methods, specs):
            method, seed = cell.method, cell.seed
            adapter = _train(method, cell.trained_on, seed, cfg, adapters, specs[cell.trained_on]) if method.trained else None
            if cell.key in done:
                console.print(f"skip {cell.key} (finished in run {done[cell.key]})")
                continue
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
            tags = {"kind": "estimate", "cell": cell.key, "compare": cfg.name, "method": method.name, "task": cell.task}
            tags |= {"template": cell.template, "seed": str(seed), "samples": str(est.samples_per_context or spec.samples_per_context)}
            tags |= {"trained_on": cell.trained_on}
            run_estimate(spec, est, tags=tags, run_name=cell.run_name)
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
        tags = run.data.tags
        row = {"dataset": tags["dataset"], "task": tags["task"], "template": tags["template"], "method": tags["method"]}
        row |= {"seed": int(tags["seed"]), "samples": int(tags["samples"])}
        row.update({k: run.data.metrics.get(k, math.nan) for k in METRIC_COLUMNS})
        row["trained_on"] = tags.get("trained_on", tags["dataset"])
        rows.append(row)
    names = [m.name for m in get_methods(None)]
    order = {name: i for i, name in enumerate(names)}
    return sorted(rows, key=lambda r: (r["dataset"], r["task"], r["template"], order.get(r["method"], len(names)), r["seed"]))


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per dataset x task x template x method: MAE mean and sd over seeds, the other metrics' means,
    and each seed's MAE with its interval."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["task"], r["template"], r["method"]), []).append(r)
    out = []
    for (dataset, task, template, method), cells in groups.items():
        maes = np.array([c["mae"] for c in cells])
        readouts = [c["readout_mae"] for c in cells if c["readout_mae"] is not None and not math.isnan(c["readout_mae"])]
        out.append(
            {
                "dataset": dataset,
                "task": task,
                "template": template,
                "method": method,
                "seeds": len(cells),
                "mae_mean": float(maes.mean()),
                "mae_sd": float(maes.std(ddof=1)) if len(cells) > 1 else math.nan,
                "per_seed": [(c["seed"], c["mae"], c["mae_ci_low"], c["mae_ci_high"]) for c in cells],
                "unmatched_rate": float(np.mean([c["unmatched_rate"] for c in cells])),
                "cut_rate": float(np.mean([c["cut_rate"] for c in cells])),
                "noise_floor_mae": float(np.mean([c["noise_floor_mae"] for c in cells])),
                "noise_p_value": float(np.max([c["noise_p_value"] for c in cells])),
                "readout_mae": float(np.mean(readouts)) if readouts else math.nan,
            }
        )
    return out


def results_markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | task | template | method | MAE mean ± sd (seeds) | MAE per seed (95% CI) | unmatched | cut | noise floor (max p) | readout MAE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in over_seeds(rows):
        readout = "" if math.isnan(r["readout_mae"]) else f"{r['readout_mae']:.3f}"
        spread = "" if math.isnan(r["mae_sd"]) else f" ± {r['mae_sd']:.3f}"
        per_seed = "; ".join(f"s{seed}: {m:.3f} ({lo:.3f}–{hi:.3f})" for seed, m, lo, hi in r["per_seed"])
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['template']} | {r['method']} | {r['mae_mean']:.3f}{spread} ({r['seeds']}) | {per_seed} | "
            f"{r['unmatched_rate']:.1%} | {r['cut_rate']:.1%} | {r['noise_floor_mae']:.3f} ({r['noise_p_value']:.2f}) | {readout} |"
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
        f"- seeds: {', '.join(map(str, cfg.seeds))} (each: one training per trained method, one sample per cell); "
        f"attribute templates {'scored one by one' if cfg.per_template else 'pooled'}",
        f"- samples per context{' and template' if cfg.per_template else ''}: {est.samples_per_context or 'spec default'}; "
        f"contexts: {est.max_contexts or 'all'}; "
        f"estimator: {est.estimator}; decoding T={est.temperature}, top-p={est.top_p}, top-k off, identical for every method",
        f"- training: SFT {ft.sft_epochs} epochs (steering methods), {ft.epochs} epochs of the method's own loss, "
        f"lr {ft.lr}, LoRA r={ft.lora.r}, {ft.num_workers} Ray Train workers",
        f"- wall time of this invocation: {seconds / 60:.1f} min on 2 CPU cores",
        "",
        "## Results (MAE mean ± sd over seeds; each seed's MAE with its 95% basic bootstrap interval)",
        "",
        results_markdown(rows),
        "",
        "## Beside the paper",
        "",
        "| dataset | task | ours: best method (mean MAE over templates and seeds) | ours: hybrid | paper (proposed method) |",
        "|---|---|---|---|---|",
    ]
    for (dataset, task), by_method in mean_by_method(rows).items():
        best = min(by_method, key=by_method.get)
        hybrid = f"{by_method['hybrid']:.3f}" if "hybrid" in by_method else "—"
        paper = PAPER_REFERENCE_MAE.get((dataset, task))
        lines.append(f"| {dataset} | {task} | {best} ({by_method[best]:.3f}) | {hybrid} | {paper if paper else '—'} |")
    return "\n".join(lines) + "\n"


def mean_by_method(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(dataset, task) -> method -> MAE averaged over templates and seeds."""
    sums: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        sums.setdefault((r["dataset"], r["task"]), {}).setdefault(r["method"], []).append(r["mae"])
    return {key: {m: float(np.mean(v)) for m, v in methods.items()} for key, methods in sorted(sums.items())}


def write_results(rows: list[dict], folder: Path) -> None:
    """results.csv (one row per cell), results.md (over seeds) and a heatmap of MAE (methods x datasets) per task."""
    import csv

    from distalign_ray.evaluation.plots import plot_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(results_markdown(rows) + "\n")
    means = mean_by_method(rows)
    for task in sorted({task for _, task in means}):
        datasets = sorted({dataset for dataset, t in means if t == task})
        methods = [m.name for m in get_methods(None) if any(m.name in means[(d, task)] for d in datasets)]
        grid = np.full((len(methods), len(datasets)), np.nan)
        for d in datasets:
            for method, value in means[(d, task)].items():
                grid[methods.index(method), datasets.index(d)] = value
        title = f"MAE by method and dataset ({task} task; mean over templates and seeds)"
        plot_heatmap(grid, methods, datasets, title, folder / f"heatmap_{task}.png")
