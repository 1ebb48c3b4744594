"""Room and participant captures, ``{payload.x}`` fields, `map`, and Kafka's start position,
end to end: the real livekit-server, Mosquitto and Kafka, official-SDK participants."""

from __future__ import annotations

import asyncio
import json

from livekit import rtc

from tests.e2e.conftest import KafkaPeer, MqttPeer, bridge_yaml, run_bridge, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto


async def test_room_and_participant_captures_payload_fields_and_map_to_mqtt(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    assert room_name.startswith("t-")
    site = room_name.removeprefix("t-")
    body = """\
connectors:
  - name: readings
    from: {room: "t-{site}", participant: "dev-{device}", packet: {topic: reading}}
    to: {mqtt: bus, topic: "sites/{site}/devices/{device}/{payload.kind}"}
    map: {device: "{device}", site: "{site}", value: "{payload.value}", label: "v={payload.value}"}
  - name: strict
    from: {room: "t-{site}", packet: {topic: strict}}
    to: {mqtt: bus, topic: "strict/{site}/{payload.device_id}"}
"""
    await mqtt_peer.subscribe(f"sites/{site}/#")
    await mqtt_peer.subscribe(f"strict/{site}/#")
    async with (
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
        sdk_peer(livekit_server, room_name, "dev-d1") as device,
    ):
        await eventually(lambda: "bridge" in device.remote_participants, what="device sees bridge")
        reading = {"kind": "temperature", "value": 21.5, "noise": "dropped by map"}
        await device.local_participant.publish_data(json.dumps(reading), topic="reading")
        message = await mqtt_peer.next(30)
        assert message.topic == f"sites/{site}/devices/d1/temperature"
        assert json.loads(message.payload) == {
            "device": "d1",
            "site": site,
            "value": 21.5,  # a whole {payload.x}: the JSON value as is
            "label": "v=21.5",
        }

        # Without the field, or not JSON at all: rejected, counted, never published.
        await device.local_participant.publish_data(b'{"other": 1}', topic="strict")
        await device.local_participant.publish_data(b"not json", topic="strict")
        await device.local_participant.publish_data(b'{"device_id": "d9"}', topic="strict")
        message = await mqtt_peer.next(30)
        assert message.topic == f"strict/{site}/d9"
        await eventually(
            lambda: (
                bridge.counters["route.strict.rejected.payload_field_missing"] == 1
                and bridge.counters["route.strict.rejected.malformed_json"] == 1
            ),
            what="both rejections counted",
        )
        assert mqtt_peer.messages.empty()


async def test_kafka_earliest_delivers_what_was_produced_before_the_bridge_started(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    commands = unique("commands")
    readings = unique("readings")
    await kafka_peer.create_topic(commands)
    # Produced before the bridge's consumer group exists: only `earliest` delivers it.
    await kafka_peer.produce(commands, b'{"kind": "open", "to": "dash"}')
    body = f"""\
connectors:
  - name: commands
    from: {{kafka: main, topics: ["{commands}"], auto_offset_reset: earliest}}
    to:
      room: "{room_name}"
      packet: {{topic: "cmd.{{payload.kind}}", destinations: ["{{payload.to}}"]}}
  - name: readings
    from: {{room: "t-{{site}}", packet: {{topic: reading}}}}
    to: {{kafka: main, topic: "{readings}", key: "{{site}}/{{payload.device_id}}"}}
"""
    got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    async with sdk_peer(livekit_server, room_name, "dash") as dash:
        # Listening before the bridge starts: it may deliver the moment it joins.
        dash.on("data_received", got.put_nowait)
        async with run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)) as bridge:
            packet = await asyncio.wait_for(got.get(), 30)
            assert (packet.topic, packet.data) == ("cmd.open", b'{"kind": "open", "to": "dash"}')
            await eventually(
                lambda: bridge.counters["route.commands.delivered"] == 1, what="delivered"
            )

            reading = b'{"device_id": "d3", "t": 1}'
            await dash.local_participant.publish_data(reading, topic="reading")
            consumer = await kafka_peer.consumer(readings)
            record = await asyncio.wait_for(consumer.getone(), 30)
            assert record.key == f"{room_name.removeprefix('t-')}/d3".encode()
            assert record.value == reading
