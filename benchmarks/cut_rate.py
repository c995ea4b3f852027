"""How many answers a `max_new_tokens` budget cuts: the untrained baselines at a large budget, then
the share of answers that would be cut at each smaller one (an answer is cut at B when it needs B or
more new tokens, or never ended within the large budget). Chooses `compare`'s budget.

Prints a table (not a test). Runs real estimates (MLflow runs in the project store) with the default
engine, the comparison's decoding settings and seed.

Usage: python benchmarks/cut_rate.py [--dataset gender-uk-real] [--contexts 6] [--samples 40] [--max-new-tokens 384]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

BUDGETS = (12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def cut_rates(tokens: np.ndarray, cut: np.ndarray, largest: int) -> dict[int, float]:
    """Share of answers cut at each budget up to `largest`, from their token counts and whether `largest` cut them."""
    needed = np.where(cut, np.iinfo(np.int64).max, tokens)
    return {b: float((needed >= b).mean()) for b in BUDGETS if b <= largest}


def main() -> None:
    from transformers import AutoTokenizer

    from distalign_ray.config import EstimateConfig
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.estimate import run_estimate
    from distalign_ray.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="gender-uk-real")
    parser.add_argument("--contexts", type=int, default=6)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    args = parser.parse_args()

    spec = load_dataset(args.dataset)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    table = {}
    for method, prompt_engineering in (("zero-shot", False), ("prompt-engineering", True)):
        cfg = EstimateConfig(
            max_contexts=args.contexts,
            samples_per_context=args.samples,
            max_new_tokens=args.max_new_tokens,
            prompt_engineering=prompt_engineering,
        )
        result = run_estimate(spec, cfg, tags={"benchmark": "cut_rate"})
        samples = pd.read_parquet(result.samples_path)
        tokens = np.array([len(tokenizer(t, add_special_tokens=False).input_ids) for t in samples["text"]])
        table[method] = cut_rates(tokens, samples["cut"].to_numpy(), args.max_new_tokens)
        table[method]["mean tokens"] = float(np.minimum(tokens, args.max_new_tokens).mean())
        table[method]["MAE"] = result.report.mae
    print(f"{args.dataset}, {args.contexts} contexts x {args.samples} samples, T=1; share of answers cut at each max_new_tokens")
    print("| max_new_tokens | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for key in next(iter(table.values())):
        cells = [f"{v[key]:.1%}" if isinstance(key, int) else f"{v[key]:.3f}" for v in table.values()]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
