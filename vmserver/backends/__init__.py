"""Where the inventory is kept: the storage port (base.py) and its backends, SQLite (the
embedded default) and PostgreSQL (an optional extra, imported only when a DSN asks for it)."""

from __future__ import annotations

import re

from ..errors import StorageError
from .base import Store
from .group_commit import DEFAULT_MAX_BATCH

_DSN = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
POSTGRES_EXTRA = "pip install 'vmserver[postgres]'"


def is_postgres(db: str) -> bool:
    """A PostgreSQL DSN (postgresql://… or postgres://…); anything else is an SQLite path."""
    return _DSN.match(db) is not None


def open_store(db: str, busy_timeout_ms: int = 5000, max_batch: int = DEFAULT_MAX_BATCH) -> Store:
    """Open (creating or migrating its schema) the store ``db`` names.

    :raises StorageError: unusable, or the PostgreSQL driver is not installed.
    """
    if is_postgres(db):
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            if exc.name is None or not exc.name.startswith("psycopg"):
                raise
            raise StorageError(f"the PostgreSQL backend needs its driver: {POSTGRES_EXTRA}") from None
        return PostgresStore(db, max_batch=max_batch)
    from .sqlite import SQLiteStore
    return SQLiteStore(db, busy_timeout_ms, max_batch)
