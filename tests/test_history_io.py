"""History at scale: indexed reads, reads beside the writer (never in its queue), pruning in batches.

A real SQLite file with 200,000 history rows (written fast with executemany), real servers and
real sessions. Nothing is timed: that reads never hold up writes is shown by the order things
happen in while reads are deliberately held open in real read transactions on the server's own
reader connections, and by the writer's own counters; that no read scans the table is shown by
EXPLAIN QUERY PLAN and by counting the SQLite VM instructions a query runs.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import vmserver.backends.sqlite as sql
from conftest import Wire, running, vm_args
from vmserver.inventory import Inventory
from vmserver.backends.sqlite import READERS, SCHEMA_VERSION, Store, SQLiteStore

ROWS = 200_000
VMS = 2000
EVENTS = ("vm_connected", "vm_disconnected", "vm_authorized", "vm_deauthorized", "vm_updated")
REMOVED_EVERY = 50_000  # vm_removed is rare: 4 rows in all
NOW = time.time()
BASE = int(NOW) - ROWS - 3600  # one row a second, ending an hour ago: all within --history-days


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"


def row(i: int) -> tuple[str, str, str, str, None]:
    event = "vm_removed" if i % REMOVED_EVERY == 7 else EVENTS[i % len(EVENTS)]
    return iso(BASE + i), f"vm-{i % VMS}", event, "127.0.0.1:1", None


def seed(path: str, rows: int = ROWS) -> None:
    Store(path).close()  # the current schema
    con = sqlite3.connect(path)
    try:
        with con:
            con.executemany("INSERT INTO history (ts, vm_id, event, peer, reason) VALUES (?, ?, ?, ?, ?)",
                            (row(i) for i in range(rows)))
    finally:
        con.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("history") / "template.db"
    seed(str(path))
    return path


@pytest.fixture
def big_db(template: Path, tmp_path: Path) -> str:
    """A fresh copy of the 200,000-row file for each test."""
    path = tmp_path / "vms.db"
    shutil.copyfile(template, path)
    return str(path)


LAST_REMOVED = max(i for i in range(ROWS) if i % REMOVED_EVERY == 7)


@functools.cache
def newest_first() -> list[tuple[int, tuple[str, str, str, str, None]]]:
    """(id, row) of the seeded history, newest first (row i has id i + 1)."""
    return [(i + 1, row(i)) for i in range(ROWS - 1, -1, -1)]


# --- schema v3 -------------------------------------------------------------------------------


def test_version_2_file_is_migrated_to_3_and_keeps_its_history(tmp_path):
    path = str(tmp_path / "v2.db")
    con = sqlite3.connect(path, isolation_level=None)
    for statement in sql.MIGRATIONS[0] + sql.MIGRATIONS[1]:
        con.execute(statement)
    con.execute("PRAGMA user_version = 2")
    con.executemany("INSERT INTO history (ts, vm_id, event, peer, reason) VALUES (?, ?, ?, ?, ?)",
                    [row(i) for i in range(10)] + [(iso(BASE + 10), "vm-x", "auth_failed", "127.0.0.1:2", "connect_vm")])
    con.close()
    s = Store(path)
    try:
        assert SCHEMA_VERSION == 3
        rows = s.write("read", sql.read_history, None, None, None, None, 100)
        assert [r[1:6] for r in reversed(rows)] == [row(i) for i in range(10)] + \
            [(iso(BASE + 10), "vm-x", "auth_failed", "127.0.0.1:2", "connect_vm")]
        assert {r[6] for r in rows} == {None}  # rows from before v3 stand for one event each
    finally:
        s.close()
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 3
        indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"history_by_vm", "history_by_ts", "history_by_event", "history_by_vm_event"} <= indexes
        assert "count" in [r[1] for r in con.execute("PRAGMA table_info(history)")]
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def v2_store_module() -> Any:
    """backends/sqlite.py as a version-2 server has it: the same code, knowing only the first two migrations."""
    spec = importlib.util.spec_from_file_location("vmserver.backends._sqlite_v2", sql.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    module.MIGRATIONS = module.MIGRATIONS[:2]
    module.SCHEMA_VERSION = 2
    return module


def test_a_version_2_server_refuses_a_version_3_file(tmp_path):
    path = str(tmp_path / "v3.db")
    seed(path, rows=5)
    old = v2_store_module()
    with pytest.raises(old.StorageError) as info:
        old.Store(path)
    assert "schema version 3, newer than this server's 2" in str(info.value)
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM history").fetchone()[0] == 5
    finally:
        con.close()
    Store(path).close()  # refused without a trace: the lock is free again


# --- every filter uses an index ------------------------------------------------------------------

FILTERS = [  # name, (vm_id, event, since, before), the index the query must go through
    ("none", (None, None, None, None), "SCAN history"),  # no filter: the table itself, newest first
    ("vm", ("vm-7", None, None, None), "history_by_vm"),
    ("rare-event", (None, "vm_removed", None, None), "history_by_event"),
    ("common-event", (None, "vm_connected", None, None), "history_by_event"),
    ("vm-rare-event", ("vm-7", "vm_removed", None, None), "history_by_vm_event"),
    ("vm-common-event", ("vm-7", "vm_connected", None, None), "history_by_vm_event"),
    ("before", (None, None, None, ROWS // 2), "INTEGER PRIMARY KEY"),
    ("since-recent", (None, None, iso(BASE + ROWS - 100), None), "history_by_ts"),  # few rows since: ts index
    ("since-future", (None, None, iso(NOW + 86400), None), "history_by_ts"),  # nothing to find
    ("since-all", (None, None, iso(BASE), None), "SCAN history"),  # every row matches: the newest at once
    ("vm-since-future", ("vm-7", None, iso(NOW + 86400), None), "history_by_ts"),
    ("event-since-future", (None, "vm_removed", iso(NOW + 86400), None), "history_by_ts"),
    ("vm-since-all", ("vm-7", None, iso(BASE), None), "history_by_vm"),
    ("event-since-all-before", (None, "vm_removed", iso(BASE), ROWS // 2), "history_by_event"),
    ("unknown-vm-event-since", ("nope", "vm_removed", iso(BASE), None), "history_by_vm_event"),
]
TABLE_SCAN_STEPS = 1_000_000  # VM instructions: reading 200,000 rows takes several million


@pytest.mark.parametrize("filters,index", [f[1:] for f in FILTERS], ids=[f[0] for f in FILTERS])
def test_each_filter_reads_through_an_index(template, filters, index):
    """The query read_history really runs (traced) goes through the expected index, and runs far
    fewer SQLite VM instructions than reading the table would."""
    con = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
    try:
        statements: list[str] = []
        steps = [0]

        def step() -> int:
            steps[0] += 1000
            return 0

        con.set_trace_callback(statements.append)
        con.set_progress_handler(step, 1000)
        rows = sql.read_history(con, *filters, 100)
        con.set_progress_handler(None, 0)
        con.set_trace_callback(None)
        assert steps[0] < TABLE_SCAN_STEPS, (steps[0], statements)
        plan = " | ".join(r[3] for r in con.execute("EXPLAIN QUERY PLAN " + statements[-1]))
        assert index in plan, plan
        assert "TEMP B-TREE" not in plan or "history_by_ts" in plan, plan  # only few rows are ever sorted
        vm_id, event, since, before = filters
        expected = [r for id, r in newest_first()  # the same filters, by brute force
                    if (vm_id is None or r[1] == vm_id) and (event is None or r[2] == event)
                    and (since is None or r[0] >= since) and (before is None or id < before)]
        assert [r[1:6] for r in rows] == expected[:100]
    finally:
        con.close()


# --- reads beside the writer ----------------------------------------------------------------------


async def test_history_reads_never_go_through_the_writer(big_db):
    """50 sessions reading history at once: the writer runs not one job for them."""
    async with running(big_db, history_days=0) as srv:
        wires = [await Wire.open(srv.address[1]) for _ in range(50)]
        try:
            writes, batches = srv.inventory.store.writer.writes, srv.inventory.store.writer.batches
            for w in wires:
                await w.send({"cmd": "get_history", "args": {"event": "vm_removed", "limit": 1}, "id": "h"})
            for w in wires:
                reply = await w.recv()
                assert reply["ok"] is True, reply
                assert [(r["vm_id"], r["event"], r["ts"]) for r in reply["result"]] == \
                    [(f"vm-{LAST_REMOVED % VMS}", "vm_removed", iso(BASE + LAST_REMOVED))]
            assert (srv.inventory.store.writer.writes, srv.inventory.store.writer.batches) == (writes, batches)
        finally:
            for w in wires:
                await w.close()


class HeldReads:
    """Every reader of a server busy in a real read transaction until released."""

    def __init__(self, store: SQLiteStore) -> None:
        assert store.db.readers is not None
        self.readers = store.db.readers
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.futures = [self.readers.submit("held read", self._hold) for _ in range(self.readers.size)]

    def _hold(self, db: sqlite3.Connection) -> int:
        count = db.execute("SELECT count(*) FROM history").fetchone()[0]  # the snapshot is taken
        self.started.release()
        assert self.gate.wait(30), "never released"
        return count

    async def all_started(self) -> None:
        for _ in self.futures:
            assert await asyncio.to_thread(self.started.acquire, True, 10), "a held read never started"

    def queued(self) -> int:
        return self.readers._pool._work_queue.qsize()  # reads waiting for a reader thread

    async def release(self) -> list[int]:
        self.gate.set()
        return [await asyncio.wrap_future(f) for f in self.futures]


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def test_writes_complete_while_every_reader_is_held(big_db):
    """All readers are held open in read transactions, 50 sessions' history reads wait behind
    them: a bystander's add_vm, connect_vm and disconnect_vm are still answered, and committed.
    Then the reads are let go and each session gets its own, right reply."""
    async with running(big_db, history_days=0) as srv:
        inv = srv.inventory
        readers = [await Wire.open(srv.address[1]) for _ in range(50)]
        bystander = await Wire.open(srv.address[1])
        held = HeldReads(inv.store)
        try:
            await held.all_started()
            for i, w in enumerate(readers):
                await w.send({"cmd": "get_history", "args": {"vm_id": f"vm-{i}", "limit": 1}, "id": i})
            await wait_until(lambda: held.queued() == len(readers), "every history read waits for a reader")
            writes = inv.store.writer.writes
            await bystander.ok("add_vm", **vm_args("during-reads", "during-reads-d"))
            assert (await bystander.ok("connect_vm", vm_id="during-reads"))["connected"] is True
            assert (await bystander.ok("disconnect_vm", vm_id="during-reads"))["connected"] is False
            assert await bystander.ok("health") == "OK"
            await wait_until(lambda: inv.store.writer.writes >= writes + 3, "the journaled disconnect is written")
            assert held.queued() == len(readers)  # not one read ran meanwhile, so none was ahead of a write
            assert len(inv.store.db.readers.connections) == READERS  # and never more readers than the bound
            con = sqlite3.connect(big_db)
            try:
                assert con.execute("SELECT vm_id FROM vms").fetchall() == [("during-reads",)]
            finally:
                con.close()
        finally:
            counts = await held.release()
        assert counts == [ROWS] * READERS  # each held read saw its snapshot from before the writes
        for i, w in enumerate(readers):
            reply = await w.recv()
            newest = max(j for j in range(ROWS) if j % VMS == i)
            assert reply["id"] == i and [r["ts"] for r in reply["result"]] == [iso(BASE + newest)], reply
        for w in readers + [bystander]:
            await w.close()


async def test_a_held_reader_holds_up_only_reads_beyond_the_bound(big_db):
    """With every reader held, one more read waits; other sessions' commands do not."""
    async with running(big_db, history_days=0) as srv:
        w, other = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        held = HeldReads(srv.inventory.store)
        try:
            await held.all_started()
            await w.send({"cmd": "get_history", "args": {"limit": 1}, "id": "late"})
            await wait_until(lambda: held.queued() == 1, "the extra read is queued")
            assert len(await other.ok("get_all_vms")) == 0
            assert (await other.ok("stats"))["disk_size"] == 0
            assert held.queued() == 1
        finally:
            await held.release()
        reply = await w.recv()
        assert reply["id"] == "late" and [r["ts"] for r in reply["result"]] == [iso(BASE + ROWS - 1)]
        await w.close()
        await other.close()


async def test_a_session_reads_its_own_presence_rows(db_path):
    """Presence rows are written without being awaited, and read on other connections: a read
    still sees every row its session journaled before it."""
    async with running(db_path) as srv:
        w = await Wire.open(srv.address[1])
        await w.ok("connect_vm", **vm_args("own", "own-d"))
        for _ in range(30):
            await w.ok("authorize_vm", vm_id="own")
            await w.ok("deauthorize_vm", vm_id="own")
            await w.ok("disconnect_vm", vm_id="own")
            rows = await w.ok("get_history", vm_id="own", limit=1)
            assert rows[0]["event"] == "vm_disconnected", rows
            await w.ok("connect_vm", vm_id="own")
        await w.close()


async def test_in_memory_database_reads_history_too():
    """:memory: cannot be read from a second connection: its history is read by the writer."""
    async with running(":memory:") as srv:
        assert srv.inventory.store.db.readers is None
        w = await Wire.open(srv.address[1])
        await w.ok("connect_vm", **vm_args("mem", "mem-d"))
        await w.ok("disconnect_vm", vm_id="mem")
        assert [r["event"] for r in await w.ok("get_history")] == ["vm_disconnected", "vm_connected", "vm_added"]
        await w.close()


# --- pruning in batches ---------------------------------------------------------------------------


async def test_pruning_is_many_short_writes_that_other_writes_pass(big_db):
    """Pruning 200,000 rows is 200 write jobs of 1,000 rows each; a write queued while it runs
    is committed long before pruning is done (the writer is FIFO and pruning queues one batch at
    a time), and pruning still deletes exactly the old rows."""
    store = SQLiteStore(big_db, busy_timeout_ms=200)
    inv = Inventory(store)
    inv.start(asyncio.get_running_loop())
    try:
        keep_from = ROWS - 500
        writes_before = inv.store.writer.writes
        pruning = asyncio.create_task(inv.prune_history(iso(BASE + keep_from)))
        await asyncio.sleep(0)  # its first batch is queued
        vm = await inv.add("passes", 1, 1, (), None)
        assert vm.vm_id == "passes"
        assert not pruning.done()
        con = sqlite3.connect(big_db)
        try:
            left = con.execute("SELECT count(*) FROM history WHERE ts < ?", (iso(BASE + keep_from),)).fetchone()[0]
        finally:
            con.close()
        assert left >= keep_from - 2 * sql_batch()  # at most two batches went before the add
        assert await asyncio.wait_for(pruning, 60) == keep_from
        assert inv.store.writer.writes - writes_before >= keep_from // sql_batch() + 1  # one job per batch, + the add
        rows = await asyncio.wrap_future(inv.store.db.readers.submit("check", sql.read_history, None, None, None,
                                                                   None, 10_000))
        assert [r[1] for r in rows if r[2] != "passes"] == [iso(BASE + i) for i in range(ROWS - 1, keep_from - 1, -1)]
        assert await inv.prune_history(iso(BASE + keep_from)) == 0
    finally:
        inv.store.writer.close()
        store.close()


def sql_batch() -> int:
    from vmserver.inventory import PRUNE_BATCH
    return PRUNE_BATCH
