"""Garbage collection for a heap that is mostly long-lived: no pause grows with the fleet.

CPython's full collections walk every tracked object. At 20,000 sessions that is over a
million objects and hundreds of milliseconds with the event loop stopped, and they free
almost nothing: the inventory and the live sessions are all still in use, and what ends is
freed by reference counting. So, ten times a second, the young generations are collected
(a few thousand objects at most) and then everything that survived is frozen: later
collections never walk it again, so no pause grows with the heap.

The cost of freezing: a frozen object that later becomes part of a reference cycle is never
collected, and neither is a cycle that died between a young collection and the freeze. The
server breaks the cycles a closed connection would leave (server.py: ``_StreamProtocol``,
``_unlink_later`` and the traceback of a connection error), and tests/test_gc.py checks that
sessions ended in every way leave no garbage behind.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

FREEZE_EVERY = 0.1  # seconds: what is made in this long is all a collection may walk
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
            log.debug("gc: a %.1f ms pause (generation %d, %d objects freed)", pause * 1000,
                      info.get("generation", -1), info.get("collected", 0))

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
            gc.collect(1)  # the young generations only: bounded by their thresholds, not by the fleet
            gc.freeze()
