"""Live training progress on the driver's terminal. Rank 0 of the Train run puts small records on a
Ray queue (steps done, the loss; the steering readout's `val_mae` after each epoch); a driver thread
draws them as one progress bar: stage, step/total, loss, val_mae, elapsed and ETA."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

MIN_INTERVAL_S = 0.5  # at most two step records a second: a put is a round trip to the queue actor


class ProgressFeed:
    """Worker side: what rank 0 sends. Progress is best-effort: a lost queue never stops training."""

    def __init__(self, queue, total_steps: int):
        self.queue, self.total_steps, self._last = queue, total_steps, 0.0

    def _put(self, record: dict) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put(record, timeout=5)
        except Exception:  # the driver went away or the queue is full: train on without a display
            self.queue = None

    def step(self, stage: str, epoch: int, epochs: int, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self._last >= MIN_INTERVAL_S or step == self.total_steps:
            self._last = now
            self._put({"stage": stage, "epoch": epoch, "epochs": epochs, "step": step, "total": self.total_steps, "loss": loss})

    def epoch_end(self, step: int, val_mae: float) -> None:
        self._put({"step": step, "total": self.total_steps, "val_mae": val_mae})


@contextmanager
def training_progress(title: str, enabled: bool = True):
    """Driver side: yields the queue to hand to the Train loop (None when disabled) and draws what
    arrives until the block ends."""
    if not enabled:
        yield None
        return
    from ray.util.queue import Empty, Queue

    from distalign_ray.console import progress_bar

    queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    done = threading.Event()
    with progress_bar("steps", "detail") as bar:
        task = bar.add_task(title, total=None, detail="")
        state = {"loss": None, "val_mae": None, "where": ""}

        def draw(record: dict) -> None:
            if "stage" in record:
                state["where"] = f"{record['stage']} epoch {record['epoch'] + 1}/{record['epochs']}"
                state["loss"] = record["loss"]
            if "val_mae" in record:
                state["val_mae"] = record["val_mae"]
            detail = "  ".join(
                part
                for part in (
                    state["where"],
                    f"loss {state['loss']:.3f}" if state["loss"] is not None else "",
                    f"val_mae {state['val_mae']:.3f}" if state["val_mae"] is not None else "",
                )
                if part
            )
            bar.update(task, completed=record["step"], total=record["total"], detail=detail)

        def follow() -> None:
            while not done.is_set() or not queue.empty():
                try:
                    draw(queue.get(timeout=0.5))
                except Empty:
                    continue
                except Exception:  # the queue actor is gone (shutdown): nothing more to draw
                    return

        drawer = threading.Thread(target=follow, name="training-progress", daemon=True)
        drawer.start()
        try:
            yield queue
        finally:
            done.set()
            drawer.join(timeout=10)
            queue.shutdown()
