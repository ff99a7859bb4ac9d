"""The stages: one module each, thin orchestration over the domain packages, and their registry.

A stage reads its inputs by run reference, calls pure domain code, and logs to MLflow. The CLI
(``prefsculpt <stage>``), the ``main`` pipeline and ``MLproject`` (one entry point per stage; a
test checks they agree) all take the stage list from :data:`STAGES`.

Layers (enforced by ``import-linter``, see ``pyproject.toml``): stages above search above tracking
above train above shaping above {audit, evals} above concepts above data above models above core.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig


@dataclass(frozen=True)
class Stage:
    name: str
    #: "module:function(cfg) -> dict with run_id" run by ``prefsculpt <name>`` and ``mlflow run -e <name>``.
    target: str
    #: config sections its output depends on (part of its reuse key in ``main``)
    sections: tuple[str, ...] = ()
    #: stages whose outputs it reads, in ``main``
    upstream: tuple[str, ...] = ()
    #: how the upstream run ids reach it in ``main``: config key -> upstream stage
    wiring: tuple[tuple[str, str], ...] = ()
    #: modules / subpackages of prefsculpt whose code it runs (besides the core); part of its reuse key
    code: tuple[str, ...] = ()
    #: what ``main`` runs for it, when that differs from ``target``
    pipeline_target: str | None = None
    #: a step of the default ``main`` pipeline
    in_pipeline: bool = True

    def fn(self, pipeline: bool = False) -> Callable[[DictConfig], dict[str, Any]]:
        mod, name = ((self.pipeline_target if pipeline else None) or self.target).split(":")
        return getattr(importlib.import_module(mod), name)


_DATA = ("model", "data", "seed")
#: every stage after prepare reads its prepared artifact
_PREPARED = ("data.prepared_run_id", "prepare")
_CONCEPTS = (*_DATA, "sae", "encode", "named_concepts")
_SEARCH = (*_CONCEPTS, "audit", "shaping", "train", "eval", "search")
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "prefsculpt.stages.prepare:run_prepare", _DATA, code=("stages/prepare.py",)),
    Stage("sae", "prefsculpt.stages.sae:run_sae", _CONCEPTS, ("prepare",), (_PREPARED,),
          code=("concepts", "stages/sae.py")),
    Stage("audit", "prefsculpt.stages.audit:run_audit", (*_CONCEPTS, "audit"), ("sae",),
          (("audit.scores_run_id", "sae"), _PREPARED), code=("audit", "report", "concepts", "stages/audit.py")),
    Stage("train", "prefsculpt.stages.train:run_train", (*_CONCEPTS, "shaping", "train"), in_pipeline=False,
          code=("train", "shaping", "stages/train.py", "stages/train_ddp.py")),
    Stage("search", "prefsculpt.stages.search:run_search", _SEARCH, ("audit",),
          (("search.audit_run_id", "audit"), _PREPARED),
          code=("search", "train", "shaping", "evals", "concepts", "audit", "stages/search.py", "stages/train.py",
                "stages/train_ddp.py", "stages/evaluate.py")),
    Stage("evaluate", "prefsculpt.stages.evaluate:run_evaluate", (*_SEARCH, "promote"), ("search",),
          (("promote.search_run_id", "search"), ("eval.shift.sae_run_id", "sae"),
           ("eval.shift.audit_run_id", "audit"), _PREPARED), code=("search", "evals", "concepts", "stages/evaluate.py"),
          pipeline_target="prefsculpt.stages.evaluate:run_pipeline_evaluate"),
    Stage("promote", "prefsculpt.stages.promote:run_promote", (*_SEARCH, "promote"), ("search", "evaluate"),
          (("promote.search_run_id", "search"), ("promote.evaluate_run_id", "evaluate")),
          code=("search", "stages/promote.py")),
    Stage("main", "prefsculpt.stages.main:run_main", in_pipeline=False),
    Stage("review", "prefsculpt.stages.review:run_review", in_pipeline=False),
)}
#: What ``main`` runs by default, in order.
DEFAULT_ORDER = tuple(name for name, s in STAGES.items() if s.in_pipeline)
