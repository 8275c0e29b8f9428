"""Secret requests: the page in a real browser, interception, saving, redaction, fuzzing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentkit
from agentkit import AgentKit, BadInput, ScriptedModel, ToolCall, ToolContext
from testkit import CHROMIUM, CHROMIUM_ARGS, Database, NewDatabase, count, rows, seal, stored_bytes

ROOT = Path(__file__).resolve().parent
TOKEN = "ghp_" + "S3cr3tV4lue" * 3
ACTOR = "cli:me"


# ───────────────────────────────────────── helpers ─────────────────────────────────────────


def link_params(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).fragment))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def secrets_dir(kit: AgentKit, thread: str = ACTOR) -> Path:
    return agentkit.secrets_folder(kit.secrets.workspace, thread)


def snapshot(kit: AgentKit) -> tuple:
    """What a rejected blob must not change: rows and the secrets folder."""
    tables = ("turns", "messages", "jobs", "threads", "deliveries", "calls")
    saved = sorted(os.listdir(secrets_dir(kit))) if secrets_dir(kit).exists() else []
    states = [
        (request_id, state, key is None)
        for request_id, state, key in rows(kit, "secret_requests", "id", "state", "private_key")
    ]
    return tuple(count(kit, t) for t in tables), saved, states


@pytest.fixture
def kit(db: Path | str, tmp_path: Path) -> Iterator[AgentKit]:
    with AgentKit(db, workspace=tmp_path / "ws") as kit:
        yield kit


def ask(kit: AgentKit, *fields: object, thread: str = ACTOR, actor: str = ACTOR) -> str:
    """Make a request; its link."""
    return kit.request_secret(thread, fields=list(fields), reason="for the demo", actor=actor).url


# ───────────────────────────── the page in a real browser ─────────────────────────────


def run_page(url: str, values: dict[str, str]) -> str:
    """Open the secret page in headless Chromium, fill it, encrypt; the blob it shows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url)
            for name, value in values.items():
                page.fill(f"input[name={name}]", value)
            page.click("#encrypt")
            deadline = time.monotonic() + 10
            while not page.input_value("#blob") and time.monotonic() < deadline:
                page.wait_for_timeout(20)  # the page's CSP forbids wait_for_function's eval
            blob = page.input_value("#blob")
        finally:
            browser.close()
    assert not problems, problems
    assert {r.split("#")[0] for r in requested} == {url.split("#")[0]}, requested
    return blob


def test_chromium_encrypts_on_the_served_page_and_agentkit_saves_it(
    db: Path | str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole flow: the model asks, the page served by `serve` encrypts in Chromium, the
    pasted blob is saved, the model goes on; no trace of the value in the database, its
    WAL or the logs (a tool that returns the value and a model that repeats it included)."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    seen: list[list[dict]] = []

    def model(messages: list[dict], tools: list[dict]) -> object:
        seen.append(messages)
        last = messages[-1]
        if last["role"] == "user" and last["content"].startswith("[agentkit:"):
            return "Thanks, I have them."
        if last["role"] == "user":
            if last["content"] == "deploy":
                fields = ["GITHUB_TOKEN", {"name": "REGION", "label": "Region to deploy to"}]
                return ToolCall("secret_request", {"reason": "to push", "fields": fields})
            return ToolCall("use_token", {})
        if last["role"] == "tool" and last["name"] == "use_token":
            return f"done, the token was {TOKEN}"
        return "I sent you a link."

    kit = AgentKit(
        db,
        model=ScriptedModel([model] * 10),
        workspace=tmp_path / "ws",
        public_url=f"http://127.0.0.1:{port}",
    )

    @kit.tool
    def use_token(ctx: ToolContext) -> str:
        token = ctx.secret("GITHUB_TOKEN")
        logging.getLogger("agentkit").info("using %s in %s", token, ctx.secret("REGION"))
        return f"pushed with {token}"

    stop = threading.Event()
    ready = threading.Event()
    server = threading.Thread(
        target=kit.serve,
        kwargs={"http": f"127.0.0.1:{port}", "stop": stop, "ready": lambda url: ready.set()},
    )
    server.start()
    try:
        assert ready.wait(30)
        asked = kit.run_turn(ACTOR, "deploy")
        assert asked.status == "done" and asked.reply == "I sent you a link."
        url = re.search(r"http://\S+/secret#\S+", asked.note or "")[0]
        blob = run_page(url, {"GITHUB_TOKEN": TOKEN, "REGION": "eu-west-3"})
        assert blob.startswith("agentkit-secret:v1.")
        saved = kit.run_turn(ACTOR, blob)
        assert saved.note == "Saved GITHUB_TOKEN, REGION for this conversation."
        assert saved.reply == "Thanks, I have them."
        used = kit.run_turn(ACTOR, "now push")
    finally:
        stop.set()
        server.join()
    folder = secrets_dir(kit)
    assert (folder / "GITHUB_TOKEN").read_text() == TOKEN
    assert (folder / "REGION").read_text() == "eu-west-3"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "GITHUB_TOKEN").stat().st_mode) == 0o600
    told = [m["content"] for m in seen[2] if m["role"] == "user"][-1]
    assert "GITHUB_TOKEN, REGION" in told and "ctx.secret" in told
    assert all(TOKEN not in json.dumps(messages) for messages in seen[:4])
    assert used.reply == "done, the token was [redacted:GITHUB_TOKEN]"
    results = [m["content"] for m in kit.history(ACTOR) if m["role"] == "tool"]
    assert "pushed with [redacted:GITHUB_TOKEN]" in results
    assert "[redacted:GITHUB_TOKEN] in [redacted:REGION]" in caplog.text
    assert rows(kit, "secret_requests", "state", "private_key") == [("used", None)]
    assert "://" in str(db) or (tmp_path / "agent.db-wal").stat().st_size > 0
    for _ in range(2):  # the live database (and its WAL), then after a checkpoint
        assert TOKEN.encode() not in stored_bytes(db)
        kit.close()
    assert TOKEN not in caplog.text


def test_the_page_works_opened_from_disk(kit: AgentKit, tmp_path: Path) -> None:
    url = ask(kit, "API_KEY")
    page = tmp_path / "secret.html"
    page.write_text(agentkit.secret_page()[0])
    blob = run_page(
        f"file://{page}#{urllib.parse.urlsplit(url).fragment}", {"API_KEY": "k3y-v4lue"}
    )
    assert kit.run_turn(ACTOR, blob).note == "Saved API_KEY for this conversation."
    assert (secrets_dir(kit) / "API_KEY").read_text() == "k3y-v4lue"


# ─────────────────────────────── interception and refusals ───────────────────────────────


def test_a_blob_is_intercepted_before_anything_is_stored(kit: AgentKit) -> None:
    heard: list[str] = []
    kit.on("message_received")(lambda e: heard.append(e.text))
    blob = seal(ask(kit, "TOKEN"), {"TOKEN": TOKEN})
    result = kit.run_turn(ACTOR, blob)
    assert result.status == "done"
    stored = " ".join(rows(kit, "turns", "text"))
    stored += " ".join(str(content) for content in rows(kit, "messages", "content"))
    assert "agentkit-secret:" not in stored and TOKEN not in stored
    assert heard and "TOKEN" in heard[0] and "agentkit-secret" not in heard[0]


@pytest.mark.parametrize("case", ["thread", "actor", "expired", "replayed", "tampered", "fields"])
def test_refused_blobs_get_a_clear_reply_and_change_nothing(kit: AgentKit, case: str) -> None:
    url = ask(kit, "TOKEN")
    blob = seal(url, {"TOKEN": TOKEN})
    thread, actor, when = ACTOR, ACTOR, None
    if case == "thread":
        thread = "cli:other"
    elif case == "actor":
        actor = "cli:someone"
    elif case == "expired":
        when = time.time() + 601
    elif case == "replayed":
        assert kit.run_turn(ACTOR, blob).note.startswith("Saved")
    elif case == "tampered":
        blob = blob[:-6] + ("A" if blob[-6] != "A" else "B") + blob[-5:]
    elif case == "fields":
        blob = seal(url, {"TOKEN": TOKEN}, names=["OTHER"])
    before = snapshot(kit)
    expected = {
        "thread": "another conversation",
        "actor": "asked of someone else",
        "expired": "expired",
        "replayed": "used already",
        "tampered": "damaged or was changed",
        "fields": "damaged or was changed",
    }[case]
    if when:
        real = agentkit.now
        agentkit.now = lambda: when
    try:
        result = kit.run_turn(thread, blob, actor=actor)
    finally:
        if when:
            agentkit.now = real
    assert result.status == "rejected" and result.turn_id is None
    assert expected in result.error and "nothing was saved" in result.error.lower()
    assert snapshot(kit) == before
    if case != "replayed":  # the request stays usable
        fresh = seal(url, {"TOKEN": f"fresh-{case}-value"})
        assert kit.run_turn(ACTOR, fresh).note == "Saved TOKEN for this conversation."


def test_a_blob_with_a_lone_surrogate_is_refused_whole_before_anything_is_written(
    kit: AgentKit,
) -> None:
    url = ask(kit, "FIRST", "SECOND")
    before = snapshot(kit)
    result = kit.run_turn(ACTOR, seal(url, {"FIRST": "a fine value", "SECOND": "bad \ud800"}))
    assert result.status == "rejected" and result.turn_id is None
    assert "SECOND" in result.error and "surrogate" in result.error
    assert "nothing was saved" in result.error.lower()
    assert snapshot(kit) == before
    fresh = seal(url, {"FIRST": "a fine value", "SECOND": "another value"})
    assert kit.run_turn(ACTOR, fresh).note == "Saved FIRST, SECOND for this conversation."


def mutations(blob: str, rng: random.Random) -> Iterator[str]:
    """Random and mutated blobs: flipped, cut, spliced, re-encoded, garbage."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:=+/ é\n\0"
    while True:
        kind = rng.randrange(9)
        chars = list(blob)
        if kind == 0:  # flip one character
            i = rng.randrange(len(chars))
            chars[i] = rng.choice(alphabet.replace(chars[i], ""))
            yield "".join(chars)
        elif kind == 1:  # cut
            yield blob[: rng.randrange(len(blob))]
        elif kind == 2:  # drop or repeat a part
            parts = blob.split(".")
            i = rng.randrange(len(parts))
            parts.insert(i, parts[i]) if rng.random() < 0.5 else parts.pop(i)
            yield ".".join(parts)
        elif kind == 3:  # random garbage after the prefix
            n = rng.randrange(0, 400)
            yield "agentkit-secret:v1." + "".join(rng.choice(alphabet) for _ in range(n))
        elif kind == 4:  # another version or prefix
            yield blob.replace("v1.", rng.choice(["v2.", "v0.", "V1.", "v1..", ""]), 1)
        elif kind == 5:  # a valid-looking id that does not exist
            yield re.sub(r"sec_[0-9a-f]{16}", f"sec_{rng.getrandbits(64):016x}", blob)
        elif kind == 6:  # a random ephemeral key (often not on the curve)
            parts = blob.split(".")
            parts[2] = agentkit.b64url(b"\x04" + rng.randbytes(64))
            yield ".".join(parts)
        elif kind == 7:  # padding, whitespace, or a huge blob
            yield rng.choice([blob + "==", " " + blob + "\n", blob + "A" * 70_000])
        else:  # swap two characters
            i, j = rng.randrange(len(chars)), rng.randrange(len(chars))
            chars[i], chars[j] = chars[j], chars[i]
            candidate = "".join(chars)
            if candidate.strip() != blob:
                yield candidate


def test_a_thousand_random_and_mutated_blobs_are_refused_and_write_nothing(
    kit: AgentKit,
) -> None:
    url = ask(kit, "TOKEN", "USER")
    blob = seal(url, {"TOKEN": TOKEN, "USER": "ops"})
    before = snapshot(kit)
    rng = random.Random(20261121)
    tried = 0
    for candidate in mutations(blob, rng):
        if candidate.strip() == blob or not candidate.lstrip().startswith("agentkit-secret:"):
            continue  # the blob itself, or a cut that is no blob any more (a plain message)
        result = kit.run_turn(ACTOR, candidate)
        assert result.status == "rejected", candidate
        assert result.error and "nothing was saved" in result.error.lower(), result.error
        tried += 1
        if tried == 1000:
            break
    assert snapshot(kit) == before
    assert kit.run_turn(ACTOR, blob).note == "Saved TOKEN, USER for this conversation."


@pytest.mark.sqlite_only("the kit key in a file beside the database")
def test_a_request_made_by_one_process_is_completed_by_a_later_one(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AGENTKIT_SECRET_KEY", None)
    common = f"import agentkit; kit = agentkit.AgentKit({str(tmp_path / 'agent.db')!r})\n"
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            common + "print(kit.request_secret('cli:me', fields=['TOKEN'], reason='ci').url)",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    key_file = tmp_path / "agent.db.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key.encode() not in (tmp_path / "agent.db").read_bytes()
    blob = seal(made.stdout.strip(), {"TOKEN": TOKEN})
    used = subprocess.run(
        [
            sys.executable,
            "-c",
            common + "import sys; print(kit.run_turn('cli:me', sys.argv[1]).note)",
            blob,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert used.stdout.strip() == "Saved TOKEN for this conversation."
    assert (tmp_path / "workspace" / "cli%3Ame" / ".secrets" / "TOKEN").read_text() == TOKEN


def test_a_polling_adapter_stores_a_placeholder_and_replies(kit: AgentKit, db: Database) -> None:
    class Feed(agentkit.PollingAdapter):
        name = "feed"

        def send(self, target: str, outbound: agentkit.Outbound) -> None:
            raise AssertionError("not sent in this test")

    feed = Feed()
    with AgentKit(db, workspace=kit.secrets.workspace, adapters=[feed]) as bot:
        url = bot.request_secret("feed:room", fields=["TOKEN"], reason="x", actor="feed:ann")
        blob = seal(url.url, {"TOKEN": TOKEN})
        items = [
            agentkit.Inbound("room", "bob", blob, id="1"),
            agentkit.Inbound("room", "ann", blob, id="2"),
        ]
        bot.receive_all(feed, items, "2")
        replies = [json.loads(b)["text"] for _, b in sorted(rows(bot, "deliveries", "id", "body"))]
        assert replies[0].startswith("x\nOpen this link to give TOKEN securely")
        assert "asked of someone else" in replies[1] and replies[2].startswith("Saved TOKEN")
        assert bot.store.cursor("feed") == "2"
        texts = rows(bot, "turns", "text")
        assert len(texts) == 1 and "TOKEN" in texts[0] and "agentkit-secret" not in texts[0]
        assert (
            agentkit.secrets_folder(bot.secrets.workspace, "feed:room") / "TOKEN"
        ).read_text() == TOKEN


# ─────────────────────────────── keys, expiry and bad input ───────────────────────────────


def test_expiry_deletes_the_private_key(kit: AgentKit) -> None:
    ask(kit, "TOKEN")
    kit.tick(at=time.time() + 601)
    assert rows(kit, "secret_requests", "state", "private_key") == [("expired", None)]


def test_the_kit_key_comes_from_the_environment_or_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKIT_SECRET_KEY", "short")
    with pytest.raises(BadInput, match="32 characters"):
        agentkit.kit_key(str(tmp_path / "a.db"))
    monkeypatch.setenv("AGENTKIT_SECRET_KEY", "k" * 40)
    assert agentkit.kit_key(str(tmp_path / "a.db")) == agentkit.kit_key(str(tmp_path / "b.db"))
    assert not list(tmp_path.iterdir())
    monkeypatch.delenv("AGENTKIT_SECRET_KEY")
    first = agentkit.kit_key(str(tmp_path / "a.db"))
    assert agentkit.kit_key(str(tmp_path / "a.db")) == first
    (tmp_path / "a.db.key").chmod(0o644)
    with pytest.raises(agentkit.StoreError, match="chmod 600"):
        agentkit.kit_key(str(tmp_path / "a.db"))


def test_bad_requests_are_refused_and_write_nothing(kit: AgentKit) -> None:
    for fields in (
        [],
        ["A"] * 2,
        [f"F{i}" for i in range(9)],
        ["1BAD"],
        ["a-b"],
        [{"name": "X", "label": 5}],
    ):
        with pytest.raises(BadInput):
            kit.request_secret(ACTOR, fields=fields, reason="why")
    with pytest.raises(BadInput):
        kit.request_secret(ACTOR, fields=["OK"], reason="")
    with pytest.raises(BadInput):
        kit.request_secret("nothread", fields=["OK"], reason="why")
    assert count(kit, "secret_requests") == 0
    for url in ("http://example.com", "ftp://127.0.0.1", "https://"):
        with pytest.raises(BadInput, match="public_url"):
            AgentKit(":memory:", public_url=url)
    assert AgentKit(":memory:", public_url="https://bot.example.com/").secrets.public_url == (
        "https://bot.example.com"
    )


def test_the_tool_can_be_turned_off(new_db: NewDatabase) -> None:
    with AgentKit(new_db("a.db"), secret_tool=False) as kit:
        assert "secret_request" not in kit.engine.tools
    with AgentKit(new_db("b.db")) as kit:
        spec = kit.engine.tools["secret_request"].spec()
        assert set(spec["parameters"]["required"]) == {"reason", "fields"}


def test_ctx_secret_refuses_bad_names_and_symlinks(kit: AgentKit, tmp_path: Path) -> None:
    ctx = ToolContext(
        thread_id=ACTOR, turn_id="t", actor=ACTOR, call_id=None, root=kit.secrets.workspace
    )
    with pytest.raises(BadInput):
        ctx.secret("../etc/passwd")
    with pytest.raises(KeyError):
        ctx.secret("MISSING")
    folder = secrets_dir(kit)
    folder.mkdir(parents=True)
    (tmp_path / "elsewhere").write_text("not yours")
    (folder / "LINKED").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        ctx.secret("LINKED")


# ─────────────────────────── redaction of everything that leaves ───────────────────────────


def test_a_saved_secret_never_leaves_a_turn_in_errors_replies_or_the_database(
    db: Path | str, tmp_path: Path
) -> None:
    thread = "web:owner"  # the web chat's deliveries stay in the database
    value = "sk-" + os.urandom(12).hex()
    model = ScriptedModel(["Noted.", ToolCall("leak", {})])
    kit = AgentKit(db, model=model, workspace=tmp_path / "ws")

    @kit.tool
    def leak(ctx: ToolContext) -> str:
        """Return the token (a careless tool)."""
        return ctx.secret("API_TOKEN")

    @kit.on("tool_result")
    def fail(event: agentkit.Event) -> None:
        raise ValueError(event.result)

    @kit.command("token")
    def token(ctx: ToolContext, args: str) -> str:
        """Show the token (a careless command)."""
        return f"the token is {ctx.secret('API_TOKEN')}"

    url = kit.request_secret(thread, fields=["API_TOKEN"], reason="for the test", actor=thread).url
    assert kit.run_turn(thread, seal(url, {"API_TOKEN": value})).note.startswith("Saved")
    failed = kit.run_turn(thread, "use the tool")
    assert failed.status == "failed" and "[redacted:API_TOKEN]" in failed.error
    answered = kit.run_turn(thread, "/token")
    assert answered.reply == "the token is [redacted:API_TOKEN]"
    texts = [d.body["text"] for d in kit.store.deliveries(thread, 0, 200)]
    assert "Sorry, that failed: " in " ".join(texts) and value not in " ".join(texts)
    assert value not in " ".join(str(r) for r in kit.store.rows("events"))
    assert rows(kit, "secrets", "thread_id", "name") == [(thread, "API_TOKEN")]  # sealed
    assert value.encode() not in stored_bytes(db)
    kit.close()
    assert value.encode() not in stored_bytes(db)


# ──────────────────────────────────── across hosts ────────────────────────────────────

OTHER_HOST = """
import hashlib, sys
import agentkit

steps = [agentkit.ToolCall("check", {}), "checked"]
kit = agentkit.AgentKit(sys.argv[1], workspace=sys.argv[2], model=agentkit.ScriptedModel(steps))


@kit.tool
def check(ctx: agentkit.ToolContext) -> str:
    \"\"\"Digest the token as a tool and as a command reading .secrets/TOKEN.\"\"\"
    digest = hashlib.sha256(ctx.secret("TOKEN").encode()).hexdigest()
    read = ctx.runtime.bash("sha256sum < .secrets/TOKEN", timeout=30).output.split()[0]
    return f"{digest} {read}"


with kit:
    result = kit.run_turn("cli:me", "check it")
    print(result.status, kit.history("cli:me")[-2]["content"])
"""


def test_a_secret_saved_by_one_host_is_read_by_a_tool_of_another(
    postgres_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKIT_SECRET_KEY", "shared-kit-key-" + "x" * 32)
    with AgentKit(postgres_db, workspace=tmp_path / "host-a") as kit:
        url = kit.request_secret(ACTOR, fields=["TOKEN"], reason="deploy", actor=ACTOR).url
        assert kit.run_turn(ACTOR, seal(url, {"TOKEN": TOKEN})).note.startswith("Saved")
        [(name, sealed)] = rows(kit, "secrets", "name", "sealed", thread_id=ACTOR)
    assert name == "TOKEN" and TOKEN.encode() not in bytes(sealed)
    other = tmp_path / "host-b"
    done = subprocess.run(
        [sys.executable, "-c", OTHER_HOST, postgres_db, str(other)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert done.stdout.split() == ["done", digest, digest]
    written = agentkit.secrets_folder(other, ACTOR) / "TOKEN"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    schema = urllib.parse.unquote(postgres_db).rpartition("search_path=")[2]
    base = postgres_db.partition("?")[0]
    dump = subprocess.run(["pg_dump", "-n", schema, base], capture_output=True, check=True)
    assert b"CREATE TABLE" in dump.stdout and b"secrets" in dump.stdout
    assert TOKEN.encode() not in dump.stdout


def test_the_database_value_wins_over_a_stale_file_and_a_wrong_key_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an earlier release's file is read as it is until a value is saved in the database
    # (here as another host would); a runtime of the thread then gets the file rewritten
    monkeypatch.setenv("AGENTKIT_SECRET_KEY", "first-kit-key-" + "y" * 32)
    with AgentKit(tmp_path / "agent.db", workspace=tmp_path / "ws") as kit:
        agentkit.write_secret(secrets_dir(kit), "TOKEN", "old-file-value")
        assert kit.secrets.values(ACTOR) == {"TOKEN": "old-file-value"}
        kit.store.save_secrets(ACTOR, {"TOKEN": kit.secrets.seal(ACTOR, "TOKEN", "new-value")})
        assert kit.secrets.values(ACTOR) == {"TOKEN": "new-value"}
        assert agentkit.read_secret(secrets_dir(kit), "TOKEN") == "old-file-value"
        kit.runtimes.get(ACTOR, ACTOR)
        assert agentkit.read_secret(secrets_dir(kit), "TOKEN") == "new-value"
        assert stat.S_IMODE((secrets_dir(kit) / "TOKEN").stat().st_mode) == 0o600
        moved = kit.secrets.seal("cli:elsewhere", "K", "a moved value")
        kit.store.save_secrets("cli:x", {"K": moved})
        with pytest.raises(agentkit.StoreError, match="K of cli:x does not open"):
            kit.secrets.values("cli:x")  # sealed for another thread: refused
    monkeypatch.setenv("AGENTKIT_SECRET_KEY", "other-kit-key-" + "z" * 32)
    kit = AgentKit(tmp_path / "agent.db", workspace=tmp_path / "ws")
    with kit, pytest.raises(agentkit.StoreError, match="same AGENTKIT_SECRET_KEY on every host"):
        kit.secrets.values(ACTOR)


# ──────────────────────────────────── one folder per thread ────────────────────────────────────

LONG = "cli:" + "v" * 196


def context(kit: AgentKit, thread: str) -> ToolContext:
    return ToolContext(
        thread_id=thread, turn_id="t", actor=thread, call_id=None, root=kit.secrets.workspace
    )


def test_a_short_id_that_spells_a_long_ids_folder_name_gets_its_own_folder(
    kit: AgentKit,
) -> None:
    spelled = urllib.parse.unquote(agentkit.workspace_name(LONG))
    agentkit.write_secret(secrets_dir(kit, LONG), "API_TOKEN", TOKEN)
    assert context(kit, LONG).secret("API_TOKEN") == TOKEN
    assert agentkit.workspace_name(spelled) != agentkit.workspace_name(LONG)
    with pytest.raises(KeyError):
        context(kit, spelled).secret("API_TOKEN")


def old_folder(root: Path, thread: str) -> Path:
    """The folder the naming before `+` gave a long thread id."""
    return root / agentkit.workspace_name(thread).replace("+", "-")


def test_old_folders_of_long_ids_move_when_unambiguous_and_stay_with_a_warning_otherwise(
    db: Path | str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = "cli:" + "w" * 196
    root = tmp_path / "ws"
    with AgentKit(db, workspace=root) as kit:
        for thread in (LONG, shared, urllib.parse.unquote(old_folder(root, shared).name)):
            kit.run_turn(thread, "hello")
    for thread in (LONG, shared):
        agentkit.write_secret(old_folder(root, thread) / ".secrets", "API_TOKEN", thread[-8:])
    with (
        caplog.at_level(logging.WARNING, "agentkit"),
        AgentKit(db, workspace=root) as kit,
    ):
        assert context(kit, LONG).secret("API_TOKEN") == LONG[-8:]
        assert not old_folder(root, LONG).exists()
        assert old_folder(root, shared).exists()  # its short twin keeps it, and the log says
        assert "was shared by" in caplog.text and shared in caplog.text


ESCAPED_SECRET = 'pa"ss\\word99\tZ'


def test_secret_returned_inside_a_dict_is_redacted(db: Path | str) -> None:
    model = agentkit.ScriptedModel([agentkit.ToolCall("leak", {}), "done"])
    kit = agentkit.AgentKit(str(db), model=model)
    agentkit.write_secret(
        agentkit.secrets_folder(kit.engine.workspace, "cli:a"), "API_TOKEN", ESCAPED_SECRET
    )

    @kit.tool()
    def leak(ctx: agentkit.ToolContext) -> dict:
        """Return the token in a dict."""
        return {"token": ctx.secret("API_TOKEN")}

    assert kit.run_turn("cli:a", "go").status == "done"
    tool_message = next(m for m in model.calls[1] if m["role"] == "tool")["content"]
    kit.close()
    escaped = '\\"ss\\\\word99'  # how JSON writes the middle of the secret
    assert escaped not in tool_message
    assert escaped.encode() not in stored_bytes(db)
