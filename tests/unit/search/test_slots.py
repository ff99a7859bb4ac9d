"""Slots are taken with Study.ask (public API): a worker that loses the race for the last slot
leaves no extra trial that counts, and never runs one."""

import optuna
from optuna.trial import TrialState

from prefsculpt.search.slots import UNPLANNED, claim, retry_of
from prefsculpt.search.study import n_planned, trials_table


def _study(n_slots: int) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "maximize"])
    for _ in range(n_slots):
        study.enqueue_trial({})
    return study


def test_claim_pops_slots_in_order_then_stops():
    study = _study(2)
    assert [claim(study).number, claim(study).number] == [0, 1]
    assert claim(study) is None and len(study.get_trials()) == 2


def test_losing_the_race_for_the_last_slot_leaves_an_unplanned_failed_trial_only(monkeypatch):
    study = _study(1)
    ask = study.ask

    def another_worker_first(*a, **k):  # between claim's look and its ask, another worker pops the slot
        monkeypatch.setattr(study, "ask", ask)
        ask()
        return ask()

    monkeypatch.setattr(study, "ask", another_worker_first)
    assert claim(study) is None
    states = {t.number: (t.state, t.user_attrs.get(UNPLANNED, False)) for t in study.get_trials()}
    assert states == {0: (TrialState.RUNNING, False), 1: (TrialState.FAIL, True)}
    assert n_planned(study) == 1  # the plan still has its one trial
    assert trials_table(study)["trial"].tolist() == [0]


def test_retry_of_reads_the_retry_callbacks_record():
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={
        "failed_trial": 7, "retry_history": [7], "fixed_params": {}}))
    study.enqueue_trial({})
    first, second = claim(study), claim(study)
    assert (retry_of(first), retry_of(second)) == (7, None)
