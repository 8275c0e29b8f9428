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
a missed target is only reported. An audit hook refuses any network connection.
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


FULL_RUN = Config(new_thread_turns=1000, one_thread_turns=200)
QUICK_RUN = Config(new_thread_turns=30, one_thread_turns=15)


class CheckFailed(Exception):
    """A framework gave a wrong answer or ran the tool a wrong number of times."""


def refuse_network(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: no socket may connect or resolve a name (local socket pairs may)."""
    if event == "socket.getaddrinfo" or (
        event == "socket.connect" and args[0].family != socket.AF_UNIX
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
        # The whole history in every model call, as the peers send it (an equal window; each
        # turn stores three messages: the prompt, the tool call and the answer; room for more).
        self.kit = agentkit.AgentKit(
            path,
            model=agentkit.ScriptedModel(steps),
            context_messages=4 * turns + 4,
            context_chars=100_000_000,
        )
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


def print_table(rows: list[tuple[str, ...]]) -> None:
    lines = [HEADER, *rows]
    widths = [max(len(line[col]) for line in lines) for col in range(len(HEADER))]
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
    print(
        f"run took {time.perf_counter() - began:.0f} s; turns/s is wall clock; a ratio > 1 "
        "in the speed column, or < 1 in the bytes column, favours agentkit. In one thread every "
        "framework sends the whole history to the model (agentkit's window is raised from its "
        "default of 100 messages to fit it). SQLiteSession commits with SQLite's default "
        "synchronous=FULL; agentkit and the pydantic-ai store use NORMAL.\n"
    )
    print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
