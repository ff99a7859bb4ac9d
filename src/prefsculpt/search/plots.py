"""Parallel coordinates of a study's trials: each trial a line through its shaping parameters
(``shape/…``, ``method/…``, ``lambda/…``, ``share/…``) into its two objectives, coloured by
off-target, the Pareto front drawn bold and plain DPO dashed. Matplotlib only (no network)."""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

OBJECTIVES = (("off_target", "off-target ↓"), ("on_target", "on-target ↑"))
#: Where a parameter the trial did not sample (a concept it left unshaped) is drawn, below the axis.
MISSING_Y = -0.12


def trial_frame(study: Any, df: pd.DataFrame) -> pd.DataFrame:
    """Complete trials: ``trial``, ``baseline``, ``pareto``, the objectives and one column per param."""
    done = df[df["state"] == "COMPLETE"].set_index("trial")
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.number in done.index:
            r = done.loc[t.number]
            rows.append({"trial": t.number, "baseline": bool(r["baseline"]), "pareto": bool(r["pareto"]),
                         "off_target": float(r["off_target"]), "on_target": float(r["on_target"]),
                         **{f"p:{k}": v for k, v in t.params.items()}})
    return pd.DataFrame(rows)


def _axis(values: pd.Series) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Values -> positions in [0, 1] (missing at MISSING_Y) and the axis' tick labels."""
    present = values.dropna()
    if len(present) and all(isinstance(v, (bool, str, np.bool_)) for v in present):
        cats = sorted({str(v) for v in present})
        pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
        y = np.array([pos[str(v)] if v is not None and not (isinstance(v, float) and math.isnan(v)) else MISSING_Y
                      for v in values])
        return y, [(p, c) for c, p in pos.items()]
    x = pd.to_numeric(values, errors="coerce").to_numpy(float)
    lo, hi = (np.nanmin(x), np.nanmax(x)) if np.isfinite(x).any() else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    y = np.where(np.isfinite(x), (x - lo) / span if hi > lo else 0.5, MISSING_Y)
    return y, [(0.0 if hi > lo else 0.5, f"{lo:.3g}"), (1.0, f"{hi:.3g}")] if hi > lo else [(0.5, f"{lo:.3g}")]


def parallel_figure(frame: pd.DataFrame):
    """The figure for :func:`trial_frame`'s output; None when no trial finished."""
    if frame.empty:
        return None

    matplotlib.use("Agg")

    params = sorted(c for c in frame.columns if c.startswith("p:"))
    cols = [*params, *(k for k, _ in OBJECTIVES)]
    names = [c[2:] for c in params] + [label for _, label in OBJECTIVES]
    axes = [_axis(frame[c]) for c in cols]
    ys = np.stack([a[0] for a in axes], axis=1)  # (trials, axes)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cols) + 1.5), 4.8))
    off = frame["off_target"].to_numpy(float)
    norm = plt.Normalize(np.nanmin(off), np.nanmax(off) if np.nanmax(off) > np.nanmin(off) else np.nanmin(off) + 1)
    cmap = plt.get_cmap("viridis_r")
    x = np.arange(len(cols))
    for i, r in enumerate(frame.itertuples(index=False)):
        ax.plot(x, ys[i], c=cmap(norm(off[i])), lw=2.6 if r.pareto else 1.0, ls="--" if r.baseline else "-",
                alpha=0.95 if r.pareto else 0.6)
        ax.annotate(str(r.trial), (x[-1], ys[i, -1]), fontsize=7, xytext=(4, 0), textcoords="offset points")
    for xi, (_, ticks) in zip(x, axes, strict=True):
        ax.axvline(xi, c="#444444", lw=0.8)
        for y, label in ticks:
            ax.annotate(label, (xi, y), fontsize=7, xytext=(-3, 0), textcoords="offset points", ha="right",
                        va="center")
    if (ys == MISSING_Y).any():
        ax.axhline(MISSING_Y, c="#bbbbbb", lw=0.6, ls=":")
        ax.annotate("not sampled", (x[0], MISSING_Y), fontsize=7, xytext=(-3, -9), textcoords="offset points",
                    ha="right")
    ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(MISSING_Y - 0.08, 1.08)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="off-target (lower is better)")
    ax.set_title(f"{len(frame)} complete trials: params → objectives (bold: Pareto front, dashed: plain DPO)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def log_parallel(study: Any, df: pd.DataFrame) -> bool:
    """Log ``search/parallel_coordinates.png`` on the active run; False when no trial finished."""

    fig = parallel_figure(trial_frame(study, df))
    if fig is None:
        return False
    mlflow.log_figure(fig, "search/parallel_coordinates.png")
    plt.close(fig)
    return True
