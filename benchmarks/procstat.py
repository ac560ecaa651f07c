"""A process's own accounting, read from /proc: CPU seconds, resident and peak memory.

The server is measured from the outside, by pid, so nothing in it has to cooperate and the
load generator's own work is never counted. Linux only.
"""

from __future__ import annotations

import glob
import os

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (every thread, living or exited), in seconds.

    From /proc/<pid>/stat fields 14 (utime) and 15 (stime), in clock ticks (usually 10 ms: a
    measurement should last long enough for that not to matter).
    """
    return _stat_cpu(f"/proc/{pid}/stat")


def reaped_children_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process's children that have ended and been waited for
    (fields 16 and 17, cutime and cstime), in seconds."""
    return _stat_cpu(f"/proc/{pid}/stat", first=13)


def main_thread_cpu_seconds(pid: int) -> float:
    """The same for the process's first thread alone (for our server: the event loop)."""
    return _stat_cpu(f"/proc/{pid}/task/{pid}/stat")


def _stat_cpu(path: str, first: int = 11) -> float:
    with open(path, "rb") as f:
        data = f.read()
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = data[data.rindex(b")") + 2:].split()
    utime, stime = int(fields[first]), int(fields[first + 1])  # 11: fields 14 and 15, counted from 1
    return (utime + stime) / _CLK_TCK


def cpu_seconds_precise(pid: int) -> float | None:
    """Time on CPU of the living threads, in seconds with nanosecond resolution (schedstat).

    A cross-check of :func:`cpu_seconds` without its clock-tick granularity; None when the
    kernel does not expose schedstat. Threads that have exited are not counted.
    """
    total = 0
    found = False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path, "rb") as f:
                total += int(f.read().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
    return total / 1e9 if found else None


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for raw in f:
            name, _, rest = raw.partition(b":")
            key = name.decode("ascii", "replace")
            if key in keys:
                values[key] = int(rest.split()[0])  # "<n> kB"
    return values


def memory(pid: int) -> dict[str, int]:
    """``{"rss": bytes, "peak": bytes}``: VmRSS and VmHWM (the high-water mark of VmRSS)."""
    kib = _status_kib(pid, ("VmRSS", "VmHWM"))
    return {"rss": kib.get("VmRSS", 0) * 1024, "peak": kib.get("VmHWM", 0) * 1024}


def rss(pid: int) -> int:
    return memory(pid)["rss"]


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/<pid>/clear_refs``); False if not allowed.

    Lets the peak of one operation be read on its own rather than the peak of the process's
    whole life.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_busy_seconds(cpu: int) -> float | None:
    """Seconds one CPU spent busy (or stolen by the hypervisor) since boot, from /proc/stat.

    Minus the server's own CPU time over the same interval, this is how much other processes
    took of the server's CPU: the interference a measurement suffered.
    """
    try:
        with open("/proc/stat", "rb") as f:
            for raw in f:
                if raw.startswith(b"cpu%d " % cpu):
                    v = [int(x) for x in raw.split()[1:9]]
                    user, nice, system, _idle, _iowait, irq, softirq, steal = v
                    return (user + nice + system + irq + softirq + steal) / _CLK_TCK
    except (OSError, ValueError):
        pass
    return None


def open_files(pid: int) -> int:
    """How many file descriptors the process has open (its sessions, for a server)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}/stat")
