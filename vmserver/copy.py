"""``vmserver copy SRC DST``: the inventory and history from one backend to another.

SQLite to PostgreSQL or back (or between two of a kind), ids kept, in one transaction on the
destination. Both stores are opened the way a server opens them, so each is locked against a
running server meanwhile, and a destination that already holds VMs is refused: a copy never
merges two inventories.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .backends import is_postgres, open_store
from .backends.base import Store
from .errors import StorageError

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmserver copy",
        description="Copy the inventory (VMs, disks, password hashes, last_connected) and the history from "
                    "one database to another, in one transaction. Each is an SQLite path or a "
                    "postgresql://USER@HOST:PORT/DBNAME DSN. The destination must hold no VMs.")
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("destination", metavar="DST")
    return parser


def copy(source: str, destination: str) -> str:
    """Copy ``source`` into ``destination``; returns what was copied, as one line.

    :raises StorageError: either cannot be opened, the destination holds VMs, or the write failed
        (then nothing was written).
    """
    if not is_postgres(source) and source != ":memory:" and not os.path.exists(source):
        raise StorageError(f"no database at {source}")  # opening it would create an empty one
    src: Store = open_store(source)
    try:
        dst: Store = open_store(destination)
        try:
            snapshot = src.snapshot()
            dst.restore(snapshot)
            return (f"copied {len(snapshot.vms)} VMs, {len(snapshot.disks)} disks and "
                    f"{len(snapshot.history)} history rows from {src.label} to {dst.label}")
        finally:
            dst.close()
    finally:
        src.close()


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        print(copy(args.source, args.destination))
    except StorageError as exc:
        print(f"vmserver copy: {exc}", file=sys.stderr)
        return 1
    return 0
