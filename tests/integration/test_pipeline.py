"""The main pipeline's run tree and stage reuse."""

import mlflow
import pytest

from prefsculpt.cli import run_stage

pytestmark = pytest.mark.integration


def _children(parent_id):
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              output_format="list")


def test_second_run_reuses_unchanged_stages_and_recomputes_changed_ones(mlflow_uri):
    first = run_stage("main", "experiment=tiny pipeline.stages=[prepare]")
    assert first["reused"] == []
    kids = _children(first["run_id"])
    assert [k.data.tags["prefsculpt.stage"] for k in kids] == ["prepare"]
    assert kids[0].info.run_id == first["stages"]["prepare"]

    second = run_stage("main", "experiment=tiny pipeline.stages=[prepare]")
    assert second["reused"] == ["prepare"] and second["stages"]["prepare"] == first["stages"]["prepare"]
    (kid,) = _children(second["run_id"])
    assert kid.data.tags["prefsculpt.reused_from"] == first["stages"]["prepare"]
    assert kid.data.metrics["rows_valid"] == 120  # the earlier run's metrics are visible in the tree

    changed = run_stage("main", "experiment=tiny pipeline.stages=[prepare] data.planted.seed=1")
    assert changed["reused"] == [] and changed["stages"]["prepare"] != first["stages"]["prepare"]
    # a failed stage is never reused: its run lacks the complete tag
    no_reuse = run_stage("main", "experiment=tiny pipeline.stages=[prepare] pipeline.reuse=false")
    assert no_reuse["reused"] == []


def test_unknown_stage_is_refused(mlflow_uri):
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage("main", "experiment=tiny pipeline.stages=[prepare,tarin]")
