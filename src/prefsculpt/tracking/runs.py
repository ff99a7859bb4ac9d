"""Stage runs: every stage opens (or, under ``mlflow run``, attaches to) one explicit MLflow run.

The tracking URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db`` — never the file store, which MLflow 3.17 refuses (STACK.md §3). The
experiment is ``tracking.experiment``. Under ``mlflow run`` the project's run is used only when it
lives in that store and experiment; when it does not (``tracking.uri`` names another store, or
``mlflow run`` got no ``--experiment-name`` and put it in ``Default``) the stages log where the config
says and the project's run is tagged with where that is (``adopt_project_run``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from prefsculpt.core.faults import fault_point
from prefsculpt.core.files import clean_stale_tmp_tree
from prefsculpt.core.names import Artifact, Tag
from prefsculpt.core.paths import cache_root
from prefsculpt.core.redact import mlflow_params, redact_text
from prefsculpt.data.prepared import pairs_digest
from prefsculpt.data.schema import PreferencePair
from prefsculpt.tracking.resume import (
    RunRecord,
    invocation_key,
    is_fresh_project_run,
    record_dir,
    retire_project_run,
)
from prefsculpt.tracking.reuse import code_version, input_digests

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[3]


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``tracking.uri`` when set, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if uri:
        return str(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


#: Set once the project's run was left for the configured store/experiment: its run id.
PROJECT_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("project_run", default=None)
_DEFAULT_EXPERIMENT_ID = "0"


def adopt_project_run(cfg: DictConfig) -> bool:
    """Under ``mlflow run``: keep its run when it is in the configured store and experiment (True);
    else leave it (False): the environment ``mlflow run`` set is dropped, so every stage of this
    process logs to ``tracking.uri``/``tracking.experiment`` as from the CLI, and the project's run is
    tagged with where that is. Outside ``mlflow run`` it does nothing and returns False."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return False
    project_uri = os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(None)
    want_uri = resolve_tracking_uri(cfg.tracking.uri)
    want_exp = cfg.tracking.experiment if cfg.tracking.experiment else None
    if want_uri != project_uri:
        why = f"tracking.uri={redact_text(want_uri)} is not the project's store"
    elif want_exp and mlflow.MlflowClient(project_uri).get_run(run_id).info.experiment_id == _DEFAULT_EXPERIMENT_ID \
            and want_exp != "Default" and not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        why = f"mlflow run got no --experiment-name, so its run is in Default, not tracking.experiment={want_exp!r}"
    else:
        return True
    log.warning("%s: the stages log to experiment %r at %s instead of the project's run %s",
                why, want_exp, redact_text(want_uri), run_id)
    mlflow.MlflowClient(project_uri).set_tag(run_id, Tag.LOGGED_TO, redact_text(f"{want_uri} :: {want_exp}"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    os.environ["MLFLOW_TRACKING_URI"] = want_uri  # the stores other code opens from the environment
    PROJECT_RUN.set(run_id)
    return False


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when there are uncommitted changes), if in a git repo."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _flat_params(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat_params(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, list) else str(d)
    return out


def log_config(cfg: DictConfig, path: str = Artifact.CONFIG) -> None:
    """The resolved config as a YAML artifact, and flattened as params (searchable in the UI)."""
    mlflow.log_text(redact_text(OmegaConf.to_yaml(cfg, resolve=True)), path)
    params = _flat_params(OmegaConf.to_container(cfg, resolve=True))
    # URI passwords redacted, keys MLflow rejects sanitised, values cut to MLflow's 6,000 chars.
    mlflow.log_params(mlflow_params(params))


#: Set by the pipeline around a stage call: the stage's reuse key (see ``tracking.reuse``).
CURRENT_STAGE_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("stage_key", default=None)
_READY: set[str] = set()


def ensure_store(uri: str, experiment: str | None = None) -> None:
    """Create a SQLite store (schema migrations) and ``experiment`` once, under a file lock beside
    the database: two processes starting together on a fresh store otherwise both migrate it and one
    crashes ("duplicate column name", alembic "expected to match one row"). Other stores: no-op."""
    if not uri.startswith("sqlite:///") or (uri, experiment) in _READY:
        return

    db = Path(uri[len("sqlite:///"):].split("?")[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates and migrates the schema
        if experiment and client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment)
    _READY.add((uri, experiment))


def _record_for(cfg: DictConfig, stage: str, key: str | None, uri: str) -> RunRecord:
    if key is None:
        container = OmegaConf.to_container(cfg, resolve=True)
        key = invocation_key(stage, container, input_digests(cfg, list(container)), code_version(None), uri)
    return RunRecord(record_dir(cache_root(cfg.get("cache_dir")), stage, key))


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str, nested: bool | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the run for ``stage``.

    Under ``mlflow run`` the first stage attaches to the project's run; a stage started while another
    run is active becomes its child (``nested=None`` decides this automatically). A run that ends
    without an exception is tagged ``prefsculpt.complete=true``; only such runs are ever reused.
    A run whose process was killed is reattached by the same command (``tracking.resume``), and
    temporary files killed processes left in the cache are removed first.
    """
    uri = resolve_tracking_uri(cfg.tracking.uri)
    mlflow.set_tracking_uri(uri)
    clean_stale_tmp_tree(cache_root(cfg.get("cache_dir")))
    under_project = "MLFLOW_RUN_ID" in os.environ
    active = mlflow.active_run() is not None
    ensure_store(uri, None if under_project or active else cfg.tracking.experiment)
    if not under_project and not active:
        mlflow.set_experiment(cfg.tracking.experiment)
    if nested is None:
        nested = active
    tags = {Tag.STAGE: stage}
    commit = git_commit()
    if commit:
        tags[Tag.GIT_COMMIT] = commit
    key = CURRENT_STAGE_KEY.get()
    if key:
        tags[Tag.STAGE_KEY] = key
    if PROJECT_RUN.get() and not active:
        tags[Tag.PROJECT_RUN] = PROJECT_RUN.get()
    # The key belongs to this run only: the runs a stage opens inside itself (the search's trial
    # train/evaluate runs) must not look like the stage's own run to ``find_reusable``.
    token = CURRENT_STAGE_KEY.set(None) if key else None
    record = _record_for(cfg, stage, key, uri)
    interrupted = False
    try:
        client = mlflow.MlflowClient()
        killed = record.claim_killed(client)
        env_id = os.environ.get("MLFLOW_RUN_ID")
        if killed and env_id and env_id != killed:
            if is_fresh_project_run(client.get_run(env_id)):
                retire_project_run(client, env_id, killed)
            else:  # a run id set by hand wins over our record
                record.close(remove=False)
                killed = None
        if killed:
            log.warning("%s: resuming run %s, left unfinished by a killed process", stage, killed)
            os.environ.pop("MLFLOW_RUN_ID", None)
            run_cm = mlflow.start_run(run_id=killed, nested=nested, tags=tags)
        else:
            run_cm = mlflow.start_run(run_name=cfg.tracking.run_name or stage, nested=nested, tags=tags)
        with run_cm as run:
            record.open(run.info.run_id)
            if under_project or key or killed:
                mlflow.set_tags(tags)  # an attached run ignores start_run's tags
            if killed:
                prior = client.get_run(killed).data.tags.get(Tag.REATTACHED, "0")
                mlflow.set_tag(Tag.REATTACHED, str(int(prior) + 1 if prior.isdigit() else 1))
            log_config(cfg)
            fault_point(stage, "start")
            yield run
            fault_point(stage, "end")
            mlflow.set_tag(Tag.COMPLETE, "true")
    except KeyboardInterrupt:
        interrupted = True  # Ctrl-C: like a kill, the same command resumes this run
        raise
    finally:
        record.close(remove=not interrupted)
        if token is not None:
            CURRENT_STAGE_KEY.reset(token)


def pairs_frame(pairs: Sequence[PreferencePair]):
    return pd.DataFrame(
        {
            "id": [p.id for p in pairs],
            "prompt": [p.prompt_text() for p in pairs],
            "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected for p in pairs],
            "chosen_tags": [json.dumps(dict(p.chosen_tags), sort_keys=True) for p in pairs],
            "rejected_tags": [json.dumps(dict(p.rejected_tags), sort_keys=True) for p in pairs],
        }
    )


def log_pairs_input(pairs: Sequence[PreferencePair], name: str, context: str, source: str | None = None) -> str:
    """Log pairs with ``mlflow.log_input`` (visible in the run's Datasets panel); returns the digest."""
    digest = pairs_digest(pairs)
    with warnings.catch_warnings():  # a local path matches two equivalent source types; harmless
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(pairs_frame(pairs), source=source, name=name, digest=digest)
    mlflow.log_input(ds, context=context)
    return digest


def latest_stage_run(stage: str, experiment_ids: Sequence[str], parent_run_id: str | None = None) -> str | None:
    """The newest FINISHED run of ``stage``: first among the children of ``parent_run_id`` (the same
    pipeline run tree), else in the experiments; None when there is none. A pipeline's "reused"
    marker run (tag ``prefsculpt.reused_from``, no artifacts) stands for the run it reused."""
    client = mlflow.MlflowClient()
    base = f"tags.`{Tag.STAGE}` = '{stage}' and attributes.status = 'FINISHED'"
    filters = ([f"{base} and tags.`mlflow.parentRunId` = '{parent_run_id}'"] if parent_run_id else []) + [base]
    for filt in filters:
        runs = client.search_runs(list(experiment_ids), filt, order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0].data.tags.get(Tag.REUSED_FROM) or runs[0].info.run_id
    return None
