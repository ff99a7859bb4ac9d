"""The ``review`` entry point: serve an audit run's hypotheses on 127.0.0.1 so a person can decide,
concept by concept, what training may learn; each save becomes a versioned artifact of the audit run.

A save is validated against the audit (:func:`prefsculpt.review.data.build_decisions`) and logged as
``decisions/v<N>.yaml`` (N = one more than the versions already there) with tags
``prefsculpt.decisions.latest`` (the artifact path), ``prefsculpt.decisions.latest_hash`` and
``prefsculpt.decisions.v<N>.hash`` (:func:`prefsculpt.audit.decisions.decisions_hash`, the sha256 of
the canonical content that ``train`` logs as ``prefsculpt.decisions_hash``). ``train`` takes it as
``shaping.decisions=runs:/<audit run>/decisions/v<N>.yaml``, ``search``/``main`` as
``search.decisions=...``. The page starts from the latest saved version, else the audit's proposal.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from omegaconf import DictConfig

from prefsculpt.audit.decisions import decisions_hash, write_decisions
from prefsculpt.audit.labels import build_labels, validate_top_contexts
from prefsculpt.core.names import Tag
from prefsculpt.review import data as D
from prefsculpt.review.server import ReviewApp, ReviewServer
from prefsculpt.tracking.artifacts import RUNS_PREFIX, parse_runs_ref
from prefsculpt.tracking.runs import latest_stage_run, resolve_tracking_uri

log = logging.getLogger(__name__)
LATEST_TAG, HASH_TAG = Tag.DECISIONS_LATEST, Tag.DECISIONS_LATEST_HASH
_VERSION = re.compile(r"^decisions/v(\d+)\.yaml$")
#: Unlabelled concepts (tested first, in the audit's order) labelled before the page is served;
#: labels cost ~10-40 ms each, so the rest are built when a person opens one.
LABELS_AT_START = 200


def find_audit_run(cfg: DictConfig) -> str:
    """``review.audit_run`` (a run id or ``runs:/<id>[/...]``), else the latest finished audit run
    in ``$MLFLOW_EXPERIMENT_ID`` or ``tracking.experiment``."""
    client = mlflow.MlflowClient()
    ref = cfg.review.audit_run
    if ref:
        rid = parse_runs_ref(str(ref).rstrip("/") + "/x")[0] if str(ref).startswith(RUNS_PREFIX) else str(ref)
        try:
            run = client.get_run(rid)
        except mlflow.exceptions.MlflowException as exc:
            raise D.ReviewInputError(f"review.audit_run={ref!r} is not a run in {mlflow.get_tracking_uri()}: {exc}") from exc
        if run.data.tags.get(Tag.STAGE) != "audit":
            raise D.ReviewInputError(f"run {rid} is a {run.data.tags.get('prefsculpt.stage')!r} run, not an audit run; "
                                     "pass review.audit_run=<audit run id>")
        return run.info.run_id
    exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not exp_id:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else None
    found = latest_stage_run("audit", [exp_id]) if exp_id else None
    if not found:
        raise D.ReviewInputError(
            f"no finished audit run in experiment {cfg.tracking.experiment!r} of {mlflow.get_tracking_uri()}: run "
            "the audit first (mlflow run . -e audit) or pass review.audit_run=<run id>")
    return found


def _download(run_id: str, path: str, dst: Path) -> Path | None:
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, str(Path(path).parent))}
    if path not in names:
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def saved_versions(run_id: str) -> list[int]:
    arts = mlflow.MlflowClient().list_artifacts(run_id, "decisions")
    return sorted(int(m.group(1)) for a in arts if (m := _VERSION.match(a.path)))


@dataclass
class AuditInputs:
    run_id: str
    table: pd.DataFrame
    records: dict[str, Any]
    proposal: dict[str, Any] | None
    start: dict[str, Any] | None
    start_from: str
    labels: dict[str, Any] = field(default_factory=dict)
    #: The sae run's top contexts per concept, for labels built when a concept is opened.
    top: dict[str, pd.DataFrame] = field(default_factory=dict)
    directions: dict[str, Any] = field(default_factory=dict)

    def label(self, concept: str) -> Any:
        """The concept's label: built at start, else now from its top contexts (None without any)."""
        if concept not in self.labels and concept in self.top:
            self.labels.update(build_labels(self.top[concept], [concept], directions=self.directions))
        return self.labels.get(concept)


def load_inputs(run_id: str, dst: Path) -> AuditInputs:
    """The audit's table, detail records and decisions; labels for what the audit left unlabelled
    (from the sae run's top contexts, when it still has them)."""
    hyp = _download(run_id, "audit/hypotheses.parquet", dst)
    if hyp is None:
        raise D.ReviewInputError(f"audit run {run_id} has no audit/hypotheses.parquet; re-run the audit stage")
    table = pd.read_parquet(hyp)
    js = _download(run_id, "audit/hypotheses.json", dst)
    records = D.by_concept(json.loads(js.read_text(encoding="utf-8"))) if js else {}
    prop = _download(run_id, "audit/decisions.yaml", dst)
    proposal = yaml.safe_load(prop.read_text(encoding="utf-8")) if prop else None
    start, start_from = proposal, "the audit's proposal (audit/decisions.yaml)"
    latest = mlflow.MlflowClient().get_run(run_id).data.tags.get(LATEST_TAG)
    if latest:
        got = _download(run_id, latest, dst / "saved")
        if got is not None:
            start, start_from = yaml.safe_load(got.read_text(encoding="utf-8")), latest
    out = AuditInputs(run_id, table, records, proposal, start, start_from)
    need = D.labels_needed(table)
    sae = mlflow.MlflowClient().get_run(run_id).data.tags.get(Tag.SCORES_RUN)
    top = _download(sae, "scores/top_contexts.parquet", dst / "sae") if need and sae else None
    if top is not None:
        t0 = time.perf_counter()
        out.top = dict(iter(validate_top_contexts(pd.read_parquet(top)).groupby("concept", sort=False)))
        dirs = table["direction"] if "direction" in table.columns else [0] * len(table)
        out.directions = dict(zip(table["concept"].astype(str), dirs, strict=True))
        for c in [c for c in need if c in out.top][:LABELS_AT_START]:
            out.label(c)
        log.info("review: labelled %d concepts the audit left unlabelled in %.1fs (others when opened)",
                 len(out.labels), time.perf_counter() - t0)
    return out


def save_decisions(run_id: str, doc: dict[str, Any], work: Path) -> dict[str, Any]:
    """Log ``doc`` to the audit run as the next ``decisions/v<N>.yaml`` and tag it latest."""
    client = mlflow.MlflowClient()
    n = max(saved_versions(run_id), default=0) + 1
    path = write_decisions(doc, work / f"v{n}" / f"v{n}.yaml")
    digest = decisions_hash(path)
    client.log_artifact(run_id, str(path), "decisions")
    artifact = f"decisions/v{n}.yaml"
    client.set_tag(run_id, Tag.decisions_version_hash(n), digest)
    client.set_tag(run_id, LATEST_TAG, artifact)
    client.set_tag(run_id, HASH_TAG, digest)
    active = [e for e in doc["concepts"] if e.get("action") != "allow"]
    log.info("review: saved %s to audit run %s (hash %s…, %d shaping)", artifact, run_id, digest[:12], len(active))
    return {"version": n, "artifact": artifact, "ref": f"{RUNS_PREFIX}{run_id}/{artifact}", "hash": digest,
            "n_entries": len(doc["concepts"]), "n_active": len(active)}


@dataclass
class ReviewSession:
    """An open review: the server is bound (``url``) but not yet serving; ``saved`` lists each save."""

    server: ReviewServer
    inputs: AuditInputs
    saved: list[dict[str, Any]]
    tmp: tempfile.TemporaryDirectory

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.close()
        self.tmp.cleanup()


def open_review(cfg: DictConfig) -> ReviewSession:
    """Find and download the audit, build the page's data, bind the server."""
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    run_id = find_audit_run(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="prefsculpt-review-")
    work = Path(tmp.name)
    inputs = load_inputs(run_id, work / "in")
    known = D.known_concepts(inputs.table)
    run = mlflow.MlflowClient().get_run(run_id)
    meta = {"audit run": run_id, "concepts": len(inputs.table),
            "significant": int(inputs.table["significant"].sum()) if "significant" in inputs.table else "?",
            "decisions from": inputs.start_from}
    data = D.page_data(inputs.table, inputs.start, meta, {c: lab.label for c, lab in inputs.labels.items()})
    saved: list[dict[str, Any]] = []
    concepts = set(inputs.table["concept"].astype(str))

    def detail(name: str) -> dict[str, Any] | None:
        if name not in concepts:
            return None
        rec = inputs.records.get(name)
        return D.concept_detail(name, rec, None if rec and rec.get("label_detail") else inputs.label(name))

    def save(submitted: Any) -> dict[str, Any]:
        doc = D.build_decisions(submitted, inputs.proposal, known, audit_run_id=run_id)
        result = save_decisions(run_id, doc, work / "out")
        saved.append(result)
        return result

    title = f"prefsculpt review · {run.info.run_name or run_id}"
    server = ReviewServer(ReviewApp(data, detail, save, title=title), cfg.review.host, cfg.review.port)
    return ReviewSession(server, inputs, saved, tmp)


def run_review(cfg: DictConfig) -> dict[str, Any]:
    rc = cfg.review
    session = open_review(cfg)
    project_run = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run . -e review`: say what it was
    if project_run:
        mlflow.MlflowClient().set_tag(project_run, Tag.STAGE, "review")
        mlflow.MlflowClient().set_tag(project_run, Tag.AUDIT_RUN, session.inputs.run_id)
    log.info("review: audit run %s served at %s (%s); Ctrl-C to stop", session.inputs.run_id, session.url,
             "until Ctrl-C" if rc.serve_seconds is None else f"for {float(rc.serve_seconds):g}s")
    if rc.open_browser:
        webbrowser.open(session.url)
    try:
        session.server.serve(None if rc.serve_seconds is None else float(rc.serve_seconds))
    except KeyboardInterrupt:
        log.info("review: stopped")
    finally:
        session.close()
    return {"run_id": session.inputs.run_id, "url": session.url, "saved": session.saved}
