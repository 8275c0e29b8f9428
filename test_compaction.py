"""Compaction: the context window, token estimates, summaries, overflow recovery, crashes.

Real SQLite files (and the PostgreSQL server of conftest.py where the engine matters), the
fake OpenAI and Anthropic servers over loopback, and a real worker process killed with
SIGKILL in the middle of a summary.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import agentkit
from agentkit import AgentKit, BadInput, Block, ScriptedModel, ToolCall
from fake_servers import FakeAnthropic, FakeOpenAI
from testkit import clear_config, rows, wait_until

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


def test_a_reported_input_over_the_window_is_dropped_compacted_and_retried(tmp_path: Path) -> None:
    with FakeOpenAI() as fake:
        model = agentkit.OpenAIModel(
            "m-1", api_key="k", base_url=fake.url, stream=False, context_window=4_000
        )
        with AgentKit(
            tmp_path / "agent.db", model=model, reserve_tokens=0, keep_recent_tokens=10
        ) as kit:
            fake.push(text="a0", usage=(30, 2))
            kit.run_turn("cli:me", "question 0")
            # the estimate starts from the usage the provider reported for the last step
            assert kit.context_usage("cli:me") == {"tokens": 32, "window": 4_000}
            fake.push(text="too much", usage=(5_000, 3))
            fake.push(text="the summary")
            fake.push(text="a1", usage=(40, 2))
            result = kit.run_turn("cli:me", "question 1")
            [made] = kit.compactions("cli:me")
            history = kit.history("cli:me")
            after = kit.context_usage("cli:me")
    assert result.reply == "a1" and made.made_by == "overflow" and made.summary == "the summary"
    assert [m["content"] for m in history] == ["question 0", "a0", "question 1", "a1"]
    assert made.first_kept > 0 and made.tokens_before > 32
    assert after == {"tokens": 42, "window": 4_000}
    assert "question 0" not in json.dumps(fake.requests[-1].body)


def test_a_worker_killed_during_a_summary_leaves_no_compaction_and_the_next_compacts(
    tmp_path: Path,
) -> None:
    db = tmp_path / "agent.db"
    with AgentKit(db, model=ScriptedModel([f"answer {i} " + "a" * 1000 for i in range(4)])) as kit:
        for i in range(4):
            kit.run_turn("cli:me", f"question {i} " + "q" * 1000)
        turn_id = kit.run_turn("cli:me", "question 4", wait=False).turn_id
    # over 3,000 - 1,000 tokens: the 6 oldest messages are summarised in one request
    options = {"context_window": 3_000, "reserve_tokens": 1_000, "keep_recent_tokens": 300}
    with FakeOpenAI() as fake:
        release = fake.hold("the summary that never arrives")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    f"""
                    import sys, agentkit
                    model = agentkit.OpenAIModel("m-1", api_key="k", base_url=sys.argv[2])
                    kit = agentkit.AgentKit(sys.argv[1], model=model, lease=1.0, **{options!r})
                    kit.work(until_idle=True)
                    """
                ),
                str(db),
                fake.url,
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            wait_until(lambda: len(fake.requests) == 1, what="the summary request")
            assert "question 0" in json.dumps(fake.requests[0].body)
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        finally:
            release.set()
        assert rows(db, "compactions") == []
        fake.push(text="the summary")
        fake.push(text="answer 4")
        model = agentkit.OpenAIModel("m-1", api_key="k", base_url=fake.url)
        with AgentKit(db, model=model, **options) as kit:
            wait_until(lambda: kit.work(until_idle=True), what="the lease to run out")
            result = kit.turn(turn_id)
            [made] = kit.compactions("cli:me")
    assert (result.status, result.reply) == ("done", "answer 4")
    assert made.summary == "the summary" and made.made_by == "auto"
    assert len(fake.requests) == 3  # the summary asked again, then the turn's step
    assert fake.requests[1].body["messages"] == fake.requests[0].body["messages"]
    assert "the summary" in json.dumps(fake.requests[2].body)
    assert "question 3" in json.dumps(fake.requests[2].body)
    assert "question 2" not in json.dumps(fake.requests[2].body)


def small_thread(kit: AgentKit, turns: int = 3) -> None:
    for i in range(turns):
        kit.run_turn("cli:me", f"question {i}")


def test_before_compact_may_block_or_give_the_summary_and_compacted_is_told(
    tmp_path: Path,
) -> None:
    summariser = Summariser()
    model = ScriptedModel(["a0", "a1", "a2", "a3"])
    with AgentKit(
        tmp_path / "agent.db", model=model, keep_recent_tokens=10, summary_model=summariser
    ) as kit:
        small_thread(kit)
        answers: list[Any] = [Block("not now"), "written by the hook"]
        asked: list[Any] = []
        told: list[agentkit.Compaction] = []

        @kit.on("before_compact")
        def before(event: agentkit.Event) -> Any:
            asked.append(event)
            return answers.pop(0)

        @kit.on("compacted")
        def after(event: agentkit.Event) -> None:
            told.append(event.compaction)

        assert kit.compact("cli:me") is None
        assert kit.compactions("cli:me") == [] and told == []
        made = kit.compact("cli:me", instructions="the numbers")
        assert (made.summary, made.made_by) == ("written by the hook", "kit")
        assert told == [made] == kit.compactions("cli:me")
        event = asked[1]
        assert (event.thread_id, event.instructions, event.made_by) == (
            "cli:me",
            "the numbers",
            "kit",
        )
        assert event.messages[0] == {"role": "user", "content": "question 0"}
        assert event.tokens > 0
        kit.run_turn("cli:me", "question 3")
        with pytest.raises(BadInput, match="thread id"):
            kit.compact("nothread")
    assert summariser.prompts == []  # the hook's text was the summary
    assert "written by the hook" in model.calls[-1][0]["content"]
    assert {"role": "user", "content": "question 0"} not in model.calls[-1]


def test_the_compact_command_summarises_now_with_its_focus(tmp_path: Path) -> None:
    summariser = Summariser()
    model = ScriptedModel(["a0", "a1", "a2", "after"])
    with AgentKit(
        tmp_path / "agent.db", model=model, keep_recent_tokens=10, summary_model=summariser
    ) as kit:
        small_thread(kit)
        reply = kit.run_turn("cli:me", "/compact the open questions", actor="cli:ann").reply
        [made] = kit.compactions("cli:me")
        kit.run_turn("cli:me", "next")
        nothing = kit.run_turn("cli:new", "/compact").reply
        listed = kit.run_turn("cli:me", "/help").reply
    assert reply.startswith("Compacted the conversation") and made.made_by == "cli:ann"
    assert "Focus the summary on: the open questions" in summariser.prompts[0]
    assert "question 0" in summariser.prompts[0] and "/compact" not in summariser.prompts[0]
    assert is_summary(model.calls[-1][0]) and "summary 1" in model.calls[-1][0]["content"]
    assert model.calls[-1][-1] == {"role": "user", "content": "next"}
    assert nothing.startswith("Nothing to compact")
    assert "/compact: Summarise the older messages now" in listed


@pytest.mark.parametrize(
    "text",
    [
        # OpenAI
        '{"error": {"message": "This model\'s maximum context length is 128000 tokens. However, '
        'your messages resulted in 130000 tokens.", "code": "context_length_exceeded"}}',
        "Your input exceeds the context window of this model.",
        # Anthropic
        "prompt is too long: 213462 tokens > 200000 maximum",
        # OpenRouter
        "This endpoint's maximum context length is 8192 tokens. However, you requested about "
        "9120 tokens (9120 of text input).",
        # llama.cpp's server
        '{"error": {"code": 400, "message": "the request exceeds the available context size, '
        'try increasing it", "type": "exceed_context_size_error"}}',
        # vLLM
        "This model's maximum context length is 4096 tokens. However, you requested 5000 "
        "tokens (4000 in the messages, 1000 in the completion).",
        # Ollama
        "prompt too long; exceeded max context length by 120 tokens",
    ],
)
def test_the_overflow_texts_of_the_providers_are_recognised(text: str) -> None:
    assert agentkit.is_context_overflow(text)


@pytest.mark.parametrize(
    "text",
    [
        "Rate limit reached for requests",
        "Incorrect API key provided",
        "max_tokens: 10000 > 4096, which is the maximum allowed number of output tokens",
        "Overloaded",
    ],
)
def test_other_refusals_are_not_overflows(text: str) -> None:
    assert not agentkit.is_context_overflow(text)


def test_models_know_their_context_window_and_images_count_a_fixed_amount(tmp_path: Path) -> None:
    window = agentkit.context_window_of
    for model, size in [
        (agentkit.OpenAIModel("gpt-4o-mini", api_key="k"), 128_000),
        (agentkit.OpenAIModel("gpt-4.1", api_key="k"), 1_047_576),
        (agentkit.AnthropicModel("claude-sonnet-4-5", api_key="k"), 200_000),
        (agentkit.OpenAIModel("gpt-4o", api_key="k", context_window=9_000), 9_000),
        (agentkit.OpenAIModel("my-local-model", api_key="k"), agentkit.DEFAULT_CONTEXT_WINDOW),
    ]:
        assert window(model) == size
        model.close()
    assert window(agentkit.EchoModel()) == agentkit.DEFAULT_CONTEXT_WINDOW
    assert window(ScriptedModel([], context_window=777)) == 777
    with AgentKit(tmp_path / "agent.db", context_window=5_000) as kit:
        assert kit.context_usage("cli:me")["window"] == 5_000
    for bad in (0, -1, "big", True):
        with pytest.raises(BadInput, match="context_window"):
            ScriptedModel([], context_window=bad)
    with pytest.raises(BadInput, match="reserve_tokens"):
        AgentKit(tmp_path / "other.db", reserve_tokens=-1)
    with pytest.raises(BadInput, match="keep_recent_tokens"):
        AgentKit(tmp_path / "other.db", keep_recent_tokens=0)
    text = {"role": "user", "content": "look"}
    file = {"id": "att_1", "name": "a.png", "mime": "image/png", "size": 100_000}
    image = {**text, "files": [file]}
    assert agentkit.image_count(image) == 1
    assert agentkit.message_tokens(image) - agentkit.message_tokens(text) > agentkit.IMAGE_TOKENS
    assert agentkit.message_tokens(image) - agentkit.message_tokens(text) < 1_300  # not its size
