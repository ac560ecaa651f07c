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
