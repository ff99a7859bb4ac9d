"""Lightning's progress bar, reported through ``prefsculpt.core.progress`` (issue 16.4).

A ``ProgressBar`` subclass, so Lightning installs it instead of its tqdm bar (``enable_progress_bar``
must stay True): a rich bar on a terminal, a log line every ``PREFSCULPT_PROGRESS_INTERVAL`` s
elsewhere, counted in the caller's unit (pairs: ``size_of(batch)`` per batch) with its rate and ETA.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks.progress import ProgressBar

from prefsculpt.core.progress import Progress, progress

log = logging.getLogger(__name__)


class StepProgress(ProgressBar):
    """Training and prediction progress in ``unit`` (``size_of(batch)`` of them per batch).

    ``total``: units in the whole fit or predict (e.g. pairs × epochs); None counts batches from
    Lightning's own totals. ``show``: callback metrics shown beside the count (e.g. ``train/loss``).
    """

    def __init__(self, desc: str, unit: str = "batches", size_of: Callable[[Any], int] | None = None,
                 total: int | None = None, show: tuple[str, ...] = ()):
        super().__init__()
        self.desc, self.unit, self.size_of, self.total, self.show = desc, unit, size_of, total, show
        self._enabled = True
        self._stack: contextlib.ExitStack | None = None
        self._p: Progress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        log.info(" ".join(map(str, args)))

    # -- open / advance / close ------------------------------------------------------------------
    def _open(self, total_batches: float, done_batches: int = 0) -> None:
        if not self._enabled:
            return
        known = total_batches not in (None, float("inf"))
        if self.size_of is None:
            total, done = (int(total_batches) if known else None), done_batches
        else:
            total = self.total
            # On resume, the share already done before this process (in batches) in the caller's unit.
            done = round(total * done_batches / total_batches) if total and known and total_batches else 0
        self._stack = contextlib.ExitStack()
        self._p = self._stack.enter_context(progress(total, self.desc, self.unit, done=min(done, total or done)))

    def _advance(self, trainer: Any, batch: Any) -> None:
        if self._p is None:
            return
        info = {}
        for key in self.show:
            v = trainer.callback_metrics.get(key)
            if v is not None:
                info[key.rsplit("/", 1)[-1]] = float(v)
        self._p.advance(int(self.size_of(batch)) if self.size_of else 1, **info)

    def _close(self, failed: bool = False) -> None:
        stack, self._stack, self._p = self._stack, None, None
        if stack is None:
            return
        if failed:  # the progress context sees an exception: its closing line says "stopped at"
            err = RuntimeError("interrupted")
            stack.__exit__(RuntimeError, err, None)
        else:
            stack.close()

    # -- Lightning hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        per_epoch = self.total_train_batches
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        total = per_epoch * epochs if per_epoch != float("inf") else per_epoch
        # Batches run before a resume (0 on a fresh fit): Lightning restores this counter from the checkpoint.
        done = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        self._open(total, int(done))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._advance(trainer, batch)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._open(sum(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self._advance(trainer, batch)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(failed=True)
