"""Spec loading, target resolution and the clear errors on bad specs."""

from __future__ import annotations

import math

import pytest
import yaml

from distalign_ray.data.specs import builtin_dataset_names, load_dataset, load_spec_file, spec_from_dict
from distalign_ray.errors import DistalignError

EXPECTED = {
    "gender-uk-real": (25, 2, 100),
    "gender-uk-even": (25, 2, 100),
    "gender-us-real": (14, 2, 100),
    "gender-us-even": (14, 2, 100),
    "race-us-even": (14, 5, 100),
    "sentiment-us-even": (14, 3, 90),
}

MINIMAL = {
    "name": "handedness",
    "attribute": "handedness",
    "categories": ["left", "right"],
    "contexts": ["painters", "tennis players"],
    "target": {"left": 0.1, "right": 0.9},
    "templates": {
        "attribute": ["Is one of the {context} {categories_or}-handed?"],
        "story": "A story about one of the {context}.",
        "prompt_engineering": "Follow: {target}.",
    },
}


def test_six_builtin_datasets():
    assert builtin_dataset_names() == sorted(EXPECTED)
    for name, (contexts, classes, samples) in EXPECTED.items():
        spec = load_dataset(name)
        assert (len(spec.contexts), spec.num_classes, spec.samples_per_context) == (contexts, classes, samples)
        for target in spec.targets:
            assert math.isclose(sum(target), 1.0, abs_tol=1e-9)


def test_real_targets_come_from_counts():
    spec = load_dataset("gender-uk-real")
    assert spec.contexts[0] == "Vehicle technicians, mechanics and electricians"
    assert spec.targets[0][0] == pytest.approx(186605 / (186605 + 1501))
    assert spec.target_of("Teaching assistants")[1] == pytest.approx(419971 / (44783 + 419971))
    assert load_dataset("gender-us-real").targets[13][0] == pytest.approx(404 / (404 + 2413))


def test_uniform_is_exact_not_rounded():
    assert load_dataset("sentiment-us-even").targets[0] == [1 / 3] * 3  # the reference code used 0.333


def test_explicit_shared_and_per_context_targets():
    spec = spec_from_dict(MINIMAL)
    assert spec.targets == [[0.1, 0.9], [0.1, 0.9]]
    per_context = dict(MINIMAL, target={"painters": {"left": 0.3, "right": 0.7}, "tennis players": {"right": 1.0}})
    assert spec_from_dict(per_context).targets == [[0.3, 0.7], [0.0, 1.0]]
    assert spec.answers == {"left": "Left", "right": "Right"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target": {"left": 0.5, "right": 0.6}}, "sum to 1.1000, not 1"),
        ({"target": {"left": 0.5, "up": 0.5}}, "unknown category 'up'"),
        ({"target": {"painters": {"left": 1.0}}}, "no target for contexts ['tennis players']"),
        ({"target": {"left": -0.1, "right": 1.1}}, ">= 0"),
        ({"categories": ["left"]}, "categories"),
        ({"categories": ["left", "Left"]}, "distinct"),
        ({"contexts": []}, "contexts"),
        ({"name": "Bad Name"}, "name"),
        ({"samples_per_context": 0}, "samples_per_context"),
        ({"colour": "red"}, "colour"),
        ({"templates": {"attribute": ["{job}"], "story": "s", "prompt_engineering": "p"}}, "unknown placeholder {job}"),
        ({"target": "counts"}, "counts"),
    ],
)
def test_bad_specs_give_one_clear_line(change, message):
    with pytest.raises(DistalignError) as info:
        spec_from_dict(dict(MINIMAL, **change), origin="test.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_spec_file_with_csv_next_to_it(tmp_path):
    (tmp_path / "teams.csv").write_text("team,lefties,righties\nA,1,3\nB,2,2\n")
    document = dict(
        MINIMAL,
        contexts={"csv": "teams.csv", "column": "team", "counts": {"left": "lefties", "right": "righties"}},
        target="counts",
    )
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document))
    spec = load_spec_file(path)
    assert spec.contexts == ["A", "B"] and spec.targets == [[0.25, 0.75], [0.5, 0.5]]


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(DistalignError, match="not valid YAML"):
        load_spec_file(path)
    with pytest.raises(DistalignError, match="not found"):
        load_spec_file(tmp_path / "absent.yaml")
    with pytest.raises(DistalignError, match="unknown dataset"):
        load_dataset("gender-mars-real")


def test_docs_example_spec_loads():
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "specs.md"
    text = docs.read_text()
    block = text.split("```yaml", 1)[1].split("```", 1)[0]
    spec = spec_from_dict(yaml.safe_load(block), origin="docs/specs.md")
    assert spec.attribute not in {"gender", "race", "sentiment"}
    assert all(math.isclose(sum(t), 1.0) for t in spec.targets)


def test_answers_that_differ_from_category_names_are_classified():
    """A category `on-foot` answered "On foot": the sampled answer must count as that category."""
    from distalign_ray.evaluation.classify import LexicalClassifier

    spec = spec_from_dict(
        {
            "name": "commute",
            "attribute": "commute",
            "categories": ["on-foot", "by-car"],
            "answers": {"on-foot": "On foot", "by-car": "By car"},
            "aliases": {"by-car": ["driving"]},
            "contexts": ["York"],
            "target": "uniform",
            "templates": {"attribute": ["{context}: {categories_or}?"], "story": "s {context}", "prompt_engineering": "{target}"},
        }
    )
    classify = LexicalClassifier(spec.categories, spec.match_terms())
    assert [classify("On foot."), classify("by car"), classify("Driving, mostly"), classify("by bike")] == [0, 1, 1, None]
