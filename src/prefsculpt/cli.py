"""Shared entry-point plumbing: parse ``--overrides``, compose the config, log nicely, exit cleanly.

User errors (bad data, unresolvable model, bad config) exit with status 2 and one clear message,
not a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import sys
from collections.abc import Callable
from typing import Any

#: stage name -> "module:function" taking the composed config.
STAGES: dict[str, str] = {
    "prepare": "prefsculpt.data.prepare:run_prepare",
    "sae": "prefsculpt.concepts.stage:run_sae",
    "audit": "prefsculpt.audit.stage:run_audit",
    "train": "prefsculpt.train.stage:run_train",
    "evaluate": "prefsculpt.evals.stage:run_evaluate",
    "search": "prefsculpt.search.study:run_search",
    "promote": "prefsculpt.search.promote:run_promote",
    "main": "prefsculpt.pipeline:run_main",
    "review": "prefsculpt.stages.review:run_review",
}


def setup_logging(level: str = "INFO") -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # Logs (not results) go to stderr; in a pipe or CI log keep lines long rather than re-wrapped at 80.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    logging.basicConfig(
        level=level, format="%(message)s", datefmt="[%X]",
        handlers=[RichHandler(console=console, rich_tracebacks=False, show_path=False)], force=True,
    )
    for noisy in ("urllib3", "filelock", "alembic", "httpx", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Exceptions that mean "the user's input is wrong", as (module, class name): exit 2, no traceback.
USER_ERRORS = (
    ("prefsculpt.data.errors", "DataValidationError"),
    ("prefsculpt.data.errors", "DataSourceError"),
    ("prefsculpt.models.loading", "ModelSourceError"),
    ("prefsculpt.audit.stage", "AuditInputError"),
    ("prefsculpt.audit.decisions", "DecisionsError"),
    ("prefsculpt.audit.labels", "ExplainError"),
    ("prefsculpt.concepts.shards", "ShardStoreError"),
    ("prefsculpt.concepts.sae", "SAESourceError"),
    ("prefsculpt.concepts.named", "NamedConceptError"),
    ("prefsculpt.shaping.registry", "ShapingError"),
    ("prefsculpt.search.study", "SearchInputError"),
    ("prefsculpt.search.space", "SearchSpaceError"),
    ("prefsculpt.search.promote", "PromoteInputError"),
    ("prefsculpt.search.promote", "PromotionRefused"),
    ("prefsculpt.review.data", "ReviewInputError"),
    ("prefsculpt.tracking.artifacts", "ArtifactRefError"),
    ("omegaconf.errors", "OmegaConfBaseException"),
    ("hydra.errors", "HydraException"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Resolved lazily (only when an exception is being handled), so a stage imports only what it uses."""
    out = []
    for mod, name in USER_ERRORS:
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def _resolve(stage: str) -> Callable[[Any], dict]:
    mod, fn = STAGES[stage].split(":")
    return getattr(importlib.import_module(mod), fn)


def run_stage(stage: str, overrides: str | list[str] | None) -> dict:
    from prefsculpt.config import compose

    os.environ.setdefault("WANDB_MODE", "disabled")  # sae_lens imports wandb (STACK.md §0)
    cfg = compose(overrides)
    seed_everything(int(cfg.seed))
    return _resolve(stage)(cfg)


def main(argv: list[str] | None = None, stage: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefsculpt", description="prefsculpt pipeline stages")
    if stage is None:
        parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--overrides", default="", help='Hydra overrides as one string, e.g. "experiment=tiny"')
    parser.add_argument("extra", nargs="*", help="more Hydra overrides (key=value)")
    parser.add_argument("--log-level", default=os.environ.get("PREFSCULPT_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    stage = stage or args.stage
    try:
        result = run_stage(stage, [args.overrides, *args.extra])
    except user_errors() as exc:
        # Plain text on stderr: the message lists rows/files and must not be re-wrapped.
        sys.stderr.write(f"prefsculpt {stage} failed: {exc}\n")
        return 2
    logging.getLogger("prefsculpt").info("%s finished: run %s", stage, result.get("run_id"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
