"""Changes: what the inventory's cache is told, one value per thing that happened.

Every change reaches the cache through ``Inventory.apply``, whether this process made it
(after its commit) or, in a cluster, it was read from the database; ``event`` is what the
event feed then hears (None: nothing to announce).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from .backends.base import DiskRow, VMRow


@dataclass(frozen=True, slots=True)
class VMAdded:
    vm: VMRow
    disks: tuple[DiskRow, ...]
    event: str | None = "vm_added"


@dataclass(frozen=True, slots=True)
class VMUpdated:
    """The VM's new spec; ``disks`` is its whole new disk set."""

    vm_id: str
    ram: int
    cpu: int
    disks: tuple[DiskRow, ...]
    event: str | None = "vm_updated"


@dataclass(frozen=True, slots=True)
class VMRemoved:
    vm_id: str
    event: str | None = "vm_removed"


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """Who holds the VM now (a session key, or None) and whether it is authorized;
    ``last_connected``: its new value (None: unchanged); ``reason``: why it was disconnected."""

    vm_id: str
    holder: str | None
    authorized: bool
    event: str | None
    last_connected: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """``count`` wrong or missing passwords for the VM through ``command`` (an event, and the
    password slowdown's count on every server)."""

    vm_id: str
    command: str | None
    count: int
    event: str | None = "auth_failed"


Change = Union[VMAdded, VMUpdated, VMRemoved, PresenceChanged, AuthFailed]


# --- changes as feed rows (PostgreSQL's history, which other servers read) -------------------
# A feed row is a history row (vm_id, event, reason, count say most) plus a payload for the
# rest: what a server that did not make the change needs to apply it exactly as its maker did.


def encode(change: Change) -> str:
    if isinstance(change, PresenceChanged):
        body: dict[str, Any] = {"k": "p", "h": change.holder, "a": change.authorized, "lc": change.last_connected}
    elif isinstance(change, VMAdded):
        vm = change.vm
        body = {"k": "a", "id": vm.id, "ram": vm.ram, "cpu": vm.cpu, "pw": vm.password_hash, "lc": vm.last_connected,
                "d": [[d.id, d.disk_id, d.size] for d in change.disks]}
    elif isinstance(change, VMUpdated):
        body = {"k": "u", "ram": change.ram, "cpu": change.cpu,
                "d": [[d.id, d.disk_id, d.size, d.vm_pk] for d in change.disks]}
    elif isinstance(change, VMRemoved):
        body = {"k": "r"}
    else:
        body = {"k": "f"}
    return json.dumps(body, separators=(",", ":"))


def decode(vm_id: str, event: str, reason: str | None, count: int | None, payload: str) -> Change:
    """The change a feed row stands for. :raises ValueError: not a payload encode() made."""
    body = json.loads(payload)
    kind = body["k"]
    if kind == "p":
        return PresenceChanged(vm_id, body["h"], body["a"], event, body["lc"], reason)
    if kind == "a":
        pk = body["id"]
        return VMAdded(VMRow(pk, vm_id, body["ram"], body["cpu"], body["pw"], body["lc"]),
                       tuple(DiskRow(i, d, size, pk) for i, d, size in body["d"]), event)
    if kind == "u":
        return VMUpdated(vm_id, body["ram"], body["cpu"], tuple(DiskRow(*d) for d in body["d"]),
                         event)
    if kind == "r":
        return VMRemoved(vm_id, event)
    if kind == "f":
        return AuthFailed(vm_id, reason, 1 if count is None else count, event)
    raise ValueError(f"unknown change kind {kind!r}")
