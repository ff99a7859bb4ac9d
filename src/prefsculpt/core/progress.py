"""Progress of long steps (issue 16.4): a rich bar on a terminal, a log line every N s elsewhere.

    with progress(len(batches), "activations", "batches") as p:
        for b in batches:
            ...
            p.advance()  # or p.advance(len(b), loss=0.61): extra keywords are shown beside the count

or, around an existing loop, ``for b in track(batches, "activations", "pairs", total=n, size=len):``;
``with scope("eval style"):`` prefixes the steps started inside it.

Where the output goes is decided when a step starts:

- stderr is a terminal: one shared ``rich.progress.Progress`` (rich allows one live display at a
  time, so nested steps, say an encode inside a search trial, are rows of the same display) drawn
  on the console of the CLI's ``RichHandler`` when there is one, so log records print above the bar.
  Nothing is logged; a finished step that took a while leaves one summary row.
- otherwise (CI, ``mlflow run`` piped to a file): no carriage returns; a ``prefsculpt.progress``
  log record "desc: done/total unit (pct), rate, elapsed, ETA" at most every
  ``PREFSCULPT_PROGRESS_INTERVAL`` seconds (default 30), the first one once the step has run
  min(10 s, interval) (so any step longer than 10 s shows at least one line), and a closing line
  for a step that ran that long.

Lines are written from ``advance``, not from a timer thread: a step reports as often as it advances
(a slow batch delays its line; nothing is written while nothing moves).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from prefsculpt.core.errors import UserError

log = logging.getLogger("prefsculpt.progress")

INTERVAL_ENV = "PREFSCULPT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
#: The first line comes after at most this many seconds: issue 16 wants every step over 10 s visible.
FIRST_LINE_S = 10.0
#: On a terminal, a finished step that ran at least this long leaves a summary row.
SUMMARY_MIN_S = 2.0

Clock = Callable[[], float]
T = TypeVar("T")


def interval_s() -> float:
    """Seconds between two log lines in non-interactive output (``PREFSCULPT_PROGRESS_INTERVAL``)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{INTERVAL_ENV}={raw!r}: give a positive number of seconds (default {DEFAULT_INTERVAL_S:g})")
    return value


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rate_text(rate: float, unit: str) -> str:
    """``2.5 pairs/s``; under 0.1 per second the time each takes reads better (``700 s each``)."""
    return f"{rate:.3g} {unit}/s" if rate >= 0.1 or rate <= 0 else f"{1 / rate:.3g} s each"


def _info_text(info: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())


class Progress:
    """One step's count: ``advance(n, **info)``; ``total`` may be None (unknown) or changed later."""

    def __init__(self, total: int | None, desc: str, unit: str, done: int = 0, clock: Clock = time.monotonic):
        self.total, self.desc, self.unit, self.clock = total, desc, unit, clock
        self.done = self.start_done = done
        self.info: dict[str, Any] = {}
        #: The caller's own estimate of the seconds left, and the clock time it was given at (None: the
        #: ETA is the remaining count at the average rate so far). A step whose units differ in cost,
        #: e.g. a search whose stopped trials take a fifth of a full one, knows better than the rate.
        self.eta: tuple[float, float] | None = None
        self._sink: _LogSink | _BarSink | None = None

    def advance(self, n: int = 1, **info: Any) -> None:
        self.done += n
        self.info.update(info)
        if self._sink is not None:
            self._sink.update(self)

    def update(self, done: int | None = None, total: int | None = None, eta_s: float | None = None,
               **info: Any) -> None:
        """Set the count (and total) outright, e.g. trials finished by every worker of a study;
        ``eta_s``: the seconds left as the caller estimates them (kept until the next estimate)."""
        if total is not None:
            self.total = total
        if eta_s is not None:
            self.eta = (float(eta_s), self.clock())
        self.advance((done - self.done) if done is not None else 0, **info)

    def eta_left(self) -> float | None:
        """The caller's estimate counted down to now (None: it gave none)."""
        return None if self.eta is None else max(self.eta[0] - (self.clock() - self.eta[1]), 0.0)


class _LogSink:
    """Periodic ``prefsculpt.progress`` records; no output for a step shorter than the first line."""

    def __init__(self, clock: Clock, interval: float):
        self.clock, self.interval = clock, interval
        self.t0 = clock()
        self.first_at = self.next_at = self.t0 + min(FIRST_LINE_S, interval)
        self.lines = 0

    def line(self, p: Progress, now: float) -> str:
        elapsed = now - self.t0
        rate = (p.done - p.start_done) / elapsed if elapsed > 0 else 0.0
        count = f"{p.done}/{p.total} {p.unit}" if p.total is not None else f"{p.done} {p.unit}"
        if p.total:
            count += f" ({100 * p.done / p.total:.0f}%)"
        eta = "?"
        if (left := p.eta_left()) is not None:
            eta = duration(left)
        elif p.total is not None and rate > 0:
            eta = duration(max(p.total - p.done, 0) / rate)
        text = f"{p.desc}: {count}, {rate_text(rate, p.unit)}, elapsed {duration(elapsed)}, ETA {eta}"
        return f"{text}, {_info_text(p.info)}" if p.info else text

    def update(self, p: Progress) -> None:
        now = self.clock()
        if now >= self.next_at and (p.total is None or p.done < p.total):  # the end gets the closing line
            log.info("%s", self.line(p, now))
            self.lines += 1
            self.next_at = now + self.interval

    def close(self, p: Progress, failed: bool) -> None:
        now = self.clock()
        if not self.lines and now < self.first_at:
            return
        elapsed = now - self.t0
        rate = (p.done - p.start_done) / elapsed if elapsed > 0 else 0.0
        end = "stopped at" if failed else "done"
        count = f"{p.done}/{p.total}" if p.total is not None else f"{p.done}"
        info = f", {_info_text(p.info)}" if p.info else ""
        log.info("%s: %s %s %s in %s (%s)%s", p.desc, end, count, p.unit, duration(elapsed), rate_text(rate, p.unit), info)


# ---------------------------------------------------------------- the terminal bar
class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.3g} {task.fields['unit']}/s" if speed else "", style="progress.data.speed")


class _Remaining(TimeRemainingColumn):
    """rich's time remaining, unless the step gave its own estimate (``Progress.update(eta_s=…)``)."""

    def render(self, task: Task) -> Text:
        left = task.fields["eta_left"]() if task.fields.get("eta_left") else None
        if left is None:
            return super().render(task)
        return Text(duration(left), style="progress.remaining")


_live: RichProgress | None = None
_live_users = 0


def _console() -> Console:
    """The console of the root logger's RichHandler (so log records print above the bar), else stderr."""
    for h in logging.getLogger().handlers:
        console = getattr(h, "console", None)
        if isinstance(console, Console):
            return console
    return Console(stderr=True)


def _acquire_live() -> RichProgress:
    global _live, _live_users
    if _live is None:
        _live = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
            _Rate(), TimeElapsedColumn(), TextColumn("ETA"), _Remaining(), TextColumn("{task.fields[info]}"),
            console=_console(),
        )
        _live.start()
    _live_users += 1
    return _live


def _release_live() -> None:
    global _live, _live_users
    _live_users -= 1
    if _live_users <= 0 and _live is not None:
        _live.stop()
        _live, _live_users = None, 0


class _BarSink:
    def __init__(self, p: Progress, clock: Clock):
        self.live, self.clock, self.t0 = _acquire_live(), clock, clock()
        self.task = self.live.add_task(p.desc, total=p.total, completed=p.done, unit=p.unit, info="", eta_left=p.eta_left)

    def update(self, p: Progress) -> None:
        self.live.update(self.task, total=p.total, completed=p.done, info=_info_text(p.info))

    def close(self, p: Progress, failed: bool) -> None:
        elapsed = self.clock() - self.t0
        self.live.remove_task(self.task)
        if elapsed >= SUMMARY_MIN_S or failed:
            rate = (p.done - p.start_done) / elapsed if elapsed > 0 else 0.0
            count = f"{p.done}/{p.total}" if p.total is not None else f"{p.done}"
            self.live.console.print(f"{p.desc}: {'stopped at' if failed else 'done'} {count} {p.unit} in "
                                    f"{duration(elapsed)} ({rate_text(rate, p.unit)})", highlight=False)
        _release_live()


_scope: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("prefsculpt_progress_scope", default=())


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix the description of every step started inside: ``eval sycophancy (policy): scoring``."""
    token = _scope.set((*_scope.get(), name))
    try:
        yield
    finally:
        _scope.reset(token)


def interactive() -> bool:
    """A bar when stderr is a terminal (or a bar is already showing), else log lines."""
    if _live is not None:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def quiet_library_bars() -> None:
    """Off a terminal, turn off the tqdm bars of MLflow's artifact transfers and of transformers /
    the HF hub (weight loading, shard writing): in a log file they are carriage-return noise, and the
    long steps log lines of their own. (Libraries calling ``tqdm.auto`` directly, sae-lens' trainer
    and the one-time GGUF conversion, cannot be turned off after import; they keep theirs.)"""
    if interactive():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read at each transfer
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging  # optional: heavy, used only here

        hf_logging.disable_progress_bar()  # the hub's bars too


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = "it", done: int = 0,
             clock: Clock = time.monotonic) -> Iterator[Progress]:
    """Report a step's progress while the block runs (see the module docstring for where to)."""
    p = Progress(total, ": ".join((*_scope.get(), desc)), unit, done, clock)
    sink: _LogSink | _BarSink = _BarSink(p, clock) if interactive() else _LogSink(clock, interval_s())
    p._sink = sink
    failed = True
    try:
        yield p
        failed = False
    finally:
        p._sink = None
        sink.close(p, failed)


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
          size: Callable[[T], int] | None = None) -> Iterator[T]:
    """``items`` unchanged, advancing a ``progress`` by ``size(item)`` (default 1) after each one is
    handled: ``for idx in track(batches, "activations", "pairs", total=n_pairs, size=len):``."""
    with progress(total, desc, unit) as p:
        for item in items:
            yield item
            p.advance(size(item) if size is not None else 1)
