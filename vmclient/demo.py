"""The fleet demo: N simulated VM agents drive a server at once while an observer checks the lists.

Why it exists: it shows in a few seconds, against a real server, that presence is per session
(each agent holds only its own VM), that forbidden moves are refused with the documented error
codes, and that the list commands agree with what the agents did, phase by phase::

    python -m vmclient demo --spawn-server        # a throwaway server, what `make demo` runs
    python -m vmclient demo --port 8888 --vms 50  # against a live server; ids never collide
    python -m vmclient demo --servers a:8888,b:8888  # several servers on one database, as one

With ``--servers`` the agents are spread over the servers (agent i on server i mod n), each
server has its own observer, and every observer must see what the agents did: every server
shows the same lists. A change reaches the other servers within about a second, so each
observer looks again until its lists are right or ``--settle`` seconds have passed; only its
last look counts. The forbidden moves are then tried across servers: the holder of a VM on
one server, the intruder on another.

Every VM and disk id of a run starts with a random ``demo-<hex>`` prefix, and the observer only
looks at ids of that run, so the demo can be rerun against a server that holds anything else.
This module, like the rest of vmclient, does not import vmserver: ``--spawn-server`` runs it as
a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .arguments import seconds
from .client import DEFAULT_PORT, Client, DiskSpec, format_address, parse_address
from .errors import AlreadyExists, AuthFailed, ClientError, CommandError, Conflict, ConnectError, NotAuthorized

MAX_VMS = 1000
PHASES = ("add", "connect", "refusals", "authorize", "update", "deauthorize", "close")
CLOSE_WAIT = 5.0  # seconds the server gets to notice that the agents' sessions ended
SPAWN_WAIT = 15.0  # seconds a spawned server gets to report that it listens
STOP_WAIT = 10.0  # seconds a spawned server gets to stop on SIGTERM before it is killed
CONNECT_AT_ONCE = 50  # agent connections opened concurrently: polite to any server's listen backlog
MAX_SHOWN = 20  # failed checks printed per phase; the rest are counted, so a broken server stays readable
SETTLE = 5.0  # seconds each observer of several servers may look again before its checks count as failed
RECHECK_PAUSE = 0.1  # seconds between two looks at a server's lists

_ID_CHARS = re.compile(r"[A-Za-z0-9._:-]+")
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def _call_timeout(vms: int) -> float:
    """Seconds per call: a big fleet queues thousands of scrypt hashes on the server, so allow for it."""
    return 30.0 + 0.1 * vms


# --- the plan: what each agent registers ---------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """One agent's VM. Sizes differ per VM so that a record mixed up between VMs shows."""

    index: int
    vm_id: str
    ram: int
    cpu: int
    disks: tuple[tuple[str, int], ...]
    password: str

    def disk_specs(self, factor: int = 1) -> list[DiskSpec]:
        return [{"disk_id": disk_id, "size": size * factor} for disk_id, size in self.disks]


def _plans(prefix: str, vms: int) -> list[_Plan]:
    return [
        _Plan(index=i, vm_id=f"{prefix}-{i}", ram=256 * (i + 1), cpu=1 + i % 2,
              disks=((f"{prefix}-{i}-d0", 10 + i), (f"{prefix}-{i}-d1", 100 + i)),
              password=secrets.token_hex(8))
        for i in range(vms)
    ]


# --- checks and the report ------------------------------------------------------------------


@dataclass
class Check:
    """One expectation of the run; a failed one says what was expected and what was seen."""

    phase: str
    name: str
    ok: bool
    expected: str = ""
    seen: str = ""
    refusal: bool = False  # a forbidden move that must be refused


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _ids_text(ids: Iterable[str], limit: int = 8) -> str:
    """A readable list of ids in natural order (demo-x-2 before demo-x-10)."""
    ordered = sorted(ids, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])
    if not ordered:
        return "none"
    shown = ", ".join(ordered[:limit])
    return shown if len(ordered) <= limit else f"{shown} (+{len(ordered) - limit} more)"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CommandError):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _disk_pairs(disks: Any) -> Any:
    """A record's disks as sorted (disk_id, size) pairs, or the raw value when it is not a list of disks."""
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
        return disks
    return sorted(((d.get("disk_id"), d.get("size")) for d in disks), key=repr)


def _vm_mismatch(vm: Any, plan: _Plan, factor: int, connected: bool, authorized: bool) -> tuple[str, str] | None:
    """(expected, seen) for the fields of a VM record that differ from the plan, or None when it matches."""
    if not isinstance(vm, dict):
        return "a VM record", _short(vm)
    want = {"vm_id": plan.vm_id, "ram": plan.ram * factor, "cpu": plan.cpu * factor,
            "disks": sorted(((d["disk_id"], d["size"]) for d in plan.disk_specs(factor)), key=repr),
            "connected": connected, "authorized": authorized}
    got = {"vm_id": vm.get("vm_id"), "ram": vm.get("ram"), "cpu": vm.get("cpu"),
           "disks": _disk_pairs(vm.get("disks")), "connected": vm.get("connected"),
           "authorized": vm.get("authorized")}
    differing = [k for k in want if want[k] != got[k]]
    if not differing:
        return None
    return (", ".join(f"{k}={want[k]!r}" for k in differing), ", ".join(f"{k}={_short(got[k])}" for k in differing))


class _Run:
    """State shared by the agents and the observers of one run: plans, clients, barrier, checks."""

    def __init__(self, prefix: str, plans: list[_Plan], servers: list[tuple[str, int]], observers: list[Client],
                 agents: list[Client], out: TextIO, settle: float) -> None:
        self.prefix, self.plans, self.agents, self.out, self.settle = prefix, plans, agents, out, settle
        self.wheres = [format_address(*address) for address in servers]
        several = len(servers) > 1
        self.observers = [_Observer(self, client, where, f"on {where}: " if several else "")
                          for client, where in zip(observers, self.wheres)]
        self.ids = {p.vm_id for p in plans}
        self.by_id = {p.vm_id: p for p in plans}
        self.disk_owner = {disk_id: (p, size) for p in plans for disk_id, size in p.disks}
        # N agents + the observers' task: the agents finish a phase, the observers check, then all go on.
        self.barrier = asyncio.Barrier(len(plans) + 1)
        self.checks: list[Check] = []
        self._vm_re = re.compile(rf"{re.escape(prefix)}-\d+")
        self._disk_re = re.compile(rf"{re.escape(prefix)}-\d+-d\d+")

    def server_of(self, i: int) -> int:
        """The server agent ``i`` talks to (an index into ``wheres`` and ``observers``)."""
        return i % len(self.wheres)

    def agent_name(self, i: int) -> str:
        return f"agent {i}" if len(self.wheres) == 1 else f"agent {i} on {self.wheres[self.server_of(i)]}"

    def stranger(self, i: int) -> tuple[Client, str, int]:
        """Who tries agent ``i``'s forbidden moves on the neighbour's VM: (session, name, server).

        Agent i itself; with a single VM there is no neighbour, so an observer plays the stranger
        against agent 0's own VM: with several servers the one on another server.
        """
        if len(self.plans) > 1:
            return self.agents[i], self.agent_name(i), self.server_of(i)
        k = 1 % len(self.observers)
        return self.observers[k].client, "observer" if k == 0 else f"observer on {self.wheres[k]}", k

    def across(self) -> int:
        """How many agents' strangers are on another server than the VM's holder."""
        n = len(self.plans)
        return sum(self.stranger(i)[2] != self.server_of((i + 1) % n) for i in range(n))

    # recording -------------------------------------------------------------------------

    def record(self, phase: str, name: str, ok: bool, expected: str = "", seen: str = "",
               refusal: bool = False) -> bool:
        self.checks.append(Check(phase, name, ok, expected, seen, refusal))
        return ok

    async def expect_ok(self, phase: str, name: str, call: Awaitable[Any],
                        verify: Callable[[Any], tuple[str, str] | None] | None = None) -> Any:
        """Await an agent's call that must succeed (and whose result must pass ``verify``)."""
        try:
            result = await call
        except ClientError as exc:
            self.record(phase, name, False, "success", _error_text(exc))
            return None
        mismatch = verify(result) if verify else None
        if mismatch:
            self.record(phase, name, False, *mismatch)
        else:
            self.record(phase, name, True)
        return result

    async def expect_refusal(self, phase: str, name: str, call: Awaitable[Any], error: type[CommandError]) -> None:
        """Await a forbidden call: only ``error`` (by class, i.e. by code) counts as refused correctly."""
        expected = f"{error.__name__} ({error.code})"
        try:
            result = await call
        except error:
            self.record(phase, name, True, refusal=True)
        except ClientError as exc:
            self.record(phase, name, False, expected, _error_text(exc), refusal=True)
        else:
            self.record(phase, name, False, expected, f"success: {_short(result)}", refusal=True)

    def of_this_run(self, records: list[dict[str, Any]], command: str) -> dict[str, Any]:
        """The records of this run among ``records`` of a list ``command``, keyed by vm_id or disk_id."""
        key, pattern = ("disk_id", self._disk_re) if command == "get_all_disks" else ("vm_id", self._vm_re)
        return {r[key]: r for r in records if isinstance(r.get(key), str) and pattern.fullmatch(r[key])}

    # reporting -------------------------------------------------------------------------

    def print_phase(self, phase: str, summary: str) -> None:
        checks = [c for c in self.checks if c.phase == phase]
        failed = [c for c in checks if not c.ok]
        status = "FAIL" if failed else "ok"
        print(f"{status:<4}  {phase:<11}  {summary}  [{len(checks) - len(failed)}/{len(checks)} checks]",
              file=self.out)
        for c in failed[:MAX_SHOWN]:
            print(f"        - {c.name}: expected {c.expected}; saw {c.seen}", file=self.out)
        if len(failed) > MAX_SHOWN:
            print(f"        ... and {len(failed) - MAX_SHOWN} more failed checks in this phase", file=self.out)
        self.out.flush()

    def count(self, phase: str, refusal: bool | None = None) -> tuple[int, int]:
        """(passed, total) checks of a phase, optionally only the refusals or only the others."""
        checks = [c for c in self.checks if c.phase == phase and (refusal is None or c.refusal == refusal)]
        return sum(c.ok for c in checks), len(checks)


class _Observer:
    """One server's observer: its session, and the checks of its latest look at the lists.

    The checks stay here until the look is final (run.checks gets them then): a look taken
    before a change reached this server must not count.
    """

    def __init__(self, run: _Run, client: Client, where: str, label: str) -> None:
        self.run, self.client, self.where, self.label = run, client, where, label
        self.checks: list[Check] = []

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def record(self, phase: str, name: str, ok: bool, expected: str = "", seen: str = "") -> bool:
        self.checks.append(Check(phase, self.label + name, ok, expected, seen))
        return ok

    async def ours(self, phase: str, command: str, quiet: bool = False) -> dict[str, Any] | None:
        """This server's list ``command``, reduced to this run's records (keyed by vm_id or disk_id).

        None when the call fails or the reply is not a list of records; that is a failed check
        unless ``quiet`` (for polling).
        """
        try:
            result = await getattr(self.client, command)()
        except ClientError as exc:
            if not quiet:
                self.record(phase, f"observer {command}", False, "a list", _error_text(exc))
            return None
        if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
            if not quiet:
                self.record(phase, f"observer {command}", False, "a list of records", _short(result))
            return None
        return self.run.of_this_run(result, command)

    def same_ids(self, phase: str, name: str, seen: Iterable[str], expected: set[str]) -> bool:
        seen = set(seen)
        if seen == expected:
            return self.record(phase, name, True)
        missing, extra = expected - seen, seen - expected
        detail = [f"{len(seen)}"] + ([f"missing {_ids_text(missing)}"] if missing else []) + (
            [f"unexpected {_ids_text(extra)}"] if extra else [])
        return self.record(phase, name, False, f"{len(expected)}: {_ids_text(expected)}", "; ".join(detail))

    def vm_records(self, phase: str, command: str, vms: Mapping[str, Any], factor: int,
                   connected: bool, authorized: bool) -> None:
        for plan in self.run.plans:
            if plan.vm_id in vms:  # a missing one is already reported by same_ids
                mismatch = _vm_mismatch(vms[plan.vm_id], plan, factor, connected, authorized)
                self.record(phase, f"{command} record of {plan.vm_id}", mismatch is None, *(mismatch or ()))

    async def disks(self, phase: str, factor: int, vms: Mapping[str, Any] | None) -> int:
        """Check get_all_disks: exactly this run's disks, each with its size and the right ``vm``."""
        disks = await self.ours(phase, "get_all_disks")
        if disks is None:
            return 0
        disk_owner = self.run.disk_owner
        self.same_ids(phase, "get_all_disks lists exactly this run's disks", disks, set(disk_owner))
        for disk_id, (plan, size) in disk_owner.items():
            disk = disks.get(disk_id)
            if disk is None:
                continue
            want: dict[str, Any] = {"size": size * factor, "vm": plan.vm_id}
            if vms is not None and isinstance(vms.get(plan.vm_id), dict):
                want["vm_id"] = vms[plan.vm_id].get("id")
            differing = [k for k in want if disk.get(k) != want[k]]
            self.record(phase, f"get_all_disks record of {disk_id}", not differing,
                        ", ".join(f"{k}={want[k]!r}" for k in differing),
                        ", ".join(f"{k}={_short(disk.get(k))}" for k in differing))
        return len(disks)


# --- the agents -----------------------------------------------------------------------------


async def _sync(run: _Run) -> None:
    """End a phase: wait until every agent is done, then until the observer has checked the lists."""
    await run.barrier.wait()
    await run.barrier.wait()


async def _agent(run: _Run, i: int) -> None:
    """One VM agent's life: register, connect, try forbidden moves, authorize, update, deauthorize, leave."""
    me, client, n = run.plans[i], run.agents[i], len(run.plans)
    other = run.plans[(i + 1) % n]
    # The neighbour's VM is held by another session (with several servers, mostly on another server).
    stranger, who, _ = run.stranger(i)
    holder, name = run.agent_name(other.index), run.agent_name(i)

    await run.expect_ok("add", f"{name} add_vm {me.vm_id}",
                        client.add_vm(me.vm_id, ram=me.ram, cpu=me.cpu, disks=me.disk_specs(), password=me.password),
                        lambda vm: _vm_mismatch(vm, me, 1, connected=False, authorized=False))
    await _sync(run)

    await run.expect_ok("connect", f"{name} connect_vm {me.vm_id}", client.connect_vm(me.vm_id, password=me.password),
                        lambda vm: _vm_mismatch(vm, me, 1, connected=True, authorized=False))
    await _sync(run)

    await run.expect_refusal("refusals", f"{who} connect_vm {other.vm_id} (held by {holder})",
                             stranger.connect_vm(other.vm_id), Conflict)
    await run.expect_refusal("refusals", f"{name} add_vm {me.vm_id} again",
                             client.add_vm(me.vm_id, ram=me.ram, cpu=me.cpu, disks=[]), AlreadyExists)
    await run.expect_refusal("refusals", f"{name} authorize_vm {me.vm_id} with a wrong password",
                             client.authorize_vm(me.vm_id, password="wrong-" + me.password), AuthFailed)
    await _sync(run)

    await run.expect_ok("authorize", f"{name} authorize_vm {me.vm_id}",
                        client.authorize_vm(me.vm_id, password=me.password),
                        lambda vm: _vm_mismatch(vm, me, 1, connected=True, authorized=True))
    await _sync(run)

    # ram=1 etc.: should the server wrongly accept it, the observer sees the damage.
    await run.expect_refusal("update", f"{who} update_vm {other.vm_id} (authorized by {holder})",
                             stranger.update_vm(other.vm_id, ram=1, cpu=1), NotAuthorized)
    await run.expect_ok("update", f"{name} update_vm {me.vm_id} (double ram, cpu, disks)",
                        client.update_vm(me.vm_id, ram=2 * me.ram, cpu=2 * me.cpu, disks=me.disk_specs(2)),
                        lambda vm: _vm_mismatch(vm, me, 2, connected=True, authorized=True))
    await _sync(run)

    await run.expect_ok("deauthorize", f"{name} deauthorize_vm {me.vm_id}", client.deauthorize_vm(me.vm_id),
                        lambda vm: _vm_mismatch(vm, me, 2, connected=True, authorized=False))
    await _sync(run)

    await client.close()  # the session ends: the server must release the VM by itself
    await _sync(run)


# --- the observers ---------------------------------------------------------------------------


async def _check_all_vms(obs: _Observer, phase: str, what: str, scale: int, connected: bool,
                         authorized: bool) -> dict[str, Any] | None:
    """get_all_vms lists exactly this run's VMs, each as the plan says at this phase."""
    vms = await obs.ours(phase, "get_all_vms")
    if vms is not None:
        obs.same_ids(phase, f"get_all_vms {what} exactly this run's VMs", vms, obs.run.ids)
        obs.vm_records(phase, "get_all_vms", vms, scale, connected=connected, authorized=authorized)
    return vms


async def _check_add(obs: _Observer) -> str:
    vms = await _check_all_vms(obs, "add", "lists", 1, connected=False, authorized=False)
    disks = await obs.disks("add", 1, vms)
    return f"{len(vms or {})} of {len(obs.run.plans)} VMs registered, {disks} disks"


async def _check_presence(obs: _Observer, phase: str, connected: set[str], authorized: set[str]) -> tuple[int, int]:
    """The connected and authorized lists, each compared with the ids expected there."""
    seen_connected = await obs.ours(phase, "get_connected_vms")
    if seen_connected is not None:
        obs.same_ids(phase, "get_connected_vms lists", seen_connected, connected)
    seen_authorized = await obs.ours(phase, "get_authorized_vms")
    if seen_authorized is not None:
        obs.same_ids(phase, "get_authorized_vms lists", seen_authorized, authorized)
    return len(seen_connected or {}), len(seen_authorized or {})


async def _check_connect(obs: _Observer) -> str:
    connected, _ = await _check_presence(obs, "connect", obs.run.ids, set())
    return f"{connected} of {len(obs.run.plans)} connected, each by its own agent; none authorized"


async def _check_refusals(obs: _Observer) -> str:
    run = obs.run
    await _check_presence(obs, "refusals", run.ids, set())
    vms = await obs.ours("refusals", "get_all_vms")
    if vms is not None:
        obs.vm_records("refusals", "get_all_vms", vms, 1, connected=True, authorized=False)
    refused, tried = run.count("refusals", refusal=True)
    summary = f"{refused} of {tried} forbidden moves refused (connect other's VM, add again, wrong password)"
    if len(run.observers) > 1:
        summary += f"; {run.across()} of {len(run.plans)} connects of another's VM from another server"
    return summary


async def _check_authorize(obs: _Observer) -> str:
    _, authorized = await _check_presence(obs, "authorize", obs.run.ids, obs.run.ids)
    return f"{authorized} of {len(obs.run.plans)} authorized with their passwords"


async def _check_update(obs: _Observer) -> str:
    vms = await _check_all_vms(obs, "update", "lists", 2, connected=True, authorized=True)
    disks = await obs.disks("update", 2, vms)
    refused, tried = obs.run.count("update", refusal=True)
    return f"ram, cpu and {disks} disk sizes doubled; {refused} of {tried} updates from other sessions refused"


async def _check_deauthorize(obs: _Observer) -> str:
    connected, authorized = await _check_presence(obs, "deauthorize", obs.run.ids, set())
    return f"{authorized} authorized, {connected} of {len(obs.run.plans)} still connected"


async def _check_close(obs: _Observer) -> str:
    """Poll briefly before checking: the server notices a closed session asynchronously."""
    start = time.monotonic()
    while time.monotonic() - start < CLOSE_WAIT:
        if not await obs.ours("close", "get_connected_vms", quiet=True):  # none left (or an error, checked below)
            break
        await asyncio.sleep(0.05)
    waited = time.monotonic() - start
    connected, _ = await _check_presence(obs, "close", set(), set())
    # The inventory is durable: leaving does not unregister.
    vms = await _check_all_vms(obs, "close", "still lists", 2, connected=False, authorized=False)
    return f"all agents left; {connected} connected after {waited:.2f} s; {len(vms or {})} VMs kept"


_CHECKERS: dict[str, Callable[[_Observer], Awaitable[str]]] = {
    "add": _check_add, "connect": _check_connect, "refusals": _check_refusals, "authorize": _check_authorize,
    "update": _check_update, "deauthorize": _check_deauthorize, "close": _check_close,
}


async def _look(obs: _Observer, phase: str) -> tuple[str, float]:
    """Check one server's lists at the end of ``phase``: (summary, seconds until the last look).

    One server is checked once. Of several, each is looked at again until its checks pass or
    run.settle seconds have passed (another server's change takes a moment to arrive); only
    the last look's checks are kept.
    """
    start = time.monotonic()
    while True:
        obs.checks = []
        summary = await _CHECKERS[phase](obs)
        took = time.monotonic() - start
        if len(obs.run.observers) == 1 or obs.ok or took >= obs.run.settle:
            return summary, took
        await asyncio.sleep(RECHECK_PAUSE)


def _phase_summary(run: _Run, looks: list[tuple[str, float]]) -> str:
    """One server: its summary. Several: the first wrong server's (else the first one's), and how they did."""
    if len(looks) == 1:
        return looks[0][0]
    wrong = [k for k, obs in enumerate(run.observers) if not obs.ok]
    if wrong:
        return (f"{looks[wrong[0]][0]} (as {run.observers[wrong[0]].where} saw it); checked on {len(looks)} servers, "
                f"{len(wrong)} still wrong after {run.settle:g} s")
    return f"{looks[0][0]}; checked on {len(looks)} servers, right on all within {max(t for _, t in looks):.2f} s"


async def _observe(run: _Run) -> None:
    for phase in PHASES:
        await run.barrier.wait()  # every agent has finished the phase
        looks = await asyncio.gather(*(_look(obs, phase) for obs in run.observers))
        for obs in run.observers:
            run.checks.extend(obs.checks)
        run.print_phase(phase, _phase_summary(run, looks))
        await run.barrier.wait()  # let them go on


async def _guarded(run: _Run, work: Awaitable[None]) -> None:
    """Break the barrier when a participant dies unexpectedly, so nobody waits for it forever."""
    try:
        await work
    except BaseException:
        await run.barrier.abort()
        raise


# --- the entry points -----------------------------------------------------------------------


async def run_demo(host: str, port: int, vms: int = 10, out: TextIO | None = None, *,
                   prefix: str | None = None) -> bool:
    """Run the fleet demo against ``host:port``, print the report to ``out`` (stdout by default).

    Returns True when every check passed. ``prefix`` (default ``demo-<random hex>``) starts every
    VM and disk id of the run; tests pass one to prepare a clash in advance.

    :raises ConnectError: when the observer or an agent cannot connect.
    :raises ValueError: for ``vms`` outside 1..1000 or a prefix that would make invalid ids.
    """
    return await run_cluster_demo([(host, port)], vms, out, prefix=prefix)


async def run_cluster_demo(servers: Sequence[str | tuple[str, int]], vms: int = 10, out: TextIO | None = None, *,
                           prefix: str | None = None, settle: float = SETTLE) -> bool:
    """Run the fleet demo against ``servers``, which must answer as one (several servers on one
    database); print the report to ``out`` (stdout by default). True when every check passed.

    ``servers`` are ``(host, port)`` pairs or ``"host:port"`` (see :func:`parse_address`).
    Agent i talks to ``servers[i % len(servers)]``; each server has an observer, and each
    observer's lists must match what the agents did. With several servers an observer looks
    again for up to ``settle`` seconds before its checks count. One server is :func:`run_demo`.

    :raises ConnectError: when an observer or an agent cannot connect.
    :raises ValueError: for no servers, one unreadable or given twice, ``vms`` outside 1..1000,
        ``settle`` not a positive number, or a prefix that would make invalid ids.
    """
    out = sys.stdout if out is None else out
    addresses = [parse_address(s) if isinstance(s, str) else s for s in servers]
    if not addresses:
        raise ValueError("no servers given")
    wheres = [format_address(*address) for address in addresses]
    twice = sorted({w for w in wheres if wheres.count(w) > 1})
    if twice:
        raise ValueError(f"server {twice[0]} given twice")
    if not 1 <= vms <= MAX_VMS:
        raise ValueError(f"vms must be from 1 to {MAX_VMS}, got {vms}")
    if not (math.isfinite(settle) and settle > 0):
        raise ValueError(f"settle must be a positive number of seconds, got {settle!r}")
    prefix = f"demo-{secrets.token_hex(4)}" if prefix is None else prefix
    longest = f"{prefix}-{vms - 1}-d1"
    if not _ID_CHARS.fullmatch(prefix) or len(longest) > 64:
        raise ValueError(f"prefix {prefix!r} would make invalid ids (1 to 64 characters from [A-Za-z0-9._:-])")

    start = time.monotonic()
    plans = _plans(prefix, vms)
    timeout = _call_timeout(vms)
    async with AsyncExitStack() as stack:
        observers = [Client(host, port, timeout=timeout) for host, port in addresses]
        agents = [Client(*addresses[i % len(addresses)], timeout=timeout) for i in range(vms)]
        for client in (*observers, *agents):
            stack.push_async_callback(client.close)  # close() of a client that never connected is a no-op
        # A few at a time: a thousand SYNs at once can overflow a listen backlog, and dropped
        # handshakes are retried by the kernel only after seconds. return_exceptions: every
        # connect has ended before the stack closes the clients. The observers first: a server
        # that cannot be reached fails the run before a single agent connects.
        gate = asyncio.Semaphore(CONNECT_AT_ONCE)

        async def connect(client: Client) -> None:
            async with gate:
                await client.connect()

        for group in (observers, agents):
            for result in await asyncio.gather(*(connect(c) for c in group), return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result

        if len(addresses) == 1:
            print(f"vmclient demo: {vms} VM agents against {wheres[0]} (run {prefix})", file=out)
        else:
            print(f"vmclient demo: {vms} VM agents spread over {len(addresses)} servers ({', '.join(wheres)}), "
                  f"an observer on each (run {prefix})", file=out)
        run = _Run(prefix, plans, addresses, observers, agents, out, settle)
        results = await asyncio.gather(_guarded(run, _observe(run)),
                                       *(_guarded(run, _agent(run, i)) for i in range(vms)),
                                       return_exceptions=True)
        for result in results:  # a bug in the demo itself, not a failed check: let it show
            if isinstance(result, BaseException) and not isinstance(result, asyncio.BrokenBarrierError):
                raise result

    failed = [c for c in run.checks if not c.ok]
    print(f"elapsed {time.monotonic() - start:.2f} s", file=out)
    if failed:
        print(f"demo FAILED: {len(failed)} of {len(run.checks)} checks failed", file=out)
    elif len(addresses) == 1:
        print(f"demo passed: {vms} VMs", file=out)
    else:
        print(f"demo passed: {vms} VMs on {len(addresses)} servers", file=out)
    out.flush()
    return not failed


@dataclass
class SpawnedServer:
    """A vmserver subprocess started for one demo; its log lives in the temp dir until it is removed."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    notes: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def spawned_server(wait: float = SPAWN_WAIT) -> Iterator[SpawnedServer]:
    """``python -m vmserver`` on a free loopback port with a temporary database, stopped and removed after.

    The log goes to a file, not a pipe: a pipe nobody reads fills up and blocks the server.

    :raises ConnectError: when the server exits or stays silent for ``wait`` seconds.
    """
    tmp = Path(tempfile.mkdtemp(prefix="vmclient-demo-"))
    log_path = tmp / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log:
            # --host/--log-level explicitly: VMSERVER_HOST or VMSERVER_LOG_LEVEL in the environment
            # would otherwise move the server or hide the line that tells us its port.
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmserver", "--port", "0", "--db", str(tmp / "demo.db"),
                 "--host", "127.0.0.1", "--log-level", "INFO"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        server = SpawnedServer(_wait_listening(proc, log_path, wait), proc, log_path)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path, wait: float) -> int:
    deadline = time.monotonic() + wait
    while True:
        text = log_path.read_text(errors="replace")
        match = _LISTENING.search(text)
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
        last = text.strip().splitlines()[-1:] or ["(no output)"]
        if proc.poll() is not None:
            raise ConnectError(f"the spawned vmserver exited with status {proc.returncode} before listening: {last[0]}")
        if time.monotonic() > deadline:
            raise ConnectError(f"the spawned vmserver did not report listening within {wait:g}s: {last[0]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean stop for vmserver), then SIGKILL if it does not exit within STOP_WAIT seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            print(f"vmclient demo: the spawned vmserver did not stop within {STOP_WAIT:g}s; killed it",
                  file=sys.stderr)
            proc.kill()
            proc.wait()


def _vms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_VMS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_VMS}, got {value}")
    return value


def _servers(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT,HOST:PORT,...`` (``[IPv6]:PORT``; a missing port is the default one), none twice."""
    servers: list[tuple[str, int]] = []
    for entry in text.split(","):
        if not entry.strip():
            raise argparse.ArgumentTypeError(f"empty address in {text!r}")
        try:
            address = parse_address(entry, DEFAULT_PORT)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if address in servers:
            raise argparse.ArgumentTypeError(f"server {format_address(*address)} given twice")
        servers.append(address)
    return servers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmclient demo",
        description="Fleet demo: N VM agents, each on its own connection, register, connect, authorize, "
        "update and leave concurrently while an observer checks the server's lists after every phase; "
        "with --servers, spread over several servers that share one database, every server's lists.",
        epilog="Exit status: 0 every check passed, 1 a mismatch, 2 cannot connect (or bad usage).",
    )
    parser.add_argument("--vms", type=_vms, default=10, help=f"number of VM agents, 1 to {MAX_VMS} (default 10)")
    parser.add_argument("--host", default=None, help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help=f"server port (default {DEFAULT_PORT})")
    parser.add_argument("--spawn-server", action="store_true",
                        help="start a throwaway vmserver (python -m vmserver, temporary database) and stop it after")
    parser.add_argument("--servers", type=_servers, default=None, metavar="HOST:PORT,HOST:PORT",
                        help="several servers on one database (agent i on the i-th mod n, an observer on each); "
                        "instead of --host, --port and --spawn-server")
    parser.add_argument("--settle", type=seconds, default=None, metavar="SECONDS",
                        help=f"with --servers: how long each observer may look again before a phase counts as "
                        f"failed on its server, for changes on their way from another (default {SETTLE:g})")
    return parser


def main(argv: list[str]) -> int:
    """``vmclient demo [--vms N] [--host H] [--port P] [--spawn-server] [--servers A,B [--settle S]]``;
    returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.spawn_server and (args.host is not None or args.port is not None):
            parser.error("--spawn-server picks its own loopback port: drop --host and --port")
        if args.servers is not None and (args.host is not None or args.port is not None or args.spawn_server):
            parser.error("--servers names every server: drop --host, --port and --spawn-server")
        if args.settle is not None and args.servers is None:
            parser.error("--settle is for --servers (one server is checked once)")
    except SystemExit as exc:  # argparse: bad usage is status 2, --help is 0
        return int(exc.code or 0)
    try:
        if args.spawn_server:
            with spawned_server() as server:
                passed = asyncio.run(run_demo("127.0.0.1", server.port, args.vms))
                if not passed:
                    print(f"vmclient demo: last lines of the server log:\n{server.log_tail()}", file=sys.stderr)
        elif args.servers is not None:
            settle = SETTLE if args.settle is None else args.settle
            passed = asyncio.run(run_cluster_demo(args.servers, args.vms, settle=settle))
        else:
            host = "127.0.0.1" if args.host is None else args.host
            port = DEFAULT_PORT if args.port is None else args.port
            passed = asyncio.run(run_demo(host, port, args.vms))
    except ConnectError as exc:
        print(f"vmclient demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vmclient demo: interrupted", file=sys.stderr)
        return 130
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
