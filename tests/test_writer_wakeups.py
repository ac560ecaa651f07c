"""The writer thread and the event loop's self-pipe: however many transactions commit while
the loop is busy, at most one wake-up from the writer is pending, so the pipe never fills and
the byte that tells the loop a signal arrived (SIGTERM) is never dropped."""

from __future__ import annotations

import asyncio
import errno
import json
import selectors
import socket
import struct
import threading
import time

import vmserver.backends.sqlite as sql
from conftest import vm_args
HOST = "127.0.0.1"
from vmserver.backends.sqlite import Store
from sqlite_jobs import calls_committer

NOW = "2026-01-01T00:00:00.000Z"


async def test_a_busy_loop_is_woken_once_however_many_batches_commit(tmp_path):
    """max_batch=1 and 200 writes committed while the loop is blocked: the writer asks for the
    loop at most once (before the fix: once per transaction); afterwards every future resolves,
    in commit order, and a later write still wakes the loop."""
    store = Store(str(tmp_path / "w.db"))
    loop = asyncio.get_running_loop()
    writer = calls_committer(store, max_batch=1)
    wakeups = {"while blocked": 0, "in all": 0}
    blocked = False
    real = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "vmserver-writer":
            wakeups["in all"] += 1
            wakeups["while blocked"] += blocked
        return real(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    gate = threading.Event()
    writer.start(loop)
    try:
        # The first write holds the writer until the loop is blocked; the others queue behind it.
        futures = [writer.submit("gate", (lambda db: gate.wait(10),))]
        futures += [writer.submit(f"add {i}", (sql.insert_vm, f"vm-{i}", 1, 1, None, [], NOW)) for i in range(200)]
        resolved: list[int] = []
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: resolved.append(i))
        blocked = True
        gate.set()
        deadline = time.monotonic() + 30
        while writer.batches < len(futures) and time.monotonic() < deadline:
            time.sleep(0.01)  # the loop is blocked: whatever the writer asks of it waits
        committed_while_blocked = writer.batches
        blocked = False
        results = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert committed_while_blocked == len(futures), "every write committed while the loop was blocked"
        assert wakeups["while blocked"] <= 2, wakeups
        assert resolved == list(range(len(futures)))
        assert results == [True] + [(i + 1, []) for i in range(200)]
        # The pending wake-up was taken: a new commit wakes the loop again.
        late = writer.submit("late", (sql.insert_vm, "late", 1, 1, None, [], NOW))
        assert await asyncio.wait_for(late, 10) == (201, [])
        print(f"\nWAKEUPS batches={writer.batches} wakeups={wakeups}")
    finally:
        del loop.call_soon_threadsafe  # type: ignore[method-assign]
        gate.set()
        writer.close()
        store.close()


def connect_fleet(port: int, count: int, timeout: float = 60.0) -> list[socket.socket]:
    """``count`` sessions at once, each of which connect_vm'd its own VM (acknowledged)."""
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, list] = {}  # socket -> [index, buffer, greeted]
    done: list[socket.socket] = []
    try:
        for i in range(count):
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex((HOST, port))
            assert err in (0, errno.EINPROGRESS), err
            sel.register(s, selectors.EVENT_READ)
            state[s] = [i, b"", False]
        deadline = time.monotonic() + timeout
        while state:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(state)} of {count} sessions not connected within {timeout:g}s"
            for key, _ in sel.select(min(left, 0.5)):
                s = key.fileobj  # type: ignore[assignment]
                entry = state[s]
                chunk = s.recv(65536)
                assert chunk, f"session {entry[0]}: EOF after {entry[1][:200]!r}"
                entry[1] += chunk
                while b"\n" in entry[1]:
                    line, _, entry[1] = entry[1].partition(b"\n")
                    if not entry[2]:
                        assert b'"hello"' in line, line
                        entry[2] = True
                        vm = f"w-{entry[0]}"
                        request = {"id": entry[0], "cmd": "connect_vm", "args": vm_args(vm, f"{vm}-d")}
                        s.sendall(json.dumps(request).encode() + b"\n")
                        continue
                    reply = json.loads(line)
                    assert reply["ok"] is True, reply
                    sel.unregister(s)
                    del state[s]
                    done.append(s)
                    break
    except BaseException:
        for s in [*state, *done]:
            s.close()
        raise
    finally:
        sel.close()
    return done


def test_sigterm_after_a_burst_of_resets_stops_the_server(limited):
    """2,000 sessions with a VM each reset at once, SIGTERM half a second later: the server
    exits 0 within 10 s and never failed to write a signal's wake-up byte. Three rounds.

    Meanwhile nobody reads the server's log (a stalled journald or paused terminal): the
    event loop blocks writing it, with the GIL free, while the writer thread commits one
    transaction per released VM (--max-write-batch 1) and, before the fix, woke the loop for
    each: the self-pipe filled and SIGTERM's byte was dropped, so the server never stopped."""
    for round in range(3):
        srv = limited("--max-write-batch", "1", "--log-level", "DEBUG")
        port = srv.wait_listening()
        fleet = connect_fleet(port, 2000)
        srv.reading.clear()
        time.sleep(0.1)  # (the log reader's last read returns)
        for s in fleet:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset
        time.sleep(0.5)
        began = time.monotonic()
        try:
            code = srv.stop(timeout=10.0)  # (reads the log again)
        except AssertionError as exc:
            dropped = b"signal wakeup fd" in srv.log
            raise AssertionError(f"round {round}: {exc}; a signal's wake-up byte was dropped: {dropped}") from None
        took = time.monotonic() - began
        assert code == 0, srv.log[-2000:].decode(errors="replace")
        assert b"signal wakeup fd" not in srv.log
        print(f"\nWAKEUPS round {round}: exit {code} {took:.2f}s after SIGTERM")
