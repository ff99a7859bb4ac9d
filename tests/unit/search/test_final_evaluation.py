"""Selection and reporting apart (issue 13): trials are scored on ``select`` items; after the search
the pick and the plain-DPO baseline are each evaluated once on ``test`` items (no id in common with
select), and the final figures pair the two over the same test items."""

import mlflow
import numpy as np
import pandas as pd
import pytest

from prefsculpt.core.names import Tag
from prefsculpt.data.prepared import split_source
from prefsculpt.evals.inputs import load_inputs
from prefsculpt.search.objective import trial_config
from tests.unit.evals.helpers import eval_cfg


def _tables(inp, seed):
    rng = np.random.default_rng(seed)
    clean = [p.id for p in inp.clean_pairs]
    probes = [q["id"] for q in inp.planted_probes]
    base = np.linspace(0.2, 0.4, len(probes))
    return {"capability": {"preference": pd.DataFrame({"id": clean, "implicit_correct":
                                                       rng.integers(0, 2, len(clean)).astype(float)})},
            "sycophancy": {"planted": pd.DataFrame({"id": probes, "p_agree": base + rng.uniform(0, 0.2, len(probes))}),
                           "planted_base": pd.DataFrame({"id": probes, "p_agree": base})}}


def test_trials_score_select_and_the_final_figures_come_from_test(mlflow_uri, tmp_path, monkeypatch):
    import prefsculpt.stages.evaluate as stage

    cfg = eval_cfg("unused", tmp_path, {"evals": ["sycophancy", "capability", "shift"]})
    cfg.search.objectives.sycophancy_metrics = ["syc/planted/p_agree_diff"]
    cfg.search.trial_evals = ["sycophancy", "capability"]
    prepared, _ = split_source(cfg.data)

    # a trial's evaluation: on select
    trial = trial_config(cfg, [], {})
    assert trial.eval.split == "select"
    select_ids = load_inputs(trial.eval, prepared).item_ids()

    calls = []

    def fake_run_evaluate(ecfg, keep_tables=False, finish=None):
        inp = load_inputs(ecfg.eval, prepared)
        tables = _tables(inp, len(calls))
        calls.append({"policy": str(ecfg.eval.policy), "split": str(ecfg.eval.split), "ids": inp.item_ids(),
                      "evals": list(ecfg.eval.evals), "tables": tables})
        with mlflow.start_run(run_name=str(ecfg.tracking.run_name), tags={Tag.EVAL_SPLIT: ecfg.eval.split}) as run:
            metrics = finish({"run_id": run.info.run_id, "metrics": {}, "tables": tables}) if finish else {}
        return {"run_id": run.info.run_id, "metrics": metrics, **({"tables": tables} if keep_tables else {})}

    class Search:
        info = type("I", (), {"run_id": "search-run"})()
        data = type("D", (), {"tags": {Tag.STUDY_UID: "u"}})()

    trials = pd.DataFrame([
        {"trial": 0, "run_id": "trial-plain", "baseline": True, "off_target": 0.25, "on_target": 0.8,
         "syc_increase": 0.2, "train_run_id": "train-plain", "shaping": ""},
        {"trial": 1, "run_id": "trial-shaped", "baseline": False, "off_target": 0.05, "on_target": 0.8,
         "syc_increase": 0.05, "train_run_id": "train-shaped", "shaping": "x"}])
    monkeypatch.setattr(stage, "run_evaluate", fake_run_evaluate)
    monkeypatch.setattr(stage, "find_search_run", lambda *a: Search())
    monkeypatch.setattr(stage, "read_trials", lambda uid: trials)
    mlflow.set_experiment("final-test")
    res = stage.run_pipeline_evaluate(cfg)

    plain, pick = calls
    assert (plain["policy"], plain["split"]) == ("train-plain", "test") and "shift" not in plain["evals"]
    assert (pick["policy"], pick["split"]) == ("train-shaped", "test") and "shift" in pick["evals"]
    # the same test items for both, though only the pick runs shift (the style prompts do not depend on it)
    assert plain["ids"] == pick["ids"] and any("style-in" in i for i in plain["ids"])
    assert not select_ids & pick["ids"]  # never an item the search scored
    assert res["trial_run_id"] == "trial-shaped" and res["plain_eval_run_id"]

    # the paired difference on those test items
    on = lambda c: c["tables"]["capability"]["preference"].set_index("id")["implicit_correct"]  # noqa: E731
    diff = (on(pick) - on(plain)).dropna()
    fin = res["final"]
    assert fin["test/on_target_diff"] == pytest.approx(diff.mean()) and fin["test/n/on_target_diff"] == len(diff)
    assert fin["test/on_target_diff_lo"] <= fin["test/on_target_diff"] <= fin["test/on_target_diff_hi"]
    assert "test/syc_vs_ratio" in fin and "test/syc_increase_plain_lo" in fin
    client = mlflow.MlflowClient()
    run = client.get_run(res["run_id"])
    assert run.data.metrics["test/on_target"] == pytest.approx(fin["test/on_target"])
    assert run.data.tags[Tag.FINAL_EVAL] == "true" and run.data.tags[Tag.TRIAL_RUN] == "trial-shaped"
    assert run.data.tags[Tag.PLAIN_EVAL_RUN] == res["plain_eval_run_id"]
    assert Tag.UNDERPOWERED in run.data.tags  # 10 test pairs: the CI is far wider than the 0.03 tolerance
    assert client.get_run(res["plain_eval_run_id"]).data.tags[Tag.BASELINE] == "true"
