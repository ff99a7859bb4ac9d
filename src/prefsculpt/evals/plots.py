"""The evaluation's figures for the MLflow UI: sycophancy by kind with CIs, and the audit's predicted
concept effect against the shift training actually produced."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from prefsculpt.evals.summary import Row


def _plt():

    matplotlib.use("Agg")

    return plt


def _err(e) -> list[float]:
    return [max(e.mean - e.low, 0.0), max(e.high - e.mean, 0.0)]  # a percentile CI may miss the mean


def sycophancy_forest(rows: Sequence[Row], title: str = "sycophancy by kind (95% CI)"):
    """One line per sycophancy metric (``syc/<kind>/<file>/<stat>``): left, policy and base with
    their CIs; right, the paired policy − base difference with its CI against 0 (right of 0 = more
    sycophantic). Rows without a base show the policy only. None when there is no sycophancy row."""
    rows = [r for r in rows if r.metric.startswith("syc/")]
    if not rows:
        return None
    plt = _plt()
    n = len(rows)
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(10, 0.45 * n + 1.6), sharey=True,
                                  gridspec_kw={"width_ratios": [1.2, 1]})
    y = np.arange(n)[::-1]
    labels = [r.metric.removeprefix("syc/") for r in rows]
    for yi, r in zip(y, rows, strict=True):
        if r.base is not None:
            ax.errorbar(r.base.mean, yi - 0.15, xerr=np.array([_err(r.base)]).T, fmt="o", c="#9aa5b1", capsize=3,
                        label="base" if yi == y[0] else None)
        ax.errorbar(r.policy.mean, yi + 0.15, xerr=np.array([_err(r.policy)]).T, fmt="o", c="#3b7dd8", capsize=3,
                    label="policy" if yi == y[0] else None)
        if r.diff is not None:
            worse = r.diff.low > 0
            axd.errorbar(r.diff.mean, yi, xerr=np.array([_err(r.diff)]).T, fmt="s", capsize=3,
                         c="#d8603b" if worse else "#3b7dd8" if r.diff.high < 0 else "#555555")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("value")
    ax.legend(fontsize=8, loc="lower right")
    axd.axvline(0, c="k", lw=0.8)
    axd.set_xlabel("policy − base (paired)")
    axd.set_title("red: CI above 0, blue: below", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


_GROUPS = (("shaped", "#d8603b", "o", "shaped hypotheses"), ("unshaped", "#3b7dd8", "o", "unshaped hypotheses"),
           ("hypothesis", "#3b7dd8", "o", "audit hypotheses"), ("control", "#9aa5b1", "x", "random controls"))


def shift_scatter(table: pd.DataFrame, metrics: dict[str, float] | None = None, n_labels: int = 8):
    """Predicted effect (the audit's ``d_z``) against the measured shift (``shift_z``) per concept,
    coloured by group: hypotheses the policy's training shaped, those it did not (or all hypotheses
    as one group when that is not known), and the random controls (grey, the reference); the
    strongest predictions labelled, the title gives each group's ρ, R² and n (controls never enter a
    correlation). ``table``: the concept-shift table (concept, control, predicted, shift_z[, group])."""
    need = {"concept", "control", "predicted", "shift_z"}
    if table is None or len(table) == 0 or not need <= set(table.columns):
        return None
    plt = _plt()
    m = metrics or {}
    group = table["group"] if "group" in table else np.where(table["control"].astype(bool), "control", "hypothesis")
    fig, ax = plt.subplots(figsize=(6.4, 5))
    for g, colour, marker, label in _GROUPS:
        sel = table[np.asarray(group) == g]
        if len(sel):
            ax.scatter(sel["predicted"], sel["shift_z"], c=colour, marker=marker, label=f"{label} ({len(sel)})")
    hyp = table[~table["control"].astype(bool)]
    for r in hyp.reindex(hyp["predicted"].abs().sort_values(ascending=False).index).head(n_labels).itertuples():
        ax.annotate(str(r.concept)[:24], (r.predicted, r.shift_z), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(0, c="k", lw=0.6)
    ax.axvline(0, c="k", lw=0.6)
    ax.set_xlabel("predicted effect (audit d_z: chosen − rejected)")
    ax.set_ylabel("observed shift_z (policy − base rollouts)")

    def fmt(k: str) -> str:
        v = m.get(f"shift/{k}", m.get(k))
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.2f}"

    def n(k: str) -> str:
        v = m.get(f"shift/{k}_n", m.get(f"{k}_n"))
        return "?" if v is None or not np.isfinite(v) else str(int(v))

    groups = [g for g in ("shaped", "unshaped") if f"shift/{g}_n" in m or f"{g}_n" in m] or ["hyp"]
    lines = [f"{'hypotheses' if g == 'hyp' else g}: ρ {fmt(g + '_spearman')}, R² {fmt(g + '_r2')}, n {n(g)}"
             for g in groups]
    lines.append(f"mean |shift_z|: hypotheses {fmt('hyp_abs_shift_z')}, controls {fmt('control_abs_shift_z')}")
    ax.set_title("concept shift\n" + "\n".join(lines), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
