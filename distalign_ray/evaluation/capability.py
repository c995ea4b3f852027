"""Capability retention without downloadable benchmarks: perplexity on a small neutral text set
shipped with the project, and the mean per-token KL(base || fine-tuned) on the same text."""

from __future__ import annotations

import math
from importlib import resources

import torch


def neutral_texts() -> list[str]:
    text = resources.files("distalign_ray.data").joinpath("neutral_text.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.no_grad()
def _token_logprobs(model, tokenizer, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per text: next-token log-distributions [T-1, V] and the actual next tokens [T-1]."""
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        out.append((torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1), ids[0, 1:]))
    return out


@torch.no_grad()
def capability_metrics(model_ref: dict, adapter: str) -> dict[str, float]:
    """{perplexity_base, perplexity_adapted, kl_from_base} on the neutral text set (runs on any node:
    the model is resolved and the adapter fetched from storage where it runs)."""
    from distalign_ray.adapters import adapter_on_this_node
    from distalign_ray.models import load_model, load_tokenizer, model_on_this_node

    ref = model_on_this_node(model_ref)
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, adapter_on_this_node(adapter)).eval()
    texts = neutral_texts()
    with model.disable_adapter():
        base = _token_logprobs(model, tokenizer, texts)
    tuned = _token_logprobs(model, tokenizer, texts)
    nll_base = nll_tuned = kl = 0.0
    tokens = 0
    for (lb, ids), (lt, _) in zip(base, tuned):
        nll_base -= lb.gather(-1, ids[:, None]).sum().item()
        nll_tuned -= lt.gather(-1, ids[:, None]).sum().item()
        kl += (lb.exp() * (lb - lt)).sum().item()
        tokens += ids.numel()
    return {
        "perplexity_base": math.exp(nll_base / tokens),
        "perplexity_adapted": math.exp(nll_tuned / tokens),
        "kl_from_base": kl / tokens,
    }


def lm_eval_hook(model_path: str, adapter: str, tasks: list[str]) -> dict[str, float]:
    """Optional: run `lm-eval` tasks when the package and its data sets are available locally."""
    try:
        import lm_eval
    except ImportError:
        return {}
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path},peft={adapter}", tasks=tasks)
    flat = {}
    for task, values in results.get("results", {}).items():
        for name, value in values.items():
            if isinstance(value, (int, float)):
                flat[f"lm_eval/{task}/{name.split(',')[0]}"] = float(value)
    return flat
