"""The server's own console (``vmserver --console``): inline commands typed on the server's
terminal, dispatched exactly like a network session's, answered in the client console's form.

stdin is read by a thread (a blocking ``readline``) and each line is handed to the event loop,
so the server keeps serving its network sessions while the operator types.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from typing import Any, TextIO

from vmclient import render

from .commands import Context, execute
from .errors import CommandError, ErrorCode
from .inventory import Inventory
from .presence import session_key
from .protocol import RequestError, parse_line

log = logging.getLogger(__name__)

PROMPT = "vmserver> "


class ConsoleSession:
    """The console as a session: it can connect VMs (held until the server stops), not subscribe."""

    def __init__(self) -> None:
        self.key = session_key()
        self.name = "console"
        self.vms: set[str] = set()
        self.authenticated = True
        self.ended = False

    def subscribe(self, events: frozenset[str], vm_id: str | None) -> None:
        raise CommandError(ErrorCode.UNAVAILABLE, "live events are not available on the server console; "
                                                  "use a client: vmclient watch")

    def unsubscribe(self) -> None:
        pass


class ServerConsole:
    def __init__(self, context: Context, inventory: Inventory, stdin: TextIO = sys.stdin,
                 stdout: TextIO = sys.stdout) -> None:
        self.context, self.inventory = context, inventory
        self.stdin, self.stdout = stdin, stdout
        self.session = ConsoleSession()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_stdin, name="vmserver-console", daemon=True).start()
        self._task = self._loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.inventory.release(self.session, "shutdown")

    def _read_stdin(self) -> None:
        assert self._loop is not None
        while True:
            try:
                line = self.stdin.readline()
            except (OSError, ValueError):
                line = ""
            try:
                self._loop.call_soon_threadsafe(self._lines.put_nowait, line or None)
            except RuntimeError:  # the loop is closed: the server has stopped
                return
            if not line:
                return

    def _show(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    async def _run(self) -> None:
        self._show("console: type commands as in protocol.md (help lists them); Ctrl-D closes the console")
        self.stdout.write(PROMPT)
        self.stdout.flush()
        while True:
            line = await self._lines.get()
            if line is None:
                self._show("\nconsole closed; the server goes on (SIGINT or SIGTERM stops it)")
                return
            text = line.strip()
            if text in ("help", "?"):
                self._show(render_help())
            elif text:
                await self._one(text)
            self.stdout.write(PROMPT)
            self.stdout.flush()

    async def _one(self, text: str) -> None:
        try:
            request = parse_line(text.encode("utf-8", "surrogateescape"))
        except RequestError as exc:
            self._show(f"error {exc.code.value}: {exc.message}")
            return
        if request is None:
            return
        reply: Any = execute(self.context, self.session, request, "console")
        if type(reply) is not bytes and type(reply) is not tuple:
            reply = await reply
        message = json.loads(b"".join(reply) if type(reply) is tuple else reply)
        if message.get("ok"):
            self._show(render.human(request.cmd, message.get("result")))
        else:
            error = message.get("error", {})
            self._show(f"error {error.get('code')}: {error.get('message')}")


def render_help() -> str:
    from .commands import COMMANDS

    width = max(len(name) for name in COMMANDS) + 2
    lines = ["Commands:"] + [f"  {name:<{width}}{cmd.summary}" for name, cmd in COMMANDS.items()]
    lines.append("Type: NAME key=value ... or NAME {json}; Ctrl-D closes the console (the server goes on).")
    return "\n".join(lines)
