"""MLflow helpers. Default store: sqlite in the project folder; `MLFLOW_TRACKING_URI` overrides it.

Metric and tag names used here are a contract: users compare runs in the MLflow UI by them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from distalign_ray.console import log_file
from distalign_ray.errors import DistalignError, TrackingUnavailable
from distalign_ray.paths import home_dir

EXPERIMENT = "distalign"
# MLflow 3's UI opens on its GenAI traces pages unless the link asks for the "Model training" view
# (UI_VIEW; the UI remembers it) or, in UIs without that switch, the experiment has this kind.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_VIEW = "?workflowType=machine_learning"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `distalign ui` serves the local store by default
ESTIMATION_METRICS = ("mae", "mae_ci_low", "mae_ci_high", "mae_debiased", "kl", "js", "unmatched_rate", "noise_floor_mae", "noise_p_value")
# A run's wall time summed over the invocations that had it open: a reopened run's end - start
# would also count the pause between them.
WALL_SECONDS_METRIC = "wall_seconds"
ESTIMATION_TAGS = ("dataset", "task", "method", "estimator", "model")
# The runs table shows only source/model/dataset columns by default; a saved view (what the UI's
# "Share" button stores as an experiment tag) opens it with the numbers users compare runs by.
RUNS_TABLE_VIEW = "distalign"
RUNS_TABLE_COLUMNS = (
    *(
        f"metrics.`{m}`"
        for m in (
            "mae",
            "mae_ci_low",
            "mae_ci_high",
            "noise_floor_mae",
            "noise_p_value",
            "unmatched_rate",
            "val_mae",
            "val_answer_mass",
            "binding_accuracy_min",
        )
    ),
    *(f"tags.`{t}`" for t in ("dataset", "task", "method")),
)
RUNS_TABLE_TAG = {
    f"mlflow.sharedViewState.{RUNS_TABLE_VIEW}": json.dumps(
        {"name": RUNS_TABLE_VIEW, "createdAt": 0, "state": json.dumps({"selectedColumns": list(RUNS_TABLE_COLUMNS)})}
    )
}
EXPERIMENT_TAGS = {**EXPERIMENT_KIND, **RUNS_TABLE_TAG}
CODE_VERSION_TAG = "code_version"  # every run's: which code made it (a comparison spans many invocations)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home_dir() / 'mlflow.db'}"


def artifact_root() -> str:
    return str(home_dir() / "mlartifacts")


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def _check_creatable(folder: Path, what: str) -> None:
    """`folder` exists or can be made: its nearest existing ancestor is a writable folder (nothing is created)."""
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise DistalignError(f"{what} {folder} cannot be created: {ancestor} is not a writable folder")


def check_tracking(uri: str | None = None) -> str:
    """Fail fast (one line) when the store cannot be reached or created, before any expensive work.
    Nothing is written: the local store's folder is made by the first run."""
    import mlflow

    uri = uri or tracking_uri()
    scheme = uri.partition(":")[0] if ":" in uri else ""
    if scheme.partition("+")[0] not in TRACKING_SCHEMES or (scheme in ("sqlite", "http", "https") and "://" not in uri):
        raise DistalignError(f"MLFLOW_TRACKING_URI {uri!r} is not a tracking URI (e.g. sqlite:////abs/path/mlflow.db or http://host:5000)")
    if uri.startswith("sqlite:///"):
        where = "MLflow store folder" if os.environ.get("MLFLOW_TRACKING_URI") else "DISTALIGN_HOME"
        _check_creatable(Path(uri[len("sqlite:///") :]).parent, where)
    elif uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            raise DistalignError(f"MLflow tracking server {uri} is unreachable ({exc.__class__.__name__})") from None
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str = EXPERIMENT) -> str:
    """The project experiment's id; created (or, if made by an older version, tagged) with its kind and runs-table view."""
    import mlflow

    if tracking_uri().startswith("sqlite:///"):
        Path(tracking_uri()[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in EXPERIMENT_TAGS.items():
            if experiment.tags.get(key) != value:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        Path(artifact_root()).mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root()).as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def experiment_url(experiment_id: str, ui_address: str | None = None) -> str:
    """The experiment's runs table in the MLflow UI: the tracking server's, or `distalign ui`'s."""
    uri = tracking_uri()
    base = ui_address or (uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS)
    return f"{base}/#/experiments/{experiment_id}/runs{UI_VIEW}&viewStateShareKey={RUNS_TABLE_VIEW}"


def run_url(run_id: str) -> str:
    """The run's page in the MLflow UI."""
    import mlflow

    experiment_id = mlflow.get_run(run_id).info.experiment_id
    return experiment_url(experiment_id).partition("?")[0] + f"/{run_id}{UI_VIEW}"


def flatten_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


# A tracking server that goes away fails a run's next call after about 15 s of retries (MLflow's
# default retries for ~4 minutes); a user's own setting wins.
SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def tracking_unreachable(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a failed connection to the tracking server."""
    import requests

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, requests.exceptions.ConnectionError | TrackingUnavailable):
            return True
        if "Max retries exceeded" in str(error) and "mlflow" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


@functools.cache
def code_version() -> str:
    """The commit of the checkout this process runs (`+changes` when the package differs from it), or the
    installed package's version outside a checkout (a Ray job's uploaded working_dir)."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return f"distalign-ray {importlib.metadata.version('distalign-ray')}"


def child_runs(parent_id: str, kind: str | None = None, finished_only: bool = False) -> list:
    """The runs nested under `parent_id` in the project experiment (of one `kind` tag, if given; only
    the FINISHED ones if `finished_only`)."""
    import mlflow

    clauses = [f"tags.mlflow.parentRunId = '{parent_id}'"]
    if kind:
        clauses.append(f"tags.kind = '{kind}'")
    if finished_only:
        clauses.append("attributes.status = 'FINISHED'")
    return mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=" and ".join(clauses), output_format="list")


@contextmanager
def start_run(
    run_name: str,
    description: str,
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
):
    """A run in the project experiment, with a description (shown on its page); nested under the active
    run (or `parent_run_id`); `resume_run_id` reopens that run instead. A new run is tagged with the
    `code_version` that makes it, unless `tags` name another (an imported result).

    It ends FINISHED, KILLED when the command is interrupted (Ctrl-C, SIGTERM: KeyboardInterrupt), or
    FAILED. When the tracking server is the failure, nothing more is sent to it: the error says so."""
    import mlflow

    check_tracking()
    opened = time.monotonic()
    earlier_seconds = 0.0
    if resume_run_id:
        earlier_seconds = wall_seconds(mlflow.get_run(resume_run_id))
        run = mlflow.start_run(run_id=resume_run_id, nested=nested)
    else:
        all_tags = {CODE_VERSION_TAG: code_version()} | dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.start_run(run_name=run_name, experiment_id=ensure_experiment(), nested=nested, tags=all_tags, description=description)
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except TrackingUnavailable:
        status = None  # no request can reach the server
        raise
    except BaseException as error:
        if not tracking_unreachable(error):
            status = "FAILED"
            raise
        status = None
        raise TrackingUnavailable(f"MLflow tracking server {tracking_uri()} stopped answering ({error.__class__.__name__})") from error
    finally:
        if status is not None:
            if not (nested or parent_run_id):
                attach_log()
            mlflow.log_metric(WALL_SECONDS_METRIC, earlier_seconds + time.monotonic() - opened)
            mlflow.end_run(status)


def wall_seconds(run) -> float:
    """The time `run` was open: its `wall_seconds`, or end - start for a run closed once by a version
    that did not log it; 0 for a run never closed."""
    if WALL_SECONDS_METRIC in run.data.metrics:
        return run.data.metrics[WALL_SECONDS_METRIC]
    return (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0


def attach_log() -> None:
    """Keep the command's log file (if captured) as the active run's artifact `logs/`: a snapshot at
    the run's end, finished or not."""
    import sys

    import mlflow

    path = log_file()
    if path is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        mlflow.log_artifact(str(path), "logs")
    except Exception as exc:  # noqa: BLE001 - the store may be gone (a stopped server); the file stays on disk
        print(f"the log was not attached to the MLflow run: {exc}", file=sys.stderr)


def log_params(config: Mapping, prefix: str = "") -> None:
    import mlflow

    items = flatten_params(config, prefix)
    names = list(items)
    for start in range(0, len(names), 90):  # MLflow caps a batch at 100 params
        mlflow.log_params({k: items[k][:6000] for k in names[start : start + 90]})


class StepLogger:
    """Buffers step metrics and sends them in one request per flush (each MLflow call is one HTTP
    request against a server store). Usable inside Ray workers: it only needs the run id."""

    def __init__(self, run_id: str | None, uri: str | None):
        self.run_id = run_id
        self.uri = uri
        self._buffer = []

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        if self.run_id is None or not self._buffer:
            return
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=self.uri).log_batch(self.run_id, metrics=self._buffer)
        except Exception as error:
            if not tracking_unreachable(error):
                raise
            # Step metrics are best effort: training goes on and its adapter is kept; the driver's
            # next call to the server reports the outage.
            print(f"step metrics not logged from here on: MLflow unreachable ({error.__class__.__name__})", file=sys.stderr)
            self.run_id = None
        self._buffer = []


def ui_command(host: str = "127.0.0.1", port: int = 5000) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of an MLflow server over the project's store, for `distalign ui`.

    One worker and no job runner: the defaults take ~2.6 GB of memory, these ~0.5 GB.
    """
    import shutil
    import sys

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        raise DistalignError(f"MLFLOW_TRACKING_URI is {uri}: open that server's UI instead (distalign ui serves the local store)")
    Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact_root()).mkdir(parents=True, exist_ok=True)
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    argv = [
        mlflow,
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        artifact_root(),
    ]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
