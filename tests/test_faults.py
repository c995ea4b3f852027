"""Faults a user meets (issue 12): Ctrl-C in every stage of a quickstart and of a compare cell, and an
MLflow server that goes away mid-run. Real signals to the command's whole process group (what a
terminal's Ctrl-C does, Ray's own daemons included), a real MLflow server, real reruns."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

BIN = Path(sys.executable).parent
EXIT_WITHIN_S = 30  # from the signal to the command's exit, Ray shut down and the log file moved


def _env(tmp_path: Path, ray_tmpdir: str, uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DISTALIGN_", "MLFLOW_"))}
    return env | {
        "RAY_TMPDIR": ray_tmpdir,
        "MLFLOW_TRACKING_URI": uri,
        "DISTALIGN_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }


def _processes_of(ray_tmpdir: str) -> list[psutil.Process]:
    mine = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            if ray_tmpdir in " ".join(proc.info["cmdline"] or []) or (proc.info["environ"] or {}).get("RAY_TMPDIR") == ray_tmpdir:
                mine.append(proc)
        except (psutil.Error, TypeError):
            continue
    return mine


def _kill_all(ray_tmpdir: str) -> None:
    for proc in _processes_of(ray_tmpdir):
        proc.kill()


class Command:
    """A `distalign` command in its own session, as started from a terminal."""

    def __init__(self, argv: list[str], env: dict):
        # A terminal starts its foreground command with SIGINT at its default; a process that inherits
        # it ignored (as pytest's children may, after Ray or vLLM ran in the test process) keeps it
        # ignored, and Python then never raises KeyboardInterrupt. Reset it, then exec the command.
        launch = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launch, str(BIN / "distalign"), *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def log_text(self) -> str:
        """The run's log file while the command runs (its stderr points at it)."""
        try:
            return Path(os.readlink(f"/proc/{self.proc.pid}/fd/2")).read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, marker: str, count: int = 1, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while self.log_text().count(marker) < count:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"ended before {marker!r} x{count}: rc {self.proc.returncode}\n{out[-3000:]}\n{err[-3000:]}")
            assert time.time() < deadline, f"no {marker!r} x{count} within {timeout} s:\n{self.log_text()[-3000:]}"
            time.sleep(0.5)

    def interrupt(self, how: str = "ctrl-c") -> tuple[int, str, str, float]:
        """Ctrl-C: SIGINT to the whole process group; or "sigterm" to the command alone (`ray job stop`,
        `kill`). (rc, stdout, stderr, seconds to exit)."""
        sent = time.time()
        if how == "ctrl-c":
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=180)
        return self.proc.returncode, out, err, time.time() - sent

    def finish(self, timeout: float = 900) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def _runs(uri: str) -> dict[str, str]:
    """run name -> status (the latest run of each name)."""
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["distalign"], order_by=["attributes.start_time ASC"], output_format="list")
    return {run.info.run_name: run.info.status for run in runs}


def _assert_interrupted(rc: int, err: str, seconds: float, ray_tmpdir: str) -> None:
    assert rc == 130 and err.strip() == "distalign: interrupted", (rc, err[-3000:])
    assert seconds < EXIT_WITHIN_S, f"exited {seconds:.0f} s after Ctrl-C"
    deadline = time.time() + 10
    while _processes_of(ray_tmpdir) and time.time() < deadline:
        time.sleep(0.5)
    assert not _processes_of(ray_tmpdir), "Ray processes outlived the command"


def _no_partial_files(home: Path, *folders: Path) -> None:
    leftovers = [p for root in (home, *folders) if root.exists() for p in root.rglob("*") if ".partial" in p.name]
    assert not leftovers, leftovers


def _tiny_quickstart(tmp_path: Path, settings: dict, output: Path) -> Path:
    config = {"dataset": "gender-us-real", "output": str(output), **settings}
    path = tmp_path / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_ctrl_c_in_each_quickstart_stage_then_a_rerun(tiny_run_settings, tmp_path):
    ray_tmpdir = f"/tmp/rf{secrets.token_hex(3)}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env, home = _env(tmp_path, ray_tmpdir, uri), tmp_path / "home"
    stages = [  # (where to interrupt: a log line and how many times it has appeared, the stage's run)
        ("Starting execution of Dataset", 1, "before"),
        ("Started training worker group", 1, "finetune"),
        ("Starting execution of Dataset", 2, "after"),
    ]
    try:
        for number, (marker, count, stage_run) in enumerate(stages, start=1):
            output = tmp_path / f"adapter-{number}"
            command = Command(["quickstart", "--config", str(_tiny_quickstart(tmp_path, tiny_run_settings(), output))], env)
            command.wait_for(marker, count)
            time.sleep(2)  # in the middle of it
            rc, out, err, seconds = command.interrupt()
            _assert_interrupted(rc, err, seconds, ray_tmpdir)
            statuses = _runs(uri)
            assert statuses["quickstart-gender-us-real"] == "KILLED" and statuses[stage_run] == "KILLED", statuses
            assert "RUNNING" not in statuses.values() and "FAILED" not in statuses.values(), statuses
            # No partial adapter: absent before training ends, whole after.
            assert not output.exists() if stage_run != "after" else (output / "adapter_model.safetensors").is_file()
            _no_partial_files(home)
            killed = mlflow.search_runs(
                experiment_names=["distalign"], filter_string=f"attributes.run_name = '{stage_run}'", output_format="list"
            )
            if stage_run != "finetune":  # the interrupted estimate wrote no sample table
                assert not (home / "runs" / killed[-1].info.run_id / "samples.parquet").exists()
            mlflow.search_runs(experiment_names=["distalign"])  # the store is readable (nothing locked)
        # The rerun (same config, a fresh output) goes through.
        command = Command(["quickstart", "--config", str(_tiny_quickstart(tmp_path, tiny_run_settings(), tmp_path / "adapter-rerun"))], env)
        rc, out, err = command.finish()
        assert rc == 0, (out[-3000:], err[-3000:])
        runs = mlflow.search_runs(experiment_names=["distalign"], filter_string="tags.job = 'quickstart'", output_format="list")
        assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED", "KILLED", "KILLED"]
    finally:
        _kill_all(ray_tmpdir)


@pytest.mark.slow
def test_ctrl_c_in_a_compare_cell_then_resume(tiny_run_settings, tmp_path):
    ray_tmpdir = f"/tmp/rf{secrets.token_hex(3)}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(tmp_path, ray_tmpdir, uri)
    config = {
        "name": "faults",
        "datasets": ["gender-us-real"],
        "methods": ["hybrid"],
        "seeds": [0],
        "tune": {"trials": 2, "min_answer_mass": 0.0},
    }
    config |= tiny_run_settings()
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(config))
    argv = ["compare", "--config", str(tmp_path / "compare.yaml")]
    adapters = tmp_path / "home" / "compare" / "faults"
    try:
        # Ctrl-C in the tuning sweep's first trial; Ctrl-C while the cell trains (after the resumed sweep's
        # two trials); then SIGTERM (`ray job stop`, kill) while it estimates.
        outputs = []
        for marker, count, stage_run, how in (
            ("Started training worker group", 1, "sweep-faults-hybrid", "ctrl-c"),
            ("Started training worker group", 3, "train:hybrid:gender-us-real:seed-0", "ctrl-c"),
            ("Starting execution of Dataset", 1, "hybrid:gender-us-real:attribute:attribute_0:seed-0", "sigterm"),
        ):
            command = Command(argv, env)
            command.wait_for(marker, count)
            time.sleep(2)
            rc, out, err, seconds = command.interrupt(how)
            _assert_interrupted(rc, err, seconds, ray_tmpdir)
            outputs.append(out)
            statuses = _runs(uri)
            assert statuses["compare-faults"] == "KILLED" and statuses[stage_run] == "KILLED", statuses
            assert "RUNNING" not in statuses.values(), statuses
            _no_partial_files(tmp_path / "home")
        assert "resuming sweep 'faults-hybrid'" in outputs[1], outputs[1]
        sweeps = mlflow.search_runs(experiment_names=["distalign"], filter_string="tags.job = 'sweep'", output_format="list")
        assert [s.info.status for s in sweeps] == ["FINISHED"]  # resumed: one sweep run, reopened
        # The adapter trained before the second interrupt is whole and reused; the rerun resumes and finishes.
        assert (adapters / "gender-us-real" / "hybrid" / "seed-0" / "adapter_model.safetensors").is_file()
        rc, out, err = Command(argv, env).finish()
        assert rc == 0, (out[-3000:], err[-3000:])
        assert "resuming comparison 'faults'" in out
        runs = mlflow.search_runs(experiment_names=["distalign"], output_format="list")
        trains = [r.info.status for r in runs if r.info.run_name == "train:hybrid:gender-us-real:seed-0"]
        assert sorted(trains) == ["FINISHED", "KILLED"]  # not retrained after the estimate's interrupt
        assert {r.info.status for r in runs if r.info.run_name == "compare-faults"} == {"FINISHED"}
    finally:
        _kill_all(ray_tmpdir)


def _mlflow_server(store: Path, port: int, env: dict) -> subprocess.Popen:
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
        env=env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            assert server.poll() is None and time.time() < deadline, "MLflow server did not come up"
            time.sleep(1)


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_server_gone_mid_estimate(tiny_model_path, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_tmpdir = f"/tmp/rf{secrets.token_hex(3)}"
    uri = f"http://127.0.0.1:{port}"
    env, home, store = _env(tmp_path, ray_tmpdir, uri), tmp_path / "home", tmp_path / "server"
    server = _mlflow_server(store, port, env)
    try:
        argv = ["estimate", "--dataset", "gender-us-real", "--model", tiny_model_path, "--max-contexts", "2", "--samples", "4"]
        command = Command([*argv, "--set", "estimate.max_new_tokens=3"], env)
        command.wait_for("Starting execution of Dataset")
        _stop(server)  # the server goes away while samples are drawn
        rc, out, err = command.finish(timeout=300)
        errors = err.strip().splitlines()
        assert rc == 1 and len(errors) == 1, (rc, err[-3000:])
        assert errors[0].startswith(f"distalign: error: MLflow tracking server {uri} stopped answering") and str(home / "runs") in errors[0]
        (samples,) = (home / "runs").glob("*/samples.parquet")  # the samples drawn are kept
        assert samples.stat().st_size > 0
        # Nothing was reported as finished: the server (back up) still has the run as RUNNING.
        server = _mlflow_server(store, port, env)
        mlflow.set_tracking_uri(uri)
        (run,) = mlflow.search_runs(experiment_names=["distalign"], output_format="list")
        assert run.info.run_id == samples.parent.name and run.info.status == "RUNNING"
    finally:
        _stop(server) if server.poll() is None else None
        _kill_all(ray_tmpdir)


def _tune_trial_statuses(experiment: Path) -> list[str]:
    """Trial statuses in Tune's latest saved experiment state (what a restore starts from)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):  # being rewritten
        return []
    return [json.loads(state)["status"] for state, _ in trials]


def _trial_runs(parent_id: str) -> list:
    return mlflow.search_runs(
        experiment_names=["distalign"], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list"
    )


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_then_resume(tiny_model_path, tmp_path):
    """A sweep interrupted in its second trial resumes: the finished trial is kept, the other starts over
    and gives the same numbers; other settings under the same name are refused."""
    ray_tmpdir = f"/tmp/rf{secrets.token_hex(3)}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(tmp_path, ray_tmpdir, uri)
    finetune = {"model": tiny_model_path, "num_workers": 1, "cpus_per_worker": 0.5, "epochs": 12, "sft_epochs": 1, "max_contexts": 2}
    config = {"name": "faults", "num_samples": 2, "scheduler": "fifo", "max_concurrent_trials": 1, "finetune": finetune}
    config["min_answer_mass"] = 0.0  # a random tiny model answers with no class
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    argv = ["sweep", "--dataset", "gender-us-real", "--config", str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / "best.yaml")]
    mlflow.set_tracking_uri(uri)
    try:
        command = Command(argv, env)
        deadline = time.time() + 600
        # Interrupt when Tune's saved state (written every 10 s) has the first trial finished and the
        # second, which started after it (max_concurrent_trials 1), is two epochs in.
        while True:
            parents = mlflow.search_runs(experiment_names=["distalign"], filter_string="tags.job = 'sweep'", output_format="list")
            trials = _trial_runs(parents[0].info.run_id) if parents else []
            running = [t for t in trials if t.info.status == "RUNNING" and t.data.metrics.get("epochs_done", 0) >= 2]
            if running and sorted(_tune_trial_statuses(tmp_path / "home" / "sweeps" / "faults" / "tune" / "faults")) == [
                "RUNNING",
                "TERMINATED",
            ]:
                break
            assert command.proc.poll() is None and time.time() < deadline, command.log_text()[-3000:]
            time.sleep(0.5)
        parent_id = parents[0].info.run_id
        rc, out, err, seconds = command.interrupt()
        _assert_interrupted(rc, err, seconds, ray_tmpdir)
        assert mlflow.get_run(parent_id).info.status == "KILLED"
        statuses = sorted(t.info.status for t in _trial_runs(parent_id))
        assert statuses == ["FINISHED", "KILLED"], statuses
        first, interrupted = sorted(_trial_runs(parent_id), key=lambda t: t.info.status)  # FINISHED, KILLED
        assert interrupted.info.start_time >= first.info.end_time  # one trial at a time

        # Other settings under the same name: one line, before any work.
        rc, out, err = Command([*argv, "--num-samples", "3"], env).finish()
        assert rc == 2 and err.startswith("distalign: error: sweep 'faults'") and "(num_samples)" in err, (rc, err[-2000:])
        assert len(_trial_runs(parent_id)) == 2

        rc, out, err = Command(argv, env).finish()
        assert rc == 0, (out[-3000:], err[-3000:])
        assert f"resuming sweep 'faults' (run {parent_id}): 1 of 2 trials finished" in out, out
        runs = _trial_runs(parent_id)
        finished = {t.info.run_name: t for t in runs if t.info.status == "FINISHED"}
        assert len(finished) == 2 and interrupted.info.run_name in finished, [(t.info.run_name, t.info.status) for t in runs]
        assert len(runs) == 3  # the finished trial did not run again

        # The trial ran again from its first epoch, to the numbers of its interrupted attempt.
        def history(run_id: str, key: str) -> list[float]:
            return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]

        rerun = finished[interrupted.info.run_name].info.run_id
        assert history(rerun, "epochs_done") == list(range(1, 14))  # 1 SFT + 12 epochs
        before = history(interrupted.info.run_id, "val_mae")
        assert len(before) >= 2 and history(rerun, "val_mae")[: len(before)] == pytest.approx(before, abs=1e-6)
        assert mlflow.get_run(parent_id).info.status == "FINISHED"
        best = yaml.safe_load((tmp_path / "best.yaml").read_text())["finetune"]

        # A finished sweep rerun is restored whole: no trial runs again, the same best config.
        rc, out, err = Command(argv, env).finish()
        assert rc == 0 and "2 of 2 trials finished" in out, (out[-3000:], err[-3000:])
        assert len(_trial_runs(parent_id)) == 3
        assert yaml.safe_load((tmp_path / "best.yaml").read_text())["finetune"] == best
    finally:
        _kill_all(ray_tmpdir)
