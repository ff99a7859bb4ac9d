"""Taking the study's enqueued slots with public Optuna APIs only.

The worker that creates a study enqueues every trial as a WAITING slot (``space.enqueue_plan``);
workers only ever run slots. ``Study.ask()`` pops a WAITING trial atomically (only one worker's
WAITING -> RUNNING update succeeds), but when none is left it creates a new trial instead. So
:func:`claim` asks only when it saw a slot, and when another worker took the last one in between,
the trial ``ask()`` created is closed at once as FAIL with the user attr :data:`UNPLANNED`; such a
trial never ran and does not count (``study.n_planned``, ``study.trials_table`` skip it).
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


def claim(study: optuna.Study) -> optuna.Trial | None:
    """Pop one WAITING slot as a running trial, or None when there is none (never creates a trial)."""
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
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
