"""Smoke tests proving that each test service is the real server, reachable in the namespace."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import uuid

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from livekit import rtc
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import make_token
from tests.services import Kafka, LiveKitServer, Mosquitto


def test_namespace_has_no_route_out(in_test_namespace: None) -> None:
    """The test network holds loopback and 192.0.2.0/24 only, and routes nowhere else."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
    assert "default" not in routes.stdout
    for line in routes.stdout.splitlines():
        assert line.startswith("192.0.2.0/24"), line
    addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    for line in addrs.stdout.splitlines():
        addr = line.split()[3]
        assert addr.startswith(("127.", "192.0.2.")), line
    # Asking the kernel for a route to an outside address is answered locally: unreachable.
    probe = subprocess.run(["ip", "route", "get", "198.51.100.7"], capture_output=True, text=True)
    assert probe.returncode != 0 and "unreachable" in probe.stderr.lower()


async def test_livekit_two_sdk_participants_exchange_reliable_packet(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    alice, bob = rtc.Room(), rtc.Room()
    got: asyncio.Future[rtc.DataPacket] = asyncio.get_running_loop().create_future()

    @bob.on("data_received")
    def _on_data(packet: rtc.DataPacket) -> None:
        if not got.done():
            got.set_result(packet)

    await bob.connect(livekit_server.url, make_token(livekit_server, room_name, "bob"))
    await alice.connect(livekit_server.url, make_token(livekit_server, room_name, "alice"))
    try:
        async with asyncio.timeout(20):
            while "alice" not in bob.remote_participants:
                await asyncio.sleep(0.05)
            await alice.local_participant.publish_data(b"hello bob", reliable=True, topic="smoke")
            packet = await got
        assert packet.data == b"hello bob"
        assert packet.topic == "smoke"
        assert packet.kind == rtc.DataPacketKind.KIND_RELIABLE
        assert packet.participant is not None and packet.participant.identity == "alice"
        assert livekit_server.process is not None and livekit_server.process.poll() is None
    finally:
        await alice.disconnect()
        await bob.disconnect()


async def test_kafka_produce_acks_all_and_consume_back(kafka: Kafka) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"value-1", key=b"k1", headers=[("h", b"1")])
    finally:
        await producer.stop()
    assert meta.offset == 0
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value, list(record.headers)) == (b"k1", b"value-1", [("h", b"1")])


def test_mqtt5_qos1_round_trip_with_user_property(mosquitto: Mosquitto) -> None:
    subscribed, arrived = threading.Event(), threading.Event()
    received: list[mqtt.MQTTMessage] = []

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg)
        arrived.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="smoke", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        client.subscribe("smoke/#", qos=1)
        assert subscribed.wait(10), "no SUBACK from mosquitto"
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("origin", "smoke-test")]
        info = client.publish("smoke/a", b"payload", qos=1, properties=props)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
        assert arrived.wait(10), "message not delivered back"
    finally:
        client.loop_stop()
        client.disconnect()
    assert len(received) == 1
    msg = received[0]
    assert (msg.topic, msg.payload, msg.qos) == ("smoke/a", b"payload", 1)
    assert msg.properties is not None
    assert getattr(msg.properties, "UserProperty", None) == [("origin", "smoke-test")]
