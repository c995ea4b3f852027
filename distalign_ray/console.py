"""What a command prints: its own lines on the terminal; everything else (Ray, Ray Data, vLLM, torch,
warnings, worker output) in a log file per run, which the run's top-level MLflow run keeps as an artifact.

The process's stdout and stderr file descriptors are pointed at the log file, so output written by C++
code and by Ray's forwarding of worker logs lands there too; `terminal()` writes to the original stdout.
`--verbose` leaves the streams alone (everything live, and no log file). A command that stops on bad
input leaves no log file behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

_terminal: Console | None = None
_error_stream = None
_log_file: Path | None = None
_unannounced_log: Path | None = None  # said before the command's first line (bad input prints none)


def terminal() -> Console:
    """The console for a command's own output (stage lines, summaries, tables)."""
    global _unannounced_log
    if _terminal is None:
        return Console(soft_wrap=True)
    if _unannounced_log is not None:
        _terminal.print(f"log: {_unannounced_log}", highlight=False)
        _unannounced_log = None
    return _terminal


def error_stream():
    """Where the one-line errors go: the original stderr."""
    return _error_stream or sys.stderr


def log_file() -> Path | None:
    """This run's log file (None when not captured)."""
    return _log_file


class CapturedOutput:
    """The log file of one command: written in a temporary folder, moved to `final` when the command
    ends, or deleted by `discard()` (bad input: nothing is written)."""

    def __init__(self, final: Path):
        self.final = final
        self.path = Path(tempfile.mkdtemp(prefix="distalign-log-")) / final.name
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True

    def close(self) -> None:
        if not self.discarded:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.path, self.final)
        shutil.rmtree(self.path.parent, ignore_errors=True)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized())


@contextmanager
def captured_output(folder: Path, name: str, enabled: bool = True):
    """Send the process's stdout/stderr to `<folder>/<name>-<time>-<pid>.log` while the block runs.
    Yields the CapturedOutput (None when not `enabled`: --verbose)."""
    global _terminal, _error_stream, _log_file, _unannounced_log
    if not enabled:
        yield None
        return
    captured = CapturedOutput(folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(captured.path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    width = None if out.isatty() else 120  # a log or CI console: wide enough for the tables' rows
    _terminal, _error_stream, _log_file = Console(file=out, soft_wrap=True, width=width), err, captured.path
    _unannounced_log = captured.final
    ray_was_running = _ray_initialized()
    try:
        yield captured
    finally:
        if _ray_initialized() and not ray_was_running:
            import ray

            ray.shutdown()  # worker output still on its way to the driver lands in the log, not on the terminal
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        out.close()
        err.close()
        _terminal, _error_stream, _log_file, _unannounced_log = None, None, None, None
        captured.close()


def progress_bar(unit: str, *fields: str):
    """A rich progress display on the terminal: description, bar, done/total `unit`, the named task
    fields (formatted by the caller), elapsed time and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=terminal())
