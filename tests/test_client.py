"""The asyncio client library (vmclient) against a real in-process vmserver, plus a few tiny
misbehaving servers written here (never answering, hanging up, wrong ids, wrong greetings).

Nothing of vmclient or vmserver is mocked: every call goes over a real loopback socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import vmclient
from vmclient.client import redact

pytestmark = pytest.mark.timeout(15)

HOST = "127.0.0.1"
STEP = 5.0  # no single await in these tests may take longer than this
COMMANDS = ["add_vm", "connect_vm", "authorize_vm", "deauthorize_vm", "update_vm", "disconnect_vm",
            "get_all_vms", "get_connected_vms", "get_authorized_vms", "get_all_disks", "get_vm", "stats",
            "remove_vm", "get_history", "subscribe", "unsubscribe", "health", "auth"]
GREETING = b'{"hello":{"server":"vmserver","version":"x","protocol":1,"commands":[]}}\n'
REPO = Path(__file__).resolve().parent.parent


def d(disk_id: str, size: int = 10) -> dict:
    return {"disk_id": disk_id, "size": size}


async def bounded(aw: Awaitable[Any], seconds: float = STEP) -> Any:
    return await asyncio.wait_for(aw, seconds)


async def raises(cls: type[BaseException], aw: Awaitable[Any], seconds: float = STEP) -> Any:
    """Await ``aw`` (bounded) and insist that it raises ``cls``; returns the exception."""
    with pytest.raises(cls) as info:
        await bounded(aw, seconds)
    return info.value


def check_command_error(e: BaseException, cls: type, code: str, cmd: str) -> None:
    assert type(e) is cls, f"expected {cls.__name__}, got {type(e).__name__}: {e}"
    assert isinstance(e, cls)
    assert isinstance(e, vmclient.CommandError)
    assert isinstance(e, vmclient.ClientError)
    assert e.code == code
    assert cls.code == code
    assert isinstance(e.message, str) and e.message != ""
    assert e.request["cmd"] == cmd
    assert str(e) == f"{code}: {e.message}"


def no_secret(e: BaseException, secret: str) -> None:
    assert secret not in str(e)
    assert secret not in repr(e.request)  # type: ignore[attr-defined]
    assert secret not in repr(e.args)


# --- tiny fake servers -----------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "FakeServer"], Awaitable[None]]


class FakeServer:
    """A loopback TCP server whose sessions are run by ``handler``; records the lines it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.lines: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.srv: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> "FakeServer":
        self.srv = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_line(self, reader: asyncio.StreamReader) -> bytes:
        line = await reader.readline()
        if line:
            self.lines.append(line)
        return line

    async def close(self) -> None:
        assert self.srv is not None
        self.srv.close()
        for w in self.writers:
            w.close()
        await asyncio.wait_for(self.srv.wait_closed(), STEP)


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Handler], Awaitable[FakeServer]]]:
    started: list[FakeServer] = []

    async def factory(handler: Handler) -> FakeServer:
        f = await FakeServer(handler).start()
        started.append(f)
        return f

    yield factory
    for f in started:
        await f.close()


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
    writer.write(GREETING)
    await writer.drain()
    while await f.read_line(reader):
        pass


def answers_nothing_then_hangs_up(after: int) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
        writer.write(GREETING)
        await writer.drain()
        for _ in range(after):
            if not await f.read_line(reader):
                return
        # return: the session is closed without a single reply

    return handler


def greets_with(greeting: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
        writer.write(greeting)
        await writer.drain()
        while await f.read_line(reader):
            pass

    return handler


async def wrong_id(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
    writer.write(GREETING)
    await writer.drain()
    line = await f.read_line(reader)
    request_id = json.loads(line)["id"]
    writer.write(json.dumps({"id": [request_id, "not-it"], "ok": True, "result": "OK"}).encode() + b"\n")
    await writer.drain()
    while await f.read_line(reader):
        pass


async def echo_with_extras(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
    """Answers every request correctly, but with an event before each reply and unknown keys."""
    writer.write(GREETING)
    await writer.drain()
    while line := await f.read_line(reader):
        request = json.loads(line)
        writer.write(b'{"event":"something_new","data":{"x":1},"ts":"2026-11-26T21:00:00.000Z"}\n')
        reply = {"id": request["id"], "ok": True, "result": {"cmd": request["cmd"], "args": request["args"]},
                 "later_key": [1, 2]}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()


# --- connecting and the greeting ------------------------------------------------------------


async def test_async_with_client_reads_greeting(server: Any) -> None:
    port = server.address[1]
    client = vmclient.Client(host="127.0.0.1", port=port)
    assert client.connected is False
    assert client.commands == []
    async with client as c:
        assert c is client
        assert c.connected is True
        assert c.server_info["server"] == "vmserver"
        assert c.server_info["protocol"] == 1
        assert isinstance(c.server_info["version"], str) and c.server_info["version"] != ""
        assert c.server_info["commands"] == COMMANDS
        assert c.commands == COMMANDS
        assert await bounded(c.health()) == "OK"
    assert client.connected is False
    await raises(vmclient.ConnectionLost, client.health())


async def test_connect_function_and_close(server: Any) -> None:
    c = await bounded(vmclient.connect("127.0.0.1", server.address[1]))
    assert isinstance(c, vmclient.Client)
    assert c.connected is True
    assert c.commands == COMMANDS
    assert c.server_info["server"] == "vmserver"
    assert await bounded(c.health()) == "OK"
    await bounded(c.close())
    assert c.connected is False
    e = await raises(vmclient.ConnectionLost, c.health(), 1.0)
    assert isinstance(e, vmclient.ClientError)
    await bounded(c.close())  # closing twice is harmless


async def test_commands_is_a_copy(client: vmclient.Client) -> None:
    client.commands.append("nope")
    assert client.commands == COMMANDS


# --- every operation, by name ----------------------------------------------------------------


async def test_every_operation_method(client: vmclient.Client) -> None:
    c = client
    vm1 = await bounded(c.add_vm("vm-1", ram=2048, cpu=2, disks=[d("disk-1", 500)]))
    assert vm1 == {"id": 1, "vm_id": "vm-1", "ram": 2048, "cpu": 2,
                   "disks": [{"id": 1, "disk_id": "disk-1", "size": 500, "vm_id": 1}],
                   "connected": False, "authorized": False, "last_connected": None}
    vm2 = await bounded(c.add_vm("vm-2", ram=4096, cpu=4, disks=[d("disk-2", 100), d("disk-3", 200)],
                                 password="s3cret"))
    assert vm2["id"] == 2 and vm2["vm_id"] == "vm-2"
    assert [x["disk_id"] for x in vm2["disks"]] == ["disk-2", "disk-3"]
    assert "password" not in vm2 and "password_hash" not in vm2

    connected = await bounded(c.connect_vm("vm-1"))
    assert connected["connected"] is True and connected["authorized"] is False
    assert isinstance(connected["last_connected"], str) and connected["last_connected"].endswith("Z")
    # registering while connecting
    vm4 = await bounded(c.connect_vm("vm-4", ram=1024, cpu=1, disks=[d("disk-4", 20)]))
    assert (vm4["id"], vm4["vm_id"], vm4["ram"], vm4["cpu"], vm4["connected"]) == (3, "vm-4", 1024, 1, True)
    assert vm4["disks"] == [{"id": 4, "disk_id": "disk-4", "size": 20, "vm_id": 3}]

    auth1 = await bounded(c.authorize_vm("vm-1"))
    assert auth1["authorized"] is True and auth1["connected"] is True
    await bounded(c.connect_vm("vm-2", password="s3cret"))
    auth2 = await bounded(c.authorize_vm("vm-2", password="s3cret"))
    assert auth2["vm_id"] == "vm-2" and auth2["authorized"] is True

    updated = await bounded(c.update_vm("vm-1", ram=4096, cpu=4, disks=[d("disk-1", 1000), d("disk-5", 50)]))
    assert (updated["ram"], updated["cpu"]) == (4096, 4)
    assert updated["disks"] == [{"id": 1, "disk_id": "disk-1", "size": 1000, "vm_id": 1},
                                {"id": 5, "disk_id": "disk-5", "size": 50, "vm_id": 1}]
    only_ram = await bounded(c.update_vm("vm-1", ram=8192))
    assert (only_ram["ram"], only_ram["cpu"], len(only_ram["disks"])) == (8192, 4, 2)

    deauth = await bounded(c.deauthorize_vm("vm-2"))
    assert deauth["authorized"] is False and deauth["connected"] is True

    all_vms = await bounded(c.get_all_vms())
    assert [v["vm_id"] for v in all_vms] == ["vm-1", "vm-2", "vm-4"]
    assert [v["id"] for v in all_vms] == [1, 2, 3]
    assert [v["vm_id"] for v in await bounded(c.get_connected_vms())] == ["vm-1", "vm-2", "vm-4"]
    assert [v["vm_id"] for v in await bounded(c.get_authorized_vms())] == ["vm-1"]
    disks = await bounded(c.get_all_disks())
    assert [(x["id"], x["disk_id"], x["vm"]) for x in disks] == [
        (1, "disk-1", "vm-1"), (2, "disk-2", "vm-2"), (3, "disk-3", "vm-2"), (4, "disk-4", "vm-4"),
        (5, "disk-5", "vm-1")]
    assert disks[0] == {"id": 1, "disk_id": "disk-1", "size": 1000, "vm_id": 1, "vm": "vm-1"}

    gone = await bounded(c.disconnect_vm("vm-4"))
    assert gone["vm_id"] == "vm-4" and gone["connected"] is False and gone["authorized"] is False
    assert [v["vm_id"] for v in await bounded(c.get_connected_vms())] == ["vm-1", "vm-2"]
    assert await bounded(c.health()) == "OK"


async def test_session_end_releases_vms(server: Any, client: vmclient.Client) -> None:
    other = await bounded(vmclient.connect(HOST, server.address[1]))
    await bounded(other.connect_vm("vm-a", ram=1, cpu=1, disks=[]))
    await bounded(other.authorize_vm("vm-a"))
    assert [v["vm_id"] for v in await bounded(client.get_authorized_vms())] == ["vm-a"]
    await bounded(other.close())
    deadline = time.monotonic() + STEP
    while await bounded(client.get_connected_vms()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert await bounded(client.get_connected_vms()) == []
    assert await bounded(client.get_authorized_vms()) == []
    assert (await bounded(client.connect_vm("vm-a")))["connected"] is True


async def test_call_generic(client: vmclient.Client) -> None:
    assert await bounded(client.call("health")) == "OK"
    vm = await bounded(client.call("add_vm", vm_id="vm-x", ram=64, cpu=1, disks=[d("dx", 3)], password="pw"))
    assert (vm["vm_id"], vm["ram"], vm["cpu"], vm["disks"][0]["disk_id"]) == ("vm-x", 64, 1, "dx")
    assert [v["vm_id"] for v in await bounded(client.call("get_all_vms"))] == ["vm-x"]
    await bounded(client.call("connect_vm", vm_id="vm-x", password="pw"))
    authorized = await bounded(client.call("authorize_vm", vm_id="vm-x", password="pw"))
    assert authorized["authorized"] is True
    # ``timeout`` is the client's option, never sent as an argument
    assert await bounded(client.call("health", timeout=STEP)) == "OK"


async def test_call_line(client: vmclient.Client) -> None:
    c = client
    vm = await bounded(c.call_line('add_vm vm_id=vm-1 ram=2048 cpu=2 disks=[{"disk_id":"disk-1","size":500}]'))
    assert vm == {"id": 1, "vm_id": "vm-1", "ram": 2048, "cpu": 2,
                  "disks": [{"id": 1, "disk_id": "disk-1", "size": 500, "vm_id": 1}],
                  "connected": False, "authorized": False, "last_connected": None}
    vm2 = await bounded(c.call_line('add_vm {"vm_id": "vm-2", "ram": 1, "cpu": 1, "disks": []}'))
    assert vm2["vm_id"] == "vm-2" and vm2["id"] == 2
    assert await bounded(c.call_line("health")) == "OK"
    assert await bounded(c.call_line("  health  ")) == "OK"
    assert await bounded(c.call_line('{"cmd":"health","id":"ping-1"}')) == "OK"
    assert await bounded(c.call_line('{"cmd":"health"}')) == "OK"
    assert [v["vm_id"] for v in await bounded(c.call_line("get_all_vms"))] == ["vm-1", "vm-2"]

    e = await raises(vmclient.AlreadyExists, c.call_line("add_vm vm_id=vm-1 ram=1024 cpu=1 disks=[]"))
    check_command_error(e, vmclient.AlreadyExists, "already_exists", "add_vm")
    assert e.request["line"] == "add_vm vm_id=vm-1 ram=1024 cpu=1 disks=[]"
    e = await raises(vmclient.Conflict, c.call_line('add_vm vm_id=vm-3 ram=1 cpu=1 disks=[{"disk_id":"disk-1","size":1}]'))
    check_command_error(e, vmclient.Conflict, "conflict", "add_vm")
    e = await raises(vmclient.UnknownCommand, c.call_line("helth"))
    check_command_error(e, vmclient.UnknownCommand, "unknown_command", "helth")
    e = await raises(vmclient.InvalidArgs, c.call_line("health color=blue"))
    check_command_error(e, vmclient.InvalidArgs, "invalid_args", "health")
    e = await raises(vmclient.NotFound, c.call_line("update_vm vm_id=nope ram=1"))
    check_command_error(e, vmclient.NotFound, "not_found", "update_vm")

    # lines the server would not answer are refused locally, and the client stays in step
    for line in ("", "   ", "# a comment", "health\nhealth"):
        with pytest.raises(ValueError):
            await bounded(c.call_line(line))
    assert await bounded(c.call_line("health")) == "OK"
    assert await bounded(c.health()) == "OK"


async def test_call_line_json_envelope_error_names_its_command(client: vmclient.Client) -> None:
    """For a JSON-envelope line, the error's request names the envelope's command, not the raw JSON text."""
    e = await raises(vmclient.NotFound, client.call_line('{"cmd":"update_vm","args":{"vm_id":"nope","ram":1}}'))
    check_command_error(e, vmclient.NotFound, "not_found", "update_vm")


async def test_call_line_json_envelope_masks_password(client: vmclient.Client) -> None:
    await bounded(client.add_vm("vm-p", ram=1, cpu=1, disks=[], password="right-pw"))
    await bounded(client.connect_vm("vm-p", password="right-pw"))
    line = '{"cmd":"authorize_vm","args":{"vm_id":"vm-p","password":"wrong-pw"}}'
    e = await raises(vmclient.AuthFailed, client.call_line(line))
    assert e.code == "auth_failed"
    assert "***" in e.request["line"]
    no_secret(e, "wrong-pw")
    no_secret(e, "right-pw")


# --- every error class ------------------------------------------------------------------------


async def test_error_bad_request(client: vmclient.Client) -> None:
    e = await raises(vmclient.BadRequest, client.call_line('{"cmd":1}'))
    assert isinstance(e, vmclient.CommandError) and isinstance(e, vmclient.ClientError)
    assert e.code == "bad_request" and "cmd" in e.message
    assert "cmd" in e.request
    assert e.request["line"] == '{"cmd":1}'
    # an inline line that is not NAME key=value ...
    e = await raises(vmclient.BadRequest, client.call_line("authorize_vm vm_id=vm-1 password=hunter2 junk"))
    check_command_error(e, vmclient.BadRequest, "bad_request", "authorize_vm")
    assert e.request["line"] == "authorize_vm vm_id=vm-1 password=*** junk"
    no_secret(e, "hunter2")
    assert await bounded(client.health()) == "OK"


async def test_error_too_large(client: vmclient.Client) -> None:
    big = "x" * (2 * 1024 * 1024)
    e = await raises(vmclient.TooLarge, client.call("add_vm", vm_id="vm-big", ram=1, cpu=1, disks=[],
                                                     password="secret-" + big), 2.0)
    check_command_error(e, vmclient.TooLarge, "too_large", "add_vm")
    assert e.request["args"]["password"] == "***"
    no_secret(e, "secret-")
    # the line was discarded and the session goes on
    assert await bounded(client.health()) == "OK"
    assert await bounded(client.get_all_vms()) == []


async def test_error_too_large_via_call_line(client: vmclient.Client) -> None:
    line = "add_vm vm_id=vm-big ram=1 cpu=1 disks=[] password=" + "y" * (2 * 1024 * 1024)
    e = await raises(vmclient.TooLarge, client.call_line(line))
    check_command_error(e, vmclient.TooLarge, "too_large", "add_vm")
    assert e.request["line"] == "add_vm vm_id=vm-big ram=1 cpu=1 disks=[] password=***"
    assert await bounded(client.health()) == "OK"


async def test_error_unknown_command(client: vmclient.Client) -> None:
    e = await raises(vmclient.UnknownCommand, client.call("helth"))
    check_command_error(e, vmclient.UnknownCommand, "unknown_command", "helth")
    assert "health" in e.message
    assert e.request == {"cmd": "helth", "args": {}}


async def test_error_invalid_args(client: vmclient.Client) -> None:
    e = await raises(vmclient.InvalidArgs, client.add_vm("vm-1", ram=2048.0, cpu=1, disks=[], password="pw-123"))
    check_command_error(e, vmclient.InvalidArgs, "invalid_args", "add_vm")
    assert e.message.startswith("ram:")
    assert e.request["args"] == {"vm_id": "vm-1", "ram": 2048.0, "cpu": 1, "disks": [], "password": "***"}
    no_secret(e, "pw-123")
    e = await raises(vmclient.InvalidArgs, client.connect_vm("vm-9"))
    check_command_error(e, vmclient.InvalidArgs, "invalid_args", "connect_vm")
    e = await raises(vmclient.InvalidArgs, client.add_vm("vm-1", ram=1, cpu=1, disks=[d("d", 0)]))
    assert e.message.startswith("disks[0].size")
    e = await raises(vmclient.InvalidArgs, client.call("health", color="blue"))
    check_command_error(e, vmclient.InvalidArgs, "invalid_args", "health")
    assert await bounded(client.get_all_vms()) == []


async def test_error_not_found(client: vmclient.Client) -> None:
    for aw, cmd in ((client.update_vm("nope", ram=1), "update_vm"),
                    (client.authorize_vm("nope", password="pw-nf"), "authorize_vm"),
                    (client.deauthorize_vm("nope"), "deauthorize_vm"),
                    (client.disconnect_vm("nope"), "disconnect_vm")):
        e = await raises(vmclient.NotFound, aw)
        check_command_error(e, vmclient.NotFound, "not_found", cmd)
        assert e.request["args"]["vm_id"] == "nope"
        no_secret(e, "pw-nf")


async def test_error_already_exists(client: vmclient.Client) -> None:
    await bounded(client.add_vm("vm-1", ram=1, cpu=1, disks=[]))
    e = await raises(vmclient.AlreadyExists, client.add_vm("vm-1", ram=2, cpu=2, disks=[], password="pw-ae"))
    check_command_error(e, vmclient.AlreadyExists, "already_exists", "add_vm")
    assert "vm-1" in e.message
    assert e.request["args"]["password"] == "***"
    no_secret(e, "pw-ae")


async def test_error_conflict(client: vmclient.Client, client2: vmclient.Client) -> None:
    await bounded(client.add_vm("vm-1", ram=1, cpu=1, disks=[d("disk-1")]))
    e = await raises(vmclient.Conflict, client.add_vm("vm-2", ram=1, cpu=1, disks=[d("disk-1")], password="pw-c"))
    check_command_error(e, vmclient.Conflict, "conflict", "add_vm")
    no_secret(e, "pw-c")
    await bounded(client.connect_vm("vm-1"))
    e = await raises(vmclient.Conflict, client2.connect_vm("vm-1"))
    check_command_error(e, vmclient.Conflict, "conflict", "connect_vm")
    assert [v["vm_id"] for v in await bounded(client.get_all_vms())] == ["vm-1"]


async def test_error_not_connected(client: vmclient.Client, client2: vmclient.Client) -> None:
    await bounded(client.add_vm("vm-1", ram=1, cpu=1, disks=[], password="pw-good"))
    e = await raises(vmclient.NotConnected, client.authorize_vm("vm-1", password="pw-good"))
    check_command_error(e, vmclient.NotConnected, "not_connected", "authorize_vm")
    assert e.request["args"] == {"vm_id": "vm-1", "password": "***"}
    no_secret(e, "pw-good")
    await bounded(client.connect_vm("vm-1", password="pw-good"))
    e = await raises(vmclient.NotConnected, client2.disconnect_vm("vm-1"))
    check_command_error(e, vmclient.NotConnected, "not_connected", "disconnect_vm")


async def test_error_not_authorized(client: vmclient.Client) -> None:
    await bounded(client.connect_vm("vm-1", ram=1, cpu=1, disks=[]))
    e = await raises(vmclient.NotAuthorized, client.update_vm("vm-1", ram=2))
    check_command_error(e, vmclient.NotAuthorized, "not_authorized", "update_vm")
    e = await raises(vmclient.NotAuthorized, client.deauthorize_vm("vm-1"))
    check_command_error(e, vmclient.NotAuthorized, "not_authorized", "deauthorize_vm")


async def test_error_auth_failed(client: vmclient.Client) -> None:
    await bounded(client.add_vm("vm-2", ram=1, cpu=1, disks=[], password="s3cret-right"))
    await bounded(client.connect_vm("vm-2", password="s3cret-right"))
    e = await raises(vmclient.AuthFailed, client.authorize_vm("vm-2", password="s3cret-wrong"))
    check_command_error(e, vmclient.AuthFailed, "auth_failed", "authorize_vm")
    assert e.request == {"cmd": "authorize_vm", "args": {"vm_id": "vm-2", "password": "***"}}
    no_secret(e, "s3cret-wrong")
    no_secret(e, "s3cret-right")
    e = await raises(vmclient.AuthFailed, client.authorize_vm("vm-2"))
    check_command_error(e, vmclient.AuthFailed, "auth_failed", "authorize_vm")
    e = await raises(vmclient.AuthFailed, client.call_line("authorize_vm vm_id=vm-2 password=s3cret-wrong"))
    check_command_error(e, vmclient.AuthFailed, "auth_failed", "authorize_vm")
    assert e.request["line"] == "authorize_vm vm_id=vm-2 password=***"
    no_secret(e, "s3cret-wrong")
    e = await raises(vmclient.AuthFailed, client.call_line('authorize_vm {"vm_id": "vm-2", "password": "s3cret-wrong"}'))
    check_command_error(e, vmclient.AuthFailed, "auth_failed", "authorize_vm")
    no_secret(e, "s3cret-wrong")
    assert (await bounded(client.authorize_vm("vm-2", password="s3cret-right")))["authorized"] is True


@pytest.mark.sqlite_only
async def test_error_internal(client: vmclient.Client, db_path: str) -> None:
    assert await bounded(client.health()) == "OK"
    blocker = sqlite3.connect(db_path, isolation_level=None, timeout=0.1)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        e = await raises(vmclient.InternalError, client.add_vm("vm-1", ram=1, cpu=1, disks=[], password="pw-int"))
        check_command_error(e, vmclient.InternalError, "internal", "add_vm")
        no_secret(e, "pw-int")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # nothing was changed, and the request can be retried
    assert await bounded(client.get_all_vms()) == []
    assert (await bounded(client.add_vm("vm-1", ram=1, cpu=1, disks=[])))["vm_id"] == "vm-1"


def test_error_classes_map_every_code() -> None:
    expected = {"bad_request": vmclient.BadRequest, "too_large": vmclient.TooLarge,
                "unknown_command": vmclient.UnknownCommand, "invalid_args": vmclient.InvalidArgs,
                "not_found": vmclient.NotFound, "already_exists": vmclient.AlreadyExists,
                "conflict": vmclient.Conflict, "not_connected": vmclient.NotConnected,
                "not_authorized": vmclient.NotAuthorized, "auth_failed": vmclient.AuthFailed,
                "internal": vmclient.InternalError}
    for code, cls in expected.items():
        assert cls.code == code
        assert issubclass(cls, vmclient.CommandError) and issubclass(cls, vmclient.ClientError)
    for cls in (vmclient.ConnectError, vmclient.ConnectionLost, vmclient.CallTimeout, vmclient.ProtocolViolation):
        assert issubclass(cls, vmclient.ClientError) and not issubclass(cls, vmclient.CommandError)
    assert issubclass(vmclient.CallTimeout, TimeoutError)


# --- concurrency and size ------------------------------------------------------------------


async def test_500_concurrent_mixed_calls(client: vmclient.Client) -> None:
    await bounded(client.add_vm("dup", ram=1, cpu=1, disks=[]))

    def make(i: int) -> Awaitable[Any]:
        kind = i % 5
        if kind == 0:
            return client.health()
        if kind == 1:
            return client.add_vm(f"vm-{i}", ram=i + 1, cpu=(i % 7) + 1, disks=[d(f"disk-{i}", i + 2)])
        if kind == 2:
            return client.add_vm("dup", ram=i + 1, cpu=1, disks=[])
        if kind == 3:
            return client.update_vm(f"missing-{i}", ram=i + 1)
        return client.call("no_such_cmd_" + str(i))

    results = await bounded(asyncio.gather(*(make(i) for i in range(500)), return_exceptions=True), 15)
    assert len(results) == 500
    for i, r in enumerate(results):
        kind = i % 5
        if kind == 0:
            assert r == "OK", (i, r)
        elif kind == 1:
            assert isinstance(r, dict), (i, r)
            assert (r["vm_id"], r["ram"], r["cpu"]) == (f"vm-{i}", i + 1, (i % 7) + 1)
            assert [(x["disk_id"], x["size"]) for x in r["disks"]] == [(f"disk-{i}", i + 2)]
        elif kind == 2:
            assert type(r) is vmclient.AlreadyExists, (i, r)
            assert r.request["args"]["ram"] == i + 1
        elif kind == 3:
            assert type(r) is vmclient.NotFound, (i, r)
            assert r.request["args"]["vm_id"] == f"missing-{i}"
            assert f"missing-{i}" in r.message
        else:
            assert type(r) is vmclient.UnknownCommand, (i, r)
            assert r.request["cmd"] == f"no_such_cmd_{i}"
    vms = await bounded(client.get_all_vms())
    assert [v["vm_id"] for v in vms] == ["dup"] + [f"vm-{i}" for i in range(1, 500, 5)]
    assert await bounded(client.health()) == "OK"


async def test_concurrent_calls_from_several_clients(server: Any) -> None:
    clients = [await bounded(vmclient.connect(HOST, server.address[1])) for _ in range(4)]
    try:
        async def work(n: int, c: vmclient.Client) -> list[Any]:
            return await asyncio.gather(*(c.add_vm(f"c{n}-{i}", ram=n * 100 + i + 1, cpu=1, disks=[])
                                          for i in range(25)))
        out = await bounded(asyncio.gather(*(work(n, c) for n, c in enumerate(clients))), 10)
        for n, results in enumerate(out):
            assert [(r["vm_id"], r["ram"]) for r in results] == [(f"c{n}-{i}", n * 100 + i + 1) for i in range(25)]
        assert len(await bounded(clients[0].get_all_vms())) == 100
    finally:
        for c in clients:
            await bounded(c.close())


async def test_reply_larger_than_64k(client: vmclient.Client) -> None:
    n = 400
    added = await bounded(asyncio.gather(*(
        client.add_vm(f"big-vm-{i:04d}", ram=1024 + i, cpu=2,
                      disks=[d(f"big-disk-{i:04d}-{k}", 100 + k) for k in range(3)])
        for i in range(n))), 15)
    assert [a["vm_id"] for a in added] == [f"big-vm-{i:04d}" for i in range(n)]
    vms = await bounded(client.get_all_vms())
    assert len(vms) == n
    assert len(json.dumps(vms)) > 64 * 1024
    assert [v["vm_id"] for v in vms] == [f"big-vm-{i:04d}" for i in range(n)]
    assert [v["ram"] for v in vms] == [1024 + i for i in range(n)]
    assert all(len(v["disks"]) == 3 for v in vms)
    disks = await bounded(client.get_all_disks())
    assert len(disks) == 3 * n
    assert len(json.dumps(disks)) > 64 * 1024
    assert await bounded(client.health()) == "OK"


# --- connection loss, timeouts, protocol trouble ------------------------------------------------


async def test_pending_calls_fail_with_connection_lost(fake: Any) -> None:
    f = await fake(answers_nothing_then_hangs_up(after=5))
    c = await bounded(vmclient.connect(HOST, f.port))
    assert c.connected is True
    results = await bounded(asyncio.gather(
        c.health(), c.get_all_vms(), c.add_vm("vm-1", ram=1, cpu=1, disks=[]), c.call("x"), c.call_line("health"),
        return_exceptions=True))
    assert len(results) == 5
    for r in results:
        assert type(r) is vmclient.ConnectionLost, r
        assert isinstance(r, vmclient.ClientError)
    assert len(f.lines) == 5
    assert c.connected is False
    started = time.monotonic()
    e = await raises(vmclient.ConnectionLost, c.health(), 1.0)
    assert isinstance(e, vmclient.ClientError)
    await raises(vmclient.ConnectionLost, c.add_vm("vm-2", ram=1, cpu=1, disks=[]), 1.0)
    assert time.monotonic() - started < 1.0
    await bounded(c.close())


async def test_pending_calls_fail_when_client_closes(fake: Any) -> None:
    f = await fake(never_answers)
    c = await bounded(vmclient.connect(HOST, f.port))
    pending = [asyncio.ensure_future(c.health()) for _ in range(3)]
    await asyncio.sleep(0.05)
    await bounded(c.close())
    for p in pending:
        e = await raises(vmclient.ConnectionLost, p, 1.0)
        assert isinstance(e, vmclient.ClientError)
    await raises(vmclient.ConnectionLost, c.health(), 1.0)


async def test_server_stops_while_client_idle(server: Any) -> None:
    c = await bounded(vmclient.connect(HOST, server.address[1]))
    try:
        assert await bounded(c.health()) == "OK"
        await bounded(server.close())
        e = await raises(vmclient.ConnectionLost, c.health())
        assert isinstance(e, vmclient.ClientError)
        assert c.connected is False
        await raises(vmclient.ConnectionLost, c.get_all_vms(), 1.0)
    finally:
        await bounded(c.close())


async def test_call_timeout_keeps_client_usable(fake: Any) -> None:
    f = await fake(never_answers)
    c = await bounded(vmclient.connect(HOST, f.port))
    try:
        started = time.monotonic()
        e = await raises(vmclient.CallTimeout, c.health(timeout=0.2), 3.0)
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 2.0
        assert isinstance(e, TimeoutError)
        assert isinstance(e, asyncio.TimeoutError)
        assert isinstance(e, vmclient.ClientError)
        assert not isinstance(e, vmclient.CommandError)
        assert "health" in str(e)
        assert c.connected is True
        e2 = await raises(vmclient.CallTimeout, c.call("get_all_vms", timeout=0.2), 3.0)
        assert isinstance(e2, TimeoutError)
        await raises(vmclient.CallTimeout, c.call_line("health", timeout=0.1), 3.0)
        assert c.connected is True
        assert len(f.lines) == 3
    finally:
        await bounded(c.close())


async def test_default_timeout_option(fake: Any) -> None:
    f = await fake(never_answers)
    c = await bounded(vmclient.connect(HOST, f.port, timeout=0.2))
    try:
        started = time.monotonic()
        await raises(vmclient.CallTimeout, c.health(), 3.0)
        assert time.monotonic() - started < 2.0
    finally:
        await bounded(c.close())


async def test_timeout_with_real_server(client: vmclient.Client) -> None:
    assert await bounded(client.health(timeout=5.0)) == "OK"
    assert await bounded(client.get_all_vms(timeout=5.0)) == []
    vm = await bounded(client.add_vm("vm-t", ram=1, cpu=1, disks=[], timeout=5.0))
    assert vm["vm_id"] == "vm-t"
    assert await bounded(client.health(timeout=None)) == "OK"


async def test_connect_error_closed_port() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    sock.close()
    e = await raises(vmclient.ConnectError, vmclient.connect(HOST, port))
    assert isinstance(e, vmclient.ClientError)
    assert isinstance(e.__cause__, OSError)
    assert str(port) in str(e)
    with pytest.raises(vmclient.ConnectError):
        async with vmclient.Client(host=HOST, port=port):
            pass


@pytest.mark.parametrize("greeting", [
    b"HTTP/1.1 200 OK\n",
    b'{"hello":{"server":"vmserver","version":"9","protocol":2,"commands":[]}}\n',
    b'{"hello":{"server":"other","version":"1","protocol":1,"commands":[]}}\n',
    b'{"hi":1}\n',
    b"[1,2]\n",
])
async def test_connect_error_wrong_greeting(fake: Any, greeting: bytes) -> None:
    f = await fake(greets_with(greeting))
    e = await raises(vmclient.ConnectError, vmclient.connect(HOST, f.port, connect_timeout=2.0))
    assert isinstance(e, vmclient.ClientError)
    client = vmclient.Client(HOST, f.port, connect_timeout=2.0)
    with pytest.raises(vmclient.ConnectError):
        await bounded(client.__aenter__())
    assert client.connected is False


async def test_connect_error_server_hangs_up_without_greeting(fake: Any) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
        return

    f = await fake(hang_up)
    await raises(vmclient.ConnectError, vmclient.connect(HOST, f.port, connect_timeout=2.0))


async def test_connect_error_no_greeting_in_time(fake: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
        await reader.read()

    f = await fake(silent)
    started = time.monotonic()
    await raises(vmclient.ConnectError, vmclient.connect(HOST, f.port, connect_timeout=0.3))
    assert time.monotonic() - started < 2.0


async def test_mismatched_reply_id_is_a_protocol_violation(fake: Any) -> None:
    """The server answers the first request with a wrong id: every pending call fails, none hangs."""
    f = await fake(wrong_id)
    c = await bounded(vmclient.connect(HOST, f.port))
    try:
        results = await bounded(asyncio.gather(c.health(), c.get_all_vms(), c.health(),
                                               return_exceptions=True), 2.0)
        for r in results:  # including the call whose reply had the wrong id
            assert type(r) is vmclient.ConnectionLost, r
            assert isinstance(r.__cause__, vmclient.ProtocolViolation)
            assert isinstance(r.__cause__, vmclient.ClientError)
        assert c.connected is False
        await raises(vmclient.ConnectionLost, c.health(), 1.0)
    finally:
        await bounded(c.close())


async def test_unsolicited_or_garbage_reply_is_a_protocol_violation(fake: Any) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
        writer.write(GREETING)
        await f.read_line(reader)
        writer.write(b"this is not json\n")
        await writer.drain()
        while await f.read_line(reader):
            pass

    f = await fake(garbage)
    c = await bounded(vmclient.connect(HOST, f.port))
    try:
        e = await raises(vmclient.ConnectionLost, c.health())
        assert isinstance(e.__cause__, vmclient.ProtocolViolation)
    finally:
        await bounded(c.close())


async def test_late_reply_to_timed_out_call_is_not_given_to_the_next(fake: Any) -> None:
    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, f: FakeServer) -> None:
        writer.write(GREETING)
        while line := await f.read_line(reader):
            request = json.loads(line)
            await asyncio.sleep(0.3)
            writer.write(json.dumps({"id": request["id"], "ok": True, "result": request["args"]}).encode() + b"\n")
            await writer.drain()

    f = await fake(slow_echo)
    c = await bounded(vmclient.connect(HOST, f.port))
    try:
        await raises(vmclient.CallTimeout, c.call("echo", n=1, timeout=0.1), 2.0)
        assert await bounded(c.call("echo", n=2, timeout=2.0)) == {"n": 2}
        assert await bounded(c.call("echo", n=3, timeout=2.0)) == {"n": 3}
        assert c.connected is True
    finally:
        await bounded(c.close())


async def test_reply_over_max_reply_loses_the_connection(server: Any, client: vmclient.Client) -> None:
    await bounded(asyncio.gather(*(client.add_vm(f"vm-{i}", ram=1, cpu=1, disks=[d(f"disk-{i}")])
                                   for i in range(50))))
    small = await bounded(vmclient.connect(HOST, server.address[1], max_reply=2000))
    try:
        assert await bounded(small.health()) == "OK"
        results = await bounded(asyncio.gather(small.get_all_vms(), small.health(), return_exceptions=True), 3.0)
        for r in results:
            assert type(r) is vmclient.ConnectionLost, r
            assert isinstance(r.__cause__, vmclient.ProtocolViolation)
        assert small.connected is False
    finally:
        await bounded(small.close())
    assert len(await bounded(client.get_all_vms())) == 50


async def test_events_and_unknown_reply_keys_are_ignored(fake: Any) -> None:
    f = await fake(echo_with_extras)
    c = await bounded(vmclient.connect(HOST, f.port))
    try:
        results = await bounded(asyncio.gather(*(c.call("echo", n=i) for i in range(20))))
        assert results == [{"cmd": "echo", "args": {"n": i}} for i in range(20)]
        assert c.connected is True
    finally:
        await bounded(c.close())


# --- redaction and packaging ---------------------------------------------------------------


def test_redact_inline_and_json() -> None:
    assert redact("authorize_vm vm_id=vm-2 password=s3cret") == "authorize_vm vm_id=vm-2 password=***"
    assert redact('authorize_vm vm_id=vm-2 password="two words" x=1') == "authorize_vm vm_id=vm-2 password=*** x=1"
    assert redact('authorize_vm password="a\\"b" vm_id=vm-2') == "authorize_vm password=*** vm_id=vm-2"
    assert (redact('{"cmd":"authorize_vm","args":{"vm_id":"vm-2","password":"s3cret"}}')
            == '{"cmd":"authorize_vm","args":{"vm_id":"vm-2","password":"***"}}')
    assert (redact('authorize_vm {"vm_id": "vm-2", "password": "has, comma"}')
            == 'authorize_vm {"vm_id": "vm-2", "password": "***"}')
    assert redact('{"password":"q\\"uote","x":1}') == '{"password":"***","x":1}'
    assert redact('{"password": 12345}') == '{"password": "***"}'
    assert redact("get_all_vms") == "get_all_vms"
    assert redact("add_vm vm_id=vm-1 ram=1 cpu=1 disks=[]") == "add_vm vm_id=vm-1 ram=1 cpu=1 disks=[]"
    for secret in ("s3cret", "two words", "has, comma"):
        assert secret not in redact(f'x password="{secret}" {{"password": "{secret}"}}')


def test_library_does_not_import_vmserver() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import vmclient, sys; print('vmserver' in sys.modules)"],
        cwd=str(REPO), capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
