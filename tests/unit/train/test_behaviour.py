"""Behaviour, not formulas: shaping a marker concept changes how much of it the policy learns.

Pairs: the chosen side is the right answer; in half of them it also ends with a marker (" !"), the
concept. A_u = marker count (a regex named concept, z-scored). After training, the policy's
preference for appending the marker on held-out answers must be ordered amplify > plain > suppress.
"""

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
      ("Is it Paris?", "Actually, it is Paris.", "You're right! It is 56.")]
MARK = " !"
NAMED = [{"name": "marker", "kind": "regex", "pattern": "!"}]


def make_pairs(n: int, offset: int = 0):
    out = []
    for i in range(n):
        q, good, bad = QA[(i + offset) % len(QA)]
        chosen = good + (MARK if i % 2 == 0 else "")
        out.append(PreferencePair(f"p{i + offset}", f"{q} ({i + offset})", chosen, bad))
    return out


def marker_preference(model, tok, pairs) -> float:
    """Mean over held-out answers of log π(answer + marker) − log π(answer)."""
    from prefsculpt.train.forward import pad_right, sequence_logps

    with_m = [PreferencePair(p.id, p.prompt, p.chosen.rstrip(" !") + MARK, p.chosen.rstrip(" !")) for p in pairs]
    toks = tokenize_pairs(with_m, tok, 64, 32)
    seqs = [t.sequence("chosen") for t in toks] + [t.sequence("rejected") for t in toks]
    with torch.no_grad():
        lp = sequence_logps(model, pad_right([s[0] for s in seqs], tok.pad_token_id), pad_right([s[1] for s in seqs], 0))
    a, b = lp.chunk(2)
    return float((a - b).mean())


def train_shaped(model_dir, tok, pairs, concepts, epochs=3, shaping_extra=None, top=None):
    from prefsculpt.models.loading import load_model
    from prefsculpt.shaping.config import ShapingConfig
    from prefsculpt.shaping.resolve import resolve_shaping
    from prefsculpt.train.datamodule import PreferenceDataModule
    from prefsculpt.train.module import PreferenceModule, freeze_below
    from prefsculpt.train.precompute import PrecomputeCache, RefContext, run_precompute

    sc = OmegaConf.merge(OmegaConf.structured(ShapingConfig), {"concepts": concepts, **(shaping_extra or {})})
    shaping = resolve_shaping(sc, layer=1)
    model = load_model(model_dir).eval()
    toks = tokenize_pairs(pairs, tok, 64, 32)
    named = [OmegaConf.create(c) for c in NAMED]
    ctx = RefContext(model, tok, pairs, toks, sc, named, 1, 64)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pre = run_precompute(ctx, shaping.interventions, PrecomputeCache(d), "m", str(sc.orient))
    start = freeze_below(model, top)
    dm = PreferenceDataModule(toks, pre, 4, tok.pad_token_id, seed=0)
    mod = PreferenceModule(model, beta=0.1, lr=3e-3, term_names=pre.term_names, lambdas=pre.lambdas,
                           hooks=shaping.interventions, start_layer=start)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, use_distributed_sampler=False)
    model.train()
    trainer.fit(mod, datamodule=dm)
    return model.eval(), dm, pre


@pytest.fixture(scope="module")
def data():
    return make_pairs(12), make_pairs(12, offset=100)


def test_score_suppress_lowers_and_amplify_raises_the_concept(tiny_model_dir, tiny_tokenizer, data):
    train, held = data
    from prefsculpt.models.loading import load_model

    base = marker_preference(load_model(tiny_model_dir), tiny_tokenizer, held)
    score = {"concept": "named:marker", "method": "score", "strength": 3.0}
    plain, _, _ = train_shaped(tiny_model_dir, tiny_tokenizer, train, [])
    sup, _, pre = train_shaped(tiny_model_dir, tiny_tokenizer, train, [{**score, "action": "suppress"}])
    amp, _, _ = train_shaped(tiny_model_dir, tiny_tokenizer, train, [{**score, "action": "amplify"}])
    assert pre.term_names == ["score/named:marker"] and pre.lambdas.tolist() == [3.0]
    m_plain, m_sup, m_amp = (marker_preference(m, tiny_tokenizer, held) for m in (plain, sup, amp))
    assert m_plain > base + 0.5, "plain DPO must learn the marker at all for the comparison to mean anything"
    assert m_sup < m_plain < m_amp, (base, m_sup, m_plain, m_amp)


def test_filter_drops_exactly_the_share_and_those_carry_the_concept(tiny_model_dir, tiny_tokenizer, data):
    train, _ = data
    f = {"concept": "named:marker", "method": "filter", "action": "suppress", "share": 0.25}
    _, dm, pre = train_shaped(tiny_model_dir, tiny_tokenizer, train, [f], epochs=1)
    assert dm.n_dropped == 3 == round(0.25 * len(train))
    assert len(dm.dataset) == len(train) - 3
    dropped = [train[i] for i in np.flatnonzero(pre.weights == 0)]
    assert all("!" in p.chosen for p in dropped)


def test_ablate_trains_with_hook_and_saved_policy_runs_without(tiny_model_dir, tiny_tokenizer, data, tmp_path,
                                                               mlflow_uri):
    import mlflow
    from safetensors.torch import save_file

    from prefsculpt.stages.train import run_train
    from tests.unit.train.helpers import train_cfg

    d = tmp_path / "dirs.safetensors"
    save_file({"named:marker": torch.randn(32)}, str(d))
    cfg = train_cfg(tiny_model_dir, tmp_path, train={"max_pairs": 4, "log_model": True, "train_top_layers": None},
                    shaping={"concepts": [{"concept": "named:marker", "method": "ablate"}], "layer": 1,
                             "directions_path": str(d)})
    out = run_train(cfg)
    assert out["optimizer_steps"] == 1
    from prefsculpt.models.loading import load_model

    saved = load_model(out["policy_dir"])
    assert not any(m._forward_hooks for m in saved.modules())
    pyf = mlflow.pyfunc.load_model(out["model_uri"])
    gen = pyf.predict({"messages": [{"role": "user", "content": "What is 7 times 8?"}], "max_tokens": 4})
    assert len(gen) == 1 and gen[0]["usage"]["completion_tokens"] <= 4
    assert isinstance(gen[0]["choices"][0]["message"]["content"], str)
    lm = mlflow.get_logged_model(out["model_uri"].removeprefix("models:/"))
    assert lm.tags["prefsculpt.train_run_id"] == out["run_id"] and "named:marker" in lm.tags["prefsculpt.shaping"]


def make_pairs_marker_rejected(n: int, offset: int = 0):
    """The same pairs with the marker on the *rejected* side of every other pair: the data teaches
    "less marker" (as the planted sycophancy data teaches "fewer corrections")."""
    out = []
    for i in range(n):
        q, good, bad = QA[(i + offset) % len(QA)]
        out.append(PreferencePair(f"p{i + offset}", f"{q} ({i + offset})", good, bad + (MARK if i % 2 == 0 else "")))
    return out


def test_suppress_of_a_concept_the_preferred_side_lacks_learns_less_of_its_avoidance(tiny_model_dir, tiny_tokenizer):
    """shaping.orient=data: suppress explains the concept away in whichever direction the data
    prefers it, so the policy avoids the marker less than after plain DPO; under orient=formula the
    same λ > 0 adds to the lesson instead (METHOD §5's raw sign), which is why data is the default."""
    train, held = make_pairs_marker_rejected(12), make_pairs(12, offset=100)
    spec = [{"concept": "named:marker", "method": "score", "strength": 3.0, "action": "suppress"}]
    plain, _, _ = train_shaped(tiny_model_dir, tiny_tokenizer, train, [])
    sup, _, pre = train_shaped(tiny_model_dir, tiny_tokenizer, train, spec)
    raw, _, pre_raw = train_shaped(tiny_model_dir, tiny_tokenizer, train, spec, shaping_extra={"orient": "formula"})
    assert pre.orientation == {"score/named:marker": -1} and pre_raw.orientation == {"score/named:marker": 1}
    assert (pre.delta_a[:, 0] >= 0).all() and (pre_raw.delta_a[:, 0] <= 0).all()
    m_plain, m_sup, m_raw = (marker_preference(m, tiny_tokenizer, held) for m in (plain, sup, raw))
    assert m_raw < m_plain < m_sup, (m_raw, m_plain, m_sup)


def test_filter_on_a_concept_the_preferred_side_lacks_drops_the_pairs_that_teach_it(tiny_model_dir, tiny_tokenizer):
    train = make_pairs_marker_rejected(12)
    f = {"concept": "named:marker", "method": "filter", "action": "suppress", "share": 0.25}
    _, dm, pre = train_shaped(tiny_model_dir, tiny_tokenizer, train, [f], epochs=1)
    assert dm.n_dropped == 3
    dropped = [train[i] for i in np.flatnonzero(pre.weights == 0)]
    assert all("!" in p.rejected and "!" not in p.chosen for p in dropped)
