"""runs:/ and models:/ inputs become local paths (issue 14.6). A registered models:/ download is
covered by tests/unit/test_policies.py (it needs a logged model)."""

import mlflow
import pytest

from prefsculpt.config import compose
from prefsculpt.tracking import inputs as I


def test_runs_and_models_uris_download_and_runs_are_cached(mlflow_uri, tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "decisions.yaml").write_text("concepts: []\n")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "w.txt").write_text("w")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "d"), "audit")
    rid = run.info.run_id
    f = I.resolve_input(f"runs:/{rid}/audit/decisions.yaml", tmp_path / "in", what="shaping.decisions")
    assert f.is_file() and f.read_text() == "concepts: []\n"
    folder = I.resolve_input(f"runs:/{rid}/audit/sub", tmp_path / "in")
    assert (folder / "w.txt").read_text() == "w"
    assert I.resolve_input("/local/x.jsonl", tmp_path / "in") == "/local/x.jsonl"  # paths pass through
    assert I.resolve_input(None, tmp_path / "in") is None

    with pytest.raises(I.InputSourceError, match=r"sae.path='models:/nope@champion' does not resolve"):
        I.resolve_input("models:/nope@champion", tmp_path / "in", what="sae.path")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **k: pytest.fail("downloaded twice"))
    assert I.resolve_input(f"runs:/{rid}/audit/decisions.yaml", tmp_path / "in") == f  # run artifacts are immutable


def test_config_uris_are_replaced_in_place_and_a_bad_one_names_its_field(mlflow_uri, tmp_path):
    (tmp_path / "s.safetensors").write_bytes(b"x")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "s.safetensors"), "named")
    cfg = compose([f"shaping.directions_path=runs:/{run.info.run_id}/named/s.safetensors", "data.path=/x.jsonl"])
    assert I.resolve_config_inputs(cfg, tmp_path / "in", mlflow_uri) == {
        "shaping.directions_path": f"runs:/{run.info.run_id}/named/s.safetensors"}
    assert open(cfg.shaping.directions_path, "rb").read() == b"x" and cfg.data.path == "/x.jsonl"
    bad = compose(["data.path=runs:/ffffffffffffffffffffffffffffffff/data.jsonl"])
    with pytest.raises(I.InputSourceError, match=r"data.path='runs:/f{32}/data.jsonl' does not resolve"):
        I.resolve_config_inputs(bad, tmp_path / "in", mlflow_uri)


def test_a_model_field_gets_the_hf_folder_inside_the_download(mlflow_uri, tmp_path, tiny_model_dir):
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_model_dir), "policy/components/model")  # nested, as MLflow logs it
        mlflow.log_text("x", "empty/readme.txt")
    cfg = compose([f"model.name_or_path=runs:/{run.info.run_id}/policy"])
    I.resolve_config_inputs(cfg, tmp_path / "in", mlflow_uri)
    assert cfg.model.name_or_path.endswith("policy/components/model")
    with pytest.raises(I.InputSourceError, match="holds no Hugging Face model folder"):
        I.resolve_config_inputs(compose([f"model.name_or_path=runs:/{run.info.run_id}/empty"]), tmp_path / "in",
                                mlflow_uri)


def test_a_null_optional_list_holds_no_uri():
    cfg = compose(["shaping=tiny"])  # its concept leaves the optional `members` list null
    assert cfg.shaping.concepts[0].members is None
    assert I.uri_fields(cfg) == []
