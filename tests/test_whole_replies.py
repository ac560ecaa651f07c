"""A reply is written whole or not at all: shutdown and the idle timeout wait for a reply being
written, and a peer that resets mid-reply stops the writing at once (quietly)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct

from conftest import TIMEOUT, build_inventory, running

VMS = 20_000  # about 4 MB of get_all_vms
PIPELINED = 5  # replies asked for at once: more than the kernel's socket buffers hold (~4 MB)


async def _open(port: int, rcvbuf: int = 16384) -> socket.socket:
    """A raw client socket with a small receive buffer, its greeting already read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    greeting = b""
    while not greeting.endswith(b"\n"):
        greeting += await asyncio.wait_for(loop.sock_recv(sock, 1), TIMEOUT)
    assert b"hello" in greeting
    return sock


async def _read_to_eof(sock: socket.socket, pause: float = 0.0, chunk: int = 65536) -> bytes:
    loop, out = asyncio.get_running_loop(), bytearray()
    while True:
        data = await asyncio.wait_for(loop.sock_recv(sock, chunk), TIMEOUT)
        if not data:
            return bytes(out)
        out += data
        if pause:
            await asyncio.sleep(pause)


async def _started(sock: socket.socket, n: int = 65536) -> bytes:
    """Read the first ``n`` bytes of the reply: the server is now in the middle of writing it."""
    loop, out = asyncio.get_running_loop(), bytearray()
    while len(out) < n:
        out += await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), TIMEOUT)
    return bytes(out)


def _check_whole_list(line: bytes) -> None:
    reply = json.loads(line)  # a cut line is not JSON
    assert reply["ok"] is True and len(reply["result"]) == VMS


async def _shutdown_mid_reply(db_path: str, half_close: bool) -> None:
    build_inventory(db_path, VMS)
    async with running(db_path, shutdown_grace=5.0, write_timeout=10.0) as srv:
        sock = await _open(srv.address[1])
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"get_all_vms\n" * PIPELINED)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        head = await _started(sock)
        closing = asyncio.create_task(srv.close())
        await asyncio.sleep(0.2)  # shutdown has begun while a reply is half written
        rest = await _read_to_eof(sock)
        await asyncio.wait_for(closing, TIMEOUT)
        sock.close()
    lines = (head + rest).split(b"\n")
    assert lines[-1] == b"", "the stream ends with a whole line"
    assert 3 <= len(lines) < PIPELINED + 2, [line[:80] + b"..." + line[-80:] for line in lines]
    for line in lines[:-2]:  # the reply being written when shutdown began, and those before it
        _check_whole_list(line)
    assert json.loads(lines[-2])["event"] == "shutdown"


async def test_shutdown_finishes_a_reply_being_written(db_path):
    await _shutdown_mid_reply(db_path, half_close=False)


async def test_shutdown_finishes_a_reply_to_a_half_closed_client(db_path):
    await _shutdown_mid_reply(db_path, half_close=True)


async def test_a_session_still_reading_a_reply_is_not_idle(db_path):
    build_inventory(db_path, VMS)
    async with running(db_path, idle_timeout=0.3) as srv:
        sock = await _open(srv.address[1])
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"get_all_vms\n" * PIPELINED + b"health\n")
        data = bytearray()
        while data.count(b"\n") < PIPELINED + 1:  # slowly: the replies take many idle periods to read
            data += await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT)
            await asyncio.sleep(0.002)
        lines = bytes(data).split(b"\n")
        for line in lines[:PIPELINED]:
            _check_whole_list(line)
        assert json.loads(lines[PIPELINED])["result"] == "OK"
        # Then, really idle, it is closed.
        assert await _read_to_eof(sock) == b""
        sock.close()


def _read_then_reset(port: int, requests: int, after: int) -> None:
    """A client reading as fast as it can (in its own thread), which resets the connection
    after ``after`` bytes: the server is in full flow when the reset comes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        sock.sendall(b"get_all_vms\n" * requests)
        got = 0
        while got < after:
            got += len(sock.recv(1 << 20))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


async def test_a_reset_in_the_middle_of_a_reply_stops_the_writing_quietly(db_path, caplog):
    build_inventory(db_path, VMS)
    caplog.set_level(logging.DEBUG)
    resets = 3
    async with running(db_path) as srv:
        for _ in range(resets):
            await asyncio.to_thread(_read_then_reset, srv.address[1], PIPELINED, 6 << 20)
        for _ in range(int(TIMEOUT / 0.05)):
            if not srv.sessions:
                break
            await asyncio.sleep(0.05)
        assert not srv.sessions, "the sessions ended"
    sends = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert not sends, f"{len(sends)} 'socket.send() raised exception' lines for {resets} resets"
    ended = [r for r in caplog.records if r.name == "vmserver.server" and "ended (connection error" in r.getMessage()]
    assert len(ended) <= resets and all(r.levelno <= logging.DEBUG for r in ended)
