import json
import os

import numpy as np
import pytest
import torch

from prefsculpt.concepts import sae as S
from prefsculpt.concepts.activations import collect_activations
from prefsculpt.concepts.config import SAEConfig
from prefsculpt.concepts.sae_model import check_sae_fits
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.tokenize import tokenize_pairs
from prefsculpt.models.loading import load_model

LAYER = 2
TEXTS = [
    "What a great question! The capital of France is Paris.", "Water boils at 100 degrees Celsius.",
    "I think the answer is 54. You're right!", "**Paris** is the answer.", "There are 8 planets.",
    "Actually, it is 56.", "- one\n- two\n", "Hello, how are you? I am fine, thank you.",
]


def tiny_cfg(**kw):
    base = dict(expansion=2, k=4, training_tokens=8_192, batch_size_tokens=256, lr=3e-3, dead_feature_window=10,
                autocast=False, seed=0, layer=LAYER)
    return SAEConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tiny_tokenizer):
    """Layer-2 activations of 40 tiny-llama pairs (prompt once, both responses)."""
    pairs = [PreferencePair(f"p{i}", f"Question {i}: {TEXTS[i % 8]}", TEXTS[(i + 1) % 8], TEXTS[(i + 3) % 8] + f" {i}")
             for i in range(40)]
    tok = tokenize_pairs(pairs, tiny_tokenizer, 64, 32)
    model = load_model(tiny_model_dir).eval()
    return collect_activations(model, tok, LAYER, special_ids=tiny_tokenizer.all_special_ids,
                               pad_id=tiny_tokenizer.pad_token_id)


def test_train_reduces_reconstruction_error(tiny_cache):
    x = S.select_training_tokens(tiny_cache, tiny_cfg())
    sae, m = S.train_sae(tiny_cache, tiny_cfg(training_tokens=16_384))
    # The untrained starting point (decoder rows of norm 0.1, b_dec = mean) explains almost nothing.
    from sae_lens.registry import get_sae_training_class

    init_cfg = S.training_sae_config(tiny_cfg(), x.shape[1])
    init = get_sae_training_class("topk")[0](init_cfg)
    with torch.no_grad():
        init.b_dec.copy_(x.mean(0))
    before = S.sae_quality(init, x)["explained_variance"]
    assert m["sae/explained_variance"] > max(0.55, before + 0.3)
    assert m["sae/l0_mean"] == pytest.approx(4, abs=0.01)
    assert 0 <= m["sae/dead_share"] < 0.5
    assert m["sae/train_steps"] == 16_384 // 256
    # The returned SAE reads raw activations (the training-time scale is folded in).
    assert S.sae_quality(sae, x)["explained_variance"] == pytest.approx(m["sae/explained_variance"], abs=1e-4)


@pytest.mark.parametrize("fast", [False, True])
def test_autocast_only_where_bf16_is_fast(tiny_cache, monkeypatch, fast):
    """sae.autocast is dropped on a device without fast bf16 (an AVX2-only CPU emulates it, ~60x slower)."""
    import sae_lens.config

    seen = {}
    real = sae_lens.config.SAETrainerConfig

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(sae_lens.config, "SAETrainerConfig", spy)
    monkeypatch.setattr(S, "bf16_autocast_fast", lambda device: fast)
    S.train_sae(tiny_cache, tiny_cfg(autocast=True, training_tokens=512))
    assert seen["autocast"] is fast


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "standard"])
def test_other_architectures_train_and_encode(tiny_cache, arch):
    sae, m = S.train_sae(tiny_cache, tiny_cfg(architecture=arch, training_tokens=4_096, sparsity_coefficient=1.0))
    assert sae.cfg.architecture() == ("jumprelu" if arch == "batchtopk" else arch)
    assert m["sae/explained_variance"] > 0.2
    assert m["sae/l0_mean"] > 0


def test_unknown_architecture_is_named():
    with pytest.raises(S.SAESourceError, match="sae.architecture='gated'"):
        S.training_sae_config(tiny_cfg(architecture="gated"), 32)


def test_training_mask_drops_special_and_huge_norm_rows():
    acts = torch.ones(6, 4)
    acts[0] *= 500  # an attention-sink position
    special = torch.tensor([False, False, True, False, False, False])
    keep = S.training_token_mask(acts, special, max_norm_ratio=10)
    assert keep.tolist() == [False, True, False, True, True, True]
    assert S.training_token_mask(acts, None, max_norm_ratio=0).all()


def test_prefix_duplicates_keep_the_first_copy_only():
    # Pair 0 and 1 share the prompt prefix [5, 6] then differ; pair 2 repeats pair 0's prompt entirely.
    pair = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pos = np.array([0, 1, 2, 3, 0, 1, 2, 0, 1, 2])
    tok = np.array([5, 6, 7, 9, 5, 6, 8, 5, 6, 7])
    prompt = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 1], dtype=bool)  # row 3 is a response token
    dup = S.prefix_duplicate_mask(pair, pos, tok, prompt)
    assert dup.tolist() == [False, False, False, False, True, True, False, True, True, True]


def test_quality_counts_never_firing_latents_as_dead(tiny_cache):
    sae, _ = S.train_sae(tiny_cache, tiny_cfg(training_tokens=2_048))
    x = S.select_training_tokens(tiny_cache, tiny_cfg())
    with torch.no_grad():
        sae.W_enc[:, :3] = 0
        sae.b_enc[:3] = -1e6  # three latents can never win the top-k with a positive value
    q = S.sae_quality(sae, x)
    assert q["dead_share"] >= 3 / sae.cfg.d_sae


def test_cache_hit_returns_same_sae_without_training(tiny_cache, tmp_path, monkeypatch):
    cfg = tiny_cfg(training_tokens=4_096)
    sae, m, folder, hit = S.get_or_train_sae(tiny_cache, cfg, tmp_path, "tiny", "data1")
    assert not hit and S.is_complete_sae_dir(folder)
    assert json.loads((folder / S.QUALITY_FILE).read_text())["metrics"]["sae/train_steps"] == 16

    def boom(*a, **k):
        raise AssertionError("trained again on a cache hit")

    monkeypatch.setattr(S, "train_sae", boom)
    sae2, m2, folder2, hit2 = S.get_or_train_sae(lambda: boom(), cfg, tmp_path, "tiny", "data1")
    assert hit2 and folder2 == folder and m2 == pytest.approx(m)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, sae2.state_dict()[name]), name
    # Another data digest, layer or training setting is another SAE.
    keys = {S.sae_cache_key("tiny", 2, "data1", cfg), S.sae_cache_key("tiny", 3, "data1", cfg),
            S.sae_cache_key("tiny", 2, "data2", cfg), S.sae_cache_key("tiny", 2, "data1", tiny_cfg(k=5))}
    assert len(keys) == 4
    # ... but where the SAE is loaded from is not part of what it is.
    assert S.sae_cache_key("tiny", 2, "d", cfg) == S.sae_cache_key("tiny", 2, "d", tiny_cfg(training_tokens=4_096,
                                                                                                path="/x"))


def test_cache_write_is_atomic(tiny_cache, tmp_path, monkeypatch):
    sae, _ = S.train_sae(tiny_cache, tiny_cfg(training_tokens=1_024))
    target = tmp_path / "saes" / "k1"

    def crash(self, path):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "cfg.json"), "w").write("{")
        raise OSError("disk full")

    monkeypatch.setattr(type(sae), "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        S.save_sae_dir(sae, target, {"metrics": {}})
    assert not target.exists()
    assert list((tmp_path / "saes").iterdir()) == []  # no temp folder left behind
    monkeypatch.undo()
    # A folder that lacks quality.json (written last) is incomplete: removed and trained again.
    target.mkdir()
    sae.save_model(str(target))
    assert S.load_cached_sae(target) is None and not target.exists()


def test_path_source_roundtrip(tiny_cache, tmp_path):
    sae, _ = S.train_sae(tiny_cache, tiny_cfg(training_tokens=2_048))
    folder = S.save_sae_dir(sae, tmp_path / "mine", {"metrics": {}})
    loaded = S.load_sae(SAEConfig(source="path", path=str(folder)))
    x = tiny_cache.acts[:50]
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
    check_sae_fits(loaded, 32)
    with pytest.raises(S.SAESourceError, match="d_in=32 but the model's residual width is 576"):
        check_sae_fits(loaded, 576)


def test_path_source_errors_name_the_folder(tmp_path):
    with pytest.raises(S.SAESourceError, match=r"lacks \['cfg.json', 'sae_weights.safetensors'\]"):
        S.load_sae(SAEConfig(source="path", path=str(tmp_path)))
    with pytest.raises(S.SAESourceError, match="needs sae.path"):
        S.load_sae(SAEConfig(source="path"))
    with pytest.raises(S.SAESourceError, match="sae.source='nope'"):
        S.load_sae(SAEConfig(source="nope"))


def test_pretrained_offline_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(S.SAESourceError) as err:
        S.load_sae(SAEConfig(source="pretrained", release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre"))
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and "sae.source=path" in msg and "save_model" in msg
    assert "SAE.load_from_disk" in msg
    with pytest.raises(S.SAESourceError, match="needs sae.release"):
        S.load_sae(SAEConfig(source="pretrained"))
