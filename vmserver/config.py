"""Configuration: command-line flags over environment variables over defaults, in one object."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
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
    host: str = "127.0.0.1"  # loopback unless told otherwise: exposing it should be a decision
    port: int = 8888
    db: str = field(default_factory=default_db_path, repr=False)  # a DSN may carry a password
    max_line: int = DEFAULT_MAX_LINE
    log_level: str = "INFO"
    idle_timeout: float = 3600.0  # seconds without a request before a session is closed; 0: never
    write_timeout: float = 30.0  # seconds a session may leave its replies unread before it is dropped
    max_connections: int | None = None  # None: as many as the open-file limit allows (see limits.py)
    local_reserve: int = 16  # sessions past the cap kept for peers on this machine (an operator)
    token: str | None = field(default=None, repr=False)  # shared secret; None: no authentication
    tls_cert: str | None = None
    tls_key: str | None = None
    require_passwords: bool = False
    max_write_batch: int = 256  # writes committed together (one fsync); 1: a commit per write
    history_days: float = 90.0  # history older than this is pruned; 0: kept forever
    console: bool = False  # also take commands from stdin, when it is a terminal
    busy_timeout_ms: int = 5000  # how long a write waits for another process's lock
    shutdown_grace: float = 10.0  # seconds in-flight commands get to finish on shutdown
    auth_failures_allowed: int = 5  # per VM, before authorize_vm attempts are slowed down
    lease_ttl: float = 15.0  # PostgreSQL: a server silent this long is lost, and its VMs released
    http_port: int | None = None  # also serve the HTTP API (http_api.py); None: off
    http_session_ttl: float = 60.0  # seconds without a request before an HTTP session ends


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _at_least(minimum: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
        return value

    return check


_positive, _count = _at_least(1), _at_least(0)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _ttl(text: str) -> float:
    value = _non_negative(text)
    if value < 1:  # renewals every TTL/3 need a few round trips of slack
        raise argparse.ArgumentTypeError(f"must be at least 1 second: {value}")
    return value


def _seconds(text: str) -> float:
    value = _non_negative(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {value}")
    return value


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a yes/no value: {text!r}")


def _level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r} (choose from {', '.join(LOG_LEVELS)})")
    return level


def _text(value: str) -> str:
    return value


# flag, environment variable, type check, help. Defaults come from Config; a check of None
# marks a yes/no flag.
_OPTIONS = [
    ("--host", "VMSERVER_HOST", _text, "address to listen on (default %s: loopback only)"),
    ("--port", "VMSERVER_PORT", _port, "TCP port (default %s; 0 picks a free one)"),
    ("--db", "VMSERVER_DB", _text, "SQLite file (default %s; ':memory:' keeps nothing), or a PostgreSQL DSN "
     "postgresql://USER@HOST:PORT/DBNAME (needs: pip install 'vmserver[postgres]')"),
    ("--max-line", "VMSERVER_MAX_LINE", _positive, "longest request line accepted, in bytes (default %s)"),
    ("--log-level", "VMSERVER_LOG_LEVEL", _level, "DEBUG, INFO, WARNING or ERROR (default %s)"),
    ("--idle-timeout", "VMSERVER_IDLE_TIMEOUT", _non_negative,
     "close a session that sends nothing for this many seconds (default %s; 0: never)"),
    ("--write-timeout", "VMSERVER_WRITE_TIMEOUT", _non_negative,
     "drop a session that leaves its replies unread this many seconds (default %s)"),
    ("--max-connections", "VMSERVER_MAX_CONNECTIONS", _positive,
     "sessions served at once; more are refused with one error line (default: what the open-file "
     "limit allows, up to 100000)"),
    ("--local-reserve", "VMSERVER_LOCAL_RESERVE", _count,
     "sessions past --max-connections kept for peers on this machine (loopback), so an operator "
     "can always get in (default %s)"),
    ("--token", "VMSERVER_TOKEN", _text,
     "shared token every session must present with 'auth' (default: none; prefer --token-file)"),
    ("--tls-cert", "VMSERVER_TLS_CERT", _text, "PEM certificate (chain): serve TLS instead of plain TCP"),
    ("--tls-key", "VMSERVER_TLS_KEY", _text, "PEM private key of --tls-cert"),
    ("--max-write-batch", "VMSERVER_MAX_WRITE_BATCH", _positive,
     "writes that may share one transaction and fsync (default %s; 1: a commit per write)"),
    ("--history-days", "VMSERVER_HISTORY_DAYS", _non_negative,
     "keep this many days of history (get_history) (default %s; 0: forever)"),
    ("--lease-ttl", "VMSERVER_LEASE_TTL", _ttl,
     "PostgreSQL, several servers: a server that cannot renew its lease for this many seconds has "
     "lost it (its sessions are closed first) and its VMs are disconnected (default %s)"),
    ("--http-port", "VMSERVER_HTTP_PORT", _port,
     "also serve the HTTP API on this port, same --host and TLS (default: off; 0 picks a free one; "
     "needs: pip install 'vmserver[http]'; see docs/http.md)"),
    ("--http-session-ttl", "VMSERVER_HTTP_SESSION_TTL", _seconds,
     "an HTTP session without a request for this many seconds ends, its VMs disconnected (default %s)"),
    ("--require-passwords", "VMSERVER_REQUIRE_PASSWORDS", None,
     "every VM must have a password (add_vm, connect_vm without one are refused)"),
]


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmserver",
        description="Virtual machine inventory and presence server (line-delimited JSON over TCP).",
        epilog="Each setting can also come from its environment variable: "
        + ", ".join(env for _, env, _, _ in _OPTIONS) + ", VMSERVER_TOKEN_FILE; flags win. "
        "Protocol: see protocol.md. To move an inventory between databases: vmserver copy SRC DST "
        "(vmserver copy --help).",
    )
    for flag, env, check, text in _OPTIONS:
        default = getattr(defaults, _field(flag))
        shown = text % default if "%s" in text else text
        if check is None:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=f"{shown} [{env}]")
        else:
            parser.add_argument(flag, type=check, default=None, help=f"{shown} [{env}]")
    parser.add_argument("--console", action="store_true",
                        help="also read commands from this terminal, answered like vmclient's console")
    parser.add_argument("--token-file", metavar="PATH", default=None,
                        help="read the token from this file (first line) [VMSERVER_TOKEN_FILE]")
    parser.add_argument("--version", action="version", version=f"vmserver {__version__} (protocol 1)")
    return parser


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read token file {path}: {exc}") from None
    if not token:
        raise argparse.ArgumentTypeError(f"token file {path} is empty")
    return token


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
                value = (check or _flag)(environ[env])
            except argparse.ArgumentTypeError as exc:
                parser.error(f"environment variable {env}: {exc}")
        values[name] = getattr(defaults, name) if value is None else value
    token_file = ns.token_file or (None if ns.token else environ.get("VMSERVER_TOKEN_FILE"))
    if token_file:
        try:
            values["token"] = _read_token(token_file)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if values["token"] is not None and not values["token"].strip():
        parser.error("the token is empty: give a real one, or none at all")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        parser.error("--tls-cert and --tls-key go together")
    return Config(**values, console=ns.console)
