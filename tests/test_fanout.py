"""Live events to many subscribers: encoded once, queued as references, and written to each
subscriber once per loop turn by one flusher (no task per subscriber), so a storm of changes
reaches every prompt subscriber whole. Throughput is figure 10 of ``make bench``."""

from __future__ import annotations

import asyncio
import json

from conftest import Wire, running, vm_args


async def _subscribers(port: int, n: int) -> list[Wire]:
    subs = await asyncio.gather(*(Wire.open(port) for _ in range(n)))
    for w in subs:
        await w.ok("subscribe")
    return list(subs)


async def test_a_subscriber_costs_no_task_of_its_own(db_path):
    async with running(db_path) as srv:
        port = srv.address[1]
        idle = await Wire.open(port)  # a session's own task, for comparison
        tasks_before = len(asyncio.all_tasks())
        subs = await _subscribers(port, 300)
        per_session = (len(asyncio.all_tasks()) - tasks_before) / len(subs)
        # Each session has its serving task (and the test's own reader side has none); a pump
        # task per subscriber (as before) would make this 2.
        assert per_session <= 1.05, f"{per_session:.2f} tasks per subscribed session"
        await idle.ok("connect_vm", **vm_args("fan-1"))
        lines = [await w.recv_line() for w in subs]
        assert len(set(lines)) == 1 and json.loads(lines[0])["event"] == "vm_added"  # one encoding for all
        for w in subs + [idle]:
            await w.close()


async def test_a_storm_reaches_every_prompt_subscriber_whole(db_path):
    agents, each, watchers = 40, 50, 150
    async with running(db_path) as srv:
        port = srv.address[1]
        subs = await _subscribers(port, watchers)
        expected = 2 * agents * each  # vm_added and vm_connected for every VM

        async def watch(w: Wire) -> list[tuple[str, str]]:
            seen = []
            while len(seen) < expected:
                msg = json.loads(await w.recv_line())
                assert msg["event"] != "overflow", f"dropped {msg['data']['dropped']} after {len(seen)} events"
                seen.append((msg["event"], msg["data"]["vm_id"]))
            return seen

        watching = [asyncio.create_task(watch(w)) for w in subs]
        crowd = await asyncio.gather(*(Wire.open(port) for _ in range(agents)))

        async def storm(i: int, w: Wire) -> None:
            lines = [json.dumps({"cmd": "connect_vm", "args": vm_args(f"st-{i}-{k}")}) for k in range(each)]
            await w.send_raw(("\n".join(lines) + "\n").encode())  # all at once, pipelined
            for _ in range(each):
                assert json.loads(await w.recv_line())["ok"] is True

        await asyncio.gather(*(storm(i, w) for i, w in enumerate(crowd)))
        seen = await asyncio.gather(*watching)
        assert all(s == seen[0] for s in seen), "every subscriber sees the same events in the same order"
        assert sorted(seen[0]) == sorted([(e, f"st-{i}-{k}") for i in range(agents) for k in range(each)
                                          for e in ("vm_added", "vm_connected")])
        for w in subs + list(crowd):
            await w.close()
