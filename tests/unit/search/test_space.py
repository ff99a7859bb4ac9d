"""The search space honours the decisions file, and the plain-DPO baseline is enqueued exactly once."""

import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf

from prefsculpt.search.space import (
    BASELINE_ATTR,
    START_ATTR,
    SearchSpaceError,
    SpaceBounds,
    build_candidates,
    enqueue_plan,
    param_key,
    start_params,
    suggest_concepts,
)
from prefsculpt.shaping.decisions import load_decisions
from tests.unit.search.helpers import HYPOTHESES

BOUNDS = SpaceBounds(0.1, 10.0, 0.05, 0.3)


def decisions(*entries):
    return load_decisions({"version": 1, "concepts": list(entries)}, HYPOTHESES["concept"].tolist())


def test_allow_pins_suppress_fixes_rest_free():
    dec = decisions(
        {"concept": "named:stock_flattery", "action": "allow", "method": "score", "strength": 0, "note": "keep it"},
        {"concept": "length", "action": "suppress", "method": "filter", "strength": 0.0, "share": 0.2},
        {"concept": "latent:9", "action": "amplify", "method": "steer", "strength": 2.0},  # not in the top-K
        {"concept": "latent:5", "action": "allow", "method": "score", "strength": 0},  # bare proposal: free
    )
    cands, skipped = build_candidates(HYPOTHESES, dec, top_k=4, methods=["score", "steer"], actions=["suppress", "amplify"])
    by = {c.concept: c for c in cands}
    assert "named:stock_flattery" not in by
    assert {"concept": "named:stock_flattery", "reason": "decisions: allow (keep it)"} in skipped
    assert by["length"].fixed and by["length"].methods == ("filter",) and by["length"].actions == ("suppress",)
    assert by["latent:9"].fixed and by["latent:9"].methods == ("steer",) and by["latent:9"].actions == ("amplify",)
    assert not by["latent:5"].fixed and by["latent:5"].methods == ("score", "steer")
    assert "cluster:0" not in by and any(s["concept"] == "cluster:0" for s in skipped)
    # "all": the bare allow of latent:5 pins it too
    cands, _ = build_candidates(HYPOTHESES, dec, 4, ["score"], ["suppress"], allow_pins="all")
    assert "latent:5" not in {c.concept for c in cands}


def test_sampled_trials_respect_constraints():
    dec = decisions({"concept": "length", "action": "amplify", "method": "score", "strength": 1.0})
    cands, _ = build_candidates(HYPOTHESES, dec, 4, ["score", "filter"], ["suppress"])
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen_free = set()
    for _ in range(25):
        t = study.ask()
        specs = suggest_concepts(t, cands, BOUNDS)
        by = {s["concept"]: s for s in specs}
        assert by["length"]["action"] == "amplify" and by["length"]["method"] == "score"  # always shaped, as decided
        assert 0.1 <= by["length"]["strength"] <= 10.0
        assert param_key("shape", "length") not in t.params
        for s in specs:
            if s["method"] == "filter":
                assert 0.05 <= s["share"] <= 0.3
            assert s["action"] in ("suppress", "amplify")
        seen_free |= {s["concept"] for s in specs} - {"length"}
        study.tell(t, [0.0, 0.0])
    assert seen_free == {"named:stock_flattery", "latent:5"}  # free ones are sometimes shaped


def test_baseline_enqueued_once_and_shapes_nothing():
    dec = decisions({"concept": "length", "action": "suppress", "method": "score", "strength": 1.0})
    cands, _ = build_candidates(HYPOTHESES, dec, 4, ["score"], ["suppress"])
    study = optuna.create_study(directions=["minimize", "maximize"])
    assert enqueue_plan(study, cands, 5, with_baseline=True) == 5
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 5 and [t.state.name for t in trials] == ["WAITING"] * 5
    assert sum(bool(t.user_attrs.get(BASELINE_ATTR)) for t in trials) == 1
    t = study.ask()  # the queue is FIFO: the baseline comes first
    assert t.user_attrs[BASELINE_ATTR] and suggest_concepts(t, cands, BOUNDS) == []  # even the fixed concept is off
    assert t.params == {param_key("shape", "named:stock_flattery"): False, param_key("shape", "latent:5"): False}


@pytest.mark.parametrize("kw", [{"methods": ["scroe"]}, {"actions": ["allow"]}, {"allow_pins": "some"}])
def test_bad_search_config_is_named(kw):
    args = {"methods": ["score"], "actions": ["suppress"], **kw}
    with pytest.raises(SearchSpaceError, match=next(iter(kw))):
        build_candidates(HYPOTHESES, None, 4, args["methods"], args["actions"], kw.get("allow_pins", "edited"))


def test_bounds_validated():
    with pytest.raises(SearchSpaceError, match="log scale"):
        SpaceBounds(0.0, 1.0, 0.1, 0.2)


def test_a_shaped_trial_never_repeats_plain_dpo():
    cands, _ = build_candidates(HYPOTHESES, None, 4, ["score", "filter"], ["suppress"])
    assert cands and not any(c.fixed for c in cands)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(40):
        t = study.ask()
        assert suggest_concepts(t, cands, BOUNDS), t.params
        study.tell(t, [0.0, 0.0])


def test_informed_start_follows_the_baseline_and_shapes_every_free_candidate():
    dec = decisions({"concept": "length", "action": "suppress", "method": "filter", "strength": 0.0, "share": 0.2})
    cands, _ = build_candidates(HYPOTHESES, dec, 4, ["score", "filter"], ["suppress", "amplify"])
    study = optuna.create_study(directions=["minimize", "maximize"])
    assert enqueue_plan(study, cands, 4, with_baseline=True, start=start_params(cands, BOUNDS)) == 4
    assert study.ask().user_attrs[BASELINE_ATTR]
    t = study.ask()
    assert t.user_attrs[START_ATTR]
    specs = {s["concept"]: s for s in suggest_concepts(t, cands, BOUNDS)}
    assert set(specs) == {c.concept for c in cands}
    for c in cands:
        s = specs[c.concept]
        if c.fixed:  # the decision's method and action stand; its share a quarter up the range
            assert s["method"] == "filter" and s["share"] == pytest.approx(0.1125)
        else:
            assert s["method"] == "score" and s["action"] == "suppress" and s["strength"] == pytest.approx(0.1 ** 0.5)


# What each method searches, as the first wave's space drew it (λ log-uniform on [0.1, 10]; filter's
# share uniform on [0.05, 0.3] in drop mode, κ as λ in weight mode; ablate nothing).
EXPECTED_RANGES = {
    "score": {"lambda": (0.1, 10.0, True)}, "steer": {"lambda": (0.1, 10.0, True)},
    "inoculate": {"lambda": (0.1, 10.0, True)}, "filter": {"share": (0.05, 0.3, False)},
    "ablate": {}, "prevent": {"lambda": (0.1, 10.0, True)},
}


def test_space_offers_exactly_the_registry_methods_and_their_ranges():
    from prefsculpt.shaping.registry import method_names

    assert set(EXPECTED_RANGES) == set(method_names())
    cands, _ = build_candidates(HYPOTHESES, None, 4, list(method_names()), ["suppress"])
    by = {c.concept: c for c in cands}
    assert by["latent:5"].methods == method_names() and by["named:stock_flattery"].methods == method_names()
    assert by["length"].methods == ("score", "filter")  # a built-in has span scores only
    seen: dict[str, dict[str, tuple]] = {}
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(60):
        t = study.ask()
        for s in suggest_concepts(t, cands, BOUNDS):
            c = s["concept"]
            drawn = {k.split("/")[0]: d for k, d in t.distributions.items()
                     if k.split("/", 1)[1] == c and k.split("/")[0] not in ("shape", "method", "action")}
            seen[s["method"]] = {k: (d.low, d.high, d.log) for k, d in drawn.items()}
        study.tell(t, [0.0, 0.0])
    assert seen == EXPECTED_RANGES
    weight = SpaceBounds(0.1, 10.0, 0.05, 0.3, filter_mode="weight")
    assert {k: (r.key, r.low, r.high, r.log) for k, r in weight.ranges("filter").items()} == {
        "strength": ("lambda", 0.1, 10.0, True)}


def test_space_bounds_override_the_registry_ranges():
    b = SpaceBounds(0.5, 2.0, 0.1, 0.2)
    assert [(r.low, r.high) for r in b.ranges("steer").values()] == [(0.5, 2.0)]
    assert [(r.low, r.high) for r in b.ranges("filter").values()] == [(0.1, 0.2)]
    with pytest.raises(SearchSpaceError, match=r"search.methods: unknown \['nudge'\].*'prevent'"):
        build_candidates(HYPOTHESES, None, 4, ["nudge"], ["suppress"])


CLUSTERED = pd.DataFrame({
    # ranked after merging: latent:3 and latent:4 are members of cluster:0 and have no rank of their own
    "concept": ["cluster:0", "length", "latent:5", "latent:3", "latent:4", "latent:8"],
    "kind": ["cluster", "builtin", "latent", "latent", "latent", "latent"],
    "rank": [1.0, 2.0, 3.0, None, None, 4.0],
    "direction": [-1, 1, 1, -1, -1, 1],
    "members": [["latent:3", "latent:4"], None, None, None, None, None],
})


def test_a_cluster_is_a_candidate_with_its_members_and_unshapeable_hypotheses_take_no_place():
    # steer only: the built-in `length` (scores only) cannot be shaped, so latent:8 moves up into the top 3
    cands, skipped = build_candidates(CLUSTERED, None, 3, ["steer"], ["suppress"])
    assert [c.concept for c in cands] == ["cluster:0", "latent:5", "latent:8"]
    assert cands[0].members == ("latent:3", "latent:4") and cands[0].direction == -1
    assert [s["concept"] for s in skipped] == ["length"]
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = False
    for _ in range(10):
        t = study.ask()
        for s in suggest_concepts(t, cands, BOUNDS):
            assert s["direction"] == {"cluster:0": -1, "latent:5": 1, "latent:8": 1}[s["concept"]]
            if s["concept"] == "cluster:0":
                assert s["members"] == ["latent:3", "latent:4"]
                seen = True
        study.tell(t, [0.0, 0.0])
    assert seen
    # feasibility by members: a cluster has a source when every member has it
    from prefsculpt.search.inputs import feasibility
    from prefsculpt.shaping.config import ShapingConfig

    sh = OmegaConf.structured(ShapingConfig)
    ok = feasibility(sh, [], {"sae_path": "/sae", "scores_dir": None, "directions_path": None}, CLUSTERED)
    assert ok("cluster:0", "steer") and ok("cluster:0", "ablate") and not ok("cluster:0", "score")
    # a hypothesis of another kind that lists members is shaped through them as well
    other = CLUSTERED.assign(kind=CLUSTERED["kind"].replace("cluster", "data_cluster"))
    assert build_candidates(other, None, 1, ["steer"], ["suppress"])[0][0].members == ("latent:3", "latent:4")


def test_ablate_is_searched_with_suppress_only_and_every_method_by_default():
    from prefsculpt.search.config import SearchConfig
    from prefsculpt.shaping.registry import method_names

    assert SearchConfig().methods == list(method_names())
    cands, _ = build_candidates(HYPOTHESES, None, 4, ["ablate", "prevent"], ["suppress", "amplify"])
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    got = set()
    for _ in range(30):
        t = study.ask()
        got |= {(s["method"], s["action"]) for s in suggest_concepts(t, cands, BOUNDS)}
        study.tell(t, [0.0, 0.0])
    assert got == {("ablate", "suppress"), ("prevent", "suppress"), ("prevent", "amplify")}
    # amplify only: ablate is not offered at all
    cands, _ = build_candidates(HYPOTHESES, None, 4, ["ablate", "prevent"], ["amplify"])
    assert all(c.methods == ("prevent",) for c in cands)
