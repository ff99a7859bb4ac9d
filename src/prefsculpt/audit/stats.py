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

Length control is the default for the headline. Preferred responses are usually longer, and a span's
max (or firing share) grows with length, so on real data most raw tests restate "chosen is longer".
The q-values and ``significant`` therefore rest on the length-controlled test (the intercept of
``d = a + b·L``, :func:`length_controlled`), the raw ones stay beside them (``q_raw``,
``significant_raw``). Under the swap null (d, L) -> -(d, L) jointly, so the intercept's t statistic
is symmetric about 0; :func:`calibrate` checks the whole procedure on the very data, and
``bench/calibration.py`` checks the tail where BH decides: on the default run's 4,063 tests its null
p-values match exact ones (39 below 1e-4 in 100 seeds, 40.6 expected) and every null discovery's
exact sign-flip p (10^6 draws; the t depends on the coins only through s·d and s·L) agrees with its
t p. A rank test on residuals is no substitute: it tests symmetry, and re-admits length (bench
README). What carries the length gap is measured the other way round, by :func:`length_carried`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from prefsculpt.audit.clusters import cluster_scores
from prefsculpt.concepts.scores import STATS, ConceptScores

log = logging.getLogger(__name__)

TESTS = ("wilcoxon", "sign")


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
def wilcoxon_test(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided signed-rank p (F,) and direction (F,) per column of ``d`` (n, F); NaN p where no pair differs.

    p is ``scipy.stats.wilcoxon(d, axis=0, zero_method="wilcox", correction=True,
    method="asymptotic")``: zeros dropped, average ranks for ties with the tie-corrected variance, a
    continuity correction, normal approximation (the module doc says why not exact). The
    direction is the sign of r+ - E[r+] = r+ - c(c+1)/4 over the c nonzero pairs, with r+ taken from
    the one-sided call (its statistic is r+; scipy's two-sided statistic is min(r+, r-), which has
    no sign). Before scipy we took the sign of the continuity-corrected z; ranks are multiples of
    0.5, so the two differ only where |r+ - E[r+]| = 0.5 exactly, where the corrected z is 0 (p = 1):
    such a concept now points the way r+ does instead of 0. p-values are unchanged.
    """
    d = np.asarray(d, dtype=np.float64)
    kw = dict(axis=0, zero_method="wilcox", correction=True, method="asymptotic")
    count = (d != 0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # columns with no nonzero pair: 0/0 -> NaN
        p = sps.wilcoxon(d, **kw).pvalue
        r_plus = sps.wilcoxon(d, alternative="greater", **kw).statistic
    p = np.where(count > 0, p, np.nan)
    return p, np.where(count > 0, np.sign(r_plus - count * (count + 1) / 4.0), 0.0)


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
        return wilcoxon_test(d)
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
    if method not in ("bh", "by"):
        raise ValueError(f"q-value method must be 'bh' or 'by', got {method!r}")
    p = np.asarray(p, dtype=np.float64)
    q = np.ones_like(p)
    ok = np.isfinite(p)
    if ok.any():  # scipy rejects NaN; the finite p-values alone make up m
        q[ok] = sps.false_discovery_control(p[ok], method=method)
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


def length_carried(d: np.ndarray, length_diff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How much of the chosen - rejected length gap each concept accounts for (the reverse of
    :func:`length_controlled`): OLS of the length difference on the concept's difference,
    ``L = c + β·d + e``, per concept (vectorised over F).

    Returns (share (F,), r2 (F,)). Taking means, ``mean(L) = c + β·mean(d)``: ``c`` is the length gap
    left at equal concept score, ``β·mean(d)`` the part the concept's own gap carries, so
    ``share = β·mean(d) / mean(L) = 1 - c / mean(L)`` — 1 when the concept explains the whole gap, 0
    when it explains none of it (it can leave [0, 1]: > 1 when the gap would be larger at equal
    concept score, < 0 when the concept pulls the other way). ``r2``: the share of the variance of
    the length difference the concept's difference explains (corr²). NaN where the concept does not
    vary, or the lengths do not (or their mean gap is 0).
    """
    d = np.asarray(d, dtype=np.float64)
    x = np.asarray(length_diff, dtype=np.float64)
    n = d.shape[0]
    nan = np.full(d.shape[1], np.nan)
    if n < 3 or x.shape != (n,):
        return nan, nan
    xm, dm = x.mean(), d.mean(axis=0)
    xc, dc = x - xm, d - dm
    sxx, sdd = float(xc @ xc), (dc * dc).sum(axis=0)
    if sxx <= 0 or xm == 0:
        return nan, nan
    sxd = xc @ dc
    ok = sdd > 1e-12 * (dm * dm * n + 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(ok, sxd / sdd * dm / xm, np.nan)
        r2 = np.where(ok, sxd * sxd / (sdd * sxx), np.nan)
    return share, np.clip(r2, 0.0, 1.0)


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


def column_stats(
    d: np.ndarray, support: np.ndarray, half: np.ndarray, length_diff: np.ndarray | None, test: str = "wilcoxon",
    min_support: float = 0.01, min_nonzero: int = 10,
) -> dict[str, np.ndarray]:
    """Every per-concept quantity of the audit table for a block of concepts: (g,) arrays.

    d: (n, g) chosen - rejected; support: (g,) share of pairs where the concept is nonzero on either
    side; half: (n,) split-half membership; length_diff: (n,) or None. Each column is computed from
    its own values only, so a table built block by block (``audit.streaming``) equals one built at
    once; only the q-values need all p-values (:func:`assemble_table`).
    """
    eff = paired_effects(d)
    tested = (support >= min_support) & (eff["n_nonzero"] >= max(min_nonzero, 1))
    p = np.full(d.shape[1], np.nan)
    direction = np.sign(eff["mean"])
    if tested.any():
        pt, dt = _pvalues_and_direction(d[:, tested], test)
        p[tested], direction[tested] = pt, dt
    ha, hb = split_half_effects(d, half)
    if length_diff is not None:
        leff, lp = length_controlled(d, length_diff)
        lshare, lr2 = length_carried(d, length_diff)
    else:
        leff, lp = np.full(d.shape[1], np.nan), np.full(d.shape[1], np.nan)
        lshare, lr2 = leff.copy(), leff.copy()
    return {
        "n_nonzero": eff["n_nonzero"], "support": support, "tested": tested, "mean_diff": eff["mean"],
        "d_z": eff["d_z"], "share_chosen_more": eff["share_chosen_more"],
        "share_rejected_more": eff["share_rejected_more"], "ci_low": eff["ci_low"], "ci_high": eff["ci_high"],
        "p": p, "half_a": ha, "half_b": hb, "length_effect": leff, "length_p": lp, "direction": direction,
        "length_share": lshare, "length_r2": lr2,
    }


def concat_stats(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Blocks of :func:`column_stats`, in concept order, as one."""
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def assemble_table(
    names: Sequence[str], kinds: Sequence[str], index: Sequence[int], n: int, st: Mapping[str, np.ndarray],
    fdr: float = 0.05, rank_by: str = "conservative",
) -> pd.DataFrame:
    """The audit table from all concepts' :func:`column_stats`: q-values (BH over the tested), replication,
    significance, rank score and the sort order described in :func:`test_concepts`.

    Length-controlled by default: ``q`` is BH over the length-controlled p (``length_p``) of the
    tested concepts — or their raw ``p`` where length control is undefined (``length`` itself, or
    no lengths recorded) — and ``significant`` rests on it. ``q_raw`` / ``significant_raw`` are the
    same on the raw paired test, kept beside them for reading."""
    tested, direction = st["tested"], st["direction"]
    le, lp = st["length_effect"], st["length_p"]
    controlled = np.isfinite(lp)
    q_raw = bh_qvalues(np.where(tested, st["p"], np.nan))
    q = bh_qvalues(np.where(tested, np.where(controlled, lp, st["p"]), np.nan))
    q_raw[~tested], q[~tested] = np.nan, np.nan
    ha, hb = st["half_a"], st["half_b"]
    rep = replicates(ha, hb) & (np.sign(ha) == direction)
    # length control must not reverse the direction the raw test reports (else the decision's sign is wrong)
    agrees = ~np.isfinite(le) | (np.sign(le) == direction)
    sig_raw = tested & (q_raw < fdr) & rep
    df = pd.DataFrame({
        "concept": list(names), "kind": list(kinds), "index": list(index), "n": n, "n_nonzero": st["n_nonzero"],
        "support": st["support"], "tested": tested, "mean_diff": st["mean_diff"], "d_z": st["d_z"],
        "share_chosen_more": st["share_chosen_more"], "share_rejected_more": st["share_rejected_more"],
        "ci_low": st["ci_low"], "ci_high": st["ci_high"], "p": st["p"], "q": q, "q_raw": q_raw,
        "half_a": ha, "half_b": hb, "replicated": rep, "rank_effect": np.where(rep, rank_effect(ha, hb), 0.0),
        "length_effect": le, "length_p": lp, "length_share": st["length_share"], "length_r2": st["length_r2"],
        "direction": direction.astype(int),
        "significant": tested & (q < fdr) & rep & agrees, "significant_raw": sig_raw,
    })
    score = np.abs(df["rank_effect"].to_numpy())
    if rank_by == "conservative":
        agree = np.sign(le) == df["direction"].to_numpy()
        score = np.where(np.isfinite(le), np.minimum(score, np.where(agree, np.abs(le), 0.0)), score)
    df["rank_score"] = score
    key_sig = np.where(df["significant"], -df["rank_score"], np.inf)
    df = df.assign(_a=~df["significant"], _b=key_sig, _c=~df["tested"], _d=df["p"].fillna(np.inf))
    df = df.sort_values(["_a", "_b", "_c", "_d"], kind="stable").drop(columns=["_a", "_b", "_c", "_d"])
    log.info("audit: %d concepts, %d tested, %d significant length-controlled (%d raw; q < %g, replicated)",
             len(df), int(tested.sum()), int(df["significant"].sum()), int(sig_raw.sum()), fdr)
    return df.reset_index(drop=True)


def check_table_args(stat: str, rank_by: str, n: int, prompt_keys: Sequence[str]) -> None:
    if rank_by not in ("conservative", "split_half"):
        raise ValueError(f"audit.rank_by={rank_by!r}: use conservative or split_half")
    if stat not in STATS:
        raise ValueError(f"audit score {stat!r} not in the concept scores (have {list(STATS)})")
    if len(prompt_keys) != n:
        raise ValueError(f"prompt_keys has {len(prompt_keys)} entries but the concept scores have {n} pairs")


def builtin_diffs(extra: Mapping[str, np.ndarray], n: int, pair_ids: Sequence[str]) -> np.ndarray:
    """The built-in concepts' differences as (n, len(extra)) float64, shapes and finiteness checked."""
    cols = []
    for name, v in extra.items():
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (n,):
            raise ValueError(f"built-in concept {name!r} has shape {v.shape}, expected ({n},) differences")
        cols.append(v)
    xd = np.stack(cols, axis=1) if cols else np.zeros((n, 0))
    _check_finite(xd, list(extra), pair_ids, "built-in concepts")
    return xd


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
    ``q``: BH over the length-controlled p (:func:`length_controlled`; the raw p where length control is
    undefined), ``q_raw``: BH over the raw paired test's p. ``significant`` = q < fdr, replicated
    (both half d_z agree in sign with the test's direction) and, where defined, the length-controlled
    effect points the same way; ``significant_raw`` = q_raw < fdr and replicated. ``length_share`` /
    ``length_r2``: how much of the length gap the concept carries (:func:`length_carried`).
    Sorted: significant by ``rank_score`` descending, then the rest by p (untested last).
    ``rank_by="split_half"``: rank_score = |rank_effect| (the smaller half effect, METHOD §3).
    ``rank_by="conservative"`` (default): the smaller of that and the length-controlled effect (0 when
    length control flips the sign), so a concept that only rides on "the preferred answer is longer"
    does not crowd out the rest; concepts with no length-controlled effect (length itself) keep
    |rank_effect|.

    Holds the (n, F) scores in memory; ``audit.streaming.test_store`` computes the same table from
    a shard store concept block by concept block.
    """
    n = scores.n_pairs
    check_table_args(stat, rank_by, n, prompt_keys)
    if ("chosen", stat) not in scores.values:
        raise ValueError(f"audit score {stat!r} not in the concept scores (have {sorted({s for _, s in scores.values})})")
    if clusters:

        scores = cluster_scores(scores, clusters)
    c, r = scores.get("chosen", stat), scores.get("rejected", stat)
    f = c.shape[1]
    names = list(scores.concept_names) or [f"latent:{j}" for j in range(f)]
    if len(names) != f:
        raise ValueError(f"concept scores name {len(names)} concepts but hold {f} columns")
    d = (c.astype(np.float64) - r)  # (n, F)
    _check_finite(d, names, scores.pair_ids, "concept scores")
    support = ((c != 0) | (r != 0)).mean(axis=0)  # (F,)
    has_len = {"chosen", "rejected"} <= set(scores.n_tokens)
    if extra is None:
        extra = {"length": scores.length_diff()} if has_len else {}
    if extra:
        xd = builtin_diffs(extra, n, scores.pair_ids)
        d = np.concatenate([d, xd], axis=1)
        support = np.concatenate([support, (xd != 0).mean(axis=0)])
    kinds, index = zip(*[_kind_and_index(nm, j) for j, nm in enumerate(names)], strict=True) if f else ((), ())
    names = names + list(extra)
    kinds, index = list(kinds) + ["builtin"] * len(extra), list(index) + [-1] * len(extra)
    st = column_stats(d, support, half_assignment(prompt_keys, salt), scores.length_diff() if has_len else None,
                      test, min_support, min_nonzero)
    return assemble_table(names, kinds, index, n, st, fdr, rank_by)


test_concepts.__test__ = False  # a library function, not a pytest test


def calibrate(
    scores: ConceptScores, prompt_keys: Sequence[str], n_seeds: int = 20, fdr: float = 0.05, **kw
) -> pd.DataFrame:
    """Run the audit on ``n_seeds`` null datasets: the same pairs with chosen and rejected swapped
    by a fair coin per pair (seed s draws the coins with ``numpy.random.default_rng(s)``).

    Under this null every hypothesis is false, so BH at level ``fdr`` should report anything in at
    most about ``fdr`` of the seeds. Returns DataFrame(seed, n_q_below_fdr, n_significant, min_q,
    min_p, n_q_raw_below_fdr, n_significant_raw); ``n_significant`` also requires replication; the
    ``_raw`` counts are on the raw test's q. ``kw`` goes to :func:`test_concepts`; an
    ``extra`` mapping is swapped with the pairs.
    """
    rows = []
    extra = kw.pop("extra", None)
    for seed, flip in enumerate(swap_flips(scores.n_pairs, n_seeds)):
        ex = None if extra is None else {k: np.where(flip, -1.0, 1.0) * np.asarray(v) for k, v in extra.items()}
        df = test_concepts(scores.swapped(flip), prompt_keys, fdr=fdr, extra=ex, **kw)
        rows.append(calibration_row(seed, df, fdr))
    return calibration_summary(rows, fdr)


def swap_flips(n_pairs: int, n_seeds: int) -> list[np.ndarray]:
    """The null datasets' coins: seed s swaps pair i where ``default_rng(s).random(n)[i] < 0.5``."""
    return [np.random.default_rng(seed).random(n_pairs) < 0.5 for seed in range(n_seeds)]


def calibration_row(seed: int, df: pd.DataFrame, fdr: float) -> dict[str, float]:
    t = df[df["tested"]]
    return {
        "seed": seed, "n_q_below_fdr": int((t["q"] < fdr).sum()), "n_significant": int(t["significant"].sum()),
        "min_q": float(t["q"].min()) if len(t) else np.nan, "min_p": float(t["p"].min()) if len(t) else np.nan,
        "n_q_raw_below_fdr": int((t["q_raw"] < fdr).sum()), "n_significant_raw": int(t["significant_raw"].sum()),
    }


def calibration_summary(rows: list[dict[str, float]], fdr: float) -> pd.DataFrame:
    out = pd.DataFrame(rows)
    log.info("calibration: %d of %d null seeds report a hypothesis at q < %g",
             int((out["n_q_below_fdr"] > 0).sum()), len(out), fdr)
    return out
