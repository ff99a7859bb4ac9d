"""The promotion lock: which lock each tracking store gets, credentials never shown, a held lock
makes the second promote wait and then fail with a named error (file lock; PostgreSQL advisory lock
when the CI services are up)."""

import os
import threading
import time

import pytest

from prefsculpt.search.lock import PromoteLockError, lock_key, promotion_lock, redact, resolve_lock

PG = os.environ.get("PREFSCULPT_TEST_PG_URL")


def test_lock_follows_the_tracking_store(tmp_path):
    fb = tmp_path / "locks"
    pg = resolve_lock(None, "postgresql+psycopg://u:secret@db:5432/mlflow", None, "m", fb)
    assert pg.kind == "postgres" and pg.target == "postgresql://u:secret@db:5432/mlflow"
    assert "secret" not in pg.describe() and "db:5432/mlflow" in pg.describe()
    # an http server: the Optuna PostgreSQL every worker reaches; without one, a local file lock
    srv = resolve_lock(None, "http://127.0.0.1:5000", "postgresql://opt@db/optuna", "m", fb)
    assert (srv.kind, srv.target) == ("postgres", "postgresql://opt@db/optuna")
    local = resolve_lock(None, "https://mlflow.example", "sqlite:///o.db", "m", fb)
    assert local.kind == "file" and local.target.startswith(str(fb))
    sq = resolve_lock(None, f"sqlite:///{tmp_path}/mlflow.db", None, "m", fb)
    assert sq.kind == "file" and sq.target.startswith(f"{tmp_path}/mlflow.db.promote-")
    assert resolve_lock(str(tmp_path / "x.lock"), "http://h", None, "m", fb).target == str(tmp_path / "x.lock")
    assert resolve_lock(f"file://{tmp_path}/y.lock", "http://h", None, "m", fb).target == str(tmp_path / "y.lock")
    with pytest.raises(PromoteLockError, match="use a postgresql:// URL or a file path"):
        resolve_lock("redis://h", "http://h", None, "m", fb)
    # one key per model name, the same in every process
    assert lock_key("m") == lock_key("m") != lock_key("n") and -(2**63) <= lock_key("m") < 2**63
    assert redact("postgresql+psycopg://a:b@h:1/d") == "postgresql+psycopg://h:1/d"


def _hold_then_try(spec):
    held, release = threading.Event(), threading.Event()

    def holder():
        with promotion_lock(spec, 5):
            held.set()
            release.wait(30)

    th = threading.Thread(target=holder)
    th.start()
    assert held.wait(30)
    t0 = time.monotonic()
    with pytest.raises(PromoteLockError, match="still held by another promote after 1 s"):
        with promotion_lock(spec, 1):
            pass
    waited = time.monotonic() - t0
    release.set()
    th.join(30)
    with promotion_lock(spec, 5):  # free again once the holder is done
        pass
    return waited


def test_file_lock_is_exclusive_and_times_out_by_name(tmp_path):
    spec = resolve_lock(None, f"sqlite:///{tmp_path}/mlflow.db", None, "m", tmp_path)
    assert _hold_then_try(spec) >= 0.9


@pytest.mark.skipif(not PG, reason="PREFSCULPT_TEST_PG_URL unset: start the services with "
                                   "`eval \"$(.ci/services.sh start)\"` (CI always does)")
def test_postgres_advisory_lock_is_exclusive_and_times_out_by_name(tmp_path):
    spec = resolve_lock(None, "http://127.0.0.1:1", PG, f"lock-test-{os.getpid()}", tmp_path)
    assert spec.kind == "postgres"
    assert _hold_then_try(spec) >= 0.9


def test_unreachable_lock_database_fails_by_name(tmp_path):
    spec = resolve_lock("postgresql://nobody:pw@127.0.0.1:1/none", "http://h", None, "m", tmp_path)
    with pytest.raises(PromoteLockError, match=r"cannot reach the promotion lock database \(postgres lock on "
                                               r"postgresql://127\.0\.0\.1:1/none"):
        with promotion_lock(spec, 1):
            pass
