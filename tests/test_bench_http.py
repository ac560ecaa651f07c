"""Figure 15's parts against real servers: the floor (a bare aiohttp app), ``vmserver --http-port``,
and small loopback servers that answer wrongly. The load generator counts exactly what it was
asked to send, and any reply that is not the one checked before the clock started (another
status, another length, chunked, closing, a connection ended) stops the run with LoadError.
No timing is asserted.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is not installed: it is imported from the checkout
    sys.path.insert(0, str(ROOT))

pytest.importorskip("aiohttp")

from benchmarks import http_figure  # noqa: E402
from benchmarks.loadgen import LoadError  # noqa: E402
from benchmarks.run import Bench, ServerProc, http_port, populate, vm_spec  # noqa: E402
from test_bench_smoke import bench  # noqa: E402,F401  (a Bench of the smoke settings, closed after)


@pytest.fixture
def floor(bench: Bench) -> int:
    argv = [sys.executable, "-m", "benchmarks.http_figure", "floor", "--port", "0"]
    return bench._start(ServerProc("floor", argv, bench.tmp / "floor.log"), 60.0).port


@pytest.fixture
def ours(bench: Bench) -> tuple[int, int]:
    """(line port, HTTP port) of vmserver --http-port with three VMs."""
    server = bench.ours("http", extra=["--http-port", "0"])
    populate(server.port, [vm_spec(f"vm-{i}") for i in range(1, 4)])
    return server.port, http_port(server)


def test_the_floor_answers_ok_and_every_request_is_counted(floor: int) -> None:
    shape = http_figure.reply_shape(floor, "/", lambda body: body == b"OK")
    status, size, prefix = shape
    assert status == 200 and prefix.startswith(b"HTTP/1.1 200 ") and prefix.endswith(b"Content-Length: 2\r\n")
    result = http_figure.closed_loop(floor, "/", 301, 7, shape, timeout=60)
    assert (result.requests, result.ok, result.errors, len(result.latencies)) == (301, 301, 0, 301)
    assert result.require_all_ok(301) is result and result.elapsed > 0
    empty = http_figure.closed_loop(floor, "/", 0, 3, shape, timeout=60)  # a budget of none ends at once
    assert (empty.requests, empty.ok) == (0, 0)
    with pytest.raises(LoadError, match="not the reply expected"):  # the check sees the body
        http_figure.reply_shape(floor, "/", lambda body: body == b"KO")


def test_vmserver_list_is_the_inventory_and_its_replies_are_counted(ours: tuple[int, int]) -> None:
    _, port = ours
    shape = http_figure.reply_shape(port, "/get_all_vms", http_figure.list_of(3))
    assert shape[0] == 200
    result = http_figure.closed_loop(port, "/get_all_vms", 120, 5, shape, timeout=60)
    assert (result.ok, result.errors) == (120, 0)
    with pytest.raises(LoadError, match="not the reply expected"):
        http_figure.reply_shape(port, "/get_all_vms", http_figure.list_of(10))  # 3 VMs, not 10


def test_a_reply_of_another_length_or_status_stops_the_run(floor: int, ours: tuple[int, int]) -> None:
    line_port, port = ours
    health = http_figure.reply_shape(port, "/health", lambda body: body == b"OK")
    listed = http_figure.reply_shape(port, "/get_all_vms", http_figure.list_of(3))
    with pytest.raises(LoadError, match="a reply not counted"):  # the floor's "OK" is not the list
        http_figure.closed_loop(floor, "/", 50, 5, listed, timeout=60)
    with pytest.raises(LoadError, match="status 404"):  # a route that is not there
        http_figure.closed_loop(port, "/no_such_route", 50, 5, health, timeout=60)
    # A list that changed length after the check (a VM added) is not counted as the one checked.
    populate(line_port, [vm_spec("vm-4")])
    with pytest.raises(LoadError, match="a reply not counted"):
        http_figure.closed_loop(port, "/get_all_vms", 50, 5, listed, timeout=60)


def test_a_server_with_a_token_refuses_and_the_run_fails(bench: Bench) -> None:
    server = bench.ours("token", extra=["--http-port", "0", "--token", "bench-token-15"])
    port = http_port(server)
    health = http_figure.reply_shape(port, "/health", lambda body: body == b"OK")  # open to probes
    assert health[0] == 200
    with pytest.raises(LoadError, match="status 401"):
        http_figure.closed_loop(port, "/get_all_vms", 20, 2, health, timeout=60)


class _Canned:
    """A loopback server answering every request with ``reply`` (``close``: then closing)."""

    def __init__(self, reply: bytes, close: bool = False) -> None:
        self.reply, self.close = reply, close
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    conn.sendall(self.reply)
                    if self.close:
                        return

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (Linux); close alone does not
        self.sock.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5)


@pytest.fixture
def canned() -> Iterator[list[_Canned]]:
    servers: list[_Canned] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"


def test_replies_that_cannot_be_counted_stop_the_run(canned: list[_Canned]) -> None:
    good = _Canned(OK)
    canned.append(good)
    shape = http_figure.reply_shape(good.port, "/")
    assert shape == (200, len(OK), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
    assert http_figure.closed_loop(good.port, "/", 40, 4, shape, timeout=30).ok == 40
    for reply, close, why in (
            (OK, True, "connection closed by the server"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK", False, "closes the connection"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nOK\r\n0\r\n\r\n", False, "chunked"),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK", False, "not an HTTP/1.1 reply"),
            (OK + b"!", False, "bytes after a reply"),
            (b"HTTP/1.1 500 No\r\nContent-Length: 2\r\n\r\nOK", False, "status 500")):
        bad = _Canned(reply, close)
        canned.append(bad)
        with pytest.raises(LoadError, match=why):
            http_figure.closed_loop(bad.port, "/", 40, 4, shape, timeout=30)


def test_a_reply_split_across_reads_is_counted_once(canned: list[_Canned]) -> None:
    """Heads and bodies arrive in pieces on a real socket: the slow path joins them."""
    body = b"x" * 300000  # more than one read
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    server = _Canned(reply)
    canned.append(server)
    shape = http_figure.reply_shape(server.port, "/", lambda b: b == body)
    result = http_figure.closed_loop(server.port, "/", 30, 3, shape, timeout=60)
    assert (result.ok, result.errors) == (30, 0)


def test_split_reply_reads_a_head_and_waits_for_the_rest() -> None:
    assert http_figure.split_reply(b"HTTP/1.1 200 OK\r\nContent-Len") is None
    status, head, total = http_figure.split_reply(OK)  # type: ignore[misc]
    assert (status, total) == (200, len(OK)) and head.endswith(b"Content-Length: 2\r\n")
    empty = b"HTTP/1.1 204 No Content\r\ncontent-length:0\r\n\r\n"  # any case, no space
    assert http_figure.split_reply(empty) == (204, empty[:-2], len(empty))
    with pytest.raises(LoadError, match="Content-Length"):
        http_figure.split_reply(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n")


def test_the_http_port_is_read_from_the_servers_log(bench: Bench) -> None:
    server = bench.ours("ports", extra=["--http-port", "0"])
    port = http_port(server)
    assert port not in (0, server.port)
    assert http_figure.reply_shape(port, "/health", lambda body: body == b"OK")[0] == 200
    plain = bench.ours("no-http")  # no HTTP API: no such line, said at once it exits or in time
    with pytest.raises(Exception, match="no 'HTTP API on' line"):
        http_port(plain, timeout=1.0)
