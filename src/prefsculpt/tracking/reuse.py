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

from prefsculpt.tracking.runs import COMPLETE_TAG, KEY_TAG

PACKAGE_DIR = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of every source file of the package: any code change invalidates reuse (conservative)."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(f.relative_to(PACKAGE_DIR)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, cfg: DictConfig, sections: Sequence[str], upstream: Iterable[str] = ()) -> str:
    """Hash of what the stage's output depends on."""
    cfg_part = {s: OmegaConf.to_container(cfg[s], resolve=True) if isinstance(cfg[s], DictConfig | list)
                or OmegaConf.is_config(cfg[s]) else cfg[s] for s in sections if s in cfg}
    blob = json.dumps({"stage": stage, "cfg": cfg_part, "upstream": list(upstream), "code": code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def find_reusable(key: str, experiment_ids: Sequence[str] | None = None) -> mlflow.entities.Run | None:
    """The newest finished, complete run with this stage key (in the given experiments, else all)."""
    client = mlflow.MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        list(experiment_ids),
        f"tags.`{KEY_TAG}` = '{key}' and tags.`{COMPLETE_TAG}` = 'true' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None
