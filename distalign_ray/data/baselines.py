"""Training data of the baselines: IFT answers in the target proportions, and DPO preference pairs.

Neither uses a steering token: these are the methods the paper shows fail to calibrate. Counts per
prompt follow the target by largest remainder, so a prompt's answers match its target as closely
as an integer count allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
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


def build_ift_examples(
    spec: DistributionSpec, tokenizer, answers_per_prompt: int = 10, templates: list[str] | None = None
) -> list[TrainingExample]:
    """Per context x attribute template: `answers_per_prompt` plain answers in target proportions."""
    answers = [answer_ids(tokenizer, spec.answers[c]) for c in spec.categories]
    examples = []
    for row in build_prompts(spec, "attribute", templates):
        prompt = chat_prompt_ids(tokenizer, row)
        target = spec.targets[row.context_index]
        for k, count in enumerate(proportional_counts(target, answers_per_prompt)):
            examples.extend(TrainingExample(prompt, None, answers[k], True, target, row.context_index, row.template) for _ in range(count))
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
    spec: DistributionSpec, tokenizer, pairs_per_prompt: int = 10, templates: list[str] | None = None
) -> list[PreferencePair]:
    """Per prompt, chosen answers drawn in target proportions; each is preferred over the next
    category's answer, so over a prompt's pairs every category is preferred as often as its target."""
    answers = [answer_ids(tokenizer, spec.answers[c]) for c in spec.categories]
    k_total = len(answers)
    pairs = []
    for row in build_prompts(spec, "attribute", templates):
        prompt = chat_prompt_ids(tokenizer, row)
        for k, count in enumerate(proportional_counts(spec.targets[row.context_index], pairs_per_prompt)):
            rejected = answers[(k + 1) % k_total]
            pairs.extend(PreferencePair(prompt, answers[k], rejected, row.context_index, row.template) for _ in range(count))
    return pairs
