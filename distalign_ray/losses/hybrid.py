"""The hybrid objective and its ablations: total = kl_weight * KL + kto_weight * KTO."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HybridLossWeights:
    kl_weight: float = 1.0
    kto_weight: float = 1.0


def combine_losses(weights: HybridLossWeights, kl: torch.Tensor | None, kto: torch.Tensor | None) -> torch.Tensor:
    """The weighted sum of the terms a method has (None: the method leaves that term out)."""
    terms = [w * t for w, t in ((weights.kl_weight, kl), (weights.kto_weight, kto)) if t is not None]
    if not terms:
        raise ValueError("the objective needs the KL term, the KTO term or both")
    return sum(terms[1:], terms[0])
