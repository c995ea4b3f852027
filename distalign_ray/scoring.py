"""Score completions under a causal LM, running each distinct prompt once.

Rows that share a prompt (a prompt's K x K steering examples, a request's n samples, the readout's
answer choices) share its KV cache: the prompts are encoded once (left-padded to a common end), then
only the few completion tokens of every row are run against the cached prompt. Gradients flow
through the cache, so training uses the same path. This is what makes training and generation
affordable on CPUs: prompts are ~60 tokens, completions 2-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodedPrompts:
    last_logits: torch.Tensor  # [U, V] logits at each prompt's last position (predict the 1st completion token)
    cache: object  # KV cache of the U prompts
    attention_mask: torch.Tensor  # [U, P] 0 on left padding
    lengths: torch.Tensor  # [U] real prompt lengths


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def encode_prompts(model, prompts: list[list[int]], pad_id: int) -> EncodedPrompts:
    width = max(len(p) for p in prompts)
    device = model_device(model)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return EncodedPrompts(
        last_logits=out.logits[:, -1].float(),
        cache=out.past_key_values,
        attention_mask=mask,
        lengths=mask.sum(-1),
    )


@dataclass
class CompletionScores:
    first_logits: torch.Tensor  # [R, V] logits at the last prompt position of each row
    token_logps: torch.Tensor  # [R, C] log p(completion_t | prompt, completion_<t), 0 on padding
    completion_mask: torch.Tensor  # [R, C]


def score_encoded(model, encoded: EncodedPrompts, row_prompt: list[int], completions: list[list[int]], pad_id: int) -> CompletionScores:
    """Score `completions[r]` after prompt `row_prompt[r]`. Consumes `encoded.cache`."""
    device = encoded.last_logits.device
    index = torch.tensor(row_prompt, device=device)
    width = max(1, max(len(c) for c in completions))
    ids = torch.tensor([list(c) + [pad_id] * (width - len(c)) for c in completions], device=device)
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions], device=device)
    first_logits = encoded.last_logits[index]
    columns = [torch.log_softmax(first_logits, dim=-1).gather(-1, ids[:, :1])]
    if width > 1:
        cache = encoded.cache
        cache.batch_select_indices(index)
        rows = len(completions)
        attention = torch.cat([encoded.attention_mask[index], torch.ones(rows, width - 1, dtype=torch.long, device=device)], dim=1)
        positions = encoded.lengths[index].unsqueeze(1) + torch.arange(width - 1, device=device).unsqueeze(0)
        out = model(input_ids=ids[:, :-1], attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True)
        columns.append(torch.log_softmax(out.logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1))
    token_logps = torch.cat(columns, dim=1) * completion_mask
    return CompletionScores(first_logits=first_logits, token_logps=token_logps, completion_mask=completion_mask)


def score_completions(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> CompletionScores:
    """Row r = prompts[r] followed by completions[r]; identical prompts are encoded once."""
    unique: dict[tuple[int, ...], int] = {}
    row_prompt = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    encoded = encode_prompts(model, [list(p) for p in unique], pad_id)
    return score_encoded(model, encoded, row_prompt, completions, pad_id)


class CompletionScorer(torch.nn.Module):
    """`score_completions` as one module call, so data-parallel wrappers (DDP) see a single forward
    per loss even though the prompt and the completions are two model passes."""

    def __init__(self, model, pad_id: int):
        super().__init__()
        self.model = model
        self.pad_id = pad_id

    def forward(self, prompts: list[list[int]], completions: list[list[int]]):
        scores = score_completions(self.model, prompts, completions, self.pad_id)
        return scores.first_logits, scores.token_logps, scores.completion_mask
