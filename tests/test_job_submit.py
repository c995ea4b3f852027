"""`ray job submit` of the quickstart against a real local head (token authentication on)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from cluster_sim import free_ports

REPO = Path(__file__).resolve().parents[1]


def _stop_head(ray_tmpdir: str) -> None:
    """Stop only the processes of this head (never `ray stop`, which kills every Ray of the user)."""
    mine = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.info["environ"] or {}
        except (psutil.Error, TypeError):
            continue
        if ray_tmpdir in cmdline or environ.get("RAY_TMPDIR") == ray_tmpdir:
            mine.append(proc)
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        proc.kill()


@pytest.mark.slow
def test_quickstart_via_ray_job_submit(tiny_run_settings, tmp_path):
    bin_dir = Path(sys.executable).parent
    ray_tmpdir = f"/tmp/rj{secrets.token_hex(3)}"  # short: socket paths must stay under ~107 chars
    env = dict(
        os.environ,
        RAY_TMPDIR=ray_tmpdir,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    port, dashboard_port, *agent_ports = free_ports(7)
    address = f"http://127.0.0.1:{dashboard_port}"
    config = {"dataset": "gender-us-real", "output": str(tmp_path / "adapter"), **tiny_run_settings(num_workers=2)}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "DISTALIGN_HOME": str(tmp_path / "home")}}
    with open(tmp_path / "ray-start.log", "w") as log:  # a file, not a pipe: the head's daemons inherit it
        subprocess.run(
            [
                bin_dir / "ray",
                "start",
                "--head",
                "--num-cpus=2",
                f"--port={port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                "--include-dashboard=true",
                # Own agent ports: the suite's other local cluster already holds Ray's default ones.
                f"--dashboard-agent-listen-port={agent_ports[0]}",
                f"--dashboard-agent-grpc-port={agent_ports[1]}",
                f"--metrics-export-port={agent_ports[2]}",
                f"--runtime-env-agent-port={agent_ports[3]}",
                f"--ray-client-server-port={agent_ports[4]}",
            ],
            env=env,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    try:
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
            submitted = subprocess.run(
                [
                    bin_dir / "ray",
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--no-wait",
                    "--working-dir",
                    str(REPO),
                    "--runtime-env-json",
                    json.dumps(runtime_env),
                    "--",
                    "python",
                    "jobs/quickstart.py",
                    "--config",
                    str(tmp_path / "tiny.yaml"),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if "No available agent" not in submitted.stderr:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr).group(0)  # output has ANSI codes
        status = ""
        deadline = time.time() + 600
        while time.time() < deadline:
            reply = subprocess.run(
                [bin_dir / "ray", "job", "status", "--address", address, job_id],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            status = (reply.stdout + reply.stderr).lower()
            if any(f"job '{job_id.lower()}' {s}" in status for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(5)
        logs = subprocess.run(
            [bin_dir / "ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True, timeout=60
        ).stdout
        assert f"job '{job_id.lower()}' succeeded" in status, logs[-3000:]
    finally:
        _stop_head(ray_tmpdir)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["distalign"])
    parent = runs[runs["tags.job"] == "quickstart"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert set(runs["tags.stage"].dropna()) == {"before", "after"}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # The job's output is the quickstart's own lines; Ray's, Ray Data's and the workers' go to the log file.
    (tmp_path / "job.log").write_text(logs)
    (log,) = (tmp_path / "home" / "logs").glob("quickstart-*.log")
    lines = logs.strip().splitlines()
    assert len(lines) <= 60 and f"log: {log}" in logs and lines[-1].startswith("MLflow: "), logs
    # One progress display per stage: training (steps, loss, the readout's val_mae) and each estimate.
    assert re.search(r"hybrid on gender-us-real .* (\d+)/\1 steps align epoch 1/1  loss \d+\.\d{3}  val_mae \d\.\d{3}", logs), logs
    assert re.search(r"zero-shot on gender-us-real .* 8/8 samples", logs) and re.search(r"hybrid on gender-us-real .* 8/8 samples", logs), (
        logs
    )
    noise = log.read_text()
    ours = logs[logs.index("log: ") :]  # after the job header of `ray job logs`
    assert "TrainController" in noise and "TrainController" not in ours and "INFO" not in ours and "Warning" not in ours
    artifacts = mlflow.MlflowClient().list_artifacts(parent.iloc[0]["run_id"], "logs")
    assert [a.path for a in artifacts] == [f"logs/{log.name}"]
