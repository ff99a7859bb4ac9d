"""The train stage on several devices: one process per device, launched with ``torchrun``.

The stage's own process does everything once (pairs, precompute, the MLflow run), writes what the
fit needs to ``<work>/dist/spec.pt``, and runs ``python -m torch.distributed.run --standalone
--nproc-per-node N -m prefsculpt.stages.train_ddp <spec>``. Each worker loads the weights, builds
the same data module (every rank its slice of the same global batches, see
``train.datamodule``) and calls ``trainer.fit`` with ``strategy=ddp|fsdp``: Lightning sees the
torchrun environment and launches nothing itself, so no rank ever re-runs the stage, the pipeline or
a search. Rank 0 alone writes to MLflow (``MLFlowLogger`` with the stage's run id: its calls are
no-ops on the other ranks) and the checkpoints; after the fit every rank takes part in gathering the
full weights (a collective under FSDP) and rank 0 writes them to ``<work>/dist/state.pt`` with
``result.json``; the stage's process loads them and goes on as after a one-device fit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import prefsculpt
from prefsculpt.core.errors import UserError
from prefsculpt.core.files import atomic_path, atomic_write_json

log = logging.getLogger(__name__)
STRATEGIES = ("auto", "ddp", "fsdp")


def check_strategy(strategy: str, devices: int, device: torch.device) -> None:
    """Refuse a strategy/devices pair this machine cannot run, before any model is loaded."""
    if strategy not in STRATEGIES:
        raise UserError(f"train.strategy={strategy!r}: use one of {list(STRATEGIES)}")
    if devices < 1:
        raise UserError(f"train.devices={devices}: use 1 or more")
    if devices > 1 and strategy == "auto":
        raise UserError(f"train.devices={devices} needs train.strategy=ddp (or fsdp on GPUs)")
    if strategy == "fsdp" and device.type != "cuda":
        raise UserError(f"train.strategy=fsdp needs CUDA GPUs (device is {device}); use train.strategy=ddp")
    if devices > 1 and device.type == "mps":
        raise UserError("train.devices > 1 is not supported on MPS; use train.devices=1")
    if devices > 1 and device.type == "cuda" and devices > torch.cuda.device_count():
        raise UserError(f"train.devices={devices}, but only {torch.cuda.device_count()} CUDA devices are visible")


@dataclass
class FitSpec:
    """What a worker needs to run the fit (pickled with ``torch.save``)."""

    model_dir: str
    load_dtype: str
    accelerator: str
    strategy: str
    devices: int
    #: PreferenceModule keyword arguments (beta, lr, term_names, lambdas, hooks, start_layer, ...).
    module: dict[str, Any]
    #: PreferenceDataModule arguments: tokenized, pre, batch_size, pad_id, seed, bucket_batches, trunk.
    data: dict[str, Any]
    #: Trainer keyword arguments shared with the one-device fit (epochs, precision, logging, ...).
    trainer: dict[str, Any]
    ckpt_dir: str
    ckpt_every: int
    resume_from: str | None
    tracking_uri: str
    run_id: str
    seed: int
    #: The train config (validation: early stopping and the kept weights, ``train.setup.validation_setup``).
    train: Any = None


def fit_distributed(spec: FitSpec, work: Path) -> dict[str, Any]:
    """Run the fit in ``spec.devices`` processes; returns rank 0's ``result.json`` (optimizer steps,
    fit seconds) and leaves the trained weights in ``<work>/dist/state.pt``."""
    d = work / "dist"
    d.mkdir(parents=True, exist_ok=True)
    for stale in ("state.pt", "result.json"):
        (d / stale).unlink(missing_ok=True)
    with atomic_path(d / "spec.pt", suffix=".pt") as tmp:
        torch.save(spec, tmp)
    env = dict(os.environ)
    src = str(Path(prefsculpt.__file__).resolve().parents[1])  # the workers import this same prefsculpt
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.pop("MLFLOW_RUN_ID", None)  # the workers never open a run; rank 0 logs into spec.run_id
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={spec.devices}", "-m", "prefsculpt.stages.train_ddp", str(d / "spec.pt")]
    log.info("train: %s on %d devices: %s", spec.strategy, spec.devices, " ".join(cmd))
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0 or not (d / "result.json").exists():
        raise RuntimeError(f"train: the {spec.devices} {spec.strategy} workers failed (exit {done.returncode}); "
                           "their output is above. The last checkpoint, if any, resumes on a rerun.")
    return json.loads((d / "result.json").read_text())


def _worker(spec_path: str) -> None:
    import time

    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger

    from prefsculpt.models.loading import load_model
    from prefsculpt.train.datamodule import PreferenceDataModule
    from prefsculpt.train.module import PreferenceModule, freeze_below
    from prefsculpt.train.setup import AtomicCheckpoint, validation_setup, validation_summary

    spec: FitSpec = torch.load(spec_path, weights_only=False)
    L.seed_everything(spec.seed, workers=False, verbose=False)
    model = load_model(spec.model_dir, spec.load_dtype)
    freeze_below(model, spec.module.pop("top_layers"))
    module = PreferenceModule(model, **spec.module)
    dm = PreferenceDataModule(**spec.data)
    strategy: Any = spec.strategy
    if spec.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # one FSDP unit per decoder layer; use_orig_params lets frozen and trained weights share a unit
        strategy = FSDPStrategy(auto_wrap_policy={type(model.model.layers[0])}, use_orig_params=True)
    ckpt = AtomicCheckpoint(dirpath=spec.ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=spec.ckpt_every,
                            enable_version_counter=False)
    val_cbs = []
    if spec.train is not None:
        _, val_cbs = validation_setup(spec.train, dm.val_dataset is not None, dm.batches_per_epoch(spec.devices))
    trainer = L.Trainer(accelerator=spec.accelerator, devices=spec.devices, num_nodes=1, strategy=strategy,
                        logger=MLFlowLogger(tracking_uri=spec.tracking_uri, run_id=spec.run_id),
                        callbacks=[ckpt, *val_cbs], use_distributed_sampler=False, **spec.trainer)
    t0 = time.perf_counter()
    model.train()
    trainer.fit(module, datamodule=dm, ckpt_path=spec.resume_from)
    fit_s = time.perf_counter() - t0
    state = trainer.strategy.lightning_module_state_dict()  # every rank: FSDP gathers the full weights
    if trainer.is_global_zero:
        d = Path(spec_path).parent
        weights = {k[len("model."):]: v.detach().cpu() for k, v in state.items() if k.startswith("model.")}
        with atomic_path(d / "state.pt", suffix=".pt") as tmp:
            torch.save(weights, tmp)
        atomic_write_json(d / "result.json", {"optimizer_steps": int(trainer.global_step), "fit_s": fit_s,
                                              "world_size": int(trainer.world_size),
                                              "validation": validation_summary(trainer, val_cbs)})


if __name__ == "__main__":
    _worker(sys.argv[1])
