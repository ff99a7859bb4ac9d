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


def volcano(
    hyp: pd.DataFrame, fdr: float = 0.05, labels: Mapping[str, str] | None = None, annotate: int = 10
) -> Figure:
    """Effect (d_z) against -log10 q over every tested concept; significant ones coloured by kind,
    the ``annotate`` best hypotheses named."""
    labels = labels or {}
    t = hyp[hyp["tested"]] if "tested" in hyp else hyp
    t = t[np.isfinite(t["d_z"].to_numpy(dtype=float))]
    y = neg_log10(t["q"].to_numpy())
    x = t["d_z"].to_numpy(dtype=float)
    sig = t["significant"].to_numpy(dtype=bool) if "significant" in t else np.zeros(len(t), bool)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    ax.scatter(x[~sig], y[~sig], s=8, c="#a0a7b0", alpha=0.6, label="not significant", linewidths=0)
    colors = {"latent": "#2f6fb0", "cluster": "#7b3fb0", "named": "#d9822b", "builtin": "#c23b3b"}
    kinds = t["kind"].to_numpy() if "kind" in t else np.full(len(t), "latent")
    for kind, color in colors.items():
        m = sig & (kinds == kind)
        if m.any():
            ax.scatter(x[m], y[m], s=22, c=color, label=f"significant {kind}", linewidths=0)
    ax.axhline(-np.log10(fdr), color="#555", lw=0.8, ls="--")
    ax.text(ax.get_xlim()[0], -np.log10(fdr), f" q = {fdr:g}", va="bottom", fontsize=8, color="#555")
    ax.axvline(0, color="#999", lw=0.6)
    top = t[sig].head(annotate)
    for _, r in top.iterrows():
        ax.annotate(_short(labels.get(r["concept"], r["concept"])), (r["d_z"], neg_log10(np.array([r["q"]]))[0]),
                    fontsize=7, xytext=(4, 2), textcoords="offset points", **PLAIN)
    ax.set_xlabel("effect d_z (chosen − rejected; > 0: preferred responses have more)", **PLAIN)
    ax.set_ylabel(f"−log10 q (capped at {MAX_NEG_LOG10_Q:g})", **PLAIN)
    ax.set_title(f"Concept hypotheses: {int(sig.sum())} significant of {len(t)} tested", **PLAIN)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
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
