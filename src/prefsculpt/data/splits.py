"""Deterministic train / validation / test splits by a stable hash of the prompt.

Hashing the prompt (not the pair) means every pair of one prompt lands in the same split, so a
model is never evaluated on a prompt it was trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from prefsculpt.data.schema import PreferencePair

SPLITS = ("train", "validation", "test")


def split_fraction(key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) from the prompt key; stable across machines and Python versions."""
    h = hashlib.sha256(f"{salt}\x00{key}".encode()).hexdigest()
    return int(h[:15], 16) / float(16**15)


def assign_split(key: str, fractions: Mapping[str, float], salt: str = "") -> str:
    u = split_fraction(key, salt)
    acc = 0.0
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    return names[-1]


def split_pairs(
    pairs: Sequence[PreferencePair], fractions: Mapping[str, float], salt: str = ""
) -> dict[str, list[PreferencePair]]:
    """Partition ``pairs`` by prompt hash; order within a split follows the input order."""
    total = sum(fractions.get(s, 0) for s in SPLITS)
    unknown = set(fractions) - set(SPLITS)
    if unknown or abs(total - 1.0) > 1e-6 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"data.split must give non-negative fractions of {SPLITS} summing to 1, got {dict(fractions)}")
    out: dict[str, list[PreferencePair]] = {s: [] for s in SPLITS}
    for p in pairs:
        out[assign_split(p.prompt_key(), fractions, salt)].append(p)
    return out
