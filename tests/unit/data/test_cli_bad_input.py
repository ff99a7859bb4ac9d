"""`prefsculpt prepare` on each kind of bad file: exit 2, the named error on stderr, no traceback, and
nothing written: the data is loaded and validated before the stage opens its run."""

import os

import mlflow
import pytest

from prefsculpt.cli import main
from tests.unit.data.test_bad_input import BAD_FILES

#: One of each kind the issue names (the rest of BAD_FILES are variants of these).
CLI_KINDS = ("gzip_truncated", "gzip_corrupt", "csv_field_over_131072", "json_nested_too_deep",
             "json_file_nested_past_recursion", "integer_5000_digits", "zero_valid_rows_skip", "unknown_format")


#: Kinds the typed config stops first (an Enum field), with what its message says.
CONFIG_PHRASES = {"unknown_format": ["data.format", "expected one of [auto, plain, chat, hh_rlhf]"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (its schema takes seconds to create), passed as tracking.uri."""
    root = tmp_path_factory.mktemp("cli-bad-input")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.chdir(root)
        yield root, f"sqlite:///{root / 'mlflow.db'}"
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment exports it


@pytest.mark.parametrize("kind", CLI_KINDS)
def test_prepare_on_bad_file_exits_2_with_the_message(store, kind, capsys):
    root, uri = store
    name, data, kwargs, _, phrases = BAD_FILES[kind]
    # the CLI validates choices when the config is composed, before any loader runs
    phrases = CONFIG_PHRASES.get(kind, phrases)
    path = root / kind / name
    path.parent.mkdir()
    path.write_bytes(data)
    extra = {"fmt": "data.format", "on_error": "data.on_error"}
    overrides = [f"data.path={path}", "experiment=tiny", f"tracking.uri={uri}", f"tracking.run_name=bad-{kind}",
                 *(f"{extra[k]}={v}" for k, v in kwargs.items())]
    assert main([f"--overrides={' '.join(overrides)}"], stage="prepare") == 2
    err = capsys.readouterr().err
    assert "prefsculpt prepare failed: " in err and "Traceback" not in err
    err = err.split("prefsculpt prepare failed: ", 1)[1]
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    # nothing half-written: no run exists for the failed prepare (none to mistake for a result)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("prefsculpt")
    runs = [] if exp is None else mlflow.search_runs([exp.experiment_id], f"attributes.run_name = 'bad-{kind}'",
                                                      output_format="list")
    assert runs == []
