"""GET /openapi.json (issue 13): the HTTP API described as OpenAPI 3.0, built from what the server
already knows, so that it cannot drift from it.

The command routes come from http_api's tables (CONFIRMATIONS, _OUR_WRITES, _READS) and their
bodies and queries from the command registry (commands.COMMANDS: each Param's validator, whether
it is required, its doc); each validator has its JSON Schema in VALIDATORS (a test checks that
every validator a command uses has one). Error statuses come from http_api.STATUS. What no table
holds is written here once: the records (protocol.md "Records"), which codes each command may
refuse with (REFUSALS), and the routes that are not commands.

OpenAPI 3.0.3 rather than 3.1: it is the version schemathesis, client generators and validators
handle best, and nothing here needs 3.1 (the one nullable field is ``nullable: true``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from . import __version__
from . import validation as v
from .commands import COMMANDS, _EVENT_NAMES, _event_name, _event_names
from .errors import ErrorCode

OPENAPI = "3.0.3"
_JSON = "application/json"
_TEXT = "text/plain"


def _ident_pattern(low: int) -> str:
    return f"^[A-Za-z0-9._:-]{{{low},{v.IDENT_MAX}}}$"


def _integer(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


_DISK_SPEC = {
    "type": "object",
    "required": ["disk_id", "size"],
    "additionalProperties": False,
    "properties": {
        "disk_id": {"type": "string", "pattern": _ident_pattern(1)},
        "size": _integer(1, v.DISK_SIZE_MAX),
    },
}

# The JSON Schema of each argument validator (validation.py, and commands.py's event names).
# A validator missing here is a test failure, not an argument documented as anything.
VALIDATORS: dict[Callable[[Any, str], Any], dict[str, Any]] = {
    v.ident: {"type": "string", "pattern": _ident_pattern(1)},
    v.prefix: {"type": "string", "pattern": _ident_pattern(0)},
    v.flag: {"type": "boolean"},
    v.timestamp: {
        "type": "string",
        # the shape; the server also checks that it is a real date and time (2026-02-30 is refused)
        "pattern": r"^\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d(\.\d{1,6})?)?Z)?$",
        "example": "2026-11-26T21:00:00Z",
    },
    v.page_limit: _integer(1, v.PAGE_MAX),
    v.history_limit: _integer(1, 10_000),
    v.page_after: _integer(0, 2**63 - 1),
    v.ram: _integer(1, v.RAM_MAX),
    v.cpu: _integer(1, v.CPU_MAX),
    v.disk_size: _integer(1, v.DISK_SIZE_MAX),
    v.secret: {"type": "string", "minLength": 1, "maxLength": v.PASSWORD_MAX},
    v.disks: {"type": "array", "maxItems": v.DISKS_MAX, "items": _DISK_SPEC},
    _event_name: {"type": "string", "enum": list(_EVENT_NAMES)},
    _event_names: {"type": "array", "minItems": 1, "items": {"type": "string", "enum": list(_EVENT_NAMES)}},
}

# Which codes each command routed over HTTP may refuse with, besides those of every request
# (bad_request, invalid_args, unavailable, internal, and the token's). protocol.md's "Error codes"
# says when each happens.
E = ErrorCode
REFUSALS: dict[str, frozenset[ErrorCode]] = {
    "add_vm": frozenset((E.ALREADY_EXISTS, E.CONFLICT)),
    "connect_vm": frozenset((E.CONFLICT, E.AUTH_FAILED)),
    "authorize_vm": frozenset((E.NOT_FOUND, E.NOT_CONNECTED, E.AUTH_FAILED)),
    "update_vm": frozenset((E.NOT_FOUND, E.NOT_AUTHORIZED, E.CONFLICT)),
    "deauthorize_vm": frozenset((E.NOT_FOUND, E.NOT_AUTHORIZED)),
    "disconnect_vm": frozenset((E.NOT_FOUND, E.NOT_CONNECTED)),
    "remove_vm": frozenset((E.NOT_FOUND, E.CONFLICT, E.AUTH_FAILED)),
    "get_all_vms": frozenset(),
    "get_connected_vms": frozenset(),
    "get_authorized_vms": frozenset(),
    "get_all_disks": frozenset(),
    "get_vm": frozenset((E.NOT_FOUND,)),
    "stats": frozenset(),
    "get_history": frozenset(),
}
_EVERY_REQUEST = frozenset((E.BAD_REQUEST, E.INVALID_ARGS, E.UNAVAILABLE, E.INTERNAL))
# Commands whose password checks are slowed down: auth_failed as 429 with Retry-After.
_SLOWED = frozenset(name for name, codes in REFUSALS.items() if E.AUTH_FAILED in codes)

_DISK = {
    "type": "object",
    "required": ["id", "disk_id", "size", "vm_id"],
    "properties": {
        "id": {"type": "integer", "description": "assigned by the server, never reused"},
        "disk_id": {"type": "string", "description": "its name, unique across the inventory"},
        "size": {"type": "integer", "description": "GiB"},
        "vm_id": {"type": "integer", "description": "the id of its VM"},
    },
}
_SCHEMAS: dict[str, Any] = {
    "VM": {
        "type": "object",
        "description": "A VM's record (protocol.md, Records). Clients ignore fields they do not know.",
        "required": ["id", "vm_id", "ram", "cpu", "disks", "connected", "authorized", "last_connected"],
        "properties": {
            "id": {"type": "integer", "description": "assigned by the server, never reused"},
            "vm_id": {"type": "string", "description": "the VM's name"},
            "ram": {"type": "integer", "description": "MiB"},
            "cpu": {"type": "integer", "description": "virtual CPUs"},
            "disks": {"type": "array", "items": {"$ref": "#/components/schemas/Disk"},
                      "description": "ordered by disk id"},
            "connected": {"type": "boolean", "description": "a live session has connected it"},
            "authorized": {"type": "boolean", "description": "the session that connected it authorized it"},
            "last_connected": {"type": "string", "nullable": True,
                               "description": "ISO-8601 UTC with milliseconds, or null if never"},
        },
    },
    "Disk": _DISK,
    "ListedDisk": {
        "allOf": [{"$ref": "#/components/schemas/Disk"},
                  {"type": "object", "required": ["vm"],
                   "properties": {"vm": {"type": "string", "description": "the vm_id of its VM"}}}],
    },
    "Stats": {
        "type": "object",
        "required": ["vms", "connected", "authorized", "disks", "ram", "cpu", "disk_size", "server_id", "servers",
                     "sessions", "connections"],
        "properties": {
            **{name: {"type": "integer"} for name in ("vms", "connected", "authorized", "disks", "ram", "cpu",
                                                        "disk_size")},
            "server_id": {"type": "string", "description": "this server process"},
            "sessions": {"type": "object", "description": "the answering server's sessions, by protocol",
                         "required": ["line", "http"],
                         "properties": {"line": {"type": "integer"}, "http": {"type": "integer"}}},
            "connections": {"type": "object", "required": ["open", "limit"],
                            "description": "the answering server's connections (line and HTTP) and their cap",
                            "properties": {"open": {"type": "integer"}, "limit": {"type": "integer"}}},
            "servers": {"type": "array", "description": "the live servers on this database",
                        "items": {"type": "object", "required": ["server_id", "host", "pid", "since"],
                                  "properties": {"server_id": {"type": "string"}, "host": {"type": "string"},
                                                 "pid": {"type": "integer"}, "since": {"type": "string"}}}},
        },
    },
    "HistoryRow": {
        "type": "object",
        "required": ["id", "ts", "vm_id", "event", "peer"],
        "properties": {
            "id": {"type": "integer"},
            "ts": {"type": "string", "description": "ISO-8601 UTC with milliseconds"},
            "vm_id": {"type": "string"},
            "event": {"type": "string", "enum": list(_EVENT_NAMES)},
            "peer": {"type": "string", "nullable": True, "description": "the session that did it"},
            "reason": {"type": "string", "description": "vm_disconnected: why"},
            "command": {"type": "string", "description": "auth_failed: the command of the last failure"},
            "count": {"type": "integer", "description": "auth_failed: how many failures it stands for"},
        },
    },
    "Released": {
        "type": "object",
        "required": ["released"],
        "properties": {"released": {"type": "array", "items": {"type": "string"},
                                    "description": "the VMs the session held, now disconnected"}},
    },
}

_TEXT_OK = {"type": "string"}


def _plain(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {_TEXT: {"schema": schema or _TEXT_OK}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Doc:
    """One document, for a server with or without a token (the token's 401s and security)."""

    def __init__(self, token: bool) -> None:
        from . import http_api  # here, not at the top: http_api imports this module

        self.h = http_api
        self.token = token

    def error(self, status: int, codes: frozenset[ErrorCode], description: str) -> dict[str, Any]:
        names = sorted(code.value for code in codes)
        response = _json(description, {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {"code": {"type": "string", "enum": names},
                               "message": {"type": "string", "minLength": 1, "description": "for people"}},
            }},
        })
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"},
                                                        "description": 'Bearer realm="vmserver"'}}
        elif status == 429:
            response["headers"] = {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1},
                                                   "description": "seconds"}}
        elif status == 503:
            response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                   "description": "seconds: past --max-connections (1)"}}
        return response

    def refusals(self, codes: frozenset[ErrorCode],
                 extra: dict[int, tuple[frozenset[ErrorCode], str]]) -> dict[str, Any]:
        """The error responses of a route: ``codes`` by their status in http_api.STATUS, plus
        ``extra`` (statuses of the framing: 413, 415, 429; or a description of its own), plus the
        token's 401."""
        by_status: dict[int, set[ErrorCode]] = {}
        for code in codes:
            by_status.setdefault(self.h.STATUS[code], set()).add(code)
        out = {str(status): self.error(status, frozenset(found), _STATUS_TEXT[status])
               for status, found in sorted(by_status.items())}
        for status, (found, text) in extra.items():
            out[str(status)] = self.error(status, found, text)
        if self.token:
            out["401"] = self.error(401, frozenset((E.UNAUTHENTICATED, E.AUTH_FAILED)),
                                    "no token (unauthenticated) or a wrong one (auth_failed, answered after 0.5 s)")
        return dict(sorted(out.items()))

    def session_params(self) -> list[dict[str, Any]]:
        return [{"$ref": "#/components/parameters/SessionHeader"}, {"$ref": "#/components/parameters/SessionCookie"}]

    def command(self, name: str, method: str) -> dict[str, Any]:
        cmd = COMMANDS[name]
        codes = _EVERY_REQUEST | REFUSALS[name]
        extra: dict[int, tuple[frozenset[ErrorCode], str]] = {}
        op: dict[str, Any] = {"operationId": name, "summary": cmd.summary, "tags": ["commands"],
                              "parameters": self.session_params()}
        if method == "post":
            op["requestBody"] = {"required": True, "content": {_JSON: {"schema": self.body(name)}}}
            extra[413] = (frozenset((E.TOO_LARGE,)), "a body over --max-line, refused unread; the connection closes")
            extra[415] = (frozenset((E.BAD_REQUEST,)), "the body was not sent as Content-Type: application/json")
        else:
            op["parameters"] = self.query(name) + op["parameters"]
        if name in _SLOWED:
            extra[429] = (frozenset((E.AUTH_FAILED,)), "password guessing for this VM is slowed down: try again "
                          "after Retry-After seconds")
        op["responses"] = {"200": self.success(name), **self.refusals(codes, extra)}
        op["responses"] = dict(sorted(op["responses"].items()))
        return op

    def body(self, name: str) -> dict[str, Any]:
        params = COMMANDS[name].schema.params
        schema: dict[str, Any] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {p.name: {**VALIDATORS[p.check], "description": p.doc} for p in params},
        }
        required = [p.name for p in params if p.required]
        if required:
            schema["required"] = required
        return schema

    def query(self, name: str) -> list[dict[str, Any]]:
        """A GET's arguments as query parameters (http_api reads the integer and yes/no ones as
        such, by name: _INTS, _BOOLS; a test keeps those in step with the schemas)."""
        out = []
        for p in COMMANDS[name].schema.params:
            out.append({"name": p.name, "in": "query", "required": p.required, "description": p.doc,
                        "schema": VALIDATORS[p.check]})
        return out

    def success(self, name: str) -> dict[str, Any]:
        headers = {self.h.HEADER: {"$ref": "#/components/headers/Session"}}
        if name in self.h.CONFIRMATIONS:
            text = self.h.CONFIRMATIONS[name]
            reply = {"description": f"{text}; the VM's record with Accept: application/json",
                     "content": {_TEXT: {"schema": {"type": "string", "enum": [text]}}, _JSON: {"schema": _ref("VM")}}}
        elif name in self.h._OUR_WRITES or name == "get_vm":
            reply = _json("the VM's record" + (" as it was" if name == "remove_vm" else ""), _ref("VM"))
        elif name == "get_all_disks":
            reply = _json("every disk (a page), ordered by id", {"type": "array", "items": _ref("ListedDisk")})
        elif name == "stats":
            reply = _json("counts and totals", _ref("Stats"))
        elif name == "get_history":
            reply = _json("history rows, newest first", {"type": "array", "items": _ref("HistoryRow")})
        else:
            reply = _json("VM records (a page), ordered by id", {"type": "array", "items": _ref("VM")})
        reply["headers"] = headers
        if name == "connect_vm":
            reply["headers"] = {**headers, "Set-Cookie": {
                "schema": {"type": "string"},
                "description": f"{self.h.COOKIE}=ID; HttpOnly; Path=/; SameSite=Strict, when this request "
                               "opened a session"}}
        return reply

    def others(self) -> dict[str, dict[str, Any]]:
        """The routes that are no command (SSE and metrics may be served by other modules)."""
        unavailable = frozenset((E.UNAVAILABLE,))
        open_op = {"security": []} if self.token else {}
        return {
            "/health": {"get": {
                "operationId": "health", "tags": ["probes"], **open_op,
                "summary": "Liveness: answered while the process serves, without the token.",
                "responses": {"200": _plain("OK", {"type": "string", "enum": ["OK"]}),
                              "503": self.error(503, unavailable, _CAP)}}},
            "/ready": {"get": {
                "operationId": "ready", "tags": ["probes"], **open_op,
                "summary": "Readiness: the database takes writes (in a cluster: this server holds its lease); "
                           "without the token.",
                "responses": {"200": _plain("ready", {"type": "string", "enum": ["ready"]}),
                              "503": self.error(503, unavailable, f"not ready, and why; or {_CAP}")}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "tags": ["probes"], **open_op,
                "summary": "This document; without the token (it holds nothing the line protocol's greeting "
                           "does not tell before auth).",
                "responses": {"200": _json("the OpenAPI document", {"type": "object"}),
                              "503": self.error(503, unavailable, _CAP)}}},
            "/session": {"delete": {
                "operationId": "delete_session", "tags": ["sessions"],
                "summary": "End this request's session: its VMs are disconnected (reason session_closed), "
                           "then the reply comes and the cookie is cleared.",
                "parameters": self.session_params(),
                "responses": {"200": _json("the VMs it held", _ref("Released")),
                              **self.refusals(frozenset((E.UNAVAILABLE,)), {404: (
                                  frozenset((E.NOT_FOUND,)), "no live session: none named, or it ended")})}}},
            "/events": {"get": {
                "operationId": "events", "tags": ["events"],
                "summary": "Live events as Server-Sent Events (the line protocol's events: protocol.md), "
                           "until the client goes or the server stops.",
                "parameters": [
                    {"name": "event", "in": "query", "required": False, "style": "form", "explode": False,
                     "schema": VALIDATORS[_event_names],
                     "description": "the events wanted, comma-separated (or the parameter repeated); default all"},
                    {"name": "vm_id", "in": "query", "required": False, "schema": VALIDATORS[v.ident],
                     "description": "only events of this VM"},
                ],
                "responses": {"200": {"description": "first the comment `: subscribed {...}`, then each event as "
                                                     "`event: NAME` and `data: {\"event\",\"data\",\"ts\"}` (the "
                                                     "line protocol's event line) and a blank line; `: keepalive` "
                                                     "after 15 s without one; `event: shutdown` at the end",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              **self.refusals(frozenset((E.BAD_REQUEST, E.INVALID_ARGS, E.UNAVAILABLE)), {})}}},
            "/metrics": {"get": {
                "operationId": "metrics", "tags": ["probes"],
                "summary": "Prometheus metrics (text format): sessions, commands and their latency, VMs, disks, "
                           "writes, event subscribers, database errors, lease state, build info.",
                "responses": {"200": {"description": "Prometheus' text format (OpenMetrics when Accept asks "
                                                     "for application/openmetrics-text)",
                                      "content": {"text/plain": {"schema": {"type": "string"}},
                                                  "application/openmetrics-text": {"schema": {"type": "string"}}}},
                              **self.refusals(frozenset((E.UNAVAILABLE,)), {})}}},
        }

    def build(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for name in (*self.h.CONFIRMATIONS, *self.h._OUR_WRITES):
            paths[f"/{name}"] = {"post": self.command(name, "post")}
        for name in self.h._READS:
            paths[f"/{name}"] = {"get": self.command(name, "get")}
        paths.update(self.others())
        components: dict[str, Any] = {
            "schemas": _SCHEMAS,
            "parameters": {
                "SessionHeader": {"name": self.h.HEADER, "in": "header", "required": False,
                                  "schema": {"type": "string"},
                                  "description": "the session id (wins over the cookie); an unknown or ended one "
                                                 "is no session: the request acts as a session of its own"},
                "SessionCookie": {"name": self.h.COOKIE, "in": "cookie", "required": False,
                                  "schema": {"type": "string"}, "description": "the session id, as set by connect_vm"},
            },
            "headers": {"Session": {"schema": {"type": "string"},
                                    "description": "the id of the session this request acted as, when it had one"}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the server's --token"}},
        }
        doc: dict[str, Any] = {
            "openapi": OPENAPI,
            "info": {"title": "vmserver HTTP API", "version": __version__,
                     "description": "VM inventory and presence (docs/http.md; the line protocol: protocol.md). "
                                    + ("This server requires its token." if self.token else
                                       "This server has no token.")},
            "paths": paths,
            "components": components,
        }
        if self.token:
            doc["security"] = [{"bearer": []}]
        return doc


_CAP = "past --max-connections: answered before the request is read, and closed (unavailable, Retry-After: 1)"
_STATUS_TEXT = {
    400: "the body or query is malformed (bad_request) or an argument is missing, unknown or out of range "
         "(invalid_args)",
    403: "not this session's VM to act on (not_connected, not_authorized), or a wrong or missing password "
         "(auth_failed)",
    404: "no such VM",
    409: "clashes with the inventory or another session",
    503: "this server lost its lease or is past --max-connections (unavailable), or its storage failed: nothing "
         "was changed (internal)",
}


def document(token: bool) -> dict[str, Any]:
    """The OpenAPI document of the HTTP API, for a server with (``token``) or without a token."""
    return copy.deepcopy(_Doc(token).build())  # the shared schemas stay as they are


def paths_of(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in ``doc``."""
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}

