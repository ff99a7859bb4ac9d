"""File inputs given as MLflow URIs: ``runs:/<run id>/<path>`` and ``models:/<name>@<alias>``.

Every configuration field that takes a file or folder (``sae.path``, ``shaping.sae_path``,
``shaping.scores_dir``, ``shaping.directions_path``, ``shaping.decisions``, ``data.path``, the eval
file paths) also takes these; ``resolve_input`` turns one into a local path. A local path (or a hub
name) is returned unchanged. Run artifacts are immutable, so a ``runs:/`` download is cached under
``dst`` and reused; ``models:/`` (an alias can move) is downloaded again each time.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import mlflow
from omegaconf import DictConfig, ListConfig, OmegaConf

from prefsculpt.core.errors import UserError
from prefsculpt.core.files import atomic_dir
from prefsculpt.tracking.policies import find_hf_folder

log = logging.getLogger(__name__)

URI_PREFIXES = ("runs:/", "models:/")


class InputSourceError(UserError):
    """A ``runs:/`` or ``models:/`` input does not resolve; the message names the field and the URI."""


def is_mlflow_uri(ref: object) -> bool:
    return isinstance(ref, str) and ref.strip().startswith(URI_PREFIXES)


def _complete(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def resolve_input(ref: str | Path | None, dst: str | Path, what: str = "input") -> Path | str | None:
    """A local path for ``ref``: a ``runs:/``/``models:/`` URI is downloaded under ``dst``.

    Returns None for None, ``ref`` itself (as given) when it is not an MLflow URI, else the local path of
    the downloaded file or folder. ``what`` names the config field in errors.
    """
    if ref is None or not is_mlflow_uri(ref):
        return ref
    uri = str(ref).strip()
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = Path(dst) / key
    marker = target / ".complete"
    if uri.startswith("runs:/") and _complete(target):
        return target / marker.read_text()
    try:
        with atomic_dir(target, is_complete=_complete) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
            rel = got.relative_to(tmp)
            (tmp / ".complete").write_text(str(rel))
    except Exception as exc:  # MlflowException, OSError: anything means "does not resolve"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputSourceError(
            f"{what}={uri!r} does not resolve in the tracking store {mlflow.get_tracking_uri()}: "
            f"{type(exc).__name__}: {first}. Check the run id / model name and alias, and that tracking.uri points "
            "at the store that holds it (runs:/<run id>/<artifact path>, models:/<name>@<alias>)."
        ) from exc
    log.info("%s: %s -> %s", what, uri, target / rel)
    return target / rel


#: Keys that name a model: the download must hold a Hugging Face folder, which is what they get.
MODEL_FIELDS = frozenset({"model.name_or_path"})
#: Keys whose MLflow URIs are resolved by their own code (a policy must become a HF model folder).
SELF_RESOLVED = frozenset({"policy"})


def uri_fields(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every string value in ``cfg`` that is a ``runs:/``/``models:/`` URI (lists too)."""
    found: list[str] = []
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else enumerate(cfg)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, DictConfig | ListConfig):
            if not v._is_none():  # an optional list or section set to null holds nothing to resolve
                found += uri_fields(v, f"{key}.")
        elif is_mlflow_uri(v) and str(k) not in SELF_RESOLVED:
            found.append(key)
    return found


def resolve_config_inputs(cfg: DictConfig, dst: str | Path, tracking_uri: str) -> dict[str, str]:
    """Replace every MLflow URI in ``cfg`` (in place) by the local path of its download under ``dst``.

    Returns {dotted key: original URI} of what was replaced (logged by the stage as provenance).
    """
    keys = uri_fields(cfg)
    if not keys:
        return {}
    mlflow.set_tracking_uri(tracking_uri)
    replaced: dict[str, str] = {}
    for key in keys:
        uri = str(OmegaConf.select(cfg, key))
        local = resolve_input(uri, dst, what=key)
        if key in MODEL_FIELDS:  # a logged transformers model keeps its HF folder below the MLflow files
            hf = find_hf_folder(Path(local))
            if hf is None:
                raise InputSourceError(f"{key}={uri!r} downloaded to {local}, but it holds no Hugging Face model "
                                       "folder (config.json + *.safetensors)")
            local = hf
        OmegaConf.update(cfg, key, str(local), force_add=False)
        replaced[key] = uri
    return replaced
