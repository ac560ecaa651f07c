"""The reference server: the floor for any server of our shape (asyncio, one JSON line in, one out).

It does the least such a server can do: send a constant greeting, then for each line
``json.loads`` it, ``json.dumps`` a constant reply (echoing the request's ``id`` so pipelined
clients can check the order) and write it. No validation, no storage, no state. Its replies
have the shape of ours: ``{"id":...,"ok":true,"result":...}``; ``get_all_vms`` and
``get_all_disks`` answer a constant list of ``--vms`` VM records (two disks each) so a list
costs it what serialising such a list costs, every other command answers ``"OK"``. A line
that is not a JSON object is answered ``ok:false`` so a load generator can tell.

    python -m benchmarks.reference_server --port 0      # 'listening on 127.0.0.1:<port>' on stderr

Serves until SIGTERM or SIGINT, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
from typing import Any

GREETING = b'{"hello":{"server":"reference"}}\n'
_WRITE_HIGH_WATER = 256 * 1024  # same backpressure rule as our server: stop reading past this
_MAX_LINE = 1 << 20  # same line limit as our server


def vm_records(n: int) -> list[dict[str, Any]]:
    """``n`` VM records of the shape our server returns, two disks each."""
    return [
        {"id": i, "vm_id": f"vm-{i}", "ram": 2048, "cpu": 2,
         "disks": [{"id": 2 * i - 1, "disk_id": f"disk-{i}-a", "size": 100, "vm_id": i},
                   {"id": 2 * i, "disk_id": f"disk-{i}-b", "size": 200, "vm_id": i}],
         "connected": False, "authorized": False, "last_connected": "2026-11-26T21:26:13.902Z"}
        for i in range(1, n + 1)
    ]


def disk_records(n: int) -> list[dict[str, Any]]:
    return [{**d, "vm": vm["vm_id"]} for vm in vm_records(n) for d in vm["disks"]]


class Reference:
    def __init__(self, vms: int) -> None:
        self.results: dict[str, Any] = {"get_all_vms": vm_records(vms), "get_all_disks": disk_records(vms)}

    def reply(self, line: bytes) -> bytes:
        try:
            request = json.loads(line)
        except ValueError as exc:
            request, error = None, f"not valid JSON: {exc}"
        else:
            error = None if isinstance(request, dict) else "a request must be a JSON object"
        if error is not None:
            reply: dict[str, Any] = {"id": None, "ok": False, "error": {"code": "bad_request", "message": error}}
        else:
            reply = {"id": request.get("id"), "ok": True, "result": self.results.get(request.get("cmd"), "OK")}
        return (json.dumps(reply, separators=(",", ":")) + "\n").encode("ascii")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(GREETING)
            while True:
                line = await reader.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                writer.write(self.reply(line))
                if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await writer.drain()
        except (ConnectionError, OSError, ValueError):  # ValueError: over-long line
            pass
        finally:
            writer.close()


def _raise_fd_limit() -> None:
    """Idle-session figures open thousands of connections: allow as many descriptors as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


async def main_async(host: str, port: int, vms: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ref = Reference(vms)
    server = await asyncio.start_server(ref.serve, host, port, limit=_MAX_LINE + 1, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"reference server listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed on stderr)")
    parser.add_argument("--vms", type=int, default=10, help="VMs in the constant get_all_vms reply (default 10)")
    args = parser.parse_args(argv)
    _raise_fd_limit()
    try:
        return asyncio.run(main_async(args.host, args.port, args.vms))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
