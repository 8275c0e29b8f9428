"""Runtime providers and the workspace tools: paths never leave the scope's root, secrets
stay out, commands run with limits and die with everything they started, for both the
local runtime and bubblewrap (Debian's, installed by .ci/run)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import agentkit
from agentkit import AgentKit, ToolCall, ToolContext
from testkit import Database, created, wait_until

PROVIDERS = ["local", "bwrap"]
SMALL = agentkit.RuntimeLimits(cpu_seconds=20, file_bytes=1 << 20, processes=48)


def provider_named(name: str, **options: object) -> agentkit.LocalProvider:
    return (
        agentkit.LocalProvider(**options) if name == "local" else agentkit.BwrapProvider(**options)
    )


@pytest.fixture(params=PROVIDERS)
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[agentkit.LocalRuntime]:
    provider = provider_named(request.param, limits=SMALL)
    made = provider.get(agentkit.RuntimeScope("thread", "cli:me", tmp_path / "root"))
    yield made
    provider.stop()


def root_of(runtime: agentkit.LocalRuntime) -> Path:
    return runtime.scope.root


def processes_with(marker: str) -> list[int]:
    """The live processes whose command line contains `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(pid))
    return found


def agentkit_cgroups() -> list[Path]:
    """The cgroups this process made for commands and did not remove."""
    return [p for p in Path("/sys/fs/cgroup").glob(f"**/agentkit-{os.getpid()}-*") if p.is_dir()]


# ─────────────────────────────── paths stay inside the root ───────────────────────────────


def test_grep_and_find_stop_at_a_depth_and_say_so(runtime: agentkit.LocalRuntime) -> None:
    # os.fwalk recurses once per level: a 1,000-deep tree ended in RecursionError.
    deep, near = "/".join(["d"] * 1000), "/".join(["d"] * 50)
    runtime.write(f"{near}/near.txt", "needle\n")
    runtime.write(f"{deep}/far.txt", "needle\n")
    cut = "/".join(["d"] * agentkit.WALK_DEPTH) + "/"
    note = f"[not searched, over {agentkit.WALK_DEPTH} folders deep: {cut}]"
    try:
        assert runtime.grep("needle", ".") == [f"{near}/near.txt:1: needle", note]
        assert runtime.find("*.txt") == [f"{near}/near.txt", note]
        assert runtime.find("far.txt", "/".join(["d"] * 950)) == [f"{deep}/far.txt"]
    finally:
        for level in range(900, 0, -100):  # shutil.rmtree recurses too: cut the tree for it
            os.rename(Path(root_of(runtime), *["d"] * level), root_of(runtime) / f"cut{level}")


def test_files_are_written_read_listed_and_searched(runtime: agentkit.LocalRuntime) -> None:
    runtime.write("src/app.py", "import os\nprint('hi')\n")
    runtime.write("notes.txt", "one\ntwo\nthree\n")
    assert runtime.ls(".") == ["notes.txt", "src/"]
    assert runtime.read("notes.txt", offset=1, limit=1) == "two\n"
    assert runtime.read(f"{runtime.root}/notes.txt") == "one\ntwo\nthree\n"
    assert runtime.grep("print", ".") == ["src/app.py:2: print('hi')"]
    assert runtime.grep("o", ".", glob="*.txt") == ["notes.txt:1: one", "notes.txt:2: two"]
    assert runtime.find("*.py") == ["src/app.py"]
    assert runtime.find("src") == ["src/"]
    runtime.write("src/lib/util.py", "print('lib')\n")
    assert runtime.find("*.py", "src/lib") == ["src/lib/util.py"]  # was "lib/util.py"
    assert runtime.grep("lib", "src/lib") == ["src/lib/util.py:1: print('lib')"]


@pytest.mark.parametrize("path", ["../escape.txt", "src/../../escape.txt", "/etc/passwd", "/tmp"])
def test_paths_outside_the_root_are_refused(runtime: agentkit.LocalRuntime, path: str) -> None:
    runtime.write("src/a.txt", "a")
    for operation in (
        lambda: runtime.read(path),
        lambda: runtime.write(path, "x"),
        lambda: runtime.ls(path),
        lambda: runtime.grep("x", path),
        lambda: runtime.find("*", path),
        lambda: runtime.bash("true", timeout=10, cwd=path),
    ):
        with pytest.raises(agentkit.BadInput, match="outside the workspace"):
            operation()
    assert not (root_of(runtime).parent / "escape.txt").exists()


def test_a_symlink_to_etc_is_refused(runtime: agentkit.LocalRuntime) -> None:
    root = root_of(runtime)
    (root / "etc").symlink_to("/etc")
    (root / "up").symlink_to("..")
    (root / "passwd").symlink_to("/etc/passwd")
    for path in ("etc/passwd", "up/escape.txt", "passwd"):
        with pytest.raises(agentkit.BadInput, match="outside the workspace"):
            runtime.read(path)
        with pytest.raises(agentkit.BadInput, match="outside the workspace"):
            runtime.write(path, "x")
    with pytest.raises(agentkit.BadInput, match="outside the workspace"):
        runtime.ls("etc")
    assert not (root.parent / "escape.txt").exists()
    assert "root:" in Path("/etc/passwd").read_text()  # untouched
    # grep and find do not follow symlinks either
    assert runtime.grep("root", ".") == []
    assert runtime.find("passwd") == ["passwd"]


def test_a_symlink_that_stays_inside_is_followed(runtime: agentkit.LocalRuntime) -> None:
    runtime.write("real/file.txt", "inside")
    (root_of(runtime) / "alias").symlink_to("real")
    (root_of(runtime) / "loop").symlink_to("loop")
    assert runtime.read("alias/file.txt") == "inside"
    assert runtime.ls("alias") == ["file.txt"]
    with pytest.raises(agentkit.BadInput, match="more than 40 symlinks"):
        runtime.read("loop")


def test_a_symlink_swapped_in_after_the_check_is_not_followed(
    runtime: agentkit.LocalRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = root_of(runtime)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("outside")
    resolve = agentkit._resolve

    def swapping(swap: Callable[[], None]) -> Callable[..., agentkit._Resolved]:
        def resolve_then_swap(*args: object, **options: object) -> agentkit._Resolved:
            resolved = resolve(*args, **options)  # the check passed: now the attacker moves
            swap()
            return resolved

        return resolve_then_swap

    def swap_the_file() -> None:
        (root / "dir" / "target.txt").unlink()
        (root / "dir" / "target.txt").symlink_to(outside / "target.txt")

    runtime.write("dir/target.txt", "inside")
    monkeypatch.setattr(agentkit, "_resolve", swapping(swap_the_file))
    with pytest.raises(agentkit.BadInput, match="symlink"):
        runtime.read("dir/target.txt")

    def swap_the_folder_and_the_file() -> None:
        (root / "box").rename(root / "moved")
        (root / "box").symlink_to(outside)
        (root / "moved" / "target.txt").unlink()
        (root / "moved" / "target.txt").symlink_to(outside / "target.txt")

    monkeypatch.setattr(agentkit, "_resolve", resolve)
    runtime.write("box/target.txt", "inside")
    monkeypatch.setattr(agentkit, "_resolve", swapping(swap_the_folder_and_the_file))
    runtime.write("box/target.txt", "written")
    # the write went to the folder that was checked (now "moved"), replacing the symlink
    assert (outside / "target.txt").read_text() == "outside"
    assert sorted(os.listdir(outside)) == ["target.txt"]
    assert not (root / "moved" / "target.txt").is_symlink()
    assert (root / "moved" / "target.txt").read_text() == "written"


def test_hard_links_are_refused(runtime: agentkit.LocalRuntime, tmp_path: Path) -> None:
    root = root_of(runtime)
    outside = tmp_path / "outside.txt"
    outside.write_text("outside secret")
    os.link(outside, root / "linked.txt")
    agentkit.write_secret(root / ".secrets", "TOKEN", "token-value-1")
    os.link(root / ".secrets" / "TOKEN", root / "token.txt")
    for path in ("linked.txt", "token.txt"):
        with pytest.raises(agentkit.BadInput, match="hard link"):
            runtime.read(path)
        with pytest.raises(agentkit.BadInput, match="hard link"):
            runtime.edit(path, [("outside", "changed")])
    assert runtime.grep("secret|token-value", ".") == []
    runtime.write("linked.txt", "replaced")  # a new file in its place, never written through
    assert outside.read_text() == "outside secret"
    assert runtime.read("linked.txt") == "replaced"


def test_the_secrets_folder_is_invisible(runtime: agentkit.LocalRuntime) -> None:
    root = root_of(runtime)
    agentkit.write_secret(root / ".secrets", "TOKEN", "token-value-2")
    (root / "s").symlink_to(".secrets")
    for path in (".secrets/TOKEN", "./.secrets/TOKEN", "x/../.secrets/TOKEN", "s/TOKEN"):
        with pytest.raises(agentkit.BadInput, match=r"\.secrets"):
            runtime.read(path)
        with pytest.raises(agentkit.BadInput, match=r"\.secrets"):
            runtime.write(path, "overwritten")
    assert runtime.ls(".") == ["s"]
    assert runtime.grep("token-value", ".") == []
    assert runtime.find("*TOKEN*") == []
    assert agentkit.read_secret(root / ".secrets", "TOKEN") == "token-value-2"


def test_bwrap_commands_cannot_see_the_secrets(tmp_path: Path) -> None:
    provider = agentkit.BwrapProvider(limits=SMALL)
    root = tmp_path / "root"
    agentkit.write_secret(root / ".secrets", "TOKEN", "token-value-3")
    runtime = provider.get(agentkit.RuntimeScope("thread", "cli:me", root))
    result = runtime.bash(
        "ls -a .secrets; cat .secrets/TOKEN; grep -rs token-value /workspace /tmp /etc /root; "
        "find / -xdev -name TOKEN 2>/dev/null; echo end",
        timeout=30,
    )
    assert result.output == ".\n..\ncat: .secrets/TOKEN: No such file or directory\nend\n"
    provider.stop()


def test_edit_changes_nothing_unless_every_match_is_unique(runtime: agentkit.LocalRuntime) -> None:
    runtime.write("f.txt", "alpha\nbeta\nbeta\ngamma\n")
    for edits, problem in [
        ([("beta", "B")], "occurs 2 times"),
        ([("delta", "D")], "does not occur"),
        ([("alpha", "A"), ("delta", "D")], "edit 2"),
        ([("", "x")], "does not occur"),
    ]:
        with pytest.raises(agentkit.BadInput, match=problem):
            runtime.edit("f.txt", edits)
        assert runtime.read("f.txt") == "alpha\nbeta\nbeta\ngamma\n"
    runtime.edit("f.txt", [("alpha\nbeta", "A\nbeta"), ("gamma", "G")])
    assert runtime.read("f.txt") == "A\nbeta\nbeta\nG\n"


def test_an_edited_script_stays_executable_and_huge_files_are_refused(
    runtime: agentkit.LocalRuntime,
) -> None:
    runtime.write("run.sh", "echo one\n")
    (root_of(runtime) / "run.sh").chmod(0o755)
    runtime.edit("run.sh", [("one", "two")])
    assert (root_of(runtime) / "run.sh").stat().st_mode & 0o777 == 0o755
    assert runtime.bash("./run.sh", timeout=30).output == "two\n"
    with open(root_of(runtime) / "huge.bin", "wb") as f:
        f.truncate(agentkit.READ_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(agentkit.BadInput, match="over 64 MiB"):
        runtime.read("huge.bin")


# ───────────────────────────────────────── commands ─────────────────────────────────────────


def test_commands_get_a_scrubbed_environment(
    runtime: agentkit.LocalRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKIT_WEB_TOKEN", "web-token-value")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-api-key-value")
    monkeypatch.setenv("SOME_TOKEN", "some-token-value")
    result = runtime.bash("env", timeout=30)
    assert result.exit_code == 0 and f"HOME={runtime.root}" in result.output
    for value in ("web-token-value", "sk-api-key-value", "some-token-value", "AGENTKIT"):
        assert value not in result.output


def test_bad_commands_and_variables_are_refused(runtime: agentkit.LocalRuntime) -> None:
    for command, options, problem in [
        ("", {}, "bash needs a command"),
        ("true", {"timeout": 0}, "timeout must be"),
        ("true", {"env": {"A B": "x"}}, "plain identifier"),
        ("true", {"env": {"A": 1}}, "must be a string"),
        ("true", {"cwd": "missing"}, "missing"),
    ]:
        with pytest.raises(agentkit.BadInput, match=problem):
            runtime.bash(command, **{"timeout": 10, **options})


def test_values_passed_in_env_are_redacted(runtime: agentkit.LocalRuntime) -> None:
    seen: list[str] = []
    result = runtime.bash(
        'echo "token=$TOKEN"; printf "%s" "$TOKEN" | wc -c',
        timeout=30,
        env={"TOKEN": "passed-secret-9"},
        on_output=seen.append,
    )
    assert result.output == "token=[redacted:TOKEN]\n15\n"
    assert "".join(seen) == result.output


def test_bwrap_has_no_network(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    probe = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
    scope = agentkit.RuntimeScope("thread", "cli:me", tmp_path / "root")
    sealed = agentkit.BwrapProvider(limits=SMALL)
    result = sealed.get(scope).bash(probe, timeout=30)
    assert result.exit_code != 0 and "connected" not in result.output
    assert not accepted
    sealed.stop()
    # the same probe reaches the server when the network is allowed
    open_provider = agentkit.BwrapProvider(network=True, limits=SMALL)
    assert open_provider.get(scope).bash(probe, timeout=30).output == "connected\n"
    wait_until(lambda: accepted, what="the connection")
    open_provider.stop()
    server.close()


def test_a_timed_out_command_dies_with_all_it_started(runtime: agentkit.LocalRuntime) -> None:
    marker = f"1000.{os.getpid()}{id(runtime)}"
    result = runtime.bash(
        f"sleep {marker} & setsid sleep {marker}1 & echo started; sleep 60", timeout=1
    )
    assert result.timed_out and result.exit_code is None
    assert result.output.startswith("started\n") and "timed out after 1 s" in result.output
    assert processes_with(marker) == []
    assert agentkit_cgroups() == []
    assert runtime.bash("echo still working", timeout=30).output == "still working\n"


def test_commands_left_by_a_crashed_process_are_killed(runtime: agentkit.LocalRuntime) -> None:
    [parent] = [p for p in agentkit._pids_cgroup_parents() if os.access(p, os.W_OK)][:1]
    orphan = parent / "agentkit-999999999-0badcafe"  # above pid_max: a process that is gone
    orphan.mkdir()
    marker = f"1003.{os.getpid()}{id(runtime)}"
    left = subprocess.Popen(
        ["bash", "-c", f"echo $$ > {orphan}/cgroup.procs && exec sleep {marker}"],
        start_new_session=True,
    )
    wait_until(lambda: processes_with(marker), what="the orphan")
    assert runtime.bash("echo next", timeout=30).output == "next\n"
    assert not orphan.exists() and processes_with(marker) == []
    left.wait()


def test_background_processes_end_with_their_command(runtime: agentkit.LocalRuntime) -> None:
    marker = f"1001.{os.getpid()}{id(runtime)}"
    result = runtime.bash(f"sleep {marker} & echo $!", timeout=30)
    assert result.exit_code == 0 and not result.timed_out
    assert processes_with(marker) == []


def test_a_fork_bomb_is_stopped_by_the_process_limit(runtime: agentkit.LocalRuntime) -> None:
    # as root RLIMIT_NPROC is ignored: this holds through the pids cgroup agentkit makes
    result = runtime.bash("bomb() { bomb | bomb & }; bomb; sleep 3", timeout=10)
    assert "Resource temporarily unavailable" in result.output
    assert agentkit_cgroups() == []
    assert runtime.bash("echo still working", timeout=30).output == "still working\n"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_process_limit_holds_for_root(tmp_path: Path, provider: str) -> None:
    spawn = "for i in $(seq 60); do sleep 30 & done; echo spawned"
    scope = agentkit.RuntimeScope("thread", "cli:me", tmp_path / "root")
    for processes, refused in [(200, False), (40, True)]:
        limits = agentkit.RuntimeLimits(processes=processes)
        chosen = provider_named(provider, limits=limits)
        result = chosen.get(scope).bash(spawn, timeout=3)
        assert ("Resource temporarily unavailable" in result.output) is refused
        assert result.output.endswith("spawned\n") is not refused
        chosen.stop()


NOBODY = 65534
AS_NOBODY = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import agentkit
provider = getattr(agentkit, sys.argv[2])(limits=agentkit.RuntimeLimits(processes=int(sys.argv[3])))
runtime = provider.get(agentkit.RuntimeScope("thread", "cli:me", Path(sys.argv[4])))
print(runtime.bash("id -u; " + sys.argv[5], timeout=3).output)
provider.stop()
"""


@pytest.mark.parametrize("provider", ["LocalProvider", "BwrapProvider"])
def test_a_user_without_a_cgroup_gets_rlimit_nproc(provider: str) -> None:
    # a user that may not make cgroups falls back to RLIMIT_NPROC, which holds for them
    with tempfile.TemporaryDirectory(prefix="agentkit-nobody-") as name:
        folder = Path(name)
        os.chown(folder, NOBODY, NOBODY)
        spawn_as_nobody(folder, provider)


def spawn_as_nobody(folder: Path, provider: str) -> None:
    spawn = "for i in $(seq 60); do sleep 30 & done; echo spawned"
    for processes, refused in [(200, False), (40, True)]:
        # RLIMIT_NPROC counts all of the user's processes: start from none
        wait_until(lambda: agentkit._tasks_of(NOBODY) == 0, what="nobody's processes to end")
        here = str(Path(agentkit.__file__).parent)
        done = subprocess.run(
            [
                *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
                *(sys.executable, "-c", AS_NOBODY, here, provider, str(processes)),
                *(str(folder / "root"), spawn),
            ],
            capture_output=True,
            text=True,
            cwd=folder,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{NOBODY}\n")
        assert ("Resource temporarily unavailable" in done.stdout) is refused
        assert ("spawned" in done.stdout) is not refused


def test_a_huge_write_is_stopped_by_the_file_size_limit(runtime: agentkit.LocalRuntime) -> None:
    result = runtime.bash("head -c 10G /dev/zero > big; echo status $?", timeout=60)
    assert result.output.endswith("status 153\n")  # 128 + SIGXFSZ
    assert (root_of(runtime) / "big").stat().st_size == 1 << 20
    assert runtime.bash("rm big; echo still working", timeout=30).output == "still working\n"


def test_long_output_is_cut_and_saved_whole(runtime: agentkit.LocalRuntime) -> None:
    result = runtime.bash("seq 1 100000", timeout=60)
    assert result.truncated and result.full_output_path
    assert result.output.splitlines() == [str(n) for n in range(98001, 100001)]
    assert result.full_output_path.startswith(".agentkit/output/bash-")
    saved = runtime.read(result.full_output_path)
    assert saved.splitlines() == [str(n) for n in range(1, 100001)]
    wide = runtime.bash("head -c 200000 /dev/zero | tr '\\0' a", timeout=60)
    assert wide.truncated and len(wide.output) == agentkit.OUTPUT_BYTES
    assert len(runtime.read(wide.full_output_path or "")) == 200000


def test_saved_outputs_keep_the_newest_only(
    runtime: agentkit.LocalRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every cut output was kept forever: a busy thread's workspace only grew.
    monkeypatch.setattr(agentkit, "OUTPUT_KEPT", 3)
    runtime.write(".agentkit/output/notes.txt", "mine\n")
    long = "x\n" * (agentkit.OUTPUT_LINES + 1)
    paths = [agentkit.cap_output(runtime, long, label="grep")[1] for _ in range(5)]
    kept = [p.split("/")[-1] for p in paths[2:] if p]
    assert runtime.ls(".agentkit/output") == sorted([*kept, "notes.txt"])


def test_remove_deletes_a_file_and_nothing_else(runtime: agentkit.LocalRuntime) -> None:
    runtime.write("keep/target.txt", "kept\n")
    runtime.write("gone.txt", "gone\n")
    runtime.remove("gone.txt")
    refusals = [("keep", "is a folder"), ("gone.txt", "No such"), (".secrets/x", "not readable")]
    for path, error in refusals:
        with pytest.raises(agentkit.BadInput, match=error):
            runtime.remove(path)
    assert runtime.ls(".") == ["keep/"] and runtime.ls("keep") == ["target.txt"]


def test_a_stopped_runtime_refuses_to_run(runtime: agentkit.LocalRuntime) -> None:
    runtime.stop()
    with pytest.raises(agentkit.RuntimeUnavailable, match="stopped"):
        runtime.bash("true", timeout=10)
    with pytest.raises(agentkit.RuntimeUnavailable, match="stopped"):
        runtime.read("x")


def test_missing_bwrap_says_how_to_install_it() -> None:
    with pytest.raises(agentkit.RuntimeUnavailable, match="apt-get install bubblewrap"):
        agentkit.BwrapProvider(executable="/nonexistent/bwrap")


# ───────────────────────────────────── the kit's runtimes ─────────────────────────────────────


def scripted(db: Database, steps: list, **options: object) -> AgentKit:
    return AgentKit(db, model=agentkit.ScriptedModel(steps), **options)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_scripted_model_uses_the_workspace_tools(
    tmp_path: Path, db: Database, provider: str
) -> None:
    steps = [
        ToolCall("write", {"path": "notes/todo.txt", "text": "buy milk\ncall bob\n"}),
        [ToolCall("read", {"path": "notes/todo.txt"}), ToolCall("ls", {"path": "notes"})],
        ToolCall("edit", {"path": "notes/todo.txt", "edits": [{"old": "bob", "new": "alice"}]}),
        [ToolCall("grep", {"pattern": "alice"}), ToolCall("find", {"glob": "*.txt"})],
        ToolCall("bash", {"command": "wc -l < notes/todo.txt; cat notes/todo.txt"}),
        "All done.",
    ]
    with scripted(db, steps, runtime=provider, workspace_tools=True) as kit:
        result = kit.run_turn("cli:me", "tidy my notes")
        assert result.status == "waiting_approval"
        assert [a.tool for a in result.approvals] == ["write"]
        result = kit.approve(result.approvals[0].id, actor="cli:me")
        assert [a.tool for a in result.approvals if a.state == "pending"] == ["edit"]
        result = kit.approve(result.approvals[-1].id, actor="cli:me")
        pending = [a for a in result.approvals if a.state == "pending"]
        assert result.status == "waiting_approval" and [a.tool for a in pending] == ["bash"]
        result = kit.approve(pending[0].id, actor="cli:me")
        assert (result.status, result.reply) == ("done", "All done.")
        tools = [(m["name"], m["content"]) for m in kit.history("cli:me") if m["role"] == "tool"]
        assert tools == [
            ("write", "wrote 18 bytes to notes/todo.txt"),
            ("read", "buy milk\ncall bob\n"),
            ("ls", "todo.txt"),
            ("edit", "applied 1 edit(s) to notes/todo.txt"),
            ("grep", "notes/todo.txt:2: call alice"),
            ("find", "notes/todo.txt"),
            ("bash", "2\nbuy milk\ncall alice\n\n[exit code 0]"),
        ]
        folder = tmp_path / "workspace" / agentkit.workspace_name("cli:me")
        assert (folder / "notes" / "todo.txt").read_text() == "buy milk\ncall alice\n"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_kit_keeps_working_after_a_fork_bomb_and_a_huge_write(
    db: Database, provider: str
) -> None:
    steps = [
        ToolCall("bash", {"command": "bomb() { bomb | bomb & }; bomb; sleep 3", "timeout": 10}),
        ToolCall("bash", {"command": "head -c 10G /dev/zero > big"}),
        "survived",
        ToolCall("bash", {"command": "ls -s --block-size=1K big; rm big; echo fine"}),
        "still here",
    ]
    options = {"workspace_tools": True, "workspace_tools_approval": False}
    with scripted(db, steps, runtime=provider_named(provider, limits=SMALL), **options) as kit:
        assert kit.run_turn("cli:me", "misbehave").reply == "survived"
        assert kit.run_turn("cli:me", "go on").reply == "still here"
        bomb, write, check = [m["content"] for m in kit.history("cli:me") if m["role"] == "tool"]
    assert "Resource temporarily unavailable" in bomb
    assert write.endswith("[exit code 153]")  # SIGXFSZ at the 1 MiB limit
    assert check == "1024 big\nfine\n\n[exit code 0]"
    assert agentkit_cgroups() == []


def test_workspace_tools_approval_can_be_lifted_or_decided(tmp_path: Path, db: Database) -> None:
    steps = [ToolCall("bash", {"command": "echo free"}), "ok"]
    with scripted(db, steps, workspace_tools=["bash"], workspace_tools_approval=False) as kit:
        assert kit.run_turn("cli:me", "go").status == "done"
        assert list(kit.engine.tools) == ["secret_request", "bash"]
    asked: list[tuple[str, dict]] = []

    def decide(tool: str, args: dict, ctx: ToolContext) -> bool | str:
        asked.append((tool, args))
        return "rm needs a look" if "rm" in args.get("command", "") else False

    steps = [ToolCall("bash", {"command": "echo hi"}), ToolCall("bash", {"command": "rm x"}), "ok"]
    with scripted(db, steps, workspace_tools=True, workspace_tools_approval=decide) as kit:
        result = kit.run_turn("cli:other", "go")
        assert result.status == "waiting_approval"
        assert result.approvals[0].reason == "rm needs a look"
    assert asked == [("bash", {"command": "echo hi"}), ("bash", {"command": "rm x"})]


def test_long_tool_output_tells_the_model_where_the_rest_is(tmp_path: Path, db: Database) -> None:
    steps = [
        ToolCall("bash", {"command": "seq 1 5000"}),
        ToolCall("grep", {"pattern": "^[0-9]+$"}),
        ToolCall("read", {"path": "many.txt", "offset": 10}),
        "ok",
    ]
    with scripted(db, steps, workspace_tools=True, workspace_tools_approval=False) as kit:
        folder = tmp_path / "workspace" / agentkit.workspace_name("cli:me")
        folder.mkdir(parents=True)
        (folder / "many.txt").write_text("".join(f"{n}\n" for n in range(3000)))
        assert kit.run_turn("cli:me", "go").status == "done"
        bash, grep, read = [m["content"] for m in kit.history("cli:me") if m["role"] == "tool"]
    assert bash.startswith("3001\n") and "5000\n\n[output truncated to its last 2000 lines" in bash
    saved = bash.split("the full output is in ")[1].split(":")[0]
    assert (folder / saved).read_text() == "".join(f"{n}\n" for n in range(1, 5001))
    assert grep.startswith("many.txt:1: 0\n") and "[output truncated to its first" in grep
    assert "showing lines 10-2009; the file goes on: read it with offset=2010]" in read


def test_ctx_runtime_passes_a_secret_to_a_command_and_redacts_it(
    tmp_path: Path, db: Database
) -> None:
    steps = [ToolCall("deploy", {}), "deployed"]
    with scripted(db, steps, runtime="bwrap") as kit:

        @kit.tool
        def deploy(ctx: ToolContext) -> str:
            """Deploy with the token."""
            token = ctx.secret("DEPLOY_TOKEN")
            return ctx.runtime.bash('echo "using $TOKEN"', timeout=30, env={"TOKEN": token}).output

        folder = agentkit.secrets_folder(tmp_path / "workspace", "cli:me")
        agentkit.write_secret(folder, "DEPLOY_TOKEN", "deploy-token-77")
        assert kit.run_turn("cli:me", "deploy").status == "done"
        [result] = [m["content"] for m in kit.history("cli:me") if m["role"] == "tool"]
    assert result == "using [redacted:TOKEN]\n"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_saved_secret_never_reaches_the_model_through_bash(
    tmp_path: Path, db: Database, provider: str
) -> None:
    # local commands are not confined: the value is redacted from the result; bwrap hides it
    steps = [ToolCall("bash", {"command": "cat .secrets/TOKEN; echo"}), "ok"]
    options = {"runtime": provider, "workspace_tools": True, "workspace_tools_approval": False}
    with scripted(db, steps, **options) as kit:
        agentkit.write_secret(
            agentkit.secrets_folder(tmp_path / "workspace", "cli:me"), "TOKEN", "saved-value-5"
        )
        assert kit.run_turn("cli:me", "show me").status == "done"
        [result] = [m["content"] for m in kit.history("cli:me") if m["role"] == "tool"]
    assert "saved-value-5" not in result
    assert ("[redacted:TOKEN]" in result) is (provider == "local")


@pytest.mark.parametrize(
    ("scope", "shared"),
    [("thread", False), ("actor", True), ("adapter", True), ("kit", True)],
)
def test_the_scope_decides_who_shares_a_workspace(
    tmp_path: Path, db: Database, scope: str, shared: bool
) -> None:
    steps = [
        ToolCall("write", {"path": "shared.txt", "text": "from one"}),
        "written",
        ToolCall("read", {"path": "shared.txt"}),
        "read",
    ]
    options = {"runtime_scope": scope, "workspace_tools": True, "workspace_tools_approval": False}
    with scripted(db, steps, **options) as kit:
        kit.run_turn("cli:one", "write", actor="cli:me")
        kit.run_turn("cli:two", "read", actor="cli:me")
        content = next(m["content"] for m in kit.history("cli:two") if m["role"] == "tool")
        assert (content == "from one") is shared
        runtime = kit.runtimes.get("cli:two", "cli:me")
        agentkit.write_secret(
            agentkit.secrets_folder(tmp_path / "workspace", "cli:two"), "K", "v-123"
        )
        with pytest.raises(agentkit.BadInput, match=r"\.secrets"):
            runtime.read(".secrets/K")
        folders = {
            "thread": agentkit.workspace_name("cli:two"),
            "actor": f".actor/{agentkit.workspace_name('cli:me')}",
            "adapter": ".adapter/cli",
            "kit": ".kit",
        }
        assert Path(runtime.root) == tmp_path / "workspace" / folders[scope]
        if scope != "thread":  # secrets stay in the thread's own folder, outside the scope's
            assert not (Path(runtime.root) / ".secrets" / "K").exists()


class CountingProvider:
    """A custom provider around the local one that records its calls."""

    def __init__(self) -> None:
        self.inner = agentkit.LocalProvider(limits=SMALL)
        self.calls: list[tuple[str, str | None]] = []

    def get(self, scope: agentkit.RuntimeScope) -> agentkit.Runtime:
        self.calls.append(("get", scope.key))
        return self.inner.get(scope)

    def stop(self, scope: agentkit.RuntimeScope | None = None) -> None:
        self.calls.append(("stop", scope and scope.key))
        self.inner.stop(scope)


def test_idle_runtimes_are_stopped_and_all_on_close(tmp_path: Path, db: Database) -> None:
    provider = CountingProvider()
    kit = scripted(db, [], runtime=provider, runtime_idle=0.05)
    assert isinstance(provider, agentkit.RuntimeProvider)
    warm = kit.runtimes.get("cli:me", "cli:me")
    assert kit.runtimes.get("cli:me", "cli:me") is warm  # kept warm while used
    wait_until(lambda: kit.tick() is not None and ("stop", "cli:me") in provider.calls)
    with pytest.raises(agentkit.RuntimeUnavailable, match="stopped"):
        warm.read("x")
    assert kit.runtimes.get("cli:me", "cli:me") is not warm
    kit.close()
    assert provider.calls[-1] == ("stop", None)
    assert provider.inner._runtimes == {}


def test_close_kills_a_running_command(tmp_path: Path, db: Database) -> None:
    kit = scripted(db, [])
    runtime = kit.runtimes.get("cli:me", "cli:me")
    marker = f"1002.{os.getpid()}"
    results: list[agentkit.BashResult] = []
    thread = threading.Thread(
        target=lambda: results.append(runtime.bash(f"sleep {marker}", timeout=120))
    )
    thread.start()
    wait_until(lambda: processes_with(marker), what="the command")
    kit.close()
    thread.join()
    assert results[0].exit_code == -9 and processes_with(marker) == []


def test_bad_runtime_options_are_refused(tmp_path: Path, db: Database) -> None:
    for options, problem in [
        ({"runtime": "docker"}, "unknown runtime"),
        ({"runtime_scope": "team"}, "runtime_scope is one of"),
        ({"runtime_idle": 0}, "runtime_idle"),
        ({"workspace_tools": ["read", "rm"]}, "workspace_tools is True, False or a list"),
        ({"workspace_tools": True, "workspace_tools_approval": "yes"}, "a bool or a callable"),
    ]:
        with pytest.raises(agentkit.BadInput, match=problem):
            scripted(db, [], **options)
    assert not created(db)


def test_bwrap_command_cannot_reach_host_files_through_inherited_descriptor(tmp_path):
    root = tmp_path / "ws"
    agentkit.write_secret(root / ".secrets", "API_TOKEN", "own-thread-secret-value")
    agentkit.write_secret(tmp_path / "other" / ".secrets", "API_TOKEN", "other-thread-secret")
    provider = agentkit.BwrapProvider()
    try:
        runtime = provider.get(agentkit.RuntimeScope("thread", "t", root))
        result = runtime.bash(
            "cat /proc/self/fd/*/.secrets/API_TOKEN /proc/self/fd/*/../other/.secrets/API_TOKEN;"
            " for f in /proc/self/fd/*; do touch $f/../escaped; done",
            timeout=30,
        )
    finally:
        provider.stop()
    assert "own-thread-secret-value" not in result.output
    assert "other-thread-secret" not in result.output
    assert not (tmp_path / "escaped").exists()
