"""End to end on the real embedded model with the default training settings, on a spec the defaults
were never tuned on: issue 11's matrix cell commute-3 (3 classes, two-word answers "On foot" / "By
bus" / "By car", 6 towns with skewed targets). Before the SFT budget counted answer views it trained
18 SFT steps, and stage 2 unbound the ids ("00000" after every id): the binding check failed. The
other matrix cells run with `make test-matrix` (tests/test_unseen_specs.py)."""

from __future__ import annotations

import mlflow
import pytest
from unseen_specs import SHAPES, write_spec

from distalign_ray.config import EstimateConfig
from distalign_ray.quickstart import QuickstartConfig, run_quickstart

COMMUTE = next(shape for shape in SHAPES if shape.name == "commute-3")


@pytest.mark.slow
@pytest.mark.vllm
def test_quickstart_with_default_training_on_an_unseen_spec(ray_cluster, mlflow_uri, tmp_path):
    cfg = QuickstartConfig(
        spec=write_spec(COMMUTE, tmp_path),
        output=str(tmp_path / "adapter"),
        # Training: all defaults (the binding check fails the run when an id is not bound).
        estimate=EstimateConfig(samples_per_context=40, max_new_tokens=12),
    )
    summary = run_quickstart(cfg)
    before, after, binding = summary["before"], summary["after"], summary["binding"]
    print(f"binding {binding.accuracy} answer prob {binding.answer_probability}; readout MAE before {before.readout.mae:.3f} "
          f"after {after.readout.mae:.3f}; sampled MAE before {before.report.mae:.3f} after {after.report.mae:.3f}; "
          f"unmatched {before.report.unmatched_rate:.3f} -> {after.report.unmatched_rate:.3f}")  # fmt: skip
    assert binding.passed() and min(binding.accuracy) >= 0.95
    assert after.readout.mae < before.readout.mae
    assert after.report.mae < before.report.mae
    assert after.report.unmatched_rate <= 0.10
    assert after.cut_rate < before.cut_rate  # the adapter's answers end (EOS) within 12 tokens; zero-shot ones ramble
    runs = mlflow.search_runs(experiment_names=["distalign"])
    assert set(runs["tags.stage"].dropna()) == {"before", "after"}
    parent = runs[runs["run_id"] == summary["parent_run_id"]].iloc[0]
    assert parent["metrics.after_mae"] == pytest.approx(after.report.mae)
