"""Several servers on one PostgreSQL database, as one: real server processes (two or three) on
the suite's PostgreSQL, raw sockets. Every cross-server rule, and the faults: a server
SIGKILLed, SIGSTOPped past its lease, its connections terminated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from conftest import TIMEOUT, LimitedServer, Wire, vm_args
from vmserver.backends.pg_sandbox import Sandbox

TTL = 3.0  # the servers' lease: short, so that the faults play out in seconds
SOON = 1.0  # a change on one server is on every other within this long (the promise)


class Node:
    """One server process of the cluster (its log drained by a thread)."""

    def __init__(self, dsn: str, *args: str, ttl: float = TTL) -> None:
        self.server = LimitedServer(dsn, "--lease-ttl", str(ttl), *args)
        self.port = self.server.wait_listening()
        self.pid = self.server.proc.pid

    async def wire(self) -> Wire:
        return await Wire.open(self.port)

    @property
    def log(self) -> str:
        return self.server.log.decode(errors="replace")


@pytest.fixture
def nodes() -> Any:
    """A factory of servers, ``nodes(dsn, *args, ttl=...)``; every one killed at the end."""
    started: list[Node] = []

    def start(dsn: str, *args: str, ttl: float = TTL) -> Node:
        node = Node(dsn, *args, ttl=ttl)
        started.append(node)
        return node

    yield start
    for node in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGCONT)  # a stopped one too
        node.server.kill()


@pytest.fixture
def cluster(pg_dsn: str, nodes: Any) -> Any:
    """A factory of servers on one database of the suite's PostgreSQL."""
    return lambda *args: nodes(pg_dsn, *args)


@contextlib.asynccontextmanager
async def wires(*nodes: Node) -> AsyncIterator[list[Wire]]:
    opened = [await node.wire() for node in nodes]
    try:
        yield opened
    finally:
        for w in opened:
            await w.close()


async def until(check: Callable[[], Any], what: str, seconds: float = TIMEOUT) -> float:
    """Await ``check()`` (a coroutine function) until true; how long it took."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < seconds, f"{what}: not within {seconds:g}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def record(w: Wire, vm_id: str) -> dict:
    return await w.ok("get_vm", vm_id=vm_id)


async def events(w: Wire, n: int, seconds: float = TIMEOUT) -> list[dict]:
    """The next ``n`` event lines of a subscribed session."""
    out = []
    deadline = time.monotonic() + seconds
    while len(out) < n:
        line = await asyncio.wait_for(w.reader.readline(), max(0.01, deadline - time.monotonic()))
        assert line, f"closed after {len(out)} of {n} events"
        out.append(json.loads(line))
    return out


async def quiet(w: Wire, seconds: float = 0.5) -> list[dict]:
    """Event lines that arrive within ``seconds`` (none expected, usually)."""
    out = []
    with contextlib.suppress(asyncio.TimeoutError):
        while True:
            out.append(json.loads(await asyncio.wait_for(w.reader.readline(), seconds)))
    return out


def ids(evs: list[dict]) -> list[tuple[str, str, str | None]]:
    return [(e["event"], e["data"]["vm_id"], e["data"].get("reason")) for e in evs]


# --- identity -----------------------------------------------------------------------------------


async def test_each_server_has_an_id_in_its_log_greeting_and_stats(cluster):
    a, b = cluster(), cluster()
    async with wires(a, b) as (wa, wb):
        ida, idb = wa.greeting["hello"]["server_id"], wb.greeting["hello"]["server_id"]
        assert ida != idb and f"server id {ida}" in a.log and f"server id {idb}" in b.log
        assert (await wa.ok("stats"))["server_id"] == ida

        async def both_alive() -> bool:  # as of a's last renewal (every TTL/3)
            return sorted(s["server_id"] for s in (await wa.ok("stats"))["servers"]) == sorted([ida, idb])
        await until(both_alive, "a's stats name both servers", TTL)
        assert {s["pid"] for s in (await wb.ok("stats"))["servers"]} == {a.pid, b.pid}


# --- the same rules as one server ---------------------------------------------------------------


async def test_presence_and_records_reach_every_server_within_a_second(cluster):
    a, b, c = cluster(), cluster(), cluster()
    async with wires(a, b, c) as (wa, wb, wc):
        await wa.ok("add_vm", **vm_args("p1", "p1-d"), password="pw-p1-secret")
        await until(lambda: _known(wb, "p1"), "b knows p1")
        await wb.ok("connect_vm", vm_id="p1", password="pw-p1-secret")
        took = await until(lambda: _shows(wc, "p1", connected=True), "c sees p1 connected", SOON)
        await wb.ok("authorize_vm", vm_id="p1", password="pw-p1-secret")
        took = max(took, await until(lambda: _shows(wa, "p1", authorized=True), "a sees p1 authorized", SOON))
        await wb.ok("update_vm", vm_id="p1", ram=4096, disks=[{"disk_id": "p1-d", "size": 20}])
        took = max(took, await until(lambda: _shows(wc, "p1", ram=4096), "c sees p1's new ram", SOON))
        assert [d["size"] for d in (await record(wc, "p1"))["disks"]] == [20]
        connected = [vm["vm_id"] for vm in await wa.ok("get_connected_vms")]
        authorized = [vm["vm_id"] for vm in await wc.ok("get_authorized_vms")]
        assert connected == authorized == ["p1"]
        for w in (wa, wb, wc):  # every server answers the same record
            assert await record(w, "p1") == await record(wb, "p1")


async def _known(w: Wire, vm_id: str) -> bool:
    return (await w.call("get_vm", vm_id=vm_id))["ok"]


async def _shows(w: Wire, vm_id: str, **fields: Any) -> bool:
    reply = await w.call("get_vm", vm_id=vm_id)
    return reply["ok"] and all(reply["result"][k] == v for k, v in fields.items())


async def test_only_the_holding_session_on_its_server_may_act(cluster):
    a, b = cluster(), cluster()
    async with wires(a, b, b) as (wa, wb, wb2):
        await wa.ok("connect_vm", **vm_args("h1", "h1-d"))
        await until(lambda: _shows(wb, "h1", connected=True), "b sees h1 connected")
        assert await wb.error("connect_vm", vm_id="h1") == "conflict"
        assert await wb.error("authorize_vm", vm_id="h1") == "not_connected"
        assert await wb.error("disconnect_vm", vm_id="h1") == "not_connected"
        assert await wb.error("remove_vm", vm_id="h1") == "conflict"
        await wa.ok("authorize_vm", vm_id="h1")
        await until(lambda: _shows(wb, "h1", authorized=True), "b sees h1 authorized")
        assert await wb.error("update_vm", vm_id="h1", ram=1) == "not_authorized"
        assert await wb2.error("deauthorize_vm", vm_id="h1") == "not_authorized"
        await wa.ok("disconnect_vm", vm_id="h1")
        await until(lambda: _shows(wb, "h1", connected=False, authorized=False), "b sees h1 free")
        await wb.ok("connect_vm", vm_id="h1")  # free: anyone's now
        assert await wa.error("remove_vm", vm_id="h1") == "conflict"  # connected through b
        await wb.ok("disconnect_vm", vm_id="h1")
        await until(lambda: _shows(wa, "h1", connected=False), "a sees h1 free")
        await wa.ok("remove_vm", vm_id="h1")
        await until(lambda: _gone(wb, "h1"), "b forgets h1")


async def _gone(w: Wire, vm_id: str) -> bool:
    reply = await w.call("get_vm", vm_id=vm_id)
    return not reply["ok"] and reply["error"]["code"] == "not_found"


async def test_sessions_racing_on_three_servers_one_wins(cluster):
    """connect_vm of one known VM, connect_vm registering one new VM, add_vm of one name, and
    add_vm of one disk id, each sent at once from sessions on three servers: exactly one wins."""
    nodes = [cluster(), cluster(), cluster()]
    async with wires(*nodes, *nodes) as racers:
        await racers[0].ok("add_vm", **vm_args("known"))
        for w in racers:
            await until(lambda w=w: _known(w, "known"), "every server knows the VM")

        async def race(make: Callable[[int], tuple[str, dict]]) -> list[dict]:
            for i, w in enumerate(racers):
                cmd, args = make(i)
                await w.send({"cmd": cmd, "args": args})
            return [await w.recv() for w in racers]

        for round_, (make, loser) in enumerate([
            (lambda i: ("connect_vm", {"vm_id": "known"}), "conflict"),
            (lambda i: ("connect_vm", vm_args("fresh", f"fresh-{i}")), "conflict"),
            (lambda i: ("add_vm", vm_args("named", f"named-{i}")), "already_exists"),
            (lambda i: ("add_vm", vm_args(f"disk-owner-{i}", "one-disk")), "conflict"),
        ]):
            replies = await race(make)
            winners = [r for r in replies if r["ok"]]
            assert len(winners) == 1, (round_, replies)
            assert {r["error"]["code"] for r in replies if not r["ok"]} == {loser}, (round_, replies)


async def test_subscribers_on_every_server_see_one_order(cluster):
    """Writers on three servers at once; a subscriber on each server hears every event once, all
    in the same order, and a subscriber that comes later hears the rest in that order too."""
    nodes = [cluster(), cluster(), cluster()]
    async with wires(*nodes) as subs, wires(*nodes) as writers:
        for s in subs:
            await s.ok("subscribe")
        per_writer = 8

        async def work(i: int, w: Wire) -> None:
            for k in range(per_writer):
                vm_id = f"o{i}-{k}"
                await w.ok("connect_vm", **vm_args(vm_id, f"{vm_id}-d"))
                await w.ok("authorize_vm", vm_id=vm_id)
                await w.ok("disconnect_vm", vm_id=vm_id)

        await asyncio.gather(*(work(i, w) for i, w in enumerate(writers)))
        total = len(writers) * per_writer * 4  # added, connected, authorized, disconnected
        seen = [await events(s, total) for s in subs]
        assert ids(seen[0]) == ids(seen[1]) == ids(seen[2])
        assert len(set(ids(seen[0]))) == total  # no duplicates (each event names its VM and kind once)
        for s in subs:
            assert await quiet(s, 0.3) == []
        # Each VM's own events in the order they happened.
        for i in range(len(writers)):
            for k in range(per_writer):
                mine = [e for e, vm, _ in ids(seen[0]) if vm == f"o{i}-{k}"]
                assert mine == ["vm_added", "vm_connected", "vm_authorized", "vm_disconnected"]
        assert [e["data"] for e in seen[0]] == [e["data"] for e in seen[2]]  # the same records too


async def test_history_is_one_and_password_failures_count_across_servers(cluster):
    a, b, c = cluster(), cluster(), cluster()
    async with wires(a, b, c) as (wa, wb, wc):
        await wa.ok("add_vm", **vm_args("g1"), password="pw-g1-secret")
        await until(lambda: _known(wc, "g1"), "c knows g1")
        # Five wrong passwords spread over a and b (five are allowed in a row on one server):
        # the sixth, through c, is slowed down too.
        for w in (wa, wb, wa, wb, wa):
            assert await w.error("connect_vm", vm_id="g1", password="wrong-guess") == "auth_failed"
        reply = await wb.call("connect_vm", vm_id="g1", password="wrong-guess")
        assert reply["error"]["code"] == "auth_failed"

        async def slowed() -> bool:
            reply = await wc.call("connect_vm", vm_id="g1", password="wrong-guess")
            return "too many failed password attempts" in reply["error"]["message"]
        await until(slowed, "c slows down guesses made through a and b", 15)
        await wb.ok("add_vm", **vm_args("g2"))
        await until(lambda: _history_has(wc, "g2", "vm_added"), "c's history has b's write")
        hist_a = await wa.ok("get_history", limit=100)
        hist_c = await wc.ok("get_history", limit=100)
        assert hist_a == hist_c
        assert [h["event"] for h in reversed(hist_a) if h["vm_id"] == "g1"][0] == "vm_added"
        assert any(h["event"] == "auth_failed" for h in hist_a)


async def _history_has(w: Wire, vm_id: str, event: str) -> bool:
    return any(h["event"] == event for h in await w.ok("get_history", vm_id=vm_id))


# --- faults -------------------------------------------------------------------------------------


async def test_a_killed_servers_vms_are_released_once_each_and_can_be_connected_elsewhere(cluster):
    a, b = cluster(), cluster()
    async with wires(b) as (sub,), wires(b) as (wb,):
        await sub.ok("subscribe", events=["vm_disconnected"])
        wa = await a.wire()
        held = [f"k{n}" for n in range(5)]
        for vm_id in held:
            await wa.ok("connect_vm", **vm_args(vm_id, f"{vm_id}-d"))
        await wa.ok("authorize_vm", vm_id="k0")
        for vm_id in held:
            await until(lambda vm_id=vm_id: _shows(wb, vm_id, connected=True), "b sees a's VMs")
        killed = time.monotonic()
        os.kill(a.pid, signal.SIGKILL)
        got = await events(sub, len(held), TTL + 10)
        released = time.monotonic() - killed
        assert sorted(ids(got)) == sorted(("vm_disconnected", vm_id, "server_lost") for vm_id in held)
        assert all(not e["data"]["connected"] and not e["data"]["authorized"] for e in got)
        assert released < TTL + 5, f"released {released:.1f}s after the kill (lease {TTL:g}s)"
        assert await quiet(sub, TTL / 3 + 1) == []  # exactly one event per VM: no second reaper
        for vm_id in held:
            await wb.ok("connect_vm", vm_id=vm_id)
        history = await wb.ok("get_history", vm_id="k0", event="vm_disconnected")
        assert [h["reason"] for h in history] == ["server_lost"]
        await wa.close()


async def test_a_server_paused_past_its_lease_changes_nothing_when_it_wakes(cluster):
    """SIGSTOP past the TTL: its VM is released and connected through another server; after
    SIGCONT its old session is closed (or refused) and changes nothing, and it serves again."""
    a, b = cluster(), cluster()
    async with wires(b) as (wb,), wires(b) as (sub,):
        wa = await a.wire()
        await wa.ok("connect_vm", **vm_args("s1", "s1-d"))
        await wa.ok("authorize_vm", vm_id="s1")
        await until(lambda: _shows(wb, "s1", authorized=True), "b sees s1 authorized")
        await sub.ok("subscribe", vm_id="s1")
        os.kill(a.pid, signal.SIGSTOP)
        try:
            got = await events(sub, 1, TTL + 10)
            assert ids(got) == [("vm_disconnected", "s1", "server_lost")]
            await wb.ok("connect_vm", vm_id="s1")
            await wb.ok("authorize_vm", vm_id="s1")
        finally:
            os.kill(a.pid, signal.SIGCONT)
        # The old session's requests change nothing: it is closed, or refused.
        await wa.send({"cmd": "update_vm", "args": {"vm_id": "s1", "ram": 1}})
        await wa.send({"cmd": "disconnect_vm", "args": {"vm_id": "s1"}})
        lines = []
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            while line := await asyncio.wait_for(wa.reader.readline(), TIMEOUT):
                lines.append(json.loads(line))
        assert not any(m.get("ok") for m in lines), lines
        await wa.close()
        record_b = await record(wb, "s1")
        assert record_b["connected"] and record_b["authorized"] and record_b["ram"] == 1024
        events_after = ids(await quiet(sub, 1.0))
        assert ("vm_updated", "s1", None) not in events_after
        assert ("vm_disconnected", "s1", "request") not in events_after
        await until(lambda: _serves(a), "a serves new sessions again", TTL + 10)
        async with wires(a) as (wa2,):
            await until(lambda: _shows(wa2, "s1", connected=True, authorized=True), "a sees s1 held through b")
            assert await wa2.error("connect_vm", vm_id="s1") == "conflict"
    assert "gives up lease" in a.log


async def _serves(node: Node) -> bool:
    try:
        w = await node.wire()
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        return "hello" in w.greeting and (await w.call("health"))["ok"]
    except (OSError, ValueError, asyncio.TimeoutError, AssertionError):
        return False
    finally:
        await w.close()


async def test_terminated_lease_and_listener_connections_recover_without_a_gap(cluster, pg_sandbox: Sandbox,
                                                                              pg_dsn: str):
    a, b = cluster(), cluster()
    dbname = pg_dsn.rsplit("/", 1)[1]
    async with wires(a) as (sub,), wires(b) as (wb,):
        await sub.ok("subscribe", events=["vm_added"])
        for n in range(3):
            await wb.ok("add_vm", **vm_args(f"t{n}"))
        killed = pg_sandbox.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid() AND application_name = 'vmserver pid {a.pid}'",
            db=dbname).split()
        assert int(killed[0]) >= 2  # at least its lease and its listener
        for n in range(3, 6):
            await wb.ok("add_vm", **vm_args(f"t{n}"))
        got = await events(sub, 6, TIMEOUT)
        assert [vm for _, vm, _ in ids(got)] == [f"t{n}" for n in range(6)]
        assert await quiet(sub, 0.5) == []
        await until(lambda: _added_through(a, "t-a"), "a writes again")


async def _added_through(node: Node, vm_id: str) -> bool:
    async with wires(node) as (w,):
        reply = await w.call("add_vm", **vm_args(vm_id))
        return reply["ok"] or reply["error"]["code"] == "already_exists"


async def test_no_vm_is_ever_held_by_two_sessions(cluster, pg_dsn: str):
    """A randomized run over three servers (connects, disconnects, sessions hanging up, one
    server killed): replaying the history, no VM ever had two holders at once."""
    rng = random.Random(12)
    nodes = [cluster(), cluster(), cluster()]
    names = [f"r{n}" for n in range(6)]
    async with wires(nodes[0]) as (setup,):
        for vm_id in names:
            await setup.ok("add_vm", **vm_args(vm_id))
    sessions: list[Wire | None] = [await nodes[i % 3].wire() for i in range(9)]
    deadline = time.monotonic() + 8
    killed = False
    while time.monotonic() < deadline:
        i = rng.randrange(len(sessions))
        if sessions[i] is None:
            if killed and i % 3 == 2:
                continue
            sessions[i] = await nodes[i % 3].wire()
        w = sessions[i]
        assert w is not None
        action = rng.random()
        try:
            if action < 0.5:
                await w.call("connect_vm", vm_id=rng.choice(names))
            elif action < 0.8:
                await w.call("disconnect_vm", vm_id=rng.choice(names))
            else:
                await w.close()
                sessions[i] = None
        except (ConnectionError, asyncio.TimeoutError, json.JSONDecodeError, AssertionError):
            sessions[i] = None
        if not killed and time.monotonic() > deadline - 5:
            killed = True
            os.kill(nodes[2].pid, signal.SIGKILL)
            sessions = [None if s is not None and k % 3 == 2 else s for k, s in enumerate(sessions)]
    for w in sessions:
        if w is not None:
            await w.close()
    async with wires(nodes[0]) as (w,):
        await until(lambda: _none_connected(w), "every VM released", TTL + 10)
        history = await w.ok("get_history", limit=10000)
    holder: dict[str, str | None] = {vm_id: None for vm_id in names}
    for h in reversed(history):
        if h["event"] == "vm_connected":
            held = holder[h["vm_id"]]
            assert held is None, f"{h['vm_id']} connected by {h['peer']} while held by {held}"
            holder[h["vm_id"]] = h["peer"]
        elif h["event"] == "vm_disconnected":
            assert holder[h["vm_id"]] is not None, f"{h['vm_id']} disconnected while free: {h}"
            holder[h["vm_id"]] = None
    assert all(v is None for v in holder.values())


async def _none_connected(w: Wire) -> bool:
    return await w.ok("get_connected_vms") == []


async def test_postgresql_restarted_within_the_lease_changes_nothing_but_a_few_refusals(nodes, own_pg: Sandbox):
    """A restart shorter than the lease: the sessions stay, VMs stay connected, refusals meanwhile
    are internal, subscribers hear every event after it, with no gap."""
    dsn = own_pg.create_database("inv")
    a, b = nodes(dsn, ttl=8), nodes(dsn, ttl=8)
    async with wires(a, b) as (wa, wb), wires(b) as (sub,):
        await wa.ok("connect_vm", **vm_args("rs1", "rs1-d"))
        await until(lambda: _shows(wb, "rs1", connected=True), "b sees rs1 connected")
        await sub.ok("subscribe", events=["vm_added", "vm_disconnected"])
        await asyncio.to_thread(own_pg.restart)
        for w, name in ((wa, "after-a"), (wb, "after-b")):
            start = time.monotonic()
            while not (reply := await w.call("add_vm", **vm_args(name)))["ok"]:
                assert reply["error"]["code"] == "internal", reply
                assert time.monotonic() - start < 20, "writes did not come back"
                await asyncio.sleep(0.1)
        got = await events(sub, 2)
        assert sorted(vm for _, vm, _ in ids(got)) == ["after-a", "after-b"]  # no disconnect: nothing was lost
        assert (await record(wb, "rs1"))["connected"] and (await wa.ok("disconnect_vm", vm_id="rs1"))
        assert ids(await events(sub, 1)) == [("vm_disconnected", "rs1", "request")]
    assert "gives up lease" not in a.log + b.log


async def test_postgresql_down_longer_than_the_lease_every_server_drops_its_sessions_then_serves(
        nodes, own_pg: Sandbox):
    """Down longer than the lease: every server closes its sessions before its lease expires,
    and once PostgreSQL is back each takes a new lease, the old ones are reaped (server_lost), and
    clients that reconnect connect their VMs again."""
    dsn = own_pg.create_database("inv")
    a, b = nodes(dsn), nodes(dsn)
    async with wires(a) as (wa,), wires(b) as (wb,):
        await wa.ok("connect_vm", **vm_args("rl1", "rl1-d"))
        await wb.ok("connect_vm", **vm_args("rl2", "rl2-d"))
        await asyncio.to_thread(own_pg.stop)
        try:
            for w in (wa, wb):  # closed, with a shutdown line first
                lines = []
                while line := await asyncio.wait_for(w.reader.readline(), TTL + 5):
                    lines.append(json.loads(line))
                assert [m.get("event") for m in lines[-1:]] == ["shutdown"], lines
        finally:
            await asyncio.sleep(TTL)  # past every lease
            await asyncio.to_thread(own_pg.start)
    for node in (a, b):
        await until(lambda node=node: _serves(node), "serving again", 30)
    async with wires(a, b) as (wa, wb):
        for vm_id in ("rl1", "rl2"):
            await until(lambda vm_id=vm_id: _shows(wa, vm_id, connected=False), f"{vm_id} released", TTL + 10)
            history = await wa.ok("get_history", vm_id=vm_id, event="vm_disconnected")
            assert [h["reason"] for h in history] == ["server_lost"]
        for w, vm_id in ((wb, "rl1"), (wa, "rl2")):  # internal while a server's writer reconnects
            await until(lambda w=w, vm_id=vm_id: _connects(w, vm_id), f"{vm_id} connected again")
    assert "gives up lease" in a.log and "gives up lease" in b.log


async def _connects(w: Wire, vm_id: str) -> bool:
    reply = await w.call("connect_vm", vm_id=vm_id)
    assert reply["ok"] or reply["error"]["code"] == "internal", reply
    return reply["ok"]


async def test_an_agent_whose_server_dies_connects_its_vm_through_another(cluster):
    """The client library with several addresses: the agent's server is killed, it reconnects
    to the next address and connects its VM again, once the lost server's lease lets go of it."""
    import vmclient

    a, b = cluster(), cluster()
    client = vmclient.Client(hosts=[f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], timeout=5)
    await client.connect()
    try:
        assert client.address == f"127.0.0.1:{a.port}"
        spec = {"ram": 512, "cpu": 1, "disks": []}  # an agent always says what it is
        await client.connect_vm("ag1", **spec)
        os.kill(a.pid, signal.SIGKILL)
        with pytest.raises(vmclient.ConnectionLost):
            while True:  # until the loss is noticed
                await client.health()
                await asyncio.sleep(0.05)
        await client.connect()
        assert client.address == f"127.0.0.1:{b.port}"
        start = time.monotonic()
        while True:  # conflict until the lost server's lease expires and its VMs are released
            try:
                vm = await client.connect_vm("ag1", **spec)
                break
            except vmclient.CommandError as exc:
                assert exc.code == "conflict", exc
                assert time.monotonic() - start < TTL + 10
                await asyncio.sleep(0.2)
        assert vm["connected"] is True
    finally:
        await client.close()


async def test_a_presence_change_the_database_does_not_take_is_refused_and_changes_nothing(pg_dsn):
    """Shared presence is written first: with the writer stopped, authorize and disconnect are
    refused (internal) and the VM stays as it was (test_events.py has local presence's rule)."""
    from conftest import running

    async with running(pg_dsn) as srv:
        async with wires_to(srv.address[1], 2) as (w, other):
            await w.ok("connect_vm", **vm_args("pw1"))
            srv.inventory.store.writer.close()
            assert await w.error("authorize_vm", vm_id="pw1") == "internal"
            assert await w.error("disconnect_vm", vm_id="pw1") == "internal"
            assert (await other.ok("get_vm", vm_id="pw1"))["connected"] is True
            assert (await other.ok("get_vm", vm_id="pw1"))["authorized"] is False


@contextlib.asynccontextmanager
async def wires_to(port: int, n: int) -> AsyncIterator[list[Wire]]:
    opened = [await Wire.open(port) for _ in range(n)]
    try:
        yield opened
    finally:
        for w in opened:
            await w.close()


async def test_the_benchmarks_cluster_probes_measure_what_they_say(cluster):
    """Figure 14's probes on real servers: every update heard across servers, once; the kill
    timed until the last server_lost."""
    from benchmarks import cluster_figure

    a, b, victim = cluster(), cluster(), cluster()
    async with wires(a) as (w,):
        for vm_id in ("bp1", "bp2", "bp3"):
            await w.ok("add_vm", **vm_args(vm_id))
        for node in (b, victim):
            async with wires(node) as (wn,):
                await until(lambda wn=wn: _known(wn, "bp3"), "every server knows the VMs")
    lat = await asyncio.to_thread(cluster_figure.event_latency, a.port, b.port, "bp1", 5, TIMEOUT)
    assert [len(v) for v in lat.values()] == [5, 5, 5]
    assert all(after >= reply for after, reply in zip(lat["event_after_request"], lat["reply"]))
    took = await asyncio.to_thread(cluster_figure.release_after_kill, victim.pid, victim.port, b.port,
                                   ["bp2", "bp3"], TIMEOUT + TTL)
    assert TTL / 2 < took < TTL + 5  # not before the lease could expire (2/3 of it at least), nor long after


async def test_a_server_restarted_after_a_crash_releases_the_old_vms_at_once(nodes, pg_dsn: str):
    """Alone on its database, crashed and restarted after its old lease expired: the old
    session's VMs are released as it starts (reaped at once, not at its first renewal)."""
    ttl = 6.0
    first = nodes(pg_dsn, ttl=ttl)
    async with wires(first) as (w,):
        await w.ok("connect_vm", **vm_args("cr1"))
        os.kill(first.pid, signal.SIGKILL)
    await asyncio.sleep(ttl + 0.3)  # the old lease has expired; nobody was there to reap it
    second = nodes(pg_dsn, ttl=ttl)
    async with wires(second) as (w,):
        took = await until(lambda: _shows(w, "cr1", connected=False), "cr1 released", ttl)
        assert took < ttl / 3, f"released {took:.1f}s after the start: at the first renewal, not at once"
        history = await w.ok("get_history", vm_id="cr1", event="vm_disconnected")
        assert [h["reason"] for h in history] == ["server_lost"]


async def test_a_hung_postgresql_past_the_lease_every_server_drops_its_sessions_then_serves(
        nodes, own_pg: Sandbox):
    """PostgreSQL stopped (SIGSTOP: its sockets stay open and answer keepalives, no statement
    ever times out) for longer than the lease: each server's renewal is cut off by its own
    deadline, so it still closes its sessions before the lease could expire, and serves again
    once PostgreSQL runs."""
    from vmserver.backends.pg_sandbox import _children

    dsn = own_pg.create_database("inv")
    a, b = nodes(dsn), nodes(dsn)
    async with wires(a) as (wa,), wires(b) as (wb,):
        await wa.ok("connect_vm", **vm_args("hg1"))
        pids = [own_pg.pid, *_children(own_pg.pid)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            for w in (wa, wb):
                lines = []
                while line := await asyncio.wait_for(w.reader.readline(), TTL + 5):
                    lines.append(json.loads(line))
                assert [m.get("event") for m in lines[-1:]] == ["shutdown"], lines
            assert time.monotonic() - stopped < TTL, "a session outlived its server's lease"
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
    for node in (a, b):
        await until(lambda node=node: _serves(node), "serving again", 30)
    async with wires(b) as (w,):
        await until(lambda: _shows(w, "hg1", connected=False), "hg1 released", TTL + 10)
        await until(lambda: _connects(w, "hg1"), "hg1 connected again")
