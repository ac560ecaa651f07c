"""Wire-level tests: raw bytes to a real server, exact reply lines back.

Every expectation here is a whole reply line, byte for byte, in the key order the server
emits (``{"id":...,"ok":true,"result":...}`` / ``{"id":...,"ok":false,"error":{...}}``).
Timestamps (``last_connected``) are the only variable part: they are checked for format
and plausibility, then replaced by a placeholder before the exact comparison.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import vmserver
from vmserver.presence import SERVER_ID
from vmserver.commands import COMMANDS
from vmserver.config import Config
from vmserver.server import Server, start_server

from conftest import TIMEOUT, Wire

# --- helpers -------------------------------------------------------------------------------

TS_RE = re.compile(rb'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"')
TS = '"<TS>"'  # what a timestamp becomes in an expected line


def check_timestamp(stamp: str) -> datetime:
    """The one timestamp format on the wire, and a plausible (recent, UTC) value."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    now = datetime.now(timezone.utc)
    assert now - timedelta(seconds=60) <= when <= now + timedelta(seconds=1), (stamp, now)
    return when


def redact(line: bytes, expected_stamps: int) -> tuple[bytes, list[str]]:
    """``line`` with every timestamp replaced by TS, and the timestamps (format-checked)."""
    stamps = [m.group(0)[1:-1].decode("ascii") for m in TS_RE.finditer(line)]
    assert len(stamps) == expected_stamps, line
    for stamp in stamps:
        check_timestamp(stamp)
    return TS_RE.sub(TS.encode("ascii"), line), stamps


def ok(rid: str, result: str) -> bytes:
    """An exact success line; ``rid`` and ``result`` are JSON text."""
    return b'{"id":' + rid.encode() + b',"ok":true,"result":' + result.encode() + b"}\n"


def err(rid: str, code: str, message: str) -> bytes:
    """An exact error line; ``message`` is plain text (JSON-escaped here, ASCII only)."""
    return (b'{"id":' + rid.encode() + b',"ok":false,"error":{"code":"' + code.encode()
            + b'","message":' + json.dumps(message).encode("ascii") + b"}}\n")


def rec(pk: int, vm_id: str, ram: int, cpu: int, disks: list[tuple[int, str, int]],
        connected: bool, authorized: bool, last_connected: bool) -> str:
    """A VM record as JSON text; ``disks`` are (pk, disk_id, size); a last_connected is TS."""
    disk_text = ",".join(
        f'{{"id":{d_pk},"disk_id":"{d_id}","size":{size},"vm_id":{pk}}}' for d_pk, d_id, size in disks)
    return (f'{{"id":{pk},"vm_id":"{vm_id}","ram":{ram},"cpu":{cpu},"disks":[{disk_text}],'
            f'"connected":{"true" if connected else "false"},'
            f'"authorized":{"true" if authorized else "false"},'
            f'"last_connected":{TS if last_connected else "null"}}}')


def req(cmd: str, rid: object = None, **args: object) -> bytes:
    """A compact JSON envelope line (no newline)."""
    body: dict = {"cmd": cmd}
    if args:
        body["args"] = args
    if rid is not None:
        body["id"] = rid
    return json.dumps(body, separators=(",", ":")).encode()


async def rt(w: Wire, line: bytes | str) -> bytes:
    """Send one line, return the one raw reply line."""
    await w.send(line)
    return await w.recv_line()


async def rt_ts(w: Wire, line: bytes | str, stamps: int) -> tuple[bytes, list[str]]:
    return redact(await rt(w, line), stamps)


async def raw_open(port: int) -> tuple[Wire, bytes]:
    """A Wire plus the greeting exactly as sent."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=64 * 1024 * 1024), TIMEOUT)
    greeting = await asyncio.wait_for(reader.readline(), TIMEOUT)
    return Wire(reader, writer, json.loads(greeting)), greeting


def padded_health(rid: int, length: int) -> bytes:
    """A valid health envelope of exactly ``length`` bytes (JSON whitespace before the '}')."""
    base = b'{"cmd":"health","id":%d' % rid
    pad = length - len(base) - 1
    assert pad >= 0
    return base + b" " * pad + b"}"


HEALTH_NULL = ok("null", '"OK"')
D1 = '{"disk_id":"disk-1","size":500}'


@pytest.fixture
async def small_server(tmp_path: Path) -> AsyncIterator[Server]:
    """A second server whose longest accepted line is 1024 bytes."""
    srv = await start_server(Config(host="127.0.0.1", port=0, db=str(tmp_path / "small.db"),
                                    max_line=1024, busy_timeout_ms=200))
    try:
        yield srv
    finally:
        await srv.close()
        srv.inventory.close()


# --- greeting ----------------------------------------------------------------------------


async def test_greeting_line_exact(server: Server) -> None:
    w, greeting = await raw_open(server.address[1])
    try:
        commands = ",".join(f'"{name}"' for name in list(COMMANDS))
        expected = ('{"hello":{"server":"vmserver","version":"' + vmserver.__version__
                    + '","protocol":1,"commands":[' + commands + '],"auth_required":false,"server_id":"'
                    + SERVER_ID + '"}}\n').encode()
        assert greeting == expected
        assert json.loads(greeting)["hello"]["commands"] == [
            "add_vm", "connect_vm", "authorize_vm", "deauthorize_vm", "update_vm", "disconnect_vm",
            "get_all_vms", "get_connected_vms", "get_authorized_vms", "get_all_disks", "get_vm", "stats",
            "remove_vm", "get_history", "subscribe", "unsubscribe", "health", "auth"]
        # the greeting is sent once; the next line is the answer to our first request
        assert await rt(w, req("health", 1)) == ok("1", '"OK"')
    finally:
        await w.close()


# --- each operation, exact reply ------------------------------------------------------------


async def test_health_exact(wire: Wire) -> None:
    assert await rt(wire, b'{"cmd":"health","id":1}') == b'{"id":1,"ok":true,"result":"OK"}\n'
    assert await rt(wire, b'{"cmd":"health","args":{},"id":"h"}') == b'{"id":"h","ok":true,"result":"OK"}\n'


async def test_add_vm_exact(wire: Wire) -> None:
    line = b'{"cmd":"add_vm","args":{"vm_id":"vm-1","ram":2048,"cpu":2,"disks":[' + D1.encode() + b']},"id":1}'
    assert await rt(wire, line) == (
        b'{"id":1,"ok":true,"result":{"id":1,"vm_id":"vm-1","ram":2048,"cpu":2,'
        b'"disks":[{"id":1,"disk_id":"disk-1","size":500,"vm_id":1}],'
        b'"connected":false,"authorized":false,"last_connected":null}}\n')
    # a second VM with two disks gets the next ids
    line = req("add_vm", 2, vm_id="vm-2", ram=512, cpu=1,
               disks=[{"disk_id": "disk-2", "size": 20}, {"disk_id": "disk-3", "size": 30}])
    assert await rt(wire, line) == ok("2", rec(2, "vm-2", 512, 1, [(2, "disk-2", 20), (3, "disk-3", 30)],
                                               False, False, False))


async def test_add_vm_with_password_never_echoes_it(wire: Wire) -> None:
    line = req("add_vm", 1, vm_id="pw-1", ram=1, cpu=1, disks=[], password="s3cret-pw")
    reply = await rt(wire, line)
    assert reply == ok("1", rec(1, "pw-1", 1, 1, [], False, False, False))
    assert b"s3cret" not in reply and b"password" not in reply


async def test_connect_vm_registers_unknown_vm(wire: Wire) -> None:
    line = b'{"cmd":"connect_vm","args":{"vm_id":"new-vm","ram":4096,"cpu":4,"disks":[{"disk_id":"nd-1","size":100}]},"id":"c"}'
    reply, (stamp,) = await rt_ts(wire, line, 1)
    assert reply == (
        b'{"id":"c","ok":true,"result":{"id":1,"vm_id":"new-vm","ram":4096,"cpu":4,'
        b'"disks":[{"id":1,"disk_id":"nd-1","size":100,"vm_id":1}],'
        b'"connected":true,"authorized":false,"last_connected":"<TS>"}}\n')
    # it is registered (persisted in the inventory) and connected, with the same timestamp
    listing = await rt(wire, req("get_all_vms", 2))
    assert listing == ok("2", "[" + rec(1, "new-vm", 4096, 4, [(1, "nd-1", 100)], True, False, True)
                         .replace(TS, f'"{stamp}"') + "]")


async def test_connect_vm_unknown_without_spec_is_invalid_args(wire: Wire) -> None:
    assert await rt(wire, req("connect_vm", 1, vm_id="ghost")) == err(
        "1", "invalid_args",
        "ram: missing (VM 'ghost' is not registered, so connect_vm needs ram, cpu and disks to register it)")
    assert await rt(wire, req("connect_vm", 2, vm_id="ghost", ram=1, cpu=1)) == err(
        "2", "invalid_args",
        "disks: missing (VM 'ghost' is not registered, so connect_vm needs ram, cpu and disks to register it)")
    # nothing was registered
    assert await rt(wire, req("get_all_vms", 3)) == ok("3", "[]")


async def test_connect_vm_known_vm_sets_last_connected_and_is_idempotent(wire: Wire) -> None:
    await rt(wire, req("add_vm", 1, vm_id="vm-1", ram=2048, cpu=2, disks=[{"disk_id": "disk-1", "size": 500}]))
    reply, (first,) = await rt_ts(wire, req("connect_vm", 2, vm_id="vm-1"), 1)
    assert reply == ok("2", rec(1, "vm-1", 2048, 2, [(1, "disk-1", 500)], True, False, True))
    # connecting again from the same session changes nothing, not even the timestamp
    again = await rt(wire, req("connect_vm", 3, vm_id="vm-1"))
    assert again == ok("3", rec(1, "vm-1", 2048, 2, [(1, "disk-1", 500)], True, False, True)
                       .replace(TS, f'"{first}"'))


async def test_lifecycle_exact_replies_and_flags_after_each_step(wire: Wire) -> None:
    """add -> connect -> authorize -> update -> deauthorize -> authorize -> disconnect."""
    disks1 = [(1, "disk-1", 500)]

    def vm(ram: int, cpu: int, disks: list, connected: bool, authorized: bool, last: bool) -> str:
        return rec(1, "vm-1", ram, cpu, disks, connected, authorized, last)

    async def lists(rid: int, record: str, connected: bool, authorized: bool, stamps: int) -> None:
        line, _ = await rt_ts(wire, req("get_all_vms", rid), stamps)
        assert line == ok(str(rid), f"[{record}]")
        line, _ = await rt_ts(wire, req("get_connected_vms", rid + 1), stamps if connected else 0)
        assert line == ok(str(rid + 1), f"[{record}]" if connected else "[]")
        line, _ = await rt_ts(wire, req("get_authorized_vms", rid + 2), stamps if authorized else 0)
        assert line == ok(str(rid + 2), f"[{record}]" if authorized else "[]")

    # add_vm (inline key=value form: id null)
    assert await rt(wire, 'add_vm vm_id=vm-1 ram=2048 cpu=2 disks=[{"disk_id":"disk-1","size":500}]') == ok(
        "null", vm(2048, 2, disks1, False, False, False))
    await lists(100, vm(2048, 2, disks1, False, False, False), False, False, 0)

    # connect_vm
    line, (stamp,) = await rt_ts(wire, req("connect_vm", 1, vm_id="vm-1"), 1)
    assert line == ok("1", vm(2048, 2, disks1, True, False, True))
    await lists(110, vm(2048, 2, disks1, True, False, True), True, False, 1)

    # authorize_vm
    line, stamps = await rt_ts(wire, req("authorize_vm", 2, vm_id="vm-1"), 1)
    assert line == ok("2", vm(2048, 2, disks1, True, True, True)) and stamps == [stamp]
    await lists(120, vm(2048, 2, disks1, True, True, True), True, True, 1)

    # update_vm: ram changes, disk-1 resized, disk-9 added (cpu untouched)
    disks2 = [(1, "disk-1", 600), (2, "disk-9", 7)]
    line, stamps = await rt_ts(wire, req("update_vm", 3, vm_id="vm-1", ram=4096, disks=[
        {"disk_id": "disk-1", "size": 600}, {"disk_id": "disk-9", "size": 7}]), 1)
    assert line == ok("3", vm(4096, 2, disks2, True, True, True)) and stamps == [stamp]
    await lists(130, vm(4096, 2, disks2, True, True, True), True, True, 1)

    # get_all_disks: each record plus the VM's name under "vm"
    assert await rt(wire, req("get_all_disks", 4)) == ok(
        "4", '[{"id":1,"disk_id":"disk-1","size":600,"vm_id":1,"vm":"vm-1"},'
             '{"id":2,"disk_id":"disk-9","size":7,"vm_id":1,"vm":"vm-1"}]')

    # update_vm: replacing the disk set removes disk-1
    disks3 = [(2, "disk-9", 7)]
    line, _ = await rt_ts(wire, req("update_vm", 5, vm_id="vm-1", cpu=8, disks=[{"disk_id": "disk-9", "size": 7}]), 1)
    assert line == ok("5", vm(4096, 8, disks3, True, True, True))
    assert await rt(wire, req("get_all_disks", 6)) == ok(
        "6", '[{"id":2,"disk_id":"disk-9","size":7,"vm_id":1,"vm":"vm-1"}]')

    # deauthorize_vm: stays connected
    line, stamps = await rt_ts(wire, req("deauthorize_vm", 7, vm_id="vm-1"), 1)
    assert line == ok("7", vm(4096, 8, disks3, True, False, True)) and stamps == [stamp]
    await lists(140, vm(4096, 8, disks3, True, False, True), True, False, 1)

    # authorize again, then disconnect_vm ends both
    line, _ = await rt_ts(wire, req("authorize_vm", 8, vm_id="vm-1"), 1)
    assert line == ok("8", vm(4096, 8, disks3, True, True, True))
    line, stamps = await rt_ts(wire, req("disconnect_vm", 9, vm_id="vm-1"), 1)
    assert line == ok("9", vm(4096, 8, disks3, False, False, True)) and stamps == [stamp]
    await lists(150, vm(4096, 8, disks3, False, False, True), False, False, 1)


async def test_list_commands_exact_with_several_vms(wire: Wire) -> None:
    await rt(wire, req("add_vm", 1, vm_id="b-vm", ram=1, cpu=1, disks=[{"disk_id": "b-d", "size": 2}]))
    await rt(wire, req("add_vm", 2, vm_id="a-vm", ram=3, cpu=4, disks=[]))
    await rt_ts(wire, req("connect_vm", 3, vm_id="a-vm"), 1)
    b_rec = rec(1, "b-vm", 1, 1, [(1, "b-d", 2)], False, False, False)
    a_rec = rec(2, "a-vm", 3, 4, [], True, False, True)
    line, _ = await rt_ts(wire, req("get_all_vms", 4), 1)
    assert line == ok("4", f"[{b_rec},{a_rec}]")  # in id order
    line, _ = await rt_ts(wire, req("get_connected_vms", 5), 1)
    assert line == ok("5", f"[{a_rec}]")
    assert await rt(wire, req("get_authorized_vms", 6)) == ok("6", "[]")
    assert await rt(wire, req("get_all_disks", 7)) == ok(
        "7", '[{"id":1,"disk_id":"b-d","size":2,"vm_id":1,"vm":"b-vm"}]')


async def test_empty_lists_exact(wire: Wire) -> None:
    for n, cmd in enumerate(("get_all_vms", "get_connected_vms", "get_authorized_vms", "get_all_disks")):
        assert await rt(wire, req(cmd, n)) == ok(str(n), "[]")


async def test_authorize_with_password(wire: Wire) -> None:
    await rt(wire, req("add_vm", 1, vm_id="pw", ram=1, cpu=1, disks=[], password="s3cret"))
    await rt_ts(wire, req("connect_vm", 2, vm_id="pw", password="s3cret"), 1)
    assert await rt(wire, req("authorize_vm", 3, vm_id="pw")) == err(
        "3", "auth_failed", "VM 'pw' has a password: give password=...")
    assert await rt(wire, req("authorize_vm", 4, vm_id="pw", password="wrong")) == err(
        "4", "auth_failed", "wrong password for VM 'pw'")
    line, _ = await rt_ts(wire, req("get_authorized_vms", 5), 0)
    assert line == ok("5", "[]")  # a failed attempt authorizes nothing
    line, _ = await rt_ts(wire, req("authorize_vm", 6, vm_id="pw", password="s3cret"), 1)
    assert line == ok("6", rec(1, "pw", 1, 1, [], True, True, True))


async def test_authorize_again_rechecks_password_and_failure_changes_nothing(wire: Wire) -> None:
    await rt(wire, req("add_vm", 1, vm_id="pw", ram=1, cpu=1, disks=[], password="s3cret"))
    await rt_ts(wire, req("connect_vm", 2, vm_id="pw", password="s3cret"), 1)
    authorized = ok("3", rec(1, "pw", 1, 1, [], True, True, True))
    line, _ = await rt_ts(wire, req("authorize_vm", 3, vm_id="pw", password="s3cret"), 1)
    assert line == authorized
    line, _ = await rt_ts(wire, req("authorize_vm", 3, vm_id="pw", password="s3cret"), 1)
    assert line == authorized
    assert await rt(wire, req("authorize_vm", 4, vm_id="pw", password="bad")) == err(
        "4", "auth_failed", "wrong password for VM 'pw'")
    line, _ = await rt_ts(wire, req("get_authorized_vms", 5), 1)
    assert line == ok("5", "[" + rec(1, "pw", 1, 1, [], True, True, True) + "]")


async def test_connect_known_vm_ignores_spec_but_type_checks_it(wire: Wire) -> None:
    await rt(wire, req("add_vm", 1, vm_id="vm-1", ram=2048, cpu=2, disks=[{"disk_id": "disk-1", "size": 500}]))
    assert await rt(wire, req("connect_vm", 2, vm_id="vm-1", ram="x")) == err(
        "2", "invalid_args", "ram: must be an integer from 1 to 16777216, got 'x'")
    line, _ = await rt_ts(wire, req("connect_vm", 3, vm_id="vm-1", ram=1, cpu=1, disks=[]), 1)
    assert line == ok("3", rec(1, "vm-1", 2048, 2, [(1, "disk-1", 500)], True, False, True))


async def test_null_argument_is_invalid_and_changes_nothing(wire: Wire) -> None:
    await rt_ts(wire, req("connect_vm", 1, vm_id="vm-1", ram=2, cpu=1, disks=[]), 1)
    await rt_ts(wire, req("authorize_vm", 2, vm_id="vm-1"), 1)
    assert await rt(wire, b'{"cmd":"update_vm","args":{"vm_id":"vm-1","cpu":4,"ram":null},"id":3}') == err(
        "3", "invalid_args", "ram: must be an integer from 1 to 16777216, got null")
    line, _ = await rt_ts(wire, req("get_all_vms", 4), 1)
    assert line == ok("4", "[" + rec(1, "vm-1", 2, 1, [], True, True, True) + "]")


async def test_connect_vm_registers_with_password(wire: Wire) -> None:
    line, _ = await rt_ts(wire, req("connect_vm", 1, vm_id="pv", ram=2, cpu=1, disks=[], password="pa ss"), 1)
    assert line == ok("1", rec(1, "pv", 2, 1, [], True, False, True))
    assert await rt(wire, req("authorize_vm", 2, vm_id="pv", password="nope")) == err(
        "2", "auth_failed", "wrong password for VM 'pv'")
    line, _ = await rt_ts(wire, req("authorize_vm", 3, vm_id="pv", password="pa ss"), 1)
    assert line == ok("3", rec(1, "pv", 2, 1, [], True, True, True))


# --- inline forms, ids, line endings, ignored lines ------------------------------------------


ADDED_VM1 = rec(1, "vm-1", 2048, 2, [(1, "disk-1", 500)], False, False, False)


@pytest.mark.parametrize("line", [
    'add_vm {"vm_id":"vm-1","ram":2048,"cpu":2,"disks":[{"disk_id":"disk-1","size":500}]}',
    'add_vm { "vm_id" : "vm-1", "ram" : 2048, "cpu" : 2, "disks" : [ { "disk_id" : "disk-1", "size" : 500 } ] }',
    'add_vm vm_id=vm-1 ram=2048 cpu=2 disks=[{"disk_id":"disk-1","size":500}]',
    'add_vm vm_id=vm-1 ram=2048 cpu=2 disks=[{"disk_id": "disk-1", "size": 500}]',
    'add_vm   vm_id="vm-1"\tdisks=[ {"disk_id": "disk-1",  "size": 500} ]   cpu=2 ram=2048  ',
], ids=["json", "json-spaced", "kv", "kv-spaces-in-json", "kv-reordered-quoted"])
async def test_inline_add_vm_forms(wire: Wire, line: str) -> None:
    assert await rt(wire, line) == ok("null", ADDED_VM1)


async def test_inline_health_forms(wire: Wire) -> None:
    assert await rt(wire, "health") == HEALTH_NULL
    assert await rt(wire, "   health   ") == HEALTH_NULL
    assert await rt(wire, "health {}") == HEALTH_NULL
    assert await rt(wire, "health\t") == HEALTH_NULL


async def test_inline_requests_answer_with_id_null_even_when_failing(wire: Wire) -> None:
    assert await rt(wire, "nope") == err(
        "null", "unknown_command", "unknown command 'nope' (the greeting lists every command)")
    assert await rt(wire, "connect_vm vm_id=ghost") == err(
        "null", "invalid_args",
        "ram: missing (VM 'ghost' is not registered, so connect_vm needs ram, cpu and disks to register it)")
    assert await rt(wire, "add_vm vm_id=x ram=NaN cpu=1 disks=[]") == err(
        "null", "invalid_args", "ram: must be an integer from 1 to 16777216, got 'NaN'")


@pytest.mark.parametrize("rid", [
    '"abc"', '""', '"sp ace\\u00e9\\"q"', "0", "7", "-3", "123456789012345678901234567890", "null",
    '{"b":1,"a":[1,2]}', "{}", '[1,"x",null]', "[]", "true", "false", "1.5",
], ids=["str", "empty-str", "str-escapes", "zero", "int", "neg", "bigint", "null",
        "object", "empty-object", "array", "empty-array", "true", "false", "float"])
async def test_id_echoed_verbatim(wire: Wire, rid: str) -> None:
    line = '{"cmd":"health","id":' + rid + "}"
    assert await rt(wire, line) == ok(rid, '"OK"')
    # and on an error reply too
    line = '{"cmd":"nope","id":' + rid + "}"
    assert await rt(wire, line) == err(rid, "unknown_command",
                                       "unknown command 'nope' (the greeting lists every command)")


async def test_missing_id_is_null(wire: Wire) -> None:
    assert await rt(wire, b'{"cmd":"health"}') == HEALTH_NULL


async def test_crlf_line_endings(wire: Wire) -> None:
    await wire.send_raw(b'{"cmd":"health","id":1}\r\nhealth\r\n'
                        b'add_vm vm_id=vm-1 ram=2048 cpu=2 disks=[{"disk_id":"disk-1","size":500}]\r\n'
                        b'{"cmd":"get_all_disks","id":2}\r\n')
    assert await wire.recv_line() == ok("1", '"OK"')
    assert await wire.recv_line() == HEALTH_NULL
    assert await wire.recv_line() == ok("null", ADDED_VM1)
    assert await wire.recv_line() == ok("2", '[{"id":1,"disk_id":"disk-1","size":500,"vm_id":1,"vm":"vm-1"}]')


async def test_blank_whitespace_and_comment_lines_get_no_reply(wire: Wire) -> None:
    await wire.send_raw(b"\n" b"\r\n" b"   \n" b"\t \t\n" b" \x0b\x0c \n" b"# a comment\n"
                        b"   # indented comment\n" b'#{"cmd":"health","id":"commented"}\n'
                        b'{"cmd":"health","id":"after"}\n')
    # the first and only reply is the one for the request after the ignored lines
    assert await wire.recv_line() == ok('"after"', '"OK"')
    assert await rt(wire, req("health", "next")) == ok('"next"', '"OK"')


async def test_replies_are_ascii_only(wire: Wire) -> None:
    """Non-ASCII input comes back \\u-escaped: every reply line is pure ASCII."""
    reply = await rt(wire, '{"cmd":"health","id":"\u00e9\u2028 \U0001f600"}'.encode("utf-8"))
    assert reply == b'{"id":"\\u00e9\\u2028 \\ud83d\\ude00","ok":true,"result":"OK"}\n'
    reply = await rt(wire, '{"cmd":"h\u00e9","id":1}'.encode("utf-8"))
    assert reply == b'{"id":1,"ok":false,"error":{"code":"unknown_command","message":"unknown command ' \
                    b"'h\\u00e9' (the greeting lists every command)\"}}\n"
    reply = await rt(wire, "add_vm vm_id=\u00e9 ram=1 cpu=1 disks=[]".encode("utf-8"))
    assert reply == err("null", "invalid_args",
                        "vm_id: must be a string of 1 to 64 characters from [A-Za-z0-9._:-], got '\u00e9'")
    assert b"got '\\u00e9'" in reply and reply.isascii()


# --- pipelining --------------------------------------------------------------------------------


async def test_pipelining_200_requests_in_one_write(wire: Wire) -> None:
    lines: list[bytes] = []
    expected: list[bytes] = []
    added = 0
    for i in range(200):
        kind = i % 5
        if kind == 0:
            lines.append(req("health", i))
            expected.append(ok(str(i), '"OK"'))
        elif kind == 1:
            lines.append(b'{"cmd":"nope","id":%d}' % i)
            expected.append(err(str(i), "unknown_command",
                                "unknown command 'nope' (the greeting lists every command)"))
        elif kind == 2:
            added += 1
            lines.append(req("add_vm", i, vm_id=f"vm-{i}", ram=i + 1, cpu=1, disks=[]))
            expected.append(ok(str(i), rec(added, f"vm-{i}", i + 1, 1, [], False, False, False)))
        elif kind == 3:
            lines.append(req("add_vm", i, vm_id=f"vm-{i - 1}", ram=1, cpu=1, disks=[]))
            expected.append(err(str(i), "already_exists", f"VM 'vm-{i - 1}' already exists"))
        else:
            lines.append(b'{"cmd":"health","id":%d,"args":{"x":1}}' % i)
            expected.append(err(str(i), "invalid_args", "unknown argument 'x' for health (allowed: none)"))
    await wire.send_raw(b"\n".join(lines) + b"\n")
    replies = [await wire.recv_line() for _ in range(200)]
    assert [json.loads(r)["id"] for r in replies] == list(range(200))
    assert replies == expected
    # exactly 200: the next line is the answer to the next request
    assert await rt(wire, req("health", "end")) == ok('"end"', '"OK"')


# --- every error code over the wire -----------------------------------------------------------


STATELESS_ERRORS = [
    (b"\xff\xfe", err("null", "bad_request", "request is not valid UTF-8 (byte 0xff at offset 0)")),
    (b'health \xc3(', err("null", "bad_request", "request is not valid UTF-8 (byte 0xc3 at offset 7)")),
    (b'{"cmd":', err("null", "bad_request", "not valid JSON: Expecting value at column 8")),
    (b'{"cmd":"health","id":1,"args":{"x":NaN}}',
     err("null", "bad_request", "not valid JSON: NaN is not allowed in JSON")),
    (b'{"cmd":"health","id":1,"cmd":"health"}', err("null", "bad_request", "not valid JSON: duplicate key 'cmd'")),
    (b'{"cmd":"health","id":1e400}', err("null", "bad_request", "not valid JSON: number 1e400 is out of range")),
    (b'{"cmd":"health","id":-Infinity}',
     err("null", "bad_request", "not valid JSON: -Infinity is not allowed in JSON")),
    (b"[1]", err("null", "bad_request", "a request must be a JSON object, got array")),
    (b'"health"', err("null", "bad_request", "a request must be a JSON object, got string")),
    (b'{"cmd":"health","id":"e","extra":1}',
     err('"e"', "bad_request", "unknown envelope key 'extra' (allowed: cmd, args, id)")),
    (b'{"id":5}', err("5", "bad_request", "envelope key 'cmd' missing")),
    (b'{"cmd":7,"id":5}', err("5", "bad_request", "envelope key 'cmd' must be a string, got integer")),
    (b'{"cmd":"health","args":[],"id":5}',
     err("5", "bad_request", "envelope key 'args' must be an object, got array")),
    (b'{"cmd":"health","args":null,"id":6}',
     err("6", "bad_request", "envelope key 'args' must be an object, got null")),
    (b'add_vm {"vm_id":', err("null", "bad_request",
                              "arguments are not a valid JSON object: Expecting value at column 17")),
    (b"add_vm vm_id=a vm_id=b", err("null", "bad_request", "argument 'vm_id' given twice")),
    (b"add_vm oops", err("null", "bad_request", "expected key=value, got 'oops' (or give one JSON object)")),
    (b'{"cmd":"helth","id":1}', err("1", "unknown_command",
                                    "unknown command 'helth'; did you mean 'health'? (the greeting lists every command)")),
    (b"frobnicate", err("null", "unknown_command", "unknown command 'frobnicate' (the greeting lists every command)")),
    (b'{"cmd":"add_vm","id":1}', err("1", "invalid_args", "vm_id: missing (required by add_vm)")),
    (b'{"cmd":"add_vm","args":{"vm_id":"bad id","ram":1,"cpu":1,"disks":[]},"id":2}',
     err("2", "invalid_args", "vm_id: must be a string of 1 to 64 characters from [A-Za-z0-9._:-], got 'bad id'")),
    (b'{"cmd":"add_vm","args":{"vm_id":"v","ram":0,"cpu":1,"disks":[]},"id":3}',
     err("3", "invalid_args", "ram: must be an integer from 1 to 16777216, got 0")),
    (b'{"cmd":"add_vm","args":{"vm_id":"v","ram":1,"cpu":true,"disks":[]},"id":4}',
     err("4", "invalid_args", "cpu: must be an integer from 1 to 4096, got true")),
    (b'{"cmd":"add_vm","args":{"vm_id":"v","ram":1,"cpu":1,"disks":[{"disk_id":"d"}]},"id":5}',
     err("5", "invalid_args", "disks[0].size: missing")),
    (b'{"cmd":"health","args":{"x":1},"id":6}',
     err("6", "invalid_args", "unknown argument 'x' for health (allowed: none)")),
    (b'{"cmd":"update_vm","args":{"vm_id":"v"},"id":7}',
     err("7", "invalid_args", "ram, cpu, disks: update_vm needs at least one of them")),
    (b'{"cmd":"authorize_vm","args":{"vm_id":"ghost"},"id":8}', err("8", "not_found", "no VM 'ghost'")),
    (b'{"cmd":"disconnect_vm","args":{"vm_id":"ghost"},"id":9}', err("9", "not_found", "no VM 'ghost'")),
    (b'{"cmd":"connect_vm","args":{"vm_id":"ghost"},"id":10}', err(
        "10", "invalid_args",
        "ram: missing (VM 'ghost' is not registered, so connect_vm needs ram, cpu and disks to register it)")),
]


@pytest.mark.parametrize("line, expected", STATELESS_ERRORS,
                         ids=[line[:40].decode("utf-8", "replace") for line, _ in STATELESS_ERRORS])
async def test_stateless_errors_exact(wire: Wire, line: bytes, expected: bytes) -> None:
    assert await rt(wire, line) == expected
    # the session keeps working after every error
    assert await rt(wire, req("health", "ok")) == ok('"ok"', '"OK"')


async def test_stateful_error_codes(wire: Wire, connect) -> None:
    other = await connect()
    assert await rt(wire, req("add_vm", 1, vm_id="vm-1", ram=1, cpu=1, disks=[{"disk_id": "disk-1", "size": 5}])) \
        == ok("1", rec(1, "vm-1", 1, 1, [(1, "disk-1", 5)], False, False, False))
    # already_exists
    assert await rt(wire, req("add_vm", 2, vm_id="vm-1", ram=1, cpu=1, disks=[])) == err(
        "2", "already_exists", "VM 'vm-1' already exists")
    # conflict: a disk of another VM, a disk twice
    assert await rt(wire, req("add_vm", 3, vm_id="vm-2", ram=1, cpu=1, disks=[{"disk_id": "disk-1", "size": 5}])) \
        == err("3", "conflict", "disk 'disk-1' already belongs to VM 'vm-1'")
    assert await rt(wire, req("connect_vm", 4, vm_id="vm-3", ram=1, cpu=1, disks=[
        {"disk_id": "dd", "size": 1}, {"disk_id": "dd", "size": 2}])) == err(
        "4", "conflict", "disk 'dd' appears twice in disks")
    # not_connected: never connected
    assert await rt(wire, req("authorize_vm", 5, vm_id="vm-1")) == err(
        "5", "not_connected", "VM 'vm-1' is not connected by this session; connect_vm it first")
    assert await rt(wire, req("disconnect_vm", 6, vm_id="vm-1")) == err(
        "6", "not_connected", "VM 'vm-1' is not connected by this session; connect_vm it first")
    # not_authorized: connected but not authorized
    assert await rt(wire, req("update_vm", 7, vm_id="vm-1", ram=2)) == err(
        "7", "not_authorized", "VM 'vm-1' is not authorized by this session")
    await rt_ts(wire, req("connect_vm", 8, vm_id="vm-1"), 1)
    assert await rt(wire, req("deauthorize_vm", 9, vm_id="vm-1")) == err(
        "9", "not_authorized", "VM 'vm-1' is not authorized by this session")
    assert await rt(wire, req("update_vm", 10, vm_id="vm-1", cpu=2)) == err(
        "10", "not_authorized", "VM 'vm-1' is not authorized by this session")
    # conflict: connected by another session
    assert await rt(other, req("connect_vm", 11, vm_id="vm-1")) == err(
        "11", "conflict", "VM 'vm-1' is connected by another session")
    assert await rt(other, req("authorize_vm", 12, vm_id="vm-1")) == err(
        "12", "not_connected", "VM 'vm-1' is not connected by this session; another session holds it")
    assert await rt(other, req("disconnect_vm", 13, vm_id="vm-1")) == err(
        "13", "not_connected", "VM 'vm-1' is not connected by this session; another session holds it")
    assert await rt(other, req("deauthorize_vm", 13.5, vm_id="vm-1")) == err(
        "13.5", "not_authorized", "VM 'vm-1' is not authorized by this session")
    # once authorized by us, the other session is still not authorized for it
    await rt_ts(wire, req("authorize_vm", 14, vm_id="vm-1"), 1)
    assert await rt(other, req("update_vm", 15, vm_id="vm-1", ram=9)) == err(
        "15", "not_authorized", "VM 'vm-1' is not authorized by this session")
    # conflict on update: a disk that belongs to another VM
    await rt(wire, req("add_vm", 16, vm_id="vm-4", ram=1, cpu=1, disks=[{"disk_id": "disk-4", "size": 1}]))
    assert await rt(wire, req("update_vm", 17, vm_id="vm-1", disks=[{"disk_id": "disk-4", "size": 1}])) == err(
        "17", "conflict", "disk 'disk-4' already belongs to VM 'vm-4'")
    # none of the failures changed anything
    line, _ = await rt_ts(wire, req("get_all_vms", 18), 1)
    assert line == ok("18", "[" + rec(1, "vm-1", 1, 1, [(1, "disk-1", 5)], True, True, True) + ","
                      + rec(2, "vm-4", 1, 1, [(2, "disk-4", 1)], False, False, False) + "]")


# --- line length limits -------------------------------------------------------------------------

TOO_LARGE_1K = err("null", "too_large", "request line longer than 1024 bytes; it was discarded")


async def test_too_large_then_same_session_continues(small_server: Server) -> None:
    w, _ = await raw_open(small_server.address[1])
    try:
        await w.send_raw(padded_health(1, 5000) + b"\nhealth\n")
        assert await w.recv_line() == TOO_LARGE_1K  # id null: the line was never parsed
        assert await w.recv_line() == HEALTH_NULL
        # garbage that is too long is also just too_large
        await w.send_raw(b"x" * 5000 + b"\n" + req("health", 2) + b"\n")
        assert await w.recv_line() == TOO_LARGE_1K
        assert await w.recv_line() == ok("2", '"OK"')
    finally:
        await w.close()


async def test_line_of_exactly_max_line_is_accepted(small_server: Server) -> None:
    w, _ = await raw_open(small_server.address[1])
    try:
        line = padded_health(7, 1024)
        assert len(line) == 1024
        assert await rt(w, line) == ok("7", '"OK"')
        # with a CRLF ending as well (the '\r' does not count)
        await w.send_raw(padded_health(8, 1024) + b"\r\n")
        assert await w.recv_line() == ok("8", '"OK"')
        # one byte more is too large
        assert await rt(w, padded_health(9, 1025)) == TOO_LARGE_1K
        assert await rt(w, padded_health(10, 1024)) == ok("10", '"OK"')
    finally:
        await w.close()


async def test_final_line_over_max_line_at_eof_is_too_large(small_server: Server) -> None:
    """The limit holds for a last line without newline too: 1025 bytes then EOF is too_large."""
    w, _ = await raw_open(small_server.address[1])
    try:
        await w.send_raw(padded_health(11, 1025))
        w.writer.write_eof()
        assert await w.recv_line() == TOO_LARGE_1K
        assert await w.at_eof()
    finally:
        await w.close()


async def test_3mb_line_with_default_limit_then_good_request(wire: Wire) -> None:
    big = b'{"cmd":"health","id":1,"args":{"x":"' + b"a" * (3 * 1024 * 1024) + b'"}}'
    await wire.send_raw(big + b"\n" + req("health", 2) + b"\n")
    assert await wire.recv_line() == err("null", "too_large",
                                         f"request line longer than {1 << 20} bytes; it was discarded")
    assert await wire.recv_line() == ok("2", '"OK"')
    # and nothing else is pending
    assert await rt(wire, req("health", 3)) == ok("3", '"OK"')


# --- end of input ------------------------------------------------------------------------------


async def test_final_line_without_newline_then_half_close(wire: Wire) -> None:
    await wire.send_raw(b'health\n{"cmd":"health","id":"tail"}')
    wire.writer.write_eof()
    assert await wire.recv_line() == HEALTH_NULL
    assert await wire.recv_line() == ok('"tail"', '"OK"')
    assert await wire.at_eof()


async def test_half_close_after_complete_lines(wire: Wire) -> None:
    await wire.send_raw(req("get_all_vms", 1) + b"\n")
    wire.writer.write_eof()
    assert await wire.recv_line() == ok("1", "[]")
    assert await wire.at_eof()


async def test_session_end_releases_its_vms(connect) -> None:
    a, b = await connect(), await connect()
    await rt_ts(a, req("connect_vm", 1, vm_id="vm-a", ram=1, cpu=1, disks=[]), 1)
    await rt_ts(a, req("authorize_vm", 2, vm_id="vm-a"), 1)
    line, _ = await rt_ts(b, req("get_authorized_vms", 3), 1)
    assert line == ok("3", "[" + rec(1, "vm-a", 1, 1, [], True, True, True) + "]")
    a.writer.write_eof()
    assert await a.at_eof()
    # poll briefly: the server releases on its side of the close
    for _ in range(100):
        line = await rt(b, req("get_connected_vms", 4))
        if line == ok("4", "[]"):
            break
        await asyncio.sleep(0.01)
    assert line == ok("4", "[]")
    line, _ = await rt_ts(b, req("get_all_vms", 5), 1)
    assert line == ok("5", "[" + rec(1, "vm-a", 1, 1, [], False, False, True) + "]")
    # and it can be connected by someone else now
    line, _ = await rt_ts(b, req("connect_vm", 6, vm_id="vm-a"), 1)
    assert line == ok("6", rec(1, "vm-a", 1, 1, [], True, False, True))


# --- isolation between sessions ----------------------------------------------------------------


async def test_garbage_on_one_session_does_not_disturb_another(connect) -> None:
    a, b = await connect(), await connect()
    line, (stamp,) = await rt_ts(b, req("connect_vm", 1, vm_id="vm-b", ram=8, cpu=2,
                                        disks=[{"disk_id": "bd", "size": 3}]), 1)
    b_rec = rec(1, "vm-b", 8, 2, [(1, "bd", 3)], True, False, True)
    assert line == ok("1", b_rec)
    await rt_ts(b, req("authorize_vm", 2, vm_id="vm-b"), 1)
    b_rec_auth = rec(1, "vm-b", 8, 2, [(1, "bd", 3)], True, True, True)

    garbage = [
        (b"\xff\xfe\xfd", err("null", "bad_request", "request is not valid UTF-8 (byte 0xff at offset 0)")),
        (b'{"cmd":', err("null", "bad_request", "not valid JSON: Expecting value at column 8")),
        (b"z" * (2 * 1024 * 1024),
         err("null", "too_large", f"request line longer than {1 << 20} bytes; it was discarded")),
        (b'{"cmd":"health","id":NaN}', err("null", "bad_request", "not valid JSON: NaN is not allowed in JSON")),
    ]
    for n, (bad, expected) in enumerate(garbage):
        await a.send_raw(bad + b"\n")
        assert await a.recv_line() == expected
        # B is unaffected: it answers, and its VM is still connected and authorized
        assert await rt(b, req("health", f"b{n}")) == ok(f'"b{n}"', '"OK"')
        line, stamps = await rt_ts(b, req("get_connected_vms", 10 + n), 1)
        assert line == ok(str(10 + n), f"[{b_rec_auth}]") and stamps == [stamp]
    # A itself is still alive and cannot take B's VM
    assert await rt(a, req("health", "a")) == ok('"a"', '"OK"')
    assert await rt(a, req("connect_vm", 20, vm_id="vm-b")) == err(
        "20", "conflict", "VM 'vm-b' is connected by another session")
    line, _ = await rt_ts(b, req("update_vm", 21, vm_id="vm-b", ram=16), 1)
    assert line == ok("21", rec(1, "vm-b", 16, 2, [(1, "bd", 3)], True, True, True))


async def test_all_garbage_in_one_write_while_other_session_pipelines(connect) -> None:
    a, b = await connect(), await connect()
    await rt_ts(b, req("connect_vm", 1, vm_id="vm-b", ram=1, cpu=1, disks=[]), 1)
    await a.send_raw(b"\xc3\x28\n" + b'{"cmd":\n' + b"y" * (2 * 1024 * 1024) + b"\n"
                     + b'{"cmd":"health","args":{"n":NaN}}\n' + req("health", "a-end") + b"\n")
    await b.send_raw(b"".join(req("health", i) + b"\n" for i in range(50)))
    assert [await b.recv_line() for _ in range(50)] == [ok(str(i), '"OK"') for i in range(50)]
    assert [json.loads(await a.recv_line())["error"]["code"] for _ in range(4)] == [
        "bad_request", "bad_request", "too_large", "bad_request"]
    assert await a.recv_line() == ok('"a-end"', '"OK"')
    line, _ = await rt_ts(b, req("get_connected_vms", 99), 1)
    assert line == ok("99", "[" + rec(1, "vm-b", 1, 1, [], True, False, True) + "]")


async def test_unicode_whitespace_is_whitespace_and_never_drops_the_session(connect) -> None:
    """Non-ASCII whitespace (U+00A0, U+3000, U+001C, ...) is whitespace like ' ': a line of only
    that is blank (no reply), around a command it is ignored. It must never end the session."""
    a, b = await connect(), await connect()
    await rt_ts(a, req("connect_vm", 1, vm_id="vm-a", ram=1, cpu=1, disks=[]), 1)
    await a.send_raw("\u00a0\n".encode() + b"\x1c\n" + "\u2028 \u3000\r\n".encode()
                     + "\u3000health\u00a0\n".encode()
                     + "add_vm\u00a0vm_id=vm-1\u3000ram=2048 cpu=2\u00a0disks=[{\"disk_id\":\"disk-1\",\"size\":500}]\u2003\n"
                     .encode()
                     + "\u00a0# a comment after NBSP\n".encode()
                     + req("health", "after") + b"\n")
    assert await a.recv_line() == HEALTH_NULL  # the three blank lines got no reply
    assert await a.recv_line() == ok("null", rec(2, "vm-1", 2048, 2, [(1, "disk-1", 500)], False, False, False))
    assert await a.recv_line() == ok('"after"', '"OK"')
    # A still holds its VM; B never noticed anything
    line, _ = await rt_ts(b, req("get_connected_vms", 2), 1)
    assert line == ok("2", "[" + rec(1, "vm-a", 1, 1, [], True, False, True) + "]")
