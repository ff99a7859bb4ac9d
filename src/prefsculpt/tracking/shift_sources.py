"""Where the concept-shift eval gets its SAE and its predictions, and the eval itself.

The SAE is ``eval.shift.sae_path`` or the ``sae/`` artifact of an ``sae`` run; the predictions are
``eval.shift.hypotheses_path`` or the ``audit/hypotheses.parquet`` artifact of an ``audit`` run
(the given run id, else the latest finished one in the experiment). Both are resolved before any
compute; when either is missing the eval is skipped with a warning (``skip_if_missing``) or fails
with an error saying which stage to run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import pandas as pd
from omegaconf import DictConfig

from prefsculpt.concepts.sae_model import sae_dir_layer
from prefsculpt.core.names import Artifact
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
    return ShiftSources(sae, hyp, int(layer), origin)
