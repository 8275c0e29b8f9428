"""Claims read only the jobs they can take: foreign backlog, blocked targets, claims by id."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

import agentkit
from agentkit import AgentKit
from testkit import Database, count, rows

ROOT = Path(__file__).resolve().parent
OWNER = "tester"


@pytest.fixture
def kit(db: Database):
    with AgentKit(db) as kit:
        yield kit


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """agentkit's clock, moved by hand."""
    at = [1_000_000.0]
    monkeypatch.setattr(agentkit, "now", lambda: at[0])
    return at


def vm_steps(kit: AgentKit, action: Callable[[], object]) -> int:
    """How many SQLite VM instructions `action` ran on this thread's connection (a count of
    the rows and index entries it visited, up to a constant per statement)."""
    steps = [0]

    def count() -> bool:
        steps[0] += 1
        return False  # go on

    conn = kit.store.connection()
    conn.set_progress_handler(count, 1)
    try:
        action()
    finally:
        conn.set_progress_handler(None)
    return steps[0]


def claim(kit: AgentKit, names: list[str], only: int | None = None) -> list[agentkit.Claimed]:
    return kit.queue.claim(OWNER, names, 1, 30.0, only=only)


def claim_into(found: list, kit: AgentKit, names: list[str], only: int | None = None) -> None:
    found.extend(claim(kit, names, only))


def kit_with_backlog(path: Path, foreign: int) -> AgentKit:
    """A kit with one `mine` job behind `foreign` ready jobs of a task it does not take."""
    kit = AgentKit(path)
    kit.task(lambda payload: None, name="mine")
    kit.enqueue_many("other", list(range(foreign)), strict=False, priority=1)
    kit.enqueue("mine")
    return kit


@pytest.mark.sqlite_only("counts SQLite's VM instructions")
def test_a_claim_reads_no_ready_jobs_of_other_tasks(tmp_path: Path) -> None:
    costs = {}
    for foreign in (10, 10_000):
        with kit_with_backlog(tmp_path / f"{foreign}.db", foreign) as kit:
            [mine] = rows(kit, "jobs", "id", name="mine")
            claimed: list[agentkit.Claimed] = []
            by_id = vm_steps(kit, functools.partial(claim_into, claimed, kit, ["mine"], mine))
            again = agentkit.JobEnd("queued", None, "again", 0.0, None, mine, 1)  # ready again
            assert kit.store.finish_jobs(OWNER, [again]) == {mine}
            by_name = vm_steps(kit, lambda: claim(kit, ["mine"]))
            assert kit.job(f"job_{mine}").state == "running"
            idle = vm_steps(kit, lambda: claim(kit, ["mine"]))  # an idle worker's poll
            costs[foreign] = (by_id, by_name, idle)
    for small, big in zip(costs[10], costs[10_000], strict=True):
        assert big <= small * 1.05 + 20, costs  # 10,000 rows read would cost far more


@pytest.mark.sqlite_only("reads SQLite's query plans")
def test_a_claim_by_id_is_a_rowid_lookup(kit: AgentKit) -> None:
    engine = agentkit.SQLiteStore

    def plan(sql: str, params: tuple) -> list[tuple]:
        return kit.store.connection().execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()

    assert "USING INTEGER PRIMARY KEY" in plan(engine.READY_BY_ID_SQL, (1, 0.0))[0][3]
    for sql, params in [
        (engine.READY_SQL, ("t", 0, 0.0, 1)),
        (engine.NEXT_PRIORITY_SQL, ("t", 1)),
        (engine.BEST_PRIORITIES_SQL, ('["t"]',)),
    ]:
        plan = kit.store.connection().execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
        assert any("INDEX jobs_ready (name=?" in row[3] for row in plan), plan


@pytest.mark.sqlite_only("counts SQLite's VM instructions")
@pytest.mark.parametrize("queued_first", [True, False], ids=["queued-then-run", "run-then-queued"])
def test_jobs_blocked_behind_a_running_target_are_skipped_without_a_scan(
    tmp_path: Path, queued_first: bool
) -> None:
    costs = {}
    for blocked in (10, 10_000):
        with AgentKit(tmp_path / f"{blocked}-{queued_first}.db") as kit:
            kit.task(lambda payload: None, name="t")
            head = kit.enqueue("t", target="busy", priority=1)
            if queued_first:
                kit.enqueue_many("t", list(range(blocked)), target="busy", priority=1)
            assert [j.rowid for j in claim(kit, ["t"])] == [agentkit.job_rowid(head)]
            if not queued_first:
                kit.enqueue_many("t", list(range(blocked)), target="busy", priority=1)
            claim(kit, ["t"])  # meets the blocked jobs queued before their target ran, if any
            runs = []
            for _ in range(3):
                kit.enqueue("t", target="free")
                free: list[agentkit.Claimed] = []
                runs.append(vm_steps(kit, functools.partial(claim_into, free, kit, ["t"])))
                assert kit.queue.finish(OWNER, [(free[0], "ok", "null")]) == {free[0].rowid: "done"}
            costs[blocked] = max(runs)
            assert rows(kit, "jobs", "state").count("running") == 1
    assert costs[10_000] <= costs[10] * 1.05 + 20, costs


def run_target(kit: AgentKit) -> agentkit.Claimed:
    """Claim the target's first job and queue another behind it, which must stay blocked."""
    kit.task(lambda payload: None, name="t")
    kit.enqueue("t", "first", target="x")
    kit.enqueue("t", "second", target="x")
    (first,) = claim(kit, ["t"])
    assert first.payload == "first" and first.target == "x"
    assert claim(kit, ["t"]) == []
    [second] = rows(kit, "jobs", "id", payload='"second"')
    assert claim(kit, ["t"], only=second) == []
    assert rows(kit, "jobs", "blocked", id=second) == [1]
    return first


@pytest.mark.sqlite_only("the blocked flag that SQLite's claims set (test_store.py has the rest)")
@pytest.mark.parametrize("outcome", ["ok", "error", "fail", "lease expired"])
def test_a_blocked_job_is_claimable_when_its_target_frees(
    kit: AgentKit, clock: list[float], outcome: str
) -> None:
    first = run_target(kit)
    if outcome == "lease expired":
        clock[0] += 60.0  # past the 30 s lease and the next sweep: first is queued again
    else:
        kit.queue.finish(OWNER, [(first, outcome, "null" if outcome == "ok" else "boom")])
    (claimed,) = claim(kit, ["t"])
    assert claimed.payload == ("first" if outcome == "lease expired" else "second")
    assert count(kit, "jobs", blocked=1) == 0
    assert claim(kit, ["t"]) == []  # the other one waits: its target runs again


def test_priorities_then_fifo_hold_across_task_names(kit: AgentKit) -> None:
    order = []
    for name in ("a", "b"):
        kit.task(lambda payload: order.append(payload), name=name)
    kit.enqueue("a", "a-low-1")
    kit.enqueue("b", "b-high-1", priority=2)
    kit.enqueue("b", "b-low-2")
    kit.enqueue("a", "a-mid-1", priority=1)
    kit.enqueue("a", "a-high-2", priority=2)
    kit.enqueue("c", "foreign", priority=9, strict=False)
    kit.enqueue("a", "a-low-3")
    claimed = kit.queue.claim(OWNER, ["a", "b"], 64, 30.0)
    assert [job.payload for job in claimed] == [
        "b-high-1",
        "a-high-2",
        "a-mid-1",
        "a-low-1",
        "b-low-2",
        "a-low-3",
    ]


@pytest.mark.sqlite_only("an SQLite file written at schema 5")
def test_an_old_database_is_upgraded_with_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    conn = apsw.Connection(str(path))
    for number, migration in enumerate(agentkit.MIGRATIONS[:5], start=1):
        conn.execute(migration)
        conn.execute(f"PRAGMA user_version={number}")
    insert = (
        "INSERT INTO jobs (name, payload, state, priority, run_at, created_at, retries, "
        "backoff, target, owner, lease_until) VALUES (?, ?, ?, 0, 0, 0, 3, 1, ?, ?, ?)"
    )
    conn.execute(insert, ("t", '"running"', "running", "x", "gone", 1e12))
    conn.execute(insert, ("t", '"waiting"', "queued", "x", None, None))
    conn.execute(insert, ("t", '"free"', "queued", None, None, None))
    conn.execute(insert, ("t", '"old"', "done", None, None, None))
    conn.close()
    with AgentKit(path) as kit:
        assert kit.store.version == len(agentkit.MIGRATIONS) == kit.store.latest
        assert kit.store.job_counts() == {"running": 1, "queued": 2, "done": 1}
        kit.task(lambda payload: None, name="t")
        assert [job.payload for job in kit.queue.claim(OWNER, ["t"], 64, 30.0)] == ["free"]
        [gone] = rows(kit, "jobs", "id", owner="gone")
        assert kit.store.extend_lease(gone, "gone", 0, -2e12)  # its lease runs out
        kit.queue._next_sweep = 0.0
        assert [job.payload for job in claim(kit, ["t"])] == ["running"]


def test_jobs_of_one_target_never_overlap_across_processes(db: Database) -> None:
    with AgentKit(db) as kit:
        kit.task(lambda payload: None, name="spell")
        for target in ("a", "b", "c"):
            kit.enqueue_many("spell", [target] * 15, target=target)
    code = """
        import sys, time, agentkit
        kit = agentkit.AgentKit(sys.argv[1])
        spans = []
        @kit.task
        def spell(payload):
            began = time.monotonic()
            time.sleep(0.003)
            spans.append(f"{payload} {began} {time.monotonic()}")
        kit.work(until_idle=True, concurrency=2)
        print("\\n".join(spans))
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(db)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    spans: dict[str, list[tuple[float, float]]] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        for line in out.split("\n"):
            if line:
                target, began, ended = line.split()
                spans.setdefault(target, []).append((float(began), float(ended)))
    assert sorted(len(s) for s in spans.values()) == [15, 15, 15]
    for runs in spans.values():
        runs.sort()
        assert all(ended <= began for (_, ended), (began, _) in itertools.pairwise(runs))
    with AgentKit(db) as kit:
        assert kit.store.job_counts() == {"done": 45}
        assert count(kit, "jobs", blocked=1) == 0


def test_healthz_does_not_count_jobs_and_doctor_says_how_long_counting_took(
    kit: AgentKit,
) -> None:
    kit.enqueue_many("t", list(range(100)), strict=False)
    assert "jobs" not in kit.health()
    report = kit.doctor()
    assert report["jobs"] == {"queued": 100}
    assert report["counting seconds"] >= 0


def test_a_turn_queued_behind_a_cancelled_running_turn_runs_after_it(db: Database) -> None:
    entered, release = threading.Event(), threading.Event()
    model = agentkit.ScriptedModel([agentkit.ToolCall("wait", {}), "second answer"])
    with AgentKit(db, model=model) as kit:

        @kit.tool
        def wait() -> str:
            entered.set()
            release.wait(30)
            return "waited"

        runner = threading.Thread(target=kit.run_turn, args=("cli:me", "first"))
        runner.start()
        assert entered.wait(30)
        second = kit.run_turn("cli:me", "second", wait=False)
        job = kit.engine.records.turn(second.turn_id).job_id
        assert rows(kit, "jobs", "blocked", id=job) == [1]
        [first] = rows(kit, "turns", "id", text="first")
        kit.cancel(first)
        release.set()
        runner.join()
        assert kit.turn(first).status == "cancelled"
        assert rows(kit, "jobs", "blocked", id=job) == [0]
        kit.work(until_idle=True)
        assert kit.turn(second.turn_id).reply == "second answer"


@pytest.mark.sqlite_only("an SQLite connection option")
def test_connections_keep_plans_stable_across_binds(kit: AgentKit) -> None:
    # without it, SQLite re-prepares the claim's statements at every bind
    assert kit.store.connection().config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, -1) == 1
