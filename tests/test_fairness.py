"""Sessions are served fairly: no session's burst, and no crowd hanging up at once, makes the
others wait for all of it.

The order in which the server published events (one subscriber sees them all, in the order they
happened) tells whether a bystander was served during a burst or only after it; nothing here
times anything (the latencies are figures 8 and 12 of ``make bench``).
"""

from __future__ import annotations

import asyncio
import json
import sys

from conftest import Wire, running, vm_args


async def test_a_pipelined_burst_does_not_hold_up_other_sessions(db_path):
    burst = 3000
    async with running(db_path, idle_timeout=0) as srv:
        port = srv.address[1]
        a, b, watcher = await Wire.open(port), await Wire.open(port), await Wire.open(port)
        await a.ok("connect_vm", **vm_args("burst-a"))
        await b.ok("connect_vm", **vm_args("bystander-b"))
        await watcher.ok("subscribe", events=["vm_authorized", "vm_deauthorized"])
        lines = [b"authorize_vm vm_id=burst-a", b"deauthorize_vm vm_id=burst-a"] * (burst // 2)
        await a.send_raw(b"\n".join(lines) + b"\n")  # one write: every line is in the server's buffer at once
        await b.send("authorize_vm vm_id=bystander-b")
        seen: list[str] = []
        while len(seen) < burst + 1:
            msg = json.loads(await watcher.recv_line())
            seen.append(msg["data"]["vm_id"])
        position = seen.index("bystander-b")
        # Served back to back, the burst would come first whole (position 3000); with a slice of
        # work per turn the bystander gets in within the first few dozen.
        assert position < burst // 3, f"the bystander was served after {position} of the burst's {burst} requests"
        assert json.loads(await b.recv_line())["ok"] is True
        for _ in range(burst):
            assert json.loads(await a.recv_line())["ok"] is True
        for w in (a, b, watcher):
            await w.close()


_CROWD = r"""
import json, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    args = {"vm_id": "crowd-%05d" % i, "ram": 1024, "cpu": 1, "disks": []}
    s.sendall(json.dumps({"cmd": "connect_vm", "args": args}).encode() + b"\n")
    socks.append(s)
for s in socks:
    f = s.makefile("rb")
    assert b"hello" in f.readline() and json.loads(f.readline())["ok"] is True
print("ready", flush=True)
sys.stdin.read()  # until killed
"""


async def test_a_crowd_hanging_up_at_once_is_released_a_slice_at_a_time(db_path):
    """A bystander asks for health every millisecond while 2,000 sessions hang up at once (the
    process holding them is killed, so the kernel closes them all in one go): its replies must
    come between the releases, not only after all of them."""
    crowd = 2000
    async with running(db_path, idle_timeout=0) as srv:
        port = srv.address[1]
        watcher = await Wire.open(port)
        agents = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CROWD, str(port), str(crowd),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        try:
            assert await asyncio.wait_for(agents.stdout.readline(), 60) == b"ready\n"
            await watcher.ok("subscribe", events=["vm_disconnected"])
            done = asyncio.Event()

            async def ask() -> None:
                n = 0
                while not done.is_set():
                    n += 1
                    await watcher.send({"cmd": "health", "id": n})
                    await asyncio.sleep(0.001)

            asker = asyncio.create_task(ask())
            await asyncio.sleep(0.02)
            jobs_before = srv.inventory.store.writer.writes
            agents.kill()
            released = run = longest = 0
            while released < crowd:
                msg = json.loads(await watcher.recv_line())
                if "event" in msg:
                    assert msg["event"] == "vm_disconnected" and msg["data"]["reason"] == "session_closed", msg
                    released += 1
                    run += 1
                    longest = max(longest, run)
                else:
                    assert msg["ok"] is True, msg
                    run = 0
            done.set()
            await asker
        finally:
            if agents.returncode is None:
                agents.kill()
            await agents.wait()
        # Released in one go, nearly all 2,000 disconnections would come in one run.
        assert longest < crowd // 4, f"{longest} of {crowd} releases came without a reply to the bystander between them"
        await watcher.send({"cmd": "health", "id": "last"})
        while json.loads(await watcher.recv_line()).get("id") != "last":
            pass  # the bystander's replies still on their way
        assert (await watcher.ok("stats"))["connected"] == 0
        rows = await watcher.ok("get_history", event="vm_disconnected", limit=crowd)
        assert len(rows) == crowd  # every release recorded...
        jobs = srv.inventory.store.writer.writes - jobs_before
        assert jobs < crowd // 10, f"{crowd} history rows took {jobs} write jobs"  # ...in batches
        await watcher.close()
