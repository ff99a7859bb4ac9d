"""The MLflow UI shows what the search and promotion record: start ``mlflow ui`` on 127.0.0.1 over a
sqlite store holding a search run with nested trial runs and a registered policy, open it in
headless Chromium, and find the runs (with a trial's params) and the registered model in the DOM.
Screenshots are kept under ``outputs/test_artifacts/``."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ART = Path(__file__).resolve().parents[2] / "outputs" / "test_artifacts"
MODEL = "prefsculpt-policy-ui"


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def populate() -> tuple[str, list[tuple[str, str]]]:
    """Experiment id and (run id, run name) of the trials; a registered model with both aliases."""
    mlflow.set_experiment("prefsculpt-ui")
    trials = []
    with mlflow.start_run(run_name="search-worker", tags={"prefsculpt.stage": "search"}) as parent:
        for i, (shape, lam) in enumerate([("False", None), ("True", 0.5)]):
            name = f"trial-00{i}" + (" (plain DPO baseline)" if i == 0 else "")
            with mlflow.start_run(run_name=name, nested=True, tags={"prefsculpt.stage": "trial"}) as t:
                mlflow.log_params({"shape/length": shape, **({"lambda/length": lam} if lam else {})})
                mlflow.log_metrics({"search/off_target": 0.3 - 0.1 * i, "search/on_target": 0.8})
                trials.append((t.info.run_id, name))
        info = mlflow.pyfunc.log_model(name="policy", python_model=Echo(), pip_requirements=[])
    mv = mlflow.register_model(info.model_uri, MODEL)
    client = mlflow.MlflowClient()
    for alias in ("candidate", "champion"):
        client.set_registered_model_alias(MODEL, alias, mv.version)
    return parent.info.experiment_id, trials


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow ui exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"mlflow ui not ready at {url} after {timeout_s} s")


def chromium(url: str, profile: Path, screenshot: Path | None = None) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000"]
    if screenshot is not None:
        subprocess.run([*cmd, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    res = subprocess.run([*cmd, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@contextlib.contextmanager
def mlflow_ui(mlflow_uri: str, tmp_path: Path):
    """``mlflow ui`` on a free loopback port for the block; yields its URL, then stops the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", mlflow_uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, proc)
        ART.mkdir(parents=True, exist_ok=True)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: our own process group
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_mlflow_ui_lists_runs_and_registered_model(mlflow_uri, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    exp_id, trials = populate()
    with mlflow_ui(mlflow_uri, tmp_path) as url:
        runs = chromium(f"{url}/#/experiments/{exp_id}/runs", tmp_path / "prof", ART / "mlflow_ui_runs.png")
        assert "search-worker" in runs and "prefsculpt-ui" in runs
        run_id, name = trials[1]
        page = chromium(f"{url}/#/experiments/{exp_id}/runs/{run_id}", tmp_path / "prof", ART / "mlflow_ui_trial.png")
        assert name in page and "lambda/length" in page  # the trial's params are readable
        models = chromium(f"{url}/#/models", tmp_path / "prof", ART / "mlflow_ui_models.png")
        assert MODEL in models
        for f in ("mlflow_ui_runs.png", "mlflow_ui_trial.png", "mlflow_ui_models.png"):
            assert (ART / f).stat().st_size > 10_000
