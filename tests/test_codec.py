"""The wire codec on its own (no sockets): vmserver.protocol.parse_line and the encoders."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmserver.errors import ErrorCode
from vmserver.protocol import (
    Request,
    RequestError,
    encode_error,
    encode_event,
    encode_greeting,
    encode_ok,
    parse_line,
)


def bad(line: bytes) -> RequestError:
    """parse_line(line) must fail with bad_request; returns the error."""
    with pytest.raises(RequestError) as info:
        parse_line(line)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message == str(info.value)
    return info.value


# --- envelope form -------------------------------------------------------------------------


def test_envelope_with_cmd_args_and_id():
    req = parse_line(b'{"cmd": "add_vm", "args": {"vm_id": "vm-1", "ram": 2048}, "id": 7}')
    assert req == Request("add_vm", {"vm_id": "vm-1", "ram": 2048}, 7)


def test_envelope_args_default_to_empty_object_and_id_to_null():
    req = parse_line(b'{"cmd":"health"}')
    assert req.cmd == "health"
    assert req.args == {}
    assert req.id is None
    assert not req.hints


@pytest.mark.parametrize("raw_id, expected", [
    (b'"ping-1"', "ping-1"),
    (b"null", None),
    (b"0", 0),
    (b"[1,{\"a\":true}]", [1, {"a": True}]),
    (b"-2.5", -2.5),
])
def test_envelope_id_is_any_json_value(raw_id, expected):
    req = parse_line(b'{"cmd":"health","id":' + raw_id + b"}")
    assert req.id == expected
    assert type(req.id) is type(expected)


def test_envelope_trailing_cr_and_whitespace_are_trimmed():
    req = parse_line(b' \t{"cmd":"health","id":1}\r')
    assert (req.cmd, req.args, req.id) == ("health", {}, 1)


def test_envelope_non_ascii_text_survives():
    req = parse_line('{"cmd":"add_vm","args":{"note":"h\u00e9llo \u2028 \U0001f600"}}'.encode("utf-8"))
    assert req.args == {"note": "h\u00e9llo \u2028 \U0001f600"}


# --- ignored lines ---------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    b"", b" ", b"\r", b"\t \r", b"\n", b"\x0b\x0c",
    b"#", b"# a comment", b"   # indented comment", b'#{"cmd":"health"}', b"# <- {\"id\":null}\r",
])
def test_blank_and_comment_lines_are_ignored(line):
    assert parse_line(line) is None


def test_hash_after_the_first_character_is_not_a_comment():
    req = parse_line(b"health x=#1")
    assert req == Request("health", {"x": "#1"}, None)


# --- inline form -----------------------------------------------------------------------------


def test_inline_bare_name():
    assert parse_line(b"get_all_vms") == Request("get_all_vms", {}, None)


def test_inline_bare_name_trimmed():
    req = parse_line(b"  get_all_vms \t\r")
    assert req.cmd == "get_all_vms"
    assert req.args == {}


def test_inline_json_object_arguments():
    req = parse_line(b'add_vm {"vm_id": "vm-1", "ram": 2048, "cpu": 2, "disks": []}')
    assert req == Request("add_vm", {"vm_id": "vm-1", "ram": 2048, "cpu": 2, "disks": []}, None)


def test_inline_json_object_that_does_not_parse():
    err = bad(b'add_vm {"vm_id": "vm-1",}')
    assert "arguments are not a valid JSON object" in err.message
    assert err.request_id is None


def test_inline_json_object_with_text_after_it():
    err = bad(b'add_vm {"vm_id": "vm-1"} ram=1')
    assert "arguments are not a valid JSON object" in err.message


def test_inline_key_values_are_json_when_they_parse():
    req = parse_line(
        b'add_vm vm_id=vm-1 ram=2048 cpu=2 big=1e3 neg=-4 on=true off=false nothing=null '
        b'quoted="vm 1" disks=[{"disk_id": "disk-1", "size": 500}] obj={"a": [1, 2]}'
    )
    assert req.cmd == "add_vm"
    assert req.args == {
        "vm_id": "vm-1", "ram": 2048, "cpu": 2, "big": 1000.0, "neg": -4,
        "on": True, "off": False, "nothing": None, "quoted": "vm 1",
        "disks": [{"disk_id": "disk-1", "size": 500}], "obj": {"a": [1, 2]},
    }
    assert type(req.args["ram"]) is int
    assert req.id is None
    assert not req.hints


@pytest.mark.parametrize("token, expected", [
    ("vm-1", "vm-1"),
    ("1.2.3", "1.2.3"),
    ("2048MiB", "2048MiB"),
    ("NaN", "NaN"),            # strict JSON refuses it, so it is a string
    ("Infinity", "Infinity"),
    ("1e400", "1e400"),       # overflows a double: not JSON here, so a string
    ("True", "True"),
    ("", ""),
    ("a=b", "a=b"),
])
def test_inline_values_that_are_not_json_are_strings(token, expected):
    req = parse_line(f"cmd x={token} y=1".encode())
    assert req.args == {"x": expected, "y": 1}
    assert not req.hints


def test_inline_pairs_separated_by_tabs_and_runs_of_spaces():
    req = parse_line(b"cmd\ta=1 \t  b=two\t\tc=[1, 2]   \r")
    assert req.args == {"a": 1, "b": "two", "c": [1, 2]}


def test_inline_key_charset():
    req = parse_line(b"cmd _a=1 B_9=2")
    assert req.args == {"_a": 1, "B_9": 2}


def test_inline_key_given_twice():
    err = bad(b"add_vm ram=1 cpu=2 ram=3")
    assert "argument 'ram' given twice" in err.message


@pytest.mark.parametrize("line, token", [
    (b"add_vm oops", "oops"),
    (b"add_vm ram=1 oops cpu=2", "oops"),
    (b"add_vm 9ram=1", "9ram=1"),
    (b"add_vm =1", "=1"),
    (b"add_vm [1]", "[1]"),
    (b"add_vm -x=1", "-x=1"),
])
def test_inline_bare_token_without_equals(line, token):
    err = bad(line)
    assert f"expected key=value, got {token!r}" in err.message


# --- hints: inline values that look like JSON but are not ------------------------------------


def test_hint_for_inline_value_that_starts_like_json_but_does_not_parse():
    req = parse_line(b'add_vm vm_id=vm-1 disks=[{"disk_id":"d1","size":5,}]')
    assert req.args == {"vm_id": "vm-1", "disks": '[{"disk_id":"d1","size":5,}]'}
    assert set(req.hints) == {"disks"}
    assert req.hints["disks"].startswith("it starts like JSON but is not valid JSON")


def test_hint_for_unterminated_string():
    req = parse_line(b'add_vm vm_id="vm-1')
    assert req.args == {"vm_id": '"vm-1'}
    assert set(req.hints) == {"vm_id"}
    assert "not valid JSON" in req.hints["vm_id"]


def test_hint_for_json_value_followed_by_text():
    req = parse_line(b"cmd x=[1]abc y=2")
    assert req.args == {"x": "[1]abc", "y": 2}
    assert req.hints == {"x": "it starts like JSON but has text right after the JSON value"}


def test_hint_for_deeply_nested_inline_value():
    req = parse_line(b"cmd x=" + b"[" * 100_000)
    assert req.args == {"x": "[" * 100_000}
    assert req.hints["x"] == "it starts like JSON but is not valid JSON: JSON nested too deeply"


def test_no_hint_for_plain_string_or_valid_json():
    req = parse_line(b'cmd a=plain b=[1,2] c="q" d={"k":1}')
    assert req.args == {"a": "plain", "b": [1, 2], "c": "q", "d": {"k": 1}}
    assert not req.hints


# --- bad requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("line, offset, byte", [
    (b"\xff", 0, 0xFF),
    (b'{"cmd":"h\xc3"}', 9, 0xC3),
    (b"health x=\x80", 9, 0x80),
    (b"\xed\xa0\x80", 0, 0xED),  # an encoded surrogate is not UTF-8
])
def test_not_utf8(line, offset, byte):
    err = bad(line)
    assert "not valid UTF-8" in err.message
    assert f"byte 0x{byte:02x} at offset {offset}" in err.message
    assert err.request_id is None


@pytest.mark.parametrize("line", [
    b'{"cmd":',
    b'{"cmd":"health",}',
    b"{cmd: health}",
    b'{"cmd":"health"} {"cmd":"health"}',
    b'{"cmd":"health"}x',
    b"[1,",
    b'"unterminated',
    b"{'cmd':'health'}",
])
def test_not_json(line):
    err = bad(line)
    assert err.message.startswith("not valid JSON: ")
    assert err.request_id is None


@pytest.mark.parametrize("line, kind", [
    (b"[1]", "array"),
    (b"[]", "array"),
    (b'"x"', "string"),
    (b'["cmd","health"]', "array"),
])
def test_json_that_is_not_an_object(line, kind):
    err = bad(line)
    assert err.message == f"a request must be a JSON object, got {kind}"


@pytest.mark.parametrize("line, key", [
    (b'{"cmd":"a","cmd":"b"}', "cmd"),
    (b'{"cmd":"a","args":{"ram":1,"ram":2}}', "ram"),
    (b'{"cmd":"a","args":{"disks":[{"size":1,"size":1}]}}', "size"),
])
def test_duplicate_keys(line, key):
    err = bad(line)
    assert f"duplicate key {key!r}" in err.message


def test_duplicate_keys_in_inline_json_object():
    err = bad(b'add_vm {"ram":1,"ram":2}')
    assert "duplicate key 'ram'" in err.message


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_refused(constant):
    err = bad(b'{"cmd":"add_vm","args":{"ram":' + constant + b"}}")
    assert f"{constant.decode()} is not allowed in JSON" in err.message


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1.5e309"])
def test_number_overflowing_a_double_is_refused(number):
    err = bad(b'{"cmd":"add_vm","args":{"ram":' + number + b"},\"id\":1}")
    assert f"number {number.decode()} is out of range" in err.message


def test_large_but_finite_number_is_accepted():
    req = parse_line(b'{"cmd":"x","args":{"n":1e308,"i":123456789012345678901234567890}}')
    assert req.args == {"n": 1e308, "i": 123456789012345678901234567890}


@pytest.mark.parametrize("line", [
    b"[" * 100_000,
    b"{\"a\":" * 100_000,
    b'{"cmd":"x","args":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    b'{"cmd":"x","id":1,"args":' + b"[" * 100_000,
])
def test_deep_nesting_is_a_bad_request_not_a_recursion_error(line):
    err = bad(line)
    assert err.message == "not valid JSON: JSON nested too deeply"


def test_deep_nesting_in_inline_json_object():
    err = bad(b'cmd {"a":' + b"[" * 100_000)
    assert err.message == "arguments are not a valid JSON object: JSON nested too deeply"


def test_unknown_envelope_key_carries_the_id():
    err = bad(b'{"cmd":"health","id":"r-9","extra":1}')
    assert err.message == "unknown envelope key 'extra' (allowed: cmd, args, id)"
    assert err.request_id == "r-9"


def test_unknown_envelope_keys_name_the_first_in_sorted_order():
    err = bad(b'{"zz":1,"cmd":"health","aa":2,"id":3}')
    assert "unknown envelope key 'aa'" in err.message
    assert err.request_id == 3


def test_cmd_missing_carries_the_id():
    err = bad(b'{"args":{},"id":{"n":1}}')
    assert err.message == "envelope key 'cmd' missing"
    assert err.request_id == {"n": 1}


@pytest.mark.parametrize("raw, kind", [
    (b"5", "integer"), (b"null", "null"), (b"true", "boolean"), (b'["health"]', "array"),
    (b"{}", "object"), (b"1.5", "number"),
])
def test_cmd_not_a_string_carries_the_id(raw, kind):
    err = bad(b'{"cmd":' + raw + b',"id":42}')
    assert err.message == f"envelope key 'cmd' must be a string, got {kind}"
    assert err.request_id == 42


@pytest.mark.parametrize("raw, kind", [
    (b"[1]", "array"), (b"null", "null"), (b'"ram=1"', "string"), (b"3", "integer"),
])
def test_args_not_an_object_carries_the_id(raw, kind):
    err = bad(b'{"cmd":"add_vm","args":' + raw + b',"id":"a1"}')
    assert err.message == f"envelope key 'args' must be an object, got {kind}"
    assert err.request_id == "a1"


def test_bad_envelope_without_id_has_none():
    err = bad(b'{"cmd":7}')
    assert err.request_id is None


def test_unreadable_json_has_no_id():
    err = bad(b'{"cmd":"health","id":5,}')
    assert err.request_id is None


@pytest.mark.parametrize("line", [b"\x1c", b"\x1chealth", "\u00a0health".encode(), "\u2028".encode(),
                                  "\u3000get_all_vms".encode()])
def test_line_starting_with_unicode_whitespace_is_handled(line):
    # Any valid UTF-8 line must give a Request, None or a bad_request; never a crash.
    try:
        result = parse_line(line)
    except RequestError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
    else:
        assert result is None or isinstance(result, Request)


# --- properties -------------------------------------------------------------------------------

_simple = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False)
_ids = st.none() | st.integers() | st.text(max_size=20)


@settings(max_examples=200, deadline=None, database=None)
@given(cmd=st.text(max_size=20), args=st.dictionaries(st.from_regex(r"[a-z_]+", fullmatch=True), _simple,
                                                       max_size=6), request_id=_ids)
def test_property_envelope_round_trip(cmd, args, request_id):
    for ensure_ascii in (True, False):
        line = json.dumps({"cmd": cmd, "args": args, "id": request_id}, ensure_ascii=ensure_ascii)
        req = parse_line(line.encode("utf-8"))
        assert req.cmd == cmd
        assert req.args == args
        assert req.id == request_id
        assert not req.hints


def _check_never_crashes(line: bytes) -> None:
    try:
        result = parse_line(line)
    except RequestError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
    else:
        if result is not None:
            assert isinstance(result, Request)
            assert isinstance(result.cmd, str) and result.cmd
            assert isinstance(result.args, dict)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_property_parse_line_only_raises_request_error_on_bytes(line):
    _check_never_crashes(line)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=60))
def test_property_parse_line_only_raises_request_error_on_text(text):
    _check_never_crashes(text.encode("utf-8", "surrogatepass"))


# --- encoding --------------------------------------------------------------------------------


def _one_ascii_line(data: bytes) -> None:
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert all(b < 0x80 for b in data), data


def test_encode_ok_exact():
    out = encode_ok(7, b'{"a":1}')
    assert out == b'{"id":7,"ok":true,"result":{"a":1}}\n'


def test_encode_ok_null_id():
    assert encode_ok(None, b"[]") == b'{"id":null,"ok":true,"result":[]}\n'


@pytest.mark.parametrize("request_id, encoded", [
    ("ping-1", b'"ping-1"'),
    (0, b"0"),
    (False, b"false"),
    ("", b'""'),
    ({"k": [1, "two"], "n": None}, b'{"k":[1,"two"],"n":null}'),
    ("r\u00e9", b'"r\\u00e9"'),
    ("a\u2028b\u2029c", b'"a\\u2028b\\u2029c"'),
    ("\ud800", b'"\\ud800"'),
    ("\U0001f600", b'"\\ud83d\\ude00"'),
    ("line\nbreak", b'"line\\nbreak"'),
])
def test_encode_ok_ids_are_compact_ascii(request_id, encoded):
    out = encode_ok(request_id, b'"OK"')
    assert out == b'{"id":' + encoded + b',"ok":true,"result":"OK"}\n'
    _one_ascii_line(out)
    assert json.loads(out)["id"] == request_id


def test_encode_error_exact():
    out = encode_error(3, ErrorCode.NOT_FOUND, "no VM 'x'")
    assert out == b'{"id":3,"ok":false,"error":{"code":"not_found","message":"no VM \'x\'"}}\n'


def test_encode_error_null_id_and_escaped_message():
    out = encode_error(None, ErrorCode.BAD_REQUEST, 'bad "q" \u00e9\u2028\n')
    assert out == (b'{"id":null,"ok":false,"error":{"code":"bad_request",'
                   b'"message":"bad \\"q\\" \\u00e9\\u2028\\n"}}\n')
    _one_ascii_line(out)


def test_encode_error_non_ascii_id():
    out = encode_error("\u00e9\u2028", ErrorCode.INTERNAL, "x")
    assert out == b'{"id":"\\u00e9\\u2028","ok":false,"error":{"code":"internal","message":"x"}}\n'


def test_encode_greeting_exact():
    out = encode_greeting("0.1.0", ["add_vm", "health"])
    assert out == (b'{"hello":{"server":"vmserver","version":"0.1.0","protocol":1,'
                   b'"commands":["add_vm","health"],"auth_required":false}}\n')
    out = encode_greeting("0.1.0", ["auth"], auth_required=True)
    assert out == (b'{"hello":{"server":"vmserver","version":"0.1.0","protocol":1,'
                   b'"commands":["auth"],"auth_required":true}}\n')


_TS = re.compile(rb'"ts":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)"\}\n\Z')


def test_encode_event_exact_shape_and_timestamp():
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    out = encode_event("vm_added", {"vm_id": "vm-\u00e9", "n": 1})
    after = datetime.now(timezone.utc) + timedelta(milliseconds=1)
    assert out.startswith(b'{"event":"vm_added","data":{"vm_id":"vm-\\u00e9","n":1},"ts":"')
    match = _TS.search(out)
    assert match, out
    _one_ascii_line(out)
    ts = datetime.strptime(match.group(1).decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert before - timedelta(milliseconds=1) <= ts <= after
