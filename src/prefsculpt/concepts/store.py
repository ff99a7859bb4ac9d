"""A complete score store (``shards.py``) read shard by shard, so memory does not grow with the data.

``load_scores`` returns dense (n_pairs, F) arrays: 16k latents x 40k pairs would be ~15 GB. A
``ScoreStore`` keeps only the per-pair metadata (ids, token counts: a few bytes per pair) and reads
one shard at a time. Consumers ask for *blocks of concepts*: ``block(stat, weights)`` returns the
dense (n_pairs, g) chosen and rejected scores of g derived concepts (``weights`` (F, g): a column
with a single 1 is a stored concept, a column of 1/m over m members is their mean, as for latent
clusters). With g chosen so that n_pairs x g stays under a fixed budget (``block_size``), the
largest array held is bounded whatever the number of pairs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import sparse

from prefsculpt.concepts import shards as S
from prefsculpt.concepts.scores import SPANS

log = logging.getLogger(__name__)

#: Cells (pairs x concepts) of one dense block: 4M float64 cells = 32 MB per array.
BLOCK_CELLS = 4_000_000


def block_size(n_pairs: int, budget: int = BLOCK_CELLS, lo: int = 16, hi: int = 1024) -> int:
    """Concepts per block so that a (n_pairs, block) array has at most ``budget`` cells (within [lo, hi])."""
    return int(min(hi, max(lo, budget // max(n_pairs, 1))))


class ScoreStore:
    """The shard store at ``out_dir``: manifest and every shard's checksum verified once, on opening."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        manifest = S.complete_manifest(self.out_dir)
        S.verified_shards(self.out_dir, manifest)
        self.n_shards = int(manifest["n_shards"])
        self.concept_names: list[str] = list(manifest["concept_names"])
        ids, tokens, offsets = [], {s: [] for s in SPANS}, [0]
        for k in range(self.n_shards):
            with np.load(self.out_dir / S.shard_name(k)) as z:
                ids += [str(p) for p in z["pair_ids"]]
                for s in SPANS:
                    tokens[s].append(z[f"{s}_n_tokens"])
            offsets.append(len(ids))
        if len(ids) != manifest["n_pairs"]:
            raise S.ShardStoreError(
                f"{self.out_dir}: shards hold {len(ids)} pairs, {S.MANIFEST} says {manifest['n_pairs']}; "
                "run the encoder again")
        self.pair_ids = ids
        self.n_tokens = {s: np.concatenate(v) for s, v in tokens.items()}
        self.offsets = np.asarray(offsets)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def n_concepts(self) -> int:
        return len(self.concept_names)

    def length_diff(self) -> np.ndarray:
        return self.n_tokens["chosen"].astype(np.float64) - self.n_tokens["rejected"].astype(np.float64)

    def matrices(self, stat: str, spans: Sequence[str] = ("chosen", "rejected")
                 ) -> Iterator[tuple[int, dict[str, sparse.csc_matrix]]]:
        """Per shard: (its first pair's row, {span: (n_shard, F) float32 CSC}); one shard in memory."""
        for k in range(self.n_shards):
            with np.load(self.out_dir / S.shard_name(k)) as z:
                yield int(self.offsets[k]), {s: S.span_matrix(z, s, stat) for s in spans}

    def block(self, stat: str, weights: sparse.spmatrix, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Chosen and rejected scores of the derived concepts ``weights`` (F, g): two (n_pairs, g) arrays.

        Each is ``scores @ weights`` computed in float64 and stored as ``dtype``.
        """
        w = sparse.csc_matrix(weights, dtype=np.float64)
        if w.shape[0] != self.n_concepts:
            raise ValueError(f"weights have {w.shape[0]} rows, the store has {self.n_concepts} concepts")
        out = {s: np.zeros((self.n_pairs, w.shape[1]), dtype=dtype) for s in ("chosen", "rejected")}
        for lo, mats in self.matrices(stat):
            for s, m in mats.items():
                out[s][lo : lo + m.shape[0]] = (m.astype(np.float64) @ w).toarray()
        return out["chosen"], out["rejected"]

    def rows(self, stat: str, columns: Sequence[int], spans: Sequence[str]) -> sparse.csr_matrix:
        """The sum over ``spans`` of ``columns`` of each pair, as a sparse (n_pairs, len(columns)) float64 CSR."""
        cols = np.asarray(columns, dtype=np.int64)
        parts = []
        for _, mats in self.matrices(stat, spans):
            # summed in float32, as ``get("chosen") + get("rejected")`` of the dense scores
            parts.append(sparse.csr_matrix(sum(m[:, cols] for m in mats.values()), dtype=np.float64))
        return sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((0, len(cols)))


def selection(n_concepts: int, columns: Sequence[int]) -> sparse.csc_matrix:
    """(F, len(columns)) weights picking stored concepts ``columns``."""
    cols = np.asarray(columns, dtype=np.int64)
    return sparse.csc_matrix((np.ones(len(cols)), (cols, np.arange(len(cols)))), shape=(n_concepts, len(cols)))


def mean_weights(n_concepts: int, groups: Sequence[Sequence[int]]) -> sparse.csc_matrix:
    """(F, len(groups)) weights giving the mean of each group's member concepts."""
    rows, cols, vals = [], [], []
    for g, members in enumerate(groups):
        m = list(members)
        rows += m
        cols += [g] * len(m)
        vals += [1.0 / len(m)] * len(m)
    return sparse.csc_matrix((vals, (rows, cols)), shape=(n_concepts, len(groups)))
