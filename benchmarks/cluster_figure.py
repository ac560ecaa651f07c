"""Figure 14's measurements that need more than the load generator: how long a change on one
server takes to reach a subscriber on another, and how long a killed server's VMs stay held.

Plain blocking sockets with deadlines, one request at a time: these are latencies, not rates.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from . import loadgen


class Line:
    """One session: send a request, read lines (replies and events) with a deadline."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock, self.buf = loadgen.open_connection(port, timeout)
        self.sock.setblocking(True)
        self.timeout = timeout

    def send(self, cmd: str, **args: Any) -> None:
        self.sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")

    def read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise loadgen.LoadError("no line in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise loadgen.LoadError("the server closed the session")
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return json.loads(line)

    def call(self, cmd: str, **args: Any) -> Any:
        self.send(cmd, **args)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self.read(deadline)
            if "ok" in message:
                if not message["ok"]:
                    raise loadgen.LoadError(f"{cmd}: {message['error']}")
                return message["result"]

    def close(self) -> None:
        self.sock.close()


def event_latency(writer_port: int, subscriber_port: int, vm_id: str, samples: int,
                  timeout: float) -> dict[str, list[float]]:
    """update_vm ``vm_id`` through ``writer_port`` ``samples`` times, one at a time; each time, the
    seconds from the request to its reply, and from the reply to the vm_updated event heard by a
    subscriber on ``subscriber_port`` (negative: the event came first)."""
    writer, sub = Line(writer_port, timeout), Line(subscriber_port, timeout)
    out: dict[str, list[float]] = {"reply": [], "event_after_reply": [], "event_after_request": []}
    try:
        writer.call("connect_vm", vm_id=vm_id)
        writer.call("authorize_vm", vm_id=vm_id)
        sub.call("subscribe", events=["vm_updated"], vm_id=vm_id)
        for n in range(samples):
            sent = time.perf_counter()
            writer.call("update_vm", vm_id=vm_id, ram=1024 + n)
            replied = time.perf_counter()
            event = sub.read(time.monotonic() + timeout)
            heard = time.perf_counter()
            if event.get("event") != "vm_updated" or event["data"]["ram"] != 1024 + n:
                raise loadgen.LoadError(f"expected the vm_updated of ram {1024 + n}, got {event}")
            out["reply"].append(replied - sent)
            out["event_after_reply"].append(heard - replied)
            out["event_after_request"].append(heard - sent)
        writer.call("disconnect_vm", vm_id=vm_id)
    finally:
        writer.close()
        sub.close()
    return out


def release_after_kill(victim_pid: int, victim_port: int, watcher_port: int, vm_ids: list[str],
                       timeout: float) -> float:
    """Connect ``vm_ids`` through the victim, SIGKILL it, and time until a subscriber on the
    watcher has heard each one's vm_disconnected (reason server_lost), exactly once."""
    holder, sub = Line(victim_port, timeout), Line(watcher_port, timeout)
    try:
        for vm_id in vm_ids:
            holder.call("connect_vm", vm_id=vm_id)
        sub.call("subscribe", events=["vm_disconnected"])
        # Every VM shows connected on the watcher first: the kill is measured, not the feed.
        deadline = time.monotonic() + timeout
        while len(sub.call("get_connected_vms")) < len(vm_ids):
            if time.monotonic() > deadline:
                raise loadgen.LoadError("the watcher never saw every VM connected")
            time.sleep(0.01)
        killed = time.perf_counter()
        os.kill(victim_pid, signal.SIGKILL)
        left = set(vm_ids)
        deadline = time.monotonic() + timeout
        while left:
            event = sub.read(deadline)
            data = event.get("data", {})
            if event.get("event") != "vm_disconnected" or data.get("reason") != "server_lost" \
                    or data.get("vm_id") not in left:
                raise loadgen.LoadError(f"unexpected event after the kill: {event}")
            left.discard(data["vm_id"])
        return time.perf_counter() - killed
    finally:
        for line in (holder, sub):
            try:
                line.close()
            except OSError:
                pass
