"""Benchmark: are the audit's length-controlled p-values exact under the swap null, and how often does BH
report anything on null data? (issue 13, "calibration that decides").

On a real score store (the ``scores/`` artifact of an ``sae`` run), the tested concepts (the audit's
defaults: span max, support >= 1%, >= 10 pairs differing) plus the length built-in are re-tested on
``--seeds`` null datasets, chosen and rejected swapped by a fair coin per pair (the audit's own
``swap_flips``: seed s is the audit's null seed s). Per test (the length-controlled OLS-intercept t
test the q-values rest on, and the raw Wilcoxon signed-rank test beside it) it prints:

- the seeds with any BH discovery at q < 0.05, among the audit's 20 and among all ``--seeds``;
- how many null p-values fall below 1e-4 and 1e-5, against the count exact p-values give (the
  named baseline: ``seeds x tests x level``);
- for every null discovery of the length-controlled test, its p beside the **exact** sign-flip p of
  the same statistic (Monte Carlo over ``--flips`` coin draws of that column: under the swap null the
  OLS t depends on the coins only through s·d and s·L, so each draw costs two dot products).

    python bench/calibration.py --scores RUN_DIR/artifacts/scores [--seeds 100] [--flips 1000000]
    python bench/calibration.py --scores RUN_DIR/artifacts/scores --seeds 1000 --flips 0 --length-only

Covers the concept families BH runs over bar latent clusters and data clusters (the audit stage adds
those; their null discoveries were 0 in the default run).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import sparse
from scipy import stats as sps

from prefsculpt.audit.stats import bh_qvalues, length_controlled, swap_flips, wilcoxon_test
from prefsculpt.concepts.store import ScoreStore


def ols_t_from_sums(u: np.ndarray, v: np.ndarray, n: int, p: float, q: float, dd: float) -> np.ndarray:
    """Intercept t of OLS d' = a + b·x' + e, from Σd' = u, Σx' = v and the coin-invariant Σx'² = p,
    Σx'd' = q, Σd'² = dd (x' = s·L, d' = s·d)."""
    xm, dm = v / n, u / n
    sxx, sxd, sdd = p - n * xm**2, q - n * xm * dm, dd - n * dm**2
    b = sxd / sxx
    a = dm - b * xm
    s2 = np.maximum(sdd - b * sxd, 0.0) / (n - 2)
    return a / np.sqrt(s2 * (1.0 / n + xm**2 / sxx))


def exact_flip_p(d: np.ndarray, x: np.ndarray, n_flips: int, rng: np.random.Generator, chunk: int = 50_000) -> float:
    """Monte Carlo p of the swap null for one column: (1 + #{|t(s)| >= |t_obs|}) / (B + 1)."""
    n = len(d)
    p, q, dd = float(x @ x), float(x @ d), float(d @ d)
    t_obs = abs(float(ols_t_from_sums(np.array([d.sum()]), np.array([x.sum()]), n, p, q, dd)[0]))
    hits = done = 0
    d32, x32 = d.astype(np.float32), x.astype(np.float32)
    while done < n_flips:
        s = rng.integers(0, 2, size=(min(chunk, n_flips - done), n)).astype(np.float32) * 2 - 1
        t = ols_t_from_sums((s @ d32).astype(np.float64), (s @ x32).astype(np.float64), n, p, q, dd)
        hits += int((np.abs(t) >= t_obs).sum())
        done += len(s)
    return (1 + hits) / (n_flips + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scores", required=True, help="a score store (the scores/ artifact of an sae run)")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--flips", type=int, default=1_000_000, help="0: skip the exact sign-flip check")
    ap.add_argument("--length-only", action="store_true", help="skip the raw Wilcoxon test (faster on many seeds)")
    ap.add_argument("--fdr", type=float, default=0.05)
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    t0 = time.perf_counter()
    st = ScoreStore(a.scores)
    c, r = st.block("max", sparse.identity(st.n_concepts, format="csc"), np.float64)
    d_all = c - r
    tested = (((c != 0) | (r != 0)).mean(0) >= 0.01) & ((d_all != 0).sum(0) >= 10)
    length = st.length_diff()
    d = np.concatenate([d_all[:, tested], length[:, None]], axis=1)
    n, m = d.shape
    print(f"{n} pairs, {m} tests ({int(tested.sum())} concepts + length); mean length difference "
          f"{length.mean():.1f} tokens (sd {length.std():.1f})")
    tests = {"length-controlled (OLS intercept t)": lambda dd, xx: length_controlled(dd, xx)[1],
             "raw (Wilcoxon signed-rank)": lambda dd, xx: wilcoxon_test(dd)[0]}
    if a.length_only:
        tests.pop("raw (Wilcoxon signed-rank)")
    out: dict[str, dict] = {}
    discoveries = []
    for name, fn in tests.items():
        seeds_with, tail4, tail5 = [], 0, 0
        for s, flip in enumerate(swap_flips(n, a.seeds)):
            sg = np.where(flip, -1.0, 1.0)
            p = fn(d * sg[:, None], length * sg)
            ok = np.isfinite(p)
            q = np.full(m, np.nan)
            q[ok] = bh_qvalues(p[ok])
            hit = np.where(q < a.fdr)[0]
            if len(hit):
                seeds_with.append(s)
                if name.startswith("length"):
                    discoveries += [(s, int(j), float(p[j])) for j in hit if j < m - 1]
            tail4 += int((p[ok] < 1e-4).sum())
            tail5 += int((p[ok] < 1e-5).sum())
        first20 = [s for s in seeds_with if s < 20]
        out[name] = {"seeds_with_discovery": seeds_with, "of_first_20": len(first20), "of_all": len(seeds_with),
                     "p_below_1e-4": tail4, "expected_1e-4": a.seeds * m * 1e-4,
                     "p_below_1e-5": tail5, "expected_1e-5": a.seeds * m * 1e-5}
        ci = sps.binomtest(len(seeds_with), a.seeds).proportion_ci(0.95)
        out[name]["rate_ci95"] = [ci.low, ci.high]
        print(f"{name}: seeds with a discovery {len(first20)} of the audit's 20 ({first20}), "
              f"{len(seeds_with)} of {a.seeds} ({len(seeds_with) / a.seeds:.1%}, 95% CI {ci.low:.1%}-{ci.high:.1%}; "
              f"BH on independent exact p: {a.fdr:.0%}); null p < 1e-4: {tail4} (exact p: {a.seeds * m * 1e-4:.1f}), "
              f"p < 1e-5: {tail5} (exact p: {a.seeds * m * 1e-5:.1f})")
    rng = np.random.default_rng(0)
    rows = []
    for s, j, p in discoveries if a.flips > 0 else []:
        sg = np.where(swap_flips(n, s + 1)[s], -1.0, 1.0)
        pe = exact_flip_p(d[:, j] * sg, length * sg, a.flips, rng)
        rows.append({"seed": s, "column": j, "p_t": p, "p_exact": pe})
        print(f"  null discovery seed {s}, test column {j}: t-test p {p:.2e}, exact sign-flip p {pe:.2e} "
              f"({a.flips:,} draws)")
    out["exact_check"] = rows
    print(f"done in {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
