"""Helpers the test files share: the store under test, reading rows through the store's
operations, waiting for a condition, Chromium, and the secret page's encryption done in
Python (what the page does in the browser)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import agentkit

# agentkit's configuration variables: tests set what they need, nothing comes from the shell
CONFIG_VARS = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "AGENTKIT_MODEL",
    "AGENTKIT_DB",
    "TELEGRAM_BOT_TOKEN",
    "AGENTKIT_TELEGRAM_ALLOW",
    "AGENTKIT_WEB_TOKEN",
    "AGENTKIT_PUBLIC_URL",
    "AGENTKIT_SECRET_KEY",
    "AGENTKIT_LOG_LEVEL",
)


def clear_config(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...] = CONFIG_VARS) -> None:
    for name in names:
        monkeypatch.delenv(name, raising=False)


CHROMIUM = "/usr/bin/chromium"  # Debian's; the tests never download a browser
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's closed network refuses them
    "--disable-component-update",
    "--disable-sync",
]


def open_test_store(where: os.PathLike[str] | str) -> agentkit.Store:
    """A fresh store for a test: a postgresql:// URL as it is, else an SQLite file in the
    folder `where`."""
    where = os.fspath(where)
    return agentkit.open_store(where if "://" in where else os.path.join(where, "agent.db"))


Database = os.PathLike[str] | str  # a test's database: an SQLite file, or a URL
NewDatabase = Callable[[str], Database]  # conftest's `new_db`: the test's database of a name
Source = agentkit.AgentKit | agentkit.Store | os.PathLike[str] | str


def created(db: Database) -> bool:
    """Whether the database `db` was created: its file is there, or its schema holds tables."""
    where = os.fspath(db)
    if "://" not in where:
        return os.path.exists(where)
    import psycopg

    with psycopg.connect(where) as conn:
        query = "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        return conn.execute(query).fetchone()[0] > 0


def database_config(db: Database) -> dict[str, str]:
    """The configuration a process needs to use the test's database `db`: AGENTKIT_DB, and
    for a database URL the kit key and web token that the `new_db` fixture set."""
    config = {"AGENTKIT_DB": os.fspath(db)}
    if "://" in config["AGENTKIT_DB"]:
        config |= {name: os.environ[name] for name in ("AGENTKIT_SECRET_KEY", "AGENTKIT_WEB_TOKEN")}
    return config


def all_rows(of: Source, table: str) -> list[dict]:
    """Every row of `table`, as column -> value, read through the store's operations: of a
    kit, a store, or a database another process uses (through a store of the test's own)."""
    if isinstance(of, agentkit.AgentKit):
        return of.store.rows(table)
    if isinstance(of, agentkit.Store):
        return of.rows(table)
    store = agentkit.open_store(of)
    try:
        return store.rows(table)
    finally:
        store.close()


def rows(of: Source, table: str, *names: str, **equal: object) -> list:
    """The rows of `table` whose columns equal `equal`, in storage order: each the tuple of
    the columns `names` (the value alone for one name)."""
    found = [r for r in all_rows(of, table) if all(r[k] == v for k, v in equal.items())]
    if len(names) == 1:
        return [r[names[0]] for r in found]
    return [tuple(r[n] for n in names) for r in found]


def count(of: Source, table: str, **equal: object) -> int:
    """How many rows of `table` have columns equal to `equal`."""
    return len(rows(of, table, **equal))


def stored_bytes(db: Database) -> bytes:
    """What the database `db` keeps, as bytes to search for a secret: an SQLite file's bytes
    (its WAL and free pages included), or every row of every table of a database URL."""
    where = os.fspath(db)
    if "://" not in where:
        data = b""
        for path in (where, where + "-wal", where + "-shm"):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    data += f.read()
        return data
    store = agentkit.open_store(where)
    try:
        return repr([store.rows(table) for table in store.tables()]).encode()
    finally:
        store.close()


@contextlib.contextmanager
def holding_writes(db: Database) -> Iterator[None]:
    """Hold back the write transactions of every process on the database `db` until the
    block ends: a write transaction of a store of the test's own, left open meanwhile."""
    store = agentkit.open_store(os.fspath(db))
    try:
        with store.transaction():
            yield
    finally:
        store.close()


def take_over(kit: agentkit.AgentKit, task: str) -> None:
    """Another worker takes the running job of `task` over, as when its lease runs out."""
    [job] = [r for r in kit.store.rows("jobs") if r["name"] == task and r["state"] == "running"]
    assert kit.store.extend_lease(job["id"], job["owner"], job["attempts"], -60)
    assert kit.store.claim_jobs("someone else", [task], 1, 300, sweep=True)


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    """Poll `condition` (for what cannot be awaited, like another process's rows or a file
    growing) until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or condition}")


def seal(url: str, values: dict[str, str], names: list[str] | None = None) -> str:
    """The blob the secret page makes for the request behind `url` (its fragment): ECDH
    P-256, HKDF-SHA256, AES-256-GCM with the request id and field names as associated
    data. `names` overrides the field names bound in (to forge a mismatch)."""
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).fragment))
    request_id = params["id"]
    names = names or [f["name"] for f in json.loads(params["fields"])]
    peer = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), agentkit.unb64url(params["key"])
    )
    mine = ec.generate_private_key(ec.SECP256R1())
    key = HKDF(hashes.SHA256(), 32, salt=request_id.encode(), info=agentkit.SECRET_INFO).derive(
        mine.exchange(ec.ECDH(), peer)
    )
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(
        iv, json.dumps(values).encode(), agentkit.secret_aad(request_id, names)
    )
    public = mine.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    parts = [request_id, *(agentkit.b64url(p) for p in (public, iv, sealed))]
    return "agentkit-secret:v1." + ".".join(parts)


def python_process(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`code` (dedented) run by this Python in a new process, its output piped as text."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@contextlib.contextmanager
def served(kit: agentkit.AgentKit, workers: int = 2, http: str = "127.0.0.1:0") -> Iterator[str]:
    """Run `kit.serve` in a thread (on a free loopback port, or `http`); yield its URL;
    stop and close."""
    stop = threading.Event()
    urls: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            kit.serve(http=http, workers=workers, stop=stop, ready=urls.append)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, name="test-serve", daemon=True)
    thread.start()
    try:
        wait_until(lambda: urls or errors or not thread.is_alive(), what="serve to be ready")
        assert not errors, errors
        assert urls, "serve returned before it was ready"
        yield urls[0]
    finally:
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive(), "serve did not stop within 15 s of stop being set"
        kit.close()
    assert not errors, errors
