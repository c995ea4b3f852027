"""KTO (Ethayarajh et al., 2024) with TRL's semantics.

Rewards are summed completion log-prob ratios; the reference point z0 is the mean log-ratio of
mismatched (prompt, completion) pairs, detached and clamped at 0; the loss is the mean over all
examples of the weighted per-example losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KTOOutput:
    loss: torch.Tensor
    per_example: torch.Tensor
    z0: torch.Tensor
    rewards: torch.Tensor


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_mismatched_logps: torch.Tensor,
    reference_mismatched_logps: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    z0_reduce=None,
) -> KTOOutput:
    """All log-prob tensors are `[B]` sums over completion tokens; `desirable` is a bool `[B]`.

    `z0_reduce` averages z0 across data-parallel workers (TRL gathers it); it receives the local mean.
    """
    with torch.no_grad():
        z0 = (policy_mismatched_logps - reference_mismatched_logps).mean()
        if z0_reduce is not None:
            z0 = z0_reduce(z0)
        z0 = z0.clamp(min=0)
    log_ratio = policy_logps - reference_logps
    desirable = desirable.bool()
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio)))
    per_example = torch.where(desirable, desirable_losses, undesirable_losses)
    return KTOOutput(loss=per_example.mean(), per_example=per_example, z0=z0, rewards=beta * log_ratio.detach())
