"""Attachments: files and images in and out, kept in their scope, in every adapter and
every model.

Real parts only: SQLite files under tmp_path (and the PostgreSQL server of conftest.py),
the fake OpenAI, Anthropic and Telegram servers over loopback, the web chat and webhook
served over HTTP, and a real process killed with SIGKILL between two polls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import agentkit
from agentkit import AgentKit, File, ScriptedModel, ToolCall, ToolContext
from fake_servers import FakeAnthropic, FakeOpenAI, FakeTelegram
from testkit import all_rows, clear_config, count, served, wait_until

ROOT = Path(__file__).resolve().parent
TOKEN = "web-token-for-the-attachment-tests"
SECRET = "s3cret-for-the-attachment-tests"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + b"\x00\x01binary\xff" * 10 + b"\n%%EOF"


@pytest.fixture(autouse=True)
def no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_config(monkeypatch)


def recording() -> tuple[ScriptedModel, list[list[dict[str, Any]]]]:
    """A scripted model that answers "seen" and keeps the messages of each request."""
    seen: list[list[dict[str, Any]]] = []

    def answer(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        seen.append(messages)
        return "seen"

    return ScriptedModel([answer] * 20), seen


def images_of(message: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(p["data"]) for p in message["content"] if p["type"] == "image"]


# ───────────────────────────────── the models' content parts ─────────────────────────────────


def test_openai_gets_image_and_pdf_parts_and_text_files_inline(tmp_path: Path) -> None:
    with FakeOpenAI() as fake:
        fake.push(text="a cat")
        model = agentkit.OpenAIModel(
            "m",
            api_key="k",
            base_url=fake.url,
            stream=False,
            attachment_types=("image/*", "application/pdf"),
        )
        with AgentKit(tmp_path / "a.db", model=model, instructions="") as kit:
            files = [
                File("cat.png", PNG),
                File("paper.pdf", PDF),
                File("notes.md", b"# hello"),
                File("blob.bin", b"\x00\x01"),
            ]
            result = kit.run_turn("cli:me", "what is this?", files=files)
            assert (result.status, result.reply) == ("done", "a cat")
        [blob] = [f for f in kit_history(tmp_path / "a.db") if f["name"] == "blob.bin"]
        [message] = fake.requests[0].body["messages"]
        assert message == {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": 'what is this?\n\n<file name="notes.md">\n# hello\n</file>\n\n'
                    f"[file blob.bin (application/octet-stream, 2 bytes), id {blob['id']}]",
                },
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
                },
                {
                    "type": "file",
                    "file": {
                        "filename": "paper.pdf",
                        "file_data": "data:application/pdf;base64,"
                        + base64.b64encode(PDF).decode(),
                    },
                },
            ],
        }
        assert fake.files == [("image", "image/png", PNG), ("file", "application/pdf", PDF)]


def kit_history(db: Path) -> list[dict[str, Any]]:
    """The files of every message of cli:me, as history() lists them."""
    with AgentKit(db, model="echo") as kit:
        return [f for m in kit.history("cli:me") for f in m.get("files", [])]


def test_a_compatible_server_is_not_sent_pdfs_it_may_refuse(tmp_path: Path) -> None:
    with FakeOpenAI() as fake:
        fake.push(text="ok")
        model = agentkit.OpenAIModel("m", api_key="k", base_url=fake.url, stream=False)
        assert "application/pdf" not in model.attachment_types
        with AgentKit(tmp_path / "a.db", model=model) as kit:
            kit.run_turn("cli:me", "read it", files=[File("paper.pdf", PDF)])
        content = fake.requests[0].body["messages"][-1]["content"]
        assert content.startswith("read it\n\n[file paper.pdf (application/pdf, ")  # described
        assert fake.files == []
    assert "application/pdf" in agentkit.OpenAIModel("m", api_key="k").attachment_types


def test_anthropic_gets_image_and_document_blocks(tmp_path: Path) -> None:
    with FakeAnthropic() as fake:
        fake.push(text="a cat and a paper")
        model = agentkit.AnthropicModel("m", api_key="k", base_url=fake.url, stream=False)
        with AgentKit(tmp_path / "a.db", model=model) as kit:
            files = [File("cat.png", PNG), File("paper.pdf", PDF)]
            assert kit.run_turn("cli:me", "", files=files).status == "done"
        assert fake.requests[0].body["messages"] == [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": base64.b64encode(PNG).decode(),
                        },
                    },
                    {
                        "type": "document",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": base64.b64encode(PDF).decode(),
                        },
                    },
                ],
            }
        ]
        assert fake.files == [("image", "image/png", PNG), ("document", "application/pdf", PDF)]


def chart_kit(db: Path, model: agentkit.Model, *adapters: agentkit.Adapter) -> AgentKit:
    kit = AgentKit(db, model=model, adapters=list(adapters))

    @kit.tool
    def chart(ctx: ToolContext) -> File:
        """Draw the chart."""
        ctx.attach(File("data.csv", b"x,y\n1,2\n"))
        return File("chart.png", PNG)

    return kit


def test_a_tool_image_is_a_tool_result_image_for_anthropic_and_sent_once(tmp_path: Path) -> None:
    with FakeAnthropic() as fake:
        fake.push(tool_calls=[("chart", {})])
        fake.push(text="here it is")
        fake.push(text="still there")
        model = agentkit.AnthropicModel("m", api_key="k", base_url=fake.url, stream=False)
        with chart_kit(tmp_path / "a.db", model) as kit:
            assert kit.run_turn("cli:me", "draw").reply == "here it is"
            kit.run_turn("cli:me", "and now?")  # earlier images stay in the window
            history = kit.history("cli:me")
        result = fake.requests[1].body["messages"][-1]["content"][0]
        [chart] = [f for m in history for f in m.get("files", []) if f["name"] == "chart.png"]
        assert result == {
            "type": "tool_result",
            "tool_use_id": result["tool_use_id"],
            "content": [
                {
                    "type": "text",
                    "text": f"[file chart.png (image/png, {len(PNG)} bytes), id {chart['id']}]",
                },
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/png",
                        "data": base64.b64encode(PNG).decode(),
                    },
                },
            ],
            "is_error": False,
        }
        assert fake.files == [("image", "image/png", PNG)] * 2
    files = sorted(
        (d["kind"], d["body"]["file"]["name"])
        for d in all_rows(tmp_path / "a.db", "deliveries")
        if d["kind"] == "file"
    )
    assert files == []  # cli: no adapter serves it, so nothing goes to the outbox


def test_a_tool_image_follows_the_tool_results_as_a_user_message_for_openai(
    tmp_path: Path,
) -> None:
    with FakeOpenAI() as fake:
        fake.push(tool_calls=[("chart", {})])
        fake.push(text="here it is")
        model = agentkit.OpenAIModel("m", api_key="k", base_url=fake.url, stream=False)
        with chart_kit(tmp_path / "a.db", model) as kit:
            assert kit.run_turn("cli:me", "draw").reply == "here it is"
        messages = fake.requests[1].body["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
        assert messages[3]["content"].startswith("[file chart.png (image/png, ")
        assert messages[4]["content"] == [
            {"type": "text", "text": "The files chart returned:"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
            },
        ]


def test_a_model_that_takes_no_files_is_told_what_they_are(tmp_path: Path) -> None:
    with AgentKit(tmp_path / "a.db", model="echo") as kit:
        reply = kit.run_turn("cli:me", "look", files=[File("cat.png", PNG)]).reply
        [file] = kit.history("cli:me")[0]["files"]
    assert reply == f"echo: look\n\n[file cat.png (image/png, {len(PNG)} bytes), id {file['id']}]"


# ─────────────────────────────────── scope, limits, storage ───────────────────────────────────


def test_a_file_of_one_thread_cannot_be_opened_from_another(tmp_path: Path) -> None:
    model, _ = recording()
    with AgentKit(tmp_path / "a.db", model=model) as kit:
        opened: list[Any] = []

        @kit.tool
        def peek(attachment_id: str, ctx: ToolContext) -> str:
            """Open a file."""
            try:
                opened.append(ctx.open(attachment_id))
            except agentkit.NotFound as e:
                opened.append(e)
            return "ok"

        kit.run_turn("cli:a", "mine", files=[File("a.txt", b"thread a's secret")])
        [file] = kit.history("cli:a")[0]["files"]
        assert kit.open_file("cli:a", file["id"]) == b"thread a's secret"
        for trick in (file["id"], f"../{file['id']}", file["id"].upper(), f"{file['id']}/..", ""):
            with pytest.raises(agentkit.NotFound):
                kit.open_file("cli:b", trick)
        sha = hashlib.sha256(b"thread a's secret").hexdigest()
        with pytest.raises(agentkit.NotFound):
            kit.open_file("cli:a", sha)  # a content address is no id
        model._steps[:0] = [ToolCall("peek", {"attachment_id": file["id"]})]
        kit.run_turn("cli:b", "steal it")
        assert len(opened) == 1 and isinstance(opened[0], agentkit.NotFound)


def test_a_file_over_the_limit_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    with AgentKit(tmp_path / "a.db", model="echo", max_file_bytes=100) as kit:
        with pytest.raises(agentkit.TooLarge, match="over the limit of 100 bytes"):
            kit.run_turn("cli:me", "hi", files=[File("ok.txt", b"ok"), File("big", b"x" * 101)])
        assert {table: n for table, n in kit.store.row_counts().items() if n} == {}


def test_large_files_live_beside_the_database_and_prune_removes_unreferenced(
    tmp_path: Path,
) -> None:
    big = os.urandom(agentkit.INLINE_FILE_BYTES + 1)
    with AgentKit(tmp_path / "a.db", model="echo") as kit:
        kit.run_turn("cli:me", "big", files=[File("big.bin", big), File("small.txt", b"s")])
        kit.run_turn("cli:me", "again", files=[File("same.bin", big)])  # one content, kept once
        folder = tmp_path / "a.db.files"
        assert [p.name for p in folder.iterdir()] == [hashlib.sha256(big).hexdigest()]
        blobs = all_rows(kit, "blobs")
        assert sorted((b["size"], b["data"] is None) for b in blobs) == [
            (1, False),
            (len(big), True),
        ]
        [first, *_] = kit.history("cli:me")[0]["files"]
        assert kit.open_file("cli:me", first["id"]) == big
        (folder / ".leftover.1.2").write_bytes(b"an interrupted write")
        os.utime(folder / ".leftover.1.2", (0, 0))
        other = os.urandom(agentkit.INLINE_FILE_BYTES + 1)
        with pytest.raises(agentkit.TooLarge):  # checked before any is kept
            kit.run_turn("cli:me", "no", files=[File("b", other), File("c", b"c" * (21 << 20))])
        assert len(list(folder.iterdir())) == 2
        pruned = kit.prune(0)
        assert (pruned["blobs"], pruned["attachments"]) == (0, 0)  # all still referred to
        assert sorted(p.name for p in folder.iterdir()) == [hashlib.sha256(big).hexdigest()]


def test_on_postgresql_every_file_is_in_the_database(postgres_db: str, tmp_path: Path) -> None:
    big = os.urandom(agentkit.INLINE_FILE_BYTES + 1)
    with AgentKit(postgres_db, model="echo", workspace=tmp_path / "ws") as kit:
        kit.run_turn("cli:me", "big", files=[File("big.bin", big)])
        [file] = kit.history("cli:me")[0]["files"]
    with AgentKit(postgres_db, model="echo", workspace=tmp_path / "ws2") as other:  # a host
        assert other.open_file("cli:me", file["id"]) == big
        [blob] = all_rows(other, "blobs")
        assert bytes(blob["data"]) == big
    assert not list(tmp_path.glob("**/*.files"))


def test_a_custom_attachment_store_is_used_and_scope_checked(tmp_path: Path) -> None:
    class Memory:
        def __init__(self) -> None:
            self.kept: dict[str, tuple[str, bytes]] = {}

        def save(self, scope: str, file: File) -> agentkit.Attachment:
            assert file.data is not None and file.path is None  # read and checked already
            made = agentkit.Attachment(
                agentkit.new_id("att"), file.name, file.media_type(), len(file.data), "-"
            )
            self.kept[made.id] = (scope, file.data)
            return made

        def open(self, attachment_id: str, scope: str) -> bytes:
            kept_scope, data = self.kept[attachment_id]
            if kept_scope != scope:
                raise agentkit.NotFound(attachment_id)
            return data

    memory = Memory()
    with AgentKit(tmp_path / "a.db", model="echo", attachments=memory) as kit:
        (tmp_path / "a.txt").write_bytes(b"in memory")
        kit.run_turn("cli:me", "x", files=[File("a.txt", path=tmp_path / "a.txt")])
        [file] = kit.history("cli:me")[0]["files"]
        assert memory.kept[file["id"]] == ("cli:me", b"in memory")
        assert kit.open_file("cli:me", file["id"]) == b"in memory"
        assert all_rows(kit, "blobs") == []
    with pytest.raises(agentkit.BadInput, match="AttachmentStore"):
        AgentKit(tmp_path / "b.db", attachments=object())  # type: ignore[arg-type]


# ─────────────────────────────────────────── Telegram ───────────────────────────────────────────

BOT_TOKEN = "777001:AAFiles-Secret_Token77xyz"


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    with FakeTelegram(BOT_TOKEN) as f:
        yield f


def telegram(fake: FakeTelegram, **options: Any) -> agentkit.Telegram:
    options = {"allow": "*", "poll_timeout": 1, "lease": 2, "album_wait": 0.2} | options
    return agentkit.Telegram(fake.token, api_url=fake.url, **options)


def work_until(kit: AgentKit, done: Any, what: str) -> None:
    """Run the ready jobs (an album's turn waits `album_wait`) until `done()`."""
    wait_until(lambda: (kit.work(until_idle=True), done())[1], what=what)


def test_a_photo_in_four_sizes_gives_the_model_the_largest_within_the_limit(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    sizes = [os.urandom(n) for n in (1_000, 8_000, 30_000, 60_000)]
    model, seen = recording()
    tg = telegram(fake)
    with AgentKit(tmp_path / "a.db", model=model, adapters=[tg], max_file_bytes=50_000) as kit:
        fake.push_photo(42, 42, sizes, caption="what is this?")
        assert tg.poll_once() == 1
        work_until(kit, lambda: fake.texts(42) == ["seen"], "the reply")
        [message] = seen[0]
        assert message["content"][0]["text"] == "what is this?"
        assert images_of(message) == [sizes[2]]  # byte for byte, and only that one
        assert fake.downloads == ["FILE0003"]
        [file] = kit.history("telegram:42")[0]["files"]
        assert (file["mime"], file["size"]) == ("image/jpeg", 30_000)
    assert BOT_TOKEN.partition(":")[2].encode() not in (tmp_path / "a.db").read_bytes()


def test_an_album_sent_in_two_polls_is_one_turn_with_three_images(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    photos = [os.urandom(2_000) for _ in range(3)]
    model, seen = recording()
    tg = telegram(fake, album_wait=0.5)
    with AgentKit(tmp_path / "a.db", model=model, adapters=[tg]) as kit:
        fake.push_photo(42, 42, [photos[0]], caption="our trip", media_group_id="G1")
        fake.push_photo(42, 42, [photos[1]], media_group_id="G1")
        assert tg.poll_once() == 2
        fake.push_photo(42, 42, [photos[2]], media_group_id="G1")
        assert tg.poll_once() == 1
        work_until(kit, lambda: fake.texts(42) == ["seen"], "the reply")
        assert len(seen) == 1 and images_of(seen[0][-1]) == photos
        assert count(kit, "turns") == 1
        assert [f["size"] for f in kit.history("telegram:42")[0]["files"]] == [2_000] * 3


POLL_ONCE_AND_DIE = """
import os, signal, sys
import agentkit
tg = agentkit.Telegram(sys.argv[2], api_url=sys.argv[3], allow="*", poll_timeout=1, album_wait=30)
kit = agentkit.AgentKit(sys.argv[1], model="echo", adapters=[tg])
tg.kit = kit
print(tg.poll_once(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_album_whose_poller_is_killed_between_polls_is_still_one_turn(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    photos = [os.urandom(2_000) for _ in range(3)]
    db = tmp_path / "a.db"
    fake.push_photo(42, 42, [photos[0]], caption="trip", media_group_id="G7")
    fake.push_photo(42, 42, [photos[1]], media_group_id="G7")
    killed = subprocess.run(
        [sys.executable, "-c", POLL_ONCE_AND_DIE, str(db), fake.token, fake.url],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL and killed.stdout.strip() == "2", killed.stderr
    model, seen = recording()
    tg = telegram(fake, album_wait=0.5)
    with AgentKit(db, model=model, adapters=[tg]) as kit:
        fake.push_photo(42, 42, [photos[2]], media_group_id="G7")
        assert tg.poll_once() == 1
        work_until(kit, lambda: fake.texts(42) == ["seen"], "the reply")
        assert len(seen) == 1 and images_of(seen[0][-1]) == photos
        assert count(kit, "turns") == 1


def test_a_document_over_the_limit_gets_a_clear_reply_and_writes_no_row(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    tg = telegram(fake)
    with AgentKit(tmp_path / "a.db", model="echo", adapters=[tg], max_file_bytes=1_000) as kit:
        big = fake.add_file(os.urandom(1_001))
        fake.push_media(42, 42, {"document": {**big, "file_name": "big.zip"}})
        assert tg.poll_once() == 1
        kit.work(until_idle=True)
        [reply] = fake.texts(42)
        assert "big.zip is 1,001 bytes, over the limit of 1,000 bytes" in reply
        assert fake.downloads == []  # not even fetched
        assert count(kit, "turns") == count(kit, "attachments") == count(kit, "blobs") == 0


def test_a_download_that_fails_midway_writes_nothing_and_is_fetched_again(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    model, seen = recording()
    tg = telegram(fake)
    with AgentKit(tmp_path / "a.db", model=model, adapters=[tg]) as kit:
        cut = fake.add_file(PDF * 100, cut=True)
        update = fake.push_media(42, 42, {"document": {**cut, "file_name": "paper.pdf"}})
        with pytest.raises(agentkit.AdapterError, match="telegram download") as failed:
            tg.poll_once()
        assert BOT_TOKEN.partition(":")[2] not in str(failed.value)
        assert kit.store.cursor("telegram") is None
        assert count(kit, "turns") == count(kit, "attachments") == count(kit, "blobs") == 0
        fake._cut.clear()  # the network is back: the same update is fetched again
        assert tg.poll_once() == 1
        assert kit.store.cursor("telegram") == str(update + 1)
        kit.work(until_idle=True)
        assert seen[0][-1]["content"].startswith("[file paper.pdf (application/pdf")


def test_a_tools_files_go_out_as_photo_and_document_exactly_once(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    model = ScriptedModel([ToolCall("chart", {}), "here"])
    tg = telegram(fake)
    with chart_kit(tmp_path / "a.db", model, tg) as kit:
        fake.push_message(42, 42, "draw")
        assert tg.poll_once() == 1
        kit.work(until_idle=True)
        assert fake.texts(42) == ["here"]
        kit.work(until_idle=True)  # nothing is sent twice
    got = sorted((u["method"], u["name"], u["mime"], u["data"]) for u in fake.uploads)
    assert got == [
        ("sendDocument", "data.csv", "text/csv", b"x,y\n1,2\n"),
        ("sendPhoto", "chart.png", "image/png", PNG),
    ]
    assert {u["chat_id"] for u in fake.uploads} == {42}


# ───────────────────────────────────── web chat and webhook ─────────────────────────────────────


def signed_in(client: httpx.Client, url: str) -> dict[str, str]:
    """The headers of a signed-in page: the session cookie (traded for the token), Origin."""
    response = client.post("/api/login", json={"token": TOKEN}, headers={"Origin": url})
    assert response.status_code == 204, response.text
    return {"Cookie": response.headers["set-cookie"].split(";", 1)[0], "Origin": url}


def feed(client: httpx.Client, headers: dict[str, str], done: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while not done(items):
        assert time.monotonic() < deadline, items
        last = items[-1]["id"] if items else 0
        items += client.get(f"/api/feed?after={last}", headers=headers).json()["items"]
    return items


def test_the_web_chat_uploads_sends_and_downloads_files_only_as_attachments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    model, seen = recording()
    page = b"<html><script>alert(1)</script></html>"
    with (
        served(chart_kit(tmp_path / "w.db", model)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        headers = signed_in(client, url)
        unsigned = httpx.post(f"{url}/api/files?name=a.png", content=PNG, headers={"Origin": url})
        assert unsigned.status_code == 401
        uploaded = client.post(
            "/api/files?name=cat.png", content=PNG, headers=headers | {"Content-Type": "image/png"}
        )
        assert uploaded.status_code == 201, uploaded.text
        image = uploaded.json()
        assert image | {"id": ""} == {
            "id": "",
            "name": "cat.png",
            "mime": "image/png",
            "size": len(PNG),
            "url": f"/api/files/{image['id']}",
        }
        html = client.post(
            "/api/files?name=page.html",
            content=page,
            headers=headers | {"Content-Type": "text/html"},
        ).json()
        sent = client.post(
            "/api/messages", json={"text": "", "files": [image["id"], html["id"]]}, headers=headers
        )
        assert sent.status_code == 202, sent.text
        again = client.post("/api/messages", json={"files": [image["id"]]}, headers=headers)
        assert again.status_code == 400  # an upload goes with one message only
        items = feed(client, headers, lambda items: any(i["kind"] == "reply" for i in items))
        [user] = [i for i in items if i["kind"] == "user"]
        assert [f["name"] for f in user["files"]] == ["cat.png", "page.html"]
        assert images_of(seen[0][-1]) == [PNG]

        shown = client.get(image["url"], headers=headers)
        assert shown.status_code == 200 and shown.content == PNG
        assert shown.headers["content-type"] == "image/png"
        assert shown.headers["content-disposition"].startswith('attachment; filename="cat.png"')
        served_page = client.get(html["url"], headers=headers)
        assert served_page.content == page
        assert served_page.headers["content-type"] == "application/octet-stream"  # never HTML
        assert served_page.headers["content-disposition"].startswith("attachment;")
        assert served_page.headers["x-content-type-options"] == "nosniff"
        for other in ("att_0000000000000000", f"..%2F{image['id']}", image["id"].upper()):
            assert client.get(f"/api/files/{other}", headers=headers).status_code == 404
        assert httpx.get(url + image["url"]).status_code == 401
        too_big = client.post(
            "/api/files?name=big.bin", content=b"x" * (agentkit.MAX_FILE_BYTES + 1), headers=headers
        )
        assert too_big.status_code == 413 and "over" in too_big.json()["error"]
        two_mib = os.urandom(2 << 20)
        big = client.post("/api/files?name=big.bin", content=two_mib, headers=headers)
        assert big.status_code == 201 and big.json()["size"] == 2 << 20
        unsigned = httpx.post(f"{url}/api/files?name=b", content=two_mib, headers={"Origin": url})
        assert unsigned.status_code == 413  # not signed in: no more than 1 MiB is read

        model._steps[:0] = [ToolCall("chart", {})]
        client.post("/api/messages", json={"text": "draw"}, headers=headers)
        items = feed(client, headers, lambda items: sum(i["kind"] == "reply" for i in items) >= 2)
        files = [i["file"] for i in items if i["kind"] == "file"]
        assert sorted(f["name"] for f in files) == ["chart.png", "data.csv"]
        [csv] = [f for f in files if f["name"] == "data.csv"]
        assert client.get(csv["url"], headers=headers).content == b"x,y\n1,2\n"


def test_a_file_of_another_thread_is_not_served_by_the_web_chat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    kit = AgentKit(tmp_path / "w.db", model="echo")
    kit.run_turn("cli:me", "mine", files=[File("a.txt", b"not for the web")])
    [file] = kit.history("cli:me")[0]["files"]
    with served(kit) as url, httpx.Client(base_url=url, timeout=30) as client:
        headers = signed_in(client, url)
        assert client.get(f"/api/files/{file['id']}", headers=headers).status_code == 404
        taken = client.post("/api/messages", json={"files": [file["id"]]}, headers=headers)
        assert taken.status_code == 400


def signed(body: bytes) -> dict[str, str]:
    t = int(time.time())
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Agentkit-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


def test_webhook_files_come_as_base64_and_are_checked_before_anything_is_stored(
    tmp_path: Path,
) -> None:
    model, seen = recording()
    hook = agentkit.Webhook(SECRET, name="hook")
    kit = AgentKit(tmp_path / "h.db", model=model, adapters=[hook], max_file_bytes=2_000)
    with served(kit) as url, httpx.Client(base_url=url, timeout=30) as client:
        event = {"id": "e1", "thread": "t", "actor": "a", "text": "see"}
        big = json.dumps(event | {"files": [{"name": "b", "data": "QUFB" * 700}]}).encode()
        refused = client.post("/webhook/hook", content=big, headers=signed(big))
        assert refused.status_code == 413 and "over the limit of 2,000" in refused.text
        bad = json.dumps(event | {"files": [{"name": "b", "data": "not base64!"}]}).encode()
        assert client.post("/webhook/hook", content=bad, headers=signed(bad)).status_code == 400
        assert count(kit, "turns") == count(kit, "attachments") == count(kit, "blobs") == 0
        files = [{"name": "cat.png", "data": base64.b64encode(PNG).decode(), "mime": "image/png"}]
        body = json.dumps(event | {"files": files}).encode()
        assert client.post("/webhook/hook", content=body, headers=signed(body)).status_code == 202
        wait_until(lambda: seen, what="the turn")
        assert images_of(seen[0][-1]) == [PNG]


def test_voice_and_audio_come_in_as_files_and_show_lists_them(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    model, seen = recording()
    tg = telegram(fake)
    db = tmp_path / "a.db"
    with AgentKit(db, model=model, adapters=[tg]) as kit:
        voice = fake.add_file(b"OggS voice")
        fake.push_media(42, 42, {"voice": {**voice, "mime_type": "audio/ogg", "duration": 2}})
        song = fake.add_file(b"ID3 song")
        audio = {**song, "file_name": "song.mp3", "mime_type": "audio/mpeg"}
        fake.push_media(42, 42, {"audio": audio}, caption="listen")
        assert tg.poll_once() == 2
        kit.work(until_idle=True)
        files = [f for m in kit.history("telegram:42") for f in m.get("files", [])]
        assert [(f["name"], f["mime"]) for f in files] == [
            ("voice.ogg", "audio/ogg"),
            ("song.mp3", "audio/mpeg"),
        ]
        assert seen[1][-1]["content"].startswith("listen\n\n[file song.mp3 (audio/mpeg, 8 bytes)")
    shown = subprocess.run(
        [sys.executable, str(ROOT / "agentkit.py"), "show", "telegram:42", "--db", str(db)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"  [file {files[1]['id']}  song.mp3  audio/mpeg  8 bytes]" in shown.stdout.splitlines()


# ─────────────────────────────────────────── Chromium ───────────────────────────────────────────


def tiny_png() -> bytes:
    """A real 2x2 PNG (a browser decodes it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\x00\xff\x00" * 2)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


# What the web chat page does with a file: upload it, show its preview from the server,
# send it with a message, and read the feed until the reply and the tool's file come.
UPLOAD_AND_SEND = """async (png) => {
  const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
  const up = await fetch("/api/files?name=dot.png", {
    method: "POST", headers: {"Content-Type": "image/png"}, body: new Blob([bytes])});
  const file = await up.json();
  const img = document.createElement("img");
  img.id = "preview";
  img.src = file.url;
  document.body.append(img);
  await img.decode();
  const sent = await fetch("/api/messages", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({text: "draw it", files: [file.id]})});
  let items = [], last = 0;
  while (!items.some(i => i.kind === "reply") || !items.some(i => i.kind === "file")) {
    const got = await (await fetch(`/api/feed?after=${last}`)).json();
    items = items.concat(got.items);
    last = got.last;
  }
  for (const item of items.filter(i => i.kind === "file")) {
    const a = document.createElement("a");
    a.href = item.file.url;
    a.textContent = item.file.name;
    a.className = "download";
    document.body.append(a);
  }
  return {status: up.status, sent: sent.status, width: img.naturalWidth,
          reply: items.find(i => i.kind === "reply").text};
}"""


def test_chromium_uploads_an_image_previews_it_and_downloads_a_tools_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import sync_playwright

    from testkit import CHROMIUM, CHROMIUM_ARGS

    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", TOKEN)
    png = tiny_png()
    model, seen = recording()
    model._steps[:0] = [ToolCall("report", {})]
    kit = AgentKit(tmp_path / "w.db", model=model)

    @kit.tool
    def report() -> File:
        """Write the report."""
        return File("report.html", b"<script>alert(1)</script>")

    with served(kit) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(accept_downloads=True)
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(f"{url}/#token={TOKEN}")
            wait_until(context.cookies, what="the session cookie")
            done = page.evaluate(UPLOAD_AND_SEND, base64.b64encode(png).decode())
            assert done == {"status": 201, "sent": 202, "width": 2, "reply": "seen"}
            assert images_of(seen[0][0]) == [png]  # the user message, before the tool call
            with page.expect_download() as download:
                page.locator("a.download").click()
            assert download.value.suggested_filename == "report.html"
            assert Path(download.value.path()).read_bytes() == b"<script>alert(1)</script>"
            assert page.url == f"{url}/"  # a download, not a page that was opened
            assert not [e for e in errors if "Content Security Policy" in e], errors
        finally:
            browser.close()


def test_a_file_telegram_refuses_for_good_is_answered_and_does_not_block_the_poll(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    tg = telegram(fake)
    with AgentKit(tmp_path / "a.db", model="echo", adapters=[tg]) as kit:
        gone = {"file_id": "FILE9999", "file_unique_id": "U9", "file_size": 10}
        fake.push_media(42, 42, {"document": {**gone, "file_name": "gone.pdf"}})
        later = fake.push_message(42, 42, "still here?")
        assert tg.poll_once() == 2
        assert kit.store.cursor("telegram") == str(later + 1)
        kit.work(until_idle=True)
        assert fake.texts(42) == [
            "Sorry, I could not fetch gone.pdf: telegram getFile: 400 Bad Request: invalid file_id",
            "echo: still here?",
        ]
        assert count(kit, "turns") == 1 and count(kit, "attachments") == 0


def test_a_tool_lists_the_turns_files_and_reads_them(tmp_path: Path) -> None:
    model = ScriptedModel([ToolCall("summarize", {}), "done"])
    with AgentKit(tmp_path / "a.db", model=model) as kit:

        @kit.tool
        def summarize(ctx: ToolContext) -> str:
            """Summarize the files of this message."""
            return "; ".join(f"{f.name}={ctx.open(f.id).decode()}" for f in ctx.files)

        files = [File("a.txt", b"alpha"), File("b.txt", b"beta")]
        assert kit.run_turn("cli:me", "sum up", files=files).reply == "done"
        [_, _, tool, _] = kit.history("cli:me")
        assert tool["content"] == "a.txt=alpha; b.txt=beta"
        with pytest.raises(agentkit.BadInput, match=r"agentkit\.File"):
            ToolContext(
                thread_id="cli:me", turn_id="t", actor="cli:me", call_id=None, root=tmp_path
            ).attach(b"raw bytes")  # type: ignore[arg-type]
