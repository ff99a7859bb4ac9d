"""Slots are taken with Study.ask (public API): a worker that loses the race for the last slot
leaves no extra trial that counts, and never runs one."""

import optuna
from optuna.trial import TrialState

from prefsculpt.core.names import Attr
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


def _promote(study: optuna.Study, orig: int) -> None:
    study.enqueue_trial({}, user_attrs={Attr.PROMOTED_FROM: orig})


def test_a_late_promotion_is_claimed_before_the_planned_slots(tmp_path):
    # an RDB storage too: Optuna wraps it in a cache that must see the slot taken
    for storage in (None, f"sqlite:///{tmp_path / 'o.db'}"):
        study = optuna.create_study(directions=["minimize", "maximize"], storage=storage)
        for _ in range(3):
            study.enqueue_trial({})
        _promote(study, 0)
        _promote(study, 1)
        taken = [claim(study) for _ in range(6)]
        assert [t.number if t else None for t in taken] == [3, 4, 0, 1, 2, None]
        assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}
        assert taken[0].user_attrs[Attr.PROMOTED_FROM] == 0 and len(study.get_trials()) == 5


def test_losing_the_race_for_a_promotion_falls_back_to_a_planned_slot(monkeypatch):
    study = _study(1)
    _promote(study, 0)
    storage = study._storage
    cas = storage.set_trial_state_values

    def another_worker_first(trial_id, state, values=None):  # it pops the promotion between look and take
        monkeypatch.setattr(storage, "set_trial_state_values", cas)
        assert cas(trial_id, state=state, values=values)
        return cas(trial_id, state=state, values=values)

    monkeypatch.setattr(storage, "set_trial_state_values", another_worker_first)
    mine = claim(study)
    assert mine is not None and mine.number == 0  # the planned slot, not the promotion again
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.RUNNING]
