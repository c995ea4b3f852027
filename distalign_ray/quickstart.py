"""The main job: estimate the embedded model on gender-UK-real, fine-tune it with the hybrid loss,
estimate again, and print the before/after comparison. Everything lands in one MLflow parent run."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.data.specs import load_spec
from distalign_ray.storage import join, storage_root


class QuickstartConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("gender-uk-real", description="built-in dataset (see `distalign datasets list`)")
    spec: str | None = Field(None, description="a spec YAML file instead of the dataset (format: docs/specs.md)")
    output: str | None = Field(None, description="adapter folder or storage URI (default: <storage>/adapters/quickstart-<time>)")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="the fine-tune; its model is also the base of both estimates"
    )
    # The spec's own protocol (100 samples per context for gender-UK-real); about 8 min in all on 2 cores.
    estimate: EstimateConfig = Field(
        default_factory=EstimateConfig, description="both estimates (before and after); model and adapter are set by the quickstart"
    )


def run_quickstart(cfg: QuickstartConfig, console=None) -> dict:
    import mlflow

    from distalign_ray.console import terminal
    from distalign_ray.estimate import plan_estimate, run_estimate
    from distalign_ray.tracking.mlflow_store import check_tracking, log_params, start_run
    from distalign_ray.training.finetune import check_binding, describe_result, log_finetune_result, run_finetune, validate_finetune

    console = console or terminal()
    spec = load_spec(None if cfg.spec else cfg.dataset, cfg.spec)
    output = cfg.output or join(storage_root(), "adapters", f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    estimate_before = cfg.estimate.model_copy(update={"model": cfg.finetune.model, "adapter": None})
    # Fail fast on every input before Ray or any model work starts.
    check_tracking()
    validate_finetune(spec, cfg.finetune, output)
    before_plan = plan_estimate(spec, estimate_before)
    timings = {}
    started = time.time()
    description = f"Quickstart on {spec.name}: the base model's distribution, a hybrid fine-tune, the fine-tuned model's distribution"
    with start_run(f"quickstart-{spec.name}", description, tags={"dataset": spec.name, "task": "attribute", "job": "quickstart"}) as parent:
        log_params(
            {
                "quickstart": cfg.model_dump(exclude={"finetune", "estimate"}),
                "finetune": cfg.finetune.model_dump(),
                "estimate": cfg.estimate.model_dump(),
            }
        )
        console.rule("[bold]1/3 estimate the base model")
        t = time.time()
        before = run_estimate(spec, estimate_before, tags={"stage": "before"}, run_name="before", plan=before_plan)
        timings["estimate_before_s"] = time.time() - t
        console.print(f"before: MAE {before.report.mae:.3f} [{before.report.mae_ci_low:.3f}, {before.report.mae_ci_high:.3f}]")

        console.rule("[bold]2/3 fine-tune (SFT, then steering KL + KTO) on Ray Train")
        t = time.time()
        with start_run(
            "finetune",
            f"Fine-tune ({cfg.finetune.loss_mode}) of {cfg.finetune.model} on {spec.name}",
            tags={"dataset": spec.name, "method": cfg.finetune.loss_mode, "model": cfg.finetune.model, "task": "attribute"},
            nested=True,
        ) as ft_run:
            log_params(cfg.finetune.model_dump())
            trained = run_finetune(spec, cfg.finetune, output, mlflow_run_id=ft_run.info.run_id)
            log_finetune_result(trained, cfg.finetune)
            for line in describe_result(trained):
                console.print(line)
            check_binding(trained, cfg.finetune)  # never estimate a broken adapter as if it worked
        timings["finetune_s"] = time.time() - t

        console.rule("[bold]3/3 estimate the fine-tuned model")
        t = time.time()
        estimate_after = estimate_before.model_copy(update={"adapter": trained["adapter"]})
        after = run_estimate(spec, estimate_after, tags={"stage": "after"}, run_name="after")
        timings["estimate_after_s"] = time.time() - t
        timings["total_s"] = time.time() - started
        mlflow.log_metrics({"before_mae": before.report.mae, "after_mae": after.report.mae, **timings})
    summary = {
        "before": before,
        "after": after,
        "timings": timings,
        "adapter": trained["adapter"],
        "binding": trained["binding"],
        "parent_run_id": parent.info.run_id,
    }
    print_comparison(console, spec.subset(cfg.estimate.max_contexts), before, after, timings, parent.info.run_id)
    return summary


def print_comparison(console, spec, before, after, timings: dict, parent_run_id: str) -> None:
    from rich.table import Table

    from distalign_ray.tracking.mlflow_store import run_url, tracking_uri

    table = Table(title=f"{spec.name}: before vs after fine-tuning")
    table.add_column("context")
    table.add_column(f"target P({spec.categories[0]})", justify="right")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after (readout)", justify="right")
    for o, context in enumerate(spec.contexts):
        table.add_row(
            context[:48],
            f"{spec.targets[o][0]:.2f}",
            f"{before.report.estimates[o][0]:.2f}",
            f"{after.report.estimates[o][0]:.2f}",
            f"{after.readout.estimates[o][0]:.2f}",
        )
    console.print(table)
    for name, result in (("before", before), ("after", after)):
        r = result.report
        console.print(
            f"[bold]{name:6s}[/bold] MAE {r.mae:.3f} (95% CI {r.mae_ci_low:.3f}-{r.mae_ci_high:.3f})  KL {r.kl:.3f}  "
            f"JS {r.js:.3f}  unmatched {r.unmatched_rate:.1%}  cut {result.cut_rate:.1%}  noise floor {r.noise_floor_mae:.3f} "
            f"(p {r.noise_p_value:.2f})  "
            f"readout MAE {result.readout.mae:.3f}"
        )
    console.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    where = "" if tracking_uri().startswith(("http://", "https://")) else "distalign ui   then open "
    console.print(f"MLflow: {where}{run_url(parent_run_id)}", soft_wrap=True)
