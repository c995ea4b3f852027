"""What a comparison compares: its config (the grid, the tuning budget) and its cells, in run order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.data.prompts import build_prompts, held_out_ids, template_ids
from distalign_ray.data.specs import load_dataset
from distalign_ray.errors import DistalignError
from distalign_ray.methods import METHODS, Method, get_methods, trained_method_names
from distalign_ray.tuning.sweep import LogRange

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
    lr: LogRange = Field((1e-4, 5e-3), description="learning-rate range (stage 2, or the baseline's), log-uniform")
    lr_per_method: dict[str, LogRange] = Field(
        default_factory=dict,
        description="learning-rate range of the named trained methods instead of `lr`, e.g. one that reaches a method's "
        "published value (configs/compare-paper.yaml: DPO's, 1e-6)",
    )
    beta: LogRange = Field((0.05, 0.5), description="beta range, log-uniform, for the methods whose objective has one (KTO, DPO)")
    scheduler: Literal["asha", "fifo"] = Field(
        "fifo",
        description="fifo runs every trial whole; asha stops trials early on val_mae, for larger searches (with 4 trials it "
        "stopped IFT's best learning rate after one epoch: README, comparison)",
    )
    min_answer_mass: float = Field(
        0.5, ge=0.0, le=1.0, description="the least val_answer_mass a chosen trial keeps (the sweep's `min_answer_mass`)"
    )
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

    def tags(self, compare: str, samples: int) -> dict[str, str]:
        """The MLflow tags of the cell's estimate run (the report and resuming read them)."""
        tags = {"kind": "estimate", "cell": self.key, "compare": compare, "method": self.method.name, "task": self.task}
        return tags | {"template": self.template, "seed": str(self.seed), "samples": str(samples), "trained_on": self.trained_on}


def plan_cells(cfg: CompareConfig, methods: list[Method], specs: dict) -> list[Cell]:
    """Every cell, in run order, so that a partial run has the main claims first: the main methods before
    the ablations (kl_only's unbound answers run to the token budget, ~20x a trained cell's time); within
    each, the attribute task (with cross-country) before the story task, whose long generations cost
    several times more; within those, per seed (so a partial run covers every dataset) and dataset, each
    method's cells right after its training."""
    cells = []
    for group in ([m for m in methods if not m.ablation], [m for m in methods if m.ablation]):
        for phase in ([t for t in cfg.tasks if t != "story"], [t for t in cfg.tasks if t == "story"]):
            for seed in cfg.seeds:
                for dataset in cfg.datasets:
                    for method in group:
                        if not method.trained and seed != cfg.seeds[0] and not cfg.untrained_every_seed:
                            continue
                        cells += _method_cells(cfg, specs[dataset], method, phase, seed)
    return cells


def _method_cells(cfg: CompareConfig, spec, method: Method, tasks: list[str], seed: int) -> list[Cell]:
    cells = []
    for task in tasks:
        if task == "story" and not _in_story(cfg, method, spec.name):
            continue
        templates = cell_templates(spec, task, cfg.per_template)
        chosen = [t for t in templates if task != "attribute" or cfg.templates is None or t in cfg.templates]
        cells += [Cell(spec.name, spec.name, method, task, t, seed) for t in chosen]
    abroad = cfg.cross_country.get(spec.name)
    if abroad and method.trained and "attribute" in tasks:
        cells.append(Cell(spec.name, abroad, method, CROSS_COUNTRY, cfg.cross_country_template, seed))
    return cells


def _in_story(cfg: CompareConfig, method: Method, dataset: str) -> bool:
    return (cfg.story_methods is None or method.name in cfg.story_methods) and (cfg.story_datasets is None or dataset in cfg.story_datasets)


def cell_templates(spec, task: str, per_template: bool) -> list[str]:
    """The templates scored one by one (the spec's held-out paraphrases last: generalisation), or
    [POOLED] (the story task has one template)."""
    if task != "attribute" or not per_template:
        return [POOLED]
    return template_ids(spec, "attribute") + held_out_ids(spec)


def tune_dataset(cfg: CompareConfig) -> str:
    return cfg.tune.dataset or cfg.datasets[0]


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
    untrained = [m for m in cfg.tune.lr_per_method if m not in METHODS or not METHODS[m].trained]
    if untrained:
        raise DistalignError(f"tune.lr_per_method: {untrained[0]!r} is not a trained method; trained: {', '.join(trained_method_names())}")
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
