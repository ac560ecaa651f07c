"""The network layer: accept loop, one task per session reading lines and writing replies, shutdown.

A session answers its requests strictly in order (pipelining works). Between commands it
can be stopped; inside one it is not: shutdown waits for the command in flight. Limits that
keep a long-running server healthy live here too: the line limit, a cap on connections,
idle and write timeouts, TCP keepalive, and the refusal of HTTP spoken to this port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any

from . import __version__
from .commands import COMMANDS, Context, Reply, execute
from .config import Config
from .errors import ErrorCode
from .inventory import Inventory
from .protocol import (
    RequestError, dumps, encode_error, encode_event, encode_greeting, looks_like_http, parse_line,
)
from .store import Store, StoreError

log = logging.getLogger(__name__)

_TOO_LARGE = object()  # read_line's answer for an over-long line (already discarded)
_BACKLOG = 4096  # a fleet reconnecting at once must not overflow asyncio's default of 100
_WRITE_HIGH_WATER = 256 * 1024  # past this much unsent output, stop reading until the peer reads
_SLICE = 256 * 1024  # a large reply is written this much at a time
_LINGER = 1.0  # seconds a closing session's unread input may take to drain
_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 15, "TCP_KEEPCNT": 4}  # a dead peer is noticed in ~2 min

SHUTDOWN = "server shutdown"
IDLE = "idle timeout"
_DISCONNECT_REASONS = {SHUTDOWN: "shutdown", IDLE: "timeout"}  # vm_disconnected's reason; else session_closed
EVENT_QUEUE_MAX = 1000  # events held for one subscriber before the oldest are dropped


class Subscription:
    """What a session asked to hear, and the events waiting to be written to it.

    Bounded: a subscriber that does not read loses the oldest events, and is told how many.
    """

    __slots__ = ("events", "vm_id", "queue", "dropped", "wakeup")

    def __init__(self, events: frozenset[str], vm_id: str | None) -> None:
        self.events, self.vm_id = events, vm_id
        self.queue: deque[bytes] = deque()
        self.dropped = 0
        self.wakeup = asyncio.Event()

    def push(self, line: bytes) -> None:
        if len(self.queue) >= EVENT_QUEUE_MAX:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(line)
        self.wakeup.set()


class Session:
    """One client connection; ``vms`` are the VMs it has connected (bound to its lifetime)."""

    __slots__ = ("name", "vms", "task", "busy", "last_active", "stop_reason", "authenticated", "ended",
                 "subscription", "pump", "writing", "_server", "_writer")

    def __init__(self, name: str, task: asyncio.Task[Any] | None, authenticated: bool = True,
                 server: Server | None = None, writer: asyncio.StreamWriter | None = None) -> None:
        self.name = name
        self.vms: set[str] = set()
        self.task = task
        self.busy = False  # True while a command runs: nobody may interrupt it
        self.last_active = time.monotonic()
        self.stop_reason: str | None = None  # why the server cancelled it, if it did
        self.authenticated = authenticated
        self.ended = False  # set when its VMs are released: nothing may be bound to it after
        self.subscription: Subscription | None = None
        self.pump: asyncio.Task[None] | None = None  # writes this session's events
        self.writing = False  # a large reply is going out in slices: no event may cut into it
        self._server, self._writer = server, writer

    def subscribe(self, events: frozenset[str], vm_id: str | None) -> None:
        """Start (or change) this session's live events."""
        assert self._server is not None and self._writer is not None
        previous, self.subscription = self.subscription, Subscription(events, vm_id)
        if previous is not None:
            previous.wakeup.set()  # the pump is waiting on the old one: let it move on
        self._server.subscribers.add(self)
        if self.pump is None:
            self.pump = asyncio.get_running_loop().create_task(self._server._pump(self, self._writer))

    def unsubscribe(self) -> None:
        """Stop live events; those not yet written are dropped."""
        self.subscription = None
        if self._server is not None:
            self._server.subscribers.discard(self)
        if self.pump is not None:
            self.pump.cancel()
            self.pump = None

    def __repr__(self) -> str:
        return f"<Session {self.name}>"


class TLSConfigError(Exception):
    """The TLS certificate or key cannot be used; the message names the files."""


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None without --tls-cert. :raises TLSConfigError:"""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else str(exc)
        raise TLSConfigError(
            f"TLS certificate {config.tls_cert} or key {config.tls_key} unusable: {reason}") from exc
    return context


def _tune_socket(sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Keepalive: a VM host that vanished without a FIN must not keep its VMs "connected".
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE.items():
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Server:
    def __init__(self, config: Config, inventory: Inventory) -> None:
        self.config = config
        self.inventory = inventory
        self.context = Context(inventory, config)
        self.sessions: set[Session] = set()
        self.subscribers: set[Session] = set()
        inventory.listeners.append(self._publish)
        self._pruner: asyncio.Task[None] | None = None
        self._refused, self._refused_logged = 0, -10.0  # connections refused over the cap, not yet logged
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._greeting = encode_greeting(__version__, list(COMMANDS), auth_required=config.token is not None)

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        """Listen (with TLS when given a context). :raises OSError: address in use."""
        # The reader's limit allows the longest line plus a '\r'; longer lines are cut by us.
        self._server = await asyncio.start_server(
            self._serve, self.config.host, self.config.port, limit=self.config.max_line + 1,
            backlog=_BACKLOG, ssl=tls, ssl_handshake_timeout=10.0 if tls else None)
        if self.config.idle_timeout > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle())
        if self.config.history_days > 0:
            self._pruner = asyncio.get_running_loop().create_task(self._prune_history())

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound, so port 0 can be read back."""
        assert self._server is not None, "start() first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        """Stop listening, let commands in flight finish, say goodbye to every session, close them."""
        if self._closing:
            return
        self._closing = True
        for task in (self._sweeper, self._pruner):
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close()
        tasks = [s.task for s in self.sessions if s.task is not None]
        for session in list(self.sessions):
            if not session.busy:
                self._stop(session, SHUTDOWN)  # it is waiting for input: nothing is lost
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_grace)
            for task in pending:
                log.warning("a session did not finish within %.1fs of shutdown; cutting it off",
                            self.config.shutdown_grace)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()

    @staticmethod
    def _stop(session: Session, reason: str) -> None:
        session.stop_reason = reason
        if session.task is not None:
            session.task.cancel()

    async def _sweep_idle(self) -> None:
        """Close sessions that sent nothing for idle_timeout seconds (one timer for all of them)."""
        limit = self.config.idle_timeout
        period = min(max(limit / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - limit
            for session in list(self.sessions):
                # A subscriber may rightly listen for hours without a word; keepalive covers it.
                if (not session.busy and session.stop_reason is None and session.subscription is None
                        and session.last_active < cutoff):
                    self._stop(session, IDLE)

    async def _prune_history(self) -> None:
        """Drop history older than --history-days: at start, then every hour."""
        keep = self.config.history_days * 86400
        while True:
            cutoff = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - keep))
            try:
                pruned = await self.inventory.prune_history(cutoff)
                if pruned:
                    log.info("history: pruned %d events older than %s", pruned, cutoff)
            except StoreError as exc:
                log.error("history pruning failed: %s", exc)
            await asyncio.sleep(3600)

    # --- live events ------------------------------------------------------------------

    def _publish(self, event: str, vm: Any, reason: str | None) -> None:
        """An inventory change: queue its event line for every session subscribed to it."""
        if not self.subscribers:
            return
        line = None
        for session in self.subscribers:
            sub = session.subscription
            if sub is None or event not in sub.events or (sub.vm_id is not None and sub.vm_id != vm.vm_id):
                continue
            if line is None:
                data = vm.json()
                if reason is not None:  # the record plus why: {"...":...,"reason":"request"}
                    key = b"command" if event == "auth_failed" else b"reason"
                    data = data[:-1] + b',"' + key + b'":' + dumps(reason) + b"}"
                line = encode_event(event, data)
            sub.push(line)

    async def _pump(self, session: Session, writer: asyncio.StreamWriter) -> None:
        """Write a session's events between its reply lines, never faster than it reads."""
        try:
            while session.subscription is not None:
                sub = session.subscription
                await sub.wakeup.wait()
                sub.wakeup.clear()
                while (sub.queue or sub.dropped) and not session.writing and session.subscription is sub:
                    if writer.transport.is_closing():
                        return
                    if sub.dropped:
                        writer.write(encode_event("overflow", {"dropped": sub.dropped}))
                        sub.dropped = 0
                    if sub.queue:
                        writer.write(sub.queue.popleft())
                    if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                        await writer.drain()  # a slow reader: meanwhile its queue fills, then drops
        except (ConnectionError, OSError):
            pass

    # --- one session ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._closing:
            writer.transport.abort()
            return
        if len(self.sessions) >= self.config.max_connections:
            self._refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= 10.0:  # a flood of refusals is one log line per 10 s
                log.warning("refused %d connection(s), the last from %s: already %d sessions (--max-connections)",
                            self._refused, name, len(self.sessions))
                self._refused, self._refused_logged = 0, now
            writer.write(encode_error(None, ErrorCode.UNAVAILABLE,
                                      f"too many connections (limit {self.config.max_connections}); try again later"))
            await self._hang_up(writer, shutdown=False)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _tune_socket(sock)
        session = Session(name, asyncio.current_task(), authenticated=self.config.token is None,
                          server=self, writer=writer)
        self.sessions.add(session)
        log.debug("session %s opened", name)
        reason = "closed by peer"
        try:
            writer.write(self._greeting)
            while not self._closing:
                line = await self._read_line(reader)
                if line is None:
                    break
                session.last_active = time.monotonic()
                if line is not _TOO_LARGE and looks_like_http(line):  # type: ignore[arg-type]
                    writer.write(encode_error(None, ErrorCode.BAD_REQUEST,
                                              "this port speaks line-delimited JSON (see protocol.md), not HTTP"))
                    reason = "HTTP request refused"
                    break
                session.busy = True
                reply = self._respond(session, line)
                if reply is not None and type(reply) is not bytes and type(reply) is not tuple:
                    reply = await reply  # type: ignore[misc]
                session.busy = False
                if reply is not None:
                    if writer.transport.is_closing():
                        break  # the peer is gone; nobody to answer
                    if type(reply) is bytes:
                        writer.write(reply)
                    else:
                        session.writing = True
                        try:
                            await self._write_pieces(writer, reply)  # type: ignore[arg-type]
                        finally:
                            session.writing = False
                            if session.subscription is not None:
                                session.subscription.wakeup.set()  # events held back meanwhile
                    await self._backpressure(writer)
            if self._closing:
                reason = SHUTDOWN
        except asyncio.CancelledError:
            if session.stop_reason is None:
                raise
            reason = session.stop_reason
        except asyncio.TimeoutError:
            reason = f"replies unread for {self.config.write_timeout:g}s"
            writer.transport.abort()
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        finally:
            session.busy = False
            session.unsubscribe()
            released = self.inventory.release(session, _DISCONNECT_REASONS.get(reason, "session_closed"))
            self.sessions.discard(session)
            level = logging.INFO if reason not in ("closed by peer", SHUTDOWN) else logging.DEBUG
            log.log(level, "session %s ended (%s); released %s", name, reason, ", ".join(released) or "no VMs")
            await self._hang_up(writer, shutdown=reason == SHUTDOWN, reader=None if reader.at_eof() else reader)

    async def _backpressure(self, writer: asyncio.StreamWriter) -> None:
        """Past the high-water mark, read no more from this session until its peer reads its
        replies; after write_timeout, give up on it (asyncio.TimeoutError ends the session)."""
        if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            await asyncio.wait_for(writer.drain(), self.config.write_timeout)

    async def _write_pieces(self, writer: asyncio.StreamWriter, pieces: tuple[bytes, ...]) -> None:
        """Write a large reply a slice at a time, letting the peer read in between: the event loop
        never copies tens of MB in one go, so other sessions keep being answered meanwhile."""
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), _SLICE):
                writer.write(view[start:start + _SLICE])
                await self._backpressure(writer)

    async def _hang_up(self, writer: asyncio.StreamWriter, shutdown: bool,
                       reader: asyncio.StreamReader | None = None) -> None:
        """Close so that the peer reads everything we sent: half-close first, then let unread
        input drain (briefly) — closing a socket with unread input makes the kernel send a
        reset, and a reset makes the peer drop replies it has not read yet."""
        try:
            if not writer.is_closing():
                if shutdown:
                    writer.write(encode_event("shutdown", {}))
                if reader is not None and writer.can_write_eof():
                    writer.write_eof()
                    await asyncio.wait_for(self._drain_input(reader), _LINGER)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), timeout=2.0)
        except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.CancelledError):  # SSLError is an OSError
            writer.transport.abort()

    @staticmethod
    async def _drain_input(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | object | None:
        """The next line without its terminator; _TOO_LARGE for a discarded over-long line; None at EOF.

        A last line that ends at EOF without a newline is still returned.
        """
        try:
            line = (await reader.readuntil(b"\n"))[:-1]
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            line = exc.partial
        except asyncio.LimitOverrunError:
            await self._discard_line(reader)
            return _TOO_LARGE
        if line[-1:] == b"\r":
            line = line[:-1]
        if len(line) > self.config.max_line:
            return _TOO_LARGE
        return line

    @staticmethod
    async def _discard_line(reader: asyncio.StreamReader) -> None:
        """Throw away input up to and including the next newline (or EOF), never buffering it all."""
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError:
                return

    def _respond(self, session: Session, line: bytes | object) -> Reply | Awaitable[Reply] | None:
        """The reply to one line (None for a line to ignore), or an awaitable of it."""
        if line is _TOO_LARGE:
            return encode_error(
                None, ErrorCode.TOO_LARGE,
                f"request line longer than {self.config.max_line} bytes; it was discarded")
        assert isinstance(line, bytes)
        try:
            request = parse_line(line)
        except RequestError as exc:
            return encode_error(exc.request_id, exc.code, exc.message)
        if request is None:
            return None
        return execute(self.context, session, request)


async def start_server(config: Config) -> Server:
    """Check TLS, open the store, load the inventory, and start listening.

    :raises TLSConfigError: certificate unusable. :raises StoreError: database unusable.
    :raises OSError: cannot listen.
    """
    tls = tls_context(config)  # first: a bad certificate should not leave a new database behind
    inventory = Inventory(Store(config.db, config.busy_timeout_ms), config.max_write_batch)
    server = Server(config, inventory)
    try:
        inventory.start(asyncio.get_running_loop())
        await server.start(tls)
    except BaseException:
        inventory.close()
        raise
    return server
