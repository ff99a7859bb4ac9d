import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from prefsculpt.audit.labels import (
    ExplainSettings,
    build_labels,
    chat_url,
    explain_labels,
    label_string,
    validate_top_contexts,
)


def _row(concept, rank, value, pair, span, token, left="", right=""):
    return dict(concept=concept, rank=rank, value=value, pair_id=pair, span=span, position=rank,
                token=token, left=left, right=right)


@pytest.fixture
def top_contexts():
    rows = [
        _row("latent:3", 0, 9.0, "p1", "chosen", " absolutely", "You're", " right"),
        _row("latent:3", 1, 8.0, "p2", "chosen", " absolutely", "You are", " correct"),
        _row("latent:3", 2, 7.5, "p2", "chosen", " right", "absolutely", "."),
        _row("latent:3", 3, 7.0, "p3", "rejected", "You", "", "'re right"),
        _row("latent:3", 4, 1.0, "p4", "prompt", "PROMPTONLY", "", ""),
        _row("latent:7", 0, 5.0, "p5", "chosen", "\n", "###", "Answer"),
        _row("latent:7", 1, 4.0, "p6", "chosen", "\n", "- x", "- y"),
        _row("latent:8", 0, 3.0, "p5", "rejected", "✨", "", ""),
    ]
    return pd.DataFrame(rows)


def test_label_counts_tokens_per_side_and_ignores_prompt(top_contexts):
    labels = build_labels(top_contexts, n_tokens=3, n_contexts=3)
    lab = labels["latent:3"]
    assert lab.tokens_chosen[0] == (" absolutely", 2)
    assert [t for t, _ in lab.tokens_rejected] == ["You"]
    assert lab.label.startswith("' absolutely'")
    assert "PROMPTONLY" not in lab.label
    # one context per pair, strongest first: p2's second activation is not repeated
    assert [c.pair_id for c in lab.contexts_chosen] == ["p1", "p2"]
    assert labels["latent:7"].label == "'\\n'"  # whitespace stays visible


def test_groups_pool_members_and_unknown_concepts_label_themselves(top_contexts):
    labels = build_labels(top_contexts, concepts=["cluster:0", "named:emoji", "length"],
                          groups={"cluster:0": ["latent:7", "latent:8"]})
    assert labels["cluster:0"].tokens_chosen[0][0] == "\n"
    assert labels["cluster:0"].tokens_rejected[0][0] == "✨"
    assert labels["named:emoji"].label == "emoji"
    assert labels["length"].label == "length"


def test_integer_concepts_become_latent_names_and_missing_columns_error():
    df = pd.DataFrame([_row(12, 0, 1.0, "p", "chosen", "x")])
    assert validate_top_contexts(df)["concept"].tolist() == ["latent:12"]
    with pytest.raises(ValueError, match=r"lacks columns \['left'"):
        validate_top_contexts(df.drop(columns=["left"]))


def test_label_string_and_chat_url():
    assert label_string([" absolutely", "You"]) == "' absolutely' · 'You'"
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the "slow" client hangs up first: expected
        pass


class _Server:
    """A stdlib OpenAI-compatible stub on 127.0.0.1 that records what it was sent."""

    def __init__(self, mode="ok"):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if outer.mode == "slow":
                    time.sleep(1.5)
                if outer.mode == "500" or (outer.mode == "flaky" and len(outer.requests) == 1):
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error": "overloaded"}')
                    return
                if outer.mode == "401":
                    self.send_response(401)
                    self.end_headers()
                    self.wfile.write(b'{"error": "bad key"}')
                    return
                reply = {"choices": [{"message": {"content": "agreement\n with the user"}}]}
                if outer.mode == "garbage":
                    reply = {"unexpected": True}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.mode = mode
        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_explanations_call_endpoint_once_then_come_from_cache(server, top_contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    settings = ExplainSettings(server.url, "stub-model", api_key_env="MY_KEY", timeout_s=5, cache_dir=tmp_path)
    labels = build_labels(top_contexts)
    assert explain_labels(labels, ["latent:3"], settings).explained == 1
    assert labels["latent:3"].explanation == "agreement with the user"  # one line
    assert labels["latent:7"].explanation is None
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "stub-model"
    assert "[[ absolutely]]" in req["body"]["messages"][1]["content"]
    again = build_labels(top_contexts)
    explain_labels(again, ["latent:3"], settings)
    assert again["latent:3"].explanation == "agreement with the user"
    assert len(server.requests) == 1  # the second run was served from the on-disk cache


@pytest.mark.parametrize("mode,match,calls", [("401", "HTTP 401.*MY_KEY", 1), ("garbage", "choices", 1),
                                              ("slow", "did not answer within.*after 3 attempts", 3),
                                              ("500", "HTTP 500.*after 3 attempts", 3)])
def test_a_failing_endpoint_leaves_the_offline_labels_and_says_why(mode, match, calls, top_contexts, tmp_path, caplog):
    """Transient failures (timeout, 5xx) are retried, permanent ones (401, a bad payload) are not;
    either way the audit keeps its offline labels and the outcome names the error."""
    s = _Server(mode)
    try:
        settings = ExplainSettings(s.url, "m", api_key_env="MY_KEY", timeout_s=0.5, cache_dir=tmp_path,
                                   retries=2, backoff_s=0.01)
        labels = build_labels(top_contexts)
        offline = labels["latent:3"].label
        out = explain_labels(labels, ["latent:3", "latent:7"], settings)
        assert out.explained == 0 and out.failed == 2 and re.search(match, out.error)
        assert len(s.requests) == calls  # stopped at the first concept that failed
        assert labels["latent:3"].explanation is None and labels["latent:3"].label == offline
        assert "keep their offline" in caplog.text
        assert not list(tmp_path.iterdir())  # nothing cached from a failure
    finally:
        s.close()


def test_a_500_then_success_is_retried_with_backoff(top_contexts, tmp_path):
    s = _Server("flaky")
    try:
        settings = ExplainSettings(s.url, "m", timeout_s=5, cache_dir=tmp_path, retries=3, backoff_s=0.2)
        labels = build_labels(top_contexts)
        t0 = time.perf_counter()
        out = explain_labels(labels, ["latent:3"], settings)
        assert time.perf_counter() - t0 >= 0.2  # waited backoff_s before the retry
        assert out.explained == 1 and out.error is None and len(s.requests) == 2
        assert labels["latent:3"].explanation == "agreement with the user"
    finally:
        s.close()


def test_unreachable_endpoint_names_the_url(top_contexts):
    settings = ExplainSettings("http://127.0.0.1:9", "m", timeout_s=1, retries=1, backoff_s=0.01)
    out = explain_labels(build_labels(top_contexts), ["latent:3"], settings)
    assert re.search(r"127\.0\.0\.1:9/v1/chat/completions", out.error)


# ---------------------------------------------------------------- characteristic phrase (planted)


def _planted_dot_latent():
    """latent:5 fires on '.' in both sides; on the chosen side, always right after ', not <word>'."""
    chosen = [("It is a feature, not", "bugs"), ("Think of it as a plan, not", "promises"),
              ("This is a question of taste, not", "rules"), ("Call it a draft, not", "verdicts"),
              ("It is an estimate, not", "guarantees"), ("We want progress, not", "perfection")]
    after = [" Then", " So we", " Next,", "\n\nFirst", " If you", " Try it"]
    rejected = [("The answer is", " 42"), ("Water boils at 100 degrees at sea", " level"),
                ("Paris is the capital of", " France"), ("Use a sorted list and", " binary search")]
    rows = []
    for i, (left, last) in enumerate(chosen):
        rows.append(_row("latent:5", i, 9.0 - i * 0.1, f"c{i}", "chosen", ".", f"{left} {last}", after[i]))
    for i, (left, last) in enumerate(rejected):
        rows.append(_row("latent:5", 10 + i, 5.0 - i * 0.1, f"r{i}", "rejected", ".", left + last, after[-1 - i]))
    # a token-level latent with no recurring context: its phrase stays None
    rows += [_row("latent:6", 0, 3.0, "c0", "chosen", " cat", "the", " sat"),
             _row("latent:6", 1, 2.0, "c1", "chosen", " cat", "a big", " ran")]
    return pd.DataFrame(rows)


def test_dot_latent_gets_its_phrase_contrasted_with_the_other_side():
    labels = build_labels(_planted_dot_latent(), directions={"latent:5": 1})
    lab = labels["latent:5"]
    # position -3 ',' and -2 'not' agree in all 6 chosen windows; -1 varies -> X; 0 is the firing '.'
    assert lab.phrase == "…, not X."
    assert lab.phrase_counts == {"side": "chosen", "other": "rejected", "k_side": 6, "n_side": 6,
                                 "k_other": 0, "n_other": 4}
    assert lab.label == "'.' — “…, not X.” in chosen 6/6, rejected 0/4"
    assert [c.pair_id for c in lab.phrase_contexts] == ["c0", "c1", "c2"]
    assert labels["latent:6"].phrase is None and labels["latent:6"].label == "' cat'"


def test_phrase_side_follows_the_direction_and_feeds_the_llm_prompt():
    from prefsculpt.audit.labels import explain_messages

    # read as a latent favouring the rejected side, the rejected windows share no phrase
    flipped = build_labels(_planted_dot_latent(), directions={"latent:5": -1})["latent:5"]
    assert flipped.phrase is None
    lab = build_labels(_planted_dot_latent())["latent:5"]  # no direction: the side with more windows
    assert lab.phrase == "…, not X."
    user = explain_messages(lab)[1]["content"]
    assert 'Recurring phrase around the firing token (X = varies): "…, not X." in 6 of 6 chosen' in user
    assert "- (chosen response) It is a feature, not bugs[[.]] Then" in user


def test_phrase_keeps_the_longest_pattern_nearly_as_specific_as_the_best():
    from prefsculpt.audit.phrases import characteristic_phrase, pieces

    assert pieces(" you're right.") == [("you", True), ("'", False), ("re", False), ("right", True), (".", False)]
    side = [("I think", " you", "'re absolutely right"), ("Well", " you", "'re absolutely correct"),
            ("So", " you", "'re absolutely right")]
    other = [("Then", " you", " should check")]
    ph = characteristic_phrase(side, other, k=3)
    # ' you' alone matches the other side too (contrast 0); "you're absolutely" matches only chosen
    assert ph.text == "… you're absolutely…" and (ph.k_side, ph.k_other) == (3, 0)
    assert characteristic_phrase([], other) is None
