import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from prefsculpt.evals.shift import (
    ConceptSet,
    agreement,
    concept_scores,
    measured_shift,
    rollout_latent_scores,
    select_concepts,
    shift_table,
)
from prefsculpt.evals.style import generate_greedy
from prefsculpt.models.hooks import add_to_residual
from prefsculpt.models.loading import load_model, load_tokenizer

LAYER = 2


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    from sae_lens import SAE, StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("sae")
    StandardSAE(StandardSAEConfig(d_in=32, d_sae=64)).save_model(d)
    return SAE.load_from_disk(str(d), device="cpu")


def hypotheses():
    return pd.DataFrame({
        "concept": ["latent:3", "cluster:0", "named:markdown_bold", "latent:9", "latent:20", "latent:5"],
        "rank": [1, 2, 3, 4, np.nan, np.nan], "d_z": [0.9, -0.5, 0.7, 0.3, 0.01, np.nan],
        "members": [None, ["latent:7", "latent:8"], None, None, None, None],
    })


def test_select_concepts_takes_top_hypotheses_and_random_controls():
    cs = select_concepts(hypotheses(), d_sae=64, top_n=3, n_random=10, seed=0)
    assert cs.names[:3] == ["latent:3", "cluster:0", "latent:9"]  # the named concept has no latent: skipped
    assert cs.members[1] == [7, 8] and cs.predicted[:3].tolist() == [0.9, -0.5, 0.3]
    ctrl = [m[0] for m, c in zip(cs.members, cs.control, strict=True) if c]
    assert len(ctrl) == 10 and not {3, 7, 8, 9} & set(ctrl)
    # A tested control keeps its (small) audit effect; untested ones predict 0.
    for j, p in zip(ctrl, cs.predicted[cs.control], strict=True):
        assert p == (0.01 if j == 20 else 0.0)
    again = select_concepts(hypotheses(), d_sae=64, top_n=3, n_random=10, seed=0)
    assert again.names == cs.names  # seeded
    with pytest.raises(ValueError, match="needs columns"):
        select_concepts(hypotheses().drop(columns=["d_z"]), 64, 3, 3)


def test_shaped_concepts_are_compared_even_below_the_top_n_and_never_serve_as_controls():
    shaped = ["latent:9", "named:markdown_bold", "latent:20"]
    cs = select_concepts(hypotheses(), d_sae=64, top_n=1, n_random=40, seed=0, shaped=shaped)
    assert cs.names[:2] == ["latent:3", "latent:9"]  # latent:9 is rank 4: in because it was shaped
    assert cs.shaped[:2].tolist() == [False, True] and not cs.shaped[cs.control].any()
    ctrl = {m[0] for m, c in zip(cs.members, cs.control, strict=True) if c}
    assert not {3, 9, 20} & ctrl  # latent:20 (unranked, so not compared) is no control either
    assert select_concepts(hypotheses(), 64, 1, 3).shaped is None  # not known


def z_of(s: float) -> float:
    """shift_z by hand for base scores (0, 2) and policy scores (s, 2 + s): s / pooled sd."""
    return s / np.std([0.0, 2.0, s, 2.0 + s], ddof=1)


def test_shift_table_groups_hypotheses_by_shaping_and_keeps_controls_apart():
    """Constructed scores with known shifts: unshaped hypotheses move as predicted (shift = 2·d_z),
    shaped ones were suppressed (small, unrelated shifts), controls move at random. Every metric is
    recomputed by hand on its own group; no correlation includes a control."""
    pred = np.array([1.0, 0.8, -0.6, 0.4, 0.9, -0.7, 0.5, 0.2, 0.0, 0.0, 0.0])
    shifts = np.array([0.2, -0.1, 0.1, 0.0, 1.8, -1.4, 1.0, 0.4, 0.5, -0.5, 0.0])
    shaped = np.array([True] * 4 + [False] * 7)
    control = np.array([False] * 8 + [True] * 3)
    cs = ConceptSet([f"latent:{i}" for i in range(11)], [[i] for i in range(11)], pred, control, shaped)
    base = np.tile([[0.0], [2.0]], (1, 11))  # (2 rollouts, 11 concepts)
    table, m = shift_table(cs, base, base + shifts)
    z = np.array([z_of(x) for x in shifts])
    assert np.allclose(table["shift_z"], z)
    assert table["group"].tolist() == ["shaped"] * 4 + ["unshaped"] * 4 + ["control"] * 3
    for name, sel in (("shaped", slice(0, 4)), ("unshaped", slice(4, 8)), ("hyp", slice(0, 8))):
        p, zz = pred[sel], z[sel]
        assert m[f"{name}_n"] == len(p)
        assert m[f"{name}_r2"] == pytest.approx(np.corrcoef(p, zz)[0, 1] ** 2)
        assert m[f"{name}_spearman"] == pytest.approx(sps.spearmanr(p, zz).statistic)
        assert m[f"{name}_abs_shift_z"] == pytest.approx(np.abs(zz).mean())
        assert m[f"{name}_along_z"] == pytest.approx((zz * np.sign(p)).mean())
    assert m["unshaped_spearman"] == pytest.approx(1.0) and m["unshaped_r2"] > 0.95
    assert m["shaped_along_z"] < m["unshaped_along_z"]  # suppression: less shift in the taught direction
    assert m["control_n"] == 3 and m["control_abs_shift_z"] == pytest.approx(np.abs(z[8:]).mean())
    assert not any(k.startswith("all_") for k in m)
    # shaping not known: the hypotheses as one group, no shaped/unshaped split
    _, m2 = shift_table(ConceptSet(cs.names, cs.members, pred, control), base, base + shifts)
    assert m2["hyp_r2"] == m["hyp_r2"] and not any(k.startswith(("shaped", "unshaped")) for k in m2)


def test_agreement_and_shift_math():
    p = np.array([1.0, 0.5, -0.5, 0.0, 0.2])
    a = agreement(p, 2 * p + 1)
    assert a["spearman"] == pytest.approx(1) and a["r2"] == pytest.approx(1)
    assert agreement(p, -p)["spearman"] == pytest.approx(-1)
    assert np.isnan(agreement(p, np.zeros(5))["r2"])
    base, pol = np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([[2.0, 1.0], [4.0, 1.0]])
    shift, z = measured_shift(base, pol)
    assert shift.tolist() == [2.0, 0.0] and z[1] == 0 and z[0] == pytest.approx(2 / np.std([0, 2, 2, 4], ddof=1))


def test_rollout_scores_equal_full_forward_hidden_states(tiny_model_dir, tiny_sae):
    model, tok = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    rolls = generate_greedy(model, tok, ["What is 7 times 8?", "Hello there"], max_new_tokens=4)
    got = rollout_latent_scores(model, tiny_sae, LAYER, rolls, [1, 5, 6], tok.pad_token_id, batch_tokens=8)
    for i, r in enumerate(rolls):
        with torch.no_grad():
            h = model(torch.tensor([r.prompt_ids + r.response_ids]), output_hidden_states=True).hidden_states[LAYER + 1]
            acts = tiny_sae.encode(h)[0, len(r.prompt_ids):, [1, 5, 6]]
        assert np.allclose(got[i], acts.max(0).values.clamp_min(0).numpy(), atol=1e-5)


def test_steering_a_latent_is_measured_as_its_shift(tiny_model_dir, tiny_sae):
    """A 'policy' that pushes latent 3 up along its encoder direction: latent 3 shows the largest
    measured shift, and the predicted effects (+ for 3, 0 elsewhere) agree with the measurement."""
    model, tok = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    prompts = ["What is 7 times 8?", "Hello there", "The capital of France is Paris.", "Water boils at 100 degrees."]
    rolls = generate_greedy(model, tok, prompts, max_new_tokens=4)
    hyp = pd.DataFrame({"concept": ["latent:3"], "rank": [1], "d_z": [1.0]})
    cs = select_concepts(hyp, 64, top_n=1, n_random=8, seed=1)
    w = tiny_sae.W_enc.detach()[:, 3]  # (d,): raises latent 3's pre-activation
    base = concept_scores(rollout_latent_scores(model, tiny_sae, LAYER, rolls, cs.latents, 0), cs.latents, cs)
    with add_to_residual(model, LAYER, w / w.norm(), 8.0):
        pol = concept_scores(rollout_latent_scores(model, tiny_sae, LAYER, rolls, cs.latents, 0), cs.latents, cs)
    table, m = shift_table(cs, base, pol)
    assert table["shift"].idxmax() == 0 and table["shift"][0] > 0  # row 0 = latent:3
    assert m["hyp_sign_agree"] == 1.0 and m["hyp_n"] == 1 and m["control_n"] == 8
    assert not any(k.startswith("all_") for k in m)  # controls never enter a correlation


def test_shift_sources_from_paths_and_clear_errors(tiny_model_dir, tiny_sae, tmp_path, mlflow_uri):
    from prefsculpt.tracking.shift_sources import ShiftSourceError, resolve_shift_sources
    from tests.unit.evals.helpers import eval_cfg

    sae_dir = tmp_path / "sae"
    tiny_sae.save_model(sae_dir)
    hyp = tmp_path / "hypotheses.parquet"
    hypotheses().to_parquet(hyp)
    src = resolve_shift_sources(eval_cfg(tiny_model_dir, tmp_path, {"shift": {"sae_path": str(sae_dir),
                                                                             "hypotheses_path": str(hyp)}}), tmp_path)
    assert src.sae_path == sae_dir and src.layer == LAYER and len(src.hypotheses) == 6
    strict = {"shift": {"sae_path": str(sae_dir), "hypotheses_path": str(tmp_path / "nope.parquet"), "skip_if_missing": False}}
    with pytest.raises(ShiftSourceError, match="hypotheses_path=.*nope.parquet.* does not exist"):
        resolve_shift_sources(eval_cfg(tiny_model_dir, tmp_path, strict), tmp_path)
    with pytest.raises(ShiftSourceError, match="no finished sae run"):  # empty tracking store
        resolve_shift_sources(eval_cfg(tiny_model_dir, tmp_path, {"shift": {"skip_if_missing": False}}), tmp_path)
    assert resolve_shift_sources(eval_cfg(tiny_model_dir, tmp_path), tmp_path) is None  # skipped, with a warning


def test_shaped_concepts_come_from_the_policy_train_run(tiny_model_dir, tmp_path, mlflow_uri):
    import mlflow

    from prefsculpt.tracking.shift_sources import resolve_shaped
    from tests.unit.evals.helpers import eval_cfg

    with mlflow.start_run() as run:  # what the train stage logs: ResolvedShaping.summary()
        mlflow.log_dict({"interventions": [{"name": "score/latent:9", "lambda": 0.5, "layer": 2},
                                           {"name": "ablate/latent:3+latent:7", "lambda": 1.0, "layer": 2}]},
                        "shaping/interventions.json")
    with mlflow.start_run() as old:  # an older train run: only its config
        mlflow.log_text("shaping:\n  concepts:\n  - {concept: 'latent:4', action: amplify, strength: 2.0}\n"
                        "  - {concept: 'latent:5', action: allow}\n", "config/config.yaml")

    def shaped(policy, **shift):
        return resolve_shaped(eval_cfg(tiny_model_dir, tmp_path, {"policy": policy, "shift": shift}), tmp_path)[0]

    assert shaped(run.info.run_id) == {"latent:9": 0.5, "latent:3": 1.0, "latent:7": 1.0}
    assert shaped(f"runs:/{run.info.run_id}/model") == {"latent:9": 0.5, "latent:3": 1.0, "latent:7": 1.0}
    assert shaped(old.info.run_id) == {"latent:4": -2.0}  # allow entries shape nothing
    assert shaped("base") == {}
    assert shaped(str(tmp_path)) is None  # a bare folder: unknown
    assert list(shaped(str(tmp_path), shaped=["latent:1"])) == ["latent:1"]  # set by hand
