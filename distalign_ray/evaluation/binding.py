"""The binding check: after training, does every steering id give its own class's answer, and stop there?

For every training prompt and every steering id j the model decodes greedily after `prompt + id j`:
- binding accuracy of class j: the share of prompts whose greedy answer is classified as class j;
- EOS rate: the share of (prompt, id) whose greedy answer is exactly the training answer of the id's
  class followed by EOS (the answer ends where the training answers end);
- answer probability of class j: the mean over prompts of P(training answer + EOS | prompt, id j), the
  share of temperature-1 samples that give exactly the trained answer (greedy can be right while
  sampling still wanders off: "On foot" greedy, "On the bus" in 45% of samples);
- the steering readout (P(id | prompt), renormalised over the ids) against the targets.
An adapter whose ids are not bound to their answers samples the calibrated id and then says anything:
its distribution is not the target's, whatever its readout says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distalign_ray.data.specs import DistributionSpec
from distalign_ray.data.steering import answer_ids
from distalign_ray.evaluation.classify import LexicalClassifier
from distalign_ray.scoring import model_device, score_completions

BINDING_THRESHOLD = 0.95
ANSWER_PROBABILITY_THRESHOLD = 0.8


@dataclass
class BindingReport:
    categories: list[str]
    correct: list[int]  # per class: prompts whose greedy answer after the class's id is that class
    exact: list[int]  # per class: greedy answer == the training answer + EOS
    prompts: int  # prompts checked (each with every id)
    answer_prob: list[float]  # per class: sum over prompts of P(training answer + EOS | prompt, id)
    examples: dict[str, list[str]] = field(default_factory=dict)  # class -> a few greedy answers

    @property
    def accuracy(self) -> list[float]:
        return [c / max(1, self.prompts) for c in self.correct]

    @property
    def answer_probability(self) -> list[float]:
        return [p / max(1, self.prompts) for p in self.answer_prob]

    @property
    def eos_rate(self) -> float:
        return sum(self.exact) / max(1, self.prompts * len(self.categories))

    def metrics(self) -> dict[str, float]:
        out = {
            "binding_accuracy_min": min(self.accuracy),
            "binding_answer_prob_min": min(self.answer_probability),
            "binding_eos_rate": self.eos_rate,
        }
        out.update({f"binding_accuracy/{c}": a for c, a in zip(self.categories, self.accuracy)})
        out.update({f"binding_answer_prob/{c}": p for c, p in zip(self.categories, self.answer_probability)})
        return out

    def passed(self, threshold: float = BINDING_THRESHOLD, answer_threshold: float = ANSWER_PROBABILITY_THRESHOLD) -> bool:
        return min(self.accuracy) >= threshold and min(self.answer_probability) >= answer_threshold


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], steering_ids: list[int], max_new_tokens: int, batch_prompts: int = 16):
    """Greedy continuations (token ids, up to and including EOS) of every prompt after every id:
    result[p][j]."""
    device = model_device(model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[list[list[int]]] = []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        rows = [list(p) + [j] for p in chunk for j in steering_ids]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        )[:, width:].tolist()
        for p in range(len(chunk)):
            answers = []
            for j in range(len(steering_ids)):
                tokens = generated[p * len(steering_ids) + j]
                answers.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
            out.append(answers)
    return out


@torch.no_grad()
def exact_answer_probs(
    model, pad_id: int, prompts: list[list[int]], steering_ids: list[int], answers: list[list[int]], batch_prompts: int = 16
):
    """[prompts, K]: P(answers[j] | prompt, id j), teacher-forced (the id itself is given, not scored)."""
    k = len(steering_ids)
    rows = []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        scores = score_completions(
            model, [p for p in chunk for _ in range(k)], [[steering_ids[j], *answers[j]] for _ in chunk for j in range(k)], pad_id
        )
        logps = (scores.token_logps.float() * scores.completion_mask)[:, 1:].sum(-1)
        rows.append(logps.exp().view(len(chunk), k))
    return torch.cat(rows) if rows else torch.zeros(0, k)


def binding_check(model, tokenizer, spec: DistributionSpec, steering_ids: list[int], prompts: list[list[int]]) -> BindingReport:
    """Check every prompt with every steering id (see the module docstring)."""
    classifier = LexicalClassifier(spec.categories, spec.match_terms())
    answers = [answer_ids(tokenizer, spec.answers[c]) for c in spec.categories]  # each ends with EOS
    was_training = model.training
    model.eval()
    greedy = greedy_answers(model, tokenizer, prompts, steering_ids, max(len(a) for a in answers) + 2)
    probs = exact_answer_probs(model, tokenizer.pad_token_id, prompts, steering_ids, answers)
    model.train(was_training)
    k = len(spec.categories)
    correct, exact, examples = [0] * k, [0] * k, {c: [] for c in spec.categories}
    for per_prompt in greedy:
        for j, tokens in enumerate(per_prompt):
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            correct[j] += classifier(text) == j
            exact[j] += tokens == answers[j]
            if len(examples[spec.categories[j]]) < 3 and text not in examples[spec.categories[j]]:
                examples[spec.categories[j]].append(text)
    answer_prob = probs.sum(0).tolist() if len(prompts) else [0.0] * k
    return BindingReport(list(spec.categories), correct, exact, len(prompts), answer_prob, examples)


def failure_message(
    report: BindingReport, threshold: float = BINDING_THRESHOLD, answer_threshold: float = ANSWER_PROBABILITY_THRESHOLD
) -> str:
    """One line: which ids are not bound, what they say instead, and what to change."""
    weak = [
        f"id {k} ({c}) gives '{c}' greedily in {a:.0%} of prompts (e.g. {report.examples.get(c, [''])[:2]}) "
        f"and its trained answer in {p:.0%} of samples"
        for k, (c, a, p) in enumerate(zip(report.categories, report.accuracy, report.answer_probability))
        if a < threshold or p < answer_threshold
    ]
    return (
        f"binding check failed (thresholds: greedy {threshold:.0%}, sampled {answer_threshold:.0%}): "
        + "; ".join(weak)
        + f"; answers end where trained in {report.eos_rate:.0%}. The adapter's samples will not follow the "
        "target: train longer (finetune.min_sft_views, finetune.min_sft_steps, finetune.min_steps), use a smaller finetune.prompts_per_batch, "
        "or give shorter answers in the spec's `answers`"
    )


def summary_line(report: BindingReport) -> str:
    """What a run prints after training."""
    per_class = ", ".join(f"{c} {a:.0%}/{p:.0%}" for c, a, p in zip(report.categories, report.accuracy, report.answer_probability))
    return (
        f"binding check on {report.prompts} prompts (greedy/sampled answer of each id's class): {per_class}; "
        f"greedy answers end as trained {report.eos_rate:.0%}"
    )
