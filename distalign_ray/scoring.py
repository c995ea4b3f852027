"""Score completions under a causal LM with one forward pass per batch.

Layout: prompts left-padded to a common end column P, completions right-padded after it. The logits
needed by every loss and by the readout estimator (the first-response position, which predicts the
steering id, and each completion position) are then the last C+1 columns, so the vocabulary
projection runs only there (`logits_to_keep`), not at every prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompletionBatch:
    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    position_ids: torch.Tensor  # [B, P + C]
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C], 1 on real completion tokens

    @property
    def completion_length(self) -> int:
        return self.completion_ids.shape[1]


def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> CompletionBatch:
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    prompt_len = max(len(p) for p in prompts)
    completion_len = max(1, max(len(c) for c in completions))
    rows, masks, comp, comp_mask = [], [], [], []
    for prompt, completion in zip(prompts, completions):
        left = prompt_len - len(prompt)
        right = completion_len - len(completion)
        rows.append([pad_id] * left + list(prompt) + list(completion) + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        comp.append(list(completion) + [pad_id] * right)
        comp_mask.append([1] * len(completion) + [0] * right)
    attention = torch.tensor(masks, dtype=torch.long)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    return CompletionBatch(
        input_ids=torch.tensor(rows, dtype=torch.long),
        attention_mask=attention,
        position_ids=positions,
        completion_ids=torch.tensor(comp, dtype=torch.long),
        completion_mask=torch.tensor(comp_mask, dtype=torch.long),
    )


@dataclass
class CompletionScores:
    first_logits: torch.Tensor  # [B, V] logits at the last prompt position (predict completion[0])
    token_logps: torch.Tensor  # [B, C] log p(completion_t | ...), 0 on padding


def score_completions(model, batch: CompletionBatch) -> CompletionScores:
    """One forward pass; gradients flow if the caller has them enabled."""
    c = batch.completion_length
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=c + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()  # columns P-1 .. P+C-2 predict completion tokens 0..C-1
    logps = torch.log_softmax(logits, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    logps = logps * batch.completion_mask.to(logps.dtype)
    return CompletionScores(first_logits=logits[:, 0, :], token_logps=logps)
