"""Live events (subscribe, unsubscribe, overflow) and the durable history (get_history).

Everything runs against a real in-process server over loopback TCP; nothing of vmserver is
mocked. Every read is bounded (Wire's 10 s timeout, or an explicit deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import vmserver.backends.sqlite as sql
from conftest import TIMEOUT, Wire, disk, running, vm_args
from vmserver.config import Config
from vmserver import server as server_module
from vmserver.server import start_server
from vmserver.backends.sqlite import Store

ALL_EVENTS = ["vm_added", "vm_updated", "vm_removed", "vm_connected", "vm_disconnected", "vm_authorized",
              "vm_deauthorized", "auth_failed"]
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SEED_TS = "2026-01-01T00:00:00.000Z"


# --- helpers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(db: str, **settings: Any) -> AsyncIterator[Any]:
    srv = await start_server(Config(host="127.0.0.1", port=0, db=db, **settings))
    try:
        yield srv
    finally:
        await srv.close()
        srv.inventory.close()


async def open_wire(port: int, rcvbuf: int | None = None) -> Wire:
    """A Wire; with ``rcvbuf``, over a socket whose kernel receive buffer is that small (set before
    connecting), so that a reader that stops reading really pushes back on the server."""
    if rcvbuf is None:
        return await Wire.open(port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024 * 1024)
    w = Wire(reader, writer, {})
    w.greeting_line = await w.recv_line()
    w.greeting = json.loads(w.greeting_line)
    return w


def peer_of(w: Wire) -> str:
    """How the server names this client's session: "127.0.0.1:<client port>"."""
    host, port = w.writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def check_event(msg: dict) -> dict:
    """An event line: exactly event, data, ts (never id or ok)."""
    assert set(msg) == {"event", "data", "ts"}, msg
    assert isinstance(msg["event"], str) and isinstance(msg["data"], dict), msg
    assert TS.fullmatch(msg["ts"]), msg
    return msg


async def read_until(w: Wire, done: Callable[[dict], bool], max_lines: int = 100_000) -> list[tuple[bytes, dict]]:
    """Read whole lines (each must be one JSON object) until ``done(message)``; returns them all."""
    out: list[tuple[bytes, dict]] = []
    for _ in range(max_lines):
        line = await w.recv_line()
        assert line.endswith(b"\n"), f"not a whole line (EOF?): {line[:200]!r}"
        msg = json.loads(line)
        assert isinstance(msg, dict), line[:200]
        out.append((line, msg))
        if done(msg):
            return out
    raise AssertionError(f"no end after {max_lines} lines")


async def events_until_reply(w: Wire, rid: str = "sync") -> tuple[list[dict], list[bytes]]:
    """Send health with id ``rid``; return the event lines read before its reply (and all raw lines).

    Every line before the reply must be an event."""
    await w.send({"cmd": "health", "id": rid})
    lines = await read_until(w, lambda m: "event" not in m and m.get("id") == rid)
    reply = lines[-1][1]
    assert reply == {"id": rid, "ok": True, "result": "OK"}, reply
    return [check_event(m) for _, m in lines[:-1]], [raw for raw, _ in lines]


async def next_line_is_reply(w: Wire, rid: str) -> None:
    """The very next line this session reads is the reply to its own request: no event came first."""
    await w.send({"cmd": "health", "id": rid})
    assert await w.recv() == {"id": rid, "ok": True, "result": "OK"}


def brief(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["event"], e["data"].get("vm_id")) for e in events]


async def history(w: Wire, **args: Any) -> list[dict]:
    return await w.ok("get_history", **args)


async def wait_history(w: Wire, pred: Callable[[list[dict]], bool], timeout: float = 5.0, **args: Any) -> list[dict]:
    """Poll get_history until ``pred(rows)`` (presence rows are written without being awaited)."""
    end = time.monotonic() + timeout
    while True:
        rows = await history(w, **args)
        if pred(rows) or time.monotonic() > end:
            return rows
        await asyncio.sleep(0.05)


def walk(produced: list[Any], lines: list[dict], key: Callable[[dict], Any]) -> tuple[int, int]:
    """Check that the event lines read are exactly the produced events in order, each gap being
    announced by one overflow line with its size. Returns (events read, events dropped)."""
    pos = read = dropped = 0
    for msg in lines:
        check_event(msg)
        if msg["event"] == "overflow":
            assert set(msg["data"]) == {"dropped"}, msg
            n = msg["data"]["dropped"]
            assert type(n) is int and n > 0, msg
            pos += n
            dropped += n
            continue
        assert pos < len(produced), f"event {key(msg)} beyond the {len(produced)} produced"
        assert key(msg) == produced[pos], f"event #{pos}: got {key(msg)}, expected {produced[pos]}"
        pos += 1
        read += 1
    assert pos == len(produced), f"accounted for {pos} of {len(produced)} events"
    return read, dropped


# --- 1. events follow the operations that caused them ---------------------------------------


async def test_events_follow_operations_in_order(server, connect):
    w, a = await connect(), await connect()
    sub = await w.ok("subscribe")
    assert sorted(sub["events"]) == sorted(ALL_EVENTS) and sub["vm_id"] is None
    expected: list[tuple[str, dict]] = []

    r = await a.ok("add_vm", vm_id="e-1", ram=2048, cpu=2, disks=[disk("e-1-a", 100)])
    expected.append(("vm_added", r))
    assert await a.error("add_vm", **vm_args("e-1")) == "already_exists"  # a failure announces nothing
    r = await a.ok("connect_vm", vm_id="e-1")
    assert r == await a.ok("get_vm", vm_id="e-1") and r["connected"] is True
    expected.append(("vm_connected", r))
    r = await a.ok("authorize_vm", vm_id="e-1")
    assert r["authorized"] is True
    expected.append(("vm_authorized", r))
    r = await a.ok("update_vm", vm_id="e-1", ram=4096, disks=[disk("e-1-a", 200), disk("e-1-b", 5)])
    assert r == await a.ok("get_vm", vm_id="e-1") and r["ram"] == 4096 and len(r["disks"]) == 2
    expected.append(("vm_updated", r))
    r = await a.ok("deauthorize_vm", vm_id="e-1")
    expected.append(("vm_deauthorized", r))
    r = await a.ok("disconnect_vm", vm_id="e-1")
    assert r["connected"] is False
    expected.append(("vm_disconnected", {**r, "reason": "request"}))
    r = await a.ok("remove_vm", vm_id="e-1")
    expected.append(("vm_removed", r))

    # connect_vm of an unknown VM registers it first: vm_added, then vm_connected.
    r = await a.ok("connect_vm", vm_id="e-2", ram=512, cpu=1, disks=[disk("e-2-a")], password="pw-secret-e2")
    assert r == await a.ok("get_vm", vm_id="e-2")
    expected.append(("vm_added", {**r, "connected": False}))
    expected.append(("vm_connected", r))
    r = await a.ok("disconnect_vm", vm_id="e-2")
    expected.append(("vm_disconnected", {**r, "reason": "request"}))

    # Wrong passwords: auth_failed with the record, the command that failed and a count. The
    # first at once; the next ones (within the interval) are counted, and announced as one
    # when the interval ends, or, as here, just before the VM is removed.
    r = await a.ok("add_vm", vm_id="e-3", ram=256, cpu=1, disks=[], password="pw-secret-e3")
    expected.append(("vm_added", r))
    assert await a.error("connect_vm", vm_id="e-3", password="pw-wrong-1") == "auth_failed"
    expected.append(("auth_failed", {**await a.ok("get_vm", vm_id="e-3"), "command": "connect_vm", "count": 1}))
    r = await a.ok("connect_vm", vm_id="e-3", password="pw-secret-e3")
    expected.append(("vm_connected", r))
    assert await a.error("authorize_vm", vm_id="e-3", password="pw-wrong-2") == "auth_failed"
    r = await a.ok("disconnect_vm", vm_id="e-3")
    expected.append(("vm_disconnected", {**r, "reason": "request"}))
    assert await a.error("remove_vm", vm_id="e-3", password="pw-wrong-3") == "auth_failed"
    expected.append(("auth_failed", {**await a.ok("get_vm", vm_id="e-3"), "command": "remove_vm", "count": 2}))
    r = await a.ok("remove_vm", vm_id="e-3", password="pw-secret-e3")
    expected.append(("vm_removed", r))

    events, raw = await events_until_reply(w, "end")
    assert [(e["event"], e["data"]) for e in events] == expected
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    for line in raw:
        for secret in (b"pw-secret", b"pw-wrong", b"password", b"scrypt", b"hash"):
            assert secret not in line, line


async def test_missing_password_is_an_auth_failed_event(server, connect):
    """protocol.md: auth_failed is "a wrong or missing password for it"; the first of a burst
    at once, the others of the interval together when it ends."""
    server.inventory.auth_failed_interval = 0.3
    w, a = await connect(), await connect()
    await a.ok("add_vm", vm_id="mp-1", ram=1, cpu=1, disks=[], password="pw-secret-mp")
    await w.ok("subscribe", events=["auth_failed"])
    record = await a.ok("get_vm", vm_id="mp-1")
    assert await a.error("connect_vm", vm_id="mp-1") == "auth_failed"
    assert await a.error("remove_vm", vm_id="mp-1") == "auth_failed"
    events, _ = await events_until_reply(w)
    assert [(e["event"], e["data"]) for e in events] == [("auth_failed", {**record, "command": "connect_vm", "count": 1})]
    later = check_event(json.loads(await w.recv_line()))  # when the interval ends
    assert (later["event"], later["data"]) == ("auth_failed", {**record, "command": "remove_vm", "count": 1})
    rows = await history(a, event="auth_failed")
    assert [(r["vm_id"], r["command"], r["peer"], r["count"]) for r in rows] == [
        ("mp-1", "remove_vm", peer_of(a), 1), ("mp-1", "connect_vm", peer_of(a), 1)]


# --- 2. filters, resubscribing, unsubscribing ---------------------------------------------


async def test_subscribe_filters_by_event_name_and_by_vm(server, connect):
    by_name, by_vm, never, a = await connect(), await connect(), await connect(), await connect()
    assert await by_name.ok("subscribe", events=["vm_connected", "vm_connected"]) == \
        {"events": ["vm_connected"], "vm_id": None}
    sub = await by_vm.ok("subscribe", vm_id="f-x")
    assert sorted(sub["events"]) == sorted(ALL_EVENTS) and sub["vm_id"] == "f-x"

    await a.ok("add_vm", **vm_args("f-x", "f-x-d"))
    await a.ok("add_vm", **vm_args("f-y", "f-y-d"))
    await a.ok("connect_vm", vm_id="f-y")
    await a.ok("connect_vm", vm_id="f-x")
    await a.ok("authorize_vm", vm_id="f-x")
    await a.ok("disconnect_vm", vm_id="f-x")
    await a.ok("disconnect_vm", vm_id="f-y")

    events, _ = await events_until_reply(by_name)
    assert brief(events) == [("vm_connected", "f-y"), ("vm_connected", "f-x")]
    events, _ = await events_until_reply(by_vm)
    assert brief(events) == [("vm_added", "f-x"), ("vm_connected", "f-x"), ("vm_authorized", "f-x"),
                             ("vm_disconnected", "f-x")]
    # A session that never subscribed sees no events at all.
    await next_line_is_reply(never, "mine")
    assert await never.ok("get_vm", vm_id="f-x") == await a.ok("get_vm", vm_id="f-x")


async def test_subscribing_again_replaces_the_filter(server, connect):
    w, a = await connect(), await connect()
    assert await w.ok("subscribe", events=["vm_added"]) == {"events": ["vm_added"], "vm_id": None}
    await a.ok("add_vm", **vm_args("r-1"))
    events, _ = await events_until_reply(w, "first")
    assert brief(events) == [("vm_added", "r-1")]  # the first subscription works, and is now idle

    assert await w.ok("subscribe", events=["vm_connected", "vm_disconnected"], vm_id="r-1") == \
        {"events": ["vm_connected", "vm_disconnected"], "vm_id": "r-1"}
    await a.ok("add_vm", **vm_args("r-2"))  # vm_added: no longer wanted
    await a.ok("connect_vm", vm_id="r-2")  # another VM
    await a.ok("connect_vm", vm_id="r-1")
    await a.ok("authorize_vm", vm_id="r-1")  # not in the names
    await a.ok("disconnect_vm", vm_id="r-1")
    events, _ = await events_until_reply(w, "second")
    assert brief(events) == [("vm_connected", "r-1"), ("vm_disconnected", "r-1")]
    assert events[1]["data"]["reason"] == "request"


async def test_unsubscribe_stops_events_and_subscribe_restarts_them(server, connect):
    w, a = await connect(), await connect()
    await w.ok("subscribe")
    await a.ok("add_vm", **vm_args("u-1"))
    events, _ = await events_until_reply(w)
    assert brief(events) == [("vm_added", "u-1")]
    assert await w.ok("unsubscribe") == "OK"
    await a.ok("connect_vm", vm_id="u-1")
    await a.ok("authorize_vm", vm_id="u-1")
    await a.ok("disconnect_vm", vm_id="u-1")
    await next_line_is_reply(w, "after-unsubscribe")
    await asyncio.sleep(0.1)
    await next_line_is_reply(w, "still-nothing")
    assert await w.ok("unsubscribe") == "OK"  # unsubscribing twice is fine
    await w.ok("subscribe", events=["vm_added"])
    await a.ok("add_vm", **vm_args("u-2"))
    events, _ = await events_until_reply(w)
    assert brief(events) == [("vm_added", "u-2")]


async def test_subscribe_arguments_are_checked(server, connect):
    w, a = await connect(), await connect()
    reply = await w.call("subscribe", events=["vm_added", "vm_bogus"])
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_args"
    assert "events[1]" in reply["error"]["message"], reply
    reply = await w.call("subscribe", events=[])
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_args"
    assert "events" in reply["error"]["message"], reply
    assert await w.error("subscribe", events="vm_added") == "invalid_args"
    assert await w.error("subscribe", events=[1]) == "invalid_args"
    assert await w.error("subscribe", vm_id="bad id!") == "invalid_args"
    assert await w.error("subscribe", color="blue") == "invalid_args"
    assert await w.error("unsubscribe", events=["vm_added"]) == "invalid_args"
    # None of the failed subscribes subscribed the session.
    await a.ok("add_vm", **vm_args("s-1"))
    await next_line_is_reply(w, "nothing")


# --- 3. why a VM was disconnected -----------------------------------------------------------


async def test_disconnect_reason_session_closed(server, connect):
    w, a, b = await connect(), await connect(), await connect()
    await w.ok("subscribe", events=["vm_disconnected"])
    await a.ok("connect_vm", vm_id="sc-1", ram=1, cpu=1, disks=[])
    await a.ok("authorize_vm", vm_id="sc-1")
    a_peer = peer_of(a)
    await a.close()
    event = check_event(await w.recv())
    record = await b.ok("get_vm", vm_id="sc-1")
    assert record["connected"] is False and record["authorized"] is False
    assert event["event"] == "vm_disconnected" and event["data"] == {**record, "reason": "session_closed"}
    rows = await wait_history(b, lambda rs: rs and rs[0]["event"] == "vm_disconnected", vm_id="sc-1")
    assert {k: rows[0][k] for k in ("vm_id", "event", "peer", "reason")} == \
        {"vm_id": "sc-1", "event": "vm_disconnected", "peer": a_peer, "reason": "session_closed"}


async def test_disconnect_reason_timeout(tmp_path):
    async with serving(str(tmp_path / "idle.db"), idle_timeout=0.5) as srv:
        port = srv.address[1]
        w, a = await Wire.open(port), await Wire.open(port)
        await w.ok("subscribe", events=["vm_disconnected"])
        await a.ok("connect_vm", vm_id="to-1", ram=1, cpu=1, disks=[])
        a_peer = peer_of(a)
        seen: list[dict] = []
        end = time.monotonic() + 5.0
        n = 0
        while not seen and time.monotonic() < end:  # W keeps itself alive; A idles
            await asyncio.sleep(0.1)
            n += 1
            seen, _ = await events_until_reply(w, f"ping-{n}")
        assert brief(seen) == [("vm_disconnected", "to-1")]
        assert seen[0]["data"]["reason"] == "timeout"
        assert seen[0]["data"]["connected"] is False
        assert await a.recv_line() == b""  # closed without a message
        rows = await wait_history(w, lambda rs: rs and rs[0]["event"] == "vm_disconnected", vm_id="to-1")
        assert (rows[0]["event"], rows[0]["reason"], rows[0]["peer"]) == ("vm_disconnected", "timeout", a_peer)
        await w.close()
        await a.close()


async def test_disconnect_reason_shutdown_is_in_history(tmp_path):
    db = str(tmp_path / "shut.db")
    srv = await start_server(Config(host="127.0.0.1", port=0, db=db))
    try:
        w, a = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        await w.ok("subscribe")
        await a.ok("connect_vm", vm_id="sd-1", ram=1, cpu=1, disks=[])
        await a.ok("authorize_vm", vm_id="sd-1")
        a_peer = peer_of(a)
        events, _ = await events_until_reply(w)
        assert brief(events) == [("vm_added", "sd-1"), ("vm_connected", "sd-1"), ("vm_authorized", "sd-1")]
    finally:
        await srv.close()
        srv.inventory.close()
    # Every session gets a final shutdown event, then EOF.
    for session in (w, a):
        tail = await read_until(session, lambda m: m.get("event") == "shutdown")
        assert tail[-1][1]["data"] == {} and check_event(tail[-1][1])
        assert await session.recv_line() == b""
        await session.close()
    async with serving(db) as srv2:
        b = await Wire.open(srv2.address[1])
        assert (await b.ok("get_vm", vm_id="sd-1"))["connected"] is False
        rows = await history(b, vm_id="sd-1")
        assert [(r["event"], r.get("reason"), r["peer"]) for r in rows] == [
            ("vm_disconnected", "shutdown", a_peer), ("vm_authorized", None, a_peer),
            ("vm_connected", None, a_peer), ("vm_added", None, a_peer)]
        await b.close()


# --- 4. events never split a reply ----------------------------------------------------------


async def test_events_never_split_a_large_reply(tmp_path):
    db = str(tmp_path / "big.db")
    store = Store(db)
    store.write("seed", lambda c: [sql.insert_vm(c, f"big-{i}", 1024, 2, None,
                                                 [(f"big-{i}-a", 10), (f"big-{i}-b", 20)], SEED_TS)
                                   for i in range(3000)])
    store.close()
    async with serving(db) as srv:
        port = srv.address[1]
        w = await open_wire(port, rcvbuf=16384)
        a = await Wire.open(port)
        await w.ok("subscribe")
        await a.ok("connect_vm", vm_id="hot", ram=1, cpu=1, disks=[])
        events, _ = await events_until_reply(w)
        assert brief(events) == [("vm_added", "hot"), ("vm_connected", "hot")]

        produced: list[str] = []
        stop = asyncio.Event()

        async def churn() -> None:
            while not stop.is_set():
                for cmd, event in (("authorize_vm", "vm_authorized"), ("deauthorize_vm", "vm_deauthorized")):
                    await a.ok(cmd, vm_id="hot")
                    produced.append(event)

        churner = asyncio.create_task(churn())
        try:
            big = [f"big-{i}" for i in range(8)]
            for rid in big:  # ~8 MB of replies, pipelined: the server must wait for W mid-reply
                await w.send({"cmd": "get_all_vms", "id": rid})
            await w.send({"cmd": "get_all_disks", "id": "disks"})
            w.writer.transport.pause_reading()
            await asyncio.sleep(0.3)  # events pile up while a reply is stuck halfway
            w.writer.transport.resume_reading()
            lines = await read_until(w, lambda m: m.get("id") == "disks" and "event" not in m)
        finally:
            stop.set()
            await asyncio.wait_for(churner, TIMEOUT)
        await a.ok("disconnect_vm", vm_id="hot")
        produced.append("vm_disconnected")
        lines += await read_until(w, lambda m: m.get("event") == "vm_disconnected")

        replies = [m for _, m in lines if "event" not in m]
        assert [r["id"] for r in replies] == big + ["disks"]
        names = [f"big-{i}" for i in range(3000)] + ["hot"]
        for r in replies[:-1]:
            assert r["ok"] is True and [vm["vm_id"] for vm in r["result"]] == names
            assert all(len(vm["disks"]) == 2 for vm in r["result"][:3000])
        assert len(replies[-1]["result"]) == 6000
        events = [m for _, m in lines if "event" in m]
        assert len(produced) > 10 and events, "no events were produced while the replies were written"
        read, dropped = walk(produced, events, key=lambda m: m["event"])
        assert read + dropped == len(produced)
        await w.close()
        await a.close()


# --- 5. a subscriber that never reads ---------------------------------------------------------


async def test_a_subscriber_that_never_reads_loses_oldest_events(tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "EVENT_QUEUE_MAX", 1000)  # dropping starts sooner; the rule is the same
    db = str(tmp_path / "slow.db")
    k = 8  # VMs, each with 64 disks so that every event line is a few KB
    store = Store(db)
    store.write("seed", lambda c: [sql.insert_vm(c, f"sl-{v}", 1024, 2, None,
                                                 [(f"sl-{v}-{d}", 10 + d) for d in range(64)], SEED_TS)
                                   for v in range(k)])
    store.close()
    async with serving(db) as srv:
        port = srv.address[1]
        w = await open_wire(port, rcvbuf=8192)
        a, b = await Wire.open(port), await Wire.open(port)
        await w.ok("subscribe")
        w.writer.transport.pause_reading()  # W never reads again (until the end)
        produced: list[tuple[str, str]] = []
        for v in range(k):
            await a.ok("connect_vm", vm_id=f"sl-{v}")
            produced.append(("vm_connected", f"sl-{v}"))
        rounds = 3000
        started = time.monotonic()
        slowest = 0.0
        for i in range(rounds):
            vm = f"sl-{i % k}"
            for cmd, event in (("authorize_vm", "vm_authorized"), ("deauthorize_vm", "vm_deauthorized")):
                t0 = time.monotonic()
                reply = await a.call(cmd, vm_id=vm)
                slowest = max(slowest, time.monotonic() - t0)
                assert reply["ok"] is True, reply
                produced.append((event, vm))
            if i % 500 == 0:
                t0 = time.monotonic()
                assert await b.ok("health") == "OK" and time.monotonic() - t0 < 5.0
        await a.ok("disconnect_vm", vm_id="sl-0")
        produced.append(("vm_disconnected", "sl-0"))
        elapsed = time.monotonic() - started
        assert slowest < 5.0, f"a request took {slowest:.2f}s while a subscriber did not read"
        assert elapsed < 40.0, f"{2 * rounds} requests took {elapsed:.1f}s"
        assert (await b.ok("stats"))["connected"] == k - 1  # other sessions are fine

        w.writer.transport.resume_reading()
        lines = await read_until(w, lambda m: m.get("event") == "vm_disconnected")
        msgs = [m for _, m in lines]
        overflows = [i for i, m in enumerate(msgs) if m.get("event") == "overflow"]
        assert overflows, "no overflow line although events were dropped"
        after = msgs[overflows[-1] + 1:]
        assert 0 < len(after) <= server_module.EVENT_QUEUE_MAX
        assert brief(after) == produced[-len(after):]  # the newest ones survived
        read, dropped = walk(produced, msgs, key=lambda m: (m["event"], m["data"]["vm_id"]))
        assert read < len(produced) and dropped > 0 and read + dropped == len(produced)
        assert all(m["event"] != "overflow" or m["data"]["dropped"] > 0 for m in msgs)
        # W's session itself is fine: it is answered, and gets new events again.
        await a.ok("connect_vm", vm_id="sl-0")
        events, _ = await events_until_reply(w, "late")
        assert brief(events) == [("vm_connected", "sl-0")]
        for s in (w, a, b):
            await s.close()


# --- 6. history -------------------------------------------------------------------------------


async def test_history_records_who_did_what_newest_first(server, connect):
    a, b = await connect(), await connect()
    pa, pb = peer_of(a), peer_of(b)
    await a.ok("add_vm", **vm_args("h-1", "h-1-d"))
    await a.ok("connect_vm", vm_id="h-1")
    await a.ok("authorize_vm", vm_id="h-1")
    await a.ok("update_vm", vm_id="h-1", ram=2048)
    await a.ok("deauthorize_vm", vm_id="h-1")
    await a.ok("disconnect_vm", vm_id="h-1")
    await b.ok("add_vm", vm_id="h-2", ram=1, cpu=1, disks=[], password="pw-h2")
    assert await b.error("connect_vm", vm_id="h-2", password="wrong") == "auth_failed"
    await b.ok("connect_vm", vm_id="h-2", password="pw-h2")
    await b.close()
    await a.ok("remove_vm", vm_id="h-1")
    rows = await wait_history(a, lambda rs: len(rs) >= 11)
    expected = [  # newest first
        ("h-1", "vm_removed", pa, {}),
        ("h-2", "vm_disconnected", pb, {"reason": "session_closed"}),
        ("h-2", "vm_connected", pb, {}),
        ("h-2", "auth_failed", pb, {"command": "connect_vm"}),
        ("h-2", "vm_added", pb, {}),
        ("h-1", "vm_disconnected", pa, {"reason": "request"}),
        ("h-1", "vm_deauthorized", pa, {}),
        ("h-1", "vm_updated", pa, {}),
        ("h-1", "vm_authorized", pa, {}),
        ("h-1", "vm_connected", pa, {}),
        ("h-1", "vm_added", pa, {}),
    ]
    # The session_closed row is written when B's session ends, which may come after remove_vm.
    assert sorted(map(repr, [(r["vm_id"], r["event"], r["peer"], {k: r[k] for k in ("reason", "command") if k in r})
                             for r in rows])) == sorted(map(repr, expected))
    without_close = [r for r in rows if not (r["event"] == "vm_disconnected" and r["vm_id"] == "h-2")]
    assert [(r["vm_id"], r["event"], r["peer"]) for r in without_close] == \
        [(v, e, p) for v, e, p, _ in expected if not (e == "vm_disconnected" and v == "h-2")]
    for r in rows:
        extra = {"vm_disconnected": {"reason"}, "auth_failed": {"command", "count"}}.get(r["event"], set())
        assert set(r) == {"id", "ts", "vm_id", "event", "peer"} | extra, r
        assert TS.fullmatch(r["ts"]) and type(r["id"]) is int
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    by_id = sorted(rows, key=lambda r: r["id"])
    assert [r["ts"] for r in by_id] == sorted(r["ts"] for r in by_id)

    # Filters.
    assert await history(a, vm_id="h-1") == [r for r in rows if r["vm_id"] == "h-1"]  # removed, history stays
    assert await history(a, vm_id="nope") == []
    assert [r["vm_id"] for r in await history(a, event="vm_connected")] == ["h-2", "h-1"]  # ever connected
    assert await history(a, event="auth_failed", vm_id="h-2") == [r for r in rows if r["event"] == "auth_failed"]
    assert await history(a, event="vm_added", vm_id="h-1") == [rows[-1]]
    assert await history(a, limit=1) == rows[:1]
    assert await history(a, limit=10000) == rows
    assert await history(a, before=rows[2]["id"]) == rows[3:]
    assert await history(a, before=rows[2]["id"], limit=3) == rows[3:6]


async def test_history_since_before_and_limit(server, connect):
    a = await connect()
    for i in range(4):
        await a.ok("connect_vm", vm_id=f"p-{i}", ram=1, cpu=1, disks=[])
        await asyncio.sleep(0.003)
        await a.ok("disconnect_vm", vm_id=f"p-{i}")
        await asyncio.sleep(0.003)
    rows = await history(a, limit=10000)
    assert len(rows) == 12

    # since: at or after the given time; short forms accepted and read as UTC.
    assert await history(a, since="2999-01-01T00:00:00Z") == []
    assert await history(a, since="2000-01-01") == rows
    middle = rows[5]["ts"]
    assert await history(a, since=middle) == [r for r in rows if r["ts"] >= middle]
    assert await history(a, since=middle[:19] + "Z") == \
        [r for r in rows if r["ts"] >= middle[:19] + ".000Z"]
    assert await history(a, since="2026-11-26") == [r for r in rows if r["ts"] >= "2026-11-26T00:00:00.000Z"]
    assert await history(a, since="2026-11-26T21:00Z") == [r for r in rows if r["ts"] >= "2026-11-26T21:00:00.000Z"]
    for bad in ("yesterday", "2026-11-26T21:00:00+01:00", "2026-11-26 21:00:00", 20261126, ""):
        assert await a.error("get_history", since=bad) == "invalid_args", bad

    # before: paging back in pages of 2 gives exactly the one big answer.
    pages, before = [], None
    while True:
        page = await history(a, limit=2, **({} if before is None else {"before": before}))
        assert len(page) <= 2
        pages += page
        if len(page) < 2:
            break
        before = page[-1]["id"]
    assert pages == rows
    assert await history(a, before=rows[-1]["id"]) == []
    assert await history(a, before=0) == []

    # limit: 1 to 10000, default 100.
    assert await history(a, limit=1) == rows[:1]
    for bad in (0, 10001, -1, "5", True, 2.0):
        assert await a.error("get_history", limit=bad) == "invalid_args", bad
    assert await a.error("get_history", before=-1) == "invalid_args"
    assert await a.error("get_history", event="vm_bogus") == "invalid_args"
    assert await a.error("get_history", vm_id="bad id!") == "invalid_args"
    assert await a.error("get_history", color="blue") == "invalid_args"


async def test_history_since_must_be_a_real_time(server, connect):
    """A 13th month or a 25th hour is no ISO-8601 time: invalid_args, like any other malformed since."""
    a = await connect()
    for bad in ("2026-13-01", "2026-00-10", "2026-11-31", "2026-11-26T25:00Z", "2026-11-26T21:61Z",
                "2026-11-26T21:00:99Z"):
        reply = await a.call("get_history", since=bad)
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_args", (bad, reply)


async def test_failed_requests_leave_no_history(server, connect):
    a, b = await connect(), await connect()
    await a.ok("connect_vm", vm_id="nf-1", ram=1, cpu=1, disks=[disk("nf-1-d")])
    before = await history(a, limit=10000)
    assert await a.error("add_vm", **vm_args("nf-1")) == "already_exists"
    assert await a.error("add_vm", **vm_args("nf-2", "nf-1-d")) == "conflict"
    assert await b.error("connect_vm", vm_id="nf-1") == "conflict"
    assert await b.error("authorize_vm", vm_id="nf-1") == "not_connected"
    assert await a.error("update_vm", vm_id="nf-1", ram=2) == "not_authorized"
    assert await a.error("remove_vm", vm_id="nf-1") == "conflict"
    assert await b.error("disconnect_vm", vm_id="nf-1") == "not_connected"
    assert await history(a, limit=10000) == before


async def test_history_default_limit_is_100(server, connect):
    a = await connect()
    await a.ok("connect_vm", vm_id="many", ram=1, cpu=1, disks=[])
    for _ in range(60):
        await a.ok("authorize_vm", vm_id="many")
        await a.ok("deauthorize_vm", vm_id="many")
    rows = await history(a, limit=10000)
    assert len(rows) == 2 + 120
    assert await history(a) == rows[:100]


async def test_history_survives_a_restart(tmp_path):
    db = str(tmp_path / "restart.db")
    async with serving(db) as srv:
        a = await Wire.open(srv.address[1])
        await a.ok("add_vm", vm_id="rs-1", ram=1, cpu=1, disks=[], password="pw-rs")
        await a.ok("connect_vm", vm_id="rs-1", password="pw-rs")
        await a.ok("authorize_vm", vm_id="rs-1", password="pw-rs")
        await a.ok("disconnect_vm", vm_id="rs-1")
        await a.ok("connect_vm", vm_id="rs-2", ram=1, cpu=1, disks=[])
        await a.ok("disconnect_vm", vm_id="rs-2")
        await a.ok("remove_vm", vm_id="rs-2")
        before = await history(a, limit=10000)
        assert len(before) == 8
        await a.close()
    async with serving(db) as srv:
        b = await Wire.open(srv.address[1])
        assert await history(b, limit=10000) == before
        assert await b.error("get_vm", vm_id="rs-2") == "not_found"
        assert [r["event"] for r in await history(b, vm_id="rs-2")] == \
            ["vm_removed", "vm_disconnected", "vm_connected", "vm_added"]
        assert sorted(r["vm_id"] for r in await history(b, event="vm_connected")) == ["rs-1", "rs-2"]
        await b.close()
    with sqlite3.connect(db) as conn:  # what the server handed out is what is on disk
        stored = conn.execute("SELECT id, ts, vm_id, event, peer FROM history ORDER BY id DESC").fetchall()
    conn.close()
    assert stored == [(r["id"], r["ts"], r["vm_id"], r["event"], r["peer"]) for r in before]


def _seed_history(db: str, rows: list[tuple[str, str, str]]) -> None:
    Store(db).close()  # creates the schema
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.executemany("INSERT INTO history (ts, vm_id, event, peer, reason) VALUES (?, ?, ?, '127.0.0.1:1', NULL)",
                             rows)
    finally:
        conn.close()


def _iso(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - seconds_ago))


async def test_history_older_than_history_days_is_pruned_at_start(tmp_path):
    db = str(tmp_path / "prune.db")
    _seed_history(db, [("2000-01-01T00:00:00.000Z", "ancient", "vm_added"),
                       (_iso(2 * 86400), "two-days", "vm_added"),
                       (_iso(60), "recent", "vm_added")])
    async with serving(db, history_days=1) as srv:
        a = await Wire.open(srv.address[1])
        rows = await wait_history(a, lambda rs: len(rs) < 3, timeout=5.0)
        assert [r["vm_id"] for r in rows] == ["recent"]
        assert await history(a, vm_id="ancient") == []
        await a.close()


async def test_history_days_zero_keeps_everything(tmp_path):
    db = str(tmp_path / "keep.db")
    recent = _iso(60)
    _seed_history(db, [("2000-01-01T00:00:00.000Z", "ancient", "vm_added"), (recent, "recent", "vm_added")])
    async with serving(db, history_days=0) as srv:
        a = await Wire.open(srv.address[1])
        await asyncio.sleep(0.3)
        rows = await history(a)
        assert [(r["vm_id"], r["ts"]) for r in rows] == [("recent", recent), ("ancient", "2000-01-01T00:00:00.000Z")]
        assert await history(a, since="2000-01-01") == rows
        assert await history(a, since="2001-01-01") == rows[:1]
        await a.close()


async def test_a_listening_subscriber_is_not_idle(db):
    """The idle timeout spares a session that is subscribed: listening for hours is its job."""
    async with running(db, idle_timeout=0.3) as srv:
        listener, idler = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        await listener.ok("subscribe", events=["vm_added"])
        assert await idler.at_eof()  # the plain idle session is closed after ~0.3 s
        await asyncio.sleep(0.5)
        actor = await Wire.open(srv.address[1])
        await actor.ok("add_vm", **vm_args("late"))
        event = json.loads(await listener.recv_line())
        assert event["event"] == "vm_added" and event["data"]["vm_id"] == "late"
        for w in (listener, idler, actor):
            await w.close()


@pytest.mark.sqlite_only  # shared presence (PostgreSQL) is written first: see test_cluster.py
async def test_presence_changes_after_the_writer_stopped_are_answered_as_made(db, caplog):
    """A presence change is made in memory first, then journaled. Once the writer takes no more
    rows (as at the very end of a shutdown), the change stays made and is answered as made; the
    missing row is logged. A session ending then still releases every VM it held."""
    async with running(db) as srv:
        a, b = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        for vm_id in ("late-1", "late-2", "late-3"):
            await a.ok("connect_vm", **vm_args(vm_id, f"{vm_id}-d"))
        await a.ok("authorize_vm", vm_id="late-1")
        srv.inventory.store.writer.close()
        assert (await a.ok("deauthorize_vm", vm_id="late-1"))["authorized"] is False
        assert (await a.ok("authorize_vm", vm_id="late-1"))["authorized"] is True
        assert (await a.ok("disconnect_vm", vm_id="late-1"))["connected"] is False
        assert {vm["vm_id"] for vm in await b.ok("get_connected_vms")} == {"late-2", "late-3"}
        await a.close()
        end = time.monotonic() + 5
        while await b.ok("get_connected_vms"):
            assert time.monotonic() < end, "the ended session's VMs were not all released"
            await asyncio.sleep(0.02)
        assert await b.ok("health") == "OK"
        await b.close()
    assert "history not recorded (1 rows: vm_deauthorized late-1)" in caplog.text
    assert re.search(r"history not recorded \(2 rows: vm_disconnected late-[23], vm_disconnected late-[23]\)", caplog.text)
    assert "Traceback" not in caplog.text
