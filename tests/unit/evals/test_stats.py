import numpy as np
import pytest

from prefsculpt.evals.stats import bootstrap_ci, paired_bootstrap


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        x = rng.binomial(1, 0.3, size=80).astype(float)  # true rate 0.3
        e = bootstrap_ci(x, n_boot=400, seed=trial)
        covered += e.low <= 0.3 <= e.high
        assert e.low <= e.mean <= e.high
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_bootstrap_finds_a_small_shift_that_unpaired_cis_miss():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, size=100)  # large item-to-item spread
    policy = base + 0.03 + rng.normal(0, 0.01, size=100)  # a small, consistent rise
    d = paired_bootstrap(policy, base, n_boot=1000)
    assert d.excludes_zero() and d.mean == pytest.approx(0.03, abs=0.005)
    a, b = bootstrap_ci(policy), bootstrap_ci(base)
    assert a.low < b.high  # the separate CIs overlap: only the paired test sees it
    null = paired_bootstrap(base + rng.normal(0, 0.01, size=100), base)
    assert not null.excludes_zero()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    assert bootstrap_ci(np.array([])).n == 0
