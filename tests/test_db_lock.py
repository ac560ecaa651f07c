"""One server per database file, however the file's path is spelled.

The in-memory inventory is only right while its server is the file's sole writer, so a second
server on the same file must be refused whether it names the file by a symlink, a relative
path, a path through a symlinked directory, or a ``file:`` URI (refused outright: see
Store._resolve). Real subprocess servers (``spawn``) and real files; the first server is
checked to be undisturbed after each refusal.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from conftest import Wire, vm_args
from vmserver.backends.sqlite import Store
from vmserver.errors import StorageError


def refused_line(p, needle: str) -> str:
    """The server exits 1 with one 'cannot start' line containing ``needle``, no traceback."""
    code = p.run_to_exit(timeout=20)
    text = p.log.decode(errors="replace")
    assert code == 1, text
    assert "Traceback" not in text and "listening on" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot start" in lines[0] and needle in lines[0], text
    return lines[0]


async def first_server_undisturbed(port: int, vm_id: str) -> None:
    w = await Wire.open(port)
    try:
        await w.ok("add_vm", **vm_args(vm_id, f"{vm_id}-d"))
        assert vm_id in {vm["vm_id"] for vm in await w.ok("get_all_vms")}
    finally:
        await w.close()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    real = tmp_path / "real" / "vms.db"
    real.parent.mkdir()
    return real


def spellings(shared: Path) -> dict[str, str]:
    """Other names of the same file, made on disk."""
    link = shared.parent.parent / "link.db"
    link.symlink_to(shared)
    dir_link = shared.parent.parent / "dir-link"
    dir_link.symlink_to(shared.parent, target_is_directory=True)
    relative = os.path.relpath(shared, os.getcwd())  # from the test's cwd, not the first server's spelling
    return {
        "symlink": str(link),
        "relative": relative,
        "dotdot": str(shared.parent / ".." / "real" / "vms.db"),
        "symlinked-dir": str(dir_link / "vms.db"),
    }


@pytest.mark.parametrize("spelling", ["symlink", "relative", "dotdot", "symlinked-dir"])
async def test_second_server_on_another_spelling_is_refused(spawn, shared, spelling):
    first = spawn("--port", "0", "--db", str(shared))
    port = first.wait_listening()
    other = spellings(shared)[spelling]
    line = refused_line(spawn("--port", "0", "--db", other), "in use by another vmserver")
    assert other in line  # named as the user gave it
    await first_server_undisturbed(port, "still-mine")
    assert first.stop() == 0
    # Once the first is gone, the other spelling opens the very same file.
    second = spawn("--port", "0", "--db", other)
    w = await Wire.open(second.wait_listening())
    assert {vm["vm_id"] for vm in await w.ok("get_all_vms")} == {"still-mine"}
    await w.close()
    assert second.stop() == 0


@pytest.mark.parametrize("uri", ["file:{path}", "file://{path}", "file:{path}?mode=rwc", "file:{path}?nolock=1"])
async def test_file_uri_is_refused_with_a_clear_line(spawn, shared, uri):
    """A file: URI would be read by SQLite as a URI and its parameters can switch locking off:
    refused, whether or not a server runs on the file, and the file is not touched."""
    first = spawn("--port", "0", "--db", str(shared))
    port = first.wait_listening()
    given = uri.format(path=shared)
    line = refused_line(spawn("--port", "0", "--db", given), "file: URIs are not supported")
    assert given in line
    await first_server_undisturbed(port, "uri-bystander")
    assert first.stop() == 0
    refused_line(spawn("--port", "0", "--db", given), "file: URIs are not supported")  # alone, too
    assert sorted(p.name for p in shared.parent.iterdir()) == ["vms.db", "vms.db.lock"]


def test_a_file_named_file_colon_can_be_given_as_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Store("./file:odd.db").close()
    assert (tmp_path / "file:odd.db").is_file()


def test_hard_linked_database_is_refused(shared):
    Store(str(shared)).close()
    twin = shared.parent / "twin.db"
    os.link(shared, twin)
    for name in (shared, twin):
        with pytest.raises(StorageError) as info:
            Store(str(name))
        assert "2 hard links" in str(info.value) and str(name) in str(info.value)
    twin.unlink()
    Store(str(shared)).close()


def test_empty_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as info:
        Store("")
    assert "path is empty" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_in_process_stores_meet_on_the_real_file(shared):
    """The same lock in one process too; the refusal names the spelling it was given."""
    first = Store(str(shared))
    try:
        for name, other in spellings(shared).items():
            with pytest.raises(StorageError) as info:
                Store(other)
            assert "in use by another vmserver" in str(info.value) and other in str(info.value), name
        assert first.real_path == str(shared)
    finally:
        first.close()
    link = Store(str(shared.parent.parent / "link.db"))  # a symlink opens and locks the real file
    try:
        assert link.real_path == str(shared)
        with pytest.raises(StorageError):
            Store(str(shared))
    finally:
        link.close()
    assert not (shared.parent.parent / "link.db.lock").exists()
    with sqlite3.connect(shared) as con:  # the WAL lives beside the real file, and was checkpointed
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert not (shared.parent.parent / "link.db-wal").exists()
