"""The comparison's results: the per-cell table (results.csv), tables over seeds, the heatmap, and
the Markdown report with its discussion computed from the numbers."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distalign_ray import storage
from distalign_ray.compare.grid import POOLED, CompareConfig, tune_dataset
from distalign_ray.documents import flow_yaml
from distalign_ray.methods import get_methods

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
    "lexical_mae",
)


RESULT_COLUMNS = CELL_COLUMNS + METRIC_COLUMNS + ("trained_on", "code_version")


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
                "per_seed": [(c["seed"], c["mae"], c["mae_debiased"], c["mae_ci_low"], c["mae_ci_high"]) for c in cells],
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
        "| dataset | task | template | method | MAE mean ± sd (seeds) | MAE per seed [debiased] (95% CI) | unmatched | cut | noise floor (max p) | readout MAE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in over_seeds(rows):
        readout = "" if math.isnan(r["readout_mae"]) else f"{r['readout_mae']:.3f}"
        spread = "" if math.isnan(r["mae_sd"]) else f" ± {r['mae_sd']:.3f}"
        per_seed = "; ".join(f"s{seed}: {m:.3f} [{d:.3f}] ({lo:.3f}–{hi:.3f})" for seed, m, d, lo, hi in r["per_seed"])
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
    hardware: str  # the cluster of this invocation, in words


PAPER_TEMPLATES = ("attribute_0", "attribute_1")  # the paper's v1 and v2 prompts: the summary's columns


PAPER_TEMPLATE_NAMES = {"attribute_0": "v1", "attribute_1": "v2"}


def _headline(rows: list[dict], task: str, metric: str) -> dict[str, tuple[list[str], dict[str, list[float]]]]:
    """Where (the dataset, or `trained_on>dataset` for adapters trained elsewhere) -> (the templates each
    seed's mean covers, method -> per seed, the `metric` of `task` averaged over them). The attribute task's
    are the paper's v1 and v2 (their pooled cell where a run pooled them; the held-out paraphrase is
    generalisation, reported apart), and a seed counts only once it holds every one of them that the
    dataset's rows hold (an interrupted run does not pass one template off as the mean of two); the
    cross-country and story tasks have one template."""
    cells: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for r in rows:
        if r["task"] == task and (task != "attribute" or r["template"] in (*PAPER_TEMPLATES, POOLED)):
            where = r["dataset"] if r["trained_on"] == r["dataset"] else f"{r['trained_on']}>{r['dataset']}"
            cells.setdefault(where, {}).setdefault(r["method"], {}).setdefault(r["seed"], {})[r["template"]] = r[metric]
    table = {}
    for where, by_method in sorted(cells.items()):
        held = {t for seeds in by_method.values() for templates in seeds.values() for t in templates}
        wanted = sorted(held - {POOLED} or held)  # the per-template cells where a run has both kinds
        per_seed = {
            method: [float(np.mean([templates[t] for t in wanted])) for templates in seeds.values() if set(wanted) <= templates.keys()]
            for method, seeds in by_method.items()
        }
        if by := {method: values for method, values in per_seed.items() if values}:
            table[where] = (wanted, by)
    return table


def headline_maes(rows: list[dict], task: str = "attribute", metric: str = "mae") -> dict[str, dict[str, list[float]]]:
    """Where -> method -> per seed, the MAE of `task` (or the cells' `metric`, e.g. mae_debiased) averaged
    over the paper's templates that the rows hold (see `_headline`). The summary, the paper comparison and
    the heatmap all read this."""
    return {where: by for where, (_, by) in _headline(rows, task, metric).items()}


def headline_templates(rows: list[dict], task: str = "attribute") -> dict[str, str]:
    """Where -> the templates its headline means average, in the paper's names (`v1, v2`, or `v1` alone
    while a dataset's v2 cells are still to run), so no table passes one template off as two."""
    pooled = "v1+v2 pooled" if task == "attribute" else "one prompt"  # the story task's pooled cell is its one prompt
    return {
        where: ", ".join(pooled if t == POOLED else PAPER_TEMPLATE_NAMES.get(t, t) for t in templates)
        for where, (templates, _) in _headline(rows, task, "mae").items()
    }


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "") + f" ({len(values)})"


def summary_markdown(rows: list[dict], metric: str = "mae") -> str:
    """Datasets x methods: MAE (or `metric`) mean ± sd over seeds of the mean over the paper's templates (the
    `templates` column names those a row holds); the best per row in bold."""
    table = headline_maes(rows, metric=metric)
    if not table:
        return "No cell of the paper's attribute templates has finished yet."
    templates = headline_templates(rows)
    names = [m.name for m in get_methods(None) if any(m.name in by for by in table.values())]
    lines = ["| dataset | templates | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for dataset, per_seed in table.items():
        best = min(per_seed, key=lambda m: np.mean(per_seed[m]))
        cells = ["—" if m not in per_seed else f"**{_mean_sd(per_seed[m])}**" if m == best else _mean_sd(per_seed[m]) for m in names]
        lines.append(f"| {dataset} | {templates[dataset]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _own_ranges(cfg: CompareConfig) -> str:
    """The compared methods' own learning-rate ranges, as the tuning sentence names them."""
    compared = {m.name for m in get_methods(cfg.methods)}
    return "".join(f" ({m}: [{low:g}, {high:g}])" for m, (low, high) in cfg.tune.lr_per_method.items() if m in compared)


def _seeds_apart(lower: list[float], higher: list[float]) -> bool:
    """Every seed of `lower` below every seed of `higher`, with two seeds or more of each."""
    return min(len(lower), len(higher)) > 1 and max(lower) < min(higher)


def _order(by: dict[str, list[float]], first: str, second: str) -> str:
    """What the seeds say about `first` (the lower mean MAE) against `second`."""
    single = [m for m in (first, second) if len(by[m]) < 2]
    if single:
        return f"one seed of {single[0] if len(single) == 1 else 'each'}: no order is shown."
    if _seeds_apart(by[first], by[second]):
        return f"every seed of {first} is below every seed of {second}."
    return "their seeds overlap: no order is shown."


def discussion_lines(rows: list[dict]) -> list[str]:
    """What the numbers say, computed from them (so the text cannot drift from the tables)."""
    lines = []
    table = headline_maes(rows)
    with_hybrid = {d: by for d, by in table.items() if "hybrid" in by and len(by) > 1}
    pairs = {}  # dataset -> (the lowest method, hybrid or the next after it)
    for dataset, by in with_hybrid.items():
        ranked = sorted(by, key=lambda m: np.mean(by[m]))
        pairs[dataset] = (ranked[0], ranked[1] if ranked[0] == "hybrid" else "hybrid")
    lowest = [d for d, (first, _) in pairs.items() if first == "hybrid"]
    if with_hybrid:
        shown = [d for d in lowest if _seeds_apart(with_hybrid[d]["hybrid"], with_hybrid[d][pairs[d][1]])]
        lines.append(
            f"- Hybrid has the lowest mean attribute MAE on {len(lowest)} of {len(with_hybrid)} datasets with results"
            + (f" ({', '.join(lowest)})" if lowest else "")
            + (f"; every seed of it below every seed of the next method on {len(shown)} of them." if lowest else ".")
        )
    for dataset, (first, second) in pairs.items():
        by = with_hybrid[dataset]
        lines.append(f"- {dataset}: {first} {_mean_sd(by[first])} against {second} {_mean_sd(by[second])}; " + _order(by, first, second))
    corrected = headline_maes(rows, metric="mae_debiased")
    lowest_corrected = [d for d in with_hybrid if min(corrected[d], key=lambda m: np.mean(corrected[d][m])) == "hybrid"]
    if with_hybrid:
        lines.append(
            f"- By the bias-corrected MAE, hybrid is lowest on {len(lowest_corrected)} of {len(with_hybrid)} datasets"
            + (f" ({', '.join(lowest_corrected)})." if lowest_corrected else ".")
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
    judged = [r for r in rows if not math.isnan(r.get("judge_lexical_agreement", math.nan))]
    if judged:
        lines.append(
            f"- Story judge against the lexical classifier: {np.mean([r['judge_lexical_agreement'] for r in judged]):.1%} "
            f"agreement; story MAE {np.mean([r['mae'] for r in judged]):.3f} by the judge, "
            f"{np.nanmean([r.get('lexical_mae', math.nan) for r in judged]):.3f} by the lexical classifier "
            f"(means over {len(judged)} cells)."
        )
    return lines or ["- No finished cell yet."]


def rerun_command(cfg: CompareConfig, tuning: dict[str, dict], method: str, dataset: str, template: str, seed: int) -> str:
    """The command that reruns one attribute cell from a fresh clone, under a new name (nothing reused),
    with the tuned values and every setting that differs from a setting's default."""
    sets = {"seeds": f"[{seed}]", "templates": f"[{template}]", "cross_country": "{}", "tune.trials": "0"}
    # The story's selection is left out: it may name datasets the rerun does not compare, and it runs no story.
    grid = {"name", "datasets", "methods", "tasks", "seeds", "templates", "cross_country", "tune", "finetune", "estimate"}
    grid |= {"story_methods", "story_datasets"}
    sets |= {k: flow_yaml(v) for k, v in cfg.model_dump(exclude_defaults=True, exclude=grid).items()}
    for section in ("finetune", "estimate"):
        sets |= {f"{section}.{k}": flow_yaml(v) for k, v in getattr(cfg, section).model_dump(exclude_defaults=True).items()}
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
        f"- compute: {ctx.compute_seconds / 3600:.1f} h of finished tuning, training and estimation "
        f"(this invocation {ctx.invocation_seconds / 60:.0f} min, on {ctx.hardware})"
    )
    versions = Counter(row.get("code_version") or "not recorded" for row in rows)
    if versions:
        lines.append("- code: cells computed by " + ", ".join(f"`{version}` ({count})" for version, count in versions.most_common()))
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
    if cfg.tune.trials:
        tune = cfg.tune
        lines += [
            f"{tune.trials} trials per method on {tune_dataset(cfg)} ({tune.scheduler}; the first trial runs the untuned settings; "
            f"lr in [{tune.lr[0]:g}, {tune.lr[1]:g}]{_own_ranges(cfg)}, beta in [{tune.beta[0]:g}, {tune.beta[1]:g}] "
            "where the objective has one, log-uniform), trained on its attribute templates and scored by val_mae on its held-out paraphrase.",
            "",
            "| method | chosen | val_mae (chosen trial, last epoch) |",
            "|---|---|---|",
        ]
        for method, chosen in ctx.tuning.items():
            values = ", ".join(f"{k} {v:.3g}" for k, v in chosen["values"].items())
            lines.append(f"| {method} | {values} | {chosen['best_val_mae']:.3f} |")
        waiting = [m.name for m in get_methods(cfg.methods) if m.trained and m.name not in ctx.tuning]
        if waiting:
            lines += ["", f"Not tuned yet: {', '.join(waiting)}."]
    else:
        lines.append("No search (`tune.trials: 0`): every method trains with the settings above.")
    lines += [
        "",
        "## Summary (attribute task: MAE mean ± sd over seeds (n) of the mean over the paper's templates v1 and v2, or "
        "over those a dataset holds so far (its `templates` column); best in bold)",
        "",
        summary_markdown(rows),
        "",
        "The same cells' bias-corrected MAE (`mae_debiased`, 2 MAE − the mean of its bootstrap resamples, at least 0): "
        "near the noise floor a sampled MAE is mostly sampling noise, which this subtracts, so it separates methods "
        "the raw MAE cannot.",
        "",
        summary_markdown(rows, metric="mae_debiased"),
        "",
        "## What the numbers say (generated from them)",
        "",
        *discussion_lines(rows),
        "",
        "## Per dataset (every template and task; MAE mean ± sd over seeds; each seed's MAE with its 95% basic bootstrap interval)",
        "",
        "A sampled MAE is biased upward by sampling noise (|t − q| grows with q's noise, most near the noise floor). "
        "The debiased MAE in brackets and the basic bootstrap interval subtract that bias, so near the floor the "
        "interval can lie below the raw MAE: read it as the interval of the bias-corrected MAE.",
    ]
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += ["", f"### {dataset}", "", results_markdown([r for r in rows if r["dataset"] == dataset])]
    lines += [
        "",
        "## Beside the paper",
        "",
        "Ours: MAE mean ± sd over seeds (n), as in the summary (attribute: per seed, the mean over the templates "
        "named; cross-country: v2 of the US dataset, adapters trained on the UK one; story: its one prompt).",
        "",
        "| dataset | task | templates | ours: best method | ours: hybrid | paper (proposed method) |",
        "|---|---|---|---|---|---|",
    ]
    for task in sorted({r["task"] for r in rows}):
        templates = headline_templates(rows, task)
        for where, by_method in headline_maes(rows, task).items():
            best = min(by_method, key=lambda m: np.mean(by_method[m]))
            hybrid = _mean_sd(by_method["hybrid"]) if "hybrid" in by_method else "—"
            paper = PAPER_REFERENCE_MAE.get((where, task))
            lines.append(f"| {where} | {task} | {templates[where]} | {best}: {_mean_sd(by_method[best])} | {hybrid} | {paper or '—'} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(RESULT_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(str(path), text.getvalue())


def read_csv(location: str) -> list[dict]:
    """The rows `write_csv` wrote, typed as `collect_results` returns them."""
    import csv
    import io

    rows = []
    for raw in csv.DictReader(io.StringIO(storage.read_text(location))):
        row = {k: raw[k] for k in ("dataset", "task", "template", "method", "trained_on")} | {"code_version": raw.get("code_version", "")}
        row |= {"seed": int(raw["seed"]), "samples": int(raw["samples"])}
        row |= {k: float(raw[k]) if raw.get(k) else math.nan for k in METRIC_COLUMNS}
        rows.append(row)
    return rows


def write_results(rows: list[dict], folder: Path) -> None:
    """results.csv (one row per cell), results.md (over seeds) and a heatmap of MAE (methods x datasets) per task."""
    from distalign_ray.evaluation.plots import plot_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows, folder / "results.csv")
    (folder / "results.md").write_text(results_markdown(rows) + "\n")
    for task in sorted({r["task"] for r in rows}):
        means = headline_maes(rows, task)
        if not means:  # e.g. only held-out paraphrases were compared
            continue
        datasets = list(means)
        methods = [m.name for m in get_methods(None) if any(m.name in means[d] for d in datasets)]
        grid = np.full((len(methods), len(datasets)), np.nan)
        for d in datasets:
            for method, per_seed in means[d].items():
                grid[methods.index(method), datasets.index(d)] = np.mean(per_seed)
        title = f"MAE by method and dataset ({task} task; mean over the templates named and seeds)"
        templates = headline_templates(rows, task)
        plot_heatmap(grid, methods, [f"{d} ({templates[d]})" for d in datasets], title, folder / f"heatmap_{task}.png")
