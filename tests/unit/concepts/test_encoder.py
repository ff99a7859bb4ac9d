import numpy as np
import pandas as pd
import pytest
import torch

from prefsculpt.concepts.activations import (
    ActivationCache,
    collect_activations,
    length_buckets,
    pack_pairs,
    packed_forward,
)
from prefsculpt.concepts.config import EncodeConfig
from prefsculpt.concepts.encoder import NamedDirections, encode_pairs
from prefsculpt.concepts.shards import load_scores
from prefsculpt.data.tokenize import TokenizedPair
from prefsculpt.models.loading import load_model

LAYER = 1


def make_pairs(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: torch.randint(3, 250, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(f"p{i}", rand(2, 9), rand(1, 8), rand(1, 8), False, False, False) for i in range(n)]


def make_sae(d_in, d_sae=48, k=6):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae.eval()


@pytest.fixture
def model(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def direct_scores(model, sae, pairs, extra=None, layer=LAYER):
    """Full forward per sequence, slice hidden_states[l+1], SAE encode, max / freq per span."""
    out = {f"{s}_{st}": [] for s in ("prompt", "chosen", "rejected") for st in ("max", "freq")}
    with torch.inference_mode():
        for p in pairs:
            n_p = len(p.prompt_ids)
            for side in ("chosen", "rejected"):
                ids, _ = p.sequence(side)
                h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]  # (T, d)
                a = sae.encode(h)
                if extra is not None:
                    a = torch.cat([a, torch.relu(h @ extra.vectors.T - extra.bias)], dim=-1)
                spans = {side: a[n_p:]} | ({"prompt": a[:n_p]} if side == "chosen" else {})
                for s, x in spans.items():
                    out[f"{s}_max"].append(x.max(0).values.numpy())
                    out[f"{s}_freq"].append((x > 0).float().mean(0).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def test_packed_pairs_equal_separate_sequences(model):
    pairs = make_pairs(4)
    batch = pack_pairs(pairs)
    with torch.inference_mode():
        h = packed_forward(model, batch, LAYER)
        for b, p in enumerate(pairs):
            n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            for side, sl in (("chosen", slice(n_p, n_p + n_c)), ("rejected", slice(n_p + n_c, n_p + n_c + n_r))):
                ref = model(torch.tensor([p.sequence(side)[0]]), output_hidden_states=True).hidden_states[LAYER + 1][0]
                torch.testing.assert_close(h[b, :n_p], ref[:n_p], rtol=0, atol=1e-5)
                torch.testing.assert_close(h[b, sl], ref[n_p:], rtol=0, atol=1e-5)


def test_length_buckets_respect_budget_and_cover_all():
    lengths = [5, 30, 7, 12, 29, 6, 100]
    batches = length_buckets(lengths, range(7), 40)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
    assert batches[0] == [6]  # longest first, alone when over budget


@pytest.mark.parametrize("use_cache", [False, True])
def test_encoder_scores_equal_direct_computation(model, tiny_tokenizer, tmp_path, use_cache):
    pairs = make_pairs(7)
    sae = make_sae(model.config.hidden_size)
    d = model.config.hidden_size
    extra = NamedDirections(["bold", "emoji"], torch.randn(2, d), torch.tensor([0.1, -0.2]))
    cache = collect_activations(model, pairs, LAYER, batch_tokens=40) if use_cache else None
    cfg = EncodeConfig(shard_size=3, batch_tokens=40, top_contexts=4, context_window=2)
    out = encode_pairs(model, sae, pairs, tmp_path / "enc", cfg, LAYER, extra, activations=cache, tokenizer=tiny_tokenizer)
    scores = load_scores(out)
    ref = direct_scores(model, sae, pairs, extra)
    assert scores.pair_ids == [p.id for p in pairs]
    assert scores.concept_names[:2] == ["latent:0", "latent:1"] and scores.concept_names[-2:] == ["named:bold", "named:emoji"]
    for (span, stat), v in scores.values.items():
        assert v.shape == (7, 48 + 2) and v.dtype == np.float32
        np.testing.assert_allclose(v, ref[f"{span}_{stat}"], rtol=0, atol=1e-5, err_msg=f"{span} {stat}")
    assert (scores.get("chosen") > 0).any() and (scores.get("chosen", "freq") < 1).any()  # non-trivial
    np.testing.assert_array_equal(scores.n_tokens["rejected"], [len(p.rejected_ids) for p in pairs])

    top = pd.read_parquet(out / "top_contexts.parquet")
    assert set(top.span) <= {"chosen", "rejected"}
    for f in (0, 5, 49):
        name = scores.concept_names[f]
        for span in ("chosen", "rejected"):
            rows = top[(top.concept == name) & (top.span == span)].sort_values("rank")
            col = scores.get(span)[:, f]
            if col.max() <= 0:
                assert rows.empty
                continue
            best = rows.iloc[0]
            assert best.value == pytest.approx(col.max(), abs=1e-5)
            p = pairs[scores.pair_ids.index(best.pair_id)]
            seq = p.sequence(span)[0]
            assert best.position >= len(p.prompt_ids)
            assert best.token == tiny_tokenizer.decode(seq[best.position : best.position + 1])
            assert best.left == tiny_tokenizer.decode(seq[max(0, best.position - 2) : best.position])
            assert len(rows) <= 4 and (np.diff(rows.value.to_numpy()) <= 0).all()


def test_activation_cache_roundtrip_and_layout(model, tmp_path):
    pairs = make_pairs(3)
    cache = collect_activations(model, pairs, LAYER, batch_tokens=30, special_ids=[2])
    assert cache.n_tokens == sum(len(p.prompt_ids) * 1 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    back = ActivationCache.load(cache.save(tmp_path / "acts.safetensors"))
    torch.testing.assert_close(back.acts, cache.acts)
    assert back.pair_ids == cache.pair_ids and back.layer == LAYER
    assert back.special[cache.position == 0].all()
    assert cache.training_mask(None).sum() == (~cache.special).sum()
    # rows of pair 1, rejected span: positions restart after the prompt
    p = pairs[1]
    rows = (cache.pair_index == 1) & (cache.span == 2)
    assert cache.position[rows].tolist() == list(range(len(p.prompt_ids), len(p.prompt_ids) + len(p.rejected_ids)))
    assert cache.token_id[rows].tolist() == p.rejected_ids
    with pytest.raises(ValueError, match="layer"):
        encode_pairs(model, make_sae(model.config.hidden_size), pairs, tmp_path / "x", EncodeConfig(), LAYER + 1,
                     activations=cache)


def test_bf16_is_close(model, tmp_path):
    pairs = make_pairs(4)
    sae = make_sae(model.config.hidden_size)
    f32 = load_scores(encode_pairs(model, sae, pairs, tmp_path / "a", EncodeConfig(shard_size=4), LAYER))
    bf = load_scores(encode_pairs(model, sae, pairs, tmp_path / "b", EncodeConfig(shard_size=4, precision="bfloat16"), LAYER))
    np.testing.assert_allclose(bf.get("prompt"), f32.get("prompt"), atol=0.1 * f32.get("prompt").max())


@pytest.mark.integration
def test_smollm2_encoder_matches_direct_computation(smollm2_dir, tmp_path):
    """The real model (GQA, sdpa, chat template): packed + truncated equals full forward + slice."""
    from prefsculpt.data.planted import PlantedConfig, generate_planted
    from prefsculpt.data.tokenize import tokenize_pairs
    from prefsculpt.models.loading import load_tokenizer

    model, tok = load_model(smollm2_dir).eval(), load_tokenizer(smollm2_dir)
    pairs = tokenize_pairs(generate_planted(PlantedConfig(n_pairs=4, seed=3)), tok)
    sae = make_sae(model.config.hidden_size, d_sae=256, k=16)
    out = encode_pairs(model, sae, pairs, tmp_path / "enc", EncodeConfig(shard_size=2), 15, tokenizer=tok)
    ref = direct_scores(model, sae, pairs, layer=15)
    scores = load_scores(out)
    for (span, stat), v in scores.values.items():
        np.testing.assert_allclose(v, ref[f"{span}_{stat}"], rtol=0, atol=2e-4, err_msg=f"{span} {stat}")
