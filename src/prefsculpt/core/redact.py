"""Keep credentials out of what a run records, and keys/values inside MLflow's limits. Pure functions.

A configuration can carry secrets inside URIs: ``tracking.uri=postgresql://user:pw@host/db``,
``search.storage=mysql://root:pw@db/optuna``, ``data.path=s3://KEY:SECRET@bucket/pairs.jsonl``,
or a signed URL's ``?X-Amz-Signature=...``. :func:`redact_text` replaces the password of every
``scheme://user:password@host`` (the user name is kept: it says which account, and is not secret)
and the value of secret-looking query parameters with ``***``, wherever they sit in a string (a
YAML dump, an error message). :func:`mlflow_params` / :func:`mlflow_tags` apply it to every value,
and also make keys and values acceptable to MLflow, which rejects a key with other characters than
letters, digits, ``_ - . /`` and space, a key a path normalisation would change (``a//b``, ``/a``,
``a/..``), or one over 250 characters, and caps values (params 6,000, tags 8,000 characters).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
#: MLflow's limits (mlflow.utils.validation: MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH).
MAX_KEY_CHARS = 250
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000

# scheme://user:password@host. The password may itself hold '/', ':' or '@' (AWS secrets hold '/'),
# so the '@' taken is the last one before the host: no further '@' up to the next '/', '?', '#' or
# whitespace. A port-and-path with an '@' in it is over-redacted, which is the safe direction.
_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.\-])(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\"'<>]*:)"
    r"(?P<pw>[^\s]*?)(?P<at>@)(?![^\s@/?#]*@)"
)
_SECRET_QUERY = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|pass|secret|client_secret|token|access_token|auth|"
    r"api[_-]?key|access[_-]?key|secret[_-]?key|key|sig|signature|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token|sslpassword)=)(?P<v>[^&#\s\"']+)",
    re.IGNORECASE,
)
_BAD_KEY_CHAR = re.compile(r"[^A-Za-z0-9_\-. /]")


def redact_text(text: str) -> str:
    """``text`` with every URI password and secret query value replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}{REDACTED if m['pw'] else ''}{m['at']}", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['head']}{REDACTED}", text)


def redact_value(value: Any) -> Any:
    """:func:`redact_text` applied to every string inside nested dicts/lists (other values as is)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def mlflow_key(key: Any) -> str:
    """A key MLflow accepts: other characters become ``_``, empty / ``.`` / ``..`` path segments and
    leading or trailing ``/`` go, and a key over 250 characters is cut and suffixed with a digest."""
    raw = str(key)
    k = _BAD_KEY_CHAR.sub("_", raw)
    segments = [s if s not in (".", "..") else "_" * len(s) for s in k.split("/") if s]
    k = "/".join(segments) or "_"
    if len(k) > MAX_KEY_CHARS:
        k = f"{k[: MAX_KEY_CHARS - 9]}_{_digest(raw)}"
    return k


def clip(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, saying so at its end."""
    if len(value) <= limit:
        return value
    note = f"…[cut from {len(value)} chars]"
    return value[: limit - len(note)] + note


def _safe(items: Mapping[Any, Any], limit: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in items.items():
        k = mlflow_key(key)
        if k in out:  # two keys that differ only in rejected characters: keep both, distinguishably
            k = mlflow_key(f"{k[: MAX_KEY_CHARS - 9]}_{_digest(str(key))}")
        out[k] = clip(redact_text(value if isinstance(value, str) else str(value)), limit)
    return out


def mlflow_params(params: Mapping[Any, Any]) -> dict[str, str]:
    """Params ready for ``mlflow.log_params``: keys sanitised, values redacted and within 6,000 chars."""
    return _safe(params, MAX_PARAM_CHARS)


def mlflow_tags(tags: Mapping[Any, Any]) -> dict[str, str]:
    """Tags ready for ``mlflow.set_tags``: keys sanitised, values redacted and within 8,000 chars."""
    return _safe(tags, MAX_TAG_CHARS)
