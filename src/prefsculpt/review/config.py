"""Config schema of the review stage (field docs live here, once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReviewConfig:
    #: The audit run to review: a run id or ``runs:/<run id>`` (null = the latest finished audit run
    #: in ``tracking.experiment``).
    audit_run: str | None = None
    #: Address the page is served on; keep 127.0.0.1 (the page can write decisions to the audit run).
    host: str = "127.0.0.1"
    #: TCP port (0 = any free port; the URL is logged).
    port: int = 0
    #: Open the page in the default browser once it is served.
    open_browser: bool = False
    #: Stop serving after this many seconds (null = until Ctrl-C).
    serve_seconds: float | None = None
