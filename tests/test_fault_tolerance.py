"""Killing a Ray Train worker or a generation actor mid-run does not lose or duplicate work."""

from __future__ import annotations

import threading
import time

import mlflow
import psutil
import pytest

from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.data.specs import load_dataset


def _kill_once(marker: str, when, stop: threading.Event, killed: list, min_age: float = 0.0) -> None:
    """Kill -9 the first process whose command line contains `marker` and that has run for
    `min_age` seconds, once `when()` is true."""
    while not stop.is_set() and not killed:
        if when():
            for proc in psutil.process_iter(["cmdline", "create_time"]):
                if marker in " ".join(proc.info["cmdline"] or []) and time.time() - proc.info["create_time"] > min_age:
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


@pytest.mark.slow
def test_train_worker_killed_resumes_from_checkpoint(ray_cluster, tiny_model_path, tmp_path, mlflow_uri):
    from distalign_ray.tracking.mlflow_store import start_run
    from distalign_ray.training.finetune import run_finetune

    spec = load_dataset("gender-uk-even")  # 50 prompts: 25 steps per epoch at 2 prompts per batch
    cfg = FinetuneConfig(model=tiny_model_path, num_workers=2, epochs=4, sft_epochs=1, prompts_per_batch=2, max_failures=1)
    storage = tmp_path / "home" / "ray_results"
    stop, killed = threading.Event(), []
    first_checkpoint = lambda: any(p.is_dir() for p in storage.glob("finetune-*/checkpoint_*"))  # noqa: E731
    killer = threading.Thread(target=_kill_once, args=("RayTrainWorker", first_checkpoint, stop, killed), daemon=True)
    killer.start()
    with start_run("ft-kill", "fault-tolerance test run") as run:
        result = run_finetune(spec, cfg, tmp_path / "adapter", mlflow_run_id=run.info.run_id)
    stop.set()
    assert killed, "no worker was killed"
    # Every planned epoch finished (1 SFT + 4 aligned = plan indices 0..4), resuming after the kill.
    assert result["metrics"]["plan_index"] == 4 and result["metrics"]["global_step"] == 5 * 25
    epochs = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_mae")
    assert {m.step for m in epochs} == {25, 50, 75, 100, 125}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_generation_actor_killed_keeps_exact_counts(ray_cluster, tiny_model_path, mlflow_uri):
    import pyarrow.parquet as pq

    from distalign_ray.estimate import run_estimate

    cfg = EstimateConfig(model=tiny_model_path, samples_per_context=60, samples_per_request=2, max_contexts=3, max_new_tokens=64)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_once, args=("MapWorker(MapBatches(EngineActor))", lambda: True, stop, killed, 6.0), daemon=True)
    killer.start()
    result = run_estimate(load_dataset("gender-us-real"), cfg)
    stop.set()
    assert killed, "no generation actor was killed"
    table = pq.read_table(result.samples_path).to_pandas()
    assert table.groupby("context").size().tolist() == [60, 60, 60]
    assert table.groupby("request_id").size().eq(2).all()  # no request lost or duplicated
