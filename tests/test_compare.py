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


def test_results_writer(tmp_path):
    rows = [
        {
            "dataset": "d1",
            "task": "attribute",
            "method": "zero-shot",
            "mae": 0.3,
            "mae_ci_low": 0.25,
            "mae_ci_high": 0.35,
            "kl": 0.4,
            "js": 0.1,
            "unmatched_rate": 0.5,
            "noise_floor_mae": 0.05,
            "noise_p_value": 0.0,
            "readout_mae": 0.2,
        },
        {
            "dataset": "d1",
            "task": "attribute",
            "method": "hybrid",
            "mae": 0.1,
            "mae_ci_low": 0.08,
            "mae_ci_high": 0.12,
            "kl": 0.05,
            "js": 0.01,
            "unmatched_rate": 0.02,
            "noise_floor_mae": 0.05,
            "noise_p_value": 0.31,
            "readout_mae": math.nan,
        },
    ]
    write_results(rows, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert "| d1 | attribute | hybrid | 0.100 (0.080–0.120) | 0.050 | 0.010 | 2.0% | 0.050 (0.31) |  |" in markdown
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("dataset,task,method,mae")
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
    )
    rows = run_compare(cfg)
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    runs = mlflow.search_runs(experiment_names=["distalign"])
    parent = runs[runs["tags.job"] == "compare"]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert (children["tags.kind"] == "estimate").sum() == 7 and (children["tags.kind"] == "train").sum() == 5
    trained = children[children["tags.kind"] == "train"]
    assert trained["metrics.perplexity_adapted"].notna().all() and trained["metrics.kl_from_base"].notna().all()
    dpo_params = mlflow.get_run(trained[trained["tags.method"] == "dpo"].iloc[0]["run_id"]).data.params
    assert dpo_params["init_adapter"].endswith("gender-us-real/ift")
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(parent.iloc[0]["run_id"], "results")}
    assert {"results/results.csv", "results/results.md", "results/heatmap_attribute.png"} <= artifacts

    again = run_compare(cfg)  # everything finished: nothing is trained or estimated again
    assert len(mlflow.search_runs(experiment_names=["distalign"])) == len(runs)
    assert sorted(r["method"] for r in again) == sorted(METHODS)
