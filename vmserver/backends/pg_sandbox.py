"""A throwaway PostgreSQL cluster for tests, benchmarks and ``make run-postgres``.

Standard library only, and runnable as a plain script (``python3 vmserver/backends/pg_sandbox.py
bin-dir``), so CI can ask whether PostgreSQL is installed before anything is. The cluster
listens on 127.0.0.1 only and trusts every local connection: a sandbox, never a home for real
data. It is driven through PostgreSQL's own programs (initdb, pg_ctl, psql), so neither the
sandbox nor its tests need a Python driver.

PostgreSQL refuses to run as root. As root, initdb, pg_ctl and the server run as the
``postgres`` user (``runuser -u postgres --``) and own their directories. When that user
cannot reach ``root`` (pytest's temporary directories are private to root), the data lives
in a private directory under /tmp instead, ``root/data`` is a link to it, and
:meth:`Sandbox.cleanup` removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

LIB_DIR = Path("/usr/lib/postgresql")  # Debian keeps each version's programs in LIB_DIR/<version>/bin
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections
STOP_TIMEOUT = 30
PSQL_TIMEOUT = 60.0
INSTALL_HINT = "install Debian's postgresql package (apt-get install postgresql)"
HOST = "127.0.0.1"
STOP_MODES = ("smart", "fast", "immediate")

# Lines of the server's log that mean another process holds the port (picked free, taken since).
_PORT_TAKEN = re.compile(r"could not bind IPv4 address|could not create any TCP/IP sockets")
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_INCLUDE = "include_if_exists = 'sandbox.conf'"


class SandboxError(Exception):
    """The sandbox could not do what was asked; the message carries PostgreSQL's own words."""


# --- finding PostgreSQL's programs ---------------------------------------------------------


def _runs(program: Path | str) -> bool:
    """``program --version`` works and says it is PostgreSQL's (a broken link or wrapper does not)."""
    try:
        done = subprocess.run([str(program), "--version"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=10, cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and b"(PostgreSQL)" in done.stdout


def _psql_for(bin_dir: Path, path: str | None = None) -> Path | None:
    """psql beside the server's programs, else the one on ``path``."""
    for candidate in (bin_dir / "psql", shutil.which("psql", path=path)):
        if candidate and _runs(candidate):
            return Path(candidate)
    return None


def _version_key(directory: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", directory.name))


def _candidates(path: str | None, lib_dir: Path) -> list[Path]:
    found: list[Path] = []
    for tool in ("initdb", "pg_ctl"):
        where = shutil.which(tool, path=path)
        if where:
            found.append(Path(os.path.realpath(where)).parent)  # a symlink: the real directory
            found.append(Path(where).parent)  # a wrapper script that execs the real program
    try:
        versions = sorted((d for d in lib_dir.iterdir() if (d / "bin").is_dir()), key=_version_key, reverse=True)
    except OSError:
        versions = []
    found.extend(d / "bin" for d in versions)
    return list(dict.fromkeys(found))


def find_bin_dir(path: str | None = None, lib_dir: Path | None = None) -> Path | None:
    """The directory of PostgreSQL's initdb, pg_ctl and postgres, each of which runs (psql
    beside them or on ``path``), or None.

    First where ``path`` (default: $PATH) finds initdb or pg_ctl, symlinks followed; else the
    newest ``/usr/lib/postgresql/<version>/bin`` (``lib_dir``).
    """
    for directory in _candidates(path, LIB_DIR if lib_dir is None else lib_dir):
        if all(_runs(directory / tool) for tool in SERVER_TOOLS) and _psql_for(directory, path):
            return directory
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (start() retries if it is taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- processes ---------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of a live process, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    state = fields[0].decode()
    if state in ("Z", "X"):  # a zombie is dead; here PID 1 may never reap it
        return None
    return state, int(fields[1]), int(fields[2])


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pid:
                found.append(int(entry))
    return found


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Sandbox:
    """A throwaway PostgreSQL cluster under ``root``: data in root/data, log in root/postgres.log.

    ``port`` None picks a free one. ``durable=False`` turns fsync and full-page writes off (tests:
    a crash of the machine may lose the cluster, which is thrown away anyway); commits still wait
    for the WAL write. ``settings`` go into the server's configuration after the sandbox's own.
    ``with Sandbox(root) as pg:`` inits and starts it, and stops it and removes its temporary
    directories on exit. ``root`` and what is in it stay: an initialised root is reused.
    """

    def __init__(self, root: Path, port: int | None = None, durable: bool = True,
                 settings: dict[str, str] | None = None, *, bin_dir: Path | None = None) -> None:
        self.root = Path(root).absolute()
        self.durable = durable
        self.settings = dict(settings or {})
        for name, value in self.settings.items():
            if not _SETTING_NAME.fullmatch(name) or "\n" in str(value):
                raise ValueError(f"bad PostgreSQL setting {name!r} = {value!r}")
        self.bin_dir = bin_dir if bin_dir is not None else find_bin_dir()
        if self.bin_dir is None:
            raise SandboxError(f"PostgreSQL's programs (initdb, pg_ctl) are neither on PATH nor in "
                               f"{LIB_DIR}/*/bin: {INSTALL_HINT}")
        psql = _psql_for(self.bin_dir)
        if psql is None:
            raise SandboxError(f"no psql beside {self.bin_dir} nor on PATH: {INSTALL_HINT}")
        self.psql_path = psql
        self._auto_port = port is None
        self._port = free_port() if port is None else port
        self._started = False  # once started, the port is the cluster's: never re-picked
        self.data_dir = self.root / "data"  # the real directory once init() has placed it
        self.log_file = self.root / "postgres.log"
        self.socket_dir: Path | None = None  # a short directory under /tmp, made by start()
        self._made: list[Path] = []  # temporary directories cleanup() removes
        self._owner: tuple[int, int] | None = None  # (uid, gid) of postgres when we are root
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise SandboxError("PostgreSQL refuses to run as root and there is no postgres user "
                                   f"to run it as: {INSTALL_HINT}") from None
            self._owner = (user.pw_uid, user.pw_gid)

    # --- where things are ---

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def initialised(self) -> bool:
        return (self.root / "data" / "PG_VERSION").is_file()

    @property
    def outside_root(self) -> bool:
        """The data lives in a temporary directory (root cannot be reached by the postgres user)."""
        return self.data_dir.parent != self.root

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs (from postmaster.pid), else None.

        A live process of that pid is the postmaster only if it works in the data directory (it
        chdirs there): after a reboot a kept postmaster.pid may name somebody else's process.
        """
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        if _proc_stat(pid) is None:
            return None
        try:
            return pid if os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(self.data_dir) else None
        except OSError:
            return None  # gone since, or not ours to look at: not our server either way

    @property
    def running(self) -> bool:
        return self.pid is not None

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        """``postgresql://user[:password]@127.0.0.1:PORT/dbname``, each part percent-encoded."""
        secret = "" if password is None else ":" + quote(password, safe="")
        return f"postgresql://{quote(user, safe='')}{secret}@{HOST}:{self._port}/{quote(dbname, safe='')}"

    # --- running PostgreSQL's programs ---

    def _env(self) -> dict[str, str]:
        # The caller's PG* variables (PGDATABASE, PGOPTIONS, PGSSLMODE…) must not steer the sandbox;
        # the C locale keeps the log's messages in the words _PORT_TAKEN looks for.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _as_postgres(self, args: Sequence[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self._owner else list(args)

    def _give(self, path: Path) -> None:
        if self._owner:
            os.chown(path, *self._owner)

    def _tool(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _run(self, args: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        # cwd "/": the postgres user may not be allowed into the caller's working directory.
        try:
            return subprocess.run(self._as_postgres(args), stdin=subprocess.DEVNULL, cwd="/",
                                  env=self._env(), timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"{Path(args[0]).name} did not finish within {timeout:g} s") from exc

    def _reachable(self, path: Path) -> bool:
        """The postgres user may go through every directory down to ``path``."""
        done = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(path)],
                              stdin=subprocess.DEVNULL, capture_output=True, cwd="/", timeout=10)
        return done.returncode == 0

    def _temp_dir(self) -> Path:
        # Short on purpose: a unix socket's path must fit in ~107 bytes.
        made = Path(tempfile.mkdtemp(prefix="pgs", dir="/tmp"))
        self._made.append(made)
        self._give(made)
        return made

    # --- lifecycle ---

    def init(self) -> None:
        """initdb, unless root/data already holds a cluster (whose data is then kept)."""
        self.root.mkdir(parents=True, exist_ok=True)
        link = self.root / "data"
        if self.initialised:
            self.data_dir = Path(os.path.realpath(link))
            return
        if link.is_symlink():  # to a temporary directory removed since
            link.unlink()
        if self._owner and not self._reachable(self.root):
            self.data_dir = self._temp_dir() / "data"
            link.symlink_to(self.data_dir)
        else:
            self.data_dir = link
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._give(self.data_dir)
        args = [self._tool("initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                "-E", "UTF8", "--no-locale"]
        if not self.durable:
            args.append("--no-sync")
        done = self._run(args, timeout=120, capture_output=True, text=True)
        if done.returncode != 0:
            raise SandboxError(f"initdb failed (exit {done.returncode}):\n{_tail(done.stdout + done.stderr)}")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"\n# pg_sandbox's settings (rewritten before each start)\n{_INCLUDE}\n")

    def _write_settings(self) -> None:
        switch = "on" if self.durable else "off"
        values = {
            "port": str(self._port),
            "listen_addresses": HOST,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "300",
            "fsync": switch,
            "full_page_writes": switch,
            "synchronous_commit": "on",
            **{k: str(v) for k, v in self.settings.items()},
        }
        conf = self.data_dir / "sandbox.conf"
        conf.write_text("".join(f"{k} = {_quote_literal(v)}\n" for k, v in values.items()))
        self._give(conf)
        main = self.data_dir / "postgresql.conf"
        if _INCLUDE not in main.read_text():  # a cluster made by someone else
            with open(main, "a") as f:
                f.write(f"\n{_INCLUDE}\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections (init() first if needed).

        :raises SandboxError: with the end of the server's log, when it does not start in time.
        """
        if self.running:
            return
        if not self.initialised:
            self.init()
        self.data_dir = Path(os.path.realpath(self.root / "data"))
        if self.socket_dir is None or not self.socket_dir.is_dir():
            self.socket_dir = self._temp_dir()
        # No server works in the data directory (running said so): a postmaster.pid left there
        # (a reboot, a kill) is stale, and PostgreSQL would refuse to start while its pid lives.
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "postmaster.pid").unlink()
        for attempt in range(5):
            self._write_settings()
            taken = self._start_once()
            if not taken:
                self._started = True
                return
            if not self._auto_port or self._started or attempt == 4:
                raise SandboxError(f"PostgreSQL could not listen on {HOST}:{self._port}:\n{taken}")
            self._port = free_port()

    def _start_once(self) -> str:
        """'' once started; the log's tail when the port was taken. :raises SandboxError: else."""
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # Without -l the server writes to pg_ctl's stdout, a file we opened: the log needs no
        # permission for the postgres user in root.
        with open(self.log_file, "ab") as log:
            done = self._run([self._tool("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", str(START_TIMEOUT),
                              "start"], timeout=START_TIMEOUT + 15, stdout=log, stderr=log)
        if done.returncode == 0:
            return ""
        with open(self.log_file, "rb") as log:
            log.seek(offset)
            tail = _tail(log.read().decode(errors="replace"))
        self.kill()  # pg_ctl gave up waiting: the server may still be coming up
        if _PORT_TAKEN.search(tail):
            return tail
        raise SandboxError(f"PostgreSQL did not start (pg_ctl exit {done.returncode}); "
                           f"{self.log_file} ends with:\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl -m ``mode``: smart, fast or immediate) and wait until it is gone."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(STOP_MODES)}, not {mode!r}")
        if not self.running:
            return
        done = self._run([self._tool("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                          "-t", str(STOP_TIMEOUT), "stop"],
                         timeout=STOP_TIMEOUT + 15, capture_output=True, text=True)
        if done.returncode != 0 and self.running:
            raise SandboxError(f"pg_ctl stop -m {mode} failed (exit {done.returncode}):\n"
                               f"{_tail(done.stdout + done.stderr)}")

    def restart(self, mode: str = "fast") -> None:
        """Stop (``mode``) and start again, on the same port and data."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of the cluster (a crash), and wait until
        they are gone; start() then recovers from the WAL.

        Its lock files (postmaster.pid, the socket's) go too once they are: a killed postmaster
        may stay a zombie for a while (PID 1 reaps lazily in some containers), which a new one
        would take for a live server.
        """
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)  # no new children while we look for them
        # Each child leads its own process group (the postmaster signals a child's group): the
        # group takes the child's own children (an archive command…) with it.
        children = _children(pid)
        for victim in (pid, *children):
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_proc_stat(p) is not None for p in (pid, *children)):
            if time.monotonic() > deadline:
                raise SandboxError(f"PostgreSQL's processes (postmaster {pid}) outlived SIGKILL for 10 s")
            time.sleep(0.01)
        locks = [self.data_dir / "postmaster.pid"]
        if self.socket_dir is not None:
            locks.append(self.socket_dir / f".s.PGSQL.{self._port}.lock")
        for lock in locks:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def cleanup(self) -> None:
        """Stop the server (killing it when a stop fails) and remove the temporary directories
        this sandbox made: the socket's and, when root was out of the postgres user's reach, the data."""
        try:
            if self.running:
                try:
                    self.stop("fast")
                except SandboxError:
                    self.kill()
        finally:
            for made in self._made:
                shutil.rmtree(made, ignore_errors=True)
            self._made.clear()
            self.socket_dir = None
            link = self.root / "data"
            if link.is_symlink() and not link.exists():
                link.unlink()

    def __enter__(self) -> Sandbox:
        try:
            self.init()
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    # --- SQL through psql ---

    def psql(self, sql: str, db: str = "postgres", timeout: float = PSQL_TIMEOUT) -> str:
        """Run ``sql`` (one or more statements, each in its own transaction, stopping at the first
        error) as the postgres superuser in database ``db``; its output, rows unaligned, no headers.

        :raises SandboxError: with psql's stderr when a statement fails or psql cannot connect.
        """
        # -d with "=" in it is a conninfo string: a database name of any spelling stays a name.
        conninfo = "dbname='" + db.replace("\\", "\\\\").replace("'", "\\'") + "'"
        args = [str(self.psql_path), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST,
                "-p", str(self._port), "-U", "postgres", "-d", conninfo, "-f", "-"]
        env = {**self._env(), "PGCLIENTENCODING": "UTF8", "PGCONNECT_TIMEOUT": "10"}
        try:
            done = subprocess.run(args, input=sql.encode(), capture_output=True, env=env, cwd="/",
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"psql on database {db!r} did not finish within {timeout:g} s") from exc
        if done.returncode != 0:
            raise SandboxError(f"psql on database {db!r} failed (exit {done.returncode}): "
                               f"{done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode()

    def create_database(self, name: str | None = None) -> str:
        """CREATE DATABASE ``name`` (a unique one when None); its DSN."""
        name = name if name is not None else f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f"CREATE DATABASE {_quote_ident(name)}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE … WITH (FORCE): its sessions are ended first. Gone already is fine."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def terminate(self, dbname: str) -> int:
        """pg_terminate_backend() every client session in ``dbname`` (but psql's own), waiting up
        to 5 s for each to end; how many ended."""
        out = self.psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            f" WHERE datname = {_quote_literal(dbname)} AND backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()")
        return int(out.strip())


# --- command line: make run-postgres ------------------------------------------------------


def run(directory: Path, command: str | None, server_args: Sequence[str]) -> int:
    """PostgreSQL under ``directory`` (kept between runs), database ``vmserver`` in it, and the
    server in the foreground with ``--db DSN``; PostgreSQL stops when the server exits, however it
    exits. SIGINT and SIGTERM go to the server. The server's exit code (128+N after signal N)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        print(f"pg_sandbox: PostgreSQL's programs (initdb, pg_ctl) are neither on PATH nor in "
              f"{LIB_DIR}/*/bin: {INSTALL_HINT}", file=sys.stderr)
        return 1
    signals = (signal.SIGINT, signal.SIGTERM)
    pending: list[int] = []
    child: subprocess.Popen | None = None

    def on_signal(signum: int, frame: object) -> None:
        # Before the server runs, a signal waits for the step in progress (an interrupted initdb
        # would leave a half-made cluster behind); then it ends the run.
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in signals}
    pg = Sandbox(directory, durable=True, bin_dir=bin_dir)
    try:
        for step in (pg.init, pg.start):
            step()
            if pending:
                return 128 + pending[0]
        if pg.outside_root:
            print(f"pg_sandbox: the postgres user cannot reach {pg.root}; this run's data is in "
                  f"{pg.data_dir} and is removed at exit (use --dir somewhere it can reach)", file=sys.stderr)
        if not pg.psql("SELECT 1 FROM pg_database WHERE datname = 'vmserver'").strip():
            pg.create_database("vmserver")
        dsn = pg.dsn("vmserver")
        print(f"PostgreSQL ready: {dsn} (data: {pg.data_dir}, log: {pg.log_file})", flush=True)
        if pending:
            return 128 + pending[0]
        argv = shlex.split(command) if command else [sys.executable, "-m", "vmserver"]
        try:
            started = subprocess.Popen([*argv, "--db", dsn, *server_args])
        except OSError as exc:
            print(f"pg_sandbox: cannot run {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
            return 127
        child = started
        for signum in pending:  # arrived while the server was being started
            started.send_signal(signum)
        code = started.wait()
        return code if code >= 0 else 128 - code
    except SandboxError as exc:
        print(f"pg_sandbox: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in signals:  # a second Ctrl-C must not cut the stop of PostgreSQL short
            signal.signal(s, signal.SIG_IGN)
        try:
            pg.cleanup()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, server_args = args[:cut], args[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m vmserver.backends.pg_sandbox",
                                     description="A throwaway PostgreSQL on 127.0.0.1 (trusts every local connection).")
    actions = parser.add_subparsers(dest="action", required=True)
    run_parser = actions.add_parser(
        "run", help="PostgreSQL under --dir, and vmserver on it in the foreground",
        usage="%(prog)s [--dir DIR] [--command CMD] [-- SERVER_ARGS...]")
    run_parser.add_argument("--dir", type=Path, default=Path(".pgdata"),
                            help="the cluster's directory, kept between runs (default .pgdata)")
    run_parser.add_argument("--command", default=None,
                            help="the server command, given --db DSN and the arguments after -- "
                                 "(default: this Python's -m vmserver)")
    actions.add_parser("bin-dir", help="print the directory of PostgreSQL's programs; exit 1 without one")
    options = parser.parse_args(args)
    if options.action == "bin-dir":
        found = find_bin_dir()
        if found is None:
            print(f"pg_sandbox: no PostgreSQL programs found: {INSTALL_HINT}", file=sys.stderr)
            return 1
        print(found)
        return 0
    return run(options.dir, options.command, server_args)


if __name__ == "__main__":
    sys.exit(main())
