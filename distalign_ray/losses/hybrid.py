"""The hybrid objective and its ablations: total = kl_weight * KL + kto_weight * KTO."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# mode -> (uses steering KL, uses KTO)
LOSS_MODES: dict[str, tuple[bool, bool]] = {
    "hybrid": (True, True),
    "kl_only": (True, False),
    "kto_only": (False, True),
}


@dataclass(frozen=True)
class HybridLossWeights:
    kl_weight: float = 1.0
    kto_weight: float = 1.0


def combine_losses(mode: str, weights: HybridLossWeights, kl: torch.Tensor | None, kto: torch.Tensor | None) -> torch.Tensor:
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; choose from {sorted(LOSS_MODES)}")
    use_kl, use_kto = LOSS_MODES[mode]
    total = None
    if use_kl:
        total = weights.kl_weight * kl
    if use_kto:
        term = weights.kto_weight * kto
        total = term if total is None else total + term
    return total
