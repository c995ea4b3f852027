"""Steering tokens and the steering-token training examples.

A steering id names a class and is the first assistant token. With K <= 10 classes the ids are the
digits 0..K-1 (single tokens for SmolLM2, ids 32-41); with more classes, dedicated special tokens
`<|steer_k|>` are added to the tokenizer. Either way every id is checked to stay exactly one token
*in context* (after the assistant header, followed by an answer) before anything is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.errors import DistalignError

MAX_DIGIT_CLASSES = 10
SPECIAL_STEERING_FORMAT = "<|steer_{}|>"


@dataclass(frozen=True)
class SteeringVocab:
    strings: list[str]
    token_ids: list[int]
    added_special_tokens: bool

    @property
    def num_classes(self) -> int:
        return len(self.strings)


def steering_strings(num_classes: int, kind: str = "auto") -> tuple[list[str], bool]:
    """`kind`: 'digits', 'special' or 'auto' (digits up to 10 classes, special tokens beyond)."""
    if kind == "digits" or (kind == "auto" and num_classes <= MAX_DIGIT_CLASSES):
        if num_classes > MAX_DIGIT_CLASSES:
            raise DistalignError(f"{num_classes} classes but only {MAX_DIGIT_CLASSES} digit steering tokens; use steering_tokens=special")
        return [str(k) for k in range(num_classes)], False
    if kind in ("special", "auto"):
        return [SPECIAL_STEERING_FORMAT.format(k) for k in range(num_classes)], True
    raise DistalignError(f"unknown steering token kind {kind!r} (digits, special, auto)")


def prepare_steering_vocab(tokenizer, spec: DistributionSpec, kind: str = "auto") -> SteeringVocab:
    """Choose the steering strings, add special tokens to the tokenizer when needed (the model's
    embeddings must then be resized), and verify each id is one token in context."""
    strings, special = steering_strings(spec.num_classes, kind)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": strings})
    token_ids = []
    probe = build_prompts(spec, "attribute")[0]
    prompt_ids = chat_prompt_ids(tokenizer, probe)
    for string, category in zip(strings, spec.categories):
        answer = spec.answers[category]
        full = tokenizer(tokenizer.decode(prompt_ids) + string + answer, add_special_tokens=False)["input_ids"]
        alone = tokenizer(string, add_special_tokens=False)["input_ids"]
        in_context = full[len(prompt_ids) : len(prompt_ids) + 1]
        if full[: len(prompt_ids)] != prompt_ids or len(alone) != 1 or in_context != alone:
            pieces = tokenizer.convert_ids_to_tokens(full[len(prompt_ids) :][:4])
            raise DistalignError(
                f"steering id {string!r} is not a single token in context for this tokenizer "
                f"(after the assistant header it becomes {pieces}); use steering_tokens=special"
            )
        token_ids.append(alone[0])
    if len(set(token_ids)) != len(token_ids):
        raise DistalignError("steering ids collide: two classes map to the same token")
    return SteeringVocab(strings=strings, token_ids=token_ids, added_special_tokens=special)


@dataclass
class TrainingExample:
    """One (prompt, steering id, answer) triple with its KTO label and the prompt's target."""

    prompt_ids: list[int]
    steering_index: int | None  # class index of the steering id (None for unsteered methods)
    answer_ids: list[int]  # answer tokens followed by EOS
    desirable: bool
    target: list[float]
    context_index: int
    template: str
    meta: dict = field(default_factory=dict)
    reference_logp: float | None = None  # KTO's frozen reference log-prob, filled when the alignment stage starts


def answer_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def build_steering_examples(
    spec: DistributionSpec, tokenizer, vocab: SteeringVocab, templates: list[str] | None = None
) -> list[TrainingExample]:
    """For each context x attribute template and each steering id j: one desirable example (j with
    the answer of class j) and K-1 undesirable ones (j with another class's answer)."""
    examples = []
    answers = [answer_ids(tokenizer, spec.answers[c]) for c in spec.categories]
    for row in build_prompts(spec, "attribute", templates):
        prompt = chat_prompt_ids(tokenizer, row)
        target = spec.targets[row.context_index]
        for j in range(vocab.num_classes):
            for k in range(vocab.num_classes):
                examples.append(
                    TrainingExample(
                        prompt_ids=prompt,
                        steering_index=j,
                        answer_ids=answers[k],
                        desirable=(j == k),
                        target=target,
                        context_index=row.context_index,
                        template=row.template,
                    )
                )
    return examples
