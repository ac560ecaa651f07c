"""Lists cached block by block (vmserver/listing.py): after any sequence of changes, every list,
page and total equals what a plain rebuild from the records gives."""

from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace

import pytest

from vmserver import listing
from vmserver.inventory import Inventory
from vmserver.presence import session_key
from vmserver.listing import Blocks, joined, json_array, json_list
from vmserver.backends.sqlite import SQLiteStore
from vmserver.validation import DiskSpec

from conftest import vm_args


def rec(id: int) -> SimpleNamespace:
    return SimpleNamespace(id=id, text=f'{{"id":{id}}}'.encode())


def test_blocks_keep_id_order_across_blocks_and_forget_only_what_changed(monkeypatch):
    monkeypatch.setattr(listing, "BLOCK", 4)
    blocks: Blocks = Blocks()
    renders: list[list[int]] = []

    def render(records):
        renders.append([r.id for r in records])
        return b",".join(r.text for r in records)

    view = blocks.view(render)
    records = {i: rec(i) for i in (1, 2, 5, 9, 3, 10)}  # 3 arrives late: it is put in order
    for r in records.values():
        blocks.add(r)
    assert json.loads(joined(view.json_array())) == [{"id": i} for i in (1, 2, 3, 5, 9, 10)]
    assert sorted(renders) == [[1, 2, 3], [5], [9, 10]]
    renders.clear()
    assert view.json_array() is view.json_array()  # cached whole until a change
    blocks.touch(records[5])
    view.json_array()
    assert renders == [[5]]  # only the changed block was rendered again
    renders.clear()
    blocks.remove(records[5])  # the block empties and goes
    assert json.loads(joined(view.json_array())) == [{"id": i} for i in (1, 2, 3, 9, 10)]
    assert renders == [] and list(blocks.by_block) == [0, 2]
    assert [r.id for r in blocks.after(0)] == [1, 2, 3, 9, 10]
    assert [r.id for r in blocks.after(2)] == [3, 9, 10]
    assert [r.id for r in blocks.after(9)] == [10]
    assert list(blocks.after(10)) == []
    blocks.add(rec(0))  # a block before the others, out of order: still listed first
    assert list(blocks.by_block) == [0, 2]
    blocks.add(rec(7))
    assert list(blocks.by_block) == [0, 1, 2]
    assert [r.id for r in blocks.after(-1)] == [0, 1, 2, 3, 7, 9, 10]


def test_json_array_in_pieces_past_the_large_reply_size(monkeypatch):
    assert json_array([]) == b"[]" and json_array([b"", b""]) == b"[]"
    assert json_array([b"1,2", b"", b"3"]) == b"[1,2,3]"
    monkeypatch.setattr(listing, "LARGE_REPLY", 4)
    pieces = json_array([b"1,2", b"", b"3,4"])
    assert type(pieces) is tuple and b"".join(pieces) == b"[1,2,3,4]"
    assert json_list([]) == b"[]" and json_list([b"1"]) == b"[1]" and json_list([b"1", b"2"]) == b"[1,2]"
    monkeypatch.setattr(listing, "JOIN_CHUNK", 2)
    records = [str(i).encode() for i in range(7)]
    lazy = json_list(records)  # past JOIN_CHUNK records: references, joined as written
    assert type(lazy) is tuple and any(type(p) is listing.Join for p in lazy)
    assert [len(chunk.split(b",")) for chunk in lazy[1].chunks()] == [2, 3, 3, 2]  # a leading comma after the first
    assert joined(lazy) == b"[0,1,2,3,4,5,6]"


class Owner:
    def __init__(self, name: str) -> None:
        self.key, self.name, self.vms, self.authenticated, self.ended = session_key(), name, set(), True, False


def expected(inv: Inventory) -> dict:
    """Every list, built plainly from the records (no cache involved)."""
    vms = sorted((vm for vm in inv._vms.values()), key=lambda vm: vm.id)
    records = [vm.record() for vm in vms]
    disks = sorted((d for d in inv._disks.values()), key=lambda d: d.id)
    return {
        "vms": records,
        "connected": [r for r in records if r["connected"]],
        "authorized": [r for r in records if r["authorized"]],
        "disks": [{**d.record(), "vm": d.vm.vm_id} for d in disks],
        "stats": {"vms": len(vms), "connected": sum(r["connected"] for r in records),
                  "authorized": sum(r["authorized"] for r in records), "disks": len(disks),
                  "ram": sum(vm.ram for vm in vms), "cpu": sum(vm.cpu for vm in vms),
                  "disk_size": sum(d.size for d in disks)},
    }


def check(inv: Inventory, rng: random.Random) -> None:
    want = expected(inv)
    assert json.loads(joined(inv.all_vms_json())) == want["vms"]
    assert json.loads(joined(inv.connected_vms_json())) == want["connected"]
    assert json.loads(joined(inv.authorized_vms_json())) == want["authorized"]
    assert json.loads(joined(inv.all_disks_json())) == want["disks"]
    assert {k: v for k, v in json.loads(inv.stats_json()).items() if k not in ("server_id", "servers")} == want["stats"]
    after = rng.choice([0] + [r["id"] for r in want["vms"]])
    limit = rng.choice([1, 3, 1000, None])
    connected, authorized = rng.choice([None, True, False]), rng.choice([None, True, False])
    prefix = rng.choice(["", "", "vm-", "vm-1", "vm-2", "zzz"])
    plain = [r for r in want["vms"] if r["id"] > after and r["vm_id"].startswith(prefix)
             and connected in (None, r["connected"]) and authorized in (None, r["authorized"])][:limit]
    assert json.loads(joined(inv.vms_page(after, limit, connected, authorized, prefix))) == plain
    # The same without paging: whole filtered lists come from the per-block caches.
    whole = [r for r in want["vms"] if r["vm_id"].startswith(prefix)
             and connected in (None, r["connected"]) and authorized in (None, r["authorized"])]
    assert json.loads(joined(inv.vms_page(0, None, connected, authorized, prefix))) == whole
    after = rng.choice([0] + [d["id"] for d in want["disks"]])
    assert json.loads(joined(inv.disks_page(after, limit))) == [d for d in want["disks"] if d["id"] > after][:limit]


@pytest.mark.parametrize("seed", range(4))
async def test_lists_equal_a_plain_rebuild_after_random_changes(tmp_path, monkeypatch, seed):
    """Small blocks and a small large-reply size, so a few dozen VMs span many blocks and the
    lists come back in pieces; every kind of change, checked after each step."""
    monkeypatch.setattr(listing, "BLOCK", 4)
    monkeypatch.setattr(listing, "LARGE_REPLY", 600)
    monkeypatch.setattr(listing, "JOIN_CHUNK", 3)  # filtered lists and pages come back as a Join
    rng = random.Random(seed)
    store = SQLiteStore(str(tmp_path / "l.db"))
    inv = Inventory(store)
    inv.start(asyncio.get_running_loop())
    owners = [Owner(f"s{i}") for i in range(3)]
    by_key = {o.key: o for o in owners}
    names = [f"vm-{i}" for i in range(30)]
    disk_names = [f"d-{i}" for i in range(40)]
    try:
        for step in range(150):
            vm_id, owner = rng.choice(names), rng.choice(owners)
            vm = inv._vms.get(vm_id)
            free = [d for d in disk_names if d not in inv._disks and d not in inv._reserved_disk_ids]
            op = rng.random()
            if vm is None:
                disks = [DiskSpec(d, rng.randint(1, 50)) for d in rng.sample(free, min(len(free), rng.randint(0, 2)))]
                await inv.add(vm_id, rng.randint(1, 4096), rng.randint(1, 8), disks, None,
                              owner=owner if op < 0.3 else None)
            elif vm.holder is None:
                if op < 0.25:
                    await inv.remove(vm_id)
                else:
                    await inv.connect(vm_id, owner)
            elif not vm.authorized:
                if op < 0.2:
                    inv.disconnect(vm_id, by_key[vm.holder])
                elif op < 0.3:
                    inv.release(by_key[vm.holder])
                    for o in owners:
                        o.ended = False  # the test's owners live on
                else:
                    inv.authorize(vm_id, by_key[vm.holder])
            else:
                if op < 0.15:
                    inv.deauthorize(vm_id, by_key[vm.holder])
                else:
                    keep = [DiskSpec(d.disk_id, rng.choice([d.size, d.size + 1])) for d in vm.disks if rng.random() < 0.6]
                    new = [DiskSpec(d, rng.randint(1, 50)) for d in rng.sample(free, min(len(free), rng.randint(0, 2)))]
                    await inv.update(vm_id, by_key[vm.holder], rng.choice([None, rng.randint(1, 4096)]),
                                     rng.choice([None, rng.randint(1, 8)]), rng.choice([None, keep + new]))
            check(inv, rng)
        # And the same lists come back from the file.
        await inv.settle()
        for o in owners:
            inv.release(o)
        before = expected(inv)
    finally:
        inv.store.writer.close()
        store.close()
    fresh = Inventory(SQLiteStore(str(tmp_path / "l.db")))
    try:
        assert expected(fresh) == before
        check(fresh, rng)
    finally:
        fresh.store.close()


async def test_a_large_list_after_a_change_over_the_wire(wire, connect):
    """Enough VMs that get_all_vms is written in pieces; a change shows in the next list."""
    agent = await connect()
    for i in range(1200):
        await wire.send(json.dumps({"cmd": "add_vm", "args": vm_args(f"big-{i}", f"big-{i}-a", f"big-{i}-b"), "id": i}))
    for i in range(1200):
        assert (await wire.recv())["ok"]
    first = await wire.ok("get_all_vms")
    assert len(first) == 1200
    await agent.ok("connect_vm", vm_id="big-700")
    await agent.ok("authorize_vm", vm_id="big-700")
    await agent.ok("update_vm", vm_id="big-700", ram=1, disks=[{"disk_id": "big-700-a", "size": 3}])
    await wire.send('{"cmd":"get_all_vms","id":"after"}')
    line = await wire.recv_line()
    assert len(line) > 256 * 1024
    after = json.loads(line)["result"]
    assert len(after) == len(first)
    changed = [new for new, old in zip(after, first) if new != old]
    assert [vm["vm_id"] for vm in changed] == ["big-700"]
    assert changed[0]["ram"] == 1 and changed[0]["connected"] and changed[0]["authorized"]
    assert [d["disk_id"] for d in changed[0]["disks"]] == ["big-700-a"]
    stats = await wire.ok("stats")
    assert stats["vms"] == 1200 and stats["disks"] == 2399 and stats["connected"] == stats["authorized"] == 1
    assert len(await wire.ok("get_all_disks")) == 2399
    assert [vm["vm_id"] for vm in await wire.ok("get_connected_vms")] == ["big-700"]


async def test_after_alone_means_every_record_after_it_for_every_list(db_path, monkeypatch):
    """protocol.md: limit defaults to all. (The lists other than get_all_vms used to stop at
    the largest page size; a smaller one makes that visible here.)"""
    from vmserver import validation

    from conftest import Wire, running, vm_args

    monkeypatch.setattr(validation, "PAGE_MAX", 5)
    async with running(db_path) as srv:
        w = await Wire.open(srv.address[1])
        for i in range(12):
            await w.ok("connect_vm", **vm_args(f"pg-{i:02d}", f"pg-{i:02d}-d"))
            await w.ok("authorize_vm", vm_id=f"pg-{i:02d}")
        for cmd in ("get_all_vms", "get_connected_vms", "get_authorized_vms", "get_all_disks"):
            assert len(await w.ok(cmd, after=1)) == 11, cmd
            assert len(await w.ok(cmd, after=1, limit=3)) == 3, cmd
        await w.close()
