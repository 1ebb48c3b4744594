"""`connectors.mqtt_publish` reads and writes PUBLISH packets exactly as paho does.

The reference is paho's own decoder (`paho.mqtt._packet.decode_publish`) on the same bytes,
for generated packets; and what the fast decoder leaves to paho (QoS 2, Topic Alias, malformed
packets, invalid UTF-8) must be left, not guessed.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.mqtt import envelope_from_message
from connectors.mqtt_publish import decode_publish, encode_properties

_text = st.text(st.characters(codec="utf-8", blacklist_characters="\x00\ufeff"), max_size=40)


def _publish(
    topic: bytes, payload: bytes, qos: int, mid: int, props: Properties | None, mqtt5: bool
) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if mqtt5:
        body += props.pack() if props is not None else b"\x00"  # type: ignore[no-untyped-call]
    return body + payload


def _props(
    user: list[tuple[str, str]],
    content_type: str | None,
    expiry: int | None,
    response: str | None,
    correlation: bytes | None,
) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if user:
        props.UserProperty = user
    if content_type is not None:
        props.ContentType = content_type
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    if response is not None:
        props.ResponseTopic = response
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def _paho(header: int, packet: bytes, mqtt5: bool) -> Any:
    version = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
    return _packet.decode_publish(header, packet, version)


@settings(max_examples=300, deadline=None)
@given(
    topic=_text.filter(bool),
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1]),
    mid=st.integers(1, 65535),
    dup=st.booleans(),
    retain=st.booleans(),
    mqtt5=st.booleans(),
    user=st.lists(st.tuples(_text, _text), max_size=5),
    content_type=st.none() | _text,
    expiry=st.none() | st.integers(0, 2**32 - 1),
    response=st.none() | _text.filter(bool),
    correlation=st.none() | st.binary(max_size=30),
)
def test_decodes_like_paho(
    topic: str,
    payload: bytes,
    qos: int,
    mid: int,
    dup: bool,
    retain: bool,
    mqtt5: bool,
    user: list[tuple[str, str]],
    content_type: str | None,
    expiry: int | None,
    response: str | None,
    correlation: bytes | None,
) -> None:
    props = _props(user, content_type, expiry, response, correlation) if mqtt5 else None
    header = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    packet = _publish(topic.encode(), payload, qos, mid, props, mqtt5)
    ours = decode_publish(header, packet, mqtt5=mqtt5)
    theirs = _paho(header, packet, mqtt5)
    assert ours is not None
    assert ours.topic == theirs.topic.decode()
    assert (ours.payload, ours.qos, ours.mid) == (theirs.payload, theirs.qos, theirs.mid)
    assert (ours.dup, ours.retain) == (theirs.dup, theirs.retain)
    # What the connector makes of either is the same envelope.
    mine, dup_mine = envelope_from_message("m", ours.topic, ours)
    paho_msg = _as_message(theirs)
    ref, dup_ref = envelope_from_message("m", ours.topic, paho_msg)
    mine = dataclasses.replace(mine, received_at=ref.received_at, id=ref.id)
    assert (mine, dup_mine) == (ref, dup_ref)


def _as_message(decoded: Any) -> Any:
    from paho.mqtt.client import MQTTMessage

    message = MQTTMessage(mid=decoded.mid, topic=decoded.topic)
    message.qos, message.retain, message.dup = decoded.qos, decoded.retain, decoded.dup
    message.payload, message.properties = decoded.payload, decoded.properties
    return message


def test_qos2_is_left_to_paho() -> None:
    packet = _publish(b"t", b"x", 2, 7, None, False)
    assert decode_publish(0x34, packet, mqtt5=False) is None


def test_topic_alias_is_left_to_paho() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.TopicAlias = 3
    packet = _publish(b"t", b"x", 1, 7, props, True)
    assert decode_publish(0x32, packet, mqtt5=True) is None


@pytest.mark.parametrize(
    "packet",
    [
        b"",  # no topic length
        b"\x00\x05ab",  # topic runs past the packet
        b"\x00\x01t\x00",  # QoS 1 without a whole packet identifier
        b"\x00\x01t\x00\x07\x05\x26\x00",  # properties run past the packet
        b"\x00\x02\xff\xfe\x00\x07\x00",  # topic not UTF-8
        b"\x00\x01t\x00\x07\x03\x26\x00\x01k",  # user property without its value
        b"\x00\x01t\x00\x07\x02\x63\x00",  # not a PUBLISH property
    ],
)
def test_malformed_packets_are_left_to_paho(packet: bytes) -> None:
    assert decode_publish(0x32, packet, mqtt5=True) is None


def test_empty_topic_on_3_1_1_is_left_to_paho() -> None:
    assert decode_publish(0x30, b"\x00\x00payload", mqtt5=False) is None


@settings(max_examples=300, deadline=None)
@given(
    user=st.lists(st.tuples(_text, _text), max_size=5),
    content_type=st.none() | _text,
    expiry=st.none() | st.integers(0, 2**32 - 1),
    response=st.none() | _text,
    correlation=st.none() | st.binary(max_size=30),
)
def test_encoded_properties_read_back_by_paho_and_by_us(
    user: list[tuple[str, str]],
    content_type: str | None,
    expiry: int | None,
    response: str | None,
    correlation: bytes | None,
) -> None:
    packed = encode_properties(user, content_type, expiry, response, correlation).pack()
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    _, length = theirs.unpack(packed)  # type: ignore[no-untyped-call]
    assert length == len(packed)
    reference = _props(user, content_type, expiry, response, correlation)
    assert theirs.json() == reference.json()  # type: ignore[no-untyped-call]
    ours = decode_publish(0x30, b"\x00\x01t" + packed + b"payload", mqtt5=True)
    assert ours is not None and ours.payload == b"payload" and ours.properties is not None
    assert getattr(ours.properties, "UserProperty", []) == user
    assert getattr(ours.properties, "ContentType", None) == content_type
    assert getattr(ours.properties, "MessageExpiryInterval", None) == expiry
    assert getattr(ours.properties, "ResponseTopic", None) == response
    assert getattr(ours.properties, "CorrelationData", None) == correlation


@pytest.mark.parametrize("bad", ["nul\x00", "bom\ufeff"])
def test_strings_mqtt_forbids_are_left_to_paho(bad: str) -> None:
    packed = encode_properties([("k", bad)]).pack()
    assert decode_publish(0x30, b"\x00\x01t" + packed, mqtt5=True) is None
