"""Configuration loading: the example loads; every bad input gets an exact, located message."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, json_schema, load_config, parse_config
from bridge.router import ToBusRoute, ToRoomRoute, compile_routes

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: a-secret-of-at-least-32-characters!
  rooms: [lobby]
mqtt:
  plant:
    host: 127.0.0.1
kafka:
  main:
    bootstrap_servers: [127.0.0.1:9092]
connectors:
  - name: in
    from: {mqtt: plant, topic: "devices/{site}/{device}/telemetry"}
    to: {room: "lobby", packet: {topic: "t.{device}"}}
  - name: out
    from: {room: "*", packet: {topic: "*"}}
    to: {kafka: main, topic: "lk.{room}", key: "{participant}"}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml")
    return err.value.problems


def test_example_config_loads_and_compiles() -> None:
    config = load_config(ROOT / "config.example.yaml")
    routes = compile_routes(config)
    assert {r.name for r in routes} >= {"telemetry-in", "commands-out", "chat-to-kafka"}
    assert any(isinstance(r, ToRoomRoute) for r in routes)
    assert any(isinstance(r, ToBusRoute) for r in routes)


def test_base_config_is_valid() -> None:
    assert len(parse_config(BASE).connectors) == 2


BAD = [
    # 1. unknown placeholder in a template
    (
        BASE.replace('"t.{device}"', '"t.{devic}"'),
        "bad.yaml:15: connectors[0].to.packet.topic: unknown placeholder {devic} "
        "(known: broker, device, site, topic)",
    ),
    # 2. a broker that is not defined
    (
        BASE.replace("{mqtt: plant, topic", "{mqtt: plnat, topic"),
        "bad.yaml:14: connectors[0].from.mqtt: unknown MQTT broker 'plnat' (plant)",
    ),
    # 3. a Kafka cluster that is not defined
    (
        BASE.replace("{kafka: main,", "{kafka: mian,"),
        "bad.yaml:18: connectors[1].to.kafka: unknown Kafka cluster 'mian' (main)",
    ),
    # 4. port out of range
    (
        BASE.replace("    host: 127.0.0.1\n", "    host: 127.0.0.1\n    port: 70000\n"),
        "bad.yaml:9: mqtt.plant.port: Input should be less than or equal to 65535 (got 70000)",
    ),
    # 5. unknown key
    (
        BASE.replace("    host: 127.0.0.1\n", "    host: 127.0.0.1\n    hots: x\n"),
        "bad.yaml:9: mqtt.plant.hots: unknown key (check its spelling and its section)",
    ),
    # 6. missing required key
    (
        BASE.replace("  url: ws://127.0.0.1:7880\n", ""),
        "bad.yaml:1: livekit.url: required key is missing",
    ),
    # 7. bad URL scheme
    (
        BASE.replace("ws://127.0.0.1:7880", "ftp://x"),
        "bad.yaml:2: livekit.url: expected ws://host:port, wss://, http:// or https://",
    ),
    # 8. short API secret
    (
        BASE.replace("a-secret-of-at-least-32-characters!", "short"),
        "bad.yaml:4: livekit.api_secret: must be at least 32 characters "
        "(livekit-server refuses shorter)",
    ),
    # 9. an MQTT wildcard in a topic template
    (
        BASE.replace(
            'to: {kafka: main, topic: "lk.{room}", key: "{participant}"}',
            'to: {mqtt: plant, topic: "rooms/+/{room}"}',
        ),
        "bad.yaml:18: connectors[1].to.topic: MQTT topic template 'rooms/+/{room}' "
        "contains a wildcard",
    ),
    # 10. invalid Kafka topic characters
    (
        BASE.replace('topic: "lk.{room}"', 'topic: "lk/{room}"'),
        "bad.yaml:18: connectors[1].to.topic: Kafka topic template 'lk/{room}': topic names "
        "allow only letters, digits, '.', '_' and '-'",
    ),
    # 11. bus to bus
    (
        BASE.replace(
            'to: {room: "lobby", packet: {topic: "t.{device}"}}',
            'to: {kafka: main, topic: "x"}',
        ),
        "bad.yaml:13: connectors[0]: a connector goes from a room to a bus "
        "(mqtt/kafka) or from a bus to a room",
    ),
    # 12. no endpoint kind
    (
        BASE.replace('from: {room: "*", packet: {topic: "*"}}', "from: {rooom: x}"),
        "bad.yaml:17: connectors[1].from: an endpoint with one of the keys mqtt, kafka or room",
    ),
    # 13. two room kinds at once
    (
        BASE.replace('packet: {topic: "*"}}', "packet: {}, presence: {}}"),
        "bad.yaml:17: connectors[1].from: give exactly one of packet, text_stream, byte_stream, "
        "data_track, attributes, metadata, room_metadata, presence, events, rpc (got 2)",
    ),
    # 14. invalid QoS
    (
        BASE.replace('telemetry"}', 'telemetry", qos: 3}'),
        "bad.yaml:14: connectors[0].from.qos: Input should be 0, 1 or 2 (got 3)",
    ),
    # 15. missing environment variable
    (
        BASE.replace("devkey", "${ROOMBUS_TEST_SURELY_UNSET}"),
        "bad.yaml:3: livekit.api_key: environment variable ROOMBUS_TEST_SURELY_UNSET is not set "
        "(use ${ROOMBUS_TEST_SURELY_UNSET:-default} for a default)",
    ),
    # 16. YAML syntax error
    (
        BASE.replace("rooms: [lobby]", "rooms: [lobby"),
        "bad.yaml:6: invalid YAML: did not find expected ',' or ']'",
    ),
    # 17. duplicate key
    (
        BASE.replace("    host: 127.0.0.1\n", "    host: 127.0.0.1\n    host: 10.0.0.1\n"),
        "bad.yaml:9: mqtt.plant.host: duplicate key 'host'",
    ),
    # 18. duplicate connector names
    (
        BASE.replace("- name: out", "- name: in"),
        "bad.yaml:16: connectors[1].name: duplicate connector name 'in'",
    ),
    # 19. no rooms at all
    (
        BASE.replace("  rooms: [lobby]\n", ""),
        "bad.yaml:1: livekit: name at least one room in rooms or room_patterns",
    ),
    # 20. malformed topic filter
    (
        BASE.replace("devices/{site}/{device}/telemetry", "devices/#/{device}"),
        "bad.yaml:14: connectors[0].from.topic: '#' must be the last level of filter "
        "'devices/#/{device}'",
    ),
    # 21. bootstrap server without port
    (
        BASE.replace("[127.0.0.1:9092]", "[kafka]"),
        "bad.yaml:11: kafka.main.bootstrap_servers: 'kafka' is not host:port",
    ),
    # 22. wrong type
    (
        BASE.replace("    host: 127.0.0.1\n", "    host: 127.0.0.1\n    keepalive: often\n"),
        "bad.yaml:9: mqtt.plant.keepalive: Input should be a valid integer, unable to parse "
        "string as an integer (got 'often')",
    ),
    # 23. a TLS file that does not exist
    (
        BASE.replace(
            "    host: 127.0.0.1\n", "    host: 127.0.0.1\n    tls: {ca_file: /nope.pem}\n"
        ),
        "bad.yaml:9: mqtt.plant.tls: ca_file '/nope.pem' is not a readable file",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[str(i + 1) for i in range(len(BAD))])
def test_bad_config_message(text: str, expected: str) -> None:
    assert expected in errors(text)


def test_environment_interpolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RB_HOST", "broker.example")
    text = BASE.replace("host: 127.0.0.1", "host: ${RB_HOST}").replace(
        "devkey", "${RB_KEY:-fallback-key}"
    )
    config = parse_config(text)
    assert config.mqtt["plant"].host == "broker.example"
    assert config.livekit.api_key == "fallback-key"


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: cannot read: No such file"):
        load_config(tmp_path / "nowhere.yaml")


def test_json_schema_covers_every_section() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == {"livekit", "mqtt", "kafka", "connectors", "bridge"}
