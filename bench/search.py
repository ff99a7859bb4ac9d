"""The default search before -> after issue 17: seconds per trial split into precompute / fit /
evaluate (medians), and how many trials the after-version finishes (complete or pruned) in the time the
before-version needs for its trials; and, on the same clock, which early-stop rule and which sampler
find the better front per minute.

Arms (``--arms``, run one after the other on the same machine, each with a fresh cache and its own study,
all over one finished audit run of the default configuration: SmolLM2, planted data):

- ``before``: ``eval.shared_trunk=false search.early_stop.enabled=false`` (every trial trains in full and
  scores with the whole model, as before issue 17), ``--trials`` trials;
- ``after``: the defaults (evaluations share the base's trunk; successive halving), ``--after-trials``;
- ``dominance``: the defaults but ``search.early_stop.rule=dominance``;
- ``nsga2``: the defaults but ``search.sampler=nsga2``;
- ``shaped_front``: the defaults but ``search.early_stop.baseline_dominates=false`` (plain DPO's first
  budget stops no shaped trial; it only sets halving's on-target floor).

Every arm but ``before`` stops claiming trials when the before-arm's wall time is spent
(``search.time_budget_s``; ``--budget-s`` sets it when ``before`` is not among the arms). Per arm: the
Pareto front's hypervolume against plain DPO's point (its off-target; its on-target − the promote
tolerance) at fixed clock times, the same reference for all arms (plain DPO trains alike in each).
``--json`` keeps each arm's result as it finishes; arms already in it are not run again.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/search.py --tracking-uri sqlite:////path/mlflow.db \\
        --audit-run-id <id> [--arms before,after] [--trials 5] [--after-trials 20] [--json out.json]
    PYTHONPATH=src python bench/search.py --tracking-uri sqlite:////path/mlflow.db --summarise <study_uid>
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {"before": ["eval.shared_trunk=false", "search.early_stop.enabled=false"], "after": [],
        "dominance": ["search.early_stop.rule=dominance"], "nsga2": ["search.sampler=nsga2"],
        "shaped_front": ["search.early_stop.baseline_dominates=false"]}
TOLERANCE = 0.03  # promote.on_target_tolerance's default: the hypervolume's reference on-target margin


def run(label: str, overrides: list[str], uri: str, audit: str, trials: int, cache: Path,
        budget_s: float | None) -> dict:
    from prefsculpt.config import compose
    from prefsculpt.stages.search import run_search

    cfg = compose(" ".join([f"tracking.uri={uri}", f"search.audit_run_id={audit}", f"search.n_trials={trials}",
                            f"search.study_name=bench-{label}-{int(time.time())}",
                            f"search.storage=sqlite:///{cache / 'optuna.db'}", f"cache_dir={cache}",
                            *([f"search.time_budget_s={budget_s}"] if budget_s else []), *overrides]))
    t0 = time.perf_counter()
    out = run_search(cfg)
    total = time.perf_counter() - t0
    res = summarise(uri, out["study_uid"])
    best = min((p["off_target"] for p in out.get("pareto", []) if not p.get("baseline")), default=float("nan"))
    return {"label": label, "overrides": overrides, "total_s": total, "budget_s": budget_s,
            "study_uid": out["study_uid"], **res, "best_shaped_off_target": best}


def hypervolume_at(trials: list[dict], t: float, ref: tuple[float, float]) -> float:
    """The front's hypervolume over the trials complete by clock time ``t`` (s from the first start)."""
    from prefsculpt.search.study import hypervolume

    done = [x for x in trials if x["state"] == "COMPLETE" and x["done_at_s"] <= t and x["off_target"] is not None]
    return hypervolume([x["off_target"] for x in done], [x["on_target"] for x in done], ref)


def best_in_gate(trials: list[dict], t: float, ref: tuple[float, float]) -> float:
    """Lowest off-target by time ``t`` among complete shaped trials with on-target ≥ ref's."""
    ok = [x["off_target"] for x in trials if x["state"] == "COMPLETE" and not x.get("baseline")
          and x["done_at_s"] <= t and x["on_target"] is not None and x["on_target"] >= ref[1]]
    return min(ok, default=math.nan)


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
                     "on_target": r.data.metrics.get("search/on_target"),
                     "baseline": r.data.tags.get("prefsculpt.baseline") == "true"})
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
    ap.add_argument("--arms", default="before,after", help=f"comma-separated, of {sorted(ARMS)}")
    ap.add_argument("--trials", type=int, default=5, help="the before arm's trials")
    ap.add_argument("--after-trials", type=int, default=20, help="every other arm's trials (planned)")
    ap.add_argument("--budget-s", type=float, help="the other arms' time budget (default: the before arm's wall)")
    ap.add_argument("--json", help="results file: written after each arm; arms already in it are not rerun")
    a = ap.parse_args()
    if a.summarise:
        print_summary(a.summarise, summarise(a.tracking_uri, a.summarise))
        return 0
    if not a.audit_run_id:
        ap.error("--audit-run-id is required to run the searches")
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if unknown := set(arms) - set(ARMS):
        ap.error(f"unknown arms {sorted(unknown)}; known: {sorted(ARMS)}")
    res = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else {}
    for label in arms:
        if label in res:
            print(f"{label}: kept from {a.json}")
            continue
        budget = None if label == "before" else (a.budget_s or (res["before"]["total_s"] if "before" in res else None))
        with tempfile.TemporaryDirectory(prefix=f"bench-search-{label}-") as d:
            res[label] = run(label, ARMS[label], a.tracking_uri, a.audit_run_id,
                             a.trials if label == "before" else a.after_trials, Path(d), budget)
        print_summary(label, res[label])
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    report(res, arms)
    return 0


def report(res: dict, arms: list[str]) -> None:
    print(f"{'':10}{'trials':>8}{'pruned':>8}{'precompute':>12}{'fit':>9}{'evaluate':>10}{'per trial':>11}{'total':>9}"
          "  (medians, s)")
    for label in arms:
        r, m = res[label], res[label]["median"]
        print(f"{label:10}{len(r['trials']):8d}{sum(x['state'] == 'PRUNED' for x in r['trials']):8d}"
              f"{m['precompute_s']:12.1f}{m['fit_s']:9.1f}{m['evaluate_s']:10.1f}{m['end_s']:11.1f}{r['total_s']:9.1f}")
    if "before" in res:
        b = res["before"]
        for label in arms:
            if label != "before":
                within = sum(x["done_at_s"] <= b["total_s"] for x in res[label]["trials"])
                print(f"{label}: {within} trials finished (complete or pruned) within the before-arm's "
                      f"{b['total_s']:.0f} s for {len(b['trials'])}")
    # one reference for all arms: the first arm's plain-DPO baseline (each arm trains it alike)
    base = next((x for label in arms for x in res[label]["trials"] if x.get("baseline") and x["state"] == "COMPLETE"), None)
    if base is None:
        print("no arm finished its plain-DPO baseline: no hypervolume")
        return
    ref = (base["off_target"], base["on_target"] - TOLERANCE)
    horizon = max(res[label]["span_s"] for label in arms)
    marks = [round(horizon * f) for f in (0.25, 0.5, 0.75, 1.0)]
    print(f"hypervolume vs plain DPO (off {ref[0]:.4f}, on {ref[1]:.3f}) by clock time (s):")
    print(f"{'':10}" + "".join(f"{t:>10d}" for t in marks) + f"{'best off in gate':>18}")
    for label in arms:
        tr = res[label]["trials"]
        print(f"{label:10}" + "".join(f"{hypervolume_at(tr, t, ref):10.4f}" for t in marks)
              + f"{best_in_gate(tr, horizon, ref):18.4f}")
    # plain DPO is the same first trial in every arm (same configuration and seed): counted from its end, the
    # arms are compared on what they did after it, whatever slowed one arm's baseline (a busier machine)
    ends = {label: next((x["done_at_s"] for x in res[label]["trials"] if x.get("baseline")), 0.0) for label in arms}
    after = max(res[label]["span_s"] - ends[label] for label in arms)
    marks = [round(after * f) for f in (0.25, 0.5, 0.75, 1.0)]
    print("the same, by clock time after plain DPO's trial ended (s; it took " +
          ", ".join(f"{label} {ends[label]:.0f}" for label in arms) + " s):")
    print(f"{'':14}" + "".join(f"{t:>10d}" for t in marks) + f"{'trials':>8}")
    for label in arms:
        tr = res[label]["trials"]
        print(f"{label:14}" + "".join(f"{hypervolume_at(tr, t + ends[label], ref):10.4f}" for t in marks)
              + f"{sum(x['done_at_s'] <= after + ends[label] for x in tr):8d}")


if __name__ == "__main__":
    raise SystemExit(main())
