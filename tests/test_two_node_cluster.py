"""Every job on a multi-node cluster whose head does no work, through `ray job submit` with a token:
a simulated two-node cluster whose worker node cannot see the head's files (tests/cluster_sim.py).

What a worker node may read is only the shared folder (storage); the embedded model is converted on
the worker node itself, adapters and checkpoints travel through storage, every run lands in the
head's MLflow server, and a fine-tune survives the loss of its worker node.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from cluster_sim import SimulatedCluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    sim = SimulatedCluster(Path(f"/tmp/dn{secrets.token_hex(3)}"))  # short: socket paths stay < 107 chars
    try:
        sim.start()
        sim.add_worker("w1")
        # A model folder of the user's: on shared storage, as a multi-node cluster requires.
        shutil.copytree(tiny_model_path, sim.shared / "models" / "tiny")
        yield sim
    finally:
        sim.shutdown()


def _config(sim: SimulatedCluster, name: str, document: dict) -> str:
    path = sim.shared / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return str(path)


def _runs(sim: SimulatedCluster):
    mlflow.set_tracking_uri(sim.mlflow_uri)
    return mlflow.search_runs(experiment_names=["distalign"])


def _succeeded(status: str, logs: str, sim: SimulatedCluster) -> None:
    assert status == "SUCCEEDED", logs[-4000:] + "\n" + sim.diagnostics()


@pytest.mark.slow
def test_a_cluster_without_shared_storage_is_one_clear_error(cluster):
    status, logs = cluster.run_job(
        [
            "jobs/estimate.py",
            "--dataset",
            "gender-us-real",
            "--model",
            str(cluster.shared / "models" / "tiny"),
            "--samples",
            "2",
            "--max-contexts",
            "1",
        ],
        env_vars={"DISTALIGN_STORAGE": ""},
    )
    assert status == "FAILED"
    assert "distalign: error: this Ray cluster runs work on other nodes: set DISTALIGN_STORAGE" in logs


@pytest.mark.slow
def test_sweep_of_two_trials(cluster):
    config = _config(
        cluster,
        "sweep",
        {
            "name": "two-node-sweep",
            "num_samples": 2,
            "min_answer_mass": 0.0,  # a random tiny model answers with no class
            "finetune": {
                "model": str(cluster.shared / "models" / "tiny"),
                "num_workers": 1,
                "cpus_per_worker": 1,
                "epochs": 1,
                "sft_epochs": 1,
                "max_contexts": 2,
                "binding_check": "report",
            },
        },
    )
    status, logs = cluster.run_job(["jobs/sweep.py", "--dataset", "gender-us-real", "--config", config], timeout=600)
    _succeeded(status, logs, cluster)
    runs = _runs(cluster)
    parent = runs[runs["tags.sweep"] == "two-node-sweep"]
    trials = runs[runs["tags.mlflow.parentRunId"].isin(parent["run_id"])]
    assert len(trials) == 2 and trials["metrics.val_mae"].notna().all()
    assert list((cluster.storage / "sweeps" / "two-node-sweep" / "tune").iterdir())


@pytest.mark.slow
def test_quickstart_on_the_embedded_model(cluster):
    """The worker node converts the embedded model in its own cache; the adapter lands in storage and
    the after-estimate's engine (vLLM, merged on the worker node) reads it from there."""
    config = _config(
        cluster,
        "quickstart",
        {
            "dataset": "gender-us-real",
            "finetune": {"num_workers": 2, "epochs": 1, "sft_epochs": 1, "max_contexts": 2, "binding_check": "report"},
            "estimate": {"samples_per_context": 8, "max_contexts": 2, "max_new_tokens": 6},
        },
    )
    status, logs = cluster.run_job(["jobs/quickstart.py", "--config", config])
    _succeeded(status, logs, cluster)
    runs = _runs(cluster)
    parent = runs[runs["tags.job"] == "quickstart"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert set(runs["tags.stage"].dropna()) == {"before", "after"}
    assert set(runs.loc[runs["tags.stage"].notna(), "tags.engine"]) == {"vllm"}
    adapters = list((cluster.storage / "adapters").glob("quickstart-*"))
    assert len(adapters) == 1 and (adapters[0] / "adapter_model.safetensors").is_file()
    # Sample tables are kept in storage beside the adapters.
    after = runs[runs["tags.stage"] == "after"].iloc[0]
    assert (cluster.storage / "runs" / after["run_id"] / "samples.parquet").is_file()
    # The worker node converted the embedded model into its own cache (its view of the head's folder,
    # read through /proc/PID/root of one of its processes), and built the merged copy there.
    worker_view = cluster.node_view("w1") / str(cluster.head / "cache").lstrip("/")
    assert (worker_view / "models" / "smollm2-135m" / "config.json").is_file()
    assert any((worker_view / "merged").glob("smollm2-135m-*/config.json"))


@pytest.mark.slow
def test_finetune_then_estimate_a_head_local_adapter(cluster):
    """`finetune --output` a folder only the head has; `estimate --adapter` that folder: the estimate
    publishes it to storage, and the worker's engine reads it back from there."""
    tiny = str(cluster.shared / "models" / "tiny")
    output = cluster.head / "home" / "adapters" / "steered"
    # A random tiny model binds nothing; one SFT epoch keeps this plumbing test short.
    config = _config(cluster, "plumbing", {"finetune": {"binding_check": "report", "sft_epochs": 1}})
    status, logs = cluster.run_job(
        [
            "jobs/finetune.py",
            "--dataset",
            "gender-us-real",
            "--model",
            tiny,
            "--output",
            str(output),
            "--num-workers",
            "2",
            "--epochs",
            "2",
            "--max-contexts",
            "3",
            "--config",
            config,
        ]
    )
    _succeeded(status, logs, cluster)
    assert (output / "adapter_model.safetensors").is_file()
    status, logs = cluster.run_job(
        [
            "jobs/estimate.py",
            "--dataset",
            "gender-us-real",
            "--model",
            tiny,
            "--adapter",
            str(output),
            "--samples",
            "6",
            "--max-contexts",
            "3",
        ]
    )
    _succeeded(status, logs, cluster)
    published = list((cluster.storage / "adapters").glob("steered-*"))
    assert len(published) == 1
    assert (published[0] / "adapter_model.safetensors").read_bytes() == (output / "adapter_model.safetensors").read_bytes()
    runs = _runs(cluster)
    estimate = runs[runs["tags.mlflow.runName"] == "estimate-gender-us-real-hybrid-attribute-sample"]
    assert len(estimate) == 1 and estimate.iloc[0]["status"] == "FINISHED"
    finetune = runs[runs["tags.mlflow.runName"] == "finetune-gender-us-real-hybrid"].iloc[0]
    steps = mlflow.tracking.MlflowClient().get_metric_history(finetune["run_id"], "align/loss")
    assert len(steps) > 0  # logged by the Train worker on the worker node to the head's server


@pytest.mark.slow
def test_finetune_survives_losing_its_worker_node(cluster):
    """The worker node is killed after the first checkpoint; a fresh node (its own empty cache) joins
    and the fine-tune resumes from the checkpoint in shared storage, every epoch done once."""
    config = _config(
        cluster,
        "node-loss",
        {
            "finetune": {
                "model": str(cluster.shared / "models" / "tiny"),
                "num_workers": 2,
                "epochs": 3,
                "sft_epochs": 1,
                "prompts_per_batch": 2,
                "max_failures": 2,
                "binding_check": "report",
            },
        },
    )
    output = cluster.storage / "adapters" / "survivor"
    job = cluster.submit(["jobs/finetune.py", "--dataset", "gender-uk-even", "--config", config, "--output", str(output)])
    checkpoints = cluster.storage / "ray_results"
    deadline = time.time() + 600
    while not list(checkpoints.glob("finetune-gender-uk-even-*/checkpoint_*/training_state.pt")):
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(1)
    time.sleep(4)  # the report commits the checkpoint (the controller polls every 2 s); epoch 2 runs
    assert cluster.kill_node("w1") > 0
    replacement = threading.Thread(target=cluster.add_worker, args=("w2",))
    replacement.start()
    status, logs = cluster.wait(job)
    replacement.join()
    _succeeded(status, logs, cluster)
    assert (output / "adapter_model.safetensors").is_file()
    runs = _runs(cluster)
    run = runs[runs["tags.mlflow.runName"] == "finetune-gender-uk-even-hybrid"].iloc[0]
    history = mlflow.tracking.MlflowClient().get_metric_history(run["run_id"], "val_mae")
    # 50 prompts / 2 per batch = 25 steps per epoch; 1 SFT + 3 aligned epochs, each reported by a
    # worker (the driver logs the final value at step 0). The SFT epoch, checkpointed before the
    # node died, is not done again: the run resumed from its checkpoint, not from scratch.
    assert {m.step for m in history} - {0} == {25, 50, 75, 100}
    assert [m.step for m in history].count(25) == 1
    resumed = mlflow.tracking.MlflowClient().get_metric_history(run["run_id"], "resumed_at_step")
    assert len(resumed) == 1 and resumed[0].value in (25, 50, 75)  # from a checkpoint, not from scratch
