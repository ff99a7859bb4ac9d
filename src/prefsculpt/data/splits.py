"""Deterministic, disjoint splits: ``train`` / ``validation`` / ``select`` / ``test``.

What each split is for (issue 13: selection and reporting apart):

- ``train``: the audit, the SAE and DPO learn from it;
- ``validation``: early stopping and checkpoint choice (and the SAE's held-out quality);
- ``select``: the search's objectives and promotion's pick (touched many times: a figure measured on
  it is biased upwards for the trial that won, the winner's curse);
- ``test``: touched once, after the search, for the final figures of the picked policy and of the
  plain-DPO baseline (what the ``main`` run and the registered version report).

Your own data is split by a stable hash of the prompt, so every pair of one prompt lands in the
same split. The planted set is split by *fact* (:func:`split_facts`): each fact of the planted pool
(``planted_facts.Item.key``) belongs to one split, and every pair, clean pair and probe asking about
it is in that split, so no held-out item asks a training question in other words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

from prefsculpt.data.schema import PreferencePair

SPLITS = ("train", "validation", "select", "test")
#: Splits the pipeline learns from (audit, SAE, DPO, early stopping); never evaluated on.
LEARN_SPLITS = ("train", "validation")
#: Held-out splits an evaluation reads: ``select`` during the search, ``test`` once at the end.
EVAL_SPLITS = ("select", "test")


def split_fraction(key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) from the prompt key; stable across machines and Python versions."""
    h = hashlib.sha256(f"{salt}\x00{key}".encode()).hexdigest()
    return int(h[:15], 16) / float(16**15)


def check_fractions(fractions: Mapping[str, float]) -> None:
    total = sum(fractions.get(s, 0) for s in SPLITS)
    unknown = set(fractions) - set(SPLITS)
    if unknown or abs(total - 1.0) > 1e-6 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"data.split must give non-negative fractions of {SPLITS} summing to 1, got {dict(fractions)}")


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
    check_fractions(fractions)
    out: dict[str, list[PreferencePair]] = {s: [] for s in SPLITS}
    for p in pairs:
        out[assign_split(p.prompt_key(), fractions, salt)].append(p)
    return out


def _counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """n items over the splits by fraction (largest remainder); every split with a share gets at
    least one item when n allows, so a small family still has select and test facts."""
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    raw = {s: n * fractions[s] for s in names}
    out = {s: int(raw[s]) for s in names}
    for s in sorted(names, key=lambda s: (out[s] - raw[s], SPLITS.index(s)))[: n - sum(out.values())]:
        out[s] += 1
    if n >= len(names):
        for s in names:
            while out[s] == 0:  # take one from the largest
                big = max(names, key=lambda t: out[t])
                out[big] -= 1
                out[s] += 1
    return out


def split_facts(facts_by_family: Mapping[str, Sequence[str]], fractions: Mapping[str, float],
                salt: str = "") -> dict[str, str]:
    """Fact key -> split, stratified per family: a family's facts in a stable hash order, cut by
    ``fractions``, so each split gets its share of every family (and of the small ones too)."""
    check_fractions(fractions)
    out: dict[str, str] = {}
    for fam in sorted(facts_by_family):
        keys = sorted(set(facts_by_family[fam]), key=lambda k: (split_fraction(k, f"{salt}\x00fact"), k))
        start = 0
        for s, c in _counts(len(keys), fractions).items():
            out.update(dict.fromkeys(keys[start : start + c], s))
            start += c
    return out


def split_by_group(pairs: Sequence[PreferencePair], group: Callable[[PreferencePair], str | None],
                   group_split: Mapping[str, str], fractions: Mapping[str, float],
                   salt: str = "") -> dict[str, list[PreferencePair]]:
    """Partition by ``group_split[group(p)]`` (a pair of no known group: by prompt hash)."""
    check_fractions(fractions)
    out: dict[str, list[PreferencePair]] = {s: [] for s in SPLITS}
    for p in pairs:
        g = group(p)
        out[group_split[g] if g in group_split else assign_split(p.prompt_key(), fractions, salt)].append(p)
    return out


def eval_part(key: str, split: str, select_share: float = 0.5) -> bool:
    """Whether an item of an external eval set (by its id) belongs to ``split`` (select | test):
    a stable hash puts ``select_share`` of the items in select and the rest in test, disjointly."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"eval split must be one of {EVAL_SPLITS}, got {split!r}")
    return (split_fraction(key, "eval-part") < select_share) == (split == "select")
