"""Failed password checks are neither a free flood nor a flood of rows (protocol.md: Security
settings, Events, get_history).

- a missing password counts as a wrong one for the per-VM slowdown;
- refusals while a VM is locked cost nothing: no row, no event, no hashing;
- the failures of one VM are one history row and one event per interval, with a count;
- too many checks at once is reported as that, not as failed attempts.

Real in-process servers on 127.0.0.1:0, real sessions, a real SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from conftest import Wire, query, running, vm_args

PW = "pw-flood-right"


async def auth_failed_rows(w: Wire, vm_id: str) -> list[dict]:
    return await w.ok("get_history", vm_id=vm_id, event="auth_failed", limit=10000)


async def wait_rows(w: Wire, vm_id: str, total: int, timeout: float = 15.0) -> list[dict]:
    """Poll until the auth_failed rows of ``vm_id`` count ``total`` failures in all."""
    end = time.monotonic() + timeout
    while True:
        rows = await auth_failed_rows(w, vm_id)
        if sum(r["count"] for r in rows) >= total or time.monotonic() > end:
            return rows
        await asyncio.sleep(0.05)


def stored_rows(db: str) -> int:
    return query(db, "SELECT count(*) FROM history WHERE event = 'auth_failed'")[0][0]


async def test_a_missing_password_counts_toward_the_slowdown(db):
    async with running(db, auth_failures_allowed=2) as srv:
        a, b = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        await a.ok("add_vm", **vm_args("mp-slow"), password=PW)
        for _ in range(2):
            reply = await b.call("connect_vm", vm_id="mp-slow")
            assert reply["error"]["message"] == "VM 'mp-slow' has a password: give password=...", reply
        # two missing passwords are two failures: locked now, even for the right password
        reply = await b.call("connect_vm", vm_id="mp-slow", password=PW)
        assert reply["ok"] is False and reply["error"]["code"] == "auth_failed", reply
        assert "too many failed password attempts for VM 'mp-slow'; try again in 1s" == reply["error"]["message"]
        reply = await a.call("remove_vm", vm_id="mp-slow", password=PW)
        assert "try again in" in reply["error"]["message"], reply
        assert await b.ok("get_connected_vms") == []
        for w in (a, b):
            await w.close()


async def test_refusals_while_locked_leave_no_trace(db):
    """Once a VM is locked, further attempts (with or without a password) are refused at once:
    no history row, no event, no password hashed, however many."""
    async with running(db, auth_failures_allowed=2) as srv:
        srv.inventory.auth_failed_interval = 60.0  # nothing is flushed during the test
        a, watcher = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        await a.ok("add_vm", **vm_args("locked"), password=PW)
        await watcher.ok("subscribe", events=["auth_failed"])
        assert await a.error("connect_vm", vm_id="locked") == "auth_failed"
        assert await a.error("connect_vm", vm_id="locked", password="wrong") == "auth_failed"
        rows_before = stored_rows(db)
        lines = b"".join(json.dumps({"cmd": "connect_vm", "args": {"vm_id": "locked", **(
            {"password": f"guess-{i}"} if i % 2 else {})}, "id": i}).encode() + b"\n" for i in range(500))
        await a.send_raw(lines)
        for i in range(500):
            reply = await a.recv()
            assert reply["id"] == i and "try again in" in reply["error"]["message"], reply
        assert stored_rows(db) == rows_before == 1  # only the first failure; the second is being counted
        await watcher.send({"cmd": "health", "id": "sync"})
        lines = []
        while not lines or "event" in lines[-1]:
            lines.append(json.loads(await watcher.recv_line()))
        assert [(m["event"], m["data"]["count"]) for m in lines[:-1]] == [("auth_failed", 1)], lines
        await a.close()
        await watcher.close()


async def test_a_flood_of_failures_is_one_row_per_interval(db):
    """203 failures from four sessions: the first is stored and announced at once with count 1,
    the rest together as few rows/events as the intervals they span, their counts adding up."""
    interval = 1.0
    async with running(db, auth_failures_allowed=1_000_000) as srv:
        srv.inventory.auth_failed_interval = interval
        port = srv.address[1]
        owner, watcher = await Wire.open(port), await Wire.open(port)
        flooders = [await Wire.open(port) for _ in range(4)]
        await owner.ok("add_vm", **vm_args("flooded"), password=PW)
        await owner.ok("add_vm", **vm_args("bystander"), password=PW)
        await watcher.ok("subscribe", events=["auth_failed"])
        started = time.monotonic()

        async def flood(w: Wire) -> None:
            await w.send_raw(b"".join(json.dumps({"cmd": "connect_vm", "args": {"vm_id": "flooded"}}).encode()
                                      + b"\n" for _ in range(50)))
            for _ in range(50):
                assert (await w.recv())["error"]["code"] == "auth_failed"

        await asyncio.gather(*(flood(w) for w in flooders))
        for guess in ("wrong-1", "wrong-2", "wrong-3"):
            assert await flooders[0].error("remove_vm", vm_id="flooded", password=guess) == "auth_failed"
        assert await owner.error("connect_vm", vm_id="bystander") == "auth_failed"  # its own count
        elapsed = time.monotonic() - started

        rows = await wait_rows(owner, "flooded", 203)
        assert sum(r["count"] for r in rows) == 203, rows
        oldest = rows[-1]
        assert oldest["count"] == 1 and oldest["command"] == "connect_vm", oldest
        assert rows[0]["command"] == "remove_vm" and rows[0]["peer"] is not None
        assert 2 <= len(rows) <= 2 + math.ceil(elapsed / interval) + 1, (len(rows), elapsed)
        assert [r["count"] for r in await auth_failed_rows(owner, "bystander")] == [1]

        events = []
        while sum(e["data"]["count"] for e in events if e["data"]["vm_id"] == "flooded") < 203:
            events.append(json.loads(await watcher.recv_line()))
        flooded = [e for e in events if e["data"]["vm_id"] == "flooded"]
        assert [(e["data"]["count"], e["data"]["command"]) for e in flooded] == \
            [(r["count"], r["command"]) for r in reversed(rows)]
        assert all(e["event"] == "auth_failed" and e["data"]["connected"] is False for e in events)
        assert stored_rows(db) == len(rows) + 1  # + bystander's
        for w in [owner, watcher, *flooders]:
            await w.close()


class BusyThreads:
    """Every thread of the event loop's default executor (the one password checks run in) kept
    busy until released, so a check that starts stays under way: deterministic 'at once'."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int = 40) -> None:
        self.gate = threading.Event()
        self.tasks = [loop.run_in_executor(None, self.gate.wait, 30) for _ in range(threads)]

    async def release(self) -> None:
        self.gate.set()
        await asyncio.gather(*self.tasks)


async def test_too_many_checks_at_once_is_not_called_failed_attempts(db):
    """No password has failed: a check over the limit of checks at once is refused as that."""
    async with running(db, auth_failures_allowed=1) as srv:
        a, b = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        await a.ok("add_vm", **vm_args("busy"), password=PW)
        busy = BusyThreads(asyncio.get_running_loop())
        try:
            await a.send({"cmd": "connect_vm", "args": {"vm_id": "busy", "password": PW}, "id": "first"})
            end = time.monotonic() + 10
            while srv.context.attempts.checking("busy") == 0:  # its check has begun, and waits for a thread
                assert time.monotonic() < end, "the first check never began"
                await asyncio.sleep(0.01)
            reply = await b.call("connect_vm", vm_id="busy", password=PW)
            assert reply["ok"] is False and reply["error"]["code"] == "auth_failed", reply
            message = reply["error"]["message"]
            assert message == "too many password checks for VM 'busy' under way at once; try again in 1s", message
            assert "failed" not in message
        finally:
            await busy.release()
        first = await a.recv()
        assert first["id"] == "first" and first["ok"] is True and first["result"]["connected"] is True, first
        assert await auth_failed_rows(b, "busy") == []  # nothing failed, nothing recorded
        await a.close()
        await b.close()


async def test_counted_failures_are_stored_at_shutdown(db):
    """Failures still being counted when the server stops are written before it closes the file."""
    async with running(db, auth_failures_allowed=1_000_000) as srv:
        srv.inventory.auth_failed_interval = 3600.0
        w = await Wire.open(srv.address[1])
        await w.ok("add_vm", **vm_args("late-count"), password=PW)
        for _ in range(7):
            assert await w.error("connect_vm", vm_id="late-count") == "auth_failed"
        await w.close()
    rows = query(db, "SELECT reason, count FROM history WHERE event = 'auth_failed' ORDER BY id")
    assert rows == [("connect_vm", 1), ("connect_vm", 6)]
