"""Benchmark agentkit's durable job queue against bare SQLite and peer queues (SQLite, PostgreSQL).

Setup (this script installs nothing):  pip install -e '.[bench]'
Run from the repository root:          python bench/queue.py [--quick] [--dir DIR]

One run, one table. Every measurement uses a fresh database file in a temporary folder
(on disk by default, so fsync costs are real) and every job carries an integer id: each
handler records it, and the run checks that every id ran exactly once and that nothing
stays queued. A duplicate, a loss or a crash makes the exit status non-zero; a missed
target is only reported.

Rows: enqueue (one job per call, and batches) against bare apsw inserts; drain with 1 and
2 worker processes against a bare apsw claim/complete loop (one job per transaction, and
batched like agentkit's worker), huey's SQLite storage, litequeue and persist-queue;
per-job overhead with 5 ms handlers against huey's consumer path (`huey.execute`); claim
cost and empty-poll cost behind backlogs a worker cannot take (up to 1M jobs queued for
later, 1M ready jobs of another task, 100k jobs blocked behind a running job of their
target), and `Worker.run_one(job id)` (run_turn's claim) with 1M foreign ready jobs;
peak memory while draining; idle wake-up latency and idle CPU.

PostgreSQL rows (skipped with --no-postgres), in the same run, against procrastinate and
pgqueuer, each set up as its documentation says, every commit durable (fsync and
synchronous_commit on): enqueue one at a time and in bulk, drain with 1 and 4 worker
processes, claim cost behind 1k and 1M jobs queued for later (built with one INSERT ...
SELECT generate_series), 100k jobs blocked behind a running job of their target, and idle
wake-up and CPU. The server is AGENTKIT_BENCH_POSTGRES (a database the bench may create
schemas in) or a private cluster that `.ci/postgres` starts (it installs Debian's
postgresql when missing) and the bench stops.
"""

from __future__ import annotations

import os
import sys

# This file is called queue.py: take its folder off sys.path so that `import queue` (used by
# multiprocessing) finds the standard library, and benchmark the agentkit of this checkout.
if os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import platform
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import astuple, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

try:
    import apsw
    import huey
    import litequeue
    import persistqueue
    import pgqueuer
    import procrastinate
    import psycopg
    from huey.storage import SqliteStorage
    from pgqueuer.domain.types import QueueExecutionMode
except ImportError as missing:  # pragma: no cover - depends on the environment
    sys.exit(f"missing benchmark dependency ({missing}); run: pip install -e '.[bench]'")

try:
    import agentkit
except Exception:  # reported in the table; the peers still run
    agentkit = None
    AGENTKIT_ERROR = traceback.format_exc().strip().splitlines()[-1]
else:
    AGENTKIT_ERROR = ""

Payload = dict[str, Any]
Handler = Callable[[Payload], None]
SPAWN = multiprocessing.get_context("spawn")
CHILD_TIMEOUT = 900.0  # seconds; a child slower than this counts as a crash
LATER = 86_400.0  # delay of the jobs that wait behind the ready ones in the latency rows


@dataclass(frozen=True)
class Config:
    """Job counts for one run."""

    enqueue_jobs: int  # row 1: one enqueue call per job
    batch_jobs: int  # row 2: total jobs, enqueued batch_size at a time
    batch_size: int
    drain_jobs: int  # row 3, per queue
    slow_drain_jobs: int  # row 3, peers that fsync every commit or scan done rows per claim
    latency_sizes: tuple[int, ...]  # row 4: jobs queued for later while claiming
    foreign_sizes: tuple[int, ...]  # row 4: ready jobs of a task the worker does not take
    blocked_sizes: tuple[int, ...]  # row 4: jobs blocked behind a running job of their target
    latency_jobs: int  # ready jobs timed per size, in latency_rounds rounds
    latency_rounds: int
    slow_handler_jobs: int  # row 3b: jobs whose handler sleeps 5 ms
    memory_jobs: int  # row 5
    wake_samples: int  # row 6
    idle_seconds: float
    repeats: int  # rows 1-3 keep the best of this many runs (background load only slows)
    pg_enqueue_jobs: int  # PostgreSQL rows: one enqueue call per job
    pg_batch_jobs: int  # enqueued batch_size at a time
    pg_drain_jobs: int  # per queue (procrastinate: a fifth, it runs one job per round trip)
    pg_waiting_sizes: tuple[int, ...]  # jobs queued for later while claiming
    pg_waiting_jobs: int  # ready jobs run behind them (procrastinate: a tenth)
    pg_wake_samples: int


FULL_RUN = Config(
    enqueue_jobs=20_000,
    batch_jobs=100_000,
    batch_size=1_000,
    drain_jobs=20_000,
    slow_drain_jobs=4_000,
    latency_sizes=(1_000, 100_000, 1_000_000),
    foreign_sizes=(1_000, 1_000_000),
    blocked_sizes=(1_000, 100_000),
    latency_jobs=1_000,
    latency_rounds=10,
    slow_handler_jobs=400,
    memory_jobs=100_000,
    wake_samples=20,
    idle_seconds=3.0,
    repeats=2,
    pg_enqueue_jobs=1_000,
    pg_batch_jobs=20_000,
    pg_drain_jobs=5_000,
    pg_waiting_sizes=(1_000, 1_000_000),
    pg_waiting_jobs=1_000,
    pg_wake_samples=30,
)
QUICK_RUN = Config(
    enqueue_jobs=1_000,
    batch_jobs=5_000,
    batch_size=500,
    drain_jobs=1_000,
    slow_drain_jobs=300,
    latency_sizes=(1_000, 10_000),
    foreign_sizes=(1_000, 10_000),
    blocked_sizes=(1_000, 10_000),
    latency_jobs=200,
    latency_rounds=5,
    slow_handler_jobs=60,
    memory_jobs=3_000,
    wake_samples=5,
    idle_seconds=1.0,
    repeats=1,
    pg_enqueue_jobs=200,
    pg_batch_jobs=2_000,
    pg_drain_jobs=1_000,
    pg_waiting_sizes=(1_000, 10_000),
    pg_waiting_jobs=200,
    pg_wake_samples=5,
)


class CheckFailed(Exception):
    """A job ran twice, got lost, or stayed queued."""


class Tally:
    """How many times each job id 0..n-1 ran; the extra last slot counts unknown ids."""

    def __init__(self, n: int) -> None:
        self.counts = bytearray(n + 1)

    def record(self, payload: Payload) -> None:
        """Count one run of the job carrying `payload`."""
        i = payload["i"]
        i = i if 0 <= i < len(self.counts) - 1 else -1
        self.counts[i] = min(self.counts[i] + 1, 255)

    def merge(self, counts: bytes) -> None:
        """Add the counts recorded by another process."""
        pairs = zip(self.counts, counts, strict=True)
        self.counts = bytearray(min(a + b, 255) for a, b in pairs)

    def verify(self, pending: int, drained: bool = True) -> None:
        """Raise CheckFailed unless each job ran once or, when not drained, is still pending."""
        ids = self.counts[:-1]
        problems = []
        if dup := len(ids) - ids.count(0) - ids.count(1):
            problems.append(f"{dup} jobs ran more than once")
        if self.counts[-1]:
            problems.append(f"{self.counts[-1]} runs of unknown job ids")
        if (missing := ids.count(0)) != pending:
            problems.append(f"{missing} jobs never ran but {pending} are not done")
        if drained and pending:
            problems.append(f"{pending} jobs not done after draining")
        if problems:
            raise CheckFailed("; ".join(problems))


def payloads(stop: int, start: int = 0) -> list[Payload]:
    """The payloads of jobs start..stop-1."""
    return [{"i": i} for i in range(start, stop)]


def chunks(items: list[Payload], size: int) -> Iterator[list[Payload]]:
    """Consecutive slices of at most `size` items."""
    for at in range(0, len(items), size):
        yield items[at : at + size]


@contextlib.contextmanager
def sync_off(conn: sqlite3.Connection) -> Iterator[None]:
    """Turn fsync off on a peer's connection while filling it (untimed setup only)."""
    before = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.execute("PRAGMA synchronous=OFF")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA synchronous={before}")


# ──────────────────────────────────────── queues ────────────────────────────────────────


class Backend(ABC):
    """One queue implementation opened on one database file."""

    label: ClassVar[str]
    two_process_problem: ClassVar[str] = ""  # why it cannot drain from 2 processes

    @abstractmethod
    def __init__(self, path: Path) -> None: ...

    def put(self, payload: Payload) -> None:
        """Enqueue one job in its own transaction."""
        raise NotImplementedError

    def put_many(self, batch: list[Payload]) -> None:
        """Enqueue a batch in one transaction."""
        raise NotImplementedError

    def fill(self, jobs: list[Payload]) -> None:
        """Untimed setup: enqueue all jobs, as fast as the queue allows."""
        for batch in chunks(jobs, 50_000):
            self.put_many(batch)

    @abstractmethod
    def drain(self, handle: Handler) -> None:
        """Run jobs in this process until none is ready."""

    @abstractmethod
    def pending(self) -> int:
        """Jobs not done (queued, claimed, or failed)."""

    @abstractmethod
    def close(self) -> None: ...


class AgentKitBackend(Backend):
    """agentkit, the queue under test, at synchronous=NORMAL."""

    label = "agentkit, sync NORMAL"

    def __init__(self, path: Path) -> None:
        if agentkit is None:
            raise RuntimeError(f"agentkit is not importable: {AGENTKIT_ERROR}")
        self.kit = agentkit.AgentKit(str(path), synchronous="normal")
        self.handle: Handler = lambda payload: None

        @self.kit.task
        def record(payload: Payload, ctx: Any) -> None:
            self.handle(payload)

    def put(self, payload: Payload) -> None:
        self.kit.enqueue("record", payload)

    def put_many(self, batch: list[Payload], delay: float = 0.0, **options: Any) -> None:
        self.kit.enqueue_many(options.pop("task", "record"), batch, delay=delay, **options)

    def drain(self, handle: Handler) -> None:
        self.handle = handle
        self.kit.work(until_idle=True)

    def serve(self, handle: Handler, stop: threading.Event) -> None:
        """Run jobs, waiting for new ones when idle, until `stop` is set."""
        self.handle = handle
        self.kit.work(stop=stop)

    def pending(self) -> int:
        counts = self.kit.store.job_counts()  # what `kit.doctor()` reports, without its checks
        return sum(n for state, n in counts.items() if state != "done")

    def close(self) -> None:
        self.kit.close()


class BareBackend(Backend):
    """Plain apsw on a small job table: the floor that any queue library adds cost to.

    WAL, synchronous=NORMAL, a busy timeout; claim and complete are one transaction each.
    """

    label = "bare apsw claim/complete loop"
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS jobs(
            id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload TEXT NOT NULL,
            state TEXT NOT NULL, run_at REAL NOT NULL, owner TEXT);
        CREATE INDEX IF NOT EXISTS jobs_queued ON jobs(id) WHERE state = 'queued';
    """
    INSERT = "INSERT INTO jobs(name, payload, state, run_at) VALUES(?, ?, 'queued', ?)"
    CLAIM = (
        "UPDATE jobs SET state='running', owner=? WHERE id = (SELECT id FROM jobs"
        " WHERE state='queued' ORDER BY id LIMIT 1) RETURNING id, payload"
    )

    def __init__(self, path: Path) -> None:
        self.db = apsw.Connection(str(path))
        self.db.set_busy_timeout(10_000)
        self.db.execute("PRAGMA journal_mode=WAL").fetchall()
        self.db.execute("PRAGMA synchronous=NORMAL").fetchall()
        self.db.execute(self.SCHEMA).fetchall()

    def put(self, payload: Payload) -> None:
        self.db.execute(self.INSERT, ("record", json.dumps(payload), time.time()))

    def put_many(self, batch: list[Payload]) -> None:
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(self.INSERT, [("record", json.dumps(p), now) for p in batch])
        self.db.execute("COMMIT")

    def drain(self, handle: Handler) -> None:
        db, owner = self.db, str(os.getpid())
        while True:
            db.execute("BEGIN IMMEDIATE")
            claimed = db.execute(self.CLAIM, (owner,)).fetchall()
            db.execute("COMMIT")
            if not claimed:
                return
            job_id, payload = claimed[0]
            handle(json.loads(payload))
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE jobs SET state='done' WHERE id=?", (job_id,))
            db.execute("COMMIT")

    def pending(self) -> int:
        return self.db.execute("SELECT count(*) FROM jobs WHERE state != 'done'").fetchall()[0][0]

    def close(self) -> None:
        self.db.close()


class BareBatchBackend(BareBackend):
    """Plain apsw that batches as agentkit's worker does: a claim takes up to 64 jobs (sized
    so that a batch takes about 5 ms) in one transaction, and their completions are one
    transaction: the floor for agentkit's own loop."""

    label = "bare apsw loop, batched like agentkit"
    CLAIM_MANY = (
        "UPDATE jobs SET state='running', owner=? WHERE id IN (SELECT id FROM jobs"
        " WHERE state='queued' ORDER BY id LIMIT ?) RETURNING id, payload"
    )

    def drain(self, handle: Handler) -> None:
        db, owner, batch = self.db, str(os.getpid()), 1
        while True:
            db.execute("BEGIN IMMEDIATE")
            claimed = db.execute(self.CLAIM_MANY, (owner, batch)).fetchall()
            db.execute("COMMIT")
            if not claimed:
                return
            began = time.monotonic()
            for _, payload in claimed:
                handle(json.loads(payload))
            db.execute("BEGIN IMMEDIATE")
            db.executemany("UPDATE jobs SET state='done' WHERE id=?", [(i,) for i, _ in claimed])
            db.execute("COMMIT")
            per_job = (time.monotonic() - began) / len(claimed)
            batch = max(1, min(64, int(0.005 / max(per_job, 1e-6))))


class NormalSyncSqliteStorage(SqliteStorage):
    """huey's SqliteStorage at synchronous=NORMAL: its `fsync` flag only sets OFF or FULL."""

    def _create_connection(self) -> sqlite3.Connection:
        conn = super()._create_connection()
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn


class HueyBackend(Backend):
    """huey's SQLite storage at its defaults; tasks dequeued and executed as a worker does."""

    label = "huey SqliteHuey, defaults: sync FULL"
    storage_class: ClassVar[type[SqliteStorage]] = SqliteStorage

    def __init__(self, path: Path) -> None:
        self.huey = huey.SqliteHuey(
            "bench", filename=str(path), results=False, storage_class=self.storage_class
        )
        self.handle: Handler = lambda payload: None

        def record(payload: Payload) -> None:
            self.handle(payload)

        record.__module__ = "bench_queue"  # one task name in the parent and spawned workers
        self.task = self.huey.task(name="record")(record)

    def fill(self, jobs: list[Payload]) -> None:
        with sync_off(self.huey.storage.conn):
            for payload in jobs:
                self.huey.enqueue(self.task.s(payload))

    def drain(self, handle: Handler) -> None:
        """Dequeue and run tasks as huey's consumer does: `huey.execute(task)` (revocation
        check, signals, result handling), not the bare `task.execute()`."""
        self.handle = handle
        while (task := self.huey.dequeue()) is not None:
            self.huey.execute(task)

    def pending(self) -> int:
        return self.huey.pending_count()

    def close(self) -> None:
        self.huey.storage.close()


class HueyNormalBackend(HueyBackend):
    """huey's SQLite storage at synchronous=NORMAL, like agentkit here."""

    label = "huey SqliteHuey, sync NORMAL"
    storage_class = NormalSyncSqliteStorage


class LiteQueueBackend(Backend):
    """litequeue's LiteQueue: put / pop / done (it sets synchronous=NORMAL itself).

    Its busy timeout is raised from the stdlib's 5 s to agentkit's 10 s: two processes
    draining it otherwise hit "database is locked" (each pop scans the done rows).
    """

    label = "litequeue LiteQueue, sync NORMAL"

    def __init__(self, path: Path) -> None:
        self.queue = litequeue.LiteQueue(str(path), queue_name="jobs", timeout=10.0)

    def fill(self, jobs: list[Payload]) -> None:
        with sync_off(self.queue.conn):
            for payload in jobs:
                self.queue.put(json.dumps(payload))

    def drain(self, handle: Handler) -> None:
        while (message := self.queue.pop()) is not None:
            handle(json.loads(message.data))
            self.queue.done(message.message_id)

    def pending(self) -> int:
        return self.queue.qsize()

    def close(self) -> None:
        self.queue.close()


class PersistQueueBackend(Backend):
    """persist-queue's SQLiteAckQueue: put / get / ack, at its defaults (synchronous=FULL)."""

    label = "persist-queue SQLiteAckQueue, defaults: sync FULL"
    two_process_problem = "get() reads a row, then marks it in a 2nd transaction: runs twice"

    def __init__(self, path: Path) -> None:
        self.queue = persistqueue.SQLiteAckQueue(str(path.parent), db_file_name=path.name)

    def fill(self, jobs: list[Payload]) -> None:
        with sync_off(self.queue._putter):  # its write connection; untimed setup only
            for payload in jobs:
                self.queue.put(payload)

    def drain(self, handle: Handler) -> None:
        while True:
            try:
                item = self.queue.get(block=False, raw=True)
            except persistqueue.Empty:
                return
            handle(item["data"])
            self.queue.ack(id=item["pqid"])

    def pending(self) -> int:
        return self.queue.qsize() + self.queue.unack_count()

    def close(self) -> None:
        self.queue.close()


# ─────────────────────────────────── PostgreSQL queues ───────────────────────────────────
# Each opened on a URL whose search_path selects a fresh schema of the bench's server (see
# PgServer), so every measurement starts from an empty database, as the SQLite rows do.


def _pg_count(url: str, sql: str) -> int:
    """The single number a query answers, on a connection of its own."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


class PgAgentKitBackend(AgentKitBackend):
    """agentkit on PostgreSQL (every commit durable: synchronous_commit=on)."""

    label = "agentkit, PostgreSQL"

    def fill_later(self, count: int) -> None:
        """Untimed setup: `count` jobs to run tomorrow, in one INSERT ... SELECT."""
        with psycopg.connect(self.kit.store._url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO jobs (name, payload, state, priority, run_at, created_at, retries,"
                " backoff) SELECT 'record', '{\"i\":-1}', 'queued', 0,"
                " extract(epoch FROM now()) + 86400, extract(epoch FROM now()), 3, 1.0"
                " FROM generate_series(1, %s)",
                (count,),
            )


class ProcrastinateBackend(Backend):
    """procrastinate as its documentation sets it up: an App on a PsycopgConnector, tasks
    deferred with `defer` / `batch_defer`, a worker at its defaults (concurrency 1,
    LISTEN/NOTIFY, jobs kept after they succeed) that stops when the queue is empty."""

    label = "procrastinate, worker defaults"

    def __init__(self, where: str) -> None:
        self.url = where
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=where))
        self.handle: Handler = lambda payload: None

        def record(**payload: Any) -> None:
            self.handle(payload)

        record.__module__ = "bench_queue"
        self.task = self.app.task(name="record")(record)
        self.app.open()
        if (
            _pg_count(
                where,
                "SELECT count(*) FROM pg_tables WHERE tablename = 'procrastinate_jobs'"
                " AND schemaname = current_schema()",
            )
            == 0
        ):
            self.app.schema_manager.apply_schema()

    def put(self, payload: Payload) -> None:
        self.task.defer(**payload)

    def put_many(self, batch: list[Payload]) -> None:
        self.task.batch_defer(*batch)

    def fill_later(self, count: int) -> None:
        """Untimed setup: `count` jobs scheduled for tomorrow, in one INSERT ... SELECT (its
        triggers off meanwhile: they only log events and notify)."""
        with psycopg.connect(self.url, autocommit=True) as conn, conn.transaction():
            conn.execute("ALTER TABLE procrastinate_jobs DISABLE TRIGGER USER")
            conn.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at) "
                "SELECT 'default', 'record', jsonb_build_object('i', -1), "
                "now() + interval '1 day' FROM generate_series(1, %s)",
                (count,),
            )
            conn.execute("ALTER TABLE procrastinate_jobs ENABLE TRIGGER USER")

    async def _worker(self, wait: bool) -> None:
        async with self.app.open_async():
            await self.app.run_worker_async(wait=wait, install_signal_handlers=False)

    def drain(self, handle: Handler) -> None:
        self.handle = handle
        self.app.close()  # the worker opens its own pool, in its event loop
        asyncio.run(self._worker(wait=False))
        self.app.open()

    def serve(self, handle: Handler, stop: Any) -> None:
        """Run jobs, waiting for new ones when idle, until `stop` is set."""
        self.handle = handle
        self.app.close()
        asyncio.run(_until_set(self._worker(wait=True), stop))
        self.app.open()

    def pending(self) -> int:
        return _pg_count(
            self.url, "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
        )

    def close(self) -> None:
        self.app.close()


class PgQueuerBackend(Backend):
    """pgqueuer as its documentation sets it up: `Queries.enqueue` (a list of jobs for a
    batch), a PgQueuer on a PsycopgDriver with an async entrypoint, `run()` at its
    defaults (batch_size 10) in drain mode; its tables `durable` (the default: logged)."""

    label = "pgqueuer, run() defaults"

    def __init__(self, where: str) -> None:
        self.url = where
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(
            psycopg.AsyncConnection.connect(where, autocommit=True)
        )
        self.queries = pgqueuer.Queries(pgqueuer.PsycopgDriver(self.conn))
        if (
            _pg_count(
                where,
                "SELECT count(*) FROM pg_tables WHERE tablename = 'pgqueuer'"
                " AND schemaname = current_schema()",
            )
            == 0
        ):
            self.loop.run_until_complete(self.queries.install())

    def put(self, payload: Payload) -> None:
        self.loop.run_until_complete(self.queries.enqueue("record", json.dumps(payload).encode()))

    def put_many(self, batch: list[Payload]) -> None:
        data = [json.dumps(payload).encode() for payload in batch]
        self.loop.run_until_complete(
            self.queries.enqueue(["record"] * len(batch), data, [0] * len(batch))
        )

    def fill_later(self, count: int) -> None:
        """Untimed setup: `count` jobs to run tomorrow, in one INSERT ... SELECT."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pgqueuer (priority, entrypoint, payload, execute_after, status) "
                "SELECT 0, 'record', convert_to('{\"i\":-1}', 'UTF8'), "
                "now() + interval '1 day', 'queued' FROM generate_series(1, %s)",
                (count,),
            )

    async def _run(self, handle: Handler, mode: Any, stop: Any = None) -> None:
        """Run a worker in `mode`; with `stop`, until it is set (then its shutdown event)."""
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        worker = pgqueuer.PgQueuer(pgqueuer.PsycopgDriver(conn))

        @worker.entrypoint("record")
        async def record(job: Any) -> None:
            handle(json.loads(job.payload))

        if stop is not None:
            _when_set(stop, worker.shutdown.set)
        try:
            await worker.run(mode=mode)
        finally:
            await conn.close()

    def drain(self, handle: Handler) -> None:
        self.loop.run_until_complete(self._run(handle, QueueExecutionMode.drain))

    def serve(self, handle: Handler, stop: Any) -> None:
        """Run jobs, waiting for new ones when idle, until `stop` is set."""
        self.loop.run_until_complete(self._run(handle, QueueExecutionMode.continuous, stop))

    def pending(self) -> int:
        return _pg_count(self.url, "SELECT count(*) FROM pgqueuer")

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def _when_set(stop: Any, action: Callable[[], object]) -> None:
    """Call `action` in the running event loop once the (process or thread) event `stop`
    is set."""
    loop = asyncio.get_running_loop()

    def watch() -> None:
        stop.wait()
        loop.call_soon_threadsafe(action)

    threading.Thread(target=watch, daemon=True).start()


async def _until_set(work: Any, stop: Any) -> None:
    """Run the coroutine `work` until the event `stop` is set, then cancel it (how a
    procrastinate worker run as a task is stopped)."""
    task = asyncio.ensure_future(work)
    _when_set(stop, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


BACKENDS: dict[str, type[Backend]] = {
    "agentkit": AgentKitBackend,
    "bare": BareBackend,
    "bare-batched": BareBatchBackend,
    "huey": HueyBackend,
    "huey-normal": HueyNormalBackend,
    "litequeue": LiteQueueBackend,
    "persist-queue": PersistQueueBackend,
    "pg-agentkit": PgAgentKitBackend,
    "procrastinate": ProcrastinateBackend,
    "pgqueuer": PgQueuerBackend,
}
POSTGRES = ("pg-agentkit", "procrastinate", "pgqueuer")  # opened on a URL, not a file
# Peers drained with fewer jobs to fit the time budget: huey and persist-queue at their
# defaults fsync every commit; litequeue and persist-queue scan past done rows on each claim.
SLOW = {"huey", "litequeue", "persist-queue"}


def open_backend(name: str, where: str | Path) -> Backend:
    """Open the named queue on a file or, for the PostgreSQL ones, a URL."""
    return BACKENDS[name](where if name in POSTGRES else Path(where))  # type: ignore[arg-type]


def pending_after(name: str, path: str | Path) -> int:
    """Reopen a queue and count the jobs left in it."""
    backend = open_backend(name, path)
    try:
        return backend.pending()
    finally:
        backend.close()


# ─────────────────────────────────────── processes ───────────────────────────────────────


def _drain_worker(name: str, path: str, n: int, ready: Any, start: Any, out: Any) -> None:
    """Child process: open the queue, wait for the start signal, drain, report."""
    try:
        backend = open_backend(name, path)
        tally = Tally(n)
        ready.wait()
        start.wait()
        backend.drain(tally.record)
        finished = time.perf_counter()
        backend.close()
        out.put((finished, bytes(tally.counts), ""))
    except BaseException:
        ready.abort()  # do not keep the parent waiting for a worker that is gone
        out.put((0.0, b"", traceback.format_exc()))


def timed_drain(name: str, path: str | Path, n: int, procs: int) -> tuple[float, Tally]:
    """Drain `path` with `procs` processes: seconds from the start signal to all done."""
    ready, start, out = SPAWN.Barrier(procs + 1), SPAWN.Event(), SPAWN.Queue()
    workers = [
        SPAWN.Process(target=_drain_worker, args=(name, str(path), n, ready, start, out))
        for _ in range(procs)
    ]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: collect why
        ready.wait(timeout=CHILD_TIMEOUT)
    began = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
    start.set()
    tally, finished, errors = Tally(n), [], []
    for _ in workers:
        end, counts, error = out.get(timeout=CHILD_TIMEOUT)
        if error:
            errors.append(error)
        else:
            finished.append(end)
            tally.merge(counts)
    for worker in workers:
        worker.join(timeout=CHILD_TIMEOUT)
    if errors:
        raise RuntimeError(f"{name} worker crashed:\n{errors[0]}")
    return max(finished) - began, tally


def serve_jobs(backend: Backend, n: int) -> tuple[float, Tally]:
    """Run a queue's worker until it has run `n` jobs (ids 0..n-1); seconds it took."""
    tally, stop, ran = Tally(n), threading.Event(), [0]

    def handle(payload: Payload) -> None:
        tally.record(payload)
        ran[0] += 1
        if ran[0] == n:
            stop.set()

    began = time.perf_counter()
    backend.serve(handle, stop)  # type: ignore[attr-defined]
    return time.perf_counter() - began, tally


def run_in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Call a module-level function in a fresh spawned process; its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=SPAWN) as pool:
        return pool.submit(function, *args).result(timeout=CHILD_TIMEOUT)


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status, e.g. VmRSS or VmHWM."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_probe(path: str, n: int) -> tuple[float, bytes]:
    """Child process: MB of RSS high-water while draining, above the RSS after opening."""
    backend = AgentKitBackend(Path(path))
    tally = Tally(n)
    baseline = status_kb("VmRSS")
    with contextlib.suppress(OSError):  # reset the high-water mark to now (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    backend.drain(tally.record)
    peak = status_kb("VmHWM")
    backend.close()
    return max(peak - baseline, 0) / 1024, bytes(tally.counts)


def _idle_worker(name: str, path: str, n: int, ready: Any, stop: Any, out: Any) -> None:
    """Child process: an idle worker reporting each job's enqueue-to-start delay."""
    backend = open_backend(name, path)
    tally = Tally(n)

    def handle(payload: Payload) -> None:
        out.put(time.time() - payload["t"])
        tally.record(payload)

    ready.set()
    backend.serve(handle, stop)
    backend.close()
    out.put(bytes(tally.counts))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PgServer:
    """The PostgreSQL server of the PostgreSQL rows: AGENTKIT_BENCH_POSTGRES (the URL of a
    database the bench may create schemas in), else a private cluster that the tests'
    `.ci/postgres` starts on a free loopback port (fsync and synchronous_commit on), stopped
    at the end. Each measurement gets a schema of its own."""

    def __init__(self) -> None:
        self.url = os.environ.get("AGENTKIT_BENCH_POSTGRES", "")
        self.folder = ""
        self.schemas: list[str] = []
        if not self.url:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            script = Path(__file__).resolve().parent.parent / ".ci" / "postgres"
            started = subprocess.run(
                ["bash", str(script)],
                env={**os.environ, "AGENTKIT_PG_PORT": str(port)},
                capture_output=True,
                text=True,
            )
            if started.returncode:
                raise RuntimeError(f"could not start PostgreSQL (.ci/postgres): {started.stderr}")
            self.folder, self.url = started.stdout.strip().splitlines()[-2:]
        with psycopg.connect(self.url, autocommit=True) as conn:
            self.version = conn.execute("SHOW server_version").fetchone()[0]
            self.commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
            self.fsync = conn.execute("SHOW fsync").fetchone()[0]

    def fresh(self) -> str:
        """A URL whose search_path selects a new, empty schema."""
        schema = f"bench_{os.getpid()}_{len(self.schemas)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        joiner = "&" if "?" in self.url else "?"
        return f"{self.url}{joiner}options=-csearch_path%3D{schema}"

    def describe(self) -> str:
        return (
            f"PostgreSQL {self.version.split()[0]} (fsync={self.fsync}, synchronous_commit="
            f"{self.commit}; {'private cluster' if self.folder else 'AGENTKIT_BENCH_POSTGRES'}"
            f"); procrastinate {version('procrastinate')}, pgqueuer {version('pgqueuer')}, "
            f"psycopg {version('psycopg')}"
        )

    def close(self) -> None:
        if self.folder:
            pg_ctl = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
            stop = [str(pg_ctl), "-D", f"{self.folder}/data", "stop", "-m", "fast"]
            if os.geteuid() == 0:
                stop = ["runuser", "-u", "postgres", "--", *stop]
            subprocess.run(stop, capture_output=True)
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        with psycopg.connect(self.url, autocommit=True) as conn:
            for schema in self.schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# ───────────────────────────────────────── table ─────────────────────────────────────────


@dataclass(frozen=True)
class Target:
    """A bound that a value should meet, e.g. >= 0.7."""

    op: str  # ">=", "<=" or "<"
    bound: float
    unit: str = ""

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.bound
        return value <= self.bound if self.op == "<=" else value < self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}{self.unit}"


@dataclass
class Row:
    """One line of the result table."""

    measure: str
    agentkit: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    ok: str = ""


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def judge(value: float, target: Target | None) -> tuple[str, str]:
    """The target and ok cells for a value."""
    if target is None:
        return "", ""
    return str(target), "yes" if target.met(value) else "NO"


def print_table(rows: list[Row]) -> None:
    header = ("measure", "agentkit", "baseline (name)", "ratio", "target", "ok")
    lines = [header, *map(astuple, rows)]
    widths = [max(len(line[col]) for line in lines) for col in range(len(lines[0]))]
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            print("-+-".join("-" * w for w in widths))


# ─────────────────────────────────────── benchmark ───────────────────────────────────────


class Bench:
    """Runs every measurement and collects the table rows."""

    def __init__(self, config: Config, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.rows: list[Row] = []
        self.failed = False
        self._databases = 0
        self.began = time.perf_counter()
        self.server: PgServer | None = None

    def fresh(self, name: str) -> Path:
        """A path for a new database file in a folder of its own."""
        self._databases += 1
        folder = self.workdir / f"{self._databases:02d}-{name}"
        folder.mkdir()
        return folder / "queue.db"

    def where(self, name: str, purpose: str) -> str | Path:
        """A fresh database for one measurement of the named queue: a file, or for the
        PostgreSQL queues a new schema of the bench's server."""
        if name in POSTGRES:
            if self.server is None:
                raise RuntimeError("the PostgreSQL rows need a server (see --no-postgres)")
            return self.server.fresh()
        return self.fresh(f"{purpose}-{name}")

    @contextlib.contextmanager
    def section(self, measure: str) -> Iterator[None]:
        """Turn a crash or a failed check into a FAIL row instead of ending the run."""
        print(f"[{time.perf_counter() - self.began:5.0f} s] {measure}", file=sys.stderr)
        try:
            yield
        except Exception as exc:  # reported in the table and the exit status
            self.failed = True
            kind = "check failed" if isinstance(exc, CheckFailed) else type(exc).__name__
            last = (str(exc).strip().splitlines() or [""])[-1]
            self.rows.append(Row(measure, f"FAIL {kind}: {last}"[:110], ok="FAIL"))
            if not isinstance(exc, CheckFailed):
                traceback.print_exc()

    def attempt(self, measure: str, measurement: Callable[[], float]) -> float | None:
        """The measurement's value, or None after adding a FAIL row."""
        with self.section(measure):
            return measurement()
        return None

    def compare(
        self, measure: str, ours: float, theirs: float, name: str, target: Target | None
    ) -> None:
        """Add a row comparing two rates (ratio = ours / theirs)."""
        ratio = ours / theirs
        baseline = f"{rate(theirs)} ({name})"
        self.rows.append(Row(measure, rate(ours), baseline, f"{ratio:.2f}", *judge(ratio, target)))

    # rows 1 and 2: enqueue

    def best(self, measurement: Callable[[], float], repeats: int | None = None) -> float:
        """The highest of `repeats` runs of a rate measurement (default: the config's)."""
        return max(measurement() for _ in range(repeats or self.config.repeats))

    def enqueue_rate(self, name: str, batch_size: int, total: int) -> float:
        """Jobs/s enqueued with `batch_size` jobs per transaction (1: one `put` per job)."""
        backend = open_backend(name, self.where(name, "enqueue"))
        jobs = payloads(total)
        began = time.perf_counter()
        if batch_size == 1:
            for payload in jobs:
                backend.put(payload)
        else:
            for batch in chunks(jobs, batch_size):
                backend.put_many(batch)
        elapsed = time.perf_counter() - began
        if name in POSTGRES:  # counted, not drained: procrastinate would take longer than the row
            if (pending := backend.pending()) != total:
                raise CheckFailed(f"{pending} jobs queued after enqueueing {total}")
        else:
            tally = Tally(total)
            backend.drain(tally.record)
            tally.verify(backend.pending())
        backend.close()
        return total / elapsed

    def enqueue_rows(self) -> None:
        cfg = self.config
        cases = [
            ("enqueue, 1 job per call", 1, cfg.enqueue_jobs, "bare single-row insert"),
            (
                f"enqueue_many, {cfg.batch_size:,} jobs per call",
                cfg.batch_size,
                cfg.batch_jobs,
                "bare executemany",
            ),
        ]
        for measure, size, total, baseline in cases:
            with self.section(measure):
                theirs = self.best(partial(self.enqueue_rate, "bare", size, total))
                ours = self.best(partial(self.enqueue_rate, "agentkit", size, total))
                self.compare(f"{measure} ({total:,})", ours, theirs, baseline, Target(">=", 0.7))

    # row 3: drain

    def jobs_for(self, name: str) -> int:
        """Jobs per drain: fewer for the slow peers."""
        if name in POSTGRES:
            jobs = self.config.pg_drain_jobs
            return jobs // 5 if name == "procrastinate" else jobs
        return self.config.slow_drain_jobs if name in SLOW else self.config.drain_jobs

    def drain_rate(self, name: str, procs: int) -> float:
        """Jobs/s for `procs` processes draining a pre-filled queue (best of repeats)."""
        return self.best(partial(self.drain_once, name, procs), 1 if name in SLOW else None)

    def drain_once(self, name: str, procs: int) -> float:
        """Jobs/s for one drain of a fresh queue."""
        n = self.jobs_for(name)
        path = self.where(name, f"drain{procs}")
        backend = open_backend(name, path)
        backend.fill(payloads(n))
        backend.close()
        elapsed, tally = timed_drain(name, path, n, procs)
        tally.verify(pending_after(name, path))
        return n / elapsed

    def drain_rows(self) -> None:
        cfg = self.config
        targets = {"bare-batched": Target(">=", 0.8), "huey-normal": Target(">=", 1.0)}
        for procs in (1, 2):
            measure = f"drain, {procs} process{'es' if procs > 1 else ''}, {cfg.drain_jobs:,} jobs"
            ours = self.attempt(f"{measure}, agentkit", partial(self.drain_rate, "agentkit", procs))
            ours_cell = "FAIL (see above)" if ours is None else rate(ours)
            for name, backend in BACKENDS.items():
                if name == "agentkit" or name in POSTGRES:  # (those: the PostgreSQL rows)
                    continue
                label = backend.label
                if (jobs := self.jobs_for(name)) != self.config.drain_jobs:
                    label += f", {jobs:,} jobs"
                if procs > 1 and backend.two_process_problem:
                    problem = f"n/a: {name}: {backend.two_process_problem}"
                    self.rows.append(Row(measure, ours_cell, problem, "-"))
                    continue
                theirs = self.attempt(f"{measure}, {name}", partial(self.drain_rate, name, procs))
                if theirs is None:
                    continue
                if ours is None:
                    self.rows.append(Row(measure, ours_cell, f"{rate(theirs)} ({label})"))
                else:
                    self.compare(measure, ours, theirs, label, targets.get(name))

    # row 4: claim latency

    def claim_costs(self, backlog: int, kind: str, name: str = "agentkit") -> tuple[float, ...]:
        """Seconds per job claimed+completed, and per empty poll (the fastest round of each:
        background load only slows), with a backlog of `backlog` jobs this worker cannot
        take, of one `kind`: "later" (queued for tomorrow), "foreign" (ready, of a task it
        does not handle) or "blocked" (ready, behind a running job of their target). Ready
        jobs are timed in rounds of kit.work(stop=...), the empty poll as
        kit.work(until_idle=True) once nothing is ready. For "foreign", a third cost: per
        job run by id (`Worker.run_one`, as `run_turn` claims its own job)."""
        cfg = self.config
        per_round = cfg.latency_jobs // cfg.latency_rounds
        ready = cfg.latency_jobs + 64 * cfg.latency_rounds  # a round may overshoot by a batch
        by_id = cfg.latency_jobs if kind == "foreign" else 0
        total = backlog + ready + by_id
        held = 1 if kind == "blocked" else 0  # the running job that blocks the backlog
        backend = open_backend(name, self.where(name, f"latency-{kind}-{backlog}"))
        assert isinstance(backend, AgentKitBackend)
        options = {
            "later": {"delay": LATER},
            "foreign": {"task": "foreign", "strict": False},
            "blocked": {"target": "busy"},
        }[kind]
        for batch in chunks(payloads(backlog), 50_000):  # enqueue_many: one executemany each
            backend.put_many(batch, **options)
        if held:  # queued after the backlog, so the first claims meet the backlog blocked
            rowid = agentkit.job_rowid(backend.kit.enqueue("record", {"i": total}, target="busy"))
            if not backend.kit.queue.claim("holder", ["record"], 1, 3600.0, only=rowid):
                raise CheckFailed("the job that blocks the backlog was not claimed")
        backend.put_many(payloads(backlog + ready, start=backlog))
        tally, stop = Tally(total + held), threading.Event()
        done_in_round = 0

        def handle(payload: Payload) -> None:
            nonlocal done_in_round
            tally.record(payload)
            done_in_round += 1
            if done_in_round >= per_round:
                stop.set()

        per_job = []
        for _ in range(cfg.latency_rounds):
            stop.clear()
            done_in_round = 0
            began = time.perf_counter()
            backend.serve(handle, stop)
            per_job.append((time.perf_counter() - began) / done_in_round)
        backend.drain(tally.record)  # the rest of the ready jobs
        polls = []
        for _ in range(21):
            began = time.perf_counter()
            backend.drain(tally.record)
            polls.append(time.perf_counter() - began)
        costs = [min(per_job), min(polls)]
        if by_id:
            ids = backend.kit.enqueue_many("record", payloads(total, start=backlog + ready))
            worker = agentkit.Worker(backend.kit.queue)
            backend.handle = tally.record
            began = time.perf_counter()
            ran = sum(worker.run_one(agentkit.job_rowid(job_id)) for job_id in ids)
            costs.append((time.perf_counter() - began) / by_id)
            if ran != by_id:
                raise CheckFailed(f"run_one ran {ran} of {by_id} jobs")
        tally.verify(backend.pending(), drained=False)
        if backend.pending() != backlog + held:
            raise CheckFailed(f"{backend.pending()} jobs not done, expected {backlog + held}")
        backend.close()
        return tuple(costs)

    def latency_rows(
        self,
        kinds: tuple[str, ...] = ("later", "foreign", "blocked"),
        name: str = "agentkit",
        prefix: str = "",
    ) -> None:
        cfg = self.config
        cases = [
            ("later", cfg.latency_sizes, "queued for later"),
            ("foreign", cfg.foreign_sizes, "ready of another task"),
            ("blocked", cfg.blocked_sizes, "blocked on one running target"),
        ]
        for kind, sizes, backlog in cases:
            if kind not in kinds:
                continue
            with self.section(f"{prefix}claim latency, {backlog}"):
                costs = {size: self.claim_costs(size, kind, name) for size in sizes}
                columns = [
                    (0, "claim+complete per job", Target("<=", 2.0)),
                    (1, "empty poll, work(until_idle)", None),
                ]
                if kind == "foreign":
                    columns.append((2, "run_one(job id) per job, as run_turn", Target("<=", 2.0)))
                for column, what, target in columns:
                    first = costs[sizes[0]][column]
                    for size, cost in costs.items():
                        ratio = cost[column] / first
                        self.rows.append(
                            Row(
                                f"{prefix}{what}, {size:,} {backlog}",
                                f"{cost[column] * 1e3:.3f} ms",
                                f"{first * 1e3:.3f} ms (agentkit, {sizes[0]:,})",
                                f"{ratio:.2f}",
                                *judge(ratio, target if size == sizes[-1] else None),
                            )
                        )

    # PostgreSQL rows

    def waiting_cost(self, name: str, backlog: int) -> float:
        """Seconds per job to run pg_waiting_jobs ready jobs in one worker (claim, run,
        complete; from its start to its last job) behind `backlog` jobs queued for tomorrow
        (the fastest of repeats)."""
        n = self.config.pg_waiting_jobs
        if name == "procrastinate":  # its claim reads the jobs queued for later: 10x fewer
            n //= 10
        backend = open_backend(name, self.where(name, "waiting"))
        backend.fill_later(backlog)  # type: ignore[attr-defined]
        costs = []
        for _ in range(self.config.repeats):
            backend.put_many(payloads(n))
            elapsed, tally = serve_jobs(backend, n)  # a drain would wait for the later jobs
            costs.append(elapsed / n)
            tally.verify(backend.pending() - backlog)
        backend.close()
        return min(costs)

    def postgres_rows(self) -> None:
        """The PostgreSQL rows: agentkit against procrastinate and pgqueuer."""
        cfg, prefix, peers = self.config, "PostgreSQL: ", POSTGRES[1:]
        enqueues = [
            ("enqueue, 1 job per call", 1, cfg.pg_enqueue_jobs),
            (
                f"enqueue in bulk, {cfg.batch_size:,} jobs per call",
                cfg.batch_size,
                cfg.pg_batch_jobs,
            ),
        ]
        for measure, size, total in enqueues:
            with self.section(prefix + measure):
                ours = self.best(partial(self.enqueue_rate, "pg-agentkit", size, total))
                for peer in peers:
                    theirs = self.best(partial(self.enqueue_rate, peer, size, total))
                    label = BACKENDS[peer].label
                    self.compare(f"{prefix}{measure} ({total:,})", ours, theirs, label, None)
        for procs in (1, 4):
            measure = f"{prefix}drain, {procs} process{'es' if procs > 1 else ''}"
            measure += f", {cfg.pg_drain_jobs:,} jobs"
            rates = {
                name: self.attempt(f"{measure}, {name}", partial(self.drain_rate, name, procs))
                for name in POSTGRES
            }
            ours = rates.pop("pg-agentkit")
            theirs = {peer: value for peer, value in rates.items() if value is not None}
            fastest = max(theirs, key=lambda peer: theirs[peer], default=None)
            for peer, value in theirs.items():
                label = BACKENDS[peer].label
                if (jobs := self.jobs_for(peer)) != cfg.pg_drain_jobs:
                    label += f", {jobs:,} jobs"
                if ours is None:
                    self.rows.append(Row(measure, "FAIL (see above)", f"{rate(value)} ({label})"))
                else:
                    target = Target(">=", 1.5) if peer == fastest else None
                    self.compare(measure, ours, value, label, target)
        sizes = cfg.pg_waiting_sizes
        with self.section(f"{prefix}claim latency, queued for later"):
            costs = {name: [self.waiting_cost(name, size) for size in sizes] for name in POSTGRES}
            ours = costs.pop("pg-agentkit")
            what = f"claim+run+complete per job, {cfg.pg_waiting_jobs:,} ready behind"
            for index, size in enumerate(sizes):
                ratio = ours[index] / ours[0]
                last = index == len(sizes) - 1
                self.rows.append(
                    Row(
                        f"{prefix}{what} {size:,} queued for later",
                        f"{ours[index] * 1e3:.3f} ms",
                        f"{ours[0] * 1e3:.3f} ms (agentkit, {sizes[0]:,})",
                        f"{ratio:.2f}",
                        *judge(ratio, Target("<=", 2.0) if last else None),
                    )
                )
                for peer, cost in costs.items():
                    theirs = f"{cost[index] * 1e3:.3f} ms ({BACKENDS[peer].label}"
                    if peer == "procrastinate":
                        theirs += f", {cfg.pg_waiting_jobs // 10:,} ready"
                    theirs += f"; {cost[index] / cost[0]:.2f}x its {sizes[0]:,})"
                    self.rows.append(
                        Row(
                            f"{prefix}{what} {size:,} queued for later",
                            f"{ours[index] * 1e3:.3f} ms",
                            theirs,
                            f"{ours[index] / cost[index]:.2f}",
                        )
                    )
        self.latency_rows(("blocked",), "pg-agentkit", prefix)
        self.idle_rows(POSTGRES, prefix)

    # row 3b: per-job overhead with slow handlers

    def overhead_once(self, name: str) -> float:
        """Seconds per job beyond the handler's own time, draining jobs whose handler
        sleeps 5 ms (so agentkit claims one job per batch), in this process."""
        n = self.config.slow_handler_jobs
        backend = open_backend(name, self.fresh(f"overhead-{name}"))
        backend.fill(payloads(n))
        tally, in_handler = Tally(n), [0.0]

        def handle(payload: Payload) -> None:
            began = time.perf_counter()
            time.sleep(0.005)
            tally.record(payload)
            in_handler[0] += time.perf_counter() - began

        began = time.perf_counter()
        backend.drain(handle)
        elapsed = time.perf_counter() - began
        tally.verify(backend.pending())
        backend.close()
        return (elapsed - in_handler[0]) / n

    def overhead_rows(self) -> None:
        n = self.config.slow_handler_jobs
        measure = f"per-job overhead, 5 ms handlers, 1 process, {n:,} jobs"
        with self.section(measure):
            repeats = range(max(self.config.repeats, 3))  # the least of these runs
            ours = min(self.overhead_once("agentkit") for _ in repeats)
            for name, target in [("huey-normal", Target("<=", 1.0)), ("huey", None)]:
                theirs = min(self.overhead_once(name) for _ in repeats)
                label = f"{BACKENDS[name].label}, huey.execute as its consumer"
                self.rows.append(
                    Row(
                        measure,
                        f"{ours * 1e6:.0f} us",
                        f"{theirs * 1e6:.0f} us ({label})",
                        f"{ours / theirs:.2f}",
                        *judge(ours / theirs, target),
                    )
                )

    # row 5: memory

    def memory_row(self) -> None:
        n = self.config.memory_jobs
        measure = f"peak RSS while draining {n:,} jobs"
        with self.section(measure):
            path = self.fresh("memory")
            backend = AgentKitBackend(path)
            backend.fill(payloads(n))
            backend.close()
            megabytes, counts = run_in_child(_memory_probe, str(path), n)
            tally = Tally(n)
            tally.merge(counts)
            tally.verify(pending_after("agentkit", path))
            target = Target("<", 15, " MB")
            self.rows.append(
                Row(
                    measure,
                    f"{megabytes:.1f} MB",
                    "above RSS after open",
                    "",
                    *judge(megabytes, target),
                )
            )

    # row 6: idle wake-up

    def idle_costs(self, name: str, where: str | Path, samples: int) -> tuple[list[float], float]:
        """Enqueue-to-start seconds of `samples` jobs sent to an idle worker process, and
        that worker's CPU use (fraction of one core) while it waited on an empty queue."""
        cfg = self.config
        producer = open_backend(name, where)
        ready, stop, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        worker = SPAWN.Process(
            target=_idle_worker, args=(name, str(where), samples, ready, stop, out)
        )
        worker.start()
        try:
            if not ready.wait(timeout=60):
                raise RuntimeError("the idle worker did not start")
            time.sleep(1.0)  # let it settle into waiting
            cpu_before, wall_before = cpu_seconds(worker.pid), time.perf_counter()
            time.sleep(cfg.idle_seconds)
            cpu_used = cpu_seconds(worker.pid) - cpu_before
            cpu = cpu_used / (time.perf_counter() - wall_before)
            spacing, latencies = random.Random(7), []
            for i in range(samples):
                producer.put({"i": i, "t": time.time()})
                latencies.append(out.get(timeout=30))
                time.sleep(spacing.uniform(0.1, 0.2))
            stop.set()
            tally = Tally(samples)
            tally.merge(out.get(timeout=30))
            tally.verify(producer.pending())
        finally:
            stop.set()
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
            producer.close()
        return latencies, cpu

    def idle_rows(self, names: tuple[str, ...] = ("agentkit",), prefix: str = "") -> None:
        """Wake-up latency and idle CPU of each named queue's worker (targets: agentkit's)."""
        cfg = self.config
        samples = cfg.pg_wake_samples if prefix else cfg.wake_samples
        for name in names:
            label = "" if name in ("agentkit", "pg-agentkit") else f" ({BACKENDS[name].label})"
            with self.section(f"{prefix}idle worker{label}"):
                latencies, cpu = self.idle_costs(name, self.where(name, "idle"), samples)
                median = statistics.median(latencies) * 1e3
                ours = not label
                self.rows.append(
                    Row(
                        f"{prefix}idle wake-up: enqueue to handler start ({samples} jobs)",
                        f"{median:.1f} ms" if ours else "",
                        f"median; max {max(latencies) * 1e3:.1f} ms{label}"
                        if ours
                        else f"{median:.1f} ms median, max {max(latencies) * 1e3:.1f} ms{label}",
                        "",
                        *judge(median, Target("<", 50, " ms") if ours else None),
                    )
                )
                self.rows.append(
                    Row(
                        f"{prefix}idle worker CPU, {cfg.idle_seconds:g} s on an empty queue",
                        f"{cpu * 100:.2f}%" if ours else "",
                        f"of one core{label}" if ours else f"{cpu * 100:.2f}% of one core{label}",
                        "",
                        *judge(cpu * 100, Target("<", 2, "%") if ours else None),
                    )
                )


def machine() -> str:
    """Where the numbers come from."""
    peers = ", ".join(f"{p} {version(p)}" for p in ("huey", "litequeue", "persist-queue"))
    return (
        f"machine: nproc {len(os.sched_getaffinity(0))}, {platform.system()} "
        f"{platform.machine()}; Python {platform.python_version()}; SQLite "
        f"{apsw.sqlite_lib_version()} (apsw {apsw.apsw_version()}; the peers use the stdlib "
        f"sqlite3 with SQLite {sqlite3.sqlite_version}); {peers}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a ~30 s smoke run")
    parser.add_argument("--dir", help="where to create the databases (default: system temp)")
    parser.add_argument(
        "--no-postgres", action="store_true", help="skip the PostgreSQL rows (SQLite only)"
    )
    args = parser.parse_args(argv)
    config = QUICK_RUN if args.quick else FULL_RUN
    print(machine())
    if agentkit is None:
        print(f"agentkit is not importable: {AGENTKIT_ERROR}")
    with tempfile.TemporaryDirectory(prefix="agentkit-bench-", dir=args.dir) as workdir:
        bench = Bench(config, Path(workdir))
        bench.enqueue_rows()
        bench.drain_rows()
        bench.overhead_rows()
        bench.latency_rows()
        bench.memory_row()
        bench.idle_rows()
        if not args.no_postgres:
            with bench.section("PostgreSQL server"):
                bench.server = PgServer()
                print(bench.server.describe())
            if bench.server is not None:
                try:
                    bench.postgres_rows()
                finally:
                    bench.server.close()
    print(
        f"run took {time.perf_counter() - bench.began:.0f} s; rates are wall-clock jobs/s, "
        f"best of {config.repeats} except for the slow peers (fewer jobs, one run); "
        "ratio = agentkit / baseline (latency rows: this size / the smallest, each the fastest "
        "of its rounds)\n"
    )
    print_table(bench.rows)
    return 1 if bench.failed or agentkit is None else 0


if __name__ == "__main__":
    sys.exit(main())
