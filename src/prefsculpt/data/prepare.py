"""The prepared artifact's pure parts: split files and per-tag statistics (no MLflow here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.splits import SPLITS


def tag_stats(pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Per ground-truth tag: mean on chosen, on rejected, and share of pairs with chosen > rejected."""
    keys = sorted({k for p in pairs for k in (*p.chosen_tags, *p.rejected_tags)})
    out: dict[str, float] = {}
    for k in keys:
        c = np.array([float(p.chosen_tags.get(k, 0.0)) for p in pairs])
        r = np.array([float(p.rejected_tags.get(k, 0.0)) for p in pairs])
        out[f"tag_{k}_chosen_mean"] = float(c.mean())
        out[f"tag_{k}_rejected_mean"] = float(r.mean())
        out[f"tag_{k}_chosen_gt_rejected"] = float((c > r).mean())
    return out


def write_split(pairs: Sequence[PreferencePair], path: Path) -> None:
    pd.DataFrame([p.to_record() for p in pairs]).to_parquet(path, index=False)


def read_split(path: str | Path) -> list[PreferencePair]:
    """Inverse of :func:`write_split`."""
    df = pd.read_parquet(path)
    return [PreferencePair.from_record(r) for r in df.to_dict(orient="records")]


__all__ = ["SPLITS", "read_split", "tag_stats", "write_split"]
