"""One lock per registered model name around promotion's read-compare-set of the ``champion`` alias.

MLflow's ``set_registered_model_alias`` is a plain upsert, with no compare-and-set (STACK §8): two
promotes that both read "champion = v3", both pass their gates and both set the alias leave whichever
wrote last, possibly the worse one. So the promote stage holds this lock from registering its pick and
reading the champion until both aliases are set, and compares inside it.

Which lock (``promote.lock``; null = derived from the tracking URI):

- ``postgresql[+driver]://…`` tracking store: a session advisory lock (``pg_advisory_lock``) on that
  database, keyed by the model name. PostgreSQL releases it when the holder's connection drops, so a
  killed promote never leaves it held.
- ``http(s)://`` MLflow server: its database sits behind the server, which offers no lock. The lock
  goes to ``search.storage`` when that is PostgreSQL: the Optuna database every worker of the study
  already reaches, from any machine, so no new service or credential is needed. Otherwise a file lock
  under the cache folder, which serialises promotes on this machine only (a warning says so): set
  ``promote.lock`` to a ``postgresql://`` URL when promotes run on several machines.
- ``sqlite:///…`` store: a file lock beside the database file (SQLite locks single statements, not
  the read-then-write that spans several MLflow calls); a ``file:`` store: a file lock in its folder.
- ``promote.lock`` set to a path: a file lock there (a shared file system with working locks).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from prefsculpt.core.errors import UserError

log = logging.getLogger(__name__)
_PG = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)


class PromoteLockError(UserError):
    """The promotion lock could not be taken (unreachable database, timeout): nothing was promoted."""


@dataclass(frozen=True)
class LockSpec:
    #: "postgres" (advisory lock on ``target``, a libpq URL) or "file" (``target`` is the lock file).
    kind: str
    target: str
    #: Advisory-lock key (signed 64-bit), the same for every promote of one model name.
    key: int

    def describe(self) -> str:
        """For logs and tags: the URL without credentials."""
        where = redact(self.target) if self.kind == "postgres" else self.target
        return f"{self.kind} lock on {where} (key {self.key})"


def redact(url: str) -> str:
    """``scheme://user:pw@host/db`` -> ``scheme://host/db``: no credentials in logs or tags."""
    return re.sub(r"(://)[^/@]*@", r"\1", url)


def lock_key(model_name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` (bigint), from the model name."""
    digest = hashlib.sha256(f"prefsculpt.promote:{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _libpq(url: str) -> str:
    """SQLAlchemy's ``postgresql+psycopg://`` -> libpq's ``postgresql://`` (same host, db, options)."""
    return _PG.sub("postgresql://", url)


def resolve_lock(explicit: str | None, tracking_uri: str, search_storage: str | None, model_name: str,
                 fallback_dir: Path) -> LockSpec:
    """The lock for promoting ``model_name`` (see the module doc for the order)."""
    key = lock_key(model_name)
    name = f"promote-{key & 0xFFFFFFFFFFFFFFFF:016x}.lock"
    if explicit:
        if _PG.match(explicit):
            return LockSpec("postgres", _libpq(explicit), key)
        if explicit.startswith("file://"):
            explicit = explicit[len("file://"):]
        elif "://" in explicit:
            raise PromoteLockError(f"promote.lock={redact(explicit)!r}: use a postgresql:// URL or a file path")
        return LockSpec("file", str(Path(explicit).expanduser()), key)
    if _PG.match(tracking_uri):
        return LockSpec("postgres", _libpq(tracking_uri), key)
    if tracking_uri.startswith(("http://", "https://")):
        if search_storage and _PG.match(search_storage):
            return LockSpec("postgres", _libpq(search_storage), key)
        log.warning("promote: the tracking server %s offers no lock and search.storage is not PostgreSQL; "
                    "promotes are serialised on this machine only (set promote.lock=postgresql://… to serialise "
                    "promotes on several machines)", redact(tracking_uri))
        return LockSpec("file", str(fallback_dir / name), key)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return LockSpec("file", str(db.with_name(f"{db.name}.{name}")), key)
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        folder = Path(re.sub(r"^file:(//)?", "", tracking_uri)).expanduser()
        return LockSpec("file", str(folder / f".{name}"), key)
    log.warning("promote: no lock known for tracking URI %s; using a file lock on this machine",
                redact(tracking_uri))
    return LockSpec("file", str(fallback_dir / name), key)


@contextlib.contextmanager
def promotion_lock(spec: LockSpec, timeout_s: float) -> Iterator[None]:
    """Hold ``spec`` (waiting at most ``timeout_s``); :class:`PromoteLockError` if it cannot be had."""
    if spec.kind == "postgres":
        with _pg_lock(spec, timeout_s):
            yield
        return

    Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(spec.target, timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout as exc:
        raise PromoteLockError(f"promotion lock {spec.describe()} still held by another promote after "
                               f"{timeout_s:g} s; wait for it or raise promote.lock_timeout_s") from exc
    except OSError as exc:
        raise PromoteLockError(f"cannot create the promotion lock {spec.describe()}: {exc}; set promote.lock to a "
                               "writable path") from exc
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _pg_lock(spec: LockSpec, timeout_s: float) -> Iterator[None]:
    try:
        import psycopg  # optional: only for a PostgreSQL lock
    except ImportError as exc:
        raise PromoteLockError(f"promotion lock {spec.describe()} needs psycopg 3 (pip install 'psycopg[binary]')") from exc
    try:
        conn = psycopg.connect(spec.target, autocommit=True, connect_timeout=30)
    except psycopg.Error as exc:
        raise PromoteLockError(f"cannot reach the promotion lock database ({spec.describe()}): "
                               f"{type(exc).__name__}: {exc}") from exc
    try:
        try:
            # lock_timeout bounds the wait for the advisory lock (a heavyweight lock like any other).
            conn.execute(f"SET lock_timeout = {max(1, int(timeout_s * 1000))}")
            conn.execute("SELECT pg_advisory_lock(%s)", (spec.key,))
        except psycopg.errors.LockNotAvailable as exc:
            raise PromoteLockError(f"promotion lock {spec.describe()} still held by another promote after "
                                   f"{timeout_s:g} s; wait for it or raise promote.lock_timeout_s") from exc
        except psycopg.Error as exc:
            raise PromoteLockError(f"cannot take the promotion lock {spec.describe()}: {type(exc).__name__}: {exc}") from exc
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):  # closing the session releases it anyway
                conn.execute("SELECT pg_advisory_unlock(%s)", (spec.key,))
    finally:
        conn.close()
