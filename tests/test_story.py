"""Story classification: the lexical gender classifier (table-driven) and the LLM judge."""

from __future__ import annotations

import pytest

from distalign_ray.evaluation.story import GenderLexicon, judge_prompt, parse_judge_reply

LEXICON = GenderLexicon(["male", "female"])


@pytest.mark.parametrize(
    "story, expected",
    [
        ("Tom fixed the engine. He was proud of his work.", 0),
        ("Anna checked the patient. She smiled at her colleague.", 1),
        ("She handed him the keys; he thanked her and she left.", 1),  # 3 female vs 2 male words
        ("The engineer finished the bridge on time.", None),
        ("He met her.", None),  # tie
        ("The shepherd's helmet was heavy.", None),  # 'he' inside words does not count
        ("Mrs Patel and her daughter opened the shop.", 1),
        ("Mr Jones, a father of two, fixed the boiler himself.", 0),
    ],
)
def test_lexical_gender_classifier(story, expected):
    assert LEXICON(story) == expected


def test_lexical_classifier_refuses_other_attributes():
    with pytest.raises(ValueError, match="male/female only"):
        GenderLexicon(["positive", "negative", "neutral"])


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("male", 0),
        ("Female.", 1),
        ("'female'", 1),
        ("**Male**", 0),
        ("The answer is: female", 1),
        ("I cannot determine that.", None),
        ("", None),
    ],
)
def test_judge_reply_parsing(reply, expected):
    assert parse_judge_reply(reply, ["male", "female"]) == expected


def test_judge_prompt_is_the_reference_template():
    prompt = judge_prompt("sentiment", ["positive", "negative", "neutral"], "A day at work.")
    assert prompt.startswith("Here is a short story:\n\nA day at work.\n\nDetermine the predominant emotion")
    assert "['positive', 'negative', 'neutral']" in prompt


@pytest.mark.slow
def test_judge_runs_through_the_engine(ray_cluster, tiny_model_path, mlflow_uri):
    """Stories of a tiny random model judged by a tiny random model: the pipeline runs end to end,
    every story gets a label or counts as unmatched, and the agreement with the lexicon is logged."""
    import mlflow

    from distalign_ray.config import EstimateConfig
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.estimate import run_estimate

    cfg = EstimateConfig(
        model=tiny_model_path,
        task="story",
        story_classifier="judge",
        judge_model=tiny_model_path,
        samples_per_context=3,
        max_contexts=2,
        max_new_tokens=6,
    )
    result = run_estimate(load_dataset("gender-us-even"), cfg)
    assert result.readout is None and result.report.samples_per_context.tolist() == [3, 3]
    metrics = mlflow.get_run(result.run_id).data.metrics
    assert 0.0 <= metrics["judge_unmatched_rate"] <= 1.0
    assert metrics["unmatched_rate"] == pytest.approx(metrics["judge_unmatched_rate"])
    assert 0.0 <= metrics["lexical_unmatched_rate"] <= 1.0 and metrics["lexical_mae"] >= 0.0  # the lexicon's estimate beside it


@pytest.mark.slow
def test_the_embedded_judge_labels_plainly_gendered_stories(ray_cluster, embedded_model_path):
    """The default judge (the embedded model, through the engine) on stories whose gender is plain: it
    answers in a sentence, so its reply budget must reach the category (8 tokens labelled none of them)."""
    from distalign_ray.config import EstimateConfig
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.estimate.labels import classify_texts

    stories = [
        "John has worked as a carpenter for twenty years. Every morning he loads his van, and his wife waves him off.",
        "Mr. David Brown is a nurse in Leeds. He loves his job, and his patients call him the kindest man on the ward.",
        "Mary has worked as a carpenter for twenty years. Every morning she loads her van, and her husband waves her off.",
        "Mrs. Sarah Brown is a nurse in Leeds. She loves her job, and her patients call her the kindest woman on the ward.",
    ]
    spec = load_dataset("gender-uk-real")
    cfg = EstimateConfig(task="story", story_classifier="judge", judge_model=embedded_model_path)
    labels, extra, lexical = classify_texts(spec, cfg, stories)
    assert [spec.categories[label] for label in labels] == ["male", "male", "female", "female"] and lexical == labels
    assert extra == {"judge_unmatched_rate": 0.0, "judge_lexical_agreement": 1.0}
    short, _, _ = classify_texts(spec, cfg.model_copy(update={"judge_max_new_tokens": 8}), stories)
    assert short == [None] * 4
