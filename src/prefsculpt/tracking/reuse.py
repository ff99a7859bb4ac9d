"""Stage reuse: a stage whose inputs are unchanged is taken from its earlier run, not recomputed.

A stage's key hashes the stage name, the config sections it reads, the *contents* of every file
those sections name (:data:`INPUT_FILES`: the data file or folder, decisions files, SAE weights
given by path, eval files...), the keys of the stages it depends on, and the code version (a digest
of the package's source). Editing a file in place therefore changes the key of the first stage that
reads it and, through the upstream keys, of every stage after it — and of no stage before it. The
pipeline looks for a finished, complete run carrying that key (tag ``prefsculpt.stage_key``)
before running the stage.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from prefsculpt.core.files import file_sha256
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


#: Config keys that name input files or folders (a list value: several). Their contents, not their
#: names, enter the key of every stage that reads the key's section.
INPUT_FILES = (
    "model.name_or_path",  # a local folder or .gguf file (a registry/hub name is not a path: kept as text)
    "data.path",
    "sae.path", "sae.extra_text_files",
    "search.decisions",
    "shaping.decisions", "shaping.sae_path", "shaping.directions_path", "shaping.scores_dir",
    "train.pairs_path",
    "eval.sycophancy.opinion_paths", "eval.sycophancy.suggested_paths", "eval.sycophancy.are_you_sure_paths",
    "eval.style.prompts_path", "eval.shift.sae_path", "eval.shift.hypotheses_path",
)


def path_digest(path: str | Path) -> str:
    """sha256 over a file's contents, or a folder's relative file names and contents (recursive;
    hidden names such as ``.tmp-*`` and ``.cache`` skipped). Per-file digests are memoised by path,
    size and mtime, so an unchanged multi-GB folder is read once per process."""
    p = Path(path).expanduser()
    if p.is_file():
        return file_sha256(p, memo=True)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + file_sha256(f, memo=True).encode() + b"\n")
    return h.hexdigest()


def input_digests(cfg: DictConfig, sections: Sequence[str]) -> dict[str, list[str]]:
    """``{config key: [content digest per path]}`` for the :data:`INPUT_FILES` in ``sections``.

    A value that is not an existing path (a hub name, a registry id) stays as its text; a missing
    file is recorded as missing, so creating it later changes the key too."""
    out: dict[str, list[str]] = {}
    for key in INPUT_FILES:
        if key.split(".")[0] not in sections:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value == "":
            continue
        values = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else [value]
        digests = []
        for v in values:
            p = Path(str(v)).expanduser()
            digests.append(path_digest(p) if p.exists() else f"not a path: {v}")
        out[key] = digests
    return out


def stage_key(stage: str, cfg: DictConfig, sections: Sequence[str], upstream: Iterable[str] = (),
              code: Sequence[str] | None = None) -> str:
    """Hash of what the stage's output depends on: config sections, input file contents, upstream
    keys, code."""
    cfg_part = {s: OmegaConf.to_container(cfg[s], resolve=True) if isinstance(cfg[s], DictConfig | list)
                or OmegaConf.is_config(cfg[s]) else cfg[s] for s in sections if s in cfg}
    version = code_version(None if code is None else tuple(CORE) + tuple(code))
    blob = json.dumps({"stage": stage, "cfg": cfg_part, "inputs": input_digests(cfg, sections),
                       "upstream": list(upstream), "code": version}, sort_keys=True, default=str)
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
