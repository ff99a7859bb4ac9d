"""Suppress and amplify mean what they say for every method, oriented by the audit's direction.

Pairs (tiny random llama): concept A (a trailing " !") sits on the chosen side of 4 of 16 pairs and on
the rejected side of 1: the audit finds "the preferred side has more A" (direction +1). Concept B (a
trailing " ###") the other way round (direction −1). Plain DPO moves the policy toward A and away
from B. The shift along a concept is the change, against the base model, of the mean over held-out
answers of log π(answer + marker) − log π(answer). After ``suppress`` of both concepts each shift
must be smaller in magnitude than after plain DPO; after ``amplify`` larger. ``ablate`` has no
amplify. Directions (steer, prevent, ablate) are the gradient of that preference with respect to an
offset of the residual at layer ℓ: on a random model, the direction along which it produces more of
the concept, as an SAE decoder row is on a trained one.

The measured shifts are printed (``pytest -s``) and written beside each case; a method that cannot
show the behaviour on a random model is a strict xfail with its measured numbers. The sign-flip test
shows the suite can fail: give the audit's direction the wrong way round and ``suppress`` adds to
the lesson instead (score: A +1.805, B −2.090, the amplify numbers, against plain +1.785 / −1.637).
"""

from __future__ import annotations

import tempfile

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.tokenize import tokenize_pairs

QA = [("What is 7 times 8?", "7 times 8 is 56.", "7 times 8 is 54."),
      ("Capital of France?", "Paris is the answer.", "The answer is 54."),
      ("How are you?", "I am fine, thank you.", "Hello, how are you?"),
      ("Water boils at?", "100 degrees Celsius.", "8 degrees Celsius."),
      ("How many planets?", "There are 8 planets.", "There are 54 planets."),
      ("Is it Paris?", "Actually, it is Paris.", "You're right, it is 56.")]
MARKS = {"A": " !", "B": " ###"}
NAMED = [{"name": "A", "kind": "regex", "pattern": "!"}, {"name": "B", "kind": "regex", "pattern": "###"}]
#: The audit's directions: the preferred side has more A, less B.
DIRECTION = {"A": 1, "B": -1}
LAYER, EPOCHS, LR = 1, 3, 3e-3
INSTRUCTIONS = {"named:A": "End your answer with !", "named:B": "End your answer with ###"}


def make_pairs(n: int = 16, offset: int = 0) -> list[PreferencePair]:
    out = []
    for i in range(n):
        q, good, bad = QA[(i + offset) % len(QA)]
        if i % 4 == 0:
            good += MARKS["A"]
        elif i == 6:
            bad += MARKS["A"]
        elif i % 4 == 1:
            bad += MARKS["B"]
        elif i == 7:
            good += MARKS["B"]
        out.append(PreferencePair(f"p{i + offset}", f"{q} ({i + offset})", good, bad))
    return out


def held_out() -> list[PreferencePair]:
    return [PreferencePair(f"h{i}", f"{q} ({100 + i})", good, bad) for i, (q, good, bad) in enumerate(QA * 2)]


def marker_preference(model, tok, pairs, mark: str) -> torch.Tensor:
    """Mean over ``pairs`` of log π(answer + mark) − log π(answer), differentiable."""
    from prefsculpt.train.forward import pad_right, sequence_logps

    with_m = [PreferencePair(p.id, p.prompt, p.chosen + mark, p.chosen) for p in pairs]
    toks = tokenize_pairs(with_m, tok, 64, 32)
    seqs = [t.sequence("chosen") for t in toks] + [t.sequence("rejected") for t in toks]
    lp = sequence_logps(model, pad_right([s[0] for s in seqs], tok.pad_token_id), pad_right([s[1] for s in seqs], 0))
    a, b = lp.chunk(2)
    return (a - b).mean()


def prefs(model, tok) -> dict[str, float]:
    with torch.no_grad():
        return {c: float(marker_preference(model, tok, held_out(), m)) for c, m in MARKS.items()}


def concept_direction(model, tok, mark: str) -> torch.Tensor:
    """∂ preference / ∂ (an offset added to the residual after layer ℓ), on the training prompts."""
    from prefsculpt.models.hooks import add_to_residual

    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    with add_to_residual(model, LAYER, delta, 1.0):
        marker_preference(model, tok, make_pairs(), mark).backward()
    return delta.grad.detach().clone()


def train(model_dir, tok, concepts, directions_path, shaping_extra=None):
    from prefsculpt.models.loading import load_model
    from prefsculpt.shaping.config import ShapingConfig
    from prefsculpt.shaping.resolve import resolve_shaping
    from prefsculpt.train.datamodule import PreferenceDataModule
    from prefsculpt.train.module import PreferenceModule, freeze_below
    from prefsculpt.train.precompute import PrecomputeCache, RefContext, run_precompute

    sc = OmegaConf.merge(OmegaConf.structured(ShapingConfig),
                         {"concepts": concepts, "directions_path": str(directions_path), "instructions": INSTRUCTIONS,
                          "steer_multiplier": 4.0, **(shaping_extra or {})})
    shaping = resolve_shaping(sc, layer=LAYER)
    pairs = make_pairs()
    model = load_model(model_dir).eval()
    toks = tokenize_pairs(pairs, tok, 64, 32)
    ctx = RefContext(model, tok, pairs, toks, sc, [OmegaConf.create(c) for c in NAMED], LAYER, 64)
    with tempfile.TemporaryDirectory() as d:
        pre = run_precompute(ctx, shaping.interventions, PrecomputeCache(d), "m", str(sc.orient))
    start = freeze_below(model, None)
    dm = PreferenceDataModule(toks, pre, 4, tok.pad_token_id, seed=0)
    mod = PreferenceModule(model, beta=0.1, lr=LR, term_names=pre.term_names, lambdas=pre.lambdas,
                           hooks=shaping.interventions, start_layer=start)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, use_distributed_sampler=False)
    model.train()
    trainer.fit(mod, datamodule=dm)
    return model.eval(), pre


#: Per method, the entry fields besides concept/action/direction (strengths sized for 16 pairs x 3 epochs;
#: ΔA in units of its SD over the pairs, one scale for every method). score, measured (A, B; plain DPO
#: +1.785, −1.637): suppress λ 0.1 +1.731/−1.652, 0.2 +1.577/−2.031, 0.3 +1.412/−2.070, 0.45
#: +1.083/−0.904, 0.6 +1.044/+0.427, 1.0 +0.053/+1.078 (over-corrects). On this random model B is not
#: monotone below λ ≈ 0.4; 0.45 is the strength the earlier test used (λ 0.3 on span scores z-scored
#: by the pooled SD of A, ≈ 0.43 in SD(ΔA) units), not one picked from the sweep to pass.
METHODS = {
    "score": {"strength": 0.45},
    "steer": {"strength": 1.0},
    "inoculate": {"strength": 1.0},
    "filter": {"strength": 1.0, "share": 0.125},
    "ablate": {"strength": 0.0},
    "prevent": {"strength": 2.0},
}


def _cannot(why: str):
    return pytest.mark.xfail(strict=True, reason=f"measured on the tiny random model: {why}")


#: (method, action) -> what the tiny random model does; plain DPO's shifts are A +1.785, B −1.637.
#: A strict xfail documents a measured failure (and fails the suite if it starts to pass).
CASES = [
    pytest.param("score", "suppress", id="score-suppress"),  # A +1.083, B −0.904
    pytest.param("score", "amplify", id="score-amplify"),  # A +1.801, B −2.123
    pytest.param("filter", "suppress", id="filter-suppress"),  # A +0.446, B −1.521
    pytest.param("filter", "amplify", id="filter-amplify", marks=_cannot(
        "A +2.532 grows, but B −1.411 shrinks: dropping the one pair against B changes the batches more than "
        "it teaches B")),
    pytest.param("ablate", "suppress", id="ablate-suppress"),  # A +1.573, B −1.458
    pytest.param("prevent", "suppress", id="prevent-suppress"),  # A +0.727, B −0.151
    pytest.param("prevent", "amplify", id="prevent-amplify", marks=_cannot(
        "A +0.692, B −0.509: any residual edit while training a random model mostly stops the learned shift from "
        "carrying over to the unedited model (α = 0.5: suppress A +1.079 / B +0.006, amplify A +0.875 / B +0.012)")),
    pytest.param("steer", "suppress", id="steer-suppress", marks=_cannot(
        "A +0.943 shrinks but B −2.304 grows: steering a random model by m·v changes every token's log-prob, so "
        "ΔA_u barely follows the marker")),
    pytest.param("steer", "amplify", id="steer-amplify", marks=_cannot("A +1.988 grows but B −1.514 shrinks")),
    pytest.param("inoculate", "suppress", id="inoculate-suppress", marks=_cannot(
        "A +2.312 grows, B −0.933 shrinks: a random model does not read the instruction, so ΔA_u is noise")),
    pytest.param("inoculate", "amplify", id="inoculate-amplify", marks=_cannot("A +0.508 shrinks, B −3.140 grows")),
]


def entries(method: str, action: str, flip: bool = False) -> list[dict]:
    return [{"concept": f"named:{c}", "method": method, "action": action,
             "direction": -DIRECTION[c] if flip else DIRECTION[c], **METHODS[method]} for c in MARKS]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """Base preferences, the concept directions and plain DPO's shifts, once for the module."""
    from safetensors.torch import save_file

    from prefsculpt.models.loading import load_model

    base_model = load_model(tiny_model_dir).eval()
    base = prefs(base_model, tiny_tokenizer)
    dirs = {f"named:{c}": concept_direction(base_model, tiny_tokenizer, m) for c, m in MARKS.items()}
    path = tmp_path_factory.mktemp("dirs") / "directions.safetensors"
    save_file(dirs, str(path))
    plain, _ = train(tiny_model_dir, tiny_tokenizer, [], path)
    shift = {c: v - base[c] for c, v in prefs(plain, tiny_tokenizer).items()}
    assert shift["A"] > 0.3 and shift["B"] < -0.3, f"plain DPO must learn both concepts for the test to mean anything: {shift}"
    return {"base": base, "plain": shift, "dirs": path}


def shifts(setup, model_dir, tok, method, action, flip=False, extra=None):
    model, pre = train(model_dir, tok, entries(method, action, flip), setup["dirs"], extra)
    return {c: v - setup["base"][c] for c, v in prefs(model, tok).items()}, pre


@pytest.mark.slow  # 11 tiny trainings and plain DPO: about 3 min on 2 free CPU cores
@pytest.mark.parametrize(("method", "action"), CASES)
def test_suppress_shrinks_and_amplify_grows_the_shift_along_each_concept(method, action, setup, tiny_model_dir,
                                                                         tiny_tokenizer):
    plain = setup["plain"]
    got, pre = shifts(setup, tiny_model_dir, tiny_tokenizer, method, action)
    if method != "ablate":  # a projection has no sign
        assert set(pre.orientation_from.values()) == {"audit"}
        assert list(pre.orientation.values()) == [DIRECTION[c] for c in MARKS]
    print(f"\n{method} {action}: shift {got}, plain DPO {plain}")
    for c in MARKS:
        if action == "suppress":
            assert abs(got[c]) < abs(plain[c]), (method, action, c, got, plain)
        else:
            assert abs(got[c]) > abs(plain[c]), (method, action, c, got, plain)


@pytest.mark.slow
def test_the_audits_direction_decides_the_sign_so_a_flipped_one_breaks_suppress(setup, tiny_model_dir,
                                                                                tiny_tokenizer):
    """With each concept's direction given the wrong way round, suppress adds to what plain DPO learns:
    the sign comes from the audit's direction, not from the training pairs (which did not change)."""
    plain = setup["plain"]
    wrong, pre = shifts(setup, tiny_model_dir, tiny_tokenizer, "score", "suppress", flip=True)
    assert list(pre.orientation.values()) == [-DIRECTION[c] for c in MARKS]
    print(f"\nscore with flipped directions: suppress {wrong}, plain {plain}")
    for c in MARKS:
        assert abs(wrong[c]) > abs(plain[c]), (c, wrong, plain)


def test_orientation_comes_from_the_audit_even_when_the_training_split_disagrees(tiny_model_dir, tiny_tokenizer):
    """A weak concept: the audit found "chosen has more A" (+1) on all its pairs, but the training split
    happens to have A more often on the rejected side. ``orient=audit`` keeps the audit's sign;
    ``orient=data`` would re-estimate it from the split."""
    from prefsculpt.models.loading import load_model
    from prefsculpt.shaping.config import ShapingConfig
    from prefsculpt.shaping.resolve import resolve_shaping
    from prefsculpt.train.precompute import PrecomputeCache, RefContext, run_precompute

    pairs = [PreferencePair(f"p{i}", f"q{i}", "Paris." + (" !" if i == 0 else ""), "56." + (" !" if i in (1, 2) else ""))
             for i in range(6)]
    toks = tokenize_pairs(pairs, tiny_tokenizer, 64, 32)
    model = load_model(tiny_model_dir).eval()
    got = {}
    for orient in ("audit", "data", "formula"):
        for method in ("score", "filter"):
            sc = OmegaConf.merge(OmegaConf.structured(ShapingConfig), {"orient": orient, "concepts": [
                {"concept": "named:A", "method": method, "action": "suppress", "direction": 1,
                 **({"share": 0.2} if method == "filter" else {})}]})
            ctx = RefContext(model, tiny_tokenizer, pairs, toks, sc, [OmegaConf.create(NAMED[0])], None, 64)
            with tempfile.TemporaryDirectory() as d:
                pre = run_precompute(ctx, resolve_shaping(sc, None).interventions, PrecomputeCache(d), "m", orient)
            got[orient, method] = pre
    for method in ("score", "filter"):
        name = f"{method}/named:A"
        assert got["audit", method].orientation == {name: 1} and got["audit", method].orientation_from == {name: "audit"}
        assert got["data", method].orientation == {name: -1} and got["data", method].orientation_from == {name: "data"}
        assert got["formula", method].orientation == {name: 1}
    # score: the loss column is s·ΔA (pair 0 carries A on the chosen side: positive under the audit's sign)
    assert got["audit", "score"].delta_a[0, 0] > 0 > got["data", "score"].delta_a[0, 0]
    # filter drops the pair that teaches A the way the audit found it (pair 0), not those against it
    assert np.flatnonzero(got["audit", "filter"].weights == 0).tolist() == [0]
    assert set(np.flatnonzero(got["data", "filter"].weights == 0).tolist()) <= {1, 2}


def test_an_entry_without_a_direction_falls_back_to_the_training_pairs(tiny_model_dir, tiny_tokenizer, caplog):
    from prefsculpt.models.loading import load_model
    from prefsculpt.shaping.config import ShapingConfig
    from prefsculpt.shaping.resolve import resolve_shaping
    from prefsculpt.train.precompute import PrecomputeCache, RefContext, run_precompute

    pairs = make_pairs(8)
    toks = tokenize_pairs(pairs, tiny_tokenizer, 64, 32)
    sc = OmegaConf.merge(OmegaConf.structured(ShapingConfig), {"concepts": [
        {"concept": "named:B", "method": "score", "action": "suppress"}]})
    ctx = RefContext(load_model(tiny_model_dir).eval(), tiny_tokenizer, pairs, toks, sc,
                     [OmegaConf.create(c) for c in NAMED], None, 64)
    with tempfile.TemporaryDirectory() as d, caplog.at_level("WARNING"):
        pre = run_precompute(ctx, resolve_shaping(sc, None).interventions, PrecomputeCache(d), "m", "audit")
    assert pre.orientation == {"score/named:B": -1} and pre.orientation_from == {"score/named:B": "data"}
    assert "no audit direction" in caplog.text
