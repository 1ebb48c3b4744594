"""The YAML configuration: pydantic models, ``${...}`` interpolation, located errors.

`load_config(path)` reads and validates the whole file before any socket opens: YAML syntax,
types and ranges (pydantic, unknown keys refused), environment variables, references between
sections (a connector naming an MQTT broker that is not defined), and every template of every
connector against the placeholders its source provides. Every problem becomes one line of a
`ConfigError`:

    config.yaml:23: connectors[1].to.topic: unknown placeholder {rom} (known: room, topic)

String values may use ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` (environment) and
``${file:PATH}`` (a file's content, e.g. a Docker or Kubernetes secret); ``$${`` is a literal
``${``. `Config.secrets()` holds every value that must never be logged or echoed: those of the
secret fields (marked `SECRET`) and everything read through ``${file:...}``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.rules import RuleError, compile_where
from bridge.topics import Target, TemplateError, parse_filter, parse_name_pattern, parse_template

Path_ = tuple[str | int, ...]

# ``$${`` (an escaped ``${``), a ``${...}`` form, or an unterminated ``${``.
_ENV = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR = r"[A-Za-z_][A-Za-z0-9_]*"
_ENV_FORMS = re.compile(rf"(?P<name>{_VAR})(?:(?P<op>:-|:\?)(?P<arg>.*))?|file:(?P<file>.+)", re.S)
_ENV_HELP = "use ${VAR}, ${VAR:-default}, ${VAR:?message} or ${file:PATH}"


class _Secret:
    """Marks a field whose value is a secret: never logged, never echoed in errors."""

    def __repr__(self) -> str:
        return "SECRET"


SECRET = _Secret()


class ConfigError(Exception):
    """The configuration file is invalid; `problems` holds one line per problem.

    At most `MAX_PROBLEMS` are kept (a file of 200,000 duplicate keys is one mistake, not a
    report to print): a last line says how many more there were.
    """

    def __init__(self, problems: list[str]) -> None:
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS
            problems = [*problems[:MAX_PROBLEMS], f"... and {more} more problems"]
        super().__init__("\n".join(problems))
        self.problems = problems


MAX_PROBLEMS = 50
# Limits of the YAML loader: a configuration is small, and a malformed one must fail in
# milliseconds with a located message, not hang (an alias bomb) or crash (deep nesting).
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 64
MAX_NODES = 100_000  # after alias expansion
# libyaml when the PyYAML build has it (it does on the usual wheels): ~10x faster.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# livekit-server's default limits (limit.max_room_name_length, max_participant_identity_length):
# a longer name passes nothing but is refused on every join.
MAX_NAME_BYTES = 256


def _check_name(what: str, name: str) -> str:
    if not name:
        raise ValueError(f"{what} is empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(
            f"{what} of {len(name.encode())} bytes: livekit-server allows {MAX_NAME_BYTES}"
        )
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise ValueError(f"{what} {name!r} contains control characters")
    return name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- livekit


class E2EEConfig(_Model):
    """The shared key of end-to-end encrypted rooms (LiveKit E2EE; see docs/e2ee.md)."""

    shared_key: Annotated[str | None, SECRET] = Field(
        None,
        repr=False,
        description="The rooms' shared E2EE key as text (its UTF-8 bytes are the key, as"
        " KeyProviderOptions(shared_key=...) of the SDKs); from ${file:...} or ${VAR}",
    )
    shared_key_base64: Annotated[str | None, SECRET] = Field(
        None,
        repr=False,
        description="The shared key as base64, for a binary key (instead of shared_key)",
    )
    ratchet_salt: str = Field(
        "LKFrameEncryptionKey",
        min_length=1,
        description="The key provider's ratchet salt (salt of the key derivation); the SDKs'"
        " default",
    )
    key_derivation: Literal["pbkdf2", "hkdf"] = Field(
        "pbkdf2",
        description="How the AES key is derived from the shared key: pbkdf2 (the SDKs'"
        " default; PBKDF2-HMAC-SHA256, 100,000 iterations) or hkdf (HKDF-SHA256)",
    )

    @field_validator("shared_key")
    @classmethod
    def _text_key(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("is empty")
        return value

    @field_validator("shared_key_base64")
    @classmethod
    def _base64_key(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            key = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
        if not key:
            raise ValueError("is empty")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> E2EEConfig:
        if (self.shared_key is None) == (self.shared_key_base64 is None):
            raise ValueError("give shared_key or shared_key_base64 (one of them)")
        return self

    def key(self) -> bytes:
        """The shared key's bytes."""
        if self.shared_key is not None:
            return self.shared_key.encode("utf-8")
        assert self.shared_key_base64 is not None
        return base64.b64decode(self.shared_key_base64.strip())


class LiveKitConfig(_Model):
    """How the bridge joins LiveKit."""

    url: str = Field(description="LiveKit server URL: ws://, wss://, http:// or https://")
    api_key: str | None = Field(None, description="API key (with api_secret: tokens are minted)")
    api_secret: Annotated[str | None, SECRET] = Field(
        None, repr=False, description="API secret, at least 32 characters"
    )
    token: Annotated[str | None, SECRET] = Field(
        None, repr=False, description="A ready-made join token (one room only)"
    )
    identity: str = Field("roombus", description="The bridge participant's identity")
    name: str | None = Field(None, description="The bridge participant's display name")
    metadata: str | None = Field(None, description="The bridge participant's metadata")
    attributes: dict[str, str] = Field({}, description="The bridge participant's attributes")
    rooms: list[str] = Field([], description="Rooms to join by name")
    room_patterns: list[str] = Field(
        [], description="Globs: existing rooms that match are joined (found via the server API)"
    )
    room_discovery_interval: float = Field(
        30.0, gt=0, description="Seconds between checks for rooms matching room_patterns"
    )
    token_ttl: float = Field(
        900,
        gt=60,
        description="Lifetime in seconds of the join tokens the bridge mints (a fresh one for"
        " every join and rejoin: a short lifetime costs nothing)",
    )
    single_peer_connection: Literal["auto"] | bool = Field(
        "auto",
        description="One WebRTC connection per room (LiveKit's single peer connection mode,"
        " /rtc/v1) instead of two: one ICE agent per room, a third to a half less idle CPU"
        " (bench/idle_rooms_bench.py). auto: single, and two"
        " when the server does not offer it (livekit-server < 1.9.1 answers 404); true:"
        " single only (such a server refuses the join); false: always two",
    )
    turn_ca_file: str | None = Field(
        None,
        description="A PEM file of CA certificates trusted, besides the system's, for the"
        " certificates of turns: (TURN over TLS) servers the LiveKit server hands out; for a"
        " TURN server with a certificate from a private CA. The ROOMBUS_TURN_CA_FILE"
        " environment variable does the same when this is not set",
    )
    e2ee: E2EEConfig | None = Field(
        None,
        description="End-to-end encryption with a shared key, as the SDKs' E2EE, of data"
        " packets, streams, RPC and data-track frames in every room the bridge joins"
        " (docs/e2ee.md). Without it, encrypted packets are dropped and counted"
        " (rejected.encrypted)",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^(wss?|https?)://[^/\s]+", value):
            raise ValueError("expected ws://host:port, wss://, http:// or https://")
        return value

    @field_validator("turn_ca_file")
    @classmethod
    def _turn_ca_file(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=value)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load CA certificates from {value!r}: {exc}") from None
        return value

    @field_validator("api_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 32:
            raise ValueError("must be at least 32 characters (livekit-server refuses shorter)")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> LiveKitConfig:
        keyed = self.api_key is not None and self.api_secret is not None
        if (self.api_key is None) != (self.api_secret is None):
            raise ValueError("api_key and api_secret go together")
        if not keyed and self.token is None:
            raise ValueError("give api_key and api_secret, or a token")
        if self.room_patterns and not keyed:
            raise ValueError("room_patterns need api_key and api_secret (to list rooms)")
        if self.token is not None and len(self.rooms) + len(self.room_patterns) > 1:
            raise ValueError("a token is valid for one room: use api_key/api_secret for several")
        if not self.rooms and not self.room_patterns:
            raise ValueError("name at least one room in rooms or room_patterns")
        return self

    @field_validator("rooms")
    @classmethod
    def _room_names(cls, rooms: list[str]) -> list[str]:
        for room in rooms:
            _check_name("room name", room)
        return rooms

    @field_validator("identity")
    @classmethod
    def _identity(cls, identity: str) -> str:
        return _check_name("identity", identity)


# ----------------------------------------------------------------------------- buses


class TlsConfig(_Model):
    """TLS for a broker connection."""

    ca_file: str | None = Field(None, description="CA bundle to verify the server")
    cert_file: str | None = Field(None, description="Client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="Client private key (mutual TLS)")
    insecure: bool = Field(False, description="Skip server certificate verification (tests only)")

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        for attr in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, attr)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{attr} {value!r} is not a readable file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttBrokerConfig(_Model):
    """One MQTT broker connection."""

    host: str = Field(description="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="Broker port")
    protocol: Literal["5", "3.1.1"] = Field("5", description='MQTT version: "5" or "3.1.1"')
    client_id: str | None = Field(
        None, description="Client id (stable, for the persistent session); default roombus-NAME"
    )
    username: str | None = Field(None, description="User name")
    password: Annotated[str | None, SECRET] = Field(None, repr=False, description="Password")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent means plain TCP")
    keepalive: int = Field(30, ge=5, le=65535, description="Keep-alive in seconds")
    clean_start: bool = Field(
        False, description="Start a fresh session (loses messages queued while away)"
    )
    session_expiry: int = Field(
        3600, ge=0, description="MQTT 5 session expiry in seconds (queued messages kept that long)"
    )
    max_inflight: int = Field(100, ge=1, le=65535, description="Unacknowledged publishes at most")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        return {5: "5", 3.1: "3.1.1", "3.1.1": "3.1.1", "5": "5"}.get(value, value)

    @model_validator(mode="after")
    def _password_needs_user(self) -> MqttBrokerConfig:
        if self.password is not None and not self.username:
            raise ValueError("password: give a username too (MQTT sends no password without one)")
        return self


class SaslConfig(_Model):
    """SASL authentication for Kafka."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        description="SASL mechanism"
    )
    username: str = Field(description="SASL user name")
    password: Annotated[str, SECRET] = Field(repr=False, description="SASL password")


class KafkaClusterConfig(_Model):
    """One Kafka cluster."""

    bootstrap_servers: list[str] = Field(min_length=1, description="host:port of brokers")
    client_id: str = Field("roombus", description="Kafka client id")
    group_id: str = Field(
        "roombus", description="Prefix of the consumer groups of bus-to-room routes"
    )
    sasl: SaslConfig | None = Field(None, description="SASL authentication")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent means plaintext")
    acks: Literal["all", 1, 0] = Field("all", description='Producer acks: "all", 1 or 0')
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Producer compression"
    )
    max_request_size: int = Field(
        1_048_576, ge=1024, description="Largest record the producer sends, in bytes"
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: list[str]) -> list[str]:
        for server in value:
            if not re.fullmatch(r"[^:\s]+:\d{1,5}", server):
                raise ValueError(f"{server!r} is not host:port")
        return value

    @field_validator("acks", mode="before")
    @classmethod
    def _acks(cls, value: Any) -> Any:
        return {"1": 1, "0": 0, "-1": "all", -1: "all"}.get(value, value)


# ----------------------------------------------------------------------------- connectors

Format = Literal["raw", "json", "base64"]


# Request/reply header conventions of Kafka frameworks (reply-to header, correlation header):
# * Spring Kafka: KafkaHeaders.REPLY_TOPIC = "kafka_replyTopic", KafkaHeaders.CORRELATION_ID =
#   "kafka_correlationId" (spring-kafka reference, "Using ReplyingKafkaTemplate"). Spring's
#   default correlation id is 16 raw UUID bytes: our Kafka connector drops header values that
#   are not UTF-8, so Spring requesters must set a textual correlation id.
# * Zilla: "zilla:correlation-id" correlates request and response records (Zilla docs, "HTTP
#   Kafka Proxy", correlated request-response); the reply topic travels as "zilla:reply-to".
# * FastStream: "reply_to" and "correlation_id" (FastStream's Kafka message headers).
KAFKA_REPLY_PRESETS: dict[str, tuple[str, str]] = {
    "spring": ("kafka_replyTopic", "kafka_correlationId"),
    "zilla": ("zilla:reply-to", "zilla:correlation-id"),
    "faststream": ("reply_to", "correlation_id"),
}
DEFAULT_DEADLINE_HEADER = "rpc-deadline"


class MqttReply(_Model):
    """How MQTT requests say where their reply goes (bus-to-room RPC).

    Without `reply_topic` the MQTT 5 way: the request's Response Topic and Correlation Data
    properties (MQTT 5 brokers only). With `reply_topic` the MQTT 3.1.1 way (works on both): the
    request payload is a JSON object carrying the correlation id and the RPC payload in fields,
    and the reply, a JSON object too, goes to the rendered `reply_topic`.
    """

    reply_topic: str | None = Field(
        None, description="MQTT 3.1.1 style: reply topic template, e.g. devices/{device}/reply"
    )
    correlation_field: str = Field(
        "correlation_id", min_length=1, description="JSON field with the correlation id"
    )
    payload_field: str = Field(
        "payload", min_length=1, description="JSON field with the RPC payload (3.1.1 style)"
    )
    qos: Literal[0, 1, 2] = Field(1, description="QoS of the reply")
    deadline_header: str = Field(
        DEFAULT_DEADLINE_HEADER,
        description="User property (or JSON field) with an absolute deadline, epoch milliseconds",
    )


class KafkaReply(_Model):
    """How Kafka requests name their reply topic and correlation id (record headers)."""

    preset: Literal["spring", "zilla", "faststream", "custom"] = Field(
        "faststream", description="Header names of a framework's convention, or custom"
    )
    reply_to_header: str | None = Field(None, description="Header holding the reply topic")
    correlation_header: str | None = Field(None, description="Header holding the correlation id")
    deadline_header: str = Field(
        DEFAULT_DEADLINE_HEADER, description="Header with an absolute deadline, epoch milliseconds"
    )

    @model_validator(mode="after")
    def _names(self) -> KafkaReply:
        if self.preset == "custom" and (
            self.reply_to_header is None or self.correlation_header is None
        ):
            raise ValueError("preset custom needs reply_to_header and correlation_header")
        return self

    @property
    def header_names(self) -> tuple[str, str]:
        """(reply-to header, correlation header): the preset's, overridden where given."""
        reply, corr = KAFKA_REPLY_PRESETS.get(self.preset, ("", ""))
        return (self.reply_to_header or reply, self.correlation_header or corr)


class PacketFrom(_Model):
    """Data packets received in the room."""

    topic: str = Field(
        "*",
        description="Glob on the LiveKit topic, or a pattern with captures: command/{device}",
    )
    reliability: Literal["reliable", "lossy", "any"] = Field("any", description="Channel")


class TextStreamFrom(_Model):
    """Text streams received in the room."""

    topic: str = Field("*", description="Glob on the stream topic")
    mode: Literal["whole", "incremental"] = Field(
        "whole", description="One message per stream, or one per chunk as it arrives"
    )


class ByteStreamFrom(_Model):
    """Byte streams (files) received in the room."""

    topic: str = Field("*", description="Glob on the stream topic")
    oversize: Literal["chunk", "reject"] = Field(
        "chunk", description="Above max_message_bytes: ordered chunk messages, or reject"
    )
    max_message_bytes: int = Field(
        1_000_000, ge=1024, description="Largest single bus message for a stream"
    )


class DataTrackFrom(_Model):
    """Frames of the data tracks other participants publish (lossy; docs/data-tracks.md)."""

    name: str = Field("*", description="Glob on the track name, e.g. telemetry-*")


class AttributesFrom(_Model):
    """Participant attribute changes (one message per changed key)."""

    keys: str = Field("*", description="Glob on attribute keys")


class NothingMore(_Model):
    """No options."""


# The room events an `events` route can carry (bridge.runtime.room_activity).
RoomEventKind = Literal[
    "room_started",
    "room_finished",
    "participant_joined",
    "participant_left",
    "track_published",
    "track_unpublished",
]
ROOM_EVENT_KINDS: tuple[str, ...] = get_args(RoomEventKind)


class EventsFrom(_Model):
    """Room events as JSON: room started/finished, participant joined/left, track (un)published."""

    kinds: list[RoomEventKind] = Field(
        default_factory=lambda: list(get_args(RoomEventKind)),
        min_length=1,
        description="Which events to publish (default: all of them)",
    )


class RpcFrom(_Model):
    """RPC calls made to the bridge participant, turned into bus requests (room to bus)."""

    methods: list[str] = Field(
        min_length=1, description="Method names or globs the bridge serves, e.g. bus.*"
    )
    reply_topic: str = Field(
        description="Where bus replies come back: an MQTT topic the bridge subscribes to, or "
        "a Kafka topic it reads"
    )
    timeout: float = Field(
        10.0, gt=0, le=600, description="Seconds to wait for the bus reply (then 1502)"
    )
    max_in_flight: int = Field(256, ge=1, le=100_000, description="Calls waiting at most")
    kafka_reply: KafkaReply = Field(
        KafkaReply(), description="Kafka: header names of the request (reply-to, correlation)"
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        for method in value:
            if not method or len(method.encode()) > 64:
                raise ValueError(f"method {method!r}: RPC method names are 1-64 bytes")
        return value


class RoomFrom(_Model):
    """Traffic of LiveKit rooms: exactly one of the kinds below."""

    room: str = Field(
        "*", description="Glob on room names, with captures for the templates: plant-{site}"
    )
    participant: str = Field(
        "*", description="Glob on the sender's identity, with captures: device-{device}"
    )
    packet: PacketFrom | None = None
    text_stream: TextStreamFrom | None = None
    byte_stream: ByteStreamFrom | None = None
    data_track: DataTrackFrom | None = Field(
        None, description="Frames of remote data tracks (subscribed as they are published)"
    )
    attributes: AttributesFrom | None = None
    metadata: NothingMore | None = Field(None, description="Participant metadata changes")
    room_metadata: NothingMore | None = Field(None, description="Room metadata changes")
    presence: NothingMore | None = Field(None, description="Participants joining and leaving")
    events: EventsFrom | None = Field(
        None, description="Room, participant and track events as JSON, in order per room"
    )
    rpc: RpcFrom | None = Field(None, description="RPC calls to the bridge, as bus requests")

    @property
    def kind(self) -> str:
        """Which kind of room traffic this is."""
        return next(k for k in ROOM_KINDS if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _one_kind(self) -> RoomFrom:
        given = [k for k in ROOM_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(ROOM_KINDS)} (got {len(given)})")
        return self


ROOM_KINDS = (
    "packet",
    "text_stream",
    "byte_stream",
    "data_track",
    "attributes",
    "metadata",
    "room_metadata",
    "presence",
    "events",
    "rpc",
)


class MqttFrom(_Model):
    """Messages of an MQTT subscription."""

    mqtt: str = Field(description="Name of a broker under `mqtt:`")
    topic: str = Field(description="Filter, with named captures: devices/{site}/{device}/data")
    qos: Literal[0, 1, 2] = Field(1, description="Subscription QoS (1 or 2 for at-least-once)")
    format: Format = Field("raw", description="Payload encoding on the bus")
    reply: MqttReply | None = Field(
        None, description="Request/reply convention (only with an rpc target; default MQTT 5)"
    )


class KafkaFrom(_Model):
    """Records of Kafka topics, read in a consumer group."""

    kafka: str = Field(description="Name of a cluster under `kafka:`")
    topics: list[str] = Field(min_length=1, description="Topics to consume")
    group_id: str | None = Field(
        None, description="Consumer group (default: the cluster's group_id + '.' + connector name)"
    )
    format: Format = Field("raw", description="Payload encoding on the bus")
    max_in_flight: int = Field(1000, ge=1, description="Unacknowledged records at most")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "latest",
        description="Where a consumer group without committed offsets starts: latest (the end:"
        " only what is produced after the bridge first joined) or earliest (what the topics"
        " still hold)",
    )
    reply: KafkaReply | None = Field(
        None, description="Request/reply headers (only with an rpc target; default faststream)"
    )


class MqttTo(_Model):
    """Publish to MQTT."""

    mqtt: str = Field(description="Name of a broker under `mqtt:`")
    topic: str = Field(description="Topic template, e.g. rooms/{room}/{participant}/{topic}")
    qos: Literal[0, 1, 2] = Field(1, description="Publish QoS")
    retain: bool = Field(False, description="Retain (state topics; cleared on leave)")
    format: Format = Field("raw", description="Payload encoding on the bus")


class KafkaTo(_Model):
    """Produce to Kafka."""

    kafka: str = Field(description="Name of a cluster under `kafka:`")
    topic: str = Field(description="Topic template, e.g. livekit.{room}")
    key: str | None = Field(None, description="Key template, e.g. {room}/{participant}")
    headers: dict[str, str] = Field({}, description="Extra header templates")
    format: Format = Field("raw", description="Payload encoding on the bus")


class PacketTo(_Model):
    """Send as a data packet."""

    topic: str | None = Field(None, description="LiveKit topic template")
    reliable: bool = Field(True, description="Reliable or lossy channel")
    destinations: list[str] = Field([], description="Identity templates; empty: whole room")
    oversize: Literal["byte_stream", "reject"] = Field(
        "byte_stream", description="Above the packet limit: send as a byte stream, or reject"
    )


class TextStreamTo(_Model):
    """Send as a text stream."""

    topic: str = Field(description="LiveKit topic template")
    destinations: list[str] = Field([], description="Identity templates; empty: whole room")
    attributes: dict[str, str] = Field({}, description="Stream attribute templates")


class ByteStreamTo(_Model):
    """Send as a byte stream."""

    topic: str = Field(description="LiveKit topic template")
    name: str = Field("message", description="File name template")
    mime_type: str = Field("application/octet-stream", description="MIME type")
    destinations: list[str] = Field([], description="Identity templates; empty: whole room")


class DataTrackTo(_Model):
    """Push a frame on a data track the bridge publishes (lossy, at most once)."""

    name: str = Field(
        description="Track name template, e.g. telemetry-{device}: each name is published on"
        " first use and kept (again after a rejoin)"
    )


class AttributeTo(_Model):
    """Set an attribute of the bridge participant (payload = value; empty deletes)."""

    key: str = Field(description="Attribute key template")


class ParticipantAttributeTo(_Model):
    """Set another participant's attribute through the server API."""

    identity: str = Field(description="Identity template")
    key: str = Field(description="Attribute key template")


class RpcTo(_Model):
    """Call an RPC method of a participant; the answer goes back on the bus (bus to room)."""

    destination: str = Field(description="Identity template of the callee, e.g. {device}")
    method: str = Field(description="Method name template, e.g. {header.method}")
    timeout: float = Field(
        10.0, gt=0, le=600, description="Seconds; the request's own expiry/deadline may cut it"
    )
    max_in_flight: int = Field(256, ge=1, le=100_000, description="Concurrent calls at most")
    max_request_bytes: int = Field(
        15_360, ge=1, description="Larger request payloads get error 1402 (LiveKit v1 limit)"
    )
    max_response_bytes: int = Field(
        15_360, ge=1, description="Larger responses get error 1504 instead"
    )


class RoomTo(_Model):
    """Deliver into a LiveKit room: exactly one of the kinds below."""

    room: str = Field(description="Room name template (the room must be one the bridge joins)")
    packet: PacketTo | None = None
    text_stream: TextStreamTo | None = None
    byte_stream: ByteStreamTo | None = None
    data_track: DataTrackTo | None = None
    attribute: AttributeTo | None = None
    room_metadata: NothingMore | None = Field(None, description="Payload becomes room metadata")
    participant_attribute: ParticipantAttributeTo | None = None
    rpc: RpcTo | None = None

    @property
    def kind(self) -> str:
        """Which kind of delivery this is."""
        return next(k for k in ROOM_TO_KINDS if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _one_kind(self) -> RoomTo:
        given = [k for k in ROOM_TO_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(ROOM_TO_KINDS)} (got {len(given)})")
        return self


ROOM_TO_KINDS = (
    "packet",
    "text_stream",
    "byte_stream",
    "data_track",
    "attribute",
    "room_metadata",
    "participant_attribute",
    "rpc",
)


def _endpoint_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in ("mqtt", "kafka", "room"):
            if key in value:
                return key
    if isinstance(value, BaseModel):
        return {MqttFrom: "mqtt", KafkaFrom: "kafka", RoomFrom: "room"}.get(
            type(value), {MqttTo: "mqtt", KafkaTo: "kafka", RoomTo: "room"}.get(type(value))
        )
    return None


_ENDPOINT_HELP = "an endpoint with one of the keys mqtt, kafka or room"
From = Annotated[
    Annotated[MqttFrom, Tag("mqtt")]
    | Annotated[KafkaFrom, Tag("kafka")]
    | Annotated[RoomFrom, Tag("room")],
    Discriminator(_endpoint_tag, custom_error_type="endpoint", custom_error_message=_ENDPOINT_HELP),
]
To = Annotated[
    Annotated[MqttTo, Tag("mqtt")]
    | Annotated[KafkaTo, Tag("kafka")]
    | Annotated[RoomTo, Tag("room")],
    Discriminator(_endpoint_tag, custom_error_type="endpoint", custom_error_message=_ENDPOINT_HELP),
]
BusTo = Annotated[
    Annotated[MqttTo, Tag("mqtt")] | Annotated[KafkaTo, Tag("kafka")],
    Discriminator(
        _endpoint_tag,
        custom_error_type="endpoint",
        custom_error_message="a bus endpoint with one of the keys mqtt or kafka",
    ),
]


class RateLimit(_Model):
    """A connector's rate limit: a token bucket per key (`bridge.runtime.ratelimit`)."""

    max: float = Field(
        gt=0, le=1_000_000, description="Messages per second per key (0.2: one every 5 s)"
    )
    burst: int = Field(
        1, ge=1, le=100_000, description="Messages a key may send at once after a quiet spell"
    )
    key: str | None = Field(
        None,
        description="Template over the route's placeholders naming the key, e.g."
        " '{participant}/{key}'; default: one key for the whole route",
    )
    policy: Literal["latest", "drop_oldest", "drop_newest"] = Field(
        "latest",
        description="Over the rate: latest (hold one message per key, a newer one replaces it,"
        " sent when the rate allows: counted coalesced), drop_oldest (hold up to `queue`"
        " messages per key, sent in order; the oldest dropped when full), drop_newest (drop"
        " the message). Dropped ones are counted dropped.rate_limited",
    )
    queue: int = Field(100, ge=1, le=100_000, description="drop_oldest: messages held per key")
    max_keys: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Keys tracked at once; the least recently used idle one is forgotten",
    )


class LatchSettings(_Model):
    """The last values a latched bus-to-room route keeps for late joiners."""

    max_keys: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Bus topics (per room) kept; the least recently updated is evicted",
    )


ParticipantKind = Literal["standard", "agent", "sip", "egress", "ingress"]


class ParticipantCondition(_Model):
    """A condition on a participant (`bridge.rules`): every key given must match."""

    identity: str | None = Field(None, min_length=1, description="Glob on the identity")
    kind: list[ParticipantKind] | None = Field(
        None, description="LiveKit's participant kind, or a list of kinds"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="Attribute key -> glob on its value ('' when unset)"
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _one_kind(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _something(self) -> ParticipantCondition:
        if self.identity is None and self.kind is None and not self.attributes:
            raise ValueError("a condition needs identity, kind or attributes")
        return self


Latched = Annotated[
    Annotated[bool, Tag("bool")] | Annotated[LatchSettings, Tag("settings")],
    Discriminator(lambda v: "settings" if isinstance(v, (dict, LatchSettings)) else "bool"),
]


class ConnectorConfig(_Model):
    """One route: from a room to a bus, or from a bus to a room."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(description="Unique name, used in logs and metrics")
    from_: From = Field(alias="from", description="Where messages come from")
    to: To = Field(description="Where they go")
    dead_letter: BusTo | None = Field(
        None,
        description="Where messages that can never be delivered go, with the reason in the"
        " roombus-error headers",
    )
    on_reject: Literal["dead_letter", "drop", "hold"] | None = Field(
        None,
        description="A message that can never be delivered (bad payload or template value, too"
        " large, refused by LiveKit or the broker): dead_letter (send it to `dead_letter`, then"
        " acknowledge it), drop (count it, log it, acknowledge it), or hold (never acknowledge"
        " it: the bus keeps it, and it withholds every later acknowledgement of its MQTT"
        " connection or Kafka partition). Default: dead_letter when `dead_letter` is set,"
        " otherwise drop",
    )
    rate: RateLimit | None = Field(
        None,
        description="At most `max` messages per second per key, the rest coalesced or dropped"
        " by `policy` (see Connectors: rate limits)",
    )
    latched: Latched = Field(
        False,
        description="Bus to room, packet targets: keep the last value per bus topic (MQTT"
        " topic, Kafka topic and key) and send it to each participant that joins later,"
        " addressed to it. true, or {max_keys: N}",
    )
    map: dict[str, str] | None = Field(
        None,
        description="Replace the payload by a JSON object built from templates: output field"
        " name -> template, e.g. {id: '{payload.device_id}', site: '{site}'}; a value that is"
        " exactly one {payload.x} reference copies that JSON value as is, any other value is a"
        " string",
    )
    where: str | None = Field(
        None,
        description="Filter: a CEL expression over the route's placeholders (strings),"
        " `headers` (map) and `payload` (the JSON payload), e.g. 'payload.temp > 30 && device"
        ' == "d7"\'; messages for which it is not true are counted filtered and acknowledged',
    )
    allow: list[ParticipantCondition] = Field(
        default_factory=list,
        description="Only participants matching one of these conditions: the sender (from a"
        " room) or the destination identities (to a room)",
    )
    deny: list[ParticipantCondition] = Field(
        default_factory=list,
        description="Never participants matching one of these conditions (checked before"
        " `allow`); denied messages are counted denied",
    )

    @model_validator(mode="after")
    def _directions(self) -> ConnectorConfig:
        from_room = isinstance(self.from_, RoomFrom)
        to_room = isinstance(self.to, RoomTo)
        if from_room == to_room:
            raise ValueError(
                "a connector goes from a room to a bus (mqtt/kafka) or from a bus to a room"
            )
        if self.on_reject == "dead_letter" and self.dead_letter is None:
            raise ValueError("on_reject: dead_letter needs a `dead_letter` destination")
        if self.on_reject == "hold" and from_room:
            raise ValueError(
                "on_reject: hold needs a bus source: a room cannot keep a message for later"
            )
        return self

    @property
    def reject_policy(self) -> Literal["dead_letter", "drop", "hold"]:
        """`on_reject`, with its default resolved."""
        if self.on_reject is not None:
            return self.on_reject
        return "dead_letter" if self.dead_letter is not None else "drop"

    @property
    def latch(self) -> LatchSettings | None:
        """`latched` as settings, None when the route is not latched."""
        if self.latched is True:
            return LatchSettings()
        return self.latched or None


class SpoolSettings(_Model):
    """The durable buffer of room-to-bus routes."""

    directory: str | None = Field(
        None, description="Directory of the spool file (spool.sqlite3); default: bridge.state_dir"
    )
    max_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Bytes spooled at most, over all routes"
    )
    max_age: float | None = Field(
        None, gt=0, description="Seconds a spooled message is kept at most (then counted expired)"
    )


class ReplicasSettings(_Model):
    """Replicas of one configuration sharing its rooms, one owner per room at a time.

    Rooms hash onto the partitions of a control topic, and Kafka's consumer-group protocol
    assigns the partitions to the replicas (docs/scaling.md).
    """

    kafka: str = Field(description="Name of a cluster under `kafka:` whose group protocol assigns")
    group_id: str | None = Field(
        None,
        min_length=1,
        description="Consumer group of the replicas (default: the cluster's group_id +"
        " '.replicas'); replicas of one deployment share it",
    )
    control_topic: str = Field(
        "roombus.rooms",
        pattern=r"^[A-Za-z0-9._-]{1,249}$",
        description="Topic whose partitions the rooms hash onto (created if missing; nothing"
        " is written to it)",
    )
    partitions: int = Field(
        12,
        ge=1,
        le=10_000,
        description="Partitions of a control topic the bridge creates: the most replicas that"
        " get rooms (an existing topic keeps its count)",
    )
    replication_factor: int | None = Field(
        None,
        ge=1,
        description="Replication of a control topic the bridge creates (default: the"
        " number of brokers, at most 3)",
    )
    session_timeout: float = Field(
        10.0,
        ge=1,
        le=300,
        description="Seconds without a heartbeat before Kafka gives a replica's rooms to the"
        " others (bounds the takeover after a crash)",
    )
    heartbeat_interval: float = Field(
        3.0, gt=0, description="Seconds between heartbeats (below a third of session_timeout)"
    )
    identity: str = Field(
        "{identity}-{room}",
        min_length=1,
        description="The bridge's identity in each room ({identity}: livekit.identity, {room}):"
        " the same on every replica, so LiveKit evicts a second owner (DUPLICATE_IDENTITY)",
    )
    replica_id: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="This replica's name (MQTT client ids get it as a suffix, logs and the"
        " roombus.replica attribute show it); default: host name and process id. Set a stable"
        " one (a StatefulSet pod name) to keep MQTT sessions across restarts",
    )
    handover_timeout: float = Field(
        10.0,
        ge=0,
        description="Seconds a new owner waits for the previous owner's participant to leave"
        " the room before joining (and evicting it)",
    )
    evicted_backoff: float = Field(
        10.0,
        ge=0,
        description="Seconds a replica evicted by another owner (DUPLICATE_IDENTITY) waits"
        " before it rejoins, and only if the group still gives it the room",
    )
    handover_overlap: float = Field(
        5.0,
        ge=0,
        description="Seconds a releasing owner (SIGTERM, or a room assigned elsewhere) keeps"
        " its bus subscriptions and delivers while the new owner subscribes: no acknowledged"
        " bus-to-room message is lost, those of the overlap may arrive twice. At most the"
        " shutdown_timeout and half the handover_timeout (when set); above 2 heartbeat"
        " intervals for the rebalance to reach the others",
    )

    def effective_overlap(self, shutdown_timeout: float) -> float:
        """`handover_overlap`, bounded by the shutdown and the new owners' handover wait."""
        bound = min(self.handover_overlap, shutdown_timeout)
        if self.handover_timeout > 0:
            bound = min(bound, self.handover_timeout / 2)
        return bound

    @model_validator(mode="after")
    def _heartbeat(self) -> ReplicasSettings:
        if self.heartbeat_interval * 3 > self.session_timeout:
            raise ValueError("heartbeat_interval must be at most a third of session_timeout")
        fields = set(_PLACEHOLDER.findall(self.identity))
        if "room" not in fields or fields - {"room", "identity"}:
            raise ValueError("identity must use {room} (and may use {identity}), nothing else")
        return self


class BridgeSettings(_Model):
    """Runtime settings."""

    shutdown_timeout: float = Field(
        10.0, gt=0, description="Seconds to drain in-flight messages on SIGTERM"
    )
    queue_size: int = Field(
        10_000,
        ge=1,
        description="Messages buffered in memory per room-to-bus connector (without a spool)",
    )
    overflow: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_newest",
        description="A room-to-bus connector's buffer (queue or spool) is full: drop the oldest"
        " or the newest message (counted as dropped, reason overflow). LiveKit cannot be paused,"
        " so there is no blocking policy: configure `spool` for a large durable buffer",
    )

    @field_validator("overflow", mode="before")
    @classmethod
    def _no_block(cls, value: object) -> object:
        if value == "block":
            raise ValueError(
                "overflow: block was removed: LiveKit cannot be paused, so blocking stalled the"
                " room's events; configure bridge.spool for a large durable buffer, with"
                " drop_oldest or drop_newest at its limit"
            )
        return value

    spool: SpoolSettings | None = Field(
        None,
        description="Spool room-to-bus messages to disk before they count as received: kept"
        " across bus outages, restarts and crashes, removed once the broker acknowledged them",
    )
    max_in_flight: int = Field(
        256, ge=1, le=100_000, description="Bus-to-room deliveries in progress per bus source"
    )
    publish_window: int = Field(
        64, ge=1, le=10_000, description="Room-to-bus publishes awaiting the broker, per connector"
    )
    http_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve metrics, health, status and the status page on this port"
        " (``health_port``: its old name, deprecated)",
    )
    http_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the HTTP port binds to (0.0.0.0 or :: for probes from outside)",
    )

    @model_validator(mode="before")
    @classmethod
    def _health_port_alias(cls, data: Any) -> Any:
        # health_port was the key's name until http_port: keep old files working, say so.
        if isinstance(data, dict) and "health_port" in data:
            data = dict(data)
            old = data.pop("health_port")
            if "http_port" in data:
                raise ValueError("give bridge.http_port only (health_port is its old name)")
            data["http_port"] = old
            logging.getLogger("roombus.config").warning(
                "config: bridge.health_port is deprecated; call it bridge.http_port"
            )
        return data

    state_dir: str | None = Field(
        None,
        description="Directory for durable state (the RPC reply cache, rpc-replies.sqlite3); "
        "without it the cache lives in memory and is lost on restart",
    )
    rpc_dedup_window: float = Field(
        600.0, gt=0, description="Seconds a bus request's reply is kept to answer redeliveries"
    )
    rpc_dedup_max_entries: int = Field(
        100_000, ge=1, description="Cached RPC replies at most (oldest evicted first)"
    )
    replicas: ReplicasSettings | None = Field(
        None,
        description="Run as one of several replicas that share the rooms, one owner per room"
        " (docs/scaling.md); without it the process bridges every room itself",
    )


class Config(_Model):
    """The whole configuration file."""

    livekit: LiveKitConfig
    mqtt: dict[str, MqttBrokerConfig] = Field({}, description="MQTT brokers by name")
    kafka: dict[str, KafkaClusterConfig] = Field({}, description="Kafka clusters by name")
    connectors: list[ConnectorConfig] = Field(min_length=1, description="The routes")
    bridge: BridgeSettings = Field(BridgeSettings(), description="Runtime settings")

    # What ``${file:...}`` read (set by `parse_config`): secrets whatever field they landed in.
    _file_secrets: frozenset[str] = PrivateAttr(frozenset())

    def secrets(self) -> frozenset[str]:
        """Every secret of the configuration: values of `SECRET` fields and of ``${file:...}``."""
        dumped = self.model_dump(by_alias=True)
        return frozenset(_secret_values(Config, dumped)) | self._file_secrets


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The model classes inside a field's type (through Optional, list, dict, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            yield from _models(arg)


def _secret_values(model: type[BaseModel], data: Any) -> Iterator[str]:
    """The values of `SECRET` fields in `data`: raw (unvalidated) or dumped data of `model`."""
    if not isinstance(data, dict):
        return
    for name, info in model.model_fields.items():
        value = data.get(info.alias or name, data.get(name))
        if value is None:
            continue
        if SECRET in info.metadata:
            if isinstance(value, str) and value:
                yield value
            continue
        items = (
            value.values()
            if isinstance(value, dict) and get_origin(info.annotation) is dict
            else value
            if isinstance(value, list)
            else [value]
        )
        for sub in _models(info.annotation):
            for item in items:
                yield from _secret_values(sub, item)


def secret_field_names() -> frozenset[str]:
    """The names of the `SECRET` fields of every model (to keep their values out of errors)."""
    names: set[str] = set()
    todo: list[type[BaseModel]] = [Config]
    seen: set[type[BaseModel]] = set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            if SECRET in info.metadata:
                names.add(name)
            todo.extend(_models(info.annotation))
    return frozenset(names)


# ----------------------------------------------------------------------------- loading


class _Located:
    """A YAML document as plain data, plus the line of every key path."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines: dict[Path_, int] = {}
        self.problems: list[str] = []
        self.secrets: set[str] = set()  # what ${file:...} read
        if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES} bytes: not a config"])
        loader = None
        try:
            self._check_shape(text)
            loader = _Loader(text)
            node = loader.get_single_node()
        except yaml.reader.ReaderError as exc:
            # A character YAML does not allow (NUL, other control characters).
            line = text.count("\n", 0, exc.position) + 1
            raise ConfigError(
                [f"{source}:{line}: invalid YAML: character {exc.character:#06x} is not allowed"]
            ) from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError([f"{where}: invalid YAML: {problem}"]) from exc
        finally:
            if loader is not None:
                loader.dispose()
        self.data = self._convert(node, (), loader) if node is not None else None

    def _check_shape(self, text: str) -> None:
        """Refuse nesting deeper than MAX_NESTING and more than MAX_NODES after aliases.

        One pass over the parser's events (iterative: no recursion to overflow), before a
        node tree is built: an alias counts the nodes of what it refers to.
        """
        loader = _Loader(text)
        sizes: dict[str, int] = {}  # anchor -> nodes under it, itself included
        stack: list[tuple[int, str | None]] = []  # (nodes so far, anchor) per open collection
        total = 0
        try:
            while (event := loader.get_event()) is not None:
                if isinstance(event, yaml.StreamEndEvent):
                    break
                if isinstance(event, yaml.CollectionStartEvent):
                    if len(stack) >= MAX_NESTING:
                        where = self._where(event)
                        raise ConfigError([f"{where}: nested deeper than {MAX_NESTING} levels"])
                    stack.append((0, event.anchor))
                    continue
                if isinstance(event, yaml.CollectionEndEvent):
                    count, anchor = stack.pop()
                    size = count + 1
                    if anchor is not None:
                        sizes[anchor] = size
                elif isinstance(event, yaml.ScalarEvent):
                    size = 1
                    if event.anchor is not None:
                        sizes[event.anchor] = 1
                elif isinstance(event, yaml.AliasEvent):
                    size = sizes.get(event.anchor or "", 1)
                else:
                    continue
                if stack:
                    count, anchor = stack[-1]
                    stack[-1] = (count + size, anchor)
                else:
                    total += size
                if total + sum(c for c, _ in stack) > MAX_NODES:
                    raise ConfigError(
                        [
                            f"{self._where(event)}: more than {MAX_NODES} values (counting"
                            " what aliases repeat): not a configuration"
                        ]
                    )
        finally:
            loader.dispose()

    def _where(self, event: yaml.Event) -> str:
        mark = event.start_mark
        return f"{self.source}:{mark.line + 1}" if mark is not None else self.source

    def _convert(self, node: yaml.Node, path: Path_, loader: yaml.SafeLoader) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.append(f"{self.at(path)}: keys must be plain strings")
                    continue
                key = str(key_node.value)
                if key == "<<":
                    self.problems.append(f"{self.at(path)}: YAML merge keys are not supported")
                    continue
                if key in out:
                    self.lines[(*path, key)] = key_node.start_mark.line + 1
                    self.problems.append(f"{self.at((*path, key))}: duplicate key {key!r}")
                    continue
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self._convert(value_node, (*path, key), loader)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(item, (*path, i), loader) for i, item in enumerate(node.value)]
        try:
            value = loader.construct_object(node, deep=True)
        except (ValueError, yaml.YAMLError) as exc:
            # e.g. an integer of 5,000 digits (Python's int-from-string limit)
            self.problems.append(f"{self.at(path)}: unreadable value: {exc}")
            return None
        if isinstance(value, str):
            return self._interpolate(value, path)
        return value

    def _interpolate(self, value: str, path: Path_) -> str:
        def replace(match: re.Match[str]) -> str:
            text = match.group(0)
            if text == "$${":
                return "${"
            body = match.group(1)
            form = _ENV_FORMS.fullmatch(body) if body is not None else None
            if form is None or "${" in (form.group("arg") or ""):
                shown = text if body is not None else "${ (no closing brace)"
                self.problems.append(
                    f"{self.at(path)}: unsupported interpolation {shown}; {_ENV_HELP}"
                )
                return ""
            if form.group("file") is not None:
                return self._read_secret(form.group("file"), path)
            name, op, arg = form.group("name", "op", "arg")
            found = os.environ.get(name)
            if op == ":-":
                return found if found else arg
            if op == ":?" and not found:
                why = f": {arg}" if arg else ""
                self.problems.append(
                    f"{self.at(path)}: environment variable {name} is not set or empty{why}"
                )
                return ""
            if found is None:
                self.problems.append(
                    f"{self.at(path)}: environment variable {name} is not set "
                    f"(use ${{{name}:-default}} for a default)"
                )
                return ""
            return found

        return _ENV.sub(replace, value)

    def _read_secret(self, name: str, path: Path_) -> str:
        # The content is a secret: the error names the file, never what it holds.
        try:
            content = Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            self.problems.append(f"{self.at(path)}: cannot read ${{file:{name}}}: {why}")
            return ""
        except UnicodeDecodeError:
            self.problems.append(f"{self.at(path)}: ${{file:{name}}} is not UTF-8 text")
            return ""
        # Files written by editors and `echo` end in a newline that is not part of the secret.
        content = content.removesuffix("\n")
        if content:
            self.secrets.add(content)
        return content

    def line(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor present in the file."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def at(self, path: Path_) -> str:
        """``file:line: key.path`` for messages."""
        line = self.line(path)
        where = f"{self.source}:{line}" if line else self.source
        return f"{where}: {format_path(path)}" if path else where


def format_path(path: Path_) -> str:
    """``connectors[1].to.topic`` from ``("connectors", 1, "to", "topic")``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


_TAGS = {"mqtt", "kafka", "room"}


def _pydantic_problems(exc: ValidationError, doc: _Located) -> list[str]:
    problems = []
    hidden = secret_field_names()
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        path = _strip_tags(loc)
        if any(part in hidden for part in loc):
            error["input"] = _HIDDEN
        message = error["msg"]
        if error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and its section)"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        expected = _expected(error)
        problems.append(f"{doc.at(path)}: {message}{expected}")
    return problems


def _strip_tags(loc: tuple[Any, ...]) -> Path_:
    path: list[str | int] = []
    for i, part in enumerate(loc):
        if part == "from_":
            part = "from"
        # Tags of the endpoint unions sit right after from/to/dead_letter in pydantic's locations.
        if (
            isinstance(part, str)
            and part in _TAGS
            and i > 0
            and loc[i - 1] in ("from", "from_", "to", "dead_letter")
        ):
            continue
        if part in ("bool", "settings") and i > 0 and loc[i - 1] == "latched":
            continue  # the tags of `Latched`
        path.append(part)
    return tuple(path)


_HIDDEN = object()  # the input of a secret field: never shown


def _expected(error: Any) -> str:
    if error["type"] in ("missing", "extra_forbidden", "value_error", "endpoint"):
        return ""
    input_value = error.get("input")
    if input_value is _HIDDEN:
        return " (value not shown: a secret)"
    if isinstance(input_value, (str, int, float, bool)) or input_value is None:
        shown = repr(input_value)
        return f" (got {shown[:60]})"
    return f" (got a {type(input_value).__name__})"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file completely; raise `ConfigError` listing problems."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc.reason}"]) from exc
    return parse_config(text, source)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate configuration text (see `load_config`)."""
    doc = _Located(source, text)
    # Secret fields' inputs are never shown (`_pydantic_problems`); what ${file:...} read can be
    # in any field, so it is redacted from every problem.
    secrets = doc.secrets
    if doc.problems:
        raise ConfigError(redact_all(doc.problems, secrets))
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{source}:1: the file must be a mapping with livekit and connectors"])
    try:
        config = Config.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(redact_all(_pydantic_problems(exc, doc), secrets)) from exc
    config._file_secrets = frozenset(doc.secrets)
    problems = [f"{doc.at(p)}: {m}" for p, m in check_references(config)]
    if problems:
        raise ConfigError(redact_all(problems, secrets))
    return config


REDACTED = "***"
MIN_SECRET_LENGTH = 4  # shorter "secrets" would blank out ordinary words and digits


def redact_all(lines: list[str], secrets: set[str] | frozenset[str]) -> list[str]:
    """`lines` with every secret (of `MIN_SECRET_LENGTH` characters or more) replaced by ***."""
    pattern = secrets_pattern(secrets)
    if pattern is None:
        return lines
    return [pattern.sub(REDACTED, line) for line in lines]


def secrets_pattern(secrets: set[str] | frozenset[str]) -> re.Pattern[str] | None:
    """One regex matching every secret worth redacting, longest first; None if there is none."""
    worth = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
    if not worth:
        return None
    return re.compile("|".join(re.escape(s) for s in worth))


# ----------------------------------------------------------------------------- cross checks

ROOM_SOURCE_PLACEHOLDERS = ("room", "room_sid", "participant", "participant_sid", "kind")
ROOM_KIND_PLACEHOLDERS = {
    "packet": ("topic",),
    "text_stream": ("topic", "stream_id"),
    "byte_stream": ("topic", "stream_id", "name", "mime_type"),
    "data_track": ("track", "track_sid"),
    "attributes": ("key",),
    "metadata": (),
    "room_metadata": (),
    "presence": ("event",),
    "events": ("event", "participant_kind", "track_sid"),
    "rpc": ("method", "request_id"),
}
# Dynamic placeholders of bus-to-room RPC routes: a request header (Kafka header, MQTT 5 user
# property) by name, and a top-level field of a JSON request (MQTT 3.1.1 convention).
HEADER_PREFIX = "header."
FIELD_PREFIX = "field."
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# A field of a JSON payload, every direction: {payload.device_id}, {payload.pos.x},
# {payload.items.0} (a digit-only step indexes a list).
PAYLOAD_PREFIX = "payload."
_PAYLOAD_REF = re.compile(r"payload(?:\.[A-Za-z0-9_-]+)+")


def name_captures(source: RoomFrom) -> tuple[str, ...]:
    """The captures of a room route's `room` and `participant` patterns (plant-{site})."""
    out: tuple[str, ...] = ()
    for pattern in (source.room, source.participant):
        if "{" in pattern:
            out += parse_name_pattern(pattern).captures
    return out


def placeholders(source: MqttFrom | KafkaFrom | RoomFrom) -> tuple[str, ...]:
    """The placeholders a route's templates may use, given where its messages come from."""
    if isinstance(source, RoomFrom):
        topic = getattr(getattr(source, source.kind), "topic", None)
        captures = parse_filter(topic).captures if isinstance(topic, str) and "{" in topic else ()
        return (
            ROOM_SOURCE_PLACEHOLDERS
            + ROOM_KIND_PLACEHOLDERS[source.kind]
            + captures
            + name_captures(source)
        )
    if isinstance(source, MqttFrom):
        return ("topic", "broker", *parse_filter(source.topic).captures)
    return ("topic", "key", "partition")


def route_placeholders(connector: ConnectorConfig) -> tuple[str, ...]:
    """The placeholders of a connector's templates.

    Its source's, plus the ``{payload.PATH}`` fields its templates use, plus for bus-to-room
    RPC the ``{header.NAME}`` (and, with the JSON convention, ``{field.NAME}``) placeholders its
    templates use.
    """
    source = connector.from_
    known = placeholders(source) + payload_references(connector)
    to = connector.to
    if not (isinstance(to, RoomTo) and to.rpc is not None) or isinstance(source, RoomFrom):
        return known
    json_style = isinstance(source, MqttFrom) and _json_reply(source)
    texts = [to.room, to.rpc.destination, to.rpc.method]
    if isinstance(source, MqttFrom) and source.reply is not None and source.reply.reply_topic:
        texts.append(source.reply.reply_topic)
    extra: set[str] = set()
    for text in texts:
        for name in _PLACEHOLDER.findall(text):
            prefixes = (HEADER_PREFIX, FIELD_PREFIX) if json_style else (HEADER_PREFIX,)
            if any(name.startswith(p) and len(name) > len(p) for p in prefixes):
                extra.add(name)
    return known + tuple(sorted(extra))


def payload_references(connector: ConnectorConfig) -> tuple[str, ...]:
    """The ``{payload.PATH}`` fields the connector's templates (and `map`) use, sorted."""
    found = {
        name
        for _, text, _ in _templates(connector)
        for name in _PLACEHOLDER.findall(text)
        if _PAYLOAD_REF.fullmatch(name)
    }
    return tuple(sorted(found))


def _capture_problems(source: RoomFrom) -> Iterator[tuple[Path_, str]]:
    """Bad captures of `room` / `participant` (and names shared with the topic's captures)."""
    kind = source.kind
    builtin = set(ROOM_SOURCE_PLACEHOLDERS + ROOM_KIND_PLACEHOLDERS[kind])
    topic = getattr(getattr(source, kind), "topic", None)
    seen = set(parse_filter(topic).captures) if isinstance(topic, str) and "{" in topic else set()
    for attr in ("room", "participant"):
        pattern = getattr(source, attr)
        if "{" not in pattern and "}" not in pattern:
            continue
        where: Path_ = ("from", attr)
        if attr == "participant" and kind == "room_metadata":
            yield where, "room_metadata has no participant to capture from"
            continue
        if attr == "participant" and kind == "events":
            yield where, "room_started and room_finished have no participant to capture from"
            continue
        try:
            captures = parse_name_pattern(pattern).captures
        except TemplateError as exc:
            yield where, str(exc)
            continue
        for name in captures:
            if name in builtin:
                yield where, f"capture {{{name}}} has the name of a built-in placeholder"
            elif name in seen:
                yield where, f"capture {{{name}}} is captured twice (room, participant, topic)"
            seen.add(name)


def _map_problems(connector: ConnectorConfig) -> Iterator[tuple[Path_, str]]:
    if connector.map is None:
        return
    if isinstance(connector.to, RoomTo) and connector.to.rpc is not None:
        yield ("map",), "map does not apply to rpc targets (the request payload goes as is)"
    if not connector.map:
        yield ("map",), "map is empty: give at least one output field"
    for name in connector.map:
        if not name:
            yield ("map",), "an output field name is empty"


def _json_reply(source: MqttFrom) -> bool:
    return source.reply is not None and source.reply.reply_topic is not None


_KAFKA_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _rpc_problems(config: Config, connector: ConnectorConfig) -> Iterator[tuple[Path_, str]]:
    source, to = connector.from_, connector.to
    rpc_target = isinstance(to, RoomTo) and to.rpc is not None
    if isinstance(source, (MqttFrom, KafkaFrom)) and source.reply is not None and not rpc_target:
        yield ("from", "reply"), "reply applies only to a connector whose target is rpc"
    if rpc_target and isinstance(source, MqttFrom) and not _json_reply(source):
        broker = config.mqtt.get(source.mqtt)
        if broker is not None and broker.protocol == "3.1.1":
            yield (
                ("from", "reply"),
                "MQTT 3.1.1 has no response topic: set reply.reply_topic (JSON convention)",
            )
    if isinstance(source, RoomFrom) and source.rpc is not None:
        reply_topic = source.rpc.reply_topic
        if isinstance(to, MqttTo):
            broker = config.mqtt.get(to.mqtt)
            if broker is not None and broker.protocol == "3.1.1":
                yield (
                    ("to", "mqtt"),
                    "room-to-bus RPC needs MQTT 5 (response topic and correlation data)",
                )
            if not reply_topic or any(c in reply_topic for c in "+#{}\x00"):
                yield (
                    ("from", "rpc", "reply_topic"),
                    "must be a plain MQTT topic (no wildcard, no placeholder)",
                )
        elif isinstance(to, KafkaTo) and (
            not _KAFKA_TOPIC_NAME.fullmatch(reply_topic) or reply_topic in (".", "..")
        ):
            yield (("from", "rpc", "reply_topic"), "is not a valid Kafka topic name")


def check_references(config: Config) -> Iterator[tuple[Path_, str]]:
    """Problems no single model can see: names of buses, templates vs placeholders, duplicates."""
    names: set[str] = set()
    for i, connector in enumerate(config.connectors):
        base: Path_ = ("connectors", i)
        if connector.name in names:
            yield (*base, "name"), f"duplicate connector name {connector.name!r}"
        names.add(connector.name)
        source = connector.from_
        for side, endpoint in (
            ("from", source),
            ("to", connector.to),
            ("dead_letter", connector.dead_letter),
        ):
            if isinstance(endpoint, (MqttFrom, MqttTo)) and endpoint.mqtt not in config.mqtt:
                defined = ", ".join(sorted(config.mqtt)) or "none defined"
                yield (*base, side, "mqtt"), f"unknown MQTT broker {endpoint.mqtt!r} ({defined})"
            if isinstance(endpoint, (KafkaFrom, KafkaTo)) and endpoint.kafka not in config.kafka:
                defined = ", ".join(sorted(config.kafka)) or "none defined"
                yield (
                    (*base, side, "kafka"),
                    f"unknown Kafka cluster {endpoint.kafka!r} ({defined})",
                )
        pattern = (
            source.topic
            if isinstance(source, MqttFrom)
            else getattr(getattr(source, source.kind), "topic", None)
            if isinstance(source, RoomFrom)
            else None
        )
        if isinstance(pattern, str) and (isinstance(source, MqttFrom) or "{" in pattern):
            try:
                parse_filter(pattern)
            except TemplateError as exc:
                kind = source.kind if isinstance(source, RoomFrom) else None
                where = ("from", kind, "topic") if kind else ("from", "topic")
                yield (*base, *where), str(exc)
                continue
        if isinstance(source, RoomFrom):
            captures = list(_capture_problems(source))
            for path, problem in captures:
                yield (*base, *path), problem
            if captures:
                continue
        for path, problem in _map_problems(connector):
            yield (*base, *path), problem
        for path, problem in _rpc_problems(config, connector):
            yield (*base, *path), problem
        for path, problem in _rate_and_latch_problems(connector):
            yield (*base, *path), problem
        for path, problem in _rules_problems(connector):
            yield (*base, *path), problem
        known = route_placeholders(connector)
        for path, text, target in _templates(connector):
            try:
                parse_template(text, known, target)
            except TemplateError as exc:
                yield (*base, *path), str(exc)
    if config.bridge.replicas is not None:
        yield from _replica_problems(config, config.bridge.replicas)


def _replica_problems(config: Config, replicas: ReplicasSettings) -> Iterator[tuple[Path_, str]]:
    """What the replicas mode cannot do (yet): see docs/scaling.md."""
    here: Path_ = ("bridge", "replicas")
    if replicas.kafka not in config.kafka:
        defined = ", ".join(sorted(config.kafka)) or "none defined"
        yield (*here, "kafka"), f"unknown Kafka cluster {replicas.kafka!r} ({defined})"
    if config.livekit.token is not None:
        yield ("livekit", "token"), "replicas mint a token per room: give api_key and api_secret"
    for i, connector in enumerate(config.connectors):
        source, to = connector.from_, connector.to
        if not isinstance(to, RoomTo):
            continue
        if isinstance(source, KafkaFrom):
            yield (
                ("connectors", i, "from"),
                "bus-to-room Kafka routes are not supported with bridge.replicas yet",
            )
        elif isinstance(source, MqttFrom):
            try:
                captures = set(parse_filter(source.topic).captures)
            except TemplateError:
                continue  # reported above
            fields = set(_PLACEHOLDER.findall(to.room))
            if not fields or not fields <= captures:
                yield (
                    ("connectors", i, "to", "room"),
                    "with bridge.replicas the room must be built from captures of the MQTT"
                    " topic (each owner subscribes to its rooms' topics only), e.g."
                    " topic devices/{site}/# and room plant-{site}",
                )


def _rules_problems(connector: ConnectorConfig) -> Iterator[tuple[Path_, str]]:
    """`where` compiles over the route's names; `allow`/`deny` have a participant to judge."""
    source, to = connector.from_, connector.to
    if connector.where is not None:
        try:
            where = compile_where(connector.where, route_placeholders(connector))
        except RuleError as exc:
            yield ("where",), str(exc)
        else:
            kind = source.kind if isinstance(source, RoomFrom) else ""
            if where.uses_payload and kind in ("text_stream", "byte_stream"):
                yield (
                    ("where",),
                    f"a {kind} route chooses its streams before their content arrives:"
                    " `payload` is not available (use topic, participant, headers...)",
                )
    if not (connector.allow or connector.deny):
        return
    key = "allow" if connector.allow else "deny"
    if isinstance(source, RoomFrom) and source.kind == "room_metadata":
        yield (key,), "room_metadata has no participant for allow/deny to judge"
    if isinstance(to, RoomTo):
        spec = getattr(to, to.kind)
        if to.kind == "data_track":
            yield (
                (key,),
                "on a bus-to-room connector allow/deny judge the destination identities: a"
                " data_track target has none (its subscribers choose themselves)",
            )
        elif to.kind in ("attribute", "room_metadata") or (
            to.kind in ("packet", "text_stream", "byte_stream") and not spec.destinations
        ):
            yield (
                (key,),
                "on a bus-to-room connector allow/deny judge the destination identities: the"
                f" {to.kind} target needs destinations (or an identity)",
            )


def _rate_and_latch_problems(connector: ConnectorConfig) -> Iterator[tuple[Path_, str]]:
    rpc = isinstance(connector.to, RoomTo) and connector.to.rpc is not None
    if connector.rate is not None and (rpc or getattr(connector.from_, "rpc", None) is not None):
        yield ("rate",), "rate limits do not apply to rpc connectors"
    if connector.latched is not False and not (
        isinstance(connector.to, RoomTo) and connector.to.packet is not None
    ):
        yield ("latched",), "applies only to a bus-to-room connector whose target is a packet"


def _templates(connector: ConnectorConfig) -> Iterator[tuple[Path_, str, Target]]:
    if connector.rate is not None and connector.rate.key is not None:
        yield ("rate", "key"), connector.rate.key, Target.TEXT
    source = connector.from_
    if isinstance(source, MqttFrom) and source.reply is not None and source.reply.reply_topic:
        yield ("from", "reply", "reply_topic"), source.reply.reply_topic, Target.MQTT_TOPIC
    for side, to in (("to", connector.to), ("dead_letter", connector.dead_letter)):
        if isinstance(to, MqttTo):
            yield (side, "topic"), to.topic, Target.MQTT_TOPIC
        elif isinstance(to, KafkaTo):
            yield (side, "topic"), to.topic, Target.KAFKA_TOPIC
            if to.key is not None:
                yield (side, "key"), to.key, Target.TEXT
            for name, value in to.headers.items():
                yield (side, "headers", name), value, Target.TEXT
        elif isinstance(to, RoomTo):
            yield (side, "room"), to.room, Target.ROOM
            kind = to.kind
            spec = getattr(to, kind)
            for attr in ("topic", "name", "key", "identity", "destination", "method"):
                text = getattr(spec, attr, None)
                if isinstance(text, str):
                    yield (side, kind, attr), text, Target.TEXT
            for j, dest in enumerate(getattr(spec, "destinations", [])):
                yield (side, kind, "destinations", j), dest, Target.TEXT
            for name, value in getattr(spec, "attributes", {}).items():
                yield (side, kind, "attributes", name), value, Target.TEXT
    for name, value in (connector.map or {}).items():
        yield ("map", name), value, Target.TEXT


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (for editors and docs)."""
    schema = Config.model_json_schema(by_alias=True)
    schema["title"] = "roombus configuration"
    return schema
