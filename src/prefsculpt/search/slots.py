"""Taking the study's enqueued slots with Optuna's own steps (``ask()``, the storage's atomic WAITING -> RUNNING).

The worker that creates a study enqueues every trial as a WAITING slot (``space.enqueue_plan``);
workers only ever run slots. ``Study.ask()`` pops a WAITING trial atomically (only one worker's
WAITING -> RUNNING update succeeds), but when none is left it creates a new trial instead. So
:func:`claim` asks only when it saw a slot, and when another worker took the last one in between,
the trial ``ask()`` created is closed at once as FAIL with the user attr :data:`UNPLANNED`; such a
trial never ran and does not count (``study.n_planned``, ``study.trials_table`` skip it).

A late promotion (halving: a stopped front trial enqueued to train in full, user attr
``Attr.PROMOTED_FROM``) is claimed before the planned slots: ``ask()`` pops the oldest WAITING trial,
which would put the promotion behind every planned slot, where a time budget or the end of the study
can leave it unrun. :func:`claim` takes it with the storage's own atomic step, the one ``ask()`` uses
(``set_trial_state_values(..., RUNNING)`` succeeds for one worker only), then opens it as
``optuna.Trial``; a worker that loses that race falls back to the planned slots.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from prefsculpt.core.names import Attr

#: User attr of a trial ``ask()`` created although the plan had no slot left (never run).
UNPLANNED = Attr.UNPLANNED


def frozen_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """The stored record of trial ``number`` (system attrs included)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _enqueued(t: FrozenTrial) -> bool:
    # Study.enqueue_trial stores the given params (``{}`` for an empty slot) as the system attr
    # "fixed_params", and the heartbeat retry copies it: a trial ask() created has none.
    return "fixed_params" in t.system_attrs


def _claim_promoted(study: optuna.Study, storage: Any, waiting: list[FrozenTrial]) -> optuna.Trial | None:
    """The oldest WAITING late promotion as a running trial, or None (none waits, or others won them)."""
    for t in waiting:
        if t.user_attrs.get(Attr.PROMOTED_FROM) is None:
            continue
        trial_id = storage_trial_id(storage, study, t.number)
        try:
            won = storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker ran it to the end meanwhile
            won = False
        if won:
            return optuna.Trial(study, trial_id)
    return None


def claim(study: optuna.Study) -> optuna.Trial | None:
    """Pop one WAITING slot as a running trial, late promotions first, or None when there is none
    (never creates a trial)."""
    # the study's own storage object, as ask() uses it (for an RDB storage, Optuna's caching wrapper:
    # the raw storage would leave that cache believing the slot still WAITING); Study has no public accessor
    storage = study._storage  # noqa: SLF001
    while waiting := study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        promoted = _claim_promoted(study, storage, waiting)
        if promoted is not None:
            return promoted
        with warnings.catch_warnings():
            # ask() warns that heartbeats are meant for optimize(); run_worker beats them itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()
        if _enqueued(frozen_trial(study, trial.number)):
            return trial
        trial.set_user_attr(UNPLANNED, True)
        study.tell(trial, state=TrialState.FAIL)
    return None


def is_unplanned(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get(UNPLANNED))


def storage_trial_id(storage: Any, study: optuna.Study, number: int) -> int:
    """The storage's id of trial ``number`` (what heartbeats are recorded under)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def retry_of(trial: optuna.Trial) -> int | None:
    """The number of the trial this one retries (its worker died), else None: the system attr the
    heartbeat retry callback (``RetryHeartbeatStaleTrialCallback``) writes on the stored trial."""
    return frozen_trial(trial.study, trial.number).system_attrs.get("failed_trial")
