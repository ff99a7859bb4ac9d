"""The prepared artifact: what ``prepare`` hands every later stage, so nothing reloads the source.

One folder (logged as the prepare run's ``data/prepared`` artifact)::

    <split>.parquet   one per split (train, validation, select, test, and on planted data the
                      held-out ``clean_select`` / ``clean_test`` pairs): the pair record, its row in
                      the source (``source_row``), the chat-template token ids (prompt / chosen /
                      rejected, truncation flags)
    manifest.json     written last: splits and their sizes, the tokenizer and truncation settings the
                      ids were made with, content digests per split, the source, the stats; on
                      planted data ``facts``: the fact keys of each split (the probes of an
                      evaluation on ``select`` or ``test`` are drawn from that split's facts)

A split is a list of pairs; adding a split is a new file and a manifest entry, nothing else. Readers
check the manifest's tokenizer fingerprint and truncation limits and tokenise again only when theirs
differ. Format 2 (issue 13) added ``select``, the fact-grouped planted split and the two clean parts;
a format-1 artifact is refused (rerun prepare), never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from prefsculpt.core.errors import UserError
from prefsculpt.core.files import atomic_path, atomic_write_json
from prefsculpt.data.loaders import LoadResult
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.source import dataset_name, load_clean_splits, load_source, planted_fact_splits
from prefsculpt.data.splits import LEARN_SPLITS, SPLITS, split_by_group, split_pairs
from prefsculpt.data.tokenize import TokenizedPair

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_TOKEN_COLS = ("prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated", "chosen_truncated",
               "rejected_truncated")


class PreparedError(UserError):
    """The prepared artifact is missing, incomplete or from another format; the message says what to rerun."""


def pairs_digest(pairs: Sequence[PreferencePair]) -> str:
    """Content digest of a list of pairs (order-sensitive)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(p.to_record(), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass
class Prepared:
    """Splits of pairs with their source rows and (optionally) their token ids."""

    splits: dict[str, list[PreferencePair]]
    source_rows: dict[str, list[int]]
    tokens: dict[str, list[TokenizedPair]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[PreferencePair]:
        if name not in self.splits:
            raise PreparedError(f"the prepared data has no split {name!r} (it has {sorted(self.splits)})")
        return self.splits[name]

    def facts(self, name: str) -> set[str] | None:
        """The planted fact keys of split ``name``; None for your own data (no facts)."""
        facts = self.meta.get("facts")
        return None if facts is None else set(facts.get(name, []))

    def all_pairs(self, names: Sequence[str] = LEARN_SPLITS) -> list[PreferencePair]:
        """The pairs of ``names`` (default: the splits the pipeline learns from, never ``select`` or
        ``test``) in source order (how the source listed them)."""
        rows = [(r, p) for s in names if s in self.splits for r, p in zip(self.source_rows[s], self.splits[s],
                                                                          strict=True)]
        return [p for _, p in sorted(rows, key=lambda t: t[0])]

    def tokens_for(self, pairs: Sequence[PreferencePair], tokenizer_id: str, max_prompt: int,
                   max_response: int) -> list[TokenizedPair] | None:
        """Stored token ids of ``pairs`` when they were made with this tokenizer and these limits, else None."""
        t = self.meta.get("tokenize", {})
        if (t.get("tokenizer"), t.get("max_prompt_tokens"), t.get("max_response_tokens")) != (
                tokenizer_id, max_prompt, max_response):
            return None
        by_id = {tp.id: tp for toks in self.tokens.values() for tp in toks}
        try:
            return [by_id[p.id] for p in pairs]
        except KeyError:
            return None


def split_source(data_cfg: Any) -> tuple[Prepared, LoadResult]:
    """Load ``data`` (the planted generator or a file) and split it: your own data by prompt hash,
    the planted set by fact (each fact of the pool in one split, see ``splits.py``), plus the planted
    ``clean_select`` / ``clean_test`` pairs from the select / test facts; no tokens yet (the prepare
    stage adds them)."""
    loaded = load_source(data_cfg)
    fractions = {s: float(getattr(data_cfg.split, s)) for s in SPLITS}
    salt = str(data_cfg.split.salt)
    planted = not data_cfg.path
    meta: dict[str, Any] = {"source": loaded.source, "dataset": dataset_name(data_cfg), "planted": planted}
    if planted:
        fact_split = planted_fact_splits(data_cfg)
        splits = split_by_group(loaded.pairs, lambda p: p.metadata.get("fact"), fact_split, fractions, salt)
        splits.update(load_clean_splits(data_cfg, fact_split))
        meta["facts"] = {s: sorted(k for k, v in fact_split.items() if v == s) for s in SPLITS}
    else:
        splits = split_pairs(loaded.pairs, fractions, salt=salt)
    row_of = {p.id: i for i, p in enumerate(loaded.pairs)}
    rows = {s: [row_of.get(p.id, -1) for p in ps] for s, ps in splits.items()}
    return Prepared(splits, rows, {}, meta), loaded


def write_prepared(folder: str | Path, splits: Mapping[str, Sequence[PreferencePair]],
                   source_rows: Mapping[str, Sequence[int]], tokens: Mapping[str, Sequence[TokenizedPair]],
                   meta: Mapping[str, Any]) -> Path:
    """Write the artifact; the manifest goes last, so a folder without one is incomplete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, pairs in splits.items():
        toks = list(tokens.get(name, []))
        rows = [p.to_record() for p in pairs]
        for i, rec in enumerate(rows):
            rec["source_row"] = int(source_rows[name][i])
            if toks:
                t = toks[i]
                rec.update({c: getattr(t, c) for c in _TOKEN_COLS})
        with atomic_path(folder / f"{name}.parquet", suffix=".parquet") as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)
        digests[name] = pairs_digest(pairs)
    manifest = {"format_version": FORMAT_VERSION, "splits": {s: len(p) for s, p in splits.items()},
                "digests": digests, **dict(meta)}
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def read_prepared(folder: str | Path) -> Prepared:
    """Inverse of :func:`write_prepared`; a missing or incomplete folder is a clear error."""
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        raise PreparedError(f"{folder} holds no prepared data ({MANIFEST} missing: the prepare run did not "
                            "finish); rerun the prepare stage")
    meta = json.loads(man.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise PreparedError(f"{folder}: prepared data format {meta.get('format_version')} is not "
                            f"{FORMAT_VERSION}; rerun the prepare stage with this version")
    splits, rows, tokens = {}, {}, {}
    for name in meta["splits"]:
        df = pd.read_parquet(folder / f"{name}.parquet")
        recs = df.to_dict(orient="records")
        splits[name] = [PreferencePair.from_record(r) for r in recs]
        rows[name] = [int(r["source_row"]) for r in recs]
        if "prompt_ids" in df.columns:
            tokens[name] = [TokenizedPair(r["id"], *([int(x) for x in r[c]] if c.endswith("_ids") else bool(r[c])
                                                    for c in _TOKEN_COLS)) for r in recs]
    return Prepared(splits, rows, tokens, meta)


def split_group(name: str) -> str:
    """The split a named part belongs to (``clean_test`` is part of ``test``)."""
    return name.removeprefix("clean_")


def overlap_metrics(prepared: Prepared, probe_facts: set[str] | None = None) -> dict[str, int]:
    """How much the held-out items share with what the pipeline learns from: every count must be 0.

    - ``overlap/split_prompts``: prompts found in two splits (``clean_<s>`` counts as part of ``s``);
    - ``overlap/split_facts``: planted facts asked in two splits (select and test included);
    - ``overlap/heldout_facts_train``: facts of held-out items (select / test pairs, clean pairs, and
      the probe pool: ``probe_facts``, by default the select and test facts the probes are drawn
      from) that a train or validation pair asks about;
    - ``overlap/heldout_prompts_train``: held-out prompts or questions (the same, every question
      the probe pool can ask included) that equal a train or validation prompt or question, e.g. a
      probe asking verbatim a question a training prompt asks under a belief template;
    - ``overlap/total``: their sum.
    Your own data has no facts: its fact counts are 0 and its prompt counts are what the prompt-hash
    split guarantees.
    """
    from prefsculpt.data.planted import questions_of  # the generator, only for planted data

    where: dict[str, set[str]] = {}
    fact_where: dict[str, set[str]] = {}
    learn_texts: set[str] = set()
    held_texts: set[str] = set()
    learn_facts: set[str] = set()
    held_facts: set[str] = set()
    for name, pairs in prepared.splits.items():
        group = split_group(name)
        learn = group in LEARN_SPLITS
        for p in pairs:
            where.setdefault(p.prompt_key(), set()).add(group)
            texts = {p.prompt_text(), *([p.metadata["question"]] if p.metadata.get("question") else [])}
            (learn_texts if learn else held_texts).update(texts)
            fact = p.metadata.get("fact") if prepared.meta.get("planted") else None
            if fact:
                fact_where.setdefault(fact, set()).add(group)
                (learn_facts if learn else held_facts).add(fact)
    if prepared.meta.get("planted"):
        if probe_facts is None:
            probe_facts = (prepared.facts("select") or set()) | (prepared.facts("test") or set())
        held_facts |= set(probe_facts)
        held_texts |= questions_of(probe_facts)
    out = {"overlap/split_prompts": sum(len(s) > 1 for s in where.values()),
           "overlap/split_facts": sum(len(s) > 1 for s in fact_where.values()),
           "overlap/heldout_facts_train": len(held_facts & learn_facts),
           "overlap/heldout_prompts_train": len(held_texts & learn_texts)}
    out["overlap/total"] = sum(out.values())
    return out
