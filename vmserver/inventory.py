"""The inventory: an in-memory mirror of the SQLite store, plus who is connected and authorized.

Every method runs on the event loop without awaiting, so each is atomic with respect to
every session. A mutation checks everything in memory, writes SQLite in one transaction,
and only then changes memory: a failed write leaves both untouched. Records keep their JSON
encoding until they change, so lists are assembled from cached bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from .errors import CommandError, ErrorCode
from .protocol import dumps, utc_now
from .store import Store
from .validation import DiskSpec

log = logging.getLogger(__name__)


class Owner(Protocol):
    """What the inventory and commands need of a session."""

    name: str
    vms: set[str]  # the VMs it has connected
    authenticated: bool  # presented the server's token (always True on a server without one)


class Disk:
    __slots__ = ("id", "disk_id", "size", "vm", "_json")

    def __init__(self, id: int, disk_id: str, size: int, vm: VM) -> None:
        self.id, self.disk_id, self.size, self.vm = id, disk_id, size, vm
        self._json: bytes | None = None

    def record(self) -> dict:
        return {"id": self.id, "disk_id": self.disk_id, "size": self.size, "vm_id": self.vm.id}

    def listing_json(self) -> bytes:
        """The get_all_disks form: the record plus the VM's name."""
        if self._json is None:
            self._json = dumps({**self.record(), "vm": self.vm.vm_id})
        return self._json


class VM:
    __slots__ = ("id", "vm_id", "ram", "cpu", "disks", "password_hash", "last_connected",
                 "owner", "authorized", "_json")

    def __init__(self, id: int, vm_id: str, ram: int, cpu: int, password_hash: str | None,
                 last_connected: str | None) -> None:
        self.id, self.vm_id, self.ram, self.cpu = id, vm_id, ram, cpu
        self.password_hash = password_hash
        self.last_connected = last_connected
        self.disks: list[Disk] = []  # ordered by disk id
        self.owner: Owner | None = None  # the session that connected it, while it lives
        self.authorized = False
        self._json: bytes | None = None

    def record(self) -> dict:
        return {
            "id": self.id, "vm_id": self.vm_id, "ram": self.ram, "cpu": self.cpu,
            "disks": [d.record() for d in self.disks],
            "connected": self.owner is not None, "authorized": self.authorized,
            "last_connected": self.last_connected,
        }

    def json(self) -> bytes:
        if self._json is None:
            self._json = dumps(self.record())
        return self._json

    def changed(self) -> None:
        self._json = None


def _json_list(items: Iterable[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


class Inventory:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._vms: dict[str, VM] = {}  # by vm_id, in id order (ids only grow)
        self._disks: dict[str, Disk] = {}  # by disk_id, in id order
        self._load()

    def _load(self) -> None:
        vm_rows, disk_rows = self.store.load()
        by_pk = {}
        for row in vm_rows:
            vm = VM(row.id, row.vm_id, row.ram, row.cpu, row.password_hash, row.last_connected)
            self._vms[vm.vm_id] = by_pk[vm.id] = vm
        for row in disk_rows:
            vm = by_pk[row.vm_pk]
            disk = Disk(row.id, row.disk_id, row.size, vm)
            vm.disks.append(disk)
            self._disks[disk.disk_id] = disk

    def __len__(self) -> int:
        return len(self._vms)

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
        """conflict when a disk id repeats in the list or belongs to another VM."""
        seen: set[str] = set()
        for spec in disks:
            if spec.disk_id in seen:
                raise CommandError(ErrorCode.CONFLICT, f"disk {spec.disk_id!r} appears twice in disks")
            seen.add(spec.disk_id)
            holder = self._disks.get(spec.disk_id)
            if holder is not None and holder.vm is not owner_vm:
                raise CommandError(
                    ErrorCode.CONFLICT, f"disk {spec.disk_id!r} already belongs to VM {holder.vm.vm_id!r}")

    # --- mutations --------------------------------------------------------------------

    def check_can_add(self, vm_id: str, disks: Sequence[DiskSpec]) -> None:
        """The checks of add(), without writing: lets callers fail fast before slow work."""
        if vm_id in self._vms:
            raise CommandError(ErrorCode.ALREADY_EXISTS, f"VM {vm_id!r} already exists")
        self._check_new_disks(disks)

    def add(self, vm_id: str, ram: int, cpu: int, disks: Sequence[DiskSpec],
            password_hash: str | None, owner: Owner | None = None) -> VM:
        """Register a VM; with ``owner``, it is connected by that session in the same step."""
        self.check_can_add(vm_id, disks)
        now = utc_now()
        last_connected = now if owner is not None else None
        vm_pk, disk_pks = self.store.insert_vm(
            vm_id, ram, cpu, password_hash, [(d.disk_id, d.size) for d in disks], now, last_connected)
        vm = VM(vm_pk, vm_id, ram, cpu, password_hash, last_connected)
        for pk, spec in zip(disk_pks, disks):
            disk = Disk(pk, spec.disk_id, spec.size, vm)
            vm.disks.append(disk)
            self._disks[disk.disk_id] = disk
        vm.disks.sort(key=lambda d: d.id)
        self._vms[vm_id] = vm
        if owner is not None:
            self._bind(vm, owner)
        return vm

    def connect(self, vm_id: str, owner: Owner) -> VM:
        """Bind a known VM to ``owner``; idempotent for the same owner.

        :raises CommandError: not_found, conflict (connected by another session).
        """
        vm = self.get(vm_id)
        if vm.owner is owner:
            return vm
        if vm.owner is not None:
            raise CommandError(ErrorCode.CONFLICT, f"VM {vm_id!r} is connected by another session")
        now = utc_now()
        self.store.set_last_connected(vm.id, now)
        vm.last_connected = now
        self._bind(vm, owner)
        return vm

    def _bind(self, vm: VM, owner: Owner) -> None:
        vm.owner = owner
        owner.vms.add(vm.vm_id)
        vm.changed()

    def held_by(self, vm_id: str, owner: Owner) -> VM:
        """The VM, which ``owner`` must have connected.

        :raises CommandError: not_found, not_connected.
        """
        vm = self.get(vm_id)
        if vm.owner is not owner:
            why = "connect_vm it first" if vm.owner is None else "another session holds it"
            raise CommandError(ErrorCode.NOT_CONNECTED, f"VM {vm_id!r} is not connected by this session; {why}")
        return vm

    def authorize(self, vm_id: str, owner: Owner) -> VM:
        vm = self.held_by(vm_id, owner)
        if not vm.authorized:
            vm.authorized = True
            vm.changed()
        return vm

    def authorized_by(self, vm_id: str, owner: Owner) -> VM:
        """:raises CommandError: not_found, not_authorized."""
        vm = self.get(vm_id)
        if vm.owner is not owner or not vm.authorized:
            raise CommandError(ErrorCode.NOT_AUTHORIZED, f"VM {vm_id!r} is not authorized by this session")
        return vm

    def deauthorize(self, vm_id: str, owner: Owner) -> VM:
        vm = self.authorized_by(vm_id, owner)
        vm.authorized = False
        vm.changed()
        return vm

    def update(self, vm_id: str, owner: Owner, ram: int | None, cpu: int | None,
               disks: Sequence[DiskSpec] | None) -> VM:
        """Replace the given fields; ``disks`` replaces the whole disk set. All or nothing."""
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
        new_pks = self.store.update_vm(
            vm.id, new_ram, new_cpu, [d.id for d in remove],
            [(d.id, size) for d, size in resize], [(s.disk_id, s.size) for s in add])
        # Committed: now mirror it.
        vm.ram, vm.cpu = new_ram, new_cpu
        for disk in remove:
            del self._disks[disk.disk_id]
        for disk, size in resize:
            disk.size = size
            disk._json = None
        if remove:
            gone = {id(d) for d in remove}
            vm.disks = [d for d in vm.disks if id(d) not in gone]
        for pk, spec in zip(new_pks, add):
            disk = Disk(pk, spec.disk_id, spec.size, vm)
            vm.disks.append(disk)
            self._disks[disk.disk_id] = disk
        vm.changed()
        return vm

    def disconnect(self, vm_id: str, owner: Owner) -> VM:
        vm = self.held_by(vm_id, owner)
        self._unbind(vm)
        return vm

    def _unbind(self, vm: VM) -> None:
        if vm.owner is not None:
            vm.owner.vms.discard(vm.vm_id)
        vm.owner = None
        vm.authorized = False
        vm.changed()

    def release(self, owner: Owner) -> list[str]:
        """A session ended: every VM it connected becomes disconnected and deauthorized."""
        released = []
        for vm_id in list(owner.vms):
            vm = self._vms.get(vm_id)
            if vm is not None and vm.owner is owner:
                self._unbind(vm)
                released.append(vm_id)
        owner.vms.clear()
        return released

    # --- lists (each built without yielding to the loop: one consistent snapshot) ------

    def all_vms_json(self) -> bytes:
        return _json_list(vm.json() for vm in self._vms.values())

    def connected_vms_json(self) -> bytes:
        return _json_list(vm.json() for vm in self._vms.values() if vm.owner is not None)

    def authorized_vms_json(self) -> bytes:
        return _json_list(vm.json() for vm in self._vms.values() if vm.authorized)

    def all_disks_json(self) -> bytes:
        return _json_list(d.listing_json() for d in self._disks.values())

    def close(self) -> None:
        self.store.close()
