"""The inventory: the command rules' state, a cache of the durable store plus presence.

It depends on ports, not on a database: the store (backends/base.py), presence (presence.py)
and the event feed (feed.py). Reads never touch the store: lists are assembled from each
record's cached JSON, and whole lists are cached block by block until the next change. Writes
are checked in memory, then committed by the store (group commit), and every change reaches
the cache through :meth:`Inventory.apply`; names and disk ids a pending write will take are
reserved meanwhile, so two writes that would clash cannot both pass their checks. Between
awaits every method runs on the event loop alone, so each check-and-claim is atomic with
respect to every session.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from .backends.base import (AddVM, Authorize, Connect, Disconnect, DiskRow, HistoryRow, PruneHistory, RemoveVM, Store,
                            UpdateVM, VMRow)
from .changes import AuthFailed, Change, PresenceChanged, VMAdded, VMRemoved, VMUpdated
from .errors import CommandError, ErrorCode
from .feed import EventFeed
from .listing import Blocks, Encoded, View, json_list
from .presence import SERVER_ID, LocalPresence, Presence, SharedPresence
from .protocol import dumps, utc_now
from .records import VM, Disk
from .validation import DiskSpec

log = logging.getLogger(__name__)


class Owner(Protocol):
    """What the inventory and commands need of a session."""

    key: str  # stable and unique: what presence records as a VM's holder
    name: str
    vms: set[str]  # the VMs it has connected
    authenticated: bool  # presented the server's token (always True on a server without one)
    ended: bool  # its connection is gone: nothing may be bound to it any more

    def subscribe(self, events: frozenset[str], vm_id: str | None) -> None: ...

    def unsubscribe(self) -> None: ...


def _matcher(connected: bool | None, authorized: bool | None) -> Callable[[VM], bool]:
    """The test of get_all_vms' connected= and authorized= filters."""
    if connected is None and authorized is None:
        return lambda vm: True
    return lambda vm: ((connected is None or (vm.holder is not None) == connected)
                       and (authorized is None or vm.authorized == authorized))


def _name_index(vms: list[VM]) -> tuple[list[str], list[VM]]:
    ordered = sorted(vms, key=_vm_name)
    return [vm.vm_id for vm in ordered], ordered


def _vm_name(vm: VM) -> str:
    return vm.vm_id


def _vm_pk(vm: VM) -> int:
    return vm.id


def _disk_pk(disk: Disk) -> int:
    return disk.id


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("history not recorded: %s", future.exception())


def _history_row(event: str, vm_id: str, actor: Owner | None, reason: str | None = None,
                 count: int | None = None) -> HistoryRow:
    return (utc_now(), vm_id, event, actor.name if actor is not None else None, reason, count)


RELEASE_RETRY = 1.0  # seconds between tries to let go of a VM whose disconnect failed (shared presence)
PRUNE_BATCH = 1000  # history rows deleted per write job: each is a short transaction
JOURNAL_WAIT = 10.0  # at most this long a history read waits for journaled rows to be written
AUTH_FAILED_INTERVAL = 10.0  # seconds over which a VM's failed password checks make one history row


class _Burst:
    """A VM's failed password checks since its last auth_failed row, not recorded yet."""

    __slots__ = ("vm", "count", "peer", "command", "timer")

    def __init__(self, vm: VM, timer: asyncio.TimerHandle) -> None:
        self.vm, self.timer = vm, timer
        self.count = 0
        self.peer: str | None = None  # of the last of them
        self.command: str | None = None


class Inventory:
    """Presence is local (this server's memory: SQLite) or shared (the database's: PostgreSQL,
    several servers). Shared, every presence change is a write the database may refuse, and
    changes other servers made arrive from the store's feed through :meth:`apply` too."""

    def __init__(self, store: Store, presence: Presence | None = None, feed: EventFeed | None = None) -> None:
        self.store = store
        self._vms: dict[str, VM] = {}  # by vm_id, in id order (ids only grow)
        self.shared = getattr(store, "shared", False)
        self.presence: Presence = (presence if presence is not None else
                                   SharedPresence(self._vms) if self.shared else LocalPresence())
        self.feed = feed if feed is not None else EventFeed()
        # Failed password checks made through other servers (shared): the slowdown counts them too.
        self.on_auth_failed_elsewhere: Callable[[str, int], None] | None = None
        self._disks: dict[str, Disk] = {}  # by disk_id, in id order
        self._reserved_vm_ids: set[str] = set()  # taken by a write not yet committed
        self._reserved_disk_ids: set[str] = set()
        # The lists, kept current block by block (see listing.py).
        self._vm_blocks: Blocks[VM] = Blocks()
        self._all_vms = self._vm_blocks.view(lambda vms: b",".join([vm._json for vm in vms]))
        # Per filter (connected, authorized): each block's matching VMs, and their JSON; made on
        # first use. A page or a filtered list skips blocks without a match at no cost.
        self._selected: dict[tuple[bool | None, bool | None], View[VM, list[VM]]] = {}
        self._selected_json: dict[tuple[bool | None, bool | None], View[VM, bytes]] = {(None, None): self._all_vms}
        # Each block's VMs ordered by name (names never change), for prefix= in a bisect per block.
        self._by_name = self._vm_blocks.view(_name_index)
        self._vm_totals = self._vm_blocks.view(lambda vms: (
            len(vms), sum(vm.holder is not None for vm in vms), sum(vm.authorized for vm in vms),
            sum(vm.ram for vm in vms), sum(vm.cpu for vm in vms)))
        self._disk_blocks: Blocks[Disk] = Blocks()
        self._all_disks = self._disk_blocks.view(lambda disks: b",".join([d.listing_json() for d in disks]))
        self._disk_totals = self._disk_blocks.view(lambda disks: (len(disks), sum(d.size for d in disks)))
        self._journal_tail: asyncio.Future[Any] | None = None  # the last history rows journaled
        self._rows: list[HistoryRow] | None = None  # journaled this loop turn, not yet submitted
        self._rows_done: asyncio.Future[Any] | None = None
        self.auth_failed_interval = AUTH_FAILED_INTERVAL
        self._bursts: dict[str, _Burst] = {}  # by vm_id: failed password checks being counted
        # connect_vm of a new VM: the session registering it, and, if that session ended before
        # the commit, why (the vm_disconnected row that must follow the stored connect)
        self._registering: dict[str, Owner] = {}
        self._orphaned: dict[str, str] = {}
        self._holding: dict[str, Owner] = {}  # by key: the sessions that have connected a VM, until released
        self._closed = False  # close() has recorded what was pending
        self._store_closed = False
        self._load()
        if self.shared:
            store.on_change = self._from_elsewhere

    def start(self, loop: Any) -> None:
        """Start the store's writer (needs the running event loop)."""
        self.store.start(loop)

    def _load(self) -> None:
        vm_rows, disk_rows = self.store.load()
        by_pk = {}
        for row in vm_rows:
            vm = VM(row.id, row.vm_id, row.ram, row.cpu, row.password_hash, row.last_connected)
            self._vms[vm.vm_id] = by_pk[vm.id] = vm
            self._vm_blocks.add(vm)
        for row in disk_rows:
            vm = by_pk[row.vm_pk]
            disk = Disk(row.id, row.disk_id, row.size, vm)
            vm.disks.append(disk)
            self._disks[disk.disk_id] = disk
            self._disk_blocks.add(disk)
        for pk, (holder, authorized) in getattr(self.store, "presence", {}).items():  # shared: read with the rows
            vm = by_pk[pk]
            vm.holder, vm.authorized = holder, authorized
        for vm in self._vms.values():  # encode the whole fleet now, not in the first list request
            vm.encode()
        self._all_vms.json_array()  # and the lists too
        self._all_disks.json_array()

    def __len__(self) -> int:
        return len(self._vms)

    # --- the one way changes reach the cache ------------------------------------------------

    def apply(self, change: Change) -> VM:
        """Mirror a committed change (or a presence change) into the cache, then announce it."""
        if isinstance(change, AuthFailed):
            vm = self._vms[change.vm_id]
            if change.event is not None:
                self._announce(change.event, vm, change.command, change.count)
            return vm
        if isinstance(change, PresenceChanged):
            vm = self._vms[change.vm_id]
            vm.holder, vm.authorized = change.holder, change.authorized
            if change.last_connected is not None:
                vm.last_connected = change.last_connected
        elif isinstance(change, VMAdded):
            row = change.vm
            vm = VM(row.id, row.vm_id, row.ram, row.cpu, row.password_hash, row.last_connected)
            for d in change.disks:
                self._add_disk(Disk(d.id, d.disk_id, d.size, vm))
            self._vms[vm.vm_id] = vm
            self._vm_blocks.add(vm)
        elif isinstance(change, VMUpdated):
            vm = self._vms[change.vm_id]
            vm.ram, vm.cpu = change.ram, change.cpu
            self._set_disks(vm, change.disks)
        else:
            vm = self._vms.pop(change.vm_id)
            self._vm_blocks.remove(vm)
            for disk in vm.disks:
                del self._disks[disk.disk_id]
                self._disk_blocks.remove(disk)
            if change.event is not None:
                self._announce(change.event, vm)
            vm.disks = []  # no VM <-> disk cycle left: freed at once, even if loaded before gc.freeze()
            return vm
        self._changed(vm)
        if change.event is not None:
            self._announce(change.event, vm, change.reason if isinstance(change, PresenceChanged) else None)
        return vm

    def _from_elsewhere(self, change: Change) -> None:
        """A change another server made (or the reaper of a lost one), read from the feed."""
        if isinstance(change, AuthFailed) and self.on_auth_failed_elsewhere is not None:
            self.on_auth_failed_elsewhere(change.vm_id, change.count)
        if isinstance(change, VMAdded) and change.vm.vm_id in self._vms:
            log.error("change feed: %s is known already; ignored", change.vm.vm_id)
            return
        self.apply(change)

    def _add_disk(self, disk: Disk) -> None:
        disk.vm.disks.append(disk)
        self._disks[disk.disk_id] = disk
        self._disk_blocks.add(disk)

    def _set_disks(self, vm: VM, rows: Sequence[DiskRow]) -> None:
        """Make ``vm``'s disks ``rows``: the unchanged kept as they are, the resized re-encoded."""
        wanted = {row.disk_id: row for row in rows}
        kept = []
        for disk in vm.disks:
            row = wanted.pop(disk.disk_id, None)
            if row is None:
                del self._disks[disk.disk_id]
                self._disk_blocks.remove(disk)
                continue
            if row.size != disk.size:
                disk.size = row.size
                disk.encode()
                self._disk_blocks.touch(disk)
            kept.append(disk)
        vm.disks = kept
        for row in wanted.values():
            self._add_disk(Disk(row.id, row.disk_id, row.size, vm))
        vm.disks.sort(key=_disk_pk)

    def _changed(self, vm: VM) -> None:
        vm.encode()
        self._vm_blocks.touch(vm)

    def _presence(self, vm: VM, event: str | None, reason: str | None = None,
                  last_connected: str | None = None) -> None:
        """Apply what presence now says of ``vm``."""
        self.apply(PresenceChanged(vm.vm_id, self.presence.holder(vm.vm_id), self.presence.authorized(vm.vm_id),
                                   event, last_connected, reason))

    def _announce(self, event: str, vm: VM, reason: str | None = None, count: int | None = None) -> None:
        """Tell the event feed: ``data()`` is the event's JSON, made once on first call: the
        record, plus why it disconnected or which command failed, plus how many failures an
        auth_failed stands for."""
        if not self.feed.listeners:
            return
        made: list[bytes] = []

        def data() -> bytes:
            if not made:
                extra = b""
                if reason is not None:
                    extra += b',"' + (b"command" if event == "auth_failed" else b"reason") + b'":' + dumps(reason)
                if count is not None:
                    extra += b',"count":%d' % count
                made.append(vm.json()[:-1] + extra + b"}" if extra else vm.json())
            return made[0]

        self.feed.publish(event, vm.vm_id, data)

    # --- history rows with no write of their own (presence changes, failed passwords) -------

    def _record(self, row: HistoryRow) -> None:
        """Queue a history row; the rows of one loop turn go to the store as one job (a fleet
        hanging up at once is a few jobs of many rows, not a job each).

        Not awaited: the reply does not wait for the history row. Never raises: the change is
        already made in memory, so it stays made and is answered as made; a row the store
        refuses (the server is stopping) or fails to write is logged.
        """
        if self._rows is None:
            loop = asyncio.get_running_loop()
            self._rows = []
            self._journal_tail = self._rows_done = loop.create_future()
            loop.call_soon(self._flush_rows)
        self._rows.append(row)

    def _flush_rows(self) -> None:
        """Hand the queued rows to the store; before any other write too, so that history ids
        keep the order in which things happened."""
        rows, done = self._rows, self._rows_done
        if rows is None or done is None:
            return
        self._rows = self._rows_done = None
        try:
            future = self.store.submit(f"history: {len(rows)} rows", None, rows)
        except CommandError as exc:
            shown = ", ".join(f"{row[2]} {row[1]}" for row in rows[:3]) + (", ..." if len(rows) > 3 else "")
            log.error("history not recorded (%d rows: %s): %s", len(rows), shown, exc)
            done.set_result(None)
            return
        future.add_done_callback(_log_failure)
        future.add_done_callback(lambda _: done.done() or done.set_result(None))

    async def settle(self) -> None:
        """Wait until every write and history row queued so far is committed."""
        await self._submit("settle", None)

    def _submit(self, what: str, write: Any, history: Sequence[HistoryRow] = (),
                **callbacks: Any) -> asyncio.Future[Any]:
        self._flush_rows()
        return self.store.submit(what, write, history, **callbacks)

    def auth_failed(self, vm: VM, actor: Owner, command: str) -> asyncio.Future[Any] | None:
        """A wrong or missing password for ``vm``: recorded and announced at once the first time;
        those that follow within ``auth_failed_interval`` are counted and recorded together, as
        one row and one event with their count, when the interval ends (a flood of guesses is a
        row every interval, not a row each). Shared presence: the first one's commit, which the
        refusal may wait for (so its event comes before it, as on one server)."""
        burst = self._bursts.get(vm.vm_id)
        if burst is None:
            recorded = self._record_failures(vm, actor.name, command, 1)
            self._open_burst(vm)
            return recorded
        else:
            burst.vm, burst.peer, burst.command = vm, actor.name, command
            burst.count += 1
        return None

    def record_auth_failures(self, vm_id: str) -> None:
        """Record now the failed password checks still being counted for ``vm_id`` (before a removal)."""
        self._end_burst(vm_id)

    def _open_burst(self, vm: VM) -> None:
        timer = asyncio.get_running_loop().call_later(self.auth_failed_interval, self._end_burst, vm.vm_id, True)
        self._bursts[vm.vm_id] = _Burst(vm, timer)

    def _end_burst(self, vm_id: str, again: bool = False) -> None:
        """Record the failures counted for ``vm_id``, if any; ``again``: and count on for another interval."""
        burst = self._bursts.pop(vm_id, None)
        if burst is None:
            return
        burst.timer.cancel()
        if burst.count:
            self._record_failures(burst.vm, burst.peer, burst.command, burst.count)
            if again:
                self._open_burst(burst.vm)

    def _record_failures(self, vm: VM, peer: str | None, command: str | None,
                         count: int) -> asyncio.Future[Any] | None:
        row: HistoryRow = (utc_now(), vm.vm_id, "auth_failed", peer, command, count)
        if not self.shared:
            self._record(row)
            self._announce("auth_failed", vm, command, count)
            return None
        change = AuthFailed(vm.vm_id, command, count)  # announced when committed, in the feed's order
        return self._background(f"auth_failed {vm.vm_id}", None, row, change)

    def _background(self, what: str, write: Any, row: HistoryRow, change: Change,
                    on_fail: Callable[[CommandError], None] | None = None) -> asyncio.Future[Any] | None:
        """A shared-presence write nobody needs to wait for: applied when committed, else logged."""
        try:
            future = self._submit(what, write, [row], changes=lambda _: [change],
                                  on_commit=lambda _: self.apply(change) if change.vm_id in self._vms else None)
        except CommandError as exc:
            log.error("%s not recorded: %s", what, exc)
            return None

        def done(f: asyncio.Future[Any]) -> None:
            exc = None if f.cancelled() else f.exception()
            if isinstance(exc, CommandError):
                if on_fail is not None:
                    on_fail(exc)
                else:
                    log.error("%s not recorded: %s", what, exc)
        future.add_done_callback(done)
        return future

    # --- lookups ----------------------------------------------------------------------

    def get(self, vm_id: str) -> VM:
        """:raises CommandError: not_found."""
        vm = self._vms.get(vm_id)
        if vm is None:
            raise CommandError(ErrorCode.NOT_FOUND, f"no VM {vm_id!r}")
        return vm

    def exists(self, vm_id: str) -> bool:
        return vm_id in self._vms

    def _check_new_disks(self, disks: Sequence[DiskSpec], owner_vm: VM | None = None) -> None:
        """conflict when a disk id repeats in the list, belongs to another VM, or is being taken."""
        seen: set[str] = set()
        for spec in disks:
            if spec.disk_id in seen:
                raise CommandError(ErrorCode.CONFLICT, f"disk {spec.disk_id!r} appears twice in disks")
            seen.add(spec.disk_id)
            holder = self._disks.get(spec.disk_id)
            if holder is not None and holder.vm is not owner_vm:
                raise CommandError(
                    ErrorCode.CONFLICT, f"disk {spec.disk_id!r} already belongs to VM {holder.vm.vm_id!r}")
            if holder is None and spec.disk_id in self._reserved_disk_ids:
                raise CommandError(ErrorCode.CONFLICT, f"disk {spec.disk_id!r} is being added to another VM")

    # --- mutations --------------------------------------------------------------------

    def check_can_add(self, vm_id: str, disks: Sequence[DiskSpec], connecting: bool = False) -> None:
        """The checks of add(), without writing: lets callers fail fast before slow work.

        ``connecting``: for connect_vm, a VM another session is registering right now is a
        conflict (it is theirs), not already_exists.
        """
        if vm_id in self._reserved_vm_ids and connecting:
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is being registered by another session")
        if vm_id in self._vms or vm_id in self._reserved_vm_ids:
            raise CommandError(ErrorCode.ALREADY_EXISTS, f"VM {vm_id!r} already exists")
        self._check_new_disks(disks)

    async def add(self, vm_id: str, ram: int, cpu: int, disks: Sequence[DiskSpec],
                  password_hash: str | None, owner: Owner | None = None, actor: Owner | None = None) -> VM:
        """Register a VM; with ``owner``, it is connected by that session in the same step.

        :raises CommandError: already_exists, conflict; internal (StorageError): nothing was stored.
        """
        self.check_can_add(vm_id, disks, connecting=owner is not None)
        disk_ids = [d.disk_id for d in disks]
        self._reserved_vm_ids.add(vm_id)
        self._reserved_disk_ids.update(disk_ids)

        def unreserve() -> None:
            self._reserved_vm_ids.discard(vm_id)
            self._reserved_disk_ids.difference_update(disk_ids)
            if owner is not None:
                self._registering.pop(vm_id, None)

        now = utc_now()
        last_connected = now if owner is not None else None
        if owner is not None:
            self._registering[vm_id] = owner

        def changes(result: tuple[int, list[int]]) -> list[Change]:
            vm_pk, disk_pks = result
            made: list[Change] = [VMAdded(VMRow(vm_pk, vm_id, ram, cpu, password_hash, last_connected),
                                          tuple(DiskRow(pk, spec.disk_id, spec.size, vm_pk)
                                                for pk, spec in zip(disk_pks, disks)))]
            if owner is not None and self.shared:
                made.append(PresenceChanged(vm_id, owner.key, False, "vm_connected", last_connected))
            return made

        def committed(result: tuple[int, list[int]]) -> VM:
            unreserve()
            ended = self._orphaned.pop(vm_id, None) if owner is not None else None
            made = changes(result)
            vm = self.apply(made[0])
            if owner is not None and self.shared:
                self.apply(made[1])
                self._held(vm, owner, ended)
            elif owner is not None and not owner.ended:
                self._bind(vm, owner, "vm_connected")
            elif owner is not None:
                # The session ended while its connect was being committed: the stored connect is
                # followed by its end, so the history says what happened. No event: to the live
                # view it was never connected.
                self._record(_history_row("vm_disconnected", vm_id, owner, ended or "session_closed"))
            return vm

        who = owner or actor
        held = owner is not None and self.shared
        write = AddVM(vm_id, ram, cpu, password_hash, tuple((d.disk_id, d.size) for d in disks), now, last_connected,
                      owner.key if held else None, owner.name if held else None)
        history = [_history_row("vm_added", vm_id, who)] + ([_history_row("vm_connected", vm_id, owner)] if owner else [])
        try:
            return await self._submit(f"add {vm_id}", write, history, changes=changes, on_commit=committed,
                                      on_fail=lambda: (unreserve(), self._orphaned.pop(vm_id, None)))
        except CommandError as exc:
            if owner is None or not self.shared or exc.code is not ErrorCode.ALREADY_EXISTS:
                raise
            # Registered meanwhile through another server, by a session connecting it: as on one
            # server, the loser of a connect_vm race hears conflict.
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is being registered by another session") from None

    async def connect(self, vm_id: str, owner: Owner) -> VM:
        """Bind a known VM to ``owner`` (idempotent for the same owner) and record last_connected.

        The claim is made at once, so a racing session gets conflict; if recording fails, the
        claim is undone.

        :raises CommandError: not_found, conflict; internal (StorageError): not connected.
        """
        vm = self.get(vm_id)
        holder = self.presence.holder(vm_id)
        if holder == owner.key:
            return vm
        if holder is not None:
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is connected by another session")
        if self.removing(vm_id):
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is being removed")
        if self.shared:
            return await self._connect_shared(vm, owner)
        self._bind(vm, owner, None)
        now = utc_now()

        def committed(_: None) -> VM:
            held = self.presence.holder(vm_id) == owner.key
            self._presence(vm, "vm_connected" if held else None, last_connected=now)
            return vm

        def failed() -> None:
            self._unbind(vm, owner, None)

        return await self._submit(f"connect {vm_id}", Connect(vm.id, now),
                                  [_history_row("vm_connected", vm_id, owner)], on_commit=committed, on_fail=failed)

    # --- shared presence: every change a write the database may refuse (another server) -----

    async def _connect_shared(self, vm: VM, owner: Owner) -> VM:
        """The database decides between sessions racing on several servers; on this one, the
        first to ask is the only one to ask (the others get conflict meanwhile)."""
        vm_id = vm.vm_id
        if vm_id in self._registering:
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is being connected by another session")
        self._registering[vm_id] = owner
        now = utc_now()
        change = PresenceChanged(vm_id, owner.key, False, "vm_connected", now)

        def committed(_: None) -> VM:
            self._registering.pop(vm_id, None)
            self.apply(change)
            self._held(vm, owner, self._orphaned.pop(vm_id, None))
            return vm

        def failed() -> None:
            self._registering.pop(vm_id, None)
            self._orphaned.pop(vm_id, None)

        return await self._submit(f"connect {vm_id}", Connect(vm.id, now, owner.key, owner.name),
                                  [_history_row("vm_connected", vm_id, owner)], changes=lambda _: [change],
                                  on_commit=committed, on_fail=failed)

    def _held(self, vm: VM, owner: Owner, ended: str | None) -> None:
        """A connect committed: the session holds the VM, or lets go at once if it ended meanwhile."""
        if owner.ended:
            self._let_go(vm.vm_id, owner.key, owner.name, ended or "session_closed")
            return
        owner.vms.add(vm.vm_id)
        self._holding[owner.key] = owner

    def _presence_write(self, vm: VM, owner: Owner, write: Any, change: PresenceChanged,
                        done: Callable[[], None] | None = None) -> Awaitable[VM]:
        """Authorize, deauthorize or disconnect with shared presence: applied once committed."""
        def committed(_: None) -> VM:
            if done is not None:
                done()
            self.apply(change)
            return vm
        return self._submit(f"{change.event} {vm.vm_id}", write, [_history_row(change.event or "", vm.vm_id, owner,
                                                                               change.reason)],
                            changes=lambda _: [change], on_commit=committed)

    def _let_go(self, vm_id: str, key: str, name: str, reason: str) -> None:
        """A session that ended lets go of a VM (shared presence). Not awaited; a failure (the
        database is away) is tried again every RELEASE_RETRY seconds, until it is done or the
        VM is no longer the session's (a lost lease: another server's reaper disconnects it)."""
        vm = self._vms.get(vm_id)
        if vm is None or vm.holder != key:
            return
        change = PresenceChanged(vm_id, None, False, "vm_disconnected", None, reason)

        def failed(exc: CommandError) -> None:
            if exc.code is ErrorCode.NOT_CONNECTED:
                return  # not ours any more
            asyncio.get_running_loop().call_later(RELEASE_RETRY, self._let_go, vm_id, key, name, reason)
        self._background(f"disconnect {vm_id}", Disconnect(vm.id, key), (utc_now(), vm_id, "vm_disconnected", name,
                                                                        reason, None), change, on_fail=failed)

    def _bind(self, vm: VM, owner: Owner, event: str | None) -> None:
        if not self.presence.claim(vm.vm_id, owner.key):
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm.vm_id!r} is connected by another session")
        owner.vms.add(vm.vm_id)
        self._holding[owner.key] = owner
        self._presence(vm, event)

    def _unbind(self, vm: VM, owner: Owner, event: str | None, reason: str | None = None) -> bool:
        owner.vms.discard(vm.vm_id)
        if not self.presence.release(vm.vm_id, owner.key):
            return False
        self._presence(vm, event, reason)
        return True

    def held_by(self, vm_id: str, owner: Owner) -> VM:
        """The VM, which ``owner`` must have connected.

        :raises CommandError: not_found, not_connected.
        """
        vm = self.get(vm_id)
        holder = self.presence.holder(vm_id)
        if holder != owner.key:
            why = "connect_vm it first" if holder is None else "another session holds it"
            raise CommandError(ErrorCode.NOT_CONNECTED, f"VM {vm_id!r} is not connected by this session; {why}")
        return vm

    def holds(self, vm: VM, owner: Owner) -> bool:
        return self.presence.holder(vm.vm_id) == owner.key

    def connected(self, vm: VM) -> bool:
        return self.presence.holder(vm.vm_id) is not None

    def authorize(self, vm_id: str, owner: Owner) -> VM | Awaitable[VM]:
        vm = self.held_by(vm_id, owner)
        if self.shared:
            if vm.authorized:
                return vm
            return self._presence_write(vm, owner, Authorize(vm.id, owner.key, True),
                                        PresenceChanged(vm_id, owner.key, True, "vm_authorized"))
        if not self.presence.authorized(vm_id):
            self.presence.authorize(vm_id, owner.key, True)
            self._record(_history_row("vm_authorized", vm_id, owner))
            self._presence(vm, "vm_authorized")
        return vm

    def authorized_by(self, vm_id: str, owner: Owner) -> VM:
        """:raises CommandError: not_found, not_authorized."""
        vm = self.get(vm_id)
        if self.presence.holder(vm_id) != owner.key or not self.presence.authorized(vm_id):
            raise CommandError(ErrorCode.NOT_AUTHORIZED, f"VM {vm_id!r} is not authorized by this session")
        return vm

    def deauthorize(self, vm_id: str, owner: Owner) -> VM | Awaitable[VM]:
        vm = self.authorized_by(vm_id, owner)
        if self.shared:
            return self._presence_write(vm, owner, Authorize(vm.id, owner.key, False),
                                        PresenceChanged(vm_id, owner.key, False, "vm_deauthorized"))
        self.presence.authorize(vm_id, owner.key, False)
        self._record(_history_row("vm_deauthorized", vm_id, owner))
        self._presence(vm, "vm_deauthorized")
        return vm

    async def update(self, vm_id: str, owner: Owner, ram: int | None, cpu: int | None,
                     disks: Sequence[DiskSpec] | None) -> VM:
        """Replace the given fields; ``disks`` replaces the whole disk set. All or nothing.

        Only the authorizing session may update, and a session runs one command at a time, so
        no other write to this VM can be pending meanwhile.
        """
        vm = self.authorized_by(vm_id, owner)
        new_ram = vm.ram if ram is None else ram
        new_cpu = vm.cpu if cpu is None else cpu
        remove: list[Disk] = []
        resize: list[tuple[Disk, int]] = []
        add: list[DiskSpec] = []
        if disks is not None:
            self._check_new_disks(disks, owner_vm=vm)
            wanted = {spec.disk_id: spec for spec in disks}
            for disk in vm.disks:
                spec = wanted.pop(disk.disk_id, None)
                if spec is None:
                    remove.append(disk)
                elif spec.size != disk.size:
                    resize.append((disk, spec.size))
            add = list(wanted.values())
        added_ids = [s.disk_id for s in add]
        self._reserved_disk_ids.update(added_ids)

        def unreserve() -> None:
            self._reserved_disk_ids.difference_update(added_ids)

        # Only this session changes the VM until the commit: what it keeps is known now.
        sizes = {d.id: size for d, size in resize}
        gone = {d.id for d in remove}
        kept = tuple(DiskRow(d.id, d.disk_id, sizes.get(d.id, d.size), vm.id) for d in vm.disks if d.id not in gone)

        def changes(new_pks: list[int]) -> list[Change]:
            return [VMUpdated(vm_id, new_ram, new_cpu, kept + tuple(DiskRow(pk, spec.disk_id, spec.size, vm.id)
                                                                    for pk, spec in zip(new_pks, add)))]

        def committed(new_pks: list[int]) -> VM:
            unreserve()
            return self.apply(changes(new_pks)[0])

        write = UpdateVM(vm.id, new_ram, new_cpu, tuple(d.id for d in remove), tuple((d.id, size) for d, size in resize),
                         tuple((s.disk_id, s.size) for s in add))
        return await self._submit(f"update {vm_id}", write, [_history_row("vm_updated", vm_id, owner)],
                                  changes=changes, on_commit=committed, on_fail=unreserve)

    async def remove(self, vm_id: str, actor: Owner | None = None) -> VM:
        """Unregister a VM and its disks; refused while a session holds it.

        Its name is claimed until the removal is committed, so it cannot be connected meanwhile.

        :raises CommandError: not_found, conflict; internal (StorageError): nothing was removed.
        """
        vm = self.get(vm_id)
        if self.presence.holder(vm_id) is not None:
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is connected; disconnect it first")
        if vm_id in self._reserved_vm_ids:
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is being removed by another session")
        self._reserved_vm_ids.add(vm_id)

        def committed(_: None) -> VM:
            self._reserved_vm_ids.discard(vm_id)
            return self.apply(VMRemoved(vm_id))

        return await self._submit(f"remove {vm_id}", RemoveVM(vm.id), [_history_row("vm_removed", vm_id, actor)],
                                  changes=lambda _: [VMRemoved(vm_id)], on_commit=committed,
                                  on_fail=lambda: self._reserved_vm_ids.discard(vm_id))

    def removing(self, vm_id: str) -> bool:
        """A known VM whose removal is waiting for its commit."""
        return vm_id in self._vms and vm_id in self._reserved_vm_ids

    def disconnect(self, vm_id: str, owner: Owner) -> VM | Awaitable[VM]:
        vm = self.held_by(vm_id, owner)
        if self.shared:
            return self._presence_write(vm, owner, Disconnect(vm.id, owner.key),
                                        PresenceChanged(vm_id, None, False, "vm_disconnected", None, "request"),
                                        done=lambda: owner.vms.discard(vm_id))
        self._record(_history_row("vm_disconnected", vm_id, owner, "request"))
        self._unbind(vm, owner, "vm_disconnected", "request")
        return vm

    def release(self, owner: Owner, reason: str = "session_closed") -> list[str]:
        """A session ended: every VM it connected becomes disconnected and deauthorized.

        ``reason``: session_closed, timeout or shutdown (the vm_disconnected event's reason).
        """
        owner.ended = True
        for vm_id, registrant in self._registering.items():
            if registrant is owner:  # its connect_vm of a new VM is still being committed
                self._orphaned[vm_id] = reason
        released = []
        for vm_id in list(owner.vms):
            vm = self._vms.get(vm_id)
            if vm is None or self.presence.holder(vm_id) != owner.key:
                continue
            if self.shared:
                self._let_go(vm_id, owner.key, owner.name, reason)
            else:
                self._record(_history_row("vm_disconnected", vm_id, owner, reason))
                self._unbind(vm, owner, "vm_disconnected", reason)
            released.append(vm_id)
        owner.vms.clear()
        self._holding.pop(owner.key, None)
        return released

    # --- lists (each built without yielding to the loop: one consistent snapshot) ------

    def all_vms_json(self) -> Encoded:
        return self._all_vms.json_array()

    def connected_vms_json(self) -> Encoded:
        return self._selection_json(True, None).json_array()

    def authorized_vms_json(self) -> Encoded:
        return self._selection_json(None, True).json_array()

    def all_disks_json(self) -> Encoded:
        return self._all_disks.json_array()

    def _selection(self, connected: bool | None, authorized: bool | None) -> View[VM, list[VM]]:
        view = self._selected.get((connected, authorized))
        if view is None:
            match = _matcher(connected, authorized)
            view = self._selected[(connected, authorized)] = self._vm_blocks.view(
                lambda vms: [vm for vm in vms if match(vm)])
        return view

    def _selection_json(self, connected: bool | None, authorized: bool | None) -> View[VM, bytes]:
        view = self._selected_json.get((connected, authorized))
        if view is None:
            match = _matcher(connected, authorized)
            view = self._selected_json[(connected, authorized)] = self._vm_blocks.view(
                lambda vms: b",".join([vm._json for vm in vms if match(vm)]))
        return view

    def vms_page(self, after: int = 0, limit: int | None = None, connected: bool | None = None,
                 authorized: bool | None = None, prefix: str = "") -> Encoded:
        """VMs with ids above ``after`` that match the filters, at most ``limit`` of them (all by
        default), in id order. Costs what it returns, not the size of the fleet: whole filtered
        lists come from per-block caches, pages stop at ``limit``, a prefix is a bisect per block."""
        if not prefix and not after and limit is None:
            return self._selection_json(connected, authorized).json_array()
        out: list[bytes] = []
        if prefix:
            match = _matcher(connected, authorized)
            by_name = self._by_name
            for block, records in self._vm_blocks.blocks_after(after):
                names, vms = by_name.of(block, records)
                i, end = bisect.bisect_left(names, prefix), len(names)
                hits = []
                while i < end and names[i].startswith(prefix):
                    vm = vms[i]
                    if vm.id > after and match(vm):
                        hits.append(vm)
                    i += 1
                if hits:
                    hits.sort(key=_vm_pk)
                    out += [vm._json for vm in hits]
                    if limit is not None and len(out) >= limit:
                        del out[limit:]
                        break
        else:
            selection = None if connected is None and authorized is None else self._selection(connected, authorized)
            for block, records in self._vm_blocks.blocks_after(after):
                if selection is not None:
                    records = selection.of(block, records)
                if records and records[0].id <= after:
                    records = [vm for vm in records if vm.id > after]
                if limit is not None and len(out) + len(records) >= limit:
                    out += [vm._json for vm in records[:limit - len(out)]]
                    break
                out += [vm._json for vm in records]
        return json_list(out)

    def disks_page(self, after: int = 0, limit: int | None = None) -> Encoded:
        """Up to ``limit`` disks (all by default) with ids above ``after``; the whole list from
        its per-block cache."""
        if not after and limit is None:
            return self._all_disks.json_array()
        return json_list([d.listing_json() for d in itertools.islice(self._disk_blocks.after(after), limit)])

    def stats_json(self, server: dict[str, Any] | None = None) -> bytes:
        """Counts and totals of the whole inventory, from one snapshot (summed block by block),
        and ``server``'s entries (the answering server's own sessions and connections)."""
        vms, connected, authorized, ram, cpu = (sum(column) for column in zip(*self._vm_totals.each(), (0,) * 5))
        disks, disk_size = (sum(column) for column in zip(*self._disk_totals.each(), (0, 0)))
        return dumps({"vms": vms, "connected": connected, "authorized": authorized, "disks": disks,
                      "ram": ram, "cpu": cpu, "disk_size": disk_size, "server_id": SERVER_ID,
                      "servers": self.store.servers, **(server or {})})

    async def history(self, vm_id: str | None, event: str | None, since: str | None, before: int | None,
                      limit: int) -> bytes:
        """History rows, newest first, as a JSON array.

        Never queued behind the writes (the store reads beside them). It waits first for the
        presence rows already journaled (they are not awaited when written), so a session reads
        its own changes, as it would with one connection.
        """
        tail = self._journal_tail
        if tail is not None and not tail.done():
            await asyncio.wait((tail,), timeout=JOURNAL_WAIT)
        rows = await self.store.read_history(vm_id, event, since, before, limit)
        out = []
        for id, ts, vm_id, event, peer, reason, count in rows:
            entry: dict[str, Any] = {"id": id, "ts": ts, "vm_id": vm_id, "event": event, "peer": peer}
            if reason is not None:  # as in the live event: why it disconnected, or which command failed
                entry["command" if event == "auth_failed" else "reason"] = reason
            if event == "auth_failed":
                entry["count"] = 1 if count is None else count
            out.append(entry)
        return dumps(out)

    async def prune_history(self, before: str, batch: int = PRUNE_BATCH) -> int:
        """Delete the history older than ``before`` in batches, each its own short write job, so
        writes queued meanwhile go between them; returns how many rows went."""
        total = 0
        while True:
            pruned = await self._submit("prune history", PruneHistory(before, batch))
            total += pruned
            if pruned < batch:
                return total
            await asyncio.sleep(0)  # let the sessions run before the next batch is queued

    def close(self, timeout: float = 10.0) -> None:
        """Record what is still pending, let the store finish what is queued, and close it.

        Pending: failed password checks being counted, and VMs still held by sessions that
        have not ended yet (cut off at shutdown): they are disconnected here with reason
        ``shutdown``, so that their rows are written before the store stops. If its writer is
        still busy after ``timeout`` (a write stuck on a lock), the database is left open
        rather than closed under it; calling close() again tries again.
        """
        if not self._closed:
            self._closed = True
            for vm_id in list(self._bursts):
                self._end_burst(vm_id)
            for owner in list(self._holding.values()):
                self.release(owner, "shutdown")
            self._flush_rows()
        if not self.store.close(timeout):
            log.error("database %s left open: the writer is still using it", self.store.label)
            return
        if self._store_closed:
            return
        self._store_closed = True
        s = self.store
        if s.writes:  # how well group commit batched: writes per transaction (per fsync)
            log.info("database writer: %d writes in %d transactions (%.1f per commit)", s.writes, s.batches,
                     s.writes / max(1, s.batches))
