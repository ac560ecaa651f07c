"""Behaviour through real sessions: races, ownership, session lifetime, passwords, update_vm,
restarts, storage failures and list ordering.

Every test talks to a real in-process Server over loopback TCP; nothing of vmserver is mocked.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from typing import Any

import pytest

from conftest import Wire, disk, vm_args
from vmserver.config import Config
from vmserver.server import start_server

ROUNDS = 20
PASSWORD_ROUNDS = 4  # each password round hashes twice (~70 ms each)
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# --- helpers ------------------------------------------------------------------------------


async def race(a: Wire, b: Wire, cmd: str, args_a: dict, args_b: dict, flip: bool) -> tuple[dict, dict]:
    """Send the two requests concurrently (in either order) and return (reply_a, reply_b)."""
    if flip:
        rb, ra = await asyncio.gather(b.call(cmd, **args_b), a.call(cmd, **args_a))
    else:
        ra, rb = await asyncio.gather(a.call(cmd, **args_a), b.call(cmd, **args_b))
    return ra, rb


def one_ok(ra: dict, rb: dict, loser_code: str) -> tuple[int, dict]:
    """Exactly one reply is ok and the other fails with ``loser_code``; returns (winner index, winner reply)."""
    oks = [r["ok"] for r in (ra, rb)]
    assert sorted(oks) == [False, True], (ra, rb)
    winner = 0 if ra["ok"] else 1
    loser = rb if winner == 0 else ra
    assert loser["error"]["code"] == loser_code, loser
    return winner, (ra, rb)[winner]


async def snapshot(w: Wire) -> tuple[list[dict], list[dict]]:
    """get_all_vms and get_all_disks, checked for internal consistency (no orphan disks)."""
    vms = await w.ok("get_all_vms")
    disks = await w.ok("get_all_disks")
    by_pk = {v["id"]: v for v in vms}
    assert len(by_pk) == len(vms), "duplicate VM ids"
    assert len({v["vm_id"] for v in vms}) == len(vms), "duplicate vm_id"
    assert [v["id"] for v in vms] == sorted(by_pk), "get_all_vms not ordered by id"
    assert [d["id"] for d in disks] == sorted(d["id"] for d in disks), "get_all_disks not ordered by id"
    assert len({d["disk_id"] for d in disks}) == len(disks), "duplicate disk_id"
    in_vms = sorted((d["id"], d["disk_id"], d["size"], d["vm_id"]) for v in vms for d in v["disks"])
    listed = sorted((d["id"], d["disk_id"], d["size"], d["vm_id"]) for d in disks)
    assert listed == in_vms, "get_all_disks disagrees with the VMs' disks (orphan or missing disk)"
    for d in disks:
        assert d["vm_id"] in by_pk, f"orphan disk {d}"
        assert d["vm"] == by_pk[d["vm_id"]]["vm_id"]
    return vms, disks


def find(vms: list[dict], vm_id: str) -> dict:
    matches = [v for v in vms if v["vm_id"] == vm_id]
    assert len(matches) == 1, f"{vm_id}: {len(matches)} records"
    return matches[0]


async def raw_call(w: Wire, cmd: str, **args: Any) -> tuple[bytes, dict]:
    """Call and return the raw reply line along with its decoding."""
    await w.send({"cmd": cmd, "args": args})
    line = await w.recv_line()
    assert line.endswith(b"\n"), line
    return line, json.loads(line)


async def wait_until_released(observer: Wire, vm_ids: set[str]) -> None:
    """Poll (bounded) until none of ``vm_ids`` is connected or authorized."""
    for _ in range(300):
        connected = {v["vm_id"] for v in await observer.ok("get_connected_vms")}
        authorized = {v["vm_id"] for v in await observer.ok("get_authorized_vms")}
        if not (connected | authorized) & vm_ids:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still connected {connected & vm_ids} / authorized {authorized & vm_ids} after 3 s")


# --- races --------------------------------------------------------------------------------


async def test_race_connect_same_vm(wire, connect):
    a, b = await connect(), await connect()
    for i in range(ROUNDS):
        await wire.ok("add_vm", **vm_args(f"c{i}", f"c{i}-d"))
    for i in range(ROUNDS):
        vm_id = f"c{i}"
        ra, rb = await race(a, b, "connect_vm", {"vm_id": vm_id}, {"vm_id": vm_id}, flip=i % 2 == 1)
        winner, reply = one_ok(ra, rb, "conflict")
        assert reply["result"]["vm_id"] == vm_id and reply["result"]["connected"] is True
        owner, other = (a, b) if winner == 0 else (b, a)
        # The winner holds it; the loser cannot act on it.
        assert await other.error("authorize_vm", vm_id=vm_id) == "not_connected"
        assert (await owner.ok("authorize_vm", vm_id=vm_id))["authorized"] is True
    vms, disks = await snapshot(wire)
    assert len(vms) == ROUNDS and len(disks) == ROUNDS
    connected = await wire.ok("get_connected_vms")
    assert sorted(v["vm_id"] for v in connected) == sorted(f"c{i}" for i in range(ROUNDS))


async def test_race_register_through_connect(wire, connect):
    a, b = await connect(), await connect()
    for i in range(ROUNDS):
        vm_id = f"r{i}"
        args = vm_args(vm_id, f"{vm_id}-x", f"{vm_id}-y", ram=512 + i)
        ra, rb = await race(a, b, "connect_vm", args, args, flip=i % 2 == 1)
        winner, reply = one_ok(ra, rb, "conflict")
        rec = reply["result"]
        assert rec["vm_id"] == vm_id and rec["ram"] == 512 + i and rec["connected"] is True
        assert [d["disk_id"] for d in rec["disks"]] == [f"{vm_id}-x", f"{vm_id}-y"]
        vms, disks = await snapshot(wire)
        assert find(vms, vm_id) == rec
        assert sorted(d["disk_id"] for d in disks if d["vm"] == vm_id) == [f"{vm_id}-x", f"{vm_id}-y"]
        assert len(vms) == i + 1 and len(disks) == 2 * (i + 1)


async def test_race_register_through_connect_with_password(wire, connect):
    a, b = await connect(), await connect()
    for i in range(PASSWORD_ROUNDS):
        vm_id = f"rp{i}"
        args = {**vm_args(vm_id, f"{vm_id}-d"), "password": "pw-race"}
        ra, rb = await race(a, b, "connect_vm", args, args, flip=i % 2 == 1)
        winner, reply = one_ok(ra, rb, "conflict")
        owner, other = (a, b) if winner == 0 else (b, a)
        assert await other.error("authorize_vm", vm_id=vm_id, password="pw-race") == "not_connected"
        assert (await owner.ok("authorize_vm", vm_id=vm_id, password="pw-race"))["authorized"] is True
        vms, disks = await snapshot(wire)
        assert find(vms, vm_id)["id"] == reply["result"]["id"]
        assert len(vms) == i + 1 and len(disks) == i + 1


async def test_race_add_same_vm_id(wire, connect):
    a, b = await connect(), await connect()
    for i in range(ROUNDS):
        vm_id = f"a{i}"
        ra, rb = await race(a, b, "add_vm", vm_args(vm_id, f"{vm_id}-1", ram=100),
                            vm_args(vm_id, f"{vm_id}-2", ram=200), flip=i % 2 == 1)
        winner, reply = one_ok(ra, rb, "already_exists")
        vms, disks = await snapshot(wire)
        rec = find(vms, vm_id)
        assert rec == reply["result"]
        # The winner's spec, and only the winner's disk.
        assert rec["ram"] == (100, 200)[winner]
        assert [d["disk_id"] for d in rec["disks"]] == [f"{vm_id}-{winner + 1}"]
        assert f"{vm_id}-{2 - winner}" not in {d["disk_id"] for d in disks}
        assert rec["connected"] is False and rec["last_connected"] is None
        assert len(vms) == i + 1 and len(disks) == i + 1


async def test_race_add_same_vm_id_with_password(wire, connect):
    a, b = await connect(), await connect()
    for i in range(PASSWORD_ROUNDS):
        vm_id = f"ap{i}"
        ra, rb = await race(a, b, "add_vm", {**vm_args(vm_id, f"{vm_id}-1"), "password": "one"},
                            {**vm_args(vm_id, f"{vm_id}-2"), "password": "two"}, flip=i % 2 == 1)
        winner, _ = one_ok(ra, rb, "already_exists")
        vms, disks = await snapshot(wire)
        assert [d["disk_id"] for d in find(vms, vm_id)["disks"]] == [f"{vm_id}-{winner + 1}"]
        assert len(vms) == i + 1 and len(disks) == i + 1
        # The stored password is the winner's.
        assert await a.error("connect_vm", vm_id=vm_id, password=("two", "one")[winner]) == "auth_failed"
        await a.ok("connect_vm", vm_id=vm_id, password=("one", "two")[winner])
        assert await a.error("authorize_vm", vm_id=vm_id, password=("two", "one")[winner]) == "auth_failed"
        await a.ok("authorize_vm", vm_id=vm_id, password=("one", "two")[winner])


async def test_race_add_sharing_disk(wire, connect):
    a, b = await connect(), await connect()
    for i in range(ROUNDS):
        shared = f"s{i}"
        ra, rb = await race(a, b, "add_vm", vm_args(f"sa{i}", shared, f"sa{i}-own"),
                            vm_args(f"sb{i}", f"sb{i}-own", shared), flip=i % 2 == 1)
        winner, reply = one_ok(ra, rb, "conflict")
        win_id, lose_id = (f"sa{i}", f"sb{i}") if winner == 0 else (f"sb{i}", f"sa{i}")
        vms, disks = await snapshot(wire)
        assert find(vms, win_id) == reply["result"]
        assert lose_id not in {v["vm_id"] for v in vms}
        assert f"{lose_id}-own" not in {d["disk_id"] for d in disks}
        owners = [d["vm"] for d in disks if d["disk_id"] == shared]
        assert owners == [win_id]
        assert len(vms) == i + 1 and len(disks) == 2 * (i + 1)


async def test_race_add_sharing_disk_with_password(wire, connect):
    a, b = await connect(), await connect()
    for i in range(PASSWORD_ROUNDS):
        shared = f"sp{i}"
        ra, rb = await race(a, b, "add_vm", {**vm_args(f"spa{i}", shared), "password": "x"},
                            {**vm_args(f"spb{i}", shared), "password": "y"}, flip=i % 2 == 1)
        winner, _ = one_ok(ra, rb, "conflict")
        vms, disks = await snapshot(wire)
        assert {v["vm_id"] for v in vms} & {f"spa{i}", f"spb{i}"} == {(f"spa{i}", f"spb{i}")[winner]}
        assert [d["vm"] for d in disks if d["disk_id"] == shared] == [(f"spa{i}", f"spb{i}")[winner]]
        assert len(vms) == i + 1 and len(disks) == i + 1


# --- ownership ----------------------------------------------------------------------------


async def test_other_session_cannot_touch_a_connected_vm(wire, connect):
    a, b = wire, await connect()
    await a.ok("add_vm", **vm_args("own", "own-d"))
    first = await a.ok("connect_vm", vm_id="own")
    assert first["connected"] is True and first["authorized"] is False

    # Not yet authorized by A.
    assert await b.error("authorize_vm", vm_id="own") == "not_connected"
    assert await b.error("update_vm", vm_id="own", ram=2) == "not_authorized"
    assert await b.error("deauthorize_vm", vm_id="own") == "not_authorized"
    assert await b.error("disconnect_vm", vm_id="own") == "not_connected"
    assert await b.error("connect_vm", vm_id="own") == "conflict"

    # Idempotent for A.
    again = await a.ok("connect_vm", vm_id="own")
    assert again["connected"] is True and again["last_connected"] == first["last_connected"]
    auth = await a.ok("authorize_vm", vm_id="own")
    assert auth["authorized"] is True
    assert (await a.ok("authorize_vm", vm_id="own"))["authorized"] is True
    assert (await a.ok("connect_vm", vm_id="own"))["authorized"] is True  # reconnecting keeps it

    # Authorized by A: still nothing for B.
    assert await b.error("authorize_vm", vm_id="own") == "not_connected"
    assert await b.error("update_vm", vm_id="own", ram=2) == "not_authorized"
    assert await b.error("deauthorize_vm", vm_id="own") == "not_authorized"
    assert await b.error("disconnect_vm", vm_id="own") == "not_connected"
    assert await b.error("connect_vm", vm_id="own") == "conflict"

    vms, _ = await snapshot(b)
    rec = find(vms, "own")
    assert rec["ram"] == 1024 and rec["connected"] is True and rec["authorized"] is True
    assert [v["vm_id"] for v in await b.ok("get_authorized_vms")] == ["own"]

    # A can do all of it.
    assert (await a.ok("update_vm", vm_id="own", ram=2))["ram"] == 2
    assert (await a.ok("deauthorize_vm", vm_id="own"))["authorized"] is False
    assert await a.error("deauthorize_vm", vm_id="own") == "not_authorized"
    assert (await a.ok("disconnect_vm", vm_id="own"))["connected"] is False
    assert await a.error("disconnect_vm", vm_id="own") == "not_connected"
    assert (await b.ok("connect_vm", vm_id="own"))["connected"] is True


async def test_unknown_vm_is_not_found(wire):
    for cmd in ("authorize_vm", "deauthorize_vm", "disconnect_vm"):
        assert await wire.error(cmd, vm_id="ghost") == "not_found"
    assert await wire.error("update_vm", vm_id="ghost", ram=1) == "not_found"
    assert await wire.error("connect_vm", vm_id="ghost") == "invalid_args"  # would need ram/cpu/disks
    assert await wire.ok("get_all_vms") == []


# --- session lifetime ---------------------------------------------------------------------


async def _session_end_releases(wire: Wire, connect: Any, abrupt: bool) -> None:
    a, b = await connect(), await connect()
    names = {"e1", "e2", "e3"}
    for name in sorted(names):
        await wire.ok("add_vm", **vm_args(name, f"{name}-d"))
    before = {}
    for name in sorted(names):
        rec = await a.ok("connect_vm", vm_id=name)
        assert TIMESTAMP.fullmatch(rec["last_connected"]), rec
        before[name] = rec["last_connected"]
    await a.ok("authorize_vm", vm_id="e1")
    await a.ok("authorize_vm", vm_id="e2")
    assert {v["vm_id"] for v in await b.ok("get_connected_vms")} == names
    assert {v["vm_id"] for v in await b.ok("get_authorized_vms")} == {"e1", "e2"}

    if abrupt:
        a.writer.transport.abort()
    else:
        await a.close()
    await wait_until_released(b, names)

    assert await b.ok("get_connected_vms") == []
    assert await b.ok("get_authorized_vms") == []
    vms, _ = await snapshot(b)
    for name in names:
        rec = find(vms, name)
        assert rec["connected"] is False and rec["authorized"] is False
        assert rec["last_connected"] == before[name]  # survives the disconnect
    # Now B can have them.
    for name in sorted(names):
        rec = await b.ok("connect_vm", vm_id=name)
        assert rec["connected"] is True and rec["authorized"] is False
        assert TIMESTAMP.fullmatch(rec["last_connected"]) and rec["last_connected"] >= before[name]
    assert (await b.ok("authorize_vm", vm_id="e1"))["authorized"] is True


async def test_clean_close_releases_vms(wire, connect):
    await _session_end_releases(wire, connect, abrupt=False)


async def test_abrupt_close_releases_vms(wire, connect):
    await _session_end_releases(wire, connect, abrupt=True)


async def test_last_connected_set_on_connect(wire):
    added = await wire.ok("add_vm", **vm_args("lc", "lc-d"))
    assert added["last_connected"] is None
    first = (await wire.ok("connect_vm", vm_id="lc"))["last_connected"]
    assert TIMESTAMP.fullmatch(first)
    await wire.ok("disconnect_vm", vm_id="lc")
    assert find(await wire.ok("get_all_vms"), "lc")["last_connected"] == first
    await asyncio.sleep(0.005)
    second = (await wire.ok("connect_vm", vm_id="lc"))["last_connected"]
    assert second > first
    registered = await wire.ok("connect_vm", **vm_args("lc2", "lc2-d"))
    assert TIMESTAMP.fullmatch(registered["last_connected"]) and registered["connected"] is True


# --- passwords ----------------------------------------------------------------------------


async def test_password_flow_never_echoes_password(wire, connect):
    secret = "Zq81-very-secret-pw"
    wrong = "Zq81-wrong-guess"
    lines: list[bytes] = []

    async def call(w: Wire, cmd: str, **args: Any) -> dict:
        line, reply = await raw_call(w, cmd, **args)
        lines.append(line)
        return reply

    r = await call(wire, "add_vm", **vm_args("pw", "pw-d"), password=secret)
    assert r["ok"] is True and "password" not in r["result"] and "password_hash" not in r["result"]
    r = await call(wire, "add_vm", **vm_args("nopw", "nopw-d"))
    assert r["ok"] is True
    assert (await call(wire, "connect_vm", vm_id="pw", password=secret))["ok"] is True
    assert (await call(wire, "connect_vm", vm_id="nopw"))["ok"] is True

    r = await call(wire, "authorize_vm", vm_id="pw")
    assert r["ok"] is False and r["error"]["code"] == "auth_failed"
    r = await call(wire, "authorize_vm", vm_id="pw", password=wrong)
    assert r["ok"] is False and r["error"]["code"] == "auth_failed"
    assert await wire.ok("get_authorized_vms") == []
    r = await call(wire, "authorize_vm", vm_id="pw", password=secret)
    assert r["ok"] is True and r["result"]["authorized"] is True
    r = await call(wire, "authorize_vm", vm_id="nopw")
    assert r["ok"] is True and r["result"]["authorized"] is True
    assert [v["vm_id"] for v in await wire.ok("get_authorized_vms")] == ["pw", "nopw"]

    # A malformed password is not echoed either.
    r = await call(wire, "add_vm", **vm_args("pw2", "pw2-d"), password=["x" + secret])
    assert r["ok"] is False and r["error"]["code"] == "invalid_args"
    # Registering through connect_vm with a password.
    r = await call(wire, "connect_vm", **vm_args("pw3", "pw3-d"), password=secret)
    assert r["ok"] is True
    r = await call(wire, "authorize_vm", vm_id="pw3", password=wrong)
    assert r["ok"] is False and r["error"]["code"] == "auth_failed"

    b = await connect()
    for cmd in ("get_all_vms", "get_connected_vms", "get_authorized_vms", "get_all_disks"):
        lines.append((await raw_call(b, cmd))[0])
        lines.append((await raw_call(wire, cmd))[0])
    for line in lines:
        assert secret.encode() not in line and wrong.encode() not in line, line
        assert b"scrypt" not in line and b"password_hash" not in line, line
        assert b'"password"' not in line, line


async def test_authorize_again_rechecks_password(wire):
    await wire.ok("add_vm", **vm_args("ra", "ra-d"), password="good")
    await wire.ok("connect_vm", vm_id="ra", password="good")
    await wire.ok("authorize_vm", vm_id="ra", password="good")
    assert await wire.error("authorize_vm", vm_id="ra", password="bad") == "auth_failed"
    assert await wire.error("authorize_vm", vm_id="ra") == "auth_failed"


# --- update_vm ----------------------------------------------------------------------------


async def test_update_vm_all_or_nothing(wire, connect):
    await wire.ok("add_vm", **vm_args("u1", "u1-a", "u1-b", ram=1024, cpu=2))
    await wire.ok("add_vm", **vm_args("u2", "u2-a"))
    await wire.ok("connect_vm", vm_id="u1")
    await wire.ok("authorize_vm", vm_id="u1")
    vms0, disks0 = await snapshot(wire)
    u1 = find(vms0, "u1")

    # A disk of another VM: conflict, and nothing changes even though ram and cpu came along.
    code = await wire.error("update_vm", vm_id="u1", ram=8192, cpu=8,
                            disks=[disk("u1-a", 99), disk("u2-a", 5), disk("u1-new", 1)])
    assert code == "conflict"
    vms, disks = await snapshot(wire)
    assert (vms, disks) == (vms0, disks0)
    assert find(vms, "u1")["ram"] == 1024 and find(vms, "u1")["cpu"] == 2

    # A repeated disk id: conflict, nothing changes.
    code = await wire.error("update_vm", vm_id="u1", ram=4096, disks=[disk("u1-a", 7), disk("u1-a", 8)])
    assert code == "conflict"
    assert await snapshot(wire) == (vms0, disks0)
    code = await wire.error("update_vm", vm_id="u1", disks=[disk("x1"), disk("x1")])
    assert code == "conflict"
    assert await snapshot(wire) == (vms0, disks0)

    # Only vm_id: invalid_args, nothing changes.
    assert await wire.error("update_vm", vm_id="u1") == "invalid_args"
    assert await snapshot(wire) == (vms0, disks0)

    # Replace the disk set: u1-b goes, u1-a is kept (same id, new size), u1-c is new.
    id_a = next(d["id"] for d in u1["disks"] if d["disk_id"] == "u1-a")
    id_b = next(d["id"] for d in u1["disks"] if d["disk_id"] == "u1-b")
    max_id = max(d["id"] for d in disks0)
    rec = await wire.ok("update_vm", vm_id="u1", disks=[disk("u1-c", 3), disk("u1-a", 50)])
    assert rec["ram"] == 1024 and rec["cpu"] == 2  # not given: unchanged
    assert [(d["disk_id"], d["size"]) for d in rec["disks"]] == [("u1-a", 50), ("u1-c", 3)]
    assert rec["disks"][0]["id"] == id_a
    assert rec["disks"][1]["id"] > max_id
    assert all(d["vm_id"] == u1["id"] for d in rec["disks"])
    vms, disks = await snapshot(wire)
    assert find(vms, "u1") == rec
    assert "u1-b" not in {d["disk_id"] for d in disks}
    assert id_b not in {d["id"] for d in disks}
    assert find(vms, "u2") == find(vms0, "u2")

    # The removed disk id is free for someone else now.
    other = await wire.ok("add_vm", **vm_args("u3", "u1-b"))
    assert other["disks"][0]["id"] > rec["disks"][1]["id"]

    # Only ram, only cpu.
    assert (await wire.ok("update_vm", vm_id="u1", ram=2048))["ram"] == 2048
    rec = await wire.ok("update_vm", vm_id="u1", cpu=16)
    assert (rec["ram"], rec["cpu"]) == (2048, 16)
    assert [d["disk_id"] for d in rec["disks"]] == ["u1-a", "u1-c"]

    # An empty disk list removes every disk.
    rec = await wire.ok("update_vm", vm_id="u1", disks=[])
    assert rec["disks"] == []
    _, disks = await snapshot(wire)
    assert {d["vm"] for d in disks} == {"u2", "u3"}

    # Disconnecting ends authorization.
    await wire.ok("disconnect_vm", vm_id="u1")
    assert await wire.ok("get_authorized_vms") == []
    assert await wire.error("update_vm", vm_id="u1", ram=1) == "not_authorized"
    rec = await wire.ok("connect_vm", vm_id="u1")
    assert rec["connected"] is True and rec["authorized"] is False
    assert await wire.error("update_vm", vm_id="u1", ram=1) == "not_authorized"
    assert find(await wire.ok("get_all_vms"), "u1")["ram"] == 2048


async def test_update_vm_requires_authorization(wire):
    await wire.ok("add_vm", **vm_args("na", "na-d"))
    assert await wire.error("update_vm", vm_id="na", ram=1) == "not_authorized"
    await wire.ok("connect_vm", vm_id="na")
    assert await wire.error("update_vm", vm_id="na", ram=1) == "not_authorized"
    await wire.ok("authorize_vm", vm_id="na")
    await wire.ok("deauthorize_vm", vm_id="na")
    assert await wire.error("update_vm", vm_id="na", ram=1) == "not_authorized"
    assert find(await wire.ok("get_all_vms"), "na")["ram"] == 1024


# --- restart ------------------------------------------------------------------------------


async def test_restart_keeps_inventory(db: str):
    srv = await start_server(Config(host="127.0.0.1", port=0, db=db))
    try:
        w = await Wire.open(srv.address[1])
        await w.ok("add_vm", **vm_args("k1", "k1-a", "k1-b", ram=2048, cpu=2), password="keep-me")
        await w.ok("add_vm", **vm_args("k2", "k2-a"))
        await w.ok("connect_vm", **vm_args("k3", "k3-a", ram=64))
        await w.ok("connect_vm", vm_id="k1", password="keep-me")
        await w.ok("authorize_vm", vm_id="k1", password="keep-me")
        await w.ok("connect_vm", vm_id="k2")
        await w.ok("update_vm", vm_id="k1", disks=[disk("k1-b", 77), disk("k1-c", 1)])  # needs authorize
        vms_before, disks_before = await snapshot(w)
        assert find(vms_before, "k1")["authorized"] is True
        await w.ok("disconnect_vm", vm_id="k2")
    finally:
        await srv.close()
        srv.inventory.close()
    await w.close()

    srv2 = await start_server(Config(host="127.0.0.1", port=0, db=db))
    try:
        w2 = await Wire.open(srv2.address[1])
        vms_after, disks_after = await snapshot(w2)
        expected = [{**v, "connected": False, "authorized": False} for v in vms_before]
        assert vms_after == expected
        assert disks_after == disks_before
        for v in vms_after:
            assert TIMESTAMP.fullmatch(v["last_connected"]), v  # all three were connected once
        assert await w2.ok("get_connected_vms") == []
        assert await w2.ok("get_authorized_vms") == []

        k1 = find(vms_after, "k1")
        assert await w2.error("connect_vm", vm_id="k1", password="nope") == "auth_failed"
        rec = await w2.ok("connect_vm", vm_id="k1", password="keep-me")
        assert rec["id"] == k1["id"] and rec["last_connected"] >= k1["last_connected"]
        assert await w2.error("authorize_vm", vm_id="k1") == "auth_failed"
        assert await w2.error("authorize_vm", vm_id="k1", password="nope2") == "auth_failed"
        assert (await w2.ok("authorize_vm", vm_id="k1", password="keep-me"))["authorized"] is True
        # k2 had no password and still has none.
        await w2.ok("connect_vm", vm_id="k2")
        await w2.ok("authorize_vm", vm_id="k2")
        # Ids keep growing after a restart.
        new = await w2.ok("add_vm", **vm_args("k4", "k4-a"))
        assert new["id"] > max(v["id"] for v in vms_before)
        assert new["disks"][0]["id"] > max(d["id"] for d in disks_before)
        await w2.close()
    finally:
        await srv2.close()
        srv2.inventory.close()


# --- storage failure ----------------------------------------------------------------------


def lock_db(path: str) -> sqlite3.Connection:
    """Another connection that holds the database's write lock until released."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    conn.execute("BEGIN IMMEDIATE")
    return conn


@pytest.mark.sqlite_only
async def test_storage_failure_on_add_is_internal(wire, db_path):
    await wire.ok("add_vm", **vm_args("pre", "pre-d"))
    before = await snapshot(wire)
    args = vm_args("failing", "f-1", "f-2")
    locker = lock_db(db_path)
    try:
        reply = await wire.call("add_vm", id=7, **args)
        assert reply["ok"] is False and reply["id"] == 7
        assert reply["error"]["code"] == "internal"
        assert await wire.ok("health") == "OK"
        assert await snapshot(wire) == before
        # With a password (hashed first, then the write fails).
        assert await wire.error("add_vm", **{**args, "password": "pw"}) == "internal"
        # Registering through connect_vm.
        assert await wire.error("connect_vm", **args) == "internal"
        assert await snapshot(wire) == before
        assert await wire.ok("get_connected_vms") == []
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    rec = await wire.ok("add_vm", **args)
    vms, disks = await snapshot(wire)
    assert vms == before[0] + [rec]
    pre = find(before[0], "pre")
    # The failed attempts left no trace: the next ids follow directly.
    assert rec["id"] == pre["id"] + 1
    assert [d["id"] for d in rec["disks"]] == [pre["disks"][0]["id"] + 1, pre["disks"][0]["id"] + 2]
    assert [d["disk_id"] for d in disks] == ["pre-d", "f-1", "f-2"]
    # The same add again is now a plain already_exists.
    assert await wire.error("add_vm", **args) == "already_exists"


@pytest.mark.sqlite_only
async def test_storage_failure_on_update_is_internal(wire, connect, db_path):
    await wire.ok("add_vm", **vm_args("up", "up-a", "up-b", ram=1024, cpu=1))
    await wire.ok("connect_vm", vm_id="up")
    await wire.ok("authorize_vm", vm_id="up")
    before = await snapshot(wire)
    change = {"vm_id": "up", "ram": 4096, "cpu": 4, "disks": [disk("up-b", 99), disk("up-c", 5)]}
    locker = lock_db(db_path)
    try:
        assert await wire.error("update_vm", **change) == "internal"
        assert await wire.ok("health") == "OK"
        assert await snapshot(wire) == before
        b = await connect()
        assert await snapshot(b) == before
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # Still connected and authorized: the same update now succeeds.
    assert [v["vm_id"] for v in await wire.ok("get_authorized_vms")] == ["up"]
    rec = await wire.ok("update_vm", **change)
    assert (rec["ram"], rec["cpu"]) == (4096, 4)
    assert [(d["disk_id"], d["size"]) for d in rec["disks"]] == [("up-b", 99), ("up-c", 5)]
    vms, _ = await snapshot(wire)
    assert find(vms, "up") == rec


@pytest.mark.sqlite_only
async def test_storage_failure_on_connect_keeps_vm_free(wire, db_path):
    await wire.ok("add_vm", **vm_args("cv", "cv-d"))
    before = await snapshot(wire)
    locker = lock_db(db_path)
    try:
        assert await wire.error("connect_vm", vm_id="cv") == "internal"
        assert await wire.ok("get_connected_vms") == []
        assert await snapshot(wire) == before
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert (await wire.ok("connect_vm", vm_id="cv"))["connected"] is True


# --- lists --------------------------------------------------------------------------------


async def test_lists_ordered_by_id_with_vm_names(wire, connect):
    names = ["zeta", "alpha", "mid", "beta"]
    ids = {}
    for n, name in enumerate(names):
        rec = await wire.ok("add_vm", **vm_args(name, f"{name}-z", f"{name}-a", ram=10 + n))
        ids[name] = rec["id"]
        assert [d["disk_id"] for d in rec["disks"]] == [f"{name}-z", f"{name}-a"]  # given order = id order
    vms, disks = await snapshot(wire)
    assert [v["vm_id"] for v in vms] == names
    assert [v["id"] for v in vms] == sorted(ids.values())
    for v in vms:
        assert [d["id"] for d in v["disks"]] == sorted(d["id"] for d in v["disks"])
        assert set(v) == {"id", "vm_id", "ram", "cpu", "disks", "connected", "authorized", "last_connected"}
    assert [d["disk_id"] for d in disks] == [f"{n}-{s}" for n in names for s in ("z", "a")]
    for d in disks:
        assert set(d) == {"id", "disk_id", "size", "vm_id", "vm"}
        assert d["vm"] == d["disk_id"].split("-")[0]
        assert d["vm_id"] == ids[d["vm"]]

    # Connected / authorized lists are in id order too, whatever the order of connecting.
    b = await connect()
    for name in ("beta", "zeta", "mid"):
        await b.ok("connect_vm", vm_id=name)
    for name in ("mid", "zeta"):
        await b.ok("authorize_vm", vm_id=name)
    assert [v["vm_id"] for v in await wire.ok("get_connected_vms")] == ["zeta", "mid", "beta"]
    assert [v["vm_id"] for v in await wire.ok("get_authorized_vms")] == ["zeta", "mid"]

    # A disk added later to the first VM comes last; a kept disk keeps its place.
    await b.ok("update_vm", vm_id="zeta", disks=[disk("zeta-a"), disk("zeta-new")])
    _, disks = await snapshot(wire)
    assert [d["disk_id"] for d in disks] == (
        ["zeta-a"] + [f"{n}-{s}" for n in names[1:] for s in ("z", "a")] + ["zeta-new"])
    assert disks[-1]["vm"] == "zeta" and disks[-1]["vm_id"] == ids["zeta"]
