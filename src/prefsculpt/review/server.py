"""The review page's HTTP server (stdlib ``http.server``; no network beyond the local socket).

Routes: ``GET /`` the page (``page.html``, inline CSS; ``GET /page.js`` its script; nothing is
fetched from elsewhere),
``GET /api/data`` the table and starting decisions, ``GET /api/concept?name=<concept>`` one
concept's detail, ``POST /api/decisions`` save. The caller passes the data and two callbacks; this
module knows nothing of MLflow.

Guards for a server that can write: it binds to the given host (127.0.0.1 by default); requests
must name that host (``Host`` header: no DNS rebinding); a save must carry the page's random token
in ``X-Review-Token`` (another site's page cannot read it, and a custom header cannot be sent
cross-site without a CORS preflight this server never grants); the page runs under a
Content-Security-Policy that allows only its own script file and its nonce'd inline style.
"""

from __future__ import annotations

import html
import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prefsculpt.audit.decisions import DecisionsError
from prefsculpt.review.data import error_lines

log = logging.getLogger(__name__)
MAX_BODY = 32 * 1024 * 1024


def page_file(name: str) -> str:
    """``page.html`` or ``page.js`` (package data)."""
    return resources.files("prefsculpt.review").joinpath(name).read_text(encoding="utf-8")


@dataclass
class ReviewApp:
    """What the server serves: the start data, a detail lookup and a save callback.

    ``save(submitted) -> dict`` validates and stores what the page posted, returning what the page
    shows (``ref``, ``version``, ``hash``, ...); it raises :class:`DecisionsError` for bad input.
    """

    data: dict[str, Any]
    detail: Callable[[str], dict[str, Any] | None]
    save: Callable[[Any], dict[str, Any]]
    title: str = "prefsculpt review"
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    #: One save at a time: versions are numbered by what is already stored.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def page(self) -> str:
        out = page_file("page.html")
        for key, val in (("TITLE", self.title), ("TOKEN", self.token), ("NONCE", self.nonce)):
            out = out.replace("{{" + key + "}}", html.escape(val, quote=True))
        return out

    def csp(self) -> str:
        n = self.nonce
        return (f"default-src 'none'; script-src 'self'; style-src 'nonce-{n}'; connect-src 'self'; "
                "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _handler(app: ReviewApp, allowed_hosts: set[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "prefsculpt-review"

        def log_message(self, fmt: str, *args: Any) -> None:  # route access logs to logging
            log.debug("review %s: " + fmt, self.client_address[0], *args)

        def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8"),
                       "application/json; charset=utf-8")

        def _host_ok(self) -> bool:
            if (self.headers.get("Host") or "").lower() in allowed_hosts:
                return True
            self._json(403, {"ok": False, "errors": ["unexpected Host header; open the URL the review logged"]})
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._host_ok():
                return
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                self._send(200, app.page().encode("utf-8"), "text/html; charset=utf-8",
                           {"Content-Security-Policy": app.csp()})
            elif url.path == "/page.js":
                self._send(200, page_file("page.js").encode("utf-8"), "text/javascript; charset=utf-8")
            elif url.path == "/api/data":
                self._json(200, app.data)
            elif url.path == "/api/concept":
                name = (parse_qs(url.query).get("name") or [""])[0]
                detail = app.detail(name)
                if detail is None:
                    self._json(404, {"ok": False, "errors": [f"no concept {name!r} in this audit"]})
                else:
                    self._json(200, detail)
            elif url.path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            else:
                self._json(404, {"ok": False, "errors": [f"no page {url.path}"]})

        def do_POST(self) -> None:  # noqa: N802
            if not self._host_ok():
                return
            if urlsplit(self.path).path != "/api/decisions":
                self._json(404, {"ok": False, "errors": [f"no endpoint {self.path}"]})
                return
            if not secrets.compare_digest(self.headers.get("X-Review-Token") or "", app.token):
                self._json(403, {"ok": False, "errors": ["missing or wrong page token; reload the page"]})
                return
            if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                self._json(415, {"ok": False, "errors": ["send the decisions as application/json"]})
                return
            size = int(self.headers.get("Content-Length") or 0)
            if not 0 < size <= MAX_BODY:
                self._json(413, {"ok": False, "errors": [f"body of {size} bytes; expected 1 to {MAX_BODY}"]})
                return
            try:
                submitted = json.loads(self.rfile.read(size).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._json(400, {"ok": False, "errors": [f"the page sent invalid JSON: {exc}"]})
                return
            try:
                with app.lock:
                    result = app.save(submitted)
            except DecisionsError as exc:
                log.info("review: decisions rejected: %s", exc)
                self._json(422, {"ok": False, "errors": error_lines(exc)})
                return
            except Exception as exc:  # a failed upload: the page must say so, not hang
                log.exception("review: saving the decisions failed")
                self._json(500, {"ok": False, "errors": [f"saving failed: {type(exc).__name__}: {exc}"]})
                return
            self._json(200, {"ok": True, **result})

    return Handler


class ReviewServer:
    """``ReviewServer(app, host, port)`` binds at once (port 0 = any free port; see :attr:`url`);
    :meth:`serve` blocks, :meth:`start` serves on a daemon thread, :meth:`close` stops."""

    def __init__(self, app: ReviewApp, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.httpd = ThreadingHTTPServer((host, int(port)), _handler(app, set()))
        self.httpd.daemon_threads = True
        bound_host, bound_port = self.httpd.server_address[:2]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        hosts = {f"{h}:{bound_port}" for h in (shown, str(bound_host), "localhost", "127.0.0.1")}
        self.httpd.RequestHandlerClass = _handler(app, hosts)
        self.url = f"http://{shown}:{bound_port}/"
        self._thread: threading.Thread | None = None

    def serve(self, seconds: float | None = None) -> None:
        """Serve until ``seconds`` have passed (None: until KeyboardInterrupt / :meth:`close`)."""
        if seconds is None:
            self.httpd.serve_forever(poll_interval=0.2)
            return
        timer = threading.Timer(float(seconds), self.httpd.shutdown)
        timer.daemon = True
        timer.start()
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            timer.cancel()

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="prefsculpt-review", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()
