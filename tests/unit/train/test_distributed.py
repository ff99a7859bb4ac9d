"""Several devices: the rank-aware length-bucket sampler, and a 2-process DDP fit (gloo, CPU) that
follows the same loss curve as one process with the same global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefsculpt.core.errors import UserError
from prefsculpt.data.tokenize import TokenizedPair
from prefsculpt.stages.train_ddp import check_strategy
from prefsculpt.train.datamodule import BucketBatchSampler, PairDataset, collate
from prefsculpt.train.precompute import Precomputed


@pytest.mark.parametrize("n", [32, 33, 35])
def test_each_rank_takes_its_slice_of_the_one_device_batches(n):
    lengths = [(7 * i) % 23 + 1 for i in range(n)]
    one = BucketBatchSampler(lengths, batch_size=4, seed=3, bucket_batches=2)
    ranks = [BucketBatchSampler(lengths, batch_size=2, seed=3, bucket_batches=2, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.sampler.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(ranks[1])  # DDP would hang otherwise
        # equal local batches, but the short last one split as evenly as possible (3 -> 2 + 1), never cut
        assert all(len(a) - len(b) == len(a + b) % 2 for a, b in zip(*per_rank, strict=True))
        glued = [a + b for a, b in zip(*per_rank, strict=True)]
        want = [b for b in one if len(b) >= 2]
        assert glued == want
    # n = 33: the last global batch has 1 pair, fewer than the 2 ranks: dropped; n = 35: 3 -> 2 + 1 kept
    assert len(ranks[0]) == {32: 8, 33: 8, 35: 9}[n]


def test_a_batch_carries_each_pairs_own_reference_logps():
    toks = [TokenizedPair(f"p{i}", [1, 2, 3][: 1 + i % 3], [4] * (1 + i % 4), [5] * (1 + i % 2), False, False, False)
            for i in range(10)]
    ref_c, ref_r = np.arange(10) * 1.5, -np.arange(10) * 2.0
    weights = np.ones(10, np.float32)
    weights[4] = 0.0  # dropped by a filter: never batched
    pre = Precomputed(ref_c, ref_r, np.zeros((10, 0), np.float32), [], np.zeros(0, np.float32), weights)
    ds = PairDataset(toks, pre, weights > 0)
    s = BucketBatchSampler([ds.length(i) for i in range(len(ds))], 2, seed=0, rank=1, world=2)
    seen = []
    for b in s:
        batch = collate([ds[i] for i in b], pad_id=0)
        idx = batch["index"].numpy()
        np.testing.assert_allclose(batch["ref_c"].numpy(), ref_c[idx])
        np.testing.assert_allclose(batch["ref_r"].numpy(), ref_r[idx])
        seen += idx.tolist()
    assert 4 not in seen and len(seen) == len(set(seen))


def test_impossible_strategies_are_refused_before_any_model_loads():
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="needs CUDA"):
        check_strategy("fsdp", 2, cpu)
    with pytest.raises(UserError, match="strategy=ddp"):
        check_strategy("auto", 2, cpu)
    with pytest.raises(UserError, match="use one of"):
        check_strategy("deepspeed", 2, cpu)
    check_strategy("ddp", 2, cpu)


def _loss_curve(run_id, key="train/loss"):
    import mlflow

    hist = mlflow.MlflowClient().get_metric_history(run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def test_two_process_ddp_follows_the_one_process_loss_curve(tiny_model_dir, tmp_path, mlflow_uri):
    """2 gloo processes x 2 pairs per step = 1 process x 4 pairs per step: same batches, same curve, with
    validation (early stopping, the best-validated weights kept) on in both."""
    import mlflow

    from prefsculpt.stages.train import run_train
    from tests.unit.train.helpers import train_cfg

    common = {"max_pairs": 32, "epochs": 1, "lr": 1e-3, "train_top_layers": None, "checkpoint_every_n_steps": 100}
    one = run_train(train_cfg(tiny_model_dir, tmp_path / "one", {**common, "batch_size": 4}, extra={"device": "cpu"}))
    two = run_train(train_cfg(tiny_model_dir, tmp_path / "two", {**common, "batch_size": 2, "strategy": "ddp",
                                                                  "devices": 2}, extra={"device": "cpu"}))
    assert one["optimizer_steps"] == two["optimizer_steps"] == 8
    a, b = _loss_curve(one["run_id"]), _loss_curve(two["run_id"])
    assert len(a) == len(b) == 8
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    assert a[-1] < a[0]  # it learnt something, so the agreement is not trivial
    # 31 pairs (one's prompt fills max_length): the short last global batch of 3 is split 2 + 1 across the
    # ranks, each rank's loss scaled by its share of it, where cutting it to 2 pairs would change the curve
    assert mlflow.get_run(one["run_id"]).data.metrics["train/pairs_total"] % 4 == 3
    va, vb = _loss_curve(one["run_id"], "val/loss"), _loss_curve(two["run_id"], "val/loss")
    assert len(va) == len(vb) >= 1
    np.testing.assert_allclose(vb, va, rtol=1e-3, atol=1e-4)
    assert one["metrics"]["train/best_val_step"] == two["metrics"]["train/best_val_step"]
    run = mlflow.get_run(two["run_id"])
    assert run.data.tags["prefsculpt.strategy"] == "ddp x2" and run.data.tags["prefsculpt.device"] == "cpu"
    # the two policies match too
    from safetensors.torch import load_file

    wa = load_file(f"{one['policy_dir']}/model.safetensors")
    wb = load_file(f"{two['policy_dir']}/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)
