"""The benchmark suite cannot silently measure nothing: its parts are checked against real servers.

(a) The reference server and the load generators, at tiny sizes, against real servers (ours
and the reference, as subprocesses): what they count as a success really is one, error
replies are counted as errors, and malformed replies stop the run. (b) The whole suite in
smoke mode, as a subprocess, produces every figure. No timing is asserted anywhere: a busy
machine must not fail these tests.
"""

from __future__ import annotations

import json
import os
import shutil
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

from benchmarks import loadgen, procstat, reference_server  # noqa: E402
from benchmarks.loadgen import LoadError  # noqa: E402
from benchmarks.run import Bench, SMOKE, ServerStartError, vm_spec  # noqa: E402

SMOKE_TIMEOUT = 60.0  # the smoke run must finish well within this (it takes seconds)


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


# --- (b) the whole suite, smoke-sized ---------------------------------------------------------


FIGURE_NAMES = {"health_pipelined", "small_reads", "durable_writes", "agent_lifecycle", "large_inventory",
                "idle_sessions", "slow_disk_writes"}


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
    assert sorted(f["figure"] for f in figures.values()) == [1, 2, 3, 4, 5, 6, 7]
    for name, fig in figures.items():
        assert fig["available"] and fig["error"] is None, (name, fig["error"])
        if name == "slow_disk_writes" and not (shutil.which("cc") or shutil.which("gcc")):
            assert fig["not_available"] and "C compiler" in fig["not_available"][0]
            continue
        assert fig["rows"] and fig["runs"], name
        if name == "durable_writes":
            assert all("max-write-batch" in na for na in fig["not_available"]), fig["not_available"]
        else:
            assert fig["not_available"] == [], (name, fig["not_available"])
    assert figures["health_pipelined"]["metrics"]["health_pipelined"]["ours_requests_per_s"] > 0
    assert figures["small_reads"]["metrics"]["get_all_vms"]["reference_requests_per_s"] > 0
    assert figures["durable_writes"]["metrics"]["group_commit_writes_per_s"] > 0
    # Read back from each server's shutdown log line: one commit per write means exactly that.
    assert figures["durable_writes"]["metrics"]["writes_per_commit"]["one_commit"] == 1.0
    assert figures["durable_writes"]["metrics"]["writes_per_commit"]["group"] >= 1.0
    assert figures["large_inventory"]["metrics"]["big"]["get_all_vms_warm_s"] > 0
    assert figures["idle_sessions"]["metrics"]["ours_kb_per_session"] is not None
    assert "health pipelined" in proc.stdout.decode()  # the table was printed
