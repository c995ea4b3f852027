"""The transformers engine: the prompt is run once per request and its KV cache shared by all n
samples (and by the readout rows), so one `generate` call draws every sample of a prompt."""

from __future__ import annotations

import copy

import torch

from distalign_ray.generation.base import GenerationEngine, GenerationResult, Request, SamplingSettings, SteeringSetup
from distalign_ray.generation.readout import readout_distribution
from distalign_ray.scoring import EncodedPrompts, encode_prompts, model_device, score_encoded


class HFEngine(GenerationEngine):
    def __init__(self, model, tokenizer, steering: SteeringSetup, sampling: SamplingSettings):
        self.model = model.eval()
        self.device = model_device(model)
        self.tokenizer = tokenizer
        self.steering = steering
        self.sampling = sampling

    def _decoding(self) -> dict:
        if self.sampling.temperature == 0:  # greedy, e.g. for the judge
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "top_k": 0}

    @torch.no_grad()
    def readout(self, prompt: EncodedPrompts, full: bool = True) -> tuple[list[float], list[float] | None]:
        """(class distribution, steering-id distribution or None), see generation/readout.py;
        `full=False` returns ([], the steering-id distribution) without scoring any answer."""
        answers, steered = self.steering.answer_ids, self.steering.steered
        ids = self.steering.token_ids
        id_scores = prompt.last_logits[0, ids].float().cpu().numpy() if steered else None
        answer_logps = None
        if full:
            k = len(answers)
            heads = [[j] for j in ids] if steered else [[]]
            completions = [head + answer for head in heads for answer in answers]
            logps = score_encoded(self.model, prompt, [0] * len(completions), completions, self.tokenizer.pad_token_id).token_logps
            sums = logps[:, 1:].sum(-1).view(k, k) if steered else logps.sum(-1)  # the forced id is not scored
            answer_logps = sums.float().cpu().numpy()
        return readout_distribution(id_scores, answer_logps)

    @torch.no_grad()
    def generate(self, request: Request) -> GenerationResult:
        prompt_ids, n, seed = request.prompt_ids, request.n, request.seed
        prompt = encode_prompts(self.model, [prompt_ids], self.tokenizer.pad_token_id)
        cache = copy.deepcopy(prompt.cache)  # the readout consumes the prompt's own cache
        readout, id_probs = self.readout(prompt, full=request.with_readout)
        if n == 0:  # readout-only request
            return GenerationResult(texts=[], steering_indices=[], readout=readout)
        cache.batch_repeat_interleave(n)
        generator = torch.Generator().manual_seed(seed)
        if self.steering.steered:
            chosen = torch.multinomial(torch.tensor(id_probs), n, replacement=True, generator=generator).tolist()
            inputs = torch.tensor([prompt_ids + [self.steering.token_ids[j]] for j in chosen], device=self.device)  # id = 1st new token
        else:
            chosen = [-1] * n
            inputs = torch.tensor([prompt_ids] * n, device=self.device)
            cache.crop(-1)  # generate needs at least one uncached input token
        # HF sampling draws from the global generator: seed it per request so results do not depend
        # on which actor runs the request or in what order.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        output = self.model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            past_key_values=cache,
            **self._decoding(),
            max_new_tokens=self.sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        new_tokens = output[:, inputs.shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        cut = (~(new_tokens == self.tokenizer.eos_token_id).any(-1)).tolist()
        return GenerationResult(texts=[t.strip() for t in texts], steering_indices=chosen, readout=readout, cut=cut)
