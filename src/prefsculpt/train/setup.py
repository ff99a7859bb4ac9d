"""What the train stage needs before it opens a run: the pairs, a layer check, atomic checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from transformers import AutoConfig

from prefsculpt.core.errors import UserError
from prefsculpt.core.faults import fault_point
from prefsculpt.core.files import atomic_path
from prefsculpt.data.prepare import read_split
from prefsculpt.data.prepared import Prepared
from prefsculpt.data.schema import PreferencePair
from prefsculpt.shaping.config import TrainConfig
from prefsculpt.shaping.registry import ShapingError


def load_train_pairs(tc: TrainConfig, prepared: Prepared | None) -> list[PreferencePair]:
    """``train.pairs_path`` when set, else the ``train.split`` of the prepared data; at most ``max_pairs``."""
    if tc.pairs_path:
        pairs = read_split(tc.pairs_path)
    else:
        assert prepared is not None, "the stage passes the prepared data when train.pairs_path is unset"
        pairs = prepared.split(tc.split)
    if tc.max_pairs is not None:
        pairs = pairs[: tc.max_pairs]
    if not pairs:
        raise UserError(f"no training pairs (train.pairs_path={tc.pairs_path}, split={tc.split}); check the data config")
    return pairs


def load_val_pairs(tc: TrainConfig, prepared: Prepared | None) -> list[PreferencePair]:
    """Up to ``train.val_pairs`` of the prepared ``validation`` split; none when training on a
    ``train.pairs_path`` file (no split to take them from) or when ``val_pairs`` is 0."""
    if tc.val_pairs <= 0 or tc.pairs_path or prepared is None:
        return []
    return list(prepared.splits.get("validation", []))[: tc.val_pairs]


def check_layers(model_dir: Path, shaping: Any) -> None:
    """Refuse a concept layer ℓ the model does not have, before opening a run or loading weights. Any
    ℓ in range trains: an edit below the trained top layers is folded into the cached trunk
    (``train.module.split_edits``)."""
    n = int(AutoConfig.from_pretrained(str(model_dir)).num_hidden_layers)
    for iv in shaping.interventions:
        bad = [ell for ell in iv.touches_layers() if not 0 <= ell < n]
        if bad:
            raise ShapingError(f"{iv.name}: layer {bad[0]} is out of range: the model has {n} decoder layers "
                               f"(0..{n - 1}); set shaping.layer or sae.layer")



class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint writing to a temporary name and renaming, so a kill mid-write never leaves a
    truncated ``last.ckpt`` that the next run would try to resume from."""

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        if not trainer.is_global_zero:  # only rank 0 writes; the others take part (barrier, FSDP gather)
            trainer.save_checkpoint(filepath, self.save_weights_only)
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            return
        with atomic_path(filepath, suffix=".ckpt") as tmp:
            trainer.save_checkpoint(str(tmp), self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        fault_point("train", "checkpoint")


class BestWeights(Callback):
    """The checkpoint choice: keeps (on the host) the trained parameters at the validation check with the
    lowest ``monitor`` and puts them back when the fit ends, so the policy is the best-validated one,
    not the last. Its state (best value, step, weights) travels in ``last.ckpt``, so a resumed run still
    knows its best. Only parameters that train are kept (the top layers: ~85 MB for SmolLM2's top 6)."""

    def __init__(self, monitor: str = "val/loss"):
        self.monitor = monitor
        self.best, self.best_step, self.checks = math.inf, -1, 0
        self.weights: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.checks += 1
        value = float(trainer.callback_metrics[self.monitor])
        if value < self.best:
            self.best, self.best_step = value, int(trainer.global_step)
            self.weights = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.model.named_parameters()
                            if p.requires_grad}

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.weights is None:
            return
        with torch.no_grad():
            for n, p in pl_module.model.named_parameters():
                if n in self.weights:
                    p.copy_(self.weights[n].to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "checks": self.checks, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.checks, self.weights = int(state["checks"]), state["weights"]



def validation_setup(tc: TrainConfig, has_val: bool, batches_per_epoch: int) -> tuple[dict[str, Any], list[Callback]]:
    """Trainer arguments and callbacks for validation: ``train.val_checks_per_epoch`` checks of the
    validation loss per epoch, early stopping after ``train.early_stopping_patience`` checks without
    improvement (0 = never), and ``BestWeights`` when ``train.restore_best``. No validation pairs:
    validation off."""
    if not has_val or tc.val_checks_per_epoch <= 0:
        return {"limit_val_batches": 0, "num_sanity_val_steps": 0}, []
    every = max(1, batches_per_epoch // tc.val_checks_per_epoch)
    args = {"limit_val_batches": 1.0, "num_sanity_val_steps": 0, "val_check_interval": every,
            "check_val_every_n_epoch": 1}
    cbs: list[Callback] = []
    if tc.early_stopping_patience > 0:
        cbs.append(EarlyStopping(monitor="val/loss", mode="min", patience=tc.early_stopping_patience,
                                 check_on_train_epoch_end=False, verbose=False))
    if tc.restore_best:
        cbs.append(BestWeights("val/loss"))
    return args, cbs


def validation_summary(trainer: Any, callbacks: list[Callback]) -> dict[str, float]:
    """What validation decided, as run metrics: checks run, whether early stopping ended the fit, and the
    kept weights' check (its loss and optimizer step)."""
    out: dict[str, float] = {}
    for cb in callbacks:
        if isinstance(cb, EarlyStopping):
            out["train/stopped_early"] = float(cb.wait_count >= cb.patience)
        elif isinstance(cb, BestWeights):
            out["train/val_checks"] = float(cb.checks)
            if cb.weights is not None:
                out.update({"train/best_val_loss": cb.best, "train/best_val_step": float(cb.best_step)})
    return out
