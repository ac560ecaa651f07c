"""The PostgreSQL store, against a real PostgreSQL (the sandbox): schema and versions, group
commit with a failing job, unique clashes, two stores on one database, start errors, and
faults while running (connections killed, PostgreSQL stopped and restarted, commits cut off
midway, a partition longer than the lease). Each test drives the real store under a running loop: start(loop),
submit writes, await their futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

from vmserver.backends import open_store  # noqa: E402
from vmserver.backends.base import AddVM, Connect, PruneHistory, RemoveVM, Snapshot, UpdateVM, VMRow  # noqa: E402
from vmserver.backends.pg_sandbox import Sandbox  # noqa: E402
from vmserver.backends.postgres import SCHEMA_VERSION, PostgresStore, mask_dsn  # noqa: E402
from vmserver.changes import VMAdded  # noqa: E402
from vmserver.backends.sqlite import SQLiteStore  # noqa: E402
from vmserver.errors import CommandError, ErrorCode, StorageError  # noqa: E402

SECRET = "hunter2-not-in-any-log"  # the sandbox trusts every connection: any password is accepted
WAIT = 10.0  # no wait in these tests is longer than this
NOW = "2026-11-26T21:00:00.000Z"


def with_password(dsn: str) -> str:
    return dsn.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@", 1)


def dbname(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def add(vm_id: str, *disks: str, size: int = 10) -> AddVM:
    return AddVM(vm_id, 1024, 2, None, tuple((d, size) for d in disks), NOW, None)


def row(vm_id: str, event: str = "vm_added", ts: str = NOW, peer: str | None = "127.0.0.1:5000",
        reason: str | None = None, count: int | None = None) -> tuple:
    return (ts, vm_id, event, peer, reason, count)


@contextlib.asynccontextmanager
async def running(dsn: str, **kwargs: Any) -> AsyncIterator[PostgresStore]:
    """A started store; closed (off the loop: close joins threads that may need it) after."""
    store = PostgresStore(dsn, **kwargs)
    store.start(asyncio.get_running_loop())
    try:
        yield store
    finally:
        assert await asyncio.to_thread(store.close, WAIT)


async def write(store: PostgresStore, what: str, job: Any, history: tuple = ()) -> Any:
    return await asyncio.wait_for(store.submit(what, job, history), WAIT)


async def failure(store: PostgresStore, what: str, job: Any, history: tuple = ()) -> CommandError:
    with pytest.raises(CommandError) as caught:
        await write(store, what, job, history)
    return caught.value


async def eventually_writes(store: PostgresStore, prefix: str, seconds: float = WAIT) -> tuple[list[CommandError], str]:
    """Add VMs until one commits: the failures before it, and the one that committed."""
    failures: list[CommandError] = []
    deadline = time.monotonic() + seconds
    n = 0
    while True:
        n += 1
        try:
            await write(store, f"add {prefix}{n}", add(f"{prefix}{n}"))
            return failures, f"{prefix}{n}"
        except CommandError as exc:
            failures.append(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"no write committed within {seconds}s: {failures[-3:]}")
        await asyncio.sleep(0.02)


def vm_names(sandbox: Sandbox, dsn: str) -> list[str]:
    return sandbox.psql("SELECT vm_id FROM vms ORDER BY id", db=dbname(dsn)).split()


async def until(predicate: Any, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text


# --- mask_dsn (pure) ------------------------------------------------------------------------


@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://vm:pw@db.example:5432/inv", "postgresql://vm:***@db.example:5432/inv"),
    ("postgres://vm@db/inv", "postgres://vm@db/inv"),
    ("postgresql://db/inv", "postgresql://db/inv"),
    ("postgresql://:pw@db/inv", "postgresql://:***@db/inv"),
    ("postgresql://vm:p@ss/w:rd@db:5432/inv", "postgresql://vm:***@db:5432/inv"),  # unescaped @ and /
    ("postgresql://vm:p%40ss@db/inv?sslmode=require", "postgresql://vm:***@db/inv?sslmode=require"),
    ("postgresql://vm@db/inv?password=pw&sslmode=require", "postgresql://vm@db/inv?password=***&sslmode=require"),
    ("postgresql://vm:pw@db/inv?sslpassword=key", "postgresql://vm:***@db/inv?sslpassword=***"),
    ("host=db user=vm password=pw dbname=inv", "host=db user=vm password=*** dbname=inv"),
    ("host=db password='p w\\'x' dbname=inv", "host=db password=*** dbname=inv"),
])
def test_mask_dsn(dsn: str, shown: str) -> None:
    assert mask_dsn(dsn) == shown


# --- schema --------------------------------------------------------------------------------


async def test_schema_created_then_reopened_untouched(pg_sandbox: Sandbox, pg_dsn: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmserver.backends.postgres")
    db = dbname(pg_dsn)
    async with running(pg_dsn) as store:
        a = await write(store, "add a", add("a", "a0", "a1"), (row("a"),))
    assert f"migrated from schema version 0 to {SCHEMA_VERSION}" in caplog.text
    tables = pg_sandbox.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", db=db).split()
    assert tables == ["disks", "history", "vms", "vmserver_feed", "vmserver_presence", "vmserver_schema",
                      "vmserver_servers"]
    assert pg_sandbox.psql("SELECT version FROM vmserver_schema", db=db).split() == [str(SCHEMA_VERSION)]
    indexes = pg_sandbox.psql("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1", db=db).split()
    for index in ("disks_by_vm", "history_by_vm", "history_by_ts", "history_by_event", "history_by_vm_event"):
        assert index in indexes

    caplog.clear()
    store = PostgresStore(pg_dsn)  # a second start: nothing to migrate, nothing lost
    try:
        vms, disks = store.load()
    finally:
        store.close()
    assert "migrated" not in caplog.text
    assert [(v.id, v.vm_id) for v in vms] == [(a[0], "a")]
    assert [(d.id, d.disk_id, d.vm_pk) for d in disks] == [(a[1][0], "a0", a[0]), (a[1][1], "a1", a[0])]
    assert pg_sandbox.psql("SELECT count(*) FROM vmserver_schema", db=db).split() == ["1"]


def test_newer_schema_refused_before_anything_is_touched(pg_sandbox: Sandbox, pg_dsn: str) -> None:
    PostgresStore(pg_dsn).close()
    db = dbname(pg_dsn)
    pg_sandbox.psql(f"UPDATE vmserver_schema SET version = {SCHEMA_VERSION + 1}", db=db)
    with pytest.raises(StorageError) as caught:
        PostgresStore(with_password(pg_dsn))
    label = mask_dsn(with_password(pg_dsn))
    assert caught.value.message == (f"database {label} has schema version {SCHEMA_VERSION + 1}, newer than this "
                                    f"server's {SCHEMA_VERSION}; upgrade vmserver")
    assert caught.value.code is ErrorCode.INTERNAL
    assert_no_secret(caught.value.message)
    assert pg_sandbox.psql("SELECT count(*) FROM vmserver_servers", db=db).split() == ["0"]  # no lease taken


def test_two_servers_starting_at_once_on_a_new_database(pg_sandbox: Sandbox, pg_dsn: str) -> None:
    """Both find no schema; one creates it (the migration lock), and both then serve, each
    with a lease of its own."""
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []

    def start() -> None:
        barrier.wait()
        try:
            outcomes.append(PostgresStore(pg_dsn))
        except StorageError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    stores = [o for o in outcomes if isinstance(o, PostgresStore)]
    try:
        assert len(stores) == 2, outcomes
        assert [store.load() for store in stores] == [([], []), ([], [])]
        assert len({store.lease.id for store in stores}) == 2
        assert pg_sandbox.psql("SELECT count(*) FROM vmserver_servers", db=dbname(pg_dsn)).split() == ["2"]
    finally:
        for store in stores:
            store.close()
    assert pg_sandbox.psql("SELECT count(*) FROM vmserver_servers", db=dbname(pg_dsn)).split() == ["0"]  # given back


# --- group commit ------------------------------------------------------------------------------


@contextlib.contextmanager
def vms_locked(dsn: str) -> Iterator[psycopg.Connection]:
    """Hold the vms table from another session: the writer's next VM write waits for it, and
    the writes queued meanwhile all go into the batch after it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE vms IN EXCLUSIVE MODE")
        try:
            yield conn
        finally:
            with contextlib.suppress(psycopg.OperationalError):  # a test may have ended this session
                conn.execute("ROLLBACK")


async def writer_waiting(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        await until(lambda: conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0)


async def test_a_batch_with_failing_jobs_commits_the_others(pg_sandbox: Sandbox, pg_dsn: str) -> None:
    db = dbname(pg_dsn)
    async with running(pg_dsn) as store:
        pg_sandbox.psql("INSERT INTO vms (vm_id, ram, cpu, created_at) VALUES ('hand', 1, 1, 'x');"
                        "INSERT INTO disks (disk_id, size, vm_id) SELECT 'hand-disk', 1, id FROM vms", db=db)
        with vms_locked(pg_dsn) as side:
            first = store.submit("add first", add("first"), (row("first"),))
            await writer_waiting(pg_dsn)
            batch = store.batches
            futures = [store.submit("add a", add("a", "a0"), (row("a"),)),
                       store.submit("add hand", add("hand"), (row("hand"),)),
                       store.submit("add b", add("b", "b0", "hand-disk"), (row("b"),)),
                       store.submit("add c", add("c", "c0", "c1"), (row("c"),)),
                       store.submit("note", None, (row("c", "vm_connected"),))]
            side.execute("ROLLBACK")
        await asyncio.wait_for(first, WAIT)
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)
        assert store.batches == batch + 2  # the first alone, then all the others in one transaction
        a, hand, b, c, note = results
        assert isinstance(hand, CommandError) and hand.code is ErrorCode.ALREADY_EXISTS
        assert hand.message == "add hand: the VM already exists in the database"
        assert isinstance(b, CommandError) and b.code is ErrorCode.CONFLICT
        assert b.message == "add b: a disk id already belongs to another VM in the database"
        assert note is None
        vms, disks = store.load()
        assert [v.vm_id for v in vms] == ["hand", "first", "a", "c"]
        assert a == (vms[2].id, [disks[-3].id]) and c == (vms[3].id, [disks[-2].id, disks[-1].id])
        assert [d.disk_id for d in disks] == ["hand-disk", "a0", "c0", "c1"]
        history = await store.read_history(None, None, None, None, 10)
        assert [(h[2], h[3]) for h in history] == [("c", "vm_connected"), ("c", "vm_added"), ("a", "vm_added"),
                                                   ("first", "vm_added")]  # b's and hand's rows went with them


async def test_every_write_kind_as_sqlite_does(pg_dsn: str, tmp_path: Path) -> None:
    """The same writes on both stores: the same results, then the same snapshot, ids included."""
    sqlite = SQLiteStore(str(tmp_path / "vms.db"))
    sqlite.start(asyncio.get_running_loop())
    try:
        async with running(pg_dsn) as pg:
            answers = []
            for store in (sqlite, pg):
                got = [await write(store, "add a", add("a", "a0", "a1", "a2"), (row("a"),)),
                       await write(store, "add b", add("b"), (row("b"),))]
                a_pk, (d0, d1, d2) = got[0]
                got.append(await write(store, "update a", UpdateVM(a_pk, 2048, 4, (d0,), ((d1, 99),),
                                                                   (("a0", 5), ("a9", 6))), (row("a", "vm_updated"),)))
                got.append(await write(store, "connected", Connect(a_pk, "2026-11-27T00:00:00.000Z"),
                                       (row("a", "vm_connected"),)))
                got.append(await write(store, "remove b", RemoveVM(got[1][0]), (row("b", "vm_removed"),)))
                got.append(await write(store, "failures", None, (row("a", "auth_failed", reason="login", count=3),)))
                got.append(await write(store, "prune", PruneHistory("2026-11-26T21:00:00.001Z", 2)))
                got.append(await write(store, "prune", PruneHistory("2026-11-26T21:00:00.001Z", 100)))
                answers.append(got)
            assert answers[0] == answers[1]
            assert answers[1][-2:] == [2, 4]
            assert sqlite.snapshot() == pg.snapshot()
            assert sqlite.load() == pg.load()
    finally:
        await asyncio.to_thread(sqlite.close)


@pytest.fixture
def icu_dsn(pg_sandbox: Sandbox) -> Iterator[str]:
    """A fresh database whose default collation is ICU's, not byte order (as a real one would be)."""
    name = f"icu_{uuid.uuid4().hex[:12]}"
    pg_sandbox.psql(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und'")
    yield pg_sandbox.dsn(name)
    pg_sandbox.drop_database(name)


def mixed_batch(vm1: tuple, vm2: tuple, vm3: tuple, clash: bool) -> list[tuple[str, Any, tuple]]:
    """Runs of every kind, with the cases where running a run as one statement could differ from
    one by one: a VM and a disk changed twice, a disk_id freed and taken again, prunes between
    writes, and, with ``clash``, a job that fails (a disk_id taken). The batch's own history
    rows are newer than the prunes' cutoff: PostgreSQL writes a batch's rows last (numbered at
    its commit, as the change feed), so a prune in a batch never sees them, where SQLite one by
    one would."""
    (pk1, (d1a, d1b)), (pk2, (d2a,)), (pk3, _) = vm1, vm2, vm3
    later = "2026-11-26T21:00:00.002Z"

    def row(vm_id: str, event: str = "vm_added", ts: str = later, **kw: Any) -> tuple:
        return globals()["row"](vm_id, event, ts, **kw)
    jobs = [
        ("update 1", UpdateVM(pk1, 2048, 2, (d1a,), ((d1b, 50),), (("x", 1),)), (row("vm1", "vm_updated"),)),
        ("update 2", UpdateVM(pk2, 512, 1, (), ((d2a, 7),), (("d1a", 3),)), (row("vm2", "vm_updated"),)),
        ("update 1 again", UpdateVM(pk1, 4096, 8, (), ((d1b, 60),), ()), (row("vm1", "vm_updated"),)),
        ("rows", None, (row("vm2", "vm_connected"), row("vm2", "auth_failed", reason="login", count=2))),
        ("connected", Connect(pk2, "2026-11-27T00:00:00.000Z"), ()),
        ("add 4", add("vm4", "d4a", "d4b"), (row("vm4"),)),
        ("add 5", add("vm5"), (row("vm5"),)),
        ("remove 3", RemoveVM(pk3), (row("vm3", "vm_removed"),)),
        ("prune", PruneHistory("2026-11-26T21:00:00.001Z", 4), ()),
        ("add 6", add("vm6", "d6a"), (row("vm6", ts=later),)),
        ("prune again", PruneHistory("2026-11-26T21:00:00.001Z", 100), ()),
        ("update 2 again", UpdateVM(pk2, 256, 1, (), (), (("d2b", 1),)), (row("vm2", "vm_updated", ts=later),)),
    ]
    if clash:
        jobs.insert(3, ("update clash", UpdateVM(pk2, 1, 1, (), (), (("d1b", 1),)), (row("vm2", "vm_updated"),)))
        jobs.insert(9, ("add clash", add("vm5"), (row("vm5"),)))
    return jobs


def outcome(result: Any) -> Any:
    return (result.code, result.message) if isinstance(result, CommandError) else result


@pytest.mark.parametrize("clash", [False, True])
async def test_a_batch_of_every_kind_as_sqlite_one_by_one(pg_dsn: str, tmp_path: Path, clash: bool) -> None:
    sqlite = SQLiteStore(str(tmp_path / "vms.db"))
    sqlite.start(asyncio.get_running_loop())
    try:
        async with running(pg_dsn) as pg:
            setup = []
            for store in (sqlite, pg):
                setup.append([await write(store, "add 1", add("vm1", "d1a", "d1b"), (row("vm1"),)),
                              await write(store, "add 2", add("vm2", "d2a"), (row("vm2"),)),
                              await write(store, "add 3", add("vm3", "d3a"), (row("vm3"),))])
            assert setup[0] == setup[1]
            jobs = mixed_batch(*setup[0], clash=clash)
            await write(sqlite, "add first", add("first"))
            expected = []
            for what, job, history in jobs:  # SQLite, one write at a time: the meaning to keep
                try:
                    expected.append(await write(sqlite, what, job, history))
                except CommandError as exc:
                    expected.append(exc)
            with vms_locked(pg_dsn) as side:
                first = pg.submit("add first", add("first"))
                await writer_waiting(pg_dsn)
                batches = pg.batches
                futures = [pg.submit(what, job, history) for what, job, history in jobs]
                side.execute("ROLLBACK")
            await asyncio.wait_for(first, WAIT)
            got = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)
            assert pg.batches == batches + 2  # all of them in one transaction
            mine, theirs = pg.snapshot(), sqlite.snapshot()
            assert [h[3] for h in mine.history][:2] == ["vm_updated", "vm_updated"]  # pruned: the setup's rows
            if not clash:
                assert [outcome(r) for r in got] == [outcome(r) for r in expected]
                assert mine == theirs  # ids included
                return
            # The batch ran twice (straight through, then job by job): the ids the first try took
            # are skipped, everything else is the same.
            assert [outcome(r) for r in got if isinstance(r, CommandError)] == [
                outcome(r) for r in expected if isinstance(r, CommandError)] and len(
                [r for r in got if isinstance(r, CommandError)]) == 2
            assert [isinstance(r, CommandError) for r in got] == [isinstance(r, CommandError) for r in expected]

            def by_name(snap: Snapshot) -> tuple:
                names = {v[0]: v[1] for v in snap.vms}
                return ([v[1:] for v in snap.vms], sorted((d[1], d[2], names[d[3]]) for d in snap.disks),
                        [h[1:] for h in snap.history])
            assert by_name(mine) == by_name(theirs)
    finally:
        await asyncio.to_thread(sqlite.close)


async def test_read_history_filters_as_sqlite(icu_dsn: str, tmp_path: Path) -> None:
    """Text compares as bytes, as in SQLite, whatever the database's collation ('Z' < 'a')."""
    rows = []
    for i in range(60):
        ts = f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:00:00.{i:03d}Z"
        rows.append(row(f"vm{i % 4}", ("vm_added", "vm_connected", "auth_failed")[i % 3], ts,
                        peer=None if i % 5 == 0 else f"10.0.0.{i}:1", reason="login" if i % 3 == 2 else None,
                        count=i if i % 6 == 2 else None))
    sqlite = SQLiteStore(str(tmp_path / "vms.db"))
    sqlite.start(asyncio.get_running_loop())
    try:
        async with running(icu_dsn) as pg:
            for store in (sqlite, pg):
                await write(store, "history", None, tuple(rows))
            cases = 0
            for vm_id in (None, "vm1", "nobody"):
                for event in (None, "vm_connected", "auth_failed"):
                    for since in (None, "2026-11-10T00:00:00.000Z", "2026-11-10", "2026-11-28T00:00:00.000Z",
                                  "2026-11-0", "2027", "2026-11-11T10:00:00.010z", "2026-11-11T10:00:00.010_"):
                        for before in (None, 40, 1):
                            for limit in (1, 7, 100):
                                expected = await sqlite.read_history(vm_id, event, since, before, limit)
                                got = await pg.read_history(vm_id, event, since, before, limit)
                                assert got == expected, (vm_id, event, since, before, limit)
                                cases += bool(expected)
            assert cases > 100  # most combinations find rows: the filters were compared on data
    finally:
        await asyncio.to_thread(sqlite.close)


async def test_reads_are_never_queued_behind_writes(pg_dsn: str) -> None:
    async with running(pg_dsn) as store:
        await write(store, "rows", None, (row("a"),))
        with vms_locked(pg_dsn) as side:
            stuck = store.submit("add a", add("a"))
            await writer_waiting(pg_dsn)
            history = await asyncio.wait_for(store.read_history("a", None, None, None, 10), WAIT)
            assert [h[2] for h in history] == ["a"]
            assert not stuck.done()
            side.execute("ROLLBACK")
        await asyncio.wait_for(stuck, WAIT)


# --- clashes with rows the in-memory checks cannot see ------------------------------------------


async def test_unique_violations_from_rows_inserted_by_hand(pg_sandbox: Sandbox, pg_dsn: str) -> None:
    db = dbname(pg_dsn)
    async with running(pg_dsn) as store:
        mine = await write(store, "add mine", add("mine", "m0"))
        pg_sandbox.psql("INSERT INTO vms (vm_id, ram, cpu, created_at) VALUES ('x', 1, 1, 'then');"
                        "INSERT INTO disks (disk_id, size, vm_id) SELECT 'dx', 1, id FROM vms WHERE vm_id = 'x'", db=db)
        taken = await failure(store, "add_vm x", add("x"), (row("x"),))
        assert (taken.code, taken.message) == (ErrorCode.ALREADY_EXISTS, "add_vm x: the VM already exists in the database")
        clash = await failure(store, "add_vm y", add("y", "y0", "dx"))
        assert clash.code is ErrorCode.CONFLICT
        update = await failure(store, "update_vm mine", UpdateVM(mine[0], 1, 1, (), (), (("dx", 3),)))
        assert (update.code, update.message) == (
            ErrorCode.CONFLICT, "update_vm mine: a disk id already belongs to another VM in the database")
        bad = await failure(store, "add_vm z", AddVM("z", 0, 1, None, (), NOW, None))  # a check constraint
        assert bad.code is ErrorCode.INTERNAL and bad.message.startswith(f"database {store.label}: add_vm z failed: ")
        assert vm_names(pg_sandbox, pg_dsn) == ["mine", "x"]
        assert pg_sandbox.psql("SELECT count(*) FROM history", db=db).split() == ["0"]
        assert pg_sandbox.psql("SELECT size FROM disks WHERE disk_id = 'm0'", db=db).split() == ["10"]


# --- the one-server lock and start errors ---------------------------------------------------------


async def test_a_second_store_on_the_same_database_hears_the_first(pg_dsn: str) -> None:
    """Two stores on one database: what one commits reaches the other through the feed, as the
    change its maker applied, in order."""
    async with running(pg_dsn) as first, running(with_password(pg_dsn)) as second:
        heard: list[Any] = []
        second.on_change = heard.append
        made = []
        for name in ("x", "y", "z"):
            def changes(result: Any, name: str = name) -> list[Any]:
                change = VMAdded(VMRow(result[0], name, 1024, 2, None, None), ())
                made.append(change)
                return [change]
            await asyncio.wait_for(first.submit(f"add {name}", add(name), (row(name),), changes=changes), WAIT)
        await until(lambda: len(heard) == 3)
        assert heard == made[:3]
        assert first.feed is not None and second.feed is not None
        await until(lambda: second.feed.applied == first.feed.applied)
        assert first.lease.id != second.lease.id


def test_unreachable_server_is_one_line_without_the_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(StorageError) as caught:
            PostgresStore(f"postgresql://vm:{SECRET}@127.0.0.1:{port}/inventory", connect_timeout=2)
    assert caught.value.message == f"cannot connect to PostgreSQL at 127.0.0.1:{port}: Connection refused"
    assert caught.value.code is ErrorCode.INTERNAL
    assert_no_secret(caught.value.message, caplog.text)


def test_open_store_takes_a_dsn(pg_dsn: str) -> None:
    store = open_store(pg_dsn, max_batch=7)
    try:
        assert isinstance(store, PostgresStore) and store.writer.max_batch == 7
    finally:
        store.close()


def test_wrong_password_and_missing_database(own_pg: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    own_pg.psql("CREATE ROLE vm LOGIN PASSWORD 'right-password'; CREATE DATABASE inv OWNER vm")
    hba = own_pg.data_dir / "pg_hba.conf"
    hba.write_text("host all vm 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    own_pg.psql("SELECT pg_reload_conf()")
    where = f"127.0.0.1:{own_pg.port}"
    with pytest.raises(StorageError) as caught:
        PostgresStore(own_pg.dsn("inv", user="vm", password=SECRET))
    assert caught.value.message == f'cannot connect to PostgreSQL at {where}: password authentication failed for user "vm"'
    with pytest.raises(StorageError) as missing:
        PostgresStore(own_pg.dsn("nosuch", user="vm", password="right-password"))
    assert missing.value.message == f'cannot connect to PostgreSQL at {where}: database "nosuch" does not exist'
    store = PostgresStore(own_pg.dsn("inv", user="vm", password="right-password"))
    assert store.label == f"postgresql://vm:***@{where}/inv"
    store.close()
    assert_no_secret(caught.value.message, caplog.text)
    assert "right-password" not in caplog.text


# --- faults while running -----------------------------------------------------------------------


async def test_killed_connections_fail_writes_then_come_back_by_themselves(
        pg_sandbox: Sandbox, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = with_password(pg_dsn)
    async with running(dsn) as store:
        await write(store, "add before", add("before"))
        with vms_locked(pg_dsn):
            in_flight = store.submit("add in-flight", add("in-flight"))
            await writer_waiting(pg_dsn)
            assert pg_sandbox.terminate(dbname(pg_dsn)) >= 2  # the store's and the side session
            with pytest.raises(StorageError) as caught:
                await asyncio.wait_for(in_flight, WAIT)
        assert caught.value.code is ErrorCode.INTERNAL
        assert "the connection was lost" in caught.value.message and "nothing was written" in caught.value.message
        failures, committed = await eventually_writes(store, "after")
        assert all(isinstance(f, StorageError) for f in failures)
        assert vm_names(pg_sandbox, pg_dsn) == ["before", committed]  # the failed ones wrote nothing
        assert (await store.read_history(None, None, None, None, 1)) == []  # the readers reconnect too
    assert_no_secret(caplog.text)
    assert "connection back after" in caplog.text


async def test_writes_under_repeated_kills_are_answered_truthfully(pg_sandbox: Sandbox, pg_dsn: str) -> None:
    """Writers keep writing while the store's sessions are killed again and again: every write
    acknowledged is in the database, every one refused is not (none is left unknown here:
    PostgreSQL stays up to answer)."""
    db = dbname(pg_dsn)
    acked: list[str] = []
    refused: list[str] = []
    async with running(pg_dsn) as store:
        stop = time.monotonic() + 3.0

        async def writer(w: int) -> None:
            n = 0
            while time.monotonic() < stop:
                n += 1
                name = f"w{w}n{n}"
                try:
                    await write(store, f"add {name}", add(name, f"{name}d"), (row(name),))
                    acked.append(name)
                except CommandError as exc:
                    assert exc.code is ErrorCode.INTERNAL and "unknown" not in exc.message, exc
                    refused.append(name)
                    await asyncio.sleep(0.01)

        async def killer() -> None:
            while time.monotonic() < stop:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(pg_sandbox.terminate, db)

        await asyncio.gather(killer(), *(writer(w) for w in range(8)))
        await eventually_writes(store, "last")
    stored = set(vm_names(pg_sandbox, pg_dsn))
    assert acked and refused
    assert set(acked) <= stored and not stored & set(refused)
    history = set(pg_sandbox.psql("SELECT vm_id FROM history", db=db).split())
    assert set(acked) <= history and not history & set(refused)


async def test_an_idle_store_notices_its_connection_die_and_reconnects(pg_sandbox: Sandbox, pg_dsn: str) -> None:
    async with running(pg_dsn) as store:
        old = store._conn.info.backend_pid
        assert pg_sandbox.terminate(dbname(pg_dsn)) >= 1
        await until(lambda: store._conn is not None and store._conn.info.backend_pid != old)
        await write(store, "add a", add("a"))  # first time: no write had to fail to find out


async def test_postgresql_stopped_restarted_and_killed_under_it(own_pg: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = with_password(own_pg.create_database("inv"))
    async with running(dsn) as store:
        a = await write(store, "add a", add("a", "a0"))
        await asyncio.to_thread(own_pg.stop, "fast")
        started = time.monotonic()
        for n in range(20):  # each fails at once: none waits for PostgreSQL to come back
            error = await failure(store, f"add down{n}", add(f"down{n}"))
            assert isinstance(error, StorageError) and error.code is ErrorCode.INTERNAL
        assert time.monotonic() - started < WAIT / 2
        with pytest.raises(StorageError):
            await asyncio.wait_for(store.read_history(None, None, None, None, 10), WAIT)
        await asyncio.to_thread(own_pg.start)
        failures, committed = await eventually_writes(store, "up")
        await asyncio.to_thread(own_pg.restart, "fast")
        failures, again = await eventually_writes(store, "again")
        assert await write(store, "update a", UpdateVM(a[0], 1, 1, (), (), (("a1", 1),))) != []
        acknowledged = [await write(store, f"add k{n}", add(f"k{n}")) for n in range(5)]
        await asyncio.to_thread(own_pg.kill)  # a crash: every acknowledged write is still there after it
        await asyncio.to_thread(own_pg.start)
        failures, crashed = await eventually_writes(store, "crashed")
        assert [v.id for v in store.load()[0]][-6:-1] == [k[0] for k in acknowledged]
    assert vm_names(own_pg, dsn) == ["a", committed, again, *[f"k{n}" for n in range(5)], crashed]
    assert_no_secret(caplog.text)


async def test_a_store_cut_off_past_its_lease_gives_up_then_rejoins(pg_sandbox: Sandbox, pg_dsn: str,
                                                                    proxy: Proxy) -> None:
    """Cut off from PostgreSQL: the store gives up its lease (``on_unavailable``, on the loop)
    before the lease can expire, refuses every write meanwhile, and once it is back takes a new
    lease (``on_available``) and reaps its old one."""
    events: list[tuple[str, bool]] = []
    async with running(proxy.dsn(pg_dsn), lease_ttl=3) as store:
        loop_thread = threading.current_thread()
        store.on_unavailable = lambda why: events.append(("lost", threading.current_thread() is loop_thread))
        store.on_available = lambda: events.append(("held", threading.current_thread() is loop_thread))
        await write(store, "add a", add("a"))
        old = store.lease.id
        cut = time.monotonic()
        proxy.pause(partition=True)
        await until(lambda: events == [("lost", True)])
        assert time.monotonic() - cut < 3  # before the lease could expire
        assert store.lease.id is None
        refused = await failure(store, "add b", add("b"))
        assert refused.code is ErrorCode.INTERNAL
        expired = pg_sandbox.psql(f"SELECT expires_at < clock_timestamp() FROM vmserver_servers WHERE lease = {old}",
                                  db=dbname(pg_dsn)).split()
        assert expired in (["f"], ["t"])  # still there: nobody reaped it (no other server)
        proxy.resume()
        await until(lambda: events == [("lost", True), ("held", True)])
        assert store.lease.id not in (None, old)
        await eventually_writes(store, "c")
        await until(lambda: pg_sandbox.psql(f"SELECT count(*) FROM vmserver_servers WHERE lease = {old}",
                                            db=dbname(pg_dsn)).split() == ["0"])  # reaped at a renewal


async def test_a_write_queued_before_the_loop_heard_of_a_new_lease_is_not_fenced_by_it(
        pg_sandbox: Sandbox, pg_dsn: str) -> None:
    """The lease expires behind the store's back and its lease thread takes a new one while
    the loop is busy (as when a paused server wakes). A write the loop queues before it has
    heard of that was checked against memory under the old lease: it must not commit under
    the new one (it did: a woken server's stale session updated a VM held elsewhere)."""
    async with running(pg_dsn, lease_ttl=3) as store:
        await write(store, "add a", add("a"))
        old = store.lease.id
        pg_sandbox.psql(f"UPDATE vmserver_servers SET expires_at = clock_timestamp() - interval '1 second' "
                        f"WHERE lease = {old}", db=dbname(pg_dsn))
        deadline = time.monotonic() + WAIT
        while store.lease.id in (None, old):  # the loop is held here: it hears of nothing meanwhile
            assert time.monotonic() < deadline, "the lease thread took no new lease"
            time.sleep(0.02)
        stale = store.submit("add stale", add("stale"))  # queued before the loop heard
        with pytest.raises(CommandError) as caught:
            await asyncio.wait_for(stale, WAIT)
        assert "lease" in caught.value.message
        assert "stale" not in vm_names(pg_sandbox, pg_dsn)
        await eventually_writes(store, "fresh")  # under the new lease, once the loop has heard
        assert store.lease.id not in (None, old)  # the stale write's fence did not cost the new lease


class Proxy:
    """A TCP proxy between a store and PostgreSQL that a test can cut: all connections at once
    (``pause``, until ``resume``), or the next one that sends a COMMIT, which is then either
    forwarded (PostgreSQL commits, its reply is lost) or dropped (PostgreSQL rolls back)."""

    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.paused = False
        self.hung = False  # connections stay open but nothing goes through (a stopped server)
        self.on_commit: str | None = None  # "forward" or "drop", once
        self.pause_on_commit = False
        self.cut = threading.Event()
        self._guard = threading.Lock()
        self._pairs: list[list[Any]] = []  # [client, upstream, cut]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def dsn(self, dsn: str) -> str:
        return re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{self.port}/", dsn)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.paused:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = [client, upstream, False]
            with self._guard:
                self._pairs.append(pair)
            for args in ((pair, client, upstream, True), (pair, upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, pair: list[Any], src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.on_commit and b"COMMIT" in data:
                    mode, self.on_commit = self.on_commit, None
                    pair[2] = True  # from here on nothing reaches the client
                    if self.pause_on_commit:
                        self.paused = True
                    if mode == "forward":
                        dst.sendall(data)
                        dst.shutdown(socket.SHUT_WR)  # after the COMMIT, an end of stream: no reset
                    else:
                        _shut(dst)
                    _shut(src)
                    self.cut.set()
                    return
                if self.hung:
                    continue  # swallowed: the peer waits for an answer that never comes
                if not pair[2]:
                    dst.sendall(data)
        except OSError:
            pass
        if not pair[2]:
            _shut(dst)

    def pause(self, partition: bool = False) -> None:
        """Cut every connection; refuse new ones until resume(). ``partition``: PostgreSQL's side
        of each stays open, as when a network fails, so its sessions live on (and hold their locks)."""
        self.paused = True
        with self._guard:
            for pair in self._pairs:
                client, upstream, _ = pair
                if partition:
                    pair[2] = True
                    _shut(client)
                else:
                    _shut(client)
                    _shut(upstream)

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        _shut(self.listener)  # wakes the accept() under way (closing alone would not)
        self.listener.close()
        self.paused = True
        with self._guard:
            for client, upstream, _ in self._pairs:
                _shut(client)
                _shut(upstream)
        for thread in self._threads:
            thread.join(WAIT)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy(pg_sandbox: Sandbox) -> Iterator[Proxy]:
    p = Proxy(pg_sandbox.port)
    yield p
    p.close()


async def test_a_commit_whose_reply_is_lost_is_answered_committed(pg_sandbox: Sandbox, pg_dsn: str,
                                                                  proxy: Proxy) -> None:
    async with running(proxy.dsn(pg_dsn)) as store:
        await write(store, "add a", add("a"))
        proxy.on_commit = "forward"
        got = await write(store, "add b", add("b", "b0"), (row("b"),))
        assert proxy.cut.is_set()
        vms, disks = store.load()
        assert got == (vms[1].id, [disks[0].id]) and vms[1].vm_id == "b"
        await write(store, "add c", add("c"))
    assert vm_names(pg_sandbox, pg_dsn) == ["a", "b", "c"]


async def test_a_commit_cut_off_before_it_happened_fails(pg_sandbox: Sandbox, pg_dsn: str, proxy: Proxy) -> None:
    async with running(proxy.dsn(pg_dsn)) as store:
        proxy.on_commit = "drop"
        error = await failure(store, "add b", add("b", "b0"), (row("b"),))
        assert proxy.cut.is_set()
        assert error.code is ErrorCode.INTERNAL and "which did not happen; nothing was written" in error.message
        await write(store, "add c", add("c"))
    assert vm_names(pg_sandbox, pg_dsn) == ["c"]
    assert pg_sandbox.psql("SELECT count(*) FROM history", db=dbname(pg_dsn)).split() == ["0"]


@pytest.mark.parametrize("done", [True, False])
async def test_a_commit_nobody_can_answer_in_time_is_reported_unknown(
        pg_sandbox: Sandbox, pg_dsn: str, proxy: Proxy, caplog: pytest.LogCaptureFixture, done: bool) -> None:
    caplog.set_level(logging.INFO)
    async with running(proxy.dsn(pg_dsn)) as store:
        store.resolve_wait = 0.3
        proxy.on_commit, proxy.pause_on_commit = ("forward" if done else "drop"), True
        started = time.monotonic()
        error = await failure(store, "add b", add("b"))
        assert time.monotonic() - started < WAIT / 2  # bounded: it did not wait for the database
        assert error.code is ErrorCode.INTERNAL and "whether it was written is unknown" in error.message
        assert "could not be asked within" in caplog.text
        proxy.resume()
        await eventually_writes(store, "later")
        if done:
            await until(lambda: "did commit: the in-memory inventory misses its writes" in caplog.text)
    assert ("b" in vm_names(pg_sandbox, pg_dsn)) is done
    if not done:
        assert "did commit" not in caplog.text


async def test_its_own_session_left_behind_by_a_partition_is_ended(pg_sandbox: Sandbox, pg_dsn: str, proxy: Proxy,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL still sees the old primary session when the store comes back (a partition):
    the store ends it (an open transaction of it would hold row locks), and writes."""
    async with running(proxy.dsn(pg_dsn)) as store:
        await write(store, "add a", add("a"))
        old = store._conn.info.backend_pid
        proxy.pause(partition=True)
        await until(lambda: store._conn is None)
        alive = pg_sandbox.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {old}", db=dbname(pg_dsn)).split()
        assert alive == ["1"]  # the old session lives on
        proxy.resume()
        await eventually_writes(store, "b")
        await until(lambda: pg_sandbox.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {old}",
                                            db=dbname(pg_dsn)).split() == ["0"])


async def test_a_write_with_no_answer_is_cut_off(pg_sandbox: Sandbox, pg_dsn: str, proxy: Proxy) -> None:
    """PostgreSQL hangs (its host answers keepalives, its timeouts do not run): the batch fails
    after the deadline, the writes behind it fail at once, and the store comes back once it does."""
    async with running(proxy.dsn(pg_dsn)) as store:
        store.batch_deadline = 0.5
        await write(store, "add a", add("a"))
        proxy.hung = True
        stuck = store.submit("add b", add("b"))
        behind = [store.submit(f"add q{n}", add(f"q{n}")) for n in range(5)]
        with pytest.raises(StorageError, match="the connection was lost .*nothing was written"):
            await asyncio.wait_for(stuck, WAIT)
        results = await asyncio.wait_for(asyncio.gather(*behind, return_exceptions=True), WAIT)
        assert all(isinstance(r, StorageError) for r in results)
        proxy.hung = False
        await eventually_writes(store, "c")
    assert vm_names(pg_sandbox, pg_dsn)[:1] == ["a"] and "b" not in vm_names(pg_sandbox, pg_dsn)


async def test_a_history_read_with_no_answer_fails_in_time(pg_sandbox: Sandbox, pg_dsn: str, proxy: Proxy) -> None:
    """PostgreSQL hangs under a get_history: the read fails after its deadline (the session is
    answered internal, not left waiting), and reads work again once PostgreSQL answers."""
    async with running(proxy.dsn(pg_dsn)) as store:
        store.read_deadline = 0.5
        await write(store, "add a", add("a"), (row("a"),))
        assert [r[2] for r in await store.read_history(None, None, None, None, 10)] == ["a"]
        proxy.hung = True
        with pytest.raises(StorageError, match="read history failed: no answer within 0.5s"):
            await asyncio.wait_for(store.read_history("a", None, None, None, 10), WAIT)
        proxy.hung = False
        deadline = time.monotonic() + WAIT
        while True:
            try:
                rows = await store.read_history("a", None, None, None, 10)
                break
            except StorageError:
                assert time.monotonic() < deadline, "reads did not come back"
                await asyncio.sleep(0.1)
        assert [r[2] for r in rows] == ["a"]


async def test_what_another_server_wrote_meanwhile_is_heard_once_back(pg_sandbox: Sandbox, pg_dsn: str,
                                                                    proxy: Proxy) -> None:
    """Cut off for a while (shorter than the lease): another server's writes of that time reach
    this store through the feed once it is back, none lost, in order."""
    heard: list[Any] = []
    async with running(proxy.dsn(pg_dsn)) as store:
        store.on_change = heard.append
        await write(store, "add a", add("a"))
        proxy.pause()
        await until(lambda: store._conn is None)
        async with running(pg_dsn) as other:
            for name in ("o1", "o2"):
                await asyncio.wait_for(other.submit(f"add {name}", add(name), (row(name),), changes=lambda r, n=name: [
                    VMAdded(VMRow(r[0], n, 1024, 2, None, None), ())]), WAIT)
        proxy.resume()
        await until(lambda: [c.vm.vm_id for c in heard] == ["o1", "o2"])
        await eventually_writes(store, "b")
    assert vm_names(pg_sandbox, pg_dsn)[:3] == ["a", "o1", "o2"]


async def test_writes_queued_while_down_fail_fast_and_close_does_not_hang(own_pg: Sandbox) -> None:
    dsn = own_pg.create_database("inv")
    store = PostgresStore(dsn)
    store.start(asyncio.get_running_loop())
    await write(store, "add a", add("a"))
    await asyncio.to_thread(own_pg.stop, "immediate")
    futures = [store.submit(f"add q{n}", add(f"q{n}")) for n in range(50)]
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)
    assert all(isinstance(r, StorageError) for r in results)
    started = time.monotonic()
    assert await asyncio.to_thread(store.close, WAIT)  # while reconnecting: it stops all the same
    assert time.monotonic() - started < WAIT
    assert not store._watchdog.is_alive()
    with pytest.raises(StorageError, match="stopping"):
        store.submit("add late", add("late"))


# --- vmserver copy --------------------------------------------------------------------------------


async def test_snapshot_restore_round_trip_and_refusal(pg_sandbox: Sandbox, pg_dsn: str) -> None:
    async with running(pg_dsn) as source:
        a = await write(source, "add a", add("a", "a0", "a1"), (row("a"),))
        b = await write(source, "add b", add("b", "b0"), (row("b"),))
        await write(source, "remove a", RemoveVM(a[0]), (row("a", "vm_removed"),))  # ids with gaps
        await write(source, "password", AddVM("c", 512, 1, "scrypt$x", (), NOW, "2026-11-27T00:00:00.000Z"))
        snapshot = source.snapshot()
    assert [v[1] for v in snapshot.vms] == ["b", "c"] and len(snapshot.history) == 3

    target_dsn = pg_sandbox.create_database()
    try:
        target = PostgresStore(target_dsn)
        try:
            target.restore(snapshot)
            assert target.snapshot() == snapshot
            with pytest.raises(StorageError, match=r"already holds VMs; copy only into an empty one"):
                target.restore(Snapshot([(99, "z", 1, 1, None, None, NOW)], [], []))
            assert target.snapshot() == snapshot  # nothing of the refused copy
        finally:
            target.close()
        async with running(target_dsn) as copy:  # new ids continue past the copied ones
            d = await write(copy, "add d", add("d", "d0"), (row("d"),))
            assert d[0] > max(v[0] for v in snapshot.vms) and d[1][0] > b[1][0]
            history = await copy.read_history(None, None, None, None, 1)
            assert history[0][0] > max(h[0] for h in snapshot.history)
    finally:
        pg_sandbox.drop_database(dbname(target_dsn))


async def test_restore_refuses_a_database_with_history(pg_dsn: str, tmp_path: Path) -> None:
    async with running(pg_dsn) as store:
        await write(store, "rows", None, (row("gone"),))
    store = PostgresStore(pg_dsn)
    try:
        with pytest.raises(StorageError, match="already holds history"):
            store.restore(Snapshot([], [], [(1, NOW, "x", "vm_added", None, None, None)]))
        assert len(store.snapshot().history) == 1
    finally:
        store.close()


async def test_copy_from_sqlite_to_postgresql_and_back(pg_dsn: str, tmp_path: Path) -> None:
    sqlite = SQLiteStore(str(tmp_path / "src.db"))
    sqlite.start(asyncio.get_running_loop())
    await write(sqlite, "add a", add("a", "a0"), (row("a"),))
    await write(sqlite, "add b", add("b"), (row("b", "auth_failed", reason="x", count=2),))
    snapshot = sqlite.snapshot()
    await asyncio.to_thread(sqlite.close)
    pg = PostgresStore(pg_dsn)
    try:
        pg.restore(snapshot)
        assert pg.snapshot() == snapshot
    finally:
        pg.close()
    back = SQLiteStore(str(tmp_path / "back.db"))
    try:
        back.restore(snapshot)
        assert back.snapshot() == snapshot
    finally:
        back.close()


async def test_a_store_notifies_only_while_another_is_alive(pg_dsn: str) -> None:
    """Alone, a store's commits send no NOTIFY (its cost is for nothing); once a second store
    joins, the first knows at once, long before its next renewal (a third of a 60 s lease):
    from the second's `join` NOTIFY, or, when that came before it listened, from a look."""
    async with running(pg_dsn, lease_ttl=60) as first:
        await asyncio.sleep(0.3)  # its listener is up
        assert first.lease.others is False
        async with running(pg_dsn, lease_ttl=60) as second:
            assert second.lease.others is True  # it saw the first when it joined
            await until(lambda: first.lease.others, seconds=5)
    early = PostgresStore(pg_dsn, lease_ttl=60)  # joined, not listening yet
    try:
        async with running(pg_dsn, lease_ttl=60):  # its `join` reaches nobody
            early.start(asyncio.get_running_loop())
            await until(lambda: early.lease.others, seconds=5)
    finally:
        assert await asyncio.to_thread(early.close, WAIT)
