"""Several servers on one PostgreSQL database: each server's lease, and the change feed.

**The lease** (:class:`Lease`): a row of ``vmserver_servers`` with an expiry set by the
database's clock, renewed every TTL/3 on a connection of its own. A server that has not renewed
for TTL - TTL/3 stops acting (its sessions are closed) while the lease is still valid, so
nobody can take over what it held before it let go; every batch it writes checks the lease in
the same transaction (the fence), so a server that wakes from a pause longer than the TTL
writes nothing. Expired leases are reaped by whichever live server sees them first; reaping
disconnects their VMs (reason ``server_lost``), one row lock deciding the one reaper.

**The feed** (:class:`Sequencer`): every change is a history row, numbered in commit order by
a one-row counter each writing transaction updates just before it commits (the counter's row
lock orders the numbers like the commits). Each server applies the feed strictly in order: its
own batches as they commit, other servers' rows as it reads them (woken by a NOTIFY, and every
``CATCH_UP`` seconds whatever happens); so every server's memory and every subscriber see one
order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg

from ..errors import StorageError

if TYPE_CHECKING:
    from .postgres import PostgresStore

log = logging.getLogger(__name__)

CHANNEL = "vmserver_feed"  # NOTIFY channel: a wake-up only, never the data
CATCH_UP = 0.5  # the feed is read this often even without a NOTIFY (the safety net)
FETCH = 1000  # feed rows per read
OWN_WAIT = 10.0  # a row of ours read before our commit's reply: wait this long for the reply
RETRY = 0.2  # a read of the feed that failed (PostgreSQL away) is tried again after this long


def _cut_after(conn: psycopg.Connection, timeout: float) -> threading.Timer:
    """A timer that shuts ``conn``'s socket after ``timeout`` (a hung PostgreSQL answers
    keepalives and runs no statement timeout): the statement under way then fails."""
    def cut() -> None:
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    return timer


class Lease:
    """This server's lease, kept by a thread of its own."""

    def __init__(self, store: PostgresStore, ttl: float, server_id: str) -> None:
        self.store, self.ttl, self.server_id = store, ttl, server_id
        self.id: int | None = None  # the lease held now; None: none (sessions closed, writes refused)
        self.own: set[int] = set()  # every lease this process has held: feed rows of ours
        self.valid_until = 0.0  # monotonic: act no longer than this without a renewal
        self.servers: list[dict[str, Any]] = []  # the live servers, as of the last renewal
        self.others = False  # another server is alive: our commits NOTIFY
        self.expired_seen = False  # an expired lease was seen at the last look: to be reaped
        self.on_lost: Callable[[str], None] | None = None  # called on the loop
        self.on_held: Callable[[], None] | None = None
        self._conn: psycopg.Connection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmserver-pg-lease", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    def join(self) -> None:
        """Take a new lease (at start, and after losing one). :raises psycopg.Error, StorageError."""
        conn = self._connection()
        sent = time.monotonic()
        timer = _cut_after(conn, self.renew_every)
        try:
            with conn.transaction():
                lease = conn.execute(
                    "INSERT INTO vmserver_servers (server_id, host, pid, expires_at) "
                    "VALUES (%s, %s, %s, clock_timestamp() + make_interval(secs => %s)) RETURNING lease",
                    (self.server_id, socket.gethostname(), os.getpid(), self.ttl)).fetchone()[0]
                conn.execute("SELECT pg_notify(%s, 'join')", (CHANNEL,))  # the others NOTIFY from now on
        finally:
            timer.cancel()
        self.id = lease
        self.own.add(lease)
        self.valid_until = sent + self.ttl - self.renew_every
        self._read_servers(conn)
        log.info("database %s: server %s holds lease %d (ttl %gs)", self.store.label, self.server_id, lease, self.ttl)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def close(self) -> None:
        """Stop renewing and give the lease back (a clean stop: nothing is left to reap)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.renew_every + 2)
        lease, self.id = self.id, None
        if lease is not None:
            for _ in range(2):  # a connection found dead is made again once
                try:
                    self._give_back(lease)
                    break
                except (psycopg.Error, StorageError) as exc:
                    reason = exc.message if isinstance(exc, StorageError) else self.store._reason(exc)
                    broken = self._conn is None or self._conn.broken or self._conn.closed
                    if self._conn is not None and broken:
                        self._conn.close()
                        self._conn = None
                    if not broken:
                        log.warning("database %s: giving the lease back failed: %s", self.store.label, reason)
                        break
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _give_back(self, lease: int) -> None:
        conn = self._connection()
        timer = _cut_after(conn, 2.0)
        try:
            with conn.transaction():
                left = conn.execute("SELECT count(*) FROM vmserver_presence WHERE lease = %s", (lease,)).fetchone()[0]
                if left:
                    log.warning("database %s: %d VMs still held at stop; they are released when the lease "
                                "expires", self.store.label, left)
                else:
                    conn.execute("DELETE FROM vmserver_servers WHERE lease = %s", (lease,))
        finally:
            timer.cancel()

    def lost_now(self, lease: int, why: str) -> None:
        """The fence said ``lease`` is gone (a batch found it expired): act as if it had expired
        here, unless a newer one is held already (the batch was queued under the old one)."""
        if self.id is not None and self.id == lease:
            self.valid_until = 0.0
            self._stop_acting(why)

    # --- the thread -------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = self.store.connect("lease")
        return self._conn

    def _run(self) -> None:
        next_try = time.monotonic() + self.renew_every
        while not self._stop.is_set():
            now = time.monotonic()
            wait = next_try - now
            if self.id is not None:
                wait = min(wait, self.valid_until - now)
            if wait > 0 and self._stop.wait(wait):
                return
            if self.id is not None and time.monotonic() >= self.valid_until:
                self._stop_acting(f"the lease was not renewed for {self.ttl - self.renew_every:g}s")
            try:
                if self.id is None:
                    self.join()
                    self._tell(self.on_held)
                else:
                    self._renew()
                if self.id is not None and self.expired_seen:  # a lost server's VMs: released now
                    self._tell(self.store.reap)
                next_try = time.monotonic() + self.renew_every
            except (psycopg.Error, StorageError) as exc:
                reason = exc.message if isinstance(exc, StorageError) else self.store._reason(exc)
                log.warning("database %s: lease %s: %s", self.store.label,
                            "renewal failed" if self.id is not None else "joining failed", reason)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                next_try = time.monotonic() + min(1.0, self.renew_every)
            except Exception:  # a bug: keep renewing all the same
                log.exception("database %s: lease", self.store.label)
                next_try = time.monotonic() + self.renew_every

    def _renew(self) -> None:
        conn = self._connection()
        sent = time.monotonic()
        timer = _cut_after(conn, self.renew_every)
        try:
            renewed = conn.execute(
                "UPDATE vmserver_servers SET expires_at = clock_timestamp() + make_interval(secs => %s) "
                "WHERE lease = %s AND expires_at > clock_timestamp() RETURNING lease", (self.ttl, self.id)).fetchone()
            if renewed is None:  # expired (we were paused or cut off for longer than the TTL)
                self._stop_acting("the lease expired before it could be renewed")
                return
            self.valid_until = sent + self.ttl - self.renew_every
            self._read_servers(conn)
        finally:
            timer.cancel()

    def _read_servers(self, conn: psycopg.Connection) -> None:
        """Note the live servers, and whether some lease has expired (to be reaped)."""
        rows = conn.execute("SELECT lease, server_id, host, pid, started_at, expires_at > clock_timestamp() "
                            "FROM vmserver_servers ORDER BY lease").fetchall()
        self.servers = [{"server_id": server_id, "host": host, "pid": pid,
                         "since": started.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}
                        for _, server_id, host, pid, started, alive in rows if alive]
        self.others = any(alive and lease != self.id for lease, *_, alive in rows)
        self.expired_seen = any(not alive for *_, alive in rows)

    def _stop_acting(self, why: str) -> None:
        if self.id is None:
            return
        log.error("database %s: server %s gives up lease %d: %s; closing its sessions", self.store.label,
                  self.server_id, self.id, why)
        self.id = None
        self._tell(self.on_lost, why)

    def _tell(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)


class Listener:
    """LISTEN on a connection of its own (psycopg's notifies() holds it): each NOTIFY, and every
    CATCH_UP seconds, asks the sequencer to read the feed; a lost connection is made again."""

    def __init__(self, store: PostgresStore, poke: Callable[[], None]) -> None:
        self.store, self._poke = store, poke
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="vmserver-pg-listener", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and not conn.closed:  # its wait in notifies() ends at once
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(CATCH_UP + 2)
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self.store.connect("listener")
                    self._conn.execute(f"LISTEN {CHANNEL}")
                    # A server that joined before we listened sent its `join` to nobody: look.
                    lease = self.store.lease
                    if self._conn.execute("SELECT EXISTS (SELECT 1 FROM vmserver_servers WHERE lease <> %s "
                                          "AND expires_at > clock_timestamp())", (lease.id or 0,)).fetchone()[0]:
                        lease.others = True
                    delay = 0.05
                for note in self._conn.notifies(timeout=CATCH_UP, stop_after=1):
                    if note.payload == "join":  # a server joined: our commits wake it from now on
                        self.store.lease.others = True
                self._wake()
            except (psycopg.Error, StorageError) as exc:
                reason = exc.message if isinstance(exc, StorageError) else self.store._reason(exc)
                log.debug("database %s: listener: %s; again in %.2fs", self.store.label, reason, delay)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 2.0)
                self._wake()  # what was missed meanwhile is read anyway

    def _wake(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._poke)


# seq, vm_id, event, reason, count, payload, lease
FeedRow = tuple[int, str, str, "str | None", "int | None", "str | None", "int | None"]


class Sequencer:
    """On the event loop: applies the feed in its order, from ``position`` on.

    Our own batches come as they commit (``local``: their deliveries, which apply their changes
    through the jobs' callbacks); other servers' rows come from reads of the feed (``fetched``)
    and are applied through ``apply``. A batch of ours whose number is not next waits for the
    rows before it, which are read at once.
    """

    def __init__(self, position: int, fetch: Callable[[int], Any], apply: Callable[[FeedRow], None],
                 own: set[int]) -> None:
        self.applied = position  # the last feed number applied here
        self._fetch, self._apply, self._own = fetch, apply, own
        self._local: collections.deque[tuple[int, int, Callable[[], None]]] = collections.deque()
        self._rows: dict[int, FeedRow] = {}  # read, not applied yet
        self._own_seen: dict[int, float] = {}  # our rows read before our reply: since when
        self._fetching = False
        self._again = False
        self._retry_at = 0.0  # a read failed: none before this (monotonic), so an outage is no busy loop
        self._timer: asyncio.TimerHandle | None = None

    def local(self, first: int, last: int, deliver: Callable[[], None]) -> None:
        """A batch of ours committed rows first..last (none: last < first)."""
        self._local.append((first, last, deliver))
        self._step()

    def poke(self) -> None:
        """Read the feed (a NOTIFY came, or it is time to)."""
        if self._fetching:
            self._again = True
            return
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self._again = True
            self._later(wait)
            return
        self._fetching = True
        self._again = False
        self._fetch(self.applied)

    def fetched(self, after: int, rows: list[FeedRow] | None) -> None:
        """The rows after ``after`` a read found (None: the read failed)."""
        self._fetching = False
        if rows is None:
            self._retry_at = time.monotonic() + RETRY
        if rows:
            if rows[0][0] > after + 1 and rows[0][0] > self.applied + 1:
                log.error("change feed: rows %d..%d are gone (pruned before this server read them); events in "
                          "between were missed", self.applied + 1, rows[0][0] - 1)
                self.applied = rows[0][0] - 1
            for row in rows:
                if row[0] > self.applied:
                    self._rows[row[0]] = row
        self._step()
        if self._again or (rows is not None and len(rows) >= FETCH):
            self.poke()

    def _step(self) -> None:
        while True:
            if self._local:
                first, last, deliver = self._local[0]
                if last < first or first <= self.applied + 1:
                    self._local.popleft()
                    for seq in range(first, last + 1):
                        self._rows.pop(seq, None)
                        self._own_seen.pop(seq, None)
                    if last >= first and first <= self.applied:
                        log.error("change feed: rows %d..%d of ours were applied before their commit was "
                                  "reported", first, last)
                    self.applied = max(self.applied, last)
                    deliver()
                    continue
            row = self._rows.get(self.applied + 1)
            if row is None:
                break
            if row[6] in self._own:  # ours: our commit's reply is on its way and applies it
                seen = self._own_seen.setdefault(row[0], time.monotonic())
                if time.monotonic() - seen < OWN_WAIT:
                    self._later(OWN_WAIT)
                    break
                log.warning("change feed: row %d of ours came with no reply (a commit reported failed that "
                            "did happen); applied from the feed", row[0])
            del self._rows[row[0]]
            self._own_seen.pop(row[0], None)
            self.applied = row[0]
            try:
                self._apply(row)
            except Exception:  # a row we cannot apply must not stop the feed
                log.exception("change feed: row %d (%s %s)", row[0], row[2], row[1])
        if self._local and self._local[0][0] > self.applied + 1:
            self._again = True
            self.poke()  # the rows before our batch: other servers' commits, not read yet

    def _later(self, delay: float) -> None:
        """Step again in ``delay`` seconds (or sooner, if already due sooner)."""
        loop = asyncio.get_running_loop()
        if self._timer is not None and self._timer.when() <= loop.time() + delay:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay, self._timeout)

    def _timeout(self) -> None:
        self._timer = None
        self._step()
        if self._again:
            self.poke()
