"""Training throughput of the hybrid (KL + KTO) step on the embedded model (prints numbers; not a test).

Compares our step (each prompt encoded once per step, its K x K answers scored against its KV
cache, the KL read from the same pass; KTO's reference log-probs computed once per stage, before
timing) with the same losses computed row by row over full sequences, as the reference code does.
Tokens/s counts every prompt and answer token of the batch's rows, i.e. the work the row-by-row way
really does.

Usage: python benchmarks/training.py [--steps 3] [--prompts-per-batch 4]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from distalign_ray.config import FinetuneConfig
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.data.steering import build_steering_examples, prepare_steering_vocab
    from distalign_ray.models import load_model, load_tokenizer, resolve_model
    from distalign_ray.scoring import CompletionScorer
    from distalign_ray.training.loop import build_lora
    from distalign_ray.training.objective import fill_kto_reference, hybrid_step_loss
    from distalign_ray.training.stages import group_by_prompt

    cfg = FinetuneConfig()
    spec = load_dataset("gender-uk-real")
    ref = resolve_model(cfg.model)
    tokenizer = load_tokenizer(ref)
    vocab = prepare_steering_vocab(tokenizer, spec)
    model = build_lora(load_model(ref), cfg, None)
    groups = group_by_prompt(build_steering_examples(spec, tokenizer, vocab))
    batch = [e for g in groups[: args.prompts_per_batch] for e in g]
    tokens = sum(len(e.prompt_ids) + 1 + len(e.answer_ids) for e in batch)
    shared = CompletionScorer(model, tokenizer.pad_token_id)
    fill_kto_reference(shared, batch, vocab.token_ids, cfg)  # once per stage in training, not per step

    class RowByRow(torch.nn.Module):
        """The same scores, one full sequence per row: no prompt reuse."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, prompts, completions):
            parts = [shared(p_, [c]) for p_, c in zip([[p] for p in prompts], completions)]
            width = max(p[1].shape[1] for p in parts)
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
            return (torch.cat([p[0] for p in parts]), torch.cat([pad(p[1]) for p in parts]), torch.cat([pad(p[2]) for p in parts]))

    def time_steps(scorer) -> float:
        hybrid_step_loss(scorer, batch, vocab.token_ids, cfg)["loss"].backward()  # warm-up
        start = time.time()
        for _ in range(args.steps):
            model.zero_grad()
            hybrid_step_loss(scorer, batch, vocab.token_ids, cfg)["loss"].backward()
        return (time.time() - start) / args.steps

    ours, naive = time_steps(shared), time_steps(RowByRow())
    print(f"batch: {args.prompts_per_batch} prompts, {len(batch)} rows, {tokens} row tokens")
    print(f"{'way':48s} {'s/step':>8s} {'tokens/s':>10s}")
    print(f"{'row by row, full sequences (reference style)':48s} {naive:8.2f} {tokens / naive:10.0f}")
    print(f"{'shared prompt encoding (ours)':48s} {ours:8.2f} {tokens / ours:10.0f}   {naive / ours:.1f}x")


if __name__ == "__main__":
    main()
