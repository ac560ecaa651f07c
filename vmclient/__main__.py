"""Command line: ``vmclient`` / ``python -m vmclient``: the console, one-shot commands, and ``demo``.

Exit status: 0 success, 1 a command error, 2 a connection error (or bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from .client import DEFAULT_PORT
from .console import Console, history_path, interactive, one_shot, script


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmclient",
        description="Console for vmserver. With a COMMAND, runs it and exits; with stdin not a terminal, "
        "runs one command per line; otherwise interactive. 'vmclient demo --help' for the fleet demo.",
        epilog="Commands use protocol.md's inline form: add_vm vm_id=vm-1 ram=2048 cpu=2 "
        "disks='[{\"disk_id\":\"disk-1\",\"size\":500}]'. The console's own: 'watch [EVENT ...] [vm_id=ID]' prints live "
        "events until Ctrl-C (exit 0; 2 if the connection ends), 'history [VM_ID] [event=NAME] [limit=N]' the history. "
        "Exit status: 0 ok, 1 command error, 2 connection error.",
    )
    parser.add_argument("--host", default=os.environ.get("VMSERVER_HOST", "127.0.0.1"),
                        help="server address (default %(default)s) [VMSERVER_HOST]")
    parser.add_argument("--port", type=int, default=int(os.environ.get("VMSERVER_PORT") or DEFAULT_PORT),
                        help="server port (default %(default)s) [VMSERVER_PORT]")
    parser.add_argument("--json", action="store_true",
                        help="print raw JSON results (the default when stdout is not a terminal)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply (default 60)")
    parser.add_argument("--no-history", action="store_true", help="do not read or write the history file")
    parser.add_argument("--token-file", metavar="PATH", default=os.environ.get("VMSERVER_TOKEN_FILE"),
                        help="file whose first line is the server's token [VMSERVER_TOKEN_FILE]; "
                        "or set VMSERVER_TOKEN (a token is never taken from the command line)")
    parser.add_argument("--tls", action="store_true", help="speak TLS to the server")
    parser.add_argument("--cafile", metavar="PEM", help="CA or self-signed certificate to trust (implies --tls)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="a command and its key=value arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: bad usage is status 2, --help is 0
        return int(exc.code or 0)
    as_json = args.json or not sys.stdout.isatty()
    token = os.environ.get("VMSERVER_TOKEN") or None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.readline().strip() or None
        except OSError as exc:
            print(f"error: cannot read token file: {exc}", file=sys.stderr)
            return 2
    console = Console(args.host, args.port, as_json=as_json, timeout=args.timeout, token=token,
                      tls=args.tls or bool(args.cafile), cafile=args.cafile)
    with asyncio.Runner() as runner:
        if args.command:
            return one_shot(console, runner, args.command)
        if not sys.stdin.isatty():
            return script(console, runner, sys.stdin)
        return interactive(console, runner, None if args.no_history else history_path())


if __name__ == "__main__":
    sys.exit(main())
