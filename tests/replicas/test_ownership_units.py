"""Replicas, the parts without servers: the room hash, template inversion, narrowed and shared
MQTT filters, the configuration checks, and `Ownership`'s moves on a scripted assignment."""

from __future__ import annotations

import asyncio

import pytest

from bridge.config import ConfigError, parse_config
from bridge.envelope import Envelope
from bridge.errors import RejectedMessage
from bridge.room.delivery import Delivery
from bridge.room.types import Counters
from bridge.router import RoomDelivery, ToRoomRoute, compile_routes
from bridge.rules import RouteRules
from bridge.runtime.ownership import (
    Ownership,
    TrackedDeliveries,
    room_identity,
    room_partition,
)
from bridge.topics import Target, parse_filter, parse_template

HEAD = """\
livekit:
  {url: "ws://127.0.0.1:7880", api_key: k, rooms: [plant-a],
   api_secret: ssssssssssssssssssssssssssssssss}
mqtt: {bus: {host: 127.0.0.1}}
kafka: {main: {bootstrap_servers: ["127.0.0.1:9092"]}}
bridge: {replicas: {kafka: main}}
"""


def test_room_partition_is_stable_and_spread() -> None:
    assert room_partition("plant-berlin", 12) == room_partition("plant-berlin", 12)
    assert room_partition("plant-berlin", 1) == 0
    used = {room_partition(f"room-{i}", 12) for i in range(200)}
    assert used == set(range(12))


def test_room_identity() -> None:
    assert room_identity("{identity}-{room}", "roombus", "plant-a") == "roombus-plant-a"


def test_shared_subscription_prefix_is_not_part_of_the_topic() -> None:
    flt = parse_filter("$share/roombus/devices/{site}/{device}/telemetry")
    assert flt.mqtt_filter == "$share/roombus/devices/+/+/telemetry"
    assert flt.captures == ("site", "device")
    # The broker delivers the topic without the prefix (MQTT 5 4.8.2).
    assert flt.match("devices/berlin/d1/telemetry") == {"site": "berlin", "device": "d1"}
    assert flt.match("$share/roombus/devices/berlin/d1/telemetry") is None


def test_a_shared_subscription_route_matches_delivered_topics() -> None:
    config = parse_config(
        """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: k
  api_secret: ssssssssssssssssssssssssssssssss
  rooms: [plant-berlin]
mqtt: {bus: {host: 127.0.0.1}}
connectors:
  - name: t
    from: {mqtt: bus, topic: "$share/g/devices/{site}/telemetry"}
    to: {room: "plant-{site}", packet: {topic: t}}
"""
    )
    (route,) = compile_routes(config)
    assert isinstance(route, ToRoomRoute)
    values = route.match(
        Envelope(source="mqtt:bus", topic="devices/berlin/telemetry", payload=b"x")
    )
    assert values is not None and values["site"] == "berlin"


@pytest.mark.parametrize(
    "text",
    ["$share/nofilter", "$share//devices/x", "$share/g+/x"],
)
def test_malformed_shared_subscriptions_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="share"):
        parse_filter(text)


def test_narrowed_filter_for_one_room() -> None:
    flt = parse_filter("devices/{site}/{device}/cmd")
    assert flt.narrowed({"site": "berlin"}) == "devices/berlin/+/cmd"
    assert flt.narrowed({"site": "a/b"}) is None
    assert parse_filter("$share/g/d/{site}").narrowed({"site": "x"}) == "$share/g/d/x"
    assert parse_filter("d/{rest...}").narrowed({"rest": "x"}) is None


def test_template_inversion() -> None:
    room = parse_template("plant-{site}", ["site"], Target.ROOM)
    assert room.match("plant-berlin") == {"site": "berlin"}
    assert room.match("plant-") is None
    assert room.match("other-berlin") is None
    two = parse_template("{a}-{b}", ["a", "b"], Target.ROOM)
    assert two.match("x-y-z") == {"a": "x", "b": "y-z"}


def test_replicas_config_is_off_by_default_and_checked() -> None:
    body = """\
connectors:
  - name: down
    from: {mqtt: bus, topic: "down/{site}"}
    to: {room: "plant-{site}", packet: {topic: t}}
"""
    assert (
        parse_config(HEAD.replace("bridge: {replicas: {kafka: main}}\n", "") + body).bridge.replicas
        is None
    )
    config = parse_config(HEAD + body)
    assert config.bridge.replicas is not None
    assert config.bridge.replicas.identity == "{identity}-{room}"
    bad = [
        (
            """\
connectors:
  - name: down
    from: {mqtt: bus, topic: "down/all"}
    to: {room: "plant-a", packet: {topic: t}}
""",
            "built from captures",
        ),
        (
            """\
connectors:
  - name: down
    from: {kafka: main, topics: [x]}
    to: {room: "plant-a", packet: {topic: t}}
""",
            "Kafka routes are not supported",
        ),
    ]
    for text, why in bad:
        with pytest.raises(ConfigError, match=why):
            parse_config(HEAD + text)
    with pytest.raises(ConfigError, match="unknown Kafka cluster"):
        parse_config(HEAD.replace("{kafka: main}}", "{kafka: nope}}") + body)
    with pytest.raises(ConfigError, match="a third of session_timeout"):
        parse_config(
            HEAD.replace(
                "{kafka: main}}", "{kafka: main, session_timeout: 3, heartbeat_interval: 2}}"
            )
            + body
        )


async def test_ownership_moves_on_assignments() -> None:
    log: list[str] = []
    present = {"r3": True}

    async def acquire(room: str) -> None:
        log.append(f"+{room}")

    async def release(room: str) -> None:
        log.append(f"-{room}")

    async def is_present(room: str) -> bool:
        return present.get(room, False)

    own = Ownership(
        "me",
        Counters(),
        acquire=acquire,
        release=release,
        present=is_present,
        handover_timeout=5,
        evicted_backoff=0,
    )
    rooms = [f"r{i}" for i in range(8)]
    await own.add_rooms(rooms)
    assert not log  # no assignment yet
    mine = frozenset({room_partition(r, 4) for r in rooms[:4]})
    await own.revoked(frozenset())
    await own.assigned(mine, 4)
    present["r3"] = False  # the previous owner of r3 leaves
    for _ in range(100):
        if len(log) == len([r for r in rooms if own.owns(r)]):
            break
        await asyncio.sleep(0.05)
    owned = {r for r in rooms if room_partition(r, 4) in mine}
    assert {e[1:] for e in log if e.startswith("+")} == owned
    snapshot = own.snapshot()  # what /status shows
    assert snapshot["replica"] == "me" and snapshot["of_partitions"] == 4
    assert snapshot["partitions"] == sorted(mine)
    assert snapshot["rooms_owned"] == sorted(owned)
    assert snapshot["rooms_elsewhere"] == sorted(set(rooms) - owned)
    assert snapshot["rebalancing"] is False
    # A rebalance that keeps everything releases nothing.
    log.clear()
    await own.revoked(mine)
    await own.assigned(mine, 4)
    assert log == []
    # Partitions gone: their rooms are released, drained, before `assigned` returns.
    await own.assigned(frozenset(), 4)
    assert sorted(e[1:] for e in log) == sorted(owned)
    assert all(e.startswith("-") for e in log)
    assert not await own.evicted(rooms[0])
    await own.stop()


class _Sink:
    """Deliveries that wait until their room is "joined"."""

    def __init__(self) -> None:
        self.rooms: dict[str, asyncio.Event] = {}
        self.got: list[tuple[str, bytes]] = []

    async def deliver(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None = None
    ) -> None:
        await self.rooms.setdefault(d.room, asyncio.Event()).wait()
        self.got.append((d.room, d.payload))

    async def send(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None
    ) -> Delivery | None:
        return None

    def confirmed(self, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        raise AssertionError("send never queues")


def _delivery(room: str, payload: bytes) -> RoomDelivery:
    return RoomDelivery(room, "data", payload, None, (), {}, None, None, None, None)


async def test_handover_overlaps_instead_of_a_gap() -> None:
    """A new owner subscribes before the handover wait and holds what arrives until its join;
    a releasing owner keeps its subscriptions for the overlap; a room released before its join
    rejects what it held."""
    counters = Counters()
    sink = _Sink()
    tracked = TrackedDeliveries(sink, counters)
    log: list[str] = []
    present = {"r": True}

    async def prepare(room: str) -> None:
        log.append(f"subscribe {room}")

    async def acquire(room: str) -> None:
        log.append(f"join {room}")
        sink.rooms.setdefault(room, asyncio.Event()).set()

    async def release(room: str) -> None:
        log.append(f"unsubscribe {room}")

    async def is_present(room: str) -> bool:
        return present[room]

    own = Ownership(
        "me",
        counters,
        acquire=acquire,
        release=release,
        present=is_present,
        prepare=prepare,
        handover_timeout=5,
        handover_overlap=0.2,
        evicted_backoff=0,
        deliveries=tracked,
    )
    env = Envelope(source="mqtt:bus", topic="t", payload=b"x")
    await own.add_rooms(["r"])
    await own.assigned(frozenset({0}), 1)
    for _ in range(100):
        if log:
            break
        await asyncio.sleep(0.01)
    assert log == ["subscribe r"]  # subscribed while the previous owner is still in the room
    held = asyncio.create_task(tracked.deliver("down", _delivery("r", b"1"), env))
    await asyncio.sleep(0.05)
    assert not held.done() and counters["ownership.overlap_held"] == 1
    present["r"] = False  # the previous owner left
    await asyncio.wait_for(held, 5)
    assert log == ["subscribe r", "join r"] and sink.got == [("r", b"1")]
    # Released (assigned elsewhere): deliveries go on during the overlap, then unsubscribe.
    giving_up = asyncio.create_task(own.assigned(frozenset(), 1))
    await asyncio.sleep(0.05)
    assert log[-1] == "join r"
    await tracked.deliver("down", _delivery("r", b"2"), env)
    await giving_up
    assert log[-1] == "unsubscribe r"
    assert counters["ownership.overlap_delivered"] == 1
    assert counters["ownership.overlap_rooms"] == 1
    # Released before its join: what it held is rejected, not left waiting.
    sink.rooms.clear()
    present["r"] = True
    await own.assigned(frozenset({0}), 1)
    await asyncio.sleep(0.05)
    held = asyncio.create_task(tracked.deliver("down", _delivery("r", b"3"), env))
    await asyncio.sleep(0.05)
    await own.assigned(frozenset(), 1)
    with pytest.raises(RejectedMessage):
        await asyncio.wait_for(held, 5)
    assert counters["ownership.overlap_abandoned"] == 1
    assert not tracked.in_flight
    await own.stop()
