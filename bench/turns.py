"""Benchmark agentkit's turn engine against the OpenAI Agents SDK and pydantic-ai.

Setup (this script installs nothing):  pip install -e '.[bench]'
Run from the repository root:          python bench/turns.py [--quick] [--dir DIR]

One turn is the same everywhere: the user says "add 1 and 2", a scripted model calls the
tool `add(a: int, b: int) -> int`, gets 3 back and answers "The sum is 3.". Each framework
keeps its conversations in an SQLite file of its own, fresh for every row:

- agentkit: `AgentKit(path, model=ScriptedModel(steps))` and `kit.run_turn(thread, text)`.
- OpenAI Agents SDK: its test double `agents.testing.ScriptedModel`, `Runner.run_sync` and
  `SQLiteSession(thread, path)`; tracing disabled.
- pydantic-ai: `FunctionModel` and `agent.run_sync(text, message_history=...)`; the history
  is loaded from a table of JSON rows (`ModelMessagesTypeAdapter`) and each turn's new
  messages are saved as one row in one transaction (WAL, synchronous=NORMAL, as agentkit).

Rows: a new thread per turn, and one thread whose history grows. Each row reports turns per
second (wall clock, after a short warm-up on a throwaway file) and database bytes per turn
(the file plus its -wal after `PRAGMA wal_checkpoint(TRUNCATE)`). Every answer and the
number of tool calls are checked: a wrong answer or a crash makes the exit status non-zero;
a missed target is only reported. An audit hook refuses any network connection but to
127.0.0.1.

A second table streams: the same fake OpenAI-compatible server (fake_servers.FakeOpenAI,
over loopback, Chat Completions with server-sent events) answers every framework's turn
with one text reply. agentkit runs the turn with `run_turn` and with `stream_turn`,
alternating, side by side (target: streamed at most 1.10× the unstreamed time); the peers
run theirs with pydantic-ai's `agent.run_stream` (`stream_text(delta=True)`) and the
Agents SDK's `Runner.run_streamed` (`stream_events()`, text delta events). Each row gives
turns per second and the mean time to the first text delta; every streamed text is checked.

A third table is about long threads: agentkit with compaction on (a 16,000-token window),
one turn in a thread of 5,000 messages (filled by real turns, compacting as it grew) beside
one turn in a thread of 10, alternating (target: at most 2× the time; the summary is
reused, not recomputed, and the model is sent the summary and the recent messages only).
The peers have no equivalent to run here: the Agents SDK's
`OpenAIResponsesCompactionSession` calls OpenAI's Responses API to compact (OpenAI only,
over the network), and pydantic-ai leaves trimming or summarising history to user code.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder is sys.path[0], and its queue.py would shadow the standard
# library's `queue`: put the repository root there instead, to benchmark this checkout.
if os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tracing off in the Agents SDK from its import on (main also calls set_tracing_disabled).
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"

import argparse
import asyncio
import contextlib
import gc
import platform
import socket
import sqlite3
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

try:
    import agents
    import apsw
    import pydantic_ai
    from agents.testing import ScriptedModel as AgentsScriptedModel
    from agents.testing import assistant_message, function_call
    from pydantic_ai.messages import (
        ModelMessage,
        ModelMessagesTypeAdapter,
        ModelRequest,
        ModelResponse,
        TextPart,
        ToolCallPart,
        ToolReturnPart,
    )
    from pydantic_ai.models.function import AgentInfo, FunctionModel
except ImportError as missing:  # pragma: no cover - depends on the environment
    sys.exit(f"missing benchmark dependency ({missing}); run: pip install -e '.[bench]'")

import agentkit
from fake_servers import FakeOpenAI

PROMPT = "add 1 and 2"
ANSWER = "The sum is 3."
INSTRUCTIONS = "You are a helpful assistant."
WARMUP_TURNS = 5
TARGET = 2.0  # agentkit turns/s ÷ the faster peer's


@dataclass(frozen=True)
class Config:
    """Turn counts for one run."""

    new_thread_turns: int  # row 1: every turn in a thread of its own
    one_thread_turns: int  # row 2: every turn in the same thread
    streamed_turns: int  # the streaming table: turns per API
    long_messages: int  # the long-thread table: messages in the long thread
    long_turns: int  # the long-thread table: turns timed in each thread size


FULL_RUN = Config(
    new_thread_turns=1000,
    one_thread_turns=200,
    streamed_turns=200,
    long_messages=5_000,
    long_turns=200,
)
QUICK_RUN = Config(
    new_thread_turns=30, one_thread_turns=15, streamed_turns=15, long_messages=400, long_turns=10
)


class CheckFailed(Exception):
    """A framework gave a wrong answer or ran the tool a wrong number of times."""


def refuse_network(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: no socket may connect or resolve a name but local socket pairs and
    127.0.0.1 (the fake streaming server)."""
    if event == "socket.getaddrinfo" and args[0] != "127.0.0.1":
        raise RuntimeError(f"the benchmark must not use the network ({event} {args})")
    if (
        event == "socket.connect"
        and args[0].family != socket.AF_UNIX
        and not (isinstance(args[1], tuple) and args[1][0] == "127.0.0.1")
    ):
        raise RuntimeError(f"the benchmark must not use the network ({event} {args[1:]})")


# ─────────────────────────────────────── frameworks ───────────────────────────────────────


class Runner(ABC):
    """One framework set up over one database file: runs turns and counts tool calls."""

    name: ClassVar[str]

    def __init__(self, path: Path, turns: int) -> None:
        self.path = path
        self.tool_calls = 0

    def make_add(self) -> Callable[[int, int], int]:
        """The benchmark's tool, counting its calls on this runner."""

        def add(a: int, b: int) -> int:
            """Add two integers."""
            self.tool_calls += 1
            return a + b

        return add

    @abstractmethod
    def turn(self, thread: str) -> str:
        """Run one turn in `thread`; the final answer."""

    @abstractmethod
    def close(self) -> None:
        """Release the database (every connection closed)."""


class AgentKitRunner(Runner):
    """agentkit: the scripted model plays a tool call then the answer, per turn."""

    name = "agentkit"

    def __init__(self, path: Path, turns: int) -> None:
        super().__init__(path, turns)
        steps: list[agentkit.ScriptStep] = [
            agentkit.ToolCall("add", {"a": 1, "b": 2}),
            ANSWER,
        ] * turns
        # The whole history in every model call, as the peers send it (the scripted model's
        # default window of 128,000 tokens holds every turn here, so nothing is compacted).
        self.kit = agentkit.AgentKit(path, model=agentkit.ScriptedModel(steps))
        self.kit.tool(self.make_add())

    def turn(self, thread: str) -> str:
        return self.kit.run_turn(thread, PROMPT).reply or ""

    def close(self) -> None:
        self.kit.close()


class OpenAIAgentsRunner(Runner):
    """OpenAI Agents SDK: its ScriptedModel, Runner.run_sync and an SQLiteSession."""

    name = "openai-agents"

    def __init__(self, path: Path, turns: int) -> None:
        super().__init__(path, turns)
        steps: list[Any] = []
        for i in range(turns):
            steps.append([function_call("add", {"a": 1, "b": 2}, call_id=f"call_{i}")])
            steps.append([assistant_message(ANSWER, item_id=f"msg_{i}")])
        self.agent = agents.Agent(
            name="bench",
            instructions=INSTRUCTIONS,
            model=AgentsScriptedModel(steps),
            tools=[agents.function_tool(self.make_add())],
        )
        self.session: agents.SQLiteSession | None = None

    def turn(self, thread: str) -> str:
        if self.session is None or self.session.session_id != thread:
            if self.session is not None:
                self.session.close()
            self.session = agents.SQLiteSession(thread, self.path)
        result = agents.Runner.run_sync(self.agent, PROMPT, session=self.session)
        return str(result.final_output)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def scripted_reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """pydantic-ai's scripted model: call `add` for a new prompt, answer after its result."""
    last = messages[-1]
    if isinstance(last, ModelRequest) and any(isinstance(p, ToolReturnPart) for p in last.parts):
        return ModelResponse(parts=[TextPart(ANSWER)])
    return ModelResponse(parts=[ToolCallPart("add", {"a": 1, "b": 2})])


class PydanticAIRunner(Runner):
    """pydantic-ai: FunctionModel, run_sync, and the thread's messages kept as JSON rows."""

    name = "pydantic-ai"

    def __init__(self, path: Path, turns: int) -> None:
        super().__init__(path, turns)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS turns (id INTEGER PRIMARY KEY, "
            "thread TEXT NOT NULL, messages TEXT NOT NULL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS turns_thread ON turns (thread, id)")
        self.agent = pydantic_ai.Agent(
            FunctionModel(scripted_reply), instructions=INSTRUCTIONS, tools=[self.make_add()]
        )

    def turn(self, thread: str) -> str:
        rows = self.db.execute(
            "SELECT messages FROM turns WHERE thread = ? ORDER BY id", (thread,)
        ).fetchall()
        history = [m for (blob,) in rows for m in ModelMessagesTypeAdapter.validate_json(blob)]
        result = self.agent.run_sync(PROMPT, message_history=history)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute(
            "INSERT INTO turns (thread, messages) VALUES (?, ?)",
            (thread, result.new_messages_json().decode()),
        )
        self.db.execute("COMMIT")
        return result.output

    def close(self) -> None:
        self.db.close()


RUNNERS: tuple[type[Runner], ...] = (AgentKitRunner, OpenAIAgentsRunner, PydanticAIRunner)


# ──────────────────────────────────── timing harness ────────────────────────────────────


@dataclass(frozen=True)
class Scenario:
    """A row group: how many turns, and which thread each turn goes to."""

    label: str
    turns: int
    thread: Callable[[int], str]


@dataclass(frozen=True)
class Result:
    """One framework's numbers in one scenario."""

    turns: int
    seconds: float
    db_bytes: int

    @property
    def rate(self) -> float:
        return self.turns / self.seconds

    @property
    def bytes_per_turn(self) -> float:
        return self.db_bytes / self.turns


def stored_bytes(path: Path) -> int:
    """The database file plus its -wal, after a truncating checkpoint."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def play(runner: Runner, scenario: Scenario, turns: int) -> float:
    """Run `turns` turns, checking each answer and the tool calls; the seconds taken."""
    gc.collect()
    began = time.perf_counter()
    for i in range(turns):
        answer = runner.turn(scenario.thread(i))
        if answer != ANSWER:
            raise CheckFailed(f"turn {i} answered {answer!r}, not {ANSWER!r}")
    seconds = time.perf_counter() - began
    if runner.tool_calls != turns:
        raise CheckFailed(f"the tool ran {runner.tool_calls} times in {turns} turns")
    return seconds


def measure(kind: type[Runner], scenario: Scenario, folder: Path) -> Result:
    """Warm a framework up on a throwaway file, then time the scenario on a fresh one."""
    folder.mkdir()
    warm = kind(folder / "warmup.db", WARMUP_TURNS)
    try:
        play(warm, scenario, WARMUP_TURNS)
    finally:
        warm.close()
    path = folder / "bench.db"
    runner = kind(path, scenario.turns)
    try:
        seconds = play(runner, scenario, scenario.turns)
    finally:
        runner.close()
    return Result(scenario.turns, seconds, stored_bytes(path))


# ──────────────────────── streaming: one fake streaming server ────────────────────────

STREAM_PROMPT = "say something long"
STREAM_REPLY = " ".join(["Streaming replies arrive piece by piece."] * 8)  # 4-char deltas
STREAM_TARGET = 1.10  # agentkit: streamed turn time ÷ the same turn unstreamed, at most


class StreamRunner(ABC):
    """One framework's streaming API against the fake server: one turn at a time."""

    name: ClassVar[str]
    api: ClassVar[str]

    def __init__(self, url: str, path: Path) -> None:
        self.url = url

    @abstractmethod
    def turn(self, thread: str) -> tuple[float | None, str]:
        """Run one turn; (seconds to its first text delta, or None unstreamed; the text)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the runner holds."""


class AgentKitStreams(StreamRunner):
    """agentkit over the fake: `run_turn` and `stream_turn`, side by side in one kit."""

    name = "agentkit"
    api = "stream_turn"

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url, path)
        self.model = agentkit.OpenAIModel("fake", base_url=url, api_key="k")
        self.kit = agentkit.AgentKit(path, model=self.model)

    def unstreamed(self, thread: str) -> str:
        return self.kit.run_turn(thread, STREAM_PROMPT).reply or ""

    def turn(self, thread: str) -> tuple[float | None, str]:
        began, first, text = time.perf_counter(), None, []
        for event in self.kit.stream_turn(thread, STREAM_PROMPT):
            if event.kind == "text":
                first = first if first is not None else time.perf_counter() - began
                text.append(event.text)
        return first, "".join(text)

    def close(self) -> None:
        self.kit.close()
        self.model.close()


class PydanticAIStreams(StreamRunner):
    """pydantic-ai: `agent.run_stream` with its OpenAI chat model, text deltas."""

    name = "pydantic-ai"
    api = "run_stream"

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url, path)
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

        model = OpenAIChatModel("fake", provider=OpenAIProvider(base_url=url, api_key="k"))
        self.agent = pydantic_ai.Agent(model, instructions=INSTRUCTIONS)
        self.loop = asyncio.new_event_loop()

    async def _turn(self) -> tuple[float | None, str]:
        began, first, text = time.perf_counter(), None, []
        async with self.agent.run_stream(STREAM_PROMPT) as result:
            async for delta in result.stream_text(delta=True):
                first = first if first is not None else time.perf_counter() - began
                text.append(delta)
        return first, "".join(text)

    def turn(self, thread: str) -> tuple[float | None, str]:
        return self.loop.run_until_complete(self._turn())

    def close(self) -> None:
        self.loop.close()


class AgentsStreams(StreamRunner):
    """OpenAI Agents SDK: `Runner.run_streamed` over Chat Completions, text delta events."""

    name = "openai-agents"
    api = "Runner.run_streamed"

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url, path)
        from openai import AsyncOpenAI

        self.loop = asyncio.new_event_loop()
        self.client = AsyncOpenAI(base_url=url, api_key="k")
        model = agents.OpenAIChatCompletionsModel(model="fake", openai_client=self.client)
        self.agent = agents.Agent(name="bench", instructions=INSTRUCTIONS, model=model)

    async def _turn(self) -> tuple[float | None, str]:
        from openai.types.responses import ResponseTextDeltaEvent

        began, first, text = time.perf_counter(), None, []
        result = agents.Runner.run_streamed(self.agent, STREAM_PROMPT)
        async for event in result.stream_events():
            if event.type == "raw_response_event" and isinstance(
                event.data, ResponseTextDeltaEvent
            ):
                first = first if first is not None else time.perf_counter() - began
                text.append(event.data.delta)
        return first, "".join(text)

    def turn(self, thread: str) -> tuple[float | None, str]:
        return self.loop.run_until_complete(self._turn())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


STREAM_RUNNERS: tuple[type[StreamRunner], ...] = (
    AgentKitStreams,
    PydanticAIStreams,
    AgentsStreams,
)


@dataclass(frozen=True)
class StreamResult:
    """One streaming API's numbers: turns, total seconds, mean seconds to the first delta."""

    api: str
    turns: int
    seconds: float
    first_delta: float | None


def timed_unstreamed(runner: AgentKitStreams, thread: str) -> float:
    """Seconds of one agentkit `run_turn` on the same reply, its answer checked."""
    began = time.perf_counter()
    if runner.unstreamed(thread) != STREAM_REPLY:
        raise CheckFailed("agentkit's unstreamed turn answered something else")
    return time.perf_counter() - began


def timed_streamed(runner: StreamRunner, thread: str) -> tuple[float, float]:
    """(seconds, seconds to the first delta) of one streamed turn, its text checked."""
    began = time.perf_counter()
    first, text = runner.turn(thread)
    seconds = time.perf_counter() - began
    if text != STREAM_REPLY or first is None:
        raise CheckFailed(f"{runner.name} streamed {text[:40]!r}, not the reply")
    return seconds, first


def stream_turns(
    runner: StreamRunner, fake: FakeOpenAI, turns: int, label: str
) -> list[StreamResult]:
    """Run `turns` streamed turns; for agentkit also as many unstreamed ones, alternating
    (which goes first alternates too). The results, agentkit's unstreamed first."""
    firsts, seconds, plain = [], 0.0, 0.0
    for i in range(turns):
        fake.push(text=STREAM_REPLY)
        if isinstance(runner, AgentKitStreams):
            fake.push(text=STREAM_REPLY)
            if i % 2:
                plain += timed_unstreamed(runner, f"{label}-plain:{i}")
            streamed, first = timed_streamed(runner, f"{label}:{i}")
            if not i % 2:
                plain += timed_unstreamed(runner, f"{label}-plain:{i}")
        else:
            streamed, first = timed_streamed(runner, f"{label}:{i}")
        seconds += streamed
        firsts.append(first)
    results = [StreamResult(runner.api, turns, seconds, sum(firsts) / len(firsts))]
    if isinstance(runner, AgentKitStreams):
        results.insert(0, StreamResult("run_turn", turns, plain, None))
    return results


def measure_streams(
    kind: type[StreamRunner], fake: FakeOpenAI, turns: int, folder: Path
) -> list[StreamResult]:
    """Warm up, then time a framework's streaming API (agentkit: also unstreamed)."""
    folder.mkdir()
    runner = kind(fake.url, folder / "bench.db")
    try:
        stream_turns(runner, fake, WARMUP_TURNS, "warmup")
        gc.collect()
        return stream_turns(runner, fake, turns, "bench")
    finally:
        runner.close()


STREAM_HEADER = (
    "framework",
    "API",
    "turns",
    "turns/s",
    "ms/turn",
    "first delta ms",
    "streamed ÷ unstreamed",
    "target",
    "ok",
)


def stream_rows(results: dict[str, list[StreamResult] | str]) -> list[tuple[str, ...]]:
    """The streaming table: a row per API, agentkit's two side by side, then the target."""
    rows: list[tuple[str, ...]] = []
    for name, measured in results.items():
        if isinstance(measured, str):
            rows.append((name, "", "", measured, *[""] * 4, "FAIL"))
            continue
        for result in measured:
            first = "" if result.first_delta is None else f"{1000 * result.first_delta:.2f}"
            rate = result.turns / result.seconds
            rows.append(
                (
                    name,
                    result.api,
                    f"{result.turns:,}",
                    f"{rate:,.0f}",
                    f"{1000 / rate:.2f}",
                    first,
                    *[""] * 3,
                )
            )
    ours = results.get(AgentKitStreams.name)
    if isinstance(ours, list):
        plain, streamed = ours
        cost = streamed.seconds / plain.seconds
        met = "yes" if cost <= STREAM_TARGET else "NO"
        rows.append(
            (
                "agentkit",
                "streamed ÷ unstreamed",
                *[""] * 4,
                ratio(cost),
                f"≤ {STREAM_TARGET:g}×",
                met,
            )
        )
    return rows


# ─────────────────────────── long threads: compaction on ───────────────────────────

LONG_PROMPT = "Tell me more about the next item on the list, with the details. " * 3
LONG_ANSWER = "Here is the next item, with its details and what to watch for. " * 4
SHORT_MESSAGES = 10
LONG_TARGET = 2.0  # ms per turn in the long thread ÷ in the short one, at most


class FixedModel:
    """A model that always answers the same text; counts its calls and the messages sent."""

    def __init__(self, name: str, text: str, context_window: int | None = None) -> None:
        self.name = name
        self.text = text
        self.context_window = context_window
        self.calls = 0
        self.messages_sent = 0

    def complete(
        self, instructions: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> agentkit.ModelReply:
        self.calls += 1
        self.messages_sent += len(messages)
        return agentkit.ModelReply(self.text, [], {})


@dataclass
class LongResult:
    """One thread size's numbers: turns timed, seconds, model messages and summaries."""

    label: str
    messages: int  # in each thread before the timed turns
    turns: int = 0
    seconds: float = 0.0
    messages_sent: int = 0
    summaries: int = 0


def long_thread_rows(config: Config, folder: Path) -> list[tuple[str, ...]]:
    """Time turns in a long compacted thread and in short ones, alternating."""
    folder.mkdir()
    model = FixedModel("bench", LONG_ANSWER, context_window=16_000)
    summariser = FixedModel("summariser", "## Goal\n" + "The user goes through a list. " * 60)
    kit = agentkit.AgentKit(
        folder / "bench.db",
        model=model,
        reserve_tokens=2_000,
        keep_recent_tokens=4_000,
        summary_model=summariser,
    )
    try:
        for _ in range(config.long_messages // 2):
            kit.run_turn("bench:long", LONG_PROMPT)
        for j in range(config.long_turns):
            for _ in range(SHORT_MESSAGES // 2):
                kit.run_turn(f"bench:short{j}", LONG_PROMPT)
        long = LongResult(f"{config.long_messages:,}-message thread", config.long_messages)
        short = LongResult(f"{SHORT_MESSAGES}-message threads", SHORT_MESSAGES)
        gc.collect()
        for j in range(config.long_turns):
            pair = [(long, "bench:long"), (short, f"bench:short{j}")]
            for result, thread in pair if j % 2 else pair[::-1]:
                calls, sent, summaries = model.calls, model.messages_sent, summariser.calls
                began = time.perf_counter()
                reply = kit.run_turn(thread, LONG_PROMPT).reply
                result.seconds += time.perf_counter() - began
                if reply != LONG_ANSWER or model.calls != calls + 1:
                    raise CheckFailed(f"a turn in {thread} answered {reply!r}")
                result.turns += 1
                result.messages_sent += model.messages_sent - sent
                result.summaries += summariser.calls - summaries
        compactions = len(kit.compactions("bench:long"))
        kept = len(kit.history("bench:long", 10 * config.long_messages))
    finally:
        kit.close()
    if kept != config.long_messages + 2 * config.long_turns:
        raise CheckFailed(f"the long thread's history has {kept} messages")
    rows = [
        (
            r.label,
            f"{r.messages:,}",
            f"{r.turns:,}",
            f"{1000 * r.seconds / r.turns:.2f}",
            f"{r.messages_sent / r.turns:.1f}",
            f"{r.summaries}",
            "",
            "",
            "",
        )
        for r in (short, long)
    ]
    cost = (long.seconds / long.turns) / (short.seconds / short.turns)
    met = "yes" if cost <= LONG_TARGET else "NO"
    rows.append(
        (
            f"long ÷ short ({compactions} compactions in the long thread, all kept in history)",
            *[""] * 5,
            ratio(cost),
            f"≤ {LONG_TARGET:g}×",
            met,
        )
    )
    return rows


LONG_HEADER = (
    "agentkit, compaction on",
    "messages before",
    "turns",
    "ms/turn",
    "messages sent/turn",
    "summaries made",
    "long ÷ short",
    "target",
    "ok",
)


# ───────────────────────────────────────── table ─────────────────────────────────────────


HEADER = (
    "scenario",
    "framework",
    "turns",
    "turns/s",
    "ms/turn",
    "DB bytes/turn",
    "speed: agentkit ÷ this",
    "bytes: agentkit ÷ this",
    "target",
    "ok",
)


def ratio(value: float) -> str:
    return f"{value:.2f}×"


def scenario_rows(scenario: Scenario, results: dict[str, Result | str]) -> list[tuple[str, ...]]:
    """The table rows of one scenario: a row per framework, then the target row."""
    ours = results.get(AgentKitRunner.name)
    rows = []
    for name, result in results.items():
        if isinstance(result, str):
            rows.append((scenario.label, name, str(scenario.turns), result, *[""] * 5, "FAIL"))
            continue
        speed = size = ""
        if isinstance(ours, Result) and name != AgentKitRunner.name:
            speed = ratio(ours.rate / result.rate)
            size = ratio(ours.bytes_per_turn / result.bytes_per_turn)
        rows.append(
            (
                scenario.label,
                name,
                f"{result.turns:,}",
                f"{result.rate:,.0f}",
                f"{1000 / result.rate:.2f}",
                f"{result.bytes_per_turn:,.0f}",
                speed,
                size,
                "",
                "",
            )
        )
    peers = [r for n, r in results.items() if n != AgentKitRunner.name and isinstance(r, Result)]
    if isinstance(ours, Result) and peers and len(peers) == len(results) - 1:
        fastest = max(peers, key=lambda r: r.rate)
        met = "yes" if ours.rate >= TARGET * fastest.rate else "NO"
        rows.append(
            (
                scenario.label,
                "agentkit ÷ faster peer",
                *[""] * 4,
                ratio(ours.rate / fastest.rate),
                "",
                f"≥ {TARGET:g}× faster peer",
                met,
            )
        )
    return rows


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> None:
    lines = [header, *rows]
    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            print("-+-".join("-" * w for w in widths))


def machine() -> str:
    """Where the numbers come from."""
    peers = ", ".join(f"{p} {version(p)}" for p in ("openai-agents", "pydantic-ai-slim"))
    return (
        f"machine: nproc {len(os.sched_getaffinity(0))}, {platform.system()} "
        f"{platform.machine()}; Python {platform.python_version()}; SQLite "
        f"{apsw.sqlite_lib_version()} (agentkit via apsw {apsw.apsw_version()}; the peers use "
        f"the stdlib sqlite3 with SQLite {sqlite3.sqlite_version}); {peers}"
    )


# ────────────────────────────────────────── main ──────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few turns: a ~10 s smoke run")
    parser.add_argument("--dir", help="where to create the databases (default: system temp)")
    args = parser.parse_args(argv)
    config = QUICK_RUN if args.quick else FULL_RUN
    sys.addaudithook(refuse_network)
    agents.set_tracing_disabled(True)
    pydantic_ai.Agent.instrument_all(False)
    scenarios = [
        Scenario("new thread per turn", config.new_thread_turns, lambda i: f"bench:{i}"),
        Scenario("one thread, growing history", config.one_thread_turns, lambda i: "bench:one"),
    ]
    print(machine())
    began = time.perf_counter()
    rows: list[tuple[str, ...]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="agentkit-turns-", dir=args.dir) as workdir:
        for number, scenario in enumerate(scenarios, 1):
            results: dict[str, Result | str] = {}
            for kind in RUNNERS:
                try:
                    results[kind.name] = measure(
                        kind, scenario, Path(workdir, f"{number}-{kind.name}")
                    )
                except Exception as exc:  # reported in the table and the exit status
                    failed = True
                    if not isinstance(exc, CheckFailed):
                        traceback.print_exc()
                    results[kind.name] = f"FAIL {type(exc).__name__}: {exc}"[:100]
            rows += scenario_rows(scenario, results)
        streams: dict[str, list[StreamResult] | str] = {}
        with FakeOpenAI() as fake:
            for kind in STREAM_RUNNERS:
                try:
                    folder = Path(workdir, f"stream-{kind.name}")
                    streams[kind.name] = measure_streams(kind, fake, config.streamed_turns, folder)
                except Exception as exc:  # reported in the table and the exit status
                    failed = True
                    if not isinstance(exc, CheckFailed):
                        traceback.print_exc()
                    streams[kind.name] = f"FAIL {type(exc).__name__}: {exc}"[:100]
        try:
            long_rows = long_thread_rows(config, Path(workdir, "long"))
        except Exception as exc:  # reported in the table and the exit status
            failed = True
            if not isinstance(exc, CheckFailed):
                traceback.print_exc()
            long_rows = [(f"FAIL {type(exc).__name__}: {exc}"[:100], *[""] * 7, "FAIL")]
    print(
        f"run took {time.perf_counter() - began:.0f} s; turns/s is wall clock; a ratio > 1 "
        "in the speed column, or < 1 in the bytes column, favours agentkit. In one thread every "
        "framework sends the whole history to the model (it fits agentkit's context window, so "
        "nothing is compacted). SQLiteSession commits with SQLite's default "
        "synchronous=FULL; agentkit and the pydantic-ai store use NORMAL.\n"
    )
    print_table(rows)
    print(
        f"\nStreaming: one turn answers a {len(STREAM_REPLY)}-character reply streamed by a fake "
        "OpenAI-compatible server over loopback (Chat Completions SSE, 4-character deltas), the "
        "same for every framework. agentkit's turns are stored (run_turn and stream_turn "
        "alternate, side by side); the peers' runs keep nothing. first delta: mean time from "
        "the call to the first text delta.\n"
    )
    print_table(stream_rows(streams), STREAM_HEADER)
    print(
        "\nLong threads: one turn in a thread filled by real turns (compacting as it grew: "
        "16,000-token window, 2,000 reserved, 4,000 kept verbatim) beside one turn in a fresh "
        "10-message thread, alternating. The peers have no compaction to run offline (see "
        "the module docstring).\n"
    )
    print_table(long_rows, LONG_HEADER)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
