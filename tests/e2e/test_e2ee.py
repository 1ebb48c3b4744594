"""The bridge in an end-to-end encrypted room (`livekit.e2ee`), with official-SDK peers.

With the room's shared key configured, MQTT messages reach an SDK peer with E2EE on, and its
packets reach MQTT, decrypted. Without a key, its encrypted packets are counted on the room's
counters (`rejected.encrypted`, exported with the other room counters) and never published.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from livekit import rtc
from prometheus_client import generate_latest

from bridge.metrics import BridgeMetrics
from tests.e2e.conftest import MqttPeer, bridge_yaml, run_bridge
from tests.interop.conftest import eventually
from tests.interop.test_e2ee import KEY, e2ee_sdk_peer
from tests.services import LiveKitServer, Mosquitto


def _body(room: str) -> str:
    return f"""\
connectors:
  - name: commands
    from: {{mqtt: bus, topic: "cmd/{{device}}"}}
    to: {{room: "{room}", packet: {{topic: "cmd.{{device}}"}}}}
  - name: readings
    from: {{room: "{room}", packet: {{topic: "reading"}}}}
    to: {{mqtt: bus, topic: "readings/{{participant}}"}}
"""


def _with_e2ee(yaml_text: str, e2ee: str) -> str:
    return yaml_text.replace("  rooms: [", f"  e2ee: {e2ee}\n  rooms: [", 1)


async def test_mqtt_and_room_legs_in_an_encrypted_room(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    mqtt_peer: MqttPeer,
    room_name: str,
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "room.key"
    key_file.write_bytes(KEY + b"\n")
    text = bridge_yaml(livekit_server, mosquitto, None, room_name, _body(room_name))
    text = _with_e2ee(text, f"{{shared_key: '${{file:{key_file}}}'}}")
    await mqtt_peer.subscribe("readings/#")
    async with (
        e2ee_sdk_peer(livekit_server, room_name, "dash") as dash,
        run_bridge(text) as bridge,
    ):
        got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        dash.on("data_received", got.put_nowait)
        await eventually(lambda: "bridge" in dash.remote_participants, what="dash sees the bridge")
        await mqtt_peer.publish("cmd/valve-7", b'{"open": true}')
        packet = await asyncio.wait_for(got.get(), 15)
        assert (packet.data, packet.topic) == (b'{"open": true}', "cmd.valve-7")

        await dash.local_participant.publish_data(b"21.5", topic="reading")
        message = await mqtt_peer.next(15)
        assert (message.topic, message.payload) == ("readings/dash", b"21.5")
        room = bridge.links[room_name].room
        assert room is not None and room.counters["rejected.encrypted"] == 0


async def test_without_the_key_encrypted_packets_are_counted_not_published(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    text = bridge_yaml(livekit_server, mosquitto, None, room_name, _body(room_name))
    await mqtt_peer.subscribe("readings/#")
    async with (
        e2ee_sdk_peer(livekit_server, room_name, "dash") as dash,
        run_bridge(text) as bridge,
    ):
        await eventually(lambda: "bridge" in dash.remote_participants, what="dash sees the bridge")
        for _ in range(3):
            await dash.local_participant.publish_data(b"21.5", topic="reading")
        room = bridge.links[room_name].room
        assert room is not None
        await eventually(lambda: room.counters["rejected.encrypted"] == 3, what="rejections")
        await asyncio.sleep(0.5)
        assert mqtt_peer.messages.empty()
        assert bridge.counters["route.readings.published"] == 0
        exposition = generate_latest(BridgeMetrics(bridge).registry).decode()
        wanted = f'roombus_room_events_total{{event="rejected.encrypted",room="{room_name}"}} 3.0'
        assert wanted in exposition
