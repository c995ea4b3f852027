"""Estimate a model's output distribution per context: Ray Data generation (or the readout
estimator), classification, metrics with bootstrap CIs, a parquet sample table, MLflow logging."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distalign_ray.config import EstimateConfig
from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.errors import DistalignError
from distalign_ray.evaluation.classify import LexicalClassifier
from distalign_ray.evaluation.metrics import DistributionReport, distribution_report, readout_report
from distalign_ray.generation.base import SamplingSettings, SteeringSetup
from distalign_ray.generation.vllm_engine import choose_engine
from distalign_ray.models import ModelRef, load_tokenizer, resolve_model
from distalign_ray.paths import home_dir
from distalign_ray.storage import join, normalize, shared_storage_configured, storage_root, write_folder

SAMPLE_COLUMNS = ("context_index", "context", "template", "request_id", "seed", "steering_id", "text", "label")


@dataclass
class EstimatePlan:
    spec: DistributionSpec
    cfg: EstimateConfig
    model_ref: ModelRef
    steering: SteeringSetup
    method: str
    requests: list[dict]
    engine: str  # resolved: "vllm" or "hf"


@dataclass
class EstimateResult:
    report: DistributionReport
    readout: DistributionReport | None
    readout_sample_diff: float | None
    samples_path: str | Path | None  # a local path, or a storage location when shared storage is set
    run_id: str | None
    seconds: float
    method: str


def _request_seed(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def plan_estimate(spec: DistributionSpec, cfg: EstimateConfig) -> EstimatePlan:
    """All validation and request building; no model weights are loaded here."""
    spec = spec.subset(cfg.max_contexts)
    if cfg.task == "story" and cfg.estimator == "readout":
        raise DistalignError("the readout estimator is available for the attribute task only")
    if cfg.task == "story" and story_classifier_kind(spec, cfg) == "lexical" and spec.attribute != "gender":
        raise DistalignError(f"the lexical story classifier handles gender only; use story_classifier=judge for {spec.attribute}")
    model_ref = resolve_model(cfg.model)
    engine = choose_engine(cfg.engine, model_ref.path, on_gpu=cfg.gpus_per_actor > 0)
    tokenizer = load_tokenizer(model_ref)
    answer_ids = [tokenizer(spec.answers[c], add_special_tokens=False)["input_ids"] for c in spec.categories]
    if cfg.adapter:
        from distalign_ray.adapters import adapter_on_this_node, read_adapter_meta

        cfg = cfg.model_copy(update={"adapter": normalize(cfg.adapter)})
        meta = read_adapter_meta(cfg.adapter)
        if meta["categories"] != spec.categories:
            raise DistalignError(f"adapter was trained for categories {meta['categories']}, the spec has {spec.categories}")
        if engine == "vllm" and cfg.vllm_lora == "lora" and meta.get("added_special_tokens"):
            raise DistalignError("this adapter added steering tokens; vLLM serves it merged only (vllm_lora: merge or auto)")
        tokenizer = load_tokenizer(model_ref, adapter_on_this_node(cfg.adapter))
        steering = SteeringSetup(token_ids=list(meta["steering_token_ids"]) or None, answer_ids=answer_ids)
        method = meta.get("loss_mode", "adapter")
    else:
        steering = SteeringSetup(token_ids=None, answer_ids=answer_ids)
        method = "prompt-engineering" if cfg.prompt_engineering else "zero-shot"
    total = cfg.samples_per_context or spec.samples_per_context
    requests = []
    prompts = build_prompts(spec, cfg.task, state_target=cfg.prompt_engineering)
    per_context_templates = len(prompts) // len(spec.contexts)
    for prompt_index, row in enumerate(prompts):
        prompt_ids = chat_prompt_ids(tokenizer, row)
        template_position = prompt_index % per_context_templates
        n_here = split_evenly(total, per_context_templates)[template_position]
        chunks = split_evenly(n_here, max(1, -(-n_here // cfg.samples_per_request))) if cfg.estimator == "sample" else [0]
        for chunk_index, n in enumerate(chunks):
            requests.append(
                {
                    "request_id": len(requests),
                    "context_index": row.context_index,
                    "context": row.context,
                    "template": row.template,
                    "chunk": chunk_index,
                    "prompt_ids": prompt_ids,
                    "n": n,
                    "seed": _request_seed(cfg.seed, row.context_index, template_position, chunk_index),
                    "with_readout": chunk_index == 0,  # one readout per (context, template)
                }
            )
    return EstimatePlan(spec=spec, cfg=cfg, model_ref=model_ref, steering=steering, method=method, requests=requests, engine=engine)


def story_classifier_kind(spec: DistributionSpec, cfg: EstimateConfig) -> str:
    if cfg.story_classifier != "auto":
        return cfg.story_classifier
    return "lexical" if spec.attribute == "gender" else "judge"


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
        SamplingSettings(max_new_tokens=8, temperature=0.0),
        **engine_options(cfg, choose_engine(cfg.engine, judge_ref.path, on_gpu=cfg.gpus_per_actor > 0)),
    )
    return [parse_judge_reply(str(r["texts"][0]), spec.categories, spec.match_terms()) for r in rows]


def classify_texts(spec: DistributionSpec, cfg: EstimateConfig, texts: list[str]) -> tuple[list[int | None], dict]:
    """Labels for every text, and extra metrics (judge agreement with the lexical classifier)."""
    if cfg.task == "attribute":
        classifier = LexicalClassifier(spec.categories, spec.match_terms())
        return [classifier(t) for t in texts], {}
    from distalign_ray.evaluation.story import GenderLexicon

    lexical = [GenderLexicon(spec.categories)(t) for t in texts] if spec.attribute == "gender" else None
    if story_classifier_kind(spec, cfg) == "lexical":
        return lexical, {}
    judged = _judge_labels(spec, cfg, texts)
    extra = {"judge_unmatched_rate": sum(j is None for j in judged) / max(1, len(judged))}
    if lexical is not None:
        both = [(j, l) for j, l in zip(judged, lexical) if j is not None and l is not None]
        extra["judge_lexical_agreement"] = sum(j == l for j, l in both) / len(both) if both else float("nan")
    return judged, extra


def _samples_table(rows: list[dict], spec: DistributionSpec, cfg: EstimateConfig):
    import pyarrow as pa

    columns = {name: [] for name in SAMPLE_COLUMNS}
    texts = [str(t) for row in rows for t in row["texts"]]
    labels, extra = classify_texts(spec, cfg, texts)
    position = 0
    for row in rows:
        for text, steering_id in zip(row["texts"], row["steering_indices"]):
            label = labels[position]
            position += 1
            columns["context_index"].append(int(row["context_index"]))
            columns["context"].append(str(row["context"]))
            columns["template"].append(str(row["template"]))
            columns["request_id"].append(int(row["request_id"]))
            columns["seed"].append(int(row["seed"]))
            columns["steering_id"].append(int(steering_id))
            columns["text"].append(str(text))
            columns["label"].append(None if label is None else spec.categories[label])
    return pa.table(columns), extra


def engine_options(cfg: EstimateConfig, engine: str) -> dict:
    from distalign_ray.cluster import largest_node_cpus

    num_actors, cpus = cfg.actor_layout(engine, largest_node_cpus())
    return {
        "engine": engine,
        "num_actors": num_actors,
        "cpus_per_actor": cpus,
        "gpus_per_actor": cfg.gpus_per_actor,
        "seed": cfg.seed,
        "vllm_lora": cfg.vllm_lora,
        "vllm_backend": "actor" if cfg.vllm_backend == "auto" else cfg.vllm_backend,
    }


def execute_plan(plan: EstimatePlan) -> tuple[list[dict], float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from distalign_ray.adapters import publish_adapter
    from distalign_ray.cluster import init_ray
    from distalign_ray.console import terminal
    from distalign_ray.generation.pipeline import run_requests

    init_ray()
    started = time.time()
    sampling = SamplingSettings(plan.cfg.new_tokens(), plan.cfg.temperature, plan.cfg.top_p)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=terminal()) as progress:
        task = progress.add_task(f"{plan.method} on {plan.spec.name}", total=sum(int(r["n"]) for r in plan.requests))
        rows = run_requests(
            plan.requests,
            plan.model_ref.__dict__,
            publish_adapter(plan.cfg.adapter),  # engines on any node read it from storage
            plan.steering,
            sampling,
            **engine_options(plan.cfg, plan.engine),
            on_samples=lambda n: progress.advance(task, n),
        )
    return rows, time.time() - started


def summarize(plan: EstimatePlan, rows: list[dict], output_dir: Path):
    """(sampled report, readout report or None for stories, their difference, sample table path, extra metrics)"""
    import pyarrow.parquet as pq

    spec, cfg = plan.spec, plan.cfg
    targets = np.array(spec.targets)
    k = spec.num_classes
    # Readout: mean over the context's templates (first chunk of each carries it).
    readout = np.zeros((len(spec.contexts), k))
    seen = np.zeros(len(spec.contexts))
    for row in rows:
        if int(row["chunk"]) == 0:
            readout[int(row["context_index"])] += np.asarray(row["readout"], dtype=float)
            seen[int(row["context_index"])] += 1
    readout /= np.maximum(seen, 1)[:, None]
    readout_rep = readout_report(readout, targets)
    if cfg.estimator == "readout":
        return readout_rep, readout_rep, None, None, {}
    table, extra = _samples_table(rows, spec, cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    samples_path = output_dir / "samples.parquet"
    pq.write_table(table, samples_path)
    index = {c: i for i, c in enumerate(spec.categories)}
    context_col = table.column("context_index").to_pylist()
    label_col = table.column("label").to_pylist()
    labels = [[] for _ in spec.contexts]
    for o, label in zip(context_col, label_col):
        labels[o].append(-1 if label is None else index[label])
    report = distribution_report([np.array(l, dtype=int) for l in labels], targets, cfg.bootstrap_resamples, cfg.seed)
    if cfg.task != "attribute":  # answer-token readout is not defined for free-form stories
        return report, None, None, samples_path, extra
    diff = float(np.abs(report.estimates - readout).mean())
    return report, readout_rep, diff, samples_path, extra


def per_context_table(spec: DistributionSpec, report: DistributionReport, readout: DistributionReport | None) -> list[dict]:
    rows = []
    for o, context in enumerate(spec.contexts):
        row = {"context": context}
        for k, category in enumerate(spec.categories):
            row[f"target_{category}"] = spec.targets[o][k]
            row[f"estimate_{category}"] = float(report.estimates[o][k])
            if readout is not None:
                row[f"readout_{category}"] = float(readout.estimates[o][k])
        if readout is not None:
            row["readout_mae"] = float(readout.mae_per_context[o])
        row.update(
            mae=float(report.mae_per_context[o]),
            samples=int(report.samples_per_context[o]),
            matched=int(report.matched_per_context[o]),
        )
        rows.append(row)
    return rows


def estimation_tags(plan: EstimatePlan, extra: dict | None = None) -> dict:
    tags = {
        "dataset": plan.spec.name,
        "task": plan.cfg.task,
        "method": plan.method,
        "estimator": plan.cfg.estimator,
        "model": plan.model_ref.name,
        "engine": plan.engine,
    }
    tags.update(extra or {})
    return tags


def run_estimate(
    spec: DistributionSpec, cfg: EstimateConfig, tags: dict | None = None, run_name: str | None = None, plan: EstimatePlan | None = None
) -> EstimateResult:
    """Plan (validate), generate on Ray Data, summarise, and log one MLflow run."""
    import mlflow

    from distalign_ray.cluster import init_ray
    from distalign_ray.evaluation.plots import plot_distributions
    from distalign_ray.tracking.mlflow_store import log_params, start_run

    plan = plan or plan_estimate(spec, cfg)
    init_ray()  # before logging the engine layout: it depends on the cluster's nodes
    run_name = run_name or f"estimate-{plan.spec.name}-{plan.method}-{cfg.task}-{cfg.estimator}"
    description = f"Estimate of {plan.method}'s {cfg.task} distribution on {plan.spec.name} ({cfg.estimator}): MAE against the targets"
    with start_run(run_name, description, tags=estimation_tags(plan, tags), nested=mlflow.active_run() is not None) as run:
        log_params(
            {
                "estimate": cfg.model_dump(),
                "engine": engine_options(cfg, plan.engine),
                "dataset": plan.spec.name,
                "num_requests": len(plan.requests),
            }
        )
        rows, seconds = execute_plan(plan)
        output_dir = home_dir() / "runs" / run.info.run_id
        report, readout, diff, samples_path, extra = summarize(plan, rows, output_dir)
        metrics = report.metrics() | extra | {"seconds": seconds}
        if readout is not None:
            metrics.update(readout_mae=readout.mae, readout_kl=readout.kl, readout_js=readout.js)
        if diff is not None:
            metrics["readout_sample_diff"] = diff
        mlflow.log_metrics(metrics)
        table = per_context_table(plan.spec, report, readout)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "per_context.json").write_text(json.dumps(table, indent=2))
        _write_csv(table, output_dir / "per_context.csv")
        series = {"sampled": report.estimates} if cfg.estimator == "sample" else {}
        if readout is not None:
            series["readout"] = readout.estimates
        plot_distributions(
            plan.spec.contexts,
            plan.spec.categories,
            np.array(plan.spec.targets),
            series,
            f"{plan.spec.name} - {plan.method} ({cfg.estimator}) MAE {report.mae:.3f}",
            output_dir / "distribution.png",
        )
        mlflow.log_artifacts(str(output_dir))
        if shared_storage_configured():  # the run's tables beside the adapters and checkpoints
            stored = join(storage_root(), "runs", run.info.run_id)
            write_folder(output_dir, stored)
            samples_path = join(stored, "samples.parquet") if samples_path else None
    return EstimateResult(report, readout, diff, samples_path, run.info.run_id, seconds, plan.method)


def _write_csv(rows: list[dict], path: Path) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
