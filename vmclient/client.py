"""The asyncio client library: one connection, many concurrent calls, replies matched by id.

The server answers requests strictly in order, so pending calls wait in a FIFO; each reply
must carry the id of the call at its head (a check that catches a confused stream). One
reader task reads every line; when the connection ends, every pending call fails with
:class:`ConnectionLost` instead of hanging.

A line the client cannot understand (not JSON, nested too deep to read, a reply that is not
``{"id", "ok": true, "result"}`` or ``{"id", "ok": false, "error": {"code", "message"}}``, a
reply nobody waits for, an event that is not ``{"event", "data", "ts"}``, a line over
``max_reply``) is a protocol violation: the client ends the connection, and every pending and
later call fails at once with ConnectionLost whose ``__cause__`` is the
:class:`ProtocolViolation`. ``connect()`` then starts a new connection.

Requests go to the socket one at a time, in call order, each whole and only once the socket
has room: a call's ``timeout`` covers waiting for that room as well as for the reply, and a
request is never cut in half (see :meth:`Client.request`).

A client may be given several server addresses (``hosts=``): connect() tries them in turn,
starting from the one that worked last, so a reconnect after a lost connection reaches
another server when that one is gone.

Event lines (protocol.md, "Events") are set aside by the same reader into a bounded buffer
while the session is subscribed, and handed out by :meth:`Client.events`; calls go on working
meanwhile.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import os
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TypedDict

from .errors import (
    CallTimeout, ClientError, ConnectError, ConnectionLost, ProtocolViolation, error_for,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888
MAX_REPLY = 256 * 1024 * 1024  # a 100,000-VM list is tens of MB on one line
EVENT_BUFFER = 10_000  # events held for the application before the oldest are dropped
EVENT_NAMES = ("vm_added", "vm_updated", "vm_removed", "vm_connected", "vm_disconnected", "vm_authorized",
               "vm_deauthorized", "auth_failed")
"""The event names ``subscribe`` takes (protocol.md); ``overflow`` and ``shutdown`` come unasked."""
_DEFAULT: Any = object()  # "use the client's default timeout"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """One server address as ``(host, port)``: ``host``, ``host:port``, ``[IPv6]``, ``[IPv6]:port``,
    or a bare IPv6 address; without a port, ``default_port``. Surrounding blanks are ignored.

    :raises ValueError: for an empty address or host, a port that is not a number from 1 to
        65535, or a bracket left open (an IPv6 address with a port needs its brackets).
    """
    if not isinstance(text, str):
        raise TypeError(f"an address is a str or a (host, port) tuple, not {type(text).__name__}")
    spec = text.strip()
    if not spec:
        raise ValueError("empty address")
    port_text: str | None = None
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket:
            raise ValueError(f"address {text!r}: no closing ']'")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"address {text!r}: only :PORT may follow ']'")
            port_text = rest[1:]
    elif spec.count(":") > 1:  # no brackets: a bare IPv6 address, never one with a port
        try:
            ipaddress.ip_address(spec)
        except ValueError:
            raise ValueError(f"address {text!r} is neither HOST:PORT nor an IPv6 address "
                             "(an IPv6 address with a port is written [ADDRESS]:PORT)") from None
        host = spec
    else:
        host, colon, rest = spec.partition(":")
        port_text = rest if colon else None
    if not host:
        raise ValueError(f"address {text!r} has no host")
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"address {text!r}: not a port number: {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"address {text!r}: port must be from 1 to 65535, got {port}")
    return host, port


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (what :func:`parse_address` reads back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addresses(hosts: Iterable[str | tuple[str, int]]) -> list[tuple[str, int]]:
    """``hosts`` as a list of (host, port), each checked, duplicates dropped, the order kept."""
    if isinstance(hosts, (str, bytes)):
        raise TypeError('hosts takes a list of addresses, not one string: hosts=["host:port", ...]')
    out: list[tuple[str, int]] = []
    for entry in hosts:
        if isinstance(entry, tuple):
            if len(entry) != 2:
                raise ValueError(f"address {entry!r}: a tuple must be (host, port)")
            host, port = entry
            if not isinstance(host, str) or type(port) is not int:
                raise TypeError(f"address {entry!r}: a tuple must be (host: str, port: int)")
            if not host:
                raise ValueError(f"address {entry!r} has no host")
            if not 1 <= port <= 65535:
                raise ValueError(f"address {entry!r}: port must be from 1 to 65535, got {port}")
            out.append((host, port))
        else:
            out.append(parse_address(entry))
    if not out:
        raise ValueError("hosts is empty: give at least one address")
    return list(dict.fromkeys(out))


class DiskSpec(TypedDict):
    disk_id: str
    size: int


class Disk(TypedDict):
    id: int
    disk_id: str
    size: int
    vm_id: int


class VM(TypedDict):
    id: int
    vm_id: str
    ram: int
    cpu: int
    disks: list[Disk]
    connected: bool
    authorized: bool
    last_connected: str | None


class Event(TypedDict):
    """One event line (protocol.md, "Events"): ``{"event": name, "data": {...}, "ts": ISO time}``."""

    event: str
    data: dict[str, Any]
    ts: str


def _utc_now() -> str:
    """Now as the server writes times: ISO-8601 UTC with milliseconds and ``Z``."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


_SECRET_INLINE = re.compile(r'(\b(?:password|token)\s*=\s*)("(?:[^"\\]|\\.)*"|\[[^\]]*\]?|\{[^}]*\}?|\S+)')
_SECRET_JSON = re.compile(r'("(?:password|token)"\s*:\s*)("(?:[^"\\]|\\.)*"|[^,}\s]+)')


def redact(line: str) -> str:
    """A request line with every password and token value replaced by ``***`` (errors, logs, history)."""
    return _SECRET_JSON.sub(r'\1"***"', _SECRET_INLINE.sub(r"\1***", line))


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_not_json)  # NaN and Infinity are Python's, not JSON


def _parse(line: bytes) -> Any:
    """One line from the server as JSON.

    :raises ProtocolViolation: for a line that is not UTF-8 JSON, or too deeply nested for
        Python to read (the recursion limit, about 1000 levels).
    """
    try:
        return _decoder.decode(line.decode("utf-8"))
    except RecursionError as exc:
        raise ProtocolViolation(f"the server sent a line nested too deep to read ({len(line)} bytes)") from exc
    except ValueError as exc:  # UnicodeDecodeError too
        raise ProtocolViolation(f"the server sent a line that is not JSON: {line[:200]!r}") from exc


def _same_id(sent: Any, got: Any) -> bool:
    """Whether a reply's id is the request's, as JSON sees it: ``true`` is not ``1``, nor ``1.0``."""
    if isinstance(sent, (list, dict)) or isinstance(got, (list, dict)):
        try:
            return json.dumps(sent, sort_keys=True) == json.dumps(got, sort_keys=True)
        except (RecursionError, ValueError):
            return False
    return type(sent) is type(got) and sent == got


def _masked(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """The request as kept in errors and logs: never with a password in it."""
    secret = [key for key in ("password", "token") if key in args]
    if secret:
        args = {**args, **{key: "***" for key in secret}}
    return {"cmd": cmd, "args": args}


class _Pending:
    __slots__ = ("id", "future", "request", "on_ok")

    def __init__(self, id: Any, future: asyncio.Future[Any], request: dict[str, Any],
                 on_ok: Callable[[Any], None] | None = None) -> None:
        self.id, self.future, self.request = id, future, request
        self.on_ok = on_ok  # run by the reader as the success reply is read, before any later line


class EventStream:
    """What :meth:`Client.events` returns: an async iterator over the client's event buffer.

    It waits for the next event; it ends (``StopAsyncIteration``) once the connection is lost
    or closed and every event received before that was handed out (so a ``shutdown`` event
    comes out before the end), and at once if the client reconnected since the stream
    started: events never survive a reconnect. The client's event buffer is one queue: two
    streams iterating at the same time share its events, each event going to one of them.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._generation: int | None = None  # the connection this stream reads, fixed on first use

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        client = self._client
        if self._generation is None:
            self._generation = client._generation
        while True:
            if client._generation != self._generation:
                raise StopAsyncIteration
            event = client._next_event()
            if event is not None:
                return event
            if client._lost is not None or client._writer is None or client._event_ready is None:
                raise StopAsyncIteration
            client._event_ready.clear()
            await client._event_ready.wait()


class Client:
    """A connection to a vmserver. Use ``async with Client(...) as c:`` or :func:`connect`.

    :param host, port: the server (default 127.0.0.1:8888).
    :param hosts: instead of ``host``/``port``, several servers: ``"host:port"``, ``"host"``
        (port 8888), ``"[IPv6]:port"`` or ``(host, port)``; one given twice is tried once.
        connect() tries each in turn (each within ``connect_timeout``), starting from the one
        that worked last, and fails only when all fail; :attr:`address` says which one it reached.
    :param timeout: default seconds each call waits for its reply (None: forever).
    :param connect_timeout: seconds to connect and receive the greeting.
    :param max_reply: longest reply line accepted, in bytes.
    :param token: the server's shared token, presented with ``auth`` on every (re)connect.
    :param tls: True to speak TLS (verifying the server against ``cafile``, or the system's
        CAs), or a ready ``ssl.SSLContext``.
    :param cafile: PEM file of the CA (or the self-signed certificate) to trust for TLS.
    :param event_buffer: how many events :meth:`events` holds for the application before the
        oldest are dropped (then it yields one ``overflow`` event saying how many).
    :raises ValueError: for an ``event_buffer`` below 1, an empty ``hosts`` or an address in
        it that cannot be read (see :func:`parse_address`).
    :raises TypeError: for ``hosts`` together with ``host`` or ``port``.
    """

    def __init__(self, host: str | None = None, port: int | None = None, *,
                 hosts: Iterable[str | tuple[str, int]] | None = None, timeout: float | None = 30.0,
                 connect_timeout: float = 10.0, max_reply: int = MAX_REPLY, token: str | None = None,
                 tls: bool | ssl.SSLContext = False, cafile: str | None = None,
                 event_buffer: int = EVENT_BUFFER) -> None:
        if not isinstance(event_buffer, int) or event_buffer < 1:
            raise ValueError(f"event_buffer must be an integer of at least 1, got {event_buffer!r}")
        if hosts is not None:
            if host is not None or port is not None:
                raise TypeError("Client takes host/port or hosts, not both (put every address in hosts)")
            self.addresses = _addresses(hosts)
        else:  # the one address is checked when connecting, as it always was
            self.addresses = [(DEFAULT_HOST if host is None else host, DEFAULT_PORT if port is None else port)]
        self.host, self.port = self.addresses[0]  # the server in use (or to be tried first)
        self._last_good: tuple[str, int] | None = None  # tried first on the next connect
        self._where: str | None = None  # the address of the current (or last) connection
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_reply = max_reply
        self._token = token
        self._tls = tls
        self._cafile = cafile
        self.server_info: dict[str, Any] = {}  # the greeting's "hello" object
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: deque[_Pending] = deque()
        self._ids = itertools.count(1)
        self._lost: ConnectionLost | None = None
        # Events: buffered from the moment a subscribe reply is read until an unsubscribe reply.
        self.event_buffer = event_buffer
        self._events: deque[Event] = deque()
        self._events_dropped = 0  # dropped from a full buffer since the last overflow was handed out
        self._event_ready: asyncio.Event | None = None
        self._subscription: dict[str, Any] | None = None
        self._generation = 0  # one per connection: events and streams belong to one
        self._connecting = asyncio.Lock()
        self._sending = asyncio.Lock()  # one per connection: requests enter the socket one by one

    # --- connection -----------------------------------------------------------------

    async def connect(self) -> Client:
        """Connect and read the greeting (then present ``token``, if given).

        On a connected client this does nothing. On one whose connection was lost or closed,
        it starts a new connection and session: the old connection's reader and socket are
        cleaned up first, its event streams end, and nothing of its subscription is kept.

        With several addresses, it tries the one that worked last first, then the others in
        the order given, and stops at the first that greets (and takes the token).

        :raises ConnectError: when the server cannot be reached, does not greet like a
            protocol-1 vmserver (a greeting this client cannot read included), or refuses the
            token; also for an address or ``cafile`` that cannot be used. With several
            addresses, only when every one fails: its message names each with its reason,
            and ``attempts`` holds each one's ConnectError in the order tried.
        """
        async with self._connecting:  # two connect() at once: one connection
            if self.connected:
                return self
            if self._writer is not None:
                await self._teardown()
            return await self._open()

    async def _open(self) -> Client:
        """Try each address in turn (the last good one first); the first that works is kept."""
        order = self.addresses
        if self._last_good in order:
            order = [self._last_good, *(a for a in order if a != self._last_good)]
        try:
            context = self._ssl_context()  # one for every address: the same TLS settings
        except OSError as exc:  # ssl.SSLError is one too
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            what = f"cannot use CA file {self._cafile}" if self._cafile else "cannot set up TLS"
            where = ", ".join(format_address(*a) for a in order)
            raise ConnectError(f"cannot connect to {where}: {what}: {reason}") from exc
        failed: list[ConnectError] = []
        for host, port in order:
            try:
                await self._open_one(host, port, context)
            except ConnectError as exc:
                failed.append(exc)
                if len(failed) < len(order):
                    log.info("%s; trying the next address", exc)
                continue
            self._last_good = (host, port)
            return self
        if len(failed) == 1:
            raise failed[0]
        reasons = "; ".join(str(exc).removeprefix("cannot connect to ") for exc in failed)
        error = ConnectError(f"cannot connect to any of {len(failed)} servers: {reasons}")
        error.attempts = tuple(failed)
        raise error from failed[-1]

    async def _open_one(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        """Connect to one address, read its greeting and present the token.

        :raises ConnectError: naming the address and why.
        """
        where = format_address(host, port)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                host, port, limit=self.max_reply, ssl=context,
                server_hostname=host if context else None), self.connect_timeout)
        except asyncio.TimeoutError as exc:
            raise ConnectError(f"cannot connect to {where}: timed out after {self.connect_timeout}s") from exc
        except ssl.SSLError as exc:
            raise ConnectError(f"cannot connect to {where}: TLS failed: {exc.reason or exc}") from exc
        except OSError as exc:
            # A getaddrinfo error's errno is an EAI_* code, which os.strerror does not know.
            reason = (exc.strerror if isinstance(exc, socket.gaierror) else os.strerror(exc.errno) if exc.errno
                      else None) or str(exc)
            raise ConnectError(f"cannot connect to {where}: {reason}") from exc
        except (ValueError, OverflowError) as exc:  # a port out of range, a host IDNA cannot encode
            raise ConnectError(f"cannot connect to {where}: {exc}") from exc
        try:
            hello = await self._greeting(reader, where)
        except BaseException:
            writer.close()
            raise
        self.server_info = hello
        self.host, self.port, self._where = host, port, where
        self._reader, self._writer, self._lost = reader, writer, None
        self._sending = asyncio.Lock()
        self._generation += 1  # a new session: nothing subscribed, nothing buffered
        self._events.clear()
        self._events_dropped = 0
        self._subscription = None
        if self._event_ready is not None:
            self._event_ready.set()  # streams of the old connection end
        self._event_ready = asyncio.Event()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader, writer))
        if self._token is not None:
            try:
                await self.auth(self._token)
            except ClientError as exc:
                await self.close()
                raise ConnectError(f"{where} did not accept the token: {exc}") from exc

    def _ssl_context(self) -> ssl.SSLContext | None:
        if isinstance(self._tls, ssl.SSLContext):
            return self._tls
        return ssl.create_default_context(cafile=self._cafile) if self._tls or self._cafile else None

    async def _greeting(self, reader: asyncio.StreamReader, where: str) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), self.connect_timeout)
        except asyncio.TimeoutError as exc:
            raise ConnectError(f"connected to {where}, but no greeting came within {self.connect_timeout}s") from exc
        except (OSError, ValueError) as exc:  # ValueError: a line over max_reply
            raise ConnectError(f"{where} did not greet like a vmserver: {exc}") from exc
        if not line.endswith(b"\n"):
            raise ConnectError(f"{where} closed the connection without a greeting")
        try:
            first = _parse(line)
        except ProtocolViolation as exc:
            raise ConnectError(f"{where} did not greet like a vmserver: {exc}") from exc
        if isinstance(first, dict) and isinstance(first.get("error"), dict):  # e.g. too many connections
            error = first["error"]
            raise ConnectError(f"{where} refused the connection: {error.get('code')}: {error.get('message')}")
        hello = first.get("hello") if isinstance(first, dict) else None
        if not isinstance(hello, dict) or hello.get("server") != "vmserver":
            raise ConnectError(f"{where} is not a vmserver (greeting: {line[:200]!r})")
        protocol = hello.get("protocol")
        if type(protocol) is not int or protocol != PROTOCOL_VERSION:
            raise ConnectError(f"{where} speaks protocol {protocol!r}, this client {PROTOCOL_VERSION}")
        commands = hello.get("commands", [])
        if not isinstance(commands, list) or not all(isinstance(name, str) for name in commands):
            raise ConnectError(f"{where} sent a greeting whose commands are not a list of names: {line[:200]!r}")
        return hello

    @property
    def connected(self) -> bool:
        """True from connect() until the connection is lost (as far as the reader has seen) or closed."""
        return self._writer is not None and self._lost is None

    @property
    def address(self) -> str | None:
        """The server in use, as ``host:port`` (``[IPv6]:port``): that of the current connection,
        or of the last one once it is lost or closed; None before the first connect."""
        return self._where

    @property
    def commands(self) -> list[str]:
        """The command names the server announced."""
        return list(self.server_info.get("commands", []))

    async def close(self) -> None:
        """Close the connection. Calls still pending, or still waiting to send, fail with
        ConnectionLost; what the socket has not sent within 2 s is dropped."""
        if self._writer is None:
            return
        self._fail_all(ConnectionLost("the client was closed"))
        await self._teardown()
        self._wake_streams()

    async def _teardown(self) -> None:
        """Close the socket (aborting it if it has not flushed within 2 s) and stop the reader."""
        writer, task = self._writer, self._reader_task
        self._writer = self._reader = self._reader_task = None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2.0)
            except (OSError, asyncio.TimeoutError):
                writer.transport.abort()  # a peer that stopped reading: wakes calls waiting to send
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- calls ----------------------------------------------------------------------

    async def call(self, cmd: str, /, *, timeout: float | None = _DEFAULT, **args: Any) -> Any:
        """Send one command and return its ``result``. See :meth:`request` for what it raises."""
        return await self.request(cmd, args, timeout=timeout)

    async def request(self, cmd: str, args: dict[str, Any], *, timeout: float | None = _DEFAULT) -> Any:
        """Like :meth:`call`, with the arguments as a dict (so any name, even ``timeout``, can be sent).

        ``timeout`` (default: the client's; None: no limit) covers the whole call: waiting for
        the socket to take the request (a stopped server fills it) as well as for the reply.

        :raises CommandError: (a subclass per error code) when the server answers with an error.
        :raises ConnectionLost: when the connection is or gets closed before the reply (its
            ``__cause__`` says why: an OSError, or the :class:`ProtocolViolation` of a reply
            the client could not understand). The server may or may not have carried it out.
        :raises CallTimeout: when the call does not complete within ``timeout`` seconds. The
            connection stays usable: a request still waiting for its turn to be sent is
            dropped (the server never sees it); one already handed to the socket goes out
            whole, so the server may still carry it out (its late reply is skipped).
        :raises ValueError, TypeError: when ``args`` cannot be encoded as JSON (NaN, sets, ...).
        """
        request_id = next(self._ids)
        # allow_nan=False: NaN is not JSON; better a ValueError here than a bad_request there.
        try:
            line = json.dumps({"cmd": cmd, "args": args, "id": request_id}, separators=(",", ":"),
                              allow_nan=False) + "\n"
        except RecursionError:
            raise ValueError(f"{cmd}: the arguments are nested too deep to encode") from None
        return await self._exchange(line.encode("utf-8"), request_id, _masked(cmd, args), timeout,
                                    self._hook_for(cmd))

    async def call_line(self, line: str, *, timeout: float | None = _DEFAULT) -> Any:
        """Send one request line as typed (inline form, see protocol.md) and return its ``result``.

        :raises CommandError: when the server answers with an error.
        :raises ConnectionLost, CallTimeout: as :meth:`request` does.
        :raises ValueError: for a line the server would not answer (blank, comment, several lines).
        """
        text = line.strip()
        if not text or text.startswith("#") or "\n" in text:
            raise ValueError("call_line needs exactly one request line")
        request_id, name = None, text.split(None, 1)[0]
        if text.startswith("{"):  # a JSON envelope: keep the caller's id, if any, for matching
            try:
                envelope = json.loads(text)
                request_id, name = envelope.get("id"), str(envelope.get("cmd"))
            except (ValueError, AttributeError, RecursionError):  # the server will say what is wrong
                name = "?"
        shown = {"cmd": redact(name), "line": redact(text)}
        return await self._exchange(text.encode("utf-8") + b"\n", request_id, shown, timeout, self._hook_for(name))

    def _hook_for(self, cmd: str) -> Callable[[Any], None] | None:
        """What the reader must do the moment a command succeeds (before it reads the next line)."""
        if cmd == "subscribe":
            return self._subscribed
        if cmd == "unsubscribe":
            return self._unsubscribed
        return None

    async def _exchange(self, data: bytes, request_id: Any, request: dict[str, Any], timeout: float | None,
                        on_ok: Callable[[Any], None] | None = None) -> Any:
        """Send one request line and wait for its reply, both within ``timeout``.

        Requests enter the socket one at a time, in call order, and each only when the socket
        has room (what earlier requests left has drained below the transport's high-water
        mark); the line is then handed over whole, with no await between the last check and
        the write. So a call that times out or is cancelled while waiting for its turn is
        simply dropped, and one that was handed over goes out whole: no request is ever cut
        in half, and the stream stays in step whatever the timeouts (no need to end the
        connection). The client buffers at most one request beyond the high-water mark.
        """
        if timeout is _DEFAULT:
            timeout = self.timeout
        writer, sending = self._writer, self._sending
        self._check_usable(writer)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                async with sending:
                    try:
                        await writer.drain()  # type: ignore[union-attr]
                    except (ConnectionError, OSError) as exc:
                        self._connection_lost(exc, writer)
                    self._check_usable(writer)
                    self._pending.append(_Pending(request_id, future, request, on_ok))
                    writer.write(data)  # type: ignore[union-attr]
                return await future
        except TimeoutError:
            if deadline.expired():
                raise CallTimeout(f"{request['cmd']}: no reply within {timeout}s") from None
            raise
        finally:
            if not future.done():
                future.cancel()  # nobody waits for it now: the reader skips its reply

    def _check_usable(self, writer: asyncio.StreamWriter | None) -> None:
        """:raises ConnectionLost: unless ``writer`` belongs to the live connection."""
        if writer is not None and writer is self._writer and self._lost is None:
            return
        if self._lost is not None and self._writer in (None, writer):
            again = ConnectionLost(str(self._lost))
            again.__cause__ = self._lost.__cause__  # e.g. the ProtocolViolation that ended it
            raise again
        if writer is None:
            raise ConnectionLost("not connected: call connect() first")
        raise ConnectionLost(f"connection to {self._where} lost before the request was sent")

    # --- the reader -----------------------------------------------------------------

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cause: BaseException | None = None
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError as exc:  # LimitOverrunError inside: a reply over max_reply
                    raise ProtocolViolation(f"a reply line exceeded {self.max_reply} bytes") from exc
                if not line.endswith(b"\n"):  # the end, or the connection ended mid-line
                    break
                self._dispatch(line)
        except asyncio.CancelledError:
            raise
        except (ProtocolViolation, ConnectionError, OSError) as exc:
            cause = exc
        except Exception as exc:  # a bug here must not leave calls waiting on a dead reader
            log.exception("reading replies from %s failed", self._where)
            cause = exc
        self._connection_lost(cause, writer)

    def _dispatch(self, line: bytes) -> None:
        message = _parse(line)
        if not isinstance(message, dict):
            raise ProtocolViolation(f"the server sent a line that is not an object: {line[:200]!r}")
        if "event" in message and "id" not in message and "ok" not in message:  # else a reply, keys ignored
            if (not isinstance(message["event"], str) or not isinstance(message.get("data"), dict)
                    or not isinstance(message.get("ts"), str)):
                raise ProtocolViolation(f"the server sent an event line protocol v1 does not allow: {line[:200]!r}")
            self._on_event(message)
            return
        if not self._pending:
            raise ProtocolViolation(f"a reply arrived with no call waiting: {line[:200]!r}")
        pending = self._pending[0]
        ok = message.get("ok")
        if ok is not True and ok is not False:
            raise ProtocolViolation(f"a reply whose ok is neither true nor false: {line[:200]!r}")
        reply_id = message.get("id")
        # Replies come in request order. A null id on an error is the server saying it could
        # not read the request's id (too_large, bad_request): it still answers the head call.
        if not _same_id(pending.id, reply_id) and not (reply_id is None and ok is False):
            raise ProtocolViolation(f"reply id {reply_id!r} does not match the call's id {pending.id!r}")
        if ok and "result" not in message:
            raise ProtocolViolation(f"a success reply without a result: {line[:200]!r}")
        error = message.get("error")
        if not ok and not (isinstance(error, dict) and isinstance(error.get("code"), str)
                           and isinstance(error.get("message"), str)):
            raise ProtocolViolation(f"an error reply without a code and a message: {line[:200]!r}")
        self._pending.popleft()
        if ok and pending.on_ok is not None:
            pending.on_ok(message["result"])  # even when nobody waits: the server did it
        if pending.future.done():  # timed out or cancelled: nobody waits for this reply
            return
        if ok:
            pending.future.set_result(message["result"])
        else:
            pending.future.set_exception(error_for(error["code"], error["message"], pending.request))

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("event") == "shutdown":
            log.info("server %s is shutting down", self._where)
        elif self._subscription is None:
            return  # not subscribed (or no longer): nobody asked for it
        if len(self._events) >= self.event_buffer:
            self._events.popleft()
            self._events_dropped += 1
        self._events.append(message)  # type: ignore[arg-type]
        if self._event_ready is not None:
            self._event_ready.set()

    def _subscribed(self, result: Any) -> None:
        known = isinstance(result, dict) and isinstance(result.get("events"), list)  # else what subscribe asks by default
        self._subscription = result if known else {"events": list(EVENT_NAMES), "vm_id": None}

    def _unsubscribed(self, result: Any) -> None:
        self._subscription = None
        self._events.clear()  # documented: nothing of the old subscription after unsubscribe()
        self._events_dropped = 0

    def _next_event(self) -> Event | None:
        if self._events_dropped:
            dropped, self._events_dropped = self._events_dropped, 0
            return {"event": "overflow", "data": {"dropped": dropped}, "ts": _utc_now()}
        return self._events.popleft() if self._events else None

    def _wake_streams(self) -> None:
        if self._event_ready is not None:
            self._event_ready.set()

    def _connection_lost(self, cause: BaseException | None, writer: asyncio.StreamWriter | None) -> None:
        """End the connection of ``writer`` (if it is still the live one): fail every pending
        call, drop the socket at once (unsent requests too: a confused stream cannot be
        trusted with them), and let the event streams finish."""
        if self._lost is not None or writer is None or writer is not self._writer:
            return
        why = f"connection to {self._where} lost"
        if cause is not None:
            why += f": {cause}"
        lost = ConnectionLost(why)
        lost.__cause__ = cause
        self._fail_all(lost)
        writer.transport.abort()
        self._wake_streams()  # they hand out what is buffered, then end

    def _fail_all(self, error: ConnectionLost) -> None:
        self._lost = error
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)

    # --- one method per operation (protocol.md) ---------------------------------------

    async def add_vm(self, vm_id: str, *, ram: int, cpu: int, disks: Sequence[DiskSpec],
                     password: str | None = None, timeout: float | None = _DEFAULT) -> VM:
        """Register a VM. :raises AlreadyExists: vm_id taken. :raises Conflict: a disk_id clash."""
        args: dict[str, Any] = {"vm_id": vm_id, "ram": ram, "cpu": cpu, "disks": list(disks)}
        if password is not None:
            args["password"] = password
        return await self.call("add_vm", timeout=timeout, **args)

    async def connect_vm(self, vm_id: str, *, ram: int | None = None, cpu: int | None = None,
                         disks: Sequence[DiskSpec] | None = None, password: str | None = None,
                         timeout: float | None = _DEFAULT) -> VM:
        """Connect a VM to this client's session (registering it first when unknown and a spec is given).

        :raises Conflict: connected by another session. :raises InvalidArgs: unknown VM and no spec.
        """
        args = _present(vm_id=vm_id, ram=ram, cpu=cpu, disks=None if disks is None else list(disks),
                        password=password)
        return await self.call("connect_vm", timeout=timeout, **args)

    async def authorize_vm(self, vm_id: str, *, password: str | None = None,
                           timeout: float | None = _DEFAULT) -> VM:
        """:raises NotConnected: not connected by this session. :raises AuthFailed: wrong or missing password."""
        return await self.call("authorize_vm", timeout=timeout, **_present(vm_id=vm_id, password=password))

    async def deauthorize_vm(self, vm_id: str, *, timeout: float | None = _DEFAULT) -> VM:
        """:raises NotAuthorized: not authorized by this session."""
        return await self.call("deauthorize_vm", timeout=timeout, vm_id=vm_id)

    async def update_vm(self, vm_id: str, *, ram: int | None = None, cpu: int | None = None,
                        disks: Sequence[DiskSpec] | None = None, timeout: float | None = _DEFAULT) -> VM:
        """Replace the given fields (``disks`` replaces the whole set).

        :raises NotAuthorized: not authorized by this session. :raises Conflict: a disk_id clash.
        """
        args = _present(vm_id=vm_id, ram=ram, cpu=cpu, disks=None if disks is None else list(disks))
        return await self.call("update_vm", timeout=timeout, **args)

    async def disconnect_vm(self, vm_id: str, *, timeout: float | None = _DEFAULT) -> VM:
        """:raises NotConnected: not connected by this session."""
        return await self.call("disconnect_vm", timeout=timeout, vm_id=vm_id)

    async def get_all_vms(self, *, after: int | None = None, limit: int | None = None,
                          connected: bool | None = None, authorized: bool | None = None,
                          prefix: str | None = None, timeout: float | None = _DEFAULT) -> list[VM]:
        """Every VM, or those matching the filters; a page of them with ``after``/``limit``."""
        args = _present(after=after, limit=limit, connected=connected, authorized=authorized, prefix=prefix)
        return await self.call("get_all_vms", timeout=timeout, **args)

    async def get_vm(self, vm_id: str, *, timeout: float | None = _DEFAULT) -> VM:
        """One VM's record. :raises NotFound:"""
        return await self.call("get_vm", timeout=timeout, vm_id=vm_id)

    async def remove_vm(self, vm_id: str, *, password: str | None = None, timeout: float | None = _DEFAULT) -> VM:
        """Unregister a VM and its disks; returns its last record.

        :raises Conflict: it is connected. :raises AuthFailed: its password is wrong or missing.
        """
        return await self.call("remove_vm", timeout=timeout, **_present(vm_id=vm_id, password=password))

    async def stats(self, *, timeout: float | None = _DEFAULT) -> dict[str, int]:
        """Counts (vms, connected, authorized, disks) and totals (ram, cpu, disk_size)."""
        return await self.call("stats", timeout=timeout)

    async def get_connected_vms(self, *, after: int | None = None, limit: int | None = None,
                     timeout: float | None = _DEFAULT) -> list[VM]:
        """The list, or one page of it: up to ``limit`` records with ids above ``after``."""
        return await self.call("get_connected_vms", timeout=timeout, **_present(after=after, limit=limit))

    async def get_authorized_vms(self, *, after: int | None = None, limit: int | None = None,
                     timeout: float | None = _DEFAULT) -> list[VM]:
        """The list, or one page of it: up to ``limit`` records with ids above ``after``."""
        return await self.call("get_authorized_vms", timeout=timeout, **_present(after=after, limit=limit))

    async def get_all_disks(self, *, after: int | None = None, limit: int | None = None,
                     timeout: float | None = _DEFAULT) -> list[dict[str, Any]]:
        """The list, or one page of it: up to ``limit`` records with ids above ``after``."""
        return await self.call("get_all_disks", timeout=timeout, **_present(after=after, limit=limit))

    async def get_history(self, vm_id: str | None = None, event: str | None = None, since: str | None = None,
                          before: int | None = None, limit: int | None = None, *,
                          timeout: float | None = _DEFAULT) -> list[dict[str, Any]]:
        """What happened to VMs, newest first: ``{"id", "ts", "vm_id", "event", "peer"}`` entries
        (plus ``reason`` or ``command``), filtered by VM, event name and time; page back with
        ``before`` (the last ``id`` you got); ``limit`` 1-10000, the server's default 100.

        :raises InvalidArgs: an unknown event name, a bad time or an out-of-range number.
        :raises ConnectionLost: when the connection is or gets closed before the reply.
        :raises CallTimeout: when no reply comes within ``timeout`` seconds.
        """
        args = _present(vm_id=vm_id, event=event, since=since, before=before, limit=limit)
        return await self.call("get_history", timeout=timeout, **args)

    # --- live events ---------------------------------------------------------------------

    async def subscribe(self, events: Iterable[str] | str | None = None, vm_id: str | None = None, *,
                        timeout: float | None = _DEFAULT) -> dict[str, Any]:
        """Start (or change) this session's live events: all, or only the names in ``events``
        (see :data:`EVENT_NAMES`), and/or only those of ``vm_id``. Returns the server's result,
        ``{"events": [...], "vm_id": ...}``.

        From the moment the reply is read, every event line is kept in the client's bounded
        buffer for :meth:`events`, even before anyone iterates: subscribe first, then cause
        events, then read them, and none is missed. Subscribing again replaces the choice and
        keeps what is buffered.

        :raises InvalidArgs: an unknown event name, an empty list or a bad vm_id.
        :raises ConnectionLost: when the connection is or gets closed before the reply.
        :raises CallTimeout: when no reply comes within ``timeout`` seconds (if the server did
            subscribe, its events are buffered all the same).
        """
        if isinstance(events, str):
            events = [events]
        args = _present(events=None if events is None else list(events), vm_id=vm_id)
        return await self.call("subscribe", timeout=timeout, **args)

    async def unsubscribe(self, *, timeout: float | None = _DEFAULT) -> str:
        """Stop live events. When the reply is read, the events still buffered are dropped:
        once this returns, :meth:`events` yields nothing of the old subscription (a stream waiting
        meanwhile may still get those that came before the reply). Open streams do not end: they
        wait for the next subscription's events, or for the end of the connection.

        :raises ConnectionLost: when the connection is or gets closed before the reply.
        :raises CallTimeout: when no reply comes within ``timeout`` seconds.
        """
        return await self.call("unsubscribe", timeout=timeout)

    @property
    def subscription(self) -> dict[str, Any] | None:
        """What this session is subscribed to (the last subscribe's result), or None."""
        return self._subscription if self.connected else None

    def events(self) -> EventStream:
        """The events of this session, in the order the server sent them, as
        ``{"event", "data", "ts"}`` dicts::

            await c.subscribe(["vm_connected", "vm_disconnected"])
            async for event in c.events():
                print(event["event"], event["data"]["vm_id"])

        Calls keep working on the same client while events flow. Events are buffered from the
        moment a subscribe reply is read (see :meth:`subscribe`) up to ``event_buffer`` of
        them; when the application reads slower than they come, the oldest are dropped and one
        ``{"event": "overflow", "data": {"dropped": N}, ...}`` takes their place, as the server
        does with its own queue (whose overflow events come through too). The server's final
        ``shutdown`` event is always yielded, subscribed or not.

        The iterator ends (``StopAsyncIteration``) when the connection is lost or closed, after
        the events received before that. Events survive neither a reconnect (a new session
        starts unsubscribed: subscribe again) nor :meth:`unsubscribe`.
        """
        return EventStream(self)

    def poll_events(self) -> list[Event]:
        """Every event buffered now, without waiting (the same buffer :meth:`events` reads)."""
        out = []
        while (event := self._next_event()) is not None:
            out.append(event)
        return out

    async def health(self, *, timeout: float | None = _DEFAULT) -> str:
        return await self.call("health", timeout=timeout)

    async def auth(self, token: str, *, timeout: float | None = _DEFAULT) -> str:
        """Present the server's shared token (done by connect() when ``token=`` was given).

        :raises AuthFailed: wrong token.
        """
        return await self.call("auth", timeout=timeout, token=token)


def _present(**args: Any) -> dict[str, Any]:
    """Keyword arguments minus those left at None: the protocol wants absent, not null."""
    return {k: v for k, v in args.items() if v is not None}


async def connect(host: str | None = None, port: int | None = None, **options: Any) -> Client:
    """A connected :class:`Client` (close it with ``await c.close()``); ``hosts=[...]`` for several servers.

    :raises ConnectError: when the server (every one of them) cannot be reached.
    """
    return await Client(host, port, **options).connect()
