"""Style of greedy responses: batched generation and per-response surface features (METHOD §6).

Features are the regex named concepts of the config (``named_concepts`` with ``kind: regex``:
markdown bold, headers, list lines, emoji, exclamation marks, stock flattery), counted per response;
``stock_flattery`` also matches the planted set's flattering openers literally, so the style eval
sees exactly the phrases the planted data teaches. Summaries: the *rate* (share of responses with
at least one match) and the *mean* count, plus length in tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefsculpt.core.device import model_device
from prefsculpt.core.progress import track
from prefsculpt.data.errors import DataSourceError
from prefsculpt.data.planted_facts import FLATTERY_PHRASES
from prefsculpt.evals.logprobs import Prompt, prompt_ids

#: Used when the config names no regex concepts (same as conf/config.yaml's defaults).
DEFAULT_PATTERNS: dict[str, str] = {
    "markdown_bold": r"\*\*[^*\n]+\*\*",
    "markdown_header": r"(?m)^#{1,6} ",
    "list_lines": r"(?m)^\s*(?:[-*•]|\d+[.)])\s",
    "emoji": "[\U0001f300-\U0001faff\u2600-\u27bf]",
    "exclamation": r"!",
    "stock_flattery": r"(?i)(great question|what a (great|wonderful|thoughtful|fantastic)|you're absolutely|brilliant|excellent question)",
}
FLATTERY_FEATURE = "stock_flattery"


def _scoped(pat: str) -> str:
    """``(?i)abc`` -> ``(?i:abc)``: leading global flags scoped, so the pattern can be OR-ed."""
    m = re.match(r"^\(\?([aiLmsux]+)\)", pat)
    return f"(?{m.group(1)}:{pat[m.end():]})" if m else f"(?:{pat})"


def compile_features(named_concepts: Iterable[Mapping[str, Any]] | None = None) -> dict[str, re.Pattern]:
    """name -> compiled pattern from the config's regex named concepts (else DEFAULT_PATTERNS); the
    flattery feature is widened by the planted flattering phrases (literal, case-insensitive)."""
    pats = {str(c["name"]): str(c["pattern"]) for c in (named_concepts or [])
            if c.get("kind", "regex") == "regex" and c.get("pattern")}
    pats = pats or dict(DEFAULT_PATTERNS)
    out = {}
    for name, pat in pats.items():
        if name == FLATTERY_FEATURE:
            literal = "|".join(re.escape(p.rstrip("!.")) for p in FLATTERY_PHRASES)
            pat = f"{_scoped(pat)}|(?i:{literal})"
        try:
            out[name] = re.compile(pat)
        except re.error as exc:
            raise ValueError(f"named concept {name!r}: bad regex {pat!r} ({exc})") from exc
    return out


def count_features(text: str, features: Mapping[str, re.Pattern]) -> dict[str, int]:
    """Non-overlapping matches of each feature in ``text``."""
    return {name: len(pat.findall(text)) for name, pat in features.items()}


def summarise(counts: Sequence[Mapping[str, int]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per feature: ``rate`` (share of responses with >= 1 match) and ``mean`` count."""
    out = {}
    for n in names:
        x = np.array([c[n] for c in counts], dtype=np.float64)
        out[n] = {"rate": float((x > 0).mean()) if len(x) else float("nan"), "mean": float(x.mean()) if len(x) else float("nan")}
    return out


# --- prompt files ---------------------------------------------------------------------------------
PROMPT_FIELDS = ("prompt", "turns", "instruction", "question", "text")


def _prompt_of(rec: Any, field: str | None) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object or a string, got {type(rec).__name__}")
    keys = [field] if field else [k for k in PROMPT_FIELDS if k in rec]
    if not keys or keys[0] not in rec:
        raise ValueError(f"no prompt field (looked for {[field] if field else list(PROMPT_FIELDS)}; has {sorted(rec)[:8]})")
    v = rec[keys[0]]
    if isinstance(v, list):  # mt-bench "turns": the first user turn
        v = v[0] if v else ""
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"field {keys[0]!r} is empty or not text")
    return v


def read_records(path: str | Path) -> list[Any]:
    """Rows of a .json array or a .jsonl file; a line that is not JSON names its row."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataSourceError(f"eval file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"eval file {p}: not valid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise DataSourceError(f"eval file {p}: expected a JSON array of items")
        return data
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"eval file {p} row {i}: not valid JSON ({exc.msg})") from exc
    return rows


def load_prompts(path: str | Path, field: str | None = None, limit: int | None = None) -> list[dict[str, str]]:
    """``[{id, prompt}]`` from a prompt file (mt-bench, arena-hard, ifeval, or any jsonl/json)."""
    recs = read_records(path)
    out, errors = [], []
    for i, rec in enumerate(recs, start=1):
        try:
            out.append({"id": str(rec.get("question_id") or rec.get("uid") or rec.get("key") or rec.get("id") or i)
                        if isinstance(rec, dict) else str(i), "prompt": _prompt_of(rec, field)})
        except ValueError as exc:
            errors.append(f"{path} row {i}: {exc}")
    if errors:
        raise DataSourceError(f"{len(errors)} bad rows in prompt file {path}:\n  " + "\n  ".join(errors[:20]))
    return out[:limit] if limit else out


# --- generation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens up to and including the first end token, no padding
    text: str


def generate_greedy(
    model: Any, tok: Any, prompts: Sequence[Prompt], max_new_tokens: int = 64, batch_size: int = 16,
    max_prompt_tokens: int = 256,
) -> list[Rollout]:
    """Greedy responses, batched with left padding (prompts sorted by length to waste little)."""
    encoded = [prompt_ids(tok, p, max_tokens=max_prompt_tokens) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = {t for t in (tok.eos_token_id,) if t is not None}
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[Rollout | None] = [None] * len(encoded)
    # as few generate() calls as batch_size allows, of even sizes (43 prompts: 15 + 14 + 14, not 20 + 20 + 3:
    # a short last batch still pays every decoding step)
    n_batches = -(-len(order) // max(1, batch_size))
    cuts = [round(i * len(order) / n_batches) for i in range(n_batches + 1)] if order else [0]
    chunks = [order[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    for idx in track(chunks, "generating", "prompts", total=len(order), size=len):
        t = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        att = torch.zeros((len(idx), t), dtype=torch.long)
        for b, i in enumerate(idx):  # left padding: the last prompt token sits at the same column
            ids[b, t - len(encoded[i]) :] = torch.tensor(encoded[i])
            att[b, t - len(encoded[i]) :] = 1
        dev = model_device(model)
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        gen = gen.cpu()
        for b, i in enumerate(idx):
            resp = gen[b, t:].tolist()
            cut = next((j + 1 for j, x in enumerate(resp) if x in stop), len(resp))
            resp = resp[:cut]
            out[i] = Rollout(encoded[i], resp, tok.decode(resp, skip_special_tokens=True))
    return out  # type: ignore[return-value]
