"""Argument validation: strict, side-effect free, every message names the argument at fault.

Runs before any command touches state, so a bad argument can never cause a partial write.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from .errors import CommandError, ErrorCode
from .protocol import json_type

# Bounds: generous for real machines, small enough to catch typos and to fit SQLite's int64.
IDENT_MAX = 64
RAM_MAX = 16 * 1024 * 1024  # MiB: 16 TiB
CPU_MAX = 4096
DISK_SIZE_MAX = 1024 * 1024  # GiB: 1 PiB
DISKS_MAX = 64
PASSWORD_MAX = 1024
PAGE_MAX = 100_000  # records per page

_IDENT = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDENT_CHARS = re.compile(r"[A-Za-z0-9._:-]{0,64}")


class InvalidArgs(CommandError):
    """invalid_args for one named argument (``arg`` is its name, e.g. ``disks``)."""

    def __init__(self, arg: str, message: str) -> None:
        super().__init__(ErrorCode.INVALID_ARGS, message)
        self.arg = arg


def _shown(value: Any) -> str:
    """A short rendering of a bad value: itself when small and scalar, else its JSON type."""
    if value is None or isinstance(value, (bool, int, float)):
        text = json.dumps(value)
        return text if len(text) <= 40 else f"an {json_type(value)} of {len(text)} digits"
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else f"a string of {len(value)} characters"
    return f"an {json_type(value)}" if json_type(value) in ("array", "object") else json_type(value)


def _bad(path: str, what: str, value: Any) -> InvalidArgs:
    shown = _shown(value)
    return InvalidArgs(path.split("[", 1)[0].split(".", 1)[0], f"{path}: must be {what}, got {shown}")


def ident(value: Any, path: str) -> str:
    if isinstance(value, str) and _IDENT.fullmatch(value):
        return value
    raise _bad(path, f"a string of 1 to {IDENT_MAX} characters from [A-Za-z0-9._:-]", value)


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d)(?:T(\d\d:\d\d)(?::(\d\d)(?:\.(\d{1,6}))?)?Z)?")


def timestamp(value: Any, path: str) -> str:
    """An ISO-8601 UTC time (2026-11-26T21:00:00Z; seconds, fraction, even the time optional),
    returned in the server's own form (2026-11-26T21:00:00.000Z) so it compares as text."""
    match = _TIMESTAMP.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _bad(path, "an ISO-8601 UTC time like 2026-11-26T21:00:00Z", value)
    day, hour_minute, second, fraction = match.groups()
    text = f"{day}T{hour_minute or '00:00'}:{second or '00'}"
    try:
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%S")  # a real date and time, not just the shape
    except ValueError:
        raise _bad(path, "an ISO-8601 UTC time like 2026-11-26T21:00:00Z", value) from None
    return f"{text}.{(fraction or '').ljust(3, '0')[:3]}Z"


def flag(value: Any, path: str) -> bool:
    if type(value) is bool:
        return value
    raise _bad(path, "true or false", value)


def prefix(value: Any, path: str) -> str:
    if isinstance(value, str) and _IDENT_CHARS.fullmatch(value):
        return value
    raise _bad(path, f"a string of 0 to {IDENT_MAX} characters from [A-Za-z0-9._:-]", value)


def _int_between(low: int, high: int) -> Callable[[Any, str], int]:
    def check(value: Any, path: str) -> int:
        # bool is an int in Python but not in JSON; 2048.0 is a float, not an integer.
        if type(value) is int and low <= value <= high:
            return value
        raise _bad(path, f"an integer from {low} to {high}", value)

    return check


page_limit = _int_between(1, PAGE_MAX)
history_limit = _int_between(1, 10_000)
page_after = _int_between(0, 2**63 - 1)
ram = _int_between(1, RAM_MAX)
cpu = _int_between(1, CPU_MAX)
disk_size = _int_between(1, DISK_SIZE_MAX)


def secret(value: Any, path: str) -> str:
    """A password or token: 1 to PASSWORD_MAX characters of real text. Never echoed back."""
    if isinstance(value, str) and 1 <= len(value) <= PASSWORD_MAX:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgs(path, f"{path}: must be valid Unicode text (no lone surrogates)") from None
        return value
    raise InvalidArgs(path, f"{path}: must be a string of 1 to {PASSWORD_MAX} characters, got {json_type(value)}")


password = token = secret


class DiskSpec(NamedTuple):
    disk_id: str
    size: int


_DISK_FIELDS = {"disk_id": ident, "size": disk_size}


def disks(value: Any, path: str) -> tuple[DiskSpec, ...]:
    if not isinstance(value, list):
        raise _bad(path, f"an array of at most {DISKS_MAX} disk objects", value)
    if len(value) > DISKS_MAX:
        raise InvalidArgs(path, f"{path}: at most {DISKS_MAX} disks, got {len(value)}")
    result = []
    for index, item in enumerate(value):
        # The common, well-formed disk takes the short way; anything else gets the full,
        # precise complaint from _disk.
        if type(item) is dict and len(item) == 2:
            disk_id, size = item.get("disk_id"), item.get("size")
            if (type(disk_id) is str and type(size) is int and 1 <= size <= DISK_SIZE_MAX
                    and _IDENT.fullmatch(disk_id)):
                result.append(DiskSpec(disk_id, size))
                continue
        result.append(_disk(item, f"{path}[{index}]", path))
    return tuple(result)


def _disk(item: Any, where: str, path: str) -> DiskSpec:
    if not isinstance(item, dict):
        raise _bad(where, 'an object {"disk_id": ..., "size": ...}', item)
    for key in item:
        if key not in _DISK_FIELDS:
            raise InvalidArgs(path, f"{where}: unknown field {key!r} (allowed: disk_id, size)")
    for key in _DISK_FIELDS:
        if key not in item:
            raise InvalidArgs(path, f"{where}.{key}: missing")
    return DiskSpec(ident(item["disk_id"], f"{where}.disk_id"), disk_size(item["size"], f"{where}.size"))


Checker = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    check: Checker
    required: bool
    doc: str


class Schema:
    """The arguments of one command: names, checks, which are required."""

    def __init__(self, *params: Param) -> None:
        self.params = params
        self._by_name = {p.name: p for p in params}

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def validate(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        """Checked and converted arguments (absent optionals are left out).

        :raises InvalidArgs: on an unknown, missing or ill-typed argument.
        """
        if not args:
            missing = [p.name for p in self.params if p.required]
            if missing:
                raise self._missing(cmd, missing[0])
            return {}
        for name in args:
            if name not in self._by_name:
                allowed = ", ".join(self.names()) or "none"
                raise InvalidArgs(name, f"unknown argument {name!r} for {cmd} (allowed: {allowed})")
        out = {}
        for param in self.params:
            if param.name in args:
                out[param.name] = param.check(args[param.name], param.name)
            elif param.required:
                raise self._missing(cmd, param.name)
        return out

    def _missing(self, cmd: str, name: str) -> InvalidArgs:
        return InvalidArgs(name, f"{name}: missing (required by {cmd})")
