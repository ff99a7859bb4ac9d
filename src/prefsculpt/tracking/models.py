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
import os
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import torch
from transformers import AutoModelForCausalLM

from prefsculpt.core.names import Artifact, Tag
from prefsculpt.models.delta import MANIFEST, read_manifest
from prefsculpt.models.loading import load_tokenizer, resolve_model_dir
from prefsculpt.tracking.policies import resolve_policy, run_has_delta

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


# ---------------------------------------------------------------- policy deltas (train.log_policy=delta)
def delta_extra(meta: PolicyMeta) -> dict[str, Any]:
    """What a delta's manifest carries so its full model can be logged later with the same provenance."""
    return {"policy_meta": asdict(meta)}


def meta_from_manifest(manifest: dict[str, Any], train_run_id: str = "") -> PolicyMeta:
    got = (manifest.get("extra") or {}).get("policy_meta") or {}
    known = {f.name for f in fields(PolicyMeta)}
    meta = {k: v for k, v in got.items() if k in known}
    meta.setdefault("base_model", str(manifest.get("base", {}).get("name_or_path") or ""))
    if train_run_id:
        meta["train_run_id"] = meta.get("train_run_id") or train_run_id
    return PolicyMeta(**meta)


def log_policy_delta(delta_dir: str | Path) -> str:
    """Log the delta folder (``delta.safetensors`` + ``delta.json``) as the active run's
    ``policy_delta/`` artifact; returns its ``runs:/`` URI (what :func:`resolve_policy` assembles)."""
    man = read_manifest(delta_dir)
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_policy_delta needs an active MLflow run")
    mlflow.log_artifacts(str(delta_dir), Artifact.POLICY_DELTA)
    log.info("policy delta logged: layers %s + %s, %.2f MB (%d of %d parameters) against base %s (%s)",
             man["layers"], man["others"], man["bytes"] / 1e6, man["n_parameters"], man["n_base_parameters"],
             man["base"]["name_or_path"], man["base"]["fingerprint"])
    return f"runs:/{run.info.run_id}/{Artifact.POLICY_DELTA}"


def logged_full_policy(train_run_id: str) -> str | None:
    """``models:/m-<id>`` of a full policy logged for ``train_run_id`` (by the train run itself, or
    assembled later by the search or promote for it); None if there is none."""
    client = mlflow.MlflowClient()
    exps = {client.get_run(train_run_id).info.experiment_id}
    if (active := mlflow.active_run()) is not None:
        exps.add(active.info.experiment_id)
    for flt in (f"source_run_id = '{train_run_id}'", f"tags.`{Tag.TRAIN_RUN}` = '{train_run_id}'"):
        found = mlflow.search_logged_models(experiment_ids=sorted(exps), filter_string=flt, output_format="list")
        if found:
            return f"models:/{found[0].model_id}"
    return None


def full_policy_uri(train_run_id: str, base_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """A full, servable model of ``train_run_id``'s policy: the one already logged for it, else its
    delta assembled on ``base_dir`` (verified by fingerprint) and logged with :func:`log_policy` on the
    active run (tagged with the train run, so a second call finds it). Returns ``models:/m-<id>``."""
    found = logged_full_policy(train_run_id)
    if found:
        return found
    path = resolve_policy(train_run_id, base_dir, cache_dir).path
    try:
        man = mlflow.artifacts.load_dict(f"runs:/{train_run_id}/{Artifact.POLICY_DELTA}/{MANIFEST}")
    except Exception as exc:  # a run trained here with log_policy=none: its local folder, plain provenance
        log.warning("no delta manifest on run %s (%s); logging its policy with the run id as provenance",
                    train_run_id, type(exc).__name__)
        man = {}
    info = log_policy(path, meta_from_manifest(man, train_run_id))
    log.info("full policy of train run %s assembled and logged as %s", train_run_id, info.model_uri)
    return str(info.model_uri)


def trial_model_uri(trial_run_id: str, train_run_id: str | None, model_uri: str | None, model_cfg: Any,
                    cache_dir: str | os.PathLike) -> str | None:
    """A search trial's full, registrable model: ``model_uri`` when the trial logged one; else, when
    its train run logged only a delta (search trials do by default), the full policy assembled on the
    configured base (``model_cfg``: ``model.name_or_path``, ``model.cache_dir``), logged with
    :func:`log_policy` on the active run and tagged on the trial run as ``prefsculpt.model_uri``;
    else None. Used after the search (Pareto front) and by promote (the pick)."""
    if isinstance(model_uri, str) and model_uri:
        return model_uri
    if not (isinstance(train_run_id, str) and train_run_id) or not run_has_delta(train_run_id):
        return None
    if model_cfg is None:
        raise ValueError(f"train run {train_run_id} logged only a policy delta: assembling it needs the base "
                         "model (config section model)")
    base_dir = resolve_model_dir(model_cfg.name_or_path, model_cfg.get("cache_dir"))
    uri = full_policy_uri(train_run_id, base_dir, cache_dir)
    mlflow.MlflowClient().set_tag(trial_run_id, Tag.MODEL_URI, uri)
    return uri
