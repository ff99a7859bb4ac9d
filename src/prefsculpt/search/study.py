"""The ``search`` entry point: an Optuna study over the audit's hypotheses, one or many workers.

Storage by URL (``search.storage``): ``sqlite:///optuna.db`` (default, in the working directory),
``journal:///path.log`` (append-only file, lock-protected), ``postgresql://…`` (many machines).
Several ``mlflow run -e search`` processes on one storage and study name share the work:

- The worker that *creates* the study enqueues the whole plan as WAITING trials: the plain-DPO
  baseline, then ``n_trials - 1`` empty slots the sampler fills when a worker pops one. A worker only
  ever pops a slot (atomically, via the storage) and never creates a trial, so all workers together
  run exactly ``n_trials`` trials, each once. (``MaxTrialsCallback`` counts finished trials after
  each one, so N workers overshoot by up to N − 1.) Raising ``n_trials`` later tops the plan up.
- RDB storages (sqlite, PostgreSQL) beat a heartbeat per running trial; a trial whose worker died
  is failed after ``grace_period`` and re-enqueued (``RetryHeartbeatStaleTrialCallback``) by the next
  worker that looks. Workers with nothing left to pop wait while others run, to retry their trials
  if they die. A journal file has no heartbeat: a killed worker's trial stays RUNNING.
- A trial that raises is recorded as FAIL (with its error) and the worker takes the next slot.
- On a fresh PostgreSQL storage, create the study once before the workers start
  (``search.create_only=true``): workers racing to create its tables collide on ``alembic_version``.
- The worker that retries a dead worker's trial closes that worker's trial run, the runs under it
  and its search run (KILLED); each worker, when done, closes the runs of any failed trial still
  RUNNING (a death no one retried), so the run tree shows no orphan (``tracking.orphans``).

Each worker's MLflow run (``stage_run(cfg, "search")``) holds its trials as child runs, and at the
end logs the whole study as ``search/trials.json``, the Pareto front as ``search/pareto.json`` and
``search/pareto.png`` (the last worker to finish logs the complete picture).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
from filelock import FileLock
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from prefsculpt.core.names import Attr
from prefsculpt.core.progress import progress
from prefsculpt.search.errors import SearchInputError
from prefsculpt.search.slots import claim, is_unplanned, storage_trial_id
from prefsculpt.search.space import BASELINE_ATTR, enqueue_plan

log = logging.getLogger(__name__)
UID, PLANNED, AUDIT, DHASH = Attr.UID, Attr.PLANNED, Attr.AUDIT_RUN, Attr.DECISIONS_HASH


# ---------------------------------------------------------------- storage and study
def storage_url(url: str | None) -> str:
    return url or f"sqlite:///{Path.cwd() / 'optuna.db'}"


def open_storage(url: str, sc: Any) -> tuple[Any, Path | None]:
    """Storage for ``url`` and, for file-backed ones, the lock file that serialises plan top-ups."""
    if url.startswith("journal://"):
        path = Path(url[len("journal://"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)

        return optuna.storages.JournalStorage(JournalFileBackend(str(path))), path.with_name(path.name + ".lock")
    if "://" not in url:
        raise SearchInputError(f"search.storage={url!r}: use sqlite:///file.db, journal:///file.log or postgresql://…")
    kwargs: dict[str, Any] = {}
    lock = None
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # several local workers wait, not fail
        path = Path(url.split("sqlite:///", 1)[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
    elif url.startswith("postgres"):
        # A worker's connections idle through a whole trial; the server or a proxy may drop them.
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    try:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat API is "experimental"
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=sc.heartbeat_interval, grace_period=sc.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=None if sc.max_retry is None else int(sc.max_retry)), **kwargs), lock
    except ImportError as exc:
        raise SearchInputError(f"search.storage={url!r} needs a database driver that is not installed ({exc}); "
                               "use sqlite:/// or journal:/// on one machine") from exc


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # conditional space: multivariate + group (STACK §5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchInputError(f"search.sampler={name!r}: use tpe, nsga2 or random")


def n_planned(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: all, minus those a retry replaced (and unplanned ones, and
    halving's late promotions: extra trials)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not is_unplanned(t)]
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    late = sum(t.user_attrs.get(Attr.PROMOTED_FROM) is not None for t in trials)
    return len(trials) - len(replaced) - late


def _lock(path: Path | None) -> contextlib.AbstractContextManager:
    if path is None:
        return contextlib.nullcontext()

    return FileLock(str(path), timeout=120)


def open_study(sc: Any, storage: Any, lock: Path | None, candidates: list, attrs: dict[str, str],
               wait_s: float = 120.0, start: dict[str, Any] | None = None) -> tuple[optuna.Study, bool]:
    """Create the study (and enqueue its plan) or load it; top the plan up to ``n_trials``."""
    name, n = sc.study_name, sc.n_trials
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=["minimize", "maximize"],
                                    sampler=make_sampler(sc.sampler, sc.seed))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        # Other workers draw different random numbers (same seed would give the same startup trials).
        study = optuna.load_study(study_name=name, storage=storage,
                                  sampler=make_sampler(sc.sampler, sc.seed + 1 + os.getpid() % 100_003))
        created = False
    if created:
        for k, v in {**attrs, UID: uuid.uuid4().hex}.items():
            study.set_user_attr(k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["off_target", "on_target"])
        enqueue_plan(study, candidates, n, with_baseline=True, start=start)
        study.set_user_attr(PLANNED, n)
        log.info("search: created study %r with %d trials planned (baseline first%s)", name, n,
                 ", then the informed start" if start and n > 1 else "")
        return study, created
    deadline = time.monotonic() + wait_s
    while PLANNED not in study.user_attrs:  # the creator is still enqueueing
        if time.monotonic() > deadline:
            raise SearchInputError(f"study {name!r} exists but was never planned (its creator died?); delete it or "
                                   "use another search.study_name")
        time.sleep(0.5)
    for k in (AUDIT, DHASH):
        if attrs.get(k) and study.user_attrs.get(k) and attrs[k] != study.user_attrs[k]:
            raise SearchInputError(f"study {name!r} was created with {k}={study.user_attrs[k]}, this worker has "
                                   f"{attrs[k]}: use the same audit/decisions or another search.study_name")
    with _lock(lock):
        have = n_planned(study)
        if have < n:
            has_base = any(t.user_attrs.get(BASELINE_ATTR) for t in study.get_trials(deepcopy=False))
            enqueue_plan(study, candidates, n - have, with_baseline=not has_base)
            study.set_user_attr(PLANNED, n)
            log.info("search: study %r topped up from %d to %d trials", name, have, n)
    return study, created


# ---------------------------------------------------------------- the worker loop
@contextlib.contextmanager
def heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``heartbeat_interval`` s while it runs (RDB storages)."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()
    # The first beat before any work: a trial never beaten is never "stale" to Optuna, so a worker
    # killed before its thread's first beat would leave the trial RUNNING for ever (found by
    # tests/integration/test_faults.py).
    storage.record_heartbeat(trial_id)

    def beat() -> None:
        while not stop.wait(interval):
            storage.record_heartbeat(trial_id)

    th = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], Any], poll_s: float | None = None,
               storage: Any = None, lock: Path | None = None,
               after_trial: Callable[[optuna.Study], Any] | None = None,
               time_budget_s: float | None = None,
               eta: Callable[[optuna.Study], float | None] | None = None,
               clock: Callable[[], float] = time.monotonic) -> list[int]:
    """Pop and run slots until none is left; returns the trial numbers this worker ran.

    ``poll_s``: when nothing is left but others still run, look again every ``poll_s`` s (so a dead
    worker's trial, failed by the heartbeat and re-enqueued, is picked up); None = stop at once.
    ``storage``: the study's storage, whose heartbeat is beaten while a trial runs (None = none).
    ``lock``: a file lock serialising claims (SQLite has no row locks, so two processes can both see
    a slot WAITING and both take it; ``open_storage`` returns it for file-based storages).
    ``after_trial``: called with the study after each trial this worker ran is told (per-trial logs).
    ``time_budget_s``: claim no new trial once this many seconds have passed since the worker started
    (the trial running then finishes; the slots left stay WAITING for a later worker of the study).
    ``eta``: the study's seconds left (e.g. :func:`remaining_seconds`) for the progress line; None or a
    None answer: the remaining count at the average rate so far. ``clock``: the time budget's clock."""
    ran: list[int] = []
    started = clock()
    with progress(study_progress(study)[1], "search", "trials") as bar:
        while True:
            bar.update(*study_progress(study), eta_s=eta(study) if eta is not None else None, **best_so_far(study))
            if time_budget_s is not None and clock() - started >= time_budget_s:
                done, planned = study_progress(study)
                log.info("search: time budget of %.0f s spent after %d of %d trials; this worker claims no more "
                         "(the %d left stay planned: run the study again to go on)", time_budget_s, done, planned,
                         max(planned - done, 0))
                return ran
            _fail_stale(study)
            with _lock(None if lock is None else Path(f"{lock}.claim")):  # not the journal's own lock file
                trial = claim(study)
            if trial is None:
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if poll_s is None or not running:
                    return ran
                time.sleep(poll_s)
                continue
            ran.append(trial.number)
            values, state = None, None
            beat = heartbeat(storage, storage_trial_id(storage, study, trial.number)) if storage is not None else None
            with beat or contextlib.nullcontext():
                try:
                    values = objective(trial)
                except optuna.TrialPruned:
                    state = TrialState.PRUNED
                except KeyboardInterrupt:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    raise
                except Exception as exc:
                    log.warning("search: trial %d failed (%s: %s); the study goes on", trial.number, type(exc).__name__, exc)
                    if "error" not in trial.user_attrs:
                        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
                    state = TrialState.FAIL
            try:
                study.tell(trial, values, state=state)
            except optuna.exceptions.UpdateFinishedTrialError:  # declared dead while it ran; its retry counts
                log.warning("search: trial %d had been failed as stale before it finished", trial.number)
            if after_trial is not None:
                after_trial(study)


def study_progress(study: optuna.Study) -> tuple[int, int]:
    """(trials finished by any worker, trials planned), a retried trial counted once; halving's late
    promotions (extra trials) are added to the plan."""
    trials = [t for t in study.get_trials(deepcopy=False) if not is_unplanned(t)]
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    done = sum(t.state.is_finished() and t.number not in replaced for t in trials)
    late = sum(t.user_attrs.get(Attr.PROMOTED_FROM) is not None for t in trials)
    return done, int(study.user_attrs.get(PLANNED, len(trials) - len(replaced) - late)) + late


def remaining_seconds(study: optuna.Study, early_stop: Any = None) -> float | None:
    """The study's seconds left, from what its finished trials cost (their median, by kind), for a
    progress ETA that means something when trials differ tenfold: with ``early_stop`` on, a trial
    stopped at the first budget costs about a fifth of one trained in full, and halving trains only
    one in ``eta`` of the shaped trials (at least one) in full, plus the baseline. Before any shaped
    trial has finished, the baseline's first budget stands for a stopped trial and its whole time
    for a full one (both pessimistic). None until a trial has finished (the caller's rate-based ETA)."""
    done, planned = study_progress(study)
    left = planned - done
    if left <= 0:
        return 0.0
    planned_trials = [t for t in study.get_trials(deepcopy=False) if not is_unplanned(t)]
    trials = [t for t in planned_trials if t.duration is not None and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not trials:
        return None
    secs = {t.number: t.duration.total_seconds() for t in trials}
    if early_stop is None or not early_stop.get("enabled", False):
        return left * statistics.median(secs.values())
    shaped = [t for t in trials if not t.user_attrs.get(BASELINE_ATTR)]
    full = [secs[t.number] for t in shaped if t.state == TrialState.COMPLETE]
    stopped = [secs[t.number] for t in shaped if t.state == TrialState.PRUNED]
    base = next((t for t in trials if t.user_attrs.get(BASELINE_ATTR)), None)
    base_first = (base.user_attrs.get("first_budget") or {}).get("seconds") if base is not None else None
    cost_stop = statistics.median(stopped) if stopped else base_first
    cost_full = statistics.median(full) if full else (secs[base.number] if base is not None else None)
    if cost_stop is None or cost_full is None:
        return left * statistics.median(secs.values())
    if str(early_stop.get("rule", "halving")) == "halving":
        n_shaped = planned - int(any(t.user_attrs.get(BASELINE_ATTR) for t in planned_trials))
        full_left = max(max(1, n_shaped // max(int(early_stop.get("eta", 1)), 1)) - len(full), 0)
    else:  # dominance: the share of shaped trials that went on so far (all, before any finished)
        share = len(full) / len(shaped) if shaped else 1.0
        full_left = round(left * share)
    full_left = min(full_left, left)
    return full_left * cost_full + (left - full_left) * cost_stop


def best_so_far(study: optuna.Study) -> dict[str, Any]:
    """The Pareto front's size and its trial with the highest on-target effect (for progress lines)."""
    front = [t for t in study.best_trials if t.values is not None] if any(
        t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) else []
    if not front:
        return {}
    best = max(front, key=lambda t: t.values[1])
    return {"pareto": len(front), "best": f"#{best.number} on={best.values[1]:.3g} off={best.values[0]:.3g}"}


# ---------------------------------------------------------------- results
def pareto_mask(off: np.ndarray, on: np.ndarray) -> np.ndarray:
    """(n,), (n,) -> (n,) bool: not dominated (another point with off <= and on >=, one strictly)."""
    off, on = np.asarray(off, float), np.asarray(on, float)
    le = (off[None, :] <= off[:, None]) & (on[None, :] >= on[:, None])  # [i, j]: j at least as good as i
    lt = (off[None, :] < off[:, None]) | (on[None, :] > on[:, None])
    return ~(le & lt).any(axis=1)


def hypervolume(off: np.ndarray, on: np.ndarray, ref: tuple[float, float]) -> float:
    """Area of the objective plane that the points dominate *and* that improves on ``ref``
    (``off`` minimised, ``on`` maximised): 0 when no point beats ``ref`` on both.

    With ``ref`` = (plain DPO's off-target, its on-target − the promote gate's tolerance), it is the
    area of "less off-target learning than plain DPO at an on-target cost inside the gate" that the
    search has found; it can only grow as trials finish, so its history shows the search converge."""
    off, on = np.asarray(off, float), np.asarray(on, float)
    keep = np.isfinite(off) & np.isfinite(on) & (off < ref[0]) & (on > ref[1])
    area, top = 0.0, ref[1]
    for o, a in sorted(zip(off[keep], on[keep], strict=True)):  # ascending off; a step down each time
        if a > top:
            area += (ref[0] - o) * (a - top)
            top = a
    return area


def hypervolume_history(df: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per complete trial, in trial order: the front's hypervolume over the trials complete so far
    (``hypervolume``), against the plain-DPO baseline's reference point (empty until it finished)."""
    done = df[df["state"] == "COMPLETE"].sort_values("trial") if len(df) else df
    base = done[done["baseline"]] if len(done) else done
    if base.empty:
        return pd.DataFrame(columns=["trial", "n_complete", "hypervolume"])
    ref = (float(base["off_target"].iloc[0]), float(base["on_target"].iloc[0]) - tolerance)
    off, on = done["off_target"].to_numpy(float), done["on_target"].to_numpy(float)
    return pd.DataFrame({"trial": done["trial"].to_numpy(), "n_complete": np.arange(1, len(done) + 1),
                         "hypervolume": [hypervolume(off[: k + 1], on[: k + 1], ref) for k in range(len(done))]})


def trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if is_unplanned(t):
            continue
        u = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name, "baseline": bool(u.get(BASELINE_ATTR, False)),
                     "shaping": u.get("shaping", ""), "off_target": u.get("off_target", np.nan),
                     "on_target": u.get("on_target", np.nan), "syc_increase": u.get("syc_increase", np.nan),
                     "style_drift": u.get("style_drift", np.nan), "mlflow_run_id": u.get("mlflow_run_id", ""),
                     "train_run_id": u.get("train_run_id") or "", "model_uri": u.get("model_uri") or "",
                     "retry_of": t.system_attrs.get("failed_trial", ""), "error": u.get("error", ""),
                     "first_off": u.get("first_budget", {}).get("off", np.nan),
                     "first_on": u.get("first_budget", {}).get("on", np.nan),
                     "pruned_at": u.get("pruned_at", ""),
                     # a trial number, or "quota" (halving: on the front, but the promotions were taken)
                     "pruned_by": "" if u.get("pruned_by") is None else str(u["pruned_by"]),
                     "promoted": bool(u.get("promoted", False)),
                     # halving's late promotion: this trial trains that stopped trial's parameters in full
                     "promoted_from": "" if u.get(Attr.PROMOTED_FROM) is None else str(u[Attr.PROMOTED_FROM]),
                     "params": str(t.params)})
    df = pd.DataFrame(rows)
    done = (df["state"] == "COMPLETE") if len(df) else pd.Series([], dtype=bool)
    df["pareto"] = False
    if done.any():
        df.loc[done, "pareto"] = pareto_mask(df.loc[done, "off_target"], df.loc[done, "on_target"])
    return df


def pareto_figure(df: pd.DataFrame):

    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    done = df[df["state"] == "COMPLETE"]
    ax.scatter(done["off_target"], done["on_target"], c="#9aa5b1", label="trials")
    front = done[done["pareto"]].sort_values("off_target")
    ax.plot(front["off_target"], front["on_target"], "o-", c="#3b7dd8", label="Pareto front")
    base = done[done["baseline"]]
    ax.scatter(base["off_target"], base["on_target"], marker="*", s=220, c="#d8603b", label="plain DPO", zorder=3)
    for r in done.itertuples():
        ax.annotate(str(r.trial), (r.off_target, r.on_target), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("off-target (sycophancy + style drift vs base) ↓")
    ax.set_ylabel("on-target preference accuracy ↑")
    ax.legend(fontsize=8)
    ax.set_title(f"{len(done)} complete trials, {len(front)} on the front")
    fig.tight_layout()
    return fig


def hypervolume_figure(hv: pd.DataFrame):
    matplotlib.use("Agg")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.step(hv["n_complete"], hv["hypervolume"], where="post", c="#3b7dd8")
    ax.scatter(hv["n_complete"], hv["hypervolume"], s=12, c="#3b7dd8")
    ax.set_xlabel("complete trials")
    ax.set_ylabel("hypervolume vs plain DPO ↑")
    ax.set_title("Pareto front's hypervolume as trials finish")
    fig.tight_layout()
    return fig


def log_hypervolume(df: pd.DataFrame, tolerance: float, hv: pd.DataFrame | None = None) -> float | None:
    """Log ``search/hypervolume`` on the active run at step = complete trials, once per step (a failed
    trial adds no point); returns the latest value (None before the baseline has finished).
    ``hv``: the history when the caller already has it."""
    hv = hypervolume_history(df, tolerance) if hv is None else hv
    if hv.empty:
        return None
    value, step = float(hv["hypervolume"].iloc[-1]), int(hv["n_complete"].iloc[-1])
    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_metric_history(run_id, "search/hypervolume")
    if not logged or max(m.step for m in logged) < step:
        mlflow.log_metric("search/hypervolume", value, step=step)
    return value


def log_results(df: pd.DataFrame, tolerance: float = 0.0) -> dict[str, float]:

    mlflow.log_table(df, "search/trials.json")
    mlflow.log_table(df[df["pareto"]], "search/pareto.json")
    fig = pareto_figure(df)
    mlflow.log_figure(fig, "search/pareto.png")
    plt.close(fig)
    counts = df["state"].value_counts() if len(df) else pd.Series(dtype=int)
    metrics = {f"search/n_{s.lower()}": float(counts.get(s, 0))
               for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    metrics["search/n_pareto"] = float(df["pareto"].sum())
    hv = hypervolume_history(df, tolerance)
    if not hv.empty:
        mlflow.log_table(hv, "search/hypervolume.json")
        fig = hypervolume_figure(hv)
        mlflow.log_figure(fig, "search/hypervolume.png")
        plt.close(fig)
    mlflow.log_metrics(metrics)
    hv_last = log_hypervolume(df, tolerance, hv)  # a worker that ran nothing still shows the study's figure
    if hv_last is not None:
        metrics["search/hypervolume"] = hv_last
    return metrics
