"""The HTTP API (issue 13, first slice): a real server with --http-port 0, driven by aiohttp's
client (with a cookie jar) and by real curl for SEED.md's examples.

SEED.md (../shared/SEED.md, outside this repository) is quoted below where a test pastes its
examples and compares its replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shlex
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import TIMEOUT, Wire, running, vm_args
from test_cluster import nodes, until  # noqa: F401  (nodes: server processes on one PostgreSQL)
from test_security import cert  # noqa: F401  (the self-signed certificate fixture)
from vmserver.server import Server

PW = "http-pw-right"


@contextlib.asynccontextmanager
async def http_server(db: str, **settings: Any) -> AsyncIterator[tuple[Server, str]]:
    """An in-process server with the HTTP API on an ephemeral port, and its base URL."""
    async with running(db, http_port=0, **settings) as srv:
        host, port = srv.http.address
        yield srv, f"http://{host}:{port}"


def client(**kwargs: Any) -> aiohttp.ClientSession:
    """A client that keeps cookies (unsafe=True: cookies of an IP address such as 127.0.0.1)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT), **kwargs)


async def post(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    """(status, body: JSON when it is JSON, else text, headers)."""
    async with http.post(url, json=body, **kw) as r:
        return r.status, await _body(r), r.headers


async def get(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with http.get(url, **kw) as r:
        return r.status, await _body(r), r.headers


async def _body(r: aiohttp.ClientResponse) -> Any:
    text = await r.text()
    return json.loads(text) if r.content_type == "application/json" else text


def code(body: Any) -> str:
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    return body["error"]["code"]


# --- SEED.md, verbatim ---------------------------------------------------------------------

# The curl examples of SEED.md, in the order of a fleet client's flow, each with its documented
# reply: text, or a JSON array whose fields our records must carry with the same values.
SEED_EXAMPLES = [
    ('''curl -X POST http://localhost:8080/add_vm -H "Content-Type: application/json" -d '{
  "vm_id": "vm-1",
  "ram": 2048,
  "cpu": 2,
  "disks": [{"disk_id": "disk-1", "size": 500}]
}\'''', "ВМ добавлена"),
    ('''curl -X POST http://localhost:8080/connect_vm -H "Content-Type: application/json" -d '{
  "vm_id": "vm-1",
  "ram": 2048,
  "cpu": 2,
  "disks": [{"disk_id": "disk-1", "size": 500}]
}\'''', "ВМ подключена"),
    ('''curl -X POST http://localhost:8080/authorize_vm -H "Content-Type: application/json" -d '{
  "vm_id": "vm-1"
}\'''', "ВМ авторизована"),
    ("curl -X GET http://localhost:8080/get_all_vms", [
        {"id": 1, "vm_id": "vm-1", "ram": 2048, "cpu": 2,
         "disks": [{"id": 1, "disk_id": "disk-1", "size": 500, "vm_id": 1}]}]),
    ("curl -X GET http://localhost:8080/get_connected_vms", [
        {"vm_id": "vm-1", "ram": 2048, "cpu": 2, "disks": [{"id": 1, "disk_id": "disk-1", "size": 500, "vm_id": 1}]}]),
    ("curl -X GET http://localhost:8080/get_authorized_vms", [
        {"vm_id": "vm-1", "ram": 2048, "cpu": 2, "disks": [{"id": 1, "disk_id": "disk-1", "size": 500, "vm_id": 1}]}]),
    ("curl -X GET http://localhost:8080/get_all_disks", [{"id": 1, "disk_id": "disk-1", "size": 500, "vm_id": 1}]),
    ("curl -X GET http://localhost:8080/health", "OK"),
    ('''curl -X POST http://localhost:8080/update_vm -H "Content-Type: application/json" -d '{
  "vm_id": "vm-1",
  "ram": 4096,
  "cpu": 4,
  "disks": [{"disk_id": "disk-1", "size": 1000}]
}\'''', "ВМ обновлена"),
    ('''curl -X POST http://localhost:8080/deauthorize_vm -H "Content-Type: application/json" -d '{
  "vm_id": "vm-1"
}\'''', "ВМ деавторизована"),
]


def carries(ours: Any, seed: Any) -> bool:
    """Whether our JSON carries every field SEED.md shows, with its value (ours may have more)."""
    if isinstance(seed, dict):
        return isinstance(ours, dict) and all(k in ours and carries(ours[k], v) for k, v in seed.items())
    if isinstance(seed, list):
        return isinstance(ours, list) and len(ours) == len(seed) and all(map(carries, ours, seed))
    return ours == seed and type(ours) is type(seed)


async def test_seed_curl_examples_pasted_as_they_are(db, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not on PATH")
    jar = str(tmp_path / "jar")
    async with http_server(db) as (srv, base):
        port = srv.http.address[1]
        for example, expected in SEED_EXAMPLES:
            argv = shlex.split(example.replace("localhost:8080", f"127.0.0.1:{port}"))
            # -sS: no progress meter; -b/-c: the cookie jar, as a script that keeps cookies does
            argv[1:1] = ["-sS", "-b", jar, "-c", jar, "-w", "\n%{http_code}"]
            proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
            assert proc.returncode == 0, err
            body, _, status = out.decode("utf-8").rpartition("\n")
            assert status == "200", (example, body)
            if isinstance(expected, str):
                assert body == expected, (example, body)
            else:
                assert carries(json.loads(body), expected), (example, body)
        assert "HttpOnly" in Path(jar).read_text()


async def test_seed_flow_with_aiohttp_and_json_records(db):
    async with http_server(db) as (srv, base), client() as http:
        vm = {"vm_id": "vm-1", "ram": 2048, "cpu": 2, "disks": [{"disk_id": "disk-1", "size": 500}]}
        assert (await post(http, f"{base}/add_vm", vm))[:2] == (200, "ВМ добавлена")
        status, body, headers = await post(http, f"{base}/connect_vm", {"vm_id": "vm-1"},
                                           headers={"Accept": "application/json"})
        assert status == 200 and body["vm_id"] == "vm-1" and body["connected"] is True, body
        cookie = headers.getall("Set-Cookie")[0]
        assert cookie.startswith("vmsession=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert headers["X-VM-Session"] == cookie.split(";")[0].split("=", 1)[1]
        assert (await post(http, f"{base}/authorize_vm", {"vm_id": "vm-1"}))[:2] == (200, "ВМ авторизована")
        status, body, _ = await post(http, f"{base}/update_vm", {"vm_id": "vm-1", "ram": 4096},
                                     headers={"Accept": "application/json"})
        assert status == 200 and body["ram"] == 4096 and body["authorized"] is True
        assert (await post(http, f"{base}/deauthorize_vm", {"vm_id": "vm-1"}))[:2] == (200, "ВМ деавторизована")
        status, body, _ = await get(http, f"{base}/get_vm", params={"vm_id": "vm-1"})
        assert status == 200 and body["authorized"] is False and body["connected"] is True
        status, body, _ = await post(http, f"{base}/disconnect_vm", {"vm_id": "vm-1"})
        assert status == 200 and body["connected"] is False
        status, body, _ = await get(http, f"{base}/stats")
        assert status == 200 and body["vms"] == 1, body
        status, body, _ = await get(http, f"{base}/get_history", params={"vm_id": "vm-1", "limit": "2"})
        assert status == 200 and [e["event"] for e in body] == ["vm_disconnected", "vm_deauthorized"], body
        status, body, _ = await post(http, f"{base}/remove_vm", {"vm_id": "vm-1"})
        assert status == 200 and body["vm_id"] == "vm-1"
        assert (await get(http, f"{base}/get_all_vms"))[:2] == (200, [])


async def test_list_paging_and_filters_as_query_parameters(db):
    async with http_server(db) as (srv, base), client() as http:
        for i in range(1, 5):
            assert (await post(http, f"{base}/add_vm", vm_args(f"p-{i}", f"pd-{i}")))[0] == 200
        await post(http, f"{base}/connect_vm", {"vm_id": "p-3"})
        status, body, _ = await get(http, f"{base}/get_all_vms", params={"after": "1", "limit": "2"})
        assert status == 200 and [v["vm_id"] for v in body] == ["p-2", "p-3"]
        status, body, _ = await get(http, f"{base}/get_all_vms", params={"connected": "false", "prefix": "p-"})
        assert [v["vm_id"] for v in body] == ["p-1", "p-2", "p-4"]
        assert [v["vm_id"] for v in (await get(http, f"{base}/get_connected_vms"))[1]] == ["p-3"]
        status, body, _ = await get(http, f"{base}/get_all_disks", params={"limit": "1"})
        assert [d["disk_id"] for d in body] == ["pd-1"]
        for params in ({"limit": "many"}, {"connected": "maybe"}, {"colour": "red"}):
            status, body, _ = await get(http, f"{base}/get_all_vms", params=params)
            assert status == 400 and code(body) == "invalid_args", (params, body)
        status, body, _ = await get(http, f"{base}/get_all_vms?limit=1&limit=2")
        assert status == 400 and code(body) == "bad_request"
        # digits of other scripts are not numbers here, as they are not in JSON
        for params in ({"limit": "\u0663"}, {"after": "\uff11"}, {"limit": "1" * 40}):
            status, body, _ = await get(http, f"{base}/get_all_vms", params=params)
            assert status == 400 and code(body) == "invalid_args", (params, body)


# --- honest failures -------------------------------------------------------------------------


async def test_every_failure_has_its_status_and_code(db):
    async with http_server(db) as (srv, base), client() as a, client() as b:
        cases: list[tuple[Any, int, str]] = []
        cases.append((await post(a, f"{base}/add_vm", {"vm_id": "f-1", "ram": -1, "cpu": 1, "disks": []}),
                      400, "invalid_args"))
        cases.append((await post(a, f"{base}/add_vm", [1, 2]), 400, "bad_request"))
        async with a.post(f"{base}/add_vm", data=b'{"vm_id": "x",', headers={"Content-Type": "application/json"}) as r:
            cases.append(((r.status, await _body(r), r.headers), 400, "bad_request"))
        async with a.post(f"{base}/add_vm", data=b'{"vm_id": "x", "vm_id": "y"}',
                          headers={"Content-Type": "application/json"}) as r:
            cases.append(((r.status, await _body(r), r.headers), 400, "bad_request"))
        cases.append((await get(a, f"{base}/get_vm", params={"vm_id": "nope"}), 404, "not_found"))
        cases.append((await get(a, f"{base}/no_such_route"), 404, "not_found"))
        cases.append((await get(a, f"{base}/add_vm"), 405, "bad_request"))
        assert (await post(a, f"{base}/add_vm", vm_args("f-1", "fd-1")))[0] == 200
        cases.append((await post(a, f"{base}/add_vm", vm_args("f-1", "fd-9")), 409, "already_exists"))
        cases.append((await post(a, f"{base}/authorize_vm", {"vm_id": "f-1"}), 403, "not_connected"))
        assert (await post(a, f"{base}/connect_vm", {"vm_id": "f-1"}))[0] == 200
        cases.append((await post(a, f"{base}/update_vm", {"vm_id": "f-1", "ram": 2048}), 403, "not_authorized"))
        cases.append((await post(b, f"{base}/connect_vm", {"vm_id": "f-1"}), 409, "conflict"))
        cases.append((await post(b, f"{base}/remove_vm", {"vm_id": "f-1"}), 409, "conflict"))
        cases.append((await post(b, f"{base}/disconnect_vm", {"vm_id": "f-1"}), 403, "not_connected"))
        for (status, body, _), want_status, want_code in cases:
            assert (status, code(body)) == (want_status, want_code), body
        assert "POST" in (await get(a, f"{base}/add_vm"))[2]["Allow"]
        # nothing of it changed anything: f-1 as it was, still a's
        status, body, _ = await get(a, f"{base}/get_all_vms")
        assert [(v["vm_id"], v["ram"], v["connected"]) for v in body] == [("f-1", 1024, True)]


async def test_hostile_bodies_are_400_and_the_server_goes_on(db):
    bodies = [b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b'{"vm_id": NaN}', b'{"vm_id": 1e999}', b"",
              b'"just a string"', b'{"vm_id": "h-1", "ram": 1, "cpu": 1, "disks": [], "extra": 1}',
              b'{"vm_id": "h-1", "ram": 99999999999999999999999, "cpu": 1, "disks": []}']
    async with http_server(db, max_line=1024 * 1024) as (srv, base), client() as http:
        w = await Wire.open(srv.address[1])
        await w.ok("connect_vm", **vm_args("bystander"))
        for data in bodies:
            async with http.post(f"{base}/add_vm", data=data, headers={"Content-Type": "application/json"}) as r:
                body = await r.json()
                assert r.status == 400 and code(body) in ("bad_request", "invalid_args"), (data[:40], body)
        assert (await get(http, f"{base}/get_all_vms"))[1][0]["vm_id"] == "bystander"  # nothing added
        assert (await w.ok("get_vm", vm_id="bystander"))["connected"] is True  # its session untouched
        await w.close()


async def test_post_bodies_must_be_json(db):
    """A web page's form (or a text/plain 'simple request') cannot drive the API."""
    async with http_server(db) as (srv, base), client() as http:
        body = json.dumps(vm_args("form-1"))
        for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data", None):
            headers = {"Content-Type": content_type} if content_type else {}
            async with http.post(f"{base}/add_vm", data=body.encode(), headers=headers,
                                 skip_auto_headers=("Content-Type",)) as r:
                assert r.status == 415 and code(await r.json()) == "bad_request", content_type
        assert (await get(http, f"{base}/get_all_vms"))[1] == []


async def test_bodies_over_max_line_are_refused_unread(db):
    async with http_server(db, max_line=1024) as (srv, base), client() as http:
        big = vm_args("big-1") | {"password": "x" * 2000}
        status, body, headers = await post(http, f"{base}/add_vm", big)
        assert status == 413 and code(body) == "too_large" and headers.get("Connection") == "close"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused as it passes the limit
            yield b'{"vm_id": "big-2", "password": "'
            for _ in range(100):
                yield b"y" * 100
            yield b'"}'

        async with http.post(f"{base}/add_vm", data=chunks(), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413 and code(await r.json()) == "too_large"
        # the server goes on serving, on a new connection and on the line protocol
        assert (await post(http, f"{base}/add_vm", vm_args("small-1")))[0] == 200
        w = await Wire.open(srv.address[1])
        assert [v["vm_id"] for v in await w.ok("get_all_vms")] == ["small-1"]
        await w.close()


async def test_password_slowdown_is_429_with_retry_after(db):
    async with http_server(db, auth_failures_allowed=1) as (srv, base), client() as a, client() as b:
        assert (await post(a, f"{base}/add_vm", vm_args("slow-1") | {"password": PW}))[0] == 200
        status, body, _ = await post(b, f"{base}/connect_vm", {"vm_id": "slow-1", "password": "wrong"})
        assert status == 403 and code(body) == "auth_failed"
        status, body, headers = await post(b, f"{base}/connect_vm", {"vm_id": "slow-1", "password": PW})
        assert status == 429 and code(body) == "auth_failed" and int(headers["Retry-After"]) >= 1, body
        assert "X-VM-Session" not in headers and "Set-Cookie" not in headers  # no session opened
        assert (await get(a, f"{base}/get_connected_vms"))[1] == []


@pytest.mark.sqlite_only
async def test_ready_and_writes_are_503_while_the_database_takes_no_writes(db):
    async with http_server(db) as (srv, base), client() as http:
        assert (await get(http, f"{base}/ready"))[:2] == (200, "ready")
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
            status, body, _ = await get(http, f"{base}/ready")
            assert status == 503 and code(body) == "unavailable" and "not ready" in body["error"]["message"]
            assert (await get(http, f"{base}/health"))[:2] == (200, "OK")  # alive all the same
            status, body, _ = await post(http, f"{base}/add_vm", vm_args("int-1") | {"password": "pw-int"})
            assert status == 503 and code(body) == "internal" and "nothing was changed" in body["error"]["message"]
            assert "pw-int" not in json.dumps(body) and db not in json.dumps(body)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert (await get(http, f"{base}/ready"))[:2] == (200, "ready")


async def test_https_with_the_line_servers_certificate(db, cert):  # noqa: F811
    cert_pem, key_pem = cert
    async with running(db, http_port=0, tls_cert=cert_pem, tls_key=key_pem) as srv:
        port = srv.http.address[1]
        trusted = ssl.create_default_context(cafile=cert_pem)
        async with client() as http:
            status, body, _ = await post(http, f"https://127.0.0.1:{port}/add_vm", vm_args("tls-1"), ssl=trusted)
            assert (status, body) == (200, "ВМ добавлена")
            with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port is not served
                await get(http, f"http://127.0.0.1:{port}/health")
            with pytest.raises(aiohttp.ClientError):  # nor TLS without trusting the certificate
                await get(http, f"https://127.0.0.1:{port}/health")
            assert (await get(http, f"https://127.0.0.1:{port}/health", ssl=trusted))[:2] == (200, "OK")


# --- the token ---------------------------------------------------------------------------------


async def test_the_token_as_a_bearer(db):
    async with http_server(db, token="http-token") as (srv, base), client() as http:
        status, body, headers = await get(http, f"{base}/get_all_vms")
        assert status == 401 and code(body) == "unauthenticated" and headers["WWW-Authenticate"].startswith("Bearer")
        status, body, _ = await post(http, f"{base}/add_vm", vm_args("t-1"), headers={"Authorization": "Bearer nope"})
        assert status == 401 and code(body) == "auth_failed"
        status, body, _ = await post(http, f"{base}/add_vm", vm_args("t-1"), headers={"Authorization": "Basic x"})
        assert status == 401 and code(body) == "unauthenticated"
        assert (await get(http, f"{base}/health"))[:2] == (200, "OK")
        assert (await get(http, f"{base}/ready"))[0] == 200
        # a token that is not UTF-8 (the header's bytes as sent) is a wrong token, not a crash
        reader, writer = await asyncio.open_connection(*srv.http.address)
        writer.write(b"GET /get_all_vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xed\xa0\x80\r\n"
                     b"Connection: close\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 401 ") and b'"auth_failed"' in reply, reply[:300]
        good = {"Authorization": "Bearer http-token"}
        assert (await post(http, f"{base}/add_vm", vm_args("t-1"), headers=good))[:2] == (200, "ВМ добавлена")
        assert [v["vm_id"] for v in (await get(http, f"{base}/get_all_vms", headers=good))[1]] == ["t-1"]


# --- sessions ------------------------------------------------------------------------------------


async def test_the_header_works_instead_of_the_cookie_and_others_are_refused(db):
    async with http_server(db) as (srv, base), client() as a, client() as nobody:
        assert (await post(a, f"{base}/add_vm", vm_args("s-1")))[0] == 200
        status, _, headers = await post(a, f"{base}/connect_vm", {"vm_id": "s-1"})
        sid = headers["X-VM-Session"]
        a.cookie_jar.clear()  # from now on a's session is only the header
        status, body, _ = await post(a, f"{base}/authorize_vm", {"vm_id": "s-1"})
        assert status == 403 and code(body) == "not_connected"
        mine = {"X-VM-Session": sid}
        status, body, headers = await post(nobody, f"{base}/authorize_vm", {"vm_id": "s-1"}, headers=mine)
        assert (status, body, headers["X-VM-Session"]) == (200, "ВМ авторизована", sid)
        for forged in ("", "x" * 32, sid[:-1]):
            status, body, _ = await post(nobody, f"{base}/deauthorize_vm", {"vm_id": "s-1"},
                                         headers={"X-VM-Session": forged})
            assert status == 403 and code(body) == "not_authorized", forged
        assert (await get(a, f"{base}/get_vm", params={"vm_id": "s-1"}))[1]["authorized"] is True


async def test_delete_session_disconnects_its_vms(db):
    async with http_server(db) as (srv, base), client() as http:
        for vm_id in ("d-1", "d-2"):
            assert (await post(http, f"{base}/connect_vm", vm_args(vm_id)))[0] == 200
        async with http.delete(f"{base}/session") as r:
            assert r.status == 200 and await r.json() == {"released": ["d-1", "d-2"]}
            assert "vmsession=;" in r.headers["Set-Cookie"] or "Max-Age=0" in r.headers["Set-Cookie"]
        assert (await get(http, f"{base}/get_connected_vms"))[1] == []
        async with http.delete(f"{base}/session") as r:
            assert r.status == 404 and code(await r.json()) == "not_found"
        status, body, _ = await get(http, f"{base}/get_history", params={"vm_id": "d-1", "event": "vm_disconnected"})
        assert body[0]["reason"] == "session_closed", body


async def test_a_session_without_requests_expires(db):
    async with http_server(db, http_session_ttl=0.3) as (srv, base), client() as http, client() as other:
        assert (await post(http, f"{base}/connect_vm", vm_args("e-1")))[0] == 200
        for _ in range(4):  # requests keep it alive past the TTL
            await asyncio.sleep(0.15)
            assert (await get(http, f"{base}/health"))[0] == 200
            assert (await post(http, f"{base}/authorize_vm", {"vm_id": "e-1"}))[0] == 200
        for _ in range(100):
            await asyncio.sleep(0.05)
            # asked by another client: a request carrying the session would keep it alive
            if not (await get(other, f"{base}/get_vm", params={"vm_id": "e-1"}))[1]["connected"]:
                break
        else:
            pytest.fail("the session never expired")
        status, body, _ = await get(http, f"{base}/get_history", params={"vm_id": "e-1", "event": "vm_disconnected"})
        assert body[0]["reason"] == "timeout", body
        status, body, _ = await post(http, f"{base}/authorize_vm", {"vm_id": "e-1"})
        assert status == 403 and code(body) == "not_connected"
        assert not srv.http.sessions


async def test_shutdown_ends_http_sessions(db):
    async with http_server(db) as (srv, base), client() as http:
        assert (await post(http, f"{base}/connect_vm", vm_args("sd-1")))[0] == 200
    async with running(db) as srv:
        w = await Wire.open(srv.address[1])
        vm = await w.ok("get_vm", vm_id="sd-1")
        history = await w.ok("get_history", vm_id="sd-1", event="vm_disconnected")
        await w.close()
    assert vm["connected"] is False and history[0]["reason"] == "shutdown", history


@pytest.mark.sqlite_only
async def test_a_connect_in_flight_at_shutdown_is_answered_then_released(db):
    """Shutdown lets the HTTP request in flight finish (its write waits for a lock held by
    another process); the session it opened ends at once, its VM disconnected (shutdown)."""
    blocker = sqlite3.connect(db, isolation_level=None)
    srv, closing = None, None
    try:
        async with http_server(db, busy_timeout_ms=5000) as (srv, base), client() as http:
            blocker.execute("BEGIN IMMEDIATE")
            request = asyncio.ensure_future(post(http, f"{base}/connect_vm", vm_args("fl-1")))
            for _ in range(200):  # until the server is writing it (reserved, waiting for the lock)
                if "fl-1" in srv.inventory._reserved_vm_ids:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the request never reached the server")
            closing = asyncio.ensure_future(srv.close())
            await asyncio.sleep(0.1)
            assert not request.done()
            blocker.execute("COMMIT")
            status, body, headers = await asyncio.wait_for(request, TIMEOUT)
            assert (status, body) == (200, "ВМ подключена")
            await asyncio.wait_for(closing, TIMEOUT)
            assert not srv.http.sessions
    finally:
        blocker.close()
    async with running(db) as again:
        w = await Wire.open(again.address[1])
        assert (await w.ok("get_vm", vm_id="fl-1"))["connected"] is False
        history = await w.ok("get_history", vm_id="fl-1", event="vm_disconnected")
        assert [h["reason"] for h in history] == ["shutdown"], history
        await w.close()


# --- both protocols on one VM ---------------------------------------------------------------------


async def test_tcp_and_http_sessions_exclude_each_other(db):
    async with http_server(db) as (srv, base), client() as http:
        w = await Wire.open(srv.address[1])
        await w.ok("connect_vm", **vm_args("both-1"))
        status, body, _ = await post(http, f"{base}/connect_vm", {"vm_id": "both-1"})
        assert status == 409 and code(body) == "conflict"
        assert (await post(http, f"{base}/connect_vm", vm_args("both-2")))[0] == 200
        assert await w.error("connect_vm", vm_id="both-2") == "conflict"
        assert await w.error("authorize_vm", vm_id="both-2") == "not_connected"
        status, body, _ = await post(http, f"{base}/authorize_vm", {"vm_id": "both-1"})
        assert status == 403 and code(body) == "not_connected"
        # each still holds its own
        await w.ok("authorize_vm", vm_id="both-1")
        assert (await post(http, f"{base}/authorize_vm", {"vm_id": "both-2"}))[0] == 200
        await w.close()


# --- the cap on connections, and stats -------------------------------------------------------------


async def _http_keepalive(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A raw HTTP/1.1 connection that asked GET /health and stays open: (reader, writer, reply head)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return reader, writer, head


async def test_http_connections_count_against_max_connections(db):
    """One cap for both doors: line sessions and HTTP connections together. Over it, HTTP is
    answered 503 (our error body, Connection: close) before its request is read, and the line
    protocol's refusal counts the HTTP connections too."""
    async with http_server(db, max_connections=2, local_reserve=0) as (srv, base):
        http_port = srv.http.address[1]
        w = await Wire.open(srv.address[1])
        r1, w1, head = await _http_keepalive(http_port)
        assert head.startswith(b"HTTP/1.1 200")
        assert (await w.ok("stats"))["connections"] == {"open": 2, "limit": 2}
        # a third: refused on both doors, the open ones untouched
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", http_port), TIMEOUT)
        refused = await asyncio.wait_for(reader.read(), TIMEOUT)  # the whole reply, then EOF
        writer.close()
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in head and b"Retry-After: 1" in head
        assert code(json.loads(body)) == "unavailable" and b"limit 2" in body
        late = await Wire.open(srv.address[1])
        assert late.greeting["ok"] is False and late.greeting["error"]["code"] == "unavailable"
        await late.close()
        assert await w.ok("health") == "OK"
        w1.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # the kept connection still serves
        assert (await asyncio.wait_for(r1.readuntil(b"\r\n\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 200")
        # the HTTP connection goes: its seat is free for a line session
        w1.close()

        async def line_admitted() -> bool:
            again = await Wire.open(srv.address[1])
            admitted = "hello" in again.greeting
            await again.close()
            return admitted

        await until(line_admitted, "a line session is admitted once the HTTP connection closed")
        await w.close()


async def test_stats_counts_sessions_by_protocol_and_connections(db):
    async with http_server(db) as (srv, base), client() as http:
        w = await Wire.open(srv.address[1])
        stats = await w.ok("stats")
        assert stats["sessions"] == {"line": 1, "http": 0}
        assert stats["connections"]["open"] == 1 and stats["connections"]["limit"] == srv.max_sessions
        assert (await post(http, f"{base}/connect_vm", vm_args("st-1")))[0] == 200  # opens an HTTP session
        status, stats, _ = await get(http, f"{base}/stats")
        assert status == 200 and stats["sessions"] == {"line": 1, "http": 1}
        assert stats["connections"]["open"] == 2  # the line session and this client's keep-alive connection
        assert (await http.delete(f"{base}/session")).status == 200
        assert (await w.ok("stats"))["sessions"] == {"line": 1, "http": 0}
        await w.close()


# --- the command line ------------------------------------------------------------------------------


def test_the_flags_and_their_environment_variables():
    from vmserver.config import parse_config

    assert parse_config([], environ={}).http_port is None  # off by default
    config = parse_config([], environ={"VMSERVER_HTTP_PORT": "8081", "VMSERVER_HTTP_SESSION_TTL": "2.5"})
    assert (config.http_port, config.http_session_ttl) == (8081, 2.5)
    assert parse_config(["--http-port", "0"], environ={"VMSERVER_HTTP_PORT": "8081"}).http_port == 0
    for argv in (["--http-port", "65536"], ["--http-port", "x"], ["--http-session-ttl", "0"],
                 ["--http-session-ttl", "-1"], ["--http-session-ttl", "inf"]):
        with pytest.raises(SystemExit) as info:
            parse_config(argv, environ={})
        assert info.value.code == 2, argv


def test_without_aiohttp_the_flag_exits_1_naming_the_extra(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "aiohttp.py").write_text("raise ImportError('No module named aiohttp (shadowed by the test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "vmserver", "--port", "0", "--http-port", "0",
                           "--db", str(tmp_path / "v.db")], env=env, capture_output=True, timeout=TIMEOUT)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert "pip install 'vmserver[http]'" in lines[0]
    assert not (tmp_path / "v.db").exists()  # refused before anything was created


def test_a_taken_http_port_exits_1_naming_it(spawn, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn("--port", "0", "--http-port", str(port), "--db", str(tmp_path / "v.db"))
        assert proc.run_to_exit() == 1
    errors = [line for line in proc.log.decode().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"address HTTP 127.0.0.1:{port}" in errors[0], errors


def test_the_http_port_is_logged_and_served(spawn, tmp_path):
    proc = spawn("--port", "0", "--http-port", "0", "--db", str(tmp_path / "v.db"))
    proc.wait_listening()
    deadline = time.monotonic() + TIMEOUT
    while (found := re.search(rb"HTTP API on http://127\.0\.0\.1:(\d+)", proc.log)) is None:
        assert time.monotonic() < deadline and proc.proc.poll() is None, proc.log
        ready, _, _ = select.select([proc.proc.stderr], [], [], 0.1)
        if ready:
            proc.log += os.read(proc.proc.stderr.fileno(), 65536)
    with urllib.request.urlopen(f"http://127.0.0.1:{int(found.group(1))}/health", timeout=TIMEOUT) as r:
        assert r.read() == b"OK"
    assert proc.stop() == 0


# --- a cluster: two servers on one PostgreSQL --------------------------------------------------


def _http_port(node: Any) -> int:
    deadline = time.monotonic() + TIMEOUT
    while (found := re.search(r"HTTP API on http://127\.0\.0\.1:(\d+)", node.log)) is None:
        assert time.monotonic() < deadline, node.log
        time.sleep(0.02)
    return int(found.group(1))


async def test_cluster_presence_across_protocols_and_the_lease_lost(nodes, own_pg):  # noqa: F811
    """HTTP on server a and TCP on server b exclude each other on one VM; when PostgreSQL stays
    away past the lease, a refuses HTTP (503) and is not ready, its HTTP session is gone, and b
    releases its VMs (server_lost); once PostgreSQL is back, a is ready again."""
    from test_cluster import TTL

    dsn = own_pg.create_database("http")
    a, b = nodes(dsn, "--http-port", "0"), nodes(dsn)
    base = f"http://127.0.0.1:{_http_port(a)}"
    wb = await b.wire()
    async with client() as http:
        assert (await post(http, f"{base}/connect_vm", vm_args("cl-1")))[0] == 200
        await wb.ok("connect_vm", **vm_args("cl-2"))

        async def b_refuses() -> bool:
            reply = await wb.call("connect_vm", vm_id="cl-1")
            return not reply["ok"] and reply["error"]["code"] == "conflict"

        async def a_refuses() -> bool:
            status, body, _ = await post(http, f"{base}/connect_vm", {"vm_id": "cl-2"})
            return status == 409 and code(body) == "conflict"

        await until(b_refuses, "cl-1 held over HTTP on a: conflict on b")
        await until(a_refuses, "cl-2 held over TCP on b: conflict on a")
        await wb.close()
        b.server.kill()  # from here on a alone: its lease is what is tested
        await asyncio.to_thread(own_pg.stop)
        try:
            async def a_unavailable() -> bool:
                status, body, _ = await get(http, f"{base}/get_all_vms")
                return status == 503 and code(body) == "unavailable"

            await until(a_unavailable, "a refuses once its lease is lost", TTL + 5)
            status, body, _ = await get(http, f"{base}/ready")
            assert status == 503 and "not ready" in body["error"]["message"]
            assert (await get(http, f"{base}/health"))[:2] == (200, "OK")
        finally:
            await asyncio.sleep(TTL)  # past the lease
            await asyncio.to_thread(own_pg.start)

        async def a_ready() -> bool:
            return (await get(http, f"{base}/ready"))[0] == 200

        await until(a_ready, "a ready again", 30)

        async def released() -> bool:
            status, body, _ = await get(http, f"{base}/get_vm", params={"vm_id": "cl-1"})
            return status == 200 and body["connected"] is False

        await until(released, "cl-1 released", TTL + 10)
        status, body, _ = await post(http, f"{base}/authorize_vm", {"vm_id": "cl-1"})  # the old session is gone
        assert status == 403 and code(body) == "not_connected", body
