"""The prepared artifact: what ``prepare`` hands every later stage, so nothing reloads the source.

One folder (logged as the prepare run's ``data/prepared`` artifact)::

    <split>.parquet   one per split (train, validation, test, and on planted data the held-out
                      ``clean`` pairs): the pair record, its row in the source (``source_row``), the
                      chat-template token ids (prompt / chosen / rejected, truncation flags)
    manifest.json     written last: splits and their sizes, the tokenizer and truncation settings the
                      ids were made with, content digests per split, the source, the stats

A split is a list of pairs; adding a split (the select / test splits of issue 13, or a grouping of
pairs by fact) is a new file and a manifest entry, nothing else. Readers check the manifest's
tokenizer fingerprint and truncation limits and tokenise again only when theirs differ.
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
from prefsculpt.data.source import dataset_name, load_clean_split, load_source
from prefsculpt.data.splits import SPLITS, split_pairs
from prefsculpt.data.tokenize import TokenizedPair

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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

    def all_pairs(self, names: Sequence[str] = ("train", "validation", "test")) -> list[PreferencePair]:
        """The pairs of ``names`` in source order (how the source listed them)."""
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
    """Load ``data`` (the planted generator or a file), split it by prompt hash, add the planted
    ``clean`` pairs; no tokens yet (the prepare stage adds them)."""
    loaded = load_source(data_cfg)
    fractions = {s: getattr(data_cfg.split, s) for s in SPLITS}
    splits: dict[str, list[PreferencePair]] = split_pairs(loaded.pairs, fractions, salt=data_cfg.split.salt)
    clean = load_clean_split(data_cfg)
    if clean:
        splits["clean"] = clean
    row_of = {p.id: i for i, p in enumerate(loaded.pairs)}
    rows = {s: [row_of.get(p.id, -1) for p in ps] for s, ps in splits.items()}
    meta = {"source": loaded.source, "dataset": dataset_name(data_cfg), "planted": not data_cfg.path}
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
