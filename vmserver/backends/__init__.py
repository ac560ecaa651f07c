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


_URL_PASSWORD = re.compile(r"(?i)\A(postgres(?:ql)?://)([^@?#]*@)")
_PARAM_PASSWORD = re.compile(r"(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)")


def mask_dsn(dsn: str) -> str:
    """The DSN as messages may show it: every password replaced by ``***``.

    ``postgresql://user:pw@host:5432/db?password=pw`` becomes
    ``postgresql://user:***@host:5432/db?password=***``; key=value strings get the same.
    The user part ends at the last ``@`` before the query, so a password that holds an
    unescaped ``@`` or ``/`` is masked whole (an over-masked DSN is harmless, a leaked
    password is not).
    """
    end = len(dsn)
    for stop in "?#":
        found = dsn.find(stop)
        if found >= 0:
            end = min(end, found)
    match = _URL_PASSWORD.match(dsn)
    if match is not None:
        scheme = match.group(1)
        at = dsn.rfind("@", 0, end)
        userinfo = dsn[len(scheme):at]
        if ":" in userinfo:
            dsn = f"{scheme}{userinfo.split(':', 1)[0]}:***{dsn[at:]}"
    return _PARAM_PASSWORD.sub(r"\1***", dsn)


def open_store(db: str, busy_timeout_ms: int = 5000, max_batch: int = DEFAULT_MAX_BATCH,
               lease_ttl: float = 15.0) -> Store:
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
        return PostgresStore(db, max_batch=max_batch, lease_ttl=lease_ttl)
    from .sqlite import SQLiteStore
    return SQLiteStore(db, busy_timeout_ms, max_batch)
