"""End-to-end fixtures: the whole bridge against the real livekit-server, Kafka and Mosquitto.

`run_bridge(yaml_text)` starts `Bridge` in-process with the connectors the CLI would build
(`bridge.app.build_bridge`), waits until every room is joined, and stops it (draining) on exit.
Peers on the bus side are independent clients (paho, aiokafka); peers in the room are
official-SDK participants.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from livekit import api, rtc
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.app import build_bridge
from bridge.config import parse_config
from bridge.runtime.bridge import Bridge
from connectors.kafka import KafkaSource
from tests.interop.conftest import eventually
from tests.services import Kafka, LiveKitServer, Mosquitto


def bridge_yaml(
    livekit: LiveKitServer, mosquitto: Mosquitto | None, kafka: Kafka | None, room: str, body: str
) -> str:
    """A config: the test servers, the room, and `body` (the connectors section and more)."""
    text = f"""\
livekit:
  url: {livekit.url}
  api_key: {livekit.api_key}
  api_secret: {livekit.api_secret}
  identity: bridge
  rooms: [{room}]
"""
    if mosquitto is not None:
        text += f"""\
mqtt:
  bus:
    host: 127.0.0.1
    port: {mosquitto.port}
    client_id: bridge-{uuid.uuid4().hex[:8]}
"""
    if kafka is not None:
        text += f"""\
kafka:
  main:
    bootstrap_servers: [{kafka.bootstrap}]
    group_id: bridge-{uuid.uuid4().hex[:8]}
"""
    return text + body


@asynccontextmanager
async def run_bridge(yaml_text: str) -> AsyncIterator[Bridge]:
    """The bridge running on `yaml_text`, ready (rooms joined); drained and stopped on exit."""
    config = parse_config(yaml_text, "e2e.yaml")
    bridge = build_bridge(config)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop), name="bridge")
    try:
        await eventually(
            lambda: (
                task.done()
                or (
                    bridge.ready.is_set()
                    and all(link.connected.is_set() for link in bridge.links.values())
                )
            ),
            timeout=30,
            what="the bridge to join its rooms",
        )
        if task.done():
            task.result()  # raise what stopped it
        yield bridge
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def kafka_assigned(bridge: Bridge) -> None:
    """Wait until every Kafka source of the bridge has partitions: new groups start at the end
    of their topics, so a record produced earlier would not be seen."""
    sources = [s.source for s in bridge.endpoints.sources if isinstance(s.source, KafkaSource)]
    await eventually(
        lambda: all(source.assigned for source in sources),
        timeout=30,
        what="the bridge's Kafka consumers to be assigned partitions",
    )


def kafka_source(bridge: Bridge, route: str) -> KafkaSource:
    """The Kafka consumer of bus-to-room route `route`."""
    for s in bridge.endpoints.sources:
        if isinstance(s.source, KafkaSource) and s.name.endswith(f":{route}"):
            return s.source
    raise LookupError(f"no Kafka source for route {route!r}")


class MqttPeer:
    """An independent MQTT 5 client (paho with its own thread) for the bus side of tests."""

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.messages: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"peer-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        self._subscribed = threading.Event()

        def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            self.loop.call_soon_threadsafe(self.messages.put_nowait, message)

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos)
        assert await asyncio.to_thread(self._subscribed.wait, 10), "no SUBACK"

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        user_properties: list[tuple[str, str]] | None = None,
    ) -> None:
        props = None
        if user_properties:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = user_properties
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        await asyncio.to_thread(info.wait_for_publish, 10)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    async def next(self, timeout: float = 15) -> mqtt.MQTTMessage:
        return await asyncio.wait_for(self.messages.get(), timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
async def mqtt_peer(mosquitto: Mosquitto) -> AsyncIterator[MqttPeer]:
    peer = MqttPeer(mosquitto.port)
    try:
        yield peer
    finally:
        peer.close()


class KafkaPeer:
    """Independent aiokafka clients for the bus side of tests."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self.consumers: list[AIOKafkaConsumer] = []

    async def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        await self.producer.send_and_wait(topic, value, key=key, headers=headers or [])

    async def consumer(self, topic: str) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    async def create_topic(self, topic: str) -> None:
        """Make sure `topic` exists (produce-side auto-creation) before a consumer starts."""
        await self.producer.client.force_metadata_update()
        await self.producer.partitions_for(topic)


@pytest.fixture
async def kafka_peer(kafka: Kafka) -> AsyncIterator[KafkaPeer]:
    peer = KafkaPeer(kafka.bootstrap)
    await peer.producer.start()
    try:
        yield peer
    finally:
        for consumer in peer.consumers:
            await consumer.stop()
        await peer.producer.stop()


async def kick_bridge(livekit: LiveKitServer, room: str, peer: rtc.Room) -> None:
    """Remove the bridge from `room` (server API) and wait until `peer` sees it back, rejoined."""
    first_sid = peer.remote_participants["bridge"].sid
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        await lkapi.room.remove_participant(
            api.RoomParticipantIdentity(room=room, identity="bridge")
        )
    await eventually(
        lambda: (
            "bridge" in peer.remote_participants
            and peer.remote_participants["bridge"].sid != first_sid
        ),
        timeout=30,
        what="the bridge back in the room with a new session",
    )


def unique(prefix: str) -> str:
    """A topic name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


Predicate = Callable[[], bool]
__all__ = [
    "Any",
    "KafkaPeer",
    "MqttPeer",
    "Predicate",
    "bridge_yaml",
    "kafka_assigned",
    "run_bridge",
    "unique",
]
