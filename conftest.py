"""The PostgreSQL server the tests use: AGENTKIT_TEST_POSTGRES (a postgresql:// URL of a
database the tests may create schemas in), else a private cluster that `.ci/postgres`
starts for this session on a free loopback port and stops at its end; and a fresh schema
of it per test (`postgres_db`)."""

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("AGENTKIT_TEST_POSTGRES")
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


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """A fresh schema of the test server, as a URL whose search_path selects it."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
