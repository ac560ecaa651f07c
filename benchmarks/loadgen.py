"""Load generators: raw non-blocking sockets driven by one selector, so the client stays cheap.

Every generator speaks the protocol for real: it reads the greeting of each connection,
sends requests with integer ids, and counts a reply as a success only when the line parses
as a JSON object whose ``id`` is the one expected and whose ``ok`` is ``true``. A reply with
``ok`` not ``true`` is counted as an error (and a few are kept as samples); a line that is
not JSON, a reply with the wrong id, an event, a closed connection or a deadline passed
raise :class:`LoadError` at once. :meth:`Result.require_all_ok` turns errors into a
:class:`LoadError` too, so a benchmark can never report the speed of failures.

Modes:

- :func:`pipelined`: one connection, ``window`` requests kept in flight.
- :func:`concurrent`: ``connections`` connections, one request in flight on each (a client
  that waits for its reply before sending the next), latency of every request recorded.
- :func:`run_sessions`: a script of requests per session, on fresh connections (connect,
  greeting, the script, close; ``concurrency`` at once) or on connections already open.
- :func:`open_idle`: many connections that only read their greeting.
- :class:`ListReader`: one request whose reply is a very long line, timed to its last byte.
- :func:`burst`: many requests written at once on one connection, timed to the last reply.
- :func:`send_and_never_read`, :func:`send_unterminated`: clients that leave the server holding
  data (replies nobody reads, a line that never ends), for memory figures.
- ``python -m benchmarks.loadgen probe``: an open-loop ``health`` prober run as its own
  process, which sends on a fixed schedule whatever happens and measures each reply from the
  moment its request was due, so a stalled server shows as many late replies, not one.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import selectors
import socket
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
_RECV = 256 * 1024
_ERROR_SAMPLES = 5


class LoadError(Exception):
    """The load could not be generated as asked, or the replies were not what was counted."""


# --- results ------------------------------------------------------------------------------


@dataclass
class Result:
    """What a generator saw. ``latencies`` are seconds, one per reply, in arrival order."""

    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[Any] = field(default_factory=list)
    elapsed: float = 0.0
    latencies: array = field(default_factory=lambda: array("d"))
    session_times: array = field(default_factory=lambda: array("d"))

    @property
    def rate(self) -> float:
        """Successful replies per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def count(self, reply: dict[str, Any]) -> None:
        if reply.get("ok") is True:
            self.ok += 1
        else:
            self.errors += 1
            if len(self.error_samples) < _ERROR_SAMPLES:
                self.error_samples.append(reply.get("error", reply))

    def require_all_ok(self, expected: int | None = None) -> Result:
        """:raises LoadError: any error reply, or fewer successes than ``expected``."""
        if self.errors:
            raise LoadError(f"{self.errors} of {self.requests} replies were errors, e.g. {self.error_samples}")
        if expected is not None and self.ok != expected:
            raise LoadError(f"expected {expected} successful replies, counted {self.ok}")
        return self

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "ok": self.ok, "errors": self.errors,
                               "elapsed_s": self.elapsed, "rate_per_s": self.rate}
        if self.latencies:
            out.update(p50_ms=self.percentile(50) * 1e3, p99_ms=self.percentile(99) * 1e3,
                       max_ms=max(self.latencies) * 1e3)
        return out


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def histogram(values: Iterable[float]) -> list[tuple[float, int]]:
    """Latency histogram in power-of-two buckets: ``[(upper bound in µs, count), ...]``."""
    buckets: dict[int, int] = {}
    for v in values:
        us = max(v * 1e6, 1.0)
        b = math.ceil(math.log2(us))
        buckets[b] = buckets.get(b, 0) + 1
    return [(float(2 ** b), buckets[b]) for b in sorted(buckets)]


# --- one connection -----------------------------------------------------------------------


def request_prefix(cmd: str, args: dict[str, Any] | None) -> bytes:
    """Everything of a request line before its id: append ``b"%d}\\n" % id`` to finish it."""
    head = json.dumps({"cmd": cmd, "args": args} if args else {"cmd": cmd}, separators=(",", ":"))
    return head[:-1].encode() + b',"id":'


def request_line(cmd: str, args: dict[str, Any] | None, rid: int) -> bytes:
    return request_prefix(cmd, args) + b"%d}\n" % rid


_decode = json.JSONDecoder().decode  # straight to the decoder: json.loads' wrappers cost as much


def _parse(line: bytes | bytearray) -> dict[str, Any]:
    try:
        msg = _decode(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoadError(f"reply is not JSON ({exc}): {line[:200]!r}") from None
    if not isinstance(msg, dict):
        raise LoadError(f"reply is not a JSON object: {line[:200]!r}")
    if "event" in msg and "id" not in msg:
        raise LoadError(f"server sent an event during the run: {line[:200]!r}")
    return msg


def _check_greeting(line: bytes) -> dict[str, Any]:
    msg = _parse(line)
    if not isinstance(msg.get("hello"), dict):
        raise LoadError(f"expected a greeting, got {line[:200]!r}")
    return msg


def start_connect(port: int) -> tuple[socket.socket | None, str]:
    """A non-blocking connection to 127.0.0.1:``port`` on its way (TCP_NODELAY), or None and why."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = sock.connect_ex((HOST, port))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        return None, os.strerror(err)
    return sock, ""


def open_connection(port: int, timeout: float = 10.0, linger0: bool = False) -> tuple[socket.socket, bytearray]:
    """A blocking connection to 127.0.0.1:port whose greeting was read and checked.

    Returns the socket and whatever arrived after the greeting.
    """
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if linger0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            if time.monotonic() > deadline:
                raise LoadError("no greeting in time")
            chunk = sock.recv(65536)
            if not chunk:
                raise LoadError(f"connection closed before the greeting: {bytes(buf[:200])!r}")
            buf += chunk
        end = buf.index(b"\n")
        _check_greeting(bytes(buf[:end]))
        del buf[:end + 1]
        return sock, buf
    except BaseException:
        sock.close()
        raise


def pipelined(port: int, cmd: str = "health", args: dict[str, Any] | None = None, total: int = 20000,
              window: int = 64, timeout: float = 120.0) -> Result:
    """``total`` requests on one connection, ``window`` of them always in flight.

    Replies must come back in order: reply k must carry id k.
    """
    prefix = request_prefix(cmd, args)
    lines = [prefix + b"%d}\n" % i for i in range(total)]
    sock, buf = open_connection(port)
    result = Result()
    try:
        sock.settimeout(1.0)
        sent = received = 0
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        while received < total:
            if time.monotonic() > deadline:
                raise LoadError(f"timed out after {timeout}s: {received} of {total} replies")
            if sent < total and sent - received < window:
                upto = min(total, received + window)
                sock.sendall(b"".join(lines[sent:upto]))
                result.requests += upto - sent
                sent = upto
            try:
                chunk = sock.recv(_RECV)
            except socket.timeout:
                continue
            if not chunk:
                raise LoadError(f"connection closed after {received} of {total} replies")
            buf += chunk
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                msg = _parse(buf[start:nl])
                if msg.get("id") != received:
                    raise LoadError(f"reply {received} carries id {msg.get('id')!r}")
                result.count(msg)
                received += 1
                start = nl + 1
            del buf[:start]
        result.elapsed = time.perf_counter() - t0
    except ConnectionError as exc:
        raise LoadError(f"connection error after {result.ok + result.errors} of {total} replies: {exc}") from None
    finally:
        sock.close()
    return result


# --- many connections, one selector -------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "buf", "source", "expect", "sent_at", "opened_at", "greeted", "owned")

    def __init__(self, sock: socket.socket, source: Iterator[Any], owned: bool,
                 greeted: bool, buf: bytearray | None = None) -> None:
        self.sock = sock
        self.buf = buf if buf is not None else bytearray()
        self.source = source
        self.expect: int | None = None  # id of the request in flight
        self.sent_at = 0.0
        self.opened_at = time.perf_counter()
        self.greeted = greeted
        self.owned = owned  # opened by the driver, so closed by it when its script ends


class _Driver:
    """Request/response sessions over many non-blocking sockets; one request in flight per session."""

    def __init__(self, port: int, timeout: float, result: Result) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.result = result
        self.active = 0
        self.next_id = 0

    def start_fresh(self, script: Iterator[Any]) -> None:
        sock, err = start_connect(self.port)
        if sock is None:
            raise LoadError(f"connect failed: {err}")
        conn = _Conn(sock, script, owned=True, greeted=False)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.active += 1

    def start_open(self, sock: socket.socket, buf: bytearray, script: Iterator[Any]) -> None:
        sock.setblocking(False)
        conn = _Conn(sock, script, owned=False, greeted=True, buf=buf)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.active += 1
        self._send_next(conn)

    def _send_next(self, conn: _Conn) -> None:
        item = next(conn.source, None)
        if item is None:
            self._finish(conn)
            return
        rid = self.next_id
        self.next_id += 1
        # An item is (cmd, args), or the bytes of request_prefix(cmd, args) when it repeats.
        data = (item if type(item) is bytes else request_prefix(*item)) + b"%d}\n" % rid
        conn.expect = rid
        conn.sent_at = time.perf_counter()
        try:
            n = conn.sock.send(data)
            if n < len(data):  # never with small requests and an empty send buffer, but be exact
                conn.sock.setblocking(True)
                conn.sock.sendall(data[n:])
                conn.sock.setblocking(False)
        except ConnectionError as exc:
            raise LoadError(f"connection error while sending: {exc}") from None
        self.result.requests += 1

    def _finish(self, conn: _Conn) -> None:
        self.sel.unregister(conn.sock)
        self.active -= 1
        self.result.session_times.append(time.perf_counter() - conn.opened_at)
        if conn.owned:
            conn.sock.close()

    def _on_readable(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionError as exc:
            raise LoadError(f"connection error: {exc}") from None
        if not chunk:
            raise LoadError(f"connection closed by the server (waiting for id {conn.expect})")
        buf = conn.buf
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                return
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            if not conn.greeted:
                _check_greeting(line)
                conn.greeted = True
                self._send_next(conn)
                if conn.expect is None:
                    return
                continue
            now = time.perf_counter()
            msg = _parse(line)
            if conn.expect is None or msg.get("id") != conn.expect:
                raise LoadError(f"unexpected reply (waiting for id {conn.expect}): {line[:200]!r}")
            self.result.latencies.append(now - conn.sent_at)
            self.result.count(msg)
            conn.expect = None
            self._send_next(conn)
            if conn.expect is None:  # its script ended
                return

    def run(self, pending: Iterator[Iterator[Any]] | None = None, concurrency: int = 0) -> None:
        """Until every session has ended; fresh sessions are started from ``pending`` as others end."""
        while True:
            while pending is not None and self.active < concurrency:
                script = next(pending, None)
                if script is None:
                    pending = None
                    break
                self.start_fresh(script)
            if self.active == 0 and pending is None:
                return
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise LoadError(f"timed out after {self.timeout}s with {self.active} sessions unfinished "
                                f"({self.result.ok + self.result.errors} replies so far)")
            for key, _ in self.sel.select(min(left, 1.0)):
                self._on_readable(key.data)

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            if key.data.owned:
                key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


def concurrent(port: int, cmd: str = "health", args: dict[str, Any] | None = None, total: int = 20000,
               connections: int = 50, timeout: float = 120.0) -> Result:
    """``total`` requests spread over ``connections`` connections, each waiting for its reply.

    Connections are opened (greetings read) before the clock starts.
    """
    opened: list[tuple[socket.socket, bytearray]] = []
    try:
        for _ in range(connections):
            opened.append(open_connection(port))
    except BaseException:
        for sock, _ in opened:
            sock.close()
        raise
    budget = iter(range(total))
    prefix = request_prefix(cmd, args)

    def script() -> Iterator[bytes]:
        for _ in budget:  # shared: the connections together send exactly ``total``
            yield prefix

    result = Result()
    driver = _Driver(port, timeout, result)
    try:
        t0 = time.perf_counter()
        for sock, buf in opened:
            driver.start_open(sock, buf, script())
        driver.run()
        result.elapsed = time.perf_counter() - t0
    finally:
        driver.close()
        for sock, _ in opened:
            sock.close()
    result.session_times = array("d")  # not meaningful here
    return result


Script = Sequence[tuple[str, dict[str, Any] | None]]


def run_sessions(port: int, scripts: Sequence[Script], concurrency: int | None = None,
                 opened: Sequence[tuple[socket.socket, bytearray]] | None = None,
                 timeout: float = 120.0) -> Result:
    """Run one script per session; each session waits for a reply before its next request.

    Without ``opened``, each session is a fresh connection: connect, read the greeting, run
    the script, close; at most ``concurrency`` at once (default: all). ``session_times`` then
    covers the whole session, connect to close. With ``opened``, script i runs on
    connection i, which stays open.
    """
    result = Result()
    driver = _Driver(port, timeout, result)
    try:
        t0 = time.perf_counter()
        if opened is None:
            driver.run((iter(s) for s in scripts), concurrency or len(scripts))
        else:
            if len(opened) != len(scripts):
                raise ValueError("one script per open connection")
            for (sock, buf), script in zip(opened, scripts):
                driver.start_open(sock, buf, iter(script))
            driver.run()
        result.elapsed = time.perf_counter() - t0
    finally:
        driver.close()
    return result


def open_idle(port: int, n: int, batch: int = 500, timeout: float = 120.0) -> list[socket.socket]:
    """``n`` connections that have read and checked their greeting, then sit idle.

    Opened ``batch`` at a time (connect all of a batch, then read their greetings) so the
    listen backlog never overflows. The caller closes them.
    """
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        while len(socks) < n:
            if time.monotonic() > deadline:
                raise LoadError(f"timed out after {timeout}s with {len(socks)} of {n} sessions open")
            group = []
            for _ in range(min(batch, n - len(socks))):
                s = socket.create_connection((HOST, port), timeout=30.0)
                group.append(s)
                socks.append(s)
            for s in group:
                buf = b""
                while b"\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise LoadError(f"session {len(socks)} closed before its greeting: {buf[:200]!r}")
                    buf += chunk
                _check_greeting(buf[:buf.index(b"\n")])
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


class ListReader:
    """A connection for requests whose reply is one very long line (a list of a large fleet).

    The receive buffer is allocated (and touched) once and reused, so the client adds no page
    faults or copies to the time it measures. Lines are returned unparsed: parsing never counts
    in the time; check them with :func:`check_list_reply`.
    """

    def __init__(self, port: int, size_hint: int = 1 << 20, timeout: float = 120.0) -> None:
        self.sock, leftover = open_connection(port, timeout=timeout)
        if leftover:
            self.sock.close()
            raise LoadError(f"unexpected data after the greeting: {bytes(leftover[:200])!r}")
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.buf = bytearray(max(size_hint, 1 << 16))

    def fetch(self, cmd: str, rid: int, args: dict[str, Any] | None = None) -> tuple[float, bytes]:
        """Send one request and read its whole reply line.

        Returns (seconds from sending the request to receiving the reply's last byte, the line
        without its newline).
        """
        n = 0
        view = memoryview(self.buf)
        try:
            t0 = time.perf_counter()
            self.sock.sendall(request_line(cmd, args, rid))
            deadline = time.monotonic() + self.timeout
            while True:
                if n == len(self.buf):  # grow (only the first time a list is this long)
                    view.release()
                    self.buf.extend(bytes(len(self.buf)))
                    view = memoryview(self.buf)
                got = self.sock.recv_into(view[n:])
                if not got:
                    raise LoadError(f"connection closed during the {cmd} reply")
                n += got
                if self.buf[n - 1] == 10:  # b"\n": the reply is the only line in flight
                    break
                if time.monotonic() > deadline:
                    raise LoadError(f"{cmd} reply not complete after {self.timeout}s")
            elapsed = time.perf_counter() - t0
            line = bytes(view[:n - 1])
        finally:
            view.release()
        if b"\n" in line:
            raise LoadError(f"expected exactly one reply line to {cmd}")
        return elapsed, line

    def close(self) -> None:
        self.sock.close()


def check_list_reply(line: bytes, rid: int, expected_len: int) -> int:
    """:raises LoadError: unless the line is ``ok`` with id ``rid`` and a list of ``expected_len``."""
    msg = _parse(line)
    if msg.get("id") != rid or msg.get("ok") is not True:
        raise LoadError(f"list reply not ok or wrong id: {line[:300]!r}")
    result = msg.get("result")
    if not isinstance(result, list) or len(result) != expected_len:
        got = len(result) if isinstance(result, list) else type(result).__name__
        raise LoadError(f"expected a list of {expected_len}, got {got}")
    return len(result)


# --- bursts and clients that do not read ------------------------------------------------------


def burst(port: int, data: bytes, replies: int, timeout: float = 120.0) -> tuple[float, float, bytes]:
    """Write ``data`` (many request lines) on a new connection as fast as the socket takes it,
    reading meanwhile, until ``replies`` lines have come back.

    Returns (``time.monotonic()`` before the first byte was sent, when the last reply line was
    complete, the reply lines). Reading while writing keeps the server from waiting on us: a
    large burst is then limited by the server alone. Check the lines afterwards, untimed.
    """
    sock, buf = open_connection(port, timeout=timeout)
    sel = selectors.DefaultSelector()
    try:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        view = memoryview(data)
        got = bytearray(buf)
        lines = got.count(b"\n")
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        while lines < replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadError(f"burst: {lines} of {replies} replies after {timeout}s")
            for _, mask in sel.select(min(left, 1.0)):
                if mask & selectors.EVENT_WRITE and view:
                    try:
                        view = view[sock.send(view):]
                    except BlockingIOError:
                        pass
                    if not view:
                        sel.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(_RECV)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise LoadError(f"burst: connection closed after {lines} of {replies} replies")
                    lines += chunk.count(b"\n")
                    got += chunk
        t1 = time.monotonic()
    except ConnectionError as exc:
        raise LoadError(f"burst: connection error: {exc}") from None
    finally:
        sel.close()
        sock.close()
    return t0, t1, bytes(got)


def check_burst(data: bytes, replies: int, result: Callable[[Any], bool]) -> None:
    """:raises LoadError: unless ``data`` is exactly the replies to ids 0..replies-1, in order,
    each ``ok`` with a result for which ``result`` is true."""
    lines = data.split(b"\n")
    if lines[-1] != b"" or len(lines) != replies + 1:
        raise LoadError(f"burst: expected {replies} reply lines, got {len(lines) - 1}")
    for rid, line in enumerate(lines[:-1]):
        msg = _parse(line)
        if msg.get("id") != rid or msg.get("ok") is not True or not result(msg.get("result")):
            raise LoadError(f"burst: reply {rid} is not the expected one: {line[:200]!r}")


_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info (Linux)


def closed_by_peer(sock: socket.socket) -> bool:
    """Has the server closed (or reset) this connection? Read from the kernel's TCP state, so
    nothing waiting to be read is consumed or waited for."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED
    except OSError:
        return True


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD): what the server has sent us."""
    import fcntl
    import termios

    out = array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, out)
    return out[0]


def send_and_never_read(port: int, n: int, line: bytes, timeout: float = 120.0) -> list[socket.socket]:
    """``n`` connections, each sending ``line`` once and then reading nothing. The caller closes them."""
    socks = [open_connection(port, timeout=timeout)[0] for _ in range(n)] if n else []
    try:
        for sock in socks:
            sock.sendall(line)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def send_unterminated(port: int, n: int, size: int, timeout: float = 120.0) -> tuple[list[socket.socket], int]:
    """``n`` connections, each sending ``size`` bytes with no newline (one line never finished).

    All are written to at once, as fast as the server reads. Returns the sockets still open and
    how many the server closed (or reset) meanwhile. The caller closes the sockets.
    """
    socks = []
    try:
        for _ in range(n):
            socks.append(open_connection(port, timeout=timeout)[0])
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    payload = memoryview(b"x" * size)
    sel = selectors.DefaultSelector()
    left = {}
    closed = 0
    try:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_WRITE)
            left[sock] = payload
        deadline = time.monotonic() + timeout
        while left:
            if time.monotonic() > deadline:
                raise LoadError(f"unterminated lines: {len(left)} of {n} connections still sending after {timeout}s")
            for key, _ in sel.select(1.0):
                sock = key.fileobj
                try:
                    rest = left[sock][sock.send(left[sock]):]  # type: ignore[index, union-attr]
                except BlockingIOError:
                    continue
                except OSError:  # the server hung up on this one
                    closed += 1
                    sel.unregister(sock)
                    del left[sock]  # type: ignore[arg-type]
                    sock.close()  # type: ignore[union-attr]
                    continue
                if rest:
                    left[sock] = rest  # type: ignore[index]
                else:
                    sel.unregister(sock)
                    del left[sock]  # type: ignore[arg-type]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    finally:
        sel.close()
    return [s for s in socks if s.fileno() != -1], closed


# --- the open-loop prober (its own process) -----------------------------------------------


def probe(port: int, interval: float, max_seconds: float, stop: Callable[[], bool],
          on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Send ``health`` every ``interval`` seconds on one connection, whatever comes back.

    Latency is measured from when a request was due (not when it was sent), so a server
    that stalls for a second shows a second's worth of late replies. Returns
    ``{"samples": [[due_monotonic, latency_s], ...], "ok": n, "errors": n}``.
    """
    sock, buf = open_connection(port)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    if on_ready is not None:
        on_ready()
    due: dict[int, float] = {}
    samples: list[list[float]] = []
    result = Result()
    t0 = time.monotonic()
    k = 0
    stopping_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            if stopping_at is None and (stop() or now - t0 > max_seconds):
                stopping_at = now
            if stopping_at is not None and (not due or now - stopping_at > 30.0):
                break
            if stopping_at is None:
                while t0 + k * interval <= now:  # catch up on every request that fell due
                    due[k] = t0 + k * interval
                    data = request_line("health", None, k)
                    sock.setblocking(True)
                    sock.sendall(data)
                    sock.setblocking(False)
                    result.requests += 1
                    k += 1
                wait = max(0.0, t0 + k * interval - time.monotonic())
            else:
                wait = 0.05
            if sel.select(wait):
                try:
                    chunk = sock.recv(_RECV)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise LoadError("prober: connection closed")
                buf += chunk
                arrived = time.monotonic()
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    msg = _parse(bytes(buf[:nl]))
                    del buf[:nl + 1]
                    when = due.pop(msg.get("id"), None)  # type: ignore[arg-type]
                    if when is None:
                        raise LoadError(f"prober: reply to an unknown id {msg.get('id')!r}")
                    result.count(msg)
                    samples.append([when, arrived - when])
    finally:
        sel.close()
        sock.close()
    return {"samples": samples, "ok": result.ok, "errors": result.errors, "unanswered": len(due),
            "error_samples": result.error_samples}


def _stdin_closed() -> Callable[[], bool]:
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.buffer, selectors.EVENT_READ)

    def check() -> bool:
        return bool(sel.select(0))  # readable means a line or EOF: either way, stop

    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("probe", help="open-loop health prober; stops when stdin is closed or written to")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.005, help="seconds between requests (default 0.005)")
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    # "ready" once connected, before the schedule starts, so the caller knows when to begin.
    out = probe(args.port, args.interval, args.max_seconds, _stdin_closed(),
                on_ready=lambda: print("ready", flush=True))
    json.dump(out, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
