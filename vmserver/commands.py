"""The command registry: one small handler per operation, its arguments, and the dispatcher.

A handler gets validated arguments and returns the encoded ``result`` (bytes), or a
coroutine when it has slow work to do first (password hashing runs in a thread so the
event loop keeps serving everyone else). State changes happen in Inventory methods that
never await, so each command is atomic.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Union

from . import validation as v
from .errors import CommandError, ErrorCode
from .inventory import Inventory, Owner
from .passwords import hash_password, verify_password
from .protocol import Request, encode_error, encode_ok
from .store import StoreError
from .validation import InvalidArgs, Param, Schema

log = logging.getLogger(__name__)

Result = Union[bytes, Awaitable[bytes]]
Handler = Callable[[Inventory, Owner, dict[str, Any]], Result]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    summary: str
    schema: Schema
    handler: Handler


COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, *params: Param) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, summary, Schema(*params), handler)
        return handler

    return register


_VM_ID = Param("vm_id", v.ident, True, "the VM's name")
_PASSWORD = Param("password", v.password, False, "the VM's password")


def _spec(required: bool) -> tuple[Param, ...]:
    return (
        Param("ram", v.ram, required, "memory in MiB"),
        Param("cpu", v.cpu, required, "number of virtual CPUs"),
        Param("disks", v.disks, required, 'list of {"disk_id": str, "size": GiB}'),
    )


# --- inventory and presence --------------------------------------------------------------


@command("add_vm", "Register a VM with its disks (and optionally a password).", _VM_ID, *_spec(True), _PASSWORD)
def add_vm(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    inv.check_can_add(a["vm_id"], a["disks"])  # fail fast, before hashing
    if "password" not in a:
        return inv.add(a["vm_id"], a["ram"], a["cpu"], a["disks"], None).json()
    return _register_with_password(inv, a, None)


async def _register_with_password(inv: Inventory, a: dict[str, Any], owner: Owner | None) -> bytes:
    password_hash = await asyncio.to_thread(hash_password, a["password"])
    if owner is not None and inv.exists(a["vm_id"]):
        return inv.connect(a["vm_id"], owner).json()  # registered by someone else meanwhile
    return inv.add(a["vm_id"], a["ram"], a["cpu"], a["disks"], password_hash, owner).json()


@command(
    "connect_vm",
    "Connect a VM to this session; an unknown VM is registered first from ram, cpu, disks.",
    _VM_ID, *_spec(False), _PASSWORD,
)
def connect_vm(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    vm_id = a["vm_id"]
    if inv.exists(vm_id):
        return inv.connect(vm_id, session).json()
    for name in ("ram", "cpu", "disks"):
        if name not in a:
            raise InvalidArgs(
                name, f"{name}: missing (VM {vm_id!r} is not registered, so connect_vm needs ram, cpu "
                "and disks to register it)")
    inv.check_can_add(vm_id, a["disks"])
    if "password" not in a:
        return inv.add(vm_id, a["ram"], a["cpu"], a["disks"], None, session).json()
    return _register_with_password(inv, a, session)


@command("authorize_vm", "Authorize a VM this session connected (its password if it has one).", _VM_ID, _PASSWORD)
def authorize_vm(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    vm = inv.held_by(a["vm_id"], session)
    if vm.password_hash is None:
        return inv.authorize(vm.vm_id, session).json()
    if "password" not in a:
        raise CommandError(ErrorCode.AUTH_FAILED, f"VM {vm.vm_id!r} has a password: give password=...")
    return _authorize_with_password(inv, session, vm.vm_id, a["password"], vm.password_hash)


async def _authorize_with_password(inv: Inventory, session: Owner, vm_id: str, password: str, stored: str) -> bytes:
    if not await asyncio.to_thread(verify_password, password, stored):
        log.warning("authorize_vm %s: wrong password from %s", vm_id, getattr(session, "name", "?"))
        raise CommandError(ErrorCode.AUTH_FAILED, f"wrong password for VM {vm_id!r}")
    return inv.authorize(vm_id, session).json()  # re-checks the session still holds it


@command("deauthorize_vm", "Withdraw this session's authorization of a VM; it stays connected.", _VM_ID)
def deauthorize_vm(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    return inv.deauthorize(a["vm_id"], session).json()


@command("update_vm", "Change an authorized VM's ram, cpu and/or disks (disks replaces the set).", _VM_ID, *_spec(False))
def update_vm(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    if len(a) == 1:
        raise InvalidArgs("ram", "ram, cpu, disks: update_vm needs at least one of them")
    return inv.update(a["vm_id"], session, a.get("ram"), a.get("cpu"), a.get("disks")).json()


@command("disconnect_vm", "Disconnect a VM this session connected (also ends its authorization).", _VM_ID)
def disconnect_vm(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    return inv.disconnect(a["vm_id"], session).json()


# --- lists -------------------------------------------------------------------------------


@command("get_all_vms", "List every VM, ordered by id.")
def get_all_vms(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    return inv.all_vms_json()


@command("get_connected_vms", "List the VMs connected now, ordered by id.")
def get_connected_vms(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    return inv.connected_vms_json()


@command("get_authorized_vms", "List the VMs authorized now, ordered by id.")
def get_authorized_vms(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    return inv.authorized_vms_json()


@command("get_all_disks", "List every disk with the name of its VM, ordered by id.")
def get_all_disks(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    return inv.all_disks_json()


_OK = b'"OK"'


@command("health", 'Liveness check; the result is "OK".')
def health(inv: Inventory, session: Owner, a: dict[str, Any]) -> Result:
    return _OK


# --- dispatch ----------------------------------------------------------------------------


async def execute(inv: Inventory, session: Owner, request: Request) -> bytes:
    """Run one request and return its reply line. Never raises for anything the request did."""
    cmd = COMMANDS.get(request.cmd)
    if cmd is None:
        return encode_error(request.id, ErrorCode.UNKNOWN_COMMAND, _unknown(request.cmd))
    try:
        result = cmd.handler(inv, session, cmd.schema.validate(cmd.name, request.args))
        if type(result) is not bytes:
            result = await result
    except InvalidArgs as exc:
        message = exc.message
        hint = request.hints.get(exc.arg)
        if hint:
            message = f"{message} ({exc.arg}: {hint})"
        return encode_error(request.id, exc.code, message)
    except CommandError as exc:
        return encode_error(request.id, exc.code, exc.message)
    except StoreError as exc:
        log.error("%s failed: %s", cmd.name, exc)
        return encode_error(request.id, ErrorCode.INTERNAL, f"{cmd.name} failed: storage error (nothing was changed)")
    except Exception:
        log.exception("%s failed with an unexpected error", cmd.name)
        return encode_error(request.id, ErrorCode.INTERNAL, f"{cmd.name} failed: internal error (see server log)")
    return encode_ok(request.id, result)


def _unknown(name: str) -> str:
    shown = name if len(name) <= 64 else name[:61] + "..."
    message = f"unknown command {shown!r}"
    close = difflib.get_close_matches(name, COMMANDS, n=1) if len(name) <= 64 else []
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message + " (the greeting lists every command)"
