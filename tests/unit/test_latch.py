"""Latched routes: the last value per bus topic, bounded, cleared by empty payloads; config."""

from __future__ import annotations

import pytest

from bridge.config import ConfigError, parse_config
from bridge.envelope import Envelope
from bridge.room.types import Counters
from bridge.router import RoomDelivery
from bridge.runtime.latch import Latch
from tests.unit.configs import head

BASE = (
    head()
    + """\
  - name: state
    from: {mqtt: plant, topic: "devices/{device}/state"}
    to: {room: lobby, packet: {topic: "state.{device}"}}
    latched: LATCHED
"""
)


def delivery(payload: bytes, room: str = "lobby") -> RoomDelivery:
    return RoomDelivery(room, "packet", payload, "state", (), {}, None, None, None, None)


def envelope(topic: str, key: bytes | None = None) -> Envelope:
    return Envelope(payload=b"", source="mqtt:plant", topic=topic, key=key)


def values(latch: Latch) -> dict[tuple[str, str, bytes | None], bytes]:
    return {k: v.payload for k, v in latch._stores["state"].values.items()}


def test_the_last_value_per_room_and_bus_topic_is_kept() -> None:
    latch = Latch(parse_config(BASE.replace("LATCHED", "true")).connectors, Counters())
    for i in range(3):
        latch.keep("state", delivery(f"a{i}".encode()), envelope("devices/a/state"))
    latch.keep("state", delivery(b"b"), envelope("devices/b/state"))
    latch.keep("state", delivery(b"k"), envelope("kafka-topic", b"key1"))
    latch.keep("other", delivery(b"x"), envelope("devices/a/state"))  # not a latched route
    assert values(latch) == {
        ("lobby", "devices/a/state", None): b"a2",
        ("lobby", "devices/b/state", None): b"b",
        ("lobby", "kafka-topic", b"key1"): b"k",
    }
    latch.keep("state", delivery(b""), envelope("devices/b/state"))  # retained topic cleared
    assert ("lobby", "devices/b/state", None) not in values(latch)


def test_the_store_is_bounded_and_counts_evictions() -> None:
    counters = Counters()
    config = parse_config(BASE.replace("LATCHED", "{max_keys: 2}"))
    latch = Latch(config.connectors, counters)
    for topic in ("t1", "t2", "t1", "t3"):
        latch.keep("state", delivery(topic.encode()), envelope(topic))
    assert list(values(latch)) == [("lobby", "t1", None), ("lobby", "t3", None)]
    assert counters["route.state.latched_evicted"] == 1
    # A reload that turns latching off forgets the values; one that keeps it keeps them.
    latch.configure(config.connectors)
    assert len(latch) == 2
    latch.configure(parse_config(BASE.replace("LATCHED", "false")).connectors)
    assert len(latch) == 0


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            ('packet: {topic: "state.{device}"}', 'attribute: {key: "{device}"}'),
            "bad.yaml:13: connectors[0].latched: applies only to a bus-to-room connector whose"
            " target is a packet",
        ),
        (
            ("LATCHED", "{max_keys: 0}"),
            "bad.yaml:13: connectors[0].latched.max_keys: Input should be greater than or equal"
            " to 1 (got 0)",
        ),
        (("LATCHED", "{keys: 3}"), "bad.yaml:13: connectors[0].latched.keys: unknown key"),
        (("LATCHED", "often"), "bad.yaml:13: connectors[0].latched: Input should be a valid"),
    ],
)
def test_latched_config_errors_are_located(change: tuple[str, str], problem: str) -> None:
    text = BASE.replace(*change).replace("LATCHED", "true")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml")
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
