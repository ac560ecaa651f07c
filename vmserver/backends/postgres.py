"""The PostgreSQL backend (an optional extra): connections, schema and migrations, the one-server
lock, and what happens when the database goes away under a running server.

One connection, the *primary*, writes (driven by the group-committing writer thread) and holds
the one-server lock, a session advisory lock. Holding the lock on the very session that
commits is the fence: PostgreSQL releases a session's lock only when the session has ended,
after its last commit, so no write of ours can land after another server took over, and a
server that sees the lock free also sees every write we made. A batch is one pipeline (one
round trip) and one COMMIT; every transaction is spelt out (connections are in autocommit).

A watchdog thread pings the primary while it is idle and cuts a batch that gets no answer, so
a dead or hung PostgreSQL is noticed within seconds; it reconnects with backoff, re-takes the
lock, answers a commit whose reply was lost from ``pg_xact_status``, and gives up for good,
calling ``on_fatal``, when another server holds the lock or held it meanwhile (the owner
token in vmserver_owner is not ours). While the primary is down every write fails at once
(``internal``, nothing written). A few reader connections serve get_history beside it.

Any ``psycopg.Error`` becomes a StorageError naming the database with its password masked
(never shown, never logged), a unique violation the protocol's already_exists or conflict.
:class:`PostgresStore` is the storage port (base.Store) over all of it.
"""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?i)\A(postgres(?:ql)?://)([^@?#]*@)")
_PARAM_PASSWORD = re.compile(r"(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)")


def mask_dsn(dsn: str) -> str:
    """The DSN as messages may show it: every password replaced by ``***``.

    ``postgresql://user:pw@host:5432/db?password=pw`` becomes
    ``postgresql://user:***@host:5432/db?password=***``; key=value strings get the same.
    The user part ends at the last ``@`` before the query, so a password that holds an
    unescaped ``@`` or ``/`` is masked whole (an over-masked DSN is harmless, a leaked
    password is not).
    """
    end = len(dsn)
    for stop in "?#":
        found = dsn.find(stop)
        if found >= 0:
            end = min(end, found)
    match = _URL_PASSWORD.match(dsn)
    if match is not None:
        scheme = match.group(1)
        at = dsn.rfind("@", 0, end)
        userinfo = dsn[len(scheme):at]
        if ":" in userinfo:
            dsn = f"{scheme}{userinfo.split(':', 1)[0]}:***{dsn[at:]}"
    return _PARAM_PASSWORD.sub(r"\1***", dsn)


import asyncio  # noqa: E402  (mask_dsn above needs none of this)
import contextlib  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import psycopg  # noqa: E402
from psycopg import pq  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from ..errors import CommandError, StorageError  # noqa: E402
from .base import (AddVM, DiskRow, HistoryRow, Job, Outcome, PruneHistory, RemoveVM, SetLastConnected,  # noqa: E402
                   Snapshot, StoredHistoryRow, UpdateVM, VMRow, Write, disk_taken, vm_taken)
from .group_commit import DEFAULT_MAX_BATCH, GroupCommitter  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")


def _key(name: str) -> int:
    """A fixed signed 64-bit advisory lock key derived from a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


LOCK_KEY = _key("vmserver")  # the one-server lock, held for the server's life
MIGRATE_KEY = _key("vmserver migrate")  # held by the transaction that creates or migrates the schema

PING_INTERVAL = 1.0  # an idle primary is pinged this often: losing it is losing the lock
PING_TIMEOUT = 2.0  # a ping unanswered this long is a lost connection (a hung peer answers keepalives)
BATCH_DEADLINE = 15.0  # a batch unanswered this long is cut off (PostgreSQL's own timeouts are shorter)
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0  # reconnect attempts, doubling in between
RESOLVE_WAIT = 5.0  # how long a commit whose reply was lost waits for the reconnect that answers it
READERS = 4  # history reads running at once; more wait their turn (never in the writer's queue)
LOCK_TIMEOUT_MS = 5000  # a write waiting on a row lock (someone's psql session) fails after this
STATEMENT_TIMEOUT_MS = 10_000
MIN_SERVER_VERSION = 130000

# --- the schema -------------------------------------------------------------------------------
# Version 1 is SQLite's version 3 in PostgreSQL's words, so that both answer byte-identical
# replies: the same columns, constraints and indexes. Timestamps stay TEXT (the server's own
# ISO strings, returned exactly as written); text that is compared or ordered is COLLATE "C",
# SQLite's byte order, not the database's locale. Ids are identities, never handed out twice.
# The unique constraints are named: _failure() tells a VM clash from a disk clash by name.
_SCHEMA_V1 = [
    """
    CREATE TABLE vms (
        id             bigint  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        vm_id          text    COLLATE "C" NOT NULL CONSTRAINT vms_vm_id_key UNIQUE,
        ram            integer NOT NULL CHECK (ram > 0),             -- MiB
        cpu            integer NOT NULL CHECK (cpu > 0),
        password_hash  text,                                         -- scrypt$...; NULL: no password
        last_connected text    COLLATE "C",                          -- ISO-8601 UTC, NULL: never
        created_at     text    COLLATE "C" NOT NULL
    )
    """,
    """
    CREATE TABLE disks (
        id      bigint  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        disk_id text    COLLATE "C" NOT NULL CONSTRAINT disks_disk_id_key UNIQUE,
        size    integer NOT NULL CHECK (size > 0),                   -- GiB
        vm_id   bigint  NOT NULL REFERENCES vms(id) ON DELETE CASCADE
    )
    """,
    "CREATE INDEX disks_by_vm ON disks(vm_id)",
    # What happened to each VM (get_history); vm_id is the name, not a reference: the history
    # of a removed VM stays. count: the one auth_failed row of a burst (NULL: one event).
    """
    CREATE TABLE history (
        id     bigint  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        ts     text    COLLATE "C" NOT NULL,                         -- ISO-8601 UTC
        vm_id  text    COLLATE "C" NOT NULL,
        event  text    COLLATE "C" NOT NULL,                         -- vm_added, vm_connected, ...
        peer   text,                                                 -- address of the session, if any
        reason text,                                                 -- vm_disconnected: why
        count  integer
    )
    """,
    "CREATE INDEX history_by_vm ON history(vm_id, id)",
    "CREATE INDEX history_by_ts ON history(ts)",
    "CREATE INDEX history_by_event ON history(event, id)",
    "CREATE INDEX history_by_vm_event ON history(vm_id, event, id)",
    # Who holds the database: the server that took the lock last writes its token here, so a
    # server that lost its connection can tell, once it has the lock again, whether another
    # one held it meanwhile (and wrote what its in-memory mirror has not seen).
    "CREATE TABLE vmserver_owner (token text NOT NULL, pid integer NOT NULL, since timestamptz NOT NULL)",
]

# Ordered migrations: MIGRATIONS[i] brings a database from version i to i + 1.
MIGRATIONS: list[list[str]] = [_SCHEMA_V1]
SCHEMA_VERSION = len(MIGRATIONS)


# --- the writes, as statements sent on a connection (in a pipeline) ---------------------------
# Each sender queues its statements and returns a function that reads the result once the
# pipeline has been synced: a batch of writes costs one round trip, not one per statement.

# A run of AddVMs in one statement: the VMs in order, then their disks in order (ids come out
# as one by one would give them), the new ids matched back by name.
_ADD_VMS = """
WITH vm AS (
    INSERT INTO vms (vm_id, ram, cpu, password_hash, last_connected, created_at)
    SELECT v.vm_id, v.ram, v.cpu, v.password_hash, v.last_connected, v.created_at
    FROM unnest(%s::text[], %s::integer[], %s::integer[], %s::text[], %s::text[], %s::text[])
         WITH ORDINALITY AS v(vm_id, ram, cpu, password_hash, last_connected, created_at, n)
    ORDER BY v.n
    RETURNING vm_id, id),
disk AS (
    INSERT INTO disks (disk_id, size, vm_id)
    SELECT d.disk_id, d.size, vm.id
    FROM unnest(%s::text[], %s::integer[], %s::text[]) WITH ORDINALITY AS d(disk_id, size, owner, n)
    JOIN vm ON vm.vm_id = d.owner
    ORDER BY d.n
    RETURNING disk_id, id)
SELECT false, vm_id, id FROM vm UNION ALL SELECT true, disk_id, id FROM disk
"""
_ADD_DISKS = """
INSERT INTO disks (disk_id, size, vm_id)
SELECT d.disk_id, d.size, d.vm FROM unnest(%s::text[], %s::integer[], %s::bigint[]) WITH ORDINALITY AS d(disk_id, size, vm, n)
ORDER BY d.n
RETURNING disk_id, id
"""
_HISTORY = ("INSERT INTO history (ts, vm_id, event, peer, reason, count) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::integer[])")

Result = Callable[[], Any]  # reads a write's result once the pipeline has been synced


def _none() -> None:
    return None


def _send_add_vms(conn: psycopg.Connection, writes: Sequence[AddVM]) -> list[Result]:
    disks = [(disk_id, size, w.vm_id) for w in writes for disk_id, size in w.disks]
    cur = conn.execute(_ADD_VMS, (
        [w.vm_id for w in writes], [w.ram for w in writes], [w.cpu for w in writes],
        [w.password_hash for w in writes], [w.last_connected for w in writes], [w.created_at for w in writes],
        [d[0] for d in disks], [d[1] for d in disks], [d[2] for d in disks]))
    ids: dict[tuple[bool, str], int] = {}

    def result(w: AddVM) -> tuple[int, list[int]]:
        if not ids:  # the first to ask reads them all
            ids.update(((is_disk, name), pk) for is_disk, name, pk in cur.fetchall())
        return ids[False, w.vm_id], [ids[True, disk_id] for disk_id, _ in w.disks]
    return [functools.partial(result, w) for w in writes]


def _send_update_vms(conn: psycopg.Connection, writes: Sequence[UpdateVM]) -> list[Result]:
    """The specs, then the removals, resizes and additions of them all (SQLite's order within
    each write: a disk_id removed and added again needs the DELETE first). A VM or a disk
    changed twice in the run gets its last value, as one by one it would; no write can touch a
    disk another one of the run adds (it has no id yet)."""
    specs = {w.vm_pk: (w.ram, w.cpu) for w in writes}  # the last one wins
    conn.execute("UPDATE vms SET ram = u.ram, cpu = u.cpu FROM unnest(%s::bigint[], %s::integer[], %s::integer[]) "
                 "AS u(id, ram, cpu) WHERE vms.id = u.id",
                 (list(specs), [ram for ram, _ in specs.values()], [cpu for _, cpu in specs.values()]))
    removed = [pk for w in writes for pk in w.remove]
    if removed:
        conn.execute("DELETE FROM disks WHERE id = ANY(%s::bigint[])", (removed,))
    sizes = {pk: size for w in writes for pk, size in w.resize}
    if sizes:
        conn.execute("UPDATE disks SET size = r.size FROM unnest(%s::bigint[], %s::integer[]) AS r(id, size) "
                     "WHERE disks.id = r.id", (list(sizes), list(sizes.values())))
    added = [(disk_id, size, w.vm_pk) for w in writes for disk_id, size in w.add]
    if not added:
        return [lambda: [] for _ in writes]
    cur = conn.execute(_ADD_DISKS, ([d[0] for d in added], [d[1] for d in added], [d[2] for d in added]))
    ids: dict[str, int] = {}

    def result(w: UpdateVM) -> list[int]:
        if not ids:
            ids.update(cur.fetchall())
        return [ids[disk_id] for disk_id, _ in w.add]
    return [functools.partial(result, w) for w in writes]


def _send_remove_vms(conn: psycopg.Connection, writes: Sequence[RemoveVM]) -> list[Result]:
    # Their disks go with them (ON DELETE CASCADE).
    conn.execute("DELETE FROM vms WHERE id = ANY(%s::bigint[])", ([w.vm_pk for w in writes],))
    return [_none for _ in writes]


def _send_set_last_connected(conn: psycopg.Connection, writes: Sequence[SetLastConnected]) -> list[Result]:
    when = {w.vm_pk: w.when for w in writes}  # the last one wins
    conn.execute("UPDATE vms SET last_connected = c.at FROM unnest(%s::bigint[], %s::text[]) AS c(id, at) "
                 "WHERE vms.id = c.id", (list(when), list(when.values())))
    return [_none for _ in writes]


def _send_prune_history(conn: psycopg.Connection, w: PruneHistory) -> Result:
    """A bounded batch (see sqlite.prune_history): many short transactions, never one long one."""
    cur = conn.execute("DELETE FROM history WHERE id IN (SELECT id FROM history WHERE ts < %s ORDER BY ts LIMIT %s)",
                       (w.before, w.limit))
    return lambda: cur.rowcount


# Each sends a run of writes of its kind, in as few statements as keep their meaning.
_RUNS: dict[type, Callable[[psycopg.Connection, Any], list[Result]]] = {
    AddVM: _send_add_vms,
    UpdateVM: _send_update_vms,
    RemoveVM: _send_remove_vms,
    SetLastConnected: _send_set_last_connected,
}


def _send_history(conn: psycopg.Connection, rows: Sequence[HistoryRow]) -> None:
    """Every row in one statement, in order (their ids follow it)."""
    if rows:
        conn.execute(_HISTORY, [list(column) for column in zip(*rows)])


def _send(conn: psycopg.Connection, write: Write, history: Sequence[HistoryRow]) -> Result:
    """One job: its write, then its history rows."""
    if write is None:
        result: Result = _none
    elif isinstance(write, PruneHistory):
        result = _send_prune_history(conn, write)
    else:
        result = _RUNS[type(write)](conn, [write])[0]
    _send_history(conn, history)
    return result


def _send_all(conn: psycopg.Connection, jobs: Sequence[Job]) -> list[Result]:
    """Every job of a batch, in order, in as few statements as keep their meaning: consecutive
    writes of one kind as one run (a write that is only history rows does not end a run), and
    the history rows of them all in one more statement at the end (those of the jobs before a
    PruneHistory before it, so that it sees them as one by one it would)."""
    results: list[Result] = [_none] * len(jobs)
    history: list[HistoryRow] = []
    run: list[tuple[int, Any]] = []  # (job index, write), all of one kind

    def flush() -> None:
        if run:
            for (i, _), result in zip(run, _RUNS[type(run[0][1])](conn, [w for _, w in run])):
                results[i] = result
            run.clear()

    for i, (_, write, rows) in enumerate(jobs):
        if isinstance(write, PruneHistory):
            flush()
            _send_history(conn, history)
            history = []
            results[i] = _send_prune_history(conn, write)
        elif write is not None:
            if run and type(run[0][1]) is not type(write):
                flush()
            run.append((i, write))
        history.extend(rows)
    flush()
    _send_history(conn, history)
    return results


def read_history(conn: psycopg.Connection, vm_id: str | None, event: str | None, since: str | None,
                 before: int | None, limit: int) -> list[StoredHistoryRow]:
    """Newest first: (id, ts, vm_id, event, peer, reason, count) rows matching every given filter
    (sqlite.read_history's; the planner picks among the same indexes)."""
    where, params = [], []
    for clause, value in (("vm_id = %s", vm_id), ("event = %s", event), ("ts >= %s", since), ("id < %s", before)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = "SELECT id, ts, vm_id, event, peer, reason, count FROM history"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return conn.execute(sql + " ORDER BY id DESC LIMIT %s", (*params, limit)).fetchall()


# --- errors -------------------------------------------------------------------------------------


class _Lost(Exception):
    """The primary connection died under a batch. ``xid`` set: it died during the COMMIT, whose
    outcome (``outcomes`` if it committed) PostgreSQL alone knows."""

    def __init__(self, reason: str, xid: str | None = None, outcomes: list[Outcome] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.xid, self.outcomes = reason, xid, outcomes


class _Fatal(Exception):
    """Another server holds, or held, the database while this one was disconnected."""


def _broken(conn: psycopg.Connection) -> bool:
    return conn.closed or conn.broken


# --- the store ----------------------------------------------------------------------------------

_UP, _DOWN, _FATAL, _CLOSED = "up", "down", "fatal", "closed"


class PostgresStore:
    """The storage port (base.Store) on a PostgreSQL database: the primary connection written
    by a group-committing writer thread and watched by a watchdog thread, :class:`Readers`
    beside it."""

    def __init__(self, dsn: str, max_batch: int = DEFAULT_MAX_BATCH, connect_timeout: float = 5.0) -> None:
        self.label = mask_dsn(dsn)
        self._dsn = dsn
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as exc:  # libpq quotes the bad part, which may be the password
            reason = re.sub(r'"[^"]*"', '"…"', (str(exc).splitlines() or ["?"])[0])
            raise StorageError(f"cannot use database {self.label}: not a valid DSN: {reason}") from None
        self._secrets = [s for s in (params.get("password"), params.get("sslpassword"),
                                     os.environ.get("PGPASSWORD")) if s]
        self._where = f"{params.get('host') or os.environ.get('PGHOST') or 'localhost'}:" \
                      f"{params.get('port') or os.environ.get('PGPORT') or 5432}"
        self._connect_timeout = connect_timeout
        self.application_name = f"vmserver pid {os.getpid()}"
        self._token = secrets.token_hex(16)  # this server's, in vmserver_owner while it holds the lock
        self.on_fatal: Callable[[str], Any] | None = None  # set by the owner before start(); called on the loop
        self.resolve_wait = RESOLVE_WAIT
        self.batch_deadline = BATCH_DEADLINE
        self._loop: asyncio.AbstractEventLoop | None = None
        # The primary: used by whoever holds _conn_lock (the writer, the watchdog, load/snapshot).
        self._conn_lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._backend = 0  # the primary's backend pid: ours, if a stale session of ours still holds the lock
        self._state = _DOWN
        self._down_since = 0.0
        self._down_reason = ""
        self._fatal_line = ""
        self._last_ok = time.monotonic()  # the primary's last answer; the watchdog pings after PING_INTERVAL
        self._busy_since: float | None = None  # when the batch under way started
        self._cut_lock = threading.Lock()  # the primary's socket is closed, or cut by the watchdog, under it
        self._changed = threading.Condition()  # state changes and answered commits
        self._pending: dict[str, str | None] = {}  # xid -> pg_xact_status, for commits whose reply was lost
        self._unknown: list[str] = []  # xids answered "unknown": checked (and logged) after the next reconnect
        self._wake = threading.Event()  # the watchdog: the primary was lost, or the store is closing
        self._closing = False
        self._closed = False

        conn = self.connect("primary")
        try:
            if conn.info.server_version < MIN_SERVER_VERSION:  # pg_current_xact_id(), pg_xact_status()
                raise StorageError(f"cannot use database {self.label}: PostgreSQL {conn.info.server_version // 10000} "
                                   f"is too old, vmserver needs {MIN_SERVER_VERSION // 10000} or newer")
            self._check_version(conn, self._version(conn))
            self._take_lock(conn, starting=True)
            self._migrate(conn)
            self._claim(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StorageError(f"cannot use database {self.label}: {self._reason(exc)}") from None
        except BaseException:
            conn.close()
            raise
        self._install(conn)
        self.readers = Readers(self, READERS)
        self.writer = GroupCommitter(self.label, self._execute, max_batch)
        self._watchdog = threading.Thread(target=self._watch, name="vmserver-pg-watchdog", daemon=True)

    # --- connections ------------------------------------------------------------------------

    def _reason(self, exc: BaseException) -> str:
        """The driver's first line, never a password."""
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].removeprefix("connection failed: ")
        text = re.sub(r'^connection to server at "[^"]*"(?: \([^)]*\))?, port \d+ failed: ', "", text)
        text = text.removeprefix("FATAL:").strip()
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def connect(self, role: str) -> psycopg.Connection:
        """A new connection (autocommit: every transaction is spelt out) with the options that
        notice a dead peer. :raises StorageError: cannot connect (one line, no password)."""
        try:
            conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, round(self._connect_timeout)),
                application_name=self.application_name, keepalives=1, keepalives_idle=5, keepalives_interval=2,
                keepalives_count=3, tcp_user_timeout=10000)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL at {self._where}: {self._reason(exc)}") from None
        try:
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            if role == "primary":
                conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            else:
                conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            conn.close()
            raise StorageError(f"cannot use database {self.label}: {self._reason(exc)}") from None
        return conn

    def _install(self, conn: psycopg.Connection) -> None:
        with self._changed:
            self._conn, self._backend, self._state = conn, conn.info.backend_pid, _UP
            self._last_ok = time.monotonic()
            self._changed.notify_all()

    # --- schema -----------------------------------------------------------------------------

    @staticmethod
    def _version(conn: psycopg.Connection) -> int:
        if conn.execute("SELECT to_regclass('vmserver_schema') IS NULL").fetchone()[0]:
            return 0
        return conn.execute("SELECT coalesce(max(version), 0) FROM vmserver_schema").fetchone()[0]

    def _check_version(self, conn: psycopg.Connection, version: int) -> None:
        """Refuses, before touching it, a database whose schema is newer than ours."""
        if version > SCHEMA_VERSION:
            raise StorageError(f"database {self.label} has schema version {version}, newer than this server's "
                               f"{SCHEMA_VERSION}; upgrade vmserver")

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Create or bring the schema up to date, in one transaction that holds MIGRATE_KEY (so
        two starting servers, or any other tool, cannot interleave their migrations)."""
        if self._version(conn) == SCHEMA_VERSION:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_KEY,))
            conn.execute("CREATE TABLE IF NOT EXISTS vmserver_schema (version integer NOT NULL)")
            version = self._version(conn)  # again, under the lock
            self._check_version(conn, version)
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute("DELETE FROM vmserver_schema")
            conn.execute("INSERT INTO vmserver_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        log.info("database %s migrated from schema version %d to %d", self.label, version, SCHEMA_VERSION)

    # --- the one-server lock ------------------------------------------------------------------

    def _take_lock(self, conn: psycopg.Connection, starting: bool) -> None:
        """Take LOCK_KEY on ``conn``'s session.

        :raises StorageError: (starting) another server holds it.
        :raises _Fatal: (reconnecting) another server holds it.
        :raises psycopg.OperationalError: (reconnecting) a stale session of ours still holds it;
            it was told to end, try again shortly.
        """
        for _ in range(3):  # the holder may let go between our try and our look at it
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:
                return
            holder = self._holder(conn)
            if holder is None:
                continue
            backend, app = holder
            if not starting and backend == self._backend and app == self.application_name:
                # Our previous primary, which PostgreSQL has not yet seen die (a cut network):
                # it is ours to end, and it commits nothing more (its client is gone).
                log.warning("database %s: ending this server's previous session (backend %d), which still holds "
                            "the lock", self.label, backend)
                conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
                raise psycopg.OperationalError(f"the previous session (backend {backend}) still holds the lock")
            match = re.fullmatch(r"vmserver pid (\d+)", app or "")
            who = f"pid {match.group(1)}" if match else (f"application_name {app!r}" if app else "pid ?")
            line = f"database {self.label} is in use by another vmserver ({who}, PostgreSQL backend {backend})"
            if starting:
                raise StorageError(line)
            raise _Fatal(line)
        raise psycopg.OperationalError("the one-server lock changes hands too fast")

    @staticmethod
    def _holder(conn: psycopg.Connection) -> tuple[int, str | None] | None:
        """Who holds LOCK_KEY in this database: (backend pid, application_name if readable)."""
        row = conn.execute(
            "SELECT l.pid, a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid::bigint = %s AND l.objid::bigint = %s",
            ((LOCK_KEY >> 32) & 0xFFFFFFFF, LOCK_KEY & 0xFFFFFFFF)).fetchone()
        return None if row is None else (row[0], row[1])

    def _claim(self, conn: psycopg.Connection) -> None:
        """Write our token as the holder's (we hold the lock)."""
        with conn.transaction():
            conn.execute("DELETE FROM vmserver_owner")
            conn.execute("INSERT INTO vmserver_owner (token, pid, since) VALUES (%s, %s, now())",
                         (self._token, os.getpid()))

    def _still_ours(self, conn: psycopg.Connection) -> None:
        """After re-taking the lock: :raises _Fatal: another server held it meanwhile."""
        row = conn.execute("SELECT token, pid FROM vmserver_owner").fetchone()
        if row is None or row[0] != self._token:
            who = f"pid {row[1]}" if row is not None else "its owner row is gone"
            raise _Fatal(f"database {self.label} was used by another vmserver ({who}) while this one was "
                         "disconnected; this server's inventory is out of date")

    # --- the port ---------------------------------------------------------------------------------

    @property
    def writes(self) -> int:
        return self.writer.writes

    @property
    def batches(self) -> int:
        return self.writer.batches

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.writer.start(loop)
        self._watchdog.start()

    def submit(self, what: str, write: Write, history: Sequence[HistoryRow] = (), *,
               on_commit: Callable[[Any], Any] | None = None,
               on_fail: Callable[[], None] | None = None) -> asyncio.Future[Any]:
        return self.writer.submit(what, write, history, on_commit=on_commit, on_fail=on_fail)

    async def read_history(self, vm_id: str | None, event: str | None, since: str | None, before: int | None,
                           limit: int) -> list[StoredHistoryRow]:
        return await asyncio.wrap_future(self.readers.submit("read history", read_history, vm_id, event, since,
                                                             before, limit))

    def _read(self, what: str, fn: Callable[[psycopg.Connection], T]) -> T:
        """``fn`` in one REPEATABLE READ, read-only transaction (one snapshot) on the primary."""
        with self._conn_lock:
            conn = self._conn
            if conn is None:
                raise StorageError(f"database {self.label}: {what} failed: not connected ({self._down_reason})")
            try:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    return fn(conn)
            except psycopg.Error as exc:
                raise StorageError(f"database {self.label}: {what} failed: {self._reason(exc)}") from None

    def load(self) -> tuple[list[VMRow], list[DiskRow]]:
        def read(conn: psycopg.Connection) -> tuple[list[VMRow], list[DiskRow]]:
            vms = [VMRow(*row) for row in conn.execute(
                "SELECT id, vm_id, ram, cpu, password_hash, last_connected FROM vms ORDER BY id")]
            disks = [DiskRow(*row) for row in conn.execute("SELECT id, disk_id, size, vm_id FROM disks ORDER BY id")]
            return vms, disks
        return self._read("load", read)

    def snapshot(self) -> Snapshot:
        def read(conn: psycopg.Connection) -> Snapshot:
            return Snapshot(
                conn.execute("SELECT id, vm_id, ram, cpu, password_hash, last_connected, created_at FROM vms "
                             "ORDER BY id").fetchall(),
                conn.execute("SELECT id, disk_id, size, vm_id FROM disks ORDER BY id").fetchall(),
                conn.execute("SELECT id, ts, vm_id, event, peer, reason, count FROM history ORDER BY id").fetchall())
        return self._read("snapshot", read)

    def restore(self, snapshot: Snapshot) -> None:
        """Into an empty database, ids kept, in one transaction; the identities then continue
        past the largest id copied, as SQLite's AUTOINCREMENT does."""
        tables = (("vms", "id, vm_id, ram, cpu, password_hash, last_connected, created_at", snapshot.vms),
                  ("disks", "id, disk_id, size, vm_id", snapshot.disks),
                  ("history", "id, ts, vm_id, event, peer, reason, count", snapshot.history))
        with self._conn_lock:
            conn = self._conn
            if conn is None:
                raise StorageError(f"database {self.label}: copy failed: not connected ({self._down_reason})")
            try:
                with conn.transaction():
                    vms, history = conn.execute("SELECT EXISTS (SELECT 1 FROM vms), "
                                                "EXISTS (SELECT 1 FROM history)").fetchone()
                    if vms or history:
                        raise StorageError(f"database {self.label} already holds "
                                           f"{'VMs' if vms else 'history'}; copy only into an empty one")
                    with conn.cursor() as cur:
                        for table, columns, rows in tables:
                            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                                for row in rows:
                                    copy.write_row(row)
                            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                        f"coalesce(max(id), 1), max(id) IS NOT NULL) FROM {table}")
            except psycopg.Error as exc:
                raise StorageError(f"database {self.label}: copy failed: {self._reason(exc)}") from None

    def close(self, timeout: float = 10.0) -> bool:
        """The writer first (it finishes the queued writes), then the watchdog and the readers;
        then the lock is let go and the primary closed."""
        if not self.writer.close(timeout):  # still busy: leave the connection open under it
            return False
        if self._closed:
            return True
        self._closed = True
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._wake.set()
        if self._watchdog.is_alive():
            self._watchdog.join(self._connect_timeout + PING_TIMEOUT + 1)
        self.readers.close()
        with self._conn_lock:
            conn, self._conn = self._conn, None
            with self._changed:
                self._state = _CLOSED
                self._changed.notify_all()
        if conn is not None:
            try:
                if not _broken(conn):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            except psycopg.Error as exc:
                log.warning("database %s: releasing the lock failed: %s", self.label, self._reason(exc))
            finally:
                conn.close()
        return True

    # --- the writer thread ------------------------------------------------------------------

    def _execute(self, jobs: list[Job]) -> list[Outcome]:
        """Run a batch in one transaction (GroupCommitter's ``execute``); never raises."""
        try:
            with self._conn_lock:
                conn, state = self._conn, self._state
                if state != _UP or conn is None:  # fail at once: waiting would hold up every session
                    return self._refused(jobs)
                self._busy_since = time.monotonic()
                try:
                    outcomes = self._batch(conn, jobs)
                    self._last_ok = time.monotonic()
                    return outcomes
                except _Lost as exc:
                    lost = exc
                    self._drop(lost.reason, lost.xid)
                except Exception:
                    self._rollback_quietly(conn)  # a bug midway: its half must not commit with the next batch
                    raise
                finally:
                    with self._cut_lock:
                        self._busy_since = None
            if lost.xid is None:  # it died before the COMMIT was sent: the transaction died with it
                return [(None, StorageError(f"database {self.label}: {what} failed: the connection was lost "
                                            f"({lost.reason}); nothing was written")) for what, _, _ in jobs]
            return self._resolve(jobs, lost)
        except Exception as exc:  # a bug: the writer thread must go on
            log.exception("database %s: a batch of %d writes", self.label, len(jobs))
            return [(None, StorageError(f"database {self.label}: {what} failed: {exc}")) for what, _, _ in jobs]

    def _refused(self, jobs: list[Job]) -> list[Outcome]:
        if self._state == _FATAL:
            why = f"refused: {self._fatal_line}"
        else:
            why = f"failed: not connected to PostgreSQL ({self._down_reason}); reconnecting"
        return [(None, StorageError(f"database {self.label}: {what} {why}")) for what, _, _ in jobs]

    def _batch(self, conn: psycopg.Connection, jobs: list[Job]) -> list[Outcome]:
        """The batch straight through, in one pipeline (one round trip) and one commit; only if a
        job fails, again with a savepoint around each job, so that it fails alone (see
        sqlite.Store.write_batch). :raises _Lost: the connection died."""
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                xid = conn.execute("SELECT pg_current_xact_id()::text")
                results = _send_all(conn, jobs)
            outcomes: list[Outcome] = [(result(), None) for result in results]
            xid_text = xid.fetchone()[0]
        except Exception as exc:  # psycopg.Error, or a bug in a job: find out which, keep the others
            if isinstance(exc, psycopg.Error) and _broken(conn):
                raise _Lost(self._reason(exc)) from None
            self._rollback(conn)
            if len(jobs) == 1 and isinstance(exc, psycopg.Error):  # the transaction was its isolation
                return [(None, self._failure(jobs[0][0], exc))]
            return self._isolated(conn, jobs)
        return self._commit(conn, xid_text, jobs, outcomes)

    def _isolated(self, conn: psycopg.Connection, jobs: list[Job]) -> list[Outcome]:
        try:
            conn.execute("BEGIN")
            xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        except psycopg.Error as exc:
            if _broken(conn):
                raise _Lost(self._reason(exc)) from None
            self._rollback(conn)
            return [(None, self._failure(what, exc)) for what, _, _ in jobs]
        outcomes: list[Outcome] = []
        for what, write, rows in jobs:
            try:
                with conn.pipeline():
                    conn.execute("SAVEPOINT job")
                    result = _send(conn, write, rows)
                    conn.execute("RELEASE job")
                outcomes.append((result(), None))
            except Exception as exc:  # psycopg.Error, or a bug in the job: it fails, not the batch
                if not isinstance(exc, psycopg.Error):
                    log.exception("database %s: %s", self.label, what)
                if _broken(conn):
                    raise _Lost(self._reason(exc)) from None
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except psycopg.Error as undo:
                    if _broken(conn):
                        raise _Lost(self._reason(undo)) from None
                    self._rollback(conn)
                    return [(None, self._failure(what, exc)) for what, _, _ in jobs]
                outcomes.append((None, self._failure(what, exc)))
        return self._commit(conn, xid, jobs, outcomes)

    def _commit(self, conn: psycopg.Connection, xid: str, jobs: list[Job], outcomes: list[Outcome]) -> list[Outcome]:
        try:
            conn.execute("COMMIT", prepare=False)
        except psycopg.Error as exc:
            if _broken(conn):  # COMMIT was sent: it may or may not have happened
                raise _Lost(self._reason(exc), xid, outcomes) from None
            self._rollback(conn)
            return [(None, StorageError(f"database {self.label}: commit failed: {self._reason(exc)}"))
                    for _ in jobs]
        return outcomes

    def _rollback(self, conn: psycopg.Connection) -> None:
        """:raises _Lost: the connection died."""
        try:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except psycopg.Error as exc:
            if _broken(conn):
                raise _Lost(self._reason(exc)) from None
            log.error("database %s: rollback failed: %s", self.label, self._reason(exc))

    def _rollback_quietly(self, conn: psycopg.Connection) -> None:
        try:
            self._rollback(conn)
        except _Lost as lost:
            self._drop(lost.reason)

    def _failure(self, what: str, exc: Exception) -> CommandError:
        """A unique violation is a clash the in-memory checks could not see (a row written by
        hand): the protocol's already_exists or conflict. Anything else: nothing was changed."""
        if isinstance(exc, psycopg.errors.UniqueViolation):
            if exc.diag.constraint_name == "vms_vm_id_key":
                return vm_taken(what)
            if exc.diag.constraint_name == "disks_disk_id_key":
                return disk_taken(what)
        return StorageError(f"database {self.label}: {what} failed: {self._reason(exc)}")

    def _resolve(self, jobs: list[Job], lost: _Lost) -> list[Outcome]:
        """The connection died during a COMMIT: wait (a bounded time) for the watchdog to reconnect
        and ask PostgreSQL whether the transaction committed, and answer that."""
        assert lost.xid is not None and lost.outcomes is not None
        deadline = time.monotonic() + self.resolve_wait
        with self._changed:  # _drop() registered the xid: the reconnect asks about it
            while self._pending[lost.xid] is None and self._state == _DOWN and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            status = self._pending.pop(lost.xid)
            if status is None:
                self._unknown.append(lost.xid)  # the next reconnect asks again, and logs what it hears
        if status == "committed":
            log.warning("database %s: the connection was lost during a commit of %d writes, which did happen",
                        self.label, len(jobs))
            return lost.outcomes
        if status == "aborted":
            return [(None, StorageError(f"database {self.label}: {what} failed: the connection was lost during "
                                        f"the commit ({lost.reason}), which did not happen; nothing was written"))
                    for what, _, _ in jobs]
        log.error("database %s: the connection was lost during a commit of %d writes (transaction %s) and "
                  "PostgreSQL could not be asked within %gs whether it happened; they are reported failed",
                  self.label, len(jobs), lost.xid, self.resolve_wait)
        return [(None, StorageError(f"database {self.label}: {what} failed: the connection was lost during the "
                                    f"commit ({lost.reason}); whether it was written is unknown"))
                for what, _, _ in jobs]

    # --- losing and finding the primary (the watchdog thread) ---------------------------------

    def _drop(self, reason: str, xid: str | None = None) -> None:
        """The primary is lost (the caller holds _conn_lock): close it, refuse writes, wake the
        watchdog, which will ask about ``xid`` (a commit whose reply was lost) once reconnected."""
        with self._cut_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
        with self._changed:
            if xid is not None:
                self._pending[xid] = None
            if self._state == _UP:
                self._state, self._down_since, self._down_reason = _DOWN, time.monotonic(), reason
                log.error("database %s: lost the connection (%s); writes fail until it is back", self.label, reason)
            self._changed.notify_all()
        self._wake.set()

    def _watch(self) -> None:
        delay = BACKOFF_MIN
        while not self._closing:
            if self._state == _UP:
                self._wake.wait(PING_INTERVAL)
                self._wake.clear()
                self._check_deadline()
                if self._state == _UP and not self._closing and time.monotonic() - self._last_ok >= PING_INTERVAL:
                    self._ping()
                continue
            try:
                self._reconnect()
                delay = BACKOFF_MIN
            except _Fatal as exc:
                self._fatal(str(exc))
                return
            except (psycopg.Error, StorageError) as exc:
                reason = exc.message if isinstance(exc, StorageError) else self._reason(exc)
                log.debug("database %s: reconnecting failed (%s); again in %.2fs", self.label, reason, delay)
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, BACKOFF_MAX)
            except Exception:  # a bug: keep watching all the same
                log.exception("database %s: reconnecting", self.label)
                self._wake.wait(BACKOFF_MAX)
                self._wake.clear()

    def _check_deadline(self) -> None:
        """A batch with no answer for ``batch_deadline`` (a hung or stopped PostgreSQL answers
        keepalives, and its own timeouts do not run): cut its socket, so that it fails and the
        writes after it fail at once instead of piling up behind it."""
        with self._cut_lock:
            since, conn = self._busy_since, self._conn
            if since is None or conn is None or time.monotonic() - since < self.batch_deadline:
                return
            self._busy_since = None  # once
            log.error("database %s: no answer to a write for %.0fs; cutting the connection", self.label,
                      time.monotonic() - since)
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # the writer's wait ends: "server closed the connection"

    def _ping(self) -> None:
        if not self._conn_lock.acquire(blocking=False):
            return  # the writer is using it: that is a ping too
        try:
            conn = self._conn
            if conn is None or self._state != _UP:
                return
            failure = _ping(conn, PING_TIMEOUT)
            if failure is not None:
                self._drop(failure)
                return
            self._last_ok = time.monotonic()
            if self._unknown:  # the reconnect could not tell: ask again
                self._answered(self._ask(conn))
        finally:
            self._conn_lock.release()

    def _reconnect(self) -> None:
        """A new primary: connect, re-take the lock, answer the lost commits, check nobody held
        the database meanwhile. :raises _Fatal: somebody did. :raises psycopg.Error, StorageError:
        not yet (try again)."""
        conn = self.connect("primary")
        try:
            try:
                self._take_lock(conn, starting=False)
            except _Fatal:
                self._answered(self._ask(conn))  # our old session has ended: somebody else holds the lock
                raise
            answers = self._ask(conn)  # ours again: so our old session has ended
            self._still_ours(conn)
        except BaseException:
            conn.close()
            raise
        with self._conn_lock, self._changed:  # at once: a writer told its answer goes on writing
            if self._closing:
                conn.close()
                return
            self._install(conn)
            self._answered(answers)
        log.warning("database %s: connection back after %.1fs; writing again", self.label,
                    time.monotonic() - self._down_since)

    def _ask(self, conn: psycopg.Connection) -> dict[str, str]:
        """Ask PostgreSQL about the commits whose reply was lost: {xid: committed or aborted}."""
        with self._changed:
            asked = [xid for xid, status in self._pending.items() if status is None] + self._unknown
        answers: dict[str, str] = {}
        for xid in asked:
            try:
                status = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()[0]
            except psycopg.Error as exc:
                log.error("database %s: cannot tell whether transaction %s committed: %s", self.label, xid,
                          self._reason(exc))
                continue
            if status in ("committed", "aborted"):
                answers[xid] = status
        return answers

    def _answered(self, answers: dict[str, str]) -> None:
        """Waiting writers get their answer; a commit already reported unknown is logged if it
        did happen (memory lacks its writes)."""
        if not answers:
            return
        with self._changed:
            for xid, status in answers.items():
                if xid in self._pending:
                    self._pending[xid] = status
                elif xid in self._unknown:
                    self._unknown.remove(xid)
                    if status == "committed":
                        log.error("database %s: transaction %s, reported failed (outcome unknown), did commit: "
                                  "the in-memory inventory misses its writes until the server restarts",
                                  self.label, xid)
            self._changed.notify_all()

    def _fatal(self, line: str) -> None:
        """Stop writing for good and tell the owner (on the loop): another server has the database."""
        with self._conn_lock:
            self._drop(line)
            with self._changed:
                self._state, self._fatal_line = _FATAL, line
                self._changed.notify_all()
        log.error("%s; this server stops writing", line)
        if self.on_fatal is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_fatal, line)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                pass


def _ping(conn: psycopg.Connection, timeout: float) -> str | None:
    """``SELECT 1`` on an idle connection, bounded by ``timeout`` whatever the network does
    (libpq itself waits as long as TCP lets it); None if answered, else why not."""
    pgconn = conn.pgconn
    deadline = time.monotonic() + timeout
    failure = None
    try:
        pgconn.send_query(b"SELECT 1")
        while pgconn.flush():
            if not select.select([], [pgconn.socket], [], max(0.0, deadline - time.monotonic()))[1]:
                return f"no answer to a ping in {timeout:.0f}s"
        while True:
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    return failure
                if result.status != pq.ExecStatus.TUPLES_OK:
                    failure = (result.error_message.decode(errors="replace").strip().splitlines() or ["ping failed"])[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pgconn.socket], [], [], remaining)[0]:
                return f"no answer to a ping in {timeout:.0f}s"
            pgconn.consume_input()
    except psycopg.Error as exc:
        return (str(exc).strip().splitlines() or ["ping failed"])[0]


class Readers:
    """Connections that read beside the primary, one per reader thread (get_history).

    At most ``size`` reads run at once; the others wait in the pool's queue. A connection that
    breaks is dropped and the next read on that thread opens a new one.
    """

    def __init__(self, store: PostgresStore, size: int) -> None:
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="vmserver-reader")
        self._local = threading.local()
        self._guard = threading.Lock()
        self.connections: list[psycopg.Connection] = []  # every one open, for close()

    def submit(self, what: str, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(conn, *args)`` on a reader thread. :raises StorageError: (through the future)."""
        try:
            return self._pool.submit(self._run, what, fn, args)
        except RuntimeError:  # closed
            raise StorageError(f"database {self._store.label}: {what} refused: the server is stopping") from None

    def _run(self, what: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        store = self._store
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                try:
                    conn = store.connect("reader")
                except StorageError as exc:
                    raise StorageError(f"database {store.label}: {what} failed: {exc.message}") from None
                with self._guard:
                    self.connections.append(conn)
                self._local.conn = conn
            try:
                return fn(conn, *args)
            except psycopg.Error as exc:
                if not _broken(conn):
                    raise StorageError(f"database {store.label}: {what} failed: {store._reason(exc)}") from None
                self._forget(conn)
                self._local.conn = None
                if attempt:  # a connection that died while idle (a restart) gets one new try: reads change nothing
                    raise StorageError(f"database {store.label}: {what} failed: {store._reason(exc)}") from None
        raise AssertionError("unreachable")

    def _forget(self, conn: psycopg.Connection) -> None:
        conn.close()
        with self._guard:
            if conn in self.connections:
                self.connections.remove(conn)

    def close(self) -> None:
        """Let the reads under way finish, drop those not started, close the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._guard:
            for conn in self.connections:
                conn.close()
            self.connections.clear()
