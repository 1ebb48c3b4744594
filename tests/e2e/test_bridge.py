"""The bridge end to end: real livekit-server, Kafka and Mosquitto, official-SDK participants."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

from livekit import api, rtc

from tests.e2e.conftest import (
    KafkaPeer,
    MqttPeer,
    bridge_yaml,
    kafka_assigned,
    run_bridge,
    unique,
)
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto


def _headers(record: object) -> dict[str, str]:
    return {k: v.decode() for k, v in getattr(record, "headers", [])}


async def test_mqtt_to_room_packets_reliable_lossy_and_destinations(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = f"""\
connectors:
  - name: telemetry
    from: {{mqtt: bus, topic: "devices/{{site}}/{{device}}/telemetry"}}
    to: {{room: "{room_name}", packet: {{topic: "telemetry.{{device}}", reliable: true}}}}
  - name: fast
    from: {{mqtt: bus, topic: "devices/{{site}}/{{device}}/fast", qos: 0}}
    to: {{room: "{room_name}", packet: {{topic: "fast.{{device}}", reliable: false}}}}
  - name: direct
    from: {{mqtt: bus, topic: "direct/{{who}}"}}
    to: {{room: "{room_name}", packet: {{topic: "dm", destinations: ["{{who}}"]}}}}
"""
    async with (
        sdk_peer(livekit_server, room_name, "dash") as dash,
        sdk_peer(livekit_server, room_name, "other") as other,
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
    ):
        got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        got_other: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        dash.on("data_received", got.put_nowait)
        other.on("data_received", got_other.put_nowait)
        await eventually(lambda: "bridge" in dash.remote_participants, what="dash sees the bridge")

        await mqtt_peer.publish("devices/berlin/d7/telemetry", b'{"t": 21.5}')
        packet = await asyncio.wait_for(got.get(), 15)
        assert (packet.data, packet.topic) == (b'{"t": 21.5}', "telemetry.d7")
        assert packet.kind == rtc.DataPacketKind.KIND_RELIABLE
        assert packet.participant is not None and packet.participant.identity == "bridge"

        await mqtt_peer.publish("devices/berlin/d7/fast", b"x", qos=0)
        packet = await asyncio.wait_for(got.get(), 15)
        assert (packet.topic, packet.kind) == ("fast.d7", rtc.DataPacketKind.KIND_LOSSY)

        # Addressed to dash only: once `other` has the later broadcast, it cannot get the DM.
        await mqtt_peer.publish("direct/dash", b"for dash")
        await mqtt_peer.publish("devices/berlin/d8/telemetry", b"all")
        assert (await asyncio.wait_for(got.get(), 15)).data == b"for dash"
        assert (await asyncio.wait_for(got.get(), 15)).data == b"all"
        while True:
            packet = await asyncio.wait_for(got_other.get(), 15)
            assert packet.data != b"for dash"
            if packet.data == b"all":
                break
        assert bridge.counters["route.telemetry.delivered"] == 2


async def test_kafka_to_room_text_stream(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    topic = unique("answers")
    await kafka_peer.create_topic(topic)
    body = f"""\
connectors:
  - name: answers
    from: {{kafka: main, topics: [{topic}]}}
    to: {{room: "{room_name}", text_stream: {{topic: "chat",
          attributes: {{origin: "{{topic}}", partition: "{{partition}}"}}}}}}
"""
    texts: asyncio.Queue[tuple[str, dict[str, str], str]] = asyncio.Queue()
    async with sdk_peer(livekit_server, room_name, "reader") as reader:

        async def on_text(stream: rtc.TextStreamReader, identity: str) -> None:
            texts.put_nowait(
                (await stream.read_all(), dict(stream.info.attributes or {}), identity)
            )

        tasks: set[asyncio.Task[None]] = set()

        def on_text_sync(stream: rtc.TextStreamReader, identity: str) -> None:
            tasks.add(asyncio.ensure_future(on_text(stream, identity)))

        reader.register_text_stream_handler("chat", on_text_sync)
        async with run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)) as bridge:
            await eventually(lambda: "bridge" in reader.remote_participants, what="bridge joined")
            await kafka_assigned(bridge)
            text = "Grüße 🌍 " * 5000
            await kafka_peer.produce(topic, text.encode(), key=b"k")
            received, attributes, sender = await asyncio.wait_for(texts.get(), 30)
            assert received == text
            assert sender == "bridge"
            assert attributes["origin"] == topic
            assert attributes["partition"] == "0"  # the record's partition (one here)
            assert attributes["bus-topic"] == topic
            await eventually(lambda: bridge.counters["route.answers.delivered"] == 1, what="ack")


async def test_large_mqtt_payload_becomes_a_byte_stream(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = f"""\
connectors:
  - name: images
    from: {{mqtt: bus, topic: "cams/{{cam}}/image"}}
    to: {{room: "{room_name}", packet: {{topic: "image.{{cam}}"}}}}
"""
    files: asyncio.Queue[tuple[bytes, str, str]] = asyncio.Queue()
    async with sdk_peer(livekit_server, room_name, "viewer") as viewer:

        async def on_bytes(stream: rtc.ByteStreamReader, identity: str) -> None:
            data = b"".join([chunk async for chunk in stream])
            files.put_nowait((data, stream.info.topic, identity))

        tasks: set[asyncio.Task[None]] = set()

        def on_bytes_sync(stream: rtc.ByteStreamReader, identity: str) -> None:
            tasks.add(asyncio.ensure_future(on_bytes(stream, identity)))

        viewer.register_byte_stream_handler("image.c1", on_bytes_sync)
        async with run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)):
            await eventually(lambda: "bridge" in viewer.remote_participants, what="bridge joined")
            payload = os.urandom(100 * 1024)
            await mqtt_peer.publish("cams/c1/image", payload)
            data, topic, sender = await asyncio.wait_for(files.get(), 30)
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
            assert (topic, sender) == ("image.c1", "bridge")


async def test_room_packet_to_kafka_with_provenance_headers(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    topic = unique("lk-packets")
    body = f"""\
connectors:
  - name: packets
    from: {{room: "*", packet: {{topic: "sensors/*"}}}}
    to: {{kafka: main, topic: "{topic}", key: "{{room}}/{{participant}}"}}
"""
    async with (
        run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)) as bridge,
        sdk_peer(livekit_server, room_name, "alice") as alice,
    ):
        await eventually(
            lambda: (
                (room := bridge.links[room_name].room) is not None
                and "alice" in room.remote_participants
            ),
            what="bridge sees alice",
        )
        await alice.local_participant.publish_data(b"21.5", topic="sensors/temp")
        consumer = await kafka_peer.consumer(topic)
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.value == b"21.5"
        assert record.key == f"{room_name}/alice".encode()
        headers = _headers(record)
        assert headers["lk-room"] == room_name
        assert headers["lk-participant"] == "alice"
        assert headers["lk-participant-sid"].startswith("PA_")
        assert headers["lk-topic"] == "sensors/temp"
        assert headers["lk-kind"] == "packet-reliable"
        assert headers["roombus-source"] == bridge.bridge_id
        assert int(headers["lk-timestamp"]) > 0


async def test_room_text_stream_to_mqtt(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = """\
connectors:
  - name: chat
    from: {room: "*", text_stream: {topic: "chat"}}
    to: {mqtt: bus, topic: "rooms/{room}/chat/{participant}", qos: 1}
"""
    await mqtt_peer.subscribe(f"rooms/{room_name}/chat/#")
    async with (
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)),
        sdk_peer(livekit_server, room_name, "bob") as bob,
    ):
        await eventually(lambda: "bridge" in bob.remote_participants, what="bob sees the bridge")
        text = "hello from the room ✓ " * 2000  # ~44 KB: chunked
        await bob.local_participant.send_text(text, topic="chat")
        message = await mqtt_peer.next(30)
        assert message.topic == f"rooms/{room_name}/chat/bob"
        assert message.payload.decode() == text
        props = dict(getattr(message.properties, "UserProperty", []))
        assert props["lk-kind"] == "text-stream" and props["lk-participant"] == "bob"
        assert props["lk-stream-id"]
        assert props["lk-participant-sid"] == bob.local_participant.sid


async def test_room_byte_stream_to_kafka_chunks_reassembled(
    livekit_server: LiveKitServer,
    kafka: Kafka,
    kafka_peer: KafkaPeer,
    room_name: str,
    tmp_path: Path,
) -> None:
    topic = unique("lk-files")
    body = f"""\
connectors:
  - name: files
    from: {{room: "*", byte_stream: {{topic: "upload", max_message_bytes: 262144}}}}
    to: {{kafka: main, topic: "{topic}"}}
"""
    data = os.urandom(5 * 1024 * 1024)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    async with (
        run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)),
        sdk_peer(livekit_server, room_name, "uploader") as uploader,
    ):
        await eventually(lambda: "bridge" in uploader.remote_participants, what="bridge seen")
        await uploader.local_participant.send_file(str(path), topic="upload")
        consumer = await kafka_peer.consumer(topic)
        chunks: dict[int, bytes] = {}
        final = None
        while final is None or len(chunks) <= final:
            record = await asyncio.wait_for(consumer.getone(), 60)
            headers = _headers(record)
            index = int(headers["lk-chunk-index"])
            chunks[index] = record.value
            assert record.key == headers["lk-stream-id"].encode()  # one key: one partition, order
            if headers["lk-final"] == "true":
                final = index
        assert list(chunks) == sorted(chunks)  # arrived in order
        assert all(len(c) <= 262144 for c in chunks.values())
        assembled = b"".join(chunks[i] for i in range(final + 1))
        assert hashlib.sha256(assembled).digest() == hashlib.sha256(data).digest()


async def test_attribute_change_to_retained_mqtt_cleared_on_leave(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = """\
connectors:
  - name: state
    from: {room: "*", attributes: {keys: "*"}}
    to: {mqtt: bus, topic: "state/{room}/{participant}/{key}", retain: true}
"""
    base = f"state/{room_name}/carol"
    async with run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)):
        async with sdk_peer(livekit_server, room_name, "carol") as carol:
            await eventually(lambda: "bridge" in carol.remote_participants, what="bridge seen")
            await carol.local_participant.set_attributes({"mood": "happy", "seat": "12"})
            # A late subscriber gets the retained state.
            late = MqttPeer(mosquitto.port)
            try:
                await eventually(lambda: True)
                await asyncio.sleep(1)
                await late.subscribe(f"{base}/#")
                got: dict[str, bytes] = {}
                while len(got) < 2:
                    message = await late.next(15)
                    assert message.retain
                    got[message.topic] = bytes(message.payload)
                assert got == {f"{base}/mood": b"happy", f"{base}/seat": b"12"}
            finally:
                late.close()
            await mqtt_peer.subscribe(f"{base}/#")
            for _ in range(2):  # the retained copies
                await mqtt_peer.next(15)
        # carol left: the bridge clears her retained state (empty retained payloads).
        cleared: set[str] = set()
        while len(cleared) < 2:
            message = await mqtt_peer.next(30)
            if message.payload == b"":
                cleared.add(message.topic)
        assert cleared == {f"{base}/mood", f"{base}/seat"}
        check = MqttPeer(mosquitto.port)
        try:
            await check.subscribe(f"{base}/#")
            await asyncio.sleep(1)
            assert check.messages.empty()  # nothing retained any more
        finally:
            check.close()


async def test_room_metadata_change_to_kafka(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    topic = unique("lk-room-meta")
    body = f"""\
connectors:
  - name: meta
    from: {{room: "*", room_metadata: {{}}}}
    to: {{kafka: main, topic: "{topic}", key: "{{room}}"}}
"""
    async with run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)):
        async with api.LiveKitAPI(
            livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
        ) as lkapi:
            await lkapi.room.update_room_metadata(
                api.UpdateRoomMetadataRequest(room=room_name, metadata='{"stage": "live"}')
            )
        consumer = await kafka_peer.consumer(topic)
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.value == b'{"stage": "live"}'
        assert record.key == room_name.encode()
        assert _headers(record)["lk-kind"] == "room-metadata"


async def test_mqtt_retained_message_to_bridge_attributes(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    site = unique("site")
    # Retained before the bridge starts: the bridge picks it up when it subscribes.
    await mqtt_peer.publish(f"sites/{site}/status", b"online", retain=True)
    body = f"""\
connectors:
  - name: status
    from: {{mqtt: bus, topic: "sites/{{site}}/status"}}
    to: {{room: "{room_name}", attribute: {{key: "status.{{site}}"}}}}
"""
    async with (
        sdk_peer(livekit_server, room_name, "watcher") as watcher,
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)),
    ):
        key = f"status.{site}"
        await eventually(
            lambda: (
                "bridge" in watcher.remote_participants
                and watcher.remote_participants["bridge"].attributes.get(key) == "online"
            ),
            what="the retained status as the bridge's attribute",
        )
        await mqtt_peer.publish(f"sites/{site}/status", b"maintenance", retain=True)
        await eventually(
            lambda: watcher.remote_participants["bridge"].attributes.get(key) == "maintenance",
            what="the updated status",
        )
    await mqtt_peer.publish(f"sites/{site}/status", b"", retain=True)  # tidy up


async def test_kafka_message_to_room_metadata(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    topic = unique("room-config")
    await kafka_peer.create_topic(topic)
    body = f"""\
connectors:
  - name: config
    from: {{kafka: main, topics: [{topic}]}}
    to: {{room: "{room_name}", room_metadata: {{}}}}
"""
    async with (
        sdk_peer(livekit_server, room_name, "viewer") as viewer,
        run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)) as bridge,
    ):
        changes: asyncio.Queue[str] = asyncio.Queue()
        viewer.on("room_metadata_changed", lambda _old, new: changes.put_nowait(new))
        await kafka_assigned(bridge)
        doc = json.dumps({"layout": "grid", "n": 3})
        await kafka_peer.produce(topic, doc.encode())
        assert await asyncio.wait_for(changes.get(), 30) == doc
        await eventually(lambda: bridge.counters["route.config.delivered"] == 1, what="ack")
