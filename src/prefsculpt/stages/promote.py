"""The ``promote`` stage: register the policy the documented rule picks, gate it, move the aliases.

The rule and the gates live in :mod:`prefsculpt.search.promote`; this stage reads the trials of
the search's study, registers the pick (alias ``candidate``), and moves ``champion`` only when every
gate passes; the decision, gates and trials are logged on the run and tagged on the version.
The pick comes from the trials' select figures; the gates read the final test figures of the
pipeline's evaluate stage (``promote.evaluate_run_id``, else the latest final evaluation of this
search's pick), which the version and the run carry too (``test/*``, each with its 95% CI).
Registering, reading the champion, gating against it and moving the aliases happen under one lock
per model name (:mod:`prefsculpt.search.lock`), so concurrent promotes compare-then-set in turn.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig

from prefsculpt.core import paths
from prefsculpt.core.names import Tag
from prefsculpt.search.config import check_aliases
from prefsculpt.search.description import version_description
from prefsculpt.search.lock import promotion_lock, resolve_lock
from prefsculpt.search.promote import (
    PromoteInputError,
    PromotionRefused,
    attach_artifacts,
    baseline_gates,
    choose,
    final_baseline_gates,
    find_final_evaluation,
    find_search_run,
    read_champion,
    read_trials,
    refusal_message,
    register,
    skipped_gates,
)
from prefsculpt.tracking.models import trial_model_uri
from prefsculpt.tracking.runs import stage_run

log = logging.getLogger(__name__)


def run_promote(cfg: DictConfig) -> dict[str, Any]:
    pc = cfg.promote
    check_aliases(pc.candidate_alias, pc.champion_alias)
    name = pc.model_name
    with stage_run(cfg, "promote") as run:
        search = find_search_run(pc.search_run_id, cfg.tracking.experiment)
        uid = search.data.tags.get(Tag.STUDY_UID)
        if not uid:
            raise PromoteInputError(f"run {search.info.run_id} is not a search run (no {Tag.STUDY_UID} tag)")
        trials = read_trials(uid)
        if trials.empty:
            raise PromoteInputError(f"search run {search.info.run_id}: no finished trial with objectives")
        base_rows = trials[trials["baseline"]]
        if base_rows.empty:
            raise PromoteInputError("the study's plain-DPO baseline trial has not finished; rerun the search worker")
        b = base_rows.iloc[0]
        base = {"syc_increase": float(b.syc_increase), "on_target": float(b.on_target)}
        pick, _ = choose(trials, base, pc)
        cand = {"syc_increase": float(pick.syc_increase), "on_target": float(pick.on_target),
                "off_target": float(pick.off_target)}
        strict = bool(pc.get("require_distinguishable", True))
        try:
            final, final_run, gate_split = find_final_evaluation(pc.get("evaluate_run_id"), search.info.run_id,
                                                                 str(pick.run_id))
        except mlflow.exceptions.MlflowException as exc:
            raise PromoteInputError(f"promote.evaluate_run_id={pc.get('evaluate_run_id')!r}: {exc}") from exc
        cand_test = None
        if final:  # the gates on the test figures (measured once), with their CIs
            bgates, skipped = final_baseline_gates(final, pc.syc_ratio_max, pc.on_target_tolerance, strict)
            cand_test = {"off_target": final.get("test/off_target", math.nan),
                         "on_target": final.get("test/on_target", math.nan),
                         **{f"on_target_{b}": final[f"test/on_target_{b}"] for b in ("lo", "hi")
                            if f"test/on_target_{b}" in final}}
        else:  # no test evaluation of the pick: the select figures, optimistic for the winner (tagged)
            log.warning("promote: %s; the gates read the trials' select figures (biased upwards for the pick: "
                        "run the pipeline's evaluate stage for test figures)", gate_split)
            gate_split = f"select ({gate_split})"
            skipped = skipped_gates(cand, base)  # a metric the data cannot produce: recorded, never a pass
            bgates = [g for g in baseline_gates(cand, base, pc.syc_ratio_max, pc.on_target_tolerance)
                      if g.name not in skipped]
        # A trial that logged only its trained layers (a policy delta, issue 17.4): its full model is
        # assembled and logged here, before the lock, so register() has a model to register.
        pick = pick.copy()
        pick["model_uri"] = trial_model_uri(pick.run_id, pick.get("train_run_id"), pick.get("model_uri"),
                                            cfg.get("model"), paths.cache_root(cfg.get("cache_dir")))
        spec = resolve_lock(pc.get("lock"), mlflow.get_tracking_uri(), cfg.get("search", {}).get("storage"), name,
                            paths.cache_root(cfg.get("cache_dir")) / "locks")
        mlflow.set_tag(Tag.PROMOTE_LOCK, spec.describe())
        # Register, read the champion, compare and move the aliases under one lock: no other promote of
        # this model can move champion between our read and our write (search/lock.py says which lock).
        with promotion_lock(spec, float(pc.get("lock_timeout_s", 600.0))):
            mv = register(name, pick)
            champ_mv, cgates = read_champion(name, pc.champion_alias, cand, pc.champion_tolerance, cand_test, strict)
            gates = bgates + cgates
            weak = {g.name: g.underpowered for g in gates if g.underpowered}
            refusal = refusal_message(gates, pc.champion_alias)
            client = mlflow.MlflowClient()
            tags = {Tag.TRIAL_RUN: pick.run_id, Tag.TRIAL_NUMBER: int(pick.trial), Tag.SEARCH_RUN: search.info.run_id,
                    Tag.STUDY_UID: uid, Tag.PROMOTE_RUN: run.info.run_id, Tag.AUDIT_RUN: pick.audit_run_id or "",
                    Tag.DECISIONS_HASH: pick.decisions_hash or "", Tag.TRAIN_RUN: pick.train_run_id or "",
                    Tag.EVAL_RUN: pick.eval_run_id or "", Tag.SHAPING: pick.shaping,
                    Tag.OFF_TARGET: f"{cand['off_target']:.6g}", Tag.ON_TARGET: f"{cand['on_target']:.6g}",
                    Tag.SYC_INCREASE: f"{cand['syc_increase']:.6g}",
                    Tag.BASELINE_SYC_INCREASE: f"{base['syc_increase']:.6g}",
                    Tag.BASELINE_ON_TARGET: f"{base['on_target']:.6g}", Tag.BASELINE_TRIAL_RUN: str(b.run_id),
                    Tag.GATES: "passed" if refusal is None else "failed",
                    Tag.PROMOTE_DECISION: pc.champion_alias if refusal is None else "refused",
                    Tag.PREVIOUS_CHAMPION: ("unreadable" if any(g.error for g in cgates) else
                                            "none" if champ_mv is None else str(champ_mv.version)),
                    Tag.REFUSAL: (refusal or "")[:5000],
                    **{f"{Tag.GATE_PREFIX}{g.name}": (f"FAIL ({g.error[:400]})" if g.error else
                                                      f"{'pass' if g.passed else 'FAIL'} (margin {g.margin:+.4g}"
                                                      + (f", CI{g.ci_text()}, {g.status}" if g.ci_text() else "")
                                                      + (", underpowered" if g.underpowered else "") + ")")
                       for g in gates},
                    **{f"{Tag.GATE_PREFIX}{n}": why for n, why in skipped.items()},
                    Tag.GATE_SPLIT: gate_split[:5000], **final_tags(final),
                    **({Tag.FINAL_EVAL_RUN: final_run} if final and final_run else {}),
                    **({Tag.UNDERPOWERED: "; ".join(f"{k}: {v}" for k, v in weak.items())[:5000]} if weak else {})}
            for k, v in tags.items():
                client.set_model_version_tag(name, mv.version, k, str(v))
            # Description (issue 16): headline metrics, gates and the glossary of the trial run's metric keys.
            client.update_model_version(name, mv.version, description=version_description(
                int(pick.trial), pick.shaping, {**client.get_run(pick.run_id).data.metrics, **final}, gates, refusal,
                base))
            client.set_registered_model_alias(name, pc.candidate_alias, mv.version)
            if refusal is None:
                client.set_registered_model_alias(name, pc.champion_alias, mv.version)
        if refusal is None:
            log.info("promote: %s version %s is now %s and %s (trial %d: %s)", name, mv.version, pc.candidate_alias,
                     pc.champion_alias, pick.trial, pick.shaping)
        else:
            log.warning("promote: %s version %s is %s; %s", name, mv.version, pc.candidate_alias, refusal)
        if weak:
            log.warning("promote: gate(s) underpowered, the test set is too small to decide them: %s", weak)
        mlflow.set_tags({Tag.MODEL_NAME: name, Tag.MODEL_VERSION: str(mv.version), Tag.PROMOTED: str(refusal is None).lower(),
                         Tag.SEARCH_RUN: search.info.run_id, Tag.GATE_SPLIT: gate_split[:5000],
                         **({Tag.REFUSAL: refusal[:5000]} if refusal else {}),
                         **({Tag.UNDERPOWERED: "; ".join(f"{k}: {v}" for k, v in weak.items())[:5000]} if weak else {})})
        figures = {"promote/off_target": cand["off_target"], "promote/on_target": cand["on_target"],
                   "promote/syc_increase": cand["syc_increase"], "promote/promoted": float(refusal is None),
                   "promote/baseline_syc_increase": base["syc_increase"], "promote/baseline_on_target": base["on_target"]}
        figures |= final  # the final test figures (test/*), with their CIs
        mlflow.log_metrics({k: v for k, v in figures.items() if math.isfinite(v)})  # an unmeasured one stays out
        mlflow.log_table(pd.DataFrame([asdict(g) for g in gates]), "promote/gates.json")
        mlflow.log_table(trials, "promote/trials.json")
        mlflow.log_text(json.dumps({"pick": int(pick.trial), "version": str(mv.version), "refusal": refusal,
                                    "gates": [g.text() for g in gates], "skipped": skipped}, indent=2),
                      "promote/decision.json")
        attach_artifacts(pick.audit_run_id, final_run if final else pick.eval_run_id)
    result = {"run_id": run.info.run_id, "model_name": name, "version": str(mv.version), "trial": int(pick.trial),
              "promoted": refusal is None, "refusal": refusal, "gates": [asdict(g) for g in gates], "skipped": skipped,
              "gate_split": gate_split, "final": final, "underpowered": weak,
              "previous_champion": None if champ_mv is None else str(champ_mv.version)}
    if refusal is not None and pc.fail_on_refusal:
        raise PromotionRefused(refusal)
    return result


def final_tags(final: dict[str, float]) -> dict[str, str]:
    """The version's tags of the final test figures: ``prefsculpt.test.<figure>`` = the value (what
    the next promote's champion gates compare with) and ``….ci`` = "[lo, hi] (n=…)"."""
    out = {}
    for k, v in final.items():
        fig = k.removeprefix("test/")
        if fig.startswith("n/") or fig.endswith(("_lo", "_hi")):
            continue
        out[f"{Tag.TEST_PREFIX}{fig}"] = f"{v:.6g}"
        lo, hi, n = final.get(f"{k}_lo"), final.get(f"{k}_hi"), final.get(f"test/n/{fig}")
        if lo is not None and hi is not None:
            out[f"{Tag.TEST_PREFIX}{fig}.ci"] = f"[{lo:.4g}, {hi:.4g}]" + (f" (n={int(n)})" if n is not None else "")
    return out
