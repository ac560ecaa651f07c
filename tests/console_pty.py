"""Driving the vmclient console for real: on a pseudo-terminal, or as a one-shot subprocess.

Shared by the console tests; nothing here is mocked: the console runs as its own process.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 15.0  # no console subprocess may live longer than this
EXPECT_TIMEOUT = 10.0  # no wait for console output may last longer than this

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Za-z0-9]|\x1b[=>]")


def clean(raw: bytes) -> str:
    """Terminal output as text: escape sequences and carriage returns removed."""
    return _ANSI.sub("", raw.decode("utf-8", errors="replace")).replace("\r", "")


def client_env(**extra: str) -> dict[str, str]:
    """The environment without VMSERVER_* settings (which would redirect the console), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMSERVER_")}
    env.update(extra)
    return env


def _controlling_tty() -> None:  # in the child: a new session whose terminal is the pty, so ^C is SIGINT
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyConsole:
    """``python -m vmclient`` on a pseudo-terminal: stdin, stdout and stderr are all the slave."""

    def __init__(self, port: int, tmp_path: Path, *args: str, controlling_tty: bool = False) -> None:
        """``controlling_tty``: make the pty the console's controlling terminal, so a typed ^C is
        a real SIGINT (otherwise the console runs in a new session without one)."""
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        env = client_env(TERM="xterm", XDG_STATE_HOME=str(tmp_path / "state"), INPUTRC="/dev/null",
                         HOME=str(tmp_path), COLUMNS="200", LINES="50")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmclient", "--host", "127.0.0.1", "--port", str(port), *args],
                stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                start_new_session=not controlling_tty, preexec_fn=_controlling_tty if controlling_tty else None)
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)
        self.raw = b""
        self.pos = 0  # how much of the cleaned output earlier expect() calls consumed
        self.history = tmp_path / "state" / "vmclient" / "history"

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child has gone and the slave is closed
            return False
        self.raw += chunk
        return bool(chunk)

    def expect(self, wanted: str, timeout: float = EXPECT_TIMEOUT) -> str:
        """Read until ``wanted`` appears after what was already consumed; returns the text up to it."""
        deadline = time.monotonic() + timeout
        while True:
            text = clean(self.raw)
            found = text.find(wanted, self.pos)
            if found >= 0:
                chunk, self.pos = text[self.pos:found + len(wanted)], found + len(wanted)
                return chunk
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.1)) and self.proc.poll() is not None:
                raise AssertionError(f"{wanted!r} did not appear; console output after the last match:\n"
                                     f"{text[self.pos:]}\n(exit status {self.proc.poll()})")

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def command(self, line: str, prompt: str) -> str:
        """Type ``line`` + Enter and return everything printed up to the next ``prompt``."""
        self.send(line + "\r")
        return self.expect(prompt)

    def wait(self, timeout: float = EXPECT_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.05)  # keep draining, so the child never blocks on a full pty
        status = self.proc.wait(timeout=0.5)
        while time.monotonic() < deadline and select.select([self.master], [], [], 0.05)[0]:
            if not self._read(0):  # what the child wrote before it exited
                break
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=RUN_TIMEOUT)
        os.close(self.master)


def spans(line: str, cells: list[str]) -> list[tuple[int, int]]:
    """Where each cell of a table line is, found left to right."""
    out, pos = [], 0
    for cell in cells:
        start = line.index(cell, pos)
        out.append((start, start + len(cell)))
        pos = start + len(cell)
    return out
