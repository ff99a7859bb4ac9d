"""Promotion gates on the final test figures (issue 13): the pick comes from the select figures,
the gates read test, a CI across a limit is "not distinguishable" (never a pass on noise), and a
CI wider than the gate's tolerance marks the gate underpowered."""

import math

import mlflow
import pytest

from prefsculpt.core.names import Tag
from prefsculpt.search.promote import INDISTINCT, final_baseline_gates, refusal_message
from prefsculpt.stages.promote import run_promote
from tests.unit.search.helpers import compose_cfg
from tests.unit.search.test_promote import _logged_model, fake_search


def final(on_diff=(0.01, -0.02, 0.04), syc=(-0.05, -0.08, -0.02), plain_syc=0.2, n=200):
    out = {"test/on_target": 0.8, "test/on_target_lo": 0.75, "test/on_target_hi": 0.85, "test/on_target_plain": 0.79,
           "test/n/on_target_diff": float(n), "test/syc_increase_plain": plain_syc, "test/off_target": 0.05}
    for k, (v, lo, hi) in (("test/on_target_diff", on_diff), ("test/syc_vs_ratio", syc)):
        out.update({k: v, f"{k}_lo": lo, f"{k}_hi": hi})
    return out


def test_gates_pass_only_when_the_whole_ci_is_on_the_passing_side():
    gates, skipped = final_baseline_gates(final(), 0.5, 0.03)
    assert not skipped and [g.status for g in gates] == ["pass", "pass"] and all(g.passed for g in gates)
    assert not any(g.underpowered for g in gates)

    # on-target point value passes (0.01 > -0.03) but the CI reaches -0.10: not distinguishable, not passed
    noisy = final(on_diff=(0.01, -0.10, 0.12))
    gates, _ = final_baseline_gates(noisy, 0.5, 0.03)
    on = gates[1]
    assert on.status == INDISTINCT and not on.passed and on.margin > 0
    assert on.underpowered and "too small" in on.underpowered  # half-width 0.11 > tolerance 0.03
    assert "on_target_vs_baseline not distinguishable" in refusal_message(gates)
    # unless asked to pass on the point value: still labelled
    lax, _ = final_baseline_gates(noisy, 0.5, 0.03, strict=False)
    assert lax[1].passed and lax[1].status == INDISTINCT and "NOT DISTINGUISHABLE" in lax[1].text()

    clearly_worse = final(on_diff=(-0.15, -0.2, -0.1))
    gates, _ = final_baseline_gates(clearly_worse, 0.5, 0.03)
    assert gates[1].status == "fail" and not gates[1].passed


def test_gates_without_test_sycophancy_skip_it_and_missing_figures_fail_closed():
    f = {k: v for k, v in final().items() if "syc" not in k}
    gates, skipped = final_baseline_gates(f, 0.5, 0.03)
    assert [g.name for g in gates] == ["on_target_vs_baseline"] and "sycophancy_vs_baseline" in skipped
    broken, _ = final_baseline_gates({"test/syc_vs_ratio": 0.0}, 0.5, 0.03)
    assert all(not g.passed and g.error for g in broken)


def _final_eval_run(search_run: str, trial_run: str, figures: dict[str, float]) -> str:
    with mlflow.start_run(run_name="evaluate pick (test)", tags={
            Tag.STAGE: "evaluate", Tag.SEARCH_RUN: search_run, Tag.EVAL_SPLIT: "test", Tag.FINAL_EVAL: "true",
            Tag.TRIAL_RUN: trial_run}) as r:
        mlflow.log_metrics(figures)
    return r.info.run_id


def _trial_run(uid: str, number: int) -> str:
    runs = mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.MlflowClient().search_experiments()],
        f"tags.`prefsculpt.study_uid` = '{uid}' and tags.`prefsculpt.trial_number` = '{number}'")
    return runs[0].info.run_id


def test_promote_gates_on_the_test_figures_and_the_version_carries_them(mlflow_uri, tmp_path):
    uri = _logged_model()
    cfg = compose_cfg(tmp_path)
    client = mlflow.MlflowClient()
    name = str(cfg.promote.model_name)

    # select figures pass both baseline gates; on test the on-target difference is inside the noise
    s1 = fake_search("t1", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.08, 0.79, 0.06)], uri)
    ev = _final_eval_run(s1, _trial_run("t1", 1), final(on_diff=(0.01, -0.10, 0.12), n=30))
    cfg.promote.search_run_id = s1
    r = run_promote(cfg)
    assert r["gate_split"] == "test" and not r["promoted"]
    assert "on_target_vs_baseline not distinguishable" in r["refusal"]
    v = client.get_model_version(name, r["version"]).tags
    assert v[Tag.GATE_SPLIT] == "test" and v[Tag.FINAL_EVAL_RUN] == ev and "on_target_vs_baseline" in v[Tag.UNDERPOWERED]
    assert float(v["prefsculpt.test.on_target_diff"]) == pytest.approx(0.01)
    assert v["prefsculpt.test.on_target_diff.ci"] == "[-0.1, 0.12] (n=30)"
    assert float(v[Tag.TEST_ON_TARGET]) == pytest.approx(0.8) and "not distinguishable" in v[
        "prefsculpt.gate.on_target_vs_baseline"]
    run = client.get_run(r["run_id"])
    assert run.data.metrics["test/on_target_diff_lo"] == pytest.approx(-0.10)
    assert run.data.tags[Tag.GATE_SPLIT] == "test" and Tag.UNDERPOWERED in run.data.tags
    assert "[-0.1, 0.12]" in client.get_model_version(name, r["version"]).description

    # a clear test result passes, and the champion's test figures are what the next one is compared with
    s2 = fake_search("t2", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.08, 0.79, 0.06)], uri)
    _final_eval_run(s2, _trial_run("t2", 1), final())
    cfg.promote.search_run_id = s2
    r2 = run_promote(cfg)
    assert r2["promoted"] and r2["gate_split"] == "test" and not r2["underpowered"]

    s3 = fake_search("t3", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.01, 0.90, 0.01)], uri)  # better on select
    worse = final() | {"test/on_target": 0.70, "test/on_target_lo": 0.65, "test/on_target_hi": 0.75}
    _final_eval_run(s3, _trial_run("t3", 1), worse)
    cfg.promote.search_run_id = s3
    r3 = run_promote(cfg)
    assert not r3["promoted"] and "on_target_vs_champion" in r3["refusal"] and "on test" in r3["refusal"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == r2["version"]


def test_without_a_test_evaluation_the_gates_say_they_read_select(mlflow_uri, tmp_path):
    uri = _logged_model()
    cfg = compose_cfg(tmp_path)
    cfg.promote.search_run_id = fake_search("t4", [(0, True, 0.25, 0.80, 0.20), (1, False, 0.08, 0.79, 0.06)], uri)
    r = run_promote(cfg)
    assert r["promoted"] and r["gate_split"].startswith("select (no final test evaluation")
    v = mlflow.MlflowClient().get_model_version(str(cfg.promote.model_name), r["version"]).tags
    assert v[Tag.GATE_SPLIT].startswith("select") and not any(k.startswith(Tag.TEST_PREFIX) for k in v)
    assert math.isfinite(float(v[Tag.ON_TARGET]))
