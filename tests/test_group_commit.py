"""Group commit and paging: writes that arrive together share a transaction, fail alone, and
are acknowledged only once committed; big lists can be read page by page."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

import vmserver.backends.sqlite as sql
from vmserver.config import Config
from vmserver.listing import joined
from vmserver.server import start_server
from vmserver.backends.sqlite import Store
from vmserver.errors import ErrorCode, StorageError
from sqlite_jobs import calls_committer

from conftest import Wire, vm_args

NOW = "2026-01-01T00:00:00.000Z"


def test_write_batch_fails_one_job_alone(tmp_path):
    store = Store(str(tmp_path / "b.db"))
    try:
        store.write("seed", sql.insert_vm, "taken", 1, 1, None, [("d-taken", 1)], NOW)
        jobs = [
            ("add a", sql.insert_vm, ("a", 1, 1, None, [("d-a", 1)], NOW, None)),
            ("add clash", sql.insert_vm, ("clash", 1, 1, None, [("d-taken", 1)], NOW, None)),  # UNIQUE disk_id
            ("add b", sql.insert_vm, ("b", 2, 2, None, [("d-b", 1)], NOW, None)),
        ]
        outcomes = store.write_batch(jobs)
        assert [error is None for _, error in outcomes] == [True, False, True]
        # The database caught a clash memory did not know of: the protocol's conflict, not internal.
        assert outcomes[1][1].code is ErrorCode.CONFLICT and "add clash" in str(outcomes[1][1])
        vms, disks = store.load()
        assert [v.vm_id for v in vms] == ["taken", "a", "b"]
        # The failed job left nothing behind: not its VM row, not its disks.
        assert sorted(d.disk_id for d in disks) == ["d-a", "d-b", "d-taken"]
    finally:
        store.close()


def test_write_batch_runs_without_savepoints_until_a_job_fails(tmp_path):
    """The common case costs no savepoints; a failure reruns the batch isolated, with the same outcome."""
    store = Store(str(tmp_path / "s.db"))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        good = [(f"add {n}", sql.insert_vm, (n, 1, 1, None, [(f"d-{n}", 1)], NOW, None)) for n in ("a", "b", "c")]
        outcomes = store.write_batch(good)
        assert [error for _, error in outcomes] == [None] * 3
        assert not [s for s in statements if "SAVEPOINT" in s]
        assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
        statements.clear()
        clash = ("add clash", sql.insert_vm, ("e", 1, 1, None, [("d-a", 1)], NOW, None))  # UNIQUE disk_id
        outcomes = store.write_batch([good[0][:2] + (("d", 1, 1, None, [("d-d", 1)], NOW, None),), clash])
        assert [error is None for _, error in outcomes] == [True, False]
        assert "ROLLBACK" in statements and any("SAVEPOINT" in s for s in statements)
        vms, _ = store.load()
        # Ids as if the failed attempt never happened: the rerun took the same ones.
        assert [(v.id, v.vm_id) for v in vms] == [(1, "a"), (2, "b"), (3, "c"), (outcomes[0][0][0], "d")]
        assert outcomes[0][0][0] == 4
    finally:
        store.close()


def test_write_batch_a_job_with_a_bug_fails_alone(tmp_path):
    """Not only SQLite errors: a job that raises anything fails by itself and the others commit."""
    store = Store(str(tmp_path / "bug.db"))

    def broken(db, vm_id):
        sql.insert_vm(db, vm_id, 1, 1, None, [], NOW)
        raise TypeError("a bug")

    try:
        outcomes = store.write_batch([
            ("add a", sql.insert_vm, ("a", 1, 1, None, [], NOW, None)),
            ("broken", broken, ("half",)),
            ("add b", sql.insert_vm, ("b", 1, 1, None, [], NOW, None)),
        ])
        assert [error is None for _, error in outcomes] == [True, False, True]
        assert "broken failed: a bug" in str(outcomes[1][1])
        assert [v.vm_id for v in store.load()[0]] == ["a", "b"]  # nothing of the broken one
        alone = store.write_batch([("broken", broken, ("alone",))])
        assert alone[0][0] is None and isinstance(alone[0][1], StorageError)
        assert [v.vm_id for v in store.load()[0]] == ["a", "b"]
    finally:
        store.close()


async def test_writer_thread_survives_a_job_with_a_bug(tmp_path):
    store = Store(str(tmp_path / "w.db"))
    writer = calls_committer(store)
    writer.start(asyncio.get_running_loop())
    try:
        with pytest.raises(StorageError, match="oops"):
            await writer.submit("oops", (lambda db: 1 / 0,))
        # The thread is still there, and still commits.
        assert await writer.submit("add a", (sql.insert_vm, "a", 1, 1, None, [], NOW)) == (1, [])
        assert writer.writes == 2
    finally:
        writer.close()
        store.close()
    with pytest.raises(StorageError, match="stopping"):
        writer.submit("late", (sql.insert_vm, "late", 1, 1, None, [], NOW))


def test_write_batch_all_fail_when_the_transaction_cannot_start(tmp_path):
    path = str(tmp_path / "locked.db")
    store = Store(path, busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        outcomes = store.write_batch([("add a", sql.insert_vm, ("a", 1, 1, None, [], NOW, None))] * 3)
        assert all(result is None and isinstance(error, StorageError) for result, error in outcomes)
        other.execute("ROLLBACK")
        assert store.load() == ([], [])
    finally:
        other.close()
        store.close()


async def test_concurrent_writes_share_transactions(tmp_path):
    srv = await start_server(Config(host="127.0.0.1", port=0, db=str(tmp_path / "g.db")))
    try:
        port = srv.address[1]
        wires = [await Wire.open(port) for _ in range(40)]
        replies = await asyncio.gather(*(w.call("add_vm", **vm_args(f"g{i}", f"g{i}-d")) for i, w in enumerate(wires)))
        assert all(r["ok"] for r in replies)
        writer = srv.inventory.store.writer
        assert writer.writes >= 40
        assert writer.batches < writer.writes  # some of them shared a commit
        # Acknowledged means committed: a separate connection to the file sees every one.
        with sqlite3.connect(str(tmp_path / "g.db")) as db:
            assert db.execute("SELECT count(*) FROM vms").fetchone()[0] == 40
        for w in wires:
            await w.close()
    finally:
        await srv.close()
        srv.inventory.close()


async def test_one_commit_per_write_setting(tmp_path):
    srv = await start_server(Config(host="127.0.0.1", port=0, db=str(tmp_path / "one.db"), max_write_batch=1))
    try:
        wires = [await Wire.open(srv.address[1]) for _ in range(10)]
        replies = await asyncio.gather(*(w.call("add_vm", **vm_args(f"o{i}")) for i, w in enumerate(wires)))
        assert all(r["ok"] for r in replies)
        writer = srv.inventory.store.writer
        assert writer.writes >= 10 and writer.batches == writer.writes  # (the history pruner writes too)
        for w in wires:
            await w.close()
    finally:
        await srv.close()
        srv.inventory.close()


async def test_racing_adds_of_one_name_while_pending(wire, connect):
    """Reservations: while the first add waits for its commit, a second add of the same name or
    disk is refused at once, not failed by SQLite."""
    others = [await connect() for _ in range(5)]
    replies = await asyncio.gather(*(w.call("add_vm", **vm_args("same", f"s{i}")) for i, w in enumerate(others)))
    codes = sorted(r["error"]["code"] if not r["ok"] else "ok" for r in replies)
    assert codes == ["already_exists"] * 4 + ["ok"]
    replies = await asyncio.gather(*(w.call("add_vm", **vm_args(f"n{i}", "shared-disk")) for i, w in enumerate(others)))
    codes = sorted(r["error"]["code"] if not r["ok"] else "ok" for r in replies)
    assert codes == ["conflict"] * 4 + ["ok"]
    assert len(await wire.ok("get_all_disks")) == 2


async def test_paging_through_lists(wire):
    for i in range(7):
        await wire.ok("add_vm", **vm_args(f"p{i}", f"p{i}-a", f"p{i}-b"))
    everything = await wire.ok("get_all_vms")
    pages, after = [], 0
    while True:
        page = await wire.ok("get_all_vms", after=after, limit=3)
        pages.append(page)
        if len(page) < 3:
            break
        after = page[-1]["id"]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [vm for p in pages for vm in p] == everything
    assert await wire.ok("get_all_vms", limit=2) == everything[:2]
    assert await wire.ok("get_all_vms", after=everything[-1]["id"]) == []
    disks = await wire.ok("get_all_disks")
    assert await wire.ok("get_all_disks", after=disks[3]["id"], limit=4) == disks[4:8]
    await wire.ok("connect_vm", vm_id="p2")
    await wire.ok("connect_vm", vm_id="p5")
    await wire.ok("authorize_vm", vm_id="p5")
    assert [v["vm_id"] for v in await wire.ok("get_connected_vms", limit=1)] == ["p2"]
    assert [v["vm_id"] for v in await wire.ok("get_connected_vms", after=everything[2]["id"])] == ["p5"]
    assert [v["vm_id"] for v in await wire.ok("get_authorized_vms", limit=5)] == ["p5"]


@pytest.mark.parametrize("args", [{"limit": 0}, {"limit": 100001}, {"after": -1}, {"limit": "3"}, {"after": 1.5}])
async def test_paging_arguments_are_checked(wire, args):
    assert await wire.error("get_all_vms", **args) == "invalid_args"


async def test_large_replies_arrive_whole_while_others_are_served(tmp_path):
    """A list of megabytes is written a slice at a time; it arrives whole and exact, and a second
    session is answered in between."""
    path = str(tmp_path / "big.db")
    store = Store(path)
    for i in range(3000):
        store.write("seed", sql.insert_vm, f"big-{i}", 1024, 2, None, [(f"big-{i}-a", 10), (f"big-{i}-b", 20)], NOW)
    store.close()
    srv = await start_server(Config(host="127.0.0.1", port=0, db=path))
    try:
        big, other = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        await big.send('{"cmd":"get_all_vms","id":"big"}')
        await big.send('{"cmd":"get_all_disks","id":"disks"}')
        assert await other.ok("health") == "OK"
        line = await big.recv_line()
        assert len(line) > 600_000 and line.endswith(b"}\n")
        reply = __import__("json").loads(line)
        assert reply["id"] == "big" and [vm["vm_id"] for vm in reply["result"]] == [f"big-{i}" for i in range(3000)]
        assert line == b'{"id":"big","ok":true,"result":' + joined(srv.inventory.all_vms_json()) + b"}\n"
        disks = await big.recv()
        assert disks["id"] == "disks" and len(disks["result"]) == 6000
        assert await big.ok("health") == "OK"  # the session goes on after its large replies
        await big.close()
        await other.close()
    finally:
        await srv.close()
        srv.inventory.close()
