"""Fake OpenAI, Anthropic and Telegram Bot API HTTP servers for agentkit's tests.

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
for a while, to make the client time out), push_context_too_long (the provider's own 400
for a request longer than the model's window). Every request is recorded in .requests.

Content parts are checked as the real APIs check them (OpenAI: text, image_url and file
parts with base64 data URLs, tool messages in text; Anthropic: non-empty text, base64
image and document blocks, tool_result content of text and images); a malformed one is
answered 400 like the real API, and every file part received is kept in .files as
(kind, media type, decoded bytes), in order.

FakeTelegram plays the Bot API (https://core.telegram.org/bots/api) for a bot with one token:
the test pushes updates, the bot long-polls getUpdates and calls sendMessage and the rest,
and the test waits for what it expects and reads what the bot did.

    with FakeTelegram() as tg:
        tg.push_message(chat_id=42, user_id=42, text="hello")
        bot = ...  # polls f"{tg.url}/bot{tg.token}/getUpdates", answers with sendMessage
        tg.wait_for(lambda tg: tg.texts(42) != [])
        tg.sent[0]["text"], tg.sent[0]["reply_markup"]
        tg.push_callback(42, 42, "approve:7", message_id=tg.sent[0]["message_id"])
        tg.fail_next("sendMessage", 429, retry_after=0)  # flood control, once
        tg.push_photo(42, 42, [small, medium, large], caption="look")  # a photo, 3 sizes
        tg.uploads[0]["data"]  # what sendPhoto / sendDocument uploaded (multipart)

getUpdates has Telegram's semantics: an offset confirms every update below it for good, and
a long poll (timeout=N) returns as soon as an update is pushed; close() ends waiting polls.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from collections.abc import Callable
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
    hold: threading.Event | None = None  # streamed: the rest waits after the first deltas
    held_deltas: int = 1  # how many text deltas go out before the hold


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

    def do_GET(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.server.fake._get(self, Request(self.path, headers, None))

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

    def send_events(
        self,
        events: list[Event],
        cut: bool = False,
        hold: threading.Event | None = None,
        held_after: int = 0,
    ) -> None:
        """Stream events; with cut, stop in the middle of one and let the connection close;
        with hold, wait for it to be set after the first held_after events."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if cut:
            events = events[: len(events) // 2]
        for i, (name, data) in enumerate(events):
            if hold is not None and i == held_after:
                hold.wait(30)
            self.wfile.write(((f"event: {name}\n" if name else "") + f"data: {data}\n\n").encode())
            self.wfile.flush()
        if cut:
            self.wfile.write(b'data: {"unfinished')
        # HTTP/1.0 without Content-Length: the body ends when the connection closes.


class _Loopback:
    """A fake's HTTP server on 127.0.0.1 in a thread; a context manager that closes it."""

    _server: ThreadingHTTPServer

    def _listen(self, server: ThreadingHTTPServer) -> None:
        self._server = server
        # a short poll interval lets close() return at once
        self._thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _BadPart(Exception):
    """A content part the real API would refuse."""


_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def _decoded(data: Any, where: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise _BadPart(f"{where}: data must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise _BadPart(f"{where}: data is not valid base64") from None


def _data_url(url: Any, types: tuple[str, ...], where: str) -> tuple[str, bytes]:
    match = re.fullmatch(r"data:([a-z]+/[a-z0-9.+-]+);base64,(.*)", url or "", re.S)
    if not isinstance(url, str) or not match or match.group(1) not in types:
        raise _BadPart(f"{where}: expected a base64 data URL of {', '.join(types)}")
    return match.group(1), _decoded(match.group(2), where)


def _text_part(part: dict[str, Any], where: str) -> None:
    if not isinstance(part.get("text"), str):
        raise _BadPart(f"{where}: a text part needs text")


class _FakeServer(_Loopback, ABC):
    """Shared plumbing: the HTTP server thread, the answer queue, the failure modes."""

    endpoint = ""  # the path clients POST to
    url_path = ""  # what .url adds after host and port
    held_after = 0  # events of a streamed reply up to its first text delta

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.files: list[tuple[str, str, bytes]] = []  # (kind, media type, bytes) received
        self._answers: deque[_Answer] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._ids = itertools.count(1)
        self._listen(_Server(self))
        self.url = f"http://127.0.0.1:{self._server.server_port}{self.url_path}"

    def close(self) -> None:
        """Stop serving; requests left hanging are let go at once."""
        self._closing.set()
        super().close()

    def push(
        self,
        text: str | None = None,
        tool_calls: list[tuple[str, dict[str, Any] | str]] | None = None,
        usage: tuple[int, int] = (10, 5),
        hold: threading.Event | None = None,
    ) -> None:
        """Queue a model answer: text, tool calls (name, args) made together, or both; with
        hold, a streamed answer stops after its first text delta until hold is set."""
        self._queue(Reply(text, list(tool_calls or []), usage, hold))

    def hold(self, text: str, after: int = 1, usage: tuple[int, int] = (10, 5)) -> threading.Event:
        """Queue a streamed text answer held open after its first `after` deltas (of 4
        characters); set what this returns to release the rest."""
        release = threading.Event()
        self._queue(Reply(text, [], usage, release, after))
        return release

    def push_error(
        self, status: int, body: str | dict[str, Any] = "", retry_after: float | None = None
    ) -> None:
        """Queue an HTTP error; a dict body is sent as JSON; retry_after sets Retry-After."""
        self._queue(_Error(status, body, retry_after))

    def push_context_too_long(self) -> None:
        """Queue the provider's refusal of a request longer than the model's context window."""
        self._queue(_Error(400, self._too_long(), None))

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
        try:
            found = self._files_in(request.body if isinstance(request.body, dict) else {})
        except _BadPart as bad:
            error = {"error": {"type": "invalid_request_error", "message": str(bad)}}
            handler.send_body(400, "application/json", json.dumps(error).encode())
            return
        with self._lock:
            self.files += found
        if answer is None:
            handler.send_body(500, "text/plain", b"the fake server has no answer left")
            return
        stream = isinstance(request.body, dict) and request.body.get("stream") is True
        match answer:
            case Reply():
                if stream:
                    events = self._events(answer, request.body)
                    held_after = self.held_after + answer.held_deltas - 1
                    handler.send_events(events, hold=answer.hold, held_after=held_after)
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

    def _get(self, handler: _Handler, request: Request) -> None:
        """Answer a GET: no such path, unless a fake serves one."""
        with self._lock:
            self.requests.append(request)
        handler.send_body(404, "text/plain", f"no such path: {request.path}".encode())

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}{next(self._ids)}"

    @abstractmethod
    def _files_in(self, body: dict[str, Any]) -> list[tuple[str, str, bytes]]:
        """The file parts of a request's messages, checked (_BadPart when malformed)."""

    @abstractmethod
    def _message(self, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed response body for reply."""

    @abstractmethod
    def _too_long(self) -> dict[str, Any]:
        """The error body of a request longer than the context window, as the provider says it."""

    @abstractmethod
    def _events(self, reply: Reply, request: dict[str, Any]) -> list[Event]:
        """The server-sent events of a streamed reply."""


class FakeOpenAI(_FakeServer):
    """A fake Chat Completions server; .url ends in /v1, as OPENAI_BASE_URL does.
    GET /v1/models lists .models (set it to change the list)."""

    endpoint = "/v1/chat/completions"
    url_path = "/v1"
    held_after = 2  # the role delta, then the first content delta
    models: tuple[str, ...] = ("fake-large", "fake-small")

    def _get(self, handler: _Handler, request: Request) -> None:
        if request.path != "/v1/models":
            super()._get(handler, request)
            return
        with self._lock:
            self.requests.append(request)
        listed = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]
        data = json.dumps({"object": "list", "data": listed}).encode()
        handler.send_body(200, "application/json", data)

    def _files_in(self, body: dict[str, Any]) -> list[tuple[str, str, bytes]]:
        found = []
        for i, message in enumerate(body.get("messages") or []):
            where, content = f"messages[{i}]", message.get("content")
            if message.get("role") in ("tool", "system", "assistant"):
                if not isinstance(content, (str, type(None))):
                    raise _BadPart(f"{where}: a {message.get('role')} message's content is text")
                continue
            if isinstance(content, str):
                continue
            if not isinstance(content, list) or not content:
                raise _BadPart(f"{where}: content is a string or a non-empty list of parts")
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type")
                if kind == "text":
                    _text_part(part, at)
                elif kind == "image_url":
                    mime, data = _data_url(
                        (part.get("image_url") or {}).get("url"), _IMAGE_TYPES, at
                    )
                    found.append(("image", mime, data))
                elif kind == "file":
                    file = part.get("file") or {}
                    if not isinstance(file.get("filename"), str):
                        raise _BadPart(f"{at}: a file part needs a filename")
                    mime, data = _data_url(file.get("file_data"), ("application/pdf",), at)
                    found.append(("file", mime, data))
                else:
                    raise _BadPart(f"{at}: unknown content part type {kind!r}")
        return found

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

    def _too_long(self) -> dict[str, Any]:
        message = (
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 131072 tokens. Please reduce the length of the messages."
        )
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }

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
    held_after = 4  # message_start, ping, content_block_start, the first text delta

    def _files_in(self, body: dict[str, Any]) -> list[tuple[str, str, bytes]]:
        found: list[tuple[str, str, bytes]] = []
        for i, message in enumerate(body.get("messages") or []):
            content = message.get("content")
            if isinstance(content, str):
                continue
            for j, block in enumerate(content or []):
                self._block(block, f"messages[{i}].content[{j}]", found, top=True)
        return found

    def _block(
        self, block: dict[str, Any], at: str, found: list[tuple[str, str, bytes]], *, top: bool
    ) -> None:
        kind = block.get("type")
        if kind == "text":
            _text_part(block, at)
            if not block["text"]:
                raise _BadPart(f"{at}: text content blocks must be non-empty")
        elif kind in ("image", "document"):
            source = block.get("source") or {}
            types = _IMAGE_TYPES if kind == "image" else ("application/pdf",)
            if source.get("type") != "base64" or source.get("media_type") not in types:
                raise _BadPart(f"{at}: a base64 source of {', '.join(types)} is needed")
            found.append((kind, source["media_type"], _decoded(source.get("data"), at)))
        elif kind == "tool_result" and top:
            inner = block.get("content")
            if isinstance(inner, list):
                for k, part in enumerate(inner):
                    if part.get("type") not in ("text", "image"):
                        raise _BadPart(f"{at}.content[{k}]: tool results hold text and images")
                    self._block(part, f"{at}.content[{k}]", found, top=False)
        elif kind != "tool_use" or not top:
            raise _BadPart(f"{at}: unknown content block type {kind!r}")

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

    def _too_long(self) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 213462 tokens > 200000 maximum",
            },
            "request_id": "req_fake",
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


# ---------------------------------------------------------------------------------------------
# Telegram Bot API


class _TelegramError(Exception):
    """A Bot API failure: the HTTP status, its description and optional ResponseParameters."""

    def __init__(
        self, status: int, description: str, parameters: dict[str, Any] | None = None
    ) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.parameters:
            body["parameters"] = self.parameters
        return body


_STATUS_TEXTS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden: bot was blocked by the user",
    404: "Not Found",
    409: "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
}

_CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)

_MAX_TEXT = 4096  # characters in one message's text
_BAD_QUERY = "Bad Request: query is too old and response timeout expired or query ID is invalid"
_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a content and reply markup of the current message"
)


def _param(params: dict[str, Any], name: str) -> Any:
    """A parameter's value; missing and empty are both None."""
    value = params.get(name)
    return None if value is None or value == "" else value


def _int_param(params: dict[str, Any], name: str) -> int | None:
    value = _param(params, name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _TelegramError(400, f"Bad Request: invalid {name} specified")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _TelegramError(400, f"Bad Request: invalid {name} specified") from None


def _float_param(params: dict[str, Any], name: str) -> float | None:
    value = _param(params, name)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _TelegramError(400, f"Bad Request: invalid {name} specified") from None


def _bool_param(params: dict[str, Any], name: str) -> bool:
    value = _param(params, name)
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


def _json_param(params: dict[str, Any], name: str) -> Any:
    """A parameter that is a JSON object or array; form and query values carry it as text."""
    value = _param(params, name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise _TelegramError(400, f"Bad Request: can't parse {name} JSON object") from None
    return value


def _chat_param(params: dict[str, Any]) -> int | str:
    """chat_id as the Bot API takes it: an integer, or "@username" for a channel."""
    value = _param(params, "chat_id")
    if value is None:
        raise _TelegramError(400, "Bad Request: chat_id is empty")
    if isinstance(value, str) and value.strip().startswith("@"):
        return value.strip()
    try:
        return _int_param(params, "chat_id")  # type: ignore[return-value]
    except _TelegramError:
        raise _TelegramError(400, "Bad Request: chat not found") from None


_HTML_TAGS = frozenset(
    {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a"}
    | {"code", "pre", "blockquote", "tg-emoji"}
)


class _EntityParser(HTMLParser):
    """Telegram's HTML parse mode: the supported tags, properly nested; the visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.text: list[str] = []
        self.problem: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_TAGS:
            self.problem = self.problem or f'unsupported start tag "{tag}"'
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.problem = self.problem or f'unexpected end tag "{tag}"'
        else:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _visible(text: str, parse_mode: Any) -> str:
    """What a text shows once its entities are parsed; 400 "can't parse entities" when
    its HTML is not what Telegram takes."""
    if parse_mode is None:
        return text
    if parse_mode != "HTML":
        raise _TelegramError(400, f"Bad Request: unsupported parse_mode {parse_mode!r}")
    parser = _EntityParser()
    if re.search(r"<(?![a-zA-Z/])", text) or re.search(r"&(?!#?\w+;)", text):
        parser.problem = "a bare < or & (escape it)"
    parser.feed(text)
    parser.close()
    problem = parser.problem or (f'unclosed tag "{parser.open[-1]}"' if parser.open else None)
    if problem:
        raise _TelegramError(400, f"Bad Request: can't parse entities: {problem}")
    return "".join(parser.text)


def _checked_text(params: dict[str, Any], *, empty: bool = False) -> tuple[str, str]:
    """(the text as sent, what it shows) of a message text (empty only when allowed)."""
    text = params.get("text")
    text = "" if text is None else str(text)
    visible = _visible(text, _param(params, "parse_mode"))
    if not visible.strip() and not empty:
        raise _TelegramError(400, "Bad Request: message text is empty")
    if len(visible) > _MAX_TEXT:
        raise _TelegramError(400, "Bad Request: message is too long")
    return text, visible


@dataclass
class Upload:
    """A file sent as a multipart part: its field's file name, media type and bytes."""

    name: str
    mime: str
    data: bytes


def _multipart(content_type: str, raw: bytes) -> dict[str, Any]:
    """The fields of a multipart/form-data body: text fields as strings, files as Uploads."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        data = part.get_payload(decode=True) or b""
        if filename is None:
            fields[name] = data.decode()
        else:
            fields[name] = Upload(filename, part.get_content_type(), data)
    return fields


def _kind(update: dict[str, Any]) -> str | None:
    """An update's type: its one field besides update_id ("message", "callback_query", ...)."""
    return next((key for key in update if key != "update_id"), None)


@dataclass
class _Failure:
    status: int
    description: str
    parameters: dict[str, Any] | None


class _TelegramServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeTelegram) -> None:
        super().__init__(("127.0.0.1", 0), _TelegramHandler)
        self.fake = fake


class _TelegramHandler(BaseHTTPRequestHandler):
    server: _TelegramServer

    def do_GET(self) -> None:
        if urlsplit(self.path).path.startswith("/file/"):
            self._download(urlsplit(self.path).path)
            return
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _download(self, path: str) -> None:
        """A file by the path getFile gave: /file/bot<token>/<file_path>; a file marked
        to be cut is sent half, then the connection closes."""
        status, data, cut = self.server.fake._file_download(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if cut else data)
            if cut:
                self.wfile.flush()
                self.close_connection = True

    def _answer(self, raw: bytes) -> None:
        url = urlsplit(self.path)
        params: dict[str, Any] = dict(parse_qsl(url.query, keep_blank_values=True))
        unparsable = False
        if raw.strip():
            content_type = self.headers.get_content_type()
            if content_type == "multipart/form-data":
                params.update(_multipart(self.headers.get("Content-Type", ""), raw))
            elif content_type == "application/x-www-form-urlencoded":
                params.update(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True))
            else:  # JSON, whatever the header says
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    params.update(body)
                else:
                    unparsable = True
        status, payload = self.server.fake._dispatch(url.path, params, unparsable)
        data = json.dumps(payload).encode()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client gave up
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class FakeTelegram(_Loopback):
    """A fake Telegram Bot API server: updates pushed by the test, the bot's calls recorded.

    Clients call {url}/bot{token}/{method} with a JSON body, a form, a multipart upload or
    a query string. Known methods: getMe, getUpdates, getFile (the file then downloads
    from {url}/file/bot{token}/{file_path}), sendPhoto and sendDocument (multipart, the
    file in its field), sendMessage, sendMessageDraft (private chats only),
    editMessageText, editMessageReplyMarkup, deleteMessage, answerCallbackQuery,
    sendChatAction (names are case-insensitive, as Telegram's are). Files the test
    makes (add_file, push_photo, push_media) can be fetched; one made with `cut=True`
    stops midway through its download. Every answer is
    {"ok": true, "result": ...} or {"ok": false, "error_code": N, "description": ...,
    "parameters"?: {...}} with N as the HTTP status. parse_mode=HTML is checked as Telegram
    does (supported tags, properly nested, < and & escaped; else 400 "can't parse
    entities"), and a message's text is what it shows; .sent, .drafts and .edits keep the
    text as sent in "text" and what it shows in "plain".

    What the bot did: .calls (every request, as (method, params)), .sent (sendMessage),
    .drafts (sendMessageDraft), .edits (editMessageText and editMessageReplyMarkup),
    .answers (answerCallbackQuery), .uploads (sendPhoto, sendDocument, with the bytes),
    .downloads (the file_ids fetched),
    .actions (sendChatAction), .deleted (deleteMessage), .polls (getUpdates); only calls that
    succeeded land in the lists other than .calls. Read them from the test's thread once
    wait_for has seen what it waits for.
    """

    METHODS = (
        "getMe",
        "getUpdates",
        "getFile",
        "sendPhoto",
        "sendDocument",
        "sendMessage",
        "sendMessageDraft",
        "editMessageText",
        "editMessageReplyMarkup",
        "deleteMessage",
        "answerCallbackQuery",
        "sendChatAction",
    )

    def __init__(self, token: str = "123456:TEST-token") -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[dict[str, Any]] = []
        self.drafts: list[dict[str, Any]] = []
        self.edits: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.deleted: list[dict[str, Any]] = []
        self.polls: list[dict[str, Any]] = []
        self.uploads: list[dict[str, Any]] = []  # sendPhoto / sendDocument, with the Upload
        self.downloads: list[str] = []  # file_ids whose bytes were fetched
        self._files: dict[str, bytes] = {}  # file_id -> content
        self._cut: set[str] = set()  # file_ids whose download is cut midway
        self._file_ids = itertools.count(1)
        # One condition guards all state; it is notified on every request and every change.
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._active = 0  # requests being answered
        self._updates: list[dict[str, Any]] = []  # unconfirmed, oldest first
        self._next_update_id = 1000
        self._allowed_updates: list[str] | None = None
        self._poll_generation = 0  # a newer getUpdates ends an older one, as Telegram does
        self._chats: dict[int | str, dict[str, Any]] = {}
        self._last_message_id: dict[int | str, int] = {}
        self._messages: dict[tuple[int | str, int], dict[str, Any]] = {}
        self._by_bot: set[tuple[int | str, int]] = set()  # messages the bot may edit
        self._queries: dict[str, bool] = {}  # callback query id -> answered
        self._query_ids = itertools.count(4_811_029_387_201_000_001)
        self._failures: dict[str, deque[_Failure]] = {}
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "getMe": self._get_me,
            "getUpdates": self._get_updates,
            "getFile": self._get_file,
            "sendPhoto": self._send_photo,
            "sendDocument": self._send_document,
            "sendMessage": self._send_message,
            "sendMessageDraft": self._send_message_draft,
            "editMessageText": self._edit_message_text,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message,
            "answerCallbackQuery": self._answer_callback_query,
            "sendChatAction": self._send_chat_action,
        }
        self._canonical = {name.lower(): name for name in self._handlers}
        bot_id = token.split(":", 1)[0]
        self.bot: dict[str, Any] = {
            "id": int(bot_id) if bot_id.isdigit() else 123456,
            "is_bot": True,
            "first_name": "Fake Bot",
            "username": "fake_test_bot",
        }
        self._listen(_TelegramServer(self))
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def close(self) -> None:
        """Stop serving; long polls still waiting are answered at once with no updates."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._active == 0, timeout=5.0)
        super().close()

    # -- what the test does -------------------------------------------------------------------

    def push_message(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        *,
        topic: int | None = None,
        chat_type: str | None = None,
        first_name: str = "User",
    ) -> int:
        """Queue a Message update from user_id in chat_id (in forum topic topic); its update_id.

        The chat is private when chat_id == user_id, else a supergroup, unless chat_type says.
        """
        with self._cond:
            kind = chat_type or ("private" if chat_id == user_id else "supergroup")
            chat = self._chat(chat_id, kind, first_name=first_name, forum=topic is not None)
            message_id = self._new_message_id(chat_id)
            message: dict[str, Any] = {"message_id": message_id}
            if topic is not None:
                message["message_thread_id"] = topic
            message |= {
                "from": self._user(user_id, first_name),
                "chat": dict(chat),
                "date": int(time.time()),
                "text": text,
            }
            if text.startswith("/"):
                command = text.split(maxsplit=1)[0]
                message["entities"] = [{"offset": 0, "length": len(command), "type": "bot_command"}]
            if topic is not None:
                message["is_topic_message"] = True
            self._messages[(chat_id, message_id)] = message
            return self._add_update({"message": copy.deepcopy(message)})

    def push_callback(
        self,
        chat_id: int,
        user_id: int,
        data: str,
        *,
        message_id: int,
        topic: int | None = None,
        first_name: str = "User",
    ) -> int:
        """Queue a CallbackQuery update: user_id pressed a button of message_id; its update_id.

        The query's message is the message as it now is when the bot sent it, else a stub.
        """
        with self._cond:
            stored = self._messages.get((chat_id, message_id))
            if stored is not None:
                message = copy.deepcopy(stored)
            else:
                kind = "private" if chat_id == user_id else "supergroup"
                chat = self._chat(chat_id, kind, first_name=first_name, forum=topic is not None)
                message = {
                    "message_id": message_id,
                    "from": dict(self.bot),
                    "chat": dict(chat),
                    "date": int(time.time()),
                }
            if topic is not None:
                message["message_thread_id"] = topic
                message["is_topic_message"] = True
            query_id = str(next(self._query_ids))
            self._queries[query_id] = False
            query = {
                "id": query_id,
                "from": self._user(user_id, first_name),
                "message": message,
                "chat_instance": str(abs(hash(("chat_instance", chat_id))) % 10**19),
                "data": data,
            }
            return self._add_update({"callback_query": query})

    def add_file(self, data: bytes, *, cut: bool = False) -> dict[str, Any]:
        """Keep a file the bot can fetch (getFile, then the download); its file_id,
        file_unique_id and file_size. With `cut`, its download stops midway."""
        with self._cond:
            number = next(self._file_ids)
            file_id = f"FILE{number:04d}"
            self._files[file_id] = data
            if cut:
                self._cut.add(file_id)
            return {"file_id": file_id, "file_unique_id": f"U{number}", "file_size": len(data)}

    def push_media(
        self,
        chat_id: int,
        user_id: int,
        media: dict[str, Any],
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
    ) -> int:
        """Queue a message with media (`{"photo": [...]}`, `{"document": {...}}`, ...,
        made with add_file), a caption and an album id; its update_id."""
        with self._cond:
            kind = "private" if chat_id == user_id else "supergroup"
            chat = self._chat(chat_id, kind)
            message: dict[str, Any] = {
                "message_id": self._new_message_id(chat_id),
                "from": self._user(user_id, "User"),
                "chat": dict(chat),
                "date": int(time.time()),
                **copy.deepcopy(media),
            }
            if caption is not None:
                message["caption"] = caption
            if media_group_id is not None:
                message["media_group_id"] = media_group_id
            self._messages[(chat_id, message["message_id"])] = message
            return self._add_update({"message": copy.deepcopy(message)})

    def push_photo(
        self,
        chat_id: int,
        user_id: int,
        sizes: list[bytes],
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
    ) -> int:
        """Queue a photo message with one PhotoSize per given content (smallest first, as
        Telegram sends them); its update_id."""
        photo = [
            {**self.add_file(data), "width": 90 * (i + 1), "height": 60 * (i + 1)}
            for i, data in enumerate(sizes)
        ]
        return self.push_media(
            chat_id, user_id, {"photo": photo}, caption=caption, media_group_id=media_group_id
        )

    def push_update(self, raw: dict[str, Any]) -> int:
        """Queue any update as given; its update_id is assigned (and returned)."""
        with self._cond:
            update = copy.deepcopy(raw)
            update.pop("update_id", None)
            return self._add_update(update)

    def fail_next(
        self,
        method: str,
        status: int = 429,
        retry_after: int | None = None,
        description: str | None = None,
    ) -> None:
        """Make the next call of method fail with status; calls queue up, one per failure.

        429 carries parameters.retry_after (1 unless retry_after says) and Telegram's
        "Too Many Requests: retry after N"; other statuses a generic description.
        """
        name = self._canonical.get(method.lower())
        if name is None:
            raise ValueError(f"FakeTelegram does not serve {method!r}; it serves {self.METHODS}")
        if status == 429 and retry_after is None:
            retry_after = 1
        if description is None:
            description = _STATUS_TEXTS.get(status, f"Error {status}")
            if status == 429:
                description += f": retry after {retry_after}"
        parameters = None if retry_after is None else {"retry_after": retry_after}
        with self._cond:
            self._failures.setdefault(name, deque()).append(
                _Failure(status, description, parameters)
            )

    def wait_for(self, predicate: Callable[[FakeTelegram], bool], timeout: float = 10.0) -> bool:
        """Wait until predicate(self) is true (checked on every request and change); True.

        Raises AssertionError when timeout seconds pass first.
        """
        with self._cond:
            if self._cond.wait_for(lambda: predicate(self), timeout):
                return True
            name = getattr(predicate, "__name__", repr(predicate))
            methods = [method for method, _ in self.calls]
            raise AssertionError(
                f"FakeTelegram.wait_for({name}) still false after {timeout:g}s; "
                f"{len(methods)} calls: {methods[-20:]}; sent texts: {self.texts()!r}; "
                f"{len(self._updates)} updates unconfirmed"
            )

    def texts(self, chat_id: int | str | None = None) -> list[str]:
        """The texts of the messages sent (by sendMessage), oldest first, maybe to one chat."""
        with self._cond:
            return [s["text"] for s in self.sent if chat_id is None or s["chat_id"] == chat_id]

    def message(self, chat_id: int | str, message_id: int) -> dict[str, Any] | None:
        """A message as it now is (after edits), or None when unknown or deleted."""
        with self._cond:
            found = self._messages.get((chat_id, message_id))
            return copy.deepcopy(found)

    @property
    def pending(self) -> list[dict[str, Any]]:
        """The updates not confirmed yet, oldest first."""
        with self._cond:
            return copy.deepcopy(self._updates)

    # -- plumbing -----------------------------------------------------------------------------

    def _add_update(self, update: dict[str, Any]) -> int:
        update_id = self._next_update_id
        self._next_update_id += 1
        self._updates.append({"update_id": update_id, **update})
        self._cond.notify_all()
        return update_id

    def _new_message_id(self, chat_id: int | str) -> int:
        message_id = self._last_message_id.get(chat_id, 0) + 1
        self._last_message_id[chat_id] = message_id
        return message_id

    @staticmethod
    def _user(user_id: int, first_name: str) -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": first_name}

    def _chat(
        self,
        chat_id: int | str,
        kind: str | None = None,
        *,
        first_name: str = "User",
        forum: bool = False,
    ) -> dict[str, Any]:
        """The chat chat_id, made up the first time it is seen."""
        chat = self._chats.get(chat_id)
        if chat is None:
            if kind is None:
                if isinstance(chat_id, str):
                    kind = "channel"
                else:
                    kind = "private" if chat_id > 0 else "supergroup"
            chat = {"id": chat_id}
            if kind == "private":
                chat["first_name"] = first_name
            elif isinstance(chat_id, str):
                chat |= {"title": chat_id.lstrip("@"), "username": chat_id.lstrip("@")}
            else:
                chat["title"] = f"Group {chat_id}"
            chat["type"] = kind
            self._chats[chat_id] = chat
        if forum and chat["type"] == "supergroup":
            chat["is_forum"] = True
        return chat

    def _dispatch(
        self, path: str, params: dict[str, Any], unparsable: bool
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request: (HTTP status, JSON body)."""
        prefix, _, rest = path.partition("/bot")
        token, _, name = rest.rpartition("/")
        method = self._canonical.get(name.lower(), name) if not prefix and token else path
        with self._cond:
            self.calls.append((method, params))
            self._active += 1
            self._cond.notify_all()
        try:
            if method == path:
                raise _TelegramError(404, "Not Found")
            if token != self.token:
                raise _TelegramError(401, "Unauthorized")
            handler = self._handlers.get(method)
            if handler is None:
                raise _TelegramError(404, "Not Found")
            if unparsable:
                raise _TelegramError(400, "Bad Request: can't parse JSON object")
            with self._cond:
                failures = self._failures.get(method)
                failure = failures.popleft() if failures else None
            if failure is not None:
                raise _TelegramError(failure.status, failure.description, failure.parameters)
            return 200, {"ok": True, "result": handler(params)}
        except _TelegramError as error:
            return error.status, error.body()
        except Exception as error:  # a bug in the fake: say so rather than drop the connection
            return 500, _TelegramError(500, f"Internal Server Error: {error!r}").body()
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    # -- the methods --------------------------------------------------------------------------

    def _get_me(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.bot,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = _int_param(params, "offset")
        limit = min(max(_int_param(params, "limit") or 100, 1), 100)
        timeout = max(_float_param(params, "timeout") or 0.0, 0.0)
        allowed = _json_param(params, "allowed_updates")
        deadline = time.monotonic() + timeout
        with self._cond:
            self._poll_generation += 1
            generation = self._poll_generation
            self.polls.append(
                {"offset": offset, "limit": limit, "timeout": timeout, "allowed_updates": allowed}
            )
            if isinstance(allowed, list):  # an empty list asks for every kind again
                self._allowed_updates = [str(kind) for kind in allowed] or None
            if offset is not None and offset >= 0:  # confirm everything before offset
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            elif offset is not None:  # the last -offset updates; the others are forgotten
                self._updates = self._updates[offset:]
            self._cond.notify_all()  # an older long poll sees it is superseded
            while True:
                if self._closed:
                    return []
                if self._poll_generation != generation:
                    raise _TelegramError(409, _STATUS_TEXTS[409])
                ready = [
                    update
                    for update in self._updates
                    if self._allowed_updates is None or _kind(update) in self._allowed_updates
                ][:limit]
                if ready:
                    return copy.deepcopy(ready)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def _get_file(self, params: dict[str, Any]) -> dict[str, Any]:
        file_id = str(_param(params, "file_id") or "")
        with self._cond:
            data = self._files.get(file_id)
        if data is None:
            raise _TelegramError(400, "Bad Request: invalid file_id")
        if len(data) > 20 * 1024 * 1024:
            raise _TelegramError(400, "Bad Request: file is too big")
        number = file_id.removeprefix("FILE")
        return {
            "file_id": file_id,
            "file_unique_id": f"U{int(number)}",
            "file_size": len(data),
            "file_path": f"documents/file_{number}",
        }

    def _file_download(self, path: str) -> tuple[int, bytes, bool]:
        """(status, bytes, cut) of a download at /file/bot<token>/documents/file_<n>."""
        token, _, file_path = path.removeprefix("/file/bot").partition("/")
        file_id = "FILE" + file_path.rpartition("_")[2]
        with self._cond:
            self.calls.append(("download", {"path": path}))
            data = self._files.get(file_id)
            if token != self.token or data is None:
                return 404, b"Not Found", False
            self.downloads.append(file_id)
            self._cond.notify_all()
            return 200, data, file_id in self._cut

    def _send_photo(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._send_file(params, "sendPhoto", "photo")

    def _send_document(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._send_file(params, "sendDocument", "document")

    def _send_file(self, params: dict[str, Any], method: str, field: str) -> dict[str, Any]:
        chat_id = _chat_param(params)
        upload = params.get(field)
        if not isinstance(upload, Upload):
            raise _TelegramError(400, f"Bad Request: there is no {field} in the request")
        if field == "photo" and not upload.mime.startswith("image/"):
            raise _TelegramError(400, "Bad Request: IMAGE_PROCESS_FAILED")
        with self._cond:
            message_id = self._new_message_id(chat_id)
            kept = self.add_file(upload.data)
            media = [kept] if field == "photo" else {**kept, "file_name": upload.name}
            message = {
                "message_id": message_id,
                "from": dict(self.bot),
                "chat": dict(self._chat(chat_id)),
                "date": int(time.time()),
                field: media,
            }
            if _param(params, "caption"):
                message["caption"] = _param(params, "caption")
            self._messages[(chat_id, message_id)] = message
            self._by_bot.add((chat_id, message_id))
            self.uploads.append(
                {
                    "method": method,
                    "chat_id": chat_id,
                    "message_id": message_id,
                    "message_thread_id": _int_param(params, "message_thread_id"),
                    "caption": _param(params, "caption"),
                    "name": upload.name,
                    "mime": upload.mime,
                    "data": upload.data,
                }
            )
            self._cond.notify_all()
            return copy.deepcopy(message)

    def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = _chat_param(params)
        text, visible = _checked_text(params)
        thread = _int_param(params, "message_thread_id")
        markup = _json_param(params, "reply_markup")
        with self._cond:
            message_id = self._new_message_id(chat_id)
            message: dict[str, Any] = {"message_id": message_id}
            if thread is not None:
                message["message_thread_id"] = thread
            message |= {
                "from": dict(self.bot),
                "chat": dict(self._chat(chat_id, forum=thread is not None)),
                "date": int(time.time()),
                "text": visible,
            }
            if thread is not None:
                message["is_topic_message"] = True
            if markup:
                message["reply_markup"] = markup
            self._messages[(chat_id, message_id)] = message
            self._by_bot.add((chat_id, message_id))
            self.sent.append(
                {
                    "method": "sendMessage",
                    **params,
                    "chat_id": chat_id,
                    "text": text,
                    "plain": visible,
                    "message_id": message_id,
                    "message_thread_id": thread,
                    "reply_markup": markup,
                    "parse_mode": _param(params, "parse_mode"),
                }
            )
            self._cond.notify_all()
            return copy.deepcopy(message)

    def _send_message_draft(self, params: dict[str, Any]) -> bool:
        chat_id = _chat_param(params)
        draft_id = _int_param(params, "draft_id")
        if not draft_id:
            raise _TelegramError(400, "Bad Request: draft_id must be non-zero")
        if not isinstance(chat_id, int) or chat_id <= 0:
            raise _TelegramError(400, "Bad Request: drafts can be sent only to private chats")
        text, visible = _checked_text(params, empty=True)
        with self._cond:
            self.drafts.append(
                {
                    "method": "sendMessageDraft",
                    **params,
                    "chat_id": chat_id,
                    "draft_id": draft_id,
                    "text": text,
                    "plain": visible,
                    "message_thread_id": _int_param(params, "message_thread_id"),
                    "parse_mode": _param(params, "parse_mode"),
                }
            )
            self._cond.notify_all()
            return True

    def _editable(self, params: dict[str, Any]) -> tuple[int | str, int, dict[str, Any]]:
        """(chat_id, message_id, the stored message) of a message the bot may edit."""
        if _param(params, "inline_message_id") is not None:
            raise _TelegramError(400, "Bad Request: message to edit not found")
        chat_id = _chat_param(params)
        message_id = _int_param(params, "message_id")
        if message_id is None:
            raise _TelegramError(400, "Bad Request: message identifier is not specified")
        message = self._messages.get((chat_id, message_id))
        if message is None:
            raise _TelegramError(400, "Bad Request: message to edit not found")
        if (chat_id, message_id) not in self._by_bot:
            raise _TelegramError(400, "Bad Request: message can't be edited")
        return chat_id, message_id, message

    def _edit_message_text(self, params: dict[str, Any]) -> dict[str, Any]:
        _, visible = _checked_text(params)
        markup = _json_param(params, "reply_markup")
        with self._cond:
            chat_id, message_id, message = self._editable(params)
            return self._edit(
                params, "editMessageText", chat_id, message_id, message, visible, markup
            )

    def _edit_message_reply_markup(self, params: dict[str, Any]) -> dict[str, Any]:
        markup = _json_param(params, "reply_markup")
        with self._cond:
            chat_id, message_id, message = self._editable(params)
            text = message.get("text")
            return self._edit(
                params, "editMessageReplyMarkup", chat_id, message_id, message, text, markup
            )

    def _edit(
        self,
        params: dict[str, Any],
        method: str,
        chat_id: int | str,
        message_id: int,
        message: dict[str, Any],
        text: str | None,
        markup: Any,
    ) -> dict[str, Any]:
        """Apply an edit (an edit without reply_markup drops the keyboard, as Telegram's does)."""
        if message.get("text") == text and message.get("reply_markup") == (markup or None):
            raise _TelegramError(400, _NOT_MODIFIED)
        if text is not None:
            message["text"] = text
        message["edit_date"] = int(time.time())
        if markup:
            message["reply_markup"] = markup
        else:
            message.pop("reply_markup", None)
        self.edits.append(
            {
                "method": method,
                **params,
                "chat_id": chat_id,
                "message_id": message_id,
                "text": params.get("text", text),
                "plain": text,
                "reply_markup": markup,
                "parse_mode": _param(params, "parse_mode"),
            }
        )
        self._cond.notify_all()
        return copy.deepcopy(message)

    def _delete_message(self, params: dict[str, Any]) -> bool:
        chat_id = _chat_param(params)
        message_id = _int_param(params, "message_id")
        with self._cond:
            if self._messages.pop((chat_id, message_id or 0), None) is None:
                raise _TelegramError(400, "Bad Request: message to delete not found")
            self._by_bot.discard((chat_id, message_id or 0))
            self.deleted.append(
                {"method": "deleteMessage", "chat_id": chat_id, "message_id": message_id}
            )
            self._cond.notify_all()
            return True

    def _answer_callback_query(self, params: dict[str, Any]) -> bool:
        query_id = _param(params, "callback_query_id")
        with self._cond:
            if query_id is None or self._queries.get(str(query_id)) is not False:
                raise _TelegramError(400, _BAD_QUERY)
            self._queries[str(query_id)] = True
            self.answers.append(
                {
                    "method": "answerCallbackQuery",
                    **params,
                    "callback_query_id": str(query_id),
                    "text": _param(params, "text"),
                    "show_alert": _bool_param(params, "show_alert"),
                }
            )
            self._cond.notify_all()
            return True

    def _send_chat_action(self, params: dict[str, Any]) -> bool:
        chat_id = _chat_param(params)
        action = _param(params, "action")
        if action not in _CHAT_ACTIONS:
            raise _TelegramError(400, "Bad Request: wrong parameter action in request")
        thread = _int_param(params, "message_thread_id")
        with self._cond:
            self.actions.append(
                {
                    "method": "sendChatAction",
                    "chat_id": chat_id,
                    "action": action,
                    "message_thread_id": thread,
                }
            )
            self._cond.notify_all()
            return True
