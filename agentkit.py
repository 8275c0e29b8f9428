"""agentkit: chat agents whose whole state lives in one database (SQLite, or PostgreSQL).

One module to vendor, import, or run (`python agentkit.py serve`). Threads, messages,
turns, tool calls, approvals, secret requests, jobs, schedules, locks and adapter cursors
are rows; every piece of work is claimed in a transaction, so several processes (and, on
PostgreSQL, several hosts) share one database and nothing is done twice or lost. See
README.md for the guide.

Sections, each using only those above it (all SQL is in 3 to 5; the pages of 21 are
constants the sections above read at call time):

1. errors and small helpers: the error tree, validators, the clock, JSON, redaction
2. store contract: `Store`, its operations grouped by table, the row dataclasses,
   `open_store` with its engines by URL scheme, and `copy_store`
3. SQL store: `_SQLStore`, the statements SQLite and PostgreSQL share, and the
   connections per thread
4. SQLite engine: `SQLiteStore` (apsw), its schema and migrations
5. PostgreSQL engine: `PostgresStore` (psycopg, imported when used)
6. locks
7. job queue and schedules: `Queue`, `Worker`, cron, `Scheduler`
8. attachments: `File`, the `AttachmentStore` protocol, the default `StoredFiles`
9. conversation records: the rules of turns, approvals, entries, queued messages and the
   outbox, over the store
10. models: OpenAI, Anthropic, echo, scripted, their context windows, and the registry of
    providers by prefix
11. tools and hooks
12. MCP servers as tool sources: the client over stdio and Streamable HTTP, `McpServer`
13. runtimes: where commands run (local, bwrap)
14. workspace tools
15. context: the window, token estimates, compaction
16. the turn engine
17. approvals
18. secret requests
19. adapters: Telegram, Webhook, WebChat, PollingAdapter
20. HTTP server
21. extensions: loading `setup(kit)` modules
22. the AgentKit facade
23. CLI
24. pages: the secret form and the web chat (HTML constants, kept last)
"""

import argparse
import asyncio
import base64
import calendar
import concurrent.futures
import contextlib
import copy
import dataclasses
import errno
import fnmatch
import functools
import getpass
import hashlib
import hmac
import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import math
import mimetypes
import os
import queue
import random
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import typing
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import MAXYEAR, MINYEAR, date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import apsw
import httpx
import pydantic
import pydantic_core
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "Adapter",
    "AdapterError",
    "AgentKit",
    "AgentKitError",
    "AlreadyDecided",
    "AnthropicModel",
    "Approval",
    "Attachment",
    "AttachmentStore",
    "BadInput",
    "BashResult",
    "Block",
    "BwrapProvider",
    "BwrapRuntime",
    "Compaction",
    "ContextTooLong",
    "Delivery",
    "EchoModel",
    "Entries",
    "Entry",
    "Event",
    "Fail",
    "File",
    "Forbidden",
    "HTTPRequest",
    "HTTPResponse",
    "HookFailed",
    "Inbound",
    "Job",
    "JobContext",
    "LeaseLost",
    "LocalProvider",
    "LocalRuntime",
    "Lock",
    "LockBusy",
    "McpError",
    "McpServer",
    "McpTool",
    "Model",
    "ModelError",
    "ModelProviders",
    "ModelReply",
    "NotFound",
    "OpenAIModel",
    "Outbound",
    "PollingAdapter",
    "PostgresStore",
    "Retry",
    "Runtime",
    "RuntimeLimits",
    "RuntimeProvider",
    "RuntimeScope",
    "RuntimeUnavailable",
    "SQLiteStore",
    "Schedule",
    "ScriptedModel",
    "SecretRequest",
    "Store",
    "StoreError",
    "StoredFiles",
    "Telegram",
    "ThreadSummary",
    "TooLarge",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolFailed",
    "ToolUnavailable",
    "TurnEvent",
    "TurnResult",
    "WebChat",
    "Webhook",
    "copy_store",
    "load_extension",
    "main",
    "open_store",
]

__version__ = "0.1.0"  # pyproject.toml reads it from here

log = logging.getLogger("agentkit")

# ───────────────────────────── errors and small helpers ─────────────────────────────


class AgentKitError(Exception):
    """Base class of agentkit's errors."""


class BadInput(AgentKitError, ValueError):
    """Input that agentkit refuses; nothing was changed."""


class NotFound(BadInput):
    """The job, turn, approval or schedule named does not exist; nothing was changed."""


class TooLarge(BadInput):
    """A file is over `max_file_bytes` (nothing of its message is stored)."""


class StoreError(AgentKitError):
    """The database cannot be used (not SQLite, written by a newer agentkit, busy)."""


class LockBusy(AgentKitError):
    """The lock is held by someone else and could not be had in time."""


class LeaseLost(AgentKitError):
    """A lock or job lease is no longer held by the caller; nothing was changed."""


class Fail(AgentKitError):
    """Raise from a task to fail its job at once, without retries."""


class Forbidden(AgentKitError):
    """The actor may not do this; nothing was changed."""


class AlreadyDecided(AgentKitError):
    """The approval was decided otherwise (or expired) before; its message says by whom."""


class ToolUnavailable(AgentKitError):
    """A turn needs a tool this process does not have; its job is retried (elsewhere)."""


class ToolFailed(AgentKitError):
    """Raise from a tool to fail its call: the model is told the message as it stands."""


class HookFailed(AgentKitError):
    """A hook raised; the turn it ran for failed."""


class RuntimeUnavailable(AgentKitError):
    """A runtime cannot do this here (bwrap missing, no way to limit processes, stopped);
    nothing was run, and nothing falls back to the host."""


def now() -> float:
    """The current time as Unix seconds (tests may replace it)."""
    return time.time()


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> str:
    """Compact JSON; BadInput when the value is not JSON-serialisable (nested too deeply,
    or holding a lone surrogate included)."""
    try:
        text = _encoder.encode(value)
    except (TypeError, ValueError) as e:
        raise BadInput(f"not JSON-serialisable: {e}") from None
    except RecursionError:
        raise BadInput("not JSON-serialisable: nested too deeply; send flatter data") from None
    return check_utf8("JSON", text)


def same_secret(given: str, expected: str) -> bool:
    """Whether `given` equals `expected`, compared in constant time (any characters)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def iso(ts: float) -> str:
    """A Unix time as an ISO 8601 UTC string to the second."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=1024)
def _written(value: str) -> frozenset[str]:
    """A value as it stands, and as JSON and a Python repr write it inside their quotes."""
    as_json = json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]
    return frozenset((value, *as_json, repr(value)[1:-1]))


class Redactions(logging.Filter):
    """Values that must never be logged or stored (tokens, saved secrets), each replaced by
    `[redacted:LABEL]`. As a logging filter it rewrites records, tracebacks included."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}

    def add(self, value: str, label: str) -> None:
        """Redact `value` from now on (values shorter than 4 characters are ignored)."""
        if len(value) >= 4:
            self.values[value] = label

    def redact(self, text: str, extra: dict[str, str] | None = None) -> str:
        """`text` with every known value (and those of `extra`, value -> label) replaced,
        as it stands and as JSON or a Python repr would write it (escaped)."""
        values = {**self.values, **(extra or {})}
        forms = {form: label for value, label in values.items() for form in _written(value)}
        for form in sorted(forms, key=len, reverse=True):
            if form in text:
                text = text.replace(form, f"[redacted:{forms[form]}]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.values:
            message = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg, record.args = self.redact(message), None
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
        return True


redactions = Redactions()
for _name in ("agentkit", "httpx", "httpcore"):
    logging.getLogger(_name).addFilter(redactions)


def worker_name() -> str:
    """A name for this process's claims: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


_background: asyncio.AbstractEventLoop | None = None
_background_guard = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """agentkit's event loop, in a daemon thread: async callbacks run there."""
    global _background
    with _background_guard:
        if _background is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="agentkit-async", daemon=True).start()
            _background = loop
        return _background


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def unpartial(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function a `functools.partial` calls; any other callable itself."""
    return fn.func if isinstance(fn, functools.partial) else fn


def callable_name(fn: Callable[..., Any]) -> str:
    """A name for any callable: its own, a `functools.partial`'s function's, else its type's."""
    fn = unpartial(fn)
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def call_sync(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a callback from sync code; an async one runs on the background loop."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return asyncio.run_coroutine_threadsafe(_awaited(result), background_loop()).result()
    return result


def check_utf8(kind: str, text: str) -> str:
    """A string that UTF-8 can encode (no lone surrogate such as '\\ud800'), or BadInput."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise BadInput(
            f"{kind} holds a lone surrogate {text[e.start]!r} at index {e.start}; "
            "send valid Unicode text"
        ) from None
    return text


def check_name(kind: str, name: object, limit: int = 200) -> str:
    """A non-empty string of at most `limit` characters, or BadInput."""
    if not isinstance(name, str) or not name or len(name) > limit:
        raise BadInput(f"{kind} must be a non-empty string of at most {limit} characters")
    return check_utf8(kind, name)


INT64_MAX = 2**63 - 1


def check_int(kind: str, value: object, *, low: int = 0, high: int = INT64_MAX) -> int:
    """An integer (not a bool) from `low` to `high`, so it fits SQLite's 64-bit integers,
    or BadInput."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        bound = f">= {low}" if high == INT64_MAX else f"from {low} to {high}"
        raise BadInput(f"{kind} must be an integer {bound}, not {value!r}")
    return value


def check_choice(kind: str, value: str, choices: Sequence[str]) -> str:
    """One of `choices`, or BadInput naming them."""
    if value not in choices:
        raise BadInput(f"{kind} must be one of {', '.join(choices)}, not {value!r}")
    return value


def check_seconds(kind: str, value: object, *, positive: bool = False) -> float:
    """A finite number of seconds (>= 0, or > 0 when `positive`), or BadInput."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and abs(value) != float("inf") and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise BadInput(f"{kind} must be a number of seconds {bound}, not {value!r}")
    return float(value)


class Retry(AgentKitError):
    """Raise from a task to try its job again `after` seconds from now (an attempt like
    any error: after `retries` of them the job is dead)."""

    def __init__(self, message: str, *, after: float) -> None:
        super().__init__(message)
        self.after = check_seconds("after", after)


# ──────────────────────────────────── store contract ────────────────────────────────────
# What agentkit asks of a database, as operations grouped by table (no SQL here), and the
# rows they return: dataclasses whose fields name their columns, so a column is one edit.


# A row dataclass field's metadata may name its column ("column", default: the field's
# name) and a function that decodes its non-NULL values ("decode").
_JSON = {"decode": json.loads}
_BOOL = {"decode": bool}


@functools.cache
def _row_shape(cls: type) -> tuple[str, Callable[[Sequence[Any]], Any], bool]:
    """The column list of a row dataclass, the function that builds one from a row, and
    whether no field is decoded (the row's values go in as they are)."""
    fields = dataclasses.fields(cls)
    names = ", ".join(f.metadata.get("column") or f.name for f in fields)
    decoded = [(i, f.metadata["decode"]) for i, f in enumerate(fields) if "decode" in f.metadata]

    def build(row: Sequence[Any]) -> Any:  # a row of another length raises TypeError
        if not decoded:
            return cls(*row)
        values = list(row)
        for i, decode in decoded:
            if values[i] is not None:
                values[i] = decode(values[i])
        return cls(*values)

    return names, build, not decoded


def columns(cls: type) -> str:
    """The column list of a row dataclass, in field order, for a SELECT or RETURNING."""
    return _row_shape(cls)[0]


def from_row(cls: type, row: Sequence[Any]) -> Any:
    """A row dataclass from the values of `columns(cls)`, each decoded as its field says."""
    return _row_shape(cls)[1](row)


def from_rows(cls: type, rows: Iterable[Sequence[Any]]) -> list[Any]:
    """`from_row` for many rows (of a dataclass without decoded fields, at C speed)."""
    _, build, plain = _row_shape(cls)
    return list(itertools.starmap(cls, rows)) if plain else list(map(build, rows))


def _job_id(rowid: int) -> str:
    return f"job_{rowid}"


def _field_pairs(text: str) -> tuple[tuple[str, str | None], ...]:
    return tuple((name, label) for name, label in json.loads(text))


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row, as `kit.job(id)` returns it."""

    id: str = field(metadata={"decode": _job_id})
    name: str
    payload: Any = field(metadata=_JSON)
    state: str
    priority: int
    attempts: int
    retries: int
    run_at: float
    created_at: float
    key: str | None
    target: str | None
    last_error: str | None
    result: Any = field(metadata=_JSON)
    finished_at: float | None


@dataclass(slots=True)
class Claimed:
    """A job this worker holds the lease of."""

    rowid: int = field(metadata={"column": "id"})
    name: str
    payload: Any = field(metadata=_JSON)
    attempt: int = field(metadata={"column": "attempts"})
    retries: int
    backoff: float
    timeout: float | None
    target: str | None = None


class NewJob(NamedTuple):
    """The checked column values that the jobs of one enqueue call share."""

    name: str
    priority: int
    run_at: float
    created_at: float
    retries: int
    backoff: float
    timeout: float | None
    target: str | None


class JobEnd(NamedTuple):
    """How a claimed job ended (its attempt): its new state and what goes with it."""

    state: str  # done | queued (a retry) | failed | dead
    result: str | None  # JSON
    error: str | None
    run_at: float | None  # a retry's time
    finished_at: float | None
    rowid: int
    attempt: int


@dataclass(frozen=True)
class Schedule:
    """A schedule row: when it next runs, and what it enqueues then."""

    name: str
    kind: str
    spec: str
    tz: str
    task: str
    payload: Any = field(metadata=_JSON)
    next_due: float | None
    last_due: float | None
    paused: bool = field(metadata=_BOOL)


@dataclass(frozen=True)
class TurnRow:
    """One turn as stored: the message that started it and how far it got."""

    id: str
    thread_id: str
    actor: str
    text: str
    status: str
    steps: int
    reply: str | None
    error: str | None
    input_tokens: int
    output_tokens: int
    cancel_requested: bool = field(metadata=_BOOL)
    job_id: int | None
    meta: dict[str, Any] | None = field(metadata=_JSON)  # what its adapter needs to answer
    instructions: str | None  # what extensions added to the instructions of this turn


@dataclass(slots=True)
class MessageRow:
    """One message of a thread, as the context window reads it."""

    id: int
    role: str
    content: str | None
    tokens: int | None  # an assistant message's step: the tokens its provider reported
    origin: str | None  # None for a turn's own messages; see Store.add_message


@dataclass(slots=True)
class CallRow:
    """One tool call of an assistant message, and how far it got."""

    message_id: int
    call_id: str
    tool: str
    args: str  # JSON
    state: str  # waiting | pending | running | done | error
    result: str | None


@dataclass(frozen=True)
class Compaction:
    """A summary of a thread's older messages: the model sees it, then the messages from
    `first_kept` on (`history()` still has them all). `last_message` is the newest message
    when it was made, `tokens_before` the context's estimate then, `made_by` who asked."""

    id: int
    thread_id: str
    summary: str
    first_kept: int
    last_message: int
    tokens_before: int
    made_by: str
    created_at: float


@dataclass(frozen=True)
class Approval:
    """A tool call waiting for (or given) a person's decision."""

    id: str
    turn_id: str
    thread_id: str
    call_id: str
    tool: str
    args: dict[str, Any] = field(metadata=_JSON)
    reason: str | None
    requester: str
    state: str
    decided_by: str | None
    decision_reason: str | None
    created_at: float
    expires_at: float
    decided_at: float | None


@dataclass(frozen=True)
class ThreadSummary:
    """A thread as a list of conversations shows it."""

    id: str
    updated_at: float
    title: str | None  # the text of its first turn that is not a command


@dataclass(frozen=True)
class Delivery:
    """One message in the outbox: what goes to which thread through which adapter."""

    id: int
    adapter: str
    thread_id: str
    turn_id: str | None
    kind: str  # reply | error | notice | approval | decided | secret | user
    body: dict[str, Any] = field(metadata=_JSON)  # "text", and "meta", "approval", ...
    state: str  # pending | sent | failed


@dataclass(frozen=True)
class SecretRequest:
    """A request for credentials: the link sent to the user, and how far it got."""

    id: str
    thread_id: str
    actor: str
    turn_id: str | None
    reason: str
    fields: tuple[tuple[str, str | None], ...] = field(
        metadata={"decode": _field_pairs}
    )  # (name, label)
    url: str
    state: str  # pending | used | expired
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Attachment:
    """A stored file (public): its id, name, media type, size in bytes and SHA-256."""

    id: str
    name: str
    mime: str
    size: int
    sha256: str


@dataclass(frozen=True)
class FileRow:
    """Where a stored file belongs: its scope, turn and message, the tool call that made
    it, and its origin (`user`: sent in; `tool`: attached by a tool; `result`: returned
    by a tool, so the model sees it too)."""

    scope: str
    turn_id: str | None
    message_id: int | None
    call_id: str | None
    origin: str
    id: str
    name: str
    mime: str
    size: int
    sha256: str

    @property
    def attachment(self) -> Attachment:
        return Attachment(self.id, self.name, self.mime, self.size, self.sha256)


@dataclass(frozen=True)
class Blob:
    """The content of a file by its SHA-256 (`data` None: kept in a file beside the database)."""

    sha256: str
    size: int
    data: bytes | None


@dataclass(frozen=True)
class Entry:
    """A durable record an extension keeps in a thread (`ctx.entries.append(kind, data)`);
    it never enters the model's context."""

    id: int
    thread_id: str
    turn_id: str | None
    kind: str
    data: Any = field(metadata=_JSON)
    at: float = field(metadata={"column": "created_at"})


@dataclass(frozen=True)
class QueuedMessage:
    """A message sent to a thread while a turn runs there, waiting to be delivered into it
    (`deliver` is "steer" or "follow_up")."""

    id: int
    thread_id: str
    actor: str
    text: str
    deliver: str
    source_id: str | None
    turn_id: str | None  # the turn it joined, once delivered


@dataclass(frozen=True)
class McpToolList:
    """The tools an MCP server listed last, as its `tools/list` pages gave them."""

    server: str
    tools: list[dict[str, Any]] = field(metadata=_JSON)
    listed_at: float


class Store(ABC):
    """agentkit's database: every durable row goes through these operations.

    An engine owns its connections and all of its SQL. Operations called inside
    `transaction()` join it; called outside one, each is atomic on its own. Writes on
    claimed work are fenced: they name the owner (and the attempt, the token) they expect
    and change nothing, answering False or leaving the row out, when that is not the
    holder any more. Every time a row stores for leases, run times, expiries, schedules
    and lock lifetimes comes from `now()`, the store's clock.
    """

    path: str  # where the data is: a file path, ":memory:", or a URL without its password
    version: int  # the schema version of the database
    latest: int  # the schema version this agentkit writes

    def __init__(self) -> None:
        self._wakeup = threading.Condition()
        self._waiters = 0

    # the engine

    @abstractmethod
    def transaction(self, *, durable: bool = False) -> contextlib.AbstractContextManager[None]:
        """A write transaction, committed when the block ends, rolled back on an error; a
        nested one is a savepoint whose rollback undoes only its own writes. `durable`
        (outermost only) commits so that a power cut cannot lose it."""

    def fenced(self) -> contextlib.AbstractContextManager[None]:
        """A transaction of operations that are each fenced or conditional on their own
        (results and claims): atomic together, and run beside other transactions where the
        engine can (`transaction()` serialises them all)."""
        return self.transaction()

    @abstractmethod
    def now(self) -> float:
        """The store's clock, in Unix seconds: the time of leases, expiries and schedules."""

    def notify(self) -> None:
        """Wake this process's idle waiters at once (an engine may tell other processes)."""
        if self._waiters:
            with self._wakeup:
                self._wakeup.notify_all()

    @abstractmethod
    def wait_for_change(self, timeout: float) -> None:
        """Sleep until another commit, a `notify()`, or `timeout` seconds."""

    def _wait(self, timeout: float, changed: Callable[[], bool], poll: float) -> None:
        """Wait for a local `notify()` or `changed()` (polled every `poll` seconds)."""
        deadline = time.monotonic() + timeout
        with self._wakeup:
            self._waiters += 1
            try:
                while (left := deadline - time.monotonic()) > 0:
                    if self._wakeup.wait(min(left, poll)) or changed():
                        return
            finally:
                self._waiters -= 1

    @abstractmethod
    def release_thread(self) -> None:
        """Give back what this thread holds (threads that end call it, so nothing leaks)."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; later use raises StoreError."""

    @abstractmethod
    def tables(self) -> list[str]:
        """The names of agentkit's tables, sorted."""

    @abstractmethod
    def row_counts(self) -> dict[str, int]:
        """How many rows each table holds."""

    @abstractmethod
    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of one of `tables()`, as column -> value (for tools, copies, tests)."""

    @abstractmethod
    def load_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows as `rows(table)` gives them, ids included (for copies)."""

    @abstractmethod
    def integrity(self) -> str:
        """The engine's own consistency check: "ok", or what is wrong."""

    # locks

    @abstractmethod
    def acquire_lock(self, name: str, owner: str, ttl: float) -> int | None:
        """Take `name` for `ttl` seconds unless another holds it; the new fencing token (one
        more than the last one of the name), or None."""

    @abstractmethod
    def renew_lock(self, name: str, owner: str, token: int, ttl: float) -> bool:
        """Extend a held lock to `ttl` seconds from now; False when `(owner, token)` does
        not hold it any more."""

    @abstractmethod
    def release_lock(self, name: str, owner: str, token: int) -> bool:
        """Give back a held lock; False when `(owner, token)` does not hold it any more."""

    @abstractmethod
    def holds_lock(self, name: str, owner: str, token: int) -> bool:
        """Whether `(owner, token)` holds the lock now (inside a transaction, writes made
        there commit only while it does)."""

    # jobs

    @abstractmethod
    def insert_job(self, job: NewJob, payload: str, key: str | None) -> int:
        """Add a queued job (one cheap statement); with a `key` already used, add nothing
        and return that job's row id."""

    @abstractmethod
    def insert_jobs(self, job: NewJob, payloads: Sequence[str]) -> list[int]:
        """Add one queued job per payload at once; their row ids, in order."""

    @abstractmethod
    def job_with_key(self, key: str) -> int | None:
        """The row id of the job enqueued with `key`, if any."""

    @abstractmethod
    def claim_jobs(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease: float,
        *,
        only: int | None = None,
        sweep: bool = False,
    ) -> list[Claimed]:
        """Lease up to `limit` ready jobs of these task names to `owner` for `lease`
        seconds, highest priority first, then oldest run time: each gets one more attempt,
        and no two running jobs share a target. With `only`, just that job if it is
        ready; with `sweep`, expired leases are requeued first (see `requeue_expired`)."""

    @abstractmethod
    def requeue_expired(self) -> int:
        """Make running jobs whose lease ran out queued again, or dead when out of
        attempts; how many changed."""

    @abstractmethod
    def finish_jobs(self, owner: str, ends: Sequence[JobEnd]) -> set[int]:
        """Record how claimed jobs ended; the row ids changed. A job that `owner` does not
        hold at that attempt (its lease moved on) is refused and left as it is."""

    @abstractmethod
    def extend_lease(self, rowid: int, owner: str, attempt: int, lease: float) -> bool:
        """Extend one job's lease to `lease` seconds from now; False when `(owner,
        attempt)` does not hold it."""

    @abstractmethod
    def extend_leases(self, owner: str, lease: float) -> None:
        """Extend the lease of every job `owner` holds to `lease` seconds from now."""

    @abstractmethod
    def holds_job(self, rowid: int, owner: str, attempt: int) -> bool:
        """Whether `(owner, attempt)` holds the job's lease now (fences a transaction)."""

    @abstractmethod
    def job(self, rowid: int) -> Job | None:
        """One job."""

    @abstractmethod
    def jobs(self, state: str | None, limit: int) -> list[Job]:
        """The newest jobs, of one state or all."""

    @abstractmethod
    def job_counts(self) -> dict[str, int]:
        """How many jobs are in each state (states with none are left out)."""

    @abstractmethod
    def cancel_job(self, rowid: int) -> str | None:
        """Cancel a queued job; the state it was in (None: no such job). Only a queued
        job changes."""

    @abstractmethod
    def requeue_job(self, rowid: int) -> str | None:
        """Queue a dead or failed job again, attempts from zero; the state it was in (None:
        no such job). Only a dead or failed job changes."""

    @abstractmethod
    def release_jobs(self, owner: str, held: Sequence[tuple[int, int]]) -> None:
        """Queue again at once the `(rowid, attempt)` jobs that `owner` holds (its process
        is being interrupted); jobs it no longer holds do not change."""

    @abstractmethod
    def job_running_with(self, name: str, payload: str) -> bool:
        """Whether a job of task `name` with exactly this JSON payload is running."""

    @abstractmethod
    def cancel_jobs_with(self, name: str, payload: str) -> int:
        """Cancel the queued and running jobs of task `name` with exactly this JSON payload
        (the worker of a running one loses its lease: its writes are refused); how many."""

    # schedules

    @abstractmethod
    def schedule(self, name: str) -> Schedule | None:
        """One schedule."""

    @abstractmethod
    def schedules(self) -> list[Schedule]:
        """Every schedule, by name."""

    @abstractmethod
    def put_schedule(
        self, name: str, kind: str, spec: str, tz: str, task: str, payload: str, next_due: float
    ) -> None:
        """Create a schedule, or replace one that differs in kind, spec, tz, task or payload
        (running again, first due at `next_due`); an unchanged one keeps its due time."""

    @abstractmethod
    def pause_schedule(self, name: str, paused: bool, next_due: float | None) -> bool:
        """Pause a schedule, or run it again from `next_due`; False when there is none."""

    @abstractmethod
    def delete_schedule(self, name: str) -> bool:
        """Delete a schedule; False when there is none."""

    @abstractmethod
    def due_schedules(self, at: float) -> list[Schedule]:
        """The schedules not paused whose next run is due at `at`."""

    @abstractmethod
    def advance_schedule(self, name: str, due: float, next_due: float | None) -> bool:
        """Move a schedule whose run due at `due` was enqueued (in the same transaction) to
        `next_due`; False (and no change) when another process advanced it first."""

    # threads, turns, messages and tool calls

    @abstractmethod
    def insert_turn(
        self,
        turn_id: str,
        thread: str,
        actor: str,
        text: str,
        source: str,
        source_id: str | None,
        meta: str | None,
    ) -> None:
        """Add a queued turn, creating its thread or marking it active."""

    @abstractmethod
    def turn(self, turn_id: str) -> TurnRow | None:
        """One turn."""

    @abstractmethod
    def turn_from(self, source: str, source_id: str) -> TurnRow | None:
        """The turn an inbound message `(adapter, source id)` started, if any."""

    @abstractmethod
    def set_turn_job(self, turn_id: str, job_rowid: int) -> None:
        """Note the job that runs a turn."""

    @abstractmethod
    def move_turn(self, turn_id: str, was: str, status: str) -> bool:
        """Move a turn from status `was` (only) to `status`; whether it moved."""

    @abstractmethod
    def end_turn(
        self,
        turn_id: str,
        status: str,
        reply: str | None,
        error: str | None,
        finished_at: float | None,
    ) -> TurnRow:
        """Set a turn's status (final or waiting) with its reply or error; the turn."""

    @abstractmethod
    def request_cancel(self, turn_id: str) -> None:
        """Ask a running turn to stop at its next step."""

    @abstractmethod
    def count_step(self, turn_id: str, input_tokens: int, output_tokens: int) -> None:
        """Count one more model step of a turn and the tokens it used."""

    @abstractmethod
    def thread_waits(self, thread: str) -> bool:
        """Whether a turn of the thread waits for an approval."""

    @abstractmethod
    def held_turns(self, thread: str) -> list[str]:
        """The thread's queued turns with no job yet (held), oldest first."""

    @abstractmethod
    def active_turns(self, thread: str) -> list[str]:
        """The thread's turns that are queued, running or waiting, oldest first."""

    @abstractmethod
    def running_threads(self, adapter: str) -> list[str]:
        """The threads under an adapter's name where a turn is running now."""

    @abstractmethod
    def threads(self, limit: int) -> list[tuple[str, float]]:
        """`(thread id, last activity)` of the most recently active threads."""

    @abstractmethod
    def thread_ids(self, prefix: str) -> list[str]:
        """The ids of the threads that start with `prefix`, sorted."""

    @abstractmethod
    def thread_summaries(self, prefix: str, limit: int) -> list["ThreadSummary"]:
        """The threads whose ids start with `prefix`, most recently active first, each
        with the text of its first turn that is not a command."""

    @abstractmethod
    def add_message(
        self,
        thread: str,
        turn_id: str,
        role: str,
        content: str | None,
        command: bool,
        origin: str | None = None,
    ) -> int:
        """Append a message to a thread; its id (ids grow in the order messages are added).
        `origin` marks a user message that was not the turn's own ("extension", "steer",
        "follow_up")."""

    @abstractmethod
    def messages(self, thread: str, limit: int) -> list[MessageRow]:
        """The thread's newest `limit` messages that are not commands, newest first."""

    @abstractmethod
    def messages_from(self, thread: str, first_id: int) -> list[MessageRow]:
        """The thread's messages that are not commands from id `first_id` on, oldest first."""

    @abstractmethod
    def set_message_tokens(self, message_id: int, tokens: int) -> None:
        """Record the tokens a provider reported for the step of an assistant message."""

    @abstractmethod
    def add_calls(
        self, turn_id: str, message_id: int, calls: Sequence[tuple[str, str, str, str, str | None]]
    ) -> None:
        """Add the tool calls `(call id, tool, args, state, result)` of a message, in order."""

    @abstractmethod
    def calls(self, turn_id: str, *, open_only: bool = False) -> list[CallRow]:
        """A turn's calls in order (with `open_only`, those waiting, pending or running)."""

    @abstractmethod
    def calls_of(self, message_ids: Sequence[int]) -> list[CallRow]:
        """The calls of these messages, by message and position."""

    @abstractmethod
    def close_calls(self, turn_id: str, running: str, pending: str) -> None:
        """End a turn's open calls as errors, a running one's result `running`, a pending
        one's `pending`."""

    @abstractmethod
    def claim_call(self, turn_id: str, call_id: str) -> bool:
        """Move a pending call to running; True for one caller only."""

    @abstractmethod
    def set_call(
        self, turn_id: str, call_id: str, state: str, result: str | None, was: str
    ) -> bool:
        """Move a call from state `was` (only) to `state` with its result; whether it moved."""

    # approvals and the events log

    @abstractmethod
    def insert_approval(
        self,
        approval_id: str,
        turn: TurnRow,
        call_id: str,
        tool: str,
        args: str,
        reason: str | None,
        expires_at: float,
    ) -> Approval:
        """Add a pending approval of a call, asked for by the turn's actor; the approval."""

    @abstractmethod
    def approval(self, approval_id: str) -> Approval | None:
        """One approval."""

    @abstractmethod
    def approvals(
        self,
        *,
        turn_id: str | None = None,
        thread: str | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> list[Approval]:
        """Approvals of one turn, thread or state (or all), newest first (`limit` of them)."""

    @abstractmethod
    def expired_approvals(self, at: float) -> list[Approval]:
        """The pending approvals whose time ran out at `at`."""

    @abstractmethod
    def settle_approval(
        self, approval_id: str, state: str, actor: str | None, reason: str | None
    ) -> bool:
        """Decide a pending approval; True for one decision only (a decided one stays)."""

    @abstractmethod
    def add_event(
        self, kind: str, actor: str | None, thread: str, turn_id: str | None, data: str
    ) -> None:
        """Append to the events log (who did what, when)."""

    # the outbox

    @abstractmethod
    def add_delivery(
        self,
        adapter: str,
        thread: str,
        turn_id: str | None,
        kind: str,
        body: dict[str, Any],
        sent: bool,
    ) -> int:
        """Put a message in the outbox (pending, or already `sent` by a pull adapter); its id."""

    @abstractmethod
    def delivery(self, rowid: int) -> Delivery | None:
        """One delivery."""

    @abstractmethod
    def deliveries(self, thread: str, after: int, limit: int) -> list[Delivery]:
        """The deliveries of a thread after the id `after`, oldest first."""

    @abstractmethod
    def approval_requests(self, turn_id: str, approval_id: str) -> list[Delivery]:
        """The deliveries that asked for an approval."""

    @abstractmethod
    def update_delivery(
        self, rowid: int, state: str | None, error: str | None, **body: Any
    ) -> bool:
        """Change a pending delivery: a new state (sent or failed, with its error) and the
        keys of `body` that are not None merged into its body; False when not pending."""

    # adapters' cursors

    @abstractmethod
    def cursor(self, adapter: str) -> str | None:
        """Where an adapter's polling got to."""

    @abstractmethod
    def set_cursor(self, adapter: str, cursor: str | None) -> None:
        """Move an adapter's cursor (in the transaction that stores what it fetched)."""

    # MCP servers' tool lists

    @abstractmethod
    def mcp_tool_list(self, server: str) -> McpToolList | None:
        """The tool list an MCP server gave last (None if it was never listed)."""

    @abstractmethod
    def mcp_tool_lists(self) -> list[McpToolList]:
        """Every MCP server's cached tool list, by server name."""

    @abstractmethod
    def set_mcp_tool_list(self, server: str, tools: list[dict[str, Any]]) -> None:
        """Replace an MCP server's cached tool list."""

    # secret requests

    @abstractmethod
    def insert_secret_request(
        self, request: SecretRequest, public_key: str, sealed_key: bytes
    ) -> None:
        """Add a pending request with its public key and sealed private key."""

    @abstractmethod
    def secret_request(self, request_id: str) -> tuple[SecretRequest, bytes | None] | None:
        """A request and its sealed private key (None once used or expired)."""

    @abstractmethod
    def use_secret_request(self, request_id: str) -> bool:
        """Mark a pending request used, deleting its private key; False if not pending."""

    @abstractmethod
    def expire_secret_requests(self, at: float) -> int:
        """Expire the pending requests past their time at `at`, deleting their private
        keys; how many."""

    @abstractmethod
    def pending_secret_requests(self, turn_id: str) -> list[SecretRequest]:
        """The pending requests a turn made, oldest first."""

    # attachments

    @abstractmethod
    def put_blob(self, blob: Blob) -> None:
        """Keep a file's content under its SHA-256 (a no-op when it is there already)."""

    @abstractmethod
    def blob(self, sha256: str) -> Blob | None:
        """The content kept under a SHA-256, if any."""

    @abstractmethod
    def add_attachment(self, row: FileRow) -> None:
        """Record a stored file in its scope."""

    @abstractmethod
    def attachment(self, attachment_id: str, scope: str) -> FileRow | None:
        """A stored file, only when it belongs to `scope`."""

    @abstractmethod
    def claim_uploads(self, ids: Sequence[str], scope: str, turn_id: str) -> int:
        """Give the uploads of `scope` that no turn has yet to `turn_id`; how many."""

    @abstractmethod
    def link_attachments(self, turn_id: str, message_id: int) -> None:
        """Attach the files sent in with a turn to its user message."""

    @abstractmethod
    def attachments_of(self, message_ids: Sequence[int]) -> list[FileRow]:
        """The files of these messages, in the order they were stored."""

    @abstractmethod
    def turn_attachments(self, turn_id: str) -> list[FileRow]:
        """The files of one turn, in the order they were stored."""

    @abstractmethod
    def prune_files(self, before: float) -> tuple[int, list[Blob]]:
        """Delete the uploads no message took that were stored before `before`, then the
        contents no stored file refers to; how many uploads, and the contents deleted
        (without their data)."""

    @abstractmethod
    def postpone_turn(self, turn_id: str, text: str, run_at: float) -> bool:
        """Set a queued turn's text and move its queued job to `run_at` (an album that
        grows); False when the turn is no longer queued."""

    # compactions

    @abstractmethod
    def add_compaction(
        self,
        thread: str,
        summary: str,
        first_kept: int,
        last_message: int,
        tokens_before: int,
        made_by: str,
        after: int | None,
    ) -> Compaction | None:
        """Add a thread's compaction if its latest is still `after` (a compaction id, or
        None for none); the new row, else None and nothing written."""

    @abstractmethod
    def last_compaction(self, thread: str) -> Compaction | None:
        """The thread's newest compaction, if any."""

    @abstractmethod
    def compactions(self, thread: str) -> list[Compaction]:
        """Every compaction of a thread, oldest first."""

    # extension entries and queued mid-turn messages

    @abstractmethod
    def set_turn_instructions(self, turn_id: str, instructions: str | None) -> None:
        """Keep the extra instructions extensions gave a turn (for each of its steps)."""

    @abstractmethod
    def add_entries(
        self, thread: str, turn_id: str | None, entries: Sequence[tuple[str, str]]
    ) -> None:
        """Append entries `(kind, data as JSON)` to a thread, in order."""

    @abstractmethod
    def entries(self, thread: str, kind: str | None, limit: int) -> list[Entry]:
        """The thread's newest `limit` entries (of one kind, or all), oldest first."""

    @abstractmethod
    def add_queued(
        self, thread: str, actor: str, text: str, deliver: str, source_id: str | None
    ) -> int:
        """Queue a message for delivery into the thread's running turn; its id."""

    @abstractmethod
    def queued_from(self, thread: str, source_id: str) -> QueuedMessage | None:
        """The queued message of a thread with this source id, delivered or not."""

    @abstractmethod
    def has_queued(self, thread: str, delivers: Sequence[str]) -> bool:
        """Whether messages of these `deliver` kinds wait for delivery in the thread."""

    @abstractmethod
    def take_queued(
        self, thread: str, delivers: Sequence[str], turn_id: str | None
    ) -> list[QueuedMessage]:
        """Mark the thread's undelivered messages of these `deliver` kinds as delivered into
        `turn_id` (None: released as turns of their own); them, oldest first."""

    # saved secrets (sealed values; the kit seals and opens them)

    @abstractmethod
    def save_secrets(self, thread_id: str, sealed: dict[str, bytes]) -> None:
        """Set a thread's sealed secret values by name, replacing those saved before."""

    @abstractmethod
    def sealed_secrets(self, thread_id: str) -> dict[str, bytes]:
        """A thread's sealed secret values by name."""

    # retention

    @abstractmethod
    def prune(self, before: float) -> dict[str, int]:
        """Delete finished jobs, events, sent deliveries, used or expired secret requests
        and delivered queued messages older than `before`; how many of each."""


# Engines by URL scheme ("" for a plain path): each is a callable(target, **options) that
# imports its driver only when called, so an engine costs nothing until it is used.
STORE_ENGINES: dict[str, Callable[..., Store]] = {}


def open_store(target: str | os.PathLike[str], **options: Any) -> Store:
    """The store for a path (or `":memory:"`) or a URL like `scheme://...`, opened by the
    engine registered for its scheme in `STORE_ENGINES`."""
    target = os.fspath(target)
    scheme = target.partition("://")[0].lower() if "://" in target else ""
    engine = STORE_ENGINES.get(scheme)
    if engine is None:
        known = ", ".join(f"{s}://" for s in sorted(STORE_ENGINES) if s) or "none"
        raise BadInput(f"no store engine for {scheme}:// (known: {known}, or a file path)")
    return engine(target, **options)


# The tables other rows refer to, in the order a copy fills them; the rest follow by name.
_PARENT_TABLES = ("threads", "turns", "messages")


def _copy_order(table: str) -> tuple[int, str]:
    return (_PARENT_TABLES.index(table) if table in _PARENT_TABLES else 3, table)


def copy_store(source: Store, target: Store) -> dict[str, int]:
    """Copy every row of `source` into an empty `target` of the same schema, whatever their
    engines, in one transaction of `target`; how many rows each table got. BadInput, with
    nothing written, when `target` already holds rows or the schemas differ; StoreError
    when the counts copied do not match (and the copy is rolled back)."""
    if source.version != target.version:
        raise BadInput(
            f"{source.path} has schema {source.version} and {target.path} {target.version}: "
            "open both with the same agentkit first"
        )
    tables = sorted(source.tables(), key=_copy_order)
    if tables != sorted(target.tables(), key=_copy_order):
        raise BadInput(f"{source.path} and {target.path} do not have the same tables")
    if any(target.row_counts().values()):
        raise BadInput(f"{target.path} is not empty: copy into a new database")
    expected = source.row_counts()
    with target.transaction():
        for table in tables:
            target.load_rows(table, source.rows(table))
        copied = target.row_counts()
        if copied != expected:
            raise StoreError(f"copied {copied}, but {source.path} holds {expected}")
    return copied


# ───────────────────────────────────────── SQL store ─────────────────────────────────────────
# The operations as SQL statements that SQLite and PostgreSQL both run (`_SQLStore`); an
# engine below supplies connections, transactions and what its dialect does its own way.


EXPIRED_JOB = "state = 'running' AND lease_until < ?"  # a job whose lease ran out
OWNED_JOB = "state = 'running' AND owner = ?"  # a job an owner holds


class _SQLStore(Store):
    """The operations as SQL in the subset SQLite (3.35+) and PostgreSQL (15+) share.

    Statements use `?` placeholders, `ON CONFLICT`, `RETURNING`, `CASE`, `COALESCE` and
    `EXISTS`; never `INSERT OR REPLACE` or numbered parameters; a JSON function only in
    `IN_LIST` and `NAMES_TABLE`. An engine runs them through `_rows`, `_rows_many`,
    `_insert_many`, `_count` and `_described` (translating `?` if its driver wants another
    style) inside `_atomic`, says how a list of ids or names is matched (`IN_LIST` and
    `NAMES_TABLE` with `_list(values)`) and which rows a claim locks (`READY_LOCK`,
    `RUNNING_LOCK`), opens the connection of each thread (`_open`; the bookkeeping and
    savepoints are here), and writes the rest of the contract on its own: `transaction`,
    `now`, `wait_for_change`, `tables`, `integrity`, and the transaction of `claim_jobs`.
    """

    IN_LIST = "IN (SELECT value FROM json_each(?))"  # `x IN_LIST` with `_list(values)`

    @staticmethod
    def _list(values: Sequence[int | str]) -> Any:
        """The parameter that `IN_LIST` matches against (ids and names: plain JSON)."""
        return _encoder.encode(list(values))

    @staticmethod
    def _unlocked_jobs(where: str) -> str:  # with EXPIRED_JOB or OWNED_JOB
        """A condition on jobs for the sweeps over running jobs (lease renewal and expiry):
        `where`, and on an engine whose writers run at once, only the rows no other
        transaction holds now, so that a sweep never waits for (or deadlocks with) a
        worker finishing the same jobs; the next sweep sees what this one skipped."""
        return where

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()  # .conn, and .depth: how many transactions are open
        self._all: list[Any] = []
        self._guard = threading.Lock()
        self.closed = False

    # connections: one per thread, opened by the engine

    @abstractmethod
    def _open(self) -> Any:
        """A new connection of the engine's driver, configured."""

    def _usable(self, conn: Any) -> bool:
        """Whether a thread's connection still works (an engine may know that it broke)."""
        return True

    def connection(self) -> Any:
        """This thread's connection, opened on first use (and again after it broke)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or not self._usable(conn):
            if self.closed:
                raise StoreError("the store is closed")
            conn = self._open()
            self._local.conn = conn
            self._local.depth = 0
            with self._guard:
                self._all.append(conn)
        return conn

    def release_thread(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._guard:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def close(self) -> None:
        with self._guard:
            self.closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    @contextlib.contextmanager
    def _savepoint(self, conn: Any) -> Iterator[None]:
        """A transaction inside this thread's open one, undone alone on an error."""
        depth = self._local.depth
        name = f"sp{depth}"
        conn.execute(f"SAVEPOINT {name}")
        self._local.depth = depth + 1
        try:
            yield
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            raise
        finally:
            conn.execute(f"RELEASE {name}")
            self._local.depth = depth

    @abstractmethod
    def _atomic(self) -> contextlib.AbstractContextManager[None]:
        """A transaction for one operation's statements, or the caller's one when it is open
        (joined as it is: an operation completes, or raises and aborts the caller's)."""

    @abstractmethod
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run one statement (in the current transaction, or atomic on its own); its rows."""

    @abstractmethod
    def _rows_many(self, sql: str, params: Sequence[Sequence[Any]]) -> list[tuple]:
        """Run one statement once per parameter tuple, atomically; all the rows returned."""

    @abstractmethod
    def _insert_many(self, sql: str, params: Sequence[Sequence[Any]]) -> list[int]:
        """Run an INSERT (without RETURNING) once per parameter tuple, atomically; the new
        rows' ids, in order."""

    @abstractmethod
    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write statement like `_rows`; how many rows it changed."""

    @abstractmethod
    def _described(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one read statement; its column names and rows."""

    def _changed(self, sql: str, params: Sequence[Any]) -> bool:
        """Run one write statement like `_rows`; whether it changed exactly one row."""
        return self._count(sql, params) == 1

    def _column(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The first column of each row of one statement."""
        return [row[0] for row in self._rows(sql, params)]

    def _fetch_one(self, cls: type, sql: str, params: Sequence[Any]) -> Any:
        rows = self._rows(sql, params)
        return from_row(cls, rows[0]) if rows else None

    def _fetch_all(self, cls: type, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return from_rows(cls, self._rows(sql, params))

    def row_counts(self) -> dict[str, int]:
        return {t: self._rows(f'SELECT count(*) FROM "{t}"')[0][0] for t in self.tables()}

    def rows(self, table: str) -> list[dict[str, Any]]:
        if table not in self.tables():
            raise BadInput(f"no table {table!r} (tables: {', '.join(self.tables())})")
        names, rows = self._described(f'SELECT * FROM "{table}"')
        return [dict(zip(names, row, strict=True)) for row in rows]

    def load_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        if table not in self.tables():
            raise BadInput(f"no table {table!r} (tables: {', '.join(self.tables())})")
        if rows:
            names = list(rows[0])
            self._rows_many(
                f'INSERT INTO "{table}" ({", ".join(names)}) '
                f"VALUES ({', '.join('?' * len(names))})",
                [[row[name] for name in names] for row in rows],
            )

    # locks

    def acquire_lock(self, name: str, owner: str, ttl: float) -> int | None:
        at = self.now()
        rows = self._rows(
            "INSERT INTO locks (name, owner, token, expires_at) VALUES (?, ?, 1, ?) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
            "token = locks.token + 1, expires_at = excluded.expires_at "
            "WHERE locks.owner IS NULL OR locks.expires_at <= ? RETURNING token",
            (name, owner, at + ttl, at),
        )
        return rows[0][0] if rows else None

    def renew_lock(self, name: str, owner: str, token: int, ttl: float) -> bool:
        at = self.now()
        return self._changed(
            "UPDATE locks SET expires_at = ? "
            "WHERE name = ? AND owner = ? AND token = ? AND expires_at > ?",
            (at + ttl, name, owner, token, at),
        )

    def release_lock(self, name: str, owner: str, token: int) -> bool:
        return self._changed(
            "UPDATE locks SET owner = NULL, expires_at = 0 "
            "WHERE name = ? AND owner = ? AND token = ? AND expires_at > ?",
            (name, owner, token, self.now()),
        )

    def holds_lock(self, name: str, owner: str, token: int) -> bool:
        return bool(
            self._rows(
                "SELECT 1 FROM locks WHERE name = ? AND owner = ? AND token = ? AND expires_at > ?",
                (name, owner, token, self.now()),
            )
        )

    # jobs

    # A queued job whose target has a running job is `blocked`: claims skip it (they flag
    # the ones they meet), and whatever ends a target's running job (a result, a failure, a
    # retry, an expired lease) clears its flags in the same transaction, so a blocked job is
    # read once per run of its target, not once per claim.

    def insert_job(self, job: NewJob, payload: str, key: str | None) -> int:
        rows = self._rows(
            "INSERT INTO jobs (name, payload, state, priority, run_at, created_at, retries, "
            "backoff, timeout, key, target, blocked) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, "
            # (a NULL parameter needs a type where PostgreSQL cannot infer one)
            f"?, ?, CASE WHEN CAST(? AS TEXT) IS NOT NULL AND {self.TARGET_RUNNING} "
            "THEN 1 ELSE 0 END) "
            "ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING RETURNING id",
            (job.name, payload, *job[1:7], key, job.target, job.target, job.target),
        )
        return rows[0][0] if rows else self._rows("SELECT id FROM jobs WHERE key = ?", (key,))[0][0]

    def insert_jobs(self, job: NewJob, payloads: Sequence[str]) -> list[int]:
        with self._atomic():
            running = job.target is not None and bool(
                self._rows(f"SELECT {self.TARGET_RUNNING}", (job.target,))[0][0]
            )
            rest = (*job[1:], int(running))
            return self._insert_many(
                "INSERT INTO jobs (name, payload, state, priority, run_at, created_at, "
                "retries, backoff, timeout, target, blocked) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                [(job.name, payload, *rest) for payload in payloads],
            )

    def _unblock(self, targets: Iterable[str | None]) -> None:
        """Clear the flags of the jobs blocked behind these targets (whose running jobs have
        just ended, in the same transaction)."""
        if named := sorted({t for t in targets if t is not None}):
            self._count(
                f"UPDATE jobs SET blocked = 0 WHERE blocked = 1 AND target {self.IN_LIST}",
                (self._list(named),),
            )

    def job_with_key(self, key: str) -> int | None:
        rows = self._rows("SELECT id FROM jobs WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def requeue_expired(self) -> int:
        at = self.now()
        with self._atomic():
            expired = self._rows(
                "UPDATE jobs SET owner = NULL, lease_until = NULL, "
                "last_error = 'lease expired: its worker stopped before finishing', "
                "state = CASE WHEN attempts > retries THEN 'dead' ELSE 'queued' END, "
                "finished_at = CASE WHEN attempts > retries THEN ? END "
                f"WHERE {self._unlocked_jobs(EXPIRED_JOB)} RETURNING target",
                (at, at),
            )
            self._unblock(target for (target,) in expired)
        return len(expired)

    # Claims read only the jobs they can take (migration 6). The ready index holds the queued
    # jobs that are not blocked, by task name, then priority, run_at and id. A claim seeks each
    # of its task names on its own: a name's queued priorities, highest first, one seek each (a
    # loose index scan), and per priority the ready jobs are a range of the index. So other
    # tasks' backlog and jobs queued for later are never read, and a claim by id is a rowid
    # lookup. A queued job met while its target runs is flagged `blocked`, which takes it out
    # of the ready index until its target's running job ends. An engine whose transactions
    # run side by side (PostgreSQL) locks the rows a claim reads (`READY_LOCK`) and the
    # running job a flag depends on (`RUNNING_LOCK`), skipping a running job that is being
    # ended (and so leaving its waiting jobs unflagged): a flag is never set after the end
    # that clears it, and a claim never waits.
    NAMES_TABLE = "json_each(?)"  # a table of the names in `_list(names)`, column `value`
    READY_LOCK = ""
    RUNNING_LOCK = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Build the claim's statements once per engine, from its hooks."""
        super().__init_subclass__(**kwargs)
        busy = (
            "target IS NOT NULL AND EXISTS (SELECT 1 FROM jobs AS r "
            "WHERE r.state = 'running' AND r.target = jobs.target)"
        )
        # each name with its best queued priority, one index seek per name
        cls.BEST_PRIORITIES_SQL = (
            "SELECT value, (SELECT max(priority) FROM jobs WHERE state = 'queued' "
            f"AND blocked = 0 AND name = value) FROM {cls.NAMES_TABLE}"
        )
        # a name's best priority below ? (a statement of its own: `? IS NULL OR ...` in the
        # first one would scan)
        cls.NEXT_PRIORITY_SQL = (
            "SELECT max(priority) FROM jobs "
            "WHERE state = 'queued' AND blocked = 0 AND name = ? AND priority < ?"
        )
        # ready rows: id, target, priority, run_at, and whether the target runs now (busy)
        cls.READY_SQL = (
            f"SELECT id, target, priority, run_at, {busy} FROM jobs "
            "WHERE state = 'queued' AND blocked = 0 AND name = ? AND priority = ? "
            f"AND run_at <= ? ORDER BY run_at, id LIMIT ?{cls.READY_LOCK}"
        )
        cls.READY_BY_ID_SQL = (
            f"SELECT id, target, priority, run_at, {busy}, name FROM jobs "
            f"WHERE id = ? AND state = 'queued' AND blocked = 0 AND run_at <= ?{cls.READY_LOCK}"
        )
        cls.BLOCK_SQL = (
            f"UPDATE jobs SET blocked = 1 WHERE id {cls.IN_LIST} AND EXISTS (SELECT 1 FROM "
            f"jobs AS r WHERE r.state = 'running' AND r.target = jobs.target{cls.RUNNING_LOCK})"
        )
        cls.TARGET_RUNNING = (
            "EXISTS (SELECT 1 FROM jobs AS r WHERE r.state = 'running' "
            f"AND r.target = ?{cls.RUNNING_LOCK})"
        )

    def claim_jobs(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease: float,
        *,
        only: int | None = None,
        sweep: bool = False,
    ) -> list[Claimed]:
        with self._atomic():
            if sweep:
                self.requeue_expired()
            return self._claim(owner, names, limit, lease, only)

    def _claim(
        self, owner: str, names: Sequence[str], limit: int, lease: float, only: int | None
    ) -> list[Claimed]:
        """A claim's reads and writes, in the caller's transaction."""
        at = self.now()
        if only is None:
            best = self._rows(self.BEST_PRIORITIES_SQL, (self._list(names),))
            ready = [
                row
                for name, priority in best
                if priority is not None
                for row in self._ready(name, priority, at, limit)
            ]
            ready.sort(key=lambda row: (-row[2], row[3], row[0]))  # priority, run_at, id
        else:
            ready = self._ready_by_id(only, names, at)
        picked, targets = [], set()
        for rowid, target, *_ in ready:
            if len(picked) < limit and (target is None or target not in targets):
                picked.append(rowid)
                targets.add(target)
        return self._lease(picked, owner, lease, at) if picked else []

    def _ready(self, name: str, priority: int | None, at: float, limit: int) -> list[tuple]:
        """Up to `limit` ready rows (id, target, priority, run_at, busy) of one task name
        from its best queued `priority` down, best first, flagging the blocked ones met on
        the way (the next claim seeks past them)."""
        found: list[tuple] = []
        while priority is not None:
            page = limit - len(found)
            while len(found) < limit:
                rows = self._rows(self.READY_SQL, (name, priority, at, page))
                blocked = [row[0] for row in rows if row[4]]
                found += [row for row in rows if not row[4]]
                if not blocked or self._block(blocked) < len(blocked):
                    break  # (unflagged: their target's job is ending; the next claim sees)
                page = min(page * 2, 4096)  # a run of blocked jobs: flag it in fewer reads
            if len(found) >= limit:
                break
            (priority,) = self._rows(self.NEXT_PRIORITY_SQL, (name, priority))[0]
        return found[:limit]

    def _ready_by_id(self, rowid: int, names: Sequence[str], at: float) -> list[tuple]:
        """The one job `rowid` as a ready row if it is ready and of these names (a rowid
        lookup); flagged when its target is running."""
        rows = self._rows(self.READY_BY_ID_SQL, (rowid, at))
        if not rows or rows[0][5] not in names:
            return []
        if rows[0][4]:
            self._block([rowid])
            return []
        return rows[:1]

    def _block(self, rowids: Sequence[int]) -> int:
        """Flag queued jobs met while their target runs (part of a claim), if it still does;
        how many were flagged."""
        return self._count(self.BLOCK_SQL, (self._list(rowids),))

    def _lease(self, picked: Sequence[int], owner: str, lease: float, at: float) -> list[Claimed]:
        """Move the picked queued jobs to running under `owner` at `at` (part of a claim), in
        the order picked."""
        rows = self._rows(
            "UPDATE jobs SET state = 'running', owner = ?, attempts = attempts + 1, "
            f"lease_until = ?, started_at = ? WHERE id {self.IN_LIST} "
            f"RETURNING {columns(Claimed)}",
            (owner, at + lease, at, self._list(picked)),
        )
        if len(rows) > 1:
            rank = {rowid: index for index, rowid in enumerate(picked)}
            rows.sort(key=lambda row: rank[row[0]])
        return from_rows(Claimed, rows)

    def finish_jobs(self, owner: str, ends: Sequence[JobEnd]) -> set[int]:
        with self._atomic():
            rows = self._rows_many(
                "UPDATE jobs SET state = ?, result = ?, last_error = ?, "
                "run_at = COALESCE(?, run_at), finished_at = ?, owner = NULL, "
                "lease_until = NULL WHERE id = ? AND attempts = ? AND owner = ? "
                "AND state = 'running' RETURNING id, target",
                [(*end, owner) for end in ends],
            )
            if targets := [target for _, target in rows if target is not None]:
                self._unblock(targets)
        return {rowid for rowid, _ in rows}

    def extend_lease(self, rowid: int, owner: str, attempt: int, lease: float) -> bool:
        return self._changed(
            "UPDATE jobs SET lease_until = ? "
            "WHERE id = ? AND owner = ? AND attempts = ? AND state = 'running'",
            (self.now() + lease, rowid, owner, attempt),
        )

    def extend_leases(self, owner: str, lease: float) -> None:
        self._count(
            f"UPDATE jobs SET lease_until = ? WHERE {self._unlocked_jobs(OWNED_JOB)}",
            (self.now() + lease, owner),
        )

    def holds_job(self, rowid: int, owner: str, attempt: int) -> bool:
        return bool(
            self._rows(
                "SELECT 1 FROM jobs WHERE id = ? AND owner = ? AND attempts = ? "
                "AND state = 'running'",
                (rowid, owner, attempt),
            )
        )

    def job(self, rowid: int) -> Job | None:
        return self._fetch_one(Job, f"SELECT {columns(Job)} FROM jobs WHERE id = ?", (rowid,))

    def jobs(self, state: str | None, limit: int) -> list[Job]:
        where = "" if state is None else "WHERE state = ? "
        params = () if state is None else (state,)
        sql = f"SELECT {columns(Job)} FROM jobs {where}ORDER BY id DESC LIMIT ?"
        return self._fetch_all(Job, sql, (*params, limit))

    def job_counts(self) -> dict[str, int]:
        return dict(self._rows("SELECT state, count(*) FROM jobs GROUP BY state"))

    def _move_job(self, rowid: int, allowed: tuple[str, ...], change: str) -> str | None:
        """Apply `change` (a SET list taking the time) to a job in an allowed state; the
        state it was in."""
        with self._atomic():
            rows = self._rows("SELECT state FROM jobs WHERE id = ?", (rowid,))
            if rows and rows[0][0] in allowed:
                self._count(f"UPDATE jobs SET {change} WHERE id = ?", (self.now(), rowid))
        return rows[0][0] if rows else None

    def cancel_job(self, rowid: int) -> str | None:
        return self._move_job(rowid, ("queued",), "state = 'cancelled', finished_at = ?")

    def requeue_job(self, rowid: int) -> str | None:
        return self._move_job(
            rowid,
            ("dead", "failed"),
            "state = 'queued', attempts = 0, run_at = ?, finished_at = NULL",
        )

    def release_jobs(self, owner: str, held: Sequence[tuple[int, int]]) -> None:
        with self._atomic():
            rows = self._rows_many(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL, "
                "last_error = 'interrupted: its worker stopped before finishing' "
                "WHERE id = ? AND owner = ? AND attempts = ? AND state = 'running' "
                "RETURNING target",
                [(rowid, owner, attempt) for rowid, attempt in held],
            )
            self._unblock(target for (target,) in rows)

    def job_running_with(self, name: str, payload: str) -> bool:
        return bool(
            self._rows(
                "SELECT 1 FROM jobs WHERE state = 'running' AND name = ? AND payload = ?",
                (name, payload),
            )
        )

    def cancel_jobs_with(self, name: str, payload: str) -> int:
        with self._atomic():
            rows = self._rows(
                "UPDATE jobs SET state = 'cancelled', owner = NULL, lease_until = NULL, "
                "finished_at = ? WHERE (state = 'queued' OR state = 'running') AND name = ? "
                "AND payload = ? RETURNING target",
                (self.now(), name, payload),
            )
            self._unblock(target for (target,) in rows)
        return len(rows)

    # schedules

    def schedule(self, name: str) -> Schedule | None:
        sql = f"SELECT {columns(Schedule)} FROM schedules WHERE name = ?"
        return self._fetch_one(Schedule, sql, (name,))

    def schedules(self) -> list[Schedule]:
        return self._fetch_all(Schedule, f"SELECT {columns(Schedule)} FROM schedules ORDER BY name")

    def put_schedule(
        self, name: str, kind: str, spec: str, tz: str, task: str, payload: str, next_due: float
    ) -> None:
        self._count(
            "INSERT INTO schedules (name, kind, spec, tz, task, payload, next_due) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "kind = excluded.kind, spec = excluded.spec, tz = excluded.tz, "
            "task = excluded.task, payload = excluded.payload, next_due = excluded.next_due, "
            "last_due = NULL, paused = 0 WHERE schedules.kind != excluded.kind "
            "OR schedules.spec != excluded.spec OR schedules.tz != excluded.tz "
            "OR schedules.task != excluded.task OR schedules.payload != excluded.payload",
            (name, kind, spec, tz, task, payload, next_due),
        )

    def pause_schedule(self, name: str, paused: bool, next_due: float | None) -> bool:
        if paused:
            return self._changed("UPDATE schedules SET paused = 1 WHERE name = ?", (name,))
        return self._changed(
            "UPDATE schedules SET paused = 0, next_due = ? WHERE name = ?", (next_due, name)
        )

    def delete_schedule(self, name: str) -> bool:
        return self._changed("DELETE FROM schedules WHERE name = ?", (name,))

    def due_schedules(self, at: float) -> list[Schedule]:
        return self._fetch_all(
            Schedule,
            f"SELECT {columns(Schedule)} FROM schedules WHERE paused = 0 AND next_due <= ?",
            (at,),
        )

    def advance_schedule(self, name: str, due: float, next_due: float | None) -> bool:
        return self._changed(
            "UPDATE schedules SET next_due = ?, last_due = ? WHERE name = ? AND next_due = ?",
            (next_due, due, name, due),
        )

    # threads, turns, messages and tool calls

    def insert_turn(
        self,
        turn_id: str,
        thread: str,
        actor: str,
        text: str,
        source: str,
        source_id: str | None,
        meta: str | None,
    ) -> None:
        at = self.now()
        with self._atomic():
            self._count(
                "INSERT INTO threads (id, created_at, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at",
                (thread, at, at),
            )
            self._count(
                "INSERT INTO turns (id, thread_id, actor, text, source, source_id, status, "
                "created_at, meta) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                (turn_id, thread, actor, text, source, source_id, at, meta),
            )

    def turn(self, turn_id: str) -> TurnRow | None:
        return self._fetch_one(
            TurnRow, f"SELECT {columns(TurnRow)} FROM turns WHERE id = ?", (turn_id,)
        )

    def turn_from(self, source: str, source_id: str) -> TurnRow | None:
        sql = f"SELECT {columns(TurnRow)} FROM turns WHERE source = ? AND source_id = ?"
        return self._fetch_one(TurnRow, sql, (source, source_id))

    def set_turn_job(self, turn_id: str, job_rowid: int) -> None:
        self._count("UPDATE turns SET job_id = ? WHERE id = ?", (job_rowid, turn_id))

    def move_turn(self, turn_id: str, was: str, status: str) -> bool:
        return self._changed(
            "UPDATE turns SET status = ? WHERE id = ? AND status = ?", (status, turn_id, was)
        )

    def end_turn(
        self,
        turn_id: str,
        status: str,
        reply: str | None,
        error: str | None,
        finished_at: float | None,
    ) -> TurnRow:
        return self._fetch_one(
            TurnRow,
            "UPDATE turns SET status = ?, reply = ?, error = ?, finished_at = ? WHERE id = ? "
            f"RETURNING {columns(TurnRow)}",
            (status, reply, error, finished_at, turn_id),
        )

    def request_cancel(self, turn_id: str) -> None:
        self._count("UPDATE turns SET cancel_requested = 1 WHERE id = ?", (turn_id,))

    def count_step(self, turn_id: str, input_tokens: int, output_tokens: int) -> None:
        self._count(
            "UPDATE turns SET steps = steps + 1, input_tokens = input_tokens + ?, "
            "output_tokens = output_tokens + ? WHERE id = ?",
            (input_tokens, output_tokens, turn_id),
        )

    def thread_waits(self, thread: str) -> bool:
        return bool(
            self._rows(
                "SELECT 1 FROM turns WHERE thread_id = ? AND status = 'waiting_approval'",
                (thread,),
            )
        )

    def held_turns(self, thread: str) -> list[str]:
        return self._column(
            "SELECT id FROM turns WHERE thread_id = ? AND status = 'queued' AND job_id IS NULL "
            "ORDER BY created_at",
            (thread,),
        )

    def active_turns(self, thread: str) -> list[str]:
        return self._column(
            "SELECT id FROM turns WHERE thread_id = ? "
            "AND status IN ('queued', 'running', 'waiting_approval') ORDER BY created_at",
            (thread,),
        )

    def running_threads(self, adapter: str) -> list[str]:
        return self._column(
            "SELECT DISTINCT thread_id FROM turns WHERE status = 'running' "
            "AND thread_id >= ? AND thread_id < ?",
            (f"{adapter}:", f"{adapter};"),
        )

    def thread_ids(self, prefix: str) -> list[str]:
        return self._column(
            "SELECT id FROM threads WHERE id >= ? AND id < ? ORDER BY id",
            (prefix, prefix + "\U0010ffff"),
        )

    def threads(self, limit: int) -> list[tuple[str, float]]:
        return self._rows(
            "SELECT id, updated_at FROM threads ORDER BY updated_at DESC LIMIT ?", (limit,)
        )

    def thread_summaries(self, prefix: str, limit: int) -> list["ThreadSummary"]:
        return self._fetch_all(
            ThreadSummary,
            "SELECT t.id, t.updated_at, (SELECT u.text FROM turns u WHERE u.thread_id = t.id "
            "AND u.text NOT LIKE '/%' ORDER BY u.created_at, u.id LIMIT 1) AS title "
            "FROM threads t WHERE t.id >= ? AND t.id < ? ORDER BY t.updated_at DESC LIMIT ?",
            (prefix, prefix + "\U0010ffff", limit),
        )

    def add_message(
        self,
        thread: str,
        turn_id: str,
        role: str,
        content: str | None,
        command: bool,
        origin: str | None = None,
    ) -> int:
        return self._rows(
            "INSERT INTO messages (thread_id, turn_id, role, content, command, created_at, "
            "origin) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (thread, turn_id, role, content, int(command), self.now(), origin),
        )[0][0]

    def messages(self, thread: str, limit: int) -> list[MessageRow]:
        return self._fetch_all(
            MessageRow,
            f"SELECT {columns(MessageRow)} FROM messages WHERE thread_id = ? AND command = 0 "
            "ORDER BY id DESC LIMIT ?",
            (thread, limit),
        )

    def messages_from(self, thread: str, first_id: int) -> list[MessageRow]:
        return self._fetch_all(
            MessageRow,
            f"SELECT {columns(MessageRow)} FROM messages WHERE thread_id = ? AND command = 0 "
            "AND id >= ? ORDER BY id",
            (thread, first_id),
        )

    def set_message_tokens(self, message_id: int, tokens: int) -> None:
        self._count("UPDATE messages SET tokens = ? WHERE id = ?", (tokens, message_id))

    def add_calls(
        self, turn_id: str, message_id: int, calls: Sequence[tuple[str, str, str, str, str | None]]
    ) -> None:
        if calls:
            self._rows_many(
                "INSERT INTO calls (turn_id, message_id, position, call_id, tool, args, state, "
                "result) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(turn_id, message_id, i, *call) for i, call in enumerate(calls)],
            )

    def calls(self, turn_id: str, *, open_only: bool = False) -> list[CallRow]:
        where = " AND state IN ('waiting', 'pending', 'running')" if open_only else ""
        return self._fetch_all(
            CallRow,
            f"SELECT {columns(CallRow)} FROM calls WHERE turn_id = ?{where} "
            "ORDER BY message_id, position",
            (turn_id,),
        )

    def calls_of(self, message_ids: Sequence[int]) -> list[CallRow]:
        if not message_ids:
            return []
        return self._fetch_all(
            CallRow,
            f"SELECT {columns(CallRow)} FROM calls WHERE message_id {self.IN_LIST} "
            "ORDER BY message_id, position",
            (self._list(message_ids),),
        )

    def close_calls(self, turn_id: str, running: str, pending: str) -> None:
        self._count(
            "UPDATE calls SET state = 'error', finished_at = ?, "
            "result = CASE state WHEN 'running' THEN ? ELSE ? END "
            "WHERE turn_id = ? AND (state = 'pending' OR state = 'running')",
            (self.now(), running, pending, turn_id),
        )

    def claim_call(self, turn_id: str, call_id: str) -> bool:
        return self._changed(
            "UPDATE calls SET state = 'running' "
            "WHERE turn_id = ? AND call_id = ? AND state = 'pending'",
            (turn_id, call_id),
        )

    def set_call(
        self, turn_id: str, call_id: str, state: str, result: str | None, was: str
    ) -> bool:
        return self._changed(
            "UPDATE calls SET state = ?, result = ?, finished_at = ? "
            "WHERE turn_id = ? AND call_id = ? AND state = ?",
            (state, result, self.now(), turn_id, call_id, was),
        )

    # approvals and the events log

    def insert_approval(
        self,
        approval_id: str,
        turn: TurnRow,
        call_id: str,
        tool: str,
        args: str,
        reason: str | None,
        expires_at: float,
    ) -> Approval:
        values = (approval_id, turn.id, turn.thread_id, call_id, tool, args, reason, turn.actor)
        return self._fetch_one(
            Approval,
            "INSERT INTO approvals (id, turn_id, thread_id, call_id, tool, args, reason, "
            "requester, state, created_at, expires_at) VALUES "
            f"(?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?) RETURNING {columns(Approval)}",
            (*values, self.now(), expires_at),
        )

    def approval(self, approval_id: str) -> Approval | None:
        sql = f"SELECT {columns(Approval)} FROM approvals WHERE id = ?"
        return self._fetch_one(Approval, sql, (approval_id,))

    def approvals(
        self,
        *,
        turn_id: str | None = None,
        thread: str | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> list[Approval]:
        given = {"turn_id": turn_id, "thread_id": thread, "state": state}
        tests = [f"{name} = ?" for name, value in given.items() if value is not None]
        where = f"WHERE {' AND '.join(tests)} " if tests else ""
        params = [value for value in given.values() if value is not None]
        if limit is not None:
            where, params = f"{where}ORDER BY created_at DESC LIMIT ?", [*params, limit]
        else:
            where = f"{where}ORDER BY created_at DESC"
        return self._fetch_all(
            Approval, f"SELECT {columns(Approval)} FROM approvals {where}", params
        )

    def expired_approvals(self, at: float) -> list[Approval]:
        return self._fetch_all(
            Approval,
            f"SELECT {columns(Approval)} FROM approvals "
            "WHERE state = 'pending' AND expires_at <= ?",
            (at,),
        )

    def settle_approval(
        self, approval_id: str, state: str, actor: str | None, reason: str | None
    ) -> bool:
        return self._changed(
            "UPDATE approvals SET state = ?, decided_by = ?, decision_reason = ?, decided_at = ? "
            "WHERE id = ? AND state = 'pending'",
            (state, actor, reason, self.now(), approval_id),
        )

    def add_event(
        self, kind: str, actor: str | None, thread: str, turn_id: str | None, data: str
    ) -> None:
        self._count(
            "INSERT INTO events (kind, actor, thread_id, turn_id, data, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (kind, actor, thread, turn_id, data, self.now()),
        )

    # the outbox

    def add_delivery(
        self,
        adapter: str,
        thread: str,
        turn_id: str | None,
        kind: str,
        body: dict[str, Any],
        sent: bool,
    ) -> int:
        at = self.now()
        state, sent_at = ("sent", at) if sent else ("pending", None)
        return self._rows(
            "INSERT INTO deliveries (adapter, thread_id, turn_id, kind, body, state, created_at, "
            "sent_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (adapter, thread, turn_id, kind, dumps(body), state, at, sent_at),
        )[0][0]

    def delivery(self, rowid: int) -> Delivery | None:
        sql = f"SELECT {columns(Delivery)} FROM deliveries WHERE id = ?"
        return self._fetch_one(Delivery, sql, (rowid,))

    def deliveries(self, thread: str, after: int, limit: int) -> list[Delivery]:
        return self._fetch_all(
            Delivery,
            f"SELECT {columns(Delivery)} FROM deliveries WHERE thread_id = ? AND id > ? "
            "ORDER BY id LIMIT ?",
            (thread, after, limit),
        )

    def approval_requests(self, turn_id: str, approval_id: str) -> list[Delivery]:
        asked = self._fetch_all(
            Delivery,
            f"SELECT {columns(Delivery)} FROM deliveries WHERE turn_id = ? "
            "AND kind = 'approval' ORDER BY id",
            (turn_id,),
        )
        return [d for d in asked if (d.body.get("approval") or {}).get("id") == approval_id]

    def update_delivery(
        self, rowid: int, state: str | None, error: str | None, **body: Any
    ) -> bool:
        with self._atomic():
            found = self.delivery(rowid)
            if found is None or found.state != "pending":
                return False
            sent_at = None if state is None else self.now()
            kept = {key: value for key, value in body.items() if value is not None}
            return self._changed(
                "UPDATE deliveries SET state = COALESCE(?, state), "
                "sent_at = COALESCE(?, sent_at), error = COALESCE(?, error), body = ? "
                "WHERE id = ? AND state = 'pending'",
                (state, sent_at, error, dumps({**found.body, **kept}), rowid),
            )

    # adapters' cursors

    def cursor(self, adapter: str) -> str | None:
        rows = self._rows("SELECT cursor FROM cursors WHERE adapter = ?", (adapter,))
        return rows[0][0] if rows else None

    def set_cursor(self, adapter: str, cursor: str | None) -> None:
        self._count(
            "INSERT INTO cursors (adapter, cursor, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (adapter) DO UPDATE SET cursor = excluded.cursor, "
            "updated_at = excluded.updated_at",
            (adapter, cursor, self.now()),
        )

    # MCP servers' tool lists

    def mcp_tool_list(self, server: str) -> McpToolList | None:
        found = self._fetch_all(
            McpToolList, f"SELECT {columns(McpToolList)} FROM mcp_tools WHERE server = ?", (server,)
        )
        return found[0] if found else None

    def mcp_tool_lists(self) -> list[McpToolList]:
        return self._fetch_all(
            McpToolList, f"SELECT {columns(McpToolList)} FROM mcp_tools ORDER BY server"
        )

    def set_mcp_tool_list(self, server: str, tools: list[dict[str, Any]]) -> None:
        self._count(
            "INSERT INTO mcp_tools (server, tools, listed_at) VALUES (?, ?, ?) "
            "ON CONFLICT (server) DO UPDATE SET tools = excluded.tools, "
            "listed_at = excluded.listed_at",
            (server, dumps(tools), self.now()),
        )

    # secret requests

    def insert_secret_request(
        self, request: SecretRequest, public_key: str, sealed_key: bytes
    ) -> None:
        fields = dumps([[name, label] for name, label in request.fields])
        self._count(
            "INSERT INTO secret_requests (id, thread_id, actor, turn_id, reason, fields, url, "
            "state, created_at, expires_at, public_key, private_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
            (
                *(request.id, request.thread_id, request.actor, request.turn_id, request.reason),
                *(fields, request.url, request.created_at, request.expires_at),
                *(public_key, sealed_key),
            ),
        )

    def secret_request(self, request_id: str) -> tuple[SecretRequest, bytes | None] | None:
        rows = self._rows(
            f"SELECT {columns(SecretRequest)}, private_key FROM secret_requests WHERE id = ?",
            (request_id,),
        )
        return (from_row(SecretRequest, rows[0][:-1]), rows[0][-1]) if rows else None

    def use_secret_request(self, request_id: str) -> bool:
        return self._changed(
            "UPDATE secret_requests SET state = 'used', private_key = NULL, used_at = ? "
            "WHERE id = ? AND state = 'pending'",
            (self.now(), request_id),
        )

    def expire_secret_requests(self, at: float) -> int:
        due = "FROM secret_requests WHERE state = 'pending' AND expires_at <= ?"
        if not self._rows(f"SELECT 1 {due} LIMIT 1", (at,)):  # no write lock when none
            return 0
        return self._count(
            "UPDATE secret_requests SET state = 'expired', private_key = NULL "
            "WHERE state = 'pending' AND expires_at <= ?",
            (at,),
        )

    def pending_secret_requests(self, turn_id: str) -> list[SecretRequest]:
        return self._fetch_all(
            SecretRequest,
            f"SELECT {columns(SecretRequest)} FROM secret_requests "
            "WHERE turn_id = ? AND state = 'pending' ORDER BY created_at",
            (turn_id,),
        )

    # compactions

    def add_compaction(
        self,
        thread: str,
        summary: str,
        first_kept: int,
        last_message: int,
        tokens_before: int,
        made_by: str,
        after: int | None,
    ) -> Compaction | None:
        with self._atomic():
            latest = self.last_compaction(thread)
            if (latest.id if latest else None) != after:
                return None
            return self._fetch_one(
                Compaction,
                "INSERT INTO compactions (thread_id, summary, first_kept, last_message, "
                "tokens_before, made_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                f"RETURNING {columns(Compaction)}",
                (thread, summary, first_kept, last_message, tokens_before, made_by, self.now()),
            )

    def last_compaction(self, thread: str) -> Compaction | None:
        return self._fetch_one(
            Compaction,
            f"SELECT {columns(Compaction)} FROM compactions WHERE thread_id = ? "
            "ORDER BY id DESC LIMIT 1",
            (thread,),
        )

    def compactions(self, thread: str) -> list[Compaction]:
        return self._fetch_all(
            Compaction,
            f"SELECT {columns(Compaction)} FROM compactions WHERE thread_id = ? ORDER BY id",
            (thread,),
        )

    # extension entries and queued mid-turn messages

    def set_turn_instructions(self, turn_id: str, instructions: str | None) -> None:
        self._count("UPDATE turns SET instructions = ? WHERE id = ?", (instructions, turn_id))

    def add_entries(
        self, thread: str, turn_id: str | None, entries: Sequence[tuple[str, str]]
    ) -> None:
        if entries:
            at = self.now()
            self._rows_many(
                "INSERT INTO entries (thread_id, turn_id, kind, data, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(thread, turn_id, kind, data, at) for kind, data in entries],
            )

    def entries(self, thread: str, kind: str | None, limit: int) -> list[Entry]:
        where = "" if kind is None else " AND kind = ?"
        found = self._fetch_all(
            Entry,
            f"SELECT {columns(Entry)} FROM entries WHERE thread_id = ?{where} "
            "ORDER BY id DESC LIMIT ?",
            (thread, limit) if kind is None else (thread, kind, limit),
        )
        return found[::-1]

    def add_queued(
        self, thread: str, actor: str, text: str, deliver: str, source_id: str | None
    ) -> int:
        return self._rows(
            "INSERT INTO queued_messages (thread_id, actor, text, deliver, source_id, state, "
            "created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?) RETURNING id",
            (thread, actor, text, deliver, source_id, self.now()),
        )[0][0]

    def queued_from(self, thread: str, source_id: str) -> QueuedMessage | None:
        return self._fetch_one(
            QueuedMessage,
            f"SELECT {columns(QueuedMessage)} FROM queued_messages "
            "WHERE thread_id = ? AND source_id = ?",
            (thread, source_id),
        )

    def has_queued(self, thread: str, delivers: Sequence[str]) -> bool:
        return bool(
            self._rows(
                "SELECT 1 FROM queued_messages WHERE thread_id = ? AND state = 'queued' "
                f"AND deliver {self.IN_LIST} LIMIT 1",
                (thread, self._list(delivers)),
            )
        )

    def take_queued(
        self, thread: str, delivers: Sequence[str], turn_id: str | None
    ) -> list[QueuedMessage]:
        taken = self._fetch_all(
            QueuedMessage,
            "UPDATE queued_messages SET state = 'delivered', turn_id = ?, delivered_at = ? "
            f"WHERE thread_id = ? AND state = 'queued' AND deliver {self.IN_LIST} "
            f"RETURNING {columns(QueuedMessage)}",
            (turn_id, self.now(), thread, self._list(delivers)),
        )
        return sorted(taken, key=lambda message: message.id)

    # saved secrets

    def save_secrets(self, thread_id: str, sealed: dict[str, bytes]) -> None:
        at = self.now()
        self._rows_many(
            "INSERT INTO secrets (thread_id, name, sealed, saved_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (thread_id, name) DO UPDATE SET sealed = excluded.sealed, "
            "saved_at = excluded.saved_at",
            [(thread_id, name, value, at) for name, value in sealed.items()],
        )

    def sealed_secrets(self, thread_id: str) -> dict[str, bytes]:
        rows = self._rows(
            "SELECT name, sealed FROM secrets WHERE thread_id = ? ORDER BY name", (thread_id,)
        )
        return {name: bytes(value) for name, value in rows}

    # retention

    # attachments

    def put_blob(self, blob: Blob) -> None:
        self._count(
            "INSERT INTO blobs (sha256, size, data, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sha256) DO NOTHING",
            (blob.sha256, blob.size, blob.data, self.now()),
        )

    def blob(self, sha256: str) -> Blob | None:
        rows = self._rows("SELECT sha256, size, data FROM blobs WHERE sha256 = ?", (sha256,))
        if not rows:
            return None
        digest, size, data = rows[0]
        return Blob(digest, size, None if data is None else bytes(data))

    def add_attachment(self, row: FileRow) -> None:
        self._count(
            f"INSERT INTO attachments ({columns(FileRow)}, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*dataclasses.astuple(row), self.now()),
        )

    def attachment(self, attachment_id: str, scope: str) -> FileRow | None:
        return self._fetch_one(
            FileRow,
            f"SELECT {columns(FileRow)} FROM attachments WHERE id = ? AND scope = ?",
            (attachment_id, scope),
        )

    def claim_uploads(self, ids: Sequence[str], scope: str, turn_id: str) -> int:
        if not ids:
            return 0
        return self._count(
            f"UPDATE attachments SET turn_id = ? WHERE id {self.IN_LIST} AND scope = ? "
            "AND turn_id IS NULL AND origin = 'user'",
            (turn_id, self._list(ids), scope),
        )

    def link_attachments(self, turn_id: str, message_id: int) -> None:
        self._count(
            "UPDATE attachments SET message_id = ? WHERE turn_id = ? AND origin = 'user' "
            "AND message_id IS NULL",
            (message_id, turn_id),
        )

    def attachments_of(self, message_ids: Sequence[int]) -> list[FileRow]:
        if not message_ids:
            return []
        return self._fetch_all(
            FileRow,
            f"SELECT {columns(FileRow)} FROM attachments WHERE message_id {self.IN_LIST} "
            "ORDER BY created_at, id",
            (self._list(message_ids),),
        )

    def turn_attachments(self, turn_id: str) -> list[FileRow]:
        return self._fetch_all(
            FileRow,
            f"SELECT {columns(FileRow)} FROM attachments WHERE turn_id = ? ORDER BY created_at, id",
            (turn_id,),
        )

    def prune_files(self, before: float) -> tuple[int, list[Blob]]:
        uploads = self._count(
            "DELETE FROM attachments WHERE turn_id IS NULL AND created_at < ?", (before,)
        )
        rows = self._rows(
            "DELETE FROM blobs WHERE NOT EXISTS "
            "(SELECT 1 FROM attachments WHERE attachments.sha256 = blobs.sha256) "
            "RETURNING sha256, size, data IS NULL"
        )
        return uploads, [Blob(d, size, None if outside else b"") for d, size, outside in rows]

    def postpone_turn(self, turn_id: str, text: str, run_at: float) -> bool:
        if not self._changed(
            "UPDATE turns SET text = ? WHERE id = ? AND status = 'queued'", (text, turn_id)
        ):
            return False
        self._count(
            "UPDATE jobs SET run_at = ? WHERE state = 'queued' AND id = "
            "(SELECT job_id FROM turns WHERE id = ?)",
            (run_at, turn_id),
        )
        return True

    def prune(self, before: float) -> dict[str, int]:
        deleted = {}
        with self._atomic():
            for table, sql in (
                ("jobs", "state IN ('done', 'failed', 'dead', 'cancelled') AND finished_at < ?"),
                ("events", "created_at < ?"),
                ("deliveries", "state = 'sent' AND sent_at < ?"),
                ("secret_requests", "state != 'pending' AND created_at < ?"),
                ("queued_messages", "state = 'delivered' AND delivered_at < ?"),
            ):
                deleted[table] = self._count(f"DELETE FROM {table} WHERE {sql}", (before,))
        return deleted


# ─────────────────────────────────────── SQLite engine ───────────────────────────────────────
# SQLite through apsw: the schema and its migrations, a connection per thread with its
# PRAGMAs read back, transactions and savepoints, busy retries, data_version wake-ups.

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
        state TEXT NOT NULL CHECK (state = 'queued' OR state = 'running' OR state = 'done'
            OR state = 'failed' OR state = 'dead' OR state = 'cancelled'),  -- faster than IN
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
    # 2: conversations: threads, turns (the inbox), messages and tool calls
    """
    CREATE TABLE threads (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE turns (
        id TEXT PRIMARY KEY,
        thread_id TEXT NOT NULL REFERENCES threads (id),
        actor TEXT NOT NULL,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        source_id TEXT,
        status TEXT NOT NULL CHECK (status IN
            ('queued', 'running', 'waiting_approval', 'done', 'failed', 'cancelled')),
        job_id INTEGER,
        steps INTEGER NOT NULL DEFAULT 0,
        reply TEXT,
        error TEXT,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE UNIQUE INDEX turns_source ON turns (source, source_id) WHERE source_id IS NOT NULL;
    CREATE INDEX turns_thread ON turns (thread_id, status);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        thread_id TEXT NOT NULL REFERENCES threads (id),
        turn_id TEXT NOT NULL REFERENCES turns (id),
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT,
        command INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_thread ON messages (thread_id, command, id);
    CREATE TABLE calls (
        turn_id TEXT NOT NULL REFERENCES turns (id),
        call_id TEXT NOT NULL,
        message_id INTEGER NOT NULL REFERENCES messages (id),
        position INTEGER NOT NULL,
        tool TEXT NOT NULL,
        args TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('waiting', 'pending', 'running', 'done', 'error')),
        result TEXT,
        finished_at REAL,
        PRIMARY KEY (turn_id, call_id)
    );
    CREATE INDEX calls_message ON calls (message_id, position);
    """,
    # 3: approvals of tool calls, and the events log of requests and decisions
    """
    CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        turn_id TEXT NOT NULL REFERENCES turns (id),
        call_id TEXT NOT NULL,
        thread_id TEXT NOT NULL REFERENCES threads (id),
        tool TEXT NOT NULL,
        args TEXT NOT NULL,
        reason TEXT,
        requester TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pending', 'approved', 'denied', 'expired', 'cancelled')),
        decided_by TEXT,
        decision_reason TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        decided_at REAL
    );
    CREATE INDEX approvals_pending ON approvals (expires_at) WHERE state = 'pending';
    CREATE INDEX approvals_turn ON approvals (turn_id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        actor TEXT,
        thread_id TEXT,
        turn_id TEXT,
        data TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX events_created ON events (created_at);
    """,
    # 4: adapters' details of turns, the outbox, polling cursors and secret requests
    """
    ALTER TABLE turns ADD COLUMN meta TEXT;
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        adapter TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        turn_id TEXT,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
        created_at REAL NOT NULL,
        sent_at REAL,
        error TEXT
    );
    CREATE INDEX deliveries_thread ON deliveries (thread_id, id);
    CREATE TABLE cursors (
        adapter TEXT PRIMARY KEY,
        cursor TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE secret_requests (
        id TEXT PRIMARY KEY,
        thread_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        turn_id TEXT,
        reason TEXT NOT NULL,
        fields TEXT NOT NULL,
        public_key TEXT NOT NULL,
        private_key BLOB,
        url TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'used', 'expired')),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL
    );
    CREATE INDEX secret_requests_pending ON secret_requests (expires_at) WHERE state = 'pending';
    CREATE INDEX secret_requests_turn ON secret_requests (turn_id);
    """,
    # 5: finding the requests of an approval, to show its decision where it was asked
    """
    CREATE INDEX deliveries_approval ON deliveries (turn_id) WHERE kind = 'approval';
    """,
    # 6: claims that read only what they can take: the ready index per task name, without
    # the jobs blocked behind a running job of their target (see the Queue section)
    """
    ALTER TABLE jobs ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
    DROP INDEX jobs_ready;
    CREATE INDEX jobs_ready ON jobs (name, priority DESC, run_at, id, target)
        WHERE state = 'queued' AND blocked = 0;
    CREATE INDEX jobs_blocked ON jobs (target) WHERE blocked = 1;
    DROP INDEX jobs_running;  -- one index less to write per job: the lease sweep and the
                              -- heartbeat scan jobs_running_target, which holds every
                              -- running job (a few per worker)
    """,
    # 7: attachments: stored files in their scope (a thread) and their content by SHA-256,
    # in the row or (SQLite, larger files) in a file beside the database
    """
    CREATE TABLE blobs (
        sha256 TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        data BLOB,
        created_at REAL NOT NULL
    );
    CREATE TABLE attachments (
        id TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        turn_id TEXT REFERENCES turns (id),
        message_id INTEGER REFERENCES messages (id),
        call_id TEXT,
        origin TEXT NOT NULL CHECK (origin IN ('user', 'tool', 'result')),
        name TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX attachments_turn ON attachments (turn_id);
    CREATE INDEX attachments_message ON attachments (message_id);
    CREATE INDEX attachments_sha256 ON attachments (sha256);
    """,
    # 8: compaction: summaries of older messages (never deleting them), and the tokens a
    # provider reported for each step, which the context's estimate starts from
    """
    ALTER TABLE messages ADD COLUMN tokens INTEGER;
    CREATE TABLE compactions (
        id INTEGER PRIMARY KEY,
        thread_id TEXT NOT NULL REFERENCES threads (id),
        summary TEXT NOT NULL,
        first_kept INTEGER NOT NULL REFERENCES messages (id),
        last_message INTEGER NOT NULL REFERENCES messages (id),
        tokens_before INTEGER NOT NULL,
        made_by TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX compactions_thread ON compactions (thread_id, id);
    """,
    # 9: extensions: their entries in threads, the instructions they add to a turn, the
    # messages they add, and messages queued into a running turn (steer, follow-up)
    """
    CREATE TABLE entries (
        id INTEGER PRIMARY KEY,
        thread_id TEXT NOT NULL,
        turn_id TEXT,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX entries_thread ON entries (thread_id, kind, id);
    ALTER TABLE turns ADD COLUMN instructions TEXT;
    ALTER TABLE messages ADD COLUMN origin TEXT;
    CREATE TABLE queued_messages (
        id INTEGER PRIMARY KEY,
        thread_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        text TEXT NOT NULL,
        deliver TEXT NOT NULL CHECK (deliver IN ('steer', 'follow_up')),
        source_id TEXT,
        state TEXT NOT NULL CHECK (state IN ('queued', 'delivered')),
        turn_id TEXT,
        created_at REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX queued_messages_waiting ON queued_messages (thread_id, id)
        WHERE state = 'queued';
    CREATE UNIQUE INDEX queued_messages_source ON queued_messages (thread_id, source_id)
        WHERE source_id IS NOT NULL;
    """,
    # 10: the tool lists of MCP servers, so a process that has not connected yet offers them
    """
    CREATE TABLE mcp_tools (
        server TEXT PRIMARY KEY,
        tools TEXT NOT NULL,
        listed_at REAL NOT NULL
    );
    """,
    # 11: saved secret values, sealed under the kit key, so that every host reads them
    """
    CREATE TABLE secrets (
        thread_id TEXT NOT NULL,
        name TEXT NOT NULL,
        sealed BLOB NOT NULL,
        saved_at REAL NOT NULL,
        PRIMARY KEY (thread_id, name)
    );
    """,
)

SYNCHRONOUS = {"normal": 1, "full": 2}
_JOINED = contextlib.nullcontext()  # an operation inside a transaction runs in it as it is


class SQLiteStore(_SQLStore):
    """One SQLite database shared by this process's threads (a connection each).

    Every connection runs in WAL mode (except `":memory:"`, which is one process's
    shared in-memory database), with foreign keys on and a busy timeout. Opening a file
    applies pending migrations, each in its own transaction; a file that is not SQLite,
    or that a newer agentkit wrote, is refused and left untouched. Idle waiters notice
    other processes' commits through `PRAGMA data_version`.
    """

    latest = len(MIGRATIONS)

    def __init__(
        self, path: str, *, synchronous: str = "normal", busy_timeout: float = 10.0
    ) -> None:
        super().__init__()
        if synchronous not in SYNCHRONOUS:
            raise BadInput(f"synchronous must be one of {sorted(SYNCHRONOUS)}")
        self.path = os.fspath(path)
        self.memory = self.path == ":memory:"
        self.synchronous = synchronous
        self.busy_timeout = check_seconds("busy_timeout", busy_timeout, positive=True)
        self._uri = f"file:/agentkit-{os.getpid()}-{id(self)}?vfs=memdb" if self.memory else ""
        self._keepalive = self.connection()  # opens, checks and migrates
        self.version = self._migrate()

    def now(self) -> float:
        return now()  # the module's clock, looked up at each call (tests replace it)

    # connections

    def _open(self) -> apsw.Connection:
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        try:
            if self.memory:
                conn = apsw.Connection(self._uri, flags=flags | apsw.SQLITE_OPEN_URI)
            else:
                conn = apsw.Connection(self.path, flags=flags)
        except apsw.CantOpenError as e:
            raise StoreError(f"cannot open {self.path}: {e}") from None
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
        # Plans that do not depend on bound values: without this, SQLite (built with STAT4)
        # prepares some statements again at every bind (the queue's claim, 4-5x its cost).
        conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, 1)
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

    # transactions

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[None]:
        """`BEGIN IMMEDIATE`, committed on success, rolled back on error (see `Store`).

        A busy database is retried with backoff for `busy_timeout` seconds, then raises
        StoreError. A nested `transaction()` in the same thread is a savepoint.
        `durable=True` commits with `synchronous=FULL`.
        """
        conn = self.connection()
        depth = self._local.depth
        if depth and durable:
            raise BadInput("durable=True applies to an outermost transaction only")
        if depth:
            with self._savepoint(conn):
                yield
            return
        if durable:
            conn.execute("PRAGMA synchronous=FULL")
        cursor = self._cursor()
        try:
            self._retry_busy(lambda: cursor.execute("BEGIN IMMEDIATE"))
            self._local.depth = 1
            try:
                yield
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            try:
                cursor.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(apsw.Error):
                    cursor.execute("ROLLBACK")  # a failed COMMIT may leave it open
                raise
        finally:
            self._local.depth = 0
            if durable:
                conn.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.synchronous]}")

    def _retry_busy(self, attempt: Callable[[], Any]) -> Any:
        """Call `attempt` until the database is not busy (it did nothing when busy), with
        backoff, for up to `busy_timeout` seconds; then StoreError."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.001
        while True:
            try:
                return attempt()
            except apsw.BusyError:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"{self.path} stayed busy for {self.busy_timeout:g} s"
                    ) from None
                time.sleep(pause * random.uniform(0.5, 1.5))
                pause = min(pause * 2, 0.1)

    # statements

    def _cursor(self) -> apsw.Cursor:
        """This thread's cursor, which its statements share (`Connection.execute` would make
        a cursor object per statement, several per job)."""
        conn = self.connection()
        cursor = getattr(self._local, "cursor", None)
        if cursor is None or cursor.connection is not conn:
            cursor = self._local.cursor = conn.cursor()
        return cursor

    def _atomic(self) -> contextlib.AbstractContextManager[None]:
        return _JOINED if getattr(self._local, "depth", 0) else self.transaction()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cursor = self._cursor()
        try:
            return cursor.execute(sql, params).fetchall()
        except apsw.BusyError:  # on its own, a busy statement did nothing: try again
            if self._local.depth:
                raise
            return self._retry_busy(lambda: cursor.execute(sql, params).fetchall())

    def _rows_many(self, sql: str, params: Sequence[Sequence[Any]]) -> list[tuple]:
        cursor = self._cursor()
        with self._atomic():
            return cursor.executemany(sql, params).fetchall()

    def _insert_many(self, sql: str, params: Sequence[Sequence[Any]]) -> list[int]:
        conn = self.connection()
        with self._atomic():
            conn.executemany(sql, params)
            last = conn.last_insert_rowid()  # the rows got consecutive ids under the write lock
        return list(range(last - len(params) + 1, last + 1))

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._rows(sql, params)
        return self._local.conn.changes()

    def _described(self, sql: str) -> tuple[list[str], list[tuple]]:
        cursor = self.connection().execute(sql)
        try:
            names = [name for name, _ in cursor.getdescription()]
        except apsw.ExecutionCompleteError:  # no rows: apsw has nothing to describe
            return [], []
        return names, cursor.fetchall()

    # the engine's own

    def wait_for_change(self, timeout: float) -> None:
        conn = self.connection()
        version = self._pragma(conn, "data_version")  # cheap: no I/O
        self._wait(timeout, lambda: self._pragma(conn, "data_version") != version, 0.02)

    def tables(self) -> list[str]:
        rows = self._rows("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        return [name for (name,) in rows if not name.startswith("sqlite_")]

    def integrity(self) -> str:
        return "; ".join(row[0] for row in self._rows("PRAGMA integrity_check"))

    def backup(self, path: str | os.PathLike[str]) -> None:
        """Write a consistent copy of the live database to a new file at `path`."""
        self._rows("VACUUM INTO ?", (os.fspath(path),))


STORE_ENGINES[""] = SQLiteStore

# ───────────────────────────────────── PostgreSQL engine ─────────────────────────────────────
# The same operations on PostgreSQL through psycopg 3, imported only when a postgresql://
# URL is opened: the database's clock, SKIP LOCKED claims, LISTEN/NOTIFY wake-ups.


def _pg_ddl(sql: str) -> str:
    """A SQLite migration as PostgreSQL DDL: an INTEGER PRIMARY KEY is an identity column,
    INTEGER is BIGINT, REAL double precision (PostgreSQL's REAL has 24 bits) and BLOB bytea."""
    sql = sql.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    for sqlite, postgres in (
        ("INTEGER", "BIGINT"),
        ("REAL", "DOUBLE PRECISION"),
        ("BLOB", "BYTEA"),
    ):
        sql = re.sub(rf"\b{sqlite}\b", postgres, sql)
    return sql


# What PostgreSQL adds to a migration: the database itself refuses a second running job of
# a target (on SQLite one writer at a time makes the claim's check enough).
_PG_AFTER = {
    1: "DROP INDEX jobs_running_target; "
    "CREATE UNIQUE INDEX jobs_running_target ON jobs (target) WHERE state = 'running';"
}


@functools.cache
def _pg_sql(sql: str) -> str:
    """A statement with `?` placeholders in psycopg's `%s` style."""
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_driver() -> types.ModuleType:
    """psycopg, or a StoreError that names the extra to install."""
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "a postgresql:// database needs psycopg 3.2 or newer: "
            "pip install 'agentkit-db[postgres]' (or: pip install 'psycopg[binary]')"
        ) from None
    return psycopg


class PostgresStore(_SQLStore):
    """A PostgreSQL database shared by several processes and hosts (a connection per thread).

    Transactions serialise with each other like SQLite's (a transaction-scoped advisory
    lock), while single statements (claims, results, leases) run side by side: claims take
    rows `FOR UPDATE SKIP LOCKED`, and a unique index refuses a second running job of a
    target. Times come from the database's clock (the offset to it is measured on open), so
    hosts whose clocks differ agree on leases. Idle waiters wake on `NOTIFY`, and poll as a
    fallback. Migrations run once, under an advisory lock, however many processes start.
    `listen_url` is a direct connection for `LISTEN` when `url` goes through PgBouncer in
    transaction mode (which also rules out server-side prepared statements: none are used).
    """

    latest = len(MIGRATIONS)
    IN_LIST = "= ANY(?)"
    NAMES_TABLE = "unnest(CAST(? AS TEXT[])) AS names (value)"
    READY_LOCK = " FOR UPDATE SKIP LOCKED"
    RUNNING_LOCK = " FOR SHARE SKIP LOCKED"

    @staticmethod
    def _unlocked_jobs(where: str) -> str:
        return f"id IN (SELECT id FROM jobs WHERE {where} FOR UPDATE SKIP LOCKED)"

    def __init__(
        self, url: str, *, listen_url: str | None = None, synchronous: str = "normal"
    ) -> None:
        super().__init__()
        if synchronous not in SYNCHRONOUS:  # either way: every commit waits for the WAL
            raise BadInput(f"synchronous must be one of {sorted(SYNCHRONOUS)}")
        self._driver = _pg_driver()
        self._url = url
        self._listen_url = listen_url or os.environ.get("AGENTKIT_LISTEN_URL") or url
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username
        self.path = urllib.parse.urlunsplit(
            (parts.scheme, f"{user}@{netloc}" if user else netloc, parts.path, "", "")
        )
        self._offset = 0.0
        self._signals = 0  # NOTIFYs heard by the listener thread
        self._listener: threading.Thread | None = None
        conn = self.connection()
        self.schema = conn.execute("SELECT current_schema()").fetchone()[0]
        self._channel = f"agentkit_{hashlib.sha256(self.schema.encode()).hexdigest()[:16]}"
        self._measure_clock(conn)
        self.version = self._migrate()

    @staticmethod
    def _list(values: Sequence[Any]) -> Any:
        return list(values)

    # connections

    def _open(self) -> Any:
        return self._connect(self._url)  # autocommit: transactions are explicit

    def _usable(self, conn: Any) -> bool:
        return not conn.closed

    def _connect(self, url: str) -> Any:
        try:
            return self._driver.connect(
                url,
                autocommit=True,
                prepare_threshold=None,  # no server-side prepared statements (PgBouncer)
                connect_timeout=10,
                keepalives=1,  # an idle connection to a host gone is dropped in 11 s,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=10_000,  # and a busy one in 10 s (not 15 minutes)
            )
        except self._driver.Error as e:
            raise StoreError(f"cannot connect to {self.path}: {e}") from None

    def _measure_clock(self, conn: Any) -> None:
        """The offset from this host's clock to the database's, to within half a round trip:
        none when the database's clock read a time between this host's two readings (the
        clocks agree as far as can be measured, as on one host)."""
        before = now()
        (db_time,) = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
        after = now()
        self._offset = (
            0.0 if before <= float(db_time) <= after else float(db_time) - (before + after) / 2
        )

    def now(self) -> float:
        return now() + self._offset

    def _migrate(self) -> int:
        """Apply the migrations this database lacks under an advisory lock; its version."""
        conn = self.connection()
        with self._statement():
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._channel,))
                conn.execute("CREATE TABLE IF NOT EXISTS agentkit_schema (version BIGINT NOT NULL)")
                row = conn.execute("SELECT version FROM agentkit_schema").fetchone()
                version = row[0] if row else 0
                if version > len(MIGRATIONS):
                    raise StoreError(
                        f"{self.path} was written by a newer agentkit (schema {version}; this "
                        f"one knows up to {len(MIGRATIONS)}); it was left untouched"
                    )
                for target in range(version + 1, len(MIGRATIONS) + 1):
                    conn.execute(_pg_ddl(MIGRATIONS[target - 1]) + _PG_AFTER.get(target, ""))
                if row is None:
                    conn.execute("INSERT INTO agentkit_schema VALUES (%s)", (len(MIGRATIONS),))
                else:
                    conn.execute("UPDATE agentkit_schema SET version = %s", (len(MIGRATIONS),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return max(version, len(MIGRATIONS))

    def close(self) -> None:
        super().close()
        if self._listener is not None:
            self._listener.join(timeout=5)

    # transactions and statements

    @contextlib.contextmanager
    def _statement(self) -> Iterator[None]:
        """Driver calls, a lost connection raised as StoreError (the next call reconnects)."""
        try:
            yield
        except self._driver.OperationalError as e:
            if not self._local.depth:
                self.release_thread()
            raise StoreError(f"{self.path}: {e}") from None

    def transaction(self, *, durable: bool = False) -> contextlib.AbstractContextManager[None]:
        """`BEGIN` and a transaction-scoped advisory lock, so transactions serialise as on
        SQLite; committed on success, rolled back on error; nested, a savepoint. Every
        commit is durable (`synchronous_commit` as the server sets it: `on` by default), so
        `durable` adds nothing here."""
        if durable and self._local.depth:
            raise BadInput("durable=True applies to an outermost transaction only")
        return self._transaction(serial=True)

    def _atomic(self) -> contextlib.AbstractContextManager[None]:
        # One operation's statements need no lock of all writers: each is fenced or
        # conditional on its own, and claims skip the rows that others hold.
        return _JOINED if self._local.depth else self._transaction(serial=False)

    def fenced(self) -> contextlib.AbstractContextManager[None]:
        return self._transaction(serial=False)  # without the advisory lock, as `_atomic`

    @contextlib.contextmanager
    def _transaction(self, *, serial: bool) -> Iterator[None]:
        conn = self.connection()
        depth = self._local.depth
        with self._statement():
            if depth:
                with self._savepoint(conn):
                    yield
                return
            conn.execute("BEGIN")
            self._local.depth = 1
            try:
                if serial:
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._channel,))
                yield
            except BaseException:
                self._local.depth = 0
                if not conn.closed:
                    conn.execute("ROLLBACK")
                raise
            self._local.depth = 0
            conn.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._statement():
            cursor = self.connection().execute(_pg_sql(sql), params)
            return cursor.fetchall() if cursor.description else []

    def _rows_many(self, sql: str, params: Sequence[Sequence[Any]]) -> list[tuple]:
        with self._atomic(), self._statement():
            cursor = self.connection().cursor()
            cursor.executemany(_pg_sql(sql), params, returning=True)
            rows: list[tuple] = []
            while True:
                if cursor.description:
                    rows += cursor.fetchall()
                if not cursor.nextset():
                    return rows

    def _insert_many(self, sql: str, params: Sequence[Sequence[Any]]) -> list[int]:
        return [rowid for (rowid,) in self._rows_many(f"{sql} RETURNING id", params)]

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._statement():
            return self.connection().execute(_pg_sql(sql), params).rowcount

    def _described(self, sql: str) -> tuple[list[str], list[tuple]]:
        with self._statement():
            cursor = self.connection().execute(_pg_sql(sql))
            return [c.name for c in cursor.description], cursor.fetchall()

    # the engine's own

    def notify(self) -> None:
        super().notify()
        self._rows("SELECT pg_notify(?, '')", (self._channel,))

    def wait_for_change(self, timeout: float) -> None:
        self._listen()
        heard = self._signals
        self._wait(timeout, lambda: self._signals != heard, 0.25)

    def _listen(self) -> None:
        """Start this store's listener thread, once."""
        with self._guard:
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._hear, name="agentkit-listen", daemon=True
                )
                self._listener.start()

    def _hear(self) -> None:
        """Count the NOTIFYs on this store's channel and wake the waiters, until closed."""
        pause = 0.1
        while not self.closed:
            try:
                with self._connect(self._listen_url) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    pause = 0.1
                    while not self.closed:
                        for _ in conn.notifies(timeout=1.0):
                            self._signals += 1
                            with self._wakeup:
                                self._wakeup.notify_all()
            except (StoreError, self._driver.Error) as e:
                log.debug("listener: %s; polling until it reconnects", e)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def tables(self) -> list[str]:
        return self._column(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename <> 'agentkit_schema' ORDER BY tablename"
        )

    def integrity(self) -> str:
        return "ok" if self._rows("SELECT 1") == [(1,)] else "the server did not answer"

    def load_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        super().load_rows(table, rows)
        if rows and "id" in rows[0] and isinstance(rows[0]["id"], int):
            # the identity column goes on after the ids copied in
            self._rows(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM \"{table}\""
            )

    def holds_job(self, rowid: int, owner: str, attempt: int) -> bool:
        # FOR SHARE: a claim (which skips locked rows) cannot take the job over until the
        # fenced transaction that asked has committed.
        return bool(
            self._rows(
                "SELECT 1 FROM jobs WHERE id = ? AND owner = ? AND attempts = ? "
                "AND state = 'running' FOR SHARE",
                (rowid, owner, attempt),
            )
        )

    def claim_jobs(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease: float,
        *,
        only: int | None = None,
        sweep: bool = False,
    ) -> list[Claimed]:
        if sweep:
            self.requeue_expired()
        for _ in range(5):  # another host started a job of one of the targets first: again
            try:
                with self._transaction(serial=False):
                    return self._claim(owner, names, limit, lease, only)
            except self._driver.errors.UniqueViolation:
                continue
        return []


STORE_ENGINES["postgresql"] = STORE_ENGINES["postgres"] = PostgresStore

# ───────────────────────────────────────── locks ─────────────────────────────────────────
# Named leases with growing fencing tokens, renewed in the background while held.


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

    def acquire(self) -> "Lock":
        """Take the lock, waiting up to `wait` seconds; LockBusy when it cannot be had."""
        deadline = time.monotonic() + self.wait
        pause = 0.002
        while True:
            token = self.store.acquire_lock(self.name, self.owner, self.ttl)
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
        if self.token is None or not self.store.renew_lock(
            self.name, self.owner, self.token, self.ttl
        ):
            raise LeaseLost(f"lock {self.name!r} is not held by this Lock")

    def release(self) -> None:
        """Give the lock back; LeaseLost when it was not held any more."""
        token, self.token = self.token, None
        if token is None or not self.store.release_lock(self.name, self.owner, token):
            raise LeaseLost(f"lock {self.name!r} is not held by this Lock")

    def holds(self) -> bool:
        """Whether this Lock still holds its lease; called inside a transaction, it fences
        the writes made there (they commit only while the lock is held)."""
        return self.token is not None and self.store.holds_lock(self.name, self.owner, self.token)

    def _renew_until_stopped(self) -> None:
        try:
            while not self._stop_renewing.wait(self.ttl / 3):
                try:
                    self.renew()
                except LeaseLost:
                    log.warning("lock %r was lost before its holder finished", self.name)
                    return
                except StoreError as e:
                    log.warning("could not renew lock %r: %s", self.name, e)
        finally:
            self.store.release_thread()

    def __enter__(self) -> "Lock":
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
        return check_int("a job id's number", int(job_id[4:]))
    raise BadInput(f"not a job id: {job_id!r}")


def retry_delay(backoff: float, attempt: int) -> float:
    """Seconds before retry `attempt` (1-based): backoff·2^(attempt−1), plus up to 25% jitter."""
    base = min(backoff * 2 ** min(attempt - 1, 64), MAX_BACKOFF)  # 2.0**1024 overflows
    return base * (1 + random.uniform(0, 0.25))


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


class JobContext:
    """What a task receives as `ctx`: the job's id, its attempt, and `heartbeat()`."""

    def __init__(self, queue: "Queue", job: Claimed, owner: str, lease: float) -> None:
        self.queue = queue
        self.job_id = f"job_{job.rowid}"
        self.attempt = job.attempt
        self.name = job.name
        self._job = job
        self._owner = owner
        self._lease = lease

    def holds(self) -> bool:
        """Whether this worker still holds the job's lease (inside a transaction, it fences
        the writes made there)."""
        return self.queue.store.holds_job(self._job.rowid, self._owner, self._job.attempt)

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
    ) -> NewJob:
        """The checked column values that the jobs of one enqueue call share."""
        task = self.tasks.get(check_name("task name", name))
        if task is None and strict:
            raise BadInput(
                f"no task named {name!r} is registered in this process "
                "(register it with @kit.task, or pass strict=False)"
            )
        created = self.store.now()
        if run_at is None:
            run_at = created + check_seconds("delay", delay) if delay else created
        else:
            run_at = check_seconds("run_at", run_at)
        check_int("priority", priority, low=-(2**62), high=2**62)
        if target is not None:
            check_name("target", target)
        retries = task.retries if retries is None and task else retries
        retries = 3 if retries is None else retries
        check_int("retries", retries)
        backoff = task.backoff if backoff is None and task else backoff
        backoff = check_seconds("backoff", 1.0 if backoff is None else backoff)
        timeout = task.timeout if timeout is None and task else timeout
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, positive=True)
        return NewJob(name, priority, run_at, created, retries, backoff, timeout, target)

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
        rowid = self.store.insert_job(values, dumps(payload), key)
        self.store.notify()
        return f"job_{rowid}"

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
        if isinstance(payloads, (str, bytes, bytearray)) or not isinstance(payloads, Sequence):
            kind = type(payloads).__name__
            raise BadInput(f"payloads must be a list (one job per payload), not a {kind}")
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
        rowids = self.store.insert_jobs(values, [dumps(p) for p in payloads])
        self.store.notify()
        return [f"job_{rowid}" for rowid in rowids]

    # claiming and finishing

    def claim(
        self, owner: str, names: Sequence[str], limit: int, lease: float, only: int | None = None
    ) -> list[Claimed]:
        """Lease up to `limit` ready jobs of these task names, at most one per target
        (with `only`, just that job if it is ready)."""
        at = self.store.now()
        sweep = at >= self._next_sweep
        if sweep:
            self._next_sweep = at + 1.0
        return self.store.claim_jobs(owner, names, limit, lease, only=only, sweep=sweep)

    def finish_and_claim(
        self,
        owner: str,
        outcomes: Sequence[tuple[Claimed, str, Any]],
        names: Sequence[str],
        limit: int,
        lease: float,
    ) -> tuple[dict[int, str], list[Claimed]]:
        """`finish(owner, outcomes)` then `claim(owner, names, limit, lease)` in one
        transaction (a worker's loop: one commit per batch); both results."""
        with self.store.fenced():
            states = self._record(owner, outcomes)
            jobs = self.claim(owner, names, limit, lease)
        self._after_record(outcomes, states)
        return states, jobs

    def finish(self, owner: str, outcomes: Sequence[tuple[Claimed, str, Any]]) -> dict[int, str]:
        """Record outcomes `(job, "ok" | "error" | "fail", JSON result or error)` at once.

        Errors are retried with backoff (or after the delay of a `Retry` given as the
        error) up to the job's retries, then the job is dead; "fail" ends it `failed` at
        once. Returns the new state of each row changed; a row whose lease had moved on
        (a late or duplicate worker) is refused and unchanged.
        """
        states = self._record(owner, outcomes)
        self._after_record(outcomes, states)
        return states

    def _record(self, owner: str, outcomes: Sequence[tuple[Claimed, str, Any]]) -> dict[int, str]:
        """`finish`'s writes (in the caller's transaction, if any); the new state of each
        row kept."""
        if not outcomes:
            return {}
        at = self.store.now()
        ends = []
        for job, kind, value in outcomes:
            if kind == "ok":
                state, result, error, run_at = "done", value, None, None
            else:
                error, result = str(value)[:4000], None
                if kind == "fail":
                    state, run_at = "failed", None
                elif job.attempt > job.retries:
                    state, run_at = "dead", None
                elif isinstance(value, Retry):
                    state, run_at = "queued", at + value.after
                else:
                    state, run_at = "queued", at + retry_delay(job.backoff, job.attempt)
            finished = None if state == "queued" else at
            ends.append(JobEnd(state, result, error, run_at, finished, job.rowid, job.attempt))
        kept = self.store.finish_jobs(owner, ends)
        return {end.rowid: end.state for end in ends if end.rowid in kept}

    def _after_record(
        self, outcomes: Sequence[tuple[Claimed, str, Any]], states: dict[int, str]
    ) -> None:
        """After `_record` committed: wake local workers for what may be ready now (a retry,
        jobs that waited for a target); warn of refused results."""
        if any(states.get(job.rowid) == "queued" or job.target for job, *_ in outcomes):
            self.store.notify()
        for job, *_ in outcomes:
            if job.rowid not in states:
                log.warning(
                    "job_%d: result refused, its lease belongs to another worker", job.rowid
                )

    def extend(self, job: Claimed, owner: str, lease: float) -> bool:
        """Extend one job's lease; False when this worker no longer holds it."""
        return self.store.extend_lease(job.rowid, owner, job.attempt, lease)

    def release(self, owner: str, jobs: Sequence[Claimed]) -> None:
        """Hand jobs this worker holds back to the queue at once (its process is being
        interrupted), instead of leaving them leased until the lease runs out."""
        self.store.release_jobs(owner, [(job.rowid, job.attempt) for job in jobs])
        self.store.notify()

    # inspection and control

    def get(self, job_id: str) -> Job:
        job = self.store.job(job_rowid(job_id))
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def recent(self, state: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs, optionally of one state."""
        if state is not None:
            check_choice("state", state, JOB_STATES)
        return self.store.jobs(state, check_int("limit", limit))

    def _moved(self, job_id: str, allowed: tuple[str, ...], was: str | None) -> Job:
        """The job after a state change from one of the `allowed` states, or BadInput."""
        if was is None:
            raise NotFound(f"no job {job_id}")
        if was not in allowed:
            raise BadInput(f"{job_id} is {was}, not {' or '.join(allowed)}")
        self.store.notify()
        return self.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job (a running one finishes; ask its task to stop instead)."""
        job = self.get(job_id)
        if job.name.startswith("agentkit."):
            raise BadInput(f"{job_id} is agentkit's own {job.name}; cancel its turn instead")
        return self._moved(job_id, ("queued",), self.store.cancel_job(job_rowid(job_id)))

    def retry(self, job_id: str) -> Job:
        """Queue a dead or failed job again, with its attempts counted from zero."""
        was = self.store.requeue_job(job_rowid(job_id))
        return self._moved(job_id, ("dead", "failed"), was)


class Worker:
    """Claims and runs the jobs of some tasks in `concurrency` threads until stopped.

    Claims and results are batched when handlers are quick (a claim takes up to 64 jobs,
    sized so that a batch takes about 5 ms), and a batch's results are recorded in the
    transaction that claims the next: one commit per batch, not two per job. Leases are
    renewed by a heartbeat thread while the worker lives; a job that runs past its task's
    `timeout` is failed (and retried) and its late result is refused. An idle worker waits
    for the store's wake-ups (`wait_for_change`).
    """

    def __init__(
        self,
        queue: Queue,
        *,
        concurrency: int = 1,
        lease: float = 30.0,
        tick: Callable[[], object] | None = None,
        on_failed: Callable[[Claimed, str, str], object] | None = None,
    ) -> None:
        self.queue = queue
        self.concurrency = check_int("concurrency", concurrency, low=1)
        self.lease = check_seconds("lease", lease, positive=True)
        self.tick = tick
        self.on_failed = on_failed
        self.owner = worker_name()
        self.names = sorted(queue.tasks)
        self.done = 0
        self.halted = threading.Event()  # set by `halt`: stop as `stop` would
        self.threads: set[int] = set()  # the threads running a job of this worker now
        self._guard = threading.Lock()
        self._busy = 0
        self._running: dict[tuple[int, int], tuple[Claimed, float]] = {}

    def run(self, *, until_idle: bool = False, stop: threading.Event | None = None) -> int:
        """Work until `stop` is set (or, with `until_idle`, until nothing is ready)."""
        stop = stop or threading.Event()
        threads = [
            threading.Thread(target=self._side_loop, args=(i, until_idle, stop), daemon=True)
            for i in range(1, self.concurrency)
        ]
        with self._heartbeating():
            for t in threads:
                t.start()
            self._loop(0, until_idle, stop)
            for t in threads:
                t.join()
        return self.done

    def halt(self) -> None:
        """Stop after the running jobs (from any thread)."""
        self.halted.set()
        self.queue.store.notify()

    def run_one(self, rowid: int) -> bool:
        """Run one given job here if it is ready to be claimed; whether it ran."""
        jobs = self.queue.claim(self.owner, self.names, 1, self.lease, only=rowid)
        if jobs:
            with self._heartbeating():
                self._finish(self._run_batch(jobs)[0])
        return bool(jobs)

    @contextlib.contextmanager
    def _heartbeating(self) -> Iterator[None]:
        finished = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(finished,), daemon=True)
        beat.start()
        try:
            yield
        finally:
            finished.set()
            beat.join()

    def _side_loop(self, index: int, until_idle: bool, stop: threading.Event) -> None:
        try:
            self._loop(index, until_idle, stop)
        finally:
            self.queue.store.release_thread()

    def _loop(self, index: int, until_idle: bool, stop: threading.Event) -> None:
        """Claim and run batches; each batch's outcomes are recorded in the transaction that
        claims the next one (one commit per batch), and before leaving. While the database
        is out of reach the outcomes are kept and recorded once it answers (those whose
        lease moved on meanwhile are refused then)."""
        batch, next_tick = 1, 0.0
        ran: list[tuple[Claimed, str, Any]] = []
        try:
            while not stop.is_set() and not self.halted.is_set():
                with self._guard:
                    self._busy += 1
                try:
                    if index == 0 and self.tick and time.monotonic() >= next_tick:
                        self.tick()
                        next_tick = time.monotonic() + 1.0
                    jobs = self._finish(ran, batch)
                    ran = []
                    if jobs:
                        ran, batch = self._run_batch(jobs)
                        continue
                except StoreError as e:
                    log.warning("worker %s: %s; trying again in 1 s", self.owner, e)
                    stop.wait(1.0)
                    continue
                finally:
                    with self._guard:
                        self._busy -= 1
                        idle = self._busy == 0
                if until_idle and idle:
                    return
                self.queue.store.wait_for_change(0.05 if until_idle else 0.25)
        finally:
            if ran:
                self._finish(ran)

    def _run_batch(self, jobs: list[Claimed]) -> tuple[list[tuple[Claimed, str, Any]], int]:
        """Run claimed jobs; their outcomes (to record) and the next batch size."""
        started, here = time.monotonic(), threading.get_ident()
        with self._guard:
            self._running.update(((job.rowid, job.attempt), (job, started)) for job in jobs)
            self.threads.add(here)
        outcomes = []
        try:
            for job in jobs:
                with self._guard:
                    self._running[job.rowid, job.attempt] = (job, time.monotonic())
                outcomes.append(self._run(job))
        except BaseException:  # Ctrl-C or exit: record what ran, hand the rest back at once
            self._finish(outcomes)
            self.queue.release(self.owner, jobs[len(outcomes) :])
            raise
        finally:
            with self._guard:
                for job in jobs:
                    self._running.pop((job.rowid, job.attempt), None)
                self.threads.discard(here)
        self.done += len(jobs)
        per_job = (time.monotonic() - started) / len(jobs)
        return outcomes, max(1, min(64, int(0.005 / max(per_job, 1e-6))))

    def _finish(self, outcomes: list[tuple[Claimed, str, Any]], claim: int = 0) -> list[Claimed]:
        """Record outcomes, and claim up to `claim` more jobs in the same transaction; report
        the jobs that ended dead or failed (once committed); the jobs claimed."""
        if claim:
            states, jobs = self.queue.finish_and_claim(
                self.owner, outcomes, self.names, claim, self.lease
            )
        else:
            states, jobs = self.queue.finish(self.owner, outcomes), []
        for job, _, error in outcomes:
            if self.on_failed and states.get(job.rowid) in ("dead", "failed"):
                self.on_failed(job, states[job.rowid], str(error))
        return jobs

    def _run(self, job: Claimed) -> tuple[Claimed, str, Any]:
        task = self.queue.tasks[job.name]
        ctx = JobContext(self.queue, job, self.owner, self.lease)
        try:
            result = call_sync(task.fn, *((job.payload, ctx) if task.takes_ctx else (job.payload,)))
        except (Fail, BadInput) as e:  # retrying would only repeat a refusal
            return job, "fail", f"{type(e).__name__}: {e}"
        except Retry as e:
            log.info(
                "job_%d (%s) attempt %d: again in %g s: %s",
                job.rowid,
                job.name,
                job.attempt,
                e.after,
                e,
            )
            return job, "error", e
        except Exception as e:
            log.warning("job_%d (%s) attempt %d: %r", job.rowid, job.name, job.attempt, e)
            return job, "error", f"{type(e).__name__}: {e}"
        try:
            return job, "ok", dumps(result)
        except BadInput as e:
            return job, "fail", f"the result of task {job.name!r} is {e}"

    def _heartbeat(self, finished: threading.Event) -> None:
        """Renew this worker's leases; fail the jobs that ran past their timeout."""
        try:
            self._beat_until(finished)
        finally:
            self.queue.store.release_thread()

    def _beat_until(self, finished: threading.Event) -> None:
        while not finished.wait(min(self.lease / 3, 1.0)):
            at = time.monotonic()
            with self._guard:
                late = [
                    job
                    for job, started in self._running.values()
                    if job.timeout is not None and at - started > job.timeout
                ]
                for job in late:
                    del self._running[job.rowid, job.attempt]
            try:
                if late:
                    self._finish([(j, "error", f"timed out after {j.timeout:g} s") for j in late])
                self.queue.store.extend_leases(self.owner, self.lease)
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
    def parse(cls, expr: str) -> "Cron":
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
        started = self.store.now()
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
        self.store.put_schedule(name, kind, spec, tz, task, body, first)
        return self.get(name)

    def get(self, name: str) -> Schedule:
        found = self.store.schedule(name)
        if found is None:
            raise NotFound(f"no schedule named {name!r}")
        return found

    def all(self) -> list[Schedule]:
        return self.store.schedules()

    def pause(self, name: str) -> Schedule:
        """Stop a schedule from running until `resume`."""
        self.store.pause_schedule(name, True, None)
        return self.get(name)

    def resume(self, name: str) -> Schedule:
        """Run a paused schedule again; the runs it missed while paused are dropped."""
        s = self.get(name)
        at = self.store.now()
        due = s.next_due if s.kind == "at" else following_due(s.kind, s.spec, s.tz, at, at)
        self.store.pause_schedule(name, False, due)
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete a schedule (its jobs already enqueued stay)."""
        if not self.store.delete_schedule(name):
            raise NotFound(f"no schedule named {name!r}")

    def tick(self, at: float | None = None) -> list[str]:
        """Enqueue every run due at `at` (default: now); the ids of the jobs it added."""
        at = self.store.now() if at is None else at
        if not self.store.due_schedules(at):
            return []
        added = []
        with self.store.transaction():
            for s in self.store.due_schedules(at):
                values = self.queue.job_values(s.task, run_at=s.next_due, strict=False)
                key = f"schedule:{s.name}:{iso(s.next_due)}"
                following = following_due(s.kind, s.spec, s.tz, s.next_due, at)
                if self.store.advance_schedule(s.name, s.next_due, following):
                    added.append(f"job_{self.store.insert_job(values, dumps(s.payload), key)}")
        self.queue.store.notify()
        return added


def at_timestamp(at: float | datetime, tz: str) -> float:
    """Unix seconds from a timestamp or a datetime (a naive one is read in `tz`)."""
    if isinstance(at, datetime):
        return (at if at.tzinfo else at.replace(tzinfo=zone(tz))).timestamp()
    return check_seconds("at", at)


# ───────────────────────────────────────── attachments ─────────────────────────────────────────
# Files in and out of threads: `File` (given to agentkit), the `AttachmentStore` protocol,
# and the default store (content-addressed; in the database, or larger files beside it).

MAX_FILE_BYTES = 20 * 1024 * 1024  # the default bound of every file
INLINE_FILE_BYTES = 256 * 1024  # on SQLite, larger files live in files beside the database
ATTACHMENT_ID = re.compile(r"att_[0-9a-f]{16}")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")  # what vision models take
MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&.+^_-]{0,62}/[a-z0-9][a-z0-9!#$&.+^_-]{0,126}", re.I)


@dataclass(frozen=True)
class File:
    """A file given to agentkit (public): `File(name, data)` or `File(name, path=...)`;
    `mime` is guessed from the name when not given."""

    name: str
    data: bytes | None = None
    _: dataclasses.KW_ONLY
    path: str | os.PathLike[str] | None = None
    mime: str | None = None

    def media_type(self) -> str:
        """The file's media type: as given, else guessed from its name, else binary."""
        given = self.mime or mimetypes.guess_type(self.name)[0]
        return given.lower() if given else "application/octet-stream"

    def read(self, limit: int) -> bytes:
        """The file's bytes, checked (TooLarge when it is larger than `limit`)."""
        name = check_name("file name", self.name, 255)
        if self.mime is not None and not MEDIA_TYPE.fullmatch(str(self.mime)):
            raise BadInput(f"file {name!r}: {self.mime!r} is no media type (like image/png)")
        if (self.data is None) == (self.path is None):
            raise BadInput(f"file {name!r}: give data= or path=, one of them")
        if self.data is not None:
            if not isinstance(self.data, (bytes, bytearray, memoryview)):
                raise BadInput(f"file {name!r}: data must be bytes")
            data = bytes(self.data)
        else:
            try:
                with open(self.path, "rb") as f:  # type: ignore[arg-type]
                    data = f.read(limit + 1)
            except OSError as e:
                raise BadInput(f"file {name!r}: {e.strerror}") from None
        check_file_size(name, len(data), limit)
        return data


def check_file_size(name: str, size: int, limit: int) -> None:
    """TooLarge, naming the limit, when a file of `size` bytes is over `limit`."""
    if size > limit:
        raise TooLarge(
            f"{name} is {size:,} bytes, over the limit of {limit:,} bytes "
            "(max_file_bytes): send a smaller file"
        )


@runtime_checkable
class AttachmentStore(Protocol):
    """Where file contents live. `save` is called inside the transaction that records
    the file in `scope` (a thread id), with its bytes read and checked in `file.data`,
    and returns its Attachment (a fresh `att_…` id);
    `open` returns its bytes (or a path to them) only when it belongs to `scope`, and
    raises NotFound otherwise, so a file of one scope is never resolved from another."""

    def save(self, scope: str, file: File) -> Attachment: ...

    def open(self, attachment_id: str, scope: str) -> bytes | Path: ...


class StoredFiles:
    """The default AttachmentStore, over the kit's store: contents by SHA-256 (each kept
    once), in its row up to `inline_bytes`, else, when there is a `folder` (SQLite files),
    in `folder/<sha256>` written through a temporary file and a rename; with no folder
    (PostgreSQL: every host sees them) every content is in the database."""

    def __init__(
        self, store: Store, folder: Path | None, inline_bytes: int = INLINE_FILE_BYTES
    ) -> None:
        self.store = store
        self.folder = folder
        self.inline_bytes = inline_bytes

    def save(self, scope: str, file: File) -> Attachment:
        data = file.data
        if not isinstance(data, bytes):
            raise BadInput(f"file {file.name!r}: save takes a File with its bytes in data")
        digest = hashlib.sha256(data).hexdigest()
        outside = self.folder is not None and len(data) > self.inline_bytes
        if self.store.blob(digest) is None:
            if outside:
                self._write(digest, data)
            self.store.put_blob(Blob(digest, len(data), None if outside else data))
        return Attachment(new_id("att"), file.name, file.media_type(), len(data), digest)

    def _write(self, digest: str, data: bytes) -> None:
        """The content in its file, made whole before it gets its name."""
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / digest
        if target.exists():
            return
        temporary = self.folder / f".{digest}.{os.getpid()}.{threading.get_ident()}"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)

    def open(self, attachment_id: str, scope: str) -> bytes | Path:
        row = self.store.attachment(attachment_id, scope)
        blob = None if row is None else self.store.blob(row.sha256)
        if row is None or blob is None:
            raise NotFound(f"no file {attachment_id} in {scope}")
        if blob.data is not None:
            return blob.data
        assert self.folder is not None
        return self.folder / blob.sha256

    def forget(self, blobs: Sequence[Blob], older_than: float) -> int:
        """Delete the files of pruned contents and leftovers of interrupted writes older
        than `older_than` (a Unix time) that no row refers to; how many files."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        removed = 0
        for blob in blobs:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / blob.sha256).unlink()
                removed += 1
        for path in self.folder.iterdir():
            name = path.name.lstrip(".").partition(".")[0]
            stray = path.name.startswith(".") or self.store.blob(name) is None
            if stray and path.stat().st_mtime < older_than:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed


def file_info(attachment: Attachment) -> dict[str, Any]:
    """What messages, deliveries and `history()` say of a stored file."""
    return {
        "id": attachment.id,
        "name": attachment.name,
        "mime": attachment.mime,
        "size": attachment.size,
    }


def file_note(info: dict[str, Any]) -> str:
    """How a model is told of a file (`file_info`) it is not shown: name, type, size, id."""
    return f"[file {info['name']} ({info['mime']}, {info['size']} bytes), id {info['id']}]"


def file_bytes(opened: bytes | Path) -> bytes:
    """What `AttachmentStore.open` returned, as bytes."""
    return opened if isinstance(opened, bytes) else Path(opened).read_bytes()


# ──────────────────────────────── conversation records ────────────────────────────────

FINAL_TURN_STATES = ("done", "failed", "cancelled")
TURN_TASK = "agentkit.turn"
STEERED = "skipped: a new message from the user arrived before this call started"
QUEUED_DELIVERIES = ("steer", "follow_up")  # how a message joins a running turn
DELIVERIES = ("steer", "follow_up", "next_turn")  # what kit.send and while_busy take
CANCELLED_RUNNING = "interrupted: the turn was cancelled while this call ran; its effect is unknown"
DELIVER_TASK = "agentkit.deliver"


def new_id(kind: str) -> str:
    """A random id that carries its kind: `turn_3f9c…` (short enough for chat buttons)."""
    return f"{kind}_{os.urandom(8).hex()}"


def check_thread(thread: object) -> str:
    """A thread or actor id: `<adapter>:<key>`, at most 200 characters."""
    name = check_name("thread id", thread)
    if ":" not in name[1:]:
        raise BadInput(f"a thread id is '<adapter>:<key>', like 'cli:me', not {name!r}")
    return name


def check_text(text: object, kind: str = "text") -> str:
    """A message's text: a string of at most 100,000 characters that UTF-8 can encode."""
    if not isinstance(text, str) or len(text) > 100_000:
        raise BadInput(f"{kind} must be a string of at most 100,000 characters")
    return check_utf8(kind, text)


APPROVAL_STATES = ("pending", "approved", "denied", "expired", "cancelled")


def clip(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def approval_text(a: Approval) -> str:
    """An approval request as approvers read it in chat; once decided, the decision. Long
    arguments and reasons are cut so it fits one chat message (4096 characters)."""
    call = f"{a.tool} {clip(dumps(a.args), 2500)}"
    why = f"\nReason: {clip(a.reason, 500)}" if a.reason else ""
    if a.state == "pending":
        return (
            f"Approval needed: {a.requester} asks to run {call}{why}\n"
            f"Approve with /approve {a.id} or deny with /deny {a.id} [reason] "
            f"(expires {iso(a.expires_at)})."
        )
    because = f": {clip(a.decision_reason, 300)}" if a.decision_reason else ""
    outcome = {
        "approved": f"Approved by {a.decided_by}",
        "denied": f"Denied by {a.decided_by}{because}",
        "expired": "Expired: nobody decided in time",
        "cancelled": "Cancelled with its turn",
    }[a.state]
    return f"{a.requester} asked to run {call}{why}\n{outcome}."


class ToolFiles(NamedTuple):
    """The files one tool call made: those it returned (the model sees them) and those
    it attached (only sent), with the assistant message of the call."""

    message_id: int
    call_id: str
    returned: Sequence[File]
    attached: Sequence[File]


ENTRY_KIND = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def check_entry_kind(kind: object) -> str:
    """An entry kind: 1-100 letters, digits, '_', '.', ':' or '-'; else BadInput."""
    if not isinstance(kind, str) or not ENTRY_KIND.fullmatch(kind):
        raise BadInput(
            f"an entry kind is 1-100 letters, digits, '_', '.', ':' or '-', not {kind!r}"
        )
    return kind


class Entries:
    """`ctx.entries` in tools and commands, `event.entries` in a turn's hooks: durable
    records of the thread that never enter the model's context. Appended entries are
    written in the transaction of the step that made them (a tool call's result; a hook's
    next write of the turn), so a step that is not stored leaves none behind."""

    def __init__(self, thread_id: str, turn_id: str | None) -> None:
        self.thread_id = thread_id
        self.turn_id = turn_id
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str]] = []  # (kind, data as JSON)

    def append(self, kind: str, data: Any = None) -> None:
        """Keep `data` (anything JSON can hold) under `kind` (a name) in this thread."""
        entry = (check_entry_kind(kind), dumps(data))
        with self._lock:
            self._pending.append(entry)

    def pending(self) -> bool:
        """Whether entries wait to be written."""
        return bool(self._pending)

    @contextlib.contextmanager
    def written(self) -> Iterator[list[tuple[str, str]]]:
        """The entries appended so far, taken for a transaction: put back if it fails."""
        if not self._pending:
            yield []
            return
        with self._lock:
            taken, self._pending = self._pending, []
        try:
            yield taken
        except BaseException:
            with self._lock:
                self._pending[:0] = taken
            raise


class Records:
    """Threads, turns, messages, tool calls, approvals and events: the conversation's rules
    over the store.

    A turn is the inbox: its row holds the inbound message until the turn starts, when
    the message joins the thread. A message that arrives while its thread waits for an
    approval is held (a turn with no job) and released when the waiting turn ends.
    Methods that write call the store inside the caller's transaction, or their own.
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.store = queue.store
        self.lease = threading.local()  # .job: the JobContext of the turn job this thread runs
        # adapters by name, with .name, .pull and .accepts(kind, meta): who gets deliveries
        self.outlets: dict[str, Any] = {}
        self.approver_inboxes: tuple[str, ...] = ()  # threads where approvers can be reached
        self.may_decide: Callable[[str], bool] = lambda actor: False
        # thread -> {name: value} of its saved secrets (Secrets.values, set by the facade)
        self.saved_secrets: Callable[[str], dict[str, str]] = lambda thread: {}
        self.files: AttachmentStore = StoredFiles(self.store, None)  # the kit sets its own
        self.max_file_bytes = MAX_FILE_BYTES

    def thread_secrets(self, thread: str) -> dict[str, str]:
        """The thread's saved secrets as `{value: name}`, to redact them (values of 4
        characters or more: shorter ones would redact ordinary words)."""
        return {v: name for name, v in self.saved_secrets(thread).items() if len(v) >= 4}

    def clean(self, thread: str, value: Any) -> Any:
        """`value` (a text, or JSON holding texts) with the thread's saved secrets and the
        process-wide redactions replaced. Every text a turn makes passes here on its way
        to the database and the outbox: messages, calls, approvals, a turn's reply and
        error, events and deliveries (only the inbound text in `turns.text` is kept as
        received)."""
        extra = self.thread_secrets(thread)

        def walk(item: Any) -> Any:
            if isinstance(item, str):
                return redactions.redact(item, extra)
            if isinstance(item, dict):
                return {key: walk(v) for key, v in item.items()}
            if isinstance(item, (list, tuple)):
                return [walk(v) for v in item]
            return item

        return walk(value)

    @contextlib.contextmanager
    def transaction(self, entries: Entries | None = None) -> Iterator[None]:
        """A write transaction that, in a turn job, commits only while the job's lease holds:
        a worker that lost its lease (and so its turn) to another writes nothing. It also
        writes the entries the turn's hooks appended (and those of `entries`, a call's)."""
        hooked = getattr(self.lease, "entries", None)
        sources = [source for source in (hooked, entries) if source is not None]
        with contextlib.ExitStack() as taking:
            taken = [(source, taking.enter_context(source.written())) for source in sources]
            with self.store.transaction():
                job = getattr(self.lease, "job", None)
                if job is not None and not job.holds():
                    raise LeaseLost(f"{job.job_id} is no longer leased to this worker")
                yield
                for source, appended in taken:
                    self.add_entries(source, appended)

    def add_entries(self, source: Entries, appended: Sequence[tuple[str, str]]) -> None:
        """Store appended entries `(kind, data as JSON)`, cleaned, inside the caller's
        transaction."""
        clean = [(k, dumps(self.clean(source.thread_id, json.loads(d)))) for k, d in appended]
        self.store.add_entries(source.thread_id, source.turn_id, clean)

    def enqueue_turn(self, turn_id: str, key: str, target: str | None, delay: float = 0.0) -> int:
        """Queue the job that runs (or resumes) a turn, `delay` seconds from now."""
        values = self.queue.job_values(TURN_TASK, target=target, delay=delay)
        return self.store.insert_job(values, dumps({"turn": turn_id}), key)

    def add_event(self, kind: str, actor: str | None, turn: Approval | TurnRow, data: dict) -> None:
        """Append to the events log (who did what, when)."""
        turn_id = turn.turn_id if isinstance(turn, Approval) else turn.id
        data = self.clean(turn.thread_id, data)
        self.store.add_event(kind, actor, turn.thread_id, turn_id, dumps(data))

    def seen(self, source: str, source_id: str | None) -> TurnRow | None:
        """The turn an inbound `(adapter, source id)` started, if any."""
        return None if source_id is None else self.store.turn_from(source, source_id)

    def add_turn(
        self,
        thread: str,
        actor: str,
        text: str,
        source_id: str | None,
        meta: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Record an inbound message as a queued turn; `(turn id, created)`.

        A message whose `(adapter, source id)` was seen before returns the first turn.
        `meta` is what the adapter needs to answer it (a button press, a callback URL).
        """
        source = thread.partition(":")[0]
        seen = self.seen(source, source_id)
        if seen:
            return seen.id, False
        turn_id = new_id("turn")
        meta_json = dumps(meta) if meta else None
        self.store.insert_turn(turn_id, thread, actor, text, source, source_id, meta_json)
        return turn_id, True

    def turn(self, turn_id: str) -> TurnRow:
        found = self.store.turn(turn_id)
        if found is None:
            raise NotFound(f"no turn {turn_id}")
        return found

    def start(
        self,
        turn: TurnRow,
        *,
        command: bool,
        instructions: str | None = None,
        added: Sequence[str] = (),
    ) -> bool:
        """Move a queued turn to running and add its user message to the thread, then the
        messages extensions `added` and the `instructions` they gave it; False if it is
        not queued any more (cancelled meanwhile)."""
        with self.transaction():
            if not self.store.move_turn(turn.id, "queued", "running"):
                return False
            message = self.add_message(turn.thread_id, turn.id, "user", turn.text, command=command)
            self.store.link_attachments(turn.id, message)
            for text in added:
                self.add_message(
                    turn.thread_id, turn.id, "user", text, command=False, origin="extension"
                )
            if instructions:
                self.store.set_turn_instructions(turn.id, self.clean(turn.thread_id, instructions))
            return True

    def add_message(
        self,
        thread: str,
        turn_id: str,
        role: str,
        content: str | None,
        *,
        command: bool,
        origin: str | None = None,
    ) -> int:
        """Append a message to the thread, cleaned; its id."""
        content = self.clean(thread, content)
        return self.store.add_message(thread, turn_id, role, content, command, origin)

    def queue_message(
        self, thread: str, actor: str, text: str, deliver: str, source_id: str | None
    ) -> str | None:
        """Queue a message into the thread's active turn (inside the caller's transaction);
        that turn's id, or None when no turn is active there (the message is not queued).
        The same source id twice is queued once."""
        queued = None if source_id is None else self.store.queued_from(thread, source_id)
        if queued is not None:
            return queued.turn_id or (self.store.active_turns(thread) or [None])[0]
        active = self.store.active_turns(thread)
        if not active:
            return None
        self.store.add_queued(thread, actor, text, deliver, source_id)
        self.deliver(thread, active[0], "user", text)
        return active[0]

    def take_messages(self, turn: TurnRow, delivers: Sequence[str]) -> list[QueuedMessage]:
        """Deliver the thread's queued messages of these kinds into the turn, as user
        messages marked by how they were sent (inside the caller's transaction)."""
        taken = self.store.take_queued(turn.thread_id, delivers, turn.id)
        for message in taken:
            self.add_message(
                turn.thread_id, turn.id, "user", message.text, command=False, origin=message.deliver
            )
        return taken

    def steer(self, turn: TurnRow, calls: Sequence[CallRow]) -> bool:
        """Deliver the thread's queued steer messages into the turn, and skip the pending
        `calls` (their results say so); whether there were any."""
        if not self.store.has_queued(turn.thread_id, ("steer",)):
            return False  # read first: most steps have none, and need no write
        with self.transaction():
            if not self.take_messages(turn, ("steer",)):
                return False
            for call in calls:
                if call.state == "pending":
                    self.set_call(turn, call.call_id, "error", STEERED, "pending")
            return True

    def add_step(
        self,
        turn: TurnRow,
        text: str | None,
        calls: Sequence[tuple[str, str, dict[str, Any], str, str | None]],
        usage: dict[str, int],
        approvals: Sequence[tuple[str, str, str | None, float]] = (),
    ) -> list[Approval]:
        """Store one model step in one transaction: the assistant message, its calls
        `(id, tool, args, state, result)`, the approvals they wait for `(approval id,
        call id, reason, expires at)` and the usage. A step without calls ends the turn."""
        clean = functools.partial(self.clean, turn.thread_id)
        calls = [(i, tool, dumps(clean(args)), s, clean(r)) for i, tool, args, s, r in calls]
        with self.transaction():
            message = self.add_message(turn.thread_id, turn.id, "assistant", text, command=False)
            if usage:
                reported = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
                self.store.set_message_tokens(message, reported)
            self.store.add_calls(turn.id, message, calls)
            self.store.count_step(
                turn.id, usage.get("input_tokens", 0), usage.get("output_tokens", 0)
            )
            tools = {call[0]: call for call in calls}
            made = []
            for approval_id, call_id, reason, expires_at in approvals:
                _, tool, args, _, _ = tools[call_id]
                made.append(
                    self.store.insert_approval(
                        approval_id, turn, call_id, tool, args, clean(reason), expires_at
                    )
                )
                data = {"approval": approval_id, "tool": tool}
                self.add_event("approval_requested", turn.actor, turn, data)
                self.ask_approvers(made[-1])
            if not calls and not self.take_messages(turn, QUEUED_DELIVERIES):
                self.end(turn.id, "done", reply=text)
            elif not calls and text:  # queued messages go on with the turn: this answer is out
                self.deliver(turn.thread_id, turn.id, "reply", text, **self.meta_of(turn))
        return made

    @staticmethod
    def meta_of(turn: TurnRow) -> dict[str, Any]:
        """What a delivery about a turn carries for its adapter (the turn's meta)."""
        return {"meta": turn.meta} if turn.meta else {}

    def end(
        self, turn_id: str, status: str, *, reply: str | None = None, error: str | None = None
    ) -> None:
        """Set a turn's status (final, or waiting_approval); release the thread's held turns
        once nothing in it waits for an approval."""
        final = self.store.now() if status in FINAL_TURN_STATES else None
        thread = self.turn(turn_id).thread_id
        reply, error = self.clean(thread, reply), self.clean(thread, error)
        turn = self.store.end_turn(turn_id, status, reply, error, final)
        extra = self.meta_of(turn)
        if status == "done" and reply:
            self.deliver(thread, turn_id, "reply", reply, **extra)
        elif status == "failed":
            self.deliver(thread, turn_id, "error", f"Sorry, that failed: {error}", **extra)
        if final:
            for approval in self.pending_approvals(turn_id):
                self.settle(approval, "cancelled", None, None)
        if self.store.thread_waits(thread):
            return
        for held_id in self.store.held_turns(thread):
            self.release(held_id, thread)
        queued = final and self.store.has_queued(thread, QUEUED_DELIVERIES)
        if queued and not self.store.active_turns(thread):
            self.release_queued(thread)

    def release_queued(self, thread: str) -> None:
        """Make the messages still queued in a thread where no turn is active turns of their
        own, in order (inside the caller's transaction): none is lost when the turn they
        waited for failed or was cancelled."""
        for message in self.store.take_queued(thread, QUEUED_DELIVERIES, None):
            turn_id, created = self.add_turn(thread, message.actor, message.text, message.source_id)
            if created:
                self.release(turn_id, thread)

    def release(self, turn_id: str, thread: str) -> None:
        """Give a held turn its job, in the thread's order."""
        self.store.set_turn_job(turn_id, self.enqueue_turn(turn_id, f"turn:{turn_id}", thread))

    def finish(
        self, turn_id: str, status: str, *, reply: str | None = None, error: str | None = None
    ) -> None:
        with self.transaction():
            self.end(turn_id, status, reply=reply, error=error)

    def resume(self, turn: TurnRow) -> None:
        """Move a turn that waited for approvals back to running (unless cancelled meanwhile)."""
        with self.transaction():
            self.store.move_turn(turn.id, "waiting_approval", "running")

    def answer(self, turn: TurnRow, reply: str) -> None:
        """End a command's turn with its reply, kept out of the model's context."""
        with self.transaction():
            self.add_message(turn.thread_id, turn.id, "assistant", reply, command=True)
            self.end(turn.id, "done", reply=reply)

    def claim_call(self, turn_id: str, call_id: str) -> bool:
        """Move a pending call to running; only one worker ever wins it."""
        with self.transaction():
            return self.store.claim_call(turn_id, call_id)

    def set_call(
        self, turn: Approval | TurnRow, call_id: str, state: str, result: str | None, was: str
    ) -> None:
        """Move a call from state `was` (only) to `state`, with its result (cleaned)."""
        turn_id = turn.turn_id if isinstance(turn, Approval) else turn.id
        self.store.set_call(turn_id, call_id, state, self.clean(turn.thread_id, result), was)

    def set_result(
        self,
        turn: TurnRow,
        call_id: str,
        state: str,
        result: str,
        *,
        was: str,
        made: "ToolFiles | None" = None,
        entries: Entries | None = None,
    ) -> str:
        """Record a call's result if it is still in state `was`, with the files the call
        made stored and sent to the thread and the entries it made, in one transaction;
        the result as stored (naming the files it returned, or why they could not be
        stored)."""
        if made is None or not (made.returned or made.attached):
            with self.transaction(entries):
                self.set_call(turn, call_id, state, result, was)
            return result
        where = {"call_id": call_id, "message_id": made.message_id}
        try:
            with self.transaction(entries):
                returned = self.save_files(
                    turn.thread_id, turn.id, made.returned, origin="result", **where
                )
                attached = self.save_files(
                    turn.thread_id, turn.id, made.attached, origin="tool", **where
                )
                result = "\n".join(
                    filter(None, [result, *(file_note(file_info(a)) for a in returned)])
                )
                self.set_call(turn, call_id, state, result, was)
                self.send_files(turn.thread_id, turn.id, returned + attached)
                return result
        except BadInput as e:
            with self.transaction(entries):
                self.set_call(turn, call_id, "error", f"the files were not sent: {e}", was)
            return f"the files were not sent: {e}"

    def approvals(self, state: str | None, limit: int) -> list[Approval]:
        """The newest `limit` approvals, of one state (or all), for display."""
        if state is not None:
            check_choice("state", state, APPROVAL_STATES)
        return self.store.approvals(state=state, limit=check_int("limit", limit))

    def pending_approvals(self, turn_id: str) -> list[Approval]:
        """Every pending approval of one turn (no display limit), newest first."""
        return self.store.approvals(turn_id=turn_id, state="pending")

    def settle(self, approval: Approval, state: str, actor: str | None, reason: str | None) -> bool:
        """Decide a pending approval (inside the caller's transaction): approved calls become
        pending; denied, expired and cancelled ones get an error result the model reads.
        A turn still waiting gets a resume job. False, and nothing done, if it was decided."""
        reason = self.clean(approval.thread_id, reason)
        if not self.store.settle_approval(approval.id, state, actor, reason):
            return False
        result = {
            "approved": None,
            "denied": f"denied by {actor}" + (f": {reason}" if reason else ""),
            "expired": "not run: nobody approved it before the request expired",
            "cancelled": "not run: the turn was cancelled",
        }[state]
        new = "pending" if state == "approved" else "error"
        self.set_call(approval, approval.call_id, new, result, "waiting")
        data = {"approval": approval.id, "tool": approval.tool, "decision": state, "reason": reason}
        self.add_event("approval_decided", actor, approval, data)
        decided = dataclasses.replace(
            approval,
            state=state,
            decided_by=actor,
            decision_reason=reason,
            decided_at=self.store.now(),
        )
        self.tell_decision(decided)
        if state != "cancelled":
            self.enqueue_turn(approval.turn_id, f"resume:{approval.id}", approval.thread_id)
        return True

    def cancel(self, turn_id: str, *, at_once: bool = False) -> str:
        """Cancel a queued or waiting turn at once (with its pending approvals), or ask a
        running one to stop at its next step (at once when no worker holds its job, as
        after an interrupted process handed it back). `at_once` ends a running turn now
        and cancels its job: the worker running it loses its lease, so it writes nothing
        more, and the thread's next message runs right away."""
        job = dumps({"turn": turn_id})  # the payload of the turn's jobs (enqueue_turn)
        with self.store.transaction():
            turn = self.turn(turn_id)
            if turn.status in FINAL_TURN_STATES:
                raise BadInput(f"{turn_id} is {turn.status} already")
            held = self.store.job_running_with(TURN_TASK, job)
            if turn.status == "running" and held and not at_once:  # it stops at its next step
                self.store.request_cancel(turn_id)
                return "cancelling"
            for approval in self.pending_approvals(turn_id):
                self.settle(approval, "cancelled", None, None)
            # calls left open get a result, so the model always reads one for each call
            self.store.close_calls(turn_id, CANCELLED_RUNNING, "not run: the turn was cancelled")
            self.end(turn_id, "cancelled", error="cancelled")
            self.store.cancel_jobs_with(TURN_TASK, job)
            return "cancelled"

    def holds_messages(self, thread: str, but: str) -> bool:
        """Whether a new message to the thread must wait: an approval is pending there, or
        earlier messages are held (so they keep their order)."""
        return bool(self.waiting_in(thread)) or any(
            held != but for held in self.store.held_turns(thread)
        )

    def waiting_in(self, thread: str) -> list[Approval]:
        """The pending approvals a thread waits for, oldest first."""
        return self.store.approvals(thread=thread, state="pending")[::-1]

    def active_turns(self, thread: str, but: str) -> list[str]:
        return [turn_id for turn_id in self.store.active_turns(thread) if turn_id != but]

    # files

    def save_files(
        self,
        thread: str,
        turn_id: str,
        files: Sequence["File | Attachment"],
        *,
        origin: str = "user",
        call_id: str | None = None,
        message_id: int | None = None,
    ) -> list[Attachment]:
        """Store files in the thread's scope, inside the caller's transaction: a File is
        read (TooLarge over `max_file_bytes`) and saved; an Attachment is an upload of the
        thread that no turn has yet, taken for this one."""
        uploads = [given for given in files if isinstance(given, Attachment)]
        for given in files:
            if not isinstance(given, (File, Attachment)):
                raise BadInput(f"files are agentkit.File objects, not {type(given).__name__}")
        read = [(f, f.read(self.max_file_bytes)) for f in files if isinstance(f, File)]
        saved = []
        for given, data in read:  # every file was within the limit: now they are kept
            attachment = self.files.save(thread, replace(given, data=data, path=None))
            row = FileRow(
                thread, turn_id, message_id, call_id, origin, *dataclasses.astuple(attachment)
            )
            self.store.add_attachment(row)
            saved.append(attachment)
        if self.store.claim_uploads([u.id for u in uploads], thread, turn_id) != len(uploads):
            raise BadInput("a file to send is not an upload of this thread that no message has yet")
        return uploads + saved

    def open_file(self, thread: str, attachment_id: str) -> bytes:
        """The bytes of a file of the thread; NotFound for any other id, or a file of
        another thread."""
        if not isinstance(attachment_id, str) or not ATTACHMENT_ID.fullmatch(attachment_id):
            raise NotFound(f"no file {attachment_id!r} in {thread}")
        if self.store.attachment(attachment_id, thread) is None:
            raise NotFound(f"no file {attachment_id} in {thread}")
        return file_bytes(self.files.open(attachment_id, thread))

    def send_files(self, thread: str, turn_id: str, attachments: Sequence[Attachment]) -> None:
        """Put stored files in the outbox of their thread (inside the caller's transaction)."""
        for attachment in attachments:
            self.deliver(thread, turn_id, "file", attachment.name, file=file_info(attachment))

    # the outbox

    def deliver(
        self,
        thread: str,
        turn_id: str | None,
        kind: str,
        text: str,
        *,
        elsewhere: bool = False,
        **extra: Any,
    ) -> None:
        """Put a message for the thread's adapter in the outbox, inside the caller's
        transaction (a job sends it); nothing when no adapter here serves the thread,
        unless `elsewhere` says a process that has it will send it."""
        name = thread.partition(":")[0]
        outlet = self.outlets.get(name)
        if outlet is None and not elsewhere:
            return
        if outlet is not None and not outlet.accepts(kind, extra.get("meta") or {}):
            return
        if outlet is not None and kind == "reply" and turn_id is not None:
            stream = outlet.streamed(turn_id)
            if stream:
                extra["stream"] = stream
        pull = outlet is not None and outlet.pull
        body = self.clean(thread, {"text": text, **extra})
        rowid = self.store.add_delivery(name, thread, turn_id, kind, body, pull)
        if not pull:
            values = self.queue.job_values(
                DELIVER_TASK, target=f"deliver:{thread}", retries=8, backoff=2.0, strict=False
            )
            self.store.insert_job(values, dumps({"delivery": rowid}), None)

    def ask_approvers(self, approval: Approval) -> None:
        """Send an approval request to its thread and, unless the requester may decide it,
        to every approver an adapter here can reach."""
        targets = [approval.thread_id]
        if not self.may_decide(approval.requester):
            targets += [t for t in self.approver_inboxes if t != approval.thread_id]
        body = {
            "id": approval.id,
            "tool": approval.tool,
            "args": approval.args,
            "reason": approval.reason,
            "requester": approval.requester,
            "thread_id": approval.thread_id,
            "expires_at": approval.expires_at,
        }
        for thread in targets:
            text = approval_text(approval)
            self.deliver(thread, approval.turn_id, "approval", text, approval=body)

    def tell_decision(self, approval: Approval) -> None:
        """Update every message that asked for this approval (an adapter that keeps
        references to its messages edits them: the buttons go, the decision shows), also
        through adapters only the serving process has (the CLI decides without them)."""
        text = approval_text(approval)
        for asked in self.store.approval_requests(approval.turn_id, approval.id):
            self.deliver(
                asked.thread_id,
                approval.turn_id,
                "decided",
                text,
                elsewhere=True,
                updates=asked.id,
            )

    def delivery(self, rowid: int) -> Delivery:
        found = self.store.delivery(rowid)
        if found is None:
            raise NotFound(f"no delivery {rowid}")
        return found

    # reading threads

    def neutral(self, rows: list[MessageRow]) -> list[list[dict[str, Any]]]:
        """Each stored message as the models' neutral messages: a user message, or an
        assistant's text and tool calls followed by their results, files listed under
        "files" (each `id`, `name`, `mime`, `size`)."""
        calls: dict[int, list[CallRow]] = {}
        for call in self.store.calls_of([m.id for m in rows if m.role == "assistant"]):
            calls.setdefault(call.message_id, []).append(call)
        files: dict[tuple[int, str | None], list[dict[str, Any]]] = {}  # by message, call
        for row in self.store.attachments_of([m.id for m in rows]):
            key = (row.message_id or 0, None if row.origin == "tool" else row.call_id)
            files.setdefault(key, []).append(file_info(row.attachment))
        made: list[list[dict[str, Any]]] = []
        for message in rows:
            if message.role == "user":
                messages = [{"role": "user", "content": message.content or ""}]
                if message.origin:  # added by an extension, not said by the user
                    messages[0]["origin"] = message.origin
            else:
                messages = assistant_messages(message.content, calls.get(message.id, []))
            for one in messages:  # a call's results by its id; what tools sent, the reply's
                found = files.get((message.id, one.get("call_id")))
                if found:
                    one["files"] = found
            made.append(messages)
        return made

    def context(self, thread: str, max_messages: int, max_chars: int) -> list[dict[str, Any]]:
        """The newest exchanges of a thread in the models' neutral format, within budget.

        The window starts at a user message, so every tool call keeps its result; the
        newest user message is always kept. A user message that was not the turn's own
        has its `origin` ("extension", "steer" or "follow_up").
        """
        rows = self.store.messages(thread, max_messages)[::-1]
        exchanges: list[list[dict[str, Any]]] = []
        for message, made in zip(rows, self.neutral(rows), strict=True):
            if message.role == "user":
                exchanges.append(made)
            elif exchanges:
                exchanges[-1].extend(made)
        kept: list[list[dict[str, Any]]] = []
        size = 0
        for exchange in reversed(exchanges):
            size += len(dumps(exchange))
            if kept and size > max_chars:
                break
            kept.append(exchange)
        return [message for exchange in reversed(kept) for message in exchange]

    def history(self, thread: str, limit: int) -> list[dict[str, Any]]:
        """A thread's newest messages, tool calls and results included, oldest first."""
        return self.context(thread, limit, sys.maxsize) if limit else []


def assistant_messages(content: str | None, calls: list[CallRow]) -> list[dict[str, Any]]:
    """An assistant message with its tool calls, then one tool message per finished call."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": call.call_id, "name": call.tool, "args": json.loads(call.args)} for call in calls
        ]
    results = [
        {
            "role": "tool",
            "call_id": call.call_id,
            "name": call.tool,
            "content": call.result,
            "is_error": call.state == "error",
        }
        for call in calls
        if call.result is not None
    ]
    return [message, *results]


# ──────────────────── models: OpenAI, Anthropic, echo, scripted, the registry ────────────────────

INVALID_ARGS_KEY = "__invalid_json__"
"""Key of ToolCall.args that holds tool-call arguments which were not a JSON object."""


@dataclass
class ToolCall:
    """A tool call the model asks for (public: agentkit.ToolCall("add", {"a": 1}))."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # the provider's call id; "" when the model gave none


@dataclass
class ModelReply:
    """One answer of a model: final text, tool calls, or both."""

    text: str | None
    tool_calls: list[ToolCall]
    usage: dict[str, int]  # {"input_tokens": n, "output_tokens": n} when reported, else {}


class ModelError(AgentKitError):
    """The model could not be reached or answered something unusable."""


class ContextTooLong(ModelError):
    """The provider refused the request: the conversation is longer than its context window."""


# What providers answer when a request is longer than the model's window: OpenAI, Azure,
# OpenRouter, vLLM and Groq (Chat Completions), Anthropic, llama.cpp's server, Ollama,
# LM Studio, Gemini through its OpenAI endpoint, and the generic codes and phrases.
_OVERFLOW = re.compile(
    "|".join(
        (
            r"context[_ ]length[_ ]exceeded",  # OpenAI's error code
            r"maximum context length is \d+",  # OpenAI, OpenRouter, vLLM
            r"exceeds the context window",  # OpenAI (Responses)
            r"reduce the length of the messages",  # OpenAI, Groq
            r"prompt is too long",  # Anthropic
            r"exceeds? the available context size",  # llama.cpp server
            r"exceed_context_size_error",  # llama.cpp server's error type
            r"prompt too long; exceeded (max )?context length",  # Ollama
            r"input length exceeds the context length",  # Ollama
            r"greater than the context length",  # LM Studio
            r"input token count.*exceeds the maximum",  # Gemini
            r"too many tokens",
            r"token limit exceeded",
        )
    ),
    re.I,
)


def is_context_overflow(text: str) -> bool:
    """Whether a provider's error text says the request was longer than the context window."""
    return _OVERFLOW.search(text) is not None


# Context windows of known models, in tokens, by the start of the model's name (the first
# match counts, so longer names come first); others get DEFAULT_CONTEXT_WINDOW.
KNOWN_CONTEXT_WINDOWS = (
    ("gpt-4.1", 1_047_576),
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-5", 400_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("gpt-3.5-turbo", 16_385),
    ("claude", 200_000),
    ("gemini", 1_048_576),
)
DEFAULT_CONTEXT_WINDOW = 128_000


def context_window_of(model: "Model") -> int:
    """The context window of a model in tokens: its `context_window` attribute when set,
    else the table of known models by name, else DEFAULT_CONTEXT_WINDOW."""
    given = getattr(model, "context_window", None)
    if given is not None:
        return given
    name = getattr(model, "model", None) or model.name.rpartition(":")[2]
    return next(
        (size for prefix, size in KNOWN_CONTEXT_WINDOWS if name.startswith(prefix)),
        DEFAULT_CONTEXT_WINDOW,
    )


def check_window(context_window: int | None) -> int | None:
    """A model's context window given to its constructor: None, or a positive number of tokens."""
    return None if context_window is None else check_int("context_window", context_window, low=1)


def _overflow_or(detail: str, body: str) -> ModelError:
    """The error for a refusal: ContextTooLong when its whole body says so, else ModelError."""
    return ContextTooLong(detail) if is_context_overflow(body) else ModelError(detail)


@runtime_checkable
class Model(Protocol):
    """What the turn engine talks to: neutral messages and tools in, a ModelReply out.

    A model whose `can_stream` is true also takes `on_delta=`, a callable it calls with
    each piece of text as it arrives (the pieces join to the reply's text). A model's
    `attachment_types` (media type patterns like `image/*`) are the files it reads:
    a message with files then has a list of content parts (see FileParts) as content.
    each piece of text as it arrives (the pieces join to the reply's text). A model may
    say its `context_window` in tokens (see `context_window_of`), and raises
    ContextTooLong when its provider refuses a request as too long.
    """

    name: str

    def complete(
        self, instructions: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> ModelReply: ...


Deltas = Callable[[str], None]  # receives each piece of a reply's text as it arrives


def complete_live(
    model: Model,
    instructions: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    on_delta: Deltas,
) -> ModelReply:
    """A model's reply, its text passed to `on_delta` as it arrives when the model can
    stream (its `can_stream` flag), else not at all."""
    if getattr(model, "can_stream", False):
        return model.complete(instructions, messages, tools, on_delta=on_delta)  # type: ignore[call-arg]
    return model.complete(instructions, messages, tools)


class _Replayed:
    """Deltas across attempts: what a retried attempt streams is passed on only past the
    text earlier attempts passed on, and only while it agrees with it."""

    def __init__(self, on_delta: Deltas | None) -> None:
        self.on_delta = on_delta
        self.shown = ""  # all that was passed on
        self.text = ""  # what this attempt streamed while it caught up
        self.caught_up = True  # this attempt went past `shown`, agreeing with it

    def attempt(self) -> "_Replayed":
        self.text, self.caught_up = "", not self.shown
        return self

    def __call__(self, delta: str) -> None:
        if self.on_delta is None:
            return
        if not self.caught_up:
            self.text += delta
            if len(self.text) <= len(self.shown) or not self.text.startswith(self.shown):
                return
            delta, self.caught_up = self.text[len(self.shown) :], True
        self.shown += delta
        self.on_delta(delta)


def _pieces(text: str) -> list[str]:
    """Text cut into word-sized deltas (each word with the spaces after it)."""
    return [piece for piece in re.findall(r"\S*\s*", text) if piece]


_RETRY_AFTER_CAP = 60.0  # seconds; longest wait between two attempts
_SNIPPET_CHARS = 300  # how much of an error body an error message quotes


class _Transient(ModelError):
    """A failure that another attempt may not have: 429, 5xx, network, a cut stream."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _typed(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """value, checked to be of the type a well-formed response has in that place."""
    if not isinstance(value, kind):
        raise ModelError(f"malformed response: {what} is a {type(value).__name__}")
    return value


def _parse_args(raw: Any) -> dict[str, Any]:
    """Tool-call arguments from their JSON text; text that is no JSON object is kept under
    INVALID_ARGS_KEY so the engine can tell the model."""
    text = _typed(raw, str, "tool-call arguments")
    if not text.strip():
        return {}
    try:
        args = json.loads(text)
    except ValueError:
        args = None
    return args if isinstance(args, dict) else {INVALID_ARGS_KEY: text}


def _snippet(text: str) -> str:
    """The start of an error body, on one line."""
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."


def _retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (capped), or None when absent or not a number."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def _iter_sse(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event name, data) of each server-sent event; an unfinished last event is dropped."""
    event, data = "", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                event = value
            elif key == "data":
                data.append(value)


def _event_json(data: str) -> Any:
    """The JSON in a server-sent event's data."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ModelError(f"event data in the stream is not JSON: {_snippet(data)}") from exc


def _describe(exc: Exception) -> str:
    """An exception's type and message, for error messages."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a neutral message's content (a text, or content parts)."""
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content if part["type"] == "text")
    return content or ""


def _data_url(part: dict[str, Any]) -> str:
    return f"data:{part['mime']};base64,{part['data']}"


def _bad_role(message: dict[str, Any]) -> BadInput:
    return BadInput(f"unknown message role {message.get('role')!r}: use user, assistant or tool")


class _HTTPModel(ABC):
    """What the HTTP providers share: the POST, retries with backoff, errors, redaction."""

    backoff_base = 0.5  # seconds before the first retry, doubled for each further one

    def __init__(
        self,
        name: str,
        url: str,
        headers: dict[str, str],
        *,
        api_key: str | None,
        stream: bool,
        timeout: float,
        max_retries: int,
        client: httpx.Client | None,
        context_window: int | None,
    ) -> None:
        self.name = name
        self.context_window = check_window(context_window)
        self.stream = stream
        self.timeout = timeout
        self.max_retries = max_retries
        self._url = url
        self._headers = headers
        self._api_key = api_key
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client()

    @property
    def can_stream(self) -> bool:
        """Whether replies stream (`stream=True`): then `on_delta` hears their text."""
        return self.stream

    def close(self) -> None:
        """Close the HTTP client, unless it was passed in."""
        if self._owns_client:
            self._client.close()

    def complete(
        self,
        instructions: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        on_delta: Deltas | None = None,
    ) -> ModelReply:
        """Ask the model for its next reply (its text to `on_delta` as it streams in);
        ModelError when it cannot be had."""
        body = self._request_body(instructions, messages, tools)
        try:
            return self._post_with_retries(body, _Replayed(on_delta))
        except ModelError as exc:
            message = f"{self.name}: {exc}"
            if self._api_key:
                message = message.replace(self._api_key, "[redacted]")
            kind = ContextTooLong if isinstance(exc, ContextTooLong) else ModelError
            raise kind(message) from exc.__cause__

    def _post_with_retries(self, body: dict[str, Any], on_delta: _Replayed) -> ModelReply:
        attempt = 0
        while True:
            try:
                return self._attempt(body, on_delta.attempt())
            except _Transient as exc:
                if attempt >= self.max_retries:
                    message = f"{exc} (gave up after {attempt + 1} attempts)"
                    raise ModelError(message) from exc.__cause__
                time.sleep(self._delay(attempt, exc.retry_after))
                attempt += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        backoff = self.backoff_base * 2**attempt * random.uniform(1.0, 1.25)
        return min(backoff, _RETRY_AFTER_CAP)

    def _attempt(self, body: dict[str, Any], on_delta: Deltas) -> ModelReply:
        try:
            with self._client.stream(
                "POST", self._url, json=body, headers=self._headers, timeout=self.timeout
            ) as response:
                if not response.is_success:
                    response.read()
                    detail = f"HTTP {response.status_code}: {_snippet(response.text)}"
                    if response.status_code == 429 or 500 <= response.status_code <= 599:
                        raise _Transient(detail, _retry_after(response))
                    raise _overflow_or(detail, response.text)
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    return self._parse_events(_iter_sse(response), on_delta)
                response.read()
                try:
                    data = response.json()
                except ValueError as exc:
                    raise ModelError(f"the answer is not JSON: {_snippet(response.text)}") from exc
                return self._parse_json(data)
        except httpx.TimeoutException as exc:
            raise _Transient(f"no answer from {self._url} within {self.timeout:g} s") from exc
        except httpx.TransportError as exc:
            raise _Transient(f"connection to {self._url} failed ({_describe(exc)})") from exc
        except httpx.HTTPError as exc:
            raise ModelError(f"HTTP error ({_describe(exc)})") from exc
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise ModelError(f"answer of unexpected shape ({_describe(exc)})") from exc

    @abstractmethod
    def _request_body(
        self, instructions: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The provider's request body for a neutral conversation."""

    @abstractmethod
    def _parse_json(self, data: Any) -> ModelReply:
        """The reply in a non-streamed response body."""

    @abstractmethod
    def _parse_events(self, events: Iterator[tuple[str, str]], on_delta: Deltas) -> ModelReply:
        """The reply assembled from a stream of server-sent events, its text told to
        `on_delta` piece by piece."""


class OpenAIModel(_HTTPModel):
    """OpenAI Chat Completions, and servers that speak it (Ollama, llama.cpp, vLLM, LM Studio)."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        stream: bool = True,
        timeout: float = 120.0,
        max_retries: int = 3,
        client: httpx.Client | None = None,
        attachment_types: Sequence[str] | None = None,
        context_window: int | None = None,
    ) -> None:
        key = os.environ.get("OPENAI_API_KEY") if api_key is None else api_key
        base = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        if attachment_types is None:  # PDFs as `file` parts only where OpenAI itself serves
            official = urllib.parse.urlsplit(base).hostname == "api.openai.com"
            attachment_types = (*IMAGE_TYPES, *(["application/pdf"] if official else []))
        self.attachment_types = tuple(attachment_types)
        super().__init__(
            f"openai:{model}",
            f"{base.rstrip('/')}/chat/completions",
            {"Authorization": f"Bearer {key}"} if key else {},
            api_key=key,
            stream=stream,
            timeout=timeout,
            max_retries=max_retries,
            client=client,
            context_window=context_window,
        )
        self.model = model

    def _request_body(
        self, instructions: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": _openai_messages(instructions, messages),
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool["name"],
                        "description": tool.get("description", ""),
                        "parameters": tool.get("parameters", {"type": "object"}),
                    },
                }
                for tool in tools
            ]
        return body

    def _parse_json(self, data: Any) -> ModelReply:
        message = data["choices"][0]["message"]
        return ModelReply(
            _typed(message.get("content"), (str, type(None)), "content") or None,
            [_openai_tool_call(call) for call in message.get("tool_calls") or []],
            _openai_usage(data.get("usage")),
        )

    def _parse_events(self, events: Iterator[tuple[str, str]], on_delta: Deltas) -> ModelReply:
        text: list[str] = []
        calls: dict[int, dict[str, Any]] = {}  # by index: {"id", "function": {"name", "arguments"}}
        usage: dict[str, int] = {}
        for _, data in events:
            if data == "[DONE]":
                return ModelReply(
                    "".join(text) or None,
                    [_openai_tool_call(calls[index]) for index in sorted(calls)],
                    usage,
                )
            chunk = _event_json(data)
            if "error" in chunk:
                error = json.dumps(chunk["error"])
                raise _overflow_or(f"error in stream: {_snippet(error)}", error)
            if chunk.get("usage"):
                usage = _openai_usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text.append(_typed(delta.get("content") or "", str, "content"))
                if text[-1]:
                    on_delta(text[-1])
                for position, part in enumerate(delta.get("tool_calls") or []):
                    call = calls.setdefault(
                        part.get("index", position),
                        {"id": "", "function": {"name": "", "arguments": ""}},
                    )
                    function = part.get("function") or {}
                    call["id"] = call["id"] or part.get("id") or ""
                    call["function"]["name"] = (
                        call["function"]["name"] or function.get("name") or ""
                    )
                    call["function"]["arguments"] += function.get("arguments") or ""
        raise _Transient("the stream ended before data: [DONE]")


def _openai_part(part: dict[str, Any]) -> dict[str, Any]:
    """A neutral content part as a Chat Completions one (a data URL for a file)."""
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    if part["type"] == "image":
        return {"type": "image_url", "image_url": {"url": _data_url(part)}}
    return {"type": "file", "file": {"filename": part["name"], "file_data": _data_url(part)}}


def _openai_messages(instructions: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neutral messages as Chat Completions messages, instructions first as system message.
    Files a tool returned follow the tool results as a user message (a tool message
    holds only text)."""
    out: list[dict[str, Any]] = (
        [{"role": "system", "content": instructions}] if instructions else []
    )
    shown: list[dict[str, Any]] = []  # files of tool results, for after the results
    for message in messages:
        role = message.get("role")
        if shown and role != "tool":
            out.append({"role": "user", "content": shown})
            shown = []
        content = message.get("content")
        if role == "user":
            parts = [_openai_part(p) for p in content] if isinstance(content, list) else content
            out.append({"role": "user", "content": parts})
        elif role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
            if message.get("tool_calls"):
                turn["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": json.dumps(call["args"])},
                    }
                    for call in message["tool_calls"]
                ]
            out.append(turn)
        elif role == "tool":
            # Chat Completions has no error flag for tool results: the content says it.
            text = content_text(content)
            text = f"Error: {text}" if message.get("is_error") else text
            out.append({"role": "tool", "tool_call_id": message["call_id"], "content": text})
            if isinstance(content, list) and len(content) > 1:
                shown.append(_tool_files_text(message))
                shown += [_openai_part(p) for p in content if p["type"] != "text"]
        else:
            raise _bad_role(message)
    if shown:
        out.append({"role": "user", "content": shown})
    return out


def _tool_files_text(message: dict[str, Any]) -> dict[str, Any]:
    return {"type": "text", "text": f"The files {message.get('name')} returned:"}


def _openai_tool_call(call: dict[str, Any]) -> ToolCall:
    function = call["function"]
    return ToolCall(
        _typed(function["name"], str, "tool name"),
        _parse_args(function.get("arguments") or ""),
        _typed(call.get("id") or "", str, "tool call id"),
    )


def _openai_usage(usage: Any) -> dict[str, int]:
    if not usage:
        return {}
    return {
        "input_tokens": int(usage["prompt_tokens"]),
        "output_tokens": int(usage["completion_tokens"]),
    }


class AnthropicModel(_HTTPModel):
    """Anthropic's Messages API."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        stream: bool = True,
        max_tokens: int = 4096,
        timeout: float = 120.0,
        max_retries: int = 3,
        client: httpx.Client | None = None,
        attachment_types: Sequence[str] = (*IMAGE_TYPES, "application/pdf"),
        context_window: int | None = None,
    ) -> None:
        self.attachment_types = tuple(attachment_types)
        key = os.environ.get("ANTHROPIC_API_KEY") if api_key is None else api_key
        base = base_url or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
        headers = {"anthropic-version": "2023-06-01"}
        if key:
            headers["x-api-key"] = key
        super().__init__(
            f"anthropic:{model}",
            f"{base.rstrip('/')}/v1/messages",
            headers,
            api_key=key,
            stream=stream,
            timeout=timeout,
            max_retries=max_retries,
            client=client,
            context_window=context_window,
        )
        self.model = model
        self.max_tokens = max_tokens

    def _request_body(
        self, instructions: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": _anthropic_messages(messages),
            "stream": self.stream,
        }
        if instructions:
            body["system"] = instructions
        if tools:
            body["tools"] = [
                {
                    "name": tool["name"],
                    "description": tool.get("description", ""),
                    "input_schema": tool.get("parameters", {"type": "object"}),
                }
                for tool in tools
            ]
        return body

    def _parse_json(self, data: Any) -> ModelReply:
        usage = data.get("usage")
        return _anthropic_reply(data["content"], _anthropic_usage(usage) if usage else {})

    def _parse_events(self, events: Iterator[tuple[str, str]], on_delta: Deltas) -> ModelReply:
        blocks: dict[int, dict[str, Any]] = {}  # content blocks by index, as they grow
        partial_json: dict[int, str] = {}  # tool inputs by block index, as they grow
        usage: dict[str, int] = {}
        for _, data in events:
            event = _event_json(data)
            kind = event["type"]
            if kind == "message_start":
                usage = _anthropic_usage(event["message"].get("usage") or {})
            elif kind == "content_block_start":
                blocks[event["index"]] = dict(event["content_block"])
            elif kind == "content_block_delta":
                index, delta = event["index"], event["delta"]
                if delta["type"] == "text_delta":
                    blocks[index]["text"] += _typed(delta["text"], str, "text")
                    if delta["text"]:
                        on_delta(delta["text"])
                elif delta["type"] == "input_json_delta":
                    partial_json[index] = partial_json.get(index, "") + delta["partial_json"]
            elif kind == "message_delta" and (event.get("usage") or {}).get("output_tokens"):
                usage["output_tokens"] = int(event["usage"]["output_tokens"])
            elif kind == "message_stop":
                for index, text in partial_json.items():
                    if text:
                        blocks[index]["input"] = _parse_args(text)
                return _anthropic_reply([blocks[index] for index in sorted(blocks)], usage)
            elif kind == "error":
                error = event.get("error") or {}
                detail = f"error in stream: {_snippet(json.dumps(error))}"
                if error.get("type") in ("overloaded_error", "api_error"):
                    raise _Transient(detail)
                raise _overflow_or(detail, json.dumps(error))
        raise _Transient("the stream ended before message_stop")


def _anthropic_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neutral messages as Messages API turns; consecutive turns of one role are merged, so
    the results of parallel tool calls travel together in one user turn."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        blocks: list[dict[str, Any]] = []
        if role in ("user", "assistant"):
            blocks += _anthropic_blocks(message.get("content"))
        if role == "assistant":
            blocks += [
                {"type": "tool_use", "id": call["id"], "name": call["name"], "input": call["args"]}
                for call in message.get("tool_calls") or []
            ]
        elif role == "tool":
            content = message["content"]
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": message["call_id"],
                    "content": _anthropic_blocks(content) if isinstance(content, list) else content,
                    "is_error": bool(message.get("is_error")),
                }
            )
            role = "user"
        elif role != "user":
            raise _bad_role(message)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"] += blocks
        else:
            out.append({"role": role, "content": blocks})
    return out


def _anthropic_blocks(content: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A neutral message's content as Messages API blocks (files as base64 sources);
    empty texts are left out."""
    if not isinstance(content, list):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if part["type"] == "text":
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
            continue
        source = {"type": "base64", "media_type": part["mime"], "data": part["data"]}
        blocks.append({"type": part["type"], "source": source})
    return blocks


def _anthropic_reply(content: list[dict[str, Any]], usage: dict[str, int]) -> ModelReply:
    """The reply in a Messages API content list; block types other than text and tool_use
    (thinking, for one) are skipped."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in content:
        if block["type"] == "text":
            texts.append(_typed(block["text"], str, "text"))
        elif block["type"] == "tool_use":
            calls.append(
                ToolCall(
                    _typed(block["name"], str, "tool name"),
                    _typed(block["input"], dict, "tool input"),
                    _typed(block.get("id") or "", str, "tool call id"),
                )
            )
    return ModelReply("".join(texts) or None, calls, usage)


def _anthropic_usage(usage: dict[str, Any]) -> dict[str, int]:
    kinds = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return {
        "input_tokens": sum(int(usage.get(kind) or 0) for kind in kinds),
        "output_tokens": int(usage.get("output_tokens") or 0),
    }


def _streamed(reply: ModelReply, on_delta: Deltas | None) -> ModelReply:
    """reply, its text first told to `on_delta` word by word (the offline models stream)."""
    if on_delta is not None:
        for piece in _pieces(reply.text or ""):
            on_delta(piece)
    return reply


class EchoModel:
    """Offline model that repeats the last user message; for demos and smoke tests."""

    name = "echo"
    can_stream = True

    def complete(
        self,
        instructions: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        on_delta: Deltas | None = None,
    ) -> ModelReply:
        """'echo: <last user message>', or the content of a trailing tool result."""
        if messages and messages[-1].get("role") == "tool":
            return _streamed(ModelReply(content_text(messages[-1]["content"]), [], {}), on_delta)
        said = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        said = content_text(said)
        return _streamed(ModelReply(f"echo: {said}", [], {}), on_delta)


ScriptStep = (
    str
    | ToolCall
    | list[ToolCall]
    | Callable[[list[dict[str, Any]], list[dict[str, Any]]], "str | ToolCall | list[ToolCall]"]
)


class ScriptedModel:
    """A model that plays a script, for tests and offline demos.

    Each complete() consumes the next step: a final text, one ToolCall, a list of ToolCalls
    made together, or a callable (messages, tools) -> one of those. A text streams word by
    word to `on_delta`. `context_window` is the window compaction plans for.
    """

    name = "scripted"
    can_stream = True

    def __init__(
        self,
        steps: list[ScriptStep],
        *,
        attachment_types: Sequence[str] = ("image/*",),
        context_window: int | None = None,
    ) -> None:
        self.attachment_types = tuple(attachment_types)
        for step in steps:
            if not callable(step):
                _check_step(step)
        self.context_window = check_window(context_window)
        self._steps = list(steps)
        self._lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self.calls: list[list[dict[str, Any]]] = []  # the messages of each complete()

    def complete(
        self,
        instructions: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        on_delta: Deltas | None = None,
    ) -> ModelReply:
        """The next step as a reply; ModelError when the script is used up."""
        with self._lock:
            self.calls.append(copy.deepcopy(messages))
            if not self._steps:
                raise ModelError("scripted model has no step left")
            step = self._steps.pop(0)
            if callable(step):
                step = _check_step(step(messages, tools))
            if isinstance(step, str):
                reply = ModelReply(step, [], {})
            else:
                calls = [step] if isinstance(step, ToolCall) else step
                reply = ModelReply(
                    None,
                    [
                        replace(
                            call, args=dict(call.args), id=call.id or f"call_{next(self._call_ids)}"
                        )
                        for call in calls
                    ],
                    {},
                )
        return _streamed(reply, on_delta)


def _check_step(step: Any) -> Any:
    """step, if it is a text, a ToolCall or a non-empty list of ToolCalls; else BadInput."""
    if isinstance(step, (str, ToolCall)) or (
        isinstance(step, list) and step and all(isinstance(call, ToolCall) for call in step)
    ):
        return step
    raise BadInput(
        f"a script step must be a str, a ToolCall, a non-empty list of ToolCalls or a callable "
        f"returning one of those, not {step!r}"
    )


def _default_spec() -> str:
    """The model to use when none is named: the provider whose API key is set, else echo."""
    if os.environ.get("OPENAI_API_KEY"):
        return "openai:gpt-4o-mini"
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic:claude-sonnet-4-5"
    return "echo"


MODEL_PREFIX = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


class ModelProviders:
    """Model specs by provider prefix: `"<prefix>:<model>"` (or a bare prefix, for a provider
    that takes no model name, like "echo") made by the prefix's factory when a spec is
    resolved, so a provider costs nothing until a spec names it. The built-in specs are
    registered like any other; a kit copies them and adds its own (`register_model`)."""

    def __init__(self, factories: dict[str, tuple[Callable[[str], Model], bool]] | None = None):
        self.factories = dict(factories or {})  # prefix -> (factory, takes a model name)

    def register(self, prefix: str, factory: Callable[[str], Model], *, named: bool = True) -> None:
        """Make `"<prefix>:<model>"` resolve to `factory("<model>")` (a bare `prefix` to
        `factory("")` when not `named`); a later registration of a prefix replaces it."""
        if not isinstance(prefix, str) or not MODEL_PREFIX.fullmatch(prefix):
            raise BadInput(
                f"a model prefix is 1-32 of a-z, 0-9, '_', '.' and '-', starting with a "
                f"letter, not {prefix!r}"
            )
        if not callable(factory):
            raise BadInput(f"the factory of model prefix {prefix!r} must be callable")
        self.factories[prefix] = (factory, named)

    def copy(self) -> "ModelProviders":
        return ModelProviders(self.factories)

    def make(self, spec: str | Model | None) -> Model:
        """The model a spec names: a Model object as is, a registered spec; None takes
        AGENTKIT_MODEL, else the provider whose API key is set, else echo."""
        if spec is None:
            spec = os.environ.get("AGENTKIT_MODEL") or _default_spec()
        if not isinstance(spec, str):
            if isinstance(spec, Model):
                return spec
            raise BadInput(f"not a model: {spec!r} has no name and complete()")
        prefix, colon, name = spec.strip().partition(":")
        factory, named = self.factories.get(prefix, (None, True))
        if factory is None or named != bool(name) or (colon and not named):
            raise BadInput(f"unknown model {spec!r}: use {self.known()} or a Model object")
        made = factory(name)
        if not isinstance(made, Model):
            raise BadInput(f"the factory of {prefix!r} made {made!r}, which is not a Model")
        return made

    def known(self) -> str:
        """The registered specs, for error messages: 'echo', 'openai:<model>', …"""
        return ", ".join(
            repr(prefix if not named else f"{prefix}:<model>")
            for prefix, (_, named) in self.factories.items()
        )


MODELS = ModelProviders()
"""The built-in model providers, which every kit starts from."""
MODELS.register("echo", lambda name: EchoModel(), named=False)
MODELS.register("openai", lambda name: OpenAIModel(name))
MODELS.register("anthropic", lambda name: AnthropicModel(name))


def model_from_spec(spec: str | Model | None) -> Model:
    """The model a spec of the built-in providers names (see ModelProviders.make)."""
    return MODELS.make(spec)


# ─────────────────────────────────── tools and hooks ───────────────────────────────────

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
EVENTS = (
    "before_turn",
    "message_received",
    "turn_start",
    "model_request",
    "tool_call",
    "tool_result",
    "approval_requested",
    "approval_decided",
    "turn_end",
    "job_failed",
    "reply_delta",
    "tool_progress",
    "before_compact",
    "compacted",
)


class ToolContext:
    """What a tool (or a command) can ask about the turn it runs in.

    Declare a parameter annotated `ToolContext` to receive it; the model never sees it.
    """

    def __init__(
        self,
        *,
        thread_id: str,
        turn_id: str,
        actor: str,
        call_id: str | None,
        root: Path,
        runtime: Callable[[], Any] | None = None,
        on_progress: Callable[[str], None] | None = None,
        files: Callable[[], list[Attachment]] = list,
        open_file: Callable[[str], bytes] | None = None,
        entries: Entries | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        secrets: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.thread_id = thread_id
        self.turn_id = turn_id
        self.actor = actor
        self.call_id = call_id
        self.entries = Entries(thread_id, turn_id) if entries is None else entries
        self._root = root
        self._runtime = runtime
        self._on_progress = on_progress
        self._files = files
        self._open_file = open_file
        self._is_cancelled = is_cancelled
        self.attached: list[File] = []  # stored and sent with the call's result
        # the thread's saved secrets by name (the kit's: sealed in the database; by default
        # the `.secrets` files of the thread's folder under `root`)
        self._secrets = secrets or functools.partial(saved_secrets, secrets_folder(root, thread_id))

    @property
    def files(self) -> list[Attachment]:
        """The files of this turn's messages (those the user sent, and those made so far)."""
        return self._files()

    def open(self, attachment_id: str) -> bytes:
        """The bytes of a file of this thread (NotFound for a file of any other thread)."""
        if self._open_file is None:
            raise NotFound(f"no file {attachment_id!r} here")
        return self._open_file(attachment_id)

    def attach(self, file: File) -> None:
        """Send a file to the thread with this call's result (once, through the outbox)."""
        if not isinstance(file, File):
            raise BadInput(f"attach takes an agentkit.File, not {type(file).__name__}")
        self.attached.append(file)

    def cancelled(self) -> bool:
        """Whether the turn was cancelled (`/cancel`) while this call runs: a long tool
        may check it and stop early."""
        return self._is_cancelled is not None and self._is_cancelled()

    @property
    def runtime(self) -> "Runtime":
        """The runtime of this call's scope (AgentKit's `runtime` and `runtime_scope`),
        where the workspace tools work too."""
        if self._runtime is None:
            raise RuntimeUnavailable("no runtime is configured for this context")
        return self._runtime()

    def progress(self, text: str) -> None:
        """Tell whoever watches the turn how this call is going (a live event, not stored;
        nothing outside a tool call)."""
        if not isinstance(text, str):
            raise BadInput(f"progress is a text, not {type(text).__name__}")
        if self._on_progress is not None:
            self._on_progress(text)

    @property
    def workspace(self) -> Path:
        """This thread's own folder (created on first use, mode 0700)."""
        path = self._root / workspace_name(self.thread_id)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def secret(self, name: str) -> str:
        """A secret the user gave this thread through a secret request (KeyError if none)."""
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            raise BadInput(f"a secret name is a plain identifier, not {name!r}")
        value = self._secrets().get(name)
        if value is None:
            raise KeyError(f"no secret {name!r} in this conversation; ask with secret_request")
        redactions.add(value, name)
        return value


FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _escaped(thread: str) -> str:
    """A thread id percent-escaped (`.` first too): only `A-Za-z0-9_.~-` and `%XX` remain."""
    name = urllib.parse.quote(thread, safe="")
    return "%2E" + name[1:] if name.startswith(".") else name


def _digest(thread: str) -> str:
    return hashlib.sha256(thread.encode()).hexdigest()[:32]


def workspace_name(thread: str) -> str:
    """A folder name for a thread id, one per id: escaped, never a path of its own; a long
    one is cut and hashed behind a `+`, which no escaped id holds."""
    name = _escaped(thread)
    return name[:60] + "+" + _digest(thread) if len(name) > 100 else name


OLD_HASHED_NAME = re.compile(r"[A-Za-z0-9_.~%-]{60}-[0-9a-f]{32}")


def move_old_workspaces(root: Path, store: Store) -> None:
    """Rename the folders of long thread ids named before `+` (`<60 chars>-<32 hex>`, a
    name a short id could spell too) when the database says whose they are: the long
    thread exists and the short id of the same name does not. Others stay, with a warning."""
    if not root.is_dir():
        return
    for entry in os.scandir(root):
        if not OLD_HASHED_NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        cut = re.sub(r"%[0-9A-F]?$", "", entry.name[:60])  # no escape cut in half
        prefix = urllib.parse.unquote_to_bytes(cut).decode("utf-8", "ignore")
        names = {t: workspace_name(t) for t in store.thread_ids(prefix)}
        owners = [t for t, name in names.items() if name.replace("+", "-") == entry.name != name]
        if not owners:
            continue
        owner, spelled = owners[0], urllib.parse.unquote(entry.name)
        target = root / workspace_name(owner)
        if spelled in store.thread_ids(spelled):
            log.warning(
                "workspace %s was shared by %s and %s (the old naming): it stays the folder "
                "of %s; move %s's files (its .secrets) to %s by hand",
                entry.path,
                owner,
                spelled,
                spelled,
                owner,
                target,
            )
            continue
        if target.exists():
            log.warning(
                "%s has two workspaces: merge %s into %s by hand", owner, entry.path, target
            )
            continue
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(entry.path, target)
        log.info("workspace of %s moved to %s (the new naming)", owner, target)


def secrets_folder(root: Path, thread: str) -> Path:
    """Where a thread's secrets live: `.secrets` in its workspace."""
    return root / workspace_name(thread) / ".secrets"


def _open_folder(folder: Path, *, create: bool) -> int | None:
    """A descriptor of `folder` that refuses symlinks (None when it is missing)."""
    if create:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    if create:
        os.fchmod(fd, 0o700)
    return fd


def read_secret(folder: Path, name: str) -> str | None:
    """A saved secret's value, or None; symlinks are refused."""
    folder_fd = _open_folder(folder, create=False)
    if folder_fd is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder_fd)
    except FileNotFoundError:
        return None
    finally:
        os.close(folder_fd)
    with os.fdopen(fd, encoding="utf-8") as f:
        return f.read()


def write_secret(folder: Path, name: str, value: str) -> None:
    """Save a secret as `folder/name` (mode 0600, folder 0700): written to a temporary file
    opened with O_EXCL and O_NOFOLLOW, then renamed over the old one."""
    folder_fd = _open_folder(folder, create=True)
    assert folder_fd is not None
    temporary = f".{name}.{os.urandom(6).hex()}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with os.fdopen(os.open(temporary, flags, 0o600, dir_fd=folder_fd), "w") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=folder_fd)
        os.close(folder_fd)


def saved_secrets(folder: Path) -> dict[str, str]:
    """Every secret saved in `folder`, by name."""
    try:
        names = [n for n in os.listdir(folder) if FIELD_NAME.fullmatch(n)]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    values = {name: read_secret(folder, name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class Block:
    """Returned by a `tool_call` hook: the call does not run, and the model is told why."""

    reason: str


class Event(types.SimpleNamespace):
    """What a hook receives: `kind` plus the event's fields (thread_id, turn_id, tool, …)."""

    kind: str


class Tool:
    """A function the model may call, with a JSON schema built from its type hints."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        idempotent: bool = False,
        timeout: float | None = None,
        approval: bool | Callable[[dict[str, Any], ToolContext], bool | str] = False,
    ) -> None:
        self.fn = fn
        self.approval = approval
        self.name = name or callable_name(fn)
        if not TOOL_NAME.fullmatch(self.name):
            raise BadInput(f"a tool name is 1-64 letters, digits, '_' or '-', not {self.name!r}")
        self.description = description or inspect.getdoc(unpartial(fn)) or self.name
        self.idempotent = idempotent
        self.timeout = None if timeout is None else check_seconds("timeout", timeout, positive=True)
        self.is_async = inspect.iscoroutinefunction(fn)
        hints = typing.get_type_hints(unpartial(fn), include_extras=True)
        self.ctx_param: str | None = None
        fields: dict[str, Any] = {}
        for param in inspect.signature(fn).parameters.values():
            hint = hints.get(param.name, Any)
            if hint is ToolContext:
                self.ctx_param = param.name
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise BadInput(f"tool {self.name!r}: *args and **kwargs cannot be described")
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (hint, default)
        self.arguments = pydantic.create_model(f"{self.name}_arguments", **fields)
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        self.schema = schema

    def needs_approval(self, args: dict[str, Any], ctx: ToolContext) -> tuple[bool, str | None]:
        """Whether this call must be approved first, and the reason shown to approvers."""
        verdict = self.approval(args, ctx) if callable(self.approval) else self.approval
        if isinstance(verdict, str):
            return True, verdict
        return bool(verdict), None

    def spec(self) -> dict[str, Any]:
        """The tool as models see it: name, description and parameters."""
        return {"name": self.name, "description": self.description, "parameters": self.schema}

    def bind(self, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        """Validated keyword arguments for the function (pydantic.ValidationError if not)."""
        if INVALID_ARGS_KEY in args:
            raise ValueError(f"the arguments are not a JSON object: {args[INVALID_ARGS_KEY]}")
        values = self.arguments.model_validate(args)
        kwargs = {name: getattr(values, name) for name in type(values).model_fields}
        if self.ctx_param:
            kwargs[self.ctx_param] = ctx
        return kwargs


def as_text(value: Any) -> str:
    """A tool's result for the model: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return pydantic_core.to_json(value, fallback=str).decode()


def describe_error(e: BaseException) -> str:
    """A short error text a model can act on."""
    if isinstance(e, pydantic.ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors()
        )
        return f"invalid arguments: {problems}"
    if isinstance(e, ToolFailed):
        return str(e)
    return f"{type(e).__name__}: {e}"


class Hooks:
    """Callbacks by event name, called in the order they were registered."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Callable[[Event], Any]]] = {kind: [] for kind in EVENTS}

    def add(self, kind: str, fn: Callable[[Event], Any]) -> None:
        self.handlers[kind].append(fn)

    def emit(self, kind: str, **fields: Any) -> list[Any]:
        """Call every handler of `kind`; their return values (HookFailed if one raises)."""
        event = Event(kind=kind, **fields)
        return [self._call(kind, fn, event) for fn in self.handlers[kind]]

    def chain(self, kind: str, key: str, value: list[Any], **fields: Any) -> list[Any]:
        """Call every handler of `kind` in order, each with a deep copy of `value` as
        `event.<key>`; a list one returns is what the next one gets. The last list."""
        for fn in self.handlers[kind]:
            event = Event(kind=kind, **fields, **{key: copy.deepcopy(value)})
            changed = self._call(kind, fn, event)
            if isinstance(changed, list):
                value = changed
        return value

    @staticmethod
    def _call(kind: str, fn: Callable[[Event], Any], event: Event) -> Any:
        try:
            return call_sync(fn, event)
        except Exception as e:
            hook = callable_name(fn)
            log.exception("hook %s for %s raised", hook, kind)
            raise HookFailed(f"the {kind} hook {hook} raised {describe_error(e)}") from e


# ─────────────────────────────── MCP servers as tool sources ───────────────────────────────
# The client side of the Model Context Protocol (JSON-RPC 2.0 over stdio or Streamable
# HTTP, with the stdlib and httpx): one connection per server per process, its tools Tools.

# newest first: initialize offers the first, and takes any of them as the server's counter
MCP_PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
MCP_ENVIRONMENT = ("PATH", "HOME", "LANG")  # all a stdio server inherits
MCP_RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds after 1, 2, ... failed starts
# the names of `env` values that are credentials (every `headers` value is taken as one)
MCP_CREDENTIAL = re.compile(r"(?i)key|token|secret|passw|auth|cookie|credential|dsn")
MCP_MAX_PAGES = 100
MCP_START_TIMEOUT = 60.0  # seconds for initialize and each tools/list page (`timeout` is per call)
_MCP_POLL = 0.25  # seconds between checks of a call's turn for a cancel


class McpError(AgentKitError):
    """An MCP server could not be started or reached, or answered with a JSON-RPC error."""


class _McpSessionGone(McpError):
    """The HTTP server forgot the session (404): initialise again and send the request anew."""


def mcp_image(item: dict[str, Any], number: int) -> "File | str":
    """An image of a tool result as a File the model sees and the user gets; a text
    saying so when its data is not base64."""
    mime = str(item.get("mimeType") or "image/png")
    try:
        data = base64.b64decode(item.get("data") or "", validate=True)
    except ValueError:
        return f"[image: {mime}, data that is not base64]"
    extension = mimetypes.guess_extension(mime) or ""
    return File(f"image-{number}{extension}", data, mime=mime)


def mcp_result(result: dict[str, Any]) -> list[str | File]:
    """A `tools/call` result as a tool's value: text content as it stands, images as
    Files, and `structuredContent` as JSON unless the text already says it."""
    parts: list[str] = []
    images: list[File] = []
    for item in result.get("content") or []:
        kind = item.get("type")
        if kind == "text":
            parts.append(item.get("text") or "")
        elif kind == "image":
            image = mcp_image(item, len(images) + 1)
            if isinstance(image, File):
                images.append(image)
            else:
                parts.append(image)
        elif kind == "resource" and "text" in (item.get("resource") or {}):
            parts.append(item["resource"]["text"])
        else:
            where = item.get("uri") or (item.get("resource") or {}).get("uri") or ""
            parts.append(f"[{kind} {where}]".replace(" ]", "]"))
    text = "\n".join(parts)
    structured = result.get("structuredContent")
    if structured is not None:
        try:
            said = json.loads(text)
        except ValueError:
            said = text
        if structured not in (said, {"result": said}):  # the SDKs wrap a plain value
            text = "\n".join(filter(None, [text, as_text(structured)]))
    return [text, *images] if text or not images else images


class _McpConnection(ABC):
    """One session with an MCP server: JSON-RPC requests matched to their answers, the
    server's own requests and notifications answered; a transport below carries them."""

    def __init__(self, server: str, on_tools_changed: Callable[[], None]) -> None:
        self.server = server
        self.on_tools_changed = on_tools_changed
        self.protocol: str | None = None  # negotiated by initialize
        self.info: dict[str, Any] = {}  # the server's name and version
        self.alive = True
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._guard = threading.Lock()

    @abstractmethod
    def _send(self, message: dict[str, Any], *, request: bool) -> None:
        """Put one message on the wire (a request's answer comes back through `deliver`)."""

    @abstractmethod
    def close(self) -> None:
        """End the session and free what it holds."""

    def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        timeout: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """The result of a request; on a timeout or a cancel the server is told
        (`notifications/cancelled`) and ToolFailed says which."""
        request_id = next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._guard:
            if not self.alive:
                raise McpError(f"the connection to MCP server {self.server} is closed")
            self._pending[request_id] = future
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        try:
            self._send(message if params is None else {**message, "params": params}, request=True)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                try:
                    answer = future.result(timeout=max(0.0, min(left, _MCP_POLL)))
                    break
                except concurrent.futures.TimeoutError:
                    if cancelled is not None and cancelled():
                        self._cancel(request_id, "the turn was cancelled")
                        raise ToolFailed("cancelled: the turn was cancelled") from None
                    if time.monotonic() >= deadline:
                        self._cancel(request_id, f"timed out after {timeout:g} s")
                        raise ToolFailed(
                            f"timed out after {timeout:g} s (the server was told to stop)"
                        ) from None
        finally:
            with self._guard:
                self._pending.pop(request_id, None)
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise McpError(
                f"MCP server {self.server} refused {method}: {error.get('message')} "
                f"(JSON-RPC error {error.get('code')})"
            )
        result = answer.get("result")
        return result if isinstance(result, dict) else {}

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message = {"jsonrpc": "2.0", "method": method}
        self._send(message if params is None else {**message, "params": params}, request=False)

    def _cancel(self, request_id: int, reason: str) -> None:
        """Tell the server to stop a request (never initialize, as the protocol says)."""
        if request_id == 1:  # initialize is each connection's first request
            return
        with contextlib.suppress(McpError, OSError, httpx.HTTPError):
            self.notify("notifications/cancelled", {"requestId": request_id, "reason": reason})

    def deliver(self, message: Any) -> None:
        """Take one message from the server: an answer, a request of its own, a notice."""
        if not isinstance(message, dict):
            log.warning("MCP server %s sent %s, not a JSON-RPC message", self.server, message)
            return
        method = message.get("method")
        if method is None:
            with self._guard:
                future = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(message)
        elif "id" in message:  # the server asks: ping is answered, the rest refused
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
            if method == "ping":
                answer["result"] = {}
            else:
                answer["error"] = {"code": -32601, "message": f"agentkit does not serve {method}"}
            with contextlib.suppress(McpError, OSError, httpx.HTTPError):
                self._send(answer, request=False)
        elif method == "notifications/tools/list_changed":
            threading.Thread(
                target=self.on_tools_changed, name=f"agentkit-mcp-{self.server}", daemon=True
            ).start()

    def lost(self, reason: str) -> None:
        """The session ended under its calls: each one fails, its effect unknown."""
        with self._guard:
            self.alive = False
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    McpError(f"MCP server {self.server} {reason} before answering")
                )

    def fail(self, request_id: int, error: McpError) -> None:
        """One request failed on its way (its answer will not come)."""
        with self._guard:
            future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_exception(error)


class _McpStdio(_McpConnection):
    """A server as a child process speaking newline-delimited JSON-RPC on stdin and stdout;
    its stderr goes to the log (redacted like every agentkit log line)."""

    def __init__(
        self,
        server: str,
        on_tools_changed: Callable[[], None],
        command: list[str],
        env: dict[str, str],
    ) -> None:
        super().__init__(server, on_tools_changed)
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            raise McpError(f"cannot start MCP server {server} ({command[0]}): {e}") from None
        self._writing = threading.Lock()
        for target, stream in ((self._read, "stdout"), (self._log, "stderr")):
            threading.Thread(
                target=target, name=f"agentkit-mcp-{server}-{stream}", daemon=True
            ).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip():
                try:
                    self.deliver(json.loads(line))
                except ValueError:
                    log.warning("MCP server %s wrote a line that is not JSON", self.server)
        code = self.process.wait()
        self.lost(f"exited (code {code})")

    def _log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            log.info("MCP server %s: %s", self.server, line.decode(errors="replace").rstrip())

    def _send(self, message: dict[str, Any], *, request: bool) -> None:
        assert self.process.stdin is not None
        try:
            with self._writing:
                self.process.stdin.write(dumps(message).encode() + b"\n")
                self.process.stdin.flush()
        except (OSError, ValueError):
            raise McpError(f"MCP server {self.server} is not running") from None

    def close(self) -> None:
        """Close stdin and wait; then SIGTERM, then SIGKILL (the MCP shutdown order)."""
        self.alive = False
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()  # type: ignore[union-attr]
        for stop in (None, self.process.terminate, self.process.kill):
            if stop is not None:
                with contextlib.suppress(OSError):
                    stop()
            try:
                self.process.wait(timeout=2.0)
                return
            except subprocess.TimeoutExpired:
                continue


class _McpHTTP(_McpConnection):
    """A server behind one URL (Streamable HTTP): each message a POST answered with JSON or
    an event stream, the session id echoed, and a GET stream for what the server sends."""

    def __init__(
        self,
        server: str,
        on_tools_changed: Callable[[], None],
        url: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(server, on_tools_changed)
        self.url = url
        self.session: str | None = None
        self.client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(30.0, read=None), follow_redirects=False
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream"}
        if self.session is not None:
            headers["Mcp-Session-Id"] = self.session
        if self.protocol is not None:
            headers["MCP-Protocol-Version"] = self.protocol
        return headers

    def _send(self, message: dict[str, Any], *, request: bool) -> None:
        if not request:
            self._post(message)
            return
        threading.Thread(
            target=self._post_request,
            args=(message,),
            name=f"agentkit-mcp-{self.server}",
            daemon=True,
        ).start()

    def _post_request(self, message: dict[str, Any]) -> None:
        try:
            self._post(message)
        except McpError as e:
            self.fail(message["id"], e)
        except httpx.HTTPError as e:
            self.fail(message["id"], McpError(f"MCP server {self.server}: {_describe(e)}"))

    def _post(self, message: dict[str, Any]) -> None:
        """POST one message and take in what the answer carries."""
        with self.client.stream("POST", self.url, json=message, headers=self._headers()) as r:
            if r.status_code == 404 and self.session is not None:
                self.alive = False
                raise _McpSessionGone(f"MCP server {self.server} ended the session")
            if r.status_code >= 400:
                body = r.read().decode(errors="replace")
                raise McpError(f"MCP server {self.server} answered HTTP {r.status_code}: {body}")
            if message.get("method") == "initialize":
                self.session = r.headers.get("mcp-session-id")
            self._take(r)

    def _take(self, response: httpx.Response) -> None:
        kind = response.headers.get("content-type", "").partition(";")[0].strip()
        if kind == "text/event-stream":
            for _, data in _iter_sse(response):
                with contextlib.suppress(ValueError):
                    self.deliver(json.loads(data))
        elif kind == "application/json" and (raw := response.read()).strip():
            try:
                body = json.loads(raw)
            except ValueError:
                raise McpError(f"MCP server {self.server} answered JSON that is not") from None
            for message in body if isinstance(body, list) else [body]:
                self.deliver(message)

    def listen(self) -> None:
        """Take what the server sends outside any answer (list_changed) on a GET stream,
        when the server offers one."""

        def run() -> None:
            with contextlib.suppress(httpx.HTTPError, ValueError, RuntimeError):
                headers = {**self._headers(), "Accept": "text/event-stream"}
                with self.client.stream("GET", self.url, headers=headers) as response:
                    if response.status_code == 200:
                        self._take(response)

        threading.Thread(target=run, name=f"agentkit-mcp-{self.server}-get", daemon=True).start()

    def close(self) -> None:
        """DELETE the session, then close the HTTP client."""
        self.alive = False
        if self.session is not None:
            with contextlib.suppress(httpx.HTTPError):
                self.client.delete(self.url, headers=self._headers(), timeout=5.0)
        self.client.close()


class McpTool(Tool):
    """One tool of an MCP server as the model sees it: `<prefix><tool>` with the server's
    schema; a call that was running when its process died runs again only when the
    server marks the tool idempotent or read-only."""

    def __init__(self, server: "McpServer", spec: dict[str, Any]) -> None:
        # not Tool.__init__, which makes the schema from a function's type hints
        self.server = server
        self.remote = spec["name"]
        self.name = server.prefix + self.remote
        self.description = spec.get("description") or self.remote
        self.schema = spec.get("inputSchema") or {"type": "object", "properties": {}}
        hints = spec.get("annotations") or {}
        self.idempotent = bool(hints.get("idempotentHint") or hints.get("readOnlyHint"))
        self.approval = server.approval
        self.timeout = None  # the server's own timeout, which tells the server
        self.fn = self.call
        self.is_async = False
        self.ctx_param = "ctx"

    def bind(self, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        """The arguments as they are (the server checks them against its schema)."""
        if INVALID_ARGS_KEY in args:
            raise ValueError(f"the arguments are not a JSON object: {args[INVALID_ARGS_KEY]}")
        return {"args": args, "ctx": ctx}

    def call(self, args: dict[str, Any], ctx: ToolContext) -> str | list[str | File]:
        return self.server.call(self.remote, args, ctx)


class McpServer:
    """An MCP server as a source of tools (`kit.mcp`): connected on first use, restarted
    with backoff after it exits or its connection drops, its tool list cached in the store
    so a process that has not connected yet offers the tools."""

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        command: Sequence[str] | None = None,
        url: str | None = None,
        env: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        tools: Sequence[str] | None = None,
        approval: bool | Callable[[dict[str, Any], ToolContext], bool | str] = False,
        timeout: float = 60.0,
        prefix: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
            raise BadInput(f"an MCP server name is 1-32 letters, digits, '_' or '-', not {name!r}")
        if (command is None) == (url is None):
            raise BadInput(f"MCP server {name}: give command= (stdio) or url= (HTTP), one of them")
        if command is not None and (
            isinstance(command, str) or not command or not all(isinstance(a, str) for a in command)
        ):
            raise BadInput(f"MCP server {name}: command is a list of strings, like ['uvx', 'x']")
        if url is not None and not re.match(r"https?://[^/]", str(url)):
            raise BadInput(f"MCP server {name}: url is an http:// or https:// URL, not {url!r}")
        for kind, given in (("env", env), ("headers", headers)):
            if given is not None and not (
                isinstance(given, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in given.items())
            ):
                raise BadInput(f"MCP server {name}: {kind} maps names to strings")
        if command is None and env:
            raise BadInput(f"MCP server {name}: env= is for a stdio server (command=)")
        if url is None and headers:
            raise BadInput(f"MCP server {name}: headers= is for an HTTP server (url=)")
        if tools is not None and (
            isinstance(tools, str) or not all(isinstance(t, str) for t in tools)
        ):
            raise BadInput(f"MCP server {name}: tools is a list of tool names")
        self.prefix = f"{name}_" if prefix is None else prefix
        if not isinstance(self.prefix, str) or not re.fullmatch(
            r"[A-Za-z0-9_-]{0,32}", self.prefix
        ):
            raise BadInput(f"MCP server {name}: a prefix is letters, digits, '_' or '-'")
        self.store = store
        self.name = name
        self.command = list(command) if command is not None else None
        self.url = url
        self.env = dict(env or {})
        self.headers = dict(headers or {})
        self.only = None if tools is None else set(tools)
        self.approval = approval
        self.timeout = check_seconds("timeout", timeout, positive=True)
        for key, value in (*self.env.items(), *self.headers.items()):
            if key in self.headers or MCP_CREDENTIAL.search(key):
                redactions.add(value, f"{name} {key}")
        self._connection: _McpConnection | None = None
        self._tools: dict[str, McpTool] | None = None  # listed by this process's connection
        self._guard = threading.RLock()
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._closed = False

    @property
    def state(self) -> str:
        """Its state: connected, not connected, closed, or "failed: <why the last start
        failed>"."""
        if self._closed:
            return "closed"
        if self._connection is not None and self._connection.alive:
            return "connected"
        return f"failed: {self._last_error}" if self._last_error else "not connected"

    def environment(self) -> dict[str, str]:
        """A stdio server's environment: PATH, HOME and LANG of this process, and `env`."""
        return {
            **{key: os.environ[key] for key in MCP_ENVIRONMENT if key in os.environ},
            **self.env,
        }

    def connect(self) -> _McpConnection:
        """The live session, started (initialised, its tools listed) when there is none;
        after a failed start the next is tried only when its backoff is over."""
        with self._guard:
            if self._closed:
                raise McpError(f"MCP server {self.name} is closed")
            if self._connection is not None and self._connection.alive:
                return self._connection
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise McpError(
                    f"MCP server {self.name} failed to start ({self._last_error}); "
                    f"next try in {wait:.0f} s"
                )
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            try:
                self._connection = self._start()
            except McpError as e:
                self._failures += 1
                delay = MCP_RESTART_BACKOFF[min(self._failures, len(MCP_RESTART_BACKOFF)) - 1]
                self._retry_at = time.monotonic() + delay
                self._last_error = str(e)
                log.warning("%s (next try in %g s)", e, delay)
                raise
            self._failures, self._last_error = 0, None
            return self._connection

    def _start(self) -> _McpConnection:
        if self.command is not None:
            connection: _McpConnection = _McpStdio(
                self.name, self.refresh, self.command, self.environment()
            )
        else:
            connection = _McpHTTP(self.name, self.refresh, str(self.url), self.headers)
        try:
            result = connection.request(
                "initialize",
                {
                    "protocolVersion": MCP_PROTOCOL_VERSIONS[0],
                    "capabilities": {},
                    "clientInfo": {"name": "agentkit", "version": __version__},
                },
                MCP_START_TIMEOUT,
            )
            version = result.get("protocolVersion")
            if version not in MCP_PROTOCOL_VERSIONS:
                raise McpError(
                    f"MCP server {self.name} speaks protocol {version!r}; agentkit speaks "
                    f"{', '.join(MCP_PROTOCOL_VERSIONS)}"
                )
            connection.protocol = version
            connection.info = result.get("serverInfo") or {}
            connection.notify("notifications/initialized")
            if isinstance(connection, _McpHTTP):
                connection.listen()
            self._tools = self._listed(connection)
        except ToolFailed as e:  # a timeout
            connection.close()
            raise McpError(f"MCP server {self.name} did not start: {e}") from None
        except BaseException:
            connection.close()
            raise
        log.info("MCP server %s connected (protocol %s)", self.name, version)
        return connection

    def _listed(self, connection: _McpConnection) -> dict[str, McpTool]:
        """Every page of `tools/list`, filtered by `tools=`, saved in the store."""
        specs, cursor = [], None
        for _ in range(MCP_MAX_PAGES):
            page = connection.request(
                "tools/list", cursor and {"cursor": cursor}, MCP_START_TIMEOUT
            )
            specs += [t for t in page.get("tools") or [] if isinstance(t, dict) and "name" in t]
            cursor = page.get("nextCursor")
            if not cursor:
                break
        else:
            raise McpError(f"MCP server {self.name} gave more than {MCP_MAX_PAGES} pages of tools")
        keep = ("name", "description", "inputSchema", "annotations")
        specs = [{key: spec[key] for key in keep if key in spec} for spec in specs]
        self.store.set_mcp_tool_list(self.name, specs)
        return self._made(specs)

    def _made(self, specs: list[dict[str, Any]]) -> dict[str, McpTool]:
        made = {}
        for spec in specs:
            if self.only is not None and spec["name"] not in self.only:
                continue
            tool = McpTool(self, spec)
            if TOOL_NAME.fullmatch(tool.name):
                made[tool.name] = tool
            else:
                log.warning("MCP server %s: tool %r has a name models refuse", self.name, tool.name)
        return made

    def refresh(self) -> None:
        """List the tools again (the server said they changed)."""
        with self._guard:
            connection = self._connection
        if connection is None or not connection.alive:
            return
        try:
            self._tools = self._listed(connection)
        except (McpError, ToolFailed, StoreError) as e:
            log.warning("MCP server %s: the tools could not be listed again: %s", self.name, e)

    def tools(self) -> dict[str, McpTool]:
        """The tools to offer: as this process's connection listed them, else as the store
        has them cached, else as a first connection lists them (none if it fails)."""
        if self._connection is not None and self._connection.alive and self._tools is not None:
            return self._tools
        cached = self.store.mcp_tool_list(self.name)
        if cached is not None:
            return self._made(cached.tools)
        try:
            self.connect()
        except (McpError, ToolFailed) as e:
            log.warning("MCP server %s offers no tools: %s", self.name, e)
            return {}
        return self._tools or {}

    def call(
        self, tool: str, args: dict[str, Any], ctx: ToolContext | None = None
    ) -> str | list[str | File]:
        """Call one tool: its result text (a list of texts and Files when it has images),
        ToolFailed when it reports an error."""
        for attempt in (1, 2):
            connection = self.connect()
            try:
                result = connection.request(
                    "tools/call",
                    {"name": tool, "arguments": args},
                    self.timeout,
                    ctx.cancelled if ctx is not None else None,
                )
                break
            except _McpSessionGone:
                if attempt == 2:
                    raise
            except McpError as e:
                if connection.alive:
                    raise
                raise McpError(f"{e}; the call's effect is unknown") from None
        value = mcp_result(result)
        if result.get("isError"):
            said = "\n".join(part for part in value if isinstance(part, str))
            raise ToolFailed(said or f"{tool} failed")
        return value[0] if len(value) == 1 and isinstance(value[0], str) else value

    def check(self) -> str:
        """Connect and ping: "connected (<server> <version>, protocol <p>, ping <n> ms)",
        or "failed: <why>"."""
        try:
            connection = self.connect()
            started = time.monotonic()
            connection.request("ping", None, self.timeout)
        except (McpError, ToolFailed) as e:
            return f"failed: {e}"
        took = (time.monotonic() - started) * 1000
        who = " ".join(str(connection.info.get(key, "")) for key in ("name", "version")).strip()
        return f"connected ({who or 'unnamed'}, protocol {connection.protocol}, ping {took:.0f} ms)"

    def close(self) -> None:
        with self._guard:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None


# ─────────────────────────────────────── runtimes ───────────────────────────────────────
# Where files are worked on and commands run: a RuntimeProvider gives each scope a Runtime
# (a root folder and its operations), kept warm per scope; local and bwrap ship here.

RUNTIME_SCOPES = ("thread", "actor", "adapter", "kit")
OUTPUT_BYTES = 50_000  # what a tool result shows at most, with OUTPUT_LINES
OUTPUT_LINES = 2_000
FOUND_LINES = 10 * OUTPUT_LINES  # grep and find stop there: memory bounded, far past the cap
WALK_DEPTH = 100  # grep and find look this many folders deep: one descriptor and frame each
OUTPUT_FOLDER = ".agentkit/output"  # where the full output of a truncated result is saved
OUTPUT_KEPT = 100  # saved outputs a runtime keeps: saving one more removes the oldest
SAVED_OUTPUT_BYTES = 16 << 20  # what one command's output is kept of; the rest is dropped
READ_BYTES = 64 << 20  # the largest file read and edit take
SECRETS = ".secrets"  # the folder at a root that no runtime operation shows
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")  # the only variables commands inherit
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# ulimit, then join the pids cgroup ($1, when there is one), then run the command
_LIMITS_SCRIPT = (
    'ulimit -t "$2" -v "$3" -f "$4" ${5:+-u "$5"} || exit 125\n'
    'if [ -n "$1" ]; then echo $$ > "$1" || exit 125; fi\n'
    "shift 5\n"
    'exec "$@"'
)


@dataclasses.dataclass(frozen=True)
class RuntimeScope:
    """Which conversations share a runtime: `kind` (thread, actor, adapter or kit), `key`
    (the id it stands for) and `root`, its folder on this host."""

    kind: str
    key: str
    root: Path


@dataclasses.dataclass(frozen=True)
class BashResult:
    """What a command did: its exit code (None when it timed out and was killed), its
    output (stdout and stderr together, capped), whether that was truncated, and where
    the full output was saved (relative to the runtime's root)."""

    exit_code: int | None
    output: str
    truncated: bool = False
    full_output_path: str | None = None
    timed_out: bool = False


@runtime_checkable
class Runtime(Protocol):
    """A scope's place to work. Paths are relative to `root` (an absolute path must lie
    inside it); an operation a runtime cannot do raises, and nothing falls back to the host."""

    name: str
    root: str

    def bash(
        self,
        command: str,
        *,
        timeout: float,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_output: Callable[[str], object] | None = None,
    ) -> BashResult:
        """Run `command` with bash; `env` values are passed to it and redacted from the output;
        `on_output(text)` receives the output as it comes, line by line."""
        ...

    def read(self, path: str, *, offset: int = 0, limit: int | None = None) -> str:
        """The text of a file, from line `offset` (0-based), at most `limit` lines."""
        ...

    def write(self, path: str, text: str) -> None:
        """Create or replace a file (and its missing folders)."""
        ...

    def edit(self, path: str, edits: Sequence[tuple[str, str]]) -> None:
        """Replace each `old` by `new`; every `old` must occur exactly once, or nothing changes."""
        ...

    def ls(self, path: str = ".") -> list[str]:
        """A folder's entries, sorted, folders ending with '/'."""
        ...

    def grep(self, pattern: str, path: str = ".", *, glob: str | None = None) -> list[str]:
        """`file:line: text` for each line matching the regular expression."""
        ...

    def find(self, glob: str, path: str = ".") -> list[str]:
        """The files and folders below `path` whose name (or path, with '/') matches `glob`."""
        ...

    def remove(self, path: str) -> None:
        """Delete a file (never a folder); a missing file is BadInput."""
        ...


@runtime_checkable
class RuntimeProvider(Protocol):
    """Makes runtimes: one per scope, kept as long as it likes until `stop`."""

    def get(self, scope: RuntimeScope) -> Runtime:
        """The scope's runtime (started if needed)."""
        ...

    def stop(self, scope: RuntimeScope | None = None) -> None:
        """Stop the scope's runtime (every one with None); a later `get` starts it again."""
        ...


@dataclasses.dataclass(frozen=True)
class RuntimeLimits:
    """The limits of each command: CPU seconds, address space, the largest file it may
    write (bytes) and the processes it may have at once; None lifts one."""

    cpu_seconds: int | None = 600
    memory_bytes: int | None = 8 << 30
    file_bytes: int | None = 4 << 30
    processes: int | None = 512


def _limit_value(value: int | None, unit: int = 1) -> str:
    return "unlimited" if value is None else str(max(1, value // unit))


def _pids_cgroup_parents() -> list[Path]:
    """The folders a pids cgroup could be made in: this process's cgroup in the v1 pids
    hierarchy, and in the v2 one when it delegates pids."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    paths = {}
    for line in groups:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path.lstrip("/")
    parents = []
    for line in mounts:
        fields = line.split()
        tail = fields[fields.index("-") + 1 :]
        point = Path(fields[4])
        if tail[0] == "cgroup" and "pids" in tail[2].split(",") and "pids" in paths:
            parents.append(point / paths["pids"])
        elif tail[0] == "cgroup2" and "" in paths:
            folder = point / paths[""]
            with contextlib.suppress(OSError):
                if "pids" in (folder / "cgroup.subtree_control").read_text().split():
                    parents.append(folder)
    return parents


class _ProcessCap:
    """The process limit of one command: a pids cgroup of its own when one can be made
    (the only limit that holds for root), else RLIMIT_NPROC above what this user already
    runs. Root with no cgroup to use gets RuntimeUnavailable, never an unlimited command."""

    def __init__(self, processes: int | None) -> None:
        self.cgroup: Path | None = None
        self.nproc = ""  # the ulimit -u value, "" for none
        if processes is None:
            return
        for parent in _pids_cgroup_parents():
            _remove_orphans(parent)
            folder = parent / f"agentkit-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                folder.mkdir()
            except OSError:
                continue
            try:
                (folder / "pids.max").write_text(str(processes))
            except OSError:
                folder.rmdir()
                continue
            self.cgroup = folder
            return
        if os.geteuid() == 0:
            raise RuntimeUnavailable(
                "cannot limit a command's processes: root ignores RLIMIT_NPROC and no pids "
                "cgroup could be made under /sys/fs/cgroup; run agentkit as another user, "
                "give it a pids cgroup, or pass RuntimeLimits(processes=None)"
            )
        self.nproc = str(processes + _tasks_of(os.getuid()))

    @property
    def procs_file(self) -> str:
        return str(self.cgroup / "cgroup.procs") if self.cgroup else ""

    def kill(self) -> None:
        """Kill every process left in the cgroup and remove it."""
        if self.cgroup is not None:
            _kill_cgroup(self.cgroup)
            self.cgroup = None


def _kill_cgroup(folder: Path) -> None:
    """Kill every process in a pids cgroup (none may fork meanwhile) and remove it."""
    with contextlib.suppress(OSError):
        (folder / "pids.max").write_text("0")
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            pids = (folder / "cgroup.procs").read_text().split()
        except OSError:
            return  # removed already
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            folder.rmdir()
            return
        except OSError:
            time.sleep(0.01)  # killed processes are still being reaped
    log.warning("could not remove the cgroup %s: processes are left in it", folder)


def _remove_orphans(parent: Path) -> None:
    """Kill and remove the command cgroups of agentkit processes that died (a crash), so
    that nothing they ran outlives them."""
    with contextlib.suppress(OSError):
        for folder in parent.glob("agentkit-*-*"):
            pid = folder.name.split("-")[1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _kill_cgroup(folder)


def _tasks_of(uid: int) -> int:
    """How many tasks (threads count, as RLIMIT_NPROC counts them) `uid` runs now."""
    count = 0
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
    return count


def _command_env(env: dict[str, str] | None, home: str) -> dict[str, str]:
    """The environment of a command: PATH, locale and time zone from this process (nothing
    else: no AGENTKIT_*, no API keys, no tokens), HOME, and the variables passed."""
    made = {name: os.environ[name] for name in _HOST_ENV if name in os.environ}
    made.setdefault("PATH", _DEFAULT_PATH)
    made.update(HOME=home, TERM="dumb")
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise BadInput(f"an environment variable name is a plain identifier, not {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise BadInput(f"the value of {name} must be a string without NUL characters")
        made[name] = value
    return made


class _LineStream:
    """Hands a command's output to `on_output` in whole lines."""

    def __init__(self, on_output: Callable[[str], object] | None) -> None:
        self.on_output, self.pending = on_output, b""

    def feed(self, chunk: bytes) -> None:
        if self.on_output is None:
            return
        lines, _, self.pending = (self.pending + chunk).rpartition(b"\n")
        if lines:
            self._send(lines + b"\n")
        if len(self.pending) > 65536:  # a very long line goes in parts
            self.flush()

    def flush(self) -> None:
        if self.on_output is not None and self.pending:
            self._send(self.pending)
            self.pending = b""

    def _send(self, data: bytes) -> None:
        assert self.on_output is not None
        try:
            self.on_output(data.decode("utf-8", "replace"))
        except Exception:
            log.exception("on_output raised; the command goes on")


def _run_limited(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    timeout: float,
    limits: RuntimeLimits,
    pass_fds: tuple[int, ...] = (),
    on_output: Callable[[str], object] | None,
    track: Callable[[subprocess.Popen, bool], None],
) -> tuple[int | None, str, bool]:
    """Run argv in a new process group under `limits`; `(exit code or None, output,
    timed out)`. When it ends or times out, its process group and its cgroup are killed
    (without a cgroup, a process that left the group with setsid survives). `on_output`
    gets the output in whole lines as it comes."""
    if not hasattr(os, "pidfd_open"):
        raise RuntimeUnavailable("commands need Linux 5.3 or newer (pidfd, process groups)")
    cap = _ProcessCap(limits.processes)
    limit_args = [
        cap.procs_file,
        _limit_value(limits.cpu_seconds),
        _limit_value(limits.memory_bytes, 1024),
        _limit_value(limits.file_bytes, 1024),
        cap.nproc,
    ]
    try:
        proc = subprocess.Popen(
            ["bash", "-c", _LIMITS_SCRIPT, "agentkit", *limit_args, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            pass_fds=pass_fds,
            process_group=0,
        )
    except FileNotFoundError:
        cap.kill()
        raise RuntimeUnavailable(
            f"cannot run commands: {argv[0]} or bash is not installed"
        ) from None
    except BaseException:
        cap.kill()
        raise
    track(proc, True)
    assert proc.stdout is not None
    out, stream = bytearray(), _LineStream(on_output)
    pidfd = os.pidfd_open(proc.pid)
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(pidfd, selectors.EVENT_READ)
            exited = False
            while not exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(left):
                    if key.fileobj is pidfd:
                        exited = True
                    elif not _take(proc.stdout, out, stream):
                        selector.unregister(proc.stdout)
        track(proc, False)  # before it is reaped: stop() never signals a reused pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet: no reuse
        cap.kill()
        proc.wait()
        os.set_blocking(proc.stdout.fileno(), False)
        drained = time.monotonic() + 1.0  # a process that escaped the kill may hold the pipe
        while time.monotonic() < drained and _take(proc.stdout, out, stream, wait=0.2):
            pass
    finally:
        os.close(pidfd)
        proc.stdout.close()
        track(proc, False)
        cap.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stream.flush()
    text = out.decode("utf-8", "replace")
    if len(out) >= SAVED_OUTPUT_BYTES:
        text += f"\n[output beyond {SAVED_OUTPUT_BYTES} bytes was dropped]"
    return (None if timed_out else proc.returncode), text, timed_out


def _take(pipe: Any, out: bytearray, stream: _LineStream, wait: float = 0.0) -> bool:
    """Read what the pipe has into `out` (up to SAVED_OUTPUT_BYTES) and the stream; False
    at its end (or, with `wait`, when nothing came within that many seconds)."""
    if wait and not select.select([pipe], [], [], wait)[0]:
        return False
    try:
        chunk = os.read(pipe.fileno(), 65536)
    except BlockingIOError:
        return True
    if chunk:
        out += chunk[: max(0, SAVED_OUTPUT_BYTES - len(out))]
        stream.feed(chunk)
    return bool(chunk)


def _cut(text: str, keep: str) -> str:
    """`text` cut to OUTPUT_LINES lines and OUTPUT_BYTES bytes, keeping its head or tail."""
    lines = text.splitlines(keepends=True)
    lines = lines[-OUTPUT_LINES:] if keep == "tail" else lines[:OUTPUT_LINES]
    data = "".join(lines).encode()
    data = data[-OUTPUT_BYTES:] if keep == "tail" else data[:OUTPUT_BYTES]
    return data.decode("utf-8", "ignore")


_SAVED_OUTPUT = re.compile(r".+-[0-9a-f]{22}\.txt")  # the names cap_output gives


def cap_output(
    runtime: Runtime, text: str, *, keep: str = "head", label: str = "output"
) -> tuple[str, str | None]:
    """`(what to show, where the whole text was saved)`: text over OUTPUT_LINES lines or
    OUTPUT_BYTES bytes is cut (its head, or its tail with keep="tail") and saved whole in
    the runtime's OUTPUT_FOLDER, which keeps the newest OUTPUT_KEPT; short text is shown as
    it is (and None)."""
    shown = _cut(text, keep)
    if shown == text:
        return text, None
    path = f"{OUTPUT_FOLDER}/{label}-{time.time_ns():016x}{os.urandom(3).hex()}.txt"
    runtime.write(path, text)
    saved = [name for name in runtime.ls(OUTPUT_FOLDER) if _SAVED_OUTPUT.fullmatch(name)]
    saved.sort(key=lambda name: name.rsplit("-", 1)[1])  # by the nanoseconds of its save
    for name in saved[:-OUTPUT_KEPT]:
        with contextlib.suppress(BadInput):  # another call removed it first
            runtime.remove(f"{OUTPUT_FOLDER}/{name}")
    return shown, path


def truncation_note(path: str, keep: str = "head") -> str:
    """What the model is told about a cut output: what it sees, and where the rest is."""
    part = "last" if keep == "tail" else "first"
    return (
        f"\n[output truncated to its {part} {OUTPUT_LINES} lines or {OUTPUT_BYTES // 1000} KB; "
        f"the full output is in {path}: read it with offset and limit]"
    )


def _path_parts(path: str, root: str) -> list[str]:
    """The components of a path relative to `root` (an absolute one must lie inside root)."""
    if not isinstance(path, str) or "\0" in path:
        raise BadInput(f"a path is a string without NUL characters, not {path!r}")
    if path.startswith("/"):
        normal = os.path.normpath(path)
        if normal != root and not normal.startswith(root.rstrip("/") + "/"):
            raise BadInput(f"{path} is outside the workspace ({root}); use a relative path")
        path = normal[len(root) :]
    return [part for part in path.split("/") if part not in ("", ".")]


class _Resolved(NamedTuple):
    folder: int  # a descriptor of the folder holding `name` (the caller closes it)
    parts: tuple[str, ...]  # the folder's canonical components below the root
    name: str  # "." when the path is the root itself


def _taken(stack: list[tuple[int, str]]) -> tuple[int, tuple[str, ...]]:
    """The innermost folder of a resolution stack, taken off it (the caller closes its
    descriptor), and its components below the root, the innermost included."""
    parts = tuple(name for _, name in stack[1:])
    return stack.pop()[0], parts


def _resolve(root_fd: int, path: str, root: str, *, create: bool = False) -> _Resolved:
    """Resolve `path` beneath the root one component at a time, each folder opened with
    O_NOFOLLOW relative to the one before (never by its path): `..` never climbs above
    the root, a symlink is followed only while it stays inside (an absolute one is
    refused), and `.secrets` at the root is refused. `create` makes missing folders.
    The last component is not opened: open it with O_NOFOLLOW (a symlink swapped in
    after this check then fails instead of being followed)."""
    todo = list(reversed(_path_parts(path, root)))
    stack: list[tuple[int, str]] = [(os.dup(root_fd), "")]
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                if len(stack) == 1:
                    raise BadInput(f"{path} leads outside the workspace")
                os.close(stack.pop()[0])
                continue
            if len(stack) == 1 and name == SECRETS:
                raise BadInput(f"{path}: {SECRETS} is not readable from the workspace")
            folder = stack[-1][0]
            try:
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
            except FileNotFoundError:
                if todo and create:
                    if ".." in todo:
                        raise BadInput(f"{path} goes through a missing folder and back") from None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=folder)
                    todo.append(name)
                    continue
                if todo:
                    raise BadInput(f"{path}: there is no folder {name!r}") from None
                info = None
            if info is not None and stat.S_ISLNK(info.st_mode):
                links += 1
                target = os.readlink(name, dir_fd=folder)
                if target.startswith("/"):
                    raise BadInput(
                        f"{path} goes through a symlink outside the workspace ({target})"
                    )
                if links > 40:
                    raise BadInput(f"{path} goes through more than 40 symlinks")
                todo.extend(reversed(target.split("/")))
                continue
            if not todo:
                return _Resolved(*_taken(stack), name)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
            stack.append((os.open(name, flags, dir_fd=folder), name))
        return _Resolved(*_taken(stack), ".")
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        for fd, _ in stack:
            os.close(fd)


def _os_error(path: str, e: OSError) -> BadInput:
    """A file system error as BadInput naming the path (ELOOP: a symlink swapped in)."""
    if e.errno == errno.ELOOP:
        return BadInput(f"{path} is a symlink (maybe swapped in while it was opened): refused")
    return BadInput(f"{path}: {e.strerror or e}")


def _mode_of(resolved: _Resolved) -> int:
    """The permissions of the regular file a write replaces (0644 for a new file), so that
    editing a script keeps it executable."""
    try:
        info = os.stat(resolved.name, dir_fd=resolved.folder, follow_symlinks=False)
    except FileNotFoundError:
        return 0o644
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else 0o644


def _open_file(resolved: _Resolved, path: str) -> int:
    """A descriptor of a regular file that has one link only (a hard link could be a way
    to a file outside the workspace or in .secrets), opened without following symlinks."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(resolved.name, flags, dir_fd=resolved.folder)
    except OSError as e:
        raise _os_error(path, e) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "a hard link (refused)" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise BadInput(f"{path} is {what}")
    return fd


def _matches(glob: str, relative: str, name: str) -> bool:
    """Whether a glob matches: against the relative path when it has '/', else the name."""
    return fnmatch.fnmatchcase(relative if "/" in glob else name, glob)


class LocalRuntime:
    """A scope's folder on this host. Every path is resolved beneath the root's
    descriptor (see `_resolve`); commands run with bash in a new process group, with
    limits, a scrubbed environment and a timeout that kills everything they started.
    Commands are not confined to the folder: use bwrap for that."""

    name = "local"

    def __init__(self, scope: RuntimeScope, limits: RuntimeLimits) -> None:
        self.scope, self.limits = scope, limits
        self.root = str(scope.root)
        fd = _open_folder(scope.root, create=True)
        assert fd is not None
        self._root_fd: int | None = fd
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()

    @contextlib.contextmanager
    def _root(self) -> Iterator[int]:
        """A descriptor of the root of its own, valid while it is used even when stop()
        runs meanwhile (RuntimeUnavailable once stopped)."""
        with self._lock:
            if self._root_fd is None:
                raise RuntimeUnavailable(f"the {self.name} runtime of {self.scope.key} was stopped")
            fd = os.dup(self._root_fd)
        try:
            yield fd
        finally:
            os.close(fd)

    def stop(self) -> None:
        """Kill the running commands (their groups) and let go of the folder."""
        with self._lock:
            for proc in self._running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if self._root_fd is not None:
                os.close(self._root_fd)
                self._root_fd = None

    # files

    @contextlib.contextmanager
    def _resolved(self, path: str, *, create: bool = False) -> Iterator[_Resolved]:
        with self._root() as root_fd:
            resolved = _resolve(root_fd, path, self.root, create=create)
        try:
            yield resolved
        finally:
            os.close(resolved.folder)

    def _folder(self, path: str) -> tuple[int, list[str]]:
        """A descriptor of the folder at `path` (the caller closes it) and its canonical
        components below the root."""
        with self._resolved(path) as resolved:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
            try:
                fd = os.open(resolved.name, flags, dir_fd=resolved.folder)
            except OSError as e:
                raise _os_error(path, e) from None
            return fd, [*resolved.parts, *([] if resolved.name == "." else [resolved.name])]

    def _text(self, path: str) -> str:
        with self._resolved(path) as resolved, os.fdopen(_open_file(resolved, path), "rb") as f:
            data = f.read(READ_BYTES + 1)
        if len(data) > READ_BYTES:
            raise BadInput(f"{path} is over {READ_BYTES >> 20} MiB: look at it with bash instead")
        return data.decode("utf-8", "replace")

    def read(self, path: str, *, offset: int = 0, limit: int | None = None) -> str:
        """The text of a file, from line `offset` (0-based), at most `limit` lines."""
        if not isinstance(offset, int) or offset < 0 or (limit is not None and limit < 1):
            raise BadInput("offset is a line number >= 0 and limit a number of lines >= 1")
        lines = self._text(path).splitlines(keepends=True)
        return "".join(lines[offset : None if limit is None else offset + limit])

    def write(self, path: str, text: str) -> None:
        """Create or replace a file: written beside it (O_EXCL, O_NOFOLLOW), then renamed
        over it, so a symlink or hard link in its place is replaced, never written through."""
        if not isinstance(text, str):
            raise BadInput(f"text must be a string, not {type(text).__name__}")
        with self._resolved(path, create=True) as resolved:
            if resolved.name == ".":
                raise BadInput(f"{path} is the workspace itself, not a file")
            temporary = f".{resolved.name[:100]}.{os.urandom(6).hex()}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            try:
                fd = os.open(temporary, flags, 0o600, dir_fd=resolved.folder)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    os.fchmod(fd, _mode_of(resolved))
                    f.write(text)
                os.replace(
                    temporary, resolved.name, src_dir_fd=resolved.folder, dst_dir_fd=resolved.folder
                )
            except OSError as e:
                raise _os_error(path, e) from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary, dir_fd=resolved.folder)

    def edit(self, path: str, edits: Sequence[tuple[str, str]]) -> None:
        """Replace each `old` by `new` in turn; every `old` must occur exactly once when
        its turn comes, or the file is left as it was (BadInput names the edit)."""
        text = self._text(path)
        if not edits:
            raise BadInput("edit needs at least one (old, new) pair")
        for number, (old, new) in enumerate(edits, 1):
            count = text.count(old) if old else 0
            if count != 1:
                found = "does not occur" if count == 0 else f"occurs {count} times"
                raise BadInput(
                    f"edit {number}: the text to replace {found} in {path}; nothing was "
                    "changed (give an exact text that occurs once, with more context)"
                )
            text = text.replace(old, new, 1)
        self.write(path, text)

    def remove(self, path: str) -> None:
        """Delete a file (never a folder); a missing file is BadInput."""
        with self._resolved(path) as resolved:
            try:
                info = os.stat(resolved.name, dir_fd=resolved.folder, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    raise BadInput(f"{path} is a folder: remove it with bash")
                os.unlink(resolved.name, dir_fd=resolved.folder)
            except OSError as e:
                raise _os_error(path, e) from None

    def ls(self, path: str = ".") -> list[str]:
        """A folder's entries, sorted, folders ending with '/' (.secrets never listed)."""
        fd, parts = self._folder(path)
        try:
            entries = []
            for entry in os.scandir(fd):
                if not parts and entry.name == SECRETS:
                    continue
                entries.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
            return sorted(entries)
        finally:
            os.close(fd)

    def _walk(self, path: str, deeper: list[str]) -> Iterator[tuple[str, str, int]]:
        """`(relative path, name, folder descriptor)` of every file and folder below
        `path` down to WALK_DEPTH levels, walked by descriptors without following symlinks
        (.secrets skipped); the folders not entered for depth are added to `deeper`."""
        top, base = self._folder(path)
        try:
            for folder, dirs, files, fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                inside = [p for p in folder.split("/") if p != "."]
                below = [*base, *inside]
                if not below:
                    dirs[:] = [d for d in dirs if d != SECRETS]
                    files = [f for f in files if f != SECRETS]
                dirs.sort()
                for name in [*dirs, *sorted(files)]:
                    yield "/".join([*below, name]), name, fd
                if len(inside) + 1 >= WALK_DEPTH:
                    deeper.extend("/".join([*below, name]) for name in dirs)
                    dirs[:] = []  # os.fwalk recurses: a deeper tree would end in RecursionError
        finally:
            os.close(top)

    @staticmethod
    def _found(found: list[str], deeper: list[str]) -> list[str]:
        """grep's or find's lines, with a last line naming what depth or count cut off."""
        if len(found) >= FOUND_LINES:
            return [*found, f"[stopped after {FOUND_LINES:,} matches]"]
        if deeper:
            more = f" and {len(deeper) - 1:,} more" if len(deeper) > 1 else ""
            return [*found, f"[not searched, over {WALK_DEPTH} folders deep: {deeper[0]}/{more}]"]
        return found

    def grep(self, pattern: str, path: str = ".", *, glob: str | None = None) -> list[str]:
        """`file:line: text` for each line matching the regular expression, in the text
        files below `path` whose name matches `glob` (symlinks, hard links and the saved
        outputs of OUTPUT_FOLDER skipped)."""
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise BadInput(f"not a regular expression: {pattern!r} ({e})") from None
        found: list[str] = []
        deeper: list[str] = []
        for relative, name, folder in self._walk(path, deeper):
            if relative.startswith(f"{OUTPUT_FOLDER}/") or (
                glob is not None and not _matches(glob, relative, name)
            ):
                continue  # saved outputs would only repeat what was shown
            try:
                fd = _open_file(_Resolved(folder, (), name), relative)
            except BadInput:
                continue  # a folder, a symlink, a hard link or a device
            with os.fdopen(fd, "rb") as f:
                data = f.read(SAVED_OUTPUT_BYTES)
            if b"\0" in data[:8192]:
                continue
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if regex.search(line):
                    found.append(f"{relative}:{number}: {line[:500]}")
                    if len(found) >= FOUND_LINES:
                        return self._found(found, deeper)
        return self._found(found, deeper)

    def find(self, glob: str, path: str = ".") -> list[str]:
        """The files and folders below `path` whose name (or, for a glob with '/', whose
        relative path) matches `glob`; folders end with '/'."""
        if not isinstance(glob, str) or not glob:
            raise BadInput("find needs a glob like '*.py' or 'src/*.py'")
        found: list[str] = []
        deeper: list[str] = []
        for relative, name, folder in self._walk(path, deeper):
            if _matches(glob, relative, name):
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                found.append(relative + ("/" if stat.S_ISDIR(info.st_mode) else ""))
                if len(found) >= FOUND_LINES:
                    return self._found(found, deeper)
        return self._found(found, deeper)

    # commands

    def bash(
        self,
        command: str,
        *,
        timeout: float,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_output: Callable[[str], object] | None = None,
    ) -> BashResult:
        """Run `command` with bash in `cwd` (the root by default) for up to `timeout`
        seconds; `env` values are passed to it and redacted from the output, which
        `on_output(text)` receives line by line as it comes."""
        if not isinstance(command, str) or not command.strip():
            raise BadInput("bash needs a command")
        timeout = check_seconds("timeout", timeout, positive=True)
        made = _command_env(env, self.root)
        hide = {value: name for name, value in (env or {}).items() if len(value) >= 4}
        fd, parts = self._folder(cwd or ".")
        os.close(fd)
        shown = (
            None if on_output is None else (lambda text: on_output(redactions.redact(text, hide)))
        )
        exit_code, output, timed_out = self.execute(
            command, "/".join(parts) or ".", made, timeout, shown
        )
        output = redactions.redact(output, hide)
        if timed_out:
            output += (
                f"\n[timed out after {timeout:g} s: the command and its processes were killed]"
            )
        kept, saved = cap_output(self, output, keep="tail", label="bash")
        return BashResult(exit_code, kept, saved is not None, saved, timed_out)

    def execute(
        self,
        command: str,
        cwd: str,
        env: dict[str, str],
        timeout: float,
        on_output: Callable[[str], object] | None,
    ) -> tuple[int | None, str, bool]:
        """Run `command` with bash in `cwd` (a checked folder relative to the root) with
        the environment `env`: `(exit code or None, output, timed out)`. `bash` redacts
        and caps what this returns; a subclass overrides it to run commands elsewhere (a
        container, a VM) while the files stay confined here. Here: on the host."""
        return _run_limited(
            ["bash", "-c", command],
            env=env,
            cwd=os.path.join(self.root, cwd),
            timeout=timeout,
            limits=self.limits,
            on_output=on_output,
            track=self._track,
        )

    def _track(self, proc: subprocess.Popen, alive: bool) -> None:
        """Note a command started (alive) or ended, so that stop() can kill it; one that
        started while stop() ran (after it killed the others) is killed here."""
        with self._lock:
            if not alive:
                self._running.discard(proc)
            elif self._root_fd is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                self._running.add(proc)


_SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# from /etc only what programs need to start (no shadow, no machine keys)
_ETC_ENTRIES = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "group",
    "host.conf",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "profile",
    "protocols",
    "resolv.conf",
    "services",
    "ssl",
    "timezone",
)


def _system_binds() -> list[str]:
    """bwrap options that show the system folders read-only (symlinks as symlinks) and the
    entries of /etc that programs need."""
    options = []
    for folder in _SYSTEM_FOLDERS:
        if os.path.islink(folder):
            options += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            options += ["--ro-bind", folder, folder]
    for entry in _ETC_ENTRIES:
        options += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    return options


class BwrapRuntime(LocalRuntime):
    """A scope's folder seen through bubblewrap: commands see it as /workspace (the only
    writable folder, .secrets masked), the system folders read-only, their own /tmp, /proc
    and /dev, no network unless allowed, no capabilities; they die with agentkit."""

    name = "bwrap"

    def __init__(
        self, scope: RuntimeScope, limits: RuntimeLimits, executable: str, network: bool
    ) -> None:
        super().__init__(scope, limits)
        self.root = "/workspace"
        self.executable, self.network = executable, network

    def execute(
        self,
        command: str,
        cwd: str,
        env: dict[str, str],
        timeout: float,
        on_output: Callable[[str], object] | None,
    ) -> tuple[int | None, str, bool]:
        """Run the command in a new bwrap sandbox, bound to the root by its descriptor."""
        with self._root() as root_fd:
            with contextlib.suppress(FileExistsError):
                os.mkdir(SECRETS, 0o700, dir_fd=root_fd)  # so that it is always there to mask
            argv = [
                self.executable,
                "--die-with-parent",
                "--new-session",
                "--unshare-user",
                "--unshare-ipc",
                "--unshare-pid",
                "--unshare-uts",
                "--unshare-cgroup-try",
                *([] if self.network else ["--unshare-net"]),
                *("--cap-drop", "ALL"),
                *_system_binds(),
                *("--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"),
                # --bind-fd: bwrap closes the descriptor once bound, so the command cannot
                # reach the host's view of the folder (unmasked .secrets, `..`) through it
                *("--bind-fd", str(root_fd), self.root),
                *("--tmpfs", f"{self.root}/{SECRETS}", "--remount-ro", f"{self.root}/{SECRETS}"),
                *("--chdir", os.path.normpath(f"{self.root}/{cwd}")),
                *("bash", "-c", command),
            ]
            return _run_limited(
                argv,
                env={**env, "TMPDIR": "/tmp"},
                cwd="/",
                timeout=timeout,
                limits=self.limits,
                pass_fds=(root_fd,),
                on_output=on_output,
                track=self._track,
            )


class LocalProvider:
    """Runtimes in the scopes' folders on this host: one per scope, kept until stopped."""

    name = "local"

    def __init__(self, *, limits: RuntimeLimits | None = None) -> None:
        if limits is not None and not isinstance(limits, RuntimeLimits):
            raise BadInput(f"limits is a RuntimeLimits, not {type(limits).__name__}")
        self.limits = limits or RuntimeLimits()
        self._runtimes: dict[tuple[str, str], LocalRuntime] = {}
        self._lock = threading.Lock()

    def make(self, scope: RuntimeScope) -> LocalRuntime:
        """A new runtime for a scope (a subclass returns its own kind)."""
        return LocalRuntime(scope, self.limits)

    def get(self, scope: RuntimeScope) -> LocalRuntime:
        """The scope's runtime, made on first use."""
        with self._lock:
            runtime = self._runtimes.get((scope.kind, scope.key))
            if runtime is None:
                runtime = self._runtimes[scope.kind, scope.key] = self.make(scope)
            return runtime

    def stop(self, scope: RuntimeScope | None = None) -> None:
        """Stop a scope's runtime (all with None): its running commands are killed."""
        with self._lock:
            keys = list(self._runtimes) if scope is None else [(scope.kind, scope.key)]
            stopped = [self._runtimes.pop(key) for key in keys if key in self._runtimes]
        for runtime in stopped:
            runtime.stop()


class BwrapProvider(LocalProvider):
    """Runtimes whose commands run in bubblewrap sandboxes (see BwrapRuntime); `network`
    lets them use the network."""

    name = "bwrap"

    def __init__(
        self,
        *,
        network: bool = False,
        limits: RuntimeLimits | None = None,
        executable: str = "bwrap",
    ) -> None:
        super().__init__(limits=limits)
        found = shutil.which(executable)
        if found is None:
            raise RuntimeUnavailable(
                f"bubblewrap ({executable}) is not installed: `apt-get install bubblewrap` on "
                "Debian and Ubuntu, `dnf install bubblewrap` on Fedora (or use runtime='local')"
            )
        self.executable, self.network = found, bool(network)

    def make(self, scope: RuntimeScope) -> BwrapRuntime:
        """A new bwrap runtime for a scope."""
        return BwrapRuntime(scope, self.limits, self.executable, self.network)


def runtime_provider(spec: str | RuntimeProvider) -> RuntimeProvider:
    """The provider a spec names: "local", "bwrap", or a RuntimeProvider object as is."""
    if spec == "local":
        return LocalProvider()
    if spec == "bwrap":
        return BwrapProvider()
    if not isinstance(spec, str) and isinstance(spec, RuntimeProvider):
        return spec
    raise BadInput(
        f"unknown runtime {spec!r}: use 'local', 'bwrap' or an object with get(scope) and "
        "stop(scope)"
    )


class Runtimes:
    """The kit's runtimes: its provider's, one per scope; a scope unused for `idle`
    seconds is stopped (by `sweep`, which workers call), and all of them on `close`."""

    def __init__(
        self, provider: RuntimeProvider, *, scope: str, workspace: Path, idle: float
    ) -> None:
        if scope not in RUNTIME_SCOPES:
            raise BadInput(f"runtime_scope is one of {', '.join(RUNTIME_SCOPES)}, not {scope!r}")
        self.provider, self.scope, self.workspace = provider, scope, workspace
        self.idle = check_seconds("runtime_idle", idle, positive=True)
        self._used: dict[tuple[str, str], tuple[RuntimeScope, float]] = {}
        self._lock = threading.Lock()
        # thread -> None: write its saved secrets into its folder on this host, before a
        # runtime of the thread's own scope is used (Secrets.write_files, set by the facade)
        self.secret_files: Callable[[str], None] = lambda thread: None

    def scope_of(self, thread_id: str, actor: str) -> RuntimeScope:
        """The scope a call in `thread_id` by `actor` works in. The thread's is its own
        folder; the others are folders beside the threads' (names that start with '.',
        which no thread's folder does), with no secrets in them."""
        key = {
            "thread": thread_id,
            "actor": actor,
            "adapter": thread_id.partition(":")[0],
            "kit": "kit",
        }[self.scope]
        if self.scope == "thread":
            root = self.workspace / workspace_name(thread_id)
        elif self.scope == "kit":
            root = self.workspace / ".kit"
        else:
            root = self.workspace / f".{self.scope}" / workspace_name(key)
        return RuntimeScope(self.scope, key, root)

    def get(self, thread_id: str, actor: str) -> Runtime:
        """The runtime of the scope of a call (started if needed), marked as used now."""
        scope = self.scope_of(thread_id, actor)
        if scope.kind == "thread":
            self.secret_files(thread_id)
        runtime = self.provider.get(scope)
        with self._lock:
            self._used[scope.kind, scope.key] = (scope, time.monotonic())
        return runtime

    def sweep(self) -> None:
        """Stop the runtimes unused for `idle` seconds."""
        cutoff = time.monotonic() - self.idle
        with self._lock:
            idle = [key for key, (_, used) in self._used.items() if used < cutoff]
            scopes = [self._used.pop(key)[0] for key in idle]
        for scope in scopes:
            self.provider.stop(scope)

    def close(self) -> None:
        """Stop every runtime of the provider."""
        with self._lock:
            self._used.clear()
        self.provider.stop(None)


# ──────────────────────────────────── workspace tools ────────────────────────────────────
# read, write, edit, ls, grep, find and bash for the model, each an ordinary Tool working on
# the runtime of the call's scope, with capped output.

WORKSPACE_TOOLS = ("read", "write", "edit", "ls", "grep", "find", "bash")
READ_ONLY_TOOLS = ("read", "ls", "grep", "find")  # idempotent; no approval by default
BASH_TIMEOUT = 600.0  # the longest timeout the bash tool may ask for


def _listing(ctx: ToolContext, lines: list[str], label: str, empty: str) -> str:
    """Lines as one capped tool result."""
    shown, saved = cap_output(ctx.runtime, "\n".join(lines), label=label)
    return (shown or empty) + (truncation_note(saved) if saved else "")


def _read_tool(path: str, ctx: ToolContext, offset: int = 0, limit: int | None = None) -> str:
    """Read a text file of the workspace (paths are relative to it). A long file is shown
    in parts: offset is the first line (0-based), limit the number of lines."""
    text = ctx.runtime.read(path, offset=offset, limit=limit)
    shown = _cut(text, "head")
    if shown == text:
        return text
    last = offset + max(1, shown.count("\n"))
    return (
        shown
        + f"\n[showing lines {offset}-{last - 1}; the file goes on: read it with offset={last}]"
    )


def _write_tool(path: str, text: str, ctx: ToolContext) -> str:
    """Create or replace a text file of the workspace (its folders are made as needed)."""
    ctx.runtime.write(path, text)
    return f"wrote {len(text.encode())} bytes to {path}"


def _edit_tool(path: str, edits: list[dict[str, str]], ctx: ToolContext) -> str:
    """Edit a text file of the workspace: edits is a list of {"old": exact text, "new":
    replacement}, applied in order. Each old text must occur exactly once (add context
    lines to make it unique), or the file is not changed at all."""
    pairs = []
    for number, item in enumerate(edits, 1):
        if set(item) != {"old", "new"}:
            raise BadInput(f'edit {number} must have exactly the keys "old" and "new"')
        pairs.append((item["old"], item["new"]))
    ctx.runtime.edit(path, pairs)
    return f"applied {len(pairs)} edit(s) to {path}"


def _ls_tool(ctx: ToolContext, path: str = ".") -> str:
    """List a folder of the workspace (folders end with '/')."""
    return _listing(ctx, ctx.runtime.ls(path), "ls", "(empty folder)")


def _grep_tool(pattern: str, ctx: ToolContext, path: str = ".", glob: str | None = None) -> str:
    """Search the text files of the workspace for a regular expression (Python syntax);
    glob (like '*.py') limits the files searched. Answers file:line: text."""
    found = ctx.runtime.grep(pattern, path, glob=glob)
    return _listing(ctx, found, "grep", "(no match)")


def _find_tool(glob: str, ctx: ToolContext, path: str = ".") -> str:
    """Find files and folders of the workspace by name ('*.py') or by relative path when
    the glob has a '/' ('src/*/test_*.py')."""
    return _listing(ctx, ctx.runtime.find(glob, path), "find", "(nothing found)")


def _bash_tool(command: str, ctx: ToolContext, timeout: float = 120.0) -> str:
    """Run a bash command in the workspace folder; stdout and stderr come back together,
    with the exit code. Long output keeps its end (the full output is saved in the
    workspace). timeout: seconds (at most 600); a command that takes longer is killed
    with everything it started, and so are background processes when it ends."""
    if not 0 < timeout <= BASH_TIMEOUT:
        raise BadInput(f"timeout is a number of seconds > 0 and <= {BASH_TIMEOUT:g}")
    result = ctx.runtime.bash(command, timeout=timeout, on_output=ctx.progress)
    note = truncation_note(result.full_output_path or "", "tail") if result.truncated else ""
    status = "" if result.exit_code is None else f"\n[exit code {result.exit_code}]"
    return f"{result.output}{note}{status}"


_TOOL_FUNCTIONS: dict[str, Callable[..., str]] = {
    "read": _read_tool,
    "write": _write_tool,
    "edit": _edit_tool,
    "ls": _ls_tool,
    "grep": _grep_tool,
    "find": _find_tool,
    "bash": _bash_tool,
}


def workspace_tools_of(
    names: bool | Sequence[str],
    approval: bool | Callable[[str, dict[str, Any], ToolContext], bool | str] = True,
) -> list[Tool]:
    """The workspace tools to register: all (True), none (False) or those named. With
    `approval=True` bash, write and edit wait for an approver; False lets all run; a
    callable `(tool name, args, ctx) -> bool | str` decides for every call of them."""
    if names is True:
        chosen: Sequence[str] = WORKSPACE_TOOLS
    elif names is False:
        chosen = ()
    elif isinstance(names, (list, tuple)) and all(n in WORKSPACE_TOOLS for n in names):
        chosen = names
    else:
        raise BadInput(
            f"workspace_tools is True, False or a list of {', '.join(WORKSPACE_TOOLS)}, "
            f"not {names!r}"
        )
    if not isinstance(approval, bool) and not callable(approval):
        raise BadInput(f"workspace_tools_approval is a bool or a callable, not {approval!r}")

    def rule(name: str) -> bool | Callable[[dict[str, Any], ToolContext], bool | str]:
        if callable(approval):
            return lambda args, ctx: approval(name, args, ctx)
        return approval and name not in READ_ONLY_TOOLS

    return [
        Tool(
            _TOOL_FUNCTIONS[name],
            name=name,
            idempotent=name in READ_ONLY_TOOLS,
            approval=rule(name),
        )
        for name in chosen
    ]


# ───────────────────────────── context: the window, compaction ─────────────────────────────
# What the model sees of a thread (instructions, the latest summary, the messages kept after
# it), about how many tokens that is, and compaction: older messages summarised into a row.

CHARS_PER_TOKEN = 4  # the estimate for text no provider has counted yet
IMAGE_TOKENS = 1_200  # what one image counts, whatever its size
SUMMARY_RESULT_CHARS = 2_000  # how much of one tool result the summariser reads
SUMMARY_PREFIX = (
    "The conversation before this point was compacted into the summary below; the messages "
    "after it follow verbatim."
)
SUMMARY_STRUCTURE = """## Goal
What the user wants to achieve.
## Constraints
Requirements and preferences the user stated.
## Progress
### Done
### In progress
### Blocked
## Key decisions
Each with its reason.
## Next steps
## Critical context
Facts, values, names, errors and references needed to continue.
## Files touched
Paths read, written or edited, with what was done to each."""
SUMMARY_INSTRUCTIONS = (
    "You write the working memory of an AI assistant: a summary of a conversation between "
    "a user and the assistant (with its tool calls and their results) from which the "
    "assistant continues the work without the messages themselves. Keep every fact, value, "
    "name, path and decision the rest of the work needs; drop pleasantries and repetition. "
    "Do not continue the conversation and do not answer its questions. Answer with the "
    "summary only, in exactly this Markdown structure (write 'none' under a heading with "
    "nothing to say):\n\n" + SUMMARY_STRUCTURE
)
TURN_PREFIX_HEADING = "## Earlier in the current turn"


def image_count(message: dict[str, Any]) -> int:
    """How many images a neutral message carries (its files of an image type)."""
    return sum(1 for file in message.get("files") or () if file["mime"].startswith("image/"))


def text_tokens(text: str) -> int:
    """About how many tokens a text is (CHARS_PER_TOKEN characters a token)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def message_tokens(message: dict[str, Any]) -> int:
    """About how many tokens a neutral message costs: its JSON at CHARS_PER_TOKEN
    characters a token, each image IMAGE_TOKENS."""
    text = dumps(message)  # a file is its name, type, size and id here, its bytes elsewhere
    return text_tokens(text) + IMAGE_TOKENS * image_count(message)


def summary_message(summary: str) -> dict[str, Any]:
    """The user message that shows the model a compaction's summary."""
    return {"role": "user", "content": f"{SUMMARY_PREFIX}\n\n<summary>\n{summary}\n</summary>"}


@dataclass(frozen=True)
class _Piece:
    """One message row of a thread as the model reads it: an assistant row brings its tool
    calls and their results along, so a cut between pieces never separates them."""

    row: MessageRow
    messages: list[dict[str, Any]]
    tokens: int


@dataclass(frozen=True)
class ContextView:
    """What the model sees of a thread: the latest compaction's summary, then its pieces."""

    compaction: Compaction | None
    pieces: list[_Piece]

    def messages(self) -> list[dict[str, Any]]:
        head = [summary_message(self.compaction.summary)] if self.compaction else []
        return head + [message for piece in self.pieces for message in piece.messages]


def _transcript(pieces: Sequence[_Piece]) -> list[str]:
    """Pieces as the summariser reads them, one text each (long tool results cut)."""
    texts = []
    for piece in pieces:
        lines = []
        for message in piece.messages:
            role = message["role"]
            if role == "tool":
                kind = "tool error" if message.get("is_error") else "tool result"
                result = clip(message.get("content") or "", SUMMARY_RESULT_CHARS)
                lines.append(f"[{kind} {message['name']}]: {result}")
                continue
            if message.get("content"):
                lines.append(f"[{role}]: {message['content']}")
            for call in message.get("tool_calls") or ():
                lines.append(f"[assistant calls {call['name']}]: {dumps(call['args'])}")
            if image_count(message):
                lines.append(f"[{image_count(message)} image(s)]")
        texts.append("\n".join(lines))
    return texts


class ContextWindow:
    """The model's view of a thread, within its context window.

    Before each model step the view is estimated: the tokens its provider reported for the
    newest step since the last compaction, plus about 4 characters a token for what came
    after (everything, when no step reported usage). When that exceeds the window less
    `reserve_tokens` (at most half the window), the thread is compacted: the newest
    `keep_recent_tokens` (at most half of the rest) stay verbatim, cut before a user or
    assistant message (an assistant message keeps its tool calls and their results), and
    the older part is summarised by `summary_model` (else the thread's model) into
    SUMMARY_STRUCTURE. A later
    compaction updates the previous summary with the messages since, and a turn cut in two
    has its earlier part summarised on its own. A compaction is one row written in the
    turn's fenced transaction; no message is ever deleted.
    """

    def __init__(
        self,
        records: Records,
        hooks: Hooks,
        *,
        context_window: int | None,
        reserve_tokens: int,
        keep_recent_tokens: int,
        summary_model: Model | None,
        max_messages: int | None,
        max_chars: int | None,
    ) -> None:
        self.records = records
        self.store = records.store
        self.hooks = hooks
        self.context_window = check_window(context_window)
        self.reserve_tokens = check_int("reserve_tokens", reserve_tokens)
        self.keep_recent_tokens = check_int("keep_recent_tokens", keep_recent_tokens, low=1)
        self.summary_model = summary_model
        self.max_messages = max_messages
        self.max_chars = max_chars

    def window(self, model: Model) -> int:
        """The window planned for: the kit's `context_window`, else the model's."""
        return self.context_window or context_window_of(model)

    def room(self, model: Model) -> int:
        """The tokens a request may use: the window less `reserve_tokens` (at most half of
        it, so a small window still holds a conversation)."""
        window = self.window(model)
        return window - min(self.reserve_tokens, window // 2)

    def view(self, thread: str, *, capped: bool = True) -> ContextView:
        """The latest compaction and the messages after it (within `max_messages` and
        `max_chars` when they are set and `capped`)."""
        compaction = self.store.last_compaction(thread)
        rows = self.store.messages_from(thread, compaction.first_kept if compaction else 0)
        pieces = [
            _Piece(row, messages, sum(map(message_tokens, messages)))
            for row, messages in zip(rows, self.records.neutral(rows), strict=True)
        ]
        return ContextView(compaction, self._capped(pieces) if capped else pieces)

    def _capped(self, pieces: list[_Piece]) -> list[_Piece]:
        """The newest exchanges (each from a user message on) within `max_messages` and
        `max_chars`; the newest is always kept."""
        if self.max_messages is None and self.max_chars is None:
            return pieces
        pieces = pieces[-self.max_messages :] if self.max_messages else pieces
        exchanges: list[list[_Piece]] = []
        for piece in pieces:
            if piece.row.role == "user":
                exchanges.append([piece])
            elif exchanges:
                exchanges[-1].append(piece)
        kept: list[list[_Piece]] = []
        size = 0
        for exchange in reversed(exchanges):
            size += len(dumps([m for piece in exchange for m in piece.messages]))
            if kept and self.max_chars is not None and size > self.max_chars:
                break
            kept.append(exchange)
        return [piece for exchange in reversed(kept) for piece in exchange]

    def estimate(self, view: ContextView, instructions: str, tools: list[dict[str, Any]]) -> int:
        """About how many tokens the model is sent for a view: the usage its provider
        reported for the newest step since the compaction, and an estimate for the rest."""
        after = view.compaction.last_message if view.compaction else 0
        for index in range(len(view.pieces) - 1, -1, -1):
            piece = view.pieces[index]
            if piece.row.tokens is not None and piece.row.id > after:
                results = sum(map(message_tokens, piece.messages[1:]))
                return piece.row.tokens + results + sum(p.tokens for p in view.pieces[index + 1 :])
        fixed = text_tokens(instructions) + text_tokens(dumps(tools))
        head = message_tokens(summary_message(view.compaction.summary)) if view.compaction else 0
        return fixed + head + sum(piece.tokens for piece in view.pieces)

    def usage(
        self, thread: str, model: Model, instructions: str, tools: list[dict[str, Any]]
    ) -> dict[str, int]:
        """`{"tokens": the estimate, "window": the window}` of a thread now."""
        tokens = self.estimate(self.view(thread), instructions, tools)
        return {"tokens": tokens, "window": self.window(model)}

    def request(
        self,
        turn: TurnRow,
        model: Model,
        instructions: str,
        tools: list[dict[str, Any]],
        ask: Callable[[list[dict[str, Any]]], ModelReply],
    ) -> ModelReply:
        """The model's reply to the thread's view, compacted first when the estimate nears
        the window. A refusal as too long (or a reported input over the window) is dropped,
        the thread compacted and asked once more; ContextTooLong when that overflows too."""
        window = self.window(model)
        view = self.view(turn.thread_id)
        if self.estimate(view, instructions, tools) > self.room(model):
            self.compact(turn.thread_id, model, made_by="auto", turn=turn)
            view = self.view(turn.thread_id)
        for attempt in (1, 2):
            try:
                reply = ask(view.messages())
            except ContextTooLong as e:
                error = str(e)
            else:
                used = reply.usage.get("input_tokens", 0)
                if used <= window:
                    return reply
                error = f"{model.name} reported {used} input tokens, over its window of {window}"
            if attempt == 2:
                break
            log.info("%s overflowed the context window, compacting: %s", turn.id, error)
            self.compact(turn.thread_id, model, made_by="overflow", turn=turn)
            view = self.view(turn.thread_id)
        raise ContextTooLong(
            f"the conversation does not fit the context window of {model.name} ({window} "
            f"tokens) even after compaction ({error}); start a new thread, or give a "
            "smaller keep_recent_tokens or the model's real context_window"
        )

    def compact(
        self,
        thread: str,
        model: Model,
        *,
        made_by: str,
        turn: TurnRow | None = None,
        focus: str | None = None,
    ) -> Compaction | None:
        """Summarise the thread's messages older than the newest `keep_recent_tokens` (the
        `before_compact` hooks may skip that or give the summary) and store the compaction;
        None when nothing was compacted."""
        view = self.view(thread, capped=False)
        cut = self._cut(view.pieces, model)
        if cut is None:
            return None
        tokens = self.estimate(view, "", [])
        older = view.pieces[:cut]
        fields = {"thread_id": thread, "turn_id": turn and turn.id, "actor": turn and turn.actor}
        hooked = self.hooks.emit(
            "before_compact",
            **fields,
            messages=[message for piece in older for message in piece.messages],
            tokens=tokens,
            instructions=focus,
            made_by=made_by,
        )
        if any(isinstance(answer, Block) for answer in hooked):
            return None
        given = next((answer for answer in hooked if isinstance(answer, str)), None)
        summary = given if given is not None else self._summarise(view, cut, model, focus)
        with self.records.transaction():
            made = self.store.add_compaction(
                thread,
                self.records.clean(thread, summary),
                view.pieces[cut].row.id,
                view.pieces[-1].row.id,
                tokens,
                made_by,
                view.compaction.id if view.compaction else None,
            )
        if made is None:  # another compaction came first: the view moved on from this one
            return self.store.last_compaction(thread)
        log.info("compacted %s: %d tokens, from message %d on", thread, tokens, made.first_kept)
        with contextlib.suppress(HookFailed):  # the compaction stands; the error is logged
            self.hooks.emit("compacted", **fields, compaction=made)
        return made

    def _cut(self, pieces: list[_Piece], model: Model) -> int | None:
        """The index of the first piece kept verbatim (the newest ones within the recent
        budget, at least one), or None when there is nothing older to summarise. A cut
        that falls inside a turn moves back to its user message when the kept part stays
        within twice the budget; otherwise the turn is cut in two."""
        budget = min(self.keep_recent_tokens, self.room(model) // 2)
        kept = 0
        for index in range(len(pieces) - 1, 0, -1):
            kept += pieces[index].tokens
            if kept < budget:
                continue
            start = index
            while start > 0 and pieces[start].row.role != "user":
                start -= 1
                kept += pieces[start].tokens
            return start if start > 0 and kept <= 2 * budget else index
        return None

    def _summarise(self, view: ContextView, cut: int, model: Model, focus: str | None) -> str:
        """The summary of everything before piece `cut`, the previous one updated; a turn
        cut in two has its earlier part summarised under TURN_PREFIX_HEADING."""
        previous = view.compaction.summary if view.compaction else None
        start = cut
        while start > 0 and view.pieces[start].row.role != "user":
            start -= 1
        if view.pieces[cut].row.role == "user" or view.pieces[start].row.role != "user":
            start = cut  # no split turn, or one that began before the previous compaction
        summary = self._update(previous, view.pieces[:start], model, focus)
        if start == cut:
            return summary or ""
        prefix = self._update(None, view.pieces[start:cut], model, focus, turn_prefix=True)
        return f"{summary}\n\n{TURN_PREFIX_HEADING}\n{prefix}" if summary else prefix or ""

    def _update(
        self,
        summary: str | None,
        pieces: Sequence[_Piece],
        model: Model,
        focus: str | None,
        *,
        turn_prefix: bool = False,
    ) -> str | None:
        """`summary` updated with pieces, in chunks that fit the summariser's window."""
        summariser = self.summary_model or model
        room = self.room(summariser) - text_tokens(SUMMARY_INSTRUCTIONS)
        room -= 2 * text_tokens(summary or "")  # the previous summary in, its update out
        chunk_chars = max(room, 1_000) * CHARS_PER_TOKEN
        chunks: list[list[str]] = [[]]
        for text in _transcript(pieces):
            if chunks[-1] and sum(map(len, chunks[-1])) + len(text) > chunk_chars:
                chunks.append([])
            chunks[-1].append(text)
        for chunk in chunks if pieces else []:
            parts = []
            if turn_prefix:
                parts.append(
                    "This is the first part of a turn too long to keep whole; its last part "
                    "stays verbatim. Summarise what was asked and done so far in it."
                )
            if summary:
                parts.append(
                    "Update this summary with the messages that follow it: keep what still "
                    "holds, move finished work to Done, add what is new.\n\n"
                    f"<previous-summary>\n{summary}\n</previous-summary>"
                )
            parts.append("<conversation>\n" + "\n\n".join(chunk) + "\n</conversation>")
            if focus:
                parts.append(f"Focus the summary on: {focus}")
            prompt = [{"role": "user", "content": "\n\n".join(parts)}]
            reply = summariser.complete(SUMMARY_INSTRUCTIONS, prompt, [])
            if not (reply.text or "").strip():
                raise ModelError(f"{summariser.name} answered the summary request with no text")
            summary = reply.text.strip()  # type: ignore[union-attr]
        return summary


# ──────────────────────────────────── the turn engine ────────────────────────────────────

PROMPT_TASK = "agentkit.prompt"
COMMAND = re.compile(r"/([A-Za-z0-9_]{1,32})(?:@\S+)?(?:\s+(.*))?", re.S)
INTERRUPTED = "interrupted: the process running this call stopped; its effect is unknown"


def waiting_note(waiting: Sequence[Approval]) -> str:
    """What a message to a waiting thread is told: what it waits for, and how to decide."""
    asks = "; ".join(f"{a.tool} ({a.id}, asked by {a.requester})" for a in waiting)
    first = waiting[0].id if waiting else "ID"
    return (
        f"This conversation is waiting for approval of {asks or 'a tool call'}. Decide with "
        f"/approve {first} or /deny {first} [reason]; your message will be handled after that."
    )


def parse_command(text: str) -> tuple[str, str] | None:
    """`(name, args)` of a chat command like `/ping a b`, else None."""
    match = COMMAND.fullmatch(text.strip())
    return (match[1].lower(), (match[2] or "").strip()) if match else None


@dataclasses.dataclass(frozen=True)
class TurnResult:
    """What `run_turn` returns: the turn's status, the reply, the error and the usage.
    Status `rejected` means the text was a refused secret blob: no turn started
    (`turn_id` is None), and `error` and `note` hold what the sender was told."""

    turn_id: str | None  # None when nothing was started (a rejected secret blob)
    thread_id: str
    status: str  # done | waiting_approval | failed | cancelled | queued | running | rejected
    reply: str | None
    error: str | None
    usage: dict[str, int]
    approvals: tuple[Approval, ...] = ()
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class TurnEvent:
    """One thing that happened in a running turn, as `stream_turn` yields it.

    `kind` is one of "text" (`.text` is a delta; a step's deltas join
    to its stored text), "tool_start" and "tool_end" (`.tool`, `.call_id`, `.args`; at the
    end `.result` is the tool's result text and `.is_error` says whether it failed),
    "progress" (`.text`, a tool's `ctx.progress` line), "approval" (`.approval`), and last
    "done", whose `.result` is the TurnResult. `.step` counts the turn's model steps from 0.
    """

    kind: str
    turn_id: str
    thread_id: str
    step: int = 0
    text: str = ""
    tool: str | None = None
    call_id: str | None = None
    args: dict[str, Any] | None = None
    result: Any = None
    is_error: bool = False
    approval: Approval | None = None


class LiveEvents:
    """The live fan-out of running turns, in this process: events by turn id to whoever
    watches, then forgotten (never stored; the stored steps stay the truth). Callbacks run
    in the turn's thread and must be quick (put the event in a queue). Beside the kinds
    of TurnEvent, watchers hear "thinking" as each model request starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[str, list[Callable[[TurnEvent], None]]] = {}
        self._listeners: list[Callable[[TurnEvent], None]] = []

    def watch(self, turn_id: str, fn: Callable[[TurnEvent], None]) -> Callable[[], None]:
        """Call `fn` with each event of one turn; returns the function that stops it."""
        with self._lock:
            self._watchers.setdefault(turn_id, []).append(fn)

        def unwatch() -> None:
            with self._lock:
                watchers = self._watchers.get(turn_id, [])
                if fn in watchers:
                    watchers.remove(fn)
                if not watchers:
                    self._watchers.pop(turn_id, None)

        return unwatch

    def listen(self, fn: Callable[[TurnEvent], None]) -> None:
        """Call `fn` with every event of every turn (adapters that stream replies)."""
        with self._lock:
            self._listeners.append(fn)

    def publish(self, event: TurnEvent) -> None:
        """Give an event to its turn's watchers and to the listeners (errors are logged)."""
        with self._lock:
            targets = [*self._watchers.get(event.turn_id, ()), *self._listeners]
        for fn in targets:
            try:
                fn(event)
            except Exception:
                log.exception("a live event watcher of %s raised", event.turn_id)


def _secret_start(text: str, values: Iterable[str]) -> int:
    """How many characters at the end of `text` could begin one of `values`."""
    held = 0
    for value in values:
        for start in range(max(0, len(text) - len(value) + 1), len(text) - held):
            if value.startswith(text[start:]):
                held = len(text) - start
                break
    return held


class _LiveText:
    """A step's text as it streams, redacted: the last characters wait while they could
    begin a secret, so no secret reaches a watcher even when cut across deltas."""

    def __init__(self, values: dict[str, str], emit: Callable[[str], None]) -> None:
        self.values = values  # value -> label, as Redactions.redact takes them
        self.emit = emit
        self.raw = ""
        self.shown: list[str] = []  # the pieces passed on (joined only when compared)
        self.length = 0  # their length

    def add(self, delta: str) -> None:
        if not self.values:
            self._pass(delta)
            return
        self.raw += delta
        text = redactions.redact(self.raw, self.values)
        self._show(text[: len(text) - _secret_start(text, self.values)])

    def finish(self, stored: str | None) -> None:
        """Pass on the rest of the step's stored text (all of it when nothing streamed)."""
        self._show(stored or "")

    def _show(self, text: str) -> None:
        if len(text) > self.length and text.startswith("".join(self.shown)):
            self._pass(text[self.length :])

    def _pass(self, new: str) -> None:
        self.shown.append(new)
        self.length += len(new)
        self.emit(new)


TEXT_FILE_BYTES = 100_000  # a text file up to this size is put in the message itself
TEXT_MIMES = ("text/*", "application/json", "application/xml", "application/*+xml")
TEXT_MIMES += ("application/x-yaml", "application/yaml", "application/toml", "application/csv")


def mime_matches(mime: str, patterns: Iterable[str]) -> bool:
    """Whether a media type is one of `patterns` (`image/*` style)."""
    return any(fnmatch.fnmatchcase(mime.lower(), pattern.lower()) for pattern in patterns)


class FileParts:
    """The one place a message's files become what a model reads, by the model's
    `attachment_types` (media type patterns; none by default): a type it takes goes as
    an `image` or `document` part (base64), a text file up to TEXT_FILE_BYTES is put in
    the text as `<file name="…">…</file>`, and any other file is described (name, type,
    size and id, so a tool can open it), never dropped silently."""

    def __init__(self, model: Model, records: "Records") -> None:
        self.accepted: tuple[str, ...] = tuple(getattr(model, "attachment_types", ()) or ())
        self.records = records

    def messages(self, thread: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages, the user's and tool results with files given their content: a
        list of parts, `{"type": "text", "text"}` then `{"type": "image" | "document",
        "mime", "name", "data"}`, when a file goes as a part, else the text (the files a
        tool only attached were sent, not shown)."""
        return [
            {**m, "content": self.parts(thread, m)}
            if m.get("files") and m.get("role") in ("user", "tool")
            else m
            for m in messages
        ]

    def parts(self, thread: str, message: dict[str, Any]) -> str | list[dict[str, Any]]:
        """A message's content with its files: a text when none is shown as a part."""
        texts = [message.get("content") or ""]
        parts: list[dict[str, Any]] = []
        for file in message["files"]:
            mime, name = file["mime"], file["name"]
            if mime_matches(mime, self.accepted):
                data = base64.b64encode(self.records.open_file(thread, file["id"])).decode()
                kind = "image" if mime.startswith("image/") else "document"
                parts.append({"type": kind, "mime": mime, "name": name, "data": data})
            elif mime_matches(mime, TEXT_MIMES) and file["size"] <= TEXT_FILE_BYTES:
                text = self.records.open_file(thread, file["id"]).decode("utf-8", "replace")
                quoted = name.replace('"', "'")
                texts.append(f'<file name="{quoted}">\n{text}\n</file>')
            else:
                texts.append(file_note(file))
        text = "\n\n".join(t for t in texts if t)
        return [{"type": "text", "text": text}, *parts] if parts else text


_Started = tuple[str, Tool, dict[str, Any], ToolContext, concurrent.futures.Future, int]
# a call started by TurnEngine.start_calls: its id, tool, args, context, future, message


class TurnEngine:
    """Runs turns as jobs: the model loop, tool calls, hooks and commands.

    Every step is stored as it happens, so a turn whose worker died continues from its
    rows: a tool call runs only after its row moved to `running` (one worker wins that),
    and a call found `running` after a crash is run again only if its tool is idempotent;
    otherwise the model is told that it was interrupted.
    """

    def __init__(
        self,
        queue: Queue,
        *,
        model: Model,
        instructions: str,
        workspace: Path,
        max_steps: int,
        approval_ttl: float,
        while_busy: str = "next_turn",
        parallel_tools: bool = True,
        **context: Any,
    ) -> None:
        """`context` holds the options of its ContextWindow."""
        self.approval_ttl = approval_ttl
        self.queue = queue
        self.records = Records(queue)
        self.model = model
        self.while_busy = check_choice("while_busy", while_busy, DELIVERIES)
        self.parallel_tools = parallel_tools
        self.instructions = instructions
        self.workspace = workspace
        self.max_steps = max_steps
        self.tools: dict[str, Tool] = {}
        self.mcp_servers: dict[str, McpServer] = {}  # more tools, by server name
        self.hooks = Hooks()
        self.context = ContextWindow(self.records, self.hooks, **context)
        self.commands: dict[str, Callable[[ToolContext, str], Any]] = {
            "help": self.help,
            "compact": self.compact_command,
        }
        self.runtimes: Runtimes | None = None  # where ctx.runtime and the workspace tools work
        self.live = LiveEvents()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        queue.tasks[TURN_TASK] = Task(TURN_TASK, self.run, retries=5, backoff=1.0)
        queue.tasks[PROMPT_TASK] = Task(PROMPT_TASK, self.prompt, retries=5, backoff=1.0)

    # intake

    def submit(
        self,
        thread: str,
        text: str,
        actor: str,
        source_id: str | None,
        meta: dict[str, Any] | None = None,
        files: Sequence[File | Attachment] = (),
        group: tuple[str, float] | None = None,
        *,
        deliver: str | None = None,
    ) -> str:
        """Record an inbound message (with its files) and queue its turn in one
        transaction; the turn id.

        `/cancel` is handled here at once: it cancels the thread's queued, running and
        waiting turns. A message to a thread that waits for an approval is held until
        the decision (and told so). Commands run at once, outside the thread's order.
        The parts of one `group` `(key, wait)` (an album) join one turn while it is
        queued; it starts `wait` seconds after the last part came. `deliver` ("steer" or
        "follow_up"; else `while_busy` for a thread that is not waiting) queues a message
        without files into a turn active in the thread, whose id it returns.
        """
        command = parse_command(text)
        with self.queue.store.transaction():
            if group is not None:
                first = self.records.seen(thread.partition(":")[0], f"group:{group[0]}")
                if first is None:
                    source_id = f"group:{group[0]}"  # the first part: the group's turn
                elif self.join_group(first, text, files, group[1]):
                    return first.id
            how = deliver or self.while_busy
            if (
                command is None
                and how != "next_turn"
                and not files
                and group is None
                and not (deliver is None and self.records.waiting_in(thread))  # held, as before
            ):
                joined = self.records.queue_message(thread, actor, text, how, source_id)
                if joined is not None:
                    self.queue.store.notify()
                    return joined
            turn_id, created = self.records.add_turn(thread, actor, text, source_id, meta)
            if not created:
                return turn_id
            saved = self.records.save_files(thread, turn_id, files)
            shown = {"files": [file_info(a) for a in saved]} if saved else {}
            self.records.deliver(thread, turn_id, "user", text, **shown)
            if command and command[0] == "cancel":
                active = self.records.active_turns(thread, turn_id)
                for other in active:
                    self.records.cancel(other)
                reply = f"Cancelled {len(active)} turn(s)." if active else "Nothing to cancel."
                self.records.add_message(thread, turn_id, "user", text, command=True)
                self.records.add_message(thread, turn_id, "assistant", reply, command=True)
                self.records.end(turn_id, "done", reply=reply)
                return turn_id
            if command or not self.records.holds_messages(thread, turn_id):
                target = None if command else thread
                wait = 0.0 if group is None else group[1]
                job = self.records.enqueue_turn(turn_id, f"turn:{turn_id}", target, wait)
                self.queue.store.set_turn_job(turn_id, job)
            else:
                note = waiting_note(self.records.waiting_in(thread))
                self.records.deliver(thread, turn_id, "notice", note)
        self.queue.store.notify()
        return turn_id

    def join_group(
        self, turn: TurnRow, text: str, files: Sequence[File | Attachment], wait: float
    ) -> bool:
        """Add a part of a group to the group's turn while it is queued (its text joins
        the turn's, its start moves `wait` seconds on); False when it started already
        (a part that late makes a turn of its own)."""
        joined = "\n".join(part for part in (turn.text, text) if part)
        if not self.queue.store.postpone_turn(turn.id, joined, self.queue.store.now() + wait):
            return False
        saved = self.records.save_files(turn.thread_id, turn.id, files)
        shown = [file_info(a) for a in saved]
        self.records.deliver(turn.thread_id, turn.id, "user", text, files=shown)
        return True

    def prompt(self, payload: dict[str, str], ctx: JobContext) -> str:
        """The task of scheduled prompts: start a turn in the schedule's thread."""
        return self.submit(payload["thread"], payload["prompt"], payload["actor"], ctx.job_id)

    def result(self, turn_id: str) -> TurnResult:
        """A turn as `run_turn` reports it; a held turn carries a note on what it waits for."""
        turn = self.records.turn(turn_id)
        usage = {"input_tokens": turn.input_tokens, "output_tokens": turn.output_tokens}
        notes = [
            f"Open this link to give {', '.join(name for name, _ in r.fields)} securely "
            f"(expires {iso(r.expires_at)}): {r.url}"
            for r in self.queue.store.pending_secret_requests(turn.id)
        ]
        if turn.status == "queued" and turn.job_id is None:
            waiting = self.records.waiting_in(turn.thread_id)
            notes.append(waiting_note(waiting))
        note = "\n".join(notes) or None
        approvals = tuple(self.records.pending_approvals(turn.id))
        return TurnResult(
            turn.id, turn.thread_id, turn.status, turn.reply, turn.error, usage, approvals, note
        )

    # the job

    def run(self, payload: dict[str, str], ctx: JobContext) -> str:
        """The task of turn jobs: take the turn as far as it goes."""
        turn = self.records.turn(payload["turn"])
        if turn.status in FINAL_TURN_STATES:
            return turn.status
        hooked = self.records.lease.entries = Entries(turn.thread_id, turn.id)
        try:
            return self.advance(turn, ctx, hooked)
        finally:
            self.records.lease.entries = None

    def advance(self, turn: TurnRow, ctx: JobContext, hooked: Entries) -> str:
        """Run a turn job's turn as far as it goes; its status then. The entries its hooks
        append go in with its next write (those of `turn_end` in one of their own)."""
        self.records.lease.job = ctx
        try:
            command = parse_command(turn.text)
            if turn.status == "queued":
                instructions, added = (None, []) if command else self.before_turn(turn)
                if not self.records.start(
                    turn, command=command is not None, instructions=instructions, added=added
                ):
                    return self.records.turn(turn.id).status
                if command is None:
                    self.emit(turn, "message_received", text=turn.text)
                    self.emit(turn, "turn_start")
            if command is not None:
                self.records.answer(turn, self.run_command(turn, *command))
            else:
                self.loop(turn.id)
        except (StoreError, ToolUnavailable):
            raise  # the job is retried and the turn continues from its rows
        except LeaseLost:
            raise  # another worker has the turn now: this one writes nothing more
        except Exception as e:
            if not isinstance(e, (ModelError, HookFailed)):
                log.exception("%s failed", turn.id)
            self.records.finish(turn.id, "failed", error=describe_error(e))
        finally:
            self.records.lease.job = None
        final = self.records.turn(turn.id)
        why = f": {final.error}" if final.status == "failed" and final.error else ""
        log.info(
            "%s in %s: %s after %d steps%s",
            turn.id,
            turn.thread_id,
            final.status,
            final.steps,
            self.redact(turn.thread_id, why),
        )
        if final.status in FINAL_TURN_STATES:
            with contextlib.suppress(HookFailed):
                self.emit(
                    final, "turn_end", status=final.status, reply=final.reply, error=final.error
                )
        if hooked.pending():
            with self.records.transaction():
                pass  # the transaction writes them
        if final.status in (*FINAL_TURN_STATES, "waiting_approval"):
            self.tell(final, "done", step=max(final.steps - 1, 0), result=self.result(final.id))
        return final.status

    def before_turn(self, turn: TurnRow) -> tuple[str | None, list[str]]:
        """What the `before_turn` hooks give a turn, in the order they were registered:
        their instructions joined, and their messages for the thread."""
        instructions, added = [], []
        for given in self.emit(turn, "before_turn", text=turn.text):
            if given is None:
                continue
            if not isinstance(given, dict) or not given or set(given) - {"instructions", "message"}:
                raise HookFailed(
                    f"a before_turn hook returned {clip(repr(given), 100)}: return None or a "
                    'dict with "instructions" and/or "message" (texts)'
                )
            for key, into in (("instructions", instructions), ("message", added)):
                if key in given:
                    into.append(check_text(given[key], f"before_turn {key}"))
        return "\n\n".join(instructions) or None, added

    def context_of(
        self, turn: TurnRow, call_id: str | None, tool: str | None = None
    ) -> ToolContext:
        """The ToolContext of a call (or of a command, with no call id) in a turn; a running
        call's `progress` goes to the turn's watchers."""

        def progress(text: str) -> None:
            text = clip(self.redact(turn.thread_id, text), 500)  # redacted whole, then cut
            step = max(turn.steps - 1, 0)
            self.tell(turn, "progress", step=step, tool=tool, call_id=call_id, text=text)

        return ToolContext(
            thread_id=turn.thread_id,
            turn_id=turn.id,
            actor=turn.actor,
            call_id=call_id,
            root=self.workspace,
            runtime=self.runtimes
            and functools.partial(self.runtimes.get, turn.thread_id, turn.actor),
            on_progress=progress if tool is not None else None,
            files=lambda: [row.attachment for row in self.queue.store.turn_attachments(turn.id)],
            open_file=functools.partial(self.records.open_file, turn.thread_id),
            entries=None if call_id is not None else self.hook_entries(turn),
            is_cancelled=lambda: self.records.turn(turn.id).cancel_requested,
            secrets=functools.partial(self.records.saved_secrets, turn.thread_id),
        )

    def hook_entries(self, turn: TurnRow) -> Entries:
        """The entries of the turn this thread runs (a command's and its hooks' appends)."""
        running = getattr(self.records.lease, "entries", None)
        return running if running is not None else Entries(turn.thread_id, turn.id)

    def emit(self, turn: TurnRow, kind: str, **fields: Any) -> list[Any]:
        return self.hooks.emit(kind, **self.event_fields(turn), **fields)

    def event_fields(self, turn: TurnRow) -> dict[str, Any]:
        """What every hook of a turn is told: the thread, the turn, the actor, `entries`."""
        return {
            "thread_id": turn.thread_id,
            "turn_id": turn.id,
            "actor": turn.actor,
            "entries": self.hook_entries(turn),
        }

    def redact(self, thread: str, text: str) -> str:
        """`text` with known tokens and the thread's saved secret values redacted."""
        return self.records.clean(thread, text)

    def tell(self, turn: TurnRow, kind: str, **fields: Any) -> None:
        """Publish a live event of the turn; text deltas and tool progress also go to the
        `reply_delta` and `tool_progress` hooks (a hook that raises is logged, not fatal)."""
        self.live.publish(TurnEvent(kind, turn.id, turn.thread_id, **fields))
        hook = {"text": "reply_delta", "progress": "tool_progress"}.get(kind)
        if hook is not None and self.hooks.handlers[hook]:
            keys = ("text", "step") if kind == "text" else ("tool", "call_id", "text")
            with contextlib.suppress(HookFailed):
                self.emit(turn, hook, **{key: fields.get(key) for key in keys})

    def available(self) -> dict[str, Tool]:
        """The tools the model may call: the registered ones, then the MCP servers'."""
        tools: dict[str, Tool] = dict(self.tools)
        for server in self.mcp_servers.values():
            for name, tool in server.tools().items():
                tools.setdefault(name, tool)
        return tools

    def loop(self, turn_id: str) -> None:
        """Model steps and tool calls until a final answer, a cancel, max_steps, or calls
        that wait for approvals."""
        while True:
            turn = self.records.turn(turn_id)
            if turn.status in FINAL_TURN_STATES:
                return
            if turn.cancel_requested:
                self.records.finish(turn.id, "cancelled", error="cancelled")
                return
            calls = self.queue.store.calls(turn.id, open_only=True)
            runnable = [call for call in calls if call.state != "waiting"]
            if runnable:
                self.run_calls(turn, runnable)
                continue
            if calls:  # the rest wait for approvals: the job ends, a decision resumes it
                if turn.status != "waiting_approval":
                    self.records.finish(turn.id, "waiting_approval")
                return
            if turn.status == "waiting_approval":
                self.records.resume(turn)
                continue
            if turn.steps >= self.max_steps:
                error = f"no final answer within max_steps={self.max_steps} model steps"
                self.records.finish(turn.id, "failed", error=error)
            elif not self.records.steer(turn, ()):  # a steer message first joins the turn
                self.step(turn)

    def step(self, turn: TurnRow) -> None:
        """One model request (within the context window: see ContextWindow); its answer and
        tool calls stored in one transaction."""
        available = self.available()
        tools = [tool.spec() for tool in available.values()]
        fields = self.event_fields(turn)
        instructions = "\n\n".join(filter(None, [self.instructions, turn.instructions]))
        index = turn.steps
        live = _LiveText(
            {**redactions.values, **self.records.thread_secrets(turn.thread_id)},
            lambda delta: self.tell(turn, "text", step=index, text=delta),
        )

        def ask(messages: list[dict[str, Any]]) -> ModelReply:
            messages = self.hooks.chain(
                "model_request", "messages", messages, tools=tools, **fields
            )
            messages = FileParts(self.model, self.records).messages(turn.thread_id, messages)
            self.tell(turn, "thinking", step=index)
            return complete_live(self.model, instructions, messages, tools, live.add)

        reply = self.context.request(turn, self.model, instructions, tools, ask)
        text = None if reply.text is None else self.redact(turn.thread_id, reply.text)
        live.finish(text)
        used = {call.call_id for call in self.queue.store.calls(turn.id)}
        calls, approvals = [], []
        for call in reply.tool_calls:
            call_id = call.id if call.id and call.id not in used else new_id("call")
            used.add(call_id)
            state, result = "pending", None
            if call.name not in available:
                state, result = "error", f"unknown tool {call.name!r}"
            else:
                hooked = self.emit(
                    turn, "tool_call", tool=call.name, args=call.args, call_id=call_id
                )
                block = next((b for b in hooked if isinstance(b, Block)), None)
                if block is not None:
                    state, result = "error", f"blocked: {block.reason}"
                else:
                    tool = available[call.name]
                    needed, reason = tool.needs_approval(call.args, self.context_of(turn, call_id))
                    if needed:
                        state = "waiting"
                        expires = self.queue.store.now() + self.approval_ttl
                        approvals.append((new_id("apr"), call_id, reason, expires))
            calls.append((call_id, call.name, call.args, state, result))
        for approval in self.records.add_step(turn, text, calls, reply.usage, approvals):
            self.tell(turn, "approval", step=index, tool=approval.tool, approval=approval)
            with contextlib.suppress(HookFailed):  # the request stands; the hook's error is logged
                self.emit(turn, "approval_requested", approval=approval)

    def run_calls(self, turn: TurnRow, calls: list[CallRow]) -> None:
        """Run the open calls of a turn, each claimed first, and store their results: all at
        once, or one after another without `parallel_tools`. A steer message queued before
        a call starts skips it and the ones after it."""
        available = self.available()
        missing = sorted({call.tool for call in calls} - set(available))
        if missing:  # the model saw them in another process: the turn runs on there
            raise ToolUnavailable(f"tools not registered in this process: {', '.join(missing)}")
        batches = [calls] if self.parallel_tools else [[call] for call in calls]
        for i, batch in enumerate(batches):
            if self.records.steer(turn, [call for rest in batches[i:] for call in rest]):
                return
            self.finish_calls(turn, self.start_calls(turn, batch, available))

    def start_calls(
        self, turn: TurnRow, calls: list[CallRow], available: dict[str, Tool]
    ) -> list[_Started]:
        """Claim and start calls of the `available` tools; those started, with their
        contexts and futures."""
        message_ids = {call.call_id: call.message_id for call in calls}
        started = []
        step = max(turn.steps - 1, 0)
        for call_id, name, args, state in ((c.call_id, c.tool, c.args, c.state) for c in calls):
            tool = available[name]
            if state == "running" and not tool.idempotent:
                self.records.set_result(turn, call_id, "error", INTERRUPTED, was="running")
            elif state == "running" or self.records.claim_call(turn.id, call_id):
                values = json.loads(args)
                self.tell(turn, "tool_start", step=step, tool=name, call_id=call_id, args=values)
                ctx = self.context_of(turn, call_id, name)
                future = self.start_tool(tool, values, ctx)
                started.append((call_id, tool, values, ctx, future, message_ids[call_id]))
        return started

    def finish_calls(self, turn: TurnRow, started: list[_Started]) -> None:
        """Wait for started calls and store each result with the files and entries its
        call made."""
        step = max(turn.steps - 1, 0)
        for call_id, tool, args, ctx, future, message_id in started:
            state, result, returned = self.finish_tool(tool, future)
            for changed in self.emit(
                turn,
                "tool_result",
                tool=tool.name,
                args=args,
                call_id=call_id,
                result=result,
                is_error=state == "error",
            ):
                if changed is not None:
                    result = as_text(changed)
            result = self.redact(turn.thread_id, result)
            made = ToolFiles(message_id, call_id, returned, ctx.attached)
            result = self.records.set_result(
                turn, call_id, state, result, was="running", made=made, entries=ctx.entries
            )
            self.tell(
                turn,
                "tool_end",
                step=step,
                tool=tool.name,
                call_id=call_id,
                args=args,
                result=result,
                is_error=state == "error",
            )

    def start_tool(
        self, tool: Tool, args: dict[str, Any], ctx: ToolContext
    ) -> concurrent.futures.Future:
        """Start one tool call in the background; a future of its value."""
        try:
            kwargs = tool.bind(args, ctx)
        except (pydantic.ValidationError, ValueError) as e:
            failed: concurrent.futures.Future = concurrent.futures.Future()
            failed.set_exception(e)
            return failed
        if tool.is_async:
            return asyncio.run_coroutine_threadsafe(tool.fn(**kwargs), background_loop())
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                16, thread_name_prefix="agentkit-tool"
            )
        return self._pool.submit(tool.fn, **kwargs)

    @staticmethod
    def finish_tool(tool: Tool, future: concurrent.futures.Future) -> tuple[str, str, list[File]]:
        """`("done" | "error", text, files it returned)` of a started call, waiting up to
        the tool's timeout. A File (or a list of texts and Files) returned is for the
        model to see and the user to get; the files' notes follow the text once stored."""
        try:
            value = future.result(timeout=tool.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return "error", f"timed out after {tool.timeout:g} s", []
        except Exception as e:
            return "error", describe_error(e), []
        if isinstance(value, File):
            return "done", "", [value]
        if (
            isinstance(value, list)
            and any(isinstance(v, File) for v in value)
            and all(isinstance(v, (str, File)) for v in value)
        ):
            texts = [v for v in value if isinstance(v, str)]
            return "done", "\n".join(texts), [v for v in value if isinstance(v, File)]
        return "done", as_text(value), []

    # commands

    def run_command(self, turn: TurnRow, name: str, args: str) -> str:
        fn = self.commands.get("help" if name == "start" else name)  # Telegram's first message
        if fn is None:
            return f"Unknown command /{name}. /help lists the commands."
        try:
            return as_text(call_sync(fn, self.context_of(turn, None), args))
        except (BadInput, Forbidden, AlreadyDecided) as e:
            return str(e)

    def compact(
        self, thread: str, made_by: str, instructions: str | None = None
    ) -> Compaction | None:
        """Compact a thread now (see ContextWindow.compact)."""
        return self.context.compact(thread, self.model, made_by=made_by, focus=instructions)

    def usage(self, thread: str) -> dict[str, int]:
        """`{"tokens": estimate, "window": size}` of what the model would be sent now."""
        tools = [tool.spec() for tool in self.available().values()]
        return self.context.usage(thread, self.model, self.instructions, tools)

    def compact_command(self, ctx: ToolContext, args: str) -> str:
        """Summarise the older messages now (/compact [what to focus on])."""
        made = self.compact(ctx.thread_id, ctx.actor, args or None)
        if made is None:
            return "Nothing to compact: the recent messages are all kept as they are."
        return f"Compacted the conversation ({made.tokens_before} tokens) into a summary."

    def help(self, ctx: ToolContext, args: str) -> str:
        """List the commands."""
        lines = [f"/{name}: {first_line(fn)}" for name, fn in sorted(self.commands.items())]
        return "\n".join([*lines, "/cancel: Cancel this thread's running turns."])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for server in self.mcp_servers.values():
            server.close()


class TurnWatch:
    """What one watcher of a turn was shown: a live event passes once, and the stored
    steps fill in what was not seen live (a turn run by another process, or by a worker
    before a takeover), at step granularity."""

    def __init__(self, records: Records, turn_id: str) -> None:
        self.records = records
        self.turn_id = turn_id
        self.texts: dict[int, str] = {}  # step -> "live" or "stored": where its text came from
        self.shown: set[tuple[str, str]] = set()  # (kind, call or approval id) shown
        self.live_steps: set[int] = set()  # steps this process ran, seen live
        self.last_step: int | None = None  # from the live "done": the run ended here

    def seen_live(self) -> bool:
        """Whether every step of the turn was seen live, up to its end."""
        return self.last_step is not None and self.live_steps >= set(range(self.last_step + 1))

    def live(self, event: TurnEvent) -> TurnEvent | None:
        """The live event, unless it was shown already ("done" is the stream's own, and
        "thinking" is for adapters)."""
        if event.kind == "done":
            self.last_step = event.step
            return None
        self.live_steps.add(event.step)
        if event.kind == "text":
            if self.texts.setdefault(event.step, "live") != "live":
                return None
        elif event.kind in ("tool_start", "tool_end", "approval"):
            key = (event.kind, event.approval.id if event.approval else event.call_id or "")
            if key in self.shown:
                return None
            self.shown.add(key)
        elif event.kind == "thinking":
            return None
        return event

    def stored(self) -> list[TurnEvent]:
        """Events of the turn's stored steps, calls and pending approvals not shown yet."""
        turn = self.records.turn(self.turn_id)
        events: list[TurnEvent] = []
        if turn.status != "queued":  # its user message joined the thread: its steps follow
            messages = self.records.history(turn.thread_id, turn.steps + 100)
            starts = [
                i
                for i, m in enumerate(messages)
                if m["role"] == "user" and m["content"] == turn.text
            ]
            step, calls = -1, {}
            for message in messages[starts[-1] + 1 :] if starts else []:
                if message["role"] == "user":
                    break
                if message["role"] == "assistant":
                    step += 1
                    if message["content"] and step not in self.texts:
                        self.texts[step] = "stored"
                        events.append(self._event(turn, "text", step, text=message["content"]))
                    calls = {call["id"]: call for call in message.get("tool_calls") or []}
                elif message["call_id"] in calls:
                    call = calls[message["call_id"]]
                    fields = {"tool": call["name"], "call_id": call["id"], "args": call["args"]}
                    end = {"result": message["content"], "is_error": message["is_error"]}
                    for kind, extra in (("tool_start", {}), ("tool_end", end)):
                        if (kind, call["id"]) not in self.shown:
                            self.shown.add((kind, call["id"]))
                            events.append(self._event(turn, kind, step, **fields, **extra))
        for approval in reversed(self.records.pending_approvals(turn.id)):
            if ("approval", approval.id) not in self.shown:
                self.shown.add(("approval", approval.id))
                step = max(turn.steps - 1, 0)
                events.append(
                    self._event(turn, "approval", step, tool=approval.tool, approval=approval)
                )
        if turn.status == "done" and turn.steps == 0 and turn.reply and 0 not in self.texts:
            self.texts[0] = "stored"  # a command's answer
            events.append(self._event(turn, "text", 0, text=turn.reply))
        return events

    @staticmethod
    def _event(turn: TurnRow, kind: str, step: int, **fields: Any) -> TurnEvent:
        return TurnEvent(kind, turn.id, turn.thread_id, step, **fields)


def first_line(fn: Callable[..., Any]) -> str:
    return (inspect.getdoc(fn) or "").partition("\n")[0]


# ────────────────────────────────────── approvals ──────────────────────────────────────

DEFAULT_APPROVERS = ("web:owner", "cli:*")


class Approvals:
    """Who may decide approvals, and the decisions themselves.

    A decision is one conditional update of the approval row, so two people (or two
    processes) deciding at once make one decision, and an approved call runs once.
    """

    def __init__(
        self, engine: TurnEngine, approvers: Sequence[str], *, allow_self_approval: bool
    ) -> None:
        for pattern in approvers:
            check_thread(pattern)
        self.engine = engine
        self.records = engine.records
        self.store = engine.queue.store
        self.approvers = tuple(approvers)
        self.allow_self_approval = allow_self_approval

    def may_decide(self, actor: str) -> bool:
        """Whether `actor` is one of the approvers (`cli:*` matches every `cli:` actor)."""
        return any(
            actor.startswith(p[:-1]) if p.endswith("*") else actor == p for p in self.approvers
        )

    def choices(self, approval: Approval, actor: str) -> tuple[str, ...]:
        """The decisions `actor` may make on `approval`: an approver approves (unless it
        asked and `allow_self_approval` is off) and denies; a requester may deny its own."""
        own = actor == approval.requester
        approves = self.may_decide(actor) and (self.allow_self_approval or not own)
        denies = own or self.may_decide(actor)
        return ("approved",) * approves + ("denied",) * denies

    def get(self, approval_id: str) -> Approval:
        if not isinstance(approval_id, str) or not approval_id.startswith("apr_"):
            raise BadInput(f"not an approval id: {approval_id!r}")
        found = self.store.approval(approval_id)
        if found is None:
            raise NotFound(f"no approval {approval_id}")
        return found

    def decide(self, approval_id: str, actor: str, decision: str, reason: str | None) -> Approval:
        """Approve or deny; the approval as decided. Forbidden for someone who may not
        decide it; AlreadyDecided when it was decided otherwise or expired. Repeating the
        same decision changes nothing."""
        actor = check_thread(actor)
        if reason is not None and (not isinstance(reason, str) or len(reason) > 2000):
            raise BadInput("reason must be a string of at most 2000 characters")
        if reason is not None:
            check_utf8("reason", reason)
        approval = self.get(approval_id)
        if decision not in self.choices(approval, actor):
            if not self.may_decide(actor):
                raise Forbidden(f"{actor} may not decide approvals")
            raise Forbidden(f"{actor} asked for this call and may not approve it (deny is allowed)")
        with self.store.transaction():
            late = approval.expires_at <= self.store.now()
            state, by = ("expired", None) if late else (decision, actor)
            pending = self.records.settle(approval, state, by, None if late else reason)
        decided = self.get(approval_id)
        if pending:
            self.announce(decided)
        if decided.state == decision:
            return decided
        if decided.state == "expired":
            raise AlreadyDecided(f"{approval_id} expired at {iso(decided.expires_at)}")
        if decided.state == "cancelled":
            raise AlreadyDecided(f"{approval_id} was cancelled with its turn")
        raise AlreadyDecided(f"{approval_id} was already {decided.state} by {decided.decided_by}")

    def expire(self, at: float | None = None) -> list[Approval]:
        """Expire every pending approval past its time: the model is told, the turn goes on."""
        at = self.store.now() if at is None else at
        if not self.store.expired_approvals(at):
            return []
        with self.store.transaction():
            settled = [
                approval.id
                for approval in self.store.expired_approvals(at)
                if self.records.settle(approval, "expired", None, None)
            ]
        self.engine.queue.store.notify()
        expired = [self.get(approval_id) for approval_id in settled]
        for approval in expired:
            self.announce(approval)
        return expired

    def announce(self, approval: Approval) -> None:
        """Tell the hooks about a decision (errors are logged: the decision stands)."""
        who = approval.decided_by or "expiry"
        log.info("%s (%s) %s by %s", approval.id, approval.tool, approval.state, who)
        self.engine.queue.store.notify()
        with contextlib.suppress(HookFailed):
            self.engine.hooks.emit(
                "approval_decided",
                thread_id=approval.thread_id,
                turn_id=approval.turn_id,
                actor=approval.decided_by,
                approval=approval,
            )


# ──────────────────────────────────── secret requests ────────────────────────────────────
#
# Scheme (v1): each request has its own ECDH P-256 key pair. The secret page makes an
# ephemeral P-256 key pair, derives the ECDH shared secret, runs HKDF-SHA256 over it
# (salt: the request id, info: "agentkit-secret v1") to get an AES-256-GCM key, and
# encrypts the JSON object {name: value} with a random 12-byte IV and the associated data
# "agentkit-secret:v1:<request id>:<field names joined by ','>". The blob is one line:
#   agentkit-secret:v1.<request id>.<ephemeral public key>.<iv>.<ciphertext and tag>
# (base64url without padding; the public key as its 65-byte uncompressed point).

SECRET_PREFIX = "agentkit-secret:"
SECRET_INFO = b"agentkit-secret v1"
SECRET_ID = re.compile(r"sec_[0-9a-f]{16}")
MAX_SECRET_FIELDS = 8
MAX_BLOB = 60_000  # characters: ~44 KB of secrets


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    """Strict base64url without padding; ValueError for anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_aad(request_id: str, names: Sequence[str]) -> bytes:
    """The associated data that binds a blob to its request and field names."""
    return f"{SECRET_PREFIX}v1:{request_id}:{','.join(names)}".encode()


def parse_blob(text: str) -> tuple[str, bytes, bytes, bytes]:
    """`(request id, ephemeral public key, iv, ciphertext)` of a blob; ValueError if malformed."""
    text = text.strip()
    if len(text) > MAX_BLOB or not text.startswith(f"{SECRET_PREFIX}v1."):
        raise ValueError("it does not start with agentkit-secret:v1.")
    parts = text[len(SECRET_PREFIX) + 3 :].split(".")
    if len(parts) != 4 or not SECRET_ID.fullmatch(parts[0]):
        raise ValueError("it does not have the five parts of a blob")
    key, iv, sealed = (unb64url(part) for part in parts[1:])
    if len(key) != 65 or len(iv) != 12 or len(sealed) < 16:
        raise ValueError("a part has the wrong length")
    return parts[0], key, iv, sealed


def kit_key(db_path: str) -> bytes:
    """The key that seals saved secret values and the private keys of pending requests:
    from AGENTKIT_SECRET_KEY, or the file `<database>.key` beside the database (created
    with O_EXCL, mode 0600)."""
    configured = os.environ.get("AGENTKIT_SECRET_KEY")
    if configured is not None:
        if len(configured) < 32:
            raise BadInput("AGENTKIT_SECRET_KEY must be a random string of 32 characters or more")
        return hashlib.sha256(configured.encode()).digest()
    if db_path == ":memory:":
        return os.urandom(32)
    if "://" in db_path:
        raise StoreError(
            f"{db_path} is shared by every host that uses it, and so must be the key that "
            "seals its secrets: set AGENTKIT_SECRET_KEY (a random string of 32 "
            "characters or more, the same on every host)"
        )
    path = db_path + ".key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    key = os.urandom(32)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def _read_key_file(path: str) -> bytes:
    deadline = time.monotonic() + 2.0
    while True:  # another process may have created it a moment ago and be writing it
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read().strip()
        if mode & 0o077:
            raise StoreError(f"{path} must be readable by its owner only (chmod 600 {path})")
        if re.fullmatch(r"[0-9a-f]{64}", text):
            return bytes.fromhex(text)
        if time.monotonic() > deadline:
            raise StoreError(f"{path} is not a key file (64 hex digits)")
        time.sleep(0.01)


def check_fields(fields: object) -> tuple[tuple[str, str | None], ...]:
    """Secret fields: names, or {"name": ..., "label": ...}; 1 to 8, names unique."""
    if isinstance(fields, (str, dict)) or not isinstance(fields, Sequence):
        fields = [fields]
    checked: list[tuple[str, str | None]] = []
    for item in fields:
        name, label = (
            (item.get("name"), item.get("label")) if isinstance(item, dict) else (item, None)
        )
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            raise BadInput(f"a secret field name is [A-Za-z_][A-Za-z0-9_]{{0,63}}, not {name!r}")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise BadInput("a field label is a string of at most 200 characters")
        checked.append((name, label))
    names = [name for name, _ in checked]
    if not 1 <= len(names) <= MAX_SECRET_FIELDS or len(set(names)) != len(names):
        raise BadInput(f"ask for 1 to {MAX_SECRET_FIELDS} fields with different names")
    return tuple(checked)


def check_public_url(url: str) -> str:
    """The secret page's base URL: https, or http on a loopback address (WebCrypto needs a
    secure context)."""
    parts = urllib.parse.urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if not (parts.scheme == "https" or (parts.scheme == "http" and loopback)) or not parts.netloc:
        raise BadInput(f"public_url must be https://… or http on a loopback address, not {url!r}")
    return url.rstrip("/")


@functools.cache  # the pages are constants: hash them once
def with_csp(html: str, connect: str = "'none'", images: str = "data:") -> tuple[str, str]:
    """A page and its Content-Security-Policy: its one inline script and style allowed by
    hash, nothing else (no requests but to `connect`, images only from `images`). The
    page carries the policy in a meta tag too, so it holds when the file is opened from
    disk."""

    def digest(tag: str) -> str:
        body = html.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    policy = (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
        f"connect-src {connect}; img-src {images}; base-uri 'none'; form-action 'none'"
    )
    return html.replace("__CSP__", policy), policy + "; frame-ancestors 'none'"


def secret_page() -> tuple[str, str]:
    """The secret page and its policy, as `serve` answers `/secret`; the page carries its
    policy in a meta tag, so the HTML saved to a file also works opened from disk."""
    return with_csp(SECRET_PAGE)


def _value_aad(thread: str, name: str) -> bytes:
    """The associated data that binds a sealed value to its thread and name."""
    return f"{SECRET_PREFIX}value:{thread}:{name}".encode()


class Secrets:
    """Secret requests: the links, the interception of blobs, saving and redaction.

    A blob is decrypted when it arrives; its values are stored sealed under the kit key
    (so a tool on any host reads them, and the database never holds one in the clear) and
    written to the thread's `.secrets` folder on the hosts whose runtimes use the thread.
    The request row keeps its private key sealed under the kit key until used or expired.
    """

    def __init__(self, records: Records, *, workspace: Path, public_url: str, ttl: float) -> None:
        self.records = records
        self.store = records.store
        self.workspace = workspace
        self.public_url = check_public_url(public_url)
        self.ttl = check_seconds("secret_ttl", ttl, positive=True)
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        """The kit key, read or created on first use."""
        if self._key is None:
            self._key = kit_key(self.store.path)
        return self._key

    def request(
        self,
        thread: str,
        *,
        fields: object,
        reason: str,
        actor: str,
        turn_id: str | None = None,
    ) -> SecretRequest:
        """Create a request and send its link to the thread (through the outbox)."""
        thread, actor, checked = check_thread(thread), check_thread(actor), check_fields(fields)
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
            raise BadInput("reason must be a non-empty string of at most 2000 characters")
        check_utf8("reason", reason)
        private = ec.generate_private_key(ec.SECP256R1())
        public = private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        request_id = new_id("sec")
        nonce = os.urandom(12)
        scalar = private.private_numbers().private_value.to_bytes(32, "big")
        sealed = nonce + AESGCM(self.key).encrypt(nonce, scalar, request_id.encode())
        at = self.store.now()
        fragment = urllib.parse.urlencode(
            {
                "v": "1",
                "id": request_id,
                "key": b64url(public),
                "fields": dumps([{"name": n} | ({"label": t} if t else {}) for n, t in checked]),
                "reason": reason,
                "exp": int(at + self.ttl),
            },
            quote_via=urllib.parse.quote,
        )
        request = SecretRequest(
            request_id,
            thread,
            actor,
            turn_id,
            reason,
            checked,
            f"{self.public_url}/secret#{fragment}",
            "pending",
            at,
            at + self.ttl,
        )
        names = ", ".join(name for name, _ in checked)
        text = (
            f"{reason}\nOpen this link to give {names} securely; paste back the line it makes "
            f"(expires {iso(request.expires_at)}): {request.url}"
        )
        with self.store.transaction():
            self.store.insert_secret_request(request, b64url(public), sealed)
            self.records.deliver(thread, turn_id, "secret", text, url=request.url)
        self.records.queue.store.notify()
        return request

    def intercept(self, thread: str, actor: str, text: str) -> tuple[str, list[str]]:
        """Take a pasted blob inside the caller's transaction: decrypt it and save its
        values; the request id and the saved names. BadInput with a reply that says why
        when it is refused (nothing saved, and a valid request stays usable)."""
        try:
            request_id, key, iv, sealed = parse_blob(text)
        except ValueError as e:
            raise BadInput(f"That is not a valid secret blob ({e}); nothing was saved.") from None
        found = self.store.secret_request(request_id)
        if found is None:
            raise BadInput("That secret blob answers no request of this agent; nothing was saved.")
        request, sealed_key = found
        if request.thread_id != thread:
            raise BadInput(
                "That secret blob belongs to another conversation; nothing was saved. "
                "Paste it where the link was sent."
            )
        if request.actor != actor:
            raise BadInput("That secret blob was asked of someone else; nothing was saved.")
        if request.state == "used":
            raise BadInput(
                "That secret blob was used already (a link works once); nothing was saved."
            )
        if sealed_key is None or request.expires_at <= self.store.now():
            raise BadInput("That secret request expired; ask for a new link. Nothing was saved.")
        names = [name for name, _ in request.fields]
        try:
            values = self.decrypt(request_id, sealed_key, names, key, iv, sealed)
        except BadInput as e:
            raise BadInput(f"That secret blob was refused: {e}. Nothing was saved.") from None
        except (InvalidTag, ValueError, RecursionError):
            raise BadInput(
                "That secret blob is damaged or was changed; nothing was saved. "
                "Copy the whole line from the page again."
            ) from None
        self.save(thread, values)
        self.store.use_secret_request(request_id)
        return request_id, names

    def decrypt(
        self,
        request_id: str,
        sealed_key: bytes,
        names: list[str],
        key: bytes,
        iv: bytes,
        sealed: bytes,
    ) -> dict[str, str]:
        """The values in a blob, all checked before any is used: InvalidTag or ValueError
        (RecursionError for JSON nested too deep) when it does not open, BadInput when a
        value could not be stored."""
        scalar = AESGCM(self.key).decrypt(sealed_key[:12], sealed_key[12:], request_id.encode())
        private = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key)
        shared = private.exchange(ec.ECDH(), peer)
        aes = HKDF(hashes.SHA256(), 32, salt=request_id.encode(), info=SECRET_INFO).derive(shared)
        values = json.loads(AESGCM(aes).decrypt(iv, sealed, secret_aad(request_id, names)))
        if not isinstance(values, dict) or sorted(values) != sorted(names):
            raise ValueError("the blob does not hold the requested fields")
        if not all(isinstance(v, str) and v for v in values.values()):
            raise ValueError("a value is empty")
        for name in names:
            check_utf8(f"the value of {name}", values[name])
        return values

    def seal(self, thread: str, name: str, value: str) -> bytes:
        """A value sealed with AES-GCM under the kit key, bound to its thread and name."""
        nonce = os.urandom(12)
        return nonce + AESGCM(self.key).encrypt(nonce, value.encode(), _value_aad(thread, name))

    def values(self, thread: str) -> dict[str, str]:
        """The thread's saved secrets by name: the sealed values in the database, over the
        `.secrets` files of this host (where an earlier release saved them)."""
        found = saved_secrets(secrets_folder(self.workspace, thread))
        for name, sealed in self.store.sealed_secrets(thread).items():
            aad = _value_aad(thread, name)
            try:
                opened = AESGCM(self.key).decrypt(sealed[:12], sealed[12:], aad)
            except InvalidTag:
                raise StoreError(
                    f"the saved secret {name} of {thread} does not open with this kit key: "
                    "every process must have the key it was saved with (the same "
                    "AGENTKIT_SECRET_KEY on every host)"
                ) from None
            found[name] = opened.decode()
        return found

    def save(self, thread: str, values: dict[str, str]) -> None:
        """Store values sealed (in the caller's transaction), write them to the thread's
        `.secrets` on this host and redact them from now on."""
        self.store.save_secrets(
            thread, {name: self.seal(thread, name, value) for name, value in values.items()}
        )
        folder = secrets_folder(self.workspace, thread)
        for name, value in values.items():
            write_secret(folder, name, value)
            redactions.add(value, name)

    def write_files(self, thread: str) -> None:
        """Write the thread's saved secrets as `.secrets/NAME` in its folder on this host,
        for a runtime that reads them there (those already written are left as they are)."""
        folder = secrets_folder(self.workspace, thread)
        for name, value in self.values(thread).items():
            if read_secret(folder, name) != value:
                write_secret(folder, name, value)


SAVED_NOTE_START = "[agentkit: the user gave "


def saved_note(names: Sequence[str], request_id: str) -> str:
    """What the model reads once secrets are saved: their names, never their values."""
    listed = ", ".join(names)
    return (
        f"{SAVED_NOTE_START}{listed} through the secure page (request {request_id}). "
        f"They are saved for this conversation; tools read them with ctx.secret(NAME). "
        "Their values are not shown here.]"
    )


# ─────────────────────────────────────── adapters ───────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class Inbound:
    """A message an adapter received. `thread` and `actor` are keys under the adapter's
    name (`42` becomes `telegram:42`), `id` deduplicates it, `meta` travels with its turn
    to the reply; with `refusal` set, the sender is told that and nothing is stored.
    `files` come with the message (already downloaded: they are stored with it, or
    nothing is); the parts of one `group` (an album) are one message, whose turn starts
    `group_wait` seconds after its last part came."""

    thread: str
    actor: str
    text: str
    id: str | None = None
    meta: dict[str, Any] | None = None
    refusal: str | None = None
    files: Sequence[File | Attachment] = ()
    group: str | None = None
    group_wait: float = 2.0


@dataclasses.dataclass(frozen=True)
class Outbound:
    """A message for an adapter to send (`kind` as in Delivery)."""

    kind: str
    text: str
    thread_id: str
    turn_id: str | None
    meta: dict[str, Any]
    approval: dict[str, Any] | None = None
    url: str | None = None
    delivery: int | None = None  # its row, for `Records.set_progress`
    sent_parts: int = 0  # pieces an earlier attempt sent already (a long text split up)
    ref: str | None = None  # for "decided": what `send` returned for the approval request
    stream: dict[str, Any] | None = None  # for "reply": what `streamed` returned for it
    file: dict[str, Any] | None = None  # for "file": its id, name, mime and size


class AdapterError(AgentKitError):
    """A chat service refused or failed a request (its HTTP status, and `retry_after`)."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(redactions.redact(message))
        self.status = status
        self.retry_after = retry_after

    @property
    def permanent(self) -> bool:
        """A refusal that trying again would only repeat (a 4xx other than a timeout,
        "too early" or "too many requests")."""
        return 400 <= self.status < 500 and self.status not in (408, 425, 429)


@dataclasses.dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclasses.dataclass(frozen=True)
class HTTPResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, value: Any, **headers: str) -> HTTPResponse:
    return HTTPResponse(
        status, dumps(value).encode(), {"Content-Type": "application/json"} | headers
    )


def json_body(request: HTTPRequest) -> dict[str, Any]:
    """The request's JSON object; BadInput when it is not one, nests too deeply or holds
    a lone surrogate (an escape like `\\ud800` alone), which could not be stored."""
    try:
        value = json.loads(request.body)
    except ValueError:
        raise BadInput("the body is not JSON") from None
    except RecursionError:
        raise BadInput("the body's JSON nests too deeply") from None
    if not isinstance(value, dict):
        raise BadInput("the body is not a JSON object")
    dumps(value)  # BadInput for a lone surrogate: valid JSON, but UTF-8 cannot store it
    return value


ADAPTER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def check_adapter_name(name: object) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name in ("cli", "schedule"):
        raise BadInput(f"an adapter name is 1-32 of a-z, 0-9, '_' and '-' (not cli), not {name!r}")
    return name


class Adapter:
    """Connects a chat service to a kit: `name`, `start(kit)`, `send(target, outbound)`,
    `stop()`. The threads and actors it creates are `<name>:<key>`.

    `send` may return a reference to the message it sent (a message id). An adapter
    that can edit its messages accepts "decided" deliveries: when an approval is decided,
    each of its requests comes back with `outbound.ref` set (None when the request went
    unsent: it is sent showing the decision) so the adapter can update it.

    The rest has defaults: `accepts(kind, meta)` picks the deliveries it wants (all but
    echoes of the user's own messages and decisions), `reach(actor)` names the thread
    where an approver can be told of approvals, `http(request)` answers requests under
    its routes, and a `pull` adapter's deliveries are read (by the web page), not sent.
    A "file" delivery carries `outbound.file` (`id`, `name`, `mime`, `size`); `send`
    reads its bytes with `kit.open_file(target, id)`.
    """

    name = "adapter"
    pull = False
    kit: "AgentKit"

    def start(self, kit: "AgentKit") -> None:
        self.kit = kit

    def send(self, target: str, outbound: Outbound) -> str | None:
        raise NotImplementedError(f"adapter {self.name} cannot send")

    def stop(self) -> None:
        return None

    def close(self) -> None:
        """Free what the adapter holds (HTTP clients); `AgentKit.close` calls it."""
        return None

    def accepts(self, kind: str, meta: dict[str, Any]) -> bool:
        return kind not in ("user", "decided")

    def reach(self, actor: str) -> str | None:
        return None

    def http(self, request: HTTPRequest) -> HTTPResponse | None:
        return None

    def streamed(self, turn_id: str) -> dict[str, Any] | None:
        """Called as a turn's reply is stored: what its delivery needs of the reply this
        adapter streamed live (a message to edit into the final text), which it stops
        updating; None when there is nothing (the delivery sends the reply afresh)."""
        return None


class PollingAdapter(Adapter):
    """An adapter that fetches: a subclass writes `poll(cursor, timeout) -> (items, new
    cursor)` and `send(target, outbound)`.

    While started, a thread polls, but only in the process that holds the lease
    `adapter:<name>` (another takes over when that process dies). What a poll fetched is
    stored with the new cursor in one durable transaction, fenced by the lease: nothing
    fetched is lost or stored twice. Errors back off (1 s doubling to 60 s, or the
    service's retry_after). Turns run in workers, so a long turn never delays polling.
    """

    poll_timeout = 25.0
    lease = 60.0
    _lease: Lock | None = None

    def poll(self, cursor: str | None, timeout: float) -> tuple[list[Inbound], str | None]:
        raise NotImplementedError

    def start(self, kit: "AgentKit") -> None:
        super().start(kit)
        self._stopping = threading.Event()
        self._poller = threading.Thread(
            target=self._run, name=f"agentkit-poll-{self.name}", daemon=True
        )
        self._poller.start()

    def stop(self) -> None:
        """Stop polling. A poll still in flight after a second is abandoned: its lease is
        given back at once (so another process polls without waiting for it to lapse),
        and what it brings back is refused by the fence and fetched again later."""
        self._stopping.set()
        self.interrupt()
        self._poller.join(timeout=1.0)
        lease = self._lease
        if self._poller.is_alive() and lease is not None:
            with contextlib.suppress(LeaseLost, StoreError):
                lease.release()

    def interrupt(self) -> None:
        """Cut a poll in progress short (stop calls it); by default the poll runs out."""

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` unless the adapter stops; whether it is stopping. A `poll`
        with nothing new should wait like this (up to its timeout) before it returns."""
        return self._stopping.wait(seconds)

    def poll_once(self, lease: Lock | None = None) -> int:
        """Fetch once and store what came with the new cursor; the number of items."""
        old = self.kit.store.cursor(self.name)
        items, cursor = self.poll(old, self.poll_timeout)
        if items or cursor != old:
            self.kit.receive_all(self, items, cursor, lease)
        return len(items)

    def _run(self) -> None:
        pause = 1.0
        try:
            while not self._stopping.is_set():
                try:
                    with Lock(self.kit.store, f"adapter:{self.name}", ttl=self.lease) as lease:
                        self._lease = lease
                        while not self._stopping.is_set():
                            self.poll_once(lease)
                            pause = 1.0
                except LockBusy:
                    self._stopping.wait(min(self.lease / 4, 5.0))  # another process polls
                except Exception as e:
                    if self._stopping.is_set():
                        break
                    wait = getattr(e, "retry_after", None) or pause
                    log.warning("%s: %s; polling again in %g s", self.name, describe_error(e), wait)
                    self._stopping.wait(wait)
                    pause = min(pause * 2, 60.0)
        finally:
            self.kit.store.release_thread()


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, cut at a line break where there is one."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        cut = cut + 1 if cut > 0 else limit
        pieces.append(text[:cut])
        text = text[cut:]
    return [*pieces, text] if text or not pieces else pieces


_FENCE = re.compile(r"^ {0,3}(```|~~~)\s*([\w+#.-]*)[^\n]*$")
_INLINE = re.compile(
    r"`([^`\n]+)`"  # 1 code
    r"|\[([^\]\n]+)\]\(([^()\s]+)\)"  # 2 text, 3 url
    r"|\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__"  # 4, 5 bold
    r"|~~(?=\S)(.+?)(?<=\S)~~"  # 6 strikethrough
    r"|(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])"  # 7 italic
    r"|(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])"  # 8 italic
)
_LINK_SCHEMES = ("http://", "https://", "tg://", "mailto:")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _inline_html(text: str) -> str:
    """One line of markdown as Telegram HTML: code, links, bold, italic, strikethrough;
    everything else escaped."""
    out, at = [], 0
    for match in _INLINE.finditer(text):
        out.append(_escape(text[at : match.start()]))
        at = match.end()
        code, label, url, *styled = match.groups()
        if code is not None:
            out.append(f"<code>{_escape(code)}</code>")
        elif label is not None:
            if url.startswith(_LINK_SCHEMES):
                href = _escape(url).replace('"', "&quot;")
                out.append(f'<a href="{href}">{_inline_html(label)}</a>')
            else:
                out.append(_escape(match[0]))
        else:
            index = next(i for i, part in enumerate(styled) if part is not None)
            tag = ("b", "b", "s", "i", "i")[index]
            out.append(f"<{tag}>{_inline_html(styled[index])}</{tag}>")
    out.append(_escape(text[at:]))
    return "".join(out)


def markdown_html(text: str) -> str:
    """A model's markdown as Telegram HTML (parse_mode=HTML): bold, italic, strikethrough,
    inline code, code blocks with their language, links, lists, quotes, headings as bold;
    everything else escaped. Unfinished markup (a reply still streaming) stays valid."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence[1])),
                len(lines),
            )
            code = _escape("\n".join(lines[i + 1 : end]))
            language = f' class="language-{fence[2]}"' if fence[2] else ""
            out.append(f"<pre><code{language}>{code}</code></pre>")
            i = end + 1
            continue
        if re.match(r" {0,3}>", line):
            quoted = []
            while i < len(lines) and re.match(r" {0,3}>", lines[i]):
                quoted.append(_inline_html(re.sub(r"^ {0,3}> ?", "", lines[i])))
                i += 1
            out.append("<blockquote>" + "\n".join(quoted) + "</blockquote>")
            continue
        heading = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        bullet = re.match(r"(\s*)[-*+]\s+(.*)", line)
        if heading:
            out.append(f"<b>{_inline_html(heading[1])}</b>")
        elif bullet and not re.fullmatch(r"\s*([-*_])(\s*\1){2,}\s*", line):
            out.append(f"{bullet[1]}• {_inline_html(bullet[2])}")
        else:
            out.append(_inline_html(line))
        i += 1
    return "\n".join(out)


_TAG = re.compile(r"(<[^>]*>)")
_EMPTY_ELEMENT = re.compile(r"<([a-z-]+)[^>]*></\1>")


def split_html(html: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, each valid HTML: a cut falls between tags (at
    a line break, else a space, where there is one), and the tags open there are closed
    before it and opened again after it (a long code block goes on in the next piece)."""
    pieces: list[str] = []
    piece, opened = "", []  # the piece so far; the open tags, outermost first

    def cut() -> None:
        nonlocal piece
        done = piece + "".join(f"</{_tag_name(tag)}>" for tag in reversed(opened))
        while (emptied := _EMPTY_ELEMENT.sub("", done)) != done:
            done = emptied
        if done.strip():
            pieces.append(done)
        piece = "".join(opened)

    for token in _TAG.split(html):
        closing = sum(len(_tag_name(tag)) + 3 for tag in opened)
        if token.startswith("</"):
            piece += token
            opened.pop()
        elif token.startswith("<"):
            if len(piece) + len(token) + closing + len(_tag_name(token)) + 3 > limit:
                cut()
            piece += token
            opened.append(token)
        else:
            while token and len(piece) + len(token) + closing > limit:
                room = limit - len(piece) - closing
                at = max(token.rfind("\n", 0, room), token.rfind(" ", 0, room)) + 1
                at = _entity_safe(token, at if at > 0 else room)
                if at <= 0 and piece == "".join(opened):
                    at = max(room, 1)  # nothing else fits: cut where it must
                piece, token = piece + token[:at], token[at:]
                cut()
            piece += token
    cut()
    return pieces or [""]


def _tag_name(tag: str) -> str:
    return re.match(r"</?([a-z-]+)", tag)[1]  # type: ignore[index]


def _entity_safe(text: str, cut: int) -> int:
    """`cut`, moved back so it does not fall inside an entity like `&amp;`."""
    start = text.rfind("&", max(0, cut - 8), cut)
    return start if start >= 0 and ";" not in text[start:cut] else cut


def html_plain(html: str) -> str:
    """What Telegram shows of an HTML text: tags dropped, entities decoded."""
    text = _TAG.sub("", html)
    return (
        text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    )


class _TelegramStream:
    """A reply streaming into one Telegram chat, as the live events of its turn tell it."""

    def __init__(self, turn_id: str, where: dict[str, int | None]) -> None:
        self.turn_id = turn_id
        self.where = where
        self.private = where["message_thread_id"] is None and (where["chat_id"] or 0) > 0
        self.draft_id = int(turn_id[-8:], 16) % 2**31 or 1  # non-zero, one per turn
        self.lock = threading.Lock()  # held while a call shows it (and while it is finished)
        self.step, self.text, self.status = -1, "", ""
        self.message_id: int | None = None  # groups: the message it streams into
        self.shown: str | None = None  # the HTML shown last
        self.dirty = True  # something new to show (at first: "thinking")
        self.last = -math.inf  # when it was shown last (Telegram.clock)
        self.paused_until = -math.inf
        self.failures = 0
        self.claimed = False  # the reply's delivery took it over
        self.gave_up = False
        self.ended = False

    def hear(self, event: TurnEvent) -> None:
        if event.kind == "text":
            if event.step != self.step:
                self.step, self.text = event.step, ""
            self.text += event.text
            self.status = ""
        elif event.kind == "tool_start":
            self.status = f"running {event.tool}…"
        elif event.kind == "progress":
            self.status = clip(f"{event.tool}: {event.text}", 200)
        elif event.kind == "tool_end":
            self.status = ""
        elif event.kind == "done":
            self.ended = True
        self.dirty = True

    def html(self, limit: int) -> str:
        """What the stream shows: the step's text so far and the status line."""
        status = f"<i>{_escape(self.status)}</i>" if self.status else ""
        text = markdown_html(self.text)
        return split_html("\n\n".join(part for part in (text, status) if part), limit)[0]

    def due(self, at: float, interval: float, first_chars: int) -> bool:
        """Whether to show it now."""
        if self.ended:
            return True
        if not self.dirty or self.claimed or self.gave_up:
            return False
        if at < self.paused_until or at - self.last < interval:
            return False
        started = self.private or self.message_id is not None
        return started or len(self.text) >= first_chars

    def wait(self, at: float, interval: float) -> float | None:
        """Seconds until it may be shown again, or None when nothing waits."""
        if not self.dirty or self.claimed or self.gave_up:
            return None
        return max(self.paused_until - at, self.last + interval - at, 0.0) or None


class Telegram(PollingAdapter):
    """A Telegram bot over the Bot API, with long polling (`getUpdates`).

    Threads are chats, `telegram:<chat id>` (`telegram:<chat id>:<topic id>` in forum
    topics); actors are users, `telegram:<user id>`. Only allowed users and chats are
    served (`allow=`, else AGENTKIT_TELEGRAM_ALLOW: ids, comma-separated, or `*`); others
    are told their id. Approvals come with Approve and Deny buttons; "typing…" shows
    while a turn runs; replies are sent as HTML made from the model's markdown, split at
    Telegram's 4096 characters.

    Replies stream while the turns run in this process: in a private chat as a draft
    (`sendMessageDraft`, empty for "thinking" at first), then the final message; in
    groups and topics as a message sent after `first_chars` characters and edited at
    most every `edit_interval` seconds, which the final delivery edits into the reply.
    A tool call shows as a status line. A 429 pauses the stream for its retry_after;
    after `max_failures` failed drafts or edits the stream stops (its message is
    deleted) and the reply is sent as a message of its own.
    """

    LIMIT = 4096
    first_chars = 40
    max_failures = 3

    def __init__(
        self,
        token: str,
        *,
        allow: str | Sequence[str | int] | None = None,
        api_url: str = "https://api.telegram.org",
        name: str = "telegram",
        poll_timeout: float = 25.0,
        lease: float = 60.0,
        edit_interval: float = 1.0,
        album_wait: float = 2.0,
    ) -> None:
        if not isinstance(token, str) or not re.fullmatch(r"\d+:[A-Za-z0-9_-]+", token):
            raise BadInput("a Telegram bot token looks like 123456:ABC-def (from @BotFather)")
        self.token = token
        redactions.add(token, "telegram-token")
        self.name = check_adapter_name(name)
        self.api_url = api_url.rstrip("/")
        allow = os.environ.get("AGENTKIT_TELEGRAM_ALLOW", "") if allow is None else allow
        if isinstance(allow, str):
            allow = allow.split(",")
        self.allow = {str(a).strip() for a in allow} - {""}
        self.poll_timeout = check_seconds("poll_timeout", poll_timeout, positive=True)
        self.lease = check_seconds("lease", lease, positive=True)
        self.edit_interval = check_seconds("edit_interval", edit_interval)
        self.album_wait = check_seconds("album_wait", album_wait)
        self.clock: Callable[[], float] = time.monotonic  # of streams (tests drive it)
        self.client = httpx.Client(timeout=20.0)
        self._polling = httpx.Client(timeout=self.poll_timeout + 15.0)
        self._streams: dict[str, _TelegramStream] = {}  # by turn id
        self._streams_changed = threading.Condition()
        self._listening = False

    def call(
        self,
        method: str,
        *,
        client: httpx.Client | None = None,
        patient: bool = True,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        **params: Any,
    ) -> Any:
        """One Bot API call; its result. AdapterError (with no token in it) when it fails;
        a 429 is retried after the retry_after Telegram asks for (3 times, up to 30 s),
        unless not `patient`. `files` (field: (name, bytes, media type)) go as a
        multipart upload, the parameters as its fields."""
        url = f"{self.api_url}/bot{self.token}/{method}"
        params = {key: value for key, value in params.items() if value is not None}
        form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        for attempt in range(4):
            try:
                if files:
                    response = (client or self.client).post(url, data=form, files=files)
                else:
                    response = (client or self.client).post(url, json=params)
                data = response.json()
            except (httpx.HTTPError, ValueError, RuntimeError) as e:
                raise AdapterError(f"telegram {method}: {describe_error(e)}") from None
            if not isinstance(data, dict):
                raise AdapterError(f"telegram {method}: not a Bot API answer", response.status_code)
            if data.get("ok"):
                return data.get("result")
            parameters = data.get("parameters")
            retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
            if not isinstance(retry_after, int) or retry_after < 0:
                retry_after = None
            waits = patient and retry_after is not None and retry_after <= 30 and attempt < 3
            if response.status_code == 429 and waits:
                time.sleep(retry_after)
                continue
            raise AdapterError(
                f"telegram {method}: {response.status_code} {data.get('description')}",
                response.status_code,
                retry_after,
            )
        raise AssertionError("unreachable")

    # receiving

    def start(self, kit: "AgentKit") -> None:
        if self._polling.is_closed:
            self._polling = httpx.Client(timeout=self.poll_timeout + 15.0)
        super().start(kit)
        self._typing = threading.Thread(
            target=self._type_while_running, name=f"agentkit-typing-{self.name}", daemon=True
        )
        self._typing.start()
        if not self._listening:
            kit.engine.live.listen(self._hear)
            self._listening = True
        self._streamer = threading.Thread(
            target=self._stream_replies, name=f"agentkit-stream-{self.name}", daemon=True
        )
        self._streamer.start()

    def stop(self) -> None:
        super().stop()
        self.wake()
        self._typing.join(timeout=10)
        self._streamer.join(timeout=10)

    def interrupt(self) -> None:
        self._polling.close()

    def poll(self, cursor: str | None, timeout: float) -> tuple[list[Inbound], str | None]:
        updates = self.call(
            "getUpdates",
            client=self._polling,
            offset=int(cursor) if cursor else None,
            timeout=max(1, math.ceil(timeout)),
            allowed_updates=["message", "callback_query"],
        )
        if not isinstance(updates, list):
            raise AdapterError("telegram getUpdates: the result is not a list")
        items, last = [], int(cursor) - 1 if cursor else None
        for update in updates:
            if isinstance(update, dict) and isinstance(update.get("update_id"), int):
                last = max(last or 0, update["update_id"])
                item = self.inbound(update)
                if item is not None:
                    items.append(self.with_files(item))
        return items, cursor if last is None else str(last + 1)

    MEDIA = (("document", "file"), ("voice", "voice.ogg"), ("audio", "audio"))  # and photos

    def media(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The files of a message to fetch, each `{"file_id", "name", "mime", "size"}`: of a
        photo only its largest size within max_file_bytes (the smallest if none is)."""
        found = []
        sizes = [p for p in message.get("photo") or [] if isinstance(p, dict) and "file_id" in p]
        if sizes:
            sizes.sort(key=lambda p: p.get("file_size") or 0)
            fitting = [p for p in sizes if (p.get("file_size") or 0) <= self.kit.max_file_bytes]
            photo = (fitting or sizes[:1])[-1]
            name = f"photo_{photo.get('file_unique_id', 'telegram')}.jpg"
            found.append({**photo, "file_name": name, "mime_type": "image/jpeg"})
        for kind, default in self.MEDIA:
            item = message.get(kind)
            if isinstance(item, dict) and "file_id" in item:
                found.append({"file_name": default, **item})
        return [
            {
                "file_id": str(f["file_id"]),
                "name": str(f["file_name"] or "file"),
                "mime": f.get("mime_type") if isinstance(f.get("mime_type"), str) else None,
                "size": f.get("file_size") if isinstance(f.get("file_size"), int) else 0,
            }
            for f in found
        ]

    def with_files(self, item: Inbound) -> Inbound:
        """An item with the files of its message fetched (before anything is stored: a
        download that fails for a while fails the poll, which is fetched again). A file
        over max_file_bytes, or one Telegram refuses for good, is refused with a reply,
        and nothing of the message is kept."""
        wanted = (item.meta or {}).pop("media", None)
        item = replace(item, meta=item.meta or None)
        if not wanted or item.refusal:
            return item
        limit = self.kit.max_file_bytes
        files = []
        try:
            for file in wanted:
                check_file_size(file["name"], file["size"], limit)
            for file in wanted:
                data = self.download(file["file_id"], limit)
                files.append(File(file["name"], data, mime=file["mime"]))
        except TooLarge as e:
            return replace(item, refusal=str(e))
        except AdapterError as e:
            if not e.permanent:
                raise
            return replace(item, refusal=f"Sorry, I could not fetch {file['name']}: {e}")
        return replace(item, files=files)

    def download(self, file_id: str, limit: int) -> bytes:
        """A file's bytes: getFile, then its download (the token stays out of errors)."""
        found = self.call("getFile", file_id=file_id)
        path = found.get("file_path") if isinstance(found, dict) else None
        if not isinstance(path, str):
            raise AdapterError("telegram getFile: no file_path in the answer")
        url = f"{self.api_url}/file/bot{self.token}/{urllib.parse.quote(path)}"
        try:
            with self.client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise AdapterError(
                        f"telegram download: {response.status_code}", response.status_code
                    )
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    check_file_size(path, len(data), limit)
        except httpx.HTTPError as e:
            raise AdapterError(f"telegram download: {describe_error(e)}") from None
        return bytes(data)

    def inbound(self, update: dict[str, Any]) -> Inbound | None:
        """The item of one update: a message (text, or media with a caption), or a press
        of an approval button. The files of a message are listed in its meta ("media")
        and fetched by `with_files`; the parts of an album share a group."""
        group = None
        try:
            if isinstance(update.get("message"), dict):
                message, meta = update["message"], {}
                chat = message["chat"]["id"]
                user = (message.get("from") or message["chat"])["id"]
                text = message.get("text")
                media = self.media(message)
                if media:
                    meta["media"] = media
                    caption = message.get("caption")
                    text = caption if isinstance(caption, str) else ""
                    if message.get("media_group_id") is not None:
                        group = f"{chat}:{message['media_group_id']}"
                if not isinstance(text, str):
                    return None  # stickers, members joining: nothing to answer
            elif isinstance(update.get("callback_query"), dict):
                query = update["callback_query"]
                message = query.get("message") or {}
                user = query["from"]["id"]
                chat = (message.get("chat") or {}).get("id", user)
                action, _, approval = str(query.get("data", "")).partition(":")
                text = f"/{action} {approval}"
                meta = {"callback": query["id"], "message_id": message.get("message_id")}
                meta["approval"] = approval
            else:
                return None
        except (KeyError, TypeError):
            log.warning("%s: skipped a malformed update %s", self.name, update.get("update_id"))
            return None
        topic = message.get("message_thread_id") if message.get("is_topic_message") else None
        thread = f"{chat}" if topic is None else f"{chat}:{topic}"
        refusal = None
        if not ({"*", str(user), str(chat)} & self.allow):
            refusal = (
                f"Sorry, I only answer people I know. Your Telegram user id is {user}: "
                "ask my owner to add it to AGENTKIT_TELEGRAM_ALLOW."
            )
        elif "callback" in meta and not re.fullmatch(r"/(approve|deny) apr_[0-9a-f]{16}", text):
            refusal = "That button is not one of mine."
        return Inbound(
            thread,
            str(user),
            text,
            str(update["update_id"]),
            meta or None,
            refusal,
            group=group,
            group_wait=self.album_wait,
        )

    def reach(self, actor: str) -> str | None:
        """A Telegram user is reached in their private chat with the bot (same id)."""
        key = actor.partition(":")[2]
        return actor if actor.startswith(f"{self.name}:") and key.isdigit() else None

    def _type_while_running(self) -> None:
        """Show "typing…" in chats where a turn runs (Telegram shows it for 5 s)."""
        shown: dict[str, float] = {}
        try:
            while not self._stopping.wait(1.0):
                at = time.monotonic()
                for thread in self.kit.store.running_threads(self.name):
                    if at - shown.get(thread, 0.0) >= 4.0:
                        shown[thread] = at
                        with contextlib.suppress(AdapterError):
                            self.call("sendChatAction", **self.chat(thread), action="typing")
        except Exception:
            log.exception("%s: the typing indicator stopped", self.name)
        finally:
            self.kit.store.release_thread()

    # sending

    @staticmethod
    def chat(thread: str) -> dict[str, int | None]:
        """`chat_id` and `message_thread_id` of a thread id."""
        chat, _, topic = thread.partition(":")[2].partition(":")
        return {"chat_id": int(chat), "message_thread_id": int(topic) if topic else None}

    def accepts(self, kind: str, meta: dict[str, Any]) -> bool:
        return kind != "user"

    def send(self, target: str, outbound: Outbound) -> str | None:
        """Send a message (split at 4096 characters; the id of its last piece is the
        reference), answer a button press, or edit an approval request once decided."""
        where = self.chat(target)
        if outbound.meta.get("callback"):
            self.answer_button(outbound)
            return None
        if outbound.kind == "decided":
            self.show_decision(where, outbound)
            return None
        if outbound.kind == "file" and outbound.file:
            return self.send_file(target, where, outbound.file)
        text, markup = outbound.text, None
        if outbound.kind == "approval" and outbound.approval:
            approval = self.kit.gatekeeper.get(outbound.approval["id"])
            if approval.state == "pending":
                key = approval.id
                buttons = [("Approve", f"approve:{key}"), ("Deny", f"deny:{key}")]
                row = [{"text": label, "callback_data": data} for label, data in buttons]
                markup = {"inline_keyboard": [row]}
            else:  # decided before it went out: no buttons to press
                text = approval_text(approval)
        html = outbound.kind == "reply"
        pieces = (
            split_html(markdown_html(text), self.LIMIT) if html else split_text(text, self.LIMIT)
        )
        sent = None
        stream = self._streams.get(outbound.turn_id or "")
        with stream.lock if stream is not None else contextlib.nullcontext():
            for i, piece in enumerate(pieces[outbound.sent_parts :], outbound.sent_parts):
                last = i == len(pieces) - 1
                reply_markup = markup if last else None
                if i == 0 and outbound.stream and outbound.stream.get("message_id"):
                    sent = self.finish_stream(where, int(outbound.stream["message_id"]), piece)
                if sent is None or i > 0:
                    send = self.send_html if html else self.call
                    sent = send("sendMessage", **where, text=piece, reply_markup=reply_markup)
                if not last and outbound.delivery is not None:  # a retry goes on from here
                    self.kit.store.update_delivery(outbound.delivery, None, None, sent_parts=i + 1)
        return str(sent["message_id"]) if isinstance(sent, dict) and "message_id" in sent else None

    def send_file(self, target: str, where: dict[str, int | None], file: dict[str, Any]) -> str:
        """A stored file as a photo (JPEG, PNG, WebP) or else a document, uploaded."""
        data = self.kit.open_file(target, file["id"])
        photo = file["mime"] in ("image/jpeg", "image/png", "image/webp")
        method, field = ("sendPhoto", "photo") if photo else ("sendDocument", "document")
        sent = self.call(method, files={field: (file["name"], data, file["mime"])}, **where)
        return str(sent["message_id"]) if isinstance(sent, dict) else ""

    def send_html(self, method: str, *, text: str, **params: Any) -> Any:
        """sendMessage or editMessageText of an HTML text; when Telegram cannot parse it,
        the same text once more, plain."""
        try:
            return self.call(method, **params, text=text, parse_mode="HTML")
        except AdapterError as e:
            if e.status != 400 or "can't parse entities" not in str(e):
                raise
            return self.call(method, **params, text=html_plain(text))

    def finish_stream(self, where: dict[str, int | None], message_id: int, html: str) -> Any:
        """Edit the message a reply streamed into to show (the first piece of) the reply;
        None when it cannot be edited any more (the reply is then sent afresh)."""
        try:
            self.send_html(
                "editMessageText", chat_id=where["chat_id"], message_id=message_id, text=html
            )
        except AdapterError as e:
            if e.status != 400:
                raise
            if "not modified" not in str(e):  # deleted or too old: send it as a new message
                return None
        return {"message_id": message_id}

    # streaming replies

    def streamed(self, turn_id: str) -> dict[str, Any] | None:
        """The message a reply streamed into (its delivery edits it), claimed: the stream
        stops. A draft needs nothing (the delivery sends the message)."""
        stream = self._streams.get(turn_id)
        if stream is None:
            return None
        # a call in flight may be sending its first message: wait for it a little (this
        # runs in the transaction that stores the reply); else that message is deleted
        locked = stream.lock.acquire(timeout=1.0)
        try:
            stream.claimed = True
            if stream.private or stream.gave_up or stream.message_id is None:
                return None
            return {"message_id": stream.message_id}
        finally:
            if locked:
                stream.lock.release()

    def wake(self) -> None:
        """Have the streaming thread look at the streams again (tests that drive `clock`)."""
        with self._streams_changed:
            self._streams_changed.notify_all()

    def _hear(self, event: TurnEvent) -> None:
        """A live event of a turn run in this process: update its chat's stream."""
        if not event.thread_id.startswith(f"{self.name}:"):
            return
        with self._streams_changed:
            stream = self._streams.get(event.turn_id)
            if stream is None:
                if event.kind == "done":
                    return
                where = self.chat(event.thread_id)
                stream = _TelegramStream(event.turn_id, where)
                self._streams[event.turn_id] = stream
            stream.hear(event)
            self._streams_changed.notify_all()

    def _stream_replies(self) -> None:
        """The streaming thread: drafts and edits, each stream as often as it may."""
        try:
            while not self._stopping.is_set():
                with self._streams_changed:
                    at = self.clock()
                    streams = list(self._streams.values())
                    due = [s for s in streams if s.due(at, self.edit_interval, self.first_chars)]
                    if not due:
                        waits = [s.wait(at, self.edit_interval) for s in streams]
                        pending = [w for w in waits if w is not None]
                        self._streams_changed.wait(min(pending, default=1.0))
                        continue
                for stream in due:
                    self._update(stream)
        except Exception:
            log.exception("%s: streaming replies stopped", self.name)
        finally:
            self.kit.store.release_thread()

    def _update(self, stream: "_TelegramStream") -> None:
        """Show a stream's current text (a draft, the first message, or an edit); a turn
        that ended deletes a message the reply did not claim."""
        with stream.lock:
            if stream.ended:
                with self._streams_changed:
                    self._streams.pop(stream.turn_id, None)
                if stream.message_id is not None and not stream.claimed:
                    self._delete(stream)
                return
            html, at = stream.html(self.LIMIT), self.clock()
            stream.last, stream.dirty = at, False
            try:
                if stream.private:
                    self.call(
                        "sendMessageDraft",
                        patient=False,
                        **stream.where,
                        draft_id=stream.draft_id,
                        text=html,
                        parse_mode="HTML" if html else None,
                    )
                elif stream.message_id is None:
                    sent = self.call(
                        "sendMessage", patient=False, **stream.where, text=html, parse_mode="HTML"
                    )
                    stream.message_id = int(sent["message_id"])
                    if stream.claimed:  # the reply was stored meanwhile and is sent afresh
                        self._delete(stream)
                elif html != stream.shown:
                    self.call(
                        "editMessageText",
                        patient=False,
                        chat_id=stream.where["chat_id"],
                        message_id=stream.message_id,
                        text=html,
                        parse_mode="HTML",
                    )
                stream.shown = html
            except (AdapterError, KeyError, TypeError, ValueError) as e:
                stream.failures += 1
                stream.dirty = True
                retry_after = getattr(e, "retry_after", None)
                if retry_after:
                    stream.paused_until = at + retry_after
                if stream.failures >= self.max_failures:
                    log.warning("%s: stopped streaming %s: %s", self.name, stream.turn_id, e)
                    stream.gave_up = True
                    if stream.message_id is not None:
                        self._delete(stream)

    def _delete(self, stream: "_TelegramStream") -> None:
        """Delete a stream's message (best effort: it only ever showed a partial reply)."""
        message_id, stream.message_id = stream.message_id, None
        with contextlib.suppress(AdapterError):
            self.call(
                "deleteMessage",
                patient=False,
                chat_id=stream.where["chat_id"],
                message_id=message_id,
            )

    def answer_button(self, outbound: Outbound) -> None:
        """Answer a button press with a toast (an alert when nothing was decided; the
        message itself is edited by the decision's own delivery)."""
        approval = None
        with contextlib.suppress(BadInput):
            approval = self.kit.gatekeeper.get(outbound.meta.get("approval") or "")
        try:
            self.call(
                "answerCallbackQuery",
                callback_query_id=outbound.meta["callback"],
                text=outbound.text[:200],
                show_alert=approval is None or approval.state == "pending",
            )
        except AdapterError as e:
            if e.status != 400:  # 400: too late or answered already (a retried delivery)
                raise

    def show_decision(self, where: dict[str, int | None], outbound: Outbound) -> None:
        """Edit an approval request to show its decision; its buttons go."""
        if outbound.ref is None:
            return  # the request was never sent, or is sent showing the decision
        try:
            self.call(
                "editMessageText",
                chat_id=where["chat_id"],
                message_id=int(outbound.ref),
                text=outbound.text[: self.LIMIT],
            )
        except AdapterError as e:
            if e.status != 400:  # 400: deleted, too old to edit, or edited already
                raise

    def close(self) -> None:
        self.client.close()
        self._polling.close()


# What some server or proxy on the way may read differently: user info, fragments, `;` path
# parameters (Tomcat strips `..;`), backslashes, and escapes of `.`, `/`, `\\`, `;` or `%`
# itself (double decoding), or a `%` that is no escape at all (IIS's `%u002e`).
AMBIGUOUS_URL = re.compile(r"[^\x21-\x7e]|[\\#@;]|%(?![0-9a-fA-F]{2})|%(2[5eEfF]|5[cC]|3[bB])")


def url_parts(url: object) -> tuple[str, str, int, str, str] | None:
    """`(scheme, host, port, path, query)` of a plain http(s) URL, or None when it is
    ambiguous: an `@` (user info), a `#`, a `;`, a backslash, a space, control or
    non-ASCII character, an empty, `.` or `..` path segment, a percent-encoded dot, slash,
    backslash, semicolon or percent sign, or a `%` that starts no escape."""
    if not isinstance(url, str) or AMBIGUOUS_URL.search(url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    segments = parts.path.split("/")[1:]
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not parts.path.startswith("/")
        or "" in segments[:-1]
        or any(segment in (".", "..") for segment in segments)
    ):
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path, parts.query


class Webhook(Adapter):
    """Signed HTTP events in, signed callbacks of the replies out (DESIGN's wire contract).

    `POST /webhook/<name>` with `{"id", "thread", "actor", "text"}` (and optionally
    `"callback"`, a URL under one of `callbacks`: same scheme, host and port, its path
    below the prefix's, nothing ambiguous like `..`; see `url_parts`) and the header
    `X-Agentkit-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
    `GET /webhook/<name>/turns/<turn id>` is signed the same way over `"<t>.<path>"`.
    """

    WINDOW = 300

    def __init__(self, secret: str, *, name: str = "webhook", callbacks: Sequence[str] = ()):
        if not isinstance(secret, str) or len(secret) < 16:
            raise BadInput("a webhook secret is a string of 16 characters or more")
        self.name = check_adapter_name(name)
        self.secret = secret.encode()
        redactions.add(secret, f"{self.name}-secret")
        self.callbacks: list[tuple[str, str, int, str, str]] = []
        for url in callbacks:
            parts = url_parts(url)
            if parts is None or not parts[3].endswith("/") or parts[4]:
                raise BadInput(
                    "a callback prefix is a plain http(s) URL whose path ends with '/' "
                    f"(no query, user info or '..'), not {url!r}"
                )
            self.callbacks.append(parts)
        self.client = httpx.Client(timeout=10.0)

    def accepts(self, kind: str, meta: dict[str, Any]) -> bool:
        return kind in ("reply", "error") and "callback" in meta

    def allows(self, callback: object) -> bool:
        """Whether `callback` is an unambiguous URL under one of the callback prefixes."""
        parts = url_parts(callback)
        return parts is not None and any(
            parts[:3] == prefix[:3] and parts[3].startswith(prefix[3]) for prefix in self.callbacks
        )

    def signature(self, t: int, payload: bytes) -> str:
        return hmac.new(self.secret, f"{t}.".encode() + payload, hashlib.sha256).hexdigest()

    def verify(self, header: str | None, payload: bytes) -> bool:
        """Whether `header` signs `payload` within the last five minutes."""
        fields = dict(p.split("=", 1) for p in (header or "").split(",") if "=" in p)
        t = fields.get("t", "")
        if not (re.fullmatch(r"[0-9]{1,11}", t) and abs(now() - int(t)) <= self.WINDOW):
            return False
        return same_secret(fields.get("v1", ""), self.signature(int(t), payload))

    def http(self, request: HTTPRequest) -> HTTPResponse | None:
        base = f"/webhook/{self.name}"
        if request.path == base and request.method == "POST":
            return self.receive(request)
        if request.path.startswith(f"{base}/turns/") and request.method == "GET":
            return self.report(request)
        return None

    def receive(self, request: HTTPRequest) -> HTTPResponse:
        if not self.verify(request.headers.get("x-agentkit-signature"), request.body):
            return json_response(401, {"error": "bad or stale signature"})
        try:
            event = json_body(request)
            for key in ("id", "thread", "actor", "text"):
                if not isinstance(event.get(key), str) or not event[key]:
                    raise BadInput(f"{key!r} must be a non-empty string")
            callback = event.get("callback")
            if callback is not None and not self.allows(callback):
                raise BadInput("the callback URL is not allowed")
            files = self.files(event.get("files", []))
            digest = hashlib.sha256(request.body).hexdigest()
            meta = {"digest": digest, "event": event["id"]}
            if callback:
                meta["callback"] = callback
            with self.kit.store.transaction():
                seen = self.kit.records.seen(self.name, event["id"])
                if seen and (seen.meta or {}).get("digest") != digest:
                    return json_response(409, {"error": "this event id came with another body"})
                item = Inbound(
                    event["thread"], event["actor"], event["text"], event["id"], meta, files=files
                )
                turn_id = seen.id if seen else self.kit.receive(self, item)[0]
        except TooLarge as e:
            return json_response(413, {"error": str(e)})
        except BadInput as e:
            return json_response(400, {"error": str(e)})
        thread = f"{self.name}:{event['thread']}"
        return json_response(202, {"turn_id": turn_id, "thread_id": thread})

    def files(self, given: object) -> list[File]:
        """The event's `files`, `[{"name", "data": base64, "mime"?}]`, each checked against
        max_file_bytes (TooLarge) before anything is stored."""
        if not isinstance(given, list) or not all(isinstance(f, dict) for f in given):
            raise BadInput("files must be a list of {name, data (base64), mime}")
        files = []
        for f in given:
            name, data, mime = f.get("name"), f.get("data"), f.get("mime")
            if not isinstance(data, str) or not isinstance(mime, (str, type(None))):
                raise BadInput("a file has data (base64 text) and maybe a mime")
            try:
                content = base64.b64decode(data, validate=True)
            except ValueError:
                raise BadInput(f"the data of file {name!r} is not base64") from None
            check_file_size(
                check_name("file name", name, 255), len(content), self.kit.max_file_bytes
            )
            files.append(File(name, content, mime=mime))
        return files

    def report(self, request: HTTPRequest) -> HTTPResponse:
        if not self.verify(request.headers.get("x-agentkit-signature"), request.path.encode()):
            return json_response(401, {"error": "bad or stale signature"})
        try:
            result = self.kit.turn(request.path.rpartition("/")[2])
        except BadInput:
            result = None
        if result is None or not result.thread_id.startswith(f"{self.name}:"):
            return json_response(404, {"error": "no such turn"})
        keys = ("turn_id", "thread_id", "status", "reply", "error")
        return json_response(200, {key: getattr(result, key) for key in keys})

    def send(self, target: str, outbound: Outbound) -> None:
        """POST the reply to the event's callback URL, signed like the events."""
        body = dumps(
            {
                "event": outbound.meta.get("event"),
                "turn_id": outbound.turn_id,
                "thread_id": target,
                "status": "done" if outbound.kind == "reply" else "failed",
                "reply": outbound.text,
            }
        ).encode()
        t = int(now())
        headers = {
            "Content-Type": "application/json",
            "X-Agentkit-Signature": f"t={t},v1={self.signature(t, body)}",
        }
        try:
            response = self.client.post(outbound.meta["callback"], content=body, headers=headers)
        except httpx.HTTPError as e:
            raise AdapterError(f"webhook callback: {describe_error(e)}") from None
        if response.status_code >= 300:
            raise AdapterError(
                f"webhook callback answered {response.status_code}", response.status_code
            )

    def close(self) -> None:
        self.client.close()


WEB_THREAD_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOL_TEXT = 20_000  # characters of a tool's arguments or result shown in its card


class _WebStream:
    """One turn as the web chat shows it: its steps' text and tool cards in order, from
    the live events of this process and, for what was not seen live (a turn run
    elsewhere, or before a takeover), its stored steps; never the same text twice."""

    def __init__(self, records: Records, turn_id: str) -> None:
        self.watch = TurnWatch(records, turn_id)
        self.lock = threading.Lock()
        self.parts: list[dict[str, Any]] = []
        self.cards: dict[str, dict[str, Any]] = {}  # call id -> its part
        self.started: dict[str, float] = {}  # call id -> when it started (live)
        self.ended = False

    def hear(self, event: TurnEvent) -> None:
        with self.lock:
            if event.kind == "done":
                self.ended = True
            if event.kind == "progress":  # the watch passes progress lines on as they come
                card = self.cards.get(event.call_id or "")
                if card is not None:
                    card["progress"] = [*card["progress"][-19:], event.text]
            shown = self.watch.live(event)
            if shown is not None:
                self._apply(shown, live=True)

    def view(self) -> dict[str, Any]:
        """The turn's status and parts so far, its stored steps filled in."""
        with self.lock:
            for event in self.watch.stored():
                self._apply(event, live=False)
            status = self.watch.records.turn(self.watch.turn_id).status
            parts = [
                {**part, "progress": list(part["progress"])}
                if part["type"] == "tool"
                else {"type": "text", "step": part["step"], "text": "".join(part["text"])}
                for part in sorted(self.parts, key=lambda part: part["step"])
            ]
            return {"status": status, "parts": parts}

    def _apply(self, event: TurnEvent, *, live: bool) -> None:
        if event.kind == "text":
            last = self.parts[-1] if self.parts else None
            if last and last["type"] == "text" and last["step"] == event.step:
                last["text"].append(event.text)
            else:
                self.parts.append({"type": "text", "step": event.step, "text": [event.text]})
        elif event.kind in ("tool_start", "tool_end"):
            call_id = event.call_id or ""
            card = self.cards.get(call_id)
            if card is None:
                args = clip(dumps(event.args or {}), MAX_TOOL_TEXT)
                card = {"type": "tool", "step": event.step, "id": call_id, "tool": event.tool}
                card |= {"args": args, "state": "running", "progress": [], "ms": None}
                self.cards[call_id] = card
                self.parts.append(card)
                if live:
                    self.started[call_id] = time.monotonic()
            if event.kind == "tool_end":
                card["state"] = "error" if event.is_error else "done"
                card["result"] = clip(str(event.result or ""), MAX_TOOL_TEXT)
                if call_id in self.started:  # timed only when seen live from its start
                    card["ms"] = round((time.monotonic() - self.started[call_id]) * 1000)


class WebChat(Adapter):
    """The web chat at `/`: the owner (`web:owner`) talks to the bot in conversations of
    its own (threads `web:<key>`; `web:owner` is the first), sees replies stream and tool
    calls as cards, stops turns, and decides approvals when it may. It needs the token
    (traded once for a cookie); the server checks Host and Origin on every request."""

    name = "web"
    pull = True
    owner = "web:owner"
    cookie = "agentkit_web"
    long_poll = 25.0
    uploads = "/api/files"  # POST a file here; GET /api/files/<id> downloads one

    def __init__(
        self, token: str | None = None, *, title: str = "agentkit", examples: Sequence[str] = ()
    ) -> None:
        if not isinstance(title, str) or not 0 < len(title) <= 80:
            raise BadInput("title must be a string of 1 to 80 characters")
        if isinstance(examples, str) or len(examples) > 8:
            raise BadInput("examples must be a list of at most 8 prompts")
        for example in examples:
            if not isinstance(example, str) or not 0 < len(example) <= 300:
                raise BadInput("each example must be a prompt of 1 to 300 characters")
        self.token = token
        self.title = title
        self.examples = tuple(examples)
        self._streams: dict[str, _WebStream] = {}  # turn id -> the turn being shown
        self._ended: dict[str, None] = {}  # the turns last let go, oldest first (late events)
        self._versions: dict[str, int] = {}  # thread -> how many live events it had
        self._changed = threading.Condition()  # a live event, or a commit to the database
        self._generation = 0  # grows with each notification of `_changed`
        self._listening = False
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def accepts(self, kind: str, meta: dict[str, Any]) -> bool:
        return True  # a decision too: the page updates the card that asked for it

    def reach(self, actor: str) -> str | None:
        return actor if actor == self.owner else None

    def choose_token(self, db_path: str, url: str, *, new: bool = False) -> None:
        """The token: given, AGENTKIT_WEB_TOKEN (required for a database URL), or the one
        kept in `<database>.token` (mode 0600; made when missing, or with `new`), so open
        tabs survive restarts. The link is printed to a terminal; otherwise the log says
        where the token is. Never logged."""
        self.cookie = f"agentkit_web_{urllib.parse.urlsplit(url).port}"  # a bot per port
        self.token = self.token or os.environ.get("AGENTKIT_WEB_TOKEN")
        if self.token:
            return
        if "://" in db_path:
            raise StoreError(
                f"{db_path} is shared by every host that serves it, and so must be the web "
                "chat's token: set AGENTKIT_WEB_TOKEN (the same on every host)"
            )
        where = "AGENTKIT_WEB_TOKEN"
        if db_path == ":memory:":
            self.token = b64url(os.urandom(24))
        else:
            where = db_path + ".token"
            self.token = _token_file(where, new)
        if sys.stdout.isatty():
            print(f"agentkit web chat: {url}/#token={self.token}", flush=True)
        elif db_path == ":memory:":
            log.warning("the web chat needs AGENTKIT_WEB_TOKEN with a :memory: database")
        else:
            log.info("web chat: open %s/#token=TOKEN with the token in %s", url, where)

    def start(self, kit: "AgentKit") -> None:
        super().start(kit)
        if not self._listening:
            kit.engine.live.listen(self._hear)
            self._listening = True
        self._stopping.clear()
        self._watcher = threading.Thread(
            target=self._watch_store, name="agentkit-web-feed", daemon=True
        )
        self._watcher.start()

    def stop(self) -> None:
        """Answer the waiting feeds and stop watching the database."""
        self._stopping.set()
        self._notify()
        self.kit.store.notify()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)

    def session(self) -> str:
        return hmac.new((self.token or "").encode(), b"agentkit web session", "sha256").hexdigest()

    def signed_in(self, request: HTTPRequest) -> bool:
        cookies = dict(
            part.strip().split("=", 1)
            for part in request.headers.get("cookie", "").split(";")
            if "=" in part
        )
        return bool(self.token) and same_secret(cookies.get(self.cookie, ""), self.session())

    def http(self, request: HTTPRequest) -> HTTPResponse | None:
        route = (request.method, request.path)
        if route == ("GET", "/"):
            page, policy = with_csp(WEBCHAT_PAGE, "'self'", "data: blob: 'self'")  # previews
            return HTTPResponse(
                200,
                page.encode(),
                {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": policy},
            )
        if route == ("POST", "/api/login"):
            token = json_body(request).get("token")
            if not (isinstance(token, str) and self.token and same_secret(token, self.token)):
                return json_response(401, {"error": "wrong token"})
            cookie = f"{self.cookie}={self.session()}; Path=/; HttpOnly; SameSite=Strict"
            return HTTPResponse(204, b"", {"Set-Cookie": cookie})
        if not request.path.startswith("/api/"):
            return None
        if not self.signed_in(request):
            return json_response(401, {"error": "sign in with the link that serve printed"})
        if route == ("GET", "/api/info"):
            return json_response(200, self.info())
        if route == ("GET", "/api/threads"):
            return json_response(200, {"threads": self.conversations()})
        if route == ("GET", "/api/feed"):
            return self.feed(request)
        if route == ("POST", "/api/messages"):
            body = json_body(request)
            text, ids = body.get("text", ""), body.get("files", [])
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise BadInput("files must be a list of upload ids")
            if not isinstance(text, str) or not (text.strip() or ids):
                raise BadInput("text must be a non-empty string (or send files)")
            key = self.thread_key(body.get("thread", "owner"))
            files = [self.upload(i) for i in ids]
            turn_id, note = self.kit.receive(self, Inbound(key, "owner", text, files=files))
            if turn_id is None:
                return json_response(413 if files else 400, {"error": note})
            return json_response(202, {"turn_id": turn_id})
        if route == ("POST", self.uploads):
            return self.store_upload(request)
        if request.method == "GET" and request.path.startswith(f"{self.uploads}/"):
            return self.download(request.path.removeprefix(f"{self.uploads}/"))
        parts = request.path.split("/")  # "", "api", then the route's own
        if request.method == "POST" and len(parts) == 4 and parts[2] == "approvals":
            return self.decide(parts[3], json_body(request))
        if request.method == "POST" and len(parts) == 5 and parts[2:5:2] == ["turns", "cancel"]:
            return self.cancel(parts[3])
        return None

    @staticmethod
    def thread_key(key: object) -> str:
        """A conversation's key, the part of its thread id after `web:`; BadInput else."""
        if not isinstance(key, str) or not WEB_THREAD_KEY.fullmatch(key):
            raise BadInput("thread must be a conversation key: 1 to 64 letters, digits, - or _")
        return key

    def info(self) -> dict[str, Any]:
        """What the page shows before a conversation: the bot, its model, the examples."""
        return {
            "title": self.title,
            "model": self.kit.engine.model.name,
            "examples": list(self.examples),
            "approver": self.kit.gatekeeper.may_decide(self.owner),
        }

    def conversations(self) -> list[dict[str, Any]]:
        """The owner's conversations, most recently active first, titled by their first
        message."""
        return [
            {
                "key": summary.id.partition(":")[2],
                "title": clip(" ".join((summary.title or "").split()), 80) or "New chat",
                "updated_at": summary.updated_at,
            }
            for summary in self.kit.store.thread_summaries(f"{self.name}:", 200)
        ]

    def feed(self, request: HTTPRequest) -> HTTPResponse:
        """A conversation's deliveries after `?after=`, the turns they, its running turns
        and `?turns=` make (text so far, tool cards), and `state`, to send back as
        `?seen=`: the answer waits up to `long_poll` s for a new delivery or a change of
        state (a first request, with no `seen` and `after=0`, is answered at once)."""
        after = request.query.get("after", "0")
        if not re.fullmatch(r"[0-9]{1,18}", after):
            raise BadInput("after must be a delivery id")
        thread = f"{self.name}:{self.thread_key(request.query.get('thread', 'owner'))}"
        seen = request.query.get("seen")  # without it, only a new delivery answers early
        watched = request.query.get("turns", "")
        if not re.fullmatch(r"(turn_[0-9a-f]{1,40})?(,turn_[0-9a-f]{1,40}){0,19}", watched):
            raise BadInput("turns must be up to 20 turn ids, separated by commas")
        deadline = time.monotonic() + self.long_poll
        while True:
            generation = self._generation
            items = self.kit.store.deliveries(thread, int(after), 200)
            active = self.kit.store.active_turns(thread)
            newest = active[-1] if active else ""
            state = f"{self._versions.get(thread, 0)}.{len(active)}.{newest}"
            left = deadline - time.monotonic()
            changed = state != seen if seen is not None else after == "0"
            if items or changed or left <= 0 or self._stopping.is_set():
                break
            self._wait_past(generation, min(left, 5.0))
        shown = [self.entry(item) for item in items]
        mentioned = [item.turn_id for item in items if item.turn_id]
        turn_ids = dict.fromkeys([*mentioned, *active, *filter(None, watched.split(","))])
        views = {turn_id: self.turn_view(turn_id, thread) for turn_id in turn_ids}
        return json_response(
            200,
            {
                "items": shown,
                "last": items[-1].id if items else int(after),
                "turns": {turn_id: view for turn_id, view in views.items() if view},
                "active": active,
                "state": state,
            },
        )

    def entry(self, item: Delivery) -> dict[str, Any]:
        """One delivery as the page shows it: the internal note that stands for saved
        secrets is a note, not the owner's message; an approval says who may decide."""
        kind = item.kind
        if kind == "user" and item.body["text"].startswith(SAVED_NOTE_START):
            kind = "note"
        entry = {"id": item.id, "kind": kind, "text": item.body["text"], "turn_id": item.turn_id}
        if kind == "secret":
            entry["url"] = item.body.get("url")
        if item.body.get("file"):
            entry["file"] = self.linked(item.body["file"])
        if item.body.get("files"):
            entry["files"] = [self.linked(file) for file in item.body["files"]]
        asked = self.kit.records.delivery(item.body["updates"]) if kind == "decided" else item
        if kind in ("approval", "decided"):
            approval = self.kit.gatekeeper.get(asked.body["approval"]["id"])
            entry["updates"] = asked.id  # a decision: the page updates the request's card
            entry["approval"] = {
                **asked.body["approval"],
                "state": approval.state,
                "decided_by": approval.decided_by,
                "decision_reason": approval.decision_reason,
                "choices": list(self.kit.gatekeeper.choices(approval, self.owner)),
            }
        return entry

    def turn_view(self, turn_id: str, thread: str) -> dict[str, Any] | None:
        """A turn of the thread, its status and parts: the live stream's while it runs
        here, else its stored steps (a stream is let go once its turn ended); None for a
        turn of another thread."""
        turn = self.kit.store.turn(turn_id)
        if turn is None or turn.thread_id != thread:
            return None
        stream = self._streams.get(turn_id) or _WebStream(self.kit.records, turn_id)
        view = stream.view()
        if stream.ended or view["status"] in FINAL_TURN_STATES:
            self._ended[turn_id] = None
            while len(self._ended) > 1000:
                del self._ended[next(iter(self._ended))]
            self._streams.pop(turn_id, None)
        return view

    def cancel(self, turn_id: str) -> HTTPResponse:
        """Stop a turn of the owner's conversations now (as `/cancel`, without waiting
        for its next step)."""
        turn = self.kit.store.turn(turn_id) if turn_id.startswith("turn_") else None
        if turn is None or not turn.thread_id.startswith(f"{self.name}:"):
            return json_response(404, {"error": f"no turn {turn_id} in the web chat"})
        return json_response(200, {"status": self.kit.cancel(turn_id, at_once=True).status})

    def linked(self, file: dict[str, Any]) -> dict[str, Any]:
        """A file as the page shows it: with the URL it downloads from."""
        return {**file, "url": f"{self.uploads}/{file['id']}"}

    def upload(self, attachment_id: str) -> Attachment:
        """An upload of the owner's thread, to send with a message."""
        found = ATTACHMENT_ID.fullmatch(attachment_id) and self.kit.store.attachment(
            attachment_id, self.owner
        )
        if not found or found.turn_id is not None:
            raise BadInput(f"{attachment_id!r} is not an upload waiting to be sent")
        return found.attachment

    def store_upload(self, request: HTTPRequest) -> HTTPResponse:
        """`POST /api/files?name=<file name>`, the body the file's bytes and Content-Type
        its type: stored in the owner's thread until a message takes it (`files` of
        `POST /api/messages`); its id, name, mime, size and url."""
        name = request.query.get("name", "")
        mime = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if mime in ("", "application/x-www-form-urlencoded", "text/plain"):
            mime = ""  # what a browser sends for a body it was not told the type of
        file = File(name, request.body, mime=mime or None)
        try:
            with self.kit.store.transaction():
                [attachment] = self.kit.records.save_files(self.owner, None, [file])
        except TooLarge as e:
            return json_response(413, {"error": str(e)})
        return json_response(201, self.linked(file_info(attachment)))

    def download(self, attachment_id: str) -> HTTPResponse:
        """A file of the owner's thread, always as a download: raster images keep their
        type (so a page can show them), anything else is application/octet-stream."""
        try:
            data = self.kit.open_file(self.owner, attachment_id)
        except NotFound:
            return json_response(404, {"error": "no such file"})
        row = self.kit.store.attachment(attachment_id, self.owner)
        assert row is not None
        kind = row.mime if row.mime in IMAGE_TYPES else "application/octet-stream"
        plain = re.sub(r"[^A-Za-z0-9._ -]", "_", row.name) or "file"
        disposition = (
            f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(row.name)}"
        )
        headers = {
            "Content-Type": kind,
            "Content-Disposition": disposition,
            "Content-Security-Policy": "default-src 'none'; sandbox",
        }
        return HTTPResponse(200, data, headers)

    def decide(self, approval_id: str, body: dict[str, Any]) -> HTTPResponse:
        decision, reason = body.get("decision"), body.get("reason")
        if decision not in ("approve", "deny"):
            raise BadInput("decision must be approve or deny")
        try:
            if decision == "approve":
                self.kit.approve(approval_id, actor=self.owner, wait=False)
            else:
                self.kit.deny(approval_id, actor=self.owner, reason=reason or None, wait=False)
        except Forbidden as e:
            return json_response(403, {"error": str(e)})
        except AlreadyDecided as e:
            return json_response(409, {"error": str(e)})
        state = self.kit.gatekeeper.get(approval_id).state
        return json_response(200, {"state": state, "message": f"{state.capitalize()}."})

    def _hear(self, event: TurnEvent) -> None:
        """A live event of a turn run in this process: its conversation's stream."""
        if not event.thread_id.startswith(f"{self.name}:") or event.turn_id in self._ended:
            return
        stream = self._streams.get(event.turn_id)
        if stream is None:
            stream = self._streams.setdefault(
                event.turn_id, _WebStream(self.kit.records, event.turn_id)
            )
        stream.hear(event)
        self._versions[event.thread_id] = self._versions.get(event.thread_id, 0) + 1
        self._notify()

    def _wait_past(self, generation: int, timeout: float) -> None:
        """Wait until the feeds are notified after `generation`, or `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != generation, timeout)

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _watch_store(self) -> None:
        """Wake the waiting feeds at each commit to the database (one watcher for all)."""
        try:
            while not self._stopping.is_set():
                self.kit.store.wait_for_change(1.0)
                self._notify()
        finally:
            self.kit.store.release_thread()


def _token_file(path: str, new: bool) -> str:
    """The token kept in `path` (mode 0600, never followed as a link); a fresh one when
    the file is missing or `new`."""
    if not new:
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
            if token := f.read().strip():
                return token
    token = b64url(os.urandom(24))
    temporary = f"{path}.{os.getpid()}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(temporary, path)
    return token


# ───────────────────────────────────── HTTP server ─────────────────────────────────────

MAX_BODY = 1 << 20
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `:port`, or a port) as `(host, port)`; BadInput otherwise."""
    host, _, port = str(address).rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise BadInput(f"--http takes host:port, like 127.0.0.1:8765, not {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Handler(BaseHTTPRequestHandler):
    server: "WebServer"
    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops sending is dropped

    def do_GET(self) -> None:
        self.handle_request()

    def do_POST(self) -> None:
        self.handle_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals, none of them a 5xx: an unknown method is 405, an
        unknown HTTP version 400."""
        super().send_error({501: 405, 505: 400}.get(code, code), message, explain)

    def handle_request(self) -> None:
        """Read the request, route it, answer: bad input is a 400, a bug a 500 (logged).
        A client that goes away is the server's `handle_error`."""
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not re.fullmatch(r"[0-9]{1,10}", length):
            self.close_connection = True
            return self.reply(json_response(411, {"error": "send a Content-Length"}))
        parts = urllib.parse.urlsplit(self.path)  # http.server made it one "/" path
        head = HTTPRequest(
            self.command,
            parts.path,
            dict(urllib.parse.parse_qsl(parts.query)),
            {name.lower(): value for name, value in self.headers.items()},
            b"",
        )
        limit = self.server.body_limit(head)
        if int(length) > limit:
            self.close_connection = True
            error = (
                "the body is over 1 MiB"
                if limit == MAX_BODY
                else f"the file is over {limit:,} bytes"
            )
            return self.reply(json_response(413, {"error": error}))
        request = replace(head, body=self.rfile.read(int(length)))
        try:
            response = self.server.route(request)
        except BadInput as e:
            response = json_response(400, {"error": str(e)})
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            response = json_response(500, {"error": "internal error"})
        self.reply(response)

    def reply(self, response: HTTPResponse) -> None:
        self.send_response(response.status)
        if self.close_connection:  # after a refused body: say so, or clients reuse it
            response.headers["Connection"] = "close"
        headers = {
            "Content-Type": "application/json",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            **response.headers,
            "Content-Length": str(len(response.body)),
        }
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.kit.store.release_thread()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class WebServer(ThreadingHTTPServer):
    """agentkit's HTTP server: `/healthz`, the webhooks, the secret page and the web chat.

    Browser routes answer only to the Host names this server is reached at (against DNS
    rebinding) and take POSTs only from its own Origin (against cross-site requests).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, kit: "AgentKit", host: str, port: int) -> None:
        self.kit = kit
        self._connections: set[socket.socket] = set()  # open, kept alive between requests
        self._connections_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), _Handler)
        port = self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self.hosts = {f"{shown}:{port}", *(f"{name}:{port}" for name in LOOPBACK_NAMES)}
        self.hosts.add(urllib.parse.urlsplit(kit.secrets.public_url).netloc)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and end the open connections too, so that no browser keeps
        talking to a server that stopped (it connects again, maybe to its successor)."""
        super().server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closed its socket or stopped sending is dropped quietly; anything
        else is logged (never printed to stderr)."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("http: %s went away (%s)", client_address, describe_error(error))
        else:
            log.exception("http: the request from %s failed", client_address)

    def body_limit(self, head: HTTPRequest) -> int:
        """The largest body a request may send, read before its body: a web chat upload
        of a signed-in page up to max_file_bytes, anything else 1 MiB."""
        web = self.kit.adapters["web"]
        upload = (head.method, head.path) == ("POST", WebChat.uploads)
        if upload and isinstance(web, WebChat) and web.signed_in(head):
            return max(self.kit.max_file_bytes, MAX_BODY)
        return MAX_BODY

    def route(self, request: HTTPRequest) -> HTTPResponse:
        if request.path == "/healthz":
            return json_response(200, self.kit.health())
        if request.path.startswith("/webhook/"):
            adapter = self.kit.adapters.get(request.path.split("/")[2])
            response = adapter.http(request) if isinstance(adapter, Webhook) else None
            return response or json_response(404, {"error": "no such webhook"})
        host = request.headers.get("host", "")
        if host not in self.hosts:
            return json_response(
                421,
                {
                    "error": f"this server does not answer to Host {host!r}: to open it at "
                    "that address, set AGENTKIT_PUBLIC_URL (or public_url=) to it, like "
                    f"https://{host or 'bot.example.com'}"
                },
            )
        if request.method != "GET" and request.headers.get("origin") not in (
            f"http://{host}",
            f"https://{host}",
        ):
            return json_response(403, {"error": "cross-origin request refused"})
        if (request.method, request.path) == ("GET", "/secret"):
            page, policy = secret_page()
            headers = {
                "Content-Type": "text/html; charset=utf-8",
                "Content-Security-Policy": policy,
            }
            return HTTPResponse(200, page.encode(), headers)
        response = self.kit.adapters["web"].http(request)
        return response or json_response(404, {"error": "not found"})


# ─────────────────────────────────────── extensions ───────────────────────────────────────
# Extensions are modules with `setup(kit)`, named like "package.module" or by the path of a
# .py file; every process of a deployment loads the same ones (`extensions=`, `--ext`).


def load_extension(spec: str) -> types.ModuleType:
    """The module an extension spec names: a path ending in `.py` (relative to the current
    directory) or a module imported from the current directory or sys.path. BadInput,
    saying why, when it cannot be loaded or has no `setup(kit)`."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInput(f"an extension is a module name or a .py path, not {spec!r}")
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).resolve()
            name = f"agentkit_extension_{path.stem}_{hashlib.sha256(bytes(path)).hexdigest()[:8]}"
            module = sys.modules.get(name)
            if module is None:
                found = importlib.util.spec_from_file_location(name, path)
                if found is None or found.loader is None or not path.is_file():
                    raise FileNotFoundError(f"no file {path}")
                module = importlib.util.module_from_spec(found)
                sys.modules[name] = module
                try:
                    found.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(spec)
    except Exception as e:  # an extension may fail in any way: say so in one line
        raise BadInput(f"cannot load extension {spec}: {describe_error(e)}") from None
    if not callable(getattr(module, "setup", None)):
        raise BadInput(f"extension {spec} has no setup(kit) function: define one")
    return module


# ─────────────────────────────────── the AgentKit facade ───────────────────────────────────


@contextlib.contextmanager
def stopping_on_signals(stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """An event that SIGINT and SIGTERM set while the block runs (in the main thread; in
    another thread only the event), the previous handlers restored after."""
    stop = stop or threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


class AgentKit:
    """An agent kit over one SQLite database: the object users configure and run.

    `AgentKit("agent.db")` opens or creates the database (`":memory:"` is for one
    process). Close it with `close()` or use it as a context manager.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] = "agentkit.db",
        *,
        model: str | Model | None = None,
        instructions: str = "You are a helpful assistant.",
        workspace: str | os.PathLike[str] | None = None,
        max_steps: int = 20,
        context_window: int | None = None,
        reserve_tokens: int = 16_384,
        keep_recent_tokens: int = 20_000,
        summary_model: str | Model | None = None,
        context_messages: int | None = None,
        context_chars: int | None = None,
        approvers: Sequence[str] = DEFAULT_APPROVERS,
        allow_self_approval: bool = True,
        approval_ttl: float = 3600.0,
        adapters: Sequence[Adapter] = (),
        public_url: str | None = None,
        secret_ttl: float = 600.0,
        secret_tool: bool = True,
        lease: float = 30.0,
        synchronous: str = "normal",
        runtime: str | RuntimeProvider = "local",
        runtime_scope: str = "thread",
        runtime_idle: float = 900.0,
        workspace_tools: bool | Sequence[str] = False,
        workspace_tools_approval: bool | Callable[..., bool | str] = True,
        attachments: AttachmentStore | None = None,
        max_file_bytes: int = MAX_FILE_BYTES,
        extensions: Sequence[str] = (),
        while_busy: str = "next_turn",
        parallel_tools: bool = True,
    ) -> None:
        for name, value in [
            ("max_steps", max_steps),
            ("context_messages", context_messages),
            ("context_chars", context_chars),
        ]:
            if value is not None or name == "max_steps":
                check_int(name, value, low=1)
        for pattern in approvers:
            check_thread(pattern)
        approval_ttl = check_seconds("approval_ttl", approval_ttl, positive=True)
        self.lease = check_seconds("lease", lease, positive=True)
        check_choice("while_busy", while_busy, DELIVERIES)
        if isinstance(extensions, str):
            raise BadInput("extensions is a list of module names or .py paths, not one string")
        self.models = MODELS.copy()  # the model specs this kit resolves; register_model adds
        db = os.fspath(db)
        if workspace is None:
            workspace = os.path.join(os.path.dirname(os.path.abspath(db)), "workspace")
            if db == ":memory:" or "://" in db:  # no folder of its own: this one's
                workspace = os.path.abspath("workspace")
        if not extensions:  # their prefixes are known once they are loaded
            self.models.make(model)  # a bad spec is refused before anything is created
        runtimes = Runtimes(
            runtime_provider(runtime),
            scope=runtime_scope,
            workspace=Path(workspace),
            idle=runtime_idle,
        )
        tools = workspace_tools_of(workspace_tools, workspace_tools_approval)
        self.store = open_store(db, synchronous=synchronous)
        move_old_workspaces(Path(workspace), self.store)
        self.queue = Queue(self.store)
        self.scheduler = Scheduler(self.queue)
        self.engine = TurnEngine(
            self.queue,
            model=EchoModel(),  # until the spec is resolved, once extensions are loaded
            instructions=instructions,
            workspace=Path(workspace),
            max_steps=max_steps,
            approval_ttl=approval_ttl,
            context_window=context_window,
            reserve_tokens=reserve_tokens,
            keep_recent_tokens=keep_recent_tokens,
            summary_model=None if summary_model is None else model_from_spec(summary_model),
            max_messages=context_messages,
            max_chars=context_chars,
            while_busy=while_busy,
            parallel_tools=parallel_tools,
        )
        self.gatekeeper = Approvals(self.engine, approvers, allow_self_approval=allow_self_approval)
        self.engine.commands["approve"] = self._approve_command
        self.engine.commands["deny"] = self._deny_command
        self.records = self.engine.records
        self.max_file_bytes = self.records.max_file_bytes = check_int(
            "max_file_bytes", max_file_bytes, low=1
        )
        if attachments is None:
            beside = None if db == ":memory:" or "://" in db else Path(f"{db}.files")
            attachments = StoredFiles(self.store, beside)
        elif not isinstance(attachments, AttachmentStore):
            raise BadInput("attachments= takes an AttachmentStore (save and open)")
        self.attachments = self.records.files = attachments
        public_url = public_url or os.environ.get("AGENTKIT_PUBLIC_URL")
        self._public_url_given = public_url is not None
        self.secrets = Secrets(
            self.records,
            workspace=Path(workspace),
            public_url=public_url or "http://127.0.0.1:8765",
            ttl=secret_ttl,
        )
        self.records.saved_secrets = self.secrets.values
        if secret_tool:
            self.tool(self._secret_request_tool, name="secret_request")
        self.runtimes = self.engine.runtimes = runtimes
        runtimes.secret_files = self.secrets.write_files
        self.engine.tools.update((made.name, made) for made in tools)
        self.adapters = self._adapters(adapters)
        self.records.outlets = dict(self.adapters)
        self.records.may_decide = self.gatekeeper.may_decide
        self.records.approver_inboxes = tuple(
            inbox
            for pattern in approvers
            if (adapter := self.adapters.get(pattern.partition(":")[0]))
            and (inbox := adapter.reach(pattern))
        )
        if any(not adapter.pull for adapter in self.adapters.values()):
            self.queue.tasks[DELIVER_TASK] = Task(DELIVER_TASK, self._deliver, 8, 2.0)
        self.stopping = threading.Event()  # set while serve() shuts down
        # the threads that run streamed turns (each keeps its database connection)
        self._streamers = concurrent.futures.ThreadPoolExecutor(32, "agentkit-stream")
        self._workers: set[Worker] = set()  # those running `work` (or `serve`) now
        self._working = threading.Condition()
        self.extensions: list[str] = []  # the specs of the extensions loaded, in order
        self._extension_modules: set[str] = set()
        try:
            for spec in extensions:
                self.load_extension(spec)
            self.engine.model = self.models.make(model)
        except BaseException:
            self.close()
            raise

    # extensions

    def load_extension(self, spec: str) -> None:
        """Load an extension ("package.module" or "path/to/ext.py") and call its
        `setup(kit)` with this kit; an extension already loaded here is not set up again."""
        module = load_extension(spec)
        if module.__name__ in self._extension_modules:
            return
        try:
            module.setup(self)
        except Exception as e:
            raise BadInput(f"extension {spec}: setup(kit) raised {describe_error(e)}") from e
        self._extension_modules.add(module.__name__)
        self.extensions.append(spec)

    def register_model(self, prefix: str, factory: Callable[[str], Model]) -> None:
        """Make `"<prefix>:<model>"` a model spec of this kit (`model=`, `--model`,
        AGENTKIT_MODEL): `factory("<model>")` makes the Model when a spec names it."""
        self.models.register(prefix, factory)

    def entries(self, thread: str, kind: str | None = None, limit: int = 1000) -> list[Entry]:
        """A thread's entries (`ctx.entries.append`), oldest first: each has `.kind`,
        `.data` and `.at`; only those of `kind` when given; the newest `limit`."""
        kind = None if kind is None else check_entry_kind(kind)
        return self.store.entries(check_thread(thread), kind, check_int("limit", limit))

    def _adapters(self, given: Sequence[Adapter]) -> dict[str, Adapter]:
        """The adapters by name: the web chat always; Telegram from TELEGRAM_BOT_TOKEN when
        none is given."""
        adapters: dict[str, Adapter] = {"web": WebChat()}
        token = os.environ.get("TELEGRAM_BOT_TOKEN")
        if token and not any(isinstance(a, Telegram) for a in given):
            given = [*given, Telegram(token)]
        for adapter in given:
            if not isinstance(adapter, Adapter):
                raise BadInput(f"adapters are Adapter objects, not {type(adapter).__name__}")
            name = check_adapter_name(adapter.name)
            replaces_web = name == "web" and isinstance(adapter, WebChat)
            if (name in adapters and not replaces_web) or adapter in adapters.values():
                raise BadInput(f"two adapters are named {name!r} (web is the web chat's)")
            adapters[name] = adapter
            adapter.kit = self
        adapters["web"].kit = self
        return adapters

    def close(self) -> None:
        """Stop this kit's workers and `serve`, waiting for their running jobs (up to
        `lease` seconds), then close the database connections and the adapters' HTTP
        clients. Refused from inside a job (a task, tool or hook) of this kit."""
        here = threading.get_ident()
        with self._working:
            if any(here in worker.threads for worker in self._workers):
                raise BadInput("close() would wait for the job it is called from")
            for worker in self._workers:
                worker.halt()
            self._working.wait_for(lambda: not self._workers, timeout=self.lease)
        for adapter in self.adapters.values():
            adapter.close()
        self.runtimes.close()
        self._streamers.shutdown(wait=False, cancel_futures=True)
        self.engine.close()
        self.store.close()

    def __enter__(self) -> "AgentKit":
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
            task_name = check_name("task name", name or callable_name(fn))
            check_int("retries", retries)
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
        return self.queue.recent(state, limit)

    def cancel(self, id: str, *, at_once: bool = False) -> Job | TurnResult:
        """Cancel a queued job (`job_…`), or a turn (`turn_…`): a queued one at once, a
        running one at its next step, or with `at_once` now (its worker's later writes are
        refused, and the thread's next message runs right away; a call it was running is
        recorded as interrupted, its effect unknown)."""
        if isinstance(id, str) and id.startswith("turn_"):
            self.engine.records.cancel(id, at_once=at_once)
            return self.engine.result(id)
        return self.queue.cancel(id)

    def retry(self, job_id: str) -> Job:
        """Queue a dead or failed job again."""
        return self.queue.retry(job_id)

    def work(
        self,
        *,
        concurrency: int = 1,
        until_idle: bool = False,
        stop: threading.Event | None = None,
    ) -> int:
        """Run this process's tasks and the scheduler; the number of jobs run.

        Blocks until `stop` is set, or with `until_idle` until no job is ready.
        """
        with self._working_with(concurrency, tick=self.tick) as worker:
            return worker.run(until_idle=until_idle, stop=stop)

    @contextlib.contextmanager
    def _working_with(
        self, concurrency: int = 1, tick: Callable[[], object] | None = None
    ) -> Iterator[Worker]:
        """A worker of this kit's tasks, which `close` halts and waits for until the block
        ends."""
        worker = Worker(
            self.queue,
            concurrency=concurrency,
            lease=self.lease,
            tick=tick,
            on_failed=self._job_failed,
        )
        with self._working:
            self._workers.add(worker)
        try:
            yield worker
        finally:
            with self._working:
                self._workers.discard(worker)
                self._working.notify_all()

    def _job_failed(self, job: Claimed, state: str, error: str) -> None:
        """A job ended dead or failed: its turn (if it ran one) fails too, a delivery is
        marked failed, and the `job_failed` event is emitted (a hook that raises is logged)."""
        turn_id = job.payload.get("turn") if job.name == TURN_TASK else None
        if turn_id and self.engine.records.turn(turn_id).status not in FINAL_TURN_STATES:
            self.engine.records.finish(turn_id, "failed", error=f"its job is {state}: {error}")
        if job.name == DELIVER_TASK:
            self.store.update_delivery(job.payload["delivery"], "failed", error)
        with contextlib.suppress(HookFailed):
            self.engine.hooks.emit(
                "job_failed", job_id=f"job_{job.rowid}", name=job.name, state=state, error=error
            )

    # the outbox

    def _deliver(self, payload: dict[str, int], ctx: JobContext) -> str:
        """The task of deliveries: send one through its adapter, then mark it sent (a
        delivery marked sent is never sent again)."""
        delivery = self.records.delivery(payload["delivery"])
        if delivery.state != "pending":
            return delivery.state
        adapter = self.adapters.get(delivery.adapter)
        if adapter is None:
            raise Fail(f"no adapter {delivery.adapter!r} in this process")
        body = delivery.body
        if not adapter.accepts(delivery.kind, body.get("meta") or {}):  # queued elsewhere
            self.store.update_delivery(delivery.id, "failed", "not for this adapter")
            return "not for this adapter"
        request = self.records.delivery(body["updates"]) if "updates" in body else None
        outbound = Outbound(
            delivery.kind,
            body["text"],
            delivery.thread_id,
            delivery.turn_id,
            body.get("meta") or {},
            body.get("approval"),
            body.get("url"),
            delivery.id,
            body.get("sent_parts", 0),
            request.body.get("ref") if request else None,
            body.get("stream"),
            body.get("file"),
        )
        try:
            ref = adapter.send(delivery.thread_id, outbound)
        except AdapterError as e:
            if e.permanent:
                raise Fail(str(e)) from None
            if e.retry_after is not None:
                raise Retry(str(e), after=e.retry_after) from None
            raise
        with self.store.transaction():
            if not ctx.holds():
                raise LeaseLost(f"{ctx.job_id} is no longer leased to this worker")
            self.store.update_delivery(delivery.id, "sent", None, ref=ref)
        return "sent"

    # inbound messages

    def receive(self, adapter: Adapter, item: Inbound) -> tuple[str | None, str | None]:
        """Take a message an adapter received: `(turn id, note)`. Its thread and actor are
        made under the adapter's name. A refusal is answered and nothing else stored; a
        secret blob is taken before anything is stored (a rejected one starts no turn)."""
        thread = check_thread(f"{adapter.name}:{item.thread}")
        actor = check_thread(f"{adapter.name}:{item.actor}")
        check_text(item.text)
        if item.id is not None:
            check_name("source id", item.id)
        group = None
        if item.group is not None:
            group = (check_name("group", item.group), check_seconds("group_wait", item.group_wait))
        with self.store.transaction():
            refusal = item.refusal
            if not refusal:
                try:
                    with self.store.transaction():  # a savepoint: a file too large undoes it
                        return self._accept(
                            thread, actor, item.text, item.id, item.meta, item.files, group
                        )
                except TooLarge as e:
                    refusal = str(e)
            self.records.deliver(thread, None, "notice", refusal, meta=item.meta or {})
            return None, refusal

    def receive_all(
        self,
        adapter: Adapter,
        items: Sequence[Inbound],
        cursor: str | None,
        lease: Lock | None = None,
    ) -> None:
        """Store what a poll fetched and the adapter's new cursor in one durable
        transaction (fenced by the poller's lease). An item that is bad input is logged
        and skipped, so it cannot block the ones after it."""
        with self.store.transaction(durable=True):
            if lease is not None and not lease.holds():
                raise LeaseLost(f"{adapter.name}: the polling lease was lost")
            for item in items:
                try:
                    self.receive(adapter, item)
                except BadInput as e:
                    log.warning("%s: skipped message %s: %s", adapter.name, item.id, e)
            self.store.set_cursor(adapter.name, cursor)
        self.queue.store.notify()

    def _accept(
        self,
        thread: str,
        actor: str,
        text: str,
        source_id: str | None,
        meta: dict[str, Any] | None,
        files: Sequence[File | Attachment] = (),
        group: tuple[str, float] | None = None,
        *,
        deliver: str | None = None,
    ) -> tuple[str | None, str | None]:
        """Intake inside the caller's transaction: deduplicate, intercept secret blobs,
        submit the turn with its files (or queue the message into one, see
        TurnEngine.submit); `(turn id, note for the sender)`."""
        seen = self.records.seen(thread.partition(":")[0], source_id)
        if seen:
            return seen.id, None
        note = None
        if text.lstrip().startswith(SECRET_PREFIX):
            try:
                request_id, names = self.secrets.intercept(thread, actor, text)
            except BadInput as e:
                self.records.deliver(thread, None, "notice", str(e), meta=meta or {})
                return None, str(e)
            note = f"Saved {', '.join(names)} for this conversation."
            self.records.deliver(thread, None, "notice", note, meta=meta or {})
            text = saved_note(names, request_id)
        submitted = self.engine.submit(
            thread, text, actor, source_id, meta, files, group, deliver=deliver
        )
        return submitted, note

    # secrets

    def request_secret(
        self, thread: str, *, fields: object, reason: str, actor: str | None = None
    ) -> SecretRequest:
        """Ask for credentials: a link to the secret page goes to the thread (through its
        adapter), expiring after `secret_ttl`. Fields are names or {"name", "label"}."""
        thread = check_thread(thread)
        return self.secrets.request(thread, fields=fields, reason=reason, actor=actor or thread)

    def _secret_request_tool(
        self, reason: str, fields: list[str | dict[str, str]], ctx: ToolContext
    ) -> str:
        """Ask the user for credentials (API keys, tokens, passwords) through a secure page.
        Never ask for a secret in chat. The values are saved for this conversation and you
        never see them; tools read them by name. fields: names like GITHUB_TOKEN (letters,
        digits and _), or {"name": ..., "label": ...}; at most 8."""
        request = self.secrets.request(
            ctx.thread_id, fields=fields, reason=reason, actor=ctx.actor, turn_id=ctx.turn_id
        )
        names = ", ".join(name for name, _ in request.fields)
        return (
            f"A secure link asking for {names} was sent to the user (request {request.id}, "
            f"expires {iso(request.expires_at)}). When they paste the encrypted reply you will "
            "be told which secrets were saved."
        )

    # turns

    def tool(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        idempotent: bool = False,
        timeout: float | None = None,
        approval: bool | Callable[[dict[str, Any], ToolContext], bool | str] = False,
    ) -> Any:
        """Give the model a tool: description from the docstring, schema from type hints.

        `idempotent=True` lets a call that was running when its process died run again;
        otherwise the model is told it was interrupted. `timeout` in seconds. `approval`:
        True, or `fn(args, ctx) -> bool | str` (a string is the reason shown to approvers),
        makes a call wait for an approver's decision.
        """

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            made = Tool(
                fn,
                name=name,
                description=description,
                idempotent=idempotent,
                timeout=timeout,
                approval=approval,
            )
            self.engine.tools[made.name] = made
            return fn

        return register if fn is None else register(fn)

    def mcp(
        self,
        name: str,
        *,
        command: Sequence[str] | None = None,
        url: str | None = None,
        env: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        tools: Sequence[str] | None = None,
        approval: bool | Callable[[dict[str, Any], ToolContext], bool | str] = False,
        timeout: float = 60.0,
        prefix: str | None = None,
    ) -> McpServer:
        """Give the model the tools of an MCP server: `command` (a list) starts a stdio
        server, `url` reaches a Streamable HTTP one. Its tools are named `<name>_<tool>`
        (or `<prefix><tool>`), only those in `tools` when given; `approval` as for
        `tool()`; `timeout` in seconds per call. A stdio server's environment is PATH,
        HOME, LANG and `env`; credentials in `env` and `headers` are redacted."""
        if name in self.engine.mcp_servers:
            raise BadInput(f"an MCP server named {name!r} is already added")
        server = McpServer(
            self.store,
            name,
            command=command,
            url=url,
            env=env,
            headers=headers,
            tools=tools,
            approval=approval,
            timeout=timeout,
            prefix=prefix,
        )
        self.engine.mcp_servers[name] = server
        return server

    def on(self, event: str) -> Callable[[Callable[[Event], Any]], Callable[[Event], Any]]:
        """Register a hook: `@kit.on("tool_call")`; see EVENTS for the event names."""
        if event not in EVENTS:
            raise BadInput(f"unknown event {event!r}; events are: {', '.join(EVENTS)}")

        def register(fn: Callable[[Event], Any]) -> Callable[[Event], Any]:
            self.engine.hooks.add(event, fn)
            return fn

        return register

    def command(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Answer `/name args` in chat without the model: `fn(ctx, args) -> str`."""
        if not re.fullmatch(r"[a-z0-9_]{1,32}", name or "") or name == "cancel":
            raise BadInput(
                f"a command name is 1-32 of a-z, 0-9 and '_' (not 'cancel'), not {name!r}"
            )

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.engine.commands[name] = fn
            return fn

        return register

    def run_turn(
        self,
        thread: str,
        text: str,
        *,
        actor: str | None = None,
        source_id: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        files: Sequence[File] = (),
    ) -> TurnResult:
        """Send `text` (and `files`, agentkit.File objects) to the agent in `thread` and
        (with `wait`) return when the turn ends.

        The turn is a job: the calling process runs it when it is its turn in the thread,
        or waits for a worker elsewhere, up to `timeout` seconds (then the result says
        `queued` or `running`). The same `source_id` twice starts one turn. A file over
        `max_file_bytes` raises TooLarge, and nothing is stored.
        """
        limit = None if timeout is None else check_seconds("timeout", timeout)
        thread, turn_id, note = self._start_turn(thread, text, actor, source_id, files)
        if turn_id is None:
            return TurnResult(None, thread, "rejected", None, note, {}, (), note)
        result = self._follow(turn_id, self.engine.records.turn(turn_id).job_id, wait, limit)
        return self._noted(result, note)

    def send(
        self, thread: str, text: str, *, actor: str | None = None, deliver: str = "follow_up"
    ) -> str:
        """Send a message to a thread where a turn may be running; the id of the turn it
        joins (or starts). `deliver`: "steer" joins the running turn after the tool call in
        progress (the step's calls not started yet are skipped, and the model is told so),
        "follow_up" when the turn would end (the same turn goes on), "next_turn" starts a
        turn after it. A message queued into a turn is a row until delivered; with no turn
        active in the thread, it starts one."""
        check_choice("deliver", deliver, DELIVERIES)
        _, turn_id, note = self._start_turn(thread, text, actor, None, deliver=deliver)
        if turn_id is None:
            raise BadInput(note or "the message was refused")
        return turn_id

    def _start_turn(
        self,
        thread: str,
        text: str,
        actor: str | None,
        source_id: str | None,
        files: Sequence[File] = (),
        *,
        deliver: str | None = None,
    ) -> tuple[str, str | None, str | None]:
        """Check and take a message from Python code: `(thread, turn id or None, note)`."""
        thread = check_thread(thread)
        actor = thread if actor is None else check_thread(actor)
        check_text(text)
        if source_id is not None:
            check_name("source_id", source_id)
        if not isinstance(files, (list, tuple)) or not all(isinstance(f, File) for f in files):
            raise BadInput("files is a list of agentkit.File objects")
        with self.store.transaction():
            turn_id, note = self._accept(
                thread, actor, text, source_id, None, files, deliver=deliver
            )
        self.queue.store.notify()
        return thread, turn_id, note

    @staticmethod
    def _noted(result: TurnResult, note: str | None) -> TurnResult:
        """result, with the intake's note (a saved secret) before its own."""
        return (
            replace(result, note="\n".join(filter(None, [note, result.note]))) if note else result
        )

    def stream_turn(
        self,
        thread: str,
        text: str,
        *,
        actor: str | None = None,
        source_id: str | None = None,
    ) -> Iterator[TurnEvent]:
        """`run_turn`, as the events of the turn while it runs (see TurnEvent); the last is
        "done", whose `.result` is the TurnResult.

        The message is taken at once (BadInput here); iterating runs the turn in this
        process like `run_turn`, with text deltas as the model streams them. A turn that a
        worker elsewhere runs (or ran before a takeover) is followed from its stored
        steps: one "text" per step. Events are never stored.
        """
        thread, turn_id, note = self._start_turn(thread, text, actor, source_id)
        return self._events(thread, turn_id, note)

    def _events(self, thread: str, turn_id: str | None, note: str | None) -> Iterator[TurnEvent]:
        if turn_id is None:
            rejected = TurnResult(None, thread, "rejected", None, note, {}, (), note)
            yield TurnEvent("done", "", thread, result=rejected)
            return
        feed: queue.SimpleQueue[TurnEvent | TurnResult | BaseException] = queue.SimpleQueue()
        unwatch = self.engine.live.watch(turn_id, feed.put)
        watch = TurnWatch(self.records, turn_id)
        job = self.records.turn(turn_id).job_id

        def run() -> None:
            try:
                feed.put(self._follow(turn_id, job, True, None))
            except BaseException as e:  # the stream raises it
                feed.put(e)

        try:
            self._streamers.submit(run)
            while True:
                try:
                    item = feed.get(timeout=0.2)
                except queue.Empty:
                    yield from watch.stored()  # quiet: a worker elsewhere may have stored steps
                    continue
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, TurnResult):
                    break
                event = watch.live(item)
                if event is not None:
                    yield event
            if not watch.seen_live():
                yield from watch.stored()
            step = watch.last_step
            if step is None:
                step = max(self.records.turn(turn_id).steps - 1, 0)
            yield TurnEvent("done", turn_id, thread, step, result=self._noted(item, note))
        finally:
            unwatch()

    async def astream_turn(
        self,
        thread: str,
        text: str,
        *,
        actor: str | None = None,
        source_id: str | None = None,
    ) -> AsyncIterator[TurnEvent]:
        """`stream_turn` for asyncio code: the turn runs in a thread, the loop stays free."""
        events = self.stream_turn(thread, text, actor=actor, source_id=source_id)
        loop = asyncio.get_running_loop()
        feed: asyncio.Queue[TurnEvent | BaseException | None] = asyncio.Queue()

        def pump() -> None:
            try:
                for event in events:
                    loop.call_soon_threadsafe(feed.put_nowait, event)
                loop.call_soon_threadsafe(feed.put_nowait, None)
            except BaseException as e:
                loop.call_soon_threadsafe(feed.put_nowait, e)

        threading.Thread(target=pump, name="agentkit-astream", daemon=True).start()
        while (item := await feed.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _follow(
        self, turn_id: str, job: int | None, wait: bool, timeout: float | None
    ) -> TurnResult:
        """Run (or wait for) the job that takes a turn on; the turn's result when it ends,
        waits for an approval, or `timeout` passes. A held turn returns at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._working_with() as worker:
            while wait and job is not None and not worker.halted.is_set():
                if self.queue.get(f"job_{job}").state not in ("queued", "running"):
                    break
                ran = worker.run_one(job)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                if not ran:
                    self.queue.store.wait_for_change(0.25 if left is None else min(left, 0.25))
        return self.engine.result(turn_id)

    # approvals

    def approve(
        self, approval_id: str, *, actor: str, wait: bool = True, timeout: float | None = None
    ) -> TurnResult:
        """Approve a waiting tool call: it runs once and its turn goes on; the turn's result.

        Forbidden when `actor` may not approve it, AlreadyDecided when it was denied or
        expired; approving twice changes nothing.
        """
        return self._decide(approval_id, actor, "approved", None, wait, timeout)

    def deny(
        self,
        approval_id: str,
        *,
        actor: str,
        reason: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> TurnResult:
        """Deny a waiting tool call: the model is told (with `reason`) and the turn goes on."""
        return self._decide(approval_id, actor, "denied", reason, wait, timeout)

    def _decide(
        self,
        approval_id: str,
        actor: str,
        decision: str,
        reason: str | None,
        wait: bool,
        timeout: float | None,
    ) -> TurnResult:
        limit = None if timeout is None else check_seconds("timeout", timeout)
        decided = self.gatekeeper.decide(approval_id, actor, decision, reason)
        job = self.store.job_with_key(f"resume:{decided.id}")
        return self._follow(decided.turn_id, job, wait, limit)

    def approvals(self, state: str | None = "pending", limit: int = 100) -> list[Approval]:
        """Approvals, newest first: pending ones by default, `state=None` for all."""
        return self.engine.records.approvals(state, limit)

    def _approve_command(self, ctx: ToolContext, args: str) -> str:
        """Approve a waiting tool call: /approve ID."""
        decided = self.gatekeeper.decide(
            args.split()[0] if args else "", ctx.actor, "approved", None
        )
        return f"Approved {decided.tool} ({decided.id})."

    def _deny_command(self, ctx: ToolContext, args: str) -> str:
        """Deny a waiting tool call: /deny ID [reason]."""
        approval_id, _, reason = args.partition(" ")
        decided = self.gatekeeper.decide(approval_id, ctx.actor, "denied", reason.strip() or None)
        return f"Denied {decided.tool} ({decided.id})."

    async def arun_turn(self, thread: str, text: str, **options: Any) -> TurnResult:
        """`run_turn` for asyncio code: the turn runs in a thread, the loop stays free."""
        return await asyncio.to_thread(self.run_turn, thread, text, **options)

    def turn(self, turn_id: str) -> TurnResult:
        """The current state of a turn."""
        return self.engine.result(turn_id)

    def history(self, thread: str, limit: int = 100) -> list[dict[str, Any]]:
        """A thread's newest messages (with tool calls and results), oldest first; a
        message with files lists them under "files" (each `id`, `name`, `mime`, `size`)."""
        return self.engine.records.history(check_thread(thread), check_int("limit", limit))

    def open_file(self, thread: str, attachment_id: str) -> bytes:
        """The bytes of a file of `thread` (NotFound for a file of any other thread)."""
        return self.records.open_file(check_thread(thread), attachment_id)

    def compact(self, thread: str, instructions: str | None = None) -> Compaction | None:
        """Summarise a thread's older messages now, `instructions` saying what the summary
        should focus on; the compaction, or None when everything fits the recent part (or a
        `before_compact` hook blocked it)."""
        if instructions is not None:
            check_text(instructions, "instructions")
        return self.engine.compact(check_thread(thread), "kit", instructions)

    def context_usage(self, thread: str) -> dict[str, int]:
        """`{"tokens": estimate, "window": size}`: about how many tokens the model would be
        sent for the thread now, and its context window."""
        return self.engine.usage(check_thread(thread))

    def compactions(self, thread: str) -> list[Compaction]:
        """A thread's compactions, oldest first (its messages are all still in history())."""
        return self.store.compactions(check_thread(thread))

    def threads(self, limit: int = 50) -> list[tuple[str, float]]:
        """`(thread id, last activity)` of the most recently active threads."""
        return self.store.threads(check_int("limit", limit))

    # schedules

    def schedule(
        self,
        name: str,
        *,
        task: str | None = None,
        payload: Any = None,
        thread: str | None = None,
        prompt: str | None = None,
        cron: str | None = None,
        every: float | None = None,
        at: float | datetime | None = None,
        tz: str = "UTC",
    ) -> Schedule:
        """Create or update a schedule (an upsert: safe to call at every start).

        It runs a task with a payload, or (`thread=` and `prompt=`) starts a turn.
        """
        if (task is None) == (thread is None or prompt is None):
            raise BadInput("give task= (with payload=), or thread= and prompt=")
        if thread is not None:
            actor = f"schedule:{check_name('schedule name', name)}"
            task, payload = (
                PROMPT_TASK,
                {
                    "thread": check_thread(thread),
                    "prompt": check_text(prompt, "prompt"),
                    "actor": actor,
                },
            )
        return self.scheduler.set(
            name, task=task, payload=payload, cron=cron, every=every, at=at, tz=tz
        )

    def schedules(self) -> list[Schedule]:
        return self.scheduler.all()

    def pause_schedule(self, name: str) -> Schedule:
        return self.scheduler.pause(name)

    def resume_schedule(self, name: str) -> Schedule:
        return self.scheduler.resume(name)

    def remove_schedule(self, name: str) -> None:
        self.scheduler.remove(name)

    def tick(self, at: float | None = None) -> list[str]:
        """Enqueue the scheduled runs due at `at` (default now) and expire the approvals
        past their time; workers call it every second. The ids of the jobs it added."""
        self.gatekeeper.expire(at)
        self.store.expire_secret_requests(self.store.now() if at is None else at)
        self.runtimes.sweep()
        return self.scheduler.tick(at)

    def prune(self, older_than: float) -> dict[str, int]:
        """Delete finished jobs, events, sent deliveries and used or expired secret requests
        older than `older_than` seconds, and the file contents no message refers to any
        more; the number of rows per table. Pending approvals, unfinished turns, messages
        (with their files) and live requests are kept."""
        before = self.store.now() - check_seconds("older_than", older_than)
        with self.store.transaction():
            deleted = self.store.prune(before)
            deleted["attachments"], blobs = self.store.prune_files(before)
        deleted["blobs"] = len(blobs)
        if isinstance(self.attachments, StoredFiles):
            self.attachments.forget(blobs, time.time() - older_than)
        return deleted

    # serving

    def serve(
        self,
        http: str | None = "127.0.0.1:8765",
        *,
        workers: int = 2,
        stop: threading.Event | None = None,
        ready: Callable[[str], object] | None = None,
        new_token: bool = False,
    ) -> None:
        """Run the bot: the HTTP server (web chat, webhooks, secret page, /healthz), the
        adapters, `workers` worker threads and the scheduler, until `stop` is set or
        SIGINT/SIGTERM arrive. Running jobs finish first (or their leases lapse).
        `ready(url)` is called once everything runs. Several processes may serve one
        database. `new_token` replaces the web chat's kept token (open tabs sign in again)."""
        check_int("workers", workers, low=1)
        server = None
        if http:
            host, port = parse_address(http)
            try:
                server = WebServer(self, host, port)
            except OSError as e:
                raise BadInput(f"cannot listen on {http}: {e.strerror or e}") from None
            if not self._public_url_given:  # secret links lead to this server, on loopback
                self.secrets.public_url = f"http://127.0.0.1:{server.server_address[1]}"
            threading.Thread(target=server.serve_forever, name="agentkit-http", daemon=True).start()
            self.adapters["web"].choose_token(self.store.path, server.url, new=new_token)
        # close() halts the worker and waits for this block, adapters and server stopped
        with (
            stopping_on_signals(stop) as stop,
            self._working_with(workers, tick=self.tick) as worker,
        ):
            started = []
            try:
                for adapter in self.adapters.values():
                    adapter.start(self)
                    started.append(adapter)
                url = server.url if server else "no HTTP"
                names = ", ".join(self.adapters)
                log.info(
                    "serving %s on %s: adapters %s, %d workers",
                    self.store.path,
                    url,
                    names,
                    workers,
                )
                if ready:
                    ready(url)
                worker.run(stop=stop)
            finally:
                self.stopping.set()
                for adapter in started:
                    adapter.stop()
                if server:
                    server.shutdown()
                    server.server_close()
                self.runtimes.close()
                self.stopping.clear()
                log.info("stopped")

    def health(self) -> dict[str, Any]:
        """What `/healthz` answers, in constant time: the database, the schema, the adapters
        (counting jobs reads the whole table: `doctor` does it)."""
        return {
            "ok": True,
            "database": self.store.path,
            "schema": self.store.version,
            "adapters": sorted(self.adapters),
        }

    # health

    def doctor(self) -> dict[str, Any]:
        """Database path, schema version, integrity check, row counts per table and jobs
        by state, and the seconds that counting took (it reads every row)."""
        integrity = self.store.integrity()
        began = time.monotonic()
        rows = self.store.row_counts()
        jobs = self.store.job_counts()
        return {
            "database": self.store.path,
            "schema": self.store.version,
            "latest schema": self.store.latest,
            "integrity": integrity,
            "rows": rows,
            "jobs": jobs,
            "counting seconds": time.monotonic() - began,
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
    except Exception as e:  # the app's module may fail in any way: say so in one line
        raise BadInput(f"cannot load --app {spec}: {describe_error(e)}") from None
    if not isinstance(app, AgentKit):
        raise BadInput(f"--app {spec} is a {type(app).__name__}, not an AgentKit")
    return app


def say(args: argparse.Namespace, line: str) -> None:
    """A note to the user on stderr, unless `-q`."""
    if not getattr(args, "quiet", 0):
        print(f"agentkit: {line}", file=sys.stderr, flush=True)


def served_model(args: argparse.Namespace) -> str | None:
    """The model a bare kit runs: `-m`; else, for the commands that run turns when only
    OPENAI_BASE_URL is set, the first model that server lists at /models (said on
    stderr); else None (the usual default)."""
    named = getattr(args, "model", None)
    base = os.environ.get("OPENAI_BASE_URL")
    runs_turns = args.command in ("run", "chat", "serve", "work")
    if named or not base or not runs_turns or os.environ.get("AGENTKIT_MODEL"):
        return named
    key = os.environ.get("OPENAI_API_KEY")
    url = f"{base.rstrip('/')}/models"
    try:
        answer = httpx.get(
            url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10
        )
        answer.raise_for_status()
        ids = [str(m["id"]) for m in answer.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        reason = redactions.redact(describe_error(e))
        fallback = model_from_spec(None).name
        say(args, f"OPENAI_BASE_URL is set but {url} lists no model ({reason}); using {fallback}")
        return None
    if not ids:
        say(args, f"{url} lists no model; using {model_from_spec(None).name}")
        return None
    say(args, f"using openai:{ids[0]}, the first model {url} lists (-m or AGENTKIT_MODEL picks)")
    return f"openai:{ids[0]}"


def _database_exists(db: str) -> bool:
    """Whether `db` names a database that may hold rows: a URL or `:memory:` (asked when
    opened), or a file that is there."""
    return "://" in db or db == ":memory:" or os.path.exists(db)


def open_kit(args: argparse.Namespace, *, must_exist: bool = False) -> AgentKit:
    """The kit the command works on: `--app`, or a bare one over `--db`, with the `--ext`
    extensions loaded; `-m` and `-s` set the model and instructions of the turns this
    process runs."""
    extensions = getattr(args, "ext", None) or []
    if args.app:
        kit = load_app(args.app)
        for spec in extensions:
            kit.load_extension(spec)
        if getattr(args, "model", None):
            kit.engine.model = kit.models.make(args.model)
    elif must_exist and not _database_exists(args.db):
        raise StoreError(f"no database at {args.db}")
    else:
        kit = AgentKit(args.db, model=served_model(args), extensions=extensions)
    if getattr(args, "system", None):
        kit.engine.instructions = args.system
    return kit


def cmd_doctor(args: argparse.Namespace) -> int:
    report = open_kit(args, must_exist=True).doctor()
    rows = ", ".join(f"{t} {n}" for t, n in report["rows"].items())
    jobs = ", ".join(f"{s} {n}" for s, n in sorted(report["jobs"].items())) or "none"
    print(f"database   {report['database']}")
    print(f"schema     {report['schema']} (latest {report['latest schema']})")
    print(f"integrity  {report['integrity']}")
    print(f"rows       {rows}")
    print(f"jobs       {jobs}")
    print(f"counted in {report['counting seconds'] * 1000:.0f} ms")
    return 0 if report["integrity"] == "ok" else 1


def print_job(job: Job) -> None:
    for name, value in dataclasses.asdict(job).items():
        if name in ("run_at", "created_at", "finished_at") and value is not None:
            value = iso(value)
        print(f"{name:12} {value if isinstance(value, str) else json.dumps(value)}")


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


def cli_user() -> str:
    """The CLI's thread and actor id: `cli:<os user>`."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "user"
    return f"cli:{name}"


def exit_status(result: TurnResult) -> int:
    """What `run` exits with: 0 for done, 3 while it waits for an approval (or is held
    until the thread's approval is decided), 1 otherwise."""
    return {"done": 0, "waiting_approval": 3, "queued": 3}.get(result.status, 1)


def shorten(text: str, width: int = 100) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


STYLES = {  # ANSI on and off sequences of what MarkdownPen renders
    "bold": ("\x1b[1m", "\x1b[22m"),
    "code": ("\x1b[36m", "\x1b[39m"),
    "heading": ("\x1b[1;4m", "\x1b[22;24m"),
    "dim": ("\x1b[2m", "\x1b[22m"),
}


class MarkdownPen:
    """Light markdown for a terminal, fed text as it arrives: **bold**, `code`, # headings
    and fenced code blocks get ANSI styles and lose their markers. A marker that may be cut
    between two pieces (a lone `*`, a line that starts with `#` or a backtick) is held until
    the next piece decides it."""

    def __init__(self) -> None:
        self.held = ""
        self.line_start = True
        self.open: set[str] = set()  # the styles now on: bold, code, heading, fence

    def _toggle(self, style: str, out: list[str]) -> None:
        on, off = STYLES["code" if style == "fence" else style]
        out.append(off if style in self.open else on)
        self.open ^= {style}

    def feed(self, text: str) -> str:
        """The terminal text for the next piece of markdown."""
        text, self.held, out, i = self.held + text, "", [], 0
        while i < len(text):
            rest = text[i:]
            if self.line_start:
                line = rest.partition("\n")[0]
                marker = rest.startswith("```") or "```".startswith(rest)
                if "\n" not in rest and (marker or re.fullmatch(r"#{1,6}", rest)):
                    self.held = rest  # a fence or a heading marker may be coming
                    break
                self.line_start = False
                if line.startswith("```"):  # a fence line: its style starts or ends, unseen
                    self._toggle("fence", out)
                    i += len(line) + 1
                    self.line_start = True
                    continue
                heading = re.match(r"#{1,6} ", line)
                if heading and "fence" not in self.open:
                    self._toggle("heading", out)
                    i += heading.end()
                    continue
            char = text[i]
            if char == "\n":
                if "heading" in self.open:
                    self._toggle("heading", out)
                out.append(char)
                self.line_start = True
            elif "fence" in self.open:
                out.append(char)
            elif char == "`":
                self._toggle("code", out)
            elif "code" in self.open:
                out.append(char)
            elif rest.startswith("**"):
                self._toggle("bold", out)
                i += 1
            elif rest == "*":
                self.held = rest  # the first half of ** or a lone star: the next piece says
            else:
                out.append(char)
            i += 1
        return "".join(out)

    def end(self) -> str:
        """What is still held, and every style turned off."""
        out, self.held, self.line_start = [self.held], "", True
        out += [STYLES["code" if s == "fence" else s][1] for s in sorted(self.open)]
        self.open.clear()
        return "".join(out)


class TurnPrinter:
    """Prints a turn's events: the reply's text to stdout as it arrives (styled on a
    terminal, plain when piped), and on stderr tool calls (`→ tool(args)`), their results
    (`← result`), progress, approvals with the commands that decide them, notes and errors.
    With `as_json`, each event is one JSON line on stdout instead."""

    def __init__(self, args: argparse.Namespace, *, as_json: bool = False) -> None:
        self.args = args
        self.as_json = as_json
        self.pen = MarkdownPen() if sys.stdout.isatty() and not as_json else None
        self.dim = sys.stderr.isatty()  # tool lines are dimmed on a terminal
        self.shown: set[str] = set()  # approval ids already printed
        self.streamed = False  # text of this turn was printed
        self.abandoned = False  # a turn was cancelled while its model may still answer
        self.mid_line = False  # the last text printed did not end a line

    def show(self, event: TurnEvent) -> TurnResult | None:
        """Print one event; the turn's result when it is the last."""
        if self.as_json:  # every field, the result and approval as objects
            print(json.dumps(dataclasses.asdict(event), ensure_ascii=False), flush=True)
        elif event.kind == "text":
            self.text(event.text)
        elif event.kind == "tool_start":
            args = shorten(json.dumps(event.args, ensure_ascii=False))
            self.note(f"→ {event.tool}({args})", dim=True)
        elif event.kind == "tool_end":
            mark = "← error: " if event.is_error else "← "
            self.note(mark + shorten(str(event.result)), dim=True)
        elif event.kind == "progress":
            self.note(f"  {shorten(event.text)}", dim=True)
        elif event.kind == "approval":
            self.approval(event.approval)
        if event.kind != "done":
            return None
        if not self.as_json:
            self.result(event.result)
        self.streamed = False
        return event.result

    def text(self, text: str) -> None:
        self.streamed = True
        out = self.pen.feed(text) if self.pen else text
        if out:
            sys.stdout.write(out)
            sys.stdout.flush()
            self.mid_line = not out.endswith("\n")

    def end_text(self) -> None:
        """Close the styles and the line of the text printed so far."""
        if self.pen:
            self.mid_line = self.mid_line or bool(self.pen.held)  # held text has no newline
            sys.stdout.write(self.pen.end())
        if self.mid_line:
            sys.stdout.write("\n")
            self.mid_line = False
        sys.stdout.flush()

    def note(self, line: str, *, dim: bool = False) -> None:
        """A line on stderr, after the text so far."""
        self.end_text()
        if dim and self.dim:
            line = STYLES["dim"][0] + line + STYLES["dim"][1]
        print(line, file=sys.stderr, flush=True)

    def decide_command(self, verb: str, approval_id: str) -> str:
        """The exact command that decides an approval on this database."""
        where = ["--app", self.args.app] if self.args.app else []
        if not where and self.args.db != "agentkit.db":
            where = ["--db", self.args.db]
        return shlex.join(["agentkit", verb, approval_id, *where])

    def approval(self, approval: Approval) -> None:
        if approval.id in self.shown or approval.state != "pending":
            return
        self.shown.add(approval.id)
        why = f" ({approval.reason})" if approval.reason else ""
        args = json.dumps(approval.args, ensure_ascii=False)
        self.note(f"approval {approval.id}: {approval.tool}({args}) waits for a decision{why}")
        approve, deny = (self.decide_command(v, approval.id) for v in ("approve", "deny"))
        self.note(f"  decide with: {approve}  or  {deny} --reason TEXT")

    def result(self, result: TurnResult) -> None:
        """The end of a turn: the reply when none was streamed, approvals, notes, errors."""
        if not self.streamed and result.status == "done" and result.reply:
            self.text(result.reply)
        self.end_text()
        for approval in result.approvals:
            self.approval(approval)
        if result.note:
            self.note(result.note)
        if result.status in ("failed", "cancelled", "running"):
            error = f": {result.error}" if result.error else ""
            self.note(f"agentkit: turn {result.turn_id} {result.status}{error}")

    def interrupted(self) -> None:
        self.abandoned = True
        self.note("(cancelled)")

    def leave(self, status: int) -> int:
        """`status`; after a turn was cancelled, the process exits at once with it, not
        waiting for the thread that may still wait for that turn's model (Python joins
        it at exit; the turn's rows are settled, so nothing is lost)."""
        if self.abandoned:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status


def decision_events(
    kit: AgentKit, printer: TurnPrinter, approval: Approval, decide: Callable[[], TurnResult]
) -> Iterator[TurnEvent]:
    """The end of the turn a decision takes on; while `decide` runs the turn here, its live
    events are printed as they come (a worker elsewhere shows only the end)."""
    unwatch = kit.engine.live.watch(
        approval.turn_id, lambda event: event.kind != "done" and printer.show(event)
    )
    try:
        result = decide()
    finally:
        unwatch()
    yield TurnEvent("done", approval.turn_id, approval.thread_id, result=result)


def follow_turn(
    kit: AgentKit,
    printer: TurnPrinter,
    events: Iterator[TurnEvent],
    thread: str,
    turn_id: str | None = None,
) -> TurnResult | None:
    """Print a turn's events; its result, or None when Ctrl-C cancelled it. The turn ends
    at once and frees the thread (its worker's later writes are refused), so the thread's
    next message runs right away and the cancelled turn never runs after it."""
    try:
        for event in events:
            turn_id = event.turn_id or turn_id
            result = printer.show(event)
            if result is not None:
                return result
        raise AgentKitError("the turn's events ended before the turn did")
    except KeyboardInterrupt:
        if turn_id is None:  # interrupted before its first event: the thread's newest turn
            active = kit.engine.records.active_turns(thread, "")
            turn_id = active[-1] if active else None
        if turn_id and kit.turn(turn_id).status in ("queued", "running"):
            with contextlib.suppress(BadInput):  # it ended meanwhile
                kit.cancel(turn_id, at_once=True)
        printer.interrupted()
        return None


def read_message(args: argparse.Namespace) -> str:
    """The message of `run`: its argument, or standard input for `-` or none."""
    if args.text not in (None, "-"):
        return args.text
    if args.text is None and sys.stdin.isatty():
        raise BadInput("run needs a message: agentkit run TEXT, or text on standard input")
    text = sys.stdin.read().strip()
    if not text:
        raise BadInput("the message on standard input is empty")
    return text


def cmd_run(args: argparse.Namespace) -> int:
    text = read_message(args)
    kit = open_kit(args)
    printer = TurnPrinter(args, as_json=args.json)
    events = kit.stream_turn(args.thread, text, actor=args.actor)
    result = follow_turn(kit, printer, events, args.thread)
    return printer.leave(130 if result is None else exit_status(result))


def history_file() -> Path:
    """Where `chat` keeps its line history: the user's data folder, never a project's."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(data) / "agentkit" / "chat_history"


@contextlib.contextmanager
def line_editing() -> Iterator[None]:
    """readline's line editing and the history file, while the block runs."""
    try:
        import readline  # line editing for input(); absent on some platforms
    except ImportError:
        yield
        return
    path = history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            readline.write_history_file(path)


def ask_decisions(kit: AgentKit, args: argparse.Namespace, printer: TurnPrinter) -> None:
    """Ask `[a]pprove / [d]eny` for each approval the thread waits for while the user may
    decide, and print the turn going on after each decision."""
    while kit.gatekeeper.may_decide(args.actor):
        waiting = kit.engine.records.waiting_in(args.thread)
        if not waiting:
            return
        approval = waiting[0]
        printer.approval(approval)  # unless this turn printed it already
        try:
            answer = input(f"{approval.tool}: [a]pprove / [d]eny? ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer not in ("a", "approve", "d", "deny"):
            printer.note(f"left pending: {printer.decide_command('approve', approval.id)}")
            return
        verb = "approve" if answer.startswith("a") else "deny"
        decide = functools.partial(getattr(kit, verb), approval.id, actor=args.actor)
        events = decision_events(kit, printer, approval, decide)
        try:
            if follow_turn(kit, printer, events, args.thread, approval.turn_id) is None:
                return  # Ctrl-C cancelled it
        except AgentKitError as e:  # not allowed, or decided meanwhile: say so
            printer.note(f"agentkit: {e}")
            return


def cmd_chat(args: argparse.Namespace) -> int:
    kit = open_kit(args)
    printer = TurnPrinter(args, as_json=args.json)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"agentkit chat: model {kit.engine.model.name}, thread {args.thread}")
        print("Ctrl-C cancels a reply, Ctrl-D exits.")
    with line_editing() if interactive else contextlib.nullcontext():
        if interactive:  # what an earlier conversation left waiting comes first
            ask_decisions(kit, args, printer)
        while True:
            try:
                text = input("> " if interactive else "")
            except EOFError:
                if interactive:
                    print()
                break
            except KeyboardInterrupt:  # a fresh line, as in a shell
                print()
                continue
            if not text.strip():
                continue
            try:
                events = kit.stream_turn(args.thread, text, actor=args.actor)
                if follow_turn(kit, printer, events, args.thread) and interactive:
                    ask_decisions(kit, args, printer)
            except AgentKitError as e:  # say it and go on with the conversation
                printer.note(f"agentkit: {e}")
    return printer.leave(0)


def cmd_threads(args: argparse.Namespace) -> int:
    for thread, updated in open_kit(args, must_exist=True).threads(args.limit):
        print(f"{iso(updated)}  {thread}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    for message in open_kit(args, must_exist=True).history(args.thread, args.limit):
        if message["role"] == "tool":
            mark = " (error)" if message["is_error"] else ""
            print(f"  {message['name']} ->{mark} {message['content']}")
            continue
        if message.get("content"):
            origin = f" ({message['origin']})" if message.get("origin") else ""
            print(f"{message['role']}{origin}: {message['content']}")
        for call in message.get("tool_calls", []):
            print(f"  {call['name']}({json.dumps(call['args'])})")
        for file in message.get("files", []):
            print(f"  [file {file['id']}  {file['name']}  {file['mime']}  {file['size']} bytes]")
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    for a in open_kit(args, must_exist=True).approvals(None if args.all else "pending"):
        why = f"  ({a.reason})" if a.reason else ""
        who = f" by {a.decided_by}" if a.decided_by else ""
        print(
            f"{a.id}  {a.state}{who}  {a.tool}({json.dumps(a.args)}){why}  asked by {a.requester}"
        )
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    """Each MCP server of the app with its state (it is connected to and pinged) and its
    tools; servers only the database knows show their cached tools."""
    kit = open_kit(args)
    servers = kit.engine.mcp_servers
    for name, server in servers.items():
        print(f"{name}: {server.check()}")
        for tool in server.tools().values():
            print(f"  {tool.name}: {first_text_line(tool.description)}")
    for cached in kit.store.mcp_tool_lists():
        if cached.server not in servers:
            print(f"{cached.server}: not in this app (tools as listed {iso(cached.listed_at)})")
            for spec in cached.tools:
                print(f"  {spec['name']}: {first_text_line(spec.get('description') or '')}")
    if not servers and not kit.store.mcp_tool_lists():
        print("no MCP servers (add them with kit.mcp(...) and give --app)")
    kit.close()
    return 0


def first_text_line(text: str) -> str:
    return text.strip().partition("\n")[0]


def cmd_serve(args: argparse.Namespace) -> int:
    parse_address(args.http)  # a bad address is refused before anything is created
    open_kit(args).serve(args.http, workers=args.workers, new_token=args.new_token)
    return 0


def parse_age(text: str) -> float:
    """An age like `30d`, `12h`, `15m`, `90s` or `2w` in seconds; BadInput otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not match:
        raise BadInput(f"an age is a number and a unit (s, m, h, d or w), like 30d, not {text!r}")
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return float(match[1]) * units[match[2]]


def cmd_prune(args: argparse.Namespace) -> int:
    deleted = open_kit(args, must_exist=True).prune(parse_age(args.older_than))
    print(", ".join(f"{table} {count}" for table, count in deleted.items()) + " rows deleted")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    if not _database_exists(args.source):
        raise StoreError(f"no database at {args.source}")
    source = open_store(args.source)
    try:
        target = open_store(args.target)
        try:
            copied = copy_store(source, target)
        finally:
            target.close()
    finally:
        source.close()
    rows = ", ".join(f"{table} {count}" for table, count in copied.items())
    print(f"copied {args.source} to {args.target}: {rows}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    kit = open_kit(args, must_exist=True)
    decide = functools.partial(
        kit.approve if args.command == "approve" else kit.deny, args.id, actor=args.actor
    )
    if args.command == "deny":
        decide = functools.partial(decide, reason=args.reason)
    done = {"approve": "approved", "deny": "denied"}[args.command]
    if not args.app:  # a bare kit has neither the app's tools nor its model
        result = decide(wait=False)
        print(
            f"{done} {args.id}; turn {result.turn_id} goes on in a process that runs this "
            f"database with its app (agentkit serve or agentkit work --app MODULE:ATTR); "
            f"without --app, nothing here runs it"
        )
        return 0
    printer = TurnPrinter(args)
    print(f"{done} {args.id}", flush=True)
    approval = kit.gatekeeper.get(args.id)
    events = decision_events(kit, printer, approval, decide)
    result = follow_turn(kit, printer, events, approval.thread_id, approval.turn_id)
    return printer.leave(130 if result is None else exit_status(result))


def cmd_work(args: argparse.Namespace) -> int:
    kit = open_kit(args)
    log.info("working on %s with %d workers", kit.store.path, args.workers)
    with stopping_on_signals() as stop:
        ran = kit.work(concurrency=args.workers, until_idle=args.until_idle, stop=stop)
    log.info("stopped after %d jobs", ran)
    return 0


def log_level(args: argparse.Namespace) -> int:
    """The log level: `-v` (INFO; `-vv` DEBUG) or `-q` (errors only; `-qq` none), else
    AGENTKIT_LOG_LEVEL, else INFO for `serve` and `work`, none in `chat` (its screen is
    the conversation), warnings for the other commands."""
    steps = getattr(args, "verbose", 0) - getattr(args, "quiet", 0)
    if steps:
        return max(logging.DEBUG, min(logging.CRITICAL + 10, logging.WARNING - 10 * steps))
    named = os.environ.get("AGENTKIT_LOG_LEVEL", "").strip().upper()
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if named:
        if named not in levels:
            raise BadInput(f"AGENTKIT_LOG_LEVEL is one of {', '.join(levels)}, not {named!r}")
        return logging.getLevelName(named)
    defaults = {"serve": logging.INFO, "work": logging.INFO, "chat": logging.CRITICAL + 10}
    return defaults.get(args.command, logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        help="database file or postgresql:// URL (AGENTKIT_DB, else agentkit.db)",
    )
    common.add_argument("--app", default=argparse.SUPPRESS, help="module:attribute of an AgentKit")
    common.add_argument(
        "--ext",
        action="append",
        default=argparse.SUPPRESS,
        metavar="EXTENSION",
        help="load an extension: package.module or path/to/ext.py (repeatable)",
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log more (-vv: debug)"
    )
    common.add_argument(
        "-q", "--quiet", action="count", default=argparse.SUPPRESS, help="log only errors"
    )
    parser = argparse.ArgumentParser(
        prog="agentkit",
        description="Chat agents whose whole state lives in SQLite.",
        epilog="run, chat and approve exit 0 when the turn is done, 3 when it waits for an "
        "approval, 1 when it failed or was cancelled (130 after Ctrl-C); usage errors exit "
        "2; not found and other failures exit 1. AGENTKIT_LOG_LEVEL sets the log level.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"agentkit {__version__}")
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
    me = cli_user()
    run = commands.add_parser(
        "run",
        parents=[common],
        help="send one message, print the reply as it comes",
        epilog="exit status: 0 done, 3 waiting for an approval, 1 failed or cancelled",
    )
    run.add_argument("text", nargs="?", help="the message (none or -: standard input)")
    chat = commands.add_parser("chat", parents=[common], help="talk to the agent in the terminal")
    for command, fn in ((run, cmd_run), (chat, cmd_chat)):
        command.add_argument("--thread", default=me, help=f"thread id ({me})")
        command.add_argument("--as", dest="actor", default=me, help=f"actor id ({me})")
        command.add_argument(
            "-m",
            "--model",
            help="echo, openai:<model>, anthropic:<model> or <prefix>:<model> of an extension",
        )
        command.add_argument("-s", "--system", help="instructions for the turns run here")
        command.add_argument("--json", action="store_true", help="the events as JSON lines")
        command.set_defaults(run=fn)
    threads = commands.add_parser("threads", parents=[common], help="list recent threads")
    threads.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    threads.set_defaults(run=cmd_threads)
    show = commands.add_parser("show", parents=[common], help="print a thread's messages")
    show.add_argument("thread", help="thread id, like cli:me")
    show.add_argument("--limit", type=int, default=100, help="newest messages (100)")
    show.set_defaults(run=cmd_show)
    approvals = commands.add_parser(
        "approvals", parents=[common], help="list pending approvals (--all: every one)"
    )
    approvals.add_argument("--all", action="store_true", help="decided ones too")
    approvals.set_defaults(run=cmd_approvals)
    for name in ("approve", "deny"):
        decide = commands.add_parser(name, parents=[common], help=f"{name} a waiting tool call")
        decide.add_argument("id", help="the approval id (apr_…)")
        decide.add_argument("--as", dest="actor", default=me, help=f"who decides ({me})")
        if name == "deny":
            decide.add_argument("--reason", help="told to the model")
        decide.set_defaults(run=cmd_decide)
    serve = commands.add_parser(
        "serve", parents=[common], help="run the bot: web chat, adapters, workers, scheduler"
    )
    serve.add_argument("--http", default="127.0.0.1:8765", help="address (127.0.0.1:8765)")
    serve.add_argument("--workers", type=int, default=2, help="worker threads (2)")
    serve.add_argument(
        "--new-token",
        action="store_true",
        help="replace the web chat's token kept in <database>.token (open tabs sign in again)",
    )
    serve.set_defaults(run=cmd_serve)
    work = commands.add_parser(
        "work", parents=[common], help="run the workers and the scheduler, without serving"
    )
    work.add_argument("--workers", type=int, default=2, help="worker threads (2)")
    work.add_argument("--until-idle", action="store_true", help="stop when no job is ready")
    work.set_defaults(run=cmd_work)
    prune = commands.add_parser(
        "prune", parents=[common], help="delete old finished jobs, events and deliveries"
    )
    prune.add_argument("--older-than", required=True, help="an age like 30d, 12h or 90m")
    prune.set_defaults(run=cmd_prune)
    mcp = commands.add_parser(
        "mcp", parents=[common], help="list the MCP servers, their state and their tools"
    )
    mcp.add_argument("action", choices=["list"], help="list")
    mcp.set_defaults(run=cmd_mcp)
    copy = commands.add_parser(
        "copy",
        help="copy a whole database into an empty one (SQLite and PostgreSQL, either way)",
        epilog="run it while nothing uses SOURCE; it checks the row counts and refuses a "
        "TARGET that holds rows",
    )
    copy.add_argument("source", help="a database file or postgresql:// URL")
    copy.add_argument("target", help="a new database file or an empty postgresql:// database")
    copy.set_defaults(run=cmd_copy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `agentkit COMMAND`, or `python agentkit.py COMMAND`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.app = getattr(args, "app", None)
    if args.app and hasattr(args, "db"):
        parser.error("give --db or --app, not both (the app names its own database)")
    args.db = getattr(args, "db", None) or os.environ.get("AGENTKIT_DB") or "agentkit.db"
    try:
        level = log_level(args)
    except BadInput as e:
        parser.error(str(e))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))  # a line per request
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactions)  # tokens and secrets, whoever logs them
    try:
        return args.run(args)
    except NotFound as e:
        print(f"agentkit: {e}", file=sys.stderr)
        return 1
    except BadInput as e:
        print(f"agentkit: {e}", file=sys.stderr)
        return 2
    except AgentKitError as e:
        print(f"agentkit: {e}", file=sys.stderr)
        return 1


# ────────────────────────── pages: the secret form and the web chat ──────────────────────────
# Self-contained pages (inline script and style under a hash-pinned CSP, no requests
# beyond their own origin), kept last as bottle keeps its templates; the sections above
# read them at call time.

SECRET_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<title>agentkit: share a secret</title>
<link rel="icon" href="data:,">
<style>
:root { color-scheme: light dark; --bg: #fafafa; --fg: #1d1d1f; --muted: #666; --card: #fff;
  --line: #d0d0d5; --accent: #2457c5; --err: #b3261e; --ok: #1e7b34; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #151517; --fg: #e8e8ea; --muted: #a0a0a8; --card: #1f1f23;
    --line: #3a3a42; --accent: #7ea6ff; --err: #ff8a80; --ok: #7bd88f; }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 34rem; margin: 2rem auto; padding: 1.5rem; background: var(--card);
  border: 1px solid var(--line); border-radius: 12px; }
h1 { font-size: 1.3rem; margin: 0 0 1rem; }
#message:empty { display: none; }
#message { padding: .6rem .8rem; border-radius: 8px; border: 1px solid var(--line); }
#message.err { color: var(--err); border-color: var(--err); }
#message.ok { color: var(--ok); border-color: var(--ok); }
#reason { white-space: pre-wrap; overflow-wrap: anywhere; }
.muted { color: var(--muted); font-size: .9rem; }
#fields label { display: block; margin: .8rem 0; font-weight: 600; overflow-wrap: anywhere; }
input[name], textarea { display: block; width: 100%; margin-top: .3rem; padding: .55rem .6rem;
  font: inherit; font-weight: 400; color: inherit; background: var(--bg);
  border: 1px solid var(--line); border-radius: 8px; }
textarea { font: .85rem/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  resize: vertical; word-break: break-all; }
.row { display: flex; flex-wrap: wrap; gap: .8rem; align-items: center; margin: 1rem 0; }
button { font: inherit; padding: .5rem 1.2rem; border: 0; border-radius: 8px; cursor: pointer;
  background: var(--accent); color: var(--card); font-weight: 600; }
@media (max-width: 36rem) { main { margin: 0; border: 0; border-radius: 0; } }
</style>
</head>
<body>
<main>
<h1>Share a secret with your agent</h1>
<p id="message" role="status"
   aria-live="polite">This page needs JavaScript to encrypt your secret.</p>
<section id="request" hidden>
  <p id="reason"></p>
  <p id="expires" class="muted"></p>
  <div id="fields"></div>
  <div class="row">
    <button id="encrypt" type="button">Encrypt</button>
    <label class="muted"><input id="show" type="checkbox"> Show values</label>
  </div>
  <p class="muted">Values are encrypted in this browser; nothing is sent anywhere by this
    page.</p>
  <div id="result" hidden>
    <p>Paste this line into the chat. Only the agentkit that asked for it can read it;
      it works once.</p>
    <textarea id="blob" readonly rows="5" spellcheck="false"></textarea>
    <div class="row">
      <button id="copy" type="button">Copy</button>
      <span id="copied" class="muted"></span>
    </div>
  </div>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const utf8 = (s) => new TextEncoder().encode(s);
const DAMAGED = "This link is incomplete or damaged. Ask the agent for a new one.";
const INSECURE = "This page needs a secure context: open it over https, " +
  "on localhost / 127.0.0.1, or as a file on disk.";
const ECDH_P256 = { name: "ECDH", namedCurve: "P-256" };
const NAME_RE = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;

function say(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.className = kind || "";
}
function stop(text) { $("request").remove(); say(text, "err"); }  // no form at all
function localTime(exp) { return new Date(exp * 1000).toLocaleString(); }
function expiredText(exp) {
  return "This request expired at " + localTime(exp) + ". Ask the agent for a new link.";
}

// base64url without padding <-> bytes (strict alphabet)
function unb64(s) {
  if (!/^[A-Za-z0-9_-]*$/.test(s) || s.length % 4 === 1) throw new Error("bad base64url");
  const bin = atob(s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4));
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}
function b64(buf) {
  let bin = "";
  for (const b of new Uint8Array(buf)) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// Parse and validate the fragment; throws on anything wrong.
async function parseRequest() {
  const p = new URLSearchParams(location.hash.slice(1));
  const one = (k) => {
    const v = p.getAll(k);
    if (v.length !== 1) throw new Error("missing " + k);
    return v[0];
  };
  if (one("v") !== "1") throw new Error("version");
  const id = one("id");
  if (!/^sec_[0-9a-f]{16}$/.test(id)) throw new Error("id");
  const raw = unb64(one("key"));
  if (raw.length !== 65 || raw[0] !== 4) throw new Error("key length");
  const key = await crypto.subtle.importKey("raw", raw, ECDH_P256, false, []);
  const fields = JSON.parse(one("fields"));
  if (!Array.isArray(fields) || fields.length < 1 || fields.length > 8) {
    throw new Error("fields");
  }
  const seen = new Set();
  for (const f of fields) {
    if (!f || typeof f !== "object" || Array.isArray(f)) throw new Error("field");
    if (typeof f.name !== "string" || !NAME_RE.test(f.name) || seen.has(f.name)) {
      throw new Error("name");
    }
    if (f.label !== undefined && (typeof f.label !== "string" || f.label.length > 200)) {
      throw new Error("label");
    }
    seen.add(f.name);
  }
  const reason = p.getAll("reason").length ? one("reason") : "";
  if (reason.length > 2000) throw new Error("reason");
  const expText = one("exp");
  if (!/^-?[0-9]{1,15}$/.test(expText)) throw new Error("exp");
  return { id, key, fields, reason, exp: Number(expText) };
}

// ECDH(ephemeral, request key) -> HKDF-SHA256 -> AES-256-GCM; returns the one-line blob.
async function encrypt(req, values) {
  const eph = await crypto.subtle.generateKey(ECDH_P256, true, ["deriveBits"]);
  const shared = await crypto.subtle.deriveBits(
    { name: "ECDH", public: req.key }, eph.privateKey, 256);
  const hkdf = await crypto.subtle.importKey("raw", shared, "HKDF", false, ["deriveKey"]);
  const aes = await crypto.subtle.deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: utf8(req.id), info: utf8("agentkit-secret v1") },
    hkdf, { name: "AES-GCM", length: 256 }, false, ["encrypt"]);
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const names = req.fields.map((f) => f.name);
  const aad = utf8("agentkit-secret:v1:" + req.id + ":" + names.join(","));
  const plain = utf8(JSON.stringify(Object.fromEntries(names.map((n, i) => [n, values[i]]))));
  const ct = await crypto.subtle.encrypt(
    { name: "AES-GCM", iv, additionalData: aad }, aes, plain);
  const pub = await crypto.subtle.exportKey("raw", eph.publicKey);
  return ["agentkit-secret:v1", req.id, b64(pub), b64(iv), b64(ct)].join(".");
}

function showForm(req) {
  $("reason").textContent = req.reason;
  $("reason").hidden = !req.reason;
  $("expires").textContent = "This link expires at " + localTime(req.exp) + ".";
  const inputs = req.fields.map((f) => {
    const label = document.createElement("label");
    label.textContent = f.label || f.name;
    const input = document.createElement("input");
    Object.assign(input, {
      type: "password", name: f.name, autocomplete: "off", spellcheck: false,
    });
    input.setAttribute("autocapitalize", "off");
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") $("encrypt").click(); });
    label.appendChild(input);
    $("fields").appendChild(label);
    return input;
  });
  $("show").addEventListener("change", () => {
    for (const i of inputs) i.type = $("show").checked ? "text" : "password";
  });
  $("encrypt").addEventListener("click", async () => {
    if (req.exp <= Date.now() / 1000) return stop(expiredText(req.exp));
    const empty = inputs.filter((i) => i.value === "");
    if (empty.length) {
      say("Please fill in every field before encrypting.", "err");
      empty[0].focus();
      return;
    }
    $("encrypt").disabled = true;
    try {
      $("blob").value = await encrypt(req, inputs.map((i) => i.value));
      for (const i of inputs) i.value = "";
      $("result").hidden = false;
      $("copied").textContent = "";
      say("Encrypted. Copy the line below into the chat.", "ok");
    } catch (e) {
      say("Encryption failed in this browser: " + e, "err");
    } finally { $("encrypt").disabled = false; }
  });
  $("copy").addEventListener("click", async () => {
    const blob = $("blob");
    let ok = false;
    try { await navigator.clipboard.writeText(blob.value); ok = true; } catch (e) {
      blob.focus(); blob.select();
      try { ok = document.execCommand("copy"); } catch (e2) { ok = false; }
    }
    $("copied").textContent = ok
      ? "Copied"
      : "Copy failed: select the text and copy it by hand.";
  });
  inputs[0].focus();
  $("request").hidden = false;
  say("");
}

async function main() {
  if (!window.isSecureContext || !(window.crypto && crypto.subtle)) return stop(INSECURE);
  let req;
  try { req = await parseRequest(); } catch (e) { return stop(DAMAGED); }
  if (req.exp <= Date.now() / 1000) return stop(expiredText(req.exp));
  showForm(req);
}
main();
</script>
</body>
</html>
"""


WEBCHAT_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>agentkit</title>
<style>
:root { color-scheme: light dark; --bg: #ffffff; --side: #f6f7f9; --fg: #1d2127;
  --muted: #6b7280; --card: #ffffff; --line: #e2e5e9; --me: #eef2f7; --me-fg: #1d2127;
  --accent: #2563eb; --accent-fg: #fff; --err: #b91c1c; --ok: #15803d; --code: #f3f4f6;
  --hover: #eceef1; --note: #fff8e6; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #15181c; --side: #1b1f24; --fg: #e6e8eb; --muted: #9aa3ad; --card: #1f242a;
    --line: #2e353d; --me: #2a3038; --me-fg: #e6e8eb; --accent: #4f7fe8; --err: #f87171;
    --ok: #4ade80; --code: #0f1215; --hover: #262c33; --note: #2a2618; }
}
* { box-sizing: border-box; }
html, body { height: 100%; margin: 0; }
body { background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
button { font: inherit; padding: .4rem .9rem; border-radius: .6rem;
  border: 1px solid var(--line); background: var(--card); color: var(--fg); cursor: pointer; }
button:hover:not(:disabled) { background: var(--hover); }
button:disabled { opacity: .5; cursor: default; }
button.primary, button.approve { background: var(--accent); color: var(--accent-fg);
  border-color: transparent; }
button.primary:hover:not(:disabled), button.approve:hover:not(:disabled) {
  background: var(--accent); filter: brightness(1.1); }
button.deny, button.deny-confirm, #stop { color: var(--err); border-color: var(--err); }
#app { display: flex; height: 100vh; height: 100dvh; }
#side { width: 16rem; flex: none; display: flex; flex-direction: column; background: var(--side);
  border-right: 1px solid var(--line); }
.side-head { display: flex; align-items: center; gap: .5rem; padding: .75rem; }
.side-head strong { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#threads { flex: 1; overflow-y: auto; padding: 0 .5rem .75rem; }
#threads a { display: block; padding: .45rem .6rem; border-radius: .5rem; color: inherit;
  text-decoration: none; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  font-size: .9rem; }
#threads a:hover { background: var(--hover); }
#threads a.current { background: var(--hover); font-weight: 600; }
#threads .when { display: block; font-size: .75rem; color: var(--muted); font-weight: 400; }
#scrim { display: none; }
#chat { flex: 1; min-width: 0; display: flex; flex-direction: column; }
header { display: flex; align-items: center; gap: .6rem; padding: .55rem 1rem;
  border-bottom: 1px solid var(--line); min-height: 3rem; }
#menu { display: none; padding: .3rem .6rem; }
h1 { font-size: 1rem; margin: 0; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#model { font-size: .8rem; color: var(--muted); border: 1px solid var(--line);
  border-radius: 1rem; padding: .05rem .55rem; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; max-width: 40%; }
#model:empty { display: none; }
#status { flex: 1; text-align: right; font-size: .8rem; color: var(--muted); }
#status::before { content: ""; display: inline-block; width: .5rem; height: .5rem;
  margin-right: .35rem; border-radius: 50%; background: var(--muted); }
#status.on::before { background: var(--ok); }
#status.err { color: var(--err); }
#status.err::before { background: var(--err); }
#log { flex: 1; overflow-y: auto; padding: 1.25rem max(1rem, calc((100% - 48rem) / 2));
  display: flex; flex-direction: column; gap: .75rem; }
.item { display: flex; }
.bubble { max-width: 100%; min-width: 0; overflow-wrap: anywhere; }
.kind-user { justify-content: flex-end; }
.kind-user .bubble { max-width: min(40rem, 85%); background: var(--me); color: var(--me-fg);
  padding: .5rem .85rem; border-radius: 1.1rem; white-space: pre-wrap; }
.kind-notice, .kind-note { justify-content: center; }
.kind-notice .bubble, .kind-note .bubble { color: var(--muted); font-size: .85rem;
  text-align: center; white-space: pre-wrap; }
.kind-note .bubble::before { content: "ⓘ "; }
.kind-error .bubble { color: var(--err); border: 1px solid var(--err); border-radius: .7rem;
  padding: .5rem .8rem; white-space: pre-wrap; }
.card { border: 1px solid var(--line); border-radius: .8rem; padding: .7rem .9rem;
  background: var(--card); width: min(40rem, 100%); }
.card-title { font-weight: 600; margin-bottom: .3rem; }
.kind-approval .card { border-color: #d97706; }
.kind-secret .card { background: var(--note); }
.meta { font-size: .85rem; color: var(--muted); margin-top: .3rem; }
.actions { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; margin-top: .6rem; }
.actions input { flex: 1; min-width: 10rem; font: inherit; padding: .35rem .6rem;
  border: 1px solid var(--line); border-radius: .5rem; background: var(--bg); color: var(--fg); }
.note, .state, .expires { font-size: .85rem; color: var(--muted); }
.note.err { color: var(--err); }
a.button { display: inline-block; text-decoration: none; padding: .4rem .9rem;
  border-radius: .6rem; background: var(--accent); color: var(--accent-fg); }
.turn { display: flex; flex-direction: column; gap: .5rem; }
.turn:empty { display: none; }
.working { display: flex; align-items: center; gap: .5rem; color: var(--muted);
  font-size: .9rem; }
.dots span { display: inline-block; width: .4rem; height: .4rem; margin-right: .2rem;
  border-radius: 50%; background: var(--muted); animation: blink 1.2s infinite both; }
.dots span:nth-child(2) { animation-delay: .2s; }
.dots span:nth-child(3) { animation-delay: .4s; }
@keyframes blink { 0%, 80%, 100% { opacity: .2; } 40% { opacity: 1; } }
details.tool { border: 1px solid var(--line); border-radius: .6rem; background: var(--card);
  font-size: .9rem; max-width: 40rem; }
details.tool summary { display: flex; align-items: center; gap: .5rem; padding: .35rem .65rem;
  cursor: pointer; list-style: none; min-width: 0; }
details.tool summary::-webkit-details-marker { display: none; }
details.tool summary::after { content: "›"; margin-left: auto; color: var(--muted);
  transition: transform .15s; }
details.tool[open] summary::after { transform: rotate(90deg); }
.targs { color: var(--muted); white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  min-width: 0; flex: 1; }
.dur { color: var(--muted); font-size: .8rem; white-space: nowrap; }
.mark { flex: none; width: 1rem; height: 1rem; display: inline-flex; align-items: center;
  justify-content: center; font-size: .8rem; font-weight: 700; }
.mark.done { color: var(--ok); }
.mark.error { color: var(--err); }
.mark.running::before { content: ""; width: .8rem; height: .8rem; border-radius: 50%;
  border: 2px solid var(--line); border-top-color: var(--accent);
  animation: spin .8s linear infinite; }
@keyframes spin { to { transform: rotate(360deg); } }
.tool-body { padding: 0 .65rem .6rem; }
.tool-body .label { font-size: .75rem; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); margin-top: .5rem; }
.progress { font-size: .85rem; color: var(--muted); white-space: pre-wrap; }
.md { line-height: 1.6; }
.md > :first-child { margin-top: 0; }
.md > :last-child { margin-bottom: 0; }
.md p { margin: .5rem 0; white-space: pre-wrap; }
.md h1, .md h2, .md h3, .md h4, .md h5, .md h6 { margin: 1rem 0 .4rem; line-height: 1.3; }
.md h1 { font-size: 1.35rem; } .md h2 { font-size: 1.2rem; } .md h3 { font-size: 1.05rem; }
.md h4, .md h5, .md h6 { font-size: 1rem; }
.md ul, .md ol { margin: .4rem 0; padding-left: 1.5rem; }
.md li { margin: .15rem 0; white-space: pre-wrap; }
.md blockquote { margin: .5rem 0; padding: .1rem .9rem; border-left: 3px solid var(--line);
  color: var(--muted); }
.md hr { border: 0; border-top: 1px solid var(--line); margin: 1rem 0; }
.md a { color: var(--accent); }
.md table { border-collapse: collapse; margin: .5rem 0; display: block; overflow-x: auto;
  max-width: 100%; }
.md th, .md td { border: 1px solid var(--line); padding: .3rem .6rem; text-align: left; }
.md th { background: var(--code); }
.md .plain { white-space: pre-wrap; }
code, pre { font: .85rem/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
:not(pre) > code { background: var(--code); padding: .05rem .3rem; border-radius: .3rem; }
pre { margin: .3rem 0 0; padding: .55rem .7rem; background: var(--code); border-radius: .5rem;
  max-height: 24rem; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.code { margin: .6rem 0; border: 1px solid var(--line); border-radius: .6rem; overflow: hidden; }
.code-head { display: flex; align-items: center; justify-content: space-between;
  padding: .2rem .3rem .2rem .7rem; background: var(--code); font-size: .78rem;
  color: var(--muted); border-bottom: 1px solid var(--line); }
.code-head button { padding: .1rem .55rem; font-size: .78rem; }
.code pre { margin: 0; border-radius: 0; white-space: pre; overflow-wrap: normal; }
#empty { margin: auto; text-align: center; max-width: 36rem; padding: 1rem; }
#empty h2 { font-size: 1.6rem; margin: 0 0 .3rem; }
#empty .meta { margin-bottom: 1.2rem; }
#examples { display: flex; flex-wrap: wrap; justify-content: center; gap: .5rem; }
#examples button { text-align: left; max-width: 17rem; font-size: .9rem; }
footer { padding: .5rem max(.75rem, calc((100% - 48rem) / 2))
  max(.75rem, env(safe-area-inset-bottom)); }
#chips { display: flex; flex-wrap: wrap; gap: .4rem; margin-bottom: .4rem; }
#chips:empty { display: none; }
.chip { display: inline-flex; align-items: center; gap: .4rem; max-width: 100%;
  padding: .2rem .3rem .2rem .5rem; border: 1px solid var(--line); border-radius: .6rem;
  background: var(--card); font-size: .85rem; }
.chip img { width: 2rem; height: 2rem; object-fit: cover; border-radius: .3rem; }
.chip .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; min-width: 0; }
.chip .size, .chip .state { color: var(--muted); white-space: nowrap; }
.chip.error { border-color: var(--err); }
.chip.error .state { color: var(--err); white-space: normal; }
.chip button { padding: 0 .45rem; border: 0; }
#attach { padding: .4rem .6rem; border: 0; background: transparent; }
#chat.dropping { outline: 2px dashed var(--accent); outline-offset: -4px; }
.files { display: flex; flex-wrap: wrap; gap: .4rem; margin-top: .3rem; white-space: normal; }
.files img { display: block; max-width: min(16rem, 100%); max-height: 16rem;
  border-radius: .6rem; }
a.file-link { display: inline-flex; gap: .4rem; align-items: center; padding: .35rem .7rem;
  border: 1px solid var(--line); border-radius: .6rem; background: var(--card);
  color: var(--fg); text-decoration: none; max-width: 100%; overflow-wrap: anywhere; }
a.file-link:hover { background: var(--hover); }
a.file-link .size { color: var(--muted); font-size: .85rem; white-space: nowrap; }
.composer { display: flex; align-items: flex-end; gap: .5rem; padding: .4rem;
  border: 1px solid var(--line); border-radius: 1rem; background: var(--card); }
.composer:focus-within { border-color: var(--accent); }
#attach-slot:empty { display: none; }
#text { flex: 1; resize: none; min-height: 2.2rem; max-height: 12rem; padding: .4rem .5rem;
  font: inherit; font-size: 16px; color: var(--fg); background: transparent; border: 0;
  outline: none; }
.hint { font-size: .75rem; color: var(--muted); text-align: center; margin-top: .3rem; }
@media (max-width: 48rem) {
  #side { position: fixed; z-index: 3; inset: 0 auto 0 0; width: min(18rem, 85vw);
    transform: translateX(-100%); transition: transform .2s; }
  #app.side-open #side { transform: none; }
  #app.side-open #scrim { display: block; position: fixed; inset: 0; z-index: 2;
    background: rgba(0, 0, 0, .35); }
  #menu { display: inline-block; }
  #model { max-width: 30%; }
  .hint { display: none; }
}
</style>
</head>
<body>
<div id="app">
<aside id="side" aria-label="Conversations">
  <div class="side-head"><strong id="brand">agentkit</strong>
    <button id="new" type="button" title="Start a new conversation">New chat</button></div>
  <nav id="threads"></nav>
</aside>
<div id="scrim"></div>
<section id="chat">
<header>
  <button id="menu" type="button" aria-label="Conversations">☰</button>
  <h1 id="title">agentkit</h1><span id="model"></span>
  <span id="status" role="status"></span>
</header>
<main id="log" role="log">
  <div id="empty" hidden><h2 id="empty-title"></h2><div class="meta" id="empty-model"></div>
    <div id="examples"></div></div>
</main>
<footer>
  <div id="chips"></div>
  <div class="composer">
    <span id="attach-slot"><button id="attach" type="button" aria-label="Attach files"
      title="Attach files (or paste or drop them)"><svg width="18" height="18"
      viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2"
      stroke-linecap="round" aria-hidden="true"><path d="M21 11.5l-8.5 8.5a5 5 0 0 1-7-7
      l9-9a3.3 3.3 0 0 1 4.7 4.7l-9 9a1.7 1.7 0 0 1-2.4-2.4l8.3-8.3"/></svg></button>
      <input id="file-input" type="file" multiple hidden></span>
    <textarea id="text" rows="1" placeholder="Message"
      aria-label="Message (Enter sends, Shift+Enter new line)"></textarea>
    <button id="send" class="primary" type="button">Send</button>
    <button id="stop" type="button" hidden>Stop</button>
  </div>
  <div class="hint">Enter sends, Shift+Enter adds a line</div>
</footer>
</section>
</div>
<script>
"use strict";
// agentkit web chat: log in with the #token=... fragment, long-poll /api/feed for the
// conversation in ?thread=, render its deliveries and live turns, post messages,
// decisions and Stop. Every text is put in the page as text nodes, never as HTML.
const $ = (id) => document.getElementById(id);
const log = $("log"), statusEl = $("status"), box = $("text"), sendBtn = $("send");
const stopBtn = $("stop"), emptyEl = $("empty");
const LOGIN_MSG = "The token is wrong or old. Open the link that `agentkit serve` printed " +
  "(or use the token in the file <database>.token).";
const THREAD_RE = /^[A-Za-z0-9_-]{1,64}$/;
let info = { title: "agentkit", model: "", examples: [] };
let thread = "owner", generation = 0, conn = "", active = [];
let shown = new Map(), turnEls = new Map(), turnViews = new Map(), openCards = new Set();

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function h(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function setStatus(text, cls) { statusEl.textContent = text; statusEl.className = cls || ""; }
function setConn(state) {
  if (state === conn || conn === "login") return;
  conn = state;
  if (state === "on") setStatus("connected", "on");
  else setStatus("reconnecting…", "");
}
function showError(text) { setStatus(text, "err"); if (conn !== "login") conn = ""; }
function loginNeeded() { setStatus(LOGIN_MSG, "err"); conn = "login"; }

// fetch wrapper: same-origin credentials, JSON in and out; throws only on network errors.
async function api(method, path, body, signal) {
  const opt = { method, credentials: "same-origin", cache: "no-store", headers: {}, signal };
  if (body !== undefined) {
    opt.headers["Content-Type"] = "application/json";
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  let data = null;
  try { data = await r.json(); } catch (e) { /* 204 or not JSON */ }
  return { status: r.status, ok: r.ok, data: data && typeof data === "object" ? data : {} };
}
const errText = (res) =>
  (typeof res.data.error === "string" && res.data.error) || "HTTP error " + res.status;
const localTime = (t) => new Date(t * 1000).toLocaleString();
function shortTime(t) {  // the time today, else the date
  const d = new Date(t * 1000), today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString();
}

// ── markdown: a line-based reader that builds elements (nothing is parsed as HTML) ──
const MAX_MARKDOWN = 100000;  // longer texts are shown as they are
const FENCE_RE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]{0,40})/;
const HEADING_RE = /^ {0,3}(#{1,6})\s+(.*?)(\s+#+)?\s*$/;
const RULE_RE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE_RE = /^ {0,3}> ?/;
const LIST_RE = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const INLINE_RE = new RegExp([
  "`([^`\\n]{1,2000})`",
  "\\*\\*(?![\\s*])([^*\\n]{0,500}?[^\\s*])\\*\\*",
  "(?<!\\w)__(?![\\s_])([^_\\n]{0,500}?[^\\s_])__(?!\\w)",
  "\\*(?![\\s*])([^*\\n]{0,500}?[^\\s*])\\*",
  "(?<!\\w)_(?![\\s_])([^_\\n]{0,500}?[^\\s_])_(?!\\w)",
  "\\[([^\\[\\]\\n]{1,300})\\]\\(\\s*([^\\s()<>]{1,2000})\\s*\\)",
  "(https?:\\/\\/[^\\s<>\"'`]{1,2000})",
].join("|"), "g");

function safeHref(url) {
  try {
    const u = new URL(url, location.href);
    return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
  } catch (e) { return null; }
}
function link(text, url) {
  const href = safeHref(url);
  if (!href) return document.createTextNode(text);
  const a = h("a", "", text);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}
function inline(el, text) {
  let i = 0;
  for (const m of text.matchAll(INLINE_RE)) {
    let whole = m[0];
    let node;
    if (m[1] !== undefined) node = h("code", "", m[1]);
    else if (m[2] !== undefined || m[3] !== undefined) node = h("strong", "", m[2] ?? m[3]);
    else if (m[4] !== undefined || m[5] !== undefined) node = h("em", "", m[4] ?? m[5]);
    else if (m[6] !== undefined) node = link(m[6], m[7]);
    else {
      // a bare URL: trailing punctuation is not part of it (a ")" that closes a "(" is)
      while (/[.,;:!?)\]}]$/.test(whole) && !(whole.endsWith(")") && whole.includes("("))) {
        whole = whole.slice(0, -1);
      }
      node = link(whole, whole);
    }
    el.append(text.slice(i, m.index), node);
    i = m.index + whole.length;
  }
  el.append(text.slice(i));
  return el;
}
function codeBlock(code, lang) {
  const wrap = h("div", "code");
  const head = h("div", "code-head");
  head.append(h("span", "lang", lang || "text"));
  const copy = h("button", "copy", "Copy");
  copy.type = "button";
  head.append(copy);
  const pre = h("pre");
  const c = h("code", lang ? "language-" + lang.replace(/[^\w-]/g, "") : "", code);
  pre.append(c);
  wrap.append(head, pre);
  return wrap;
}
const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|")
  .slice(0, 50).map((c) => c.trim());
const isDivider = (line) => line.includes("-") &&
  cells(line).every((c) => /^:?-+:?$/.test(c));
function table(lines, i, out) {
  const t = h("table"), head = h("thead"), body = h("tbody"), row = h("tr");
  for (const c of cells(lines[i])) row.append(inline(h("th"), c));
  head.append(row);
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const tr = h("tr");
    for (const c of cells(lines[i])) tr.append(inline(h("td"), c));
    body.append(tr);
    i++;
  }
  t.append(head, body);
  out.append(t);
  return i;
}
function list(lines, i, out) {
  const stack = [];  // {indent, el}, at most 6 deep
  while (i < lines.length) {
    const m = LIST_RE.exec(lines[i]);
    if (!m) {
      const last = stack.length && stack[stack.length - 1].el.lastElementChild;
      if (lines[i].trim() && /^\s/.test(lines[i]) && last) {  // the item goes on
        inline(last, "\n" + lines[i].trim());
        i++;
        continue;
      }
      if (!lines[i].trim() && i + 1 < lines.length && LIST_RE.test(lines[i + 1])) {
        i++;
        continue;
      }
      break;
    }
    const indent = m[1].replace(/\t/g, "    ").length;
    const ordered = /\d/.test(m[2]);
    while (stack.length > 1 && stack[stack.length - 1].indent > indent) stack.pop();
    let top = stack[stack.length - 1];
    if (top && top.ordered !== ordered && indent <= top.indent) {  // another kind of list
      stack.pop();
      top = null;
    }
    const parent = stack[stack.length - 1];
    if (!top || (indent > top.indent && stack.length < 6 && top.el.lastElementChild)) {
      const l = h(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[2], 10) !== 1) l.start = parseInt(m[2], 10) || 1;
      const holder = top || parent;
      (holder ? holder.el.lastElementChild : out).append(l);
      top = { indent, el: l, ordered };
      stack.push(top);
    }
    top.el.append(inline(h("li"), m[3]));
    i++;
  }
  return i;
}
function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE_RE.test(line) || HEADING_RE.test(line) || RULE_RE.test(line) ||
    QUOTE_RE.test(line) || LIST_RE.test(line) ||
    (line.includes("|") && i + 1 < lines.length && isDivider(lines[i + 1]));
}
function blocks(text, out, depth) {
  const lines = text.split("\n");
  let i = 0, m;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    if ((m = FENCE_RE.exec(line))) {
      const close = m[1][0].repeat(m[1].length), body = [];
      i++;
      while (i < lines.length && !lines[i].trimStart().startsWith(close)) body.push(lines[i++]);
      i++;  // the closing fence (or the end: an open fence runs to the end)
      out.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING_RE.exec(line))) {
      out.append(inline(h("h" + m[1].length), m[2]));
      i++;
    } else if (RULE_RE.test(line)) {
      out.append(h("hr"));
      i++;
    } else if (QUOTE_RE.test(line)) {
      const body = [];
      while (i < lines.length && QUOTE_RE.test(lines[i])) {
        body.push(lines[i++].replace(QUOTE_RE, ""));
      }
      const q = h("blockquote");
      if (depth < 3) blocks(body.join("\n"), q, depth + 1);
      else q.append(inline(h("p"), body.join("\n")));
      out.append(q);
    } else if (LIST_RE.test(line)) {
      i = list(lines, i, out);
    } else if (line.includes("|") && i + 1 < lines.length && isDivider(lines[i + 1])) {
      i = table(lines, i, out);
    } else {
      const body = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) body.push(lines[i++]);
      out.append(inline(h("p"), body.join("\n")));
    }
  }
  return out;
}
function markdown(text) {
  const el = h("div", "md");
  if (text.length > MAX_MARKDOWN) el.append(h("div", "plain", text));
  else blocks(text, el, 0);
  return el;
}

// ── files: chips of the uploads to send, and the files of the log ──
const PREVIEW_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
let uploads = [];  // {chip, id, done}: the files chosen for the next message
function sizeText(n) {
  if (n < 1024) return n + " B";
  return n < 1048576 ? (n / 1024).toFixed(1) + " KB" : (n / 1048576).toFixed(1) + " MB";
}
function fileLinks(files) {  // images as previews, anything else as a download link
  const el = h("div", "files");
  for (const f of files) {
    const a = h("a", "file-link");
    a.href = String(f.url);
    a.download = String(f.name);
    if (PREVIEW_TYPES.includes(f.mime)) {
      a.className = "file-image";
      const img = h("img");
      img.src = a.href;
      img.alt = String(f.name);
      a.append(img);
    } else a.append(h("span", "name", String(f.name)), h("span", "size", sizeText(+f.size || 0)));
    el.append(a);
  }
  return el;
}
function addFiles(files) {  // each file uploads at once and shows as a chip
  for (const file of files) {
    const chip = h("div", "chip");
    const up = { chip, id: null, done: null };
    if (PREVIEW_TYPES.includes(file.type)) {
      const img = h("img");
      img.src = URL.createObjectURL(file);
      img.alt = "";
      chip.append(img);
    }
    const state = h("span", "state", "uploading…");
    const remove = h("button", "remove", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", "Remove " + file.name);
    remove.addEventListener("click", () => { dropUpload(up); box.focus(); });
    chip.append(h("span", "name", file.name), h("span", "size", sizeText(file.size)), state,
      remove);
    $("chips").append(chip);
    up.done = uploadFile(file, up, state);
    uploads.push(up);
  }
}
async function uploadFile(file, up, state) {
  try {
    const r = await fetch("/api/files?name=" + encodeURIComponent(file.name || "file"),
      { method: "POST", credentials: "same-origin", body: file });
    let data = {};
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (r.status === 201 && typeof data.id === "string") {
      up.id = data.id;
      state.remove();
      return;
    }
    if (r.status === 401) loginNeeded();
    state.textContent = errText({ status: r.status, data: data || {} });
  } catch (e) {
    state.textContent = "Could not upload: the server refused it or is not reachable.";
  }
  up.chip.classList.add("error");
}
function dropUpload(up) {
  const img = up.chip.querySelector("img");
  if (img) URL.revokeObjectURL(img.src);
  up.chip.remove();
  uploads = uploads.filter((u) => u !== up);
}
async function uploaded() {  // the uploads done, once none is still on its way
  await Promise.all(uploads.map((u) => u.done));
  return uploads.filter((u) => u.id);
}

// ── feed items ──
function approvalCard(b, ap) {
  b.append(h("div", "card-title", ap.state === "pending" ? "Approval needed" : "Approval"));
  const who = h("div", "meta", (ap.requester || "The agent") + " asks to run ");
  who.append(h("code", "", String(ap.tool)));
  b.append(who, h("pre", "args", JSON.stringify(ap.args ?? {}, null, 2)));
  if (ap.reason) b.append(h("div", "meta", "Reason: " + ap.reason));
  const act = h("div", "actions");
  const choices = Array.isArray(ap.choices) ? ap.choices : [];
  if (ap.state === "pending") {
    if (choices.includes("approved")) act.append(button("approve", "Approve", ap.id));
    if (choices.includes("denied")) act.append(button("deny", "Deny", ap.id));
    if (!choices.includes("approved")) act.append(h("span", "state", "Waiting for an approver"));
    if (ap.expires_at) act.append(h("span", "expires", "Expires " + localTime(ap.expires_at)));
  } else {
    let text = ap.state.charAt(0).toUpperCase() + ap.state.slice(1);
    if (ap.decided_by) text += " by " + ap.decided_by;
    if (ap.decision_reason) text += ": " + ap.decision_reason;
    act.append(h("span", "state", text));
  }
  act.append(h("span", "note"));
  b.append(act);
}
function button(cls, label, approval) {
  const btn = h("button", cls, label);
  btn.type = "button";
  btn.dataset.approval = approval;
  return btn;
}
function secretCard(b, it) {
  b.append(h("div", "card-title", "The agent asks for a secret"));
  const text = String(it.text ?? "");
  const reason = text.split("\nOpen this link")[0];
  if (reason) b.append(h("div", "", reason));
  const act = h("div", "actions");
  const href = safeHref(String(it.url || ""));
  if (href) {
    const a = h("a", "button", "Open the secure form");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    act.append(a);
    const exp = new URLSearchParams(new URL(href).hash.slice(1)).get("exp");
    if (exp && /^[0-9]+$/.test(exp)) act.append(h("span", "state", "Expires " + localTime(+exp)));
  }
  b.append(act, h("div", "meta", "Paste the line the form makes here. Values never pass " +
    "through the chat."));
}
function render(it) {
  if (it.kind === "decided") {  // a decision: the request's card shows it
    const old = shown.get(it.updates);
    if (old) render({ ...old.item, approval: it.approval });
    return;
  }
  const kind = String(it.kind || "notice").replace(/[^a-z]/g, "");
  const el = h("div", "item kind-" + kind);
  el.dataset.id = it.id;
  if (it.turn_id) el.dataset.turn = it.turn_id;
  let b;
  if (kind === "reply") b = markdown(String(it.text ?? ""));
  else if (kind === "approval" || kind === "secret") {
    b = h("div", "card");
    if (kind === "secret") secretCard(b, it); else approvalCard(b, it.approval || {});
  } else b = h("div", "", kind === "file" ? null : String(it.text ?? ""));
  const files = Array.isArray(it.files) ? it.files : it.file ? [it.file] : [];
  if (files.length) b.append(fileLinks(files));
  b.classList.add("bubble");
  el.append(b);
  el.item = it;
  const old = shown.get(it.id);
  if (old) {
    const note = old.querySelector(".note"), kept = el.querySelector(".note");
    if (note && kept) kept.replaceWith(note);  // what the last decision here answered
    old.replaceWith(el);
  } else log.append(el);
  shown.set(it.id, el);
  if (kind === "user" && it.turn_id && turnEls.has(it.turn_id)) el.after(turnEls.get(it.turn_id));
  if (kind === "reply" && it.turn_id && turnViews.has(it.turn_id)) {
    renderTurn(it.turn_id, turnViews.get(it.turn_id), true);
  }
}

// ── turns: tool cards and the reply as it streams ──
function shortArgs(args) {
  let value;
  try { value = JSON.parse(args); } catch (e) { return String(args).slice(0, 120); }
  if (value && typeof value === "object" && !Array.isArray(value)) {
    return Object.entries(value).map(([k, v]) =>
      k + ": " + (typeof v === "string" ? v : JSON.stringify(v))).join(", ").slice(0, 120);
  }
  return JSON.stringify(value).slice(0, 120);
}
function pretty(args) {
  try { return JSON.stringify(JSON.parse(args), null, 2); } catch (e) { return String(args); }
}
function toolCard(p) {
  const d = h("details", "tool");
  d.dataset.call = p.id;
  d.open = openCards.has(p.id);
  const s = h("summary");
  const mark = h("span", "mark " + p.state, { done: "✓", error: "✕" }[p.state] || "");
  mark.title = { done: "done", error: "failed", running: "running" }[p.state] || p.state;
  s.append(mark, h("code", "", String(p.tool)), h("span", "targs", shortArgs(p.args)));
  if (p.state === "running" && p.progress.length) {
    s.lastChild.textContent = p.progress[p.progress.length - 1];
  }
  if (p.ms != null) {
    s.append(h("span", "dur", p.ms < 1000 ? p.ms + " ms" : (p.ms / 1000).toFixed(1) + " s"));
  }
  const body = h("div", "tool-body");
  body.append(h("div", "label", "Arguments"), h("pre", "", pretty(p.args)));
  if (p.progress.length) body.append(h("div", "label", "Progress"),
    h("div", "progress", p.progress.join("\n")));
  if (p.result != null) body.append(h("div", "label", p.state === "error" ? "Error" : "Result"),
    h("pre", "result", p.result));
  d.append(s, body);
  d.addEventListener("toggle", () => {
    if (d.open) openCards.add(p.id); else openCards.delete(p.id);
  });
  return d;
}
function renderTurn(id, view, force) {
  const key = JSON.stringify(view);
  let el = turnEls.get(id);
  const replied = [...shown.values()].some((e) => e.item.kind === "reply" && e.item.turn_id === id);
  if (el && !force && el.dataset.key === key + replied) return;
  turnViews.set(id, view);
  if (!el) {
    el = h("div", "turn");
    el.dataset.turn = id;
    turnEls.set(id, el);
    const user = [...shown.values()].find((e) => e.item.kind === "user" && e.item.turn_id === id);
    if (user) user.after(el); else log.append(el);
  }
  el.dataset.key = key + replied;
  el.replaceChildren();
  const parts = view.parts || [];
  parts.forEach((p, i) => {
    if (p.type === "tool") el.append(toolCard(p));
    else if (!(replied && i === parts.length - 1)) {
      const m = markdown(String(p.text));
      m.classList.add("live");
      el.append(m);
    }
  });
  const running = view.status === "running" || view.status === "queued";
  const streaming = parts.length && parts[parts.length - 1].type === "text";
  if (running && !replied && !streaming) {
    const w = h("div", "working");
    const dots = h("span", "dots");
    dots.append(h("span"), h("span"), h("span"));
    w.append(dots, h("span", "", parts.length ? "Working…" : "Thinking…"));
    el.append(w);
  }
  if (view.status === "cancelled") el.append(h("div", "meta", "Stopped."));
}

// ── conversations ──
function threadUrl(key) { return key === "owner" ? location.pathname : "?thread=" + key; }
async function loadThreads() {
  let res;
  try { res = await api("GET", "/api/threads"); } catch (e) { return; }
  if (!res.ok || !Array.isArray(res.data.threads)) return;
  const nav = $("threads");
  nav.replaceChildren();
  const list = res.data.threads;
  if (!list.some((t) => t.key === thread)) list.unshift({ key: thread, title: "New chat" });
  for (const t of list) {
    const a = h("a", t.key === thread ? "current" : "", String(t.title || "New chat"));
    a.href = threadUrl(t.key);
    a.dataset.thread = t.key;
    if (t.updated_at) a.append(h("span", "when", shortTime(t.updated_at)));
    nav.append(a);
  }
}
function openThread(key, push) {
  if (!THREAD_RE.test(key)) key = "owner";
  if (push && key !== thread) history.pushState(null, "", threadUrl(key));
  thread = key;
  generation++;
  shown = new Map(); turnEls = new Map(); turnViews = new Map(); openCards = new Set();
  active = [];
  log.replaceChildren(emptyEl);
  emptyEl.hidden = true;
  stopBtn.hidden = true;
  $("app").classList.remove("side-open");
  loadThreads();
  poll(generation);
  box.focus();
}
function showEmpty() {
  emptyEl.hidden = shown.size > 0 || turnEls.size > 0;
}
function showActive() { stopBtn.hidden = !active.length; }  // Send stays: messages queue

const nearBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 120;

// Long-poll loop of one conversation: ends when another is opened, or on 401.
async function poll(gen) {
  let last = 0, seen = "", first = true;
  while (gen === generation) {
    const t0 = Date.now();
    let res;
    const q = "thread=" + encodeURIComponent(thread) + "&after=" + last +
      "&seen=" + encodeURIComponent(seen) + "&turns=" + active.slice(-20).join(",");
    try { res = await api("GET", "/api/feed?" + q); }
    catch (e) { setConn("off"); await sleep(2000); continue; }
    if (gen !== generation) return;
    if (res.status === 401) { loginNeeded(); return; }
    const items = res.data.items;
    if (!res.ok || !Array.isArray(items)) {
      if (res.status >= 400 && res.status < 500) { showError(errText(res)); await sleep(10000); }
      else { setConn("off"); await sleep(2000); }
      continue;
    }
    setConn("on");
    const stick = first || nearBottom();
    const fresh = items.some((it) => !shown.has(it.id));
    try {
      items.forEach(render);
      for (const [id, view] of Object.entries(res.data.turns || {})) renderTurn(id, view, false);
    } catch (e) { console.error("agentkit: could not show an item:", e); }  // the feed goes on
    active = Array.isArray(res.data.active) ? res.data.active : [];
    showActive();
    showEmpty();
    if (stick) log.scrollTop = log.scrollHeight;
    if (fresh && !first) loadThreads();
    first = false;
    if (Number.isInteger(res.data.last)) last = res.data.last;
    seen = String(res.data.state ?? "");
    // Guard against a server that answers at once without holding the request.
    if (!items.length && !Object.keys(res.data.turns || {}).length && Date.now() - t0 < 200) {
      await sleep(1000);
    }
  }
}

async function sendMessage(given) {
  if (sendBtn.disabled) return;
  const text = given ?? box.value;
  sendBtn.disabled = true;
  try {
    const files = given == null ? await uploaded() : [];
    if (!text.trim() && !files.length) return;
    const ids = files.map((u) => u.id);
    const res = await api("POST", "/api/messages", { text, files: ids, thread });
    if (res.status === 202) {
      if (given == null) { box.value = ""; grow(); files.forEach(dropUpload); }
      log.scrollTop = log.scrollHeight;
      loadThreads();
    } else if (res.status === 401) loginNeeded();
    else showError(errText(res));
  } catch (e) {
    showError("Could not send: the server is not reachable.");
  } finally {
    sendBtn.disabled = false;
  }
}

async function stopTurns() {
  stopBtn.disabled = true;
  try {
    for (const id of active) {
      const res = await api("POST", "/api/turns/" + encodeURIComponent(id) + "/cancel", {});
      if (res.status === 401) { loginNeeded(); break; }
      if (!res.ok && res.status !== 400) showError(errText(res));
    }
  } catch (e) {
    showError("Could not stop: the server is not reachable.");
  } finally {
    stopBtn.disabled = false;
  }
}

function askReason(btn) {
  const act = btn.parentElement;
  if (act.querySelector("input")) return;
  const input = h("input");
  Object.assign(input, { type: "text", placeholder: "Reason (optional)", maxLength: 2000 });
  const ok = button("deny-confirm", "Deny", btn.dataset.approval);
  const cancel = h("button", "deny-cancel", "Cancel");
  cancel.type = "button";
  for (const b of act.querySelectorAll("button.approve, button.deny")) b.hidden = true;
  act.prepend(input, ok, cancel);
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); ok.click(); }
    if (ev.key === "Escape") cancel.click();
  });
  cancel.addEventListener("click", () => {
    input.remove(); ok.remove(); cancel.remove();
    for (const b of act.querySelectorAll("button")) b.hidden = false;
  });
  input.focus();
}

async function decide(btn) {
  const id = btn.dataset.approval;
  const decision = btn.classList.contains("approve") ? "approve" : "deny";
  const act = btn.parentElement, note = act.querySelector(".note");
  const body = { decision };
  const reasonBox = act.querySelector("input");
  if (decision === "deny" && reasonBox && reasonBox.value.trim()) {
    body.reason = reasonBox.value.trim();
  }
  const btns = act.querySelectorAll("button, input");
  btns.forEach((b) => { b.disabled = true; });
  note.className = "note";
  note.textContent = "…";
  let res;
  try { res = await api("POST", "/api/approvals/" + encodeURIComponent(id), body); }
  catch (e) { res = { status: 0, ok: false, data: { error: "The server is not reachable." } }; }
  if (res.ok) { note.textContent = res.data.message || String(res.data.state); return; }
  if (res.status === 401) loginNeeded();
  note.textContent = errText(res);
  note.classList.add("err");
  // 409: already decided or expired, keep the buttons off; otherwise allow another try.
  if (res.status !== 409) btns.forEach((b) => { b.disabled = false; });
}

async function copyCode(btn) {
  const code = btn.closest(".code").querySelector("pre").textContent;
  try { await navigator.clipboard.writeText(code); btn.textContent = "Copied"; }
  catch (e) { btn.textContent = "Copy failed"; }
  setTimeout(() => { btn.textContent = "Copy"; }, 1500);
}

// Textarea grows with its content (CSSOM, allowed by the CSP).
function grow() {
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight + 2, 192) + "px";
}

box.addEventListener("input", grow);
box.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    sendMessage();
  }
});
sendBtn.addEventListener("click", () => sendMessage());
const fileInput = $("file-input");
$("attach").addEventListener("click", () => fileInput.click());
fileInput.addEventListener("change", () => {
  addFiles([...fileInput.files]);
  fileInput.value = "";
});
box.addEventListener("paste", (ev) => {
  const files = [...((ev.clipboardData && ev.clipboardData.files) || [])];
  if (files.length) { ev.preventDefault(); addFiles(files); }
});
const chatEl = $("chat");
const carriesFiles = (ev) => ev.dataTransfer && [...ev.dataTransfer.types].includes("Files");
chatEl.addEventListener("dragover", (ev) => {
  if (!carriesFiles(ev)) return;
  ev.preventDefault();
  chatEl.classList.add("dropping");
});
chatEl.addEventListener("dragleave", (ev) => {
  if (!chatEl.contains(ev.relatedTarget)) chatEl.classList.remove("dropping");
});
chatEl.addEventListener("drop", (ev) => {
  chatEl.classList.remove("dropping");
  if (!ev.dataTransfer || !ev.dataTransfer.files.length) return;
  ev.preventDefault();
  addFiles([...ev.dataTransfer.files]);
});
stopBtn.addEventListener("click", stopTurns);
$("new").addEventListener("click", () => {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  openThread("c" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""), true);
});
$("menu").addEventListener("click", () => $("app").classList.toggle("side-open"));
$("scrim").addEventListener("click", () => $("app").classList.remove("side-open"));
$("threads").addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-thread]");
  if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
  ev.preventDefault();
  openThread(a.dataset.thread, true);
});
window.addEventListener("popstate", () => openThread(urlThread(), false));
log.addEventListener("click", (ev) => {
  const copy = ev.target.closest("button.copy");
  if (copy) { copyCode(copy); return; }
  const ex = ev.target.closest("button[data-example]");
  if (ex) { sendMessage(ex.dataset.example); return; }
  const btn = ev.target.closest("button[data-approval]");
  if (!btn || btn.disabled) return;
  if (btn.classList.contains("deny")) askReason(btn); else decide(btn);
});

function showInfo() {
  document.title = info.title;
  $("title").textContent = $("brand").textContent = info.title;
  $("model").textContent = info.model || "";
  $("empty-title").textContent = info.title;
  $("empty-model").textContent = info.model ? "Model: " + info.model : "";
  const ex = $("examples");
  ex.replaceChildren();
  for (const text of info.examples || []) {
    const b = h("button", "", String(text));
    b.type = "button";
    b.dataset.example = String(text);
    ex.append(b);
  }
}
function urlThread() {
  const key = new URLSearchParams(location.search).get("thread");
  return key && THREAD_RE.test(key) ? key : "owner";
}

// Log in with the token from the URL fragment (if any).
async function login() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token === null) return true;
  history.replaceState(null, "", location.pathname + location.search);  // the token leaves
  for (;;) {
    try {
      const res = await api("POST", "/api/login", { token });
      if (res.ok) { setConn("on"); return true; }
      if (res.status === 401) { loginNeeded(); return false; }
      if (res.status < 500) { showError("Login failed: " + errText(res)); return false; }
    } catch (e) { /* network error: retry */ }
    setConn("off");
    await sleep(2000);
  }
}

setStatus("connecting…", "");
login().then(async (ok) => {
  if (!ok) return;
  try {
    const res = await api("GET", "/api/info");
    if (res.status === 401) { loginNeeded(); return; }
    if (res.ok) info = { ...info, ...res.data };
  } catch (e) { /* the feed says it */ }
  showInfo();
  thread = "";
  openThread(urlThread(), false);
});
</script>
</body>
</html>
"""


if __name__ == "__main__":
    # Run as the importable module, so that `--app` objects and the CLI share one `AgentKit`.
    import agentkit

    sys.exit(agentkit.main())
