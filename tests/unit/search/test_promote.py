"""Promotion: the documented pick, the gates against plain DPO and the champion (with margins), and
aliases that move only when every gate passes — on a sqlite MLflow store with a tiny pyfunc model."""

import mlflow
import pandas as pd
import pytest
from omegaconf import OmegaConf

from prefsculpt.search.config import PromoteConfig
from prefsculpt.search.promote import (
    PromotionRefused,
    baseline_gates,
    champion_gates,
    choose,
    refusal_message,
)
from prefsculpt.stages.promote import run_promote
from tests.unit.search.helpers import compose_cfg

PC = OmegaConf.structured(PromoteConfig)
BASE = {"syc_increase": 0.20, "on_target": 0.80}


def test_baseline_gates_pass_at_half_and_fail_with_margins():
    ok = baseline_gates({"syc_increase": 0.10, "on_target": 0.77}, BASE, 0.5, 0.03)  # exactly on both limits
    assert all(g.passed for g in ok) and refusal_message(ok) is None
    bad = baseline_gates({"syc_increase": 0.13, "on_target": 0.75}, BASE, 0.5, 0.03)
    assert [g.passed for g in bad] == [False, False]
    msg = refusal_message(bad)
    assert "sycophancy_vs_baseline failed by 0.0300" in msg and "on_target_vs_baseline failed by 0.0200" in msg


def test_champion_gates():
    assert champion_gates({"off_target": 0.3, "on_target": 0.5}, None, 0.0) == []
    g = champion_gates({"off_target": 0.12, "on_target": 0.81}, {"off_target": 0.10, "on_target": 0.80}, 0.0)
    assert [x.passed for x in g] == [False, True] and g[0].margin == pytest.approx(-0.02)


def frame(rows):
    return pd.DataFrame(rows, columns=["trial", "baseline", "off_target", "on_target", "syc_increase"])


def test_choose_lowest_off_target_among_passing_pareto_trials():
    df = frame([(0, True, 0.25, 0.80, 0.20),   # plain DPO: never the pick
                (1, False, 0.02, 0.70, 0.01),  # lowest off-target but fails on-target (0.70 < 0.77)
                (2, False, 0.08, 0.79, 0.06),  # passes: the pick
                (3, False, 0.08, 0.78, 0.06),  # dominated by 2
                (4, False, 0.15, 0.82, 0.12)])  # on the front, fails sycophancy (0.12 > 0.10)
    pick, passed = choose(df, BASE, PC)
    assert pick.trial == 2 and passed
    pick, passed = choose(df[df.trial.isin([0, 1, 4])], BASE, PC)  # none passes: lowest off on the front
    assert pick.trial == 1 and not passed


def test_choose_a_passing_trial_even_when_a_failing_one_dominates_it():
    df = frame([(0, True, 0.25, 0.80, 0.20),
                (1, False, 0.05, 0.85, 0.12),   # dominates 2 (style drift lowers its off-target) but fails sycophancy
                (2, False, 0.09, 0.79, 0.08)])  # off the global front, passes both gates: the pick
    pick, passed = choose(df, BASE, PC)
    assert pick.trial == 2 and passed


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def fake_search(uid: str, trials: list[tuple], model_uri: str) -> str:
    """A finished search run with finished trial children carrying objectives (as run_trial logs them)."""
    with mlflow.start_run(run_name="search", tags={"prefsculpt.stage": "search", "prefsculpt.study_uid": uid}) as s:
        for num, base, off, on, syc in trials:
            tags = {"prefsculpt.stage": "trial", "prefsculpt.study_uid": uid, "prefsculpt.trial_number": str(num),
                    "prefsculpt.baseline": str(base).lower(), "prefsculpt.model_uri": model_uri,
                    "prefsculpt.audit_run_id": "a" * 32, "prefsculpt.decisions_hash": "d" * 64,
                    "prefsculpt.shaping": "plain DPO" if base else f"latent:{num} score suppress λ=1"}
            with mlflow.start_run(run_name=f"trial-{num}", nested=True, tags=tags):
                mlflow.log_metrics({"search/off_target": off, "search/on_target": on, "search/syc_increase": syc})
    return s.info.run_id


def test_alias_moves_only_when_gates_pass(mlflow_uri, tmp_path):
    cfg = compose_cfg(tmp_path)
    mlflow.set_experiment("search-test")
    with mlflow.start_run(run_name="train"):
        uri = mlflow.pyfunc.log_model(name="policy", python_model=Echo(), pip_requirements=[]).model_uri
    client = mlflow.MlflowClient()
    name = str(cfg.promote.model_name)

    # 1. passes both baseline gates, no champion yet: candidate and champion
    fake_search("s1", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.08, 0.79, 0.06)], uri)
    r1 = run_promote(cfg)
    assert r1["promoted"] and r1["trial"] == 1 and r1["refusal"] is None
    v1 = client.get_model_version_by_alias(name, "champion")
    v1_s = str(v1.version)
    assert v1_s == r1["version"] == str(client.get_model_version_by_alias(name, "candidate").version)
    assert v1.tags["prefsculpt.audit_run_id"] == "a" * 32 and v1.tags["prefsculpt.decisions_hash"] == "d" * 64
    assert float(v1.tags["prefsculpt.syc_increase"]) == pytest.approx(0.06)
    assert float(v1.tags["prefsculpt.baseline_syc_increase"]) == pytest.approx(0.20)
    # the version explains itself: headline metrics with their direction, and the glossary
    assert "trial 1 (latent:1 score suppress λ=1). All promotion gates passed." in v1.description
    assert "| `search/off_target` | 0.08 | ↓ lower |" in v1.description
    assert "- `search/on_target` (↑ higher): objective: on-target" in v1.description

    # 2. fails the baseline gates: becomes candidate, champion stays; the refusal names gates and margins
    fake_search("s2", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.15, 0.75, 0.13)], uri)
    r2 = run_promote(cfg)
    assert not r2["promoted"] and r2["version"] != v1_s
    assert "sycophancy_vs_baseline failed by 0.0300" in r2["refusal"]
    assert "on_target_vs_baseline failed by 0.0200" in r2["refusal"]
    assert str(client.get_model_version_by_alias(name, "candidate").version) == r2["version"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1_s
    assert client.get_model_version(name, r2["version"]).tags["prefsculpt.gates"] == "failed"

    # 3. passes its own baseline but is worse than the champion's off-target (0.08): refused, raised on request
    fake_search("s3", [(0, True, 0.40, 0.80, 0.30), (1, False, 0.10, 0.80, 0.09)], uri)
    cfg.promote.fail_on_refusal = True
    with pytest.raises(PromotionRefused, match=r"off_target_vs_champion failed by 0\.0200"):
        run_promote(cfg)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1_s

    # 4. better than the champion on both: champion moves
    fake_search("s4", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.05, 0.81, 0.04)], uri)
    r4 = run_promote(cfg)
    assert r4["promoted"] and r4["previous_champion"] == v1_s
    assert str(client.get_model_version_by_alias(name, "champion").version) == r4["version"]
    m = mlflow.pyfunc.load_model(f"models:/{name}@champion")  # the registered policy loads
    assert m.predict(pd.DataFrame({"q": ["x"]}))["q"].tolist() == ["x"]


def test_candidate_and_champion_aliases_must_differ(mlflow_uri, tmp_path):
    from prefsculpt.search.config import PromoteConfigError

    with pytest.raises(PromoteConfigError, match="candidate_alias and promote.champion_alias are both 'champion'"):
        PromoteConfig(candidate_alias="champion")
    cfg = compose_cfg(tmp_path)
    cfg.promote.candidate_alias = "Champion"  # aliases compare without case
    with pytest.raises(PromoteConfigError, match="give them different names"):
        run_promote(cfg)
    assert mlflow.search_runs(search_all_experiments=True).empty  # refused before any run was opened


def _logged_model() -> str:
    mlflow.set_experiment("search-test")
    with mlflow.start_run(run_name="train"):
        return mlflow.pyfunc.log_model(name="policy", python_model=Echo(), pip_requirements=[]).model_uri


def test_gates_fail_closed_when_the_champion_cannot_be_read(mlflow_uri, tmp_path, monkeypatch):
    cfg = compose_cfg(tmp_path)
    uri = _logged_model()
    client = mlflow.MlflowClient()
    fake_search("s1", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.08, 0.79, 0.06)], uri)
    assert run_promote(cfg)["promoted"]
    champion = str(client.get_model_version_by_alias(cfg.promote.model_name, "champion").version)

    # the registry call behind the champion gates fails: the gates fail, naming the error; champion stays
    def broken(self, name, alias):
        raise mlflow.exceptions.MlflowException("registry unavailable (simulated)")

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", broken)
    fake_search("s2", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.01, 0.90, 0.01)], uri)  # better on both
    r = run_promote(cfg)
    assert not r["promoted"]
    assert "off_target_vs_champion failed closed" in r["refusal"] and "registry unavailable (simulated)" in r["refusal"]
    monkeypatch.undo()
    assert str(client.get_model_version_by_alias(cfg.promote.model_name, "champion").version) == champion
    tags = client.get_model_version(cfg.promote.model_name, r["version"]).tags
    assert tags["prefsculpt.promote_decision"] == "refused" and tags["prefsculpt.gates"] == "failed"
    assert tags["prefsculpt.previous_champion"] == "unreadable"
    assert tags["prefsculpt.gate.on_target_vs_champion"].startswith("FAIL (MlflowException: registry unavailable")


def test_a_gate_on_a_missing_metric_fails_closed():
    gates = baseline_gates({"syc_increase": float("nan"), "on_target": 0.9}, BASE, 0.5, 0.03)
    assert [g.passed for g in gates] == [False, True] and "not a finite number" in gates[0].error
    broken = baseline_gates({"on_target": 0.9}, BASE, 0.5, 0.03)  # no syc_increase at all
    assert [g.passed for g in broken] == [False, False] and all("KeyError" in g.error for g in broken)
    assert "sycophancy_vs_baseline failed closed" in refusal_message(broken)


def test_two_racing_promotes_leave_champion_on_the_better_version(mlflow_uri, tmp_path, monkeypatch):
    """Both read 'no champion' before either writes unless promotion is serialised: the read of the
    champion is slowed, the worse pick's most, so without the lock it would write last and win."""
    import threading
    import time

    import prefsculpt.stages.promote as stage

    uri = _logged_model()
    good = fake_search("good", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.05, 0.81, 0.04)], uri)
    bad = fake_search("bad", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.08, 0.79, 0.06)], uri)
    real = stage.read_champion

    def slow_read(name, alias, cand, tol, *rest):
        out = real(name, alias, cand, tol, *rest)
        time.sleep(0.5 if cand["off_target"] < 0.06 else 2.0)
        return out

    monkeypatch.setattr(stage, "read_champion", slow_read)
    results, errors = {}, []

    def promote(label, search_run):
        try:
            cfg = compose_cfg(tmp_path)
            cfg.promote.search_run_id = search_run
            results[label] = run_promote(cfg)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=a) for a in (("bad", bad), ("good", good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    client = mlflow.MlflowClient()
    name = str(compose_cfg(tmp_path).promote.model_name)
    vg, vb = results["good"]["version"], results["bad"]["version"]
    assert vg != vb and str(client.get_model_version_by_alias(name, "champion").version) == vg
    tg, tb = client.get_model_version(name, vg).tags, client.get_model_version(name, vb).tags
    assert tg["prefsculpt.promote_decision"] == "champion"
    # each decided after seeing the other's outcome: serialised, whichever went first
    if tb["prefsculpt.promote_decision"] == "champion":  # bad first, then good beat it
        assert tb["prefsculpt.previous_champion"] == "none" and tg["prefsculpt.previous_champion"] == vb
    else:  # good first, bad refused against it
        assert tb["prefsculpt.promote_decision"] == "refused" and tb["prefsculpt.previous_champion"] == vg
        assert "off_target_vs_champion failed by 0.0300" in tb["prefsculpt.refusal"]
        assert tg["prefsculpt.previous_champion"] == "none"
    lock = client.get_run(results["good"]["run_id"]).data.tags["prefsculpt.promote_lock"]
    assert lock.startswith("file lock on ") and lock.split(" on ")[1].startswith(str(tmp_path / "mlflow.db"))


def test_a_gate_whose_metric_was_never_measured_is_skipped_with_its_reason():
    import math

    from prefsculpt.search.promote import skipped_gates

    base = {"syc_increase": math.nan, "on_target": 0.6}
    skip = skipped_gates({"syc_increase": math.nan, "on_target": 0.7}, base)
    assert list(skip) == ["sycophancy_vs_baseline"] and skip["sycophancy_vs_baseline"].startswith("skipped: ")
    assert skipped_gates({"syc_increase": 0.1, "on_target": 0.7}, {"syc_increase": 0.2, "on_target": 0.6}) == {}


def test_objectives_without_any_sycophancy_metric_use_the_style_drift_alone():
    import math

    import pytest

    from prefsculpt.search.config import ObjectivesConfig
    from prefsculpt.search.objective import ObjectiveError, objectives_from_metrics

    oc = ObjectivesConfig()
    got = objectives_from_metrics({"style/emoji/rate_diff": -0.2, "style/bold/rate_diff": 0.4,
                                   "cap/pref/implicit_acc": 0.7}, oc)
    assert math.isnan(got["syc_increase"]) and got["off_target"] == pytest.approx(0.5 * 0.3)
    assert got["on_target"] == 0.7
    # a sycophancy metric that exists but is not listed is still a configuration error
    with pytest.raises(ObjectiveError, match="none of"):
        objectives_from_metrics({"syc/opinion/x/p_match_diff": 0.1, "cap/pref/implicit_acc": 0.7}, oc)
    shipped = objectives_from_metrics({"syc/opinion/anthropic_sycophancy_150/p_match_diff": 0.08,
                                       "style/emoji/rate_diff": 0.0, "cap/pref/implicit_acc": 0.6}, oc)
    assert shipped["syc_increase"] == pytest.approx(0.08) and shipped["off_target"] == pytest.approx(0.08)
