"""The sae stage on a loaded SAE (issue 14.3): the layer comes from the SAE's hook, the folder may be a
``runs:/`` URI, and a misfit SAE stops the stage with exit 2 before the model runs. Tiny random llama."""

import mlflow
import pytest
import torch

from prefsculpt.cli import main
from prefsculpt.concepts.shards import load_scores
from tests.unit.concepts.test_sae_model import D, F, make_sae


def _overrides(tiny_model_dir, tmp_path, *extra):
    return ["experiment=tiny", f"model.name_or_path={tiny_model_dir}", f"cache_dir={tmp_path / 'cache'}",
            "data.planted.n_pairs=40", "data.planted.clean_pairs=0", "named_concepts=[]", *extra]


def test_sae_stage_reads_a_logged_published_style_sae_at_its_own_hook(tiny_model_dir, mlflow_uri, tmp_path, capsys):
    sae = make_sae("jumprelu", hook="blocks.1.hook_resid_post", model_name=str(tiny_model_dir))
    sae.save_model(str(tmp_path / "pub"))
    mlflow.set_experiment("elsewhere")
    with mlflow.start_run() as up:  # the SAE travels as another run's artifact
        mlflow.log_artifacts(str(tmp_path / "pub"), "sae")
    base = _overrides(tiny_model_dir, tmp_path)
    assert main(["prepare", *base]) == 0
    uri = f"runs:/{up.info.run_id}/sae"
    assert main(["sae", *base, "sae.source=path", f"sae.path={uri}"]) == 0

    runs = mlflow.search_runs(experiment_names=["prefsculpt"], filter_string="tags.`prefsculpt.stage` = 'sae'",
                              output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["prefsculpt.layer"] == "1"
    assert runs[0].data.tags["prefsculpt.sae_source"] == "path"
    dst = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, dst_path=str(tmp_path / "dl"))
    scores = load_scores(f"{dst}/scores")
    # the pairs the pipeline learns from (train + validation), never the held-out select / test ones
    prep = mlflow.search_runs(experiment_names=["prefsculpt"], filter_string="tags.`prefsculpt.stage` = 'prepare'",
                              output_format="list")[0]
    learnt = prep.data.metrics["train/n_pairs"] + prep.data.metrics["validation/n_pairs"]
    assert scores.concept_names == [f"latent:{i}" for i in range(F)] and scores.n_pairs == learnt < 40

    # A disagreeing sae.layer, a wrong model name or a wrong width: exit 2 with the reason.
    capsys.readouterr()
    assert main(["sae", *base, "sae.source=path", f"sae.path={uri}", "sae.layer=2"]) == 2
    assert "sae.layer=2 but the SAE was trained at hook 'blocks.1.hook_resid_post'" in capsys.readouterr().err
    sae.cfg.metadata.model_name = "gemma-2-2b"
    sae.save_model(str(tmp_path / "other"))
    assert main(["sae", *base, "sae.source=path", f"sae.path={tmp_path / 'other'}"]) == 2
    assert "trained on model 'gemma-2-2b'" in capsys.readouterr().err
    wide = make_sae("standard", hook="model.layers.1", model_name=str(tiny_model_dir))
    wide.cfg.d_in = 2 * D  # saved as if for a wider model
    wide.W_enc = torch.nn.Parameter(torch.zeros(2 * D, F))
    wide.W_dec = torch.nn.Parameter(torch.zeros(F, 2 * D))
    wide.b_dec = torch.nn.Parameter(torch.zeros(2 * D))
    wide.save_model(str(tmp_path / "wide"))
    assert main(["sae", *base, "sae.source=path", f"sae.path={tmp_path / 'wide'}"]) == 2
    assert f"d_in={2 * D} but the model's residual width is {D}" in capsys.readouterr().err


def test_a_runs_uri_that_does_not_resolve_is_a_user_error(tiny_model_dir, mlflow_uri, tmp_path, capsys):
    base = _overrides(tiny_model_dir, tmp_path)
    assert main(["sae", *base, "sae.source=path", "sae.path=runs:/0123456789abcdef0123456789abcdef/sae"]) == 2
    err = capsys.readouterr().err
    assert "sae.path='runs:/0123456789abcdef0123456789abcdef/sae' does not resolve" in err


@pytest.mark.parametrize("key", ["shaping.directions_path", "eval.shift.hypotheses_path"])
def test_every_uri_field_is_found(key):
    from prefsculpt.config import compose
    from prefsculpt.tracking.inputs import uri_fields

    cfg = compose([f"{key}=runs:/abc/x", "eval.policy=models:/m@champion"])
    assert uri_fields(cfg) == [key]  # eval.policy resolves itself (policies.py)


@pytest.mark.parametrize("model,sae,name,release,sae_id", [
    ("gemma2_2b", "gemma_scope_2b", "google/gemma-2-2b", "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical"),
    ("llama31_8b", "llama_scope_8b", "meta-llama/Llama-3.1-8B", "llama_scope_lxr_8x", "l15r_8x"),
])
def test_presets_pair_a_hub_model_with_its_published_sae(model, sae, name, release, sae_id):
    from prefsculpt.config import compose

    cfg = compose([f"model={model}", f"sae={sae}"])
    assert (cfg.model.name_or_path, cfg.sae.source, cfg.sae.release, cfg.sae.sae_id) == (name, "pretrained", release, sae_id)
    assert cfg.sae.layer is None  # from the SAE's own hook, never set by hand


def test_pretrained_preset_offline_names_the_load_from_disk_recipe(monkeypatch):
    from prefsculpt.concepts.sae import SAESourceError, load_sae
    from prefsculpt.config import compose

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["model=gemma2_2b", "sae=gemma_scope_2b"])
    with pytest.raises(SAESourceError, match=r"gemma-scope-2b-pt-res-canonical.*SAE.load_from_disk"):
        load_sae(cfg.sae)
