"""Runs a killed worker left RUNNING are closed by whoever finds it dead, never the closer's own runs;
``search.create_only`` creates the study and its plan without running a trial."""

import mlflow
import optuna
from optuna.trial import TrialState

from prefsculpt.stages.search import run_search
from prefsculpt.tracking.orphans import close_dead_run_tree, own_lineage
from tests.unit.search.helpers import FakeRunner, compose_cfg, fake_audit_run


def _status(run_id):
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_dead_worker_tree_is_closed_but_not_the_closers_own_runs(mlflow_uri):
    client = mlflow.MlflowClient()
    exp = client.create_experiment("orph")
    # what a SIGKILL leaves: search -> trial -> train, all RUNNING, plus a finished sibling trial
    dead_search = client.create_run(exp, run_name="search").info.run_id
    kid = {"mlflow.parentRunId": dead_search}
    dead_trial = client.create_run(exp, run_name="trial-000", tags=kid).info.run_id
    done_trial = client.create_run(exp, run_name="trial-001", tags=kid).info.run_id
    client.set_terminated(done_trial, "FINISHED")
    train = client.create_run(exp, run_name="train", tags={"mlflow.parentRunId": dead_trial}).info.run_id
    with mlflow.start_run(experiment_id=exp, run_name="survivor") as me:
        closed = close_dead_run_tree(dead_trial, "worker died (test)", spare=own_lineage())
        assert _status(me.info.run_id) == "RUNNING"
    assert sorted(closed) == sorted([dead_trial, train, dead_search])
    assert [_status(r) for r in (dead_trial, train, dead_search, done_trial)] == ["KILLED"] * 3 + ["FINISHED"]
    assert client.get_run(train).data.tags["prefsculpt.error"] == "worker died (test)"
    assert close_dead_run_tree(dead_trial, "again") == []  # nothing RUNNING: a no-op

    # a worker declared dead for its own trial (it was only slow) keeps its own search run open
    with mlflow.start_run(experiment_id=exp, run_name="search") as mine:
        with mlflow.start_run(run_name="trial-002", nested=True) as stale:
            pass
        client.update_run(stale.info.run_id, "RUNNING")
        assert close_dead_run_tree(stale.info.run_id, "stale", spare=own_lineage()) == [stale.info.run_id]
        assert _status(mine.info.run_id) == "RUNNING"


def test_create_only_plans_the_study_and_runs_nothing(mlflow_uri, tmp_path):
    cfg = compose_cfg(tmp_path, n_trials=3, create_only=True)
    fake_audit_run(tmp_path)
    runner = FakeRunner()
    out = run_search(cfg, runner=runner)
    assert out["created"] and out["trials_ran"] == [] and runner.calls == 0
    study = optuna.load_study(study_name=str(cfg.search.study_name), storage=str(cfg.search.storage))
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 3
    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert run.data.tags["prefsculpt.create_only"] == "true" and run.data.tags["prefsculpt.study_uid"] == out["study_uid"]
    cfg.search.create_only = False
    assert run_search(cfg, runner=runner)["trials_ran"] == [0, 1, 2]  # a worker then runs the plan
