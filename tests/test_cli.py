"""The real command line, ``python -m vmserver``, as a subprocess: startup, signals, config, bad input."""

from __future__ import annotations

import os
import re
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import Wire, vm_args
import vmserver

RUN_TIMEOUT = 15.0


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m vmserver ARGS`` to completion (for commands that exit on their own)."""
    return subprocess.run(
        [sys.executable, "-m", "vmserver", *args], stdin=subprocess.DEVNULL, capture_output=True,
        env={**os.environ, **(env or {})}, timeout=RUN_TIMEOUT)


def listening_lines(log: bytes) -> list[str]:
    return [line for line in log.decode(errors="replace").splitlines() if "listening on" in line]


def assert_no_traceback(log: bytes) -> None:
    assert b"Traceback" not in log, log.decode(errors="replace")


async def health(port: int) -> None:
    w = await Wire.open(port)
    try:
        assert w.greeting["hello"]["server"] == "vmserver"
        assert await w.ok("health") == "OK"
    finally:
        await w.close()


# --- startup and stopping -----------------------------------------------------------------


async def test_listening_line_and_health(spawn, tmp_path):
    db = str(tmp_path / "cli.db")
    p = spawn("--port", "0", "--db", db)
    port = p.wait_listening()
    assert port > 0
    await health(port)
    assert p.stop() == 0
    lines = listening_lines(p.log)
    assert len(lines) == 1, p.log
    assert f"listening on 127.0.0.1:{port}" in lines[0]
    assert db in lines[0]
    assert Path(db).is_file()
    assert_no_traceback(p.log)


async def test_sigterm_and_sigint_exit_zero(spawn, tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = spawn("--port", "0", "--db", str(tmp_path / f"{sig.name}.db"))
        port = p.wait_listening()
        w = await Wire.open(port)  # an idle session is told and hung up on
        assert await w.ok("health") == "OK"
        p.proc.send_signal(sig)
        event = await w.recv()
        assert event["event"] == "shutdown" and event["data"] == {}
        assert await w.at_eof()
        await w.close()
        assert p.run_to_exit() == 0, (sig, p.log)
        assert b"stopped" in p.log
        assert_no_traceback(p.log)


async def test_in_flight_command_finishes_on_sigterm(spawn, tmp_path):
    db = str(tmp_path / "inflight.db")
    p = spawn("--port", "0", "--db", db)
    port = p.wait_listening()
    w = await Wire.open(port)
    # health and the slow add_vm arrive in one write: once health is answered, the server has
    # already read add_vm and started hashing (no await between), so the signal finds it in flight.
    slow = json.dumps({"cmd": "add_vm", "args": {**vm_args("inflight", "if-d"), "password": "slow-hash"}, "id": 42})
    await w.send_raw(b'{"cmd":"health","id":41}\n' + slow.encode() + b"\n")
    assert (await w.recv())["id"] == 41
    p.proc.send_signal(signal.SIGTERM)
    reply = await w.recv()
    assert "event" not in reply and reply.get("id") == 42 and reply.get("ok") is True, reply
    assert reply["result"]["vm_id"] == "inflight"
    event = await w.recv()
    assert event["event"] == "shutdown" and event["data"] == {} and set(event) == {"event", "data", "ts"}
    assert await w.at_eof()
    await w.close()
    assert p.run_to_exit() == 0
    assert_no_traceback(p.log)

    p2 = spawn("--port", "0", "--db", db)
    w2 = await Wire.open(p2.wait_listening())
    vms = await w2.ok("get_all_vms")
    assert [(v["vm_id"], [d["disk_id"] for d in v["disks"]]) for v in vms] == [("inflight", ["if-d"])]
    await w2.ok("connect_vm", vm_id="inflight", password="slow-hash")
    assert await w2.error("authorize_vm", vm_id="inflight", password="other") == "auth_failed"
    assert (await w2.ok("authorize_vm", vm_id="inflight", password="slow-hash"))["authorized"] is True
    await w2.close()
    assert p2.stop() == 0


# --- configuration ------------------------------------------------------------------------


async def test_environment_variables_used_without_flags(spawn, tmp_path):
    db = str(tmp_path / "from-env.db")
    p = spawn(env={"VMSERVER_HOST": "127.0.0.1", "VMSERVER_PORT": "0", "VMSERVER_DB": db})
    port = p.wait_listening()
    await health(port)
    assert p.stop() == 0
    (line,) = listening_lines(p.log)
    assert f"listening on 127.0.0.1:{port}" in line and db in line
    assert Path(db).is_file()


def test_environment_host_is_used(spawn, tmp_path):
    # 192.0.2.1 (TEST-NET-1) is not a local address: binding fails at once, proving the value was read.
    p = spawn(env={"VMSERVER_HOST": "192.0.2.1", "VMSERVER_PORT": "0",
                   "VMSERVER_DB": str(tmp_path / "h.db")})
    assert p.run_to_exit() == 1
    assert b"192.0.2.1" in p.log and b"cannot start" in p.log
    assert_no_traceback(p.log)


async def test_flags_override_environment(spawn, tmp_path):
    env_db, flag_db = tmp_path / "env.db", tmp_path / "flag.db"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        p = spawn("--host", "127.0.0.1", "--port", "0", "--db", str(flag_db),
                  env={"VMSERVER_HOST": "192.0.2.1", "VMSERVER_PORT": str(busy_port), "VMSERVER_DB": str(env_db)})
        port = p.wait_listening()
        assert port != busy_port
        await health(port)
        assert p.stop() == 0
    (line,) = listening_lines(p.log)
    assert f"listening on 127.0.0.1:{port}" in line and str(flag_db) in line
    assert flag_db.is_file() and not env_db.exists()


async def test_db_in_missing_directory_is_created(spawn, tmp_path):
    db = tmp_path / "does" / "not" / "exist" / "vms.db"
    p = spawn("--port", "0", "--db", str(db))
    port = p.wait_listening()
    w = await Wire.open(port)
    await w.ok("add_vm", **vm_args("deep", "deep-d"))
    await w.close()
    assert p.stop() == 0
    assert db.is_file()
    p2 = spawn("--port", "0", "--db", str(db))
    w2 = await Wire.open(p2.wait_listening())
    assert [v["vm_id"] for v in await w2.ok("get_all_vms")] == ["deep"]
    await w2.close()
    assert p2.stop() == 0


async def test_memory_db(spawn, tmp_path):
    p = spawn("--port", "0", "--db", ":memory:")
    port = p.wait_listening()
    w = await Wire.open(port)
    rec = await w.ok("add_vm", **vm_args("mem", "mem-d"))
    assert [v["vm_id"] for v in await w.ok("get_all_vms")] == ["mem"]
    assert (await w.ok("connect_vm", vm_id="mem"))["id"] == rec["id"]
    await w.close()
    assert p.stop() == 0
    assert ":memory:" in listening_lines(p.log)[0]
    assert not Path(":memory:").exists() and not Path(os.getcwd(), ":memory:").exists()
    assert_no_traceback(p.log)


async def test_default_db_under_xdg_data_home(spawn, tmp_path):
    xdg = tmp_path / "xdg"
    expected = xdg / "vmserver" / "vms.db"
    p = spawn("--port", "0", env={"XDG_DATA_HOME": str(xdg), "VMSERVER_DB": ""})
    port = p.wait_listening()
    await health(port)
    assert p.stop() == 0
    assert str(expected) in listening_lines(p.log)[0]
    assert expected.is_file()


# --- bad input ----------------------------------------------------------------------------


def test_port_out_of_range_is_usage_error(spawn, tmp_path):
    p = spawn("--port", "70000", "--db", str(tmp_path / "x.db"))
    assert p.run_to_exit() == 2
    assert b"usage:" in p.log and b"70000" in p.log
    assert_no_traceback(p.log)
    assert not (tmp_path / "x.db").exists()


def test_env_port_not_a_number_is_usage_error(spawn, tmp_path):
    p = spawn("--db", str(tmp_path / "x.db"), env={"VMSERVER_PORT": "abc"})
    assert p.run_to_exit() == 2
    assert b"usage:" in p.log and b"abc" in p.log
    assert_no_traceback(p.log)


def test_garbage_db_file(spawn, tmp_path):
    db = tmp_path / "garbage.db"
    junk = b"this is certainly not an SQLite database\n" * 200
    db.write_bytes(junk)
    p = spawn("--port", "0", "--db", str(db))
    assert p.run_to_exit() == 1
    text = p.log.decode(errors="replace")
    assert str(db) in text
    assert "not a database" in text
    assert "listening on" not in text
    assert_no_traceback(p.log)
    assert db.read_bytes() == junk


def test_port_in_use(spawn, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = spawn("--port", str(port), "--db", str(tmp_path / "x.db"))
        assert p.run_to_exit() == 1
    text = p.log.decode(errors="replace")
    assert "cannot start" in text
    assert re.search(r"address already in use", text, re.I), text
    assert f"127.0.0.1:{port}" in text
    # Nothing claims success (the error line itself mentions the address it tried).
    assert all("ERROR" in line and "cannot start" in line for line in listening_lines(p.log)), text
    assert_no_traceback(p.log)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.decode().strip() == f"vmserver {vmserver.__version__} (protocol 1)"
    assert vmserver.__version__ == "0.1.0"


def test_help_mentions_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    out = r.stdout.decode()
    assert out.startswith("usage: vmserver")
    for flag in ("--host", "--port", "--db", "--log-level", "--max-line", "--version"):
        assert flag in out, flag
    for var in ("VMSERVER_HOST", "VMSERVER_PORT", "VMSERVER_DB"):
        assert var in out, var
