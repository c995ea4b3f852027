"""The transformers engine: batched sampling, all n samples of a prompt in one `generate` call."""

from __future__ import annotations

import torch

from distalign_ray.generation.base import GenerationEngine, GenerationResult, SamplingSettings, SteeringSetup
from distalign_ray.scoring import collate_completions, score_completions


class HFEngine(GenerationEngine):
    def __init__(self, model, tokenizer, steering: SteeringSetup, sampling: SamplingSettings):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.steering = steering
        self.sampling = sampling

    @torch.no_grad()
    def readout(self, prompt_ids: list[int]) -> tuple[list[float], list[float] | None]:
        """(class distribution, steering-id distribution or None), from token probabilities only.

        Steered: P(class k) = sum_j P(id j) * P(answer k | id j), the binding normalised over the K
        answers. Unsteered: forced choice, P(class k) proportional to P(answer k | prompt).
        """
        answers = self.steering.answer_ids
        k = len(answers)
        pad = self.tokenizer.pad_token_id
        if self.steering.steered:
            ids = self.steering.token_ids
            completions = [[ids[j]] + answers[c] for j in range(k) for c in range(k)]
            scores = score_completions(self.model, collate_completions([prompt_ids] * len(completions), completions, pad))
            id_probs = torch.softmax(scores.first_logits[0, ids], dim=-1)
            answer_logps = scores.token_logps[:, 1:].sum(-1).view(k, k)  # [id j, answer c]
            binding = torch.softmax(answer_logps, dim=-1)
            return (id_probs @ binding).tolist(), id_probs.tolist()
        scores = score_completions(self.model, collate_completions([prompt_ids] * k, answers, pad))
        return torch.softmax(scores.token_logps.sum(-1), dim=-1).tolist(), None

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], n: int, seed: int) -> GenerationResult:
        readout, id_probs = self.readout(prompt_ids)
        if n == 0:  # readout-only request
            return GenerationResult(texts=[], steering_indices=[], readout=readout)
        generator = torch.Generator().manual_seed(seed)
        if self.steering.steered:
            chosen = torch.multinomial(torch.tensor(id_probs), n, replacement=True, generator=generator).tolist()
            inputs = torch.tensor([prompt_ids + [self.steering.token_ids[j]] for j in chosen])
        else:
            chosen = [-1] * n
            inputs = torch.tensor([prompt_ids] * n)
        # HF sampling draws from the global generator: seed it per request so results do not depend
        # on which actor runs the request or in what order.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        output = self.model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            do_sample=True,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            top_k=0,
            max_new_tokens=self.sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        texts = self.tokenizer.batch_decode(output[:, inputs.shape[1] :], skip_special_tokens=True)
        return GenerationResult(texts=[t.strip() for t in texts], steering_indices=chosen, readout=readout)
