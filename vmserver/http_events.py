"""Live events over HTTP (issue 13): ``GET /events?event=…&vm_id=…`` as Server-Sent Events.

The choice is the line protocol's ``subscribe`` (the command itself runs, so the validation and
the default of all events are the same); ``event`` may be comma-separated and/or repeated. Each
event is one SSE message: ``event: <name>`` and ``data: <the line protocol's event line>``
(the whole ``{"event","data","ts"}`` object), framed once for every stream that wants it.

Streams that chose the same events (and VM) share one server.Channel of frames: a stream is
only a position in it, so memory does not grow with the number of watchers, and a slow reader
loses its oldest events past EVENT_QUEUE_MAX and is told with an ``overflow`` event, as on the
line protocol. A comment line every KEEPALIVE seconds of silence keeps proxies from closing the
stream. At shutdown, or when this server loses its lease, every stream gets the ``shutdown``
event and ends; one whose reader does not take it within _GRACE seconds is cut off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .commands import failure, run
from .errors import ErrorCode
from .http_api import error_response
from .protocol import encode_event
from .server import Channel

if TYPE_CHECKING:
    from .http_api import HttpApi

KEEPALIVE = 15.0  # seconds of silence after which a stream gets a comment line (tests lower it)
_TICK = 1.0  # seconds between looks for streams whose client went away (and keepalives due)
_GRACE = 2.0  # seconds a stream has, once ended by the server, to write its last event
_WRITE_MAX = 256 * 1024  # bytes of events written to one stream at a time
_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"}  # (nginx: pass each event on as it comes)


def frame(event: str, line: bytes) -> bytes:
    """One SSE message: the event line is compact ASCII JSON, so it is one ``data:`` line."""
    return b"event: " + event.encode("ascii") + b"\ndata: " + line.rstrip(b"\n") + b"\n\n"


class _Channel(Channel):
    """The line protocol's Channel, of SSE frames; its members are Streams."""

    __slots__ = ("joined",)

    def __init__(self, events: frozenset[str]) -> None:
        super().__init__(events)
        self.joined: tuple[int, int, bytes] = (-1, -1, b"")  # (from, to, bytes): for streams at one position

    def forget_read(self) -> None:
        super().forget_read()  # (a Stream is its own subscription: see Stream)
        if self.joined[1] <= self.first:
            self.joined = (-1, -1, b"")  # every stream is past it


class Stream:
    """One GET /events: an Owner to the subscribe command, and a position in its channel."""

    __slots__ = ("key", "name", "vms", "authenticated", "ended", "hub", "request", "task", "channel", "choice",
                 "cursor", "dropped", "wake", "last_write", "ping", "last_words")

    def __init__(self, hub: EventStreams, request: web.Request, name: str) -> None:
        self.key, self.name, self.vms = "", name, set()  # it never holds a VM
        self.authenticated = True  # the token was checked by the middleware
        self.ended = False
        self.hub, self.request = hub, request
        self.task = asyncio.current_task()
        self.channel: _Channel | None = None
        self.choice: tuple[frozenset[str], str | None] | None = None
        self.cursor = self.dropped = 0
        self.wake = asyncio.Event()
        self.last_write = time.monotonic()
        self.ping = False  # a keepalive is due
        self.last_words: bytes | None = None  # set when the server ends it: written last (b"": nothing)

    @property
    def subscription(self) -> Stream:
        """Its own: Channel reads a member's position as ``subscription.cursor`` (a property,
        not an attribute holding itself: no reference cycle)."""
        return self

    def subscribe(self, events: frozenset[str], vm_id: str | None) -> None:
        self.choice = (events, vm_id)  # joined to a channel once the command is through

    def unsubscribe(self) -> None:
        self.choice = None

    def end(self, last_words: bytes) -> None:
        if self.last_words is None:
            self.last_words = last_words
        self.wake.set()

    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def take(self) -> bytes:
        """The next events for this stream (at most _WRITE_MAX bytes; b"" when none), counting
        in ``dropped`` those it fell too far behind for."""
        channel = self.channel
        assert channel is not None
        if self.cursor >= channel.end:
            return b""
        oldest = channel.oldest
        if self.cursor < oldest:
            self.dropped += oldest - self.cursor
            self.cursor = oldest
        start, stop, block = channel.joined
        if start != self.cursor:  # not joined yet for this position: once for all streams at it
            lines, i = channel.lines, self.cursor - channel.first
            j, size = i, 0
            while j < len(lines) and size < _WRITE_MAX:
                size += len(lines[j])
                j += 1
            stop, block = channel.first + j, b"".join(lines[i:j])
            channel.joined = (self.cursor, stop, block)
        self.cursor = stop
        return block

    def __repr__(self) -> str:
        return f"<Stream {self.name}>"


class EventStreams:
    """Every open GET /events of one HttpApi, and the channels they read."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self.streams: set[Stream] = set()
        self.dropped = 0  # events dropped for slow streams, all told
        self._channels: dict[tuple[frozenset[str], str | None], _Channel] = {}
        self._by_event: dict[str, list[_Channel]] = {}  # channels of every VM, by event name
        self._by_vm: dict[str, list[_Channel]] = {}  # channels of one VM, by VM
        self._dirty: set[_Channel] = set()
        self._flush_scheduled = False
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        api.server.inventory.feed.listen(self._publish)

    # --- the route ----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        args = _stream_args(request)
        if isinstance(args, web.Response):
            return args
        stream = Stream(self, request, self.api._name(request))
        try:
            result = run(self.api.context, stream, "subscribe", args)  # validates; calls stream.subscribe
        except Exception as exc:
            error = failure("subscribe", exc)
            message = error.message  # the query parameter is event=, the command's argument events
            return error_response(error.code, "event" + message[6:] if message.startswith("events") else message)
        assert type(result) is bytes and stream.choice is not None
        if self._closing:
            return error_response(ErrorCode.UNAVAILABLE, "the server is shutting down")
        session = self.api._session_of(request)  # a session named by the stream stays alive with it
        if session is not None:
            session.busy += 1
        response = web.StreamResponse(headers=_HEADERS)
        try:
            self._join(stream)
            await response.prepare(request)
            await response.write(b": subscribed " + result + b"\n\n")
            await self._pump(stream, response)
        except (ConnectionError, OSError):
            pass  # the client went away: nobody to tell
        finally:
            self._leave(stream)
            if session is not None:
                session.busy -= 1
                session.last_active = time.monotonic()
        return response

    async def _pump(self, stream: Stream, response: web.StreamResponse) -> None:
        """Write the stream's events as its reader takes them (write waits while it does not)."""
        while True:
            stream.wake.clear()
            if stream.last_words is not None:
                if stream.last_words:
                    await response.write(stream.last_words)
                await response.write_eof()
                return
            block = stream.take()
            if stream.dropped:
                dropped, stream.dropped = stream.dropped, 0
                self.dropped += dropped
                await response.write(frame("overflow", encode_event("overflow", {"dropped": dropped})))
            if block:
                await response.write(block)
            elif stream.ping:
                await response.write(b": keepalive\n\n")
            else:
                await stream.wake.wait()
                continue
            stream.ping = False
            stream.last_write = time.monotonic()

    def _join(self, stream: Stream) -> None:
        assert stream.choice is not None
        events, vm_id = stream.choice
        channel = self._channels.get(stream.choice)
        if channel is None:
            channel = self._channels[stream.choice] = _Channel(events)
            index = self._by_event if vm_id is None else self._by_vm
            for key in events if vm_id is None else (vm_id,):
                index.setdefault(key, []).append(channel)
        channel.members.add(stream)  # type: ignore[arg-type]
        stream.channel, stream.cursor = channel, channel.end  # only what happens from now on
        self.streams.add(stream)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def behind(self) -> tuple[int, int]:
        """(streams open, events they lost and have not been told of yet), for GET /metrics."""
        return len(self.streams), sum(max(0, s.channel.oldest - s.cursor) for s in self.streams if s.channel)

    def _leave(self, stream: Stream) -> None:
        self.streams.discard(stream)
        stream.ended = True
        channel, stream.channel = stream.channel, None
        if channel is None:
            return
        self.dropped += max(0, channel.oldest - stream.cursor) + stream.dropped  # lost all the same
        channel.members.discard(stream)  # type: ignore[arg-type]
        if channel.members:
            return
        events, vm_id = choice = stream.choice  # type: ignore[misc]
        del self._channels[choice]
        self._dirty.discard(channel)
        index = self._by_event if vm_id is None else self._by_vm
        for key in events if vm_id is None else (vm_id,):
            index[key].remove(channel)
            if not index[key]:
                del index[key]

    # --- events -------------------------------------------------------------------------

    def _publish(self, event: str, vm_id: str, data: Callable[[], bytes]) -> None:
        """An inventory change (here or, in a cluster, on another server): framed once, appended
        to every channel that wants it; their streams are woken once per loop turn."""
        shared, own = self._by_event.get(event), self._by_vm.get(vm_id)
        if not shared and not own:
            return
        message = frame(event, encode_event(event, data()))
        dirty = self._dirty
        for channel in shared or ():
            channel.append(message)
            dirty.add(channel)
        for channel in own or ():
            if event in channel.events:
                channel.append(message)
                dirty.add(channel)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for channel in self._dirty:
            channel.forget_read()  # what every stream has written since the last turn
            for stream in channel.members:
                stream.wake.set()  # type: ignore[attr-defined]
        self._dirty.clear()

    async def _tick(self) -> None:
        """One timer for all streams: a keepalive after KEEPALIVE seconds of silence; a stream
        whose client went away while it waited for events is ended (aiohttp does not cancel it)."""
        silence = KEEPALIVE
        while True:
            await asyncio.sleep(min(_TICK, silence / 3))
            due = time.monotonic() - silence
            for stream in list(self.streams):
                if stream.gone():
                    stream.end(b"")
                elif stream.last_write < due:
                    stream.ping = True
                    stream.wake.set()

    # --- the end ------------------------------------------------------------------------

    def end_all(self) -> list[asyncio.Task[object]]:
        """Send every stream the ``shutdown`` event and end it (this server stops, or lost its
        lease); one still open _GRACE seconds later is cut off. Returns their tasks."""
        last_words = frame("shutdown", encode_event("shutdown", {}))
        streams = list(self.streams)
        for stream in streams:
            stream.end(last_words)
        if streams:
            asyncio.get_running_loop().call_later(_GRACE, _cut_off, streams)
        return [s.task for s in streams if s.task is not None]  # type: ignore[misc]

    async def close(self, app: web.Application | None = None) -> None:
        """Before aiohttp waits for its handlers at shutdown: end every stream, wait (bounded)."""
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        tasks = self.end_all()
        if tasks:
            await asyncio.wait(tasks, timeout=_GRACE + 1.0)


def _cut_off(streams: list[Stream]) -> None:
    for stream in streams:
        if not stream.ended and stream.request.transport is not None:
            stream.request.transport.abort()  # its write waiting for the reader fails: the handler ends


def _stream_args(request: web.Request) -> dict[str, object] | web.Response:
    """subscribe's arguments from the query: ``event`` (comma-separated and/or repeated) and ``vm_id``."""
    args: dict[str, object] = {}
    for name in dict.fromkeys(request.query):
        values = request.query.getall(name)
        if name == "event":
            args["events"] = [item for value in values for item in value.split(",")]
        elif name == "vm_id":
            if len(values) > 1:
                return error_response(ErrorCode.BAD_REQUEST, f"query parameter 'vm_id' given {len(values)} times")
            args["vm_id"] = values[0]
        else:
            return error_response(ErrorCode.INVALID_ARGS, f"unknown query parameter {name!r} for GET /events "
                          "(allowed: event, vm_id)")
    return args
