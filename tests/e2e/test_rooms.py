"""Which rooms the bridge joins: by name, by pattern (found through the server API), and again
after losing one."""

from __future__ import annotations

import asyncio

from livekit import rtc

from tests.e2e.conftest import MqttPeer, kick_bridge, run_bridge, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LiveKitServer, Mosquitto


def _config(livekit: LiveKitServer, mosquitto: Mosquitto, rooms: str) -> str:
    return f"""\
livekit:
  url: {livekit.url}
  api_key: {livekit.api_key}
  api_secret: {livekit.api_secret}
  identity: bridge
{rooms}
  room_discovery_interval: 0.5
mqtt:
  bus: {{host: 127.0.0.1, port: {mosquitto.port}}}
connectors:
  - name: in
    from: {{mqtt: bus, topic: "rooms/{{room}}/say"}}
    to: {{room: "{{room}}", packet: {{topic: "said"}}}}
"""


async def test_rooms_matching_a_pattern_are_joined_once_they_exist(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer
) -> None:
    prefix = unique("pat")
    room = f"{prefix}-a"
    config = _config(livekit_server, mosquitto, f'  room_patterns: ["{prefix}-*"]')
    async with run_bridge(config) as bridge:
        assert bridge.links == {}
        async with sdk_peer(livekit_server, room, "visitor") as visitor:
            await eventually(
                lambda: "bridge" in visitor.remote_participants, timeout=20, what="bridge joins"
            )
            got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
            visitor.on("data_received", got.put_nowait)
            await mqtt_peer.publish(f"rooms/{room}/say", b"hello pattern room")
            assert (await asyncio.wait_for(got.get(), 15)).data == b"hello pattern room"
        assert set(bridge.links) == {room}


async def test_a_lost_room_is_rejoined(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str
) -> None:
    config = _config(livekit_server, mosquitto, f"  rooms: [{room_name}]")
    async with (
        run_bridge(config) as bridge,
        sdk_peer(livekit_server, room_name, "watcher") as watcher,
    ):
        await eventually(lambda: "bridge" in watcher.remote_participants, what="bridge in room")
        await kick_bridge(livekit_server, room_name, watcher)
        assert bridge.counters["rooms.lost"] == 1
