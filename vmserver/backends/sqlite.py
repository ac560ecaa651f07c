"""The SQLite backend (the embedded default): the file's connections, schema and migrations.

One connection writes (driven by the group-committing writer thread); every mutation runs in
one ``BEGIN IMMEDIATE`` transaction. A few read-only connections (:class:`Readers`) serve the
reads that may be slow, beside it. Any ``sqlite3.Error`` becomes a StorageError naming the
file (answered ``internal``), a unique violation the protocol's already_exists or conflict.
:class:`SQLiteStore` is the storage port (base.Store) over all of it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import CommandError, StorageError
from ..presence import SERVER_ID
from ..protocol import utc_now
from .base import (AddVM, Connect, DiskRow, HistoryRow, Job, Outcome, PruneHistory, RemoveVM, Snapshot,
                   StoredHistoryRow, UpdateVM, VMRow, Write, disk_taken, history_filter, vm_taken)
from .group_commit import DEFAULT_MAX_BATCH, Committed, GroupCommitter

log = logging.getLogger(__name__)

# Schema version 1. Ids are AUTOINCREMENT so an id is never handed out twice, even after a
# removal. Disk ids are unique across the whole inventory. Presence (connected/authorized)
# is deliberately absent: it lives in memory and dies with the session.
_SCHEMA_V1 = [
    """
    CREATE TABLE vms (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id          TEXT    NOT NULL UNIQUE,
        ram            INTEGER NOT NULL CHECK (ram > 0),        -- MiB
        cpu            INTEGER NOT NULL CHECK (cpu > 0),
        password_hash  TEXT,                                    -- scrypt$...; NULL: no password
        last_connected TEXT,                                    -- ISO-8601 UTC, NULL: never
        created_at     TEXT    NOT NULL
    )
    """,
    """
    CREATE TABLE disks (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        disk_id TEXT    NOT NULL UNIQUE,
        size    INTEGER NOT NULL CHECK (size > 0),              -- GiB
        vm_id   INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE
    )
    """,
    "CREATE INDEX disks_by_vm ON disks(vm_id)",
]

# Version 2: what happened to each VM, when, and from which peer (get_history). vm_id is the
# name, not a reference: the history of a removed VM stays.
_SCHEMA_V2 = [
    """
    CREATE TABLE history (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        ts      TEXT    NOT NULL,                                   -- ISO-8601 UTC
        vm_id   TEXT    NOT NULL,
        event   TEXT    NOT NULL,                                   -- vm_added, vm_connected, ...
        peer    TEXT,                                               -- address of the session, if any
        reason  TEXT                                                -- vm_disconnected: why
    )
    """,
    "CREATE INDEX history_by_vm ON history(vm_id, id)",
    "CREATE INDEX history_by_ts ON history(ts)",
]

# Version 3: an index for every filter of get_history (vm_id, event, both; since has
# history_by_ts, before the primary key), so no read scans the table; and a count, for the one
# auth_failed row that stands for a burst of failed password checks (NULL: one event).
_SCHEMA_V3 = [
    "ALTER TABLE history ADD COLUMN count INTEGER",
    "CREATE INDEX history_by_event ON history(event, id)",
    "CREATE INDEX history_by_vm_event ON history(vm_id, event, id)",
]

# Ordered migrations: MIGRATIONS[i] brings a database from user_version i to i + 1.
MIGRATIONS: list[list[str]] = [_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3]
SCHEMA_VERSION = len(MIGRATIONS)


T = TypeVar("T")


# --- the writes, as functions of a connection (see Store.write and Store.write_batch) ---------


def insert_vm(db: sqlite3.Connection, vm_id: str, ram: int, cpu: int, password_hash: str | None,
              disks: Sequence[tuple[str, int]], now: str, last_connected: str | None = None) -> tuple[int, list[int]]:
    """Insert a VM and its disks; returns the new VM id and disk ids (in the given order)."""
    vm_pk = db.execute(
        "INSERT INTO vms (vm_id, ram, cpu, password_hash, last_connected, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (vm_id, ram, cpu, password_hash, last_connected, now)).lastrowid
    disk_pks = [db.execute("INSERT INTO disks (disk_id, size, vm_id) VALUES (?, ?, ?)", (disk_id, size, vm_pk)).lastrowid
                for disk_id, size in disks]
    return vm_pk, disk_pks


def update_vm(db: sqlite3.Connection, vm_pk: int, ram: int, cpu: int, remove: Sequence[int],
              resize: Sequence[tuple[int, int]], add: Sequence[tuple[str, int]]) -> list[int]:
    """Replace a VM's spec: drop, resize and add disks; returns the added disks' ids."""
    db.execute("UPDATE vms SET ram = ?, cpu = ? WHERE id = ?", (ram, cpu, vm_pk))
    if remove:
        db.executemany("DELETE FROM disks WHERE id = ?", [(pk,) for pk in remove])
    if resize:
        db.executemany("UPDATE disks SET size = ? WHERE id = ?", [(size, pk) for pk, size in resize])
    return [db.execute("INSERT INTO disks (disk_id, size, vm_id) VALUES (?, ?, ?)", (disk_id, size, vm_pk)).lastrowid
            for disk_id, size in add]


def delete_vm(db: sqlite3.Connection, vm_pk: int) -> None:
    """Remove a VM; its disks go with it (ON DELETE CASCADE)."""
    db.execute("DELETE FROM vms WHERE id = ?", (vm_pk,))


def set_last_connected(db: sqlite3.Connection, vm_pk: int, when: str) -> None:
    db.execute("UPDATE vms SET last_connected = ? WHERE id = ?", (when, vm_pk))


def append_history(db: sqlite3.Connection, rows: Sequence[HistoryRow]) -> None:
    db.executemany("INSERT INTO history (ts, vm_id, event, peer, reason, count) VALUES (?, ?, ?, ?, ?, ?)", rows)


_WRITES: dict[type, Callable[[sqlite3.Connection, Any], Any]] = {
    AddVM: lambda db, w: insert_vm(db, w.vm_id, w.ram, w.cpu, w.password_hash, w.disks, w.created_at,
                                   w.last_connected),
    UpdateVM: lambda db, w: update_vm(db, w.vm_pk, w.ram, w.cpu, w.remove, w.resize, w.add),
    RemoveVM: lambda db, w: delete_vm(db, w.vm_pk),
    Connect: lambda db, w: set_last_connected(db, w.vm_pk, w.when),  # presence is the server's own memory
    PruneHistory: lambda db, w: prune_history(db, w.before, w.limit),
}


@dataclass(frozen=True, slots=True)
class _Read:
    """get_history through the writer: only for ``:memory:``, which no reader connection can see."""

    vm_id: str | None
    event: str | None
    since: str | None
    before: int | None
    limit: int


_WRITES[_Read] = lambda db, r: read_history(db, r.vm_id, r.event, r.since, r.before, r.limit)


def run_write(db: sqlite3.Connection, write: Write, history: Sequence[HistoryRow]) -> Any:
    """One job of the port: its write, then its history rows, in the open transaction."""
    result = None if write is None else _WRITES[type(write)](db, write)
    if history:
        append_history(db, history)
    return result


def prune_history(db: sqlite3.Connection, before: str, limit: int) -> int:
    """Delete up to ``limit`` of the rows older than ``before`` (oldest first); returns how many.

    A bounded batch, so that pruning a large history is many short write transactions that
    other writes interleave with, never one long one that holds them all up.
    """
    return db.execute("DELETE FROM history WHERE id IN (SELECT id FROM history INDEXED BY history_by_ts "
                      "WHERE ts < ? ORDER BY ts LIMIT ?)", (before, limit)).rowcount


# Past this many rows at or after ``since``, the newest-first scan finds a page sooner than
# sorting every match found through the ts index.
SINCE_SELECTIVE = 20_000


def history_query(vm_id: str | None, event: str | None, since: str | None, before: int | None,
                  limit: int, by_time: bool = False) -> tuple[str, tuple[Any, ...]]:
    """The SELECT of read_history; ``by_time``: go through the ts index (few rows since ``since``).

    Otherwise SQLite picks by the equality filters: (vm_id, event, id), (vm_id, id) or
    (event, id), each already in id order; with none, the table itself, newest first.
    """
    where, params = history_filter(vm_id, event, since, before, "?")
    index = " INDEXED BY history_by_ts" if by_time else ""
    return f"SELECT id, ts, vm_id, event, peer, reason, count FROM history{index}{where} ORDER BY id DESC LIMIT ?", \
        (*params, limit)


def read_history(db: sqlite3.Connection, vm_id: str | None, event: str | None, since: str | None,
                 before: int | None, limit: int) -> list[tuple[Any, ...]]:
    """Newest first: (id, ts, vm_id, event, peer, reason, count) rows matching every given filter.

    With ``since``, a bounded look at the ts index first: when few rows are that recent, they
    are found there and sorted (a ``since`` in the future costs nothing); when many are, the
    newest rows match and the newest-first plan finds a page at once.
    """
    by_time = since is not None and db.execute(
        "SELECT count(*) FROM (SELECT 1 FROM history INDEXED BY history_by_ts WHERE ts >= ? LIMIT ?)",
        (since, SINCE_SELECTIVE)).fetchone()[0] < SINCE_SELECTIVE
    sql, params = history_query(vm_id, event, since, before, limit, by_time)
    return db.execute(sql, params).fetchall()


READERS = 4  # history reads running at once; more wait their turn (never in the writer's queue)


class Readers:
    """Read-only connections to the file, one per reader thread, for reads that may take a while.

    WAL lets each read its own snapshot beside the writer: the writer never waits for a read,
    and a read never waits in the writer's queue. At most ``size`` run at once; the others wait
    in the pool's queue (one per session at most: a session runs one command at a time).
    """

    def __init__(self, path: str, real_path: str, size: int, busy_timeout_ms: int) -> None:
        self.path, self._real_path, self._busy_timeout_ms = path, real_path, busy_timeout_ms
        self.size = size
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="vmserver-reader")
        self._local = threading.local()
        self._guard = threading.Lock()
        self.connections: list[sqlite3.Connection] = []  # every one opened, for close()

    def submit(self, what: str, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(db, *args)`` in a read transaction on a reader thread.

        :raises StorageError: (through the future) the read failed.
        """
        try:
            return self._pool.submit(self._run, what, fn, args)
        except RuntimeError:  # closed
            raise StorageError(f"database {self.path}: {what} refused: the server is stopping") from None

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:  # opened by the thread that uses it, at its first read; retried if it fails
            db = sqlite3.connect(self._real_path, isolation_level=None, check_same_thread=False)
            with self._guard:
                self.connections.append(db)
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            db.execute("PRAGMA query_only = ON")
            self._local.db = db
        return db

    def _run(self, what: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            db = self._connection()
            db.execute("BEGIN")  # one snapshot for all of fn's statements
            try:
                return fn(db, *args)
            finally:
                if db.in_transaction:
                    db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"database {self.path}: {what} failed: {exc}") from exc

    def close(self) -> None:
        """Let the reads under way finish, drop those not started, close the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._guard:
            for db in self.connections:
                try:
                    db.close()
                except sqlite3.Error as exc:
                    log.error("database %s: closing a reader failed: %s", self.path, exc)
            self.connections.clear()


class Store:
    """The SQLite file behind the inventory. Not thread-safe: one caller at a time (the writer);
    ``readers`` read beside it on their own connections (None for ``:memory:``, which no second
    connection can see)."""

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path  # as given: what messages name
        self.real_path = self._resolve(path)  # what is locked and opened
        self._lock = self._lock_file(path, self.real_path)
        try:
            self._db = db = sqlite3.connect(self.real_path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self._unlock()
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        try:
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            version = self._check_version()
            self._configure()
            self._migrate(version)
        except sqlite3.Error as exc:
            self._db.close()
            self._unlock()
            raise StorageError(f"cannot use database {path}: {exc}") from exc
        except StorageError:
            self._db.close()
            self._unlock()
            raise
        self.readers = None if path == ":memory:" else Readers(path, self.real_path, READERS, busy_timeout_ms)

    @staticmethod
    def _resolve(path: str) -> str:
        """The database file's one true name, however it is spelled (relative, ``..``, symlinks).

        ``file:`` URIs are refused rather than opened: their parameters (``mode=ro``,
        ``mode=memory``, ``immutable=1``, ``nolock=1``, ``vfs=``) can switch off the very
        locking, durability and sharing this server relies on, and a plain path says all that
        is needed. (SQLite reads ``file:`` names as URIs even without ``uri=True``.)

        :raises StorageError: a URI, an empty path, or a file with several hard links.
        """
        if path == ":memory:":
            return path
        if not path:
            raise StorageError("cannot open database: the path is empty")
        if path.startswith("file:"):
            raise StorageError(f"cannot open database {path}: file: URIs are not supported, give the file's path "
                             f"(a file whose name starts with 'file:' can be given as ./{path})")
        real = os.path.realpath(path)
        try:
            links = os.stat(real).st_nlink
        except OSError:
            links = 1  # not there yet (SQLite creates it), or unreadable (SQLite says why)
        if links > 1:
            # SQLite keeps the WAL beside the name it opened: two names, two WALs for one file.
            raise StorageError(f"cannot open database {path}: the file has {links} hard links; "
                             "SQLite cannot share one database between several names (use a symlink)")
        return real

    @staticmethod
    def _lock_file(path: str, real_path: str) -> int | None:
        """Hold ``<db>.lock`` exclusively: the in-memory mirror is only right if we are the sole writer.

        Named after the resolved path, so another spelling of the same file (a symlink, a
        relative path) meets the same lock. A separate file, because closing any descriptor of
        the database file itself would drop SQLite's own POSIX locks.
        """
        if real_path == ":memory:":
            return None
        lock_path = f"{real_path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open database {path}: cannot create {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StorageError(f"database {path} is in use by another vmserver (pid {holder}, lock {lock_path})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # e.g. the disk is full
            os.close(fd)
            raise StorageError(f"cannot open database {path}: cannot write {lock_path}: {exc.strerror}") from exc
        return fd

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the flock
            self._lock = None

    def _check_version(self) -> int:
        """The file's schema version; refuses, before touching the file, one newer than ours."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"database {self.path} has schema version {version}, newer than this server's "
                f"{SCHEMA_VERSION}; upgrade vmserver"
            )
        return version

    def _configure(self) -> None:
        db = self._db
        if self.path != ":memory:":
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StorageError(f"cannot use database {self.path}: WAL mode refused (got {mode})")
        # FULL: an acknowledged write survives power loss, not only a process crash.
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")

    def _migrate(self, version: int) -> None:
        db = self._db
        if version == SCHEMA_VERSION:
            return
        # Statement by statement in one transaction: executescript() would commit midway.
        with self._transaction("migrate"):
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("database %s migrated from schema version %d to %d", self.path, version, SCHEMA_VERSION)

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"database {self.path}: {what} failed: {exc}") from exc

    # --- reads --------------------------------------------------------------------------

    def load(self) -> tuple[list[VMRow], list[DiskRow]]:
        """The whole inventory, ordered by id, read in one transaction (one snapshot)."""
        try:
            self._db.execute("BEGIN")
            try:
                vms = [VMRow(*row) for row in self._db.execute(
                    "SELECT id, vm_id, ram, cpu, password_hash, last_connected FROM vms ORDER BY id")]
                disks = [DiskRow(*row) for row in self._db.execute(
                    "SELECT id, disk_id, size, vm_id FROM disks ORDER BY id")]
            finally:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"database {self.path}: load failed: {exc}") from exc
        return vms, disks

    # --- writes ---------------------------------------------------------------------------
    # Each write is a function of the connection, so it can run alone in its own transaction
    # (``write``) or with others in one group-committed transaction (``write_batch``).

    def write(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one write alone in its own transaction. :raises StorageError: the write changed nothing."""
        with self._transaction(what) as db:
            return fn(db, *args, **kwargs)

    def write_batch(self, jobs: Sequence[tuple[str, Callable[..., Any], tuple[Any, ...]]]) -> list[Outcome]:
        """Run writes in one transaction and one commit (one fsync); a failing one fails alone.

        The batch first runs straight through. Only if some write fails is it rolled back and
        run again with a savepoint around each write, so that the failing one is undone alone;
        writes rarely fail (the inventory checks them in memory first), so the common case pays
        no savepoints. Returns (result, None) or (None, error) per job, once committed. If the
        transaction cannot start or commit, every job fails.
        """
        if len(jobs) > 1:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                return self._all_failed(jobs, exc)
            try:
                results = [fn(db, *args) for _, fn, args in jobs]
            except Exception:  # find out which one, and keep the others: run them again isolated
                self._abandon()
            else:
                return self._commit(jobs, [(result, None) for result in results])
        return self._write_isolated(jobs)

    def _write_isolated(self, jobs: Sequence[tuple[str, Callable[..., Any], tuple[Any, ...]]]) -> list[Outcome]:
        """One transaction, each job in its own savepoint (none needed for a single job)."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return self._all_failed(jobs, exc)
        outcomes: list[Outcome] = []
        alone = len(jobs) == 1  # then the transaction itself isolates it: no savepoint needed
        for what, fn, args in jobs:
            try:
                if alone:
                    result = fn(db, *args)
                else:
                    db.execute("SAVEPOINT job")
                    result = fn(db, *args)
                    db.execute("RELEASE job")
                outcomes.append((result, None))
            except Exception as exc:  # sqlite3.Error, or a bug in the job: it fails, not the writer
                if not isinstance(exc, sqlite3.Error):
                    log.exception("database %s: %s", self.path, what)
                error = self._failure(what, exc)
                if alone or not db.in_transaction:  # all of it is undone (e.g. disk full): all fail
                    self._abandon()
                    return [(None, error) for _ in jobs]
                try:
                    db.execute("ROLLBACK TO job")
                    db.execute("RELEASE job")
                except sqlite3.Error:
                    self._abandon()
                    return [(None, error) for _ in jobs]
                outcomes.append((None, error))
        return self._commit(jobs, outcomes)

    def _failure(self, what: str, exc: Exception) -> CommandError:
        """A unique violation is a clash the in-memory checks could not see (a row written by
        hand): the protocol's already_exists or conflict. Anything else: nothing was changed."""
        text = str(exc)
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in text:
            if "vms.vm_id" in text:
                return vm_taken(what)
            if "disks.disk_id" in text:
                return disk_taken(what)
        return StorageError(f"database {self.path}: {what} failed: {exc}")

    def _commit(self, jobs: Sequence[tuple[str, Any, Any]], outcomes: list[Outcome]) -> list[Outcome]:
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abandon()
            return self._all_failed(jobs, exc, "commit")
        return outcomes

    def _all_failed(self, jobs: Sequence[tuple[str, Any, Any]], exc: Exception,
                    step: str | None = None) -> list[Outcome]:
        """Every job fails of one cause, named by ``step`` (the commit) or else by each job's name."""
        return [(None, StorageError(f"database {self.path}: {step or what} failed: {exc}")) for what, *_ in jobs]

    def _abandon(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("database %s: rollback failed: %s", self.path, exc)

    def close(self) -> None:
        """Close the readers, checkpoint the WAL into the main file, close the connection, release the lock."""
        if self.readers is not None:
            self.readers.close()  # first: a reader's snapshot would keep the checkpoint from truncating
        try:
            if self.path != ":memory:":
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
        except sqlite3.Error as exc:
            log.error("database %s: close failed: %s", self.path, exc)
        finally:
            self._unlock()


def _make_parent(path: str) -> None:
    """Create the database's directory (private to this user), as the file will be opened:
    symlinks resolved, no ``~`` expansion; ``file:`` URIs and empty paths are left for Store
    to refuse. :raises StorageError:"""
    if path == ":memory:" or path.startswith("file:") or not path:
        return
    parent = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700)
        except OSError as exc:
            raise StorageError(f"cannot create the directory of database {path}: {exc.strerror or exc}") from exc


class SQLiteStore(Committed):
    """The storage port (base.Store) on an SQLite file: a :class:`Store` written by a
    group-committing writer thread, read by :class:`Readers` beside it."""

    def __init__(self, path: str, busy_timeout_ms: int = 5000, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        _make_parent(path)
        self.db = Store(path, busy_timeout_ms)
        self.label = path
        self.shared = False  # one server per file (its lock file): presence stays in the server's memory
        self.on_change: Callable[[Any], Any] | None = None  # never called: no other server writes here
        self.servers = [{"server_id": SERVER_ID, "host": socket.gethostname(), "pid": os.getpid(),
                         "since": utc_now()}]
        self.writer = GroupCommitter(path, self._execute, max_batch)
        self._closed = False

    def _execute(self, jobs: list[Job]) -> list[Outcome]:
        return self.db.write_batch([(what, run_write, (write, history)) for what, write, history, _ in jobs])

    def load(self) -> tuple[list[VMRow], list[DiskRow]]:
        return self.db.load()

    def start(self, loop: Any) -> None:
        self.writer.start(loop)

    async def read_history(self, vm_id: str | None, event: str | None, since: str | None, before: int | None,
                           limit: int) -> list[StoredHistoryRow]:
        readers = self.db.readers
        if readers is None:  # :memory: has no second connection to read it: the writer reads
            return await self.writer.submit("read history", _Read(vm_id, event, since, before, limit))
        return await asyncio.wrap_future(readers.submit("read history", read_history, vm_id, event, since, before,
                                                        limit))

    def snapshot(self) -> Snapshot:
        def read(db: sqlite3.Connection) -> Snapshot:
            return Snapshot(
                db.execute("SELECT id, vm_id, ram, cpu, password_hash, last_connected, created_at FROM vms "
                           "ORDER BY id").fetchall(),
                db.execute("SELECT id, disk_id, size, vm_id FROM disks ORDER BY id").fetchall(),
                db.execute("SELECT id, ts, vm_id, event, peer, reason, count FROM history ORDER BY id").fetchall())
        return self.db.write("snapshot", read)

    def restore(self, snapshot: Snapshot) -> None:
        def write(db: sqlite3.Connection) -> None:
            vms, history = db.execute("SELECT EXISTS (SELECT 1 FROM vms), EXISTS (SELECT 1 FROM history)").fetchone()
            if vms or history:  # a copy never merges: ids and history would interleave
                raise StorageError(f"database {self.label} already holds {'VMs' if vms else 'history'}; "
                                   "copy only into an empty one")
            db.executemany("INSERT INTO vms (id, vm_id, ram, cpu, password_hash, last_connected, created_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", snapshot.vms)
            db.executemany("INSERT INTO disks (id, disk_id, size, vm_id) VALUES (?, ?, ?, ?)", snapshot.disks)
            db.executemany("INSERT INTO history (id, ts, vm_id, event, peer, reason, count) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", snapshot.history)
        self.db.write("copy", write)

    def close(self, timeout: float = 10.0) -> bool:
        if not self.writer.close(timeout):  # the join timed out: leave the file open under it
            return False
        if not self._closed:
            self._closed = True
            self.db.close()
        return True
