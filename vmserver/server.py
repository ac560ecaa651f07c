"""The network layer: one task per session reading lines and writing replies, live events,
the reaper of ended sessions, shutdown.

A session answers its requests strictly in order (pipelining works), and gives way to the
others after a small budget of work. Between commands it can be stopped; inside one, and
while its reply is being written, it is not: shutdown and the idle timeout wait for both.
Limits that keep a long-running server healthy live here too: the line limits (shorter
before auth) and the shared budget for long lines, a cap on connections (limits.py), idle
and write timeouts, TCP keepalive, and the refusal of HTTP spoken to this port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from . import __version__, limits
from .commands import COMMANDS, Context, Reply, execute
from .config import Config
from .backends import open_store
from .errors import ErrorCode, StorageError
from .inventory import Inventory
from .listing import pieces
from .presence import SERVER_ID, session_key
from .protocol import (
    RequestError, encode_error, encode_event, encode_greeting, looks_like_http, parse_line,
)

log = logging.getLogger(__name__)

_TOO_LARGE = object()  # read_line's answer for an over-long line (already discarded)
_TOO_LARGE_BEFORE_AUTH = object()  # a long line before auth: answered, then the session ends
_BACKLOG = 4096  # a fleet reconnecting at once must not overflow asyncio's default of 100
_ACCEPT_BATCH = 64  # connections accepted in one loop turn (a storm of them is served in turns too)
_WRITE_HIGH_WATER = 256 * 1024  # past this much unsent output, stop reading until the peer reads
_SLICE = 64 * 1024  # a large reply is written this much at a time (bounds what a non-reading peer holds)
_LINGER = 1.0  # seconds a closing session's unread input may take to drain
_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 15, "TCP_KEEPCNT": 4}  # a dead peer is noticed in ~2 min
# Input: a session's stream buffers up to twice this before it stops reading from the socket.
# Longer lines are gathered under a permit from a budget shared by all sessions, so the input
# held in memory stays bounded however many peers send long lines at once.
_READ_LIMIT = 16 * 1024
PRE_AUTH_LINE = 4096  # before auth (on a server with a token) no line may be longer
_LONG_LINE_BUDGET = 64 * 1024 * 1024
_TURN = 0.001  # seconds of work a session (or the reaper) does before letting the others in
_EVENT_WRITE_MAX = 256 * 1024  # bytes of events written to one subscriber at a time

SHUTDOWN = "server shutdown"
LEASE_LOST = "lease lost"  # several servers: this one lost its lease on the database
IDLE = "idle timeout"
_DISCONNECT_REASONS = {SHUTDOWN: "shutdown", IDLE: "timeout"}  # vm_disconnected's reason; else session_closed
_QUIET_REASONS = ("closed by peer", SHUTDOWN)  # logged at DEBUG: routine for a fleet
EVENT_QUEUE_MAX = 50_000  # events a subscriber may fall behind before the oldest are dropped (kept once for all)


class Channel:
    """Event lines in the order they happened, for every subscriber that chose the same events
    (or for one subscriber of one VM). Each line is encoded once and kept once, whatever the
    number of subscribers: a subscriber is only a position in it. Bounded: a subscriber that
    falls more than EVENT_QUEUE_MAX lines behind loses the oldest, and is told how many."""

    __slots__ = ("events", "lines", "first", "members")

    def __init__(self, events: frozenset[str]) -> None:
        self.events = events
        self.lines: list[bytes] = []
        self.first = 0  # the position of lines[0]; positions only grow
        self.members: set[Session] = set()

    @property
    def end(self) -> int:
        return self.first + len(self.lines)

    def append(self, line: bytes) -> None:
        lines = self.lines
        lines.append(line)
        if len(lines) >= 2 * EVENT_QUEUE_MAX:  # trimmed now and then, so appending stays O(1)
            gone = len(lines) - EVENT_QUEUE_MAX
            del lines[:gone]
            self.first += gone

    @property
    def oldest(self) -> int:
        """The first position still kept for a subscriber (older ones count as dropped)."""
        return max(self.first, self.end - EVENT_QUEUE_MAX)

    def forget_read(self) -> None:
        """Drop the lines every member has already been sent."""
        if self.lines:
            done = min((m.subscription.cursor for m in self.members if m.subscription is not None),
                       default=self.end)
            if done > self.first:
                del self.lines[:done - self.first]
                self.first = done


class Subscription:
    """What a session asked to hear, and how far through its channel it has been sent."""

    __slots__ = ("vm_id", "channel", "cursor", "dropped", "blocked")

    def __init__(self, vm_id: str | None, channel: Channel) -> None:
        self.vm_id, self.channel = vm_id, channel  # the events it chose: channel.events
        self.cursor = channel.end  # only what happens from now on
        self.dropped = 0
        self.blocked = False  # its peer is not reading: wait for the buffer to drain


class Session:
    """One client connection; ``vms`` are the VMs it has connected (bound to its lifetime)."""

    __slots__ = ("key", "name", "vms", "task", "busy", "last_active", "stop_reason", "authenticated", "ended",
                 "subscription", "writing", "spent", "_server", "_writer", "_drainer")

    def __init__(self, name: str, task: asyncio.Task[Any] | None, authenticated: bool = True,
                 server: Server | None = None, writer: asyncio.StreamWriter | None = None) -> None:
        self.key = session_key()
        self.name = name
        self.vms: set[str] = set()
        self.task = task
        self.busy = False  # a command runs or its reply is being written: nobody may interrupt it
        self.last_active = time.monotonic()
        self.stop_reason: str | None = None  # why the server cancelled it, if it did
        self.authenticated = authenticated
        self.ended = False  # set when its VMs are released: nothing may be bound to it after
        self.subscription: Subscription | None = None
        self.writing = False  # a reply is going out in slices: no event may cut into it
        self.spent = 0.0  # seconds of work since it last let other sessions in
        self._server, self._writer = server, writer
        self._drainer: asyncio.Task[None] | None = None  # waits for a non-reading subscriber

    def subscribe(self, events: frozenset[str], vm_id: str | None) -> None:
        """Start (or change) this session's live events."""
        assert self._server is not None
        self._server._subscribe(self, (events, vm_id))

    def unsubscribe(self) -> None:
        """Stop live events; those not yet written are dropped."""
        if self._server is not None:
            self._server._subscribe(self, None)

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
        self.context.sessions = self._stats
        self.sessions: set[Session] = set()
        self.max_sessions, warning = limits.session_cap(config.max_connections, config.local_reserve,
                                                        limits.fd_limit())
        if warning:
            log.warning("%s", warning)
        inventory.feed.listen(self._publish)
        self._pruner: asyncio.Task[None] | None = None
        self._refused, self._refused_logged = 0, -10.0  # connections refused over the cap, not yet logged
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._greeting = encode_greeting(__version__, list(COMMANDS), auth_required=config.token is not None,
                                         server_id=SERVER_ID)
        # Several servers on one database: while this one holds no lease it serves nobody.
        self.unavailable: str | None = None
        store = inventory.store
        if store.shared:
            store.on_unavailable = self._lease_lost  # type: ignore[attr-defined]
            store.on_available = self._lease_held  # type: ignore[attr-defined]
        self._long_lines = asyncio.Semaphore(max(1, _LONG_LINE_BUDGET // (2 * config.max_line + 2)))
        # Live events: one shared channel per choice of events (subscribers without a vm_id), found
        # by event name; subscribers of one VM, by VM, each with a channel of its own. Channels
        # with new lines are written out once per loop turn, a slice of subscribers at a time.
        self._channels: dict[frozenset[str], Channel] = {}
        self._by_event: dict[str, list[Channel]] = {}
        self._by_vm: dict[str, set[Session]] = {}
        self._dirty: set[Channel] = set()
        self._to_write: deque[Session] = deque()
        self._flush_scheduled = False
        # Ended sessions, released by one task a slice at a time (a fleet hanging up at once must
        # not freeze the loop), then closed.
        self._ending: deque[tuple[Session, str, asyncio.StreamWriter | None]] = deque()
        self._ending_ready = asyncio.Event()
        self._reaped = asyncio.Event()
        self._reaped.set()
        self._reaper: asyncio.Task[None] | None = None
        self.http: Any = None  # the HTTP API (http_api.HttpApi) with --http-port

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        """Listen (with TLS when given a context). :raises OSError: address in use."""
        refusal = encode_error(None, ErrorCode.UNAVAILABLE, "the server is out of file descriptors; try again later")
        # Lines longer than the reader's limit are gathered by _read_long_line.
        self._servers = await limits.serve(
            self.config.host, self.config.port, _BACKLOG, refusal, self.note_refused,
            lambda sock: asyncio.start_server(self._serve, sock=sock, limit=_READ_LIMIT, backlog=_ACCEPT_BATCH,
                                              ssl=tls, ssl_handshake_timeout=10.0 if tls else None))
        if self.config.http_port is not None:
            from .http_api import HttpApi  # aiohttp only when asked for: an optional extra

            http = HttpApi(self)
            try:
                await http.start(tls)
            except BaseException:
                for server in self._servers:
                    server.close()
                raise
            self.http = http
        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap())
        if self.config.idle_timeout > 0:
            self._sweeper = loop.create_task(self._sweep_idle())
        if self.config.history_days > 0:
            self._pruner = loop.create_task(self._prune_history())

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound, so port 0 can be read back."""
        assert self._servers, "start() first"
        host, port = self._servers[0].sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        """Stop listening, let commands in flight and replies being written finish, say goodbye
        to every session, close them."""
        if self._closing:
            return
        self._closing = True
        for task in (self._sweeper, self._pruner):
            if task is not None:
                task.cancel()
        for server in self._servers:
            server.close()
        http = asyncio.ensure_future(self.http.close()) if self.http is not None else None  # stops listening now
        tasks = [s.task for s in self.sessions if s.task is not None]
        for session in list(self.sessions):
            if not session.busy:
                self._stop(session, SHUTDOWN)  # it is waiting for input: nothing is lost
        if tasks:
            # A reply being written is finished first, for as long as its peer keeps reading.
            grace = max(self.config.shutdown_grace, self.config.write_timeout)
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                log.warning("a session did not finish within %.1fs of shutdown; cutting it off", grace)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if http is not None:
            await http  # its requests in flight finish, then its sessions end
        await self._reaped.wait()  # every ended session released (its history rows submitted)
        if self._reaper is not None:
            self._reaper.cancel()
        for server in self._servers:
            await server.wait_closed()

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
            except StorageError as exc:
                log.error("history pruning failed: %s", exc)
            await asyncio.sleep(3600)

    # --- live events ------------------------------------------------------------------

    def _subscribe(self, session: Session, choice: tuple[frozenset[str], str | None] | None) -> None:
        """Replace what ``session`` hears (None: nothing); lines not yet written for the old choice are dropped."""
        old = session.subscription
        if old is not None:
            # what it had lost and was not yet told of is lost all the same (for GET /metrics)
            self.context.metrics.events_dropped += max(0, old.channel.oldest - old.cursor)
            old.channel.members.discard(session)
            if old.vm_id is not None:
                watchers = self._by_vm.get(old.vm_id)
                if watchers is not None:
                    watchers.discard(session)
                    if not watchers:
                        del self._by_vm[old.vm_id]
            elif not old.channel.members:
                del self._channels[old.channel.events]
                self._index_channels()
        session.subscription = None
        if session._drainer is not None:
            session._drainer.cancel()
            session._drainer = None
        if choice is None:
            return
        events, vm_id = choice
        if vm_id is not None:
            channel = Channel(events)
            self._by_vm.setdefault(vm_id, set()).add(session)
        else:
            channel = self._channels.get(events)  # type: ignore[assignment]
            if channel is None:
                channel = self._channels[events] = Channel(events)
                self._index_channels()
        channel.members.add(session)
        session.subscription = Subscription(vm_id, channel)

    def _index_channels(self) -> None:
        self._by_event = {}
        for channel in self._channels.values():
            for name in channel.events:
                self._by_event.setdefault(name, []).append(channel)

    def _publish(self, event: str, vm_id: str, data: Callable[[], bytes]) -> None:
        """An inventory change: its line, encoded once, goes into every channel that wants it."""
        channels, watchers = self._by_event.get(event), self._by_vm.get(vm_id)
        if not channels and not watchers:
            return
        line = encode_event(event, data())
        dirty = self._dirty
        for channel in channels or ():
            channel.append(line)
            dirty.add(channel)
        for session in watchers or ():
            sub = session.subscription
            if sub is not None and event in sub.channel.events:
                sub.channel.append(line)
                dirty.add(sub.channel)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_events)

    def _flush_events(self) -> None:
        """Write each subscriber what is new for it, one write each, a slice of work at a time:
        subscribers at the same position get the same bytes, joined once."""
        self._flush_scheduled = False
        for channel in self._dirty:
            self._to_write.extend(channel.members)
        self._dirty.clear()
        clock, began, joined = time.perf_counter, time.perf_counter(), {}
        queue = self._to_write
        while queue:
            self._write_events(queue.popleft(), joined)
            if clock() - began > _TURN and queue:
                self._schedule_flush()  # the others on the next turn, after everyone else
                break
        for channel in {id(c): c for c, _ in joined}.values():
            channel.forget_read()

    def _write_events(self, session: Session, joined: dict[tuple[Channel, int], tuple[bytes, int]] | None = None) -> None:
        sub, writer = session.subscription, session._writer
        if sub is None or writer is None or sub.blocked or session.writing:
            return  # (a reply in slices writes them when it is done; a blocked one when it drains)
        channel = sub.channel
        if sub.cursor >= channel.end:
            return
        transport = writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            sub.blocked = True  # a slow reader: meanwhile it falls behind, then loses the oldest
            session._drainer = asyncio.get_running_loop().create_task(self._drain_events(session, sub, writer))
            return
        oldest = channel.oldest
        if sub.cursor < oldest:
            sub.dropped += oldest - sub.cursor
            self.context.metrics.events_dropped += oldest - sub.cursor
            sub.cursor = oldest
        key = (channel, sub.cursor)
        found = joined.get(key) if joined is not None else None
        if found is None:
            lines, start = channel.lines, sub.cursor - channel.first
            stop, size = start, 0
            while stop < len(lines) and size < _EVENT_WRITE_MAX:
                size += len(lines[stop])
                stop += 1
            found = (b"".join(lines[start:stop]), channel.first + stop)
            if joined is not None:
                joined[key] = found
        if sub.dropped:
            writer.write(encode_event("overflow", {"dropped": sub.dropped}))
            sub.dropped = 0
        writer.write(found[0])
        sub.cursor = found[1]
        if sub.cursor < channel.end:  # more than one write's worth: the rest on a later turn
            self._dirty.add(channel)
            self._schedule_flush()

    async def _drain_events(self, session: Session, sub: Subscription, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            sub.blocked = False
            if session._drainer is asyncio.current_task():
                session._drainer = None
        self._write_events(session)

    # --- one session ------------------------------------------------------------------

    def note_refused(self, count: int, name: str = "?") -> None:
        """Count refused connections; a flood of refusals is one log line per 10 s."""
        self._refused += count
        self.context.metrics.connections_refused += count
        now = time.monotonic()
        if now - self._refused_logged >= 10.0:
            log.warning("refused %d connection(s), the last from %s: already %d connections (cap %d, --max-connections)",
                        self._refused, name, self.open_connections, self.max_sessions)
            self._refused, self._refused_logged = 0, now

    def _lease_lost(self, why: str) -> None:
        """Stop acting before the lease can expire: every session closed (their VMs are released
        by whichever server reaps the lease), new ones refused until a new lease is held."""
        self.unavailable = why
        for session in list(self.sessions):
            self._stop(session, LEASE_LOST)
        if self.http is not None:
            self.http.end_all("session_closed")

    def _lease_held(self) -> None:
        if self.unavailable is not None:
            log.warning("serving again: this server holds a new lease")
        self.unavailable = None

    @property
    def open_connections(self) -> int:
        """Connections counted against the cap: line sessions and HTTP connections alike."""
        return len(self.sessions) + (self.http.connections if self.http is not None else 0)

    def _stats(self) -> dict[str, Any]:
        """This server's part of stats: its sessions by protocol, its connections and their cap."""
        http = len(self.http.sessions) if self.http is not None else 0
        return {"sessions": {"line": len(self.sessions), "http": http},
                "connections": {"open": self.open_connections, "limit": self.max_sessions}}

    def admits(self, peer: Any) -> bool:
        """Within the cap, or in one of the seats kept for this machine's own peers past it."""
        count = self.open_connections
        return count < self.max_sessions or (
            count < self.max_sessions + self.config.local_reserve and _is_loopback(peer))

    def _admit(self, writer: asyncio.StreamWriter, peer: Any, name: str) -> bool:
        if self.unavailable is not None:
            writer.write(encode_error(None, ErrorCode.UNAVAILABLE, self.unavailable_message))
            writer.close()
            return False
        if self.admits(peer):
            return True
        self.note_refused(1, name)
        writer.write(encode_error(None, ErrorCode.UNAVAILABLE, self.full_message))
        writer.close()  # at once: a refusal must not hold a descriptor while lingering
        return False

    @property
    def unavailable_message(self) -> str:
        """What a client hears while this server holds no lease (both protocols)."""
        return f"this server lost touch with its database ({self.unavailable}); try another server, or again shortly"

    @property
    def full_message(self) -> str:
        return f"too many connections (limit {self.max_sessions}); try again later"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._closing:
            writer.transport.abort()
            return
        if not self._admit(writer, peer, name):
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _tune_socket(sock)
        protocol = writer.transport.get_protocol()
        if type(protocol) is asyncio.StreamReaderProtocol:
            protocol.__class__ = _StreamProtocol  # see there: a vanished peer must leave no cycle
        session = Session(name, asyncio.current_task(), authenticated=self.config.token is None,
                          server=self, writer=writer)
        self.sessions.add(session)
        self.context.metrics.sessions_opened["line"] += 1
        log.debug("session %s opened", name)
        reason = "closed by peer"
        clock = time.perf_counter
        try:
            writer.write(self._greeting)
            while not self._closing:
                line = await self._read_line(reader, session)
                if line is None:
                    break
                began = clock()
                session.last_active = time.monotonic()
                if line is _TOO_LARGE_BEFORE_AUTH:
                    writer.write(encode_error(None, ErrorCode.TOO_LARGE,
                                              f"before auth, request lines are limited to {PRE_AUTH_LINE} bytes"))
                    reason = "over-long line before auth"
                    break
                if line is not _TOO_LARGE and looks_like_http(line):  # type: ignore[arg-type]
                    writer.write(encode_error(None, ErrorCode.BAD_REQUEST,
                                              "this port speaks line-delimited JSON (see protocol.md), not HTTP"))
                    reason = "HTTP request refused"
                    break
                session.busy = True
                reply = self._respond(session, line)
                if reply is not None and type(reply) is not bytes and type(reply) is not tuple:
                    reply = await reply  # type: ignore[misc]
                if reply is not None:
                    if writer.transport.is_closing():
                        break  # the peer is gone; nobody to answer
                    if type(reply) is bytes:
                        writer.write(reply)
                        await self._backpressure(writer)
                    else:
                        await self._write_pieces(session, writer, reply)  # type: ignore[arg-type]
                        session.last_active = time.monotonic()  # it was reading all along
                session.busy = False
                # Fairness: past a small budget of work, let every other session in before going on
                # with this one's pipelined requests (which are served without waiting otherwise).
                session.spent += clock() - began
                if session.spent > _TURN:
                    session.spent = 0.0
                    await asyncio.sleep(0)
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
            # The stream keeps this exception, whose traceback holds the frames that hold the
            # stream: a cycle only a full collection would free (see gc_tuning.py).
            exc.__traceback__ = None
        finally:
            if session.writing:  # cut off in the middle of a reply line: nothing may follow it
                writer.transport.abort()
            session.busy = session.writing = False
            at_eof = reader.at_eof()
            if reason in (SHUTDOWN, LEASE_LOST) or not (at_eof or writer.transport.is_closing()):
                self._retire(session, reason, None)  # we end it: say goodbye, let its input drain
                await self._hang_up(writer, shutdown=reason in (SHUTDOWN, LEASE_LOST),
                                    reader=None if at_eof else reader)
            else:
                self._retire(session, reason, writer)  # the peer ended it: the reaper closes it

    def _retire(self, session: Session, reason: str, writer: asyncio.StreamWriter | None) -> None:
        """Hand an ended session to the reaper (``writer``: close it too)."""
        session.ended = True  # nothing may be bound to it from now on
        self._ending.append((session, reason, writer))
        self._reaped.clear()
        self._ending_ready.set()

    async def _reap(self) -> None:
        """Release ended sessions a slice at a time: their VMs, their events, their descriptors."""
        clock = time.perf_counter
        while True:
            await self._ending_ready.wait()
            self._ending_ready.clear()
            began = clock()
            while self._ending:
                session, reason, writer = self._ending.popleft()
                try:
                    self._end(session, reason)
                except Exception:  # a bug must not stop the releasing of every later session
                    log.exception("releasing session %s", session.name)
                if writer is not None:
                    writer.close()
                    _unlink_later(writer.transport)
                if clock() - began > _TURN:
                    await asyncio.sleep(0)
                    began = clock()
            self._reaped.set()

    def _end(self, session: Session, reason: str) -> None:
        session.unsubscribe()
        released = self.inventory.release(session, _DISCONNECT_REASONS.get(reason, "session_closed"))
        self.sessions.discard(session)
        quiet = reason in _QUIET_REASONS or reason.startswith("connection error")
        level = logging.DEBUG if quiet else logging.INFO
        if log.isEnabledFor(level):  # a fleet hanging up at once: no text built for nothing
            log.log(level, "session %s ended (%s); released %s", session.name, reason, ", ".join(released) or "no VMs")

    async def _backpressure(self, writer: asyncio.StreamWriter) -> None:
        """Past the high-water mark, read no more from this session until its peer reads its
        replies; after write_timeout, give up on it (asyncio.TimeoutError ends the session)."""
        if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            await asyncio.wait_for(writer.drain(), self.config.write_timeout)

    async def _write_pieces(self, session: Session, writer: asyncio.StreamWriter, reply: Reply) -> None:
        """Write a large reply a slice at a time as the peer reads it: the event loop never copies
        tens of MB in one go, a Join is joined only as it goes out, and other sessions keep
        being answered meanwhile. Stops at the first sign the peer is gone."""
        session.writing = True
        transport = writer.transport
        for piece in pieces(reply):  # type: ignore[arg-type]
            for start in range(0, len(piece), _SLICE):
                if transport.is_closing():
                    raise ConnectionResetError("the peer went away during a reply")
                writer.write(piece if len(piece) <= _SLICE else memoryview(piece)[start:start + _SLICE])
                await self._backpressure(writer)
        session.writing = False
        self._write_events(session)  # events held back meanwhile

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
        _unlink_later(writer.transport)

    @staticmethod
    async def _drain_input(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _read_line(self, reader: asyncio.StreamReader, session: Session) -> bytes | object | None:
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
            if not session.authenticated:
                return _TOO_LARGE_BEFORE_AUTH
            line = await self._read_long_line(reader)
            if line is None:
                return _TOO_LARGE
        if line[-1:] == b"\r":
            line = line[:-1]
        if not session.authenticated and len(line) > PRE_AUTH_LINE:
            return _TOO_LARGE_BEFORE_AUTH
        if len(line) > self.config.max_line:
            return _TOO_LARGE
        return line

    async def _read_long_line(self, reader: asyncio.StreamReader) -> bytes | None:
        """A line longer than the reader's limit, gathered under a permit of the shared budget
        (waiting for one leaves the input in the kernel); None when it is over --max-line (it
        is discarded)."""
        async with self._long_lines:
            parts, size, most = [], 0, self.config.max_line + 1  # + 1: a '\r' before the newline
            while True:
                try:
                    parts.append((await reader.readuntil(b"\n"))[:-1])
                    break
                except asyncio.LimitOverrunError as exc:
                    buffered = exc.consumed
                except asyncio.IncompleteReadError as exc:
                    parts.append(exc.partial)  # the last line, ended by EOF
                    break
                size += buffered
                if size > most:
                    parts.clear()
                    await self._discard_line(reader)
                    return None
                parts.append(await reader.readexactly(buffered))
            line = b"".join(parts)
            return line if len(line) <= most else None

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


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, but the error a connection is lost with is kept without its
    traceback. The traceback holds the frames that were writing to the connection, which hold
    the stream, which holds the error: a cycle only a full garbage collection would free, and
    never once the session's objects are frozen (gc_tuning.py). The reason stays in the text."""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(None if exc is None else exc.with_traceback(None))


def _unlink_later(transport: asyncio.BaseTransport) -> None:
    """Once a closed transport is done, drop the bound method it keeps of itself (asyncio's
    selector transports do, up to Python 3.12): without it, a closed connection is freed by
    reference counting instead of waiting for a full garbage collection, which matters once
    long-lived objects are frozen (gc_tuning.py). A no-op where the attribute does not exist."""
    if getattr(transport, "_read_ready_cb", None) is not None:
        asyncio.get_running_loop().call_soon(setattr, transport, "_read_ready_cb", None)


def _is_loopback(peer: Any) -> bool:
    if not isinstance(peer, tuple):
        return isinstance(peer, str)  # a Unix socket: this machine
    try:
        return ipaddress.ip_address(peer[0].split("%", 1)[0]).is_loopback
    except ValueError:
        return False


async def start_server(config: Config) -> Server:
    """Check TLS, open the store, load the inventory, and start listening.

    :raises TLSConfigError: certificate unusable. :raises StorageError: database unusable.
    :raises OSError: cannot listen.
    """
    tls = tls_context(config)  # first: a bad certificate should not leave a new database behind
    inventory = Inventory(open_store(config.db, config.busy_timeout_ms, config.max_write_batch, config.lease_ttl))
    server = Server(config, inventory)
    try:
        inventory.start(asyncio.get_running_loop())
        await server.start(tls)
    except BaseException:
        inventory.close()
        raise
    return server
