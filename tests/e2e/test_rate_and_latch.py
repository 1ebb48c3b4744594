"""Rate limits and latched routes end to end: real livekit-server and Mosquitto, SDK peers.

No timed assertions: the tests check which values arrived and that the counts add up (what was
sent = what arrived + what was coalesced or dropped), whatever the machine's speed.
"""

from __future__ import annotations

import asyncio

from livekit import rtc

from tests.conftest import make_token
from tests.e2e.conftest import MqttPeer, bridge_yaml, run_bridge, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LiveKitServer, Mosquitto

BURST = 20


async def test_room_to_mqtt_latest_sends_the_first_and_the_last_of_a_burst(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    topic = unique("levels")
    body = f"""\
connectors:
  - name: levels
    from: {{room: "{room_name}", packet: {{topic: "level"}}}}
    to: {{mqtt: bus, topic: "{topic}/{{participant}}"}}
    rate: {{max: 0.5, key: "{{participant}}", policy: latest}}
"""
    await mqtt_peer.subscribe(f"{topic}/#")
    async with (
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
        sdk_peer(livekit_server, room_name, "tank") as tank,
    ):
        await eventually(lambda: "bridge" in tank.remote_participants, what="tank sees bridge")
        for i in range(BURST):
            await tank.local_participant.publish_data(f"v{i}".encode(), topic="level")
        await eventually(
            lambda: bridge.counters["route.levels.received"] == BURST, what="the burst received"
        )
        got: list[bytes] = []
        while not got or got[-1] != f"v{BURST - 1}".encode():
            message = await mqtt_peer.next(30)
            assert message.topic == f"{topic}/tank"
            got.append(bytes(message.payload))
        counters = bridge.counters
        # The first went at once, the last when the window allowed; whatever was replaced
        # while held is counted, and nothing else was lost.
        assert got[0] == b"v0"
        numbers = [int(p[1:]) for p in got]
        assert numbers == sorted(numbers)
        assert counters["route.levels.coalesced"] == BURST - len(got)
        assert counters["route.levels.published"] == len(got)
        assert counters["route.levels.dropped.rate_limited"] == 0
        assert bridge.outboxes[0].limiter is not None and bridge.outboxes[0].limiter.held == 0


async def test_mqtt_to_room_drop_newest_drops_and_counts_and_acknowledges(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    topic = unique("alarms")
    body = f"""\
connectors:
  - name: alarms
    from: {{mqtt: bus, topic: "{topic}/{{device}}"}}
    to: {{room: "{room_name}", packet: {{topic: "alarm.{{device}}"}}}}
    rate: {{max: 0.5, burst: 2, policy: drop_newest}}
"""
    async with (
        sdk_peer(livekit_server, room_name, "console") as console,
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
    ):
        got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        console.on("data_received", got.put_nowait)
        await eventually(lambda: "bridge" in console.remote_participants, what="bridge joined")
        for i in range(10):
            await mqtt_peer.publish(f"{topic}/d1", f"a{i}".encode())
        counters = bridge.counters
        settled = ("route.alarms.delivered", "route.alarms.dropped.rate_limited")
        await eventually(
            lambda: sum(counters[name] for name in settled) == 10,
            timeout=30,
            what="every alarm delivered or dropped",
        )
        delivered = counters["route.alarms.delivered"]
        assert 2 <= delivered < 10  # the burst of 2 went at once; the rest came too fast
        received = [(await asyncio.wait_for(got.get(), 15)).data for _ in range(delivered)]
        assert received[:2] == [b"a0", b"a1"]
        assert counters["route.alarms.coalesced"] == 0
        # Dropped messages are acknowledged like delivered ones: nothing stays in flight.
        await eventually(lambda: bridge.pumps[0].in_flight == 0, what="every message settled")


async def test_latched_mqtt_to_room_sends_the_last_value_per_topic_to_a_late_joiner(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    topic = unique("state")
    body = f"""\
connectors:
  - name: state
    from: {{mqtt: bus, topic: "{topic}/{{device}}"}}
    to: {{room: "{room_name}", packet: {{topic: "state.{{device}}"}}}}
    latched: true
"""
    # A retained value from before the bridge started fills the latch too.
    await mqtt_peer.publish(f"{topic}/a", b"a1", retain=True)
    early_got: list[tuple[str, bytes]] = []
    late_got: list[tuple[str, bytes]] = []
    async with (
        sdk_peer(livekit_server, room_name, "early") as early,
        run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
    ):
        early.on("data_received", lambda p: early_got.append((p.topic, p.data)))
        counters = bridge.counters
        await eventually(lambda: counters["route.state.delivered"] == 1, what="the retained a1")
        for device, value in (("a", b"a2"), ("a", b"a3"), ("b", b"b1")):
            await mqtt_peer.publish(f"{topic}/{device}", value)
        await eventually(lambda: counters["route.state.delivered"] == 4, what="live values")
        await eventually(lambda: ("state.b", b"b1") in early_got, what="early has the values")

        late = rtc.Room()
        late.on("data_received", lambda p: late_got.append((p.topic, p.data)))
        await late.connect(livekit_server.url, make_token(livekit_server, room_name, "late"))
        try:
            await eventually(lambda: len(late_got) >= 2, timeout=30, what="the latched values")
            # A live value after the replay: once both have it, nothing more is in transit.
            await mqtt_peer.publish(f"{topic}/c", b"c1")
            await eventually(
                lambda: ("state.c", b"c1") in late_got and ("state.c", b"c1") in early_got,
                what="c1 in both",
            )
        finally:
            await late.disconnect()
        # The last value per topic, addressed to the late joiner only.
        assert sorted(late_got[:2]) == [("state.a", b"a3"), ("state.b", b"b1")]
        assert late_got[2:] == [("state.c", b"c1")]
        assert early_got.count(("state.a", b"a3")) == 1
        assert early_got.count(("state.b", b"b1")) == 1
        assert counters["route.state.latched_sent"] == 2
    await mqtt_peer.publish(f"{topic}/a", b"", retain=True)  # clear the retained topic
