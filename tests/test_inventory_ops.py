"""get_vm, stats, remove_vm and the filters of get_all_vms, against a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import vmclient
from vmserver.config import Config
from vmserver.presence import SERVER_ID
from vmserver.server import start_server

from conftest import Wire, vm_args


async def test_get_vm(wire):
    added = await wire.ok("add_vm", **vm_args("g1", "g1-d"))
    assert await wire.ok("get_vm", vm_id="g1") == added
    await wire.ok("connect_vm", vm_id="g1")
    assert (await wire.ok("get_vm", vm_id="g1"))["connected"] is True
    assert await wire.error("get_vm", vm_id="nope") == "not_found"
    assert await wire.error("get_vm") == "invalid_args"
    assert await wire.error("get_vm", vm_id="bad id") == "invalid_args"


def counts(stats: dict[str, Any]) -> dict[str, Any]:
    """stats without who answered (the server, the servers alive, its sessions and connections)."""
    assert stats.pop("server_id") == SERVER_ID
    assert SERVER_ID in [s["server_id"] for s in stats.pop("servers")]
    assert stats.pop("sessions")["line"] >= 1 and stats.pop("connections")["open"] >= 1
    return stats


async def test_stats_counts_and_totals(wire, connect):
    assert counts(await wire.ok("stats")) == {"vms": 0, "connected": 0, "authorized": 0, "disks": 0,
                                              "ram": 0, "cpu": 0, "disk_size": 0}
    await wire.ok("add_vm", vm_id="s1", ram=1024, cpu=2, disks=[{"disk_id": "s1-a", "size": 10},
                                                                 {"disk_id": "s1-b", "size": 5}])
    await wire.ok("add_vm", vm_id="s2", ram=512, cpu=1, disks=[])
    other = await connect()
    await other.ok("connect_vm", vm_id="s2")
    await other.ok("authorize_vm", vm_id="s2")
    assert counts(await wire.ok("stats")) == {"vms": 2, "connected": 1, "authorized": 1, "disks": 2,
                                              "ram": 1536, "cpu": 3, "disk_size": 15}
    await other.close()
    for _ in range(100):  # the session's end is noticed asynchronously
        if (await wire.ok("stats"))["connected"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await wire.ok("stats"))["authorized"] == 0
    assert await wire.error("stats", x=1) == "invalid_args"


async def test_remove_vm(wire, connect):
    await wire.ok("add_vm", **vm_args("r1", "r1-a", "r1-b"))
    other = await connect()
    await other.ok("connect_vm", vm_id="r1")
    assert await wire.error("remove_vm", vm_id="r1") == "conflict"  # connected by another session
    assert await other.error("remove_vm", vm_id="r1") == "conflict"  # ... or by this one
    await other.ok("disconnect_vm", vm_id="r1")
    removed = await wire.ok("remove_vm", vm_id="r1")
    assert removed["vm_id"] == "r1" and [d["disk_id"] for d in removed["disks"]] == ["r1-a", "r1-b"]
    assert await wire.error("get_vm", vm_id="r1") == "not_found"
    assert await wire.error("remove_vm", vm_id="r1") == "not_found"
    assert await wire.ok("get_all_disks") == []
    # The name and the disk ids are free again; ids are not reused.
    again = await wire.ok("add_vm", **vm_args("r1", "r1-a"))
    assert again["id"] > removed["id"] and again["disks"][0]["id"] > removed["disks"][-1]["id"]
    assert [v["vm_id"] for v in await wire.ok("get_all_vms")] == ["r1"]


async def test_remove_vm_with_a_password(wire):
    await wire.ok("add_vm", **vm_args("rp"), password="pw-rp")
    assert await wire.error("remove_vm", vm_id="rp") == "auth_failed"
    assert await wire.error("remove_vm", vm_id="rp", password="nope") == "auth_failed"
    assert (await wire.ok("remove_vm", vm_id="rp", password="pw-rp"))["vm_id"] == "rp"
    assert await wire.ok("get_all_vms") == []


async def test_remove_is_durable(tmp_path):
    path = str(tmp_path / "rm.db")
    srv = await start_server(Config(host="127.0.0.1", port=0, db=path))
    try:
        w = await Wire.open(srv.address[1])
        await w.ok("add_vm", **vm_args("keep", "keep-d"))
        await w.ok("add_vm", **vm_args("gone", "gone-d"))
        await w.ok("remove_vm", vm_id="gone")
        await w.close()
    finally:
        await srv.close()
        srv.inventory.close()
    srv = await start_server(Config(host="127.0.0.1", port=0, db=path))
    try:
        w = await Wire.open(srv.address[1])
        assert [v["vm_id"] for v in await w.ok("get_all_vms")] == ["keep"]
        assert [d["disk_id"] for d in await w.ok("get_all_disks")] == ["keep-d"]
        await w.close()
    finally:
        await srv.close()
        srv.inventory.close()


async def test_remove_races_connect(wire, connect):
    """A removal and a connection of the same VM at once: exactly one of them wins."""
    for i in range(10):
        await wire.ok("add_vm", **vm_args(f"race{i}"))
        a, b = await connect(), await connect()
        removed, connected = await asyncio.gather(a.call("remove_vm", vm_id=f"race{i}"),
                                                  b.call("connect_vm", vm_id=f"race{i}"))
        assert removed["ok"] != connected["ok"], (removed, connected)
        if removed["ok"]:
            assert connected["error"]["code"] in ("conflict", "not_found")
            assert await wire.error("get_vm", vm_id=f"race{i}") == "not_found"
        else:
            assert removed["error"]["code"] == "conflict"
            assert (await wire.ok("get_vm", vm_id=f"race{i}"))["connected"] is True


async def test_get_all_vms_filters(wire, connect):
    for name in ("web-1", "web-2", "db-1", "db-2"):
        await wire.ok("add_vm", **vm_args(name))
    other = await connect()
    await other.ok("connect_vm", vm_id="web-2")
    await other.ok("connect_vm", vm_id="db-1")
    await other.ok("authorize_vm", vm_id="db-1")

    async def names(**filters):
        return [v["vm_id"] for v in await wire.ok("get_all_vms", **filters)]

    assert await names(prefix="web-") == ["web-1", "web-2"]
    assert await names(connected=True) == ["web-2", "db-1"]
    assert await names(connected=False) == ["web-1", "db-2"]
    assert await names(authorized=True) == ["db-1"]
    assert await names(authorized=False, prefix="db") == ["db-2"]
    assert await names(connected=True, authorized=False) == ["web-2"]
    assert await names(prefix="") == ["web-1", "web-2", "db-1", "db-2"]
    assert await names(prefix="x") == []
    assert await names(connected=False, limit=1) == ["web-1"]
    first = (await wire.ok("get_all_vms", prefix="web"))[0]["id"]
    assert await names(prefix="web", after=first) == ["web-2"]
    for bad in ({"connected": 1}, {"connected": "true"}, {"authorized": None}, {"prefix": "bad prefix"},
                {"prefix": 5}, {"prefix": "x" * 65}):
        assert await wire.error("get_all_vms", **bad) == "invalid_args", bad
    # The inline form reads true/false as JSON.
    await wire.send("get_all_vms connected=true prefix=db")
    reply = await wire.recv()
    assert [v["vm_id"] for v in reply["result"]] == ["db-1"]


async def test_client_library_methods(server):
    async with vmclient.Client(port=server.address[1]) as c:
        await c.add_vm("lib-1", ram=1, cpu=1, disks=[{"disk_id": "lib-1-d", "size": 3}], password="pw")
        await c.add_vm("other", ram=2, cpu=2, disks=[])
        assert (await c.get_vm("lib-1"))["disks"][0]["disk_id"] == "lib-1-d"
        assert [v["vm_id"] for v in await c.get_all_vms(prefix="lib")] == ["lib-1"]
        assert await c.get_all_vms(connected=True) == []
        assert (await c.stats())["vms"] == 2
        with pytest.raises(vmclient.AuthFailed):
            await c.remove_vm("lib-1")
        assert (await c.remove_vm("lib-1", password="pw"))["vm_id"] == "lib-1"
        with pytest.raises(vmclient.NotFound):
            await c.get_vm("lib-1")
        await c.connect_vm("other")
        with pytest.raises(vmclient.Conflict):
            await c.remove_vm("other")


def test_console_renders_stats_as_a_block():
    from vmclient.render import human

    text = human("stats", {"vms": 2, "connected": 1, "authorized": 0, "disks": 3, "ram": 1536, "cpu": 3,
                           "disk_size": 15})
    assert text.splitlines() == ["vms:        2", "connected:  1", "authorized: 0", "disks:      3",
                                 "ram:        1536 MiB", "cpu:        3", "disk_size:  15 GiB"]
