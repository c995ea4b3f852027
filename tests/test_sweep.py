"""A real Ray Tune sweep over Ray Train trials on a tiny model: trials in MLflow, best config reusable."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.errors import DistalignError
from distalign_ray.training.loop import ANSWER_MASS
from distalign_ray.tuning.reports import EPOCHS_DONE
from distalign_ray.tuning.sweep import SweepConfig, final_choice, run_sweep


def test_a_trial_counts_by_its_last_epoch_only_if_it_trained_whole_and_still_answers(ray_cluster, tmp_path):
    """Training keeps the last epoch's adapter: a trial that peaked early, one stopped early, or one whose
    answers left the classes (val_mae renormalises over them) is not chosen."""
    from ray import tune

    def report_curve(config):  # defined here so that Ray ships it by value (the test module is not importable there)
        curve, mass = config["trial"]
        for epoch, val_mae in enumerate(curve, start=1):
            tune.report({"val_mae": val_mae, ANSWER_MASS: mass, EPOCHS_DONE: epoch})

    # best epoch not last; steady; stopped after one epoch; lowest at the end, answering with a class 20% of the time
    trials = [([0.10, 0.50, 0.40], 0.9), ([0.30, 0.25, 0.20], 0.9), ([0.05], 0.9), ([0.30, 0.20, 0.15], 0.2)]
    tuner = tune.Tuner(report_curve, param_space={"trial": tune.grid_search(trials)}, run_config=tune.RunConfig(storage_path=str(tmp_path)))
    results = tuner.fit()
    assert results.get_best_result("val_mae", "min", scope="all").config["trial"] == trials[2]
    assert results.get_best_result("val_mae", "min", scope="last").config["trial"] == trials[2]
    chosen = final_choice(results, epochs=3, min_answer_mass=0.5)
    assert chosen.config["trial"] == trials[1] and chosen.metrics["val_mae"] == 0.20
    assert final_choice(results, epochs=3, min_answer_mass=0.1).config["trial"] == trials[3]
    with pytest.raises(DistalignError, match=r"highest val_answer_mass 0.900 < min_answer_mass 0.95"):
        final_choice(results, epochs=3, min_answer_mass=0.95)


@pytest.mark.slow
def test_sweep_of_four_trials(ray_cluster, tiny_model_path, mlflow_uri, tmp_path):
    cfg = SweepConfig(
        name="tiny-sweep",
        num_samples=4,
        finetune=FinetuneConfig(model=tiny_model_path, num_workers=1, cpus_per_worker=0.5, epochs=2, sft_epochs=1, max_contexts=2),
        output=str(tmp_path / "best.yaml"),
        min_answer_mass=0.0,  # a random tiny model answers with no class
    )
    result = run_sweep(load_dataset("gender-us-real"), cfg)
    assert result["trials"] == 4
    runs = mlflow.search_runs(experiment_names=["distalign"])
    trials = runs[runs["tags.mlflow.parentRunId"] == result["parent_run_id"]]
    assert len(trials) == 4 and trials["metrics.val_mae"].notna().all()
    assert set(trials["status"]) <= {"FINISHED", "KILLED"}
    best = FinetuneConfig.model_validate(yaml.safe_load((tmp_path / "best.yaml").read_text())["finetune"])
    assert best.lr != cfg.finetune.lr and best.model == tiny_model_path
    # The chosen trial is the one whose last epoch (the adapter training keeps) scores best among those ASHA let finish.
    finished = trials[trials["status"] == "FINISHED"]
    assert result["best_val_mae"] == pytest.approx(finished["metrics.val_mae"].min())

    # Rerun inside another run (as compare's tuning runs it): the finished sweep is restored, not rerun.
    with mlflow.start_run():
        again = run_sweep(load_dataset("gender-us-real"), cfg, nested=True)
    assert again == result
    assert len(mlflow.search_runs(experiment_names=["distalign"], filter_string="tags.kind = 'trial'")) == 4
    assert trials["metrics.val_answer_mass"].between(0, 1).all()

    # Another min_answer_mass chooses again from the restored trials (no trial of the tiny model reaches 1).
    with pytest.raises(DistalignError, match="every trial's answers left the classes"):
        run_sweep(load_dataset("gender-us-real"), cfg.model_copy(update={"min_answer_mass": 1.0}))
    assert len(mlflow.search_runs(experiment_names=["distalign"], filter_string="tags.kind = 'trial'")) == 4
