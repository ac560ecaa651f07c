"""The HTTP API (issue 13): SEED.md's routes and our other commands over HTTP/1.1, on aiohttp,
beside the line protocol in the same process and event loop, on the same inventory and rules.

Commands run through commands.run(), as on the line protocol; only the framing differs.
Presence needs sessions: connect_vm over HTTP opens one (cookie ``vmsession`` and the same id in
``X-VM-Session``), requests carrying it act as it, and it ends after --http-session-ttl seconds
without a request or at DELETE /session, its VMs disconnected then. A request without one acts
as a session of its own that ends with the request (it can read, add and remove, but holds
nothing). aiohttp is imported by this module alone, and this module only with --http-port.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import limits
from .commands import SlowDown, failure, run
from .errors import CommandError, ErrorCode
from .listing import pieces
from .presence import session_key
from .protocol import decode_json, dumps, json_error_text

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

COOKIE = "vmsession"
HEADER = "X-VM-Session"
# answered without the token: probes carry none, and the API's description tells no more than the
# line protocol's greeting does before auth
_OPEN_PATHS = frozenset(("/health", "/ready", "/openapi.json"))
NO_ROUTE = "(none)"  # the route label of requests no route matched (404, 405)

# SEED.md's writes and their text/plain confirmations (the JSON record with Accept: application/json).
CONFIRMATIONS = {
    "add_vm": "ВМ добавлена",
    "update_vm": "ВМ обновлена",
    "connect_vm": "ВМ подключена",
    "authorize_vm": "ВМ авторизована",
    "deauthorize_vm": "ВМ деавторизована",
}
_OUR_WRITES = ("disconnect_vm", "remove_vm")  # no text of SEED.md: they answer the JSON record
_READS = ("get_all_vms", "get_connected_vms", "get_authorized_vms", "get_all_disks", "get_vm", "stats",
          "get_history")

STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_ARGS: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_COMMAND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.NOT_CONNECTED: 403,
    ErrorCode.NOT_AUTHORIZED: 403,
    ErrorCode.AUTH_FAILED: 403,  # a VM's password; the server's token is 401 (see _check_token)
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 503,
}

# Query parameters that are numbers or yes/no in the commands' schemas; every other one is text.
_INTS = frozenset(("after", "limit", "before"))
_FLAGS = {"true": True, "false": False}
_BOOLS = frozenset(("connected", "authorized"))


def error_response(code: ErrorCode, message: str, status: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = dumps({"error": {"code": code.value, "message": message}})
    return web.Response(status=status or STATUS[code], body=body, content_type="application/json",
                        headers=headers)


class HttpSession:
    """An HTTP client's session: an Owner to the inventory, like a line session."""

    __slots__ = ("id", "key", "name", "vms", "authenticated", "ended", "last_active", "busy")

    def __init__(self, name: str, kept: bool = True) -> None:
        # the cookie: unguessable, unlike the presence key; a request's own session has none (figure 15)
        self.id = secrets.token_urlsafe(24) if kept else ""
        self.key = session_key()
        self.name = name
        self.vms: set[str] = set()
        self.authenticated = True  # the token is checked per request, before any command
        self.ended = False
        self.last_active = time.monotonic()
        self.busy = 0  # requests in flight: it does not expire under them

    def subscribe(self, events: frozenset[str], vm_id: str | None) -> None:
        raise CommandError(ErrorCode.BAD_REQUEST, "over HTTP, live events are GET /events (docs/http.md)")

    def unsubscribe(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<HttpSession {self.name}>"


class HttpApi:
    """The aiohttp application, its listener, and the HTTP sessions of one Server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.context = server.context
        self.sessions: dict[str, HttpSession] = {}
        self._runner: web.AppRunner | None = None
        self._listeners: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._openapi_json: bytes | None = None
        self.responses: dict[tuple[str, int], int] = {}  # (route, status) -> answers (GET /metrics)
        app = web.Application(middlewares=[self._guard], client_max_size=self.config.max_line)
        for name in CONFIRMATIONS:
            app.router.add_post(f"/{name}", self._write(name))
        for name in _OUR_WRITES:
            app.router.add_post(f"/{name}", self._write(name))
        for name in _READS:
            app.router.add_get(f"/{name}", self._read(name))
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_delete("/session", self._delete_session)
        app.router.add_get("/openapi.json", self._openapi)
        from .http_events import EventStreams  # (it imports this module)

        self.events = EventStreams(self)
        app.router.add_get("/events", self.events.handle, allow_head=False)
        app.on_shutdown.append(self.events.close)  # streams end before aiohttp waits for its handlers
        from .http_metrics import MetricsRoute  # prometheus-client, like aiohttp, only with --http-port

        app.router.add_get("/metrics", MetricsRoute(server).handle)
        self.app = app

    async def start(self, tls: ssl.SSLContext | None) -> None:
        """Listen on --http-port (TLS with the line server's context). :raises OSError:

        Our own listening sockets rather than aiohttp's sites: each connection passes the
        server's cap (--max-connections, shared with the line sessions) before aiohttp sees it,
        and running out of descriptors refuses waiting clients instead of spinning (limits.py).
        """
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.config.shutdown_grace)
        await runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self._listeners = await limits.serve(
                self.config.host, self.config.http_port, 4096,
                _refusal("the server is out of file descriptors; try again later"), self.server.note_refused,
                lambda sock: loop.create_server(lambda: _Gate(self), sock=sock, ssl=tls, backlog=4096,
                                                ssl_handshake_timeout=10.0 if tls else None))
        except BaseException as exc:
            await runner.cleanup()
            if isinstance(exc, OSError):  # the start failure line names this port, not the line server's
                exc.vmserver_address = f"HTTP {self.config.host}:{self.config.http_port}"  # type: ignore[attr-defined]
            raise
        self._runner = runner
        self._sweeper = loop.create_task(self._sweep())

    @property
    def address(self) -> tuple[str, int]:
        assert self._listeners, "start() first"
        host, port = self._listeners[0].sockets[0].getsockname()[:2]
        return host, port

    @property
    def connections(self) -> int:
        """HTTP connections open now (each counts against --max-connections)."""
        return len(self._runner.server.connections) if self._runner is not None and self._runner.server else 0

    async def close(self) -> None:
        """Stop listening, let requests in flight finish, end every session (reason shutdown)."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for listener in self._listeners:
            listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.end_all("shutdown")

    def end_all(self, reason: str) -> None:
        self.events.end_all()
        for session in list(self.sessions.values()):
            self._end(session, reason)

    def _end(self, session: HttpSession, reason: str) -> list[str]:
        self.sessions.pop(session.id, None)
        released = self.server.inventory.release(session, reason)
        log.info("HTTP session %s ended (%s); released %s", session.name, reason, ", ".join(released) or "no VMs")
        return released

    async def _sweep(self) -> None:
        """End sessions without a request for --http-session-ttl seconds (one timer for all)."""
        ttl = self.config.http_session_ttl
        while True:
            await asyncio.sleep(min(max(ttl / 4, 0.05), 5.0))
            cutoff = time.monotonic() - ttl
            for session in list(self.sessions.values()):
                if not session.busy and session.last_active < cutoff:
                    self._end(session, "timeout")

    # --- every request ----------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every answer, counted by route and status for GET /metrics (refusals before any
        command included; a route that matched nothing counts as NO_ROUTE: clients cannot add labels)."""
        response = await self._answer(request, handler)
        resource = request.match_info.route.resource
        key = (resource.canonical if resource is not None else NO_ROUTE, response.status)
        self.responses[key] = self.responses.get(key, 0) + 1
        return response

    async def _answer(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """The token, the lease, and our error body for aiohttp's own refusals (404, 405, 413)."""
        # (/ready says why itself; /metrics shows it: lease_held 0)
        if self.server.unavailable is not None and request.path not in _OPEN_PATHS and request.path != "/metrics":
            return error_response(ErrorCode.UNAVAILABLE, self.server.unavailable_message)
        try:
            if self.context.token is not None and request.path not in _OPEN_PATHS:
                refused = await self._check_token(request)
                if refused is not None:
                    return refused
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return error_response(ErrorCode.NOT_FOUND, f"no route {request.method} {request.path} "
                                      "(docs/http.md lists them)")
            if exc.status == 405:
                return error_response(ErrorCode.BAD_REQUEST, f"{request.method} is not allowed on {request.path}",
                                      405, {"Allow": exc.headers.get("Allow", "")})
            if exc.status == 413:
                return self._too_large()
            raise
        except (ConnectionError, OSError):
            raise  # the client went away mid-reply: nobody to answer
        except Exception:  # a bug of ours: our error body, not aiohttp's text/plain 500
            log.exception("HTTP %s %s failed with an unexpected error", request.method, request.path)
            return error_response(ErrorCode.INTERNAL, "internal error (see server log)")

    async def _check_token(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="vmserver"'}
        if scheme.lower() != "bearer" or not token.strip():
            return error_response(ErrorCode.UNAUTHENTICATED,
                                  "this server requires a token: send Authorization: Bearer TOKEN", 401, challenge)
        assert self.context.token is not None
        # (errors="replace": a header aiohttp decoded with surrogates must be a wrong token, not a crash)
        if hmac.compare_digest(token.strip().encode("utf-8", errors="replace"), self.context.token):
            return None
        log.warning("HTTP %s %s: wrong token from %s", request.method, request.path, request.remote)
        await asyncio.sleep(0.5)  # one guess per half second per request
        return error_response(ErrorCode.AUTH_FAILED, "wrong token", 401, challenge)

    def _too_large(self) -> web.Response:
        response = error_response(ErrorCode.TOO_LARGE, f"request body longer than {self.config.max_line} bytes "
                                  "(--max-line); it was not read")
        response.force_close()  # the unread body must not be taken for the next request
        return response

    def _session_of(self, request: web.Request) -> HttpSession | None:
        """The live session the request names (header first, then cookie), or None."""
        headers = request.headers  # Cookie parsed only when sent (figure 15: ~1 µs a request)
        sid = headers.get(HEADER) or (request.cookies.get(COOKIE) if "Cookie" in headers else None)
        session = self.sessions.get(sid) if sid else None
        if session is not None and session.ended:
            return None
        return session

    def _name(self, request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        return f"http {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "http ?"

    # --- routes -------------------------------------------------------------------------

    def _write(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.content_type != "application/json":
                return error_response(ErrorCode.BAD_REQUEST, f"POST /{name}: the body must be JSON, sent with "
                                      "Content-Type: application/json", 415)
            if request.content_length is not None and request.content_length > self.config.max_line:
                return self._too_large()
            try:
                body = await request.read()  # past client_max_size (chunked): 413, via _guard
            except web.HTTPRequestEntityTooLarge:
                return self._too_large()
            args = _body_args(body)
            if isinstance(args, web.Response):
                return args
            return await self._run(request, name, args)

        return handle

    def _read(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            args = _query_args(request)
            if isinstance(args, web.Response):
                return args
            return await self._run(request, name, args)

        return handle

    async def _run(self, request: web.Request, name: str, args: dict[str, Any]) -> web.StreamResponse:
        session = self._session_of(request)
        opened = session is None and name == "connect_vm"
        owner = session or HttpSession(self._name(request), opened)  # without one: a session for this request
        owner.busy += 1
        metrics, began = self.context.metrics, time.perf_counter()
        try:
            result = run(self.context, owner, name, args)
            if type(result) is not bytes and type(result) is not tuple:
                result = await result  # type: ignore[misc]
        except Exception as exc:
            error = failure(name, exc)
            metrics.failed("http", name, error.code.value, time.perf_counter() - began)
            if opened:
                self.server.inventory.release(owner)  # a refused connect leaves nothing bound to it
            headers = {"Retry-After": str(error.retry_after)} if isinstance(error, SlowDown) else None
            return self._with_session(error_response(error.code, error.message, 429 if headers else None, headers),
                                      session)
        finally:
            owner.busy -= 1
            owner.last_active = time.monotonic()
        metrics.ok("http", name, time.perf_counter() - began)
        if opened:
            if self._closing or owner.ended:  # shut down meanwhile: what it holds is let go
                self.server.inventory.release(owner, "shutdown")
            else:
                self.sessions[owner.id] = owner
                metrics.sessions_opened["http"] += 1
                session = owner
                log.info("HTTP session %s opened", owner.name)
        if name in CONFIRMATIONS and "application/json" not in request.headers.get("Accept", ""):
            response: web.StreamResponse = web.Response(text=CONFIRMATIONS[name])
        elif type(result) is bytes:
            response = web.Response(body=result, content_type="application/json")
        else:  # a large list, in pieces: written as it is read
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            self._with_session(response, session, opened)
            await response.prepare(request)
            for piece in pieces(result):  # type: ignore[arg-type]
                await response.write(piece)
            await response.write_eof()
            return response
        return self._with_session(response, session, opened)

    @staticmethod
    def _with_session(response: web.StreamResponse, session: HttpSession | None,
                      opened: bool = False) -> web.StreamResponse:
        if session is not None:
            response.headers[HEADER] = session.id
            if opened:
                response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", path="/")
        return response

    async def _openapi(self, request: web.Request) -> web.Response:
        if self._openapi_json is None:  # built on first use: most servers are never asked
            from .openapi import document

            self._openapi_json = dumps(document(self.context.token is not None))
        return web.Response(body=self._openapi_json, content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _ready(self, request: web.Request) -> web.Response:
        """Readiness: the database takes writes (in a cluster: this server holds its lease)."""
        why = self.server.unavailable
        if why is not None:
            why = f"this server holds no lease on the database ({why})"
        else:
            why = await asyncio.to_thread(_not_writable, self.config.db, self.config.busy_timeout_ms / 1000)
        if why is None:
            return web.Response(text="ready")
        return error_response(ErrorCode.UNAVAILABLE, f"not ready: {why}")

    async def _released(self, session: HttpSession, vm_ids: list[str], timeout: float = 5.0) -> None:
        """Wait (bounded) until the release is done: with shared presence (several servers) it
        is a write in the background, and the reply should not come before it."""
        presence, deadline = self.server.inventory.presence, time.monotonic() + timeout
        while any(presence.holder(vm_id) == session.key for vm_id in vm_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _delete_session(self, request: web.Request) -> web.Response:
        session = self._session_of(request)
        if session is None:
            return error_response(ErrorCode.NOT_FOUND, "no session: send the vmsession cookie or X-VM-Session")
        released = sorted(self._end(session, "session_closed"))
        await self._released(session, released)
        response = web.Response(body=dumps({"released": released}), content_type="application/json")
        response.del_cookie(COOKIE, path="/")
        return response


class _Gate(asyncio.Protocol):
    """A new HTTP connection: handed to aiohttp within the cap, else answered 503 and closed."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server, peer = self.api.server, transport.get_extra_info("peername")
        runner = self.api._runner
        if runner is None or runner.server is None or self.api._closing:
            transport.abort()
            return
        if not server.admits(peer):
            server.note_refused(1, f"http {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "http ?")
            transport.write(_refusal(server.full_message))  # type: ignore[attr-defined]
            transport.close()
            return
        handler = runner.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        pass  # a refused connection's request: not read


def _refusal(message: str) -> bytes:
    """A whole 503 reply, written before anything is read, then the connection is closed."""
    body = dumps({"error": {"code": ErrorCode.UNAVAILABLE.value, "message": message}})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _not_writable(db: str, timeout: float) -> str | None:
    """Why the database takes no writes now, or None: a write transaction is begun on a
    connection of its own and rolled back (nothing is changed, the server's writer is not held up)."""
    from .backends import is_postgres, mask_dsn

    if db == ":memory:":
        return None
    try:
        if is_postgres(db):
            import psycopg

            with psycopg.connect(db, connect_timeout=max(1, int(min(timeout, 2.0))), autocommit=True) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
                    return f"database {mask_dsn(db)} is a read-only standby"
            return None
        import sqlite3

        conn = sqlite3.connect(db, timeout=timeout, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock, as a write would
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return None
    except Exception as exc:  # any failure to write is the answer, not a crash
        return f"database takes no writes: {type(exc).__name__}: {exc}".replace(db, mask_dsn(db))


def _body_args(body: bytes) -> dict[str, Any] | web.Response:
    """A POST body's arguments: a JSON object, decoded as strictly as a request line."""
    try:
        value = decode_json(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return error_response(ErrorCode.BAD_REQUEST, f"body is not valid UTF-8 (offset {exc.start})")
    except (ValueError, RecursionError) as exc:
        return error_response(ErrorCode.BAD_REQUEST, f"body is not JSON: {json_error_text(exc)}")
    if type(value) is not dict:
        return error_response(ErrorCode.BAD_REQUEST, "body must be a JSON object of the command's arguments")
    return value


def _query_args(request: web.Request) -> dict[str, Any] | web.Response:
    """A GET's arguments from its query: numbers and yes/no where the schemas want them."""
    args: dict[str, Any] = {}
    for name in request.query:
        values = request.query.getall(name)
        if len(values) > 1:
            return error_response(ErrorCode.BAD_REQUEST, f"query parameter {name!r} given {len(values)} times")
        value: Any = values[0]
        # ASCII digits only: int() takes any script's digits, JSON does not
        # (one minus sign at most: "--5" passed lstrip("-") and int() raised)
        if name in _INTS and value.isascii() and value.removeprefix("-").isdigit() and len(value) <= 20:
            value = int(value)
        elif name in _BOOLS and value in _FLAGS:
            value = _FLAGS[value]
        args[name] = value  # anything else reaches the schema as text, and is refused there
    return args
