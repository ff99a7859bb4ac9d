"""Many workers, one truth: two search worker processes share one Optuna study in PostgreSQL and log
to one ``mlflow server`` (PostgreSQL backend, served artifacts), as on many machines. One worker is
SIGKILL-ed mid-trial: its trial is failed by the heartbeat and retried by the other, the study ends
with every planned trial complete once, and no run is left RUNNING.

Needs the services of ``.ci/services.sh`` (CI starts them): PREFSCULPT_TEST_PG_URL (the Optuna
database) and PREFSCULPT_TEST_MLFLOW_URL (the tracking server). Trials use the tiny configuration
with a cheap runner (train/evaluate child runs with synthetic metrics: what is under test is the
coordination, not training, which tests/integration/test_search_tiny.py runs for real).
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from prefsculpt.config import CONF_DIR as CONF
from prefsculpt.search.config import SearchConfig
from prefsculpt.search.study import n_planned, open_storage
from tests.unit.search.helpers import fake_audit_run

pytestmark = pytest.mark.integration
PG, SERVER = os.environ.get("PREFSCULPT_TEST_PG_URL"), os.environ.get("PREFSCULPT_TEST_MLFLOW_URL")
REPO = Path(__file__).resolve().parents[2]
needs_services = pytest.mark.skipif(
    not (PG and SERVER), reason="PREFSCULPT_TEST_PG_URL / PREFSCULPT_TEST_MLFLOW_URL unset: no PostgreSQL + mlflow "
    "server to test against; start them with `eval \"$(.ci/services.sh start)\"` (CI always does)")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The CI tracking server, a fresh experiment per test (the server outlives the test)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(SERVER)
    yield f"pgworkers-{uuid.uuid4().hex[:8]}"
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def tiny_cfg(tmp_path: Path, experiment: str, n_trials: int):
    from prefsculpt.config import compose

    cfg = compose("experiment=tiny")
    OmegaConf.set_struct(cfg, False)
    search = OmegaConf.load(CONF / "search" / "tiny.yaml")
    search.pop("defaults", None)
    cfg.search = OmegaConf.merge(OmegaConf.structured(SearchConfig), search, {
        "storage": PG, "study_name": f"pgworkers-{uuid.uuid4().hex[:8]}", "n_trials": n_trials, "top_k": 2,
        "methods": ["score", "filter"], "sampler": "random", "heartbeat_interval": 1, "grace_period": 4,
        # every slot must complete (coordination is under test): the dominance rule stops nothing on the fake
        # runner's trade-offs; halving would stop all but one in five by design
        "early_stop": {"rule": "dominance"}})
    cfg.tracking.experiment = experiment
    cfg.cache_dir = str(tmp_path / "cache")
    return cfg


def _worker(mode: str, cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": SERVER, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "tests.integration.pg_worker", mode, str(cfg_path)], cwd=REPO,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(cond, what: str, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a worker exited (rc {p.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.5)


@needs_services
def test_two_workers_one_killed_mid_trial(server, tmp_path):
    from prefsculpt.stages.search import run_search

    n = 4
    cfg = tiny_cfg(tmp_path, server, n)
    fake_audit_run(tmp_path, experiment=server)
    # The study (tables, plan) is created once, before any worker starts.
    created = run_search(OmegaConf.merge(cfg, {"search": {"create_only": True}}))
    assert created["created"] and created["trials_ran"] == []
    storage, _ = open_storage(PG, cfg.search)
    study = optuna.load_study(study_name=str(cfg.search.study_name), storage=storage)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * n

    cfg_path = tmp_path / "worker" / "cfg.yaml"
    cfg_path.parent.mkdir()
    OmegaConf.save(cfg, cfg_path, resolve=True)
    marker = cfg_path.parent / "hung"
    victim = _worker("hang", cfg_path, tmp_path / "victim.log")
    survivor = None
    try:
        _wait(marker.exists, "the victim to start a trial", 180, [victim])
        survivor = _worker("fake", cfg_path, tmp_path / "survivor.log")
        _wait(lambda: any(t.state == TrialState.COMPLETE for t in study.get_trials()),
              "the second worker to finish a trial", 180, [victim, survivor])
        victim.send_signal(signal.SIGKILL)  # mid-trial: no tell, no run ended, no heartbeat
        assert victim.wait(30) == -signal.SIGKILL
        rc = survivor.wait(240)
    finally:
        for p in (victim, survivor):
            if p is not None and p.poll() is None:
                p.kill()
    assert rc == 0, (tmp_path / "survivor.log").read_text()[-3000:]

    # Optuna: the killed trial failed once and was retried (same parameters); every slot complete once.
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, [(t.number, t.state.name) for t in trials]
    dead = failed[0]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == dead.params
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == n == n_planned(study) and len(trials) == n + 1

    # MLflow: one finished trial run per complete trial, none twice; nothing left RUNNING.
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(server)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    uid = created["study_uid"]
    finished = [r for r in runs if r.data.tags.get("prefsculpt.stage") == "trial" and r.info.status == "FINISHED"
                and r.data.tags.get("prefsculpt.study_uid") == uid]
    numbers = sorted(int(r.data.tags["prefsculpt.trial_number"]) for r in finished)
    assert numbers == sorted(t.number for t in done)
    retry_run = next(r for r in finished if int(r.data.tags["prefsculpt.trial_number"]) == retries[0].number)
    assert retry_run.data.tags["prefsculpt.retry_of"] == str(dead.number)

    # The killed worker's runs (its trial, the train run inside it, its search run) were closed KILLED.
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED" and "worker died" in dead_run.data.tags["prefsculpt.error"]
    hung_train = client.get_run(marker.read_text())
    assert hung_train.info.status == "KILLED"
    victim_search = client.get_run(dead_run.data.tags["mlflow.parentRunId"])
    assert victim_search.data.tags["prefsculpt.stage"] == "search" and victim_search.info.status == "KILLED"
    searches = [r for r in runs if r.data.tags.get("prefsculpt.stage") == "search"]
    assert sorted(r.info.status for r in searches) == ["FINISHED", "FINISHED", "KILLED"]  # creator, survivor, victim


@needs_services
def test_racing_promotes_on_the_server_serialise_on_the_postgres_lock(server, tmp_path, monkeypatch):
    """As tests/unit/search/test_promote.py's race, against the server: its database is out of reach,
    so the lock is an advisory lock on the Optuna PostgreSQL (search.storage)."""
    import threading

    import prefsculpt.stages.promote as stage
    from prefsculpt.stages.promote import run_promote
    from tests.unit.search.helpers import compose_cfg
    from tests.unit.search.test_promote import Echo, fake_search

    name = f"race-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(server)
    with mlflow.start_run(run_name="train"):
        uri = mlflow.pyfunc.log_model(name="policy", python_model=Echo(), pip_requirements=[]).model_uri
    good = fake_search(f"good-{name}", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.05, 0.81, 0.04)], uri)
    bad = fake_search(f"bad-{name}", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.08, 0.79, 0.06)], uri)
    real = stage.read_champion

    def slow_read(*args):
        out = real(*args)
        time.sleep(0.5 if args[2]["off_target"] < 0.06 else 3.0)  # without the lock the worse one writes last
        return out

    monkeypatch.setattr(stage, "read_champion", slow_read)
    results, errors = {}, []

    def promote(label, search_run):
        try:
            cfg = compose_cfg(tmp_path, storage=PG)
            cfg.tracking.experiment = server
            cfg.promote.model_name, cfg.promote.search_run_id = name, search_run
            results[label] = run_promote(cfg)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=a) for a in (("bad", bad), ("good", good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    client = mlflow.MlflowClient()
    vg, vb = results["good"]["version"], results["bad"]["version"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == vg
    tg, tb = client.get_model_version(name, vg).tags, client.get_model_version(name, vb).tags
    assert tg["prefsculpt.promote_decision"] == "champion" and "prefsculpt.promote_decision" in tb
    assert {tb["prefsculpt.previous_champion"], tg["prefsculpt.previous_champion"]} in ({"none", vb}, {"none", vg})
    lock = client.get_run(results["good"]["run_id"]).data.tags["prefsculpt.promote_lock"]
    assert lock.startswith(f"postgres lock on postgresql://{PG.split('@')[-1]} (key ")  # the Optuna DB, no user
