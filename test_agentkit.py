"""agentkit's tests: real SQLite files, real processes, real HTTP over loopback."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

import agentkit
from agentkit import AgentKit, BadInput, LeaseLost, LockBusy, StoreError

ROOT = Path(__file__).resolve().parent


# ───────────────────────────────────────── helpers ─────────────────────────────────────────


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or condition}")


def python(code: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    """Start a Python process running `code` (dedented) with agentkit importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        **popen,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """Wait for a process started by `python`, assert it succeeded, return its output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "agentkit.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count(kit: AgentKit, table: str) -> int:
    return kit.store.read(f"SELECT count(*) FROM {table}")[0][0]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


@pytest.fixture
def kit(db: Path):
    with AgentKit(db) as kit:
        yield kit


# ───────────────────────────────────────── store ─────────────────────────────────────────


@pytest.mark.parametrize("synchronous, level", [("normal", 1), ("full", 2)])
def test_every_pragma_reads_back_as_set(db: Path, synchronous: str, level: int) -> None:
    with AgentKit(db, synchronous=synchronous) as kit:
        for conn in (kit.store.connection(), threading_connection(kit)):
            assert conn.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
            assert conn.execute("PRAGMA synchronous").fetchall() == [(level,)]
            assert conn.execute("PRAGMA foreign_keys").fetchall() == [(1,)]
            assert conn.execute("PRAGMA busy_timeout").fetchall() == [(10000,)]
            assert conn.execute("PRAGMA user_version").fetchall() == [(len(agentkit.MIGRATIONS),)]


def threading_connection(kit: AgentKit) -> apsw.Connection:
    """The connection another thread gets (each thread has its own)."""
    found: list[apsw.Connection] = []
    t = threading.Thread(target=lambda: found.append(kit.store.connection()))
    t.start()
    t.join()
    assert found[0] is not kit.store.connection()
    return found[0]


def test_a_transaction_that_raises_leaves_no_rows(kit: AgentKit) -> None:
    with pytest.raises(RuntimeError), kit.store.transaction() as tx:
        tx.execute("INSERT INTO locks VALUES ('a', 'me', 1, 0)")
        raise RuntimeError("boom")
    assert count(kit, "locks") == 0


def test_a_nested_transaction_is_a_savepoint(kit: AgentKit) -> None:
    other = threading_connection(kit)
    with kit.store.transaction() as tx:
        tx.execute("INSERT INTO locks VALUES ('outer', 'me', 1, 0)")
        with pytest.raises(RuntimeError), kit.store.transaction() as inner:
            inner.execute("INSERT INTO locks VALUES ('inner', 'me', 1, 0)")
            raise RuntimeError("undo only the inner block")
        with kit.store.transaction() as inner:
            inner.execute("INSERT INTO locks VALUES ('kept', 'me', 1, 0)")
        # nothing is visible elsewhere before the outermost block commits
        assert other.execute("SELECT count(*) FROM locks").fetchall() == [(0,)]
    names = {n for (n,) in kit.store.read("SELECT name FROM locks")}
    assert names == {"outer", "kept"}


def test_a_busy_database_is_retried_then_refused(db: Path) -> None:
    with AgentKit(db) as holder, AgentKit(db) as waiter:
        waiter.store.busy_timeout = 0.3
        waiter.store.connection().setbusytimeout(50)
        with (
            holder.store.transaction(),
            pytest.raises(StoreError, match="busy"),
            waiter.store.transaction(),
        ):
            pass
        with waiter.store.transaction() as tx:  # free again: works
            tx.execute("INSERT INTO locks VALUES ('a', 'me', 1, 0)")


def test_migrations_are_idempotent_on_every_open(db: Path) -> None:
    for _ in range(3):
        with AgentKit(db) as kit:
            assert kit.store.version == len(agentkit.MIGRATIONS)
            assert {"jobs", "locks", "schedules"} <= set(kit.store.tables())


def test_a_new_migration_is_applied_once_in_order(db: Path, monkeypatch) -> None:
    AgentKit(db).close()
    extra = "CREATE TABLE later (x INTEGER); INSERT INTO later VALUES (1);"
    monkeypatch.setattr(agentkit, "MIGRATIONS", (*agentkit.MIGRATIONS, extra))
    for _ in range(2):
        with AgentKit(db) as kit:
            assert kit.store.read("SELECT count(*) FROM later") == [(1,)]
            assert kit.store.version == len(agentkit.MIGRATIONS)


def test_a_database_from_a_newer_agentkit_is_refused_untouched(db: Path) -> None:
    AgentKit(db).close()
    conn = apsw.Connection(str(db))
    conn.execute("PRAGMA journal_mode=DELETE").fetchall()
    conn.execute("PRAGMA user_version=999")
    conn.close()
    before = digest(db)
    with pytest.raises(StoreError, match=r"newer agentkit.*untouched"):
        AgentKit(db)
    assert digest(db) == before
    assert not Path(f"{db}-wal").exists()


def test_a_file_that_is_not_sqlite_is_refused_untouched(db: Path) -> None:
    db.write_text("these are my notes, not a database\n" * 100)
    before = digest(db)
    with pytest.raises(StoreError, match="not an SQLite database"):
        AgentKit(db)
    assert digest(db) == before


def test_memory_database_is_shared_by_the_threads_of_one_kit() -> None:
    with AgentKit(":memory:") as kit, AgentKit(":memory:") as other:
        kit.lock("a").acquire()
        assert threading_connection(kit).execute("SELECT count(*) FROM locks").fetchall() == [(1,)]
        assert count(other, "locks") == 0  # another kit's memory database is its own


def test_a_closed_kit_refuses_use(db: Path) -> None:
    kit = AgentKit(db)
    kit.close()
    with pytest.raises(StoreError, match="closed"):
        kit.lock("a").acquire()


# ───────────────────────────────────────── locks ─────────────────────────────────────────


def test_lock_plain_calls_and_fencing_tokens(kit: AgentKit) -> None:
    first = kit.lock("deploy", ttl=30).acquire()
    assert first.token == 1
    with pytest.raises(LockBusy, match="deploy"):
        kit.lock("deploy").acquire()
    first.renew()
    first.release()
    second = kit.lock("deploy").acquire()
    assert second.token == 2  # grows with every acquisition of the name
    assert kit.lock("other").acquire().token == 1


def test_renewing_or_releasing_a_lock_not_held_fails_and_changes_nothing(kit: AgentKit) -> None:
    holder = kit.lock("deploy", ttl=30).acquire()
    stranger = kit.lock("deploy")
    before = kit.store.read("SELECT * FROM locks")
    for call in (stranger.renew, stranger.release):
        with pytest.raises(LeaseLost):
            call()
    stranger.token = holder.token  # even with the right token, another owner cannot
    for call in (stranger.renew, stranger.release):
        with pytest.raises(LeaseLost):
            call()
    assert kit.store.read("SELECT * FROM locks") == before


def test_an_expired_lock_can_be_taken_by_anyone(kit: AgentKit, monkeypatch) -> None:
    old = kit.lock("deploy", ttl=5).acquire()
    later = time.time() + 6
    monkeypatch.setattr(agentkit, "now", lambda: later)
    new = kit.lock("deploy", ttl=5).acquire()
    assert new.token == old.token + 1
    with pytest.raises(LeaseLost):
        old.renew()
    with pytest.raises(LeaseLost):
        old.release()
    new.release()


def test_lock_as_context_manager_renews_and_releases(kit: AgentKit) -> None:
    with kit.lock("job", ttl=0.3) as lease:
        assert lease.token == 1
        first_expiry = kit.store.read("SELECT expires_at FROM locks")[0][0]
        wait_until(
            lambda: kit.store.read("SELECT expires_at FROM locks")[0][0] > first_expiry,
            what="a renewal",
        )
        with pytest.raises(LockBusy):
            kit.lock("job").acquire()
    assert kit.lock("job").acquire().token == 2


def test_lock_waits_for_a_holder_to_release(kit: AgentKit) -> None:
    holder = kit.lock("deploy").acquire()
    timer = threading.Timer(0.2, holder.release)
    timer.start()
    assert kit.lock("deploy", wait=10).acquire().token == 2
    timer.join()


def test_bad_lock_arguments_are_refused(kit: AgentKit) -> None:
    for kwargs in ({"ttl": 0}, {"ttl": -1}, {"wait": -1}, {"ttl": float("nan")}, {"ttl": "5"}):
        with pytest.raises(BadInput):
            kit.lock("a", **kwargs)
    with pytest.raises(BadInput):
        kit.lock("")
    assert count(kit, "locks") == 0


def test_four_processes_share_a_lock_without_overlap(tmp_path: Path, db: Path) -> None:
    AgentKit(db).close()
    counter, tokens = tmp_path / "counter", tmp_path / "tokens"
    counter.write_text("0")
    code = """
        import sys, agentkit
        db, counter, tokens = sys.argv[1:]
        kit = agentkit.AgentKit(db)
        for _ in range(200):
            with kit.lock("counter", ttl=30, wait=120) as lease:
                with open(counter) as f:
                    n = int(f.read())
                with open(counter, "w") as f:
                    f.write(str(n + 1))
                with open(tokens, "a") as f:
                    f.write(f"{lease.token}\\n")
    """
    procs = [python(code, str(db), str(counter), str(tokens)) for _ in range(4)]
    for proc in procs:
        finish(proc)
    assert counter.read_text() == "800"
    seen = [int(line) for line in tokens.read_text().split()]
    assert len(seen) == 800
    assert all(a < b for a, b in itertools.pairwise(seen)), "tokens must grow strictly"


def test_a_holder_killed_with_sigkill_loses_the_lock_after_its_ttl(db: Path) -> None:
    AgentKit(db).close()
    holder = python(
        """
        import sys, time, agentkit
        with agentkit.AgentKit(sys.argv[1]).lock("deploy", ttl=3) as lease:
            print(lease.token, flush=True)
            time.sleep(600)
        """,
        str(db),
    )
    token = int(holder.stdout.readline())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with AgentKit(db) as kit:
        with pytest.raises(LockBusy):
            kit.lock("deploy").acquire()  # its lease has not run out yet
        assert kit.lock("deploy", ttl=3, wait=30).acquire().token == token + 1


# ─────────────────────────────────────── doctor CLI ───────────────────────────────────────


def test_doctor_reports_a_healthy_database(kit: AgentKit, db: Path) -> None:
    kit.lock("a").acquire()
    out = cli("doctor", "--db", str(db))
    assert out.returncode == 0, out.stderr
    assert f"database   {db}" in out.stdout
    assert (
        f"schema     {len(agentkit.MIGRATIONS)} (latest {len(agentkit.MIGRATIONS)})" in out.stdout
    )
    assert "integrity  ok" in out.stdout
    assert "locks 1" in out.stdout


def test_doctor_fails_on_a_missing_or_foreign_file(tmp_path: Path) -> None:
    missing = cli("doctor", "--db", str(tmp_path / "nope.db"))
    assert missing.returncode == 1 and "no database at" in missing.stderr
    assert not (tmp_path / "nope.db").exists()
    other = tmp_path / "notes.txt"
    other.write_text("not a database\n" * 200)
    foreign = cli("--db", str(other), "doctor")
    assert foreign.returncode == 1 and "not an SQLite database" in foreign.stderr


def test_doctor_fails_on_a_corrupt_database(tmp_path: Path) -> None:
    db = tmp_path / "corrupt.db"
    conn = apsw.Connection(str(db))
    conn.execute("CREATE TABLE t (x TEXT); CREATE INDEX t_x ON t (x)")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) "
        "INSERT INTO t SELECT hex(randomblob(100)) FROM n"
    )
    conn.close()
    AgentKit(db).close()  # migrated; now break the index behind SQLite's back
    conn = apsw.Connection(str(db))
    conn.execute("PRAGMA writable_schema=ON")
    conn.execute(
        "UPDATE sqlite_schema SET sql = 'CREATE INDEX t_x ON t (x DESC)' WHERE name = 't_x'"
    )
    conn.close()
    out = cli("doctor", "--db", str(db))
    assert out.returncode == 1, out.stdout
    assert "integrity  ok" not in out.stdout


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("frobnicate").returncode == 2
    both = cli("--db", "x.db", "--app", "m:a", "doctor", cwd=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr
    bad_app = cli("doctor", "--app", "nosuchmodule:kit", cwd=tmp_path)
    assert bad_app.returncode == 2 and "cannot load --app" in bad_app.stderr
