"""The throwaway PostgreSQL (vmserver/backends/pg_sandbox.py) against PostgreSQL's real programs.

Every cluster a test starts is stopped by its end, and checked gone: no postmaster left on its
data directory (pgrep), no process left in its process group. As root the sandbox runs
PostgreSQL as the postgres user, and both kinds of root are tried: one in pytest's private
temporary directory (the data then lives under /tmp) and one the postgres user can reach.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import need_postgres
from vmserver.backends import pg_sandbox
from vmserver.backends.pg_sandbox import Sandbox, SandboxError, find_bin_dir

pytestmark = pytest.mark.usefixtures("postgres_installed")

WAIT = 15.0  # seconds any one wait in these tests may take
AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def postgres_installed() -> None:
    need_postgres()


def postmasters(data_dir: Path) -> list[int]:
    """pids whose command line names ``data_dir`` (the postmaster: ``postgres -D DIR``)."""
    pattern = "".join(f"[{c}]" if c in ".+*?(){}|$" else c for c in str(data_dir))
    done = subprocess.run(["pgrep", "-f", "--", f"-D {pattern}( |$)"], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr  # 1: none
    return [int(p) for p in done.stdout.split()]


def _stat(pid: int) -> list[bytes]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return []
    fields = stat[stat.rfind(b")") + 2:].split()
    return [] if fields[0] in (b"Z", b"X") else fields  # a zombie is dead


def cluster(pid: int) -> list[int]:
    """The postmaster ``pid`` and its children (checkpointer, backends…), while alive."""
    members = [pid] if _stat(pid) else []
    members += [int(p) for p in os.listdir("/proc") if p.isdigit() and _stat(int(p))[1:2] == [str(pid).encode()]]
    return members


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if _stat(p)]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def sandboxes(tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    """A factory of Sandboxes (default root under tmp_path, durable=False); each is cleaned up
    after the test and checked to have left no process behind."""
    made: list[Sandbox] = []

    def make(root: Path | None = None, **kwargs) -> Sandbox:
        kwargs.setdefault("durable", False)
        pg = Sandbox(root if root is not None else tmp_path / f"pg{len(made)}", **kwargs)
        made.append(pg)
        return pg

    yield make
    for pg in made:
        processes = cluster(pg.pid) if pg.running else []
        pg.cleanup()
        assert postmasters(pg.data_dir) == [] and alive(processes) == []


@pytest.fixture(params=["private", "open"])
def root(request, tmp_path: Path) -> Iterator[Path]:
    """A sandbox root: in pytest's tmp (mode 700 as root: out of the postgres user's reach), or
    a directory under /tmp anyone may pass through."""
    if request.param == "private":
        yield tmp_path / "pg"
        return
    opened = Path(tempfile.mkdtemp(prefix="pgsandbox-test-", dir="/tmp"))
    opened.chmod(0o755)
    yield opened / "pg"
    shutil.rmtree(opened, ignore_errors=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the postgres user can reach, for data that must outlive a run."""
    opened = Path(tempfile.mkdtemp(prefix="pgsandbox-test-", dir="/tmp"))
    opened.chmod(0o755)
    yield opened
    shutil.rmtree(opened, ignore_errors=True)


class Sleepers:
    """psql sessions sitting in ``SELECT pg_sleep(30)``: real second connections."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def open(self, pg: Sandbox, db: str = "postgres") -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(pg.psql_path), "-X", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d", db,
             "-c", "SELECT pg_sleep(30)"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc


@pytest.fixture
def sleepers() -> Iterator[Sleepers]:
    s = Sleepers()
    yield s
    for proc in s.procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def sleeping(pg: Sandbox, db: str) -> int:
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                       f" AND query LIKE 'SELECT pg_sleep%' AND datname = '{db}'").strip())


def ended(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a sleeper to end; (exit code, stderr)."""
    _, err = proc.communicate(timeout=WAIT)
    return proc.returncode, err


# --- finding PostgreSQL's programs ---------------------------------------------------------


def link_tools(into: Path, tools: tuple[str, ...]) -> Path:
    real = find_bin_dir()
    into.mkdir(parents=True)
    for tool in tools:
        (into / tool).symlink_to(real / tool)
    return into


def test_find_bin_dir_gives_programs_that_run():
    found = find_bin_dir()
    assert found is not None
    for tool in ("initdb", "pg_ctl", "postgres", "psql"):
        out = subprocess.run([str(found / tool), "--version"], capture_output=True, text=True, check=True).stdout
        assert "(PostgreSQL)" in out


def test_find_bin_dir_follows_a_symlink_on_path_to_the_real_directory(tmp_path):
    # Only initdb and pg_ctl on PATH (as /usr/local/bin might have): the directory wanted is
    # where they really are, with postgres and psql beside them.
    on_path = link_tools(tmp_path / "path", ("initdb", "pg_ctl"))
    assert find_bin_dir(path=str(on_path), lib_dir=tmp_path / "no-lib") == find_bin_dir()


def test_find_bin_dir_takes_a_directory_of_wrappers_that_run(open_dir, sandboxes):
    real = find_bin_dir()
    wrappers = open_dir / "wrappers"  # the postgres user runs them when we are root
    wrappers.mkdir()
    for tool in ("initdb", "pg_ctl", "postgres", "psql"):
        script = wrappers / tool
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(str(real / tool))} "$@"\n')
        script.chmod(0o755)
    found = find_bin_dir(path=str(wrappers), lib_dir=open_dir / "no-lib")
    assert found == wrappers
    pg = sandboxes(bin_dir=found)
    pg.start()
    assert pg.psql("SELECT 6 * 7").strip() == "42"


def test_find_bin_dir_skips_what_does_not_run_and_takes_the_newest_version(tmp_path):
    broken = tmp_path / "path"
    broken.mkdir()
    (broken / "initdb").symlink_to(tmp_path / "nowhere")  # a dangling link
    failing = broken / "pg_ctl"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    lib = tmp_path / "lib"
    every = ("initdb", "pg_ctl", "postgres", "psql")
    link_tools(lib / "9.6" / "bin", every)
    link_tools(lib / "15" / "bin", every)
    link_tools(lib / "16" / "bin", ("initdb", "pg_ctl"))  # incomplete: no postgres
    (lib / "17").mkdir()  # no bin at all
    # 15 > 9.6 as versions (not as strings); 16 lacks the server.
    assert find_bin_dir(path=str(broken), lib_dir=lib) == lib / "15" / "bin"


def test_find_bin_dir_none_without_programs(tmp_path):
    (tmp_path / "lib").mkdir()
    assert find_bin_dir(path="", lib_dir=tmp_path / "lib") is None
    assert find_bin_dir(path=str(tmp_path), lib_dir=tmp_path / "absent") is None


# --- start, settings, psql ---------------------------------------------------------------


def test_start_applies_settings_and_psql_round_trips(tmp_path, sandboxes):
    long_root = tmp_path / ("r" * 120)  # far too long for a unix socket path under it
    pg = sandboxes(long_root, settings={"work_mem": "7MB"})
    pg.start()
    assert pg.running and pg.host == "127.0.0.1"
    shown = {name: pg.psql(f"SHOW {name}").strip() for name in
             ("port", "listen_addresses", "max_connections", "fsync", "full_page_writes",
              "synchronous_commit", "work_mem", "server_encoding")}
    assert shown == {"port": str(pg.port), "listen_addresses": "127.0.0.1", "max_connections": "300",
                     "fsync": "off", "full_page_writes": "off", "synchronous_commit": "on",
                     "work_mem": "7MB", "server_encoding": "UTF8"}
    out = pg.psql("CREATE TABLE t (id int, name text);"
                  " INSERT INTO t VALUES (1, 'ünï'), (2, 'b|c');"
                  " SELECT id, name FROM t ORDER BY id;")
    assert out == "1|ünï\n2|b|c\n"
    # The unix socket works too, in a directory short enough for one.
    socket_path = pg.socket_dir / f".s.PGSQL.{pg.port}"
    assert len(str(socket_path)) < 100 and socket_path.is_socket()
    via_socket = subprocess.run([str(pg.psql_path), "-X", "-A", "-t", "-h", str(pg.socket_dir), "-p", str(pg.port),
                                 "-U", "postgres", "-c", "SELECT count(*) FROM t"],
                                capture_output=True, text=True, timeout=WAIT)
    assert via_socket.stdout.strip() == "2", via_socket.stderr
    assert (long_root / "postgres.log").is_file()


def test_durable_by_default(sandboxes):
    pg = sandboxes(durable=True)
    pg.start()
    assert [pg.psql(f"SHOW {name}").strip() for name in ("fsync", "full_page_writes")] == ["on", "on"]


def test_psql_stops_at_the_first_error_and_says_why(sandboxes):
    pg = sandboxes()
    pg.start()
    with pytest.raises(SandboxError, match='relation "nope" does not exist'):
        pg.psql("SELECT * FROM nope")
    with pytest.raises(SandboxError, match="division by zero"):
        pg.psql("CREATE TABLE a (x int); SELECT 1/0; CREATE TABLE b (x int);")
    # Each statement is its own transaction: a stays, b never ran.
    assert pg.psql("SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'").strip() == "a"
    with pytest.raises(SandboxError, match='database "absent" does not exist'):
        pg.psql("SELECT 1", db="absent")


def test_a_setting_postgresql_refuses_fails_start_with_the_log(sandboxes):
    pg = sandboxes(settings={"shared_buffers": "lots"})
    with pytest.raises(SandboxError, match='invalid value for parameter "shared_buffers"'):
        pg.start()
    assert not pg.running


def test_settings_that_would_break_the_file_are_refused(tmp_path):
    with pytest.raises(ValueError):
        Sandbox(tmp_path / "pg", settings={"work_mem": "1MB\nfsync = off"})
    with pytest.raises(ValueError):
        Sandbox(tmp_path / "pg", settings={"bad name": "1"})


def test_a_given_port_that_is_taken_fails_with_the_log(sandboxes):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        pg = sandboxes(port=port)
        with pytest.raises(SandboxError, match=f"could not listen on 127.0.0.1:{port}(.|\n)*Address already in use"):
            pg.start()
        assert not pg.running and pg.port == port


def test_a_picked_port_taken_before_start_is_picked_again(sandboxes):
    pg = sandboxes()
    first = pg.port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", first))
        holder.listen()
        pg.start()
    assert pg.port != first
    assert pg.psql("SHOW port").strip() == str(pg.port)


# --- databases, sessions -------------------------------------------------------------------


def test_create_and_drop_databases(sandboxes, sleepers):
    pg = sandboxes()
    pg.start()
    one, two = pg.create_database(), pg.create_database()
    assert one != two
    names = [dsn.rsplit("/", 1)[1] for dsn in (one, two)]
    listed = pg.psql("SELECT datname FROM pg_database").split()
    assert set(names) <= set(listed)
    # A name of any spelling: quoted in SQL, percent-encoded in the DSN.
    odd = 'we"ird \'db'
    dsn = pg.create_database(odd)
    assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/we%22ird%20%27db"
    assert pg.psql("SELECT current_database()", db=odd) == odd + "\n"
    through_dsn = subprocess.run([str(pg.psql_path), "-X", "-A", "-t", "-d", dsn, "-c", "SELECT current_database()"],
                                 capture_output=True, text=True, timeout=WAIT)
    assert through_dsn.stdout == odd + "\n", through_dsn.stderr
    with pytest.raises(SandboxError, match="already exists"):
        pg.create_database(odd)
    # Dropped even with a session inside (FORCE ends it); dropping what is gone is no error.
    inside = sleepers.open(pg, names[0])
    wait_until(lambda: sleeping(pg, names[0]) == 1, "the session in the database")
    pg.drop_database(names[0])
    code, err = ended(inside)
    assert code != 0 and "terminating connection" in err
    pg.drop_database(names[0])
    pg.drop_database(odd)
    left = pg.psql("SELECT datname FROM pg_database").split()
    assert names[0] not in left and names[1] in left and odd not in pg.psql("SELECT datname FROM pg_database")


def test_terminate_ends_the_sessions_of_one_database_and_counts_them(sandboxes, sleepers):
    pg = sandboxes()
    pg.start()
    for name in ("a", "b"):
        pg.create_database(name)
    in_a = [sleepers.open(pg, "a"), sleepers.open(pg, "a")]
    in_b = sleepers.open(pg, "b")
    wait_until(lambda: sleeping(pg, "a") == 2 and sleeping(pg, "b") == 1, "three sleeping sessions")
    assert pg.terminate("a") == 2
    for proc in in_a:
        code, err = ended(proc)
        assert code != 0 and "terminating connection due to administrator command" in err
    assert in_b.poll() is None and sleeping(pg, "b") == 1  # another database: untouched
    assert pg.terminate("a") == 0
    assert pg.terminate("b") == 1
    assert ended(in_b)[0] != 0
    # psql's own session in the database it is told to clean is not counted nor ended.
    assert pg.terminate("postgres") == 0


def test_dsn_spells_user_and_password(sandboxes):
    pg = sandboxes()
    assert pg.dsn() == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert pg.dsn("db", user="vm user", password="p@ss:/") == f"postgresql://vm%20user:p%40ss%3A%2F@127.0.0.1:{pg.port}/db"


def test_the_dsn_works_with_the_driver(pg_dsn):
    psycopg = pytest.importorskip("psycopg")
    name = pg_dsn.rsplit("/", 1)[1]
    with psycopg.connect(pg_dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_database(), inet_server_addr()::text").fetchone() == (name, "127.0.0.1/32")


@pytest.mark.parametrize("run", [1, 2])
def test_pg_dsn_is_a_fresh_database_each_test(pg_sandbox, pg_dsn, run):
    name = pg_dsn.rsplit("/", 1)[1]
    assert pg_dsn == pg_sandbox.dsn(name)
    # The second run fails here if it were given the first one's database.
    pg_sandbox.psql("CREATE TABLE only_once (x int)", db=name)


def test_own_pg_is_separate_from_the_shared_one(own_pg, pg_sandbox):
    assert own_pg.port != pg_sandbox.port and own_pg.data_dir != pg_sandbox.data_dir
    own_pg.kill()
    assert pg_sandbox.psql("SELECT 1").strip() == "1"


# --- restart, kill -------------------------------------------------------------------------


def test_restart_keeps_data_and_port(sandboxes):
    pg = sandboxes()
    pg.start()
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
    port, pid = pg.port, pg.pid
    pg.restart()
    assert pg.port == port and pg.pid not in (None, pid)
    assert pg.psql("SELECT sum(x) FROM t").strip() == "3"
    pg.psql("INSERT INTO t VALUES (3)")
    pg.restart(mode="immediate")  # no shutdown checkpoint: recovery replays the WAL
    assert pg.psql("SELECT sum(x) FROM t").strip() == "6"
    with pytest.raises(ValueError):
        pg.restart(mode="gently")
    assert pg.running


def test_stop_then_start(sandboxes):
    pg = sandboxes()
    pg.start()
    processes = cluster(pg.pid)
    pg.stop()
    assert not pg.running and postmasters(pg.data_dir) == [] and alive(processes) == []
    pg.stop()  # stopped already: nothing to do
    pg.start()
    assert pg.psql("SELECT 1").strip() == "1"


def test_kill_then_start_recovers(sandboxes, sleepers):
    pg = sandboxes()
    pg.start()
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    client = sleepers.open(pg)
    wait_until(lambda: sleeping(pg, "postgres") == 1, "the sleeping session")
    processes = cluster(pg.pid)
    assert len(processes) >= 5  # the postmaster, its helpers, the client's backend
    # A stopped backend would outlive its postmaster: PostgreSQL's own "postmaster died"
    # signal waits until it runs again. kill() must end it all the same.
    backend = int(pg.psql("SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
                          " AND pid <> pg_backend_pid()").strip())
    os.kill(backend, signal.SIGSTOP)
    pg.kill()
    assert not pg.running
    assert alive(processes) == [] and postmasters(pg.data_dir) == []
    code, _ = ended(client)
    assert code != 0
    pg.kill()  # dead already: nothing to do
    pg.start()
    assert pg.psql("SELECT x FROM t").strip() == "7"
    assert "not properly shut down; automatic recovery in progress" in (pg.root / "postgres.log").read_text()
    pg.kill()
    pg.start()  # and again: nothing of the dead one stands in the way
    assert pg.running


# --- where things live, reuse, cleanup -------------------------------------------------------


def test_a_second_sandbox_on_an_initialised_root_keeps_its_data(root, sandboxes):
    first = sandboxes(root)
    first.start()
    first.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
    version_file = root / "data" / "PG_VERSION"
    made = version_file.stat().st_mtime_ns
    first.stop()
    second = sandboxes(root)
    second.init()  # no initdb over it
    assert version_file.stat().st_mtime_ns == made
    second.start()
    assert second.data_dir == first.data_dir
    assert second.psql("SELECT x FROM kept").strip() == "42"


def test_the_context_manager_starts_then_stops_and_cleans_up(root):
    with Sandbox(root, durable=False) as pg:
        assert pg.running
        pid, socket_dir, data_dir = pg.pid, pg.socket_dir, pg.data_dir
        processes = cluster(pid)
        owner = os.stat(data_dir).st_uid
        assert owner == (pwd.getpwnam("postgres").pw_uid if AS_ROOT else os.geteuid())
        # PostgreSQL refuses root: as root, the server itself must be the postgres user's.
        assert os.stat(f"/proc/{pid}").st_uid == owner
        private = AS_ROOT and root.parent.stat().st_mode & 0o005 == 0
        assert pg.outside_root == private
        assert (data_dir == root / "data") != private
    assert not pg.running and alive(processes) == [] and postmasters(data_dir) == []
    assert not socket_dir.exists()
    if private:  # its temporary home is gone, the link to it too
        assert not data_dir.exists() and not os.path.lexists(root / "data")
    else:  # the caller's root keeps its cluster
        assert (root / "data" / "PG_VERSION").is_file()


def test_the_context_manager_cleans_up_when_start_fails(root):
    pg = Sandbox(root, durable=False, settings={"max_connections": "none"})
    with pytest.raises(SandboxError, match='invalid value for parameter "max_connections"'):
        with pg:
            raise AssertionError("not reached")
    assert not pg.running and pg.socket_dir is None and postmasters(pg.data_dir) == []
    if pg.outside_root:
        assert not pg.data_dir.exists()


# --- the command line: make run-postgres -------------------------------------------------------

FAKE_SERVER = r'''
"""A stand-in for python -m vmserver: uses the database it is given, then waits for a signal."""
import json, os, signal, subprocess, sys

args = sys.argv[1:]
dsn = args[args.index("--db") + 1]
psql, mode, code = (args[args.index(flag) + 1] for flag in ("--psql", "--mode", "--code"))

def on_signal(signum, frame):
    print(json.dumps({"signal": signum}), flush=True)
    sys.exit(int(code))

signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

def sql(query):
    return subprocess.run([psql, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", query],
                          capture_output=True, text=True, check=True).stdout.strip()

sql("CREATE TABLE IF NOT EXISTS runs (n int)")
sql("INSERT INTO runs VALUES (1)")
print(json.dumps({"argv": args, "database": sql("SELECT current_database()"),
                  "runs": int(sql("SELECT count(*) FROM runs"))}), flush=True)
if mode == "exit":
    sys.exit(int(code))
if mode == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
while True:
    signal.pause()
'''

READY = re.compile(r"^PostgreSQL ready: (postgresql://\S+) \(data: (.+), log: (.+)\)$")


class Cli:
    """``python -m vmserver.backends.pg_sandbox run`` with the fake server, its stdout read by line."""

    def __init__(self, tmp_path: Path, directory: Path, mode: str, code: int) -> None:
        fake = tmp_path / "fake_server.py"
        fake.write_text(FAKE_SERVER)
        self.psql = str(find_bin_dir() / "psql")
        self.command = f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmserver.backends.pg_sandbox", "run", "--dir", str(directory),
             "--command", self.command, "--", "--psql", self.psql, "--mode", mode, "--code", str(code)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
            start_new_session=True)  # so a test that fails can end it and its server together
        self.directory = directory
        self._buffer = b""

    def line(self) -> str:
        end = time.monotonic() + WAIT
        while b"\n" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"no line from the CLI; exit={self.proc.poll()}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"the CLI's stdout closed; stderr: {self.finish()[1]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def ready(self) -> tuple[str, Path]:
        match = READY.match(self.line())
        assert match, "no ready line"
        return match.group(1), Path(match.group(2))

    def finish(self) -> tuple[int, str]:
        """Its exit code and stderr, once it has exited."""
        try:
            out, err = self.proc.communicate(timeout=WAIT * 2)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the CLI and its server, which holds stdout
            self.proc.communicate()
            raise AssertionError("the CLI did not exit") from None
        self._buffer += out
        return self.proc.returncode, err.decode(errors="replace")


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Callable[..., Cli]]:
    runs: list[Cli] = []

    def start(directory: Path, mode: str = "wait", code: int = 0) -> Cli:
        run = Cli(tmp_path, directory, mode, code)
        runs.append(run)
        return run

    yield start
    for run in runs:
        data_dir = Path(os.path.realpath(run.directory / "data"))
        if run.proc.poll() is None:  # a failed test: ask it to stop the way a user would
            run.proc.send_signal(signal.SIGTERM)
            try:
                run.proc.communicate(timeout=WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(run.proc.pid, signal.SIGKILL)  # the CLI and its server
                run.proc.communicate()
        left = postmasters(data_dir)
        if left:
            Sandbox(run.directory).kill()
        assert left == []


def test_run_serves_forwards_signals_keeps_data_and_stops_postgresql(open_dir, cli):
    directory = open_dir / ".pgdata"
    first = cli(directory, mode="wait", code=3)
    dsn, data_dir = first.ready()
    assert re.fullmatch(r"postgresql://postgres@127\.0\.0\.1:\d+/vmserver", dsn)
    assert data_dir == directory / "data"
    report = json.loads(first.line())
    assert report == {"argv": ["--db", dsn, "--psql", first.psql, "--mode", "wait", "--code", "3"],
                      "database": "vmserver", "runs": 1}
    assert len(postmasters(data_dir)) == 1
    first.proc.send_signal(signal.SIGTERM)
    assert json.loads(first.line()) == {"signal": signal.SIGTERM}
    code, err = first.finish()
    assert code == 3 and "Traceback" not in err, err
    assert postmasters(data_dir) == []

    second = cli(directory, mode="wait", code=4)  # Ctrl-C this time; the data is still there
    assert second.ready()[0].rsplit("/", 1)[1] == "vmserver"
    assert json.loads(second.line())["runs"] == 2
    second.proc.send_signal(signal.SIGINT)
    assert json.loads(second.line()) == {"signal": signal.SIGINT}
    assert second.finish()[0] == 4
    assert postmasters(data_dir) == []

    third = cli(directory, mode="exit", code=5)  # the server ends on its own
    third.ready()
    assert json.loads(third.line())["runs"] == 3
    assert third.finish()[0] == 5
    assert postmasters(data_dir) == []

    fourth = cli(directory, mode="crash")  # the server dies of SIGKILL
    fourth.ready()
    assert json.loads(fourth.line())["runs"] == 4
    assert fourth.finish()[0] == 128 + signal.SIGKILL
    assert postmasters(data_dir) == []


def test_run_stopped_while_postgresql_starts_leaves_nothing_running(open_dir, cli):
    directory = open_dir / ".pgdata"
    run = cli(directory, mode="wait", code=143)
    # SIGTERM while initdb runs (or a moment later): whatever step it hits, the run ends with
    # 143 and PostgreSQL stopped, and the cluster it was making is whole for the next run.
    wait_until(lambda: (directory / "data").exists(), "initdb to begin")
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143 and "Traceback" not in err, err
    assert postmasters(directory / "data") == []
    again = cli(directory, mode="exit", code=0)
    again.ready()
    assert json.loads(again.line())["database"] == "vmserver"
    assert again.finish()[0] == 0


@pytest.mark.skipif(not AS_ROOT, reason="only root's private directories are out of the postgres user's reach")
def test_run_in_a_directory_postgres_cannot_reach_says_so_and_cleans_up(tmp_path, cli):
    directory = tmp_path / ".pgdata"  # pytest's tmp: mode 700, root's
    run = cli(directory, mode="exit", code=0)
    _, data_dir = run.ready()
    assert not str(data_dir).startswith(str(tmp_path))
    assert json.loads(run.line())["database"] == "vmserver"
    code, err = run.finish()
    assert code == 0 and "the postgres user cannot reach" in err, err
    assert postmasters(data_dir) == [] and not data_dir.exists()


def test_run_without_postgresql_says_what_to_install(tmp_path):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    code = ("import sys; from pathlib import Path; import vmserver.backends.pg_sandbox as s;"
            " s.LIB_DIR = Path(sys.argv[1]); sys.exit(s.main(['run', '--dir', sys.argv[2]]))")
    done = subprocess.run([sys.executable, "-c", code, str(nothing), str(tmp_path / ".pgdata")],
                          env={**os.environ, "PATH": str(nothing)}, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "apt-get install postgresql" in done.stderr
    assert not (tmp_path / ".pgdata").exists()


def test_bin_dir_as_a_plain_script_as_ci_runs_it():
    script = Path(pg_sandbox.__file__)
    done = subprocess.run([sys.executable, "-I", str(script), "bin-dir"], capture_output=True, text=True,
                          timeout=WAIT, cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == str(find_bin_dir())


def test_a_stale_postmaster_pid_naming_another_process_is_not_taken_for_the_server(sandboxes):
    # As after a reboot: postmaster.pid survives and its pid now belongs to someone else.
    pg = sandboxes()
    pg.start()
    pg.stop()
    # The server's own user's, so that PostgreSQL sees it alive (another user's it ignores).
    other = subprocess.Popen(["sleep", "30"], user="postgres" if AS_ROOT else None)
    try:
        (pg.data_dir / "postmaster.pid").write_text(f"{other.pid}\n{pg.data_dir}\n")
        assert not pg.running
        pg.kill()  # must not touch it
        assert other.poll() is None
        pg.start()  # PostgreSQL itself would refuse: it sees the pid alive
        assert pg.running and pg.pid != other.pid
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("wanted, outcome", [("", "1 skipped"), ("required", "1 error")])
def test_the_fixtures_skip_without_postgresql_unless_it_is_required(tmp_path, wanted, outcome):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    code = ("import sys, pytest; from pathlib import Path; import vmserver.backends.pg_sandbox as s;"
            " s.LIB_DIR = Path(sys.argv[1]); sys.exit(pytest.main(sys.argv[2:]))")
    done = subprocess.run(
        [sys.executable, "-c", code, str(nothing), f"{__file__}::test_the_dsn_works_with_the_driver",
         "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}"],
        env={**os.environ, "PATH": str(nothing), "VMSERVER_TEST_POSTGRES": wanted},
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert outcome in done.stdout, done.stdout + done.stderr
    assert "apt-get install postgresql" in done.stdout
