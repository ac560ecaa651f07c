"""Shared test fixtures: a real server on an ephemeral loopback port, raw line clients, subprocesses.

Nothing of ours is mocked: tests speak bytes over real sockets to a real Server backed by
a real SQLite file in a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

import vmclient
from vmserver.backends import is_postgres
from vmserver.backends.pg_sandbox import Sandbox, find_bin_dir
from vmserver.config import Config
from vmserver.server import Server, start_server

TIMEOUT = 10.0  # no single read in a test may wait longer than this

# CI (CI=true) replays the same examples every run, so a red build always means a change broke
# something; on a developer's machine hypothesis keeps exploring new examples.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


class Wire:
    """A raw protocol client: writes lines, reads lines, nothing clever."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: dict) -> None:
        self.reader, self.writer, self.greeting = reader, writer, greeting
        self.greeting_line = b""

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> "Wire":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=64 * 1024 * 1024), TIMEOUT)
        wire = cls(reader, writer, {})
        wire.greeting_line = await wire.recv_line()
        wire.greeting = json.loads(wire.greeting_line)
        return wire

    async def send(self, line: str | bytes | dict) -> None:
        """Send one request: a dict is JSON-encoded; str/bytes are sent as given plus a newline."""
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.writer.write(line + b"\n")
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv_line(self) -> bytes:
        """One whole line as sent by the server, newline included; b'' at EOF."""
        return await asyncio.wait_for(self.reader.readline(), TIMEOUT)

    async def recv(self) -> dict:
        line = await self.recv_line()
        assert line.endswith(b"\n"), f"expected a whole line, got {line[:200]!r}"
        return json.loads(line)

    async def call(self, cmd: str, id: Any = None, **args: Any) -> dict:
        request: dict[str, Any] = {"cmd": cmd, "args": args}
        if id is not None:
            request["id"] = id
        await self.send(request)
        return await self.recv()

    async def ok(self, cmd: str, **args: Any) -> Any:
        """Call and insist on success; returns the result."""
        reply = await self.call(cmd, **args)
        assert reply["ok"] is True, reply
        return reply["result"]

    async def error(self, cmd: str, **args: Any) -> str:
        """Call and insist on failure; returns the error code."""
        reply = await self.call(cmd, **args)
        assert reply["ok"] is False, reply
        assert set(reply["error"]) == {"code", "message"} and reply["error"]["message"]
        return reply["error"]["code"]

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass


def disk(disk_id: str, size: int = 10) -> dict:
    return {"disk_id": disk_id, "size": size}


def vm_args(vm_id: str, *disk_ids: str, ram: int = 1024, cpu: int = 1) -> dict:
    """Arguments of an add_vm for ``vm_id`` with the given disks."""
    return {"vm_id": vm_id, "ram": ram, "cpu": cpu, "disks": [disk(d) for d in disk_ids]}


BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that uses ``db`` (or the ``server`` built on it) runs once per backend; one marked
    ``sqlite_only`` (it reaches into the SQLite file to inject a fault) on SQLite alone."""
    for mark in metafunc.definition.iter_markers("parametrize"):  # a test's own "db" argument
        names = mark.args[0]
        if "db" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return
    if "db" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("db", ("sqlite",) if only else BACKENDS, indirect=True)


@pytest.fixture
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on this run's backend: an SQLite file in the test's directory
    (the same as ``db_path``), or a new database on the suite's PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_dsn")
    return str(tmp_path / "vms.db")


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """An SQLite file, for tests of the SQLite backend itself."""
    return str(tmp_path / "vms.db")


def query(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` (``?`` placeholders) straight on the database, on either backend, behind the
    server's back, committed; its rows (none for a write)."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params)
            return [tuple(row) for row in cur.fetchall()] if cur.description else []
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        return conn.execute(sql, params).fetchall()


@contextlib.asynccontextmanager
async def running(db: str, **settings: Any) -> AsyncIterator[Server]:
    """An in-process server on an ephemeral loopback port with these Config settings; stopped after."""
    srv = await start_server(Config(**{"host": "127.0.0.1", "port": 0, "db": db, "busy_timeout_ms": 200, **settings}))
    try:
        yield srv
    finally:
        await srv.close()
        srv.inventory.close()


@pytest.fixture
async def server(db: str) -> AsyncIterator[Server]:
    """An in-process server on a fresh database: each test that uses it runs on both backends."""
    async with running(db) as srv:
        yield srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[vmclient.Client]:
    """A vmclient.Client connected to the ``server`` fixture."""
    async with _connected(server, TIMEOUT) as c:
        yield c


@pytest.fixture
async def client2(server: Server) -> AsyncIterator[vmclient.Client]:
    """A second session on the same server (e.g. the one whose operations cause events)."""
    async with _connected(server, 5.0) as c:
        yield c


@contextlib.asynccontextmanager
async def _connected(server: Server, seconds: float) -> AsyncIterator[vmclient.Client]:
    c = await asyncio.wait_for(vmclient.connect("127.0.0.1", server.address[1]), seconds)
    try:
        yield c
    finally:
        await asyncio.wait_for(c.close(), seconds)


@pytest.fixture
async def wire(server: Server) -> AsyncIterator[Wire]:
    w = await Wire.open(server.address[1])
    try:
        yield w
    finally:
        await w.close()


@pytest.fixture
async def connect(server: Server) -> AsyncIterator[Any]:
    """A factory of extra sessions to the same server: ``w = await connect()``."""
    opened: list[Wire] = []

    async def factory() -> Wire:
        w = await Wire.open(server.address[1])
        opened.append(w)
        return w

    yield factory
    for w in opened:
        await w.close()


# --- the server as a separate process (CLI, signals, restarts) ---------------------------

_LISTENING = re.compile(rb"listening on (?:\[([^\]]+)\]|([^\s:]+)):(\d+)")


class ServerProcess:
    """``python -m vmserver`` in a subprocess; ``port`` is read back from its 'listening' log line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmserver", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        self.port: int | None = None
        self.log = b""

    def wait_listening(self, timeout: float = TIMEOUT) -> int:
        """Read stderr until the listening line; raises if the process exits first."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stderr, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not sel.select(timeout=0.1):
                continue
            chunk = os.read(self.proc.stderr.fileno(), 65536)
            if not chunk:
                break
            self.log += chunk
            match = _LISTENING.search(self.log)
            if match:
                self.port = int(match.group(3))
                return self.port
        raise AssertionError(f"server did not start; exit={self.proc.poll()} log={self.log.decode(errors='replace')}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send ``sig`` and wait; returns the exit code. Collects the rest of the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError("server did not stop in time")
        self.log += err
        return self.proc.returncode

    def run_to_exit(self, timeout: float = TIMEOUT) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.log += err
        return self.proc.returncode


@pytest.fixture
def spawn() -> Iterator[Any]:
    """A factory of server subprocesses, all killed at the end of the test."""
    procs: list[ServerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        p = ServerProcess(*args, env=env)
        procs.append(p)
        return p

    yield factory
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.communicate()


def build_inventory(path: str, n: int, disks_per_vm: int = 1, prefix: str = "vm") -> None:
    """A database holding ``n`` VMs named ``{prefix}-000001``... (each with its disks), written in
    one transaction by the SQLite backend's restore (what `vmserver copy` uses): fast enough for 100,000."""
    from vmserver.backends.base import Snapshot
    from vmserver.backends.sqlite import SQLiteStore

    ts = "2026-11-26T21:26:13.902Z"
    vms = [(i, f"{prefix}-{i:06d}", 1024, 1 + i % 4, None, None, ts) for i in range(1, n + 1)]
    disks = [(disks_per_vm * (i - 1) + k + 1, f"{prefix}-{i:06d}-d{k}", 10 + k, i)
             for i in range(1, n + 1) for k in range(disks_per_vm)]
    store = SQLiteStore(path)
    try:
        store.restore(Snapshot(vms, disks, []))
    finally:
        store.close()


def rss_kb(pid: int) -> int:
    """A process's resident memory (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- a server process under a descriptor limit, its log drained by a thread -----------------

_LISTENING_ANY = re.compile(rb"listening on [^\s:]+:(\d+)")


class LimitedServer:
    """``python -m vmserver --port 0`` on its own database, under RLIMIT_NOFILE ``nofile``
    (soft, hard) when given.

    A thread drains its log as it is written: a flood of tracebacks must neither block the
    server on a full pipe nor fill the disk (the first LOG_KEPT bytes are kept). ``reading``
    cleared stalls it, as a stalled log consumer (journald, a paused terminal) would.
    """

    LOG_KEPT = 4 << 20

    def __init__(self, db: str, *args: str, nofile: tuple[int, int] | None = None) -> None:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)  # type: ignore[arg-type]

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmserver", "--port", "0", "--db", db, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=limit if nofile else None)
        self._log = bytearray()
        self.log_bytes = 0
        self.reading = threading.Event()
        self.reading.set()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while self.reading.wait() and (chunk := os.read(fd, 65536)):
            self.log_bytes += len(chunk)
            if len(self._log) < self.LOG_KEPT:
                self._log += chunk[:self.LOG_KEPT - len(self._log)]

    @property
    def log(self) -> bytes:
        return bytes(self._log)

    def wait_listening(self, timeout: float = 20.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            match = _LISTENING_ANY.search(self._log)
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"server did not start; exit={self.proc.poll()} log={self.log.decode(errors='replace')}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig``; the exit code, once the whole log is in. Fails after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.reading.set()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout:g}s of signal {sig}; "
                                 f"log tail: {self.log[-2000:].decode(errors='replace')}") from None
        self._drainer.join(5)
        return code

    def kill(self) -> None:
        self.reading.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drainer.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def limited(tmp_path) -> Iterator[Callable[..., LimitedServer]]:
    """A factory of LimitedServer subprocesses, each on a new database; all killed at the end."""
    started: list[LimitedServer] = []

    def factory(*args: str, nofile: tuple[int, int] | None = None) -> LimitedServer:
        srv = LimitedServer(str(tmp_path / f"server-{len(started)}.db"), *args, nofile=nofile)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.kill()


# --- a throwaway PostgreSQL (the PostgreSQL backend's tests) -------------------------------


def need_postgres() -> None:
    """Skip without PostgreSQL's programs, or fail when VMSERVER_TEST_POSTGRES=required (CI)."""
    if find_bin_dir() is None:
        message = "PostgreSQL tests need PostgreSQL's binaries: apt-get install postgresql"
        if os.environ.get("VMSERVER_TEST_POSTGRES") == "required":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


class Databases:
    """Empty databases for the PostgreSQL backend's tests. A used one is wiped (its sessions
    ended, its schema dropped and made again: as empty as a new one) and handed to the next
    test, which is ten times cheaper than CREATE DATABASE (~0.1-0.3 s here) per test."""

    def __init__(self, pg: Sandbox) -> None:
        self.pg = pg
        self._free: list[tuple[str, str]] = []

    def take(self) -> tuple[str, str]:
        if self._free:
            return self._free.pop()
        name = f"t_{uuid.uuid4().hex[:12]}"
        return name, self.pg.create_database(name)

    def give_back(self, name: str, dsn: str) -> None:
        self.pg.psql("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid();"
                     "DROP SCHEMA public CASCADE; CREATE SCHEMA public;", db=name)
        self._free.append((name, dsn))


@pytest.fixture(scope="session")
def pg_sandbox(tmp_path_factory) -> Iterator[Sandbox]:
    """One PostgreSQL for the whole session (fsync off: it is thrown away); stopped at the end."""
    need_postgres()
    with Sandbox(tmp_path_factory.mktemp("pg"), durable=False) as pg:
        yield pg


@pytest.fixture(scope="session")
def pg_databases(pg_sandbox: Sandbox) -> Databases:
    return Databases(pg_sandbox)


@pytest.fixture
def pg_dsn(pg_databases: Databases) -> Iterator[str]:
    """The DSN of an empty database on ``pg_sandbox``, wiped after the test."""
    name, dsn = pg_databases.take()
    yield dsn
    pg_databases.give_back(name, dsn)


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[Sandbox]:
    """A private PostgreSQL for one test that restarts or kills it (the shared one stays up)."""
    need_postgres()
    root = tmp_path / "own-pg"
    with Sandbox(root, durable=False) as pg:
        yield pg
    shutil.rmtree(root, ignore_errors=True)  # ~40 MB a cluster: pytest keeps three runs' tmp
