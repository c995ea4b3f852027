"""What a command prints: its own lines on the terminal; everything else (Ray, Ray Data, vLLM, torch,
warnings, worker output) in a log file per run, which the run's top-level MLflow run keeps as an artifact.

The process's stdout and stderr file descriptors are pointed at the log file, so output written by C++
code and by Ray's forwarding of worker logs lands there too; `terminal()` writes to the original stdout.
`--verbose` leaves the streams alone (everything live, and no log file). The log is written in a
temporary folder until the command prints its first line (it is past its input checks), then in its
announced place, where it can be followed while the command runs; a command that stops on bad input
leaves no log file behind.
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
_captured: CapturedOutput | None = None
_unannounced: CapturedOutput | None = None  # said before the command's first line (bad input prints none)


def terminal() -> Console:
    """The console for a command's own output (stage lines, summaries, tables)."""
    global _unannounced
    if _terminal is None:
        return Console(soft_wrap=True)
    if _unannounced is not None:
        _unannounced.settle()
        _terminal.print(f"log: {_unannounced.final}", highlight=False)
        _unannounced = None
    return _terminal


def error_stream():
    """Where the one-line errors go: the original stderr."""
    return _error_stream or sys.stderr


def log_file() -> Path | None:
    """This run's log file (None when not captured)."""
    return _captured.path if _captured else None


class CapturedOutput:
    """The log file of one command: written in a temporary folder, moved to `final` by `settle()` (the
    command's first line) or when the command ends, or deleted by `discard()` (bad input: nothing is
    written)."""

    def __init__(self, final: Path):
        self.final = final
        self.path = Path(tempfile.mkdtemp(prefix="distalign-log-")) / final.name
        self.discarded = False

    def settle(self) -> None:
        """Point stdout and stderr at `final`, after what the temporary file holds, so the announced
        path can be followed (`tail -f`) while the command runs."""
        if self.path == self.final:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "rb") as early, open(self.final, "ab", buffering=0) as log:
            log.write(early.read())
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            log.write(early.read())  # what another thread wrote between the copy and the switch
        shutil.rmtree(self.path.parent, ignore_errors=True)
        self.path = self.final

    def discard(self) -> None:
        self.discarded = True

    def close(self) -> None:
        if self.discarded:
            self.path.unlink(missing_ok=True)
        elif self.path != self.final:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.path, self.final)
        if self.path != self.final:
            shutil.rmtree(self.path.parent, ignore_errors=True)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized())


@contextmanager
def captured_output(folder: Path, name: str, enabled: bool = True):
    """Send the process's stdout/stderr to `<folder>/<name>-<time>-<pid>.log` while the block runs.
    Yields the CapturedOutput (None when not `enabled`: --verbose)."""
    global _terminal, _error_stream, _captured, _unannounced
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
    _terminal, _error_stream, _captured = Console(file=out, soft_wrap=True, width=width), err, captured
    _unannounced = captured
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
        _terminal, _error_stream, _captured, _unannounced = None, None, None, None
        captured.close()


def progress_bar(unit: str, *fields: str):
    """A rich progress display on the terminal: description, bar, done/total `unit`, the named task
    fields (formatted by the caller), elapsed time and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=terminal())
