"""GET /metrics (issue 13): a real server with --http-port 0, scraped over real HTTP, its text
parsed with prometheus-client's own parser; every value is checked after real commands over
both protocols (and with faults injected for real: a locked or renamed table, killed
PostgreSQL connections, a subscriber that does not read).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import vmserver.server as server_module
from conftest import TIMEOUT, Wire, query, vm_args
from test_faults import sqlite_lock
from test_http import client, code, get, http_server, post
from vmserver import __version__
from vmserver.console import ServerConsole
from vmserver.metrics import BATCH_BUCKETS, LATENCY_BUCKETS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, base: str, **headers: str) -> Samples:
    """Every sample of GET /metrics, by (name, labels)."""
    async with http.get(f"{base}/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
        text = await r.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"sample {key} twice"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is absent (a counter that never moved is not listed)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def commands(samples: Samples) -> dict[tuple[str, str, str], float]:
    """vmserver_commands_total as {(protocol, command, code): count}."""
    return {(dict(labels)["protocol"], dict(labels)["command"], dict(labels)["code"]): v
            for (name, labels), v in samples.items() if name == "vmserver_commands_total"}


def delta(after: dict[Any, float], before: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def histogram(samples: Samples, name: str, **labels: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets by bound, count, sum) of one histogram, checked for consistency."""
    buckets = sorted((float(dict(lab)["le"]), v) for (n, lab), v in samples.items()
                     if n == f"{name}_bucket" and {k: w for k, w in lab if k != "le"} == labels)
    count, total = value(samples, f"{name}_count", **labels), value(samples, f"{name}_sum", **labels)
    assert buckets and buckets[-1][0] == float("inf") and buckets[-1][1] == count, (name, labels, buckets, count)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), buckets  # cumulative
    return buckets, count, total


async def eventually(check: Any, what: str, seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while not (result := await check()):
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        await asyncio.sleep(0.02)
    return result


# --- commands -----------------------------------------------------------------------------------


async def test_commands_count_once_by_protocol_command_and_code(db):
    async with http_server(db) as (srv, base), client() as http:
        w = await Wire.open(srv.address[1])
        try:
            before = commands(await scrape(http, base))
            await w.ok("add_vm", **vm_args("m-1", "m-1-a"))
            await w.ok("connect_vm", vm_id="m-1")  # awaited: a write committed before the reply
            assert await w.error("get_vm", vm_id="nope") == "not_found"
            assert await w.error("add_vm", **{**vm_args("m-2"), "ram": "much"}) == "invalid_args"
            assert await w.error("no_such_command") == "unknown_command"
            assert await w.error("lots_of_random_names_here") == "unknown_command"
            await w.ok("health")
            assert (await get(http, f"{base}/get_vm?vm_id=m-1"))[0] == 200
            status, body, _ = await post(http, f"{base}/add_vm", vm_args("m-1"))
            assert status == 409 and code(body) == "already_exists"
            status, body, _ = await post(http, f"{base}/authorize_vm", {"vm_id": "m-1"})
            assert status == 403 and code(body) == "not_connected"  # held by the line session
            assert (await post(http, f"{base}/add_vm", vm_args("m-3", "m-3-a")))[0] == 200  # awaited too
            after = await scrape(http, base)
            await scrape(http, base)  # a scrape is no command
            assert delta(commands(await scrape(http, base)), commands(after)) == {}
        finally:
            await w.close()
    assert delta(commands(after), before) == {
        ("line", "add_vm", "ok"): 1, ("line", "connect_vm", "ok"): 1, ("line", "get_vm", "not_found"): 1,
        ("line", "add_vm", "invalid_args"): 1, ("line", "(unknown)", "unknown_command"): 2,
        ("line", "health", "ok"): 1,
        ("http", "get_vm", "ok"): 1, ("http", "add_vm", "already_exists"): 1,
        ("http", "authorize_vm", "not_connected"): 1, ("http", "add_vm", "ok"): 1,
    }
    # The latency histogram counts the same commands, in the documented buckets.
    for (protocol, name), n in {("line", "add_vm"): 2, ("line", "(unknown)"): 2, ("http", "add_vm"): 2,
                                ("line", "connect_vm"): 1}.items():
        buckets, count, total = histogram(after, "vmserver_command_duration_seconds", protocol=protocol, command=name)
        assert count == n and total > 0, (protocol, name, count, total)
        assert [b for b, _ in buckets] == [*LATENCY_BUCKETS, float("inf")]
        assert buckets[-2][1] == n  # none took 10 s


async def test_a_command_over_the_console_counts_as_console(tmp_path):
    """The server console runs commands through the same door (execute), labelled console."""
    async with http_server(str(tmp_path / "c.db")) as (srv, base), client() as http:
        out = io.StringIO()
        console = ServerConsole(srv.context, srv.inventory, stdin=io.StringIO(), stdout=out)
        await console._one("add_vm vm_id=c-1 ram=1 cpu=1 disks=[]")
        await console._one("get_vm vm_id=c-2")
        samples = await scrape(http, base)
    assert "error not_found" in out.getvalue()
    assert {k: v for k, v in commands(samples).items() if k[0] == "console"} == {
        ("console", "add_vm", "ok"): 1, ("console", "get_vm", "not_found"): 1}


# --- sessions and the inventory -----------------------------------------------------------------


async def test_sessions_by_protocol_go_up_and_down(db):
    async with http_server(db) as (srv, base), client() as http, client() as agent:
        def sessions(s: Samples) -> tuple[float, float, float, float]:
            return (value(s, "vmserver_sessions", protocol="line"), value(s, "vmserver_sessions", protocol="http"),
                    value(s, "vmserver_sessions_opened_total", protocol="line"),
                    value(s, "vmserver_sessions_opened_total", protocol="http"))

        assert sessions(await scrape(http, base)) == (0, 0, 0, 0)
        a, b = await Wire.open(srv.address[1]), await Wire.open(srv.address[1])
        assert sessions(await scrape(http, base)) == (2, 0, 2, 0)
        await a.close()

        async def one_line_session() -> bool:
            return sessions(await scrape(http, base)) == (1, 0, 2, 0)
        await eventually(one_line_session, "the closed line session is gone")
        assert (await get(agent, f"{base}/stats"))[0] == 200  # a request without a session opens none
        assert sessions(await scrape(http, base)) == (1, 0, 2, 0)
        assert (await post(agent, f"{base}/connect_vm", vm_args("s-1")))[0] == 200
        assert (await post(agent, f"{base}/authorize_vm", {"vm_id": "s-1"}))[0] == 200  # the same session
        assert sessions(await scrape(http, base)) == (1, 1, 2, 1)
        status, body, _ = await post(http, f"{base}/connect_vm", {"vm_id": "s-1"})
        assert status == 409 and code(body) == "conflict"  # a refused connect opens no session
        assert sessions(await scrape(http, base)) == (1, 1, 2, 1)
        async with agent.delete(f"{base}/session") as r:
            assert r.status == 200
        await b.close()

        async def none_left() -> bool:
            return sessions(await scrape(http, base)) == (0, 0, 2, 1)
        await eventually(none_left, "every session ended")


async def test_inventory_gauges_follow_the_commands_and_agree_with_stats(db):
    async with http_server(db) as (srv, base), client() as http, client() as agent:
        w = await Wire.open(srv.address[1])
        try:
            await w.ok("add_vm", **vm_args("g-1", "g-1-a", "g-1-b", ram=2048, cpu=2))
            await w.ok("add_vm", **vm_args("g-2", "g-2-a", ram=512))
            await w.ok("connect_vm", vm_id="g-1")
            await w.ok("authorize_vm", vm_id="g-1")
            assert (await post(agent, f"{base}/connect_vm", {"vm_id": "g-2"}))[0] == 200
            s = await scrape(http, base)
            expected = {"vmserver_vms": 2, "vmserver_vms_connected": 2, "vmserver_vms_authorized": 1,
                        "vmserver_disks": 3, "vmserver_vm_ram_bytes": (2048 + 512) << 20, "vmserver_vm_cpus": 3,
                        "vmserver_disk_size_bytes": 30 << 30}
            assert {name: value(s, name) for name in expected} == expected
            stats = (await get(http, f"{base}/stats"))[1]
            assert (stats["vms"], stats["connected"], stats["authorized"], stats["disks"]) == (2, 2, 1, 3)
            await w.ok("deauthorize_vm", vm_id="g-1")
            await w.ok("disconnect_vm", vm_id="g-1")
            await w.ok("remove_vm", vm_id="g-1")
            s = await scrape(http, base)
            assert [value(s, n) for n in ("vmserver_vms", "vmserver_vms_connected", "vmserver_vms_authorized",
                                          "vmserver_disks", "vmserver_vm_ram_bytes")] == [1, 1, 0, 1, 512 << 20]
        finally:
            await w.close()


async def test_build_info_and_server_id(db):
    async with http_server(db) as (srv, base), client() as http:
        s = await scrape(http, base)
        stats = (await get(http, f"{base}/stats"))[1]
    backend = "postgres" if db.startswith("postgresql") else "sqlite"
    assert value(s, "vmserver_build_info", version=__version__, python=platform.python_version(),
                 backend=backend) == 1
    assert value(s, "vmserver_server_info", server_id=stats["server_id"]) == 1
    assert value(s, "process_open_fds") > 0  # the process collector is there too


# --- writes per commit, database errors ---------------------------------------------------------


async def test_writes_per_commit(db):
    """Only our writes (history_days=0: no pruning job at start lands among them)."""
    async with http_server(db, history_days=0) as (srv, base), client() as http:
        wires = [await Wire.open(srv.address[1]) for _ in range(20)]
        try:
            _, count0, sum0 = histogram(await scrape(http, base), "vmserver_writes_per_commit")
            for n in range(3):  # one after another: each its own transaction
                await wires[0].ok("add_vm", **vm_args(f"wc-{n}", f"wc-{n}-a"))
            buckets, count1, sum1 = histogram(await scrape(http, base), "vmserver_writes_per_commit")
            assert (count1 - count0, sum1 - sum0) == (3, 3)
            assert [b for b, _ in buckets] == [*map(float, BATCH_BUCKETS), float("inf")]
            # 20 at once, on 20 sessions: they share fewer transactions, every write counted once
            await asyncio.gather(*(w.ok("add_vm", **vm_args(f"wc-x{i}", f"wc-x{i}-a")) for i, w in enumerate(wires)))
            buckets, count2, sum2 = histogram(await scrape(http, base), "vmserver_writes_per_commit")
            assert sum2 - sum1 == 20 and 1 <= count2 - count1 <= 20
            assert (count2, sum2) == (srv.inventory.store.batches, srv.inventory.store.writes)
        finally:
            for w in wires:
                await w.close()


def _errors(s: Samples, backend: str) -> tuple[float, float]:
    return (value(s, "vmserver_database_errors_total", backend=backend, kind="write"),
            value(s, "vmserver_database_errors_total", backend=backend, kind="read"))


@pytest.mark.sqlite_only
async def test_database_errors_on_sqlite_a_locked_file_and_a_table_gone(db):
    async with http_server(db, busy_timeout_ms=100, history_days=0) as (srv, base), client() as http:
        w = await Wire.open(srv.address[1])
        try:
            await w.ok("add_vm", **vm_args("e-0"))
            assert _errors(await scrape(http, base), "sqlite") == (0, 0)
            before = commands(await scrape(http, base))
            with sqlite_lock(db, "IMMEDIATE"):  # another program holds the write lock
                assert await w.error("add_vm", **vm_args("e-1", "e-1-a")) == "internal"
                status, body, _ = await post(http, f"{base}/add_vm", vm_args("e-2"))
                assert status == 503 and code(body) == "internal"
            s = await scrape(http, base)
            assert _errors(s, "sqlite") == (2, 0)
            assert delta(commands(s), before) == {("line", "add_vm", "internal"): 1, ("http", "add_vm", "internal"): 1}
            await w.ok("add_vm", **vm_args("e-1", "e-1-a"))  # nothing was changed: it can be retried
            assert _errors(await scrape(http, base), "sqlite") == (2, 0)
            # The history table renamed behind the server's back: get_history's read fails (and
            # a write with history rows with it), then works again once it is back.
            with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
                other.execute("ALTER TABLE history RENAME TO history_away")
                try:
                    assert await w.error("get_history") == "internal"
                    assert (await get(http, f"{base}/get_history"))[0] == 503
                    assert _errors(await scrape(http, base), "sqlite") == (2, 2)
                finally:
                    other.execute("ALTER TABLE history_away RENAME TO history")
            assert [h["vm_id"] for h in await w.ok("get_history", event="vm_added")] == ["e-1", "e-0"]
            assert _errors(await scrape(http, base), "sqlite") == (2, 2)
        finally:
            await w.close()


async def test_database_errors_on_postgresql_its_connections_killed(pg_sandbox, pg_dsn):
    """A write in flight when the server's connections are terminated fails (nothing written),
    and so does every write until the store has reconnected: each is one database error."""
    from test_postgres_store import dbname, vms_locked, writer_waiting

    async with http_server(pg_dsn, history_days=0) as (srv, base), client() as http:
        w = await Wire.open(srv.address[1])
        try:
            await w.ok("add_vm", **vm_args("k-0"))
            assert _errors(await scrape(http, base), "postgres") == (0, 0)
            with vms_locked(pg_dsn):
                in_flight = asyncio.ensure_future(w.call("add_vm", **vm_args("k-1")))
                await writer_waiting(pg_dsn)
                assert pg_sandbox.terminate(dbname(pg_dsn)) >= 2
                reply = await asyncio.wait_for(in_flight, TIMEOUT)
            assert reply["error"]["code"] == "internal", reply
            refused = 1
            while True:  # until the store is back
                reply = await w.call("add_vm", **vm_args(f"k-{refused + 1}"))
                if reply.get("ok"):
                    break
                assert reply["error"]["code"] == "internal", reply
                refused += 1
                await asyncio.sleep(0.05)
            s = await scrape(http, base)
            assert _errors(s, "postgres")[0] == refused
            assert value(s, "vmserver_commands_total", protocol="line", command="add_vm", code="internal") == refused
        finally:
            await w.close()


# --- live events ---------------------------------------------------------------------------------


async def _subscriber(port: int) -> Wire:
    """A subscribed session whose socket buffer is small and that stops reading at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    w = Wire(reader, writer, json.loads(await reader.readline()))
    await w.ok("subscribe")
    writer.transport.pause_reading()
    return w


@pytest.mark.sqlite_only  # the rule lives in server.py, whichever backend; SQLite makes the events faster
async def test_dropped_events_and_subscribers(db, monkeypatch):
    monkeypatch.setattr(server_module, "EVENT_QUEUE_MAX", 200)  # dropping starts sooner; the rule is the same
    async with http_server(db) as (srv, base), client() as http:
        port = srv.address[1]
        a = await Wire.open(port)
        try:
            assert value(await scrape(http, base), "vmserver_event_subscribers", protocol="line") == 0
            reader_w, gone_w = await _subscriber(port), await _subscriber(port)
            watcher = await Wire.open(port)
            await watcher.ok("subscribe", vm_id="ev-0")  # a subscriber of one VM, which reads
            s = await scrape(http, base)
            assert value(s, "vmserver_event_subscribers", protocol="line") == 3 and value(s, "vmserver_events_dropped_total", protocol="line") == 0
            for v in range(4):  # 64 disks each: every event line is a few KB
                await a.ok("connect_vm", **{**vm_args(f"ev-{v}"), "disks": [{"disk_id": f"ev-{v}-{d}", "size": 1}
                                                                              for d in range(64)]})
            produced = 4 * 2  # vm_added + vm_connected each
            rounds = 0
            while value(await scrape(http, base), "vmserver_events_dropped_total", protocol="line") < 2 * 300:
                assert rounds < 5000, "no event was dropped for subscribers that do not read"
                for i in range(50):
                    vm = f"ev-{(rounds + i) % 4}"
                    await a.ok("authorize_vm", vm_id=vm)
                    await a.ok("deauthorize_vm", vm_id=vm)
                    produced += 2
                rounds += 50
            await a.ok("health")
            s = await scrape(http, base)
            lost_untold = value(s, "vmserver_events_dropped_total", protocol="line")  # neither has been told yet
            assert value(s, "vmserver_event_subscribers", protocol="line") == 3
            # One of them goes away without reading: what it lost stays counted.
            await gone_w.close()

            async def two_left() -> bool:
                return value(await scrape(http, base), "vmserver_event_subscribers", protocol="line") == 2
            await eventually(two_left, "the closed subscriber is gone")
            assert value(await scrape(http, base), "vmserver_events_dropped_total", protocol="line") >= lost_untold
            # The other reads again: an overflow line tells it how many it lost, and the sum is what it missed.
            reader_w.writer.transport.resume_reading()
            await a.ok("disconnect_vm", vm_id="ev-0")
            produced += 1
            seen, told = 0, 0
            while True:
                msg = json.loads(await asyncio.wait_for(reader_w.reader.readline(), TIMEOUT))
                if msg.get("event") == "overflow":
                    told += msg["data"]["dropped"]
                    continue
                seen += 1
                if msg.get("event") == "vm_disconnected":
                    break
            assert told > 0 and seen + told == produced, (seen, told, produced)
            s = await scrape(http, base)
            final = value(s, "vmserver_events_dropped_total", protocol="line")
            assert final - told > 0  # the one that left had lost some, and they are still counted
            assert final >= lost_untold
            await reader_w.ok("unsubscribe")
            assert value(await scrape(http, base), "vmserver_event_subscribers", protocol="line") == 1
            # the watcher of one VM read everything: it lost nothing, and the total did not move
            assert value(await scrape(http, base), "vmserver_events_dropped_total", protocol="line") == final
            await reader_w.close()
            await watcher.close()
        finally:
            await a.close()


# --- the cluster's lease -------------------------------------------------------------------------


async def test_lease_gauges(db):
    async with http_server(db) as (srv, base), client() as http:
        s = await scrape(http, base)
        if db.startswith("postgresql"):
            assert value(s, "vmserver_lease_held") == 1 and value(s, "vmserver_cluster_servers") == 1
            # a second server on the same database: both see two, from their next renewal on
            async with http_server(db, lease_ttl=1.5) as (other, other_base):
                async def two() -> bool:
                    return (value(await scrape(http, other_base), "vmserver_cluster_servers") == 2
                            and value(await scrape(http, base), "vmserver_cluster_servers") == 2)
                await eventually(two, "both servers see two", 30)
                assert value(await scrape(http, other_base), "vmserver_lease_held") == 1
        else:
            assert not [k for k in s if k[0].startswith(("vmserver_lease", "vmserver_cluster"))]


async def test_a_lost_lease_shows_as_zero_and_metrics_are_still_served(pg_dsn):
    """Its lease expired behind its back (as after a pause): the server serves no command until it
    holds a new one (503), but /metrics still answers, lease_held 0, then 1 again."""
    async with http_server(pg_dsn, lease_ttl=6.0) as (srv, base), client() as http:
        lease = srv.inventory.store.lease.id  # type: ignore[attr-defined]
        query(pg_dsn, "UPDATE vmserver_servers SET expires_at = clock_timestamp() - interval '1 second' "
                      "WHERE lease = ?", (lease,))

        async def lost() -> bool:
            return value(await scrape(http, base), "vmserver_lease_held") == 0
        await eventually(lost, "the lease seen lost", 10)
        status, body, _ = await get(http, f"{base}/stats")
        assert status == 503 and code(body) == "unavailable"

        async def held() -> bool:
            return value(await scrape(http, base), "vmserver_lease_held") == 1
        await eventually(held, "a new lease held", 20)
        assert (await get(http, f"{base}/stats"))[0] == 200
        assert srv.inventory.store.lease.id != lease  # type: ignore[attr-defined]


# --- the route itself ----------------------------------------------------------------------------


async def test_metrics_need_the_token_and_speak_openmetrics_when_asked(tmp_path):
    async with http_server(str(tmp_path / "t.db"), token="metrics-token") as (srv, base), client() as http:
        status, body, headers = await get(http, f"{base}/metrics")
        assert status == 401 and code(body) == "unauthenticated" and "Bearer" in headers["WWW-Authenticate"]
        s = await scrape(http, base, Authorization="Bearer metrics-token")
        assert value(s, "vmserver_vms") == 0
        async with http.get(f"{base}/metrics", headers={"Authorization": "Bearer metrics-token",
                                                       "Accept": "application/openmetrics-text; version=1.0.0"}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await r.text()).endswith("# EOF\n")
        async with http.post(f"{base}/metrics", headers={"Authorization": "Bearer metrics-token"}) as r:
            assert r.status == 405


def test_without_prometheus_client_the_flag_exits_1_naming_the_extra(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "prometheus_client.py").write_text(
        "raise ImportError('No module named prometheus_client (shadowed by the test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "vmserver", "--port", "0", "--http-port", "0",
                           "--db", str(tmp_path / "v.db")], env=env, capture_output=True, timeout=TIMEOUT)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert "prometheus_client" in lines[0] and "pip install 'vmserver[http]'" in lines[0]
    assert not (tmp_path / "v.db").exists()


@pytest.mark.sqlite_only  # the rule lives in http_events.py, whichever backend; SQLite makes the events faster
async def test_event_streams_are_counted_as_http_subscribers_and_their_losses_kept(db, monkeypatch):
    """GET /events streams: subscribers{protocol="http"}; a stream that stops reading loses
    events (counted before it is told), and the count stays when it goes away."""
    from test_http_events import _backlog, raw_stream, stream

    monkeypatch.setattr(server_module, "EVENT_QUEUE_MAX", 200)
    async with http_server(db) as (srv, base), client() as http:
        assert value(await scrape(http, base), "vmserver_event_subscribers", protocol="http") == 0
        reader, writer = await raw_stream(srv.http.address[1])
        writer.transport.pause_reading()
        async with stream(http, f"{base}/events?vm_id=nobody"):
            s = await scrape(http, base)
            assert value(s, "vmserver_event_subscribers", protocol="http") == 2
            assert value(s, "vmserver_events_dropped_total", protocol="http") == 0
        rounds = 0
        while (lost := value(await scrape(http, base), "vmserver_events_dropped_total", protocol="http")) == 0:
            assert rounds < 20, "no event was dropped for a stream that does not read"
            await _backlog(srv, f"m{rounds}", 500)
            rounds += 1

        async def one_left() -> bool:  # the closed one is let go within a second
            return value(await scrape(http, base), "vmserver_event_subscribers", protocol="http") == 1
        await eventually(one_left, "the closed stream is let go")
        writer.transport.abort()  # it goes away without ever being told

        async def none_left() -> bool:
            return value(await scrape(http, base), "vmserver_event_subscribers", protocol="http") == 0
        await eventually(none_left, "the stream that went away is let go")
        assert value(await scrape(http, base), "vmserver_events_dropped_total", protocol="http") >= lost
        assert value(await scrape(http, base), "vmserver_events_dropped_total", protocol="line") == 0


async def test_http_answers_by_route_and_status_and_refused_connections(db):
    """Every HTTP answer is counted by route and status, refusals before any command included
    (a path no route matches under one label), and connections refused over the cap."""
    async with http_server(db, max_connections=2, local_reserve=0) as (srv, base), client() as http:
        before = await scrape(http, base)
        assert (await get(http, f"{base}/health"))[0] == 200
        async with http.post(f"{base}/add_vm", data="{}", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        assert (await post(http, f"{base}/add_vm", {"vm_id": "bad id"}))[0] == 400
        for path in ("/nope", "/also/nope"):
            assert (await get(http, f"{base}{path}"))[0] == 404
        async with http.delete(f"{base}/add_vm") as r:
            assert r.status == 405
        after = await scrape(http, base)

        def answers(samples: Samples) -> dict[tuple[str, str], float]:
            return {(dict(labels)["route"], dict(labels)["status"]): v
                    for (name, labels), v in samples.items() if name == "vmserver_http_responses_total"}

        assert delta(answers(after), answers(before)) == {
            ("/health", "200"): 1, ("/add_vm", "415"): 1, ("/add_vm", "400"): 1, ("(none)", "404"): 2,
            ("(none)", "405"): 1, ("/metrics", "200"): 1}  # the scrape before this one
        # the cap: this client's connection and a line session hold both seats
        w = await Wire.open(srv.address[1])
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.http.address[1]), TIMEOUT)
        assert (await asyncio.wait_for(reader.read(), TIMEOUT)).startswith(b"HTTP/1.1 503 ")
        writer.close()
        late = await Wire.open(srv.address[1])
        assert late.greeting["ok"] is False
        await late.close()
        await w.close()

        async def refused_two() -> bool:
            samples = await scrape(http, base)
            return value(samples, "vmserver_connections_refused_total") - value(
                before, "vmserver_connections_refused_total") == 2
        await eventually(refused_two, "both refusals counted")
