"""The audit's Wilcoxon and BH now come from scipy; these pin them to the hand-written versions they
replaced (issue 12 point 7). The old functions are kept here, verbatim in substance, as the reference."""

import numpy as np
import pytest
from scipy import stats as sps

from prefsculpt.audit.stats import bh_qvalues, paired_pvalues, wilcoxon_test


# ---------------------------------------------------------------- the old implementation (reference)
def _old_signed_rank_block(d):
    a = np.ascontiguousarray(np.abs(d).T)
    b, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    pos_sorted = np.take_along_axis(np.ascontiguousarray(d.T) > 0, order, axis=1)
    idx = np.arange(n)
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    last = np.ones_like(s, dtype=bool)
    last[:, :-1] = new[:, 1:]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, idx, n)[:, ::-1], axis=1)[:, ::-1]
    n_zero = (s == 0).sum(axis=1)
    rank = (start + end) / 2.0 + 1.0 - n_zero[:, None]
    r_plus = (rank * pos_sorted).sum(axis=1)
    t = (end - start + 1).astype(np.float64)
    tie = ((t * t - 1.0) * (s > 0)).sum(axis=1)
    return r_plus, (n - n_zero).astype(np.float64), tie


def _old_wilcoxon(d):
    """(p, direction, |r+ - E r+|) of the hand-written signed-rank test."""
    r_plus, count, tie = _old_signed_rank_block(np.asarray(d, dtype=np.float64))
    mean = count * (count + 1) / 4.0
    var = (count * (count + 1) * (2 * count + 1) - tie / 2.0) / 24.0
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(var)
        z = (r_plus - mean) / se
        z = z - np.sign(z) * 0.5 / se
    z = np.where(count > 0, z, np.nan)
    return 2.0 * sps.norm.sf(np.abs(z)), np.sign(np.nan_to_num(z)), np.abs(r_plus - mean)


def _old_bh(p, method="bh"):
    p = np.asarray(p, dtype=np.float64)
    q = np.ones_like(p)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    scale = m / np.arange(1, m + 1)
    if method == "by":
        scale = scale * np.sum(1.0 / np.arange(1, m + 1))
    qs = np.minimum.accumulate((pv[order] * scale)[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(qs, 1.0)
    q[ok] = out
    return q


# ---------------------------------------------------------------- fixtures
def _diffs(seed=0, n=120, f=80):
    """Sparse differences with heavy ties, columns of all zeros, one nonzero pair, and real effects."""
    rng = np.random.default_rng(seed)
    c = np.where(rng.random((n, f)) < 0.25, rng.exponential(size=(n, f)), 0.0)
    r = np.where(rng.random((n, f)) < 0.25, rng.exponential(size=(n, f)), 0.0)
    c[:, :30], r[:, :30] = np.round(c[:, :30] * 2) / 2, np.round(r[:, :30] * 2) / 2  # ties and exact zeros
    c[:, 40:45] += 0.7  # effects: small p-values are compared too
    r[:, 45:48] += 0.5
    d = c - r
    d[:, 50] = 0.0  # never differs
    d[:, 51] = 0.0
    d[7, 51] = 1.0  # one nonzero pair
    d[:, 52] = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)  # balanced: r+ = E[r+]
    return d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wilcoxon_pvalues_equal_the_old_implementation(seed):
    d = _diffs(seed)
    p_new, dir_new = wilcoxon_test(d)
    p_old, dir_old, gap = _old_wilcoxon(d)
    np.testing.assert_allclose(p_new, p_old, rtol=1e-12, atol=0)  # NaN where nothing differs, in both
    assert np.isnan(p_new[50]) and dir_new[50] == 0
    np.testing.assert_allclose(paired_pvalues(d, "wilcoxon"), p_old, rtol=1e-12, atol=0)
    # direction: the same wherever |r+ - E r+| != 0.5; at 0.5 the old continuity-corrected z was 0
    # (documented in wilcoxon_test)
    far = gap != 0.5
    np.testing.assert_array_equal(dir_new[far], dir_old[far])
    assert dir_new[52] == 0  # exactly balanced: no direction


def test_wilcoxon_direction_half_a_rank_from_the_null_follows_r_plus():
    # ranks are multiples of 0.5, so |r+ - E r+| is 0, 0.5, 1, ...; at 0.5 the old corrected z was
    # exactly 0 (direction 0); now the direction is r+'s: ranks 1..5, r+ = 3 + 5 = 8 > E = 7.5
    d = np.array([[-1.0], [-2.0], [3.0], [-4.0], [5.0]])
    p_new, dir_new = wilcoxon_test(d)
    p_old, dir_old, gap = _old_wilcoxon(d)
    assert gap[0] == 0.5 and dir_old[0] == 0 and dir_new[0] == 1
    np.testing.assert_allclose(p_new, p_old, rtol=1e-12)
    assert p_new[0] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["bh", "by"])
def test_qvalues_equal_the_old_implementation(method):
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(size=300), rng.uniform(0, 1e-4, size=20), [np.nan] * 5, [0.0, 1.0, 0.5, 0.5]])
    rng.shuffle(p)
    np.testing.assert_allclose(bh_qvalues(p, method), _old_bh(p, method), rtol=1e-13, atol=0)
    assert (bh_qvalues(p, method)[np.isnan(p)] == 1.0).all()
    # by hand: sorted p 0.01, 0.03, 0.04, 0.20 times m/rank = 0.04, 0.06, 0.0533, 0.20; the running
    # minimum from the top gives q = 0.04, 0.0533, 0.0533, 0.20
    np.testing.assert_allclose(bh_qvalues(np.array([0.01, 0.04, 0.03, 0.20])), [0.04, 0.16 / 3, 0.16 / 3, 0.20])
    assert (bh_qvalues(np.full(3, np.nan)) == 1.0).all()
    with pytest.raises(ValueError, match="'bh' or 'by'"):
        bh_qvalues(np.array([0.1]), "holm")
