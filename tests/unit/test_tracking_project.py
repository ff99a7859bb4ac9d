"""Under `mlflow run` (simulated by its environment), tracking.uri and tracking.experiment still decide
where the stages log (issue 14.6)."""

import os

import mlflow
import pytest

from prefsculpt.config import compose
from prefsculpt.core.names import Tag
from prefsculpt.tracking.runs import PROJECT_RUN, adopt_project_run, stage_run


@pytest.fixture
def project_run(mlflow_uri, monkeypatch):
    """What `mlflow run` sets up: a RUNNING run and the environment naming it."""
    def make(experiment: str | None):
        client = mlflow.MlflowClient(mlflow_uri)
        exp_id = client.create_experiment(experiment) if experiment else "0"  # no --experiment-name: Default
        run = client.create_run(exp_id)
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)
        return run.info.run_id

    token = PROJECT_RUN.set(None)
    yield make
    PROJECT_RUN.reset(token)


def test_no_experiment_name_means_the_configured_experiment_not_default(project_run, mlflow_uri):
    pid = project_run(None)
    cfg = compose(["tracking.experiment=mine"])
    assert adopt_project_run(cfg) is False
    assert "MLFLOW_RUN_ID" not in os.environ
    with stage_run(cfg, "prepare") as run:
        pass
    client = mlflow.MlflowClient(mlflow_uri)
    got = client.get_run(run.info.run_id)
    assert got.info.experiment_id == client.get_experiment_by_name("mine").experiment_id
    assert got.data.tags[Tag.PROJECT_RUN] == pid and got.data.tags[Tag.COMPLETE] == "true"
    assert client.get_run(pid).data.tags[Tag.LOGGED_TO].endswith(":: mine")


def test_an_explicit_experiment_name_keeps_the_project_run(project_run, mlflow_uri):
    pid = project_run("chosen")
    cfg = compose(["tracking.experiment=mine"])
    assert adopt_project_run(cfg) is True
    with stage_run(cfg, "prepare") as run:
        pass
    assert run.info.run_id == pid  # the stage is the project's run, in the experiment mlflow run was given


def test_tracking_uri_of_another_store_wins_over_the_project_store(project_run, mlflow_uri, tmp_path):
    pid = project_run("chosen")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    cfg = compose([f"tracking.uri={other}", "tracking.experiment=mine"])
    assert adopt_project_run(cfg) is False
    with stage_run(cfg, "prepare") as run:
        pass
    got = mlflow.MlflowClient(other).get_run(run.info.run_id)
    assert got.data.tags[Tag.PROJECT_RUN] == pid and got.data.tags[Tag.STAGE] == "prepare"
    assert os.environ["MLFLOW_TRACKING_URI"] == other
