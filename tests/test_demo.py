"""The fleet demo (vmclient.demo) against a real server: it passes, reruns, and notices sabotage.

Nothing is mocked: run_demo talks to the in-process server fixture, main() to a closed port
or to a vmserver subprocess it starts itself, and sabotage is done from a raw connection.
"""

from __future__ import annotations

import io
import re
import socket
import tempfile
from pathlib import Path

import pytest

from vmclient.demo import PHASES, main, run_demo


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_status(report: str) -> dict[str, str]:
    return {m.group(2): m.group(1) for m in re.finditer(r"^(ok|FAIL)\s+(\w+)\s", report, re.M)}


async def test_demo_passes(server):
    out = io.StringIO()
    assert await run_demo("127.0.0.1", server.address[1], vms=5, out=out) is True
    report = out.getvalue()
    assert phase_status(report) == {phase: "ok" for phase in PHASES}, report
    assert report.rstrip().endswith("demo passed: 5 VMs"), report
    assert re.search(r"^elapsed \d+\.\d\d s$", report, re.M), report
    assert "FAIL" not in report and "Traceback" not in report


async def test_demo_twice_on_the_same_server(server, wire):
    for _ in range(2):
        out = io.StringIO()
        assert await run_demo("127.0.0.1", server.address[1], vms=5, out=out) is True, out.getvalue()
        assert "demo passed: 5 VMs" in out.getvalue()
    # Both runs stay in the inventory, under different ids, and nothing stays connected.
    vms = await wire.ok("get_all_vms")
    assert len({vm["vm_id"].rsplit("-", 1)[0] for vm in vms}) == 2 and len(vms) == 10
    assert await wire.ok("get_connected_vms") == []


async def test_demo_with_one_vm(server):
    """With no neighbour agent the observer's session plays the stranger; still every check runs."""
    out = io.StringIO()
    assert await run_demo("127.0.0.1", server.address[1], vms=1, out=out) is True, out.getvalue()
    assert "3 of 3 forbidden moves refused" in out.getvalue()


@pytest.mark.parametrize("vm_suffix, failing", [
    ("2", {"add", "connect", "refusals", "authorize", "update", "deauthorize", "close"}),  # held by a stranger
    ("77", {"add", "connect", "refusals", "authorize", "update", "deauthorize", "close"}),  # a stray id of the run
])
async def test_sabotage_is_reported(server, connect, vm_suffix, failing):
    """Another session registers and holds a VM with this run's prefix before the demo starts."""
    prefix = "demo-sabotage"
    saboteur = await connect()
    await saboteur.ok("connect_vm", vm_id=f"{prefix}-{vm_suffix}", ram=1, cpu=1, disks=[])
    out = io.StringIO()
    assert await run_demo("127.0.0.1", server.address[1], vms=5, out=out, prefix=prefix) is False
    report = out.getvalue()
    status = phase_status(report)
    assert {phase for phase, s in status.items() if s == "FAIL"} == failing, report
    assert re.search(r"^demo FAILED: \d+ of \d+ checks failed$", report, re.M), report
    assert "Traceback" not in report
    if vm_suffix == "2":  # the agent's own moves fail, with what was expected and what came back
        assert (f"agent 2 add_vm {prefix}-2: expected success; saw already_exists: "
                f"VM '{prefix}-2' already exists") in report
        assert f"agent 2 connect_vm {prefix}-2: expected success; saw conflict:" in report
        assert f"agent 2 authorize_vm {prefix}-2 with a wrong password: expected AuthFailed (auth_failed); " \
               f"saw not_connected:" in report
    else:  # only the observer can tell: an id of the run that no agent registered
        assert f"get_connected_vms lists: expected 5: {prefix}-0" in report
        assert f"unexpected {prefix}-77" in report


def test_main_cannot_connect(capsys):
    assert main(["--port", str(closed_port()), "--vms", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "cannot connect to 127.0.0.1:" in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("argv", [["--vms", "0"], ["--vms", "1001"], ["--vms", "many"],
                                  ["--spawn-server", "--port", "8888"]])
def test_main_bad_usage(capsys, argv):
    assert main(argv) == 2
    assert "usage: vmclient demo" in capsys.readouterr().err


def test_main_spawn_server(capsys, monkeypatch, tmp_path):
    """The `make demo` path: a vmserver subprocess on a free port, stopped and cleaned up after."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the demo's temp dir goes
    assert main(["--spawn-server", "--vms", "3"]) == 0
    captured = capsys.readouterr()
    assert "demo passed: 3 VMs" in captured.out, captured
    assert captured.err == ""
    assert list(Path(tmp_path).iterdir()) == []  # database and log removed
