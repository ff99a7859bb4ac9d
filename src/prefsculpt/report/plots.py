"""Audit plots for the MLflow UI (matplotlib, Agg backend): each returns a Figure for ``mlflow.log_figure``."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or the device machine

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: -log10 q is capped here so a q of 1e-300 does not squash every other point onto the x axis.
MAX_NEG_LOG10_Q = 50.0


def neg_log10(q: np.ndarray, cap: float = MAX_NEG_LOG10_Q) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = -np.log10(np.clip(q, 1e-300, 1.0))
    return np.minimum(np.nan_to_num(y, nan=0.0), cap)


#: Text kwargs for every string that comes from data (concept labels, metric names): drawn as is.
#: Matplotlib would otherwise read a label with two ``$`` as mathtext (``$\foo$`` raises while the
#: figure is laid out, and the audit's report with it), or hand it to LaTeX under ``text.usetex``.
PLAIN = {"parse_math": False, "usetex": False}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain_text(text: object) -> str:
    """``text`` on one line, control characters shown as ``\\xNN`` (no font has glyphs for them)."""
    flat = " ".join(str(text).split())
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", flat)


def _short(text: str, n: int = 28) -> str:
    text = plain_text(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _volcano_panel(ax, t: pd.DataFrame, x: np.ndarray, q: np.ndarray, sig: np.ndarray, fdr: float,
                   labels: Mapping[str, str], annotate: int, faded: bool = False) -> None:
    y = neg_log10(q)
    alpha = 0.55 if faded else 1.0
    ax.scatter(x[~sig], y[~sig], s=8, c="#a0a7b0", alpha=0.6 * alpha, label="not significant", linewidths=0)
    colors = {"latent": "#2f6fb0", "cluster": "#7b3fb0", "named": "#d9822b", "builtin": "#c23b3b"}
    kinds = t["kind"].to_numpy() if "kind" in t else np.full(len(t), "latent")
    for kind, color in colors.items():
        m = sig & (kinds == kind)
        if m.any():
            ax.scatter(x[m], y[m], s=22, c=color, alpha=alpha, label=f"significant {kind}", linewidths=0)
    ax.axhline(-np.log10(fdr), color="#555", lw=0.8, ls="--")
    ax.text(ax.get_xlim()[0], -np.log10(fdr), f" q = {fdr:g}", va="bottom", fontsize=8, color="#555")
    ax.axvline(0, color="#999", lw=0.6)
    for i in np.flatnonzero(sig)[:annotate]:
        ax.annotate(_short(labels.get(t["concept"].iloc[i], t["concept"].iloc[i])), (x[i], y[i]),
                    fontsize=7, xytext=(4, 2), textcoords="offset points", **PLAIN)
    ax.set_ylabel(f"−log10 q (capped at {MAX_NEG_LOG10_Q:g})", **PLAIN)
    ax.legend(fontsize=8, loc="upper left", frameon=False)


def volcano(
    hyp: pd.DataFrame, fdr: float = 0.05, labels: Mapping[str, str] | None = None, annotate: int = 10
) -> Figure:
    """Effect against -log10 q over every tested concept; significant ones coloured by kind, the
    ``annotate`` best hypotheses named.

    The first panel is the headline, length-controlled: the effect at equal response length
    (``length_effect``; ``d_z`` where length control is undefined, e.g. ``length`` itself) against
    ``q`` and ``significant``. When the table has the raw test (``q_raw``), a second panel beside it
    shows raw ``d_z`` against ``q_raw`` and ``significant_raw``: points high on the right and low on
    the left are concepts that only restate "the preferred answer is longer"."""
    labels = labels or {}
    t = hyp[hyp["tested"].astype(bool)] if "tested" in hyp else hyp
    t = t[np.isfinite(t["d_z"].to_numpy(dtype=float))]
    dz = t["d_z"].to_numpy(dtype=float)
    le = t["length_effect"].to_numpy(dtype=float) if "length_effect" in t else np.full(len(t), np.nan)
    x = np.where(np.isfinite(le), le, dz)
    sig = t["significant"].to_numpy(dtype=bool) if "significant" in t else np.zeros(len(t), bool)
    raw = "q_raw" in t
    fig, axes = plt.subplots(1, 2 if raw else 1, figsize=(14 if raw else 8, 5.5), dpi=110, squeeze=False,
                             sharey=raw)
    ax = axes[0][0]
    _volcano_panel(ax, t, x, t["q"].to_numpy(dtype=float), sig, fdr, labels, annotate)
    ax.set_xlabel("effect d_z at equal length (length-controlled; > 0: preferred responses have more)", **PLAIN)
    ax.set_title(f"Length-controlled: {int(sig.sum())} significant of {len(t)} tested", **PLAIN)
    if raw:
        sig_raw = t["significant_raw"].to_numpy(dtype=bool) if "significant_raw" in t else np.zeros(len(t), bool)
        ax2 = axes[0][1]
        _volcano_panel(ax2, t, dz, t["q_raw"].to_numpy(dtype=float), sig_raw, fdr, labels, 0, faded=True)
        ax2.set_xlabel("raw effect d_z (chosen − rejected, not length-controlled)", **PLAIN)
        ax2.set_title(f"Raw, for comparison: {int(sig_raw.sum())} significant", **PLAIN)
    fig.tight_layout()
    return fig


def top_effects(hyp: pd.DataFrame, k: int = 20, labels: Mapping[str, str] | None = None) -> Figure:
    """The ``k`` first hypotheses' mean difference with its 95% CI, one bar each (best on top)."""
    labels = labels or {}
    top = hyp.head(k).iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.34 * len(top) + 1.2)), dpi=110)
    if len(top):
        # Each concept lives on its own scale (activation max, token count): show d_z, with the
        # mean-difference CI rescaled to it (CI / sd = CI_dz, same t interval).
        dz = top["d_z"].to_numpy(dtype=float)
        mean = top["mean_diff"].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(mean != 0, dz / mean, 0.0)
        lo = top["ci_low"].to_numpy(dtype=float) * scale
        hi = top["ci_high"].to_numpy(dtype=float) * scale
        err = np.nan_to_num(np.vstack([dz - np.minimum(lo, hi), np.maximum(lo, hi) - dz]), nan=0.0)
        colors = ["#1a7f37" if v > 0 else "#b42318" for v in dz]
        pos = np.arange(len(top))
        ax.barh(pos, dz, xerr=np.clip(err, 0, None), color=colors, alpha=0.85, capsize=2)
        names = [f"{_short(labels.get(c, ''), 24)}  [{plain_text(c)}]" for c in top["concept"]]
        ax.set_yticks(pos, names, fontsize=7.5, **PLAIN)
    ax.axvline(0, color="#555", lw=0.8)
    ax.set_xlabel("effect d_z with 95% CI (green: preferred responses have more)", **PLAIN)
    ax.set_title(f"Top {len(top)} hypotheses", **PLAIN)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
