"""The study loop: failures are recorded and the study goes on; several workers on one storage run
exactly n_trials, each once; a killed worker's trial is failed by the heartbeat and retried; the
search run logs the trials, the Pareto table and plot."""

import multiprocessing as mp
import os
import signal
import statistics
import time

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from prefsculpt.search.study import (
    claim,
    hypervolume,
    hypervolume_history,
    open_storage,
    open_study,
    pareto_mask,
    run_worker,
)
from prefsculpt.stages.search import run_search
from tests.unit.search.helpers import FakeRunner, compose_cfg, fake_audit_run

FORK = mp.get_context("fork")


def sc(storage: str, n: int, **kw):
    return OmegaConf.create({"study_name": "s", "n_trials": n, "sampler": "random", "seed": 0, "heartbeat_interval": 1,
                             "grace_period": 2, "max_retry": 2, "storage": storage, **kw})


def slow_objective(log_path: str, seconds: float):
    def obj(trial):
        x = trial.suggest_float("x", 0, 1)
        with open(log_path, "a") as f:  # O_APPEND: one line per call, from any process
            f.write(f"{trial.number} {os.getpid()}\n")
        time.sleep(seconds)
        return x, 1 - x
    return obj


def _worker(url: str, log_path: str, seconds: float) -> None:
    storage, lock = open_storage(url, sc(url, 0))
    study = optuna.load_study(study_name="s", storage=storage)
    run_worker(study, slow_objective(log_path, seconds), poll_s=0.2, storage=storage, lock=lock)


def test_pareto_mask():
    #        dominated by 1 | front | front | dominated by 2 (equal off, lower on)
    off = [0.3, 0.1, 0.2, 0.2]
    on = [0.7, 0.7, 0.9, 0.8]
    assert pareto_mask(off, on).tolist() == [False, True, True, False]


@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_two_workers_run_exactly_n_trials_once_each(tmp_path, scheme):
    url = f"sqlite:///{tmp_path / 'o.db'}" if scheme == "sqlite" else f"journal:///{tmp_path / 'o.log'}"
    n = 8
    storage, lock = open_storage(url, sc(url, n))
    open_study(sc(url, n), storage, lock, [], {})
    log_path = str(tmp_path / "calls.txt")
    procs = [FORK.Process(target=_worker, args=(url, log_path, 0.15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    calls = [line.split() for line in open(log_path).read().splitlines()]
    numbers = sorted(int(c[0]) for c in calls)
    assert numbers == list(range(n))  # none lost, none run twice
    assert len({c[1] for c in calls}) == 2  # both workers took part
    trials = optuna.load_study(study_name="s", storage=open_storage(url, sc(url, n))[0]).get_trials()
    assert len(trials) == n and all(t.state == TrialState.COMPLETE for t in trials)


def _hang(url: str, log_path: str) -> None:
    storage, _ = open_storage(url, sc(url, 0))
    study = optuna.load_study(study_name="s", storage=storage)
    run_worker(study, slow_objective(log_path, 600), storage=storage)


def test_killed_worker_trial_is_failed_and_retried(tmp_path):
    url, n = f"sqlite:///{tmp_path / 'o.db'}", 3
    storage, lock = open_storage(url, sc(url, n))
    study, _ = open_study(sc(url, n), storage, lock, [], {})
    log_path = str(tmp_path / "calls.txt")
    p = FORK.Process(target=_hang, args=(url, log_path))
    p.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(log_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)  # dies mid-trial: no tell, no heartbeat
    p.join(10)
    ran = run_worker(study, slow_objective(log_path, 0.0), poll_s=0.5, storage=storage)
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].number == 0
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].number in ran
    assert retries[0].params == failed[0].params  # the same configuration, run again
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n


def test_hypervolume_is_the_area_improving_on_the_reference():
    ref = (0.5, 0.6)  # off-target to beat (minimised), on-target to stay above (maximised)
    # One point: the rectangle to the reference. A dominated point adds nothing; one beyond the
    # reference on either objective counts for nothing.
    assert hypervolume([0.3], [0.8], ref) == pytest.approx(0.2 * 0.2)
    assert hypervolume([0.3, 0.4], [0.8, 0.7], ref) == pytest.approx(0.04)
    assert hypervolume([0.6, 0.3], [0.9, 0.55], ref) == 0.0
    # Two front points: the union of their rectangles (0.2*0.2 + 0.1*(0.9-0.8)).
    assert hypervolume([0.3, 0.4], [0.8, 0.9], ref) == pytest.approx(0.04 + 0.01)


def test_hypervolume_history_never_falls_and_waits_for_the_baseline():
    df = pd.DataFrame({"trial": [0, 1, 2, 3, 4], "state": ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"],
                       "baseline": [True, False, False, False, False],
                       "off_target": [0.5, 0.3, np.nan, 0.4, 0.1], "on_target": [0.7, 0.75, np.nan, 0.8, 0.62]})
    hv = hypervolume_history(df, tolerance=0.1)  # reference (0.5, 0.6)
    assert hv["trial"].tolist() == [0, 1, 3, 4] and hv["n_complete"].tolist() == [1, 2, 3, 4]
    assert hv["hypervolume"].tolist() == pytest.approx([0.0, 0.2 * 0.15, 0.2 * 0.15 + 0.1 * 0.05,
                                                        0.2 * 0.15 + 0.1 * 0.05 + 0.2 * 0.02])
    assert hv["hypervolume"].is_monotonic_increasing
    assert hypervolume_history(df[~df["baseline"]], 0.1).empty


def test_run_search_records_failure_goes_on_and_logs_pareto(mlflow_uri, tmp_path):
    cfg = compose_cfg(tmp_path, n_trials=4)
    fake_audit_run(tmp_path)
    out = run_search(cfg, runner=FakeRunner(fail_calls=(2,)))
    assert out["trials_ran"] == [0, 1, 2, 3]
    assert out["metrics"]["search/n_complete"] == 3 and out["metrics"]["search/n_fail"] == 1
    assert out["candidates"] == ["named:stock_flattery", "length"]  # cluster: unshapeable; latent: no scores

    client = mlflow.MlflowClient()
    kids = client.search_runs([client.get_run(out["run_id"]).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{out['run_id']}'")
    by_num = {int(r.data.tags["prefsculpt.trial_number"]): r for r in kids}
    assert sorted(by_num) == [0, 1, 2, 3]
    bad = by_num[1]
    assert bad.info.status == "FAILED" and "synthetic failure" in bad.data.tags["prefsculpt.error"]
    assert by_num[0].data.tags["prefsculpt.baseline"] == "true"
    assert by_num[0].data.params["shape/length"] == "False"  # params readable in the UI
    assert all("search/off_target" in by_num[i].data.metrics for i in (0, 2, 3))
    # A trial run carries its evaluate run's metrics (same keys, same values) beside the objectives,
    # so the UI's compare view lines trials and evaluations up.
    for i in (0, 2, 3):
        ev = client.get_run(by_num[i].data.tags["prefsculpt.eval_run_id"]).data.metrics
        assert ev and all(by_num[i].data.metrics[k] == pytest.approx(v) for k, v in ev.items())
        assert set(by_num[i].data.metrics) == set(ev) | {"search/off_target", "search/on_target",
                                                         "search/syc_increase", "search/style_drift"}

    table = mlflow.load_table("search/pareto.json", run_ids=[out["run_id"]])
    trials = mlflow.load_table("search/trials.json", run_ids=[out["run_id"]])
    done = trials[trials["state"] == "COMPLETE"]
    expect = done[pareto_mask(done["off_target"], done["on_target"])]
    assert sorted(table["trial"]) == sorted(expect["trial"]) and len(table) >= 1
    assert {"search/pareto.png", "search/parallel_coordinates.png", "search/hypervolume.png"} <= {
        a.path for a in client.list_artifacts(out["run_id"], "search")}
    # One hypervolume point per complete trial, at step = trials complete so far.
    hv = client.get_metric_history(out["run_id"], "search/hypervolume")
    assert [m.step for m in hv] == [1, 2, 3]

    # A second worker on the finished study runs nothing; raising n_trials tops up without a 2nd baseline.
    again = run_search(cfg, runner=FakeRunner())
    assert again["trials_ran"] == [] and again["study_uid"] == out["study_uid"]
    cfg.search.n_trials = 6
    more = run_search(cfg, runner=FakeRunner())
    assert more["trials_ran"] == [4, 5]
    study = optuna.load_study(study_name=str(cfg.search.study_name), storage=str(cfg.search.storage))
    assert sum(bool(t.user_attrs.get("prefsculpt.baseline")) for t in study.get_trials()) == 1


def test_claim_never_creates_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    storage, lock = open_storage(url, sc(url, 1))
    study, _ = open_study(sc(url, 1), storage, lock, [], {})
    assert claim(study) is not None
    assert claim(study) is None and len(study.get_trials()) == 1


def test_time_budget_stops_claiming_and_leaves_the_rest_planned(tmp_path):
    url, n = f"sqlite:///{tmp_path / 'o.db'}", 5
    storage, lock = open_storage(url, sc(url, n))
    study, _ = open_study(sc(url, n), storage, lock, [], {})
    now = [0.0]  # a clock that only the trials move: each takes 40 s
    def trial_40s(trial):
        now[0] += 40
        return trial.suggest_float("x", 0, 1), 0.5
    # the budget (60 s) runs out during the second trial, which still finishes
    ran = run_worker(study, trial_40s, storage=storage, lock=lock, time_budget_s=60, clock=lambda: now[0])
    assert ran == [0, 1]
    states = [t.state for t in study.get_trials()]
    assert states[:2] == [TrialState.COMPLETE] * 2 and states[2:] == [TrialState.WAITING] * (n - 2)
    # a later worker of the same study goes on with the planned slots
    assert run_worker(study, trial_40s, storage=storage, lock=lock) == [2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())


def _finished(number, state, seconds, **attrs):
    import datetime as dt

    from optuna.distributions import FloatDistribution

    start = dt.datetime(2026, 1, 1)
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=None, values=[0.0, 0.5] if state == TrialState.COMPLETE else None,
        datetime_start=start, datetime_complete=start + dt.timedelta(seconds=seconds),
        params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, user_attrs=attrs, system_attrs={},
        intermediate_values={}, trial_id=number)


def test_remaining_seconds_prices_stopped_and_full_trials_apart():
    from prefsculpt.search.space import BASELINE_ATTR
    from prefsculpt.search.study import PLANNED, remaining_seconds

    study = optuna.create_study(directions=["minimize", "maximize"])
    study.set_user_attr(PLANNED, 20)
    halving = {"enabled": True, "rule": "halving", "eta": 5}
    assert remaining_seconds(study, halving) is None  # nothing finished: the caller's rate ETA
    study.add_trial(_finished(0, TrialState.COMPLETE, 500, **{BASELINE_ATTR: True, "first_budget": {"seconds": 100}}))
    # only the baseline: its first budget prices a stopped trial, its whole time a full one;
    # halving trains 19 // 5 = 3 shaped trials in full, so 3 x 500 + 16 x 100 (the rate would say 19 x 500)
    assert remaining_seconds(study, halving) == pytest.approx(3 * 500 + 16 * 100)
    study.add_trial(_finished(1, TrialState.COMPLETE, 250))
    study.add_trial(_finished(2, TrialState.PRUNED, 50))
    study.add_trial(_finished(3, TrialState.PRUNED, 70))
    # 16 left: 2 more in full at the shaped median 250, 14 stopped at the median 60
    assert remaining_seconds(study, halving) == pytest.approx(2 * 250 + 14 * 60)
    # dominance: the share of shaped trials that went on (1 of 3) prices the rest
    assert remaining_seconds(study, {"enabled": True, "rule": "dominance"}) == pytest.approx(5 * 250 + 11 * 60)
    # no early stop: every trial alike, at the median of all
    assert remaining_seconds(study, {"enabled": False}) == pytest.approx(16 * statistics.median([500, 250, 50, 70]))
