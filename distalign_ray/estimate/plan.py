"""Planning an estimate: validation, the engine and its layout, and one seeded request per chunk of
samples of each (context, template) prompt. No model weights are loaded here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distalign_ray.config import EstimateConfig
from distalign_ray.data.prompts import build_prompts, chat_prompt_ids, known_template_ids
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.errors import DistalignError
from distalign_ray.generation.base import SteeringSetup
from distalign_ray.generation.vllm_engine import choose_engine
from distalign_ray.models import ModelRef, load_tokenizer, resolve_model
from distalign_ray.storage import normalize


@dataclass
class EstimatePlan:
    spec: DistributionSpec
    cfg: EstimateConfig
    model_ref: ModelRef
    steering: SteeringSetup
    method: str
    requests: list[dict]
    engine: str  # resolved: "vllm" or "hf"


def _request_seed(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def plan_estimate(spec: DistributionSpec, cfg: EstimateConfig) -> EstimatePlan:
    """All validation and request building; no model weights are loaded here."""
    spec = spec.subset(cfg.max_contexts)
    if cfg.task == "story" and cfg.estimator == "readout":
        raise DistalignError("the readout estimator is available for the attribute task only")
    if cfg.task == "story" and cfg.story_classifier_for(spec.attribute) == "lexical" and spec.attribute != "gender":
        raise DistalignError(f"the lexical story classifier handles gender only; use story_classifier=judge for {spec.attribute}")
    model_ref = resolve_model(cfg.model)
    engine = choose_engine(cfg.engine, model_ref.path, on_gpu=cfg.gpus_per_actor > 0)
    tokenizer = load_tokenizer(model_ref)
    answer_ids = [tokenizer(spec.answers[c], add_special_tokens=False)["input_ids"] for c in spec.categories]
    if cfg.adapter:
        from distalign_ray.adapters import adapter_on_this_node, read_adapter_meta

        cfg = cfg.model_copy(update={"adapter": normalize(cfg.adapter)})
        meta = read_adapter_meta(cfg.adapter)
        if meta["categories"] != spec.categories:
            raise DistalignError(f"adapter was trained for categories {meta['categories']}, the spec has {spec.categories}")
        if engine == "vllm" and cfg.vllm_lora == "lora" and meta.get("added_special_tokens"):
            raise DistalignError("this adapter added steering tokens; vLLM serves it merged only (vllm_lora: merge or auto)")
        tokenizer = load_tokenizer(model_ref, adapter_on_this_node(cfg.adapter))
        steering = SteeringSetup(token_ids=list(meta["steering_token_ids"]) or None, answer_ids=answer_ids)
        method = meta.get("loss_mode", "adapter")
    else:
        steering = SteeringSetup(token_ids=None, answer_ids=answer_ids)
        method = "prompt-engineering" if cfg.prompt_engineering else "zero-shot"
    total = cfg.samples_per_context or spec.samples_per_context
    requests = []
    prompts = build_prompts(spec, cfg.task, cfg.templates, state_target=cfg.prompt_engineering)
    per_context_templates = len(prompts) // len(spec.contexts)
    # A template's seeds depend on which template it is, not on the others estimated beside it: one run
    # per template (the comparison's cells) then draws each template's samples independently.
    template_numbers = {t: i for i, t in enumerate(known_template_ids(spec, cfg.task))}
    for prompt_index, row in enumerate(prompts):
        prompt_ids = chat_prompt_ids(tokenizer, row)
        template_position = prompt_index % per_context_templates
        n_here = split_evenly(total, per_context_templates)[template_position]
        chunks = split_evenly(n_here, max(1, -(-n_here // cfg.samples_per_request))) if cfg.estimator == "sample" else [0]
        for chunk_index, n in enumerate(chunks):
            requests.append(
                {
                    "request_id": len(requests),
                    "context_index": row.context_index,
                    "context": row.context,
                    "template": row.template,
                    "chunk": chunk_index,
                    "prompt_ids": prompt_ids,
                    "n": n,
                    "seed": _request_seed(cfg.seed, row.context_index, template_numbers[row.template], chunk_index),
                    "with_readout": chunk_index == 0,  # one readout per (context, template)
                }
            )
    return EstimatePlan(spec=spec, cfg=cfg, model_ref=model_ref, steering=steering, method=method, requests=requests, engine=engine)


def engine_options(cfg: EstimateConfig, engine: str) -> dict:
    from distalign_ray.cluster import largest_node_cpus

    num_actors, cpus = cfg.actor_layout(engine, largest_node_cpus())
    return {
        "engine": engine,
        "num_actors": num_actors,
        "cpus_per_actor": cpus,
        "gpus_per_actor": cfg.gpus_per_actor,
        "seed": cfg.seed,
        "vllm_lora": cfg.vllm_lora,
        "vllm_backend": "actor" if cfg.vllm_backend == "auto" else cfg.vllm_backend,
    }
