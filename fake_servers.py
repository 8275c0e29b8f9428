"""Fake OpenAI and Anthropic HTTP servers for agentkit's tests.

Each fake is a real HTTP server on 127.0.0.1 (a port the OS picks) that answers the
provider's endpoint with a queue of scripted answers, one per request, in the wire format the
request asks for: server-sent events when its body says "stream": true, else one JSON body.

    with FakeOpenAI() as fake:
        fake.push(tool_calls=[("add", {"a": 1, "b": 2})])
        fake.push(text="3", usage=(20, 1))
        model = agentkit.OpenAIModel("gpt-4o-mini", base_url=fake.url)
        ...
        fake.requests[0].body["messages"]

Failure modes: push_error (any status, optional Retry-After), push_garbage (a 200 that is
not the format asked for), push_cut (the connection closes midway), push_hang (no answer
for a while, to make the client time out). Every request is recorded in .requests.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

Event = tuple[str | None, str]  # (SSE event name or None, data line)


@dataclass
class Request:
    """One request the fake received."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # the parsed JSON, or the text when it was no JSON


@dataclass
class Reply:
    """A scripted model answer; a tool call's args that are a str are sent verbatim."""

    text: str | None
    tool_calls: list[tuple[str, dict[str, Any] | str]]
    usage: tuple[int, int]  # (input tokens, output tokens)


@dataclass
class _Error:
    status: int
    body: str | dict[str, Any]
    retry_after: float | None


@dataclass
class _Garbage:
    pass


@dataclass
class _Cut:
    pass


@dataclass
class _Hang:
    seconds: float


_Answer = Reply | _Error | _Garbage | _Cut | _Hang


def _pieces(text: str, size: int) -> list[str]:
    """text cut into pieces of size characters, the way deltas arrive."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def _args_text(args: dict[str, Any] | str) -> str:
    return args if isinstance(args, str) else json.dumps(args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: _FakeServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {name.lower(): value for name, value in self.headers.items()}
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client gave up
            self.server.fake._serve(self, Request(self.path, headers, body))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def send_body(
        self,
        status: int,
        content_type: str,
        data: bytes,
        *,
        length: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send a response whose body is data; length may claim more than is sent."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_events(self, events: list[Event], cut: bool = False) -> None:
        """Stream events; with cut, stop in the middle of one and let the connection close."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if cut:
            events = events[: len(events) // 2]
        for name, data in events:
            self.wfile.write(((f"event: {name}\n" if name else "") + f"data: {data}\n\n").encode())
            self.wfile.flush()
        if cut:
            self.wfile.write(b'data: {"unfinished')
        # HTTP/1.0 without Content-Length: the body ends when the connection closes.


class _FakeServer(ABC):
    """Shared plumbing: the HTTP server thread, the answer queue, the failure modes."""

    endpoint = ""  # the path clients POST to
    url_path = ""  # what .url adds after host and port

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._answers: deque[_Answer] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._ids = itertools.count(1)
        self._server = _Server(self)
        self.url = f"http://127.0.0.1:{self._server.server_port}{self.url_path}"
        # a short poll interval lets close() return at once
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving; requests left hanging are let go at once."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def push(
        self,
        text: str | None = None,
        tool_calls: list[tuple[str, dict[str, Any] | str]] | None = None,
        usage: tuple[int, int] = (10, 5),
    ) -> None:
        """Queue a model answer: text, tool calls (name, args) made together, or both."""
        self._queue(Reply(text, list(tool_calls or []), usage))

    def push_error(
        self, status: int, body: str | dict[str, Any] = "", retry_after: float | None = None
    ) -> None:
        """Queue an HTTP error; a dict body is sent as JSON; retry_after sets Retry-After."""
        self._queue(_Error(status, body, retry_after))

    def push_garbage(self) -> None:
        """Queue a 200 whose body is no JSON (or, streamed, whose event data is no JSON)."""
        self._queue(_Garbage())

    def push_cut(self) -> None:
        """Queue an answer that stops midway: the connection closes before its end."""
        self._queue(_Cut())

    def push_hang(self, seconds: float) -> None:
        """Queue a request that gets no answer for seconds, then a closed connection."""
        self._queue(_Hang(seconds))

    def _queue(self, answer: _Answer) -> None:
        with self._lock:
            self._answers.append(answer)

    def _serve(self, handler: _Handler, request: Request) -> None:
        with self._lock:
            self.requests.append(request)
            answer = (
                self._answers.popleft() if request.path == self.endpoint and self._answers else None
            )
        if request.path != self.endpoint:
            handler.send_body(404, "text/plain", f"no such path: {request.path}".encode())
            return
        if answer is None:
            handler.send_body(500, "text/plain", b"the fake server has no answer left")
            return
        stream = isinstance(request.body, dict) and request.body.get("stream") is True
        match answer:
            case Reply():
                if stream:
                    handler.send_events(self._events(answer, request.body))
                else:
                    data = json.dumps(self._message(answer, request.body)).encode()
                    handler.send_body(200, "application/json", data)
            case _Error(status, str() as body, retry_after):
                headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
                handler.send_body(status, "text/plain", body.encode(), headers=headers)
            case _Error(status, body, retry_after):
                headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
                data = json.dumps(body).encode()
                handler.send_body(status, "application/json", data, headers=headers)
            case _Garbage():
                if stream:
                    handler.send_events([(None, "{this is not json")])
                else:
                    handler.send_body(200, "application/json", b"<html>Bad gateway</html>")
            case _Cut():
                reply = Reply("This answer is cut short.", [], (1, 1))
                if stream:
                    handler.send_events(self._events(reply, request.body), cut=True)
                else:
                    data = json.dumps(self._message(reply, request.body)).encode()
                    half = data[: len(data) // 2]
                    handler.send_body(200, "application/json", half, length=len(data))
            case _Hang(seconds):
                self._closing.wait(seconds)

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}{next(self._ids)}"

    @abstractmethod
    def _message(self, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed response body for reply."""

    @abstractmethod
    def _events(self, reply: Reply, request: dict[str, Any]) -> list[Event]:
        """The server-sent events of a streamed reply."""


class FakeOpenAI(_FakeServer):
    """A fake Chat Completions server; .url ends in /v1, as OPENAI_BASE_URL does."""

    endpoint = "/v1/chat/completions"
    url_path = "/v1"

    def _message(self, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": self._next_id("call_"),
                    "type": "function",
                    "function": {"name": name, "arguments": _args_text(args)},
                }
                for name, args in reply.tool_calls
            ]
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
            "usage": self._usage(reply),
        }

    def _events(self, reply: Reply, request: dict[str, Any]) -> list[Event]:
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> Event:
            data: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": request.get("model"),
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = usage  # null on every chunk but the last, as OpenAI does
            return None, json.dumps(data)

        def delta(content: dict[str, Any], finish_reason: str | None = None) -> Event:
            return chunk(
                [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}]
            )

        first = "" if reply.text is not None else None
        events = [delta({"role": "assistant", "content": first, "refusal": None})]
        events += [delta({"content": piece}) for piece in _pieces(reply.text or "", 4)]
        for index, (name, args) in enumerate(reply.tool_calls):
            head = {
                "index": index,
                "id": self._next_id("call_"),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            events.append(delta({"tool_calls": [head]}))
            events += [
                delta({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                for piece in _pieces(_args_text(args), 5)
            ]
        events.append(delta({}, "tool_calls" if reply.tool_calls else "stop"))
        if include_usage:
            events.append(chunk([], self._usage(reply)))
        events.append((None, "[DONE]"))
        return events

    @staticmethod
    def _usage(reply: Reply) -> dict[str, int]:
        prompt, completion = reply.usage
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class FakeAnthropic(_FakeServer):
    """A fake Messages API server; .url is the base URL, as ANTHROPIC_BASE_URL is."""

    endpoint = "/v1/messages"

    def _message(self, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
        content += [
            {"type": "tool_use", "id": self._next_id("toolu_"), "name": name, "input": args}
            for name, args in reply.tool_calls
        ]
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": request.get("model"),
            "content": content,
            "stop_reason": "tool_use" if reply.tool_calls else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": reply.usage[0], "output_tokens": reply.usage[1]},
        }

    def _events(self, reply: Reply, request: dict[str, Any]) -> list[Event]:
        def event(name: str, **data: Any) -> Event:
            return name, json.dumps({"type": name, **data})

        start = self._message(Reply(None, [], (reply.usage[0], 1)), request)
        start["stop_reason"] = None
        events = [event("message_start", message=start), event("ping")]
        index = 0
        if reply.text:
            events.append(
                event(
                    "content_block_start", index=index, content_block={"type": "text", "text": ""}
                )
            )
            events += [
                event(
                    "content_block_delta", index=index, delta={"type": "text_delta", "text": piece}
                )
                for piece in _pieces(reply.text, 4)
            ]
            events.append(event("content_block_stop", index=index))
            index += 1
        for name, args in reply.tool_calls:
            block = {"type": "tool_use", "id": self._next_id("toolu_"), "name": name, "input": {}}
            events.append(event("content_block_start", index=index, content_block=block))
            events += [
                event(
                    "content_block_delta",
                    index=index,
                    delta={"type": "input_json_delta", "partial_json": piece},
                )
                for piece in ["", *_pieces(_args_text(args), 5)]
            ]
            events.append(event("content_block_stop", index=index))
            index += 1
        stop_reason = "tool_use" if reply.tool_calls else "end_turn"
        events += [
            event(
                "message_delta",
                delta={"stop_reason": stop_reason, "stop_sequence": None},
                usage={"output_tokens": reply.usage[1]},
            ),
            event("message_stop"),
        ]
        return events
