"""A latent's characteristic phrase: the few words around its firing token that recur most across
its top contexts on the side it favours, and rarely on the other side (METHOD §3 "Labels").

A latent whose strongest token is ``'.'`` says nothing by itself; aligned on the firing token, its
windows may read ``…, not the bug.`` / ``…, not a feature.`` / ``…, not X.``: position -3 is ``,``,
-2 is ``not``, -1 varies, 0 is ``.``. The phrase keeps the positions where most windows agree and
writes ``X`` for a position in between where they do not.

Shapes: a window is ``(left, token, right)`` text; it is cut into pieces (words and single
punctuation marks, each with whether a space preceded it) at relative positions ``-k..-1`` (left),
``0`` (the firing token, all its pieces joined) and ``1..k`` (right).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_PIECE = re.compile(r"\s*(\w+|[^\w\s])")
#: Shown for a position where the windows do not agree.
SLOT = "X"


@dataclass(frozen=True)
class Phrase:
    #: Readable form, e.g. ``…, not X.``.
    text: str
    #: Side it characterises (chosen | rejected) and the other side.
    side: str
    other: str
    #: Windows matching the phrase / windows, on each side.
    k_side: int
    n_side: int
    k_other: int
    n_other: int
    #: Fixed (non-``X``) pieces; a phrase of one piece is just the firing token.
    n_fixed: int
    #: Indices (into the side's windows) of the windows it matches.
    matched: tuple[int, ...] = ()

    @property
    def informative(self) -> bool:
        """More than the firing token alone."""
        return self.n_fixed >= 2

    def summary(self) -> str:
        """``“…, not X.” in chosen 5/6, rejected 0/4``."""
        out = f"“{self.text}” in {self.side} {self.k_side}/{self.n_side}"
        return out + (f", {self.other} {self.k_other}/{self.n_other}" if self.n_other else "")


def pieces(text: str) -> list[tuple[str, bool]]:
    """``" you're right."`` -> ``[("you", True), ("'", False), ("re", False), ("right", True), (".", False)]``."""
    return [(m.group(1), m.group(0) != m.group(1)) for m in _PIECE.finditer(text)]


def aligned(left: str, token: str, right: str, k: int) -> dict[int, tuple[str, bool]]:
    """Relative position -> piece, for the ``k`` pieces on each side of the firing token."""
    out: dict[int, tuple[str, bool]] = {}
    lp, rp, tp = pieces(left), pieces(right), pieces(token)
    for i, p in enumerate(reversed(lp[-k:] if k else []), start=1):
        out[-i] = p
    if tp:
        out[0] = ("".join(t for t, _ in tp), tp[0][1])
    for i, p in enumerate(rp[:k], start=1):
        out[i] = p
    return out


def _consensus(windows: Sequence[dict[int, tuple[str, bool]]], k: int, min_share: float,
               min_count: int) -> dict[int, tuple[str, bool]]:
    """Per position, the piece most windows have there (case-insensitive), when enough agree."""
    out = {}
    for pos in range(-k, k + 1):
        there = [w[pos] for w in windows if pos in w]
        if not there:
            continue
        counts = Counter(t.lower() for t, _ in there)
        best, c = counts.most_common(1)[0]
        if c >= min_count and c >= min_share * len(windows):
            forms = Counter(p for p in there if p[0].lower() == best)
            out[pos] = forms.most_common(1)[0][0]  # the most common spelling and spacing
    return out


def _matches(w: dict[int, tuple[str, bool]], pattern: dict[int, tuple[str, bool] | None]) -> bool:
    return all(p is None or (pos in w and w[pos][0].lower() == p[0].lower()) for pos, p in pattern.items())


def render(pattern: dict[int, tuple[str, bool] | None], lead: bool, trail: bool) -> str:
    out = "…" if lead else ""
    for pos in sorted(pattern):
        piece = pattern[pos]
        text, space = (SLOT, True) if piece is None else piece
        out += (" " if space and out else "") + text
    return out + ("…" if trail else "")


def characteristic_phrase(
    side_windows: Sequence[tuple[str, str, str]],
    other_windows: Sequence[tuple[str, str, str]],
    side: str = "chosen",
    other: str = "rejected",
    k: int = 3,
    min_share: float = 0.5,
    min_count: int = 2,
    tolerance: float = 0.2,
) -> Phrase | None:
    """The phrase around the firing token that best tells ``side``'s windows from ``other``'s.

    Candidates are the spans ``[a, b]`` (``a <= 0 <= b``) of the side's consensus pattern whose end
    positions are fixed pieces; each scores its contrast, the share of the side's windows it matches
    minus the share of the other side's. Among those matching at least ``min_share`` (and
    ``min_count``) of the side's windows, the one with the most fixed pieces whose contrast is
    within ``tolerance`` of the best wins (ties: more matches). None when no window has a piece.
    """
    ws = [aligned(*w, k) for w in side_windows]
    wo = [aligned(*w, k) for w in other_windows]
    if not any(ws):
        return None
    cons = _consensus(ws, k, min_share, min_count)
    ends_left = [a for a in range(-k, 1) if a in cons or a == 0]
    ends_right = [b for b in range(0, k + 1) if b in cons or b == 0]
    cands = []
    for a in ends_left:
        for b in ends_right:
            pattern = {pos: cons.get(pos) for pos in range(a, b + 1)}
            if pattern.get(a) is None and a != b or pattern.get(b) is None and a != b:
                continue
            hit = tuple(i for i, w in enumerate(ws) if _matches(w, pattern))
            k_o = sum(_matches(w, pattern) for w in wo)
            if len(hit) < min(min_count, len(ws)) or len(hit) < min_share * len(ws):
                continue
            contrast = len(hit) / len(ws) - (k_o / len(wo) if wo else 0.0)
            n_fixed = sum(p is not None for p in pattern.values())
            cands.append((contrast, n_fixed, len(hit), a, b, pattern, hit, k_o))
    if not cands:
        return None
    best = max(c[0] for c in cands)
    contrast, n_fixed, _, a, b, pattern, hit, k_o = max(
        (c for c in cands if c[0] >= best - tolerance), key=lambda c: (c[1], c[2], c[0]))
    # "…" where the matched windows go on: text before the first piece, or after the last one
    # unless it ends a sentence.
    lead = any(len(pieces(side_windows[i][0])) > -a for i in hit)
    last = pattern[b][0] if pattern.get(b) else ""
    trail = last not in (".", "!", "?") and any(len(pieces(side_windows[i][2])) > b for i in hit)
    return Phrase(render(pattern, lead, trail), side, other, len(hit), len(ws), k_o, len(wo), n_fixed, hit)
