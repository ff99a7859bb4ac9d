"""The search on the tiny random llama with real training and evaluation: two trials (plain DPO
first), each a trial run with train and evaluate children at the early stop's first budget and at
the full one; then promote registers one of them.

The audit run is a stand-in holding a hypotheses table over concepts training can shape without an
SAE (the regex concept ``named:stock_flattery`` and the built-in ``length``), so this test exercises
search + train + evaluate + promote, not the sae/audit stages.
"""

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf

from prefsculpt.config import CONF_DIR as CONF
from prefsculpt.core import glossary as G
from prefsculpt.search.config import PromoteConfig, SearchConfig
from tests.unit.search.helpers import fake_audit_run

pytestmark = pytest.mark.integration


def tiny_cfg(tmp_path):
    from prefsculpt.config import compose

    cfg = compose("experiment=tiny eval.evals=[sycophancy,capability] eval.bootstrap=50 eval.capability.known_answer=0 "
                  "eval.capability.kl=false train.max_pairs=8")
    OmegaConf.set_struct(cfg, False)
    search = OmegaConf.load(CONF / "search" / "tiny.yaml")
    search.pop("defaults", None)
    cfg.search = OmegaConf.merge(OmegaConf.structured(SearchConfig), search,
                                 {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "top_k": 2, "n_trials": 2,
                                  "objectives": {"style_weight": 0.0},
                                  # both budgets of both trials run: the dominance rule needs 2 other results
                                  # first (halving could stop trial 1 should plain DPO dominate it on a random model)
                                  "early_stop": {"rule": "dominance"}})
    cfg.promote = OmegaConf.merge(OmegaConf.structured(PromoteConfig), {"model_name": "tiny-policy"})
    cfg.cache_dir = str(tmp_path / "cache")
    return cfg


def test_search_real_trials_then_promote(mlflow_uri, tmp_path, monkeypatch):
    from prefsculpt.stages.promote import run_promote
    from prefsculpt.stages.search import run_search

    cfg = tiny_cfg(tmp_path)
    fake_audit_run(tmp_path, experiment=str(cfg.tracking.experiment))
    out = run_search(cfg)
    study = optuna.load_study(study_name=str(cfg.search.study_name), storage=str(cfg.search.storage))
    states = [t.state.name for t in study.get_trials()]
    errors = [t.user_attrs.get("error") for t in study.get_trials() if t.state.name == "FAIL"]
    assert states == ["COMPLETE"] * 2, errors
    assert study.get_trials()[0].user_attrs["prefsculpt.baseline"]
    client = mlflow.MlflowClient()
    for t in study.get_trials():
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == out["run_id"]
        assert {"search/off_target", "search/on_target"} <= set(run.data.metrics)
        kids = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        # the early stop's first budget (issue 17.2), then the full one
        assert sorted((k.data.tags["prefsculpt.stage"], k.data.tags.get("prefsculpt.budget", "full")) for k in kids) == [
            ("evaluate", "first"), ("evaluate", "full"), ("train", "first"), ("train", "full")]
        assert run.data.tags["prefsculpt.trial_state"] == "COMPLETE" and "search/first/off_target" in run.data.metrics
        # a trial logs its trained layers only (issue 17.4); the Pareto front gets full models afterwards
        tr = client.get_run(run.data.tags["prefsculpt.train_run_id"])
        assert tr.data.tags["prefsculpt.log_policy"] == "delta" and not t.user_attrs.get("model_uri")
        on_front = t.number in {int(r["trial"]) for r in out["pareto"]}
        assert run.data.tags.get("prefsculpt.model_uri") == out["front_models"].get(t.number)
        assert run.data.tags.get("prefsculpt.model_uri", "").startswith("models:/") == on_front
        # the trial carries its evaluation's metrics: one key set for the UI's compare view
        ev = client.get_run(run.data.tags["prefsculpt.eval_run_id"]).data.metrics
        own = {k for k in run.data.metrics if not k.startswith("search/first/")}
        assert own == set(ev) and run.data.metrics["search/off_target"] == ev["search/off_target"]
        assert G.unknown(set(run.data.metrics)) == []
    res = run_promote(cfg)
    mv = client.get_model_version_by_alias("tiny-policy", "candidate")
    assert str(mv.version) == res["version"] and mv.tags["prefsculpt.trial_number"] == str(res["trial"])
    assert res["trial"] != 0  # never the baseline itself
    assert "search/off_target" in mv.description and "Metric glossary" in mv.description
    # The registered policy is a servable transformers chat model: load it by alias and ask it.
    pyf = mlflow.pyfunc.load_model("models:/tiny-policy@candidate")
    reply = pyf.predict({"messages": [{"role": "user", "content": "What is 7 times 8?"}], "max_tokens": 5})[0]
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] <= 5
    assert pyf.metadata.flavors["transformers"]["task"] == "llm/v1/chat" or \
        pyf.metadata.metadata["task"] == "llm/v1/chat"
