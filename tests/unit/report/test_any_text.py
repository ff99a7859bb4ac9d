"""Plots and the HTML report on any text: real rows with `$`, backslashes, HTML, right-to-left
script and emoji, plus control characters, as concept labels and examples. No mathtext: the plots
save as PNG, and the report holds every text escaped and legible."""

import html as html_lib
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from prefsculpt.data import load_pairs
from prefsculpt.evals.stats import Estimate
from prefsculpt.evals.summary import Row, plot_rows
from prefsculpt.report.html import ExampleView, HypothesisView, Segment, render_report, segments
from prefsculpt.report.plots import plain_text, png_bytes, top_effects, volcano

#: What to look for in real data (a pattern) and how wide a window around it to take as a label.
KINDS = {
    "dollar": r"\$[^$\n]{1,20}\$",  # two dollars: mathtext territory
    "backslash": r"\\[A-Za-z]+",  # LaTeX-like commands (\frac, \n written out) crash mathtext
    "html": r"<(?:script|div|p|b|a)\b[^>\n]{0,20}>",
    "rtl": "[\u0590-\u05ff\u0600-\u06ff]+",
    "emoji": "[\U0001f300-\U0001faff]",
}
#: Control characters: none in the shared sets, so appended to a real window (an ANSI colour code).
CONTROL = "\x1b[31m\x00\x07"


def _real_texts(shared_data) -> dict[str, tuple[str, str, object]]:
    """kind -> (label made of the real text around the first match, the pair id, the pair)."""
    res = load_pairs(str(shared_data / "ultrafeedback-sample" / "train_clean.jsonl"), on_error="skip")
    found = {}
    for pair in res.pairs:
        for kind, pat in KINDS.items():
            m = None if kind in found else re.search(pat, pair.chosen)
            if m:
                s = max(0, m.start() - 8)
                found[kind] = (pair.chosen[s:m.end() + 8], pair.id, pair)
    assert sorted(found) == sorted(KINDS), f"shared data lacks {set(KINDS) - set(found)}"
    return found


@pytest.fixture(scope="module")
def labelled(shared_data):
    found = _real_texts(shared_data)
    labels = {f"latent:{i}": found[kind][0] for i, kind in enumerate(KINDS)}
    labels["latent:99"] = CONTROL + found["dollar"][0]
    labels[r"named:$\foo$ <b>"] = found["backslash"][0]  # the concept id itself is data text too
    hyp = pd.DataFrame({"concept": list(labels), "kind": "latent", "tested": True, "significant": True,
                        "d_z": np.linspace(0.9, -0.6, len(labels)), "q": np.geomspace(1e-9, 1e-3, len(labels)),
                        "mean_diff": np.linspace(0.5, -0.2, len(labels))})
    hyp["ci_low"], hyp["ci_high"] = hyp["mean_diff"] - 0.1, hyp["mean_diff"] + 0.1
    return found, labels, hyp


def test_label_text_is_real_and_hard(labelled):
    found, labels, _ = labelled
    assert labels["latent:0"].count("$") >= 2 and re.search(r"\\[A-Za-z]", labels["latent:1"])
    assert "<" in labels["latent:2"] and re.search("[\u0590-\u06ff]", labels["latent:3"])


def test_plots_render_any_label_to_png(labelled):
    _, labels, hyp = labelled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Glyph ... missing from font": drawn as a box, fine
        for fig in (volcano(hyp, labels=labels, annotate=20), top_effects(hyp, 20, labels)):
            png = png_bytes(fig)
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
            texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_parse_math"))]
            drawn = [t for t in fig.findobj(lambda a: hasattr(a, "get_parse_math")) if "$" in t.get_text()]
            assert drawn and not any(t.get_parse_math() for t in drawn)  # no mathtext for data text
            assert any("\\x1b[31m\\x00\\x07" in t for t in texts)  # controls shown, not swallowed
        rows = [Row(labels["latent:0"] + CONTROL, Estimate(2.0, 1.5, 2.5, 10), Estimate(1.0, 0.5, 1.5, 10),
                    Estimate(1.0, 0.2, 1.8, 10))]
        assert png_bytes(plot_rows(rows, labels["latent:1"]))[:4] == b"\x89PNG"


def test_plain_text_shows_controls_and_keeps_the_rest():
    assert plain_text("a\x1b[0m\tb\n$x$ \\frac 😊 שלום") == "a\\x1b[0m b $x$ \\frac 😊 שלום"


def test_report_holds_every_text_escaped(labelled):
    found, labels, hyp = labelled
    views = []
    for concept, label in labels.items():
        row = {**hyp.set_index("concept").loc[concept].to_dict(), "concept": concept, "rank": len(views) + 1,
               "label": label, "direction": 1, "where": label}
        kind = next((k for k, (t, _, _) in found.items() if t == label), "dollar")
        _, pid, pair = found[kind]
        at = pair.chosen.find(found[kind][0])
        ex = ExampleView(pid, 1.0, prompt=[Segment(pair.prompt_text()[:300])],
                         chosen=segments(pair.chosen, [(at, at + len(found[kind][0]))]),
                         rejected=[Segment(pair.rejected[:300] + CONTROL)])
        views.append(HypothesisView(row, examples=[ex]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        images = {"volcano": png_bytes(volcano(hyp, labels=labels))}
    out = render_report(views, meta={"data": "train_clean.jsonl"}, images=images)
    for concept, label in labels.items():
        shown = html_lib.escape(label.replace("\x1b", "\\x1b").replace("\x00", "\\x00").replace("\x07", "\\x07"))
        assert shown in out, (concept, shown)
        assert html_lib.escape(concept) in out
    html_label = found["html"][0]
    assert html_label not in out and html_lib.escape(html_label) in out  # its tag never becomes markup
    assert out.count("<script>") == 1  # only the report's own sorter
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", out)  # no raw control characters
    for kind in ("rtl", "emoji"):
        assert found[kind][0] in out  # plain text: as it is
