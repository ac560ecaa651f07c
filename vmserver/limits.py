"""Open-file descriptors: how many sessions fit, and what happens when they run out.

Every session is a descriptor, and so is every connection the server refuses (it must accept
one to tell it "unavailable"). The cap on sessions therefore always leaves descriptors to
spare, and a listening socket that runs out anyway refuses what waits instead of spinning.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Kept out of the session cap: the database and its WAL, the lock, logs, the event loop's own
# descriptors, password-hashing threads, refusals in flight, and the spare below.
FD_RESERVE = 128
DEFAULT_CAP_MAX = 100_000  # the default cap when the descriptor limit is larger still
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return _finite(soft)


def fd_limit() -> int:
    return _finite(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _finite(limit: int) -> int:
    return 1 << 20 if limit == resource.RLIM_INFINITY else limit


def session_cap(wanted: int | None, reserve: int, limit: int) -> tuple[int, str | None]:
    """The sessions to serve at most (``wanted``, or by default what the descriptors allow, up
    to DEFAULT_CAP_MAX), and a warning when ``wanted`` had to be lowered to fit ``limit``."""
    room = max(1, limit - FD_RESERVE - reserve)
    if wanted is None:
        return min(room, DEFAULT_CAP_MAX), None
    if wanted > room:
        return room, (f"--max-connections {wanted} and --local-reserve {reserve} do not fit the open-file "
                      f"limit {limit} (with {FD_RESERVE} kept for the server itself): serving at most {room} "
                      "sessions; raise the limit (ulimit -n, LimitNOFILE=) for more")
    return wanted, None


class Listener(socket.socket):
    """A listening socket that, out of descriptors, refuses the connections waiting instead of
    failing its accept.

    asyncio's accept loop logs and retries each failed accept in a tight loop (thousands of
    tracebacks a second, at full CPU) and leaves waiting clients hanging without an answer.
    Here one spare descriptor is kept open: when accept fails for lack of descriptors, the
    spare is closed, each waiting connection is accepted with it, told ``refusal`` and closed,
    and the spare is taken again; asyncio sees an empty queue.
    """

    refusal = b""
    on_refused: Callable[[int], None] | None = None  # how many were refused (for a rate-limited log)
    _spare: int | None = None
    _queue = 0  # the kernel's accept queue, as first asked for

    def listen(self, backlog: int = 128) -> None:
        """asyncio listens again with the backlog it was given, which for it is also how many
        connections it accepts in one go: keep the kernel's queue long however short that is."""
        self._queue = max(self._queue, backlog)
        super().listen(self._queue)

    def keep_spare(self) -> None:
        if self._spare is None:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._spare = None

    def accept(self) -> tuple[socket.socket, object]:
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
        refused = self._refuse_waiting()
        if self.on_refused is not None and refused:
            self.on_refused(refused)
        raise BlockingIOError(errno.EAGAIN, "out of descriptors: waiting connections were refused")

    def _refuse_waiting(self, most: int = 1024) -> int:
        if self._spare is None:
            self.keep_spare()  # perhaps a descriptor came free since
            return 0
        os.close(self._spare)
        self._spare = None
        refused = 0
        try:
            while refused < most:
                try:
                    fd, _ = self._accept()  # the raw accept: a descriptor, no socket object yet
                except OSError:
                    break
                try:
                    os.write(fd, self.refusal)  # a fresh socket's buffer takes a short line at once
                except OSError:
                    pass
                finally:
                    os.close(fd)
                refused += 1
        finally:
            self.keep_spare()
        return refused

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        super().close()


def listeners(host: str, port: int, backlog: int) -> list[Listener]:
    """Bound, listening sockets for ``host`` (every address it names, as asyncio would).

    :raises OSError: the address cannot be resolved or bound.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[Listener] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            address = (address[0], port, *address[2:])
            sock = Listener(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: "
                                         f"{exc.strerror.lower() if exc.strerror else exc}") from None
            if port == 0 and len(out) == 1:
                port = sock.getsockname()[1]  # one free port for every address
            sock.listen(backlog)
            sock.setblocking(False)
            sock.keep_spare()
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


async def serve(host: str, port: int, backlog: int, refusal: bytes, on_refused: Callable[[int], None],
                start: Callable[[Listener], Awaitable[asyncio.Server]]) -> list[asyncio.Server]:
    """Listen on every address of ``host``:``port``: ``start(sock)`` serves each listener, which
    answers ``refusal`` to waiting clients when out of descriptors (counted by ``on_refused``).
    If any fails, every one is closed again. :raises OSError: the address cannot be bound."""
    socks = listeners(host, port, backlog)
    servers: list[asyncio.Server] = []
    try:
        for sock in socks:
            sock.refusal, sock.on_refused = refusal, on_refused
            servers.append(await start(sock))
    except BaseException:
        for server in servers:
            server.close()
        for sock in socks[len(servers):]:
            sock.close()
        raise
    return servers
