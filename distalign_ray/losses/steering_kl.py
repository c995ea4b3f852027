"""KL(target || model) over the steering ids at the first response position."""

from __future__ import annotations

from typing import Literal

import torch

Normalization = Literal["steering", "vocab"]


def steering_log_probs(logits: torch.Tensor, steering_token_ids: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Log-probabilities of the K steering ids from first-response-position logits `[B, V]`.

    `steering` renormalises over the K ids (the distribution inference samples from, our default);
    `vocab` uses the full-vocabulary softmax (the paper's variant: it also pushes the ids' total mass to 1).
    """
    logits = logits.float()
    if normalization == "steering":
        return torch.log_softmax(logits[:, steering_token_ids], dim=-1)
    if normalization == "vocab":
        return torch.log_softmax(logits, dim=-1)[:, steering_token_ids]
    raise ValueError(f"unknown steering normalization {normalization!r}")


def steering_kl_loss(
    logits: torch.Tensor,
    steering_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    normalization: Normalization = "steering",
) -> torch.Tensor:
    """Mean over rows of sum_k p_k (log p_k - log q_k); terms with p_k = 0 contribute 0."""
    log_q = steering_log_probs(logits, steering_token_ids, normalization)
    p = target_probs.to(log_q.dtype)
    log_p = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    per_row = (p * (log_p - log_q)).sum(dim=-1)
    return per_row.mean()
