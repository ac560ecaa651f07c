"""The client library given several server addresses (``Client(hosts=[...])``): it tries them in
turn on connect and on reconnect, the one that worked last first; the error when all fail names
each address and its reason; and the address forms it reads (and refuses).

Real servers only: in-process vmservers on 127.0.0.1:0, each on its own SQLite file (which one a
client reached shows in the data: each server holds a VM named after it). The dead addresses are
loopback ports bound and released (nobody listens), a socket that listens but never greets, and a
tiny server that answers like HTTP. Nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

import vmclient
from conftest import running
from test_security import cert  # noqa: F401  (the self-signed certificate fixture)
from vmclient.client import format_address, parse_address

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
STEP = 5.0  # no single await in these tests may take longer than this


async def bounded(aw: Awaitable[Any], seconds: float = STEP) -> Any:
    return await asyncio.wait_for(aw, seconds)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) but never sends a byte."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen(8)
        yield s.getsockname()[1]


@contextlib.asynccontextmanager
async def http_peer() -> AsyncIterator[int]:
    """A server that is not a vmserver: it greets like an HTTP server and hangs up."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(serve, HOST, 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await bounded(srv.wait_closed())


@contextlib.asynccontextmanager
async def named_server(tmp_path: Path, name: str, *, client: dict[str, Any] | None = None,
                       **settings: Any) -> AsyncIterator[Any]:
    """An in-process server on its own database holding one VM called ``name`` (added by a
    client with the ``client`` options)."""
    async with running(str(tmp_path / f"{name}.db"), **settings) as srv:
        c = await bounded(vmclient.connect(HOST, srv.address[1], token=settings.get("token"), **(client or {})))
        try:
            await bounded(c.add_vm(name, ram=1, cpu=1, disks=[]))
        finally:
            await bounded(c.close())
        yield srv


async def reached(c: vmclient.Client) -> list[str]:
    """Which server the client's session is on: the VMs of its database."""
    return [vm["vm_id"] for vm in await bounded(c.get_all_vms())]


async def until_lost(c: vmclient.Client) -> None:
    async def poll() -> None:
        while c.connected:
            await asyncio.sleep(0.01)

    await bounded(poll())


def at(port: int) -> str:
    return f"{HOST}:{port}"


# --- connecting: the first address that works ---------------------------------------------------


async def test_first_address_dead_then_a_live_one(tmp_path: Path) -> None:
    dead = closed_port()
    async with named_server(tmp_path, "live") as srv:
        live = srv.address[1]
        async with vmclient.Client(hosts=[at(dead), ("127.0.0.1", live)], timeout=STEP) as c:
            assert c.connected
            assert c.address == at(live)
            assert (c.host, c.port) == (HOST, live)
            assert await reached(c) == ["live"]
        assert c.address == at(live)  # closed: still says which server it was on


async def test_each_address_is_tried_within_the_connect_timeout(tmp_path: Path) -> None:
    """One that accepts but never greets costs one connect_timeout, then the next is tried."""
    with silent_listener() as silent:
        async with named_server(tmp_path, "live") as srv:
            c = vmclient.Client(hosts=[at(silent), at(srv.address[1])], connect_timeout=0.5, timeout=STEP)
            try:
                await bounded(c.connect())
                assert c.address == at(srv.address[1])
                assert await reached(c) == ["live"]
            finally:
                await bounded(c.close())


async def test_all_dead_the_error_names_every_address_and_why() -> None:
    refused = closed_port()
    with silent_listener() as silent:
        async with http_peer() as http:
            c = vmclient.Client(hosts=[at(refused), at(silent), at(http)], connect_timeout=0.5)
            with pytest.raises(vmclient.ConnectError) as info:
                await bounded(c.connect())
    error = info.value
    text = str(error)
    assert text.startswith("cannot connect to any of 3 servers: "), text
    reasons = text.removeprefix("cannot connect to any of 3 servers: ").split("; ")
    assert len(reasons) == 3, text
    assert reasons[0].startswith(f"{at(refused)}: ") and "refused" in reasons[0].lower(), text
    assert at(silent) in reasons[1] and "no greeting came within 0.5s" in reasons[1], text
    assert reasons[2].startswith(f"{at(http)} did not greet like a vmserver") and "HTTP/1.1" in reasons[2], text
    assert [type(e) for e in error.attempts] == [vmclient.ConnectError] * 3
    assert isinstance(error.attempts[0].__cause__, OSError)
    assert error.__cause__ is error.attempts[-1]
    assert c.connected is False and c.address is None


async def test_one_address_in_hosts_fails_as_host_and_port_do() -> None:
    port = closed_port()
    with pytest.raises(vmclient.ConnectError) as one:
        await bounded(vmclient.connect(hosts=[at(port)]))
    with pytest.raises(vmclient.ConnectError) as plain:
        await bounded(vmclient.connect(HOST, port))
    assert str(one.value) == str(plain.value) == f"cannot connect to {at(port)}: Connection refused"
    assert one.value.attempts == () and isinstance(one.value.__cause__, OSError)


async def test_a_server_that_refuses_the_token_is_passed_over(tmp_path: Path) -> None:
    async with named_server(tmp_path, "other-token", token="not-ours") as other:
        async with named_server(tmp_path, "ours", token="tok-ours") as ours:
            hosts = [at(other.address[1]), at(ours.address[1])]
            async with vmclient.Client(hosts=hosts, token="tok-ours", timeout=STEP) as c:
                assert c.address == at(ours.address[1])
                assert await reached(c) == ["ours"]
            with pytest.raises(vmclient.ConnectError) as info:
                await bounded(vmclient.connect(hosts=hosts, token="wrong"))
            assert f"{hosts[0]} did not accept the token" in str(info.value)
            assert f"{hosts[1]} did not accept the token" in str(info.value)


# --- reconnecting: to another server, the last good one first -----------------------------------


async def test_a_stopped_server_then_connect_moves_to_the_other(tmp_path: Path) -> None:
    async with named_server(tmp_path, "second") as second:
        async with named_server(tmp_path, "first") as first:
            first_at, second_at = at(first.address[1]), at(second.address[1])
            c = vmclient.Client(hosts=[first_at, second_at], timeout=STEP)
            await bounded(c.connect())
            assert c.address == first_at
            await bounded(c.connect_vm("first"))
            await bounded(c.subscribe())
        try:  # the first server is gone
            await until_lost(c)
            with pytest.raises(vmclient.ConnectionLost) as lost:
                await bounded(c.health())
            assert first_at in str(lost.value)
            assert c.address == first_at  # the one that was lost
            assert await bounded(c.connect()) is c
            assert c.address == second_at
            assert await reached(c) == ["second"]
            assert c.subscription is None  # a new session, as on any reconnect
        finally:
            await bounded(c.close())


async def test_reconnect_tries_the_last_good_address_first(tmp_path: Path) -> None:
    """hosts = [a, b]. a is down at first, so b is reached; then a comes up: a reconnect still goes
    to b (the one that worked last), and only when b is gone to a, which is then tried first."""
    a_port = closed_port()
    async with named_server(tmp_path, "b") as b:
        b_port = b.address[1]
        c = vmclient.Client(hosts=[at(a_port), at(b_port)], timeout=STEP)
        try:
            await bounded(c.connect())
            assert c.address == at(b_port)
            async with named_server(tmp_path, "a", port=a_port):
                await bounded(c.close())
                await bounded(c.connect())
                assert c.address == at(b_port)  # not a, though a is first in hosts and up
                assert await reached(c) == ["b"]
                await bounded(b.close())  # b stops
                await until_lost(c)
                await bounded(c.connect())
                assert c.address == at(a_port)
                assert await reached(c) == ["a"]
                async with named_server(tmp_path, "b2", port=b_port):  # b is back
                    await bounded(c.close())
                    await bounded(c.connect())
                    assert c.address == at(a_port)  # a worked last now
                    assert await reached(c) == ["a"]
        finally:
            await bounded(c.close())


# --- TLS: the same settings for every address ---------------------------------------------------


async def test_tls_applies_to_every_address(tmp_path: Path, cert: tuple[str, str]) -> None:  # noqa: F811
    cert_pem, key_pem = cert
    async with named_server(tmp_path, "plain") as plain:
        async with named_server(tmp_path, "tls", client={"tls": True, "cafile": cert_pem},
                                tls_cert=cert_pem, tls_key=key_pem) as tls:
            hosts = [at(closed_port()), at(plain.address[1]), at(tls.address[1])]
            async with vmclient.Client(hosts=hosts, tls=True, cafile=cert_pem, connect_timeout=2.0,
                                       timeout=STEP) as c:
                assert c.address == at(tls.address[1])
                assert await reached(c) == ["tls"]
            with pytest.raises(vmclient.ConnectError) as info:  # without the CA: every one refused
                await bounded(vmclient.connect(hosts=hosts[1:], tls=True, connect_timeout=2.0))
            assert len(info.value.attempts) == 2
            assert "TLS failed" in str(info.value.attempts[1]), info.value


# --- the address forms ---------------------------------------------------------------------------


GOOD = {  # text: (host, port)
    "host:port": ("vm-host.example", 9000),
    "host": ("vm-host.example", vmclient.DEFAULT_PORT),
    "127.0.0.1:1": ("127.0.0.1", 1),
    "127.0.0.1:65535": ("127.0.0.1", 65535),
    "[::1]:8889": ("::1", 8889),
    "[::1]": ("::1", vmclient.DEFAULT_PORT),
    "::1": ("::1", vmclient.DEFAULT_PORT),
    "fe80::1%eth0": ("fe80::1%eth0", vmclient.DEFAULT_PORT),
    "  spaced:7 ": ("spaced", 7),
    "host:007": ("host", 7),
}
GOOD_TEXT = {"host:port": "vm-host.example:9000", "host": "vm-host.example"}


@pytest.mark.parametrize("name", GOOD)
def test_address_forms_are_read(name: str) -> None:
    text = GOOD_TEXT.get(name, name)
    assert parse_address(text) == GOOD[name]
    assert vmclient.Client(hosts=[text]).addresses == [GOOD[name]]
    host, port = GOOD[name]
    assert parse_address(format_address(host, port)) == (host, port)  # the address reads back


def test_a_bare_host_takes_the_default_port_given() -> None:
    assert parse_address("h", 4242) == ("h", 4242)
    assert parse_address("[::1]", 4242) == ("::1", 4242)
    assert parse_address("h:1", 4242) == ("h", 1)


def test_tuples_and_strings_mix_in_order_without_duplicates() -> None:
    c = vmclient.Client(hosts=iter(["a:1", ("b", 2), "a:1", ("a", 1), "[::1]:3"]))
    assert c.addresses == [("a", 1), ("b", 2), ("::1", 3)]
    assert (c.host, c.port) == ("a", 1) and c.address is None  # nothing connected yet
    assert format_address("::1", 3) == "[::1]:3" and format_address("a", 1) == "a:1"


BAD = {  # text: what the ValueError must say
    "empty": ("", "empty address"),
    "blank": ("   ", "empty address"),
    "no host": (":8888", "has no host"),
    "empty brackets": ("[]:1", "has no host"),
    "not a port": ("host:notaport", "not a port number: 'notaport'"),
    "empty port": ("host:", "not a port number: ''"),
    "signed port": ("host:+80", "not a port number: '+80'"),
    "non-ASCII digits": ("host:\u0668\u0660", "not a port number"),
    "port zero": ("host:0", "port must be from 1 to 65535, got 0"),
    "port out of range": ("host:65536", "port must be from 1 to 65535, got 65536"),
    "port far out of range": ("[::1]:99999", "port must be from 1 to 65535, got 99999"),
    "unclosed bracket": ("[::1:8888", "no closing ']'"),
    "junk after bracket": ("[::1]8888", "only :PORT may follow ']'"),
    "colons, not IPv6": ("a:b:c", "neither HOST:PORT nor an IPv6 address"),
}


@pytest.mark.parametrize("text,says", BAD.values(), ids=BAD.keys())
def test_bad_addresses_are_refused_clearly(text: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert says in str(info.value)
    if text.strip():
        assert repr(text) in str(info.value)  # it says which one
    with pytest.raises(ValueError) as info:
        vmclient.Client(hosts=["127.0.0.1:1", text])
    assert says in str(info.value)


@pytest.mark.parametrize("entry,error,says", [
    (("h",), ValueError, "must be (host, port)"),
    (("h", 1, 2), ValueError, "must be (host, port)"),
    (("", 1), ValueError, "has no host"),
    (("h", 0), ValueError, "from 1 to 65535, got 0"),
    (("h", 65536), ValueError, "from 1 to 65535, got 65536"),
    (("h", "80"), TypeError, "(host: str, port: int)"),
    (("h", True), TypeError, "(host: str, port: int)"),
    ((None, 80), TypeError, "(host: str, port: int)"),
    (8888, TypeError, "a str or a (host, port) tuple"),
], ids=["one item", "three items", "empty host", "port 0", "port 65536", "port a str", "port a bool",
        "host None", "an int"])
def test_bad_tuples_are_refused_clearly(entry: Any, error: type[Exception], says: str) -> None:
    with pytest.raises(error) as info:
        vmclient.Client(hosts=[entry])
    assert says in str(info.value)


def test_hosts_with_host_or_port_is_a_type_error() -> None:
    for kwargs in ({"host": "a"}, {"port": 1}, {"host": "a", "port": 1}):
        with pytest.raises(TypeError) as info:
            vmclient.Client(**kwargs, hosts=["b:2"])
        assert "host/port or hosts, not both" in str(info.value)
    with pytest.raises(TypeError):
        vmclient.Client("a", hosts=["b:2"])  # positionally too


def test_hosts_must_be_a_non_empty_list() -> None:
    with pytest.raises(TypeError) as info:
        vmclient.Client(hosts="a:1,b:2")  # a string is not a list of addresses
    assert "not one string" in str(info.value)
    with pytest.raises(ValueError) as info:
        vmclient.Client(hosts=[])
    assert "hosts is empty" in str(info.value)


def test_host_and_port_keep_their_meaning() -> None:
    assert vmclient.Client().addresses == [("127.0.0.1", vmclient.DEFAULT_PORT)]
    assert vmclient.Client("h").addresses == [("h", vmclient.DEFAULT_PORT)]
    assert vmclient.Client(port=7).addresses == [("127.0.0.1", 7)]
    assert vmclient.Client("h", 99999).addresses == [("h", 99999)]  # as before: refused when connecting
