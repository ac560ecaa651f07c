"""GET /metrics (issue 13): the server's numbers in Prometheus' text format, via prometheus-client.

The numbers are the server's own (metrics.py, the inventory's totals, the writer's counts,
the subscribers, the lease), read when Prometheus scrapes, on the event loop: commands never
call into prometheus-client. Imported by http_api.py alone (so only with --http-port), like aiohttp.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from . import __version__
from .backends import is_postgres
from .metrics import Histogram
from .presence import SERVER_ID

if TYPE_CHECKING:
    from .server import Server

MIB, GIB = 1 << 20, 1 << 30


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs, the bounds written as prometheus-client writes its own."""
    return [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]


class ServerCollector:
    """One Server's numbers as metric families, made anew at each scrape."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.backend = "postgres" if is_postgres(server.config.db) else "sqlite"

    def describe(self) -> list[Metric]:
        return []  # made at scrape time: the registry must not collect() at registration to learn names

    def collect(self) -> Iterator[Metric]:
        server, metrics = self.server, self.server.context.metrics
        inventory, store = server.inventory, server.inventory.store

        info = InfoMetricFamily("vmserver_build", "The running vmserver: its version, Python, database backend.")
        info.add_metric([], {"version": __version__, "python": platform.python_version(), "backend": self.backend})
        yield info
        ident = InfoMetricFamily("vmserver_server", "This server's id (stats, the greeting, the cluster's leases).")
        ident.add_metric([], {"server_id": SERVER_ID})
        yield ident

        http = server.http.sessions if server.http is not None else {}
        open_ = GaugeMetricFamily("vmserver_sessions", "Sessions open now, by protocol (an HTTP session: "
                                  "one opened by connect_vm, until it ends).", labels=["protocol"])
        open_.add_metric(["line"], len(server.sessions))
        open_.add_metric(["http"], len(http))
        yield open_
        opened = CounterMetricFamily("vmserver_sessions_opened", "Sessions opened since the server started, "
                                     "by protocol.", labels=["protocol"])
        for protocol, count in metrics.sessions_opened.items():
            opened.add_metric([protocol], count)
        yield opened

        refused = CounterMetricFamily("vmserver_connections_refused", "Connections refused over the cap "
                                      "(--max-connections) or out of descriptors, line and HTTP.")
        refused.add_metric([], metrics.connections_refused)
        yield refused
        if server.http is not None:
            answers = CounterMetricFamily("vmserver_http_responses", "HTTP answers by route and status, "
                                          "refusals before any command included (route (none): no route "
                                          "matched).", labels=["route", "status"])
            for (route, status), count in sorted(server.http.responses.items()):
                answers.add_metric([route, str(status)], count)
            yield answers

        commands = CounterMetricFamily("vmserver_commands", "Commands done, by protocol, command and outcome "
                                       '(code="ok" or the error code).', labels=["protocol", "command", "code"])
        latency = HistogramMetricFamily("vmserver_command_duration_seconds", "How long commands took, from "
                                        "their request to their reply (its writing not included).",
                                        labels=["protocol", "command"])
        for protocol, by_name in metrics.commands.items():
            for name, stats in sorted(by_name.items()):
                if stats.ok:
                    commands.add_metric([protocol, name, "ok"], stats.ok)
                for code, count in sorted(stats.codes.items()):
                    commands.add_metric([protocol, name, code], count)
                latency.add_metric([protocol, name], _buckets(stats.latency), stats.latency.sum)
        yield commands
        yield latency

        totals = inventory.totals()
        for name, key, text, scale in (
                ("vmserver_vms", "vms", "VMs registered.", 1),
                ("vmserver_vms_connected", "connected", "VMs connected now (on any server sharing the database).", 1),
                ("vmserver_vms_authorized", "authorized", "VMs authorized now.", 1),
                ("vmserver_disks", "disks", "Disks registered.", 1),
                ("vmserver_vm_ram_bytes", "ram", "The registered VMs' memory, summed.", MIB),
                ("vmserver_vm_cpus", "cpu", "The registered VMs' virtual CPUs, summed.", 1),
                ("vmserver_disk_size_bytes", "disk_size", "The registered disks' sizes, summed.", GIB)):
            yield GaugeMetricFamily(name, text, value=totals[key] * scale)

        writer = getattr(store, "writer", None)
        if writer is not None:
            sizes = writer.batch_sizes
            per_commit = HistogramMetricFamily("vmserver_writes_per_commit", "Writes that shared one transaction "
                                               "(group commit): a count per transaction.")
            buckets = _buckets(sizes)  # read before the sum: the writer thread may add a batch meanwhile
            per_commit.add_metric([], buckets, sizes.sum)
            yield per_commit
        errors = CounterMetricFamily("vmserver_database_errors", "Database operations that failed (nothing "
                                     "was changed), by backend and kind: write (every write, awaited by a "
                                     "command or not) or read (get_history).", labels=["backend", "kind"])
        errors.add_metric([self.backend, "write"], writer.failed if writer is not None else 0)
        errors.add_metric([self.backend, "read"], inventory.read_errors)
        yield errors

        subscribers = GaugeMetricFamily("vmserver_event_subscribers", "Subscribers to live events, by "
                                        "protocol (http: GET /events streams).", labels=["protocol"])
        dropped = CounterMetricFamily("vmserver_events_dropped", "Live events lost by subscribers that fell too "
                                      "far behind (told by an overflow event, or not yet told), by protocol.",
                                      labels=["protocol"])
        count, behind = self._subscribers()
        subscribers.add_metric(["line"], count)
        dropped.add_metric(["line"], metrics.events_dropped + behind)
        if server.http is not None:
            count, behind = server.http.events.behind()
            subscribers.add_metric(["http"], count)
            dropped.add_metric(["http"], server.http.events.dropped + behind)
        yield subscribers
        yield dropped

        if store.shared:  # several servers on one PostgreSQL: the lease
            lease: Any = store.lease
            yield GaugeMetricFamily("vmserver_lease_held", "1 while this server holds its lease on the "
                                    "database (and serves), 0 while it holds none.",
                                    value=int(lease.id is not None and server.unavailable is None))
            yield GaugeMetricFamily("vmserver_cluster_servers", "Live servers on the database (this one "
                                    "included), as of this server's last lease renewal.", value=len(lease.servers))

    def _subscribers(self) -> tuple[int, int]:
        """(subscribers, events they lost and have not been told of yet: a subscriber that does
        not read is told only once it reads again)."""
        server, count, behind = self.server, 0, 0
        for channel in server._channels.values():
            count += len(channel.members)
            oldest = channel.oldest
            for session in channel.members:
                sub = session.subscription
                if sub is not None and sub.cursor < oldest:
                    behind += oldest - sub.cursor
        for watchers in server._by_vm.values():
            for session in watchers:
                sub = session.subscription
                if sub is not None:
                    count += 1
                    behind += max(0, sub.channel.oldest - sub.cursor)
        return count, behind


class MetricsRoute:
    """GET /metrics: a registry of our own (never prometheus-client's global one) with the
    server's collector and the process's (CPU, memory, descriptors, garbage collection)."""

    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))  # OpenMetrics when asked
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})
