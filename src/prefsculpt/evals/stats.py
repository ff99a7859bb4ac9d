"""Bootstrap confidence intervals (percentile method) over evaluation items.

Every evaluation reports a per-item value (a probability share, a 0/1 correctness, a count); its
summary is the mean over items with a bootstrap CI. "Policy rises over the base" is the *paired*
difference: both models answer the same items, so items are resampled jointly and the CI is on the
mean of per-item differences (much tighter than two independent CIs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap CI over ``n`` items."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """``prefix`` -> mean, ``prefix_lo`` / ``prefix_hi`` -> the CI (flat, for ``mlflow.log_metrics``)."""
        return {prefix: self.mean, f"{prefix}_lo": self.low, f"{prefix}_hi": self.high}


def _finite(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x))[:5].tolist()
        raise ValueError(f"{what}: non-finite per-item values at items {bad}")
    return x


def bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means of ``x`` (n,) resampled with replacement; one (n_boot, n) index draw."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))  # (n_boot, n)
    return x[idx].mean(axis=1)


def bootstrap_ci(x: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-item values ``x`` (n,) with a percentile bootstrap CI. n = 0 gives NaNs."""
    x = _finite(x, "bootstrap_ci")
    if len(x) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if len(x) == 1 or n_boot <= 0:
        return Estimate(float(x.mean()), float(x.mean()), float(x.mean()), len(x))
    means = bootstrap_means(x, n_boot, seed)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(float(x.mean()), float(lo), float(hi), len(x))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over paired items (same item, two models), resampling items jointly."""
    a, b = _finite(a, "paired_bootstrap a"), _finite(b, "paired_bootstrap b")
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs equal lengths, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, n_boot, ci, seed)
