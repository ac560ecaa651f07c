"""A fleet of client connections spread over load-generator processes ("workers").

One process may hold only so many sockets (here: 20,000 open files, the hard limit), and a
whole fleet in the benchmark's own loop would also slow its other clients; so agents and
subscribers live in worker processes, each one selector over raw non-blocking sockets
(like :mod:`benchmarks.loadgen`'s), driven by the benchmark through JSON lines:

    python -m benchmarks.fleet worker --port P     # started by Fleet; commands on stdin

Each command line is answered by one line on stdout when it is done, or ``{"error": ...}``
when it failed or ran out of time. Between commands a worker keeps serving its sockets: a
connection the server closes is closed too (and counted), subscribers keep reading. Every
time a worker reports is ``time.monotonic()``, one clock for every process on Linux, so the
benchmark can set the first request any worker sent against the last reply any received.

Commands (``op``):

- ``open``: ``count`` agent connections named ``name_fmt % (first + i)``, each reading its
  greeting and then running ``script`` (if given); at most ``pending`` connects in progress
  at once, so the server's accept queue never overflows into SYN retries.
- ``run``: ``script`` on the open agents ``start:stop``, all at once, one request in flight
  on each. A script is ``[[cmd, args], ...]``; the text ``{vm}`` in args is the agent's name.
- ``close``: close every agent connection now.
- ``subscribe``: ``count`` subscriber sessions, each sending ``subscribe`` with ``args``.
  From then on they only read, promptly, counting event lines by name (without parsing).
- ``count``: the subscribers' counts so far; ``close_subs``: close them and reset.
- ``status``, ``port``, ``exit``.

A reply's ``ok`` counts replies with ``"ok":true``; ``errors`` other replies; ``failures``
connections that could not do their part (refused, closed by the server, no greeting).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .loadgen import LoadError, _check_greeting, _parse, percentile, request_prefix, start_connect

ROOT = Path(__file__).resolve().parent.parent
_RECV = 256 * 1024
_SAMPLES = 5
PER_WORKER = 6000  # connections one worker holds at most (well under the open-file limit)
EVENT_NAMES = ("vm_added", "vm_updated", "vm_removed", "vm_connected", "vm_disconnected", "vm_authorized",
               "vm_deauthorized", "auth_failed", "overflow", "shutdown")
_EVENT_MARKS = [(name, b'{"event":"' + name.encode() + b'"') for name in EVENT_NAMES]
_DROPPED = re.compile(rb'\{"event":"overflow","data":\{"dropped":(\d+)\}')


def die_with_parent() -> None:
    """In a child, before exec: have the kernel send it SIGTERM when the process that started it
    dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so no server outlives a killed suite."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def raise_fd_limit() -> int:
    """Lift this process's soft open-file limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``n`` items over ``parts`` workers as (first index, count), as even as possible."""
    out, first = [], 0
    for k in range(parts):
        count = n // parts + (1 if k < n % parts else 0)
        out.append((first, count))
        first += count
    return out


def render(script: Sequence[Sequence[Any]]) -> list[bytes]:
    """A script's request prefixes, with the text ``{vm}`` left in for each agent's name
    (JSON leaves braces in strings as they are, so a plain replace fills it in)."""
    return [request_prefix(cmd, args or None) for cmd, args in script]


def for_agent(steps: Sequence[bytes], name: str) -> list[bytes]:
    """One agent's requests, in reverse order (popped from the end)."""
    raw = name.encode()
    return [step.replace(b"{vm}", raw) for step in reversed(steps)]


# --- the worker process ---------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "name", "buf", "greeted", "steps", "expect", "sent_at", "sub", "phase")

    def __init__(self, sock: socket.socket, name: str, sub: bool = False) -> None:
        self.sock: socket.socket | None = sock
        self.name = name
        self.buf = bytearray()
        self.greeted = False
        self.steps: list[bytes] = []  # requests still to send, in order (reversed: pop from the end)
        self.expect: int | None = None
        self.sent_at = 0.0
        self.sub = sub
        self.phase = 0  # subscribers: 0 greeting, 1 subscribe sent, 2 counting events


class _Op:
    """The command in progress and what it has seen so far."""

    def __init__(self, cmd: dict[str, Any]) -> None:
        self.cmd = cmd
        self.deadline = time.monotonic() + float(cmd.get("timeout", 120.0))
        self.t0 = time.monotonic()
        self.to_open: collections.deque[str] = collections.deque()
        self.connecting = 0
        self.busy = 0  # connections whose part is not done yet
        self.ok = self.errors = self.failures = 0
        self.samples: list[Any] = []
        self.latencies: list[float] = []
        self.first_send: float | None = None
        self.last_reply: float | None = None
        self.steps: list[bytes] | None = render(cmd["script"]) if cmd.get("script") else None

    def sample(self, what: Any) -> None:
        if len(self.samples) < _SAMPLES:
            self.samples.append(what)

    def report(self) -> dict[str, Any]:
        lat = self.latencies
        return {"ok": self.ok, "errors": self.errors, "failures": self.failures, "samples": self.samples,
                "t0": self.t0, "t1": time.monotonic(), "first_send": self.first_send, "last_reply": self.last_reply,
                "latencies": [round(x, 6) for x in lat]}


class Worker:
    def __init__(self, port: int) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.agents: list[_Conn] = []
        self.subs: list[_Conn] = []
        self.op: _Op | None = None
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.next_id = 1
        self.closed_by_server = 0
        self.agent_events: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()
        self.dropped = 0
        self.subs_closed = 0
        self.stdin = bytearray()
        self.running = True

    # --- control --------------------------------------------------------------------

    def serve(self) -> None:
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, None)
        while self.running:
            op = self.op
            wait = 0.05 if op is not None else 1.0
            for key, _ in self.sel.select(wait):
                if key.data is None:
                    self._read_stdin()
                elif key.data.sub:
                    self._on_sub(key.data)
                else:
                    self._on_agent(key.data)
            self._progress()

    def _read_stdin(self) -> None:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:  # the benchmark is gone: so are we
            self.running = False
            return
        self.stdin += data
        while b"\n" in self.stdin:
            nl = self.stdin.index(b"\n")
            line = bytes(self.stdin[:nl])
            del self.stdin[:nl + 1]
            if line.strip():
                self.queue.append(json.loads(line))

    def _answer(self, reply: dict[str, Any]) -> None:
        data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
        fd = sys.stdout.fileno()
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            view = view[n:]

    def _progress(self) -> None:
        """Start queued commands; for the one in progress, open more connections, see if it is done."""
        while self.op is None and self.queue:
            self._start(self.queue.popleft())
        op = self.op
        if op is None:
            return
        self._open_more(op)
        if not op.to_open and op.connecting == 0 and op.busy == 0:
            self.op = None
            self._answer(op.report())
        elif time.monotonic() > op.deadline:
            self.op = None
            self._answer({"error": f"{op.cmd['op']}: timed out after {op.cmd.get('timeout', 120.0)}s with "
                                   f"{op.busy} connections unfinished, {len(op.to_open)} not opened "
                                   f"({op.ok} ok, {op.errors} errors, {op.failures} failures; {op.samples})"})
            for conn in self.agents + self.subs:  # what was in flight is abandoned
                conn.steps.clear()
                conn.expect = None
                if not conn.greeted or (conn.sub and conn.phase < 2):
                    self._drop(conn)

    def _start(self, cmd: dict[str, Any]) -> None:
        kind = cmd["op"]
        if kind in ("open", "subscribe"):
            op = _Op(cmd)
            if kind == "open":
                fmt, first = cmd["name_fmt"], int(cmd.get("first", 0))
                op.to_open.extend(fmt % (first + i) for i in range(int(cmd["count"])))
                self.agents = [c for c in self.agents if c.sock is not None]
            else:
                op.to_open.extend(f"sub-{i}" for i in range(int(cmd["count"])))
            self.op = op
        elif kind == "run":
            op = _Op(cmd)
            if op.steps is None:
                self._answer({"error": "run: no script"})
                return
            self.op = op
            live = [c for c in self.agents[int(cmd.get("start", 0)):cmd.get("stop")] if c.sock is not None]
            for conn in live:  # every request ready before the first goes out
                conn.steps = for_agent(op.steps, conn.name)
            op.busy += len(live)
            for conn in live:
                self._send_next(conn, op)
        elif kind == "close":
            t0 = time.monotonic()
            closed = 0
            for conn in self.agents:
                if conn.sock is not None:
                    self._drop(conn)
                    closed += 1
            self.agents = []
            self._answer({"closed": closed, "t0": t0, "t1": time.monotonic()})
        elif kind == "count":
            self._answer(self._counts())
        elif kind == "close_subs":
            counts = self._counts()
            for conn in self.subs:
                if conn.sock is not None:
                    self._drop(conn)
            self.subs = []
            self.events.clear()
            self.dropped = self.subs_closed = 0
            self._answer(counts)
        elif kind == "status":
            self._answer({"agents_open": sum(1 for c in self.agents if c.sock is not None),
                          "closed_by_server": self.closed_by_server, "agent_events": dict(self.agent_events)})
        elif kind == "port":
            self.port = int(cmd["port"])
            self._answer({"port": self.port})
        elif kind == "exit":
            for conn in self.agents + self.subs:
                if conn.sock is not None:
                    self._drop(conn)
            self._answer({"exit": True})
            self.running = False
        else:
            self._answer({"error": f"unknown op {kind!r}"})

    def _counts(self) -> dict[str, Any]:
        events = dict(self.events)
        return {"events": events, "received": sum(events.get(n, 0) for n in EVENT_NAMES if n != "overflow"),
                "dropped": self.dropped, "subs_open": sum(1 for c in self.subs if c.sock is not None),
                "subs_closed": self.subs_closed}

    # --- connections ----------------------------------------------------------------

    def _open_more(self, op: _Op) -> None:
        limit = int(op.cmd.get("pending", 256))
        sub = op.cmd["op"] == "subscribe"
        while op.to_open and op.connecting < limit:
            name = op.to_open.popleft()
            sock, err = start_connect(self.port)
            if sock is None:
                op.failures += 1
                op.sample(f"connect: {err}")
                continue
            conn = _Conn(sock, name, sub=sub)
            (self.subs if sub else self.agents).append(conn)
            self.sel.register(sock, selectors.EVENT_READ, conn)
            op.connecting += 1
            op.busy += 1

    def _drop(self, conn: _Conn) -> None:
        if conn.sock is not None:
            self.sel.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def _fail(self, conn: _Conn, why: str) -> None:
        """A connection that cannot do its part of the current command."""
        op = self.op
        if op is not None and (not conn.greeted or conn.steps or conn.expect is not None
                               or (conn.sub and conn.phase < 2)):
            if not conn.greeted:
                op.connecting -= 1
            op.busy -= 1
            op.failures += 1
            op.sample(f"{conn.name}: {why}")
        conn.steps.clear()
        conn.expect = None
        self._drop(conn)

    def _recv(self, conn: _Conn) -> bytes | None:
        """The next chunk; b"" when there was nothing after all; None when the connection ended."""
        assert conn.sock is not None
        try:
            chunk = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            self._ended(conn, f"connection error: {exc}")
            return None
        if not chunk:
            self._ended(conn, "closed by the server")
            return None
        return chunk

    def _ended(self, conn: _Conn, why: str) -> None:
        if conn.sub:
            self.subs_closed += 1
        elif conn.greeted:
            self.closed_by_server += 1
        self._fail(conn, why)

    def _greet(self, conn: _Conn, line: bytes) -> bool:
        op = self.op
        try:
            _check_greeting(line)
        except LoadError as exc:
            self._fail(conn, str(exc)[:200])
            return False
        conn.greeted = True
        if op is not None:
            op.connecting -= 1
        return True

    def _on_agent(self, conn: _Conn) -> None:
        chunk = self._recv(conn)
        if not chunk:
            return
        buf = conn.buf
        buf += chunk
        while conn.sock is not None:
            nl = buf.find(b"\n")
            if nl < 0:
                return
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            if not conn.greeted:
                if not self._greet(conn, line):
                    return
                op = self.op
                if op is not None and op.steps is not None:
                    self._begin(conn, op)
                elif op is not None:
                    op.busy -= 1
                continue
            if line.startswith(b'{"event":"'):
                self.agent_events[line[10:line.index(b'"', 10)].decode()] += 1
                continue
            self._on_reply(conn, line)

    def _begin(self, conn: _Conn, op: _Op) -> None:
        """Start ``op``'s script on ``conn``: the connection counts as busy until it ends."""
        assert op.steps is not None
        conn.steps = for_agent(op.steps, conn.name)
        if op.cmd["op"] == "run":
            op.busy += 1
        self._send_next(conn, op)

    def _send_next(self, conn: _Conn, op: _Op) -> None:
        if not conn.steps:
            conn.expect = None
            op.busy -= 1
            return
        rid = self.next_id
        self.next_id += 1
        data = conn.steps.pop() + b"%d}\n" % rid
        conn.expect = rid
        now = time.monotonic()
        conn.sent_at = now
        if op.first_send is None:
            op.first_send = now
        assert conn.sock is not None
        try:
            sent = conn.sock.send(data)
            if sent < len(data):
                conn.sock.setblocking(True)
                conn.sock.sendall(data[sent:])
                conn.sock.setblocking(False)
        except OSError as exc:
            self._ended(conn, f"send failed: {exc}")

    def _on_reply(self, conn: _Conn, line: bytes) -> None:
        op = self.op
        now = time.monotonic()
        try:
            msg = _parse(line)
        except LoadError as exc:
            if op is not None:
                op.sample(str(exc)[:200])
            self._fail(conn, "unreadable reply")
            return
        if op is None or conn.expect is None or msg.get("id") != conn.expect:
            if op is not None:
                op.sample(f"unexpected reply {line[:200]!r}")
                self._fail(conn, "unexpected reply")
            return
        op.latencies.append(now - conn.sent_at)
        op.last_reply = now
        if msg.get("ok") is True:
            op.ok += 1
        else:
            op.errors += 1
            op.sample(msg.get("error", msg))
        self._send_next(conn, op)

    def _on_sub(self, conn: _Conn) -> None:
        chunk = self._recv(conn)
        if not chunk:
            return
        if conn.phase < 2:
            conn.buf += chunk
            while conn.phase < 2 and conn.sock is not None:
                nl = conn.buf.find(b"\n")
                if nl < 0:
                    return
                line = bytes(conn.buf[:nl])
                del conn.buf[:nl + 1]
                if conn.phase == 0:
                    if not self._greet(conn, line):
                        return
                    op = self.op
                    assert op is not None
                    rid = self.next_id
                    self.next_id += 1
                    conn.expect = rid
                    conn.phase = 1
                    assert conn.sock is not None
                    conn.sock.sendall(request_prefix("subscribe", op.cmd.get("args") or None) + b"%d}\n" % rid)
                else:
                    msg = _parse(line)
                    op = self.op
                    if msg.get("id") != conn.expect or msg.get("ok") is not True:
                        self._fail(conn, f"subscribe answered {line[:200]!r}")
                        return
                    conn.phase = 2
                    conn.expect = None
                    if op is not None:
                        op.ok += 1
                        op.busy -= 1
            if conn.sock is None or not conn.buf:
                return
            chunk = bytes(conn.buf)
            conn.buf = bytearray()
        data = bytes(conn.buf) + chunk if conn.buf else chunk
        end = data.rfind(b"\n") + 1
        conn.buf = bytearray(data[end:])
        if not end:
            return
        events = self.events
        seen = 0
        for name, mark in _EVENT_MARKS:
            k = data.count(mark, 0, end)
            if k:
                events[name] += k
                seen += k
                if name == "overflow":
                    self.dropped += sum(int(m) for m in _DROPPED.findall(data, 0, end))
        lines = data.count(b"\n", 0, end)
        if lines != seen:
            events["other"] += lines - seen


def worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet")
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker", help="hold connections for the benchmark (commands on stdin)")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    raise_fd_limit()
    Worker(args.port).serve()
    return 0


# --- the benchmark's side -------------------------------------------------------------------


class Fleet:
    """Worker processes holding connections for a figure; :meth:`close` stops every one."""

    def __init__(self, port: int, workers: int, log_dir: Path, env: dict[str, str], cpu: int | None = None,
                 name: str = "fleet") -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = []
        self._bufs: list[bytearray] = []
        try:
            for k in range(workers):
                log = open(log_dir / f"{name}-{k}.log", "wb")
                self.logs.append(log)
                argv = [sys.executable, "-m", "benchmarks.fleet", "worker", "--port", str(port)]
                if cpu is not None:
                    argv += ["--cpu", str(cpu)]
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                   stderr=log, cwd=ROOT, env=env, preexec_fn=die_with_parent))
                self._bufs.append(bytearray())
            self.all({"op": "status"}, timeout=60.0)  # every worker is up and answering
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, commands: Sequence[dict[str, Any] | None]) -> list[int]:
        """Give worker k ``commands[k]`` (None: nothing), without waiting. Returns who got one."""
        asked = []
        for k, cmd in enumerate(commands):
            if cmd is None:
                continue
            proc = self.procs[k]
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            proc.stdin.flush()
            asked.append(k)
        return asked

    def wait(self, asked: Sequence[int], timeout: float) -> dict[int, dict[str, Any]]:
        """One answer from each worker in ``asked``. :raises LoadError: an error answer, a worker
        that died, or no answer within ``timeout`` seconds."""
        answers: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        try:
            for k in asked:
                if b"\n" in self._bufs[k]:
                    answers[k] = self._take(k)
                else:
                    sel.register(self.procs[k].stdout, selectors.EVENT_READ, k)  # type: ignore[arg-type]
            while len(answers) < len(asked):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LoadError(f"fleet: no answer from workers {sorted(set(asked) - set(answers))} "
                                    f"within {timeout}s")
                for key, _ in sel.select(min(left, 1.0)):
                    k = key.data
                    data = os.read(key.fd, 1 << 20)
                    if not data:
                        raise LoadError(f"fleet: worker {k} exited (status {self.procs[k].poll()}), "
                                        f"see {self.logs[k].name}")
                    self._bufs[k] += data
                    if b"\n" in self._bufs[k]:
                        answers[k] = self._take(k)
                        sel.unregister(key.fileobj)
        finally:
            sel.close()
        errors = [f"worker {k}: {a['error']}" for k, a in sorted(answers.items()) if "error" in a]
        if errors:
            raise LoadError("; ".join(errors))
        return answers

    def _take(self, k: int) -> dict[str, Any]:
        buf = self._bufs[k]
        nl = buf.index(b"\n")
        line = bytes(buf[:nl])
        del buf[:nl + 1]
        return json.loads(line)

    def ask(self, commands: Sequence[dict[str, Any] | None], timeout: float = 120.0) -> list[dict[str, Any]]:
        answers = self.wait(self.send(commands), timeout)
        return [answers[k] for k in sorted(answers)]

    def all(self, cmd: dict[str, Any], timeout: float = 120.0) -> list[dict[str, Any]]:
        return self.ask([cmd] * len(self.procs), timeout)

    def spread(self, n: int, make: Any, timeout: float = 120.0) -> list[dict[str, Any]]:
        """``make(first, count)`` is worker k's command for its share of ``n`` items."""
        return self.ask([make(first, count) if count else None for first, count in split(n, len(self.procs))],
                        timeout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.close()  # end of its stdin: the worker closes its sockets and exits
                except OSError:
                    pass
        deadline = time.monotonic() + 15.0
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        for log in self.logs:
            log.close()
        self.procs = []


def merge(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The workers' answers to one ``open`` or ``run``, as one: sums, the earliest first request,
    the latest reply, every latency."""
    out: dict[str, Any] = {"ok": 0, "errors": 0, "failures": 0, "samples": [], "latencies": []}
    firsts, lasts = [], []
    for a in answers:
        for key in ("ok", "errors", "failures"):
            out[key] += a[key]
        out["samples"] += a["samples"][: _SAMPLES - len(out["samples"])]
        out["latencies"] += a["latencies"]
        if a["first_send"] is not None:
            firsts.append(a["first_send"])
        if a["last_reply"] is not None:
            lasts.append(a["last_reply"])
    out["t0"] = min(a["t0"] for a in answers)
    out["t1"] = max(a["t1"] for a in answers)
    out["first_send"] = min(firsts) if firsts else None
    out["last_reply"] = max(lasts) if lasts else None
    lat = out["latencies"]
    out["p50_ms"] = percentile(lat, 50) * 1e3 if lat else None
    out["p99_ms"] = percentile(lat, 99) * 1e3 if lat else None
    return out


def require(merged: dict[str, Any], ok: int, what: str) -> dict[str, Any]:
    """:raises LoadError: unless exactly ``ok`` replies were ok and nothing failed."""
    if merged["errors"] or merged["failures"] or merged["ok"] != ok:
        raise LoadError(f"{what}: {merged['ok']} of {ok} ok, {merged['errors']} errors, "
                        f"{merged['failures']} failures, e.g. {merged['samples']}")
    return merged


def sum_counts(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The subscriber workers' ``count`` answers, added up."""
    events: collections.Counter[str] = collections.Counter()
    for a in answers:
        events.update(a["events"])
    return {"events": dict(events), "received": sum(a["received"] for a in answers),
            "dropped": sum(a["dropped"] for a in answers), "subs_open": sum(a["subs_open"] for a in answers),
            "subs_closed": sum(a["subs_closed"] for a in answers)}


class Operator:
    """One blocking session for an operator's commands (``stats`` in a loop, say)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        from .loadgen import open_connection

        self.sock, self.buf = open_connection(port, timeout=timeout)
        self.sock.settimeout(timeout)
        self.rid = 0

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """The result of one command. :raises LoadError: an error reply, or no reply."""
        self.rid += 1
        self.sock.sendall(request_prefix(cmd, args) + b"%d}\n" % self.rid)
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                if line.startswith(b'{"event":"'):
                    continue
                msg = _parse(line)
                if msg.get("id") != self.rid or msg.get("ok") is not True:
                    raise LoadError(f"{cmd} answered {line[:300]!r}")
                return msg["result"]
            try:
                chunk = self.sock.recv(_RECV)
            except socket.timeout:
                raise LoadError(f"{cmd}: no reply in time") from None
            if not chunk:
                raise LoadError(f"{cmd}: connection closed")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    sys.exit(worker_main())
