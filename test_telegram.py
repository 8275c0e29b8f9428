"""The Telegram adapter, polling adapters and the outbox, end to end.

A FakeTelegram (real HTTP over loopback) plays the Bot API; databases are real SQLite
files under tmp_path; multi-process and crash tests run real `agentkit.py serve`
processes and kill them with SIGKILL. No test reaches the internet, and none sleeps where
it can wait for a condition.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agentkit
from agentkit import AgentKit, Inbound
from fake_servers import FakeTelegram
from testkit import Database, clear_config, count, holding_writes, rows, stored_bytes, wait_until

ROOT = Path(__file__).resolve().parent

# A token of its own, so that test 10 can look for it in logs and database bytes.
TOKEN = "424242:AAHygiene-Secret_Token42xyz"
TOKEN_SECRET = TOKEN.partition(":")[2]


# ───────────────────────────────────────── helpers ─────────────────────────────────────────


def idle(db: Database) -> bool:
    """No job waits or runs and every delivery is sent or failed (read as another process)."""
    return not {"queued", "running"} & set(rows(db, "jobs", "state")) and not count(
        db, "deliveries", state="pending"
    )


def calls_of(fake: FakeTelegram, method: str) -> list[dict[str, Any]]:
    with fake._cond:
        return [params for name, params in fake.calls if name == method]


class Fake(FakeTelegram):
    """FakeTelegram that also notes how many getUpdates are answered at once and which
    update ids they returned, and can fail the sendMessage after the N-th one that worked."""

    def __init__(self, token: str = "123456:TEST-token") -> None:
        self.polling = 0
        self.most_polling = 0
        self.served: list[int] = []
        self.ok_sends = 0
        self.fail_after: set[int] = set()
        super().__init__(token)

    def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        with self._cond:
            self.polling += 1
            self.most_polling = max(self.most_polling, self.polling)
        try:
            updates = super()._get_updates(params)
        finally:
            with self._cond:
                self.polling -= 1
        with self._cond:
            self.served += [update["update_id"] for update in updates]
            self._cond.notify_all()
        return updates

    def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        message = super()._send_message(params)
        with self._cond:
            self.ok_sends += 1
            if self.ok_sends in self.fail_after:
                self.fail_next("sendMessage", 500)
        return message


class RuleModel:
    """A stateless offline model: "restart X" and "wait_typing" call those tools, "long N"
    answers N characters in 100-character lines and "blob N" N characters with no line
    break; a trailing tool result is answered "done: <result>"; anything else is echoed."""

    name = "rules"

    @staticmethod
    def long_text(n: int, lines: bool) -> str:
        unit = "x" * 99 + "\n" if lines else "0123456789"
        return (unit * (n // len(unit) + 1))[:n]

    def complete(self, instructions: str, messages: list, tools: list) -> agentkit.ModelReply:
        if messages and messages[-1].get("role") == "tool":
            return agentkit.ModelReply(f"done: {messages[-1]['content']}", [], {})
        said = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        word, _, rest = said.partition(" ")
        if word == "restart":
            return agentkit.ModelReply(None, [agentkit.ToolCall("restart", {"service": rest})], {})
        if word == "wait_typing":
            return agentkit.ModelReply(None, [agentkit.ToolCall("wait_typing", {})], {})
        if word in ("long", "blob"):
            return agentkit.ModelReply(RuleModel.long_text(int(rest), word == "long"), [], {})
        return agentkit.ModelReply(f"echo: {said}", [], {})


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the developer's shell changes which adapters or model a kit gets."""
    clear_config(monkeypatch)


@pytest.fixture
def fake() -> Iterator[Fake]:
    with Fake() as f:
        yield f


def telegram(fake: FakeTelegram, **options: Any) -> agentkit.Telegram:
    options = {"allow": "*", "poll_timeout": 1, "lease": 2} | options
    return agentkit.Telegram(fake.token, api_url=fake.url, **options)


def make_kit(db: Database, *adapters: agentkit.Adapter, **options: Any) -> AgentKit:
    options = {"model": RuleModel()} | options
    return AgentKit(db, adapters=list(adapters), **options)


def fetch_and_work(kit: AgentKit, tg: agentkit.PollingAdapter) -> int:
    """One poll (stored with its cursor), then every job that is ready; the items fetched."""
    fetched = tg.poll_once()
    kit.work(until_idle=True)
    return fetched


@contextlib.contextmanager
def serving(kit: AgentKit) -> Iterator[None]:
    """`kit.serve(http="127.0.0.1:0")` in a thread, stopped (and checked stopped) at exit."""
    stop, ready, failed = threading.Event(), threading.Event(), []

    def run() -> None:
        try:
            kit.serve(http="127.0.0.1:0", workers=2, stop=stop, ready=lambda url: ready.set())
        except BaseException as e:
            failed.append(e)
            ready.set()

    thread = threading.Thread(target=run, name="test-serve", daemon=True)
    thread.start()
    assert ready.wait(20), "serve did not start"
    assert not failed, failed
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "serve did not stop"
        assert not failed, failed


# ── serve processes ──

APP_BODY = '''
class ObservedTelegram(agentkit.Telegram):
    """Telegram that writes "<pid> <update ids>" to FETCHED after each poll that fetched
    something, before poll_once stores it (so a test knows the fetch happened)."""

    def poll(self, cursor, timeout):
        items, new = super().poll(cursor, timeout)
        if items:
            with open(FETCHED, "a") as f:
                f.write(f"{os.getpid()} {' '.join(item.id for item in items)}\\n")
        return items, new


tg = ObservedTelegram(TOKEN, api_url=API, allow=ALLOW, poll_timeout=1, lease=2)
kit = agentkit.AgentKit(DB, model=RuleModel(), adapters=[tg], approvers=APPROVERS, lease=5)


@kit.tool(approval=True)
def restart(service: str) -> str:
    """Restart a service (an approver decides first)."""
    with open(RUNS, "a") as f:
        f.write(service + "\\n")
    return f"restarted {service}"
'''


def write_app(
    tmp_path: Path,
    db: Database | str,
    fake: FakeTelegram,
    *,
    allow: str = "*",
    approvers: tuple = ("telegram:42",),
) -> None:
    config = {
        "DB": str(db),
        "TOKEN": fake.token,
        "API": fake.url,
        "ALLOW": allow,
        "APPROVERS": list(approvers),
        "FETCHED": str(tmp_path / "fetched.txt"),
        "RUNS": str(tmp_path / "runs.txt"),
    }
    source = "import os\n\nimport agentkit\n\n"
    source += "".join(f"{name} = {value!r}\n" for name, value in config.items())
    source += "\n\n" + inspect.getsource(RuleModel) + APP_BODY
    (tmp_path / "app.py").write_text(source)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """The serve processes a test started; any still running at the end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


SERVE_ARGS = ("--http", "127.0.0.1:0", "--workers", "2")


def serve_process(tmp_path: Path, processes: list, label: str) -> tuple[subprocess.Popen, Path]:
    """Start `python agentkit.py serve --app app:kit` in tmp_path; wait until it serves."""
    log = tmp_path / f"{label}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "agentkit.py"), "serve", "--app", "app:kit", *SERVE_ARGS],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    processes.append(proc)
    wait_until(
        lambda: (
            proc.poll() is not None
            or re.search(r"serving .* on http://127\.0\.0\.1:\d+", log.read_text())
        ),
        what=f"{label} to serve",
    )
    assert proc.poll() is None, log.read_text()
    return proc, log


def stop_process(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()


def assert_no_token_in_logs(tmp_path: Path, fake: FakeTelegram) -> None:
    """The serve processes' stderr (INFO and up, as the CLI logs) never shows the token."""
    for log in tmp_path.glob("*.log"):
        assert fake.token.partition(":")[2] not in log.read_text(), log.name


def fetched_lines(tmp_path: Path) -> list[tuple[int, list[str]]]:
    path = tmp_path / "fetched.txt"
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(pid), ids) for pid, *ids in lines]


def poller_pid(db: Database) -> int | None:
    held = [
        owner
        for owner, expires_at in rows(db, "locks", "owner", "expires_at", name="adapter:telegram")
        if expires_at > time.time()
    ]
    return int(held[0].split(":")[-2]) if held and held[0] else None


# ─────────────────────────── 1. the same update twice: one turn ───────────────────────────


def test_an_update_fetched_twice_gives_one_turn_and_one_reply(fake: Fake, db: Database) -> None:
    tg = telegram(fake)
    with make_kit(db, tg) as kit:
        update_id = fake.push_message(42, 42, "hello")
        assert tg.poll_once() == 1
        assert kit.store.cursor("telegram") == str(update_id + 1)
        # the cursor is lost (say, a restore): the poller asks again without an offset and
        # Telegram hands the same update (same update_id) out a second time
        kit.store.set_cursor("telegram", None)
        assert tg.poll_once() == 1
        assert fake.served == [update_id, update_id]
        # and the same update twice in one batch
        item = tg.inbound({"update_id": update_id, "message": fake.message(42, 1)})
        assert item is not None and item.id == str(update_id)
        kit.receive_all(tg, [item, item], str(update_id + 1))
        kit.work(until_idle=True)

        assert fake.texts(42) == ["echo: hello"]
        assert count(kit, "turns") == 1
        assert count(kit, "messages", role="user") == 1
        assert kit.store.cursor("telegram") == str(update_id + 1)


# ───────────────────── 2. killed between fetching and committing: once ─────────────────────


def test_updates_fetched_by_a_process_killed_before_its_commit_are_processed_once(
    tmp_path: Path, fake: Fake, db: Database, processes: list
) -> None:
    write_app(tmp_path, db, fake)
    first, _ = serve_process(tmp_path, processes, "first")
    fake.wait_for(lambda f: len(f.polls) >= 1)  # it holds the polling lease and polls

    # hold the writers back: the poller can fetch but not commit what it fetched
    with holding_writes(db):
        update_id = fake.push_message(42, 42, "hello")
        fake.wait_for(lambda f: update_id in f.served)  # getUpdates returned it ...
        wait_until(  # ... and the poller read it and went on to store it
            lambda: any(
                pid == first.pid and str(update_id) in ids for pid, ids in fetched_lines(tmp_path)
            ),
            what="the first process to fetch the update",
        )
        first.kill()  # SIGKILL, blocked inside its commit
        first.wait(10)
    assert count(db, "turns") == 0  # nothing of it was committed
    assert rows(db, "cursors", "cursor", adapter="telegram") in ([], [None])
    assert fake.texts() == []

    second, second_log = serve_process(tmp_path, processes, "second")
    fake.wait_for(lambda f: f.texts(42) == ["echo: hello"], timeout=20)
    later = fake.push_message(42, 42, "again")  # answered after the first: nothing else came
    fake.wait_for(lambda f: len(f.texts(42)) >= 2, timeout=20)
    wait_until(lambda: idle(db), what="the database to be idle")
    stop_process(second, second_log)

    assert fake.texts(42) == ["echo: hello", "echo: again"]
    assert count(db, "turns", source_id=str(update_id)) == 1
    assert count(db, "turns") == 2
    assert rows(db, "cursors", "cursor", adapter="telegram") == [str(later + 1)]
    assert [pid for pid, _ in fetched_lines(tmp_path)].count(second.pid) >= 1
    assert_no_token_in_logs(tmp_path, fake)


# ───────────────────── 3. two serve processes: one poller, takeover ─────────────────────


def test_two_serve_processes_poll_one_at_a_time_and_the_survivor_takes_over(
    tmp_path: Path, fake: Fake, db: Database, processes: list
) -> None:
    write_app(tmp_path, db, fake)
    a = serve_process(tmp_path, processes, "a")
    b = serve_process(tmp_path, processes, "b")
    by_pid = {a[0].pid: a, b[0].pid: b}
    fake.wait_for(lambda f: len(f.polls) >= 1)

    first = [201, 202, 203]
    for user in first:
        fake.push_message(user, user, f"first {user}")
    fake.wait_for(lambda f: all(f.texts(u) for u in first), timeout=20)
    wait_until(lambda: idle(db), what="the first messages to be answered")
    assert fake.most_polling == 1  # never two getUpdates at once (a second would end the first)
    for user in first:
        assert fake.texts(user) == [f"echo: first {user}"]
    [holder] = {pid for pid, _ in fetched_lines(tmp_path)}  # one process fetched them all
    assert holder in by_pid
    assert poller_pid(db) == holder  # it holds the lease adapter:telegram

    by_pid[holder][0].kill()
    by_pid[holder][0].wait(10)
    survivor_pid = next(pid for pid in by_pid if pid != holder)
    survivor, survivor_log = by_pid[survivor_pid]
    fetched_before = len(fetched_lines(tmp_path))

    second = [301, 302, 303]
    for user in second:
        fake.push_message(user, user, f"second {user}")
    fake.wait_for(lambda f: all(f.texts(u) for u in second), timeout=20)
    wait_until(lambda: idle(db), what="the second messages to be answered")
    assert poller_pid(db) == survivor_pid
    stop_process(survivor, survivor_log)

    for user in first:
        assert fake.texts(user) == [f"echo: first {user}"]
    for user in second:
        assert fake.texts(user) == [f"echo: second {user}"]
    assert {pid for pid, _ in fetched_lines(tmp_path)[fetched_before:]} == {survivor_pid}
    assert count(db, "turns") == 6
    for _, log in by_pid.values():  # a poll superseded by another process answers 409
        text = log.read_text()
        assert "getUpdates: 409" not in text and "Conflict" not in text
    assert_no_token_in_logs(tmp_path, fake)


# ──────────────────────────────── 4. approvals via buttons ────────────────────────────────


def keyboards(fake: FakeTelegram, chat: int) -> list[dict[str, Any]]:
    with fake._cond:
        return [s for s in fake.sent if s["chat_id"] == chat and s["reply_markup"]]


def runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_approval_buttons_only_an_approver_can_press_and_the_tool_runs_once(
    tmp_path: Path, fake: Fake, db: Database, processes: list
) -> None:
    write_app(tmp_path, db, fake, allow="42,7", approvers=("telegram:42",))
    proc, log = serve_process(tmp_path, processes, "serve")
    group = -1001

    fake.push_message(group, 42, "restart nginx")
    fake.wait_for(lambda f: keyboards(f, group), timeout=20)
    [request] = keyboards(fake, group)
    [[approve, deny]] = request["reply_markup"]["inline_keyboard"]
    apr = approve["callback_data"].partition(":")[2]
    assert re.fullmatch(r"apr_[0-9a-f]{16}", apr)
    assert approve == {"text": "Approve", "callback_data": f"approve:{apr}"}
    assert deny == {"text": "Deny", "callback_data": f"deny:{apr}"}
    assert "restart" in request["text"] and "nginx" in request["text"]

    # user 7 (allowed to talk, not an approver) presses Approve: an alert, nothing runs
    fake.push_callback(group, 7, f"approve:{apr}", message_id=request["message_id"])
    fake.wait_for(lambda f: len(f.answers) == 1, timeout=20)
    assert fake.answers[0]["show_alert"] is True
    assert "may not decide" in fake.answers[0]["text"]
    assert rows(db, "approvals", "state", id=apr) == ["pending"]
    assert runs(tmp_path) == []
    assert fake.message(group, request["message_id"])["reply_markup"]  # buttons still there

    # the approver presses it: the tool runs once, the message shows the decision
    fake.push_callback(group, 42, f"approve:{apr}", message_id=request["message_id"])
    fake.wait_for(lambda f: "done: restarted nginx" in f.texts(group), timeout=20)
    fake.wait_for(lambda f: len(f.answers) == 2 and f.edits, timeout=20)
    assert fake.answers[1]["show_alert"] is False
    edited = fake.message(group, request["message_id"])
    assert "reply_markup" not in edited
    assert edited["text"].endswith("Approved by telegram:42.")
    assert fake.edits[0]["reply_markup"] is None

    # pressing again decides nothing new and runs nothing
    fake.push_callback(group, 42, f"approve:{apr}", message_id=request["message_id"])
    fake.wait_for(lambda f: len(f.answers) == 3, timeout=20)
    wait_until(lambda: idle(db), what="the presses to be answered")
    assert runs(tmp_path) == ["nginx"]
    assert fake.texts(group).count("done: restarted nginx") == 1
    assert fake.texts(42) == []  # the requester could decide: nothing went to 42 privately

    # requested by someone who is not an approver: the approver hears of it privately too
    other = -1002
    fake.push_message(other, 7, "restart redis")
    fake.wait_for(lambda f: keyboards(f, other) and keyboards(f, 42), timeout=20)
    [in_group], [in_private] = keyboards(fake, other), keyboards(fake, 42)
    assert in_group["reply_markup"] == in_private["reply_markup"]
    apr2 = in_private["reply_markup"]["inline_keyboard"][0][0]["callback_data"].partition(":")[2]
    assert apr2 != apr
    fake.push_callback(42, 42, f"approve:{apr2}", message_id=in_private["message_id"])
    fake.wait_for(lambda f: "done: restarted redis" in f.texts(other), timeout=20)
    fake.wait_for(lambda f: len(f.edits) == 3, timeout=20)  # both requests show the decision
    assert {(e["chat_id"], e["message_id"]) for e in fake.edits[1:]} == {
        (42, in_private["message_id"]),
        (other, in_group["message_id"]),
    }
    for chat, message in ((42, in_private), (other, in_group)):
        shown = fake.message(chat, message["message_id"])
        assert "reply_markup" not in shown and shown["text"].endswith("Approved by telegram:42.")
    wait_until(lambda: idle(db), what="the second approval to finish")
    stop_process(proc, log)
    assert runs(tmp_path) == ["nginx", "redis"]
    assert fake.texts(other).count("done: restarted redis") == 1
    assert_no_token_in_logs(tmp_path, fake)


def approval_kit(db: Database, tg: agentkit.Telegram) -> tuple[AgentKit, list[str]]:
    """A kit whose `restart` tool needs telegram:42's approval; the list of its runs."""
    kit = make_kit(db, tg, approvers=["telegram:42"])
    ran: list[str] = []

    @kit.tool(approval=True)
    def restart(service: str) -> str:
        """Restart a service."""
        ran.append(service)
        return f"restarted {service}"

    return kit, ran


def test_a_decision_made_elsewhere_or_by_expiry_edits_the_request(fake: Fake, db: Database) -> None:
    tg = telegram(fake)
    kit, ran = approval_kit(db, tg)
    with kit:
        fake.push_message(42, 42, "restart nginx")
        fetch_and_work(kit, tg)
        [request] = keyboards(fake, 42)
        [pending] = kit.approvals()
        with AgentKit(db) as cli:  # `agentkit approve ID --as cli:ops`, with no bot token
            assert "telegram" not in cli.adapters
            cli.approve(pending.id, actor="cli:ops", wait=False)
        kit.work(until_idle=True)  # the bot's process sends the edit and runs the tool
        assert ran == ["nginx"] and "done: restarted nginx" in fake.texts(42)
        shown = fake.message(42, request["message_id"])
        assert "reply_markup" not in shown
        assert shown["text"].endswith("Approved by cli:ops.")
        assert "/approve" not in shown["text"]  # no stale instructions

        fake.push_message(42, 42, "restart redis")
        fetch_and_work(kit, tg)
        [second] = [m for m in keyboards(fake, 42) if m["message_id"] != request["message_id"]]
        [pending] = kit.approvals()
        assert kit.gatekeeper.expire(at=pending.expires_at + 1)
        kit.work(until_idle=True)
        assert ran == ["nginx"]
        shown = fake.message(42, second["message_id"])
        assert "reply_markup" not in shown
        assert shown["text"].endswith("Expired: nobody decided in time.")
        assert len(fake.edits) == 2


def test_a_request_decided_before_it_went_out_is_sent_without_buttons(
    fake: Fake, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agentkit, "retry_delay", lambda backoff, attempt: 3600.0)
    tg = telegram(fake)
    kit, ran = approval_kit(db, tg)
    with kit:
        fake.push_message(42, 42, "restart nginx")
        fake.fail_next("sendMessage", 500)  # the request waits for its retry
        fetch_and_work(kit, tg)
        assert fake.texts(42) == []
        [pending] = kit.approvals()
        kit.deny(pending.id, actor="telegram:42", reason="not now")
        kit.work(until_idle=True)  # the decision finds no message to edit
        assert fake.edits == [] and ran == []
        later = time.time() + 7200  # the request's retry is due
        monkeypatch.setattr(agentkit, "now", lambda: later)
        kit.work(until_idle=True)
    [request] = [m for m in fake.sent if "nginx" in m["text"] and "Denied" in m["text"]]
    assert request["reply_markup"] is None
    assert request["text"].endswith("Denied by telegram:42: not now.")
    assert all(m["reply_markup"] is None for m in fake.sent)


def test_an_approval_with_huge_arguments_still_fits_one_message(fake: Fake, db: Database) -> None:
    tg = telegram(fake)
    kit, ran = approval_kit(db, tg)
    with kit:
        fake.push_message(42, 42, "restart " + "x" * 20_000)
        fetch_and_work(kit, tg)
        [request] = fake.sent  # one message, with its buttons
        assert request["reply_markup"] and len(request["text"]) <= 4096
        assert "more characters)" in request["text"]
        [pending] = kit.approvals()
        assert pending.args == {"service": "x" * 20_000}  # cut for the chat only
        kit.deny(pending.id, actor="telegram:42", reason="y" * 2_000)
        kit.work(until_idle=True)
        shown = fake.message(42, request["message_id"])
        assert len(shown["text"]) <= 4096 and "Denied by telegram:42: yyy" in shown["text"]
        assert ran == []


# ──────────────────────────────────── 5. who may talk ────────────────────────────────────


def test_an_unknown_user_is_told_their_id_and_nothing_is_stored(fake: Fake, db: Database) -> None:
    tg = telegram(fake, allow=[42])
    with make_kit(db, tg) as kit:
        fake.push_message(99, 99, "let me in")
        assert fetch_and_work(kit, tg) == 1
        [refusal] = fake.texts(99)
        assert "99" in refusal and "AGENTKIT_TELEGRAM_ALLOW" in refusal
        for table in ("turns", "messages", "threads"):
            assert count(kit, table) == 0, table
        fake.push_message(42, 42, "hello")  # the allowed user is served
        assert fetch_and_work(kit, tg) == 1
        assert fake.texts(42) == ["echo: hello"]


@pytest.mark.parametrize(
    "allow, env, chat, user, admitted",
    [
        (None, "5, 99", 99, 99, True),  # AGENTKIT_TELEGRAM_ALLOW, with spaces
        (None, "5", 99, 99, False),
        (None, None, 99, 99, False),  # nobody by default
        ("*", None, 99, 99, True),
        (None, "*", 99, 99, True),
        (["-100555"], None, -100555, 77, True),  # a group's chat id admits its members
        (["-100555"], None, 77, 77, False),  # ... in that group only
    ],
)
def test_allow_lists(
    fake: Fake,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    allow: Any,
    env: str | None,
    chat: int,
    user: int,
    admitted: bool,
) -> None:
    if env is not None:
        monkeypatch.setenv("AGENTKIT_TELEGRAM_ALLOW", env)
    tg = agentkit.Telegram(fake.token, api_url=fake.url, allow=allow, poll_timeout=1, lease=2)
    with make_kit(db, tg) as kit:
        fake.push_message(chat, user, "hi")
        assert fetch_and_work(kit, tg) == 1
        [reply] = fake.texts(chat)
        turns = rows(kit, "turns", "thread_id", "actor")
        if admitted:
            assert reply == "echo: hi"
            assert turns == [(f"telegram:{chat}", f"telegram:{user}")]
        else:
            assert f"Your Telegram user id is {user}" in reply
            assert turns == []


# ────────────────────────────────── 6. long replies split ──────────────────────────────────


@pytest.mark.parametrize("word", ["long", "blob"])  # with line breaks, and one long line
def test_a_9000_character_reply_arrives_as_three_messages(
    fake: Fake, db: Database, word: str
) -> None:
    tg = telegram(fake)
    with make_kit(db, tg) as kit:
        fake.push_message(42, 42, f"{word} 9000")
        fetch_and_work(kit, tg)
        pieces = fake.texts(42)
        assert len(pieces) == 3
        assert all(len(piece) <= 4096 for piece in pieces)
        assert "".join(pieces) == RuleModel.long_text(9000, word == "long")
        if word == "long":  # cut at line breaks
            assert all(piece.endswith("\n") for piece in pieces[:-1])
        ids = [s["message_id"] for s in fake.sent]
        assert ids == sorted(ids)


def test_a_poll_timeout_under_a_second_still_long_polls(fake: Fake, db: Database) -> None:
    """getUpdates takes whole seconds: 0.5 must not become timeout=0 (short polling, which
    the poll loop would repeat without a pause, hammering the API)."""
    tg = telegram(fake, poll_timeout=0.5)
    with make_kit(db, tg):
        started = time.monotonic()
        assert tg.poll_once() == 0
        assert fake.polls[-1]["timeout"] > 0, fake.polls[-1]
        assert time.monotonic() - started >= 0.4


# ─────────────────────────────────── 7. flood control ───────────────────────────────────


def test_a_429_is_retried_after_its_retry_after_and_delivered_once(
    fake: Fake, db: Database
) -> None:
    tg = telegram(fake)
    with make_kit(db, tg) as kit:
        fake.push_message(42, 42, "hi")
        tg.poll_once()
        fake.fail_next("sendMessage", 429, retry_after=1)
        started = time.monotonic()
        kit.work(until_idle=True)
        took = time.monotonic() - started
        assert fake.texts(42) == ["echo: hi"]
        assert len(calls_of(fake, "sendMessage")) == 2
        assert took >= 1.0
        [(state, attempts)] = rows(kit, "jobs", "state", "attempts", name=agentkit.DELIVER_TASK)
        assert (state, attempts) == ("done", 1)  # waited inside the call, not as a job retry


def deliver_jobs(kit: AgentKit) -> list[tuple]:
    return rows(
        kit, "jobs", "state", "attempts", "run_at", "last_error", name=agentkit.DELIVER_TASK
    )


def test_a_long_retry_after_reschedules_the_delivery_for_then(
    fake: Fake, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    tg = telegram(fake)
    with make_kit(db, tg) as kit:
        clock = [time.time()]  # stopped once the store has read its own clock
        monkeypatch.setattr(agentkit, "now", lambda: clock[0])
        fake.push_message(42, 42, "hi")
        tg.poll_once()
        fake.fail_next("sendMessage", 429, retry_after=120)  # too long to wait in the call
        kit.work(until_idle=True)
        [(state, attempts, run_at, error)] = deliver_jobs(kit)
        assert (state, attempts, run_at) == ("queued", 1, clock[0] + 120)
        assert "429" in error and fake.token not in error
        assert fake.texts(42) == []
        clock[0] = run_at
        kit.work(until_idle=True)
        assert fake.texts(42) == ["echo: hi"]
        assert [row[:2] for row in deliver_jobs(kit)] == [("done", 2)]


@pytest.mark.parametrize(
    "status, description",
    [(403, "Forbidden: bot was blocked by the user"), (400, "Bad Request: chat not found")],
)
def test_a_permanent_refusal_fails_the_delivery_at_once(
    fake: Fake, db: Database, status: int, description: str
) -> None:
    tg = telegram(fake)
    with make_kit(db, tg) as kit:
        fake.push_message(42, 42, "hi")
        tg.poll_once()
        fake.fail_next("sendMessage", status, description=description)
        kit.work(until_idle=True)
        [(state, attempts, _, error)] = deliver_jobs(kit)
        assert (state, attempts) == ("failed", 1)  # not retried 8 times over minutes
        assert description in error
        [(delivery_state, delivery_error)] = rows(kit, "deliveries", "state", "error")
        assert delivery_state == "failed" and description in delivery_error
        assert len(calls_of(fake, "sendMessage")) == 1


# ──────────────────────────────────────── 8. topics ────────────────────────────────────────


def test_a_forum_topic_is_its_own_thread_and_gets_its_replies(fake: Fake, db: Database) -> None:
    tg = telegram(fake)
    with make_kit(db, tg) as kit, serving(kit):
        fake.push_message(-100777, 42, "in the topic", topic=55)
        fake.wait_for(lambda f: f.texts(-100777), timeout=20)
        fake.push_message(-100777, 42, "in the group")
        fake.wait_for(lambda f: len(f.texts(-100777)) == 2, timeout=20)
        topic_reply, group_reply = fake.sent
        assert (topic_reply["text"], topic_reply["message_thread_id"]) == ("echo: in the topic", 55)
        assert (group_reply["text"], group_reply["message_thread_id"]) == (
            "echo: in the group",
            None,
        )
        threads = {thread for thread, _ in kit.threads()}
        assert threads == {"telegram:-100777:55", "telegram:-100777"}
        assert [m["content"] for m in kit.history("telegram:-100777:55")] == [
            "in the topic",
            "echo: in the topic",
        ]


# ──────────────────────────────────── 9. typing… ────────────────────────────────────


def test_typing_shows_while_a_turn_runs(fake: Fake, db: Database) -> None:
    tg = telegram(fake)
    with make_kit(db, tg) as kit:

        def typing_seen(f: FakeTelegram) -> bool:
            return any(a["chat_id"] == -100888 and a["action"] == "typing" for a in f.actions)

        @kit.tool
        def wait_typing() -> str:
            """Wait until the chat shows that the bot is typing."""
            fake.wait_for(typing_seen, timeout=15)
            return "typing was shown"

        with serving(kit):
            fake.push_message(-100888, 42, "wait_typing", topic=9)
            fake.wait_for(lambda f: f.texts(-100888), timeout=25)
        assert fake.texts(-100888) == ["done: typing was shown"]
        action = next(a for a in fake.actions if a["chat_id"] == -100888)
        assert action["message_thread_id"] == 9


# ────────────────────────────────── 10. token hygiene ──────────────────────────────────


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_token_never_reaches_a_log_line_or_the_database(
    tmp_path: Path, db: Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agentkit, "retry_delay", lambda backoff, attempt: 0.05)
    caplog.set_level(logging.DEBUG)
    with Fake(TOKEN) as fake:
        tg = telegram(fake)
        down = agentkit.Telegram(
            TOKEN,
            api_url=f"http://127.0.0.1:{closed_port()}",
            name="tgdown",
            poll_timeout=1,
            lease=2,
        )
        with make_kit(db, tg, down) as kit:
            fake.fail_next("sendMessage", 500)
            fake.fail_next("getUpdates", 500)
            with serving(kit):
                fake.push_message(42, 42, "hello")
                fake.wait_for(lambda f: f.texts(42) == ["echo: hello"], timeout=20)
                kit.receive(down, Inbound("42", "42", "nobody hears this", id="d1"))
                wait_until(
                    lambda: count(kit, "deliveries", adapter="tgdown", state="failed"),
                    what="the delivery through the closed port to fail for good",
                )
                wait_until(lambda: "getUpdates" in caplog.text and "tgdown" in caplog.text)
            stored = [e for e in rows(kit, "deliveries", "error") if e is not None]
            stored += [e for e in rows(kit, "jobs", "last_error") if e is not None]
            raw = stored_bytes(db)
        raw_after_close = stored_bytes(db)

    # the failures happened and were written down
    assert any("ConnectError" in error for error in stored), stored
    assert "500" in caplog.text and "ConnectError" in caplog.text
    assert "[redacted:telegram-token]" in caplog.text  # the request lines were there, redacted
    lines = [record.getMessage() for record in caplog.records]
    lines += [record.exc_text or "" for record in caplog.records]
    for secret in (TOKEN, TOKEN_SECRET):
        assert not [line for line in lines if secret in line]
        assert secret not in caplog.text
        assert not [error for error in stored if secret in error]
        assert secret.encode() not in raw
        assert secret.encode() not in raw_after_close


# ─────────────────────────────── 11. your own polling adapter ───────────────────────────────


class JsonFeed(agentkit.PollingAdapter):
    """A polling adapter over a JSON file holding a list of {"thread", "actor", "text"}:
    the cursor is the index of the next entry."""

    name = "feed"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.poll_timeout = 0.5
        self.lease = 2.0
        self.sent: list[tuple[str, str, str]] = []
        self.cursors: list[str | None] = []
        self._wake = threading.Event()

    def poll(self, cursor: str | None, timeout: float) -> tuple[list[Inbound], str | None]:
        self.cursors.append(cursor)
        entries = json.loads(self.path.read_text())
        start = int(cursor or 0)
        if start >= len(entries):
            self._wake.wait(timeout)
            self._wake.clear()
            return [], cursor
        items = [
            Inbound(e["thread"], e["actor"], e["text"], id=f"entry-{i}", meta=e.get("meta"))
            for i, e in enumerate(entries[start:], start)
        ]
        return items, str(len(entries))

    def interrupt(self) -> None:
        self._wake.set()

    def send(self, target: str, outbound: agentkit.Outbound) -> None:
        self.sent.append((target, outbound.kind, outbound.text))


def test_a_polling_adapter_of_your_own(
    tmp_path: Path, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "feed.json"
    entries: list[dict[str, Any]] = [
        {"thread": "a", "actor": "ann", "text": "one"},
        {"thread": "x" * 300, "actor": "bob", "text": "bad: thread key too long"},
        {"thread": "b", "actor": "bob", "text": "two"},
        {"thread": "c", "actor": "cy", "text": "x" * 100_001},  # bad: text too long
        {"thread": "d", "actor": "dee", "text": "bad: meta", "meta": {"score": float("nan")}},
        {"thread": "a", "actor": "ann", "text": "three"},
    ]
    path.write_text(json.dumps(entries))  # NaN is written as NaN, read back as nan
    feed = JsonFeed(path)
    with make_kit(db, feed) as kit, serving(kit):
        wait_until(lambda: len(feed.sent) >= 3, what="the three good entries' replies")
        wait_until(lambda: idle(db))
        assert sorted(feed.sent) == [
            ("feed:a", "reply", "echo: one"),
            ("feed:a", "reply", "echo: three"),
            ("feed:b", "reply", "echo: two"),
        ]
        assert kit.store.cursor("feed") == "6"
        for bad in (1, 3, 4):
            assert f"skipped message entry-{bad}" in caplog.text
        # the item refused inside the transaction left nothing behind either
        assert {t for t, _ in kit.threads()} == {"feed:a", "feed:b"}
        entries.append({"thread": "b", "actor": "bob", "text": "four"})
        path.write_text(json.dumps(entries))
        feed.interrupt()
        wait_until(lambda: len(feed.sent) == 4, what="the new entry's reply")
        wait_until(lambda: idle(db))
        assert feed.sent[-1] == ("feed:b", "reply", "echo: four")
        assert kit.store.cursor("feed") == "7"

    # a new process (here: a new kit) starts from the stored cursor: nothing again
    again = JsonFeed(path)
    with make_kit(db, again) as kit, serving(kit):
        wait_until(lambda: len(again.cursors) >= 2, what="two polls")
        assert again.cursors[0] == "7"
    assert again.sent == []
    assert count(db, "turns") == 4
    assert count(db, "turns", source="feed") == 4


# ───────────────────────────────────────── 12. outbox ─────────────────────────────────────────


def test_a_delivery_that_fails_twice_is_sent_once_and_never_again(
    fake: Fake, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agentkit, "retry_delay", lambda backoff, attempt: 0.05)
    tg = telegram(fake)
    with make_kit(db, tg) as kit, serving(kit):
        fake.fail_next("sendMessage", 500)
        fake.fail_next("sendMessage", 500)
        fake.push_message(42, 42, "hi")
        fake.wait_for(lambda f: f.texts(42), timeout=20)
        wait_until(lambda: idle(db))
        [(state, attempts)] = rows(kit, "jobs", "state", "attempts", name=agentkit.DELIVER_TASK)
        assert (state, attempts) == ("done", 3)
        assert len(calls_of(fake, "sendMessage")) == 3
        [(delivery, sent)] = rows(kit, "deliveries", "id", "state")
        assert sent == "sent"

        # its task runs again (as after a crash between marking it sent and finishing it)
        again = kit.enqueue(agentkit.DELIVER_TASK, {"delivery": delivery})
        wait_until(lambda: kit.job(again).state == "done", what="the task to run again")
        assert kit.job(again).result == "sent"
    assert fake.texts(42) == ["echo: hi"]
    assert len(calls_of(fake, "sendMessage")) == 3


def test_a_long_reply_whose_second_piece_fails_is_still_delivered_once(
    fake: Fake, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agentkit, "retry_delay", lambda backoff, attempt: 0.05)
    fake.fail_after = {1}  # the sendMessage after the first piece fails once
    tg = telegram(fake)
    with make_kit(db, tg) as kit, serving(kit):
        fake.push_message(42, 42, "long 9000")
        wait_until(lambda: count(kit, "deliveries", state="sent"))
        wait_until(lambda: idle(db))
    assert len(calls_of(fake, "sendMessage")) >= 4  # the failure happened
    pieces = fake.texts(42)
    assert "".join(pieces) == RuleModel.long_text(9000, True), f"{len(pieces)} messages arrived"
    assert len(pieces) == 3
