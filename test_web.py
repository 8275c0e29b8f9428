"""agentkit over HTTP: the signed webhook, the web chat's API and page in a real browser,
and `agentkit serve` as a process. Real SQLite files, real loopback HTTP, no internet."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import logging
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

import agentkit
from agentkit import AgentKit
from fake_servers import FakeOpenAI
from testkit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CONFIG_VARS,
    Database,
    NewDatabase,
    clear_config,
    rows,
    seal,
    served,
    wait_until,
)

ROOT = Path(__file__).resolve().parent
SECRET = "s3cret-webhook-key-0123456789"
TOKEN = "web-token-for-tests-0123456789"


# ───────────────────────────────────────── helpers ─────────────────────────────────────────


@pytest.fixture(autouse=True)
def no_configuration(monkeypatch) -> None:
    """No test here picks up a model, a bot token or a web token from the environment."""
    clear_config(monkeypatch)


def sign(secret: str, payload: bytes, t: int | None = None) -> str:
    """An `X-Agentkit-Signature` value over `payload` at time `t` (now by default)."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def check_signature(secret: str, header: str, payload: bytes) -> None:
    """Assert `header` is a valid, fresh agentkit signature of `payload` by `secret`."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert set(fields) == {"t", "v1"}, header
    assert abs(time.time() - int(fields["t"])) < 60
    expected = hmac.new(
        secret.encode(), f"{fields['t']}.".encode() + payload, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)


class Recorder(http.server.ThreadingHTTPServer):
    """A tiny local HTTP server that records every POST (headers, raw body) and answers
    `status` (200 unless a test changes it)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                recorder.received.append((self.path, headers, body))
                self.send_response(recorder.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


SIGNED = object()  # post_event's default: sign the body with `secret` at `t`


def post_event(
    client: httpx.Client,
    body: bytes,
    *,
    name: str = "github",
    secret: str = SECRET,
    t: int | None = None,
    header: object = SIGNED,
) -> httpx.Response:
    """POST `body` to the webhook `name`, signed with `secret` at `t`; or with `header` as
    given (str or bytes), or without the signature header when `header` is None."""
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    if header is SIGNED:
        headers["X-Agentkit-Signature"] = sign(secret, body, t)
    elif header is not None:
        assert isinstance(header, (str, bytes))
        headers["X-Agentkit-Signature"] = header
    return client.post(f"/webhook/{name}", content=body, headers=headers)


def event(**fields: object) -> bytes:
    base = {"id": "evt-1", "thread": "repo-1", "actor": "octocat", "text": "hello"}
    return json.dumps({**base, **fields}).encode()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def login(client: httpx.Client, url: str, token: str) -> str:
    """Trade the token for the session cookie; the `Cookie` header value to send."""
    response = client.post("/api/login", json={"token": token}, headers={"Origin": url})
    assert response.status_code == 204, response.text
    return response.headers["set-cookie"].split(";", 1)[0]


def feed_until(
    client: httpx.Client, cookie: str, done: Callable[[list[dict]], bool], timeout: float = 20.0
) -> list[dict]:
    """Read /api/feed (long polls) until the items so far satisfy `done`; all items."""
    items: list[dict] = []
    last = 0
    deadline = time.monotonic() + timeout
    while not done(items):
        assert time.monotonic() < deadline, f"feed never got there: {items}"
        response = client.get(f"/api/feed?after={last}", headers={"Cookie": cookie})
        assert response.status_code == 200, response.text
        data = response.json()
        items += data["items"]
        last = data["last"]
    return items


def has_reply(text: str) -> Callable[[list[dict]], bool]:
    return lambda items: any(i["kind"] == "reply" and i["text"] == text for i in items)


# ───────────────────────────────────────── webhook ─────────────────────────────────────────


@pytest.fixture
def hook_kit(db: Database, recorder: Recorder) -> AgentKit:
    hook = agentkit.Webhook(SECRET, name="github", callbacks=[f"{recorder.url}/"])
    return AgentKit(db, model="echo", adapters=[hook])


def test_webhook_refusals_answer_their_status_and_write_no_row(hook_kit: AgentKit) -> None:
    # a new connection for each request: the server drops one after a 413 without saying
    # so (see the next test)
    fresh = httpx.Limits(max_keepalive_connections=0)
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10, limits=fresh) as client:
        before = hook_kit.store.row_counts()
        body = event()
        wrong_mac = sign(SECRET, body).rsplit("=", 1)[0] + "=" + "0" * 64
        refusals = [
            (post_event(client, body, header=None), 401),
            (post_event(client, body, header=wrong_mac), 401),
            (post_event(client, body, header="garbage"), 401),
            (post_event(client, body, secret="another-secret-0123456789"), 401),
            (post_event(client, body, t=int(time.time()) - 301), 401),  # stale
            (post_event(client, body, t=int(time.time()) + 360), 401),  # from the future
            (post_event(client, body, header="t=,v1="), 401),
            # signed over another body: the signature covers the raw bytes
            (post_event(client, body, header=sign(SECRET, event(text="other"))), 401),
            (post_event(client, b"x" * ((1 << 20) + 1)), 413),
            (post_event(client, body + b" " * (1 << 20)), 413),
            (post_event(client, b'{"id": "evt-1", "thread":'), 400),
            (post_event(client, b"[1, 2, 3]"), 400),
            (post_event(client, b"\xff\xfe not utf-8"), 400),
            (post_event(client, json.dumps({"id": "e", "thread": "t", "text": "x"}).encode()), 400),
            (post_event(client, event(text="")), 400),
            (post_event(client, event(thread=42)), 400),
            (post_event(client, event(callback="http://evil.example/steal")), 400),
            (post_event(client, event(callback=f"{url}/x")), 400),
            (post_event(client, event(), name="nosuch"), 404),
        ]
        for i, (response, status) in enumerate(refusals):
            assert response.status_code == status, (i, response.status_code, response.text)
            assert "error" in response.json(), (i, response.text)
        assert hook_kit.store.row_counts() == before
        assert hook_kit.threads() == []


def test_a_connection_the_server_drops_after_a_refusal_is_announced(hook_kit: AgentKit) -> None:
    # After a 413 (or 411) the server closes the connection without reading the body; unless
    # the answer says "Connection: close", a client's pool reuses the dead connection and
    # its next request fails with "Server disconnected without sending a response".
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        too_big = post_event(client, b"x" * ((1 << 20) + 1))
        assert too_big.status_code == 413
        assert too_big.headers.get("connection", "").lower() == "close", too_big.headers
        chunked = client.post("/webhook/github", content=iter([b"{}"]))
        assert chunked.status_code == 411
        assert chunked.headers.get("connection", "").lower() == "close", chunked.headers
        assert client.get("/healthz").status_code == 200


def test_a_timestamp_of_non_ascii_digits_is_a_bad_signature_not_a_crash(
    hook_kit: AgentKit,
) -> None:
    # str.isdigit() is true for "²" (and "١٢"), which int() then refuses or reads
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        before = hook_kit.store.row_counts()
        for t in ("\u00b2".encode("latin-1"), "\u0661\u0662".encode()):
            header = b"t=" + t + b",v1=" + b"0" * 64
            response = post_event(client, event(), header=header)
            assert response.status_code == 401, (t, response.status_code, response.text)
            path = "/webhook/github/turns/turn_x"
            response = client.get(path, headers={"X-Agentkit-Signature": header})
            assert response.status_code == 401, (t, response.status_code, response.text)
        assert hook_kit.store.row_counts() == before


def test_webhook_event_is_deduplicated_answered_and_called_back(
    hook_kit: AgentKit, recorder: Recorder
) -> None:
    callback = f"{recorder.url}/hooks/reply"
    body = event(callback=callback)
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = post_event(client, body)
        assert first.status_code == 202, first.text
        turn_id = first.json()["turn_id"]
        assert first.json() == {"turn_id": turn_id, "thread_id": "github:repo-1"}
        assert turn_id.startswith("turn_")

        again = post_event(client, body)  # a redelivery, freshly signed
        assert (again.status_code, again.json()) == (202, first.json())
        turns = rows(hook_kit, "turns", "id", "thread_id", "actor", "text")
        assert turns == [(turn_id, "github:repo-1", "github:octocat", "hello")]

        path = f"/webhook/github/turns/{turn_id}"

        def report() -> dict:
            response = client.get(
                path, headers={"X-Agentkit-Signature": sign(SECRET, path.encode())}
            )
            assert response.status_code == 200, response.text
            return response.json()

        done = wait_until(lambda: (r := report())["status"] == "done" and r, what="the turn")
        assert done["reply"] == "echo: hello"
        assert (done["turn_id"], done["thread_id"], done["error"]) == (
            turn_id,
            "github:repo-1",
            None,
        )

        assert client.get(path).status_code == 401
        other_path = f"/webhook/github/turns/{turn_id}x"
        replayed = {"X-Agentkit-Signature": sign(SECRET, other_path.encode())}
        assert client.get(path, headers=replayed).status_code == 401
        stale = {"X-Agentkit-Signature": sign(SECRET, path.encode(), int(time.time()) - 400)}
        assert client.get(path, headers=stale).status_code == 401

        # a turn of another adapter is not this webhook's to report
        web_turn = hook_kit.run_turn("cli:me", "hi").turn_id
        web_path = f"/webhook/github/turns/{web_turn}"
        signed = {"X-Agentkit-Signature": sign(SECRET, web_path.encode())}
        assert client.get(web_path, headers=signed).status_code == 404

        def sent() -> bool:
            return rows(hook_kit, "deliveries", "state", adapter="github") == ["sent"]

        wait_until(sent, what="the callback delivery to be sent")
        assert len(recorder.received) == 1, recorder.received
        where, headers, payload = recorder.received[0]
        assert where == "/hooks/reply"
        check_signature(SECRET, headers["x-agentkit-signature"], payload)
        assert json.loads(payload) == {
            "event": "evt-1",
            "turn_id": turn_id,
            "thread_id": "github:repo-1",
            "status": "done",
            "reply": "echo: hello",
        }

        # now that nothing runs: a late redelivery starts nothing, another body is a 409
        before = hook_kit.store.row_counts()
        late = post_event(client, body)
        assert (late.status_code, late.json()) == (202, first.json())
        other = post_event(client, event(callback=callback, text="not the same"))
        assert other.status_code == 409, other.text
        assert hook_kit.store.row_counts() == before
        assert len(recorder.received) == 1


def test_a_callback_refused_for_good_is_not_retried(hook_kit: AgentKit, recorder: Recorder) -> None:
    recorder.status = 410  # Gone
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert post_event(client, event(callback=f"{recorder.url}/gone")).status_code == 202

        def ended() -> list[tuple]:
            jobs = rows(hook_kit, "jobs", "state", "attempts", name=agentkit.DELIVER_TASK)
            return [job for job in jobs if job[0] not in ("queued", "running")]

        assert wait_until(ended, what="the callback to fail") == [("failed", 1)]
        # the job fails first, then its delivery is marked (in the next transaction)
        wait_until(lambda: rows(hook_kit, "deliveries", "state") != ["pending"])
        [(state, error)] = rows(hook_kit, "deliveries", "state", "error")
        assert state == "failed" and "410" in error
    assert len(recorder.received) == 1


def test_webhook_turns_route_answers_only_signed_requests_for_known_turns(
    hook_kit: AgentKit,
) -> None:
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        path = "/webhook/github/turns/turn_nosuch"
        signed = {"X-Agentkit-Signature": sign(SECRET, path.encode())}
        assert client.get(path).status_code == 401
        assert client.get(path, headers=signed).status_code == 404
        assert client.post("/webhook/nosuch", content=b"{}").status_code == 404
        assert client.get("/webhook/web").status_code == 404


def raw_answer(url: str, data: bytes) -> bytes:
    """Send `data` as it is on a new connection; the start of the answer."""
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may refuse before the body is sent
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
    return answer


def raw_request(url: str, data: bytes) -> int | None:
    """Send `data` as it is on a new connection; the status of the answer (None if none)."""
    match = re.match(rb"HTTP/1\.[01] ([0-9]{3}) ", raw_answer(url, data))
    return int(match.group(1)) if match else None


def signed_post(body: bytes, header: bytes | None = None, **headers: bytes) -> bytes:
    """The bytes of a POST to /webhook/github: signed unless `header` is given."""
    header = sign(SECRET, body).encode() if header is None else header
    lines = [
        b"POST /webhook/github HTTP/1.1",
        b"Host: 127.0.0.1",
        b"X-Agentkit-Signature: " + header,
        b"Content-Length: " + headers.pop("length", str(len(body)).encode()),
        *(name.replace("_", "-").encode() + b": " + value for name, value in headers.items()),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def quiet(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    """Assert that nothing logged or printed a traceback or an error."""
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and "Exception occurred" not in printed, printed
    assert "Traceback" not in caplog.text, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_non_ascii_signature_is_a_401_and_writes_nothing(hook_kit: AgentKit) -> None:
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        before = hook_kit.store.row_counts()
        header = f"t={int(time.time())},v1=é".encode()
        response = post_event(client, event(), header=header)
        assert response.status_code == 401, (response.status_code, response.text)
        path = "/webhook/github/turns/turn_x"
        response = client.get(path, headers={"X-Agentkit-Signature": header})
        assert response.status_code == 401, (response.status_code, response.text)
        assert hook_kit.store.row_counts() == before


@pytest.mark.parametrize("field", ["id", "thread", "actor", "text", "extra"])
def test_a_signed_body_with_a_lone_surrogate_is_a_400_and_writes_nothing(
    hook_kit: AgentKit, field: str
) -> None:
    body = event(**{field: "bad \ud800 text"})
    assert b"\\ud800" in body
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        before = hook_kit.store.row_counts()
        response = post_event(client, body)
        assert response.status_code == 400, (response.status_code, response.text)
        assert "surrogate" in response.json()["error"]
        assert hook_kit.store.row_counts() == before


def test_a_signed_body_nested_100000_deep_is_a_400_and_writes_nothing(
    hook_kit: AgentKit,
) -> None:
    body = b'{"id": "e", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with served(hook_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        before = hook_kit.store.row_counts()
        response = post_event(client, body)
        assert response.status_code == 400, (response.status_code, response.text)
        assert "nests too deeply" in response.json()["error"]
        assert hook_kit.store.row_counts() == before


def test_requests_http_server_refuses_itself_are_4xx(hook_kit: AgentKit) -> None:
    with served(hook_kit) as url:
        assert raw_request(url, b"PUT /webhook/github HTTP/1.1\r\nHost: x\r\n\r\n") == 405
        # an answer to a version it does not speak has no status line, only the page
        answer = raw_answer(url, b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n")
        assert b"Error code: 400" in answer, answer
        assert raw_request(url, signed_post(event(), length="\u00b2".encode("latin-1"))) == 411


def test_a_client_that_leaves_mid_long_poll_is_dropped_without_a_traceback(
    web_kit: AgentKit, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    web_kit.adapters["web"].long_poll = 0.5
    polling = threading.Event()
    wait_for_change = web_kit.store.wait_for_change

    def noted(seconds: float) -> bool:
        polling.set()
        return wait_for_change(seconds)

    web_kit.store.wait_for_change = noted
    caplog.set_level(logging.DEBUG, "agentkit")
    with served(web_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        cookie = login(client, url, TOKEN)
        sock = socket.create_connection(("127.0.0.1", port_of(url)))
        sock.sendall(
            f"GET /api/feed?after=1 HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n".encode()
        )
        assert polling.wait(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset: the answer at the end of the poll cannot be written
        printed: list[str] = []

        def noticed() -> bool:  # the debug line now; before, a traceback on stderr
            printed.append(capsys.readouterr().err)
            return "went away" in caplog.text or "Exception occurred" in "".join(printed)

        wait_until(noticed, what="the server to notice")
        assert client.get("/healthz").status_code == 200
    assert not "".join(printed), printed
    quiet(caplog, capsys)


def test_a_callback_is_compared_as_a_normalised_url(db: Database, recorder: Recorder) -> None:
    prefix = f"{recorder.url}/hooks/agent/"
    hook = agentkit.Webhook(SECRET, name="github", callbacks=[prefix])
    kit = AgentKit(db, model="echo", adapters=[hook])
    host, port = "127.0.0.1", port_of(recorder.url)
    escapes = [
        prefix + "../../admin/delete",
        prefix + "./x",
        prefix + "%2e%2e/admin",
        prefix + "x%2Fy",
        prefix + "..%5cadmin",
        prefix + "x\\..\\..\\admin",
        f"http://user@{host}:{port}/hooks/agent/x",
        f"http://{host}:{port}@evil.example/hooks/agent/x",
        f"http://{host}:{port}/hooks/agent//x",
        f"https://{host}:{port}/hooks/agent/x",
        f"http://{host}:{port + 1}/hooks/agent/x",
        f"http://{host}:{port}/hooks/agentx",
        f"http://{host}:{port}/hooks/agent/x#frag",
    ]
    with served(kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        before = kit.store.row_counts()
        for i, callback in enumerate(escapes):
            response = post_event(client, event(id=f"e{i}", callback=callback))
            assert response.status_code == 400, (callback, response.status_code)
        assert kit.store.row_counts() == before
        good = post_event(client, event(callback=f"http://{host}:{port}/hooks/agent/reply?x=1"))
        assert good.status_code == 202, good.text
        wait_until(lambda: recorder.received, what="the callback")
        assert [path for path, _, _ in recorder.received] == ["/hooks/agent/reply?x=1"]
    issue = agentkit.Webhook(SECRET, callbacks=["http://h/hooks/agent/"])
    assert issue.allows("http://h/hooks/agent/reply")
    assert not issue.allows("http://h/hooks/agent/../../admin/delete")
    for bad in (f"{recorder.url}/hooks/../", f"{recorder.url}/hooks", "ftp://h/x/", 5):
        with pytest.raises(agentkit.BadInput):
            agentkit.Webhook(SECRET, callbacks=[bad])


def mutated_requests(rng: random.Random, url: str) -> Iterator[bytes]:
    """Requests to the webhook that must all be refused: mutated signatures, timestamps,
    bodies, headers, sizes and encodings."""
    good = event(callback=f"{url}/nowhere")
    t = int(time.time())
    mac = sign(SECRET, good, t).encode()
    bodies = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"text"',
        b"\xff\xfe\x00",
        "{}".encode("utf-16"),
        event(text="x \udfff"),
        event(thread="\ud83d"),
        event(id=""),
        event(text=5),
        event(id="i" * 300),
        event(thread="t" * 300),
        event(text="x" * 100_001),
        event(callback="http://evil.example/"),
        b'{"id": "e", "x": ' + b"[" * 50_000 + b"}",
        b'{"id": "e", "x": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"}",
        good[: len(good) // 2],
    ]
    for _ in range(1200):
        kind = rng.randrange(6)
        if kind == 0:  # a mutated signature over the good body
            header = bytearray(mac)
            for _ in range(rng.randint(1, 4)):
                header[rng.randrange(len(header))] = rng.randrange(256)
            if header == mac or b"\r" in header or b"\n" in header:
                continue
            yield signed_post(good, bytes(header))
        elif kind == 1:  # a bad timestamp, signed
            when = rng.choice(
                [str(t - 301), str(t + 301), "", "-1", "1" * 30, "١٢", "0x10", str(t) + " "]
            )
            body_mac = hmac.new(SECRET.encode(), f"{when}.".encode() + good, hashlib.sha256)
            header = f"t={when},v1={body_mac.hexdigest()}".encode()
            yield signed_post(good, header)
        elif kind == 2:  # a bad body, signed
            yield signed_post(rng.choice(bodies))
        elif kind == 3:  # a good body, mutated after signing
            body = bytearray(good)
            body[rng.randrange(len(body))] = rng.randrange(256)
            if body != good:
                yield signed_post(bytes(body), mac)
        elif kind == 4:  # bad or lying headers
            length = rng.choice([b"-1", b"abc", b"\xb2", b"99999999999", b"2000000", b"3", b""])
            extra = rng.choice([{}, {"Transfer_Encoding": b"chunked"}, {"Content_Type": b"\xff"}])
            yield signed_post(good, length=length, **extra)
        else:  # random bytes as a body, or as a whole request
            noise = rng.randbytes(rng.randint(0, 300))
            yield signed_post(noise, noise[:40].replace(b"\r", b"").replace(b"\n", b""))
            if rng.random() < 0.2:
                yield b"POST /webhook/github HTTP/1.1\r\n" + noise + b"\r\n\r\n"


def test_a_thousand_mutated_requests_get_no_5xx_write_nothing_and_log_no_traceback(
    hook_kit: AgentKit, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    rng = random.Random(12)
    caplog.set_level(logging.WARNING, "agentkit")
    with served(hook_kit, workers=1) as url:
        before = hook_kit.store.row_counts()
        statuses: dict[int | None, int] = {}
        for data in mutated_requests(rng, url):
            status = raw_request(url, data)
            statuses[status] = statuses.get(status, 0) + 1
        assert sum(statuses.values()) >= 1000, statuses
        assert all(status is not None and 400 <= status < 500 for status in statuses), statuses
        assert hook_kit.store.row_counts() == before
        assert hook_kit.threads() == []
        quiet(caplog, capsys)
        with httpx.Client(base_url=url, timeout=10) as client:  # and it still works
            assert post_event(client, event()).status_code == 202


def test_an_adapter_named_web_must_be_a_web_chat(db: Database) -> None:
    # "web" is the web chat's name: the server hands it `/`, `/api/…` and the token
    with pytest.raises(agentkit.BadInput):
        AgentKit(db, adapters=[agentkit.Webhook(SECRET, name="web")])


# ─────────────────────────────────────── web chat API ───────────────────────────────────────


@pytest.fixture
def web_kit(db: Database, monkeypatch) -> AgentKit:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    return AgentKit(db, model="echo")


def test_web_chat_checks_host_origin_token_and_cookie(web_kit: AgentKit) -> None:
    with served(web_kit) as url, httpx.Client(base_url=url, timeout=30) as client:
        port = port_of(url)
        assert web_kit.adapters["web"].token == TOKEN
        before = web_kit.store.row_counts()

        for host in (f"evil.example:{port}", "127.0.0.1:1", "evil.example", ""):
            response = client.get("/", headers={"Host": host})
            assert response.status_code == 421, (host, response.status_code)
            assert "<script>" not in response.text
        rebound = client.post(
            "/api/login",
            json={"token": TOKEN},
            headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
        )
        assert rebound.status_code == 421 and "set-cookie" not in rebound.headers

        for origin in (None, "http://evil.example", f"http://localhost:{port}", "null"):
            headers = {"Origin": origin} if origin else {}
            for path, body in (("/api/login", {"token": TOKEN}), ("/api/messages", {"text": "x"})):
                response = client.post(path, json=body, headers=headers)
                assert response.status_code == 403, (origin, path, response.status_code)
                assert "set-cookie" not in response.headers

        assert client.get("/api/feed").status_code == 401
        forged = {"Cookie": "agentkit_web=" + "0" * 64}
        assert client.get("/api/feed", headers=forged).status_code == 401
        unsigned = client.post("/api/messages", json={"text": "hi"}, headers={"Origin": url})
        assert unsigned.status_code == 401

        for wrong in ("nope", TOKEN + "x", "", None, 42):
            response = client.post("/api/login", json={"token": wrong}, headers={"Origin": url})
            assert response.status_code == 401, (wrong, response.status_code)
            assert "set-cookie" not in response.headers
        assert web_kit.store.row_counts() == before

        response = client.post("/api/login", json={"token": TOKEN}, headers={"Origin": url})
        assert response.status_code == 204
        attributes = [a.strip().lower() for a in response.headers["set-cookie"].split(";")]
        assert "httponly" in attributes and "samesite=strict" in attributes
        cookie = response.headers["set-cookie"].split(";", 1)[0]
        assert TOKEN not in cookie
        # the page is reachable under localhost too, with its own Origin
        via_localhost = client.post(
            "/api/login",
            json={"token": TOKEN},
            headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
        )
        assert via_localhost.status_code == 204

        sent = client.post(
            "/api/messages", json={"text": "hi there"}, headers={"Origin": url, "Cookie": cookie}
        )
        assert sent.status_code == 202, sent.text
        assert sent.json()["turn_id"].startswith("turn_")
        items = feed_until(client, cookie, has_reply("echo: hi there"))
        kinds = [(i["kind"], i["text"]) for i in items]
        assert kinds == [("user", "hi there"), ("reply", "echo: hi there")]
        assert all(i["turn_id"] == sent.json()["turn_id"] for i in items)
        assert web_kit.history("web:owner") == [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "echo: hi there"},
        ]
        empty = client.post(
            "/api/messages", json={"text": "  "}, headers={"Origin": url, "Cookie": cookie}
        )
        assert empty.status_code == 400


def test_a_bad_feed_position_is_a_400_not_a_500(web_kit: AgentKit) -> None:
    # `after` passes str.isdigit() as "²" or as a number too big for SQLite
    web_kit.adapters["web"].long_poll = 0.2
    with served(web_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        cookie = login(client, url, TOKEN)
        for after in ("-1", "1e3", "%C2%B2", "9" * 30):
            response = client.get(f"/api/feed?after={after}", headers={"Cookie": cookie})
            assert response.status_code == 400, (after, response.status_code, response.text)
        ok = client.get("/api/feed?after=0", headers={"Cookie": cookie})
        assert ok.status_code == 200
        assert (ok.json()["items"], ok.json()["last"], ok.json()["active"]) == ([], 0, [])


def test_web_chat_page_has_a_csp_that_allows_exactly_its_inline_script(
    web_kit: AgentKit,
) -> None:
    with served(web_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        response = client.get("/")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        page = response.text
        scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
        assert len(scripts) == 1 and "<script " not in page
        policy = response.headers["content-security-policy"]
        directives = {
            d.split()[0]: d.split()[1:] for d in (p.strip() for p in policy.split(";")) if d
        }
        expected = hashlib.sha256(scripts[0].encode()).digest()
        assert directives["script-src"] == [f"'sha256-{base64.b64encode(expected).decode()}'"]
        assert directives["default-src"] == ["'none'"]
        assert directives["frame-ancestors"] == ["'none'"]
        assert TOKEN not in page


# ───────────────────────────────────────── browser ─────────────────────────────────────────


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), "Debian's chromium is needed for the browser tests"
    expect.set_options(timeout=15_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def chat_page(browser, url: str, token: str):
    """A page of a fresh browser context logged in through `#token=`; yields (page, errors)."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.set_default_timeout(20_000)
    try:
        page.goto(f"{url}/#token={token}")
        expect(page.locator("#status")).to_have_text("connected")
        assert "token" not in page.url and token not in page.url
        assert page.url == f"{url}/"
        yield page, errors
    finally:
        context.close()


def test_browser_chat_gets_the_echo_reply(browser, web_kit: AgentKit) -> None:
    with served(web_kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        page.locator("#text").fill("hello browser")
        page.locator("#send").click()
        expect(page.locator("#log .item.kind-user")).to_have_text("hello browser")
        reply = page.locator("#log .item.kind-reply")
        expect(reply).to_have_text("echo: hello browser")
        expect(page.locator("#text")).to_have_value("")
        # Enter sends too
        page.locator("#text").fill("second")
        page.locator("#text").press("Enter")
        expect(reply).to_have_count(2)
        expect(reply.nth(1)).to_have_text("echo: second")
        cookies = page.context.cookies()
        assert [c["httpOnly"] for c in cookies] == [True]
        assert all(c["sameSite"] == "Strict" for c in cookies)
        assert not [e for e in errors if "Content Security Policy" in e], errors
        assert errors == []


def test_two_bots_on_one_machine_keep_their_own_sessions(browser, new_db: NewDatabase) -> None:
    # cookies are not scoped by port: logging in to one bot must not log out the other
    kits = []
    for name in ("a", "b"):
        web = agentkit.WebChat(token=f"{TOKEN}-{name}")
        web.long_poll = 0.2
        kits.append(AgentKit(new_db(f"{name}.db"), model="echo", adapters=[web]))
    with served(kits[0]) as url_a, served(kits[1]) as url_b:
        context = browser.new_context()
        try:
            for url, name in ((url_a, "a"), (url_b, "b")):
                page = context.new_page()
                page.goto(f"{url}/#token={TOKEN}-{name}")
                expect(page.locator("#status")).to_have_text("connected")
            statuses = [context.request.get(f"{url}/api/feed").status for url in (url_a, url_b)]
            assert statuses == [200, 200]
        finally:
            context.close()


def test_browser_approval_runs_the_tool_once(browser, db: Database, monkeypatch) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    model = agentkit.ScriptedModel(
        [agentkit.ToolCall("restart", {"service": "nginx"}), "Restarted nginx."]
    )
    kit = AgentKit(db, model=model)
    runs: list[str] = []

    @kit.tool(approval=True)
    def restart(service: str) -> str:
        """Restart a service."""
        runs.append(service)
        return f"{service} restarted"

    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        page.locator("#text").fill("restart nginx")
        page.locator("#send").click()
        item = page.locator("#log .item.kind-approval")
        approve = item.locator("button.approve")
        expect(approve).to_be_visible()
        expect(item.locator("code")).to_have_text("restart")
        assert runs == []
        assert [a.state for a in kit.approvals()] == ["pending"]
        approve.click()
        expect(page.locator("#log .item.kind-reply")).to_have_text("Restarted nginx.")
        expect(item.locator(".note")).to_have_text("Approved.")
        expect(item.locator(".state")).to_have_text("Approved by web:owner")
        expect(approve).to_have_count(0)  # a decided card has no buttons
        assert runs == ["nginx"]
        assert [(a.state, a.decided_by) for a in kit.approvals(None)] == [("approved", "web:owner")]
        assert errors == []


# ───────────────────────────────────── serve, the process ─────────────────────────────────────


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Lines:
    """Collects a pipe's lines in a thread, so a test can wait for one."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.sqlite_only("no configuration is agentkit.db, its token in a file beside it")
def test_serve_with_no_configuration_is_a_working_bot(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "agentkit.py"), "serve", "--http", "127.0.0.1:0"],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        pattern = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+)")

        def started() -> str | None:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {err.text()}"
            match = pattern.search(err.text())
            return match and match[1]

        url = wait_until(started, what="the serving log line")
        token_file = tmp_path / "agentkit.db.token"
        assert (token_file.stat().st_mode & 0o777) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 20

        with httpx.Client(base_url=url, timeout=30) as client:
            health = client.get("/healthz")
            assert health.status_code == 200 and health.json()["ok"] is True
            assert "web" in health.json()["adapters"]
            cookie = login(client, url, token)
            sent = client.post(
                "/api/messages", json={"text": "ping"}, headers={"Origin": url, "Cookie": cookie}
            )
            assert sent.status_code == 202, sent.text
            feed_until(client, cookie, has_reply("echo: ping"))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.thread.join(5)
    err.thread.join(5)
    assert token not in out.text() and token not in err.text()
    assert "stopped" in err.text()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("agentkit.db")) in (
        [],
        ["workspace"],
    )


def test_a_memory_database_does_not_print_its_token_where_it_is_not_a_terminal(
    capfd,
) -> None:
    # "printed only to a terminal ... never to logs": stdout here is a pipe, like a log
    kit = AgentKit(":memory:", model="echo")
    with served(kit):
        token = kit.adapters["web"].token
        assert token
    captured = capfd.readouterr()
    assert token not in captured.out and token not in captured.err


def test_serve_on_a_port_in_use_says_so_without_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--http", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "agentkit.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(),
        timeout=60,
    )


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999", "127.0.0.1:", "host:port"])
def test_serve_with_a_bad_address_exits_2_and_creates_nothing(tmp_path: Path, address: str) -> None:
    result = cli("serve", "--http", address, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "host:port" in result.stderr and repr(address) in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_exits_0(tmp_path: Path) -> None:
    top = cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "serve" in top.stdout
    serve = cli("serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0 and "--http" in serve.stdout
    assert list(tmp_path.iterdir()) == []


def test_callbacks_that_a_server_on_the_way_may_resolve_elsewhere_are_refused():
    hook = agentkit.Webhook("s" * 20, callbacks=["http://h/hooks/agent/"])
    for url in (
        "http://h/hooks/agent/..;/admin",
        "http://h/hooks/agent/x/..;/..;/admin",
        "http://h/hooks/agent/..%3b/admin",
        "http://h/hooks/agent/%252e%252e/admin",
        "http://h/hooks/agent/%u002e%u002e/admin",
    ):
        assert not hook.allows(url), url
    assert hook.allows("http://h/hooks/agent/reply?x=%41")


# ──────────────────────────────────── the web chat, as a user ────────────────────────────────────

SCREENSHOTS = ROOT / "screenshots" / "web"  # written by test_screenshots_of_the_web_chat
HOSTILE = [
    "<img src=x onerror=alert(1)> and <script>alert(2)</script>",
    "[click](javascript:alert(3)) and [data](data:text/html,<script>alert(4)</script>)",
    "```html\n<script>alert(5)</script>\n<img src=x onerror=alert(6)>",  # never closed
    "- " * 40_000 + "deep",  # 80 KB of list markers on one line
    "\n".join("  " * depth + "- item" for depth in range(300)),  # a list 300 deep
    "- " * 500_000 + "<img src=x onerror=alert(7)>",  # 1 MB of them
    "**" * 30_000 + "`" * 30_000 + "[" * 30_000,  # openers that never close
]


class WholeReplies(agentkit.ScriptedModel):
    """A script whose replies arrive whole (1 MB word by word is the engine's test)."""

    can_stream = False


def stream_kit(tmp_path: Path, fake: FakeOpenAI, **options: object) -> AgentKit:
    model = agentkit.OpenAIModel("m", base_url=fake.url, api_key="k")
    return AgentKit(tmp_path / "chat.db", model=model, **options)


def log_text(page) -> str:
    return page.locator("#log").inner_text()


def test_a_reply_streams_into_the_page_and_ends_complete_exactly_once(
    browser, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    reply = "Streaming replies arrive piece by piece, like this one."
    with FakeOpenAI() as fake:
        release = fake.hold(reply, after=3)
        kit = stream_kit(tmp_path, fake)
        with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
            page.locator("#text").fill("stream please")
            page.locator("#text").press("Enter")
            live = page.locator("#log .turn .md.live")
            expect(live).to_have_count(1)
            first = live.inner_text()
            assert first and reply.startswith(first) and first != reply
            assert not release.is_set()
            expect(page.locator("#stop")).to_be_visible()
            release.set()
            expect(page.locator("#log .item.kind-reply")).to_have_text(reply)
            expect(live).to_have_count(0)
            expect(page.locator("#stop")).to_be_hidden()
            assert log_text(page).count("Streaming replies") == 1
            page.reload()
            expect(page.locator("#log .item.kind-reply")).to_have_text(reply)
            assert log_text(page).count("Streaming replies") == 1
            assert errors == []


def test_a_turn_shows_working_before_its_first_token(browser, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    started, go = threading.Event(), threading.Event()

    def slow(messages: list, tools: list) -> str:
        started.set()
        go.wait(30)
        return "There you are."

    kit = AgentKit(tmp_path / "w.db", model=agentkit.ScriptedModel([slow]))
    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        page.locator("#text").fill("hello")
        page.locator("#send").click()
        assert started.wait(20)
        expect(page.locator("#log .turn .working")).to_be_visible()
        go.set()
        expect(page.locator("#log .item.kind-reply")).to_have_text("There you are.")
        expect(page.locator("#log .turn .working")).to_have_count(0)
        assert errors == []


def test_markdown_renders_to_elements_and_hostile_output_runs_nothing(
    browser, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    rich = (
        "# Plan\n\nThis is **bold**, *italic* and `inline code`.\n\n"
        "- one\n- two\n  - nested\n\n1. first\n2. second\n\n> quoted\n\n"
        "| name | size |\n|---|---:|\n| a | 1 |\n| b | 2 |\n\n"
        "See [the docs](https://example.com/docs) or https://example.org.\n\n"
        "```python\nprint('hi')\n```"
    )
    # The 1 MB replies pass the context window: the echo model writes the summaries, so
    # that each reply of the script answers one message.
    kit = AgentKit(tmp_path / "md.db", model=WholeReplies([rich, *HOSTILE]), summary_model="echo")
    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.locator("#text").fill("show me markdown")
        page.locator("#text").press("Enter")
        md = page.locator("#log .item.kind-reply .md")
        expect(md).to_have_count(1)
        expect(md.locator("h1")).to_have_text("Plan")
        expect(md.locator("strong")).to_have_text("bold")
        expect(md.locator("em")).to_have_text("italic")
        expect(md.locator("p > code")).to_have_text("inline code")
        expect(md.locator("ul > li")).to_have_count(3)
        expect(md.locator("ul ul > li")).to_have_text("nested")
        expect(md.locator("ol > li")).to_have_count(2)
        expect(md.locator("blockquote")).to_have_text("quoted")
        expect(md.locator("table th")).to_have_text(["name", "size"])
        expect(md.locator("table tbody tr")).to_have_count(2)
        expect(md.locator("pre > code.language-python")).to_have_text("print('hi')")
        expect(md.locator(".code-head .lang")).to_have_text("python")
        expect(md.locator(".code-head button.copy")).to_have_text("Copy")
        links = md.locator("a")
        expect(links).to_have_count(2)
        for i in range(2):
            assert links.nth(i).get_attribute("rel") == "noopener noreferrer"
            assert links.nth(i).get_attribute("target") == "_blank"
        assert links.nth(1).get_attribute("href") == "https://example.org/"

        for n in range(2, len(HOSTILE) + 2):
            page.locator("#text").fill(f"hostile {n}")
            page.locator("#text").press("Enter")
            expect(page.locator("#log .item.kind-reply")).to_have_count(n)
        counts = page.evaluate(
            "() => ({img: document.querySelectorAll('img').length,"
            " script: document.querySelectorAll('#log script').length,"
            " iframe: document.querySelectorAll('iframe, object, embed').length,"
            " js: [...document.querySelectorAll('a')].filter(a => !/^(https?|mailto):/"
            ".test(a.href)).length,"
            " handlers: [...document.querySelectorAll('#log *')].filter(e =>"
            " [...e.attributes].some(a => a.name.startsWith('on'))).length})"
        )
        assert counts == {"img": 0, "script": 0, "iframe": 0, "js": 0, "handlers": 0}
        replies = page.locator("#log .item.kind-reply")
        assert "<img src=x onerror=alert(1)>" in replies.nth(1).inner_text()
        expect(replies.nth(3).locator("pre > code")).to_contain_text("<script>alert(5)</script>")
        assert replies.nth(6).inner_text().endswith("<img src=x onerror=alert(7)>")
        assert replies.nth(5).locator("li").count() > 1  # the deep list still renders
        assert dialogs == [] and errors == []


def test_a_tool_call_is_a_card_with_progress_that_expands_to_its_result(
    browser, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    model = agentkit.ScriptedModel(
        [agentkit.ToolCall("lookup", {"city": "Lisbon", "days": 3}), "It is sunny in Lisbon."]
    )
    kit = AgentKit(tmp_path / "tool.db", model=model)
    go = threading.Event()

    @kit.tool
    def lookup(ctx: agentkit.ToolContext, city: str, days: int) -> str:
        """Look up the weather."""
        ctx.progress(f"asking the weather service about {city}")
        go.wait(30)
        return f"{city}: sunny for {days} days"

    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        page.locator("#text").fill("weather in Lisbon?")
        page.locator("#send").click()
        card = page.locator("#log .turn details.tool")
        expect(card).to_have_count(1)
        expect(card.locator("summary code")).to_have_text("lookup")
        expect(card.locator("summary .mark.running")).to_be_visible()
        expect(card.locator("summary .targs")).to_have_text(
            "asking the weather service about Lisbon"
        )
        go.set()
        expect(card.locator("summary .mark.done")).to_have_text("✓")
        expect(card.locator("summary .targs")).to_have_text("city: Lisbon, days: 3")
        expect(card.locator("summary .dur")).to_have_text(re.compile(r"^\d+(\.\d)? m?s$"))
        expect(page.locator("#log .item.kind-reply")).to_have_text("It is sunny in Lisbon.")
        expect(card.locator(".result")).to_be_hidden()
        card.locator("summary").click()
        expect(card.locator(".result")).to_have_text("Lisbon: sunny for 3 days")
        expect(card.locator(".progress")).to_have_text("asking the weather service about Lisbon")
        page.reload()  # from the stored steps: the card is still there, with its result
        card = page.locator("#log .turn details.tool")
        expect(card.locator("summary .mark.done")).to_be_visible()
        card.locator("summary").click()
        expect(card.locator(".result")).to_have_text("Lisbon: sunny for 3 days")
        assert errors == []


def test_new_chat_makes_a_second_conversation_and_a_reload_keeps_the_one_in_the_url(
    browser, web_kit: AgentKit
) -> None:
    with served(web_kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        page.locator("#text").fill("first conversation")
        page.locator("#text").press("Enter")
        expect(page.locator("#log .item.kind-reply")).to_have_text("echo: first conversation")
        page.locator("#new").click()
        expect(page.locator("#log .item")).to_have_count(0)
        expect(page.locator("#empty")).to_be_visible()
        assert "?thread=c" in page.url
        page.locator("#text").fill("second conversation")
        page.locator("#text").press("Enter")
        expect(page.locator("#log .item.kind-reply")).to_have_text("echo: second conversation")
        side = page.locator("#threads a")
        expect(side).to_have_count(2)
        expect(side.first).to_contain_text("second conversation")  # newest first
        expect(side.nth(1)).to_contain_text("first conversation")
        expect(page.locator("#threads a.current")).to_contain_text("second conversation")
        second_url = page.url
        page.reload()
        assert page.url == second_url
        expect(page.locator("#log .item.kind-reply")).to_have_text("echo: second conversation")
        side.nth(1).click()  # switching needs no reload
        expect(page.locator("#log .item.kind-reply")).to_have_text("echo: first conversation")
        assert page.url == f"{url}/"
        page.go_back()
        expect(page.locator("#log .item.kind-reply")).to_have_text("echo: second conversation")
        threads = sorted(s.id for s in web_kit.store.thread_summaries("web:", 10))
        assert threads[1] == "web:owner" and threads[0] == "web:" + second_url.split("=")[1]
        assert errors == []


def test_stop_cancels_the_running_turn(browser, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    with FakeOpenAI() as fake:
        release = fake.hold("This is a long answer that the user stops.", after=2)
        kit = stream_kit(tmp_path, fake)
        try:
            with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
                page.locator("#text").fill("talk a lot")
                page.locator("#text").press("Enter")
                expect(page.locator("#log .turn .md.live")).to_have_count(1)
                turn_id = page.locator("#log .turn").get_attribute("data-turn")
                assert kit.turn(turn_id).status == "running"
                page.locator("#stop").click()
                expect(page.locator("#log .turn .meta")).to_have_text("Stopped.")
                assert kit.turn(turn_id).status == "cancelled"
                expect(page.locator("#stop")).to_be_hidden()
                release.set()  # the stream ends; the cancelled turn's writes are refused
                assert errors == []
        finally:
            release.set()


def test_only_an_actor_who_may_decide_sees_approve_and_a_denial_asks_its_reason_inline(
    browser, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    steps = [
        agentkit.ToolCall("restart", {"service": "nginx"}),
        "Not restarted.",
        agentkit.ToolCall("restart", {"service": "db"}),
        "Not restarted either.",
    ]
    kit = AgentKit(tmp_path / "deny.db", model=agentkit.ScriptedModel(steps), approvers=["cli:*"])

    @kit.tool(approval=True)
    def restart(service: str) -> str:
        """Restart a service."""
        return f"{service} restarted"

    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        page.on("dialog", lambda d: errors.append(f"dialog: {d.message}"))
        page.locator("#text").fill("restart nginx")
        page.locator("#send").click()
        card = page.locator("#log .item.kind-approval").first
        expect(card.locator(".state")).to_have_text("Waiting for an approver")
        expect(card.locator("button.approve")).to_have_count(0)
        expect(card.locator("code")).to_have_text("restart")
        expect(card.locator("pre.args")).to_contain_text('"service": "nginx"')
        expires = kit.approvals()[0].expires_at
        shown = page.evaluate(f"new Date({expires} * 1000).toLocaleString()")
        expect(card.locator(".actions")).to_contain_text("Expires " + shown)
        card.locator("button.deny").click()  # its own request: it may deny it
        card.locator(".actions input").fill("not now")
        card.locator("button.deny-confirm").click()
        expect(card.locator(".note")).to_have_text("Denied.")
        expect(page.locator("#log .item.kind-reply")).to_have_text("Not restarted.")
        decided = kit.approvals(None)[0]
        assert (decided.state, decided.decided_by, decided.decision_reason) == (
            "denied",
            "web:owner",
            "not now",
        )
        expect(card.locator(".state")).to_have_text("Denied by web:owner: not now")
        page.locator("#text").fill("restart db")  # decided from the CLI: the card follows
        page.locator("#send").click()
        second = page.locator("#log .item.kind-approval").nth(1)
        expect(second.locator("button.deny")).to_be_visible()
        kit.approve(kit.approvals()[0].id, actor="cli:ops", wait=False)
        expect(second.locator(".state")).to_have_text("Approved by cli:ops")
        expect(page.locator("#log .item.kind-reply").nth(1)).to_have_text("Not restarted either.")
        assert errors == []


def test_internal_notes_and_secret_requests_do_not_look_like_the_users_messages(
    browser, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    kit = AgentKit(tmp_path / "sec.db", model="echo")
    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        request = kit.request_secret("web:owner", fields=["API_TOKEN"], reason="To deploy.")
        card = page.locator("#log .item.kind-secret")
        expect(card.locator("a.button")).to_have_text("Open the secure form")
        assert card.locator("a.button").get_attribute("href") == request.url
        assert request.url not in card.inner_text()
        expect(card).to_contain_text("To deploy.")
        blob = seal(request.url, {"API_TOKEN": "tok-123"})
        page.locator("#text").fill(blob)
        page.locator("#send").click()
        expect(page.locator("#log .item.kind-note")).to_contain_text("the user gave API_TOKEN")
        expect(page.locator("#log .item.kind-notice")).to_contain_text("Saved API_TOKEN")
        expect(page.locator("#log .item.kind-user")).to_have_count(0)
        assert "tok-123" not in page.content()
        assert errors == []


def test_the_empty_state_shows_the_bot_its_model_and_examples_that_send(
    browser, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    web = agentkit.WebChat(title="Ops helper", examples=["What is running?", "Show the logs"])
    kit = AgentKit(tmp_path / "e.db", model="echo", adapters=[web])
    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        expect(page.locator("#empty h2")).to_have_text("Ops helper")
        expect(page.locator("#empty")).to_contain_text("Model: echo")
        expect(page.locator("header #model")).to_have_text("echo")
        assert page.title() == "Ops helper"
        page.locator("#examples button", has_text="What is running?").click()
        expect(page.locator("#log .item.kind-reply")).to_have_text("echo: What is running?")
        expect(page.locator("#empty")).to_be_hidden()
        page.locator("#text").fill("line one")
        page.locator("#text").press("Shift+Enter")
        page.locator("#text").type("line two")
        expect(page.locator("#text")).to_have_value("line one\nline two")
        assert errors == []
    for bad in ({"title": ""}, {"examples": "one"}, {"examples": [""]}, {"examples": ["x"] * 9}):
        with pytest.raises(agentkit.BadInput):
            agentkit.WebChat(**bad)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_open_tab_keeps_working_after_serve_restarts(browser, tmp_path: Path) -> None:
    # no AGENTKIT_WEB_TOKEN: the token is kept in the database's .token file
    port = free_port()
    first = AgentKit(tmp_path / "r.db", model="echo")
    context = browser.new_context()
    try:
        page = context.new_page()
        with served(first, http=f"127.0.0.1:{port}") as url:
            token = (tmp_path / "r.db.token").read_text().strip()
            page.goto(f"{url}/#token={token}")
            expect(page.locator("#status")).to_have_text("connected")
            page.locator("#text").fill("before")
            page.locator("#text").press("Enter")
            expect(page.locator("#log .item.kind-reply")).to_have_text("echo: before")
        with served(AgentKit(tmp_path / "r.db", model="echo"), http=f"127.0.0.1:{port}"):
            assert (tmp_path / "r.db.token").read_text().strip() == token
            page.locator("#text").fill("after")
            page.locator("#text").press("Enter")
            expect(page.locator("#log .item.kind-reply").nth(1)).to_have_text("echo: after")
            expect(page.locator("#status")).to_have_text("connected")
    finally:
        context.close()


def test_serve_keeps_its_token_says_where_it_is_and_makes_a_new_one_on_request(
    tmp_path: Path,
) -> None:
    def start(*extra: str) -> tuple[str, str]:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "agentkit.py"), "serve", "--http", "127.0.0.1:0", *extra],
            cwd=tmp_path,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        err = Lines(proc.stderr)
        try:
            wait_until(lambda: "serving" in err.text() or proc.poll() is not None, what="serve")
            token = (tmp_path / "agentkit.db.token").read_text().strip()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, err.text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.thread.join(5)
        return token, err.text()

    token, said = start()
    assert "agentkit.db.token" in said and "#token=TOKEN" in said and token not in said
    assert start()[0] == token
    renewed, said = start("--new-token")
    assert renewed != token and renewed not in said
    assert ((tmp_path / "agentkit.db.token").stat().st_mode & 0o777) == 0o600
    assert start()[0] == renewed


def test_a_request_for_another_host_says_how_to_allow_it(web_kit: AgentKit) -> None:
    with served(web_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        response = client.get("/", headers={"Host": "bot.example.com"})
        assert response.status_code == 421
        assert "AGENTKIT_PUBLIC_URL" in response.json()["error"]
        assert "https://bot.example.com" in response.json()["error"]


def test_fifty_open_tabs_wait_at_once_and_all_hear_the_reply(web_kit: AgentKit) -> None:
    tabs = 50
    with served(web_kit) as url, httpx.Client(base_url=url, timeout=60) as client:
        cookie = login(client, url, TOKEN)
        first = client.get("/api/feed?after=0", headers={"Cookie": cookie}).json()
        threads_before = threading.active_count()
        waiting = threading.Barrier(tabs + 1)
        answers: list[dict] = []

        def tab() -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                waiting.wait()
                query = f"after={first['last']}&seen={first['state']}"
                answer = own.get(f"/api/feed?{query}", headers={"Cookie": cookie})
                answers.append(answer.json())

        clients = [threading.Thread(target=tab) for _ in range(tabs)]
        for c in clients:
            c.start()
        waiting.wait()
        wait_until(
            lambda: threading.active_count() >= threads_before + 2 * tabs,
            what="every tab to be waiting on the server",
        )
        assert client.get("/healthz").status_code == 200  # the server still answers
        sent = client.post(
            "/api/messages", json={"text": "to all"}, headers={"Origin": url, "Cookie": cookie}
        )
        assert sent.status_code == 202
        for c in clients:
            c.join(30)
        assert len(answers) == tabs
        assert all(a["items"] or a["turns"] for a in answers)
        wait_until(
            lambda: threading.active_count() <= threads_before + 5,
            what="the server threads of the tabs to end",
        )


def test_screenshots_of_the_web_chat(browser, tmp_path: Path, monkeypatch) -> None:
    """Desktop and 390 px wide, light and dark, into SCREENSHOTS: for people to look at."""
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    answer = (
        "Here is the plan:\n\n1. **Check** the service\n2. Restart it if needed\n\n"
        "```bash\nsystemctl status nginx\n```\n\n| host | state |\n|---|---|\n| web-1 | ok |"
    )
    steps = [
        agentkit.ToolCall("status", {"service": "nginx", "host": "web-1"}),
        answer,
        agentkit.ToolCall("restart", {"service": "nginx"}),
    ]
    web = agentkit.WebChat(title="Ops helper", examples=["What is running?", "Show the logs"])
    kit = AgentKit(tmp_path / "shots.db", model=agentkit.ScriptedModel(steps), adapters=[web])

    @kit.tool
    def status(ctx: agentkit.ToolContext, service: str, host: str) -> str:
        """Show a service's status."""
        ctx.progress(f"connecting to {host}")
        return f"{service} on {host}: active (running) since 3 days"

    @kit.tool(approval=True)
    def restart(service: str) -> str:
        """Restart a service."""
        return f"{service} restarted"

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with served(kit) as url:
        for scheme in ("light", "dark"):
            for name, size in (("desktop", (1280, 800)), ("phone", (390, 844))):
                context = browser.new_context(
                    color_scheme=scheme, viewport={"width": size[0], "height": size[1]}
                )
                page = context.new_page()
                page.goto(f"{url}/?thread=empty#token={TOKEN}")
                expect(page.locator("#empty")).to_be_visible()
                page.screenshot(path=str(SCREENSHOTS / f"empty-{name}-{scheme}.png"))
                page.goto(f"{url}/")
                if scheme == "light" and name == "desktop":
                    page.locator("#text").fill("Is nginx ok on web-1?")
                    page.locator("#text").press("Enter")
                    expect(page.locator("#log .item.kind-reply")).to_have_count(1)
                    page.locator("#text").fill("Restart it, please")
                    page.locator("#text").press("Enter")
                expect(page.locator("#log .item.kind-approval button.approve")).to_be_visible()
                page.locator("#log details.tool summary").first.click()
                page.locator("#log .item").last.scroll_into_view_if_needed()
                page.screenshot(path=str(SCREENSHOTS / f"chat-{name}-{scheme}.png"))
                if name == "phone":
                    page.locator("#menu").click()
                    expect(page.locator("#side")).to_be_in_viewport(ratio=1)
                    page.screenshot(path=str(SCREENSHOTS / f"sidebar-{name}-{scheme}.png"))
                context.close()


def test_the_web_chat_shows_and_stops_only_turns_of_its_own_conversations(
    web_kit: AgentKit,
) -> None:
    other = web_kit.run_turn("cli:me", "not for the web", wait=False).turn_id
    with served(web_kit) as url, httpx.Client(base_url=url, timeout=10) as client:
        cookie = login(client, url, TOKEN)
        headers = {"Origin": url, "Cookie": cookie}
        stop = client.post(f"/api/turns/{other}/cancel", json={}, headers=headers)
        assert stop.status_code == 404 and web_kit.turn(other).status != "cancelled"
        feed = client.get(f"/api/feed?after=0&turns={other}", headers={"Cookie": cookie})
        assert feed.status_code == 200 and feed.json()["turns"] == {}
        for bad in ("nope", f"{other},x", ",".join([other] * 21)):
            response = client.get(f"/api/feed?turns={bad}", headers={"Cookie": cookie})
            assert response.status_code == 400, bad
        for thread in ("a/b", "", "x" * 65):
            sent = client.post(
                "/api/messages", json={"text": "hi", "thread": thread}, headers=headers
            )
            assert sent.status_code == 400, thread


# ─────────────────────────────────────── files in the page ───────────────────────────────────────

PIXEL = base64.b64decode(  # a 1x1 PNG, which a browser decodes
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def test_the_page_uploads_previews_and_sends_files_and_shows_a_tools_file_for_download(
    browser, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    model = agentkit.ScriptedModel([agentkit.ToolCall("report", {}), "here is the report"])
    kit = AgentKit(tmp_path / "files.db", model=model, max_file_bytes=5_000)

    @kit.tool
    def report(ctx: agentkit.ToolContext) -> str:
        """Send the report."""
        ctx.attach(agentkit.File("report.txt", b"the report's bytes"))
        return "sent"

    with served(kit) as url, chat_page(browser, url, TOKEN) as (page, errors):
        big = {"name": "big.bin", "mimeType": "application/octet-stream", "buffer": b"x" * 6_000}
        page.set_input_files("#file-input", files=[big])
        expect(page.locator(".chip.error .state")).to_contain_text("over the limit")
        page.locator(".chip.error button").click()
        cat = {"name": "cat.png", "mimeType": "image/png", "buffer": PIXEL}
        page.set_input_files("#file-input", files=[cat])
        expect(page.locator(".chip img")).to_have_count(1)  # a thumbnail before sending
        page.evaluate(  # a pasted file uploads too
            """() => { const data = new DataTransfer();
                data.items.add(new File(["plain notes"], "notes.txt", {type: "text/plain"}));
                document.querySelector("#text").dispatchEvent(
                    new ClipboardEvent("paste", {clipboardData: data, bubbles: true})); }"""
        )
        expect(page.locator(".chip")).to_have_count(2)
        expect(page.locator(".chip .state")).to_have_count(0)  # both uploaded, none refused
        page.locator("#text").fill("what is this?")
        page.locator("#send").click()
        shown = page.locator("#log .item.kind-user img")
        expect(shown).to_have_count(1)
        expect(shown).to_have_js_property("naturalWidth", 1)  # served, decoded
        expect(page.locator("#log .item.kind-reply").last).to_contain_text("here is the report")
        link = page.locator("#log a.file-link", has_text="report.txt")
        expect(link).to_have_count(1)
        fetched = page.evaluate(
            "href => fetch(href).then(r => r.text())", link.get_attribute("href")
        )
        assert fetched == "the report's bytes"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # for people to look at
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            for name, size in (("desktop", (1280, 800)), ("phone", (390, 844))):
                page.set_viewport_size({"width": size[0], "height": size[1]})
                if name == "phone":  # the sidebar slides away when the page narrows
                    expect(page.locator("#side")).not_to_be_in_viewport()
                page.screenshot(path=str(SCREENSHOTS / f"files-{name}-{scheme}.png"))
        assert [e for e in errors if "status of 413" not in e] == []  # the refusal, logged
    [user] = [m for m in model.calls[0] if m["role"] == "user"]
    text, image = user["content"]
    assert text["text"].startswith("what is this?") and 'name="notes.txt"' in text["text"]
    assert (image["type"], image["mime"], base64.b64decode(image["data"])) == (
        "image",
        "image/png",
        PIXEL,
    )
