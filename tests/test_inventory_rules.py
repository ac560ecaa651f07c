"""The inventory's rules on each real backend (the ``db`` fixture: SQLite, then PostgreSQL),
without the network: claims, presence by session key, all-or-nothing writes, clashes the
database catches, and that what memory says is what a fresh load from the store says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

import pytest

from vmserver.backends import open_store
from vmserver.errors import CommandError, ErrorCode, StorageError
from vmserver.inventory import Inventory
from vmserver.presence import session_key
from vmserver.records import VM
from vmserver.validation import DiskSpec

from conftest import query


class Session:
    def __init__(self, name: str) -> None:
        self.key, self.name, self.vms, self.authenticated, self.ended = session_key(), name, set(), True, False


@pytest.fixture
async def inventory(db: str) -> AsyncIterator[Inventory]:
    inv = Inventory(open_store(db))
    inv.start(asyncio.get_running_loop())
    yield inv
    inv.close()


async def reloaded(db: str) -> tuple[bytes, bytes]:
    inv = Inventory(open_store(db))
    try:
        return bytes(inv.all_vms_json()), bytes(inv.all_disks_json())
    finally:
        inv.store.close()


async def done(change: VM | Awaitable[VM]) -> VM:
    """A presence change's VM: at once (local presence), or once committed (shared)."""
    return change if isinstance(change, VM) else await change


def code(info: pytest.ExceptionInfo[CommandError]) -> str:
    return info.value.code.value


async def test_presence_is_by_session_key(inventory):
    a, b = Session("a"), Session("b")
    await inventory.add("vm", 64, 1, (DiskSpec("d", 1),), None)
    vm = await inventory.connect("vm", a)
    assert vm.holder == a.key and inventory.holds(vm, a) and not inventory.holds(vm, b)
    with pytest.raises(CommandError) as info:
        await inventory.connect("vm", b)
    assert code(info) == "conflict"
    assert (await inventory.connect("vm", a)) is vm  # idempotent for its holder
    for rule in (lambda: inventory.authorize("vm", b), lambda: inventory.disconnect("vm", b)):
        with pytest.raises(CommandError) as info:
            await done(rule())
        assert code(info) == "not_connected"
    with pytest.raises(CommandError) as info:
        await inventory.update("vm", a, 128, None, None)
    assert code(info) == "not_authorized"
    await done(inventory.authorize("vm", a))
    with pytest.raises(CommandError) as info:
        await done(inventory.deauthorize("vm", b))
    assert code(info) == "not_authorized"
    with pytest.raises(CommandError) as info:
        await inventory.remove("vm")
    assert code(info) == "conflict"
    assert inventory.release(a) == ["vm"]
    await inventory.settle()  # shared presence: the release is a write
    assert vm.holder is None and not vm.authorized and a.vms == set()
    await inventory.connect("vm", b)  # free for another session now
    assert json.loads(inventory.connected_vms_json())[0]["vm_id"] == "vm"


async def test_clashes_only_the_database_sees_are_already_exists_and_conflict(inventory, db):
    """Rows written behind the inventory's back: its memory allows the write, the unique
    constraints refuse it, and the protocol hears already_exists / conflict; memory is unchanged."""
    await inventory.add("mine", 64, 1, (), None)
    await inventory.settle()
    vm_pk = query(db, "SELECT id FROM vms WHERE vm_id = 'mine'")[0][0]
    query(db, "INSERT INTO vms (vm_id, ram, cpu, created_at) VALUES ('ghost', 1, 1, 'x')")
    query(db, "INSERT INTO disks (disk_id, size, vm_id) VALUES ('ghost-disk', 1, ?)", (vm_pk,))
    before = bytes(inventory.all_vms_json()), bytes(inventory.all_disks_json())
    with pytest.raises(CommandError) as info:
        await inventory.add("ghost", 64, 1, (), None)
    assert info.value.code is ErrorCode.ALREADY_EXISTS and not isinstance(info.value, StorageError)
    with pytest.raises(CommandError) as info:
        await inventory.add("other", 64, 1, (DiskSpec("ghost-disk", 1),), None)
    assert info.value.code is ErrorCode.CONFLICT
    assert (bytes(inventory.all_vms_json()), bytes(inventory.all_disks_json())) == before
    assert not inventory.exists("ghost") and not inventory.exists("other")
    # The names are free in memory again (nothing left reserved), and the next write goes through.
    assert (await inventory.add("after", 64, 1, (DiskSpec("after-disk", 1),), None)).vm_id == "after"


async def test_memory_matches_a_fresh_load_after_every_kind_of_write(db):
    inv = Inventory(open_store(db))
    inv.start(asyncio.get_running_loop())
    s1, s2 = Session("s1"), Session("s2")
    try:
        await inv.add("vm-a", 1024, 1, (DiskSpec("a1", 10), DiskSpec("a2", 20)), None, owner=s1)
        await inv.add("vm-b", 2048, 2, (DiskSpec("b1", 5),), "scrypt$fakehash")
        await inv.add("vm-c", 1, 1, (), None)
        await inv.connect("vm-b", s2)
        await done(inv.authorize("vm-a", s1))
        await done(inv.authorize("vm-b", s2))
        await inv.update("vm-a", s1, 4096, None, (DiskSpec("a2", 25), DiskSpec("a3", 7)))  # drop, resize, add
        await inv.update("vm-b", s2, None, 4, (DiskSpec("b1", 5), DiskSpec("a1", 99)))  # a1 is free again
        await inv.remove("vm-c")
        inv.release(s1)
        inv.release(s2)
        await inv.settle()
        in_memory = bytes(inv.all_vms_json()), bytes(inv.all_disks_json())
        history = json.loads(await inv.history(None, None, None, None, 100))
    finally:
        inv.close()
    assert await reloaded(db) == in_memory
    assert [h["event"] for h in reversed(history) if h["vm_id"] == "vm-a"] == [
        "vm_added", "vm_connected", "vm_authorized", "vm_updated", "vm_disconnected"]
    assert [h["vm_id"] for h in history if h["event"] == "vm_removed"] == ["vm-c"]
    disks = json.loads(in_memory[1])
    assert [(d["disk_id"], d["size"], d["vm"]) for d in disks] == [
        ("a2", 25, "vm-a"), ("b1", 5, "vm-b"), ("a3", 7, "vm-a"), ("a1", 99, "vm-b")]
