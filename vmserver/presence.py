"""Presence: which session holds each connected VM, and whether that session authorized it.

Sessions are known by a stable key, never compared as Python objects, so a holder can be a
session of this process or, once presence moves into the database (the cluster), one on
another server. Presence is kept in memory here (:class:`LocalPresence`); each change it
makes reaches the inventory's cache through ``Inventory.apply`` like every other change.
"""

from __future__ import annotations

import itertools
import secrets
from typing import Any, Protocol

# This server's id, chosen at start: in its log line, its greeting, stats, and every session key.
SERVER_ID = secrets.token_hex(4)
_keys = itertools.count(1)


def session_key() -> str:
    """A key no other session, of this server or of another, has had."""
    return f"{SERVER_ID}.{next(_keys)}"


class Presence(Protocol):
    def holder(self, vm_id: str) -> str | None:
        """The key of the session holding ``vm_id``, or None."""

    def authorized(self, vm_id: str) -> bool: ...

    def claim(self, vm_id: str, key: str) -> bool:
        """Take ``vm_id`` for ``key`` unless another session holds it; True if ``key`` holds it now."""

    def authorize(self, vm_id: str, key: str, on: bool) -> bool:
        """Set the holder's authorization; False if ``key`` does not hold ``vm_id``."""

    def release(self, vm_id: str, key: str) -> bool:
        """Drop ``key``'s hold (and authorization) of ``vm_id``; False if it did not hold it."""


class LocalPresence:
    """Presence in this process's memory: it ends with the sessions it records."""

    def __init__(self) -> None:
        self._holders: dict[str, str] = {}
        self._authorized: set[str] = set()

    def holder(self, vm_id: str) -> str | None:
        return self._holders.get(vm_id)

    def authorized(self, vm_id: str) -> bool:
        return vm_id in self._authorized

    def claim(self, vm_id: str, key: str) -> bool:
        return self._holders.setdefault(vm_id, key) == key

    def authorize(self, vm_id: str, key: str, on: bool) -> bool:
        if self._holders.get(vm_id) != key:
            return False
        if on:
            self._authorized.add(vm_id)
        else:
            self._authorized.discard(vm_id)
        return True

    def release(self, vm_id: str, key: str) -> bool:
        if self._holders.get(vm_id) != key:
            return False
        del self._holders[vm_id]
        self._authorized.discard(vm_id)
        return True


class SharedPresence:
    """Presence kept in the database (PostgreSQL, several servers): who holds each VM is read
    here from the inventory's cache, which the change feed keeps current; every change is a
    write (base.Connect, Authorize, Disconnect) that the database may refuse."""

    def __init__(self, vms: dict[str, Any]) -> None:
        self._vms = vms  # by vm_id: records with .holder and .authorized

    def holder(self, vm_id: str) -> str | None:
        vm = self._vms.get(vm_id)
        return None if vm is None else vm.holder

    def authorized(self, vm_id: str) -> bool:
        vm = self._vms.get(vm_id)
        return vm is not None and vm.authorized

    # Never called: the inventory changes shared presence through the store.
    def claim(self, vm_id: str, key: str) -> bool:
        raise AssertionError("shared presence changes only through the store")

    def authorize(self, vm_id: str, key: str, on: bool) -> bool:
        raise AssertionError("shared presence changes only through the store")

    def release(self, vm_id: str, key: str) -> bool:
        raise AssertionError("shared presence changes only through the store")
