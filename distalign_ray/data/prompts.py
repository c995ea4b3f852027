"""Prompt rendering: spec templates -> chat messages -> the exact prompt text the model sees.

All tasks share one layout: a short system prompt (SmolLM2's default one costs ~20 tokens per
example), the user prompt, and the assistant header. The steering id, when used, is the first
assistant token, exactly where training put it.
"""

from __future__ import annotations

from dataclasses import dataclass

from distalign_ray.data.specs import DistributionSpec
from distalign_ray.errors import DistalignError

TASKS = ("attribute", "story")


@dataclass(frozen=True)
class PromptRow:
    context_index: int
    context: str
    template: str  # e.g. "attribute_0", "attribute_1", "story"
    task: str
    user_prompt: str
    system_prompt: str

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_prompt},
        ]


def _join_or(words: list[str]) -> str:
    if len(words) == 2:
        return f"{words[0]} or {words[1]}"
    return ", ".join(words[:-1]) + f", or {words[-1]}"


def describe_target(spec: DistributionSpec, probs: list[float]) -> str:
    """The target in words, for the prompt-engineering variant: 'male 99%, female 1%'."""
    return ", ".join(f"{spec.answers[c]} {round(100 * p)}%" for c, p in zip(spec.categories, probs))


def render(spec: DistributionSpec, template: str, context_index: int, state_target: bool = False) -> str:
    answers = [spec.answers[c] for c in spec.categories]
    fields = {
        "context": spec.contexts[context_index],
        "region": spec.region,
        "categories": ", ".join(answers),
        "categories_or": _join_or(answers),
    }
    text = template.format(**fields)
    if state_target:
        suffix = spec.templates.prompt_engineering.format(**fields, target=describe_target(spec, spec.targets[context_index]))
        text = f"{text} {suffix}"
    return text


HELD_OUT = "held_out"


def template_ids(spec: DistributionSpec, task: str) -> list[str]:
    """The templates a task trains and is estimated on by default (held-out paraphrases excluded)."""
    if task == "attribute":
        return [f"attribute_{i}" for i in range(len(spec.templates.attribute))]
    if task == "story":
        return ["story"]
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def held_out_ids(spec: DistributionSpec) -> list[str]:
    """The attribute paraphrases no method trains on (estimated when asked for by id)."""
    return [f"{HELD_OUT}_{i}" for i in range(len(spec.templates.held_out))]


def known_template_ids(spec: DistributionSpec, task: str) -> list[str]:
    """Every template a task can be estimated on, in a fixed order: the defaults, then the held-out paraphrases."""
    return template_ids(spec, task) + (held_out_ids(spec) if task == "attribute" else [])


def template_text(spec: DistributionSpec, template_id: str) -> str:
    if template_id == "story":
        return spec.templates.story
    kind, _, index = template_id.rpartition("_")
    return (spec.templates.held_out if kind == HELD_OUT else spec.templates.attribute)[int(index)]


def build_prompts(
    spec: DistributionSpec, task: str = "attribute", templates: list[str] | None = None, state_target: bool = False
) -> list[PromptRow]:
    """One row per context x template, in context order."""
    chosen = templates or template_ids(spec, task)
    known = known_template_ids(spec, task)
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise DistalignError(f"unknown {task} template {unknown[0]!r} for spec {spec.name}; choose from {', '.join(known)}")
    rows = []
    for index, context in enumerate(spec.contexts):
        for template_id in chosen:
            rows.append(
                PromptRow(
                    context_index=index,
                    context=context,
                    template=template_id,
                    task=task,
                    user_prompt=render(spec, template_text(spec, template_id), index, state_target),
                    system_prompt=spec.system_prompt,
                )
            )
    return rows


def chat_prompt_ids(tokenizer, row: PromptRow) -> list[int]:
    """Token ids of the prompt up to and including the assistant header (no BOS doubling: the
    chat template already contains every special token it needs)."""
    text = tokenizer.apply_chat_template(row.messages(), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
