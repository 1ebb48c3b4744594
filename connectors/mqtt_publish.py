"""Decoding a received PUBLISH without paho's per-message objects (the MQTT receive hot path).

paho decodes every PUBLISH into an `MQTTMessage` whose MQTT 5 properties are a `Properties`
object, and each `Properties()` builds its name tables anew (two dicts of ~30 entries) before a
single property is read; then it dispatches the message through its callback matcher. Under a
device fleet that is the largest share of the bridge's MQTT receive cost (bench/fleet_bench.py
`--profile`). `decode_publish` reads the same packet straight into a `ReceivedPublish`, which has
the attributes `connectors.mqtt` reads of a paho message, and the connector's `_Client` hands it
to the connector directly.

It decodes only what it fully understands: QoS 0 or 1, a UTF-8 topic, and the properties a
PUBLISH may carry except Topic Alias (the bridge does not announce a Topic Alias Maximum, so a
broker never sends one). For anything else — QoS 2, a malformed packet, invalid UTF-8, a string
property with U+0000 or U+FEFF — it returns None and paho decodes the packet as before, with
paho's own error handling.

The other way, `PackedProperties` is the properties of a PUBLISH the bridge sends, encoded once
(paho's `Properties.pack()` walks its whole name table per call, and the connector needed the
packed size before paho packed it again).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

# MQTT 5 PUBLISH property identifiers (MQTT 5 §2.2.2.2, §3.3.2.3).
_PAYLOAD_FORMAT = 0x01
_MESSAGE_EXPIRY = 0x02
_CONTENT_TYPE = 0x03
_RESPONSE_TOPIC = 0x08
_CORRELATION_DATA = 0x09
_SUBSCRIPTION_ID = 0x0B
_USER_PROPERTY = 0x26

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class PublishProperties:
    """The properties of one PUBLISH, named as paho names them (unset ones are absent)."""

    __slots__ = (
        "ContentType",
        "CorrelationData",
        "MessageExpiryInterval",
        "PayloadFormatIndicator",
        "ResponseTopic",
        "SubscriptionIdentifier",
        "UserProperty",
    )

    ContentType: str
    CorrelationData: bytes
    MessageExpiryInterval: int
    PayloadFormatIndicator: int
    ResponseTopic: str
    SubscriptionIdentifier: list[int]
    UserProperty: list[tuple[str, str]]


class ReceivedPublish:
    """A decoded PUBLISH, with the attributes of `paho.mqtt.client.MQTTMessage` we read."""

    __slots__ = ("dup", "mid", "payload", "properties", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        mid: int,
        dup: bool,
        retain: bool,
        properties: PublishProperties | None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.mid = mid
        self.dup = dup
        self.retain = retain
        self.properties = properties


def decode_publish(
    header: int, packet: bytes | bytearray, *, mqtt5: bool
) -> ReceivedPublish | None:
    """Decode a PUBLISH (`header`: its first byte; `packet`: what follows the fixed header).

    None when this decoder leaves the packet to paho (see the module docstring).
    """
    qos = (header & 0x06) >> 1
    if qos > 1:
        return None
    try:
        (tlen,) = _U16.unpack_from(packet, 0)
        pos = 2 + tlen
        if pos > len(packet):
            return None
        topic = packet[2:pos].decode("utf-8")
        mid = 0
        if qos:
            (mid,) = _U16.unpack_from(packet, pos)
            pos += 2
        props: PublishProperties | None = None
        if mqtt5:
            length, pos = _varint(packet, pos)
            end = pos + length
            if end > len(packet):
                return None
            props = PublishProperties()
            if length and _properties(packet, pos, end, props) is None:
                return None
            pos = end
        elif not topic:
            return None  # MQTT 3.1.1 forbids an empty topic: paho reports it
    except (struct.error, UnicodeDecodeError, IndexError):
        return None
    return ReceivedPublish(
        topic,
        bytes(packet[pos:]),
        qos,
        mid,
        bool(header & 0x08),
        bool(header & 0x01),
        props,
    )


def dispatch_publish(
    client: paho.Client, receiver: Callable[[paho.Client, Any, Any], None]
) -> bool:
    """Decode the PUBLISH paho has just read and hand it to `receiver`, as paho's on_message.

    For `_handle_publish` overrides. False when it is left to paho (see the module
    docstring), or when the client acknowledges automatically (paho's own path then sends the
    PUBACK). Relies on paho-mqtt 2.2 internals: `_in_packet`, `_protocol`, `_manual_ack`,
    `_easy_log`.
    """
    if not client._manual_ack:
        return False
    packet = client._in_packet
    message = decode_publish(
        packet["command"], packet["packet"], mqtt5=client._protocol == paho.MQTTv5
    )
    if message is None:
        return False
    try:
        receiver(client, None, message)
    except Exception as err:
        # As paho's own dispatch does: the read loop must finish this packet.
        client._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
        if not client.suppress_exceptions:
            raise
    return True


def _varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    """A variable byte integer at `pos`: (value, position after it)."""
    value = 0
    shift = 0
    for _ in range(4):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise IndexError("variable byte integer longer than 4 bytes")


def _string(data: bytes | bytearray, pos: int) -> tuple[str, int]:
    (n,) = _U16.unpack_from(data, pos)
    end = pos + 2 + n
    if end > len(data):
        raise IndexError("string runs past the packet")
    text = data[pos + 2 : end].decode("utf-8")
    if "\x00" in text or "\ufeff" in text:
        # MQTT 1.5.4 forbids them; paho reports such a packet as malformed.
        raise UnicodeDecodeError("utf-8", b"", 0, 0, "U+0000 or U+FEFF in an MQTT string")
    return text, end


def _properties(
    data: bytes | bytearray, pos: int, end: int, props: PublishProperties
) -> bool | None:
    """Fill `props` from data[pos:end]; None if a property is one we leave to paho."""
    user: list[tuple[str, str]] | None = None
    while pos < end:
        ident = data[pos]
        pos += 1
        if ident == _USER_PROPERTY:
            key, pos = _string(data, pos)
            value, pos = _string(data, pos)
            if user is None:
                user = props.UserProperty = []
            user.append((key, value))
        elif ident == _CONTENT_TYPE:
            props.ContentType, pos = _string(data, pos)
        elif ident == _RESPONSE_TOPIC:
            props.ResponseTopic, pos = _string(data, pos)
        elif ident == _MESSAGE_EXPIRY:
            (props.MessageExpiryInterval,) = _U32.unpack_from(data, pos)
            pos += 4
        elif ident == _CORRELATION_DATA:
            (n,) = _U16.unpack_from(data, pos)
            props.CorrelationData = bytes(data[pos + 2 : pos + 2 + n])
            pos += 2 + n
        elif ident == _PAYLOAD_FORMAT:
            props.PayloadFormatIndicator = data[pos]
            pos += 1
        elif ident == _SUBSCRIPTION_ID:
            sid, pos = _varint(data, pos)
            if not hasattr(props, "SubscriptionIdentifier"):
                props.SubscriptionIdentifier = []
            props.SubscriptionIdentifier.append(sid)
        else:
            return None  # Topic Alias, or not a PUBLISH property
    return True if pos == end else None


class PackedProperties:
    """PUBLISH properties already encoded, given to paho where it takes a `Properties`.

    paho only calls `pack()` on what it is given (when it writes the PUBLISH, and again if it
    resends it after a reconnect); `str()` is for its debug log.
    """

    __slots__ = ("_fields", "_packed")

    def __init__(self, packed: bytes, fields: tuple[object, ...]) -> None:
        self._packed = packed
        self._fields = fields  # for `str()` only

    def pack(self) -> bytes:
        """The property length and the properties, as MQTT 5 §3.3.2.3 lays them out."""
        return self._packed

    def __len__(self) -> int:
        return len(self._packed)

    def __str__(self) -> str:
        user, content_type, expiry, response_topic, correlation = self._fields
        return (
            f"[UserProperty: {user}, ContentType: {content_type}, MessageExpiryInterval: "
            f"{expiry}, ResponseTopic: {response_topic}, CorrelationData: {correlation!r}]"
        )


def encode_properties(
    user: list[tuple[str, str]],
    content_type: str | None = None,
    expiry: int | None = None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
) -> PackedProperties:
    """Encode PUBLISH properties; `ValueError` for a value MQTT cannot carry."""
    parts: list[bytes] = []
    if expiry is not None:
        if not 0 <= expiry <= 0xFFFFFFFF:
            raise ValueError(f"message expiry {expiry} is not within 0..2**32-1")
        parts.append(bytes((_MESSAGE_EXPIRY,)) + _U32.pack(expiry))
    if content_type is not None:
        parts.append(bytes((_CONTENT_TYPE,)) + _encode_string(content_type, "content type"))
    if response_topic is not None:
        parts.append(bytes((_RESPONSE_TOPIC,)) + _encode_string(response_topic, "response topic"))
    if correlation_data is not None:
        if len(correlation_data) > 0xFFFF:
            raise ValueError(f"correlation data of {len(correlation_data)} bytes exceeds 65535")
        parts.append(bytes((_CORRELATION_DATA,)) + _U16.pack(len(correlation_data)))
        parts.append(correlation_data)
    for key, value in user:
        parts.append(bytes((_USER_PROPERTY,)))
        parts.append(_encode_string(key, "header name"))
        parts.append(_encode_string(value, f"header {key!r}"))
    body = b"".join(parts)
    fields = (user, content_type, expiry, response_topic, correlation_data)
    return PackedProperties(_encode_varint(len(body)) + body, fields)


def _encode_string(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} of {len(data)} bytes exceeds MQTT's 65535")
    return _U16.pack(len(data)) + data


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
