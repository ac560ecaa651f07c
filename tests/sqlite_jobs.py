"""The group committer over a real SQLite Store with jobs given as ``(fn, *args)``: what the
writer's own tests use to run arbitrary work on the writer thread (a gate, a bug, a write)."""

from __future__ import annotations

from typing import Any

from vmserver.backends.group_commit import DEFAULT_MAX_BATCH, GroupCommitter
from vmserver.backends.sqlite import Store


def calls_committer(store: Store, max_batch: int = DEFAULT_MAX_BATCH) -> GroupCommitter:
    def execute(jobs: list[Any]) -> list[Any]:
        return store.write_batch([(what, call[0], tuple(call[1:])) for what, call, *_ in jobs])
    return GroupCommitter(store.path, execute, max_batch)
