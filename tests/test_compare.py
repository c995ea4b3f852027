"""The method registry, the results writer, and a resumable comparison of every method on a tiny model."""

from __future__ import annotations

import math

import mlflow
import pytest

from distalign_ray.compare import CompareConfig, results_markdown, run_compare, write_results
from distalign_ray.errors import DistalignError
from distalign_ray.methods import METHODS, get_methods


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
    return row | {"trained_on": "d1"} | metrics


def test_cells_per_template_seed_and_cross_country():
    from distalign_ray.compare import plan_cells, validate_compare

    cfg = CompareConfig(datasets=["gender-uk-real"], methods=["zero-shot", "hybrid"], seeds=[0, 1])
    methods, specs = validate_compare(cfg)
    cells = plan_cells(cfg, methods, specs)
    home = [c for c in cells if c.task == "attribute"]
    assert {(c.method.name, c.template, c.seed) for c in home} == {
        (m, t, s) for m in ("zero-shot", "hybrid") for t in ("attribute_0", "attribute_1", "held_out_0") for s in (0, 1)
    }
    abroad = [c for c in cells if c.task == "cross-country"]  # UK-trained adapters on the US v2 prompts, US targets
    assert [(c.key, c.run_name) for c in abroad] == [
        (
            f"gender-uk-real>gender-us-real|hybrid|cross-country|attribute_1|seed-{s}",
            f"hybrid:gender-uk-real>gender-us-real:cross-country:attribute_1:seed-{s}",
        )
        for s in (0, 1)
    ]
    assert len({c.key for c in cells}) == len(cells) == 14
    pooled = plan_cells(cfg.model_copy(update={"per_template": False, "cross_country": {}}), methods, specs)
    assert [c.template for c in pooled] == ["pooled"] * 4


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
        "| d1 | attribute | attribute_0 | hybrid | 0.100 ± 0.020 (3) | s0: 0.100 (0.080–0.120); s1: 0.120 (0.100–0.140); "
        "s2: 0.080 (0.060–0.100) | 2.0% | 0.0% | 0.050 (0.50) |  |" in markdown
    )
    assert "| d1 | attribute | attribute_0 | zero-shot | 0.310 ± 0.014 (2) |" in markdown
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,task,template,method,seed,samples,mae,mae_ci_low,mae_ci_high")
    assert len(csv_lines) == 6 and csv_lines[0].endswith(",trained_on")
    assert (tmp_path / "heatmap_attribute.png").stat().st_size > 1000
    assert results_markdown(rows).count("\n") == 3


@pytest.mark.slow
def test_every_method_trains_and_estimates_and_rerun_resumes(ray_cluster, tiny_model_path, mlflow_uri, tmp_path):
    cfg = CompareConfig(
        name="tiny",
        datasets=["gender-us-real"],
        finetune={"model": tiny_model_path, "num_workers": 0, "epochs": 1, "sft_epochs": 1, "max_contexts": 2, "answers_per_context": 8},
        estimate={"samples_per_context": 4, "max_contexts": 2, "max_new_tokens": 3, "num_actors": 1},
        capability=True,
        seeds=[0],
    )
    rows = run_compare(cfg)
    assert sorted(r["method"] for r in rows) == sorted(m for m in METHODS for _ in range(3))  # one row per template
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
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(parent.iloc[0]["run_id"], "results")}
    assert {"results/results.csv", "results/results.md", "results/heatmap_attribute.png"} <= artifacts

    again = run_compare(cfg)  # everything finished: nothing is trained or estimated again
    assert len(mlflow.search_runs(experiment_names=["distalign"])) == len(runs)
    assert [(r["method"], r["template"], r["seed"], r["mae"]) for r in again] == [
        (r["method"], r["template"], r["seed"], r["mae"]) for r in rows
    ]
