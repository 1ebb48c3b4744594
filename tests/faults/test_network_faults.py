"""R6: network faults on the bridge's MQTT and Kafka connections, through the project's TCP fault
proxy (`tests/faults/proxy.py`), one after another under load.

* MQTT: the bridge reaches Mosquitto only through the proxy (both its subscriber and its
  publisher connection); devices and the bus-side collector connect directly. Both directions:
  MQTT → room (acknowledged on the broker's PUBACK to the device) and room → MQTT
  (acknowledged when the bridge received the packet).
* Kafka: a Kafka of its own whose advertised listener is the proxy, so every connection of the
  bridge's producer goes through it; room → Kafka with the spool. The test reads the topic only
  after the faults (its reader goes through the proxy too); LogAppendTime gives delivery times.

Faults, in this order, each with the load running (short / full seconds): down (the listener
closed, connections closed) 4 / 10; latency 200 ± 50 ms 3 / 30; bandwidth 64 KB/s 3 / 30;
blackhole (nothing passes, nothing closes) 8 / 30; connection reset (RST) once; sliced writes
(7-byte pieces, 1 ms apart) 3 / 30; with 1.5 s of clean network between faults.

Expected: lost 0 on every leg; no deadlock (everything acknowledged arrives once the network is
clean); duplicates reported; the longest stall outside the fault windows (a gap between
deliveries that starts later than 1.5 s after a fault ended) reported — the bar is 2 s.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.faults.checker import Leg, Result
from tests.faults.harness import (
    BridgeProc,
    MqttCollector,
    MqttPublisher,
    ProxiedKafka,
    bridge_head,
    bridge_section,
    bridged_peers,
    bridged_sender,
    create_topic,
    device_load,
    free_port,
    kafka_section,
    mqtt_section,
    pace,
    pick,
    read_kafka,
    room_load,
    settle,
    shut_down,
    two_way_load,
)
from tests.faults.proxy import FaultProxy
from tests.services import LiveKitServer, Mosquitto

DEVICES = 10
GAP = 1.5


def faults_plan(proxy: FaultProxy) -> list[tuple[str, float, Callable[[], Awaitable[None]]]]:
    """(name, seconds, switch on); each is switched off by `proxy.up()` + `proxy.clear()`."""

    async def down() -> None:
        await proxy.down()

    async def latency() -> None:
        proxy.latency(0.2, 0.05)

    async def bandwidth() -> None:
        proxy.bandwidth(64 * 1024)

    async def blackhole() -> None:
        proxy.blackhole(True)

    async def reset() -> None:
        proxy.reset()

    async def sliced() -> None:
        proxy.slice(7, 0.001)

    return [
        ("down", pick(4, 10), down),
        ("latency 200±50 ms", pick(3, 30), latency),
        ("64 KB/s", pick(3, 30), bandwidth),
        ("blackhole", pick(8, 30), blackhole),
        ("reset", 0.0, reset),
        ("sliced 7 B", pick(3, 30), sliced),
    ]


async def run_faults(proxy: FaultProxy, legs: list[Leg]) -> float:
    """Every fault of the plan in turn; the seconds it all took."""
    start = time.monotonic()
    for name, seconds, on in faults_plan(proxy):
        marks = [leg.fault(name) for leg in legs]
        await on()
        await asyncio.sleep(seconds)
        await proxy.up()
        proxy.clear()
        for m in marks:
            m.end = time.time()
        await asyncio.sleep(GAP)
    return time.monotonic() - start


def max_stall(leg: Leg) -> float:
    """The longest gap between deliveries that does not start inside a fault (or within GAP s
    of its end)."""
    times = sorted(t for _, _, t in leg.received)
    worst = 0.0
    for a, b in itertools.pairwise(times):
        if any(f.start - 0.5 <= a <= f.end + GAP for f in leg.faults):
            continue
        worst = max(worst, b - a)
    return round(worst, 2)


def verdict(r: Result, stall: float) -> None:
    r.notes.append(f"longest stall outside faults {stall:.1f} s")
    r.verdict = "pass" if r.lost == 0 and r.unexpected == 0 else "FAIL"
    if r.verdict == "pass" and stall > GAP:
        r.verdict = "pass (stall > 2 s)"
    r.write()


async def test_r6_mqtt_connection_faults_lose_nothing_either_way(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    proxy = await FaultProxy(mosquitto.port).start()
    down = Leg("R6-mqtt", "mqtt→room")
    up = Leg("R6-mqtt", "room→mqtt")
    port = free_port()
    config = (
        bridge_head(livekit_server, room_name)
        + bridge_section(tmp_path / "state", port)
        + mqtt_section(proxy.port, f"roombus-{room_name[-20:]}", keepalive=5)
        + "connectors:\n"
        "  - name: down\n"
        '    from: {mqtt: bus, topic: "faults/net/{device}", qos: 1}\n'
        f'    to: {{room: "{room_name}", packet: {{topic: "t.{{device}}"}}}}\n'
        "  - name: up\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        '    to: {mqtt: bus, topic: "faults/netup/{participant}", qos: 1}\n'
    )
    bridge = BridgeProc(tmp_path, config, port)
    collector = MqttCollector(mosquitto.port, "faults/netup/#", up)
    publisher = MqttPublisher(mosquitto.port, down)
    rate = pick(50, 50)
    seconds = sum(s + GAP for _, s, _ in faults_plan(proxy)) + 4
    try:
        await collector.ready()
        async with bridged_peers(livekit_server, room_name, bridge, down, up) as peers:
            loads = two_way_load(
                rate,
                seconds,
                device_load(publisher, "faults/net/d{d}", DEVICES),
                room_load(peers.publisher.send),
            )
            await asyncio.sleep(2)
            await run_faults(proxy, [down, up])
            await loads
            await publisher.all_acked(90)
            await settle([down, up], timeout=120, quiet=20)
            await bridge.drained(30)
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge, publisher, collector)
        await proxy.close()
    results = []
    for leg in (down, up):
        r = leg.check(
            fault="TCP proxy: down, latency, 64 KB/s, blackhole, reset, sliced",
            load=f"{rate:.0f} msg/s each way, {seconds:.0f} s",
            expected="lost 0; no deadlock; no stall > 2 s outside the faults",
        )
        verdict(r, max_stall(leg))
        results.append(r)
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
        assert r.unexpected == 0, r.summary()


async def test_r6_kafka_connection_faults_lose_nothing(
    livekit_server: LiveKitServer, proxied_kafka: ProxiedKafka, room_name: str, tmp_path: Path
) -> None:
    proxy = await FaultProxy(proxied_kafka.port, port=proxied_kafka.advertised_port).start()
    bootstrap = f"127.0.0.1:{proxy.port}"
    topic = f"faults-r6-{int(time.time())}"
    leg = Leg("R6-kafka", "room→kafka")
    port = free_port()
    config = (
        bridge_head(livekit_server, room_name)
        + bridge_section(tmp_path / "state", port, "  spool: {max_bytes: 104857600}\n")
        + kafka_section(bootstrap)
        + "connectors:\n"
        "  - name: up\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        f'    to: {{kafka: main, topic: "{topic}", key: "{{participant}}"}}\n'
    )
    bridge = BridgeProc(tmp_path, config, port)
    rate = 50
    seconds = sum(s + GAP for _, s, _ in faults_plan(proxy)) + 4
    try:
        await create_topic(bootstrap, topic)
        async with bridged_sender(livekit_server, room_name, bridge, leg) as pub:
            load = asyncio.create_task(pace(rate, seconds, room_load(pub.send)))
            await asyncio.sleep(2)
            await run_faults(proxy, [leg])
            await load
            await read_kafka(bootstrap, topic, leg, leg.seen_all_acked, 150)
            await bridge.drained(30)
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge)
        await proxy.close()
    r = leg.check(
        fault="TCP proxy: down, latency, 64 KB/s, blackhole, reset, sliced",
        load=f"{rate:.0f} msg/s, {seconds:.0f} s",
        expected="lost 0; no deadlock; no stall > 2 s outside the faults",
    )
    verdict(r, max_stall(leg))
    assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
    assert r.unexpected == 0, r.summary()
