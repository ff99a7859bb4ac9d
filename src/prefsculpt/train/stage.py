"""The ``train`` stage: concept-shaped DPO inside one explicit MLflow run, resumable after a kill.

The run's working folder is ``<cache>/train/<key>``, ``key`` a hash of the whole resolved config,
the model weights, the pairs' tokens and the decisions file. It holds ``run.json`` (the MLflow run
id, written as soon as the run opens) and ``ckpt/last.ckpt``. Re-running the same config while an
unfinished ``last.ckpt`` exists resumes from it and reattaches to the SAME MLflow run (via
``MLFLOW_RUN_ID``, which ``mlflow.start_run`` honours), so a kill never yields two runs. A finished
run leaves ``done.json``; the same config then trains afresh in a new run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.tokenize import tokenize_pairs
from prefsculpt.models.loading import default_cache_dir, load_model, load_tokenizer, resolve_model_dir
from prefsculpt.shaping.resolve import resolve_shaping
from prefsculpt.tracking.artifacts import local_decisions
from prefsculpt.tracking.runs import log_pairs_input, resolve_tracking_uri, stage_run
from prefsculpt.train.datamodule import PreferenceDataModule, truncate_pair
from prefsculpt.train.precompute import (
    PrecomputeCache,
    RefContext,
    model_fingerprint,
    run_precompute,
    sha,
    tokens_fingerprint,
    trunk_cache,
)

log = logging.getLogger(__name__)


def load_train_pairs(cfg: DictConfig) -> list[PreferencePair]:
    tc = cfg.train
    if tc.pairs_path:
        from prefsculpt.data.prepare import read_split

        pairs = read_split(tc.pairs_path)
    else:
        from prefsculpt.data.source import load_source
        from prefsculpt.data.splits import SPLITS, split_pairs

        loaded = load_source(cfg.data)
        fractions = {s: float(cfg.data.split[s]) for s in SPLITS}
        pairs = split_pairs(loaded.pairs, fractions, salt=str(cfg.data.split.salt))[str(tc.split)]
    if tc.max_pairs is not None:
        pairs = pairs[: int(tc.max_pairs)]
    if not pairs:
        raise ValueError(f"no training pairs (train.pairs_path={tc.pairs_path}, split={tc.split}); check the data config")
    return pairs


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def _attach(run_id: str | None) -> Iterator[None]:
    """Make ``mlflow.start_run`` (inside ``stage_run``) resume ``run_id`` instead of opening a new run."""
    if run_id is None or "MLFLOW_RUN_ID" in os.environ:
        yield
        return
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)


def _atomic_checkpoint(base: type) -> type:
    """ModelCheckpoint writing to a temporary name and renaming, so a kill mid-write never leaves a
    truncated ``last.ckpt`` that the next run would try to resume from."""

    class AtomicCheckpoint(base):  # type: ignore[misc, valid-type]
        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            tmp = f"{filepath}.{uuid.uuid4().hex[:6]}.tmp"
            trainer.save_checkpoint(tmp, self.save_weights_only)
            os.replace(tmp, filepath)
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath

    return AtomicCheckpoint


def _run_exists(run_id: str) -> bool:
    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except Exception:
        return False


def _check_layers(model_dir: Path, shaping: Any, top: int | None) -> None:
    """Refuse a residual edit below the trained layers before opening a run or loading weights."""
    from transformers import AutoConfig

    from prefsculpt.train.module import check_hooks_trainable

    n = int(AutoConfig.from_pretrained(str(model_dir)).num_hidden_layers)
    check_hooks_trainable(shaping.interventions, 0 if top is None or top >= n else n - int(top))


def run_train(cfg: DictConfig) -> dict[str, Any]:
    tc = cfg.train
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    layer = int(cfg.sae.layer) if "sae" in cfg else None
    # local_decisions: shaping.decisions may be runs:/<audit run>/decisions/v<N>.yaml (`prefsculpt review`)
    shaping = resolve_shaping(local_decisions(cfg), layer)  # validates the specs before any model is loaded
    _check_layers(model_dir, shaping, tc.train_top_layers)
    pairs = load_train_pairs(cfg)
    tok = load_tokenizer(model_dir)
    tcfg = cfg.data.tokenize
    tokenized = tokenize_pairs(pairs, tok, int(tcfg.max_prompt_tokens), int(tcfg.max_response_tokens))
    kept = [(p, t2) for p, t in zip(pairs, tokenized, strict=True) if (t2 := truncate_pair(t, tc.max_length))]
    if len(kept) < len(pairs):
        log.warning("train: %d pairs dropped: their prompt alone fills train.max_length=%s", len(pairs) - len(kept), tc.max_length)
    pairs, tokenized = [p for p, _ in kept], [t for _, t in kept]

    model_fp = model_fingerprint(model_dir)
    cache_root = Path(cfg.cache_dir) if cfg.get("cache_dir") else default_cache_dir()
    key = sha({"cfg": OmegaConf.to_container(cfg, resolve=True), "model": model_fp,
               "tokens": tokens_fingerprint(tokenized), "decisions": shaping.decisions_hash})
    work = cache_root / "train" / key
    ckpt_dir, run_file, done_file = work / "ckpt", work / "run.json", work / "done.json"
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    resume_id = None
    if tc.resume and run_file.exists() and not done_file.exists():
        rid = json.loads(run_file.read_text())["run_id"]
        if not (ckpt_dir / "last.ckpt").exists():
            log.warning("train: run %s was interrupted before its first checkpoint; starting over", rid)
        elif not _run_exists(rid):
            log.warning("train: run %s of %s is not in the tracking store %s; starting over", rid, work,
                        mlflow.get_tracking_uri())
        else:
            resume_id = rid
    if resume_id is None and work.exists():
        shutil.rmtree(work)  # finished, or stale without a checkpoint: start over
    work.mkdir(parents=True, exist_ok=True)
    if resume_id:
        log.info("train: resuming run %s from %s", resume_id, ckpt_dir / "last.ckpt")

    with _attach(resume_id), stage_run(cfg, "train") as run:
        run_id = run.info.run_id
        _write_json(run_file, {"run_id": run_id})
        return _train(cfg, run_id, model_dir, model_fp, tok, pairs, tokenized, shaping, layer, work,
                      cache_root, resume=resume_id is not None)


def _train(cfg, run_id, model_dir, model_fp, tok, pairs, tokenized, shaping, layer, work, cache_root, resume):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from prefsculpt.train.module import PreferenceModule, check_hooks_trainable, freeze_below
    from prefsculpt.train.policy import log_policy

    tc = cfg.train
    t0 = time.perf_counter()
    mlflow.set_tags({"prefsculpt.resumed": str(resume).lower(), "prefsculpt.train_key": work.name})
    if shaping.decisions_path:
        mlflow.log_artifact(shaping.decisions_path, "shaping")
        mlflow.set_tag("prefsculpt.decisions_hash", shaping.decisions_hash)
    mlflow.log_dict({"interventions": shaping.summary()}, "shaping/interventions.json")
    if not resume:
        log_pairs_input(pairs, f"{cfg.data.name}-{tc.split}", context="training")

    L.seed_everything(int(tc.seed), workers=False, verbose=False)
    model = load_model(model_dir, str(cfg.model.dtype))
    start = freeze_below(model, tc.train_top_layers)
    check_hooks_trainable(shaping.interventions, start)  # refuse before the (long) precompute
    model.eval()
    cache = PrecomputeCache(cache_root)
    ctx = RefContext(model, tok, pairs, tokenized, cfg.shaping, cfg.get("named_concepts") or [], shaping.interventions[0].layer
                     if shaping.interventions else layer, int(cfg.data.tokenize.max_prompt_tokens),
                     int(tc.precompute_batch_tokens))
    ctx.trunk_layer = start - 1 if start > 0 else None  # captured in the same forward as the reference
    # Under a bf16 precision the reference pass runs under the same CPU autocast as training (its own
    # cache entries); fp32 keeps the model fingerprint as the key, so earlier caches stay valid.
    bf16 = str(tc.precision).startswith("bf16")
    pre_fp = f"{model_fp}:bf16-autocast" if bf16 else model_fp
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        pre = run_precompute(ctx, shaping.interventions, cache, pre_fp, str(cfg.shaping.get("orient", "data")))
        trunk = trunk_cache(ctx, start, cache, pre_fp, str(tc.trunk_dtype)) if start > 0 else None
    if pre.orientation:
        mlflow.log_params({f"shaping/{k}/orientation": v for k, v in pre.orientation.items()})
    t_pre = time.perf_counter() - t0
    dm = PreferenceDataModule(tokenized, pre, int(tc.batch_size), tok.pad_token_id or 0, int(tc.seed),
                              int(tc.bucket_batches), trunk)
    module = PreferenceModule(model, float(tc.beta), float(tc.lr), pre.term_names, pre.lambdas,
                              shaping.interventions, start, float(tc.weight_decay), int(tc.warmup_steps))
    mlflow.log_metrics({"train/pairs_total": len(pairs), "train/pairs_dropped": dm.n_dropped,
                        "train/pairs_weighted": int(((pre.weights > 0) & (pre.weights < 1)).sum()),
                        "train/precompute_s": t_pre})
    ckpt_dir = work / "ckpt"
    ckpt = _atomic_checkpoint(ModelCheckpoint)(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                                               every_n_train_steps=int(tc.checkpoint_every_n_steps),
                                               enable_version_counter=False)
    logger = MLFlowLogger(tracking_uri=resolve_tracking_uri(cfg.tracking.uri), run_id=run_id)
    trainer = L.Trainer(
        max_epochs=int(tc.epochs), accumulate_grad_batches=int(tc.grad_accum), precision=str(tc.precision),
        accelerator="cpu", devices=1, logger=logger, callbacks=[ckpt], use_distributed_sampler=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=int(tc.log_every_n_steps),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(work),
    )
    last = ckpt_dir / "last.ckpt"
    t1 = time.perf_counter()
    model.train()
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume and last.exists() else None)
    fit_s = time.perf_counter() - t1
    model.eval()

    policy_dir = work / "policy"
    tmp = work / f".policy-{uuid.uuid4().hex[:6]}"
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    os.replace(tmp, policy_dir)
    metrics = {"train/optimizer_steps": float(trainer.global_step), "train/fit_s": fit_s,
               "train/pairs_per_s": len(dm.dataset) * int(tc.epochs) / max(fit_s, 1e-9) if not resume else 0.0}
    mlflow.log_metrics(metrics)
    model_uri = None
    if tc.log_model:
        model_uri = log_policy(policy_dir).model_uri
    _write_json(work / "done.json", {"run_id": run_id, "optimizer_steps": trainer.global_step})
    if not tc.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("train: %d optimizer steps in %.1f s (precompute %.1f s); policy at %s", trainer.global_step, fit_s,
             t_pre, policy_dir)
    return {"run_id": run_id, "metrics": metrics, "model_uri": model_uri, "policy_dir": str(policy_dir),
            "optimizer_steps": int(trainer.global_step), "pairs_dropped": dm.n_dropped,
            "term_names": pre.term_names}
