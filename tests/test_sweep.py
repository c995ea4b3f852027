"""A real Ray Tune sweep over Ray Train trials on a tiny model: trials in MLflow, best config reusable."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.tuning.sweep import SweepConfig, run_sweep


@pytest.mark.slow
def test_sweep_of_four_trials(ray_cluster, tiny_model_path, mlflow_uri, tmp_path):
    cfg = SweepConfig(
        name="tiny-sweep",
        num_samples=4,
        finetune=FinetuneConfig(model=tiny_model_path, num_workers=1, cpus_per_worker=0.5, epochs=2, sft_epochs=1, max_contexts=2),
        output=str(tmp_path / "best.yaml"),
    )
    result = run_sweep(load_dataset("gender-us-real"), cfg)
    assert result["trials"] == 4
    runs = mlflow.search_runs(experiment_names=["distalign"])
    trials = runs[runs["tags.mlflow.parentRunId"] == result["parent_run_id"]]
    assert len(trials) == 4 and trials["metrics.val_mae"].notna().all()
    assert set(trials["status"]) <= {"FINISHED", "KILLED"}
    best = FinetuneConfig.model_validate(yaml.safe_load((tmp_path / "best.yaml").read_text())["finetune"])
    assert best.lr != cfg.finetune.lr and best.model == tiny_model_path
    # The best over every epoch of every trial is no worse than any trial's last epoch.
    assert result["best_val_mae"] <= trials["metrics.val_mae"].min() + 1e-9

    # Rerun inside another run (as compare's tuning runs it): the finished sweep is restored, not rerun.
    with mlflow.start_run():
        again = run_sweep(load_dataset("gender-us-real"), cfg, nested=True)
    assert again == result
    assert len(mlflow.search_runs(experiment_names=["distalign"], filter_string="tags.kind = 'trial'")) == 4
