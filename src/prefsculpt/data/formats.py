"""Turn one raw record into a :class:`PreferencePair`, for each supported format.

Formats:
- ``plain``: ``prompt``, ``chosen``, ``rejected`` are strings.
- ``chat``: UltraFeedback style; ``chosen``/``rejected`` are message lists whose shared leading
  turns are the prompt (or a separate ``prompt`` column holds it), the final assistant turn is the response.
- ``hh_rlhf``: ``chosen``/``rejected`` are ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts;
  the shared turns become the prompt, the rest of each transcript the response.
- ``auto``: decide per row from the value types.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from prefsculpt.data import safejson
from prefsculpt.data.errors import RowProblem
from prefsculpt.data.schema import ROLES, Message, PreferencePair

FORMATS = ("auto", "plain", "chat", "hh_rlhf")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_BAD_CHARS = re.compile("[\ud800-\udfff\ufffd]")


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowProblem("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    if _BAD_CHARS.search(value):
        raise RowProblem("undecodable", f"{field} contains undecodable characters (lone surrogate or U+FFFD)")
    return value


def _messages(value: Any, field: str) -> list[Message]:
    """Validate a chat-message list (also accepts a JSON string of one)."""
    if isinstance(value, str):
        try:
            value = safejson.loads(value, where=field, limit=safejson.MAX_DEPTH - 1)
        except json.JSONDecodeError as exc:
            raise RowProblem("wrong_type", f"{field} is a string but not a JSON message list") from exc
    if not isinstance(value, list | tuple) or not value:
        raise RowProblem("wrong_type", f"{field} must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise RowProblem("wrong_type", f"{field}[{j}] is not a {{role, content}} message")
        if m["role"] not in ROLES:
            raise RowProblem("wrong_type", f"{field}[{j}] has unknown role {m['role']!r}")
        out.append({"role": m["role"], "content": _check_text(m["content"], f"{field}[{j}].content")})
    return out


def parse_hh_transcript(text: str) -> list[Message]:
    """Split an HH-RLHF transcript into messages (text before the first marker is ignored if blank)."""
    parts = _HH_TURN.split(text)
    head, rest = parts[0], parts[1:]
    if head.strip():
        raise RowProblem("bad_format", "transcript does not start with '\\n\\nHuman:'")
    if not rest:
        raise RowProblem("bad_format", "no 'Human:'/'Assistant:' turns in transcript")
    return [{"role": _HH_ROLE[r], "content": c.strip()} for r, c in zip(rest[0::2], rest[1::2], strict=True)]


def _render_tail(turns: list[Message]) -> str:
    """The part of a conversation after the shared prompt, as the response text.

    Nearly always a single assistant turn; when the two sides diverge over several turns the rest
    of the transcript is kept verbatim rather than guessed at.
    """
    if all(t["role"] == "assistant" for t in turns):
        return "\n\n".join(t["content"] for t in turns)
    return turns[0]["content"] + "".join(
        f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in turns[1:]
    )


def split_shared_prompt(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], str, str]:
    """Shared leading turns (ending on a user turn) become the prompt; the remainders the responses."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] != "user":
        k -= 1
    if k == 0:
        raise RowProblem("bad_format", "chosen and rejected share no leading user turn to use as prompt")
    tail_c, tail_r = chosen[k:], rejected[k:]
    if not tail_c or not tail_r:
        raise RowProblem("empty_response", "one side has no turns after the shared prompt")
    return chosen[:k], _render_tail(tail_c), _render_tail(tail_r)


def _prompt(value: Any) -> str | tuple[Message, ...]:
    if isinstance(value, str):
        return _check_text(value, "prompt")
    return tuple(_messages(value, "prompt"))


def _response(value: Any, field: str) -> str:
    """A response given as a string, or as a message list whose final assistant turn is the response."""
    if isinstance(value, str):
        return _check_text(value, field)
    if not isinstance(value, list | tuple):
        raise RowProblem("wrong_type", f"{field} must be a string or a message list, got {type(value).__name__}")
    msgs = _messages(value, field)
    if msgs[-1]["role"] != "assistant":
        raise RowProblem("bad_format", f"{field} message list does not end with an assistant turn")
    return msgs[-1]["content"]


def detect_format(rec: Mapping[str, Any], has_prompt: bool) -> str:
    c = rec.get("chosen")
    if isinstance(c, list | tuple):
        return "chat"
    if not has_prompt and isinstance(c, str) and "\n\nAssistant:" in c:
        return "hh_rlhf"
    return "plain"


def to_pair(
    rec: Mapping[str, Any],
    fmt: str,
    columns: Mapping[str, str],
    default_id: str,
    max_chars: int,
) -> PreferencePair:
    """Normalise one raw record; raises :class:`RowProblem` with the reason it is invalid."""
    col = {k: columns.get(k, k) for k in ("id", "prompt", "chosen", "rejected", "chosen_tags", "rejected_tags")}
    for key in ("chosen", "rejected"):
        if col[key] not in rec or rec[col[key]] is None:
            raise RowProblem("missing_field", f"no '{col[key]}' value")
    has_prompt = col["prompt"] in rec and rec[col["prompt"]] is not None
    if fmt == "auto":
        fmt = detect_format({"chosen": rec[col["chosen"]]}, has_prompt)

    if fmt == "hh_rlhf":
        c, r = rec[col["chosen"]], rec[col["rejected"]]
        prompt_msgs, chosen, rejected = split_shared_prompt(
            parse_hh_transcript(_check_text(c, "chosen")), parse_hh_transcript(_check_text(r, "rejected"))
        )
        prompt: str | tuple[Message, ...] = tuple(prompt_msgs)
    elif fmt == "chat" and not has_prompt:
        prompt_msgs, chosen, rejected = split_shared_prompt(
            _messages(rec[col["chosen"]], "chosen"), _messages(rec[col["rejected"]], "rejected")
        )
        prompt = tuple(prompt_msgs)
    elif fmt in ("chat", "plain"):
        if not has_prompt:
            raise RowProblem("missing_field", f"no '{col['prompt']}' value")
        prompt = _prompt(rec[col["prompt"]])
        chosen = _response(rec[col["chosen"]], "chosen")
        rejected = _response(rec[col["rejected"]], "rejected")
    else:
        raise ValueError(f"unknown data.format {fmt!r}; expected one of {FORMATS}")  # load_pairs checked it

    if len(prompt) == 1 and not isinstance(prompt, str) and prompt[0]["role"] == "user":
        prompt = prompt[0]["content"]
    prompt_chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    if prompt_chars == 0 or (isinstance(prompt, str) and not prompt.strip()):
        raise RowProblem("empty_prompt", "prompt is empty")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowProblem("empty_response", f"{name} response is empty")
    if chosen.strip() == rejected.strip():
        raise RowProblem("identical_responses", "chosen and rejected responses are identical")
    for name, n in (("prompt", prompt_chars), ("chosen", len(chosen)), ("rejected", len(rejected))):
        if n > max_chars:
            raise RowProblem("too_long", f"{name} has {n} characters, over data.max_chars={max_chars}")

    rid = rec.get(col["id"])
    if rid is None:
        rid = default_id
    elif not isinstance(rid, str | int) or isinstance(rid, bool):
        raise RowProblem("wrong_type", f"id must be a string or integer, got {type(rid).__name__}")

    def _tags(key: str) -> dict:
        v = rec.get(col[key])
        if v in (None, ""):
            return {}
        if isinstance(v, str):
            try:
                v = safejson.loads(v, where=key, limit=safejson.MAX_DEPTH - 1)
            except json.JSONDecodeError as exc:
                raise RowProblem("wrong_type", f"{key} is not JSON") from exc
        if not isinstance(v, Mapping):
            raise RowProblem("wrong_type", f"{key} must be a mapping of tag -> number")
        for tag, x in v.items():  # stages average tags as floats: a string or inf would fail far later
            if not isinstance(x, int | float) or not math.isfinite(x):
                raise RowProblem("wrong_type", f"{key}.{tag} must be a finite number, got {x!r:.40}")
        return dict(v)

    used = set(col.values())
    meta = {k: v for k, v in rec.items() if k not in used and k != "metadata"}
    raw_meta = rec.get("metadata")
    if isinstance(raw_meta, str):
        try:
            raw_meta = safejson.loads(raw_meta, where="metadata", limit=safejson.MAX_DEPTH - 1)
        except json.JSONDecodeError:
            pass  # free text: kept as it is, below
    if isinstance(raw_meta, Mapping):
        meta.update(raw_meta)
    elif raw_meta is not None:
        meta["metadata"] = rec["metadata"]  # not an object (text, a list): kept whole, never dropped
    return PreferencePair(
        id=str(rid),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        chosen_tags=_tags("chosen_tags"),
        rejected_tags=_tags("rejected_tags"),
        metadata=meta,
    )
