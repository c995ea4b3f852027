"""MLflow helpers. Default store: sqlite in the project folder; `MLFLOW_TRACKING_URI` overrides it.

Metric and tag names used here are a contract: users compare runs in the MLflow UI by them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from distalign_ray.errors import DistalignError
from distalign_ray.paths import home_dir

EXPERIMENT = "distalign"
ESTIMATION_METRICS = ("mae", "mae_ci_low", "mae_ci_high", "kl", "js", "unmatched_rate", "noise_floor_mae")
ESTIMATION_TAGS = ("dataset", "task", "method", "estimator", "model")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home_dir() / 'mlflow.db'}"


def artifact_root() -> str:
    return str(home_dir() / "mlartifacts")


def check_tracking(uri: str | None = None) -> str:
    """Fail fast (one line) when the store cannot be reached, before any expensive work."""
    import mlflow

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            raise DistalignError(f"MLflow tracking server {uri} is unreachable ({exc.__class__.__name__})") from None
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str = EXPERIMENT) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        Path(artifact_root()).mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root()).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def flatten_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


@contextmanager
def start_run(run_name: str, tags: Mapping[str, str] | None = None, nested: bool = False, parent_run_id: str | None = None):
    """A run in the project experiment; nested under the active run (or `parent_run_id`)."""
    import mlflow

    check_tracking()
    experiment_id = ensure_experiment()
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, nested=nested, tags=all_tags) as run:
        yield run


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

        MlflowClient(tracking_uri=self.uri).log_batch(self.run_id, metrics=self._buffer)
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
        mlflow, "server", "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", uri, "--artifacts-destination", artifact_root(),
    ]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
