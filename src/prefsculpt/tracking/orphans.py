"""Close the runs a killed process left RUNNING.

A SIGKILL-ed search worker cannot end its runs: its trial run, the train/evaluate runs inside it and
its own search run stay RUNNING forever, and the run tree shows work that no one does. Whoever learns
that the worker is dead (Optuna's heartbeat failed its trial) closes them here: the dead run, every
RUNNING run under it, and its RUNNING ancestors, except the ancestors of the closing process's own
active run (a worker that retries a trial it was itself declared dead for must not close its own
search run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import mlflow

from prefsculpt.core.names import Tag

log = logging.getLogger(__name__)
PARENT = "mlflow.parentRunId"


def own_lineage() -> set[str]:
    """The active run of this process and all its ancestors."""
    client = mlflow.MlflowClient()
    out: set[str] = set()
    run = mlflow.active_run()
    rid = run.info.run_id if run else None
    while rid and rid not in out:
        out.add(rid)
        rid = client.get_run(rid).data.tags.get(PARENT)
    return out


def _descendants(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> list[mlflow.entities.Run]:
    out, todo = [], [run]
    while todo:
        r = todo.pop()
        kids = client.search_runs([r.info.experiment_id], f"tags.`{PARENT}` = '{r.info.run_id}'", max_results=10_000)
        out += kids
        todo += kids
    return out


def close_dead_run_tree(run_id: str, reason: str, spare: Iterable[str] = (), status: str = "KILLED") -> list[str]:
    """End ``run_id`` (if still RUNNING), its RUNNING descendants and its RUNNING ancestors not in
    ``spare`` with ``status``, tagging each with ``reason``; returns the ids closed."""
    client = mlflow.MlflowClient()
    spare = set(spare)
    try:
        root = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        log.warning("cannot read the dead run %s to close it: %s", run_id, exc)
        return []
    if root.info.status != "RUNNING":
        return []
    chain = [root, *_descendants(client, root)]
    parent = root.data.tags.get(PARENT)
    while parent and parent not in spare:
        run = client.get_run(parent)
        if run.info.status != "RUNNING":
            break
        chain.append(run)
        parent = run.data.tags.get(PARENT)
    closed = []
    for run in chain:
        if run.info.status != "RUNNING" or run.info.run_id in spare:
            continue
        try:
            client.set_tag(run.info.run_id, Tag.ERROR, reason[:4000])
            client.set_terminated(run.info.run_id, status)
            closed.append(run.info.run_id)
        except mlflow.exceptions.MlflowException as exc:
            log.warning("cannot close the dead run %s: %s", run.info.run_id, exc)
    if closed:
        log.warning("closed %d run(s) a dead worker left RUNNING (%s): %s", len(closed), reason, ", ".join(closed))
    return closed
