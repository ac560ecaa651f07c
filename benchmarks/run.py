"""The benchmark suite: our server against a reference server, on loopback, on this machine.

    python -m benchmarks.run                     # every figure, 5 runs each (several minutes)
    python -m benchmarks.run --smoke             # tiny sizes, 1 run: checks the suite works (seconds)
    python -m benchmarks.run --only 1,2 --runs 7 # some figures (numbers or names), more runs
    python -m benchmarks.run --out /tmp/r.json   # where the JSON results go
    python -m benchmarks.run --only 7 --fsync-delay-ms 5   # figure 7 with a slower simulated disk

It starts every server itself as a subprocess on 127.0.0.1 (ours on a temporary SQLite file
with its shipped durability settings, and the bare reference server of
``benchmarks.reference_server``), pins the servers to CPU 0 and itself to CPU 1, runs each
workload against the servers in turn (alternating which goes first), and reports the median
of the runs. Figures (see BENCHMARKS.md for what each measures and what limits it):

1. ``health_pipelined``   health pipelined on one connection: requests/s, server CPU per request
2. ``small_reads``        50 connections, health and get_all_vms (10 VMs): + p50/p99 latency
3. ``durable_writes``     50 agents doing add_vm then update_vm: group commit vs one commit per write
4. ``agent_lifecycle``    1,000 agents: connect, authorize, update, deauthorize, disconnect
5. ``large_inventory``    100,000 VMs: get_all_vms/get_all_disks time and memory, health p99 meanwhile
6. ``idle_sessions``      10,000 idle sessions: memory per session; the server still answers
7. ``slow_disk_writes``   figure 3 with each fsync made 1 ms slower (a simulated slower disk)

Results are printed as a table and written as JSON (default ``benchmarks/results.json``; in
smoke mode a temporary file unless ``--out`` is given). Exit status: 0 when every figure
ran (whether or not it met its target), 1 when one failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import re
import resource
import selectors
import signal
import sqlite3
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import loadgen, procstat
from .loadgen import LoadError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"
SERVER_CPU, CLIENT_CPU = 0, 1
_LISTENING = re.compile(r"listening on (?:\[([^\]]+)\]|([^\s:]+)):(\d+)")
_TS = "2026-11-26T21:26:13.902Z"


# --- sizes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    runs: int = 5
    pipelined_requests: int = 50000
    window: int = 64
    connections: int = 50
    concurrent_requests: int = 30000
    small_vms: int = 10
    write_agents: int = 50
    write_rounds: int = 100  # each round: one add_vm and one update_vm per agent
    fsync_delay_ms: float = 1.0  # figure 7: how much slower each fsync is made
    lifecycle_agents: int = 1000
    large_vms: int = 100000
    warm_calls: int = 5  # warm get_all_vms/get_all_disks calls per run, after the cold one
    idle_sessions: int = 10000
    probe_interval: float = 0.005
    timeout: float = 300.0  # no single workload may take longer than this
    smoke: bool = False

    @property
    def medium_vms(self) -> int:
        return max(1, self.large_vms // 10)


FULL = Settings()
SMOKE = Settings(runs=1, pipelined_requests=200, window=16, connections=5, concurrent_requests=200,
                 write_agents=5, write_rounds=4, lifecycle_agents=20, large_vms=100, warm_calls=1,
                 idle_sessions=50, timeout=60.0, smoke=True)


# --- processes ------------------------------------------------------------------------------


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (0: this process) to one CPU, when the machine has two."""
    if not can_pin():
        return
    tids = [pid] if pid == 0 else [int(t) for t in os.listdir(f"/proc/{pid}/task")] if os.path.isdir(f"/proc/{pid}/task") else [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, {cpu})


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The subprocesses' environment: without VMSERVER_* settings (a token, a db...) from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMSERVER_")}
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class ServerStartError(Exception):
    def __init__(self, name: str, returncode: int | None, log: str) -> None:
        super().__init__(f"{name} did not start (exit status {returncode}): {log.strip()[-800:]}")
        self.returncode = returncode
        self.log = log


class ServerProc:
    """A server subprocess: started, pinned, its port read from its log; stderr drained to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.startup_s = 0.0
        self._ready = threading.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=60)
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> ServerProc:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=ROOT, env=_env(self.env))
        pin(self.proc.pid, SERVER_CPU)
        self._thread = threading.Thread(target=self._drain, name=f"{self.name}-stderr", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.02):
            if self.proc.poll() is not None:
                self._thread.join(5.0)
                raise ServerStartError(self.name, self.proc.returncode, self.log_tail())
            if time.monotonic() > deadline:
                raise ServerStartError(self.name, None, f"no 'listening on' line within {timeout}s: {self.log_tail()}")
        self.startup_s = time.perf_counter() - t0
        pin(self.proc.pid, SERVER_CPU)  # again: threads it may have started meanwhile
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "ab") as log:
            for raw in iter(self.proc.stderr.readline, b""):
                log.write(raw)
                line = raw.decode("utf-8", "replace")
                self._tail.append(line)
                if not self._ready.is_set():
                    match = _LISTENING.search(line)
                    if match:
                        self.port = int(match.group(3))
                        self._ready.set()

    def log_tail(self) -> str:
        return "".join(self._tail)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            if self._thread is not None:
                self._thread.join(5.0)
        return self.proc.returncode

    def cpu(self) -> tuple[float, float | None]:
        return procstat.cpu_seconds(self.pid), procstat.cpu_seconds_precise(self.pid)

    def mem(self) -> dict[str, int]:
        return procstat.memory(self.pid)


class Bench:
    """Starts servers for one figure in a temporary directory and stops them all at the end."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.s = settings
        self.tmp = tmp
        self.procs: list[ServerProc] = []

    def ours(self, name: str, db: Path | None = None, extra: Sequence[str] = (), timeout: float = 120.0,
             env: dict[str, str] | None = None) -> ServerProc:
        db = db or self.tmp / f"{name}.db"
        argv = [sys.executable, "-m", "vmserver", "--host", "127.0.0.1", "--port", "0", "--db", str(db),
                "--log-level", "INFO", *extra]
        return self._start(ServerProc(name, argv, self.tmp / f"{name}.log", env), timeout)

    def reference(self, name: str = "reference", vms: int = 10) -> ServerProc:
        argv = [sys.executable, "-m", "benchmarks.reference_server", "--host", "127.0.0.1", "--port", "0",
                "--vms", str(vms)]
        return self._start(ServerProc(name, argv, self.tmp / f"{name}.log"), 60.0)

    def _start(self, proc: ServerProc, timeout: float) -> ServerProc:
        self.procs.append(proc)
        return proc.start(timeout)

    def stop(self, proc: ServerProc) -> int | None:
        code = proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)
        return code

    def close(self) -> None:
        while self.procs:
            self.procs.pop().stop()


# --- measurements ---------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def order(run: int, names: Sequence[str]) -> list[str]:
    """Alternate which server goes first from one run to the next."""
    return list(names) if run % 2 == 0 else list(reversed(names))


INTERFERENCE: list[float] = []  # per measurement: share of the server's CPU taken by other processes


@dataclass
class Measured:
    """One workload on one server: the load generator's result plus the server's own accounting."""

    result: loadgen.Result
    cpu_s: float
    cpu_precise_s: float | None
    client_cpu_s: float
    interference: float | None = None

    def per_request(self, n: int | None = None) -> dict[str, Any]:
        n = n or self.result.ok
        out = {"rate_per_s": self.result.rate, "cpu_us_per_request": self.cpu_s / n * 1e6,
               "cpu_us_per_request_schedstat": None if self.cpu_precise_s is None else self.cpu_precise_s / n * 1e6,
               "client_cpu_us_per_request": self.client_cpu_s / n * 1e6,
               "ok": self.result.ok, "errors": self.result.errors, "elapsed_s": self.result.elapsed,
               "server_cpu_taken_by_others": self.interference}
        if self.result.latencies:
            out["p50_ms"] = self.result.percentile(50) * 1e3
            out["p99_ms"] = self.result.percentile(99) * 1e3
            out["latency_histogram_us"] = loadgen.histogram(self.result.latencies)
        return out


def measure(server: ServerProc, work: Callable[[], loadgen.Result], expected: int | None) -> Measured:
    """Run ``work`` and read the server's CPU time around it; every reply must have been ok."""
    b0 = procstat.cpu_busy_seconds(SERVER_CPU) if can_pin() else None
    c0, p0 = server.cpu()
    k0 = time.process_time()
    w0 = time.perf_counter()
    result = work()
    wall = time.perf_counter() - w0
    k1 = time.process_time()
    c1, p1 = server.cpu()
    b1 = procstat.cpu_busy_seconds(SERVER_CPU) if can_pin() else None
    result.require_all_ok(expected)
    others = None
    if b0 is not None and b1 is not None and wall > 0:
        others = min(1.0, max(0.0, (b1 - b0 - (c1 - c0)) / wall))
        INTERFERENCE.append(others)
    return Measured(result, c1 - c0, None if p0 is None or p1 is None else p1 - p0, k1 - k0, others)


def med_of(runs: list[dict[str, Any]], key: str) -> float | None:
    return median([r.get(key) for r in runs])


# --- figure bookkeeping ---------------------------------------------------------------------


@dataclass
class Row:
    label: str
    ours: float | None
    other: float | None = None  # the reference, or the baseline named in the label
    unit: str = ""
    ratio: float | None = None
    target: str = ""  # e.g. "<= 1.15"
    met: bool | None = None


def check(value: float | None, op: str, limit: float) -> bool | None:
    if value is None:
        return None
    return {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}[op]


@dataclass
class Figure:
    number: int
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    not_available: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def row(self, label: str, ours: float | None, other: float | None = None, unit: str = "",
            ratio_value: float | None = None, target: tuple[str, float] | None = None,
            target_on: str = "ratio") -> None:
        """Add a table row; ``target`` (op, limit) applies to the ratio or, with target_on="ours", the value."""
        met = None
        text = ""
        if target is not None:
            op, limit = target
            met = check(ratio_value if target_on == "ratio" else ours, op, limit)
            text = f"{'ratio ' if target_on == 'ratio' else ''}{op} {limit:g}{'' if target_on == 'ratio' else ' ' + unit}".strip()
        self.rows.append(Row(label, ours, other, unit, ratio_value, text, met))

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.number, "name": self.name, "title": self.title,
            "available": self.error is None, "error": self.error, "not_available": self.not_available,
            "seconds": round(self.seconds, 2), "metrics": self.metrics, "notes": self.notes,
            "targets": [asdict(r) for r in self.rows if r.target],
            "rows": [asdict(r) for r in self.rows], "runs": self.runs,
        }


# --- workloads ----------------------------------------------------------------------------------


def vm_spec(vm_id: str, ram: int = 2048, cpu: int = 2) -> dict[str, Any]:
    return {"vm_id": vm_id, "ram": ram, "cpu": cpu,
            "disks": [{"disk_id": f"{vm_id}-d0", "size": 100}, {"disk_id": f"{vm_id}-d1", "size": 200}]}


def open_many(port: int, n: int) -> list[tuple[Any, bytearray]]:
    """``n`` greeted connections; all closed again if one cannot be opened."""
    opened: list[tuple[Any, bytearray]] = []
    try:
        for _ in range(n):
            opened.append(loadgen.open_connection(port))
    except BaseException:
        for sock, _ in opened:
            sock.close()
        raise
    return opened


def populate(port: int, vms: Sequence[dict[str, Any]], connections: int = 10, timeout: float = 300.0) -> None:
    """add_vm every spec, over a few connections; every reply must be ok."""
    opened = open_many(port, max(1, min(connections, len(vms))))
    try:
        scripts: list[list[tuple[str, dict[str, Any] | None]]] = [[] for _ in opened]
        for i, spec in enumerate(vms):
            scripts[i % len(opened)].append(("add_vm", spec))
        loadgen.run_sessions(port, scripts, opened=opened, timeout=timeout).require_all_ok(len(vms))
    finally:
        for sock, _ in opened:
            sock.close()


def check_list_len(port: int, cmd: str, expected: int) -> None:
    reader = loadgen.ListReader(port)
    try:
        _, line = reader.fetch(cmd, 1)
        loadgen.check_list_reply(line, 1, expected)
    finally:
        reader.close()


def fig_health_pipelined(b: Bench, fig: Figure) -> None:
    s = b.s
    servers = {"ours": b.ours("ours"), "reference": b.reference()}
    n = s.pipelined_requests
    for server in servers.values():  # warm-up, not counted
        loadgen.pipelined(server.port, total=min(n, 2000), window=s.window, timeout=s.timeout).require_all_ok()
    for run in range(s.runs):
        entry: dict[str, Any] = {"run": run}
        for name in order(run, list(servers)):
            server = servers[name]
            m = measure(server, lambda: loadgen.pipelined(server.port, total=n, window=s.window, timeout=s.timeout), n)
            entry[name] = m.per_request(n)
        fig.runs.append(entry)
    _compare(fig, "health pipelined", throughput_target=True, cpu_target=1.15)
    fig.notes.append(f"{n} health requests per run on one connection, {s.window} in flight; "
                     f"median of {s.runs} runs; CPU from /proc/<pid>/stat (10 ms ticks), schedstat cross-check in JSON")


def _compare(fig: Figure, label: str, throughput_target: bool, cpu_target: float, latency: bool = False) -> None:
    """Rows and metrics for a workload measured on ours and on the reference, run by run."""
    def med(server: str, key: str) -> float | None:
        return med_of([r[server] for r in fig.runs], key)

    prefix = label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    rps_o, rps_r = med("ours", "rate_per_s"), med("reference", "rate_per_s")
    cpu_o, cpu_r = med("ours", "cpu_us_per_request"), med("reference", "cpu_us_per_request")
    pre_o, pre_r = med("ours", "cpu_us_per_request_schedstat"), med("reference", "cpu_us_per_request_schedstat")
    cli_o, cli_r = med("ours", "client_cpu_us_per_request"), med("reference", "client_cpu_us_per_request")
    fig.metrics[prefix] = {
        "ours_requests_per_s": rps_o, "reference_requests_per_s": rps_r, "throughput_ratio": ratio(rps_o, rps_r),
        "ours_cpu_us_per_request": cpu_o, "reference_cpu_us_per_request": cpu_r, "cpu_ratio": ratio(cpu_o, cpu_r),
        "ours_cpu_us_per_request_schedstat": pre_o, "reference_cpu_us_per_request_schedstat": pre_r,
        "cpu_ratio_schedstat": ratio(pre_o, pre_r),
        # Each run measures both servers back to back: the median of the per-run ratios is
        # less sensitive to drift in the machine's load than the ratio of the medians.
        "cpu_ratio_paired": median([ratio(r["ours"]["cpu_us_per_request"], r["reference"]["cpu_us_per_request"])
                                    for r in fig.runs]),
        "throughput_ratio_paired": median([ratio(r["ours"]["rate_per_s"], r["reference"]["rate_per_s"])
                                           for r in fig.runs]),
        "loadgen_cpu_us_per_request": {"ours": cli_o, "reference": cli_r},
    }
    fig.row(f"{label}: requests/s", rps_o, rps_r, "/s", ratio(rps_o, rps_r),
            (">=", 0.8) if throughput_target else None)
    fig.row(f"{label}: server CPU/request", cpu_o, cpu_r, "µs", ratio(cpu_o, cpu_r), ("<=", cpu_target))
    if latency:
        for p in ("p50_ms", "p99_ms"):
            o, r = med("ours", p), med("reference", p)
            fig.metrics[prefix][f"ours_{p}"] = o
            fig.metrics[prefix][f"reference_{p}"] = r
            fig.row(f"{label}: {p[:3]} latency", o, r, "ms", ratio(o, r))


def fig_small_reads(b: Bench, fig: Figure) -> None:
    s = b.s
    ours = b.ours("ours")
    ref = b.reference(vms=s.small_vms)
    populate(ours.port, [vm_spec(f"vm-{i}") for i in range(1, s.small_vms + 1)])
    for server in (ours, ref):  # both answer a list of the same length, and the workload is warm
        check_list_len(server.port, "get_all_vms", s.small_vms)
        loadgen.concurrent(server.port, "get_all_vms", total=min(2000, s.concurrent_requests),
                           connections=s.connections, timeout=s.timeout).require_all_ok()
    servers = {"ours": ours, "reference": ref}
    n = s.concurrent_requests
    for run in range(s.runs):
        entry: dict[str, Any] = {"run": run}
        for cmd in ("health", "get_all_vms"):
            for name in order(run, list(servers)):
                server = servers[name]
                m = measure(server, lambda: loadgen.concurrent(server.port, cmd, total=n, connections=s.connections,
                                                               timeout=s.timeout), n)
                entry[f"{name}_{cmd}"] = m.per_request(n)
        fig.runs.append(entry)
    for cmd, cpu_target in (("health", 1.15), ("get_all_vms", 1.5)):
        sub = Figure(fig.number, fig.name, fig.title,
                     runs=[{"ours": r[f"ours_{cmd}"], "reference": r[f"reference_{cmd}"]} for r in fig.runs])
        label = f"{s.connections} conns {cmd}" + (f" ({s.small_vms} VMs)" if cmd == "get_all_vms" else "")
        _compare(sub, label, throughput_target=True, cpu_target=cpu_target, latency=True)
        fig.rows += sub.rows
        fig.metrics[cmd] = next(iter(sub.metrics.values()))
    fig.notes.append(f"{n} requests per run over {s.connections} connections, one in flight on each; "
                     f"reference answers get_all_vms with a constant list of {s.small_vms} VM records it json.dumps each time")


_WRITER_LOG = re.compile(r"database writer: (\d+) writes in (\d+) transactions")


def fig_durable_writes(b: Bench, fig: Figure) -> None:
    _durable_writes(b, fig)


def fig_slow_disk_writes(b: Bench, fig: Figure) -> None:
    """Figure 3 again with every fsync made slower, as on a disk slower than this VM's."""
    shim = build_slow_fsync(b.tmp)
    if shim is None:
        fig.not_available.append("slow_disk: no C compiler (cc) to build benchmarks/slow_fsync.c")
        return
    delay_us = int(b.s.fsync_delay_ms * 1000)
    _durable_writes(b, fig, {"LD_PRELOAD": str(shim), "SLOW_FSYNC_US": str(delay_us)}, target=False)
    fig.notes.append(f"simulated disk: every fsync and fdatasync of the server takes {b.s.fsync_delay_ms:g} ms "
                     "longer (benchmarks/slow_fsync.c, loaded with LD_PRELOAD; the server is unchanged)")


def build_slow_fsync(tmp: Path) -> Path | None:
    """Compile the fsync-delaying shim; None when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = tmp / "slow_fsync.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(ROOT / "benchmarks" / "slow_fsync.c"), "-ldl"],
                   check=True, capture_output=True, timeout=120)
    return out


def _durable_writes(b: Bench, fig: Figure, env: dict[str, str] | None = None, target: bool = True) -> None:
    s = b.s
    tag = "slow" if env else "fast"
    servers: dict[str, ServerProc] = {"group": b.ours(f"ours-{tag}", env=env)}
    try:
        servers["one_commit"] = b.ours(f"ours-{tag}-batch1", extra=["--max-write-batch", "1"], env=env)
    except ServerStartError as exc:
        if exc.returncode == 2 and "unrecognized arguments" in exc.log:
            fig.not_available.append("one_commit_per_write: the server does not accept --max-write-batch yet "
                                     "(exit status 2, unrecognized arguments)")
        else:
            raise
    agents, rounds = s.write_agents, s.write_rounds
    writes = agents * rounds * 2
    expected_vms = {name: 0 for name in servers}
    for run in range(s.runs):
        entry: dict[str, Any] = {"run": run}
        for name in order(run, list(servers)):
            server = servers[name]
            opened = open_many(server.port, agents)
            try:
                own = [f"r{run}-a{i}" for i in range(agents)]
                setup = [[("connect_vm", vm_spec(v)), ("authorize_vm", {"vm_id": v})] for v in own]
                loadgen.run_sessions(server.port, setup, opened=opened, timeout=s.timeout).require_all_ok(2 * agents)
                scripts = [[step for j in range(rounds) for step in (
                    ("add_vm", vm_spec(f"{v}-{j}")), ("update_vm", {"vm_id": v, "ram": 1024 + j}))] for v in own]
                loop0 = procstat.main_thread_cpu_seconds(server.pid)
                m = measure(server, lambda: loadgen.run_sessions(server.port, scripts, opened=opened,
                                                                  timeout=s.timeout), writes)
                loop_s = procstat.main_thread_cpu_seconds(server.pid) - loop0
            finally:
                for sock, _ in opened:
                    sock.close()
            expected_vms[name] += agents * (rounds + 1)
            per = m.per_request(writes)
            # Split by thread: the event loop (parse, check, reply) and the rest, i.e. the writer (SQL, commit).
            per.update(writes=writes, loop_cpu_us_per_write=loop_s / writes * 1e6,
                       writer_cpu_us_per_write=(m.cpu_s - loop_s) / writes * 1e6,
                       cpu_busy=per["cpu_us_per_request"] * per["rate_per_s"] / 1e6)
            entry[name] = per
        fig.runs.append(entry)
    # Durability check: what the server acknowledged is in the file once it has stopped.
    per_commit: dict[str, float | None] = {}
    for name, server in servers.items():
        db = Path(server.argv[server.argv.index("--db") + 1])
        b.stop(server)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            stored = conn.execute("SELECT count(*) FROM vms").fetchone()[0]
        if stored != expected_vms[name]:
            raise LoadError(f"{name}: {stored} VMs in the database after the run, {expected_vms[name]} acknowledged")
        found = _WRITER_LOG.findall(server.log_path.read_text(errors="replace"))
        per_commit[name] = int(found[-1][0]) / max(1, int(found[-1][1])) if found else None
    g = med_of([r["group"] for r in fig.runs], "rate_per_s")
    one = med_of([r["one_commit"] for r in fig.runs], "rate_per_s") if "one_commit" in servers else None

    def med2(key: str) -> tuple[float | None, float | None]:
        return (med_of([r["group"] for r in fig.runs], key),
                med_of([r["one_commit"] for r in fig.runs], key) if one else None)

    fig.metrics = {
        "group_commit_writes_per_s": g, "one_commit_per_write_writes_per_s": one, "ratio": ratio(g, one),
        "group_commit_p99_ms": med2("p99_ms")[0], "one_commit_p99_ms": med2("p99_ms")[1],
        "group_commit_cpu_us_per_write": med2("cpu_us_per_request")[0],
        "one_commit_cpu_us_per_write": med2("cpu_us_per_request")[1],
        "writes_per_commit": per_commit,
    }
    fig.row("writes/s: default (group commit) vs --max-write-batch 1", g, one, "/s", ratio(g, one),
            (">=", 5.0) if target else None)
    fig.row("write p99 latency", *med2("p99_ms"), "ms", ratio(*med2("p99_ms")))
    fig.row("writes per commit (whole run, from the server log)", per_commit.get("group"), per_commit.get("one_commit"))
    for key, label in (("cpu_us_per_request", "server CPU per write"), ("loop_cpu_us_per_write", "  event loop thread"),
                       ("writer_cpu_us_per_write", "  writer thread")):
        fig.row(label, *med2(key), "µs", ratio(*med2(key)))
    fig.row("server CPU busy during the run (1 = its CPU is saturated)", *med2("cpu_busy"))
    fig.notes.append(f"{agents} agents, each with its own connection and its own authorized VM, send {rounds} x "
                     f"(add_vm of a new VM with two disks, update_vm of its VM): {writes} durable writes per run; "
                     "every acknowledged VM was found in the SQLite file after the server stopped")


def fig_agent_lifecycle(b: Bench, fig: Figure) -> None:
    s = b.s
    n = s.lifecycle_agents
    ours, ref = b.ours("ours"), b.reference()
    names = [f"agent-{i}" for i in range(n)]
    populate(ours.port, [vm_spec(v) for v in names])  # registered beforehand, WITHOUT passwords
    servers = {"ours": ours, "reference": ref}
    for run in range(s.runs):
        scripts = [[("connect_vm", {"vm_id": v}), ("authorize_vm", {"vm_id": v}),
                    ("update_vm", {"vm_id": v, "ram": 4096 + run}), ("deauthorize_vm", {"vm_id": v}),
                    ("disconnect_vm", {"vm_id": v})] for v in names]
        entry: dict[str, Any] = {"run": run}
        for name in order(run, list(servers)):
            server = servers[name]
            m = measure(server, lambda: loadgen.run_sessions(server.port, scripts, concurrency=n,
                                                              timeout=s.timeout), 5 * n)
            r = m.result
            entry[name] = {"seconds": r.elapsed, "agents_per_s": n / r.elapsed, "commands_per_s": r.rate,
                           "agent_p50_ms": loadgen.percentile(r.session_times, 50) * 1e3,
                           "agent_p99_ms": loadgen.percentile(r.session_times, 99) * 1e3,
                           "command_p99_ms": r.percentile(99) * 1e3,
                           "cpu_ms_per_agent": m.cpu_s / n * 1e3, "client_cpu_ms_per_agent": m.client_cpu_s / n * 1e3}
        fig.runs.append(entry)
    for key, label, unit in (("agents_per_s", "agents/s", "/s"), ("seconds", "wall time", "s"),
                             ("agent_p50_ms", "one agent's lifecycle p50", "ms"),
                             ("agent_p99_ms", "one agent's lifecycle p99", "ms"),
                             ("command_p99_ms", "command p99", "ms"),
                             ("cpu_ms_per_agent", "server CPU per agent", "ms")):
        o = med_of([r["ours"] for r in fig.runs], key)
        r_ = med_of([r["reference"] for r in fig.runs], key)
        fig.metrics[f"ours_{key}"], fig.metrics[f"reference_{key}"] = o, r_
        fig.row(f"{n} agents: {label}", o, r_, unit, ratio(o, r_))
    fig.notes.append(f"{n} agents at once, each on its own new connection: greeting, connect_vm, authorize_vm, "
                     "update_vm, deauthorize_vm, disconnect_vm, close. VMs were registered beforehand WITHOUT "
                     "passwords, so this measures the server, not scrypt (~70 ms per password check)")


# --- figure 5: a large inventory ----------------------------------------------------------------------


def inventory_rows(n: int) -> tuple[list[tuple], list[tuple]]:
    vms = [(i, f"vm-{i:06d}", 1024 * (1 + i % 8), 1 + i % 4, None, _TS, _TS) for i in range(1, n + 1)]
    disks = [row for i in range(1, n + 1) for row in (
        (2 * i - 1, f"disk-{i:06d}-a", 10 + i % 100, i), (2 * i, f"disk-{i:06d}-b", 100 + i % 500, i))]
    return vms, disks


def inventory_records(vms: list[tuple], disks: list[tuple]) -> list[dict[str, Any]]:
    """The records get_all_vms returns for these rows (nobody connected), as plain dicts."""
    by_vm: dict[int, list[dict[str, Any]]] = {}
    for d in disks:
        by_vm.setdefault(d[3], []).append({"id": d[0], "disk_id": d[1], "size": d[2], "vm_id": d[3]})
    return [{"id": v[0], "vm_id": v[1], "ram": v[2], "cpu": v[3], "disks": by_vm.get(v[0], []),
             "connected": False, "authorized": False, "last_connected": v[5]} for v in vms]


def build_db(path: Path, vms: list[tuple], disks: list[tuple]) -> None:
    """The schema from our own Store, then every row in one plain sqlite3 transaction."""
    from vmserver.store import Store

    Store(str(path)).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN")
        db.executemany("INSERT INTO vms (id, vm_id, ram, cpu, password_hash, last_connected, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", vms)
        db.executemany("INSERT INTO disks (id, disk_id, size, vm_id) VALUES (?, ?, ?, ?)", disks)
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class Prober:
    """``python -m benchmarks.loadgen probe`` as a subprocess, pinned with the load generator."""

    def __init__(self, port: int, interval: float, log_path: Path) -> None:
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen", "probe", "--port", str(port), "--interval", str(interval),
             "--max-seconds", "900"] + (["--cpu", str(CLIENT_CPU)] if can_pin() else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT, env=_env())
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(30.0):
                raise LoadError("prober not ready within 30 s")
            line = self.proc.stdout.readline()
        finally:
            sel.close()
        if line.strip() != b"ready":
            raise LoadError(f"prober did not start: {line!r}, see {log_path}")

    def finish(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=60)  # closes its stdin: the signal to stop
        if self.proc.returncode != 0:
            raise LoadError(f"prober failed with status {self.proc.returncode}, see {self.log.name}")
        data = json.loads(out)
        if data["errors"] or data["unanswered"]:
            raise LoadError(f"prober: {data['errors']} errors, {data['unanswered']} unanswered: {data['error_samples']}")
        return data

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def _same_reply(line: bytes, rid: int, first: bytes) -> bool:
    """Is ``line`` the reply to id ``rid`` with the same content as ``first`` (a reply to another id)?"""
    head = b'{"id":%d,' % rid
    return line.startswith(head) and line[len(head):] == first[first.index(b",") + 1:]


def measure_inventory(b: Bench, label: str, db: Path, n: int, run: int, probe: bool) -> dict[str, Any]:
    """Start ours on a prepared db, time cold then warm list calls, read its memory; optionally probe."""
    s = b.s
    server = b.ours(f"ours-{label}-{run}", db=db, timeout=600.0)
    prober: Prober | None = None
    out: dict[str, Any] = {"vms": n, "startup_s": server.startup_s}
    try:
        after_load = server.mem()
        out["rss_loaded_mb"] = after_load["rss"] / 2**20
        out["peak_load_mb"] = after_load["peak"] / 2**20  # VmHWM so far: includes loading
        peaks = [after_load["peak"]]
        if probe:
            prober = Prober(server.port, s.probe_interval, b.tmp / f"probe-{label}-{run}.log")
        reader = loadgen.ListReader(server.port, size_hint=400 * n, timeout=s.timeout)
        windows: list[tuple[float, float]] = []
        warm_windows: list[tuple[float, float]] = []
        try:
            firsts: dict[str, bytes] = {}
            rid = 1
            for cmd, count in (("get_all_vms", n), ("get_all_disks", 2 * n)):
                reset = procstat.reset_peak(server.pid)
                w0 = time.monotonic()
                elapsed, line = reader.fetch(cmd, rid)
                windows.append((w0, time.monotonic()))
                mem = server.mem()
                peaks.append(mem["peak"])
                loadgen.check_list_reply(line, rid, count)  # outside the timed window
                firsts[cmd] = line
                out[f"{cmd}_cold_s"] = elapsed
                out[f"{cmd}_bytes"] = len(line)
                out[f"{cmd}_cold_peak_mb"] = mem["peak"] / 2**20 if reset else None
                rid += 1
            for cmd in ("get_all_vms", "get_all_disks"):
                times = []
                for _ in range(s.warm_calls):
                    w0 = time.monotonic()
                    elapsed, line = reader.fetch(cmd, rid)
                    windows.append((w0, time.monotonic()))
                    warm_windows.append(windows[-1])
                    if not _same_reply(line, rid, firsts[cmd]):
                        raise LoadError(f"warm {cmd} reply differs from the cold one")
                    times.append(elapsed)
                    rid += 1
                out[f"{cmd}_warm_s"] = median(times)
            # After one change (an add_vm), as on a busy fleet, where most lists follow some change.
            loadgen.run_sessions(server.port, [[("add_vm", vm_spec(f"changed-{run}"))]],
                                 timeout=s.timeout).require_all_ok(1)
            for cmd, count in (("get_all_vms", n + 1), ("get_all_disks", 2 * n + 2)):
                w0 = time.monotonic()
                elapsed, line = reader.fetch(cmd, rid)
                windows.append((w0, time.monotonic()))
                loadgen.check_list_reply(line, rid, count)
                out[f"{cmd}_changed_s"] = elapsed
                rid += 1
            loadgen.run_sessions(server.port, [[("remove_vm", {"vm_id": f"changed-{run}"})]],
                                 timeout=s.timeout).require_all_ok(1)  # the next run starts from the same file
            peaks.append(server.mem()["peak"])
        finally:
            reader.close()
        out["peak_mb"] = max(peaks) / 2**20
        if prober is not None:
            data = prober.finish()
            inside = [lat for due, lat in data["samples"] if any(a <= due <= z for a, z in windows)]
            warm = [lat for due, lat in data["samples"] if any(a <= due <= z for a, z in warm_windows)]
            out["health_samples_during_calls"] = len(inside)
            out["health_p99_ms"] = loadgen.percentile(inside, 99) * 1e3 if inside else None
            out["health_max_ms"] = max(inside) * 1e3 if inside else None
            out["health_samples_during_warm_calls"] = len(warm)
            out["health_p99_ms_warm_calls_only"] = loadgen.percentile(warm, 99) * 1e3 if warm else None
            out["health_p99_ms_whole_probe"] = loadgen.percentile([lat for _, lat in data["samples"]], 99) * 1e3
    finally:
        if prober is not None:
            prober.kill()
        b.stop(server)
    return out


def fig_large_inventory(b: Bench, fig: Figure) -> None:
    s = b.s
    big, mid = s.large_vms, s.medium_vms
    dbs: dict[str, Path] = {}
    records_by_size: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    for label, n in (("mid", mid), ("big", big)):
        vms, disks = inventory_rows(n)
        dbs[label] = b.tmp / f"inventory-{n}.db"
        build_db(dbs[label], vms, disks)
        records_by_size[label] = inventory_records(vms, disks)
        del vms, disks
    fig.metrics["db_build_s"] = time.perf_counter() - t0
    for run in range(s.runs):
        entry: dict[str, Any] = {"run": run}
        for label in order(run, ["mid", "big"]):
            n = big if label == "big" else mid
            entry[label] = measure_inventory(b, label, dbs[label], n, run, probe=label == "big")
            t = time.perf_counter()
            json.dumps(records_by_size[label], separators=(",", ":"))
            entry[label]["json_dumps_s"] = time.perf_counter() - t
        fig.runs.append(entry)

    def med(label: str, key: str) -> float | None:
        return med_of([r[label] for r in fig.runs], key)

    m = fig.metrics
    for label in ("big", "mid"):
        m[label] = {key: med(label, key) for key in fig.runs[0][label]}
    dumps = med("big", "json_dumps_s")
    for cmd in ("get_all_vms", "get_all_disks"):
        for kind in ("warm", "cold", "changed"):
            o = med("big", f"{cmd}_{kind}_s")
            what = "after one change" if kind == "changed" else kind
            fig.row(f"{big} VMs {cmd} {what}, end to end" + (" vs json.dumps" if cmd == "get_all_vms" else ""),
                    o, dumps if cmd == "get_all_vms" else None, "s",
                    ratio(o, dumps) if cmd == "get_all_vms" else None,
                    ("<", 1.0) if cmd == "get_all_vms" and kind == "warm" else None)
    fig.row(f"plain json.dumps of the same {big} records", dumps, None, "s")
    for cmd in ("get_all_vms", "get_all_disks"):
        for kind in ("warm", "cold", "changed"):
            o, small = med("big", f"{cmd}_{kind}_s"), med("mid", f"{cmd}_{kind}_s")
            what = "after one change" if kind == "changed" else kind
            fig.row(f"{cmd} {what}: {big} vs {mid} VMs", o, small, "s", ratio(o, small),
                    ("<=", 11.0) if cmd == "get_all_vms" and kind == "warm" else None)
    fig.row(f"server peak memory, {big} VMs loaded and listed", med("big", "peak_mb"), None, "MB",
            target=("<=", 600.0), target_on="ours")
    fig.row(f"server RSS after loading {big} VMs", med("big", "rss_loaded_mb"), med("mid", "rss_loaded_mb"), "MB")
    fig.row(f"server start-up (load) with {big} VMs", med("big", "startup_s"), med("mid", "startup_s"), "s")
    fig.row("health p99 from a second client during the lists", med("big", "health_p99_ms"), None, "ms",
            target=("<", 100.0), target_on="ours")
    fig.row("health worst case during the lists", med("big", "health_max_ms"), None, "ms")
    fig.row("health p99 during the warm lists only", med("big", "health_p99_ms_warm_calls_only"), None, "ms")
    m["ratios"] = {
        "get_all_vms_warm_vs_json_dumps": ratio(med("big", "get_all_vms_warm_s"), dumps),
        "get_all_vms_cold_vs_json_dumps": ratio(med("big", "get_all_vms_cold_s"), dumps),
        "get_all_vms_warm_big_vs_mid": ratio(med("big", "get_all_vms_warm_s"), med("mid", "get_all_vms_warm_s")),
        "get_all_vms_cold_big_vs_mid": ratio(med("big", "get_all_vms_cold_s"), med("mid", "get_all_vms_cold_s")),
    }
    fig.notes.append(
        f"inventories of {big} and {mid} VMs (two disks each) written to SQLite before the server starts; "
        f"cold = first call after start-up, warm = median of {s.warm_calls} later calls, after one change = the "
        "call after an add_vm; end to end = request sent "
        "to the reply's last byte received (the reply is parsed and checked afterwards, untimed); "
        f"health sent every {s.probe_interval * 1e3:g} ms by a separate process, open loop, latency from when each "
        "request was due; peak = VmHWM, reset before each cold call")


def fig_idle_sessions(b: Bench, fig: Figure) -> None:
    s = b.s
    n = s.idle_sessions
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = n + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        if new_soft < wanted:
            n = max(1, new_soft - 512)
            fig.notes.append(f"open-file limit {hard}: measured {n} sessions, not {s.idle_sessions}")
    for run in range(s.runs):
        entry: dict[str, Any] = {"run": run}
        for name in order(run, ["ours", "reference"]):
            if name == "ours":
                server = b.ours(f"ours-idle-{run}", extra=["--max-connections", str(max(20000, n + 100))])
            else:
                server = b.reference(f"reference-idle-{run}")
            try:
                entry[name] = _idle_run(server, n, s)
            finally:
                b.stop(server)
        fig.runs.append(entry)
    for key, label, unit, target in (
            ("kb_per_session", "server memory per idle session", "KB", ("<=", 30.0)),
            ("others_p99_ms", "health p99 of another client meanwhile", "ms", None),
            ("open_s", f"time to open {n} sessions", "s", None)):
        o, r = med_of([r["ours"] for r in fig.runs], key), med_of([r["reference"] for r in fig.runs], key)
        fig.metrics[f"ours_{key}"], fig.metrics[f"reference_{key}"] = o, r
        fig.row(label if key != "kb_per_session" else f"{label} ({n} sessions)", o, r, unit, ratio(o, r),
                target, target_on="ours")
    fig.metrics["sessions"] = n
    fig.notes.append(f"RSS delta / sessions after {n} connections have each read their greeting; then a new "
                     "client sends health requests and a sample of the idle sessions each sends one health; "
                     "kernel socket buffers are not in RSS")


def _idle_run(server: ServerProc, n: int, s: Settings) -> dict[str, Any]:
    warm, _ = loadgen.open_connection(server.port)  # one session first: one-time allocations are not per-session
    warm.close()
    time.sleep(0.2)
    before = server.mem()["rss"]
    t0 = time.perf_counter()
    socks = loadgen.open_idle(server.port, n, timeout=s.timeout)
    try:
        open_s = time.perf_counter() - t0
        time.sleep(0.5)
        after = server.mem()["rss"]
        others = loadgen.concurrent(server.port, "health", total=min(1000, 20 * n), connections=5,
                                    timeout=s.timeout).require_all_ok()
        sample = socks[:: max(1, n // 100)]
        for i, sock in enumerate(sample):  # idle sessions are alive and answer too
            sock.sendall(loadgen.request_line("health", None, i))
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise LoadError("an idle session was closed by the server")
                line += chunk
            msg = json.loads(line)
            if msg.get("ok") is not True or msg.get("id") != i:
                raise LoadError(f"idle session answered {line[:200]!r}")
    finally:
        for sock in socks:
            sock.close()
    return {"sessions": n, "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
            "kb_per_session": (after - before) / n / 1024, "open_s": open_s,
            "others_p99_ms": others.percentile(99) * 1e3, "idle_sessions_checked": len(sample)}


FIGURES: list[tuple[int, str, str, Callable[[Bench, Figure], None]]] = [
    (1, "health_pipelined", "health pipelined on one connection", fig_health_pipelined),
    (2, "small_reads", "concurrent small reads: health, get_all_vms of 10 VMs", fig_small_reads),
    (3, "durable_writes", "durable writes: group commit vs one commit per write", fig_durable_writes),
    (4, "agent_lifecycle", "agent lifecycle", fig_agent_lifecycle),
    (5, "large_inventory", "a large inventory", fig_large_inventory),
    (6, "idle_sessions", "idle sessions", fig_idle_sessions),
    (7, "slow_disk_writes", "figure 3 on a simulated slower disk", fig_slow_disk_writes),
]


# --- output ---------------------------------------------------------------------------------------


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if unit == "/s" or a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def table(figures: list[Figure]) -> str:
    head = ("#", "measure", "ours", "baseline", "unit", "ratio", "target", "")
    lines = [head]
    for f in figures:
        if f.error is not None:
            lines.append((str(f.number), f"{f.title}: FAILED ({f.error.splitlines()[0][:80]})", "", "", "", "", "", ""))
            continue
        for r in f.rows:
            verdict = "" if r.met is None else ("met" if r.met else "MISSED")
            if r.target and r.met is None:
                verdict = "n/a"
            lines.append((str(f.number), r.label, fmt(r.ours, r.unit), fmt(r.other, r.unit) if r.other is not None else "",
                          r.unit, fmt(r.ratio) if r.ratio is not None else "", r.target, verdict))
        for _ in f.not_available:
            lines.append((str(f.number), "(a comparison is not available: see below)", "", "", "", "", "", ""))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    right = {2, 3, 5}
    out = []
    for k, row in enumerate(lines):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "kernel": platform.release(),
            "pinned": can_pin(), "server_cpu": SERVER_CPU if can_pin() else None,
            "loadgen_cpu": CLIENT_CPU if can_pin() else None, "load_average_at_start": os.getloadavg()}


def select_figures(only: str | None) -> list[tuple[int, str, str, Callable[[Bench, Figure], None]]]:
    if not only:
        return FIGURES
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    chosen = [f for f in FIGURES if str(f[0]) in wanted or f[1] in wanted]
    unknown = wanted - {str(f[0]) for f in chosen} - {f[1] for f in chosen}
    if unknown:
        raise SystemExit(f"unknown figure(s): {', '.join(sorted(unknown))} "
                         f"(choose from {', '.join(f'{n}/{name}' for n, name, _, _ in FIGURES)})")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description="vmserver benchmark suite")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one run: checks the suite works")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 5; 1 with --smoke)")
    parser.add_argument("--only", default=None, help="comma-separated figure numbers or names")
    parser.add_argument("--out", default=None, help=f"JSON results file (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--fsync-delay-ms", type=float, default=None,
                        help=f"figure 7: how much longer each fsync takes (default {FULL.fsync_delay_ms:g})")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.runs is not None:
        if args.runs < 1:
            parser.error("--runs must be at least 1")
        settings = replace(settings, runs=args.runs)
    if args.fsync_delay_ms is not None:
        if not 0 <= args.fsync_delay_ms <= 1000:
            parser.error("--fsync-delay-ms must be between 0 and 1000")
        settings = replace(settings, fsync_delay_ms=args.fsync_delay_ms)
    chosen = select_figures(args.only)
    if args.out:
        out_path = Path(args.out)
    elif args.smoke:
        out_path = Path(tempfile.gettempdir()) / f"vmserver-bench-smoke-{os.getpid()}.json"
    else:
        out_path = DEFAULT_OUT
    pin(0, CLIENT_CPU)
    info = machine()
    print(f"vmserver benchmarks{' (smoke: sizes too small for the targets to mean anything)' if settings.smoke else ''}: "
          f"{info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}, {settings.runs} run(s) per figure; "
          + (f"servers on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}" if info["pinned"] else "not pinned"),
          flush=True)
    if info["load_average_at_start"][0] > 1.0:
        print(f"warning: load average {info['load_average_at_start'][0]:.2f}: other work on this machine makes "
              "throughput and latency noisy (CPU per request much less so)", flush=True)
    figures: list[Figure] = []
    started = time.time()
    for number, name, title, fn in chosen:
        fig = Figure(number, name, title)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"vmbench-{number}-") as tmp:
            bench = Bench(settings, Path(tmp))
            try:
                fn(bench, fig)
            except Exception as exc:  # one figure failing must not hide the others
                fig.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                bench.close()
        fig.seconds = time.perf_counter() - t0
        fig.metrics.setdefault("load_average_after", os.getloadavg())
        figures.append(fig)
        print(f"  figure {number} ({name}): {'FAILED' if fig.error else 'done'} in {fig.seconds:.1f}s", flush=True)
    print()
    print(table(figures))
    for f in figures:
        for note in f.notes:
            print(f"  [{f.number}] {note}")
        for na in f.not_available:
            print(f"  [{f.number}] not available: {na}")
    results = {"machine": info, "settings": asdict(settings), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
               "seconds": round(time.time() - started, 1),
               "figures": {f.name: f.to_json() for f in figures}}
    if INTERFERENCE:
        info["server_cpu_taken_by_others"] = {"median": median(INTERFERENCE), "max": max(INTERFERENCE)}
        print(f"\ninterference: other processes used {median(INTERFERENCE):.0%} (median; worst {max(INTERFERENCE):.0%}) "
              f"of CPU {SERVER_CPU}, the servers' CPU, during the measurements of figures 1-4 and 7")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nresults written to {out_path}")
    return 1 if any(f.error for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
