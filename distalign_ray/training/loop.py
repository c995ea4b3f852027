"""The Ray Train worker loop: LoRA on the base model, stage 1 SFT, stage 2 hybrid, a checkpoint per epoch.

Runs identically in a Ray Train worker group (DDP: gloo on CPUs, NCCL on GPUs) and in local mode
(`num_workers=0`). The device comes from Ray Train (`get_device`); on CUDA the forward passes run
under bf16 autocast, on CPUs in fp32. The model and any starting adapter are resolved on the worker's
own node (nothing is read from a driver-local path). `ray.train.report` blocks ~2 s here, so it is
called once per epoch; step metrics go straight to MLflow from rank 0, batched.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from distalign_ray.adapters import adapter_on_this_node, write_adapter_meta
from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.data.steering import answer_ids, prepare_steering_vocab
from distalign_ray.evaluation.binding import BindingReport, binding_check
from distalign_ray.models import load_model, load_tokenizer, model_on_this_node
from distalign_ray.scoring import CompletionScorer
from distalign_ray.tracking.mlflow_store import StepLogger
from distalign_ray.training.budget import plan_budget
from distalign_ray.training.progress import ProgressFeed
from distalign_ray.training.stages import build_stages, readout_probs, uses_steering, validation_set

STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"
ANSWER_MASS = "val_answer_mass"  # per epoch: the probability the validation readout's classes get at all


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / torch.distributed.get_world_size()


def optimizer_step(loss, trainable: list, optimizer, scheduler, max_grad_norm: float):
    """One update from `loss`, its gradient clipped to `max_grad_norm`; returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return grad_norm


def lr_factor(total_steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(groups: list[list], prompts_per_batch: int, seed: int, rank: int, world: int) -> list[list]:
    """Shuffle the prompt groups (seeded, same on every rank), cut global batches of whole groups,
    give each rank its groups. A last partial batch is kept (the reference code dropped it)."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    out = []
    for start in range(0, len(order), prompts_per_batch):
        global_batch = order[start : start + prompts_per_batch]
        local = global_batch[rank::world] or global_batch[:1]  # every rank steps together (DDP)
        out.append([example for g in local for example in groups[g]])
    return out


def build_lora(model, cfg: FinetuneConfig, extra_token_ids: list[int] | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.init_adapter:  # continue training a saved adapter (DPO starts from the IFT adapter)
        return PeftModel.from_pretrained(model, adapter_on_this_node(cfg.init_adapter), is_trainable=True)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        # Added steering tokens need trainable embedding rows (only those rows, not the whole matrix).
        trainable_token_indices={"embed_tokens": extra_token_ids} if extra_token_ids else None,
    )
    return get_peft_model(model, lora)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    cfg = FinetuneConfig.model_validate(loop_config["finetune"])
    spec = DistributionSpec.model_validate(loop_config["spec"]).subset(cfg.max_contexts)
    model_ref = model_on_this_node(loop_config["model_ref"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)

    tokenizer = load_tokenizer(model_ref)
    vocab = prepare_steering_vocab(tokenizer, spec, cfg.steering_tokens) if uses_steering(cfg) else None
    model = load_model(model_ref)
    if vocab is not None and vocab.added_special_tokens:
        model.resize_token_embeddings(len(tokenizer))
    model = build_lora(model, cfg, vocab.token_ids if vocab is not None and vocab.added_special_tokens else None)
    model.train()
    pad_id = tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    scorer = CompletionScorer(model, pad_id).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    budget = plan_budget(cfg, spec)
    with autocast:
        stages = build_stages(cfg, spec, tokenizer, vocab, scorer, budget, z0_reduce=_all_reduce_mean)
    if world > 1:
        scorer = ray.train.torch.prepare_model(scorer, move_to_device=device, parallel_strategy="ddp")
    validation = validation_set(spec, tokenizer, cfg.validation_templates or cfg.templates)
    answers = [answer_ids(tokenizer, spec.answers[c])[:-1] for c in spec.categories]

    plan = [(stage.name, epoch) for stage in stages for epoch in range(stage.epochs)]

    def stage_steps(stage) -> int:  # optimizer steps of a stage: its schedule's length and the progress total
        return math.ceil(len(stage.groups) / budget.prompts_per_batch) * stage.epochs

    by_name = {stage.name: stage for stage in stages}
    optimizers = {}

    def optimizer_for(name: str):
        if name not in optimizers:
            stage = by_name[name]
            total = stage_steps(stage)
            opt = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(total, cfg.warmup_ratio, cfg.min_lr_ratio))
            optimizers[name] = (opt, sched)
        return optimizers[name]

    start_index, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(Path(folder) / ADAPTER_DIR / "adapter_model.safetensors")))
            start_index, global_step = state["plan_index"] + 1, state["global_step"]
            for name, values in state.get("reference_logps", {}).items():
                for example, value in zip(by_name[name].examples(), values):
                    example.reference_logp = value
            for name, (opt_state, sched_state) in state["optimizers"].items():
                opt, sched = optimizer_for(name)
                opt.load_state_dict(opt_state)
                sched.load_state_dict(sched_state)

    logger = StepLogger(loop_config.get("mlflow_run_id") if rank == 0 else None, loop_config.get("mlflow_uri"))
    if start_index > 0:  # a restarted worker group: say where it resumed (visible in MLflow)
        logger.log({"resumed_at_step": float(global_step)}, global_step)
    steering_ids = vocab.token_ids if vocab is not None else None
    total_steps = sum(stage_steps(stage) for stage in stages)
    progress = ProgressFeed(loop_config.get("progress") if rank == 0 else None, total_steps)

    for plan_index in range(start_index, len(plan)):
        name, epoch = plan[plan_index]
        stage = by_name[name]
        opt, sched = optimizer_for(name)
        if epoch == 0 and stage.prepare is not None:
            with autocast:
                stage.prepare(scorer)
        epoch_losses = []
        for batch in batches(stage.groups, budget.prompts_per_batch, cfg.seed * 1000 + plan_index, rank, world):
            with autocast:
                parts = stage.step(scorer, batch)
            grad_norm = optimizer_step(parts["loss"], trainable, opt, sched, cfg.max_grad_norm)
            global_step += 1
            epoch_losses.append(parts["loss"].item())
            progress.step(name, epoch, stage.epochs, global_step, epoch_losses[-1])
            if global_step % cfg.log_every == 0:
                metrics = {f"{name}/{k}": float(v.detach()) for k, v in parts.items()}
                metrics.update({f"{name}/grad_norm": float(grad_norm), f"{name}/lr": sched.get_last_lr()[0]})
                logger.log(metrics, global_step)
        with autocast:
            metrics = _epoch_metrics(model, validation, steering_ids, answers, pad_id, epoch_losses, rank, world)
        metrics.update(stage=name, epoch=epoch, plan_index=plan_index, global_step=global_step, device=str(device))
        progress.epoch_end(global_step, metrics["val_mae"])
        if plan_index == len(plan) - 1 and steering_ids is not None:
            with autocast:
                binding = _binding_metrics(model, tokenizer, spec, steering_ids, [p for p, _ in validation], rank, world)
            metrics.update(binding.metrics(), binding=asdict(binding))
        logger.log({k: v for k, v in metrics.items() if isinstance(v, float)}, global_step)
        logger.flush()
        _report_with_checkpoint(model, tokenizer, vocab, spec, cfg, optimizers, stages, metrics, rank, loop_config)


def _epoch_metrics(model, validation, steering_ids, answers, pad_id, losses, rank, world) -> dict:
    """Mean train loss, `val_mae` (the readout MAE on every training prompt) and `val_answer_mass` (the
    probability the readout's classes get at all), reduced over workers."""
    model.eval()
    mine = validation[rank::world]
    readout = readout_probs(model, [p for p, _ in mine], steering_ids, answers, pad_id) if mine else None
    model.train()
    device = next(model.parameters()).device  # NCCL reduces device tensors only
    sums = torch.zeros(3, device=device)  # abs error, answer mass, prompts
    if readout is not None:
        targets = torch.tensor([t for _, t in mine], device=device)
        sums[0] = (readout.probs.float() - targets).abs().mean(-1).sum()
        sums[1] = readout.mass.sum()
        sums[2] = len(mine)
    loss = torch.tensor([sum(losses), len(losses)], dtype=torch.float32, device=device)
    if _distributed():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(loss)
    prompts = sums[2].clamp_min(1)
    return {
        "train_loss": float(loss[0] / loss[1].clamp_min(1)),
        "val_mae": float(sums[0] / prompts),
        ANSWER_MASS: float(sums[1] / prompts),
    }


def _binding_metrics(model, tokenizer, spec, steering_ids, prompts, rank, world):
    """The binding check on every training prompt (each worker its share), summed over workers."""
    report = binding_check(model, tokenizer, spec, steering_ids, prompts[rank::world])
    if not _distributed():
        return report
    device = next(model.parameters()).device
    sums = torch.tensor([*report.correct, *report.exact, *report.answer_prob, report.prompts], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(sums)
    k = len(report.categories)
    sums = sums.tolist()
    counts = [round(x) for x in sums]
    return BindingReport(report.categories, counts[:k], counts[k : 2 * k], counts[-1], sums[2 * k : 3 * k], report.examples)


def adapter_meta(vocab, spec: DistributionSpec, cfg: FinetuneConfig, model_ref_name: str) -> dict:
    return {
        "steering_strings": vocab.strings if vocab else [],
        "steering_token_ids": vocab.token_ids if vocab else [],
        "added_special_tokens": bool(vocab and vocab.added_special_tokens),
        "categories": spec.categories,
        "dataset": spec.name,
        "base_model": model_ref_name,
        "loss_mode": cfg.loss_mode,
    }


def _report_with_checkpoint(model, tokenizer, vocab, spec, cfg, optimizers, stages, metrics, rank, loop_config) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    folder = tempfile.mkdtemp(prefix="distalign-ckpt-")
    replaced = ray.train.get_checkpoint() if cfg.num_workers == 0 else None  # local mode holds the last one only
    try:
        model.save_pretrained(os.path.join(folder, ADAPTER_DIR))
        if vocab is not None and vocab.added_special_tokens:
            tokenizer.save_pretrained(os.path.join(folder, ADAPTER_DIR))
        write_adapter_meta(os.path.join(folder, ADAPTER_DIR), adapter_meta(vocab, spec, cfg, loop_config["model_ref"]["name"]))
        torch.save(
            {
                "plan_index": metrics["plan_index"],
                "global_step": metrics["global_step"],
                "optimizers": {k: (o.state_dict(), s.state_dict()) for k, (o, s) in optimizers.items()},
                # a resumed stage keeps the reference it started with (the stage-1 adapter is gone by then)
                "reference_logps": {
                    stage.name: [e.reference_logp for e in stage.examples()]
                    for stage in stages
                    if stage.prepare is not None and stage.examples()[0].reference_logp is not None
                },
            },
            os.path.join(folder, STATE_FILE),
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        # A worker group's report copies the folder to storage; local mode keeps a reference to it
        # (`run_finetune` deletes the last one once the adapter is copied).
        if cfg.num_workers > 0:
            shutil.rmtree(folder, ignore_errors=True)
        elif replaced is not None:
            shutil.rmtree(replaced.path, ignore_errors=True)
