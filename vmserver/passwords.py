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

    In memory only: a restart forgives, which is acceptable for a delay, not a ban.
    """

    MAX_LOCK = 300.0

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self._state: dict[str, tuple[int, float]] = {}  # vm_id -> (failures in a row, locked until)

    def wait_left(self, key: str, now: float) -> float:
        """Seconds until ``key`` may be tried again (0 when it may be tried now)."""
        _, until = self._state.get(key, (0, 0.0))
        return max(0.0, until - now)

    def failed(self, key: str, now: float) -> int:
        failures = self._state.get(key, (0, 0.0))[0] + 1
        until = now + min(2.0 ** (failures - self.allowed), self.MAX_LOCK) if failures >= self.allowed else 0.0
        self._state[key] = (failures, until)
        return failures

    def succeeded(self, key: str) -> None:
        self._state.pop(key, None)

    def forget(self, key: str) -> None:
        self._state.pop(key, None)
