"""The one Ray Train launcher: every fine-tune (finetune, compare, quickstart, each sweep trial) is a
`TorchTrainer` built here, with the same scaling, failure, checkpoint and storage settings."""

from __future__ import annotations

import threading
from collections.abc import Callable

from distalign_ray.config import FinetuneConfig
from distalign_ray.storage import join, storage_root


def train_storage(*parts: str) -> str:
    """Ray Train/Tune `storage_path` under the storage root (shared storage on multi-node clusters:
    Ray refuses a head-local folder there, and a resumed run reads checkpoints written elsewhere)."""
    return join(storage_root(), *parts)


def scaling_resources(cfg: FinetuneConfig) -> dict[str, float]:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return resources


def build_trainer(cfg: FinetuneConfig, loop_config: dict, name: str, storage_path: str, callbacks=()):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distalign_ray.training.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=scaling_resources(cfg)),
        # NCCL between GPU workers, gloo on CPUs.
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def fit_in_thread(trainer, while_fitting: Callable[[], None] | None = None):
    """`trainer.fit()` (a Ray Train trainer or a Tune Tuner) in a helper thread; the calling thread runs
    `while_fitting()` (which may block up to about a second) until the fit ends, and returns its Result
    or raises its error.

    In the main thread, Ray Train's fit installs its own SIGINT handler for good: Ctrl-C then ends
    the process with exit code 1 (or leaves the command running after the fit) instead of raising
    KeyboardInterrupt, so runs could not end KILLED; Tune's fit catches Ctrl-C and returns the trials
    so far, as if the search had ended. Outside the main thread neither installs a handler."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the calling thread
            outcome["error"] = error

    fitting = threading.Thread(target=fit, name="train-fit", daemon=True)
    fitting.start()
    while fitting.is_alive():
        if while_fitting is None:
            fitting.join(timeout=0.5)
        else:
            while_fitting()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
