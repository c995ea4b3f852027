"""Negative log-likelihood of the desirable completions, in the two reductions the paper's runs used.

- `example` (stage 1 of the steering methods, the paper's `average_log_prob=True`): the mean over
  examples of each example's token mean.
- `token` (the IFT baseline, as ms-swift/transformers train it): the mean over every completion token
  of the batch. Only this one is the maximum-likelihood fit of the answers' class shares when answers
  differ in length: the example mean weighs an answer's first token by 1/length, so its optimum puts
  probability on a class in proportion to share/length (race-us-even: "White" against "Native
  Hawaiian or Other Pacific Islander").
"""

from typing import Literal

import torch

Reduction = Literal["example", "token"]


def sft_loss(token_logps: torch.Tensor, completion_mask: torch.Tensor, reduction: Reduction = "example") -> torch.Tensor:
    """`token_logps`, `completion_mask`: `[B, T]`."""
    mask = completion_mask.to(token_logps.dtype)
    if reduction == "token":
        return -(token_logps * mask).sum() / mask.sum().clamp_min(1)
    per_example = (token_logps * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return -per_example.mean()
