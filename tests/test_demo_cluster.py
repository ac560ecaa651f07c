"""The fleet demo against several servers on one PostgreSQL database (``vmclient demo --servers``)
and ``python -m vmserver.cluster_demo``: real server processes on the suite's PostgreSQL.

It passes when the servers answer as one; it fails when they do not (two databases); a change
still on its way to another server is not a failure; bad usage, a bad address and a dead
server are one line and status 2; the cluster demo stops every process it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TIMEOUT, Databases, LimitedServer, Wire, vm_args
from test_demo import closed_port, phase_status
from vmclient.demo import PHASES, main, run_cluster_demo


@pytest.fixture
def servers() -> Iterator[Any]:
    """A factory: ``servers(db, n)`` starts n server processes on ``db``, their ports; all killed after."""
    started: list[LimitedServer] = []

    def start(db: str, n: int) -> list[int]:
        new = [LimitedServer(db) for _ in range(n)]
        started.extend(new)
        return [s.wait_listening() for s in new]

    yield start
    for s in started:
        s.kill()


@pytest.fixture
def other_pg_dsn(pg_databases: Databases) -> Iterator[str]:
    """A second empty database on the suite's PostgreSQL (``pg_dsn`` is the first)."""
    name, dsn = pg_databases.take()
    yield dsn
    pg_databases.give_back(name, dsn)


def addresses(ports: list[int]) -> str:
    return ",".join(f"127.0.0.1:{p}" for p in ports)


def processes_with(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


# --- vmclient demo --servers ---------------------------------------------------------------------


@pytest.mark.parametrize("n, vms, across", [(2, 6, 6), (3, 7, 6), (2, 1, 1)])
def test_demo_on_several_servers_passes(capsys, pg_dsn, servers, n, vms, across):
    """Agents spread over n servers, an observer on each; with one VM an observer on another
    server plays the stranger. Every forbidden move but the wrap-around one is tried across servers."""
    ports = servers(pg_dsn, n)
    assert main(["--servers", addresses(ports), "--vms", str(vms)]) == 0
    captured = capsys.readouterr()
    report = captured.out
    assert phase_status(report) == {phase: "ok" for phase in PHASES}, report
    assert f"{vms} VM agents spread over {n} servers ({', '.join(f'127.0.0.1:{p}' for p in ports)})" in report
    assert report.count(f"checked on {n} servers, right on all within") == len(PHASES), report
    assert f"{3 * vms} of {3 * vms} forbidden moves refused" in report, report
    assert f"{across} of {vms} connects of another's VM from another server" in report, report
    assert report.rstrip().endswith(f"demo passed: {vms} VMs on {n} servers"), report
    assert captured.err == "" and "Traceback" not in report


def test_demo_fails_when_the_servers_disagree(capsys, pg_dsn, other_pg_dsn, servers):
    """Two servers on two databases: each shows only its own agents' VMs, and every phase says so."""
    ports = servers(pg_dsn, 1) + servers(other_pg_dsn, 1)
    assert main(["--servers", addresses(ports), "--vms", "4", "--settle", "0.5"]) == 1
    captured = capsys.readouterr()
    report = captured.out
    assert phase_status(report) == {phase: "FAIL" for phase in PHASES}, report
    assert report.count("still wrong after 0.5 s") == len(PHASES), report
    prefix = re.search(r"\(run (demo-[0-9a-f]+)\)", report).group(1)
    # Server A holds the even agents' VMs, B the odd ones: each observer names what it misses.
    assert (f"- on 127.0.0.1:{ports[0]}: get_all_vms lists exactly this run's VMs: expected 4: "
            f"{prefix}-0, {prefix}-1, {prefix}-2, {prefix}-3; saw 2; missing {prefix}-1, {prefix}-3") in report
    assert (f"- on 127.0.0.1:{ports[1]}: get_connected_vms lists: expected 4: "
            f"{prefix}-0, {prefix}-1, {prefix}-2, {prefix}-3; saw 2; missing {prefix}-0, {prefix}-2") in report
    # The neighbour's VM is unknown on the other database: not the conflict a cluster answers.
    assert (f"agent 0 on 127.0.0.1:{ports[0]} connect_vm {prefix}-1 (held by agent 1 on 127.0.0.1:{ports[1]}): "
            "expected Conflict (conflict); saw invalid_args: ram: missing") in report
    assert re.search(r"^demo FAILED: \d+ of \d+ checks failed$", report, re.M), report
    assert captured.err == "" and "Traceback" not in report


async def test_a_change_on_its_way_is_not_a_failure(pg_dsn, servers):
    """A stray VM of the run, registered behind the demo's back, is removed only after the
    observers first looked at the add phase: their first looks fail, later ones pass, and only
    the last look counts. (Recording every look would fail the add phase.)"""
    prefix = "demo-stray"
    ports = servers(pg_dsn, 2)
    w = await Wire.open(ports[1])
    await w.ok("add_vm", **vm_args(f"{prefix}-77"))
    await w.ok("subscribe", events=["vm_added"])

    async def remove_later() -> None:
        added = 0
        while added < 4:  # the agents have registered theirs: the observers look now
            added += json.loads(await asyncio.wait_for(w.reader.readline(), TIMEOUT)).get("event") == "vm_added"
        await asyncio.sleep(1.5)
        await w.send({"cmd": "remove_vm", "args": {"vm_id": f"{prefix}-77"}})

    class Out(list):
        def write(self, text: str) -> None:
            self.append(text)

        def flush(self) -> None:
            pass

    out = Out()
    remover = asyncio.create_task(remove_later())
    try:
        passed = await run_cluster_demo([("127.0.0.1", p) for p in ports], 4, out, prefix=prefix, settle=10.0)
        await remover
    finally:
        remover.cancel()
        await w.close()
    report = "".join(out)
    assert passed is True, report
    assert phase_status(report) == {phase: "ok" for phase in PHASES}, report
    took = float(re.search(r"^ok\s+add\s.*right on all within (\d+\.\d\d) s", report, re.M).group(1))
    assert took >= 1.0, report  # the add phase was looked at again until the stray VM was gone


@pytest.mark.parametrize("argv, message", [
    (["--servers", "127.0.0.1:1,127.0.0.1:2", "--host", "127.0.0.1"], "--servers names every server"),
    (["--servers", "127.0.0.1:1,127.0.0.1:2", "--port", "8888"], "--servers names every server"),
    (["--servers", "127.0.0.1:1,127.0.0.1:2", "--spawn-server"], "--servers names every server"),
    (["--port", "8888", "--settle", "2"], "--settle is for --servers"),
    (["--servers", "127.0.0.1:1,127.0.0.1:2", "--settle", "0"], "must be a positive number of seconds"),
    (["--servers", "127.0.0.1:1,127.0.0.1:2", "--settle", "nan"], "must be a positive number of seconds"),
])
def test_servers_bad_usage(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: vmclient demo" in err and message in err, err


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1:99999,127.0.0.1:2", "port must be from 1 to 65535, got 99999"),
    ("127.0.0.1:x", "not a port number: 'x'"),
    ("127.0.0.1:1,,127.0.0.1:2", "empty address in '127.0.0.1:1,,127.0.0.1:2'"),
    ("[::1:5000", "no closing ']'"),
    ("db:1:5000", "neither HOST:PORT nor an IPv6 address"),
    (":5000", "has no host"),
    ("127.0.0.1:5000,127.0.0.1:5000", "server 127.0.0.1:5000 given twice"),
    ("localhost,localhost:8888", "server localhost:8888 given twice"),  # the default port is 8888
])
def test_servers_bad_address(capsys, text, message):
    assert main(["--servers", text]) == 2
    err = capsys.readouterr().err
    assert "argument --servers: " in err and message in err, err


def test_one_server_unreachable(capsys, tmp_path):
    """A live server and a closed port: one line naming the dead one, status 2, and nothing done
    on the live one (the observers connect before any agent)."""
    live = LimitedServer(str(tmp_path / "vms.db"))
    try:
        port, dead = live.wait_listening(), closed_port()
        assert main(["--servers", f"127.0.0.1:{port},127.0.0.1:{dead}", "--vms", "3"]) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"vmclient demo: cannot connect to 127.0.0.1:{dead}: "), captured.err
        assert captured.out == "" and "Traceback" not in captured.err

        async def inventory() -> list:
            w = await Wire.open(port)
            try:
                return await w.ok("get_all_vms")
            finally:
                await w.close()
        assert asyncio.run(inventory()) == []
    finally:
        live.kill()


# --- python -m vmserver.cluster_demo -------------------------------------------------------------


def cluster_demo(*args: str, tmp: Path) -> subprocess.Popen[str]:
    """The cluster demo as ``make cluster-demo`` runs it, its temporary files under ``tmp``."""
    return subprocess.Popen([sys.executable, "-m", "vmserver.cluster_demo", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(tmp)})


def test_cluster_demo_end_to_end(pg_dsn, tmp_path):
    proc = cluster_demo("--db", pg_dsn, "--servers", "3", "--vms", "5", tmp=tmp_path)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    assert re.search(r"^cluster demo: 3 servers on postgresql://\S+: 127\.0\.0\.1:\d+ \(pid \d+\), "
                     r"127\.0\.0\.1:\d+ \(pid \d+\), 127\.0\.0\.1:\d+ \(pid \d+\)$", out, re.M), out
    assert phase_status(out) == {phase: "ok" for phase in PHASES}, out
    assert out.rstrip().endswith("demo passed: 5 VMs on 3 servers"), out
    assert err == ""
    assert processes_with(pg_dsn) == []  # every server stopped
    assert list(tmp_path.iterdir()) == []  # the logs removed


def test_cluster_demo_a_server_that_cannot_start(pg_dsn, tmp_path):
    """A server that cannot start (a database that does not exist): status 2, one line naming
    it, and the other servers stopped."""
    missing = pg_dsn.rsplit("/", 1)[0] + "/no_such_database"
    proc = cluster_demo("--db", missing, tmp=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert re.fullmatch(r"cluster demo: server 1 exited with status 1 before listening: .*no_such_database.*\n",
                        err), err
    assert out == ""
    assert processes_with("no_such_database") == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cluster_demo_interrupted_stops_everything(pg_dsn, tmp_path, sig):
    """A signal while the demo runs: the demo is stopped, then every server; status 128+N."""
    proc = cluster_demo("--db", pg_dsn, "--vms", "1000", tmp=tmp_path)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("vmclient demo: 1000 VM agents"):
                ready.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "".join(lines)
        proc.send_signal(sig)
        proc.wait(60)
        reader.join(10)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, "".join(lines) + err
    assert f"cluster demo: interrupted ({signal.Signals(sig).name}); stopping the servers" in err, err
    assert "Traceback" not in err
    assert "demo passed" not in "".join(lines)
    assert processes_with(pg_dsn) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --db"),
    (["--db", "/tmp/vms.db"], "is not a PostgreSQL DSN"),
    (["--db", "postgresql://x/y", "--servers", "0"], "must be from 1 to 16, got 0"),
    (["--db", "postgresql://x/y", "--vms", "1001"], "must be from 1 to 1000, got 1001"),
])
def test_cluster_demo_bad_usage(tmp_path, argv, message):
    proc = cluster_demo(*argv, tmp=tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and message in err and out == "", err
    assert list(tmp_path.iterdir()) == []
