"""Hot reload against the real servers: add, change and remove routes, break the file.

Two untouched routes carry numbered messages all along (MQTT→room and room→MQTT); each reload
must leave them alone: every number arrives once, in order, and the bridge never rejoins the
room (its participant keeps its sid, ``rooms.joined`` stays 1). The reloaded routes must do
what the new file says right after the reload returns.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from livekit import rtc

from bridge.runtime.bridge import Bridge
from bridge.runtime.reloader import Reloader
from tests.e2e.conftest import KafkaPeer, MqttPeer, bridge_yaml, kafka_assigned, run_bridge, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto

STEADY = """\
connectors:
  - name: steady-in
    from: {{mqtt: bus, topic: "{p}/steady/in"}}
    to: {{room: "{room}", packet: {{topic: steady}}}}
  - name: steady-out
    from: {{room: "*", packet: {{topic: up}}}}
    to: {{mqtt: bus, topic: "{p}/steady/out"}}
"""

EXTRA = """\
  - name: extra-out
    from: {{room: "*", packet: {{topic: x}}}}
    to: {{mqtt: bus, topic: "{p}/extra/{out}"}}
  - name: extra-in
    from: {{mqtt: bus, topic: "{p}/extra/in"}}
    to: {{room: "{room}", packet: {{topic: "{into}"}}}}
"""

MESSAGES = 400  # per steady direction: bounded, ~20 s at the pace below


class Traffic:
    """Numbered messages on the two steady routes until `stop` (at most MESSAGES each)."""

    def __init__(self, peer: rtc.Room, mqtt: MqttPeer, prefix: str) -> None:
        self.peer, self.mqtt, self.prefix = peer, mqtt, prefix
        self.sent = 0
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        deadline = time.monotonic() + 120
        while self.sent < MESSAGES and not self.stopping.is_set():
            assert time.monotonic() < deadline, "traffic did not finish in time"
            n = str(self.sent).encode()
            await self.mqtt.publish(f"{self.prefix}/steady/in", n)
            await self.peer.local_participant.publish_data(n, reliable=True, topic="up")
            self.sent += 1
            await asyncio.sleep(0.02)


def _numbers(items: list[bytes]) -> list[int]:
    return [int(x) for x in items]


async def test_reload_adds_changes_removes_routes_and_refuses_bad_files(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    mqtt_peer: MqttPeer,
    room_name: str,
    tmp_path: Path,
) -> None:
    p = unique("reload")
    head = bridge_yaml(livekit_server, mosquitto, None, room_name, "")
    steady = head + STEADY.format(p=p, room=room_name)
    path = tmp_path / "roombus.yaml"
    path.write_text(steady)
    async with (
        sdk_peer(livekit_server, room_name, "dash") as dash,
        run_bridge(path.read_text()) as bridge,
    ):
        reloader = Reloader(bridge, path)
        in_room: dict[str, list[bytes]] = {"steady": [], "x-in": [], "x-in-2": []}
        dash.on(
            "data_received",
            lambda pkt: in_room.setdefault(pkt.topic or "", []).append(pkt.data),
        )
        await mqtt_peer.subscribe(f"{p}/#")
        on_bus: dict[str, list[bytes]] = {}

        async def collect() -> None:
            while True:
                message = await mqtt_peer.messages.get()
                topic = message.topic.removeprefix(f"{p}/")
                on_bus.setdefault(topic, []).append(bytes(message.payload))

        await eventually(lambda: "bridge" in dash.remote_participants, what="dash sees the bridge")
        bridge_sid = dash.remote_participants["bridge"].sid
        link = bridge.links[room_name]
        traffic = Traffic(dash, mqtt_peer, p)
        async with asyncio.TaskGroup() as tg:
            collector = tg.create_task(collect())
            sender = tg.create_task(traffic.run())
            await eventually(lambda: len(in_room["steady"]) >= 10, what="steady traffic")

            before = traffic.sent

            async def flowing() -> None:
                # The steady routes keep moving between the reloads.
                mark = len(in_room["steady"]) + 5
                await eventually(lambda: len(in_room["steady"]) >= mark, what="steady traffic")

            # 1. Add a route each way.
            path.write_text(steady + EXTRA.format(p=p, room=room_name, out="out", into="x-in"))
            assert await reloader.reload() == "applied", reloader.last
            await flowing()
            await _extra_routes_work(dash, mqtt_peer, p, in_room, on_bus, "out", "x-in")

            # 2. Change both: other topics.
            path.write_text(
                steady + EXTRA.format(p=p, room=room_name, out="changed", into="x-in-2")
            )
            assert await reloader.reload() == "applied", reloader.last
            await flowing()
            await _extra_routes_work(dash, mqtt_peer, p, in_room, on_bus, "changed", "x-in-2")
            assert len(on_bus.get("extra/out", [])) == 1, "the old version still publishes"

            # 3. Remove both: nothing goes through them, the steady routes still do.
            path.write_text(steady)
            assert await reloader.reload() == "applied", reloader.last
            await flowing()
            await dash.local_participant.publish_data(b"after-removal", reliable=True, topic="x")
            await mqtt_peer.publish(f"{p}/extra/in", b"after-removal")

            # 4. A broken file: refused with its location, the old configuration keeps running.
            path.write_text(steady + "  - name: broken\n    from: {mqtt: nowhere, topic: t}\n")
            assert await reloader.reload() == "rejected"
            await flowing()
            problems = reloader.last["problems"]
            assert isinstance(problems, list) and problems
            assert all(str(path) in line for line in problems), problems
            path.write_text(steady + ":\n  - [unbalanced")
            assert await reloader.reload() == "rejected"
            await flowing()

            # 5. What needs a restart is listed and refused.
            path.write_text(steady.replace("identity: bridge", "identity: other-bridge"))
            assert await reloader.reload() == "rejected"
            await flowing()
            problems = reloader.last["problems"]
            assert isinstance(problems, list)
            assert any("livekit.identity" in line for line in problems), problems

            traffic.stopping.set()
            await sender
            sent = traffic.sent
            assert sent > before + 20, "the reloads did not overlap the steady traffic"
            await eventually(
                lambda: (
                    len(in_room["steady"]) >= sent and len(on_bus.get("steady/out", [])) >= sent
                ),
                timeout=30,
                what=f"all {sent} steady messages in both directions",
            )
            collector.cancel()

        # The untouched routes lost nothing, duplicated nothing, kept their order.
        assert _numbers(in_room["steady"]) == list(range(sent))
        assert _numbers(on_bus["steady/out"]) == list(range(sent))
        # Nothing went through the removed routes after their removal.
        assert b"after-removal" not in on_bus.get("extra/changed", [])
        assert b"after-removal" not in in_room["x-in-2"]
        # Never rejoined.
        assert dash.remote_participants["bridge"].sid == bridge_sid
        assert bridge.links[room_name] is link
        assert bridge.counters["rooms.joined"] == 1
        assert bridge.counters["config.reloads.applied"] == 3
        assert bridge.counters["config.reloads.rejected"] == 3
        assert [o.name for o in bridge.outboxes] == ["steady-out"]
        _steady_only(bridge)


async def _extra_routes_work(
    dash: rtc.Room,
    mqtt: MqttPeer,
    p: str,
    in_room: dict[str, list[bytes]],
    on_bus: dict[str, list[bytes]],
    out: str,
    into: str,
) -> None:
    """The reloaded routes work right away: a room packet reaches MQTT, an MQTT message the room."""
    await dash.local_participant.publish_data(out.encode(), reliable=True, topic="x")
    await eventually(
        lambda: on_bus.get(f"extra/{out}") == [out.encode()], what=f"the room packet on extra/{out}"
    )
    await mqtt.publish(f"{p}/extra/in", into.encode())
    await eventually(
        lambda: in_room.get(into) == [into.encode()], what=f"the MQTT message as {into}"
    )


def _steady_only(bridge: Bridge) -> None:
    (source,) = bridge.endpoints.sources
    assert [r.name for r in source.routes] == ["steady-in"]
    assert all("steady" in f for f in source.subscriptions), source.subscriptions


async def test_reload_kafka_routes_start_and_stop_their_own_consumers_and_producer(
    livekit_server: LiveKitServer,
    kafka: Kafka,
    kafka_peer: KafkaPeer,
    room_name: str,
    tmp_path: Path,
) -> None:
    steady_topic, extra_a, extra_b, out_topic = (unique(t) for t in ("st", "xa", "xb", "out"))
    for topic in (steady_topic, extra_a, extra_b, out_topic):
        await kafka_peer.create_topic(topic)
    head = bridge_yaml(livekit_server, None, kafka, room_name, "")
    steady = head + (
        "connectors:\n"
        "  - name: steady\n"
        f"    from: {{kafka: main, topics: [{steady_topic}]}}\n"
        f'    to: {{room: "{room_name}", packet: {{topic: steady}}}}\n'
    )

    def extra(topic: str) -> str:
        return (
            "  - name: extra\n"
            f"    from: {{kafka: main, topics: [{topic}]}}\n"
            f'    to: {{room: "{room_name}", packet: {{topic: "extra"}}}}\n'
            "  - name: up\n"
            '    from: {room: "*", packet: {topic: up}}\n'
            f"    to: {{kafka: main, topic: {out_topic}}}\n"
        )

    path = tmp_path / "roombus.yaml"
    path.write_text(steady)
    async with (
        sdk_peer(livekit_server, room_name, "dash") as dash,
        run_bridge(path.read_text()) as bridge,
    ):
        reloader = Reloader(bridge, path)
        got: dict[str, list[bytes]] = {}
        dash.on("data_received", lambda pkt: got.setdefault(pkt.topic or "", []).append(pkt.data))
        await eventually(lambda: "bridge" in dash.remote_participants, what="dash sees the bridge")
        bridge_sid = dash.remote_participants["bridge"].sid
        await kafka_assigned(bridge)
        assert "kafka:main" not in bridge.endpoints.sinks  # nothing publishes to Kafka yet
        sent = 0

        async def send_steady(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                await kafka_peer.produce(steady_topic, str(sent).encode(), key=b"k")
                sent += 1

        await send_steady(20)
        path.write_text(steady + extra(extra_a))
        assert await reloader.reload() == "applied", reloader.last
        await send_steady(20)
        await kafka_assigned(bridge)
        assert "kafka:main" in bridge.endpoints.sinks
        await kafka_peer.produce(extra_a, b"a1")
        await eventually(lambda: got.get("extra") == [b"a1"], what="the added Kafka route")
        consumer = await kafka_peer.consumer(out_topic)
        await dash.local_participant.publish_data(b"u1", reliable=True, topic="up")
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.value == b"u1"

        # Changed: the route's consumer is replaced (now on extra_b), its group keeps nothing
        # of extra_a.
        path.write_text(steady + extra(extra_b))
        assert await reloader.reload() == "applied", reloader.last
        await send_steady(20)
        await kafka_assigned(bridge)
        await kafka_peer.produce(extra_a, b"a2")
        await kafka_peer.produce(extra_b, b"b1")
        await eventually(lambda: got.get("extra") == [b"a1", b"b1"], what="the changed route")

        # Removed: its consumer and the producer no route uses any more are closed.
        path.write_text(steady)
        assert await reloader.reload() == "applied", reloader.last
        await send_steady(20)
        assert "kafka:main" not in bridge.endpoints.sinks
        assert [s.name for s in bridge.endpoints.sources] == ["kafka:main:steady"]
        await eventually(lambda: len(got.get("steady", [])) >= sent, what="every steady record")
        assert [int(x) for x in got["steady"]] == list(range(sent))
        assert got["extra"] == [b"a1", b"b1"]
        assert dash.remote_participants["bridge"].sid == bridge_sid
        assert bridge.counters["rooms.joined"] == 1
