"""Route rules end to end: `where:` filters and allow/deny on real servers with SDK peers.

MQTT to room filtered by a payload field and a topic capture; room to MQTT filtered by
participant and topic capture; a denied sender's packets never published; a bus-to-room delivery
to a denied identity rejected; a room-to-bus RPC call from a denied participant answered with
1400 and ``permission denied``. Everything filtered or denied is counted.
"""

from __future__ import annotations

import asyncio

from livekit import rtc

from bridge.rpcbridge import PERMISSION_DENIED
from tests.e2e.conftest import MqttPeer, bridge_yaml, run_bridge
from tests.e2e.test_rpc_bridge import MqttBackend
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LiveKitServer, Mosquitto


async def test_mqtt_to_room_where_and_denied_destination(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = f"""\
connectors:
  - name: hot
    from: {{mqtt: bus, topic: "telemetry/{{device}}"}}
    to: {{room: "{room_name}", packet: {{topic: "hot.{{device}}"}}}}
    where: 'payload.temp > 30 && device == "d7"'
  - name: commands
    from: {{mqtt: bus, topic: "commands/{{who}}"}}
    to: {{room: "{room_name}", packet: {{topic: "cmd", destinations: ["{{who}}"]}}}}
    allow: [{{identity: "device-*"}}]
"""
    async with (
        sdk_peer(livekit_server, room_name, "dash") as dash,
        sdk_peer(livekit_server, room_name, "device-1") as device,
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
    ):
        hot: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        cmds: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        dash.on("data_received", lambda p: hot.put_nowait(p) if p.topic != "cmd" else None)
        device.on("data_received", lambda p: cmds.put_nowait(p) if p.topic == "cmd" else None)
        await eventually(lambda: "bridge" in dash.remote_participants, what="dash sees bridge")
        await eventually(lambda: "bridge" in device.remote_participants, what="device sees it")

        c = bridge.counters
        await mqtt_peer.publish("telemetry/d7", b'{"temp": 31.5}')  # passes
        await mqtt_peer.publish("telemetry/d7", b'{"temp": 20}')  # false
        await mqtt_peer.publish("telemetry/d8", b'{"temp": 40}')  # false: another device
        await mqtt_peer.publish("telemetry/d7", b"not json")  # error: filtered with a reason
        await mqtt_peer.publish("telemetry/d7", b'{"temp": "hot"}')  # type mismatch: filtered
        await mqtt_peer.publish("telemetry/d7", b'{"temp": 99}')  # passes
        await eventually(lambda: c["route.hot.received"] == 6, what="all six received")
        await eventually(lambda: c["route.hot.delivered"] == 2, what="two delivered")
        first = await asyncio.wait_for(hot.get(), 15)
        second = await asyncio.wait_for(hot.get(), 15)
        assert [(p.data, p.topic) for p in (first, second)] == [
            (b'{"temp": 31.5}', "hot.d7"),
            (b'{"temp": 99}', "hot.d7"),
        ]
        assert c["route.hot.filtered"] == 4
        # Filtered is not rejected: nothing dead-lettered or dropped.
        assert not [k for k in list(c) if k.startswith("route.hot.rejected")]

        await mqtt_peer.publish("commands/dash", b"open")  # dash is not device-*: denied
        await mqtt_peer.publish("commands/device-1", b"open")
        got = await asyncio.wait_for(cmds.get(), 15)
        assert (got.data, got.topic) == (b"open", "cmd")
        await eventually(lambda: c["route.commands.denied"] == 1, what="the denial counted")
        assert c["route.commands.rejected.denied"] == 1
        assert c["route.commands.dropped.denied"] == 1
        assert c["route.commands.delivered"] == 1


async def test_room_to_mqtt_where_and_denied_sender(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    body = f"""\
connectors:
  - name: cmds-out
    from: {{room: "{room_name}", packet: {{topic: "command/{{device}}"}}}}
    to: {{mqtt: bus, topic: "out/{{device}}"}}
    where: 'participant.startsWith("op-") && device != "locked"'
  - name: sensors-out
    from: {{room: "{room_name}", packet: {{topic: "sensor"}}}}
    to: {{mqtt: bus, topic: "sensors/{{participant}}"}}
    deny: [{{attributes: {{banned: "yes"}}}}]
"""
    await mqtt_peer.subscribe("out/#")
    await mqtt_peer.subscribe("sensors/#")
    async with (
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
        sdk_peer(livekit_server, room_name, "op-1") as op,
        sdk_peer(livekit_server, room_name, "mallory", attributes={"banned": "yes"}) as mallory,
    ):
        c = bridge.counters
        room = bridge.links[room_name].room
        assert room is not None
        await eventually(
            lambda: {"op-1", "mallory"} <= set(room.remote_identities()), what="peers seen"
        )
        await mallory.local_participant.publish_data(b"m", topic="command/v2", reliable=True)
        await mallory.local_participant.publish_data(b"m", topic="sensor", reliable=True)
        await eventually(lambda: c["route.cmds-out.filtered"] == 1, what="mallory filtered")
        await eventually(lambda: c["route.sensors-out.denied"] == 1, what="mallory denied")
        await op.local_participant.publish_data(b"a", topic="command/v1", reliable=True)
        await op.local_participant.publish_data(b"b", topic="command/locked", reliable=True)
        await op.local_participant.publish_data(b"c", topic="sensor", reliable=True)
        await op.local_participant.publish_data(b"d", topic="command/end", reliable=True)
        seen: list[tuple[str, bytes]] = []
        while len(seen) < 3:
            message = await mqtt_peer.next()
            seen.append((message.topic, bytes(message.payload)))
        assert sorted(seen) == [("out/end", b"d"), ("out/v1", b"a"), ("sensors/op-1", b"c")]
        await eventually(lambda: c["route.cmds-out.filtered"] == 2, what="locked filtered")
        assert c["route.cmds-out.published"] == 2
        assert c["route.sensors-out.published"] == 1
        assert mqtt_peer.messages.empty()


async def test_room_rpc_from_a_denied_caller(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str
) -> None:
    body = f"""\
connectors:
  - name: rpc-out
    from: {{room: "*", rpc: {{methods: ["bus.*"], reply_topic: "replies/{room_name}",
            timeout: 5}}}}
    to: {{mqtt: bus, topic: "svc/{{room}}/{{method}}"}}
    allow: [{{kind: standard, attributes: {{role: operator}}}}]
"""
    backend = MqttBackend(mosquitto.port)
    backend.client.subscribe(f"svc/{room_name}/#", 1)
    assert await asyncio.to_thread(backend._subscribed.wait, 10)
    try:
        async with (
            run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
            sdk_peer(livekit_server, room_name, "op", attributes={"role": "operator"}) as op,
            sdk_peer(livekit_server, room_name, "guest") as guest,
        ):
            await eventually(lambda: "bridge" in op.remote_participants, what="op sees bridge")
            await eventually(lambda: "bridge" in guest.remote_participants, what="guest too")
            # Kind and attributes are judged on the bridge's view of the room: wait until it
            # has both callers (an unknown caller fails closed).
            room = bridge.links[room_name].room
            assert room is not None
            await eventually(
                lambda: {"op", "guest"} <= set(room.remote_identities()), what="callers seen"
            )
            answer = await op.local_participant.perform_rpc(
                destination_identity="bridge", method="bus.echo", payload="x"
            )
            assert answer == "svc:x"
            try:
                await guest.local_participant.perform_rpc(
                    destination_identity="bridge", method="bus.echo", payload="y"
                )
                raise AssertionError("a denied caller got an answer")
            except rtc.RpcError as exc:
                assert (exc.code, exc.data) == (1400, PERMISSION_DENIED)
            c = bridge.counters
            assert c["route.rpc-out.denied"] == 1
            assert c["route.rpc-out.rpc_calls.error.1400"] == 1
            assert backend.seen == ["bus.echo"]
    finally:
        backend.close()
