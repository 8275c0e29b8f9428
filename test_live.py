"""Live turns: models stream text deltas, the engine publishes turn events that are never
stored, `stream_turn` yields them (live in this process, from the stored steps for a turn
a worker elsewhere runs), hooks hear `reply_delta` and `tool_progress`.

Real parts: SQLite files under tmp_path, fake OpenAI and Anthropic servers over loopback
that hold a stream open until the test releases it, and a real worker subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import agentkit
from agentkit import AgentKit, ScriptedModel, ToolCall, ToolContext, TurnEvent
from fake_servers import FakeAnthropic, FakeOpenAI
from testkit import Database, clear_config, count, wait_until

ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_config(monkeypatch)
    # tokens other tests registered would hold back the end of deltas that could begin one
    monkeypatch.setattr(agentkit.redactions, "values", {})


def texts_by_step(events: list[TurnEvent]) -> dict[int, str]:
    joined: dict[int, str] = {}
    for event in events:
        if event.kind == "text":
            joined[event.step] = joined.get(event.step, "") + event.text
    return joined


def assistant_texts(kit: AgentKit, thread: str) -> list[str | None]:
    return [m["content"] for m in kit.history(thread) if m["role"] == "assistant"]


def test_stream_turn_yields_deltas_tools_progress_and_done(db: Database) -> None:
    model = ScriptedModel(
        [ToolCall("disk_free", {"path": "/"}), "Disk / has **10 GB** free, plenty."]
    )
    kit = AgentKit(db, model=model)
    heard: list[tuple[str, Any]] = []

    @kit.tool
    def disk_free(path: str, ctx: ToolContext) -> str:
        """Free space."""
        ctx.progress(f"checking {path}")
        return "10 GB"

    kit.on("reply_delta")(lambda e: heard.append(("delta", (e.text, e.step, e.turn_id))))
    kit.on("tool_progress")(lambda e: heard.append(("progress", (e.tool, e.call_id, e.text))))
    with kit:
        events = list(kit.stream_turn("cli:me", "how much disk?"))
        kinds = [e.kind for e in events]
        assert kinds[:3] == ["tool_start", "progress", "tool_end"]
        assert kinds[-1] == "done" and kinds.count("done") == 1
        assert kinds.count("text") > 1  # the reply came in several deltas
        start, progress, end = events[:3]
        assert (start.tool, start.args, start.step) == ("disk_free", {"path": "/"}, 0)
        assert progress.text == "checking /" and progress.call_id == start.call_id
        assert (end.result, end.is_error, end.call_id) == ("10 GB", False, start.call_id)
        done = events[-1]
        assert isinstance(done.result, agentkit.TurnResult)
        assert done.result.status == "done" and done.result.reply == model_reply(kit)
        assert texts_by_step(events) == {1: "Disk / has **10 GB** free, plenty."}
        assert assistant_texts(kit, "cli:me") == [None, "Disk / has **10 GB** free, plenty."]
        deltas = [value for kind, value in heard if kind == "delta"]
        assert "".join(text for text, _, _ in deltas) == done.result.reply
        assert {step for _, step, _ in deltas} == {1}
        assert {turn for _, _, turn in deltas} == {done.result.turn_id}
        assert ("progress", ("disk_free", start.call_id, "checking /")) in heard


def model_reply(kit: AgentKit) -> str | None:
    return assistant_texts(kit, "cli:me")[-1]


def test_events_are_not_stored(db: Database) -> None:
    with AgentKit(db, model="echo") as kit:
        list(kit.stream_turn("cli:me", "one two three four"))
        streamed = count(kit, "events")
        kit.run_turn("cli:me", "one two three four")
        unstreamed = count(kit, "events") - streamed
        assert streamed == unstreamed  # streaming wrote no row of its own
        assert count(kit, "deliveries", kind="reply") == 0
        assert assistant_texts(kit, "cli:me") == ["echo: one two three four"] * 2


def test_approval_event_then_done_waiting(db: Database) -> None:
    kit = AgentKit(db, model=ScriptedModel([ToolCall("restart", {"s": "x"})]))

    @kit.tool(approval=True)
    def restart(s: str) -> str:
        """Restart."""
        return "ok"

    with kit:
        events = list(kit.stream_turn("cli:me", "restart x"))
        assert [e.kind for e in events] == ["approval", "done"]
        assert events[0].approval.tool == "restart" and events[0].approval.args == {"s": "x"}
        assert events[-1].result.status == "waiting_approval"
        assert events[-1].result.approvals[0].id == events[0].approval.id


def test_a_command_streams_its_answer(db: Database) -> None:
    with AgentKit(db, model="echo") as kit:
        events = list(kit.stream_turn("cli:me", "/help"))
        assert [e.kind for e in events] == ["text", "done"]
        assert events[0].text == events[1].result.reply and "/help" in events[0].text


def test_bad_input_is_refused_at_once(db: Database) -> None:
    with AgentKit(db, model="echo") as kit:
        with pytest.raises(agentkit.BadInput):
            kit.stream_turn("no-colon", "hi")
        with pytest.raises(agentkit.BadInput):
            kit.stream_turn("cli:me", 42)  # type: ignore[arg-type]
        assert kit.threads() == []


class CharModel:
    """Streams its reply one character at a time (to cut a secret across deltas)."""

    name = "chars"
    can_stream = True

    def __init__(self, text: str) -> None:
        self.text = text

    def complete(self, instructions, messages, tools, *, on_delta=None):
        for char in self.text:
            on_delta(char)
        return agentkit.ModelReply(self.text, [], {})


def test_a_secret_cut_across_deltas_never_reaches_a_watcher(db: Database) -> None:
    secret = "hunter2-very-secret"
    kit = AgentKit(db, model=CharModel(f"your password is {secret}, hush"))
    agentkit.write_secret(agentkit.secrets_folder(kit.secrets.workspace, "cli:me"), "PW", secret)
    heard: list[str] = []
    kit.on("reply_delta")(lambda e: heard.append(e.text))
    with kit:
        events = list(kit.stream_turn("cli:me", "what is it?"))
        stored = "your password is [redacted:PW], hush"
        assert assistant_texts(kit, "cli:me") == [stored]
        assert texts_by_step(events) == {0: stored} and "".join(heard) == stored
        shown = "".join(e.text for e in events if e.kind == "text")
        assert "hunter" not in shown and not any("hu" in piece for piece in heard[:16])
        assert len([e for e in events if e.kind == "text"]) > 10  # it still streamed


def test_a_retried_stream_does_not_repeat_what_was_shown(db: Database) -> None:
    with FakeOpenAI() as fake:
        fake.push_cut()  # "This answer is cut short.", cut in the middle
        fake.push(text="This answer is cut short.")
        model = agentkit.OpenAIModel("m", base_url=fake.url, api_key="k")
        model.backoff_base = 0.0
        with AgentKit(db, model=model) as kit:
            events = list(kit.stream_turn("cli:me", "hi"))
            assert texts_by_step(events) == {0: "This answer is cut short."}
            assert len(fake.requests) == 2


@pytest.mark.parametrize("fake_class", [FakeOpenAI, FakeAnthropic])
def test_the_first_delta_arrives_before_the_stream_is_released(
    db: Database, fake_class: type
) -> None:
    with fake_class() as fake:
        release = fake.hold("Streaming replies arrive piece by piece.")
        if fake_class is FakeOpenAI:
            model: Any = agentkit.OpenAIModel("m", base_url=fake.url, api_key="k")
        else:
            model = agentkit.AnthropicModel("m", base_url=fake.url, api_key="k")
        kit = AgentKit(db, model=model)
        hooked = threading.Event()
        kit.on("reply_delta")(lambda e: hooked.set())
        with kit:
            events = kit.stream_turn("cli:me", "hi")
            first = next(events)  # the first delta (its end may wait while it could begin
            assert first.kind == "text" and first.text  # a known secret): at most 4 characters
            assert "Streaming replies arrive piece by piece.".startswith(first.text)
            assert hooked.is_set() and not release.is_set()
            assert kit.turn(first.turn_id).status == "running"
            release.set()
            rest = list(events)
            assert rest[-1].kind == "done"
            assert texts_by_step([first, *rest]) == {0: "Streaming replies arrive piece by piece."}
            assert rest[-1].result.reply == "Streaming replies arrive piece by piece."


def test_astream_turn(db: Database) -> None:
    async def collect(kit: AgentKit) -> list[TurnEvent]:
        return [event async for event in kit.astream_turn("cli:me", "a b c")]

    with AgentKit(db, model="echo") as kit:
        events = asyncio.run(collect(kit))
        assert texts_by_step(events) == {0: "echo: a b c"}
        assert events[-1].kind == "done" and events[-1].result.status == "done"


WORKER = """
import sys, threading
import agentkit
from agentkit import AgentKit, ScriptedModel, ToolCall
gate = sys.argv[2]
def wait_for_gate(messages, tools):
    import os, time
    while not os.path.exists(gate):
        time.sleep(0.01)
    return "All done: 42."
kit = AgentKit(sys.argv[1], model=ScriptedModel([ToolCall("answer", {}), wait_for_gate]))
@kit.tool
def answer() -> int:
    \"\"\"The answer.\"\"\"
    return 42
print("ready", flush=True)
while kit.work(until_idle=True) == 0:
    import time; time.sleep(0.01)
"""


def test_stream_turn_follows_a_turn_another_process_runs(tmp_path: Path, db: Database) -> None:
    gate = tmp_path / "gate"
    with AgentKit(db, model="echo") as kit:
        started = kit.run_turn("cli:me", "what is the answer?", source_id="m1", wait=False)
        worker = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WORKER), str(db), str(gate)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: kit.turn(started.turn_id).status == "running", what="the worker")
            events = kit.stream_turn("cli:me", "what is the answer?", source_id="m1")
            first = next(events)  # the stored tool call, before the last step exists
            assert (first.kind, first.tool) == ("tool_start", "answer")
            second = next(events)
            assert (second.kind, second.result) == ("tool_end", "42")
            gate.touch()
            rest = list(events)
            assert [e.kind for e in rest] == ["text", "done"]
            assert rest[0].text == "All done: 42." and rest[0].step == 1
            assert rest[-1].result.status == "done" and rest[-1].result.turn_id == started.turn_id
        finally:
            worker.kill()
            worker.wait()


def test_a_failed_turn_logs_why_redacted(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    token = "sk-live-this-must-not-show"
    agentkit.redactions.add(token, "key")

    def broken(messages: list, tools: list) -> str:
        raise agentkit.ModelError(f"HTTP 401: bad key {token}")

    with AgentKit(db, model=ScriptedModel([broken])) as kit:
        try:
            with caplog.at_level(logging.INFO, logger="agentkit"):
                result = kit.run_turn("cli:me", "hi")
        finally:
            agentkit.redactions.values.pop(token)
        assert result.status == "failed"
        lines = [r.getMessage() for r in caplog.records if "failed after 0 steps" in r.getMessage()]
        assert len(lines) == 1
        assert "HTTP 401: bad key [redacted:key]" in lines[0] and token not in lines[0]


def test_a_raising_delta_hook_is_logged_not_fatal(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with AgentKit(db, model="echo") as kit:

        @kit.on("reply_delta")
        def broken(event: Any) -> None:
            raise RuntimeError("watcher bug")

        with caplog.at_level(logging.ERROR, logger="agentkit"):
            result = kit.run_turn("cli:me", "still fine")
        assert (result.status, result.reply) == ("done", "echo: still fine")
        assert any("reply_delta" in r.getMessage() for r in caplog.records)


def test_progress_takes_text_and_is_nothing_outside_a_call(db: Database) -> None:
    kit = AgentKit(db, model=ScriptedModel([ToolCall("work", {}), "ok"]))
    refused: list[str] = []

    @kit.tool
    def work(ctx: ToolContext) -> str:
        """Work."""
        try:
            ctx.progress(42)  # type: ignore[arg-type]
        except agentkit.BadInput as e:
            refused.append(str(e))
        return "done"

    @kit.command("quiet")
    def quiet(ctx: ToolContext, args: str) -> str:
        """Report progress outside a tool call."""
        ctx.progress("nobody hears this")
        return "shh"

    with kit:
        events = list(kit.stream_turn("cli:me", "go"))
        assert refused and [e.kind for e in events].count("progress") == 0
        assert [e.kind for e in kit.stream_turn("cli:me", "/quiet")] == ["text", "done"]


CLIPPED_SECRET = "AAAAsecretvalueOFthreadA"


def test_clipped_progress_does_not_show_part_of_a_secret(db: Database):
    model = agentkit.ScriptedModel([agentkit.ToolCall("prog", {}), "done"])
    kit = agentkit.AgentKit(str(db), model=model)
    agentkit.write_secret(
        agentkit.secrets_folder(kit.engine.workspace, "cli:a"), "API_TOKEN", CLIPPED_SECRET
    )

    @kit.tool()
    def prog(ctx: agentkit.ToolContext) -> str:
        """Report progress."""
        ctx.progress("x" * 480 + ctx.secret("API_TOKEN"))
        return "ok"

    texts = [e.text for e in kit.stream_turn("cli:a", "go") if e.kind == "progress"]
    kit.close()
    assert texts
    assert not any(CLIPPED_SECRET[:12] in text for text in texts)
