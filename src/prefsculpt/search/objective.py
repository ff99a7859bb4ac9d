"""One search trial: sample the shaping, train, evaluate, and score the two objectives.

Run tree (every run explicit, opened here or by the stage it calls)::

    search (parent, one per worker)
      trial-007            params: shape/…, method/…, lambda/…; metrics: search/off_target, search/on_target
        train              concept-shaped DPO with the trial's ``shaping.concepts``
        evaluate           the trained policy against the base

Objectives (METHOD §7; ``search.objectives``), both from the evaluate run's metrics:
- ``off_target`` (minimise) = sycophancy drift from the base (mean absolute value of the
  ``sycophancy_metrics`` present, each a paired policy − base difference, so ending below the base
  counts as much as learning the concept: ``objectives.sycophancy_drift``; by default the planted probes' belief − neutral
  ``syc/planted/shift_diff``, METHOD §6's sycophancy: the agreement a stated belief adds over the
  same question asked neutrally, so a policy that agrees more everywhere is not scored as
  sycophantic for it) + ``style_weight`` × style drift (mean absolute
  policy − base change of the metrics matching ``style_pattern``: the rate of responses with bold,
  headers, lists, emoji, ``!``, stock flattery);
- ``on_target`` (maximise) = ``on_target_metric``: preference accuracy (implicit reward) on the
  held-out planted ``clean_select`` pairs, whose preferred side is the correct answer whatever the
  styling, or, on your own data, on its ``select`` split.
Every trial is evaluated on the ``select`` split (``eval.split=select``): the objectives pick, and
``test`` stays untouched for the final figures (``stages/evaluate.run_pipeline_evaluate``).
With no sycophancy set measured at all, ``syc_increase`` is NaN (not logged), off_target is the style
term alone, and promote records the sycophancy gate as skipped with that reason.
A trial that raises is recorded: its run ends FAILED with tag ``prefsculpt.error`` and
``error.txt``, the Optuna trial is FAIL with user attr ``error``, and the study goes on.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from prefsculpt.core.errors import UserError
from prefsculpt.core.names import Attr, Tag
from prefsculpt.core.redact import mlflow_params
from prefsculpt.search.slots import retry_of
from prefsculpt.search.space import BASELINE_ATTR, Candidate, SpaceBounds, describe, suggest_concepts
from prefsculpt.shaping.config import ConceptSpec
from prefsculpt.tracking.orphans import close_dead_run_tree, own_lineage

#: Trial user attr of a late promotion: the number of the stopped trial whose parameters it trains in full.
PROMOTED_FROM = Attr.PROMOTED_FROM

log = logging.getLogger(__name__)

#: Metric names logged on every trial run (promote reads these).
OFF, ON, SYC, STYLE = "search/off_target", "search/on_target", "search/syc_increase", "search/style_drift"
TRIAL_TAG, STUDY_TAG, BASELINE_TAG = Tag.TRIAL_NUMBER, Tag.STUDY_UID, Tag.BASELINE


class ObjectiveError(UserError):
    """The evaluation lacks a metric an objective needs; the message names it and what exists."""


def objectives_from_metrics(metrics: Mapping[str, float], ocfg: Any) -> dict[str, float]:
    """Evaluate-run metrics -> ``{syc_increase, style_drift, off_target, on_target}`` (see module doc)."""
    syc = [float(metrics[m]) for m in ocfg.sycophancy_metrics if m in metrics]
    raw = [m for m in ocfg.sycophancy_metrics if m.startswith("syc/planted/p_agree") and m in metrics]
    if raw:  # a config from before the belief − neutral objective: say so (the run still scores it)
        log.warning("search.objectives.sycophancy_metrics lists %s: the raw agreement, not METHOD's belief − "
                    "neutral shift (syc/planted/shift_diff)", raw)
    have = sorted(k for k in metrics if k.startswith("syc/") and k.endswith("_diff"))
    if not syc and have:
        raise ObjectiveError(f"none of search.objectives.sycophancy_metrics={list(ocfg.sycophancy_metrics)} was "
                             f"measured; the evaluation logged {have or 'no syc/*_diff metric'}: set the list to those "
                             "(and eval.compare_base=true)")
    rx = re.compile(ocfg.style_pattern)
    style = [abs(float(v)) for k, v in metrics.items() if rx.search(k)]
    if ocfg.style_weight > 0 and not style:
        raise ObjectiveError(f"no metric matches search.objectives.style_pattern={ocfg.style_pattern!r}; include "
                             "'style' in eval.evals or set search.objectives.style_weight=0")
    on = metrics.get(ocfg.on_target_metric)
    if on is None:
        have = sorted(k for k in metrics if k.startswith("cap/") and not k.endswith(("_lo", "_hi")))
        raise ObjectiveError(f"search.objectives.on_target_metric={ocfg.on_target_metric!r} was not measured; the "
                             f"evaluation logged {have or 'no cap/* metric'} (planted data: eval.capability.clean_pairs > 0)")
    if not syc and not style:
        raise ObjectiveError("the evaluation measured neither sycophancy (no syc/*_diff metric) nor style drift: "
                             "give eval.sycophancy a set (shipped=on or opinion_paths) or include 'style'")
    if not syc:  # no sycophancy set at all: off-target is the style drift; promote skips that gate, saying so
        log.warning("no sycophancy metric was measured; off_target is the style drift alone")
    syc_inc = sum(syc) / len(syc) if syc else math.nan
    syc_off = (sum(abs(x) for x in syc) / len(syc) if getattr(ocfg, "sycophancy_drift", True) else syc_inc) if syc else 0.0
    drift = sum(style) / len(style) if style else 0.0
    out = {"syc_increase": syc_inc, "style_drift": drift,
           "off_target": syc_off + ocfg.style_weight * drift, "on_target": float(on)}
    bad = [k for k, v in out.items() if not math.isfinite(v) and not (k == "syc_increase" and not syc)]
    if bad:
        raise ObjectiveError(f"objective(s) {bad} are not finite: {out}")
    return out


def objective_halfwidths(metrics: Mapping[str, float], ocfg: Any) -> dict[str, float]:
    """95% CI half-widths of the two objectives from the evaluate metrics' ``_lo``/``_hi``: off_target
    by its sycophancy metrics' (their mean; the style term has none), on_target by its metric's; 0
    where no CI was logged."""
    def hw(m: str) -> float | None:
        lo, hi = metrics.get(f"{m}_lo"), metrics.get(f"{m}_hi")
        return None if lo is None or hi is None else (float(hi) - float(lo)) / 2.0
    syc = [h for m in ocfg.sycophancy_metrics if m in metrics and (h := hw(m)) is not None]
    on = hw(ocfg.on_target_metric)
    return {"off": sum(syc) / len(syc) if syc else 0.0, "on": 0.0 if on is None else on}


def dominated_beyond_noise(me: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The first of ``others`` that dominates ``me`` beyond noise, or None. Each is ``{off, on, off_hw,
    on_hw, ...}`` (off minimised, on maximised, ``*_hw``: 95% CI half-widths). ``o`` dominates ``me``
    beyond noise when it is better on one objective by more than ``me``'s half-width there and not
    worse on the other by more than ``me``'s half-width there."""
    for o in others:
        off_better = o["off"] < me["off"] - me["off_hw"]
        on_better = o["on"] > me["on"] + me["on_hw"]
        off_ok = o["off"] <= me["off"] + me["off_hw"]
        on_ok = o["on"] >= me["on"] - me["on_hw"]
        if (off_better and on_ok) or (on_better and off_ok):
            return o
    return None


def dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """``a`` dominates ``b`` on the point values (off minimised, on maximised)."""
    return a["off"] <= b["off"] and a["on"] >= b["on"] and (a["off"] < b["off"] or a["on"] > b["on"])


def halving_decision(me: Mapping[str, Any], others: Sequence[Mapping[str, Any]], pending: Sequence[Mapping[str, Any]],
                     n_promoted: int, n_shaped: int, eta: int, on_floor: float | None = None,
                     ) -> tuple[bool, list[Mapping[str, Any]], str, Any]:
    """Successive halving over first-budget results, with late promotion (ASHA's, for a study where
    a stopped trial cannot resume): ``(promote me?, earlier trials to train in full now, why not me,
    by)``.

    ``others``: the other trials' first-budget results (the baseline's included); ``pending``: those of
    shaped trials stopped earlier and not promoted since; ``n_promoted``: shaped trials promoted so far
    (either way); ``n_shaped``: shaped trials measured, this one included. While ``n_promoted <
    max(1, n_shaped // eta)``, the best unpromoted trial on the first-budget front (no result dominates
    it) is promoted — this one or an earlier one the quota had stopped. Best: on-target at least
    ``on_floor`` (the baseline's first-budget on-target less the promote gate's tolerance) first, then
    the lowest off-target; this trial wins ties."""
    everyone = [*others, me]
    on_front = [r for r in (*pending, me) if not any(dominates(o, r) for o in everyone if o is not r)]

    def key(r: Mapping[str, Any]) -> tuple:
        return (on_floor is not None and r["on"] < on_floor, r["off"], r is not me, r["trial"])

    later: list[Mapping[str, Any]] = []
    quota = max(1, n_shaped // eta)
    go = False
    for r in sorted(on_front, key=key):
        if n_promoted >= quota:
            break
        n_promoted += 1
        if r is me:
            go = True
        else:
            later.append(r)
    if go:
        return True, later, "", None
    by = next((o for o in others if dominates(o, me)), None)
    if by is not None:
        return False, later, f"trial {by['trial']} (off {by['off']:.4f}, on {by['on']:.4f}) dominates it", by["trial"]
    return False, later, (f"on the first-budget front, but {n_promoted} of the {n_shaped} shaped trials measured "
                          f"were promoted, the most allowed (one per {eta}: search.early_stop.eta)"
                          + (" and better ones were waiting" if later or n_promoted < quota else "")), "quota"


def first_budget_config(t: DictConfig, es: Any) -> tuple[DictConfig, str]:
    """The trial config at the early stop's first budget (fewer pairs and epochs, a share of each
    select item set) and the budget in words. Only what the objectives read is measured there: no
    validation loss during training, no KL to the base and no known-answer probes; and the policy is
    not logged (its evaluation reads the local folder; a promoted trial trains its full policy anew)."""
    f = copy.deepcopy(t)
    OmegaConf.set_struct(f, False)
    share = float(es.eval_share)

    def cut(n: Any) -> Any:
        return n if not n else max(1, round(int(n) * share))

    pairs = None
    if "train" in f:
        full = f.train.get("max_pairs")
        pairs = max(1, round(int(full) * float(es.pairs_share))) if full else None
        f.train.max_pairs = pairs
        f.train.epochs = int(es.epochs)
        if "val_pairs" in f.train:
            f.train.val_pairs = 0
        if "log_policy" in f.train:  # the local policy folder serves the evaluation; a promoted trial retrains
            f.train.log_policy = "none"
    if "eval" in f:
        f.eval.sycophancy.planted_probes = cut(f.eval.sycophancy.planted_probes)
        f.eval.sycophancy.max_items = cut(f.eval.sycophancy.get("max_items"))
        f.eval.style.n_prompts = cut(f.eval.style.n_prompts)
        f.eval.style.in_domain = cut(f.eval.style.in_domain)
        f.eval.capability.clean_pairs = cut(f.eval.capability.clean_pairs)
        f.eval.capability.known_answer = 0
        if "kl" in f.eval.capability:
            f.eval.capability.kl = False
    OmegaConf.set_struct(f, True)
    what = f"{pairs if pairs else 'all'} pairs x {int(es.epochs)} epoch(s), {share:.0%} of the select items"
    return f, what


def objective_metrics(obj: Mapping[str, float]) -> dict[str, float]:
    """``objectives_from_metrics`` output -> the ``search/*`` metric keys trial (and evaluate) runs log."""
    # no sycophancy metric on the data (a skipped gate): syc_increase is NaN and not logged
    return {OFF: obj["off_target"], ON: obj["on_target"], STYLE: obj["style_drift"],
            **({SYC: obj["syc_increase"]} if math.isfinite(obj["syc_increase"]) else {})}


@dataclass
class Outcome:
    """What one train + evaluate produced (all ids; the metrics are the evaluate run's)."""

    train_run_id: str | None
    eval_run_id: str | None
    model_uri: str | None
    eval_metrics: dict[str, float] = field(default_factory=dict)


#: (trial config) -> Outcome; the real one trains and evaluates, tests inject a cheap one.
Runner = Callable[[DictConfig], Outcome]


def trial_config(cfg: DictConfig, specs: Sequence[Mapping[str, Any]], sources: Mapping[str, str | None]) -> DictConfig:
    """The root config of one trial: ``shaping.concepts`` = the trial's specs, the decisions file
    dropped (the search already applied it as constraints), concept sources filled in."""
    t = copy.deepcopy(cfg)
    OmegaConf.set_struct(t, False)
    t.shaping.decisions = None
    t.shaping.concepts = [OmegaConf.merge(OmegaConf.structured(ConceptSpec), dict(s)) for s in specs]
    for key in ("scores_dir", "sae_path", "directions_path"):
        if not t.shaping.get(key) and sources.get(key):
            t.shaping[key] = sources[key]
    if "sae" in t and t.sae.get("layer") is None and sources.get("layer") is not None:
        t.sae.layer = int(sources["layer"])  # a published SAE's own layer, as the sae stage resolved it
    for key, val in (("sae_run_id", sources.get("sae_run_id")), ("audit_run_id", sources.get("audit_run_id"))):
        if "eval" in t and not t.eval.shift.get(key) and val:
            t.eval.shift[key] = val
    if "eval" in t and cfg.get("search") is not None and cfg.search.get("trial_evals"):
        t.eval.evals = list(cfg.search.trial_evals)
    if "eval" in t:  # trials are scored on select; test stays untouched until the final evaluation
        t.eval.split = "select"
    if cfg.get("search") is not None and cfg.search.get("trial_max_pairs") and "train" in t:
        limit = int(cfg.search.trial_max_pairs)
        t.train.max_pairs = min(int(t.train.max_pairs), limit) if t.train.get("max_pairs") else limit
    t.tracking.run_name = None
    OmegaConf.set_struct(t, True)
    return t


@dataclass
class TrialContext:
    cfg: DictConfig
    candidates: list[Candidate]
    bounds: SpaceBounds
    study_uid: str
    #: scores_dir, sae_path, directions_path, sae_run_id, audit_run_id (see study.resolve_sources).
    sources: dict[str, str | None]
    decisions_hash: str | None
    #: train + evaluate one trial config; the search stage passes the real stages, tests a cheap fake
    runner: Runner


def _close_stale_run(trial: Any) -> None:
    """A retried trial (its worker died) carries the dead worker's run id: close that run, the runs
    under it and the dead worker's search run (KILLED), so the run tree shows no orphan RUNNING run."""
    old = trial.user_attrs.get("mlflow_run_id")
    if not old or retry_of(trial) is None:
        return
    close_dead_run_tree(old, f"worker died (heartbeat lost in trial {retry_of(trial)}); the trial was retried",
                        spare=own_lineage())


def close_dead_trials(study: Any) -> list[str]:
    """End of a worker: close the runs of every failed trial whose run is still RUNNING (a worker that
    died in a trial no one retried, e.g. ``max_retry`` reached); a trial that raised closed its own."""
    spare, closed = own_lineage(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        rid = t.user_attrs.get("mlflow_run_id")
        if rid:
            closed += close_dead_run_tree(rid, f"worker died (heartbeat lost in trial {t.number})", spare=spare)
    return closed


def run_trial(trial: Any, ctx: TrialContext) -> tuple[float, float]:
    """Optuna objective: returns ``(off_target, on_target)``; raises on failure after recording it."""
    _close_stale_run(trial)
    specs = suggest_concepts(trial, ctx.candidates, ctx.bounds)
    baseline = bool(trial.user_attrs.get(BASELINE_ATTR))
    promoted_from = trial.user_attrs.get(PROMOTED_FROM)
    name = f"trial-{trial.number:03d}" + (" (plain DPO baseline)" if baseline else "") + (
        f" (trial {promoted_from} in full)" if promoted_from is not None else "")
    tags = {Tag.STAGE: "trial", TRIAL_TAG: str(trial.number), STUDY_TAG: ctx.study_uid,
            BASELINE_TAG: str(baseline).lower(), Tag.SHAPING: describe(specs),
            **({Tag.DECISIONS_HASH: ctx.decisions_hash} if ctx.decisions_hash else {}),
            **({Tag.AUDIT_RUN: ctx.sources["audit_run_id"]} if ctx.sources.get("audit_run_id") else {}),
            **({Tag.RETRY_OF: str(retry_of(trial))} if retry_of(trial) is not None else {}),
            **({Tag.PROMOTED_FROM: str(promoted_from)} if promoted_from is not None else {})}
    with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        # Every trial param readable in the UI's params table; the shaping as JSON beside it.
        mlflow.log_params(mlflow_params({k: str(v) for k, v in trial.params.items()} | {"n_shaped": len(specs)}))
        mlflow.log_dict({"concepts": specs}, "trial/shaping.json")
        try:
            tcfg = trial_config(ctx.cfg, specs, ctx.sources)
            if promoted_from is None:  # a late promotion was decided on its original's first budget
                _first_budget(trial, ctx, tcfg, baseline)  # raises optuna.TrialPruned when it stops the trial
            out = ctx.runner(tcfg)
            obj = objectives_from_metrics(out.eval_metrics, ctx.cfg.search.objectives)
        except optuna.TrialPruned as exc:
            # a stopped trial is no failure: its run ends FINISHED, tagged PRUNED with where it stopped
            mlflow.set_tag(Tag.TRIAL_STATE, "PRUNED")
            pruned = exc
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            mlflow.set_tag(Tag.ERROR, msg[:4000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            trial.set_user_attr("error", msg[:2000])
            raise
        else:
            pruned = None
            _record_complete(trial, out, obj, specs)
    if pruned is not None:
        raise pruned
    log.info("trial %d (%s): off_target %.4f, on_target %.4f", trial.number, describe(specs), obj["off_target"],
             obj["on_target"])
    return obj["off_target"], obj["on_target"]


def _record_complete(trial: Any, out: Outcome, obj: Mapping[str, float], specs: Sequence[Mapping[str, Any]]) -> None:
    """A complete trial's figures on its (active) run and in the study. The evaluation's metrics go on the
    run too, so the UI's compare view lines a trial up with any evaluate run."""
    mlflow.log_metrics({k: float(v) for k, v in out.eval_metrics.items() if math.isfinite(float(v))}
                       | objective_metrics(obj))
    ids = {Tag.TRAIN_RUN: out.train_run_id, Tag.EVAL_RUN: out.eval_run_id, Tag.MODEL_URI: out.model_uri}
    mlflow.set_tags({k: v for k, v in ids.items() if v} | {Tag.TRIAL_STATE: "COMPLETE"})
    for k, v in {**obj, "train_run_id": out.train_run_id, "eval_run_id": out.eval_run_id,
                 "model_uri": out.model_uri, "shaping": describe(specs)}.items():
        trial.set_user_attr(k, v)


def _first_budget(trial: Any, ctx: TrialContext, tcfg: DictConfig, baseline: bool) -> None:
    """``search.early_stop``: train and evaluate ``tcfg`` at the first budget, record the result on the
    trial (user attr ``first_budget``) and its run (``search/first/*``), and stop the trial (raise
    ``optuna.TrialPruned``) when another trial's first-budget result dominates it beyond noise."""
    es = ctx.cfg.search.get("early_stop")
    if es is None or not es.enabled:
        return
    fcfg, what = first_budget_config(tcfg, es)
    t0 = time.monotonic()
    out = ctx.runner(fcfg)
    seconds = time.monotonic() - t0
    client = mlflow.MlflowClient()
    for rid, stage in ((out.train_run_id, "train"), (out.eval_run_id, "evaluate")):
        if rid:
            client.set_tag(rid, Tag.BUDGET, "first")
            client.set_tag(rid, "mlflow.runName", f"{stage} (first budget)")
    ocfg = ctx.cfg.search.objectives
    obj = objectives_from_metrics(out.eval_metrics, ocfg)
    hw = objective_halfwidths(out.eval_metrics, ocfg)
    me = {"trial": trial.number, "off": obj["off_target"], "on": obj["on_target"], "off_hw": hw["off"],
          "on_hw": hw["on"], "budget": what, "seconds": seconds}
    trial.set_user_attr("first_budget", me)
    mlflow.log_metrics({"search/first/off_target": me["off"], "search/first/on_target": me["on"],
                        "search/first/off_target_hw": me["off_hw"], "search/first/on_target_hw": me["on_hw"]})
    if baseline:
        return
    everyone = trial.study.get_trials(deepcopy=False)  # one storage read serves both rules
    peers = [t for t in everyone
             if t.number != trial.number and "first_budget" in t.user_attrs
             and t.user_attrs["first_budget"].get("budget") == what]
    shaped = [t for t in peers if not t.user_attrs.get(BASELINE_ATTR)]
    # plain DPO's result sets halving's on-target floor; it stops shaped trials only when it may dominate
    others = [t.user_attrs["first_budget"] for t in (peers if bool(es.get("baseline_dominates", True)) else shaped)]
    if str(es.get("rule", "dominance")) == "halving":
        requeued = {int(t.user_attrs[PROMOTED_FROM]) for t in everyone if t.user_attrs.get(PROMOTED_FROM) is not None}
        pending = [t.user_attrs["first_budget"] for t in shaped
                   if t.state == TrialState.PRUNED and t.number not in requeued]
        n_promoted = sum(bool(t.user_attrs.get("promoted")) for t in shaped) + len(requeued)
        base = next((t.user_attrs["first_budget"] for t in peers if t.user_attrs.get(BASELINE_ATTR)), None)
        tol = float(ctx.cfg.promote.get("on_target_tolerance", 0.0)) if ctx.cfg.get("promote") is not None else 0.0
        go, later, reason, by_trial = halving_decision(me, others, pending, n_promoted, len(shaped) + 1, int(es.eta),
                                                       None if base is None else float(base["on"]) - tol)
        by_number = {t.number: t for t in shaped}
        for r in later:  # a stopped trial cannot resume: its parameters are enqueued to train in full
            orig = by_number[int(r["trial"])]
            trial.study.enqueue_trial(dict(orig.params), user_attrs={PROMOTED_FROM: orig.number})
            log.info("search: trial %d (first budget off %.4f, on %.4f), stopped by the quota earlier, is promoted "
                     "now: its parameters are enqueued to train in full", orig.number, r["off"], r["on"])
        if go:
            trial.set_user_attr("promoted", True)
            return
        why = f"stopped at the first budget ({what}): {reason}"
    else:
        if len(others) < int(es.min_results):
            return
        by = dominated_beyond_noise(me, others)
        if by is None:
            return
        by_trial = by["trial"]
        why = (f"stopped at the first budget ({what}): trial {by['trial']} (off {by['off']:.4f}, on {by['on']:.4f}) "
               f"dominates it beyond noise (off {me['off']:.4f} ± {me['off_hw']:.4f}, on {me['on']:.4f} ± "
               f"{me['on_hw']:.4f})")
    trial.set_user_attr("pruned_at", what)
    trial.set_user_attr("pruned_by", by_trial if isinstance(by_trial, str) else int(by_trial))
    mlflow.set_tags({Tag.PRUNED_AT: what, Tag.PRUNED_BY: str(by_trial)})
    log.info("trial %d: %s", trial.number, why)
    raise optuna.TrialPruned(why)
