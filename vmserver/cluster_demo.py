"""``python -m vmserver.cluster_demo --db DSN``: the fleet demo against several servers on one
PostgreSQL database, as one server; what ``make cluster-demo`` runs on a throwaway PostgreSQL.

It starts N servers (``python -m vmserver``) on free loopback ports, runs ``python -m vmclient
demo --servers ...`` against them, then stops the servers; its exit status is the demo's. The
demo is a separate process (the server package does not use the client library), its output
is ours. Each server logs to a file in a temporary directory (a pipe nobody reads fills up and
blocks the server); the files are removed after, and their last lines printed when the demo
did not pass. Every child runs in its own session, so a Ctrl-C reaches it once, from us, in
order: the demo first, then the servers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .backends import is_postgres, mask_dsn

MAX_SERVERS = 16
MAX_VMS = 1000  # the demo's own limit, checked here before any server starts
START_WAIT = 20.0  # seconds a server gets to report that it listens
STOP_WAIT = 10.0  # seconds a child gets to stop on a signal before it is killed
POLL = 0.05  # seconds between looks at a log or a child, so that a signal is acted on soon

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


class _Signals:
    """SIGINT and SIGTERM, remembered (the first one) rather than raised: a signal in the middle
    of starting a child must not lose track of it. The waits below look at ``signum``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]


@dataclass
class _Server:
    """One server process of the demo and its log file."""

    number: int
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _CannotStart(Exception):
    """A server exited or stayed silent before listening."""


def _start(number: int, dsn: str, tmp: Path) -> _Server:
    log_path = tmp / f"server-{number}.log"
    # The servers are configured by these flags alone: a VMSERVER_TOKEN or VMSERVER_TLS_CERT of
    # the caller's environment would lock the demo out, VMSERVER_LOG_LEVEL hide the port.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMSERVER_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmserver", "--port", "0", "--host", "127.0.0.1", "--db", dsn,
             "--log-level", "INFO"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
    return _Server(number, proc, log_path)


def _wait_listening(server: _Server, deadline: float, signals: _Signals) -> None:
    while True:
        text = server.log_path.read_text(errors="replace")
        match = _LISTENING.search(text)
        if match and int(match.group(1)) > 0:
            server.port = int(match.group(1))
            return
        if signals.signum is not None:
            raise _Interrupted(signals.signum)
        last = (text.strip().splitlines()[-1:] or ["(no output)"])[0]
        if server.process.poll() is not None:
            raise _CannotStart(f"server {server.number} exited with status {server.process.returncode} "
                               f"before listening: {last}")
        if time.monotonic() > deadline:
            raise _CannotStart(f"server {server.number} did not report listening within {START_WAIT:g} s: {last}")
        time.sleep(POLL)


def _stop(proc: subprocess.Popen[bytes], what: str, sig: int = signal.SIGTERM) -> None:
    """``sig``, then SIGKILL if ``proc`` has not exited within STOP_WAIT seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            print(f"cluster demo: {what} did not stop within {STOP_WAIT:g} s; killed it", file=sys.stderr)
            proc.kill()
            proc.wait()


def _run_demo(servers: list[_Server], vms: int, signals: _Signals) -> int:
    """``python -m vmclient demo --servers ...``, its output ours; its exit status. A signal of
    ours is passed on to it (once: it runs in its own session) and it gets STOP_WAIT to end."""
    addresses = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    demo = subprocess.Popen([sys.executable, "-m", "vmclient", "demo", "--servers", addresses, "--vms", str(vms)],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                return demo.wait(POLL)
            except subprocess.TimeoutExpired:
                pass
            if signals.signum is not None:
                _stop(demo, "the demo", signals.signum)
                raise _Interrupted(signals.signum)
    finally:
        _stop(demo, "the demo")  # only if something above failed while it ran


def run(dsn: str, servers: int = 2, vms: int = 10) -> int:
    """Start ``servers`` servers on ``dsn``, run the demo against them, stop them; the exit status:
    the demo's (0 passed, 1 a mismatch, 2 cannot connect), 2 when a server cannot start,
    128+N after signal N."""
    tmp = Path(tempfile.mkdtemp(prefix="vmserver-cluster-demo-"))
    started: list[_Server] = []
    with _Signals() as signals:
        try:
            for number in range(1, servers + 1):
                if signals.signum is not None:
                    raise _Interrupted(signals.signum)
                started.append(_start(number, dsn, tmp))
            deadline = time.monotonic() + START_WAIT
            for server in started:
                _wait_listening(server, deadline, signals)
            print(f"cluster demo: {servers} servers on {mask_dsn(dsn)}: "
                  + ", ".join(f"127.0.0.1:{s.port} (pid {s.process.pid})" for s in started), flush=True)
            code = _run_demo(started, vms, signals)
            if code != 0:
                for server in started:
                    print(f"cluster demo: last lines of server {server.number}'s log:\n{server.log_tail()}",
                          file=sys.stderr)
            return code
        except _CannotStart as exc:
            print(f"cluster demo: {exc}", file=sys.stderr)
            return 2
        except _Interrupted as exc:
            print(f"cluster demo: interrupted ({exc}); stopping the servers", file=sys.stderr)
            return 128 + exc.signum
        finally:
            # Signals stay noted, not raised, until every server is stopped (in parallel: each
            # gets STOP_WAIT, not all together).
            for server in started:
                if server.process.poll() is None:
                    server.process.send_signal(signal.SIGTERM)
            for server in started:
                _stop(server.process, f"server {server.number}")
            shutil.rmtree(tmp, ignore_errors=True)


def _count(limit: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be from 1 to {limit}, got {value}")
        return value
    return check


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmserver.cluster_demo",
        description="The fleet demo (vmclient demo --servers) against several vmservers started on one "
        "PostgreSQL database, stopped after.",
        epilog="Exit status: the demo's (0 passed, 1 a mismatch, 2 cannot connect); 2 also when a server "
        "cannot start or for bad usage.")
    parser.add_argument("--db", required=True, metavar="DSN", help="the PostgreSQL database (postgresql://...)")
    parser.add_argument("--servers", type=_count(MAX_SERVERS), default=2, metavar="N",
                        help=f"how many servers, 1 to {MAX_SERVERS} (default 2)")
    parser.add_argument("--vms", type=_count(MAX_VMS), default=10, metavar="K",
                        help=f"how many VM agents, 1 to {MAX_VMS} (default 10)")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
        if not is_postgres(args.db):
            parser.error(f"--db {args.db!r} is not a PostgreSQL DSN: only PostgreSQL is shared by several servers")
    except SystemExit as exc:  # argparse: bad usage is status 2, --help is 0
        return int(exc.code or 0)
    return run(args.db, args.servers, args.vms)


if __name__ == "__main__":
    sys.exit(main())
