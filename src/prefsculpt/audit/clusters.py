"""Clusters for the audit (METHOD §2 and §3).

- Data clusters: spherical k-means on the *symmetric* activity s(chosen) + s(rejected) of each pair
  (never on the difference, which would select clusters on the outcome), then "where it holds":
  each concept's mean difference inside a cluster against the rest.
- Latent clusters: latents that co-fire, by normalised mutual information of binary firing, the top
  pairs kept as a weighted graph, Leiden communities; scored as the mean of their members.
- Near-duplicate latents: an SAE often learns one feature several times (latents that fire on the
  same responses and have the same top contexts). They are grouped (:func:`near_duplicates`) and
  tested as one cluster, so a reader sees one row with its members instead of a dozen identical rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy import stats as sps

from prefsculpt.concepts.scores import ConceptScores

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data clusters
def _normalise_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if sparse.issparse(x):
        x = sparse.csr_matrix(x, dtype=np.float64)
        norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        return sparse.diags(1.0 / np.where(norm > 0, norm, 1.0)) @ x, norm > 0
    norm = np.linalg.norm(x, axis=1)
    return x / np.where(norm > 0, norm, 1.0)[:, None], norm > 0


def active_rows(sym: np.ndarray) -> np.ndarray:
    """(n,) bool: pairs with any activity (dense or sparse ``sym``)."""
    if sparse.issparse(sym):
        return np.asarray(abs(sym).sum(axis=1)).ravel() > 0
    return np.linalg.norm(np.asarray(sym, dtype=np.float64), axis=1) > 0


def central_rows(labels: np.ndarray, sym: np.ndarray) -> dict[int, int]:
    """Per data cluster, its pair with the highest cosine to the cluster's mean unit row."""
    x, _ = _normalise_rows(sym if sparse.issparse(sym) else np.asarray(sym, dtype=np.float64))
    out = {}
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        centre = np.asarray(x[idx].mean(axis=0)).ravel()
        out[int(c)] = int(idx[int(np.argmax(np.asarray(x[idx] @ centre).ravel()))])
    return out


def _kmeanspp(x: sparse.csr_matrix, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on cosine distance. x: (n, F) unit rows -> (k, F) unit centroids."""
    first = x[int(rng.integers(x.shape[0]))].toarray().ravel()
    cent = [first]
    dist = 1.0 - x @ first  # (n,)
    for _ in range(1, k):
        w = np.maximum(dist, 0.0) ** 2
        i = int(rng.choice(len(w), p=w / w.sum())) if w.sum() > 0 else int(rng.integers(len(w)))
        cent.append(x[i].toarray().ravel())
        dist = np.minimum(dist, 1.0 - x @ cent[-1])
    return np.stack(cent)


def data_clusters(sym: np.ndarray, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 100) -> np.ndarray:
    """Spherical k-means labels (n,) of the pairs; deterministic per seed.

    sym: (n, F) symmetric activity s(chosen) + s(rejected), dense or scipy sparse. Rows are L2-normalised, so pairs cluster
    by *which* concepts are active, not how much text they hold. Pairs with no activity at all get
    label -1. Clusters are numbered by size, largest first. Best of ``n_init`` k-means++ starts by
    total cosine similarity.
    """
    if not sparse.issparse(sym):
        sym = np.asarray(sym, dtype=np.float64)
    x, alive = _normalise_rows(sym)
    # activity is sparse (most latents are silent on a pair): sparse products make each step O(nnz·k)
    xa = sparse.csr_matrix(x[alive])
    n = xa.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"data clusters: k={k} must be between 1 and the {n} pairs with any activity")
    rng = np.random.default_rng(seed)
    best_obj, best = -np.inf, None
    for _ in range(n_init):
        cent = _kmeanspp(xa, k, rng)  # (k, F)
        lab = None
        for _ in range(max_iter):
            sim = np.asarray(xa @ cent.T)  # (n, k) cosine similarities
            new = sim.argmax(axis=1)
            if lab is not None and np.array_equal(new, lab):
                break
            lab = new
            member = sparse.csr_matrix((np.ones(n), (lab, np.arange(n))), shape=(k, n))
            sums = np.asarray((member @ xa).todense())  # (k, F) member sums
            empty = np.flatnonzero(np.bincount(lab, minlength=k) == 0)
            # emptied clusters restart at the worst-fitting pairs
            for j, i in zip(empty, np.argsort(sim.max(axis=1))[: len(empty)], strict=True):
                sums[j] = xa[int(i)].toarray().ravel()
            cent, _ = _normalise_rows(sums)
        sim = np.asarray(xa @ cent.T)
        obj = float(sim.max(axis=1).sum())
        if obj > best_obj:
            best_obj, best = obj, sim.argmax(axis=1)
    # renumber by size (ties by first appearance) so labels read the same whatever the init order
    sizes = np.bincount(best, minlength=k)
    first = np.array([np.flatnonzero(best == j)[0] if sizes[j] else len(best) for j in range(k)])
    rank = np.empty(k, dtype=int)
    rank[np.lexsort((first, -sizes))] = np.arange(k)
    labels = np.full(sym.shape[0], -1)
    labels[alive] = rank[best]
    return labels


def _group_moments(d: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group count (k,), mean (k, F) and unbiased variance (k, F). onehot: (n, k) 0/1."""
    cnt = onehot.sum(axis=0)  # (k,)
    s1, s2 = onehot.T @ d, onehot.T @ (d * d)  # (k, F)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / cnt[:, None]
        var = (s2 - cnt[:, None] * mean**2) / (cnt[:, None] - 1)
    return cnt, mean, np.maximum(var, 0.0)


def _in_vs_out(d: np.ndarray, onehot: np.ndarray) -> dict[str, np.ndarray]:
    """Moments inside each cluster and in the rest (all pairs not in it). d: (n, F), onehot: (n, k)."""
    n_in, m_in, v_in = _group_moments(d, onehot)
    n_out, m_out, v_out = _group_moments(d, 1.0 - onehot)
    return {"n_in": n_in, "n_out": n_out, "m_in": m_in, "m_out": m_out, "v_in": v_in, "v_out": v_out}


def where_it_holds(
    d: np.ndarray, labels: np.ndarray, half: np.ndarray, min_size: int = 30,
    concept_index: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Each concept's mean difference inside each data cluster against the rest.

    d: (n, F) chosen - rejected; labels: (n,) from :func:`data_clusters`; half: (n,) bool split
    halves. Only clusters with at least ``min_size`` pairs inside and outside are reported.
    Returns one row per (concept, cluster): n, mean_in, mean_out, welch_z, cohen_d (pooled sd),
    p (two-sided normal p of welch_z, uncorrected: a descriptive screen, not a test with error
    control), agree_halves (in - out has the same nonzero sign in both halves).
    ``concept_index`` names the columns of d (default 0..F-1).
    """
    d = np.asarray(d, dtype=np.float64)
    labels, half = np.asarray(labels), np.asarray(half, dtype=bool)
    if len(labels) != len(d) or len(half) != len(d):
        raise ValueError(f"where_it_holds: d has {len(d)} pairs, labels {len(labels)}, half {len(half)}")
    ks = np.array([c for c in np.unique(labels) if c >= 0
                   and min_size <= (labels == c).sum() <= len(labels) - min_size])
    f = d.shape[1]
    idx = np.arange(f) if concept_index is None else np.asarray(concept_index)
    cols = ["concept_index", "cluster", "n", "mean_in", "mean_out", "welch_z", "cohen_d", "p", "agree_halves"]
    if len(ks) == 0:
        return pd.DataFrame(columns=cols)
    onehot = (labels[:, None] == ks[None, :]).astype(np.float64)  # (n, k)
    m = _in_vs_out(d, onehot)
    delta = m["m_in"] - m["m_out"]  # (k, F)
    se = np.sqrt(m["v_in"] / m["n_in"][:, None] + m["v_out"] / m["n_out"][:, None])
    pooled = np.sqrt(((m["n_in"][:, None] - 1) * m["v_in"] + (m["n_out"][:, None] - 1) * m["v_out"])
                     / (m["n_in"] + m["n_out"] - 2)[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, delta / se, 0.0)
        cd = np.where(pooled > 0, delta / pooled, 0.0)
    signs = []
    for h in (half, ~half):  # the same contrast inside each split half
        mh = _in_vs_out(d[h], onehot[h])
        ok = (mh["n_in"] >= 1) & (mh["n_out"] >= 1)
        signs.append(np.where(ok[:, None], np.sign(np.nan_to_num(mh["m_in"] - mh["m_out"])), 0.0))
    agree = (signs[0] == signs[1]) & (signs[0] != 0)
    k = len(ks)
    return pd.DataFrame({
        "concept_index": np.tile(idx, k), "cluster": np.repeat(ks, f), "n": np.repeat(m["n_in"].astype(int), f),
        "mean_in": m["m_in"].ravel(), "mean_out": m["m_out"].ravel(), "welch_z": z.ravel(),
        "cohen_d": cd.ravel(), "p": 2 * sps.norm.sf(np.abs(z.ravel())), "agree_halves": agree.ravel(),
    })


# ---------------------------------------------------------------- latent clusters
def binary_nmi(co: np.ndarray, cnt_a: np.ndarray, cnt_b: np.ndarray, m: int) -> np.ndarray:
    """NMI of binary firing vectors from counts, arithmetic normalisation (sklearn's default).

    co: (A, B) co-firing counts; cnt_a (A,), cnt_b (B,) firing counts; m rows. Returns (A, B) in
    [0, 1]; 0 where either latent is constant (no information to share).
    """
    co = np.asarray(co, dtype=np.float64)
    a = np.asarray(cnt_a, dtype=np.float64)[:, None]
    b = np.asarray(cnt_b, dtype=np.float64)[None, :]
    # the four cells of the 2x2 table and their row/column margins
    cells = ((co, a, b), (a - co, a, m - b), (b - co, m - a, b), (m - a - b + co, m - a, m - b))
    mi = np.zeros(np.broadcast_shapes(co.shape, a.shape, b.shape))
    with np.errstate(divide="ignore", invalid="ignore"):
        for nab, ra, cb in cells:
            mi += np.where(nab > 0, nab / m * np.log(nab * m / (ra * cb)), 0.0)

    def h(c: np.ndarray) -> np.ndarray:
        pr = c / m
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.nan_to_num(pr * np.log(pr)) - np.nan_to_num((1 - pr) * np.log(1 - pr))

    norm = (h(a) + h(b)) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where((h(a) > 0) & (h(b) > 0), np.maximum(mi, 0.0) / norm, 0.0)
    return np.clip(out, 0.0, 1.0)


def firing_matrix(scores: ConceptScores, stat: str = "max") -> np.ndarray:
    """Binary firing (2n, F): one row per response (chosen rows, then rejected rows)."""
    return np.concatenate([scores.get("chosen", stat) > 0, scores.get("rejected", stat) > 0])


def _top_pairs(firing: np.ndarray, top_fraction: float, chunk: int = 512):
    """The top ``top_fraction`` of latent pairs (i < j) by NMI: (i, j, w) arrays, w > 0."""
    x = firing.astype(np.float32)
    return _top_pairs_from_counts(x.T @ x, x.sum(axis=0), x.shape[0], top_fraction, chunk)


def _top_pairs_from_counts(co: np.ndarray, cnt: np.ndarray, m: int, top_fraction: float, chunk: int = 512):
    """As :func:`_top_pairs` from co-firing counts co (F, F), firing counts cnt (F,) over m rows."""
    f = len(cnt)
    n_keep = max(1, int(round(top_fraction * f * (f - 1) / 2)))
    keep_i, keep_j, keep_w = [], [], []
    for lo in range(0, f, chunk):  # row blocks bound the NMI temporaries at chunk x F, not F x F
        hi = min(f, lo + chunk)
        # only columns j >= lo can hold pairs i < j: (chunk, F - lo) co-firing counts, exact in float32
        nmi = binary_nmi(co[lo:hi, lo:], cnt[lo:hi], cnt[lo:], m)
        ii, jj = np.nonzero((np.arange(lo, hi)[:, None] < np.arange(lo, f)[None, :]) & (nmi > 0))
        w, jj = nmi[ii, jj], jj + lo
        if len(w) > n_keep:  # only a block's own top n_keep can reach the global top
            sel = np.argpartition(-w, n_keep - 1)[:n_keep]
            ii, jj, w = ii[sel], jj[sel], w[sel]
        keep_i.append(ii + lo), keep_j.append(jj), keep_w.append(w)
    i, j, w = (np.concatenate(v) for v in (keep_i, keep_j, keep_w))
    if len(w) > n_keep:
        sel = np.argpartition(-w, n_keep - 1)[:n_keep]
        i, j, w = i[sel], j[sel], w[sel]
    return i, j, w


def latent_clusters(
    firing: np.ndarray, top_fraction: float = 0.01, min_size: int = 4, seed: int = 0
) -> list[list[int]]:
    """Communities of co-firing latents: lists of column indices of ``firing``, largest first.

    firing: (m, F) bool, one row per response (see :func:`firing_matrix`). The top
    ``top_fraction`` of all latent pairs by NMI become a weighted graph (the paper's 1%); Leiden
    (modularity) communities with at least ``min_size`` members are returned.
    """
    firing = np.asarray(firing, dtype=bool)
    x = firing.astype(np.float32)
    return latent_clusters_from_counts(x.T @ x, x.sum(axis=0), len(firing), top_fraction, min_size, seed)


def latent_clusters_from_counts(
    co: np.ndarray, cnt: np.ndarray, m: int, top_fraction: float = 0.01, min_size: int = 4, seed: int = 0
) -> list[list[int]]:
    """:func:`latent_clusters` from co-firing counts co (F, F), firing counts cnt (F,) over m responses
    (what a pass over a shard store accumulates: memory F x F, whatever the number of pairs)."""
    import igraph as ig  # optional: only for latent clustering
    import leidenalg  # optional: only for latent clustering

    co, cnt = np.asarray(co, dtype=np.float32), np.asarray(cnt, dtype=np.float32)
    alive = np.flatnonzero((cnt > 0) & (cnt < m))  # constant latents share no information
    if len(alive) < max(2, min_size):
        return []
    i, j, w = _top_pairs_from_counts(co[np.ix_(alive, alive)], cnt[alive], m, top_fraction)
    g = ig.Graph(n=len(alive), edges=np.stack([i, j], axis=1).tolist(), edge_attrs={"weight": w.tolist()})
    part = leidenalg.find_partition(g, leidenalg.ModularityVertexPartition, weights="weight", seed=seed)
    out = [sorted(int(alive[v]) for v in comm) for comm in part if len(comm) >= min_size]
    out.sort(key=lambda c: (-len(c), c[0]))
    log.info("latent clusters: %d communities of >= %d latents from %d edges over %d live latents",
             len(out), min_size, len(w), len(alive))
    return out


# ---------------------------------------------------------------- near-duplicate latents
#: A latent's top contexts for the duplicate test: the (pair_id, span, position) of its top activations
#: and how often each token is among them.
ContextProfile = tuple[frozenset, Counter]


def context_keys(top_contexts: pd.DataFrame | None, concepts: Sequence[str]) -> list[ContextProfile]:
    """Per concept, its :data:`ContextProfile` over response spans (empty when it has none)."""
    empty: ContextProfile = (frozenset(), Counter())
    if top_contexts is None or top_contexts.empty:
        return [empty for _ in concepts]
    t = top_contexts[top_contexts["span"].isin(("chosen", "rejected"))]
    prof = {c: (frozenset(zip(g["pair_id"], g["span"], g["position"], strict=True)), Counter(g["token"]))
            for c, g in t.groupby("concept", sort=False)}
    return [prof.get(c, empty) for c in concepts]


def context_overlap(a: ContextProfile, b: ContextProfile) -> float:
    """How alike two latents' top contexts are, in [0, 1]: the larger of the share of the same token
    positions and the share of the same tokens (multiset), each over the smaller of the two. Positions
    are the strongest evidence; tokens cover duplicates whose top few positions were drawn from many
    occurrences of the same token."""
    (pa, ta), (pb, tb) = a, b
    pos = len(pa & pb) / min(len(pa), len(pb)) if pa and pb else 0.0
    nt = min(sum(ta.values()), sum(tb.values()))
    tok = sum((ta & tb).values()) / nt if nt else 0.0
    return max(pos, tok)


def firing_correlation(co: np.ndarray, cnt_a: np.ndarray, cnt_b: np.ndarray, m: int) -> np.ndarray:
    """Phi coefficient (Pearson correlation) of binary firing from counts: co (A, B) co-firing counts,
    cnt_a (A,), cnt_b (B,) firing counts over m rows. 0 where a latent is constant. Unlike the Jaccard
    index it is ~0 for two unrelated latents that both fire on nearly every response."""
    a = np.asarray(cnt_a, dtype=np.float64)[:, None]
    b = np.asarray(cnt_b, dtype=np.float64)[None, :]
    den = np.sqrt(a * (m - a) * b * (m - b))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (m * np.asarray(co, dtype=np.float64) - a * b) / den, 0.0)


def near_duplicates(
    co: np.ndarray, cnt: np.ndarray, m: int, contexts: Sequence[ContextProfile] | None = None,
    min_corr: float = 0.5, min_overlap: float = 0.5, chunk: int = 512,
) -> list[list[int]]:
    """Groups of near-duplicate latents: lists of column indices (>= 2 members), largest first.

    Two latents are near-duplicates when they *fire together* — the correlation of their binary
    firing over the m responses (:func:`firing_correlation`; co: (F, F) co-firing counts, cnt: (F,)
    firing counts, as :func:`latent_clusters_from_counts` takes them) is at least ``min_corr`` — *and*
    have the same top contexts (:func:`context_overlap` of ``contexts``, one profile per column, at
    least ``min_overlap``). Where either latent has no recorded contexts (or ``contexts`` is None),
    firing alone decides. Groups are the connected components of that relation.
    """
    co = np.asarray(co, dtype=np.float64)
    cnt = np.asarray(cnt, dtype=np.float64)
    f = len(cnt)
    parent = list(range(f))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lo in range(0, f, chunk):  # blocks of rows bound the temporaries at chunk x F
        hi = min(f, lo + chunk)
        phi = firing_correlation(co[lo:hi], cnt[lo:hi], cnt, m)
        ii, jj = np.nonzero((phi >= min_corr) & (np.arange(lo, hi)[:, None] < np.arange(f)[None, :]))
        for i, j in zip(ii + lo, jj, strict=True):
            if contexts is not None and contexts[i][1] and contexts[j][1]:
                if context_overlap(contexts[i], contexts[j]) < min_overlap:
                    continue
            a, b = find(int(i)), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    comps: dict[int, list[int]] = {}
    for i in range(f):
        comps.setdefault(find(i), []).append(i)
    out = [sorted(c) for c in comps.values() if len(c) >= 2]
    out.sort(key=lambda c: (-len(c), c[0]))
    log.info("near-duplicate latents: %d groups holding %d latents", len(out), sum(map(len, out)))
    return out


def cluster_scores(scores: ConceptScores, clusters: Sequence[Sequence[int]]) -> ConceptScores:
    """``scores`` with one concept ``cluster:<i>`` appended per cluster: the mean of its members'
    scores (members are column indices of ``scores``), for every span and statistic."""
    f = len(scores.concept_names) if scores.concept_names else next(iter(scores.values.values())).shape[1]
    if len(clusters) == 0:
        return scores
    for ci, members in enumerate(clusters):
        if len(members) == 0 or min(members) < 0 or max(members) >= f:
            raise ValueError(f"latent cluster {ci} has members {list(members)[:8]}... outside 0..{f - 1} or is empty")
    vals = {}
    for key, v in scores.values.items():  # v: (n, F) -> (n, F + C)
        extra = np.stack([v[:, list(mb)].mean(axis=1) for mb in clusters], axis=1).astype(v.dtype)
        vals[key] = np.concatenate([v, extra], axis=1)
    names = list(scores.concept_names) or [f"latent:{j}" for j in range(f)]
    return ConceptScores(list(scores.pair_ids), vals, dict(scores.n_tokens),
                         names + [f"cluster:{i}" for i in range(len(clusters))])
