"""The inventory's records, VMs and disks, each with its JSON kept encoded for the lists."""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"[A-Za-z0-9._:-]*")


def _quoted(text: str) -> str:
    """A JSON string. Names are validated to need no escaping; anything else (a file edited by
    hand) goes through json.dumps."""
    return f'"{text}"' if _PLAIN.fullmatch(text) else json.dumps(text)


class Disk:
    """A disk, with its two JSON forms kept encoded (re-encoded only when it changes)."""

    __slots__ = ("id", "disk_id", "size", "vm", "record_json", "_listing")

    def __init__(self, id: int, disk_id: str, size: int, vm: VM) -> None:
        self.id, self.disk_id, self.size, self.vm = id, disk_id, size, vm
        self.encode()

    def encode(self) -> None:
        self.record_json = f'{{"id":{self.id},"disk_id":{_quoted(self.disk_id)},"size":{self.size},"vm_id":{self.vm.id}'
        self._listing = f'{self.record_json},"vm":{self.vm.quoted_id}}}'.encode()
        self.record_json += "}"

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "disk_id": self.disk_id, "size": self.size, "vm_id": self.vm.id}

    def listing_json(self) -> bytes:
        """The get_all_disks form: the record plus the VM's name."""
        return self._listing


class VM:
    """A VM and its presence as last applied, with its record's JSON kept encoded (re-encoded when
    it changes).

    Encoding by formatting, not json.dumps: every field is an int, a bool, a validated name or
    a timestamp, so this is exact, and several times faster for a fleet of 100,000.
    """

    __slots__ = ("id", "vm_id", "quoted_id", "ram", "cpu", "disks", "password_hash", "last_connected",
                 "holder", "authorized", "_json")

    def __init__(self, id: int, vm_id: str, ram: int, cpu: int, password_hash: str | None,
                 last_connected: str | None) -> None:
        self.id, self.vm_id, self.ram, self.cpu = id, vm_id, ram, cpu
        self.quoted_id = _quoted(vm_id)
        self.password_hash = password_hash
        self.last_connected = last_connected
        self.disks: list[Disk] = []  # ordered by disk id
        self.holder: str | None = None  # the key of the session that connected it, while it lives
        self.authorized = False
        self._json = b""

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "vm_id": self.vm_id, "ram": self.ram, "cpu": self.cpu,
            "disks": [d.record() for d in self.disks],
            "connected": self.holder is not None, "authorized": self.authorized,
            "last_connected": self.last_connected,
        }

    def encode(self) -> None:
        last = "null" if self.last_connected is None else _quoted(self.last_connected)
        self._json = (
            f'{{"id":{self.id},"vm_id":{self.quoted_id},"ram":{self.ram},"cpu":{self.cpu},'
            f'"disks":[{",".join(d.record_json for d in self.disks)}],'
            f'"connected":{"false" if self.holder is None else "true"},'
            f'"authorized":{"true" if self.authorized else "false"},"last_connected":{last}}}'
        ).encode()

    def json(self) -> bytes:
        return self._json
