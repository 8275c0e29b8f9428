"""MCP servers as tool sources, against real servers written with the official SDK
(mcp_servers.py): over stdio as child processes, over Streamable HTTP on loopback."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agentkit
from agentkit import AgentKit, ScriptedModel, ToolCall
from testkit import wait_until

HERE = Path(__file__).parent
STDIO = [sys.executable, str(HERE / "mcp_servers.py"), "stdio"]


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    """The folder where the test server leaves its marks (passed in its environment)."""
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


def make_kit(tmp_path: Path, steps: list[Any]) -> AgentKit:
    return AgentKit(
        tmp_path / "agent.db", model=ScriptedModel(steps), workspace=tmp_path / "workspace"
    )


def tool_results(kit: AgentKit, thread: str = "cli:me") -> list[tuple[str, str, bool]]:
    return [
        (m["name"], m["content"], m["is_error"]) for m in kit.history(thread) if m["role"] == "tool"
    ]


def an_image_was_returned(kit: AgentKit, tool: str, thread: str = "cli:me") -> str:
    """The model's note of the one image `tool` returned: stored as the thread's file, 68
    bytes of PNG, and shown to the model (what an MCP image result becomes)."""
    [message] = [m for m in kit.history(thread) if m["role"] == "tool" and m["name"] == tool]
    [file] = message["files"]
    assert (file["name"], file["mime"], file["size"]) == ("image-1.png", "image/png", 68)
    assert kit.open_file(thread, file["id"]).startswith(b"\x89PNG")
    return f"[file image-1.png (image/png, 68 bytes), id {file['id']}]"


def test_a_stdio_servers_tools_are_listed_cached_and_called_in_a_turn(
    tmp_path: Path, marks: Path
) -> None:
    seen: list[list[str]] = []

    def first(messages: list[dict], tools: list[dict]) -> Any:
        seen.append(sorted(t["name"] for t in tools if t["name"].startswith("calc")))
        return [
            ToolCall("calc_add", {"a": 2, "b": 3}),
            ToolCall("calc_shout", {"text": "hi"}),
            ToolCall("calc_fail", {"why": "disk full"}),
            ToolCall("calc_pixel", {}),
        ]

    with make_kit(tmp_path, [first, "five"]) as kit:
        server = kit.mcp("calc", command=STDIO, env={"MCP_TEST_DIR": str(marks)})
        result = kit.run_turn("cli:me", "add")
        assert result.status == "done" and result.reply == "five"
        assert seen == [
            [
                "calc_add",
                "calc_environment",
                "calc_fail",
                "calc_grow",
                "calc_pid",
                "calc_pixel",
                "calc_shout",
                "calc_wait_forever",
                "calc_watch",
            ]
        ]
        assert tool_results(kit) == [
            ("calc_add", "5", False),
            ("calc_shout", "HI", False),
            ("calc_fail", "Error executing tool fail: cannot do that: disk full", True),
            ("calc_pixel", an_image_was_returned(kit, "calc_pixel"), False),
        ]
        assert server.state == "connected"
        tools = server.tools()
        assert tools["calc_add"].idempotent  # readOnlyHint: safe to run again after a crash
        assert not tools["calc_shout"].idempotent
        cached = kit.store.mcp_tool_list("calc")
        assert cached is not None and len(cached.tools) == 9
        with pytest.raises(agentkit.McpError, match=r"refused no/such.*JSON-RPC error -32601"):
            server.connect().request("no/such", None, 10)
    assert server.state == "closed"


def test_structured_content_is_kept_unless_the_text_says_it() -> None:
    image = {"type": "image", "mimeType": "image/gif", "data": "R0lGODlh"}
    gif = agentkit.File("image-1.gif", b"GIF89a", mime="image/gif")
    assert agentkit.mcp_result({"content": [image]}) == [gif]
    broken = {**image, "data": "not base64!"}
    assert agentkit.mcp_result({"content": [broken]}) == [
        "[image: image/gif, data that is not base64]"
    ]
    said = {"content": [{"type": "text", "text": "3"}], "structuredContent": {"result": 3}}
    assert agentkit.mcp_result(said) == ["3"]
    more = {"content": [{"type": "text", "text": "ok"}], "structuredContent": {"rows": 2}}
    assert agentkit.mcp_result(more) == ['ok\n{"rows":2}']
    assert agentkit.mcp_result({"structuredContent": {"rows": 2}}) == ['{"rows":2}']


def test_pages_of_tools_are_all_listed_filtered_and_listed_again_when_changed(
    tmp_path: Path, marks: Path
) -> None:
    steps = [ToolCall("t_grow", {}), "grown", ToolCall("t_extra", {}), "used"]
    with make_kit(tmp_path, steps) as kit:
        server = kit.mcp(
            "t",
            command=[*STDIO, "--page", "2"],
            env={"MCP_TEST_DIR": str(marks)},
            tools=["grow", "extra", "add", "wait_forever"],
        )
        assert sorted(server.tools()) == ["t_add", "t_grow", "t_wait_forever"]
        assert kit.run_turn("cli:me", "grow").reply == "grown"
        wait_until(lambda: "t_extra" in server.tools(), what="the new tool")
        cached = kit.store.mcp_tool_list("t")
        assert cached is not None and len(cached.tools) == 10  # five pages, all of them
        assert kit.run_turn("cli:me", "use it").reply == "used"
        assert tool_results(kit)[-1] == ("t_extra", "extra!", False)


def test_a_process_that_has_not_connected_offers_the_cached_tools_and_connects_to_call(
    tmp_path: Path, marks: Path
) -> None:
    seen: list[str] = []

    def call(messages: list[dict], tools: list[dict]) -> Any:
        seen.extend(t["name"] for t in tools)
        return ToolCall("t_shout", {"text": "again"})

    with make_kit(tmp_path, [call, "done"]) as kit:
        schema = {"type": "object", "properties": {"text": {"type": "string"}}}
        kit.store.set_mcp_tool_list("t", [{"name": "shout", "inputSchema": schema}])
        server = kit.mcp("t", command=STDIO, env={"MCP_TEST_DIR": str(marks)})
        assert list(server.tools()) == ["t_shout"] and server.state == "not connected"
        assert kit.run_turn("cli:me", "go").status == "done"
        assert "t_shout" in seen and tool_results(kit) == [("t_shout", "AGAIN", False)]
        assert server.state == "connected"
        assert len(server.tools()) == 9  # listed again on connecting


def test_a_killed_server_fails_its_call_as_unknown_and_restarts_on_the_next(
    tmp_path: Path, marks: Path
) -> None:
    steps = [
        ToolCall("t_wait_forever", {"marker": "w"}),
        "the call was lost",
        ToolCall("t_pid", {}),
        "restarted",
    ]
    with make_kit(tmp_path, steps) as kit:
        server = kit.mcp("t", command=STDIO, env={"MCP_TEST_DIR": str(marks)})
        done: list[agentkit.TurnResult] = []
        runner = threading.Thread(target=lambda: done.append(kit.run_turn("cli:me", "wait")))
        runner.start()
        started = wait_until(lambda: (marks / "w.started").exists(), what="the call")
        assert started
        first_pid = int((marks / "w.started").read_text())
        os.kill(first_pid, signal.SIGKILL)
        runner.join(30)
        assert done[0].reply == "the call was lost"
        [(_, text, is_error)] = tool_results(kit)
        assert is_error and "exited" in text and "effect is unknown" in text
        assert server.state != "connected"
        assert kit.run_turn("cli:me", "again").reply == "restarted"
        [_, (_, pid, is_error)] = tool_results(kit)
        assert not is_error and int(pid.split()[0]) != first_pid


def test_calls_cut_by_a_crash_run_again_only_when_the_server_marks_them_read_only(
    tmp_path: Path, marks: Path
) -> None:
    db = tmp_path / "agent.db"
    victim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, agentkit\n"
            "calls = [agentkit.ToolCall('t_wait_forever', {'marker': 'w'}),\n"
            "         agentkit.ToolCall('t_watch', {'marker': 'r'})]\n"
            "kit = agentkit.AgentKit(sys.argv[1], model=agentkit.ScriptedModel([calls]), "
            "lease=1.0)\n"
            "kit.mcp('t', command=sys.argv[2:-1], env={'MCP_TEST_DIR': sys.argv[-1]})\n"
            "kit.run_turn('cli:me', 'look')\n",
            str(db),
            *STDIO,
            str(marks),
        ],
        cwd=tmp_path,
    )
    wait_until(lambda: (marks / "w.started").exists() and (marks / "r.started").exists())
    victim.kill()
    victim.wait()
    model = ScriptedModel(["one ran again"])
    with AgentKit(db, model=model, workspace=tmp_path / "workspace") as kit:
        kit.mcp("t", command=STDIO, env={"MCP_TEST_DIR": str(marks)})
        [turn_id] = [turn["id"] for turn in kit.store.rows("turns")]
        wait_until(lambda: kit.work(until_idle=True), what="the lease to run out")
        assert kit.turn(turn_id).status == "done"
        assert tool_results(kit) == [
            ("t_wait_forever", agentkit.INTERRUPTED, True),  # never silently run twice
            ("t_watch", "watched", False),
        ]


def test_cancel_tells_the_server_to_cancel_the_running_call(tmp_path: Path, marks: Path) -> None:
    with make_kit(tmp_path, [ToolCall("t_wait_forever", {"marker": "c"}), "never"]) as kit:
        kit.mcp("t", command=STDIO, env={"MCP_TEST_DIR": str(marks)})
        done: list[agentkit.TurnResult] = []
        runner = threading.Thread(target=lambda: done.append(kit.run_turn("cli:me", "wait")))
        runner.start()
        wait_until(lambda: (marks / "c.started").exists(), what="the call")
        assert kit.run_turn("cli:me", "/cancel").reply == "Cancelled 1 turn(s)."
        runner.join(30)
        assert done[0].status == "cancelled"
        wait_until(lambda: (marks / "c.cancelled").exists(), what="notifications/cancelled")
        [(_, text, is_error)] = tool_results(kit)
        assert is_error and text.startswith("cancelled")


def test_a_call_that_times_out_is_cancelled_at_the_server(tmp_path: Path, marks: Path) -> None:
    with make_kit(tmp_path, [ToolCall("t_wait_forever", {"marker": "t"}), "gave up"]) as kit:
        kit.mcp("t", command=STDIO, env={"MCP_TEST_DIR": str(marks)}, timeout=1)
        assert kit.run_turn("cli:me", "wait").reply == "gave up"
        [(_, text, is_error)] = tool_results(kit)
        assert is_error and text.startswith("timed out after 1 s")
        wait_until(lambda: (marks / "t.cancelled").exists(), what="notifications/cancelled")


def test_an_approval_gated_mcp_tool_runs_only_once_approved(tmp_path: Path, marks: Path) -> None:
    with make_kit(tmp_path, [ToolCall("t_shout", {"text": "go"}), "shouted"]) as kit:
        kit.mcp("t", command=STDIO, env={"MCP_TEST_DIR": str(marks)}, approval=True)
        waiting = kit.run_turn("cli:me", "shout", actor="cli:me")
        assert waiting.status == "waiting_approval"
        [approval] = waiting.approvals
        assert approval.tool == "t_shout" and not (marks / "shout").exists()
        assert kit.approve(approval.id, actor="cli:me").reply == "shouted"
        assert (marks / "shout").exists()
        assert tool_results(kit) == [("t_shout", "GO", False)]


def test_a_stdio_server_gets_a_minimal_environment_and_its_credentials_are_redacted(
    tmp_path: Path, marks: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-the-server")
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", "web-token-not-for-the-server")
    token = "tok-3f9a1c77e2"
    caplog.set_level(logging.INFO, logger="agentkit")
    with make_kit(tmp_path, [ToolCall("t_environment", {}), "seen"]) as kit:
        kit.mcp("t", command=STDIO, env={"MCP_TEST_DIR": str(marks), "API_TOKEN": token})
        assert kit.run_turn("cli:me", "env").reply == "seen"
        [(_, text, is_error)] = tool_results(kit)
    assert not is_error and token not in text
    seen = json.loads(text)
    inherited = {"PATH", "HOME", "LANG", "LC_CTYPE"}  # LC_CTYPE: Python's locale coercion
    assert "PATH" in seen
    assert set(seen) - inherited == {"MCP_TEST_DIR", "API_TOKEN"}  # no OPENAI_*, no AGENTKIT_*
    assert seen["API_TOKEN"] == "[redacted:t API_TOKEN]"
    stderr = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MCP server t:")]
    assert "MCP server t: token [redacted:t API_TOKEN]" in stderr
    assert all(token not in r.getMessage() for r in caplog.records)


def test_a_server_that_cannot_start_is_tried_again_only_after_its_backoff(
    tmp_path: Path,
) -> None:
    with make_kit(tmp_path, ["no tools"]) as kit:
        server = kit.mcp("down", command=[sys.executable, "-c", "import sys; sys.exit(3)"])
        assert kit.run_turn("cli:me", "hi").reply == "no tools"  # the turn goes on without
        assert server.state == "failed: MCP server down exited (code 3) before answering"
        with pytest.raises(agentkit.McpError, match=r"failed to start .* next try in"):
            server.connect()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "command= .stdio. or url="),
        ({"command": STDIO, "url": "http://127.0.0.1:1/mcp"}, "one of them"),
        ({"command": "python server.py"}, "a list of strings"),
        ({"url": "ftp://x"}, "http:// or https://"),
        ({"url": "http://127.0.0.1:1/mcp", "env": {"A": "b"}}, "env= is for a stdio"),
        ({"command": STDIO, "headers": {"A": "b"}}, "headers= is for an HTTP"),
        ({"command": STDIO, "env": {"A": 1}}, "env maps names to strings"),
        ({"command": STDIO, "timeout": 0}, "timeout must be"),
        ({"command": STDIO, "prefix": "a b"}, "a prefix is"),
    ],
)
def test_bad_mcp_options_are_refused_and_add_nothing(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with make_kit(tmp_path, ["ok"]) as kit:
        with pytest.raises(agentkit.BadInput, match=message):
            kit.mcp("t", **options)
        assert kit.engine.mcp_servers == {}
        kit.mcp("t", command=STDIO)
        with pytest.raises(agentkit.BadInput, match="already added"):
            kit.mcp("t", command=STDIO)


# ──────────────────────────────────── Streamable HTTP ────────────────────────────────────


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HTTPServer:
    """mcp_servers.py serving Streamable HTTP on a loopback port, in a subprocess."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log = folder / "http.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "mcp_servers.py"), "http", str(self.port)],
                stdout=log,
                stderr=log,
            )
        wait_until(self.up, what="the HTTP MCP server")

    def up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HTTPServer]:
    server = HTTPServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_an_http_server_is_called_hears_list_changed_and_a_lost_session_initialises_again(
    tmp_path: Path, http_server: HTTPServer
) -> None:
    steps = [
        [ToolCall("web_add", {"a": 1, "b": 41}), ToolCall("web_pixel", {})],
        "42",
        ToolCall("web_grow", {}),
        "grown",
        ToolCall("web_shout", {"text": "again"}),
        "again",
    ]
    with make_kit(tmp_path, steps) as kit:
        server = kit.mcp("web", url=http_server.url, headers={"Authorization": "Bearer abc123"})
        assert agentkit.redactions.redact("Bearer abc123") == "[redacted:web Authorization]"
        assert kit.run_turn("cli:me", "add").reply == "42"
        assert tool_results(kit) == [
            ("web_add", "42", False),
            ("web_pixel", an_image_was_returned(kit, "web_pixel"), False),
        ]
        assert "web_extra" not in server.tools()
        assert kit.run_turn("cli:me", "grow").reply == "grown"
        wait_until(lambda: "web_extra" in server.tools(), what="list_changed on the GET stream")
        http_server.stop()  # a new server process knows no session: it answers 404
        http_server.start()
        assert kit.run_turn("cli:me", "again").reply == "again"
        assert tool_results(kit)[-1] == ("web_shout", "AGAIN", False)
        assert server.state == "connected"
        sessions = http_server.log.read_text().count("Created new transport with session ID")
        assert sessions == 2
        assert "Rejected request with unknown or expired session ID" in http_server.log.read_text()
    wait_until(lambda: "Terminating session" in http_server.log.read_text(), what="DELETE")


# ──────────────────────────────────────── CLI ────────────────────────────────────────


def test_the_cli_lists_each_server_its_state_and_its_tools(tmp_path: Path, marks: Path) -> None:
    app = tmp_path / "mcpapp.py"
    app.write_text(
        "import agentkit\n"
        f"kit = agentkit.AgentKit({str(tmp_path / 'agent.db')!r}, "
        f"workspace={str(tmp_path / 'ws')!r})\n"
        f"kit.mcp('calc', command={STDIO!r}, tools=['add', 'shout'])\n"
        "kit.mcp('down', command=['/nonexistent/server'])\n"
    )
    shown = subprocess.run(
        [sys.executable, str(HERE / "agentkit.py"), "--app", "mcpapp:kit", "mcp", "list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("calc: connected (testkit 1.0, protocol 2025-11-25")
    assert "  calc_add: Add two numbers." in lines
    assert "  calc_shout: The text in capitals." in lines
    assert any(line.startswith("down: failed: cannot start MCP server down") for line in lines)
