"""What only the PostgreSQL engine has to prove: migrations applied once however many
processes start together, the database's clock for leases on hosts whose clocks are off,
LISTEN/NOTIFY wake-ups, and one running job per target refused by the database itself."""

import os
import subprocess
import sys
import threading

import psycopg
import pytest

import agentkit
from agentkit import job_rowid
from testkit import python_process, rows, wait_until


@pytest.fixture
def url(postgres_db: str) -> str:
    return postgres_db


def test_a_postgresql_url_opens_the_postgresql_engine(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        assert isinstance(kit.store, agentkit.PostgresStore)
        assert kit.store.version == kit.store.latest
        assert "password" not in kit.store.path
        assert kit.run_turn("cli:me", "hello").reply == "echo: hello"


def test_eight_processes_starting_at_once_migrate_once(url: str, tmp_path) -> None:
    go = tmp_path / "go"
    code = """
        import os, sys, time, agentkit
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.001)
        store = agentkit.open_store(sys.argv[1])
        print(store.version, len(store.tables()))
        store.close()
    """
    procs = [python_process(code, url, str(go)) for _ in range(8)]
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outputs]
    latest = agentkit.PostgresStore.latest
    answers = {out.strip() for out, _ in outputs}
    assert len(answers) == 1 and answers.pop().startswith(f"{latest} ")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM agentkit_schema").fetchall() == [(latest,)]


def test_leases_follow_the_database_clock_on_a_host_ten_minutes_ahead(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        job = kit.enqueue("slow", strict=False)
        skewed = """
            import sys, time, agentkit
            agentkit.now = lambda: time.time() + 600  # this host's clock runs 10 minutes ahead
            store = agentkit.open_store(sys.argv[1])
            [claimed] = store.claim_jobs("skewed", ["slow"], 1, 30)
            print(claimed.rowid)
            store.close()
        """
        out, err = python_process(skewed, url).communicate(timeout=60)
        assert out.strip() == job[4:], err
        [row] = [r for r in kit.store.rows("jobs") if r["id"] == int(job[4:])]
        # The lease runs 30 s on the database's clock (this host's), not 630 s.
        assert row["lease_until"] - kit.store.now() == pytest.approx(30, abs=10)
        # And a host whose clock is right cannot take the job over while the lease lasts.
        assert kit.store.claim_jobs("honest", ["slow"], 1, 30, sweep=True) == []


def test_a_host_ten_minutes_behind_does_not_take_over_a_live_lease(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        kit.enqueue("slow", strict=False)
        assert kit.store.claim_jobs("first", ["slow"], 1, 60)
        behind = """
            import sys, time, agentkit
            agentkit.now = lambda: time.time() - 600
            store = agentkit.open_store(sys.argv[1])
            store.requeue_expired()
            print(len(store.claim_jobs("late", ["slow"], 1, 30)))
            store.close()
        """
        out, err = python_process(behind, url).communicate(timeout=60)
        assert out.strip() == "0", err
        assert [r["owner"] for r in kit.store.rows("jobs")] == ["first"]


def test_a_notify_from_another_process_wakes_an_idle_waiter(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        kit.store.wait_for_change(0.01)  # the listener is up
        heard = kit.store._signals
        woke = threading.Event()

        def waiter() -> None:
            kit.store.wait_for_change(600)
            woke.set()

        threading.Thread(target=waiter, daemon=True).start()
        _, err = python_process(
            "import sys, agentkit; s = agentkit.open_store(sys.argv[1]); s.notify(); s.close()",
            url,
        ).communicate(timeout=60)
        assert woke.wait(120), err
        assert kit.store._signals > heard


def test_the_database_refuses_a_second_running_job_of_a_target(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        first = kit.enqueue("t", target="cli:me", strict=False)
        second = kit.enqueue("t", target="cli:me", strict=False)
        assert len(kit.store.claim_jobs("w", ["t"], 2, 30)) == 1
        with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("UPDATE jobs SET state = 'running' WHERE id = %s", (int(second[4:]),))
        assert kit.job(first).state == "running" and kit.job(second).state == "queued"


def test_a_claim_never_flags_a_job_after_the_end_of_its_targets_run_unflags_it(url: str) -> None:
    # Claims and results run side by side here: a claim that reads the target as running
    # while its job is ending leaves the waiting job unflagged, without waiting (a flag set
    # after the end that clears it would hide the job from every claim for good).
    with agentkit.AgentKit(url) as kit:
        store = kit.store
        _, second = kit.enqueue_many("t", [1, 2], target="x", strict=False)
        [held] = store.claim_jobs("a", ["t"], 1, 30)
        done = agentkit.JobEnd("done", "null", None, None, store.now(), held.rowid, held.attempt)
        claimed: list[agentkit.Claimed] = []

        def claim() -> None:
            claimed.extend(store.claim_jobs("b", ["t"], 1, 30))
            store.release_thread()

        with store.transaction():
            assert store.finish_jobs("a", [done]) == {held.rowid}
            claimer = threading.Thread(target=claim)  # reads x as running: the end is not in
            claimer.start()
            claimer.join(30)
            assert not claimer.is_alive()
        assert claimed == []
        assert rows(store, "jobs", "id", blocked=1) == []
        assert [c.rowid for c in store.claim_jobs("b", ["t"], 1, 30)] == [job_rowid(second)]


def test_a_workers_results_and_claims_do_not_wait_for_other_transactions(url: str) -> None:
    # Only `transaction()` takes the lock that serialises transactions: a worker's loop
    # (results and the next claim in one transaction) runs beside it.
    with agentkit.AgentKit(url) as kit, agentkit.AgentKit(url) as other:
        kit.enqueue_many("t", [1, 2], strict=False)
        [first] = kit.queue.claim("w", ["t"], 1, 30)
        claimed: list[agentkit.Claimed] = []

        def loop() -> None:
            claimed.extend(kit.queue.finish_and_claim("w", [(first, "ok", "1")], ["t"], 1, 30)[1])
            kit.store.release_thread()

        with other.store.transaction():
            worker = threading.Thread(target=loop)
            worker.start()
            worker.join(30)
            assert not worker.is_alive()
        assert [c.rowid for c in claimed] == [first.rowid + 1]
        assert kit.job(f"job_{first.rowid}").state == "done"


def test_four_processes_drain_two_thousand_jobs_each_once(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        ids = kit.enqueue_many("count", list(range(2000)), strict=False)
        worker = """
            import sys, agentkit
            kit = agentkit.AgentKit(sys.argv[1])
            kit.task(name="count")(lambda n: n)
            kit.work(until_idle=True)
            kit.close()
        """
        procs = [python_process(worker, url) for _ in range(4)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors
        jobs = [kit.job(i) for i in ids]
        assert {j.state for j in jobs} == {"done"}
        assert [j.attempts for j in jobs] == [1] * 2000
        assert [j.result for j in jobs] == list(range(2000))


def test_a_worker_that_loses_its_connection_reconnects(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        kit.enqueue("t", 1, strict=False)
        pid = kit.store.connection().info.backend_pid
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            gone = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
            wait_until(lambda: conn.execute(gone, (pid,)).fetchone() == (0,), what="the cut")
        with pytest.raises(agentkit.StoreError):
            kit.store.claim_jobs("w", ["t"], 1, 30)
        assert len(kit.store.claim_jobs("w", ["t"], 1, 30)) == 1  # on a new connection


def populate(db: object) -> None:
    """A little of everything: a turn with an approved call, jobs, a schedule, a lock."""
    model = agentkit.ScriptedModel([agentkit.ToolCall("restart", {"service": "web"}), "ok"])
    kit = agentkit.AgentKit(db, model=model)

    @kit.tool(approval=True)
    def restart(service: str) -> str:
        """Restart a service."""
        return f"restarted {service}"

    waiting = kit.run_turn("cli:me", "restart web")
    kit.approve(waiting.approvals[0].id, actor="cli:ops")
    kit.enqueue_many("later", [1, 2, 3], delay=3600, strict=False)
    kit.schedule("morning", cron="0 9 * * 1-5", tz="Europe/Paris", thread="cli:me", prompt="hi")
    kit.store.acquire_lock("deploy", "me", 30)
    kit.close()


def contents(store: agentkit.Store) -> dict[str, list[dict]]:
    return {table: store.rows(table) for table in store.tables()}


def test_copy_moves_a_database_to_postgresql_and_back_row_for_row(url: str, tmp_path) -> None:
    populate(tmp_path / "a.db")
    with agentkit.AgentKit(tmp_path / "a.db") as kit:
        original = contents(kit.store)
    assert all(original[t] for t in ("turns", "messages", "calls", "approvals", "jobs"))
    source = agentkit.open_store(tmp_path / "a.db")
    target = agentkit.open_store(url)
    copied = agentkit.copy_store(source, target)
    assert copied == {t: len(rows) for t, rows in original.items()}
    assert contents(target) == original
    back = agentkit.open_store(tmp_path / "b.db")
    agentkit.copy_store(target, back)
    assert contents(back) == original
    # the copy goes on working: new rows get new ids after the copied ones
    new = target.insert_job(agentkit.NewJob("x", 0, 0.0, 0.0, 3, 1.0, None, None), "{}", None)
    assert new > max(r["id"] for r in original["jobs"])
    for store in (source, target, back):
        store.close()


def test_copy_refuses_a_database_that_is_not_empty_and_writes_nothing(url: str, tmp_path) -> None:
    populate(tmp_path / "a.db")
    with agentkit.AgentKit(url) as kit:
        kit.run_turn("cli:other", "hello")
        before = contents(kit.store)
        source = agentkit.open_store(tmp_path / "a.db")
        with pytest.raises(agentkit.BadInput, match="is not empty"):
            agentkit.copy_store(source, kit.store)
        assert contents(kit.store) == before
        source.close()


def test_a_shared_database_needs_the_secret_key_and_web_token_from_the_environment(
    url: str, monkeypatch
) -> None:
    monkeypatch.delenv("AGENTKIT_SECRET_KEY", raising=False)
    monkeypatch.delenv("AGENTKIT_WEB_TOKEN", raising=False)
    with agentkit.AgentKit(url) as kit:
        with pytest.raises(agentkit.StoreError, match="set AGENTKIT_SECRET_KEY"):
            kit.request_secret("cli:me", fields=["TOKEN"], reason="deploy", actor="cli:me")
        assert kit.store.row_counts()["secret_requests"] == 0
        with pytest.raises(agentkit.StoreError, match="set AGENTKIT_WEB_TOKEN"):
            agentkit.WebChat().choose_token(kit.store.path, "http://127.0.0.1:8765")
        monkeypatch.setenv("AGENTKIT_SECRET_KEY", "k" * 40)
        kit.request_secret("cli:me", fields=["TOKEN"], reason="deploy", actor="cli:me")
        assert kit.store.row_counts()["secret_requests"] == 1


def test_the_cli_copies_a_file_into_postgresql_and_reads_it_through_agentkit_db(
    url: str, tmp_path
) -> None:
    populate(tmp_path / "a.db")
    cli = [sys.executable, "-m", "agentkit"]
    copied = subprocess.run(
        [*cli, "copy", str(tmp_path / "a.db"), url], capture_output=True, text=True
    )
    assert copied.returncode == 0, copied.stderr
    assert "turns 1" in copied.stdout and "password" not in copied.stdout
    again = subprocess.run(
        [*cli, "copy", str(tmp_path / "a.db"), url], capture_output=True, text=True
    )
    assert again.returncode == 2 and "is not empty" in again.stderr
    listed = subprocess.run(
        [*cli, "threads"], capture_output=True, text=True, env={**os.environ, "AGENTKIT_DB": url}
    )
    assert listed.returncode == 0 and "cli:me" in listed.stdout, listed.stderr


def test_lease_sweeps_skip_the_rows_another_transaction_holds(url: str) -> None:
    # a renewal or an expiry sweep that waited for a finishing worker's row locks could
    # deadlock with it (the rows taken in another order): they take only what is free
    store = agentkit.open_store(url)
    at = store.now()
    new = agentkit.NewJob("t", 0, at, at, 3, 1.0, None, None)
    store.insert_jobs(new, ["1", "2"])
    claimed = store.claim_jobs("w", ["t"], 2, 30)
    held, free = claimed[0].rowid, claimed[1].rowid
    with psycopg.connect(url) as other:
        other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (held,))
        done = threading.Event()

        def sweep() -> None:
            store.extend_leases("w", 60)
            store.extend_lease(free, "w", 1, -60)
            store.requeue_expired()
            store.release_thread()
            done.set()

        threading.Thread(target=sweep, daemon=True).start()
        assert done.wait(30), "a sweep waited for a row another transaction holds"
    jobs = {r["id"]: r for r in store.rows("jobs")}
    assert jobs[held]["state"] == "running" and jobs[held]["lease_until"] < at + 45  # skipped
    assert jobs[free]["state"] == "queued"  # renewed, then ran out and swept
    store.close()


def test_a_worker_whose_connections_are_cut_goes_on_and_loses_nothing(url: str) -> None:
    with agentkit.AgentKit(url) as kit:
        pids: set[int] = set()

        @kit.task(name="count")
        def count(n: int) -> int:
            pids.add(kit.store.connection().info.backend_pid)
            if n == 50:  # every connection of this process is cut in the middle of the work
                with psycopg.connect(url, autocommit=True) as admin:
                    for pid in pids:
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            return n

        ids = kit.enqueue_many("count", list(range(200)))
        assert kit.work(until_idle=True) >= 200
        assert [kit.job(i).result for i in ids] == list(range(200))
        assert {kit.job(i).state for i in ids} == {"done"}
