"""The default search before -> after issue 17: seconds per trial split into precompute / fit /
evaluate (medians), and how many trials the after-version finishes (complete or pruned) in the time the
before-version needs for its trials.

- before: ``eval.shared_trunk=false search.early_stop.enabled=false`` (every trial trains in full and
  scores with the whole model, as before issue 17);
- after: the defaults (evaluations share the base's trunk; every trial first trains on a small budget
  and stops there when another trial dominates it beyond noise).

Both run the ``search`` stage of the default configuration (SmolLM2, planted data) over one finished
audit run, each with a fresh cache and its own study, one after the other on the same machine.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/search.py --tracking-uri sqlite:////path/mlflow.db \\
        --audit-run-id <id> [--trials 5] [--after-trials 12] [--json out.json]
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
    import mlflow

    from prefsculpt.config import compose
    from prefsculpt.stages.search import run_search

    cfg = compose(" ".join([f"tracking.uri={uri}", f"search.audit_run_id={audit}", f"search.n_trials={trials}",
                            f"search.study_name=bench-{label}-{int(time.time())}",
                            f"search.storage=sqlite:///{cache / 'optuna.db'}", f"cache_dir={cache}", *overrides]))
    t0 = time.perf_counter()
    out = run_search(cfg)
    total = time.perf_counter() - t0
    client = mlflow.MlflowClient(uri)
    rows = []
    for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"tags.`prefsculpt.study_uid` = '{out['study_uid']}' and tags.`prefsculpt.stage` = 'trial'"):
        kids = client.search_runs([r.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        pre = sum(k.data.metrics.get("train/precompute_s", 0.0) for k in kids)
        fit = sum(k.data.metrics.get("train/fit_s", 0.0) for k in kids)
        ev = sum(k.data.metrics.get("time/total_s", 0.0) for k in kids if k.data.tags.get("prefsculpt.stage") == "evaluate")
        rows.append({"trial": int(r.data.tags["prefsculpt.trial_number"]), "state": r.data.tags.get("prefsculpt.trial_state"),
                     "precompute_s": pre, "fit_s": fit, "evaluate_s": ev,
                     "end_s": (r.info.end_time - r.info.start_time) / 1000.0, "start": r.info.start_time,
                     "end": r.info.end_time})
    rows.sort(key=lambda x: x["trial"])
    start = min(x["start"] for x in rows)
    for x in rows:
        x["done_at_s"] = (x["end"] - start) / 1000.0
    off = [x for x in out.get("pareto", [])]
    best = min((p["off_target"] for p in off if not p.get("baseline")), default=float("nan"))
    return {"label": label, "total_s": total, "trials": rows, "best_shaped_off_target": best,
            "median": {k: statistics.median(x[k] for x in rows) for k in ("precompute_s", "fit_s", "evaluate_s", "end_s")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--audit-run-id", required=True)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--after-trials", type=int, default=12)
    ap.add_argument("--json")
    a = ap.parse_args()
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
