"""The ``main`` stage: prepare → sae → audit → search → evaluate → promote, one run tree.

The ``main`` run shows the final figures (``test/*``) of the evaluate stage: the picked policy and
the plain-DPO baseline, each evaluated once on the ``test`` split, with 95% CIs and their paired
difference (the search and the pick only ever saw the ``select`` split).

Each stage is a child run of one parent run (the ``mlflow run`` project run, or a run opened here).
Before a stage runs, its key — the config sections it reads, the contents of the files they name
(data, decisions, SAE weights, eval files), the keys of the stages it depends on, and the code
version — is looked up among complete, finished runs; when one matches, the stage is
*reused*: a light child run records ``prefsculpt.reused_from`` and the earlier run's metrics, and
downstream stages read the earlier run's artifacts. A second ``mlflow run .`` with nothing changed
therefore recomputes nothing. A killed pipeline run resumed by the same command
(``tracking.resume``) keeps one child per stage: stages that finished before the kill are neither
rerun nor marked again, the killed stage's run is reattached.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf, open_dict

from prefsculpt.core.errors import UserError
from prefsculpt.core.names import PREFIX, Tag
from prefsculpt.stages import DEFAULT_ORDER, STAGES
from prefsculpt.tracking.reuse import find_reusable, stage_key
from prefsculpt.tracking.runs import CURRENT_STAGE_KEY, stage_run

log = logging.getLogger(__name__)


def _reuse_child(stage: str, key: str, earlier: mlflow.entities.Run) -> None:
    """A light child run that records the reuse, so the run tree shows every stage every time."""
    tags = {Tag.STAGE: stage, Tag.REUSED_FROM: earlier.info.run_id, Tag.STAGE_KEY + "_reused": key}
    with mlflow.start_run(run_name=f"{stage} (reused)", nested=True, tags=tags):
        metrics = {k: v for k, v in earlier.data.metrics.items()}
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.set_tag(Tag.COMPLETE, "true")


def _has_child(parent_id: str, stage: str, earlier: mlflow.entities.Run) -> bool:
    """Whether ``parent_id`` already shows ``earlier`` for ``stage`` — it ran there, or its marker is
    there — as when a killed pipeline run is resumed: the tree keeps one child per stage."""
    if earlier.data.tags.get("mlflow.parentRunId") == parent_id:
        return True
    kids = mlflow.MlflowClient().search_runs(
        [earlier.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{Tag.STAGE}` = '{stage}' "
        f"and tags.`{Tag.REUSED_FROM}` = '{earlier.info.run_id}' and attributes.status = 'FINISHED'",
        max_results=1)
    return bool(kids)


def _show_final(evaluate_run_id: str) -> None:
    """The final figures (``test/*``: the pick and plain DPO on the same test items, with CIs) of the
    evaluate stage's run, on the ``main`` run too, with its underpowered warning if any."""
    run = mlflow.MlflowClient().get_run(evaluate_run_id)
    final = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    if final:
        mlflow.log_metrics(final)
    tags = {k: run.data.tags[k] for k in (Tag.UNDERPOWERED, Tag.PLAIN_EVAL_RUN) if k in run.data.tags}
    if tags:
        mlflow.set_tags(tags)


def run_main(cfg: DictConfig) -> dict[str, Any]:
    order = list(cfg.pipeline.stages) if cfg.get("pipeline") and cfg.pipeline.stages else list(DEFAULT_ORDER)
    unknown = [s for s in order if s not in STAGES or s == "main"]
    if unknown:
        raise UserError(f"pipeline.stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    reuse = cfg.pipeline.reuse if cfg.get("pipeline") else True
    results: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    t_start = time.perf_counter()
    with stage_run(cfg, "main") as parent:
        exp = parent.info.experiment_id
        for name in order:
            st = STAGES[name]
            missing = [u for u in st.upstream if u not in results and u in STAGES and u in order]
            if missing:
                raise UserError(f"pipeline.stages: {name} needs {missing} earlier in the list")
            with open_dict(cfg):
                for key, up in st.wiring:
                    if up in results:
                        OmegaConf.update(cfg, key, results[up]["run_id"])
            keys[name] = stage_key(name, cfg, st.sections, [keys[u] for u in st.upstream if u in keys], st.code)
            if name == "search":
                # A new key means new inputs: give it its own study, so a study created for another
                # audit is never mixed in; the same key (a killed search) resumes its study.
                with open_dict(cfg):
                    cfg.search.study_name = f"{cfg.search.study_name}-{keys[name][:8]}"
            t0 = time.perf_counter()
            earlier = find_reusable(keys[name], [exp], stage=name) if reuse else None
            if earlier is not None:
                log.info("%s: inputs unchanged, reusing run %s", name, earlier.info.run_id)
                if not _has_child(parent.info.run_id, name, earlier):
                    _reuse_child(name, keys[name], earlier)
                results[name] = {"run_id": earlier.info.run_id, "metrics": dict(earlier.data.metrics),
                                 "reused": True}
            else:
                token = CURRENT_STAGE_KEY.set(keys[name])
                try:
                    results[name] = {**st.fn(pipeline=True)(cfg), "reused": False}
                finally:
                    CURRENT_STAGE_KEY.reset(token)
            mlflow.log_metric(f"time/{name}_s", time.perf_counter() - t0)
            mlflow.set_tag(f"{PREFIX}run.{name}", results[name]["run_id"])
            if name == "evaluate":
                _show_final(results[name]["run_id"])
        mlflow.log_metric("time/total_s", time.perf_counter() - t_start)
        return {"run_id": parent.info.run_id, "stages": {k: v["run_id"] for k, v in results.items()},
                "reused": [k for k, v in results.items() if v.get("reused")], "results": results}
