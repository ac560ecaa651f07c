"""The ``vmclient`` console: interactive (readline, history, completion), one-shot, and script mode.

Commands are typed in protocol.md's inline form and sent as typed; the server parses them, so
the console and netcat behave the same. One event loop (asyncio.Runner) lives for the whole
console; Ctrl-C cancels the command in flight, not the console.

Two commands are the console's own: ``watch`` (subscribe and print live events, one line each,
until Ctrl-C) and ``history`` (get_history as a table). After a typed ``subscribe``, the
interactive console prints that subscription's events above the prompt as they come, keeping
the line being typed (GNU readline; elsewhere they are printed before the next prompt).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from . import render
from .client import DEFAULT_HOST, DEFAULT_PORT, EVENT_NAMES, Client, format_address, redact
from .commands import COMMANDS
from .errors import ClientError, CommandError, ConnectError, ConnectionLost

EXIT_OK, EXIT_COMMAND_ERROR, EXIT_CONNECTION_ERROR = 0, 1, 2
BUILTINS = ("help", "quit", "exit")
CONSOLE_COMMANDS = {  # the console's own commands: name -> (usage, summary, details)
    "watch": ("watch [EVENT ...] [vm_id=VM_ID]",
              "Print live events as they happen, one line each, until Ctrl-C.",
              ["EVENT: event names to watch (default: all): " + ", ".join(EVENT_NAMES),
               "vm_id: only the events of this VM",
               "Each line: time (UTC), event, vm_id, detail. With --json, each event's JSON.",
               "Ctrl-C stops watching (and unsubscribes; an earlier subscribe is restored)."],
              "watch vm_connected vm_disconnected"),
    "history": ("history [VM_ID] [event=NAME] [since=TIME] [before=ID] [limit=N]",
                "What happened to VMs (get_history), newest first, as a table.",
                ["VM_ID: only this VM (also vm_id=...)",
                 "event: only this event name; since: ISO-8601 UTC time; before: page back from this id",
                 "limit: at most this many (1-10000, default 100)"],
                "history vm-1 limit=20"),
}
HISTORY_KEYS = ("vm_id", "event", "since", "before", "limit")
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


def parse_watch(words: list[str]) -> tuple[list[str] | None, str | None]:
    """``watch``'s words: event names (also comma-separated) and ``vm_id=...``.

    :raises ValueError: for any other ``key=value``, or vm_id given twice.
    """
    events: list[str] = []
    vm_id = None
    for word in words:
        key, sep, value = word.partition("=")
        if sep:
            if key != "vm_id":
                raise ValueError(f"watch takes event names and vm_id=VM_ID, not {word!r}")
            if vm_id is not None:
                raise ValueError("argument 'vm_id' given twice")
            vm_id = value
        else:
            events.extend(name for name in word.split(",") if name)
    return (list(dict.fromkeys(events)) or None), vm_id


def parse_history(words: list[str]) -> dict[str, Any]:
    """``history``'s words: an optional VM_ID, then ``key=value`` (vm_id, event, since, before, limit).

    :raises ValueError: for an unknown key, a key given twice, or more than one VM_ID.
    """
    args: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            key, value = "vm_id", word
        elif key not in HISTORY_KEYS:
            raise ValueError(f"history takes [VM_ID] and {', '.join(k + '=' for k in HISTORY_KEYS)} not {word!r}")
        if key in args:
            raise ValueError(f"argument {key!r} given twice")
        if key in ("before", "limit"):
            try:  # the inline rule: JSON when it parses (so 20 is a number), text otherwise
                args[key] = _strict.decode(value)
            except (ValueError, RecursionError):
                args[key] = value
        else:
            args[key] = value
    return args


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


class Console:
    """One console session: a connection that comes back on the next command after it drops
    (to another server, when given several ``hosts``: see :class:`Client`)."""

    def __init__(self, host: str | None = None, port: int | None = None, *,
                 hosts: list[tuple[str, int]] | None = None, as_json: bool, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr, timeout: float | None = 60.0, **client_options: Any) -> None:
        self.host, self.port, self.hosts = host, port, hosts
        self.client_options = client_options  # token, tls, cafile: see Client
        self.as_json = as_json
        self.out, self.err = out, err
        self.timeout = timeout
        self.client: Client | None = None
        self.held: set[str] = set()  # VMs this console connected: a reconnect loses them
        self._sessions = 0
        self._lost_said = False  # the loss of the current connection was reported
        self.stop_note: str | None = None  # what a Ctrl-C just stopped (watch), for the caller to say
        self._vm_width = render.VM_ID_WIDTH  # the widest vm_id printed in event lines so far

    @property
    def where(self) -> str:
        """The server connected to (or last connected to); before any, the address(es) to try."""
        if self.client is not None and self.client.address is not None:
            return self.client.address
        addresses = self.hosts or [(self.host or DEFAULT_HOST, self.port or DEFAULT_PORT)]
        return ", ".join(format_address(*a) for a in addresses)

    def prompt(self) -> str:
        return f"{self.where}> " if self.client is not None and self.client.connected else "not connected> "

    # --- connection ---------------------------------------------------------------------

    async def ensure_connected(self) -> Client:
        """The live client, reconnecting (a new session) if the last connection dropped.

        :raises ConnectError: when the server cannot be reached.
        """
        client = self.client
        if client is None:
            client = self.client = Client(self.host, self.port, hosts=self.hosts, timeout=self.timeout,
                                          **self.client_options)
        else:
            for _ in range(3):  # let the reader notice a connection that closed while we waited
                await asyncio.sleep(0)
            if client.connected:
                return client
            if self._sessions:
                self._say_lost()
        await client.connect()
        self._sessions += 1
        self._lost_said = False
        if self._sessions > 1:
            self.note(f"reconnected to {self.where} (a new session)")
        return client

    def _say_lost(self) -> None:
        """Tell the user, once per lost connection, and which VMs went with it."""
        if self._lost_said:
            return
        self._lost_said = True
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
        if name in CONSOLE_COMMANDS:
            return await self.run_console_command(name, _split(text)[1:])
        return await self._run(name, lambda c: c.call_line(text))

    async def run_console_command(self, name: str, words: list[str], *, restore: bool = True) -> int:
        """``watch`` or ``history`` with its words (``restore``: see :meth:`watch`)."""
        if name == "watch":
            return await self.watch(words, restore=restore)
        try:
            args = parse_history(words)
        except ValueError as exc:
            self.note(f"error: {exc}")
            return EXIT_COMMAND_ERROR
        return await self._run("get_history", lambda c: c.get_history(**args))

    # --- live events ---------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """True while this console's session is subscribed (the user typed ``subscribe``)."""
        return self.client is not None and self.client.subscription is not None

    def event_text(self, event: dict[str, Any]) -> str:
        """One event as printed: its JSON with --json, else an aligned line (render.event_line)."""
        if self.as_json:
            return render.as_json(event)
        data = event.get("data")
        vm_id = data.get("vm_id") if isinstance(data, dict) else None
        if isinstance(vm_id, str):
            self._vm_width = max(self._vm_width, min(len(vm_id), 64))
        return render.event_line(event, self._vm_width)

    def show_events(self) -> None:
        """Print the events that came (for a typed ``subscribe``) since the last look."""
        if self.client is not None:
            for event in self.client.poll_events():
                self.show(self.event_text(event))

    async def watch(self, words: list[str], *, restore: bool = True) -> int:
        """``watch [EVENT ...] [vm_id=...]``: subscribe and print each event until cancelled (Ctrl-C)
        or the connection ends (status 2). When cancelled and ``restore``, it unsubscribes, or
        puts back the subscription the session had before, and sets :attr:`stop_note`."""
        try:
            events, vm_id = parse_watch(words)
        except ValueError as exc:
            self.note(f"error: {exc}")
            return EXIT_COMMAND_ERROR
        previous: dict[str, Any] | None = None

        async def start(client: Client) -> Client:
            nonlocal previous
            previous = client.subscription
            await client.subscribe(events, vm_id)
            return client

        status, client = await self._call(start)
        if status != EXIT_OK:
            return status
        what = ", ".join(events) if events else "all events"
        self.note(f"watching {what}{f' of {vm_id}' if vm_id else ''}; Ctrl-C to stop")
        try:
            async for event in client.events():
                self.show(self.event_text(event))
        except asyncio.CancelledError:
            if restore:
                self.stop_note = await self._end_watch(client, previous)
            raise
        except BrokenPipeError:  # ``vmclient watch | head``: the reader left; so do we, quietly
            if self.out is sys.stdout:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            return EXIT_OK
        self._say_lost()  # the next command reconnects
        return EXIT_CONNECTION_ERROR

    async def _end_watch(self, client: Client, previous: dict[str, Any] | None) -> str:
        if not client.connected:
            return "stopped watching"
        try:
            if previous is not None:
                await client.subscribe(previous.get("events"), previous.get("vm_id"), timeout=5.0)
                return "stopped watching; the earlier subscription is back"
            await client.unsubscribe(timeout=5.0)
            return "stopped watching (unsubscribed)"
        except ClientError as exc:
            return f"stopped watching ({exc})"

    async def run_command(self, name: str, args: dict[str, Any]) -> int:
        """Run one command given as a name and arguments (one-shot mode)."""
        return await self._run(name, lambda c: c.request(name, args))

    async def _run(self, name: str, send: Any) -> int:
        status, result = await self._call(send)
        if status == EXIT_OK:
            self._track(name, result)
            self.show(render.as_json(result) if self.as_json else render.human(name, result))
        return status

    async def _call(self, send: Any) -> tuple[int, Any]:
        """Connect if need be and run ``send(client)``: (EXIT_OK, its result), or a failure
        already reported to the user and the exit status it means."""
        try:
            client = await self.ensure_connected()
        except ConnectError as exc:
            self.note(f"error: {exc}")
            return EXIT_CONNECTION_ERROR, None
        try:
            return EXIT_OK, await send(client)
        except CommandError as exc:
            self.show_error(exc.code, exc.message)
            return EXIT_COMMAND_ERROR, None
        except ConnectionLost as exc:
            self.note(f"error: {exc} (the command may or may not have been carried out)")
            return EXIT_CONNECTION_ERROR, None
        except ClientError as exc:
            self.note(f"error: {exc}")
            return EXIT_CONNECTION_ERROR, None
        except (ValueError, TypeError) as exc:  # arguments that cannot be sent as JSON
            self.note(f"error: {exc}")
            return EXIT_COMMAND_ERROR, None

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
    if words and words[0] in CONSOLE_COMMANDS:
        usage, summary, details, example = CONSOLE_COMMANDS[words[0]]
        return "\n".join([usage, f"  {summary}", *(f"  {line}" for line in details), f"  example: {example}"])
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
    lines.append("Console commands:")
    for name, (usage, summary, _, _) in CONSOLE_COMMANDS.items():
        lines.append(f"  {name:<{width}}{summary}")
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
                candidates = [*names, *CONSOLE_COMMANDS, *BUILTINS]
                self.matches = sorted(n + " " for n in candidates if n.startswith(text))
            elif words[0] in ("help", "?"):
                self.matches = sorted(n + " " for n in [*COMMANDS, *CONSOLE_COMMANDS] if n.startswith(text))
            elif words[0] == "watch":
                given = set(words[1:])
                options = [n + " " for n in EVENT_NAMES if n not in given]
                if not any(w.startswith("vm_id=") for w in words[1:]):
                    options.append("vm_id=")
                self.matches = [o for o in options if o.startswith(text)]
            elif words[0] == "history":
                if text.startswith("event="):
                    self.matches = [f"event={n} " for n in EVENT_NAMES if f"event={n}".startswith(text)]
                else:
                    given = {w.split("=", 1)[0] for w in words[1:] if "=" in w}
                    self.matches = [f"{k}=" for k in HISTORY_KEYS if k.startswith(text) and k not in given]
            else:
                info = COMMANDS.get(words[0])
                given = {w.split("=", 1)[0] for w in words[1:] if "=" in w}
                args = [a.name for a in info.args] if info else []
                self.matches = [f"{a}=" for a in args if a.startswith(text) and a not in given]
        return self.matches[state] if state < len(self.matches) else None


class _LivePrompt:
    """Prints the events of a typed ``subscribe`` above the prompt while ``input()`` waits.

    While the console sits in ``input()`` its event loop does not run. CPython's readline calls
    ``PyOS_InputHook`` every 0.1 s while it waits for a key, in the main thread and between
    keystrokes, so that is where this runs: it turns the event loop for a moment (the client's
    reader takes in what the server sent), and prints any events on their own lines above the
    prompt, the usual way for GNU readline: hide the prompt and line, print, then redraw both
    with the cursor where it was (``rl_save_prompt``... ``rl_restore_prompt``, ``rl_redisplay``).
    Printing waits while readline is in the middle of something (a search, a completion, a
    multi-key command). Nothing touches readline from another thread.

    Ctrl-C: with the hook in place, CPython runs the SIGINT handler inside the hook (right after
    ``select()`` is interrupted), where a KeyboardInterrupt would be swallowed (and could hit the
    event loop's insides). So while the hook is in, SIGINT only raises a flag, and the hook does
    what the console does for a Ctrl-C at the prompt: prints ``^C`` and starts a fresh empty line.

    Only with GNU readline and a free ``PyOS_InputHook``; :meth:`create` returns None otherwise,
    and the console prints events before each prompt instead.
    """

    # RL_STATE_* (readline.h): readline is busy with more than plain line editing.
    _BUSY = (0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x4000 | 0x100000 | 0x200000 | 0x800000
             | 0x1000000 | 0x2000000)

    def __init__(self, console: Console, loop: asyncio.AbstractEventLoop, ctypes: Any, lib: Any,
                 hook_slot: Any) -> None:
        self.console, self.loop, self.lib, self.hook_slot = console, loop, lib, hook_slot
        self.point = ctypes.c_int.in_dll(lib, "rl_point")
        self.end = ctypes.c_int.in_dll(lib, "rl_end")
        self.line_buffer = ctypes.c_char_p.in_dll(lib, "rl_line_buffer")
        self.state = ctypes.c_ulong.in_dll(lib, "rl_readline_state")
        lib.rl_replace_line.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.rl_replace_line.restype = None
        self.sigcleanup = getattr(lib, "rl_callback_sigcleanup", None)  # readline 7+
        self.callback = ctypes.CFUNCTYPE(ctypes.c_int)(self._hook)  # kept: C holds a pointer to it
        self.address = ctypes.cast(self.callback, ctypes.c_void_p).value
        self.pending: list[str] = []  # event lines waiting for readline to be idle
        self.interrupted = False
        self.inside = False
        self.broken = False
        self.saved_handler: Any = None

    @classmethod
    def create(cls, readline: Any, console: Console, runner: asyncio.Runner) -> _LivePrompt | None:
        if readline is None or "libedit" in (readline.__doc__ or ""):
            return None
        try:
            import ctypes

            lib = ctypes.CDLL(getattr(readline, "__file__", None))  # dlsym also searches libreadline
            for name in ("rl_save_prompt", "rl_restore_prompt", "rl_replace_line", "rl_redisplay", "rl_on_new_line",
                         "rl_free_line_state", "using_history"):
                getattr(lib, name)
            hook_slot = ctypes.c_void_p.in_dll(ctypes.pythonapi, "PyOS_InputHook")
            if hook_slot.value:  # someone else's (tkinter): leave it alone
                return None
            return cls(console, runner.get_loop(), ctypes, lib, hook_slot)
        except (ImportError, OSError, AttributeError, ValueError, TypeError):
            return None

    def start(self) -> None:
        """Before ``input()``: the hook in, and SIGINT only noted (see the class docstring)."""
        if self.broken:
            return
        self.interrupted = False
        self.saved_handler = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        self.hook_slot.value = self.address

    def stop(self) -> None:
        """After ``input()``: as it was (asyncio.Runner wants the default SIGINT handler back)."""
        if self.saved_handler is None:
            return
        self.hook_slot.value = None
        signal.signal(signal.SIGINT, self.saved_handler)
        self.saved_handler = None
        lines, self.pending = self.pending, []  # held back while readline was busy
        for line in lines:
            self.console.show(line)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupted = True

    def _hook(self) -> int:
        if self.inside or self.broken:
            return 0
        self.inside = True
        try:
            if self.interrupted:
                self.interrupted = False
                self._new_line_after_ctrl_c()
            self.loop.run_until_complete(self._turn())
            client = self.console.client
            if client is not None:
                self.pending.extend(self.console.event_text(e) for e in client.poll_events())
            if self.pending and not self.state.value & self._BUSY:
                lines, self.pending = self.pending, []
                self._print_above("\n".join(lines) + "\n")
        except Exception as exc:  # never again, and say why once: the prompt must stay usable
            self.broken = True
            self.hook_slot.value = None
            try:
                self.console.note(f"\n(live events stopped: {exc!r}; they will show before each prompt)")
            except Exception:
                pass
        finally:
            self.inside = False
        return 0

    @staticmethod
    async def _turn() -> None:
        for _ in range(8):  # a few rounds: socket readable -> data in -> reader task -> event buffered
            await asyncio.sleep(0)

    def _print_above(self, text: str) -> None:
        lib = self.lib
        point, line = self.point.value, self.line_buffer.value or b""
        lib.rl_save_prompt()
        lib.rl_replace_line(b"", 0)
        lib.rl_redisplay()  # prompt and line gone, cursor at the start of their (first) row
        out = self.console.out
        out.write(text)
        out.flush()
        lib.rl_restore_prompt()
        lib.rl_replace_line(line, 0)
        self.point.value = min(point, len(line))
        lib.rl_redisplay()

    def _new_line_after_ctrl_c(self) -> None:
        """What input() raising KeyboardInterrupt and the loop printing ``^C`` would show."""
        lib = self.lib
        if self.sigcleanup is not None:
            self.sigcleanup()  # leaves a search or multi-key command, as readline does on SIGINT
        lib.rl_free_line_state()
        self.point.value = self.end.value
        lib.rl_redisplay()
        self.console.out.write("^C\n")
        self.console.out.flush()
        lib.rl_replace_line(b"", 1)
        self.point.value = 0
        lib.using_history()  # leave any history browsing, as a new input() would
        lib.rl_on_new_line()
        lib.rl_redisplay()


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
    live = _LivePrompt.create(readline, console, runner) if console.out.isatty() else None
    try:
        runner.run(console.ensure_connected())
        info = console.client.server_info if console.client else {}
        console.note(f"connected to {console.where} (vmserver {info.get('version', '?')}); "
                     "type help, or quit to leave")
    except ConnectError as exc:
        console.note(f"error: {exc}; will try again at the next command")
    while True:
        console.show_events()  # those that came while the last command ran
        hooked = live is not None and console.subscribed
        try:
            if hooked:
                live.start()  # type: ignore[union-attr]
            try:
                line = input(console.prompt())
            finally:
                if hooked:
                    live.stop()  # type: ignore[union-attr]
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
        console.stop_note = None
        try:
            runner.run(console.run_line(text))
        except KeyboardInterrupt:
            if console.stop_note:  # a watch: the terminal echoed ^C on the last event line's tail
                console.note("\n" + console.stop_note)
            else:
                console.note("^C: stopped waiting (the server may still carry the command out)")
    runner.run(console.close())
    return EXIT_OK


def script(console: Console, runner: asyncio.Runner, lines: Iterable[str]) -> int:
    """Commands from a non-terminal stdin, one per line; the worst status wins. A Ctrl-C while a
    ``watch`` runs ends the watch and the script."""
    status = EXIT_OK
    for line in lines:
        text = line.strip()
        if text in ("quit", "exit"):
            break
        try:
            status = max(status, runner.run(console.run_line(text)))
        except KeyboardInterrupt:
            if text.split(None, 1)[0] != "watch":
                raise
            break
    runner.run(console.close())
    return status


def one_shot(console: Console, runner: asyncio.Runner, words: list[str]) -> int:
    if words[0] in ("help", "?"):
        console.show(help_text(words[1:], None))
        return EXIT_OK
    if words[0] in CONSOLE_COMMANDS:
        run: Callable[[], Any] = lambda: console.run_console_command(words[0], words[1:], restore=False)
    else:
        try:
            name, args = parse_argv_command(words)
        except ValueError as exc:
            console.note(f"error: {exc}")
            return EXIT_COMMAND_ERROR
        run = lambda: console.run_command(name, args)  # noqa: E731
    try:
        return runner.run(run())
    except KeyboardInterrupt:
        if words[0] != "watch":
            raise
        return EXIT_OK  # Ctrl-C (SIGINT) is how a one-shot watch is meant to end
    finally:
        runner.run(console.close())
