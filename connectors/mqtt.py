"""The MQTT connector: one broker connection that is both a `Source` and a `Sink`.

paho-mqtt 2.x does the protocol; asyncio does the I/O, with no paho thread. We open the TCP
(and TLS) connection ourselves without blocking the loop and hand the socket to paho; paho's
socket callbacks (`on_socket_open`, `on_socket_close`, `on_socket_register_write`,
`on_socket_unregister_write`) become the loop's `add_reader` / `add_writer`, and `loop_misc()`
(keepalive) runs on a one-second timer. Every paho call happens on the event loop thread.

Connecting: `start()` (``__aenter__``) makes one connection attempt and returns whether it
succeeded or not: a broker that is down or unreachable at start leaves the connector
``connected == False``, reconnecting in the background with capped, jittered exponential
backoff (one log line per state change, not per attempt). Only a refusal that no retry can fix
(bad credentials, not authorized, TLS failure, another non-retriable CONNACK code, a refused
subscription) raises from `start()`. Later losses are always retried.

Delivery:

* Inbound messages are acknowledged manually (`manual_ack`): a QoS 1 PUBACK goes out only when
  the bridge calls `Inbound.ack()`, in the order the messages arrived (MQTT 4.6), so the
  broker redelivers anything not acknowledged after a reconnect or restart, as long as the
  session survives (clean start off plus a session expiry on MQTT 5; clean session off on
  3.1.1). For QoS 2 paho sends PUBREC on arrival and `ack()` sends PUBCOMP: the broker has
  handed the message over at PUBREC, so QoS 2 subscriptions are exactly-once while connected
  but not redelivered after a crash; subscribe at QoS 1 for at-least-once through a crash.
* A nack, ``ack(RejectedMessage(...))``, settles the message like an ack (it releases its place
  in the PUBACK order and is never redelivered). On MQTT 5 its PUBACK carries a failure reason
  code, 0x99 (payload format invalid) for a payload the bridge cannot parse, else 0x80
  (unspecified error); MQTT 3.1.1 has no negative acknowledgement: a plain PUBACK.
* `publish` returns after PUBACK (QoS 1), PUBCOMP (QoS 2) or once written to the socket
  (QoS 0). While disconnected it waits, and paho resends what was in flight after reconnecting;
  nothing is reported as accepted before the broker said so. A PUBACK or PUBREC with a failure
  reason code (0x87 not authorized, 0x97 quota exceeded, 0x99 payload format invalid, ...)
  raises `MqttPublishError` (``retriable=False``) at once. MQTT 3.1.1 brokers cannot refuse a
  publish: Mosquitto acknowledges a publish its ACL denies and drops it.

Bounds and backpressure:

* At most `max_inflight` publishes are in flight (fewer if the broker's Receive Maximum is
  lower); further `publish` calls wait for a slot.
* On MQTT 5 we announce Receive Maximum = `receive_queue_size`: the broker never has more
  unacknowledged QoS 1/2 messages in flight to us than the queue holds.
* When the receive queue is full anyway (QoS 0 floods, or a 3.1.1 broker with a large
  in-flight window) we stop reading the socket until the consumer takes a message: TCP flow
  control pushes back to the broker, nothing is dropped here. The queue may exceed its size by
  at most one read batch (the packets paho reads in one call). A stall longer than about two
  keepalive intervals makes paho drop the connection (it cannot read the PINGRESP); we
  reconnect and the session redelivers QoS 1/2 messages.
* A persistent session's backlog, however long, never keeps the connector from starting: the
  broker resends it right after CONNACK, before the SUBACK of our re-subscription, so when the
  receive queue fills before the SUBACK arrived we stop waiting for it (its outcome is logged
  when it is read) instead of failing the connection.
* A publish on a connection that also subscribes can wait behind that connection's inbound
  backlog (Mosquitto answers its PUBACKs after the messages it is sending it). Publish through
  a second, publish-only connector (`MqttSettings.for_publishing`: its own client id, a clean
  session, no subscriptions); its PUBACKs never wait behind another connection's backlog.

Errors (all `ConnectorError`, with `retriable` as data)::

    ConnectorError
    └── MqttError
        ├── MqttConnectError              no session could be established
        │   ├── MqttUnreachableError      DNS, refused, reset, no route        retriable
        │   ├── MqttConnectTimeoutError   no CONNACK within connect_timeout    retriable
        │   ├── MqttTlsError              handshake or certificate failure
        │   ├── MqttAuthError             CONNACK bad credentials / not authorized
        │   ├── MqttRefusedError          any other CONNACK refusal            per code
        │   └── MqttSubscribeError        SUBACK refused a filter at start
        ├── MqttPublishError              the broker refused it, or it is invalid
        │   └── MqttPacketTooLargeError   over the broker's Maximum Packet Size
        │   (both never retriable; a lost connection is not an error: the publish is resent)
        └── MqttStoppedError              the connector is not running
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import random
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.endpoint import Inbound
from bridge.envelope import Envelope, Outbound
from bridge.errors import ConnectorError, RejectedMessage
from connectors.mqtt_publish import (
    PackedProperties,
    PublishProperties,
    ReceivedPublish,
    dispatch_publish,
    encode_properties,
)

log = logging.getLogger("roombus.mqtt")

# MQTT's own ceiling for a packet (remaining length up to 268,435,455 plus a 5-byte header).
MQTT_MAX_PACKET = 268_435_455 + 5
_MISC_INTERVAL = 1.0  # seconds between loop_misc() calls (keepalive bookkeeping)
_STOP_DISCONNECT_TIMEOUT = 2.0  # how long stop() waits for DISCONNECT to be written


# --------------------------------------------------------------------------------------------
# Errors


class MqttError(ConnectorError):
    """Something failed on an MQTT connector."""


class MqttConnectError(MqttError):
    """No MQTT session could be established."""


class MqttUnreachableError(MqttConnectError):
    """The broker could not be reached (DNS, connection refused or reset, no route)."""

    retriable = True


class MqttConnectTimeoutError(MqttConnectError):
    """The TCP/TLS connection or the CONNACK did not complete within `connect_timeout`."""

    retriable = True


class MqttTlsError(MqttConnectError):
    """The TLS handshake failed (certificate verification, protocol mismatch)."""


class MqttAuthError(MqttConnectError):
    """The broker refused our credentials (CONNACK bad user name or password, not authorized)."""


class MqttRefusedError(MqttConnectError):
    """The broker refused the connection for another reason; `retriable` depends on the code."""


class MqttSubscribeError(MqttConnectError):
    """The broker refused a subscription when the connector started."""


class MqttPublishError(MqttError):
    """A publish was refused by the broker or is invalid (bad topic, QoS, properties).

    Never retriable: the same message would be refused again.

    Attributes:
        reason_code: The failure reason code of the broker's PUBACK or PUBREC (e.g. 0x87 not
            authorized), or None when the connector refused the message itself.
    """

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message, retriable=False)
        self.reason_code = reason_code


class MqttPacketTooLargeError(MqttPublishError):
    """The PUBLISH packet would exceed the broker's Maximum Packet Size."""


class MqttStoppedError(MqttError):
    """The connector is not running (never started, or stopped)."""


# CONNACK reason codes (MQTT 5 numbering) that may succeed when simply tried again later.
_RETRIABLE_CONNACK = {0x80, 0x88, 0x89, 0x97, 0x9C, 0x9D, 0x9F}
_AUTH_CONNACK = {0x86, 0x87, 0x8C}
# MQTT 3.1.1 CONNACK return codes, by the MQTT 5 reason name paho converts them to.
_V311_CONNACK_CODE = {
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}
_PUBCOMP_ID_NOT_FOUND = 0x92

# Nack reason codes (MQTT 5 PUBACK).
PUBACK_UNSPECIFIED_ERROR = 0x80
PUBACK_PAYLOAD_FORMAT_INVALID = 0x99
# `RejectedMessage.reason`s that mean "the payload itself is unusable" (bridge/router.py,
# bridge/rpcbridge.py, bridge/runtime.py): nacked with 0x99 rather than 0x80.
PAYLOAD_PROBLEM_REASONS = frozenset(
    {
        "invalid_json",
        "malformed_json",
        "json_too_large",
        "invalid_utf8",
        "invalid_base64",
        "malformed_base64",
        "too_deep",
        "payload_format",
    }
)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class MqttSettings:
    """How to reach and use one MQTT broker.

    Attributes:
        host: Broker host name or address.
        port: Broker port (8883 is customary with TLS).
        client_id: Client identifier; empty means ``roombus-<connector name>``. It must be
            stable across restarts for the persistent session to be found again, and unique
            per running instance (the broker disconnects the older of two equal ids).
        protocol: "5" or "3.1.1".
        username: User name, or None for anonymous.
        password: Password (only sent with a user name).
        tls: Use TLS.
        ca_file: CA bundle to verify the broker with (system default when None).
        cert_file: Client certificate (PEM) for mutual TLS.
        key_file: Key of `cert_file` (PEM), when not in `cert_file`.
        tls_insecure: Skip certificate and host name verification (tests only).
        keepalive: Keepalive interval in seconds.
        clean_start: Start without the stored session. MQTT 5: the session is cleaned when the
            connector starts and kept across its reconnects. MQTT 3.1.1: clean session on
            every connect (nothing is redelivered after a reconnect).
        session_expiry: MQTT 5 Session Expiry Interval in seconds: how long the broker keeps
            the session (subscriptions, unacknowledged messages) after a disconnect.
        connect_timeout: Seconds for TCP + TLS + CONNACK.
        reconnect_min_delay: First reconnect delay in seconds (jittered, then doubled).
        reconnect_max_delay: Cap of the reconnect delay in seconds.
        max_inflight: Publishes in flight at once (awaiting PUBACK / PUBCOMP / write).
        receive_queue_size: Received messages held for `messages()`; also the MQTT 5 Receive
            Maximum we announce.
    """

    host: str
    port: int = 1883
    client_id: str = ""
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    clean_start: bool = False
    session_expiry: int = 3600
    connect_timeout: float = 10.0
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    max_inflight: int = 100
    receive_queue_size: int = 1000

    def __post_init__(self) -> None:
        problems = []
        if not self.host:
            problems.append("host: must not be empty")
        if not 0 < self.port < 65536:
            problems.append(f"port: {self.port} is not a TCP port")
        if self.protocol not in ("5", "3.1.1"):
            problems.append(f"protocol: {self.protocol!r} is not '5' or '3.1.1'")
        if not 0 <= self.keepalive <= 65535:
            problems.append(f"keepalive: {self.keepalive} is not within 0..65535")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            problems.append(f"session_expiry: {self.session_expiry} is not within 0..2**32-1")
        if self.connect_timeout <= 0:
            problems.append("connect_timeout: must be positive")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            problems.append("reconnect_min_delay: must be positive and <= reconnect_max_delay")
        if not 1 <= self.max_inflight <= 65535:
            problems.append(f"max_inflight: {self.max_inflight} is not within 1..65535")
        if self.receive_queue_size < 1:
            problems.append("receive_queue_size: must be at least 1")
        if self.password is not None and self.username is None:
            problems.append("password: given without a username")
        if problems:
            raise ValueError("invalid MQTT settings: " + "; ".join(problems))

    def for_publishing(self, name: str) -> MqttSettings:
        """The settings of the publish-only companion of the connector `name`.

        Same broker and credentials, client id ``<client id>-pub`` (from `name` when no client
        id is configured) and a clean session: a connection without subscriptions, whose
        PUBACKs never wait behind the inbound backlog of the subscribing connection.
        """
        client_id = self.client_id or default_client_id(name)
        return dataclasses.replace(
            self, client_id=f"{client_id}-pub", clean_start=True, session_expiry=0
        )

    @property
    def url(self) -> str:
        """The broker as a URL for messages, e.g. ``mqtts://broker:8883`` (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


# --------------------------------------------------------------------------------------------
# Pure mapping functions (unit tested without sockets)


def default_client_id(name: str) -> str:
    """The client id used when none is configured: stable, derived from the connector name."""
    return "roombus-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def topic_name_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to, or None if it can (MQTT 4.7)."""
    if not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "wildcards are not allowed in a topic name"
    if "\0" in topic:
        return "NUL in topic"
    try:
        encoded = topic.encode("utf-8")
    except UnicodeEncodeError:
        return "topic is not valid UTF-8"
    if len(encoded) > 65535:
        return "topic longer than 65535 bytes"
    return None


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` cannot be subscribed to, or None if it can (MQTT 4.7.1)."""
    if not topic_filter:
        return "empty topic filter"
    if "\0" in topic_filter:
        return "NUL in topic filter"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    if len(topic_filter.encode("utf-8", "surrogatepass")) > 65535:
        return "topic filter longer than 65535 bytes"
    return None


def _props_get(props: Properties | PublishProperties | None, name: str) -> Any:
    return getattr(props, name, None) if props is not None else None


def envelope_from_message(
    source: str, topic: str, message: paho.MQTTMessage | ReceivedPublish
) -> tuple[Envelope, int]:
    """Map a received PUBLISH onto an `Envelope`.

    User properties become headers (when a name repeats, the last value wins), and the
    Content Type, Message Expiry Interval, Response Topic and Correlation Data properties fill
    the matching fields. MQTT 3.1.1 messages have none of these.

    Returns:
        The envelope and the number of user properties dropped because their name repeated.
    """
    props = message.properties
    headers: dict[str, str] = {}
    duplicates = 0
    for pair in _props_get(props, "UserProperty") or ():
        key, value = str(pair[0]), str(pair[1])
        if key in headers:
            duplicates += 1
        headers[key] = value
    content_type = _props_get(props, "ContentType")
    expiry = _props_get(props, "MessageExpiryInterval")
    response_topic = _props_get(props, "ResponseTopic")
    correlation = _props_get(props, "CorrelationData")
    envelope = Envelope(
        payload=bytes(message.payload),
        source=source,
        topic=topic,
        headers=headers,
        content_type=str(content_type) if content_type is not None else None,
        qos=message.qos,
        retain=bool(message.retain),
        expiry=float(expiry) if expiry is not None else None,
        response_topic=str(response_topic) if response_topic is not None else None,
        correlation_data=bytes(correlation) if correlation is not None else None,
    )
    return envelope, duplicates


def _new_properties(packet_type: int) -> Properties:
    props: Properties = Properties(packet_type)  # type: ignore[no-untyped-call]
    return props


def publish_properties(
    message: Outbound, *, mqtt5: bool
) -> tuple[PackedProperties | None, list[str]]:
    """The PUBLISH properties for `message`, encoded (`connectors.mqtt_publish`).

    Headers become user properties; content type, message expiry, response topic and
    correlation data their MQTT 5 properties. On MQTT 3.1.1 there are no properties: the
    fields that were set are returned as dropped (the caller counts and logs them).

    Raises:
        ValueError: a field cannot be encoded (bad response topic, expiry out of range, a
            string over 65535 bytes).
    """
    present = [
        name
        for name, value in (
            ("headers", message.headers),
            ("content_type", message.content_type),
            ("message_expiry", message.message_expiry),
            ("response_topic", message.response_topic),
            ("correlation_data", message.correlation_data),
        )
        if value is not None and value != ()
    ]
    if not mqtt5:
        return None, present
    if not present:
        return None, []
    expiry = message.message_expiry
    if expiry is not None and not 0 < expiry <= 0xFFFFFFFF:
        raise ValueError(f"message expiry {expiry} is not within 1..2**32-1")
    if message.response_topic is not None:
        problem = topic_name_problem(message.response_topic)
        if problem:
            raise ValueError(f"response topic {message.response_topic!r}: {problem}")
    return (
        encode_properties(
            [(str(k), str(v)) for k, v in message.headers],
            message.content_type,
            int(expiry) if expiry is not None else None,
            message.response_topic,
            bytes(message.correlation_data) if message.correlation_data is not None else None,
        ),
        [],
    )


def publish_packet_size(
    topic: str, payload_len: int, qos: int, properties: PackedProperties | None, *, mqtt5: bool
) -> int:
    """The size in bytes of the PUBLISH packet paho will write (what Maximum Packet Size limits)."""
    remaining = 2 + len(topic.encode("utf-8")) + payload_len + (2 if qos > 0 else 0)
    if mqtt5:
        remaining += len(properties) if properties is not None else 1
    length_bytes = 1
    while remaining >= 128**length_bytes and length_bytes < 4:
        length_bytes += 1
    return 1 + length_bytes + remaining


def backoff_delay(
    attempt: int, min_delay: float, max_delay: float, rand: Callable[[], float] = random.random
) -> float:
    """Reconnect delay before attempt `attempt` (0-based): doubling, capped, jittered.

    "Equal jitter": half the capped exponential delay plus a random part of the other half, so
    instances that lost the broker together spread out but never retry in a tight loop.
    """
    base: float = min(max_delay, min_delay * 2.0 ** min(attempt, 32))
    return base / 2 + rand() * base / 2


def nack_reason_code(error: RejectedMessage) -> int:
    """The MQTT 5 PUBACK reason code that tells the broker why we gave up on a message."""
    if error.reason in PAYLOAD_PROBLEM_REASONS:
        return PUBACK_PAYLOAD_FORMAT_INVALID
    return PUBACK_UNSPECIFIED_ERROR


def puback_packet(mid: int, reason_code: int) -> bytes:
    """An MQTT 5 PUBACK packet carrying `reason_code` (MQTT 5 3.4).

    Fixed header 0x40, remaining length 4, the packet identifier, the reason code and a
    property length of 0.
    """
    return struct.pack("!BBHBB", paho.PUBACK, 4, mid, reason_code, 0)


def connack_error(name: str, url: str, reason: ReasonCode, *, mqtt5: bool) -> MqttConnectError:
    """The typed error for a refused CONNACK, e.g. ``... failed: not authorized (CONNACK 135)``."""
    text = reason.getName()
    code = reason.value if mqtt5 else _V311_CONNACK_CODE.get(text, reason.value)
    message = f"{name}: connect to {url} failed: {text.lower()} (CONNACK {code})"
    if reason.value in _AUTH_CONNACK:
        return MqttAuthError(message)
    return MqttRefusedError(message, retriable=reason.value in _RETRIABLE_CONNACK)


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return exc.strerror or str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Inbound messages


@dataclass(frozen=True, slots=True)
class MqttInbound(Inbound[Envelope]):
    """An `Inbound` with the MQTT delivery details the envelope has no field for.

    Attributes:
        dup: The broker marked this PUBLISH as a redelivery (DUP flag).
        mid: The packet identifier (0 for QoS 0).
    """

    dup: bool = False
    mid: int = 0


@dataclass(eq=False)
class _Delivery:
    """What acknowledging one received message needs."""

    mid: int
    qos: int
    generation: int  # connection it arrived on (QoS 1 PUBACKs are only valid there)
    epoch: int  # session it belongs to (QoS 2 PUBCOMPs are valid across reconnects)
    acked: bool = False
    reason_code: int = 0  # the PUBACK's reason code: 0 for an ack, >= 0x80 for a nack


class _InflightGate:
    """A counting gate whose limit can change (max_inflight, lowered by Receive Maximum)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self._take()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as we were cancelled: pass the slot on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        if self.used == 0:
            self._idle.set()
        self._wake()

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    def fail_waiters(self, exc: BaseException) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _take(self) -> None:
        self.used += 1
        self._idle.clear()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)


class _Resend(Exception):
    """A QoS 0 publish was not written before the connection dropped: send it again."""


@dataclass(eq=False)
class _PublishWaiter:
    future: asyncio.Future[None]
    qos: int
    topic: str


# What `_Client._handle_pubackcomp` reports for a bare successful PUBACK (shared, never changed).
_PUBACK_SUCCESS = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10)}
_NO_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class _Client(paho.Client):
    """paho's client, given a socket we connected ourselves instead of connecting it itself.

    paho's `reconnect()` opens the socket with blocking calls (`socket.create_connection`, a
    blocking TLS handshake); we do both without blocking the loop and override the one method
    that makes the socket. This is a private paho method: `paho-mqtt` is pinned to 2.x.
    """

    prepared_socket: socket.socket | None = None
    # Receives the PUBLISH packets `decode_publish` decodes (the connector's `_on_message`).
    fast_receiver: Callable[[paho.Client, Any, Any], None] | None = None

    def _create_socket(self) -> paho.SocketLike:
        sock, self.prepared_socket = self.prepared_socket, None
        if sock is None:
            raise ConnectionError("no socket prepared for paho")
        return sock

    def puback(self, mid: int, reason_code: int) -> MQTTErrorCode:
        """Send the PUBACK of `mid` with an MQTT 5 failure reason code (a nack).

        paho's `ack(mid, 1)` can only send a success PUBACK (`_send_puback` packs the packet
        identifier alone), so we build the packet and queue it with paho's private
        `_packet_queue`, exactly as `_send_command_with_mid` does: relies on paho-mqtt 2.2.
        """
        self._easy_log(paho.MQTT_LOG_DEBUG, "Sending PUBACK (Mid: %d, reason %d)", mid, reason_code)
        return self._packet_queue(paho.PUBACK, puback_packet(mid, reason_code), mid, 1)

    def _handle_publish(self) -> MQTTErrorCode:
        """Decode a PUBLISH with `connectors.mqtt_publish` and hand it to `fast_receiver`.

        paho's own path (an `MQTTMessage` with a `Properties` object per message, then its
        callback matcher) is the fallback for what that decoder leaves to it. With manual
        acknowledgements paho sends nothing for QoS 0 or 1 here, so skipping it changes only
        the cost. Relies on paho-mqtt 2.2 internals: `_in_packet`, `_protocol`, `_manual_ack`.
        """
        receiver = self.fast_receiver
        if receiver is not None and dispatch_publish(self, receiver):
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_publish()

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """A successful PUBACK without properties, handled without decoding objects.

        paho decodes every PUBACK into a `ReasonCode` and a `Properties` object (whose
        constructor builds its name tables); a broker's usual PUBACK is the packet identifier
        alone (MQTT 5 §3.4.2.1 lets it omit a success code and empty properties). Anything
        else goes to paho. Relies on paho-mqtt 2.2 internals: `_in_packet`, `_out_messages`,
        `_out_message_mutex`, `_do_on_publish`.
        """
        packet = self._in_packet["packet"]
        # The identifier alone, or with a success code (0, or 0x10 "no matching subscribers")
        # and no properties (none, or a zero property length).
        size = len(packet)
        reason = _PUBACK_SUCCESS.get(packet[2] if size >= 3 else 0)
        if cmd == "PUBACK" and reason is not None and (size <= 3 or (size == 4 and not packet[3])):
            (mid,) = struct.unpack("!H", packet[:2])
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, reason, _NO_PUBACK_PROPERTIES)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def _handle_pubrec(self) -> MQTTErrorCode:
        """Treat a PUBREC with a failure reason code as the refusal it is.

        paho 2.2 ignores PUBREC reason codes (its own TODO) and answers every PUBREC with
        PUBREL, so a QoS 2 publish the broker refused (0x87 not authorized, 0x97 quota ...)
        would end with PUBCOMP 0x92 and look accepted. A failed PUBREC ends the exchange
        (MQTT 5 4.3.3): report it through on_publish like a failed PUBACK. Relies on paho-mqtt
        2.2 internals: `_in_packet["packet"]` (the variable header), `_out_messages`,
        `_do_on_publish`.
        """
        packet = self._in_packet["packet"]
        if self._protocol == paho.MQTTv5 and len(packet) >= 3 and packet[2] >= 0x80:
            (mid,) = struct.unpack("!H", packet[:2])
            reason = ReasonCode(PacketTypes.PUBREC, identifier=packet[2])
            props = _new_properties(PacketTypes.PUBREC)
            if len(packet) > 3:
                props.unpack(packet[3:])  # type: ignore[no-untyped-call]
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBREC (Mid: %d, refused)", mid)
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, reason, props)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubrec()


# --------------------------------------------------------------------------------------------
# The connector


class MqttConnector:
    """One MQTT broker connection, used as a `Source` (subscriptions) and a `Sink` (publish).

    Use it as an async context manager, or call `start()` and `stop()`.

    Attributes:
        name: The endpoint name, e.g. ``mqtt:plant``; it starts every error message and is the
            `source` of every envelope.
        settings: How to reach the broker.
        counters: Named event counts (``mqtt.published``, ``mqtt.ack_stale``, ...).
    """

    def __init__(self, name: str, settings: MqttSettings) -> None:
        self.name = name
        self.settings = settings
        self.counters: collections.Counter[str] = collections.Counter()
        self._mqtt5 = settings.protocol == "5"
        self._client_id = settings.client_id or default_client_id(name)
        self._subscriptions: dict[str, int] = {}
        self._client: _Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        # Connection state.
        self._sock: paho.SocketLike | None = None
        self._write_scheduled = False  # `_write_now` is due this loop turn
        self._write_watched = False  # the socket was full: a write watcher is registered
        self._connected = False
        self._connected_or_stopping = asyncio.Event()
        self._lost = asyncio.Event()
        self._socket_closed = asyncio.Event()
        self._socket_closed.set()
        self._connack: asyncio.Future[bool] | None = None
        self._generation = 0
        self._session_epoch = 0
        self._server_max_packet: int | None = None
        self._server_max_qos = 2
        self._server_retain = True
        self._last_error: MqttError | None = None
        # Inbound.
        self._rx: collections.deque[tuple[MqttInbound, _Delivery]] = collections.deque()
        self._rx_ready = asyncio.Event()
        self._rx_peak = 0
        self._paused = False
        self._pause_waiters: list[asyncio.Future[None]] = []
        self._unacked_qos1: collections.deque[_Delivery] = collections.deque()
        self._owed_pubcomp: set[int] = set()
        self._suback: dict[int, tuple[asyncio.Future[list[str]], list[str]]] = {}
        # Outbound.
        self._gate = _InflightGate(settings.max_inflight)
        self._waiters: dict[int, _PublishWaiter] = {}
        self._logged_once: set[str] = set()

    # ---- public API ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a session with the broker is established right now."""
        return self._connected

    @property
    def last_error(self) -> MqttError | None:
        """The most recent connection failure (for health reporting), or None."""
        return self._last_error

    @property
    def in_flight(self) -> int:
        """Publishes holding an in-flight slot (submitted to paho or about to be)."""
        return self._gate.used

    @property
    def publish_waiting(self) -> int:
        """Publishes waiting for an in-flight slot."""
        return self._gate.waiting

    @property
    def receive_queued(self) -> int:
        """Received messages waiting in the receive queue."""
        return len(self._rx)

    @property
    def receive_queue_peak(self) -> int:
        """The most messages the receive queue held at once since the connector was made."""
        return self._rx_peak

    @property
    def reading_paused(self) -> bool:
        """Whether socket reads are paused because the receive queue is full."""
        return self._paused

    @property
    def max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size from the last CONNACK (MQTT 5), if it set one."""
        return self._server_max_packet

    async def __aenter__(self) -> MqttConnector:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def add_subscription(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe to `topic_filter`, now if connected and again on every reconnect.

        Raises:
            ValueError: the filter or QoS is invalid.
        """
        problem = topic_filter_problem(topic_filter)
        if problem:
            raise ValueError(f"{self.name}: cannot subscribe to {topic_filter!r}: {problem}")
        if qos not in (0, 1, 2):
            raise ValueError(f"{self.name}: QoS {qos} is not 0, 1 or 2")
        self._subscriptions[topic_filter] = qos
        if self._connected:
            future = self._send_subscribe({topic_filter: qos})
            if future is not None:
                future.add_done_callback(self._log_suback)

    def remove_subscription(self, topic_filter: str) -> None:
        """Unsubscribe from `topic_filter` now if connected, and not again on reconnects.

        Messages the broker sent before it handled the UNSUBSCRIBE still arrive.
        """
        if self._subscriptions.pop(topic_filter, None) is None:
            return
        client = self._client
        if self._connected and client is not None:
            rc, _mid = client.unsubscribe(topic_filter)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # Not connected after all: the next session subscribes without it.
                log.warning("%s: UNSUBSCRIBE not sent: %s", self.name, paho.error_string(rc))

    async def start(self) -> None:
        """Make the first connection attempt, then keep the connection up until `stop()`.

        Returns after the first attempt whether it connected or not: when the broker is down
        or unreachable, `connected` stays False, `last_error` says why, and the connector keeps
        reconnecting in the background (capped, jittered exponential backoff). Idempotent.

        Raises:
            MqttConnectError: (``retriable=False``) the broker refused us in a way no retry can
                fix: bad credentials or not authorized (`MqttAuthError`), a TLS failure
                (`MqttTlsError`), another non-retriable CONNACK code (`MqttRefusedError`), a
                refused subscription (`MqttSubscribeError`). The connector is stopped.
        """
        if self._running:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._lost.clear()
        self._connected_or_stopping.clear()
        self._client = self._make_client()
        self._running = True
        first: asyncio.Future[MqttError | None] = loop.create_future()
        self._tasks = [
            asyncio.create_task(self._keep_connected(first), name=f"{self.name}:connect"),
            asyncio.create_task(self._misc_timer(), name=f"{self.name}:keepalive"),
        ]
        try:
            error = await asyncio.shield(first)
        except BaseException:
            await self._close()
            raise
        if error is not None and not error.retriable:
            await self._close()
            raise error

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop: end `messages()`, wait up to `drain_timeout` for in-flight publishes, DISCONNECT.

        Idempotent. Messages received but not acknowledged stay with the broker's session and
        are redelivered on the next start. Publishes still waiting raise `MqttStoppedError`.
        """
        if not self._running or self._stopping:
            return
        await self._close(drain_timeout)
        log.info("%s: stopped", self.name)

    async def _close(self, drain_timeout: float = 0.0) -> None:
        self._stopping = True
        self._rx_ready.set()  # end messages() iterators
        if self._connected and self._gate.used:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._gate.wait_idle()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        client = self._client
        if client is not None and client.socket() is not None:
            # A clean DISCONNECT keeps the session (MQTT 5 expiry, 3.1.1 clean session off).
            client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_DISCONNECT_TIMEOUT):
                    await self._socket_closed.wait()
            self._abort_socket()
        self._connected = False
        stopped = MqttStoppedError(f"{self.name}: stopped")
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(stopped)
        self._waiters.clear()
        self._gate.fail_waiters(stopped)
        self._connected_or_stopping.set()
        self._rx.clear()
        self._unacked_qos1.clear()
        self._running = False
        self._client = None

    async def messages(self) -> AsyncIterator[Inbound[Envelope]]:
        """Received messages (`MqttInbound`), in arrival order, until the connector stops.

        Call `ack()` on each once every sink accepted it; unacknowledged QoS 1/2 messages are
        redelivered by the broker after a reconnect or restart (persistent session).
        """
        while True:
            while not self._rx:
                if self._stopping or not self._running:
                    return
                self._rx_ready.clear()
                await self._rx_ready.wait()
            if self._stopping:
                return
            inbound, _ = self._rx.popleft()
            self._maybe_resume_reading()
            yield inbound

    async def publish(self, message: Outbound) -> None:
        """Publish `message`; return after PUBACK (QoS 1), PUBCOMP (QoS 2), or the write (QoS 0).

        Waits while disconnected (at most `max_inflight` publishes hold a slot; more wait for
        one). `payload=None` publishes an empty payload, which with `retain=True` clears the
        retained message. On MQTT 3.1.1 the MQTT 5-only fields are dropped and counted.

        Raises:
            MqttPublishError: the message is invalid or the broker refused it.
            MqttPacketTooLargeError: over the broker's Maximum Packet Size.
            MqttStoppedError: the connector is not running or stopped while waiting.
        """
        if not self._running or self._stopping:
            raise MqttStoppedError(f"{self.name}: publish to {message.topic!r}: not running")
        refuse = f"{self.name}: publish to {message.topic!r} refused"
        problem = topic_name_problem(message.topic)
        if problem is None and message.qos not in (0, 1, 2):
            problem = f"QoS {message.qos} is not 0, 1 or 2"
        if problem:
            self.counters["mqtt.publish_invalid"] += 1
            raise MqttPublishError(f"{refuse}: {problem}")
        try:
            props, dropped = publish_properties(message, mqtt5=self._mqtt5)
        except ValueError as exc:
            self.counters["mqtt.publish_invalid"] += 1
            raise MqttPublishError(f"{refuse}: {exc}") from exc
        for field_name in dropped:
            self.counters[f"mqtt.v5_field_dropped.{field_name}"] += 1
            self._log_once(
                f"dropped:{field_name}",
                "%s: MQTT 3.1.1 has no %s: dropped from publishes (counted as "
                "mqtt.v5_field_dropped.%s)",
                self.name,
                field_name,
                field_name,
            )
        payload = message.payload or b""
        await self._gate.acquire()
        try:
            while True:
                await self._wait_connected()
                self._check_publish_limits(message, payload, props, refuse)
                future = self._submit(message, payload, props, refuse)
                try:
                    await future
                except _Resend:
                    self.counters["mqtt.publish_resent"] += 1
                    continue
                self.counters["mqtt.published"] += 1
                return
        finally:
            self._gate.release()

    # ---- connection ------------------------------------------------------------------------

    def _make_client(self) -> _Client:
        s = self.settings
        if self._mqtt5:
            client = _Client(
                CallbackAPIVersion.VERSION2,
                client_id=self._client_id,
                protocol=paho.MQTTv5,
                reconnect_on_failure=False,  # else paho reconnects inside a CONNACK handler
                manual_ack=True,
            )
        else:
            client = _Client(
                CallbackAPIVersion.VERSION2,
                client_id=self._client_id,
                clean_session=s.clean_start,
                protocol=paho.MQTTv311,
                reconnect_on_failure=False,
                manual_ack=True,
            )
        client.manual_ack_set(True)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        # We gate in-flight publishes ourselves; paho's own limit only has to be no lower.
        client.max_inflight_messages_set(min(65535, s.max_inflight))
        client.suppress_exceptions = True  # a bug in our callbacks must not kill the read loop
        client.enable_logger(logging.getLogger("roombus.mqtt.paho"))
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.fast_receiver = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_args(self) -> dict[str, Any]:
        s = self.settings
        args: dict[str, Any] = {"host": s.host, "port": s.port, "keepalive": s.keepalive}
        if self._mqtt5:
            props = _new_properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry
            props.ReceiveMaximum = min(65535, s.receive_queue_size)
            args["properties"] = props
            # True maps to "clean on the first connect only": a connector that asked for a
            # fresh session still keeps it across its own reconnects.
            args["clean_start"] = paho.MQTT_CLEAN_START_FIRST_ONLY if s.clean_start else False
        return args

    async def _connect_once(self, *, first: bool) -> None:
        assert self._client is not None and self._loop is not None
        client = self._client
        url = self.settings.url
        what = f"{self.name}: connect to {url} failed"
        connack: asyncio.Future[bool] = self._loop.create_future()
        self._connack = connack
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                sock = await self._open_socket(what)
                client.connect_async(**self._connect_args())
                client.prepared_socket, sock = sock, None
                try:
                    client.reconnect()
                except OSError as exc:
                    raise MqttUnreachableError(f"{what}: {_describe_os_error(exc)}") from exc
                session_present = await connack
                subscribed = self._subscribe_all(session_present)
                if subscribed is not None:
                    refused = await self._suback_unless_paused(subscribed)
                    if refused is None:
                        # The session's backlog filled the receive queue before the SUBACK
                        # came: it is read once the consumer made room; log it then.
                        self.counters["mqtt.suback_deferred"] += 1
                        subscribed.add_done_callback(self._log_suback)
                    elif refused:
                        message = f"{self.name}: subscribe to {', '.join(refused)} refused"
                        if first:
                            raise MqttSubscribeError(message)
                        log.error("%s", message)
        except TimeoutError as exc:
            error: MqttError = MqttConnectTimeoutError(
                f"{what}: no answer within {self.settings.connect_timeout:g} s"
            )
            self._connect_failed(error)
            raise error from exc
        except MqttError as exc:
            self._connect_failed(exc)
            raise
        except BaseException:
            self._connect_failed(None)
            raise
        finally:
            if sock is not None:
                sock.close()
            if not connack.done():
                connack.cancel()
            elif not connack.cancelled():
                connack.exception()  # retrieved: the failure was reported another way
            self._connack = None
        self._last_error = None
        log.info(
            "%s: connected to %s as %r (MQTT %s, session %s)",
            self.name,
            url,
            self._client_id,
            self.settings.protocol,
            "resumed" if session_present else "new",
        )

    async def _suback_unless_paused(self, suback: asyncio.Future[list[str]]) -> list[str] | None:
        """The refused filters of `suback`, or None if reading paused before it arrived.

        While reading is paused for backpressure the SUBACK cannot be read, and waiting for it
        would deadlock: the consumer only starts taking messages once `start()` returned.
        """
        if not self._paused:
            assert self._loop is not None
            paused: asyncio.Future[None] = self._loop.create_future()
            self._pause_waiters.append(paused)
            try:
                await asyncio.wait((suback, paused), return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                suback.cancel()  # timed out or cancelled: the connection is being abandoned
                raise
            finally:
                self._pause_waiters.remove(paused)
                paused.cancel()
        if suback.done():
            return suback.result()
        return None

    def _connect_failed(self, error: MqttError | None) -> None:
        if error is not None:
            self._last_error = error
        self._abort_socket()

    async def _open_socket(self, what: str) -> socket.socket:
        """TCP connect (and TLS handshake) without blocking the loop."""
        assert self._loop is not None
        loop = self._loop
        s = self.settings
        try:
            infos = await loop.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise MqttUnreachableError(f"{what}: {_describe_os_error(exc)}") from exc
        last: OSError | None = None
        sock: socket.socket | None = None
        for family, type_, proto, _, address in infos:
            candidate = socket.socket(family, type_, proto)
            try:
                candidate.setblocking(False)
                await loop.sock_connect(candidate, address)
            except OSError as exc:
                candidate.close()
                last = exc
                continue
            except BaseException:
                candidate.close()
                raise
            sock = candidate
            break
        if sock is None:
            assert last is not None
            raise MqttUnreachableError(f"{what}: {_describe_os_error(last)}") from last
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not s.tls:
            return sock
        try:
            return await self._tls_handshake(sock)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise MqttTlsError(f"{what}: TLS certificate: {exc.verify_message}") from exc
        except (ssl.SSLError, ssl.CertificateError) as exc:
            sock.close()
            raise MqttTlsError(f"{what}: TLS handshake: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise MqttTlsError(
                f"{what}: TLS handshake: {_describe_os_error(exc)} (is the port TLS?)"
            ) from exc
        except BaseException:
            sock.close()
            raise

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        context = ssl.create_default_context(cafile=s.ca_file)
        if s.cert_file:
            context.load_cert_chain(s.cert_file, s.key_file)
        if s.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _tls_handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        assert self._loop is not None
        tls = self._ssl_context().wrap_socket(
            sock, server_hostname=self.settings.host, do_handshake_on_connect=False
        )
        try:
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    await self._wait_fd(tls.fileno(), write=False)
                except ssl.SSLWantWriteError:
                    await self._wait_fd(tls.fileno(), write=True)
        except BaseException:
            tls.close()
            raise

    async def _wait_fd(self, fd: int, *, write: bool) -> None:
        assert self._loop is not None
        loop = self._loop
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    def _abort_socket(self) -> None:
        """Close paho's socket without DISCONNECT (connect_async closes and resets state)."""
        client = self._client
        if client is not None and client.socket() is not None:
            client.connect_async(**self._connect_args())
        if client is not None and client.prepared_socket is not None:
            client.prepared_socket.close()
            client.prepared_socket = None

    async def _keep_connected(self, first: asyncio.Future[MqttError | None]) -> None:
        """Connect, and reconnect after every loss or failure with backoff, until stopped.

        `first` receives the outcome of the first attempt (None when it connected), which
        `start()` waits for. A non-retriable failure of that attempt ends the task (`start()`
        raises it); any later failure is retried, since the connector was working before.
        Logs one line per state change: the loss (`_on_socket_close`), each new failure
        reason, and the reconnection, never one per attempt.
        """
        s = self.settings
        attempt = 0  # failed attempts since the last connection
        reported: str | None = None  # the failure last logged
        while True:
            self._lost.clear()  # a loss during a failed attempt is that attempt's failure
            try:
                await self._connect_once(first=not first.done())
            except Exception as failure:
                if isinstance(failure, MqttError):
                    exc = failure
                else:  # a bug of ours: must neither end this task silently nor hang start()
                    log.exception("%s: internal error while connecting", self.name)
                    exc = self._internal_error(failure)
                self.counters["mqtt.connect_failed"] += 1
                if not first.done():
                    first.set_result(exc)
                    if not exc.retriable:
                        return
                if str(exc) != reported:
                    reported = str(exc)
                    level = logging.WARNING if exc.retriable else logging.ERROR
                    log.log(level, "%s; retrying in the background", exc)
                else:
                    log.debug("%s (attempt %d)", exc, attempt + 1)
                await asyncio.sleep(
                    backoff_delay(attempt, s.reconnect_min_delay, s.reconnect_max_delay)
                )
                attempt += 1
                continue
            if not first.done():
                first.set_result(None)
            attempt, reported = 0, None
            await self._lost.wait()  # _on_socket_close logged and counted the loss
            await asyncio.sleep(backoff_delay(0, s.reconnect_min_delay, s.reconnect_max_delay))
            attempt = 1

    def _internal_error(self, failure: Exception) -> MqttError:
        """A retriable connect error for an unexpected exception (retried like an outage)."""
        self.counters["mqtt.internal_error"] += 1
        error = MqttConnectError(
            f"{self.name}: connect to {self.settings.url} failed: internal error "
            f"({type(failure).__name__}: {failure})",
            retriable=True,
        )
        self._last_error = error
        return error

    async def _misc_timer(self) -> None:
        """Run paho's keepalive bookkeeping (PINGREQ, dead-connection detection)."""
        while True:
            await asyncio.sleep(_MISC_INTERVAL)
            client = self._client
            if client is not None and self._connected:
                client.loop_misc()

    async def _wait_connected(self) -> None:
        while not self._connected:
            if self._stopping or not self._running:
                raise MqttStoppedError(f"{self.name}: stopped")
            self._connected_or_stopping.clear()
            await self._connected_or_stopping.wait()
        if self._stopping:
            raise MqttStoppedError(f"{self.name}: stopped")

    # ---- paho socket callbacks -------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: paho.SocketLike) -> None:
        assert self._loop is not None
        self._sock = sock
        self._paused = False
        self._socket_closed.clear()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: paho.SocketLike) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        self._loop.remove_writer(sock.fileno())
        self._write_watched = False
        self._sock = None
        self._paused = False
        self._socket_closed.set()
        was_connected, self._connected = self._connected, False
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(
                MqttUnreachableError(
                    f"{self.name}: connect to {self.settings.url} failed: "
                    "connection closed before CONNACK"
                )
            )
        for mid, waiter in list(self._waiters.items()):
            if waiter.qos == 0:  # paho forgets unwritten QoS 0 packets on reconnect
                del self._waiters[mid]
                if not waiter.future.done():
                    waiter.future.set_exception(_Resend())
        for future, _ in self._suback.values():
            if not future.done():
                future.set_exception(
                    MqttUnreachableError(f"{self.name}: connection lost before SUBACK")
                )
        self._suback.clear()
        if was_connected and self._running and not self._stopping:
            self.counters["mqtt.connection_lost"] += 1
            log.warning("%s: connection to %s lost; reconnecting", self.name, self.settings.url)
            self._lost.set()

    def _on_socket_register_write(
        self, client: paho.Client, userdata: Any, sock: paho.SocketLike
    ) -> None:
        # paho has packets to write. The socket is almost always writable, so they are written
        # at the end of this loop turn, together with whatever else this turn queues (a batch of
        # PUBACKs), instead of through a write watcher: that cost two epoll_ctl calls and a
        # loop iteration per turn. Only a socket that is full gets the watcher (`_write_now`).
        assert self._loop is not None
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write_now)

    def _write_now(self) -> None:
        self._write_scheduled = False
        client = self._client
        sock = self._sock
        if client is None or sock is None or self._loop is None:
            return
        self._on_writable()
        if client.want_write() and not self._write_watched and client.socket() is sock:
            self._write_watched = True
            self._loop.add_writer(sock.fileno(), self._on_writable)

    def _on_socket_unregister_write(
        self, client: paho.Client, userdata: Any, sock: paho.SocketLike
    ) -> None:
        assert self._loop is not None
        if self._write_watched:
            self._write_watched = False
            self._loop.remove_writer(sock.fileno())

    def _on_readable(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            sock = client.socket()
            client.loop_read()
            # TLS may hold whole packets in its buffer that select() cannot see.
            if isinstance(sock, ssl.SSLSocket):
                tls: ssl.SSLSocket = sock
                while tls.pending() and not self._paused and client.socket() is tls:
                    client.loop_read()
        except Exception:
            self.counters["mqtt.internal_error"] += 1
            log.exception("%s: error while reading from the broker", self.name)
        self._check_backpressure()

    def _on_writable(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            client.loop_write()
        except Exception:
            self.counters["mqtt.internal_error"] += 1
            log.exception("%s: error while writing to the broker", self.name)

    def _check_backpressure(self) -> None:
        if (
            self._connected
            and not self._paused
            and self._sock is not None
            and len(self._rx) >= self.settings.receive_queue_size
            and self._loop is not None
        ):
            self._paused = True
            self._loop.remove_reader(self._sock.fileno())
            for waiter in self._pause_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self.counters["mqtt.receive_paused"] += 1
            log.debug("%s: receive queue full (%d): reading paused", self.name, len(self._rx))

    def _maybe_resume_reading(self) -> None:
        # Hysteresis: resume only once the queue is half empty. Resuming at the first free slot
        # paused and resumed the socket (two epoll_ctl calls and a read) for every message
        # taken while a backlog waits at the broker.
        if (
            self._paused
            and len(self._rx) <= self.settings.receive_queue_size // 2
            and self._sock is not None
            and self._loop is not None
        ):
            self._paused = False
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._loop.call_soon(self._on_readable)  # data TLS may already have buffered

    # ---- paho protocol callbacks -----------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        connack = self._connack
        if reason.is_failure:
            if connack is not None and not connack.done():
                connack.set_exception(
                    connack_error(self.name, self.settings.url, reason, mqtt5=self._mqtt5)
                )
            return
        session_present = bool(flags.session_present)
        self._server_max_packet = _props_get(properties, "MaximumPacketSize")
        max_qos = _props_get(properties, "MaximumQoS")
        self._server_max_qos = int(max_qos) if max_qos is not None else 2
        retain = _props_get(properties, "RetainAvailable")
        self._server_retain = bool(retain) if retain is not None else True
        receive_max = _props_get(properties, "ReceiveMaximum")
        self._gate.set_limit(
            min(self.settings.max_inflight, int(receive_max) if receive_max else 65535)
        )
        self._generation += 1
        if not session_present:
            self._session_epoch += 1
            self._owed_pubcomp.clear()
        self._unacked_qos1.clear()
        if session_present and self._generation > 1:
            self._purge_redelivered()
        for mid in sorted(self._owed_pubcomp):
            client.ack(mid, 2)
        self._owed_pubcomp.clear()
        self._connected = True
        self._last_error = None
        self.counters["mqtt.connected"] += 1
        self._connected_or_stopping.set()
        if connack is not None and not connack.done():
            connack.set_result(session_present)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            self.counters["mqtt.disconnected_by_broker"] += 1
            log.warning(
                "%s: the broker closed the session: %s (DISCONNECT %d)",
                self.name,
                reason.getName().lower(),
                reason.value,
            )

    def _purge_redelivered(self) -> None:
        """Drop queued QoS 1 messages of an older connection: the session resends them now.

        Keeping them would deliver each twice; their acknowledgements would be stale anyway.
        """
        kept = collections.deque(
            item for item in self._rx if item[1].qos != 1 or item[1].generation == self._generation
        )
        purged = len(self._rx) - len(kept)
        if purged:
            self._rx = kept
            self.counters["mqtt.redelivery_purged"] += purged

    def _on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage | ReceivedPublish
    ) -> None:
        delivery = _Delivery(message.mid, message.qos, self._generation, self._session_epoch)
        if message.qos == 1:
            self._unacked_qos1.append(delivery)
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # Acknowledged so the broker stops resending it; it can never be routed.
            self.counters["mqtt.invalid_topic"] += 1
            self._log_once(
                "invalid_topic", "%s: dropped a message whose topic is not UTF-8", self.name
            )
            self._ack(delivery)
            return
        envelope, duplicates = envelope_from_message(self.name, topic, message)
        if duplicates:
            self.counters["mqtt.header_duplicate"] += duplicates
        self.counters["mqtt.received"] += 1
        if message.dup:
            self.counters["mqtt.received_dup"] += 1

        async def ack(error: RejectedMessage | None = None) -> None:
            if error is not None and not delivery.acked:
                self.counters["mqtt.nacked"] += 1
                delivery.reason_code = nack_reason_code(error)
            self._ack(delivery)

        inbound = MqttInbound(
            message=envelope, ack=ack, key=envelope.topic, dup=bool(message.dup), mid=message.mid
        )
        self._rx.append((inbound, delivery))
        self._rx_peak = max(self._rx_peak, len(self._rx))
        self._rx_ready.set()
        self._check_backpressure()

    def _ack(self, delivery: _Delivery) -> None:
        if delivery.acked:
            return
        delivery.acked = True
        self.counters["mqtt.acked"] += 1
        client = self._client
        if delivery.qos == 0 or client is None:
            return
        if delivery.qos == 2:
            if delivery.epoch != self._session_epoch:
                self.counters["mqtt.ack_stale"] += 1
            elif self._connected:
                client.ack(delivery.mid, 2)
            else:
                self._owed_pubcomp.add(delivery.mid)  # sent after the reconnect
            return
        if delivery.generation != self._generation or not self._connected:
            # The broker resends it on the next connection; that copy will be acknowledged.
            self.counters["mqtt.ack_stale"] += 1
            return
        # PUBACKs go out in arrival order (MQTT 4.6): release the acknowledged head.
        queue = self._unacked_qos1
        while queue and queue[0].acked:
            head = queue.popleft()
            if head.reason_code and self._mqtt5:
                client.puback(head.mid, head.reason_code)
            else:  # an ack, or a nack on MQTT 3.1.1 (which has no negative PUBACK)
                client.ack(head.mid, 1)

    # ---- subscriptions ---------------------------------------------------------------------

    def _subscribe_all(self, session_present: bool) -> asyncio.Future[list[str]] | None:
        if not self._subscriptions:
            return None
        if session_present and not self._mqtt5:
            # 3.1.1 has no retain handling: subscribing again would resend retained messages.
            return None
        self.counters["mqtt.subscribed"] += 1
        return self._send_subscribe(dict(self._subscriptions))

    def _send_subscribe(self, filters: dict[str, int]) -> asyncio.Future[list[str]] | None:
        client = self._client
        assert client is not None and self._loop is not None
        names = list(filters)
        if self._mqtt5:
            # Retain handling 1: retained messages only for a subscription that is new, so we
            # can subscribe again on every reconnect without replaying retained state.
            options = [
                (f, SubscribeOptions(qos=q, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
                for f, q in filters.items()
            ]
            rc, mid = client.subscribe(options)
        else:
            rc, mid = client.subscribe(list(filters.items()))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            log.warning("%s: SUBSCRIBE not sent: %s", self.name, paho.error_string(rc))
            return None
        future: asyncio.Future[list[str]] = self._loop.create_future()
        self._suback[mid] = (future, names)
        return future

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        entry = self._suback.pop(mid, None)
        if entry is None:
            return
        future, names = entry
        refused = []
        for name, code in zip(names, reason_codes, strict=False):
            if code.is_failure:
                self.counters["mqtt.subscribe_refused"] += 1
                refused.append(f"{name!r} ({code.getName().lower()}, SUBACK {code.value})")
            elif code.value < self._subscriptions.get(name, 0):
                log.info("%s: broker granted QoS %d for %r", self.name, code.value, name)
        if not future.done():
            future.set_result(refused)

    def _log_suback(self, future: asyncio.Future[list[str]]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("%s (it is sent again after the reconnect)", exc)
        elif refused := future.result():
            log.error("%s: subscribe to %s refused", self.name, ", ".join(refused))

    # ---- publishing ------------------------------------------------------------------------

    def _check_publish_limits(
        self, message: Outbound, payload: bytes, props: PackedProperties | None, refuse: str
    ) -> None:
        if message.qos > self._server_max_qos:
            self.counters["mqtt.publish_invalid"] += 1
            raise MqttPublishError(
                f"{refuse}: QoS {message.qos} is above the broker's maximum QoS "
                f"{self._server_max_qos}"
            )
        if message.retain and not self._server_retain:
            self.counters["mqtt.publish_invalid"] += 1
            raise MqttPublishError(f"{refuse}: the broker does not support retained messages")
        size = publish_packet_size(
            message.topic, len(payload), message.qos, props, mqtt5=self._mqtt5
        )
        limit = min(self._server_max_packet or MQTT_MAX_PACKET, MQTT_MAX_PACKET)
        if size > limit:
            self.counters["mqtt.publish_too_large"] += 1
            who = "the broker's Maximum Packet Size" if self._server_max_packet else "MQTT's limit"
            raise MqttPacketTooLargeError(
                f"{refuse}: packet of {size} bytes exceeds {who} of {limit} bytes"
            )

    def _submit(
        self, message: Outbound, payload: bytes, props: PackedProperties | None, refuse: str
    ) -> asyncio.Future[None]:
        client = self._client
        assert client is not None and self._loop is not None
        try:
            # paho only calls pack() on its `properties` (see `PackedProperties`).
            packed = cast(Properties | None, props)
            info = client.publish(
                message.topic, payload, message.qos, message.retain, properties=packed
            )
        except ValueError as exc:
            self.counters["mqtt.publish_invalid"] += 1
            raise MqttPublishError(f"{refuse}: {exc}") from exc
        future: asyncio.Future[None] = self._loop.create_future()
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and message.qos > 0:
                pass  # kept by paho and sent after CONNACK; wait for the PUBACK as usual
            elif info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                future.set_exception(_Resend())
                return future
            else:
                raise MqttPublishError(f"{refuse}: {paho.error_string(info.rc)}")
        self._waiters[info.mid] = _PublishWaiter(future, message.qos, message.topic)
        future.add_done_callback(functools.partial(self._forget_waiter, info.mid))
        return future

    def _forget_waiter(self, mid: int, future: asyncio.Future[None]) -> None:
        waiter = self._waiters.get(mid)
        if waiter is not None and waiter.future is future:
            del self._waiters[mid]

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        waiter = self._waiters.pop(mid, None)
        if waiter is None or waiter.future.done():
            return
        if reason.is_failure and not (waiter.qos == 2 and reason.value == _PUBCOMP_ID_NOT_FOUND):
            self.counters["mqtt.publish_rejected"] += 1
            detail = _props_get(properties, "ReasonString")
            waiter.future.set_exception(
                MqttPublishError(
                    f"{self.name}: publish to {waiter.topic!r} refused by the broker: "
                    f"{reason.getName().lower()} (reason {reason.value:#04x})"
                    + (f": {detail}" if detail else ""),
                    reason_code=reason.value,
                )
            )
            return
        # PUBCOMP "packet identifier not found" after a reconnect: the broker took the message
        # at PUBREC and then lost the session; the message was accepted.
        waiter.future.set_result(None)

    # ---- helpers ---------------------------------------------------------------------------

    def _log_once(self, kind: str, fmt: str, *args: object) -> None:
        if kind in self._logged_once:
            return
        self._logged_once.add(kind)
        log.warning(fmt, *args)
