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
from collections.abc import Iterator
from typing import Any

import lightning as L
import mlflow
import torch
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from prefsculpt.concepts.sae_model import concept_layer
from prefsculpt.config import policy_log_mode
from prefsculpt.core.device import (
    HOST,
    accelerator,
    autocast,
    resolve_dtype,
    resolve_precision,
    select_device,
)
from prefsculpt.core.files import atomic_dir, atomic_write_json, model_fingerprint
from prefsculpt.core.names import Tag
from prefsculpt.core.paths import cache_root
from prefsculpt.core.progress_bar import StepProgress
from prefsculpt.core.redact import mlflow_params
from prefsculpt.data.tokenize import tokenize_pairs
from prefsculpt.models.delta import save_delta
from prefsculpt.models.loading import load_model, load_tokenizer, resolve_model_dir, tokenizer_fingerprint
from prefsculpt.shaping.resolve import resolve_shaping
from prefsculpt.stages.prepare import prepared_data
from prefsculpt.stages.train_ddp import FitSpec, check_strategy, fit_distributed
from prefsculpt.tracking.artifacts import local_decisions
from prefsculpt.tracking.models import PolicyMeta, delta_extra, log_policy, log_policy_delta
from prefsculpt.tracking.runs import log_pairs_input, resolve_tracking_uri, stage_run
from prefsculpt.train.datamodule import PreferenceDataModule, truncate_pair
from prefsculpt.train.module import PreferenceModule, freeze_below, split_edits
from prefsculpt.train.precompute import (
    PrecomputeCache,
    RefContext,
    run_precompute,
    sha,
    tokens_fingerprint,
    trunk_cache,
)
from prefsculpt.train.setup import (
    AtomicCheckpoint,
    check_layers,
    load_train_pairs,
    load_val_pairs,
    validation_setup,
    validation_summary,
)

log = logging.getLogger(__name__)


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


def _run_exists(run_id: str) -> bool:
    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except Exception:
        return False


def _audit_run_id(cfg: DictConfig, run_id: str) -> str | None:
    """The audit behind this policy: the trial's (``eval.shift.audit_run_id``, set by the search), else
    the parent run's tag; None for a standalone train."""
    ev = cfg.get("eval")
    if ev is not None and ev.get("shift") is not None and ev.shift.get("audit_run_id"):
        return str(ev.shift.audit_run_id)
    client = mlflow.MlflowClient()
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    return client.get_run(parent).data.tags.get(Tag.AUDIT_RUN) if parent else None


def run_train(cfg: DictConfig) -> dict[str, Any]:
    tc = cfg.train
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    layer = concept_layer(cfg.sae.layer, cfg.shaping.get("sae_path"), model_dir) if "sae" in cfg else None
    # local_decisions: shaping.decisions may be runs:/<audit run>/decisions/v<N>.yaml (`prefsculpt review`)
    shaping = resolve_shaping(local_decisions(cfg), layer)  # validates the specs before any model is loaded
    check_layers(model_dir, shaping)
    prepared = None if tc.pairs_path else prepared_data(cfg)[0]
    pairs = load_train_pairs(OmegaConf.to_object(tc), prepared)
    tok = load_tokenizer(model_dir)
    pairs, tokenized = _tokenized(cfg, prepared, pairs, tok, model_dir, "train")
    val_pairs, val_tokenized = _tokenized(cfg, prepared, load_val_pairs(OmegaConf.to_object(tc), prepared), tok,
                                          model_dir, "validation")

    model_fp = model_fingerprint(model_dir)
    root = cache_root(cfg.cache_dir)
    key = sha({"cfg": OmegaConf.to_container(cfg, resolve=True), "model": model_fp,
               "tokens": tokens_fingerprint(tokenized), "val_tokens": tokens_fingerprint(val_tokenized),
               "decisions": shaping.decisions_hash})
    work = root / "train" / key
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
        atomic_write_json(run_file, {"run_id": run_id})
        return _train(cfg, run_id, model_dir, model_fp, tok, pairs, tokenized, shaping, layer, work,
                      root, resume=resume_id is not None, val=(val_pairs, val_tokenized))


def _tokenized(cfg: DictConfig, prepared: Any, pairs: list, tok: Any, model_dir: Any, what: str) -> tuple[list, list]:
    """``pairs`` tokenized (the prepared tokens when they match) and cut to ``train.max_length``; a pair
    whose prompt alone fills it is dropped, with a warning."""
    if not pairs:
        return [], []
    tcfg, tc = cfg.data.tokenize, cfg.train
    tokenized = (prepared and prepared.tokens_for(pairs, tokenizer_fingerprint(model_dir), tcfg.max_prompt_tokens,
                                                  tcfg.max_response_tokens)) or tokenize_pairs(
        pairs, tok, tcfg.max_prompt_tokens, tcfg.max_response_tokens)
    kept = [(p, t2) for p, t in zip(pairs, tokenized, strict=True) if (t2 := truncate_pair(t, tc.max_length))]
    if len(kept) < len(pairs):
        log.warning("train: %d %s pairs dropped: their prompt alone fills train.max_length=%s", len(pairs) - len(kept),
                    what, tc.max_length)
    return [p for p, _ in kept], [t for _, t in kept]


def _train(cfg, run_id, model_dir, model_fp, tok, pairs, tokenized, shaping, layer, work, cache_root, resume,
           val=((), ())):
    tc = cfg.train
    t0 = time.perf_counter()
    mlflow.set_tags({Tag.RESUMED: str(resume).lower(), Tag.TRAIN_KEY: work.name})
    if shaping.decisions_path:
        mlflow.log_artifact(shaping.decisions_path, "shaping")
        mlflow.set_tag(Tag.DECISIONS_HASH, shaping.decisions_hash)
    mlflow.log_dict({"interventions": shaping.summary()}, "shaping/interventions.json")
    if not resume:
        log_pairs_input(pairs, f"{cfg.data.name}-{tc.split}", context="training")

    device = select_device(cfg.device)
    strategy, n_dev = tc.strategy, tc.devices
    check_strategy(strategy, n_dev, device)
    precision = resolve_precision(tc.precision, device)
    # mixed precision keeps float32 master weights; a named model.dtype is loaded as it says
    load_dtype = "float32" if cfg.model.dtype == "auto" else resolve_dtype(cfg.model.dtype, device)
    L.seed_everything(tc.seed, workers=False, verbose=False)
    model = load_model(model_dir, load_dtype).to(device)
    start = freeze_below(model, tc.train_top_layers)
    live, folded = split_edits(shaping.interventions, start)  # edits below the trained layers: into the trunk
    model.eval()
    cache = PrecomputeCache(cache_root)
    ctx = RefContext(model, tok, pairs, tokenized, cfg.shaping, cfg.get("named_concepts") or [], shaping.interventions[0].layer
                     if shaping.interventions else layer, cfg.data.tokenize.max_prompt_tokens,
                     tc.precompute_batch_tokens)
    # captured in the same forward as the reference, unless edits must be folded into it
    ctx.trunk_layer = start - 1 if start > 0 and not folded else None
    # Under a bf16 precision the reference pass runs under the same autocast as training (its own
    # cache entries, per device type); fp32 on the CPU keeps the model fingerprint as the key.
    bf16 = precision.startswith("bf16")
    pre_fp = model_fp + (f":{device.type}" if device.type != "cpu" else "") + (":bf16-autocast" if bf16 else "")
    val_pairs, val_tokenized = val
    vctx = None
    if val_pairs:  # the same objective on the validation pairs: their own reference, ΔA and trunk
        vctx = RefContext(model, tok, list(val_pairs), list(val_tokenized), cfg.shaping, cfg.get("named_concepts") or [],
                          ctx.layer, cfg.data.tokenize.max_prompt_tokens, tc.precompute_batch_tokens)
        vctx.trunk_layer, vctx.label = ctx.trunk_layer, "validation"
    orient = str(cfg.shaping.get("orient", "audit"))
    with autocast(device, bf16):
        pre = run_precompute(ctx, shaping.interventions, cache, pre_fp, orient)
        trunk_dtype = ("bfloat16" if bf16 else "float32") if tc.trunk_dtype == "auto" else tc.trunk_dtype
        trunk = trunk_cache(ctx, start, cache, pre_fp, trunk_dtype, folded) if start > 0 else None
        val_data = None
        if vctx is not None:
            vpre = run_precompute(vctx, shaping.interventions, cache, pre_fp, orient, like=pre)
            vtrunk = trunk_cache(vctx, start, cache, pre_fp, trunk_dtype, folded) if start > 0 else None
            val_data = (list(val_tokenized), vpre, vtrunk)
    if pre.orientation:
        mlflow.log_params(mlflow_params({**{f"shaping/{k}/orientation": v for k, v in pre.orientation.items()},
                                         **{f"shaping/{k}/orientation_from": v
                                            for k, v in pre.orientation_from.items()}}))
    t_pre = time.perf_counter() - t0
    data = {"tokenized": tokenized, "pre": pre, "batch_size": tc.batch_size, "pad_id": tok.pad_token_id or 0,
            "seed": tc.seed, "bucket_batches": tc.bucket_batches, "trunk": trunk, "val": val_data}
    dm = PreferenceDataModule(**data)
    margs = {"beta": tc.beta, "lr": tc.lr, "term_names": pre.term_names, "lambdas": pre.lambdas,
             "hooks": live, "start_layer": start,
             "weight_decay": tc.weight_decay, "warmup_steps": tc.warmup_steps}
    mlflow.log_metrics({"train/pairs_total": len(pairs), "train/pairs_dropped": dm.n_dropped,
                        "train/val_pairs": len(val_pairs),
                        "train/pairs_weighted": int(((pre.weights > 0) & (pre.weights < 1)).sum()),
                        "train/precompute_s": t_pre})
    mlflow.set_tags({Tag.DEVICE: str(device), Tag.PRECISION: precision,
                     **({Tag.STRATEGY: f"{strategy} x{n_dev}"} if n_dev > 1 else {})})
    ckpt_dir = work / "ckpt"
    # the DDP workers build their own callbacks from the same config (train_ddp._worker)
    val_args, val_cbs = validation_setup(OmegaConf.to_object(tc), val_data is not None, dm.batches_per_epoch(n_dev))
    targs = {"max_epochs": tc.epochs, "accumulate_grad_batches": tc.grad_accum, "precision": precision,
             "log_every_n_steps": tc.log_every_n_steps, **val_args,
             "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(work)}
    last = ckpt_dir / "last.ckpt"
    resume_from = str(last) if resume and last.exists() else None
    if n_dev > 1:
        model.to(HOST)  # free the device for the workers; the trained weights come back below
        if device.type == "cuda":
            torch.cuda.empty_cache()
        spec = FitSpec(str(model_dir), load_dtype, accelerator(device), strategy, n_dev,
                       {**margs, "top_layers": tc.train_top_layers}, data, targs, str(ckpt_dir),
                       tc.checkpoint_every_n_steps, resume_from, resolve_tracking_uri(cfg.tracking.uri), run_id,
                       tc.seed, OmegaConf.to_object(tc))
        res = fit_distributed(spec, work)
        model.load_state_dict(torch.load(work / "dist" / "state.pt", weights_only=True))
        steps, fit_s = int(res["optimizer_steps"]), float(res["fit_s"])
        val_metrics = res.get("validation", {})
    else:
        module = PreferenceModule(model, **margs)
        ckpt = AtomicCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                                every_n_train_steps=tc.checkpoint_every_n_steps, enable_version_counter=False)
        logger = MLFlowLogger(tracking_uri=resolve_tracking_uri(cfg.tracking.uri), run_id=run_id)
        bar = StepProgress("DPO", "pairs", size_of=lambda b: int(b["weight"].shape[0]),
                           total=len(dm.dataset) * tc.epochs, show=("train/loss",))
        trainer = L.Trainer(accelerator=accelerator(device), devices=[device.index] if device.index is not None else 1,
                            logger=logger, callbacks=[ckpt, bar, *val_cbs], use_distributed_sampler=False,
                            **{**targs, "enable_progress_bar": True})
        t1 = time.perf_counter()
        model.train()
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from)
        fit_s, steps = time.perf_counter() - t1, int(trainer.global_step)
        val_metrics = validation_summary(trainer, val_cbs)
    model.eval()

    policy_dir = work / "policy"
    with atomic_dir(policy_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    metrics = {"train/optimizer_steps": float(steps), "train/fit_s": fit_s,
               # pairs actually trained on (early stopping can end the fit before the last epoch)
               "train/pairs_per_s": min(len(dm.dataset) * tc.epochs, steps * tc.grad_accum * tc.batch_size * n_dev)
               / max(fit_s, 1e-9) if not resume else 0.0,
               **val_metrics}
    mlflow.log_metrics(metrics)
    model_uri = delta_uri = None
    mode = policy_log_mode(tc)  # full | delta | none (train.log_policy, else train.log_model)
    mlflow.set_tag(Tag.POLICY_LOG, mode)
    if mode != "none":
        meta = PolicyMeta(cfg.model.name_or_path, run_id, shaping.decisions_hash, _audit_run_id(cfg, run_id),
                          shaping.summary())
    if mode == "full":
        model_uri = log_policy(policy_dir, meta).model_uri
    elif mode == "delta":  # only what training changed; the full model is assembled on demand
        with atomic_dir(work / "policy_delta") as tmp:
            man = save_delta(model, tmp, model_dir, cfg.model.name_or_path, extra=delta_extra(meta))
        delta_uri = log_policy_delta(work / "policy_delta")
        mlflow.log_metrics({"train/policy_delta_mb": man["bytes"] / 1e6,
                            "train/policy_delta_params": float(man["n_parameters"])})
    atomic_write_json(work / "done.json", {"run_id": run_id, "optimizer_steps": steps})
    if not tc.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("train: %d optimizer steps in %.1f s (precompute %.1f s); policy at %s", steps, fit_s,
             t_pre, policy_dir)
    return {"run_id": run_id, "metrics": metrics, "model_uri": model_uri, "delta_uri": delta_uri,
            "policy_dir": str(policy_dir),
            "optimizer_steps": int(steps), "pairs_dropped": dm.n_dropped,
            "term_names": pre.term_names}
