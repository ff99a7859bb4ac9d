"""The ``main`` entry point: the whole pipeline on one config.

Stages so far: prepare. Later stages (sae, audit, search, evaluate, promote) join here as their
issues land, each as a child run of one parent run.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def run_main(cfg: DictConfig) -> dict[str, Any]:
    from prefsculpt.data.prepare import run_prepare

    return run_prepare(cfg)
