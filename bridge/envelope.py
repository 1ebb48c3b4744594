"""The message types that cross the bridge.

An `Envelope` is what a source produced (bytes plus where it came from); an `Outbound` is what a
sink is asked to publish (topic, payload, key, headers, delivery options) once the router has
rendered the route's templates. Provenance travels as headers with the names below: Kafka record
headers, MQTT 5 user properties, and LiveKit stream attributes.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

# Provenance header names (Kafka headers, MQTT 5 user properties, stream attributes).
H_ROOM = "lk-room"
H_ROOM_SID = "lk-room-sid"
H_PARTICIPANT = "lk-participant"
H_PARTICIPANT_SID = "lk-participant-sid"
H_TOPIC = "lk-topic"
H_KIND = "lk-kind"  # packet-reliable, packet-lossy, text-stream, byte-stream, data-track, ...
H_STREAM_ID = "lk-stream-id"
H_TRACK = "lk-track"  # data tracks: the track's name
H_TRACK_SID = "lk-track-sid"
H_USER_TIMESTAMP = "lk-user-timestamp"  # a data-track frame's user timestamp, when it has one
H_CONTENT_TYPE = "content-type"
H_TIMESTAMP = "lk-timestamp"  # milliseconds since the epoch, when the bridge received it
H_SOURCE = "roombus-source"  # the bridge endpoint a message came from (loop guard)


# Ids are a random per-process prefix and a counter: unique enough to correlate log lines,
# and without the cost of a uuid4 per message (an os.urandom call on the hot path).
_ID_PREFIX = uuid.uuid4().hex[:8]
_ids = itertools.count(1)


def new_id() -> str:
    """A short id for log correlation, unique within the process."""
    return f"{_ID_PREFIX}{next(_ids):08x}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message as a source produced it."""

    payload: bytes
    source: str  # the endpoint name, e.g. "mqtt:plant" or "room:lobby"
    topic: str  # MQTT topic, Kafka topic, or LiveKit topic
    key: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    reliable: bool = True
    received_at: float = field(default_factory=time.time)
    # The bus's own time of the message (a Kafka record's timestamp), when it has one: where
    # the end-to-end latency starts.
    sent_at: float | None = None
    id: str = field(default_factory=new_id)
    # MQTT: the publish's QoS and retain flag, and its message expiry (seconds) if any.
    qos: int = 0
    retain: bool = False
    expiry: float | None = None
    # Kafka: the record's partition ({partition} in templates).
    partition: int | None = None
    # Request/reply: where the answer goes and how to correlate it.
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message a sink is asked to publish.

    `payload=None` is a delete: a Kafka tombstone, or an empty retained MQTT message.
    """

    topic: str
    payload: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    qos: int = 1
    retain: bool = False
    message_expiry: int | None = None  # seconds (MQTT 5)
    response_topic: str | None = None
    correlation_data: bytes | None = None
