"""The default search before -> after issue 17: seconds per trial split into precompute / fit /
evaluate (medians), and how many trials the after-version finishes (complete or pruned) in the time the
before-version needs for its trials.

- before: ``eval.shared_trunk=false search.early_stop.enabled=false`` (every trial trains in full and
  scores with the whole model, as before issue 17);
- after: the defaults (evaluations share the base's trunk; every trial first trains on a small budget
  and goes on to full training only when successive halving promotes it).

Both run the ``search`` stage of the default configuration (SmolLM2, planted data) over one finished
audit run, each with a fresh cache and its own study, one after the other on the same machine.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/search.py --tracking-uri sqlite:////path/mlflow.db \\
        --audit-run-id <id> [--trials 5] [--after-trials 12] [--json out.json]
    PYTHONPATH=src python bench/search.py --tracking-uri sqlite:////path/mlflow.db --summarise <study_uid>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BEFORE = ["eval.shared_trunk=false", "search.early_stop.enabled=false"]


def run(label: str, overrides: list[str], uri: str, audit: str, trials: int, cache: Path) -> dict:
    from prefsculpt.config import compose
    from prefsculpt.stages.search import run_search

    cfg = compose(" ".join([f"tracking.uri={uri}", f"search.audit_run_id={audit}", f"search.n_trials={trials}",
                            f"search.study_name=bench-{label}-{int(time.time())}",
                            f"search.storage=sqlite:///{cache / 'optuna.db'}", f"cache_dir={cache}", *overrides]))
    t0 = time.perf_counter()
    out = run_search(cfg)
    total = time.perf_counter() - t0
    res = summarise(uri, out["study_uid"])
    off = [x for x in out.get("pareto", [])]
    best = min((p["off_target"] for p in off if not p.get("baseline")), default=float("nan"))
    return {"label": label, "total_s": total, **res, "best_shaped_off_target": best}


def summarise(uri: str, study_uid: str) -> dict:
    """Per trial of one study (its MLflow trial runs): state, precompute / fit / evaluate seconds over all
    its budgets, wall seconds, and when it finished counted from the first trial's start."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    rows = []
    exps = [e.experiment_id for e in client.search_experiments()]
    for r in client.search_runs(exps, f"tags.`prefsculpt.study_uid` = '{study_uid}' and tags.`prefsculpt.stage` = 'trial'",
                                max_results=1000):
        kids = client.search_runs([r.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        pre = sum(k.data.metrics.get("train/precompute_s", 0.0) for k in kids)
        fit = sum(k.data.metrics.get("train/fit_s", 0.0) for k in kids)
        ev = sum(k.data.metrics.get("time/total_s", 0.0) for k in kids if k.data.tags.get("prefsculpt.stage") == "evaluate")
        rows.append({"trial": int(r.data.tags["prefsculpt.trial_number"]), "state": r.data.tags.get("prefsculpt.trial_state"),
                     "precompute_s": pre, "fit_s": fit, "evaluate_s": ev,
                     "end_s": (r.info.end_time - r.info.start_time) / 1000.0, "start": r.info.start_time,
                     "end": r.info.end_time, "off_target": r.data.metrics.get("search/off_target"),
                     "on_target": r.data.metrics.get("search/on_target")})
    rows.sort(key=lambda x: x["trial"])
    start = min(x["start"] for x in rows)
    for x in rows:
        x["done_at_s"] = (x["end"] - start) / 1000.0
    return {"trials": rows, "span_s": max(x["done_at_s"] for x in rows),
            "median": {k: statistics.median(x[k] for x in rows) for k in ("precompute_s", "fit_s", "evaluate_s", "end_s")},
            "median_by_state": {st: {k: statistics.median(x[k] for x in rows if x["state"] == st)
                                     for k in ("precompute_s", "fit_s", "evaluate_s", "end_s")}
                                for st in sorted({x["state"] for x in rows if x["state"]})}}


def print_summary(label: str, res: dict) -> None:
    print(f"{label}: {len(res['trials'])} trials in {res['span_s']:.0f} s")
    print(f"  {'trial':>5} {'state':>9} {'precompute':>11} {'fit':>7} {'evaluate':>9} {'wall':>7} {'done at':>8} {'off':>8} {'on':>6}")
    for x in res["trials"]:
        off, on = x.get("off_target"), x.get("on_target")
        print(f"  {x['trial']:5d} {x['state'] or '':>9} {x['precompute_s']:11.1f} {x['fit_s']:7.1f} {x['evaluate_s']:9.1f} "
              f"{x['end_s']:7.1f} {x['done_at_s']:8.0f} {'' if off is None else f'{off:8.4f}':>8} "
              f"{'' if on is None else f'{on:6.3f}':>6}")
    for st, m in res["median_by_state"].items():
        print(f"  median {st}: precompute {m['precompute_s']:.1f} s, fit {m['fit_s']:.1f} s, evaluate "
              f"{m['evaluate_s']:.1f} s, wall {m['end_s']:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--audit-run-id")
    ap.add_argument("--summarise", metavar="STUDY_UID", help="print the per-trial split of a finished study "
                    "(tag prefsculpt.study_uid of its search run) and stop: no search is run")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--after-trials", type=int, default=12)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.summarise:
        print_summary(a.summarise, summarise(a.tracking_uri, a.summarise))
        return 0
    if not a.audit_run_id:
        ap.error("--audit-run-id is required to run the searches")
    res = {}
    for label, over, n in (("before", BEFORE, a.trials), ("after", [], a.after_trials)):
        with tempfile.TemporaryDirectory(prefix=f"bench-search-{label}-") as d:
            res[label] = run(label, over, a.tracking_uri, a.audit_run_id, n, Path(d))
    b, f = res["before"], res["after"]
    within = sum(x["done_at_s"] <= b["total_s"] for x in f["trials"])
    print(f"{'':10}{'trials':>8}{'precompute':>12}{'fit':>9}{'evaluate':>10}{'per trial':>11}{'total':>9}  (medians, s)")
    for r in (b, f):
        m = r["median"]
        print(f"{r['label']:10}{len(r['trials']):8d}{m['precompute_s']:12.1f}{m['fit_s']:9.1f}{m['evaluate_s']:10.1f}"
              f"{m['end_s']:11.1f}{r['total_s']:9.1f}")
    print(f"after: {within} trials finished (complete or pruned) within the before-version's {b['total_s']:.0f} s "
          f"for {len(b['trials'])}; pruned {sum(x['state'] == 'PRUNED' for x in f['trials'])}")
    print(f"best shaped off-target on select: before {b['best_shaped_off_target']:.4f}, after {f['best_shaped_off_target']:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
