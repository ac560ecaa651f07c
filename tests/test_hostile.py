"""Hostile input: the server survives whatever arrives on its port.

Every case sends something bad over a real socket to a real in-process server and checks:

* the reply is one error line with the exact documented code and a non-empty message;
* the attacked session still answers ``health`` afterwards (unless the protocol says the
  server hangs up, as for HTTP, and then it does hang up);
* a bystander session, opened before the attack and holding a connected VM, is untouched:
  it still answers, its VM is still connected and still held by it;
* nothing was written: the inventory holds exactly what it held before.

Then hypothesis throws random bytes, random envelopes and random inline lines at a server
and checks after every single line that exactly one well-formed reply came back (none for
blank and ``#`` lines) and that the inventory is consistent; and a 500-line pipeline of
mixed good and bad lines gets its 500 replies in order.

Nothing of vmserver is mocked. Every read is bounded (10 s in ``Wire``, socket timeouts in
the synchronous client of the property tests).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from conftest import TIMEOUT, Wire, disk, vm_args
from vmserver.commands import COMMANDS
from vmserver.config import Config
from vmserver.server import Server, start_server

# The closed set of protocol.md's "Error codes" table (written out, not imported: this is
# the contract, and the server must not grow codes behind its back).
ERROR_CODES = frozenset({
    "bad_request", "too_large", "unknown_command", "invalid_args", "not_found", "already_exists",
    "conflict", "not_connected", "not_authorized", "auth_failed", "unauthenticated", "unavailable",
    "internal",
})

BYSTANDER_VM = "bystander-vm"
BYSTANDER_DISK = "bystander-disk"
DEEP = 100_000
MAX_LINE = 1 << 20

IDENT = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# --- helpers ------------------------------------------------------------------------------


def check_reply_shape(reply: Any) -> None:
    """A reply line as protocol.md defines it: ok with a result, or an error from the closed set."""
    assert isinstance(reply, dict), reply
    assert "id" in reply, reply
    assert reply.get("ok") in (True, False), reply
    if reply["ok"]:
        assert set(reply) == {"id", "ok", "result"}, reply
    else:
        assert set(reply) == {"id", "ok", "error"}, reply
        error = reply["error"]
        assert isinstance(error, dict) and set(error) == {"code", "message"}, reply
        assert error["code"] in ERROR_CODES, reply
        assert isinstance(error["message"], str) and error["message"].strip(), reply


async def expect_error(w: Wire, code: str, rid: Any = None) -> str:
    """Read one reply: it must be an error with exactly ``code`` and id ``rid``; returns the message."""
    reply = await w.recv()
    check_reply_shape(reply)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["id"] == rid, reply
    return reply["error"]["message"]


async def send_expect(w: Wire, line: str | bytes, code: str, rid: Any = None) -> str:
    await w.send(line)
    return await expect_error(w, code, rid)


async def vm_names(w: Wire) -> set[str]:
    return {vm["vm_id"] for vm in await w.ok("get_all_vms")}


async def assert_unharmed(server: Server, bystander: Wire, attacked: Wire | None = None,
                          vms: set[str] | frozenset[str] = frozenset({BYSTANDER_VM})) -> None:
    """The attacked session (if still open) and the bystander answer; the bystander's VM is
    still connected and still held by the bystander; the inventory holds exactly ``vms``."""
    if attacked is not None:
        reply = await attacked.call("health", id="after-attack")
        assert reply == {"id": "after-attack", "ok": True, "result": "OK"}, reply
    reply = await bystander.call("health", id="bystander")
    assert reply == {"id": "bystander", "ok": True, "result": "OK"}, reply
    connected = {vm["vm_id"]: vm for vm in await bystander.ok("get_connected_vms")}
    assert BYSTANDER_VM in connected, connected
    assert connected[BYSTANDER_VM]["connected"] is True
    assert [d["disk_id"] for d in connected[BYSTANDER_VM]["disks"]] == [BYSTANDER_DISK]
    # Still held by the bystander: nobody else can take it, and the bystander can act on it.
    probe = await Wire.open(server.address[1])
    try:
        assert await probe.error("connect_vm", vm_id=BYSTANDER_VM) == "conflict"
    finally:
        await probe.close()
    assert (await bystander.ok("authorize_vm", vm_id=BYSTANDER_VM))["authorized"] is True
    assert (await bystander.ok("deauthorize_vm", vm_id=BYSTANDER_VM))["authorized"] is False
    assert await vm_names(bystander) == set(vms)


@pytest.fixture
async def bystander(connect: Any) -> Wire:
    """A session opened before the attack, holding a connected VM."""
    w = await connect()
    record = await w.ok("connect_vm", **vm_args(BYSTANDER_VM, BYSTANDER_DISK, ram=512, cpu=1))
    assert record["connected"] is True
    return w


def envelope(cmd: str, args_json: str, rid_json: str | None = None) -> str:
    """An envelope line written by hand, so that it can hold what json.dumps would never write."""
    line = '{"cmd":"' + cmd + '","args":' + args_json
    if rid_json is not None:
        line += ',"id":' + rid_json
    return line + "}"


# --- not UTF-8 -----------------------------------------------------------------------------

NOT_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\x80",  # lone continuation byte
    b"\xbf\xbf\xbf",
    b"\xc3",  # truncated two-byte sequence
    b"\xc3\x28",  # bad continuation
    b"\xe2\x28\xa1",
    b"\xe2\x82",  # truncated three-byte sequence
    b"\xf0\x28\x8c\xbc",
    b"\xf0\x90\x28\xbc",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",  # old five-byte form
    b"\xfc\x84\x80\x80\x80\x80",  # old six-byte form
    b"\xc0\x80",  # overlong NUL
    b"\xc0\xaf",  # overlong '/'
    b"\xc1\xbf",
    b"\xe0\x80\xaf",  # overlong '/', three bytes
    b"\xf0\x80\x80\xaf",  # overlong '/', four bytes
    b"\xed\xa0\x80",  # lone high surrogate U+D800 encoded as bytes
    b"\xed\xbf\xbf",  # lone low surrogate U+DFFF
    b"\xed\xa0\x80\xed\xb0\x80",  # a surrogate pair CESU-8 style
    b"health \xff",
    b"add_vm vm_id=\xc0\xaf ram=1 cpu=1 disks=[]",
    b'{"cmd":"health","id":"\xfe"}',
    b'{"cmd":"add_vm","args":{"vm_id":"u8\xed\xa0\x80","ram":1,"cpu":1,"disks":[]}}',
    b"# a comment \xff is still a line that must be UTF-8",
    b"   \x80   ",
]


@pytest.mark.parametrize("line", NOT_UTF8, ids=lambda b: b.hex()[:24])
async def test_not_utf8_is_bad_request(server: Server, wire: Wire, bystander: Wire, line: bytes) -> None:
    message = await send_expect(wire, line, "bad_request")
    assert "UTF-8" in message, message
    await assert_unharmed(server, bystander, wire)


# --- not JSON, JSON that is not an object ----------------------------------------------------

NOT_JSON = [
    "{",
    "[",
    '"',
    '{"cmd":"health"',
    '{"cmd":"health"}}',
    '{"cmd":"health",}',
    "{'cmd':'health'}",
    '{cmd:"health"}',
    '{"cmd":health}',
    '{"cmd":"health"} trailing',
    '{"cmd":"health"}{"cmd":"health"}',
    '{"cmd":"health","id":01}',
    '{"cmd":"health","id":0x10}',
    '{"cmd":"health","id":.5}',
    '{"cmd":"health","id":+1}',
    '{"cmd":"health","id":"\\x41"}',
    '{"cmd":"health","id":"\\u12"}',
    '[1,',
    '"unterminated',
    "add_vm {",
    'add_vm {"vm_id":"nj","ram":1,"cpu":1,"disks":[]',
    'add_vm {"vm_id":"nj","ram":1,"cpu":1,"disks":[]} extra=1',
]


@pytest.mark.parametrize("line", NOT_JSON)
async def test_not_json_is_bad_request(server: Server, wire: Wire, bystander: Wire, line: str) -> None:
    message = await send_expect(wire, line, "bad_request")
    assert "JSON" in message, message
    await assert_unharmed(server, bystander, wire)


NOT_INLINE = [
    "health foo",
    "add_vm =1",
    "add_vm vm_id=ni ram=1 cpu=1 disks=[] 9=1",
    "add_vm vm-id=ni",
    "get_all_vms [1]",
    "add_vm vm_id=ni vm_id=ni2 ram=1 cpu=1 disks=[]",  # a key given twice
]


@pytest.mark.parametrize("line", NOT_INLINE)
async def test_bad_inline_form_is_bad_request(server: Server, wire: Wire, bystander: Wire, line: str) -> None:
    await send_expect(wire, line, "bad_request")
    await assert_unharmed(server, bystander, wire)


# Lines starting with '[' or '"' are JSON (protocol.md, "Inline form") and not an object.
# Lines such as `1`, `null`, `true` do NOT start with '{', '[' or '"': the contract reads
# them in inline form, as a command named "1"/"null"/"true", hence unknown_command.
NOT_AN_OBJECT = [
    ("[1]", "bad_request", "array"),
    ("[]", "bad_request", "array"),
    ('[{"cmd":"health"}]', "bad_request", "array"),
    ('"x"', "bad_request", "string"),
    ('""', "bad_request", "string"),
    ('"{\\"cmd\\":\\"health\\"}"', "bad_request", "string"),
    ("1", "unknown_command", "'1'"),
    ("-1", "unknown_command", "'-1'"),
    ("1.5e3", "unknown_command", "'1.5e3'"),
    ("null", "unknown_command", "'null'"),
    ("true", "unknown_command", "'true'"),
    ("false", "unknown_command", "'false'"),
]


@pytest.mark.parametrize("line,code,mentions", NOT_AN_OBJECT, ids=[c[0] for c in NOT_AN_OBJECT])
async def test_json_that_is_not_an_object(server: Server, wire: Wire, bystander: Wire,
                                          line: str, code: str, mentions: str) -> None:
    message = await send_expect(wire, line, code)
    assert mentions in message, message
    await assert_unharmed(server, bystander, wire)


BAD_ENVELOPES = [
    ('{}', None, "cmd"),
    ('{"args":{}}', None, "cmd"),
    ('{"cmd":null}', None, "cmd"),
    ('{"cmd":1,"id":5}', 5, "cmd"),
    ('{"cmd":["health"],"id":"e"}', "e", "cmd"),
    ('{"cmd":"health","args":null,"id":6}', 6, "args"),
    ('{"cmd":"health","args":[],"id":7}', 7, "args"),
    ('{"cmd":"health","args":"x","id":8}', 8, "args"),
    ('{"cmd":"health","extra":true,"id":9}', 9, "extra"),
    ('{"cmd":"health","ID":1}', None, "ID"),
]


@pytest.mark.parametrize("line,rid,mentions", BAD_ENVELOPES, ids=[c[0] for c in BAD_ENVELOPES])
async def test_bad_envelope_is_bad_request(server: Server, wire: Wire, bystander: Wire,
                                           line: str, rid: Any, mentions: str) -> None:
    message = await send_expect(wire, line, "bad_request", rid)
    assert mentions in message, message
    await assert_unharmed(server, bystander, wire)


# --- NaN, Infinity, numbers out of range ------------------------------------------------------

NON_FINITE = [
    (envelope("health", "{}", "NaN"), "bad_request", "NaN"),
    (envelope("health", "{}", "Infinity"), "bad_request", "Infinity"),
    (envelope("health", "{}", "-Infinity"), "bad_request", "-Infinity"),
    (envelope("health", "{}", "[1,NaN]"), "bad_request", "NaN"),
    (envelope("health", "{}", '{"a":Infinity}'), "bad_request", "Infinity"),
    (envelope("health", "{}", "nan"), "bad_request", "JSON"),
    (envelope("health", "{}", "inf"), "bad_request", "JSON"),
    (envelope("add_vm", '{"vm_id":"nf","ram":NaN,"cpu":1,"disks":[]}'), "bad_request", "NaN"),
    (envelope("add_vm", '{"vm_id":"nf","ram":Infinity,"cpu":1,"disks":[]}'), "bad_request", "Infinity"),
    (envelope("add_vm", '{"vm_id":"nf","ram":1,"cpu":-Infinity,"disks":[]}'), "bad_request", "-Infinity"),
    (envelope("add_vm", '{"vm_id":"nf","ram":1,"cpu":1,"disks":[{"disk_id":"nf-d","size":NaN}]}'),
     "bad_request", "NaN"),
    (envelope("health", '{"x":NaN}', "3"), "bad_request", "NaN"),
    ('add_vm {"vm_id":"nf","ram":NaN,"cpu":1,"disks":[]}', "bad_request", "NaN"),
    ('add_vm {"vm_id":"nf","ram":1,"cpu":1,"disks":[{"disk_id":"nf-d","size":Infinity}]}', "bad_request", "Infinity"),
    # key=value: a value that is not JSON is a string, so these are strings where integers belong
    ("add_vm vm_id=nf ram=NaN cpu=1 disks=[]", "invalid_args", "ram:"),
    ("add_vm vm_id=nf ram=1 cpu=Infinity disks=[]", "invalid_args", "cpu:"),
    ("add_vm vm_id=nf ram=-Infinity cpu=1 disks=[]", "invalid_args", "ram:"),
    ('add_vm vm_id=nf ram=1 cpu=1 disks=[{"disk_id":"nf-d","size":NaN}]', "invalid_args", "disks:"),
]


@pytest.mark.parametrize("line,code,mentions", NON_FINITE, ids=[c[0][:60] for c in NON_FINITE])
async def test_nan_and_infinity(server: Server, wire: Wire, bystander: Wire, line: str, code: str,
                                mentions: str) -> None:
    message = await send_expect(wire, line, code)
    assert mentions in message, message
    if code == "invalid_args":
        assert message.startswith(mentions), message
    await assert_unharmed(server, bystander, wire)


BIG_NUMBERS = [
    # overflows a double: bad_request (protocol.md: "numbers that overflow a double")
    (envelope("add_vm", '{"vm_id":"big","ram":1e400,"cpu":1,"disks":[]}'), "bad_request", "1e400"),
    (envelope("add_vm", '{"vm_id":"big","ram":-1e400,"cpu":1,"disks":[]}'), "bad_request", "1e400"),
    (envelope("add_vm", '{"vm_id":"big","ram":1E+309,"cpu":1,"disks":[]}'), "bad_request", "309"),
    (envelope("add_vm", '{"vm_id":"big","ram":1,"cpu":1,"disks":[{"disk_id":"big-d","size":1e999}]}'),
     "bad_request", "1e999"),
    (envelope("health", "{}", "1e400"), "bad_request", "1e400"),
    (envelope("add_vm", '{"vm_id":"big","ram":' + "9" * 5000 + ',"cpu":1,"disks":[]}'), "bad_request", "JSON"),
    # integers a double holds but SQLite's int64 may not: invalid_args naming the argument
    (envelope("add_vm", '{"vm_id":"big","ram":' + str(10**30) + ',"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    (envelope("add_vm", '{"vm_id":"big","ram":9223372036854775808,"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    (envelope("add_vm", '{"vm_id":"big","ram":9223372036854775807,"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    (envelope("add_vm", '{"vm_id":"big","ram":-9223372036854775809,"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    (envelope("add_vm", '{"vm_id":"big","ram":1,"cpu":18446744073709551616,"disks":[]}'), "invalid_args", "cpu:"),
    (envelope("add_vm", '{"vm_id":"big","ram":1,"cpu":1,"disks":[{"disk_id":"big-d","size":9223372036854775808}]}'),
     "invalid_args", "disks[0].size:"),
    (envelope("add_vm", '{"vm_id":"big","ram":1e30,"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    (envelope("add_vm", '{"vm_id":"big","ram":2048.0,"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    (envelope("add_vm", '{"vm_id":"big","ram":-0,"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    (envelope("add_vm", '{"vm_id":"big","ram":16777217,"cpu":1,"disks":[]}'), "invalid_args", "ram:"),
    ("add_vm vm_id=big ram=1e400 cpu=1 disks=[]", "invalid_args", "ram:"),
    ("add_vm vm_id=big ram=" + str(10**30) + " cpu=1 disks=[]", "invalid_args", "ram:"),
    ("add_vm vm_id=big ram=9223372036854775808 cpu=1 disks=[]", "invalid_args", "ram:"),
    ("add_vm vm_id=big ram=1 cpu=1 disks=[" + '{"disk_id":"big-d","size":' + str(2**64) + "}]", "invalid_args",
     "disks[0].size:"),
]


@pytest.mark.parametrize("line,code,mentions", BIG_NUMBERS, ids=[c[0][:70] for c in BIG_NUMBERS])
async def test_numbers_out_of_range(server: Server, wire: Wire, bystander: Wire, line: str, code: str,
                                    mentions: str) -> None:
    message = await send_expect(wire, line, code)
    assert mentions in message, message
    if code == "invalid_args":
        assert message.startswith(mentions), message
    await assert_unharmed(server, bystander, wire)


async def test_integer_literal_beyond_any_range_is_invalid_args(
        server: Server, wire: Wire, bystander: Wire) -> None:
    """protocol.md: integers are read exactly, however long, then range-checked. 10**400 as
    ram is out of range (invalid_args, naming ram); as an id it is echoed exactly (see below)."""
    huge = "1" + "0" * 400
    await send_expect(wire, envelope("add_vm", '{"vm_id":"big","ram":' + huge + ',"cpu":1,"disks":[]}'),
                      "invalid_args")
    await wire.send(envelope("health", "{}", huge))
    line = await wire.recv_line()
    assert line.startswith(b'{"id":' + huge.encode() + b',"ok":true'), line[:80]
    await assert_unharmed(server, bystander, wire)


@pytest.mark.parametrize("rid", [str(10**30), "9223372036854775808", "-9223372036854775809", "1e308",
                                 "-0.0", "1" * 4300])
async def test_big_ids_are_echoed_exactly(server: Server, wire: Wire, bystander: Wire, rid: str) -> None:
    """An id a double or int64 cannot hold is still a JSON number: echoed, with its value intact."""
    await wire.send(envelope("health", "{}", rid))
    line = await wire.recv_line()
    reply = json.loads(line)
    assert reply == {"id": json.loads(rid), "ok": True, "result": "OK"}, line[:200]
    assert line.startswith(b'{"id":' + json.dumps(json.loads(rid)).encode() + b',"ok":true'), line[:200]
    await assert_unharmed(server, bystander, wire)


# --- deep nesting ---------------------------------------------------------------------------

NESTED = "[" * DEEP + "]" * DEEP
DEEP_CASES = [
    ("line-unclosed", "[" * DEEP, "bad_request", "JSON"),
    ("line-closed", NESTED, "bad_request", "JSON"),
    ("line-objects", '{"a":' * DEEP + "1" + "}" * DEEP, "bad_request", "JSON"),
    ("in-id", envelope("health", "{}", NESTED), "bad_request", "JSON"),
    ("in-args", envelope("add_vm", '{"vm_id":"deep","ram":1,"cpu":1,"disks":' + NESTED + "}"), "bad_request", "JSON"),
    ("in-args-unclosed", envelope("add_vm", '{"vm_id":"deep","ram":1,"cpu":1,"disks":' + "[" * DEEP),
     "bad_request", "JSON"),
    ("in-disk", envelope("add_vm", '{"vm_id":"deep","ram":1,"cpu":1,"disks":[{"disk_id":"deep-d","size":'
                         + NESTED + "}]}"), "bad_request", "JSON"),
    ("inline-json-args", 'add_vm {"vm_id":"deep","ram":1,"cpu":1,"disks":' + NESTED + "}", "bad_request", "JSON"),
    ("inline-disks-unclosed", "add_vm vm_id=deep ram=1 cpu=1 disks=" + "[" * DEEP, "invalid_args", "disks:"),
    ("inline-disks-closed", "add_vm vm_id=deep ram=1 cpu=1 disks=" + NESTED, "invalid_args", "disks:"),
    ("inline-disks-objects", "add_vm vm_id=deep ram=1 cpu=1 disks=" + '{"a":' * DEEP, "invalid_args", "disks:"),
    ("inline-unknown-key", "health x=" + NESTED, "invalid_args", "unknown argument 'x'"),
]


@pytest.mark.parametrize("line,code,mentions", [c[1:] for c in DEEP_CASES], ids=[c[0] for c in DEEP_CASES])
async def test_deep_nesting_is_answered(server: Server, wire: Wire, bystander: Wire, line: str, code: str,
                                        mentions: str) -> None:
    assert len(line) < MAX_LINE
    message = await send_expect(wire, line, code)
    assert mentions in message, message
    await assert_unharmed(server, bystander, wire)


async def test_nesting_just_under_the_decoder_limit_is_echoed_or_refused(
        server: Server, wire: Wire, bystander: Wire) -> None:
    """Ids nested 900..1000 deep sit at the edge of the decoder's (and encoder's) recursion
    limit: each is answered with one line, either its id echoed or bad_request (since ids are
    limited to 32 levels, always bad_request)."""
    for depth in range(900, 1001):  # every depth: the encoder fails at one or two of them only
        rid = "[" * depth + "]" * depth
        await wire.send(envelope("health", "{}", rid))
        line = await wire.recv_line()  # compared as bytes: decoding it here could hit our own limit
        assert line.endswith(b"\n"), f"no reply at depth {depth}: {line[:80]!r}"
        if line.startswith(b'{"id":['):
            assert line == b'{"id":' + rid.encode() + b',"ok":true,"result":"OK"}\n', depth
        else:
            reply = json.loads(line)
            check_reply_shape(reply)
            assert reply["error"]["code"] == "bad_request" and reply["id"] is None, (depth, reply)
    await assert_unharmed(server, bystander, wire)


MAX_ID_DEPTH = 32  # protocol.md: an id may nest arrays and objects at most 32 levels deep


def _nested_id(depth: int, shape: str) -> str:
    if depth == 0:
        return "0"
    if shape == "arrays":
        return "[" * depth + "]" * depth
    if shape == "objects":
        return '{"a":' * depth + "1" + "}" * depth
    return '[{"a":' * (depth // 2) + ("[]" if depth % 2 else "null") + "}]" * (depth // 2)  # mixed


@pytest.mark.parametrize("shape", ["arrays", "objects", "mixed"])
async def test_every_id_depth_gets_exactly_one_reply(server: Server, wire: Wire, bystander: Wire,
                                                     shape: str) -> None:
    """Every depth from 0 to past the decoder's own limit: an id up to 32 levels is echoed
    exactly, a deeper one is bad_request with a null id. Before the fix some depth just under
    the decoder's limit (982 arrays, say) parsed, then could not be encoded: no reply, the
    session dropped. Pipelined in batches, and each reply read as bytes (our own decoder has
    a recursion limit too)."""
    depths = list(range(0, 1200))
    for start in range(0, len(depths), 100):
        batch = depths[start:start + 100]
        await wire.send_raw(b"".join(envelope("health", "{}", _nested_id(d, shape)).encode() + b"\n"
                                     for d in batch))
        for depth in batch:
            line = await wire.recv_line()
            assert line.endswith(b"\n"), (depth, line[:100])
            if depth <= MAX_ID_DEPTH:
                rid = _nested_id(depth, shape)
                assert line == b'{"id":' + json.dumps(json.loads(rid), separators=(",", ":")).encode() \
                    + b',"ok":true,"result":"OK"}\n', depth
            else:
                reply = json.loads(line)
                check_reply_shape(reply)
                assert reply["id"] is None and reply["error"]["code"] == "bad_request", (depth, reply)
    await assert_unharmed(server, bystander, wire)


@pytest.mark.parametrize("template", [
    '{"cmd":1,"id":%s}', '{"id":%s}', '{"cmd":"health","args":[],"id":%s}', '{"cmd":"health","x":1,"id":%s}',
    '{"cmd":"nope","id":%s}', '{"cmd":"add_vm","args":{"ram":"x"},"id":%s}', '{"cmd":"get_all_vms","id":%s}',
], ids=["cmd-not-string", "no-cmd", "args-not-object", "unknown-key", "unknown-command", "invalid-args", "ok"])
async def test_a_deep_id_is_refused_on_every_path(server: Server, wire: Wire, bystander: Wire,
                                                  template: str) -> None:
    """Every reply echoes the id, the error replies too: a too-deep id is refused before any of them."""
    for depth in range(MAX_ID_DEPTH + 1, 1100, 7):
        await wire.send(template % _nested_id(depth, "arrays"))
        message = await expect_error(wire, "bad_request")
        # our limit, or (past ~990 levels) the decoder's own
        assert f"'id' is nested deeper than {MAX_ID_DEPTH} levels" in message or "nested too deeply" in message, \
            (depth, message)
    await assert_unharmed(server, bystander, wire)


@pytest.mark.parametrize("rid,expected", [
    ('"\\ud800"', b'"\\ud800"'),  # a lone surrogate: escaped, like every non-ASCII character
    ('"\\udfff\\ud800x"', b'"\\udfff\\ud800x"'),
    ('"\\u2028"', b'"\\u2028"'),
    ('"\\u0000"', b'"\\u0000"'),
    ("-" + "9" * 4300, b"-" + b"9" * 4300),  # the longest integer the decoder reads
    ('{"a":' + '"' + "x" * 100_000 + '"}', b'{"a":"' + b"x" * 100_000 + b'"}'),
], ids=["surrogate", "surrogates-reversed", "line-separator", "nul", "4300-digits-negative", "long-string"])
async def test_awkward_ids_are_echoed(server: Server, wire: Wire, bystander: Wire, rid: str,
                                      expected: bytes) -> None:
    await wire.send(envelope("health", "{}", rid))
    assert await wire.recv_line() == b'{"id":' + expected + b',"ok":true,"result":"OK"}\n'
    await wire.send('{"cmd":"nope","id":' + rid + "}")  # the error path echoes it the same way
    assert (await wire.recv_line()).startswith(b'{"id":' + expected + b',"ok":false')
    await assert_unharmed(server, bystander, wire)


async def test_integer_longer_than_the_limit_is_bad_request_in_plain_words(
        server: Server, wire: Wire, bystander: Wire) -> None:
    for line in (envelope("health", "{}", "1" * 4301), envelope("add_vm", '{"ram":' + "1" * 5000 + "}")):
        message = await send_expect(wire, line, "bad_request")
        assert message == "not valid JSON: an integer longer than 4300 digits", message
    await assert_unharmed(server, bystander, wire)


# --- duplicate keys --------------------------------------------------------------------------

DUPLICATES = [
    ("top-cmd", '{"cmd":"health","cmd":"health"}', "bad_request"),
    ("top-id", '{"cmd":"health","id":1,"id":2}', "bad_request"),
    ("top-args", '{"cmd":"add_vm","args":{"vm_id":"dup","ram":1,"cpu":1,"disks":[]},"args":{}}', "bad_request"),
    ("args-vm_id", envelope("add_vm", '{"vm_id":"dup","vm_id":"dup2","ram":1,"cpu":1,"disks":[]}'), "bad_request"),
    ("args-ram", envelope("add_vm", '{"vm_id":"dup","ram":1,"ram":2,"cpu":1,"disks":[]}'), "bad_request"),
    ("disk-disk_id", envelope("add_vm", '{"vm_id":"dup","ram":1,"cpu":1,"disks":'
                              '[{"disk_id":"dup-d","disk_id":"dup-e","size":1}]}'), "bad_request"),
    ("disk-size", envelope("add_vm", '{"vm_id":"dup","ram":1,"cpu":1,"disks":'
                           '[{"disk_id":"dup-d","size":1,"size":2}]}'), "bad_request"),
    ("in-id", envelope("health", "{}", '{"a":1,"a":1}'), "bad_request"),
    ("inline-json-args", 'add_vm {"vm_id":"dup","ram":1,"cpu":1,"disks":[],"cpu":2}', "bad_request"),
    ("inline-json-disk", 'add_vm {"vm_id":"dup","ram":1,"cpu":1,"disks":[{"disk_id":"dup-d","size":1,"size":1}]}',
     "bad_request"),
    ("inline-key-twice", "add_vm vm_id=dup ram=1 cpu=1 disks=[] ram=2", "bad_request"),
    # key=value: a value that is not valid JSON is taken as a string, so here a string where
    # the disk array belongs
    ("inline-kv-disk", 'add_vm vm_id=dup ram=1 cpu=1 disks=[{"disk_id":"dup-d","disk_id":"dup-e","size":1}]',
     "invalid_args"),
]


@pytest.mark.parametrize("line,code", [c[1:] for c in DUPLICATES], ids=[c[0] for c in DUPLICATES])
async def test_duplicate_keys(server: Server, wire: Wire, bystander: Wire, line: str, code: str) -> None:
    message = await send_expect(wire, line, code)
    if code == "bad_request":
        assert "twice" in message or "duplicate" in message, message
    else:
        assert message.startswith("disks:") and "duplicate" in message, message
    await assert_unharmed(server, bystander, wire)


# --- nulls and booleans where values belong ---------------------------------------------------

_BASE_ARGS: dict[str, dict[str, Any]] = {
    "add_vm": {"vm_id": "nul", "ram": 1, "cpu": 1, "disks": [], "password": "pw-nul"},
    "connect_vm": {"vm_id": "nul", "ram": 1, "cpu": 1, "disks": [], "password": "pw-nul"},
    "authorize_vm": {"vm_id": BYSTANDER_VM, "password": "pw"},
    "update_vm": {"vm_id": BYSTANDER_VM, "ram": 1, "cpu": 1, "disks": []},
    "deauthorize_vm": {"vm_id": BYSTANDER_VM},
    "disconnect_vm": {"vm_id": BYSTANDER_VM},
    "auth": {"token": "t"},
}
NULL_CASES = [(cmd, arg) for cmd, args in _BASE_ARGS.items() for arg in args]


@pytest.mark.parametrize("cmd,arg", NULL_CASES, ids=[f"{c}.{a}" for c, a in NULL_CASES])
async def test_null_argument_is_invalid_args_naming_it(server: Server, wire: Wire, bystander: Wire,
                                                       cmd: str, arg: str) -> None:
    args = {**_BASE_ARGS[cmd], arg: None}
    reply = await wire.call(cmd, id=f"null-{arg}", **args)
    check_reply_shape(reply)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_args", reply
    assert reply["id"] == f"null-{arg}"
    assert reply["error"]["message"].startswith(f"{arg}:"), reply
    await assert_unharmed(server, bystander, wire)


NULL_INSIDE = [
    ({"disks": [None]}, "disks[0]:"),
    ({"disks": [{"disk_id": None, "size": 1}]}, "disks[0].disk_id:"),
    ({"disks": [{"disk_id": "nul-d", "size": None}]}, "disks[0].size:"),
    ({"disks": [{"disk_id": "nul-d", "size": 1}, None]}, "disks[1]:"),
]


@pytest.mark.parametrize("patch,prefix", NULL_INSIDE, ids=[p for _, p in NULL_INSIDE])
async def test_null_inside_disks(server: Server, wire: Wire, bystander: Wire, patch: dict, prefix: str) -> None:
    reply = await wire.call("add_vm", **{**vm_args("nul"), **patch})
    check_reply_shape(reply)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_args", reply
    assert reply["error"]["message"].startswith(prefix), reply
    await assert_unharmed(server, bystander, wire)


async def test_inline_null_values(server: Server, wire: Wire, bystander: Wire) -> None:
    for arg in ("vm_id", "ram", "cpu", "disks", "password"):
        values = {"vm_id": "nul", "ram": "1", "cpu": "1", "disks": "[]", "password": "pw", arg: "null"}
        line = "add_vm " + " ".join(f"{k}={v}" for k, v in values.items())
        message = await send_expect(wire, line, "invalid_args")
        assert message.startswith(f"{arg}:"), message
    await assert_unharmed(server, bystander, wire)


BOOL_CASES = [
    ({"ram": True}, "ram:"),
    ({"ram": False}, "ram:"),
    ({"cpu": True}, "cpu:"),
    ({"vm_id": True}, "vm_id:"),
    ({"disks": True}, "disks:"),
    ({"disks": [{"disk_id": "b-d", "size": True}]}, "disks[0].size:"),
    ({"disks": [{"disk_id": False, "size": 1}]}, "disks[0].disk_id:"),
    ({"password": True}, "password:"),
    ({"ram": [1]}, "ram:"),
    ({"ram": {"mib": 1}}, "ram:"),
    ({"ram": "1"}, "ram:"),
]


@pytest.mark.parametrize("patch,prefix", BOOL_CASES, ids=[json.dumps(p) for p, _ in BOOL_CASES])
async def test_wrong_type_where_an_int_or_string_belongs(server: Server, wire: Wire, bystander: Wire,
                                                         patch: dict, prefix: str) -> None:
    reply = await wire.call("add_vm", **{**vm_args("typ"), **patch})
    check_reply_shape(reply)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_args", reply
    assert reply["error"]["message"].startswith(prefix), reply
    await send_expect(wire, "add_vm vm_id=typ ram=true cpu=1 disks=[]", "invalid_args")
    await assert_unharmed(server, bystander, wire)


# --- NUL and control characters ------------------------------------------------------------

CONTROL = ["\x00", "\x01", "\x07", "\x08", "\x1b", "\x7f", "\t", "\n", "\r", "\x0b", "\x0c", "\x85",
           "\u2028", "\u2029", "\ufeff", "\u200b", "\ud800"]


@pytest.mark.parametrize("char", CONTROL, ids=[f"U+{ord(c):04X}" for c in CONTROL])
async def test_control_characters_in_identifiers(server: Server, wire: Wire, bystander: Wire, char: str) -> None:
    # JSON-escaped in an envelope: a well-formed string that is not a valid identifier
    reply = await wire.call("add_vm", **vm_args(f"ctl{char}vm"))
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_args", reply
    assert reply["error"]["message"].startswith("vm_id:"), reply
    reply = await wire.call("add_vm", **{**vm_args("ctl-vm"), "disks": [disk(f"d{char}")]})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_args", reply
    assert reply["error"]["message"].startswith("disks[0].disk_id:"), reply
    for cmd in ("connect_vm", "authorize_vm", "disconnect_vm"):
        reply = await wire.call(cmd, vm_id=f"{char}")
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_args", reply
    await assert_unharmed(server, bystander, wire)


RAW_CONTROL = [b"\x00", b"\x01", b"\x07", b"\x08", b"\x1b", b"\x7f"]


@pytest.mark.parametrize("raw", RAW_CONTROL, ids=lambda b: b.hex())
async def test_raw_control_bytes_in_identifiers(server: Server, wire: Wire, bystander: Wire, raw: bytes) -> None:
    # raw in an inline value: the value is a string holding it, not a valid identifier
    message = await send_expect(wire, b"add_vm vm_id=ctl" + raw + b"vm ram=1 cpu=1 disks=[]", "invalid_args")
    assert message.startswith("vm_id:"), message
    message = await send_expect(
        wire, b'add_vm vm_id=ctl-vm ram=1 cpu=1 disks=[{"disk_id":"d' + raw + b'","size":1}]', "invalid_args")
    assert message.startswith("disks"), message
    # raw inside a JSON string of an envelope: strict JSON forbids it (except DEL, which is
    # allowed raw in JSON strings, and then the identifier is invalid)
    line = b'{"cmd":"add_vm","args":{"vm_id":"ctl' + raw + b'vm","ram":1,"cpu":1,"disks":[]}}'
    if raw == b"\x7f":
        message = await send_expect(wire, line, "invalid_args")
        assert message.startswith("vm_id:"), message
    else:
        message = await send_expect(wire, line, "bad_request")
        assert "JSON" in message, message
    await assert_unharmed(server, bystander, wire)


PASSWORDS = [
    "a\x00b",
    "\x00",
    "\x00" * 1024,
    "\x00" * 1025,
    "\x07\x1b[31mred\x1b[0m",
    "\r\n",
    "line1\nline2",
    "\t \t",
    " leading and trailing ",
    "\u2028\u2029\x85",
    "\ufeff",
    "\U0001f600",
    "\ud800",
    "",
]


@pytest.mark.parametrize("password", PASSWORDS, ids=lambda p: repr(p)[:30])
async def test_control_characters_in_passwords(server: Server, wire: Wire, bystander: Wire, connect: Any,
                                               password: str) -> None:
    """Accepted or refused, never a crash; an accepted password then works, and only it works."""
    reply = await wire.call("add_vm", **vm_args("pw-vm"), password=password)
    check_reply_shape(reply)
    if not reply["ok"]:
        assert reply["error"]["code"] == "invalid_args", reply
        assert reply["error"]["message"].startswith("password:"), reply
        if len(password.strip("\x00")) > 2:
            assert password not in reply["error"]["message"], "a password was echoed back"
        await assert_unharmed(server, bystander, wire)
        return
    assert reply["result"]["vm_id"] == "pw-vm" and "password" not in json.dumps(reply)
    wrong = ("y" if password[0] != "y" else "z") + password[1:]  # same length, one character off
    other = await connect()
    assert await other.error("connect_vm", vm_id="pw-vm") == "auth_failed"
    assert await other.error("connect_vm", vm_id="pw-vm", password=wrong) == "auth_failed"
    record = await other.ok("connect_vm", vm_id="pw-vm", password=password)
    assert record["connected"] is True
    assert await other.error("authorize_vm", vm_id="pw-vm", password=wrong) == "auth_failed"
    assert (await other.ok("authorize_vm", vm_id="pw-vm", password=password))["authorized"] is True
    await assert_unharmed(server, bystander, wire, vms={BYSTANDER_VM, "pw-vm"})


async def test_raw_control_bytes_in_an_inline_password(server: Server, wire: Wire, bystander: Wire,
                                                       connect: Any) -> None:
    """A password typed inline with raw control bytes is the same string as its JSON-escaped form."""
    await wire.send(b"add_vm vm_id=pw-inline ram=1 cpu=1 disks=[] password=a\x00\x01\x7fb")
    reply = await wire.recv()
    check_reply_shape(reply)
    assert reply["ok"] is True, reply
    other = await connect()
    assert await other.error("connect_vm", vm_id="pw-inline", password="a") == "auth_failed"
    assert (await other.ok("connect_vm", vm_id="pw-inline", password="a\x00\x01\x7fb"))["connected"] is True
    await assert_unharmed(server, bystander, wire, vms={BYSTANDER_VM, "pw-inline"})


async def test_lone_surrogate_token_is_refused_cleanly(db_path: str) -> None:
    """On a server with a token, a token that cannot be encoded (a lone surrogate, sent as a
    JSON escape) is a wrong token or a bad argument, never an internal error."""
    srv = await start_server(Config(host="127.0.0.1", port=0, db=db_path, token="sekrit"))
    try:
        w = await Wire.open(srv.address[1])
        try:
            for line in ['{"cmd":"auth","args":{"token":"\\ud800"},"id":1}', 'auth token="\\udfff"']:
                await w.send(line)
                reply = await w.recv()
                check_reply_shape(reply)
                assert reply["ok"] is False, reply
                assert reply["error"]["code"] in ("auth_failed", "invalid_args"), reply
            assert await w.error("get_all_vms") == "unauthenticated"
            assert await w.ok("auth", token="sekrit") == "OK"
            assert await w.ok("health") == "OK"
        finally:
            await w.close()
    finally:
        await srv.close()
        srv.inventory.close()


# --- line length and end of file ------------------------------------------------------------


@pytest.mark.parametrize("head", [b"", b'{"cmd":"add_vm","args":{"vm_id":"huge","ram":1,"cpu":1,"disks":[],"x":"',
                                  b"add_vm vm_id=huge ram=1 cpu=1 disks=[] x="], ids=["plain", "envelope", "inline"])
async def test_fifty_megabyte_line(server: Server, wire: Wire, bystander: Wire, head: bytes) -> None:
    """50 MB without a newline, in chunks: too_large, then the session goes on; the bystander is
    served while the flood is still coming in."""
    chunk = b"x" * (1 << 20)

    async def flood() -> None:
        await wire.send_raw(head)
        for i in range(50):
            await wire.send_raw(chunk)
            if i == 25:
                assert await bystander.ok("health") == "OK"

    started = time.monotonic()
    await asyncio.wait_for(flood(), 30)
    await wire.send_raw(b"\nhealth\n")
    message = await expect_error(wire, "too_large")
    assert str(MAX_LINE) in message, message
    assert json.loads(await wire.recv_line()) == {"id": None, "ok": True, "result": "OK"}
    assert time.monotonic() - started < 30
    await assert_unharmed(server, bystander, wire)


EOF_LINES = [
    (b"health", None, "OK"),
    (b'{"cmd":"health","id":"last"}', "last", "OK"),
    (b"health\r", None, "OK"),
    (b'{"cmd":"health"', None, "bad_request"),
    (b"\xff\xfe", None, "bad_request"),
    (b"helth", None, "unknown_command"),
    (b"add_vm vm_id=eof ram=1 cpu=1 disks=[] ram=2", None, "bad_request"),
]


@pytest.mark.parametrize("line,rid,outcome", EOF_LINES, ids=[c[0].decode("latin-1") for c in EOF_LINES])
async def test_last_line_without_newline_is_answered_then_closed(server: Server, wire: Wire, bystander: Wire,
                                                                 line: bytes, rid: Any, outcome: str) -> None:
    await wire.send_raw(line)
    wire.writer.write_eof()
    if outcome == "OK":
        assert json.loads(await wire.recv_line()) == {"id": rid, "ok": True, "result": "OK"}
    else:
        await expect_error(wire, outcome, rid)
    assert await wire.at_eof()
    await assert_unharmed(server, bystander)


async def test_last_line_without_newline_is_executed_and_its_vm_released(
        server: Server, wire: Wire, bystander: Wire) -> None:
    await wire.send_raw(b"connect_vm vm_id=eof-vm ram=1 cpu=1 disks=[]")
    wire.writer.write_eof()
    record = (await wire.recv())["result"]
    assert record["vm_id"] == "eof-vm" and record["connected"] is True
    assert await wire.at_eof()
    for _ in range(100):  # the release happens as the server closes the session
        vms = {vm["vm_id"]: vm for vm in await bystander.ok("get_all_vms")}
        if not vms["eof-vm"]["connected"]:
            break
        await asyncio.sleep(0.02)
    assert vms["eof-vm"]["connected"] is False
    await assert_unharmed(server, bystander, vms={BYSTANDER_VM, "eof-vm"})


# --- HTTP spoken to the port -----------------------------------------------------------------

HTTP_REQUESTS = [
    ("get", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("post-body", b"POST /add_vm HTTP/1.1\r\nContent-Type: text/plain\r\n\r\nadd_vm vm_id=evil ram=1 cpu=1 disks=[]\n"),
    ("post-json-body", b'POST / HTTP/1.0\r\nContent-Type: application/json\r\n\r\n'
                       b'{"cmd":"add_vm","args":{"vm_id":"evil","ram":1,"cpu":1,"disks":[]}}\n'),
    ("form-text-plain", b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:8888\r\nOrigin: http://evil.example\r\n"
                        b"Content-Type: text/plain\r\nContent-Length: 43\r\n\r\n"
                        b"add_vm vm_id=evil ram=1 cpu=1 disks=[]=\r\n"),
    ("put", b"PUT /vm/evil HTTP/1.1\r\n\r\nadd_vm vm_id=evil ram=1 cpu=1 disks=[]\n"),
    ("delete", b"DELETE /vm HTTP/1.1\r\n\r\n"),
    ("head", b"HEAD / HTTP/1.0\r\n\r\n"),
    ("options", b"OPTIONS * HTTP/1.1\r\n\r\n"),
    ("connect", b"CONNECT 127.0.0.1:8888 HTTP/1.1\r\n\r\nadd_vm vm_id=evil ram=1 cpu=1 disks=[]\n"),
    ("proxy-form", b"GET http://127.0.0.1:8888/ HTTP/1.1\r\n\r\n"),
    ("no-crlf", b"GET /index.html HTTP/1.1\nadd_vm vm_id=evil ram=1 cpu=1 disks=[]\n"),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nadd_vm vm_id=evil ram=1 cpu=1 disks=[]\n"),
]


@pytest.mark.parametrize("request_bytes", [r for _, r in HTTP_REQUESTS], ids=[n for n, _ in HTTP_REQUESTS])
async def test_http_is_refused_and_closed(server: Server, wire: Wire, bystander: Wire, request_bytes: bytes) -> None:
    await wire.send_raw(request_bytes)
    message = await expect_error(wire, "bad_request")
    assert "HTTP" in message, message
    assert await wire.at_eof(), "the server must hang up after refusing HTTP"
    # The body lines were never executed: no VM 'evil', as seen from another session.
    assert "evil" not in await vm_names(bystander)
    await assert_unharmed(server, bystander)


async def test_http_after_a_valid_request_is_refused_and_closed(server: Server, wire: Wire,
                                                                bystander: Wire) -> None:
    """Mid-session HTTP: answered, refused, closed; the VM the session held is released and
    the lines pipelined after the HTTP line are not executed."""
    record = await wire.ok("connect_vm", vm_id="mid-vm", ram=1, cpu=1, disks=[])
    assert record["connected"] is True
    await wire.send_raw(b'{"cmd":"health","id":"before"}\nGET / HTTP/1.1\r\nHost: x\r\n\r\n'
                        b"add_vm vm_id=evil ram=1 cpu=1 disks=[]\n")
    assert json.loads(await wire.recv_line()) == {"id": "before", "ok": True, "result": "OK"}
    message = await expect_error(wire, "bad_request")
    assert "HTTP" in message
    assert await wire.at_eof()
    for _ in range(100):
        vms = {vm["vm_id"]: vm for vm in await bystander.ok("get_all_vms")}
        if not vms["mid-vm"]["connected"]:
            break
        await asyncio.sleep(0.02)
    assert vms["mid-vm"]["connected"] is False, "the closed session's VM must be released"
    assert "evil" not in vms
    await assert_unharmed(server, bystander, vms={BYSTANDER_VM, "mid-vm"})


# --- pipelined garbage ------------------------------------------------------------------------


def _pipeline() -> tuple[bytes, list[tuple[Any, str]], set[str]]:
    """500 mixed lines; the expected (id, 'ok' or error code) of each reply in order; the VMs made."""
    lines: list[bytes] = []
    expected: list[tuple[Any, str]] = []
    made: set[str] = set()
    for i in range(500):
        kind = i % 25
        if kind == 0:
            lines.append(json.dumps({"cmd": "health", "id": i}).encode()); expected.append((i, "ok"))
        elif kind == 1:
            lines.append(b"\xff\xfe" + str(i).encode()); expected.append((None, "bad_request"))
        elif kind == 2:
            lines.append(f"add_vm vm_id=pipe-{i} ram={i + 1} cpu=1 disks=[{{\"disk_id\":\"pipe-d{i}\",\"size\":1}}]"
                         .encode()); expected.append((None, "ok")); made.add(f"pipe-{i}")
        elif kind == 3:
            lines.append(f"add_vm vm_id=pipe-{i - 1} ram=1 cpu=1 disks=[]".encode())
            expected.append((None, "already_exists"))
        elif kind == 4:
            lines.append(b""); expected.append((None, "ignored"))
        elif kind == 5:
            lines.append(b"   # a comment " + str(i).encode()); expected.append((None, "ignored"))
        elif kind == 6:
            lines.append(b"[" * 5000); expected.append((None, "bad_request"))
        elif kind == 7:
            lines.append(f'{{"cmd":"health","id":{i},"id":{i}}}'.encode()); expected.append((None, "bad_request"))
        elif kind == 8:
            lines.append(f'{{"cmd":"health","id":{i},"bogus":1}}'.encode()); expected.append((i, "bad_request"))
        elif kind == 9:
            lines.append(f'{{"cmd":"helth","id":{i}}}'.encode()); expected.append((i, "unknown_command"))
        elif kind == 10:
            lines.append(json.dumps({"cmd": "add_vm", "id": i, "args": {**vm_args(f"p{i}"), "ram": None}}).encode())
            expected.append((i, "invalid_args"))
        elif kind == 11:
            lines.append(json.dumps({"cmd": "connect_vm", "id": i, "args": {"vm_id": BYSTANDER_VM}}).encode())
            expected.append((i, "conflict"))
        elif kind == 12:
            lines.append(f'{{"cmd":"add_vm","id":{i},"args":{{"vm_id":"p{i}","ram":NaN,"cpu":1,"disks":[]}}}}'
                         .encode()); expected.append((None, "bad_request"))
        elif kind == 13:
            lines.append(b"\r"); expected.append((None, "ignored"))
        elif kind == 14:
            lines.append(json.dumps({"cmd": "update_vm", "id": i, "args": {"vm_id": "nope", "ram": 1}}).encode())
            expected.append((i, "not_found"))
        elif kind == 15:
            lines.append(json.dumps({"cmd": "authorize_vm", "id": i, "args": {"vm_id": BYSTANDER_VM}}).encode())
            expected.append((i, "not_connected"))
        elif kind == 16:
            lines.append(f"add_vm vm_id=p{i} ram=1 cpu=1 disks=[{{\"disk_id\":\"{BYSTANDER_DISK}\",\"size\":1}}]"
                         .encode()); expected.append((None, "conflict"))
        elif kind == 17:
            lines.append(b"x" * (MAX_LINE + 1) if i == 17 else b"GET /" + str(i).encode())
            expected.append((None, "too_large" if i == 17 else "bad_request"))  # 'GET /42': not key=value
        elif kind == 18:
            lines.append(b"\x00\x01\x02"); expected.append((None, "unknown_command"))
        elif kind == 19:
            lines.append(b"[1]"); expected.append((None, "bad_request"))
        elif kind == 20:
            lines.append(f'health {{"id":{i}}}'.encode()); expected.append((None, "invalid_args"))
        elif kind == 21:
            lines.append(b"add_vm vm_id=p ram=1e400 cpu=1 disks=[] \r"); expected.append((None, "invalid_args"))
        elif kind == 22:
            lines.append(f'{{"cmd":"health","id":"\u00e9{i}"}}'.encode()); expected.append((f"\u00e9{i}", "ok"))
        elif kind == 23:
            lines.append(b"\xed\xa0\x80"); expected.append((None, "bad_request"))
        else:
            lines.append(b"get_all_disks extra=1"); expected.append((None, "invalid_args"))
    assert len(lines) == 500
    return b"\n".join(lines) + b"\n", expected, made


async def test_pipelined_garbage_gets_one_reply_per_line_in_order(server: Server, wire: Wire,
                                                                  bystander: Wire) -> None:
    data, expected, made = _pipeline()
    answered = [e for e in expected if e[1] != "ignored"]
    assert 400 < len(answered) < 500

    async def read_all() -> list[dict]:
        return [json.loads(await wire.recv_line()) for _ in answered]

    reader = asyncio.create_task(read_all())  # read while writing: no deadlock on full buffers
    await asyncio.wait_for(wire.send_raw(data), 30)
    replies = await asyncio.wait_for(reader, 30)
    got = []
    for reply in replies:
        check_reply_shape(reply)
        got.append((reply["id"], "ok" if reply["ok"] else reply["error"]["code"]))
    assert got == answered
    for reply, (_, outcome) in zip(replies, answered):
        if outcome == "ok" and isinstance(reply["result"], dict):
            assert reply["result"]["vm_id"].startswith("pipe-")
    # nothing more was sent: the next line is the answer to the next request
    assert (await wire.call("health", id="after")) == {"id": "after", "ok": True, "result": "OK"}
    await assert_unharmed(server, bystander, wire, vms={BYSTANDER_VM} | made)


# --- property tests: random lines against one server ------------------------------------------


class ThreadedServer:
    """A real Server running on its own event loop in a thread, for synchronous hypothesis tests."""

    def __init__(self, db: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vmserver-under-test", daemon=True)
        self.thread.start()
        self.server: Server = self._run(start_server(Config(host="127.0.0.1", port=0, db=db)))
        self.port = self.server.address[1]

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        async def stop() -> None:
            await self.server.close()
            self.server.inventory.close()  # sqlite wants the thread that opened it

        try:
            self._run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


class SyncWire:
    """A blocking line client with a timeout on every read."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.alive = True
        greeting = json.loads(self.readline())
        assert "hello" in greeting, greeting
        self.sent = 0

    def readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            self.alive = False
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, cmd: str, **args: Any) -> dict:
        self.send(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        line = self.readline()
        assert line.endswith(b"\n"), f"session closed or cut short: {line[:200]!r}"
        return json.loads(line)

    def ok(self, cmd: str, **args: Any) -> Any:
        reply = self.call(cmd, **args)
        assert reply["ok"] is True, reply
        return reply["result"]

    def exchange(self, line: bytes) -> list[dict]:
        """Send ``line`` and a sentinel; return the replies that came before the sentinel's."""
        self.sent += 1
        sentinel = f"sentinel-{self.sent}"
        self.send(line + b"\n" + json.dumps({"cmd": "health", "id": sentinel}).encode() + b"\n")
        replies = []
        for _ in range(1000):
            raw = self.readline()
            assert raw.endswith(b"\n"), f"session closed after {line[:200]!r}: {raw[:200]!r}"
            reply = json.loads(raw)
            if "event" in reply:  # the fuzz may have subscribed: events come between replies
                assert set(reply) == {"event", "data", "ts"}, reply
                continue
            if reply.get("id") == sentinel:
                assert reply == {"id": sentinel, "ok": True, "result": "OK"}, reply
                return replies
            replies.append(reply)
        raise AssertionError(f"no end of the replies to one line {line[:200]!r}: {replies[:5]}")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class FuzzTarget:
    """One server, a guard session holding a VM, and the session that receives the fuzz."""

    def __init__(self, db: str) -> None:
        self.srv = ThreadedServer(db)
        self.guard = SyncWire(self.srv.port)
        record = self.guard.ok("connect_vm", vm_id="guard-vm", ram=64, cpu=1,
                               disks=[{"disk_id": "guard-disk", "size": 1}])
        assert record["connected"] is True
        self.fuzz = SyncWire(self.srv.port)
        self.snapshot = self.check()

    def fresh_fuzz_session(self) -> None:
        """A failing example must not poison the next one (hypothesis shrinks by replaying)."""
        if not self.fuzz.alive:
            self.fuzz.close()
            self.fuzz = SyncWire(self.srv.port)
            deadline = time.monotonic() + 5.0  # the server releases the dead session's VMs by itself
            while time.monotonic() < deadline:
                if [vm["vm_id"] for vm in self.guard.ok("get_connected_vms")] == ["guard-vm"]:
                    break
                time.sleep(0.02)
        self.snapshot = self.check()  # also after an example that failed half way

    def check(self) -> tuple[list[dict], list[dict]]:
        """The inventory as seen by the guard: consistent, and the guard's VM still its own."""
        assert self.guard.call("health") == {"id": None, "ok": True, "result": "OK"}
        vms = self.guard.ok("get_all_vms")
        disks = self.guard.ok("get_all_disks")
        check_inventory(vms, disks)
        guard = [vm for vm in vms if vm["vm_id"] == "guard-vm"]
        assert len(guard) == 1 and guard[0]["connected"] is True, guard
        assert [d["disk_id"] for d in guard[0]["disks"]] == ["guard-disk"]
        return vms, disks

    def close(self) -> None:
        self.fuzz.close()
        self.guard.close()
        self.srv.close()


def _positive_int(value: Any, high: int) -> bool:
    return type(value) is int and 1 <= value <= high


def check_inventory(vms: list[dict], disks: list[dict]) -> None:
    assert isinstance(vms, list) and isinstance(disks, list)
    vm_by_pk = {vm["id"]: vm for vm in vms}
    assert len(vm_by_pk) == len(vms), "duplicate VM id"
    assert len({vm["vm_id"] for vm in vms}) == len(vms), "duplicate vm_id"
    assert [vm["id"] for vm in vms] == sorted(vm_by_pk), "get_all_vms not ordered by id"
    assert len({d["id"] for d in disks}) == len(disks), "duplicate disk id"
    assert len({d["disk_id"] for d in disks}) == len(disks), "duplicate disk_id"
    assert [d["id"] for d in disks] == sorted(d["id"] for d in disks), "get_all_disks not ordered by id"
    for vm in vms:
        assert type(vm["id"]) is int and vm["id"] >= 1, vm
        assert isinstance(vm["vm_id"], str) and IDENT.fullmatch(vm["vm_id"]), vm
        assert _positive_int(vm["ram"], 16777216) and _positive_int(vm["cpu"], 4096), vm
        assert vm["connected"] in (True, False) and vm["authorized"] in (True, False), vm
        assert not vm["authorized"] or vm["connected"], vm
        assert vm["last_connected"] is None or TS.fullmatch(vm["last_connected"]), vm
        own = [{k: v for k, v in d.items() if k != "vm"} for d in disks if d["vm_id"] == vm["id"]]
        assert vm["disks"] == own, (vm, own)
    for d in disks:
        assert set(d) == {"id", "disk_id", "size", "vm_id", "vm"}, d
        assert isinstance(d["disk_id"], str) and IDENT.fullmatch(d["disk_id"]), d
        assert _positive_int(d["size"], 1048576), d
        assert d["vm_id"] in vm_by_pk, f"orphan disk {d}"
        assert d["vm"] == vm_by_pk[d["vm_id"]]["vm_id"], d


@pytest.fixture
def target(tmp_path: Path) -> Any:
    t = FuzzTarget(str(tmp_path / "fuzz.db"))
    try:
        yield t
    finally:
        t.close()


COMMAND_NAMES = sorted(COMMANDS)
ARG_NAMES = ["vm_id", "ram", "cpu", "disks", "password", "token", "disk_id", "size"]
VM_POOL = ["f1", "f2", "f3", "guard-vm", "bystander-vm"]
DISK_POOL = ["d1", "d2", "d3", "guard-disk"]
PASSWORD_POOL = ["pw", "a\x00b"]

_special_text = st.sampled_from(["", " ", "\x00", "a\x00b", "\x1b[2J", "\u2028", "\ud800", "\ufeff", "#",
                                 "vm 1", "x" * 65, "é", "\U0001f600", "null", "NaN", "[", "{", "=", "\\"])
_text = st.one_of(st.text(max_size=12), st.text(st.characters(max_codepoint=0x20), max_size=6), _special_text)
_ints = st.one_of(st.integers(-5, 5000), st.integers(min_value=-(2**70), max_value=2**70),
                  st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30, 16777216, 16777217,
                                   4096, 4097, 1048576, 1048577]))
_scalars = st.one_of(_ints, st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(), _text,
                     st.sampled_from(VM_POOL + DISK_POOL))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), _text), inner, max_size=4)),
    max_leaves=8)
_disk = st.fixed_dictionaries({"disk_id": st.sampled_from(DISK_POOL), "size": st.integers(1, 100)})
_good_disks = st.lists(_disk, max_size=3)
_maybe_disks = st.one_of(_good_disks, st.lists(st.one_of(_disk, _values), max_size=3), _values)
_good_args = st.fixed_dictionaries(
    {"vm_id": st.sampled_from(VM_POOL), "ram": st.integers(1, 4096), "cpu": st.integers(1, 8), "disks": _good_disks},
    optional={"password": st.sampled_from(PASSWORD_POOL)})
_random_args = st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), _text),
                               st.one_of(_values, st.sampled_from(VM_POOL), _maybe_disks), max_size=5)


@st.composite
def _mutated_args(draw: Any) -> dict:
    args = dict(draw(_good_args))
    key = draw(st.sampled_from(ARG_NAMES + ["bogus"]))
    if draw(st.booleans()) and key in args:
        del args[key]
    else:
        args[key] = draw(st.one_of(_values, _maybe_disks))
    return args


_args = st.one_of(_good_args, _mutated_args(), _random_args, st.just({}))
_cmds = st.one_of(st.sampled_from(COMMAND_NAMES), st.sampled_from(COMMAND_NAMES), _text)
_well_formed = st.fixed_dictionaries({"cmd": st.sampled_from(COMMAND_NAMES), "args": _args}, optional={"id": _values})
_any_envelope = st.fixed_dictionaries({}, optional={
    "cmd": st.one_of(_cmds, _cmds, _values),
    "args": st.one_of(_args, _args, _values),
    "id": _values,
    "extra": _values,
})
_envelopes = st.one_of(_well_formed, _well_formed, _well_formed, _any_envelope)

CONTRACT_SETTINGS = settings(max_examples=150, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def expected_reply_count(line: bytes) -> int:
    """protocol.md: blank lines and lines whose first non-blank character is '#' get no reply."""
    if line.endswith(b"\r"):
        line = line[:-1]  # "\r\n is accepted too"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return 1
    text = text.strip()
    return 0 if not text or text.startswith("#") else 1


def run_line(target: FuzzTarget, line: bytes) -> dict | None:
    """Send one line; exactly the expected number of well-formed replies; inventory consistent;
    a failed or read-only request changed nothing."""
    assert b"\n" not in line
    before = target.snapshot
    replies = target.fuzz.exchange(line)
    assert len(replies) == expected_reply_count(line), (line, replies)
    after = target.check()
    target.snapshot = after
    if not replies:
        assert after == before, "an ignored line changed the inventory"
        return None
    reply = replies[0]
    check_reply_shape(reply)
    event("ok" if reply["ok"] else reply["error"]["code"])
    if not reply["ok"]:
        assert after == before, f"a failed request changed the inventory: {reply}"
        if expected_reply_count(line) and not _is_utf8(line):
            assert reply["error"]["code"] == "bad_request", reply
        assert reply["error"]["code"] not in ("unavailable", "unauthenticated", "internal"), reply
    return reply


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_byte_lines = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda head, tail: head + tail,
              st.sampled_from([b"{", b"[", b'"', b"#", b" ", b"\r", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"health ",
                               b"add_vm ", b"connect_vm vm_id=f1 ", b'{"cmd":"health","id":', b"GET "]),
              st.binary(max_size=60)),
).map(lambda b: b.replace(b"\n", b""))


@CONTRACT_SETTINGS
@given(lines=st.lists(_byte_lines, min_size=1, max_size=4))
def test_property_random_bytes(target: FuzzTarget, lines: list[bytes]) -> None:
    assume(not any(b"HTTP/" in line for line in lines))  # HTTP lines end the session, by contract
    target.fresh_fuzz_session()
    for line in lines:
        run_line(target, line)


@CONTRACT_SETTINGS
@given(envelopes=st.lists(_envelopes, min_size=1, max_size=4))
def test_property_random_envelopes(target: FuzzTarget, envelopes: list[dict]) -> None:
    target.fresh_fuzz_session()
    for env in envelopes:
        line = json.dumps(env).encode()
        reply = run_line(target, line)
        assert reply is not None
        assert reply["id"] == env.get("id"), (env, reply)  # a JSON object's id is always echoed
        cmd, args = env.get("cmd"), env.get("args", {})
        if set(env) - {"cmd", "args", "id"} or not isinstance(cmd, str) or not isinstance(args, dict):
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (env, reply)
        elif cmd not in COMMANDS:
            assert reply["ok"] is False and reply["error"]["code"] == "unknown_command", (env, reply)
        elif not reply["ok"]:
            assert reply["error"]["code"] not in ("bad_request", "unknown_command", "too_large"), (env, reply)
        elif cmd == "health":
            assert reply["result"] == "OK"
        elif cmd == "add_vm":
            record = reply["result"]
            assert (record["vm_id"], record["ram"], record["cpu"]) == (args["vm_id"], args["ram"], args["cpu"])
            assert [d["disk_id"] for d in record["disks"]] == [d["disk_id"] for d in args["disks"]]
            assert record["connected"] is False
        elif cmd == "connect_vm":
            assert reply["result"]["vm_id"] == args["vm_id"] and reply["result"]["connected"] is True


def _inline_value(value: Any, raw: bool) -> str:
    if raw and isinstance(value, str):
        return value.replace("\n", "")
    return json.dumps(value, separators=(",", ":"))


@st.composite
def _inline_lines(draw: Any) -> str:
    name = draw(st.one_of(st.sampled_from(COMMAND_NAMES), st.sampled_from(COMMAND_NAMES),
                          st.text(min_size=1, max_size=10).map(lambda s: s.replace("\n", ""))))
    style = draw(st.sampled_from(["kv", "kv", "json", "bare"]))
    if style == "bare":
        return name
    args = draw(_args)
    if style == "json":
        return f"{name} {json.dumps(args)}"
    pairs = []
    for key, value in args.items():
        key = key if draw(st.integers(0, 9)) else draw(st.sampled_from(["", "9x", "a-b", "é"]))
        pairs.append(f"{key}={_inline_value(value, draw(st.booleans()))}")
    if pairs and draw(st.integers(0, 9)) == 0:
        pairs.append(pairs[0])  # a key given twice
    return (name + " " + " ".join(pairs)).replace("\n", " ")  # one line: random keys may hold newlines


@CONTRACT_SETTINGS
@given(lines=st.lists(_inline_lines(), min_size=1, max_size=4))
def test_property_random_inline_lines(target: FuzzTarget, lines: list[str]) -> None:
    assume(not any("HTTP/" in line for line in lines))
    target.fresh_fuzz_session()
    for line in lines:
        reply = run_line(target, line.encode("utf-8", "surrogatepass"))
        if reply is None:
            continue
        assert reply["id"] is None, reply  # inline requests have no id
        name = line.strip().split(None, 1)[0] if line.strip() else ""
        if not reply["ok"] and name and not name.startswith(("{", "[", '"', "#")) and name not in COMMANDS:
            assert reply["error"]["code"] in ("unknown_command", "bad_request"), (line, reply)
