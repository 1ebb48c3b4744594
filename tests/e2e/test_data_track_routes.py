"""Data-track routes through the whole bridge: MQTT telemetry onto data tracks the bridge
publishes (one per device), and an SDK participant's data-track frames onto MQTT with their
provenance. Data tracks are lossy (the server drops what waits, the first frames of a track
reach nobody until a subscriber is set up), so each side pushes until a copy arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import paho.mqtt.client as mqtt
from livekit import rtc

from bridge.runtime.bridge import Bridge
from tests.e2e.conftest import MqttPeer, bridge_yaml, kick_bridge, run_bridge
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LiveKitServer, Mosquitto


async def _until(push: Callable[[], Awaitable[object]], done: Callable[[], bool], what: str) -> int:
    """Push every 0.2 s until `done`; how many pushes it took."""
    for n in range(1, 101):
        await push()
        for _ in range(4):
            await asyncio.sleep(0.05)
            if done():
                return n
    raise AssertionError(f"timed out waiting for {what}")


async def test_mqtt_telemetry_to_a_data_track_per_device(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = f"""\
connectors:
  - name: telemetry
    from: {{mqtt: bus, topic: "devices/{{device}}/telemetry", qos: 0}}
    to: {{room: "{room_name}", data_track: {{name: "telemetry-{{device}}"}}}}
"""
    async with sdk_peer(livekit_server, room_name, "dash") as dash:
        published: asyncio.Queue[rtc.RemoteDataTrack] = asyncio.Queue()
        dash.on("data_track_published", published.put_nowait)
        received: dict[str, list[bytes]] = {}
        readers: list[asyncio.Task[None]] = []

        async def read(track: rtc.RemoteDataTrack) -> None:
            async for frame in track.subscribe():
                received.setdefault(track.info.name, []).append(frame.payload)

        config = bridge_yaml(livekit_server, mosquitto, None, room_name, body)
        async with run_bridge(config) as bridge:
            try:
                # The first message publishes the track; until the peer subscribed, frames
                # reach nobody (lossy): pushed again until one arrives.
                n = 0

                async def push_d1() -> None:
                    nonlocal n
                    n += 1
                    await mqtt_peer.publish("devices/d1/telemetry", b"t=%d" % n, qos=0)

                async def subscribe_when_published() -> None:
                    while True:
                        track = await published.get()
                        assert track.publisher_identity == "bridge"
                        readers.append(asyncio.create_task(read(track)))

                watcher = asyncio.create_task(subscribe_when_published())
                readers.append(watcher)
                await _until(push_d1, lambda: bool(received.get("telemetry-d1")), "d1 frames")

                async def push_d2() -> None:
                    await mqtt_peer.publish("devices/d2/telemetry", b"other", qos=0)

                await _until(push_d2, lambda: bool(received.get("telemetry-d2")), "d2 frames")
                # A lost session ends our publications: the next message publishes again.
                room = bridge.links[room_name].room
                assert room is not None
                await kick_bridge(livekit_server, room_name, dash)
                received.pop("telemetry-d1")
                await _until(push_d1, lambda: bool(received.get("telemetry-d1")), "d1 again")
                assert all(p.startswith(b"t=") for p in received["telemetry-d1"])
                assert set(received["telemetry-d2"]) == {b"other"}
                counters = bridge.counters
                new_room = bridge.links[room_name].room
                assert new_room is not None and new_room is not room
                assert room.counters["data_tracks.published"] == 2  # once per name, then kept
                assert new_room.counters["data_tracks.published"] == 1  # d1 again
                await eventually(
                    lambda: counters["route.telemetry.delivered"] >= n,
                    what="every message settled",
                )
                assert counters["route.telemetry.rejected"] == 0
            finally:
                for task in readers:
                    task.cancel()


async def test_sdk_data_track_frames_to_mqtt_with_provenance(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = f"""\
connectors:
  - name: imu
    from: {{room: "{room_name}", participant: "robot-{{unit}}", data_track: {{name: "imu-*"}}}}
    to: {{mqtt: bus, topic: "lk/{{room}}/{{unit}}/{{track}}", qos: 0}}
"""
    await mqtt_peer.subscribe(f"lk/{room_name}/#", qos=0)
    config = bridge_yaml(livekit_server, mosquitto, None, room_name, body)
    async with sdk_peer(livekit_server, room_name, "robot-8") as early:
        # Published before the bridge joins: subscribed at join.
        right = await early.local_participant.publish_data_track(name="imu-right")
        async with (
            run_bridge(config) as bridge,
            sdk_peer(livekit_server, room_name, "robot-7") as robot,
        ):
            await _robot_frames(room_name, mqtt_peer, bridge, robot, right)


async def _robot_frames(
    room_name: str, mqtt_peer: MqttPeer, bridge: Bridge, robot: rtc.Room, right: rtc.LocalDataTrack
) -> None:
    """robot-7 publishes after the bridge joined, robot-8's `right` was there before."""
    await eventually(lambda: "bridge" in robot.remote_participants, what="the bridge")
    # Published after the bridge joined: subscribed as it appears.
    wanted = await robot.local_participant.publish_data_track(name="imu-left")
    unwanted = await robot.local_participant.publish_data_track(name="camera-meta")
    got: list[mqtt.MQTTMessage] = []

    async def push() -> None:
        unwanted.try_push(rtc.DataTrackFrame(payload=b"not routed"))
        wanted.try_push(rtc.DataTrackFrame(payload=b"accel", user_timestamp=1_796_000_000_123))
        while not mqtt_peer.messages.empty():
            got.append(mqtt_peer.messages.get_nowait())

    await _until(push, lambda: bool(got), "a data-track frame on MQTT")
    message = got[0]
    assert message.topic == f"lk/{room_name}/7/imu-left"
    assert message.payload == b"accel"
    props = dict(message.properties.UserProperty)  # type: ignore[union-attr]
    assert props["lk-room"] == room_name
    assert props["lk-participant"] == "robot-7"
    assert props["lk-participant-sid"].startswith("PA_")
    assert props["lk-kind"] == "data-track"
    assert props["lk-track"] == "imu-left"
    assert props["lk-track-sid"].startswith("DTR_")
    assert props["lk-user-timestamp"] == "1796000000123"
    assert all(m.topic.endswith("/imu-left") for m in got)
    got.clear()

    async def push_right() -> None:
        right.try_push(rtc.DataTrackFrame(payload=b"gyro"))
        while not mqtt_peer.messages.empty():
            got.append(mqtt_peer.messages.get_nowait())

    await _until(push_right, lambda: any(m.payload == b"gyro" for m in got), "imu-right")
    message = next(m for m in got if m.payload == b"gyro")
    assert message.topic == f"lk/{room_name}/8/imu-right"
    props = dict(message.properties.UserProperty)  # type: ignore[union-attr]
    assert props["lk-participant"] == "robot-8" and "lk-user-timestamp" not in props
    room = bridge.links[room_name].room
    assert room is not None and room.counters["data_tracks.frames_received"] >= 1
