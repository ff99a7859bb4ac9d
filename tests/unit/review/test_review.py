import http.client
import json
import math

import mlflow
import pytest
import yaml

from prefsculpt.audit.decisions import DecisionsError, decisions_hash
from prefsculpt.config import compose
from prefsculpt.core.errors import UserError
from prefsculpt.review import data as D
from prefsculpt.review.server import ReviewApp, ReviewServer
from prefsculpt.shaping.decisions import load_decisions
from prefsculpt.tracking.artifacts import ArtifactRefError, parse_runs_ref, resolve_artifact
from tests.unit.review.helpers import EVIL, audit_table, log_tiny_audit


@pytest.fixture(scope="module")
def table():
    return audit_table(40)


def _proposal(table):
    from prefsculpt.audit.decisions import propose_decisions

    return propose_decisions(table[table["rank"].notna()].sort_values("rank"), audit_run_id="r1")


# ---------------------------------------------------------------- data


def test_table_payload_is_compact_json_safe_and_fills_labels(table):
    p = D.table_payload(table, {"latent:20": "' filled'"})
    assert p["columns"] == list(D.ROW_COLUMNS) and len(p["rows"]) == len(table)
    rows = [dict(zip(p["columns"], r, strict=True)) for r in p["rows"]]
    by = {r["concept"]: r for r in rows}
    assert by["latent:20"]["label"] == "' filled'"  # the audit left it unlabelled
    assert by["latent:0"]["label"] == "' absolutely' · ' right'"  # the audit's own label wins
    assert by["cluster:0"]["n_members"] == 4 and by["latent:7"]["member_of"] == "cluster:0"
    assert by["latent:30"]["rank"] is None  # NaN -> null
    json.dumps(p, allow_nan=False)
    with pytest.raises(D.ReviewInputError, match="no 'concept' column"):
        D.table_payload(table.drop(columns=["concept"]))


def test_build_decisions_keeps_the_audit_figures_and_validates(table):
    prop = _proposal(table)
    known = D.known_concepts(table)
    sub = {"concepts": [{"concept": "latent:3", "action": "suppress", "method": "filter", "strength": 1.0,
                         "note": "a correction the data rejects", "share": 0.2},
                        {"concept": "latent:30", "action": "amplify", "method": "score", "strength": 0.5}]}
    doc = D.build_decisions(sub, prop, known, audit_run_id="r1")
    assert doc["audit_run_id"] == "r1" and doc["version"] == 1
    e = doc["concepts"][0]
    assert e["label"] == "' Actually'" and e["rank"] == 4 and e["share"] == 0.2  # reading figures kept
    assert "label" not in doc["concepts"][1]  # not in the proposal: the person's fields only
    dec = load_decisions(doc, known)
    assert [(d.concept, d.lam) for d in dec.active()] == [("latent:3", 1.0), ("latent:30", -0.5)]


def test_build_decisions_lists_every_problem(table):
    sub = {"concepts": [{"concept": "latent:999", "action": "suppress", "method": "score", "strength": 1},
                        {"concept": "latent:3", "action": "suppress", "method": "filter", "strength": -1,
                         "share": 1.5},
                        {"concept": "latent:4", "action": "supress", "method": "score", "strength": "abc"}]}
    with pytest.raises(DecisionsError) as exc:
        D.build_decisions(sub, _proposal(table), D.known_concepts(table))
    lines = D.error_lines(exc.value)
    assert len(lines) == 5, lines
    assert lines[0].startswith("entry 1 (latent:999): unknown concept 'latent:999'")
    assert any("negative strength -1" in ln for ln in lines)
    assert any("share 1.5 must lie in (0, 1)" in ln for ln in lines)
    assert any("unknown action 'supress' (did you mean 'suppress'?)" in ln for ln in lines)
    assert any("strength must be a finite number >= 0, got 'abc'" in ln for ln in lines)
    with pytest.raises(DecisionsError, match="no 'concepts' list"):
        D.build_decisions({"x": 1}, None, [])


def test_concept_detail_prefers_the_audit_record_then_built_labels():
    rec = {"concept": "latent:1", "label_detail": {"label": "x"}, "examples": [{"pair_id": "p"}],
           "share_chosen_more": float("nan"), "members": None}
    d = D.concept_detail("latent:1", rec)
    assert d["label"] == {"label": "x"} and d["examples"] == [{"pair_id": "p"}]
    assert d["share_chosen_more"] is None and d["where_detail"] == []
    d2 = D.concept_detail("latent:2", None, {"label": "y"})
    assert d2["label"] == {"label": "y"} and d2["examples"] == []


# ---------------------------------------------------------------- server


def _request(url, method="GET", path="/", body=None, headers=None):
    host, port = url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


@pytest.fixture
def server(table):
    saved = []

    def save(sub):
        doc = D.build_decisions(sub, _proposal(table), D.known_concepts(table))
        saved.append(doc)
        return {"version": len(saved)}

    app = ReviewApp(D.page_data(table, _proposal(table), {"audit run": EVIL}), lambda c: {"concept": c}, save,
                    title=f"review {EVIL}")
    srv = ReviewServer(app).start()
    yield srv, saved
    srv.close()


def test_page_is_escaped_and_locked_down(server):
    srv, _ = server
    status, headers, body = _request(srv.url)
    html = body.decode()
    assert status == 200 and srv.url.startswith("http://127.0.0.1:")
    assert EVIL not in html and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert html.count(f'nonce="{srv.app.nonce}"') == 1 and srv.app.token in html  # the inline style
    assert "<script>" not in html and '<script src="page.js"></script>' in html
    status, headers, js = _request(srv.url, path="/page.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert "innerHTML" not in js.decode() and "insertAdjacentHTML" not in js.decode()  # text only
    for text in (html, js.decode()):
        assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
    status, _, body = _request(srv.url, path="/api/data")
    assert status == 200 and json.loads(body)["meta"]["audit run"] == EVIL  # data is JSON, escaped by the page


def test_save_needs_the_token_the_host_and_valid_decisions(server):
    srv, saved = server
    ok = {"concepts": [{"concept": "latent:0", "action": "suppress", "method": "score", "strength": 0.5}]}
    body = json.dumps(ok)
    js = {"Content-Type": "application/json"}
    assert _request(srv.url, "POST", "/api/decisions", body, js)[0] == 403  # no token
    tok = {**js, "X-Review-Token": srv.app.token}
    assert _request(srv.url, "POST", "/api/decisions", body, {**tok, "Host": "evil.example:80"})[0] == 403
    assert _request(srv.url, "POST", "/api/decisions", body, {**tok, "Content-Type": "text/plain"})[0] == 415
    bad = json.dumps({"concepts": [{"concept": "latent:nope", "action": "suppress", "method": "score",
                                    "strength": 1}]})
    status, _, resp = _request(srv.url, "POST", "/api/decisions", bad, tok)
    assert status == 422 and "unknown concept 'latent:nope'" in json.loads(resp)["errors"][0]
    status, _, resp = _request(srv.url, "POST", "/api/decisions", body, tok)
    assert status == 200 and json.loads(resp) == {"ok": True, "version": 1}
    assert saved[0]["concepts"][0]["strength"] == 0.5
    assert _request(srv.url, path="/api/nothing")[0] == 404


# ---------------------------------------------------------------- run references and the stage


def test_resolve_artifact_local_and_runs(mlflow_uri, tmp_path):
    local = tmp_path / "d.yaml"
    assert resolve_artifact(str(local), tmp_path / "dl") == local  # passthrough, even if absent
    assert parse_runs_ref("runs:/abc/decisions/v2.yaml") == ("abc", "decisions/v2.yaml")
    with pytest.raises(ArtifactRefError, match="expected runs:/<run id>/<artifact path>"):
        parse_runs_ref("runs:/abc")
    local.write_text("x: 1\n")
    mlflow.set_experiment("refs")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(local), "decisions")
    ref = f"runs:/{run.info.run_id}/decisions/d.yaml"
    got = resolve_artifact(ref, tmp_path / "dl")
    assert got.is_relative_to(tmp_path / "dl") and got.name == "d.yaml" and got.read_text() == "x: 1\n"
    assert resolve_artifact(ref, tmp_path / "dl") == got  # again: the same (cached) download
    with pytest.raises(UserError, match="does not resolve"):
        resolve_artifact(f"runs:/{run.info.run_id}/decisions/v9.yaml", tmp_path / "dl")


def test_review_session_saves_versions_and_restarts_from_the_latest(mlflow_uri, tmp_path):
    from prefsculpt.stages.review import HASH_TAG, LATEST_TAG, open_review, saved_versions

    rid = log_tiny_audit(tmp_path, n_latents=40)
    with mlflow.start_run(run_name="other", tags={"prefsculpt.stage": "train"}):
        pass  # a newer run of another stage is not an audit
    cfg = compose("review.port=0")
    session = open_review(cfg)  # the latest finished audit run
    try:
        assert session.inputs.run_id == rid
        app = session.server.app
        assert app.data["meta"]["decisions from"].startswith("the audit's proposal")
        sub = {"concepts": [{"concept": "latent:0", "action": "suppress", "method": "score", "strength": 0.5}]}
        r1, r2 = app.save(sub), app.save({"concepts": [{**sub["concepts"][0], "strength": 2.0}]})
    finally:
        session.close()
    assert (r1["version"], r2["version"]) == (1, 2) and saved_versions(rid) == [1, 2]
    assert r2["ref"] == f"runs:/{rid}/decisions/v2.yaml"
    tags = mlflow.get_run(rid).data.tags
    assert tags[LATEST_TAG] == "decisions/v2.yaml" and tags[HASH_TAG] == r2["hash"]
    assert tags["prefsculpt.decisions.v1.hash"] == r1["hash"] != r2["hash"]
    got = resolve_artifact(r2["ref"], tmp_path / "dl")
    assert decisions_hash(got) == r2["hash"] and yaml.safe_load(got.read_text())["audit_run_id"] == rid
    again = open_review(compose(f"review.audit_run=runs:/{rid}"))
    try:
        assert again.server.app.data["meta"]["decisions from"] == "decisions/v2.yaml"
        assert again.server.app.data["decisions"] == [{"concept": "latent:0", "action": "suppress",
                                                       "method": "score", "strength": 2.0}]
    finally:
        again.close()


def test_review_without_an_audit_says_what_to_do(mlflow_uri):
    from prefsculpt.stages.review import find_audit_run

    with pytest.raises(D.ReviewInputError, match=r"run the audit first \(mlflow run \. -e audit\)"):
        find_audit_run(compose())
    mlflow.set_experiment("prefsculpt")
    with mlflow.start_run(tags={"prefsculpt.stage": "train"}) as run:
        pass
    with pytest.raises(D.ReviewInputError, match="is a 'train' run, not an audit run"):
        find_audit_run(compose(f"review.audit_run={run.info.run_id}"))


def test_review_config_defaults():
    r = compose().review
    assert (r.audit_run, r.host, r.port, r.open_browser, r.serve_seconds) == (None, "127.0.0.1", 0, False, None)
    assert math.isclose(compose("review.serve_seconds=2.5").review.serve_seconds, 2.5)


def test_unlabelled_concepts_get_labels_from_the_sae_runs_top_contexts(mlflow_uri, tmp_path, monkeypatch):
    import pandas as pd

    from prefsculpt.stages import review as R

    rows = [dict(concept=f"latent:{c}", rank=i, value=5.0 - i, pair_id=f"p{i}", span="chosen", position=i,
                 token=" cat", left="the", right=" sat") for c in (20, 21) for i in range(3)]
    rid = log_tiny_audit(tmp_path, n_latents=40, top_contexts=pd.DataFrame(rows))
    monkeypatch.setattr(R, "LABELS_AT_START", 1)  # latent:20 at start (tested, first unlabelled), 21 when opened
    session = R.open_review(compose(f"review.audit_run={rid}"))
    try:
        table = session.server.app.data["table"]
        label = {r[0]: r[table["columns"].index("label")] for r in table["rows"]}
        assert label["latent:20"] == "' cat' — “the cat sat” in chosen 3/3" and label["latent:21"] is None
        detail = session.server.app.detail("latent:21")
        assert detail["label"]["phrase"] == "the cat sat" and detail["label"]["contexts_chosen"][0]["left"] == "the"
        assert session.server.app.detail("latent:0")["label"]["label"] == "' absolutely' · ' right'"  # the audit's
        assert session.server.app.detail("latent:nope") is None
    finally:
        session.close()
