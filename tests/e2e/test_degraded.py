"""Degraded, not dead: what is down is reported and waited for; what can never work is decided once.

Against the real servers: a Kafka cluster that is not there at start (a port where nothing
listens, on loopback) leaves the MQTT routes working and `/ready` naming the Kafka endpoints;
a record Kafka refuses for good (over the producer's ``max_request_size``) is dropped once,
counted, and the route goes on with the next message.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
import uuid

from bridge.health import HealthServer
from tests.e2e.conftest import KafkaPeer, MqttPeer, bridge_yaml, run_bridge, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_kafka_down_at_start_leaves_mqtt_working_and_ready_names_it(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    dead = _free_port()  # nothing listens there
    health = _free_port()
    body = f"""\
kafka:
  main: {{bootstrap_servers: ["127.0.0.1:{dead}"]}}
connectors:
  - name: in
    from: {{mqtt: bus, topic: "in/{{x}}", qos: 1}}
    to: {{room: "{room_name}", packet: {{topic: "t"}}}}
  - name: out
    from: {{room: "*", packet: {{topic: "k"}}}}
    to: {{kafka: main, topic: "never"}}
"""
    got: asyncio.Queue[bytes] = asyncio.Queue()
    async with sdk_peer(livekit_server, room_name, "reader") as reader:
        reader.on("data_received", lambda p: got.put_nowait(p.data))
        config = bridge_yaml(livekit_server, mosquitto, None, room_name, body)
        async with run_bridge(config) as bridge:
            server = HealthServer(bridge, health)  # what `roombus run` serves on http_port
            await server.start()
            await eventually(lambda: "bridge" in reader.remote_participants, what="bridge joined")
            await mqtt_peer.publish("in/a", b"still flowing")
            assert await asyncio.wait_for(got.get(), 20) == b"still flowing"
            code, status = await asyncio.to_thread(_get, f"http://127.0.0.1:{health}/ready")
            assert code == 503
            assert status["endpoints_not_connected"] == ["kafka:main"]
            assert status["rooms_not_connected"] == []
            code, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{health}/ping")
            assert code == 200
            # A room message for the Kafka route waits (buffered), it is not a rejection.
            await reader.local_participant.publish_data(b"for later", topic="k")
            await eventually(
                lambda: bridge.counters["route.out.received"] == 1, what="buffered for Kafka"
            )
            assert bridge.counters["route.out.published"] == 0
            assert not any(k.startswith("route.out.rejected") for k in bridge.counters)
            await server.stop()


async def test_a_record_kafka_refuses_for_good_is_dropped_once_and_the_route_goes_on(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    topic = unique("sized")
    await kafka_peer.create_topic(topic)
    body = f"""\
connectors:
  - name: out
    from: {{room: "*", packet: {{topic: "k"}}}}
    to: {{kafka: main, topic: "{topic}"}}
"""
    config = bridge_yaml(livekit_server, None, kafka, room_name, body).replace(
        "    group_id:", "    max_request_size: 4096\n    group_id:"
    )
    consumer = await kafka_peer.consumer(topic)
    async with (
        run_bridge(config) as bridge,
        sdk_peer(livekit_server, room_name, f"p-{uuid.uuid4().hex[:4]}") as peer,
    ):
        await eventually(lambda: "bridge" in peer.remote_participants, what="bridge joined")
        await peer.local_participant.publish_data(b"x" * 10_000, topic="k")  # over 4096
        await peer.local_participant.publish_data(b"small", topic="k")
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.value == b"small"
        assert bridge.counters["route.out.rejected.refused"] == 1
        assert bridge.counters["route.out.dropped.refused"] == 1
        assert bridge.counters["route.out.publish_retries"] == 0  # decided once, never retried
