"""Wire codec for protocol v1 (no sockets): parse one request line, encode reply, greeting and event lines.

Requests arrive as one line each, either a JSON envelope ``{"cmd", "args", "id"}`` or the
inline form typed by people (``NAME``, ``NAME {json}``, ``NAME key=value ...``). Replies are
compact, ASCII-only JSON (``ensure_ascii`` keeps U+2028/U+2029 and lone surrogates escaped,
so every line is safe for any reader).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from .errors import CommandError, ErrorCode

DEFAULT_MAX_LINE = 1 << 20  # 1 MiB, excluding the newline
# An id is echoed in its reply, so it must be one the encoder can always write back: the
# decoder accepts nesting up to the interpreter's recursion limit, the encoder (deeper in the
# stack) not quite as far. No sane id needs more than a few levels.
MAX_ID_DEPTH = 32

_ENVELOPE_KEYS = frozenset(("cmd", "args", "id"))


class RequestError(CommandError):
    """The line itself is unusable; carries the request id when one could be read."""

    def __init__(self, code: ErrorCode, message: str, request_id: Any = None) -> None:
        super().__init__(code, message)
        self.request_id = request_id


@dataclass(slots=True)
class Request:
    cmd: str
    args: dict[str, Any]
    id: Any = None
    # Inline-form values that looked like JSON but did not parse, by argument name; lets a
    # later type error explain itself instead of only saying "got a string".
    hints: dict[str, str] | None = None


# --- strict JSON decoding ----------------------------------------------------------------


class _StrictJSONError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _StrictJSONError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise _StrictJSONError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _StrictJSONError(f"number {text} is out of range")
    return value


# One decoder for the whole process: rejects duplicate keys, NaN/Infinity and numbers that
# overflow to infinity, all of which json.loads accepts by default.
_decoder = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite_float
)


def json_error_text(exc: BaseException, offset: int = 0) -> str:
    """The decoder's complaint; ``offset`` turns its column into a column of the whole line."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno + offset}"
    if "integer string conversion" in str(exc):  # int() refused a number longer than the limit
        return f"an integer longer than {sys.get_int_max_str_digits()} digits"
    return str(exc)


def decode_json(text: str) -> Any:
    """Decode one strict JSON document; raises ValueError (or RecursionError) on bad input."""
    return _decoder.decode(text)


# --- request parsing -----------------------------------------------------------------------


def parse_line(line: bytes) -> Request | None:
    """Parse one line (without its newline). Returns None for a line to ignore (blank or ``#``).

    :raises RequestError: bad_request when the line is not UTF-8, not JSON, or a bad envelope.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f"request is not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})",
        ) from None
    text = text.strip()  # Unicode whitespace, the same set as the regexes' \s
    if not text or text[0] == "#":
        return None
    if text[0] in '{["':  # JSON, even when it is not an object, gets a JSON answer
        return _parse_envelope(text)
    return _parse_inline(text)


_CONTAINERS = (list, dict)


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels in ``value`` (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children if type(child) in _CONTAINERS)
    return False


def _parse_envelope(text: str) -> Request:
    try:
        obj = _decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError(ErrorCode.BAD_REQUEST, f"not valid JSON: {json_error_text(exc)}") from None
    if not isinstance(obj, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, f"a request must be a JSON object, got {json_type(obj)}")
    request_id = obj.get("id")
    if type(request_id) in _CONTAINERS and _nests_deeper(request_id, MAX_ID_DEPTH):
        # Checked before anything echoes it: an id too deep to encode would leave no reply at all.
        raise RequestError(ErrorCode.BAD_REQUEST, f"envelope key 'id' is nested deeper than {MAX_ID_DEPTH} levels")
    if not _ENVELOPE_KEYS.issuperset(obj):
        extra = obj.keys() - _ENVELOPE_KEYS
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f"unknown envelope key {sorted(extra)[0]!r} (allowed: cmd, args, id)",
            request_id,
        )
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        what = "missing" if "cmd" not in obj else f"must be a string, got {json_type(cmd)}"
        raise RequestError(ErrorCode.BAD_REQUEST, f"envelope key 'cmd' {what}", request_id)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f"envelope key 'args' must be an object, got {json_type(args)}",
            request_id,
        )
    return Request(cmd, args, request_id)


_NAME = re.compile(r"(\S+)\s*(.*)", re.S)
_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
_TOKEN_END = re.compile(r"\s|$")


def _parse_inline(text: str) -> Request:
    match = _NAME.match(text)
    name, rest = match.groups()
    if not rest:
        return Request(name, {})
    offset = match.start(2)  # error columns count from the start of the line, as typed
    if rest[0] == "{":
        try:
            args = _decoder.decode(rest)
        except (ValueError, RecursionError) as exc:
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"arguments are not a valid JSON object: {json_error_text(exc, offset)}"
            ) from None
        return Request(name, args)
    return _parse_key_values(name, rest, offset)


def _parse_key_values(name: str, rest: str, offset: int) -> Request:
    args: dict[str, Any] = {}
    hints: dict[str, str] = {}
    pos, end = 0, len(rest)
    while pos < end:
        if rest[pos].isspace():
            pos += 1
            continue
        match = _KEY.match(rest, pos)
        if match is None:
            token = rest[pos : _TOKEN_END.search(rest, pos).start()]
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"expected key=value, got {token!r} (or give one JSON object)"
            )
        key = match.group(1)
        if key in args:
            raise RequestError(ErrorCode.BAD_REQUEST, f"argument {key!r} given twice")
        pos = match.end()
        value, pos, hint = _inline_value(rest, pos, offset)
        args[key] = value
        if hint:
            hints[key] = hint
    return Request(name, args, None, hints or None)


def _inline_value(rest: str, pos: int, offset: int) -> tuple[Any, int, str | None]:
    """One value: JSON when it parses (it may contain spaces if it starts with [ { or "), else a string."""
    hint = None
    if pos < len(rest) and rest[pos] in '[{"':
        try:
            value, stop = _decoder.raw_decode(rest, pos)
        except (ValueError, RecursionError) as exc:
            hint = f"it starts like JSON but is not valid JSON: {json_error_text(exc, offset)}"
        else:
            if stop == len(rest) or rest[stop].isspace():
                return value, stop, None
            hint = "it starts like JSON but has text right after the JSON value"
    stop = _TOKEN_END.search(rest, pos).start()
    token = rest[pos:stop]
    try:
        return _decoder.decode(token), stop, None
    except (ValueError, RecursionError):
        return token, stop, hint


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ",
                 b"PRI ")  # PRI * HTTP/2.0: the HTTP/2 connection preface
_HTTP_REQUEST_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/\d")


def looks_like_http(line: bytes) -> bool:
    """An HTTP request line: a browser (or a confused tool) talking to this port.

    Refusing these and hanging up keeps web pages from driving the server by cross-protocol
    requests (a form POST to 127.0.0.1:8888 would otherwise have its body lines executed).
    """
    return line.startswith(_HTTP_METHODS) and _HTTP_REQUEST_LINE.match(line) is not None


# --- encoding ------------------------------------------------------------------------------

_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps(value: Any) -> bytes:
    """Compact ASCII JSON bytes of a value."""
    return _encoder.encode(value).encode("ascii")


LARGE_REPLY = 256 * 1024  # bytes of result past which a reply is kept in pieces


def encode_ok(request_id: Any, result: bytes | tuple[bytes, ...]) -> bytes | tuple[bytes, ...]:
    """A success line around an already-encoded result (encoded results are cached upstream).

    A large result comes back as pieces (head, result..., tail), not copied into one new
    string: a list of 100,000 VMs is tens of MB, and the server writes it out piece by piece.
    A result that is already in pieces (see listing.py) stays in pieces.
    """
    head = b'{"id":' + _id_json(request_id) + b',"ok":true,"result":'
    if type(result) is tuple:
        return (head, *result, b"}\n")
    if len(result) > LARGE_REPLY:
        return head, result, b"}\n"
    return head + result + b"}\n"


def _id_json(request_id: Any) -> bytes:
    if request_id is None:
        return b"null"
    if type(request_id) is int:  # the usual id: no encoder needed
        return str(request_id).encode()
    return dumps(request_id)


def encode_error(request_id: Any, code: ErrorCode, message: str) -> bytes:
    rid = _id_json(request_id)
    body = dumps({"code": code.value, "message": message})
    return b'{"id":' + rid + b',"ok":false,"error":' + body + b"}\n"


def encode_greeting(version: str, commands: list[str], auth_required: bool = False,
                    server_id: str | None = None) -> bytes:
    hello: dict[str, Any] = {"server": "vmserver", "version": version, "protocol": 1, "commands": commands,
                             "auth_required": auth_required}
    if server_id is not None:
        hello["server_id"] = server_id
    return dumps({"hello": hello}) + b"\n"


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds and a Z, the one timestamp format on the wire."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


def encode_event(name: str, data: dict[str, Any] | bytes) -> bytes:
    """An event line; ``data`` is a dict, or its JSON already encoded (a cached VM record)."""
    body = data if type(data) is bytes else dumps(data)
    return b'{"event":' + dumps(name) + b',"data":' + body + b',"ts":"' + utc_now().encode() + b'"}\n'
