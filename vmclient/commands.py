"""What the console knows of protocol v1's commands: arguments and help text (see protocol.md).

The client cannot import the server, so this table restates protocol.md; a test checks that
it agrees with the server's registry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    required: bool
    doc: str


@dataclass(frozen=True)
class CommandInfo:
    name: str
    summary: str
    args: tuple[Arg, ...] = ()
    example: str = ""

    def usage(self) -> str:
        parts = [self.name]
        for arg in self.args:
            part = f"{arg.name}={arg.type.upper()}"
            parts.append(part if arg.required else f"[{part}]")
        return " ".join(parts)


_VM_ID = Arg("vm_id", "str", True, "the VM's name: 1-64 of A-Z a-z 0-9 . _ : -")
_DISKS_DOC = 'JSON list of {"disk_id": str, "size": GiB}, at most 64'


def _spec(required: bool, when: str = "") -> tuple[Arg, ...]:
    return (
        Arg("ram", "int", required, f"memory in MiB{when}"),
        Arg("cpu", "int", required, f"virtual CPUs{when}"),
        Arg("disks", "json", required, f"{_DISKS_DOC}{when}"),
    )


_PAGE = (Arg("after", "int", False, "only records with a larger id (last id of the previous page)"),
         Arg("limit", "int", False, "at most this many records (1-100000)"))

_ALL = [
    CommandInfo("add_vm", "Register a VM with its disks (and optionally a password).",
                (_VM_ID, *_spec(True), Arg("password", "str", False, "then authorize_vm requires it")),
                'add_vm vm_id=vm-1 ram=2048 cpu=2 disks=[{"disk_id":"disk-1","size":500}]'),
    CommandInfo("connect_vm", "Connect a VM to this session; an unknown VM is registered first.",
                (_VM_ID, *_spec(False, " (to register a new VM)"),
                 Arg("password", "str", False, "stored when registering a new VM")),
                "connect_vm vm_id=vm-1"),
    CommandInfo("authorize_vm", "Authorize a VM this session connected.",
                (_VM_ID, Arg("password", "str", False, "required when the VM has one")),
                "authorize_vm vm_id=vm-1 password=s3cret"),
    CommandInfo("deauthorize_vm", "Withdraw this session's authorization; the VM stays connected.",
                (_VM_ID,), "deauthorize_vm vm_id=vm-1"),
    CommandInfo("update_vm", "Change an authorized VM's ram, cpu and/or disks (disks replaces the set).",
                (_VM_ID, *_spec(False)), "update_vm vm_id=vm-1 ram=4096"),
    CommandInfo("disconnect_vm", "Disconnect a VM this session connected (ends its authorization too).",
                (_VM_ID,), "disconnect_vm vm_id=vm-1"),
    CommandInfo("get_all_vms", "List every VM (filters: connected, authorized, prefix).",
                (*_PAGE, Arg("connected", "bool", False, "true/false: only VMs that are / are not connected"),
                 Arg("authorized", "bool", False, "true/false: only VMs that are / are not authorized"),
                 Arg("prefix", "str", False, "only VMs whose vm_id starts with this")),
                "get_all_vms connected=true prefix=web-"),
    CommandInfo("get_connected_vms", "List the VMs connected now.", _PAGE, "get_connected_vms"),
    CommandInfo("get_authorized_vms", "List the VMs authorized now.", _PAGE, "get_authorized_vms"),
    CommandInfo("get_all_disks", "List every disk with its VM.", _PAGE, "get_all_disks"),
    CommandInfo("get_vm", "One VM's record.", (_VM_ID,), "get_vm vm_id=vm-1"),
    CommandInfo("stats", "Counts of VMs and disks; totals of ram, cpu and disk size.", (), "stats"),
    CommandInfo("remove_vm", "Unregister a VM and its disks; refused while it is connected.",
                (_VM_ID, Arg("password", "str", False, "required when the VM has one")),
                "remove_vm vm_id=vm-1"),
    CommandInfo("get_history", "What happened to VMs, newest first.",
                (Arg("vm_id", "str", False, "only this VM"),
                 Arg("event", "str", False, "only this event (vm_connected, vm_added, ...)"),
                 Arg("since", "str", False, "only at or after this ISO-8601 UTC time"),
                 Arg("before", "int", False, "only events with a smaller id (paging back)"),
                 Arg("limit", "int", False, "at most this many (1-10000, default 100)")),
                "get_history event=vm_connected limit=20"),
    CommandInfo("subscribe", "Receive live events on this session (see also: watch).",
                (Arg("events", "json", False, 'list of event names, e.g. ["vm_connected"] (default: all)'),
                 Arg("vm_id", "str", False, "only events of this VM")),
                'subscribe events=["vm_connected","vm_disconnected"]'),
    CommandInfo("unsubscribe", "Stop live events on this session.", (), "unsubscribe"),
    CommandInfo("health", 'Liveness check: "OK".', (), "health"),
    CommandInfo("auth", "Present the server's shared token (first, when the server has one).",
                (Arg("token", "str", True, "the shared token"),), "auth token=..."),
]

COMMANDS: dict[str, CommandInfo] = {info.name: info for info in _ALL}
