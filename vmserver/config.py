"""Configuration: command-line flags over environment variables over defaults, in one object."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .protocol import DEFAULT_MAX_LINE

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_db_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_DATA_HOME/vmserver/vms.db``, falling back to ``~/.local/share/vmserver/vms.db``."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "vmserver" / "vms.db")


@dataclass
class Config:
    host: str = "127.0.0.1"  # loopback unless told otherwise: the protocol has no auth yet
    port: int = 8888
    db: str = field(default_factory=default_db_path)
    max_line: int = DEFAULT_MAX_LINE
    log_level: str = "INFO"
    busy_timeout_ms: int = 5000  # how long a write waits for another process's lock
    shutdown_grace: float = 10.0  # seconds in-flight commands get to finish on shutdown


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r} (choose from {', '.join(LOG_LEVELS)})")
    return level


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmserver",
        description="Virtual machine inventory and presence server (line-delimited JSON over TCP).",
        epilog="Environment: VMSERVER_HOST, VMSERVER_PORT, VMSERVER_DB, VMSERVER_MAX_LINE, "
        "VMSERVER_LOG_LEVEL set the same settings; flags win. Protocol: see protocol.md.",
    )
    defaults = Config()
    parser.add_argument("--host", default=environ.get("VMSERVER_HOST", defaults.host),
                        help="address to listen on (default %(default)s; loopback only)")
    parser.add_argument("--port", type=_port, default=environ.get("VMSERVER_PORT", defaults.port),
                        help="TCP port (default %(default)s; 0 picks a free one)")
    parser.add_argument("--db", default=environ.get("VMSERVER_DB") or default_db_path(environ),
                        help="SQLite file (default %(default)s; ':memory:' keeps nothing)")
    parser.add_argument("--max-line", type=_positive, metavar="BYTES",
                        default=environ.get("VMSERVER_MAX_LINE", defaults.max_line),
                        help="longest request line accepted (default %(default)s)")
    parser.add_argument("--log-level", type=_level, default=environ.get("VMSERVER_LOG_LEVEL", defaults.log_level),
                        help="DEBUG, INFO, WARNING or ERROR (default %(default)s)")
    parser.add_argument("--version", action="version", version=f"vmserver {__version__} (protocol 1)")
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Flags over environment over defaults; exits with status 2 and a usage line on bad input.

    Environment values go through the same type checks as flags (argparse converts string defaults).
    """
    ns = build_parser(environ).parse_args(argv)
    return Config(host=ns.host, port=ns.port, db=ns.db, max_line=ns.max_line, log_level=ns.log_level)
