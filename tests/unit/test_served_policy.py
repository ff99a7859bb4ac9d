"""The policy as the registry serves it: logged with the ``transformers`` flavor (chat task),
registered, aliased ``champion``, loaded back by alias with ``mlflow.pyfunc.load_model`` and asked
a chat message; the evaluation's resolver reads the same registered model back as a HF folder."""

import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from prefsculpt.core.names import Tag
from prefsculpt.tracking.models import TASK, PolicyMeta, log_policy
from prefsculpt.tracking.policies import resolve_policy

NAME = "prefsculpt-policy"
MSG = [{"role": "user", "content": "What is 7 times 8?"}]


def greedy_reply(model_dir: Path, messages: list[dict], n: int) -> str:
    """The reply the plain transformers stack gives: chat template, greedy, ``n`` new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def talkative_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama with an untied random output layer: its tied one answers every prompt with the
    same newline token, which would make the reply comparison below vacuous."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g))
    out = tmp_path_factory.mktemp("talkative")
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(out))
    return out


@pytest.fixture
def champion(talkative_dir, mlflow_uri):
    meta = PolicyMeta(base_model="tiny-llama", train_run_id="", decisions_hash="d" * 64, audit_run_id="a" * 32,
                      shaping=[{"name": "score/named:emoji", "lambda": 0.5, "layer": 1}])
    mlflow.set_experiment("served-policy")
    with mlflow.start_run():
        info = log_policy(talkative_dir, meta)
    mv = mlflow.register_model(info.model_uri, NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", mv.version)
    return info


def test_champion_loads_by_alias_and_answers_a_chat_message(champion, talkative_dir):
    pyf = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = pyf.predict({"messages": MSG, "max_tokens": 6, "temperature": 0.0})  # what OpenAI clients send for greedy
    assert isinstance(out, list) and len(out) == 1
    reply = out[0]
    assert reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    # The served reply is the greedy continuation of the chat-templated prompt, token for token.
    assert reply["usage"]["completion_tokens"] == 6 and choice["finish_reason"] == "length"
    expected = greedy_reply(talkative_dir, MSG, 6)
    assert expected.strip() and choice["message"]["content"].strip() == expected.strip()


def test_logged_model_is_the_transformers_chat_flavor_with_its_shaping(champion, tmp_path):
    root = Path(mlflow.artifacts.download_artifacts(champion.model_uri, dst_path=str(tmp_path / "dl")))
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["task"] == TASK or mlmodel["metadata"]["task"] == TASK
    assert "torchvision" not in (root / "requirements.txt").read_text()
    assert mlmodel["metadata"]["prefsculpt"]["decisions_hash"] == "d" * 64
    sig_inputs = [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])]
    assert "messages" in sig_inputs and "max_tokens" in sig_inputs
    example = json.loads((root / "input_example.json").read_text())
    assert example["messages"][0]["role"] == "user"
    card = (root / "model_card.md").read_text()
    assert "d" * 64 in card and "score/named:emoji" in card and "mlflow models serve" in card
    assert (root / "model" / "model.safetensors").is_file() and (root / "components" / "tokenizer").is_dir()
    lm = mlflow.get_logged_model(champion.model_id)
    assert lm.tags[Tag.DECISIONS_HASH] == "d" * 64 and lm.tags[Tag.AUDIT_RUN] == "a" * 32
    assert lm.params["shaping/score/named:emoji/lambda"] == "0.5"


def test_resolver_reads_the_registered_flavor_back_as_one_hf_folder(champion, talkative_dir, tmp_path):
    from safetensors.torch import load_file

    got = resolve_policy(f"models:/{NAME}@champion", "/unused", tmp_path / "cache")
    assert (got.path / "config.json").is_file() and (got.path / "tokenizer_config.json").is_file()
    a, b = load_file(str(got.path / "model.safetensors")), load_file(str(talkative_dir / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # the very weights trained
    # A downloaded MLflow model folder given as a local path resolves the same, without writing into it.
    local = Path(mlflow.artifacts.download_artifacts(champion.model_uri, dst_path=str(tmp_path / "mine")))
    before = sorted(p.name for p in (local / "model").iterdir())
    folder = resolve_policy(str(local), "/unused", tmp_path / "cache")
    assert folder.source == "folder" and (folder.path / "tokenizer_config.json").is_file()
    assert folder.digest == got.digest
    assert sorted(p.name for p in (local / "model").iterdir()) == before
