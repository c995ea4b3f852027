"""Ray Data estimation on a tiny model: exact sample counts, the parquet table, MLflow runs read back."""

from __future__ import annotations

import mlflow
import pyarrow.parquet as pq
import pytest

from distalign_ray.config import EstimateConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.estimate import plan_estimate, run_estimate
from distalign_ray.tracking.mlflow_store import ESTIMATION_METRICS, ESTIMATION_TAGS


def test_plan_splits_samples_exactly(tiny_model_path):
    spec = load_dataset("sentiment-us-even")
    plan = plan_estimate(spec, EstimateConfig(model=tiny_model_path, samples_per_request=20, max_contexts=3))
    per_context = {}
    for request in plan.requests:
        per_context[request["context_index"]] = per_context.get(request["context_index"], 0) + request["n"]
    assert per_context == {0: 90, 1: 90, 2: 90}  # the spec's 90, split over 2 templates x 3 chunks
    assert len({r["seed"] for r in plan.requests}) == len(plan.requests)
    assert [r["with_readout"] for r in plan.requests] == [r["chunk"] == 0 for r in plan.requests]  # one per (context, template)


@pytest.mark.parametrize("template", ["attribute_1", "held_out_0"])
def test_one_template_gets_all_samples(tiny_model_path, tokenizer, template):
    """The paper's per-template protocol: with one template every context's samples come from it; the
    held-out paraphrase (never trained on) is estimated only when asked for."""
    from distalign_ray.data.prompts import build_prompts, chat_prompt_ids

    spec = load_dataset("gender-us-real")
    plan = plan_estimate(spec, EstimateConfig(model=tiny_model_path, samples_per_context=100, max_contexts=2, templates=[template]))
    assert {r["template"] for r in plan.requests} == {template}
    assert [sum(r["n"] for r in plan.requests if r["context_index"] == o) for o in (0, 1)] == [100, 100]
    prompt = chat_prompt_ids(tokenizer, build_prompts(spec, "attribute", [template])[0])
    assert plan.requests[0]["prompt_ids"] == prompt
    default = plan_estimate(spec, EstimateConfig(model=tiny_model_path, max_contexts=2))
    assert {r["template"] for r in default.requests} == {"attribute_0", "attribute_1"}


def test_a_templates_seeds_do_not_depend_on_the_templates_beside_it(tiny_model_path):
    """The comparison estimates each template in its own run: v1, v2 and the held-out paraphrase must
    still draw independent samples (one shared seed made their steering ids identical), and a template
    estimated alone draws what it draws in the pooled run."""
    spec = load_dataset("gender-us-real")

    def seeds(templates):
        plan = plan_estimate(spec, EstimateConfig(model=tiny_model_path, max_contexts=3, samples_per_request=30, templates=templates))
        return {(r["context_index"], r["template"], r["chunk"]): r["seed"] for r in plan.requests}

    alone = {t: seeds([t]) for t in ("attribute_0", "attribute_1", "held_out_0")}
    pooled = seeds(None)  # 50 samples per template: its first two chunks
    assert len(pooled) == 3 * 2 * 2 and pooled.items() <= (alone["attribute_0"] | alone["attribute_1"]).items()
    drawn = [set(s.values()) for s in alone.values()]
    assert all(len(s) == 3 * 4 for s in drawn)  # 3 contexts x 4 chunks of the spec's 100 samples
    assert not (drawn[0] & drawn[1]) and not (drawn[0] & drawn[2]) and not (drawn[1] & drawn[2])


def test_transformers_engine_skips_the_readout_but_not_the_steering(tiny_model_path, tokenizer):
    from distalign_ray.generation.base import Request, SamplingSettings, SteeringSetup
    from distalign_ray.generation.hf_engine import HFEngine
    from distalign_ray.models import ModelRef, load_model

    engine = HFEngine(
        load_model(ModelRef("tiny", tiny_model_path, True)),
        tokenizer,
        SteeringSetup(token_ids=[32, 33], answer_ids=[[31609], [32032]]),
        SamplingSettings(max_new_tokens=2),
    )
    full, skipped = engine.generate(Request([1, 2, 3], 6, 9)), engine.generate(Request([1, 2, 3], 6, 9, with_readout=False))
    assert len(full.readout) == 2 and skipped.readout == []
    assert skipped.steering_indices == full.steering_indices and skipped.texts == full.texts  # same draws without it


@pytest.mark.slow
def test_ray_data_estimate_counts_table_and_mlflow(ray_cluster, tiny_model_path, mlflow_uri):
    spec = load_dataset("gender-us-real")
    cfg = EstimateConfig(model=tiny_model_path, samples_per_context=7, samples_per_request=3, max_contexts=3, max_new_tokens=4, seed=5)
    result = run_estimate(spec, cfg, tags={"stage": "before"})
    table = pq.read_table(result.samples_path)
    assert set(table.column_names) >= {"context", "template", "seed", "steering_id", "text", "label"}
    counts = table.group_by("context").aggregate([("text", "count")]).to_pydict()
    assert sorted(counts["text_count"]) == [7, 7, 7]
    assert result.report.samples_per_context.tolist() == [7, 7, 7]
    # A random tiny model answers no category: counted and reported, not dropped.
    unmatched = sum(1 for label in table.column("label").to_pylist() if label is None)
    assert result.report.unmatched_rate == pytest.approx(unmatched / 21)
    # Answers stopped by max_new_tokens are flagged and counted: a random model rarely says EOS within 4 tokens.
    cut = table.column("cut").to_pylist()
    assert result.cut_rate == pytest.approx(sum(cut) / 21) and result.cut_rate > 0.5

    runs = mlflow.search_runs(experiment_names=["distalign"], filter_string="tags.stage = 'before'")
    assert len(runs) == 1
    row = runs.iloc[0]
    for metric in ESTIMATION_METRICS:
        assert f"metrics.{metric}" in runs.columns and row[f"metrics.{metric}"] == pytest.approx(result.report.metrics()[metric])
    for tag in ESTIMATION_TAGS:
        assert row[f"tags.{tag}"]
    assert row["tags.method"] == "zero-shot" and row["tags.estimator"] == "sample"
    assert row["metrics.cut_rate"] == pytest.approx(result.cut_rate)
    # Both templates pooled in `mae`, and scored alone (the paper's protocol) under their names
    assert {f"metrics.attribute_{t}/{m}" for t in (0, 1) for m in ("mae", "mae_ci_low", "mae_ci_high", "unmatched_rate")} <= set(
        runs.columns
    )
    per_template = [row[f"metrics.attribute_{t}/unmatched_rate"] for t in (0, 1)]
    assert sum(per_template) / 2 == pytest.approx(result.report.unmatched_rate, abs=0.1)
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(row["run_id"])}
    assert {"samples.parquet", "per_context.csv", "per_context.json", "distribution.png"} <= artifacts

    # Same seed, same samples: reproducible whichever actor served which request.
    again = run_estimate(spec, cfg)
    assert pq.read_table(again.samples_path).column("text").to_pylist() == table.column("text").to_pylist()
