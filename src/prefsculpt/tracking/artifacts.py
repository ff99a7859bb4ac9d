"""Artifact references: a local path, or ``runs:/<run id>/<artifact path>`` of the tracking store.

``train`` (``shaping.decisions``) and ``search``/``main`` (``search.decisions``) take the decisions
a person saved on the review page by such a reference, e.g.
``runs:/<audit run>/decisions/v2.yaml``; :func:`resolve_artifact` turns it into a local file.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from prefsculpt.core.errors import UserError
from prefsculpt.core.paths import cache_root
from prefsculpt.tracking.inputs import resolve_input
from prefsculpt.tracking.runs import resolve_tracking_uri

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
    reference is downloaded once under ``dst_dir`` (:func:`prefsculpt.tracking.inputs.resolve_input`:
    atomic, cached by reference; versioned artifacts such as ``decisions/v2.yaml`` never change)."""
    ref = str(ref)
    if not ref.startswith(RUNS_PREFIX):
        return Path(ref).expanduser()
    parse_runs_ref(ref)  # a malformed reference is named with the expected form
    return Path(resolve_input(ref, dst_dir, what="decisions"))


def local_decisions(cfg: DictConfig) -> DictConfig:
    """``cfg.shaping`` with ``decisions`` as a local file: itself when it already is one (or unset),
    else a copy whose ``runs:/`` reference is downloaded (from ``tracking.uri``) under
    ``<cache_dir>/artifacts``."""
    shaping = cfg.shaping
    ref = shaping.get("decisions")
    if not ref or not str(ref).startswith(RUNS_PREFIX):
        return shaping
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    root = cache_root(cfg.get("cache_dir"))
    out = OmegaConf.create(OmegaConf.to_container(shaping, resolve=True))
    out.decisions = str(resolve_artifact(str(ref), root / "artifacts"))
    return out
