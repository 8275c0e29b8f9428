"""Telegram streams and formats: drafts in private chats, a message edited as it grows in
groups, markdown sent as Telegram HTML (split into valid pieces), a plain resend when
Telegram cannot parse it, 429 pauses, giving up after failed edits, and a worker killed
mid-stream. The fake Bot API checks HTML as Telegram does; the models are fake servers
over loopback that hold a stream open, or an in-process model the test steps through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import agentkit
from agentkit import AgentKit
from fake_servers import FakeAnthropic, FakeOpenAI, FakeTelegram, _visible
from test_telegram import calls_of, idle, serving
from testkit import Database, clear_config, rows, wait_until

ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_config(monkeypatch)
    # tokens other tests registered would hold back the end of deltas that could begin one
    monkeypatch.setattr(agentkit.redactions, "values", {})


@pytest.fixture
def tg() -> Any:
    with FakeTelegram() as fake:
        yield fake


def telegram(fake: FakeTelegram, **options: Any) -> agentkit.Telegram:
    options = {"allow": "*", "poll_timeout": 1, "lease": 2, "edit_interval": 0} | options
    return agentkit.Telegram(fake.token, api_url=fake.url, **options)


def in_chat(entries: list[dict[str, Any]], chat: int) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["chat_id"] == chat]


# ── markdown to Telegram HTML ──

REPLY = """## Disk report
Root has **10 GB** free, *plenty*; see [the docs](https://example.com/a?b=1&c=2).

- `/` is fine
- `/var` <is> full & growing

> quoted *note*

```python
if used > 0.9 and name != "<root>":
    alert()
```
1 < 2 and a_b_c stays."""


def test_markdown_becomes_telegram_html() -> None:
    html = agentkit.markdown_html(REPLY)
    assert "<b>Disk report</b>" in html and "<b>10 GB</b>" in html and "<i>plenty</i>" in html
    assert '<a href="https://example.com/a?b=1&amp;c=2">the docs</a>' in html
    assert "• <code>/</code> is fine" in html and "&lt;is&gt; full &amp; growing" in html
    assert "<blockquote>quoted <i>note</i></blockquote>" in html
    assert (
        '<pre><code class="language-python">if used &gt; 0.9 and name != "&lt;root&gt;":\n' in html
    )
    assert "1 &lt; 2 and a_b_c stays." in html
    visible = _visible(html, "HTML")  # the fake parses it as Telegram does
    assert "**" not in visible and "```" not in visible and "Root has 10 GB free" in visible
    assert agentkit.html_plain(html) == visible


@pytest.mark.parametrize(
    "unfinished", ["**bold but", "```sh\necho hi", "[link](https://x", "`code", "> quote *it"]
)
def test_unfinished_markdown_still_makes_valid_html(unfinished: str) -> None:
    _visible(agentkit.markdown_html(unfinished), "HTML")  # raises if Telegram would refuse it


def test_long_html_splits_into_valid_pieces() -> None:
    code = "\n".join(f"line {i} <&> {'x' * 60}" for i in range(200))
    text = f"Intro **bold** text.\n\n```python\n{code}\n```\n" + "word " * 2000
    html = agentkit.markdown_html(text)
    pieces = agentkit.split_html(html, 4096)
    assert len(pieces) >= 4 and all(len(piece) <= 4096 for piece in pieces)
    shown = [_visible(piece, "HTML") for piece in pieces]  # each piece valid on its own
    assert "".join(shown) == _visible(html, "HTML")
    in_code = [p for p in pieces if "line 1" in p]
    assert all(p.count('<pre><code class="language-python">') == 1 for p in in_code)
    assert len(in_code) >= 2  # the code block went on in the next piece, reopened


# ── streaming into chats ──


class SteppedModel:
    """Streams `pieces` as deltas; before piece i in `gates` it waits for that event."""

    name = "stepped"
    can_stream = True

    def __init__(self, pieces: list[str], gates: dict[int, threading.Event]) -> None:
        self.pieces, self.gates = pieces, gates

    def complete(self, instructions, messages, tools, *, on_delta=None):
        for i, piece in enumerate(self.pieces):
            if i in self.gates:
                assert self.gates[i].wait(30)
            on_delta(piece)
        return agentkit.ModelReply("".join(self.pieces), [], {})


def kit_with(db: Database, model: Any, adapter: agentkit.Telegram) -> AgentKit:
    return AgentKit(db, model=model, adapters=[adapter])


def test_private_chat_drafts_then_one_html_message(db: Database, tg: FakeTelegram) -> None:
    with FakeOpenAI() as openai:
        reply = "**Streaming** replies arrive `piece` by piece."
        release = openai.hold(reply)
        model = agentkit.OpenAIModel("m", base_url=openai.url, api_key="k")
        with kit_with(db, model, telegram(tg)) as kit, serving(kit):
            tg.push_message(42, 42, "hi")
            # the first delta (its end may wait while it could begin a known secret)
            tg.wait_for(
                lambda f: any(d["plain"] and reply.startswith(d["plain"]) for d in f.drafts)
            )
            assert not release.is_set() and tg.texts(42) == []
            drafts = in_chat(tg.drafts, 42)
            assert drafts[0]["text"] == ""  # "thinking" before the first token
            assert len({d["draft_id"] for d in drafts}) == 1 and drafts[0]["draft_id"] != 0
            release.set()
            tg.wait_for(lambda f: f.texts(42))
            wait_until(lambda: idle(db), what="idle")
            (sent,) = in_chat(tg.sent, 42)
            assert sent["parse_mode"] == "HTML"
            assert sent["text"] == "<b>Streaming</b> replies arrive <code>piece</code> by piece."
            assert tg.edits == []


def test_group_first_message_then_edits_then_the_final_edit(db: Database, tg: FakeTelegram) -> None:
    text = "A reply long enough to start a message in the group, then *more* and **more** text."
    with FakeAnthropic() as anthropic:
        release = anthropic.hold(text, after=12)  # 48 characters before the hold
        model = agentkit.AnthropicModel("m", base_url=anthropic.url, api_key="k")
        with kit_with(db, model, telegram(tg)) as kit, serving(kit):
            tg.push_message(-100, 42, "hi", topic=7)
            tg.wait_for(lambda f: in_chat(f.sent, -100))
            (first,) = in_chat(tg.sent, -100)
            assert len(first["plain"]) >= 40 and text.startswith(first["plain"])
            assert first["message_thread_id"] == 7 and not release.is_set()
            assert tg.drafts == []
            release.set()
            final = agentkit.html_plain(agentkit.markdown_html(text))
            tg.wait_for(lambda f: (f.message(-100, first["message_id"]) or {}).get("text") == final)
            wait_until(lambda: idle(db), what="idle")
            assert len(in_chat(tg.sent, -100)) == 1  # one message, edited into the reply
            last = in_chat(tg.edits, -100)[-1]
            assert last["parse_mode"] == "HTML" and "<i>more</i> and <b>more</b>" in last["text"]


def test_a_tool_call_shows_as_a_status_line(db: Database, tg: FakeTelegram) -> None:
    seen = threading.Event()
    model = agentkit.ScriptedModel([agentkit.ToolCall("disk_free", {}), "It has 10 GB free."])
    kit = kit_with(db, model, telegram(tg))

    @kit.tool
    def disk_free(ctx: agentkit.ToolContext) -> str:
        """Free space."""
        tg.wait_for(lambda f: any("running disk_free…" in d["plain"] for d in f.drafts))
        ctx.progress("reading /proc/mounts")
        tg.wait_for(lambda f: any("reading /proc/mounts" in d["plain"] for d in f.drafts))
        seen.set()
        return "10 GB"

    with kit, serving(kit):
        tg.push_message(42, 42, "how much?")
        tg.wait_for(lambda f: f.texts(42))
        assert seen.is_set() and tg.texts(42) == ["It has 10 GB free."]
        wait_until(lambda: idle(db), what="idle")
        contents = rows(db, "messages", "content")
        assert not [text for text in contents if text and "running" in text]


def test_group_edits_wait_for_the_interval(db: Database, tg: FakeTelegram) -> None:
    clock = [1000.0]
    gates = {1: threading.Event(), 2: threading.Event()}
    pieces = ["x" * 45, " second part", " third part"]
    adapter = telegram(tg, edit_interval=1.0)
    adapter.clock = lambda: clock[0]
    with kit_with(db, SteppedModel(pieces, gates), adapter) as kit, serving(kit):
        tg.push_message(-100, 42, "go")
        tg.wait_for(lambda f: in_chat(f.sent, -100))
        gates[1].set()
        stream = wait_until(lambda: next(iter(adapter._streams.values()), None))
        wait_until(lambda: stream.text.endswith("second part"), what="the second delta")
        adapter.wake()
        assert in_chat(tg.edits, -100) == []  # the clock has not moved: no edit yet
        clock[0] += 1.0
        adapter.wake()
        tg.wait_for(lambda f: any(e["plain"].endswith("second part") for e in f.edits))
        gates[2].set()
        tg.wait_for(lambda f: any(e["plain"].endswith("third part") for e in f.edits))
        wait_until(lambda: idle(db), what="idle")
        assert len(in_chat(tg.sent, -100)) == 1


def test_a_429_pauses_edits_but_not_the_final_text(db: Database, tg: FakeTelegram) -> None:
    clock = [1000.0]
    gates = {1: threading.Event(), 2: threading.Event()}
    pieces = ["y" * 45, " more", " and the end."]
    adapter = telegram(tg, edit_interval=1.0)
    adapter.clock = lambda: clock[0]
    with kit_with(db, SteppedModel(pieces, gates), adapter) as kit, serving(kit):
        tg.push_message(-100, 42, "go")
        tg.wait_for(lambda f: in_chat(f.sent, -100))
        message_id = in_chat(tg.sent, -100)[0]["message_id"]
        tg.fail_next("editMessageText", 429, retry_after=30)
        gates[1].set()
        stream = wait_until(lambda: next(iter(adapter._streams.values()), None))
        wait_until(lambda: stream.text.endswith("more"), what="the second delta")
        clock[0] += 1.0
        adapter.wake()
        wait_until(lambda: stream.paused_until == clock[0] + 30, what="the 429")
        clock[0] += 5.0  # past the interval, not past retry_after
        gates[2].set()  # the turn ends: the final text goes out at once, as the last edit
        final = "y" * 45 + " more and the end."
        tg.wait_for(lambda f: (f.message(-100, message_id) or {}).get("text") == final)
        wait_until(lambda: idle(db), what="idle")
        assert [e["plain"] for e in in_chat(tg.edits, -100)] == [final]
        assert len(calls_of(tg, "editMessageText")) == 2  # the refused one, then the final


def test_three_failed_edits_stop_the_stream(db: Database, tg: FakeTelegram) -> None:
    gate = threading.Event()
    pieces = ["z" * 45, *[f" {i}" for i in range(3)], " end"]
    adapter = telegram(tg)
    edits_failed = lambda f: len(calls_of(f, "editMessageText")) >= 3  # noqa: E731

    class Model(SteppedModel):
        def complete(self, instructions, messages, tools, *, on_delta=None):
            on_delta(self.pieces[0])
            tg.wait_for(lambda f: in_chat(f.sent, -100))
            for i, piece in enumerate(self.pieces[1:4]):
                on_delta(piece)
                tg.wait_for(lambda f, i=i: len(calls_of(f, "editMessageText")) > i)
            tg.wait_for(edits_failed)
            gate.wait(30)
            on_delta(self.pieces[4])
            return agentkit.ModelReply("".join(self.pieces), [], {})

    for _ in range(3):
        tg.fail_next("editMessageText", 500)
    with kit_with(db, Model(pieces, {}), adapter) as kit, serving(kit):
        tg.push_message(-100, 42, "go")
        tg.wait_for(lambda f: f.deleted)  # it gave up: the partial message goes
        gate.set()
        tg.wait_for(lambda f: len(in_chat(f.sent, -100)) == 2)
        wait_until(lambda: idle(db), what="idle")
        first, final = in_chat(tg.sent, -100)
        assert tg.deleted[0]["message_id"] == first["message_id"]
        assert final["plain"] == "".join(pieces) and final["parse_mode"] == "HTML"
        assert len(calls_of(tg, "editMessageText")) == 3


def test_cant_parse_entities_gets_one_plain_resend(db: Database, tg: FakeTelegram) -> None:
    description = "Bad Request: can't parse entities: Unsupported start tag"
    tg.fail_next("sendMessage", 400, description=description)
    with kit_with(db, agentkit.ScriptedModel(["**Bold** & <b>"]), telegram(tg)) as kit:
        with serving(kit):
            tg.push_message(42, 42, "hi")
            tg.wait_for(lambda f: f.texts(42))
            wait_until(lambda: idle(db), what="idle")
        tried = [c for c in calls_of(tg, "sendMessage") if c["chat_id"] == 42]
        assert [c.get("parse_mode") for c in tried] == ["HTML", None]
        (sent,) = in_chat(tg.sent, 42)
        assert sent["text"] == "Bold & <b>" and sent["parse_mode"] is None


def test_a_long_reply_is_split_into_valid_html_messages(db: Database, tg: FakeTelegram) -> None:
    code = "\n".join(f"row {i} & <{i}>" + "." * 50 for i in range(150))
    reply = f"**Report**\n```text\n{code}\n```\nDone."
    with kit_with(db, agentkit.ScriptedModel([reply]), telegram(tg)) as kit:
        with serving(kit):
            tg.push_message(42, 42, "report")
            wait_until(lambda: idle(db) and tg.texts(42), what="idle")
        sent = in_chat(tg.sent, 42)
        assert len(sent) >= 3 and all(s["parse_mode"] == "HTML" for s in sent)
        assert "".join(s["plain"] for s in sent) == agentkit.html_plain(
            agentkit.markdown_html(reply)
        )


# ── a worker killed mid-stream ──

APP = """
import agentkit
model = agentkit.OpenAIModel("m", base_url={openai!r}, api_key="k")
model.backoff_base = 0.0
tg = agentkit.Telegram({token!r}, api_url={api!r}, allow="*", poll_timeout=1, lease=2,
                       edit_interval=0)
kit = agentkit.AgentKit({db!r}, model=model, adapters=[tg], lease=3)
"""


HTTP = ("--http", "127.0.0.1:0")


def serve(tmp_path: Path, label: str) -> subprocess.Popen:
    log = tmp_path / f"{label}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "agentkit.py"), "serve", "--app", "app:kit", *HTTP],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return proc


def test_a_worker_killed_mid_stream_is_taken_over_and_replies_once(
    tmp_path: Path, db: Database, tg: FakeTelegram
) -> None:
    procs: list[subprocess.Popen] = []
    with FakeOpenAI() as openai:
        release = openai.hold("The first attempt never finishes.")
        openai.push(text="The **answer**, once.")
        (tmp_path / "app.py").write_text(
            APP.format(openai=openai.url, token=tg.token, api=tg.url, db=str(db))
        )
        try:
            procs.append(serve(tmp_path, "first"))
            tg.push_message(42, 42, "question")
            first = "The first attempt never finishes."
            tg.wait_for(
                lambda f: any(d["plain"] and first.startswith(d["plain"]) for d in f.drafts),
                timeout=30,
            )
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            procs.append(serve(tmp_path, "second"))
            tg.wait_for(lambda f: f.texts(42), timeout=60)
            wait_until(lambda: idle(db), timeout=60, what="idle")
            assert tg.texts(42) == ["The <b>answer</b>, once."]
            assert [s["plain"] for s in tg.sent] == ["The answer, once."]
            assert len(openai.requests) == 2
        finally:
            release.set()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(20)


def test_a_turn_that_fails_deletes_its_streamed_message(db: Database, tg: FakeTelegram) -> None:
    class Failing(SteppedModel):
        def complete(self, instructions, messages, tools, *, on_delta=None):
            on_delta("w" * 50)
            tg.wait_for(lambda f: in_chat(f.sent, -100))
            raise agentkit.ModelError("the model went away")

    with kit_with(db, Failing([], {}), telegram(tg)) as kit, serving(kit):
        tg.push_message(-100, 42, "go")
        tg.wait_for(lambda f: f.deleted and len(in_chat(f.sent, -100)) == 2)
        wait_until(lambda: idle(db), what="idle")
        partial, error = in_chat(tg.sent, -100)
        assert tg.deleted == [
            {"method": "deleteMessage", "chat_id": -100, "message_id": partial["message_id"]}
        ]
        assert "the model went away" in error["plain"]
