"""agentkit behind PgBouncer in transaction mode: turns, jobs drained by several processes
and a claim race all go through the pooler (where no server-side prepared statement and no
session state survives a transaction), and LISTEN through AGENTKIT_LISTEN_URL, a direct
connection."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import agentkit
from testkit import python_process, wait_until


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pooled(postgres_db: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """PgBouncer (pool_mode=transaction, two server connections) in front of a fresh schema
    of the test server: `(its URL, the direct URL)`."""
    server = urllib.parse.urlsplit(postgres_db)
    schema = urllib.parse.unquote(server.query).rpartition("search_path=")[2]
    port = _free_port()
    folder = tmp_path / "pgbouncer"
    folder.mkdir()
    (folder / "users.txt").write_text(f'"{server.username}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"pooled = host={server.hostname} port={server.port} dbname={server.path[1:]} "
        f"user={server.username} connect_query='SET search_path TO {schema}'\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 200\n"
        f"admin_users = {server.username}\n"
    )
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        pytest.fail("pgbouncer is not installed: apt-get install pgbouncer (.ci/run does)")
    user = ["-u", "postgres"] if os.getuid() == 0 else []  # it refuses to run as root
    bouncer = subprocess.Popen(
        [binary, *user, str(folder / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"postgresql://{server.username}@127.0.0.1:{port}/pooled"
    try:

        def answers() -> bool:
            assert bouncer.poll() is None, bouncer.communicate()[1]
            try:
                with psycopg.connect(url, connect_timeout=2) as conn:
                    return conn.execute("SELECT current_schema()").fetchone() == (schema,)
            except psycopg.OperationalError:
                return False

        wait_until(answers, what="pgbouncer to answer")
        yield url, postgres_db
    finally:
        bouncer.terminate()
        bouncer.communicate(timeout=30)


def pool_mode(url: str) -> str:
    """The pool mode of the PgBouncer behind `url`, as its admin console reports it."""
    admin = urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path="/pgbouncer"))
    with psycopg.connect(admin, autocommit=True, prepare_threshold=None) as conn:
        config = {row[0]: row[1] for row in conn.execute("SHOW CONFIG").fetchall()}
    return config["pool_mode"]


def test_turns_with_tools_and_approvals_run_through_the_pooler(
    pooled: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, direct = pooled
    monkeypatch.setenv("AGENTKIT_LISTEN_URL", direct)
    assert pool_mode(url) == "transaction"
    steps = [step for i in range(10) for step in (agentkit.ToolCall("note", {"n": i}), f"{i}")]
    model = agentkit.ScriptedModel([agentkit.ToolCall("restart", {}), "restarted", *steps])
    with agentkit.AgentKit(url, model=model) as kit:
        noted: list[int] = []

        @kit.tool
        def note(n: int) -> str:
            """Note a number."""
            noted.append(n)
            return f"noted {n}"

        @kit.tool(approval=True)
        def restart() -> str:
            """Restart the service."""
            return "done"

        waiting = kit.run_turn("cli:me", "restart")
        assert waiting.status == "waiting_approval"
        assert kit.approve(waiting.approvals[0].id, actor="cli:ops").status == "done"
        results = [kit.run_turn(f"cli:{i % 3}", f"note {i}") for i in range(10)]
        assert [r.status for r in results] == ["done"] * 10
        assert [r.reply for r in results] == [str(i) for i in range(10)]
        assert noted == list(range(10))
        assert kit.store._listen_url == direct


def test_processes_drain_jobs_through_the_pooler_each_once_and_wake_on_notify(
    pooled: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, direct = pooled
    monkeypatch.setenv("AGENTKIT_LISTEN_URL", direct)
    with agentkit.AgentKit(url) as kit:
        ids = kit.enqueue_many("count", list(range(1500)), strict=False)
        worker = """
            import sys, agentkit
            kit = agentkit.AgentKit(sys.argv[1])
            kit.task(name="count")(lambda n: n)
            kit.work(concurrency=4, until_idle=True)
            kit.close()
        """
        procs = [python_process(worker, url) for _ in range(3)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 3, errors
        jobs = [kit.job(i) for i in ids]
        assert {j.state for j in jobs} == {"done"}
        assert [j.attempts for j in jobs] == [1] * 1500
        assert [j.result for j in jobs] == list(range(1500))
        # an idle waiter hears a NOTIFY sent through the pooler on its direct connection
        kit.store.wait_for_change(0.01)
        heard = kit.store._signals
        woke = threading.Event()
        threading.Thread(target=lambda: (kit.store.wait_for_change(600), woke.set())).start()
        notifier = python_process(
            "import sys, agentkit; s = agentkit.open_store(sys.argv[1]); s.notify(); s.close()",
            url,
        )
        assert woke.wait(120), notifier.communicate(timeout=60)[1]
        assert kit.store._signals > heard


def test_a_claim_race_through_the_pooler_leases_each_job_once(pooled: tuple[str, str]) -> None:
    url, _ = pooled
    store = agentkit.open_store(url)
    at = store.now()
    store.insert_jobs(agentkit.NewJob("race", 0, at, at, 3, 1.0, None, None), ["null"] * 300)
    for i in range(40):
        store.insert_job(
            agentkit.NewJob("race", 0, at, at, 3, 1.0, None, f"t{i % 4}"), "null", None
        )
    claimed: dict[str, list[agentkit.Claimed]] = {}
    start = threading.Barrier(8)

    def claim(owner: str) -> None:
        start.wait()
        mine = claimed.setdefault(owner, [])
        while got := store.claim_jobs(owner, ["race"], 3, 60):
            mine += got

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [c for mine in claimed.values() for c in mine]
    assert len(every) == len({c.rowid for c in every}) == 300 + 4  # one running per target
    assert sorted(c.target for c in every if c.target) == ["t0", "t1", "t2", "t3"]
    running = {r["id"]: r["owner"] for r in store.rows("jobs") if r["state"] == "running"}
    assert running == {c.rowid: owner for owner, mine in claimed.items() for c in mine}
    store.close()
