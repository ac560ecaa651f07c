"""The ``vmclient`` console: interactive (readline, history, completion), one-shot, and script mode.

Commands are typed in protocol.md's inline form and sent as typed; the server parses them, so
the console and netcat behave the same. One event loop (asyncio.Runner) lives for the whole
console; Ctrl-C cancels the command in flight, not the console.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from . import render
from .client import Client, redact
from .commands import COMMANDS
from .errors import ClientError, CommandError, ConnectError, ConnectionLost

EXIT_OK, EXIT_COMMAND_ERROR, EXIT_CONNECTION_ERROR = 0, 1, 2
BUILTINS = ("help", "quit", "exit")
HISTORY_LENGTH = 1000


def history_path(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """``$XDG_STATE_HOME/vmclient/history``, falling back to ``~/.local/state/vmclient/history``."""
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vmclient" / "history"


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Duplicate(f"argument {key!r} given twice")
        obj[key] = value
    return obj


def _reject(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


# protocol.md's JSON: no NaN/Infinity, no overflowing numbers, no duplicate keys.
_strict = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject, parse_float=_finite)


def parse_argv_command(words: list[str]) -> tuple[str, dict[str, Any]]:
    """A one-shot command from shell words: ``NAME key=value ...`` or ``NAME '{json}'``.

    Each word is one argument, so shell quoting is respected exactly; values follow the inline
    form's rule (protocol.md): JSON when they parse as strict JSON, text otherwise.

    :raises ValueError: for a word that is not key=value, or a key given twice.
    """
    name, rest = words[0], words[1:]
    if len(rest) == 1 and rest[0].lstrip().startswith("{"):
        args = _strict.decode(rest[0])
        if not isinstance(args, dict):
            raise ValueError("the arguments must be one JSON object")
        return name, args
    args = {}
    for word in rest:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {word!r}")
        if key in args:
            raise ValueError(f"argument {key!r} given twice")
        try:
            args[key] = _strict.decode(text)
        except (ValueError, RecursionError):
            args[key] = text
    return name, args


class Console:
    """One console session: a connection that comes back on the next command after it drops."""

    def __init__(self, host: str, port: int, *, as_json: bool, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr, timeout: float | None = 60.0, **client_options: Any) -> None:
        self.host, self.port = host, port
        self.client_options = client_options  # token, tls, cafile: see Client
        self.as_json = as_json
        self.out, self.err = out, err
        self.timeout = timeout
        self.client: Client | None = None
        self.held: set[str] = set()  # VMs this console connected: a reconnect loses them
        self._sessions = 0

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def prompt(self) -> str:
        return f"{self.where}> " if self.client is not None and self.client.connected else "not connected> "

    # --- connection ---------------------------------------------------------------------

    async def ensure_connected(self) -> Client:
        """The live client, reconnecting if the last connection dropped.

        :raises ConnectError: when the server cannot be reached.
        """
        client = self.client
        if client is not None:
            for _ in range(3):  # let the reader notice a connection that closed while we waited
                await asyncio.sleep(0)
            if client.connected:
                return client
            await client.close()
            self.client = None
            self._say_lost()
        client = await Client(self.host, self.port, timeout=self.timeout, **self.client_options).connect()
        self.client = client
        self._sessions += 1
        if self._sessions > 1:
            self.note(f"reconnected to {self.where} (a new session)")
        return client

    def _say_lost(self) -> None:
        message = f"connection to {self.where} was lost"
        if self.held:
            names = ", ".join(sorted(self.held))
            message += f"; VMs this console had connected are now disconnected: {names} (connect_vm them again)"
            self.held.clear()
        self.note(message)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # --- running commands ----------------------------------------------------------------

    async def run_line(self, line: str) -> int:
        """Run one typed line; returns an exit status (0, 1 or 2). Prints the outcome."""
        text = line.strip()
        if not text or text.startswith("#"):
            return EXIT_OK
        name = text.split(None, 1)[0]
        if name in ("help", "?"):
            self.show(help_text(text.split()[1:], self.client.commands if self.client else None))
            return EXIT_OK
        return await self._run(name, lambda c: c.call_line(text))

    async def run_command(self, name: str, args: dict[str, Any]) -> int:
        """Run one command given as a name and arguments (one-shot mode)."""
        return await self._run(name, lambda c: c.request(name, args))

    async def _run(self, name: str, send: Any) -> int:
        try:
            client = await self.ensure_connected()
        except ConnectError as exc:
            self.note(f"error: {exc}")
            return EXIT_CONNECTION_ERROR
        try:
            result = await send(client)
        except CommandError as exc:
            self.show_error(exc.code, exc.message)
            return EXIT_COMMAND_ERROR
        except ConnectionLost as exc:
            self.note(f"error: {exc} (the command may or may not have been carried out)")
            return EXIT_CONNECTION_ERROR
        except ClientError as exc:
            self.note(f"error: {exc}")
            return EXIT_CONNECTION_ERROR
        except (ValueError, TypeError) as exc:  # arguments that cannot be sent as JSON
            self.note(f"error: {exc}")
            return EXIT_COMMAND_ERROR
        self._track(name, result)
        self.show(render.as_json(result) if self.as_json else render.human(name, result))
        return EXIT_OK

    def _track(self, name: str, result: Any) -> None:
        if isinstance(result, dict) and isinstance(result.get("vm_id"), str):
            if name == "connect_vm":
                self.held.add(result["vm_id"])
            elif name == "disconnect_vm":
                self.held.discard(result["vm_id"])

    def show(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def show_error(self, code: str, message: str) -> None:
        if self.as_json:
            self.show(render.as_json({"error": {"code": code, "message": message}}))
        else:
            print(f"error {code}: {message}", file=self.err if self.err is not self.out else self.out, flush=True)


def help_text(words: list[str], server_commands: list[str] | None) -> str:
    """``help`` lists the commands; ``help CMD`` shows one with its arguments and an example."""
    if words:
        info = COMMANDS.get(words[0])
        if info is None:
            return f"no help for {words[0]!r}; type help for the list"
        lines = [info.usage(), f"  {info.summary}"]
        for arg in info.args:
            need = "required" if arg.required else "optional"
            lines.append(f"  {arg.name:<9} {arg.type:<5} {need:<9} {arg.doc}")
        if info.example:
            lines.append(f"  example: {info.example}")
        return "\n".join(lines)
    names = server_commands or list(COMMANDS)
    width = max(len(n) for n in names) + 2
    lines = ["Commands:"]
    for name in names:
        info = COMMANDS.get(name)
        lines.append(f"  {name:<{width}}{info.summary if info else ''}".rstrip())
    lines.append("Type: NAME key=value ... (values are JSON when they parse, text otherwise),")
    lines.append("      or NAME {json-object}. help NAME for one command; quit or Ctrl-D to leave.")
    return "\n".join(lines)


# --- interactive mode ---------------------------------------------------------------------


class _History:
    """The readline history file: mode 0600, and no password value ever written to it."""

    def __init__(self, readline: Any, path: Path) -> None:
        self.readline, self.path = readline, path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
            os.close(fd)
            os.chmod(path, 0o600)
            readline.read_history_file(str(path))
            readline.set_history_length(HISTORY_LENGTH)
            readline.write_history_file(str(path))  # trims the file to the last HISTORY_LENGTH lines
            os.chmod(path, 0o600)
            self.ok = True
        except OSError:
            self.ok = False  # history is a comfort, not a requirement
        readline.set_history_length(HISTORY_LENGTH)

    def add(self, line: str) -> None:
        """Replace the line readline just remembered with its redacted form, and save it."""
        rl = self.readline
        safe = redact(line)
        length = rl.get_current_history_length()
        if safe != line and length:
            rl.remove_history_item(length - 1)
            rl.add_history(safe)
        if self.ok:
            try:
                rl.append_history_file(1, str(self.path))
            except OSError:
                self.ok = False


class _Completer:
    """Command names (the server's list) in the first word, then ``arg=`` names of that command."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.matches: list[str] = []

    def __call__(self, text: str, state: int) -> str | None:
        if state == 0:
            import readline

            buffer = readline.get_line_buffer()[: readline.get_endidx()]
            words = buffer.split()
            first_word = len(words) == 0 or (len(words) == 1 and not buffer.endswith(" "))
            if first_word:
                client = self.console.client
                names = (client.commands if client is not None and client.commands else list(COMMANDS))
                candidates = [*names, *BUILTINS]
                self.matches = sorted(n + " " for n in candidates if n.startswith(text))
            elif words[0] in ("help", "?"):
                self.matches = sorted(n + " " for n in COMMANDS if n.startswith(text))
            else:
                info = COMMANDS.get(words[0])
                given = {w.split("=", 1)[0] for w in words[1:] if "=" in w}
                args = [a.name for a in info.args] if info else []
                self.matches = [f"{a}=" for a in args if a.startswith(text) and a not in given]
        return self.matches[state] if state < len(self.matches) else None


def interactive(console: Console, runner: asyncio.Runner, history_file: Path | None) -> int:
    """The read-eval-print loop; returns 0 (errors were shown as they happened)."""
    try:
        import readline
    except ImportError:  # pragma: no cover - every supported platform has it
        readline = None  # type: ignore[assignment]
    history = None
    if readline is not None:
        readline.set_completer(_Completer(console))
        readline.set_completer_delims(" \t")
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")
        if history_file is not None:
            history = _History(readline, history_file)
    try:
        runner.run(console.ensure_connected())
        info = console.client.server_info if console.client else {}
        console.note(f"connected to {console.where} (vmserver {info.get('version', '?')}); "
                     "type help, or quit to leave")
    except ConnectError as exc:
        console.note(f"error: {exc}; will try again at the next command")
    while True:
        try:
            line = input(console.prompt())
        except EOFError:
            print(file=console.out)
            break
        except KeyboardInterrupt:
            print("^C", file=console.out)
            continue
        text = line.strip()
        if not text:
            continue
        if history is not None:
            history.add(line)
        if text in ("quit", "exit"):
            break
        try:
            runner.run(console.run_line(text))
        except KeyboardInterrupt:
            console.note("^C: stopped waiting (the server may still carry the command out)")
    runner.run(console.close())
    return EXIT_OK


def script(console: Console, runner: asyncio.Runner, lines: Iterable[str]) -> int:
    """Commands from a non-terminal stdin, one per line; the worst status wins."""
    status = EXIT_OK
    for line in lines:
        text = line.strip()
        if text in ("quit", "exit"):
            break
        status = max(status, runner.run(console.run_line(text)))
    runner.run(console.close())
    return status


def one_shot(console: Console, runner: asyncio.Runner, words: list[str]) -> int:
    if words[0] in ("help", "?"):
        console.show(help_text(words[1:], None))
        return EXIT_OK
    try:
        name, args = parse_argv_command(words)
    except ValueError as exc:
        console.note(f"error: {exc}")
        return EXIT_COMMAND_ERROR
    try:
        return runner.run(console.run_command(name, args))
    finally:
        runner.run(console.close())
