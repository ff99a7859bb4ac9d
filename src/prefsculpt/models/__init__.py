"""Model resolution and loading (embedded GGUF default, local folders, hub names), residual hooks."""

from prefsculpt.models.loading import ModelSourceError, load_model, load_tokenizer, resolve_model_dir

__all__ = ["ModelSourceError", "load_model", "load_tokenizer", "resolve_model_dir"]
