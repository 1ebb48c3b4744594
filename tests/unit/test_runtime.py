"""The runtime on the in-memory endpoint: ordering, nacks, rejections, supervision, degraded start.

No servers: bus sides are `connectors.memory.MemoryBus`, the room side a recording fake of
`RoomSink`. What the same behaviours look like against the real LiveKit, Kafka and Mosquitto
is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from bridge.config import parse_config
from bridge.endpoint import Inbound
from bridge.envelope import Envelope, Outbound
from bridge.errors import ConnectorError, RejectedMessage
from bridge.room.delivery import Delivery
from bridge.room.types import Counters
from bridge.router import RoomDelivery, RoomMessage, ToBusRoute, ToRoomRoute, compile_routes
from bridge.runtime import bridge as bridge_module
from bridge.runtime.bridge import Bridge, BusSource, Endpoints
from bridge.runtime.dead_letter import Rejections
from bridge.runtime.outbox import Outbox
from bridge.runtime.publisher import Publisher
from bridge.runtime.pump import BusPump
from bridge.spool import Spool, SpoolCodec
from connectors.memory import MemoryBroker, MemoryBus

# Port 9 on loopback: nothing listens, so joins and room discovery fail at once (and stay local).
ROOMS = 'room_patterns: ["none-*"], room_discovery_interval: 3600'
HEAD = """\
livekit: {url: "ws://127.0.0.1:9", api_key: k, api_secret: "0123456789abcdef0123456789abcdef",
  ROOMS}
mqtt: {bus: {host: 127.0.0.1}}
""".replace("ROOMS", ROOMS)


async def eventually(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    del what


class FakeRooms:
    """Records deliveries per room; a room can be held shut (a rejoining room) or made to fail."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.raise_once: BaseException | None = None
        self.pipelined = False  # `send` queues packets (their deliveries resolved by the test)
        self.sent: list[tuple[str, bytes, Delivery]] = []
        self.started: list[bytes] = []  # payloads `deliver` was called with, in call order

    async def deliver(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: object = None
    ) -> None:
        self.started.append(d.payload)
        gate = self.gates.get(d.room)
        if gate is not None:
            await gate.wait()
        if self.raise_once is not None:
            exc, self.raise_once = self.raise_once, None
            raise exc
        self.delivered.append((d.room, d.payload))

    async def send(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: object = None
    ) -> Delivery | None:
        """With `pipelined`, a packet into an open room is queued: its delivery is `sent`'s."""
        if not self.pipelined or d.room in self.gates or d.kind != "packet":
            return None
        delivery = Delivery()
        self.sent.append((d.room, d.payload, delivery))
        return delivery

    def confirmed(self, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        self.delivered.append((d.room, d.payload))


def _routes(body: str) -> list[ToRoomRoute]:
    config = parse_config(HEAD + body, "test.yaml")
    return [r for r in compile_routes(config) if isinstance(r, ToRoomRoute)]


def _out(topic: str, payload: bytes) -> Outbound:
    return Outbound(topic=topic, payload=payload)


@contextlib.asynccontextmanager
async def running_pump(
    body: str, rooms: FakeRooms, **bus: object
) -> AsyncIterator[tuple[MemoryBus, MemoryBus, Counters]]:
    """A pump reading `source` ("in" broker) with routes from `body`; dead letters go to "dlq"."""
    broker = MemoryBroker()
    source = MemoryBus("mqtt:bus", broker, subscriptions=["#"], **bus)  # type: ignore[arg-type]
    sink = MemoryBus("mqtt:bus:pub", broker)
    counters = Counters()
    rejections = Rejections({"mqtt:bus": sink}, Publisher(counters), counters, "me")
    pump = BusPump(
        "mqtt:bus",
        source,
        _routes(body),
        endpoint="mqtt:bus",
        room_sink=rooms,
        rejections=rejections,
        rpc=None,
        counters=counters,
        bridge_id="me",
        max_in_flight=64,
    )
    async with source, sink:
        task = asyncio.create_task(pump.run())
        try:
            yield source, sink, counters
        finally:
            pump.stop_reading()
            await asyncio.wait_for(task, 10)


ROUTE = """\
connectors:
  - name: in
    from: {mqtt: bus, topic: "dev/{room}/{n}", format: json}
    to: {room: "{room}", packet: {topic: t}}
"""


async def test_deliveries_run_concurrently_across_keys_and_in_order_within_a_key() -> None:
    rooms = FakeRooms()
    rooms.gates["slow"] = asyncio.Event()  # a room that is rejoining
    async with running_pump(ROUTE, rooms) as (source, sink, _):
        for i in range(20):
            await sink.publish(_out("dev/slow/1", b'{"payload": "s%d"}' % i))
            await sink.publish(_out(f"dev/fast/{i % 3}", b'{"payload": "f%d"}' % i))
        await eventually(lambda: len(rooms.delivered) == 20, "the fast room's 20 messages")
        assert {room for room, _ in rooms.delivered} == {"fast"}
        for key in range(3):
            got = [p for _, p in rooms.delivered if int(p[1:]) % 3 == key]
            assert got == sorted(got, key=lambda p: int(p[1:]))  # in order per key
        assert len(source.acked) == 20  # the slow key's messages are not acknowledged yet
        rooms.gates["slow"].set()
        await eventually(lambda: len(rooms.delivered) == 40, "the slow room's messages")
        assert [p for r, p in rooms.delivered if r == "slow"] == [b"s%d" % i for i in range(20)]
        await eventually(lambda: len(source.acked) == 40, "every message acknowledged")


async def test_a_lane_busy_when_reading_stops_ends_once_its_delivery_is_done() -> None:
    """`run` returns as soon as the deliveries in progress finish (a graceful stop's first step).

    A lane still delivering when reading stopped used to wait for more messages afterwards,
    forever: the stop then took the whole shutdown timeout.
    """
    rooms = FakeRooms()
    rooms.gates["slow"] = asyncio.Event()
    broker = MemoryBroker()
    source = MemoryBus("mqtt:bus", broker, subscriptions=["#"])
    sink = MemoryBus("mqtt:bus:pub", broker)
    counters = Counters()
    pump = BusPump(
        "mqtt:bus",
        source,
        _routes(ROUTE),
        endpoint="mqtt:bus",
        room_sink=rooms,
        rejections=Rejections({}, Publisher(counters), counters, "me"),
        rpc=None,
        counters=counters,
        bridge_id="me",
        max_in_flight=64,
    )
    async with source, sink:
        task = asyncio.create_task(pump.run())
        await sink.publish(_out("dev/slow/1", b'{"payload": "s"}'))
        await eventually(lambda: pump.in_flight == 1, "the delivery in progress")
        pump.stop_reading()
        await asyncio.sleep(0.05)
        assert not task.done()  # the delivery in progress is waited for
        rooms.gates["slow"].set()
        await eventually(task.done, "run returned once the delivery finished")
        await task
    assert rooms.delivered == [("slow", b"s")]
    assert len(source.acked) == 1


@pytest.mark.parametrize("policy", ["drop", "hold", "dead_letter"])
async def test_a_rejected_message_is_decided_once_by_on_reject(policy: str) -> None:
    dead_letter = (
        '\n    dead_letter: {mqtt: bus, topic: "dlq/{room}"}' if policy == "dead_letter" else ""
    )
    body = ROUTE.rstrip("\n") + f"\n    on_reject: {policy}{dead_letter}\n"
    rooms = FakeRooms()
    async with running_pump(body, rooms) as (source, sink, counters):
        await sink.publish(_out("dev/r/1", b"{not json"))
        await sink.publish(_out("dev/r/1", b'{"payload": "ok"}'))
        await eventually(lambda: rooms.delivered == [("r", b"ok")], "the good message")
        assert counters["route.in.rejected.malformed_json"] == 1
        if policy == "drop":
            await eventually(lambda: len(source.nacked) == 1, "the nack")
            envelope, why = source.nacked[0]
            assert (envelope.payload, why.reason) == (b"{not json", "malformed_json")
            assert counters["route.in.dropped.malformed_json"] == 1
        elif policy == "hold":
            assert counters["route.in.held"] == 1
            assert [e.payload for e in source.unsettled] == [b"{not json"]
            assert source.nacked == []
        else:
            dead = [m for m in sink.broker.published if m.topic == "dlq/r"]
            assert [m.payload for m in dead] == [b"{not json"]
            headers = dict(dead[0].headers)
            assert headers["roombus-error"] == "malformed_json"
            assert headers["roombus-origin-topic"] == "dev/r/1"
            await eventually(lambda: len(source.acked) == 3, "both acknowledged (and the DLQ copy)")
            assert counters["route.in.dead_lettered"] == 1


async def test_a_bug_in_a_delivery_is_a_rejection_and_the_lane_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rooms = FakeRooms()
    rooms.raise_once = RuntimeError("boom")
    async with running_pump(ROUTE, rooms) as (source, sink, counters):
        await sink.publish(_out("dev/r/1", b'{"payload": "a"}'))
        await sink.publish(_out("dev/r/1", b'{"payload": "b"}'))
        await eventually(lambda: rooms.delivered == [("r", b"b")], "the next message")
        assert counters["route.in.dropped.internal_error"] == 1
        await eventually(lambda: len(source.nacked) == 1, "the nack")
        assert source.nacked[0][1].reason == "internal_error"
        assert any("delivery failed unexpectedly" in r.message for r in caplog.records)


# ---------------------------------------------------------------------- room to bus


OUT = """\
connectors:
  - name: out
    from: {room: "*", packet: {}}
    to: {mqtt: bus, topic: "rooms/{room}/{topic}"}
"""


def _outbox(sink: MemoryBus, counters: Counters, **kw: object) -> Outbox:
    config = parse_config(HEAD + OUT, "test.yaml")
    route = next(r for r in compile_routes(config) if isinstance(r, ToBusRoute))
    publisher = Publisher(counters)
    options: dict[str, object] = {"queue_size": 100, "overflow": "drop_newest", "window": 4}
    options.update(kw)
    return Outbox(
        route,
        sink,
        publisher,
        Rejections({"mqtt:bus": sink}, publisher, counters, "me"),
        counters,
        bridge_id="me",
        **options,  # type: ignore[arg-type]
    )


def _room_message(n: int, topic: str = "t") -> RoomMessage:
    values = {"room": "r", "participant": "p", "kind": "packet-reliable", "topic": topic}
    return RoomMessage("packet", b"%d" % n, values, {"lk-room": "r"})


async def test_a_non_retriable_publish_error_is_rejected_once_and_the_route_goes_on() -> None:
    counters = Counters()
    async with MemoryBus("mqtt:bus") as sink:
        outbox = _outbox(sink, counters, window=1)
        sink.fail_publish(ConnectorError("record too large", retriable=False))
        task = asyncio.create_task(outbox.run())
        outbox.offer(_room_message(1))
        outbox.offer(_room_message(2))
        await eventually(lambda: [m.payload for m in sink.published] == [b"2"], "the next one")
        assert counters["route.out.rejected.refused"] == 1
        assert counters["route.out.dropped.refused"] == 1
        assert counters["route.out.publish_retries"] == 0
        task.cancel()


async def test_a_retriable_publish_error_is_retried_until_accepted() -> None:
    counters = Counters()
    async with MemoryBus("mqtt:bus") as sink:
        outbox = _outbox(sink, counters, window=1)
        sink.fail_publish(ConnectorError("broker unreachable", retriable=True), times=3)
        task = asyncio.create_task(outbox.run())
        outbox.offer(_room_message(1))
        await eventually(lambda: [m.payload for m in sink.published] == [b"1"], "the retry")
        assert counters["route.out.publish_retries"] >= 1
        assert counters["route.out.published"] == 1
        task.cancel()


async def test_a_bad_template_value_is_rejected_at_offer_without_blocking() -> None:
    counters = Counters()
    async with MemoryBus("mqtt:bus") as sink:
        outbox = _outbox(sink, counters)
        task = asyncio.create_task(outbox.run())
        outbox.offer(_room_message(1, topic="a/+/b"))  # a wildcard into an MQTT topic
        outbox.offer(_room_message(2))
        await eventually(lambda: [m.payload for m in sink.published] == [b"2"], "the good one")
        assert counters["route.out.rejected.bad_template_value"] == 1
        task.cancel()


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
async def test_a_full_buffer_drops_by_policy_and_counts(overflow: str) -> None:
    counters = Counters()
    async with MemoryBus("mqtt:bus") as sink:
        sink.set_connected(False)  # nothing goes out
        outbox = _outbox(sink, counters, queue_size=5, overflow=overflow, window=1)
        for n in range(8):
            outbox.offer(_room_message(n))
        assert counters["route.out.dropped.overflow"] == 3
        task = asyncio.create_task(outbox.run())
        sink.set_connected(True)
        await eventually(lambda: len(sink.published) == 5, "the buffer published")
        kept = [int(m.payload or b"") for m in sink.published]
        assert kept == ([0, 1, 2, 3, 4] if overflow == "drop_newest" else [3, 4, 5, 6, 7])
        task.cancel()


async def test_publishes_keep_call_order_with_a_window_in_flight() -> None:
    counters = Counters()
    async with MemoryBus("mqtt:bus", publish_delay=0.001) as sink:
        outbox = _outbox(sink, counters, window=16, queue_size=1000)
        task = asyncio.create_task(outbox.run())
        for n in range(500):
            outbox.offer(_room_message(n))
        await eventually(lambda: len(sink.published) == 500, "all published")
        assert [int(m.payload or b"") for m in sink.published] == list(range(500))
        task.cancel()


# ---------------------------------------------------------------------- the bridge


class Flaky:
    """A source whose `messages()` crashes once, then behaves (a bug in a reader)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bus = MemoryBus(name, subscriptions=["#"])
        self.crashes = 1

    @property
    def connected(self) -> bool:
        return self.bus.connected

    async def __aenter__(self) -> Self:
        await self.bus.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.bus.__aexit__(exc_type, exc, tb)

    async def messages(self) -> AsyncIterator[Inbound[Envelope]]:
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("reader bug")
        async for inbound in self.bus.messages():
            yield inbound


class Unreachable(MemoryBus):
    """An endpoint whose far side is down at start for `failures` attempts."""

    def __init__(self, name: str, failures: int, *, retriable: bool = True) -> None:
        super().__init__(name)
        self.failures = failures
        self.retriable = retriable

    async def __aenter__(self) -> Self:
        if self.failures:
            self.failures -= 1
            raise ConnectorError(f"{self.name}: connection refused", retriable=self.retriable)
        return await super().__aenter__()


@contextlib.asynccontextmanager
async def running_bridge(
    endpoints: Endpoints, body: str = ROUTE, rooms: str | None = None
) -> AsyncIterator[Bridge]:
    head = HEAD if rooms is None else HEAD.replace(ROOMS, f"rooms: {rooms}")
    bridge = Bridge(parse_config(head + body, "test.yaml"), endpoints)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await eventually(lambda: bridge.ready.is_set() or task.done(), "the bridge to run")
    try:
        yield bridge
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_a_crashed_reader_is_logged_counted_reported_and_restarted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_module, "delay", lambda *a, **k: 0.3)
    flaky = Flaky("mqtt:bus")
    sink = MemoryBus("mqtt:bus:pub", flaky.bus.broker)
    routes = tuple(_routes(ROUTE))
    endpoints = Endpoints({"mqtt:bus": sink}, [BusSource("mqtt:bus", "mqtt:bus", flaky, routes)])
    async with running_bridge(endpoints) as bridge:
        await eventually(lambda: bridge.counters["tasks.crashed.pump:mqtt:bus"] == 1, "crash")
        ready, body = bridge.readiness()
        assert not ready
        assert "reader bug" in str(body["tasks_not_running"])
        crash = [r for r in caplog.records if "crashed" in r.message]
        assert crash and crash[0].levelno == logging.ERROR and crash[0].exc_info is not None
        await eventually(lambda: bridge.readiness()[0], "restarted and ready again")
        # Restarted for real: a message is read (no room is joined: counted and dropped).
        await sink.publish(_out("dev/r/1", b'{"payload": "x"}'))
        await eventually(lambda: len(flaky.bus.nacked) == 1, "the restarted reader")
        assert flaky.bus.nacked[0][1].reason == "unknown_room"


async def test_an_endpoint_unreachable_at_start_does_not_stop_the_bridge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bridge_module, "delay", lambda *a, **k: 0.2)
    down = Unreachable("kafka:main", failures=2)
    broker = MemoryBroker()
    source = MemoryBus("mqtt:bus", broker, subscriptions=["#"])
    sink = MemoryBus("mqtt:bus:pub", broker)
    routes = tuple(_routes(ROUTE))
    endpoints = Endpoints(
        {"mqtt:bus": sink, "kafka:main": down},
        [BusSource("mqtt:bus", "mqtt:bus", source, routes)],
    )
    async with running_bridge(endpoints) as bridge:
        ready, body = bridge.readiness()
        assert not ready and body["endpoints_not_connected"] == ["kafka:main"]
        # The rest works meanwhile.
        await sink.publish(_out("dev/r/1", b'{"payload": "x"}'))
        await eventually(lambda: len(source.nacked) == 1, "the MQTT route working")
        await eventually(lambda: bridge.readiness()[0], "kafka:main connected by itself")
    assert not down.connected  # exited at shutdown


async def test_an_endpoint_refusing_for_good_at_start_ends_the_run() -> None:
    bad = Unreachable("mqtt:bus:pub", failures=1, retriable=False)
    endpoints = Endpoints({"mqtt:bus": bad}, [])
    bridge = Bridge(parse_config(HEAD + OUT, "test.yaml"), endpoints)
    with pytest.raises(ConnectorError, match="connection refused"):
        await bridge.run(asyncio.Event())


async def test_readiness_names_the_rooms_not_joined() -> None:
    broker = MemoryBroker()
    sink = MemoryBus("mqtt:bus:pub", broker)
    async with running_bridge(Endpoints({"mqtt:bus": sink}, []), OUT, rooms="[lobby]") as bridge:
        await eventually(lambda: bridge.counters["rooms.join_failed"] >= 1, "a join attempt")
        ready, body = bridge.readiness()
        assert not ready and body["rooms_not_connected"] == ["lobby"]
        assert bridge.links["lobby"].last_error


def test_rejected_message_carries_reason_and_detail() -> None:
    why = RejectedMessage("too_large", "70000 bytes")
    assert (why.reason, why.detail, str(why)) == (
        "too_large",
        "70000 bytes",
        "too_large: 70000 bytes",
    )


async def test_a_spooled_route_keeps_its_backlog_across_a_restart_and_replays_it_in_order(
    tmp_path: Path,
) -> None:
    counters = Counters()
    path = tmp_path / "spool.sqlite3"
    async with MemoryBus("mqtt:bus") as sink:
        sink.set_connected(False)  # the bus is down: everything waits in the spool
        spool = Spool.open(path, max_bytes=10_000_000, max_age=None)
        outbox = _outbox(sink, counters, spool=spool.route("out"), codec=SpoolCodec(), window=8)
        task = asyncio.create_task(outbox.run())
        for n in range(300):
            outbox.offer(_room_message(n))
        await asyncio.sleep(0)  # the loop turn's group commit
        await eventually(lambda: spool.count == 300, "all spooled")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        spool.close()  # a restart (the SIGKILL case is in tests/unit/test_spool.py)
        assert sink.published == []

        spool = Spool.open(path, max_bytes=10_000_000, max_age=None)
        outbox = _outbox(sink, counters, spool=spool.route("out"), codec=SpoolCodec(), window=8)
        task = asyncio.create_task(outbox.run())
        sink.set_connected(True)
        await eventually(lambda: len(sink.published) == 300, "the backlog replayed")
        assert [int(m.payload or b"") for m in sink.published] == list(range(300))
        await eventually(lambda: spool.count == 0, "removed once acknowledged")
        task.cancel()
        spool.close()
