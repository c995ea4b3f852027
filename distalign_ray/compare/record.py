"""The record beside a comparison's report, from which a fresh machine resumes where the report left off.

A long comparison runs in parts, possibly on different machines: a machine's MLflow store and trained
adapters do not travel, the report does. Beside `results.md` and its `results.csv`, the job writes
`results.resume.yaml`: the config the cells were run with, each method's tuning record and the compute
spent. When `distalign compare --report` finds the record there, the cells of results.csv that its
MLflow store lacks become finished child runs of the parent (tagged `imported`), the tuned values are
reused, and only the rest runs. Adapters are not carried: a method is trained
again where one of its cells is still to run (the same seed trains the same adapter).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from distalign_ray import storage
from distalign_ray.compare.grid import Cell, CompareConfig
from distalign_ray.compare.report import METRIC_COLUMNS, read_csv
from distalign_ray.errors import DistalignError
from distalign_ray.methods import METHODS
from distalign_ray.tracking.mlflow_store import flatten_params

IMPORTED_SECONDS_TAG = "imported_compute_seconds"  # on the parent run: compute spent before the import


def record_path(report: str | Path) -> str:
    return str(Path(report).with_suffix(".resume.yaml"))


def write_record(report: str | Path, cfg: CompareConfig, tuning: dict[str, dict], compute_seconds: float) -> None:
    record = {"config": cfg.model_dump(mode="json"), "tuning": tuning, "compute_seconds": round(compute_seconds, 1)}
    storage.write_text(record_path(report), yaml.safe_dump(record, sort_keys=False))


@dataclass(frozen=True)
class ResumeRecord:
    source: str  # the report's results.csv
    tuning: dict[str, dict]
    compute_seconds: float
    rows: list[dict]


def cell_of(row: dict) -> Cell:
    return Cell(row["trained_on"], row["dataset"], METHODS[row["method"]], row["task"], row["template"], row["seed"])


def load_record(report: str | Path, cfg: CompareConfig, planned: list[Cell]) -> ResumeRecord | None:
    """The record beside `report`, checked against `cfg` and its cells (one clear error when it belongs to
    another comparison), or None when there is none."""
    path = record_path(report)
    if not storage.exists(path):
        return None
    try:
        data = yaml.safe_load(storage.read_text(path))
        recorded = CompareConfig.model_validate(data["config"])
    except (ValidationError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise DistalignError(f"{path} is not a comparison record ({str(exc).splitlines()[0]})") from None
    ours, theirs = flatten_params(cfg.model_dump(mode="json")), flatten_params(recorded.model_dump(mode="json"))
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise DistalignError(
            f"{path} records comparison '{recorded.name}' with other settings ({', '.join(differ[:5])}): "
            "resume with that config, or write the report elsewhere"
        )
    source = str(Path(report).with_suffix(".csv"))
    rows = read_csv(source) if storage.exists(source) else []
    keys = {cell.key for cell in planned}
    stray = [row for row in rows if row["method"] not in METHODS or cell_of(row).key not in keys]
    if stray:
        where = ", ".join(f"{k} {stray[0][k]}" for k in ("dataset", "method", "task", "template", "seed"))
        raise DistalignError(f"{source}: the row of {where} is not a cell of comparison '{cfg.name}'")
    return ResumeRecord(source, data.get("tuning") or {}, float(data.get("compute_seconds") or 0.0), rows)


def import_record(record: ResumeRecord, finished: Collection[str], cfg: CompareConfig, adapters: str, new_parent: bool) -> str | None:
    """Make the record's tuning, and its cells not `finished` in the active (parent) run, part of the
    comparison; a `new_parent` also counts the record's compute. What was imported, in words (None: nothing)."""
    import mlflow

    from distalign_ray.tracking.mlflow_store import CODE_VERSION_TAG, start_run

    tuned = []
    for method, chosen in record.tuning.items():
        target = storage.join(adapters, "tuned", f"{method}.yaml")
        if not storage.exists(target):
            storage.write_text(target, yaml.safe_dump(chosen, sort_keys=False))
            tuned.append(method)
    missing = [row for row in record.rows if cell_of(row).key not in finished]
    for row in missing:
        cell = cell_of(row)
        tags = cell.tags(cfg.name, row["samples"]) | {"dataset": row["dataset"], "imported": record.source}
        tags[CODE_VERSION_TAG] = row["code_version"]  # the code that computed it, not this one
        with start_run(cell.run_name, f"Imported from {record.source} (run elsewhere)", tags=tags, nested=True):
            mlflow.log_metrics({k: row[k] for k in METRIC_COLUMNS if not math.isnan(row[k])})
    if new_parent:  # this store starts from the record: its compute so far was spent elsewhere
        mlflow.set_tag(IMPORTED_SECONDS_TAG, str(record.compute_seconds))
    if not (missing or tuned):
        return None
    return f"{len(missing)} finished cells and the tuned values of {', '.join(tuned) or 'no method'} from {record.source}"
