"""The self-contained HTML concept report of the audit.

One file, no external URLs: inline CSS, a small inline script that sorts the hypothesis table by a
click on a header (or on load from ``#sort=<key>`` / ``#sort=<key>:desc`` in the URL), plots
embedded as ``data:`` PNGs. Every dataset string (prompts, responses, tokens, labels) goes through
Jinja2's autoescape; highlighted tokens are :class:`Segment` pieces the template wraps in
``<mark>`` *after* escaping their text, so no dataset string is ever trusted as markup.
"""

from __future__ import annotations

import base64
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import pandas as pd

from prefsculpt.core import glossary as G


@dataclass(frozen=True)
class Segment:
    text: str
    mark: bool = False


@dataclass
class ExampleView:
    """One example pair as shown: texts cut into plain and highlighted segments."""

    pair_id: str
    #: The pair's chosen - rejected score difference for the hypothesis' concept.
    d: float
    prompt: list[Segment]
    chosen: list[Segment]
    rejected: list[Segment]


@dataclass
class HypothesisView:
    """Everything the report shows for one hypothesis (built by :func:`hypothesis_views`)."""

    row: dict[str, Any]
    label: Any = None  # prefsculpt.audit.labels.ConceptLabel | None
    where: list[dict[str, Any]] = field(default_factory=list)
    examples: list[ExampleView] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return "h-" + re.sub(r"[^A-Za-z0-9_-]", "-", str(self.row["concept"]))


# ---------------------------------------------------------------- text highlighting (pure)


def merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted((s, e) for s, e in spans if e > s):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def context_spans(text: str, windows: Iterable[tuple[str, str, str]]) -> list[tuple[int, int]]:
    """Character spans of the firing token for each ``(left, token, right)`` window found in ``text``.

    The window is located as a whole first (so the right occurrence of a common token is marked),
    then with shorter contexts, and a distinctive token (3+ characters) alone; a token whose window is
    not found is not marked.
    """
    spans = []
    for left, token, right in windows:
        if not token.strip():
            continue  # a bare newline / space cannot be shown as a mark
        tries = [(left, right), (left[-12:], right[:12]), (left[-4:], ""), ("", right[:12])]
        if len(token.strip()) >= 3:
            tries.append(("", ""))  # a distinctive token alone (its left context may be template text)
        for lw, rw in tries:
            at = text.find(lw + token + rw)
            if at >= 0:
                spans.append((at + len(lw), at + len(lw) + len(token)))
                break
    return merge_spans(spans)


def regex_spans(text: str, pattern: str) -> list[tuple[int, int]]:
    return merge_spans(m.span() for m in re.finditer(pattern, text))


def segments(text: str, spans: Sequence[tuple[int, int]], max_chars: int = 900) -> list[Segment]:
    """``text`` cut into plain / marked pieces, shortened to about ``max_chars`` around the first mark."""
    spans = merge_spans(spans)
    lo, hi = 0, len(text)
    if len(text) > max_chars:
        first = spans[0][0] if spans else 0
        lo = max(0, min(first - max_chars // 3, len(text) - max_chars))
        hi = lo + max_chars
    out: list[Segment] = [Segment("…")] if lo > 0 else []
    pos = lo
    for s, e in spans:
        s, e = max(s, lo), min(e, hi)
        if e <= s:
            continue
        if s > pos:
            out.append(Segment(text[pos:s]))
        out.append(Segment(text[s:e], True))
        pos = e
    if pos < hi:
        out.append(Segment(text[pos:hi]))
    if hi < len(text):
        out.append(Segment("…"))
    return out


# ---------------------------------------------------------------- formatting filters


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(v: Any, digits: int = 3) -> str:
    f = _num(v)
    if f is None:
        return "–" if v is None or isinstance(v, float) else str(v)
    if f.is_integer() and abs(f) < 1e7:
        return str(int(f))  # counts and ranks
    return f"{f:.{digits}g}" if abs(f) >= 1e-3 or f == 0 else f"{f:.2e}"


def fmt_q(v: Any) -> str:
    f = _num(v)
    if f is None:
        return "–"
    return f"{f:.3f}" if f >= 1e-3 else f"{f:.1e}"


def sort_value(v: Any) -> str:
    """``data-v`` for the sorter: numbers as plain floats, NaN sorted last, text as is."""
    if isinstance(v, bool):
        return str(int(v))
    f = _num(v)
    if f is not None:
        return repr(f)
    if isinstance(v, (int, float)):
        return ""  # NaN: the script puts empty values last
    return str(v)


def direction_text(v: Any) -> str:
    f = _num(v)
    if f is None or f == 0:
        return "none"
    return "chosen has more" if f > 0 else "chosen has less"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- rendering


#: C0/C1 control characters except tab, newline and CR: HTML forbids them in text, browsers drop them
#: or draw boxes, so they are shown as ``\xNN`` (an ANSI colour code in a label stays legible).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def visible(v: Any) -> Any:
    """Every ``{{ }}`` value on its way to autoescaping: control characters made visible; markup
    this module built (a macro's output) passes through untouched."""
    if isinstance(v, str) and not isinstance(v, markupsafe.Markup) and _CONTROL.search(v):
        return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", v)
    return v


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, finalize=visible)
    env.filters.update(fmt=fmt, fmt_q=fmt_q, sv=sort_value, direction=direction_text)
    env.filters["repr"] = repr
    return env


#: Columns of the hypothesis table: (key in the row, header, tooltip).
TABLE_COLUMNS = (
    ("rank", "#", "rank among hypotheses (by the smaller half effect)"),
    ("concept", "concept", "latent:<i>, cluster:<i> (co-firing latents), named:<name>, or a built-in"),
    ("label", "label", "tokens where it fires most"),
    ("direction", "direction", "does the preferred (chosen) response have more or less of it"),
    ("d_z", "effect d_z", "paired effect size mean(d)/sd(d), d = chosen - rejected"),
    ("mean_diff", "mean d [95% CI]", "mean chosen - rejected score difference with its t interval"),
    ("q", "q", "Benjamini-Hochberg q-value of the length-controlled test (the headline; the raw test where "
     "length control is undefined, e.g. length itself)"),
    ("q_raw", "q raw", "Benjamini-Hochberg q-value of the raw paired test (not length-controlled)"),
    ("half_a", "half A", "d_z on one half of the prompts"),
    ("half_b", "half B", "d_z on the other half"),
    ("length_effect", "length-ctrl", "effect at equal response length (d regressed on length difference)"),
    ("support", "support", "share of pairs where it fires on either side"),
    ("where", "concentrates in", "data clusters where its d is stronger than in the rest (Welch z; asked of "
     "significant hypotheses only: BH over its clusters at level fdr x R/m, R significant of m tested concepts "
     "(Benjamini-Bogomolov), same sign in both halves)"),
)


def render_report(
    views: Sequence[HypothesisView],
    meta: Mapping[str, Any] | None = None,
    planted: pd.DataFrame | None = None,
    images: Mapping[str, bytes] | None = None,
    title: str = "prefsculpt concept report",
    banner: str | None = None,
    banner_failed: bool = False,
    carriers: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The report as one HTML string. ``meta``: key facts shown at the top (run ids, data, counts);
    ``planted``: the planted-concept check table, if the data has ground truth; ``images``:
    caption -> PNG bytes, embedded. ``banner``: a line shown at the very top (the calibration
    verdict), as an alert when ``banner_failed``; ``carriers``: what carries the length difference
    (``audit.analysis.length_carriers`` records), a section of its own."""
    env = _environment()
    if planted is not None:
        planted = planted.assign(**{c: planted[c].map({True: "yes", False: "no"})
                                    for c in planted.columns if planted[c].dtype == bool})
    planted_rows = None if planted is None else planted.to_dict("records")
    planted_cols = None if planted is None else list(planted.columns)
    return env.from_string(TEMPLATE).render(
        title=title,
        banner=banner,
        banner_level="fail" if banner_failed else "ok",
        carriers=[dict(c) for c in (carriers or [])],
        views=list(views),
        columns=TABLE_COLUMNS,
        numeric=NUMERIC_COLUMNS,
        meta=dict(meta or {}),
        planted_rows=planted_rows,
        planted_cols=planted_cols,
        images={k: png_data_uri(v) for k, v in (images or {}).items()},
        glossary=[{"pattern": e.pattern, "better": G.arrow(e.direction), "meaning": e.meaning, "stage": e.stage}
                  for e in G.ENTRIES],
    )


def write_report(html: str, path: str | Path) -> Path:
    """Write atomically (temp file, then rename): a half-written report never looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path


NUMERIC_COLUMNS = ("rank", "direction", "d_z", "mean_diff", "q", "q_raw", "half_a", "half_b", "length_effect", "support")

# Inline so the report needs no package data; autoescape is on for every {{ }} below.
TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1360px;padding:16px 24px;color:#1d232a}
h1{font-size:22px;margin:4px 0 8px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d5dae0}
h3{font-size:15px;margin:0 0 6px} code,.tok{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0;color:#444}
.meta dt{font-weight:600} .meta dd{margin:0}
table{border-collapse:collapse} td,th{padding:3px 8px;border-bottom:1px solid #e6e9ed;text-align:left;vertical-align:top}
.scroll{overflow-x:auto} #hyp-table{width:100%}
#hyp-table td.lbl{min-width:220px;max-width:380px;overflow-wrap:anywhere}
#hyp-table td.wh{min-width:140px;max-width:300px;overflow-wrap:anywhere}
#hyp-table th{position:sticky;top:0;background:#f3f5f7;cursor:pointer;user-select:none;white-space:nowrap}
#hyp-table th[aria-sort=ascending]::after{content:" \\25B2"} #hyp-table th[aria-sort=descending]::after{content:" \\25BC"}
#hyp-table td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.ns td{color:#7a828c} .up{color:#1a7f37} .down{color:#b42318}
.hint{color:#66707a;font-size:12.5px;margin:2px 0 6px}
figure{display:inline-block;margin:8px 16px 8px 0} figure img{max-width:640px;border:1px solid #e6e9ed}
figcaption{color:#66707a;font-size:12.5px}
.hyp{border:1px solid #dfe3e8;border-radius:6px;padding:12px 14px;margin:14px 0}
.facts td:first-child{color:#555} .expl{font-style:italic;margin:2px 0 6px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.ctx{white-space:pre-wrap;word-break:break-word;background:#f7f8fa;border-radius:4px;padding:2px 6px;margin:2px 0}
mark{background:#ffe066;border-radius:2px;padding:0 1px}
.ex{display:grid;grid-template-columns:1fr 1fr 1fr;gap:8px;margin:6px 0 12px}
.ex>div{white-space:pre-wrap;word-break:break-word;background:#f7f8fa;border-radius:4px;padding:6px 8px;font-size:13px;max-height:320px;overflow:auto}
.ex .lab{display:block;font-weight:600;font-size:12px;color:#555;margin-bottom:2px;white-space:normal}
.ex .ch{border-left:3px solid #1a7f37} .ex .rj{border-left:3px solid #b42318}
.banner{border-radius:6px;padding:10px 14px;margin:8px 0 12px;font-weight:600}
.banner.fail{background:#fde8e7;border:2px solid #b42318;color:#7a1a12} .banner.ok{background:#eef7f0;border:1px solid #1a7f37;color:#1a4d2a;font-weight:400}
.ex>div,.ctx,.expl{unicode-bidi:plaintext} code,mark,td.lbl,td.wh,dd{unicode-bidi:isolate}
</style></head>
<body>
{% macro text(segs) %}{% for s in segs %}{% if s.mark %}<mark>{{ s.text }}</mark>{% else %}{{ s.text }}{% endif %}{% endfor %}{% endmacro %}
{% macro label_of(v) %}{{ v.label.label if v.label else v.row.get("label", "") }}{% endmacro %}
<header><h1>{{ title }}</h1>
{% if banner %}<div class="banner {{ banner_level }}" role="alert" id="calibration-banner">{{ banner }}</div>{% endif %}
<dl class="meta">{% for k, val in meta.items() %}<dt>{{ k }}</dt><dd>{{ val }}</dd>{% endfor %}</dl>
</header>
{% if carriers %}
<section id="length-carriers"><h2>Why preferred answers are longer: what carries the length difference</h2>
<p class="hint">Concepts significant on the raw test but not at equal response length, pointing the way the length gap does,
ranked by the share of the mean chosen &minus; rejected length difference they account for
(OLS of the length difference on the concept's difference, L = c + &beta;&middot;d: share = &beta;&middot;mean(d) / mean(L) = 1 &minus; c / mean(L);
R&sup2; = share of the variance of the length difference it explains).</p>
<table><thead><tr><th>concept</th><th>label</th><th>share of length gap</th><th>R&sup2;</th><th>raw d_z</th><th>q raw</th><th>length-ctrl effect</th><th>q</th><th>members</th></tr></thead><tbody>
{% for c in carriers %}<tr><td>{{ c.concept }}</td><td><code>{{ c.get('label') or '' }}</code></td><td class="n">{{ c.get('length_share') | fmt }}</td><td class="n">{{ c.get('length_r2') | fmt }}</td><td class="n">{{ c.get('d_z') | fmt }}</td><td class="n">{{ c.get('q_raw') | fmt_q }}</td><td class="n">{{ c.get('length_effect') | fmt }}</td><td class="n">{{ c.get('q') | fmt_q }}</td><td>{{ (c.get('members') or []) | length or '' }}</td></tr>{% endfor %}
</tbody></table></section>
{% endif %}
{% if planted_rows %}
<section id="planted"><h2>Planted concepts: best matching hypothesis</h2>
<table><thead><tr>{% for c in planted_cols %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for r in planted_rows %}<tr>{% for c in planted_cols %}<td>{{ r[c] | fmt if r[c] is number else r[c] }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table></section>
{% endif %}
<section id="hypotheses"><h2>Hypotheses ({{ views | length }})</h2>
<p class="hint">Click a column header to sort (again to reverse); link a sorted view with <code>#sort=q</code> or <code>#sort=d_z:desc</code>. Grey rows did not reach significance.</p>
<div class="scroll"><table id="hyp-table" class="sortable"><thead><tr>
{% for key, head, tip in columns %}<th data-key="{{ key }}" title="{{ tip }}"{% if key in numeric %} data-type="num"{% endif %}>{{ head }}</th>{% endfor %}
</tr></thead><tbody>
{% for v in views %}{% set r = v.row %}
<tr class="{{ 'sig' if r.get('significant') else 'ns' }}">
<td class="n" data-v="{{ r.get('rank') | sv }}">{{ r.get('rank') | fmt }}</td>
<td data-v="{{ r.concept }}"><a href="#{{ v.anchor }}">{{ r.concept }}</a></td>
<td class="lbl" data-v="{{ label_of(v) }}"><code>{{ label_of(v) }}</code></td>
<td data-v="{{ r.get('direction') | sv }}" class="{{ 'up' if (r.get('direction') or 0) > 0 else 'down' }}">{{ r.get('direction') | direction }}</td>
<td class="n" data-v="{{ r.get('d_z') | sv }}">{{ r.get('d_z') | fmt }}</td>
<td class="n" data-v="{{ r.get('mean_diff') | sv }}">{{ r.get('mean_diff') | fmt }} [{{ r.get('ci_low') | fmt }}, {{ r.get('ci_high') | fmt }}]</td>
<td class="n" data-v="{{ r.get('q') | sv }}">{{ r.get('q') | fmt_q }}</td>
<td class="n" data-v="{{ r.get('q_raw') | sv }}">{{ r.get('q_raw') | fmt_q }}</td>
<td class="n" data-v="{{ r.get('half_a') | sv }}">{{ r.get('half_a') | fmt }}</td>
<td class="n" data-v="{{ r.get('half_b') | sv }}">{{ r.get('half_b') | fmt }}</td>
<td class="n" data-v="{{ r.get('length_effect') | sv }}">{{ r.get('length_effect') | fmt }}</td>
<td class="n" data-v="{{ r.get('support') | sv }}">{{ r.get('support') | fmt(2) }}</td>
<td class="wh" data-v="{{ r.get('where', '') }}">{{ r.get('where', '') }}</td>
</tr>
{% endfor %}
</tbody></table></div></section>
{% if images %}<section id="plots"><h2>Plots</h2>
{% for name, uri in images.items() %}<figure><img src="{{ uri }}" alt="{{ name }}"><figcaption>{{ name }}</figcaption></figure>{% endfor %}
</section>{% endif %}
<section id="details"><h2>Each hypothesis</h2>
{% for v in views %}{% set r = v.row %}
<article class="hyp" id="{{ v.anchor }}">
<h3>#{{ r.get('rank') | fmt }} {{ r.concept }} &nbsp;<code>{{ label_of(v) }}</code></h3>
{% if v.label and v.label.explanation %}<p class="expl">{{ v.label.explanation }}</p>{% endif %}
<p>The preferred response <b>{{ "has more" if (r.get('direction') or 0) > 0 else "has less" }}</b> of it:
the chosen side scores higher in {{ ((r.get('share_chosen_more') or 0) * 100) | round | int }}% of pairs,
the rejected side in {{ ((r.get('share_rejected_more') or 0) * 100) | round | int }}%.</p>
<table class="facts">
<tr><td>effect d_z</td><td>{{ r.get('d_z') | fmt }}</td><td>mean d [95% CI]</td><td>{{ r.get('mean_diff') | fmt }} [{{ r.get('ci_low') | fmt }}, {{ r.get('ci_high') | fmt }}]</td></tr>
<tr><td>q length-controlled / raw (p raw)</td><td>{{ r.get('q') | fmt_q }} / {{ r.get('q_raw') | fmt_q }} ({{ r.get('p') | fmt_q }})</td><td>halves A / B</td><td>{{ r.get('half_a') | fmt }} / {{ r.get('half_b') | fmt }} {{ "(replicated)" if r.get('replicated') else "(not replicated)" }}</td></tr>
<tr><td>length-controlled</td><td>{{ r.get('length_effect') | fmt }} (p {{ r.get('length_p') | fmt_q }}; share of the length gap it carries {{ r.get('length_share') | fmt(2) }})</td><td>support / pairs</td><td>{{ r.get('support') | fmt(2) }} / {{ r.get('n') | fmt }}</td></tr>
</table>
{% if r.get('members') %}<p>{{ "Near-duplicate latents (same top contexts, firing together), shown as this one row" if r.get('cluster_type') == 'near_duplicate' else "Latents in this cluster" }} ({{ r.members | length }}): {% for m in r.members %}<code>{{ m }}</code>{{ ", " if not loop.last }}{% endfor %}</p>{% endif %}
{% if r.concept == 'length' and carriers %}<p><b>What carries the length difference:</b> see <a href="#length-carriers">the concepts whose raw effect vanishes at equal length</a>.</p>{% endif %}
{% if v.label and (v.label.tokens_chosen or v.label.tokens_rejected) %}
<div class="cols">
{% for side, toks, ctxs in [("chosen", v.label.tokens_chosen, v.label.contexts_chosen), ("rejected", v.label.tokens_rejected, v.label.contexts_rejected)] %}
<div><b>Fires most in {{ side }} responses:</b> {% for t, c in toks %}<code class="tok">{{ t | repr }}</code>×{{ c }}{{ ", " if not loop.last }}{% else %}<i>(none)</i>{% endfor %}
{% for c in ctxs %}<div class="ctx">{{ c.left }}<mark>{{ c.token }}</mark>{{ c.right }}</div>{% endfor %}</div>
{% endfor %}
</div>
{% endif %}
{% if v.where %}<p><b>Where it concentrates</b> (data clusters of pairs; mean d inside vs outside):</p>
<table><thead><tr><th>cluster</th><th>pairs</th><th>mean d in</th><th>mean d out</th><th>Welch z</th><th>q</th><th>Cohen d</th><th>halves agree</th><th>about</th></tr></thead><tbody>
{% for w in v.where %}<tr><td>{{ w.get('cluster') }}</td><td>{{ w.get('n') }}</td><td>{{ w.get('mean_in') | fmt }}</td><td>{{ w.get('mean_out') | fmt }}</td><td>{{ w.get('welch_z') | fmt }}</td><td>{{ w.get('q') | fmt_q }}</td><td>{{ w.get('cohen_d') | fmt }}</td><td>{{ "yes" if w.get('agree_halves') else "no" }}</td><td>{{ w.get('about', '') }}</td></tr>{% endfor %}
</tbody></table>{% endif %}
{% for e in v.examples %}
<div class="ex" data-pair="{{ e.pair_id }}">
<div><span class="lab">prompt · {{ e.pair_id }} · d = {{ e.d | fmt }}</span>{{ text(e.prompt) }}</div>
<div class="ch"><span class="lab">chosen</span>{{ text(e.chosen) }}</div>
<div class="rj"><span class="lab">rejected</span>{{ text(e.rejected) }}</div>
</div>
{% endfor %}
</article>
{% endfor %}
</section>
<section id="glossary"><h2>Metric glossary</h2>
<p>Every metric key the pipeline logs to MLflow. Evaluation metrics come as <code>k</code> (policy),
<code>k_base</code> and <code>k_diff</code> (paired policy &minus; base), each with <code>_lo</code>/<code>_hi</code>
bounds; <code>{x}</code> stands for one key segment.</p>
<table class="glossary"><thead><tr><th>metric key</th><th>better</th><th>what it measures</th><th>stage</th></tr></thead><tbody>
{% for g in glossary %}
<tr><td><code>{{ g.pattern }}</code></td><td>{{ g.better }}</td><td>{{ g.meaning }}</td><td>{{ g.stage }}</td></tr>
{% endfor %}
</tbody></table></section>
<script>
(function () {
  "use strict";
  var table = document.getElementById("hyp-table");
  if (!table) { return; }
  var heads = table.tHead.rows[0].cells;
  function key(td, num) {
    var v = td.getAttribute("data-v");
    if (v === null) { v = td.textContent; }
    if (!num) { return v.toLowerCase(); }
    return v === "" ? null : parseFloat(v);
  }
  function sortBy(col, desc) {
    var num = heads[col].getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col], num), y = key(b.cells[col], num);
      if (x === null || y === null) { return (x === null) - (y === null); }
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return desc ? -c : c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    heads[col].setAttribute("aria-sort", desc ? "descending" : "ascending");
    table.setAttribute("data-sorted", heads[col].getAttribute("data-key") + ":" + (desc ? "desc" : "asc"));
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () { sortBy(col, th.getAttribute("aria-sort") === "ascending"); });
  });
  var m = /sort=([A-Za-z_]+)(?::(asc|desc))?/.exec(window.location.hash);
  if (m) {
    Array.prototype.forEach.call(heads, function (th, col) {
      if (th.getAttribute("data-key") === m[1]) { sortBy(col, m[2] === "desc"); }
    });
  }
})();
</script>
</body></html>
"""
