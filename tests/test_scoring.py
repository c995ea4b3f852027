"""Shared-prompt scoring (left padding, KV-cache reuse) equals scoring each sequence alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from distalign_ray.scoring import score_completions


def _alone(model, prompt, completion):
    logps = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
    return [logps[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion)], logps[len(prompt) - 1]


def test_shared_prompt_scoring_matches_unpadded(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    long, short = [5, 6, 7, 8, 9], [11, 12]
    prompts = [long, short, long, short]
    completions = [[32, 40716, 2], [33, 2], [33, 2], [32]]
    with torch.no_grad():
        scores = score_completions(model, prompts, completions, pad_id=2)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            expected, first = _alone(model, prompt, completion)
            assert scores.token_logps[i, : len(completion)].tolist() == pytest.approx(expected, abs=1e-5)
            assert torch.allclose(scores.first_logits[i].log_softmax(-1), first, atol=1e-5)
    assert scores.token_logps[1, 2].item() == 0.0 and scores.completion_mask[3].tolist() == [1, 0, 0]


def test_gradients_flow_through_the_shared_prompt(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    scores = score_completions(model, [[5, 6, 7]] * 2, [[32, 2], [33, 2]], pad_id=2)
    scores.token_logps.sum().backward()
    # The first layer's attention only sees the answers through the cached prompt keys/values.
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
