"""A training run SIGKILLed mid-epoch and rerun ends like an uninterrupted run, in ONE MLflow run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DRIVER = """
import json, sys
from tests.unit.train.helpers import train_cfg
from prefsculpt.stages.train import run_train
from pathlib import Path
cfg = train_cfg(sys.argv[1], Path(sys.argv[2]), train={"max_pairs": 48, "batch_size": 2, "max_length": 96,
                "checkpoint_every_n_steps": 3, "train_top_layers": None, "lr": 1e-3})
out = run_train(cfg)
print("RESULT" + json.dumps({k: out[k] for k in ("run_id", "optimizer_steps", "policy_dir")}))
"""


def _run(model_dir, work, env, kill_after_ckpt=False):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(model_dir), str(work)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_after_ckpt:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list((work / "cache" / "train").glob("*/ckpt/last.ckpt")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before a checkpoint could be interrupted:\n" + proc.stdout.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    import json

    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:])
    res["log"] = out[-3000:]
    return res


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_step_count_in_one_mlflow_run(tiny_model_dir, tmp_path):
    # this checkout's src first: an editable install elsewhere must not be what the driver imports
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    env.pop("MLFLOW_RUN_ID", None)
    results = {}
    for name, kill in (("straight", False), ("killed", True)):
        work = tmp_path / name
        work.mkdir()
        uri = f"sqlite:///{work / 'mlflow.db'}"
        e = {**env, "MLFLOW_TRACKING_URI": uri}
        if kill:
            _run(tiny_model_dir, work, e, kill_after_ckpt=True)
            ckpts = list((work / "cache" / "train").glob("*/ckpt/last.ckpt"))
            assert ckpts and not list(ckpts[0].parent.glob("*.tmp"))
        results[name] = _run(tiny_model_dir, work, e)
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(search_all_experiments=True)
        assert set(runs["tags.prefsculpt.stage"]) == {"train", "prepare"}  # the prepared data it trained on
        runs = runs[runs["tags.prefsculpt.stage"] == "train"].reset_index(drop=True)
        assert len(runs) == 1, (runs[["run_id", "status"]], results[name]["log"])
        assert runs.iloc[0]["run_id"] == results[name]["run_id"]
        assert runs.iloc[0]["status"] == "FINISHED"
        results[name]["resumed"] = runs.iloc[0]["tags.prefsculpt.resumed"]
    assert results["straight"]["optimizer_steps"] == results["killed"]["optimizer_steps"] == 24
    assert results["killed"]["resumed"] == "true" and results["straight"]["resumed"] == "false"
    # Same data order and restored optimizer state: the resumed policy is the uninterrupted one.
    from safetensors.torch import load_file

    a = load_file(str(Path(results["straight"]["policy_dir"]) / "model.safetensors"))
    b = load_file(str(Path(results["killed"]["policy_dir"]) / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
