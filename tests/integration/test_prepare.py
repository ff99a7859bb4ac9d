"""The prepare stage end to end: the CLI, the MLproject entry point, real data, malformed files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from prefsculpt.cli import main, run_stage

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _artifacts(run_id, path=""):
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


def test_prepare_tiny_logs_stats_splits_sample_and_datasets(mlflow_uri):
    res = run_stage("prepare", "experiment=tiny")
    run = mlflow.get_run(res["run_id"])
    m = run.data.metrics
    assert m["rows_valid"] == 120 and m["rows_skipped"] == 0
    assert m["train/n_pairs"] + m["validation/n_pairs"] + m["select/n_pairs"] + m["test/n_pairs"] == 120
    assert m["clean_select/n_pairs"] == m["clean_test/n_pairs"] == 20
    assert m["overlap/total"] == 0 and m["overlap/heldout_facts_train"] == 0
    assert abs(m["planted_rate/flattery"] - 0.30) < 0.03
    assert {"data/train.parquet", "data/stats.json", "data/skipped.json", "data/sample.json",
            "data/clean_select.parquet", "data/clean_test.parquet"} <= _artifacts(res["run_id"], "data")
    assert "config/config.yaml" in _artifacts(res["run_id"], "config")
    assert run.data.tags["prefsculpt.stage"] == "prepare"
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert {"train", "validation", "select", "test", "clean_select", "clean_test"} <= contexts
    stats = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=res["run_id"],
                                                                artifact_path="data/stats.json")).read_text())
    assert "keep the last" in stats["truncation_policy"]
    assert stats["splits"]["train"]["tokens_chosen_mean"] > 3
    # the splits share no prompt
    from prefsculpt.data.prepare import read_split

    d = Path(mlflow.artifacts.download_artifacts(run_id=res["run_id"], artifact_path="data"))
    names = ("train", "validation", "select", "test")
    keys = {s: {p.prompt_key() for p in read_split(d / f"{s}.parquet")} for s in names}
    assert all(not (keys[a] & keys[b]) for a in names for b in names if a < b)


def _bad_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    rows = [json.dumps({"id": f"r{i}", "prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."})
            for i in range(6)]
    rows[2] = '{"id": "r2", "prompt": "Q?", "chosen": "same", "rejected": "same"}'
    rows[4] = '{"id": "r4", "prompt": "Q?", "chosen": ""'
    p.write_text("\n".join(rows) + "\n")
    return p


def test_malformed_file_exits_nonzero_naming_rows_then_skip_reports_them(mlflow_uri, tmp_path, capsys):
    p = _bad_file(tmp_path)
    assert main([f"--overrides=data.path={p} experiment=tiny"], stage="prepare") == 2
    err = capsys.readouterr().err
    assert "row 3 (id 'r2'): identical_responses" in err and "row 5" in err and "malformed" in err
    assert main([f"--overrides=data.path={p} data.on_error=skip experiment=tiny"], stage="prepare") == 0
    run = mlflow.search_runs(experiment_names=["prefsculpt"], order_by=["start_time DESC"],
                             output_format="list")[0]
    assert run.data.metrics["rows_skipped"] == 2 and run.data.metrics["rows_valid"] == 4
    skipped = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="data/skipped.json")).read_text())
    assert [(s["row"], s["reason"]) for s in skipped] == [(3, "identical_responses"), (5, "malformed")]


def test_hh_rlhf_helpful_base_loads_every_row(mlflow_uri, shared_data):
    path = shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    res = run_stage("prepare", f"data.path={path} data.format=hh_rlhf data.on_error=skip")
    stats = res["stats"]
    # every one of the 2,354 rows is read; 6 are invalid by our rules (4 empty, 2 identical responses)
    assert stats["rows_read"] == 2354
    assert stats["rows_valid"] + stats["rows_skipped"] == 2354
    assert stats["skipped_by_reason"] == {"empty_response": 4, "identical_responses": 2}


def test_mlflow_run_entry_point(mlflow_uri):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "prepare", "--env-manager", "local",
         "--experiment-name", "ci-prepare", "-P", "overrides=experiment=tiny data.split.salt='a b'"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["ci-prepare"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["data.split.salt"] == "a b"  # the override string survived quoting
    assert runs[0].data.tags["mlflow.project.entryPoint"] == "prepare"
