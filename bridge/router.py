"""Routes compiled from the configuration, and the pure mapping of messages along them.

`compile_routes(config)` turns each connector into a `ToBusRoute` (room traffic to MQTT/Kafka)
or a `ToRoomRoute` (bus messages into a room), with templates and filters parsed once. The
functions here never do I/O: `ToBusRoute.outbound` builds the message a sink publishes from a
`RoomMessage`; `ToRoomRoute.match` and `decode_payload` decide whether and what a bus message
delivers. Values that participants or devices control are checked by `bridge.topics` as they are
inserted; a bad one raises `RejectedMessage` (counted by the runtime, dead-lettered if
configured, never published).

``{payload.PATH}`` fields and a connector's `map` read the message's JSON payload: it is parsed
once per message, and only on routes whose templates use such fields (`PayloadFields`); a
payload that is not JSON, or lacks a field, rejects the message (``malformed_json``,
``payload_field_missing``, ``payload_field_not_scalar``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bridge.config import (
    PAYLOAD_PREFIX,
    ByteStreamFrom,
    Config,
    ConnectorConfig,
    DataTrackFrom,
    EventsFrom,
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
from bridge.rules import RouteRules, compile_rules
from bridge.topics import (
    NamePattern,
    Target,
    Template,
    TemplateValueError,
    TopicFilter,
    glob_match,
    parse_filter,
    parse_name_pattern,
    parse_template,
)

# Largest JSON envelope the bridge parses (bytes) and its deepest nesting.
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """Something that happened in a room, ready to be mapped onto a bus route."""

    # packet, text_stream, byte_stream, data_track, attributes, metadata, room_metadata,
    # presence, events
    kind: str
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
    payload_map: PayloadMap | None = None  # the connector's `map` (main targets only)
    # The {payload.x} fields of the templates (and of the map): parsed from the payload.
    fields: PayloadFields = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        templates = [self.topic, *([self.key] if self.key else []), *self.headers.values()]
        if self.payload_map is not None:
            templates += self.payload_map.templates
        object.__setattr__(self, "fields", PayloadFields.of(templates))

    @property
    def endpoint(self) -> str:
        """The name of the sink that publishes for this target, e.g. ``mqtt:plant``."""
        return f"{self.bus}:{self.name}"

    @classmethod
    def of(
        cls,
        spec: MqttTo | KafkaTo,
        known: tuple[str, ...],
        mapping: Mapping[str, str] | None = None,
    ) -> BusTarget:
        """Compile a bus endpoint of the config (with the connector's `map`, if any)."""
        payload_map = PayloadMap.of(mapping, known) if mapping is not None else None
        if isinstance(spec, MqttTo):
            return cls(
                "mqtt",
                spec.mqtt,
                parse_template(spec.topic, known, Target.MQTT_TOPIC),
                qos=spec.qos,
                retain=spec.retain,
                format=spec.format,
                payload_map=payload_map,
            )
        return cls(
            "kafka",
            spec.kafka,
            parse_template(spec.topic, known, Target.KAFKA_TOPIC),
            key=parse_template(spec.key, known, Target.TEXT) if spec.key else None,
            headers={k: parse_template(v, known, Target.TEXT) for k, v in spec.headers.items()},
            format=spec.format,
            payload_map=payload_map,
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
        if self.fields or self.payload_map is not None:
            payload, values = self._payload_step(payload, values)
            if self.payload_map is not None and payload is not None:
                content_type = "application/json"
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

    def _payload_step(
        self, payload: bytes | None, values: Mapping[str, str]
    ) -> tuple[bytes | None, Mapping[str, str]]:
        """The payload fields added to `values`, and the payload `map` builds (if any).

        A delete (no payload) stays a delete; templates cannot read fields from it.
        """
        if payload is None:
            if self.fields:
                raise RejectedMessage(
                    "payload_field_missing", "a delete has no payload to read fields from"
                )
            return payload, values
        doc: object = None
        if self.fields or (self.payload_map is not None and self.payload_map.needs_doc):
            doc = parse_json_payload(payload)
            if self.fields:
                values = self.fields.add_to(values, doc)
        if self.payload_map is not None:
            payload = self.payload_map.build(values, doc)
        return payload, values


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
    rules: RouteRules | None = None  # where / allow / deny (bridge.rules)
    # `source.room` and `source.participant`, compiled: globs that may capture (plant-{site}).
    room_pattern: NamePattern = field(init=False, repr=False, compare=False)
    participant_pattern: NamePattern = field(init=False, repr=False, compare=False)
    # `source.kind` looks through the config model's fields: asked several times per message.
    _kind: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "room_pattern", parse_name_pattern(self.source.room))
        object.__setattr__(self, "participant_pattern", parse_name_pattern(self.source.participant))
        object.__setattr__(self, "_kind", self.source.kind)

    @property
    def kind(self) -> str:
        """The kind of room traffic the route carries."""
        return self._kind

    def wants_room(self, room: str) -> bool:
        """Whether the route listens to `room`."""
        return self.room_pattern.matches(room)

    def wants(self, message: RoomMessage) -> bool:
        """Whether `message` (already of this route's kind) passes the route's filters."""
        values = message.values
        if not self.room_pattern.matches(values.get("room", "")):
            return False
        participant = values.get("participant", "")
        # Room metadata and the room's own events (started, finished) have no participant.
        about_room = self.kind == "room_metadata" or (self.kind == "events" and not participant)
        if not about_room and not self.participant_pattern.matches(participant):
            return False
        spec = getattr(self.source, self.kind)
        if isinstance(spec, EventsFrom):
            return values.get("event", "") in spec.kinds
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
        if isinstance(spec, DataTrackFrom):
            return glob_match(spec.name, values.get("track", ""))
        if self.kind == "attributes":
            return glob_match(self.source.attributes.keys, values.get("key", ""))  # type: ignore[union-attr]
        return True

    def values(self, message: RoomMessage) -> dict[str, str]:
        """The placeholder values of `message` on this route (with the captures)."""
        values = dict(message.values)
        if self.topic_filter is not None:
            values.update(self.topic_filter.match(values.get("topic", "")) or {})
        if self.room_pattern.captures:
            values.update(self.room_pattern.match(values.get("room", "")) or {})
        if self.participant_pattern.captures:
            values.update(self.participant_pattern.match(values.get("participant", "")) or {})
        return values


@dataclass(frozen=True)
class RoomTarget:
    """Where a bus-to-room route delivers."""

    room: Template
    # packet, text_stream, byte_stream, data_track, attribute, room_metadata,
    # participant_attribute
    kind: str
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
    payload_map: PayloadMap | None = None  # the connector's `map`

    @property
    def templates(self) -> list[Template]:
        """Every template of the target."""
        maybe = (self.topic, self.name, self.key, self.identity, self.destination, self.method)
        return [
            self.room,
            *(t for t in maybe if t is not None),
            *self.destinations,
            *self.attributes.values(),
            *(self.payload_map.templates if self.payload_map else ()),
        ]

    @classmethod
    def of(
        cls, spec: RoomTo, known: tuple[str, ...], mapping: Mapping[str, str] | None = None
    ) -> RoomTarget:
        """Compile a room endpoint of the config (with the connector's `map`, if any)."""
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
            payload_map=PayloadMap.of(mapping, known) if mapping is not None else None,
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
    rules: RouteRules | None = None  # where / allow / deny (bridge.rules)
    # The {payload.x} fields of the templates: parsed from the payload (after `format`).
    fields: PayloadFields = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        templates = self.target.templates + ([self.reply_topic] if self.reply_topic else [])
        object.__setattr__(self, "fields", PayloadFields.of(templates))

    def match(self, envelope: Envelope) -> dict[str, str] | None:
        """The placeholder values if `envelope` belongs to this route, else None."""
        if isinstance(self.source, MqttFrom):
            assert self.filter is not None
            captures = self.filter.match(envelope.topic)
            if captures is None:
                return None
            values = {**captures, "topic": envelope.topic, "broker": self.source.mqtt}
        else:
            if envelope.topic not in self.source.topics:
                return None
            key = envelope.key.decode("utf-8", "replace") if envelope.key else ""
            values = {
                "topic": envelope.topic,
                "key": key,
                "partition": "" if envelope.partition is None else str(envelope.partition),
            }
        if self.fields and self.target.kind == "rpc":
            # The RPC bridge renders from these values: a field it lacks fails the call there
            # (an RPC error reply), so what cannot be read is left out here.
            try:
                payload = decode_payload(envelope.payload, self.source.format)[0]
                return dict(self.fields.add_to(values, parse_json_payload(payload)))
            except RejectedMessage:
                return values
        return values

    def delivery(self, envelope: Envelope, values: Mapping[str, str]) -> RoomDelivery:
        """Render the delivery of `envelope`; raises `RejectedMessage`."""
        payload, content_type = decode_payload(envelope.payload, self.source.format)
        target = self.target
        if self.fields or target.payload_map is not None:
            doc: object = None
            if self.fields or (target.payload_map is not None and target.payload_map.needs_doc):
                doc = parse_json_payload(payload)
                values = self.fields.add_to(values, doc)
            if target.payload_map is not None:
                payload = target.payload_map.build(values, doc)
                content_type = "application/json"
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
            BusTarget.of(connector.to, known, connector.map),
            dead,
            flt,
            on_reject=connector.reject_policy,
            rules=compile_rules(connector.where, connector.allow, connector.deny, known),
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
        RoomTarget.of(connector.to, known, connector.map),
        dead,
        reply_topic,
        on_reject=connector.reject_policy,
        rules=compile_rules(connector.where, connector.allow, connector.deny, known),
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


@dataclass(frozen=True, slots=True)
class PayloadFields:
    """The ``{payload.PATH}`` fields a route's templates use, with their paths split once."""

    paths: tuple[tuple[str, tuple[str, ...]], ...]  # (placeholder, steps)

    @classmethod
    def of(cls, templates: Iterable[Template]) -> PayloadFields:
        """The payload fields of `templates`."""
        names = sorted({f for t in templates for f in t.fields if f.startswith(PAYLOAD_PREFIX)})
        return cls(tuple((n, tuple(n.split(".")[1:])) for n in names))

    def __bool__(self) -> bool:
        return bool(self.paths)

    def add_to(self, values: Mapping[str, str], doc: object) -> dict[str, str]:
        """`values` with the text of every field of `doc`; raises `RejectedMessage`."""
        out = dict(values)
        for name, steps in self.paths:
            value = payload_field(doc, name, steps)
            # Strings, the usual case, without a call.
            out[name] = value if type(value) is str else field_text(name, value)
        return out


_ABSENT = object()


def parse_json_payload(payload: bytes) -> object:
    """The JSON document of a payload whose fields templates read; raises `RejectedMessage`."""
    if len(payload) > MAX_JSON_BYTES:
        raise RejectedMessage("json_too_large", f"{len(payload)} bytes > {MAX_JSON_BYTES}")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RejectedMessage("malformed_json", f"payload is not JSON: {str(exc)[:200]}") from exc
    except RecursionError as exc:
        raise RejectedMessage("malformed_json", "payload nested too deeply") from exc


def payload_field(doc: object, name: str, steps: tuple[str, ...]) -> object:
    """The value at `steps` of `doc` (a digit-only step indexes a list); else `RejectedMessage`."""
    value = doc
    for step in steps:
        if type(value) is dict:
            value = value.get(step, _ABSENT)
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            value = _ABSENT
        if value is _ABSENT or value is None:
            raise RejectedMessage("payload_field_missing", f"the payload has no {{{name}}}")
    return value


def field_text(name: str, value: object) -> str:
    """A JSON scalar as template text: strings as they are, numbers and booleans in JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        what = "an object" if isinstance(value, dict) else "an array"
        raise RejectedMessage("payload_field_not_scalar", f"{{{name}}} is {what}, not a value")
    return json.dumps(value)


@dataclass(frozen=True, slots=True)
class PayloadMap:
    """A connector's `map`: the JSON object that replaces the payload, one template per field."""

    # (output field, template, placeholder when the template is exactly one {payload.x})
    entries: tuple[tuple[str, Template, tuple[str, tuple[str, ...]] | None], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, str], known: tuple[str, ...]) -> PayloadMap:
        """Compile `map` (validated by the config: its templates parse)."""
        entries = []
        for out, text in mapping.items():
            template = parse_template(text, known, Target.TEXT)
            parts = template.parts
            whole = (
                parts[0][0]
                if len(parts) == 1
                and isinstance(parts[0], tuple)
                and parts[0][0].startswith(PAYLOAD_PREFIX)
                else None
            )
            ref = (whole, tuple(whole.split(".")[1:])) if whole else None
            entries.append((out, template, ref))
        return cls(tuple(entries))

    @property
    def templates(self) -> list[Template]:
        """The templates rendered as text (not those copying a JSON value as is)."""
        return [t for _, t, ref in self.entries if ref is None]

    @property
    def needs_doc(self) -> bool:
        """Whether a field copies a JSON value of the payload."""
        return any(ref is not None for _, _, ref in self.entries)

    def build(self, values: Mapping[str, str], doc: object) -> bytes:
        """The new payload; raises `RejectedMessage`."""
        out: dict[str, object] = {}
        for name, template, ref in self.entries:
            if ref is not None:
                out[name] = payload_field(doc, *ref)
                continue
            try:
                out[name] = template.render(values, Target.TEXT)
            except TemplateValueError as exc:
                raise RejectedMessage("bad_template_value", str(exc)) from exc
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def _depth(value: object, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level
