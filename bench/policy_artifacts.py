"""Artifact-store growth per search trial: a whole logged model (train.log_policy=full) vs the
policy delta (train.log_policy=delta, the trained top layers + manifest), issue 17 point 4.

Measured on the tiny test llama (tests/tiny.py): both artifacts are logged to a throw-away sqlite
MLflow store and their files summed. Computed for SmolLM2-135M: the parameters ``freeze_below``
leaves trainable with ``train.train_top_layers`` (a meta-device model from the config: no weights
are loaded), times 4 bytes (the train stage keeps float32 master weights and saves them as such).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/policy_artifacts.py [--top 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: SmolLM2-135M-Instruct's config (the embedded default; read from its converted folder when present).
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}


def _bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def measure_tiny(top: int) -> dict[str, float]:
    import mlflow

    from prefsculpt.models.delta import save_delta
    from prefsculpt.models.loading import load_model
    from prefsculpt.tracking.models import PolicyMeta, log_policy, log_policy_delta
    from prefsculpt.train.module import freeze_below
    from tests.tiny import make_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = make_model_dir(tmp / "base")
        model = load_model(base)
        freeze_below(model, top)
        with torch.no_grad():  # a trained policy: its top layers moved
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        full_dir = tmp / "policy"
        model.save_pretrained(str(full_dir))
        from prefsculpt.models.loading import load_tokenizer

        load_tokenizer(base).save_pretrained(str(full_dir))
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
        with mlflow.start_run():
            full_uri = log_policy(full_dir, PolicyMeta("tiny")).model_uri
            save_delta(model, tmp / "delta", base, "tiny")
            delta_uri = log_policy_delta(tmp / "delta")
        full_b = _bytes(mlflow.artifacts.download_artifacts(full_uri, dst_path=str(tmp / "dl-full")))
        delta_b = _bytes(mlflow.artifacts.download_artifacts(delta_uri, dst_path=str(tmp / "dl-delta")))
        n_all = sum(p.numel() for p in model.parameters())
        n_top = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"top_layers": top, "params_total": n_all, "params_trained": n_top, "full_bytes": full_b,
            "delta_bytes": delta_b, "ratio": delta_b / full_b}


def compute_smollm2(top: int) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefsculpt.train.module import freeze_below

    conf = dict(SMOLLM2)
    try:
        from prefsculpt.models.loading import resolve_model_dir

        found = json.loads((resolve_model_dir("smollm2-135m-instruct") / "config.json").read_text())
        conf.update({k: found[k] for k in SMOLLM2 if k in found})
    except Exception as exc:  # noqa: BLE001 - the config above is SmolLM2-135M's
        print(f"(SmolLM2 config from the script: {type(exc).__name__})", file=sys.stderr)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**conf))
    freeze_below(model, top)
    n_all = sum(p.numel() for p in model.parameters())  # tied LM head counted once, as safetensors stores it
    n_top = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"top_layers": top, "params_total": n_all, "params_trained": n_top, "full_bytes": 4 * n_all,
            "delta_bytes": 4 * n_top, "ratio": n_top / n_all}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=6, help="train.train_top_layers for SmolLM2 (default 6)")
    ap.add_argument("--tiny-top", type=int, default=1, help="train_top_layers of the tiny 4-layer model")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out = {"tiny_measured": measure_tiny(a.tiny_top), "smollm2_computed": compute_smollm2(a.top)}
    for k, r in out.items():
        print(f"{k}: top {r['top_layers']} layers, {r['params_trained']:,} of {r['params_total']:,} parameters; "
              f"full {r['full_bytes'] / 1e6:.3f} MB vs delta {r['delta_bytes'] / 1e6:.3f} MB per trial "
              f"({r['ratio']:.1%})")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
