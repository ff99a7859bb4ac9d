"""Two processes starting together on a fresh SQLite store: the schema is created once, both run."""

import os
import subprocess
import sys
import time

SCRIPT = """
import sys, time
import mlflow
from prefsculpt.tracking.runs import ensure_store
uri, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # both past their imports, then go at once
ensure_store(uri, "exp")
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("exp")
with mlflow.start_run():
    mlflow.log_metric("m", 1.0)
"""


def test_two_processes_initialise_a_fresh_sqlite_store_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.time() + 25  # imports take a few seconds (tens on a loaded machine)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, uri, str(start)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    import mlflow

    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 2 and all(r.data.metrics["m"] == 1.0 for r in runs)
