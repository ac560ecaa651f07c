"""The benchmark suite cannot silently measure nothing: its parts are checked against real servers.

(a) The reference server and the load generators, at tiny sizes, against real servers (ours
and the reference, as subprocesses): what they count as a success really is one, error
replies are counted as errors, and malformed replies stop the run. (b) The whole suite in
smoke mode, as a subprocess, produces every figure. No timing is asserted anywhere: a busy
machine must not fail these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is not installed: it is imported from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import fleet, loadgen, pg_figure, procstat, reference_server  # noqa: E402
from benchmarks.fleet import Fleet  # noqa: E402
from benchmarks.loadgen import LoadError  # noqa: E402
from conftest import need_postgres  # noqa: E402
from benchmarks.run import (  # noqa: E402
    Bench, SMOKE, ServerStartError, _env, check, gc_report, merge_results, settle_rss, terminate, vm_spec,
)

SMOKE_TIMEOUT = 100.0  # the smoke run must finish well within this (it takes seconds; pytest's own limit: 120)


# --- servers as subprocesses ------------------------------------------------------------------


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(SMOKE, tmp_path)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def ours(bench: Bench) -> int:
    return bench.ours("ours").port


@pytest.fixture
def reference(bench: Bench) -> int:
    return bench.reference(vms=3).port


def raw_session(port: int) -> tuple[socket.socket, Callable[[], bytes]]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    return sock, reader.readline


# --- the reference server ---------------------------------------------------------------------


def test_reference_server_greets_and_answers_like_ours(reference: int) -> None:
    sock, readline = raw_session(reference)
    with sock:
        assert json.loads(readline()) == {"hello": {"server": "reference"}}
        sock.sendall(b'{"cmd":"health","id":7}\n{"cmd":"get_all_vms","id":"x"}\n')
        assert readline() == b'{"id":7,"ok":true,"result":"OK"}\n'
        listing = json.loads(readline())
        assert listing["id"] == "x" and listing["ok"] is True and len(listing["result"]) == 3
        assert set(listing["result"][0]) == {"id", "vm_id", "ram", "cpu", "disks", "connected", "authorized",
                                             "last_connected"}
        assert len(listing["result"][0]["disks"]) == 2
        sock.sendall(b"not json\n")
        assert json.loads(readline())["ok"] is False


def test_reference_server_cli_prints_listening_line_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.reference_server", "--port", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert "listening on 127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        assert loadgen.pipelined(port, total=10, window=4).require_all_ok(10).ok == 10
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_reference_reply_function() -> None:
    ref = reference_server.Reference(vms=2)
    assert json.loads(ref.reply(b'{"cmd":"get_all_disks","id":1}'))["result"][3]["vm"] == "vm-2"
    assert json.loads(ref.reply(b"[1]"))["ok"] is False


# --- load generators count what is real -------------------------------------------------------


@pytest.mark.parametrize("server", ["ours", "reference"])
def test_pipelined_counts_every_ok_reply(server: str, request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue(server)
    result = loadgen.pipelined(port, total=300, window=16).require_all_ok(300)
    assert (result.requests, result.ok, result.errors) == (300, 300, 0)
    assert result.elapsed > 0


@pytest.mark.parametrize("server", ["ours", "reference"])
def test_concurrent_counts_and_times_every_reply(server: str, request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue(server)
    result = loadgen.concurrent(port, "get_all_vms", total=101, connections=4).require_all_ok(101)
    assert (result.requests, result.ok, len(result.latencies)) == (101, 101, 101)
    assert all(lat > 0 for lat in result.latencies)
    assert result.percentile(50) <= result.percentile(99)


def test_error_replies_are_counted_as_errors_not_successes(ours: int) -> None:
    for result in (loadgen.pipelined(ours, "no_such_command", total=20, window=8),
                   loadgen.concurrent(ours, "no_such_command", total=20, connections=3)):
        assert (result.ok, result.errors) == (0, 20)
        assert result.error_samples[0]["code"] == "unknown_command"
        with pytest.raises(LoadError, match="20 of 20 replies were errors"):
            result.require_all_ok()


def test_require_all_ok_checks_the_count() -> None:
    result = loadgen.Result(requests=5, ok=4)
    with pytest.raises(LoadError, match="expected 5"):
        result.require_all_ok(5)


def test_sessions_run_the_lifecycle_and_count_forbidden_moves_as_errors(ours: int) -> None:
    names = ["agent-a", "agent-b", "agent-c"]
    for n in names:
        assert loadgen.run_sessions(ours, [[("add_vm", vm_spec(n))]]).require_all_ok(1).ok == 1
    lifecycle = [[("connect_vm", {"vm_id": v}), ("authorize_vm", {"vm_id": v}), ("update_vm", {"vm_id": v, "ram": 512}),
                  ("deauthorize_vm", {"vm_id": v}), ("disconnect_vm", {"vm_id": v})] for v in names]
    result = loadgen.run_sessions(ours, lifecycle, concurrency=2).require_all_ok(15)
    assert len(result.session_times) == 3 and len(result.latencies) == 15
    # update_vm without authorize_vm is refused by the server: an error, not a success.
    forbidden = loadgen.run_sessions(ours, [[("connect_vm", {"vm_id": "agent-a"}), ("update_vm", {"vm_id": "agent-a", "ram": 1})]])
    assert (forbidden.ok, forbidden.errors) == (1, 1)
    assert forbidden.error_samples[0]["code"] == "not_authorized"
    # The writes happened: the server lists the new ram.
    reader = loadgen.ListReader(ours)
    try:
        _, line = reader.fetch("get_all_vms", 9)
        assert loadgen.check_list_reply(line, 9, 3) == 3
        assert {vm["ram"] for vm in json.loads(line)["result"]} == {512}
        with pytest.raises(LoadError, match="expected a list of 4"):
            loadgen.check_list_reply(line, 9, 4)
    finally:
        reader.close()


def test_sessions_on_open_connections_keep_them_open(reference: int) -> None:
    opened = [loadgen.open_connection(reference) for _ in range(3)]
    try:
        scripts = [[("health", None)] * 4 for _ in opened]
        loadgen.run_sessions(reference, scripts, opened=opened).require_all_ok(12)
        loadgen.run_sessions(reference, scripts, opened=opened).require_all_ok(12)
    finally:
        for sock, _ in opened:
            sock.close()


def test_idle_sessions_are_really_open(reference: int, ours: int) -> None:
    for port in (reference, ours):
        socks = loadgen.open_idle(port, 30, batch=7)
        try:
            assert len(socks) == 30
            socks[-1].sendall(loadgen.request_line("health", None, 1))
            with socks[-1].makefile("rb") as reader:
                assert json.loads(reader.readline()) == {"id": 1, "ok": True, "result": "OK"}
        finally:
            for s in socks:
                s.close()


def test_our_server_refusing_a_flag_is_reported_not_hidden(bench: Bench) -> None:
    with pytest.raises(ServerStartError) as info:
        bench.ours("bad", extra=["--no-such-flag"])
    assert info.value.returncode == 2 and "unrecognized arguments" in info.value.log


# --- malformed servers stop the run -----------------------------------------------------------


class FakeServer:
    """Greets, then answers every line with ``answer(line_number)``: to feed the generators garbage.

    ``answer=None`` hangs up at the first request instead.
    """

    def __init__(self, answer: Callable[[int], bytes] | None, greeting: bytes = b'{"hello":{}}\n') -> None:
        self.answer, self.greeting = answer, greeting
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.sendall(self.greeting)
            reader = conn.makefile("rb")
            for k in range(1000):
                line = reader.readline()
                if not line or self.answer is None:
                    return
                try:
                    conn.sendall(self.answer(k))
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.mark.parametrize("answer, message", [
    (lambda k: b"this is not json\n", "not JSON"),
    (lambda k: b'{"id":%d,"ok":true,"result":"OK"}\n' % (k + 1), "carries id|unexpected reply"),
    (lambda k: b'{"event":"shutdown","data":{},"ts":"x"}\n', "event"),
    (None, "closed"),
])
def test_malformed_replies_raise(answer: Callable[[int], bytes] | None, message: str) -> None:
    for generate in (lambda port: loadgen.pipelined(port, total=5, window=2, timeout=3),
                     lambda port: loadgen.concurrent(port, total=5, connections=1, timeout=3)):
        fake = FakeServer(answer)
        try:
            with pytest.raises(LoadError, match=message):
                generate(fake.port)
        finally:
            fake.close()


def test_a_refusal_instead_of_a_greeting_raises() -> None:
    fake = FakeServer(None, greeting=b'{"id":null,"ok":false,"error":{"code":"unavailable","message":"full"}}\n')
    try:
        with pytest.raises(LoadError, match="greeting"):
            loadgen.open_connection(fake.port)
    finally:
        fake.close()


# --- small helpers ----------------------------------------------------------------------------


def test_procstat_reads_this_process() -> None:
    pid = os.getpid()
    before = procstat.cpu_seconds(pid)
    end = time.process_time() + 0.05
    while time.process_time() < end:  # bounded: burn a little CPU so the counter moves
        pass
    assert procstat.cpu_seconds(pid) >= before
    precise = procstat.cpu_seconds_precise(pid)
    assert precise is None or precise > 0
    mem = procstat.memory(pid)
    assert 0 < mem["rss"] <= mem["peak"]


def test_percentile_and_histogram() -> None:
    values = [i / 1000 for i in range(1, 101)]
    assert loadgen.percentile(values, 50) == 0.05
    assert loadgen.percentile(values, 99) == 0.099
    assert sum(count for _, count in loadgen.histogram(values)) == 100


# --- bursts, clients that never read, and the fleet's worker processes ------------------------


def test_burst_reads_every_reply_in_order_and_check_burst_judges_them(ours: int) -> None:
    prefix = loadgen.request_prefix("health", None)
    data = b"".join(prefix + b"%d}\n" % i for i in range(500))
    start, end, replies = loadgen.burst(ours, data, 500, timeout=30)
    assert end >= start and replies.count(b"\n") == 500
    loadgen.check_burst(replies, 500, lambda r: r == "OK")
    with pytest.raises(LoadError, match="expected 501"):
        loadgen.check_burst(replies, 501, lambda r: r == "OK")
    with pytest.raises(LoadError, match="reply 0"):
        loadgen.check_burst(replies, 500, lambda r: r == [])
    bad = loadgen.request_prefix("no_such_command", None)
    _, _, replies = loadgen.burst(ours, bad + b"0}\n", 1, timeout=30)
    with pytest.raises(LoadError, match="not the expected one"):  # an error reply is not a success
        loadgen.check_burst(replies, 1, lambda r: True)


def test_unread_replies_wait_in_the_socket_and_a_closed_peer_is_seen(bench: Bench) -> None:
    server = bench.ours("unread")
    socks = loadgen.send_and_never_read(server.port, 3, loadgen.request_line("health", None, 1))
    try:
        deadline = time.monotonic() + 10
        while not all(loadgen.unread_bytes(sock) > 0 for sock in socks):
            assert time.monotonic() < deadline, "no reply arrived"
            time.sleep(0.01)
        assert not any(loadgen.closed_by_peer(sock) for sock in socks)
        assert socks[0].recv(4096) == b'{"id":1,"ok":true,"result":"OK"}\n'  # what was waiting: the reply
        code, seconds = terminate(server)
        bench.stop(server)
        assert code == 0 and seconds is not None
        deadline = time.monotonic() + 10
        while not all(loadgen.closed_by_peer(sock) for sock in socks):
            assert time.monotonic() < deadline, "the server's close was not seen"
            time.sleep(0.01)
    finally:
        for sock in socks:
            sock.close()


def test_unterminated_lines_are_sent_whole_and_the_server_holds_them(bench: Bench) -> None:
    server = bench.ours("unterminated")  # no token: before auth a line that long ends the session
    socks, closed = loadgen.send_unterminated(server.port, 3, 200_000, timeout=30)
    try:
        assert (len(socks), closed) == (3, 0)
        assert not any(loadgen.closed_by_peer(sock) for sock in socks)
        # The 200,000 bytes were one line: ended, they get one error reply, and the next line its own.
        socks[0].sendall(b'\n{"cmd":"health","id":9}\n')
        socks[0].settimeout(10)
        reader = socks[0].makefile("rb")
        assert json.loads(reader.readline())["ok"] is False
        assert json.loads(reader.readline()) == {"id": 9, "ok": True, "result": "OK"}
    finally:
        for sock in socks:
            sock.close()
    assert settle_rss(server.pid, quiet=0.2, timeout=5) > 0


@pytest.fixture
def workers(bench: Bench, ours: int) -> Iterator[Fleet]:
    fl = Fleet(ours, 2, bench.tmp, _env(), name="test-fleet")
    procs = list(fl.procs)
    try:
        yield fl
    finally:
        fl.close()
    assert all(proc.returncode is not None for proc in procs)  # every worker was stopped


_REGISTER = [["connect_vm", {"vm_id": "{vm}", "ram": 1024, "cpu": 1, "disks": [{"disk_id": "{vm}-d", "size": 5}]}]]


def test_fleet_agents_connect_over_several_workers_and_close(ours: int, workers: Fleet) -> None:
    assert fleet.split(7, 2) == [(0, 4), (4, 3)]
    op = fleet.Operator(ours)
    try:
        opened = fleet.merge(workers.spread(7, lambda first, count: {
            "op": "open", "count": count, "name_fmt": "ag-%d", "first": first, "script": _REGISTER}))
        fleet.require(opened, 7, "open")
        assert len(opened["latencies"]) == 7 and opened["first_send"] <= opened["last_reply"]
        assert op.call("stats")["connected"] == 7
        assert op.call("get_vm", {"vm_id": "ag-6"})["disks"][0]["disk_id"] == "ag-6-d"  # {vm} was filled in
        # A command the server refuses is an error, never a success.
        refused = fleet.merge(workers.all({"op": "run", "script": [["update_vm", {"vm_id": "{vm}", "ram": 8}]]}))
        assert (refused["ok"], refused["errors"]) == (0, 7)
        assert refused["samples"][0]["code"] == "not_authorized"
        with pytest.raises(LoadError, match="0 of 7 ok"):
            fleet.require(refused, 7, "update")
        closed = workers.all({"op": "close"})
        assert sum(a["closed"] for a in closed) == 7
        deadline = time.monotonic() + 10
        while op.call("stats")["connected"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        op.close()


def test_fleet_subscribers_count_the_events_that_happen(ours: int, workers: Fleet) -> None:
    assert workers.ask([{"op": "subscribe", "count": 3}, None])[0]["ok"] == 3
    loadgen.run_sessions(ours, [[("add_vm", vm_spec(f"ev-{i}")) for i in range(4)]]).require_all_ok(4)
    deadline = time.monotonic() + 10
    while True:
        counts = fleet.sum_counts(workers.ask([{"op": "count"}, None]))
        if counts["events"].get("vm_added", 0) >= 12 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counts["events"] == {"vm_added": 12} and counts["dropped"] == 0 and counts["subs_open"] == 3
    assert counts["received"] == 12
    assert fleet.sum_counts(workers.ask([{"op": "close_subs"}, None]))["subs_open"] == 3
    assert workers.ask([{"op": "count"}, None])[0]["subs_open"] == 0


def test_fleet_sees_the_server_stop_and_reconnects_to_a_new_one(bench: Bench) -> None:
    server = bench.ours("first")
    fl = Fleet(server.port, 2, bench.tmp, _env(), name="restart-fleet")
    try:
        fleet.require(fleet.merge(fl.spread(5, lambda first, count: {
            "op": "open", "count": count, "name_fmt": "r-%d", "first": first, "script": _REGISTER})), 5, "open")
        code, _ = terminate(server)
        bench.stop(server)
        assert code == 0
        deadline = time.monotonic() + 10
        while True:
            status = fl.all({"op": "status"})
            if sum(a["closed_by_server"] for a in status) == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sum(a["closed_by_server"] for a in status) == 5 and sum(a["agents_open"] for a in status) == 0
        assert sum(a["agent_events"].get("shutdown", 0) for a in status) == 5  # each was told why
        again = bench.ours("second", db=Path(server.argv[server.argv.index("--db") + 1]))
        fl.all({"op": "port", "port": again.port})
        fleet.require(fleet.merge(fl.spread(5, lambda first, count: {
            "op": "open", "count": count, "name_fmt": "r-%d", "first": first, "script": _REGISTER})), 5, "reopen")
    finally:
        fl.close()


def test_fleet_reports_refused_connections_and_bad_commands(bench: Bench) -> None:
    server = bench.ours("full", extra=["--max-connections", "2", "--local-reserve", "0"])
    fl = Fleet(server.port, 1, bench.tmp, _env(), name="refused-fleet")
    try:
        opened = fleet.merge(fl.all({"op": "open", "count": 4, "name_fmt": "f-%d", "pending": 1}))
        assert opened["failures"] == 2 and "greeting" in str(opened["samples"])
        with pytest.raises(LoadError, match="unknown op"):
            fl.all({"op": "no_such_op"})
    finally:
        fl.close()
    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))
    port = nobody.getsockname()[1]
    nobody.close()  # nothing listens there now
    fl = Fleet(port, 1, bench.tmp, _env(), name="nobody-fleet")
    try:
        opened = fleet.merge(fl.all({"op": "open", "count": 2, "name_fmt": "n-%d", "timeout": 10}))
        assert opened["failures"] == 2
    finally:
        fl.close()


def test_gc_report_reads_the_servers_line_or_says_none() -> None:
    log = "x INFO vmserver: stopped\n2026 INFO vmserver: gc: 123 collections, longest pause 4.2 ms, 0 over 20 ms\n"
    assert gc_report(log) == {"collections": 123, "longest_pause_ms": 4.2, "over_20ms": 0}
    assert gc_report("2026 INFO vmserver: stopped\n") is None
    assert check(0, "==", 0) is True and check(-15, "==", 0) is False and check(None, "==", 0) is None


def test_merge_results_keeps_the_other_figures_and_where_each_came_from() -> None:
    old = {"machine": {"cpus": 2}, "settings": {"runs": 5}, "started": "t1", "seconds": 9.0,
           "figures": {"one": {"figure": 1}, "nine": {"figure": 9, "v": "old"}}}
    new = {"machine": {"cpus": 4}, "settings": {"runs": 1}, "started": "t2", "seconds": 3.0,
           "figures": {"nine": {"figure": 9, "v": "new"}, "eight": {"figure": 8}}}
    out = merge_results(old, new)
    assert list(out["figures"]) == ["one", "eight", "nine"] and out["figures"]["nine"]["v"] == "new"
    assert (out["machine"], out["started"]) == ({"cpus": 2}, "t1")  # the first run's, for figure 1
    assert out["merged"] == [{"started": "t2", "seconds": 3.0, "machine": {"cpus": 4}, "settings": {"runs": 1},
                              "figures": ["nine", "eight"]}]
    assert len(merge_results(out, new)["merged"]) == 1  # the same figures again: the older entry goes


# --- (b) the whole suite, smoke-sized ---------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            continue
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # a zombie has stopped running
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_suite_killed_midway_leaves_no_process_behind(tmp_path: Path, sig: int) -> None:
    """Its servers, workers and prober all stop: SIGTERM unwinds the suite, and after a SIGKILL
    the kernel signals the servers (PR_SET_PDEATHSIG) while the others see their stdin end."""
    # Its temporary directory under ours: a SIGKILL leaves it behind, pytest removes it.
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--smoke", "--only", "11", "--out",
                             str(tmp_path / "r.json")], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not all(any(what in _cmdline(k) for k in kids) for what in ("vmserver", "fleet", "loadgen probe")):
            assert proc.poll() is None and time.monotonic() < deadline, "the figure never started its processes"
            time.sleep(0.02)
            kids = _children(proc.pid)
        proc.send_signal(sig)
        assert proc.wait(30) == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not all(_gone(k) for k in kids):
            assert time.monotonic() < deadline, [(k, _cmdline(k)) for k in kids if not _gone(k)]
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for k in kids:  # only if the test failed: nothing of ours may outlive it
            if not _gone(k):
                os.kill(k, signal.SIGKILL)


def _postmaster(under: Path) -> tuple[int, Path] | None:
    """(pid, data directory) of the cluster a figure 13 started under ``under``, once it runs."""
    for pidfile in under.glob("vmbench-13-*/pg/data/postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().split("\n", 1)[0]), pidfile.parent.resolve()
    return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_suite_killed_midway_leaves_no_postgresql_behind(tmp_path: Path, sig: int) -> None:
    """Figure 13's PostgreSQL, which pg_ctl detaches from the suite, stops too, and its data
    directory goes: the suite stops it when it unwinds, its guard process after a SIGKILL."""
    need_postgres()
    pytest.importorskip("psycopg")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--smoke", "--runs", "3", "--only", "13",
                             "--out", str(tmp_path / "r.json")], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    cluster: list[int] = []
    data: Path | None = None
    try:
        deadline = time.monotonic() + 60
        while not (all(any(what in _cmdline(k) for k in kids) for what in ("postgresql://", "pg_figure guard"))
                   and (found := _postmaster(tmp_path)) is not None):
            assert proc.poll() is None and time.monotonic() < deadline, "the figure never started its processes"
            time.sleep(0.02)
            kids = _children(proc.pid)
        pid, data = found
        cluster = [pid, *_children(pid)]  # the postmaster, its sessions (the servers'), its helpers
        assert len(cluster) > 2 and data.is_dir()
        proc.send_signal(sig)
        assert proc.wait(30) == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not all(_gone(k) for k in kids + cluster) or data.exists():
            assert time.monotonic() < deadline, ([(k, _cmdline(k)) for k in kids + cluster if not _gone(k)],
                                                 data.exists())
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for k in kids + cluster:  # only if the test failed: nothing of ours may outlive it
            if not _gone(k):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(k, signal.SIGKILL)


@pytest.mark.parametrize("how", ["stdin ends", "SIGTERM", "stopped, but it runs"])
def test_the_guard_kills_the_cluster_when_the_suite_is_gone_or_did_not_stop_it(tmp_path: Path, how: str) -> None:
    """The end of its stdin without "stopped" (the suite died), or SIGTERM (PR_SET_PDEATHSIG),
    kills the cluster and removes the directories it was told of; "stopped" with the cluster
    still running (the suite's stop failed) kills it too."""
    need_postgres()
    from vmserver.backends.pg_sandbox import Sandbox, find_bin_dir

    bin_dir = find_bin_dir()
    assert bin_dir is not None
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    pg = Sandbox(tmp_path / "pg", durable=False, bin_dir=bin_dir)
    try:
        pg.start()
        pid = pg.pid
        assert pid is not None
        guard = pg_figure.Guard(pg.root, bin_dir, _env(), tmp_path / "guard.log")
        guard.remove(scratch)
        if how == "SIGTERM":
            guard.proc.send_signal(signal.SIGTERM)
            assert guard.proc.wait(30) == 0
        if how == "stopped, but it runs":
            guard._say("stopped")
        assert guard.close(stopped=False) == 0
        assert _gone(pid) and not pg.running and not scratch.exists(), (tmp_path / "guard.log").read_text()
    finally:
        pg.cleanup()


FIGURE_NAMES = {"health_pipelined", "small_reads", "durable_writes", "agent_lifecycle", "large_inventory",
                "idle_sessions", "slow_disk_writes", "fairness", "memory", "subscribers", "gc_pauses", "fleet",
                "postgres", "cluster", "http"}


def test_smoke_run_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=SMOKE_TIMEOUT)
    log = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, log
    results = json.loads(out.read_text())
    figures = results["figures"]
    assert set(figures) == FIGURE_NAMES, log
    assert sorted(f["figure"] for f in figures.values()) == list(range(1, 16))
    postgres = pg_figure.unavailable()
    for name, fig in figures.items():
        assert fig["available"] and fig["error"] is None, (name, fig["error"])
        if name == "slow_disk_writes" and not (shutil.which("cc") or shutil.which("gcc")):
            assert fig["not_available"] and "C compiler" in fig["not_available"][0]
            continue
        if name in ("postgres", "cluster") and postgres is not None:  # skipped, in one line
            assert fig["not_available"] == [postgres] and not fig["rows"], fig
            continue
        assert fig["rows"] and fig["runs"], name
        if name == "durable_writes":
            assert all("max-write-batch" in na for na in fig["not_available"]), fig["not_available"]
        else:
            assert fig["not_available"] == [], (name, fig["not_available"])
    assert figures["health_pipelined"]["metrics"]["health_pipelined"]["ours_requests_per_s"] > 0
    if postgres is None:  # several servers: every probe heard, the killed server's VMs released
        cluster = figures["cluster"]["metrics"]
        assert cluster["event_latency_ms"]["cross_p99"] > 0 and cluster["release_s"] > 0
        lifecycle = cluster["lifecycle"]
        assert lifecycle["two_rate_per_s"] > 0 and len(lifecycle["two_cpu_us_per_request_per_server"]) == 2
    assert figures["small_reads"]["metrics"]["get_all_vms"]["reference_requests_per_s"] > 0
    assert figures["durable_writes"]["metrics"]["group_commit_writes_per_s"] > 0
    # Read back from each server's shutdown log line: one commit per write means exactly that.
    assert figures["durable_writes"]["metrics"]["writes_per_commit"]["one_commit"] == 1.0
    assert figures["durable_writes"]["metrics"]["writes_per_commit"]["group"] >= 1.0
    assert figures["large_inventory"]["metrics"]["big"]["get_all_vms_warm_s"] > 0
    assert figures["idle_sessions"]["metrics"]["ours_kb_per_session"] is not None
    assert all(figures["fairness"]["metrics"][v]["burst_s"] > 0 for v in ("prefix", "page", "health"))
    assert figures["memory"]["metrics"]["unread"]["growth_mb"] is not None
    assert figures["memory"]["metrics"]["unterminated"]["closed_by_server"] is not None
    sub = figures["subscribers"]["metrics"]
    assert sub["ops_per_s_with"] > 0 and sub["ops_per_s_without"] > 0
    assert sub["events_received"] + sub["events_dropped"] == sub["events_expected"] > 0
    gc = figures["gc_pauses"]["metrics"]
    assert gc["exit_status"] == 0 and gc["burst_s"] > 0
    assert gc["gc"] is None or gc["gc"]["collections"] >= 0
    fl = figures["fleet"]["metrics"]
    assert fl["exit_status"] == 0 and fl["shutdown_events"] == fl["agents"]
    assert fl["closed_by_server_at_exit"] == fl["agents"]
    assert fl["events_received"] + fl["events_dropped"] == fl["events_expected"] == 2 * fl["agents"] * fl["subscribers"]
    if postgres is None:
        pg = figures["postgres"]["metrics"]
        assert pg["reads_health"]["postgres_requests_per_s"] > 0 and pg["reads_get_all_vms"]["sqlite_requests_per_s"] > 0
        assert pg["writes"]["postgres_rate_per_s"] > 0 and pg["writes"]["sqlite_rate_per_s"] > 0
        assert pg["writes"]["writes_per_commit"]["postgres"] >= 1.0
        assert pg["floor"]["floor_threads"]["inserts_per_s"] > 0 and pg["floor"]["best_inserts_per_s"] > 0
        assert pg["stored"]["floor_rows"] > 0
    else:
        need_postgres()  # where PostgreSQL is required (CI), its figure must not be skipped
    http = figures["http"]["metrics"]  # the test extra has aiohttp: figure 15 is not skipped
    assert http["floor"]["rate_per_s"] > 0 and http["aiohttp"]
    for path in ("health", "get_all_vms"):
        assert http[path]["requests_per_s"] > 0 and http[path]["cpu_ratio_schedstat"] is not None
        assert http[path]["reply_bytes"] > 0
    assert http["get_all_vms"]["reply_bytes"] > http["health"]["reply_bytes"]  # the list, not an error
    assert all(set(r) == {"run", "floor", "health", "get_all_vms"} for r in figures["http"]["runs"])
    assert "health pipelined" in proc.stdout.decode()  # the table was printed
    # --merge replaces only the figures run now.
    again = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--only", "1", "--merge", "--out",
                            str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=SMOKE_TIMEOUT)
    assert again.returncode == 0, again.stderr.decode(errors="replace")
    merged = json.loads(out.read_text())
    assert set(merged["figures"]) == FIGURE_NAMES and merged["merged"][-1]["figures"] == ["health_pipelined"]
    assert merged["figures"]["fleet"] == figures["fleet"]
