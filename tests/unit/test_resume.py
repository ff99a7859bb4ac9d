"""Run records (a killed stage reattaches to its run) and the stale-temporary cleaner."""

import os
import subprocess
import sys
import time

import mlflow

from prefsculpt.config import compose
from prefsculpt.core.files import _host_tag, atomic_path, clean_stale_tmp_tree
from prefsculpt.core.names import Tag
from prefsculpt.tracking.resume import RunRecord
from prefsculpt.tracking.runs import stage_run


def test_a_record_left_by_a_dead_process_is_claimed_once_and_a_live_ones_never(mlflow_uri, tmp_path):
    client = mlflow.MlflowClient()
    mlflow.set_experiment("e")
    with mlflow.start_run() as killed:
        pass
    mlflow.MlflowClient().set_terminated(killed.info.run_id, "FAILED")  # as `mlflow run` marks a killed child
    folder = tmp_path / "runs" / "k"
    live = RunRecord(folder)
    live.open(killed.info.run_id)  # held by "another process": this one
    assert RunRecord(folder).claim_killed(client) is None  # its lock is held
    live.close(remove=False)  # the process dies: the kernel drops its lock, the record stays
    mine = RunRecord(folder)
    assert mine.claim_killed(client) == killed.info.run_id
    assert RunRecord(folder).claim_killed(client) is None  # claimed once
    mine.close()
    assert not list(folder.glob("*.json"))


def test_stage_run_reattaches_to_the_run_a_killed_process_left(mlflow_uri, tmp_path):
    cfg = compose(f"experiment=tiny cache_dir={tmp_path / 'cache'}")
    script = (
        "import os, signal\n"
        "from prefsculpt.config import compose\n"
        "from prefsculpt.tracking.runs import stage_run\n"
        f"cfg = compose('experiment=tiny cache_dir={tmp_path / 'cache'}')\n"
        "with stage_run(cfg, 'prepare') as run:\n"
        "    print(run.info.run_id, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed_id = proc.stdout.split()[0]
    assert mlflow.MlflowClient().get_run(killed_id).info.status == "RUNNING"
    with stage_run(cfg, "prepare") as run:
        assert run.info.run_id == killed_id
    with stage_run(cfg, "prepare") as fresh:  # the finished run is not resumed again
        assert fresh.info.run_id != killed_id
    got = mlflow.MlflowClient().get_run(killed_id)
    assert got.info.status == "FINISHED" and got.data.tags[Tag.REATTACHED] == "1"


def test_cleaner_removes_dead_writers_temporaries_and_keeps_live_and_foreign_ones(tmp_path):
    deep = tmp_path / "scores" / "abc"
    deep.mkdir(parents=True)
    dead = deep / f".tmp-shard-4194305.{_host_tag()}-0123abcd"  # no such pid
    dead.mkdir()
    (dead / "x.npy").write_bytes(b"0" * 100)
    foreign = deep / ".tmp-shard-4194305.ffffff-0123abcd.npy"  # another machine's writer: age decides
    foreign.write_bytes(b"1")
    old = tmp_path / ".tmp-old-1-2"  # an old-style name, a day old
    old.write_bytes(b"2")
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    with atomic_path(tmp_path / "live.bin") as live:  # ours, being written
        live.write_bytes(b"3")
        assert clean_stale_tmp_tree(tmp_path) == 2
        assert live.exists() and foreign.exists() and not dead.exists() and not old.exists()
