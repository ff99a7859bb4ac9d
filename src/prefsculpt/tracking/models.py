"""The trained policy as an MLflow pyfunc model that generates (no training hooks: inference runs
the plain weights, as ablate/prevent require)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow

log = logging.getLogger(__name__)

#: What ``mlflow.pyfunc.load_model`` needs in a fresh environment (STACK §3: pass them explicitly).
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "mlflow==3.17.2", "safetensors", "pandas"]


class PolicyLM(mlflow.pyfunc.PythonModel):
    """Input: prompts (a list of strings or a DataFrame whose ``prompt`` or first column holds them).
    Output: the greedy (or sampled, with ``temperature`` > 0) responses, one string per prompt.
    No type hints on ``predict``: MLflow would infer the signature from them and drop ``params``."""

    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["policy"]
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(x) for x in model_input[col]]
        else:
            prompts = [str(x) for x in model_input]
        max_new = int(params.get("max_new_tokens", 64))
        temp = float(params.get("temperature", 0.0))
        out = []
        for p in prompts:
            text = self.tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=False)
            ids = self.tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                gen = self.model.generate(ids, max_new_tokens=max_new, do_sample=temp > 0,
                                          temperature=temp if temp > 0 else None, top_p=None, top_k=None,
                                          pad_token_id=self.tok.pad_token_id)
            out.append(self.tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def log_policy(policy_dir: str | Path, name: str = "policy") -> Any:
    """Log ``policy_dir`` (safetensors + tokenizer) as a pyfunc model of the active run."""
    sig = mlflow.models.infer_signature(["prompt"], ["response"],
                                        params={"max_new_tokens": 64, "temperature": 0.0})
    return mlflow.pyfunc.log_model(name=name, python_model=PolicyLM(), artifacts={"policy": str(policy_dir)},
                                   signature=sig, pip_requirements=PIP_REQUIREMENTS)
