"""Open the concept report in headless Chromium: it loads without console messages, shows the
hypothesis table, sorts it, and dataset text containing ``<script>`` shows as text and never runs.

Chromium's ``--enable-logging=stderr`` prints every console message (and every uncaught error) as
an ``INFO:CONSOLE`` line; the report itself logs nothing, so any such line is a failure. A positive
control page (unescaped payload, a thrown error) checks that both detectors fire.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prefsculpt.report.html import render_report, write_report
from tests.unit.report.test_html import EVIL, synthetic_views

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUT_DIR = Path(__file__).resolve().parents[2] / "outputs" / "test_report_chromium"
#: Visible trace of the payload if it ever runs: it sets the title and a body attribute.
PAYLOAD = EVIL.replace("window.__pwned=1", "window.__pwned=1;document.title='PWNED';"
                       "document.body&&document.body.setAttribute('data-pwned','1')")


def chromium(url: str, tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """Run headless Chromium on ``url``; returns (stdout, console lines from stderr)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): cannot open the report")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=2000", *extra, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    return res.stdout, console


def _rows(dom: str) -> list[str]:
    table = dom.split('id="hyp-table"')[1].split("</table>")[0]
    return re.findall(r'<a href="#h-[^"]+">([^<]+)</a>', table)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    html = render_report(synthetic_views(PAYLOAD), meta={"data": f"synthetic {PAYLOAD}"})
    return write_report(html, tmp_path_factory.mktemp("report") / "report.html")


def test_positive_control_detectors_fire(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(f"<!DOCTYPE html><html><body><p>x</p>{PAYLOAD}<script>notDefined()</script></body></html>")
    dom, console = chromium(bad.as_uri(), tmp_path, "--dump-dom")
    assert 'data-pwned="1"' in dom and "<title>PWNED</title>" in dom
    assert any("notDefined" in ln for ln in console)


def test_report_loads_clean_and_script_text_does_not_run(report, tmp_path):
    dom, console = chromium(report.as_uri(), tmp_path, "--dump-dom")
    assert console == [], "console messages:\n" + "\n".join(console)
    assert 'data-pwned="1"' not in dom and "<title>PWNED</title>" not in dom
    assert '<table id="hyp-table"' in dom and _rows(dom) == ["cluster:0", "length", "latent:77"]
    # the payload is in the DOM as text (serialised back escaped), in examples, labels and contexts
    assert dom.count("&lt;script&gt;window.__pwned=1;") >= 5
    assert "<mark>&lt;script&gt;" in dom


def test_report_sorts_from_the_url(report, tmp_path):
    dom, console = chromium(report.as_uri() + "#sort=d_z", tmp_path, "--dump-dom")
    assert console == []
    assert 'data-sorted="d_z:asc"' in dom
    assert _rows(dom) == ["latent:77", "length", "cluster:0"]
    dom, _ = chromium(report.as_uri() + "#sort=q:desc", tmp_path, "--dump-dom")
    assert _rows(dom) == ["latent:77", "length", "cluster:0"]
    dom, _ = chromium(report.as_uri() + "#sort=rank:desc", tmp_path, "--dump-dom")
    assert _rows(dom) == ["length", "cluster:0", "latent:77"]  # NaN rank stays last either way


def test_screenshot(report, tmp_path):
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    shot = OUT_DIR / "report.png"
    shot.unlink(missing_ok=True)
    chromium(report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG"
