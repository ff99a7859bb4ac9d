"""Artifact references: a local path, or ``runs:/<run id>/<artifact path>`` of the tracking store.

``train`` (``shaping.decisions``) and ``search``/``main`` (``search.decisions``) take the decisions
a person saved on the review page by such a reference, e.g.
``runs:/<audit run>/decisions/v2.yaml``; :func:`resolve_artifact` turns it into a local file.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prefsculpt.core.errors import UserError

RUNS_PREFIX = "runs:/"
_RUNS = re.compile(r"^runs:/+([0-9A-Za-z_-]+)/(.+)$")


class ArtifactRefError(UserError):
    """A ``runs:/`` reference that cannot be downloaded; the message says which and what to check."""


def parse_runs_ref(ref: str) -> tuple[str, str]:
    """``runs:/abc/decisions/v2.yaml`` -> ``("abc", "decisions/v2.yaml")``."""
    m = _RUNS.match(ref.strip())
    if not m:
        raise ArtifactRefError(f"{ref!r} is not a run reference: expected runs:/<run id>/<artifact path>, "
                               "e.g. runs:/<audit run id>/decisions/v1.yaml")
    return m.group(1), m.group(2).strip("/")


def resolve_artifact(ref: str, dst_dir: str | Path) -> Path:
    """A local file for ``ref``: a local path is returned as given (``~`` expanded); a ``runs:/``
    reference is downloaded to ``<dst_dir>/<run id>/<artifact path>`` (fresh each call, through a
    temporary folder, so concurrent callers never read a half-written file)."""
    ref = str(ref)
    if not ref.startswith(RUNS_PREFIX):
        return Path(ref).expanduser()
    import mlflow

    run_id, path = parse_runs_ref(ref)
    dst = Path(dst_dir) / run_id / path
    tmp = Path(dst_dir) / f".download-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{RUNS_PREFIX}{run_id}/{path}",
                                                           dst_path=str(tmp)))
        except Exception as exc:  # MlflowException, OSError: one message for all
            raise ArtifactRefError(
                f"cannot download {ref} from the tracking store {mlflow.get_tracking_uri()}: {exc}; check the "
                f"run id and path (list them with: mlflow artifacts list --run-id {run_id})"
            ) from exc
        if not got.exists():
            raise ArtifactRefError(f"{ref}: run {run_id} has no artifact {path!r}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir() and got.is_dir():
            shutil.rmtree(dst)
        os.replace(got, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def local_decisions(cfg: DictConfig) -> DictConfig:
    """``cfg.shaping`` with ``decisions`` as a local file: itself when it already is one (or unset),
    else a copy whose ``runs:/`` reference is downloaded (from ``tracking.uri``) under
    ``<cache_dir>/artifacts``."""
    shaping = cfg.shaping
    ref = shaping.get("decisions")
    if not ref or not str(ref).startswith(RUNS_PREFIX):
        return shaping
    import mlflow

    from prefsculpt.models.loading import default_cache_dir
    from prefsculpt.tracking.runs import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    root = Path(cfg.cache_dir).expanduser() if cfg.get("cache_dir") else default_cache_dir()
    out = OmegaConf.create(OmegaConf.to_container(shaping, resolve=True))
    out.decisions = str(resolve_artifact(str(ref), root / "artifacts"))
    return out
