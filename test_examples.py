"""Every example in examples/ runs as documented: scripts as real processes, bots through
`agentkit serve --app module:kit` against the web chat, a fake Telegram, a JSON feed and a
fake API on loopback. No internet, no model keys: echo and scripted models."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

import agentkit
import testkit
from fake_servers import FakeOpenAI, FakeTelegram
from testkit import Database, seal, wait_until

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"
TOKEN = "web-token-for-the-examples-0123"
# agentkit's own, and what the examples read
CONFIG_VARS = (
    *testkit.CONFIG_VARS,
    "TELEGRAM_API_URL",
    "AGENTKIT_DB",
    "FEED_PATH",
    "REPLIES_PATH",
    "API_URL",
)


# ───────────────────────────────────────── helpers ─────────────────────────────────────────


def env_for(db: Database, **extra: str) -> dict[str, str]:
    """The environment of an example's process: no model keys or tokens from outside, the
    test's database (AGENTKIT_DB), agentkit and the examples importable."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env |= {"PYTHONPATH": f"{ROOT}{os.pathsep}{EXAMPLES}", "PYTHONUNBUFFERED": "1"}
    return env | testkit.database_config(db) | extra


def run_script(name: str, env: dict[str, str], cwd: Path) -> str:
    """`python examples/<name>` in `cwd`; its stdout (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def agentkit_command() -> list[str]:
    """The `agentkit` console script beside this Python, else `python agentkit.py`."""
    script = Path(sys.executable).with_name("agentkit")
    return [str(script)] if script.exists() else [sys.executable, str(ROOT / "agentkit.py")]


class Served:
    """`<command> serve --app <app> --http 127.0.0.1:0` in `cwd`, as a process (a bare
    kit when `app` is "")."""

    PATTERN = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+)")

    def __init__(self, command: list[str], app: str, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [*command, "serve", *(["--app", app] if app else []), "--http", "127.0.0.1:0"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = self.PATTERN.search(line)
            if match and not self.ready.is_set():
                self.url = match[1]
                self.ready.set()
        self.ready.set()  # the process ended: stop waiting

    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 20.0) -> str:
        assert self.ready.wait(timeout), f"serve never said it was serving:\n{self.log()}"
        assert self.url, f"serve exited {self.proc.poll()}:\n{self.log()}"
        return self.url

    def stop(self) -> None:
        """SIGTERM; it must exit 0 (a hang fails the wait)."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0, self.log()
        self.reader.join(5)
        assert "stopped" in self.log() and "Traceback" not in self.log(), self.log()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def served(command: list[str], app: str, env: dict[str, str], cwd: Path) -> Iterator[Served]:
    server = Served(command, app, env, cwd)
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


def import_example(name: str) -> object:
    """Import examples/<name>.py as a fresh module (it reads its settings from os.environ)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ───────────────────────────────────────── scripts ─────────────────────────────────────────


def test_script_runs_a_turn_with_a_tool_call_and_prints_the_history(
    tmp_path: Path, db: Database
) -> None:
    out = run_script("script.py", env_for(db), tmp_path).splitlines()
    assert out[0] == "done: 1234 + 5678 = 6912."
    history = [json.loads(line) for line in out[1:]]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1]["tool_calls"][0]["name"] == "add"
    assert history[2]["content"] == "6912" and history[2]["is_error"] is False
    assert history[3]["content"] == "1234 + 5678 = 6912."


def test_workspace_agent_writes_and_runs_a_script_in_bwrap_after_approvals(
    tmp_path: Path, db: Database
) -> None:
    out = run_script("workspace_agent.py", env_for(db), tmp_path)
    assert out.splitlines() == [
        "approving write: {'path': 'hello.py', 'text': \"print('hello from the sandbox')\\n\"}",
        "approving bash: {'command': 'python3 hello.py; cat /etc/shadow'}",
        "done: The script said: hello from the sandbox",
        "[write] wrote 32 bytes to hello.py",
        "[bash] hello from the sandbox",
        "cat: /etc/shadow: No such file or directory",
        "",
        "[exit code 1]",
    ]
    folder = tmp_path / "workspace" / agentkit.workspace_name("cli:me")
    assert (folder / "hello.py").read_text() == "print('hello from the sandbox')\n"


def test_ops_bot_waits_for_approval_runs_the_tool_once_and_reports_a_denial(
    tmp_path: Path, db: Database
) -> None:
    out = run_script("ops_bot.py", env_for(db), tmp_path)
    lines = out.splitlines()
    assert re.fullmatch(
        r"waiting_approval \[\('apr_[0-9a-f]{16}', 'restart', \{'service': 'nginx'\}\)\]",
        lines[0],
    )
    assert lines[1] == "refused: cli:dev may not decide approvals"
    assert out.count("[tool] restarting nginx") == 1  # approved twice, run once
    assert "done -> Outcome: nginx restarted" in lines
    assert "approving twice: done" in lines
    assert "waiting_approval [('restart', {'service': 'postgres'})]" in lines
    assert "done -> Outcome: denied by cli:oncall: not during business hours" in lines
    assert "restarting postgres" not in out
    # the decisions are rows: the CLI lists them from the same database
    listed = subprocess.run(
        [sys.executable, str(ROOT / "agentkit.py"), "approvals", "--all"],
        cwd=tmp_path,
        env=env_for(db),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "approved by cli:oncall" in listed.stdout
    assert "denied by cli:oncall" in listed.stdout


def test_daily_report_ticks_once_per_due_time_and_builds_the_report(
    tmp_path: Path, db: Database
) -> None:
    env = env_for(db)
    first = run_script("daily_report.py", env, tmp_path).splitlines()
    due = re.fullmatch(r"next daily report: (\d{4}-\d\d-\d\dT08:00:00\+0[12]:00)", first[0])
    assert due, first
    assert re.fullmatch(
        r"the tick queued job_\d+ \(daily_report\) with key schedule:daily-report:\S+Z", first[1]
    )
    assert first[2] == "ticking again at the same instant queues []"
    assert first[3].startswith("Ops daily report, ")
    assert first[4:] == [
        "- conversations active in the last 24 h: 0",
        "- approvals waiting: 0",
        "- failed jobs: none",
    ]
    # schedule() at every start is an upsert: the tick advanced it to the next morning
    second = run_script("daily_report.py", env, tmp_path).splitlines()
    after = re.fullmatch(r"next daily report: (\S+)", second[0])
    assert after
    gap = datetime.fromisoformat(after[1]) - datetime.fromisoformat(due[1])
    assert gap.total_seconds() / 3600 in (23, 24, 25)  # 23 or 25 across a DST change


def test_secret_tool_script_prints_the_link(tmp_path: Path, db: Database) -> None:
    out = run_script("secret_tool.py", env_for(db), tmp_path)
    assert "I sent you a secure link for your API token." in out
    link = r"Open this link to give API_TOKEN securely .*: http://127\.0\.0\.1:\d+/secret#"
    assert re.search(link, out), out


class FakeAPI(http.server.ThreadingHTTPServer):
    """GET /user answers {"login": "octocat"}; the Authorization headers it saw are kept."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.seen.append(self.headers.get("Authorization"))
                body = json.dumps({"login": "octocat"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_secret_tool_asks_for_the_token_then_uses_it_without_storing_it(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeAPI()
    database = testkit.database_config(db)
    testkit.clear_config(monkeypatch, CONFIG_VARS)
    for name, value in database.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("API_URL", api.url)
    example = import_example("secret_tool")
    kit: agentkit.AgentKit = example.kit
    value = "tok_" + os.urandom(12).hex()
    try:
        asked = kit.run_turn("cli:me", "Who am I on the API?")
        assert asked.status == "done" and asked.reply.startswith("I sent you a secure link")
        url = re.search(r"(http://\S+/secret#\S+)", asked.note or "")
        assert url, asked.note

        saved = kit.run_turn("cli:me", seal(url[1], {"API_TOKEN": value}))
        assert saved.status == "done", saved
        assert "Saved API_TOKEN" in (saved.note or "")

        used = kit.run_turn("cli:me", "Who am I on the API?")
        fingerprint = hashlib.sha256(value.encode()).hexdigest()[:8]
        assert used.reply == f"You are octocat (token sha256 {fingerprint}…)."
        assert api.seen == [f"Bearer {value}"]  # the tool read the secret and sent it

        for table in kit.store.tables():
            for row in kit.store.rows(table):
                assert value not in repr(row), table
        assert all(value not in json.dumps(m) for m in kit.history("cli:me"))
    finally:
        kit.close()
        api.shutdown()
        api.server_close()
    assert value.encode() not in testkit.stored_bytes(db)


# ───────────────────────────────────────── served bots ─────────────────────────────────────────


def test_quickbot_serves_the_web_chat(tmp_path: Path, db: Database) -> None:
    env = env_for(db, AGENTKIT_WEB_TOKEN=TOKEN)
    with (
        served(agentkit_command(), "quickbot:kit", env, tmp_path) as bot,
        httpx.Client(base_url=bot.url, timeout=30) as client,
    ):
        login = client.post("/api/login", json={"token": TOKEN}, headers={"Origin": bot.url})
        assert login.status_code == 204, login.text
        sent = client.post("/api/messages", json={"text": "hi"}, headers={"Origin": bot.url})
        assert sent.status_code == 202, sent.text
        items, last = [], 0
        deadline = time.monotonic() + 20
        while not any(i["kind"] == "reply" for i in items):  # a long poll after the first
            assert time.monotonic() < deadline, items
            feed = client.get("/api/feed", params={"after": last}).json()
            items, last = items + feed["items"], feed["last"]
        assert [i["text"] for i in items if i["kind"] == "reply"] == ["echo: hi"]
        bot.stop()
    assert TOKEN not in bot.log()


def test_telegram_bot_answers_and_asks_for_approval_with_buttons(
    tmp_path: Path, db: Database
) -> None:
    with FakeTelegram() as telegram, FakeOpenAI() as openai:
        env = env_for(
            db,
            TELEGRAM_BOT_TOKEN=telegram.token,
            TELEGRAM_API_URL=telegram.url,
            AGENTKIT_TELEGRAM_ALLOW="42",
            AGENTKIT_MODEL="openai:gpt-4o-mini",  # the model from the environment
            OPENAI_BASE_URL=openai.url,
        )
        openai.push(text="Hello from the model.")
        openai.push(tool_calls=[("deploy", {"version": "1.2"})])
        openai.push(text="Version 1.2 is live.")
        command = [sys.executable, str(ROOT / "agentkit.py")]  # `python ../agentkit.py`
        with served(command, "telegram_bot:kit", env, tmp_path) as bot:
            telegram.push_message(chat_id=42, user_id=42, text="hello")
            telegram.push_message(chat_id=42, user_id=42, text="/ping")
            telegram.push_message(chat_id=7, user_id=7, text="let me in")
            telegram.wait_for(lambda tg: len(tg.texts(42)) == 2 and tg.texts(7), timeout=20)
            assert sorted(telegram.texts(42)) == ["Hello from the model.", "pong, telegram:42"]
            assert "Your Telegram user id is 7" in telegram.texts(7)[0]

            telegram.push_message(chat_id=42, user_id=42, text="deploy 1.2 please")
            telegram.wait_for(lambda tg: any(s.get("reply_markup") for s in tg.sent))
            asked = next(s for s in telegram.sent if s.get("reply_markup"))
            assert "deploy" in asked["text"]
            approve, deny = asked["reply_markup"]["inline_keyboard"][0]
            assert (approve["text"], deny["text"]) == ("Approve", "Deny")
            telegram.push_callback(42, 42, approve["callback_data"], message_id=asked["message_id"])
            telegram.wait_for(lambda tg: "Version 1.2 is live." in tg.texts(42), timeout=20)
            telegram.wait_for(lambda tg: tg.answers and tg.edits)
            assert "Approved by telegram:42" in telegram.edits[-1]["text"]
            tool_result = openai.requests[-1].body["messages"][-1]
            assert tool_result["role"] == "tool" and tool_result["content"] == "version 1.2 is live"
            bot.stop()  # with a long poll in flight: it is abandoned, the lease given back
        assert telegram.token not in bot.log()


def test_json_feed_answers_each_item_once(tmp_path: Path, db: Database) -> None:
    feed, replies = tmp_path / "feed.json", tmp_path / "replies.jsonl"
    items = [
        {"id": 1, "room": "general", "user": "ann", "text": "hello"},
        {"id": 2, "room": "ops", "user": "bob", "text": "status?"},
    ]

    def write_feed() -> None:  # atomically, so a poll never reads half a file
        (tmp_path / "feed.tmp").write_text(json.dumps(items))
        os.replace(tmp_path / "feed.tmp", feed)

    def answered(count: int) -> list[dict] | None:
        lines = replies.read_text().splitlines() if replies.exists() else []
        return [json.loads(line) for line in lines] if len(lines) >= count else None

    write_feed()
    env = env_for(db, FEED_PATH=str(feed), REPLIES_PATH=str(replies))
    with served([sys.executable, str(ROOT / "agentkit.py")], "json_feed:kit", env, tmp_path) as bot:
        first = wait_until(lambda: answered(2), what="two replies")
        assert sorted((r["re"], r["room"], r["text"]) for r in first) == [
            (1, "general", "echo: hello"),
            (2, "ops", "echo: status?"),
        ]
        items.append({"id": 3, "room": "general", "user": "ann", "text": "one more"})
        write_feed()
        wait_until(lambda: answered(3), what="the third reply")
        bot.stop()
    # a second process carries on from the stored cursor: nothing is answered again
    items.append({"id": 4, "room": "ops", "user": "bob", "text": "bye"})
    write_feed()
    with served([sys.executable, str(ROOT / "agentkit.py")], "json_feed:kit", env, tmp_path) as bot:
        final = wait_until(lambda: answered(4), what="the fourth reply")
        bot.stop()
    assert final[:2] == first and [r["re"] for r in final[2:]] == [3, 4]
    assert all(r["kind"] == "reply" for r in final)
    assert final[2]["text"] == "echo: one more" and final[3]["text"] == "echo: bye"


def test_the_readme_quickstart_works_when_pasted(tmp_path: Path) -> None:
    """The two Python blocks of README's Quickstart, run as they stand."""
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    bot, script = re.findall(r"```python\n(.*?)```", quickstart, re.S)
    (tmp_path / "bot.py").write_text(bot)
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AGENTKIT_MODEL": "echo"}
    check = "import bot; print(bot.kit.run_turn('cli:me', 'hi').reply)"
    for args in (["script.py"], ["-c", check]):
        done = subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert ("done The sum is 3." if args == ["script.py"] else "echo: hi") in done.stdout
