"""A killed stage resumes into the MLflow run it was writing, not a new one.

Every stage run leaves a *run record* while it is open: ``<cache>/runs/<stage>-<key>/<run id>.json``,
``key`` a digest of what the invocation does (the pipeline's stage key, else the stage name, the
resolved config, the contents of its input files, the code version and the tracking URI). The
record is ``flock``-ed by the process for as long as the run is open and removed when the run ends
(successfully or with an exception). So a record whose lock can be taken belongs to a process that
died without cleaning up — SIGKILL, OOM, power loss — and the same command started again claims it
and reattaches to that run (``mlflow.start_run(run_id=...)``), while the stage's own caches
(activation files, encoder shards, ``last.ckpt``, the Optuna study) make the work itself resume.
Several live workers with the same key (search workers sharing a study) each hold their own record.

Under ``mlflow run`` MLflow has already created a fresh project run for the new attempt (its id in
``MLFLOW_RUN_ID``) before any of our code runs, and cannot be told to reuse the killed one. The
stage therefore resumes into the killed run and turns the fresh one into a pointer: renamed
``<name> (resumed in <killed run>)``, tagged ``prefsculpt.resumed_into=<killed run>`` with a note;
it holds nothing else, and ``mlflow run`` ends it as usual. (It cannot be deleted: ``mlflow run``
3.17 then fails at exit, because its "already terminated?" check compares a status string with the
enum's integers and so always tries to end the run, which a deleted run refuses.) Only a fresh
project run (an ``mlflow.project.entryPoint`` tag, no metrics) is treated this way; a run id a
person exported by hand is always honoured.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import LifecycleStage, RunStatus

from prefsculpt.core.files import TMP_PREFIX, atomic_path, json_digest
from prefsculpt.core.names import Tag

log = logging.getLogger(__name__)

RECORDS_DIR = "runs"


def record_dir(cache: Path, stage: str, key: str) -> Path:
    return cache / RECORDS_DIR / f"{stage}-{key}"


def invocation_key(stage: str, cfg_container: dict, inputs: dict, code: str, tracking_uri: str) -> str:
    """Key of a standalone stage invocation (the pipeline passes its stage key instead)."""
    cfg = dict(cfg_container)
    if isinstance(cfg.get("tracking"), dict):  # a run name is a label, not an input
        cfg["tracking"] = {k: v for k, v in cfg["tracking"].items() if k != "run_name"}
    return json_digest(stage, cfg, inputs, code, tracking_uri, length=20)


@dataclass
class RunRecord:
    """An open stage run's record; ``fd`` holds its ``flock`` until :meth:`close`."""

    folder: Path
    fd: int | None = None
    run_id: str | None = None
    path: Path | None = field(default=None)

    def claim_killed(self, client: mlflow.MlflowClient) -> str | None:
        """The run of a record whose process died (lock free; run not finished, not deleted), now
        locked by us; None when there is none. Records of finished or vanished runs are removed."""
        if not self.folder.is_dir():
            return None
        for rec in sorted(self.folder.glob("*.json")):
            if rec.name.startswith(TMP_PREFIX):
                continue
            try:
                fd = os.open(rec, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive: a concurrent worker, not ours to take
                os.close(fd)
                continue
            try:
                run_id = json.loads(rec.read_text())["run_id"]
                run = client.get_run(run_id)
            except Exception:  # unreadable record, or a run not in this store
                run = None
            if (run is None or run.info.lifecycle_stage == LifecycleStage.DELETED
                    or run.info.status == RunStatus.to_string(RunStatus.FINISHED)):
                with contextlib.suppress(FileNotFoundError):
                    rec.unlink()
                os.close(fd)
                continue
            self.fd, self.run_id, self.path = fd, run.info.run_id, rec
            return self.run_id
        return None

    def open(self, run_id: str) -> None:
        """Record ``run_id`` (locked before it becomes visible, so no one can claim it in between)."""
        if self.run_id == run_id and self.fd is not None:
            return
        self.close(remove=False)
        target = self.folder / f"{run_id}.json"
        with atomic_path(target) as tmp:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()}).encode())
        self.fd, self.run_id, self.path = fd, run_id, target

    def close(self, remove: bool = True) -> None:
        if remove and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.run_id, self.path = None, None, None


def is_fresh_project_run(run: mlflow.entities.Run) -> bool:
    """A run ``mlflow run`` just created for this attempt (nothing logged to it yet)."""
    return "mlflow.project.entryPoint" in run.data.tags and not run.data.metrics


def retire_project_run(client: mlflow.MlflowClient, fresh_id: str, resumed_id: str) -> None:
    """Make the fresh ``mlflow run`` run a pointer to the killed run resumed instead."""
    name = client.get_run(fresh_id).info.run_name or "run"
    client.set_tag(fresh_id, Tag.RESUMED_INTO, resumed_id)
    client.set_tag(fresh_id, "mlflow.runName", f"{name} (resumed in {resumed_id[:8]})")
    client.set_tag(fresh_id, "mlflow.note.content",
                   f"This attempt resumed the killed run {resumed_id}; its results are there.")
    log.info("mlflow run: resuming killed run %s; the fresh project run %s only points there (tag %s)",
             resumed_id, fresh_id, Tag.RESUMED_INTO)
