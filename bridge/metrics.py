"""Prometheus metrics of one bridge, from one declarative table.

The bridge counts everything as dotted names in `Counters` (``route.<name>.rejected.<reason>``,
``rooms.lost``, ...): cheap on the hot path, nothing to register. `METRICS` says once how those
names become Prometheus families with labels (``roombus_`` prefix, ``_total`` counters, base
units, labels ``route``, ``direction``, ``bus``, ``room``, ``reason``, ``outcome``); the exporter
(`BridgeCollector`, read at scrape time) and the README's table (`markdown_table`, via
`bridge.docs`) both come from it, so they cannot disagree.

Three scopes of counters feed it: the bridge's own (`Bridge.counters`), each room session's
(`Room.counters`: packets, streams, RPC at the participant level; labelled ``room``) and each
bus endpoint's (``mqtt.*``, ``kafka.*``; labelled ``bus``). A name no definition matches is
still exported, under the scope's catch-all family (``roombus_events_total{event=...}`` and
the like), so nothing is hidden. Gauges read live objects when scraped: buffers, in-flight
counts, spool size and age, connection state, tasks.

Each bridge has its own `CollectorRegistry` (`BridgeMetrics.registry`), never the process-wide
default: tests run several bridges in one process.
"""

from __future__ import annotations

import platform
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from bridge import __version__
from bridge.room.types import Histogram

if TYPE_CHECKING:
    from bridge.room.room import Room
    from bridge.runtime.bridge import Bridge

Kind = Literal["counter", "gauge", "histogram", "info"]
Scope = Literal["bridge", "room", "bus"]

ROOM_TO_BUS = "room_to_bus"
BUS_TO_ROOM = "bus_to_room"
# Labels the collector fills in itself from the route's name (see `route_info`).
ROUTE_LABELS = ("route", "direction", "bus")


@dataclass(frozen=True)
class Feed:
    """Which dotted counters feed a family.

    Attributes:
        pattern: A dotted name with ``{label}`` placeholders, e.g.
            ``route.{route}.dropped.{reason}``.
        scope: Whose counters: the bridge's, a room session's (adds ``room``) or a bus
            endpoint's (adds ``bus``).
        labels: Fixed label values this feed adds (e.g. ``outcome="ok"``).
    """

    pattern: str
    scope: Scope = "bridge"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricDef:
    """One metric family: its exposed name, type, labels, meaning and what feeds it.

    Gauges and the build info have no feeds: `source` says what they read when scraped.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    feeds: tuple[Feed, ...] = ()
    source: str = ""


def _route(name: str, help: str, suffix: str, *extra: str, **fixed: str) -> MetricDef:
    return MetricDef(
        name,
        "counter",
        help,
        (*ROUTE_LABELS, *extra, *fixed),
        (Feed(f"route.{{route}}.{suffix}", labels=fixed),),
    )


# The single source of the exporter and of the README's table. Order matters: a counter name
# goes to the first definition whose feed matches it; the catch-alls come last in each scope.
METRICS: tuple[MetricDef, ...] = (
    # ------------------------------------------------------------------ routes
    _route(
        "roombus_route_received_total",
        "Messages a route took: room events into a room-to-bus route's buffer, bus messages"
        " a bus-to-room route matched",
        "received",
    ),
    _route(
        "roombus_route_published_total",
        "Messages of a room-to-bus route the broker acknowledged",
        "published",
    ),
    _route(
        "roombus_route_delivered_total",
        "Bus messages a bus-to-room route delivered into the room (livekit-server has them)",
        "delivered",
    ),
    _route(
        "roombus_route_rejected_total",
        "Messages that can never go along the route, by reason (then dead-lettered, dropped, held)",
        "rejected.{reason}",
        "reason",
    ),
    _route(
        "roombus_route_dropped_total",
        "Messages dropped by reason (a rejection without dead letter, a full buffer: overflow,"
        " over the route's rate: rate_limited, a data-track frame the track could not take"
        " now: data_track_full)",
        "dropped.{reason}",
        "reason",
    ),
    _route(
        "roombus_route_dead_lettered_total",
        "Rejected messages published to the route's dead-letter destination",
        "dead_lettered",
    ),
    _route(
        "roombus_route_dead_letter_failures_total",
        "Rejected messages the dead-letter destination refused too (then dropped)",
        "dead_letter_failed",
    ),
    _route(
        "roombus_route_held_total",
        "Rejected messages held unacknowledged on the bus (on_reject: hold)",
        "held",
    ),
    _route(
        "roombus_route_expired_total",
        "Bus messages whose MQTT 5 message expiry passed before delivery",
        "expired",
    ),
    _route(
        "roombus_route_coalesced_total",
        "Messages over the route's rate replaced by a newer one of the same key (rate policy"
        " latest); bus messages are acknowledged when replaced",
        "coalesced",
    ),
    _route(
        "roombus_route_latched_sent_total",
        "Latched values sent to participants that joined later (bus-to-room, latched: true)",
        "latched_sent",
    ),
    _route(
        "roombus_route_latched_evicted_total",
        "Latched values forgotten because the route held latched.max_keys topics",
        "latched_evicted",
    ),
    _route(
        "roombus_route_filtered_total",
        "Messages the route's `where:` filter let not through (false, or an evaluation error),"
        " acknowledged and never dead-lettered",
        "filtered",
    ),
    _route(
        "roombus_route_denied_total",
        "Messages and RPC calls the route's allow/deny rules refused: a sender, a caller or a"
        " destination identity",
        "denied",
    ),
    MetricDef(
        "roombus_route_retries_total",
        "counter",
        "Transient failures retried: publishes to the bus, deliveries into a room",
        ROUTE_LABELS,
        (Feed("route.{route}.publish_retries"), Feed("route.{route}.delivery_retries")),
    ),
    MetricDef(
        "roombus_rpc_calls_total",
        "counter",
        "RPC calls across the bridge by outcome and LiveKit error code (empty when ok)",
        (*ROUTE_LABELS, "outcome", "code"),
        (
            Feed("route.{route}.rpc_calls.ok", labels={"outcome": "ok", "code": ""}),
            Feed("route.{route}.rpc_calls.error.{code}", labels={"outcome": "error"}),
        ),
    ),
    MetricDef(
        "roombus_rpc_replies_total",
        "counter",
        "Bus replies to bus-to-room RPC requests, by outcome (published, refused, failed)",
        (*ROUTE_LABELS, "outcome"),
        (
            Feed("route.{route}.rpc_replied", labels={"outcome": "published"}),
            Feed("route.{route}.rpc_reply_refused", labels={"outcome": "refused"}),
            Feed("route.{route}.rpc_reply_failed", labels={"outcome": "failed"}),
        ),
    ),
    _route(
        "roombus_rpc_duplicates_total",
        "Redelivered RPC requests answered from the reply cache",
        "rpc_duplicate",
    ),
    MetricDef(
        "roombus_route_latency_seconds",
        "histogram",
        "End to end per message: bus receipt to livekit-server's acknowledgement (bus to room),"
        " lk-timestamp to the broker's acknowledgement (room to bus)",
        ROUTE_LABELS,
        (Feed("route.{route}.latency"),),
    ),
    MetricDef(
        "roombus_rpc_duration_seconds",
        "histogram",
        "RPC calls across the bridge, from the request to its answer",
        ROUTE_LABELS,
        (Feed("route.{route}.rpc_seconds"),),
    ),
    MetricDef(
        "roombus_route_queue_depth",
        "gauge",
        "Messages waiting in a room-to-bus route's buffer or spool",
        ROUTE_LABELS,
        source="live: the route's outbox",
    ),
    MetricDef(
        "roombus_route_in_flight",
        "gauge",
        "Publishes of a room-to-bus route awaiting the broker's acknowledgement",
        ROUTE_LABELS,
        source="live: the route's outbox",
    ),
    MetricDef(
        "roombus_route_spool_bytes",
        "gauge",
        "Payload bytes in a room-to-bus route's spool",
        ROUTE_LABELS,
        source="live: the route's spool (bridge.spool)",
    ),
    MetricDef(
        "roombus_route_spool_oldest_age_seconds",
        "gauge",
        "Age of the oldest message in a room-to-bus route's spool (0 when empty)",
        ROUTE_LABELS,
        source="live: the route's spool (bridge.spool)",
    ),
    MetricDef(
        "roombus_route_events_total",
        "counter",
        "Every other per-route event, by its dotted name (e.g. rpc_timeout)",
        (*ROUTE_LABELS, "event"),
        (Feed("route.{route}.{event}"),),
    ),
    # ------------------------------------------------------------------ bus sources
    MetricDef(
        "roombus_source_in_flight",
        "gauge",
        "Messages taken from a bus source and not yet settled",
        ("source",),
        source="live: the source's pump",
    ),
    MetricDef(
        "roombus_source_unmatched_total",
        "counter",
        "Bus messages no route matched (acknowledged)",
        ("source",),
        (Feed("source.{source}.unmatched"),),
    ),
    MetricDef(
        "roombus_loop_skipped_total",
        "counter",
        "Bus messages the bridge itself published (loop guard), not routed back",
        feeds=(Feed("loop.skipped"),),
    ),
    # ------------------------------------------------------------------ rooms
    MetricDef(
        "roombus_room_connected",
        "gauge",
        "1 while the bridge is in the room, 0 while it joins or rejoins",
        ("room",),
        source="live: the room link",
    ),
    MetricDef(
        "roombus_room_participants",
        "gauge",
        "Remote participants in the room",
        ("room",),
        source="live: the room",
    ),
    MetricDef(
        "roombus_rooms_joined",
        "gauge",
        "Rooms the bridge is in now",
        source="live: the room links",
    ),
    MetricDef(
        "roombus_room_joins_total",
        "counter",
        "Successful joins and rejoins",
        feeds=(Feed("rooms.joined"),),
    ),
    MetricDef(
        "roombus_room_losses_total",
        "counter",
        "Room sessions lost (each is followed by a rejoin)",
        feeds=(Feed("rooms.lost"),),
    ),
    MetricDef(
        "roombus_room_join_failures_total",
        "counter",
        "Join attempts that failed (retried with backoff)",
        feeds=(Feed("rooms.join_failed"),),
    ),
    MetricDef(
        "roombus_room_discovery_failures_total",
        "counter",
        "Failed listings of rooms matching livekit.room_patterns",
        feeds=(Feed("rooms.discovery_failed"),),
    ),
    MetricDef(
        "roombus_room_packets_received_total",
        "counter",
        "Data packets received in the room",
        ("room",),
        (Feed("packets.received", "room"),),
    ),
    MetricDef(
        "roombus_room_events_total",
        "counter",
        "Every other event of a room session (packets.*, streams.*, rpc.*, state.*, ...)",
        ("room", "event"),
        (Feed("{event}", "room"),),
    ),
    # ------------------------------------------------------------------ bus connections
    MetricDef(
        "roombus_bus_connected",
        "gauge",
        "1 while the bus connection is up",
        ("bus",),
        source="live: the endpoint",
    ),
    MetricDef(
        "roombus_bus_connects_total",
        "counter",
        "Connections established (reconnects are this minus one)",
        ("bus",),
        (Feed("mqtt.connected", "bus"),),
    ),
    MetricDef(
        "roombus_bus_connection_losses_total",
        "counter",
        "Connections lost (then re-established in the background)",
        ("bus",),
        (Feed("mqtt.connection_lost", "bus"),),
    ),
    MetricDef(
        "roombus_bus_connect_retries_total",
        "counter",
        "Connection attempts that failed (retried with backoff)",
        ("bus",),
        (Feed("mqtt.connect_failed", "bus"), Feed("kafka.connect_retry", "bus")),
    ),
    MetricDef(
        "roombus_bus_events_total",
        "counter",
        "Every other event of a bus connection (mqtt.*, kafka.*)",
        ("bus", "event"),
        (Feed("{event}", "bus"),),
    ),
    # ------------------------------------------------------------------ the bridge
    MetricDef(
        "roombus_ready",
        "gauge",
        "1 when /ready answers 200: every room joined, bus connection up, task running",
        source="live: the bridge's readiness",
    ),
    MetricDef(
        "roombus_task_running",
        "gauge",
        "1 while a long-lived task runs, 0 while it restarts after a crash",
        ("task",),
        source="live: the bridge's supervisor",
    ),
    MetricDef(
        "roombus_task_crashes_total",
        "counter",
        "Crashes of a long-lived task (each restarted with backoff)",
        ("task",),
        (Feed("tasks.crashed.{task}"),),
    ),
    MetricDef(
        "roombus_shutdown_undelivered_total",
        "counter",
        "Room-to-bus messages a graceful stop could not publish in time (no spool)",
        feeds=(Feed("shutdown.undelivered"),),
    ),
    MetricDef(
        "roombus_spool_expired_total",
        "counter",
        "Spooled messages older than spool.max_age, forgotten",
        feeds=(Feed("spool.expired"),),
    ),
    MetricDef(
        "roombus_rpc_stray_replies_total",
        "counter",
        "Bus replies to room-to-bus calls already answered (late) or never made (unknown)",
        ("reason",),
        (
            Feed("rpc.late_reply", labels={"reason": "late"}),
            Feed("rpc.unknown_reply", labels={"reason": "unknown"}),
        ),
    ),
    MetricDef(
        "roombus_config_reloads_total",
        "counter",
        "Configuration reloads by result (applied, rejected, failed)",
        ("result",),
        (Feed("config.reloads.{result}"),),
    ),
    MetricDef(
        "roombus_build_info",
        "info",
        "The running roombus: version, bridge id, Python version",
        ("version", "bridge_id", "python"),
        source="live: the bridge",
    ),
    MetricDef(
        "roombus_events_total",
        "counter",
        "Every other event the bridge counts, by its dotted name",
        ("event",),
        (Feed("{event}"),),
    ),
)

BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}


# ----------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class _Compiled:
    metric: MetricDef
    feed: Feed
    regex: re.Pattern[str]
    route_suffix: re.Pattern[str] | None  # for route.{route}.<suffix>: the suffix alone


_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_ROUTE_PREFIX = "route.{route}."


def _regex(pattern: str) -> re.Pattern[str]:
    """`pattern` as a regex, its placeholders as named groups.

    A placeholder matches one or more characters, dots included (route and task names may
    contain dots): the last one greedily, the others as little as possible.
    """
    parts = _PLACEHOLDER.split(pattern)
    out: list[str] = []
    names = parts[1::2]
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?P<{part}>.+)" if part == names[-1] else f"(?P<{part}>.+?)")
    return re.compile("".join(out))


def _compile() -> dict[tuple[Scope, str], list[_Compiled]]:
    table: dict[tuple[Scope, str], list[_Compiled]] = {}
    for metric in METRICS:
        for feed in metric.feeds:
            kind = "histogram" if metric.kind == "histogram" else "counter"
            suffix = None
            if feed.pattern.startswith(_ROUTE_PREFIX):
                suffix = _regex(feed.pattern[len(_ROUTE_PREFIX) :])
            compiled = _Compiled(metric, feed, _regex(feed.pattern), suffix)
            table.setdefault((feed.scope, kind), []).append(compiled)
    return table


_TABLE = _compile()
Match = tuple[MetricDef, dict[str, str]]


class Classifier:
    """Maps dotted counter names to (family, labels), cached per name.

    Route names are resolved against the routes the bridge runs (`routes`), longest first, so
    a route called ``a.b`` is never mistaken for route ``a`` with event ``b.published``.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[Scope, str, str], Match | None] = {}
        self._routes: tuple[str, ...] = ()

    def set_routes(self, routes: Iterable[str]) -> None:
        """The route names in use now (forget cached matches when they changed)."""
        ordered = tuple(sorted(routes, key=len, reverse=True))
        if ordered != self._routes:
            self._routes = ordered
            self._cache.clear()

    def match(self, scope: Scope, name: str, kind: str = "counter") -> Match | None:
        """The family and labels of counter (or histogram) `name` of `scope`."""
        key = (scope, kind, name)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._match(scope, name, kind)
        self._cache[key] = found
        return found

    def _match(self, scope: Scope, name: str, kind: str) -> Match | None:
        route = None
        if name.startswith("route."):
            for candidate in self._routes:
                if (
                    name.startswith(candidate, 6)
                    and name[6 + len(candidate) : 7 + len(candidate)] == "."
                ):
                    route = candidate
                    break
        for c in _TABLE.get((scope, kind), ()):
            if route is not None and c.route_suffix is not None:
                m = c.route_suffix.fullmatch(name, 7 + len(route))
                if m is None:
                    continue
                labels = {"route": route, **m.groupdict()}
            else:
                m = c.regex.fullmatch(name)
                if m is None:
                    continue
                labels = m.groupdict()
            return c.metric, {**labels, **c.feed.labels}
        return None


# ----------------------------------------------------------------------------- the bridge


def route_info(bridge: Bridge) -> dict[str, tuple[str, str]]:
    """Every route the bridge runs: name -> (direction, bus endpoint)."""
    info: dict[str, tuple[str, str]] = {}
    for pump in bridge.pumps:
        for route in pump.routes:
            info[route.name] = (BUS_TO_ROOM, pump.endpoint)
    for outbox in bridge.outboxes:
        info[outbox.name] = (ROOM_TO_BUS, outbox.route.target.endpoint)
    for out in bridge.rpc.out_routes:
        info[out.name] = (ROOM_TO_BUS, out.target.endpoint)
    return info


# The per-route totals /status shows: status key -> the family that holds it.
STATUS_COUNTS: dict[str, str] = {
    "received": "roombus_route_received_total",
    "published": "roombus_route_published_total",
    "delivered": "roombus_route_delivered_total",
    "rejected": "roombus_route_rejected_total",
    "dropped": "roombus_route_dropped_total",
    "dead_lettered": "roombus_route_dead_lettered_total",
    "held": "roombus_route_held_total",
    "expired": "roombus_route_expired_total",
    "retries": "roombus_route_retries_total",
}
_STATUS_KEY = {family: key for key, family in STATUS_COUNTS.items()}


class BridgeMetrics:
    """The metrics of one bridge: its registry for `/metrics`, and the totals `/status` shows.

    Keeps what a room's earlier sessions counted: a `Room` (and its counters) is replaced at
    every rejoin, and a counter must not go back (see `_room_counts`).
    """

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.classifier = Classifier()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BridgeCollector(self))
        # room name -> (the session last seen, what its earlier sessions counted)
        self._rooms: dict[str, tuple[Room | None, Counter[str]]] = {}

    def routes(self) -> dict[str, tuple[str, str]]:
        """`route_info`, also telling the classifier which route names exist."""
        info = route_info(self.bridge)
        self.classifier.set_routes(info)
        return info

    def route_counts(self) -> dict[str, dict[str, int]]:
        """Per route, its totals (`STATUS_COUNTS` keys; sums over reasons)."""
        info = self.routes()
        counts = {name: dict.fromkeys(STATUS_COUNTS, 0) for name in info}
        match = self.classifier.match
        for name, value in self.bridge.counters.items():
            if not name.startswith("route."):
                continue
            found = match("bridge", name)
            if found is None:
                continue
            key = _STATUS_KEY.get(found[0].name)
            if key is not None:
                counts.setdefault(found[1]["route"], dict.fromkeys(STATUS_COUNTS, 0))[key] += value
        return counts

    def room_counts(self) -> dict[str, Counter[str]]:
        """Per room, what every session of it counted so far."""
        out: dict[str, Counter[str]] = {}
        links = self.bridge.links
        for gone in [name for name in self._rooms if name not in links]:
            del self._rooms[gone]  # a room the bridge left for good (a reload)
        for name, link in links.items():
            room = link.room
            seen, base = self._rooms.get(name, (None, Counter()))
            if seen is not None and room is not seen:
                base = base + seen.counters  # that session is over: fold it in
            self._rooms[name] = (room, base)
            out[name] = base + room.counters if room is not None else Counter(base)
        return out


class BridgeCollector(Collector):
    """Builds every family of `METRICS` from the bridge's live state at scrape time."""

    def __init__(self, metrics: BridgeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:  # noqa: D102 - prometheus_client's interface
        m = self.metrics
        bridge = m.bridge
        routes = m.routes()
        samples: dict[str, dict[tuple[str, ...], float]] = {d.name: {} for d in METRICS}

        def labelled(metric: MetricDef, labels: dict[str, str]) -> tuple[str, ...]:
            route = labels.get("route")
            if route is not None:
                direction, bus = routes.get(route, ("", ""))
                labels.setdefault("direction", direction)
                labels.setdefault("bus", bus)
            return tuple(labels.get(n, "") for n in metric.labels)

        def count(scope: Scope, counters: Mapping[str, int], extra: dict[str, str]) -> None:
            for name, value in counters.items():
                found = m.classifier.match(scope, name)
                if found is None:
                    continue
                metric, labels = found
                key = labelled(metric, {**labels, **extra})
                into = samples[metric.name]
                into[key] = into.get(key, 0) + value

        # Every route shows its main counts from the start, so rate() has a series to work on.
        for route, (direction, bus) in routes.items():
            names = (
                ("received", "published") if direction == ROOM_TO_BUS else ("received", "delivered")
            )
            for name in names:
                samples[f"roombus_route_{name}_total"][(route, direction, bus)] = 0
        count("bridge", bridge.counters, {})
        for room, counters in m.room_counts().items():
            count("room", counters, {"room": room})
        for endpoint in bridge.endpoints.ordered():
            bus_counters = getattr(endpoint, "counters", None)
            if isinstance(bus_counters, Mapping):
                count("bus", bus_counters, {"bus": endpoint.name})

        gauges = _gauges(bridge, routes)
        for d in METRICS:
            if d.kind == "counter":
                counter = CounterMetricFamily(d.name, d.help, labels=d.labels)
                for key, value in sorted(samples[d.name].items()):
                    counter.add_metric(key, value)
                yield counter
            elif d.kind == "gauge":
                gauge = GaugeMetricFamily(d.name, d.help, labels=d.labels)
                for key, value in gauges.get(d.name, ()):
                    gauge.add_metric(key, value)
                yield gauge
            elif d.kind == "histogram":
                yield _histogram(d, bridge.counters.histograms, m.classifier, labelled)
            else:
                info = InfoMetricFamily(d.name.removesuffix("_info"), d.help)
                info.add_metric(
                    [],
                    {
                        "version": __version__,
                        "bridge_id": bridge.bridge_id,
                        "python": platform.python_version(),
                    },
                )
                yield info


def _histogram(
    d: MetricDef,
    histograms: Mapping[str, Histogram],
    classifier: Classifier,
    labelled: Callable[[MetricDef, dict[str, str]], tuple[str, ...]],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(d.name, d.help, labels=d.labels)
    for name, h in sorted(histograms.items()):
        found = classifier.match("bridge", name, "histogram")
        if found is None or found[0] is not d:
            continue
        buckets = [(_bound(b), float(n)) for b, n in h.cumulative()]
        family.add_metric(labelled(d, dict(found[1])), buckets, h.sum)
    return family


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(b)


def _gauges(
    bridge: Bridge, routes: Mapping[str, tuple[str, str]]
) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    g: dict[str, list[tuple[tuple[str, ...], float]]] = {}

    def put(name: str, labels: tuple[str, ...], value: float) -> None:
        g.setdefault(name, []).append((labels, value))

    for outbox in bridge.outboxes:
        direction, bus = routes.get(outbox.name, (ROOM_TO_BUS, ""))
        key = (outbox.name, direction, bus)
        put("roombus_route_queue_depth", key, outbox.depth)
        put("roombus_route_in_flight", key, outbox.in_flight)
        spool = outbox.spool
        if spool is not None:
            size = getattr(spool, "bytes", None)
            if isinstance(size, int):
                put("roombus_route_spool_bytes", key, size)
            age = getattr(spool, "oldest_age", None)
            put("roombus_route_spool_oldest_age_seconds", key, float(age or 0.0))
    for pump in bridge.pumps:
        put("roombus_source_in_flight", (pump.name,), pump.in_flight)
    joined = 0
    for name, link in sorted(bridge.links.items()):
        up = link.connected.is_set()
        joined += up
        put("roombus_room_connected", (name,), int(up))
        room = link.room
        put("roombus_room_participants", (name,), len(room.remote_identities()) if room else 0)
    put("roombus_rooms_joined", (), joined)
    for endpoint in bridge.endpoints.ordered():
        put(
            "roombus_bus_connected",
            (endpoint.name,),
            int(bool(getattr(endpoint, "connected", True))),
        )
    ready, _ = bridge.readiness()
    put("roombus_ready", (), int(ready))
    for task, state in sorted(bridge.tasks.items()):
        put("roombus_task_running", (task,), int(state == "running"))
    return g


# ----------------------------------------------------------------------------- docs


def markdown_table() -> str:
    """The README's metrics table (generated: `python -m bridge.docs`)."""
    rows = ["| metric | type | labels | meaning | from |", "|---|---|---|---|---|"]
    for d in METRICS:
        labels = ", ".join(f"`{label}`" for label in d.labels)
        fed = ", ".join(f"`{_doc_pattern(f)}`" for f in d.feeds) if d.feeds else d.source
        meaning = d.help.replace("|", "\\|")
        rows.append(f"| `{d.name}` | {d.kind} | {labels} | {meaning} | {fed} |")
    return "\n".join(rows)


def _doc_pattern(feed: Feed) -> str:
    pattern = _PLACEHOLDER.sub(lambda m: f"<{m.group(1)}>", feed.pattern)
    where = {"bridge": "", "room": "room: ", "bus": "bus: "}[feed.scope]
    return where + pattern
