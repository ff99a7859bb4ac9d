"""Benchmark: do the data-cluster ("where it holds") tests add false discoveries to the audit's swap
null? (issue 13 point 5, "calibration that decides", over every family).

Runs the ``audit`` stage (Hydra overrides as arguments; it logs an audit run to that store) with the
stage's two where-functions wrapped to keep what they saw: the shown hypotheses' chosen - rejected
``d``, the data clusters, the split halves, and the 20 swap-null concept tables. Then:

- **the where family alone, as a second BH family at fdr** (how the audit ran it before e7f5de2:
  every shown hypothesis x data cluster, one BH): on ``--seeds`` swap-null coin vectors (seed s =
  the audit's null seed s), the share of seeds with a discovery and its 95% CI (named baseline: BH on
  exact p-values makes one on at most fdr of null seeds), and the null p-values below 1e-3 / 1e-4
  against what exact p-values give;
- **on the audit's own 20 null seeds**: seeds with a concept discovery, with a discovery of that
  second family, with either (the report's null rate before), and with either under today's rule
  (cluster tests only for the seed's own significant concepts, at BH level fdr·R/m).

    PYTHONPATH=src python bench/where_calibration.py --seeds 500 \\
        data=hh_rlhf data.path=../shared/data/hh-rlhf/helpful-base/test.jsonl.gz data.on_error=skip \\
        tracking.uri=sqlite:///$PWD/hh.db pipeline.reuse=false

(an ``sae`` run of the same data must be in that store: ``pipeline.stages=[prepare,sae]`` first).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats as sps

import prefsculpt.stages.audit as stage
from prefsculpt.audit.clusters import where_it_holds
from prefsculpt.audit.stats import bh_qvalues, calibration_row, swap_flips
from prefsculpt.cli import run_stage, setup_logging


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--fdr", type=float, default=0.05)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the audit stage")
    a = ap.parse_args()
    setup_logging("WARNING")
    seen: dict = {}
    where_rows, where_null_rows = stage.where_rows, stage.where_null_rows

    def keep_rows(d, dirs, labels, half, cfg, about, selected=None, share=1.0):
        seen.update(d=d, labels=labels, half=half, min_size=cfg.min_cluster_size)
        return where_rows(d, dirs, labels, half, cfg, about, selected, share)

    def keep_nulls(diffs, nulls, labels, half, min_size, fdr, flips, top_k):
        out = where_null_rows(diffs, nulls, labels, half, min_size, fdr, flips, top_k)
        seen.update(nulls=nulls, new_where=out)
        return out

    stage.where_rows, stage.where_null_rows = keep_rows, keep_nulls
    run_stage("audit", a.overrides)
    if "nulls" not in seen or seen.get("labels") is None:
        raise SystemExit("the audit made no data clusters or ran no calibration: nothing to measure")
    nulls = seen["nulls"]
    if a.seeds < len(nulls):
        raise SystemExit(f"--seeds must be at least the audit's {len(nulls)} null seeds")
    d, labels, half = seen["d"], seen["labels"], seen["half"]
    n = len(d)
    old = []  # per seed: discoveries of the where family as a second BH family at fdr
    below3 = below4 = m = 0
    for flip in swap_flips(n, a.seeds):
        p = where_it_holds(d * np.where(flip, -1.0, 1.0)[:, None], labels, half, seen["min_size"])["p"].to_numpy(float)
        old.append(int((bh_qvalues(p) < a.fdr).sum()))
        below3, below4, m = below3 + int((p < 1e-3).sum()), below4 + int((p < 1e-4).sum()), len(p)
    old = np.array(old)
    k = int((old > 0).sum())
    ci = sps.binomtest(k, a.seeds).proportion_ci(0.95)
    print(f"{n} pairs; where family: {d.shape[1]} shown hypotheses x {len(np.unique(labels[labels >= 0]))} data "
          f"clusters = {m} tests")
    print(f"where family alone as a second BH family at fdr {a.fdr}: {k} of {a.seeds} null seeds with a discovery "
          f"({k / a.seeds:.1%}, 95% CI {ci.low:.1%}-{ci.high:.1%}; exact p-values: at most {a.fdr:.0%}); "
          f"null p < 1e-3: {below3} (exact {a.seeds * m * 1e-3:.1f}), p < 1e-4: {below4} (exact {a.seeds * m * 1e-4:.1f})")
    concept = np.array([calibration_row(sd, nt, a.fdr)["n_q_below_fdr"] > 0 for sd, nt in enumerate(nulls)])
    new_where = np.array([r["n_where_q_below_fdr"] > 0 for r in seen["new_where"]])
    s = len(nulls)
    old_s = old[:s] > 0
    print(f"the audit's {s} null seeds: concepts {int(concept.sum())}, where as a second family {int(old_s.sum())}, "
          f"either (before) {int((concept | old_s).sum())}; where at fdr*R/m {int(new_where.sum())}, "
          f"either (now) {int((concept | new_where).sum())}")


if __name__ == "__main__":
    main()
