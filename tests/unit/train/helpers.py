"""Compose a train config for tests before `train`/`shaping` are wired into RootConfig."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from prefsculpt.shaping.config import ShapingConfig


def train_cfg(model_dir, tmp_path, train: dict[str, Any] | None = None, shaping: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None):
    from prefsculpt.config import TrainStageConfig, compose

    base = compose("experiment=tiny")
    OmegaConf.set_struct(base, False)
    # Pinned here, not taken from TrainConfig's defaults (which are sized for SmolLM2 on a CPU):
    # the tests count optimizer steps of one epoch of full fine-tuning on the tiny model.
    t = OmegaConf.merge(OmegaConf.structured(TrainStageConfig), {"lr": 1e-3, "batch_size": 4, "max_length": 96,
                                                            "epochs": 1, "train_top_layers": None,
                                                            "checkpoint_every_n_steps": 2, "log_model": False,
                                                            **(train or {})})
    s = OmegaConf.merge(OmegaConf.structured(ShapingConfig), shaping or {})
    cfg = OmegaConf.merge(base, {"train": t, "shaping": s, "model": {"name_or_path": str(model_dir)},
                                 "cache_dir": str(tmp_path / "cache"), "sae": {"layer": 2}}, extra or {})
    OmegaConf.set_struct(cfg, False)
    return cfg
