"""The SQLite backend (vmserver.backends.sqlite) and the Inventory over it, on real files, no network."""

from __future__ import annotations

import asyncio
import contextlib

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmserver.errors import CommandError, ErrorCode
from vmserver.inventory import Inventory
from vmserver.presence import session_key
import vmserver.backends.sqlite as sql
from vmserver.backends.base import DiskRow, VMRow
from vmserver.backends.sqlite import SCHEMA_VERSION, Store, SQLiteStore
from vmserver.errors import StorageError
from vmserver.validation import DiskSpec

NOW = "2026-01-02T03:04:05.678Z"
LATER = "2026-01-02T04:00:00.000Z"


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "inventory.db")


@pytest.fixture
def store(path: str) -> Iterator[Store]:
    s = Store(path, busy_timeout_ms=100)
    try:
        yield s
    finally:
        s.close()


def pragma(path: str, name: str):
    con = sqlite3.connect(path)
    try:
        return con.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        con.close()


@contextmanager
def writer_lock(path: str) -> Iterator[sqlite3.Connection]:
    """Another connection holding the write lock (BEGIN IMMEDIATE) on the same file."""
    con = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        con.execute("BEGIN IMMEDIATE")
        yield con
        if con.in_transaction:
            con.execute("ROLLBACK")
    finally:
        con.close()


def by_name(store: Store) -> tuple[dict[str, VMRow], dict[str, DiskRow]]:
    vms, disks = store.load()
    return {v.vm_id: v for v in vms}, {d.disk_id: d for d in disks}


# --- opening, schema, configuration --------------------------------------------------------


def test_new_file_is_created_and_migrated(path):
    assert not os.path.exists(path)
    s = Store(path)
    try:
        assert s.load() == ([], [])
    finally:
        s.close()
    assert SCHEMA_VERSION == 3
    assert pragma(path, "user_version") == SCHEMA_VERSION
    con = sqlite3.connect(path)
    try:
        names = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table','index')")}
    finally:
        con.close()
    assert {"vms", "disks", "disks_by_vm", "history", "history_by_vm", "history_by_ts", "history_by_event",
            "history_by_vm_event"} <= names


def test_version_1_file_is_migrated_and_keeps_its_data(path):
    """A file written by a version-1 server (no history table) is brought up to date on open."""
    con = sqlite3.connect(path, isolation_level=None)
    for statement in sql.MIGRATIONS[0]:
        con.execute(statement)
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO vms (vm_id, ram, cpu, password_hash, last_connected, created_at) "
                "VALUES ('old', 512, 1, NULL, NULL, ?)", (NOW,))
    con.execute("INSERT INTO disks (disk_id, size, vm_id) VALUES ('old-d', 5, 1)")
    con.close()
    s = Store(path)
    try:
        vms, disks = s.load()
        assert [(v.vm_id, v.ram) for v in vms] == [("old", 512)] and [d.disk_id for d in disks] == ["old-d"]
        s.write("history", sql.append_history, [(NOW, "old", "vm_connected", "127.0.0.1:1", None, None)])
        assert s.write("read", sql.read_history, "old", None, None, None, 10)[0][1:4] == (NOW, "old", "vm_connected")
    finally:
        s.close()
    assert pragma(path, "user_version") == SCHEMA_VERSION


def test_blank_file_is_migrated_with_wal(path):
    Path(path).write_bytes(b"")
    s = Store(path)
    try:
        assert pragma(path, "user_version") == SCHEMA_VERSION
        assert pragma(path, "journal_mode") == "wal"
        assert s.load() == ([], [])
    finally:
        s.close()


def test_foreign_keys_are_enforced(store):
    # A disk for a VM row that does not exist must be refused (foreign_keys = ON).
    with pytest.raises(StorageError) as info:
        store.write("update", sql.update_vm, 999, 1, 1, [], [], [("orphan", 5)])
    assert "FOREIGN KEY" in str(info.value)
    assert store.load() == ([], [])


def test_foreign_keys_pragma_is_on_on_the_store_connection(store):
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 100


def test_reopening_keeps_data_and_version(path):
    s = Store(path)
    vm_pk, disk_pks = s.write("insert", sql.insert_vm, "vm-1", 2048, 2, "scrypt$x", [("d1", 10)], NOW)
    s.close()
    assert not os.path.exists(path + "-wal")  # the last close checkpoints the WAL away
    s2 = Store(path)
    try:
        vms, disks = s2.load()
    finally:
        s2.close()
    assert vms == [VMRow(vm_pk, "vm-1", 2048, 2, "scrypt$x", None)]
    assert disks == [DiskRow(disk_pks[0], "d1", 10, vm_pk)]
    assert pragma(path, "user_version") == SCHEMA_VERSION


def test_newer_schema_version_is_refused(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE future (x)")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(StorageError) as info:
        Store(path)
    message = str(info.value)
    assert path in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    # Refused, not migrated: nothing of ours was created and the version is untouched.
    con = sqlite3.connect(path)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    assert tables == {"future"}
    assert pragma(path, "user_version") == SCHEMA_VERSION + 1


def test_file_that_is_not_a_database(path):
    Path(path).write_bytes(b"this is not an SQLite database, just text\n" * 100)
    with pytest.raises(StorageError) as info:
        Store(path)
    assert not isinstance(info.value, sqlite3.Error)
    assert path in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    # The file is left as it was.
    assert Path(path).read_bytes() == b"this is not an SQLite database, just text\n" * 100


def test_unopenable_path(tmp_path):
    bad = str(tmp_path / "no" / "such" / "dir" / "x.db")
    with pytest.raises(StorageError) as info:
        Store(bad)
    assert not isinstance(info.value, sqlite3.Error)
    assert bad in str(info.value)


# --- round trips ---------------------------------------------------------------------------------


def test_insert_and_load_round_trip(store):
    pk1, d1 = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("zeta", 30), ("alpha", 10), ("mid", 20)], NOW)
    pk2, d2 = store.write("insert", sql.insert_vm, "vm-2", 4096, 8, "scrypt$abc", [], NOW, last_connected=LATER)
    assert pk2 > pk1
    assert len(d1) == 3 and d1 == sorted(d1) and len(set(d1)) == 3
    assert d2 == []
    vms, disks = store.load()
    assert vms == [VMRow(pk1, "vm-1", 1024, 1, None, None), VMRow(pk2, "vm-2", 4096, 8, "scrypt$abc", LATER)]
    # Disk ids come back in the order the disks were given.
    assert disks == [DiskRow(d1[0], "zeta", 30, pk1), DiskRow(d1[1], "alpha", 10, pk1), DiskRow(d1[2], "mid", 20, pk1)]


def test_update_removes_resizes_and_adds(store):
    pk, (a, b, c) = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("a", 1), ("b", 2), ("c", 3)], NOW)
    other_pk, (x,) = store.write("insert", sql.insert_vm, "vm-2", 512, 1, None, [("x", 9)], NOW)
    added = store.write("update", sql.update_vm, pk, 2048, 4, remove=[a], resize=[(c, 30)], add=[("d", 4), ("e", 5)])
    assert len(added) == 2 and added[0] < added[1] and added[0] > x
    vms, disks = store.load()
    assert vms == [VMRow(pk, "vm-1", 2048, 4, None, None), VMRow(other_pk, "vm-2", 512, 1, None, None)]
    assert disks == [
        DiskRow(b, "b", 2, pk), DiskRow(c, "c", 30, pk), DiskRow(x, "x", 9, other_pk),
        DiskRow(added[0], "d", 4, pk), DiskRow(added[1], "e", 5, pk),
    ]


def test_update_without_disk_changes(store):
    pk, (a,) = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("a", 1)], NOW)
    assert store.write("update", sql.update_vm, pk, 8, 2, [], [], []) == []
    assert store.load() == ([VMRow(pk, "vm-1", 8, 2, None, None)], [DiskRow(a, "a", 1, pk)])


def test_disk_ids_are_never_reused(store):
    pk, (a, b) = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("a", 1), ("b", 2)], NOW)
    store.write("update", sql.update_vm, pk, 1024, 1, remove=[b], resize=[], add=[])
    (c,) = store.write("update", sql.update_vm, pk, 1024, 1, remove=[], resize=[], add=[("b", 2)])
    assert c > b  # AUTOINCREMENT: the highest removed id is not handed out again


def test_set_last_connected(store):
    pk, _ = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [], NOW)
    store.write("connect", sql.set_last_connected, pk, LATER)
    assert store.load()[0] == [VMRow(pk, "vm-1", 1024, 1, None, LATER)]
    store.write("connect", sql.set_last_connected, pk, NOW)
    assert store.load()[0][0].last_connected == NOW


# --- failures are whole ---------------------------------------------------------------------------


def test_failed_insert_leaves_nothing_behind(store, path):
    pk, (d1,) = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("d1", 10)], NOW)
    before = store.load()
    with pytest.raises(StorageError) as info:
        store.write("insert", sql.insert_vm, "vm-2", 2048, 2, None, [("fresh", 5), ("d1", 7)], NOW)
    assert not isinstance(info.value, sqlite3.Error)
    assert path in str(info.value)
    assert "UNIQUE" in str(info.value)
    assert store.load() == before
    vms, disks = by_name(store)
    assert "vm-2" not in vms
    assert "fresh" not in disks
    # And the connection is usable again (no transaction left open).
    pk3, _ = store.write("insert", sql.insert_vm, "vm-3", 1, 1, None, [("fresh", 5)], NOW)
    assert set(by_name(store)[0]) == {"vm-1", "vm-3"}


def test_failed_insert_of_duplicate_vm_id(store):
    store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [], NOW)
    before = store.load()
    with pytest.raises(StorageError):
        store.write("insert", sql.insert_vm, "vm-1", 1, 1, None, [("new", 1)], NOW)
    assert store.load() == before


def test_check_constraint_becomes_store_error(store):
    with pytest.raises(StorageError):
        store.write("insert", sql.insert_vm, "vm-1", 0, 1, None, [], NOW)
    with pytest.raises(StorageError):
        store.write("insert", sql.insert_vm, "vm-2", 1, 1, None, [("d", 0)], NOW)
    assert store.load() == ([], [])


def test_failed_update_leaves_nothing_half_written(store):
    pk, (a, b) = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("a", 1), ("b", 2)], NOW)
    store.write("insert", sql.insert_vm, "vm-2", 512, 1, None, [("taken", 9)], NOW)
    before = store.load()
    with pytest.raises(StorageError) as info:
        store.write("update", sql.update_vm, pk, 4096, 8, remove=[a], resize=[(b, 50)], add=[("new", 3), ("taken", 1)])
    assert "UNIQUE" in str(info.value)
    assert store.load() == before


def test_write_while_another_connection_holds_the_lock(store, path):
    with writer_lock(path):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("d1", 1)], NOW)
        elapsed = time.monotonic() - start
        assert "locked" in str(info.value)
        assert path in str(info.value)
        assert 0.09 <= elapsed < 3.0
        with pytest.raises(StorageError):
            store.write("connect", sql.set_last_connected, 1, NOW)
        # Reads still work in WAL mode while another connection writes.
        assert store.load() == ([], [])
    # Once the lock is gone, the same store writes again.
    pk, _ = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("d1", 1)], NOW)
    assert [v.vm_id for v in store.load()[0]] == ["vm-1"]


def test_update_while_locked_changes_nothing(store, path):
    pk, (a,) = store.write("insert", sql.insert_vm, "vm-1", 1024, 1, None, [("a", 1)], NOW)
    before = store.load()
    with writer_lock(path):
        with pytest.raises(StorageError):
            store.write("update", sql.update_vm, pk, 2, 2, [a], [], [("b", 1)])
    assert store.load() == before


# --- the Inventory on a Store ---------------------------------------------------------------------


class Session:
    def __init__(self, name: str) -> None:
        self.key = session_key()
        self.name = name
        self.vms: set[str] = set()
        self.authenticated = True
        self.ended = False


def all_vms(inv: Inventory) -> list[dict]:
    return json.loads(inv.all_vms_json())


def all_disks(inv: Inventory) -> list[dict]:
    return json.loads(inv.all_disks_json())


def persistent_state(inv: Inventory) -> tuple:
    """What must survive a restart, built from fresh records (not from cached JSON)."""
    vms = []
    for rec in all_vms(inv):
        vm = inv.get(rec["vm_id"])
        fresh = vm.record()
        fresh.pop("connected")
        fresh.pop("authorized")
        vms.append((fresh, vm.password_hash))
    disks = [(d["id"], d["disk_id"], d["size"], d["vm_id"], d["vm"]) for d in all_disks(inv)]
    return vms, disks


@contextmanager
def loaded_snapshot(path: str) -> Iterator[Inventory]:
    """A fresh Inventory loaded from a snapshot of the file (SQLite's backup API).

    A snapshot, since a second Store on the live file is refused by its lock.
    """
    copy = f"{path}.snapshot"
    with contextlib.closing(sqlite3.connect(path)) as src, contextlib.closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    fresh = Inventory(SQLiteStore(copy))
    try:
        yield fresh
    finally:
        fresh.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            if os.path.exists(copy + suffix):
                os.remove(copy + suffix)


def reloaded_state(path: str) -> tuple:
    """persistent_state of a fresh Inventory loaded from (a snapshot of) the file."""
    with loaded_snapshot(path) as fresh:
        return persistent_state(fresh)


def test_second_store_on_the_same_file_is_refused(path):
    first = Store(path)
    try:
        with pytest.raises(StorageError) as info:
            Store(path)
        assert "in use by another vmserver" in str(info.value) and path in str(info.value)
        assert str(os.getpid()) in str(info.value)
    finally:
        first.close()
    Store(path).close()  # released by close()


def assert_caches_fresh(inv: Inventory) -> None:
    for rec in all_vms(inv):
        vm = inv.get(rec["vm_id"])
        assert rec == vm.record()
        assert [d.id for d in vm.disks] == sorted(d.id for d in vm.disks)


async def settled(inventory: Inventory) -> None:
    """Wait until the writer has committed everything queued (history rows are not awaited)."""
    await inventory.settle()


@pytest.fixture
async def inventory(path):
    """An Inventory on the SQLite backend whose writer thread runs (on the test's loop)."""
    inv = Inventory(SQLiteStore(path, busy_timeout_ms=100))
    inv.start(asyncio.get_running_loop())
    yield inv
    inv.store.close()


async def test_inventory_add_failure_leaves_memory_unchanged(inventory, path):
    owner = Session("s1")
    await inventory.add("vm-0", 64, 1, (DiskSpec("d0", 1),), None)
    vms_before, disks_before = inventory.all_vms_json(), inventory.all_disks_json()
    await settled(inventory)
    with writer_lock(path):
        with pytest.raises(StorageError):
            await inventory.add("vm-1", 1024, 2, (DiskSpec("d1", 10), DiskSpec("d2", 20)), "scrypt$h", owner=owner)
    assert not inventory.exists("vm-1")
    assert len(inventory) == 1
    assert owner.vms == set()
    assert inventory.all_vms_json() == vms_before
    assert inventory.all_disks_json() == disks_before
    with pytest.raises(CommandError) as info:
        inventory.get("vm-1")
    assert info.value.code is ErrorCode.NOT_FOUND
    # Neither the VM id nor the disk ids are left claimed: the same add now succeeds.
    inventory.check_can_add("vm-1", (DiskSpec("d1", 10), DiskSpec("d2", 20)))
    vm = await inventory.add("vm-1", 1024, 2, (DiskSpec("d1", 10), DiskSpec("d2", 20)), "scrypt$h", owner=owner)
    assert [d.disk_id for d in vm.disks] == ["d1", "d2"]
    assert owner.vms == {"vm-1"}
    assert reloaded_state(path) == persistent_state(inventory)


async def test_inventory_update_failure_leaves_memory_unchanged(inventory, path):
    owner = Session("s1")
    await inventory.add("vm-1", 1024, 2, (DiskSpec("a", 1), DiskSpec("b", 2)), None, owner=owner)
    await inventory.add("vm-2", 512, 1, (DiskSpec("x", 5),), None)
    inventory.authorize("vm-1", owner)
    vm = inventory.get("vm-1")
    record_before = vm.record()
    json_before = vm.json()
    disks_before = inventory.all_disks_json()
    disk_objects_before = list(vm.disks)
    await settled(inventory)
    with writer_lock(path):
        with pytest.raises(StorageError):
            await inventory.update("vm-1", owner, 4096, 8, (DiskSpec("b", 20), DiskSpec("new", 3)))
    assert vm.record() == record_before
    assert (vm.ram, vm.cpu) == (1024, 2)
    assert [(d.disk_id, d.size) for d in vm.disks] == [("a", 1), ("b", 2)]
    assert vm.disks == disk_objects_before
    assert vm.json() == json_before
    assert inventory.all_disks_json() == disks_before
    assert vm.holder == owner.key and vm.authorized
    # "a" still belongs to vm-1 and "new" was never claimed.
    with pytest.raises(CommandError) as info:
        inventory.check_can_add("vm-3", (DiskSpec("a", 1),))
    assert info.value.code is ErrorCode.CONFLICT
    inventory.check_can_add("vm-3", (DiskSpec("new", 1),))
    assert reloaded_state(path) == persistent_state(inventory)
    # The same update goes through once the lock is gone.
    await inventory.update("vm-1", owner, 4096, 8, (DiskSpec("b", 20), DiskSpec("new", 3)))
    assert [(d.disk_id, d.size) for d in vm.disks] == [("b", 20), ("new", 3)]
    assert reloaded_state(path) == persistent_state(inventory)


async def test_inventory_connect_failure_leaves_memory_unchanged(inventory, path):
    owner = Session("s1")
    await inventory.add("vm-1", 1024, 2, (), None)
    vm = inventory.get("vm-1")
    await settled(inventory)
    with writer_lock(path):
        with pytest.raises(StorageError):
            await inventory.connect("vm-1", owner)
    assert vm.holder is None
    assert vm.last_connected is None
    assert owner.vms == set()
    assert json.loads(vm.json())["connected"] is False
    assert inventory.connected_vms_json() == b"[]"


async def test_inventory_matches_a_fresh_load_after_many_operations(inventory, path):
    s1, s2 = Session("s1"), Session("s2")
    await inventory.add("vm-a", 1024, 1, (DiskSpec("a1", 10), DiskSpec("a2", 20)), None, owner=s1)
    await inventory.add("vm-b", 2048, 2, (DiskSpec("b1", 5),), "scrypt$fakehash")
    await inventory.add("vm-c", 1, 1, (), None)
    await inventory.connect("vm-b", s2)
    inventory.authorize("vm-a", s1)
    inventory.authorize("vm-b", s2)
    # Remove a1, resize a2, add a3.
    await inventory.update("vm-a", s1, 4096, None, (DiskSpec("a2", 25), DiskSpec("a3", 7)))
    # a1 is free again: vm-b takes it; cpu only on vm-b.
    await inventory.update("vm-b", s2, None, 4, (DiskSpec("b1", 5), DiskSpec("a1", 99)))
    await inventory.update("vm-b", s2, 512, None, None)
    inventory.deauthorize("vm-b", s2)
    inventory.disconnect("vm-a", s1)
    await inventory.connect("vm-c", s1)
    inventory.authorize("vm-c", s1)
    await inventory.update("vm-c", s1, None, None, (DiskSpec("c1", 1),))
    await inventory.update("vm-c", s1, None, None, ())

    assert_caches_fresh(inventory)
    with loaded_snapshot(path) as fresh:
        assert persistent_state(fresh) == persistent_state(inventory)

        vms, disks = persistent_state(inventory)
        assert [(v["vm_id"], v["ram"], v["cpu"]) for v, _ in vms] == [("vm-a", 4096, 1), ("vm-b", 512, 4), ("vm-c", 1, 1)]
        assert [(d[1], d[2], d[4]) for d in disks] == [("a2", 25, "vm-a"), ("b1", 5, "vm-b"), ("a3", 7, "vm-a"),
                                                     ("a1", 99, "vm-b")]
        assert [h for _, h in vms] == [None, "scrypt$fakehash", None]
        assert all(v["last_connected"] is not None for v, _ in vms)

        # Presence is memory-only: once every session is released, the whole lists are byte-equal.
        assert sorted(inventory.release(s1)) == ["vm-c"]
        assert inventory.release(s2) == ["vm-b"]
        assert s1.vms == set() and s2.vms == set()
        assert inventory.all_vms_json() == fresh.all_vms_json()
        assert inventory.all_disks_json() == fresh.all_disks_json()
        assert fresh.connected_vms_json() == b"[]" and fresh.authorized_vms_json() == b"[]"


# --- stored facts match what happened (presence at the edges, shutdown) ---------------------------


@dataclass(frozen=True)
class Hold:
    """A write job that runs a test's function on the writer's connection."""

    fn: Any


sql._WRITES[Hold] = lambda db, w: w.fn(db)


class HeldWriter:
    """The writer thread busy with a real write job that waits until released."""

    def __init__(self, inv: Inventory) -> None:
        self.gate, self.started = threading.Event(), threading.Event()

        def hold(db: sqlite3.Connection) -> None:
            self.started.set()
            assert self.gate.wait(30), "never released"

        self.future = inv.store.writer.submit("held write", Hold(hold))

    async def running(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10), "the held write never started"

    async def release(self) -> None:
        self.gate.set()
        await self.future


def stored_history(path: str, vm_id: str) -> list[tuple]:
    """(event, peer, reason) of ``vm_id``'s history in the file, newest first."""
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT event, peer, reason FROM history WHERE vm_id = ? ORDER BY id DESC",
                           (vm_id,)).fetchall()
    finally:
        con.close()


async def test_connect_of_a_new_vm_whose_session_ended_before_the_commit(inventory, path):
    """connect_vm of a new VM commits vm_added and vm_connected together; if the session ends
    before that commit, the VM is not bound to it, and a vm_disconnected row (with why it
    ended) follows, so the history says it connected and went. No presence events: to the
    live view it was never connected."""
    events: list[tuple] = []
    inventory.feed.listen(lambda event, vm_id, data: events.append((event, vm_id, json.loads(data()).get("reason"))))
    owner = Session("127.0.0.1:1")
    held = HeldWriter(inventory)
    await held.running()
    adding = asyncio.create_task(inventory.add("orphan", 64, 1, (DiskSpec("orphan-d", 1),), None, owner=owner))
    await asyncio.sleep(0)  # the add is queued behind the held write
    assert inventory.release(owner, "shutdown") == []  # nothing bound yet
    await held.release()
    vm = await adding
    await settled(inventory)
    assert vm.holder is None and owner.vms == set() and inventory.connected_vms_json() == b"[]"
    assert stored_history(path, "orphan") == [
        ("vm_disconnected", "127.0.0.1:1", "shutdown"), ("vm_connected", "127.0.0.1:1", None),
        ("vm_added", "127.0.0.1:1", None)]
    assert events == [("vm_added", "orphan", None)]
    assert vm.last_connected is not None  # it was connected, for no time at all
    assert reloaded_state(path) == persistent_state(inventory)


async def test_a_registration_that_fails_leaves_no_orphan_mark(inventory, path):
    owner = Session("s1")
    await settled(inventory)
    with writer_lock(path):
        adding = asyncio.create_task(inventory.add("fails", 64, 1, (), None, owner=owner))
        await asyncio.sleep(0)
        inventory.release(owner)
        with pytest.raises(StorageError):
            await adding
    again = Session("s2")
    vm = await inventory.add("fails", 64, 1, (), None, owner=again)
    assert vm.holder == again.key
    await settled(inventory)
    assert stored_history(path, "fails") == [("vm_connected", "s2", None), ("vm_added", "s2", None)]


async def test_close_disconnects_what_sessions_still_hold_and_stores_it(path):
    """Sessions cut off at shutdown may not have ended when the inventory closes: their VMs
    are disconnected then (reason shutdown) and the rows written before the writer stops."""
    inv = Inventory(SQLiteStore(path, busy_timeout_ms=100))
    inv.start(asyncio.get_running_loop())
    straggler = Session("127.0.0.1:2")
    await inv.add("held-1", 64, 1, (), None, owner=straggler)
    await inv.add("held-2", 64, 1, (), None, owner=straggler)
    inv.authorize("held-1", straggler)
    inv.close()
    assert straggler.ended and straggler.vms == set()
    assert inv.release(straggler) == []  # its session ending later finds nothing left to do
    for vm_id in ("held-1", "held-2"):
        assert stored_history(path, vm_id)[0] == ("vm_disconnected", "127.0.0.1:2", "shutdown")


async def test_close_leaves_the_database_open_under_a_busy_writer(path):
    """The writer's join times out (a write is stuck): the store is not closed under it; the
    stuck write and those queued behind it commit once it moves, and close() again closes."""
    store = SQLiteStore(path, busy_timeout_ms=100)
    inv = Inventory(store)
    inv.start(asyncio.get_running_loop())
    held = HeldWriter(inv)
    await held.running()
    queued = inv.store.submit("queued", None, [(NOW, "late", "vm_added", None, None, None)])
    inv.close(timeout=0.2)
    assert store.db._db.execute("SELECT count(*) FROM history").fetchone() == (0,)  # still open
    with pytest.raises(StorageError):
        Store(path)  # and still ours
    await held.release()
    await queued
    inv.close(timeout=5)
    assert stored_history(path, "late") == [("vm_added", None, None)]
    Store(path).close()  # the lock was released
