"""The method registry, the results writer, and a resumable comparison of every method on a tiny model."""

from __future__ import annotations

import math
import shlex
import subprocess
import time

import mlflow
import numpy as np
import pytest
import yaml

from distalign_ray.cli import build_parser, load_config
from distalign_ray.compare.grid import CompareConfig, plan_cells, validate_compare
from distalign_ray.compare.record import load_record, write_record
from distalign_ray.compare.report import (
    METRIC_COLUMNS,
    ReportContext,
    discussion_lines,
    headline_maes,
    headline_templates,
    read_csv,
    rerun_command,
    results_document,
    results_markdown,
    summary_markdown,
    write_csv,
    write_results,
)
from distalign_ray.compare.run import collect_results, compute_seconds, finished_cells, run_compare
from distalign_ray.errors import DistalignError
from distalign_ray.methods import METHODS, get_methods
from distalign_ray.tracking.mlflow_store import child_runs, code_version, start_run


def test_registry_pulls_in_what_a_method_starts_from():
    assert [m.name for m in get_methods(["dpo"])] == ["ift", "dpo"]
    assert [m.name for m in get_methods(None)] == list(METHODS)
    assert METHODS["prompt-engineering"].prompt_engineering and not METHODS["zero-shot"].trained
    with pytest.raises(DistalignError, match="unknown method 'rlhf'"):
        get_methods(["rlhf"])


def _cell(method: str, seed: int, mae: float, **metrics) -> dict:
    row = {"dataset": "d1", "task": "attribute", "template": "attribute_0", "method": method, "seed": seed, "samples": 100}
    row |= {"mae": mae, "mae_ci_low": mae - 0.02, "mae_ci_high": mae + 0.02, "mae_debiased": mae - 0.01, "kl": 0.05, "js": 0.01}
    row |= {"unmatched_rate": 0.02, "cut_rate": 0.0, "noise_floor_mae": 0.05, "noise_p_value": 0.31, "readout_mae": math.nan}
    return row | {"trained_on": metrics.get("dataset", "d1")} | metrics  # trained where estimated unless told


def test_cells_per_template_seed_and_cross_country():
    cfg = CompareConfig(datasets=["gender-uk-real"], methods=["zero-shot", "hybrid"], seeds=[0, 1])
    methods, specs = validate_compare(cfg)
    cells = plan_cells(cfg, methods, specs)
    home = [c for c in cells if c.task == "attribute"]
    templates = ("attribute_0", "attribute_1", "held_out_0")
    # the untrained method is sampled under the first seed only (a seed changes nothing else in it)
    assert {(c.method.name, c.template, c.seed) for c in home} == {("zero-shot", t, 0) for t in templates} | {
        ("hybrid", t, s) for t in templates for s in (0, 1)
    }
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # seed-major: a partial run covers every dataset
    abroad = [c for c in cells if c.task == "cross-country"]  # UK-trained adapters on the US v2 prompts, US targets
    assert [(c.key, c.run_name) for c in abroad] == [
        (
            f"gender-uk-real>gender-us-real|hybrid|cross-country|attribute_1|seed-{s}",
            f"hybrid:gender-uk-real>gender-us-real:cross-country:attribute_1:seed-{s}",
        )
        for s in (0, 1)
    ]
    assert len({c.key for c in cells}) == len(cells) == 11
    every_seed = plan_cells(cfg.model_copy(update={"untrained_every_seed": True}), methods, specs)
    assert len(every_seed) == 14
    one = plan_cells(cfg.model_copy(update={"templates": ["attribute_0"], "seeds": [1], "cross_country": {}}), methods, specs)
    assert [c.key for c in one] == [
        "gender-uk-real|zero-shot|attribute|attribute_0|seed-1",
        "gender-uk-real|hybrid|attribute|attribute_0|seed-1",
    ]
    with pytest.raises(DistalignError, match="templates: unknown attribute template 'v3'"):
        validate_compare(cfg.model_copy(update={"templates": ["v3"]}))
    pooled = plan_cells(cfg.model_copy(update={"per_template": False, "cross_country": {}}), methods, specs)
    assert [c.template for c in pooled] == ["pooled"] * 3
    with_ablation = cfg.model_copy(update={"methods": ["kl_only", "hybrid"], "per_template": False, "cross_country": {}})
    order = [(c.method.name, c.seed) for c in plan_cells(with_ablation, *validate_compare(with_ablation))]
    assert order == [("hybrid", 0), ("hybrid", 1), ("kl_only", 0), ("kl_only", 1)]  # the main claims first
    with_story = with_ablation.model_copy(update={"tasks": ["attribute", "story"], "story_methods": ["hybrid"], "seeds": [0]})
    order = [(c.method.name, c.task) for c in plan_cells(with_story, *validate_compare(with_story))]
    assert order == [("hybrid", "attribute"), ("hybrid", "story"), ("kl_only", "attribute")]  # the story table before ablations


def test_story_cells_only_for_the_chosen_methods_and_datasets():
    cfg = CompareConfig(
        datasets=["gender-uk-real", "race-us-even"],
        methods=["zero-shot", "ift", "hybrid"],
        tasks=["attribute", "story"],
        story_methods=["zero-shot", "hybrid"],
        story_datasets=["gender-uk-real"],
        seeds=[0],
        cross_country={},
    )
    methods, specs = validate_compare(cfg)
    cells = plan_cells(cfg, methods, specs)
    story = [(c.dataset, c.method.name, c.template) for c in cells if c.task == "story"]
    assert story == [("gender-uk-real", "zero-shot", "pooled"), ("gender-uk-real", "hybrid", "pooled")]
    assert [c.task for c in cells][-2:] == ["story", "story"]  # the main table first: stories cost most
    with pytest.raises(DistalignError, match="story_datasets: 'gender-us-real' is not among the compared datasets"):
        validate_compare(cfg.model_copy(update={"story_datasets": ["gender-us-real"]}))


def _config_of_command(command: str) -> CompareConfig:
    """The config a printed `distalign compare ...` command runs with, parsed by the CLI itself."""
    argv = shlex.split(command)
    assert argv[:2] == ["distalign", "compare"]
    return load_config(build_parser().parse_args(argv[1:]), "compare")


def test_a_cells_rerun_command_is_a_valid_comparison_of_that_cell_alone():
    """The report's command for one cell of a comparison whose story covers other datasets (as compare-paper.yaml's)."""
    cfg = CompareConfig(
        datasets=["gender-uk-real", "gender-uk-even"],
        tasks=["attribute", "story"],
        story_methods=["zero-shot", "ift", "hybrid"],
        story_datasets=["gender-uk-real", "gender-uk-even"],
        finetune={"min_steps": 70},
    )
    tuning = {"hybrid": {"values": {"lr": 0.002, "beta": 0.1}}}
    again = _config_of_command(rerun_command(cfg, tuning, "hybrid", "gender-uk-even", "attribute_0", 1))
    cells = plan_cells(again, *validate_compare(again))
    assert [(c.dataset, c.method.name, c.task, c.template, c.seed) for c in cells] == [
        ("gender-uk-even", "hybrid", "attribute", "attribute_0", 1)
    ]
    assert (again.finetune.min_steps, again.finetune.lr, again.finetune.beta) == (70, 0.002, 0.1)


def test_results_writer(tmp_path):
    rows = [
        _cell("zero-shot", 0, 0.3, readout_mae=0.2, noise_p_value=0.0),
        _cell("zero-shot", 1, 0.32, readout_mae=0.2, noise_p_value=0.0),
        _cell("hybrid", 0, 0.1),
        _cell("hybrid", 1, 0.12),
        _cell("hybrid", 2, 0.08, noise_p_value=0.5),
    ]
    write_results(rows, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    # mean ± sd over seeds beside each seed's interval
    assert (
        "| d1 | attribute | attribute_0 | hybrid | 0.100 ± 0.020 (3) | s0: 0.100 [0.090] (0.080–0.120); s1: 0.120 [0.110] (0.100–0.140); "
        "s2: 0.080 [0.070] (0.060–0.100) | 2.0% | 0.0% | 0.050 (0.50) |  |" in markdown
    )
    assert "| d1 | attribute | attribute_0 | zero-shot | 0.310 ± 0.014 (2) |" in markdown
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,task,template,method,seed,samples,mae,mae_ci_low,mae_ci_high")
    assert len(csv_lines) == 6 and csv_lines[0].endswith(",trained_on,code_version")
    assert (tmp_path / "heatmap_attribute.png").stat().st_size > 1000
    assert results_markdown(rows).count("\n") == 3
    # the heatmap shows the paper's templates (or their pooled cell), not the held-out paraphrase
    write_results([_cell("hybrid", 0, 0.1, template="pooled")], tmp_path / "pooled")
    write_results([_cell("hybrid", 0, 0.1, template="held_out_0")], tmp_path / "held-out")
    assert (tmp_path / "pooled" / "heatmap_attribute.png").exists() and not (tmp_path / "held-out" / "heatmap_attribute.png").exists()


def test_only_finished_estimates_of_this_parent_count_as_done(mlflow_uri):
    """Resuming reads the parent's child runs: a cell cut short, a training and another parent's cell are not done."""
    with start_run("parent", "a comparison") as parent:
        with start_run("cell a", "", tags={"kind": "estimate", "cell": "a"}, nested=True) as done:
            pass
        with pytest.raises(KeyboardInterrupt), start_run("cell b", "", tags={"kind": "estimate", "cell": "b"}, nested=True):
            raise KeyboardInterrupt
        with start_run("train", "", tags={"kind": "train"}, nested=True):
            pass
    with start_run("other", "another comparison"), start_run("cell c", "", tags={"kind": "estimate", "cell": "c"}, nested=True):
        pass
    parent_id = parent.info.run_id
    assert finished_cells(parent_id) == {"a": done.info.run_id}
    assert sorted(r.info.status for r in child_runs(parent_id)) == ["FINISHED", "FINISHED", "KILLED"]
    assert [r.data.tags["kind"] for r in child_runs(parent_id, finished_only=True, kind="train")] == ["train"]
    assert 0 < compute_seconds(parent_id) < 60  # the two finished children's wall time


def test_a_reopened_run_counts_its_open_time_not_its_pauses(mlflow_uri):
    """compute_seconds sums each step's time open: a sweep cut and resumed later is not charged the gap."""
    with start_run("parent", "a comparison") as parent:
        with pytest.raises(KeyboardInterrupt), start_run("sweep", "", nested=True) as sweep:
            time.sleep(0.5)
            raise KeyboardInterrupt
    time.sleep(3)  # the pause between invocations
    with start_run("parent", "", resume_run_id=parent.info.run_id), start_run("sweep", "", nested=True, resume_run_id=sweep.info.run_id):
        time.sleep(0.5)
    reopened = mlflow.get_run(sweep.info.run_id)
    assert (reopened.info.end_time - reopened.info.start_time) / 1000 > 4
    assert 1 <= reopened.data.metrics["wall_seconds"] < 2.5
    assert compute_seconds(parent.info.run_id) == reopened.data.metrics["wall_seconds"]


@pytest.mark.slow
def test_every_method_trains_and_estimates_and_rerun_resumes(ray_cluster, tiny_model_path, mlflow_uri, tmp_path, monkeypatch):
    cfg = CompareConfig(
        name="tiny",
        datasets=["gender-us-real"],
        finetune={"model": tiny_model_path, "num_workers": 0, "epochs": 1, "sft_epochs": 1, "max_contexts": 2, "answers_per_context": 8},
        estimate={"samples_per_context": 4, "max_contexts": 2, "max_new_tokens": 3, "num_actors": 1},
        capability=True,
        tune={"trials": 0},  # the search has its own test
        seeds=[0],
    )
    report = tmp_path / "results.md"
    rows = run_compare(cfg, report=report)
    assert sorted(r["method"] for r in rows) == sorted(m for m in METHODS for _ in range(3))  # one row per template
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    version = code_version()
    assert version.removesuffix("+changes") == head and {r["code_version"] for r in rows} == {version}
    templates = {("attribute_0", 0, 4), ("attribute_1", 0, 4), ("held_out_0", 0, 4)}  # the paraphrase no method trained on
    assert {(r["template"], r["seed"], r["samples"]) for r in rows} == templates
    runs = mlflow.search_runs(experiment_names=["distalign"])
    parent = runs[runs["tags.job"] == "compare"]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert (children["tags.kind"] == "estimate").sum() == 21 and (children["tags.kind"] == "train").sum() == 5
    trained = children[children["tags.kind"] == "train"]
    assert trained["metrics.perplexity_adapted"].notna().all() and trained["metrics.kl_from_base"].notna().all()
    dpo_params = mlflow.get_run(trained[trained["tags.method"] == "dpo"].iloc[0]["run_id"]).data.params
    assert dpo_params["init_adapter"].endswith("gender-us-real/ift/seed-0") and dpo_params["seed"] == "0"
    by_method = trained.set_index("tags.method")
    assert by_method["metrics.ift/sft_token_mean"].notna()["ift"]  # IFT fits the shares by the token mean
    assert by_method["metrics.sft/sft_example_mean"].notna()["hybrid"] and "metrics.ift/sft_example_mean" not in trained
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(parent.iloc[0]["run_id"], "results")}
    assert {"results/results.csv", "results/results.md", "results/heatmap_attribute.png"} <= artifacts

    again = run_compare(cfg)  # everything finished: nothing is trained or estimated again
    assert len(mlflow.search_runs(experiment_names=["distalign"])) == len(runs)
    assert [(r["method"], r["template"], r["seed"], r["mae"]) for r in again] == [
        (r["method"], r["template"], r["seed"], r["mae"]) for r in rows
    ]

    # Another machine (its own MLflow store and storage, no adapters) resumes from the committed report,
    # whose last training's cells (DPO's) had not finished: only they run, after the IFT adapter DPO starts from.
    # Its rows were computed by older code: they keep that version, DPO's new rows get this one.
    csv = report.with_suffix(".csv")
    lines = [line if ",dpo," in line else line.replace(f",{version}", ",0123456789ab") for line in csv.read_text().splitlines()]
    csv.write_text("\n".join(line for line in lines if ",dpo," not in line) + "\n")
    spent = yaml.safe_load(report.with_suffix(".resume.yaml").read_text())["compute_seconds"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}")
    monkeypatch.setenv("DISTALIGN_HOME", str(tmp_path / "elsewhere" / "home"))
    resumed = run_compare(cfg, report=report)
    assert [(r["method"], r["template"], r["mae"], r["unmatched_rate"]) for r in resumed] == [
        (r["method"], r["template"], r["mae"], r["unmatched_rate"]) for r in rows
    ]  # the same seed reproduced DPO's cells
    there = mlflow.search_runs(experiment_names=["distalign"])
    estimates = there[there["tags.kind"] == "estimate"]
    assert sorted(estimates[estimates["tags.imported"].isna()]["tags.method"]) == ["dpo"] * 3
    assert (estimates["tags.imported"] == str(csv)).sum() == 18 == (estimates["tags.code_version"] == "0123456789ab").sum()
    assert f"- code: cells computed by `0123456789ab` (18), `{version}` (3)" in report.read_text()
    assert sorted(there[there["tags.kind"] == "train"]["tags.method"]) == ["dpo", "ift"]
    assert there[there["tags.job"] == "compare"].iloc[0]["tags.imported_compute_seconds"] == str(spent) and spent > 0
    assert yaml.safe_load(report.with_suffix(".resume.yaml").read_text())["compute_seconds"] > spent  # and this machine's
    # The regenerated CSV: the same rows; readout MAE (a float of the retrained weights) to float noise.
    (tmp_path / "expected.csv").write_text("\n".join(lines) + "\n")
    got, want = read_csv(str(csv)), read_csv(str(tmp_path / "expected.csv"))
    assert [{k: v for k, v in r.items() if k not in METRIC_COLUMNS} for r in got] == [
        {k: v for k, v in r.items() if k not in METRIC_COLUMNS} for r in want
    ]
    np.testing.assert_allclose([[r[k] for k in METRIC_COLUMNS] for r in got], [[r[k] for k in METRIC_COLUMNS] for r in want], rtol=1e-6)


def test_a_report_of_another_comparison_is_not_resumed(tiny_model_path, mlflow_uri, tmp_path):
    cfg = CompareConfig(name="paper", datasets=["gender-us-real"], methods=["zero-shot"], finetune={"model": tiny_model_path})
    report = tmp_path / "results.md"
    write_record(report, cfg, {}, 60.0)
    row = _cell("zero-shot", 0, 0.3, dataset="gender-us-real", trained_on="gender-us-real")
    write_csv([row], report.with_suffix(".csv"))
    record = load_record(report, cfg, plan_cells(cfg, *validate_compare(cfg)))
    assert [(r["method"], r["seed"], r["mae"], r["trained_on"]) for r in record.rows] == [("zero-shot", 0, 0.3, "gender-us-real")]
    assert record.compute_seconds == 60.0
    with pytest.raises(DistalignError, match=r"results.resume.yaml records comparison 'paper' with other settings \(seeds\)"):
        run_compare(cfg.model_copy(update={"seeds": [5]}), report=report)
    write_csv([row | {"method": "ift"}], report.with_suffix(".csv"))  # not a method of this comparison
    with pytest.raises(DistalignError, match="the row of dataset gender-us-real, method ift, .* is not a cell of comparison 'paper'"):
        run_compare(cfg, report=report)
    assert mlflow.search_runs(experiment_names=["distalign"]).empty  # refused before any work


def test_report_says_how_far_the_run_got_and_what_tuning_chose():
    cfg = CompareConfig(
        datasets=["gender-uk-real", "gender-us-real"],
        methods=["zero-shot", "hybrid"],
        seeds=[0, 1],
        tune={"lr_per_method": {"hybrid": (1e-5, 1e-3), "dpo": (1e-6, 1e-3)}},  # dpo is not compared: not named
    )
    _, specs = validate_compare(cfg)
    rows = [_cell("zero-shot", 0, 0.3, template=t) for t in ("attribute_0", "attribute_1")]
    rows += [_cell("hybrid", s, m, template=t) for s, m in ((0, 0.1), (1, 0.14)) for t in ("attribute_0", "attribute_1")]
    rows += [_cell("hybrid", 0, 0.5, template="held_out_0")]  # not in the summary: the paper's two templates only
    rows += [
        _cell(m, s, v, dataset="d2", noise_p_value=0.0)
        for m, s, v in (("ift", 0, 0.05), ("ift", 1, 0.06), ("hybrid", 0, 0.2), ("hybrid", 1, 0.25))
    ]
    tuning = {"hybrid": {"values": {"lr": 0.0011, "beta": 0.21}, "best_val_mae": 0.05, "trials": 4, "dataset": "gender-uk-real"}}
    report = results_document(rows, ReportContext(cfg, specs, tuning, 30, 7200.0, 600.0, "2 CPUs"))
    assert "**partial: 11 of 30 cells finished**" in report
    story = _cell("zero-shot", 0, 0.27, task="story", template="pooled", judge_lexical_agreement=0.75, lexical_mae=0.2)
    with_story = results_document([*rows, story], ReportContext(cfg, specs, tuning, 30, 7200.0, 600.0, "2 CPUs"))
    judge_line = "- Story judge against the lexical classifier: 75.0% agreement; story MAE 0.270 by the judge, 0.200 by the lexical"
    assert judge_line in with_story
    assert "| d1 | story | one prompt | zero-shot: 0.270 (1) | — | — |" in with_story
    assert "| hybrid | lr 0.0011, beta 0.21 | 0.050 |" in report
    assert "lr in [0.0001, 0.005] (hybrid: [1e-05, 0.001]), beta in [0.05, 0.5]" in report
    early = results_document(
        [], ReportContext(cfg.model_copy(update={"methods": ["ift", "hybrid"]}), specs, tuning, 30, 0.0, 60.0, "2 CPUs")
    )
    assert "Not tuned yet: ift." in early and "**partial: 0 of 30 cells finished**" in early
    assert "| d1 | v1, v2 | 0.300 (1) | — | **0.120 ± 0.028 (2)** |" in report  # mean over templates per seed, then over seeds
    assert "| d1 | v1, v2 | 0.290 (1) | — | **0.110 ± 0.028 (2)** |" in report  # and the same of the bias-corrected MAE
    assert "| d2 | v1 | — | **0.055 ± 0.007 (2)** | 0.225 ± 0.035 (2) |" in report  # v1 alone so far: said so
    assert "  - gender-us-real: 28 prompts, 5 per batch; 24 SFT steps (steering methods), 36 steps" in report
    assert "- compute: 2.0 h of finished tuning" in report and "### d1" in report
    # the discussion is computed from the rows
    lowest = "- Hybrid has the lowest mean attribute MAE on 1 of 2 datasets with results (d1); every seed of it below every seed"
    assert lowest + " of the next method on 0 of them." in report  # d1's zero-shot has one seed
    assert "- d1: hybrid 0.120 ± 0.028 (2) against zero-shot 0.300 (1); one seed of zero-shot: no order is shown." in report
    # beside the paper: the same means as the summary (the held-out 0.5 is not among the paper's templates)
    assert "| d1 | attribute | v1, v2 | hybrid: 0.120 ± 0.028 (2) | 0.120 ± 0.028 (2) | — |" in report
    assert "- d2: ift 0.055 ± 0.007 (2) against hybrid 0.225 ± 0.035 (2); every seed of ift is below every seed of hybrid." in report
    assert "- By the bias-corrected MAE, hybrid is lowest on 1 of 2 datasets (d1)." in report
    overlap = [r | {"mae": 0.06} if (r["dataset"], r["method"], r["seed"]) == ("d2", "hybrid", 0) else r for r in rows]
    overlapping = results_document(overlap, ReportContext(cfg, specs, tuning, 30, 7200.0, 600.0, "2 CPUs"))
    assert "- d2: ift 0.055 ± 0.007 (2) against hybrid 0.155 ± 0.134 (2); their seeds overlap: no order is shown." in overlapping
    assert "- Within sampling noise (calibrated-sampler test, p ≥ 0.05): 7 of 11 cells (hybrid, zero-shot)." in report
    assert "- hybrid: held-out paraphrase MAE 0.500 against 0.155 on the trained templates." in report


def test_headline_means_count_a_seed_once_it_holds_the_paper_templates():
    """The summary, the paper comparison and the heatmap read one set of means: per seed over v1 and v2 (a
    seed with one of them is not yet a seed), per-template cells over pooled ones, cross-country by origin."""
    rows = [_cell("hybrid", s, m, template=t) for s, m in ((0, 0.1), (1, 0.14)) for t in ("attribute_0", "attribute_1")]
    rows += [_cell("hybrid", 2, 0.9), _cell("hybrid", 0, 0.9, template="pooled")]  # interrupted seed 2; a pooled cell
    rows += [_cell("ift", 0, 0.2, template=t) for t in ("attribute_0", "attribute_1")]
    rows += [_cell("hybrid", 0, 0.3, task="cross-country", template="attribute_1", dataset="us", trained_on="uk")]
    assert headline_maes(rows) == {"d1": {"hybrid": [0.1, 0.14], "ift": [0.2]}}
    assert headline_maes(rows, "cross-country") == {"uk>us": {"hybrid": [0.3]}}
    corrected = headline_maes(rows, metric="mae_debiased")  # the cells' bias-corrected MAE, the same way
    assert corrected["d1"]["hybrid"] == pytest.approx([0.09, 0.13]) and corrected["d1"]["ift"] == pytest.approx([0.19])
    assert headline_maes([_cell("ift", 0, 0.2, template="pooled")]) == {"d1": {"ift": [0.2]}}  # a pooled run
    assert headline_templates(rows) == {"d1": "v1, v2"}  # the pooled cell gives way to the per-template ones
    assert headline_templates([_cell("ift", 0, 0.2, template="pooled")]) == {"d1": "v1+v2 pooled"}
    assert headline_templates(rows, "cross-country") == {"uk>us": "v2"}
    assert "- d1: hybrid 0.120 ± 0.028 (2) against ift 0.200 (1); one seed of ift: no order is shown." in discussion_lines(rows)
    one_each = [r for r in rows if r["seed"] == 0 and r["template"] != "pooled" and r["task"] == "attribute"]
    assert "- d1: hybrid 0.100 (1) against ift 0.200 (1); one seed of each: no order is shown." in discussion_lines(one_each)
    assert summary_markdown([_cell("ift", 0, 0.2, template="held_out_0")]) == "No cell of the paper's attribute templates has finished yet."


@pytest.mark.slow
def test_every_trained_method_gets_the_same_tune_budget_first(ray_cluster, tiny_model_path, mlflow_uri, tmp_path):
    from distalign_ray import storage

    cfg = CompareConfig(
        name="tuned",
        datasets=["gender-us-real"],
        methods=["dpo"],  # and IFT, which DPO starts from
        finetune={"model": tiny_model_path, "num_workers": 1, "epochs": 1, "max_contexts": 2, "answers_per_context": 8},
        estimate={"samples_per_context": 4, "max_contexts": 2, "max_new_tokens": 3, "num_actors": 1},
        # A random tiny model answers with no class. DPO draws its lr from its own range.
        tune={"trials": 2, "scheduler": "fifo", "min_answer_mass": 0.0, "lr_per_method": {"dpo": (1e-6, 1e-5)}},
        per_template=False,
        capability=False,
        seeds=[0],
    )
    report = tmp_path / "results.md"
    run_compare(cfg, report=report)
    runs = mlflow.search_runs(experiment_names=["distalign"])
    parent = runs[runs["tags.job"] == "compare"].iloc[0]
    sweeps = runs[(runs["tags.mlflow.parentRunId"] == parent["run_id"]) & (runs["tags.job"] == "sweep")]
    assert sorted(sweeps["tags.method"]) == ["dpo", "ift"]
    drawn_from = {"ift": cfg.tune.lr, "dpo": (1e-6, 1e-5)}
    for _, sweep in sweeps.iterrows():
        trials = runs[runs["tags.mlflow.parentRunId"] == sweep["run_id"]]
        assert len(trials) == 2 and trials["metrics.val_mae"].notna().all()
        drawn = [float(lr) for lr in trials["params.lr"] if float(lr) != cfg.finetune.lr]  # the other runs the settings as given
        low, high = drawn_from[sweep["tags.method"]]
        assert len(drawn) == 1 and low <= drawn[0] <= high
    chosen = {
        m: yaml.safe_load(storage.read_text(storage.join(storage.storage_root(), "compare", "tuned", "tuned", f"{m}.yaml")))
        for m in ("ift", "dpo")
    }
    assert set(chosen["ift"]["values"]) == {"lr"} and set(chosen["dpo"]["values"]) == {"lr", "beta"}
    trained = runs[(runs["tags.kind"] == "train") & (runs["tags.mlflow.parentRunId"] == parent["run_id"])]
    for method in ("ift", "dpo"):
        params = mlflow.get_run(trained[trained["tags.method"] == method].iloc[0]["run_id"]).data.params
        for field, value in chosen[method]["values"].items():
            assert float(params[field]) == pytest.approx(value)
            assert float(parent[f"params.tuned.{method}.{field}"]) == pytest.approx(value)
    assert f"| dpo | lr {chosen['dpo']['values']['lr']:.3g}, beta {chosen['dpo']['values']['beta']:.3g} |" in report.read_text()
    assert (tmp_path / "results.csv").read_text().startswith("dataset,task,template,method,seed,samples,mae,")

    run_compare(cfg)  # tuned values, adapters and cells are reused: no new run
    assert len(mlflow.search_runs(experiment_names=["distalign"])) == len(runs)

    # The report's rerun command (a new name: nothing reused, trained again) reproduces the cell's numbers.
    command = next(line.strip() for line in report.read_text().splitlines() if line.strip().startswith("distalign compare"))
    again = _config_of_command(command)
    rerun = run_compare(again)
    original = [r for r in collect_results(parent["run_id"]) if r["method"] == again.methods[0]]
    assert [(r["method"], r["template"], r["seed"], r["mae"], r["unmatched_rate"]) for r in rerun if r["method"] == again.methods[0]] == [
        (r["method"], r["template"], r["seed"], r["mae"], r["unmatched_rate"]) for r in original
    ]
