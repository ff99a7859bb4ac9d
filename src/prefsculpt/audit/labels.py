"""Concept labels: where a latent fires most, in chosen and in rejected responses (METHOD §3 "Labels").

The default needs nothing but the encoder's ``top_contexts`` table (columns ``concept, rank, value,
pair_id, span, position, token, left, right``): per concept, the tokens that occur most often among
its top activations, a few short contexts per response side, the characteristic phrase around the
firing token on the side the concept favours (:mod:`prefsculpt.audit.phrases`), and a one-line label
such as ``'.' · ',' — “…, not X.” in chosen 5/6, rejected 0/4``. Optionally, a short explanation from any OpenAI-compatible
``/v1/chat/completions`` endpoint (off unless ``audit.explain_base_url`` is set), cached on disk by
a hash of the request so a re-run of the audit costs no calls. The endpoint is optional in the
strong sense: a transient failure (HTTP 5xx/429, refused connection, timeout) is retried with
exponential backoff, and an endpoint that still fails leaves the offline labels in place — the
audit goes on and reports the failure (:class:`ExplainOutcome`), it never fails over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from prefsculpt.audit.phrases import characteristic_phrase
from prefsculpt.core.errors import UserError

log = logging.getLogger(__name__)

#: Response spans labels are built from; prompt activations say little about what was preferred.
RESPONSE_SPANS = ("chosen", "rejected")
TOP_CONTEXT_COLUMNS = ("concept", "rank", "value", "pair_id", "span", "position", "token", "left", "right")


@dataclass(frozen=True)
class Context:
    """One top activation: ``left + token + right`` is a short window of the response text."""

    pair_id: str
    span: str
    token: str
    left: str
    right: str
    value: float


@dataclass
class ConceptLabel:
    concept: str
    #: One line, e.g. ``' absolutely' · 'You' · ' right'`` (tokens most frequent among top activations).
    label: str
    #: ``(token, count)`` most frequent among the top activations on each side, best first.
    tokens_chosen: list[tuple[str, int]] = field(default_factory=list)
    tokens_rejected: list[tuple[str, int]] = field(default_factory=list)
    contexts_chosen: list[Context] = field(default_factory=list)
    contexts_rejected: list[Context] = field(default_factory=list)
    explanation: str | None = None
    #: The characteristic phrase (``…, not X.``; X = varies) on ``phrase_counts["side"]``, None when the
    #: windows agree on nothing beyond the firing token.
    phrase: str | None = None
    #: ``{"side", "other", "k_side", "n_side", "k_other", "n_other"}``: windows matching it / windows.
    phrase_counts: dict[str, Any] | None = None
    #: Up to ``n_contexts`` windows of the favoured side that read as the phrase (one per pair).
    phrase_contexts: list[Context] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def latent_name(concept: object) -> str:
    """Top-contexts tables may carry a bare latent index; the audit names it ``latent:<i>``."""
    if isinstance(concept, str):
        return concept
    return f"latent:{int(concept)}"  # type: ignore[call-overload]


def token_repr(token: str) -> str:
    """A token shown with its whitespace visible (``' right'``, ``'\\n'``)."""
    return repr(token)


def label_string(tokens: Sequence[str], sep: str = " · ") -> str:
    return sep.join(token_repr(t) for t in tokens)


def validate_top_contexts(df: pd.DataFrame, source: str = "top_contexts.parquet") -> pd.DataFrame:
    missing = [c for c in TOP_CONTEXT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{source} lacks columns {missing} (has {list(df.columns)}); it must come from the sae stage "
            "of this version: re-run `mlflow run . -e sae`"
        )
    df = df.copy()
    df["concept"] = [latent_name(c) for c in df["concept"]]
    for col in ("token", "left", "right", "pair_id", "span"):
        df[col] = df[col].fillna("").astype(str)
    return df


def _top_tokens(rows: pd.DataFrame, k: int) -> list[tuple[str, int]]:
    """Tokens by how often they are a top activation; ties go to the larger summed activation."""
    if rows.empty:
        return []
    counts = Counter(rows["token"])
    mass = rows.groupby("token")["value"].sum()
    best = sorted(counts, key=lambda t: (-counts[t], -float(mass[t]), t))
    # A token of only whitespace still says something ("\n" = line breaks), so it is kept.
    return [(t, counts[t]) for t in best[:k]]


def _top_contexts(rows: pd.DataFrame, k: int) -> list[Context]:
    """The ``k`` strongest activations, at most one per pair so the contexts show variety."""
    out: list[Context] = []
    seen: set[str] = set()
    for r in rows.sort_values("value", ascending=False).itertuples(index=False):
        if r.pair_id in seen:
            continue
        seen.add(r.pair_id)
        out.append(Context(r.pair_id, r.span, r.token, r.left, r.right, float(r.value)))
        if len(out) == k:
            break
    return out


def _phrase(rows: pd.DataFrame, favoured: str, n_contexts: int) -> tuple[str | None, dict | None, list[Context]]:
    """The characteristic phrase of ``favoured``'s windows against the other side's."""
    other = "rejected" if favoured == "chosen" else "chosen"
    rows = rows.drop_duplicates(["pair_id", "span", "position"])  # a cluster's members share positions
    side = rows[rows["span"] == favoured].sort_values("value", ascending=False)
    rest = rows[rows["span"] == other]
    ph = characteristic_phrase(list(zip(side["left"], side["token"], side["right"], strict=True)),
                               list(zip(rest["left"], rest["token"], rest["right"], strict=True)), favoured, other)
    if ph is None or not ph.informative:
        return None, None, []
    counts = {"side": ph.side, "other": ph.other, "k_side": ph.k_side, "n_side": ph.n_side,
              "k_other": ph.k_other, "n_other": ph.n_other}
    return ph.text, counts, _top_contexts(side.iloc[list(ph.matched)], n_contexts)


def _favoured(direction: Any, rows: pd.DataFrame) -> str:
    """The side the concept favours: its audit direction, else the side with more top activations."""
    try:
        d = float(direction)
    except (TypeError, ValueError):
        d = 0.0
    if d != d or d == 0:  # NaN or none
        d = float((rows["span"] == "chosen").sum() - (rows["span"] == "rejected").sum()) or 1.0
    return "chosen" if d > 0 else "rejected"


def build_labels(
    top_contexts: pd.DataFrame,
    concepts: Iterable[str] | None = None,
    n_tokens: int = 3,
    n_contexts: int = 3,
    groups: Mapping[str, Sequence[str]] | None = None,
    directions: Mapping[str, Any] | None = None,
) -> dict[str, ConceptLabel]:
    """Labels for ``concepts`` (default: every concept in the table).

    ``groups`` maps a compound concept (a latent cluster) to its member concepts; its label pools
    the members' top activations. A concept without top activations gets its own name as label
    (named concepts and built-ins such as ``length`` are self-describing). ``directions``: concept
    -> the audit's direction (+1: the chosen side has more), which picks the side whose phrase is
    contrasted with the other's; a concept without one uses the side with more top activations.
    """
    df = validate_top_contexts(top_contexts)
    df = df[df["span"].isin(RESPONSE_SPANS)]
    by_concept = {c: g for c, g in df.groupby("concept", sort=False)}
    groups = dict(groups or {})
    wanted = list(concepts) if concepts is not None else list(by_concept) + [g for g in groups if g not in by_concept]
    out: dict[str, ConceptLabel] = {}
    for concept in wanted:
        members = groups.get(concept)
        if members is not None:
            parts = [by_concept[m] for m in members if m in by_concept]
            rows = pd.concat(parts) if parts else df.iloc[:0]
        else:
            rows = by_concept.get(concept, df.iloc[:0])
        chosen, rejected = rows[rows["span"] == "chosen"], rows[rows["span"] == "rejected"]
        overall = [t for t, _ in _top_tokens(rows, n_tokens)]
        phrase, counts, phrase_ctx = _phrase(rows, _favoured((directions or {}).get(concept), rows), n_contexts)
        label = label_string(overall) if overall else concept.split(":", 1)[-1]
        if phrase:
            label += f" — “{phrase}” in {counts['side']} {counts['k_side']}/{counts['n_side']}"
            label += f", {counts['other']} {counts['k_other']}/{counts['n_other']}" if counts["n_other"] else ""
        out[concept] = ConceptLabel(
            concept=concept,
            label=label,
            phrase=phrase,
            phrase_counts=counts,
            phrase_contexts=phrase_ctx,
            tokens_chosen=_top_tokens(chosen, n_tokens),
            tokens_rejected=_top_tokens(rejected, n_tokens),
            contexts_chosen=_top_contexts(chosen, n_contexts),
            contexts_rejected=_top_contexts(rejected, n_contexts),
        )
    return out


# ---------------------------------------------------------------- optional explanations (LLM)


class ExplainError(UserError):
    """The configured explanation endpoint failed; the message names the URL and what to do.
    ``transient``: worth retrying (5xx, 429, no connection, timeout), unlike a 401 or a bad payload."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class ExplainSettings:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    #: seconds per request
    timeout_s: float = 30.0
    cache_dir: Path | None = None
    #: retries of a transient failure, after waits of backoff_s, 2·backoff_s, 4·backoff_s, ...
    retries: int = 3
    backoff_s: float = 1.0


@dataclass
class ExplainOutcome:
    """What the labeller did: ``error`` set when the endpoint failed and the rest kept offline labels."""

    explained: int = 0
    failed: int = 0
    error: str | None = None


SYSTEM_PROMPT = (
    "You label features of a language model. You get the text windows where one sparse-autoencoder "
    "feature fires most, the firing token marked [[like this]]. Answer with one short phrase (at most "
    "12 words) naming what the feature detects. No preamble."
)


def chat_url(base_url: str) -> str:
    """Accept ``http://host:port``, ``.../v1`` or the full ``.../v1/chat/completions``."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def explain_messages(label: ConceptLabel, max_chars: int = 160) -> list[dict[str, str]]:
    lines, seen = [], set()
    for ctx in [*label.contexts_chosen, *label.contexts_rejected, *label.phrase_contexts]:
        window = f"{ctx.left}[[{ctx.token}]]{ctx.right}".replace("\n", "\\n")[:max_chars]
        if (ctx.span, window) not in seen:
            seen.add((ctx.span, window))
            lines.append(f"- ({ctx.span} response) {window}")
    tokens = ", ".join(token_repr(t) for t, _ in [*label.tokens_chosen, *label.tokens_rejected])
    user = f"Most frequent firing tokens: {tokens or '(none)'}\n"
    if label.phrase and label.phrase_counts:
        c = label.phrase_counts
        user += (f"Recurring phrase around the firing token (X = varies): \"{label.phrase}\" in {c['k_side']} of "
                 f"{c['n_side']} {c['side']}-response windows, {c['k_other']} of {c['n_other']} {c['other']}\n")
    user += "Top windows:\n" + "\n".join(lines or ["(none)"])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _cache_key(model: str, messages: list[dict[str, str]]) -> str:
    blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _post_chat(settings: ExplainSettings, messages: list[dict[str, str]]) -> str:
    url = chat_url(settings.base_url)
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(settings.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = json.dumps({"model": settings.model, "messages": messages, "temperature": 0, "max_tokens": 40})
    req = urllib.request.Request(url, data=body.encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=settings.timeout_s) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        hint = f" (is ${settings.api_key_env} set?)" if exc.code in (401, 403) else ""
        raise ExplainError(
            f"explanation endpoint {url} answered HTTP {exc.code}{hint}: {detail!r}; fix audit.explain_base_url / "
            "audit.explain_model, or set audit.explain_base_url=null to label from top tokens only",
            transient=exc.code >= 500 or exc.code == 429,
        ) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ExplainError(
            f"explanation endpoint {url} did not answer within {settings.timeout_s:g}s ({exc}); start it, raise "
            "audit.explain_timeout_s, or set audit.explain_base_url=null to label from top tokens only",
            transient=True,
        ) from exc
    except json.JSONDecodeError as exc:
        raise ExplainError(f"explanation endpoint {url} returned non-JSON ({exc}); is it OpenAI-compatible?") from exc
    try:
        text = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ExplainError(
            f"explanation endpoint {url} returned {str(payload)[:200]!r}, not an OpenAI chat completion "
            "(expected choices[0].message.content)"
        ) from exc
    # One line, bounded: the label sits in a table cell.
    return " ".join(str(text).split())[:200]


def explain_label(label: ConceptLabel, settings: ExplainSettings) -> str:
    """The endpoint's one-line explanation of ``label`` (cached by model + request content)."""
    messages = explain_messages(label)
    path = None
    if settings.cache_dir is not None:
        path = Path(settings.cache_dir) / f"{_cache_key(settings.model, messages)}.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))["explanation"]
    for attempt in range(settings.retries + 1):
        try:
            text = _post_chat(settings, messages)
            break
        except ExplainError as exc:
            if not exc.transient or attempt == settings.retries:
                if attempt:
                    raise ExplainError(f"{exc} (after {attempt + 1} attempts)", exc.transient) from exc
                raise
            wait = settings.backoff_s * 2**attempt
            log.info("explanation endpoint: %s; retrying in %.1f s", str(exc).split(";")[0], wait)
            time.sleep(wait)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # never a half-written cache entry
        tmp.write_text(json.dumps({"model": settings.model, "explanation": text}), encoding="utf-8")
        tmp.replace(path)
    return text


def explain_labels(labels: Mapping[str, ConceptLabel], concepts: Iterable[str],
                   settings: ExplainSettings) -> ExplainOutcome:
    """Fill ``labels[c].explanation`` for ``concepts`` in place.

    The first request that still fails after its retries stops the calls (the endpoint is down or
    refuses us): that concept and the rest keep their offline labels, a warning says so, and the
    outcome carries the error for the caller to record."""
    todo = [c for c in concepts if c in labels]
    out = ExplainOutcome()
    for i, c in enumerate(todo):
        try:
            labels[c].explanation = explain_label(labels[c], settings)
        except ExplainError as exc:
            out.failed, out.error = len(todo) - i, str(exc)
            log.warning("LLM labels: %s. %d of %d concepts keep their offline (top-token) labels.",
                        exc, out.failed, len(todo))
            break
        out.explained += 1
    log.info("explained %d labels via %s (model %s)", out.explained, chat_url(settings.base_url), settings.model)
    return out
