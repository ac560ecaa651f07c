async def test_health(wire):
    assert wire.greeting["hello"]["protocol"] == 1
    assert await wire.ok("health") == "OK"


def test_cli_starts_and_stops(spawn, tmp_path):
    import signal
    p = spawn("--port", "0", "--db", str(tmp_path / "x.db"))
    assert p.wait_listening() > 0
    assert p.stop(signal.SIGINT) == 0
    assert b"stopped" in p.log
