"""What the train stage needs before it opens a run: the pairs, a layer check, atomic checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
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
