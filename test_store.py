"""The store contract, exercised directly: what every engine must do, table by table.

The `store` fixture gives each test a fresh store of every engine (an SQLite file, and a
schema of the PostgreSQL server of conftest.py), so each test runs against both, and
against any engine that implements `agentkit.Store` when it is added to the fixture.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentkit
from agentkit import NewJob, Store
from testkit import open_test_store, rows


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store of each engine."""
    where = request.getfixturevalue("postgres_db") if request.param != "sqlite" else tmp_path
    opened = open_test_store(where)
    yield opened
    opened.close()


def job(
    store: Store,
    name: str = "t",
    *,
    priority: int = 0,
    later: float = 0.0,
    retries: int = 3,
    target: str | None = None,
) -> NewJob:
    """The values of a job due `later` seconds from now."""
    at = store.now()
    return NewJob(name, priority, at + later, at, retries, 1.0, None, target)


def add(store: Store, *jobs: NewJob) -> list[int]:
    return [store.insert_job(values, "{}", None) for values in jobs]


def lapse(store: Store, claimed: agentkit.Claimed, owner: str) -> None:
    """Let a held lease run out (as when its worker stops)."""
    assert store.extend_lease(claimed.rowid, owner, claimed.attempt, -60)


def ended(claimed: agentkit.Claimed, state: str = "done", result: str = '"ok"') -> agentkit.JobEnd:
    return agentkit.JobEnd(state, result, None, None, 1.0, claimed.rowid, claimed.attempt)


# ───────────────────────────────────────── jobs ─────────────────────────────────────────


def test_a_claimed_job_is_finished_only_by_its_owner_at_its_attempt(store: Store) -> None:
    [rowid] = add(store, job(store))
    [claimed] = store.claim_jobs("a", ["t"], 10, 30)
    assert (claimed.rowid, claimed.attempt, claimed.payload) == (rowid, 1, {})
    assert store.holds_job(rowid, "a", 1) and not store.holds_job(rowid, "b", 1)
    assert not store.extend_lease(rowid, "b", 1, 30)
    assert store.finish_jobs("b", [ended(claimed)]) == set()  # another owner
    stale = agentkit.JobEnd("done", '"late"', None, None, 1.0, rowid, 2)
    assert store.finish_jobs("a", [stale]) == set()  # another attempt
    assert store.job(rowid).state == "running"
    assert store.finish_jobs("a", [ended(claimed)]) == {rowid}
    assert store.finish_jobs("a", [ended(claimed, result='"twice"')]) == set()
    finished = store.job(rowid)
    assert (finished.id, finished.state, finished.result) == (f"job_{rowid}", "done", "ok")
    assert not store.holds_job(rowid, "a", 1)


def test_a_lapsed_lease_is_claimed_again_and_the_stale_attempt_refused(store: Store) -> None:
    [rowid] = add(store, job(store))
    [first] = store.claim_jobs("a", ["t"], 1, 30)
    assert store.claim_jobs("b", ["t"], 1, 30) == []  # running: nobody else gets it
    lapse(store, first, "a")
    assert store.claim_jobs("b", ["t"], 1, 30) == []  # a lapsed lease waits for a sweep
    [second] = store.claim_jobs("a", ["t"], 1, 30, sweep=True)  # the same owner, again
    assert (second.rowid, second.attempt) == (rowid, 2)
    assert store.job(rowid).last_error.startswith("lease expired")
    assert store.finish_jobs("a", [ended(first)]) == set()
    assert not store.extend_lease(rowid, "a", 1, 30)
    assert store.finish_jobs("a", [ended(second)]) == {rowid}


def test_a_lapsed_lease_out_of_attempts_makes_the_job_dead(store: Store) -> None:
    [rowid] = add(store, job(store, retries=0))
    [claimed] = store.claim_jobs("a", ["t"], 1, 30)
    lapse(store, claimed, "a")
    assert store.requeue_expired() == 1
    assert store.job(rowid).state == "dead"
    assert store.claim_jobs("a", ["t"], 1, 30, sweep=True) == []


def test_one_running_job_per_target(store: Store) -> None:
    first, second, other = add(
        store, job(store, target="x"), job(store, target="x"), job(store, target="y")
    )
    claimed = store.claim_jobs("a", ["t"], 10, 30)
    assert [c.rowid for c in claimed] == [first, other]
    assert store.claim_jobs("b", ["t"], 10, 30) == []  # x runs, y runs
    assert store.finish_jobs("a", [ended(claimed[0])]) == {first}
    assert [c.rowid for c in store.claim_jobs("b", ["t"], 10, 30)] == [second]


def test_a_claim_flags_the_jobs_behind_a_running_target_until_its_job_ends(store: Store) -> None:
    first, second, third = add(store, *[job(store, target="x") for _ in range(3)])
    [claimed] = store.claim_jobs("a", ["t"], 10, 30)  # one per target: the others wait
    assert claimed.rowid == first
    assert store.claim_jobs("b", ["t"], 10, 30) == []  # meets them while x runs: flagged
    assert rows(store, "jobs", "id", blocked=1) == [second, third]
    assert store.finish_jobs("a", [ended(claimed)]) == {first}
    assert rows(store, "jobs", "id", blocked=1) == []
    assert [c.rowid for c in store.claim_jobs("b", ["t"], 10, 30)] == [second]


def test_a_batch_claim_takes_priority_then_age_and_only_ready_jobs_of_its_names(
    store: Store,
) -> None:
    low, high, later, other, middle = add(
        store,
        job(store),
        job(store, priority=5),
        job(store, priority=9, later=3600),
        job(store, "other", priority=9),
        job(store, priority=1),
    )
    assert [c.rowid for c in store.claim_jobs("a", ["t"], 2, 30)] == [high, middle]
    assert [c.rowid for c in store.claim_jobs("a", ["t"], 10, 30)] == [low]
    assert store.claim_jobs("a", ["t"], 10, 30) == []
    assert store.job(later).state == store.job(other).state == "queued"
    assert [c.rowid for c in store.claim_jobs("a", ["t", "other"], 10, 30)] == [other]


def test_a_claim_of_one_job_takes_only_that_one_when_ready(store: Store) -> None:
    first, second, later = add(store, job(store), job(store), job(store, later=3600))
    assert store.claim_jobs("a", ["t"], 1, 30, only=later) == []
    assert [c.rowid for c in store.claim_jobs("a", ["t"], 1, 30, only=second)] == [second]
    assert store.claim_jobs("a", ["t"], 1, 30, only=second) == []  # running now
    assert store.job(first).state == "queued"


def test_finishing_a_batch_records_each_outcome(store: Store) -> None:
    ok, retried, failed = add(store, job(store), job(store), job(store))
    claimed = store.claim_jobs("a", ["t"], 3, 30)
    retry_at = store.now() + 600
    ends = [
        ended(claimed[0]),
        agentkit.JobEnd("queued", None, "boom", retry_at, None, retried, 1),
        agentkit.JobEnd("failed", None, "no", None, 1.0, failed, 1),
    ]
    assert store.finish_jobs("a", ends) == {ok, retried, failed}
    again = store.job(retried)
    assert (again.state, again.last_error, again.run_at) == ("queued", "boom", retry_at)
    assert store.job(failed).state == "failed"
    assert store.job_counts() == {"done": 1, "queued": 1, "failed": 1}


def test_a_key_enqueues_once_and_bulk_ids_come_in_order(store: Store) -> None:
    first = store.insert_job(job(store), '{"n": 1}', "k")
    assert store.insert_job(job(store), '{"n": 2}', "k") == first
    assert store.job_with_key("k") == first and store.job_with_key("nope") is None
    assert store.job(first).payload == {"n": 1}
    ids = store.insert_jobs(job(store), [f'{{"n": {n}}}' for n in range(5)])
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [store.job(rowid).payload["n"] for rowid in ids] == list(range(5))
    assert [j.id for j in store.jobs(None, 2)] == [f"job_{ids[-1]}", f"job_{ids[-2]}"]


def test_heartbeats_extend_every_lease_an_owner_holds(store: Store) -> None:
    add(store, job(store), job(store))
    claimed = store.claim_jobs("a", ["t"], 2, 30)
    for c in claimed:
        lapse(store, c, "a")
    store.extend_leases("a", 30)
    assert store.requeue_expired() == 0
    assert all(store.holds_job(c.rowid, "a", 1) for c in claimed)


def test_cancel_and_requeue_move_only_from_their_states(store: Store) -> None:
    queued, running = add(store, job(store), job(store))
    store.claim_jobs("a", ["t"], 1, 30, only=running)
    assert store.cancel_job(running) == "running"
    assert store.job(running).state == "running"
    assert store.cancel_job(queued) == "queued"
    assert store.job(queued).state == "cancelled"
    assert store.requeue_job(queued) == "cancelled" and store.job(queued).state == "cancelled"
    assert store.cancel_job(10**9) is None and store.requeue_job(10**9) is None


# ───────────────────────────────────────── locks ─────────────────────────────────────────


def test_a_lock_has_one_holder_and_its_token_grows(store: Store) -> None:
    assert store.acquire_lock("deploy", "a", 30) == 1
    assert store.acquire_lock("deploy", "b", 30) is None
    assert store.holds_lock("deploy", "a", 1) and not store.holds_lock("deploy", "b", 1)
    assert not store.renew_lock("deploy", "b", 1, 30)
    assert not store.release_lock("deploy", "a", 2)
    assert store.renew_lock("deploy", "a", 1, 30)
    assert store.release_lock("deploy", "a", 1)
    assert not store.holds_lock("deploy", "a", 1)
    assert store.acquire_lock("deploy", "b", -1) == 2  # taken, and lapsed at once
    assert not store.renew_lock("deploy", "b", 2, 30)
    assert store.acquire_lock("deploy", "a", 30) == 3
    assert store.acquire_lock("other", "a", 30) == 1


# ─────────────────────────────────────── schedules ───────────────────────────────────────


def test_a_schedule_is_advanced_in_the_transaction_that_enqueues_its_run(store: Store) -> None:
    due = store.now() - 1
    store.put_schedule("s", "every", "60.0", "UTC", "t", "{}", due)
    [s] = store.due_schedules(store.now())
    with pytest.raises(RuntimeError), store.transaction():
        assert store.advance_schedule("s", s.next_due, due + 60)
        store.insert_job(job(store), "{}", f"schedule:s:{due}")
        raise RuntimeError("the process dies before its commit")
    assert store.schedule("s").next_due == due and store.job_with_key(f"schedule:s:{due}") is None
    with store.transaction():
        assert store.advance_schedule("s", s.next_due, due + 60)
        store.insert_job(job(store), "{}", f"schedule:s:{due}")
    assert not store.advance_schedule("s", s.next_due, due + 60)  # advanced already
    assert store.schedule("s").last_due == due and store.job_with_key(f"schedule:s:{due}")
    assert store.due_schedules(store.now()) == []


def test_putting_an_unchanged_schedule_keeps_its_due_time(store: Store) -> None:
    store.put_schedule("s", "every", "60.0", "UTC", "t", "{}", 100.0)
    store.put_schedule("s", "every", "60.0", "UTC", "t", "{}", 200.0)
    assert store.schedule("s").next_due == 100.0
    assert store.pause_schedule("s", True, None) and store.schedule("s").paused
    assert store.due_schedules(1000.0) == []
    store.put_schedule("s", "every", "30.0", "UTC", "t", "{}", 300.0)  # changed: runs again
    changed = store.schedule("s")
    assert (changed.spec, changed.next_due, changed.paused) == ("30.0", 300.0, False)
    assert store.pause_schedule("s", False, 400.0) and store.schedule("s").next_due == 400.0
    assert [s.name for s in store.schedules()] == ["s"]
    assert store.delete_schedule("s") and not store.delete_schedule("s")
    assert not store.pause_schedule("s", True, None) and store.schedule("s") is None


# ────────────────────────────── turns, messages, tool calls ──────────────────────────────


def turn(store: Store, thread: str = "cli:me", source_id: str | None = None) -> agentkit.TurnRow:
    turn_id = agentkit.new_id("turn")
    store.insert_turn(turn_id, thread, "cli:me", "hi", "cli", source_id, '{"m": 1}')
    return store.turn(turn_id)


def test_turns_move_only_from_the_status_they_are_in(store: Store) -> None:
    t = turn(store, source_id="u1")
    assert (t.status, t.meta, t.cancel_requested) == ("queued", {"m": 1}, False)
    assert store.turn_from("cli", "u1").id == t.id and store.turn_from("cli", "u2") is None
    assert store.held_turns("cli:me") == [t.id] == store.active_turns("cli:me")
    store.set_turn_job(t.id, 7)
    assert store.held_turns("cli:me") == []
    assert store.move_turn(t.id, "queued", "running")
    assert not store.move_turn(t.id, "queued", "running")
    assert store.running_threads("cli") == ["cli:me"] and store.running_threads("cl") == []
    store.request_cancel(t.id)
    store.count_step(t.id, 3, 4)
    ended_turn = store.end_turn(t.id, "done", "bye", None, 1.0)
    assert (ended_turn.status, ended_turn.reply, ended_turn.steps) == ("done", "bye", 1)
    assert (ended_turn.input_tokens, ended_turn.output_tokens) == (3, 4)
    assert ended_turn.cancel_requested and store.active_turns("cli:me") == []
    assert [thread for thread, _ in store.threads(10)] == ["cli:me"]
    turn(store, "cli:mine")
    assert store.thread_ids("cli:m") == ["cli:me", "cli:mine"] and store.thread_ids("x") == []


def test_thread_summaries_list_a_prefix_newest_first_titled_by_the_first_message(
    store: Store,
) -> None:
    for thread, text in [
        ("web:a", "/help"),
        ("web:a", "plan a trip"),
        ("web:a", "and a second message"),
        ("cli:me", "not listed"),
        ("web:b", "/status"),
    ]:
        store.insert_turn(agentkit.new_id("turn"), thread, "web:owner", text, "web", None, None)
    listed = store.thread_summaries("web:", 10)
    assert [(s.id, s.title) for s in listed] == [("web:b", None), ("web:a", "plan a trip")]
    assert listed[0].updated_at >= listed[1].updated_at
    assert [s.id for s in store.thread_summaries("web:", 1)] == ["web:b"]
    assert store.thread_summaries("x", 10) == []


def test_messages_and_calls_come_back_in_order_and_a_call_is_claimed_once(store: Store) -> None:
    t = turn(store)
    user = store.add_message(t.thread_id, t.id, "user", "hi", False)
    store.add_message(t.thread_id, t.id, "user", "/ping", True)
    reply = store.add_message(t.thread_id, t.id, "assistant", None, False)
    assert user < reply
    calls = [("c1", "add", "{}", "pending", None), ("c2", "mul", "{}", "waiting", None)]
    store.add_calls(t.id, reply, calls)
    assert [(m.id, m.role) for m in store.messages(t.thread_id, 10)] == [
        (reply, "assistant"),
        (user, "user"),
    ]
    assert [c.call_id for c in store.calls_of([reply])] == ["c1", "c2"]
    assert store.claim_call(t.id, "c1") and not store.claim_call(t.id, "c1")
    assert not store.set_call(t.id, "c1", "done", "3", "pending")
    assert store.set_call(t.id, "c1", "done", "3", "running")
    assert [c.call_id for c in store.calls(t.id, open_only=True)] == ["c2"]
    assert [(c.state, c.result) for c in store.calls(t.id)] == [("done", "3"), ("waiting", None)]


def file_row(turn_id: str | None, *, scope: str = "cli:me", sha256: str = "ab" * 32, **more):
    values = {"message_id": None, "call_id": None, "origin": "user", "id": agentkit.new_id("att")}
    values |= {"name": "a.png", "mime": "image/png", "size": 3, "sha256": sha256} | more
    return agentkit.FileRow(scope, turn_id, **values)


def test_files_belong_to_their_scope_and_their_contents_are_kept_once(store: Store) -> None:
    t = turn(store)
    data = bytes(range(256)) * 3  # every byte value survives the round trip
    with store.transaction():
        store.put_blob(agentkit.Blob("ab" * 32, len(data), data))
        store.put_blob(agentkit.Blob("ab" * 32, len(data), b"other"))  # kept once: a no-op
        store.put_blob(agentkit.Blob("cd" * 32, 10, None))  # kept beside the database
        sent = file_row(t.id)
        store.add_attachment(sent)
    assert store.blob("ab" * 32) == agentkit.Blob("ab" * 32, len(data), data)
    assert store.blob("cd" * 32).data is None and store.blob("ef" * 32) is None
    assert store.attachment(sent.id, "cli:me") == sent
    assert store.attachment(sent.id, "cli:other") is None  # another scope never sees it
    message = store.add_message(t.thread_id, t.id, "user", "hi", False)
    store.link_attachments(t.id, message)
    assert store.attachments_of([message]) == [dataclasses.replace(sent, message_id=message)]
    assert [row.id for row in store.turn_attachments(t.id)] == [sent.id]
    upload = file_row(None, sha256="cd" * 32)  # an upload no message took
    store.add_attachment(upload)
    assert store.prune_files(store.now() - 60) == (0, [])  # too young to go
    assert store.prune_files(store.now() + 1) == (1, [agentkit.Blob("cd" * 32, 10, None)])
    assert store.blob("ab" * 32) is not None and store.attachment(upload.id, "cli:me") is None


def test_an_upload_is_taken_once_and_only_in_its_scope(store: Store) -> None:
    t, other = turn(store), turn(store)
    upload = file_row(None)
    store.add_attachment(upload)
    assert store.claim_uploads([upload.id], "cli:else", t.id) == 0
    assert store.claim_uploads([upload.id], "cli:me", t.id) == 1
    assert store.claim_uploads([upload.id], "cli:me", other.id) == 0
    assert store.attachment(upload.id, "cli:me").turn_id == t.id


def test_a_queued_turn_is_postponed_with_its_job_but_not_once_started(store: Store) -> None:
    t = turn(store)
    [rowid] = add(store, job(store, "agentkit.turn"))
    store.set_turn_job(t.id, rowid)
    assert store.postpone_turn(t.id, "hi\nmore", store.now() + 500)
    assert store.turn(t.id).text == "hi\nmore"
    assert store.claim_jobs("w", ["agentkit.turn"], 1, 30) == []  # not due yet
    assert store.move_turn(t.id, "queued", "running")
    assert not store.postpone_turn(t.id, "late", store.now())
    assert store.turn(t.id).text == "hi\nmore"


def test_a_compaction_is_added_only_over_the_latest_and_deletes_no_message(store: Store) -> None:
    t = turn(store)
    ids = [store.add_message(t.thread_id, t.id, "user", f"m{i}", False) for i in range(4)]
    store.add_message(t.thread_id, t.id, "user", "/ping", True)
    store.set_message_tokens(ids[1], 1234)
    assert store.last_compaction(t.thread_id) is None
    first = store.add_compaction(t.thread_id, "s1", ids[2], ids[3], 900, "auto", None)
    assert (first.summary, first.first_kept, first.last_message) == ("s1", ids[2], ids[3])
    assert (first.tokens_before, first.made_by, first.thread_id) == (900, "auto", t.thread_id)
    assert store.add_compaction(t.thread_id, "stale", ids[3], ids[3], 1, "auto", None) is None
    second = store.add_compaction(t.thread_id, "s2", ids[3], ids[3], 800, "cli:me", first.id)
    assert second.id > first.id and store.last_compaction(t.thread_id) == second
    assert store.add_compaction(t.thread_id, "stale", ids[3], ids[3], 1, "x", first.id) is None
    assert [c.summary for c in store.compactions(t.thread_id)] == ["s1", "s2"]
    assert store.compactions("cli:other") == [] and store.last_compaction("cli:other") is None
    kept = store.messages_from(t.thread_id, ids[2])
    assert [(m.id, m.content) for m in kept] == [(ids[2], "m2"), (ids[3], "m3")]
    assert [m.tokens for m in store.messages_from(t.thread_id, 0)] == [None, 1234, None, None]
    assert store.row_counts()["messages"] == 5


def test_an_approval_is_decided_once(store: Store) -> None:
    t = turn(store)
    made = store.insert_approval("apr_1", t, "c1", "restart", '{"s": "db"}', "why", 9e9)
    assert (made.state, made.args, made.requester) == ("pending", {"s": "db"}, "cli:me")
    assert store.approvals(thread=t.thread_id, state="pending") == [made]
    results = []
    deciders = [
        threading.Thread(target=lambda d=d: results.append(d(store)))
        for d in (
            lambda s: s.settle_approval("apr_1", "approved", "cli:a", None),
            lambda s: s.settle_approval("apr_1", "denied", "cli:b", "no"),
        )
    ]
    for decider in deciders:
        decider.start()
    for decider in deciders:
        decider.join()
    assert sorted(results) == [False, True]
    decided = store.approval("apr_1")
    assert decided.state in ("approved", "denied") and decided.decided_at is not None
    assert store.approvals(state="pending") == [] and store.expired_approvals(1e10) == []
    store.add_event("approval_decided", decided.decided_by, t.thread_id, t.id, "{}")
    assert rows(store, "events", "kind") == ["approval_decided"]


# ─────────────────────────────── outbox, cursors, secrets ───────────────────────────────


def test_a_delivery_changes_only_while_pending(store: Store) -> None:
    asked = store.add_delivery(
        "web", "web:owner", "turn_1", "approval", {"approval": {"id": "a"}}, False
    )
    store.add_delivery("web", "web:owner", "turn_1", "approval", {"approval": {"id": "b"}}, False)
    sent = store.add_delivery("web", "web:owner", None, "reply", {"text": "hi"}, True)
    assert [d.id for d in store.approval_requests("turn_1", "a")] == [asked]
    assert store.update_delivery(asked, None, None, sent_parts=1)
    assert store.update_delivery(asked, "sent", None, ref="m1", unset=None)
    assert store.delivery(asked).body == {"approval": {"id": "a"}, "sent_parts": 1, "ref": "m1"}
    assert not store.update_delivery(asked, "failed", "late")
    assert not store.update_delivery(sent, "failed", "late")
    assert store.delivery(asked).state == "sent" == store.delivery(sent).state
    assert [d.id for d in store.deliveries("web:owner", asked, 10)] == [asked + 1, sent]


def test_a_cursor_moves_and_stays(store: Store) -> None:
    assert store.cursor("telegram") is None
    store.set_cursor("telegram", "5")
    with store.transaction():
        store.set_cursor("telegram", "6")
    assert store.cursor("telegram") == "6"


def test_an_mcp_tool_list_is_replaced_whole_and_listed_by_server(store: Store) -> None:
    assert store.mcp_tool_list("files") is None
    first = [{"name": "read", "inputSchema": {"type": "object"}}]
    store.set_mcp_tool_list("files", first)
    with store.transaction():
        store.set_mcp_tool_list("files", [{"name": "write"}, {"name": "ls"}])
        store.set_mcp_tool_list("db", [])
    cached = store.mcp_tool_list("files")
    assert cached is not None and cached.tools == [{"name": "write"}, {"name": "ls"}]
    assert cached.listed_at <= store.now()
    assert [(c.server, c.tools) for c in store.mcp_tool_lists()] == [
        ("db", []),
        ("files", [{"name": "write"}, {"name": "ls"}]),
    ]


def test_a_secret_request_is_used_once_and_expires_without_its_key(store: Store) -> None:
    at = store.now()
    request = agentkit.SecretRequest(
        "sec_1", "cli:me", "cli:me", "turn_1", "why", (("T", "Token"),), "u", "pending", at, at + 60
    )
    store.insert_secret_request(request, "pub", b"sealed")
    assert store.secret_request("sec_1") == (request, b"sealed")
    assert store.pending_secret_requests("turn_1") == [request]
    assert store.use_secret_request("sec_1") and not store.use_secret_request("sec_1")
    assert store.secret_request("sec_1")[1] is None
    other = agentkit.SecretRequest(
        "sec_2", "cli:me", "cli:me", None, "why", (("T", None),), "u", "pending", at, at + 60
    )
    store.insert_secret_request(other, "pub", b"sealed")
    assert store.expire_secret_requests(at + 30) == 0
    assert store.expire_secret_requests(at + 61) == 1
    assert store.secret_request("sec_2")[0].state == "expired"


def test_sealed_secrets_are_set_per_thread_and_replaced_by_name(store: Store) -> None:
    assert store.sealed_secrets("cli:me") == {}
    store.save_secrets("cli:me", {"A": b"\x00one", "B": b"two"})
    with store.transaction():
        store.save_secrets("cli:me", {"A": b"three"})
        store.save_secrets("cli:other", {"A": b"four"})
    with pytest.raises(RuntimeError), store.transaction():
        store.save_secrets("cli:me", {"B": b"undone"})
        raise RuntimeError("roll the replacement back")
    assert store.sealed_secrets("cli:me") == {"A": b"three", "B": b"two"}
    assert store.sealed_secrets("cli:other") == {"A": b"four"}


# ───────────────────────────────── transactions, tables ─────────────────────────────────


def test_a_nested_transaction_rolls_back_only_its_own_part(store: Store) -> None:
    with store.transaction():
        [kept] = add(store, job(store))
        with pytest.raises(RuntimeError), store.transaction():
            add(store, job(store, "undone"))
            store.acquire_lock("undone", "a", 30)
            raise RuntimeError("undo the inner block")
        with store.transaction():
            store.acquire_lock("kept", "a", 30)
    assert [j.name for j in store.jobs(None, 10)] == ["t"] and store.job(kept)
    assert rows(store, "locks", "name") == ["kept"]
    with (
        pytest.raises(agentkit.BadInput, match="outermost"),
        store.transaction(),
        store.transaction(durable=True),
    ):
        pass


def test_tables_rows_and_pruning(store: Store) -> None:
    assert {"jobs", "locks", "turns", "approvals"} <= set(store.tables())
    [rowid] = add(store, job(store))
    [claimed] = store.claim_jobs("a", ["t"], 1, 30)
    store.finish_jobs("a", [ended(claimed)])
    assert store.row_counts()["jobs"] == 1
    assert rows(store, "jobs", "id", "state") == [(rowid, "done")]
    with pytest.raises(agentkit.BadInput, match="no table"):
        store.rows("nope")
    assert store.integrity() == "ok"
    assert store.prune(store.now() + 10)["jobs"] == 1 and store.row_counts()["jobs"] == 0
    assert store.version == store.latest


def test_open_store_picks_the_engine_by_url_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(agentkit.BadInput, match=r"no store engine for nope://"):
        agentkit.open_store("nope://host/db")
    opened: list[tuple[str, dict]] = []
    monkeypatch.setitem(
        agentkit.STORE_ENGINES, "fake", lambda target, **options: opened.append((target, options))
    )
    agentkit.open_store("FAKE://host/db", synchronous="full")
    assert opened == [("FAKE://host/db", {"synchronous": "full"})]
    plain = agentkit.open_store(tmp_path / "plain.db")  # a path: SQLite
    assert isinstance(plain, agentkit.SQLiteStore) and plain.path == str(tmp_path / "plain.db")
    plain.close()


# ───────────────────────────── extension entries and queued messages ─────────────────────────────


def test_entries_come_back_oldest_first_by_kind_and_never_as_messages(store: Store) -> None:
    t = turn(store)
    store.add_entries(t.thread_id, t.id, [("note", '{"n": 1}'), ("plan", '["a"]')])
    store.add_entries(t.thread_id, None, [("note", '{"n": 2}')])
    store.add_entries(t.thread_id, None, [])
    found = store.entries(t.thread_id, None, 10)
    assert [(e.kind, e.data, e.turn_id) for e in found] == [
        ("note", {"n": 1}, t.id),
        ("plan", ["a"], t.id),
        ("note", {"n": 2}, None),
    ]
    assert found[0].at <= found[2].at and found[0].id < found[2].id
    assert [e.data for e in store.entries(t.thread_id, "note", 1)] == [{"n": 2}]
    assert store.entries("cli:other", None, 10) == [] and store.messages(t.thread_id, 10) == []
    assert store.turn(t.id).instructions is None
    store.set_turn_instructions(t.id, "Be brief.")
    assert store.turn(t.id).instructions == "Be brief."


def test_a_queued_message_is_taken_once_by_its_kinds(store: Store) -> None:
    t = turn(store)
    steer = store.add_queued(t.thread_id, "cli:me", "stop", "steer", None)
    later = store.add_queued(t.thread_id, "cli:me", "and then", "follow_up", "u9")
    assert steer < later
    assert store.queued_from(t.thread_id, "u9").text == "and then"
    assert store.queued_from("cli:other", "u9") is None
    assert store.has_queued(t.thread_id, ["steer"]) and not store.has_queued("cli:x", ["steer"])
    [taken] = store.take_queued(t.thread_id, ["steer"], t.id)
    assert not store.has_queued(t.thread_id, ["steer"])
    assert store.has_queued(t.thread_id, ["steer", "follow_up"])
    assert (taken.id, taken.text, taken.deliver, taken.turn_id) == (steer, "stop", "steer", t.id)
    assert store.take_queued(t.thread_id, ["steer"], t.id) == []
    assert [m.id for m in store.take_queued(t.thread_id, ["steer", "follow_up"], None)] == [later]
    assert store.queued_from(t.thread_id, "u9").turn_id is None
    assert store.take_queued(t.thread_id, ["steer", "follow_up"], t.id) == []
    user = store.add_message(t.thread_id, t.id, "user", "stop", False, "steer")
    assert [(m.id, m.origin) for m in store.messages(t.thread_id, 5)] == [(user, "steer")]
    store.add_queued(t.thread_id, "cli:me", "still waiting", "steer", None)
    assert store.prune(store.now() + 10)["queued_messages"] == 2  # the delivered ones
    assert [m.text for m in store.take_queued(t.thread_id, ["steer"], t.id)] == ["still waiting"]
