"""The readout formula, once for every engine (generation/readout.py)."""

from __future__ import annotations

import numpy as np
import pytest

from distalign_ray.generation.base import SteeringSetup
from distalign_ray.generation.readout import readout_distribution, readout_from_logprobs, readout_queries


def test_steered_readout_mixes_the_binding_by_the_id_probabilities():
    id_probs = np.array([0.25, 0.75])
    binding = np.array([[0.9, 0.1], [0.2, 0.8]])  # [id j, answer c]
    # Logits shifted by a constant and unnormalised answer log-probs give the same distribution.
    classes, ids = readout_distribution(np.log(id_probs) + 3.0, np.log(binding * 0.01))
    assert ids == pytest.approx(id_probs.tolist())
    assert classes == pytest.approx([0.25 * 0.9 + 0.75 * 0.2, 0.25 * 0.1 + 0.75 * 0.8])
    assert readout_distribution(np.log(id_probs), None) == ([], pytest.approx(id_probs.tolist()))


def test_unsteered_readout_is_the_forced_choice():
    classes, ids = readout_distribution(None, np.log([0.02, 0.06]))
    assert classes == pytest.approx([0.25, 0.75]) and ids is None
    assert readout_distribution(None, None) == ([], None)


def test_forced_token_queries_sum_multi_token_answers():
    """Answers of 2 and 1 tokens: each answer's log-prob is the sum over its tokens, per steering id."""
    steering = SteeringSetup(token_ids=[7, 8], answer_ids=[[1, 2], [3]])
    prefixes, tokens = readout_queries([5], steering)
    assert tokens == [7, 8, 1, 2, 3, 1, 2, 3]
    assert prefixes[:2] == [[5], [5]] and prefixes[2:5] == [[5, 7], [5, 7, 1], [5, 7]]
    logprobs = np.log([0.5, 0.5, 0.6, 0.5, 0.1, 0.1, 0.5, 0.9])
    classes, ids = readout_from_logprobs(logprobs, steering)
    binding = np.array([[0.3, 0.1], [0.05, 0.9]])
    binding /= binding.sum(1, keepdims=True)
    assert ids == pytest.approx([0.5, 0.5]) and classes == pytest.approx((np.array([0.5, 0.5]) @ binding).tolist())
