"""Live events and history on the client side: the library's subscribe/unsubscribe/events()/
get_history against a real in-process vmserver, and the console's ``watch`` and ``history``
(and events printed above the prompt after a typed ``subscribe``) as subprocesses against a
real server subprocess, the interactive ones through a pty that is their controlling terminal
(so that Ctrl-C, ``\\x03``, really sends SIGINT). Nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

import vmclient
from vmclient import render
from vmclient.client import EVENT_NAMES

from console_pty import EXPECT_TIMEOUT, ROOT, RUN_TIMEOUT, PtyConsole, clean, client_env, spans

pytestmark = pytest.mark.timeout(20)

HOST = "127.0.0.1"
STEP = 5.0  # no single await in these tests may take longer than this
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EVENT_LINE = r"\d\d:\d\d:\d\d\.\d{3}  "  # how a watch line starts: the time of day, then two spaces


async def bounded(aw: Awaitable[Any], seconds: float = STEP) -> Any:
    return await asyncio.wait_for(aw, seconds)


async def take(stream: vmclient.client.EventStream, n: int, seconds: float = STEP) -> list[dict[str, Any]]:
    """The next ``n`` events of ``stream`` (bounded)."""
    async def collect() -> list[dict[str, Any]]:
        return [await stream.__anext__() for _ in range(n)]

    return await bounded(collect(), seconds)


async def nothing_comes(stream: vmclient.client.EventStream, seconds: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(stream.__anext__(), seconds)


@pytest.fixture
def other(client2: vmclient.Client) -> vmclient.Client:
    """A second session: the one whose operations cause the events."""
    return client2


# --- the library ------------------------------------------------------------------------------


async def test_events_come_in_the_order_of_the_operations(client: vmclient.Client, other: vmclient.Client) -> None:
    assert client.subscription is None
    result = await bounded(client.subscribe())
    assert result == {"events": list(EVENT_NAMES), "vm_id": None}
    assert client.subscription == result
    await bounded(other.add_vm("vm-1", ram=1024, cpu=1, disks=[{"disk_id": "disk-1", "size": 10}], password="pw"))
    await bounded(other.connect_vm("vm-1", password="pw"))
    with pytest.raises(vmclient.AuthFailed):
        await bounded(other.authorize_vm("vm-1", password="wrong"))
    await bounded(other.authorize_vm("vm-1", password="pw"))
    await bounded(other.update_vm("vm-1", ram=2048))
    await bounded(other.deauthorize_vm("vm-1"))
    await bounded(other.disconnect_vm("vm-1"))
    await bounded(other.remove_vm("vm-1", password="pw"))
    events = await take(client.events(), 8)
    assert [e["event"] for e in events] == ["vm_added", "vm_connected", "auth_failed", "vm_authorized", "vm_updated",
                                           "vm_deauthorized", "vm_disconnected", "vm_removed"]
    for e in events:
        assert set(e) >= {"event", "data", "ts"}
        assert TS.match(e["ts"]), e
        assert e["data"]["vm_id"] == "vm-1"
        assert "password" not in json.dumps(e)
    assert events[0]["data"]["disks"][0]["disk_id"] == "disk-1"
    assert events[2]["data"]["command"] == "authorize_vm"
    assert events[4]["data"]["ram"] == 2048
    assert events[6]["data"]["reason"] == "request"
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)


async def test_calls_keep_working_while_events_flow(client: vmclient.Client, other: vmclient.Client) -> None:
    await bounded(client.subscribe(events=["vm_added"]))
    seen: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in client.events():
            seen.append(event)
            if len(seen) == 60:
                return

    consumer = asyncio.ensure_future(consume())
    try:
        mine = [client.add_vm(f"mine-{i}", ram=i + 1, cpu=1, disks=[]) for i in range(30)]
        theirs = [other.add_vm(f"theirs-{i}", ram=i + 1, cpu=1, disks=[]) for i in range(30)]
        results = await bounded(asyncio.gather(*mine, *theirs, client.health(), client.get_all_vms()))
        assert [r["vm_id"] for r in results[:30]] == [f"mine-{i}" for i in range(30)]
        assert results[60] == "OK"
        await bounded(consumer)
    finally:
        consumer.cancel()
    assert [e["event"] for e in seen] == ["vm_added"] * 60
    assert sorted(e["data"]["vm_id"] for e in seen) == sorted([f"mine-{i}" for i in range(30)]
                                                              + [f"theirs-{i}" for i in range(30)])
    ids = [e["data"]["id"] for e in seen]
    assert ids == sorted(ids)  # the order in which the server registered them
    assert [e["data"]["vm_id"] for e in seen if e["data"]["vm_id"].startswith("mine")] == [f"mine-{i}" for i in range(30)]
    assert len(await bounded(client.get_all_vms())) == 60
    assert client.poll_events() == []


async def test_filters_by_name_and_vm(client: vmclient.Client, other: vmclient.Client) -> None:
    with pytest.raises(vmclient.InvalidArgs):
        await bounded(client.subscribe(events=["vm_exploded"]))
    assert client.subscription is None
    result = await bounded(client.subscribe("vm_connected", vm_id="b"))
    assert result == {"events": ["vm_connected"], "vm_id": "b"}
    for name in ("a", "b"):
        await bounded(other.add_vm(name, ram=1, cpu=1, disks=[]))
        await bounded(other.connect_vm(name))
        await bounded(other.disconnect_vm(name))
        await bounded(other.connect_vm(name))
    stream = client.events()
    events = await take(stream, 2)
    assert [(e["event"], e["data"]["vm_id"]) for e in events] == [("vm_connected", "b")] * 2
    await nothing_comes(stream)
    # Subscribing again replaces the choice.
    await bounded(client.subscribe(events=["vm_disconnected", "vm_added"]))
    await bounded(other.disconnect_vm("a"))
    await bounded(other.add_vm("c", ram=1, cpu=1, disks=[]))
    await bounded(other.connect_vm("c"))
    events = await take(stream, 2)
    assert [(e["event"], e["data"]["vm_id"]) for e in events] == [("vm_disconnected", "a"), ("vm_added", "c")]
    assert events[0]["data"]["reason"] == "request"
    await nothing_comes(stream)


async def test_subscribe_typed_as_a_line_is_tracked_too(client: vmclient.Client, other: vmclient.Client) -> None:
    await bounded(client.call_line('subscribe events=["vm_removed"]'))
    assert client.subscription == {"events": ["vm_removed"], "vm_id": None}
    await bounded(other.add_vm("gone", ram=1, cpu=1, disks=[]))
    await bounded(other.remove_vm("gone"))
    [event] = await take(client.events(), 1)
    assert event["event"] == "vm_removed" and event["data"]["vm_id"] == "gone"
    assert await bounded(client.call_line('{"cmd":"unsubscribe","id":"u"}')) == "OK"
    assert client.subscription is None


async def test_unsubscribe_stops_events_and_drops_the_buffered(client: vmclient.Client,
                                                               other: vmclient.Client) -> None:
    await bounded(client.subscribe())
    stream = client.events()
    await bounded(other.add_vm("u-0", ram=1, cpu=1, disks=[]))
    [first] = await take(stream, 1)
    assert first["data"]["vm_id"] == "u-0"
    for i in range(1, 4):
        await bounded(other.add_vm(f"u-{i}", ram=1, cpu=1, disks=[]))
    await bounded(client.health())
    await asyncio.sleep(0.2)  # u-1..u-3 have come in and wait in the buffer
    assert await bounded(client.unsubscribe()) == "OK"
    assert client.subscription is None
    assert client.poll_events() == []  # documented: dropped by unsubscribe
    await nothing_comes(stream)
    await bounded(other.add_vm("u-4", ram=1, cpu=1, disks=[]))
    await nothing_comes(stream)
    assert await bounded(client.health()) == "OK"
    # The stream did not end: a new subscription's events come out of it.
    await bounded(client.subscribe(events=["vm_added"]))
    await bounded(other.add_vm("u-5", ram=1, cpu=1, disks=[]))
    [event] = await take(stream, 1)
    assert event["data"]["vm_id"] == "u-5"


async def test_events_end_after_the_shutdown_event(server: Any, client: vmclient.Client,
                                                   other: vmclient.Client) -> None:
    quiet = await bounded(vmclient.connect(HOST, server.address[1]))  # never subscribes
    try:
        await bounded(client.subscribe(events=["vm_added"]))
        await bounded(other.add_vm("s-1", ram=1, cpu=1, disks=[]))
        received: list[dict[str, Any]] = []

        async def consume(c: vmclient.Client, into: list[dict[str, Any]]) -> None:
            async for event in c.events():
                into.append(event)

        unsubscribed: list[dict[str, Any]] = []
        tasks = [asyncio.ensure_future(consume(client, received)), asyncio.ensure_future(consume(quiet, unsubscribed))]
        await asyncio.sleep(0.1)
        await bounded(server.close())
        await bounded(asyncio.gather(*tasks))  # both iterators ended by themselves
        assert [e["event"] for e in received] == ["vm_added", "shutdown"]
        assert received[1]["data"] == {} and TS.match(received[1]["ts"])
        assert [e["event"] for e in unsubscribed] == ["shutdown"]
        assert client.connected is False and client.subscription is None
        with pytest.raises(vmclient.ConnectionLost):
            await bounded(client.health())
        assert [e async for e in client.events()] == []  # a new iterator ends at once
    finally:
        await bounded(quiet.close())


async def test_events_end_on_close_and_do_not_survive_a_reconnect(server: Any, other: vmclient.Client) -> None:
    c = vmclient.Client(HOST, server.address[1])
    assert [e async for e in c.events()] == []  # not connected: nothing, and no hang
    await bounded(c.connect())
    try:
        await bounded(c.subscribe())
        await bounded(other.add_vm("r-1", ram=1, cpu=1, disks=[]))
        stream = c.events()
        [event] = await take(stream, 1)
        assert event["data"]["vm_id"] == "r-1"
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        await bounded(c.close())
        with pytest.raises(StopAsyncIteration):
            await bounded(waiting)
        await bounded(c.connect())  # a new session: not subscribed, nothing buffered
        assert c.subscription is None
        with pytest.raises(StopAsyncIteration):
            await bounded(stream.__anext__())  # the old connection's stream stays ended
        await bounded(other.add_vm("r-2", ram=1, cpu=1, disks=[]))
        fresh = c.events()
        await nothing_comes(fresh)
        await bounded(c.subscribe(events=["vm_added"]))
        await bounded(other.add_vm("r-3", ram=1, cpu=1, disks=[]))
        [event] = await take(fresh, 1)
        assert event["data"]["vm_id"] == "r-3"
    finally:
        await bounded(c.close())


async def test_bounded_buffer_drops_the_oldest_and_says_how_many(server: Any, other: vmclient.Client) -> None:
    with pytest.raises(ValueError):
        vmclient.Client(HOST, server.address[1], event_buffer=0)
    c = await bounded(vmclient.connect(HOST, server.address[1], event_buffer=50))
    try:
        await bounded(c.subscribe(events=["vm_added"]))
        await bounded(asyncio.gather(*(other.add_vm(f"o-{i:03d}", ram=1, cpu=1, disks=[]) for i in range(120))))
        await bounded(c.health())
        await asyncio.sleep(0.3)  # every event line has been read (and 70 of them dropped)
        stream = c.events()
        overflow, *rest = await take(stream, 51)
        assert overflow["event"] == "overflow" and overflow["data"] == {"dropped": 70}
        assert TS.match(overflow["ts"])
        assert [e["data"]["vm_id"] for e in rest] == [f"o-{i:03d}" for i in range(70, 120)]  # the newest 50
        await nothing_comes(stream, 0.2)
        # It holds again after the overflow: a few more come through whole.
        await bounded(other.add_vm("o-last", ram=1, cpu=1, disks=[]))
        [event] = await take(stream, 1)
        assert event["event"] == "vm_added" and event["data"]["vm_id"] == "o-last"
    finally:
        await bounded(c.close())


async def test_get_history(client: vmclient.Client, other: vmclient.Client) -> None:
    await bounded(other.add_vm("h-1", ram=1, cpu=1, disks=[]))
    await bounded(other.connect_vm("h-1"))
    await bounded(other.disconnect_vm("h-1"))
    await bounded(other.add_vm("h-2", ram=1, cpu=1, disks=[]))
    everything = await bounded(client.get_history())
    assert [(h["vm_id"], h["event"]) for h in everything] == [
        ("h-2", "vm_added"), ("h-1", "vm_disconnected"), ("h-1", "vm_connected"), ("h-1", "vm_added")]
    ids = [h["id"] for h in everything]
    assert ids == sorted(ids, reverse=True)  # newest first
    assert everything[1]["reason"] == "request"
    assert all(TS.match(h["ts"]) and re.fullmatch(r"127\.0\.0\.1:\d+", h["peer"]) for h in everything)
    assert [h["event"] for h in await bounded(client.get_history("h-1"))] == [
        "vm_disconnected", "vm_connected", "vm_added"]
    assert [h["vm_id"] for h in await bounded(client.get_history(event="vm_added"))] == ["h-2", "h-1"]
    assert len(await bounded(client.get_history(limit=1))) == 1
    older = await bounded(client.get_history(before=ids[1], limit=2))
    assert [h["id"] for h in older] == ids[2:4]
    assert await bounded(client.get_history(since="2999-01-01T00:00:00Z")) == []
    assert len(await bounded(client.get_history(since=everything[-1]["ts"]))) == 4
    with pytest.raises(vmclient.InvalidArgs):
        await bounded(client.get_history(event="vm_exploded"))
    with pytest.raises(vmclient.InvalidArgs):
        await bounded(client.get_history(limit=0))


# --- rendering -----------------------------------------------------------------------------------


def test_event_lines_and_history_table() -> None:
    vm = {"id": 1, "vm_id": "vm-1", "ram": 2048, "cpu": 2, "disks": [{"id": 1, "disk_id": "disk-1", "size": 500,
                                                                       "vm_id": 1}]}
    added = render.event_line({"event": "vm_added", "data": vm, "ts": "2026-11-26T21:00:01.234Z"})
    gone = render.event_line({"event": "vm_disconnected", "data": {**vm, "reason": "timeout"},
                              "ts": "2026-11-26T21:00:02.000Z"})
    failed = render.event_line({"event": "auth_failed", "data": {**vm, "command": "connect_vm"},
                                "ts": "2026-11-26T21:00:03.5Z"})
    stop = render.event_line({"event": "shutdown", "data": {}, "ts": "2026-11-26T21:00:04.000Z"})
    assert added.split() == ["21:00:01.234", "vm_added", "vm-1", "ram=2048", "cpu=2", "disks=disk-1:500G"]
    assert gone.split() == ["21:00:02.000", "vm_disconnected", "vm-1", "reason=timeout"]
    assert failed.split()[1:] == ["auth_failed", "vm-1", "command=connect_vm"]
    assert stop.split() == ["21:00:04.000", "shutdown", "-", "the", "server", "is", "stopping"]
    assert added.index("vm_added") == gone.index("vm_disconnected") == failed.index("auth_failed")
    assert added.index("vm-1") == gone.index("vm-1") == failed.index("vm-1")
    assert added.index("ram=") == gone.index("reason=") == failed.index("command=")
    entries = [{"id": 12, "ts": "2026-11-26T22:09:00.181Z", "vm_id": "vm-4", "event": "vm_disconnected",
                "peer": "127.0.0.1:47400", "reason": "request"},
               {"id": 5, "ts": "2026-11-26T22:08:59.996Z", "vm_id": "a-longer-vm", "event": "vm_connected",
                "peer": None}]
    lines = render.human("get_history", entries).splitlines()
    assert lines[0].split() == ["ID", "TIME", "VM_ID", "EVENT", "PEER", "DETAIL"]
    assert lines[1].split() == ["12", "2026-11-26T22:09:00.181Z", "vm-4", "vm_disconnected", "127.0.0.1:47400",
                                "reason=request"]
    assert lines[2].split() == ["5", "2026-11-26T22:08:59.996Z", "a-longer-vm", "vm_connected", "-"]
    assert lines[3] == "(2 events)"
    rows = [["ID", "TIME", "VM_ID", "EVENT", "PEER", "DETAIL"],
            ["12", entries[0]["ts"], "vm-4", "vm_disconnected", "127.0.0.1:47400", "reason=request"],
            ["5", entries[1]["ts"], "a-longer-vm", "vm_connected", "-"]]
    located = [spans(line, cells) for line, cells in zip(lines, rows)]
    for col in range(1, 5):  # TIME, VM_ID, EVENT, PEER start at one offset on every line
        assert len({cells[col][0] for cells in located}) == 1, (col, lines)
    assert len({cells[0][1] for cells in located}) == 1, lines  # ID is right-aligned
    assert render.human("get_history", []) == "(no events)"


# --- the console ---------------------------------------------------------------------------------

def vmclient_argv(port: int, *words: str) -> list[str]:
    return [sys.executable, "-m", "vmclient", "--host", HOST, "--port", str(port), "--no-history", *words]


def run_client(port: int, *words: str) -> subprocess.CompletedProcess:
    """A one-shot command with pipes (so stdout is not a terminal: JSON output)."""
    return subprocess.run(vmclient_argv(port, *words), input="", capture_output=True, text=True, cwd=ROOT,
                          env=client_env(), timeout=RUN_TIMEOUT)


def read_line(stream: Any, timeout: float = EXPECT_TIMEOUT) -> bytes:
    """One line from a pipe, read a byte at a time (no buffering hides a line from select)."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise AssertionError(f"no whole line within {timeout}s (got {line!r})")
        byte = os.read(stream.fileno(), 1)
        if not byte:
            break
        line += byte
    return line


@pytest.fixture
def vmserver(spawn: Any, tmp_path: Path) -> Any:
    """A vmserver subprocess on an ephemeral port, with an empty database (``.port``)."""
    p = spawn("--port", "0", "--db", str(tmp_path / "events.db"))
    p.wait_listening()
    return p


def act(port: int, *steps: tuple[str, dict[str, Any]]) -> None:
    """Carry out operations as another session (a vmclient.Client), one after the other."""
    async def run() -> None:
        async with vmclient.Client(HOST, port, timeout=STEP) as c:
            for cmd, args in steps:
                await c.request(cmd, args)

    asyncio.run(asyncio.wait_for(run(), 2 * STEP))


def lifecycle(vm_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [("add_vm", {"vm_id": vm_id, "ram": 2048, "cpu": 2, "disks": [{"disk_id": f"{vm_id}-d", "size": 5}]}),
            ("connect_vm", {"vm_id": vm_id}), ("disconnect_vm", {"vm_id": vm_id})]


def test_history_one_shot_prints_json_when_piped(vmserver: Any) -> None:
    port = vmserver.port
    empty = run_client(port, "history")
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout) == []
    act(port, *lifecycle("vm-1"), *lifecycle("vm-2"))
    result = run_client(port, "history")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert [(e["vm_id"], e["event"]) for e in entries] == [
        ("vm-2", "vm_disconnected"), ("vm-2", "vm_connected"), ("vm-2", "vm_added"),
        ("vm-1", "vm_disconnected"), ("vm-1", "vm_connected"), ("vm-1", "vm_added")]
    one = run_client(port, "history", "vm-1", "event=vm_connected", "limit=1")
    assert one.returncode == 0, one.stderr
    assert [(e["vm_id"], e["event"]) for e in json.loads(one.stdout)] == [("vm-1", "vm_connected")]
    paged = run_client(port, "history", "vm_id=vm-2", "limit=2", f"before={entries[0]['id']}")
    assert [e["event"] for e in json.loads(paged.stdout)] == ["vm_connected", "vm_added"]
    bad = run_client(port, "history", "event=vm_exploded")
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "invalid_args"
    wrong = run_client(port, "history", "colour=blue")
    assert wrong.returncode == 1 and "colour=blue" in wrong.stderr and "Traceback" not in wrong.stderr


def test_watch_interactive_then_ctrl_c_back_to_the_prompt(vmserver: Any, tmp_path: Path) -> None:
    port = vmserver.port
    prompt = f"{HOST}:{port}> "
    con = PtyConsole(port, tmp_path, "--no-history", controlling_tty=True)
    try:
        con.expect(prompt)
        con.send("watch vm_added vm_disconnected\r")
        con.expect("watching vm_added, vm_disconnected; Ctrl-C to stop")
        act(port, *lifecycle("w-1"))
        act(port, ("add_vm", {"vm_id": "a-much-longer-vm-name", "ram": 1, "cpu": 1, "disks": []}))
        out = con.expect("a-much-longer-vm-name")
        out += con.expect("\n")
        lines = [line for line in out.splitlines() if re.match(EVENT_LINE, line)]
        assert [line.split()[1:3] for line in lines] == [["vm_added", "w-1"], ["vm_disconnected", "w-1"],
                                                         ["vm_added", "a-much-longer-vm-name"]], out
        assert lines[0].split()[3:] == ["ram=2048", "cpu=2", "disks=w-1-d:5G"]
        assert lines[1].split()[3:] == ["reason=request"]
        assert lines[0].index("w-1") == lines[1].index("w-1") == lines[2].index("a-much")
        assert "vm_connected" not in out
        con.send("\x03")
        out = con.expect(prompt)
        assert "stopped watching (unsubscribed)" in out, out
        act(port, ("add_vm", {"vm_id": "after", "ram": 1, "cpu": 1, "disks": []}))
        out = con.command("health", prompt)
        assert "OK" in out.splitlines() and "after" not in out, out
        out = con.command("history after", prompt)
        table = out.splitlines()
        header = next(i for i, line in enumerate(table) if line.startswith("ID"))
        assert table[header].split() == ["ID", "TIME", "VM_ID", "EVENT", "PEER", "DETAIL"], out
        assert table[header + 1].split()[2:4] == ["after", "vm_added"], out
        assert table[header + 2] == "(1 event)", out
        assert "Traceback" not in clean(con.raw)
    finally:
        con.close()


def test_watch_one_shot_on_a_terminal_until_ctrl_c(vmserver: Any, tmp_path: Path) -> None:
    port = vmserver.port
    con = PtyConsole(port, tmp_path, "--no-history", "watch", "vm_id=w-2", controlling_tty=True)
    try:
        con.expect("watching all events of w-2; Ctrl-C to stop")
        act(port, *lifecycle("w-1"), *lifecycle("w-2"))
        out = con.expect("reason=request")
        lines = [line for line in out.splitlines() if re.match(EVENT_LINE, line)]
        assert [line.split()[1:3] for line in lines] == [["vm_added", "w-2"], ["vm_connected", "w-2"],
                                                         ["vm_disconnected", "w-2"]], out
        con.send("\x03")
        assert con.wait() == 0
        assert "Traceback" not in clean(con.raw)
    finally:
        con.close()


def test_watch_one_shot_json_until_sigint(vmserver: Any) -> None:
    port = vmserver.port
    proc = subprocess.Popen(vmclient_argv(port, "watch", "vm_added", "vm_removed"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=client_env())
    try:
        assert read_line(proc.stderr).startswith(b"watching vm_added, vm_removed")
        act(port, ("add_vm", {"vm_id": "j-1", "ram": 1, "cpu": 1, "disks": []}), ("connect_vm", {"vm_id": "j-1"}),
            ("disconnect_vm", {"vm_id": "j-1"}), ("remove_vm", {"vm_id": "j-1"}))
        events = [json.loads(read_line(proc.stdout)) for _ in range(2)]
        assert [(e["event"], e["data"]["vm_id"]) for e in events] == [("vm_added", "j-1"), ("vm_removed", "j-1")]
        assert all(TS.match(e["ts"]) for e in events)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, err
        assert out == b"" and b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_watch_ends_with_the_shutdown_event_when_the_server_stops(vmserver: Any) -> None:
    proc = subprocess.Popen(vmclient_argv(vmserver.port, "watch"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=client_env())
    try:
        assert read_line(proc.stderr).startswith(b"watching all events")
        assert vmserver.stop() == 0
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert [json.loads(line)["event"] for line in out.splitlines()] == ["shutdown"]
        assert proc.returncode == 2 and b"was lost" in err and b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_events_of_a_typed_subscribe_show_above_the_prompt(vmserver: Any, tmp_path: Path) -> None:
    port = vmserver.port
    prompt = f"{HOST}:{port}> "
    con = PtyConsole(port, tmp_path, "--no-history", controlling_tty=True)
    try:
        con.expect(prompt)
        out = con.command("subscribe events=[\"vm_added\",\"vm_connected\"]", prompt)
        assert "subscribed to vm_added, vm_connected" in out, out
        con.send("get_al")  # half a command typed when the events come
        con.expect("get_al")
        act(port, *lifecycle("live-1"))
        out = con.expect("vm_connected")
        out += con.expect(prompt + "get_al")  # the prompt and the half-typed line, redrawn below
        found = [re.search(EVENT_LINE + r"(\S+)\s+(\S+)\s*(.*)$", line) for line in out.splitlines()]
        assert [m.groups() for m in found if m] == [("vm_added", "live-1", "ram=2048 cpu=2 disks=live-1-d:5G"),
                                                   ("vm_connected", "live-1", "")], out
        out = con.command("l_vms", prompt)  # the whole line, as typed before and after the events
        assert re.search(r"^live-1\s+2048\s+2\s+live-1-d:5G\s+no\s+no$", out, re.M), out
        con.send("connect_vm vm")
        con.expect("connect_vm vm")
        con.send("\x03")  # Ctrl-C at the prompt: the line is dropped, a fresh prompt comes
        out = con.expect(prompt)
        assert "^C" in out, out
        out = con.command("health", prompt)
        assert "OK" in out.splitlines(), out
        out = con.command("unsubscribe", prompt)
        assert "OK" in out.splitlines(), out
        act(port, ("add_vm", {"vm_id": "quiet-1", "ram": 1, "cpu": 1, "disks": []}))
        out = con.command("health", prompt)
        assert "quiet-1" not in out, out
        con.send("\x04")
        assert con.wait() == 0
        assert "Traceback" not in clean(con.raw)
    finally:
        con.close()


def test_completion_and_help_know_watch_and_history(vmserver: Any, tmp_path: Path) -> None:
    port = vmserver.port
    prompt = f"{HOST}:{port}> "
    con = PtyConsole(port, tmp_path, "--no-history", controlling_tty=True)
    try:
        con.expect(prompt)
        con.send("hist")
        con.expect("hist")
        con.send("\t")
        con.expect("ory ")
        con.send("event=vm_disc")
        con.expect("event=vm_disc")
        con.send("\t")
        con.expect("onnected ")
        out = con.command("", prompt)
        assert "(no events)" in out, out
        con.send("watch vm_au")
        con.expect("watch vm_au")
        con.send("\t")
        con.expect("thorized ")
        con.send("\x15")  # Ctrl-U: drop the line
        out = con.command("help", prompt)
        assert re.search(r"^  watch\s+Print live events", out, re.M), out
        assert re.search(r"^  history\s+What happened", out, re.M), out
        out = con.command("help watch", prompt)
        assert "watch [EVENT ...] [vm_id=VM_ID]" in out, out
    finally:
        con.close()


def test_client_knows_the_servers_event_names():
    """The client restates the event names (it cannot import the server): they must agree."""
    import vmclient
    from vmserver.commands import _EVENT_NAMES

    assert vmclient.EVENT_NAMES == _EVENT_NAMES
