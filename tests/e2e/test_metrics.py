"""`/metrics` and `/status` after real traffic: every route kind, a rejection, a dead letter.

One bridge against the real livekit-server, Mosquitto and Kafka, one official-SDK participant
(``dev1``) that reads what the bridge delivers, sends what the room-to-bus routes carry, serves
RPC methods and calls the bridge's. The test counts what it sent, waits until every message
arrived where it was going, then scrapes ``/metrics`` over HTTP, parses it with
prometheus_client's parser and checks each family against those counts; ``/status`` must
agree.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from livekit import rtc
from paho.mqtt.enums import MQTTProtocolVersion
from prometheus_client.parser import text_string_to_metric_families

from bridge.health import HealthServer
from tests.e2e.conftest import KafkaPeer, MqttPeer, bridge_yaml, kafka_assigned, run_bridge, unique
from tests.e2e.test_rpc_bridge import Device, MqttBackend, _bridge_sees, props5, requester
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = await r.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/status") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` whose labels include `labels` (exactly one must)."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def absent(samples: Samples, name: str, **labels: str) -> bool:
    want = set(labels.items())
    return not any(n == name and want <= set(ls) for (n, ls) in samples)


async def test_metrics_and_status_count_real_traffic_on_every_route_kind(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    mqtt_peer: MqttPeer,
    kafka: Kafka,
    kafka_peer: KafkaPeer,
    room_name: str,
) -> None:
    k_in, k_out, dlq = unique("m-in"), unique("m-out"), unique("m-dlq")
    for topic in (k_in, k_out, dlq):
        await kafka_peer.create_topic(topic)
    body = f"""\
connectors:
  - name: mqtt-in
    from: {{mqtt: bus, topic: "min/{{dev}}", format: json}}
    to: {{room: "{room_name}", packet: {{topic: "tele"}}}}
  - name: mqtt-out
    from: {{room: "*", packet: {{topic: "cmd"}}}}
    to: {{mqtt: bus, topic: "mout/{{participant}}"}}
  - name: kafka-in
    from: {{kafka: main, topics: [{k_in}]}}
    to: {{room: "{room_name}", text_stream: {{topic: "kin"}}}}
    dead_letter: {{kafka: main, topic: "{dlq}"}}
  - name: kafka-out
    from: {{room: "*", text_stream: {{topic: "kout"}}}}
    to: {{kafka: main, topic: "{k_out}"}}
  - name: rpc-in
    from: {{mqtt: bus, topic: "mrpc/{{device}}/{{method}}", reply: {{}}}}
    to: {{room: "{room_name}",
          rpc: {{destination: "{{device}}", method: "{{method}}", timeout: 5}}}}
  - name: rpc-out
    from: {{room: "*",
            rpc: {{methods: ["bus.*"], reply_topic: "mreplies/{room_name}", timeout: 5}}}}
    to: {{mqtt: bus, topic: "msvc/{{room}}/{{method}}"}}
"""
    port = free_port()
    packets: asyncio.Queue[bytes] = asyncio.Queue()
    texts: asyncio.Queue[str] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    backend = MqttBackend(mosquitto.port)
    backend.client.subscribe(f"msvc/{room_name}/#", 1)
    assert await asyncio.to_thread(backend._subscribed.wait, 10)
    await mqtt_peer.subscribe("mout/#")
    try:
        async with (
            sdk_peer(livekit_server, room_name, "dev1") as dev,
            requester(mosquitto.port, MQTTProtocolVersion.MQTTv5) as req,
        ):
            Device(dev)  # serves echo and fail
            dev.on("data_received", lambda p: packets.put_nowait(p.data))

            async def read(stream: rtc.TextStreamReader) -> None:
                texts.put_nowait(await stream.read_all())

            dev.register_text_stream_handler(
                "kin", lambda s, _i: tasks.add(asyncio.ensure_future(read(s)))
            )
            await req.subscribe("manswers/#")
            config = bridge_yaml(livekit_server, mosquitto, kafka, room_name, body)
            async with run_bridge(config) as bridge:
                server = HealthServer(bridge, port)
                await server.start()
                try:
                    await _bridge_sees(bridge, room_name, "dev1")
                    await eventually(lambda: "bridge" in dev.remote_participants, what="bridge")
                    await kafka_assigned(bridge)
                    await _traffic(dev, mqtt_peer, kafka_peer, req, k_in, k_out, packets, texts)
                    c = bridge.counters
                    await eventually(
                        lambda: (
                            c["route.mqtt-in.rejected.malformed_json"] == 1
                            and c["route.kafka-in.dead_lettered"] == 1
                            and c["route.rpc-in.delivered"] == 3
                        ),
                        timeout=30,
                        what="the rejection, the dead letter and the RPC acknowledgements",
                    )
                    before = await status(port)
                    samples = await scrape(port)
                    after = await status(port)
                    _check_metrics(samples, room_name)
                    _check_status(before, after, samples, room_name)
                finally:
                    await server.stop()
    finally:
        backend.close()


async def _traffic(
    dev: rtc.Room,
    mqtt_peer: MqttPeer,
    kafka_peer: KafkaPeer,
    req: Any,
    k_in: str,
    k_out: str,
    packets: asyncio.Queue[bytes],
    texts: asyncio.Queue[str],
) -> None:
    """Send what `_check_metrics` counts, and wait until each message arrived."""
    # MQTT -> room: 5 delivered, 1 malformed (dropped: no dead letter on that route).
    for n in range(5):
        await mqtt_peer.publish(f"min/d{n}", b'{"payload": "p%d"}' % n)
    await mqtt_peer.publish("min/bad", b"{not json")
    assert sorted([await asyncio.wait_for(packets.get(), 30) for _ in range(5)]) == [
        b"p%d" % n for n in range(5)
    ]
    # Kafka -> room: 3 delivered, 1 invalid UTF-8 for a text stream (dead-lettered).
    for n in range(3):
        await kafka_peer.produce(k_in, b"t%d" % n)
    await kafka_peer.produce(k_in, b"\xff\xfe")
    assert sorted([await asyncio.wait_for(texts.get(), 30) for _ in range(3)]) == [
        "t0",
        "t1",
        "t2",
    ]
    # Room -> MQTT: 4 packets; room -> Kafka: 3 text streams.
    consumer = await kafka_peer.consumer(k_out)
    lp = dev.local_participant
    for n in range(4):
        await lp.publish_data(b"c%d" % n, topic="cmd", reliable=True)
    for n in range(3):
        await lp.send_text(f"k{n}", topic="kout")
    got = [(await mqtt_peer.next(30)).payload for _ in range(4)]
    assert sorted(got) == [b"c%d" % n for n in range(4)]
    records = [await asyncio.wait_for(consumer.getone(), 30) for _ in range(3)]
    assert sorted(r.value for r in records) == [b"k0", b"k1", b"k2"]
    # Bus -> room RPC: 2 ok, 1 error 4001.
    for corr, method in ((b"e1", "echo"), (b"e2", "echo"), (b"f1", "fail")):
        req.send(f"mrpc/dev1/{method}", b"x", reply_to="manswers/me", corr=corr)
    assert props5(await req.reply(b"e1"))["rpc-status"] == "ok"
    assert props5(await req.reply(b"e2"))["rpc-status"] == "ok"
    assert props5(await req.reply(b"f1"))["rpc-error-code"] == "4001"
    # Room -> bus RPC: 2 ok, 1 error 4002 from the backend.
    assert await lp.perform_rpc(destination_identity="bridge", method="bus.echo", payload="a")
    assert await lp.perform_rpc(destination_identity="bridge", method="bus.echo", payload="b")
    try:
        await lp.perform_rpc(destination_identity="bridge", method="bus.fail", payload="")
        raise AssertionError("no error")
    except rtc.RpcError as exc:
        assert exc.code == 4002


def _check_metrics(s: Samples, room: str) -> None:
    def r(name: str, route: str, **labels: str) -> float:
        return value(s, name, route=route, **labels)

    # Bus to room.
    mqtt_in = {"direction": "bus_to_room", "bus": "mqtt:bus"}
    assert r("roombus_route_delivered_total", "mqtt-in", **mqtt_in) == 5
    assert r("roombus_route_rejected_total", "mqtt-in", reason="malformed_json") == 1
    assert r("roombus_route_dropped_total", "mqtt-in", reason="malformed_json") == 1
    assert r("roombus_route_latency_seconds_count", "mqtt-in") == 5
    assert r("roombus_route_delivered_total", "kafka-in", bus="kafka:main") == 3
    assert r("roombus_route_rejected_total", "kafka-in", reason="invalid_utf8") == 1
    assert r("roombus_route_dead_lettered_total", "kafka-in") == 1
    assert absent(s, "roombus_route_dropped_total", route="kafka-in")
    assert r("roombus_route_latency_seconds_count", "kafka-in") == 3
    # Room to bus.
    out = {"direction": "room_to_bus"}
    assert r("roombus_route_received_total", "mqtt-out", bus="mqtt:bus", **out) == 4
    assert r("roombus_route_published_total", "mqtt-out") == 4
    assert r("roombus_route_latency_seconds_count", "mqtt-out") == 4
    assert r("roombus_route_received_total", "kafka-out", bus="kafka:main") == 3
    assert r("roombus_route_published_total", "kafka-out") == 3
    assert r("roombus_route_latency_seconds_count", "kafka-out") == 3
    for route in ("mqtt-out", "kafka-out"):
        assert r("roombus_route_queue_depth", route) == 0
        assert r("roombus_route_in_flight", route) == 0
        # Every observation is at most the +Inf bucket, and the buckets are cumulative.
        inf = r("roombus_route_latency_seconds_bucket", route, le="+Inf")
        assert inf == r("roombus_route_latency_seconds_count", route)
        assert r("roombus_route_latency_seconds_sum", route) > 0
    # RPC, both directions.
    calls = "roombus_rpc_calls_total"
    assert r(calls, "rpc-in", direction="bus_to_room", outcome="ok", code="") == 2
    assert r(calls, "rpc-in", outcome="error", code="4001") == 1
    assert r("roombus_rpc_replies_total", "rpc-in", outcome="published") == 3
    assert r("roombus_rpc_duration_seconds_count", "rpc-in") == 3
    assert r(calls, "rpc-out", direction="room_to_bus", outcome="ok", code="") == 2
    assert r(calls, "rpc-out", outcome="error", code="4002") == 1
    assert r("roombus_rpc_duration_seconds_count", "rpc-out") == 3
    assert r("roombus_route_published_total", "rpc-out") == 3
    # Rooms, connections, the bridge.
    assert value(s, "roombus_room_connected", room=room) == 1
    assert value(s, "roombus_rooms_joined") == 1
    assert value(s, "roombus_room_participants", room=room) == 1  # dev1
    assert value(s, "roombus_room_joins_total") == 1
    assert value(s, "roombus_room_packets_received_total", room=room) == 4
    assert value(s, "roombus_bus_connected", bus="mqtt:bus") == 1
    assert value(s, "roombus_bus_connected", bus="kafka:main") == 1
    assert value(s, "roombus_bus_connects_total", bus="mqtt:bus") == 1
    assert value(s, "roombus_ready") == 1
    assert value(s, "roombus_build_info", version="0.1.0") == 1
    assert absent(s, "roombus_task_crashes_total")


def _check_status(before: dict[str, Any], after: dict[str, Any], s: Samples, room: str) -> None:
    """`/status` agrees with `/metrics` (read between the two), and says what is where."""
    families = {
        "received": "roombus_route_received_total",
        "published": "roombus_route_published_total",
        "delivered": "roombus_route_delivered_total",
        "dead_lettered": "roombus_route_dead_lettered_total",
    }
    for route in ("mqtt-in", "mqtt-out", "kafka-in", "kafka-out", "rpc-in", "rpc-out"):
        for key, family in families.items():
            scraped = sum(v for (n, ls), v in s.items() if n == family and ("route", route) in ls)
            assert before["routes"][route]["counts"][key] <= scraped
            assert scraped <= after["routes"][route]["counts"][key], (route, key)
        for key, family in (
            ("rejected", "roombus_route_rejected_total"),
            ("dropped", "roombus_route_dropped_total"),
        ):
            total = sum(v for (n, ls), v in s.items() if n == family and ("route", route) in ls)
            assert after["routes"][route]["counts"][key] == total, (route, key)
    assert after["routes"]["mqtt-in"]["counts"]["delivered"] == 5
    assert after["routes"]["kafka-in"]["counts"]["dead_lettered"] == 1
    assert after["routes"]["mqtt-out"]["direction"] == "room_to_bus"
    assert after["routes"]["kafka-out"]["bus"] == "kafka:main"
    assert "malformed_json" in after["routes"]["mqtt-in"]["last_error"]["message"]
    assert "invalid_utf8" in after["routes"]["kafka-in"]["last_error"]["message"]
    assert after["routes"]["mqtt-out"]["last_error"] is None
    assert after["rooms"][room] == {"connected": True, "participants": ["dev1"], "last_error": None}
    assert after["connections"]["mqtt:bus"]["connected"] is True
    assert after["connections"]["kafka:main"]["connected"] is True
    assert after["ready"] is True
    assert {e["route"] for e in after["errors"]} == {"mqtt-in", "kafka-in"}
