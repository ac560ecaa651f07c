"""Garbage collection: ended sessions leave no reference cycles behind, so the server can
freeze what lives long (gc_tuning.py) without leaking what ends; and the pause summary it
logs at shutdown.

A cycle that holds a frozen object is never collected while it stays frozen: it is a leak.
So sessions are opened, everything is frozen, the sessions end in every way a session ends,
and then one collection that saves what it finds (DEBUG_SAVEALL) shows what they left.
The test's own side of each session is a plain blocking socket driven from a worker thread,
so it adds no asyncio objects (and no garbage) of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from conftest import running, vm_args

HOST = "127.0.0.1"
TOKEN = "gc-test-token"
PER_WAY = 50  # sessions ended each way
IDLE = 3.0  # seconds: the idle timeout of the server whose sessions end that way


class Peer:
    """One blocking client socket with a line buffer (used from a worker thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=15)
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"EOF after {self.buf[:200]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def call(self, cmd: str, **args: object) -> dict:
        self.sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        return json.loads(self.line())

    def until_eof(self) -> bytes:
        """Everything up to EOF (a reset counts as EOF)."""
        try:
            while chunk := self.sock.recv(65536):
                self.buf += chunk
        except ConnectionResetError:
            pass
        return self.buf

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def open_peers(port: int, tag: str, token: str | None = None, vm: bool = True, subscribe: bool = False) -> list[Peer]:
    peers = []
    try:
        for i in range(PER_WAY):
            peer = Peer(port)
            peers.append(peer)
            assert b'"hello"' in peer.line()
            if token is not None:
                assert peer.call("auth", token=token)["ok"] is True
            if vm:
                assert peer.call("connect_vm", **vm_args(f"{tag}-{i}", f"{tag}-{i}-d"))["ok"] is True
            if subscribe:
                assert peer.call("subscribe")["ok"] is True
    except BaseException:
        for peer in peers:
            peer.close()
        raise
    return peers


def first_lines_then_eof(peers: list[Peer], timeout: float = 15.0) -> list[bytes]:
    """Each peer's first line, once the server has closed it (b'' for a peer it did not close
    within ``timeout`` seconds, all told)."""
    deadline = time.monotonic() + timeout
    out = []
    for peer in peers:
        peer.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            out.append(peer.until_eof().partition(b"\n")[0])
        except socket.timeout:
            out.append(b"")
    return out


async def until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def connected(srv) -> int:  # type: ignore[no-untyped-def]
    return json.loads(srv.inventory.stats_json())["connected"]


@contextlib.contextmanager
def frozen() -> Iterator[dict[str, Any]]:
    """Collect, then freeze everything; on leaving, unfreeze and collect once more, saving what
    that finds: ``found`` (how many objects) and ``kinds`` (how many of each type)."""
    if gc.get_freeze_count():
        gc.unfreeze()  # whatever an earlier test froze is not ours to count
    gc.collect()
    gc.freeze()
    result: dict[str, Any] = {}
    try:
        yield result
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        result["found"] = gc.collect()
        result["kinds"] = Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.unfreeze()


def assert_no_garbage(garbage: dict[str, Any], sessions: int, what: str) -> None:
    found, kinds = garbage["found"], garbage["kinds"]
    print(f"\nGC {what}: {sessions} sessions left {found} objects of cyclic garbage {kinds.most_common(6)}")
    assert found < 0.5 * sessions, f"{found} objects for {sessions} sessions: {kinds.most_common(25)}"


async def test_ended_sessions_leave_no_cyclic_garbage(tmp_path):
    """Sessions that end by EOF, by reset, by idle timeout, after subscribing, by speaking
    HTTP, by an over-long line before auth, and by server shutdown: none of them leaves
    garbage that only the cycle collector could free (< 0.5 objects per session)."""
    async with (running(str(tmp_path / "a.db"), idle_timeout=0) as plain,
                running(str(tmp_path / "b.db"), idle_timeout=0, token=TOKEN) as guarded,
                running(str(tmp_path / "c.db"), idle_timeout=IDLE) as idling):
        port, guarded_port = plain.address[1], guarded.address[1]
        ways: dict[str, list[Peer]] = {}
        try:
            for way, kwargs in (("subscribed", {"subscribe": True}), ("eof", {}), ("reset", {}), ("http", {}),
                                ("shutdown", {})):
                ways[way] = await asyncio.to_thread(open_peers, port, way, **kwargs)
            ways["long line"] = await asyncio.to_thread(open_peers, guarded_port, "long", vm=False)
            ways["idle"] = await asyncio.to_thread(open_peers, idling.address[1], "idle")
            sessions = sum(map(len, ways.values()))
            with frozen() as garbage:
                assert len(idling.sessions) == PER_WAY, "idle sessions ended before the freeze (a slow machine?)"
                # The subscribers first, and alone: each is released before an event could be
                # written to it (that is the next test's case).
                for peer in ways["subscribed"]:
                    peer.close()
                released = await until(lambda: len(plain.sessions) == 4 * PER_WAY, 20)

                def end() -> dict[str, list[bytes]]:
                    for peer in ways["eof"]:
                        peer.close()
                    for peer in ways["reset"]:
                        peer.reset()
                    for peer in ways["http"]:
                        peer.sock.sendall(b"GET / HTTP/1.1\r\nHost: vmserver\r\n\r\n")
                    for peer in ways["long line"]:
                        peer.sock.sendall(b"x" * 5000 + b"\n")
                    return {way: first_lines_then_eof(ways[way]) for way in ("http", "long line", "idle")}

                replies = await asyncio.to_thread(end)
                released = released and await until(lambda: len(plain.sessions) == PER_WAY and not guarded.sessions
                                                     and not idling.sessions, 20)
                shutdown = asyncio.create_task(asyncio.to_thread(first_lines_then_eof, ways["shutdown"]))
                await asyncio.wait_for(plain.close(), 20)
                replies["shutdown"] = await asyncio.wait_for(shutdown, 20)
                released = released and await until(lambda: not plain.sessions, 10)
                released = released and connected(plain) == connected(idling) == 0
        finally:
            for peers in ways.values():
                for peer in peers:
                    peer.close()
        assert_no_garbage(garbage, sessions, f"{len(ways)} ways")
        assert released, (f"sessions left: plain {len(plain.sessions)}, guarded {len(guarded.sessions)}, "
                          f"idle {len(idling.sessions)}; connected VMs {connected(plain)} and {connected(idling)}")
        assert all(b'"bad_request"' in line for line in replies["http"]), replies["http"][:3]
        assert all(b'"too_large"' in line for line in replies["long line"]), replies["long line"][:3]
        assert all(b'"shutdown"' in line for line in replies["shutdown"]), replies["shutdown"][:3]


async def test_a_write_to_a_vanished_peer_leaves_no_cyclic_garbage(tmp_path):
    """Writes that fail because the peer is gone: VM hosts that send a request and reset at
    once (crashed, killed), and subscribers that hang up while those hosts' disconnections
    are being published to them. The connection's stored error must not hold its session in
    a reference cycle."""
    async with running(str(tmp_path / "v.db"), idle_timeout=0) as srv:
        port = srv.address[1]
        listeners = await asyncio.to_thread(open_peers, port, "listener", subscribe=True)
        vanishing = await asyncio.to_thread(open_peers, port, "vanished")
        try:
            with frozen() as garbage:
                def end() -> None:
                    for listener, peer in zip(listeners, vanishing):
                        peer.sock.sendall(b'{"cmd":"get_all_vms"}\n')
                        peer.reset()
                        listener.close()

                await asyncio.to_thread(end)
                released = await until(lambda: not srv.sessions and connected(srv) == 0, 20)
        finally:
            for peer in listeners + vanishing:
                peer.close()
        assert_no_garbage(garbage, len(listeners) + len(vanishing), "writes to vanished peers")
        assert released, f"{len(srv.sessions)} sessions left, {connected(srv)} VMs connected"


def test_shutdown_logs_the_collection_pauses(spawn, tmp_path):
    """At shutdown the server logs how many collections ran and how long the longest paused."""
    p = spawn("--port", "0", "--db", str(tmp_path / "gc.db"))
    port = p.wait_listening()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b'{"cmd":"health"}\n')
        assert b'"hello"' in s.recv(65536)
        time.sleep(0.5)  # several of the server's periodic young collections (gc_tuning.FREEZE_EVERY)
    assert p.stop() == 0
    match = re.search(rb"gc: (\d+) collections, longest pause (\d+\.\d) ms, (\d+) over 20 ms", p.log)
    assert match, p.log.decode(errors="replace")
    assert 1 <= int(match.group(1)) and int(match.group(3)) <= int(match.group(1)), "the periodic collections are counted"
