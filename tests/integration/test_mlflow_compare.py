"""The MLflow UI's compare view lines trials up: a real search (the cheap fake runner standing in for
train + evaluate) logs two trial runs, ``mlflow ui`` serves the store on 127.0.0.1, and headless
Chromium opens the compare page of the two trials. Every metric the trials share (the objectives and
the evaluation metrics a trial copies from its evaluate run) is on the page, each with its value.
Screenshot: ``outputs/test_artifacts/compare.png``."""

import json
import subprocess
import urllib.parse

import mlflow
import pytest

from prefsculpt.core import glossary as G
from prefsculpt.stages.search import run_search
from tests.integration.test_mlflow_ui import ART, CHROMIUM, chromium, mlflow_ui
from tests.unit.search.helpers import FakeRunner, compose_cfg, fake_audit_run

pytestmark = pytest.mark.integration


def tall_screenshot(url: str, profile, out) -> None:
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                    f"--user-data-dir={profile}", "--window-size=1400,2400", "--virtual-time-budget=20000",
                    f"--screenshot={out}", url], capture_output=True, timeout=120, check=True)


def two_trials(tmp_path) -> tuple[str, list[mlflow.entities.Run]]:
    cfg = compose_cfg(tmp_path, n_trials=2)
    fake_audit_run(tmp_path)
    out = run_search(cfg, runner=FakeRunner())
    client = mlflow.MlflowClient()
    exp = client.get_run(out["run_id"]).info.experiment_id
    trials = client.search_runs([exp], f"tags.`prefsculpt.stage` = 'trial' and tags.`mlflow.parentRunId` = '{out['run_id']}'",
                                order_by=["tags.`prefsculpt.trial_number` ASC"])
    return exp, trials


def test_compare_view_shows_every_shared_metric_of_two_trials(mlflow_uri, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    exp, trials = two_trials(tmp_path)
    assert len(trials) == 2
    keys = set(trials[0].data.metrics) & set(trials[1].data.metrics)
    assert keys == set(trials[0].data.metrics) == set(trials[1].data.metrics)  # one key set: nothing missing
    assert {"search/off_target", "search/on_target", "syc/planted/p_agree_diff", "cap/pref/implicit_acc"} <= keys
    assert G.unknown(keys) == []  # every key the compare view shows is in the glossary

    with mlflow_ui(mlflow_uri, tmp_path) as url:
        q = urllib.parse.quote
        page = (f"{url}/#/compare-runs?runs={q(json.dumps([t.info.run_id for t in trials]))}"
                f"&experiments={q(json.dumps([exp]))}")
        dom = chromium(page, tmp_path / "prof")
        tall_screenshot(page, tmp_path / "prof", ART / "compare.png")  # the metrics table is below the fold
        for t in trials:
            assert t.info.run_name in dom  # both trials are the compared columns
        missing = sorted(k for k in keys if k not in dom)
        assert not missing, f"metrics not on the compare page: {missing}"
        off = [f"{t.data.metrics['search/off_target']:.3g}"[:4] for t in trials]
        assert all(v in dom for v in off), off
        assert (ART / "compare.png").stat().st_size > 10_000
