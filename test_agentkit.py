"""agentkit's tests: real SQLite files, real processes, real HTTP over loopback."""

from __future__ import annotations

import asyncio
import calendar
import enum
import functools
import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import apsw
import pydantic
import pytest

import agentkit
from agentkit import AgentKit, BadInput, LeaseLost, LockBusy, StoreError
from testkit import Database, NewDatabase, count, created, rows, take_over, wait_until

ROOT = Path(__file__).resolve().parent


# ───────────────────────────────────────── helpers ─────────────────────────────────────────


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


@pytest.fixture
def kit(db: Database):
    with AgentKit(db) as kit:
        yield kit


# ───────────────────────────────────────── store ─────────────────────────────────────────


@pytest.mark.sqlite_only("SQLite's pragmas")
@pytest.mark.parametrize("synchronous, level", [("normal", 1), ("full", 2)])
def test_every_pragma_reads_back_as_set(db: Database, synchronous: str, level: int) -> None:
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
    with pytest.raises(RuntimeError), kit.store.transaction():
        kit.store.acquire_lock("a", "me", 30)
        raise RuntimeError("boom")
    assert count(kit, "locks") == 0


def test_a_nested_transaction_is_a_savepoint(kit: AgentKit) -> None:
    other = threading_connection(kit)
    with kit.store.transaction():
        kit.store.acquire_lock("outer", "me", 30)
        with pytest.raises(RuntimeError), kit.store.transaction():
            kit.store.acquire_lock("inner", "me", 30)
            raise RuntimeError("undo only the inner block")
        with kit.store.transaction():
            kit.store.acquire_lock("kept", "me", 30)
        # nothing is visible elsewhere before the outermost block commits
        assert other.execute("SELECT count(*) FROM locks").fetchall() == [(0,)]
    assert set(rows(kit, "locks", "name")) == {"outer", "kept"}


@pytest.mark.sqlite_only("SQLite's busy timeout")
def test_a_busy_database_is_retried_then_refused(db: Database) -> None:
    with AgentKit(db) as holder, AgentKit(db) as waiter:
        waiter.store.busy_timeout = 0.3
        waiter.store.connection().setbusytimeout(50)
        with (
            holder.store.transaction(),
            pytest.raises(StoreError, match="busy"),
            waiter.store.transaction(),
        ):
            pass
        with waiter.store.transaction():  # free again: works
            assert waiter.store.acquire_lock("a", "me", 30) == 1


def test_migrations_are_idempotent_on_every_open(db: Database) -> None:
    for _ in range(3):
        with AgentKit(db) as kit:
            assert kit.store.version == len(agentkit.MIGRATIONS)
            assert {"jobs", "locks", "schedules"} <= set(kit.store.tables())


def test_a_new_migration_is_applied_once_in_order(db: Database, monkeypatch) -> None:
    AgentKit(db).close()
    extra = "CREATE TABLE later (x INTEGER); INSERT INTO later VALUES (1);"
    monkeypatch.setattr(agentkit, "MIGRATIONS", (*agentkit.MIGRATIONS, extra))
    for _ in range(2):
        with AgentKit(db) as kit:
            assert count(kit, "later") == 1
            assert kit.store.version == len(agentkit.MIGRATIONS)


@pytest.mark.sqlite_only("an SQLite file's user_version")
def test_a_database_from_a_newer_agentkit_is_refused_untouched(db: Database) -> None:
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


@pytest.mark.sqlite_only("a file that is not SQLite")
def test_a_file_that_is_not_sqlite_is_refused_untouched(db: Database) -> None:
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


def test_a_closed_kit_refuses_use(db: Database) -> None:
    kit = AgentKit(db)
    kit.close()
    with pytest.raises(StoreError, match="closed"):
        kit.lock("a").acquire()


def test_close_stops_running_workers_after_their_jobs(db: Database) -> None:
    kit = AgentKit(db)
    started, release = threading.Event(), threading.Event()

    @kit.task
    def slow(payload: None) -> str:
        started.set()
        assert release.wait(20)
        return "finished"

    job_id = kit.enqueue("slow")
    errors: list[BaseException] = []

    def guarded(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # the test reports it
                errors.append(e)

        return threading.Thread(target=run, daemon=True)

    worker = guarded(lambda: kit.work(concurrency=2))  # no stop event: only close ends it
    worker.start()
    assert started.wait(20)
    closer = guarded(kit.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close returned while a job was still running"
    release.set()
    closer.join(20)
    worker.join(20)
    assert not closer.is_alive() and not worker.is_alive() and errors == []
    with pytest.raises(StoreError, match="closed"):
        kit.job(job_id)
    with AgentKit(db) as again:
        assert (again.job(job_id).state, again.job(job_id).result) == ("done", "finished")


def test_close_from_inside_a_job_is_refused_and_changes_nothing(kit: AgentKit) -> None:
    @kit.task
    def closer(payload: None) -> str:
        try:
            kit.close()
        except BadInput as e:
            return str(e)
        return "closed"

    job_id = kit.enqueue("closer")
    assert drained(kit) == 1
    assert kit.job(job_id).result == "close() would wait for the job it is called from"
    assert kit.job(kit.enqueue("closer")).state == "queued"  # the kit still works


def test_close_while_serving_returns_after_serve_has_stopped(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentkit")
    kit = AgentKit(db)
    ready = threading.Event()
    serving = threading.Thread(
        target=lambda: kit.serve(http="127.0.0.1:0", ready=lambda url: ready.set()), daemon=True
    )
    serving.start()
    assert ready.wait(20)
    kit.close()
    # serve stopped its adapters and server (and said so) before the store was closed
    assert "stopped" in [r.getMessage() for r in caplog.records]
    serving.join(10)
    assert not serving.is_alive()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


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
    before = kit.store.rows("locks")
    for call in (stranger.renew, stranger.release):
        with pytest.raises(LeaseLost):
            call()
    stranger.token = holder.token  # even with the right token, another owner cannot
    for call in (stranger.renew, stranger.release):
        with pytest.raises(LeaseLost):
            call()
    assert kit.store.rows("locks") == before


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
        [first_expiry] = rows(kit, "locks", "expires_at")
        wait_until(
            lambda: rows(kit, "locks", "expires_at")[0] > first_expiry,
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


def test_four_processes_share_a_lock_without_overlap(tmp_path: Path, db: Database) -> None:
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


def test_a_holder_killed_with_sigkill_loses_the_lock_after_its_ttl(db: Database) -> None:
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


def test_doctor_reports_a_healthy_database(kit: AgentKit, db: Database) -> None:
    kit.lock("a").acquire()
    out = cli("doctor", "--db", str(db))
    assert out.returncode == 0, out.stderr
    assert f"database   {kit.store.path}" in out.stdout
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


# ─────────────────────────────────────── job queue ───────────────────────────────────────


def drained(kit: AgentKit) -> int:
    return kit.work(until_idle=True)


def test_a_job_runs_once_with_its_payload_and_keeps_its_result(kit: AgentKit) -> None:
    seen = []

    @kit.task
    def add(payload: dict, ctx: agentkit.JobContext) -> int:
        seen.append((ctx.job_id, ctx.attempt))
        return payload["a"] + payload["b"]

    job_id = kit.enqueue("add", {"a": 1, "b": 2})
    assert kit.job(job_id).state == "queued"
    assert drained(kit) == 1
    job = kit.job(job_id)
    assert (job.state, job.result, job.attempts) == ("done", 3, 1)
    assert seen == [(job_id, 1)]
    assert drained(kit) == 0


def test_the_same_key_enqueued_twice_is_one_job(kit: AgentKit) -> None:
    kit.task(lambda payload: None, name="report")
    first = kit.enqueue("report", {"day": 1}, key="report-2026-11-21")
    second = kit.enqueue("report", {"day": 2}, key="report-2026-11-21")
    assert first == second
    assert count(kit, "jobs") == 1
    assert kit.job(first).payload == {"day": 1}


def test_enqueue_many_keeps_order_and_priority_comes_first(kit: AgentKit) -> None:
    order = []
    kit.task(lambda payload: order.append(payload), name="note")
    ids = kit.enqueue_many("note", [1, 2, 3])
    kit.enqueue("note", "urgent", priority=5)
    kit.enqueue("note", "later", delay=3600)
    assert ids == sorted(ids, key=lambda i: int(i[4:]))
    drained(kit)
    assert order == ["urgent", 1, 2, 3]
    assert [j.state for j in kit.jobs("queued")] == ["queued"]


def test_bad_input_is_refused_and_writes_nothing(kit: AgentKit) -> None:
    kit.task(lambda payload: None, name="t")
    bad_calls = [
        lambda: kit.enqueue("nope", {}),
        lambda: kit.enqueue("t", {"x": object()}),
        lambda: kit.enqueue("t", {"x": float("nan")}),
        lambda: kit.enqueue("t", delay=-1),
        lambda: kit.enqueue("t", priority="high"),
        lambda: kit.enqueue("t", retries=-1),
        lambda: kit.enqueue("t", key=""),
        lambda: kit.enqueue_many("t", [1, {2}]),
        lambda: kit.schedule("s", task="t", cron="61 * * * *"),
        lambda: kit.schedule("s", task="t", cron="0 9 * * *", tz="Mars/Olympus"),
        lambda: kit.schedule("s", task="t", cron="0 9 * * *", tz="../etc/passwd"),
        lambda: kit.schedule("s", task="nope", every=60),
        lambda: kit.schedule("s", task="t", every=0.5),
        lambda: kit.schedule("s", task="t", every=60, cron="* * * * *"),
        lambda: kit.schedule("s", task="t", every=60, payload={1, 2}),
        lambda: kit.job("job_x"),
        lambda: kit.job("job_999"),
        lambda: kit.cancel("turn_1"),
    ]
    for call in bad_calls:
        with pytest.raises(BadInput) as error:
            call()
        assert str(error.value)
    assert count(kit, "jobs") == 0 and count(kit, "schedules") == 0
    with pytest.raises(BadInput, match="no task named 'nope'"):
        kit.enqueue("nope")
    assert kit.job(kit.enqueue("nope", strict=False)).state == "queued"


def test_a_failing_task_is_dead_after_retries_plus_one_attempts(kit: AgentKit, monkeypatch) -> None:
    clock = [time.time()]
    monkeypatch.setattr(agentkit, "now", lambda: clock[0])

    @kit.task(retries=3, backoff=10)
    def flaky(payload: dict) -> None:
        raise RuntimeError("service down")

    failed = []
    kit.on("job_failed")(lambda e: failed.append((e.job_id, e.name, e.state, e.error)))

    job_id = kit.enqueue("flaky")
    delays = []
    for attempt in range(1, 5):
        assert drained(kit) == 1
        job = kit.job(job_id)
        assert job.attempts == attempt
        assert job.last_error == "RuntimeError: service down"
        if attempt <= 3:
            assert job.state == "queued"
            delays.append(job.run_at - clock[0])
            assert drained(kit) == 0  # not before its backoff
            clock[0] = job.run_at
    assert kit.job(job_id).state == "dead"
    assert failed == [(job_id, "flaky", "dead", "RuntimeError: service down")]
    for attempt, delay in enumerate(delays, start=1):
        base = 10 * 2 ** (attempt - 1)
        assert base <= delay <= base * 1.25
    assert drained(kit) == 0
    retried = kit.retry(job_id)
    assert (retried.state, retried.attempts) == ("queued", 0)


def test_fail_ends_a_job_at_once_and_cancel_retry_rules(kit: AgentKit) -> None:
    @kit.task(retries=5)
    def refuse(payload: dict) -> None:
        raise agentkit.Fail("bad request")

    job_id = kit.enqueue("refuse")
    drained(kit)
    job = kit.job(job_id)
    assert (job.state, job.attempts, job.last_error) == ("failed", 1, "Fail: bad request")
    with pytest.raises(BadInput, match="failed, not queued"):
        kit.cancel(job_id)
    queued = kit.enqueue("refuse")
    assert kit.cancel(queued).state == "cancelled"
    with pytest.raises(BadInput, match="cancelled, not dead or failed"):
        kit.retry(queued)
    assert drained(kit) == 0


def test_retry_tries_a_job_again_after_the_delay_it_names(kit: AgentKit, monkeypatch) -> None:
    clock = [time.time()]
    monkeypatch.setattr(agentkit, "now", lambda: clock[0])

    @kit.task(retries=1, backoff=1)
    def rate_limited(payload: None) -> None:
        raise agentkit.Retry("the service asks to wait", after=90)

    job_id = kit.enqueue("rate_limited")
    assert drained(kit) == 1
    job = kit.job(job_id)
    assert (job.state, job.attempts, job.last_error) == ("queued", 1, "the service asks to wait")
    assert job.run_at == clock[0] + 90  # its own delay, not the backoff of 1 s
    assert drained(kit) == 0
    clock[0] = job.run_at
    assert drained(kit) == 1
    assert kit.job(job_id).state == "dead"  # still bounded by retries
    for after in (-1, float("nan"), "soon"):
        with pytest.raises(BadInput, match="after must be a number of seconds"):
            agentkit.Retry("wait", after=after)

    @kit.task
    def confused(payload: None) -> None:
        raise agentkit.Retry("wait", after=-1)

    job = kit.job(kit.enqueue("confused"))
    clock[0] += 1
    drained(kit)
    job = kit.job(job.id)
    assert (job.state, job.attempts) == ("failed", 1)  # a refusal is not retried
    assert job.last_error == "BadInput: after must be a number of seconds >= 0, not -1"


def test_async_tasks_and_results_that_are_not_json(kit: AgentKit) -> None:
    @kit.task
    async def later(payload: int) -> int:
        await asyncio_sleep0()
        return payload * 2

    @kit.task
    def opaque(payload: None) -> object:
        return object()

    a, b = kit.enqueue("later", 21), kit.enqueue("opaque")
    drained(kit)
    assert kit.job(a).result == 42
    assert kit.job(b).state == "failed"
    assert "not JSON-serialisable" in kit.job(b).last_error


async def asyncio_sleep0() -> None:
    await asyncio.sleep(0)


def test_a_task_past_its_timeout_is_retried_and_its_late_result_refused(kit: AgentKit) -> None:
    release = threading.Event()
    calls = []

    @kit.task(timeout=0.2, retries=1, backoff=0)
    def stuck(payload: None, ctx: agentkit.JobContext) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            release.wait(30)
        return f"attempt {ctx.attempt}"

    job_id = kit.enqueue("stuck")
    worker = agentkit.Worker(kit.queue, concurrency=2, lease=0.3)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop})
    thread.start()
    wait_until(lambda: kit.job(job_id).state == "done", what="the retry to finish")
    release.set()
    wait_until(lambda: worker.done == 2, what="the stuck attempt to return")
    stop.set()
    thread.join()
    job = kit.job(job_id)
    assert (job.result, job.attempts, calls) == ("attempt 2", 2, [1, 2])


def test_heartbeat_extends_the_lease_and_reports_loss(kit: AgentKit) -> None:
    leases = []

    @kit.task
    def beat(payload: None, ctx: agentkit.JobContext) -> None:
        leases.extend(rows(kit, "jobs", "lease_until"))
        ctx.heartbeat()
        leases.extend(rows(kit, "jobs", "lease_until"))
        take_over(kit, "beat")
        with pytest.raises(LeaseLost):
            ctx.heartbeat()

    kit.enqueue("beat")
    drained(kit)
    assert leases[1] > leases[0]


def test_jobs_with_the_same_target_never_run_at_once(kit: AgentKit) -> None:
    active: dict[str, int] = {}
    overlaps = []
    guard = threading.Lock()

    @kit.task
    def turn(payload: dict) -> None:
        with guard:
            active[payload["thread"]] = active.get(payload["thread"], 0) + 1
            overlaps.append(active[payload["thread"]])
        time.sleep(0.002)
        with guard:
            active[payload["thread"]] -= 1

    for i in range(60):
        thread = f"t{i % 3}"
        kit.enqueue("turn", {"thread": thread}, target=thread)
    assert kit.work(concurrency=6, until_idle=True) == 60
    assert max(overlaps) == 1


def test_four_processes_drain_twenty_thousand_jobs_exactly_once(
    tmp_path: Path, db: Database
) -> None:
    with AgentKit(db) as kit:
        kit.task(lambda payload: None, name="record")
        for start in range(0, 20_000, 5_000):
            kit.enqueue_many("record", list(range(start, start + 5_000)))
    code = """
        import sys, agentkit
        db, out = sys.argv[1:]
        kit = agentkit.AgentKit(db)
        seen = []
        @kit.task
        def record(payload, ctx):
            seen.append(ctx.job_id)
        kit.work(until_idle=True)
        with open(out, "w") as f:
            f.write("\\n".join(seen))
    """
    outs = [tmp_path / f"seen{i}" for i in range(4)]
    for proc in [python(code, str(db), str(out)) for out in outs]:
        finish(proc)
    seen = [line for out in outs for line in out.read_text().split()]
    assert len(seen) == 20_000 and len(set(seen)) == 20_000
    with AgentKit(db) as kit:
        assert kit.store.job_counts() == {"done": 20_000}


def test_a_worker_killed_mid_job_is_replaced_and_its_late_result_refused(db: Database) -> None:
    with AgentKit(db) as kit:
        kit.task(lambda payload: None, name="slow")
        job_id = kit.enqueue("slow", {"n": 1})
    victim = python(
        """
        import sys, time, agentkit
        kit = agentkit.AgentKit(sys.argv[1], lease=1.0)
        @kit.task
        def slow(payload, ctx):
            print(ctx.job_id, flush=True)
            time.sleep(600)
        kit.work()
        """,
        str(db),
    )
    assert victim.stdout.readline().strip() == job_id
    with AgentKit(db) as kit:
        [(owner, attempt)] = rows(kit, "jobs", "owner", "attempts")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kit.task(lambda payload: "finished by the survivor", name="slow")
        wait_until(lambda: drained(kit) == 1, what="the lease to run out")
        job = kit.job(job_id)
        assert (job.state, job.attempts, job.result) == ("done", 2, "finished by the survivor")
        late = agentkit.Claimed(agentkit.job_rowid(job_id), "slow", {"n": 1}, attempt, 3, 1.0, None)
        assert kit.queue.finish(owner, [(late, "ok", '"late"')]) == {}  # refused
        assert kit.job(job_id).result == "finished by the survivor"


def test_an_idle_worker_wakes_for_a_job_from_another_process(db: Database) -> None:
    with AgentKit(db) as kit:
        done = threading.Event()
        kit.task(lambda payload: done.set(), name="ping")
        stop = threading.Event()
        worker = threading.Thread(target=kit.work, kwargs={"stop": stop})
        worker.start()
        finish(
            python(
                """
                import sys, agentkit
                agentkit.AgentKit(sys.argv[1]).enqueue("ping", strict=False)
                """,
                str(db),
            )
        )
        assert done.wait(30)
        stop.set()
        worker.join()


def test_jobs_cli_lists_shows_and_retries(kit: AgentKit, db: Database) -> None:
    kit.task(lambda payload: 1 / 0, name="broken", retries=0)
    job_id = kit.enqueue("broken")
    drained(kit)
    listing = cli("jobs", "--db", str(db), "--state", "dead")
    assert listing.returncode == 0 and job_id in listing.stdout
    assert "ZeroDivisionError" in listing.stdout
    shown = cli("jobs", "show", job_id, "--db", str(db))
    assert shown.returncode == 0 and "state        dead" in shown.stdout
    retried = cli("jobs", "retry", job_id, "--db", str(db))
    assert retried.returncode == 0 and "state        queued" in retried.stdout
    again = cli("jobs", "retry", job_id, "--db", str(db))
    assert again.returncode == 2 and "queued, not dead or failed" in again.stderr
    assert cli("jobs", "show", "--db", str(db)).returncode == 2


# ─────────────────────────────────────── schedules ───────────────────────────────────────


def calendar_utc(*args: int) -> float:
    """Unix seconds of a UTC date and time given as year, month, day, hour, minute, second."""
    return float(calendar.timegm((*args, 0, 0, 0)))


def test_schedule_is_an_upsert_that_keeps_an_unchanged_due_time(kit: AgentKit, monkeypatch) -> None:
    kit.task(lambda payload: None, name="t")
    clock = [calendar_utc(2026, 11, 21, 8, 0, 0)]
    monkeypatch.setattr(agentkit, "now", lambda: clock[0])
    first = kit.schedule("morning", task="t", cron="0 9 * * 1-5", tz="Europe/Paris")
    assert first.next_due == calendar_utc(2026, 11, 23, 8, 0, 0)  # Monday 09:00 CET
    clock[0] += 3600
    assert kit.schedule("morning", task="t", cron="0 9 * * 1-5", tz="Europe/Paris") == first
    changed = kit.schedule("morning", task="t", cron="0 10 * * 1-5", tz="Europe/Paris")
    assert changed.next_due == calendar_utc(2026, 11, 23, 9, 0, 0)


def test_missed_runs_are_coalesced_into_one(kit: AgentKit, monkeypatch) -> None:
    kit.task(lambda payload: None, name="t")
    start = calendar_utc(2026, 11, 21, 8, 0, 0)
    monkeypatch.setattr(agentkit, "now", lambda: start)
    kit.schedule("often", task="t", every=60, payload={"x": 1})
    kit.schedule("hourly", task="t", cron="0 * * * *")
    added = kit.tick(start + 10 * 3600 + 30)
    assert len(added) == 2
    keys = sorted(rows(kit, "jobs", "key"))
    assert keys == ["schedule:hourly:2026-11-21T09:00:00Z", "schedule:often:2026-11-21T08:01:00Z"]
    often = kit.scheduler.get("often")
    assert often.next_due == start + 10 * 3600 + 60
    assert kit.tick(start + 10 * 3600 + 31) == []


def test_pause_resume_remove(kit: AgentKit, monkeypatch) -> None:
    kit.task(lambda payload: None, name="t")
    start = calendar_utc(2026, 11, 21, 8, 0, 0)
    monkeypatch.setattr(agentkit, "now", lambda: start)
    kit.schedule("s", task="t", every=60)
    assert kit.pause_schedule("s").paused
    assert kit.tick(start + 600) == []
    monkeypatch.setattr(agentkit, "now", lambda: start + 600)
    resumed = kit.resume_schedule("s")
    assert not resumed.paused and resumed.next_due == start + 660
    kit.remove_schedule("s")
    assert kit.schedules() == []
    with pytest.raises(BadInput):
        kit.remove_schedule("s")


def test_a_once_schedule_runs_once(kit: AgentKit) -> None:
    kit.task(lambda payload: None, name="t")
    when = time.time() + 60
    kit.schedule("once", task="t", at=when)
    assert kit.tick(when - 1) == []
    assert len(kit.tick(when)) == 1
    assert kit.tick(when + 3600) == []
    assert kit.scheduler.get("once").next_due is None


@pytest.mark.parametrize(
    "tz, day, expected",
    [
        # spring: 02:30 does not exist; runs once at the first instant after the gap
        ("Europe/Paris", (2026, 3, 29), (2026, 3, 29, 1, 0)),  # 03:00 CEST
        ("America/New_York", (2026, 3, 8), (2026, 3, 8, 7, 0)),  # 03:00 EDT
        # autumn: 02:30 (Paris) and 01:30 (New York) exist twice; runs once, at the first
        ("Europe/Paris", (2026, 10, 25), (2026, 10, 25, 0, 30)),  # 02:30 CEST
        ("America/New_York", (2026, 11, 1), (2026, 11, 1, 5, 30)),  # 01:30 EDT
    ],
)
def test_scheduled_runs_across_daylight_saving_changes(
    kit: AgentKit, monkeypatch, tz: str, day: tuple[int, int, int], expected: tuple
) -> None:
    kit.task(lambda payload: None, name="t")
    hour = 1 if tz == "America/New_York" and day[1] == 11 else 2
    start = calendar_utc(*day, 0, 0, 0) - 86400
    monkeypatch.setattr(agentkit, "now", lambda: start)
    kit.schedule("nightly", task="t", cron=f"30 {hour} * * *", tz=tz)
    for minute in range(0, 3 * 24 * 60, 10):  # tick every 10 minutes for three days
        kit.tick(start + minute * 60)
    runs = sorted(rows(kit, "jobs", "key"))
    assert f"schedule:nightly:{agentkit.iso(calendar_utc(*expected, 0))}" in runs
    assert len(runs) == 3  # the day before, the change day, the day after: once each


def test_three_processes_ticking_the_same_instants_enqueue_each_run_once(
    db: Database, tmp_path: Path
) -> None:
    start = calendar_utc(2026, 11, 21, 8, 0, 0)
    code = """
        import sys, agentkit
        db, start = sys.argv[1], float(sys.argv[2])
        kit = agentkit.AgentKit(db)
        agentkit.now = lambda: start  # this host's clock, once the store has read its own
        kit.task(lambda payload: None, name="t")
        kit.schedule("five", task="t", cron="*/5 * * * *")
        kit.schedule("minute", task="t", every=60)
        for second in range(0, 3600, 15):
            kit.tick(start + second)
    """
    for proc in [python(code, str(db), str(start)) for _ in range(3)]:
        finish(proc)
    with AgentKit(db) as kit:
        runs = sorted(rows(kit, "jobs", "key", "run_at"), key=lambda run: run[1])
    five = [r for k, r in runs if k.startswith("schedule:five:")]
    minute = [r for k, r in runs if k.startswith("schedule:minute:")]
    assert five == [start + 300 * i for i in range(1, 12)]
    assert minute == [start + 60 * i for i in range(1, 60)]


# ─────────────────────────────────────── turn engine ───────────────────────────────────────

ToolCall = agentkit.ToolCall


def scripted_kit(db: Database, steps: list, **options: object) -> AgentKit:
    return AgentKit(db, model=agentkit.ScriptedModel(steps), **options)


def test_echo_turn_records_the_exchange(kit: AgentKit) -> None:
    result = kit.run_turn("cli:me", "hello")
    assert (result.status, result.reply, result.error) == ("done", "echo: hello", None)
    assert kit.history("cli:me") == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "echo: hello"},
    ]


def test_a_tool_call_and_a_final_answer(db: Database) -> None:
    model = agentkit.ScriptedModel([ToolCall("add", {"a": 1, "b": 2}), "The sum is 3."])
    with AgentKit(db, model=model) as kit:

        @kit.tool
        def add(a: int, b: int) -> int:
            """Add two numbers."""
            return a + b

        result = kit.run_turn("cli:me", "add 1 and 2")
        assert (result.status, result.reply) == ("done", "The sum is 3.")
        tool_message = model.calls[1][-1]
        assert tool_message == {
            "role": "tool",
            "call_id": "call_1",
            "name": "add",
            "content": "3",
            "is_error": False,
        }
        history = kit.history("cli:me")
        assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(pydantic.BaseModel):
    x: int
    y: int = 0


def test_tool_schemas_come_from_type_hints(kit: AgentKit) -> None:
    @kit.tool(name="draw", description="Draw things.", idempotent=True)
    def draw(
        points: list[Point],
        color: Color,
        mode: Literal["fast", "slow"] = "fast",
        label: str | None = None,
        width: Annotated[int, pydantic.Field(ge=1, description="pixels")] = 1,
        ctx: agentkit.ToolContext = None,
    ) -> str:
        return "ok"

    spec = kit.engine.tools["draw"].spec()
    params = spec["parameters"]
    assert spec["name"] == "draw" and spec["description"] == "Draw things."
    assert params["required"] == ["points", "color"]
    assert "ctx" not in params["properties"]
    assert params["properties"]["mode"]["enum"] == ["fast", "slow"]
    assert params["properties"]["width"]["minimum"] == 1
    assert params["properties"]["width"]["description"] == "pixels"
    assert set(params["$defs"]) == {"Color", "Point"}
    assert params["$defs"]["Color"]["enum"] == ["red", "blue"]
    with pytest.raises(BadInput, match="tool name"):
        kit.tool(lambda: None, name="bad name!")
    with pytest.raises(BadInput, match=r"\*args"):

        @kit.tool
        def spread(*args: int) -> None: ...


def test_a_validation_error_goes_back_to_the_model_which_corrects_it(db: Database) -> None:
    steps = [ToolCall("add", {"a": "one", "b": 2}), ToolCall("add", {"a": 1, "b": 2}), "3"]
    model = agentkit.ScriptedModel(steps)
    with AgentKit(db, model=model) as kit:
        runs = []
        kit.tool(lambda a, b: runs.append((a, b)) or a + b, name="add")
        kit.engine.tools["add"] = agentkit.Tool(add_ints, name="add")
        result = kit.run_turn("cli:me", "add")
    first_result = model.calls[1][-1]
    assert first_result["is_error"] is True
    assert first_result["content"].startswith("invalid arguments: a: ")
    assert model.calls[2][-1] == {
        **first_result,
        "call_id": "call_2",
        "content": "3",
        "is_error": False,
    }
    assert result.reply == "3"


def add_ints(a: int, b: int) -> int:
    return a + b


def test_errors_async_tools_blocks_and_replaced_results(db: Database) -> None:
    steps = [
        [ToolCall("boom", {}), ToolCall("slow_double", {"x": 4}), ToolCall("delete", {})],
        ToolCall("nope", {}),
        "done",
    ]
    model = agentkit.ScriptedModel(steps)
    with AgentKit(db, model=model) as kit:
        deleted = []

        @kit.tool
        def boom() -> str:
            raise RuntimeError("kaput")

        @kit.tool
        async def slow_double(x: int) -> dict:
            await asyncio.sleep(0)
            return {"value": x * 2}

        @kit.tool
        def delete() -> str:
            deleted.append(1)
            return "deleted"

        seen_calls = []

        @kit.on("tool_call")
        def guard(event: agentkit.Event) -> agentkit.Block | None:
            seen_calls.append((event.tool, event.thread_id, event.actor))
            return agentkit.Block("not allowed") if event.tool == "delete" else None

        @kit.on("tool_result")
        def tag(event: agentkit.Event) -> str | None:
            return f"{event.result} (checked)" if event.tool == "slow_double" else None

        assert kit.run_turn("cli:me", "go").reply == "done"
    results = {m["name"]: m for m in model.calls[1] if m["role"] == "tool"}
    assert results["boom"]["content"] == "RuntimeError: kaput" and results["boom"]["is_error"]
    assert results["slow_double"]["content"] == '{"value":8} (checked)'
    assert results["delete"] == {
        "role": "tool",
        "call_id": "call_3",
        "name": "delete",
        "content": "blocked: not allowed",
        "is_error": True,
    }
    assert deleted == []
    assert model.calls[2][-1]["content"] == "unknown tool 'nope'"
    assert seen_calls == [
        ("boom", "cli:me", "cli:me"),
        ("slow_double", "cli:me", "cli:me"),
        ("delete", "cli:me", "cli:me"),
    ]


def test_model_request_hook_changes_the_messages(db: Database) -> None:
    model = agentkit.ScriptedModel(["ok"])
    with AgentKit(db, model=model) as kit:

        @kit.on("model_request")
        def add_note(event: agentkit.Event) -> list:
            return [*event.messages, {"role": "user", "content": "(be brief)"}]

        kit.run_turn("cli:me", "hi")
    assert model.calls[0][-1] == {"role": "user", "content": "(be brief)"}


def test_a_hook_that_raises_fails_the_turn_with_a_clear_error(db: Database, caplog) -> None:
    with AgentKit(db) as kit:

        @kit.on("turn_start")
        def broken(event: agentkit.Event) -> None:
            raise ValueError("no config")

        result = kit.run_turn("cli:me", "hi")
    assert result.status == "failed"
    assert result.error == "HookFailed: the turn_start hook broken raised ValueError: no config"
    assert "hook broken for turn_start raised" in caplog.text
    with pytest.raises(BadInput, match="unknown event"):
        kit.on("turn_begin")


def test_partials_and_callable_objects_are_named_by_what_they_call(db: Database, caplog) -> None:
    def broken(setting: str, event: agentkit.Event) -> None:
        raise ValueError(f"no {setting}")

    class Checker:
        def __call__(self, event: agentkit.Event) -> None:
            raise ValueError("checked")

    def add(a: int, b: int, offset: int = 0) -> int:
        """Add two integers."""
        return a + b + offset

    def tag(label: str, payload: object) -> str:
        return label

    with scripted_kit(db, [ToolCall("add", {"a": 1, "b": 2}), "Three."]) as kit:
        kit.tool(functools.partial(add, offset=10))
        assert kit.engine.tools["add"].description == "Add two integers."
        assert kit.run_turn("cli:me", "add").reply == "Three."
        assert kit.history("cli:me")[2]["content"] == "13"
        kit.task(functools.partial(tag, "x"))
        kit.task(functools.partial(Checker()))
        assert kit.job(kit.enqueue("tag")).name == "tag" and "Checker" in kit.queue.tasks
        kit.on("turn_start")(functools.partial(broken, "config"))
        result = kit.run_turn("cli:me", "hi")
        assert result.status == "failed"
        assert result.error == "HookFailed: the turn_start hook broken raised ValueError: no config"
        assert "hook broken for turn_start raised" in caplog.text
    with AgentKit(db) as kit:
        kit.on("turn_start")(Checker())
        result = kit.run_turn("cli:me", "hi")
        assert result.error == "HookFailed: the turn_start hook Checker raised ValueError: checked"


def test_events_arrive_in_order(kit: AgentKit) -> None:
    seen = []
    for kind in ("message_received", "turn_start", "model_request", "turn_end"):
        kit.on(kind)(lambda event: seen.append((event.kind, getattr(event, "status", None))))
    kit.run_turn("cli:me", "hi")
    assert seen == [
        ("message_received", None),
        ("turn_start", None),
        ("model_request", None),
        ("turn_end", "done"),
    ]


def test_commands_answer_without_the_model(db: Database) -> None:
    model = agentkit.ScriptedModel([])
    with AgentKit(db, model=model) as kit:

        @kit.command("ping")
        def ping(ctx: agentkit.ToolContext, args: str) -> str:
            """Answer pong."""
            return f"pong {args} from {ctx.thread_id}"

        assert kit.run_turn("cli:me", "/ping  a b").reply == "pong a b from cli:me"
        assert kit.run_turn("cli:me", "/PING@mybot").reply == "pong  from cli:me"
        help_text = kit.run_turn("cli:me", "/help").reply
        assert "/ping: Answer pong." in help_text and "/cancel" in help_text
        assert "Unknown command /pong" in kit.run_turn("cli:me", "/pong").reply
        assert kit.run_turn("cli:me", "/cancel").reply == "Nothing to cancel."
        with pytest.raises(BadInput):
            kit.command("Bad Name")
    assert model.calls == []


def test_max_steps_fails_the_turn(db: Database) -> None:
    with scripted_kit(db, [ToolCall("add", {"a": 1, "b": 1})] * 3, max_steps=2) as kit:
        kit.tool(add_ints, name="add")
        result = kit.run_turn("cli:me", "loop")
    assert result.status == "failed"
    assert result.error == "no final answer within max_steps=2 model steps"


def test_the_same_source_id_starts_one_turn(kit: AgentKit) -> None:
    first = kit.run_turn("telegram:1", "hi", source_id="update-7")
    again = kit.run_turn("telegram:1", "hi", source_id="update-7")
    assert first.turn_id == again.turn_id
    assert count(kit, "turns") == 1 and count(kit, "messages") == 2
    assert kit.run_turn("webhook:1", "hi", source_id="update-7").turn_id != first.turn_id


def test_bad_turn_input_is_refused_and_writes_nothing(kit: AgentKit) -> None:
    for call in (
        lambda: kit.run_turn("nothread", "hi"),
        lambda: kit.run_turn("", "hi"),
        lambda: kit.run_turn("cli:me", 42),
        lambda: kit.run_turn("cli:me", "x" * 100_001),
        lambda: kit.run_turn("cli:me", "hi", actor="me"),
        lambda: kit.run_turn("cli:me", "hi", source_id=""),
        lambda: kit.schedule("s", thread="cli:me", cron="* * * * *"),
        lambda: kit.schedule("s", thread="cli:me", prompt="x", task="t", every=60),
        lambda: AgentKit(":memory:", model="gpt:4"),
        lambda: AgentKit(":memory:", max_steps=0),
    ):
        with pytest.raises(BadInput):
            call()
    assert count(kit, "turns") == 0 and count(kit, "jobs") == 0


def test_model_errors_fail_the_turn_and_leave_no_half_step(db: Database) -> None:
    from fake_servers import FakeOpenAI

    with FakeOpenAI() as fake:
        model = agentkit.OpenAIModel("m", api_key="sk-test", base_url=fake.url, max_retries=0)
        fake.push_cut()
        with AgentKit(db, model=model) as kit:
            result = kit.run_turn("cli:me", "hi")
            assert result.status == "failed" and "ModelError" in result.error
            assert kit.history("cli:me") == [{"role": "user", "content": "hi"}]
            assert count(kit, "calls") == 0


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_turn_with_parallel_tool_calls_through_each_provider(
    db: Database, provider: str, stream: bool
) -> None:
    from fake_servers import FakeAnthropic, FakeOpenAI

    fake_class, model_class = {
        "openai": (FakeOpenAI, agentkit.OpenAIModel),
        "anthropic": (FakeAnthropic, agentkit.AnthropicModel),
    }[provider]
    with fake_class() as fake:
        fake.push(tool_calls=[("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})], usage=(10, 5))
        fake.push(text="3 and 7.", usage=(30, 4))
        model = model_class("m", api_key="key-test", base_url=fake.url, stream=stream)
        with AgentKit(db, model=model, instructions="Be exact.") as kit:
            kit.tool(add_ints, name="add")
            result = kit.run_turn("cli:me", "add twice")
        assert (result.status, result.reply) == ("done", "3 and 7.")
        assert result.usage == {"input_tokens": 40, "output_tokens": 9}
        second = fake.requests[1].body
        text = json.dumps(second)
        assert "Be exact." in text and '"3"' in text.replace("\\", "") and "7" in text


def test_two_processes_running_turns_on_one_thread_do_not_interleave(
    db: Database, tmp_path: Path
) -> None:
    AgentKit(db).close()
    trace = tmp_path / "trace"
    code = """
        import sys, agentkit
        db, trace, name = sys.argv[1:]
        steps = []
        for i in range(5):
            steps += [agentkit.ToolCall("mark", {"label": f"{name}{i}"}), f"{name}{i} done"]
        kit = agentkit.AgentKit(db, model=agentkit.ScriptedModel(steps))
        @kit.tool
        def mark(label: str) -> str:
            with open(trace, "a") as f:
                f.write(f"start {label}\\n")
            with open(trace, "a") as f:
                f.write(f"end {label}\\n")
            return label
        for i in range(5):
            assert kit.run_turn("cli:shared", f"{name}{i}").reply == f"{name}{i} done"
    """
    for proc in [python(code, str(db), str(trace), name) for name in "ab"]:
        finish(proc)
    lines = trace.read_text().split("\n")[:-1]
    assert len(lines) == 20
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start.startswith("start ") and end == "end " + start[6:]
    with AgentKit(db) as kit:
        history = kit.history("cli:shared")
    users = [i for i, m in enumerate(history) if m["role"] == "user"]
    for i in users:  # each exchange is whole: user, call, result, answer
        assert [m["role"] for m in history[i : i + 4]] == ["user", "assistant", "tool", "assistant"]
        assert history[i + 3]["content"] == history[i]["content"] + " done"


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_turn_killed_inside_a_tool_finishes_on_restart(
    db: Database, tmp_path: Path, idempotent: bool
) -> None:
    AgentKit(db).close()
    runs = tmp_path / "runs"
    victim = python(
        """
        import sys, time, agentkit
        db, runs, idempotent = sys.argv[1], sys.argv[2], sys.argv[3] == "True"
        model = agentkit.ScriptedModel([agentkit.ToolCall("charge", {"cents": 500})])
        kit = agentkit.AgentKit(db, model=model, lease=1.0)
        @kit.tool(idempotent=idempotent)
        def charge(cents: int) -> str:
            with open(runs, "a") as f:
                f.write("run\\n")
            print("inside", flush=True)
            time.sleep(600)
        kit.run_turn("cli:me", "pay")
        """,
        str(db),
        str(runs),
        str(idempotent),
    )
    assert victim.stdout.readline().strip() == "inside"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    model = agentkit.ScriptedModel(["Charged." if idempotent else "I am not sure it went through."])
    with AgentKit(db, model=model) as kit:

        @kit.tool(idempotent=idempotent)
        def charge(cents: int) -> str:
            with runs.open("a") as f:
                f.write("run\n")
            return "charged"

        [turn_id] = rows(kit, "turns", "id")
        wait_until(lambda: kit.work(until_idle=True), what="the lease to run out")
        result = kit.turn(turn_id)
    assert result.status == "done"
    tool_message = model.calls[0][-1]
    if idempotent:
        assert runs.read_text() == "run\nrun\n"
        assert tool_message["content"] == "charged"
    else:
        assert runs.read_text() == "run\n"  # never silently run twice
        assert tool_message["content"] == agentkit.INTERRUPTED and tool_message["is_error"]


def test_a_tool_past_its_timeout_is_reported_as_timed_out(db: Database) -> None:
    release = threading.Event()
    model = agentkit.ScriptedModel([ToolCall("hang", {}), "gave up"])
    with AgentKit(db, model=model) as kit:
        kit.tool(lambda: release.wait(30), name="hang", timeout=0.2)
        assert kit.run_turn("cli:me", "go").reply == "gave up"
        release.set()
    assert model.calls[1][-1]["content"] == "timed out after 0.2 s"


def test_cancel_stops_a_running_turn_at_its_next_step(db: Database) -> None:
    entered, release = threading.Event(), threading.Event()
    model = agentkit.ScriptedModel([ToolCall("wait", {}), "never sent"])
    with AgentKit(db, model=model) as kit:

        @kit.tool
        def wait() -> str:
            entered.set()
            release.wait(30)
            return "waited"

        runner = threading.Thread(target=kit.run_turn, args=("cli:me", "go"))
        runner.start()
        assert entered.wait(30)
        assert kit.run_turn("cli:me", "/cancel").reply == "Cancelled 1 turn(s)."
        release.set()
        runner.join()
        turn_id = min(rows(kit, "turns", "created_at", "id"))[1]
        assert kit.turn(turn_id).status == "cancelled"
        queued = kit.run_turn("cli:me", "later", wait=False)
        assert kit.cancel(queued.turn_id).status == "cancelled"
        with pytest.raises(BadInput, match="cancelled already"):
            kit.cancel(queued.turn_id)
    assert len(model.calls) == 1


def test_context_is_bounded_and_keeps_calls_with_their_results(db: Database) -> None:
    model = agentkit.ScriptedModel(
        [s for i in range(6) for s in (ToolCall("add", {"a": i, "b": 0}), f"answer {i}")]
    )
    with AgentKit(db, model=model, context_messages=7) as kit:
        kit.tool(add_ints, name="add")
        for i in range(6):
            kit.run_turn("cli:me", f"question {i}")
    last = model.calls[-1]
    assert last[0] == {"role": "user", "content": "question 4"}
    calls = {c["id"] for m in last if m["role"] == "assistant" for c in m.get("tool_calls", [])}
    results = {m["call_id"] for m in last if m["role"] == "tool"}
    assert calls == results


def test_a_scheduled_prompt_starts_a_turn(kit: AgentKit) -> None:
    kit.schedule("report", thread="cli:ops", prompt="daily report", at=time.time())
    kit.work(until_idle=True)  # the worker ticks the scheduler, then runs the prompt and the turn
    turn = rows(kit, "turns", "actor", "text", "status", "reply")
    assert turn == [("schedule:report", "daily report", "done", "echo: daily report")]


def test_run_turn_waits_for_a_worker_elsewhere_and_works_inside_an_event_loop(db: Database) -> None:
    with AgentKit(db) as kit:
        queued = kit.run_turn("cli:me", "later", wait=False)
        assert queued.status == "queued"
        waited = kit.run_turn("cli:other", "x", wait=False)
        assert kit.turn(waited.turn_id).status == "queued"

        async def main() -> tuple:
            inside = kit.run_turn("cli:me", "inside a loop")
            awaited = await kit.arun_turn("cli:me", "awaited")
            return inside, awaited

        inside, awaited = asyncio.run(main())
        assert inside.reply == "echo: inside a loop" and awaited.reply == "echo: awaited"
        assert kit.turn(queued.turn_id).status == "queued"  # another thread's turn comes in order
        kit.work(until_idle=True)
        assert kit.turn(queued.turn_id).reply == "echo: later"


def test_turn_cli_run_threads_show(db: Database) -> None:
    out = cli("run", "hello there", "--db", str(db), "--thread", "cli:test")
    assert out.returncode == 0 and out.stdout == "echo: hello there\n"
    chat = subprocess.run(
        [
            sys.executable,
            str(ROOT / "agentkit.py"),
            "chat",
            "--db",
            str(db),
            "--thread",
            "cli:test",
        ],
        input="one\n\ntwo\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert chat.returncode == 0 and chat.stdout == "echo: one\necho: two\n"
    assert "cli:test" in cli("threads", "--db", str(db)).stdout
    shown = cli("show", "cli:test", "--db", str(db)).stdout
    assert shown.splitlines()[:2] == ["user: hello there", "assistant: echo: hello there"]
    assert cli("show", "nothread", "--db", str(db)).returncode == 2


# ─────────────────────────────────────── approvals ───────────────────────────────────────


def approval_kit(db: Database, steps: list, runs: list, **options: object) -> AgentKit:
    """A kit whose `restart` tool needs approval and records its runs."""
    kit = AgentKit(db, model=agentkit.ScriptedModel(steps), **options)

    @kit.tool(approval=lambda args, ctx: f"restarts {args['service']}")
    def restart(service: str) -> str:
        runs.append(service)
        return f"{service} restarted"

    return kit


RESTART = ToolCall("restart", {"service": "nginx"})


def test_an_approved_call_runs_once_and_the_turn_goes_on(db: Database) -> None:
    runs: list[str] = []
    requested, decided = [], []
    with approval_kit(db, [RESTART, "Restarted nginx."], runs) as kit:
        kit.on("approval_requested")(lambda e: requested.append(e.approval.id))
        kit.on("approval_decided")(lambda e: decided.append((e.approval.state, e.actor)))
        waiting = kit.run_turn("cli:me", "restart nginx")
        assert waiting.status == "waiting_approval" and runs == []
        (approval,) = waiting.approvals
        assert (approval.tool, approval.args, approval.reason) == (
            "restart",
            {"service": "nginx"},
            "restarts nginx",
        )
        assert approval.requester == "cli:me" and approval.expires_at > time.time() + 3500
        done = kit.approve(approval.id, actor="cli:me")
        assert (done.status, done.reply) == ("done", "Restarted nginx.")
        assert runs == ["nginx"]
        again = kit.approve(approval.id, actor="cli:me")  # the same decision again: a no-op
        assert again.status == "done" and runs == ["nginx"]
        with pytest.raises(agentkit.AlreadyDecided, match="already approved by cli:me"):
            kit.deny(approval.id, actor="cli:me")
        events = sorted(rows(kit, "events", "id", "kind", "actor"))
        events = [(kind, actor) for _, kind, actor in events]
    assert events == [("approval_requested", "cli:me"), ("approval_decided", "cli:me")]
    assert requested == [approval.id] and decided == [("approved", "cli:me")]


def test_the_authorisation_matrix(db: Database, monkeypatch) -> None:
    runs: list[str] = []
    steps = [RESTART, "ok"] * 6
    with approval_kit(db, steps, runs, approvers=["telegram:42"], allow_self_approval=False) as kit:

        def waiting(actor: str = "telegram:7") -> agentkit.Approval:
            result = kit.run_turn(f"telegram:{len(runs)}{time.monotonic_ns()}", "go", actor=actor)
            return result.approvals[0]

        a = waiting()
        for stranger in ("telegram:8", "web:owner", "cli:me"):  # not approvers here
            with pytest.raises(agentkit.Forbidden, match=f"{stranger} may not decide"):
                kit.approve(a.id, actor=stranger)
            with pytest.raises(agentkit.Forbidden):
                kit.deny(a.id, actor=stranger)
        assert kit.approvals()[0].state == "pending" and runs == []
        assert kit.approve(a.id, actor="telegram:42").status == "done"  # an approver
        assert runs == ["nginx"]

        own = waiting(actor="telegram:42")  # an approver asking: no self-approval here
        with pytest.raises(agentkit.Forbidden, match="may not approve it"):
            kit.approve(own.id, actor="telegram:42")
        assert kit.deny(own.id, actor="telegram:42").status == "done"  # denying is allowed

        requester = waiting(actor="telegram:9")  # a requester may always deny
        assert kit.deny(requester.id, actor="telegram:9", reason="oops").status == "done"

        for bad in ("apr_nope", "turn_1", "", None):
            with pytest.raises(BadInput):
                kit.approve(bad, actor="telegram:42")

        late = waiting()
        later = late.expires_at + 1
        monkeypatch.setattr(agentkit, "now", lambda: later)
        with pytest.raises(agentkit.AlreadyDecided, match="expired"):
            kit.approve(late.id, actor="telegram:42")
    assert runs == ["nginx"]

    with approval_kit(db, [RESTART, "ok"], runs) as kit:  # defaults: self-approval allowed
        own = kit.run_turn("cli:me", "go").approvals[0]
        assert kit.approve(own.id, actor="cli:me").status == "done"
        assert agentkit.DEFAULT_APPROVERS == ("web:owner", "cli:*")


def test_deny_and_expiry_tell_the_model_and_never_run_the_tool(db: Database, monkeypatch) -> None:
    runs: list[str] = []
    model_steps = [RESTART, "Not restarted.", RESTART, "It expired."]
    with approval_kit(db, model_steps, runs, approval_ttl=60) as kit:
        model = kit.engine.model
        denied = kit.run_turn("cli:me", "restart").approvals[0]
        result = kit.deny(denied.id, actor="cli:me", reason="not during the sale")
        assert result.reply == "Not restarted."
        assert model.calls[1][-1]["content"] == "denied by cli:me: not during the sale"
        assert model.calls[1][-1]["is_error"]

        expiring = kit.run_turn("cli:me", "restart").approvals[0]
        later = expiring.expires_at + 1
        monkeypatch.setattr(agentkit, "now", lambda: later)
        kit.work(until_idle=True)  # the worker's tick sweeps expired approvals
        assert kit.approvals(state=None)[0].state == "expired"
        assert model.calls[3][-1]["content"].startswith("not run: nobody approved it")
        assert kit.turn(expiring.turn_id).reply == "It expired."
    assert runs == []


def test_calls_without_approval_run_at_once_and_hooks_run_once(db: Database) -> None:
    runs: list[str] = []
    calls: list[str] = []
    steps = [[RESTART, ToolCall("status", {})], "both done"]
    with approval_kit(db, steps, runs) as kit:
        kit.tool(lambda: runs.append("status") or "all green", name="status")
        kit.on("tool_call")(lambda e: calls.append(e.tool))
        waiting = kit.run_turn("cli:me", "check and restart")
        assert waiting.status == "waiting_approval" and runs == ["status"]
        kit.approve(waiting.approvals[0].id, actor="web:owner")
    assert runs == ["status", "nginx"] and calls == ["restart", "status"]


def test_a_message_to_a_waiting_thread_gets_a_note_and_waits_for_the_decision(db: Database) -> None:
    runs: list[str] = []
    model = agentkit.ScriptedModel([RESTART, "restarted", "echoing: hello again"])
    with AgentKit(db, model=model) as kit:
        kit.tool(lambda service: runs.append(service) or "ok", name="restart", approval=True)
        approval = kit.run_turn("cli:me", "restart nginx").approvals[0]
        held = kit.run_turn("cli:me", "hello again")
        assert held.status == "queued" and approval.id in held.note and "/approve" in held.note
        assert len(model.calls) == 1  # the model was not called for it
        help_reply = kit.run_turn("cli:me", "/help").reply  # commands still answer at once
        assert "/approve: Approve a waiting tool call" in help_reply
        assert kit.run_turn("cli:me", f"/approve {approval.id}").reply == (
            f"Approved restart ({approval.id})."
        )
        kit.work(until_idle=True)
        assert kit.turn(approval.turn_id).reply == "restarted"
        assert kit.turn(held.turn_id).reply == "echoing: hello again"
    assert runs == ["nginx"]


def test_cancel_of_a_waiting_turn_cancels_its_approvals(db: Database) -> None:
    runs: list[str] = []
    with approval_kit(db, [RESTART], runs) as kit:
        approval = kit.run_turn("cli:me", "restart").approvals[0]
        assert kit.run_turn("cli:me", "/cancel").reply == "Cancelled 1 turn(s)."
        assert kit.turn(approval.turn_id).status == "cancelled"
        assert kit.approvals(state=None)[0].state == "cancelled"
        with pytest.raises(agentkit.AlreadyDecided, match="cancelled"):
            kit.approve(approval.id, actor="cli:me")
        assert (
            "may not decide"
            in kit.run_turn("webhook:x", f"/deny {approval.id}", actor="webhook:x").reply
        )
        kit.work(until_idle=True)
    assert runs == []


def test_cancel_settles_every_approval_of_a_step_past_the_display_limit(db: Database) -> None:
    calls = [ToolCall("restart", {"service": f"s{i}"}) for i in range(250)]
    runs: list[str] = []
    with approval_kit(db, [calls, "Fresh start."], runs) as kit:
        waiting = kit.run_turn("cli:me", "restart all")
        assert waiting.status == "waiting_approval" and len(waiting.approvals) == 250
        assert len(kit.approvals()) == 100  # the public listing keeps its display default
        assert kit.cancel(waiting.turn_id).status == "cancelled"
        assert kit.approvals() == [] and kit.turn(waiting.turn_id).approvals == ()
        assert rows(kit, "approvals", "state") == ["cancelled"] * 250
        assert kit.run_turn("cli:me", "hello again").reply == "Fresh start."  # the thread is free
        kit.work(until_idle=True)
    assert runs == []


def test_a_reason_with_a_lone_surrogate_is_bad_input_and_decides_nothing(db: Database) -> None:
    runs: list[str] = []
    with approval_kit(db, [RESTART, "Done."], runs) as kit:
        approval = kit.run_turn("cli:me", "restart").approvals[0]
        with pytest.raises(BadInput, match="reason holds a lone surrogate"):
            kit.deny(approval.id, actor="cli:me", reason="no \ud800")
        with pytest.raises(BadInput, match="reason holds a lone surrogate"):
            kit.request_secret("cli:me", fields=["TOKEN"], reason="\udfff")
        assert [a.state for a in kit.approvals(state=None)] == ["pending"]
        assert count(kit, "secret_requests") == 0
        assert kit.approve(approval.id, actor="cli:me").reply == "Done."
    assert runs == ["nginx"]


def test_a_new_process_approves_what_an_exited_one_requested(db: Database, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code = """
        import sys, agentkit
        db, runs, step = sys.argv[1:]
        model = agentkit.ScriptedModel([agentkit.ToolCall("restart", {"service": "db"})]
                                       if step == "ask" else ["Restarted."])
        kit = agentkit.AgentKit(db, model=model)
        @kit.tool(approval=True)
        def restart(service: str) -> str:
            with open(runs, "a") as f:
                f.write(service + "\\n")
            return "ok"
        if step == "ask":
            print(kit.run_turn("cli:me", "restart db").approvals[0].id)
        else:
            print(kit.approve(sys.argv[4] if len(sys.argv) > 4 else step, actor="cli:me").reply)
    """
    approval_id = finish(python(code, str(db), str(runs), "ask")).strip()
    assert approval_id.startswith("apr_") and not runs.exists()
    assert finish(python(code, str(db), str(runs), approval_id)).strip() == "Restarted."
    assert runs.read_text() == "db\n"


def test_two_processes_approving_at_once_run_the_tool_once(db: Database, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    go = tmp_path / "go"
    with AgentKit(db, model=agentkit.ScriptedModel([RESTART])) as kit:
        kit.tool(lambda service: "ok", name="restart", approval=True)
        approval_id = kit.run_turn("cli:me", "restart").approvals[0].id
    code = """
        import os, sys, time, agentkit
        db, runs, go, approval_id = sys.argv[1:]
        kit = agentkit.AgentKit(db, model=agentkit.ScriptedModel(["Restarted."]))
        @kit.tool(approval=True)
        def restart(service: str) -> str:
            with open(runs, "a") as f:
                f.write(f"{os.getpid()}\\n")
            return "ok"
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.001)
        print(kit.approve(approval_id, actor="cli:me", timeout=60).status)
    """
    procs = [python(code, str(db), str(runs), str(go), approval_id) for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    outs = [finish(proc).strip() for proc in procs]
    assert len(runs.read_text().split()) == 1
    assert set(outs) <= {"done", "running", "waiting_approval"} and "done" in outs


def test_approvals_cli(db: Database) -> None:
    runs: list[str] = []
    with approval_kit(db, [RESTART, RESTART], runs) as kit:
        first = kit.run_turn("cli:me", "restart").approvals[0]
        second = kit.run_turn("cli:you", "restart").approvals[0]
    listing = cli("approvals", "--db", str(db))
    assert listing.returncode == 0
    assert first.id in listing.stdout and 'restart({"service": "nginx"})' in listing.stdout
    forbidden = cli("approve", first.id, "--as", "telegram:1", "--db", str(db))
    assert forbidden.returncode == 1 and "may not decide" in forbidden.stderr
    ok = cli("approve", first.id, "--as", "cli:ops", "--db", str(db))
    assert ok.returncode == 0 and ok.stdout.startswith(f"approved {first.id}")
    denied = cli("deny", second.id, "--reason", "no", "--db", str(db))
    assert denied.returncode == 0 and denied.stdout.startswith(f"denied {second.id}")
    assert cli("approvals", "--db", str(db)).stdout == ""
    assert "denied by cli:" in cli("approvals", "--all", "--db", str(db)).stdout
    assert cli("approve", "apr_missing", "--db", str(db)).returncode == 1  # not found


# ─────────────────────────────────────── benchmarks ───────────────────────────────────────


@pytest.mark.parametrize("script", ["queue.py", "turns.py", "import_time.py"])
def test_benchmarks_run_and_find_no_duplicate_or_loss(script: str, tmp_path: Path) -> None:
    """Each benchmark's quick run checks every job and turn ran exactly once (its exit status)."""
    out = subprocess.run(
        # (the PostgreSQL rows of queue.py start a server of their own: minutes, not for CI)
        [sys.executable, str(ROOT / "bench" / script), "--quick"]
        + (["--no-postgres"] if script == "queue.py" else []),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "agentkit" in out.stdout and ("ratio" in out.stdout or "÷" in out.stdout)


# ─────────────────────────── regressions found in review ───────────────────────────


def test_a_worker_that_lost_its_turn_job_writes_nothing(db: Database) -> None:
    with AgentKit(db) as kit:

        def stolen(messages: list, tools: list) -> str:
            # another worker takes the job while this one waits for the model
            take_over(kit, agentkit.TURN_TASK)
            return "a late reply"

        kit.engine.model = agentkit.ScriptedModel([stolen])
        result = kit.run_turn("cli:me", "hi", timeout=0)
        assert result.status == "running"  # the new owner has it; this worker stopped
        assert kit.history("cli:me") == [{"role": "user", "content": "hi"}]
        assert count(kit, "calls") == 0


def test_a_raising_approval_hook_leaves_the_request_standing(db: Database) -> None:
    runs: list[str] = []
    with approval_kit(db, [RESTART, "done"], runs) as kit:
        kit.on("approval_requested")(lambda e: 1 / 0)
        waiting = kit.run_turn("cli:me", "restart")
        assert waiting.status == "waiting_approval"
        assert kit.approve(waiting.approvals[0].id, actor="cli:me").reply == "done"
    assert runs == ["nginx"]


def test_held_messages_keep_their_order_and_are_released_when_the_turn_ends(db: Database) -> None:
    runs: list[str] = []
    model = agentkit.ScriptedModel([RESTART, "restarted", "reply 2", "reply 3", RESTART])
    with AgentKit(db, model=model) as kit:
        kit.tool(lambda service: runs.append(service) or "ok", name="restart", approval=True)
        approval = kit.run_turn("cli:me", "restart").approvals[0]
        second = kit.run_turn("cli:me", "message 2")
        kit.approve(approval.id, actor="cli:me", wait=False)
        third = kit.run_turn("cli:me", "message 3")  # held behind message 2
        assert second.note and third.note is not None
        kit.work(until_idle=True)
        users = [m["content"] for m in kit.history("cli:me") if m["role"] == "user"]
        assert users == ["restart", "message 2", "message 3"]
        assert kit.turn(third.turn_id).reply == "reply 3"

        waiting = kit.run_turn("cli:me", "restart again")  # a turn that ends while waiting
        held = kit.run_turn("cli:me", "message 4", wait=False)
        assert kit.turn(held.turn_id).note
        kit.engine.records.finish(waiting.turn_id, "failed", error="gave up")
        assert kit.approvals(state=None)[0].state == "cancelled"
        assert kit.turn(held.turn_id).note is None  # released: it has a job now
    assert runs == ["nginx"]


def test_a_turn_whose_job_dies_fails_and_its_approved_call_is_kept(db: Database) -> None:
    runs: list[str] = []
    with approval_kit(db, [RESTART], runs) as bot:
        approval = bot.run_turn("cli:me", "restart").approvals[0]
    with AgentKit(db) as admin:  # no tools here: the approved call cannot run in this process
        admin.queue.tasks[agentkit.TURN_TASK].retries = 0
        admin.approve(approval.id, actor="cli:me", wait=False)
        admin.work(until_idle=True)
        turn = admin.turn(approval.turn_id)
        assert turn.status == "failed"
        assert "tools not registered in this process: restart" in turn.error
        assert rows(admin, "calls", "state") == ["pending"]  # never marked
        with pytest.raises(BadInput, match="cancel its turn instead"):
            admin.cancel(admin.jobs()[0].id)
    assert runs == []


def test_short_lived_threads_leave_no_connection_open(db: Database) -> None:
    model = agentkit.ScriptedModel([s for _ in range(5) for s in (ToolCall("nap", {}), "ok")])
    with AgentKit(db, model=model, lease=0.3) as kit:
        kit.tool(lambda: time.sleep(0.15) or "rested", name="nap")
        for _ in range(5):
            assert kit.run_turn("cli:me", "rest").reply == "ok"
            with kit.lock("l", ttl=0.3):
                time.sleep(0.15)
        assert len(kit.store._all) == 1  # only this thread's


def test_bad_constructor_and_query_input_touches_nothing(tmp_path: Path, db: Database) -> None:
    for kwargs in ({"approvers": ["owner"]}, {"approval_ttl": 0}, {"lease": -1}):
        with pytest.raises(BadInput):
            AgentKit(db, **kwargs)
        assert not created(db)
    with pytest.raises(StoreError, match="cannot open"):
        AgentKit(tmp_path)
    with AgentKit(db) as kit:
        kit.task(lambda p: None, name="t")
        for call in (lambda: kit.enqueue("t", priority=2**70), lambda: kit.jobs(limit="x")):
            with pytest.raises(BadInput):
                call()
        assert count(kit, "jobs") == 0


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BAD_QUEUE_AND_QUERY_CALLS = {  # what is called, and what the error says
    "a string as payloads": (lambda kit: kit.enqueue_many("t", "abc"), "must be a list"),
    "a number as payloads": (lambda kit: kit.enqueue_many("t", 5), "must be a list"),
    "a dict as payloads": (lambda kit: kit.enqueue_many("t", {"a": 1}), "must be a list"),
    "retries past 64 bits": (lambda kit: kit.enqueue("t", retries=2**80), "retries must be"),
    "retries past 64 bits, many": (
        lambda kit: kit.enqueue_many("t", [1], retries=2**80),
        "retries must be an integer >= 0",
    ),
    "a task's retries past 64 bits": (
        lambda kit: kit.task(lambda p: None, name="u", retries=2**80),
        "retries must be an integer >= 0",
    ),
    "a payload nested 100,000 deep": (
        lambda kit: kit.enqueue("t", nested(100_000)),
        "nested too deeply",
    ),
    "one of many payloads nested deep": (
        lambda kit: kit.enqueue_many("t", [1, nested(100_000)]),
        "nested too deeply",
    ),
    "a lone surrogate in a payload": (
        lambda kit: kit.enqueue("t", {"text": "\ud800"}),
        "lone surrogate",
    ),
    "a lone surrogate in a key": (lambda kit: kit.enqueue("t", key="k\udfff"), "lone surrogate"),
    "a job id past 64 bits": (lambda kit: kit.job("job_" + "9" * 30), "job id's number must be"),
    "a text limit for history": (
        lambda kit: kit.history("cli:me", limit="x"),
        "limit must be an integer >= 0, not 'x'",
    ),
    "a negative limit for history": (lambda kit: kit.history("cli:me", limit=-1), "limit must"),
    "a text limit for threads": (lambda kit: kit.threads(limit="x"), "limit must be"),
    "an unknown approval state": (
        lambda kit: kit.approvals(state="weird"),
        "state must be one of pending, approved, denied, expired, cancelled, not 'weird'",
    ),
    "a text limit for approvals": (lambda kit: kit.approvals(limit="x"), "limit must be"),
    "a bool as concurrency": (
        lambda kit: kit.work(until_idle=True, concurrency=True),
        "concurrency must be an integer >= 1, not True",
    ),
    "a bool as workers": (lambda kit: kit.serve(http=None, workers=True), "workers must be"),
}


@pytest.mark.parametrize(
    "call, message", BAD_QUEUE_AND_QUERY_CALLS.values(), ids=BAD_QUEUE_AND_QUERY_CALLS
)
def test_bad_queue_and_query_input_is_bad_input_and_writes_nothing(
    kit: AgentKit, call, message: str
) -> None:
    kit.task(lambda payload: None, name="t")
    with pytest.raises(BadInput) as error:
        call(kit)
    assert message in str(error.value)
    assert kit.jobs() == [] and kit.threads() == [] and "u" not in kit.queue.tasks
    assert count(kit, "jobs") == 0


class Room(agentkit.PollingAdapter):
    name = "room"

    def send(self, target: str, outbound: agentkit.Outbound) -> None:
        raise AssertionError("nothing is sent in these tests")


BAD_TEXT_CALLS = {
    "a number as a scheduled prompt": (
        lambda kit: kit.schedule("s", thread="cli:me", prompt=5, every=60),
        "prompt must be a string of at most 100,000 characters",
    ),
    "a scheduled prompt over 100,000 characters": (
        lambda kit: kit.schedule("s", thread="cli:me", prompt="x" * 200_000, every=60),
        "prompt must be a string of at most 100,000 characters",
    ),
    "a lone surrogate in a scheduled prompt": (
        lambda kit: kit.schedule("s", thread="cli:me", prompt="hi \ud800", every=60),
        "prompt holds a lone surrogate '\\ud800' at index 3",
    ),
    "a lone surrogate in a turn's text": (
        lambda kit: kit.run_turn("cli:me", "hi \ud800"),
        "text holds a lone surrogate",
    ),
    "a lone surrogate in a thread id": (
        lambda kit: kit.run_turn("cli:\ud800", "hi"),
        "thread id holds a lone surrogate",
    ),
    "a lone surrogate in a source id": (
        lambda kit: kit.run_turn("cli:me", "hi", source_id="\ud800"),
        "source_id holds a lone surrogate",
    ),
    "a lone surrogate in an adapter's text": (
        lambda kit: kit.receive(Room(), agentkit.Inbound("r", "ann", "hi \udc80", id="1")),
        "text holds a lone surrogate",
    ),
    "a lone surrogate in an adapter's meta": (
        lambda kit: kit.receive(Room(), agentkit.Inbound("r", "a", "hi", meta={"m": "\ud800"})),
        "JSON holds a lone surrogate",
    ),
}


@pytest.mark.parametrize("call, message", BAD_TEXT_CALLS.values(), ids=BAD_TEXT_CALLS)
def test_bad_prompts_and_texts_are_bad_input_and_write_nothing(
    kit: AgentKit, call, message: str
) -> None:
    with pytest.raises(BadInput) as error:
        call(kit)
    assert message in str(error.value)
    assert kit.schedules() == [] and kit.jobs() == [] and kit.threads() == []
    assert count(kit, "turns") == 0 and count(kit, "deliveries") == 0


def test_a_polled_message_with_a_lone_surrogate_is_skipped_not_fatal(kit: AgentKit, caplog) -> None:
    items = [
        agentkit.Inbound("r", "ann", "bad \ud800", id="1"),
        agentkit.Inbound("r", "ann", "ok", id="2"),
    ]
    kit.receive_all(Room(), items, "2")
    assert rows(kit, "turns", "text") == ["ok"]
    assert "skipped message 1: text holds a lone surrogate" in caplog.text


@pytest.mark.sqlite_only("breaks a COMMIT with SQLite's deferred foreign keys")
def test_a_failed_commit_leaves_the_connection_usable(kit: AgentKit) -> None:
    tx = kit.store.connection()  # the SQLite engine's own: only raw SQL can break a COMMIT
    with pytest.raises(apsw.ConstraintError), kit.store.transaction():
        tx.execute("PRAGMA defer_foreign_keys = ON")
        tx.execute(
            "INSERT INTO turns (id, thread_id, actor, text, source, status, created_at) "
            "VALUES ('turn_x', 'no:thread', 'a:b', 'hi', 'no', 'queued', 0)"
        )
    with kit.store.transaction():  # the failed COMMIT was rolled back
        kit.store.acquire_lock("a", "me", 30)
    assert count(kit, "turns") == 0 and count(kit, "locks") == 1
    with (
        pytest.raises(BadInput, match="outermost"),
        kit.store.transaction(),
        kit.store.transaction(durable=True),
    ):
        pass


# ─────────────────────────────────────── retention ───────────────────────────────────────


def test_prune_keeps_what_is_live(kit: AgentKit, new_db: NewDatabase, monkeypatch) -> None:
    """Old finished jobs, events, sent deliveries and used requests go; pending approvals,
    unfinished turns, messages and live requests stay."""
    kit.task(lambda payload: "ok", name="old")
    kit.enqueue("old")
    kit.work(until_idle=True)
    kit.enqueue("old", delay=3600)
    kit.tool(lambda: "boom", name="risky", approval=True)
    kit.records.deliver("web:owner", None, "notice", "hello")
    waiting = scripted_kit(new_db("b.db"), [agentkit.ToolCall("risky", {})])
    waiting.tool(lambda: "boom", name="risky", approval=True)
    assert waiting.run_turn("cli:me", "go").status == "waiting_approval"
    waiting.request_secret("cli:me", fields=["T"], reason="r")
    for k in (kit, waiting):
        monkeypatch.setattr(agentkit, "now", lambda: time.time() + 40 * 86400)
        with pytest.raises(BadInput):
            k.prune(-1)
        deleted = k.prune(30 * 86400)
        monkeypatch.undo()
    assert deleted == {
        "jobs": 1,
        "events": 1,
        "deliveries": 0,
        "secret_requests": 0,
        "attachments": 0,
        "blobs": 0,
        "queued_messages": 0,
    }
    assert waiting.approvals()[0].state == "pending"
    assert rows(waiting, "turns", "status") == ["waiting_approval"]
    assert count(waiting, "messages") == 2 and count(waiting, "secret_requests") == 1
    assert [job.state for job in kit.jobs()] == ["queued"]
    assert count(kit, "deliveries") == 0
    out = cli("prune", "--older-than", "30d", "--db", str(new_db("b.db")))
    assert out.returncode == 0 and "jobs 0" in out.stdout
    bad = cli("prune", "--older-than", "soon", "--db", str(new_db("b.db")))
    assert bad.returncode == 2 and "30d" in bad.stderr


@pytest.mark.sqlite_only("VACUUM INTO a file")
def test_vacuum_into_backs_up_a_live_database(kit: AgentKit, tmp_path: Path) -> None:
    kit.run_turn("cli:me", "keep me")
    kit.store.backup(tmp_path / "backup.db")
    with AgentKit(tmp_path / "backup.db") as copy:
        assert copy.history("cli:me")[0]["content"] == "keep me"
