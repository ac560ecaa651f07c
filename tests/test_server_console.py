"""``vmserver --console``: commands typed on the server's terminal (driven through a pty)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import Wire

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


class Terminal:
    """The server as a subprocess whose stdin and stdout are a pseudo-terminal."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "vmserver", *args], stdin=slave, stdout=slave,
                                     stderr=subprocess.PIPE)
        os.close(slave)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while text not in self.screen and time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        assert text in self.screen, f"{text!r} never appeared; screen: {self.screen[-2000:]}"
        return self.screen

    def type(self, line: str) -> None:
        self.screen = ""
        os.write(self.master, line.encode() + b"\n")

    def port(self, timeout: float = 10.0) -> int:
        assert self.proc.stderr is not None
        log, end = b"", time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.1)
            if ready:
                log += os.read(self.proc.stderr.fileno(), 65536)
                match = _LISTENING.search(log)
                if match:
                    return int(match.group(1))
        raise AssertionError(f"no listening line: {log!r}")

    def stop(self) -> tuple[int, bytes]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)
        return self.proc.returncode, err


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def factory(*args: str) -> Terminal:
        t = Terminal(*args)
        opened.append(t)
        return t

    yield factory
    for t in opened:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


async def test_console_commands_act_like_a_session(terminal, tmp_path):
    t = terminal("--console", "--port", "0", "--db", str(tmp_path / "c.db"))
    port = t.port()
    t.read_until("vmserver> ")
    t.type('add_vm vm_id=con-1 ram=2048 cpu=2 disks=[{"disk_id":"con-d","size":7}]')
    screen = t.read_until("vmserver> ")
    assert re.search(r"^vm_id:\s+con-1\s*$", screen, re.M) and "con-d (7 GiB)" in screen
    t.type("connect_vm vm_id=con-1")
    assert re.search(r"^connected:\s+yes\s*$", t.read_until("vmserver> "), re.M)
    t.type("get_all_vms")
    screen = t.read_until("vmserver> ")  # the prompt comes after the whole answer
    assert "(1 VM)" in screen
    assert re.search(r"^VM_ID\s+RAM_MIB\s+CPU\s+DISKS\s+CONNECTED\s+AUTHORIZED\s*$", screen, re.M)
    t.type("helth")
    assert "error unknown_command: unknown command 'helth'; did you mean 'health'?" in t.read_until("vmserver> ")
    t.type("help")
    assert "remove_vm" in t.read_until("vmserver> ")
    # A network session sees what the console did: the VM exists and the console holds it.
    w = await Wire.open(port)
    vm = await w.ok("get_vm", vm_id="con-1")
    assert vm["connected"] is True
    assert await w.error("connect_vm", vm_id="con-1") == "conflict"
    await w.close()
    t.type("\x04")  # Ctrl-D: the console closes, the server goes on
    t.read_until("the server goes on")
    w = await Wire.open(port)
    assert await w.ok("health") == "OK"
    await w.close()
    code, err = t.stop()
    assert code == 0 and b"Traceback" not in err


async def test_without_console_stdin_is_ignored(terminal, tmp_path):
    t = terminal("--port", "0", "--db", str(tmp_path / "n.db"))
    port = t.port()
    t.type("add_vm vm_id=typed ram=1 cpu=1 disks=[]")
    time.sleep(0.5)
    w = await Wire.open(port)
    assert await w.ok("get_all_vms") == []
    await w.close()
    assert "vm_id" not in t.screen
    code, _ = t.stop()
    assert code == 0


def test_console_needs_a_terminal(spawn, tmp_path):
    p = spawn("--console", "--port", "0", "--db", str(tmp_path / "t.db"))  # stdin is /dev/null here
    p.wait_listening()
    assert p.stop() == 0
    assert b"--console ignored: stdin is not a terminal" in p.log
