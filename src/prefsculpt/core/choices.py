"""Enumerated config choices shared by several sections.

Every choice in the config is a ``StrEnum``: OmegaConf validates it when the config is composed
(``Invalid value 'x', expected one of [...]`` with the full key), and a member compares equal to its
string, so ``cfg.model.dtype == "float32"`` keeps working.
"""

from __future__ import annotations

from enum import StrEnum

DType = StrEnum("DType", ["float32", "bfloat16"])
#: A model's weights dtype: ``auto`` picks bfloat16 on a GPU with bf16, else float32 (core/device.py).
ModelDType = StrEnum("ModelDType", ["auto", "float32", "bfloat16", "float16"])
