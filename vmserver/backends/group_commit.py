"""Group commit: one writer thread owns every write to the database, off the event loop.

Shared by both backends: each gives it a function that runs a list of jobs in one transaction
(``execute``), SQLite's or PostgreSQL's.

Writes that arrive while the previous transaction is being synced wait in a queue and then
share the next transaction and its single fsync, so 50 concurrent writers cost a handful of
fsyncs instead of 50. Each write is acknowledged only after its own transaction committed;
one that fails is undone alone (a savepoint) and never takes its neighbours with it.

``on_commit`` callbacks run on the event loop when the commit is done, whether or not anybody
still awaits the future: the in-memory mirror follows the database even if a waiter was
cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..errors import StorageError
from .base import Changes, Job, Outcome, Write

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 256


class _Job:
    __slots__ = ("job", "future", "on_commit", "on_fail", "last")

    def __init__(self, job: Job, future: asyncio.Future[Any],
                 on_commit: Callable[[Any], Any] | None, on_fail: Callable[[], None] | None,
                 last: bool = False) -> None:
        self.job, self.future = job, future
        self.on_commit, self.on_fail = on_commit, on_fail
        self.last = last  # it ends its batch: nothing queued after it runs in the same transaction


class GroupCommitter:
    def __init__(self, label: str, execute: Callable[[list[Job]], list[Outcome]],
                 max_batch: int = DEFAULT_MAX_BATCH,
                 deliver: Callable[[list[_Job], list[Outcome]], None] | None = None) -> None:
        self.label = label  # the database, as messages name it
        self._execute = execute
        # How a finished batch reaches memory (on the loop): at once, or when the store says
        # (PostgreSQL: in the feed's order, after other servers' earlier changes).
        self.deliver = deliver if deliver is not None else self.deliver_now
        self.max_batch = max(1, max_batch)
        # A C-implemented queue: a put costs a fraction of a Condition's acquire/notify/release.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: stop after what is queued
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="vmserver-writer", daemon=True)
        # Finished batches wait here for the event loop. At most one wake-up of the loop is pending
        # at a time: one per transaction would fill asyncio's self-pipe while the loop is busy, and
        # a full pipe silently drops the byte that tells the loop a signal (SIGTERM) arrived.
        self._done: collections.deque[tuple[list[_Job], list[Any]]] = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self.batches = 0  # transactions committed, for tests and benchmarks
        self.writes = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def submit(self, what: str, write: Write, history: Any = (), *, changes: Changes | None = None,
               on_commit: Callable[[Any], Any] | None = None,
               on_fail: Callable[[], None] | None = None, last: bool = False) -> asyncio.Future[Any]:
        """Queue a write; the future gets ``on_commit(result)`` (or the result) once committed.
        ``last``: the write ends its batch (what is queued after it goes in the next one).

        :raises CommandError: (through the future) when the write failed; StorageError at once
            when the writer is closing. on_fail ran first either way.
        """
        assert self._loop is not None, "start() first"
        if self._closing:  # what the caller claimed in memory for this write is undone, as on a failure
            if on_fail is not None:
                on_fail()
            raise StorageError(f"database {self.label}: {what} refused: the server is stopping")
        future = self._loop.create_future()
        self._jobs.put(_Job((what, write, history, changes), future, on_commit, on_fail, last))
        return future

    def close(self, timeout: float = 10.0) -> bool:
        """Finish the queued writes and stop the thread (blocking: call after the sessions stopped).

        Returns whether the thread has stopped (False: still busy after ``timeout``).
        """
        if not self._closing:
            self._closing = True
            self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the database writer did not finish within %.0fs", timeout)
                return False
        return True

    # --- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch and not batch[-1].last:  # and whatever else queued up meanwhile
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            try:
                outcomes = self._execute([job.job for job in batch])
            except Exception as exc:  # a bug in a backend must fail its batch, not strand every waiter
                log.exception("database %s: a batch of %d writes failed", self.label, len(batch))
                failure = StorageError(f"database {self.label}: {exc}")
                outcomes = [(None, failure) for _ in batch]
            self.batches += 1
            self.writes += len(batch)
            self._done.append((batch, outcomes))
            with self._wake_lock:
                if self._wake_pending:
                    continue  # the loop has not yet taken the last batch: it takes this one too
                self._wake_pending = True
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._deliver_all)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                return

    def _deliver_all(self) -> None:
        """On the event loop: every batch finished since the last wake-up, in commit order."""
        with self._wake_lock:
            self._wake_pending = False  # from here on, a new batch wakes the loop again
        while self._done:
            batch, outcomes = self._done.popleft()
            self.deliver(batch, outcomes)

    @staticmethod
    def deliver_now(batch: list[_Job], outcomes: list[Outcome]) -> None:
        """Mirror each outcome into memory, then wake its waiter."""
        for job, (result, error) in zip(batch, outcomes):
            try:
                if error is None:
                    value = job.on_commit(result) if job.on_commit is not None else result
                else:
                    if job.on_fail is not None:
                        job.on_fail()
            except Exception as exc:  # a bug in a callback must not strand the others
                log.exception("after %s", job.job[0])
                error, value = StorageError(f"{job.job[0]}: {exc}"), None
            if job.future.done():
                continue  # its waiter was cancelled; memory is up to date all the same
            if error is None:
                job.future.set_result(value)
            else:
                job.future.set_exception(error)


class Committed:
    """What a store built on a GroupCommitter (``self.writer``) says of it, and how it takes writes."""

    writer: GroupCommitter

    @property
    def writes(self) -> int:
        return self.writer.writes

    @property
    def batches(self) -> int:
        return self.writer.batches

    def submit(self, what: str, write: Write, history: Any = (), *, changes: Changes | None = None,
               on_commit: Callable[[Any], Any] | None = None,
               on_fail: Callable[[], None] | None = None) -> asyncio.Future[Any]:
        return self.writer.submit(what, write, history, changes=changes, on_commit=on_commit, on_fail=on_fail)
