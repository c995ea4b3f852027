"""From generated rows to results: the sample table (parquet), the sampled and readout reports, and
the per-context table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distalign_ray.config import EstimateConfig
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.estimate.labels import classify_texts
from distalign_ray.estimate.plan import EstimatePlan
from distalign_ray.evaluation.metrics import DistributionReport, distribution_report, readout_report

SAMPLE_COLUMNS = ("context_index", "context", "template", "request_id", "seed", "steering_id", "text", "cut", "label")


def by_context(contexts: list[int], labels: list[int | None], num_contexts: int) -> list[np.ndarray]:
    """Each context's class indices (-1: unmatched), as `distribution_report` takes them."""
    grouped = [[] for _ in range(num_contexts)]
    for o, label in zip(contexts, labels, strict=True):
        grouped[o].append(-1 if label is None else label)
    return [np.array(g, dtype=int) for g in grouped]


def _samples_table(rows: list[dict], spec: DistributionSpec, cfg: EstimateConfig):
    import pyarrow as pa

    columns = {name: [] for name in SAMPLE_COLUMNS}
    texts = [str(t) for row in rows for t in row["texts"]]
    labels, extra, lexical = classify_texts(spec, cfg, texts)
    if lexical is not None:  # the judge's labels are the estimate; the lexical ones give its MAE beside it
        contexts = [int(row["context_index"]) for row in rows for _ in row["texts"]]
        grouped = by_context(contexts, lexical, len(spec.contexts))
        second = distribution_report(grouped, np.array(spec.targets), cfg.bootstrap_resamples, cfg.seed)
        extra |= {"lexical_mae": second.mae, "lexical_unmatched_rate": second.unmatched_rate}
    position = 0
    for row in rows:
        for text, steering_id, cut in zip(row["texts"], row["steering_indices"], row["cut"], strict=True):
            label = labels[position]
            position += 1
            columns["context_index"].append(int(row["context_index"]))
            columns["context"].append(str(row["context"]))
            columns["template"].append(str(row["template"]))
            columns["request_id"].append(int(row["request_id"]))
            columns["seed"].append(int(row["seed"]))
            columns["steering_id"].append(int(steering_id))
            columns["text"].append(str(text))
            columns["cut"].append(bool(cut))
            columns["label"].append(None if label is None else spec.categories[label])
    extra["cut_rate"] = float(np.mean(columns["cut"])) if columns["cut"] else 0.0
    return pa.table(columns), extra


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
    partial = output_dir / ".samples.parquet.partial"  # renamed when whole: never a cut-off table
    pq.write_table(table, partial)
    os.replace(partial, samples_path)
    index = {c: i for i, c in enumerate(spec.categories)}
    labels = [None if label is None else index[label] for label in table.column("label").to_pylist()]
    grouped = by_context(table.column("context_index").to_pylist(), labels, len(spec.contexts))
    report = distribution_report(grouped, targets, cfg.bootstrap_resamples, cfg.seed)
    extra |= per_template_metrics(table, spec, cfg)
    if cfg.task != "attribute":  # answer-token readout is not defined for free-form stories
        return report, None, None, samples_path, extra
    diff = float(np.abs(report.estimates - readout).mean())
    return report, readout_rep, diff, samples_path, extra


def per_template_metrics(table, spec: DistributionSpec, cfg: EstimateConfig) -> dict[str, float]:
    """`<template>/<metric>` for each template of a table that holds several (the paper scores each alone)."""
    templates = sorted(set(table.column("template").to_pylist()))
    if len(templates) < 2:
        return {}
    index = {c: i for i, c in enumerate(spec.categories)}
    rows = list(zip(table.column("template").to_pylist(), table.column("context_index").to_pylist(), table.column("label").to_pylist()))
    out = {}
    for template in templates:
        chosen = [(o, None if label is None else index[label]) for t, o, label in rows if t == template]
        grouped = by_context([o for o, _ in chosen], [label for _, label in chosen], len(spec.contexts))
        report = distribution_report(grouped, np.array(spec.targets), cfg.bootstrap_resamples, cfg.seed)
        out |= {
            f"{template}/{k}": v
            for k, v in report.metrics().items()
            if k in ("mae", "mae_ci_low", "mae_ci_high", "unmatched_rate", "noise_p_value")
        }
    return out


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


def write_csv(rows: list[dict], path: Path) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
