"""A real server process on a real PostgreSQL, and the faults issue 11 names: PostgreSQL
unreachable at start, PostgreSQL restarted or the server's connections terminated under live
sessions, writers and subscribers, a row written by hand, and `vmserver copy` both ways.
Several servers on one database: test_cluster.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any


from vmserver.backends.pg_sandbox import Sandbox, free_port

from conftest import TIMEOUT, Wire, vm_args

RECOVERY = 20.0  # writes must work again within this long of PostgreSQL being back


async def open_wire(proc: Any) -> Wire:
    return await Wire.open(proc.port)


async def call(wire: Wire, cmd: str, **args: Any) -> dict:
    return await asyncio.wait_for(wire.call(cmd, **args), TIMEOUT)


async def until_writable(wire: Wire, name: str) -> float:
    """add_vm ``name`` until it is accepted; every refusal meanwhile must be internal. Returns how long it took."""
    start = time.monotonic()
    while True:
        reply = await call(wire, "add_vm", **vm_args(name))
        if reply["ok"]:
            return time.monotonic() - start
        assert reply["error"]["code"] == "internal", reply
        assert time.monotonic() - start < RECOVERY, "writes did not come back"
        await asyncio.sleep(0.1)


def names(vms: list[dict]) -> set[str]:
    return {vm["vm_id"] for vm in vms}


def start_server(spawn: Any, dsn: str, *args: str) -> Any:
    proc = spawn("--port", "0", "--db", dsn, *args)
    proc.wait_listening()
    return proc


# --- start ---------------------------------------------------------------------------------------


def test_unreachable_postgresql_exits_1_with_host_port_and_reason_and_no_password(spawn):
    port = free_port()  # nothing listens there
    proc = spawn("--port", "0", "--db", f"postgresql://vm:s3cret@127.0.0.1:{port}/fleet")
    assert proc.run_to_exit() == 1
    text = proc.log.decode()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}" in lines[0]
    assert "refused" in lines[0].lower()
    assert "s3cret" not in text


def test_the_listening_line_masks_the_password_and_the_schema_is_created(spawn, pg_sandbox, pg_dsn):
    dsn = pg_dsn.replace("postgres@", "postgres:s3cret@")  # trust auth: any password is let in
    proc = start_server(spawn, dsn)
    assert proc.stop() == 0
    text = proc.log.decode()
    assert "s3cret" not in text
    assert "postgres:***@" in text
    dbname = pg_dsn.rsplit("/", 1)[1]
    tables = set(pg_sandbox.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", db=dbname).split())
    assert {"vms", "disks", "history", "vmserver_schema"} <= tables


def test_a_newer_schema_is_refused_with_a_clear_line(spawn, pg_sandbox, pg_dsn):
    proc = start_server(spawn, pg_dsn)
    assert proc.stop() == 0
    dbname = pg_dsn.rsplit("/", 1)[1]
    pg_sandbox.psql("UPDATE vmserver_schema SET version = 99", db=dbname)
    again = spawn("--port", "0", "--db", pg_dsn)
    assert again.run_to_exit() == 1
    assert "has schema version 99, newer than this server's" in again.log.decode()


async def test_a_second_server_on_the_same_database_serves_the_same_inventory(spawn, pg_dsn):
    """The one-server rule is SQLite's: on PostgreSQL a second server joins (test_cluster.py)."""
    first = start_server(spawn, pg_dsn)
    second = start_server(spawn, pg_dsn)
    a, b = await open_wire(first), await open_wire(second)
    try:
        assert (await call(a, "add_vm", **vm_args("shared")))["ok"]
        deadline = time.monotonic() + TIMEOUT
        while "shared" not in names((await call(b, "get_all_vms"))["result"]):
            assert time.monotonic() < deadline, "the second server never saw the first one's VM"
            await asyncio.sleep(0.05)
    finally:
        await a.close()
        await b.close()
    assert first.stop() == 0 and second.stop() == 0


# --- a clash only the database can see -----------------------------------------------------------


async def test_rows_written_by_hand_are_already_exists_and_conflict_not_internal(spawn, pg_sandbox, pg_dsn):
    proc = start_server(spawn, pg_dsn)
    dbname = pg_dsn.rsplit("/", 1)[1]
    pg_sandbox.psql("INSERT INTO vms (vm_id, ram, cpu, created_at) VALUES ('by-hand', 1, 1, 'now');"
                    "INSERT INTO disks (disk_id, size, vm_id) SELECT 'hand-disk', 1, id FROM vms WHERE vm_id = 'by-hand'",
                    db=dbname)
    wire = await open_wire(proc)
    try:
        reply = await call(wire, "add_vm", **vm_args("by-hand"))
        assert reply["error"]["code"] == "already_exists", reply
        reply = await call(wire, "add_vm", **vm_args("fresh", "hand-disk"))
        assert reply["error"]["code"] == "conflict", reply
        # Nothing half-written: the failed adds left no row, and the server goes on.
        assert (await call(wire, "add_vm", **vm_args("fresh", "d-fresh")))["ok"]
        count = pg_sandbox.psql("SELECT count(*) FROM vms WHERE vm_id = 'fresh'", db=dbname).strip()
        assert count == "1"
    finally:
        await wire.close()
    assert proc.stop() == 0


# --- PostgreSQL goes away under a live server ---------------------------------------------------


class Fleet:
    """An agent holding an authorized VM, a subscriber, and a writer adding VMs in a loop; every
    add the server acknowledged is remembered, every refusal must be internal."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.acked: list[str] = []
        self.refused = 0
        self.events: list[dict] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.agent = await open_wire(self.proc)
        assert (await call(self.agent, "connect_vm", **vm_args("agent-vm", "agent-disk")))["ok"]
        assert (await call(self.agent, "authorize_vm", vm_id="agent-vm"))["ok"]
        self.watcher = await open_wire(self.proc)
        assert (await call(self.watcher, "subscribe", events=["vm_added"]))["ok"]
        self.writer = await open_wire(self.proc)
        self.reader = await open_wire(self.proc)
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._watch())]

    async def _write(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            reply = await call(self.writer, "add_vm", **vm_args(f"w-{i}"))
            if reply["ok"]:
                self.acked.append(f"w-{i}")
            else:
                assert reply["error"]["code"] == "internal", reply
                assert "nothing was changed" in reply["error"]["message"]
                self.refused += 1
            await asyncio.sleep(0.01)

    async def _watch(self) -> None:
        while True:
            self.events.append(json.loads(await self.watcher.recv_line()))

    async def stop(self) -> None:
        self._stop.set()
        writer, watcher = self._tasks
        await asyncio.wait_for(writer, TIMEOUT)
        watcher.cancel()
        for wire in (self.agent, self.watcher, self.writer, self.reader):
            await wire.close()

    async def check_alive(self) -> None:
        """Every session is still open; the agent's VM is still its own and authorized."""
        vm = (await call(self.agent, "get_vm", vm_id="agent-vm"))["result"]
        assert vm["connected"] and vm["authorized"]
        assert (await call(self.agent, "update_vm", vm_id="agent-vm", ram=2048))["ok"]
        assert (await call(self.reader, "health"))["ok"]


async def check_durable(spawn: Any, dsn: str, acked: list[str]) -> None:
    """A new server on the same database has every acknowledged VM."""
    proc = start_server(spawn, dsn)
    wire = await open_wire(proc)
    try:
        stored = names((await call(wire, "get_all_vms"))["result"])
    finally:
        await wire.close()
    assert proc.stop() == 0
    missing = set(acked) - stored
    assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"


async def test_postgresql_restarted_under_a_live_server(spawn, own_pg: Sandbox):
    dsn = own_pg.create_database("fleet")
    proc = start_server(spawn, dsn)
    fleet = Fleet(proc)
    await fleet.start()
    try:
        await asyncio.sleep(0.5)
        own_pg.stop()
        # Down: reads come from memory, writes are internal (nothing changed), sessions stay.
        await asyncio.sleep(0.5)
        listed = (await call(fleet.reader, "get_all_vms"))["result"]
        assert "agent-vm" in names(listed)
        reply = await call(fleet.reader, "add_vm", **vm_args("while-down"))
        assert reply["error"]["code"] == "internal"
        assert (await call(fleet.reader, "get_vm", vm_id="while-down"))["error"]["code"] == "not_found"
        own_pg.start()
        took = await until_writable(fleet.reader, "after-restart")
        print(f"\nwrites back {took:.1f}s after PostgreSQL; {len(fleet.acked)} acked, {fleet.refused} refused")
        await asyncio.sleep(0.5)
        await fleet.check_alive()
        acked_before = len(fleet.acked)
        await asyncio.sleep(0.5)
        assert len(fleet.acked) > acked_before, "the writer's own session writes again"
        assert fleet.refused > 0, "the writer saw the outage"
    finally:
        await fleet.stop()
    added = [e["data"]["vm_id"] for e in fleet.events if e.get("event") == "vm_added"]
    assert set(fleet.acked) <= set(added), "the subscriber heard every acknowledged add"
    assert proc.stop() == 0
    await check_durable(spawn, dsn, fleet.acked + ["agent-vm", "after-restart"])


async def test_the_servers_connections_terminated(spawn, pg_sandbox, pg_dsn):
    proc = start_server(spawn, pg_dsn)
    dbname = pg_dsn.rsplit("/", 1)[1]
    fleet = Fleet(proc)
    await fleet.start()
    try:
        await asyncio.sleep(0.3)
        killed = pg_sandbox.terminate(dbname)
        assert killed >= 3, "the writing, lease and listening sessions, at least"
        await until_writable(fleet.reader, "after-terminate")
        await fleet.check_alive()
    finally:
        await fleet.stop()
    assert proc.stop() == 0
    await check_durable(spawn, pg_dsn, fleet.acked + ["agent-vm", "after-terminate"])


# --- vmserver copy -------------------------------------------------------------------------------


def run_copy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmserver", "copy", *args], capture_output=True, text=True,
                          timeout=60)


async def fill(spawn: Any, db: str) -> list[dict]:
    proc = start_server(spawn, db)
    wire = await open_wire(proc)
    try:
        for args in ({**vm_args("kept", "d-1", "d-2"), "password": "hunter22"}, vm_args("gone", "d-3"),
                     vm_args("plain")):
            assert (await call(wire, "add_vm", **args))["ok"]
        assert (await call(wire, "connect_vm", vm_id="kept", password="hunter22"))["ok"]
        assert (await call(wire, "remove_vm", vm_id="gone"))["ok"]
        assert (await call(wire, "disconnect_vm", vm_id="kept"))["ok"]
        return [(await call(wire, cmd))["result"] for cmd in ("get_all_vms", "get_all_disks", "get_history")]
    finally:
        await wire.close()
        assert proc.stop() == 0


async def read_all(spawn: Any, db: str) -> list[dict]:
    proc = start_server(spawn, db)
    wire = await open_wire(proc)
    try:
        out = [(await call(wire, cmd))["result"] for cmd in ("get_all_vms", "get_all_disks", "get_history")]
        assert (await call(wire, "connect_vm", vm_id="kept", password="nope"))["error"]["code"] == "auth_failed"
        assert (await call(wire, "connect_vm", vm_id="kept", password="hunter22"))["ok"]
        new = (await call(wire, "add_vm", **vm_args("after-copy")))["result"]
        assert new["id"] > max(vm["id"] for vm in out[0])  # ids go on past the copied ones
        return out
    finally:
        await wire.close()
        assert proc.stop() == 0


async def test_copy_sqlite_to_postgresql_and_back(spawn, pg_dsn, tmp_path):
    sqlite_src, sqlite_back = str(tmp_path / "src.db"), str(tmp_path / "back.db")
    before = await fill(spawn, sqlite_src)
    proc = run_copy(sqlite_src, pg_dsn)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"copied 2 VMs, 2 disks and {len(before[2])} history rows from {sqlite_src} to ")
    proc = run_copy(pg_dsn, sqlite_back)
    assert proc.returncode == 0, proc.stderr
    assert await read_all(spawn, pg_dsn) == before  # the same records, ids, hashes and history
    assert await read_all(spawn, sqlite_back) == before


async def test_copy_into_a_postgresql_database_that_holds_vms_is_refused(spawn, pg_sandbox, pg_dsn, tmp_path):
    src = str(tmp_path / "src.db")
    await fill(spawn, src)
    proc = start_server(spawn, pg_dsn)
    wire = await open_wire(proc)
    try:
        assert (await call(wire, "add_vm", **vm_args("theirs")))["ok"]
    finally:
        await wire.close()
    assert proc.stop() == 0
    copied = run_copy(src, pg_dsn.replace("postgres@", "postgres:s3cret@"))
    assert copied.returncode == 1
    assert "already holds VMs" in copied.stderr and "s3cret" not in copied.stderr
    dbname = pg_dsn.rsplit("/", 1)[1]
    assert pg_sandbox.psql("SELECT string_agg(vm_id, ',') FROM vms", db=dbname).strip() == "theirs"


# --- where the password comes from ------------------------------------------------------------


def test_the_password_from_pgpassword_or_pgpass_never_shown(spawn, own_pg: Sandbox, tmp_path, monkeypatch):
    """A PostgreSQL that checks passwords (scram): the DSN names no password; libpq takes it
    from PGPASSWORD, or from ~/.pgpass; a wrong one is refused in one line, none is ever logged."""
    secret = "pgpass-s3cret"
    own_pg.psql(f"CREATE ROLE vm LOGIN PASSWORD '{secret}'; CREATE DATABASE inv OWNER vm")
    hba = own_pg.data_dir / "pg_hba.conf"
    hba.write_text("host all vm 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    own_pg.psql("SELECT pg_reload_conf()")
    dsn = own_pg.dsn("inv", user="vm")
    for name in ("PGPASSWORD", "PGPASSFILE"):  # the test's own environment must not lend one
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    bare = {"HOME": str(home)}  # libpq looks for ~/.pgpass under $HOME

    with_env = spawn("--port", "0", "--db", dsn, env={**bare, "PGPASSWORD": secret})
    with_env.wait_listening()
    assert with_env.stop() == 0

    pgpass = home / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{own_pg.port}:inv:vm:{secret}\n")
    pgpass.chmod(0o600)
    with_file = spawn("--port", "0", "--db", dsn, env=bare)
    with_file.wait_listening()
    assert with_file.stop() == 0

    wrong = spawn("--port", "0", "--db", dsn, env={**bare, "PGPASSWORD": "not-it"})
    assert wrong.run_to_exit() == 1
    assert 'password authentication failed for user "vm"' in wrong.log.decode()
    for proc in (with_env, with_file, wrong):
        assert secret not in proc.log.decode() and "not-it" not in proc.log.decode()
