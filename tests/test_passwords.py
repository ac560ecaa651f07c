"""Password hashing and the per-VM slowdown of guessing, without network."""

from vmserver.passwords import AttemptLimiter, hash_password, verify_password


def test_hash_is_salted_and_verifies():
    first, second = hash_password("s3cret"), hash_password("s3cret")
    assert first != second and first.startswith("scrypt$") and "s3cret" not in first
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret!", first)
    assert not verify_password("s3cret", "garbage") and not verify_password("s3cret", "md5$x$y$z$a$b")


def test_limiter_locks_after_allowed_failures_and_doubles():
    lim = AttemptLimiter(allowed=2)
    for expected in (1, 2):
        assert lim.begin("vm", 0.0) == 0.0
        assert lim.end("vm", ok=False, now=0.0) == expected
    assert lim.begin("vm", 0.5) == 0.5  # locked for 1 s after the 2nd failure
    assert lim.begin("other", 0.5) == 0.0  # per VM
    lim.end("other", ok=True, now=0.5)
    assert lim.begin("vm", 1.0) == 0.0  # lock over: one more try
    assert lim.begin("vm", 1.0) == 1.0  # ... one at a time past the limit
    assert lim.end("vm", ok=False, now=1.0) == 3
    assert lim.begin("vm", 2.5) == 0.5  # 2 s this time
    assert lim.begin("vm", 3.0) == 0.0
    assert lim.end("vm", ok=True, now=3.0) == 0  # a success forgives
    assert lim.begin("vm", 3.0) == 0.0 and lim.begin("vm", 3.0) == 0.0


def test_limiter_counts_checks_in_flight():
    lim = AttemptLimiter(allowed=3)
    assert [lim.begin("vm", 0.0) for _ in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    lim.end("vm", ok=False, now=0.0)
    assert lim.begin("vm", 0.0) == 1.0  # 1 failure + 2 in flight: no room yet
    lim.end("vm", ok=False, now=0.0)
    lim.end("vm", ok=False, now=0.0)
    assert lim.begin("vm", 0.0) > 0  # now locked


def test_limiter_lock_is_capped():
    lim = AttemptLimiter(allowed=1)
    now = 0.0
    for _ in range(20):
        now += 1000.0
        assert lim.begin("vm", now) == 0.0
        lim.end("vm", ok=False, now=now)
    assert lim.begin("vm", now) == AttemptLimiter.MAX_LOCK
