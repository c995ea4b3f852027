"""Connecting to Ray: an existing cluster (RAY_ADDRESS, or inside `ray job submit`) or a new local one."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" forces a fresh cluster: a stale address file from a dead head would make ray.init() hang.
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
