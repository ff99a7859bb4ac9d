"""The review page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; never
``playwright install``): open the review of a tiny audit, filter, mark two concepts suppress with a
method and λ, see a bad save refused on the page, save, and check that the logged artifact drives
training: loaded by its ``runs:/`` reference, it becomes the shaping interventions ``train`` builds
and the decisions the search constrains its space with.
"""

from pathlib import Path

import mlflow
import pytest
import yaml

from prefsculpt.audit.decisions import decisions_hash
from prefsculpt.config import compose
from prefsculpt.shaping.resolve import resolve_shaping
from prefsculpt.stages.review import HASH_TAG, LATEST_TAG, open_review
from prefsculpt.tracking.artifacts import local_decisions
from tests.unit.review.helpers import audit_table, log_tiny_audit

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SHOT = Path(__file__).resolve().parents[2] / "outputs" / "test_artifacts" / "review.png"
N_LATENTS = 2000  # thousands of rows: the page is paged


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: apt-get install -y chromium")
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "headless": True,
            "args": ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run"]}


@pytest.fixture
def review(mlflow_uri, tmp_path):
    rid = log_tiny_audit(tmp_path, n_latents=N_LATENTS)
    session = open_review(compose(f"review.audit_run={rid} cache_dir={tmp_path / 'cache'}"))
    session.server.start()
    yield rid, session
    session.close()


def _row(page, concept):
    return page.locator(f'tr.row[data-concept="{concept}"]')


def _rows(page):
    return page.locator("tr.row").evaluate_all("rs => rs.map(r => r.getAttribute('data-concept'))")


def test_review_page_decides_saves_and_drives_training(review, page, tmp_path):
    rid, session = review
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_viewport_size({"width": 1500, "height": 1000})
    page.goto(session.url)
    page.wait_for_selector("body[data-ready='1']")

    # significant only by default: 6 latents, the cluster, length; sorted by rank (unranked last)
    assert len(_rows(page)) == 8
    assert "of 8 shown (2003 concepts in the audit)" in page.locator("#pageinfo").text_content()
    page.uncheck("#sig")  # every concept: paged, 50 a page
    assert len(_rows(page)) == 50 and "page 1 of 41" in page.locator("#pageinfo").text_content()
    page.check("#sig")
    page.select_option("#family", "latent")
    page.select_option("#side", "-1")
    assert _rows(page) == ["latent:3", "latent:4", "latent:5"]
    page.select_option("#side", "")
    page.fill("#q", "not X")  # search reads labels (the characteristic phrase) too
    assert _rows(page) == ["latent:1"]
    page.fill("#q", "")
    page.click('th[data-key="d_z"]')  # sort by effect, ascending: the 'chosen has less' ones first
    t = audit_table(N_LATENTS)
    sig = t[t["significant"] & (t["kind"] == "latent")]
    assert _rows(page) == sig.sort_values("d_z")["concept"].tolist()
    page.click('th[data-key="d_z"]')  # again: descending
    assert _rows(page) == sig.sort_values("d_z", ascending=False)["concept"].tolist()
    page.click('th[data-key="rank"]')
    assert _rows(page) == [f"latent:{i}" for i in range(6)]

    # the script in a label and in an example is text: it shows and never runs
    assert "<script>window.__pwned=1</script>" in _row(page, "latent:2").locator("td.lbl").text_content()
    _row(page, "latent:1").locator("button.toggle").click()
    detail = page.locator("tr.detail")
    detail.locator("mark").first.wait_for()
    assert "Characteristic phrase: …, not X. in 6 of 6 top chosen windows, 0 of 4 rejected" in detail.text_content()
    assert detail.locator(".box.ch mark").first.text_content() == "."
    assert page.evaluate("window.__pwned") is None

    # decide: latent:1 suppress by score with λ 0.5, latent:3 suppress by filter with λ 1 and share 0.2
    _row(page, "latent:1").locator("select.action").select_option("suppress")
    _row(page, "latent:1").locator("input.strength").fill("0.5")
    _row(page, "latent:1").locator("input.strength").dispatch_event("change")
    r3 = _row(page, "latent:3")
    r3.locator("select.action").select_option("suppress")
    r3.locator("select.method").select_option("filter")
    _row(page, "latent:3").locator("input.param").fill("0.2")
    _row(page, "latent:3").locator("input.param").dispatch_event("change")
    _row(page, "latent:3").locator("input.strength").fill("-1")  # a bad λ: the server refuses it
    _row(page, "latent:3").locator("input.strength").dispatch_event("change")
    page.click("#save")
    err = page.locator(".msg.err")
    err.wait_for()
    assert "Not saved: 1 problem(s)" in err.text_content()
    assert "entry 4 (latent:3): negative strength -1.0" in err.text_content() or "negative strength -1" in \
        err.text_content()
    assert mlflow.MlflowClient().list_artifacts(rid, "decisions") == []
    _row(page, "latent:3").locator("input.strength").fill("1")
    _row(page, "latent:3").locator("input.strength").dispatch_event("change")
    page.check("#decided")
    assert _rows(page) == ["latent:1", "latent:3"]
    page.click("#save")
    ok = page.locator(".msg.ok")
    ok.wait_for()
    ref = f"runs:/{rid}/decisions/v1.yaml"
    assert ok.locator("code.ref").text_content() == ref
    assert "2 shaping" in ok.text_content() and "0 unsaved change(s)" in page.locator("#changed").text_content()
    page.uncheck("#decided")
    page.screenshot(path=str(tmp_path / "unused.png"))  # warm-up: fonts settled before the kept shot
    _row(page, "latent:1").scroll_into_view_if_needed()
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOT), full_page=False)
    # the refused save is the only console line (the browser logs any 4xx answer)
    assert console == ["error: Failed to load resource: the server responded with a status of 422 "
                       "(Unprocessable Entity)"], console

    assert requests and all(u.startswith(session.url) for u in requests), requests  # no CDN, no network

    # the artifact, its hash and the tags on the audit run
    tags = mlflow.get_run(rid).data.tags
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(rid, "decisions")] == ["decisions/v1.yaml"]
    assert tags[LATEST_TAG] == "decisions/v1.yaml"
    cfg = compose(f"shaping.decisions={ref} cache_dir={tmp_path / 'cache'}")
    shaping = local_decisions(cfg)  # what `train` does with a runs:/ reference
    local = Path(shaping.decisions)
    assert local.is_file() and decisions_hash(local) == tags[HASH_TAG] == tags["prefsculpt.decisions.v1.hash"]
    doc = yaml.safe_load(local.read_text())
    assert doc["audit_run_id"] == rid and len(doc["concepts"]) == 8  # every proposed hypothesis, in order

    # it drives training: the interventions train builds from it ...
    resolved = resolve_shaping(shaping, layer=3)
    assert resolved.decisions_hash == tags[HASH_TAG]
    got = [(iv.name, iv.lam, iv.params) for iv in resolved.interventions]
    assert got == [("score/latent:1", 0.5, {}), ("filter/latent:3", 1.0, {"mode": "drop", "share": 0.2})]
    # ... and the decisions the search reads by the same reference (search.decisions)
    from prefsculpt.search.inputs import load_audit

    _, dec, dhash = load_audit(rid, ref, tmp_path / "cache")
    assert dhash == tags[HASH_TAG]
    assert [(d.concept, d.method, d.lam) for d in dec.active()] == [("latent:1", "score", 0.5),
                                                                     ("latent:3", "filter", 1.0)]
