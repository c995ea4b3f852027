"""End to end on the real embedded model (small settings): the hybrid fine-tune moves the steering-id
distribution toward the target, and the before/after runs land in MLflow."""

from __future__ import annotations

import mlflow
import pytest

from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.quickstart import QuickstartConfig, run_quickstart


@pytest.mark.slow
@pytest.mark.vllm
def test_quickstart_small_on_embedded_model(ray_cluster, mlflow_uri, tmp_path):
    cfg = QuickstartConfig(
        dataset="gender-us-real",  # 14 occupations from 96% male to 14% male
        output=str(tmp_path / "adapter"),
        finetune=FinetuneConfig(num_workers=2, epochs=6, sft_epochs=1, prompts_per_batch=4),
        estimate=EstimateConfig(samples_per_context=10, max_new_tokens=8),
    )
    summary = run_quickstart(cfg)
    before, after = summary["before"], summary["after"]
    # Steering-id readout of the fine-tuned model vs the base model's forced choice.
    print(f"readout MAE before {before.readout.mae:.3f} after {after.readout.mae:.3f}")
    assert after.readout.mae < 0.5 * before.readout.mae
    assert after.readout.mae < 0.15
    assert after.report.unmatched_rate < before.report.unmatched_rate
    assert after.cut_rate < before.cut_rate  # the adapter's answers end (EOS) within 8 tokens; zero-shot ones ramble
    runs = mlflow.search_runs(experiment_names=["distalign"])
    stages = set(runs["tags.stage"].dropna())
    assert stages == {"before", "after"}
    parent = runs[runs["run_id"] == summary["parent_run_id"]].iloc[0]
    assert parent["metrics.after_mae"] == pytest.approx(after.report.mae)
