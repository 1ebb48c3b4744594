"""Request/reply config, request parsing, reply parsing and the persistent reply cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bridge.config import ConfigError, parse_config
from bridge.envelope import Envelope
from bridge.errors import RejectedMessage
from bridge.room.errors import RpcError
from bridge.router import ToBusRoute, ToRoomRoute, compile_routes
from bridge.rpcbridge import ReplyCache, RpcOutcome, parse_reply, parse_request

HEAD = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: a-secret-of-at-least-32-characters!
  rooms: [lobby]
mqtt:
  plant:
    host: 127.0.0.1
  old:
    host: 127.0.0.1
    protocol: "3.1.1"
kafka:
  main:
    bootstrap_servers: [127.0.0.1:9092]
connectors:
"""

GOOD = (
    HEAD
    + """\
  - name: m5
    from: {mqtt: plant, topic: "rpc/{device}/{method}", reply: {}}
    to: {room: lobby, rpc: {destination: "{device}", method: "{header.method}", timeout: 5}}
  - name: m3
    from: {mqtt: old, topic: "req/{device}", reply: {reply_topic: "res/{device}/{field.who}"}}
    to: {room: lobby, rpc: {destination: "{device}", method: "{field.method}"}}
  - name: k
    from: {kafka: main, topics: [req], reply: {preset: spring}}
    to: {room: lobby, rpc: {destination: "{key}", method: "{header.m}"}}
  - name: out
    from: {room: "*", rpc: {methods: ["bus.*", exact], reply_topic: "replies/bridge"}}
    to: {mqtt: plant, topic: "svc/{room}/{method}"}
  - name: kout
    from: {room: "*", rpc: {methods: ["k.*"], reply_topic: svc-replies,
           kafka_reply: {preset: custom, reply_to_header: rt, correlation_header: cid}}}
    to: {kafka: main, topic: "svc-requests"}
"""
)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml")
    return err.value.problems


def test_good_rpc_config_compiles() -> None:
    routes = {r.name: r for r in compile_routes(parse_config(GOOD))}
    m5 = routes["m5"]
    assert isinstance(m5, ToRoomRoute) and m5.target.kind == "rpc"
    assert m5.target.rpc is not None and m5.target.rpc.timeout == 5
    assert isinstance(routes["out"], ToBusRoute) and routes["out"].kind == "rpc"
    k = routes["k"]
    assert isinstance(k, ToRoomRoute) and isinstance(k.source.reply, object)
    assert k.source.reply is not None
    assert k.source.reply.header_names == ("kafka_replyTopic", "kafka_correlationId")  # type: ignore[union-attr]


RPC_IN = (
    '  - name: x\n    from: {mqtt: plant, topic: "rpc/{d}"%s}\n    to: {room: lobby, rpc: %s}\n'
)
BAD = [
    (
        HEAD + RPC_IN % (", reply: {}", '{destination: "{d}", method: "{header}"}'),
        "bad.yaml:18: connectors[0].to.rpc.method: unknown placeholder {header} "
        "(known: broker, d, topic)",
    ),
    (
        HEAD + RPC_IN % (", reply: {}", '{destination: "{d}", method: "{field.m}"}'),
        "bad.yaml:18: connectors[0].to.rpc.method: unknown placeholder {field.m} "
        "(known: broker, d, topic)",
    ),
    (
        HEAD + RPC_IN % (", reply: {}", '{destination: "{d}", method: m, timeout: 0}'),
        "bad.yaml:18: connectors[0].to.rpc.timeout: Input should be greater than 0 (got 0)",
    ),
    (
        HEAD + RPC_IN % (", reply: {}", '{destination: "{d}", method: m, colour: red}'),
        "bad.yaml:18: connectors[0].to.rpc.colour: unknown key (check its spelling and its "
        "section)",
    ),
    (
        HEAD
        + '  - name: x\n    from: {mqtt: old, topic: "rpc/{d}"}\n'
        + '    to: {room: lobby, rpc: {destination: "{d}", method: m}}\n',
        "bad.yaml:17: connectors[0].from.reply: MQTT 3.1.1 has no response topic: set "
        "reply.reply_topic (JSON convention)",
    ),
    (
        HEAD
        + '  - name: x\n    from: {mqtt: plant, topic: "t", reply: {}}\n'
        + "    to: {room: lobby, packet: {}}\n",
        "bad.yaml:17: connectors[0].from.reply: reply applies only to a connector whose "
        "target is rpc",
    ),
    (
        HEAD
        + "  - name: x\n    from: {kafka: main, topics: [t], reply: {preset: custom}}\n"
        + '    to: {room: lobby, rpc: {destination: "{key}", method: m}}\n',
        "bad.yaml:17: connectors[0].from.reply: preset custom needs reply_to_header and "
        "correlation_header",
    ),
    (
        HEAD
        + '  - name: x\n    from: {room: "*", rpc: {methods: [a], reply_topic: "r/+"}}\n'
        + "    to: {mqtt: plant, topic: t}\n",
        "bad.yaml:17: connectors[0].from.rpc.reply_topic: must be a plain MQTT topic "
        "(no wildcard, no placeholder)",
    ),
    (
        HEAD
        + '  - name: x\n    from: {room: "*", rpc: {methods: [a], reply_topic: "bad topic"}}\n'
        + "    to: {kafka: main, topic: t}\n",
        "bad.yaml:17: connectors[0].from.rpc.reply_topic: is not a valid Kafka topic name",
    ),
    (
        HEAD
        + '  - name: x\n    from: {room: "*", rpc: {methods: [a], reply_topic: r}}\n'
        + "    to: {mqtt: old, topic: t}\n",
        "bad.yaml:18: connectors[0].to.mqtt: room-to-bus RPC needs MQTT 5 (response topic "
        "and correlation data)",
    ),
    (
        HEAD
        + '  - name: x\n    from: {room: "*", rpc: {methods: [], reply_topic: r}}\n'
        + "    to: {mqtt: plant, topic: t}\n",
        "bad.yaml:17: connectors[0].from.rpc.methods: List should have at least 1 item after "
        "validation, not 0 (got a list)",
    ),
    (
        HEAD
        + '  - name: x\n    from: {mqtt: old, topic: "q/{d}", reply: {reply_topic: "r/{nope}"}}\n'
        + '    to: {room: lobby, rpc: {destination: "{d}", method: m}}\n',
        "bad.yaml:17: connectors[0].from.reply.reply_topic: unknown placeholder {nope} "
        "(known: broker, d, topic)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[str(i + 1) for i in range(len(BAD))])
def test_bad_rpc_config_message(text: str, expected: str) -> None:
    assert expected in errors(text)


def _routes() -> dict[str, ToRoomRoute]:
    return {r.name: r for r in compile_routes(parse_config(GOOD)) if isinstance(r, ToRoomRoute)}


def test_mqtt5_request_takes_reply_address_deadline_and_headers() -> None:
    route = _routes()["m5"]
    env = Envelope(
        b"p",
        "mqtt:plant",
        "rpc/d1/x",
        headers={"method": "ping", "rpc-deadline": str(int((time.time() + 2) * 1000))},
        response_topic="answers/1",
        correlation_data=b"\x00\x01",
        expiry=60,
    )
    values = route.match(env)
    assert values is not None
    req = parse_request(route, env, values)
    assert (req.reply_topic, req.correlation) == ("answers/1", b"\x00\x01")
    assert req.values["header.method"] == "ping"
    assert 1.0 < req.timeout <= 2.0  # the deadline header is nearer than timeout and expiry
    assert req.dedup_key == "answers/1\x000001"
    no_reply = Envelope(b"p", "mqtt:plant", "rpc/d1/x")
    with pytest.raises(RejectedMessage, match="no_reply_address"):
        parse_request(route, no_reply, route.match(no_reply) or {})


def test_mqtt5_expiry_cuts_the_deadline() -> None:
    route = _routes()["m5"]
    env = Envelope(
        b"", "mqtt:plant", "rpc/d/m", response_topic="a", expiry=1, received_at=time.time() - 3
    )
    assert parse_request(route, env, route.match(env) or {}).timeout < 0


def test_json_request_fields_and_reply_topic() -> None:
    route = _routes()["m3"]
    body = json.dumps({"correlation_id": 5, "method": "go", "who": "c9", "payload": {"a": 1}})
    env = Envelope(body.encode(), "mqtt:old", "req/d2")
    req = parse_request(route, env, route.match(env) or {})
    assert (req.reply_topic, req.json_correlation, req.payload_bytes) == (
        "res/d2/c9",
        5,
        b'{"a": 1}',
    )
    assert req.values["field.method"] == "go"
    for bad in (b"[1]", b"{", b'{"payload": "x", "who": "c"}'):
        with pytest.raises(RejectedMessage):
            parse_request(route, Envelope(bad, "mqtt:old", "req/d2"), {"device": "d2"})
    # A value that would break the reply topic is refused, never published.
    evil = json.dumps({"correlation_id": "1", "who": "a/#"}).encode()
    with pytest.raises(RejectedMessage, match="bad_reply_topic"):
        parse_request(route, Envelope(evil, "mqtt:old", "req/d2"), {"device": "d2"})


def test_kafka_request_needs_a_valid_reply_topic() -> None:
    route = _routes()["k"]
    ok = Envelope(
        b"x",
        "kafka",
        "req",
        key=b"d1",
        headers={"kafka_replyTopic": "replies", "kafka_correlationId": "c1"},
    )
    req = parse_request(route, ok, route.match(ok) or {})
    assert (req.reply_topic, req.correlation, req.key) == ("replies", b"c1", b"d1")
    bad = Envelope(b"x", "kafka", "req", headers={"kafka_replyTopic": "no/slash"})
    with pytest.raises(RejectedMessage):
        parse_request(route, bad, route.match(bad) or {})


def test_parse_reply_maps_errors_one_to_one() -> None:
    assert parse_reply({}, b"fine") == "fine"
    err = parse_reply(
        {"rpc-status": "error", "rpc-error-code": "1504", "rpc-error-message": "m"}, b""
    )
    assert isinstance(err, RpcError) and (err.code, err.message, err.data) == (1504, "m", None)
    odd = parse_reply({"rpc-status": "error", "rpc-error-code": "x"}, b"")
    assert isinstance(odd, RpcError) and odd.code == RpcError.APPLICATION_ERROR
    assert isinstance(parse_reply({}, b"\xff"), RpcError)


def test_reply_cache_persists_and_is_bounded(tmp_path: Path) -> None:
    cache = ReplyCache(str(tmp_path), window=600, max_entries=3)
    cache.put("a", RpcOutcome(True, "A"))
    cache.put("b", RpcOutcome.error(RpcError(4001, "no", "d")))
    cache.close()
    again = ReplyCache(str(tmp_path), window=600, max_entries=3)
    assert again.get("a") == RpcOutcome(True, "A")
    assert again.get("b") == RpcOutcome(False, "", 4001, "no", "d")
    for key in "cdef":
        again.put(key, RpcOutcome(True, key))
    again.prune()
    assert len(again) == 3 and again.get("a") is None
    again.close()
    short = ReplyCache(None, window=0.01, max_entries=10)
    short.put("k", RpcOutcome(True, "v"))
    time.sleep(0.02)
    assert short.get("k") is None
    short.close()
