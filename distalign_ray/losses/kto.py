"""KTO (Ethayarajh et al., 2024) with TRL's semantics.

Rewards are summed completion log-prob ratios; the reference point z0 is the mean log-ratio of
mismatched (prompt, completion) pairs, detached and clamped at 0; the loss is the mean over all
examples of the weighted per-example losses (`balance="rows"`), or, with `balance="pairs"`, the mean of
the desirable rows' mean and the undesirable rows' mean: the weighting of the paper's batches, which hold
one (desirable, undesirable) pair per data row. The two agree whenever a batch has as many desirable as
undesirable rows (K = 2); with K >= 3 steering classes a batch holds K - 1 undesirable rows per
desirable one, and the plain mean lets them outweigh the binding (issue 11's collapse).
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
    balance: str = "rows",
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
    if balance == "pairs" and desirable.any() and (~desirable).any():
        loss = 0.5 * (per_example[desirable].mean() + per_example[~desirable].mean())
    elif balance in ("rows", "pairs"):
        loss = per_example.mean()
    else:
        raise ValueError(f"unknown KTO balance {balance!r}; choose rows or pairs")
    return KTOOutput(loss=loss, per_example=per_example, z0=z0, rewards=beta * log_ratio.detach())
