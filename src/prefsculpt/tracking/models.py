"""The trained policy as an MLflow ``transformers`` model that the registry can serve.

Logged with ``task="llm/v1/chat"``: the model takes OpenAI-style chat messages
(``{"messages": [{"role": "user", "content": "..."}], "max_tokens": 64}``), applies the saved
tokenizer's chat template and answers with a ``chat.completion`` object, so
``mlflow models serve`` exposes it at ``/invocations`` and ``mlflow.pyfunc.load_model`` predicts
with the same payload. Inference runs the plain saved weights (no training hooks, as
ablate/prevent require).

Stored layout (what :func:`prefsculpt.tracking.policies.assemble_hf_folder` reads back)::

    MLmodel, model_card.md, input_example.json, requirements.txt, ...
    model/                  config.json, generation_config.json, model.safetensors
    components/tokenizer/   tokenizer.json, tokenizer_config.json, chat_template.jinja

The shaping that produced the weights travels with the model: tags (decisions hash, audit run,
shaping summary) and params on the LoggedModel, a ``prefsculpt`` block in the MLmodel metadata and
the model card. Nothing is fetched from the Hugging Face hub: the card is written here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import torch
from transformers import AutoModelForCausalLM

from prefsculpt.core.names import Tag
from prefsculpt.models.loading import load_tokenizer

log = logging.getLogger(__name__)

TASK = "llm/v1/chat"
#: Generation defaults of the served model (a request's ``max_tokens`` overrides the length). Greedy,
#: as the evaluation measured the policy: the transformers text-generation pipeline otherwise samples
#: at temperature 0.7. Sampling at load time: ``mlflow.pyfunc.load_model(uri, model_config={"do_sample": True})``.
MODEL_CONFIG = {"max_new_tokens": 128, "do_sample": False}
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is 7 times 8? I think it is 54."}],
                 "max_tokens": 16}  # logging validates it by generating: kept short


def _pin(pkg: str) -> str:
    return f"{pkg}=={version(pkg).split('+')[0]}"  # torch reports "2.13.0+cpu"; PyPI knows "2.13.0"


def pip_requirements() -> list[str]:
    """What loading the model needs in a fresh environment. Given explicitly: MLflow's inference adds
    ``torchvision``, which is not installed and breaks logging (STACK §0/§3)."""
    return [_pin(p) for p in ("mlflow", "torch", "transformers", "tokenizers", "safetensors")]


@dataclass(frozen=True)
class PolicyMeta:
    """Where the policy came from; every field optional (plain DPO has no decisions)."""

    base_model: str = ""
    train_run_id: str = ""
    decisions_hash: str | None = None
    audit_run_id: str | None = None
    #: ``ResolvedShaping.summary()``: one dict per intervention (name, lambda, layer, method params).
    shaping: list[dict[str, Any]] = field(default_factory=list)

    def shaping_line(self) -> str:
        if not self.shaping:
            return "plain DPO"
        return "; ".join(f"{s['name']} λ={s.get('lambda')}" for s in self.shaping)

    def tags(self) -> dict[str, str]:
        t = {Tag.SHAPING: self.shaping_line()[:5000], Tag.TRAIN_RUN: self.train_run_id}
        if self.decisions_hash:
            t[Tag.DECISIONS_HASH] = self.decisions_hash
        if self.audit_run_id:
            t[Tag.AUDIT_RUN] = self.audit_run_id
        return {k: v for k, v in t.items() if v}

    def params(self) -> dict[str, str]:
        p = {"base_model": self.base_model, "n_interventions": str(len(self.shaping))}
        for s in self.shaping:
            p[f"shaping/{s['name']}/lambda"] = str(s.get("lambda"))
        return {k: v[:6000] for k, v in p.items() if v}


def model_card(meta: PolicyMeta) -> Any:
    """A ``huggingface_hub.ModelCard`` written offline (without one MLflow asks the hub for it)."""
    from huggingface_hub import ModelCard  # optional: only with hub access

    shaping = "\n".join(f"- `{json.dumps(s, default=str)}`" for s in meta.shaping) or "- none (plain DPO)"
    text = f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
tags: [prefsculpt, dpo, concept-shaping]
---
# prefsculpt policy

DPO-trained from `{meta.base_model or 'the configured base model'}` with concept shaping:
the concepts a person decided the model may not learn from the preference data were suppressed
(or amplified) during training.

- train run: `{meta.train_run_id or '-'}`
- audit run: `{meta.audit_run_id or '-'}`
- decisions hash: `{meta.decisions_hash or '-'}`

## Interventions
{shaping}

## Use
Chat messages in, a chat completion out (task `{TASK}`):

    mlflow models serve -m models:/prefsculpt-policy@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{{"messages": [{{"role": "user", "content": "Is 7 x 8 = 54?"}}], "max_tokens": 64}}'
"""
    return ModelCard(text)


def log_policy(policy_dir: str | Path, meta: PolicyMeta | None = None, name: str = "policy") -> Any:
    """Log the HF folder ``policy_dir`` (safetensors + tokenizer with a chat template) as a
    ``transformers`` chat model of the active run; returns MLflow's ModelInfo (``model_uri`` is
    ``models:/m-<id>``, what promotion registers)."""


    meta = meta or PolicyMeta()
    # A fresh load: the weights exactly as saved, on CPU, with no training hooks attached.
    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(policy_dir)  # pad token and chat template guaranteed
    meta_block = {"prefsculpt": {"base_model": meta.base_model, "train_run_id": meta.train_run_id,
                                 "decisions_hash": meta.decisions_hash, "audit_run_id": meta.audit_run_id,
                                 "shaping": meta.shaping}}
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tok}, name=name, task=TASK,
        input_example=INPUT_EXAMPLE, model_card=model_card(meta), pip_requirements=pip_requirements(),
        model_config=dict(MODEL_CONFIG), metadata=json.loads(json.dumps(meta_block, default=str)),
        tags=meta.tags(), params=meta.params())
    log.info("policy logged as %s (%s, transformers flavor)", info.model_uri, TASK)
    return info
