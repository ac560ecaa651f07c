"""Live events over HTTP (issue 13): GET /events as Server-Sent Events, on a real server, read by
aiohttp's client, by a raw HTTP/1.0 socket (one that can stop reading), and by real curl -N.

Every SSE message is parsed strictly (event and data fields only, a blank line after) and its
data must be the line protocol's event object, with the same name as its ``event:`` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from conftest import TIMEOUT, Wire, disk, vm_args
from test_events import ALL_EVENTS, check_event, walk
from test_cluster import nodes  # noqa: F401  (server processes on one PostgreSQL)
from test_http import _http_port, client, code, get, http_server, post
from vmserver import http_events
from vmserver import server as server_module

Readline = Callable[[], Awaitable[bytes]]


async def message(readline: Readline) -> dict:
    """The next SSE message: the line protocol's event object from its data, checked against its
    ``event:`` field; or ``{"comment": text}`` for a block of comment lines."""
    fields: dict[str, bytes] = {}
    comments: list[str] = []
    while True:
        line = await asyncio.wait_for(readline(), TIMEOUT)
        assert line.endswith(b"\n"), f"the stream ended inside a message: {line[:200]!r}"
        line = line[:-1]
        if not line:
            if fields or comments:
                break
            continue
        if line.startswith(b":"):
            comments.append(line[1:].strip().decode())
            continue
        name, colon, value = line.partition(b":")
        assert colon and name.decode() in ("event", "data") and name.decode() not in fields, line[:200]
        fields[name.decode()] = value[1:] if value.startswith(b" ") else value
    if not fields:
        return {"comment": " ".join(comments)}
    assert set(fields) == {"event", "data"} and not comments, fields
    event = check_event(json.loads(fields["data"]))
    assert event["event"] == fields["event"].decode(), fields
    return event


async def events(readline: Readline, until: Callable[[dict], bool] | int, most: int = 100_000) -> list[dict]:
    """Events (comments skipped) up to and including the first for which ``until`` is true (or
    ``until`` of them)."""
    out: list[dict] = []
    for _ in range(most):
        msg = await message(readline)
        if "comment" in msg:
            continue
        out.append(msg)
        if len(out) == until if isinstance(until, int) else until(msg):
            return out
    raise AssertionError(f"no end after {most} events")


def brief(msgs: list[dict]) -> list[tuple[str, str]]:
    return [(m["event"], m["data"].get("vm_id")) for m in msgs]


@contextlib.asynccontextmanager
async def stream(http: aiohttp.ClientSession, url: str, **kw: Any) -> AsyncIterator[aiohttp.ClientResponse]:
    """An open GET /events whose subscription is live (its first comment says so)."""
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT), **kw) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await message(r.content.readline)
        assert first["comment"].startswith("subscribed {"), first
        yield r


async def raw_stream(port: int, query: str = "", rcvbuf: int = 8192) -> tuple[asyncio.StreamReader, Any]:
    """GET /events over HTTP/1.0 (the body is the stream itself, until the server closes) on a
    socket whose kernel receive buffer is small, so that not reading pushes back on the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024 * 1024)
    writer.write(f"GET /events{query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.0 200 ") and b"Transfer-Encoding" not in head, head
    first = await message(reader.readline)
    assert first["comment"].startswith("subscribed {"), first
    return reader, writer


async def pipelined(w: Wire, requests: list[tuple[str, dict]]) -> None:
    """Send the requests at once, then insist every reply is a success."""
    w.writer.write(b"".join(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n" for cmd, args in requests))
    await w.writer.drain()
    for _ in requests:
        reply = await w.recv()
        assert reply["ok"] is True, reply


# --- events, as the line protocol has them ------------------------------------------------------


async def test_events_arrive_in_order_with_names_and_the_line_protocols_data(db):
    async with http_server(db) as (srv, base), client() as http, stream(http, f"{base}/events") as r:
        line = await Wire.open(srv.address[1])
        await line.ok("subscribe")
        w = await Wire.open(srv.address[1])
        await w.ok("add_vm", **vm_args("ev-1", "ev-1-a"))
        assert (await post(http, f"{base}/connect_vm", {"vm_id": "ev-1"}))[0] == 200  # over HTTP too
        assert (await post(http, f"{base}/authorize_vm", {"vm_id": "ev-1"}))[0] == 200
        assert (await post(http, f"{base}/update_vm", {"vm_id": "ev-1", "ram": 4096}))[0] == 200
        assert (await post(http, f"{base}/deauthorize_vm", {"vm_id": "ev-1"}))[0] == 200
        assert (await post(http, f"{base}/disconnect_vm", {"vm_id": "ev-1"}))[0] == 200
        await w.ok("remove_vm", vm_id="ev-1")
        got = await events(r.content.readline, lambda m: m["event"] == "vm_removed")
        assert [m["event"] for m in got] == ["vm_added", "vm_connected", "vm_authorized", "vm_updated",
                                             "vm_deauthorized", "vm_disconnected", "vm_removed"]
        same = [json.loads(await line.recv_line()) for _ in got]  # what a line subscriber was sent
        assert [(m["event"], m["data"]) for m in got] == [(m["event"], m["data"]) for m in same]
        assert got[3]["data"]["ram"] == 4096 and got[5]["data"]["reason"] == "request"
        assert "password" not in json.dumps(got)
        for c in (line, w):
            await c.close()


async def test_filters_by_event_and_vm_id(db):
    """event= repeated and/or comma-separated, vm_id= alone, and both together; each stream gets
    exactly its events, in order, whatever the others chose."""
    choices = {
        "two names, repeated": "?event=vm_added&event=vm_removed",
        "two names, one parameter": "?event=vm_connected,vm_disconnected",
        "one VM": "?vm_id=fi-2",
        "one VM, one name": "?vm_id=fi-2&event=vm_updated",
        "all": "",
    }
    async with http_server(db) as (srv, base), client() as http, contextlib.AsyncExitStack() as stack:
        streams = {what: await stack.enter_async_context(stream(http, f"{base}/events{query}"))
                   for what, query in choices.items()}
        w = await Wire.open(srv.address[1])
        produced = []
        for round in (1, 2):
            for vm in ("fi-1", "fi-2"):
                if round == 1:
                    await w.ok("connect_vm", **vm_args(vm))
                    produced += [("vm_added", vm), ("vm_connected", vm)]
                else:
                    await w.ok("connect_vm", vm_id=vm)
                    produced.append(("vm_connected", vm))
                await w.ok("authorize_vm", vm_id=vm)
                await w.ok("update_vm", vm_id=vm, cpu=1 + round)
                await w.ok("disconnect_vm", vm_id=vm)
                produced += [("vm_authorized", vm), ("vm_updated", vm), ("vm_disconnected", vm)]
        for vm in ("fi-1", "fi-2"):
            await w.ok("remove_vm", vm_id=vm)
            produced.append(("vm_removed", vm))
        await w.ok("add_vm", **vm_args("fi-end"))
        produced.append(("vm_added", "fi-end"))
        wanted = {
            "two names, repeated": lambda e, vm: e in ("vm_added", "vm_removed"),
            "two names, one parameter": lambda e, vm: e in ("vm_connected", "vm_disconnected"),
            "one VM": lambda e, vm: vm == "fi-2",
            "one VM, one name": lambda e, vm: vm == "fi-2" and e == "vm_updated",
            "all": lambda e, vm: True,
        }
        for what, r in streams.items():
            expected = [p for p in produced if wanted[what](*p)]
            assert brief(await events(r.content.readline, len(expected))) == expected, what
        # nothing more was queued for them: the next event a stream reads is a new one of its own
        await w.ok("connect_vm", **vm_args("fi-2"))
        assert brief(await events(streams["one VM"].content.readline, lambda m: True)) == [("vm_added", "fi-2")]
        await w.close()


async def test_bad_choices_are_400_before_any_stream_and_the_server_goes_on(db):
    async with http_server(db) as (srv, base), client() as http:
        cases = [
            ("?event=nope", 400, "invalid_args"),
            ("?event=", 400, "invalid_args"),
            ("?event=vm_added,,vm_removed", 400, "invalid_args"),
            ("?event=vm_added&event=overflow", 400, "invalid_args"),  # not a name one can choose
            ("?event=VM_ADDED", 400, "invalid_args"),
            ("?vm_id=", 400, "invalid_args"),
            ("?vm_id=" + "x" * 300, 400, "invalid_args"),
            ("?vm_id=bad%00id", 400, "invalid_args"),
            ("?vm_id=a&vm_id=b", 400, "bad_request"),
            ("?events=vm_added", 400, "invalid_args"),
            ("?event=vm_added&limit=3", 400, "invalid_args"),
        ]
        for query, status, expected in cases:
            async with http.get(f"{base}/events{query}") as r:
                body = await r.json()
                assert (r.status, r.content_type, code(body)) == (status, "application/json", expected), (query, body)
                if query.startswith("?event=") and "limit" not in query:  # named as the client wrote it
                    assert body["error"]["message"].startswith("event["), body
        for method in ("POST", "HEAD", "DELETE"):
            async with http.request(method, f"{base}/events") as r:
                assert r.status == 405, method
        assert not srv.http.events.streams
        async with stream(http, f"{base}/events?event=vm_added") as r:
            assert (await post(http, f"{base}/add_vm", vm_args("bc-1")))[0] == 200
            assert brief(await events(r.content.readline, lambda m: True)) == [("vm_added", "bc-1")]


async def test_the_token_is_needed_for_events(db):
    async with http_server(db, token="sse-token") as (srv, base), client() as http:
        status, body, headers = await get(http, f"{base}/events")
        assert status == 401 and code(body) == "unauthenticated" and "Bearer" in headers["WWW-Authenticate"]
        status, body, _ = await get(http, f"{base}/events", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and code(body) == "auth_failed"
        assert not srv.http.events.streams
        auth = {"Authorization": "Bearer sse-token"}
        async with stream(http, f"{base}/events", headers=auth) as r:
            assert (await post(http, f"{base}/add_vm", vm_args("tk-1"), headers=auth))[0] == 200
            assert brief(await events(r.content.readline, lambda m: True)) == [("vm_added", "tk-1")]


# --- a fleet of watchers ------------------------------------------------------------------------


async def test_many_streams_at_once_share_one_channel(db):
    n = 60
    async with http_server(db) as (srv, base), contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(client(connector=aiohttp.TCPConnector(limit=0)))
        url = f"{base}/events?event=vm_added,vm_removed"
        streams = await asyncio.gather(*(stack.enter_async_context(stream(http, url)) for _ in range(n)))
        hub = srv.http.events
        assert len(hub.streams) == n and len(hub._channels) == 1  # one frame per event for all of them
        w = await Wire.open(srv.address[1])
        produced = []
        for i in range(30):
            await w.ok("add_vm", **vm_args(f"mn-{i}"))
            produced.append(("vm_added", f"mn-{i}"))
            if i % 3 == 0:
                await w.ok("remove_vm", vm_id=f"mn-{i}")
                produced.append(("vm_removed", f"mn-{i}"))
        got = await asyncio.gather(*(events(r.content.readline, len(produced)) for r in streams))
        assert all(brief(g) == produced for g in got)
        await w.close()
    assert not hub.streams and not hub._channels and not hub._by_event  # all ended with the server


async def test_curl_n_follows_the_stream_and_ends_cleanly_at_shutdown(db):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not on PATH")
    async with http_server(db, token="curl-token") as (srv, base):
        proc = await asyncio.create_subprocess_exec(
            curl, "-N", "-sS", "-H", "Authorization: Bearer curl-token", f"{base}/events?vm_id=cu-1",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            first = await message(proc.stdout.readline)
            assert json.loads(first["comment"].removeprefix("subscribed ")) == {"events": ALL_EVENTS, "vm_id": "cu-1"}
            w = await Wire.open(srv.address[1])
            await w.ok("auth", token="curl-token")
            await w.ok("add_vm", **vm_args("cu-2"))  # another VM: not for this stream
            await w.ok("connect_vm", **vm_args("cu-1"))
            got = await events(proc.stdout.readline, lambda m: m["event"] == "vm_connected")
            assert brief(got) == [("vm_added", "cu-1"), ("vm_connected", "cu-1")]
            await w.close()
            await asyncio.wait_for(srv.close(), TIMEOUT)
            assert brief(await events(proc.stdout.readline, lambda m: m["event"] == "shutdown")) == [("shutdown", None)]
            rest, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
            assert rest == b"" and proc.returncode == 0, err  # the chunked body was ended, not cut off
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# --- the slow, the silent, the gone --------------------------------------------------------------


async def _backlog(srv: Any, prefix: str, rounds: int,
                   paced: Callable[[int], Awaitable[None]] | None = None) -> list[tuple[str, str]]:
    """Thousands of events of a few KB each (VMs with 64 disks), requests pipelined; what was
    produced. ``paced(n)`` is awaited after each batch, n being the events produced so far."""
    k = 8
    w = await Wire.open(srv.address[1])
    produced: list[tuple[str, str]] = []
    for v in range(k):
        vm = f"{prefix}-{v}"
        await w.ok("connect_vm", vm_id=vm, ram=1024, cpu=1, disks=[disk(f"{vm}-{d}") for d in range(64)])
        produced += [("vm_added", vm), ("vm_connected", vm)]
    for start in range(0, rounds, 250):
        batch = []
        for i in range(start, min(rounds, start + 250)):
            vm = f"{prefix}-{i % k}"
            batch += [("authorize_vm", {"vm_id": vm}), ("deauthorize_vm", {"vm_id": vm})]
            produced += [("vm_authorized", vm), ("vm_deauthorized", vm)]
        await pipelined(w, batch)
        if paced is not None:
            await paced(len(produced))
    for v in (*range(1, k), 0):  # the last event: sl-0's disconnection
        await w.ok("disconnect_vm", vm_id=f"{prefix}-{v}")
        produced.append(("vm_disconnected", f"{prefix}-{v}"))
    await w.close()
    return produced


async def test_a_stream_that_stops_reading_loses_the_oldest_and_is_told(db, monkeypatch):
    monkeypatch.setattr(server_module, "EVENT_QUEUE_MAX", 1000)  # dropping starts sooner; the rule is the same
    async with http_server(db) as (srv, base), client() as http:
        reader, writer = await raw_stream(srv.http.address[1])
        writer.transport.pause_reading()  # it reads nothing more (until told)
        async with stream(http, f"{base}/events") as fast:  # one on the same channel, reading, loses nothing
            fast_got: list[dict] = []

            async def keep_up(n: int) -> None:  # (the test's reader is slow itself on a busy machine)
                fast_got.extend(await events(fast.content.readline, n - len(fast_got)))

            produced = await _backlog(srv, "sl", 3000, keep_up)
            await keep_up(len(produced))
        assert brief(fast_got) == produced
        (channel,) = srv.http.events._channels.values()
        assert len(channel.lines) <= 2 * server_module.EVENT_QUEUE_MAX  # what the slow one holds back is bounded
        assert (await get(http, f"{base}/health"))[:2] == (200, "OK")
        writer.transport.resume_reading()
        msgs = await events(reader.readline, lambda m: brief([m]) == produced[-1:])
        overflows = [i for i, m in enumerate(msgs) if m["event"] == "overflow"]
        assert overflows, "no overflow event although events were dropped"
        after = msgs[overflows[-1] + 1:]
        assert 0 < len(after) and brief(after) == produced[-len(after):]  # the newest ones survived
        read, dropped = walk(produced, msgs, key=lambda m: (m["event"], m["data"]["vm_id"]))
        assert dropped > 0 and read + dropped == len(produced) and srv.http.events.dropped == dropped
        # and it goes on: new events come through whole
        w = await Wire.open(srv.address[1])
        await w.ok("connect_vm", vm_id="sl-0")
        assert brief(await events(reader.readline, lambda m: True)) == [("vm_connected", "sl-0")]
        await w.close()
        writer.close()


async def test_shutdown_does_not_wait_for_a_stream_that_stops_reading(db):
    """A stream whose reader stopped (its writes wait) and an idle one: the idle one gets the
    shutdown event and its end; the stuck one is cut off; shutdown does not wait for the
    handlers' grace (set far beyond the test's timeout)."""
    async with http_server(db, shutdown_grace=120.0) as (srv, base), client() as http:
        reader, writer = await raw_stream(srv.http.address[1])
        writer.transport.pause_reading()
        async with stream(http, f"{base}/events?event=vm_removed") as idle:
            await _backlog(srv, "sd", 1500)
            hub = srv.http.events
            assert any(s.cursor < s.channel.end for s in hub.streams)  # the stuck one is behind (its write waits)
            await asyncio.wait_for(srv.close(), TIMEOUT)
            assert brief(await events(idle.content.readline, lambda m: True)) == [("shutdown", None)]
            assert await asyncio.wait_for(idle.content.read(), TIMEOUT) == b""
            assert idle.content.is_eof()
        assert not hub.streams
        writer.transport.resume_reading()  # the stuck one was cut off: what it had is followed by its end
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(reader.read(1 << 20), TIMEOUT):
                pass
        writer.close()


async def test_a_silent_stream_gets_keepalive_comments(db, monkeypatch):
    monkeypatch.setattr(http_events, "KEEPALIVE", 0.3)
    async with http_server(db) as (srv, base), client() as http, stream(http, f"{base}/events") as r:
        assert await message(r.content.readline) == {"comment": "keepalive"}
        assert await message(r.content.readline) == {"comment": "keepalive"}
        assert (await post(http, f"{base}/add_vm", vm_args("ka-1")))[0] == 200
        got = await events(r.content.readline, lambda m: True)
        assert brief(got) == [("vm_added", "ka-1")]


async def test_a_stream_whose_client_went_away_is_let_go(db, monkeypatch):
    """Noticed without a write failing: no event for it, no keepalive due."""
    monkeypatch.setattr(http_events, "KEEPALIVE", 3600.0)
    async with http_server(db) as (srv, base):
        for _ in range(5):
            reader, writer = await raw_stream(srv.http.address[1], "?vm_id=gone-1")
            writer.transport.abort()
        hub = srv.http.events
        deadline = time.monotonic() + TIMEOUT
        while hub.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not hub.streams and not hub._channels and not hub._by_vm


async def test_a_stream_keeps_the_session_it_names_alive(db):
    """A request carrying a session acts as it and keeps it alive: a stream does for as long as
    it is open; once it ends, the session expires like any other."""
    async with http_server(db, http_session_ttl=0.3) as (srv, base), client() as http:
        assert (await post(http, f"{base}/connect_vm", vm_args("ka-2")))[0] == 200
        w = await Wire.open(srv.address[1])  # looks without the cookie
        async with stream(http, f"{base}/events?vm_id=ka-2"):
            await asyncio.sleep(1.0)  # more than three times the TTL
            assert (await w.ok("get_vm", vm_id="ka-2"))["connected"] is True
        deadline = time.monotonic() + TIMEOUT
        while srv.http.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not srv.http.sessions
        assert (await w.ok("get_vm", vm_id="ka-2"))["connected"] is False
        await w.close()


# --- a cluster ------------------------------------------------------------------------------------


async def test_cluster_events_from_another_server_and_the_stream_ends_with_the_lease(nodes, own_pg):  # noqa: F811
    """A stream on server a hears what is done on server b (through the change feed); when a
    loses its lease (PostgreSQL away), the stream gets the shutdown event and ends."""
    dsn = own_pg.create_database("sse")
    a, b = nodes(dsn, "--http-port", "0"), nodes(dsn)
    base = f"http://127.0.0.1:{_http_port(a)}"
    async with client() as http, stream(http, f"{base}/events?event=vm_added,vm_connected") as r:
        wb = await b.wire()
        await wb.ok("connect_vm", **vm_args("cs-1"))
        got = await events(r.content.readline, 2)
        assert brief(got) == [("vm_added", "cs-1"), ("vm_connected", "cs-1")]
        assert got[1]["data"]["connected"] is True
        await wb.close()
        b.server.kill()
        await asyncio.to_thread(own_pg.stop)
        try:
            rest = await events(r.content.readline, lambda m: m["event"] == "shutdown", most=10)
            assert brief(rest) == [("shutdown", None)]
            assert await asyncio.wait_for(r.content.read(), TIMEOUT) == b""
            status, body, _ = await get(http, f"{base}/events")  # no new stream while it holds no lease
            assert status == 503 and code(body) == "unavailable"
        finally:
            await asyncio.to_thread(own_pg.start)
