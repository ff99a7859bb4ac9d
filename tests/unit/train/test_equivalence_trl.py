"""With no intervention, our loss and gradients equal TRL 1.16's `sigmoid` DPO on the same model and batch."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")


def _trl_trainer(model, ref, tok, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "What is 7 times 8?"}],
                   [{"role": "user", "content": "Capital of France? I think the answer is 54."}],
                   [{"role": "user", "content": "How are you?"}]],
        "chosen": [[{"role": "assistant", "content": "7 times 8 is 56."}],
                   [{"role": "assistant", "content": "**Paris** is the answer."}],
                   [{"role": "assistant", "content": "I am fine, thank you."}]],
        "rejected": [[{"role": "assistant", "content": "You're right! It is 54."}],
                     [{"role": "assistant", "content": "What a great question! Paris."}],
                     [{"role": "assistant", "content": "Hello"}]],
    })
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], report_to=[],
                     max_length=512, per_device_train_batch_size=3, use_cpu=True, bf16=False,
                     gradient_checkpointing=False)
    return DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)


def test_loss_and_grads_match_trl(tiny_model_dir, tmp_path):
    from prefsculpt.models.loading import load_model, load_tokenizer
    from prefsculpt.train.module import PreferenceModule

    tok = load_tokenizer(tiny_model_dir)
    ref = load_model(tiny_model_dir)
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a policy that differs from the reference, so Δθ != 0
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = copy.deepcopy(policy)
    trainer = _trl_trainer(policy, ref, tok, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["completion_mask"].sum() > 0
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    # Our batch: the same tokens (TRL's own tokenization), packed [prompt, chosen, rejected] per row.
    from prefsculpt.data.tokenize import TokenizedPair
    from prefsculpt.train.forward import pack_pairs, packed_logps

    ex = [trainer.train_dataset[i] for i in range(3)]
    toks = [TokenizedPair(str(i), e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], False, False, False)
            for i, e in enumerate(ex)]
    packed = pack_pairs(toks, tok.pad_token_id)
    assert packed["input_ids"].numel() < batch["input_ids"].numel()  # the prompt is there once, not twice
    with torch.no_grad():
        ref_c, ref_r = packed_logps(ref, packed).chunk(2)
    mod = PreferenceModule(ours, beta=0.1, lr=0.0)
    mod.train()
    ours_batch = {**packed, "ref_c": ref_c, "ref_r": ref_r, "delta_a": torch.zeros(3, 0), "weight": torch.ones(3)}
    loss, _ = mod.step(ours_batch)
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) < 1e-5, (loss.item(), trl_loss.item())
    assert loss.item() != pytest.approx(0.6931, abs=1e-3)  # not the trivial log 2 at Δθ = 0
    n_checked = 0
    for (name, a), b in zip(trainer.model.named_parameters(), ours.parameters(), strict=True):
        if a.grad is None:
            continue
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
        n_checked += 1
    assert n_checked > 10
