"""The registry is the one list of methods: their parameters, defaults, validation and search
ranges are declared on the classes, and a newly registered class shows up everywhere."""

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from prefsculpt.audit.decisions import DecisionsError
from prefsculpt.search.config import SearchConfig
from prefsculpt.search.space import SpaceBounds, build_candidates, kind_methods
from prefsculpt.shaping.config import ShapingConfig
from prefsculpt.shaping.decisions import load_decisions
from prefsculpt.shaping.params import SearchRange, param
from prefsculpt.shaping.registry import (
    INTERVENTIONS,
    Intervention,
    ShapingError,
    Source,
    method_names,
    register_intervention,
)
from prefsculpt.shaping.resolve import resolve_shaping
from prefsculpt.shaping.table import method_table
from tests.unit.search.helpers import HYPOTHESES


def _sc(**kw):
    return OmegaConf.merge(OmegaConf.structured(ShapingConfig), kw)


def _one(**entry):
    return resolve_shaping(_sc(concepts=[{"concept": "latent:1", **entry}]), layer=1).interventions


def test_the_six_methods_in_order_with_todays_defaults():
    assert method_names() == ("score", "steer", "inoculate", "filter", "ablate", "prevent")
    # Defaults as the first wave's config had them (shaping.steer_multiplier 8, filter drop at 0.1).
    got = {iv.method: iv.params for iv in _one(method="steer") + _one(method="filter") + _one(method="score")}
    assert got == {"steer": {"multiplier": 8.0}, "filter": {"mode": "drop", "share": 0.1}, "score": {}}
    assert ShapingConfig().steer_multiplier == 8.0 and ShapingConfig().filter_share == 0.1
    sc = SearchConfig()
    assert (sc.lambda_min, sc.lambda_max, sc.share_min, sc.share_max) == (0.1, 10.0, 0.05, 0.3)


def test_entry_values_override_config_defaults_and_are_typed():
    [steer] = _one(method="steer", multiplier=3)  # an int in YAML becomes the float the class declares
    assert steer.args.multiplier == 3.0 and isinstance(steer.args.multiplier, float)
    [ino] = resolve_shaping(_sc(instructions={"latent:1": "Agree."}, concepts=[
        {"concept": "latent:1", "method": "inoculate"}]), 1).interventions
    assert ino.args.instruction == "Agree."
    [flt] = resolve_shaping(_sc(filter_mode="weight", filter_share=0.2,
                                concepts=[{"concept": "latent:1", "method": "filter"}]), 1).interventions
    assert (flt.args.mode, flt.args.share) == ("weight", 0.2)


@pytest.mark.parametrize(("entry", "shaping", "message"), [
    ({"method": "steeer"}, {}, "latent:1: unknown method 'steeer'; use one of"),
    ({"method": "filter", "share": 0.0}, {}, "latent:1: share 0.0 must lie in (0, 1)"),
    ({"method": "filter", "share": 1.5}, {}, "latent:1: share 1.5 must lie in (0, 1)"),
    ({"method": "score", "share": 0.2}, {}, "latent:1: 'share' is not a parameter of score (its parameters: none)"),
    ({"method": "filter"}, {"filter_mode": "keep"}, "latent:1: filter mode must be one of ['drop', 'weight'], got 'keep'"),
    ({"method": "ablate", "action": "amplify"}, {}, "latent:1: ablate can only suppress; use one of ['score', 'steer', "
                                                    "'inoculate', 'filter', 'prevent'] to amplify"),
])
def test_config_errors_name_the_concept_and_the_parameter(entry, shaping, message):
    with pytest.raises(ShapingError) as ei:
        resolve_shaping(_sc(**shaping, concepts=[{"concept": "latent:1", **entry}]), layer=1)
    assert message in str(ei.value)


def test_decisions_entries_are_checked_against_their_method():
    with pytest.raises(DecisionsError) as ei:
        load_decisions({"concepts": [
            {"concept": "latent:1", "action": "suppress", "method": "score", "strength": 1, "multiplier": 2.0},
            {"concept": "latent:2", "action": "suppress", "method": "steer", "strength": 1, "multiplier": True},
            {"concept": "latent:3", "action": "suppress", "method": "filter", "strength": 1, "mode": "weight"},
        ]}, None)
    msg = str(ei.value)
    assert "entry 1 (latent:1): 'multiplier' is not a parameter of score" in msg
    assert "entry 2 (latent:2): multiplier must be a number, got True" in msg
    assert "entry 3 (latent:3): unknown field 'mode'" in msg  # only shaping.filter_mode sets it


@dataclass(frozen=True)
class _NudgeParams:
    offset: float = param(0.5, "how far to nudge", config=None, bounds=(0.0, 2.0),
                          search=SearchRange("offset", 0.25, 1.5))


@pytest.fixture
def nudge():
    """A seventh method, registered for one test and removed after it."""

    @register_intervention("nudge")
    class Nudge(Intervention):
        """Nudge the concept a little."""

        Params = _NudgeParams
        needs = Source.scores

    yield Nudge
    del INTERVENTIONS["nudge"]


def test_a_registered_method_is_known_everywhere(nudge):
    assert method_names()[-1] == "nudge" and "nudge" in kind_methods("builtin")
    dec = load_decisions({"concepts": [{"concept": "length", "action": "suppress", "method": "nudge",
                                        "strength": 1.0, "offset": 1.0}]}, None)
    assert dec.entries[0].params == {"offset": 1.0}
    with pytest.raises(DecisionsError, match=r"offset 3\.0 must lie in \(0, 2\)"):
        load_decisions({"concepts": [{"concept": "length", "action": "suppress", "method": "nudge",
                                      "strength": 1.0, "offset": 3.0}]}, None)
    [iv] = _one(method="nudge")
    assert isinstance(iv, nudge) and iv.params == {"offset": 0.5}
    assert SpaceBounds(0.2, 5.0, 0.1, 0.2).ranges("nudge") == {
        "strength": SearchRange("lambda", 0.2, 5.0, log=True), "offset": SearchRange("offset", 0.25, 1.5)}
    cands, _ = build_candidates(HYPOTHESES, None, 4, ["nudge"], ["suppress"])
    assert cands and all(c.methods == ("nudge",) for c in cands)
    row = next(line for line in method_table().splitlines() if line.startswith("| `nudge`"))
    assert "Nudge the concept a little." in row and "`offset` [0.25, 1.5]" in row and "`offset` = 0.5" in row


def test_every_entry_parameter_has_a_typed_config_field():
    from dataclasses import fields

    from prefsculpt.shaping.config import ConceptSpec
    from prefsculpt.shaping.decisions import param_fields

    assert set(param_fields()) == {"multiplier", "instruction", "share"}
    assert set(param_fields()) <= {f.name for f in fields(ConceptSpec)}  # shaping.concepts items can set them


def test_registration_refuses_a_second_name_and_a_non_dataclass_params():
    with pytest.raises(ValueError, match="registered twice"):
        register_intervention("score")(type("Again", (Intervention,), {}))
    with pytest.raises(TypeError, match="Params must be a dataclass"):
        register_intervention("broken")(type("Broken", (Intervention,), {"Params": dict}))
    with pytest.raises(TypeError, match="'count' has type <class 'int'>"):
        register_intervention("broken")(type("Broken", (Intervention,), {"Params": _IntParams}))
    assert "broken" not in INTERVENTIONS


@dataclass(frozen=True)
class _IntParams:
    count: int = param(3, "how many")


def test_search_range_checks_itself_and_finds_fractions():
    r = SearchRange("lambda", 0.1, 10.0, log=True)
    assert r.at(0.25) == pytest.approx(0.1 ** 0.5) and r.at(0.5) == pytest.approx(1.0)
    assert SearchRange("share", 0.05, 0.3).at(0.25) == pytest.approx(0.1125)
    with pytest.raises(ValueError, match="low > 0 on a log scale"):
        SearchRange("lambda", 0.0, 1.0, log=True)


def test_a_decision_carries_the_audits_direction_and_a_clusters_members():
    dec = load_decisions({"version": 1, "concepts": [
        {"concept": "cluster:0", "action": "suppress", "method": "score", "strength": 1.0, "direction": -1,
         "members": ["latent:3", "latent:4"], "effect": -0.4},
        {"concept": "latent:9", "action": "amplify", "method": "steer", "strength": 1.0}]}, None)
    assert dec.entries[0].direction == -1 and dec.entries[0].members == ("latent:3", "latent:4")
    assert dec.entries[1].direction is None and dec.entries[1].members == ()
    assert dec.to_dict()["concepts"][0]["members"] == ["latent:3", "latent:4"]
    assert "direction" not in dec.to_dict()["concepts"][1]
    with pytest.raises(DecisionsError, match="direction must be 1.*got .sideways."):
        load_decisions({"version": 1, "concepts": [
            {"concept": "latent:1", "action": "suppress", "method": "score", "strength": 1.0, "direction": "sideways"}]}, None)


def test_a_cluster_is_shaped_through_its_members_summed_scores_and_directions():
    import numpy as np
    import torch

    from prefsculpt.shaping.registry import Spec, build_interventions

    class Ctx:
        n, layer, unit_directions = 2, 1, True
        scores = {"latent:3": (np.array([1.0, 0.0]), np.array([0.0, 2.0])),
                  "latent:4": (np.array([3.0, 1.0]), np.array([1.0, 0.0]))}
        dirs = {"latent:3": torch.tensor([1.0, 0.0]), "latent:4": torch.tensor([0.0, 1.0])}

        def concept_score(self, c):
            return self.scores[c]

        def direction(self, c):
            return self.dirs[c]

    ivs = build_interventions([Spec("cluster:0", m, "suppress", 1.0, {}, -1, ("latent:3", "latent:4"))
                               for m in ("score", "ablate", "prevent")], layer=1)
    score, ablate, prevent = ivs
    c, r = score.score(Ctx(), "cluster:0")
    assert c.tolist() == [4.0, 1.0] and r.tolist() == [1.0, 2.0]
    torch.testing.assert_close(score.direction_of(Ctx(), "cluster:0"), torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    ablate.bind(Ctx())
    assert ablate._dirs.shape == (2, 2)  # every member's direction is projected out
    assert score.cache_key()["members"] == {"cluster:0": ["latent:3", "latent:4"]}
    assert prevent.orient(None, "audit") == -1 and prevent.sign_from == "audit"
    assert ablate.orient(None, "audit") == 1 and not ablate.oriented
