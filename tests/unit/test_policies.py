import mlflow
import pytest

from prefsculpt.core.files import model_fingerprint as model_digest
from prefsculpt.tracking.policies import PolicySourceError, resolve_policy


def test_base_and_local_folders(tiny_model_dir, tmp_path):
    base = resolve_policy("base", tiny_model_dir, tmp_path)
    assert base.source == "base" and base.path == tiny_model_dir and base.digest == model_digest(tiny_model_dir)
    folder = resolve_policy(str(tiny_model_dir), "/unused", tmp_path)
    assert folder.source == "folder" and folder.digest == base.digest


def test_unresolvable_policy_errors_name_it(tmp_path, mlflow_uri):
    cases = [
        ("/no/such/folder", "not a folder, a run id or an MLflow model URI"),
        ("models:/no-such-model@champion", "does not resolve: "),
        ("runs:/0123456789abcdef0123456789abcdef/policy", "does not resolve: "),
        ("0123456789abcdef0123456789abcdef", "no MLflow run with this id"),
    ]
    for spec, why in cases:
        with pytest.raises(PolicySourceError) as e:
            resolve_policy(spec, tmp_path, tmp_path)
        assert f"eval.policy={spec!r}" in str(e.value) and why in str(e.value) and "Accepted:" in str(e.value)


def test_folder_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicySourceError, match="holds no Hugging Face model"):
        resolve_policy(str(tmp_path / "empty"), tmp_path, tmp_path)


def test_registered_alias_and_train_run_resolve(tiny_model_dir, tmp_path, mlflow_uri):
    from prefsculpt.tracking.models import log_policy

    mlflow.set_experiment("evals-policy")
    with mlflow.start_run() as run:
        info = log_policy(tiny_model_dir)
    mv = mlflow.register_model(info.model_uri, "tiny-policy")
    mlflow.MlflowClient().set_registered_model_alias("tiny-policy", "champion", mv.version)
    cache = tmp_path / "cache"
    by_alias = resolve_policy("models:/tiny-policy@champion", "/unused", cache)
    assert by_alias.source == "uri" and by_alias.digest == model_digest(tiny_model_dir)
    assert str(by_alias.path).startswith(str(cache))
    by_run = resolve_policy(run.info.run_id, "/unused", cache)  # the model the run logged
    assert by_run.source == "run" and by_run.digest == by_alias.digest
    # A run trained on this machine resolves to its local policy folder (no download).
    local = cache / "train" / "k1" / "policy"
    local.parent.mkdir(parents=True)
    local.symlink_to(tiny_model_dir, target_is_directory=True)
    with mlflow.start_run(tags={"prefsculpt.train_key": "k1"}) as run2:
        pass
    assert resolve_policy(run2.info.run_id, "/unused", cache).path == local
