"""Where the concept-shift eval gets its SAE and its predictions, and the eval itself.

The SAE is ``eval.shift.sae_path`` or the ``sae/`` artifact of an ``sae`` run; the predictions are
``eval.shift.hypotheses_path`` or the ``audit/hypotheses.parquet`` artifact of an ``audit`` run
(the given run id, else the latest finished one in the experiment). Both are resolved before any
compute; when either is missing the eval is skipped with a warning (``skip_if_missing``) or fails
with an error saying which stage to run.

The concepts the policy's training shaped (so the eval can compare shaped and unshaped hypotheses
apart) are ``eval.shift.shaped`` when set, else read from the policy's train run: ``eval.policy`` a
run id, ``runs:/<id>/…`` or a registered model (its version's ``prefsculpt.train_run_id`` tag, else
its source run); the run's ``shaping/interventions.json`` (what training applied, decisions file
included), else the ``shaping.concepts`` of its ``config/config.yaml``. ``base`` shaped nothing; a
bare folder, or a run that cannot be read, leaves them unknown (logged).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from omegaconf import DictConfig

from prefsculpt.concepts.sae_model import sae_dir_layer
from prefsculpt.core.names import Artifact, Tag
from prefsculpt.data.errors import DataSourceError
from prefsculpt.evals.shift import ShiftSources
from prefsculpt.tracking.runs import latest_stage_run

log = logging.getLogger(__name__)


class ShiftSourceError(DataSourceError):
    """The concept-shift eval has no SAE or no audit hypotheses; the message says what to run (a user
    error: the CLI prints it and exits 2)."""


def _latest_run(stage: str, run_id: str | None, experiment: str) -> str | None:
    """``run_id`` checked, else the latest finished run of ``stage`` in this experiment (the project's
    under ``mlflow run``, else ``tracking.experiment``)."""
    client = mlflow.MlflowClient()
    if run_id:
        return client.get_run(run_id).info.run_id
    exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not exp_id:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            return None
        exp_id = exp.experiment_id
    return latest_stage_run(stage, [exp_id])


def _sae_folder(root: Path) -> Path | None:
    hits = sorted((p.parent for p in root.rglob("cfg.json") if any(p.parent.glob("*.safetensors"))),
                  key=lambda p: len(p.parts))
    return hits[0] if hits else None


def _read_table(path: str) -> pd.DataFrame:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ShiftSourceError(f"eval.shift.hypotheses_path={path!r} does not exist")
    return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)


INTERVENTIONS = "shaping/interventions.json"  # logged by the train stage: ResolvedShaping.summary()
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _policy_run_id(spec: str) -> str | None:
    """The train run behind ``eval.policy`` (None: a folder, base, or a model without one)."""
    spec = str(spec).strip()
    if _RUN_ID.match(spec):
        return spec
    if spec.startswith("runs:/"):
        return spec.removeprefix("runs:/").split("/", 1)[0] or None
    if spec.startswith("models:/"):
        name_ver = spec.removeprefix("models:/").strip("/")
        client = mlflow.MlflowClient()
        if "@" in name_ver:
            name, alias = name_ver.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in name_ver:
            name, ver = name_ver.split("/", 1)
            mv = client.get_model_version(name, ver)
        else:
            return None  # models:/m-<id>: a logged model, no version tags
        return (mv.tags or {}).get(Tag.TRAIN_RUN) or mv.run_id
    return None


def shaped_from_interventions(summary: list[dict[str, Any]]) -> dict[str, float]:
    """``ResolvedShaping.summary()`` entries (``name`` = ``<method>/<concept>[+<concept>…]``) ->
    concept -> signed λ (the first intervention's, when a concept has several)."""
    out: dict[str, float] = {}
    for e in summary:
        method, _, concepts = str(e.get("name", "")).partition("/")
        for c in concepts.split("+") if method and concepts else []:
            lam = e.get("lambda")
            out.setdefault(c, float(lam) if isinstance(lam, int | float) else float("nan"))
    return out


def shaped_from_config(cfg: dict[str, Any]) -> dict[str, float]:
    """The non-``allow`` entries of a run config's ``shaping.concepts`` (λ signed by the action)."""
    out: dict[str, float] = {}
    for c in ((cfg.get("shaping") or {}).get("concepts") or []):
        if isinstance(c, dict) and c.get("concept") and c.get("action", "suppress") != "allow":
            sign = -1.0 if c.get("action") == "amplify" else 1.0
            out.setdefault(str(c["concept"]), sign * float(c.get("strength") or 0.0))
    return out


def _run_artifact(run_id: str, path: str, dst: Path) -> Path | None:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def resolve_shaped(cfg: DictConfig, cache_root: Path) -> tuple[dict[str, float] | None, str]:
    """(concept -> signed λ of what the policy's training shaped, or None when unknown; where from)."""
    sc = cfg.eval.shift
    if sc.get("shaped") is not None:
        return {str(c): float("nan") for c in sc.shaped}, "eval.shift.shaped"
    spec = str(cfg.eval.policy)
    if spec == "base":
        return {}, "base model (no training)"
    try:
        rid = _policy_run_id(spec)
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        log.warning("concept shift: cannot read the train run of eval.policy=%s (%s); shaped concepts unknown", spec, exc)
        return None, "unknown"
    if rid is None:
        log.info("concept shift: eval.policy=%s names no train run; shaped concepts unknown (set eval.shift.shaped)",
                 spec)
        return None, "unknown"
    dst = cache_root / "evals" / "train" / rid
    got = _run_artifact(rid, INTERVENTIONS, dst)
    if got is not None and got.is_file():
        return shaped_from_interventions(json.loads(got.read_text()).get("interventions") or []), f"train run {rid}"
    got = _run_artifact(rid, Artifact.CONFIG, dst)
    if got is not None and got.is_file():
        log.info("concept shift: train run %s has no %s; shaped concepts from its config's shaping.concepts "
                 "(a decisions file it used is not seen)", rid, INTERVENTIONS)
        return shaped_from_config(yaml.safe_load(got.read_text()) or {}), f"train run {rid} config"
    log.warning("concept shift: run %s has neither %s nor %s; shaped concepts unknown", rid, INTERVENTIONS,
                Artifact.CONFIG)
    return None, "unknown"


def resolve_shift_sources(cfg: DictConfig, cache_root: Path) -> ShiftSources | None:
    sc = cfg.eval.shift
    if not sc.enabled:
        return None
    try:
        if sc.sae_path:
            sae = _sae_folder(Path(sc.sae_path).expanduser())
            if sae is None:
                raise ShiftSourceError(f"eval.shift.sae_path={sc.sae_path!r} holds no SAE (cfg.json + *.safetensors)")
            origin = str(sc.sae_path)
        else:
            rid = _latest_run("sae", sc.sae_run_id, cfg.tracking.experiment)
            if rid is None:
                raise ShiftSourceError("no finished sae run in this experiment: run the sae stage, or set eval.shift.sae_path")
            got = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="sae",
                                                           dst_path=str(cache_root / "evals" / "sae" / rid)))
            sae = _sae_folder(got)
            if sae is None:
                raise ShiftSourceError(f"sae run {rid} has no SAE folder under its sae/ artifact")
            origin = f"sae run {rid}"
        if sc.hypotheses_path:
            hyp = _read_table(str(sc.hypotheses_path))
        else:
            rid = _latest_run("audit", sc.audit_run_id, cfg.tracking.experiment)
            if rid is None:
                raise ShiftSourceError("no finished audit run in this experiment: run the audit stage, or set "
                                       "eval.shift.hypotheses_path")
            hyp = pd.read_parquet(mlflow.artifacts.download_artifacts(
                run_id=rid, artifact_path=Artifact.HYPOTHESES, dst_path=str(cache_root / "evals" / "audit" / rid)))
            origin += f", audit run {rid}"
    except (ShiftSourceError, mlflow.exceptions.MlflowException, OSError) as exc:
        if not sc.skip_if_missing:
            raise ShiftSourceError(f"concept shift: {exc}") from exc
        log.warning("concept shift skipped: %s", exc)
        return None
    layer = sc.layer if sc.layer is not None else cfg.sae.layer
    if layer is None:  # the SAE's own hook (cfg.json metadata), as the sae stage read it
        layer = sae_dir_layer(sae)
    if layer is None:
        raise ShiftSourceError(f"concept shift: the SAE at {sae} names no hook; set eval.shift.layer or sae.layer")
    shaped, from_ = resolve_shaped(cfg, cache_root)
    return ShiftSources(sae, hyp, int(layer), origin + f", shaped concepts: {from_}",
                        None if shaped is None else sorted(shaped), shaped or {})
