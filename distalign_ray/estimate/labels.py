"""Labelling the sampled texts: the lexical classifier (attribute answers, gendered stories) or the
judge model (other story attributes), run through the same Ray Data engine pipeline."""

from __future__ import annotations

from distalign_ray.config import EstimateConfig
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.estimate.plan import engine_options
from distalign_ray.evaluation.classify import LexicalClassifier
from distalign_ray.generation.base import SamplingSettings, SteeringSetup
from distalign_ray.generation.vllm_engine import choose_engine
from distalign_ray.models import load_tokenizer, resolve_model


def _judge_labels(spec: DistributionSpec, cfg: EstimateConfig, texts: list[str]) -> list[int | None]:
    """Classify stories with the judge model, through the same Ray Data engine pipeline (greedy)."""
    from distalign_ray.evaluation.story import judge_prompt, parse_judge_reply
    from distalign_ray.generation.pipeline import run_requests

    judge_ref = resolve_model(cfg.judge_model)
    tokenizer = load_tokenizer(judge_ref)
    requests = []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": judge_prompt(spec.attribute, spec.categories, text)}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        requests.append({"request_id": i, "prompt_ids": ids, "n": 1, "seed": 0, "with_readout": False})
    answers = [tokenizer(spec.answers[c], add_special_tokens=False)["input_ids"] for c in spec.categories]
    rows = run_requests(
        requests,
        judge_ref.__dict__,
        None,
        SteeringSetup(token_ids=None, answer_ids=answers),
        SamplingSettings(max_new_tokens=cfg.judge_max_new_tokens, temperature=0.0),
        **engine_options(cfg, choose_engine(cfg.engine, judge_ref.path, on_gpu=cfg.gpus_per_actor > 0)),
    )
    return [parse_judge_reply(str(r["texts"][0]), spec.categories, spec.match_terms()) for r in rows]


def classify_texts(spec: DistributionSpec, cfg: EstimateConfig, texts: list[str]) -> tuple[list[int | None], dict, list[int | None] | None]:
    """Labels for every text, extra metrics (the judge's unmatched rate and agreement with the lexical
    classifier), and the lexical labels beside the judge's where it labels gender stories (else None)."""
    if cfg.task == "attribute":
        classifier = LexicalClassifier(spec.categories, spec.match_terms())
        return [classifier(t) for t in texts], {}, None
    from distalign_ray.evaluation.story import GenderLexicon

    lexical = [GenderLexicon(spec.categories)(t) for t in texts] if spec.attribute == "gender" else None
    if cfg.story_classifier_for(spec.attribute) == "lexical":
        return lexical, {}, None
    judged = _judge_labels(spec, cfg, texts)
    extra = {"judge_unmatched_rate": sum(j is None for j in judged) / max(1, len(judged))}
    if lexical is not None:
        both = [(j, l) for j, l in zip(judged, lexical) if j is not None and l is not None]
        extra["judge_lexical_agreement"] = sum(j == l for j, l in both) / len(both) if both else float("nan")
    return judged, extra, lexical
