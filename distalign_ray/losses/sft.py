"""Stage-1 SFT: token-averaged negative log-likelihood of the desirable completions."""

import torch


def sft_loss(token_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """`token_logps`, `completion_mask`: `[B, T]`; mean over examples of the per-example token mean."""
    mask = completion_mask.to(token_logps.dtype)
    per_example = (token_logps * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return -per_example.mean()
