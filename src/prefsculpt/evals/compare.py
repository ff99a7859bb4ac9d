"""The final figures: the picked (shaped) policy against the plain-DPO baseline, on the same test items.

After the search, both policies are evaluated once on ``test`` (``eval.split=test``). Their per-item
tables (as :func:`prefsculpt.evals.runner.summarise_eval` returns them) are compared here, paired
over the *same* items: every test item is answered by both, so the CI of shaped − plain resamples
items jointly (:func:`prefsculpt.evals.stats.paired_bootstrap`), much tighter than two independent
CIs. Two tables of one metric that do not hold the same item ids are an error, never a silent
intersection.

Objective-level figures (``test/…``, each a mean with its CI over items):

- ``on_target`` / ``on_target_plain`` / ``on_target_diff``: the on-target metric (per item, e.g.
  ``implicit_correct`` of each held-out pair) of the shaped policy, of plain DPO, and paired shaped − plain;
- ``syc_increase`` / ``syc_increase_plain`` / ``syc_increase_diff``: the sycophancy increase over the
  base (per item policy − base, averaged over the sycophancy metrics present), and shaped − plain;
- ``syc_vs_ratio``: shaped increase − ``ratio`` × plain increase per item: the promotion gate
  "at most ``ratio`` × plain DPO's increase" holds when it is <= 0.
Several sycophancy sets are averaged with their bootstrap means drawn per set (the sets are
independent), so the CI covers the mean of means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from prefsculpt.evals.runner import _specs
from prefsculpt.evals.stats import Estimate, bootstrap_means
from prefsculpt.evals.summary import Row, summarise

#: eval name -> table name -> per-item table (policy tables; ``<table>_base`` the base's).
Tables = Mapping[str, Mapping[str, pd.DataFrame]]


class ItemMismatch(ValueError):
    """The two policies' tables of one metric hold different items: no paired comparison."""


def metric_columns(tables: Tables) -> dict[str, tuple[str, str, str]]:
    """Metric name -> (eval, table, column) of the policy tables (``_base`` tables and the
    in-domain style subset left out)."""
    out: dict[str, tuple[str, str, str]] = {}
    for ev, tabs in tables.items():
        for t, df in tabs.items():
            if t.endswith("_base") or "id" not in df:
                continue
            specs = list(_specs(t, df)) + ([("cap/pref/implicit_acc", "implicit_correct")] if t == "preference" else [])
            specs += [("cap/kl/mean_token", "kl_mean"), ("cap/kl/sum", "kl_sum")] if t == "kl" else []
            for metric, col in specs:
                if col in df.columns:
                    out[metric] = (ev, t, col)
    return out


def same_items(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    ia, ib = set(map(str, a["id"])), set(map(str, b["id"]))
    if ia != ib or len(a) != len(b):
        raise ItemMismatch(f"{what}: the shaped and the plain policy were not scored on the same test items "
                           f"({len(ia - ib)} only in shaped, {len(ib - ia)} only in plain); evaluate both with "
                           "the same eval config and prepared data")


def paired_rows(shaped: Tables, plain: Tables, n_boot: int, ci: float, seed: int) -> list[Row]:
    """Per metric both policies measured: Row(metric, shaped, plain, shaped − plain paired)."""
    a, b = metric_columns(shaped), metric_columns(plain)
    rows: list[Row] = []
    for metric, (ev, t, col) in a.items():
        if metric not in b:
            continue
        da, db = shaped[ev][t], plain[b[metric][0]][b[metric][1]]
        same_items(da, db, metric)
        rows += summarise(da, db, [(metric, col)], n_boot, ci, seed)
    return rows


def _aligned(shaped: Tables, plain: Tables, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per item (shaped, plain, base) values of ``metric``, aligned on the item id; None when the
    metric or the base's table is missing."""
    a, b = metric_columns(shaped), metric_columns(plain)
    if metric not in a or metric not in b:
        return None
    ev, t, col = a[metric]
    da, db = shaped[ev][t], plain[b[metric][0]][b[metric][1]]
    base = shaped[ev].get(f"{t}_base")
    if base is None or col not in base:
        return None
    same_items(da, db, metric)
    same_items(da, base, f"{metric} (base)")
    j = da[["id", col]].merge(db[["id", col]], on="id", suffixes=("", "_p")).merge(
        base[["id", col]].rename(columns={col: f"{col}_b"}), on="id")
    return j[col].to_numpy(float), j[f"{col}_p"].to_numpy(float), j[f"{col}_b"].to_numpy(float)


def mean_of_means(sets: Sequence[np.ndarray], n_boot: int, ci: float, seed: int) -> Estimate:
    """Mean over independent item sets of each set's mean, with a bootstrap CI (each set resampled
    on its own, the draws averaged)."""
    sets = [np.asarray(x, float) for x in sets if len(x)]
    if not sets:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(np.mean([x.mean() for x in sets]))
    n = sum(len(x) for x in sets)
    if n_boot <= 0 or all(len(x) == 1 for x in sets):
        return Estimate(mean, mean, mean, n)
    draws = np.mean([bootstrap_means(x, n_boot, seed + i) for i, x in enumerate(sets)], axis=0)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return Estimate(mean, float(lo), float(hi), n)


@dataclass(frozen=True)
class Final:
    """The test figures of the shaped pick and plain DPO (see module doc)."""

    rows: list[Row]
    figures: dict[str, Estimate]

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        out: dict[str, float] = {}
        for k, e in self.figures.items():
            out.update({f"{prefix}{m}": v for m, v in e.as_metrics(k).items()})
            out[f"{prefix}n/{k}"] = float(e.n)
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def table(self) -> pd.DataFrame:
        recs = []
        for r in self.rows:
            rec = r.record()
            recs.append({"metric": rec["metric"], "n": rec["n"], "shaped": rec["policy"], "shaped_lo": rec["policy_lo"],
                         "shaped_hi": rec["policy_hi"], "plain": rec["base"], "plain_lo": rec["base_lo"],
                         "plain_hi": rec["base_hi"], "shaped_minus_plain": rec["diff"], "diff_lo": rec["diff_lo"],
                         "diff_hi": rec["diff_hi"]})
        return pd.DataFrame(recs)


def final_figures(shaped: Tables, plain: Tables, on_target_metric: str, sycophancy_metrics: Sequence[str],
                  ratio: float, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> Final:
    """Shaped vs plain on the same test items: per-metric rows and the objective figures."""
    rows = paired_rows(shaped, plain, n_boot, ci, seed)
    by = {r.metric: r for r in rows}
    fig: dict[str, Estimate] = {}
    on = by.get(on_target_metric)
    if on is not None:
        fig["on_target"], fig["on_target_plain"] = on.policy, on.base
        if on.diff is not None:
            fig["on_target_diff"] = on.diff
    inc_s, inc_p, diff, gate = [], [], [], []
    for m in sycophancy_metrics:
        got = _aligned(shaped, plain, m.removesuffix("_diff"))
        if got is None:
            continue
        s, p, b = got
        inc_s.append(s - b)
        inc_p.append(p - b)
        diff.append(s - p)
        gate.append((s - b) - ratio * (p - b))
    if inc_s:
        fig["syc_increase"] = mean_of_means(inc_s, n_boot, ci, seed)
        fig["syc_increase_plain"] = mean_of_means(inc_p, n_boot, ci, seed)
        fig["syc_increase_diff"] = mean_of_means(diff, n_boot, ci, seed)
        fig["syc_vs_ratio"] = mean_of_means(gate, n_boot, ci, seed)
    return Final(rows, fig)
