import re

import numpy as np
import pandas as pd
import pytest

from prefsculpt.audit.labels import ConceptLabel, Context
from prefsculpt.report.html import (
    ExampleView,
    HypothesisView,
    Segment,
    context_spans,
    regex_spans,
    render_report,
    segments,
    write_report,
)
from prefsculpt.report.plots import png_bytes, top_effects, volcano

EVIL = '<script>window.__pwned=1</script>'
ATTR = '"onerror=alert(1) x="'


def synthetic_views(evil: str = EVIL) -> list[HypothesisView]:
    """Three hypotheses whose dataset texts carry markup that must never become markup."""
    rows = [
        dict(rank=1, concept="cluster:0", kind="cluster", d_z=0.9, mean_diff=2.5, ci_low=2.2, ci_high=2.8,
             q=1e-40, p=1e-42, half_a=0.85, half_b=0.95, replicated=True, length_effect=0.8, length_p=1e-30,
             support=0.4, n=1200, share_chosen_more=0.3, share_rejected_more=0.02, direction=1,
             significant=True, members=["latent:3", "latent:9"], where="cluster 2 (z 9.1)"),
        dict(rank=2, concept="length", kind="builtin", d_z=0.5, mean_diff=30.0, ci_low=25.0, ci_high=35.0,
             q=2e-6, p=1e-6, half_a=0.45, half_b=0.55, replicated=True, length_effect=np.nan, length_p=np.nan,
             support=0.9, n=1200, share_chosen_more=0.6, share_rejected_more=0.3, direction=1,
             significant=True, where=""),
        dict(rank=np.nan, concept="latent:77", kind="latent", d_z=-0.05, mean_diff=-0.1, ci_low=-0.3,
             ci_high=0.1, q=0.4, p=0.3, half_a=-0.1, half_b=0.02, replicated=False, length_effect=-0.04,
             length_p=0.5, support=0.05, n=1200, share_chosen_more=0.01, share_rejected_more=0.02,
             direction=-1, significant=False, where=f"{evil}"),
    ]
    label = ConceptLabel(
        "cluster:0", label=f"' absolutely' · '{evil}'", tokens_chosen=[(" absolutely", 5), (evil, 1)],
        tokens_rejected=[("You", 1)],
        contexts_chosen=[Context("p1", "chosen", " absolutely", "You're", f" right {ATTR}", 9.0)],
        contexts_rejected=[Context("p2", "rejected", evil, "", "", 1.0)], explanation=f"agrees {evil}",
    )
    text = f"You're absolutely right! {evil} and {ATTR}"
    ex = ExampleView("p1", 3.0, prompt=[Segment(f"I think {evil} is 54")],
                     chosen=segments(text, context_spans(text, [("You're", " absolutely", " right")])),
                     rejected=[Segment(evil, mark=True)])
    return [HypothesisView(rows[0], label, where=[dict(cluster=2, n=140, mean_in=3.0, mean_out=0.5, welch_z=9.1,
                                                       cohen_d=1.2, agree_halves=True, about=evil)],
                           examples=[ex]),
            HypothesisView(rows[1]), HypothesisView(rows[2])]


def test_every_dataset_string_is_escaped():
    html = render_report(synthetic_views(), meta={"data": evil_meta()}, planted=pd.DataFrame(
        {"planted concept": ["flattery"], "label": [EVIL], "rank": [1]}))
    # the only <script> element is the report's own sorter
    assert html.count("<script>") == 1 and html.count("</script>") == 1
    assert "__pwned" not in html.split("<script>")[1]
    assert html.count("&lt;script&gt;window.__pwned=1&lt;/script&gt;") >= 8
    assert '"onerror' not in html and "&#34;onerror=alert(1) x=&#34;" in html
    # marks wrap escaped text: the firing token is highlighted, the evil mark is escaped inside
    assert "<mark> absolutely</mark>" in html
    assert "<mark>&lt;script&gt;window.__pwned=1&lt;/script&gt;</mark>" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # no external URLs


def evil_meta():
    return f"planted {EVIL}"


def test_table_is_present_and_sortable(tmp_path):
    html = render_report(synthetic_views())
    table = html.split('<table id="hyp-table" class="sortable">')[1].split("</table>")[0]
    heads = re.findall(r'<th data-key="(\w+)"', table)
    assert heads[:3] == ["rank", "concept", "label"] and "q" in heads and "length_effect" in heads
    assert 'data-type="num"' in table
    rows = re.findall(r"<tr class=\"(sig|ns)\">", table)
    assert rows == ["sig", "sig", "ns"]
    # numeric sort keys: plain floats, NaN empty (sorted last by the script)
    assert 'data-v="1e-40"' in table and '<td class="n" data-v="">' in table
    assert "addEventListener(\"click\"" in html and "sort=" in html
    assert 'href="#h-cluster-0"' in html and 'id="h-cluster-0"' in html
    path = write_report(html, tmp_path / "r" / "report.html")
    assert path.read_text(encoding="utf-8") == html
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left


def test_segments_cut_long_text_around_the_first_mark():
    text = "a" * 2000 + "TOKEN" + "b" * 2000
    segs = segments(text, [(2000, 2005)], max_chars=300)
    assert segs[0] == Segment("…") and segs[-1] == Segment("…")
    assert [s.text for s in segs if s.mark] == ["TOKEN"]
    assert sum(len(s.text) for s in segs if s.text != "…") == 300
    assert segments("short", []) == [Segment("short")]


def test_context_and_regex_spans():
    text = "right. You're right, absolutely right"
    # the window picks the occurrence after "You're", not the first "right"
    assert context_spans(text, [("You're ", "right", ", abs")]) == [(14, 19)]
    assert context_spans(text, [("zzz", "\n", "")]) == []
    assert regex_spans("**a** and **b**", r"\*\*[^*]+\*\*") == [(0, 5), (10, 15)]


@pytest.fixture
def hyp_table():
    rng = np.random.default_rng(0)
    n = 60
    return pd.DataFrame({
        "concept": [f"latent:{i}" for i in range(n)] + ["length"],
        "kind": ["latent"] * n + ["builtin"],
        "tested": [True] * (n + 1), "d_z": np.r_[rng.normal(0, 0.3, n), 0.6],
        "mean_diff": np.r_[rng.normal(0, 1, n), 20.0], "ci_low": np.r_[rng.normal(-1, 0.1, n), 15.0],
        "ci_high": np.r_[rng.normal(1, 0.1, n), 25.0], "q": np.r_[rng.uniform(0, 1, n), 1e-300],
        "significant": np.r_[rng.uniform(0, 1, n) < 0.2, True],
    })


def test_plots_render(hyp_table):
    fig = volcano(hyp_table, labels={"length": "length"})
    assert fig.axes[0].get_xlabel().startswith("effect d_z at equal length")
    assert png_bytes(fig)[:4] == b"\x89PNG"
    fig2 = top_effects(hyp_table.sort_values("q"), k=5)
    assert len(fig2.axes[0].patches) == 5
    assert png_bytes(top_effects(hyp_table.head(0)))[:4] == b"\x89PNG"


def test_report_has_the_metric_glossary():
    from prefsculpt.core import glossary as G

    html = render_report(synthetic_views())
    section = html.split('<section id="glossary">')[1].split("</section>")[0]
    rows = re.findall(r"<tr><td><code>(.*?)</code></td><td>(.*?)</td>", section)
    assert len(rows) == len(G.ENTRIES)
    got = dict(rows)
    assert got["search/off_target"] == "↓ lower" and got["cap/pref/implicit_acc"] == "↑ higher"
    assert got["{split}/n_pairs"] == "–"
