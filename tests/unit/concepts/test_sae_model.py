"""Published-SAE connection (issue 14.3): hook -> layer, sae-lens' own encode, fit checks. Offline."""

import json

import pytest
import torch

from prefsculpt.concepts import sae_model as M
from prefsculpt.concepts.config import SAEConfig
from prefsculpt.concepts.encoder import ConceptEncoder
from prefsculpt.concepts.sae import SAESourceError, load_sae
from prefsculpt.models.hooks import capture_residual, truncated_forward
from prefsculpt.models.loading import load_model

D, F = 32, 48


def make_sae(arch: str, hook: str = "blocks.2.hook_resid_post", model_name: str = "gemma-2-2b", **cfg):
    """A sae-lens inference SAE with random (non-trivial) weights, as a published one would be."""
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(arch)
    extra = {"topk": {"k": 5}}.get(arch, {})
    c = cfg_cls(d_in=D, d_sae=F, **extra, **cfg)
    c.metadata.hook_name, c.metadata.model_name = hook, model_name
    sae = sae_cls(c)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()  # JumpReLU thresholds are positive
    return sae.eval()


def hand_codes(arch: str, sae, x: torch.Tensor, layer_norm: bool = False) -> torch.Tensor:
    """The published formulas, written out: pre = (x' - b_dec) W_enc + b_enc, then the activation."""
    if layer_norm:
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.std(-1, keepdim=True) + 1e-5)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > sae.threshold)
    vals, idx = torch.relu(pre).topk(5, dim=-1)  # topk: the 5 largest, the rest 0
    return torch.zeros_like(pre).scatter(-1, idx, vals)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "standard"])
def test_saved_sae_loaded_by_path_gives_sae_lens_codes(arch, tmp_path):
    from sae_lens import SAE

    sae = make_sae(arch)
    sae.save_model(str(tmp_path / arch))
    loaded = load_sae(SAEConfig(source="path", path=str(tmp_path / arch)))
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(2)) * 2
    ours = M.sae_codes(loaded, x)
    direct = SAE.load_from_disk(str(tmp_path / arch), device="cpu").encode(x)
    assert ours.shape == (3, 7, F)
    assert torch.equal(ours, direct)
    assert torch.allclose(ours, hand_codes(arch, sae, x), atol=1e-5)
    assert 0 < (ours > 0).float().mean() < 1  # the activation did something: neither all nor none fire
    # The encoder (what the sae stage scores with) uses the same codes.
    enc = ConceptEncoder(model=None, sae=loaded, layer=2)
    assert torch.allclose(enc.concept_acts(x), direct, atol=1e-6)


def test_the_sae_s_own_layer_norm_is_applied_once(tmp_path):
    sae = make_sae("standard", normalize_activations="layer_norm")
    sae.save_model(str(tmp_path / "ln"))
    loaded = load_sae(SAEConfig(source="path", path=str(tmp_path / "ln")))
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(3)) * 50 + 7  # far from normalised
    assert torch.allclose(M.sae_codes(loaded, x), hand_codes("standard", sae, x, layer_norm=True), atol=1e-4)
    assert not torch.allclose(M.sae_codes(loaded, x), hand_codes("standard", sae, x), atol=1e-2)


def test_unfolded_expected_average_scale_is_refused(tmp_path):
    sae = make_sae("jumprelu", normalize_activations="expected_average_only_in")
    with pytest.raises(SAESourceError, match="fold_activation_norm_scaling_factor"):
        M.check_sae_fits(sae, D, ["google/gemma-2-2b"])


@pytest.mark.parametrize("hook,layer", [
    ("blocks.12.hook_resid_post", 12), ("model.layers.15", 15), ("model.model.layers.3", 3), ("layers.0", 0),
    ("blocks.5.hook_resid_pre", 4),
])
def test_hook_names_map_to_decoder_layers(hook, layer):
    assert M.layer_of_hook(hook) == layer


@pytest.mark.parametrize("hook", ["blocks.3.hook_mlp_out", "blocks.0.hook_resid_pre", "blocks.2.attn.hook_z", ""])
def test_other_hooks_are_refused_by_name(hook):
    with pytest.raises(SAESourceError, match="residual stream after a decoder layer"):
        M.layer_of_hook(hook)


def test_hf_hook_name_wins_and_the_layer_comes_from_the_sae():
    sae = make_sae("jumprelu", hook="blocks.9.hook_resid_post")
    assert M.resolve_layer(None, sae, n_layers=4 + 20) == 9
    sae.cfg.metadata.hf_hook_name = "model.layers.2"
    assert M.resolve_layer(None, sae, n_layers=4) == 2
    assert M.resolve_layer(2, sae, n_layers=4) == 2
    with pytest.raises(SAESourceError, match=r"sae.layer=1 but the SAE was trained at hook 'model.layers.2'.*sae.layer=2"):
        M.resolve_layer(1, sae, n_layers=4)
    with pytest.raises(SAESourceError, match="model has 2 layers"):
        M.resolve_layer(None, sae, n_layers=2)
    sae.cfg.metadata.hf_hook_name = sae.cfg.metadata.hook_name = None
    with pytest.raises(SAESourceError, match="names no hook"):
        M.resolve_layer(None, sae, n_layers=4)
    assert M.resolve_layer(3, sae, n_layers=4) == 3


def test_fit_checks_name_width_and_model():
    sae = make_sae("jumprelu", model_name="gemma-2-2b")
    M.check_sae_fits(sae, D, ["google/gemma-2-2b"])  # the hub name's last part matches
    M.check_sae_fits(sae, D, ["/models/Gemma-2-2B/"])  # a local folder of that name, any case
    with pytest.raises(SAESourceError, match="d_in=32 but the model's residual width is 2304"):
        M.check_sae_fits(sae, 2304, ["google/gemma-2-2b"])
    with pytest.raises(SAESourceError, match=r"trained on model 'gemma-2-2b'.*sae.check_model=false"):
        M.check_sae_fits(sae, D, ["meta-llama/Llama-3.1-8B"])
    M.check_sae_fits(sae, D, ["meta-llama/Llama-3.1-8B"], check_model=False)


def test_saved_folder_and_later_stages_read_the_same_layer(tmp_path, tiny_model_dir):
    sae = make_sae("topk", hook="blocks.1.hook_resid_post")
    sae.save_model(str(tmp_path / "s"))
    assert M.sae_dir_layer(tmp_path / "s") == 1
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert M.concept_layer(None, tmp_path / "s", tiny_model_dir) == 1
    assert M.concept_layer(None, None, tiny_model_dir) == 2  # 4 layers: the middle one, as source=train picks
    with pytest.raises(SAESourceError, match="reads decoder layer 1"):
        M.concept_layer(3, tmp_path / "s", tiny_model_dir)


def test_resid_post_hook_is_the_decoder_layer_output_also_for_the_last_layer(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir).eval()
    n = len(model.model.layers)
    enc = tiny_tokenizer(["What is 7 times 8?", "Water boils at 100 degrees"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**enc, output_hidden_states=True).hidden_states  # (n + 1) x (B, T, d)
        for layer in range(n - 1):  # inner layers: hidden_states[N + 1]
            got = truncated_forward(model, enc.input_ids, enc.attention_mask, M.layer_of_hook(f"blocks.{layer}.hook_resid_post"))
            assert torch.allclose(got, full[layer + 1], atol=1e-5), layer
        last = M.layer_of_hook(f"blocks.{n - 1}.hook_resid_post")
        got = truncated_forward(model, enc.input_ids, enc.attention_mask, last)
        with capture_residual(model, last) as seen:
            model(**enc)
        assert torch.allclose(got, seen[0], atol=1e-6)  # the decoder layer's own output ...
        assert not torch.allclose(got, full[n], atol=1e-3)  # ... not hidden_states[-1], the final norm's
        assert torch.allclose(model.model.norm(got), full[n], atol=1e-5)
