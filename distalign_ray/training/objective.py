"""One training step's loss from a batch of steering examples (torch only, no Ray).

One policy pass gives both terms: each prompt's last-position logits for the steering KL and the
answer log-probs for KTO/SFT (prompts shared by several rows run once, see `scoring`). KTO's reference
log-probs are computed once when the alignment stage starts (`fill_kto_reference`): the frozen
base + stage-1 adapter (the paper's), or the base with the adapter off (`kto_reference: base`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

from distalign_ray.data.steering import TrainingExample
from distalign_ray.losses import HybridLossWeights, Reduction, combine_losses, kto_loss, sft_loss, steering_kl_loss
from distalign_ray.methods import trained_method
from distalign_ray.scoring import encode_prompts, score_completions


def unwrap(scorer):
    """The CompletionScorer inside a possible DDP wrapper."""
    return getattr(scorer, "module", scorer)


def adapter_disabled(scorer):
    """Context manager running the scorer's peft model as the base model (adapter off)."""
    inner = unwrap(scorer).model
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext()


def _completion(example: TrainingExample, steering_token_ids: list[int]) -> list[int]:
    prefix = [] if example.steering_index is None else [steering_token_ids[example.steering_index]]
    return prefix + list(example.answer_ids)


def _scored_mask(completion_mask: torch.Tensor, has_steering: bool, score_steering_token: bool) -> torch.Tensor:
    mask = completion_mask.clone()
    if has_steering and not score_steering_token:
        mask[:, 0] = 0  # the steering id is the KL term's business, not the answer binding's
    return mask


@torch.no_grad()
def fill_kto_reference(scorer, examples: list[TrainingExample], steering_token_ids: list[int], cfg, chunk: int = 64) -> None:
    """Each example's reference log-prob (summed like the policy's), from the model as it is now, frozen:
    at the start of the alignment stage that is base + the stage-1 adapter; `kto_reference: base`
    scores with the adapter off. Dropout off; the policy's training mode is restored."""
    model = unwrap(scorer)
    was_training = model.training
    model.eval()
    with adapter_disabled(model) if cfg.kto_reference == "base" else nullcontext():
        for start in range(0, len(examples), chunk):
            part = examples[start : start + chunk]
            _, token_logps, completion_mask = model([e.prompt_ids for e in part], [_completion(e, steering_token_ids) for e in part])
            mask = _scored_mask(completion_mask, part[0].steering_index is not None, cfg.score_steering_token)
            for example, value in zip(part, (token_logps * mask).sum(-1).tolist()):
                example.reference_logp = value
    model.train(was_training)


def sft_step_loss(scorer, examples: list[TrainingExample], steering_token_ids: list[int], cfg, reduction: Reduction = "example") -> dict:
    _, token_logps, completion_mask = scorer([e.prompt_ids for e in examples], [_completion(e, steering_token_ids) for e in examples])
    mask = _scored_mask(completion_mask, examples[0].steering_index is not None, cfg.score_steering_token)
    loss = sft_loss(token_logps, mask, reduction)
    # the key names the reduction: IFT (token mean) and stage 1 (example mean) losses are not comparable values
    return {"loss": loss, f"sft_{reduction}_mean": loss.detach()}


def hybrid_step_loss(scorer, examples: list[TrainingExample], steering_token_ids: list[int], cfg, z0_reduce=None) -> dict:
    """Loss of `cfg.loss_mode` on one batch of per-prompt groups; the total and detached components.

    KTO's z0 comes from TRL's mismatched pairs (row i's prompt with row i-1's completion). A batch is whole prompt
    groups that all hold the same K x K completions in the same order, so those pairs are exactly the
    batch's own (prompt, completion) rows, permuted (tests/test_kto_matches_trl.py): z0 is the mean of
    the batch's own log-ratios, with no second pass over duplicated rows."""
    method = trained_method(cfg.loss_mode)
    use_kl, use_kto = method.kl, method.kto
    first_logits, token_logps, completion_mask = scorer(
        [e.prompt_ids for e in examples], [_completion(e, steering_token_ids) for e in examples]
    )
    mask = _scored_mask(completion_mask, examples[0].steering_index is not None, cfg.score_steering_token)
    out = {}
    kl = kto = None
    device = first_logits.device
    if use_kl:
        targets = torch.tensor([e.target for e in examples], dtype=torch.float32, device=device)
        kl = steering_kl_loss(first_logits, torch.tensor(steering_token_ids, device=device), targets, cfg.kl_normalization)
        out["steering_kl"] = kl.detach()
    if use_kto:
        logps = (token_logps * mask).sum(-1)
        reference = torch.tensor([e.reference_logp for e in examples], dtype=logps.dtype, device=device)
        desirable = torch.tensor([e.desirable for e in examples], device=device)
        result = kto_loss(
            logps,
            reference,
            desirable,
            logps.detach(),
            reference,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
            z0_reduce=z0_reduce,
            balance=cfg.kto_balance,
        )
        kto = result.loss
        out.update(kto=kto.detach(), kto_z0=result.z0.detach())
        if desirable.any():
            out["reward_desirable"] = result.rewards[desirable].mean()
        if (~desirable).any():
            out["reward_undesirable"] = result.rewards[~desirable].mean()
    out["loss"] = combine_losses(HybridLossWeights(cfg.kl_weight, cfg.kto_weight), kl, kto)
    return out


class Readout(NamedTuple):
    """Per prompt: the class distribution a readout gives (renormalised over the classes), and `mass`,
    the probability the model puts on the classes at all before renormalising (low: its answers
    mostly match no class, which the renormalised distribution hides)."""

    probs: torch.Tensor
    mass: torch.Tensor


@torch.no_grad()
def steering_readout(model, prompts: list[list[int]], steering_token_ids: list[int], pad_id: int, batch_size: int = 16) -> Readout:
    """P(steering id | prompt), renormalised over the ids: the distribution inference samples from."""
    probs, mass = [], []
    for start in range(0, len(prompts), batch_size):
        logits = encode_prompts(model, prompts[start : start + batch_size], pad_id).last_logits
        ids = logits[:, steering_token_ids]
        probs.append(torch.softmax(ids, dim=-1))
        mass.append((ids.float().logsumexp(-1) - logits.float().logsumexp(-1)).exp())
    return Readout(torch.cat(probs), torch.cat(mass))


def dpo_step_loss(scorer, pairs, cfg) -> dict:
    """DPO on preference pairs whose reference log-probs were computed once before training."""
    from distalign_ray.losses import dpo_loss

    prompts = [p.prompt_ids for p in pairs]
    _, token_logps, _ = scorer(prompts + prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs])
    logps = token_logps.sum(-1)
    rows = len(pairs)
    loss, margins = dpo_loss(
        logps[:rows],
        logps[rows:],
        torch.tensor([p.reference_chosen for p in pairs], device=logps.device),
        torch.tensor([p.reference_rejected for p in pairs], device=logps.device),
        beta=cfg.beta,
    )
    return {"loss": loss, "dpo": loss.detach(), "reward_margin": margins.mean(), "accuracy": (margins > 0).float().mean()}


@torch.no_grad()
def forced_choice_readout(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> Readout:
    """P(class k | prompt) proportional to P(answer k | prompt), for unsteered models."""
    k = len(answers)
    scores = score_completions(model, [p for p in prompts for _ in range(k)], answers * len(prompts), pad_id)
    logps = scores.token_logps.sum(-1).view(len(prompts), k)
    return Readout(torch.softmax(logps, dim=-1), logps.float().exp().sum(-1))
