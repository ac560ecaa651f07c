"""Command line: ``vmclient`` / ``python -m vmclient``: the console, one-shot commands, and ``demo``.

Exit status: 0 success, 1 a command error, 2 a connection error (or bad usage). Every setting
(flag or environment variable) is checked before anything connects: a bad one is one line on
stderr and status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence

from .arguments import seconds
from .client import DEFAULT_HOST, DEFAULT_PORT, parse_address
from .console import Console, history_path, interactive, one_shot, script


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, not argparse's usage block: the usage is one ``--help`` away."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be from 1 to 65535, got {port}")
    return port


# Settings that also come from the environment (an empty variable counts as unset, as for vmserver).
_FROM_ENV: list[tuple[str, str, Callable[[str], object], object]] = [
    ("host", "VMSERVER_HOST", _text, DEFAULT_HOST),
    ("port", "VMSERVER_PORT", _port, DEFAULT_PORT),
    ("token_file", "VMSERVER_TOKEN_FILE", _text, None),
]


def _parser() -> _Parser:
    parser = _Parser(
        prog="vmclient",
        description="Console for vmserver. With a COMMAND, runs it and exits; with stdin not a terminal, "
        "runs one command per line; otherwise interactive. 'vmclient demo --help' for the fleet demo.",
        epilog="Commands use protocol.md's inline form: add_vm vm_id=vm-1 ram=2048 cpu=2 "
        "disks='[{\"disk_id\":\"disk-1\",\"size\":500}]'. The console's own: 'watch [EVENT ...] [vm_id=ID]' prints live "
        "events until Ctrl-C (exit 0; 2 if the connection ends), 'history [VM_ID] [event=NAME] [limit=N]' the history. "
        "Exit status: 0 ok, 1 command error, 2 connection error or bad setting.",
    )
    parser.add_argument("--host", type=_text, action="append", metavar="HOST[:PORT]",
                        help=f"server address (default {DEFAULT_HOST}), with its own port or --port's; "
                        "give it again, or comma-separated, for several servers, tried in turn "
                        "([IPv6]:PORT for IPv6 with a port) [VMSERVER_HOST, comma-separated]")
    parser.add_argument("--port", type=_port, help=f"server port (default {DEFAULT_PORT}) [VMSERVER_PORT]")
    parser.add_argument("--json", action="store_true",
                        help="print raw JSON results (the default when stdout is not a terminal)")
    parser.add_argument("--timeout", type=seconds, default=60.0,
                        help="seconds each command may take, sending included (default 60)")
    parser.add_argument("--no-history", action="store_true", help="do not read or write the history file")
    parser.add_argument("--token-file", metavar="PATH", type=_text,
                        help="file whose first line is the server's token [VMSERVER_TOKEN_FILE]; "
                        "or set VMSERVER_TOKEN (a token is never taken from the command line)")
    parser.add_argument("--tls", action="store_true", help="speak TLS to the server")
    parser.add_argument("--cafile", metavar="PEM", type=_text,
                        help="CA or self-signed certificate to trust (implies --tls)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="a command and its key=value arguments")
    return parser


def _read_token(path: str) -> str:
    """The token file's first line, refused as vmserver refuses it (unreadable or empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read token file {path}: {exc}") from None
    if not token:
        raise argparse.ArgumentTypeError(f"token file {path} is empty")
    return token


def _addresses(texts: Sequence[str], port: int) -> list[tuple[str, int]]:
    """Each text split at commas into addresses, each with its own port or ``port``."""
    out = []
    for text in texts:
        for entry in text.split(","):
            if not entry.strip():
                raise argparse.ArgumentTypeError(f"empty address in {text!r}")
            try:
                out.append(parse_address(entry, port))
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
    return out


def _settings(argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
    """Flags over environment over defaults, each checked; exits with status 2 and one line on a bad one.
    Adds ``hosts`` (every (host, port) to try, in order), ``token`` and ``tls`` (False, or a ready
    SSLContext)."""
    parser = _parser()
    args = parser.parse_args(argv)
    host_from = "--host" if args.host is not None else "environment variable VMSERVER_HOST"
    for name, env, check, default in _FROM_ENV:
        if getattr(args, name) is None:
            value = environ.get(env)
            try:
                setattr(args, name, check(value) if value else default)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"environment variable {env}: {exc}")
    try:
        args.hosts = _addresses(args.host if isinstance(args.host, list) else [args.host], args.port)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{host_from}: {exc}")
    args.token = environ.get("VMSERVER_TOKEN") or None
    if args.token_file:
        try:
            args.token = _read_token(args.token_file)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if args.token is not None and not args.token.strip():
        parser.error("the token (VMSERVER_TOKEN) is empty: give a real one, or none at all")
    tls: bool | ssl.SSLContext = False
    if args.tls or args.cafile:
        try:  # read the CA file now, so a bad one is a usage error rather than a failed connect
            tls = ssl.create_default_context(cafile=args.cafile)
        except OSError as exc:  # ssl.SSLError is one too
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            parser.error(f"cannot use CA file {args.cafile}: {reason}" if args.cafile else f"cannot set up TLS: {reason}")
    args.tls = tls
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    try:
        args = _settings(argv, os.environ)
    except SystemExit as exc:  # argparse: a bad setting is status 2, --help is 0
        return int(exc.code or 0)
    as_json = args.json or not sys.stdout.isatty()
    console = Console(hosts=args.hosts, as_json=as_json, timeout=args.timeout, token=args.token, tls=args.tls)
    with asyncio.Runner() as runner:
        if args.command:
            return one_shot(console, runner, args.command)
        if not sys.stdin.isatty():
            return script(console, runner, sys.stdin)
        try:
            history = None if args.no_history else history_path()
        except RuntimeError:  # no home directory to keep it in
            history = None
        return interactive(console, runner, history)


if __name__ == "__main__":
    sys.exit(main())
