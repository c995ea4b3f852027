"""Running an estimate: generation on Ray Data with a progress bar, then the reports, the tables and
the plot logged to one MLflow run (and copied to shared storage when it is set)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distalign_ray.config import EstimateConfig
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.estimate.plan import EstimatePlan, engine_options, plan_estimate
from distalign_ray.estimate.tables import per_context_table, summarize, write_csv
from distalign_ray.evaluation.metrics import DistributionReport
from distalign_ray.generation.base import SamplingSettings
from distalign_ray.paths import home_dir
from distalign_ray.storage import join, shared_storage_configured, storage_root, write_folder


@dataclass
class EstimateResult:
    report: DistributionReport
    readout: DistributionReport | None
    readout_sample_diff: float | None
    samples_path: str | Path | None  # a local path, or a storage location when shared storage is set
    run_id: str | None
    seconds: float
    method: str
    cut_rate: float | None = None  # share of sampled answers stopped by max_new_tokens before their end


def execute_plan(plan: EstimatePlan) -> tuple[list[dict], float]:
    from distalign_ray.adapters import publish_adapter
    from distalign_ray.cluster import init_ray
    from distalign_ray.console import progress_bar
    from distalign_ray.generation.pipeline import run_requests

    init_ray()
    started = time.time()
    sampling = SamplingSettings(plan.cfg.new_tokens(), plan.cfg.temperature, plan.cfg.top_p)
    with progress_bar("samples") as progress:
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
        write_csv(table, output_dir / "per_context.csv")
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
    return EstimateResult(report, readout, diff, samples_path, run.info.run_id, seconds, plan.method, extra.get("cut_rate"))
