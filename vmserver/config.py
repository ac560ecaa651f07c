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


def _text(value: str) -> str:
    return value


# flag, environment variable, type check, help. Defaults come from Config.
_OPTIONS = [
    ("--host", "VMSERVER_HOST", _text, "address to listen on (default %s; loopback only)"),
    ("--port", "VMSERVER_PORT", _port, "TCP port (default %s; 0 picks a free one)"),
    ("--db", "VMSERVER_DB", _text, "SQLite file (default %s; ':memory:' keeps nothing)"),
    ("--max-line", "VMSERVER_MAX_LINE", _positive, "longest request line accepted, in bytes (default %s)"),
    ("--log-level", "VMSERVER_LOG_LEVEL", _level, "DEBUG, INFO, WARNING or ERROR (default %s)"),
]


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmserver",
        description="Virtual machine inventory and presence server (line-delimited JSON over TCP).",
        epilog="Each setting can also come from its environment variable: "
        + ", ".join(env for _, env, _, _ in _OPTIONS) + "; flags win. Protocol: see protocol.md.",
    )
    for flag, env, check, text in _OPTIONS:
        parser.add_argument(flag, type=check, default=None, help=f"{text % getattr(defaults, _field(flag))} [{env}]")
    parser.add_argument("--version", action="version", version=f"vmserver {__version__} (protocol 1)")
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Flags over environment over defaults; exits with status 2 and a usage line on bad input."""
    defaults = Config(db=default_db_path(environ))
    parser = build_parser(defaults)
    ns = parser.parse_args(argv)
    values = {}
    for flag, env, check, _ in _OPTIONS:
        name = _field(flag)
        value = getattr(ns, name)
        if value is None and environ.get(env):
            try:
                value = check(environ[env])
            except argparse.ArgumentTypeError as exc:
                parser.error(f"environment variable {env}: {exc}")
        values[name] = getattr(defaults, name) if value is None else value
    return Config(**values)
