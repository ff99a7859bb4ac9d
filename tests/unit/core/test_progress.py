"""The progress module: periodic log lines off a terminal (fake clock), a rich bar and no log lines on one."""

import io
import logging
import os
import sys

import pytest

from prefsculpt.core import progress as P
from prefsculpt.core.errors import UserError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def piped(monkeypatch):
    """stderr is not a terminal, as under CI or ``mlflow run | tee`` (checked on its own below)."""
    monkeypatch.setattr(P, "interactive", lambda: False)


def test_a_bar_only_when_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not P.interactive()
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert P.interactive()


def records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "prefsculpt.progress"]


def test_piped_output_logs_a_line_per_interval_with_count_rate_and_eta(piped, monkeypatch, caplog):
    monkeypatch.setenv(P.INTERVAL_ENV, "5")
    clock = Clock()
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    with P.progress(10, "encoding", "pairs", clock=clock) as p:
        for _ in range(10):  # one pair every 2 s: 0.5 pairs/s
            clock.t += 2
            p.advance(1, loss=0.25)
    # Lines at t+6 (first >= 5 s), t+12 (>= 6+5), t+18 (>= 12+5); then the closing line at t+20.
    assert records(caplog) == [
        "encoding: 3/10 pairs (30%), 0.5 pairs/s, elapsed 0:00:06, ETA 0:00:14, loss=0.25",
        "encoding: 6/10 pairs (60%), 0.5 pairs/s, elapsed 0:00:12, ETA 0:00:08, loss=0.25",
        "encoding: 9/10 pairs (90%), 0.5 pairs/s, elapsed 0:00:18, ETA 0:00:02, loss=0.25",
        "encoding: done 10/10 pairs in 0:00:20 (0.5 pairs/s), loss=0.25",
    ]
    assert P._live is None  # no carriage-return bar in a pipe


def test_first_line_comes_within_ten_seconds_even_with_a_long_interval(piped, monkeypatch, caplog):
    monkeypatch.delenv(P.INTERVAL_ENV, raising=False)  # default 30 s
    clock = Clock()
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    with P.progress(None, "search", "trials", clock=clock) as p:
        for dt in (4, 4, 4, 20, 4):  # t = 4, 8, 12 (first line), 32, 36
            clock.t += dt
            p.advance()
    assert records(caplog) == ["search: 3 trials, 0.25 trials/s, elapsed 0:00:12, ETA ?",
                               "search: done 5 trials in 0:00:36 (0.139 trials/s)"]


def test_a_short_step_logs_nothing(piped, caplog):
    caplog.set_level(logging.DEBUG, logger="prefsculpt.progress")
    clock = Clock()
    with P.progress(3, "quick", clock=clock) as p:
        clock.t += 9.9
        p.advance(3)
    assert records(caplog) == []


def test_a_failed_step_says_where_it_stopped(piped, monkeypatch, caplog):
    monkeypatch.setenv(P.INTERVAL_ENV, "1")
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    clock = Clock()
    with pytest.raises(KeyError), P.progress(4, "DPO", "pairs", clock=clock) as p:
        clock.t += 2
        p.advance(2)
        raise KeyError("boom")
    assert records(caplog)[-1] == "DPO: stopped at 2/4 pairs in 0:00:02 (1 pairs/s)"


def test_update_sets_the_count_and_total(piped, monkeypatch, caplog):
    monkeypatch.setenv(P.INTERVAL_ENV, "1")
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    clock = Clock()
    with P.progress(4, "search", "trials", clock=clock) as p:
        clock.t += 10
        p.update(done=2, total=5, best="#1")
    assert records(caplog)[0] == "search: 2/5 trials (40%), 0.2 trials/s, elapsed 0:00:10, ETA 0:00:15, best=#1"


def test_a_given_eta_replaces_the_rate_and_counts_down(piped, monkeypatch, caplog):
    monkeypatch.setenv(P.INTERVAL_ENV, "1")
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    clock = Clock()
    with P.progress(20, "search", "trials", clock=clock) as p:
        clock.t += 500
        p.update(done=1, eta_s=1200)  # the rate would say 19 x 500 s
        clock.t += 60
        p.update(done=1)  # no new estimate: the last one, 60 s later
    assert [r.split(", ")[-1] for r in records(caplog)[:2]] == ["ETA 0:20:00", "ETA 0:19:00"]


def test_track_passes_items_through_and_scope_prefixes(piped, monkeypatch, caplog):
    monkeypatch.setenv(P.INTERVAL_ENV, "1e-9")
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    with P.scope("eval style (policy)"):
        got = list(P.track([[1, 2], [3]], "generating", "prompts", total=3, size=len))
    assert got == [[1, 2], [3]]
    lines = records(caplog)
    assert lines[0].startswith("eval style (policy): generating: 2/3 prompts (67%)")
    assert lines[-1].startswith("eval style (policy): generating: done 3/3 prompts")


def test_terminal_shows_a_rich_bar_and_logs_no_lines(monkeypatch, caplog):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv(P.INTERVAL_ENV, "1e-9")  # would log on every advance in a pipe
    caplog.set_level(logging.DEBUG, logger="prefsculpt.progress")
    clock = Clock()
    with P.progress(5, "activations", "pairs", clock=clock) as p:
        assert P.interactive()
        with P.progress(2, "nested", clock=clock) as q:  # a second row of the same live display
            q.advance(2)
        for _ in range(5):
            clock.t += 1
            p.advance()
    assert records(caplog) == []
    assert P._live is None  # the shared display stopped with its last step
    out = tty.getvalue()
    assert "activations" in out and "5/5" in out  # the bar and its summary row (the step ran 5 s)


def test_bad_interval_is_a_user_error(monkeypatch):
    monkeypatch.setenv(P.INTERVAL_ENV, "soon")
    with pytest.raises(UserError, match="PREFSCULPT_PROGRESS_INTERVAL='soon'"):
        P.interval_s()
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    with pytest.raises(UserError):
        P.interval_s()


def test_library_bars_go_quiet_only_off_a_terminal(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    hf_logging.enable_progress_bar()  # an earlier in-process stage run (piped) may have turned them off
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    P.quiet_library_bars()
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ and hf_logging.is_progress_bar_enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        P.quiet_library_bars()
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_a_step_whose_only_advance_finishes_it_logs_just_the_closing_line(piped, caplog):
    caplog.set_level(logging.INFO, logger="prefsculpt.progress")
    clock = Clock()
    with P.progress(8, "eval style (policy): generating", "prompts", clock=clock) as p:
        clock.t += 40
        p.advance(8)
    assert records(caplog) == ["eval style (policy): generating: done 8/8 prompts in 0:00:40 (0.2 prompts/s)"]


def test_slow_rates_read_as_seconds_each():
    assert P.rate_text(2.5, "pairs") == "2.5 pairs/s"
    assert P.rate_text(1 / 700, "trials") == "700 s each"
