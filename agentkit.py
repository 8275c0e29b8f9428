"""agentkit: chat agents whose whole state lives in one SQLite file.

One module to vendor, import, or run (`python agentkit.py serve`). Threads, messages,
turns, tool calls, approvals, secret requests, jobs, schedules, locks and adapter cursors
are rows; every piece of work is claimed in a transaction, so several processes can share
one database and nothing is done twice or lost. See README.md for the guide.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import math
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import MAXYEAR, MINYEAR, date, datetime, timezone
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import apsw

__all__ = [
    "AgentKit",
    "AgentKitError",
    "BadInput",
    "Fail",
    "Job",
    "JobContext",
    "LeaseLost",
    "Lock",
    "LockBusy",
    "StoreError",
]

log = logging.getLogger("agentkit")

# ───────────────────────────── errors and small helpers ─────────────────────────────


class AgentKitError(Exception):
    """Base class of agentkit's errors."""


class BadInput(AgentKitError, ValueError):
    """Input that agentkit refuses; nothing was changed."""


class StoreError(AgentKitError):
    """The database cannot be used (not SQLite, written by a newer agentkit, busy)."""


class LockBusy(AgentKitError):
    """The lock is held by someone else and could not be had in time."""


class LeaseLost(AgentKitError):
    """A lock or job lease is no longer held by the caller; nothing was changed."""


class Fail(AgentKitError):
    """Raise from a task to fail its job at once, without retries."""


def now() -> float:
    """The current time as Unix seconds (tests may replace it)."""
    return time.time()


def dumps(value: Any) -> str:
    """Compact JSON; BadInput when the value is not JSON-serialisable."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BadInput(f"not JSON-serialisable: {e}") from None


def iso(ts: float) -> str:
    """A Unix time as an ISO 8601 UTC string to the second."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def worker_name() -> str:
    """A name for this process's claims: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


def check_name(kind: str, name: object, limit: int = 200) -> str:
    """A non-empty string of at most `limit` characters, or BadInput."""
    if not isinstance(name, str) or not name or len(name) > limit:
        raise BadInput(f"{kind} must be a non-empty string of at most {limit} characters")
    return name


def check_seconds(kind: str, value: object, *, positive: bool = False) -> float:
    """A finite number of seconds (>= 0, or > 0 when `positive`), or BadInput."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and abs(value) != float("inf") and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise BadInput(f"{kind} must be a number of seconds {bound}, not {value!r}")
    return float(value)


# ──────────────────────── store: connection, schema, transactions ────────────────────────

MIGRATIONS: tuple[str, ...] = (
    # 1: locks, jobs and schedules
    """
    CREATE TABLE locks (
        name TEXT PRIMARY KEY,
        owner TEXT,
        token INTEGER NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'running', 'done', 'failed', 'dead', 'cancelled')),
        priority INTEGER NOT NULL DEFAULT 0,
        run_at REAL NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        retries INTEGER NOT NULL,
        backoff REAL NOT NULL,
        timeout REAL,
        key TEXT,
        target TEXT,
        owner TEXT,
        lease_until REAL,
        started_at REAL,
        finished_at REAL,
        last_error TEXT,
        result TEXT
    );
    CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, id) WHERE state = 'queued';
    CREATE INDEX jobs_running ON jobs (lease_until) WHERE state = 'running';
    CREATE INDEX jobs_running_target ON jobs (target) WHERE state = 'running';
    CREATE UNIQUE INDEX jobs_key ON jobs (key) WHERE key IS NOT NULL;
    CREATE INDEX jobs_state ON jobs (state, id);
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('cron', 'every', 'at')),
        spec TEXT NOT NULL,
        tz TEXT NOT NULL,
        task TEXT NOT NULL,
        payload TEXT NOT NULL,
        next_due REAL,
        last_due REAL,
        paused INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX schedules_due ON schedules (next_due) WHERE paused = 0;
    """,
)

SYNCHRONOUS = {"normal": 1, "full": 2}


class Store:
    """One SQLite database shared by this process's threads (a connection each).

    Every connection runs in WAL mode (except `":memory:"`, which is one process's
    shared in-memory database), with foreign keys on and a busy timeout. Opening a file
    applies pending migrations, each in its own transaction; a file that is not SQLite,
    or that a newer agentkit wrote, is refused and left untouched.
    """

    def __init__(
        self, path: str, *, synchronous: str = "normal", busy_timeout: float = 10.0
    ) -> None:
        if synchronous not in SYNCHRONOUS:
            raise BadInput(f"synchronous must be one of {sorted(SYNCHRONOUS)}")
        self.path = os.fspath(path)
        self.memory = self.path == ":memory:"
        self.synchronous = synchronous
        self.busy_timeout = check_seconds("busy_timeout", busy_timeout, positive=True)
        self._uri = f"file:/agentkit-{os.getpid()}-{id(self)}?vfs=memdb" if self.memory else ""
        self._local = threading.local()
        self._all: list[apsw.Connection] = []
        self._guard = threading.Lock()
        self.closed = False
        self._keepalive = self.connection()  # opens, checks and migrates
        self.version = self._migrate()

    # connections

    def connection(self) -> apsw.Connection:
        """This thread's connection, opened and configured on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.closed:
                raise StoreError("the store is closed")
            conn = self._open()
            self._local.conn = conn
            self._local.depth = 0
            with self._guard:
                self._all.append(conn)
        return conn

    def _open(self) -> apsw.Connection:
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        if self.memory:
            conn = apsw.Connection(self._uri, flags=flags | apsw.SQLITE_OPEN_URI)
        else:
            conn = apsw.Connection(self.path, flags=flags)
        conn.setbusytimeout(int(self.busy_timeout * 1000))
        try:
            version = self._pragma(conn, "user_version")
        except apsw.NotADBError:
            conn.close()
            raise StoreError(
                f"{self.path} is not an SQLite database; it was left untouched"
            ) from None
        if version > len(MIGRATIONS):
            conn.close()
            raise StoreError(
                f"{self.path} was written by a newer agentkit (schema {version}; this one "
                f"knows up to {len(MIGRATIONS)}); it was left untouched"
            )
        if not self.memory:
            self._set(conn, "journal_mode", "wal")
        self._set(conn, "synchronous", SYNCHRONOUS[self.synchronous])
        self._set(conn, "foreign_keys", 1)
        return conn

    @staticmethod
    def _pragma(conn: apsw.Connection, name: str) -> Any:
        return conn.execute(f"PRAGMA {name}").fetchall()[0][0]

    def _set(self, conn: apsw.Connection, name: str, value: str | int) -> None:
        """Set a PRAGMA and read it back (apsw runs statements lazily: trust nothing)."""
        conn.execute(f"PRAGMA {name}={value}").fetchall()
        got = self._pragma(conn, name)
        if got != value:
            raise StoreError(f"PRAGMA {name} reads back {got!r}, not {value!r}")

    def _migrate(self) -> int:
        """Apply the migrations this database lacks; return its schema version."""
        conn = self.connection()
        for target in range(1, len(MIGRATIONS) + 1):
            with self.transaction():
                if self._pragma(conn, "user_version") < target:
                    conn.execute(MIGRATIONS[target - 1])
                    conn.execute(f"PRAGMA user_version={target}")
        return self._pragma(conn, "user_version")

    def close(self) -> None:
        """Close every connection of this store; later use raises StoreError."""
        with self._guard:
            self.closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # transactions

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[apsw.Connection]:
        """A write transaction: `BEGIN IMMEDIATE`, committed on success, rolled back on error.

        A busy database is retried with backoff for `busy_timeout` seconds, then raises
        StoreError. A nested `transaction()` in the same thread is a savepoint: its
        rollback undoes only its own writes, and nothing is committed before the
        outermost block ends. `durable=True` commits with `synchronous=FULL`.
        """
        conn = self.connection()
        depth = self._local.depth
        if depth:
            name = f"sp{depth}"
            conn.execute(f"SAVEPOINT {name}")
            self._local.depth = depth + 1
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                raise
            finally:
                conn.execute(f"RELEASE {name}")
                self._local.depth = depth
            return
        if durable:
            conn.execute("PRAGMA synchronous=FULL")
        try:
            self._begin(conn)
            self._local.depth = 1
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            self._local.depth = 0
            if durable:
                conn.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.synchronous]}")

    def _begin(self, conn: apsw.Connection) -> None:
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except apsw.BusyError:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"{self.path} stayed busy for {self.busy_timeout:g} s"
                    ) from None
                time.sleep(pause * random.uniform(0.5, 1.5))
                pause = min(pause * 2, 0.1)

    def read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple]:
        """Rows of one read statement, outside any explicit transaction."""
        return self.connection().execute(sql, params).fetchall()

    def data_version(self) -> int:
        """Changes when another connection commits (cheap: no I/O)."""
        return self._pragma(self.connection(), "data_version")

    def tables(self) -> list[str]:
        """The names of agentkit's tables."""
        rows = self.read("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        return [name for (name,) in rows if not name.startswith("sqlite_")]


# ───────────────────────────────────────── locks ─────────────────────────────────────────


def acquire_lock(store: Store, name: str, owner: str, ttl: float) -> int | None:
    """Take `name` for `owner` unless someone holds it; the new fencing token, or None."""
    at = now()
    with store.transaction() as db:
        row = db.execute(
            "INSERT INTO locks (name, owner, token, expires_at) VALUES (?1, ?2, 1, ?3) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
            "token = locks.token + 1, expires_at = excluded.expires_at "
            "WHERE locks.owner IS NULL OR locks.expires_at <= ?4 RETURNING token",
            (name, owner, at + ttl, at),
        ).fetchone()
    return row[0] if row else None


def renew_lock(store: Store, name: str, owner: str, token: int, ttl: float) -> bool:
    """Extend a held lock; False (and no change) when it is not held any more."""
    at = now()
    with store.transaction() as db:
        db.execute(
            "UPDATE locks SET expires_at = ? "
            "WHERE name = ? AND owner = ? AND token = ? AND expires_at > ?",
            (at + ttl, name, owner, token, at),
        )
        return db.changes() == 1


def release_lock(store: Store, name: str, owner: str, token: int) -> bool:
    """Give back a held lock; False (and no change) when it is not held any more."""
    with store.transaction() as db:
        db.execute(
            "UPDATE locks SET owner = NULL, expires_at = 0 "
            "WHERE name = ? AND owner = ? AND token = ? AND expires_at > ?",
            (name, owner, token, now()),
        )
        return db.changes() == 1


class Lock:
    """A named lease in the database: an owner, an expiry and a fencing token.

    The token grows with every acquisition of the name, so whatever the holder writes
    elsewhere can carry it and be refused when a newer holder exists. Use it as a
    context manager (acquired on entry, renewed in the background, released on exit)
    or with `acquire()`, `renew()` and `release()`.
    """

    def __init__(self, store: Store, name: str, *, ttl: float = 30.0, wait: float = 0.0) -> None:
        self.store = store
        self.name = check_name("lock name", name)
        self.ttl = check_seconds("ttl", ttl, positive=True)
        self.wait = check_seconds("wait", wait)
        self.owner = worker_name()
        self.token: int | None = None
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()

    def acquire(self) -> Lock:
        """Take the lock, waiting up to `wait` seconds; LockBusy when it cannot be had."""
        deadline = time.monotonic() + self.wait
        pause = 0.002
        while True:
            token = acquire_lock(self.store, self.name, self.owner, self.ttl)
            if token is not None:
                self.token = token
                return self
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockBusy(f"lock {self.name!r} is held elsewhere")
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))
            pause = min(pause * 2, 0.05)

    def renew(self) -> None:
        """Extend the lease by `ttl`; LeaseLost when it is not held any more."""
        if self.token is None or not renew_lock(
            self.store, self.name, self.owner, self.token, self.ttl
        ):
            raise LeaseLost(f"lock {self.name!r} is not held by this Lock")

    def release(self) -> None:
        """Give the lock back; LeaseLost when it was not held any more."""
        token, self.token = self.token, None
        if token is None or not release_lock(self.store, self.name, self.owner, token):
            raise LeaseLost(f"lock {self.name!r} is not held by this Lock")

    def _renew_until_stopped(self) -> None:
        while not self._stop_renewing.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost:
                log.warning("lock %r was lost before its holder finished", self.name)
                return
            except StoreError as e:
                log.warning("could not renew lock %r: %s", self.name, e)

    def __enter__(self) -> Lock:
        self.acquire()
        self._stop_renewing.clear()
        self._renewer = threading.Thread(
            target=self._renew_until_stopped, name=f"lock:{self.name}", daemon=True
        )
        self._renewer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.release()
        except LeaseLost:
            if kind is None:
                raise


# ────────────────────────────────── job queue and schedules ──────────────────────────────────

JOB_STATES = ("queued", "running", "done", "failed", "dead", "cancelled")
MAX_BACKOFF = 3600.0


def job_rowid(job_id: object) -> int:
    """The row id inside a public job id `job_<n>`, or BadInput."""
    if isinstance(job_id, str) and job_id.startswith("job_") and job_id[4:].isdigit():
        return int(job_id[4:])
    raise BadInput(f"not a job id: {job_id!r}")


def retry_delay(backoff: float, attempt: int) -> float:
    """Seconds before retry `attempt` (1-based): backoff·2^(attempt−1), plus up to 25% jitter."""
    base = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF)
    return base * (1 + random.uniform(0, 0.25))


@dataclasses.dataclass(frozen=True)
class Job:
    """A snapshot of one job row, as `kit.job(id)` returns it."""

    id: str
    name: str
    payload: Any
    state: str
    priority: int
    attempts: int
    retries: int
    run_at: float
    created_at: float
    key: str | None
    target: str | None
    last_error: str | None
    result: Any
    finished_at: float | None


JOB_COLUMNS = (
    "id, name, payload, state, priority, attempts, retries, run_at, created_at, key, "
    "target, last_error, result, finished_at"
)


def job_from_row(row: tuple) -> Job:
    (rowid, name, payload, state, priority, attempts, retries, run_at, created, key) = row[:10]
    target, last_error, result, finished_at = row[10:]
    return Job(
        f"job_{rowid}",
        name,
        json.loads(payload),
        state,
        priority,
        attempts,
        retries,
        run_at,
        created,
        key,
        target,
        last_error,
        None if result is None else json.loads(result),
        finished_at,
    )


@dataclasses.dataclass
class Task:
    """A registered job handler and the defaults of the jobs that run it."""

    name: str
    fn: Callable[..., Any]
    retries: int = 3
    backoff: float = 1.0
    timeout: float | None = None

    def __post_init__(self) -> None:
        params = inspect.signature(self.fn).parameters
        self.takes_ctx = len(params) >= 2
        self.is_async = inspect.iscoroutinefunction(self.fn)


@dataclasses.dataclass
class Claimed:
    """A job this worker holds the lease of."""

    rowid: int
    name: str
    payload: Any
    attempt: int
    retries: int
    backoff: float
    timeout: float | None


class JobContext:
    """What a task receives as `ctx`: the job's id, its attempt, and `heartbeat()`."""

    def __init__(self, queue: Queue, job: Claimed, owner: str, lease: float) -> None:
        self.queue = queue
        self.job_id = f"job_{job.rowid}"
        self.attempt = job.attempt
        self.name = job.name
        self._job = job
        self._owner = owner
        self._lease = lease

    def heartbeat(self) -> None:
        """Extend this job's lease now (workers also do it on their own); LeaseLost if gone."""
        if not self.queue.extend(self._job, self._owner, self._lease):
            raise LeaseLost(f"{self.job_id} is no longer leased to this worker")


class Queue:
    """Jobs and schedules in the store, and the registry of this process's tasks.

    Jobs are at-least-once with a lease: a claim sets the owner, the attempt and
    `lease_until`; completion and failure are fenced by owner and attempt, so a worker
    that lost its lease changes nothing. Jobs with the same `target` never run at once.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tasks: dict[str, Task] = {}
        self._changed = threading.Condition()
        self._waiters = 0
        self._next_sweep = 0.0

    # enqueueing

    def job_values(
        self,
        name: str,
        *,
        delay: float = 0.0,
        run_at: float | None = None,
        priority: int = 0,
        target: str | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        timeout: float | None = None,
        strict: bool = True,
    ) -> tuple:
        """The checked column values that the jobs of one enqueue call share."""
        task = self.tasks.get(check_name("task name", name))
        if task is None and strict:
            raise BadInput(
                f"no task named {name!r} is registered in this process "
                "(register it with @kit.task, or pass strict=False)"
            )
        if run_at is None:
            run_at = now() + check_seconds("delay", delay)
        else:
            run_at = check_seconds("run_at", run_at)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise BadInput(f"priority must be an integer, not {priority!r}")
        if target is not None:
            check_name("target", target)
        retries = task.retries if retries is None and task else retries
        retries = 3 if retries is None else retries
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise BadInput(f"retries must be an integer >= 0, not {retries!r}")
        backoff = task.backoff if backoff is None and task else backoff
        backoff = check_seconds("backoff", 1.0 if backoff is None else backoff)
        timeout = task.timeout if timeout is None and task else timeout
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, positive=True)
        return (name, priority, run_at, now(), retries, backoff, timeout, target)

    def enqueue(
        self,
        name: str,
        payload: Any = None,
        *,
        key: str | None = None,
        delay: float = 0.0,
        run_at: float | None = None,
        priority: int = 0,
        target: str | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        timeout: float | None = None,
        strict: bool = True,
    ) -> str:
        """Add a job; with a `key` already used, return that job's id and add nothing."""
        values = self.job_values(
            name,
            delay=delay,
            run_at=run_at,
            priority=priority,
            target=target,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            strict=strict,
        )
        if key is not None:
            check_name("key", key, limit=500)
        body = dumps(payload)
        with self.store.transaction() as db:
            rowid = self.insert_job(db, values, body, key)
        self.notify()
        return f"job_{rowid}"

    @staticmethod
    def insert_job(db: apsw.Connection, values: tuple, payload: str, key: str | None) -> int:
        """Insert one job inside the caller's transaction; the existing row for a used key."""
        name, priority, run_at, created, retries, backoff, timeout, target = values
        row = db.execute(
            "INSERT INTO jobs (name, payload, state, priority, run_at, created_at, retries, "
            "backoff, timeout, key, target) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING RETURNING id",
            (name, payload, priority, run_at, created, retries, backoff, timeout, key, target),
        ).fetchone()
        if row is None:
            row = db.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
        return row[0]

    def enqueue_many(
        self,
        name: str,
        payloads: Sequence[Any],
        *,
        delay: float = 0.0,
        run_at: float | None = None,
        priority: int = 0,
        target: str | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        timeout: float | None = None,
        strict: bool = True,
    ) -> list[str]:
        """Add one job per payload in a single transaction; their ids, in order."""
        name, priority, run_at, created, retries, backoff, timeout, target = self.job_values(
            name,
            delay=delay,
            run_at=run_at,
            priority=priority,
            target=target,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            strict=strict,
        )
        rows = [
            (name, dumps(p), priority, run_at, created, retries, backoff, timeout, target)
            for p in payloads
        ]
        with self.store.transaction() as db:
            ids = db.executemany(
                "INSERT INTO jobs (name, payload, state, priority, run_at, created_at, "
                "retries, backoff, timeout, target) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                rows,
            ).fetchall()
        self.notify()
        return [f"job_{rowid}" for (rowid,) in ids]

    def notify(self) -> None:
        """Wake this process's idle workers (others notice through `data_version`)."""
        if self._waiters:
            with self._changed:
                self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until a job may be ready: another commit, a local enqueue, or `timeout`."""
        version = self.store.data_version()
        deadline = time.monotonic() + timeout
        with self._changed:
            self._waiters += 1
            try:
                while (left := deadline - time.monotonic()) > 0:
                    if self._changed.wait(min(left, 0.01)):
                        return
                    if self.store.data_version() != version:
                        return
            finally:
                self._waiters -= 1

    # claiming and finishing

    def claim(self, owner: str, names: Sequence[str], limit: int, lease: float) -> list[Claimed]:
        """Lease up to `limit` ready jobs of these task names, at most one per target."""
        at = now()
        with self.store.transaction() as db:
            if at >= self._next_sweep:
                self._sweep_expired(db, at)
            candidates = db.execute(
                "SELECT id, target FROM jobs "
                "WHERE state = 'queued' AND run_at <= ?1 "
                "AND name IN (SELECT value FROM json_each(?2)) "
                "AND (target IS NULL OR NOT EXISTS (SELECT 1 FROM jobs AS r "
                "WHERE r.state = 'running' AND r.target = jobs.target)) "
                "ORDER BY priority DESC, run_at, id LIMIT ?3",
                (at, dumps(list(names)), limit),
            ).fetchall()
            if not candidates:
                return []
            picked, targets = [], set()
            for rowid, target in candidates:
                if target is None or target not in targets:
                    picked.append(rowid)
                    targets.add(target)
            rows = db.execute(
                "UPDATE jobs SET state = 'running', owner = ?, attempts = attempts + 1, "
                "lease_until = ?, started_at = ? "
                "WHERE id IN (SELECT value FROM json_each(?)) "
                "RETURNING id, name, payload, attempts, retries, backoff, timeout",
                (owner, at + lease, at, dumps(picked)),
            ).fetchall()
        rows.sort()
        return [Claimed(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    def _sweep_expired(self, db: apsw.Connection, at: float) -> None:
        """Make jobs whose lease ran out claimable again (or dead when out of attempts)."""
        self._next_sweep = at + 1.0
        db.execute(
            "UPDATE jobs SET owner = NULL, lease_until = NULL, "
            "last_error = 'lease expired: its worker stopped before finishing', "
            "state = CASE WHEN attempts > retries THEN 'dead' ELSE 'queued' END, "
            "finished_at = CASE WHEN attempts > retries THEN ?1 END "
            "WHERE state = 'running' AND lease_until < ?1",
            (at,),
        )

    def finish(self, owner: str, outcomes: Sequence[tuple[Claimed, str, Any]]) -> list[int]:
        """Record outcomes `(job, "ok" | "error" | "fail", JSON result or error)` at once.

        Errors are retried with backoff up to the job's retries, then the job is dead;
        "fail" ends it `failed` at once. Returns the row ids that were refused because
        the lease had moved on (a late or duplicate worker): those rows are unchanged.
        """
        at = now()
        updates = []
        for job, kind, value in outcomes:
            if kind == "ok":
                state, result, error, run_at = "done", value, None, None
            else:
                error, result = str(value)[:4000], None
                if kind == "fail":
                    state, run_at = "failed", None
                elif job.attempt > job.retries:
                    state, run_at = "dead", None
                else:
                    state, run_at = "queued", at + retry_delay(job.backoff, job.attempt)
            finished = None if state == "queued" else at
            updates.append((state, result, error, run_at, finished, job.rowid, owner, job.attempt))
        with self.store.transaction() as db:
            kept = db.executemany(
                "UPDATE jobs SET state = ?, result = ?, last_error = ?, "
                "run_at = coalesce(?, run_at), finished_at = ?, owner = NULL, "
                "lease_until = NULL WHERE id = ? AND owner = ? AND attempts = ? "
                "AND state = 'running' RETURNING id",
                updates,
            ).fetchall()
        if any(u[0] == "queued" for u in updates):
            self.notify()
        refused = {u[5] for u in updates} - {rowid for (rowid,) in kept}
        for rowid in refused:
            log.warning("job_%d: result refused, its lease belongs to another worker", rowid)
        return sorted(refused)

    def extend(self, job: Claimed, owner: str, lease: float) -> bool:
        """Extend one job's lease; False when this worker no longer holds it."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE jobs SET lease_until = ? "
                "WHERE id = ? AND owner = ? AND attempts = ? AND state = 'running'",
                (now() + lease, job.rowid, owner, job.attempt),
            )
            return db.changes() == 1

    def extend_all(self, owner: str, lease: float) -> None:
        """Extend the leases of every job this worker holds."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE jobs SET lease_until = ? WHERE state = 'running' AND owner = ?",
                (now() + lease, owner),
            )

    # inspection and control

    def get(self, job_id: str) -> Job:
        rows = self.store.read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_rowid(job_id),))
        if not rows:
            raise BadInput(f"no job {job_id}")
        return job_from_row(rows[0])

    def list(self, state: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs, optionally of one state."""
        if state is not None and state not in JOB_STATES:
            raise BadInput(f"state must be one of {', '.join(JOB_STATES)}")
        rows = self.store.read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR state = ?1 "
            "ORDER BY id DESC LIMIT ?2",
            (state, limit),
        )
        return [job_from_row(row) for row in rows]

    def _move(self, job_id: str, allowed: tuple[str, ...], sql: str) -> Job:
        """Apply one state change to a job in an allowed state, or BadInput."""
        rowid = job_rowid(job_id)
        with self.store.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (rowid,)).fetchone()
            if row is None:
                raise BadInput(f"no job {job_id}")
            if row[0] not in allowed:
                raise BadInput(f"{job_id} is {row[0]}, not {' or '.join(allowed)}")
            db.execute(sql, (now(), rowid))
        self.notify()
        return self.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job (a running one finishes; ask its task to stop instead)."""
        return self._move(
            job_id,
            ("queued",),
            "UPDATE jobs SET state = 'cancelled', finished_at = ?1 WHERE id = ?2",
        )

    def retry(self, job_id: str) -> Job:
        """Queue a dead or failed job again, with its attempts counted from zero."""
        return self._move(
            job_id,
            ("dead", "failed"),
            "UPDATE jobs SET state = 'queued', attempts = 0, run_at = ?1, finished_at = NULL "
            "WHERE id = ?2",
        )

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        rows = self.store.read("SELECT state, count(*) FROM jobs GROUP BY state")
        return {state: rows_n for state, rows_n in rows}


class Worker:
    """Claims and runs the jobs of some tasks in `concurrency` threads until stopped.

    Claims and results are batched when handlers are quick (a claim takes up to 64 jobs,
    sized so that a batch takes about 5 ms), so a fast queue costs two commits per batch,
    not per job. Leases are renewed by a heartbeat thread while the worker lives; a job
    that runs past its task's `timeout` is failed (and retried) and its late result is
    refused. An idle worker waits on `PRAGMA data_version` and in-process wake-ups.
    """

    def __init__(
        self,
        queue: Queue,
        *,
        concurrency: int = 1,
        lease: float = 30.0,
        tick: Callable[[], object] | None = None,
    ) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise BadInput(f"concurrency must be an integer >= 1, not {concurrency!r}")
        self.queue = queue
        self.concurrency = concurrency
        self.lease = check_seconds("lease", lease, positive=True)
        self.tick = tick
        self.owner = worker_name()
        self.names = sorted(queue.tasks)
        self.done = 0
        self._guard = threading.Lock()
        self._busy = 0
        self._running: dict[int, tuple[Claimed, float]] = {}
        self._local = threading.local()

    def run(self, *, until_idle: bool = False, stop: threading.Event | None = None) -> int:
        """Work until `stop` is set (or, with `until_idle`, until nothing is ready)."""
        stop = stop or threading.Event()
        finished = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(finished,), daemon=True)
        beat.start()
        threads = [
            threading.Thread(target=self._loop, args=(i, until_idle, stop), daemon=True)
            for i in range(1, self.concurrency)
        ]
        for t in threads:
            t.start()
        try:
            self._loop(0, until_idle, stop)
            for t in threads:
                t.join()
        finally:
            finished.set()
            beat.join()
        return self.done

    def _loop(self, index: int, until_idle: bool, stop: threading.Event) -> None:
        batch, next_tick = 1, 0.0
        while not stop.is_set():
            if index == 0 and self.tick and time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + 1.0
            with self._guard:
                self._busy += 1
            try:
                jobs = self.queue.claim(self.owner, self.names, batch, self.lease)
                if jobs:
                    batch = self._run_batch(jobs)
                    continue
            finally:
                with self._guard:
                    self._busy -= 1
                    idle = self._busy == 0
            if until_idle and idle:
                return
            self.queue.wait_for_change(0.05 if until_idle else 0.25)

    def _run_batch(self, jobs: list[Claimed]) -> int:
        """Run claimed jobs, record their outcomes at once; the next batch size."""
        started = time.monotonic()
        with self._guard:
            self._running.update((job.rowid, (job, started)) for job in jobs)
        outcomes = []
        for job in jobs:
            with self._guard:
                self._running[job.rowid] = (job, time.monotonic())
            outcomes.append(self._run(job))
        with self._guard:
            for job in jobs:
                self._running.pop(job.rowid, None)
        self.queue.finish(self.owner, outcomes)
        self.done += len(jobs)
        per_job = (time.monotonic() - started) / len(jobs)
        return max(1, min(64, int(0.005 / max(per_job, 1e-6))))

    def _run(self, job: Claimed) -> tuple[Claimed, str, Any]:
        task = self.queue.tasks[job.name]
        ctx = JobContext(self.queue, job, self.owner, self.lease)
        try:
            result = task.fn(job.payload, ctx) if task.takes_ctx else task.fn(job.payload)
            if task.is_async:
                result = self._event_loop().run_until_complete(result)
            return job, "ok", dumps(result)
        except Fail as e:
            return job, "fail", f"Fail: {e}"
        except BadInput as e:
            return job, "fail", f"the result of task {job.name!r} is {e}"
        except Exception as e:
            log.warning("job_%d (%s) attempt %d: %r", job.rowid, job.name, job.attempt, e)
            return job, "error", f"{type(e).__name__}: {e}"

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """This thread's event loop for async tasks."""
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop

    def _heartbeat(self, finished: threading.Event) -> None:
        """Renew this worker's leases; fail the jobs that ran past their timeout."""
        while not finished.wait(min(self.lease / 3, 1.0)):
            at = time.monotonic()
            with self._guard:
                late = [
                    job
                    for job, started in self._running.values()
                    if job.timeout is not None and at - started > job.timeout
                ]
                for job in late:
                    del self._running[job.rowid]
            try:
                if late:
                    self.queue.finish(
                        self.owner, [(j, "error", f"timed out after {j.timeout:g} s") for j in late]
                    )
                self.queue.extend_all(self.owner, self.lease)
            except StoreError as e:
                log.warning("heartbeat failed: %s", e)


class _Field(NamedTuple):
    """One of the five cron fields: its name, allowed range and accepted names."""

    name: str
    low: int
    high: int
    names: dict[str, int]


_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
        start=1,
    )
}
_DAY_NAMES = {
    name: number for number, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))
}
_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day-of-month", 1, 31, {}),
    _Field("month", 1, 12, _MONTH_NAMES),
    _Field("day-of-week", 0, 7, _DAY_NAMES),
)
_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# How far next_after looks for a matching day. The Gregorian calendar repeats exactly every
# 400 years (146097 days, a whole number of weeks), so a day pattern with no match in 400 years
# never matches. Anything much shorter is unsafe: in "0 0 29 2 */7" (February 29 that is a
# Sunday; a day-of-week starting with '*' makes both day fields count) the runs are 28 or 40
# years apart, e.g. 2088 then 2128 because 2100 is not a leap year.
_SEARCH_YEARS = 400


def zone(tz: str) -> ZoneInfo:
    """The IANA time zone named ``tz``; BadInput for unknown or malformed names."""
    if not isinstance(tz, str):
        raise BadInput(f"bad time zone {tz!r}: expected an IANA name such as 'Europe/Paris'")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as error:
        raise BadInput(
            f"unknown time zone {tz!r}: expected an IANA name such as 'Europe/Paris'"
        ) from error


@dataclass(frozen=True)
class Cron:
    """A five-field cron expression; build it with ``Cron.parse``.

    Each field holds its allowed values, sorted; ``weekdays`` uses 0 for Sunday. When both
    day-of-month and day-of-week are restricted (neither starts with '*'), a day matches if
    either matches (``either_day``); otherwise both must, and a '*' field matches every day.

    ``next_after`` evaluates the expression on wall-clock time in the given zone. Daylight
    saving time rules:

    - A matching wall-clock time that does not exist (skipped when clocks spring forward) runs
      at the first instant after the gap: 02:30 on the Europe/Paris spring change day runs at
      03:00 CEST. If that instant is also a regular match ("0 * * * *" matches both the
      skipped 02:00 and 03:00), it runs once.
    - A matching wall-clock time that exists twice (clocks fall back) runs once, at its first
      occurrence (fold=0). Consequently an hourly entry does not run in the second pass of the
      repeated hour, nor does any other entry matching times in that hour.
    """

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]
    either_day: bool

    @classmethod
    def parse(cls, expr: str) -> Cron:
        """Parse five fields or an @nickname; BadInput naming the bad field if malformed."""
        if not isinstance(expr, str):
            raise BadInput(f"bad cron expression {expr!r}: expected a string")
        text = expr.strip()
        if not text:
            raise BadInput(f"bad cron expression {expr!r}: it is empty")
        if text.startswith("@"):
            if text.lower() not in _NICKNAMES:
                known = ", ".join(_NICKNAMES)
                raise BadInput(
                    f"bad cron expression {expr!r}: unknown nickname {text!r} (known: {known})"
                )
            text = _NICKNAMES[text.lower()]
        fields = text.split()
        if len(fields) != len(_FIELDS):
            raise BadInput(
                f"bad cron expression {expr!r}: expected 5 fields "
                f"(minute hour day-of-month month day-of-week), got {len(fields)}"
            )
        minutes, hours, days, months, weekdays = (
            _parse_field(expr, field_text, field)
            for field_text, field in zip(fields, _FIELDS, strict=True)
        )
        return cls(
            expr=expr,
            minutes=minutes,
            hours=hours,
            days=days,
            months=months,
            weekdays=tuple(sorted({day % 7 for day in weekdays})),
            either_day=not fields[2].startswith("*") and not fields[4].startswith("*"),
        )

    def next_after(self, after: float, tz: str | ZoneInfo) -> float:
        """First run strictly after Unix time ``after``, as Unix time, evaluated in ``tz``."""
        local_zone = tz if isinstance(tz, ZoneInfo) else zone(tz)
        last_minute = self.minutes[-1]
        for day in self._days_from(_local_date(after, local_zone)):
            for hour in self.hours:
                # Run instants grow with wall-clock time, so a whole hour can be skipped at once.
                if _instant(_wall(day, hour, last_minute), local_zone) <= after:
                    continue
                for minute in self.minutes:
                    run = _instant(_wall(day, hour, minute), local_zone)
                    if run > after:
                        return run
        raise BadInput(
            f"bad cron expression {self.expr!r}: never matches "
            f"(no matching day in a whole {_SEARCH_YEARS}-year calendar cycle)"
        )

    def _days_from(self, start: date) -> Iterator[date]:
        """Matching days from ``start`` on, in order, for one full calendar cycle."""
        for month_offset in range(_SEARCH_YEARS * 12 + 1):
            years_ahead, month_index = divmod(start.month - 1 + month_offset, 12)
            year, month = start.year + years_ahead, month_index + 1
            if month not in self.months:
                continue
            monday_based_weekday, length = calendar.monthrange(year, month)
            for day in range(start.day if month_offset == 0 else 1, length + 1):
                if self._day_matches(day, (monday_based_weekday + day) % 7):
                    yield date(year, month, day)

    def _day_matches(self, day: int, weekday: int) -> bool:
        """Whether day-of-month ``day`` falling on ``weekday`` (0 = Sunday) matches."""
        in_month, in_week = day in self.days, weekday in self.weekdays
        return (in_month or in_week) if self.either_day else (in_month and in_week)


def _parse_field(expr: str, text: str, field: _Field) -> tuple[int, ...]:
    """The sorted values allowed by ``text``, the ``field`` part of ``expr``."""

    def bad(problem: str) -> BadInput:
        return BadInput(f"bad cron expression {expr!r}: {field.name} {problem}")

    def value(token: str) -> int:
        number = _digits(token)
        if number is None:
            if token.upper() in field.names:
                return field.names[token.upper()]
            if not token:
                raise bad(f"{text!r} is missing a value")
            kind = "a number or name" if field.names else "a number"
            raise bad(f"value {token!r} is not {kind}")
        if not field.low <= number <= field.high:
            raise bad(f"value {token} is out of range {field.low}-{field.high}")
        return number

    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise bad(f"{text!r} has an empty list item")
        base, slash, step_text = item.partition("/")
        step = _digits(step_text) if slash else 1
        if step is None or step == 0:
            raise bad(f"step {step_text!r} is not allowed: it must be a number of at least 1")
        if base == "*":
            first, last = field.low, field.high
        elif "-" in base:
            first_text, _, last_text = base.partition("-")
            first, last = value(first_text), value(last_text)
            if first > last:
                raise bad(f"range {base!r} is reversed")
        else:
            first = value(base)
            last = field.high if slash else first
        values.update(range(first, last + 1, step))
    return tuple(sorted(values))


def _digits(token: str) -> int | None:
    """The value of a plain ASCII digit string (clamped to 10**9, beyond any limit), else None."""
    if not (token.isascii() and token.isdigit()):
        return None
    significant = token.lstrip("0")
    return int(significant or "0") if len(significant) <= 9 else 10**9


def _local_date(after: float, local_zone: ZoneInfo) -> date:
    """The local date of Unix time ``after``; BadInput if it is not a usable timestamp."""
    if isinstance(after, bool) or not isinstance(after, (int, float)) or not math.isfinite(after):
        raise BadInput(f"bad timestamp {after!r}: expected a finite number of seconds")
    last_year = MAXYEAR - _SEARCH_YEARS - 1
    out_of_range = f"bad timestamp {after!r}: only years {MINYEAR + 1}-{last_year} are supported"
    try:
        local = datetime.fromtimestamp(after, local_zone)
    except (OverflowError, OSError, ValueError) as error:
        raise BadInput(out_of_range) from error
    if not MINYEAR < local.year <= last_year:
        raise BadInput(out_of_range)
    return local.date()


def _wall(day: date, hour: int, minute: int) -> datetime:
    """The naive wall-clock time ``hour``:``minute`` on ``day``."""
    return datetime(day.year, day.month, day.day, hour, minute)


def _instant(wall: datetime, local_zone: ZoneInfo) -> float:
    """Unix time of naive ``wall`` in ``local_zone``, following the DST rules of ``Cron``."""
    first = wall.replace(tzinfo=local_zone).timestamp()
    if datetime.fromtimestamp(first, local_zone).replace(tzinfo=None) == wall:
        return first  # exists; fold=0 picked the first occurrence if it exists twice
    # ``wall`` is in a gap. With fold=0 it is read with the offset from before the change, which
    # lands after the change; with fold=1 with the offset from after it, which lands before.
    # Binary search between the two for the change itself: the first instant after the gap.
    before, after = int(wall.replace(tzinfo=local_zone, fold=1).timestamp()), int(first)
    offset_before = datetime.fromtimestamp(before, local_zone).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if datetime.fromtimestamp(middle, local_zone).utcoffset() == offset_before:
            before = middle
        else:
            after = middle
    return float(after)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A schedule row: when it next runs, and what it enqueues then."""

    name: str
    kind: str
    spec: str
    tz: str
    task: str
    payload: Any
    next_due: float | None
    last_due: float | None
    paused: bool


SCHEDULE_COLUMNS = "name, kind, spec, tz, task, payload, next_due, last_due, paused"


def schedule_from_row(row: tuple) -> Schedule:
    name, kind, spec, tz, task, payload, next_due, last_due, paused = row
    return Schedule(
        name, kind, spec, tz, task, json.loads(payload), next_due, last_due, bool(paused)
    )


def following_due(kind: str, spec: str, tz: str, due: float, at: float) -> float | None:
    """The next due time after a run that was due at `due` and ran at `at`.

    Missed runs are coalesced: the result is always after `at`.
    """
    if kind == "cron":
        return Cron.parse(spec).next_after(at, tz)
    if kind == "every":
        step = float(spec)
        return due + step * (int((at - due) // step) + 1)
    return None  # "at": once


class Scheduler:
    """Schedules that enqueue a job when due: cron (in a time zone), every N seconds, or once.

    A tick enqueues each due run with the key `schedule:<name>:<due>` and advances the
    schedule in the same transaction, so any number of processes may tick and each due
    run is enqueued once. Runs missed while nothing ticked are coalesced into one.
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.store = queue.store

    def set(
        self,
        name: str,
        *,
        task: str,
        payload: Any = None,
        cron: str | None = None,
        every: float | None = None,
        at: float | datetime | None = None,
        tz: str = "UTC",
    ) -> Schedule:
        """Create or update a schedule; an unchanged one keeps its next due time."""
        check_name("schedule name", name)
        if sum(x is not None for x in (cron, every, at)) != 1:
            raise BadInput("give exactly one of cron=, every= or at=")
        self.queue.job_values(task)
        zone(tz)
        body = dumps(payload)
        started = now()
        if cron is not None:
            kind, spec, first = "cron", cron, Cron.parse(cron).next_after(started, tz)
        elif every is not None:
            step = check_seconds("every", every, positive=True)
            if step < 1:
                raise BadInput("every must be at least 1 second")
            kind, spec, first = "every", repr(step), started + step
        else:
            when = at_timestamp(at, tz)
            kind, spec, first = "at", repr(when), when
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT kind, spec, tz, task, payload FROM schedules WHERE name = ?", (name,)
            ).fetchone()
            if row != (kind, spec, tz, task, body):
                db.execute(
                    "INSERT OR REPLACE INTO schedules (name, kind, spec, tz, task, payload, "
                    "next_due) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, kind, spec, tz, task, body, first),
                )
        return self.get(name)

    def get(self, name: str) -> Schedule:
        rows = self.store.read(f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?", (name,))
        if not rows:
            raise BadInput(f"no schedule named {name!r}")
        return schedule_from_row(rows[0])

    def list(self) -> list[Schedule]:
        rows = self.store.read(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name")
        return [schedule_from_row(row) for row in rows]

    def pause(self, name: str) -> Schedule:
        """Stop a schedule from running until `resume`."""
        with self.store.transaction() as db:
            db.execute("UPDATE schedules SET paused = 1 WHERE name = ?", (name,))
        return self.get(name)

    def resume(self, name: str) -> Schedule:
        """Run a paused schedule again; the runs it missed while paused are dropped."""
        s = self.get(name)
        due = s.next_due if s.kind == "at" else following_due(s.kind, s.spec, s.tz, now(), now())
        with self.store.transaction() as db:
            db.execute("UPDATE schedules SET paused = 0, next_due = ? WHERE name = ?", (due, name))
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete a schedule (its jobs already enqueued stay)."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM schedules WHERE name = ?", (name,))
            if not db.changes():
                raise BadInput(f"no schedule named {name!r}")

    def tick(self, at: float | None = None) -> list[str]:
        """Enqueue every run due at `at` (default: now); the ids of the jobs it added."""
        at = now() if at is None else at
        due_sql = "FROM schedules WHERE paused = 0 AND next_due <= ?"
        if not self.store.read(f"SELECT 1 {due_sql} LIMIT 1", (at,)):
            return []
        added = []
        with self.store.transaction() as db:
            due = db.execute(f"SELECT {SCHEDULE_COLUMNS} {due_sql}", (at,)).fetchall()
            for s in map(schedule_from_row, due):
                values = self.queue.job_values(s.task, run_at=s.next_due, strict=False)
                key = f"schedule:{s.name}:{iso(s.next_due)}"
                added.append(f"job_{Queue.insert_job(db, values, dumps(s.payload), key)}")
                db.execute(
                    "UPDATE schedules SET next_due = ?, last_due = ? WHERE name = ?",
                    (following_due(s.kind, s.spec, s.tz, s.next_due, at), s.next_due, s.name),
                )
        self.queue.notify()
        return added


def at_timestamp(at: float | datetime, tz: str) -> float:
    """Unix seconds from a timestamp or a datetime (a naive one is read in `tz`)."""
    if isinstance(at, datetime):
        return (at if at.tzinfo else at.replace(tzinfo=zone(tz))).timestamp()
    return check_seconds("at", at)


# ─────────────────────────────────── the AgentKit facade ───────────────────────────────────


class AgentKit:
    """An agent kit over one SQLite database: the object users configure and run.

    `AgentKit("agent.db")` opens or creates the database (`":memory:"` is for one
    process). Close it with `close()` or use it as a context manager.
    """

    def __init__(self, db: str | os.PathLike[str] = "agentkit.db", *, synchronous: str = "normal"):
        self.store = Store(os.fspath(db), synchronous=synchronous)
        self.queue = Queue(self.store)
        self.scheduler = Scheduler(self.queue)

    def close(self) -> None:
        """Close the database connections."""
        self.store.close()

    def __enter__(self) -> AgentKit:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # locks

    def lock(self, name: str, *, ttl: float = 30.0, wait: float = 0.0) -> Lock:
        """A named lock: `with kit.lock("deploy", ttl=30) as lease: lease.token`."""
        return Lock(self.store, name, ttl=ttl, wait=wait)

    # jobs

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        retries: int = 3,
        backoff: float = 1.0,
        timeout: float | None = None,
    ) -> Any:
        """Register a job handler `fn(payload)` or `fn(payload, ctx)`, bare or with options."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            task_name = check_name("task name", name or fn.__name__)
            if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
                raise BadInput(f"retries must be an integer >= 0, not {retries!r}")
            limit = None if timeout is None else check_seconds("timeout", timeout, positive=True)
            self.queue.tasks[task_name] = Task(
                task_name, fn, retries, check_seconds("backoff", backoff), limit
            )
            return fn

        return register if fn is None else register(fn)

    def enqueue(self, name: str, payload: Any = None, **options: Any) -> str:
        """Add a job (options: key, delay, run_at, priority, target, retries, backoff,
        timeout, strict); its id `job_<n>`. See `Queue.enqueue`."""
        return self.queue.enqueue(name, payload, **options)

    def enqueue_many(self, name: str, payloads: Sequence[Any], **options: Any) -> list[str]:
        """Add one job per payload in one transaction; see `Queue.enqueue_many`."""
        return self.queue.enqueue_many(name, payloads, **options)

    def job(self, job_id: str) -> Job:
        """A snapshot of one job."""
        return self.queue.get(job_id)

    def jobs(self, state: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs, optionally of one state."""
        return self.queue.list(state, limit)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job."""
        return self.queue.cancel(job_id)

    def retry(self, job_id: str) -> Job:
        """Queue a dead or failed job again."""
        return self.queue.retry(job_id)

    def work(
        self,
        *,
        concurrency: int = 1,
        until_idle: bool = False,
        stop: threading.Event | None = None,
        lease: float = 30.0,
    ) -> int:
        """Run this process's tasks and the scheduler; the number of jobs run.

        Blocks until `stop` is set, or with `until_idle` until no job is ready.
        """
        worker = Worker(self.queue, concurrency=concurrency, lease=lease, tick=self.tick)
        return worker.run(until_idle=until_idle, stop=stop)

    # schedules

    def schedule(
        self,
        name: str,
        *,
        task: str,
        payload: Any = None,
        cron: str | None = None,
        every: float | None = None,
        at: float | datetime | None = None,
        tz: str = "UTC",
    ) -> Schedule:
        """Create or update a schedule (an upsert: safe to call at every start)."""
        return self.scheduler.set(
            name, task=task, payload=payload, cron=cron, every=every, at=at, tz=tz
        )

    def schedules(self) -> list[Schedule]:
        return self.scheduler.list()

    def pause_schedule(self, name: str) -> Schedule:
        return self.scheduler.pause(name)

    def resume_schedule(self, name: str) -> Schedule:
        return self.scheduler.resume(name)

    def remove_schedule(self, name: str) -> None:
        self.scheduler.remove(name)

    def tick(self, at: float | None = None) -> list[str]:
        """Enqueue the scheduled runs due at `at` (default now); workers call it each second."""
        return self.scheduler.tick(at)

    # health

    def doctor(self) -> dict[str, Any]:
        """Database path, schema version, integrity check and row counts per table."""
        integrity = [row[0] for row in self.store.read("PRAGMA integrity_check")]
        return {
            "database": self.store.path,
            "schema": self.store.version,
            "latest schema": len(MIGRATIONS),
            "integrity": "; ".join(integrity),
            "rows": {
                t: self.store.read(f'SELECT count(*) FROM "{t}"')[0][0] for t in self.store.tables()
            },
            "jobs": self.queue.counts(),
        }


# ─────────────────────────────────────────── CLI ───────────────────────────────────────────


def load_app(spec: str) -> AgentKit:
    """The AgentKit object named `module:attribute`, imported from the current directory."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BadInput(f"--app takes module:attribute, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        app = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise BadInput(f"cannot load --app {spec}: {e}") from None
    if not isinstance(app, AgentKit):
        raise BadInput(f"--app {spec} is a {type(app).__name__}, not an AgentKit")
    return app


def open_kit(args: argparse.Namespace, *, must_exist: bool = False) -> AgentKit:
    """The kit the command works on: `--app`, or a bare one over `--db`."""
    if args.app:
        return load_app(args.app)
    if must_exist and args.db != ":memory:" and not os.path.exists(args.db):
        raise StoreError(f"no database at {args.db}")
    return AgentKit(args.db)


def cmd_doctor(args: argparse.Namespace) -> int:
    report = open_kit(args, must_exist=True).doctor()
    rows = ", ".join(f"{t} {n}" for t, n in report["rows"].items())
    jobs = ", ".join(f"{s} {n}" for s, n in sorted(report["jobs"].items())) or "none"
    print(f"database   {report['database']}")
    print(f"schema     {report['schema']} (latest {report['latest schema']})")
    print(f"integrity  {report['integrity']}")
    print(f"rows       {rows}")
    print(f"jobs       {jobs}")
    return 0 if report["integrity"] == "ok" else 1


def print_job(job: Job) -> None:
    for field in dataclasses.fields(job):
        value = getattr(job, field.name)
        if field.name in ("run_at", "created_at", "finished_at") and value is not None:
            value = iso(value)
        print(f"{field.name:12} {value if isinstance(value, str) else json.dumps(value)}")


def cmd_jobs(args: argparse.Namespace) -> int:
    kit = open_kit(args, must_exist=True)
    if args.action == "list":
        for job in kit.jobs(args.state, args.limit):
            error = f"  {job.last_error}" if job.last_error else ""
            print(f"{job.id:12} {job.state:9} {job.name:20} attempts={job.attempts}{error}")
        return 0
    if args.id is None:
        raise BadInput(f"jobs {args.action} needs a job id")
    action = {"show": kit.job, "retry": kit.retry, "cancel": kit.cancel}[args.action]
    print_job(action(args.id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help="database file (agentkit.db)")
    common.add_argument("--app", default=argparse.SUPPRESS, help="module:attribute of an AgentKit")
    parser = argparse.ArgumentParser(
        prog="agentkit",
        description="Chat agents whose whole state lives in SQLite.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor", parents=[common], help="check the database: schema, integrity, row counts"
    )
    doctor.set_defaults(run=cmd_doctor)
    jobs = commands.add_parser(
        "jobs", parents=[common], help="list jobs, or show, retry or cancel one"
    )
    jobs.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "retry", "cancel"]
    )
    jobs.add_argument("id", nargs="?", help="a job id (job_<n>)")
    jobs.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    jobs.set_defaults(run=cmd_jobs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `agentkit COMMAND`, or `python agentkit.py COMMAND`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.db = getattr(args, "db", "agentkit.db")
    args.app = getattr(args, "app", None)
    if args.app and args.db != "agentkit.db":
        parser.error("give --db or --app, not both (the app names its own database)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except BadInput as e:
        print(f"agentkit: {e}", file=sys.stderr)
        return 2
    except AgentKitError as e:
        print(f"agentkit: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run as the importable module, so that `--app` objects and the CLI share one `AgentKit`.
    import agentkit

    sys.exit(agentkit.main())
