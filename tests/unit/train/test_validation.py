"""Validation during DPO: the validation split's loss decides early stopping and which weights are kept."""

from __future__ import annotations

import lightning as L
import mlflow
import pytest
import torch

from prefsculpt.shaping.config import TrainConfig
from prefsculpt.train.setup import BestWeights, validation_setup, validation_summary


class _Toy(L.LightningModule):
    """One weight that training moves by +1 per step; validation reports a scripted loss per check."""

    def __init__(self, losses: list[float]):
        super().__init__()
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.model.weight)
        self.losses, self.seen = losses, []

    def training_step(self, batch, batch_idx):
        return (self.model.weight * 0).sum() + (self.model.weight - 1e6).abs().sum() * 0  # grads are unused

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.model.weight += 1.0  # the weight counts the optimizer steps

    def validation_step(self, batch, batch_idx):
        k = len(self.seen)
        self.log("val/loss", self.losses[min(k, len(self.losses) - 1)], on_epoch=True, batch_size=1)

    def on_validation_epoch_end(self):
        self.seen.append(float(self.model.weight))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)


def _fit(losses: list[float], patience: int, restore: bool = True, epochs: int = 2):
    tc = TrainConfig(val_checks_per_epoch=2, early_stopping_patience=patience, restore_best=restore)
    args, cbs = validation_setup(tc, True, batches_per_epoch=8)
    assert args["val_check_interval"] == 4
    toy = _Toy(losses)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=cbs, **args)
    trainer.fit(toy)
    return toy, trainer, cbs


def test_the_kept_weights_are_those_of_the_lowest_validation_loss():
    toy, trainer, cbs = _fit([3.0, 1.0, 2.0, 4.0], patience=0)
    assert toy.seen == [4.0, 8.0, 12.0, 16.0]  # four checks, after 4, 8, 12, 16 steps
    assert float(toy.model.weight) == 8.0  # the second check's weights (loss 1.0), not the last (16)
    s = validation_summary(trainer, cbs)
    assert s == {"train/val_checks": 4.0, "train/best_val_loss": 1.0, "train/best_val_step": 8.0}


def test_without_restore_the_last_weights_stay():
    toy, _, _ = _fit([3.0, 1.0, 2.0, 4.0], patience=0, restore=False)
    assert float(toy.model.weight) == 16.0


def test_early_stopping_ends_the_fit_after_patience_checks_without_improvement():
    toy, trainer, cbs = _fit([3.0, 1.0, 2.0, 4.0, 5.0, 6.0], patience=2, epochs=3)
    assert toy.seen == [4.0, 8.0, 12.0, 16.0]  # stopped at the 4th check: 2 checks without a lower loss
    assert float(toy.model.weight) == 8.0
    assert validation_summary(trainer, cbs)["train/stopped_early"] == 1.0


def test_improving_runs_to_the_end_and_no_validation_means_none():
    toy, trainer, cbs = _fit([4.0, 3.0, 2.0, 1.0], patience=1)
    assert toy.seen == [4.0, 8.0, 12.0, 16.0] and float(toy.model.weight) == 16.0
    assert validation_summary(trainer, cbs)["train/stopped_early"] == 0.0
    args, cbs = validation_setup(TrainConfig(), False, 8)
    assert args["limit_val_batches"] == 0 and cbs == []


def test_best_weights_survive_a_checkpoint_round_trip():
    bw = BestWeights()
    bw.best, bw.best_step, bw.checks, bw.weights = 0.5, 7, 3, {"w": torch.ones(2)}
    other = BestWeights()
    other.load_state_dict(bw.state_dict())
    assert (other.best, other.best_step, other.checks) == (0.5, 7, 3) and torch.equal(other.weights["w"], torch.ones(2))


@pytest.mark.parametrize("val_pairs", [0, 8])
def test_run_train_validates_on_the_validation_split(tiny_model_dir, tmp_path, mlflow_uri, val_pairs):
    from prefsculpt.stages.train import run_train
    from tests.unit.train.helpers import train_cfg

    cfg = train_cfg(tiny_model_dir, tmp_path, train={"max_pairs": 16, "train_top_layers": 2, "val_pairs": val_pairs,
                                                     "val_checks_per_epoch": 2, "early_stopping_patience": 0})
    out = run_train(cfg)
    run = mlflow.get_run(out["run_id"])
    assert run.data.metrics["train/val_pairs"] == val_pairs
    hist = mlflow.MlflowClient().get_metric_history(out["run_id"], "val/loss")
    if not val_pairs:
        assert hist == [] and "train/val_checks" not in run.data.metrics
        return
    assert len(hist) == 2 and run.data.metrics["train/val_checks"] == 2  # 4 batches, a check every 2
    best = min(hist, key=lambda h: h.value)
    assert run.data.metrics["train/best_val_loss"] == pytest.approx(best.value)
    assert "val/dpo_loss" in run.data.metrics and "val/rewards/accuracies" in run.data.metrics
