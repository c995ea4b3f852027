"""Driver side of fine-tuning: validate, run the Ray Train `TorchTrainer`, install the adapter atomically."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

from distalign_ray import storage
from distalign_ray.adapters import read_adapter_meta
from distalign_ray.config import FinetuneConfig
from distalign_ray.data.prompts import build_prompts, held_out_ids
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.data.steering import prepare_steering_vocab
from distalign_ray.errors import CheckFailed, DistalignError
from distalign_ray.evaluation.binding import BindingReport, failure_message, summary_line
from distalign_ray.models import load_tokenizer, resolve_model
from distalign_ray.training.budget import plan_budget
from distalign_ray.training.launcher import build_trainer, fit_in_thread, train_storage
from distalign_ray.training.loop import ADAPTER_DIR, ANSWER_MASS
from distalign_ray.training.progress import training_progress
from distalign_ray.training.stages import uses_steering


def check_output_dir(output: str | Path) -> str:
    """The adapter's destination (a folder or a storage URI), which must be absent or empty."""
    output = storage.normalize(output)
    if not storage.folder_is_empty_or_absent(output):
        raise DistalignError(f"output folder {output} already exists and is not empty; choose another --output")
    return output


def validate_finetune(spec: DistributionSpec, cfg: FinetuneConfig, output: str | Path):
    """Everything that can be checked cheaply, before Ray starts: model, tokenizer, steering ids, output."""
    output = check_output_dir(output)
    model_ref = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_ref)
    if any(t in held_out_ids(spec) for t in cfg.templates or []):
        raise DistalignError(
            f"held-out templates ({', '.join(held_out_ids(spec))}) are never trained on; leave them out of finetune.templates"
        )
    plan_budget(cfg, spec)  # builds the training prompts: unknown templates fail here
    if cfg.validation_templates:
        build_prompts(spec, "attribute", cfg.validation_templates)
    if uses_steering(cfg):
        prepare_steering_vocab(tokenizer, spec.subset(cfg.max_contexts), cfg.steering_tokens)
    if cfg.init_adapter:
        read_adapter_meta(cfg.init_adapter)
    return model_ref, output


def run_finetune(spec: DistributionSpec, cfg: FinetuneConfig, output: str | Path, mlflow_run_id: str | None = None) -> dict:
    """Fine-tune and write the adapter to `output`. Returns the final metrics and timings."""
    from distalign_ray.adapters import publish_adapter
    from distalign_ray.cluster import check_worker_tracking, init_ray
    from distalign_ray.tracking.mlflow_store import tracking_uri

    model_ref, output = validate_finetune(spec, cfg, output)
    if cfg.num_workers > 0:
        init_ray()
        if mlflow_run_id:
            check_worker_tracking(tracking_uri())
    if cfg.init_adapter:  # workers on any node read it from storage
        cfg = cfg.model_copy(update={"init_adapter": publish_adapter(cfg.init_adapter)})
    loop_config = {
        "finetune": cfg.model_dump(),
        "spec": spec.model_dump(),
        "model_ref": model_ref.__dict__,
        "mlflow_run_id": mlflow_run_id,
        "mlflow_uri": tracking_uri(),
    }
    run_name = f"finetune-{spec.name}-{cfg.loss_mode}-{int(time.time())}"
    started = time.time()
    # Local mode (num_workers=0) runs the loop in this process, without Ray: no queue, no bar.
    with training_progress(f"{cfg.loss_mode} on {spec.name}", enabled=cfg.num_workers > 0) as progress:
        trainer = build_trainer(cfg, loop_config | {"progress": progress}, run_name, train_storage("ray_results"))
        result = fit_in_thread(trainer) if cfg.num_workers > 0 else trainer.fit()  # local mode: this thread
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:  # downloaded from storage when it is remote
        storage.write_folder(Path(folder) / ADAPTER_DIR, output)
    if cfg.num_workers == 0:  # local mode's checkpoint is the loop's temporary folder
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    metrics = dict(result.metrics or {})
    binding = metrics.pop("binding", None)
    return {
        "metrics": metrics,
        "seconds": time.time() - started,
        "adapter": output,
        "budget": plan_budget(cfg, spec),
        "binding": BindingReport(**binding) if binding else None,
    }


def log_finetune_result(result: dict, cfg: FinetuneConfig) -> None:
    """Into the active MLflow run: final metrics, the budget, the binding report and the adapter."""
    import mlflow

    from distalign_ray.adapters import adapter_on_this_node
    from distalign_ray.tracking.mlflow_store import log_params

    mlflow.log_metrics({k: v for k, v in result["metrics"].items() if isinstance(v, float)} | {"seconds": result["seconds"]})
    log_params(result["budget"].params(), prefix="budget.")
    if result["binding"] is not None:
        mlflow.log_dict(asdict(result["binding"]), "binding.json")
        passed = result["binding"].passed(cfg.binding_threshold, cfg.binding_answer_threshold)
        mlflow.set_tag("binding_check", "passed" if passed else "failed")
    mlflow.log_artifacts(adapter_on_this_node(result["adapter"]), artifact_path="adapter")


def describe_result(result: dict) -> list[str]:
    """The lines a command prints after training."""
    budget, metrics, nan = result["budget"], result["metrics"], float("nan")
    lines = [
        f"trained {budget.sft_steps} SFT + {budget.steps} steps ({budget.prompts} prompts, {budget.prompts_per_batch} per batch) "
        f"in {result['seconds']:.0f}s; steering readout MAE {metrics.get('val_mae', nan):.3f}, answer mass {metrics.get(ANSWER_MASS, nan):.3f}"
    ]
    if result["binding"] is not None:
        lines.append(summary_line(result["binding"]))
    return lines


def check_binding(result: dict, cfg: FinetuneConfig) -> None:
    """Raise `CheckFailed` (one line naming what to change) when a steering id is not bound to its answer."""
    report, thresholds = result["binding"], (cfg.binding_threshold, cfg.binding_answer_threshold)
    if report is not None and cfg.binding_check == "fail" and not report.passed(*thresholds):
        raise CheckFailed(f"adapter {result['adapter']}: " + failure_message(report, *thresholds))
