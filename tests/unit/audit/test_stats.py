import numpy as np
import pytest
from scipy import stats as sps

from prefsculpt.audit.stats import (
    bh_qvalues,
    calibrate,
    half_assignment,
    length_controlled,
    paired_effects,
    paired_pvalues,
    rank_effect,
    replicates,
    split_half_effects,
    test_concepts,
)
from prefsculpt.concepts.scores import ConceptScores


def _scores(c, r, len_c=None, len_r=None, names=None):
    n, f = c.shape
    vals = {("chosen", "max"): c.astype(np.float32), ("rejected", "max"): r.astype(np.float32),
            ("prompt", "max"): np.zeros((n, f), np.float32)}
    nt = {"chosen": np.full(n, 50) if len_c is None else len_c, "rejected": np.full(n, 50) if len_r is None else len_r,
          "prompt": np.full(n, 20)}
    return ConceptScores([f"p{i}" for i in range(n)], vals, nt, names or [f"latent:{j}" for j in range(f)])


def _sparse_pairs(rng, n, f, n_factors=25):
    """Sparse latents that co-fire through shared factors; chosen and rejected share the prompt's factors."""
    zp = rng.normal(size=(n, n_factors))
    fac = rng.integers(n_factors, size=f)
    thr = rng.uniform(1.0, 3.0, size=f)  # firing rates from ~0.2% to ~25%

    def side():
        z = 0.7 * zp + 0.7 * rng.normal(size=(n, n_factors))
        return np.maximum(z[:, fac] + 0.6 * rng.normal(size=(n, f)) - thr, 0.0)

    return side(), side()


def _keys(n):
    return [f"prompt-{i // 2}" for i in range(n)]  # two pairs per prompt, like real data


def test_pvalues_match_scipy():
    rng = np.random.default_rng(1)
    n, f = 150, 60
    c = np.where(rng.random((n, f)) < 0.3, rng.exponential(size=(n, f)), 0.0)
    r = np.where(rng.random((n, f)) < 0.3, rng.exponential(size=(n, f)), 0.0)
    c[:, :20], r[:, :20] = np.round(c[:, :20] * 2) / 2, np.round(r[:, :20] * 2) / 2  # heavy ties
    c[:, 30] += 0.8  # a real effect, so small p-values are compared too
    d = c - r
    ref = sps.wilcoxon(d, axis=0, zero_method="wilcox", correction=True, method="asymptotic").pvalue
    np.testing.assert_allclose(paired_pvalues(d, "wilcoxon"), ref, rtol=1e-9, atol=1e-12)
    ref_sign = [sps.binomtest(int((d[:, j] > 0).sum()), int((d[:, j] != 0).sum())).pvalue for j in range(f)]
    np.testing.assert_allclose(paired_pvalues(d, "sign"), ref_sign, rtol=1e-9)
    # a column with no difference at all cannot be tested
    assert np.isnan(paired_pvalues(np.zeros((10, 2)))).all()
    with pytest.raises(ValueError, match="wilcoxon"):
        paired_pvalues(d, "ttest")


def test_bh_matches_scipy_and_ignores_nan():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-4, size=20)])
    np.testing.assert_allclose(bh_qvalues(p), sps.false_discovery_control(p), rtol=1e-12)
    np.testing.assert_allclose(bh_qvalues(p, "by"), sps.false_discovery_control(p, method="by"), rtol=1e-12)
    pn = np.concatenate([p, [np.nan] * 50])
    q = bh_qvalues(pn)
    assert (q[-50:] == 1).all()  # untested: q = 1 and not in m (else the first 220 would change)
    np.testing.assert_allclose(q[:220], sps.false_discovery_control(p))
    order = np.argsort(p)
    assert (np.diff(q[order]) >= 0).all() and q.max() <= 1


def test_effects():
    d = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, -1.0], [3.0, 0.0]])
    e = paired_effects(d)
    np.testing.assert_allclose(e["mean"], [1.5, -0.25])
    np.testing.assert_allclose(e["d_z"], [1.5 / np.std(d[:, 0], ddof=1), -0.5])
    np.testing.assert_allclose(e["share_chosen_more"], [0.75, 0.0])
    np.testing.assert_allclose(e["share_rejected_more"], [0.0, 0.25])
    ci = sps.ttest_1samp(d[:, 0], 0).confidence_interval(0.95)
    np.testing.assert_allclose([e["ci_low"][0], e["ci_high"][0]], [ci.low, ci.high])


def test_planted_effect_detected_and_nulls_not():
    rng = np.random.default_rng(3)
    c, r = _sparse_pairs(rng, 800, 300)
    c[:, 7] += np.where(rng.random(800) < 0.4, 0.5, 0.0)  # chosen has more of latent 7 in 40% of pairs
    r[:, 11] += np.where(rng.random(800) < 0.4, 0.5, 0.0)  # rejected has more of latent 11
    df = test_concepts(_scores(c, r), _keys(800), extra={})
    sig = df[df["significant"]]
    assert set(sig["index"]) == {7, 11}
    row7 = df.set_index("index").loc[7]
    assert row7["direction"] == 1 and row7["replicated"] and row7["rank_effect"] > 0 and row7["q"] < 1e-6
    assert df.set_index("index").loc[11, "direction"] == -1
    assert list(df["index"][:2]) != [] and set(df["index"][:2]) == {7, 11}  # significant rows lead


def test_support_filter_keeps_rare_concepts_out_of_bh():
    rng = np.random.default_rng(4)
    n = 400
    c, r = rng.exponential(size=(n, 5)), rng.exponential(size=(n, 5))
    c[:, 0] += 0.5
    c[:, 4], r[:, 4] = 0.0, 0.0
    c[:2, 4] = 5.0  # fires in 0.5% of pairs: below min_support
    df = test_concepts(_scores(c, r), _keys(n), min_support=0.01, extra={}).set_index("index")
    assert not df.loc[4, "tested"] and np.isnan(df.loc[4, "p"]) and np.isnan(df.loc[4, "q"])
    tested = df[df["tested"]]
    np.testing.assert_allclose(tested["q_raw"], bh_qvalues(tested["p"].to_numpy()))  # m = 4, not 5
    np.testing.assert_allclose(tested["q"], bh_qvalues(tested["length_p"].to_numpy()))  # the headline: controlled
    assert np.isnan(df.loc[4, "q_raw"])


def test_length_control_separates_length_from_content():
    rng = np.random.default_rng(5)
    n = 600
    length = rng.normal(8.0, 10.0, size=n).round()  # token counts: chosen tends to be longer
    base = rng.normal(size=(n, 3))
    c = base.copy()
    c[:, 0] += 0.05 * length + rng.normal(size=n)  # purely length-driven
    c[:, 1] += 0.3 + rng.normal(size=n)  # content, unrelated to length
    c[:, 2] += rng.normal(size=n)  # null
    sc = _scores(c, base, len_c=100 + length, len_r=np.full(n, 100), names=["named:a", "named:b", "named:c"])
    df = test_concepts(sc, _keys(n)).set_index("concept")
    assert df.loc["named:a", "p"] < 1e-6 and df.loc["named:a", "length_p"] > 0.01
    # raw d_z ~0.36; controlled effect ~0 (its standard error is ~0.05 here)
    assert df.loc["named:a", "d_z"] > 0.3 and abs(df.loc["named:a", "length_effect"]) < 0.16
    assert df.loc["named:b", "length_p"] < 1e-6 and df.loc["named:b", "length_effect"] > 0.2
    assert df.loc["length", "kind"] == "builtin" and df.loc["length", "significant"]  # the built-in itself
    # the function alone: slope removed, intercept kept
    d = np.stack([0.5 * length + rng.normal(size=n), 1.0 + rng.normal(size=n)], axis=1)
    eff, p = length_controlled(d, length)
    assert p[0] > 0.01 and p[1] < 1e-10 and 0.8 < eff[1] < 1.2


def test_split_half_flip_is_not_replicated():
    rng = np.random.default_rng(6)
    n = 800
    keys = _keys(n)
    half = half_assignment(keys)
    c, r = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    c[:, 0] += np.where(half, 0.8, -0.3)  # strong in one half, reversed in the other: overall positive
    c[:, 1] += 0.4
    df = test_concepts(_scores(c, r, names=["named:flip", "named:steady"]), keys, extra={}).set_index("concept")
    assert df.loc["named:flip", "q"] < 0.05 and not df.loc["named:flip", "replicated"]
    assert not df.loc["named:flip", "significant"] and df.loc["named:flip", "rank_effect"] == 0
    assert df.loc["named:steady", "significant"]
    a, b = split_half_effects(c - r, half)
    assert a[0] > 0 > b[0]
    assert list(replicates(np.array([1.0, 1, -1, 0]), np.array([2.0, -1, -3, 1]))) == [True, False, True, False]
    np.testing.assert_allclose(rank_effect(np.array([0.5, -0.4]), np.array([0.2, -0.9])), [0.2, -0.4])


def test_half_assignment_is_stable_and_balanced():
    keys = [f"k{i}" for i in range(4000)]
    h = half_assignment(keys)
    assert 0.47 < h.mean() < 0.53
    assert (half_assignment(list(reversed(keys)))[::-1] == h).all()
    assert (half_assignment(["k1", "k1"]) == h[1]).all()
    assert 0.4 < (half_assignment(keys, salt="x") == h).mean() < 0.6


def test_pvalues_uniform_under_null():
    rng = np.random.default_rng(7)
    n, f = 400, 1500
    c = np.where(rng.random((n, f)) < 0.3, rng.exponential(size=(n, f)), 0.0)
    r = np.where(rng.random((n, f)) < 0.3, rng.exponential(size=(n, f)), 0.0)
    for test in ("wilcoxon", "sign"):
        p = paired_pvalues(c - r, test)
        if test == "wilcoxon":  # continuous statistic: close to uniform
            assert sps.kstest(p, "uniform").statistic < 0.04
        for alpha in (0.01, 0.05, 0.1):  # never anti-conservative beyond noise (sd ~0.006 at 0.05)
            assert (p <= alpha).mean() <= alpha + 0.015


def test_calibration_under_swap_null():
    """The issue's must-show: over 20 null seeds at most 2 report any hypothesis with q < 0.05."""
    rng = np.random.default_rng(8)
    n, f = 1200, 2000
    c, r = _sparse_pairs(rng, n, f)
    c[:, :10] += np.where(rng.random((n, 10)) < 0.3, 0.5, 0.0)  # real effects the null must erase
    sc, keys = _scores(c, r), _keys(n)
    real = test_concepts(sc, keys)
    assert real["significant"].sum() >= 10  # the unswapped data has discoveries: the check is not vacuous
    cal = calibrate(sc, keys, n_seeds=20, fdr=0.05)
    assert list(cal["seed"]) == list(range(20))
    assert (cal["n_q_below_fdr"] > 0).sum() <= 2, cal
    assert (cal["n_significant"] <= cal["n_q_below_fdr"]).all()


def test_bad_input_is_named():
    c = np.ones((4, 2))
    r = np.zeros((4, 2))
    sc = _scores(c, r)
    with pytest.raises(ValueError, match="prompt_keys has 3 entries"):
        test_concepts(sc, ["a", "b", "c"])
    sc.values[("chosen", "max")][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"'latent:1'.*'p2'"):
        test_concepts(sc, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="'freq' not in the concept scores"):
        test_concepts(sc, ["a", "b", "c", "d"], stat="freq")
    with pytest.raises(ValueError, match="'length' has shape"):
        test_concepts(_scores(c, r), ["a", "b", "c", "d"], extra={"length": np.ones(3)})


def test_normal_approximation_is_conservative_in_the_tail():
    """Where BH decides (small p) the approximate p is never below the exact one, even at tiny counts."""
    rng = np.random.default_rng(9)
    for c in (10, 20, 40):
        d = rng.exponential(size=(c, 2000)) * rng.choice([-1, 1], size=(c, 2000), p=[0.2, 0.8])
        exact = sps.wilcoxon(d, axis=0, method="exact").pvalue
        tail = exact < 0.01
        assert tail.sum() > 50
        assert (paired_pvalues(d)[tail] >= exact[tail]).all()


def test_length_itself_has_no_length_controlled_effect_and_ranks_by_its_own_effect():
    import numpy as np

    from prefsculpt.audit.stats import length_controlled

    rng = np.random.default_rng(0)
    length = rng.normal(13.0, 18.0, size=1200).round()  # token-length differences, like real data
    eff, p = length_controlled(length[:, None], length)
    assert np.isnan(eff[0]) and np.isnan(p[0])


def _length_world(seed=13, n=800):
    """Chosen responses longer on average; latent 0 is pure length (fires more the longer the response),
    latent 1 is a real concept unrelated to length, latent 2 a weaker length carrier, 3 null."""
    rng = np.random.default_rng(seed)
    len_r = rng.integers(40, 200, size=n).astype(float)
    len_c = len_r + rng.normal(30.0, 40.0, size=n).round()
    base_c, base_r = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    c, r = base_c.copy(), base_r.copy()
    c[:, 0] += 0.03 * len_c
    r[:, 0] += 0.03 * len_r
    c[:, 1] += 0.4
    c[:, 2] += 0.01 * len_c
    r[:, 2] += 0.01 * len_r
    return _scores(c, r, len_c=len_c, len_r=len_r, names=["named:len", "named:real", "named:weak", "named:null"]), n


def test_q_rests_on_the_length_controlled_test_raw_q_beside_it():
    sc, n = _length_world()
    df = test_concepts(sc, _keys(n)).set_index("concept")
    # pure length: significant on the raw test, not once length is controlled
    assert df.loc["named:len", "significant_raw"] and df.loc["named:len", "q_raw"] < 1e-10
    assert not df.loc["named:len", "significant"] and df.loc["named:len", "q"] > 0.05
    # a real concept: significant both ways
    assert df.loc["named:real", "significant"] and df.loc["named:real", "significant_raw"]
    assert df.loc["named:real", "q"] < 1e-6
    # length itself has no length control: its q is the raw test's
    assert df.loc["length", "significant"] and df.loc["length", "q"] == df.loc["length", "q_raw"]
    assert not df.loc["named:null", "significant"]
    # the headline count is the controlled one
    assert df["significant"].sum() < df["significant_raw"].sum()


def test_length_carried_is_the_share_of_the_length_gap():
    from prefsculpt.audit.stats import length_carried

    sc, n = _length_world()
    row = test_concepts(sc, _keys(n)).set_index("concept").loc["named:len"]
    assert 0.3 < row["length_share"] <= 1.0 and row["length_r2"] > 0.3  # attenuated by the concept's own noise
    # a concept that is length (or a multiple of it) explains all of the gap, an unrelated one none
    rng = np.random.default_rng(0)
    ld = rng.normal(20.0, 30.0, size=2000)
    share, r2 = length_carried(np.stack([ld, 2 * ld, rng.normal(size=2000)], axis=1), ld)
    np.testing.assert_allclose(share[:2], 1.0)
    np.testing.assert_allclose(r2[:2], 1.0)
    assert abs(share[2]) < 0.05 and r2[2] < 0.01
    assert np.isnan(length_carried(np.ones((10, 1)), ld[:10])[0]).all()  # a constant concept explains nothing
