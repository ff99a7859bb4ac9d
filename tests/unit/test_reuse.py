"""Reuse is keyed on contents: editing an input file recomputes exactly the stages downstream of it.

The stages are replaced by fakes that only open their run (the real ones take minutes); the
pipeline, the keys, the lookups and the run tree are the real ones.
"""

import mlflow
import pytest

from prefsculpt.config import compose
from prefsculpt.stages import DEFAULT_ORDER, Stage
from prefsculpt.stages.main import run_main
from prefsculpt.tracking.reuse import input_digests, path_digest, stage_key
from prefsculpt.tracking.runs import stage_run

ORDER = list(DEFAULT_ORDER)  # prepare, sae, audit, search, evaluate, promote


@pytest.fixture
def fake_stages(monkeypatch):
    ran: list[str] = []

    def fn(self, pipeline=False):
        def run(cfg):
            ran.append(self.name)
            with stage_run(cfg, self.name) as r:
                mlflow.log_metric("x", 1.0)
                return {"run_id": r.info.run_id, "metrics": {"x": 1.0}}
        return run

    monkeypatch.setattr(Stage, "fn", fn)
    return ran


@pytest.fixture
def inputs(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    decisions = tmp_path / "decisions.yaml"
    decisions.write_text("concepts: []\n")
    return data, decisions


def _overrides(data, decisions, tmp_path):
    return (f"experiment=tiny data.path={data} search.decisions={decisions} cache_dir={tmp_path / 'cache'} "
            f"pipeline.stages=[{','.join(ORDER)}]")


def test_editing_an_input_recomputes_exactly_the_stages_downstream(mlflow_uri, fake_stages, inputs, tmp_path):
    data, decisions = inputs
    cfg = lambda: compose(_overrides(data, decisions, tmp_path))  # noqa: E731

    first = run_main(cfg())
    assert fake_stages == ORDER and first["reused"] == []

    fake_stages.clear()
    again = run_main(cfg())
    assert fake_stages == [] and again["reused"] == ORDER  # nothing changed: everything reused
    assert again["stages"] == first["stages"]

    decisions.write_text("concepts: []\n# reviewed\n")  # same name, new contents
    fake_stages.clear()
    dec = run_main(cfg())
    assert fake_stages == ["search", "evaluate", "promote"]
    assert dec["reused"] == ["prepare", "sae", "audit"]

    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "c"}\n')  # same size, new contents
    fake_stages.clear()
    edited = run_main(cfg())
    assert fake_stages == ORDER and edited["reused"] == []
    assert edited["stages"]["prepare"] != first["stages"]["prepare"]

    # one child per stage in each pipeline run, whether it ran or was reused
    kids = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{edited['run_id']}'")
    assert sorted(k.data.tags["prefsculpt.stage"] for k in kids) == sorted(ORDER)


def test_key_follows_file_contents_not_names_or_sizes(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("xx")
    cfg = compose(f"experiment=tiny data.path={a}")
    k1 = stage_key("prepare", cfg, ("data",))
    a.write_text("yy")  # same size
    k2 = stage_key("prepare", cfg, ("data",))
    assert k1 != k2
    assert stage_key("prepare", cfg, ("data",)) == k2  # deterministic
    # a section the stage does not read does not enter its key
    assert "data.path" not in input_digests(cfg, ("sae",))


def test_folder_digest_covers_nested_files_and_skips_temporaries(tmp_path):
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "part-0.parquet").write_bytes(b"one")
    before = path_digest(d)
    (d / ".tmp-part-1-123.abcdef-0123abcd").write_bytes(b"half-written")
    assert path_digest(d) == before
    (d / "sub" / "part-0.parquet").write_bytes(b"two")
    assert path_digest(d) != before
    import hashlib
    f = d / "sub" / "part-0.parquet"
    assert path_digest(f) == hashlib.sha256(b"two").hexdigest()  # a file: its plain sha256
