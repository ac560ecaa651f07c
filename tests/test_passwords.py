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
        assert lim.locked_for("vm", 0.0) == 0.0 and lim.begin("vm")
        assert lim.end("vm", ok=False, now=0.0) == expected
    assert lim.locked_for("vm", 0.5) == 0.5  # locked for 1 s after the 2nd failure
    assert lim.locked_for("other", 0.5) == 0.0 and lim.begin("other")  # per VM
    lim.end("other", ok=True, now=0.5)
    assert lim.locked_for("vm", 1.0) == 0.0 and lim.begin("vm")  # lock over: one more try
    assert not lim.begin("vm")  # ... one at a time past the limit
    assert lim.end("vm", ok=False, now=1.0) == 3
    assert lim.locked_for("vm", 2.5) == 0.5  # 2 s this time
    assert lim.locked_for("vm", 3.0) == 0.0 and lim.begin("vm")
    assert lim.end("vm", ok=True, now=3.0) == 0  # a success forgives
    assert lim.begin("vm") and lim.begin("vm")


def test_limiter_counts_checks_in_flight():
    lim = AttemptLimiter(allowed=3)
    assert [lim.begin("vm") for _ in range(5)] == [True, True, True, False, False]
    assert lim.locked_for("vm", 0.0) == 0.0  # too many at once is no lock: nothing failed
    lim.end("vm", ok=False, now=0.0)
    assert not lim.begin("vm")  # 1 failure + 2 in flight: no room yet
    lim.end("vm", ok=False, now=0.0)
    lim.end("vm", ok=False, now=0.0)
    assert lim.locked_for("vm", 0.0) > 0  # now locked


def test_a_missing_password_is_a_failure():
    lim = AttemptLimiter(allowed=2)
    assert lim.missing("vm", 0.0) == 1
    assert lim.begin("vm")  # one failure: one check at a time left
    assert not lim.begin("vm")
    assert lim.end("vm", ok=False, now=0.0) == 2
    assert lim.locked_for("vm", 0.0) == 1.0
    assert lim.missing("vm", 1.0) == 3 and lim.locked_for("vm", 1.0) == 2.0  # and locks for longer
    lim.begin("vm")
    assert lim.end("vm", ok=True, now=3.0) == 0 and lim.locked_for("vm", 3.0) == 0.0


def test_limiter_lock_is_capped():
    lim = AttemptLimiter(allowed=1)
    now = 0.0
    for _ in range(20):
        now += 1000.0
        assert lim.locked_for("vm", now) == 0.0 and lim.begin("vm")
        lim.end("vm", ok=False, now=now)
    assert lim.locked_for("vm", now) == AttemptLimiter.MAX_LOCK
