"""Installable as a package (issue 14.6): the wheel, installed alone in a fresh venv, runs the tiny
pipeline from an empty folder with the config it carries inside the package (not the checkout's).

The fresh venv gets no pip and no copies of the heavy dependencies: a ``.pth`` line points at this
venv's site-packages (a path entry only: the ``.pth`` files there, such as the editable install of
this checkout, are not processed), and only the prefsculpt wheel is installed into it, ``--no-deps``.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlflow
import pytest

from prefsculpt.core.paths import cache_root

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src", "conf")


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def test_wheel_in_a_fresh_venv_runs_the_tiny_pipeline_from_an_empty_folder(tmp_path):
    src = tmp_path / "src-copy"  # building in a copy keeps build/ and egg-info out of the checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():  # src/prefsculpt/conf would be a leftover of an in-tree build
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", *(["conf"] if name == "src" else [])))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", src])
    wheel = next((tmp_path / "dist").glob("prefsculpt-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_prefsculpt_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    out = _run([venv / "bin" / "prefsculpt", "main", "experiment=tiny", "pipeline.stages=[prepare,sae,audit]",
                f"tracking.uri={store}", "tracking.experiment=wheel-check", f"cache_dir={tmp_path / 'cache'}",
                # the converted embedded model is reused from the usual cache (converting it takes minutes)
                f"model.cache_dir={cache_root() / 'models'}"], cwd=work, env=env, timeout=1500)
    packaged = site / "prefsculpt" / "conf"
    assert f"config from {packaged}" in " ".join(out.stderr.split()), out.stderr[-3000:]
    assert (packaged / "config.yaml").is_file() and not (site / "conf").exists()
    # Only MLflow's own default artifact root of a sqlite store (./mlruns) lands in the working folder.
    assert {p.name for p in work.iterdir()} <= {"mlruns"}

    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name("wheel-check")
    assert exp is not None, "tracking.experiment was not honoured"
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    stages = {r.data.tags.get("prefsculpt.stage") for r in runs}
    assert {"main", "prepare", "sae", "audit"} <= stages
    assert all(r.data.tags.get("prefsculpt.complete") == "true" for r in runs if r.data.tags.get("prefsculpt.stage"))
