"""Forward paths, batching and the train stage on the tiny llama."""

import json

import mlflow
import torch

from prefsculpt.train.datamodule import BucketBatchSampler, truncate_pair
from prefsculpt.train.forward import pad_right, sequence_logps


def _batch(tok):
    from prefsculpt.data.schema import PreferencePair
    from prefsculpt.data.tokenize import tokenize_pairs

    pairs = [PreferencePair("a", "What is 7 times 8?", "7 times 8 is 56.", "You're right! 54."),
             PreferencePair("b", "Capital of France?", "**Paris** is the answer. Paris.", "Paris")]
    toks = tokenize_pairs(pairs, tok, 64, 32)
    seqs = [t.sequence("chosen") for t in toks] + [t.sequence("rejected") for t in toks]
    return pad_right([s[0] for s in seqs], tok.pad_token_id), pad_right([s[1] for s in seqs], 0), toks


def test_response_only_logps_equal_full_logits(tiny_model_dir, tiny_tokenizer):
    from prefsculpt.models.loading import load_model

    model = load_model(tiny_model_dir)
    ids, mask, _ = _batch(tiny_tokenizer)
    ours = sequence_logps(model, ids, mask)
    attn = (ids != -1).long()
    for i in range(ids.shape[0]):  # unpadded reference, one sequence at a time
        n = int(mask[i].nonzero().max()) + 1
        attn[i, n:] = 0
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    tok_lp = logp.gather(2, ids[:, 1:, None]).squeeze(2) * mask[:, 1:]
    torch.testing.assert_close(ours, tok_lp.sum(1), atol=1e-4, rtol=1e-5)
    assert (ours < 0).all()


def test_top_layers_on_cached_trunk_equal_full_forward(tiny_model_dir, tiny_tokenizer):
    from prefsculpt.models.hooks import truncated_forward
    from prefsculpt.models.loading import load_model

    model = load_model(tiny_model_dir)
    ids, mask, _ = _batch(tiny_tokenizer)
    trunk = truncated_forward(model, ids, None, 1)  # input of layer 2
    torch.testing.assert_close(sequence_logps(model, ids, mask, trunk=trunk, start_layer=2),
                               sequence_logps(model, ids, mask), atol=1e-5, rtol=1e-5)


def test_bucket_sampler_is_deterministic_bucketed_and_resumes():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9, 46, 10, 45]
    s = BucketBatchSampler(lengths, batch_size=2, seed=3, bucket_batches=6)
    s.sampler.set_epoch(1)
    full = list(s)
    assert sorted(i for b in full for i in b) == list(range(12))
    spreads = [abs(lengths[b[0]] - lengths[b[1]]) for b in full]
    assert max(spreads) <= 3  # similar lengths share a batch
    s2 = BucketBatchSampler(lengths, batch_size=2, seed=3, bucket_batches=6)
    s2.load_state_dict({"epoch": 1, "consumed": 4})
    s2.sampler.set_epoch(1)
    assert list(s2) == full[4:]
    s2.sampler.set_epoch(2)
    assert len(list(s2)) == 6 and list(s2) != full


def test_truncate_pair_keeps_start_like_trl(tiny_tokenizer):
    _, _, toks = _batch(tiny_tokenizer)
    t = toks[0]
    cut = truncate_pair(t, len(t.prompt_ids) + 2)
    assert cut.chosen_ids == t.chosen_ids[:2] and cut.prompt_ids == t.prompt_ids
    assert truncate_pair(t, len(t.prompt_ids)) is None


def test_edits_below_the_trained_layers_train_with_the_edit_folded_into_the_trunk(tiny_model_dir, tmp_path, mlflow_uri):
    """ablate / prevent at ℓ = 1 while only the top layer (3) trains: the default layout (sae.layer below
    train.train_top_layers) used to be refused."""
    import mlflow
    from safetensors.torch import save_file

    from prefsculpt.stages.train import run_train
    from tests.unit.train.helpers import train_cfg

    d = tmp_path / "dirs.safetensors"
    save_file({"named:a": torch.randn(32), "named:b": torch.randn(32)}, str(d))
    cfg = train_cfg(tiny_model_dir, tmp_path, train={"train_top_layers": 1, "max_pairs": 8},
                    shaping={"concepts": [{"concept": "named:a", "method": "ablate"},
                                          {"concept": "named:b", "method": "prevent", "strength": 2.0,
                                           "direction": -1}],
                             "layer": 1, "directions_path": str(d)})
    out = run_train(cfg)
    assert out["optimizer_steps"] == 2
    params = mlflow.get_run(out["run_id"]).data.params
    assert params["shaping/prevent/named_b/orientation"] == "-1"
    assert params["shaping/prevent/named_b/orientation_from"] == "audit"


def test_folded_trunk_is_the_edited_forward(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The trunk an edit below the trained layers is folded into equals the output of the last frozen
    layer under that edit (and differs from the reference's unedited trunk)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from prefsculpt.data.schema import PreferencePair
    from prefsculpt.data.tokenize import tokenize_pairs
    from prefsculpt.models.hooks import add_to_residual, truncated_forward
    from prefsculpt.models.loading import load_model
    from prefsculpt.shaping.config import ShapingConfig
    from prefsculpt.shaping.resolve import resolve_shaping
    from prefsculpt.train.forward import pack_pairs
    from prefsculpt.train.module import split_edits
    from prefsculpt.train.precompute import PrecomputeCache, RefContext, run_precompute, trunk_cache

    v = torch.randn(32)
    save_file({"named:a": v}, str(tmp_path / "dirs.safetensors"))
    sc = OmegaConf.merge(OmegaConf.structured(ShapingConfig), {"directions_path": str(tmp_path / "dirs.safetensors"),
                                                                "concepts": [
        {"concept": "named:a", "method": "prevent", "strength": 3.0, "direction": -1, "action": "amplify"}]})
    shaping = resolve_shaping(sc, layer=0)
    live, folded = split_edits(shaping.interventions, 2)
    assert not live and folded == shaping.interventions
    pairs = [PreferencePair("p0", "What is 7 times 8?", "56.", "54."), PreferencePair("p1", "Paris?", "Yes.", "No.")]
    tok = tiny_tokenizer
    toks = tokenize_pairs(pairs, tok, 64, 32)
    model = load_model(tiny_model_dir).eval()
    ctx = RefContext(model, tok, pairs, toks, sc, [], 0, 64)
    cache = PrecomputeCache(tmp_path / "cache")
    pre = run_precompute(ctx, shaping.interventions, cache, "m", "audit")
    assert pre.orientation == {"prevent/named:a": -1}
    trunk = trunk_cache(ctx, 2, cache, "m", edits=folded)
    b = pack_pairs(toks, tok.pad_token_id)
    unit = v / v.norm()
    with torch.no_grad(), add_to_residual(model, 0, unit, -3.0 * -1):  # amplify (α = −λ) times s = −1
        want = truncated_forward(model, b["input_ids"], b["attention_mask"], 1, position_ids=b["position_ids"])
    with torch.no_grad():
        plain = truncated_forward(model, b["input_ids"], b["attention_mask"], 1, position_ids=b["position_ids"])
    for i, (s0, p, c) in enumerate(trunk["offsets"].tolist()):
        n = p + c + len(toks[i].rejected_ids)
        torch.testing.assert_close(trunk["data"][s0 : s0 + n], want[i, :n])
        assert not torch.allclose(trunk["data"][s0 : s0 + n], plain[i, :n])
    unedited = trunk_cache(ctx, 2, cache, "m")["data"]  # its own cache key: not the edited one
    assert not torch.allclose(unedited, trunk["data"])


def test_run_train_plain_dpo_logs_one_run_and_saves_policy(tiny_model_dir, tmp_path, mlflow_uri):
    from prefsculpt.stages.train import run_train
    from tests.unit.train.helpers import train_cfg

    # bf16 autocast and a bf16 trunk cache (cast back to the fp32 weights) on the way.
    cfg = train_cfg(tiny_model_dir, tmp_path, train={"max_pairs": 16, "train_top_layers": 2, "precision": "bf16-mixed",
                                                     "trunk_dtype": "bfloat16"})
    out = run_train(cfg)
    assert out["optimizer_steps"] == 4  # 16 pairs / batch 4, one epoch
    run = mlflow.get_run(out["run_id"])
    assert run.data.tags["prefsculpt.stage"] == "train"
    hist = mlflow.MlflowClient().get_metric_history(out["run_id"], "train/loss")
    assert len(hist) == 4 and all(h.value > 0 for h in hist)
    assert "train/rewards/margins" in run.data.metrics
    assert (tmp_path / "cache" / "precompute").is_dir()
    done = json.loads((tmp_path / "cache" / "train").glob("*/done.json").__next__().read_text())
    assert done["run_id"] == out["run_id"]
    # The saved policy differs from the initial weights (it trained) and loads as a plain HF model.
    from prefsculpt.models.loading import load_model

    before, after = load_model(tiny_model_dir), load_model(out["policy_dir"])
    top = len(after.model.layers) - 1
    assert not torch.equal(before.model.layers[top].mlp.up_proj.weight, after.model.layers[top].mlp.up_proj.weight)
    assert torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)


def test_trunk_from_the_reference_pass_equals_the_truncated_forward(tiny_model_dir, tiny_tokenizer, tmp_path):
    from omegaconf import OmegaConf

    from prefsculpt.models.loading import load_model
    from prefsculpt.shaping.config import ShapingConfig
    from prefsculpt.train.precompute import PrecomputeCache, RefContext, trunk_cache

    _, _, toks = _batch(tiny_tokenizer)
    model = load_model(tiny_model_dir).eval()
    sc = OmegaConf.structured(ShapingConfig)
    joint = RefContext(model, tiny_tokenizer, [None] * len(toks), toks, sc, [], None, 64)
    joint.trunk_layer = 1
    joint.ref_logps()  # captures the trunk in the same forward
    a = trunk_cache(joint, 2, PrecomputeCache(tmp_path / "a"), "m")
    alone = RefContext(model, tiny_tokenizer, [None] * len(toks), toks, sc, [], None, 64)
    b = trunk_cache(alone, 2, PrecomputeCache(tmp_path / "b"), "m")
    torch.testing.assert_close(a["data"], b["data"], atol=1e-5, rtol=1e-5)
    assert torch.equal(a["offsets"], b["offsets"])
    t = toks[1]
    assert a["data"].shape[0] == sum(len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in toks)
    assert a["offsets"][1].tolist()[1:] == [len(t.prompt_ids), len(t.chosen_ids)]


def test_packed_pairs_equal_separate_sequences(tiny_model_dir, tiny_tokenizer):
    from prefsculpt.models.hooks import truncated_forward
    from prefsculpt.models.loading import load_model
    from prefsculpt.train.forward import pack_pairs, packed_logps

    model = load_model(tiny_model_dir)
    ids, mask, toks = _batch(tiny_tokenizer)
    b = pack_pairs(toks, tiny_tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 2 and b["attention_mask"].shape[1:] == (1, *b["input_ids"].shape[1:] * 2)
    torch.testing.assert_close(packed_logps(model, b), sequence_logps(model, ids, mask), atol=1e-5, rtol=1e-5)
    trunk = truncated_forward(model, b["input_ids"], b["attention_mask"], 1, position_ids=b["position_ids"])
    torch.testing.assert_close(packed_logps(model, b, trunk=trunk, start_layer=2), packed_logps(model, b),
                               atol=1e-5, rtol=1e-5)
