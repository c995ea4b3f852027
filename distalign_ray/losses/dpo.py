"""DPO (Rafailov et al., 2023) with TRL's default 'sigmoid' semantics: summed completion log-probs,
loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean loss, per-pair reward margins beta * (chosen - rejected log-ratio), detached)."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(beta * margin)
    return losses.mean(), (beta * margin).detach()
