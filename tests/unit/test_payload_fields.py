"""``{payload.x}`` fields in templates and the `map` step, both directions; config errors."""

from __future__ import annotations

import json

import pytest

from bridge.config import ConfigError, parse_config
from bridge.envelope import Envelope, Outbound
from bridge.errors import RejectedMessage
from bridge.router import RoomMessage, ToBusRoute, ToRoomRoute, compile_routes
from tests.unit.configs import head

HEAD = head("plant-berlin", kafka=True)


def errors(route: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(HEAD + route, "bad.yaml")
    return err.value.problems


def to_bus(route: str) -> ToBusRoute:
    (compiled,) = compile_routes(parse_config(HEAD + route))
    assert isinstance(compiled, ToBusRoute)
    return compiled


def to_room(route: str) -> ToRoomRoute:
    (compiled,) = compile_routes(parse_config(HEAD + route))
    assert isinstance(compiled, ToRoomRoute)
    return compiled


def publish(route: ToBusRoute, payload: bytes | None, room: str = "plant-berlin") -> Outbound:
    values = {"room": room, "participant": "alice", "topic": "t", "kind": "packet-reliable"}
    message = RoomMessage("packet", payload, values, {})
    return route.target.outbound(
        payload, route.values(message), {}, content_type=None, default_key=None, bridge_id="b"
    )


def reason(call: object) -> str:
    assert callable(call)
    with pytest.raises(RejectedMessage) as err:
        call()
    return err.value.reason


TO_BUS = """\
  - name: r
    from: {room: "plant-{site}", packet: {topic: "*"}}
    to:
      kafka: main
      topic: "telemetry.{site}"
      key: "{payload.device_id}"
      headers: {line: "{payload.pos.line}", first: "{payload.tags.0}", n: "{payload.n}"}
"""


def test_payload_fields_in_a_kafka_key_and_headers() -> None:
    route = to_bus(TO_BUS)
    body = {"device_id": "d1", "pos": {"line": 3}, "tags": ["hot", "x"], "n": 2.5}
    out = publish(route, json.dumps(body).encode())
    assert out.key == b"d1"
    headers = dict(out.headers)
    assert (headers["line"], headers["first"], headers["n"]) == ("3", "hot", "2.5")
    assert out.payload == json.dumps(body).encode()


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b'{"pos": {"line": 1}, "tags": ["a"], "n": 1}', "payload_field_missing"),
        (
            b'{"device_id": null, "pos": {"line": 1}, "tags": ["a"], "n": 1}',
            "payload_field_missing",
        ),
        (b'{"device_id": "d", "pos": {"line": 1}, "tags": [], "n": 1}', "payload_field_missing"),
        (b'{"device_id": "d", "pos": 7, "tags": ["a"], "n": 1}', "payload_field_missing"),
        (
            b'{"device_id": {"a": 1}, "pos": {"line": 1}, "tags": ["a"], "n": 1}',
            "payload_field_not_scalar",
        ),
        (b'{"device_id": "", "pos": {"line": 1}, "tags": ["a"], "n": 1}', "bad_template_value"),
        (None, "payload_field_missing"),  # a delete has no fields
    ],
)
def test_a_payload_without_the_field_is_rejected_with_a_reason(
    payload: bytes | None, why: str
) -> None:
    route = to_bus(TO_BUS)
    assert reason(lambda: publish(route, payload)) == why


def test_payload_values_get_the_checks_of_their_target() -> None:
    route = to_bus(
        '  - name: r\n    from: {room: "*", packet: {}}\n'
        '    to: {mqtt: plant, topic: "devices/{payload.device}/state"}\n'
    )
    assert publish(route, b'{"device": "d7"}').topic == "devices/d7/state"
    for bad in ("a/b", "+", "#", "$SYS"):
        body = json.dumps({"device": bad}).encode()
        assert reason(lambda body=body: publish(route, body)) == "bad_template_value"


def test_routes_without_payload_fields_never_parse_the_payload() -> None:
    route = to_bus(
        '  - name: r\n    from: {room: "*", packet: {}}\n    to: {mqtt: plant, topic: "x/{room}"}\n'
    )
    assert not route.target.fields
    assert publish(route, b"not json at all").payload == b"not json at all"


def test_map_builds_the_outgoing_json() -> None:
    route = to_bus(
        """\
  - name: r
    from: {room: "plant-{site}", packet: {topic: "*"}}
    to: {mqtt: plant, topic: "state/{site}"}
    map:
      id: "{payload.device_id}"
      reading: "{payload.value}"
      where: "{site}/{payload.pos.line}"
      raw: "{payload.pos}"
"""
    )
    body = {"device_id": "d1", "value": 21.5, "pos": {"line": 3}, "secret": "s"}
    out = publish(route, json.dumps(body).encode())
    assert json.loads(out.payload or b"") == {
        "id": "d1",
        "reading": 21.5,  # a whole {payload.x} keeps its JSON type
        "where": "berlin/3",  # anything else is a string
        "raw": {"line": 3},
    }
    assert out.content_type == "application/json"
    assert reason(lambda: publish(route, b'{"device_id": "d1"}')) == "payload_field_missing"


def test_map_of_captures_only_needs_no_json_payload() -> None:
    route = to_bus(
        '  - name: r\n    from: {room: "plant-{site}", packet: {}}\n'
        '    to: {mqtt: plant, topic: "x"}\n    map: {site: "{site}", room: "{room}"}\n'
    )
    assert not route.target.fields
    out = publish(route, b"binary \xff")
    assert json.loads(out.payload or b"") == {"site": "berlin", "room": "plant-berlin"}


# ----------------------------------------------------------------------------- bus to room


FROM_KAFKA = """\
  - name: r
    from: {kafka: main, topics: [commands]}
    to:
      room: "plant-{payload.site}"
      packet: {topic: "cmd.{payload.cmd.name}", destinations: ["{payload.device}"]}
"""


def envelope(payload: bytes, topic: str = "commands") -> Envelope:
    return Envelope(payload, "kafka:main", topic, key=b"k", partition=0)


def test_payload_fields_in_the_room_topic_and_destinations() -> None:
    route = to_room(FROM_KAFKA)
    env = envelope(b'{"site": "berlin", "device": "d1", "cmd": {"name": "open"}}')
    values = route.match(env)
    assert values is not None
    delivery = route.delivery(env, values)
    assert delivery.room == "plant-berlin"
    assert delivery.topic == "cmd.open"
    assert delivery.destinations == ("d1",)
    assert delivery.payload == env.payload


def test_bus_payload_without_the_field_is_rejected() -> None:
    route = to_room(FROM_KAFKA)
    for body, why in [
        (b'{"site": "berlin", "device": "d1"}', "payload_field_missing"),
        (b"[1, 2", "malformed_json"),
    ]:
        env = envelope(body)
        values = route.match(env)
        assert values is not None
        assert reason(lambda env=env, values=values: route.delivery(env, values)) == why


def test_payload_fields_read_the_payload_after_its_format() -> None:
    route = to_room(
        '  - name: r\n    from: {mqtt: plant, topic: "d/{device}", format: json}\n'
        '    to: {room: "plant-berlin", packet: {topic: "{payload.kind}"}}\n'
        '    map: {device: "{device}", v: "{payload.v}"}\n'
    )
    inner = json.dumps({"kind": "temp", "v": [1, 2]})
    env = Envelope(json.dumps({"payload": inner}).encode(), "mqtt:plant", "d/d1")
    values = route.match(env)
    assert values is not None
    delivery = route.delivery(env, values)
    assert delivery.topic == "temp"
    assert json.loads(delivery.payload) == {"device": "d1", "v": [1, 2]}
    assert delivery.content_type == "application/json"


def test_rpc_method_and_callee_from_payload_fields() -> None:
    route = to_room(
        "  - name: r\n    from: {kafka: main, topics: [rpc]}\n"
        '    to: {room: "plant-berlin", rpc: {destination: "{payload.to}",'
        ' method: "{payload.method}"}}\n'
    )
    values = route.match(envelope(b'{"to": "d1", "method": "reboot"}', "rpc"))
    assert values is not None
    assert (values["payload.to"], values["payload.method"]) == ("d1", "reboot")
    # Unreadable: left out, so the RPC bridge answers with an error instead of calling.
    values = route.match(envelope(b"nope", "rpc"))
    assert values is not None and "payload.method" not in values


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            '  - name: r\n    from: {room: "*", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x/{payload.}"}\n',
            "bad.yaml:15: connectors[0].to.topic: unknown placeholder {payload.}",
        ),
        (
            '  - name: r\n    from: {room: "*", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x/{payload.a..b}"}\n',
            "bad.yaml:15: connectors[0].to.topic: unknown placeholder {payload.a..b}",
        ),
        (
            '  - name: r\n    from: {room: "*", packet: {}}\n    to: {mqtt: plant, topic: "x"}\n'
            '    map: {a: "{payload.a}", b: "{nope}"}\n',
            "bad.yaml:16: connectors[0].map.b: unknown placeholder {nope}",
        ),
        (
            '  - name: r\n    from: {room: "*", packet: {}}\n    to: {mqtt: plant, topic: "x"}\n'
            "    map: {}\n",
            "bad.yaml:16: connectors[0].map: map is empty",
        ),
        (
            "  - name: r\n    from: {kafka: main, topics: [rpc]}\n"
            '    to: {room: "lobby", rpc: {destination: "d", method: "m"}}\n'
            '    map: {a: "{payload.a}"}\n',
            "bad.yaml:16: connectors[0].map: map does not apply to rpc targets",
        ),
        (
            '  - name: r\n    from: {room: "*", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x/{payload.a}"}\n    map: {a: "{payload.a"}\n',
            "bad.yaml:16: connectors[0].map.a: unbalanced braces",
        ),
    ],
)
def test_bad_payload_references_are_located_config_errors(route: str, message: str) -> None:
    problems = errors(route)
    assert any(p.startswith(message) for p in problems), problems
