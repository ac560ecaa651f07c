"""The client library when the other side misbehaves: a stopped server (the timeout must cover
sending), replies and greetings it cannot understand (the connection ends, nothing hangs), and
reconnecting after a loss.

The misbehaving peers are tiny servers written here (``asyncio.start_server`` on 127.0.0.1,
port 0) that send the bad lines; the stopped server is a real vmserver subprocess under
SIGSTOP. Nothing of vmclient or vmserver is mocked.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import vmclient
from conftest import running

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
STEP = 5.0  # no single await in these tests may take longer than this
GREETING = b'{"hello":{"server":"vmserver","version":"x","protocol":1,"commands":["health"]}}\n'
BLOB = "x" * 500_000  # with 40 calls, far more than loopback socket buffers hold


async def bounded(aw: Awaitable[Any], seconds: float = STEP) -> Any:
    return await asyncio.wait_for(aw, seconds)


async def until(condition: Callable[[], bool], seconds: float = STEP) -> None:
    """Wait (bounded) until ``condition()`` holds, letting the loop run meanwhile."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await bounded(poll(), seconds)


async def everything(stream: vmclient.client.EventStream) -> list[dict[str, Any]]:
    return [event async for event in stream]


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler during the test ("Future exception was
    never retrieved", a reader task that died): it must stay empty."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)


def unhandled(seen: list[dict[str, Any]]) -> list[str]:
    gc.collect()  # a future nobody retrieved complains when it is collected
    return [str(context.get("message")) + ": " + repr(context.get("exception")) for context in seen]


# --- a tiny peer ------------------------------------------------------------------------------

Answer = Callable[[int, dict[str, Any]], bytes | None]  # (request number, request) -> the reply line


class Peer:
    """A loopback server that greets with ``greeting`` (and ``then``) and answers request ``n``
    (from 0) of session ``s`` with ``answers[s](n, request)`` (None: no answer; the last one
    serves any later session). :meth:`stop_reading` plays a server that stopped: it takes no
    more bytes from its sockets, so the client's socket buffers fill."""

    def __init__(self, greeting: bytes, *answers: Answer, then: bytes = b"") -> None:
        self.greeting, self.answers, self.then = greeting, answers, then
        self.lines: list[bytes] = []
        self.sessions = 0
        self.closed = asyncio.Event()  # a client closed its side
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> Peer:
        self.srv = await asyncio.start_server(self._serve, HOST, 0, limit=1 << 24)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.srv.close()
        for w in self.writers:
            w.close()
        await bounded(self.srv.wait_closed())

    def stop_reading(self) -> None:
        for w in self.writers:
            w.transport.pause_reading()

    def resume_reading(self) -> None:
        for w in self.writers:
            w.transport.resume_reading()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        answer = self.answers[min(self.sessions, len(self.answers) - 1)] if self.answers else None
        self.sessions += 1
        try:
            writer.write(self.greeting + self.then)
            await writer.drain()
            n = 0
            while True:
                line = await reader.readline()
                if not line:
                    break
                self.lines.append(line)
                reply = answer(n, json.loads(line)) if answer else None
                n += 1
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
            self.closed.set()
        except (ConnectionError, OSError):
            self.closed.set()
        finally:
            writer.close()


def ok(n: int, request: dict[str, Any]) -> bytes:
    return json.dumps({"id": request.get("id"), "ok": True, "result": "OK"}).encode() + b"\n"


def first_with(template: bytes) -> Answer:
    """Answer the first request with ``template`` (``ID`` replaced by its id), the rest never."""
    def answer(n: int, request: dict[str, Any]) -> bytes | None:
        return template.replace(b"ID", json.dumps(request.get("id")).encode()) + b"\n" if n == 0 else None

    return answer


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- 12: the timeout covers sending -----------------------------------------------------------


async def test_timeout_covers_sending_to_a_stopped_server(spawn, tmp_path: Path, loop_errors) -> None:
    """The report: a SIGSTOPped server, 40 calls of 500 KB with timeout=2. Every call raises
    CallTimeout (none waits on in the send), and once the server runs again the connection
    works: whatever was sent went out whole, so replies still match their calls."""
    p = spawn("--port", "0", "--db", str(tmp_path / "s.db"))
    port = p.wait_listening()
    c = await bounded(vmclient.connect(HOST, port))
    try:
        assert await bounded(c.health()) == "OK"
        os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            results = await bounded(asyncio.gather(
                *(c.call("health", pad=BLOB, timeout=2.0) for _ in range(40)), return_exceptions=True), 10.0)
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)
        assert [type(r) for r in results] == [vmclient.CallTimeout] * 40, results
        assert c.connected is True
        assert await bounded(c.health(timeout=STEP)) == "OK"
        assert await bounded(c.get_all_vms(timeout=STEP)) == []
    finally:
        await bounded(c.close())
    assert unhandled(loop_errors) == []


async def test_a_call_not_yet_sent_is_dropped_and_lines_stay_whole(loop_errors) -> None:
    """A peer that stops reading: calls that time out before their turn to send never reach it;
    those that were handed to the socket arrive whole, and the next call is answered."""
    async with Peer(GREETING, ok) as peer:
        c = await bounded(vmclient.connect(HOST, peer.port))
        try:
            peer.stop_reading()
            results = await bounded(asyncio.gather(
                *(c.call("echo", pad=BLOB, timeout=1.0) for _ in range(40)), return_exceptions=True), 10.0)
            assert [type(r) for r in results] == [vmclient.CallTimeout] * 40, results
            peer.resume_reading()
            assert await bounded(c.health(timeout=STEP)) == "OK"
            requests = [json.loads(line) for line in peer.lines]  # each one whole JSON
            assert requests[-1]["cmd"] == "health"
            sent = [r for r in requests if r["cmd"] == "echo"]
            assert 1 <= len(sent) < 40
            assert all(r["args"] == {"pad": BLOB} for r in sent)
            assert [r["id"] for r in requests] == sorted({r["id"] for r in requests})  # in call order, once each
            assert c.connected is True
        finally:
            await bounded(c.close())
    assert unhandled(loop_errors) == []


async def test_close_ends_calls_stuck_sending(loop_errors) -> None:
    """Calls without a timeout, stuck because the peer reads nothing: close() fails them all
    with ConnectionLost instead of leaving them waiting for room forever."""
    async with Peer(GREETING, ok) as peer:
        c = await bounded(vmclient.connect(HOST, peer.port))
        peer.stop_reading()
        calls = [asyncio.ensure_future(c.call("echo", pad=BLOB, timeout=None)) for _ in range(40)]
        await asyncio.sleep(0.5)
        assert not any(call.done() for call in calls)
        await bounded(c.close())
        results = await bounded(asyncio.gather(*calls, return_exceptions=True))
        assert [type(r) for r in results] == [vmclient.ConnectionLost] * 40, results
    assert unhandled(loop_errors) == []


async def test_cancelled_calls_leave_nothing_unretrieved(loop_errors) -> None:
    """The report's tail: cancelling calls stuck sending, then closing, logged "Future exception
    was never retrieved"."""
    async with Peer(GREETING, ok) as peer:
        c = await bounded(vmclient.connect(HOST, peer.port))
        peer.stop_reading()
        calls = [asyncio.ensure_future(c.call("echo", pad=BLOB, timeout=None)) for _ in range(40)]
        await asyncio.sleep(0.5)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await bounded(c.close())
        del calls
    assert unhandled(loop_errors) == []


# --- 13: replies the client cannot understand -------------------------------------------------

ODD_REPLIES = {
    "error not an object": b'{"id":ID,"ok":false,"error":"boom"}',
    "error without code": b'{"id":ID,"ok":false,"error":{"message":"boom"}}',
    "error code not a string": b'{"id":ID,"ok":false,"error":{"code":7,"message":"boom"}}',
    "error without message": b'{"id":ID,"ok":false,"error":{"code":"not_found"}}',
    "ok missing": b'{"id":ID,"result":"OK"}',
    "ok not a boolean": b'{"id":ID,"ok":1,"result":"OK"}',
    "ok a string": b'{"id":ID,"ok":"true","result":"OK"}',
    "ok true without result": b'{"id":ID,"ok":true}',
    "result nested 5,000 deep": b'{"id":ID,"ok":true,"result":' + nested(5000) + b"}",
    "id a string": b'{"id":"1","ok":true,"result":"OK"}',
    "id true for 1": b'{"id":true,"ok":true,"result":"OK"}',
    "id 1.0 for 1": b'{"id":1.0,"ok":true,"result":"OK"}',
    "id null on success": b'{"id":null,"ok":true,"result":"OK"}',
    "not JSON": b"this is not json",
    "not UTF-8": b'{"id":ID,"ok":true,"result":"\xff\xfe"}',
    "NaN": b'{"id":ID,"ok":true,"result":NaN}',
    "not an object": b"[1,2,3]",
    "event name not a string": b'{"event":5,"data":{},"ts":"2026-11-26T21:00:00.000Z"}',
    "event data not an object": b'{"event":"vm_added","data":"x","ts":"2026-11-26T21:00:00.000Z"}',
    "event with an id": b'{"event":"vm_added","data":{},"ts":"2026-11-26T21:00:00.000Z","id":ID}',
    "event nested 5,000 deep": b'{"event":"vm_added","data":{"x":' + nested(5000) + b'},"ts":"t"}',
}


@pytest.mark.parametrize("line", ODD_REPLIES.values(), ids=ODD_REPLIES.keys())
async def test_odd_reply_ends_the_connection(line: bytes, loop_errors) -> None:
    """Every pending call fails at once with ConnectionLost whose cause is the ProtocolViolation;
    later calls fail at once too; ``connected`` says False; the reader leaves no dead task."""
    async with Peer(GREETING, first_with(line)) as peer:
        c = await bounded(vmclient.connect(HOST, peer.port, timeout=None))
        try:
            results = await bounded(asyncio.gather(c.health(), c.get_all_vms(), return_exceptions=True))
            for r in results:
                assert type(r) is vmclient.ConnectionLost, r
                assert isinstance(r.__cause__, vmclient.ProtocolViolation), repr(r.__cause__)
            assert c.connected is False
            later = await bounded(asyncio.gather(c.health(), return_exceptions=True), 1.0)
            assert type(later[0]) is vmclient.ConnectionLost
            assert isinstance(later[0].__cause__, vmclient.ProtocolViolation)
            await bounded(peer.closed.wait())  # the client hung up
        finally:
            await bounded(c.close())
    assert unhandled(loop_errors) == []


async def test_reply_with_no_call_waiting_ends_the_connection(loop_errors) -> None:
    async with Peer(GREETING, ok, then=b'{"id":999,"ok":true,"result":"OK"}\n') as peer:
        c = await bounded(vmclient.connect(HOST, peer.port, timeout=None))
        try:
            await until(lambda: not c.connected)
            e = await bounded(asyncio.gather(c.health(), return_exceptions=True), 1.0)
            assert type(e[0]) is vmclient.ConnectionLost
            assert isinstance(e[0].__cause__, vmclient.ProtocolViolation)
            assert "no call waiting" in str(e[0])
        finally:
            await bounded(c.close())
    assert unhandled(loop_errors) == []


async def test_over_long_reply_ends_the_connection(loop_errors) -> None:
    long = b'{"id":ID,"ok":true,"result":"' + b"y" * 5000 + b'"}'
    async with Peer(GREETING, first_with(long)) as peer:
        c = await bounded(vmclient.connect(HOST, peer.port, timeout=None, max_reply=2000))
        try:
            e = await bounded(asyncio.gather(c.health(), return_exceptions=True))
            assert type(e[0]) is vmclient.ConnectionLost
            assert isinstance(e[0].__cause__, vmclient.ProtocolViolation)
            assert "2000" in str(e[0])
            assert c.connected is False
        finally:
            await bounded(c.close())
    assert unhandled(loop_errors) == []


async def test_event_stream_ends_after_a_protocol_violation(loop_errors) -> None:
    """Events received before the violation are handed out, then the stream ends."""
    event = b'{"event":"vm_added","data":{"vm_id":"vm-1"},"ts":"2026-11-26T21:00:00.000Z"}\n'

    def answer(n: int, request: dict[str, Any]) -> bytes:
        reply = json.dumps({"id": request["id"], "ok": True, "result": {"events": ["vm_added"], "vm_id": None}})
        return reply.encode() + b"\n" + event + b'{"id":5,"ok":true,"result":' + nested(5000) + b"}\n"

    async with Peer(GREETING, answer) as peer:
        c = await bounded(vmclient.connect(HOST, peer.port, timeout=None))
        try:
            await bounded(c.subscribe(["vm_added"]))
            stream = c.events()
            first = await bounded(stream.__anext__())
            assert first["event"] == "vm_added"
            with pytest.raises(StopAsyncIteration):
                await bounded(stream.__anext__())
            assert c.connected is False
        finally:
            await bounded(c.close())
    assert unhandled(loop_errors) == []


def hello(**fields: Any) -> bytes:
    base = {"server": "vmserver", "version": "x", "protocol": 1, "commands": ["health"]}
    return json.dumps({"hello": {**base, **fields}}).encode() + b"\n"


ODD_GREETINGS = {
    "nested 100,000 deep": b'{"hello":' + nested(100_000) + b"}\n",
    "hello nested 100,000 deep": b'{"hello":{"server":"vmserver","protocol":1,"x":' + nested(100_000) + b"}}\n",
    "a list": b"[1,2]\n",
    "a string": b'"hello"\n',
    "null": b"null\n",
    "a number": b"1\n",
    "hello not an object": b'{"hello":"vmserver"}\n',
    "commands not a list": hello(commands="health"),
    "commands not strings": hello(commands=[1, 2]),
    "protocol true": hello(protocol=True),
    "not UTF-8": b'{"hello":{"server":"vm\xffserver"}}\n',
    "NaN": b'{"hello":{"server":"vmserver","version":NaN,"protocol":1,"commands":[]}}\n',
    "an empty line": b"\n",
    "refusal not an object": b'{"error":"busy"}\n',
}


@pytest.mark.parametrize("greeting", ODD_GREETINGS.values(), ids=ODD_GREETINGS.keys())
async def test_odd_greeting_is_a_connect_error(greeting: bytes, loop_errors) -> None:
    async with Peer(greeting) as peer:
        c = vmclient.Client(HOST, peer.port, connect_timeout=2.0)
        with pytest.raises(vmclient.ConnectError):
            await bounded(c.connect())
        assert c.connected is False
        await bounded(peer.closed.wait())  # the client hung up
    assert unhandled(loop_errors) == []


async def test_over_long_greeting_is_a_connect_error(loop_errors) -> None:
    async with Peer(hello(version="v" * 5000)) as peer:
        c = vmclient.Client(HOST, peer.port, connect_timeout=2.0, max_reply=4000)
        with pytest.raises(vmclient.ConnectError):
            await bounded(c.connect())
        assert c.connected is False
        await bounded(peer.closed.wait())
    assert unhandled(loop_errors) == []


# --- 14: reconnecting -------------------------------------------------------------------------


async def test_connect_after_a_lost_connection_reconnects(db: str, loop_errors) -> None:
    """The server stops and another starts on its port: connect() on the same client gets a new
    session (the old reader and writer cleaned up), and ``connected`` says so at each step."""
    async with running(db) as first:
        port = first.address[1]
        c = vmclient.Client(HOST, port, timeout=STEP)
        await bounded(c.connect())
        await bounded(c.connect_vm("vm-1", ram=1, cpu=1, disks=[]))
        await bounded(c.subscribe())
        stream = c.events()
    try:
        await until(lambda: not c.connected)
        events = await bounded(everything(stream))
        assert events[-1]["event"] == "shutdown"
        async with running(db, port=port):
            assert await bounded(c.connect()) is c
            assert c.connected is True
            assert c.subscription is None  # a new session starts unsubscribed
            vm = await bounded(c.get_vm("vm-1"))
            assert vm["connected"] is False  # the old session's hold ended with it
            assert (await bounded(c.connect_vm("vm-1")))["connected"] is True
            with pytest.raises(StopAsyncIteration):  # the old connection's stream stays ended
                await bounded(stream.__anext__())
            await bounded(c.close())
            assert c.connected is False
            await bounded(c.connect())  # and after close(), as before
            assert await bounded(c.health()) == "OK"
    finally:
        await bounded(c.close())
    assert unhandled(loop_errors) == []


async def test_connect_after_a_protocol_violation_reconnects(loop_errors) -> None:
    async with Peer(GREETING, first_with(b'{"id":ID,"ok":false,"error":"boom"}'), ok) as peer:
        c = await bounded(vmclient.connect(HOST, peer.port, timeout=STEP))
        try:
            with pytest.raises(vmclient.ConnectionLost):
                await bounded(c.health())
            assert c.connected is False
            await bounded(c.connect())
            assert c.connected is True
            assert await bounded(c.health()) == "OK"
            assert peer.sessions == 2
        finally:
            await bounded(c.close())
    assert unhandled(loop_errors) == []


async def test_connect_on_a_live_client_keeps_its_session(client: vmclient.Client) -> None:
    await bounded(client.connect_vm("vm-1", ram=1, cpu=1, disks=[]))
    assert await bounded(client.connect()) is client
    assert (await bounded(client.disconnect_vm("vm-1")))["connected"] is False  # same session


async def test_concurrent_connects_open_one_session(loop_errors) -> None:
    async with Peer(GREETING, ok) as peer:
        c = vmclient.Client(HOST, peer.port, timeout=STEP)
        try:
            await bounded(asyncio.gather(c.connect(), c.connect(), c.connect()))
            assert await bounded(c.health()) == "OK"
            assert peer.sessions == 1
        finally:
            await bounded(c.close())
    assert unhandled(loop_errors) == []


# --- unusable addresses and TLS files -----------------------------------------------------------


@pytest.mark.parametrize("host,port", [(HOST, 99999), (HOST, -1), ("a" * 300, 1), ("a\x00b", 1)],
                         ids=["port 99999", "port -1", "host label too long", "host with NUL"])
async def test_unusable_address_is_a_connect_error(host: str, port: int) -> None:
    with pytest.raises(vmclient.ConnectError) as info:
        await bounded(vmclient.connect(host, port, connect_timeout=2.0))
    assert "cannot connect" in str(info.value)


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "not PEM"])
async def test_unusable_cafile_is_a_connect_error(tmp_path: Path, content: bytes | None) -> None:
    async with Peer(GREETING) as peer:
        cafile = tmp_path / "ca.pem"
        if content is not None:
            cafile.write_bytes(content)
        with pytest.raises(vmclient.ConnectError) as info:
            await bounded(vmclient.connect(HOST, peer.port, cafile=str(cafile)))
        assert str(cafile) in str(info.value)
