"""Choosing a backend from --db, the masked DSN, the PostgreSQL extra missing, and `vmserver
copy` between SQLite files (PostgreSQL's side of copy is in test_postgres_server.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from vmserver.backends import is_postgres, mask_dsn

from conftest import TIMEOUT, Wire, running, vm_args


@pytest.mark.parametrize("db, expected", [
    ("postgresql://vm@db.example:5432/fleet", True),
    ("postgres://vm@db.example/fleet", True),
    ("POSTGRESQL://vm@h/d", True),
    ("/var/lib/vmserver/vms.db", False),
    ("./postgresql://odd", False),
    (":memory:", False),
])
def test_a_dsn_is_postgres_anything_else_is_an_sqlite_path(db, expected):
    assert is_postgres(db) is expected


@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://vm:s3cret@db:5432/fleet", "postgresql://vm:***@db:5432/fleet"),
    ("postgres://vm:p%40ss@db/fleet?sslmode=require", "postgres://vm:***@db/fleet?sslmode=require"),
    ("postgresql://vm@db/fleet?password=s3cret&sslmode=require", "postgresql://vm@db/fleet?password=***&sslmode=require"),
    ("postgresql://vm@db:5432/fleet", "postgresql://vm@db:5432/fleet"),
    ("/tmp/vms.db", "/tmp/vms.db"),
])
def test_the_password_of_a_dsn_is_masked(dsn, shown):
    assert mask_dsn(dsn) == shown


def test_without_the_driver_a_dsn_exits_1_naming_the_extra(tmp_path):
    """psycopg made unimportable, as on a machine without the extra: one line, exit 1, no password."""
    code = ("import sys; sys.modules['psycopg'] = None; from vmserver.__main__ import main; "
            "sys.exit(main(['--port', '0', '--db', 'postgresql://vm:s3cret@127.0.0.1:1/fleet']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "pip install 'vmserver[postgres]'" in lines[0]
    assert "s3cret" not in proc.stderr


def run_copy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmserver", "copy", *args], capture_output=True, text=True,
                          timeout=TIMEOUT)


async def fill(db: str) -> None:
    """A VM with a password and disks, one connected once (last_connected), one removed (history only)."""
    async with running(db) as srv:
        wire = await Wire.open(srv.address[1])
        try:
            await wire.ok("add_vm", **vm_args("kept", "d-1", "d-2"), password="hunter22")
            await wire.ok("connect_vm", vm_id="kept", password="hunter22")
            await wire.ok("add_vm", **vm_args("gone", "d-3"))
            await wire.ok("remove_vm", vm_id="gone")
            await wire.ok("add_vm", **vm_args("plain"))
        finally:
            await wire.close()


def dump(path: str) -> tuple[list, list, list]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("SELECT * FROM vms ORDER BY id").fetchall(),
                con.execute("SELECT * FROM disks ORDER BY id").fetchall(),
                con.execute("SELECT * FROM history ORDER BY id").fetchall())
    finally:
        con.close()


async def test_copy_between_sqlite_files_keeps_every_row_and_id(tmp_path):
    src, dst = str(tmp_path / "src.db"), str(tmp_path / "new" / "dst.db")
    await fill(src)
    proc = run_copy(src, dst)
    assert proc.returncode == 0, proc.stderr
    vms, disks, history = dump(src)
    assert proc.stdout.strip() == f"copied 2 VMs, 2 disks and {len(history)} history rows from {src} to {dst}"
    assert dump(dst) == (vms, disks, history)
    assert any(row[4] and row[4].startswith("scrypt$") for row in vms)  # the password hash came along
    # A server on the copy goes on from there: the next id is past the copied ones.
    async with running(dst) as srv:
        wire = await Wire.open(srv.address[1])
        try:
            new = await wire.ok("add_vm", **vm_args("next"))
            assert new["id"] > max(row[0] for row in vms)
            assert (await wire.error("connect_vm", vm_id="kept", password="wrong")) == "auth_failed"
            assert (await wire.ok("connect_vm", vm_id="kept", password="hunter22"))["vm_id"] == "kept"
        finally:
            await wire.close()


async def test_copy_refuses_a_destination_that_holds_vms_and_changes_nothing(tmp_path):
    src, dst = str(tmp_path / "src.db"), str(tmp_path / "dst.db")
    await fill(src)
    async with running(dst) as srv:
        wire = await Wire.open(srv.address[1])
        try:
            await wire.ok("add_vm", **vm_args("theirs"))
        finally:
            await wire.close()
    before = dump(dst)
    proc = run_copy(src, dst)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"vmserver copy: database {dst} already holds VMs; copy only into an empty one"
    assert dump(dst) == before


def test_copy_of_a_missing_source_creates_nothing(tmp_path):
    src, dst = str(tmp_path / "nothing.db"), str(tmp_path / "dst.db")
    proc = run_copy(src, dst)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"vmserver copy: no database at {src}"
    assert not (tmp_path / "nothing.db").exists() and not (tmp_path / "dst.db").exists()


async def test_copy_refuses_a_source_a_running_server_holds(tmp_path):
    """The server would go on writing after the copy: the copy would be stale at once."""
    src, dst = str(tmp_path / "src.db"), str(tmp_path / "dst.db")
    await fill(src)
    async with running(src):
        proc = run_copy(src, dst)
    assert proc.returncode == 1
    assert "in use by another vmserver" in proc.stderr
