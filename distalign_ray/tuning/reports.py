"""The Train callback that carries a trial's epoch reports to its Tune function (see `sweep._trial`)."""

from __future__ import annotations

from ray.train import UserCallback
from ray.util.queue import Queue

EPOCHS_DONE = "epochs_done"


class QueueReports(UserCallback):
    """Puts each Train report's metrics (rank 0's, already reduced over workers) on a Ray queue, with
    `epochs_done`, the count ASHA schedules by: a trial restarted by a resumed sweep counts its epochs
    from one again, whatever Tune's own iteration counter carries over from before."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put(dict(metrics[0]) | {EPOCHS_DONE: metrics[0]["plan_index"] + 1})
