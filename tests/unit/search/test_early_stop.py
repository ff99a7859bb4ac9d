"""Stop early what will not win: a trial dominated beyond noise at its first budget is PRUNED in Optuna
and on its MLflow run (which ends FINISHED, tagged with where it stopped); the others train in full."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from prefsculpt.search.objective import (
    Outcome,
    dominated_beyond_noise,
    first_budget_config,
    halving_decision,
    objective_halfwidths,
)
from prefsculpt.stages.search import run_search
from tests.unit.search.helpers import compose_cfg, fake_audit_run

HW = 0.02  # every synthetic figure's 95% CI half-width


def _me(off, on, hw=HW):
    return {"off": off, "on": on, "off_hw": hw, "on_hw": hw}


@pytest.mark.parametrize(("other", "dominated"), [
    (_me(0.10, 0.80), True),    # better off-target beyond noise, same on-target
    (_me(0.19, 0.85), True),    # better on-target beyond noise, off-target within noise
    (_me(0.10, 0.75), False),   # better off-target but clearly worse on-target: a trade-off
    (_me(0.19, 0.81), False),   # better on both, but inside the noise
    (_me(0.25, 0.90), False),   # much better on-target, clearly worse off-target
])
def test_dominated_beyond_noise(other, dominated):
    me = _me(0.20, 0.80)
    assert (dominated_beyond_noise(me, [other]) is other) == dominated


def test_objective_halfwidths_come_from_the_logged_cis():
    ocfg = compose_cfg.__globals__["SearchConfig"]().objectives
    m = {"syc/planted/shift_diff": 0.1, "syc/planted/shift_diff_lo": 0.04, "syc/planted/shift_diff_hi": 0.16,
         "cap/pref/implicit_acc": 0.8, "cap/pref/implicit_acc_lo": 0.75, "cap/pref/implicit_acc_hi": 0.85}
    assert objective_halfwidths(m, ocfg) == pytest.approx({"off": 0.06, "on": 0.05})
    assert objective_halfwidths({}, ocfg) == {"off": 0.0, "on": 0.0}


def test_first_budget_config_cuts_pairs_epochs_and_items():
    t = OmegaConf.create({"train": {"max_pairs": 400, "epochs": 2, "val_pairs": 128, "log_policy": None},
                          "eval": {"sycophancy": {"planted_probes": 300, "max_items": None},
                                   "style": {"n_prompts": 40, "in_domain": 20},
                                   "capability": {"clean_pairs": 100, "known_answer": 100, "kl": True}}})
    es = OmegaConf.create({"pairs_share": 0.25, "epochs": 1, "eval_share": 0.34})
    f, what = first_budget_config(t, es)
    assert (f.train.max_pairs, f.train.epochs, f.train.val_pairs) == (100, 1, 0)  # no validation loss there
    assert f.train.log_policy == "none"  # evaluated from the local folder; nothing logged for a first budget
    assert (f.eval.sycophancy.planted_probes, f.eval.style.n_prompts, f.eval.style.in_domain) == (102, 14, 7)
    # only what the objectives read: clean pairs (on-target), no known-answer probes, no KL
    assert (f.eval.capability.clean_pairs, f.eval.capability.known_answer, f.eval.capability.kl) == (34, 0, False)
    assert what == "100 pairs x 1 epoch(s), 34% of the select items"
    assert t.train.max_pairs == 400 and t.train.val_pairs == 128  # the full budget's config is untouched


def _r(trial, off, on):
    return {"trial": trial, "off": off, "on": on}


def test_halving_promotes_front_trials_up_to_one_per_eta():
    base = _r(0, 0.20, 0.80)
    # on the front, first shaped trial: promoted (quota max(1, 1 // 5) = 1)
    go, later, _, _ = halving_decision(_r(1, 0.10, 0.80), [base], [], 0, 1, 5)
    assert go and later == []
    # dominated by the baseline: never promoted, named
    go, later, why, by = halving_decision(_r(2, 0.25, 0.75), [base], [], 0, 1, 5)
    assert not go and later == [] and by == 0 and "trial 0" in why
    # on the front but the quota is taken: 1 promoted of 4 measured, quota max(1, 4 // 5) = 1
    go, later, why, by = halving_decision(_r(4, 0.05, 0.70), [base, _r(1, 0.10, 0.80)], [], 1, 4, 5)
    assert not go and later == [] and by == "quota" and "search.early_stop.eta" in why
    # the 10th shaped trial on the front opens a second promotion
    assert halving_decision(_r(10, 0.05, 0.70), [base, _r(1, 0.10, 0.80)], [], 1, 10, 5)[0]
    # a trade-off is not dominated; equal points do not dominate each other
    assert halving_decision(_r(3, 0.20, 0.80), [base], [], 0, 1, 5)[0]


def test_halving_promotes_a_waiting_front_trial_late_when_it_is_better():
    base, t1 = _r(0, 0.20, 0.80), _r(1, 0.10, 0.80)
    t4 = _r(4, 0.02, 0.79)  # stopped by the quota earlier, still on the front
    # the 10th measured opens a promotion: the waiting trial 4 (lower off-target) takes it, not this one
    me = _r(10, 0.05, 0.85)
    go, later, why, by = halving_decision(me, [base, t1, t4], [t4], 1, 10, 5, on_floor=0.77)
    assert not go and later == [t4] and by == "quota"
    # one that dominates the waiting trial takes the promotion itself; trial 4 is off the front
    me = _r(10, 0.01, 0.80)
    go, later, _, _ = halving_decision(me, [base, t1, t4], [t4], 1, 10, 5, on_floor=0.77)
    assert go and later == []
    # on-target under the floor (the baseline's first-budget on-target less the gate's tolerance) ranks last
    low = _r(4, 0.01, 0.60)
    go, later, _, _ = halving_decision(_r(10, 0.05, 0.85), [base, t1, low], [low], 1, 10, 5, on_floor=0.77)
    assert go and later == []
    # two promotions free: both the waiting trial and this one
    go, later, _, _ = halving_decision(_r(15, 0.05, 0.85), [base, t1, t4], [t4], 1, 15, 5, on_floor=0.77)
    assert go and later == [t4]


class BudgetRunner:
    """Plain DPO: off 0.20, on 0.80. Shaped trials: clearly worse on both at every budget when
    ``bad``, else better off-target at the same on-target. Counts calls per budget."""

    def __init__(self, bad: bool):
        self.bad, self.calls = bad, {"first": 0, "full": 0}

    def values(self, cfg, first: bool) -> tuple[float, float]:
        shaped = bool(OmegaConf.to_container(cfg.shaping.concepts))
        return 0.20 + (0.10 if self.bad else -0.10) * shaped, 0.80 - (0.10 if self.bad else 0.0) * shaped

    def __call__(self, cfg) -> Outcome:
        first = cfg.get("train") is not None and int(cfg.train.epochs) == 1
        self.calls["first" if first else "full"] += 1
        off, on = self.values(cfg, first)
        m = {"syc/planted/shift_diff": off, "syc/planted/shift_diff_lo": off - HW, "syc/planted/shift_diff_hi": off + HW,
             "style/emoji/rate_diff": 0.0,
             "cap/pref/implicit_acc": on, "cap/pref/implicit_acc_lo": on - HW, "cap/pref/implicit_acc_hi": on + HW}
        with mlflow.start_run(run_name="train", nested=True, tags={"prefsculpt.stage": "train"}) as tr:
            pass
        with mlflow.start_run(run_name="evaluate", nested=True, tags={"prefsculpt.stage": "evaluate"}) as ev:
            mlflow.log_metrics(m)
        return Outcome(tr.info.run_id, ev.info.run_id, None, m)


def _cfg(tmp_path, **es):
    cfg = compose_cfg(tmp_path, n_trials=4, early_stop={"enabled": True, "rule": "dominance", "min_results": 1, **es})
    OmegaConf.set_struct(cfg, False)
    cfg.train = {"max_pairs": 400, "epochs": 2}
    return cfg


def test_dominated_trials_are_pruned_in_optuna_and_mlflow(mlflow_uri, tmp_path):
    cfg = _cfg(tmp_path)
    fake_audit_run(tmp_path)
    runner = BudgetRunner(bad=True)
    out = run_search(cfg, runner=runner)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=cfg.search.storage)
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.PRUNED, 2: TrialState.PRUNED, 3: TrialState.PRUNED}
    assert runner.calls == {"first": 4, "full": 1}  # the baseline at both budgets, the rest stopped at the first
    for t in study.trials[1:]:
        assert t.user_attrs["pruned_at"] == "100 pairs x 1 epoch(s), 34% of the select items"
        assert t.user_attrs["pruned_by"] == 0 and t.values is None
    runs = {r.data.tags["prefsculpt.trial_number"]: r for r in mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`prefsculpt.stage` = 'trial'", output_format="list")}
    assert runs["0"].data.tags["prefsculpt.trial_state"] == "COMPLETE"
    for n in ("1", "2", "3"):
        r = runs[n]
        assert r.info.status == "FINISHED" and r.data.tags["prefsculpt.trial_state"] == "PRUNED"
        assert r.data.tags["prefsculpt.pruned_at"].startswith("100 pairs") and r.data.tags["prefsculpt.pruned_by"] == "0"
        assert r.data.metrics["search/first/off_target"] == pytest.approx(0.30)
        assert "search/off_target" not in r.data.metrics  # no full-budget figure for a stopped trial
    assert out["metrics"]["search/n_pruned"] == 3 and out["metrics"]["search/n_complete"] == 1
    budgets = [r.data.tags.get("prefsculpt.budget") for r in mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`prefsculpt.stage` = 'evaluate'", output_format="list")]
    assert budgets.count("first") == 4 and budgets.count(None) == 1


def test_trials_that_are_not_dominated_train_in_full(mlflow_uri, tmp_path):
    cfg = _cfg(tmp_path)
    fake_audit_run(tmp_path)
    runner = BudgetRunner(bad=False)
    run_search(cfg, runner=runner)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=cfg.search.storage)
    assert all(t.state == TrialState.COMPLETE for t in study.trials) and len(study.trials) == 4
    assert runner.calls == {"first": 4, "full": 4}
    assert all(t.user_attrs["first_budget"]["off"] == pytest.approx(0.2 if i == 0 else 0.1)
               for i, t in enumerate(study.trials))


@pytest.mark.parametrize("rule", ["dominance", "halving"])
def test_a_baseline_that_may_not_dominate_stops_no_shaped_trial(mlflow_uri, tmp_path, rule):
    """``baseline_dominates=false``: plain DPO's first budget (better on both here) stops nobody; the
    shaped trials compete among themselves (all equal: none dominated; halving's quota still binds),
    and halving's on-target floor still comes from it. The default (it may dominate) stops all three:
    test_dominated_trials_are_pruned_in_optuna_and_mlflow."""
    cfg = _cfg(tmp_path, rule=rule, eta=5, baseline_dominates=False)
    fake_audit_run(tmp_path)
    runner = BudgetRunner(bad=True)
    run_search(cfg, runner=runner)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=cfg.search.storage)
    by = [t.user_attrs.get("pruned_by") for t in study.trials[1:]]
    assert 0 not in by
    if rule == "dominance":  # no shaped result dominates another: all three train in full
        assert all(t.state == TrialState.COMPLETE for t in study.trials) and runner.calls == {"first": 4, "full": 4}
    else:  # trial 1 takes the one promotion of the first 4; 2 and 3 wait for the quota
        assert [t.state for t in study.trials[1:]] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
        assert by == [None, "quota", "quota"] and runner.calls == {"first": 4, "full": 2}


def test_halving_trains_one_front_trial_in_full_per_eta(mlflow_uri, tmp_path):
    cfg = _cfg(tmp_path, rule="halving", eta=5)
    fake_audit_run(tmp_path)
    runner = BudgetRunner(bad=False)  # every shaped trial on the front (better off-target, same on-target)
    out = run_search(cfg, runner=runner)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=cfg.search.storage)
    states = [t.state for t in study.trials]
    # baseline in full; trial 1 takes the one promotion of the first 4 shaped trials; 2 and 3 stop although
    # they are on the front (they tie trial 1): the quota, named on the trial and its run
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert runner.calls == {"first": 4, "full": 2}
    assert study.trials[1].user_attrs["promoted"] is True
    for t in study.trials[2:]:
        assert t.user_attrs["pruned_by"] == "quota" and "promoted" not in t.user_attrs
    runs = {r.data.tags["prefsculpt.trial_number"]: r for r in mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`prefsculpt.stage` = 'trial'", output_format="list")}
    assert runs["2"].data.tags["prefsculpt.pruned_by"] == "quota"
    assert runs["2"].data.tags["prefsculpt.trial_state"] == "PRUNED"
    assert out["metrics"]["search/n_pruned"] == 2 and out["metrics"]["search/n_complete"] == 2


class SequenceRunner(BudgetRunner):
    """First-budget results in the order the trials are measured; full-budget results from the same
    list by shaping (the full budget is not under test here)."""

    def __init__(self, first):
        super().__init__(bad=False)
        self.first, self.i = list(first), 0

    def values(self, cfg, first: bool) -> tuple[float, float]:
        if not first:
            return 0.0, 0.8
        self.i += 1
        return self.first[self.i - 1]


def test_halving_late_promotion_trains_a_stopped_front_trial_in_full(mlflow_uri, tmp_path):
    """eta 2: trial 1 takes the first promotion; trial 2 (better off-target, on the front) is stopped by
    the quota; trial 4 (dominated) opens the second promotion, which goes to trial 2: its parameters are
    enqueued and train in full as trial 5, skipping the first budget."""
    cfg = _cfg(tmp_path, rule="halving", eta=2)
    cfg.search.n_trials = 5
    fake_audit_run(tmp_path)
    runner = SequenceRunner([(0.20, 0.80), (0.10, 0.80), (0.05, 0.80), (0.30, 0.70), (0.30, 0.70)])
    run_search(cfg, runner=runner)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=cfg.search.storage)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                         TrialState.PRUNED, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[2].user_attrs["pruned_by"] == "quota"
    late = trials[5]
    assert late.user_attrs["prefsculpt.promoted_from"] == 2 and late.params == trials[2].params
    assert "first_budget" not in late.user_attrs  # decided on trial 2's first budget
    assert runner.calls == {"first": 5, "full": 3}  # baseline, trial 1, trial 2's parameters
    runs = {r.data.tags["prefsculpt.trial_number"]: r for r in mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`prefsculpt.stage` = 'trial'", output_format="list")}
    assert runs["5"].data.tags["prefsculpt.promoted_from"] == "2"
    assert runs["5"].data.tags["prefsculpt.trial_state"] == "COMPLETE"


def test_a_late_promotion_trains_before_the_planned_slots_left(mlflow_uri, tmp_path):
    """The same study as above with one more planned slot (6): the promotion decided at trial 4 is
    enqueued as trial 6 and trains right after trial 4, before planned slot 5, so a time budget or
    the study's end cannot leave it behind the plan unrun."""
    cfg = _cfg(tmp_path, rule="halving", eta=2)
    cfg.search.n_trials = 6
    fake_audit_run(tmp_path)
    runner = SequenceRunner([(0.20, 0.80), (0.10, 0.80), (0.05, 0.80), (0.30, 0.70), (0.30, 0.70), (0.30, 0.70)])
    run_search(cfg, runner=runner)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=cfg.search.storage)
    trials = study.trials
    assert len(trials) == 7 and trials[6].user_attrs["prefsculpt.promoted_from"] == 2
    order = [t.number for t in sorted(trials, key=lambda t: t.datetime_start)]
    assert order == [0, 1, 2, 3, 4, 6, 5]
    assert trials[6].state == TrialState.COMPLETE and trials[6].params == trials[2].params
    assert trials[5].state == TrialState.PRUNED and runner.calls == {"first": 6, "full": 3}
