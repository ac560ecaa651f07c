"""The asyncio client library: one connection, many concurrent calls, replies matched by id.

The server answers requests strictly in order, so pending calls wait in a FIFO; each reply
must carry the id of the call at its head (a check that catches a confused stream). One
reader task reads every line; when the connection ends, every pending call fails with
:class:`ConnectionLost` instead of hanging.

Event lines (protocol.md, "Events") are set aside by the same reader into a bounded buffer
while the session is subscribed, and handed out by :meth:`Client.events`; calls go on working
meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
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
DEFAULT_PORT = 8888
MAX_REPLY = 256 * 1024 * 1024  # a 100,000-VM list is tens of MB on one line
EVENT_BUFFER = 10_000  # events held for the application before the oldest are dropped
EVENT_NAMES = ("vm_added", "vm_updated", "vm_removed", "vm_connected", "vm_disconnected", "vm_authorized",
               "vm_deauthorized", "auth_failed")
"""The event names ``subscribe`` takes (protocol.md); ``overflow`` and ``shutdown`` come unasked."""
_DEFAULT: Any = object()  # "use the client's default timeout"


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

    :param timeout: default seconds each call waits for its reply (None: forever).
    :param connect_timeout: seconds to connect and receive the greeting.
    :param max_reply: longest reply line accepted, in bytes.
    :param token: the server's shared token, presented with ``auth`` on every (re)connect.
    :param tls: True to speak TLS (verifying the server against ``cafile``, or the system's
        CAs), or a ready ``ssl.SSLContext``.
    :param cafile: PEM file of the CA (or the self-signed certificate) to trust for TLS.
    :param event_buffer: how many events :meth:`events` holds for the application before the
        oldest are dropped (then it yields one ``overflow`` event saying how many).
    :raises ValueError: for an ``event_buffer`` below 1.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, timeout: float | None = 30.0,
                 connect_timeout: float = 10.0, max_reply: int = MAX_REPLY, token: str | None = None,
                 tls: bool | ssl.SSLContext = False, cafile: str | None = None,
                 event_buffer: int = EVENT_BUFFER) -> None:
        if not isinstance(event_buffer, int) or event_buffer < 1:
            raise ValueError(f"event_buffer must be an integer of at least 1, got {event_buffer!r}")
        self.host, self.port = host, port
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

    # --- connection -----------------------------------------------------------------

    async def connect(self) -> Client:
        """Connect and read the greeting.

        :raises ConnectError: when the server cannot be reached or is not a protocol-1 vmserver.
        """
        if self._writer is not None:
            return self
        where = f"{self.host}:{self.port}"
        context = self._ssl_context()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, limit=self.max_reply, ssl=context,
                server_hostname=self.host if context else None), self.connect_timeout)
        except asyncio.TimeoutError as exc:
            raise ConnectError(f"cannot connect to {where}: timed out after {self.connect_timeout}s") from exc
        except ssl.SSLError as exc:
            raise ConnectError(f"cannot connect to {where}: TLS failed: {exc.reason or exc}") from exc
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConnectError(f"cannot connect to {where}: {reason}") from exc
        try:
            hello = await self._greeting(reader, where)
        except BaseException:
            writer.close()
            raise
        self.server_info = hello
        self._reader, self._writer, self._lost = reader, writer, None
        self._generation += 1  # a new session: nothing subscribed, nothing buffered
        self._events.clear()
        self._events_dropped = 0
        self._subscription = None
        if self._event_ready is not None:
            self._event_ready.set()  # streams of the old connection end
        self._event_ready = asyncio.Event()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader))
        if self._token is not None:
            try:
                await self.auth(self._token)
            except ClientError as exc:
                await self.close()
                raise ConnectError(f"{where} did not accept the token: {exc}") from exc
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        if isinstance(self._tls, ssl.SSLContext):
            return self._tls
        return ssl.create_default_context(cafile=self._cafile) if self._tls or self._cafile else None

    async def _greeting(self, reader: asyncio.StreamReader, where: str) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), self.connect_timeout)
            first = json.loads(line) if line else None
        except asyncio.TimeoutError as exc:
            raise ConnectError(f"connected to {where}, but no greeting came within {self.connect_timeout}s") from exc
        except (OSError, ValueError) as exc:
            raise ConnectError(f"{where} did not greet like a vmserver") from exc
        if isinstance(first, dict) and isinstance(first.get("error"), dict):  # e.g. too many connections
            error = first["error"]
            raise ConnectError(f"{where} refused the connection: {error.get('code')}: {error.get('message')}")
        hello = first.get("hello") if isinstance(first, dict) else None
        if not isinstance(hello, dict) or hello.get("server") != "vmserver":
            raise ConnectError(f"{where} is not a vmserver (greeting: {line[:200]!r})")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise ConnectError(f"{where} speaks protocol {hello.get('protocol')}, this client {PROTOCOL_VERSION}")
        return hello

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._lost is None

    @property
    def commands(self) -> list[str]:
        """The command names the server announced."""
        return list(self.server_info.get("commands", []))

    async def close(self) -> None:
        """Close the connection. Calls still pending fail with ConnectionLost."""
        writer, task = self._writer, self._reader_task
        if writer is None:
            return
        self._fail_all(ConnectionLost("the client was closed"))
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._writer = self._reader = self._reader_task = None
        self._wake_streams()

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

        :raises CommandError: (a subclass per error code) when the server answers with an error.
        :raises ConnectionLost: when the connection is or gets closed before the reply.
        :raises CallTimeout: when no reply comes within ``timeout`` seconds.
        :raises ValueError, TypeError: when ``args`` cannot be encoded as JSON (NaN, sets, ...).
        """
        request_id = next(self._ids)
        # allow_nan=False: NaN is not JSON; better a ValueError here than a bad_request there.
        line = json.dumps({"cmd": cmd, "args": args, "id": request_id}, separators=(",", ":"), allow_nan=False) + "\n"
        return await self._exchange(line.encode("utf-8"), request_id, _masked(cmd, args), timeout,
                                    self._hook_for(cmd))

    async def call_line(self, line: str, *, timeout: float | None = _DEFAULT) -> Any:
        """Send one request line as typed (inline form, see protocol.md) and return its ``result``.

        :raises CommandError: when the server answers with an error.
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
            except (ValueError, AttributeError):
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
        if self._lost is not None:
            raise ConnectionLost(str(self._lost))
        if self._writer is None:
            raise ConnectionLost("not connected: call connect() first")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request_id, future, request, on_ok))
        self._writer.write(data)  # appended and written with no await between: order is kept
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._connection_lost(exc)
        if timeout is _DEFAULT:
            timeout = self.timeout
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(f"{request['cmd']}: no reply within {timeout}s") from None

    # --- the reader -----------------------------------------------------------------

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        cause: BaseException | None = None
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                self._dispatch(line)
        except asyncio.CancelledError:
            raise
        except ValueError as exc:  # LimitOverrunError: a reply over max_reply
            cause = ProtocolViolation(f"a reply line exceeded {self.max_reply} bytes")
            cause.__cause__ = exc
        except ProtocolViolation as exc:
            cause = exc
        except (ConnectionError, OSError) as exc:
            cause = exc
        self._connection_lost(cause)

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ProtocolViolation(f"the server sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise ProtocolViolation(f"the server sent a line that is not an object: {line[:200]!r}")
        if "event" in message:
            self._on_event(message)
            return
        if not self._pending:
            raise ProtocolViolation(f"a reply arrived with no call waiting: {line[:200]!r}")
        pending = self._pending[0]
        reply_id = message.get("id")
        # Replies come in request order. A null id on an error is the server saying it could
        # not read the request's id (too_large, bad_request): it still answers the head call.
        if reply_id != pending.id and not (reply_id is None and message.get("ok") is False):
            raise ProtocolViolation(f"reply id {reply_id!r} does not match the call's id {pending.id!r}")
        self._pending.popleft()
        if pending.on_ok is not None and message.get("ok") is True:
            pending.on_ok(message.get("result"))  # even when nobody waits: the server did it
        if pending.future.done():  # timed out or cancelled: nobody waits for this reply
            return
        if message.get("ok") is True:
            pending.future.set_result(message.get("result"))
        else:
            error = message.get("error") or {}
            pending.future.set_exception(
                error_for(str(error.get("code", "")), str(error.get("message", "")), pending.request))

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("event") == "shutdown":
            log.info("server %s:%s is shutting down", self.host, self.port)
        elif self._subscription is None:
            return  # not subscribed (or no longer): nobody asked for it
        if len(self._events) >= self.event_buffer:
            self._events.popleft()
            self._events_dropped += 1
        self._events.append(message)  # type: ignore[arg-type]
        if self._event_ready is not None:
            self._event_ready.set()

    def _subscribed(self, result: Any) -> None:
        self._subscription = result if isinstance(result, dict) else {"events": list(EVENT_NAMES), "vm_id": None}

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

    def _connection_lost(self, cause: BaseException | None) -> None:
        if self._lost is not None:
            return
        why = f"connection to {self.host}:{self.port} lost"
        if cause is not None:
            why += f": {cause}"
        lost = ConnectionLost(why)
        lost.__cause__ = cause
        self._fail_all(lost)
        if self._writer is not None:
            self._writer.close()  # a confused stream cannot be trusted with more requests
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


async def connect(host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options: Any) -> Client:
    """A connected :class:`Client` (close it with ``await c.close()``).

    :raises ConnectError: when the server cannot be reached.
    """
    return await Client(host, port, **options).connect()
