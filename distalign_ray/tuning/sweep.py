"""`distalign sweep`: Ray Tune over Ray Train V2 through a driver function (V2 refuses `Tuner(trainer)`).

Each trial builds and fits a `TorchTrainer` (the same launcher as `finetune`); its per-epoch
`val_mae` (the steering readout on held-out templates, already reduced over workers) reaches Tune
as it happens, so ASHA can stop bad trials early. MLflow gets a parent run and one
child run per trial; the best config is written as a `finetune:` YAML that `distalign finetune
--config` and `compare --config` accept.

Concurrency follows the trials' resource requests, not the resources present at start: a trial's
driver function reserves only a little memory (it coordinates; it never holds the CPUs or GPUs its
workers need), and each trial's Train run waits until its worker group can be placed — a request an
autoscaler sees and scales up for. `max_concurrent_trials` caps it explicitly.

Resumable: `<storage>/sweeps/<name>/sweep.json` records the settings and the MLflow parent run. The
same command with the same settings restores the Tune experiment (`Tuner.restore`): finished trials
are kept, a trial cut short starts over (so its epochs and the choice are those of an uninterrupted
sweep), and the parent run is reopened. Other settings under the same name are refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from distalign_ray import storage
from distalign_ray.config import FinetuneConfig
from distalign_ray.errors import DistalignError
from distalign_ray.paths import home_dir
from distalign_ray.tracking.mlflow_store import child_runs

SEARCHED = ("kl_weight", "kto_weight", "lr", "beta")
Searched = Literal["kl_weight", "kto_weight", "lr", "beta"]


def _log_range(bounds: tuple[float, float]) -> tuple[float, float]:
    if not 0 < bounds[0] <= bounds[1]:
        raise ValueError(f"a log-uniform range is [low, high] with 0 < low <= high, not {list(bounds)}")
    return bounds


LogRange = Annotated[tuple[float, float], AfterValidator(_log_range)]


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_\-]+$", description="sweep name: MLflow tag `sweep` and output folder")
    num_samples: int = Field(4, gt=0, description="number of trials")
    search: Literal["random", "optuna"] = Field("random", description="search algorithm: random, or Optuna's TPE (needs optuna)")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="trial scheduler: ASHA stops bad trials early on val_mae; fifo runs all")
    kl_weight: LogRange = Field((0.1, 10.0), description="kl_weight range, sampled log-uniformly")
    kto_weight: LogRange = Field((0.1, 10.0), description="kto_weight range, sampled log-uniformly")
    lr: LogRange = Field((5e-4, 5e-3), description="stage-2 learning-rate range, sampled log-uniformly")
    beta: LogRange = Field((0.05, 0.5), description="KTO (or DPO) beta range, sampled log-uniformly")
    searched: list[Searched] = Field(
        default_factory=lambda: list(SEARCHED), min_length=1, description="the finetune fields searched (the others keep their value)"
    )
    start_from_defaults: bool = Field(
        False, description="the first trial runs the finetune settings as given, so the best is never worse on val_mae than them"
    )
    train_templates: list[str] = Field(default_factory=lambda: ["attribute_0"], description="attribute templates the trials train on")
    validation_templates: list[str] = Field(
        default_factory=lambda: ["attribute_1"], description="held-out templates of the trials' val_mae (what the search minimises)"
    )
    finetune: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(num_workers=1, cpus_per_worker=0.5),
        description="fine-tuning settings of every trial (searched fields are replaced)",
    )
    driver_memory_mb: int = Field(
        256, gt=0, description="memory each trial's driver function reserves (it reserves no CPU, so it never starves its workers)"
    )
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="cap on trials running at once; default: as many as the cluster can place workers for"
    )
    min_answer_mass: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="a trial is chosen only if its last epoch's validation prompts give the classes at least this probability "
        "(val_answer_mass): below it most sampled answers match no class, which val_mae, renormalised over the classes, does not see",
    )
    output: str | None = Field(None, description="best-config YAML (default <home>/sweeps/<name>/best.yaml)")
    seed: int = Field(0, description="seeds the search (trial configs) and the trials' fine-tuning")


def _trial(config: dict, spec: dict, model_ref: dict, storage_path: str) -> None:
    """One trial: a full Ray Train fit whose epoch reports flow to Tune. `config` holds only what
    MLflow should show as the trial's params: the sampled values and the base finetune config.

    Ray's `TuneReportCallback` is not used: its reports enter Tune from Tune's own result loop, which
    deadlocks when a fit's last report arrives while the trial function returns (a Ray 2.60 race that
    hung a sweep for good). Here the fit runs in a thread, its reports come through a queue, and this
    function hands them to `tune.report` one by one, the ordinary synchronous path."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from distalign_ray.training.launcher import build_trainer, fit_in_thread
    from distalign_ray.tuning.reports import QueueReports

    finetune = FinetuneConfig.model_validate(config["finetune"] | {k: config[k] for k in SEARCHED if k in config})
    loop_config = {"finetune": finetune.model_dump(), "spec": spec, "model_ref": model_ref}
    name = f"trial-{tune.get_context().get_trial_id()}"
    # A Train run left by an interrupted sweep: Tune restarts the trial, so its epochs run again (as an
    # uninterrupted sweep ran them) rather than Train resuming from a checkpoint Tune's history lacks.
    storage.remove_folder(storage.join(storage_path, name))
    reports = Queue(actor_options={"num_cpus": 0})

    def forward_report() -> None:
        try:
            tune.report(reports.get(timeout=1))
        except Empty:
            pass

    trainer = build_trainer(finetune, loop_config, name, storage_path, callbacks=[QueueReports(reports)])
    result = fit_in_thread(trainer, while_fitting=forward_report)
    # Every report is queued before fit() returns (the callback's put is synchronous).
    while not reports.empty():
        tune.report(reports.get())
    if result.error is not None:
        raise result.error


def trial_resources(cfg: SweepConfig) -> dict:
    """What Tune reserves for a trial's driver function: memory only (no CPU, no GPU)."""
    return {"CPU": 0, "memory": cfg.driver_memory_mb * 1024**2}


def _record_path(cfg: SweepConfig) -> str:
    return storage.join(storage.storage_root(), "sweeps", cfg.name, "sweep.json")


def _previous_sweep(spec, cfg: SweepConfig) -> dict | None:
    """The record of an earlier sweep of this name (to resume), or None; refuses one with other settings."""
    path = _record_path(cfg)
    if not storage.exists(path):
        return None
    previous = json.loads(storage.read_text(path))
    settings = _settings(spec, cfg)
    if previous["settings"] != settings:
        before = previous["settings"]
        changed = [k for k in settings["sweep"] if settings["sweep"][k] != before["sweep"].get(k)]
        changed += ["dataset"] if settings["dataset"] != before["dataset"] else []
        raise DistalignError(
            f"sweep '{cfg.name}' ({path}) was started with other settings ({', '.join(changed)}): "
            "rerun it with those to resume it, or give this one another --name"
        )
    return previous


def _settings(spec, cfg: SweepConfig) -> dict:
    """What a sweep's trials depend on (not how the best is chosen, nor where it is written)."""
    settings = {"sweep": cfg.model_dump(mode="json", exclude={"output", "min_answer_mass"}), "dataset": spec.model_dump(mode="json")}
    return json.loads(json.dumps(settings))  # as the record reads back


def _resumable_parent(previous: dict | None, experiment: str) -> str | None:
    """The parent run to reopen when the earlier sweep's Tune experiment can be restored into this
    MLflow store (its trials log to the store they started in)."""
    import mlflow
    from ray import tune

    if previous is None or not tune.Tuner.can_restore(experiment):
        return None
    try:
        mlflow.get_run(previous["parent_run_id"])
    except mlflow.exceptions.MlflowException:
        return None
    return previous["parent_run_id"]


def _finished_trials(parent_id: str) -> int:
    return len({run.info.run_name for run in child_runs(parent_id, finished_only=True)})  # a trial rerun has two runs


def final_choice(results, epochs: int, min_answer_mass: float):
    """The trial whose trained model scores best: training keeps the last epoch's adapter, so a trial
    counts by its last val_mae, and only a trial that trained all `epochs` (ASHA stops some) and still
    answers with the classes (last `val_answer_mass` at least `min_answer_mass`) is a candidate."""
    from distalign_ray.training.loop import ANSWER_MASS
    from distalign_ray.tuning.reports import EPOCHS_DONE

    whole = [result for result in results if not result.error and result.metrics.get(EPOCHS_DONE) == epochs]
    if not whole:
        raise DistalignError(f"no trial of the sweep trained its whole budget ({epochs} epochs): nothing to choose from")
    # A trial recorded before the metric existed has no mass to hold against it.
    answering = [result for result in whole if result.metrics.get(ANSWER_MASS, 1.0) >= min_answer_mass]
    if not answering:
        highest = max(result.metrics[ANSWER_MASS] for result in whole)
        raise DistalignError(
            f"every trial's answers left the classes (highest val_answer_mass {highest:.3f} < min_answer_mass {min_answer_mass:g}): "
            "search lower learning rates, or lower min_answer_mass"
        )
    return min(answering, key=lambda result: result.metrics["val_mae"])


def _tune_config(spec, cfg: SweepConfig, base: FinetuneConfig):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from distalign_ray.training.budget import plan_budget
    from distalign_ray.tuning.reports import EPOCHS_DONE

    defaults = [{k: getattr(base, k) for k in cfg.searched}] if cfg.start_from_defaults else None
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(points_to_evaluate=defaults, seed=cfg.seed)
    else:
        # Tune ignores `max_concurrent_trials` for a generator passed in (only a logged warning).
        search_alg = BasicVariantGenerator(
            points_to_evaluate=defaults, random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials or 0
        )
    budget = plan_budget(base, spec)
    max_t = budget.all_epochs
    scheduler = (
        ASHAScheduler(time_attr=EPOCHS_DONE, max_t=max_t, grace_period=min(max_t, budget.sft_epochs + 1), reduction_factor=2)
        if cfg.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.TuneConfig(
        metric="val_mae",
        mode="min",
        num_samples=cfg.num_samples,
        scheduler=scheduler,
        search_alg=search_alg,
        max_concurrent_trials=cfg.max_concurrent_trials if cfg.search == "optuna" else None,
    )


def run_sweep(spec, cfg: SweepConfig, nested: bool = False) -> dict:
    """Run the sweep; `nested` puts its MLflow parent run under the active run (compare's tuning)."""
    import mlflow
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from distalign_ray.cluster import init_ray
    from distalign_ray.console import terminal
    from distalign_ray.models import resolve_model
    from distalign_ray.tracking.mlflow_store import check_tracking, log_params, start_run, tracking_uri
    from distalign_ray.training.budget import plan_budget
    from distalign_ray.training.finetune import validate_finetune
    from distalign_ray.training.launcher import fit_in_thread, train_storage
    from distalign_ray.training.loop import ANSWER_MASS

    check_tracking()
    base = cfg.finetune.model_copy(update={"templates": cfg.train_templates, "validation_templates": cfg.validation_templates})
    model_ref = resolve_model(base.model)
    validate_finetune(spec, base, home_dir() / "sweeps" / cfg.name / "unused-adapter")
    previous = _previous_sweep(spec, cfg)
    init_ray()
    tune_storage = train_storage("sweeps", cfg.name, "tune")
    resume_id = _resumable_parent(previous, storage.join(tune_storage, cfg.name))
    description = (
        f"Sweep '{cfg.name}' on {spec.name}: {cfg.num_samples} trials of {', '.join(cfg.searched)}; a child run per trial (val_mae)"
    )
    tags = {"job": "sweep", "sweep": cfg.name, "dataset": spec.name, "method": base.loss_mode}
    with start_run(f"sweep-{cfg.name}", description, tags=tags, nested=nested, resume_run_id=resume_id) as parent:
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial, spec=spec.model_dump(), model_ref=model_ref.__dict__, storage_path=train_storage("sweeps", cfg.name, "train")
            ),
            trial_resources(cfg),
        )
        if resume_id is not None:
            terminal().print(
                f"resuming sweep '{cfg.name}' (run {resume_id}): {_finished_trials(resume_id)} of {cfg.num_samples} trials finished"
            )
            tuner = tune.Tuner.restore(storage.join(tune_storage, cfg.name), trainable, resume_unfinished=True, resume_errored=True)
        else:
            log_params(cfg.model_dump(exclude={"finetune", "min_answer_mass"}) | {"finetune": base.model_dump()})
            record = {"settings": _settings(spec, cfg), "parent_run_id": parent.info.run_id}
            storage.write_text(_record_path(cfg), json.dumps(record, indent=1))
            tuner = tune.Tuner(
                trainable,
                param_space={**{k: tune.loguniform(*getattr(cfg, k)) for k in cfg.searched}, "finetune": base.model_dump()},
                tune_config=_tune_config(spec, cfg, base),
                run_config=tune.RunConfig(
                    name=cfg.name,
                    storage_path=tune_storage,
                    callbacks=[
                        MLflowLoggerCallback(
                            tracking_uri=tracking_uri(),
                            experiment_name="distalign",
                            tags={"mlflow.parentRunId": parent.info.run_id, "kind": "trial", "sweep": cfg.name, "dataset": spec.name},
                        )
                    ],
                ),
            )
        try:
            results = fit_in_thread(tuner)  # in the main thread Tune would swallow Ctrl-C and return a partial grid
        except KeyboardInterrupt:
            _end_stopped_trial_runs(parent.info.run_id)  # the trials' runs end KILLED with the sweep's
            raise
        best = final_choice(results, plan_budget(base, spec).all_epochs, cfg.min_answer_mass)
        best_finetune = cfg.finetune.model_copy(update={k: best.config[k] for k in cfg.searched})
        output = Path(cfg.output) if cfg.output else home_dir() / "sweeps" / cfg.name / "best.yaml"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(yaml.safe_dump({"finetune": best_finetune.model_dump()}, sort_keys=False))
        best_mae = float(best.metrics["val_mae"])
        chosen = {"best_val_mae": best_mae, "min_answer_mass": cfg.min_answer_mass}  # metrics: a rerun may choose again
        chosen |= {"best_val_answer_mass": best.metrics[ANSWER_MASS]} if ANSWER_MASS in best.metrics else {}
        mlflow.log_metrics(chosen | {f"best_{k}": float(best.config[k]) for k in cfg.searched})
        mlflow.log_artifact(str(output))
        _end_stopped_trial_runs(parent.info.run_id)
    best_values = {k: float(best.config[k]) for k in cfg.searched}
    return {
        "best_config": str(output),
        "best_val_mae": best_mae,
        "best_values": best_values,
        "trials": len(results),
        "parent_run_id": parent.info.run_id,
    }


def _end_stopped_trial_runs(parent_id: str) -> None:
    """ASHA can stop a trial before its MLflow run is closed: mark such runs as stopped, not running."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    for run in child_runs(parent_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
