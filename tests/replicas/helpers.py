"""Set-up and tear-down shared by the replica fixtures (`test_replicas.py`, `test_scaling.py`):
the room -> Kafka topic and its reader, one SDK peer per room, and the end of a run."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from livekit import rtc

from bridge.room.server_api import ServerApi
from tests.conftest import make_token
from tests.services import Kafka, LiveKitServer

if TYPE_CHECKING:
    from tests.replicas.test_replicas import Replica


async def up_topic_reader(kafka: Kafka, tag: str) -> AIOKafkaConsumer:
    """Create the room -> Kafka topic `up-<tag>` (one partition) and a consumer of it from the
    start."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"up-{tag}", 1, 1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([TopicPartition(f"up-{tag}", 0)])
    return consumer


async def read_up(consumer: AIOKafkaConsumer, got: list[tuple[str, str]]) -> None:
    """Append every (key, value) the consumer reads to `got`, until cancelled."""
    while True:
        batch = await consumer.getmany(timeout_ms=500)
        for records in batch.values():
            for r in records:
                got.append((r.key.decode() if r.key else "", r.value.decode() if r.value else ""))


async def join_room_peers(
    livekit: LiveKitServer,
    rooms: list[str],
    received: dict[str, list[str]],
    peers: dict[str, rtc.Room],
) -> None:
    """Connect an SDK peer `peer-<room>` to each room, recording the payloads of its "down"
    packets in `received[room]`; each peer goes into `peers` once connected (to disconnect it
    in the end even if a later one fails)."""
    for room in rooms:
        peer = rtc.Room()
        got = received.setdefault(room, [])

        def on_data(packet: rtc.DataPacket, got: list[str] = got) -> None:
            if packet.topic == "down":
                got.append(packet.data.decode())

        peer.on("data_received", on_data)
        await peer.connect(livekit.url, make_token(livekit, room, f"peer-{room}"))
        peers[room] = peer


async def tear_down(
    replicas: list[Replica],
    peers: dict[str, rtc.Room],
    reader: asyncio.Task[None],
    consumer: AIOKafkaConsumer,
    client: mqtt.Client,
    api: ServerApi,
) -> None:
    """The end of a replica run: SIGTERM every live replica (SIGKILL what has not exited
    60 s later), disconnect the peers, stop the Kafka reader and the MQTT client, close the
    server API, then print the last lines of each replica's log."""
    for replica in replicas:
        if replica.alive():
            replica.signal(signal.SIGTERM)
    for replica in replicas:
        if replica.proc is not None:
            with contextlib.suppress(Exception):
                await replica.wait(60)
            if replica.alive():
                replica.signal(signal.SIGKILL)
    for peer in peers.values():
        await peer.disconnect()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    await consumer.stop()
    client.loop_stop()
    client.disconnect()
    await api.aclose()
    for replica in replicas:
        print(f"----- {replica.name} (last lines)\n" + "\n".join(replica.text().splitlines()[-15:]))
