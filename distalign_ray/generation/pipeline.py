"""Repeated generation on a Ray Data actor pool: each actor loads its engine once and serves requests.

A request is one (context, template, chunk) row asking for n samples with its own seed, so the
result does not depend on scheduling, and a retried row replaces (never duplicates) its samples.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from distalign_ray.generation.base import SamplingSettings, SteeringSetup


class EngineActor:
    """Callable class for `map_batches`: holds one engine per actor."""

    def __init__(self, model_ref: dict, adapter: str | None, steering: dict, sampling: dict, engine: str = "hf"):
        import torch

        from distalign_ray.generation.hf_engine import HFEngine
        from distalign_ray.models import ModelRef, load_model, load_tokenizer

        torch.set_num_threads(1)  # one thread per actor: 2-thread small matmuls contend badly on 2 cores
        ref = ModelRef(**model_ref)
        tokenizer = load_tokenizer(ref, adapter)
        model = load_model(ref)
        if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        if engine != "hf":
            raise ValueError(f"unknown engine {engine!r}")
        self.engine = HFEngine(model, tokenizer, SteeringSetup(**steering), SamplingSettings(**sampling))

    def __call__(self, batch: dict) -> dict:
        out = {"texts": [], "steering_indices": [], "readout": []}
        for prompt_ids, n, seed in zip(batch["prompt_ids"], batch["n"], batch["seed"]):
            result = self.engine.generate([int(t) for t in prompt_ids], int(n), int(seed))
            out["texts"].append(result.texts)
            out["steering_indices"].append(result.steering_indices)
            out["readout"].append(result.readout)
        keep = {k: v for k, v in batch.items() if k != "prompt_ids"}
        return {**keep, **out}


def run_requests(
    requests: list[dict],
    model_ref: dict,
    adapter: str | None,
    steering: SteeringSetup,
    sampling: SamplingSettings,
    num_actors: int,
    cpus_per_actor: float,
    engine: str = "hf",
) -> list[dict]:
    """Run every request (keys: request_id, prompt_ids, n, seed, plus any labels) on an actor pool."""
    import ray

    dataset = ray.data.from_items(requests, override_num_blocks=max(1, min(len(requests), 4 * num_actors)))
    results = dataset.map_batches(
        EngineActor,
        fn_constructor_kwargs={
            "model_ref": model_ref,
            "adapter": adapter,
            "steering": asdict(steering),
            "sampling": asdict(sampling),
            "engine": engine,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=1,
        num_cpus=cpus_per_actor,
        batch_format="numpy",
    )
    rows = results.take_all()
    return sorted(rows, key=lambda r: int(r["request_id"]))
