"""Benchmark: the audit's statistics alone (encodings given) against the issue's 60 s target.

Times, on n=2,354 pairs x F=4,608 latents (the issue's sizes): latent clusters (NMI graph + Leiden),
``test_concepts`` over latents + clusters + the length built-in, spherical k-means data clusters
and ``where_it_holds`` — the audit stage's statistics, in that order. Prints the median of
``--repeats`` runs against the named baseline "target 60 s", and the vectorised Wilcoxon p-values
against a naive per-concept ``scipy.stats.wilcoxon`` loop (timed on a subset, extrapolated).

    python bench/audit_stats.py                      # synthetic sparse scores
    python bench/audit_stats.py --scores DIR         # real encodings (prefsculpt.concepts.shards)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from scipy import stats as sps

from prefsculpt.audit.clusters import data_clusters, firing_matrix, latent_clusters, where_it_holds
from prefsculpt.audit.stats import half_assignment, paired_pvalues, test_concepts
from prefsculpt.concepts.scores import ConceptScores

TARGET_S = 60.0


def synthetic_scores(n: int, f: int, seed: int = 0, n_factors: int = 200) -> ConceptScores:
    """Sparse span maxima whose latents co-fire through shared factors; firing rates ~0.1%-30%."""
    rng = np.random.default_rng(seed)
    zp = rng.normal(size=(n, n_factors)).astype(np.float32)  # the prompt's share, common to both sides
    fac = rng.integers(n_factors, size=f)
    thr = rng.uniform(0.7, 3.2, size=f).astype(np.float32)

    def side() -> np.ndarray:
        z = 0.7 * zp + 0.7 * rng.normal(size=(n, n_factors)).astype(np.float32)
        return np.maximum(z[:, fac] + 0.6 * rng.normal(size=(n, f)).astype(np.float32) - thr, 0.0)

    c, r = side(), side()
    c[:, :20] += (rng.random((n, 20)) < 0.3) * 0.5  # a few real effects, so the sort/report path is exercised
    vals = {("chosen", "max"): c, ("rejected", "max"): r, ("prompt", "max"): side()}
    n_tok = {"chosen": rng.poisson(120, n), "rejected": rng.poisson(110, n), "prompt": rng.poisson(40, n)}
    return ConceptScores([f"pair-{i}" for i in range(n)], vals, n_tok, [f"latent:{j}" for j in range(f)])


def audit_statistics(scores: ConceptScores, keys: list[str], k: int = 8, min_size: int = 30) -> dict:
    """The statistics of one audit run; returns counts so the work cannot be optimised away."""
    t = {}
    t0 = time.perf_counter()
    clusters = latent_clusters(firing_matrix(scores), top_fraction=0.01, min_size=4, seed=0)
    t["latent_clusters"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = test_concepts(scores, keys, stat="max", test="wilcoxon", clusters=clusters)
    t["test_concepts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sym = scores.get("chosen") + scores.get("rejected")
    labels = data_clusters(sym, k=k, seed=0)
    tested = df.loc[df["tested"] & (df["kind"] == "latent"), "index"].to_numpy()
    where = where_it_holds(scores.diff()[:, tested], labels, half_assignment(keys), min_size, concept_index=tested)
    t["data_clusters+where_it_holds"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return {"times": t, "n_clusters": len(clusters), "n_tested": int(df["tested"].sum()),
            "n_significant": int(df["significant"].sum()), "where_rows": len(where)}


def naive_wilcoxon_s(d: np.ndarray, n_cols: int = 200) -> float:
    """Seconds of a per-concept scipy.stats.wilcoxon loop over all F columns, from ``n_cols`` of them."""
    cols = np.flatnonzero((d != 0).sum(axis=0) >= 10)[:n_cols]
    t0 = time.perf_counter()
    for j in cols:
        sps.wilcoxon(d[:, j], zero_method="wilcox", correction=True, method="asymptotic")
    return (time.perf_counter() - t0) / len(cols) * d.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2354)
    ap.add_argument("--f", type=int, default=4608)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scores", help="a concept-score store written by the encoder (prefsculpt.concepts.shards)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    if args.scores:
        from prefsculpt.concepts.shards import load_scores

        scores = load_scores(args.scores)
        # the store holds pair ids, not prompts: halves are keyed by pair id here (timing is unaffected)
        keys, source = list(scores.pair_ids), f"real encodings {args.scores}"
    else:
        scores = synthetic_scores(args.n, args.f)
        keys, source = [f"prompt-{i // 2}" for i in range(args.n)], "synthetic sparse scores"
    n, f = scores.get("chosen").shape
    d = scores.diff()
    print(f"audit statistics on {source}: n={n} pairs x F={f} concepts, {os.cpu_count()} CPUs, "
          f"latent firing rate median {np.median(((scores.get('chosen') > 0)).mean(0)):.3f}")

    runs = []
    for i in range(args.repeats):
        res = audit_statistics(scores, keys)
        runs.append(res)
        print(f"  run {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in res["times"].items())
              + f" | {res['n_clusters']} latent clusters, {res['n_tested']} tested, {res['n_significant']} significant")
    med = {k: statistics.median(r["times"][k] for r in runs) for k in runs[0]["times"]}
    print(f"median total {med['total']:.2f} s vs target {TARGET_S:.0f} s: "
          f"{'PASS' if med['total'] < TARGET_S else 'FAIL'} ({TARGET_S / med['total']:.1f}x under the target)")

    t0 = time.perf_counter()
    paired_pvalues(d, "wilcoxon")
    vec_s = time.perf_counter() - t0
    naive_s = naive_wilcoxon_s(d)
    print(f"Wilcoxon p-values for all {f} concepts: vectorised {vec_s:.2f} s vs naive per-concept "
          f"scipy.stats.wilcoxon loop {naive_s:.1f} s (extrapolated from 200 concepts): {naive_s / vec_s:.1f}x faster")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"source": source, "n": n, "f": f, "median_s": med, "target_s": TARGET_S,
                       "vectorised_wilcoxon_s": vec_s, "naive_wilcoxon_s": naive_s, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
