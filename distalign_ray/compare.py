"""The comparison job: datasets x seeds x methods x tasks x templates, one MLflow parent run with a
child run per cell.

First every trained method gets the same small Ray Tune budget (its learning rate, and beta where its
objective has one, scored on a dataset's held-out paraphrases). Then each seed trains every trained
method once (finetune.seed) and samples every cell once (estimate.seed); the attribute task is scored
per template, as the paper does. Resumable: the parent run is found again by its name, finished cells
(child runs with status FINISHED) are skipped, tuned values are reused from
`<storage>/compare/<name>/tuned/<method>.yaml` and trained adapters from
`<storage>/compare/<name>/<dataset>/<method>/seed-<seed>`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from distalign_ray import storage
from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.data.prompts import build_prompts, held_out_ids, template_ids
from distalign_ray.data.specs import load_dataset
from distalign_ray.errors import DistalignError
from distalign_ray.methods import METHODS, Method, get_methods
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
    "judge_lexical_agreement",
)
RESULT_COLUMNS = CELL_COLUMNS + METRIC_COLUMNS + ("trained_on",)
POOLED = "pooled"  # the template column of a cell that pools the attribute templates


class CompareTuneConfig(BaseModel):
    """The search every trained method gets before the comparison: the same trials, ranges and data."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(
        4, ge=0, description="Ray Tune trials per trained method, the first with the finetune settings as given; 0 = no search"
    )
    dataset: str | None = Field(
        None,
        description="the trials train on this dataset's attribute templates and are scored (val_mae) on its held-out "
        "paraphrases; default: the first compared dataset",
    )
    lr: tuple[float, float] = Field((1e-4, 5e-3), description="learning-rate range (stage 2, or the baseline's), log-uniform")
    beta: tuple[float, float] = Field(
        (0.05, 0.5), description="beta range, log-uniform, for the methods whose objective has one (KTO, DPO)"
    )
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops trials early on val_mae; fifo runs every trial whole")
    seed: int = Field(0, description="seeds the search and the trials' fine-tuning")


class CompareConfig(BaseModel):
    """The comparison grid and its budget (samples, epochs, contexts)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("compare", pattern=r"^[A-Za-z0-9_\-]+$", description="resume key: a rerun with the same name continues")
    datasets: list[str] = Field(default_factory=lambda: ["gender-uk-real", "gender-us-real"], description="built-in dataset names")
    methods: list[str] | None = Field(None, description="default: every method in the registry")
    tasks: list[str] = Field(default_factory=lambda: ["attribute"], description="attribute and/or story")
    story_methods: list[str] | None = Field(
        None, description="methods of the story task (default: every compared method; the paper's minimum: zero-shot, ift, hybrid)"
    )
    story_datasets: list[str] | None = Field(None, description="datasets of the story task (default: every compared dataset)")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="one training run per trained method (as finetune.seed) and one sample per cell (as estimate.seed) "
        "for each; tables give the mean and sd over seeds",
    )
    untrained_every_seed: bool = Field(
        False,
        description="estimate the untrained methods (zero-shot, prompt engineering) under every seed; by default under the "
        "first only: a seed changes nothing in them but the sampling, which each cell's interval covers",
    )
    tune: CompareTuneConfig = Field(default_factory=CompareTuneConfig, description="the Tune budget of every trained method")
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
    templates: list[str] | None = Field(
        None, description="score only these attribute templates (e.g. [attribute_0], to rerun one cell); default: every one"
    )
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="fine-tuning settings of every trained method (loss_mode set per method)"
    )
    estimate: EstimateConfig = Field(
        default_factory=lambda: EstimateConfig(max_new_tokens=256, story_classifier="judge"),
        description="estimation settings of every cell (task, adapter and prompt engineering set per cell); 256 new "
        "tokens: zero-shot answers that stop at all stop within it (README, answer length), the judge labels stories",
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
    """Every cell, in run order: per seed (so a partial run covers every dataset) and dataset, each
    method's cells right after its training."""
    cells = []
    for seed in cfg.seeds:
        for dataset in cfg.datasets:
            spec = specs[dataset]
            for method in methods:
                if not method.trained and seed != cfg.seeds[0] and not cfg.untrained_every_seed:
                    continue
                for task in cfg.tasks:
                    if task == "story" and not _in_story(cfg, method, dataset):
                        continue
                    templates = cell_templates(spec, task, cfg.per_template)
                    chosen = [t for t in templates if task != "attribute" or cfg.templates is None or t in cfg.templates]
                    cells += [Cell(dataset, dataset, method, task, t, seed) for t in chosen]
                abroad = cfg.cross_country.get(dataset)
                if abroad and method.trained and "attribute" in cfg.tasks:
                    cells.append(Cell(dataset, abroad, method, CROSS_COUNTRY, cfg.cross_country_template, seed))
    return cells


def _in_story(cfg: CompareConfig, method: Method, dataset: str) -> bool:
    return (cfg.story_methods is None or method.name in cfg.story_methods) and (cfg.story_datasets is None or dataset in cfg.story_datasets)


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


def _train(method: Method, dataset: str, seed: int, cfg: CompareConfig, adapters: str, spec, tuned: dict[str, dict]) -> str:
    """Train `method` (with its tuned values) on `dataset` with `seed` unless its adapter already exists
    (a child run per training)."""
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


def tune_dataset(cfg: CompareConfig) -> str:
    return cfg.tune.dataset or cfg.datasets[0]


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
        lr=cfg.tune.lr,
        beta=cfg.tune.beta,
        searched=list(method.tuned_fields),
        start_from_defaults=True,
        train_templates=template_ids(spec, "attribute"),
        validation_templates=held_out_ids(spec) or template_ids(spec, "attribute"),
        finetune=finetune,
        seed=cfg.tune.seed,
        output=str(home_dir() / "compare" / cfg.name / "tuned" / f"{method.name}-best.yaml"),
    )
    result = run_sweep(spec, sweep, nested=True)
    chosen = {"values": result["best_values"], "best_val_mae": result["best_val_mae"], "trials": result["trials"], "dataset": dataset}
    storage.write_text(record, yaml.safe_dump(chosen, sort_keys=False))
    return chosen


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
    if cfg.tune.trials and tune_dataset(cfg) not in specs:
        specs[tune_dataset(cfg)] = load_dataset(tune_dataset(cfg))
    get_methods(cfg.story_methods)
    outside = [d for d in cfg.story_datasets or [] if d not in cfg.datasets]
    if outside:
        raise DistalignError(f"story_datasets: {outside[0]!r} is not among the compared datasets")
    known = {t for name in cfg.datasets for t in cell_templates(specs[name], "attribute", cfg.per_template)}
    unknown = [t for t in cfg.templates or [] if t not in known]
    if unknown:
        raise DistalignError(f"templates: unknown attribute template {unknown[0]!r}; the datasets have {', '.join(sorted(known))}")
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
        tuning = {}
        for method in methods:
            if method.trained and cfg.tune.trials:
                tuning[method.name] = _tune(method, cfg, specs, adapters, {m: t["values"] for m, t in tuning.items()})
                mlflow.log_params({f"tuned.{method.name}.{k}": v for k, v in tuning[method.name]["values"].items()})
        tuned = {m: t["values"] for m, t in tuning.items()}
        cells = plan_cells(cfg, methods, specs)

        def publish() -> None:  # the report of every finished cell so far, so an interrupted run's report is current
            if report:
                write_report(parent.info.run_id, report, ReportContext(cfg, specs, tuning, len(cells), 0.0, time.time() - started))

        publish()
        done = finished_cells(parent.info.run_id)
        for cell in cells:
            method, seed = cell.method, cell.seed
            adapter = _train(method, cell.trained_on, seed, cfg, adapters, specs[cell.trained_on], tuned) if method.trained else None
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
            publish()
        rows = collect_results(parent.info.run_id)
        write_results(rows, home_dir() / "compare" / cfg.name / "results")
        mlflow.log_artifacts(str(home_dir() / "compare" / cfg.name / "results"), artifact_path="results")
        publish()
    console.print(results_markdown(rows))
    return rows


def write_report(parent_id: str, report: str | Path, ctx: ReportContext) -> None:
    """The Markdown report of the finished cells, and beside it their results.csv (to check and re-plot)."""
    from dataclasses import replace

    rows = collect_results(parent_id)
    storage.write_text(str(report), results_document(rows, replace(ctx, compute_seconds=compute_seconds(parent_id))))
    write_csv(rows, Path(report).with_suffix(".csv"))


def compute_seconds(parent_id: str) -> float:
    """Wall time of every finished step of the comparison (tuning, trainings, cells), over all invocations."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["distalign"],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
        output_format="list",
    )
    return sum((r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time)


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


@dataclass(frozen=True)
class ReportContext:
    """What the report says besides the cells: the grid, the tuning, and how far and how long it ran."""

    cfg: CompareConfig
    specs: dict
    tuning: dict[str, dict]
    planned_cells: int
    compute_seconds: float
    invocation_seconds: float


PAPER_TEMPLATES = ("attribute_0", "attribute_1")  # the paper's v1 and v2 prompts: the summary's columns


def paper_template_maes(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """dataset -> method -> per seed, the attribute MAE averaged over the paper's two templates."""
    table: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in rows:
        if r["task"] == "attribute" and r["template"] in PAPER_TEMPLATES:
            table.setdefault(r["dataset"], {}).setdefault(r["method"], {}).setdefault(r["seed"], []).append(r["mae"])
    return {d: {m: [float(np.mean(v)) for v in seeds.values()] for m, seeds in by.items()} for d, by in sorted(table.items())}


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "") + f" ({len(values)})"


def summary_markdown(rows: list[dict]) -> str:
    """Datasets x methods: MAE mean ± sd over seeds of the mean over the paper's templates; the best per row in bold."""
    names = [m.name for m in get_methods(None) if any(r["method"] == m.name for r in rows)]
    lines = ["| dataset | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for dataset, per_seed in paper_template_maes(rows).items():
        best = min(per_seed, key=lambda m: np.mean(per_seed[m]))
        cells = ["—" if m not in per_seed else f"**{_mean_sd(per_seed[m])}**" if m == best else _mean_sd(per_seed[m]) for m in names]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def discussion_lines(rows: list[dict]) -> list[str]:
    """What the numbers say, computed from them (so the text cannot drift from the tables)."""
    lines = []
    table = paper_template_maes(rows)
    with_hybrid = {d: by for d, by in table.items() if "hybrid" in by and len(by) > 1}
    lowest = [d for d, by in with_hybrid.items() if min(by, key=lambda m: np.mean(by[m])) == "hybrid"]
    if with_hybrid:
        lines.append(
            f"- Hybrid has the lowest mean attribute MAE on {len(lowest)} of {len(with_hybrid)} datasets with results"
            + (f" ({', '.join(lowest)})." if lowest else ".")
        )
    for dataset, by in with_hybrid.items():
        best = min(by, key=lambda m: np.mean(by[m]))
        if best == "hybrid":
            continue
        apart = max(by[best]) < min(by["hybrid"])
        lines.append(
            f"- {dataset}: {best} {_mean_sd(by[best])} against hybrid {_mean_sd(by['hybrid'])}; "
            + ("every seed of it is below every seed of hybrid." if apart else "their seeds overlap: no order is shown.")
        )
    scored = [r for r in rows if not math.isnan(r["noise_p_value"])]
    if scored:
        within = [r for r in scored if r["noise_p_value"] >= 0.05]
        methods = sorted({r["method"] for r in within})
        lines.append(
            f"- Within sampling noise (calibrated-sampler test, p ≥ 0.05): {len(within)} of {len(scored)} cells"
            + (f" ({', '.join(methods)})." if methods else "; no other cell may be called calibrated.")
        )
    trained = {m.name for m in get_methods(None) if m.trained}
    for kind, group in (
        ("trained", [r for r in rows if r["method"] in trained]),
        ("untrained", [r for r in rows if r["method"] not in trained]),
    ):
        cut = [r["cut_rate"] for r in group if not math.isnan(r["cut_rate"])]
        if cut:
            lines.append(f"- Answers cut by max_new_tokens ({kind} methods): mean {np.mean(cut):.1%}, at most {max(cut):.1%} in a cell.")
    for method in [m.name for m in get_methods(None) if m.trained]:
        held = [r["mae"] for r in rows if r["method"] == method and r["template"].startswith("held_out")]
        seen = [r["mae"] for r in rows if r["method"] == method and r["task"] == "attribute" and r["template"] in PAPER_TEMPLATES]
        if held and seen:
            lines.append(f"- {method}: held-out paraphrase MAE {np.mean(held):.3f} against {np.mean(seen):.3f} on the trained templates.")
    agreement = [r["judge_lexical_agreement"] for r in rows if not math.isnan(r.get("judge_lexical_agreement", math.nan))]
    if agreement:
        lines.append(
            f"- Story judge against the lexical classifier: {np.mean(agreement):.1%} agreement (mean over {len(agreement)} cells)."
        )
    return lines or ["- No finished cell yet."]


def rerun_command(cfg: CompareConfig, tuning: dict[str, dict], method: str, dataset: str, template: str, seed: int) -> str:
    """The command that reruns one attribute cell from a fresh clone, under a new name (nothing reused),
    with the tuned values and every setting that differs from a setting's default."""

    def flat(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")

    sets = {"seeds": f"[{seed}]", "templates": f"[{template}]", "cross_country": "{}", "tune.trials": "0"}
    grid = {"name", "datasets", "methods", "tasks", "seeds", "templates", "cross_country", "tune", "finetune", "estimate"}
    sets |= {k: flat(v) for k, v in cfg.model_dump(exclude_defaults=True, exclude=grid).items()}
    for section in ("finetune", "estimate"):
        sets |= {f"{section}.{k}": flat(v) for k, v in getattr(cfg, section).model_dump(exclude_defaults=True).items()}
    sets |= {f"finetune.{k}": repr(v) for k, v in tuning.get(method, {}).get("values", {}).items()}
    flags = " ".join(f"--set '{k}={v}'" for k, v in sets.items())
    return f"distalign compare --name rerun-{method}-{seed} --datasets {dataset} --methods {method} --tasks attribute {flags}"


def results_document(rows: list[dict], ctx: ReportContext) -> str:
    """The Markdown report of a comparison: budget, tuning, the summary, per-dataset tables, the paper beside ours."""
    from distalign_ray.training.budget import plan_budget

    cfg = ctx.cfg
    est, ft = cfg.estimate, cfg.finetune
    status = (
        "complete"
        if len(rows) >= ctx.planned_cells
        else f"**partial: {len(rows)} of {ctx.planned_cells} cells finished** (`distalign compare` with the same config resumes)"
    )
    lines = [
        f"# Results: comparison `{cfg.name}`",
        "",
        f"Generated by `distalign compare` from a real run (MLflow parent run tagged `compare={cfg.name}`); {status}.",
        "",
        "## Budget",
        "",
        f"- model: `{ft.model}`; datasets: {', '.join(cfg.datasets)}; tasks: {', '.join(cfg.tasks)}",
        f"- seeds: {', '.join(map(str, cfg.seeds))} (each: one training per trained method, one sample per cell); untrained "
        f"methods {'under every seed' if cfg.untrained_every_seed else f'under seed {cfg.seeds[0]} only'}; attribute templates "
        f"{'scored one by one' if cfg.per_template else 'pooled'}",
        f"- samples per context{' and template' if cfg.per_template else ''}: {est.samples_per_context or 'the spec value'}; "
        f"contexts: {est.max_contexts or 'all'}; estimator: {est.estimator}; decoding T={est.temperature}, top-p={est.top_p}, "
        f"top-k off, at most {est.max_new_tokens or 'the default'} new tokens, identical for every method",
        f"- training (every trained method, in optimizer steps): lr {ft.lr} unless tuned, LoRA r={ft.lora.r}, "
        f"{ft.num_workers} Ray Train workers",
    ]
    for name in cfg.datasets:
        budget = plan_budget(ft, ctx.specs[name])
        lines.append(
            f"  - {name}: {budget.prompts} prompts, {budget.prompts_per_batch} per batch; {budget.sft_steps} SFT steps "
            f"(steering methods), {budget.steps} steps of the method's own loss"
        )
    lines.append(
        f"- compute: {ctx.compute_seconds / 3600:.1f} h of finished tuning, training and estimation on 2 CPU cores "
        f"(this invocation {ctx.invocation_seconds / 60:.0f} min)"
    )
    example = next((r for r in rows if r["method"] == "hybrid" and r["task"] == "attribute"), rows[0] if rows else None)
    if example:
        command = rerun_command(cfg, ctx.tuning, example["method"], example["dataset"], example["template"], example["seed"])
        lines += [
            "",
            "## Rerunning a cell",
            "",
            f"From a fresh clone (`make install`), this reruns the {example['method']} cell of {example['dataset']}, "
            f"{example['template']}, seed {example['seed']} (MAE {example['mae']:.4f} above) with the tuned values, "
            "training again under a new name; the same seed gives the same numbers. Other cells: change the "
            "method, dataset, template and seed (and the tuned values).",
            "",
            f"    {command}",
        ]
    lines += ["", "## Tuning (the same Ray Tune budget for every trained method)", ""]
    if ctx.tuning:
        tune = cfg.tune
        lines += [
            f"{tune.trials} trials per method on {tune_dataset(cfg)} ({tune.scheduler}; the first trial runs the untuned settings; "
            f"lr in [{tune.lr[0]:g}, {tune.lr[1]:g}], beta in [{tune.beta[0]:g}, {tune.beta[1]:g}] where the objective has one, "
            "log-uniform), trained on its attribute templates and scored by val_mae on its held-out paraphrase.",
            "",
            "| method | chosen | best val_mae |",
            "|---|---|---|",
        ]
        for method, chosen in ctx.tuning.items():
            values = ", ".join(f"{k} {v:.3g}" for k, v in chosen["values"].items())
            lines.append(f"| {method} | {values} | {chosen['best_val_mae']:.3f} |")
    else:
        lines.append("No search (`tune.trials: 0`): every method trains with the settings above.")
    lines += [
        "",
        "## Summary (attribute task: MAE mean ± sd over seeds (n) of the mean over the paper's two templates; best in bold)",
        "",
        summary_markdown(rows),
        "",
        "## What the numbers say (generated from them)",
        "",
        *discussion_lines(rows),
        "",
        "## Per dataset (every template and task; MAE mean ± sd over seeds; each seed's MAE with its 95% basic bootstrap interval)",
    ]
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += ["", f"### {dataset}", "", results_markdown([r for r in rows if r["dataset"] == dataset])]
    lines += [
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


def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(RESULT_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(str(path), text.getvalue())


def write_results(rows: list[dict], folder: Path) -> None:
    """results.csv (one row per cell), results.md (over seeds) and a heatmap of MAE (methods x datasets) per task."""
    from distalign_ray.evaluation.plots import plot_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows, folder / "results.csv")
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
