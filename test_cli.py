"""The command line as a user meets it: real subprocesses, `chat` in a pseudo-terminal, a
fake OpenAI-compatible server over loopback for the model."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentkit
from agentkit import AgentKit
from fake_servers import FakeOpenAI
from testkit import CONFIG_VARS, Database, database_config, rows

ROOT = Path(__file__).resolve().parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def environment(tmp_path: Path, db: Database, **extra: str) -> dict[str, str]:
    """The environment of a CLI process: no configuration from the shell but the test's
    database (AGENTKIT_DB), a home of its own."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(database_config(db))
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "data"))
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def cli(
    tmp_path: Path, db: Database, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `python agentkit.py ARGS` in tmp_path, its output captured (not a terminal)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "agentkit.py"), *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment(tmp_path, db, **env),
        timeout=60,
    )


class Terminal:
    """A CLI process on a pseudo-terminal: keys go in, the screen's text is read back."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its controlling one, Ctrl-C its SIGINT
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, str(ROOT / "agentkit.py"), *args], env)
        self.raw = b""

    @property
    def screen(self) -> str:
        """What was printed so far, without ANSI styles and carriage returns."""
        return ANSI.sub("", self.raw.decode(errors="replace")).replace("\r", "")

    def read(self, timeout: float) -> bool:
        """Read what the process printed within `timeout` seconds; False at its end."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the process ended and closed the terminal
                return False
            self.raw += chunk
            return bool(chunk)
        return True

    def wait_for(self, text: str, after: int = 0, timeout: float = 60.0) -> int:
        """Read until `text` is on the screen after position `after`; where it ends."""
        for _ in range(int(timeout * 10)):
            found = self.screen.find(text, after)
            if found >= 0:
                return found + len(text)
            if not self.read(0.1):
                break
        raise AssertionError(f"{text!r} never appeared; the screen:\n{self.screen}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Read to the end of the process; its exit status."""
        for _ in range(int(timeout * 10)):
            if not self.read(0.1):  # the terminal closed: the process is ending
                break
        else:
            raise AssertionError(f"the process did not end; the screen:\n{self.screen}")
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


APP = '''
import os

import agentkit

# the test's database, the model at OPENAI_BASE_URL; a lease that never runs out in a test
model = agentkit.OpenAIModel("fake-large")
kit = agentkit.AgentKit(os.environ["AGENTKIT_DB"], model=model, lease=600)


@kit.tool
def disk_free(path: str = "/") -> str:
    """How much disk space is free."""
    return "12.3 GB free"


@kit.tool(approval=lambda args, ctx: f"restarts {args['service']}")
def restart(service: str) -> str:
    """Restart a service."""
    with open("restarted.txt", "a") as f:
        f.write(service + "\\n")
    return f"{service} restarted"
'''


def write_app(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))


def test_chat_in_a_terminal_approves_inline_cancels_with_ctrl_c_and_exits_on_ctrl_d(
    tmp_path: Path, db: Database, fake: FakeOpenAI
) -> None:
    write_app(tmp_path)
    env = environment(tmp_path, db, OPENAI_BASE_URL=fake.url)
    term = Terminal(["chat", "--app", "app:kit"], tmp_path, env)
    try:
        at = term.wait_for("model openai:fake-large, thread cli:")
        at = term.wait_for("> ", at)
        fake.push(tool_calls=[("restart", {"service": "nginx"})])
        fake.push(text="nginx is back")
        term.type("restart nginx\r")
        at = term.wait_for("approval apr_", at)
        at = term.wait_for('restart({"service": "nginx"}) waits for a decision', at)
        at = term.wait_for("agentkit approve apr_", at)
        at = term.wait_for("restart: [a]pprove / [d]eny? ", at)
        assert not (tmp_path / "restarted.txt").exists()
        term.type("a\r")
        at = term.wait_for('→ restart({"service": "nginx"})', at)  # the resumed turn, live
        at = term.wait_for("← nginx restarted", at)
        at = term.wait_for("nginx is back", at)
        assert (tmp_path / "restarted.txt").read_text() == "nginx\n"
        at = term.wait_for("> ", at)

        asked = len(fake.requests)
        fake.push_hang(600)  # the model never answers this one
        term.type("this one is slow\r")
        for _ in range(600):  # until the request reached the model
            if len(fake.requests) > asked:
                break
            term.read(0.1)
        assert len(fake.requests) == asked + 1
        term.type("\x03")  # Ctrl-C
        at = term.wait_for("(cancelled)", at)
        at = term.wait_for("> ", at)
        fake.push(text="right away")
        term.type("next one\r")
        # with the lease of 600 s, this appears only if the cancelled turn let go at once
        at = term.wait_for("right away", at)
        at = term.wait_for("> ", at)
        term.type("\x04")  # Ctrl-D
        assert term.wait_exit() == 0
    finally:
        term.close()
    assert "Traceback" not in term.screen and " INFO " not in term.screen
    with AgentKit(db) as kit:
        history = kit.history(agentkit.cli_user())
        statuses = rows(kit, "turns", "status")
        jobs = kit.jobs()
    assert statuses == ["done", "cancelled", "done"]
    assert "running" not in {job.state for job in jobs}
    said = [m["content"] for m in history if m["role"] == "user"]
    assert said == ["restart nginx", "this one is slow", "next one"]
    replies = [m.get("content") for m in history if m["role"] == "assistant" and m.get("content")]
    assert replies == ["nginx is back", "right away"]  # the cancelled turn never ran later
    lines = (tmp_path / "data" / "agentkit" / "chat_history").read_text()
    assert "restart nginx" in lines and "next one" in lines


def test_chat_in_a_terminal_shows_tool_calls_and_tokens_as_they_arrive(
    tmp_path: Path, db: Database, fake: FakeOpenAI
) -> None:
    write_app(tmp_path)
    term = Terminal(
        ["chat", "--app", "app:kit"], tmp_path, environment(tmp_path, db, OPENAI_BASE_URL=fake.url)
    )
    try:
        at = term.wait_for("> ")
        fake.push(tool_calls=[("disk_free", {"path": "/"})])
        release = fake.hold("The **disk** has `12.3 GB` free.")
        term.type("disk?\r")
        at = term.wait_for('→ disk_free({"path": "/"})', at)
        at = term.wait_for("← 12.3 GB free", at)
        at = term.wait_for("The ", at)  # the first delta, while the server holds the rest
        assert "free." not in term.screen[at:]
        release.set()
        at = term.wait_for("The disk has 12.3 GB free.", at - 4)
        assert "\x1b[1mdisk\x1b[22m" in term.raw.decode()  # bold on a terminal, no stars
        assert "\x1b[2m→ disk_free(" in term.raw.decode()  # tool lines dimmed
        at = term.wait_for("> ", at)
        term.type("\x04")
        assert term.wait_exit() == 0
    finally:
        term.close()


def test_run_streams_plain_text_into_a_pipe(tmp_path: Path, db: Database, fake: FakeOpenAI) -> None:
    release = fake.hold("The **disk** is fine.")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "agentkit.py"), "run", "disk?", "-m", "openai:fake-large"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=environment(tmp_path, db, OPENAI_BASE_URL=fake.url),
    )
    try:
        seen = b""
        for _ in range(600):  # until the first delta is in the pipe, the rest held
            if select.select([proc.stdout], [], [], 0.1)[0]:
                seen += os.read(proc.stdout.fileno(), 4096)
            if seen:
                break
        assert seen == b"The "
        release.set()
        rest, errors = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert (seen + rest).decode() == "The **disk** is fine.\n"  # plain when piped
    assert proc.returncode == 0 and errors == b""


def test_run_exit_status_says_done_waiting_or_failed_and_prints_how_to_decide(
    tmp_path: Path, db: Database, fake: FakeOpenAI
) -> None:
    write_app(tmp_path)
    model = ["--app", "app:kit"]
    env = {"OPENAI_BASE_URL": fake.url}
    fake.push(text="all fine")
    done = cli(tmp_path, db, "run", "status?", *model, **env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "all fine\n", "")

    fake.push(tool_calls=[("restart", {"service": "db"})])
    waiting = cli(tmp_path, db, "run", "restart db", *model, **env)
    assert waiting.returncode == 3, waiting.stderr
    approval = re.search(r"approval (apr_\w+): restart\(\{\"service\": \"db\"\}\)", waiting.stderr)
    assert approval, waiting.stderr
    apr = approval[1]
    assert f"agentkit approve {apr} --app app:kit" in waiting.stderr
    assert f"agentkit deny {apr} --app app:kit" in waiting.stderr

    held = cli(tmp_path, db, "run", "and then?", *model, **env)  # the thread waits: it is held
    assert held.returncode == 3 and f"/approve {apr}" in held.stderr

    fake.push(text="db restarted")  # the resumed turn, run by `approve` itself
    approved = cli(tmp_path, db, "approve", apr, "--app", "app:kit", **env)
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout == f"approved {apr}\ndb restarted\n"
    assert (tmp_path / "restarted.txt").read_text() == "db\n"
    fake.push(text="then nothing")  # the held message, now free: `work` runs it
    assert cli(tmp_path, db, "work", "--app", "app:kit", "--until-idle", **env).returncode == 0
    assert cli(tmp_path, db, "show", agentkit.cli_user()).stdout.endswith(
        "assistant: then nothing\n"
    )

    fake.push_error(400, {"error": {"message": "no such model"}})
    failed = cli(tmp_path, db, "run", "again", *model, **env)
    assert failed.returncode == 1 and "failed" in failed.stderr and "no such model" in failed.stderr
    assert "INFO" not in done.stderr + waiting.stderr + failed.stderr  # no log line by default


def test_approve_without_the_app_says_that_nothing_here_runs_the_call(
    tmp_path: Path, db: Database
) -> None:
    write_app(tmp_path)
    with AgentKit(db, model=agentkit.ScriptedModel([RESTART])) as kit:
        kit.tool(approval=True, name="restart")(lambda service: service)
        apr = kit.run_turn("cli:me", "restart").approvals[0].id
    bare = cli(tmp_path, db, "approve", apr)
    assert bare.returncode == 0
    assert (
        bare.stdout.startswith(f"approved {apr}; turn ") and "nothing here runs it" in bare.stdout
    )
    assert not (tmp_path / "restarted.txt").exists()
    worked = cli(tmp_path, db, "work", "--app", "app:kit", "--until-idle")
    assert worked.returncode == 0, worked.stderr
    assert (tmp_path / "restarted.txt").read_text() == "nginx\n"


RESTART = agentkit.ToolCall("restart", {"service": "nginx"})


def test_run_reads_stdin_prints_json_lines_and_names_its_version(
    tmp_path: Path, db: Database
) -> None:
    piped = cli(tmp_path, db, "run", stdin="from a pipe\n")
    assert (piped.returncode, piped.stdout) == (0, "echo: from a pipe\n")
    dash = cli(tmp_path, db, "run", "-", "--json", stdin="dash")
    events = [json.loads(line) for line in dash.stdout.splitlines()]
    assert events[-1]["kind"] == "done" and events[-1]["result"]["reply"] == "echo: dash"
    assert events[-1]["result"]["status"] == "done"
    texts = [e["text"] for e in events if e["kind"] == "text"]
    assert len(texts) > 1 and "".join(texts) == "echo: dash"  # the deltas, as they came
    version = cli(tmp_path, db, "--version")
    assert version.stdout == f"agentkit {agentkit.__version__}\n"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'version = { attr = "agentkit.__version__" }' in pyproject
    assert cli(tmp_path, db, "run", stdin="").returncode == 2  # an empty message
    assert cli(tmp_path, db, "run", "-m", "nosuch:model", "hi").returncode == 2
    assert cli(tmp_path, db, "run", "--frobnicate").returncode == 2
    assert cli(tmp_path, db, "run", "hi", AGENTKIT_LOG_LEVEL="LOUD").returncode == 2
    verbose = cli(tmp_path, db, "run", "-v", "hi")
    assert " INFO agentkit: turn_" in verbose.stderr
    logged = cli(tmp_path, db, "run", "hi", AGENTKIT_LOG_LEVEL="info")
    assert " INFO agentkit: turn_" in logged.stderr
    missing = cli(tmp_path, db, "approve", "apr_missing")
    assert missing.returncode == 1 and "no approval apr_missing" in missing.stderr
    assert cli(tmp_path, db, "jobs", "show", "job_999").returncode == 1


def test_a_bare_run_takes_the_first_model_of_openai_base_url_and_says_so(
    tmp_path: Path, db: Database, fake: FakeOpenAI
) -> None:
    fake.push(text="hello from the server")
    out = cli(tmp_path, db, "run", "hi", OPENAI_BASE_URL=fake.url)
    assert out.returncode == 0 and out.stdout == "hello from the server\n"
    assert "using openai:fake-large" in out.stderr and "/v1/models" in out.stderr
    assert fake.requests[-1].body["model"] == "fake-large"
    fake.push(text="short")
    system = cli(tmp_path, db, "run", "hi", "-q", "-s", "Be terse.", OPENAI_BASE_URL=fake.url)
    assert (system.stdout, system.stderr) == ("short\n", "")  # -q: no note on the model
    assert fake.requests[-1].body["messages"][0] == {"role": "system", "content": "Be terse."}
    named = cli(tmp_path, db, "run", "hi", "-m", "echo", OPENAI_BASE_URL=fake.url)
    assert (named.stdout, named.stderr) == ("echo: hi\n", "")
    gone = cli(tmp_path, db, "run", "hi", OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    assert gone.stdout == "echo: hi\n" and "lists no model" in gone.stderr and "echo" in gone.stderr


def test_the_markdown_pen_styles_pieces_however_they_are_cut() -> None:
    text = "# Title\nSome **bold** and `code`.\n```py\nx = 1 * 2\n```\nend *x*"
    whole = agentkit.MarkdownPen()
    styled = whole.feed(text) + whole.end()
    assert ANSI.sub("", styled) == "Title\nSome bold and code.\nx = 1 * 2\nend *x*"
    assert "\x1b[1mbold\x1b[22m" in styled and "\x1b[36mcode\x1b[39m" in styled
    for size in (1, 2, 3, 5):
        pen = agentkit.MarkdownPen()
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert "".join(pen.feed(p) for p in pieces) + pen.end() == styled


def test_a_turn_interrupted_by_ctrl_c_hands_its_job_back_and_cancels_at_once(
    tmp_path: Path,
    db: Database,
) -> None:
    def interrupted(messages: list, tools: list) -> str:
        raise KeyboardInterrupt

    with AgentKit(db, lease=600) as kit:
        kit.engine.model = agentkit.ScriptedModel([interrupted, "the next one"])
        with pytest.raises(KeyboardInterrupt):
            kit.run_turn("cli:me", "first")
        (job,) = kit.jobs()
        assert (job.state, job.last_error) == (
            "queued",
            "interrupted: its worker stopped before finishing",
        )
        (turn_id,) = rows(kit, "turns", "id")
        assert kit.cancel(turn_id).status == "cancelled"
        assert kit.job(job.id).state == "cancelled"
        assert kit.run_turn("cli:me", "second", timeout=0).reply == "the next one"


SECRET_APP = """
import os

import agentkit

ask = agentkit.ToolCall("secret_request", {"reason": "to deploy", "fields": ["API_TOKEN"]})
model = agentkit.ScriptedModel([ask, "Use the link."])
kit = agentkit.AgentKit(os.environ["AGENTKIT_DB"], model=model)
"""


def test_run_prints_the_link_of_a_secret_request(tmp_path: Path, db: Database) -> None:
    (tmp_path / "sec.py").write_text(SECRET_APP)
    out = cli(tmp_path, db, "run", "--app", "sec:kit", "deploy")
    assert out.returncode == 0 and out.stdout == "Use the link.\n"
    assert "Open this link to give API_TOKEN securely" in out.stderr
    assert re.search(r"http://127\.0\.0\.1:\d+/secret#v=1&id=sec_\w+&key=", out.stderr)


def test_cancel_at_once_frees_the_thread_and_fences_the_worker_still_running(
    tmp_path: Path,
    db: Database,
) -> None:
    started, release = threading.Event(), threading.Event()
    model = agentkit.ScriptedModel([agentkit.ToolCall("slow", {}), "the next one"])
    with AgentKit(db, model=model, lease=600) as kit:

        @kit.tool
        def slow() -> str:
            """Wait until released."""
            started.set()
            release.wait(60)
            return "too late"

        events = kit.stream_turn("cli:me", "first")
        first = threading.Thread(target=lambda: list(events), daemon=True)
        first.start()
        assert started.wait(60)
        (turn_id,) = rows(kit, "turns", "id")
        assert kit.cancel(turn_id, at_once=True).status == "cancelled"
        assert kit.run_turn("cli:me", "second", timeout=0).reply == "the next one"
        release.set()
        first.join(60)
        history = kit.history("cli:me")
        assert kit.turn(turn_id).status == "cancelled"
    calls = [m for m in history if m["role"] == "assistant" and m.get("tool_calls")]
    results = [m for m in history if m["role"] == "tool"]
    assert len(calls) == len(results) == 1  # the call the model made keeps a result
    assert results[0]["content"] == agentkit.CANCELLED_RUNNING  # not the late "too late"
    assert history[-1] == {"role": "assistant", "content": "the next one"}


def test_chat_says_what_was_wrong_with_a_message_and_goes_on(tmp_path: Path, db: Database) -> None:
    out = cli(tmp_path, db, "chat", stdin="x" * 100_001 + "\nstill here\n")
    assert out.returncode == 0
    assert "at most 100,000 characters" in out.stderr and out.stdout == "echo: still here\n"


def test_chat_starts_with_what_the_thread_waits_for(
    tmp_path: Path, db: Database, fake: FakeOpenAI
) -> None:
    write_app(tmp_path)
    env = {"OPENAI_BASE_URL": fake.url}
    fake.push(tool_calls=[("restart", {"service": "nginx"})])
    assert cli(tmp_path, db, "run", "restart nginx", "--app", "app:kit", **env).returncode == 3
    fake.push(text="fine, I leave it")
    term = Terminal(["chat", "--app", "app:kit"], tmp_path, environment(tmp_path, db, **env))
    try:
        at = term.wait_for("approval apr_")
        at = term.wait_for("restart: [a]pprove / [d]eny? ", at)
        term.type("d\r")
        at = term.wait_for("fine, I leave it", at)
        at = term.wait_for("> ", at)
        term.type("\x04")
        assert term.wait_exit() == 0
    finally:
        term.close()
    assert not (tmp_path / "restarted.txt").exists()
    assert "denied by cli:" in fake.requests[-1].body["messages"][-1]["content"]


def test_ctrl_c_in_run_cancels_the_turn_and_exits_130_at_once(
    tmp_path: Path, db: Database, fake: FakeOpenAI
) -> None:
    write_app(tmp_path)
    fake.push_hang(600)  # the model never answers
    env = environment(tmp_path, db, OPENAI_BASE_URL=fake.url)
    term = Terminal(["run", "--app", "app:kit", "slow"], tmp_path, env)
    try:
        for _ in range(600):  # until the request reached the model
            if fake.requests:
                break
            term.read(0.1)
        term.type("\x03")
        term.wait_for("(cancelled)")
        # it does not wait for the model's timeout (120 s) to exit
        assert term.wait_exit(timeout=60) == 130
    finally:
        term.close()
    with AgentKit(db) as kit:
        (status,) = rows(kit, "turns", "status")
    assert status == "cancelled"
