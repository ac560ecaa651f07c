"""Peers that send much and read nothing cost the server bounded memory: a filtered list or a
page is not copied for each of them, input before auth is short, and long lines share one
budget. Measured on a real server process (its resident memory, from /proc)."""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import build_inventory, rss_kb

MB = 1024  # KiB


class PeakRSS:
    """The highest resident memory of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _connect(port: int, n: int, rcvbuf: int = 4096) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # the kernel holds little for us
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def _send_all(socks: list[socket.socket], data: bytes, deadline: float) -> int:
    """Send ``data`` on every socket, interleaved (non-blocking), until all of it is sent, the
    peer hangs up, or the deadline; returns how many sockets the server hung up on."""
    sel = selectors.DefaultSelector()
    left = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE)
        left[s] = memoryview(data)
    hung_up = 0
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            try:
                sent = s.send(left[s][:65536])
            except BlockingIOError:
                continue
            except OSError as exc:
                assert exc.errno in (errno.EPIPE, errno.ECONNRESET), exc
                sent = -1
            if sent < 0 or sent == len(left[s]):
                hung_up += sent < 0
                sel.unregister(s)
                del left[s]
            else:
                left[s] = left[s][sent:]
    sel.close()
    assert not left, f"{len(left)} connections still sending at the deadline"
    return hung_up


def _replies(socks: list[socket.socket], deadline: float) -> list[bytes]:
    """Everything each socket received until EOF (the server hung up) or the deadline."""
    out = []
    for s in socks:
        s.setblocking(True)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
        out.append(data)
    return out


def test_non_reading_clients_of_filtered_lists_and_pages_cost_bounded_memory(spawn, tmp_path: Path):
    db = str(tmp_path / "big.db")
    build_inventory(db, 40_000)
    server = spawn("--port", "0", "--db", db, "--write-timeout", "120", "--idle-timeout", "0")
    port = server.wait_listening(timeout=60)
    pid = server.proc.pid
    warm = _connect(port, 1, rcvbuf=1 << 20)[0]
    warm.sendall(b"get_all_vms connected=false\nget_all_vms connected=false limit=39999\nhealth\n")
    warm.settimeout(30)
    got = b""
    while got.count(b"\n") < 4:  # the greeting and three replies: the caches are warm
        got += warm.recv(1 << 20)
    before = rss_kb(pid)
    clients = _connect(port, 120)
    for i, s in enumerate(clients):  # half whole filtered lists, half pages; each about 9 MB
        s.sendall(b"get_all_vms connected=false\n" if i % 2 else b"get_all_vms connected=false limit=39999\n")
    time.sleep(2.0)  # the server writes what it can, then waits for them to read
    grown = rss_kb(pid) - before
    for s in clients + [warm]:
        s.close()
    # Copied for each client (as before), 120 of these replies would hold about 1 GB.
    assert grown < 100 * MB, f"120 non-reading clients grew the server by {grown // MB} MB"
    assert server.stop() == 0


def test_clients_that_never_authenticate_cannot_make_the_server_buffer(spawn, tmp_path: Path):
    server = spawn("--port", "0", "--db", str(tmp_path / "t.db"), "--token", "s3cret-token")
    port = server.wait_listening()
    before = rss_kb(server.proc.pid)
    socks = _connect(port, 300)
    with PeakRSS(server.proc.pid) as rss:
        _send_all(socks, b"x" * 1_048_575, time.monotonic() + 60)
        replies = _replies(socks, time.monotonic() + 20)
    for s in socks:
        s.close()
    for data in replies:  # the greeting, then one too_large, then EOF
        lines = data.split(b"\n")
        assert len(lines) == 3 and b'"too_large"' in lines[1] and lines[2] == b"", data[:300]
    grown = rss.peak - before
    # Each session buffering its 1 MiB (as before): about 300 MB.
    assert grown < 50 * MB, f"300 unauthenticated senders grew the server by {grown // MB} MB"
    assert server.stop() == 0


def test_long_lines_from_many_sessions_share_one_budget(spawn, tmp_path: Path):
    line = 4 << 20  # --max-line 4 MiB: each session's line may legitimately be that long
    server = spawn("--port", "0", "--db", str(tmp_path / "l.db"), "--max-line", str(line))
    port = server.wait_listening()
    before = rss_kb(server.proc.pid)
    socks = _connect(port, 100)
    with PeakRSS(server.proc.pid) as rss:
        _send_all(socks, b"y" * (line + 10) + b"\nhealth\n", time.monotonic() + 120)
        for s in socks:
            s.shutdown(socket.SHUT_WR)
        replies = _replies(socks, time.monotonic() + 60)
    for s in socks:
        s.close()
    for data in replies:  # too long by 10 bytes: too_large, and the session goes on
        lines = data.split(b"\n")
        assert b'"too_large"' in lines[1] and b'"OK"' in lines[2], data[:300]
    grown = rss.peak - before
    # Each session gathering its line at once (as before): 100 x 4-8 MiB.
    assert grown < 150 * MB, f"100 sessions sending 4 MiB lines grew the server by {grown // MB} MB"
    assert server.stop() == 0


@pytest.mark.parametrize("size", [20_000, 1_048_576])
def test_long_lines_within_the_limit_are_still_served(spawn, tmp_path: Path, size: int):
    """The shared budget changes nothing for a line within --max-line: it is read whole."""
    server = spawn("--port", "0", "--db", str(tmp_path / "ok.db"))
    port = server.wait_listening()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    prefix = b'{"cmd":"health","id":"'
    pad = b"p" * (size - len(prefix) - 2)
    s.sendall(prefix + pad + b'"}\n')
    data = b""
    while data.count(b"\n") < 2:
        data += s.recv(1 << 20)
    assert data.split(b"\n")[1] == b'{"id":"' + pad + b'","ok":true,"result":"OK"}'
    s.close()
    assert server.stop() == 0
    assert os.path.exists(tmp_path / "ok.db")


async def test_before_auth_lines_are_short_after_it_as_long_as_max_line(db_path):
    from conftest import Wire, running
    from vmserver.server import PRE_AUTH_LINE

    async with running(db_path, token="s3cret-token") as srv:
        port = srv.address[1]
        w = await Wire.open(port)
        padded = b'{"cmd":"health","id":"' + b"p" * (PRE_AUTH_LINE - 30) + b'"}'
        assert len(padded) <= PRE_AUTH_LINE
        await w.send(padded)
        assert (await w.recv())["result"] == "OK"  # a short line before auth is served
        await w.send(b"health " + b"x" * PRE_AUTH_LINE)
        reply = await w.recv()
        assert reply["error"]["code"] == "too_large" and str(PRE_AUTH_LINE) in reply["error"]["message"]
        assert await w.at_eof(), "then the server hangs up"
        await w.close()

        w = await Wire.open(port)
        assert await w.ok("auth", token="s3cret-token") == "OK"
        long_id = "q" * (4 * PRE_AUTH_LINE)
        reply = await w.call("health", id=long_id)
        assert reply == {"id": long_id, "ok": True, "result": "OK"}  # after auth: up to --max-line
        await w.close()
