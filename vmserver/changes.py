"""Changes: what the inventory's cache is told, one value per thing that happened.

Every change reaches the cache through ``Inventory.apply``, whether this process made it
(after its commit) or, in a cluster, it was read from the database; ``event`` is what the
event feed then hears (None: nothing to announce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


Change = Union[VMAdded, VMUpdated, VMRemoved, PresenceChanged]
