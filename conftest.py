"""The database each test gets, and the PostgreSQL server behind it.

AGENTKIT_TEST_DATABASE picks the engine of the suite: unset (or `sqlite`), each test's
databases are fresh SQLite files in its `tmp_path`; `postgresql`, or a postgresql:// URL
of a server, they are fresh schemas of PostgreSQL, and tests marked `sqlite_only` are
deselected. The server is that URL, else AGENTKIT_TEST_POSTGRES (a postgresql:// URL of a
database the tests may create schemas in), else a private cluster that `.ci/postgres`
starts for this session on a free loopback port and stops at its end. A server that
cannot be reached or started fails the tests; it never skips them."""

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import Database, NewDatabase

HERE = Path(__file__).parent
TEST_DATABASE = os.environ.get("AGENTKIT_TEST_DATABASE", "sqlite")
ON_POSTGRESQL = TEST_DATABASE.startswith("postgresql")
if TEST_DATABASE != "sqlite" and TEST_DATABASE != "postgresql" and "://" not in TEST_DATABASE:
    raise pytest.UsageError(
        f"AGENTKIT_TEST_DATABASE={TEST_DATABASE!r}: use sqlite, postgresql, or a "
        "postgresql:// URL of a server the tests may create schemas in"
    )
# What a database URL needs from the environment (a file finds or makes its own)
SHARED_CONFIG = {
    "AGENTKIT_SECRET_KEY": "secret-key-of-the-test-suite-0123456789",
    "AGENTKIT_WEB_TOKEN": "web-token-of-the-test-suite-0123456789",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): the test is about SQLite itself (its file, WAL, the files "
        "beside it); not run when AGENTKIT_TEST_DATABASE names PostgreSQL",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every sqlite_only marker gives its reason. On PostgreSQL, the tests that run are those
    that use the test's database (`new_db`, `db`) and are not sqlite_only: the others open
    no database of the engine under test, or pick their engines themselves (test_store.py,
    test_postgres.py), and so ran the same in the SQLite pass."""
    for item in items:
        for marker in item.iter_markers("sqlite_only"):
            if not (marker.args or marker.kwargs.get("reason")):
                raise pytest.UsageError(f"{item.nodeid}: sqlite_only needs a reason")
    if not ON_POSTGRESQL:
        return
    kept = [
        item
        for item in items
        if "new_db" in getattr(item, "fixturenames", ())
        and not item.get_closest_marker("sqlite_only")
    ]
    config.hook.pytest_deselected(items=[i for i in items if i not in kept])
    items[:] = kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = TEST_DATABASE if "://" in TEST_DATABASE else os.environ.get("AGENTKIT_TEST_POSTGRES")
    if url:
        yield url
        return
    env = {**os.environ, "AGENTKIT_PG_PORT": str(_free_port())}
    started = subprocess.run(
        ["bash", str(HERE / ".ci" / "postgres")], env=env, capture_output=True, text=True
    )
    if started.returncode:
        pytest.fail(f"could not start PostgreSQL (.ci/postgres):\n{started.stderr}")
    data = started.stdout.strip().splitlines()
    url, folder = data[-1], data[-2]
    yield url
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *_pg_ctl(folder), "stop", "-m", "fast"],
        capture_output=True,
    )


def _pg_ctl(folder: str) -> list[str]:
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return [str(bins[-1]), "-D", f"{folder}/data"]


class _Schemas:
    """Fresh schemas of the test server, each as a URL whose search_path selects it; all
    dropped by `drop`."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.names: list[str] = []

    def new(self) -> str:
        import psycopg

        schema = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.server, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.names.append(schema)
        return f"{self.server}?options=-csearch_path%3D{schema}"

    def drop(self) -> None:
        import psycopg

        if self.names:
            with psycopg.connect(self.server, autocommit=True) as conn:
                for schema in self.names:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """A fresh schema of the test server, as a URL whose search_path selects it."""
    schemas = _Schemas(postgres_url)
    yield schemas.new()
    schemas.drop()


@pytest.fixture
def new_db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NewDatabase]:
    """`new_db(name)` is the test's database of that name, the same for the same name: the
    file `tmp_path/name`, or on PostgreSQL a fresh schema's URL, with what a database URL
    needs set (AGENTKIT_SECRET_KEY, AGENTKIT_WEB_TOKEN) and the test in `tmp_path`, where a
    kit of a URL keeps its `workspace` (as a kit of `tmp_path/name` does)."""
    if not ON_POSTGRESQL:
        yield lambda name: tmp_path / name
        return
    schemas = _Schemas(request.getfixturevalue("postgres_url"))
    for name, value in SHARED_CONFIG.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    urls: dict[str, str] = {}

    def named(name: str) -> str:
        if name not in urls:
            urls[name] = schemas.new()
        return urls[name]

    yield named
    schemas.drop()


@pytest.fixture
def db(new_db: NewDatabase) -> Database:
    """The test's database (`new_db("agent.db")`)."""
    return new_db("agent.db")
