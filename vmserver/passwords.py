"""Password hashing: salted scrypt, verified in constant time. Only hashes are ever stored."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# RFC 7914's interactive-login parameters: 16 MiB of memory, tens of milliseconds here.
_N, _R, _P, _DKLEN = 1 << 14, 8, 1, 32
_MAXMEM = 64 * 1024 * 1024


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash``: the parameters travel with the hash so they can change later."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches; the work done is the same for a right and a wrong one."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        salt_raw, expected_raw = base64.b64decode(salt), base64.b64decode(expected)
        digest = hashlib.scrypt(
            password.encode("utf-8"), salt=salt_raw, n=int(n), r=int(r), p=int(p),
            maxmem=_MAXMEM, dklen=len(expected_raw),
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected_raw)


class AttemptLimiter:
    """Slows down password guessing per VM: after ``allowed`` failures in a row, each further
    failure locks the VM's password checks for twice as long as the last (1 s, 2 s, ... 5 min).

    A missing password is a failure like a wrong one (it costs no hashing, so it must not be
    the free way to probe). A check counts from the moment it starts (checks take tens of
    milliseconds), so guesses sent at once from many connections cannot slip past the limit
    together. In memory only: a restart forgives, which is acceptable for a delay, not a ban.
    """

    MAX_LOCK = 300.0

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self._failures: dict[str, int] = {}  # failures in a row
        self._locked_until: dict[str, float] = {}
        self._checking: dict[str, int] = {}  # checks under way

    def locked_for(self, key: str, now: float) -> float:
        """Seconds the VM's password checks are still refused for (0: not locked)."""
        return max(self._locked_until.get(key, 0.0) - now, 0.0)

    def begin(self, key: str) -> bool:
        """Start a check (call ``end`` after); False when too many are under way for this VM.

        Below the limit, as many checks at once as failures are still allowed; past it (the
        lock has expired), one at a time: its failure locks again for twice as long.
        """
        failures, checking = self._failures.get(key, 0), self._checking.get(key, 0)
        if checking >= max(self.allowed - failures, 1):
            return False
        self._checking[key] = checking + 1
        return True

    def checking(self, key: str) -> int:
        """Checks under way for the VM."""
        return self._checking.get(key, 0)

    def end(self, key: str, ok: bool, now: float) -> int:
        """Finish a check; returns the failures in a row (0 after a success)."""
        left = self._checking.get(key, 1) - 1
        if left:
            self._checking[key] = left
        else:
            self._checking.pop(key, None)
        if ok:
            self._failures.pop(key, None)
            self._locked_until.pop(key, None)
            return 0
        return self._failed(key, now)

    def missing(self, key: str, now: float) -> int:
        """A password was needed and none was given: a failure, without a check."""
        return self._failed(key, now)

    def elsewhere(self, key: str, count: int, now: float) -> None:
        """``count`` failures made through another server (several servers on one database)."""
        for _ in range(count):
            self._failed(key, now)

    def _failed(self, key: str, now: float) -> int:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        if failures >= self.allowed:
            self._locked_until[key] = now + min(2.0 ** (failures - self.allowed), self.MAX_LOCK)
        return failures

    def forget(self, key: str) -> None:
        """The VM is gone: a new one of the same name starts with a clean slate."""
        self._failures.pop(key, None)
        self._locked_until.pop(key, None)
