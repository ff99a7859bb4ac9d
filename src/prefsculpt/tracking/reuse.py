"""Stage reuse: a stage whose inputs are unchanged is taken from its earlier run, not recomputed.

A stage's key hashes the stage name, the config sections it reads, the keys of the stages it
depends on, and the code version (a digest of the package's source). The pipeline looks for a
finished, complete run carrying that key (tag ``prefsculpt.stage_key``) before running the stage.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from prefsculpt.core.names import Tag

PACKAGE_DIR = Path(__file__).resolve().parents[1]


#: Code every stage runs (data loading, models, tracking, config).
CORE = ("__init__.py", "config.py", "cli.py", "core", "data", "models", "tracking", "stages/__init__.py",
        "stages/main.py")


@functools.lru_cache(maxsize=32)
def code_version(parts: tuple[str, ...] | None = None) -> str:
    """Digest of the package's source files under ``parts`` (files or subpackages; None = all).

    Conservative: any change to code a stage runs invalidates its reuse (and, through the upstream
    keys, that of every stage after it).
    """
    h = hashlib.sha256()
    roots = [PACKAGE_DIR] if parts is None else [PACKAGE_DIR / p for p in sorted(set(parts))]
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py")) if root.is_dir() else []
        for f in files:
            h.update(str(f.relative_to(PACKAGE_DIR)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, cfg: DictConfig, sections: Sequence[str], upstream: Iterable[str] = (),
              code: Sequence[str] | None = None) -> str:
    """Hash of what the stage's output depends on."""
    cfg_part = {s: OmegaConf.to_container(cfg[s], resolve=True) if isinstance(cfg[s], DictConfig | list)
                or OmegaConf.is_config(cfg[s]) else cfg[s] for s in sections if s in cfg}
    version = code_version(None if code is None else tuple(CORE) + tuple(code))
    blob = json.dumps({"stage": stage, "cfg": cfg_part, "upstream": list(upstream), "code": version},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def find_reusable(key: str, experiment_ids: Sequence[str] | None = None,
                  stage: str | None = None) -> mlflow.entities.Run | None:
    """The newest finished, complete run with this stage key (in the given experiments, else all),
    and of this stage (tag ``prefsculpt.stage``) when given."""
    client = mlflow.MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    of_stage = f" and tags.`{Tag.STAGE}` = '{stage}'" if stage else ""
    runs = client.search_runs(
        list(experiment_ids),
        f"tags.`{Tag.STAGE_KEY}` = '{key}' and tags.`{Tag.COMPLETE}` = 'true' and attributes.status = 'FINISHED'"
        + of_stage,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None
