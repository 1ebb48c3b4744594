"""R8: slow consumers on every side at once — Kafka throttled to about 10 % of what the load
needs (the TCP fault proxy's bandwidth limit on every connection of the bridge's producer), a
slow LiveKit subscriber (an SDK participant in its own process spending 50 ms per packet, at
twice that rate), and a slow MQTT subscriber (20 ms per message) — beside fast receivers.

Legs: MQTT → room (fast SDK observer), room → MQTT (fast QoS 1 collector), room → Kafka
(read after the throttle). The bridge's resident memory is sampled every 0.5 s.

Expected (short / full): throttle 12 s / 2 min at 40 msg/s per leg: lost 0 on every leg (the
fast receivers see everything; the slow ones slow only themselves); the bridge's memory stays
within its configured buffers plus 50 MB (here: peak RSS - RSS before the throttle ≤ 50 MB, the
buffers holding at most a few thousand ~300-byte messages); the room → Kafka backlog drains
within 30 s of the throttle's end (reported; the README's bar).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import make_token
from tests.faults.checker import Leg
from tests.faults.harness import (
    ROOT,
    BridgeProc,
    MqttCollector,
    MqttPublisher,
    ProxiedKafka,
    bridge_head,
    bridge_section,
    bridged_peers,
    create_topic,
    device_load,
    free_port,
    kafka_section,
    mqtt_section,
    pick,
    read_kafka,
    room_load,
    rss_mb,
    settle,
    shut_down,
    two_way_load,
)
from tests.faults.proxy import FaultProxy
from tests.services import LiveKitServer, Mosquitto

DEVICES = 5


class Count:
    """A sink that only counts (the slow MQTT subscriber)."""

    def __init__(self) -> None:
        self.n = 0

    def deliver(self, data: bytes | str, t_recv: float | None = None) -> None:
        self.n += 1


async def test_r8_slow_consumers_slow_only_themselves(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    proxied_kafka: ProxiedKafka,
    room_name: str,
    tmp_path: Path,
) -> None:
    proxy = await FaultProxy(proxied_kafka.port, port=proxied_kafka.advertised_port).start()
    bootstrap = f"127.0.0.1:{proxy.port}"
    topic = f"faults-r8-{int(time.time())}"
    down = Leg("R8", "mqtt→room")
    up = Leg("R8", "room→mqtt")
    upk = Leg("R8", "room→kafka")
    upk.source, upk.run = (
        up.source,
        up.run,
    )  # one packet goes both ways: one sender
    port = free_port()
    config = (
        bridge_head(livekit_server, room_name)
        + bridge_section(tmp_path / "state", port)
        + mqtt_section(mosquitto.port, f"roombus-{room_name[-20:]}")
        + kafka_section(bootstrap)
        + "connectors:\n"
        "  - name: down\n"
        '    from: {mqtt: bus, topic: "faults/slow/{device}", qos: 1}\n'
        f'    to: {{room: "{room_name}", packet: {{topic: "t.{{device}}"}}}}\n'
        "  - name: up\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        '    to: {mqtt: bus, topic: "faults/slowup/{participant}", qos: 1}\n'
        "  - name: upk\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        f'    to: {{kafka: main, topic: "{topic}", key: "{{participant}}"}}\n'
    )
    bridge = BridgeProc(tmp_path, config, port)
    fast = MqttCollector(mosquitto.port, "faults/slowup/#", up)
    slow_count = Count()
    slow_sub = MqttCollector(mosquitto.port, "faults/slowup/#", slow_count, 0.02)
    publisher = MqttPublisher(mosquitto.port, down)
    rate, throttle, around = 40, pick(12, 120), 4.0
    seconds = throttle + 2 * around
    token = make_token(livekit_server, room_name, "slow-subscriber")
    slow_peer = subprocess.Popen(  # noqa: ASYNC220  # started once, waited for at the end
        [
            sys.executable,
            "-m",
            "tests.faults.slow_peer",
            livekit_server.url,
            token,
            "--work",
            "0.05",
            "--seconds",
            str(seconds + 20),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    rss: list[float] = []
    try:
        await create_topic(bootstrap, topic)
        await fast.ready()
        await slow_sub.ready()
        async with bridged_peers(livekit_server, room_name, bridge, down, up, also=upk) as peers:
            stop = asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    rss.append(rss_mb(bridge.pid))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            loads = two_way_load(
                rate,
                seconds,
                device_load(publisher, "faults/slow/d{d}", DEVICES),
                room_load(peers.publisher.send),
            )
            await asyncio.sleep(around)
            before = max(rss)
            mark = upk.fault(f"Kafka at ~{2 * 1024} B/s")
            proxy.bandwidth(2 * 1024)
            await asyncio.sleep(throttle)
            proxy.clear()
            mark.end = time.time()
            await loads
            await publisher.all_acked(60)
            await settle([down, up], timeout=60)
            await read_kafka(bootstrap, topic, upk, upk.seen_all_acked, 120)
            await bridge.drained(60)
            stop.set()
            await sampler
            m = await bridge.metrics()
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge, publisher, fast, slow_sub)
        await proxy.close()
        slow_peer.terminate()
    out, _ = slow_peer.communicate(timeout=30)
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    slow_packets = next((x["packets"] for x in reversed(lines) if "packets" in x), None)
    growth = max(rss) - before
    results = []
    for leg in (down, up, upk):
        r = leg.check(
            fault=f"Kafka throttled {throttle:.0f} s; slow SDK and MQTT subscribers",
            load=f"{rate} msg/s each way, {seconds:.0f} s",
            expected="lost 0; RSS growth ≤ 50 MB; Kafka backlog drained ≤ 30 s after",
        )
        r.notes.append(f"bridge RSS {before:.0f} MB before, peak {max(rss):.0f} MB")
        r.notes.append(
            f"slow SDK subscriber got {slow_packets} packets, slow MQTT subscriber"
            f" {slow_count.n} messages (of {len(up.sent)})"
        )
        r.notes.append(f"dropped {m.get('roombus_route_dropped_total'):.0f}")
        r.verdict = "pass" if r.lost == 0 and growth <= 50 else "FAIL"
        r.write()
        results.append(r)
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
        assert r.unexpected == 0, r.summary()
    assert growth <= 50, results[0].summary()
