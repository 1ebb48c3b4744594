"""Routes compiled from the configuration, and the pure mapping of messages along them.

`compile_routes(config)` turns each connector into a `ToBusRoute` (room traffic to MQTT/Kafka)
or a `ToRoomRoute` (bus messages into a room), with templates and filters parsed once. The
functions here never do I/O: `ToBusRoute.outbound` builds the message a sink publishes from a
`RoomMessage`; `ToRoomRoute.match` and `decode_payload` decide whether and what a bus message
delivers. Values that participants or devices control are checked by `bridge.topics` as they are
inserted; a bad one raises `RejectedMessage` (counted by the runtime, dead-lettered if
configured, never published).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from bridge.config import (
    ByteStreamFrom,
    Config,
    ConnectorConfig,
    KafkaFrom,
    KafkaTo,
    MqttFrom,
    MqttTo,
    PacketFrom,
    RoomFrom,
    RoomTo,
    RpcTo,
    TextStreamFrom,
    route_placeholders,
)
from bridge.envelope import H_CONTENT_TYPE, H_SOURCE, Envelope, Outbound
from bridge.errors import RejectedMessage
from bridge.topics import (
    Target,
    Template,
    TemplateValueError,
    TopicFilter,
    glob_match,
    parse_filter,
    parse_template,
)

# Largest JSON envelope the bridge parses (bytes) and its deepest nesting.
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """Something that happened in a room, ready to be mapped onto a bus route."""

    kind: str  # packet, text_stream, byte_stream, attributes, metadata, room_metadata, presence
    payload: bytes | None  # None: a deletion (attribute removed, participant left)
    values: Mapping[str, str]  # placeholder values: room, participant, topic, key, ...
    headers: Mapping[str, str]  # provenance
    content_type: str | None = None
    default_key: str | None = None  # Kafka key when the route sets none (keeps order/compaction)


@dataclass(frozen=True)
class BusTarget:
    """Where a route publishes: an MQTT broker or Kafka cluster, with rendered templates."""

    bus: str  # "mqtt" or "kafka"
    name: str  # broker / cluster name
    topic: Template
    key: Template | None = None
    headers: Mapping[str, Template] = field(default_factory=dict)
    qos: int = 1
    retain: bool = False
    format: str = "raw"

    @property
    def endpoint(self) -> str:
        """The name of the sink that publishes for this target, e.g. ``mqtt:plant``."""
        return f"{self.bus}:{self.name}"

    @classmethod
    def of(cls, spec: MqttTo | KafkaTo, known: tuple[str, ...]) -> BusTarget:
        """Compile a bus endpoint of the config."""
        if isinstance(spec, MqttTo):
            return cls(
                "mqtt",
                spec.mqtt,
                parse_template(spec.topic, known, Target.MQTT_TOPIC),
                qos=spec.qos,
                retain=spec.retain,
                format=spec.format,
            )
        return cls(
            "kafka",
            spec.kafka,
            parse_template(spec.topic, known, Target.KAFKA_TOPIC),
            key=parse_template(spec.key, known, Target.TEXT) if spec.key else None,
            headers={k: parse_template(v, known, Target.TEXT) for k, v in spec.headers.items()},
            format=spec.format,
        )

    def outbound(
        self,
        payload: bytes | None,
        values: Mapping[str, str],
        headers: Mapping[str, str],
        *,
        content_type: str | None,
        default_key: str | None,
        bridge_id: str,
    ) -> Outbound:
        """The message to publish; raises `RejectedMessage` for a value a template refuses."""
        target = Target.MQTT_TOPIC if self.bus == "mqtt" else Target.KAFKA_TOPIC
        try:
            topic = self.topic.render(values, target)
            key = self.key.render(values, Target.TEXT) if self.key else default_key
            extra = {k: t.render(values, Target.TEXT) for k, t in self.headers.items()}
        except TemplateValueError as exc:
            raise RejectedMessage("bad_template_value", str(exc)) from exc
        all_headers = {**headers, **extra, H_SOURCE: bridge_id}
        body = payload if payload is None else encode_payload(payload, self.format, headers)
        if self.format == "json":
            content_type = "application/json"
        if content_type:
            all_headers[H_CONTENT_TYPE] = content_type
        return Outbound(
            topic=topic,
            payload=body,
            key=key.encode() if key is not None else None,
            headers=tuple(all_headers.items()),
            content_type=content_type,
            qos=self.qos,
            retain=self.retain,
        )


@dataclass(frozen=True)
class ToBusRoute:
    """Room traffic to a bus."""

    name: str
    source: RoomFrom
    target: BusTarget
    dead_letter: BusTarget | None
    # A LiveKit topic pattern with named captures (``command/{device}``), else None (a glob).
    topic_filter: TopicFilter | None = None
    on_reject: str = "drop"  # dead_letter | drop (see bridge.runtime.dead_letter)

    @property
    def kind(self) -> str:
        """The kind of room traffic the route carries."""
        return self.source.kind

    def wants_room(self, room: str) -> bool:
        """Whether the route listens to `room`."""
        return glob_match(self.source.room, room)

    def wants(self, message: RoomMessage) -> bool:
        """Whether `message` (already of this route's kind) passes the route's filters."""
        values = message.values
        if not glob_match(self.source.room, values.get("room", "")):
            return False
        if self.kind not in ("room_metadata",) and not glob_match(
            self.source.participant, values.get("participant", "")
        ):
            return False
        spec = getattr(self.source, self.kind)
        if self.topic_filter is not None:
            if self.topic_filter.match(values.get("topic", "")) is None:
                return False
        elif isinstance(spec, (PacketFrom, TextStreamFrom, ByteStreamFrom)) and not glob_match(
            spec.topic, values.get("topic", "")
        ):
            return False
        if (
            isinstance(spec, PacketFrom)
            and spec.reliability != "any"
            and values.get("kind") != f"packet-{spec.reliability}"
        ):
            return False
        if self.kind == "attributes":
            return glob_match(self.source.attributes.keys, values.get("key", ""))  # type: ignore[union-attr]
        return True

    def values(self, message: RoomMessage) -> dict[str, str]:
        """The placeholder values of `message` on this route (with the topic's captures)."""
        values = dict(message.values)
        if self.topic_filter is not None:
            values.update(self.topic_filter.match(values.get("topic", "")) or {})
        return values


@dataclass(frozen=True)
class RoomTarget:
    """Where a bus-to-room route delivers."""

    room: Template
    kind: str  # packet, text_stream, byte_stream, attribute, room_metadata, participant_attribute
    topic: Template | None = None
    destinations: tuple[Template, ...] = ()
    attributes: Mapping[str, Template] = field(default_factory=dict)
    name: Template | None = None
    key: Template | None = None
    identity: Template | None = None
    reliable: bool = True
    oversize_as_stream: bool = True
    mime_type: str = "application/octet-stream"
    # rpc: the callee's identity and the method
    destination: Template | None = None
    method: Template | None = None
    rpc: RpcTo | None = None

    @classmethod
    def of(cls, spec: RoomTo, known: tuple[str, ...]) -> RoomTarget:
        """Compile a room endpoint of the config."""
        kind = spec.kind
        sub = getattr(spec, kind)

        def t(text: str | None) -> Template | None:
            return parse_template(text, known, Target.TEXT) if text else None

        return cls(
            room=parse_template(spec.room, known, Target.ROOM),
            kind=kind,
            topic=t(getattr(sub, "topic", None)),
            destinations=tuple(
                parse_template(d, known, Target.TEXT) for d in getattr(sub, "destinations", [])
            ),
            attributes={
                k: parse_template(v, known, Target.TEXT)
                for k, v in getattr(sub, "attributes", {}).items()
            },
            name=t(getattr(sub, "name", None)),
            key=t(getattr(sub, "key", None)),
            identity=t(getattr(sub, "identity", None)),
            reliable=getattr(sub, "reliable", True),
            oversize_as_stream=getattr(sub, "oversize", "byte_stream") == "byte_stream",
            mime_type=getattr(sub, "mime_type", "application/octet-stream"),
            destination=t(getattr(sub, "destination", None)),
            method=t(getattr(sub, "method", None)),
            rpc=spec.rpc,
        )


@dataclass(frozen=True)
class RoomDelivery:
    """A bus message's delivery into a room, all templates rendered."""

    room: str
    kind: str
    payload: bytes
    topic: str | None
    destinations: tuple[str, ...]
    attributes: Mapping[str, str]
    name: str | None
    key: str | None
    identity: str | None
    content_type: str | None
    reliable: bool = True
    oversize_as_stream: bool = True
    mime_type: str = "application/octet-stream"


@dataclass(frozen=True)
class ToRoomRoute:
    """Bus messages into a room."""

    name: str
    source: MqttFrom | KafkaFrom
    filter: TopicFilter | None  # MQTT only
    target: RoomTarget
    dead_letter: BusTarget | None
    # rpc with the MQTT 3.1.1 convention: where replies go
    reply_topic: Template | None = None
    on_reject: str = "drop"  # dead_letter | drop | hold (see bridge.runtime.dead_letter)

    def match(self, envelope: Envelope) -> dict[str, str] | None:
        """The placeholder values if `envelope` belongs to this route, else None."""
        if isinstance(self.source, MqttFrom):
            assert self.filter is not None
            captures = self.filter.match(envelope.topic)
            if captures is None:
                return None
            return {**captures, "topic": envelope.topic, "broker": self.source.mqtt}
        if envelope.topic not in self.source.topics:
            return None
        key = envelope.key.decode("utf-8", "replace") if envelope.key else ""
        return {
            "topic": envelope.topic,
            "key": key,
            "partition": "" if envelope.partition is None else str(envelope.partition),
        }

    def delivery(self, envelope: Envelope, values: Mapping[str, str]) -> RoomDelivery:
        """Render the delivery of `envelope`; raises `RejectedMessage`."""
        payload, content_type = decode_payload(envelope.payload, self.source.format)
        target = self.target
        try:
            return RoomDelivery(
                room=target.room.render(values, Target.ROOM),
                kind=target.kind,
                payload=payload,
                topic=target.topic.render(values, Target.TEXT) if target.topic else None,
                destinations=tuple(d.render(values, Target.TEXT) for d in target.destinations),
                attributes={k: v.render(values, Target.TEXT) for k, v in target.attributes.items()},
                name=target.name.render(values, Target.TEXT) if target.name else None,
                key=target.key.render(values, Target.TEXT) if target.key else None,
                identity=target.identity.render(values, Target.TEXT) if target.identity else None,
                content_type=content_type or envelope.content_type,
                reliable=target.reliable,
                oversize_as_stream=target.oversize_as_stream,
                mime_type=target.mime_type,
            )
        except TemplateValueError as exc:
            raise RejectedMessage("bad_template_value", str(exc)) from exc


Route = ToBusRoute | ToRoomRoute


def compile_route(connector: ConnectorConfig) -> Route:
    """Compile one connector (the config was validated, so templates parse)."""
    source = connector.from_
    known = route_placeholders(connector)
    dead = BusTarget.of(connector.dead_letter, known) if connector.dead_letter else None
    if isinstance(source, RoomFrom):
        assert isinstance(connector.to, (MqttTo, KafkaTo))
        topic = getattr(getattr(source, source.kind), "topic", None)
        flt = parse_filter(topic) if isinstance(topic, str) and "{" in topic else None
        return ToBusRoute(
            connector.name,
            source,
            BusTarget.of(connector.to, known),
            dead,
            flt,
            on_reject=connector.reject_policy,
        )
    assert isinstance(connector.to, RoomTo)
    flt = parse_filter(source.topic) if isinstance(source, MqttFrom) else None
    reply_topic = None
    if isinstance(source, MqttFrom) and source.reply is not None and source.reply.reply_topic:
        reply_topic = parse_template(source.reply.reply_topic, known, Target.MQTT_TOPIC)
    return ToRoomRoute(
        connector.name,
        source,
        flt,
        RoomTarget.of(connector.to, known),
        dead,
        reply_topic,
        on_reject=connector.reject_policy,
    )


def compile_routes(config: Config) -> list[Route]:
    """Every route of the configuration."""
    return [compile_route(c) for c in config.connectors]


# ----------------------------------------------------------------------------- payloads


def encode_payload(payload: bytes, fmt: str, provenance: Mapping[str, str]) -> bytes:
    """The bus payload for `payload` in format raw, base64 or json (payload plus provenance)."""
    if fmt == "raw":
        return payload
    if fmt == "base64":
        return base64.b64encode(payload)
    try:
        text: str | None = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    doc: dict[str, object] = dict(provenance)
    if text is not None:
        doc["payload"] = text
        doc["encoding"] = "utf-8"
    else:
        doc["payload"] = base64.b64encode(payload).decode()
        doc["encoding"] = "base64"
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def decode_payload(body: bytes, fmt: str) -> tuple[bytes, str | None]:
    """The room payload from a bus body in format raw, base64 or json; raises `RejectedMessage`.

    The JSON envelope is ``{"payload": "...", "encoding": "utf-8"|"base64", "content_type": ...}``.
    """
    if fmt == "raw":
        return body, None
    if fmt == "base64":
        try:
            return base64.b64decode(body, validate=True), None
        except (binascii.Error, ValueError) as exc:
            raise RejectedMessage("malformed_base64", str(exc)) from exc
    if len(body) > MAX_JSON_BYTES:
        raise RejectedMessage("json_too_large", f"{len(body)} bytes > {MAX_JSON_BYTES}")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RejectedMessage("malformed_json", str(exc)[:200]) from exc
    except RecursionError as exc:
        raise RejectedMessage("malformed_json", "nested too deeply") from exc
    if _depth(doc) > MAX_JSON_DEPTH:
        raise RejectedMessage("malformed_json", f"nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(doc, dict) or not isinstance(doc.get("payload"), str):
        raise RejectedMessage("malformed_json", 'expected an object with a string "payload"')
    encoding = doc.get("encoding", "utf-8")
    content_type = doc.get("content_type")
    ct = content_type if isinstance(content_type, str) else None
    if encoding == "utf-8":
        return doc["payload"].encode("utf-8"), ct
    if encoding == "base64":
        try:
            return base64.b64decode(doc["payload"], validate=True), ct
        except (binascii.Error, ValueError) as exc:
            raise RejectedMessage("malformed_base64", str(exc)) from exc
    raise RejectedMessage("malformed_json", f"unknown encoding {encoding!r}")


def _depth(value: object, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level
