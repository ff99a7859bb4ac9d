"""The on-disk score store of the encoder: sharded, checksummed, resumable.

Layout of ``out_dir``:
- ``plan.json``: the fingerprint of what is being encoded (pairs, layer, SAE, concepts, shard
  size). Shards are only reused under the same fingerprint.
- ``shard-00000.npz``: pair_ids, the span scores as a sparse (n_shard, F) CSC matrix per span (SAE
  codes are sparse: a TopK latent is zero on most spans) — ``<span>_indptr`` (F + 1,) int64,
  ``<span>_rows`` (nnz,) int32, ``<span>_max`` and ``<span>_freq`` (nnz,) float32 on the same pattern
  (both stats are nonzero exactly where the concept fired) — ``<span>_n_tokens`` and the shard's
  top-context candidates. Written to a temporary name, then ``os.replace``d. Stores written before
  the sparse layout hold ``<span>_<stat>`` as dense (n_shard, F) arrays; both are read.
- ``shards.jsonl``: one line per finished shard with its sha256, appended *after* the rename.
  A shard counts as finished only if its line exists and the file still hashes to it, so a
  truncated or corrupt file is redone, never read.
- ``top_contexts.parquet``: the top-activating token contexts per concept and response span.
- ``manifest.json``: written last; ``complete: true`` marks a finished store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from prefsculpt.concepts.scores import SPANS, STATS, ConceptScores
from prefsculpt.core.errors import UserError
from prefsculpt.core.files import file_sha256

log = logging.getLogger(__name__)

PLAN, INDEX, MANIFEST, TOP = "plan.json", "shards.jsonl", "manifest.json", "top_contexts.parquet"
#: Response spans whose top contexts are kept (labels describe what responses contain).
TOP_SPANS = ("chosen", "rejected")


class ShardStoreError(UserError):
    """The score store is incomplete or corrupt; the message names the file and what to do."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def sparse_span_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dense ``<span>_<stat>`` (n, F) arrays replaced by one CSC pattern per span plus its values."""
    out = dict(arrays)
    for span in SPANS:
        if f"{span}_max" not in arrays or np.ndim(arrays[f"{span}_max"]) != 2:
            continue
        dense = {st: np.asarray(out.pop(f"{span}_{st}"), dtype=np.float32) for st in STATS}
        pattern = sparse.csc_matrix((dense["max"] != 0) | (dense["freq"] != 0))
        pattern.sort_indices()
        rows = pattern.indices.astype(np.int32)
        cols = np.repeat(np.arange(pattern.shape[1]), np.diff(pattern.indptr))
        out[f"{span}_indptr"] = pattern.indptr.astype(np.int64)
        out[f"{span}_rows"] = rows
        for st in STATS:
            out[f"{span}_{st}"] = dense[st][rows, cols]
    return out


def span_matrix(z: Any, span: str, stat: str) -> sparse.csc_matrix:
    """One span statistic of an open shard (``np.load``) as a (n_shard, F) float32 CSC matrix."""
    vals = z[f"{span}_{stat}"]
    if vals.ndim == 2:  # a store written before the sparse layout
        return sparse.csc_matrix(vals)
    indptr = z[f"{span}_indptr"]
    n = len(z[f"{span}_n_tokens"])
    return sparse.csc_matrix((vals, z[f"{span}_rows"], indptr), shape=(n, len(indptr) - 1))


def write_shard(out_dir: Path, k: int, arrays: dict[str, np.ndarray]) -> str:
    """Write shard ``k`` atomically and record its checksum; returns the sha256.

    Dense ``<span>_<stat>`` (n, F) score arrays are stored sparse (:func:`sparse_span_arrays`).
    """
    arrays = sparse_span_arrays(arrays)
    path = out_dir / shard_name(k)
    tmp = out_dir / f".{shard_name(k)}.tmp-{os.getpid()}.npz"  # np.savez appends .npz to other names
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    sha = file_sha256(path)
    line = json.dumps({"shard": k, "file": path.name, "sha256": sha, "n_pairs": int(len(arrays["pair_ids"]))})
    with open(out_dir / INDEX, "a") as fh:  # a line torn by a kill is skipped by read_index
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return sha


def read_index(out_dir: Path) -> dict[int, dict[str, Any]]:
    """Shard -> its last recorded line (unparsable lines, e.g. torn by a kill, are ignored)."""
    records: dict[int, dict[str, Any]] = {}
    path = out_dir / INDEX
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            records[int(rec["shard"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return records


def verify_shard(out_dir: Path, k: int, records: dict[int, dict[str, Any]]) -> str | None:
    """None if shard ``k`` is finished and intact, else why not."""
    rec = records.get(k)
    path = out_dir / shard_name(k)
    if rec is None:
        return f"{path} has no entry in {INDEX} (never finished)"
    if not path.exists():
        return f"{path} is missing"
    if file_sha256(path) != rec["sha256"]:
        return f"{path} does not match its recorded sha256 (truncated or modified)"
    return None


def finished_shards(out_dir: str | os.PathLike, n_shards: int | None = None) -> set[int]:
    """Shards whose file exists and matches its recorded checksum; anything else will be redone."""
    out_dir = Path(out_dir)
    records = read_index(out_dir)
    keys = range(n_shards) if n_shards is not None else sorted(records)
    done = set()
    for k in keys:
        problem = verify_shard(out_dir, k, records)
        if problem is None:
            done.add(k)
        elif k in records:
            log.warning("redoing shard %d: %s", k, problem)
    return done


def prepare_store(out_dir: Path, plan: dict[str, Any]) -> bool:
    """Make ``out_dir`` ready for ``plan``. Returns True when it already holds the complete result.

    A store made under another plan (other pairs, SAE, layer, ...) is cleared, with a warning:
    its shards must not be mixed into this result.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    old = _read_json(out_dir / PLAN)
    if old is not None and old != plan:
        log.warning("%s holds scores of a different run (plan changed); starting it over", out_dir)
        for p in out_dir.iterdir():
            if p.is_file() and (p.name.startswith(("shard-", ".shard-")) or p.name in (INDEX, MANIFEST, TOP, PLAN)):
                p.unlink()
            elif p.is_dir() and p.name.startswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
    manifest = _read_json(out_dir / MANIFEST)
    if manifest is not None and manifest.get("complete") and manifest.get("plan") == plan:
        if len(finished_shards(out_dir, manifest["n_shards"])) == manifest["n_shards"] and (out_dir / TOP).exists():
            return True
    (out_dir / MANIFEST).unlink(missing_ok=True)  # an unfinished store must never look complete
    _atomic_write_text(out_dir / PLAN, json.dumps(plan, indent=1))
    return False


def write_manifest(out_dir: Path, plan: dict[str, Any], n_pairs: int, n_shards: int) -> None:
    manifest = {
        "complete": True, "n_pairs": n_pairs, "n_shards": n_shards, "layer": plan["layer"],
        "sae_digest": plan["sae_digest"], "concept_names": plan["concept_names"], "plan": plan,
    }
    _atomic_write_text(out_dir / MANIFEST, json.dumps(manifest))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def complete_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a complete store, else a ``ShardStoreError`` saying what to do."""
    manifest = _read_json(out_dir / MANIFEST)
    if manifest is None or not manifest.get("complete"):
        raise ShardStoreError(
            f"{out_dir} holds no complete concept scores ({MANIFEST} missing or unfinished); run the encoder "
            "again (it resumes from the finished shards)"
        )
    return manifest


def verified_shards(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Every shard of ``manifest`` present and matching its recorded checksum, else ``ShardStoreError``."""
    records = read_index(out_dir)
    for k in range(manifest["n_shards"]):
        problem = verify_shard(out_dir, k, records)
        if problem is not None:
            raise ShardStoreError(f"{problem}; run the encoder again to redo this shard")


def load_scores(out_dir: str | os.PathLike) -> ConceptScores:
    """All shards of a complete store, checksums verified, in the original pair order, as dense arrays.

    Holds (n_pairs, F) float32 per span and statistic in memory: for large stores read them shard by
    shard with ``prefsculpt.concepts.store.ScoreStore`` instead.
    """
    out_dir = Path(out_dir)
    manifest = complete_manifest(out_dir)
    verified_shards(out_dir, manifest)
    parts: list[dict[str, np.ndarray]] = []
    for k in range(manifest["n_shards"]):
        with np.load(out_dir / shard_name(k)) as z:
            part = {"pair_ids": z["pair_ids"], **{f"{s}_n_tokens": z[f"{s}_n_tokens"] for s in SPANS}}
            for s in SPANS:
                for st in STATS:
                    part[f"{s}_{st}"] = span_matrix(z, s, st).toarray()
            parts.append(part)
    pair_ids = [str(p) for part in parts for p in part["pair_ids"]]
    if len(pair_ids) != manifest["n_pairs"]:
        raise ShardStoreError(f"{out_dir}: shards hold {len(pair_ids)} pairs, {MANIFEST} says {manifest['n_pairs']}")
    values = {(s, st): np.concatenate([p[f"{s}_{st}"] for p in parts]) for s in SPANS for st in STATS}
    n_tokens = {s: np.concatenate([p[f"{s}_n_tokens"] for p in parts]) for s in SPANS}
    return ConceptScores(pair_ids, values, n_tokens, list(manifest["concept_names"]))


# ---------------------------------------------------------------------------------------------
# Top-activating contexts: a running top-N per concept, merged batch by batch and shard by shard.


def merge_top(
    a: tuple[np.ndarray, np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray, np.ndarray], n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``n`` largest of two candidate sets. Each is (value, pair, position), all (m, F)."""
    if a is None:
        cat = b
    else:
        cat = tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))
    vals = cat[0]
    k = min(n, vals.shape[0])
    idx = np.argsort(-vals, axis=0, kind="stable")[:k]  # (k, F) rows of the best candidates per column
    return tuple(np.take_along_axis(x, idx, axis=0) for x in cat)  # type: ignore[return-value]


def top_arrays(top: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Flatten running tops into npz arrays ``top_<span>_{value,pair,position}``."""
    out = {}
    for span, (v, p, pos) in top.items():
        out[f"top_{span}_value"], out[f"top_{span}_pair"], out[f"top_{span}_position"] = v, p, pos
    return out


def merged_top(out_dir: Path, n_shards: int, n: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Merge the shards' top candidates, one shard in memory at a time."""
    top: dict[str, Any] = {s: None for s in TOP_SPANS}
    for k in range(n_shards):
        with np.load(out_dir / shard_name(k)) as z:
            for s in TOP_SPANS:
                cand = (z[f"top_{s}_value"], z[f"top_{s}_pair"], z[f"top_{s}_position"])
                top[s] = merge_top(top[s], cand, n)
    return top


def write_top_contexts(
    out_dir: Path,
    top: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    concept_names: list[str],
    pair_ids: list[str],
    sequence: Callable[[int, str], list[int]],
    decode: Callable[[list[int]], str],
    window: int,
) -> Path:
    """``top_contexts.parquet``: one row per (concept, span, rank) with a positive activation.

    ``sequence(pair_index, span)`` gives the token ids of ``prompt + <span response>``.
    """

    texts: dict[tuple[int, str, int], tuple[str, str, str]] = {}
    rows: dict[str, list[Any]] = {c: [] for c in ("concept", "rank", "value", "pair_id", "span", "position", "token", "left", "right")}
    for span, (vals, pairs, positions) in top.items():
        for f, name in enumerate(concept_names):
            for rank in range(vals.shape[0]):
                v = float(vals[rank, f])
                if not v > 0:
                    break  # sorted descending: the rest did not fire
                i, t = int(pairs[rank, f]), int(positions[rank, f])
                key = (i, span, t)
                if key not in texts:  # the same token tops many concepts: decode it once
                    seq = sequence(i, span)
                    texts[key] = (
                        decode(seq[t : t + 1]), decode(seq[max(0, t - window) : t]), decode(seq[t + 1 : t + 1 + window])
                    )
                rows["concept"].append(name)
                rows["rank"].append(rank)
                rows["value"].append(v)
                rows["pair_id"].append(pair_ids[i])
                rows["span"].append(span)
                rows["position"].append(t)
                for col, text in zip(("token", "left", "right"), texts[key], strict=True):
                    rows[col].append(text)
    df = pd.DataFrame(rows)
    path = out_dir / TOP
    tmp = out_dir / f".{TOP}.tmp-{os.getpid()}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
