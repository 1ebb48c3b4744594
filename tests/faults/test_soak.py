"""R11: the soak. Half load both ways (MQTT → room, room → MQTT, room → Kafka with the spool)
for `$ROOMBUS_FAULTS_SOAK_MINUTES` (the full run: 60), with a random fault from R1/R3/R4 at the
end of every window but the last (from 10 minutes on; windows of 10 minutes from 30 minutes on,
otherwise a third of the run); CI runs 21 s without faults (windows of 7 s). Every window
records the bridge's resident memory, open file descriptors and threads (the bridge exports no
asyncio task count) and the p99 latency.

Expected: without faults lost 0 and duplicated 0; with faults each fault's own criteria (lost 0;
duplicates reported). Memory growth ≤ 1 MB per window after the first; p99 of the last window
≤ 1.5 x the first; fds and threads stable — reported in docs/reliability.md, asserted only for
loss and duplicates (the machine is shared: timing and memory figures are the report's).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

from tests.faults.checker import Leg, quantile
from tests.faults.harness import (
    BridgeProc,
    MqttCollector,
    MqttPublisher,
    bridge_head,
    bridge_section,
    bridged_peers,
    create_topic,
    device_load,
    free_port,
    kafka_section,
    mqtt_section,
    proc_counts,
    read_kafka,
    room_load,
    rss_mb,
    settle,
    shut_down,
    two_way_load,
)
from tests.services import Kafka, LiveKitServer, Mosquitto

DEVICES = 10
GREY = 1.0


async def test_r11_soak(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    kafka: Kafka,
    room_name: str,
    tmp_path: Path,
) -> None:
    minutes = float(os.environ.get("ROOMBUS_FAULTS_SOAK_MINUTES") or 0)
    seconds = minutes * 60 if minutes else 21.0
    window = 600.0 if seconds >= 1800 else seconds / 3
    with_faults = seconds >= 600
    rate = 50
    topic = f"faults-soak-{int(time.time())}"
    await create_topic(kafka, topic)
    name = "R11" if not minutes else f"R11-{minutes:g}min"
    down, up, upk = Leg(name, "mqtt→room"), Leg(name, "room→mqtt"), Leg(name, "room→kafka")
    upk.source, upk.run = up.source, up.run  # one packet goes both ways: one sender
    port = free_port()
    config = (
        bridge_head(livekit_server, room_name)
        + bridge_section(tmp_path / "state", port, "  spool: {max_bytes: 104857600}\n")
        + mqtt_section(mosquitto.port, f"roombus-{room_name[-20:]}")
        + kafka_section(kafka.bootstrap)
        + "connectors:\n"
        "  - name: down\n"
        '    from: {mqtt: bus, topic: "faults/soak/{device}", qos: 1}\n'
        f'    to: {{room: "{room_name}", packet: {{topic: "t.{{device}}"}}}}\n'
        "  - name: up\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        '    to: {mqtt: bus, topic: "faults/soakup/{participant}", qos: 1}\n'
        "  - name: upk\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        f'    to: {{kafka: main, topic: "{topic}", key: "{{participant}}"}}\n'
    )
    bridge = BridgeProc(tmp_path, config, port)
    collector = MqttCollector(mosquitto.port, "faults/soakup/#", up)
    publisher = MqttPublisher(mosquitto.port, down)
    samples: list[dict[str, Any]] = []
    faults: list[str] = []
    rng = random.Random(11)
    try:
        await collector.ready()
        async with bridged_peers(livekit_server, room_name, bridge, down, up, also=upk) as peers:

            async def fault(n: int) -> None:
                kind = rng.choice(["mosquitto restart", "kafka restart", "bridge SIGKILL"])
                faults.append(f"{kind} at {n * window / 60:.0f} min")
                legs = [down, up, upk]
                marks = [leg.fault(kind) for leg in legs]
                if kind == "mosquitto restart":
                    await asyncio.to_thread(mosquitto.stop)
                    await asyncio.sleep(2)
                    await asyncio.to_thread(mosquitto.start)
                elif kind == "kafka restart":
                    await asyncio.to_thread(kafka.stop)
                    await asyncio.sleep(10)
                    await asyncio.to_thread(kafka.start)
                else:
                    gone = time.time()
                    await asyncio.to_thread(bridge.kill)
                    bridge.start()
                    await bridge.wait_ready()
                    up.unacked_window(gone - GREY, time.time() + GREY)
                    upk.unacked_window(gone - GREY, time.time() + GREY)
                for mark in marks:
                    mark.end = time.time()

            async def windows() -> None:
                t0 = time.monotonic()
                n = 0
                while time.monotonic() - t0 < seconds - 0.5:
                    n += 1
                    start = time.time()
                    await asyncio.sleep(max(0.0, t0 + n * window - time.monotonic()))
                    fds, threads = proc_counts(bridge.pid)
                    samples.append(
                        {
                            "name": f"{(n - 1) * window / 60:.1f}-{n * window / 60:.1f} min",
                            "start": start,
                            "end": time.time(),
                            "rss_mb": rss_mb(bridge.pid),
                            "fds": fds,
                            "threads": threads,
                            "pid": bridge.pid,
                        }
                    )
                    if with_faults and n * window < seconds - 60:
                        await fault(n)

            device = device_load(publisher, "faults/soak/d{d}", DEVICES)
            loads = two_way_load(rate, seconds, device, room_load(peers.publisher.send))
            await asyncio.gather(loads, windows())
            await publisher.all_acked(90)
            await settle([down, up], timeout=90)
            await read_kafka(kafka.bootstrap, topic, upk, upk.seen_all_acked, 120)
            await bridge.drained(60)
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge, publisher, collector)
    load = f"{rate} msg/s each way, {seconds / 60:.1f} min"
    results = []
    for leg in (down, up, upk):
        r = leg.check(
            fault="; ".join(faults) or "none",
            load=load,
            expected="no faults: lost 0, duplicated 0; faults: lost 0",
        )
        ok = r.lost == 0 and (with_faults or r.duplicated == 0)
        r.verdict = "pass" if ok else "FAIL"
        r.write()
        results.append(r)
    prev: dict[str, Any] | None = None
    for s in samples:
        lat = sorted(
            (t_recv - t_send) * 1000
            for leg in (down, up)
            for _, t_send, t_recv in leg.received
            if s["start"] <= t_recv < s["end"]
        )
        s["p99_ms"] = round(quantile(lat, 0.99), 1) if lat else None
        same = prev is not None and prev["pid"] == s["pid"]
        s["growth_mb"] = s["rss_mb"] - prev["rss_mb"] if prev is not None and same else 0.0
        prev = s
    first, last = samples[0], samples[-1]
    after = [s["growth_mb"] for s in samples[1:]]
    summary = (
        f"Memory growth per window after the first: max {max(after, default=0):+.1f} MB"
        f" (bar +1 MB per 10 min); p99 first {first['p99_ms']} ms, last {last['p99_ms']} ms"
        f" (bar 1.5x); fds {first['fds']} → {last['fds']}, threads {first['threads']} →"
        f" {last['threads']}."
    )
    print(summary)
    out = os.environ.get("ROOMBUS_FAULTS_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
        data = {
            "minutes": seconds / 60,
            "load": load,
            "faults": faults,
            "windows": samples,
            "summary": summary,
        }
        (Path(out) / f"soak-{uuid.uuid4().hex[:6]}.data").write_text(json.dumps(data, indent=1))
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
        if not with_faults:
            assert r.duplicated == 0, r.summary()
