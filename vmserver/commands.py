"""The command registry: one small handler per operation, its arguments, and the dispatcher.

A handler gets validated arguments and returns the encoded ``result`` (bytes), or a
coroutine when it has slow work to do first: password hashing (in a thread, so the event loop
keeps serving everyone else) or a durable write (committed by the writer thread before the
reply). The Inventory checks and claims what a command needs without awaiting, so two
commands can never both pass a check that only one of them may pass.
"""

from __future__ import annotations

import asyncio
import difflib
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Union

from . import validation as v
from .config import Config
from .errors import CommandError, ErrorCode, StorageError
from .inventory import Inventory, Owner
from .records import VM
from .passwords import AttemptLimiter, hash_password, verify_password
from .protocol import Request, dumps, encode_error, encode_ok
from .validation import InvalidArgs, Param, Schema

log = logging.getLogger(__name__)


class Context:
    """What handlers work with: the inventory and the server's security settings."""

    def __init__(self, inventory: Inventory, config: Config) -> None:
        self.inventory = inventory
        self.token = None if config.token is None else config.token.encode("utf-8")
        self.require_passwords = config.require_passwords
        self.attempts = AttemptLimiter(config.auth_failures_allowed)
        # Set by the server: its sessions by protocol and its connections, for stats.
        self.sessions: Callable[[], dict[str, Any]] | None = None
        # With several servers, failures made through the others count here too.
        inventory.on_auth_failed_elsewhere = lambda vm_id, n: self.attempts.elsewhere(vm_id, n, time.monotonic())


class SlowDown(CommandError):
    """auth_failed because password guessing for a VM is being slowed down: try again in
    ``retry_after`` seconds (HTTP answers it 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(ErrorCode.AUTH_FAILED, message)
        self.retry_after = retry_after


Result = Union[bytes, tuple[bytes, ...], Awaitable[bytes]]  # a tuple: JSON in pieces (listing.Encoded)
Handler = Callable[[Context, Owner, dict[str, Any]], Result]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    summary: str
    schema: Schema
    handler: Handler


COMMANDS: dict[str, Command] = {}
# Commands a session may send before it has authenticated (when the server has a token).
OPEN_COMMANDS = frozenset(("auth", "health"))


def command(name: str, summary: str, *params: Param) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, summary, Schema(*params), handler)
        return handler

    return register


_VM_ID = Param("vm_id", v.ident, True, "the VM's name")
_PASSWORD = Param("password", v.password, False, "the VM's password")
_OK = b'"OK"'


def _spec(required: bool) -> tuple[Param, ...]:
    return (
        Param("ram", v.ram, required, "memory in MiB"),
        Param("cpu", v.cpu, required, "number of virtual CPUs"),
        Param("disks", v.disks, required, 'list of {"disk_id": str, "size": GiB}'),
    )


def _need_password(ctx: Context, a: dict[str, Any]) -> None:
    if ctx.require_passwords and "password" not in a:
        raise InvalidArgs("password", "password: missing (this server requires every VM to have one)")


async def _check_password(ctx: Context, session: Owner, vm: VM, password: str | None, cmd: str) -> None:
    """The VM's password must be given and right; guessing is slowed down per VM, and a
    missing password counts as a wrong one.

    :raises CommandError: auth_failed.
    """
    assert vm.password_hash is not None
    wait = ctx.attempts.locked_for(vm.vm_id, time.monotonic())
    if wait > 0:
        raise SlowDown(f"too many failed password attempts for VM {vm.vm_id!r}; try again in {math.ceil(wait)}s",
                       math.ceil(wait))
    if password is None:
        ctx.attempts.missing(vm.vm_id, time.monotonic())
        await _recorded(ctx.inventory.auth_failed(vm, session, cmd))
        raise CommandError(ErrorCode.AUTH_FAILED, f"VM {vm.vm_id!r} has a password: give password=...")
    if not ctx.attempts.begin(vm.vm_id):
        raise SlowDown(f"too many password checks for VM {vm.vm_id!r} under way at once; try again in 1s", 1)
    ok = False
    try:
        ok = await asyncio.to_thread(verify_password, password, vm.password_hash)
    finally:
        failures = ctx.attempts.end(vm.vm_id, ok, time.monotonic())
    if ok:
        return
    log.warning("%s %s: wrong password from %s (%d in a row)", cmd, vm.vm_id, session.name, failures)
    await _recorded(ctx.inventory.auth_failed(vm, session, cmd))
    raise CommandError(ErrorCode.AUTH_FAILED, f"wrong password for VM {vm.vm_id!r}")


async def _recorded(pending: asyncio.Future[Any] | None) -> None:
    """Wait (a bounded time) for an auth_failed to be committed: its event comes first."""
    if pending is not None:
        await asyncio.wait((pending,), timeout=5.0)


# --- inventory and presence --------------------------------------------------------------


@command("add_vm", "Register a VM with its disks (and optionally a password).", _VM_ID, *_spec(True), _PASSWORD)
def add_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    _need_password(ctx, a)
    inv = ctx.inventory
    inv.check_can_add(a["vm_id"], a["disks"])  # fail fast, before hashing
    return _add(ctx, a, None, session)


async def _add(ctx: Context, a: dict[str, Any], owner: Owner | None, session: Owner) -> bytes:
    password_hash = None
    if "password" in a:
        password_hash = await asyncio.to_thread(hash_password, a["password"])
        if owner is not None and ctx.inventory.exists(a["vm_id"]):
            # Registered by someone else while we hashed: it is a known VM now.
            result = _connect_known(ctx, owner, ctx.inventory.get(a["vm_id"]), a["password"])
            return result if type(result) is bytes else await result  # type: ignore[misc]
    vm = await ctx.inventory.add(a["vm_id"], a["ram"], a["cpu"], a["disks"], password_hash, owner, actor=session)
    return vm.json()


@command(
    "connect_vm",
    "Connect a VM to this session (with its password if it has one); an unknown VM is registered first.",
    _VM_ID, *_spec(False), _PASSWORD,
)
def connect_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    _need_password(ctx, a)
    inv, vm_id = ctx.inventory, a["vm_id"]
    if inv.exists(vm_id):
        return _connect_known(ctx, session, inv.get(vm_id), a.get("password"))
    for name in ("ram", "cpu", "disks"):
        if name not in a:
            raise InvalidArgs(
                name, f"{name}: missing (VM {vm_id!r} is not registered, so connect_vm needs ram, cpu "
                "and disks to register it)")
    inv.check_can_add(vm_id, a["disks"], connecting=True)
    return _add(ctx, a, session, session)


def _connect_known(ctx: Context, session: Owner, vm: VM, password: str | None) -> Result:
    if ctx.inventory.holds(vm, session):
        return vm.json()  # idempotent: this session already proved itself
    if ctx.inventory.connected(vm):
        raise CommandError(ErrorCode.CONFLICT, f"VM {vm.vm_id!r} is connected by another session")
    if vm.password_hash is None:
        if ctx.require_passwords:
            raise CommandError(ErrorCode.AUTH_FAILED,
                               f"VM {vm.vm_id!r} has no password, but this server requires one for every VM")
    return _connect(ctx, session, vm, password)


async def _connect(ctx: Context, session: Owner, vm: VM, password: str | None) -> bytes:
    if vm.password_hash is not None:
        # Without this check anyone could squat on a VM's identity by connecting it first.
        await _check_password(ctx, session, vm, password, "connect_vm")
    return (await ctx.inventory.connect(vm.vm_id, session)).json()  # re-checks who holds it now


@command("authorize_vm", "Authorize a VM this session connected (its password if it has one).", _VM_ID, _PASSWORD)
def authorize_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    vm = ctx.inventory.held_by(a["vm_id"], session)
    if vm.password_hash is None:
        return _reply(ctx.inventory.authorize(vm.vm_id, session))
    return _authorize_with_password(ctx, session, vm, a.get("password"))


async def _authorize_with_password(ctx: Context, session: Owner, vm: VM, password: str | None) -> bytes:
    await _check_password(ctx, session, vm, password, "authorize_vm")
    done = ctx.inventory.authorize(vm.vm_id, session)  # re-checks the session still holds it
    return (done if isinstance(done, VM) else await done).json()


def _reply(done: VM | Awaitable[VM]) -> Result:
    """The record, now, or once the change is committed (shared presence: several servers)."""
    if isinstance(done, VM):
        return done.json()
    return _json_when(done)


async def _json_when(done: Awaitable[VM]) -> bytes:
    return (await done).json()


@command("deauthorize_vm", "Withdraw this session's authorization of a VM; it stays connected.", _VM_ID)
def deauthorize_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return _reply(ctx.inventory.deauthorize(a["vm_id"], session))


@command("update_vm", "Change an authorized VM's ram, cpu and/or disks (disks replaces the set).", _VM_ID, *_spec(False))
def update_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    if len(a) == 1:
        raise InvalidArgs("ram", "ram, cpu, disks: update_vm needs at least one of them")
    return _update(ctx, session, a)


async def _update(ctx: Context, session: Owner, a: dict[str, Any]) -> bytes:
    return (await ctx.inventory.update(a["vm_id"], session, a.get("ram"), a.get("cpu"), a.get("disks"))).json()


@command("disconnect_vm", "Disconnect a VM this session connected (also ends its authorization).", _VM_ID)
def disconnect_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return _reply(ctx.inventory.disconnect(a["vm_id"], session))


# --- lists -------------------------------------------------------------------------------


_PAGE = (
    Param("after", v.page_after, False, "only records with a larger id (the last id of the previous page)"),
    Param("limit", v.page_limit, False, "at most this many records"),
)


def _page(a: dict[str, Any]) -> tuple[int, int | None]:
    """(after, limit) of a list request: by default from the start, every record."""
    return a.get("after", 0), a.get("limit")


_FILTERS = (
    Param("connected", v.flag, False, "only VMs that are (true) or are not (false) connected"),
    Param("authorized", v.flag, False, "only VMs that are (true) or are not (false) authorized"),
    Param("prefix", v.prefix, False, "only VMs whose vm_id starts with this"),
)


@command("get_all_vms", "List every VM, ordered by id (optionally filtered, or a page: after, limit).",
         *_PAGE, *_FILTERS)
def get_all_vms(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return ctx.inventory.vms_page(*_page(a), a.get("connected"), a.get("authorized"), a.get("prefix", ""))


@command("get_connected_vms", "List the VMs connected now, ordered by id (optionally a page).", *_PAGE)
def get_connected_vms(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return ctx.inventory.vms_page(*_page(a), connected=True)


@command("get_authorized_vms", "List the VMs authorized now, ordered by id (optionally a page).", *_PAGE)
def get_authorized_vms(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return ctx.inventory.vms_page(*_page(a), authorized=True)


@command("get_all_disks", "List every disk with the name of its VM, ordered by id (optionally a page).", *_PAGE)
def get_all_disks(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return ctx.inventory.disks_page(*_page(a))


@command("get_vm", "One VM's record.", _VM_ID)
def get_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return ctx.inventory.get(a["vm_id"]).json()


@command("stats", "Counts of VMs (all, connected, authorized) and disks; totals of ram, cpu, disk size.")
def stats(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return ctx.inventory.stats_json(ctx.sessions() if ctx.sessions is not None else None)


@command("remove_vm", "Unregister a VM and its disks (its password if it has one); refused while connected.",
         _VM_ID, _PASSWORD)
def remove_vm(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    vm = ctx.inventory.get(a["vm_id"])
    if ctx.inventory.connected(vm):  # checked here too, so a connected VM costs no password check
        raise CommandError(ErrorCode.CONFLICT, f"VM {vm.vm_id!r} is connected; disconnect it first")
    return _remove(ctx, session, vm, a.get("password"))


async def _remove(ctx: Context, session: Owner, vm: VM, password: str | None) -> bytes:
    if vm.password_hash is not None:
        await _check_password(ctx, session, vm, password, "remove_vm")
    ctx.inventory.record_auth_failures(vm.vm_id)  # in the history before the removal, not after
    removed = await ctx.inventory.remove(vm.vm_id, actor=session)
    ctx.attempts.forget(vm.vm_id)
    return removed.json()


_EVENT_NAMES = ("vm_added", "vm_updated", "vm_removed", "vm_connected", "vm_disconnected", "vm_authorized",
                "vm_deauthorized", "auth_failed")


def _event_name(value: Any, path: str) -> str:
    if value in _EVENT_NAMES:
        return value
    raise InvalidArgs(path.split("[", 1)[0], f"{path}: must be one of {', '.join(_EVENT_NAMES)}, got {value!r}")


def _event_names(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidArgs(path, f"{path}: must be a non-empty array of event names ({', '.join(_EVENT_NAMES)})")
    return tuple(dict.fromkeys(_event_name(item, f"{path}[{i}]") for i, item in enumerate(value)))


@command("get_history", "What happened to VMs, newest first: vm_id, event, since (ISO time), before (id), limit.",
         Param("vm_id", v.ident, False, "only this VM"),
         Param("event", _event_name, False, "only this kind of event"),
         Param("since", v.timestamp, False, "only events at or after this ISO-8601 UTC time"),
         Param("before", v.page_after, False, "only events with a smaller id (paging back)"),
         Param("limit", v.history_limit, False, "at most this many (default 100)"))
def get_history(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return ctx.inventory.history(a.get("vm_id"), a.get("event"), a.get("since"), a.get("before"),
                                 a.get("limit", 100))


@command("subscribe", "Receive live events on this session (all, or only the given names and/or one VM).",
         Param("events", _event_names, False, "the event names wanted (default: all)"),
         Param("vm_id", v.ident, False, "only events of this VM"))
def subscribe(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    names = a.get("events", _EVENT_NAMES)
    session.subscribe(frozenset(names), a.get("vm_id"))
    return dumps({"events": list(names), "vm_id": a.get("vm_id")})


@command("unsubscribe", "Stop live events on this session (events not yet sent are dropped).")
def unsubscribe(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    session.unsubscribe()
    return _OK


@command("health", 'Liveness check; the result is "OK".')
def health(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    return _OK


# --- the session ---------------------------------------------------------------------------


@command("auth", "Present the server's shared token; required first when the server has one.",
         Param("token", v.token, True, "the shared token"))
def auth(ctx: Context, session: Owner, a: dict[str, Any]) -> Result:
    if ctx.token is None or hmac.compare_digest(a["token"].encode("utf-8"), ctx.token):
        session.authenticated = True
        return _OK
    return _refuse_token(session)


async def _refuse_token(session: Owner) -> bytes:
    log.warning("auth: wrong token from %s", session.name)
    await asyncio.sleep(0.5)  # one guess per half second per connection, and connections are capped
    raise CommandError(ErrorCode.AUTH_FAILED, "wrong token")


# --- dispatch ----------------------------------------------------------------------------


def run(ctx: Context, session: Owner, name: str, args: dict[str, Any]) -> Result:
    """Run command ``name``: its result JSON (bytes, or in pieces), or for a command with slow
    work an awaitable of it. The one entry for every front end (the line protocol, HTTP).

    :raises CommandError: unknown_command, unauthenticated, invalid_args, and whatever the
        command refuses; any other exception is a failure (see failure()). The awaitable
        raises the same.
    """
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise CommandError(ErrorCode.UNKNOWN_COMMAND, _unknown(name))
    if not session.authenticated and cmd.name not in OPEN_COMMANDS:
        raise CommandError(ErrorCode.UNAUTHENTICATED, "this server requires a token: send auth token=... first")
    return cmd.handler(ctx, session, cmd.schema.validate(cmd.name, args))


def failure(name: str, exc: Exception) -> CommandError:
    """What the client hears of ``exc`` raised by command ``name`` (logged when it is our fault)."""
    if isinstance(exc, StorageError):  # the message names the database: for the log, not the client
        log.error("%s failed: %s", name, exc)
        return CommandError(ErrorCode.INTERNAL, f"{name} failed: storage error (nothing was changed)")
    if isinstance(exc, CommandError):
        return exc
    log.error("%s failed with an unexpected error", name, exc_info=exc)
    return CommandError(ErrorCode.INTERNAL, f"{name} failed: internal error (see server log)")


Reply = Union[bytes, tuple[bytes, ...]]


def execute(ctx: Context, session: Owner, request: Request) -> Reply | Awaitable[Reply]:
    """Run one request: its reply line (in pieces when large: see encode_ok), or, for a command
    with slow work, an awaitable of it. Never raises for anything the request did.

    Not a coroutine itself, so the common, quick commands cost no coroutine at all.
    """
    try:
        result = run(ctx, session, request.cmd, request.args)
    except Exception as exc:
        return _error_reply(request, exc)
    if type(result) is bytes or type(result) is tuple:  # done at once (tuple: a large list, in pieces)
        return encode_ok(request.id, result)  # type: ignore[arg-type]
    return _finish(request, result)  # type: ignore[arg-type]


async def _finish(request: Request, pending: Awaitable[bytes]) -> Reply:
    try:
        return encode_ok(request.id, await pending)
    except Exception as exc:
        return _error_reply(request, exc)


def _error_reply(request: Request, exc: Exception) -> bytes:
    if isinstance(exc, InvalidArgs):
        message = exc.message
        hint = request.hints.get(exc.arg) if request.hints else None
        if hint:
            message = f"{message} ({exc.arg}: {hint})"
        return encode_error(request.id, exc.code, message)
    error = failure(request.cmd, exc)
    return encode_error(request.id, error.code, error.message)


def _unknown(name: str) -> str:
    shown = name if len(name) <= 64 else name[:61] + "..."
    message = f"unknown command {shown!r}"
    close = difflib.get_close_matches(name, COMMANDS, n=1) if len(name) <= 64 else []
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message + " (the greeting lists every command)"
