"""Shared entry-point plumbing: parse ``--overrides``, compose the config, log nicely, exit cleanly.

User errors (bad data, unresolvable model, bad config) exit with status 2 and one clear message,
not a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys

import numpy as np
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.logging import RichHandler

from prefsculpt.config import compose, conf_dir
from prefsculpt.core.errors import UserError
from prefsculpt.core.paths import cache_root
from prefsculpt.core.progress import quiet_library_bars
from prefsculpt.stages import STAGES
from prefsculpt.tracking.inputs import resolve_config_inputs
from prefsculpt.tracking.runs import adopt_project_run, resolve_tracking_uri


def setup_logging(level: str = "INFO") -> None:
    # Logs (not results) go to stderr; in a pipe or CI log keep lines long rather than re-wrapped at 80.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    logging.basicConfig(
        level=level, format="%(message)s", datefmt="[%X]",
        handlers=[RichHandler(console=console, rich_tracebacks=False, show_path=False)], force=True,
    )
    for noisy in ("urllib3", "filelock", "alembic", "httpx", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_library_bars()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: What means "the user's input is wrong": exit 2, one message, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OmegaConfBaseException, HydraException)


def user_message(exc: BaseException) -> str:
    """The error and, for config errors, the cause Hydra wraps (it names the key and the allowed values)."""
    msg = str(exc)
    cause = exc.__cause__
    if isinstance(exc, HydraException | OmegaConfBaseException) and cause is not None and str(cause) not in msg:
        msg += f"\n{cause}"
    return msg


def run_stage(stage: str, overrides: str | list[str] | None) -> dict:
    os.environ.setdefault("WANDB_MODE", "disabled")  # sae_lens imports wandb (STACK.md §0)
    cfg = compose(overrides)
    logging.getLogger("prefsculpt").info("config from %s", conf_dir())
    adopt_project_run(cfg)  # under `mlflow run`: tracking.uri and tracking.experiment still decide
    # runs:/<id>/<path> and models:/<name>@<alias> in any file field become local paths, once, here.
    resolve_config_inputs(cfg, cache_root(cfg.cache_dir) / "inputs", resolve_tracking_uri(cfg.tracking.uri))
    seed_everything(cfg.seed)
    return STAGES[stage].fn()(cfg)


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
    except USER_ERRORS as exc:
        # Plain text on stderr: the message lists rows/files and must not be re-wrapped.
        sys.stderr.write(f"prefsculpt {stage} failed: {user_message(exc)}\n")
        return 2
    logging.getLogger("prefsculpt").info("%s finished: run %s", stage, result.get("run_id"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
