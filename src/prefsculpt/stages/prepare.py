"""The ``prepare`` stage: load, validate, split and tokenise the pairs; log what a person needs to see.

Artifacts of the run (read by later stages):
``data/{train,validation,select,test[,clean_select,clean_test]}.parquet``, ``data/stats.json``,
``data/skipped.json``, ``data/sample.json`` (an MLflow table), ``config/config.yaml``.

Metrics ``overlap/*`` count what the held-out items (select, test, the planted clean pairs and the
probe pool) share with the pairs the pipeline learns from, by prompt and by planted fact
(:func:`prefsculpt.data.prepared.overlap_metrics`). They must be 0: the run logs them, then fails
when one is not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig

from prefsculpt.core.faults import fault_point
from prefsculpt.core.files import scratch_dir
from prefsculpt.core.names import Artifact, Tag
from prefsculpt.core.paths import cache_root
from prefsculpt.data.loaders import LoadResult
from prefsculpt.data.planted import planted_tag_rates
from prefsculpt.data.prepare import tag_stats, write_split
from prefsculpt.data.prepared import (
    MANIFEST,
    Prepared,
    PreparedError,
    overlap_metrics,
    read_prepared,
    split_source,
    write_prepared,
)
from prefsculpt.data.splits import SPLITS
from prefsculpt.data.tokenize import TRUNCATION_POLICY, token_stats, tokenize_pairs
from prefsculpt.models.loading import load_tokenizer, resolve_model_dir, tokenizer_fingerprint
from prefsculpt.stages import STAGES
from prefsculpt.tracking.reuse import find_reusable, stage_key
from prefsculpt.tracking.runs import CURRENT_STAGE_KEY, log_pairs_input, pairs_frame, stage_run

log = logging.getLogger(__name__)


def run_prepare(cfg: DictConfig) -> dict[str, Any]:
    """Load and validate first (bad data stops here, before any run exists), then tokenise and log
    inside the stage's run; returns metrics, the run id and local artifact paths."""
    prepared, loaded = split_source(cfg.data)
    with stage_run(cfg, "prepare") as run:
        return _prepare(cfg, run.info.run_id, prepared, loaded)


def _prepare(cfg: DictConfig, run_id: str, prepared: Prepared, loaded: LoadResult) -> dict[str, Any]:
    name = prepared.meta["dataset"]
    splits = {s: prepared.splits[s] for s in SPLITS}
    overlap = overlap_metrics(prepared)
    log.info("held-out overlap with the learnt splits (all must be 0): %s", overlap)

    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    tok = load_tokenizer(model_dir)
    tcfg = cfg.data.tokenize
    stats: dict[str, Any] = {
        "source": loaded.source,
        "dataset": name,
        "rows_read": loaded.n_rows,
        "rows_valid": len(loaded.pairs),
        "rows_skipped": len(loaded.skipped),
        "skipped_by_reason": loaded.skip_counts(),
        "truncation_policy": TRUNCATION_POLICY,
        "max_prompt_tokens": tcfg.max_prompt_tokens,
        "max_response_tokens": tcfg.max_response_tokens,
        "splits": {},
    }
    metrics: dict[str, float] = {
        "rows_read": loaded.n_rows,
        "rows_valid": len(loaded.pairs),
        "rows_skipped": len(loaded.skipped),
    }
    named = {**splits, **{s: ps for s, ps in prepared.splits.items() if s not in splits}}
    tokens = {}
    for split, pairs in named.items():
        toks = tokens[split] = tokenize_pairs(pairs, tok, tcfg.max_prompt_tokens, tcfg.max_response_tokens)
        ts = token_stats(toks)
        st = {"n_pairs": len(pairs), "n_prompts": len({p.prompt_key() for p in pairs}), **ts, **tag_stats(pairs)}
        stats["splits"][split] = st
        metrics[f"{split}/n_pairs"] = len(pairs)
        for k in ("tokens_prompt_mean", "tokens_chosen_mean", "tokens_rejected_mean",
                  "truncated_prompt", "truncated_chosen", "truncated_rejected"):
            if k in ts:
                metrics[f"{split}/{k}"] = ts[k]
        for k, v in st.items():
            if k.startswith("tag_") and k.endswith("_chosen_gt_rejected"):
                metrics[f"{split}/{k}"] = v
    if not cfg.data.path:
        stats["planted_tag_rates"] = planted_tag_rates(loaded.pairs)
        metrics.update({f"planted_rate/{k}": v for k, v in stats["planted_tag_rates"].items()})

    with scratch_dir(cache_root(cfg.cache_dir), "prepare") as tmp:
        out = Path(tmp) / "data"
        out.mkdir()
        write_prepared(out / "prepared", named, prepared.source_rows, tokens, {
            **prepared.meta, "tokenize": {"tokenizer": tokenizer_fingerprint(model_dir), "max_prompt_tokens": tcfg.max_prompt_tokens,
                         "max_response_tokens": tcfg.max_response_tokens}})
        for split, pairs in named.items():
            write_split(pairs, out / f"{split}.parquet")
        (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
        (out / "skipped.json").write_text(json.dumps([e.to_dict() for e in loaded.skipped], indent=2))
        mlflow.log_artifacts(str(out), "data")
    fault_point("prepare", "logged")
    metrics.update(overlap)
    mlflow.log_metrics(metrics)
    if loaded.skipped:
        mlflow.log_table(pd.DataFrame([e.to_dict() for e in loaded.skipped]), "data/skip_report.json")
    sample = pairs_frame(splits["train"][: cfg.data.sample_rows])
    mlflow.log_table(sample, "data/sample.json")
    source = loaded.source if cfg.data.path else None  # data.path with any URI password redacted
    digests = {}
    for split, pairs in named.items():
        if pairs:
            digests[split] = log_pairs_input(pairs, f"{name}-{split}", context=split, source=source)
    mlflow.set_tags({Tag.DATASET: name, Tag.DATA_DIGEST: digests.get("train", "")})
    log.info("prepare: %d valid of %d rows (%d skipped); splits %s", len(loaded.pairs), loaded.n_rows,
             len(loaded.skipped), {s: len(p) for s, p in named.items()})
    if overlap["overlap/total"]:
        raise PreparedError(f"held-out items share prompts or facts with the learnt splits: {overlap} (must all be "
                            "0); the split is broken, report it")
    return {"run_id": run_id, "metrics": metrics, "stats": stats, "digests": digests,
            "splits": {s: len(p) for s, p in named.items()}}


def prepared_data(cfg: DictConfig) -> tuple[Prepared, str]:
    """The prepared artifact this config means, and the prepare run it comes from.

    ``data.prepared_run_id`` when set (the ``main`` pipeline sets it to its prepare run); else the
    newest complete prepare run whose inputs (data, model, seed, code) equal this config's; else the
    prepare stage runs now, as its own run. Call it before opening the caller's own run.
    """
    run_id = cfg.data.prepared_run_id
    if not run_id:
        st = STAGES["prepare"]
        key = stage_key("prepare", cfg, st.sections, (), st.code)
        found = find_reusable(key, stage="prepare")
        if found is not None:
            run_id = found.info.run_id
        else:
            log.info("no prepare run for this data yet: running the prepare stage first")
            token = CURRENT_STAGE_KEY.set(key)  # tag the run with its key, so the next stage finds it
            try:
                run_id = run_prepare(cfg)["run_id"]
            finally:
                CURRENT_STAGE_KEY.reset(token)
    dest = cache_root(cfg.cache_dir) / "prepared" / run_id
    if not (dest / "prepared" / MANIFEST).is_file():
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=Artifact.PREPARED, dst_path=str(dest))
        except mlflow.exceptions.MlflowException as exc:
            raise PreparedError(f"prepare run {run_id} has no {Artifact.PREPARED} artifact ({exc}); rerun prepare, or "
                                "unset data.prepared_run_id") from exc
    return read_prepared(dest / "prepared"), run_id
