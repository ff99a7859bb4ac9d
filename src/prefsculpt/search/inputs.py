"""The search's inputs, all from MLflow: the audit run (hypotheses, decisions) and the sae run its
scores came from (span scores, SAE decoder directions, named-concept directions).

Artifacts are downloaded once per run into ``<cache>/search/<kind>/<run id>/`` (to a temporary
folder, then renamed, so concurrent workers never see a half-downloaded folder).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd

from prefsculpt.core.files import publish, tmp_beside
from prefsculpt.core.names import Attr, Tag
from prefsculpt.search.errors import SearchInputError
from prefsculpt.search.space import members_of
from prefsculpt.shaping.decisions import load_decisions
from prefsculpt.shaping.registry import Source, methods_needing
from prefsculpt.tracking.artifacts import resolve_artifact
from prefsculpt.tracking.runs import latest_stage_run

log = logging.getLogger(__name__)
SCORE_METHODS, DIRECTION_METHODS = methods_needing(Source.scores), methods_needing(Source.direction)


def pinned_audit_run(storage: Any, study_name: str) -> str | None:
    """The audit run an existing study was created with (every worker must search the same space)."""

    try:
        return optuna.load_study(study_name=study_name, storage=storage).user_attrs.get(Attr.AUDIT_RUN)
    except KeyError:
        return None


def find_audit_run(audit_run_id: str | None, current_run_id: str, pinned: str | None) -> str:
    """``search.audit_run_id``, else the study's own, else the latest finished audit run beside this
    run (same parent), else the latest in the experiment."""

    client = mlflow.MlflowClient()
    rid = audit_run_id or pinned
    if rid:
        try:
            run = client.get_run(str(rid))
        except mlflow.exceptions.MlflowException as exc:
            raise SearchInputError(f"search.audit_run_id={rid!r} is not a run in this tracking store: {exc}") from exc
        if run.data.tags.get(Tag.STAGE) != "audit":
            raise SearchInputError(f"run {rid} is a {run.data.tags.get(Tag.STAGE)!r} run, not an audit run")
        return run.info.run_id
    run = client.get_run(current_run_id)
    exp = run.info.experiment_id
    found = latest_stage_run("audit", [exp], run.data.tags.get("mlflow.parentRunId"))
    if found:
        return found
    raise SearchInputError(f"no finished audit run in experiment {exp}: run the audit first (mlflow run . -e audit) "
                           "or set search.audit_run_id=<run id>")


def fetch(run_id: str, artifact_path: str, dst: Path) -> Path | None:
    """Download ``artifact_path`` of ``run_id`` to ``dst`` once; None when the run does not have it."""
    if dst.exists():
        return dst
    parent = str(Path(artifact_path).parent) if "/" in artifact_path else None
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, parent)}
    if artifact_path not in names:
        return None
    dl = tmp_beside(dst)
    try:
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dl)))
        return publish(got, dst)  # another worker may have got there first: same content, keep theirs
    finally:
        shutil.rmtree(dl, ignore_errors=True)


def load_audit(audit_id: str, decisions_path: str | None, cache_root: Path) -> tuple[pd.DataFrame, Any, str | None]:
    """(hypotheses table, validated decisions or None, decisions hash or None)."""

    root = cache_root / "search" / "audit" / audit_id
    hyp_file = fetch(audit_id, "audit/hypotheses.parquet", root / "hypotheses.parquet")
    if hyp_file is None:
        raise SearchInputError(f"audit run {audit_id} has no audit/hypotheses.parquet; re-run the audit stage")
    hyp = pd.read_parquet(hyp_file)
    # search.decisions: a local file or runs:/<audit run>/decisions/v<N>.yaml (saved by `prefsculpt review`)
    path = (resolve_artifact(decisions_path, cache_root / "artifacts") if decisions_path
            else fetch(audit_id, "audit/decisions.yaml", root / "decisions.yaml"))
    if path is None:
        return hyp, None, None
    dec = load_decisions(str(path), hyp["concept"].astype(str).tolist())
    log.info("search: decisions %s (hash %s…)", path, dec.hash[:12])
    return hyp, dec, dec.hash


def _sae_folder(root: Path) -> Path | None:
    hits = sorted((p.parent for p in root.rglob("cfg.json")), key=lambda p: len(p.parts))
    return hits[0] if hits else None


def resolve_sources(methods: Sequence[str], sh: Any, audit_id: str, cache_root: Path) -> dict[str, str | None]:
    """Concept sources for training (only those the shaping section ``sh`` leaves unset and the
    search ``methods`` need)."""
    client = mlflow.MlflowClient()
    sae_run = client.get_run(audit_id).data.tags.get(Tag.SCORES_RUN)
    out: dict[str, str | None] = {"audit_run_id": audit_id, "sae_run_id": sae_run, "scores_dir": None,
                                  "sae_path": None, "directions_path": None}
    if not sae_run:
        return out
    out["layer"] = client.get_run(sae_run).data.tags.get(Tag.LAYER)  # the layer the sae stage read
    methods = set(methods)
    root = cache_root / "search" / "sae" / sae_run
    if methods & set(SCORE_METHODS) and not sh.scores_dir:
        got = fetch(sae_run, "scores", root / "scores")
        out["scores_dir"] = str(got) if got else None
    if methods & set(DIRECTION_METHODS):
        if not sh.sae_path:
            got = fetch(sae_run, "sae", root / "sae")
            folder = _sae_folder(got) if got else None
            out["sae_path"] = str(folder) if folder else None
        if not sh.directions_path:
            got = fetch(sae_run, "named/directions.safetensors", root / "directions.safetensors")
            out["directions_path"] = str(got) if got else None
    return out


def feasibility(sh: Any, named_concepts: Sequence[Any], sources: dict[str, str | None],
                hyp: pd.DataFrame) -> Callable[[str, str], bool]:
    """``(concept, method) -> bool``: does training (shaping section ``sh``) have what ``method`` needs?"""
    scores = bool(sh.scores_dir or sources.get("scores_dir"))
    sae = bool(sh.sae_path or sources.get("sae_path"))
    dirs = bool(sh.directions_path or sources.get("directions_path"))
    regex = {f"named:{n.name}" for n in named_concepts or [] if n.kind == "regex" and n.pattern}
    instructions = set(dict(sh.instructions or {}))
    members = members_of(hyp)  # a cluster is shaped through its members: it has what all of them have

    def one(concept: str, method: str) -> bool:
        if method in SCORE_METHODS:
            return concept == "length" or scores or concept in regex
        if method in DIRECTION_METHODS:
            return (concept.startswith("latent:") and sae) or (concept.startswith("named:") and dirs)
        return False

    def ok(concept: str, method: str) -> bool:
        if method in methods_needing(Source.instruction):
            return concept in instructions
        return all(one(m, method) for m in members.get(concept, (concept,)))

    return ok
