import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype/precision "auto" resolve to float32 on every CI CPU (with or without native bf16), so the
# suite's figures do not depend on the machine; tests of the detection unset it.
os.environ.setdefault("PREFSCULPT_CPU_BF16", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """An isolated sqlite tracking store; cwd moves to tmp so nothing lands in the repo."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow
    from mlflow.tracking import fluent

    # mlflow.set_experiment in an earlier test (in-process) leaves its experiment id in the fluent
    # module: a plain start_run() here would then ask this fresh store for an experiment it never had.
    fluent._active_experiment_id = None
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; never leak it into the next test
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    fluent._active_experiment_id = None


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: real-data tests need it beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real embedded default, converted once (integration tests only)."""
    from prefsculpt.models.loading import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")
