"""Compaction: the context window, token estimates, summaries, overflow recovery, crashes.

Real SQLite files (and the PostgreSQL server of conftest.py where the engine matters), the
fake OpenAI and Anthropic servers over loopback, and a real worker process killed with
SIGKILL in the middle of a summary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import agentkit
from agentkit import AgentKit, ScriptedModel, ToolCall
from fake_servers import FakeAnthropic, FakeOpenAI
from testkit import clear_config

ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_config(monkeypatch)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each engine, as AgentKit takes it."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_db")
    return str(tmp_path / "agent.db")


class Summariser:
    """A summary model that answers 'summary N' and keeps the prompts it was given."""

    name = "summariser"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def complete(
        self, instructions: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> agentkit.ModelReply:
        assert instructions == agentkit.SUMMARY_INSTRUCTIONS and tools == []
        self.prompts.append(messages[0]["content"])
        return agentkit.ModelReply(f"summary {len(self.prompts)}", [], {})


def is_summary(message: dict[str, Any]) -> bool:
    return message["role"] == "user" and message["content"].startswith(agentkit.SUMMARY_PREFIX)


def assert_calls_have_results(messages: list[dict[str, Any]]) -> None:
    """Every tool call is answered by the results right after it, and every result follows
    its call: the order providers demand (a result on its own is an HTTP 400)."""
    open_calls: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            assert message["call_id"] in open_calls, f"a result without its call: {message}"
            open_calls.remove(message["call_id"])
            continue
        assert not open_calls, f"calls {open_calls} have no result before {message}"
        if message["role"] == "assistant":
            open_calls = [call["id"] for call in message.get("tool_calls") or []]
    assert not open_calls


def test_a_long_thread_is_summarised_and_the_model_sees_summary_then_recent(
    database: str,
) -> None:
    summariser = Summariser()
    model = ScriptedModel([f"answer {i} " + "x" * 200 for i in range(12)], context_window=1_000)
    with AgentKit(
        database,
        model=model,
        instructions="Be brief.",
        reserve_tokens=200,
        keep_recent_tokens=150,
        summary_model=summariser,
    ) as kit:
        for i in range(12):
            assert kit.run_turn("cli:me", f"question {i} " + "y" * 200).status == "done"
        compactions = kit.compactions("cli:me")
        history = kit.history("cli:me", 1_000)
        usage = kit.context_usage("cli:me")
    assert len(compactions) >= 2 and [c.made_by for c in compactions] == ["auto"] * len(compactions)
    # the last request: the summary, then only recent messages, ending with the question
    last = model.calls[-1]
    assert is_summary(last[0]) and f"summary {len(compactions)}" in last[0]["content"]
    assert last[-1] == {"role": "user", "content": "question 11 " + "y" * 200}
    assert not any(is_summary(m) for m in last[1:])
    for messages in model.calls:  # every request fits the window less the reserve
        assert sum(map(agentkit.message_tokens, messages)) + 3 <= 1_000 - 200
    # a later compaction updates the previous summary with what came since
    assert "<previous-summary>" not in summariser.prompts[0]
    for n, prompt in enumerate(summariser.prompts[1:], start=1):
        assert f"<previous-summary>\nsummary {n}\n</previous-summary>" in prompt
    assert "question 0 " in summariser.prompts[0] and "question 0 " not in summariser.prompts[1]
    # nothing was deleted
    assert [m["content"] for m in history if m["role"] == "user"] == [
        f"question {i} " + "y" * 200 for i in range(12)
    ]
    assert len(history) == 24
    assert usage["window"] == 1_000 and 0 < usage["tokens"] <= 1_000 - 200


def test_no_tool_result_is_separated_from_its_call_over_2000_messages(tmp_path: Path) -> None:
    rng = random.Random(18)
    seen: list[list[dict[str, Any]]] = []

    def step(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Any:
        seen.append(messages)
        if messages[-1]["role"] == "user" or rng.random() < 0.7:
            count = rng.choice([1, 2, 3, 4])
            return [ToolCall("note", {"text": "n" * rng.randrange(0, 300)}) for _ in range(count)]
        return "done " + "d" * rng.randrange(0, 400)

    model = ScriptedModel([step] * 5_000, context_window=2_000)
    summariser = Summariser()
    with AgentKit(
        tmp_path / "agent.db",
        model=model,
        reserve_tokens=300,
        keep_recent_tokens=400,
        summary_model=summariser,
        max_steps=50,
    ) as kit:

        @kit.tool
        def note(text: str) -> str:
            """Take a note."""
            return f"noted {len(text)} " + "r" * rng.randrange(0, 600)

        history: list[dict[str, Any]] = []
        turn = 0
        while len(history) < 2_000:
            for _ in range(20):
                text = f"message {turn} " + "u" * rng.randrange(0, 500)
                assert kit.run_turn("cli:long", text).status == "done"
                turn += 1
            history = kit.history("cli:long", 100_000)
        compactions = kit.compactions("cli:long")
    assert len(compactions) > 20
    for messages in seen:  # every request the model got, across every compaction point
        body = messages[1:] if is_summary(messages[0]) else messages
        assert body, "the summary alone was sent"
        assert_calls_have_results(body)
    assert sum(is_summary(messages[0]) for messages in seen) > len(seen) // 2
    assert len(history) >= 2_000 and sum(m["role"] == "user" for m in history) == turn
    assert_calls_have_results(history)


def test_a_single_huge_turn_has_its_earlier_part_summarised_on_its_own(tmp_path: Path) -> None:
    steps: list[Any] = [ToolCall("fetch", {"page": i}) for i in range(8)] + ["all fetched"]
    model = ScriptedModel(steps, context_window=1_500)
    summariser = Summariser()
    with AgentKit(
        tmp_path / "agent.db",
        model=model,
        reserve_tokens=300,
        keep_recent_tokens=250,
        summary_model=summariser,
    ) as kit:

        @kit.tool
        def fetch(page: int) -> str:
            """Fetch a page."""
            return f"page {page}: " + "p" * 600

        assert kit.run_turn("cli:me", "fetch every page").reply == "all fetched"
        [first, *_] = kit.compactions("cli:me")
    assert "first part of a turn too long to keep whole" in summariser.prompts[0]
    assert "fetch every page" in summariser.prompts[0]
    assert first.summary == "summary 1"  # nothing before the turn: its prefix alone
    kept = model.calls[len(steps) - 1]
    assert is_summary(kept[0]) and kept[1]["role"] == "assistant"  # the turn continues
    assert_calls_have_results(kept[1:])


@pytest.mark.parametrize("fake_class", [FakeOpenAI, FakeAnthropic], ids=["openai", "anthropic"])
def test_a_provider_overflow_compacts_and_retries_once(tmp_path: Path, fake_class: type) -> None:
    with fake_class() as fake:
        model_class = agentkit.OpenAIModel if fake_class is FakeOpenAI else agentkit.AnthropicModel
        model = model_class("m-1", api_key="k", base_url=fake.url, context_window=100_000)
        with AgentKit(tmp_path / "agent.db", model=model, keep_recent_tokens=20) as kit:
            for i in range(3):
                fake.push(text=f"answer {i}")
                kit.run_turn("cli:me", f"question {i}")
            fake.push_context_too_long()
            fake.push(text="the summary")
            fake.push(text="it fits now")
            fits = kit.run_turn("cli:me", "question 3")
            refused, summary, retried = fake.requests[3:6]
            fake.push_context_too_long()
            fake.push(text="the summary again")
            fake.push_context_too_long()
            failed = kit.run_turn("cli:me", "question 4")
            compactions = kit.compactions("cli:me")
            history = kit.history("cli:me")
    assert (fits.status, fits.reply) == ("done", "it fits now"), fits.error
    assert [c.made_by for c in compactions] == ["overflow", "overflow"]
    assert compactions[0].summary == "the summary"
    assert "## Files touched" in json.dumps(summary.body)  # the summary's structure
    assert "question 0" in json.dumps(summary.body)
    said = json.dumps(retried.body["messages"])
    assert "the summary" in said and "question 0" not in said and "question 3" in said
    assert "question 0" in json.dumps(refused.body["messages"])
    assert failed.status == "failed"
    assert "does not fit the context window of" in failed.error
    assert "even after compaction" in failed.error
    # the refused requests were dropped: each turn stored only the answer it got
    assert [m["content"] for m in history if m["role"] == "assistant"] == [
        "answer 0",
        "answer 1",
        "answer 2",
        "it fits now",
    ]
