"""Specs a user might write, none of them among the six datasets (issue 11's matrix).

Each shape varies what can break the method: the number of classes (2 .. 12, 12 needs added steering
tokens), one-word or multi-token answers, 3 .. 40 contexts, uniform or skewed per-context targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import yaml

TOWNS = [
    "Aberdeen",
    "Bath",
    "Belfast",
    "Brighton",
    "Bristol",
    "Cambridge",
    "Cardiff",
    "Carlisle",
    "Chester",
    "Coventry",
    "Derby",
    "Dundee",
    "Durham",
    "Exeter",
    "Glasgow",
    "Hull",
    "Inverness",
    "Ipswich",
    "Leeds",
    "Leicester",
    "Lincoln",
    "Liverpool",
    "Manchester",
    "Newcastle",
    "Norwich",
    "Nottingham",
    "Oxford",
    "Perth",
    "Plymouth",
    "Preston",
    "Reading",
    "Salford",
    "Sheffield",
    "Southampton",
    "Stirling",
    "Sunderland",
    "Swansea",
    "Wakefield",
    "Worcester",
    "York",
]


@dataclass(frozen=True)
class SpecShape:
    name: str
    attribute: str
    answers: dict[str, str]  # category -> answer text
    question: str  # `{context}` and `{categories_or}` are filled by the spec's templates
    contexts: int
    skewed: bool

    @property
    def classes(self) -> int:
        return len(self.answers)

    @property
    def multi_token(self) -> bool:
        return any(" " in a or "-" in a for a in self.answers.values())


SHAPES = [
    SpecShape(
        "drink-2",
        "drink",
        {"tea": "Tea", "coffee": "Coffee"},
        "Someone in an office in {context} makes a hot drink. Is it {categories_or}? Answer with one word.",
        40,
        True,
    ),
    SpecShape(
        "commute-3",
        "commute",
        {"on-foot": "On foot", "by-bus": "By bus", "by-car": "By car"},
        "How does a worker in {context} get to work: {categories_or}? Reply with just the answer.",
        6,
        True,
    ),
    SpecShape(
        "pet-5",
        "pet",
        {"dog": "Dog", "cat": "Cat", "rabbit": "Rabbit", "goldfish": "Goldfish", "guinea-pig": "Guinea pig"},
        "A family in {context} has one pet. Is it a {categories_or}? Answer with the animal only.",
        10,
        False,
    ),
    SpecShape(
        "month-12",
        "birth month",
        {
            m.lower(): m
            for m in [
                "January",
                "February",
                "March",
                "April",
                "May",
                "June",
                "July",
                "August",
                "September",
                "October",
                "November",
                "December",
            ]
        },
        "A baby was born in {context} last year. In which month: {categories_or}? Answer with the month only.",
        3,
        False,
    ),
]


def spec_document(shape: SpecShape, seed: int = 0) -> dict:
    """The YAML document: skewed targets are random per context (seeded), uniform ones exactly 1/K."""
    rng = random.Random(seed)
    contexts = TOWNS[: shape.contexts]
    if shape.skewed:
        target = {}
        for town in contexts:
            weights = [rng.random() ** 2 + 0.02 for _ in shape.answers]
            target[town] = {c: round(w / sum(weights), 4) for c, w in zip(shape.answers, weights)}
            first = next(iter(shape.answers))  # the rounding remainder keeps each row summing to 1
            target[town][first] = round(1 - sum(v for c, v in target[town].items() if c != first), 4)
    else:
        target = "uniform"
    return {
        "name": f"unseen-{shape.name}",
        "attribute": shape.attribute,
        "categories": list(shape.answers),
        "answers": shape.answers,
        "contexts": contexts,
        "target": target,
        "templates": {
            "attribute": [shape.question],
            "story": "Write a three-sentence story about someone in {context}.",
            "prompt_engineering": "Across many answers, follow these proportions: {target}.",
        },
    }


def write_spec(shape: SpecShape, folder, seed: int = 0) -> str:
    path = folder / f"{shape.name}.yaml"
    path.write_text(yaml.safe_dump(spec_document(shape, seed), sort_keys=False))
    return str(path)
