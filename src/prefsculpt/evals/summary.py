"""Per-item tables -> metrics with CIs (policy, base, paired policy − base), and the plots.

A metric ``k`` comes as ``k`` (the policy), ``k_base`` and ``k_diff`` (paired over the items both
answered), each with ``_lo`` / ``_hi`` bootstrap bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # headless: figures are logged, never shown
import matplotlib.pyplot as plt  # noqa: E402

from prefsculpt.evals.stats import Estimate, bootstrap_ci, paired_bootstrap
from prefsculpt.report.plots import PLAIN, plain_text  # metric names may hold data text ($, \\)


@dataclass(frozen=True)
class Row:
    metric: str
    policy: Estimate
    base: Estimate | None = None
    diff: Estimate | None = None

    def metrics(self) -> dict[str, float]:
        m = self.policy.as_metrics(self.metric)
        if self.base is not None:
            m.update(self.base.as_metrics(f"{self.metric}_base"))
        if self.diff is not None:
            m.update(self.diff.as_metrics(f"{self.metric}_diff"))
        return {k: v for k, v in m.items() if np.isfinite(v)}

    def record(self) -> dict[str, float | str | None]:
        r: dict[str, float | str | None] = {"metric": self.metric, "n": self.policy.n}
        for name, e in (("policy", self.policy), ("base", self.base), ("diff", self.diff)):
            r.update({name: e.mean if e else None, f"{name}_lo": e.low if e else None, f"{name}_hi": e.high if e else None})
        return r


def summarise(pol: pd.DataFrame, base: pd.DataFrame | None, specs: Sequence[tuple[str, str]], n_boot: int,
              ci: float, seed: int) -> list[Row]:
    """One Row per (metric name, column) from per-item tables keyed by ``id``."""
    rows = []
    for metric, col in specs:
        if col not in pol.columns or len(pol) == 0:
            continue
        p = bootstrap_ci(pol[col].to_numpy(float), n_boot, ci, seed)
        b = d = None
        if base is not None and col in base.columns:
            b = bootstrap_ci(base[col].to_numpy(float), n_boot, ci, seed)
            j = pol[["id", col]].merge(base[["id", col]], on="id", suffixes=("", "_b"))
            if len(j):
                d = paired_bootstrap(j[col].to_numpy(float), j[f"{col}_b"].to_numpy(float), n_boot, ci, seed)
        rows.append(Row(metric, p, b, d))
    return rows


def plot_rows(rows: Sequence[Row], title: str):
    """Policy vs base bars with CI whiskers, one pair per metric (metrics on their own scales, so
    each gets its own small axis)."""
    rows = [r for r in rows if r.base is not None]
    n = max(len(rows), 1)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.ravel()[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.ravel(), rows, strict=False):
        ests = [r.base, r.policy]
        means = [e.mean for e in ests]
        err = np.array([[e.mean - e.low for e in ests], [e.high - e.mean for e in ests]])
        ax.bar(["base", "policy"], means, yerr=err, capsize=4, color=["#9aa5b1", "#3b7dd8"])
        sub = f"Δ {r.diff.mean:+.3f} [{r.diff.low:+.3f}, {r.diff.high:+.3f}]" if r.diff else ""
        ax.set_title(f"{plain_text(r.metric)}\n{sub}", fontsize=8, **PLAIN)
        ax.tick_params(labelsize=8)
    fig.suptitle(plain_text(title), fontsize=10, **PLAIN)
    fig.tight_layout()
    return fig
