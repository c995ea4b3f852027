"""Driver side of fine-tuning: validate, run the Ray Train `TorchTrainer`, save the adapter atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.data.steering import prepare_steering_vocab
from distalign_ray.errors import DistalignError
from distalign_ray.models import load_tokenizer, resolve_model
from distalign_ray.paths import home_dir
from distalign_ray.training.loop import ADAPTER_DIR, train_loop_per_worker
from distalign_ray.training.stages import uses_steering


def check_output_dir(output: str | Path) -> Path:
    output = Path(output).absolute()
    if output.exists() and any(output.iterdir()):
        raise DistalignError(f"output folder {output} already exists and is not empty; choose another --output")
    return output


def validate_finetune(spec: DistributionSpec, cfg: FinetuneConfig, output: str | Path):
    """Everything that can be checked cheaply, before Ray starts: model, tokenizer, steering ids, output."""
    output = check_output_dir(output)
    model_ref = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_ref)
    if uses_steering(cfg):
        prepare_steering_vocab(tokenizer, spec.subset(cfg.max_contexts), cfg.steering_tokens)
    if cfg.init_adapter:
        read_adapter_meta(cfg.init_adapter)
    return model_ref, output


def run_finetune(spec: DistributionSpec, cfg: FinetuneConfig, output: str | Path, mlflow_run_id: str | None = None) -> dict:
    """Fine-tune and write the adapter to `output`. Returns the final metrics and timings."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distalign_ray.cluster import init_ray
    from distalign_ray.tracking.mlflow_store import tracking_uri

    model_ref, output = validate_finetune(spec, cfg, output)
    if cfg.num_workers > 0:
        init_ray()
    loop_config = {
        "finetune": cfg.model_dump(),
        "spec": spec.model_dump(),
        "model_ref": model_ref.__dict__,
        "mlflow_run_id": mlflow_run_id,
        "mlflow_uri": tracking_uri(),
    }
    run_name = f"finetune-{spec.name}-{cfg.loss_mode}-{int(time.time())}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=False, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(home_dir() / "ray_results"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    started = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    _install_adapter(result.checkpoint, output)
    return {"metrics": dict(result.metrics or {}), "seconds": time.time() - started, "adapter": str(output)}


def _install_adapter(checkpoint, output: Path) -> None:
    """Copy the final adapter next to `output`, then rename: `output` is complete or absent."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / ADAPTER_DIR, staging)
    if output.exists():
        output.rmdir()  # empty, checked before training
    os.replace(staging, output)


def read_adapter_meta(adapter: str | Path) -> dict:
    from distalign_ray.training.loop import META_FILE

    path = Path(adapter) / META_FILE
    if not path.is_file():
        raise DistalignError(f"{adapter} is not a distalign adapter folder (missing {META_FILE})")
    return json.loads(path.read_text())
