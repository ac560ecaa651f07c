"""Open-file descriptors: the session cap leaves descriptors to spare, a server that runs out
anyway refuses what waits instead of spinning, and every refused peer is told so.

Servers run as subprocesses under a small RLIMIT_NOFILE (this process keeps its own limit).
Clients are raw sockets on 127.0.0.1; hundreds at once are watched by one selector, and every
wait is bounded: a connection that is neither greeted nor refused is reported as hung.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from vmserver.config import Config

HOST = "127.0.0.1"
ANSWER_WITHIN = 5.0  # seconds a single connection may wait for its first line
_REFUSED_LOG = re.compile(rb"refused \d+ connection")


# --- clients ----------------------------------------------------------------------------------


@dataclass
class Burst:
    greeted: list[socket.socket] = field(default_factory=list)  # still open
    refused: list[dict] = field(default_factory=list)  # the one line each got before EOF
    wrong: list[str] = field(default_factory=list)  # anything else: what it got
    hung: int = 0  # neither greeted nor ended in time

    def close(self) -> None:
        for s in self.greeted:
            s.close()


def watch(port: int, count: int, decide: Callable[[socket.socket, bytes, str | None], bool], send: bytes = b"",
          timeout: float = 20.0) -> int:
    """Open ``count`` connections at once (each sends ``send`` first, when given) and read each
    until ``decide(sock, what it got, how it ended)`` says it is done: the end is None while
    the connection is open, "EOF", or the error that ended it; ``decide`` keeps or closes the
    socket. A connection that fails is decided at once. Returns how many hung (undecided in time)."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, bytearray] = {}

    def done(s: socket.socket) -> None:
        sel.unregister(s)
        del pending[s]

    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex((HOST, port))
            if err not in (0, errno.EINPROGRESS):
                decide(s, b"", f"connect: {os.strerror(err)}")
                continue
            sel.register(s, selectors.EVENT_WRITE if send else selectors.EVENT_READ)
            pending[s] = bytearray()
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, events in sel.select(min(left, 0.5)):
                s = key.fileobj  # type: ignore[assignment]
                if events & selectors.EVENT_WRITE:
                    with contextlib.suppress(OSError):  # refused before we wrote: its reply is read next
                        s.send(send)
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                buf = pending[s]
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    chunk, end = b"", repr(exc)
                else:
                    end = None if chunk else "EOF"
                buf += chunk
                if decide(s, bytes(buf), end) or end is not None:
                    done(s)
        return len(pending)
    finally:
        for s in list(pending):
            s.close()
        sel.close()


def burst(port: int, count: int, timeout: float = 20.0) -> Burst:
    """Open ``count`` connections at once and watch each to its end: the greeting (left open),
    or exactly one error line then EOF."""
    out = Burst()

    def decide(s: socket.socket, got: bytes, end: str | None) -> bool:
        first, newline, rest = got.partition(b"\n")
        if newline and b'"hello"' in first:
            out.greeted.append(s)
            return True
        if end is None:
            return False
        s.close()
        if end != "EOF":
            out.wrong.append(f"{end} after {got[:200]!r}")
        elif not newline or rest:
            out.wrong.append(f"EOF after {got[:200]!r}: not exactly one line")
        else:
            out.refused.append(json.loads(first))
        return True

    out.hung = watch(port, count, decide, timeout=timeout)
    return out


def first_line(s: socket.socket) -> tuple[bytes, bytes]:
    """The first line from ``s`` (no newline) and what followed it; fails if none comes in time."""
    s.settimeout(ANSWER_WITHIN)
    buf = b""
    try:
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"EOF before a whole line: {buf[:200]!r}")
            buf += chunk
    except socket.timeout:
        raise AssertionError(f"no answer within {ANSWER_WITHIN:g}s (got {buf[:200]!r})") from None
    line, _, rest = buf.partition(b"\n")
    return line, rest


def until_eof(s: socket.socket, rest: bytes = b"") -> bytes:
    s.settimeout(ANSWER_WITHIN)
    while chunk := s.recv(65536):
        rest += chunk
    return rest


def health(s: socket.socket) -> dict:
    s.sendall(b'{"id":"h","cmd":"health"}\n')
    return json.loads(first_line(s)[0])


def fill(port: int, held: list[socket.socket], most: int = 5000) -> dict:
    """Open sessions one at a time (into ``held``) until the server refuses one: its one line,
    checked to be followed by EOF."""
    while len(held) < most:
        s = socket.create_connection((HOST, port), timeout=ANSWER_WITHIN)
        try:
            line, rest = first_line(s)
        except AssertionError as exc:
            s.close()
            raise AssertionError(f"connection {len(held) + 1}: {exc}") from None
        if b'"hello"' in line:
            held.append(s)
            continue
        try:
            assert until_eof(s, rest) == b"", f"more than one line after {line!r}"
        finally:
            s.close()
        return json.loads(line)
    raise AssertionError(f"{most} sessions and no refusal")


def health_once_released(port: int, timeout: float = 10.0) -> dict:
    """A new session's health reply, once the server has room again (it releases in the background)."""
    end = time.monotonic() + timeout
    while True:
        with socket.create_connection((HOST, port), timeout=ANSWER_WITHIN) as s:
            line, _ = first_line(s)
            if b'"hello"' in line:
                return health(s)
        if time.monotonic() > end:
            raise AssertionError(f"still refused {timeout:g}s after every session closed: {line!r}")
        time.sleep(0.1)


def unavailable(message: dict) -> bool:
    return (message.get("ok") is False and message.get("id") is None
            and message.get("error", {}).get("code") == "unavailable" and bool(message["error"].get("message")))


def cap_warnings(log: bytes, wanted: int) -> list[int]:
    """The caps named by 'the cap was lowered' warnings about ``--max-connections wanted``."""
    pattern = rb"WARNING [\w.]+: --max-connections " + str(wanted).encode() + rb"\b.*serving at most (\d+) sessions"
    return [int(n) for n in re.findall(pattern, log)]


# --- 16: out of descriptors -------------------------------------------------------------------


@pytest.mark.parametrize("nofile, count", [((256, 256), 400), ((256, 1024), 1100)],
                         ids=["hard-256", "soft-256-hard-1024"])
def test_a_cap_over_the_limit_is_lowered_and_every_connection_is_answered(limited, nofile, count):
    """--max-connections 10000 under a small open-file limit: the soft limit is lifted to the
    hard one and one warning lowers the cap to fit; ``count`` connections at once each get the
    greeting or one `unavailable` line then EOF, none hangs; accept() never spins, refusals are
    logged once, and the server still serves and stops cleanly."""
    srv = limited("--max-connections", "10000", nofile=nofile)
    port = srv.wait_listening()
    out = burst(port, count)
    greeted = len(out.greeted)
    try:
        assert out.hung == 0 and not out.wrong, (
            f"{out.hung} hung, {len(out.wrong)} wrong (e.g. {out.wrong[:3]}); {greeted} greeted, "
            f"{len(out.refused)} refused; log has {srv.log_bytes} bytes: {srv.log[:600].decode(errors='replace')}")
        assert greeted + len(out.refused) == count
        assert all(unavailable(m) for m in out.refused), [m for m in out.refused if not unavailable(m)][:3]
        assert health(out.greeted[0])["ok"] is True
    finally:
        out.close()
    assert health_once_released(port)["ok"] is True
    assert srv.stop() == 0
    log = srv.log
    assert b"out of system resource" not in log
    assert len(_REFUSED_LOG.findall(log)) <= 3, "refusals are logged at most once per 10 s"
    from vmserver import limits  # (new with the fix)

    reserve = Config().local_reserve
    cap = nofile[1] - limits.FD_RESERVE - reserve
    assert cap_warnings(log, 10000) == [cap], log.decode(errors="replace")
    assert greeted == cap + reserve, "the cap and the local seats, all taken (every test peer is loopback)"
    reasons = sorted({m["error"]["message"] for m in out.refused})
    print(f"\nDESCRIPTORS limit={nofile} cap={cap} greeted={greeted} refused={len(out.refused)} messages={reasons}")


def test_listener_out_of_descriptors_refuses_what_waits(tmp_path):
    """In-process: with every descriptor of this process taken, accept() refuses the waiting
    connections through its spare descriptor (each reads the refusal, then EOF) and reports
    'nothing to accept'; once descriptors are free, accept works again."""
    from vmserver import limits  # (new with the fix)

    refusal = b'{"id":null,"ok":false,"error":{"code":"unavailable","message":"out of descriptors"}}\n'
    (listener,) = limits.listeners(HOST, 0, 100)
    counted: list[int] = []
    listener.refusal, listener.on_refused = refusal, counted.append
    port = listener.getsockname()[1]
    clients = [socket.create_connection((HOST, port), timeout=ANSWER_WITHIN) for _ in range(3)]
    hog: list[int] = []
    try:
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno in (errno.EMFILE, errno.ENFILE), exc
        with pytest.raises(BlockingIOError):
            listener.accept()
        got = [until_eof(c) for c in clients]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing waits now: still no spinning, nothing refused
    finally:
        for fd in hog:
            os.close(fd)
        for c in clients:
            c.close()
    try:
        assert got == [refusal] * 3
        assert counted == [3]
        with socket.create_connection((HOST, port), timeout=ANSWER_WITHIN) as late:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"welcome\n")
                assert first_line(late)[0] == b"welcome"
    finally:
        listener.close()


# --- 21: the default cap, and seats for this machine -------------------------------------------


def test_default_cap_follows_the_descriptor_limit(limited):
    """RLIMIT_NOFILE 300 and no --max-connections: the server fills to the cap the descriptors
    allow plus the local seats (every test peer is loopback), then refuses with one line."""
    srv = limited(nofile=(300, 300))
    port = srv.wait_listening()
    held: list[socket.socket] = []
    try:
        refusal = fill(port, held, most=400)
        from vmserver import limits  # (new with the fix)

        reserve = Config().local_reserve
        cap = 300 - limits.FD_RESERVE - reserve
        assert len(held) == cap + reserve
        assert unavailable(refusal), refusal
        assert f"limit {cap}" in refusal["error"]["message"]
        assert health(held[0])["ok"] is True and health(held[-1])["ok"] is True
    finally:
        for s in held:
            s.close()
    assert srv.stop() == 0
    assert b"do not fit" not in srv.log and b"out of system resource" not in srv.log
    print(f"\nDESCRIPTORS default cap at limit 300: {len(held)} sessions")


@pytest.mark.parametrize("reserve", [None, "0", "3"])
def test_local_reserve_seats_past_the_cap(limited, reserve):
    """--max-connections 20: 20 sessions plus --local-reserve more (default Config().local_reserve)
    from loopback; the next one is refused."""
    srv = limited("--max-connections", "20", *(() if reserve is None else ("--local-reserve", reserve)))
    port = srv.wait_listening()
    held: list[socket.socket] = []
    try:
        refusal = fill(port, held, most=200)
        assert reserve == "0" or len(held) > 20, "seats past the cap for this machine's peers"
        assert len(held) == 20 + (Config().local_reserve if reserve is None else int(reserve))
        assert unavailable(refusal), refusal
        assert "limit 20" in refusal["error"]["message"]
    finally:
        for s in held:
            s.close()
    assert health_once_released(port)["ok"] is True
    assert srv.stop() == 0


def test_help_describes_the_cap_and_the_reserve():
    r = subprocess.run([sys.executable, "-m", "vmserver", "--help"], capture_output=True, timeout=30)
    assert r.returncode == 0
    out = " ".join(r.stdout.decode().split())  # argparse wraps its lines
    assert "--max-connections" in out and "--local-reserve" in out
    assert "open-file limit" in out, "the default cap follows from the descriptor limit"


# --- the HTTP port shares the cap -------------------------------------------------------------


def http_burst(port: int, count: int, timeout: float = 20.0) -> tuple[int, list[bytes], list[str], int]:
    """``count`` HTTP connections at once, each sending GET /health: (answered 200, the whole
    replies of the refused (503 then EOF), anything else, hung)."""
    refused: list[bytes] = []
    wrong: list[str] = []
    kept: list[socket.socket] = []  # answered 200, held open: each keeps its seat

    def decide(s: socket.socket, got: bytes, end: str | None) -> bool:
        if got.startswith(b"HTTP/1.1 200") and got.endswith(b"OK"):
            kept.append(s)
            return True
        if end is None:
            return False
        s.close()
        if got.startswith(b"HTTP/1.1 503"):
            refused.append(got)
        else:
            wrong.append(got[:200].decode(errors="replace") or end)
        return True

    try:
        hung = watch(port, count, decide, send=b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n", timeout=timeout)
        return len(kept), refused, wrong, hung
    finally:
        for s in kept:
            s.close()


def test_http_connections_share_the_cap_under_a_small_descriptor_limit(limited):
    """RLIMIT_NOFILE 256, --http-port, 400 HTTP connections at once: each is answered 200 or
    refused with one 503 reply (our error body) then EOF; none hangs; the server serves after."""
    srv = limited("--http-port", "0", nofile=(256, 256))
    srv.wait_listening()
    deadline = time.monotonic() + 20
    while (found := re.search(rb"HTTP API on http://127\.0\.0\.1:(\d+)", srv.log)) is None:
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log.decode(errors="replace")
        time.sleep(0.02)
    port = int(found.group(1))
    ok, refused, wrong, hung = http_burst(port, 400)
    assert hung == 0 and not wrong, (hung, wrong[:3])
    from vmserver import limits

    cap = 256 - limits.FD_RESERVE - Config().local_reserve
    assert ok == cap + Config().local_reserve and ok + len(refused) == 400
    assert all(b'"code":"unavailable"' in r and b"Connection: close" in r for r in refused), refused[:1]
    with socket.create_connection((HOST, port), timeout=ANSWER_WITHIN) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert until_eof(s).startswith(b"HTTP/1.1 200")
    assert srv.stop() == 0
    assert b"out of system resource" not in srv.log
