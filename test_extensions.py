"""Extensions: `setup(kit)` modules loaded by path and by name (API, run, serve, a second
process), `before_turn`, `model_request` chaining, thread entries, the model-provider
registry, and messages sent into a running turn (steer, follow-up), across a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest

import agentkit
from agentkit import AgentKit, BadInput, ToolCall
from test_agentkit import finish, python
from test_examples import TOKEN, agentkit_command, env_for, served
from testkit import count, wait_until

ROOT = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "notes_extension.py"
MARKER = "entry-only-7c1f"  # a value only entries hold: the model must never see it


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


def extension(folder: Path, name: str, body: str) -> Path:
    """Write an extension module `name`.py into `folder`; its path."""
    path = folder / f"{name}.py"
    path.write_text("import agentkit\n\n" + textwrap.dedent(body))
    return path


def cli_run(db: Path, *args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "agentkit.py"), "run", "--db", str(db), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}", **env},
    )


# ─────────────────────────────────── loading extensions ───────────────────────────────────


def test_the_example_extension_by_path_in_run_and_serve_and_by_module_in_another_process(
    tmp_path: Path,
) -> None:
    db = tmp_path / "notes.db"
    kept = cli_run(db, "--ext", str(EXAMPLE), "-m", "notes:a", "remember the milk")
    assert (kept.returncode, kept.stdout.strip()) == (0, "Noted."), kept.stderr
    told = cli_run(db, "--ext", "notes_extension", "-m", "notes:b", "what do you know?")
    assert (told.returncode, told.stdout.strip()) == (0, "I know: the milk"), told.stderr
    with AgentKit(db) as kit:
        me = kit.history(kit.threads()[0][0])[0]
        thread = kit.threads()[0][0]
        assert [(e.kind, e.data) for e in kit.entries(thread)] == [("note", {"text": "the milk"})]
        assert me == {"role": "user", "content": "remember the milk"}
    env = env_for(db, AGENTKIT_WEB_TOKEN=TOKEN, AGENTKIT_MODEL="notes:c")
    command = [*agentkit_command(), "--db", str(db), "--ext", str(EXAMPLE)]
    with (
        served(command, "", env, tmp_path) as bot,
        httpx.Client(base_url=bot.url, timeout=30) as client,
    ):
        headers = {"Origin": bot.url}
        assert client.post("/api/login", json={"token": TOKEN}, headers=headers).is_success
        sent = client.post("/api/messages", json={"text": "remember the bread"}, headers=headers)
        assert sent.status_code == 202, sent.text
        items, last = [], 0
        while not any(i["kind"] == "reply" for i in items):  # a long poll after the first
            feed = client.get("/api/feed", params={"after": last}).json()
            items, last = items + feed["items"], feed["last"]
        assert [i["text"] for i in items if i["kind"] == "reply"] == ["Noted."]
        bot.stop()
    asked = cli_run(db, "--ext", "notes_extension", "--thread", "web:owner", "-m", "notes:d", "?")
    assert asked.stdout.strip() == "I know: the bread", asked.stderr


def test_extensions_load_in_order_once_and_bad_ones_are_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = "def setup(kit):\n    kit.command('{0}')(lambda ctx, args: '{0}')\n"
    first = extension(tmp_path, "first_ext", setup.format("first"))
    extension(tmp_path, "second_ext", setup.format("second"))
    extension(tmp_path, "no_setup", "X = 1\n")
    extension(tmp_path, "broken", "def setup(kit):\n    raise RuntimeError('no key')\n")
    monkeypatch.chdir(tmp_path)  # module names and relative paths start here
    with AgentKit(tmp_path / "a.db", extensions=[str(first), "second_ext", "first_ext.py"]) as kit:
        assert list(kit.engine.commands)[-2:] == ["first", "second"]
        assert kit.extensions == [str(first), "second_ext"]  # first_ext.py: loaded already
        assert kit.run_turn("cli:me", "/second").reply == "second"
    for spec, message in [
        ("no_setup", "extension no_setup has no setup.kit. function"),
        ("missing_ext", "cannot load extension missing_ext: ModuleNotFoundError"),
        (str(tmp_path / "nowhere.py"), "cannot load extension .*nowhere.py: FileNotFound"),
        ("broken", r"extension broken: setup\(kit\) raised RuntimeError: no key"),
    ]:
        with pytest.raises(BadInput, match=message):
            AgentKit(tmp_path / "b.db", extensions=[spec])
    with pytest.raises(BadInput, match="not one string"):
        AgentKit(tmp_path / "b.db", extensions="second_ext")  # type: ignore[arg-type]
    bad = cli_run(tmp_path / "c.db", "--ext", "missing_ext", "hi", cwd=tmp_path)
    assert bad.returncode == 2 and "cannot load extension missing_ext" in bad.stderr


# ──────────────────────────────────────── entries ────────────────────────────────────────


def test_entries_made_in_one_process_are_read_in_another_and_never_reach_the_model(
    tmp_path: Path,
) -> None:
    db = tmp_path / "e.db"
    ext = extension(
        tmp_path,
        "keeper",
        f"""
        def setup(kit):
            @kit.tool
            def keep(ctx: agentkit.ToolContext) -> str:
                ctx.entries.append("secret-ish", {{"value": "{MARKER}"}})
                return "kept"

            @kit.on("turn_end")
            def count_turns(event):
                event.entries.append("turns", {{"ended": event.status}})
        """,
    )
    out = finish(
        python(
            """
            import json, sys, agentkit
            model = agentkit.ScriptedModel([agentkit.ToolCall("keep", {}), "done", "again"])
            kit = agentkit.AgentKit(sys.argv[1], model=model, extensions=[sys.argv[2]])
            assert kit.run_turn("cli:me", "keep it").reply == "done"
            assert kit.run_turn("cli:me", "and?").reply == "again"
            print(json.dumps(model.calls))
            """,
            str(db),
            str(ext),
        )
    )
    assert MARKER not in out and "keep it" in out
    with AgentKit(db) as kit:
        found = kit.entries("cli:me")
        assert [(e.kind, e.data) for e in found] == [
            ("secret-ish", {"value": MARKER}),
            ("turns", {"ended": "done"}),
            ("turns", {"ended": "done"}),
        ]
        assert found[0].at <= found[-1].at and found[0].turn_id != found[-1].turn_id
        assert [e.kind for e in kit.entries("cli:me", "turns", limit=1)] == ["turns"]
        assert MARKER not in json.dumps(kit.history("cli:me"))
        with pytest.raises(BadInput, match="entry kind"):
            kit.entries("cli:me", "bad kind!")


def test_an_entry_of_a_call_whose_process_died_is_never_written(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    AgentKit(db).close()
    victim = python(
        """
        import sys, time, agentkit
        model = agentkit.ScriptedModel([agentkit.ToolCall("slow", {})])
        kit = agentkit.AgentKit(sys.argv[1], model=model, lease=1.0)
        @kit.tool
        def slow(ctx: agentkit.ToolContext) -> str:
            ctx.entries.append("half", {"done": False})
            print("inside", flush=True)
            time.sleep(600)
        kit.run_turn("cli:me", "go")
        """,
        str(db),
    )
    assert victim.stdout.readline().strip() == "inside"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with AgentKit(db) as kit:
        assert kit.entries("cli:me") == []


def test_an_entry_that_is_not_json_fails_the_call_with_a_clear_error(db: Path) -> None:
    model = agentkit.ScriptedModel([ToolCall("bad", {}), "told"])
    with AgentKit(db, model=model) as kit:

        @kit.tool
        def bad(ctx: agentkit.ToolContext) -> str:
            ctx.entries.append("ok", {"kept": False})
            with pytest.raises(BadInput, match="an entry kind is"):
                ctx.entries.append("bad kind!", 1)
            ctx.entries.append("x", object())
            return "never"

        assert kit.run_turn("cli:me", "go").reply == "told"
        assert "not JSON-serialisable" in model.calls[1][-1]["content"]
        # what it appended before, it keeps with its (error) result
        assert [(e.kind, e.data) for e in kit.entries("cli:me")] == [("ok", {"kept": False})]


# ───────────────────────────────── before_turn and model_request ─────────────────────────────────


def test_before_turn_hooks_chain_instructions_and_a_stored_message_once_per_message(
    db: Path,
) -> None:
    seen: list[str] = []

    def answer(messages: list, tools: list) -> str:
        return "ok"

    model = agentkit.ScriptedModel([ToolCall("noop", {}), answer, "second"])
    original = model.complete

    def complete(instructions: str, messages: list, tools: list, **kw: object):
        seen.append(instructions)
        return original(instructions, messages, tools, **kw)

    model.complete = complete  # type: ignore[method-assign]
    with AgentKit(db, model=model, instructions="Base.") as kit:
        calls = []
        kit.tool(lambda: "nothing", name="noop")

        @kit.on("before_turn")
        def first(event: agentkit.Event) -> dict:
            calls.append(event.text)
            return {"instructions": "Be brief.", "message": "(the user is on a phone)"}

        @kit.on("before_turn")
        def second(event: agentkit.Event) -> dict:
            return {"instructions": "Answer in French."}

        kit.on("before_turn")(lambda event: None)
        assert kit.run_turn("cli:me", "hi").reply == "ok"
        assert calls == ["hi"]  # once per message, not per step
        assert seen == ["Base.\n\nBe brief.\n\nAnswer in French."] * 2
        assert model.calls[0][:2] == [
            {"role": "user", "content": "hi"},
            {"role": "user", "content": "(the user is on a phone)", "origin": "extension"},
        ]
        assert kit.history("cli:me")[1]["origin"] == "extension"
        assert kit.run_turn("cli:me", "/help").status == "done" and calls == ["hi"]
        kit.on("before_turn")(lambda event: {"instruction": "typo"})
        failed = kit.run_turn("cli:me", "again")
        assert failed.status == "failed" and "before_turn hook returned" in failed.error
        assert 'dict with "instructions" and/or "message"' in failed.error


def test_model_request_hooks_get_a_deep_copy_and_chain(db: Path) -> None:
    model = agentkit.ScriptedModel(["ok"])
    with AgentKit(db, model=model) as kit:

        @kit.on("model_request")
        def mutate_only(event: agentkit.Event) -> None:
            event.messages[0]["content"] = "changed in place"

        @kit.on("model_request")
        def add(event: agentkit.Event) -> list:
            assert event.messages[0]["content"] == "hi"  # the copy before it was not kept
            return [*event.messages, {"role": "user", "content": "(first)"}]

        @kit.on("model_request")
        def add_more(event: agentkit.Event) -> list:
            return [*event.messages, {"role": "user", "content": "(second)"}]

        kit.run_turn("cli:me", "hi")
    assert [m["content"] for m in model.calls[0]] == ["hi", "(first)", "(second)"]


# ───────────────────────────────────── model providers ─────────────────────────────────────


def test_registered_model_prefixes_resolve_lazily_everywhere_a_spec_is_taken(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ext = extension(
        tmp_path,
        "proxy",
        """
        made = []
        def setup(kit):
            def factory(name):
                made.append(name)
                model = agentkit.EchoModel()
                model.name = f"myproxy:{name}"
                return model
            kit.register_model("myproxy", factory)
        """,
    )
    with AgentKit(db, model="myproxy:big-1", extensions=[str(ext)]) as kit:
        assert kit.engine.model.name == "myproxy:big-1"
        assert kit.run_turn("cli:me", "hi").reply == "echo: hi"
        assert kit.models.make("echo").name == "echo"
        with pytest.raises(BadInput, match=r"'echo', 'openai:<model>', .*'myproxy:<model>'"):
            kit.models.make("other:x")
        for prefix in ("My Proxy", "", "9x"):
            with pytest.raises(BadInput, match="a model prefix is"):
                kit.register_model(prefix, agentkit.EchoModel)
        kit.register_model("nothing", lambda name: 42)
        with pytest.raises(BadInput, match="which is not a Model"):
            kit.models.make("nothing:x")
    with pytest.raises(BadInput, match="unknown model 'myproxy:x'"):
        agentkit.model_from_spec("myproxy:x")  # the built-in registry is not changed
    monkeypatch.setenv("AGENTKIT_MODEL", "myproxy:from-env")
    with AgentKit(db, extensions=[str(ext)]) as kit:
        assert kit.engine.model.name == "myproxy:from-env"
    module = sys.modules[agentkit.load_extension(str(ext)).__name__]
    assert module.made == ["big-1", "from-env"]  # made when a spec named it, once each
    run = cli_run(db, "--ext", str(ext), "-m", "myproxy:cli", "yo", AGENTKIT_MODEL="")
    assert (run.returncode, run.stdout.strip()) == (0, "echo: yo"), run.stderr


# ───────────────────────────────── messages into a running turn ─────────────────────────────────


class Gate:
    """A tool that records its calls and holds the first until released."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.inside = threading.Event()
        self.release = threading.Event()

    def work(self, label: str) -> str:
        self.ran.append(label)
        if len(self.ran) == 1:
            self.inside.set()
            assert self.release.wait(30)
        return f"did {label}"


def running_turn(
    kit: AgentKit, text: str, thread_id: str = "cli:me"
) -> tuple[threading.Thread, list]:
    """A turn run by `run_turn` in a thread; the thread, and the list its result goes in."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(kit.run_turn(thread_id, text)))
    thread.start()
    return thread, results


def test_steer_skips_the_calls_not_yet_started_and_joins_the_turn(db: Path) -> None:
    gate = Gate()
    calls = [ToolCall("work", {"label": x}) for x in "abc"]
    model = agentkit.ScriptedModel([calls, "changed course"])
    with AgentKit(db, model=model, parallel_tools=False) as kit:
        kit.tool(gate.work)
        worker, results = running_turn(kit, "do three things")
        assert gate.inside.wait(30)
        joined = kit.send("cli:me", "stop, do something else", deliver="steer")
        gate.release.set()
        worker.join(30)
        [result] = results
        assert joined == result.turn_id
        assert (result.status, result.reply) == ("done", "changed course")
        assert gate.ran == ["a"]
        tail = model.calls[1][-4:]
        assert [m.get("content") for m in tail] == [
            "did a",
            agentkit.STEERED,
            agentkit.STEERED,
            "stop, do something else",
        ]
        assert tail[1]["is_error"] and tail[3]["origin"] == "steer"
        assert count(kit, "turns") == 1


def test_follow_up_extends_the_same_turn_and_next_turn_waits(db: Path) -> None:
    gate = Gate()
    model = agentkit.ScriptedModel(
        [ToolCall("work", {"label": "a"}), "first answer", "second answer", "third"]
    )
    with AgentKit(db, model=model) as kit:
        kit.tool(gate.work)
        worker, results = running_turn(kit, "start", "web:owner")
        assert gate.inside.wait(30)
        joined = kit.send("web:owner", "also this", deliver="follow_up")
        later = kit.send("web:owner", "a new turn", deliver="next_turn")
        gate.release.set()
        worker.join(30)
        [result] = results
        assert (result.turn_id, result.reply) == (joined, "second answer")
        assert model.calls[2][-1] == {"role": "user", "content": "also this", "origin": "follow_up"}
        assert later != joined
        wait_until(lambda: kit.work(until_idle=True) or kit.turn(later).status == "done")
        assert kit.turn(later).reply == "third"
        shown = [(d.kind, d.body["text"]) for d in kit.store.deliveries("web:owner", 0, 50)]
        assert shown == [
            ("user", "start"),
            ("user", "also this"),
            ("user", "a new turn"),
            ("reply", "first answer"),  # the answer before the follow-up is sent too
            ("reply", "second answer"),
            ("reply", "third"),
        ]
        idle = kit.send("cli:idle", "nobody is busy", deliver="steer")  # starts a turn
        assert (kit.store.turn(idle).text, kit.store.turn(idle).status) == (
            "nobody is busy",
            "queued",
        )
        with pytest.raises(BadInput, match="deliver must be one of"):
            kit.send("web:owner", "x", deliver="later")


def test_while_busy_makes_a_message_during_a_turn_a_follow_up(db: Path) -> None:
    gate = Gate()
    model = agentkit.ScriptedModel([ToolCall("work", {"label": "a"}), "one", "two"])
    with AgentKit(db, model=model, while_busy="follow_up") as kit:
        kit.tool(gate.work)
        worker, results = running_turn(kit, "start")
        assert gate.inside.wait(30)
        queued = kit.run_turn("cli:me", "more", wait=False, source_id="m2")
        again = kit.run_turn("cli:me", "more", wait=False, source_id="m2")
        gate.release.set()
        worker.join(30)
        assert queued.turn_id == again.turn_id == results[0].turn_id
        assert results[0].reply == "two" and count(kit, "turns") == 1
    with pytest.raises(BadInput, match="while_busy must be one of"):
        AgentKit(db, while_busy="soon")


def test_messages_queued_into_a_turn_that_fails_become_turns_of_their_own(db: Path) -> None:
    gate = Gate()
    model = agentkit.ScriptedModel([ToolCall("work", {"label": "a"})])  # then out of steps
    with AgentKit(db, model=model) as kit:
        kit.tool(gate.work)
        worker, results = running_turn(kit, "start")
        assert gate.inside.wait(30)
        kit.send("cli:me", "after it", deliver="follow_up")
        gate.release.set()
        worker.join(30)
        assert results[0].status == "failed"
        model._steps.append("handled")
        kit.work(until_idle=True)
        [_, second] = sorted(kit.store.rows("turns"), key=lambda t: t["created_at"])
        assert (second["text"], second["status"], second["reply"]) == (
            "after it",
            "done",
            "handled",
        )


def test_steer_and_follow_up_survive_a_sigkill_of_the_worker(db: Path) -> None:
    AgentKit(db).close()
    victim = python(
        """
        import sys, time, agentkit
        calls = [agentkit.ToolCall("work", {"label": x}) for x in "abc"]
        model = agentkit.ScriptedModel([calls])
        kit = agentkit.AgentKit(sys.argv[1], model=model, lease=1.0, parallel_tools=False)
        @kit.tool
        def work(label: str) -> str:
            print("inside", flush=True)
            time.sleep(600)
        kit.run_turn("cli:me", "three things")
        """,
        str(db),
    )
    assert victim.stdout.readline().strip() == "inside"
    with AgentKit(db) as kit:  # another process sends while the worker runs the first call
        steered = kit.send("cli:me", "change of plan", deliver="steer")
        followed = kit.send("cli:me", "one more thing", deliver="follow_up")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    ran = []
    model = agentkit.ScriptedModel(["adjusted", "one more done"])
    with AgentKit(db, model=model, parallel_tools=False) as kit:
        kit.tool(lambda label: ran.append(label) or "ok", name="work")
        wait_until(lambda: kit.work(until_idle=True), what="the lease to run out")
        result = kit.turn(steered)
        assert followed == steered == result.turn_id and count(kit, "turns") == 1
        assert (result.status, result.reply) == ("done", "one more done")
    assert ran == []  # b and c were skipped; a was interrupted, never run twice
    first = model.calls[0]
    assert [m.get("content") for m in first[-4:]] == [
        agentkit.INTERRUPTED,
        agentkit.STEERED,
        agentkit.STEERED,
        "change of plan",
    ]
    assert model.calls[1][-1]["content"] == "one more thing"
