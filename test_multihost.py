"""Several hosts on one PostgreSQL database, for real: three network namespaces, each with a
worker process that reaches the server only over its own veth pair, drain 20,000 jobs and
300 turns whose tool is not idempotent, while one worker is SIGKILLed and another's link is
cut and later restored. Nothing is lost, nothing runs twice, and the cut worker's late
writes are refused. Needs root (CI runs as root: the test fails, not skips, without it);
the namespaces, their links and the private cluster are removed at the end."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentkit
from testkit import wait_until

HERE = Path(__file__).parent
JOBS = 20_000
TURNS = 300
LEASE = 2.0  # seconds: a cut host's leases lapse quickly
HOSTS = ("a", "b", "c")  # a is killed, b is cut off and comes back, c stays
# The server ends a transaction left open by a host that dropped off the network (and the
# connection whose data it cannot deliver), so that its locks go with its leases.
SERVER_OPTIONS = "-c idle_in_transaction_session_timeout=3s -c tcp_user_timeout=3000"

WORKER = r'''
import logging, os, sys, time
import agentkit

url, folder, host, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")


def step(messages, tools):
    return agentkit.ToolCall("charge", {}) if messages[-1]["role"] == "user" else "charged"


kit = agentkit.AgentKit(
    url, model=agentkit.ScriptedModel([step] * 5000), lease=lease,
    workspace=os.path.join(folder, host),
)
runs = os.open(os.path.join(folder, f"runs-{host}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)


@kit.task(name="count")
def count(n, ctx):
    os.write(runs, f"{ctx.job_id} {ctx.attempt} {time.monotonic()}\n".encode())
    return n


def held(name):
    """Whether this is the first call here while the test holds this host (then mark it)."""
    hold = os.path.join(folder, f"hold-{host}")
    if not os.path.exists(hold):
        return False
    mark = os.path.join(folder, f"held-{host}")
    with open(f"{mark}.{name}", "w") as f:  # a file of its own, then linked as the mark
        f.write(name)
    try:
        os.link(f"{mark}.{name}", mark)
    except FileExistsError:
        return False
    return True


@kit.tool
def charge(ctx: agentkit.ToolContext) -> str:
    """Charge the customer once (not idempotent: every run is an effect)."""
    fd = os.open(os.path.join(folder, "effects.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{ctx.turn_id} {ctx.call_id} {host}\n".encode())
    os.fsync(fd)
    os.close(fd)
    if held(ctx.turn_id):
        while os.path.exists(os.path.join(folder, f"hold-{host}")):
            time.sleep(0.01)  # until the test releases this host
    return f"charged by {host}"


with agentkit.stopping_on_signals() as stop:
    kit.work(concurrency=2, stop=stop)
kit.close()
'''


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def private_prefix() -> str:
    """A /24 of 10.0.0.0/8 that no interface of this machine uses: `10.x.y`."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    while True:
        prefix = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if f" {prefix}." not in used:
            return prefix


class Namespaces:
    """One network namespace per host, each joined to this machine by a veth pair with
    addresses of a private /24 that it picks: `<prefix>.<4i+1>` here, `.<4i+2>` there."""

    def __init__(self, hosts: tuple[str, ...]) -> None:
        tag = f"{os.getpid() % 100000:05d}{random.getrandbits(8):02x}"
        self.prefix = private_prefix()
        self.names = {host: f"akmh{tag}{host}" for host in hosts}
        self.links = {host: f"akh{tag}{host}" for host in hosts}  # this machine's end
        self.here = {host: f"{self.prefix}.{4 * i + 1}" for i, host in enumerate(hosts)}

    def create(self) -> None:
        for i, (host, name) in enumerate(self.names.items()):
            ip("netns", "add", name)
            inside = f"akn{self.links[host][3:]}"
            ip("link", "add", self.links[host], "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", name)
            ip("addr", "add", f"{self.here[host]}/30", "dev", self.links[host])
            ip("link", "set", self.links[host], "up")
            ip("-n", name, "addr", "add", f"{self.prefix}.{4 * i + 2}/30", "dev", inside)
            ip("-n", name, "link", "set", inside, "up")
            ip("-n", name, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Kill what still runs in the namespaces and delete them (their links go too)."""
        for name in self.names.values():
            listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in listed.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for link in self.links.values():  # if a namespace was never made
            subprocess.run(["ip", "link", "del", link], capture_output=True)

    def cut(self, host: str, up: bool) -> None:
        ip("link", "set", self.links[host], "up" if up else "down")


@pytest.fixture
def network() -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.fail("the multi-host test needs root to create network namespaces (CI is root)")
    try:
        spaces = Namespaces(HOSTS)
    except FileNotFoundError:
        pytest.fail("the multi-host test needs iproute2's ip: apt-get install iproute2")
    try:
        spaces.create()
    except subprocess.CalledProcessError as e:
        spaces.remove()
        pytest.fail(f"cannot create network namespaces ({' '.join(e.cmd)}): {e.stderr}")
    try:
        yield spaces
    finally:
        spaces.remove()


@pytest.fixture
def cluster(network: Namespaces) -> Iterator[tuple[str, int]]:
    """A private PostgreSQL cluster listening on loopback and on this machine's end of each
    veth pair, open to the private /24: `(its folder, its port)`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "AGENTKIT_PG_PORT": str(port),
        "AGENTKIT_PG_LISTEN": ",".join(["127.0.0.1", *network.here.values()]),
        "AGENTKIT_PG_HBA": f"{network.prefix}.0/24",
        "AGENTKIT_PG_OPTIONS": SERVER_OPTIONS,
    }
    started = subprocess.run(
        ["bash", str(HERE / ".ci" / "postgres")], env=env, capture_output=True, text=True
    )
    if started.returncode:
        pytest.fail(f"could not start PostgreSQL (.ci/postgres):\n{started.stderr}")
    folder = started.stdout.split()[0]
    try:
        yield folder, port
    finally:
        pg_ctl = str(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1])
        stop = [pg_ctl, "-D", f"{folder}/data", "stop", "-m", "fast"]
        subprocess.run(["runuser", "-u", "postgres", "--", *stop], capture_output=True)
        shutil.rmtree(folder)


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_three_hosts_drain_jobs_and_turns_through_a_kill_and_a_cut(
    network: Namespaces, cluster: tuple[str, int], tmp_path: Path
) -> None:
    _, port = cluster
    url = f"postgresql://agentkit@127.0.0.1:{port}/agentkit"
    env = {
        **os.environ,
        "AGENTKIT_SECRET_KEY": "multi-host-test-key-" + "k" * 20,
        "AGENTKIT_WEB_TOKEN": "multi-host-test-token",
    }
    began = time.monotonic()
    kit = agentkit.AgentKit(url, lease=LEASE, workspace=tmp_path / "here")
    ids, turns = [], []
    for part in range(10):  # the turns spread among the jobs, which run oldest first
        numbers = list(range(part * JOBS // 10, (part + 1) * JOBS // 10))
        ids += kit.enqueue_many("count", numbers, retries=10, strict=False)
        turns += [
            kit.run_turn(f"cli:customer-{i}", "charge me", wait=False)
            for i in range(part * TURNS // 10, (part + 1) * TURNS // 10)
        ]
    for host in ("a", "b"):
        (tmp_path / f"hold-{host}").touch()
    workers, logs = {}, {}
    for host in HOSTS:
        logs[host] = open(tmp_path / f"worker-{host}.err", "w")  # noqa: SIM115
        there = f"postgresql://agentkit@{network.here[host]}:{port}/agentkit"
        workers[host] = subprocess.Popen(
            [
                *("ip", "netns", "exec", network.names[host]),
                *(sys.executable, "-c", WORKER, there, str(tmp_path), host, str(LEASE)),
            ],
            env=env,
            stderr=logs[host],
        )
    try:
        # a is killed in the middle of a call (and of its other threads' jobs)
        wait_until(lambda: (tmp_path / "held-a").exists(), 60, "a call running on a")
        workers["a"].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert workers["a"].wait(30) == -signal.SIGKILL
        # b loses its link in the middle of a call; the others take its leases over
        wait_until(lambda: (tmp_path / "held-b").exists(), 60, "a call running on b")
        network.cut("b", up=False)
        cut_at = time.monotonic()
        held_b = (tmp_path / "held-b").read_text()
        b_owner = f"{socket.gethostname()}:{workers['b'].pid}:"  # agentkit.worker_name()
        had = {
            r["id"]: r["attempts"]
            for r in kit.store.rows("jobs")
            if r["state"] == "running" and r["owner"].startswith(b_owner)
        }
        assert kit.store.turn(held_b).job_id in had  # b's held turn, among other jobs

        def taken_over() -> bool:
            now_jobs = [kit.store.job(rowid) for rowid in had]
            return kit.turn(held_b).status == "done" and all(
                j.state == "done" or j.attempts > had[int(j.id[4:])] for j in now_jobs
            )

        wait_until(taken_over, 60, "b's leases taken over")
        network.cut("b", up=True)
        restored_at = time.monotonic()
        (tmp_path / "hold-b").unlink()  # b's call returns now, to a turn it lost
        (tmp_path / "hold-a").unlink()

        def drained() -> bool:
            return not kit.store.jobs("queued", 1) and not kit.store.jobs("running", 1)

        wait_until(drained, 150, "every job and turn to end")
        drained_at = time.monotonic()
    finally:
        for host in ("b", "c"):
            if workers[host].poll() is None:
                workers[host].send_signal(signal.SIGTERM)
        codes = {host: workers[host].wait(60) for host in ("b", "c")}
        for log in logs.values():
            log.close()
    errors = {host: (tmp_path / f"worker-{host}.err").read_text() for host in HOSTS}
    assert codes == {"b": 0, "c": 0}, errors

    # the jobs: none lost, each result once; a job ran again only after its worker was
    # killed (a) or cut off (b), never after c
    results = {
        f"job_{r['id']}": r["result"] for r in kit.store.rows("jobs") if r["name"] == "count"
    }
    assert [json.loads(results[i]) for i in ids] == list(range(JOBS))
    runs = {host: lines(tmp_path / f"runs-{host}.log") for host in HOSTS}
    attempts: dict[str, list[tuple[int, str, float]]] = {}
    for host, found in runs.items():
        for job_id, attempt, at in found:
            attempts.setdefault(job_id, []).append((int(attempt), host, float(at)))
    assert set(attempts) == set(ids)
    again = {job_id: sorted(tried) for job_id, tried in attempts.items() if len(tried) > 1}
    for job_id, tried in again.items():
        numbers = [attempt for attempt, _, _ in tried]
        assert len(set(numbers)) == len(numbers), (job_id, tried)  # never one attempt twice
        # b's connections come back a while after its link (TCP retries back off), so
        # it may lose a lease it took just before or after the link came back
        assert {host for _, host, _ in tried[:-1]} <= {"a", "b"}, (job_id, tried)

    # the turns: all done; the tool ran at most once per call, exactly once for every call
    # with a result of its own; the calls running on a and b when they went are reported
    # interrupted (their effect unknown) and b's late result never landed
    charged = lines(tmp_path / "effects.log")
    effects = Counter((turn_id, call_id) for turn_id, call_id, _ in charged)
    where = {(turn_id, call_id): host for turn_id, call_id, host in charged}
    assert max(effects.values()) == 1
    assert {r["status"] for r in kit.store.rows("turns")} == {"done"}
    calls = {(t.turn_id, c.call_id): c for t in turns for c in kit.store.calls(t.turn_id)}
    assert len(calls) == TURNS  # one call each, an interrupted one included
    interrupted = {key for key, c in calls.items() if c.state == "error"}
    assert {calls[key].result for key in interrupted} == {agentkit.INTERRUPTED}
    assert {where[key] for key in interrupted if key in where} <= {"a", "b"}
    held = {(tmp_path / f"held-{host}").read_text() for host in ("a", "b")}
    assert held <= {turn_id for turn_id, _ in interrupted}
    for key, c in calls.items():
        if key not in interrupted:
            assert effects[key] == 1 and c.result.startswith("charged by "), (key, c)
    assert not any(c.result == "charged by b" for key, c in calls.items() if key[0] == held_b)
    # what b did after it came back was refused: a turn's fenced write, or a job's result
    refused = r"is no longer leased to this worker|result refused, its lease belongs to another"
    assert re.search(refused, errors["b"]), errors["b"]
    kit.close()
    print(
        f"\n{JOBS} jobs, {TURNS} turns: a killed at {killed_at - began:.1f} s, b cut from "
        f"{cut_at - began:.1f} s to {restored_at - began:.1f} s, all done at "
        f"{drained_at - began:.1f} s; jobs run again: {len(again)}; calls interrupted: "
        f"{len(interrupted)}"
    )
