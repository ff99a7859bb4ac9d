"""One search worker process for tests/integration/test_pg_workers.py:
``python -m tests.integration.pg_worker MODE CONFIG.yaml`` (MLFLOW_TRACKING_URI from the environment).

MODE ``fake``: each trial logs train/evaluate child runs and synthetic metrics (helpers.FakeRunner),
taking about a second so the two workers overlap; ``hang``: the trial opens its train run, writes
``<config dir>/hung`` and sleeps until it is killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
from omegaconf import OmegaConf

from prefsculpt.cli import setup_logging
from prefsculpt.search.objective import Outcome
from prefsculpt.stages.search import run_search
from tests.unit.search.helpers import FakeRunner


class SlowRunner(FakeRunner):
    def __call__(self, cfg) -> Outcome:
        time.sleep(1.0)
        return super().__call__(cfg)


class HangRunner:
    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self, cfg) -> Outcome:
        with mlflow.start_run(run_name="train", nested=True, tags={"prefsculpt.stage": "train"}) as run:
            self.marker.write_text(run.info.run_id)
            time.sleep(3600)  # killed here, mid-trial
        raise AssertionError("unreachable")


def main() -> int:
    mode, path = sys.argv[1], Path(sys.argv[2])
    setup_logging("INFO")
    cfg = OmegaConf.load(path)
    runner = SlowRunner() if mode == "fake" else HangRunner(path.parent / "hung")
    out = run_search(cfg, runner=runner)
    print(f"worker {mode} ran trials {out['trials_ran']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
