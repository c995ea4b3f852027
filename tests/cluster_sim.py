"""A multi-node Ray cluster simulated on one machine, for the cluster tests.

Ray's own multi-node tests run several nodes on one machine, but those share one filesystem and
cannot catch a path only the head has. Here every worker node runs as root in its own mount
namespace, where the head's private folder (its Ray temp dir, the project home, the model cache and
the MLflow store) is covered by an empty tmpfs; only `shared/` (standing for NFS or a bucket) is
visible to all. The head starts with `--num-cpus=0` and token authentication, so all work runs on
worker nodes. Every process is stopped by its own ids, never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_MARKER = "DISTALIGN_SIM_NODE"


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports. The sockets stay bound until all are chosen: one at a time, the OS
    can hand out the same port again (two Ray components then collide and the node never starts)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_ports(head: bool = False) -> list[str]:
    """Every port a node opens, chosen free, so this cluster never collides with another local one."""
    low = random.randrange(20000, 31000, 200)  # worker ports: below the ephemeral range, above Ray's defaults
    ports = free_ports(7)
    client = [f"--ray-client-server-port={ports[6]}"] if head else []
    return client + [
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 150}",
    ]


def processes_with(marker: str, value: str) -> list[psutil.Process]:
    """Processes whose environment has `marker=value` (children inherit it)."""
    found = []
    for proc in psutil.process_iter(["environ"]):
        try:
            if (proc.info["environ"] or {}).get(marker) == value:
                found.append(proc)
        except (psutil.Error, TypeError):
            continue
    return found


def stop(procs: list[psutil.Process], signal_kill: bool = False) -> None:
    for proc in procs:
        try:
            proc.kill() if signal_kill else proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


class SimulatedCluster:
    def __init__(self, base: Path):
        self.base = base
        self.head = base / "head"  # private to the head: hidden from worker nodes
        self.shared = base / "shared"  # NFS / bucket stand-in: visible to every node
        self.storage = self.shared / "storage"
        self.token = base / "token"
        self.cluster_id = f"sim-{secrets.token_hex(4)}"
        self.port, self.dashboard_port, self.mlflow_port = free_ports(3)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self._mlflow: subprocess.Popen | None = None

    # --- environment -------------------------------------------------------------------------
    def _common_env(self) -> dict:
        return dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token),
            RAY_TMPDIR=str(self.head / "ray"),
            PATH=f"{BIN}:{os.environ['PATH']}",
            OMP_NUM_THREADS="1",
        )

    def head_env(self) -> dict:
        """The head's environment, which `ray job submit` entrypoints inherit."""
        env = self._common_env() | {
            NODE_MARKER: f"{self.cluster_id}-head",
            "DISTALIGN_HOME": str(self.head / "home"),
            "DISTALIGN_CACHE": str(self.head / "cache"),
            "DISTALIGN_STORAGE": str(self.storage),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
        }
        env.pop("RAY_ADDRESS", None)
        return env

    def client_env(self) -> dict:
        return self._common_env() | {NODE_MARKER: f"{self.cluster_id}-client"}

    # --- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        for folder in (self.head / "ray", self.head / "home", self.head / "cache", self.head / "mlflow", self.storage):
            folder.mkdir(parents=True, exist_ok=True)
        self.token.write_text(secrets.token_hex(32))
        self._start_mlflow()
        with open(self.base / "head.log", "w") as log:  # a file, not a pipe: the daemons inherit it
            subprocess.run(
                [
                    BIN / "ray",
                    "start",
                    "--head",
                    "--num-cpus=0",
                    f"--port={self.port}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}",
                    "--include-dashboard=true",
                    *node_ports(head=True),
                ],
                env=self.head_env(),
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=180,
            )

    def _start_mlflow(self) -> None:
        """An MLflow server whose store lies in the head's private folder."""
        store = self.head / "mlflow"
        env = self.head_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._mlflow = subprocess.Popen(
            [
                BIN / "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{store / 'mlflow.db'}",
                "--artifacts-destination",
                str(store / "artifacts"),
            ],
            env=env | {NODE_MARKER: f"{self.cluster_id}-mlflow"},
            stdout=open(self.base / "mlflow.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError("MLflow server did not come up: " + (self.base / "mlflow.log").read_text()[-2000:])

    def add_worker(self, name: str, cpus: int = 2) -> None:
        """A worker node in its own mount namespace: the head's folder is an empty tmpfs there, so it
        has its own (empty) Ray temp dir, model cache and project home."""
        env = self._common_env() | {
            NODE_MARKER: f"{self.cluster_id}-{name}",
            "DISTALIGN_CACHE": str(self.head / "cache"),
            "DISTALIGN_HOME": str(self.head / "home"),
        }
        start = " ".join([str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.port}", f"--num-cpus={cpus}", *node_ports()])
        script = f"mount -t tmpfs tmpfs {self.head} && mkdir -p {self.head}/ray && {start}"
        with open(self.base / f"{name}.log", "w") as log:
            subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                env=env,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=180,
            )
        self.wait_for_nodes(lambda nodes: any(n["resources_total"].get("CPU", 0) >= cpus for n in nodes))

    def node_view(self, name: str) -> Path:
        """The filesystem as a worker node's processes see it (their mount namespace)."""
        procs = processes_with(NODE_MARKER, f"{self.cluster_id}-{name}")
        assert procs, f"node {name} has no processes"
        return Path(f"/proc/{procs[0].pid}/root")

    def kill_node(self, name: str) -> int:
        """Kill -9 every process of a worker node (its raylet, its workers): a lost machine."""
        procs = processes_with(NODE_MARKER, f"{self.cluster_id}-{name}")
        stop(procs, signal_kill=True)
        return len(procs)

    def alive_nodes(self) -> list[dict]:
        reply = subprocess.run(
            [BIN / "ray", "list", "nodes", "--address", self.address, "--format", "json", "--filter", "state=ALIVE"],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(reply.stdout) if reply.returncode == 0 and reply.stdout.strip().startswith("[") else []

    def wait_for_nodes(self, condition, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition(self.alive_nodes()):
                return
            time.sleep(2)
        raise TimeoutError(f"the cluster did not reach the expected nodes: {self.alive_nodes()}")

    def shutdown(self) -> None:
        if self._mlflow is not None:
            try:
                os.killpg(self._mlflow.pid, signal.SIGTERM)
                self._mlflow.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for part in ("client", *[p.name.removesuffix(".log") for p in self.base.glob("*.log")]):
            stop(processes_with(NODE_MARKER, f"{self.cluster_id}-{part}"))
        shutil.rmtree(self.base, ignore_errors=True)

    # --- jobs --------------------------------------------------------------------------------
    def submit(self, entrypoint: list[str], env_vars: dict | None = None) -> str:
        """`ray job submit --no-wait` of a distalign job (the interpreter by absolute path: the entrypoint
        runs with the head's environment). Returns the job id."""
        runtime_env = {"excludes": [".venv", ".distalign", ".git"], "env_vars": env_vars or {}}
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
            submitted = subprocess.run(
                [
                    BIN / "ray",
                    "job",
                    "submit",
                    "--address",
                    self.address,
                    "--no-wait",
                    "--working-dir",
                    str(REPO),
                    "--runtime-env-json",
                    json.dumps(runtime_env),
                    "--",
                    str(BIN / "python"),
                    *entrypoint,
                ],
                env=self.client_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if "No available agent" not in submitted.stderr:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        return re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr).group(0)

    def _api(self, path: str) -> dict:
        """GET the head's job REST API with the token (cheaper than a `ray job` CLI process per poll)."""
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token.read_text()}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def wait(self, job_id: str, timeout: float = 900) -> tuple[str, str]:
        """(final status, logs) of a job."""
        deadline = time.time() + timeout
        status = "TIMEOUT"
        while time.time() < deadline:
            current = self._api(f"/api/jobs/{job_id}")["status"]
            if current in ("SUCCEEDED", "FAILED", "STOPPED"):
                status = current
                break
            time.sleep(3)
        return status, self._api(f"/api/jobs/{job_id}/logs")["logs"]

    def run_job(self, entrypoint: list[str], timeout: float = 900, env_vars: dict | None = None) -> tuple[str, str]:
        return self.wait(self.submit(entrypoint, env_vars), timeout)

    def diagnostics(self) -> str:
        """What the cluster holds now (alive actors, placement groups), for a failed test's message."""
        out = []
        for what in ("actors", "placement-groups"):
            reply = subprocess.run(
                [BIN / "ray", "list", what, "--address", self.address, "--filter", "state!=DEAD", "--limit", "50"],
                env=self.client_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            out.append(f"--- {what}\n{reply.stdout[-3000:]}{reply.stderr[-500:]}")
        return "\n".join(out)
