"""The readout: a model's class distribution from token probabilities alone (no sampling), one
formula for every engine.

Steered: P(class c) = sum_j P(id j) * P(answer c | id j), with P(id j) the model's probabilities
renormalised over the K steering ids and the binding P(answer c | id j) normalised over the K
answers. Unsteered: forced choice, P(class c) proportional to P(answer c | prompt).

The transformers engine scores the answers from a shared KV cache; vLLM scores them as forced-token
queries (`readout_queries`); both hand their log-probs to `readout_distribution`.
"""

from __future__ import annotations

import numpy as np

from distalign_ray.generation.base import SteeringSetup


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def readout_distribution(id_scores: np.ndarray | None, answer_logps: np.ndarray | None) -> tuple[list[float], list[float] | None]:
    """(class distribution, steering-id distribution or None).

    `id_scores`: the K steering ids' logits or log-probs after the prompt (None: unsteered model).
    `answer_logps`: log P(answer c | prompt + id j) as a [j, c] table (steered) or log P(answer c |
    prompt) (unsteered); None when only the steering-id distribution is wanted (class list empty)."""
    id_probs = None if id_scores is None else softmax(np.asarray(id_scores, dtype=np.float64))
    if answer_logps is None:
        return [], None if id_probs is None else id_probs.tolist()
    answer_logps = np.asarray(answer_logps, dtype=np.float64)
    if id_probs is None:
        return softmax(answer_logps).tolist(), None
    return (id_probs @ softmax(answer_logps, axis=1)).tolist(), id_probs.tolist()


def readout_queries(prompt_ids: list[int], steering: SteeringSetup, full: bool = True) -> tuple[list[list[int]], list[int]]:
    """The forced-token queries of the readout: (prefixes, token forced after each prefix).

    Steered: the K steering ids after the prompt, then every answer token after prompt + id j +
    the answer's earlier tokens (K x K answers). Unsteered: every answer token after the prompt.
    `full=False`: only the steering-id queries (what steered sampling needs).
    """
    answers = steering.answer_ids
    prefixes, tokens = [], []
    if steering.steered:
        prefixes += [prompt_ids] * len(steering.token_ids)
        tokens += list(steering.token_ids)
    if not full:
        return prefixes, tokens
    heads = [prompt_ids + [j] for j in steering.token_ids] if steering.steered else [prompt_ids]
    for head in heads:
        for answer in answers:
            for t, token in enumerate(answer):
                prefixes.append(head + answer[:t])
                tokens.append(token)
    return prefixes, tokens


def readout_from_logprobs(logprobs: np.ndarray, steering: SteeringSetup, full: bool = True) -> tuple[list[float], list[float] | None]:
    """The readout from the log-probs of the `readout_queries` (in their order)."""
    k = len(steering.answer_ids)
    id_scores, token_logps = (logprobs[:k], logprobs[k:]) if steering.steered else (None, logprobs)
    answer_logps = None
    if full:
        lengths = [len(a) for a in steering.answer_ids] * (k if steering.steered else 1)
        answer_logps = np.add.reduceat(token_logps, np.cumsum([0] + lengths)[:-1])
        if steering.steered:
            answer_logps = answer_logps.reshape(k, k)
    return readout_distribution(id_scores, answer_logps)
