"""Metrics without servers: the table, the dotted-name mapping, the exposition, /status totals.

The bridge here runs on the in-memory bus (`connectors.memory`) and joins no room; what the
same metrics show after real traffic through LiveKit, Kafka and Mosquitto is in
tests/e2e/test_metrics.py.
"""

from __future__ import annotations

import asyncio
import math
import platform
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import parse_config
from bridge.docs import METRICS_BEGIN, METRICS_END, reference
from bridge.envelope import H_TIMESTAMP, Outbound
from bridge.health import HealthServer
from bridge.metrics import METRICS, BridgeMetrics, Classifier, markdown_table
from bridge.room.types import LATENCY_BUCKETS, Counters, Histogram
from bridge.router import RoomMessage, ToRoomRoute, compile_routes
from bridge.runtime.bridge import Bridge, BusSource, Endpoints
from bridge.runtime.publisher import Publisher
from connectors.memory import MemoryBroker, MemoryBus

README = Path(__file__).resolve().parents[2] / "README.md"
CATCH_ALLS = {
    "roombus_events_total",
    "roombus_route_events_total",
    "roombus_room_events_total",
    "roombus_bus_events_total",
}

HEAD = """\
livekit: {url: "ws://127.0.0.1:9", api_key: k, api_secret: "0123456789abcdef0123456789abcdef",
  room_patterns: ["none-*"], room_discovery_interval: 3600}
mqtt: {bus: {host: 127.0.0.1}}
connectors:
  - name: in.dotted
    from: {mqtt: bus, topic: "dev/{room}/{n}", format: json}
    to: {room: "{room}", packet: {topic: t}}
  - name: out
    from: {room: "*", packet: {topic: "t"}}
    to: {mqtt: bus, topic: "out/{participant}"}
"""


async def eventually(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    del what


@asynccontextmanager
async def running_bridge() -> AsyncIterator[tuple[Bridge, MemoryBus]]:
    """A bridge on the memory bus: route ``in.dotted`` (bus to room; its rooms are not joined,
    so every delivery is rejected ``unknown_room``) and ``out`` (room to bus)."""
    broker = MemoryBroker()
    source = MemoryBus("mqtt:bus", broker, subscriptions=["dev/#"])
    sink = MemoryBus("mqtt:bus:pub", broker)
    config = parse_config(HEAD, "test.yaml")
    to_room = tuple(r for r in compile_routes(config) if isinstance(r, ToRoomRoute))
    endpoints = Endpoints({"mqtt:bus": sink}, [BusSource("mqtt:bus", "mqtt:bus", source, to_room)])
    bridge = Bridge(config, endpoints)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await eventually(lambda: bridge.ready.is_set() or task.done(), "the bridge to run")
    try:
        yield bridge, sink
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def scrape(metrics: BridgeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    text = generate_latest(metrics.registry).decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


# ----------------------------------------------------------------------------- the table


def test_the_table_follows_prometheus_naming() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"roombus_[a-z_]+", m.name), m.name
        assert m.help and not m.help.endswith(".")
        if m.kind == "counter":
            assert m.name.endswith("_total"), m.name
            assert m.feeds, m.name
        elif m.kind == "histogram":
            assert m.name.endswith("_seconds"), m.name
        elif m.kind == "info":
            assert m.name.endswith("_info"), m.name
        else:
            assert not m.name.endswith("_total") and m.source, m.name
        for feed in m.feeds:
            placeholders = set(re.findall(r"\{(\w+)\}", feed.pattern))
            assert placeholders | set(feed.labels) | {"direction", "bus", "room"} >= set(
                m.labels
            ), m.name


def _readme_counters() -> set[str]:
    """Dotted counter names the README tells operators about (`route.<name>.held`, ...)."""
    text = README.read_text()
    begin, end = text.index(METRICS_BEGIN), text.index(METRICS_END)
    text = text[:begin] + text[end:]  # the generated table maps them by construction
    found = set(
        re.findall(
            r"`((?:route|rooms|tasks|spool|shutdown|rpc|config\.reloads)\.[a-z_<>.]+)`", text
        )
    )
    # `.dead_lettered`, `.held`: suffixes of route.<name> in the delivery semantics
    semantics = text[text.index("## Delivery semantics") :]
    semantics = semantics[: semantics.index("\n## ")]
    found |= {f"route.<name>{s}" for s in re.findall(r"`(\.[a-z_][a-z_<>.]*)`", semantics)}
    keys = reference()  # names like `rpc.timeout` or `spool.max_age` are configuration keys
    return {n for n in found if not n.endswith(".") and f".{n}` |" not in keys}


def test_every_counter_the_readme_names_has_its_own_family() -> None:
    names = _readme_counters()
    assert "route.<name>.rejected.bad_template_value" in names
    assert "shutdown.undelivered" in names and "spool.expired" in names
    c = Classifier()
    c.set_routes(["r"])
    for name in names:
        concrete = name.replace("<name>", "r").replace("<reason>", "too_large")
        concrete = concrete.replace("<task>", "pump:mqtt:bus")
        found = c.match("bridge", concrete)
        assert found is not None and found[0].name not in CATCH_ALLS, name


def test_route_names_with_dots_are_resolved_against_the_routes_that_exist() -> None:
    c = Classifier()
    c.set_routes(["a", "a.b"])
    metric, found = c.match("bridge", "route.a.b.rejected.too_large")  # type: ignore[misc]
    assert metric.name == "roombus_route_rejected_total"
    assert found == {"route": "a.b", "reason": "too_large"}
    metric, found = c.match("bridge", "route.a.b.rpc_timeout")  # type: ignore[misc]
    assert (metric.name, found) == (
        "roombus_route_events_total",
        {"route": "a.b", "event": "rpc_timeout"},
    )
    metric, found = c.match("bridge", "route.a.rpc_calls.error.1502")  # type: ignore[misc]
    assert found == {"route": "a", "outcome": "error", "code": "1502"}
    metric, found = c.match("bridge", "tasks.crashed.kafka:main:live.chat")  # type: ignore[misc]
    assert (metric.name, found) == ("roombus_task_crashes_total", {"task": "kafka:main:live.chat"})
    metric, found = c.match("bridge", "something.new")  # type: ignore[misc]
    assert (metric.name, found) == ("roombus_events_total", {"event": "something.new"})
    metric, found = c.match("room", "streams.chunk_gap")  # type: ignore[misc]
    assert metric.name == "roombus_room_events_total"
    assert c.match("bridge", "route.a.latency", "histogram") is not None


def test_the_readme_table_is_generated_from_the_table() -> None:
    table = markdown_table()
    for m in METRICS:
        assert f"| `{m.name}` | {m.kind} |" in table
    assert table in README.read_text()


# ----------------------------------------------------------------------------- histograms


def test_histogram_buckets_include_their_bound_and_end_in_inf() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]
    assert h.count == 5
    assert math.isclose(h.sum, 8.65)
    c = Counters()
    c.observe("route.r.latency", 0.003)
    assert c.histograms["route.r.latency"].bounds == LATENCY_BUCKETS
    assert c.copy() == c  # still a Counter


def test_publisher_observes_room_to_bus_latency_but_not_dead_letter_copies() -> None:
    c = Counters()
    p = Publisher(c)
    sent = str(int(time.time() * 1000) - 40)
    p._published("r", Outbound("t", b"x", headers=((H_TIMESTAMP, sent),)))
    p._published("r", Outbound("t", b"x", headers=((H_TIMESTAMP, sent), ("roombus-error", "x"))))
    p._published("r", Outbound("t", b"x"))
    h = c.histograms["route.r.latency"]
    assert h.count == 1
    assert 0.039 <= h.sum < 60


# ----------------------------------------------------------------------------- the bridge


async def test_exposition_counts_what_went_through_the_bridge() -> None:
    async with running_bridge() as (bridge, sink):
        metrics = BridgeMetrics(bridge)
        outbox = next(o for o in bridge.outboxes if o.name == "out")
        headers = {"lk-room": "r", H_TIMESTAMP: str(int(time.time() * 1000))}
        for n in range(3):
            values = {"room": "r", "participant": "p", "kind": "packet-reliable", "topic": "t"}
            outbox.offer(RoomMessage("packet", b"%d" % n, values, headers))
        bad = {"room": "r", "participant": "a/+", "kind": "packet-reliable", "topic": "t"}
        outbox.offer(RoomMessage("packet", b"bad", bad, headers))  # a wildcard: rejected
        broker_in = MemoryBus("mqtt:peer", sink.broker)
        async with broker_in:
            for n in range(2):
                await broker_in.publish(Outbound(f"dev/nowhere/{n}", b'{"payload": "x"}'))
        c = bridge.counters
        await eventually(
            lambda: (
                c["route.out.published"] == 3 and c["route.in.dotted.dropped.unknown_room"] == 2
            ),
            "traffic settled",
        )
        got = scrape(metrics)
        out = {"route": "out", "direction": "room_to_bus", "bus": "mqtt:bus"}
        inn = {"route": "in.dotted", "direction": "bus_to_room", "bus": "mqtt:bus"}
        assert got[("roombus_route_received_total", labels(**out))] == 4
        assert got[("roombus_route_published_total", labels(**out))] == 3
        assert (
            got[("roombus_route_rejected_total", labels(**out, reason="bad_template_value"))] == 1
        )
        assert got[("roombus_route_dropped_total", labels(**out, reason="bad_template_value"))] == 1
        assert got[("roombus_route_rejected_total", labels(**inn, reason="unknown_room"))] == 2
        assert got[("roombus_route_delivered_total", labels(**inn))] == 0
        assert got[("roombus_route_latency_seconds_count", labels(**out))] == 3
        assert got[("roombus_route_latency_seconds_bucket", labels(**out, le="+Inf"))] == 3
        assert got[("roombus_route_queue_depth", labels(**out))] == 0
        assert got[("roombus_bus_connected", labels(bus="mqtt:bus"))] == 1
        assert got[("roombus_source_in_flight", labels(source="mqtt:bus"))] == 0
        assert got[("roombus_task_running", labels(task="outbox:out"))] == 1
        assert (
            "roombus_build_info",
            labels(bridge_id=bridge.bridge_id, python=platform.python_version(), version="0.1.0"),
        ) in got

        # /status shows the same totals, and the last error of each route.
        status = HealthServer(bridge, 0).full_status()
        assert status["routes"]["out"]["counts"]["published"] == 3
        assert status["routes"]["out"]["counts"]["rejected"] == 1
        assert status["routes"]["in.dotted"]["counts"]["dropped"] == 2
        assert "unknown_room" in status["routes"]["in.dotted"]["last_error"]["message"]
        assert status["routes"]["out"]["direction"] == "room_to_bus"
        assert status["connections"]["mqtt:bus"]["connected"] is True
        assert {e["route"] for e in status["errors"]} == {"out", "in.dotted"}


async def test_status_rates_come_from_the_sample_ring() -> None:
    async with running_bridge() as (bridge, _):
        server = HealthServer(bridge, 0)
        start = time.monotonic()
        server._samples.append((start - 2.0, {"out": {"published": 10, "received": 10}}))
        bridge.counters.inc("route.out.published", 30)
        bridge.counters.inc("route.out.received", 30)
        route = server.full_status()["routes"]["out"]
        assert 9.0 <= route["rate"] <= 10.0  # 20 more in ~2 s
        assert route["rates"]["received"] == route["rate"]


async def test_room_counters_keep_counting_across_rejoins() -> None:
    async with running_bridge() as (bridge, _):
        metrics = BridgeMetrics(bridge)

        def session(received: int) -> Any:
            counters = Counters()
            counters.inc("packets.received", received)
            return SimpleNamespace(counters=counters, remote_identities=lambda: ["a", "b"])

        link: Any = SimpleNamespace(room=session(5), connected=asyncio.Event(), last_error=None)
        bridge.links["lobby"] = link
        key = ("roombus_room_packets_received_total", labels(room="lobby"))
        assert scrape(metrics)[key] == 5
        first = link.room
        first.counters.inc("packets.received", 2)  # counted after the last scrape
        link.room = None  # lost, rejoining
        assert scrape(metrics)[key] == 7
        link.room = session(1)  # a new session starts from zero
        assert scrape(metrics)[key] == 8
        assert scrape(metrics)[("roombus_room_participants", labels(room="lobby"))] == 2
        del bridge.links["lobby"]


async def test_two_bridges_in_one_process_have_their_own_registries() -> None:
    async with running_bridge() as (one, _), running_bridge() as (two, _):
        one.counters.inc("route.out.published", 2)
        a, b = scrape(BridgeMetrics(one)), scrape(BridgeMetrics(two))
        key = (
            "roombus_route_published_total",
            labels(route="out", direction="room_to_bus", bus="mqtt:bus"),
        )
        assert (a[key], b[key]) == (2, 0)
