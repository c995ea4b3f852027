"""Connecting to Ray: an existing cluster (RAY_ADDRESS, or inside `ray job submit`) or a new local
one; and what a cluster whose work runs on other nodes requires (shared storage, a tracking server)."""

from __future__ import annotations

import os
import signal
import threading

from distalign_ray.errors import DistalignError


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        sigterm = signal.getsignal(signal.SIGTERM)
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local" forces a fresh cluster: a stale address file from a dead head would make ray.init() hang.
            ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
        # Ray's core worker replaces the SIGTERM handler with one that aborts the process (exit -6,
        # runs left RUNNING); keep the command's own (cli: SIGTERM ends a command like Ctrl-C).
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    check_shared_storage()


def work_leaves_this_node() -> bool:
    """True when tasks may run on another node than the driver's: more than one node, or a driver
    node without CPUs (a head that does no work, as on an autoscaling cluster before it scales)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    driver_node = next((n for n in nodes if n["NodeID"] == here), None)
    return len(nodes) > 1 or driver_node is None or driver_node.get("Resources", {}).get("CPU", 0) == 0


def check_shared_storage() -> None:
    """One clear line instead of a failure on another node: work that leaves the driver's node
    reads adapters, models and checkpoints from shared storage."""
    from distalign_ray.storage import STORAGE_ENV, shared_storage_configured

    if work_leaves_this_node() and not shared_storage_configured():
        raise DistalignError(
            f"this Ray cluster runs work on other nodes: set {STORAGE_ENV} (or `storage:` / --storage) to a folder "
            "every node mounts (NFS) or a bucket URI (s3://bucket/prefix), so workers can read adapters and checkpoints"
        )


def check_worker_tracking(uri: str) -> None:
    """Ray Train workers log step metrics themselves: on other nodes they need a tracking server."""
    if work_leaves_this_node() and not uri.startswith(("http://", "https://", "databricks")):
        raise DistalignError(
            f"this Ray cluster trains on other nodes, but the MLflow store {uri} is a file on this node: "
            "run an MLflow server and set MLFLOW_TRACKING_URI=http://HOST:PORT (README: running on a cluster)"
        )


def largest_node_cpus() -> int:
    """CPUs of the largest node (a CPU vLLM engine takes a whole node); this host's count before
    any node with CPUs has joined."""
    import ray

    if ray.is_initialized():
        counts = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        if max(counts, default=0) > 0:
            return max(counts)
    return os.cpu_count() or 1


def cluster_hardware() -> str:
    """The Ray cluster's compute in words ("2 CPUs", "96 CPUs, 8 GPUs"): what a report's times ran on."""
    import ray

    resources = ray.cluster_resources()
    parts = [f"{resources.get('CPU', 0):g} CPUs"] + ([f"{resources['GPU']:g} GPUs"] if resources.get("GPU") else [])
    return ", ".join(parts)
