"""The storage port: what the inventory needs of a durable store, whichever database holds it.

A store keeps the inventory (VMs, disks, password hashes, last_connected) and the history.
Writes are values (:class:`AddVM`, :class:`UpdateVM`, ...), not SQL: each backend turns them
into its own statements and group-commits those that arrive together. Its errors are the
protocol's own: :class:`~vmserver.errors.StorageError` (``internal``: nothing was changed),
or a ``CommandError`` ``already_exists`` / ``conflict`` when the database's unique constraints
catch a clash the in-memory checks could not see (a row written by hand, another process).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union

from ..errors import CommandError, ErrorCode


@dataclass(frozen=True, slots=True)
class VMRow:
    id: int
    vm_id: str
    ram: int
    cpu: int
    password_hash: str | None
    last_connected: str | None


@dataclass(frozen=True, slots=True)
class DiskRow:
    id: int
    disk_id: str
    size: int
    vm_pk: int


# ts, vm_id, event, peer, reason (vm_disconnected: why; auth_failed: the command), count
HistoryRow = tuple[str, str, str, "str | None", "str | None", "int | None"]
# What get_history reads: the row's id first.
StoredHistoryRow = tuple[int, str, str, str, "str | None", "str | None", "int | None"]


def history_filter(vm_id: str | None, event: str | None, since: str | None, before: int | None,
                   mark: str) -> tuple[str, list[Any]]:
    """get_history's WHERE (every filter given must match) and its parameters; ``mark`` is the
    driver's placeholder (``?`` or ``%s``)."""
    where, params = [], []
    for column, op, value in (("vm_id", "=", vm_id), ("event", "=", event), ("ts", ">=", since), ("id", "<", before)):
        if value is not None:
            where.append(f"{column} {op} {mark}")
            params.append(value)
    return (" WHERE " + " AND ".join(where) if where else ""), params


# --- the writes, as values --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddVM:
    """Insert a VM and its disks; the result is (VM id, [disk ids in the given order])."""

    vm_id: str
    ram: int
    cpu: int
    password_hash: str | None
    disks: tuple[tuple[str, int], ...]  # (disk_id, size)
    created_at: str
    last_connected: str | None
    holder: str | None = None  # shared presence: the session connecting it in the same step
    peer: str | None = None  # that session's name


@dataclass(frozen=True, slots=True)
class UpdateVM:
    """Replace a VM's spec: drop, resize and add disks; the result is the added disks' ids."""

    vm_pk: int
    ram: int
    cpu: int
    remove: tuple[int, ...]  # disk ids
    resize: tuple[tuple[int, int], ...]  # (disk id, size)
    add: tuple[tuple[str, int], ...]  # (disk_id, size)


@dataclass(frozen=True, slots=True)
class RemoveVM:
    """Delete a VM and its disks."""

    vm_pk: int


@dataclass(frozen=True, slots=True)
class Connect:
    """A session connects a VM: its last_connected, and with shared presence (PostgreSQL) its
    presence row, which fails the write with conflict when another session holds the VM."""

    vm_pk: int
    when: str
    holder: str = ""  # the session's key
    peer: str | None = None  # the session's name, for the history of a lost server


@dataclass(frozen=True, slots=True)
class Authorize:
    """Shared presence: set the holder's authorization (not_connected if it no longer holds it)."""

    vm_pk: int
    holder: str
    on: bool


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Shared presence: drop the holder's presence row (not_connected if it no longer holds it)."""

    vm_pk: int
    holder: str


@dataclass(frozen=True, slots=True)
class Reap:
    """Shared presence: end the leases that expired and disconnect what their servers held;
    the result is [(vm_id, peer)], each disconnected here (exactly one reaper per row)."""


@dataclass(frozen=True, slots=True)
class PruneHistory:
    """Delete up to ``limit`` history rows older than ``before``, oldest first; the result is how many."""

    before: str
    limit: int


# None: nothing but the history rows that come with it.
Write = Union[AddVM, UpdateVM, RemoveVM, Connect, Authorize, Disconnect, Reap, PruneHistory, None]
# What a write changed, from its result: one change (changes.Change) per history row, for a
# store whose history is also the change feed other servers read (PostgreSQL).
Changes = Callable[[Any], Sequence[Any]]
# One write as a backend runs it: (what it is, for messages; the write; history rows in the same
# transaction; its changes, or None).
Job = tuple[str, Write, Sequence[HistoryRow], "Changes | None"]
Outcome = tuple[Any, "CommandError | None"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a store holds, ids included, for ``vmserver copy``."""

    vms: list[tuple[int, str, int, int, str | None, str | None, str]]  # ... last_connected, created_at
    disks: list[tuple[int, str, int, int]]  # id, disk_id, size, vm id
    history: list[StoredHistoryRow]


# A unique violation the in-memory checks could not see (a row written by hand), as the protocol says it.
def vm_taken(what: str) -> CommandError:
    return CommandError(ErrorCode.ALREADY_EXISTS, f"{what}: the VM already exists in the database")


def disk_taken(what: str) -> CommandError:
    return CommandError(ErrorCode.CONFLICT, f"{what}: a disk id already belongs to another VM in the database")


class Store(Protocol):
    """A durable store. Every method but ``submit`` and ``read_history`` runs off the event loop's
    hot path (at start, at close, or in ``vmserver copy``)."""

    label: str  # what messages name: the file's path, or the DSN with its password masked
    # Shared presence (PostgreSQL): several servers on one database. Presence is then kept in
    # the database, every change is a row of one feed numbered in commit order, and the store
    # hands the owner, in that order, the changes other servers made (``on_change``, set by the
    # owner) between those of its own commits.
    shared: bool
    on_change: Callable[[Any], Any] | None
    servers: list[dict[str, Any]]  # the live servers on this database (stats): server_id, host, pid, since
    writes: int  # writes committed, and in how many transactions (how well group commit batches)
    batches: int

    def load(self) -> tuple[list[VMRow], list[DiskRow]]:
        """The whole inventory, ordered by id, from one snapshot."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start writing (the writer thread needs the running loop)."""

    def submit(self, what: str, write: Write, history: Sequence[HistoryRow] = (), *,
               changes: Changes | None = None,
               on_commit: Callable[[Any], Any] | None = None,
               on_fail: Callable[[], None] | None = None) -> asyncio.Future[Any]:
        """Queue a write and its history rows, one transaction with whatever else is queued.

        The future gets ``on_commit(result)`` (run on the loop, awaited or not) once committed.
        :raises CommandError: (through the future, or at once when the store is closing) nothing
            was written; ``on_fail`` ran first.
        """

    async def read_history(self, vm_id: str | None, event: str | None, since: str | None,
                           before: int | None, limit: int) -> list[StoredHistoryRow]:
        """Newest first; never queued behind the writes."""

    def snapshot(self) -> Snapshot:
        """Everything, in one read transaction."""

    def restore(self, snapshot: Snapshot) -> None:
        """Write a snapshot into an empty store in one transaction. :raises StorageError: not
        empty, or the write failed (nothing was written)."""

    def close(self, timeout: float = 10.0) -> bool:
        """Finish the queued writes, then close; False if the writer is still busy after ``timeout``
        (the database is left open rather than closed under it; calling again tries again)."""
