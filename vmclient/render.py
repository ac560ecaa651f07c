"""Human output of the console: VM, disk and history lists as aligned tables, a record as a short
block, live events as one aligned line each."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .client import EVENT_NAMES

_DISKS_WIDTH = 48  # a VM's disk column is cut here, with a count of what was left out


def _yes(value: Any) -> str:
    return "yes" if value is True else "no" if value is False else str(value)


def _disk(disk: Any, long: bool = False) -> str:
    if not isinstance(disk, dict):
        return str(disk)
    return f"{disk.get('disk_id')} ({disk.get('size')} GiB)" if long else f"{disk.get('disk_id')}:{disk.get('size')}G"


def _disks_cell(disks: Any) -> str:
    """``id:sizeG`` of each disk, as many as fit in _DISKS_WIDTH, then a count of the rest
    (whatever is not a list of disks is shown as it is: the console never fails on a reply)."""
    if not disks:
        return "-"
    if not isinstance(disks, list):
        return str(disks)
    parts = [_disk(d) for d in disks]
    for shown in range(len(parts), 0, -1):
        rest = len(parts) - shown
        cell = ",".join(parts[:shown]) + (f",+{rest} more" if rest else "")
        if len(cell) <= _DISKS_WIDTH:
            return cell
    return f"{len(parts)} disk{'s' if len(parts) != 1 else ''}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; ``right`` marks numeric columns (right-aligned)."""
    right = right or [False] * len(headers)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def vm_table(vms: Sequence[dict[str, Any]]) -> str:
    rows = [[str(v.get("vm_id")), str(v.get("ram")), str(v.get("cpu")), _disks_cell(v.get("disks") or []),
             _yes(v.get("connected")), _yes(v.get("authorized"))] for v in vms]
    body = table(["VM_ID", "RAM_MIB", "CPU", "DISKS", "CONNECTED", "AUTHORIZED"], rows,
                 [False, True, True, False, False, False])
    return f"{body}\n({len(vms)} VM{'s' if len(vms) != 1 else ''})"


def disk_table(disks: Sequence[dict[str, Any]]) -> str:
    rows = [[str(d.get("disk_id")), str(d.get("size")), str(d.get("vm"))] for d in disks]
    body = table(["DISK_ID", "SIZE_GIB", "VM"], rows, [False, True, False])
    return f"{body}\n({len(disks)} disk{'s' if len(disks) != 1 else ''})"


def vm_block(vm: dict[str, Any]) -> str:
    disks = vm.get("disks") or []
    listed = ", ".join(_disk(d, long=True) for d in disks) if isinstance(disks, list) else str(disks)
    fields = [
        ("vm_id", vm.get("vm_id")),
        ("id", vm.get("id")),
        ("ram", f"{vm.get('ram')} MiB"),
        ("cpu", vm.get("cpu")),
        ("disks", listed or "none"),
        ("connected", _yes(vm.get("connected"))),
        ("authorized", _yes(vm.get("authorized"))),
        ("last_connected", vm.get("last_connected") or "never"),
    ]
    width = max(len(name) for name, _ in fields) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in fields)


def _detail(event: str, data: dict[str, Any]) -> str:
    """The few words that say what an event or history entry was about, beyond its name and VM."""
    if "reason" in data:
        return f"reason={data['reason']}"
    if "command" in data:
        return f"command={data['command']}"
    if event in ("vm_added", "vm_updated") and "ram" in data:
        return f"ram={data.get('ram')} cpu={data.get('cpu')} disks={_disks_cell(data.get('disks') or [])}"
    if event == "overflow":
        return f"dropped={data.get('dropped')} (events were lost)"
    if event == "shutdown":
        return "the server is stopping"
    return ""


def _time_of_day(ts: Any) -> str:
    """``HH:MM:SS.mmm`` of an ISO-8601 time (UTC, as the server writes it); other text as is."""
    text = str(ts)
    if len(text) >= 23 and text[10] == "T" and text[13] == ":" and text[16] == ":" and text[19] == ".":
        return text[11:23]
    if len(text) >= 19 and text[10] == "T":
        return text[11:19] + ".000"
    return text


EVENT_WIDTH = 15  # the longest event name: vm_deauthorized
VM_ID_WIDTH = 16


def event_line(event: dict[str, Any], vm_width: int = VM_ID_WIDTH) -> str:
    """One live event as ``TIME  EVENT  VM_ID  DETAIL``, in columns of fixed width (a longer
    vm_id pushes the detail right: pass the widest seen so far as ``vm_width`` to keep columns)."""
    name = str(event.get("event"))
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    vm_id = data.get("vm_id")
    cells = [_time_of_day(event.get("ts")), f"{name:<{EVENT_WIDTH}}", f"{'-' if vm_id is None else vm_id!s:<{vm_width}}",
             _detail(name, data)]
    return "  ".join(cells).rstrip()


def history_table(entries: Sequence[dict[str, Any]]) -> str:
    """get_history's entries: ID, TIME, VM_ID, EVENT, PEER, DETAIL (newest first, as given)."""
    rows = [[str(e.get("id")), str(e.get("ts")), str(e.get("vm_id")), str(e.get("event")),
             str(e.get("peer") or "-"), _detail(str(e.get("event")), e)] for e in entries]
    body = table(["ID", "TIME", "VM_ID", "EVENT", "PEER", "DETAIL"], rows, [True, False, False, False, False, False])
    return f"{body}\n({len(entries)} event{'s' if len(entries) != 1 else ''})"


def _is_history(result: list[dict[str, Any]]) -> bool:
    return all("event" in e and "ts" in e and "vm_id" in e for e in result)


def human(cmd: str, result: Any) -> str:
    """The result of ``cmd`` as people read it; falls back to indented JSON for shapes it does not know."""
    if isinstance(result, str):
        return result
    if isinstance(result, list) and all(isinstance(r, dict) for r in result):  # records: a table
        if cmd == "get_history" or (result and _is_history(result)):
            return history_table(result) if result else "(no events)"
        if cmd == "get_all_disks" or (result and "disk_id" in result[0]):
            return disk_table(result) if result else "(no disks)"
        if all("vm_id" in v for v in result):
            return vm_table(result) if result else "(no VMs)"
    if isinstance(result, dict) and "vm_id" in result and "disks" in result:
        return vm_block(result)
    if cmd == "subscribe" and isinstance(result, dict) and isinstance(result.get("events"), list):
        names = result["events"]
        what = "all events" if set(names) >= set(EVENT_NAMES) else ", ".join(map(str, names))
        vm_id = result.get("vm_id")
        return f"subscribed to {what}{f' of {vm_id}' if vm_id is not None else ''} (unsubscribe to stop)"
    if cmd == "stats" and isinstance(result, dict) and result:
        width = max(len(k) for k in result) + 1
        units = {"ram": " MiB", "disk_size": " GiB"}
        return "\n".join(f"{k + ':':<{width}} {v}{units.get(k, '')}" for k, v in result.items())
    return json.dumps(result, indent=2, ensure_ascii=False)


def as_json(result: Any) -> str:
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False)
