"""Where prefsculpt keeps its caches (converted models, activations, SAEs, encodings, precomputes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` when set, else ``$PREFSCULPT_CACHE``, else ``$XDG_CACHE_HOME/prefsculpt`` (``~/.cache``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    root = os.environ.get("PREFSCULPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prefsculpt"
    )
    return Path(root)
