"""Fault injection for the fault-tolerance tests: ``PREFSCULPT_FAULT=<stage>:<point>`` makes the
process SIGKILL itself when it reaches that named point, as a power cut or the OOM killer would.

Points (each reached once per stage run or per unit of work, never inside a per-token loop):
``<stage>:start`` (the stage's run is open), ``prepare:logged`` (splits uploaded, before the
metrics), ``sae:activations`` (activations collected), ``sae:shard`` (after each encoder shard is
written), ``audit:scores`` (the sae run's scores downloaded), ``train:checkpoint`` (after each
``last.ckpt`` save), ``search:trial`` (as each trial starts, before its run opens),
``<stage>:end`` (the work is done, the run not yet closed).
``PREFSCULPT_FAULT_AFTER=n`` kills at the n-th time the point is reached (default 1).
"""

from __future__ import annotations

import collections
import logging
import os
import signal

ENV = "PREFSCULPT_FAULT"
ENV_AFTER = "PREFSCULPT_FAULT_AFTER"
_seen: collections.Counter[str] = collections.Counter()

log = logging.getLogger(__name__)


def fault_point(stage: str, point: str) -> None:
    """SIGKILL this process if ``PREFSCULPT_FAULT`` names ``stage:point`` (no-op otherwise)."""
    want = os.environ.get(ENV)
    if not want or want != f"{stage}:{point}":
        return
    _seen[want] += 1
    if _seen[want] >= int(os.environ.get(ENV_AFTER, "1")):
        log.warning("fault injection: SIGKILL at %s", want)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
