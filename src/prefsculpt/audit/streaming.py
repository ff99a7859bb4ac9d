"""The audit's statistics from a shard store (``concepts.store.ScoreStore``), concept block by block.

``stats.test_concepts`` and friends take dense (n_pairs, F) scores. Here the same tables come from
passes over the shards that never hold more than a (n_pairs, block) slice of concepts
(``store.block_size``: n_pairs x block is bounded, so memory stays flat as the data grows):

- :func:`test_store`: the audit table (and, in the same passes, the swap-null tables of
  calibration). Every per-concept quantity depends on that concept's column only
  (``stats.column_stats``); the q-values, which need all p-values, are computed at the end
  (``stats.assemble_table``). Equal to ``test_concepts`` on the loaded scores (tests pin it).
- :func:`latent_groups`: latent clusters from co-firing counts accumulated shard by shard
  (F x F counts, whatever the number of pairs); :func:`latent_structure` also the near-duplicate
  latents, from the same counts.
- :func:`concept_diffs`: chosen - rejected of a few named concepts (the hypotheses shown).
- :func:`symmetric_activity`: s(chosen) + s(rejected) of the latents as a sparse matrix (its size
  is the number of nonzero pair x latent cells, not n x F) for the data clusters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from prefsculpt.audit import stats as St
from prefsculpt.audit.clusters import context_keys, latent_clusters_from_counts, near_duplicates
from prefsculpt.concepts.store import ScoreStore, block_size, mean_weights, selection

log = logging.getLogger(__name__)


def concept_weights(store: ScoreStore, clusters: Sequence[Sequence[int]] | None) -> tuple[sparse.csc_matrix, list[str]]:
    """(F, F + C) weights of the tested concepts: every stored concept, then each cluster's member mean."""
    f = store.n_concepts
    clusters = list(clusters or [])
    for ci, members in enumerate(clusters):
        if len(members) == 0 or min(members) < 0 or max(members) >= f:
            raise ValueError(f"latent cluster {ci} has members {list(members)[:8]}... outside 0..{f - 1} or is empty")
    w = sparse.hstack([selection(f, range(f)), mean_weights(f, clusters)], format="csc")
    return w, list(store.concept_names) + [f"cluster:{i}" for i in range(len(clusters))]


def test_store(
    store: ScoreStore,
    prompt_keys: Sequence[str],
    stat: str = "max",
    test: str = "wilcoxon",
    fdr: float = 0.05,
    min_support: float = 0.01,
    extra: Mapping[str, np.ndarray] | None = None,
    clusters: Sequence[Sequence[int]] | None = None,
    min_nonzero: int = 10,
    salt: str = "",
    rank_by: str = "conservative",
    flips: Sequence[np.ndarray] = (),
    block: int | None = None,
) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """``stats.test_concepts`` on a shard store: (the table, one table per swap-null coin vector in ``flips``).

    A flip (n,) bool exchanges chosen and rejected on the pairs where it is True (d -> -d there;
    ``extra`` and the length difference flip with them), as ``stats.calibrate`` does. ``block``
    overrides the concepts per pass (default ``store.block_size(n)``).
    """
    n = store.n_pairs
    St.check_table_args(stat, rank_by, n, prompt_keys)
    w, names = concept_weights(store, clusters)
    kinds, index = (list(x) for x in zip(*[St._kind_and_index(nm, j) for j, nm in enumerate(names)], strict=True)) \
        if names else ([], [])
    length_diff = store.length_diff()
    if extra is None:
        extra = {"length": length_diff}
    xd = St.builtin_diffs(extra, n, store.pair_ids)
    half = St.half_assignment(prompt_keys, salt)
    signs = [np.where(f, -1.0, 1.0) for f in flips]
    kw = dict(test=test, min_support=min_support, min_nonzero=min_nonzero)
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in range(1 + len(signs))]

    def add(d: np.ndarray, support: np.ndarray) -> None:
        parts[0].append(St.column_stats(d, support, half, length_diff, **kw))
        for i, s in enumerate(signs, start=1):
            parts[i].append(St.column_stats(d * s[:, None], support, half, length_diff * s, **kw))

    step = block or block_size(n)
    for lo in range(0, w.shape[1], step):
        c, r = store.block(stat, w[:, lo : lo + step])  # (n, g) float32 each
        d = c.astype(np.float64) - r
        St._check_finite(d, names[lo : lo + step], store.pair_ids, "concept scores")
        add(d, ((c != 0) | (r != 0)).mean(axis=0))
        del c, r, d
    if xd.shape[1]:
        add(xd, (xd != 0).mean(axis=0))
    all_names = names + list(extra)
    all_kinds, all_index = kinds + ["builtin"] * len(extra), index + [-1] * len(extra)
    tables = [St.assemble_table(all_names, all_kinds, all_index, n, St.concat_stats(p), fdr, rank_by) for p in parts]
    log.info("audit from %s: %d concepts in blocks of %d over %d pairs", store.out_dir, len(all_names), step, n)
    return tables[0], tables[1:]


test_store.__test__ = False  # a library function, not a pytest test


def calibrate_store(store: ScoreStore, prompt_keys: Sequence[str], n_seeds: int = 20, fdr: float = 0.05,
                    **kw) -> pd.DataFrame:
    """``stats.calibrate`` on a shard store: the same coins, in one set of passes for all seeds."""
    extra = kw.pop("extra", None)
    _, nulls = test_store(store, prompt_keys, fdr=fdr, extra=extra, flips=St.swap_flips(store.n_pairs, n_seeds), **kw)
    return St.calibration_summary([St.calibration_row(s, df, fdr) for s, df in enumerate(nulls)], fdr)


def cofiring_counts(store: ScoreStore, stat: str, columns: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Co-firing counts (L, L), firing counts (L,) and rows m of ``columns`` over every response
    (chosen and rejected: the rows of ``clusters.firing_matrix``), accumulated shard by shard."""
    cols = np.asarray(columns, dtype=np.int64)
    co = np.zeros((len(cols), len(cols)), dtype=np.float64)
    cnt = np.zeros(len(cols), dtype=np.float64)
    m = 0
    for _, mats in store.matrices(stat):
        for x in mats.values():
            fired = sparse.csc_matrix(x[:, cols] > 0, dtype=np.float64)
            co += (fired.T @ fired).toarray()
            cnt += np.asarray(fired.sum(axis=0)).ravel()
            m += x.shape[0]
    return co, cnt, m


def latent_groups(store: ScoreStore, stat: str, latent_cols: Sequence[int], top_fraction: float,
                  min_size: int, seed: int) -> list[list[int]]:
    """Latent clusters as store column indices (``clusters.latent_clusters`` on the store's firing)."""
    co, cnt, m = cofiring_counts(store, stat, latent_cols)
    groups = latent_clusters_from_counts(co, cnt, m, top_fraction, min_size, seed)
    return [[int(latent_cols[i]) for i in g] for g in groups]


def latent_structure(store: ScoreStore, stat: str, latent_cols: Sequence[int], top: pd.DataFrame | None,
                     clusters: bool = True, top_fraction: float = 0.01, min_size: int = 4, seed: int = 0,
                     duplicates: bool = True, min_corr: float = 0.5, min_overlap: float = 0.5,
                     ) -> tuple[list[list[int]], list[list[int]]]:
    """(latent clusters, near-duplicate groups) as store column indices, from one pass of co-firing
    counts (``clusters.latent_clusters_from_counts`` and ``clusters.near_duplicates``; ``top``: the
    top-contexts table whose shared positions or tokens confirm a duplicate)."""
    if not latent_cols or not (clusters or duplicates):
        return [], []
    co, cnt, m = cofiring_counts(store, stat, latent_cols)
    groups = latent_clusters_from_counts(co, cnt, m, top_fraction, min_size, seed) if clusters else []
    dups: list[list[int]] = []
    if duplicates:
        names = [store.concept_names[i] for i in latent_cols]
        dups = near_duplicates(co, cnt, m, context_keys(top, names) if top is not None else None,
                               min_corr, min_overlap)
    return ([[int(latent_cols[i]) for i in g] for g in groups], [[int(latent_cols[i]) for i in g] for g in dups])


def concept_diffs(store: ScoreStore, names: Sequence[str], stat: str, groups: Mapping[str, Sequence[int]]
                  ) -> np.ndarray:
    """(n, len(names)) float64 chosen - rejected of stored concepts, clusters (``groups``: name ->
    member columns; the mean of the members' differences) and ``length``, in one pass."""
    col = {c: i for i, c in enumerate(store.concept_names)}
    weights, where = [], []
    for c in names:
        if c in col:
            weights.append([col[c]])
        elif c in groups:
            weights.append(list(groups[c]))
        elif c != "length":
            raise KeyError(c)
        where.append(len(weights) - 1 if c != "length" else -1)
    out = np.zeros((store.n_pairs, len(names)))
    if weights:
        ch, rj = store.block(stat, mean_weights(store.n_concepts, weights), dtype=np.float64)
        d = ch - rj
        for j, k in enumerate(where):
            if k >= 0:
                out[:, j] = d[:, k]
    for j, c in enumerate(names):
        if c == "length":
            out[:, j] = store.length_diff()
    return out


def symmetric_activity(store: ScoreStore, stat: str, columns: Sequence[int]) -> sparse.csr_matrix:
    """s(chosen) + s(rejected) of ``columns`` per pair: sparse (n, len(columns)) float64."""
    return store.rows(stat, columns, ("chosen", "rejected"))
