"""Audit statistics (METHOD §3): paired effects, paired tests, BH q-values, split-half
replication and length control, vectorised over all F concepts at once.

For concept u and pair i, ``d[i, u] = s_u(chosen_i) - s_u(rejected_i)``. Everything here takes the
(n, F) matrix ``d`` and returns (F,) arrays; there is no Python loop over concepts.

Validity (the paper's z-scores are inflated; ours must not be). The null we guard against is
"chosen and rejected are exchangeable": each ``d_i`` is ``+|d_i|`` or ``-|d_i|`` with probability ½,
independently over pairs. This is exactly what :func:`calibrate` simulates by swapping sides.
- Zeros (a latent silent on both sides, the common case) carry no sign information and are dropped
  (Wilcoxon's ``zero_method="wilcox"``; the sign test counts only nonzero pairs). Conditional on
  the |d|, the signs of the nonzero pairs are fair coins, so both tests stay valid however sparse.
- Wilcoxon: average ranks for ties with the tie-corrected variance and a continuity correction;
  normal approximation. Its statistic is bounded, so in the far tail (where BH decides) the normal
  p-value is larger than the exact one: the approximation errs conservative (checked against
  scipy's exact distribution at 10-40 nonzero pairs: approx/exact >= 1.08 wherever exact p < 0.01).
  Sign test: exact binomial.
- What may be tested is decided only from swap-invariant quantities (support, number of nonzero
  pairs), so the filter cannot select on the outcome.
- Dependence: latents co-fire, so their tests are positively dependent. BH controls the FDR under
  positive regression dependence (PRDS; Benjamini & Yekutieli 2001). Two-sided tests of positively
  correlated statistics are not formally PRDS; we rely on BH's well-known robustness there and check
  it empirically (:func:`calibrate`, tests/unit/audit/test_stats.py). ``method="by"`` gives the
  Benjamini–Yekutieli q-values, valid under any dependence, at a cost in power.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from prefsculpt.concepts.scores import STATS, ConceptScores

log = logging.getLogger(__name__)

TESTS = ("wilcoxon", "sign")
_CHUNK = 1024  # concepts ranked per block: bounds the (chunk, n) int64 temporaries to ~20 MB at n=2.4k


# ---------------------------------------------------------------- effects
def _dz(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Paired effect size mean/sd; 0 when both are 0, ±inf for a constant nonzero difference."""
    with np.errstate(divide="ignore", invalid="ignore"):
        dz = mean / sd
        return np.where(sd > 0, dz, np.where(mean == 0, 0.0, np.sign(mean) * np.inf))


def paired_effects(d: np.ndarray) -> dict[str, np.ndarray]:
    """Effect of each concept from its paired differences ``d`` (n, F).

    Returns (F,) arrays: ``mean``, ``sd`` (ddof 1), ``d_z`` = mean/sd, ``share_chosen_more`` and
    ``share_rejected_more`` (shares of *all* n pairs with d > 0 / d < 0; pairs with d = 0 are in
    neither, so the two need not sum to 1), ``n_nonzero``, and ``ci_low``/``ci_high``: the t-based
    95% interval of the mean (n is in the hundreds or more, where the t interval is adequate).
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.shape[0]
    mean = d.mean(axis=0)  # (F,)
    sd = d.std(axis=0, ddof=1) if n > 1 else np.full(d.shape[1], np.nan)
    half_width = sps.t.ppf(0.975, n - 1) * sd / np.sqrt(n) if n > 1 else np.full(d.shape[1], np.nan)
    pos, neg = (d > 0).sum(axis=0), (d < 0).sum(axis=0)
    return {
        "mean": mean, "sd": sd, "d_z": _dz(mean, sd),
        "share_chosen_more": pos / n, "share_rejected_more": neg / n, "n_nonzero": pos + neg,
        "ci_low": mean - half_width, "ci_high": mean + half_width,
    }


# ---------------------------------------------------------------- tests
def _signed_rank_block(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wilcoxon pieces for a block of concepts. d: (n, B).

    Returns ``r_plus`` (B,) = sum of ranks of |d| over positive d, ranks taken among the nonzero d
    only (average ranks for ties); ``count`` (B,) nonzero pairs; ``tie`` (B,) = Σ_groups (t³ - t)
    over tie groups of nonzero |d|.
    """
    a = np.ascontiguousarray(np.abs(d).T)  # (B, n): sort along the contiguous axis
    b, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)  # (B, n) ascending; zeros come first
    pos_sorted = np.take_along_axis(np.ascontiguousarray(d.T) > 0, order, axis=1)
    idx = np.arange(n)
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]  # first element of each tie group
    last = np.ones_like(s, dtype=bool)
    last[:, :-1] = new[:, 1:]  # last element of each tie group
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)  # (B, n) group start position
    end = np.minimum.accumulate(np.where(last, idx, n)[:, ::-1], axis=1)[:, ::-1]  # group end
    n_zero = (s == 0).sum(axis=1)  # (B,)
    # 1-based average rank among all n, shifted down by the zeros (all sorted first) = rank among nonzero
    rank = (start + end) / 2.0 + 1.0 - n_zero[:, None]
    r_plus = (rank * pos_sorted).sum(axis=1)
    t = (end - start + 1).astype(np.float64)
    # Σ over elements of (t² - 1) equals Σ over groups of (t³ - t): each group has t elements
    tie = ((t * t - 1.0) * (s > 0)).sum(axis=1)
    return r_plus, (n - n_zero).astype(np.float64), tie


def wilcoxon_z(d: np.ndarray, correction: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Signed-rank z (F,) and nonzero count (F,); z is NaN where no pair differs.

    Matches ``scipy.stats.wilcoxon(d, zero_method="wilcox", correction=..., method="asymptotic")``.
    """
    d = np.asarray(d)
    f = d.shape[1]
    r_plus, count, tie = np.empty(f), np.empty(f), np.empty(f)
    for lo in range(0, f, _CHUNK):  # blocks of concepts, not a loop over concepts
        r_plus[lo:lo + _CHUNK], count[lo:lo + _CHUNK], tie[lo:lo + _CHUNK] = _signed_rank_block(d[:, lo:lo + _CHUNK])
    mean = count * (count + 1) / 4.0
    var = (count * (count + 1) * (2 * count + 1) - tie / 2.0) / 24.0
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(var)
        z = (r_plus - mean) / se
        if correction:
            z = z - np.sign(z) * 0.5 / se
    return np.where(count > 0, z, np.nan), count


def paired_pvalues(d: np.ndarray, test: str = "wilcoxon") -> np.ndarray:
    """Two-sided p-value (F,) of "chosen and rejected exchangeable" per concept; NaN if all d = 0.

    ``wilcoxon``: signed-rank, normal approximation with tie and continuity correction.
    ``sign``: exact binomial test on the nonzero pairs (= ``scipy.stats.binomtest(k, c).pvalue``).
    """
    p, _ = _pvalues_and_direction(d, test)
    return p


def _pvalues_and_direction(d: np.ndarray, test: str) -> tuple[np.ndarray, np.ndarray]:
    """p (F,) and the direction of the test statistic (F,): +1 chosen tends higher, -1 lower, 0 none."""
    if test == "wilcoxon":
        z, _ = wilcoxon_z(d)
        return 2.0 * sps.norm.sf(np.abs(z)), np.sign(np.nan_to_num(z))
    if test == "sign":
        k, c = (d > 0).sum(axis=0), (d != 0).sum(axis=0)
        # symmetric binomial: outcomes at most as likely as k are those at most min(k, c-k) from an end
        p = np.minimum(1.0, 2.0 * sps.binom.cdf(np.minimum(k, c - k), c, 0.5))
        return np.where(c > 0, p, np.nan), np.sign(2 * k - c).astype(np.float64)
    raise ValueError(f"audit test must be one of {TESTS}, got {test!r}")


def bh_qvalues(p: np.ndarray, method: str = "bh") -> np.ndarray:
    """Benjamini–Hochberg (or ``"by"``: Benjamini–Yekutieli) q-values, monotone in p and ≤ 1.

    NaN p (untested concepts) get q = 1 and do not count in m.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.ones_like(p)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    scale = m / np.arange(1, m + 1)  # m / rank
    if method == "by":
        scale = scale * np.sum(1.0 / np.arange(1, m + 1))
    elif method != "bh":
        raise ValueError(f"q-value method must be 'bh' or 'by', got {method!r}")
    # q_(i) = min over j >= i of p_(j) m / j: a reversed running minimum keeps q monotone in p
    qs = np.minimum.accumulate((pv[order] * scale)[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(qs, 1.0)
    q[ok] = out
    return q


# ---------------------------------------------------------------- replication, length
def half_assignment(keys: Sequence[str], salt: str = "") -> np.ndarray:
    """Split-half membership (n,) bool from a stable hash of each prompt key: pairs sharing a
    prompt share a half. Domain-separated from the train/test split hash, so halves are
    independent of splits.
    """
    out = np.empty(len(keys), dtype=bool)
    for i, k in enumerate(keys):
        out[i] = hashlib.sha256(f"split-half\x00{salt}\x00{k}".encode()).digest()[0] < 128
    return out


def split_half_effects(d: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d_z (F,) on the pairs with ``half`` True (a) and False (b); NaN for a half with < 2 pairs."""
    out = []
    for sel in (half, ~half):
        x = np.asarray(d[sel], dtype=np.float64)
        if len(x) < 2:
            out.append(np.full(d.shape[1], np.nan))
        else:
            out.append(_dz(x.mean(axis=0), x.std(axis=0, ddof=1)))
    return out[0], out[1]


def replicates(eff_a: np.ndarray, eff_b: np.ndarray) -> np.ndarray:
    """Both halves show an effect of the same sign (F,) bool."""
    sa, sb = np.sign(np.nan_to_num(eff_a)), np.sign(np.nan_to_num(eff_b))
    return (sa == sb) & (sa != 0)


def rank_effect(eff_a: np.ndarray, eff_b: np.ndarray) -> np.ndarray:
    """The smaller |half effect|, signed (the paper's ranking); 0 where the halves disagree."""
    small = np.minimum(np.abs(np.nan_to_num(eff_a)), np.abs(np.nan_to_num(eff_b)))
    return np.where(replicates(eff_a, eff_b), np.sign(eff_a) * small, 0.0)


def length_controlled(d: np.ndarray, length_diff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Effect at zero length difference, per concept: OLS ``d = a + b·L + e`` (vectorised over F).

    Returns (effect (F,), p (F,)). The effect is the intercept a standardised by the residual sd,
    a / sd(e): with no length relation (b = 0) this is mean/sd = d_z, so it reads on the d_z scale.
    p: two-sided t-test of a = 0 (n - 2 df). A concept that only tracks length (d ≈ b·L) gets a ≈ 0.
    Where L is constant the slope is not identified: the one-sample t-test of the mean is returned.
    A concept that *is* length (residual sd 0) gets NaN.
    """
    d = np.asarray(d, dtype=np.float64)
    x = np.asarray(length_diff, dtype=np.float64)
    n = d.shape[0]
    if x.shape != (n,):
        raise ValueError(f"length_diff has shape {x.shape}, expected ({n},) to match the {n} pairs")
    if n < 3:
        return np.full(d.shape[1], np.nan), np.full(d.shape[1], np.nan)
    xm, dm = x.mean(), d.mean(axis=0)
    xc = x - xm
    sxx = float(xc @ xc)
    if sxx <= 0:  # constant length difference: no slope to fit
        sd = d.std(axis=0, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = dm / (sd / np.sqrt(n))
        return _dz(dm, sd), np.where(sd > 0, 2 * sps.t.sf(np.abs(t), n - 1), np.nan)
    b = (xc @ (d - dm)) / sxx  # (F,)
    a = dm - b * xm
    tot_ss = ((d - dm) ** 2).sum(axis=0)
    resid_ss = np.maximum(tot_ss - b * b * sxx, 0.0)
    s_e = np.sqrt(resid_ss / (n - 2))
    se_a = s_e * np.sqrt(1.0 / n + xm * xm / sxx)
    # a concept that equals length up to float error has no residual to test: the subtraction above
    # cancels catastrophically there, so judge by the explained share, not by s_e's absolute size
    ok = (s_e > 1e-9 * (np.abs(dm) + d.std(axis=0) + 1e-300)) & (resid_ss > 1e-9 * tot_ss)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(ok, a / s_e, np.nan)
        p = np.where(ok, 2 * sps.t.sf(np.abs(a / se_a), n - 2), np.nan)
    return eff, p


# ---------------------------------------------------------------- the audit table
def _kind_and_index(name: str, col: int) -> tuple[str, int]:
    prefix, _, rest = name.partition(":")
    kind = prefix if prefix in ("latent", "named", "cluster") else "latent"
    return kind, int(rest) if rest.isdigit() else col


def _check_finite(d: np.ndarray, names: Sequence[str], pair_ids: Sequence[str], what: str) -> None:
    bad = ~np.isfinite(d)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"{what}: concept {names[j]!r} has a non-finite score difference at pair {pair_ids[i]!r} "
            f"(row {i}; {int(bad.sum())} non-finite cells in all): re-encode the pairs or drop the concept"
        )


def test_concepts(
    scores: ConceptScores,
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
) -> pd.DataFrame:
    """One row per concept: effect, test, q, replication, length control. See the module doc.

    Concepts: the columns of ``scores`` (kind from the name prefix ``latent:``/``named:``/``cluster:``;
    ``index`` = the number after the prefix, else the column position), latent ``clusters`` (lists of
    column indices, added as ``cluster:<i>`` = mean of members, see ``clusters.cluster_scores``), and
    ``extra`` built-ins (name -> (n,) chosen - rejected differences, kind ``builtin``, index -1).
    ``extra=None`` adds ``{"length": scores.length_diff()}``; pass ``{}`` for none.

    Tested (``tested`` True, in BH's m) only if support ≥ ``min_support`` (share of pairs where the
    concept is nonzero on either side; for built-ins, d ≠ 0) and ≥ ``min_nonzero`` pairs differ. Both
    are swap-invariant. Untested rows are listed with p = q = NaN.
    ``significant`` = q < fdr and replicated (both half d_z agree in sign with the test's direction).
    Sorted: significant by ``rank_score`` descending, then the rest by p (untested last).
    ``rank_by="split_half"``: rank_score = |rank_effect| (the smaller half effect, METHOD §3).
    ``rank_by="conservative"`` (default): the smaller of that and the length-controlled effect (0 when
    length control flips the sign), so a concept that only rides on "the preferred answer is longer"
    does not crowd out the rest; concepts with no length-controlled effect (length itself) keep
    |rank_effect|.
    """
    if rank_by not in ("conservative", "split_half"):
        raise ValueError(f"audit.rank_by={rank_by!r}: use conservative or split_half")
    if stat not in STATS or ("chosen", stat) not in scores.values:
        raise ValueError(f"audit score {stat!r} not in the concept scores (have {sorted({s for _, s in scores.values})})")
    n = scores.n_pairs
    if len(prompt_keys) != n:
        raise ValueError(f"prompt_keys has {len(prompt_keys)} entries but the concept scores have {n} pairs")
    if clusters:
        from prefsculpt.audit.clusters import cluster_scores

        scores = cluster_scores(scores, clusters)
    c, r = scores.get("chosen", stat), scores.get("rejected", stat)
    f = c.shape[1]
    names = list(scores.concept_names) or [f"latent:{j}" for j in range(f)]
    if len(names) != f:
        raise ValueError(f"concept scores name {len(names)} concepts but hold {f} columns")
    d = (c.astype(np.float64) - r)  # (n, F)
    _check_finite(d, names, scores.pair_ids, "concept scores")
    support = ((c != 0) | (r != 0)).mean(axis=0)  # (F,)

    if extra is None:
        extra = {"length": scores.length_diff()} if {"chosen", "rejected"} <= set(scores.n_tokens) else {}
    if extra:
        cols = []
        for name, v in extra.items():
            v = np.asarray(v, dtype=np.float64)
            if v.shape != (n,):
                raise ValueError(f"built-in concept {name!r} has shape {v.shape}, expected ({n},) differences")
            cols.append(v)
        xd = np.stack(cols, axis=1)
        _check_finite(xd, list(extra), scores.pair_ids, "built-in concepts")
        d = np.concatenate([d, xd], axis=1)
        support = np.concatenate([support, (xd != 0).mean(axis=0)])
    kinds, index = zip(*[_kind_and_index(nm, j) for j, nm in enumerate(names)], strict=True) if f else ((), ())
    names = names + list(extra)
    kinds, index = list(kinds) + ["builtin"] * len(extra), list(index) + [-1] * len(extra)

    eff = paired_effects(d)
    tested = (support >= min_support) & (eff["n_nonzero"] >= max(min_nonzero, 1))
    p = np.full(d.shape[1], np.nan)
    direction = np.sign(eff["mean"])
    if tested.any():
        pt, dt = _pvalues_and_direction(d[:, tested], test)
        p[tested], direction[tested] = pt, dt
    q = bh_qvalues(p)
    q[~tested] = np.nan
    half = half_assignment(prompt_keys, salt)
    ha, hb = split_half_effects(d, half)
    rep = replicates(ha, hb) & (np.sign(ha) == direction)
    length_diff = scores.length_diff() if {"chosen", "rejected"} <= set(scores.n_tokens) else None
    if length_diff is not None:
        leff, lp = length_controlled(d, length_diff)
    else:
        leff, lp = np.full(d.shape[1], np.nan), np.full(d.shape[1], np.nan)

    df = pd.DataFrame({
        "concept": names, "kind": kinds, "index": index, "n": n, "n_nonzero": eff["n_nonzero"],
        "support": support, "tested": tested, "mean_diff": eff["mean"], "d_z": eff["d_z"],
        "share_chosen_more": eff["share_chosen_more"], "share_rejected_more": eff["share_rejected_more"],
        "ci_low": eff["ci_low"], "ci_high": eff["ci_high"], "p": p, "q": q,
        "half_a": ha, "half_b": hb, "replicated": rep, "rank_effect": np.where(rep, rank_effect(ha, hb), 0.0),
        "length_effect": leff, "length_p": lp, "direction": direction.astype(int),
        "significant": tested & (q < fdr) & rep,
    })
    score = np.abs(df["rank_effect"].to_numpy())
    if rank_by == "conservative":
        le = df["length_effect"].to_numpy()
        agree = np.sign(le) == df["direction"].to_numpy()
        score = np.where(np.isfinite(le), np.minimum(score, np.where(agree, np.abs(le), 0.0)), score)
    df["rank_score"] = score
    key_sig = np.where(df["significant"], -df["rank_score"], np.inf)
    df = df.assign(_a=~df["significant"], _b=key_sig, _c=~df["tested"], _d=df["p"].fillna(np.inf))
    df = df.sort_values(["_a", "_b", "_c", "_d"], kind="stable").drop(columns=["_a", "_b", "_c", "_d"])
    log.info("audit: %d concepts, %d tested, %d significant (q < %g, replicated)",
             len(df), int(tested.sum()), int(df["significant"].sum()), fdr)
    return df.reset_index(drop=True)


test_concepts.__test__ = False  # a library function, not a pytest test


def calibrate(
    scores: ConceptScores, prompt_keys: Sequence[str], n_seeds: int = 20, fdr: float = 0.05, **kw
) -> pd.DataFrame:
    """Run the audit on ``n_seeds`` null datasets: the same pairs with chosen and rejected swapped
    by a fair coin per pair (seed s draws the coins with ``numpy.random.default_rng(s)``).

    Under this null every hypothesis is false, so BH at level ``fdr`` should report anything in at
    most about ``fdr`` of the seeds. Returns DataFrame(seed, n_q_below_fdr, n_significant, min_q,
    min_p); ``n_significant`` also requires replication. ``kw`` goes to :func:`test_concepts`; an
    ``extra`` mapping is swapped with the pairs.
    """
    rows = []
    extra = kw.pop("extra", None)
    for seed in range(n_seeds):
        flip = np.random.default_rng(seed).random(scores.n_pairs) < 0.5
        ex = None if extra is None else {k: np.where(flip, -1.0, 1.0) * np.asarray(v) for k, v in extra.items()}
        df = test_concepts(scores.swapped(flip), prompt_keys, fdr=fdr, extra=ex, **kw)
        t = df[df["tested"]]
        rows.append({
            "seed": seed, "n_q_below_fdr": int((t["q"] < fdr).sum()), "n_significant": int(t["significant"].sum()),
            "min_q": float(t["q"].min()) if len(t) else np.nan, "min_p": float(t["p"].min()) if len(t) else np.nan,
        })
    out = pd.DataFrame(rows)
    log.info("calibration: %d of %d null seeds report a hypothesis at q < %g",
             int((out["n_q_below_fdr"] > 0).sum()), n_seeds, fdr)
    return out
