"""Garbage collection for a heap that is mostly long-lived: no pause grows with the fleet.

CPython's full collections walk every tracked object. At 20,000 sessions that is over a
million objects and hundreds of milliseconds with the event loop stopped, and they free
almost nothing: the inventory and the live sessions are all still in use, and what ends is
freed by reference counting. So, once a second, what survived since the last time is
collected once (a full collection only walks objects that are not frozen) and then frozen:
later collections never walk it again, and each pause is proportional to one second of new
objects, not to the size of the heap.

The cost of freezing: a frozen object that later becomes part of a reference cycle is never
collected. The server breaks the cycles a closed connection would leave (server.py:
``_unlink_later`` and the traceback of a connection error), and tests/test_gc.py checks that
ended sessions leave no garbage behind.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

FREEZE_EVERY = 1.0  # seconds
LONG_PAUSE = 0.020  # seconds: pauses longer than this are counted apart


class PauseWatch:
    """Times every collection (gc.callbacks), for the log line at shutdown and the benchmarks."""

    def __init__(self) -> None:
        self.collections = 0
        self.longest = 0.0
        self.long = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.collections += 1
        if pause > self.longest:
            self.longest = pause
        if pause > LONG_PAUSE:
            self.long += 1

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def summary(self) -> str:
        return (f"gc: {self.collections} collections, longest pause {self.longest * 1000:.1f} ms, "
                f"{self.long} over {LONG_PAUSE * 1000:.0f} ms")


async def keep_frozen(period: float = FREEZE_EVERY) -> None:
    """Every ``period``: collect what is new (only that is walked), then freeze what is left."""
    while True:
        await asyncio.sleep(period)
        if any(gc.get_count()):
            gc.collect()
            gc.freeze()
