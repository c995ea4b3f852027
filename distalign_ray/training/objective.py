"""One training step's loss from a batch of steering examples (torch only, no Ray).

A single policy forward pass over (prompt, steering id, answer) rows gives both terms: the logits at
the last prompt position for the steering KL, and the answer log-probs for KTO/SFT. The reference
model is the same network with the LoRA adapter disabled (no second copy in memory).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from distalign_ray.data.steering import TrainingExample
from distalign_ray.losses import HybridLossWeights, combine_losses, kto_loss, sft_loss, steering_kl_loss
from distalign_ray.losses.hybrid import LOSS_MODES
from distalign_ray.scoring import collate_completions, score_completions


def _completion(example: TrainingExample, steering_token_ids: list[int], answer: list[int] | None = None) -> list[int]:
    prefix = [] if example.steering_index is None else [steering_token_ids[example.steering_index]]
    return prefix + list(example.answer_ids if answer is None else answer)


def _scored_logps(scores, batch, has_steering: bool, score_steering_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs over the scored completion tokens, and their per-token mask."""
    mask = batch.completion_mask.clone()
    if has_steering and not score_steering_token:
        mask[:, 0] = 0  # the steering id is the KL term's business, not the answer binding's
    return (scores.token_logps * mask).sum(-1), mask


def reference_disabled(model):
    """Context manager running `model` (a peft model, possibly DDP-wrapped) as the reference."""
    inner = getattr(model, "module", model)
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext()


def sft_step_loss(model, examples: list[TrainingExample], steering_token_ids: list[int], pad_id: int, cfg) -> dict:
    batch = collate_completions(
        [e.prompt_ids for e in examples], [_completion(e, steering_token_ids) for e in examples], pad_id
    )
    scores = score_completions(model, batch)
    has_steering = examples[0].steering_index is not None
    _, mask = _scored_logps(scores, batch, has_steering, cfg.score_steering_token)
    loss = sft_loss(scores.token_logps, mask)
    return {"loss": loss, "sft": loss.detach()}


def hybrid_step_loss(
    model,
    examples: list[TrainingExample],
    steering_token_ids: list[int],
    pad_id: int,
    cfg,
    z0_reduce=None,
) -> dict:
    """Loss of `cfg.loss_mode` on one batch; returns the total and detached components."""
    use_kl, use_kto = LOSS_MODES[cfg.loss_mode]
    prompts = [e.prompt_ids for e in examples]
    batch = collate_completions(prompts, [_completion(e, steering_token_ids) for e in examples], pad_id)
    scores = score_completions(model, batch)
    has_steering = examples[0].steering_index is not None
    out = {}
    kl = kto = None
    if use_kl:
        targets = torch.tensor([e.target for e in examples], dtype=torch.float32)
        kl = steering_kl_loss(
            scores.first_logits, torch.tensor(steering_token_ids), targets, cfg.kl_normalization
        )
        out["steering_kl"] = kl.detach()
    if use_kto:
        policy_logps, _ = _scored_logps(scores, batch, has_steering, cfg.score_steering_token)
        # TRL's mismatched pairs: rotate answers by one within the batch, keep each row's prompt and id.
        rotated = [examples[i - 1].answer_ids for i in range(len(examples))]
        kl_batch = collate_completions(
            prompts, [_completion(e, steering_token_ids, a) for e, a in zip(examples, rotated)], pad_id
        )
        with torch.no_grad():
            policy_mismatched, _ = _scored_logps(
                score_completions(model, kl_batch), kl_batch, has_steering, cfg.score_steering_token
            )
            with reference_disabled(model):
                reference_logps, _ = _scored_logps(
                    score_completions(model, batch), batch, has_steering, cfg.score_steering_token
                )
                reference_mismatched, _ = _scored_logps(
                    score_completions(model, kl_batch), kl_batch, has_steering, cfg.score_steering_token
                )
        result = kto_loss(
            policy_logps,
            reference_logps,
            torch.tensor([e.desirable for e in examples]),
            policy_mismatched,
            reference_mismatched,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
            z0_reduce=z0_reduce,
        )
        kto = result.loss
        out.update(kto=kto.detach(), kto_z0=result.z0.detach())
        desirable = torch.tensor([e.desirable for e in examples])
        if desirable.any():
            out["reward_desirable"] = result.rewards[desirable].mean()
        if (~desirable).any():
            out["reward_undesirable"] = result.rewards[~desirable].mean()
    out["loss"] = combine_losses(cfg.loss_mode, HybridLossWeights(cfg.kl_weight, cfg.kto_weight), kl, kto)
    return out


@torch.no_grad()
def steering_readout(model, prompts: list[list[int]], steering_token_ids: list[int], pad_id: int, batch_size: int = 16):
    """P(steering id | prompt), renormalised over the ids: the distribution inference samples from."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # A dummy one-token completion: we only need the logits at the last prompt position.
        batch = collate_completions(chunk, [[steering_token_ids[0]]] * len(chunk), pad_id)
        logits = score_completions(model, batch).first_logits
        rows.append(torch.softmax(logits[:, steering_token_ids], dim=-1))
    return torch.cat(rows)
