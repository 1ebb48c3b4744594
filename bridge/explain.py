"""What a configuration does, shown without connecting anything.

* `summary`: the one-screen overview ``roombus check`` prints for a valid file: rooms, buses,
  routes by direction.
* `explain_routes`: ``roombus routes``: which routes a sample MQTT message, Kafka record or room
  event would take and what they would render, using the router's own matching and rendering.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from bridge.config import (
    Config,
    KafkaFrom,
    KafkaTo,
    MqttFrom,
    MqttTo,
    RoomFrom,
    RoomTo,
)
from bridge.envelope import H_KIND, H_PARTICIPANT, H_ROOM, H_TOPIC, Envelope, Outbound
from bridge.errors import RejectedMessage
from bridge.router import (
    RoomMessage,
    ToBusRoute,
    ToRoomRoute,
    compile_routes,
)
from bridge.rpcbridge import parse_request
from bridge.topics import Target, TemplateValueError, glob_match


def summary(config: Config, source: str) -> Iterator[str]:
    """The one-screen summary `roombus check` prints: rooms, buses, routes by direction."""
    lk = config.livekit
    yield (
        f"{source}: valid ({len(config.connectors)} connectors, {len(config.mqtt)} MQTT brokers,"
        f" {len(config.kafka)} Kafka clusters)"
    )
    yield f"livekit  {_without_userinfo(lk.url)} as {lk.identity!r}"
    if lk.rooms:
        yield f"rooms    {', '.join(lk.rooms)}"
    if lk.room_patterns:
        every = f" (checked every {lk.room_discovery_interval:g} s)"
        yield f"patterns {', '.join(lk.room_patterns)}{every}"
    for name, broker in config.mqtt.items():
        tls = ", TLS" if broker.tls is not None else ""
        yield f"mqtt     {name}: {broker.host}:{broker.port} (MQTT {broker.protocol}{tls})"
    for name, cluster in config.kafka.items():
        tls = ", TLS" if cluster.tls is not None else ""
        sasl = f", SASL {cluster.sasl.mechanism}" if cluster.sasl is not None else ""
        yield f"kafka    {name}: {', '.join(cluster.bootstrap_servers)}{tls}{sasl}"
    groups: dict[str, list[str]] = {"room → bus": [], "bus → room": [], "RPC": []}
    width = max(len(c.name) for c in config.connectors)
    for c in config.connectors:
        rpc = (isinstance(c.from_, RoomFrom) and c.from_.rpc is not None) or (
            isinstance(c.to, RoomTo) and c.to.rpc is not None
        )
        group = "RPC" if rpc else "room → bus" if isinstance(c.from_, RoomFrom) else "bus → room"
        line = f"  {c.name:<{width}}  {_endpoint(c.from_)}  →  {_endpoint(c.to)}"
        if c.dead_letter is not None:
            line += f"  (dead letters: {_endpoint(c.dead_letter)})"
        groups[group].append(line)
    for title, lines in groups.items():
        if lines:
            yield f"routes {title} ({len(lines)})"
            yield from lines


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _endpoint(spec: MqttFrom | KafkaFrom | RoomFrom | MqttTo | KafkaTo | RoomTo) -> str:
    """An endpoint of a connector in a few words: ``mqtt plant devices/{site}/+``."""
    if isinstance(spec, MqttFrom):
        return f"mqtt {spec.mqtt} {spec.topic}"
    if isinstance(spec, KafkaFrom):
        return f"kafka {spec.kafka} {','.join(spec.topics)}"
    if isinstance(spec, MqttTo):
        return f"mqtt {spec.mqtt} {spec.topic}" + (" (retained)" if spec.retain else "")
    if isinstance(spec, KafkaTo):
        return f"kafka {spec.kafka} {spec.topic}" + (f" key {spec.key}" if spec.key else "")
    if isinstance(spec, RoomFrom):
        kind = spec.kind
        detail = getattr(spec, kind)
        what = (
            getattr(detail, "topic", None)
            or getattr(detail, "keys", None)
            or getattr(detail, "name", None)
        )
        if kind == "rpc":
            what = ",".join(spec.rpc.methods)  # type: ignore[union-attr]
        who = "" if spec.participant == "*" else f" from {spec.participant}"
        return f"room {spec.room}{who} {kind}" + (f" {what}" if what else "")
    kind = spec.kind
    detail = getattr(spec, kind)
    what = " ".join(
        f"{attr} {getattr(detail, attr)}"
        for attr in ("topic", "key", "identity", "destination", "method")
        + (("name",) if kind == "data_track" else ())
        if getattr(detail, attr, None)
    )
    return f"room {spec.room} {kind}" + (f" {what}" if what else "")


# ----------------------------------------------------------------------------- routes


SAMPLE_ID = "roombus-routes"  # the bridge id in rendered samples (the loop-guard header)
# The `kind` placeholder of each room event, as bridge.runtime.room_events gives it.
_EVENT_KIND = {
    "packet": "packet-reliable",
    "text_stream": "text-stream",
    "byte_stream": "byte-stream",
    "data_track": "data-track",
    "room_metadata": "room-metadata",
    "events": "room-event",
}


def explain_routes(config: Config, args: argparse.Namespace) -> Iterator[str]:
    """What `roombus routes` prints: the routes a sample takes and what they render."""
    routes = compile_routes(config)
    lines = (
        list(_explain_event(routes, args))
        if args.event is not None
        else list(_explain_bus(routes, args))
    )
    if not lines:
        lines = ["no route takes it"]
    yield from lines


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"roombus routes: {what} {item!r} is not NAME=VALUE")
        out[name] = value
    return out


def _explain_bus(
    routes: Sequence[ToBusRoute | ToRoomRoute], args: argparse.Namespace
) -> Iterator[str]:
    payload = args.payload.encode()
    headers = _pairs(args.header, "--header")
    for route in routes:
        if not isinstance(route, ToRoomRoute):
            continue
        source = route.source
        if isinstance(source, MqttFrom):
            if args.kafka is not None or args.mqtt not in (None, source.mqtt):
                continue
            envelope = Envelope(
                payload,
                f"mqtt:{source.mqtt}",
                args.topic,
                headers=headers,
                response_topic=args.response_topic,
                correlation_data=b"sample" if args.response_topic else None,
            )
        else:
            if args.mqtt is not None or args.kafka not in (None, source.kafka):
                continue
            key = args.key.encode() if args.key is not None else None
            envelope = Envelope(
                payload,
                f"kafka:{source.kafka}",
                args.topic,
                key=key,
                headers=headers,
                partition=args.partition,
            )
        values = route.match(envelope)
        if values is None:
            continue
        yield f"{route.name}: {_endpoint(route.source)}"
        yield f"  values   {_values(values)}"
        try:
            yield from _render_to_room(route, envelope, values)
        except RejectedMessage as exc:
            yield f"  rejected {exc.reason}: {exc.detail} (on_reject: {route.on_reject})"


def _render_to_room(
    route: ToRoomRoute, envelope: Envelope, values: dict[str, str]
) -> Iterator[str]:
    target = route.target
    if target.kind == "rpc":
        request = parse_request(route, envelope, values)
        try:
            room = target.room.render(request.values, Target.ROOM)
            callee = target.destination.render(request.values, Target.TEXT)  # type: ignore[union-attr]
            method = target.method.render(request.values, Target.TEXT)  # type: ignore[union-attr]
        except TemplateValueError as exc:
            raise RejectedMessage("bad_template_value", str(exc)) from exc
        yield f"  → room {room}: RPC {method!r} on {callee!r}, timeout {request.timeout:g} s"
        yield f"  reply to {request.reply_topic}"
        yield f"  payload  {_show(request.payload_bytes)}"
        return
    d = route.delivery(envelope, values)
    what = {
        "packet": f"packet topic {d.topic!r} ({'reliable' if d.reliable else 'lossy'})",
        "text_stream": f"text stream topic {d.topic!r}",
        "byte_stream": f"byte stream topic {d.topic!r} name {d.name!r}",
        "data_track": f"a frame on data track {d.name!r}",
        "attribute": f"the bridge's attribute {d.key!r}",
        "room_metadata": "room metadata",
        "participant_attribute": f"attribute {d.key!r} of {d.identity!r}",
    }[d.kind]
    to = f" to {', '.join(d.destinations)}" if d.destinations else ""
    yield f"  → room {d.room}: {what}{to}"
    if d.attributes:
        yield f"  attributes {_values(d.attributes)}"
    yield f"  payload  {_show(d.payload)}" + (f" ({d.content_type})" if d.content_type else "")


def _explain_event(
    routes: Sequence[ToBusRoute | ToRoomRoute], args: argparse.Namespace
) -> Iterator[str]:
    kind = args.event
    values = {
        "room": args.room,
        "room_sid": "RM_sample",
        "participant": "" if kind == "room_metadata" else args.participant,
        "participant_sid": "" if kind == "room_metadata" else "PA_sample",
        "kind": _EVENT_KIND.get(kind, kind),
    }
    if args.topic is not None:
        values["topic"] = args.topic
    if args.key is not None:
        values["key"] = args.key
    values |= _pairs(args.value, "--value")
    headers = {H_ROOM: values["room"], H_KIND: values["kind"]}
    if values["participant"]:
        headers[H_PARTICIPANT] = values["participant"]
    if values.get("topic"):
        headers[H_TOPIC] = values["topic"]
    message = RoomMessage(kind, args.payload.encode(), values, headers)
    for route in routes:
        if not isinstance(route, ToBusRoute) or route.kind != kind or not route.wants(message):
            continue
        if kind == "rpc" and not any(
            glob_match(m, values.get("method", ""))
            for m in route.source.rpc.methods  # type: ignore[union-attr]
        ):
            continue
        yield f"{route.name}: {_endpoint(route.source)}"
        route_values = route.values(message)
        yield f"  values   {_values(route_values)}"
        try:
            out = route.target.outbound(
                message.payload,
                route_values,
                message.headers,
                content_type=None,
                default_key=_default_key(kind, route_values),
                bridge_id=SAMPLE_ID,
            )
        except RejectedMessage as exc:
            yield f"  rejected {exc.reason}: {exc.detail} (on_reject: {route.on_reject})"
            continue
        yield from _render_outbound(route.target.bus, route.target.name, out)


def _default_key(kind: str, values: Mapping[str, str]) -> str | None:
    """The Kafka key of an event when the route sets none (bridge.runtime.room_events)."""
    if kind == "events":
        return values.get("room", "")  # one room's events in order (bridge.runtime.room_activity)
    who = f"{values.get('room', '')}/{values.get('participant', '')}"
    if kind == "attributes":
        return f"{who}/{values.get('key', '')}"
    return who if kind in ("metadata", "presence", "rpc") else None


def _render_outbound(bus: str, name: str, out: Outbound) -> Iterator[str]:
    if bus == "mqtt":
        retain = ", retained" if out.retain else ""
        yield f"  → mqtt {name}: topic {out.topic!r} (QoS {out.qos}{retain})"
    else:
        key = f", key {_show(out.key)}" if out.key is not None else ""
        yield f"  → kafka {name}: topic {out.topic!r}{key}"
    if out.headers:
        yield f"  headers  {_values(dict(out.headers))}"
    yield f"  payload  {_show(out.payload)}"


def _values(values: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in values.items())


def _show(data: bytes | None, limit: int = 200) -> str:
    if data is None:
        return "(none: a delete)"
    try:
        text = repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        text = f"{len(data)} bytes: {data[: limit // 2].hex()}"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} bytes)"
