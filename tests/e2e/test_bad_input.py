"""Bad input from a bus or from participants: a clear error, counted, no crash, and a decision
made once per route (``on_reject``): dead-lettered, dropped (nacked upstream) or held."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from livekit import rtc

from tests.e2e.conftest import (
    KafkaPeer,
    MqttPeer,
    bridge_yaml,
    kafka_assigned,
    kafka_source,
    run_bridge,
    unique,
)
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto


async def _committed(kafka: Kafka, group: str, topic: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic, 0))
        return offset
    finally:
        await consumer.stop()


@pytest.mark.parametrize("on_reject", ["drop", "hold"])
async def test_kafka_bad_records_without_dead_letter_are_dropped_or_held(
    livekit_server: LiveKitServer,
    kafka: Kafka,
    kafka_peer: KafkaPeer,
    room_name: str,
    on_reject: str,
) -> None:
    """drop (the default without dead_letter): counted and committed past, so the partition
    goes on; hold: the committed offset stays at the first bad record (the bus keeps it)."""
    topic = unique("bad-in")
    await kafka_peer.create_topic(topic)
    policy = "" if on_reject == "drop" else f"\n    on_reject: {on_reject}"
    body = f"""\
connectors:
  - name: texts
    from: {{kafka: main, topics: [{topic}], format: json}}
    to: {{room: "{room_name}", text_stream: {{topic: "t"}}}}{policy}
"""
    texts: asyncio.Queue[str] = asyncio.Queue()
    async with sdk_peer(livekit_server, room_name, "reader") as reader:
        tasks: set[asyncio.Task[None]] = set()

        async def read(stream: rtc.TextStreamReader) -> None:
            texts.put_nowait(await stream.read_all())

        reader.register_text_stream_handler(
            "t", lambda s, _i: tasks.add(asyncio.ensure_future(read(s)))
        )
        config = bridge_yaml(livekit_server, None, kafka, room_name, body)
        async with run_bridge(config) as bridge:
            group = kafka_source(bridge, "texts").group_id
            await kafka_assigned(bridge)
            await kafka_peer.produce(topic, b'{"payload": "ok 1"}')
            await kafka_peer.produce(topic, b"{not json")  # offset 1: malformed JSON
            await kafka_peer.produce(
                topic, json.dumps({"payload": "x", "encoding": "base64"}).encode()
            )
            await kafka_peer.produce(topic, b"[" * 10_000 + b"]" * 10_000)  # deeply nested
            await kafka_peer.produce(topic, b'{"payload": "ok 2"}')
            assert await asyncio.wait_for(texts.get(), 30) == "ok 1"
            assert await asyncio.wait_for(texts.get(), 30) == "ok 2"  # no crash, order kept
            c = bridge.counters
            await eventually(
                lambda: (
                    c["route.texts.rejected.malformed_json"] == 2
                    and c["route.texts.rejected.malformed_base64"] == 1
                ),
                what="rejections counted",
            )
            if on_reject == "drop":
                assert c["route.texts.dropped.malformed_json"] == 2
                assert c["route.texts.held"] == 0
            else:
                assert c["route.texts.held"] == 3
    assert await _committed(kafka, group, topic) == (5 if on_reject == "drop" else 1)


async def test_kafka_bad_records_go_to_the_dead_letter_topic_and_are_committed(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    topic, dlq = unique("bad-in"), unique("dlq")
    await kafka_peer.create_topic(topic)
    body = f"""\
connectors:
  - name: texts
    from: {{kafka: main, topics: [{topic}]}}
    to: {{room: "{room_name}", text_stream: {{topic: "t"}}}}
    dead_letter: {{kafka: main, topic: "{dlq}"}}
  - name: packets
    from: {{kafka: main, topics: [{topic}-p]}}
    to: {{room: "{room_name}", packet: {{topic: "p", oversize: reject}}}}
    dead_letter: {{kafka: main, topic: "{dlq}"}}
"""
    await kafka_peer.create_topic(f"{topic}-p")
    async with run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)) as bridge:
        group = kafka_source(bridge, "texts").group_id
        await kafka_assigned(bridge)
        await kafka_peer.produce(topic, b"\xff\xfe not utf-8", key=b"k1")
        await kafka_peer.produce(f"{topic}-p", b"x" * 100_000, key=b"k2")  # over the packet limit
        consumer = await kafka_peer.consumer(dlq)
        records = [await asyncio.wait_for(consumer.getone(), 30) for _ in range(2)]
        reasons = {dict((k, v.decode()) for k, v in r.headers)["roombus-error"]: r for r in records}
        assert set(reasons) == {"invalid_utf8", "too_large"}
        assert reasons["invalid_utf8"].value == b"\xff\xfe not utf-8"
        headers = {k: v.decode() for k, v in reasons["too_large"].headers}
        assert headers["roombus-origin-topic"] == f"{topic}-p"
        assert "exceed the data packet limit" in headers["roombus-error-detail"]
        await eventually(
            lambda: (
                bridge.counters["route.texts.dead_lettered"] == 1
                and bridge.counters["route.packets.dead_lettered"] == 1
            ),
            what="dead letters counted",
        )
        await asyncio.sleep(1.5)  # the source commits acknowledged offsets every second
    assert await _committed(kafka, group, topic) == 1


async def test_participant_controlled_values_never_become_mqtt_wildcards(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = """\
connectors:
  - name: out
    from: {room: "*", packet: {}}
    to: {mqtt: bus, topic: "rooms/{room}/{participant}/{topic}"}
"""
    await mqtt_peer.subscribe("rooms/#")
    async with (
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
        sdk_peer(livekit_server, room_name, "evil/+/#") as evil,
        sdk_peer(livekit_server, room_name, "good") as good,
    ):
        await eventually(
            lambda: "bridge" in evil.remote_participants and "bridge" in good.remote_participants,
            what="peers see the bridge",
        )
        await evil.local_participant.publish_data(b"injected", topic="t")
        await good.local_participant.publish_data(b"bad topic", topic="a/b")
        await good.local_participant.publish_data(b"$ topic", topic="$SYS")
        await good.local_participant.publish_data(b"fine", topic="t")
        message = await mqtt_peer.next(15)
        assert (message.topic, message.payload) == (f"rooms/{room_name}/good/t", b"fine")
        await eventually(
            lambda: bridge.counters["route.out.rejected.bad_template_value"] == 3,
            what="three rejections counted",
        )
        await asyncio.sleep(0.5)
        assert mqtt_peer.messages.empty()


@pytest.mark.parametrize("on_reject", ["drop", "hold"])
async def test_mqtt_message_rejected_without_dead_letter_is_dropped_or_held(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    mqtt_peer: MqttPeer,
    room_name: str,
    on_reject: str,
) -> None:
    """hold: never acknowledged, so the broker redelivers it to the same persistent session;
    drop (the default): nacked (PUBACK with a failure reason code), never seen again."""
    policy = "" if on_reject == "drop" else f"\n    on_reject: {on_reject}"
    body = f"""\
connectors:
  - name: texts
    from: {{mqtt: bus, topic: "in/{{x}}", qos: 1}}
    to: {{room: "{room_name}", text_stream: {{topic: "t"}}}}{policy}
"""
    config = bridge_yaml(livekit_server, mosquitto, None, room_name, body)
    async with run_bridge(config) as bridge:
        await mqtt_peer.publish("in/a", b"\xc3\x28 broken")
        await eventually(
            lambda: bridge.counters["route.texts.rejected.invalid_utf8"] == 1, what="rejected"
        )
    # Same client id, persistent session: the broker redelivers what was never acknowledged.
    async with run_bridge(config) as bridge:
        await mqtt_peer.publish("in/b", b"fine")
        await eventually(
            lambda: bridge.counters["route.texts.delivered"] == 1, what="a later message"
        )
        if on_reject == "hold":
            await eventually(
                lambda: bridge.counters["route.texts.rejected.invalid_utf8"] == 1,
                what="the unacknowledged message redelivered",
            )
        else:
            assert bridge.counters["route.texts.rejected.invalid_utf8"] == 0
