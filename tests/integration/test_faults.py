"""Faults survived: each stage is SIGKILLed once at a named point (``PREFSCULPT_FAULT``, see
``prefsculpt.core.faults``), the same command is run again, and it must exit 0, resume into the
SAME MLflow run (one FINISHED run per stage, tagged ``prefsculpt.reattached``; no RUNNING orphan)
and, where the stage is deterministic, end with the results of an uninterrupted run.

One tracking store, cache and tiny random llama for the whole module; the tests run in file order
(prepare -> sae -> audit -> train -> search -> ``mlflow run`` main), each stage reading the last.
The CLI runs in a subprocess, as a user would start it.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.tiny import make_model_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = make_model_dir(root / "tiny-llama")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = (f"experiment=tiny model.name_or_path={model} sae.layer=2 sae.training_tokens=20000 "
            f"cache_dir={root / 'cache'} eval.evals=[sycophancy,capability] eval.bootstrap=50 "
            "eval.capability.known_answer=0 eval.capability.kl=false train.max_pairs=8 "
            f"search.n_trials=2 search.heartbeat_interval=1 search.grace_period=3 "
            f"search.storage=sqlite:///{root / 'optuna.db'} search.objectives.style_weight=0")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.set_tracking_uri(uri)
    proc_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                "PREFSCULPT_LOG_LEVEL": "WARNING"}
    yield {"root": root, "uri": uri, "base": base, "env": proc_env}
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _cli(env, stage, fault=None, after=1, extra=""):
    e = dict(env["env"])
    if fault:
        e.update(PREFSCULPT_FAULT=fault, PREFSCULPT_FAULT_AFTER=str(after))
    return subprocess.run([sys.executable, "-m", "prefsculpt.cli", stage, "--overrides", f"{env['base']} {extra}"],
                          cwd=env["root"], env=e, capture_output=True, text=True, timeout=900)


def _kill_then_rerun(env, stage, fault, after=1, extra=""):
    killed = _cli(env, stage, fault, after, extra)
    assert killed.returncode == KILLED, f"{fault} was never reached:\n{killed.stderr[-3000:]}"
    again = _cli(env, stage, extra=extra)
    assert again.returncode == 0, again.stderr[-3000:]
    return _one_finished_run(stage)


def _runs(filt, experiment="prefsculpt"):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filt) if exp else []


def _one_finished_run(stage, experiment="prefsculpt"):
    runs = _runs(f"tags.`prefsculpt.stage` = '{stage}'", experiment)
    assert [(r.info.status, r.data.tags.get("prefsculpt.reattached")) for r in runs] == [("FINISHED", "1")]
    running = [(r.info.run_name, r.data.tags.get("prefsculpt.stage"))
               for r in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                           filter_string="attributes.status = 'RUNNING'")]
    assert running == []  # no orphan
    assert not list(Path(mlflow.get_tracking_uri()[len("sqlite:///"):]).parent.glob("cache/runs/*/*.json"))
    return runs[0]


def _baseline(env, stage):
    """The same stage uninterrupted, in this process, with its own cache and experiment."""
    from prefsculpt.cli import run_stage

    return run_stage(stage, f"{env['base']} cache_dir={env['root'] / 'cache-baseline'} tracking.experiment=baseline")


def test_prepare_killed_after_upload_resumes_into_its_run(env):
    run = _kill_then_rerun(env, "prepare", "prepare:logged")
    base = mlflow.MlflowClient().get_run(_baseline(env, "prepare")["run_id"])
    assert run.data.metrics == base.data.metrics
    assert run.data.tags["prefsculpt.data_digest"] == base.data.tags["prefsculpt.data_digest"]


def test_sae_killed_after_its_first_shard_resumes_and_scores_like_an_uninterrupted_run(env, tmp_path):
    from prefsculpt.concepts.shards import load_scores
    from prefsculpt.core.files import _host_tag

    # what a killed writer leaves: a temporary of a dead process (no pid 2**22 + 1) of this host
    stale = env["root"] / "cache" / "scores" / f".tmp-x-4194305.{_host_tag()}-0123abcd"
    stale.mkdir(parents=True)
    run = _kill_then_rerun(env, "sae", "sae:shard")
    base_id = _baseline(env, "sae")["run_id"]
    got = [load_scores(Path(mlflow.artifacts.download_artifacts(run_id=r, artifact_path="scores",
                                                                   dst_path=str(tmp_path / r))))
           for r in (run.info.run_id, base_id)]
    assert got[0].pair_ids == got[1].pair_ids and got[0].concept_names == got[1].concept_names
    for span in ("chosen", "rejected"):
        np.testing.assert_allclose(got[0].get(span, "max"), got[1].get(span, "max"), rtol=1e-5, atol=1e-6)
    assert run.data.metrics["n_tokens"] == mlflow.MlflowClient().get_run(base_id).data.metrics["n_tokens"]
    assert not stale.exists()  # cleaned at the start of a stage


def test_audit_killed_after_download_resumes_into_its_run(env):
    run = _kill_then_rerun(env, "audit", "audit:scores")
    assert run.data.tags["prefsculpt.complete"] == "true" and "n_tested" in run.data.metrics


def test_train_killed_after_a_checkpoint_resumes_from_it_in_its_run(env):
    run = _kill_then_rerun(env, "train", "train:checkpoint", extra="train.checkpoint_every_n_steps=1")
    assert run.data.tags["prefsculpt.resumed"] == "true"  # from last.ckpt, not from step 0
    assert run.data.metrics["train/optimizer_steps"] == 2  # 8 pairs / batch 4, as uninterrupted


def test_search_killed_as_a_trial_starts_resumes_its_run_and_study(env):
    import optuna

    run = _kill_then_rerun(env, "search", "search:trial")
    uid = run.data.tags["prefsculpt.study_uid"]
    trials = _runs(f"tags.`prefsculpt.stage` = 'trial' and tags.`prefsculpt.study_uid` = '{uid}'")
    assert sorted(t.info.status for t in trials) == ["FINISHED", "FINISHED"]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {run.info.run_id}
    study = optuna.load_study(study_name=run.data.tags["prefsculpt.study_name"],
                              storage=f"sqlite:///{env['root'] / 'optuna.db'}")
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]  # the killed trial failed as stale, retried once


def test_mlflow_run_killed_resumes_into_the_same_project_run(env):
    """``mlflow run`` creates a new run per attempt; the rerun resumes the killed one, its own run points there."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_cli), "run", str(REPO), "-e", "main", "--env-manager", "local", "--experiment-name", "mlrun",
           "-P", f"overrides={env['base']} pipeline.stages=[prepare,sae]"]
    e = dict(env["env"], PREFSCULPT_FAULT="sae:activations")
    killed = subprocess.run(cmd, cwd=env["root"], env=e, capture_output=True, text=True, timeout=900)
    assert killed.returncode != 0
    e.pop("PREFSCULPT_FAULT")
    again = subprocess.run(cmd, cwd=env["root"], env=e, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    (main,) = _runs("tags.`prefsculpt.stage` = 'main'", "mlrun")  # one pipeline run, resumed
    assert main.info.status == "FINISHED" and main.data.tags["prefsculpt.reattached"] == "1"
    kids = _runs(f"tags.`mlflow.parentRunId` = '{main.info.run_id}'", "mlrun")
    assert sorted((k.data.tags["prefsculpt.stage"], k.info.status) for k in kids) == [
        ("prepare", "FINISHED"), ("sae", "FINISHED")]  # one child per stage
    # the second attempt's own run (created by mlflow run) is an empty pointer to it
    (pointer,) = _runs(f"tags.`prefsculpt.resumed_into` = '{main.info.run_id}'", "mlrun")
    assert not pointer.data.metrics and "prefsculpt.stage" not in pointer.data.tags
    assert _runs("attributes.status = 'RUNNING'", "mlrun") == []
