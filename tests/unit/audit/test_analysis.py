"""The audit's analysis around the table: one row per near-duplicate group, what carries the length
difference, and a calibration that decides (a failed swap-null check withholds the proposed decisions)."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from prefsculpt.audit.analysis import (
    CalibrationVerdict,
    allowed_false_seeds,
    calibration_verdict,
    cluster_key,
    length_carriers,
    select_hypotheses,
    where_family,
    where_null_rows,
    where_rows,
    write_outputs,
)
from prefsculpt.audit.config import AuditConfig
from prefsculpt.audit.stats import bh_qvalues, half_assignment, swap_flips, test_concepts
from prefsculpt.concepts.scores import ConceptScores
from prefsculpt.report.html import HypothesisView
from prefsculpt.shaping.decisions import load_decisions
from tests.unit.audit.test_stats import _keys, _length_world


def test_length_carriers_rank_the_planted_carrier_first():
    sc, n = _length_world()
    df = select_hypotheses(test_concepts(sc, _keys(n)), [])
    got = length_carriers(df, k=5)
    assert got["concept"].tolist()[0] == "named:len"  # pure length: raw effect that vanishes at equal length
    assert {"named:real", "length"}.isdisjoint(got["concept"])  # survives control / is length itself
    assert (got["length_share"].diff().dropna() <= 0).all()  # ranked by the share of the gap it carries
    assert list(got.columns[:5]) == ["concept", "kind", "label", "length_share", "length_r2"]


def test_near_duplicates_reach_the_reader_as_one_cluster_row_with_members():
    from prefsculpt.audit.analysis import NEAR_DUPLICATE, select_hypotheses

    rng = np.random.default_rng(1)
    n, f = 600, 8
    c, r = rng.exponential(size=(n, f)) * (rng.random((n, f)) < 0.3), np.zeros((n, f))
    r[:] = rng.exponential(size=(n, f)) * (rng.random((n, f)) < 0.3)
    feat = (rng.random(n) < 0.4) * 2.0  # one feature, on the chosen side, that latents 0-4 all encode
    for j in range(5):
        c[:, j] = feat + 0.05 * rng.random(n)
        r[:, j] = 0.05 * rng.random(n)
    vals = {("chosen", "max"): c.astype(np.float32), ("rejected", "max"): r.astype(np.float32),
            ("prompt", "max"): np.zeros((n, f), np.float32)}
    sc = ConceptScores([f"p{i}" for i in range(n)], vals, {"chosen": np.full(n, 50), "rejected": np.full(n, 50),
                                                            "prompt": np.full(n, 9)}, [f"latent:{j}" for j in range(f)])
    keys = [f"k{i // 2}" for i in range(n)]
    dup = [[0, 1, 2, 3, 4]]
    table = test_concepts(sc, keys, clusters=dup, extra={})
    names = [[f"latent:{j}" for j in g] for g in dup]
    t = select_hypotheses(table, names, [NEAR_DUPLICATE])
    hyp = t[t["rank"].notna()]
    assert (t.set_index("concept").loc[[f"latent:{j}" for j in range(5)], "significant"]).all()
    assert hyp["concept"].tolist().count("cluster:0") == 1
    assert not hyp["concept"].isin([f"latent:{j}" for j in range(5)]).any()  # one row, not five
    row = t.set_index("concept").loc["cluster:0"]
    assert row["members"] == names[0] and row["cluster_type"] == NEAR_DUPLICATE
    assert row["cluster_key"] == cluster_key(NEAR_DUPLICATE, list(reversed(names[0]))) \
        and row["cluster_key"].startswith("near_duplicate-")  # the members' id, not the cluster number
    assert (t.set_index("concept").loc[names[0], "member_of"] == "cluster:0").all()
    assert (t.set_index("concept").loc[names[0], "duplicate_of"] == "cluster:0").all()


def _calibration_table(false_seeds, n_seeds=20, where=()):
    cal = pd.DataFrame({"seed": range(n_seeds), "n_q_below_fdr": 0, "n_significant": 0, "n_q_raw_below_fdr": 0,
                        "n_where_q_below_fdr": 0})
    cal.loc[list(false_seeds), "n_q_below_fdr"] = 1
    cal.loc[list(where), "n_where_q_below_fdr"] = 2
    return cal


def test_calibration_fails_beyond_two_of_twenty_seeds_in_any_family():
    ok = calibration_verdict(_calibration_table([3, 7]), 0.05)
    assert not ok.failed and ok.false_seeds == 2 and ok.allowed == 2
    bad = calibration_verdict(_calibration_table([3, 7], where=[7, 11]), 0.05)  # a data-cluster discovery counts
    assert bad.failed and bad.false_seeds == 3 and bad.by_family == {"concepts": 2, "data clusters": 2}
    assert "FAILED" in bad.message() and "no decisions are proposed" in bad.message()
    # few seeds: one seed with a discovery is what a calibrated test gives often enough (P ~ 0.14 at 3)
    assert [allowed_false_seeds(s, 0.05) for s in (3, 20, 100)] == [1, 2, 8]
    assert calibration_verdict(_calibration_table([0], n_seeds=3), 0.05).failed is False
    assert calibration_verdict(_calibration_table([0, 2], n_seeds=3), 0.05).failed is True


def _where_world(n=600, seed=0):
    """Three data clusters; concept 0's d is concentrated in cluster 0 (the swap destroys that)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(3, size=n)
    d = rng.normal(size=(n, 4))
    d[labels == 0, 0] += 1.5
    return d, labels, half_assignment(_keys(n))


def _null_table(significant=(), tested=4):
    return pd.DataFrame({"concept": [f"c{j}" for j in range(tested)], "tested": True,
                         "significant": [f"c{j}" in significant for j in range(tested)]})


def test_where_family_is_bh_within_each_concept_at_the_level_the_selection_leaves():
    d, labels, half = _where_world()
    one = where_family(d[:, :1], labels, half, 30)
    # hand-computed: BH over concept 0's own three cluster tests, then divided by R/m
    assert np.allclose(one["q"], bh_qvalues(one["p"].to_numpy()))
    share = 0.25
    scaled = where_family(d[:, :1], labels, half, 30, selected_share=share)
    assert np.allclose(scaled["q"], np.minimum(1.0, bh_qvalues(one["p"].to_numpy()) / share))
    # a concept's q does not depend on the other concepts tested beside it (one family each)
    both = where_family(d, labels, half, 30, concept_index=[7, 8, 9, 10])
    assert np.allclose(both[both["concept_index"] == 7]["q"], one["q"])
    with pytest.raises(ValueError, match="selected_share"):
        where_family(d, labels, half, 30, selected_share=0.0)


def test_where_rows_are_asked_of_the_selected_hypotheses_only():
    d, labels, half = _where_world()
    a = AuditConfig()
    dirs = np.ones(4)
    every = where_rows(d, dirs, labels, half, a, {})
    assert every[0] and every[0][0]["cluster"] == 0  # the concentrated effect is found when asked
    none_for_0 = where_rows(d, dirs, labels, half, a, {}, selected=np.array([False, True, True, True]))
    assert none_for_0[0] == []  # not a hypothesis: no data-cluster claim, however strong
    assert where_rows(d, dirs, labels, half, a, {}, selected=np.zeros(4, bool), share=0.5) == [[]] * 4


def test_where_family_null_counts_per_seed():
    d, labels, half = _where_world()
    n = len(d)

    def diffs(names):
        return d[:, [int(c[1:]) for c in names]]

    no_swap = [np.zeros(n, bool)]
    # what the null would look like had the flips not erased the effect: found, so it counts
    assert where_null_rows(diffs, [_null_table({"c0"})], labels, half, 30, 0.05, no_swap, 50)[0][
        "n_where_q_below_fdr"] > 0
    # ... but only when the seed made concept 0 a hypothesis: without one, no data-cluster claim at all
    assert where_null_rows(diffs, [_null_table()], labels, half, 30, 0.05, no_swap, 50) == [
        {"n_where_q_below_fdr": 0, "n_where_significant": 0}]
    # at a small R/m the same effect must be stronger to count (1 of 400 concepts selected)
    weak = d.copy()
    weak[labels == 0, 0] -= 1.05  # +0.45 left: within-concept q ~ 1e-3
    rows = where_null_rows(lambda names: weak[:, [0]], [_null_table({"c0"}, tested=400)], labels, half, 30, 0.05,
                           no_swap, 50)
    assert rows[0]["n_where_q_below_fdr"] == 0
    assert where_null_rows(lambda names: weak[:, [0]], [_null_table({"c0"}, tested=1)], labels, half, 30, 0.05,
                           no_swap, 50)[0]["n_where_q_below_fdr"] > 0
    flips = swap_flips(n, 20)
    rows = where_null_rows(diffs, [_null_table({"c0", "c1"})] * 20, labels, half, 30, 0.05, flips, 50)
    assert len(rows) == 20 and sum(r["n_where_q_below_fdr"] > 0 for r in rows) <= 2
    assert all(r["n_where_significant"] <= r["n_where_q_below_fdr"] for r in rows)
    assert where_null_rows(diffs, [_null_table({"c0"})], None, half, 30, 0.05, no_swap, 50) == [
        {"n_where_q_below_fdr": 0, "n_where_significant": 0}]


def test_a_failed_calibration_banners_the_report_and_proposes_no_decisions(tmp_path):
    sc, n = _length_world()
    table = select_hypotheses(test_concepts(sc, _keys(n)), [])
    hyp = table[table["rank"].notna()]
    assert len(hyp) >= 2
    a = AuditConfig()
    verdict = calibration_verdict(_calibration_table([1, 2, 3, 4]), a.fdr, a.calibration_alpha)
    carriers = length_carriers(table)
    views = [HypothesisView(r) for r in table[table["concept"] == "length"].to_dict("records")]
    out = write_outputs(tmp_path / "bad", a, "synthetic", "run1", "sae1", table, hyp, views, {}, None,
                        verdict=verdict, carriers=carriers, calibration=_calibration_table([1, 2, 3, 4]))
    dec = yaml.safe_load((out / "decisions.yaml").read_text())
    assert dec["concepts"] == [] and "Calibration FAILED" in dec["withheld"]
    assert "NO DECISIONS PROPOSED" in (out / "decisions.yaml").read_text()
    assert load_decisions(out / "decisions.yaml", table["concept"]).entries == []  # still a valid file
    html = (out / "report.html").read_text()
    top = html.split("<dl class=\"meta\">")[0]
    assert 'id="calibration-banner"' in top and "Calibration FAILED" in top and "banner fail" in top
    assert 'id="length-carriers"' in html and "named:len" in html
    (length,) = json.loads((out / "hypotheses.json").read_text())
    assert length["concept"] == "length" and length["length_carriers"][0]["concept"] == "named:len"
    assert {"length_share", "length_r2", "q_raw", "length_effect"} <= set(length["length_carriers"][0])
    assert {"q", "q_raw", "significant", "significant_raw", "length_share"} <= set(length)
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["failed"] and cal["false_seeds"] == 4 and len(cal["seeds"]) == 20
    # the same audit with a passing calibration proposes every hypothesis
    fine = calibration_verdict(_calibration_table([5]), a.fdr, a.calibration_alpha)
    out2 = write_outputs(tmp_path / "ok", a, "synthetic", "run1", "sae1", table, hyp, [], {}, None, verdict=fine)
    dec2 = yaml.safe_load((out2 / "decisions.yaml").read_text())
    assert "withheld" not in dec2 and [e["concept"] for e in dec2["concepts"]] == hyp["concept"].tolist()
    html2 = (out2 / "report.html").read_text()
    assert "Calibration passed" in html2 and "banner ok" in html2
    assert isinstance(fine, CalibrationVerdict) and not fine.failed
