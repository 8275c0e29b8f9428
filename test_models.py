"""Tests of the models section: providers against fake servers, echo, scripted, specs."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import agentkit
from fake_servers import FakeAnthropic, FakeOpenAI
from testkit import clear_config

KEY = "sk-test-0123456789abcdef"
TOOLS = [
    {
        "name": name,
        "description": f"{name.title()} two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    }
    for name in ("add", "mul")
]
HELLO = [{"role": "user", "content": "hello"}]
PROVIDERS = {
    "openai": (FakeOpenAI, agentkit.OpenAIModel),
    "anthropic": (FakeAnthropic, agentkit.AnthropicModel),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_config(monkeypatch)


@pytest.fixture(
    params=[("openai", True), ("openai", False), ("anthropic", True), ("anthropic", False)],
    ids=["openai-stream", "openai-json", "anthropic-stream", "anthropic-json"],
)
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, Any]]:
    """(provider, fake server, model talking to it) with fast retries."""
    provider, stream = request.param
    fake_class, model_class = PROVIDERS[provider]
    with fake_class() as fake:
        model = model_class("m-1", api_key=KEY, base_url=fake.url, stream=stream, timeout=2.0)
        model.backoff_base = 0.001
        yield provider, fake, model
        model.close()


def test_parallel_tool_calls_then_final_answer(setup: tuple[str, Any, Any]) -> None:
    provider, fake, model = setup
    fake.push(tool_calls=[("add", {"a": 1, "b": 2}), ("mul", {"a": 3, "b": 4})], usage=(11, 7))
    fake.push(text="Sum 3, product: unknown.", usage=(40, 6))

    first = model.complete("Be brief.", HELLO, TOOLS)
    assert first.text is None
    assert [(c.name, c.args) for c in first.tool_calls] == [
        ("add", {"a": 1, "b": 2}),
        ("mul", {"a": 3, "b": 4}),
    ]
    add_id, mul_id = (c.id for c in first.tool_calls)
    assert add_id and mul_id and add_id != mul_id
    assert first.usage == {"input_tokens": 11, "output_tokens": 7}

    history = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": c.id, "name": c.name, "args": c.args} for c in first.tool_calls],
        },
        {"role": "tool", "call_id": add_id, "name": "add", "content": "3", "is_error": False},
        {"role": "tool", "call_id": mul_id, "name": "mul", "content": "boom", "is_error": True},
    ]
    final = model.complete("Be brief.", history, TOOLS)
    assert final == agentkit.ModelReply(
        "Sum 3, product: unknown.", [], {"input_tokens": 40, "output_tokens": 6}
    )

    assert len(fake.requests) == 2
    for request in fake.requests:
        assert request.body["model"] == "m-1"
        assert request.body["stream"] is model.stream
    body = fake.requests[1].body
    if provider == "openai":
        assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"
        assert ("stream_options" in body) is model.stream
        assert body["tools"][0] == {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two numbers.",
                "parameters": TOOLS[0]["parameters"],
            },
        }
        system, user, assistant, add_result, mul_result = body["messages"]
        assert system == {"role": "system", "content": "Be brief."}
        assert user == {"role": "user", "content": "hello"}
        assert assistant["role"] == "assistant" and assistant["content"] is None
        calls = assistant["tool_calls"]
        assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
            (add_id, "function", "add"),
            (mul_id, "function", "mul"),
        ]
        assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
        assert add_result == {"role": "tool", "tool_call_id": add_id, "content": "3"}
        assert mul_result == {"role": "tool", "tool_call_id": mul_id, "content": "Error: boom"}
    else:
        headers = fake.requests[0].headers
        assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
        assert "authorization" not in headers
        assert body["system"] == "Be brief."
        assert body["max_tokens"] == 4096
        assert body["tools"][1] == {
            "name": "mul",
            "description": "Mul two numbers.",
            "input_schema": TOOLS[1]["parameters"],
        }
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": add_id, "name": "add", "input": {"a": 1, "b": 2}},
                    {"type": "tool_use", "id": mul_id, "name": "mul", "input": {"a": 3, "b": 4}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": add_id,
                        "content": "3",
                        "is_error": False,
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": mul_id,
                        "content": "boom",
                        "is_error": True,
                    },
                ],
            },
        ]


def test_text_with_tool_call_and_no_tools_or_instructions(setup: tuple[str, Any, Any]) -> None:
    provider, fake, model = setup
    fake.push(text="Let me add.", tool_calls=[("add", {"a": 1, "b": 1})], usage=(5, 9))
    reply = model.complete("", HELLO, [])
    assert reply.text == "Let me add."
    assert [(c.name, c.args) for c in reply.tool_calls] == [("add", {"a": 1, "b": 1})]
    body = fake.requests[0].body
    assert "tools" not in body
    if provider == "openai":
        assert body["messages"] == [{"role": "user", "content": "hello"}]
    else:
        assert "system" not in body


def test_arguments_that_are_no_json_object(setup: tuple[str, Any, Any]) -> None:
    provider, fake, model = setup
    fake.push(tool_calls=[("add", '{"a": 1'), ("mul", "[1, 2]"), ("now", "")])
    if provider == "anthropic" and not model.stream:
        # the Messages API's non-streamed tool input is an object; a string is a bad answer
        with pytest.raises(agentkit.ModelError, match="tool input"):
            model.complete("", HELLO, TOOLS)
        return
    reply = model.complete("", HELLO, TOOLS)
    assert [c.args for c in reply.tool_calls] == [
        {agentkit.INVALID_ARGS_KEY: '{"a": 1'},
        {agentkit.INVALID_ARGS_KEY: "[1, 2]"},
        {},
    ]


def test_429_with_retry_after_then_success(setup: tuple[str, Any, Any]) -> None:
    _, fake, model = setup
    fake.push_error(429, {"error": {"message": "slow down"}}, retry_after=0.05)
    fake.push(text="ok")
    started = time.monotonic()
    assert model.complete("", HELLO, []).text == "ok"
    assert time.monotonic() - started >= 0.05
    assert len(fake.requests) == 2


def test_500_twice_then_success(setup: tuple[str, Any, Any]) -> None:
    _, fake, model = setup
    fake.push_error(500, "internal")
    fake.push_error(503, "unavailable")
    fake.push(text="ok")
    assert model.complete("", HELLO, []).text == "ok"
    assert len(fake.requests) == 3


def test_overloaded_529_is_retried() -> None:
    with FakeAnthropic() as fake:
        model = agentkit.AnthropicModel("m", api_key=KEY, base_url=fake.url)
        model.backoff_base = 0.001
        fake.push_error(529, {"type": "error", "error": {"type": "overloaded_error"}})
        fake.push(text="ok")
        assert model.complete("", HELLO, []).text == "ok"


def test_retries_run_out(setup: tuple[str, Any, Any]) -> None:
    _, fake, model = setup
    for _ in range(4):
        fake.push_error(502, "bad gateway")
    with pytest.raises(agentkit.ModelError) as caught:
        model.complete("", HELLO, [])
    message = str(caught.value)
    assert model.name in message and "HTTP 502" in message and "bad gateway" in message
    assert "4 attempts" in message
    assert len(fake.requests) == 4


def test_400_fails_at_once_and_hides_the_key(setup: tuple[str, Any, Any]) -> None:
    _, fake, model = setup
    fake.push_error(400, {"error": {"message": f"invalid request from key {KEY}" + "x" * 2000}})
    with pytest.raises(agentkit.ModelError) as caught:
        model.complete("", HELLO, [])
    message = str(caught.value)
    assert "HTTP 400" in message and "invalid request" in message
    assert KEY not in message and "[redacted]" in message
    assert len(message) < 500
    assert len(fake.requests) == 1


def test_garbage_fails_without_retry(setup: tuple[str, Any, Any]) -> None:
    _, fake, model = setup
    fake.push_garbage()
    with pytest.raises(agentkit.ModelError, match="not JSON") as caught:
        model.complete("", HELLO, [])
    assert KEY not in str(caught.value)
    assert len(fake.requests) == 1


def test_cut_answer_is_retried_then_fails(setup: tuple[str, Any, Any]) -> None:
    _, fake, model = setup
    fake.push_cut()
    fake.push(text="whole")
    assert model.complete("", HELLO, []).text == "whole"

    model.max_retries = 1
    fake.push_cut()
    fake.push_cut()
    with pytest.raises(agentkit.ModelError, match="2 attempts") as caught:
        model.complete("", HELLO, [])
    assert KEY not in str(caught.value)


def test_timeout(setup: tuple[str, Any, Any]) -> None:
    _, fake, model = setup
    model.timeout = 0.2
    model.max_retries = 1
    fake.push_hang(10)
    fake.push_hang(10)
    with pytest.raises(agentkit.ModelError, match=r"within 0\.2 s") as caught:
        model.complete("", HELLO, [])
    assert KEY not in str(caught.value)


def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = agentkit.OpenAIModel("m", api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1")
    model.backoff_base = 0.001
    with pytest.raises(agentkit.ModelError, match=r"connection to .* failed") as caught:
        model.complete("", HELLO, [])
    assert KEY not in str(caught.value)
    model.close()


def test_backoff_doubles_and_retry_after_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(agentkit.time, "sleep", sleeps.append)
    with FakeOpenAI() as fake:
        model = agentkit.OpenAIModel("m", base_url=fake.url)
        model.backoff_base = 1.0
        fake.push_error(500)
        fake.push_error(500)
        fake.push_error(429, retry_after=3600)
        fake.push(text="ok")
        assert model.complete("", HELLO, []).text == "ok"
    assert 1.0 <= sleeps[0] <= 1.25 and 2.0 <= sleeps[1] <= 2.5
    assert sleeps[2] == 60.0


def test_no_key_sends_no_authorization_and_env_configures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeOpenAI() as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        fake.push(text="local")
        assert agentkit.OpenAIModel("llama3.1:8b").complete("", HELLO, []).text == "local"
        assert "authorization" not in fake.requests[0].headers

        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        fake.push(text="cloud")
        assert agentkit.OpenAIModel("gpt").complete("", HELLO, []).text == "cloud"
        assert fake.requests[1].headers["authorization"] == f"Bearer {KEY}"
    with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        fake.push(text="claude")
        assert agentkit.AnthropicModel("c").complete("", HELLO, []).text == "claude"
        assert fake.requests[0].headers["x-api-key"] == KEY


def _mock_model(kind: str, content: bytes, content_type: str) -> Any:
    """A model whose client answers every request with content (for wire-level edge cases)."""
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"content-type": content_type}, content=content)
    )
    model_class = PROVIDERS[kind][1]
    model = model_class(
        "m", api_key=KEY, base_url="http://x", client=httpx.Client(transport=transport)
    )
    model.backoff_base = 0.001
    return model


def _sse(*events: tuple[str | None, Any], newline: str = "\n") -> bytes:
    lines = []
    for name, data in events:
        if name:
            lines.append(f"event: {name}")
        lines += [f"data: {data if isinstance(data, str) else json.dumps(data)}", ""]
    return newline.join(lines).encode() + newline.encode()


def test_openai_stream_with_comments_and_crlf() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    body = b": keep-alive\r\n\r\n" + _sse((None, chunk), (None, "[DONE]"), newline="\r\n")
    reply = _mock_model("openai", body, "text/event-stream").complete("", HELLO, [])
    assert reply == agentkit.ModelReply("hi", [], {})


def test_openai_error_in_stream() -> None:
    body = _sse((None, {"error": {"message": "model crashed"}}), (None, "[DONE]"))
    model = _mock_model("openai", body, "text/event-stream")
    with pytest.raises(agentkit.ModelError, match="model crashed"):
        model.complete("", HELLO, [])


def test_anthropic_cache_tokens_count_as_input() -> None:
    answer = {
        "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "cached"}],
        "usage": {
            "input_tokens": 3,
            "cache_creation_input_tokens": 10,
            "cache_read_input_tokens": 100,
            "output_tokens": 2,
        },
    }
    model = _mock_model("anthropic", json.dumps(answer).encode(), "application/json")
    reply = model.complete("", HELLO, [])
    assert reply == agentkit.ModelReply("cached", [], {"input_tokens": 113, "output_tokens": 2})


@pytest.mark.parametrize(
    ("error_type", "attempts"), [("overloaded_error", 4), ("invalid_request_error", 1)]
)
def test_anthropic_error_event(error_type: str, attempts: int) -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        error = {"type": "error", "error": {"type": error_type, "message": "trouble"}}
        body = _sse(("message_start", {"type": "message_start", "message": {}}), ("error", error))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = httpx.Client(transport=httpx.MockTransport(answer))
    model = agentkit.AnthropicModel("m", base_url="http://x", client=client)
    model.backoff_base = 0.001
    with pytest.raises(agentkit.ModelError, match=f"{error_type}.*trouble"):
        model.complete("", HELLO, [])
    assert len(calls) == attempts


@pytest.mark.parametrize(
    "answer",
    [{"choices": []}, {"choices": [{"message": {"content": 5}}]}, [1, 2], {"nothing": 1}],
)
def test_answers_of_the_wrong_shape(answer: Any) -> None:
    model = _mock_model("openai", json.dumps(answer).encode(), "application/json")
    with pytest.raises(agentkit.ModelError, match=r"unexpected shape|malformed"):
        model.complete("", HELLO, [])


def test_unknown_message_role_is_refused() -> None:
    for kind in PROVIDERS:
        model = _mock_model(kind, b"{}", "application/json")
        with pytest.raises(agentkit.BadInput, match="system"):
            model.complete("", [{"role": "system", "content": "x"}], [])


def test_echo_model() -> None:
    model = agentkit.EchoModel()
    assert model.name == "echo"
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "echo: first"},
        {"role": "user", "content": "second"},
    ]
    assert model.complete("ignored", history, TOOLS) == agentkit.ModelReply("echo: second", [], {})
    tool = {"role": "tool", "call_id": "c", "name": "t", "content": "42", "is_error": False}
    assert model.complete("", [*history, tool], []).text == "42"


def test_scripted_model_plays_its_steps() -> None:
    seen: list[tuple[Any, Any]] = []

    def step(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        seen.append((messages, tools))
        return f"you said {messages[-1]['content']}"

    given = agentkit.ToolCall("add", {"a": 1})
    model = agentkit.ScriptedModel(
        [given, [agentkit.ToolCall("a"), agentkit.ToolCall("b", id="own")], step, "done"]
    )
    assert model.name == "scripted"
    first = model.complete("", HELLO, TOOLS)
    assert first == agentkit.ModelReply(None, [agentkit.ToolCall("add", {"a": 1}, "call_1")], {})
    assert given.id == ""  # the script itself is left as it was
    second = model.complete("", HELLO, TOOLS)
    assert [(c.name, c.id) for c in second.tool_calls] == [("a", "call_2"), ("b", "own")]
    history = [{"role": "user", "content": "x"}]
    assert model.complete("", history, TOOLS).text == "you said x"
    assert seen == [(history, TOOLS)]
    assert model.complete("", HELLO, []).text == "done"
    with pytest.raises(agentkit.ModelError, match="no step left"):
        model.complete("", HELLO, [])
    assert model.calls == [HELLO, HELLO, history, HELLO, HELLO]
    history.append({"role": "assistant", "content": "later"})
    assert model.calls[2] == [{"role": "user", "content": "x"}]


def test_scripted_model_refuses_bad_steps() -> None:
    with pytest.raises(agentkit.BadInput):
        agentkit.ScriptedModel([42])  # type: ignore[list-item]
    with pytest.raises(agentkit.BadInput):
        agentkit.ScriptedModel([[]])
    model = agentkit.ScriptedModel([lambda messages, tools: None])
    with pytest.raises(agentkit.BadInput):
        model.complete("", HELLO, [])


def test_scripted_model_hands_each_step_out_once() -> None:
    model = agentkit.ScriptedModel([f"step {i}" for i in range(200)])
    texts: list[str | None] = []

    def worker() -> None:
        for _ in range(25):
            texts.append(model.complete("", HELLO, []).text)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(texts) == sorted(f"step {i}" for i in range(200))


def test_model_from_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = agentkit.ScriptedModel([])
    assert agentkit.model_from_spec(scripted) is scripted
    assert isinstance(agentkit.model_from_spec("echo"), agentkit.EchoModel)
    openai = agentkit.model_from_spec("openai:llama3.1:8b")
    assert isinstance(openai, agentkit.OpenAIModel)
    assert (openai.name, openai.model) == ("openai:llama3.1:8b", "llama3.1:8b")
    assert agentkit.model_from_spec("anthropic:claude-x").name == "anthropic:claude-x"
    for bad in ("gpt-4o", "openai:", "gemini:pro", ""):
        with pytest.raises(agentkit.BadInput, match="'openai:<model>'"):
            agentkit.model_from_spec(bad)
    with pytest.raises(agentkit.BadInput):
        agentkit.model_from_spec(42)  # type: ignore[arg-type]

    assert agentkit.model_from_spec(None).name == "echo"
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    assert agentkit.model_from_spec(None).name == "anthropic:claude-sonnet-4-5"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert agentkit.model_from_spec(None).name == "openai:gpt-4o-mini"
    monkeypatch.setenv("AGENTKIT_MODEL", "echo")
    assert agentkit.model_from_spec(None).name == "echo"
