"""The network layer: accept loop, one task per session reading lines and writing replies, shutdown.

A session answers its requests strictly in order (pipelining works). Between commands it
can be stopped; inside one it is not: shutdown waits for the command in flight.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from . import __version__
from .commands import COMMANDS, execute
from .config import Config
from .errors import ErrorCode
from .inventory import Inventory
from .protocol import RequestError, encode_error, encode_event, encode_greeting, parse_line
from .store import Store

log = logging.getLogger(__name__)

_TOO_LARGE = object()  # read_line's answer for an over-long line (already discarded)
_BACKLOG = 4096  # a fleet reconnecting at once must not overflow asyncio's default of 100
_WRITE_HIGH_WATER = 256 * 1024  # wait for the peer to read once this much output is queued


class Session:
    """One client connection; ``vms`` are the VMs it has connected (bound to its lifetime)."""

    __slots__ = ("name", "vms", "task", "busy")

    def __init__(self, name: str, task: asyncio.Task[Any] | None) -> None:
        self.name = name
        self.vms: set[str] = set()
        self.task = task
        self.busy = False  # True while a command runs: shutdown must not interrupt it

    def __repr__(self) -> str:
        return f"<Session {self.name}>"


class Server:
    def __init__(self, config: Config, inventory: Inventory) -> None:
        self.config = config
        self.inventory = inventory
        self.sessions: set[Session] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._greeting = encode_greeting(__version__, list(COMMANDS))

    async def start(self) -> None:
        # The reader's limit allows the longest line plus a '\r'; longer lines are cut by us.
        self._server = await asyncio.start_server(
            self._serve, self.config.host, self.config.port, limit=self.config.max_line + 1,
            backlog=_BACKLOG)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound, so port 0 can be read back."""
        assert self._server is not None, "start() first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        """Stop listening, let commands in flight finish, say goodbye to every session, close them."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = [s.task for s in self.sessions if s.task is not None]
        for session in list(self.sessions):
            if not session.busy and session.task is not None:
                session.task.cancel()  # it is waiting for input: nothing is lost
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_grace)
            for task in pending:
                log.warning("a session did not finish within %.1fs of shutdown; cutting it off",
                            self.config.shutdown_grace)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()

    # --- one session ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        session = Session(name, asyncio.current_task())
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._closing:
            writer.close()
            return
        self.sessions.add(session)
        log.debug("session %s opened", name)
        reason = "closed by peer"
        try:
            writer.write(self._greeting)
            while not self._closing:
                line = await self._read_line(reader)
                if line is None:
                    break
                session.busy = True
                reply = await self._respond(session, line)
                session.busy = False
                if reply is not None:
                    if writer.transport.is_closing():
                        break  # the peer is gone; nobody to answer
                    writer.write(reply)
                    if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                        await writer.drain()
            if self._closing:
                reason = "server shutdown"
        except asyncio.CancelledError:
            if not self._closing:
                raise
            reason = "server shutdown"
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        finally:
            released = self.inventory.release(session)
            self.sessions.discard(session)
            log.debug("session %s ended (%s); released %s", name, reason, released or "nothing")
            await self._hang_up(writer, shutdown=reason == "server shutdown")

    async def _hang_up(self, writer: asyncio.StreamWriter, shutdown: bool) -> None:
        try:
            if shutdown and not writer.is_closing():
                writer.write(encode_event("shutdown", {}))
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), timeout=2.0)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | object | None:
        """The next line without its terminator; _TOO_LARGE for a discarded over-long line; None at EOF.

        A last line that ends at EOF without a newline is still returned.
        """
        try:
            line = (await reader.readuntil(b"\n"))[:-1]
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            line = exc.partial
        except asyncio.LimitOverrunError:
            await self._discard_line(reader)
            return _TOO_LARGE
        if line[-1:] == b"\r":
            line = line[:-1]
        if len(line) > self.config.max_line:
            return _TOO_LARGE
        return line

    @staticmethod
    async def _discard_line(reader: asyncio.StreamReader) -> None:
        """Throw away input up to and including the next newline (or EOF), never buffering it all."""
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError:
                return

    async def _respond(self, session: Session, line: bytes | object) -> bytes | None:
        if line is _TOO_LARGE:
            return encode_error(
                None, ErrorCode.TOO_LARGE,
                f"request line longer than {self.config.max_line} bytes; it was discarded")
        assert isinstance(line, bytes)
        try:
            request = parse_line(line)
        except RequestError as exc:
            return encode_error(exc.request_id, exc.code, exc.message)
        if request is None:
            return None
        return await execute(self.inventory, session, request)


async def start_server(config: Config) -> Server:
    """Open the store, load the inventory, and start listening (raises StoreError / OSError)."""
    inventory = Inventory(Store(config.db, config.busy_timeout_ms))
    server = Server(config, inventory)
    try:
        await server.start()
    except BaseException:
        inventory.close()
        raise
    return server
