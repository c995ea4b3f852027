"""Training data of the baselines: IFT answers in the target proportions, and DPO preference pairs.

Neither uses a steering token: these are the methods the paper shows fail to calibrate. Each context
gets a fixed number of answers (the paper's IFT file: ~100 per occupation) whose class counts follow
its target by largest remainder, so they match it as closely as an integer count allows, dealt in
turn over the context's templates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from distalign_ray.data.prompts import PromptRow, build_prompts, chat_prompt_ids
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.data.steering import TrainingExample, answer_ids


def proportional_counts(target: list[float], total: int) -> list[int]:
    """Integer counts summing to `total`, as close to `total * target` as possible."""
    raw = [p * total for p in target]
    counts = [int(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda k: raw[k] - counts[k], reverse=True)
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def answers_by_context(spec: DistributionSpec, per_context: int, templates: list[str] | None) -> Iterator[tuple[PromptRow, int]]:
    """(prompt row, class index): per context `per_context` answers in its target proportions, dealt in
    turn over its attribute templates."""
    rows = build_prompts(spec, "attribute", templates)
    for index in range(len(spec.contexts)):
        mine = [row for row in rows if row.context_index == index]
        classes = [k for k, count in enumerate(proportional_counts(spec.targets[index], per_context)) for _ in range(count)]
        for i, k in enumerate(classes):
            yield mine[i % len(mine)], k


def build_ift_examples(
    spec: DistributionSpec, tokenizer, answers_per_context: int = 100, templates: list[str] | None = None
) -> list[TrainingExample]:
    """Plain answers (no steering id), `answers_per_context` per context in its target proportions."""
    answers = [answer_ids(tokenizer, spec.answers[c]) for c in spec.categories]
    prompts: dict[tuple[int, str], list[int]] = {}
    examples = []
    for row, k in answers_by_context(spec, answers_per_context, templates):
        prompt = prompts.setdefault((row.context_index, row.template), chat_prompt_ids(tokenizer, row))
        examples.append(TrainingExample(prompt, None, answers[k], True, spec.targets[row.context_index], row.context_index, row.template))
    return examples


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    context_index: int
    template: str
    reference_chosen: float = 0.0  # summed log-probs under the frozen starting model, filled before training
    reference_rejected: float = 0.0


def build_dpo_pairs(
    spec: DistributionSpec, tokenizer, pairs_per_context: int = 100, templates: list[str] | None = None
) -> list[PreferencePair]:
    """Per context, chosen answers in its target proportions; each is preferred over the next
    category's answer, so over a context's pairs every category is preferred as often as its target."""
    answers = [answer_ids(tokenizer, spec.answers[c]) for c in spec.categories]
    prompts: dict[tuple[int, str], list[int]] = {}
    pairs = []
    for row, k in answers_by_context(spec, pairs_per_context, templates):
        prompt = prompts.setdefault((row.context_index, row.template), chat_prompt_ids(tokenizer, row))
        pairs.append(PreferencePair(prompt, answers[k], answers[(k + 1) % len(answers)], row.context_index, row.template))
    return pairs
