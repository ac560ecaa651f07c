"""The server's own counters, for GET /metrics (issue 13): plain numbers, standard library only.

They are kept on the event loop (commands, sessions, events) or by the writer thread alone
(writes per commit: one writer, so no update is lost), and cost a dict look-up and a bisect
per command: nothing of prometheus-client is on the hot path. The HTTP side
(vmserver/http_metrics.py) reads them at scrape time and turns them into metric families.
"""

from __future__ import annotations

from bisect import bisect_left

# Command latency, in seconds: a cached read answers in tens of microseconds, a password
# check in tens of milliseconds, a write waits for its commit's fsync.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
# Writes sharing one transaction (the group committer's batch; --max-write-batch caps it, 256 by default).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN = "(unknown)"  # the command label of names that are no command: a client cannot add labels


class Histogram:
    """Observations counted per bucket (not cumulative: the exporter sums them) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus' "le"
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations at or below it) for every bound and infinity, as Prometheus counts them."""
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            out.append((bound, total))
        return out


class CommandStats:
    """One command on one protocol: how many succeeded, how many failed with each error code,
    and how long they took (a Histogram's fields, inlined: this is the hot path)."""

    __slots__ = ("ok", "codes", "counts", "sum")

    def __init__(self) -> None:
        self.ok = 0
        self.codes: dict[str, int] = {}  # error code -> count
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    @property
    def latency(self) -> Histogram:
        histogram = Histogram(LATENCY_BUCKETS)
        histogram.counts, histogram.sum = list(self.counts), self.sum
        return histogram


class Metrics:
    """What the event loop counts: commands and sessions by protocol (line, http, console),
    events lost by subscribers that fell behind."""

    def __init__(self) -> None:
        self.commands: dict[str, dict[str, CommandStats]] = {"line": {}, "http": {}, "console": {}}
        self.sessions_opened = {"line": 0, "http": 0}
        self.events_dropped = 0  # told (overflow) or given up with the subscription; see Server
        self.connections_refused = 0  # over the cap or out of descriptors, line and HTTP (Server.note_refused)

    def ok(self, protocol: str, name: str, seconds: float) -> None:
        """Command ``name`` succeeded in ``seconds``."""
        stats = self.commands[protocol].get(name)
        if stats is None:
            stats = self.commands[protocol][name] = CommandStats()
        stats.ok += 1
        stats.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds: Prometheus' "le"
        stats.sum += seconds

    def failed(self, protocol: str, name: str, code: str, seconds: float) -> None:
        """Command ``name`` answered error ``code`` (its value) after ``seconds``; an unknown
        name is counted under UNKNOWN, so that a client cannot add labels."""
        if code == "unknown_command":
            name = UNKNOWN
        stats = self.commands[protocol].get(name)
        if stats is None:
            stats = self.commands[protocol][name] = CommandStats()
        stats.codes[code] = stats.codes.get(code, 0) + 1
        stats.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        stats.sum += seconds
