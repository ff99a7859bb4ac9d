"""Registry, decisions -> signed λ, and each method's precompute / hooks on the tiny llama."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.tokenize import tokenize_pairs
from prefsculpt.shaping.config import ShapingConfig
from prefsculpt.shaping.registry import INTERVENTIONS, Intervention, ShapingError, register_intervention
from prefsculpt.shaping.resolve import resolve_shaping


def _sc(**kw):
    return OmegaConf.merge(OmegaConf.structured(ShapingConfig), kw)


def test_every_method_is_registered_once():
    resolve_shaping(_sc(), 1)
    assert set(INTERVENTIONS) == {"score", "steer", "inoculate", "filter", "ablate", "prevent"}
    assert [INTERVENTIONS[m].in_loss for m in ("score", "steer", "inoculate", "filter")] == [True, True, True, False]
    with pytest.raises(ValueError, match="twice"):
        register_intervention("score")(type("Again", (Intervention,), {}))


def test_decisions_file_maps_actions_to_signed_lambda_and_is_hashed(tmp_path):
    from prefsculpt.audit.decisions import decisions_hash, write_decisions

    path = write_decisions({"version": 1, "concepts": [
        {"concept": "latent:3", "action": "suppress", "method": "score", "strength": 2.0},
        {"concept": "latent:4", "action": "amplify", "method": "steer", "strength": 0.5, "multiplier": 3.0},
        {"concept": "latent:5", "action": "allow", "method": "score", "strength": 9.0},
        {"concept": "length", "action": "suppress", "method": "filter", "strength": 1.0, "share": 0.2},
    ]}, tmp_path / "decisions.yaml")
    r = resolve_shaping(_sc(decisions=str(path), concepts=[{"concept": "named:emoji", "method": "prevent",
                                                             "action": "amplify", "strength": 4.0}]), layer=7)
    got = {iv.name: (iv.lam, iv.params, iv.layer) for iv in r.interventions}
    assert got == {"score/latent:3": (2.0, {}, 7), "steer/latent:4": (-0.5, {"multiplier": 3.0}, 7),
                   "filter/length": (1.0, {"mode": "drop", "share": 0.2}, 7), "prevent/named:emoji": (-4.0, {}, 7)}
    assert r.decisions_hash == decisions_hash(path) and r.decisions_path == str(path)
    assert [iv.name for iv in r.loss_terms] == ["score/latent:3", "steer/latent:4"]


def test_bad_specs_fail_with_the_concept_named():
    with pytest.raises(ShapingError, match="named:x: unknown method 'steeer'"):
        resolve_shaping(_sc(concepts=[{"concept": "named:x", "method": "steeer"}]), 1)
    with pytest.raises(ShapingError, match="named:x: inoculate needs an instruction"):
        resolve_shaping(_sc(concepts=[{"concept": "named:x", "method": "inoculate"}]), 1)
    with pytest.raises(ShapingError, match="latent:1: ablate can only suppress"):
        resolve_shaping(_sc(concepts=[{"concept": "latent:1", "method": "ablate", "action": "amplify"}]), 1)
    with pytest.raises(ShapingError, match="strength -1.0 < 0"):
        resolve_shaping(_sc(concepts=[{"concept": "latent:1", "strength": -1.0}]), 1)
    with pytest.raises(ShapingError, match="given twice"):
        resolve_shaping(_sc(concepts=[{"concept": "latent:1"}, {"concept": "latent:1"}]), 1)


def test_ablate_entries_form_one_group():
    r = resolve_shaping(_sc(concepts=[{"concept": "latent:1", "method": "ablate"},
                                      {"concept": "latent:2", "method": "ablate"}]), 1)
    assert [iv.name for iv in r.interventions] == ["ablate/latent:1+latent:2"]
    assert r.interventions[0].touches_layers() == {1}


@pytest.fixture
def ctx(tiny_model_dir, tiny_tokenizer, tmp_path):
    from safetensors.torch import save_file

    from prefsculpt.models.loading import load_model
    from prefsculpt.train.precompute import RefContext

    pairs = [PreferencePair("a", "What is 7 times 8?", "7 times 8 is 56!", "You're right! 54."),
             PreferencePair("b", "Capital of France?", "**Paris** is the answer.", "Paris!!"),
             PreferencePair("c", "How are you?", "I am fine, thank you.", "Hello")]
    toks = tokenize_pairs(pairs, tiny_tokenizer, 64, 32)
    torch.manual_seed(1)
    save_file({"named:bang": torch.randn(32), "latent:0": torch.randn(32), "latent:1": torch.randn(32)},
              str(tmp_path / "d.safetensors"))
    sc = _sc(directions_path=str(tmp_path / "d.safetensors"), layer=1)
    named = [OmegaConf.create({"name": "bang", "kind": "regex", "pattern": "!"})]
    return RefContext(load_model(tiny_model_dir).eval(), tiny_tokenizer, pairs, toks, sc, named, 1, 64)


def test_score_and_length_use_zscored_span_scores(ctx):
    from prefsculpt.shaping.interventions import ScoreShaping

    da = ScoreShaping(["named:bang"], 1.0).precompute(ctx)
    raw_c, raw_r = np.array([1, 0, 0.0]), np.array([1, 2, 0.0])
    np.testing.assert_allclose(da, (raw_c - raw_r) / np.concatenate([raw_c, raw_r]).std(), rtol=1e-6)
    assert ScoreShaping(["length"], 1.0).precompute(ctx).shape == (3,)
    with pytest.raises(ShapingError, match="latent:9: no span scores"):
        ScoreShaping(["latent:9"], 1.0).precompute(ctx)


def test_steer_is_zero_at_zero_multiplier_and_moves_log_probs_otherwise(ctx):
    from prefsculpt.shaping.interventions import SteerShaping

    zero = SteerShaping(["named:bang"], 1.0, {"multiplier": 0.0}, layer=1).precompute(ctx)
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)
    da = SteerShaping(["named:bang"], 1.0, {"multiplier": 20.0}, layer=1).precompute(ctx)
    assert np.isfinite(da).all() and np.abs(da).max() > 1e-3


def test_inoculate_changes_only_the_prompt(ctx):
    from prefsculpt.shaping.interventions import InoculateShaping

    iv = InoculateShaping(["named:bang"], 1.0, {"instruction": "Agree with the user's opinion."})
    toks = ctx._with_suffix("Agree with the user's opinion.")
    assert [t.chosen_ids for t in toks] == [t.chosen_ids for t in ctx.tokenized]
    assert all(len(a.prompt_ids) > len(b.prompt_ids) for a, b in zip(toks, ctx.tokenized, strict=True))
    da = iv.precompute(ctx)
    assert np.isfinite(da).all() and np.abs(da).max() > 1e-4


def test_ablate_projects_out_and_prevent_adds_only_inside_train_hooks(ctx):
    from prefsculpt.models.hooks import capture_residual
    from prefsculpt.shaping.interventions import AblateShaping, PreventShaping

    model, ids = ctx.model, torch.tensor([ctx.tokenized[0].sequence("chosen")[0]])
    ab = AblateShaping(["latent:0", "latent:1"], 1.0, layer=1)
    ab.precompute(ctx)
    pv = PreventShaping(["named:bang"], 2.5, layer=1)
    pv.precompute(ctx)
    with capture_residual(model, 1) as plain:
        model(ids)
    for iv in (ab, pv):
        with iv.train_hooks(model), capture_residual(model, 1) as got:
            model(ids)
        if iv is ab:
            assert (got[0] @ ab._dirs.T).abs().max() < 1e-4  # no component left along either direction
        else:
            torch.testing.assert_close(got[0] - plain[0], (2.5 * pv._dirs[0]).expand_as(got[0]), atol=1e-5, rtol=0)
    with capture_residual(model, 1) as after:  # hooks are gone after the context
        model(ids)
    torch.testing.assert_close(after[0], plain[0])


def test_precompute_is_cached_content_addressed(ctx, tmp_path, monkeypatch):
    from prefsculpt.shaping.interventions import ScoreShaping
    from prefsculpt.train.precompute import PrecomputeCache, run_precompute

    cache = PrecomputeCache(tmp_path / "c")
    ivs = [ScoreShaping(["named:bang"], 2.0)]
    first = run_precompute(ctx, ivs, cache, "fp")
    n_files = len(list(cache.dir.glob("*.safetensors")))
    assert n_files == 2 and not list(cache.dir.glob(".tmp*"))

    def boom(*a, **k):
        raise AssertionError("recomputed despite cache")

    monkeypatch.setattr(ScoreShaping, "precompute", boom)
    monkeypatch.setattr(type(ctx), "_logps", boom)
    again = run_precompute(ctx, ivs, cache, "fp")
    np.testing.assert_array_equal(first.delta_a, again.delta_a)
    np.testing.assert_array_equal(first.ref_c, again.ref_c)
    assert first.term_names == ["score/named:bang"] and first.lambdas.tolist() == [2.0]
    with pytest.raises(AssertionError, match="recomputed"):  # a different model is a different key
        run_precompute(ctx, ivs, cache, "other-model")
