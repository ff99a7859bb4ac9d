"""Stage runs and reuse: only a stage's own run carries its reuse key."""

import mlflow

from prefsculpt.config import compose
from prefsculpt.core.names import Tag
from prefsculpt.tracking.reuse import find_reusable
from prefsculpt.tracking.runs import CURRENT_STAGE_KEY, stage_run


def test_runs_a_stage_opens_inside_itself_are_not_mistaken_for_it(mlflow_uri):
    """The search stage opens train/evaluate runs for its trials, which start (and end) after the
    search run itself; a rerun of the pipeline must find the search run, not the last trial's evaluate."""
    cfg = compose("experiment=tiny")
    token = CURRENT_STAGE_KEY.set("k-search")
    try:
        with stage_run(cfg, "search") as outer:
            with stage_run(cfg, "train") as inner_train:
                pass
            with stage_run(cfg, "evaluate") as inner_eval:
                pass
            assert CURRENT_STAGE_KEY.get() is None  # consumed by the stage's own run
        assert CURRENT_STAGE_KEY.get() == "k-search"  # and restored for the caller
    finally:
        CURRENT_STAGE_KEY.reset(token)
    client = mlflow.MlflowClient()
    assert client.get_run(outer.info.run_id).data.tags[Tag.STAGE_KEY] == "k-search"
    for r in (inner_train, inner_eval):
        assert Tag.STAGE_KEY not in client.get_run(r.info.run_id).data.tags
        assert client.get_run(r.info.run_id).data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert find_reusable("k-search", stage="search").info.run_id == outer.info.run_id
    assert find_reusable("k-search").info.run_id == outer.info.run_id
    assert find_reusable("k-search", stage="evaluate") is None


def test_latest_stage_run_sees_through_a_reused_marker(mlflow_uri):
    """After a second pipeline run, the newest 'sae' run is the light '(reused)' child with no
    artifacts; lookups (the shift eval's SAE, the search's audit) must land on the run it reused."""
    from prefsculpt.tracking.runs import latest_stage_run

    cfg = compose("experiment=tiny")
    with stage_run(cfg, "sae") as real:
        pass
    with mlflow.start_run(run_name="sae (reused)", tags={"prefsculpt.stage": "sae", Tag.REUSED_FROM: real.info.run_id}):
        pass
    exp = real.info.experiment_id
    assert latest_stage_run("sae", [exp]) == real.info.run_id
