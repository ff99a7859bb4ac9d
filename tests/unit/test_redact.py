"""Secrets stay out of runs: URI passwords redacted, MLflow-rejected keys sanitised, long values cut."""

import mlflow
import pytest
from mlflow.utils.validation import _validate_param_name, _validate_tag_name

from prefsculpt.config import compose
from prefsculpt.core.redact import (
    MAX_KEY_CHARS,
    MAX_PARAM_CHARS,
    clip,
    mlflow_key,
    mlflow_params,
    mlflow_tags,
    redact_text,
    redact_value,
)
from prefsculpt.tracking.runs import stage_run


@pytest.mark.parametrize(("text", "want"), [
    ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
    ("postgresql+psycopg://optuna:s3cr3t@10.0.0.5:5432/optuna", "postgresql+psycopg://optuna:***@10.0.0.5:5432/optuna"),
    ("s3://AKIAXYZ:ab/cd+ef@bucket/pairs.jsonl", "s3://AKIAXYZ:***@bucket/pairs.jsonl"),  # '/' in the secret
    ("https://u:p@ss:w@rd@example.com/x?y=1", "https://u:***@example.com/x?y=1"),  # '@' in the password
    ("redis://:only-a-password@cache:6379/0", "redis://:***@cache:6379/0"),
    ("uri: 'mysql://root:hunter2@db/optuna'  # note", "uri: 'mysql://root:***@db/optuna'  # note"),
    ("a=http://x:1@h b=https://y:2@k/p", "a=http://x:***@h b=https://y:***@k/p"),
    ("https://h/p.csv?X-Amz-Signature=abc123&X-Amz-Date=1", "https://h/p.csv?X-Amz-Signature=***&X-Amz-Date=1"),
    ("sqlite:///tmp/mlflow.db?password=pw", "sqlite:///tmp/mlflow.db?password=***"),
    # nothing secret: left exactly as it is
    ("postgresql://postgres@localhost/db", "postgresql://postgres@localhost/db"),
    ("sqlite:////tmp/a:b/mlflow.db", "sqlite:////tmp/a:b/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("user@example.com wrote a:b", "user@example.com wrote a:b"),
    ("lr=0.001", "lr=0.001"),
])
def test_redact_text(text, want):
    assert redact_text(text) == want


def test_redact_value_walks_containers():
    cfg = {"tracking": {"uri": "postgresql://a:b@h/m"}, "paths": ["s3://k:s@b/x", 3], "n": 1}
    assert redact_value(cfg) == {"tracking": {"uri": "postgresql://a:***@h/m"}, "paths": ["s3://k:***@b/x", 3],
                                 "n": 1}


@pytest.mark.parametrize(("key", "want"), [
    ("train.lr", "train.lr"),
    ("shaping/latent 12/weight-x", "shaping/latent 12/weight-x"),
    ("columns.prompt:text", "columns.prompt_text"),
    ("tags.émoji😀", "tags._moji_"),
    ("a//b/", "a/b"),
    ("/abs/../x/./y", "abs/__/x/_/y"),
    ("", "_"),
    ("a\nb\x00c$d\\e", "a_b_c_d_e"),
])
def test_mlflow_key(key, want):
    assert mlflow_key(key) == want
    _validate_param_name(want)  # MLflow's own checks accept it
    _validate_tag_name(want)


def test_long_keys_and_values_and_collisions():
    long_key = "k" * 400
    k = mlflow_key(long_key)
    assert len(k) == MAX_KEY_CHARS and k.startswith("k" * 200) and k != mlflow_key("k" * 401)
    assert clip("x" * 10, 10) == "x" * 10
    cut = clip("y" * 7000, MAX_PARAM_CHARS)
    assert len(cut) == MAX_PARAM_CHARS and cut.endswith("…[cut from 7000 chars]")
    out = mlflow_params({"a:b": "1", "a_b": "2", "uri": "mysql://u:p@h/d", "n": 3, "big": "z" * 9000})
    assert out["a_b"] == "1" and list(out.values())[1] == "2" and len(out) == 5
    assert out["uri"] == "mysql://u:***@h/d" and out["n"] == "3" and len(out["big"]) == MAX_PARAM_CHARS
    assert len(mlflow_tags({"t": "z" * 9000})["t"]) == 8000


def test_log_config_redacts_uris_in_params_and_the_yaml(mlflow_uri):
    secret = "s3cr3t-pw"
    cfg = compose(["experiment=tiny", f"search.storage=postgresql://optuna:{secret}@db.internal/optuna",
                   f"data.path=s3://AKIA:{secret}@bucket/pairs.jsonl"])
    with stage_run(cfg, "prepare") as run:
        pass
    r = mlflow.get_run(run.info.run_id)
    assert r.data.params["search.storage"] == "postgresql://optuna:***@db.internal/optuna"
    assert r.data.params["data.path"] == "s3://AKIA:***@bucket/pairs.jsonl"
    assert r.data.params["train.lr"] == str(cfg.train.lr)  # ordinary params untouched
    yaml = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/config.yaml")
    assert "optuna:***@db.internal" in yaml
    assert secret not in yaml and all(secret not in v for v in r.data.params.values())
