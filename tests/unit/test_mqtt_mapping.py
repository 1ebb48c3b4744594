"""The pure parts of connectors/mqtt.py: envelope and property mapping, packet size, topic
checks, CONNACK errors, nack reason codes and the PUBACK that carries them, publish errors,
backoff, settings validation and the in-flight gate (no sockets)."""

from __future__ import annotations

import asyncio

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.envelope import Outbound
from bridge.errors import ConnectorError, RejectedMessage
from connectors.mqtt import (
    MqttAuthError,
    MqttPacketTooLargeError,
    MqttPublishError,
    MqttRefusedError,
    MqttSettings,
    _InflightGate,
    backoff_delay,
    connack_error,
    default_client_id,
    envelope_from_message,
    nack_reason_code,
    puback_packet,
    publish_packet_size,
    publish_properties,
    topic_filter_problem,
    topic_name_problem,
)
from connectors.mqtt_publish import encode_properties


def _message(
    topic: bytes, payload: bytes | bytearray, qos: int = 1, props: Properties | None = None
) -> paho.MQTTMessage:
    message = paho.MQTTMessage(mid=7, topic=topic)
    message.payload = payload
    message.qos = qos
    message.retain = True
    message.properties = props
    return message


def test_envelope_from_mqtt5_message() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("lk-room", "a"), ("x", "1"), ("lk-room", "b")]
    props.ContentType = "application/json"
    props.MessageExpiryInterval = 30
    props.ResponseTopic = "reply/here"
    props.CorrelationData = b"\x00id"
    envelope, duplicates = envelope_from_message(
        "mqtt:plant", "t/1", _message(b"t/1", b"{}", 1, props)
    )
    assert envelope.payload == b"{}" and envelope.source == "mqtt:plant" and envelope.topic == "t/1"
    assert dict(envelope.headers) == {"lk-room": "b", "x": "1"} and duplicates == 1
    assert envelope.content_type == "application/json"
    assert envelope.expiry == 30.0
    assert envelope.response_topic == "reply/here"
    assert envelope.correlation_data == b"\x00id"
    assert (envelope.qos, envelope.retain) == (1, True)


def test_envelope_from_mqtt311_message_has_no_properties() -> None:
    envelope, duplicates = envelope_from_message("mqtt:p", "t", _message(b"t", bytearray(b"x"), 0))
    assert envelope.payload == b"x" and type(envelope.payload) is bytes
    assert dict(envelope.headers) == {} and duplicates == 0
    assert envelope.content_type is None and envelope.expiry is None
    assert envelope.response_topic is None and envelope.correlation_data is None


def test_publish_properties_mqtt5() -> None:
    message = Outbound(
        topic="t",
        payload=b"",
        headers=(("a", "1"), ("a", "2")),
        content_type="text/plain",
        message_expiry=60,
        response_topic="r/1",
        correlation_data=b"c",
    )
    packed, dropped = publish_properties(message, mqtt5=True)
    assert dropped == [] and packed is not None
    # Read back by paho's own decoder, from the bytes paho will write.
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.unpack(packed.pack())  # type: ignore[no-untyped-call]
    got = {name: getattr(props, name) for name in props.json()}  # type: ignore[no-untyped-call]
    assert got == {
        "UserProperty": [("a", "1"), ("a", "2")],  # repeated names keep their order
        "ContentType": "text/plain",
        "MessageExpiryInterval": 60,
        "ResponseTopic": "r/1",
        "CorrelationData": b"c",
    }
    assert publish_properties(Outbound(topic="t", payload=b""), mqtt5=True) == (None, [])


def test_publish_properties_mqtt311_reports_dropped_fields() -> None:
    message = Outbound(topic="t", payload=b"", headers=(("a", "1"),), response_topic="r")
    assert publish_properties(message, mqtt5=False) == (None, ["headers", "response_topic"])
    assert publish_properties(Outbound(topic="t", payload=None), mqtt5=False) == (None, [])


@pytest.mark.parametrize(
    "message",
    [
        Outbound(topic="t", payload=b"", message_expiry=0),
        Outbound(topic="t", payload=b"", message_expiry=2**32),
        Outbound(topic="t", payload=b"", response_topic="r/+"),
        Outbound(topic="t", payload=b"", response_topic=""),
        Outbound(topic="t", payload=b"", headers=(("k", "v" * 65536),)),
        Outbound(topic="t", payload=b"", content_type="\ud800"),
    ],
)
def test_publish_properties_rejects_bad_values(message: Outbound) -> None:
    with pytest.raises(ValueError):
        publish_properties(message, mqtt5=True)


def test_publish_packet_size() -> None:
    # fixed header 1 + length 1; topic 2+3; packet id 2; empty properties 1; payload 10
    assert publish_packet_size("a/b", 10, 1, None, mqtt5=True) == 1 + 1 + 5 + 2 + 1 + 10
    assert publish_packet_size("a/b", 10, 0, None, mqtt5=False) == 1 + 1 + 5 + 10
    # the remaining length takes a second byte from 128 on
    assert publish_packet_size("t", 124, 0, None, mqtt5=False) == 1 + 1 + 127
    assert publish_packet_size("t", 125, 0, None, mqtt5=False) == 1 + 2 + 128
    assert publish_packet_size("t", 16_384, 0, None, mqtt5=False) == 1 + 3 + 16_387
    props = encode_properties([("k", "v")])  # id 1 + 2+1 + 2+1 = 7, plus the length byte
    assert publish_packet_size("t", 0, 1, props, mqtt5=True) == 1 + 1 + 3 + 2 + 8


@pytest.mark.parametrize(
    ("topic", "ok"),
    [("a/b", True), ("/", True), ("", False), ("a/+", False), ("#", False), ("a\0b", False)],
)
def test_topic_name_problem(topic: str, ok: bool) -> None:
    assert (topic_name_problem(topic) is None) == ok


@pytest.mark.parametrize(
    ("topic_filter", "ok"),
    [
        ("a/#", True),
        ("#", True),
        ("+/b/+", True),
        ("$share/g/a/+", True),
        ("a/#/b", False),
        ("a#", False),
        ("a/b+", False),
        ("", False),
    ],
)
def test_topic_filter_problem(topic_filter: str, ok: bool) -> None:
    assert (topic_filter_problem(topic_filter) is None) == ok


def test_connack_errors_name_connector_broker_and_code() -> None:
    url = "mqtt://127.0.0.1:1883"
    error = connack_error(
        "mqtt:plant", url, ReasonCode(PacketTypes.CONNACK, identifier=135), mqtt5=True
    )
    assert isinstance(error, MqttAuthError) and isinstance(error, ConnectorError)
    assert str(error) == f"mqtt:plant: connect to {url} failed: not authorized (CONNACK 135)"
    assert not error.retriable
    # MQTT 3.1.1 return code 4 arrives converted to reason 134; the message shows the 3.1.1 code
    bad_password = ReasonCode(PacketTypes.CONNACK, "Bad user name or password")
    error = connack_error("mqtt:plant", url, bad_password, mqtt5=False)
    assert str(error).endswith("bad user name or password (CONNACK 4)")
    busy = connack_error("m", url, ReasonCode(PacketTypes.CONNACK, identifier=0x89), mqtt5=True)
    assert isinstance(busy, MqttRefusedError) and busy.retriable
    bad_id = connack_error("m", url, ReasonCode(PacketTypes.CONNACK, identifier=0x85), mqtt5=True)
    assert isinstance(bad_id, MqttRefusedError) and not bad_id.retriable


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("malformed_json", 0x99),
        ("invalid_json", 0x99),
        ("invalid_utf8", 0x99),
        ("malformed_base64", 0x99),
        ("too_deep", 0x99),
        ("payload_format", 0x99),
        ("unknown_room", 0x80),
        ("refused", 0x80),
        ("bad_template_value", 0x80),
    ],
)
def test_nack_reason_code(reason: str, code: int) -> None:
    assert nack_reason_code(RejectedMessage(reason, "detail")) == code


def test_puback_packet_carries_the_reason_code() -> None:
    # Fixed header PUBACK, remaining length 4, packet id 0x1234, reason 0x99, no properties.
    assert puback_packet(0x1234, 0x99) == bytes([0x40, 4, 0x12, 0x34, 0x99, 0])


def test_publish_errors_are_never_retriable() -> None:
    refused = MqttPublishError("m: publish refused: not authorized", reason_code=0x87)
    assert isinstance(refused, ConnectorError)
    assert not refused.retriable and refused.reason_code == 0x87
    too_large = MqttPacketTooLargeError("m: packet of 2001 bytes exceeds ...")
    assert not too_large.retriable and too_large.reason_code is None


def test_backoff_is_jittered_doubling_and_capped() -> None:
    assert backoff_delay(0, 0.5, 30, rand=lambda: 0.0) == 0.25
    assert backoff_delay(0, 0.5, 30, rand=lambda: 1.0) == 0.5
    assert backoff_delay(3, 0.5, 30, rand=lambda: 1.0) == 4.0
    assert backoff_delay(10, 0.5, 30, rand=lambda: 1.0) == 30.0
    assert backoff_delay(10_000, 0.5, 30, rand=lambda: 0.0) == 15.0
    delays = {backoff_delay(2, 0.5, 30) for _ in range(50)}
    assert len(delays) > 1 and all(1.0 <= d <= 2.0 for d in delays)


def test_settings_validation_and_url() -> None:
    with pytest.raises(ValueError, match=r"port: 0 .*max_inflight: 0"):
        MqttSettings(host="h", port=0, max_inflight=0)
    with pytest.raises(ValueError, match="password: given without a username"):
        MqttSettings(host="h", password="x")
    assert MqttSettings(host="broker").url == "mqtt://broker:1883"
    assert MqttSettings(host="::1", port=8883, tls=True).url == "mqtts://[::1]:8883"
    assert default_client_id("mqtt:plant floor") == "roombus-mqtt-plant-floor"


def test_settings_for_the_publish_only_connection() -> None:
    s = MqttSettings(host="broker", client_id="plant-bridge", username="u", password="p")
    pub = s.for_publishing("mqtt:plant")
    assert (pub.client_id, pub.clean_start, pub.session_expiry, pub.host, pub.username) == (
        "plant-bridge-pub",
        True,
        0,
        "broker",
        "u",
    )
    assert MqttSettings(host="broker").for_publishing("mqtt:plant").client_id == (
        "roombus-mqtt-plant-pub"
    )


async def test_inflight_gate_bounds_and_wakes_in_order() -> None:
    gate = _InflightGate(2)
    await gate.acquire()
    await gate.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await gate.acquire()
        order.append(i)

    waiters = [asyncio.create_task(take(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert (gate.used, gate.waiting, order) == (2, 3, [])
    waiters[1].cancel()  # a cancelled waiter gives up its place
    gate.release()
    await asyncio.sleep(0)
    assert order == [0] and gate.used == 2
    gate.set_limit(3)  # e.g. a broker's higher Receive Maximum
    await asyncio.sleep(0)
    assert order == [0, 2] and gate.used == 3
    await asyncio.gather(*waiters, return_exceptions=True)
