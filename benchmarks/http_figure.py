"""Figure 15's parts: the floor for aiohttp, and an HTTP/1.1 load generator cheap enough to measure it.

    python -m benchmarks.http_figure floor --port 0    # the floor: a bare aiohttp app answering "OK" on GET /

The floor is what any server on aiohttp pays per request: aiohttp's parser, its request and
response objects, one handler that returns a constant. It runs on the same aiohttp as
``vmserver --http-port`` (the same interpreter), with its access log off, as the server's is.

The load generator is one asyncio protocol per keep-alive connection, each with one request in
flight (closed loop), the request bytes encoded once: it reads the status line and
Content-Length of each reply and nothing else, so it costs a fraction of what the server does.
A reply counts only with the status expected and the body length of the reply checked before
the clock started; anything else (another status, a chunked or closing reply, a connection
ended, a deadline passed) raises :class:`LoadError`, so the figure cannot time failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from array import array
from collections.abc import Callable

from .loadgen import HOST, LoadError, Result

Shape = tuple[int, int, bytes]  # a reply's status, its length (head and body), its head's fixed start

_HEAD_END = b"\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


def unavailable() -> str | None:
    """Why figure 15 cannot run here (aiohttp, the http extra, not installed), or None."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "aiohttp is not installed (pip install -e '.[http]'; make bench installs it)"
    return None


def aiohttp_version() -> str:
    import aiohttp

    return aiohttp.__version__


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode("ascii")


# --- one reply, read as the load generator reads it ------------------------------------------


def split_reply(buf: bytes | bytearray) -> tuple[int, bytes, int] | None:
    """``(status, head, body length)`` of the reply at the start of ``buf``, or None while its
    head is incomplete. :raises LoadError: not an HTTP/1.1 reply with a Content-Length we may keep alive."""
    end = buf.find(_HEAD_END)
    if end < 0:
        return None
    head = bytes(buf[:end + 2])  # with the last header line's CRLF, so every header follows a CRLF
    if not head.startswith(b"HTTP/1.1 ") or len(head) < 12 or not head[9:12].isdigit():
        raise LoadError(f"not an HTTP/1.1 reply: {head[:80]!r}")
    length = _LENGTH.search(head)
    if length is None or _CHUNKED.search(head):
        raise LoadError(f"reply without Content-Length (chunked?): {head[:200]!r}")
    if _CLOSE.search(head):
        raise LoadError(f"the server closes the connection after this reply: {head[:200]!r}")
    return int(head[9:12]), head, end + 4 + int(length.group(1))


# --- the load generator ------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive connection sending ``request`` each time the previous reply is complete."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = 0  # bytes of the reply in flight, once its head is read; 0 before
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> bool:
        if not self.load.take():
            return False
        self.sent = time.perf_counter()
        self.transport.write(self.load.request)  # type: ignore[union-attr]
        return True

    def data_received(self, data: bytes) -> None:
        load = self.load
        if not self.buf and len(data) == load.size and data.startswith(load.prefix):
            pass  # the usual case: the whole reply at once, its status and length as checked
        else:
            buf = self.buf
            buf += data
            try:
                if not self.need:
                    parsed = split_reply(buf)
                    if parsed is None:
                        return
                    status, _, self.need = parsed
                    if status != load.status or self.need != load.size:
                        load.bad(f"status {status}, {self.need} bytes ({load.status} and {load.size} expected): "
                                 f"{bytes(buf[:200])!r}")
                        return
                if len(buf) < self.need:
                    return
                if len(buf) > self.need:
                    raise LoadError(f"{len(buf) - self.need} bytes after a reply, none asked for")
            except LoadError as exc:
                load.fail(exc)
                return
            buf.clear()
            self.need = 0
        load.done(time.perf_counter() - self.sent)
        if not self.send():
            load.idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.fail(LoadError(f"connection closed by the server ({exc or 'end of file'})"))


class _Load:
    """What the connections share: the budget of requests, the count, the end."""

    def __init__(self, path: str, total: int, shape: Shape) -> None:
        self.request = request(path)
        self.left = total
        self.status, self.size, self.prefix = shape
        self.result = Result()
        self.latencies = array("d")
        self.busy = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False

    def take(self) -> bool:
        if self.left <= 0 or self.finished.done():
            return False
        self.left -= 1
        self.result.requests += 1
        self.busy += 1
        return True

    def done(self, latency: float) -> None:
        self.busy -= 1
        self.result.ok += 1
        self.latencies.append(latency)

    def bad(self, what: str) -> None:
        self.result.errors += 1
        self.result.error_samples.append(what)
        self.fail(LoadError(f"a reply not counted: {what}"))  # stop at once: the figure fails anyway

    def idle(self) -> None:
        if self.busy == 0 and not self.finished.done():
            self.finished.set_result(None)

    def fail(self, exc: LoadError) -> None:
        if not self.closing and not self.finished.done():
            self.finished.set_exception(exc)


def closed_loop(port: int, path: str, total: int, connections: int, shape: Shape,
                timeout: float = 120.0) -> Result:
    """``total`` GETs of ``path`` over ``connections`` keep-alive connections, one in flight on
    each; every reply must be of ``shape`` (:func:`reply_shape`: its status and length).
    Connections are opened before the clock starts. :raises LoadError:"""
    return asyncio.run(_closed_loop(port, path, total, connections, shape, timeout))


async def _closed_loop(port: int, path: str, total: int, connections: int, shape: Shape,
                       timeout: float) -> Result:
    loop = asyncio.get_running_loop()
    load = _Load(path, total, shape)
    clients: list[_Client] = []
    try:
        for _ in range(connections):
            _, client = await asyncio.wait_for(loop.create_connection(lambda: _Client(load), HOST, port), 10.0)
            clients.append(client)
        t0 = time.perf_counter()
        for client in clients:
            client.send()
        load.idle()  # a budget of 0
        try:
            await asyncio.wait_for(asyncio.shield(load.finished), timeout)
        except asyncio.TimeoutError:
            raise LoadError(f"GET {path}: {load.result.ok} of {total} replies within {timeout:g}s") from None
        load.result.elapsed = time.perf_counter() - t0
    finally:
        load.closing = True
        for client in clients:
            if client.transport is not None:
                client.transport.close()
        await asyncio.sleep(0)  # let the transports close before the loop does
    load.result.latencies = load.latencies
    return load.result


def reply_shape(port: int, path: str, check: Callable[[bytes], bool] | None = None) -> Shape:
    """What :func:`closed_loop` will require of every reply to ``path``, read from one reply
    whose body satisfies ``check`` (the reply meant, not an error's): ``(status, length of head
    and body, the head up to its Content-Length line)``. The head's later lines (Date) may vary."""
    async def one() -> Shape:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(request(path))
            buf = bytearray()
            while (parsed := split_reply(buf)) is None or len(buf) < parsed[2]:
                data = await reader.read(1 << 16)
                if not data:
                    raise LoadError(f"GET {path}: connection closed after {len(buf)} bytes")
                buf += data
            status, head, total = parsed
            if len(buf) != total:
                raise LoadError(f"GET {path}: {len(buf) - total} bytes after the reply")
            body = bytes(buf[len(head) + 2:])
            if check is not None and not check(body):
                raise LoadError(f"GET {path}: status {status}, not the reply expected: {body[:200]!r}")
            length = _LENGTH.search(head)
            assert length is not None  # split_reply saw it
            return status, total, head[:length.end() + 2]
        finally:
            writer.close()

    return asyncio.run(one())


def list_of(n: int) -> Callable[[bytes], bool]:
    """A check for :func:`reply_size`: the body is a JSON list of ``n`` VM records."""
    def check(body: bytes) -> bool:
        value = json.loads(body)
        return isinstance(value, list) and len(value) == n and all("vm_id" in v for v in value)

    return check


# --- the floor -----------------------------------------------------------------------------------


async def _floor(host: str, port: int) -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)  # as vmserver's
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0]
    print(f"aiohttp {aiohttp_version()} floor listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_figure")
    sub = parser.add_subparsers(dest="what", required=True)
    floor = sub.add_parser("floor", help="a bare aiohttp app answering OK on GET /")
    floor.add_argument("--host", default=HOST)
    floor.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_floor(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
