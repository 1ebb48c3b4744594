"""R9 (the size limits; the malformed-input half is covered elsewhere, see below): MQTT → room
messages exactly at and just over each limit, each followed by a small sentinel on the same
route, through two routes: `oversize: byte_stream` (the default) and `oversize: reject`.

Sizes: 15 KiB, 16 KiB, 64,000 B (the SDKs' packet limit), 64 KiB, 256 KiB and 1 MiB - 1 KiB
(Mosquitto's and MQTT's practical ceiling here), each padded test messages with the header.

Expected: byte_stream route — every message arrives (as a packet, or above the packet limit as
a byte stream) and every sentinel after it (the data channel is never closed); reject route —
the messages over the packet limit are rejected and dropped, and their number equals
`roombus_route_rejected_total{reason="too_large"}` (and `dropped`), the rest and every sentinel
arrive.

Elsewhere for R9: tests/e2e/test_bad_input.py (invalid UTF-8, too-large Kafka records, rejected
MQTT messages with and without dead letters, participant-controlled values never becoming MQTT
wildcards or invalid Kafka topics), tests/interop/test_packets.py (an oversized packet is
refused and the channel keeps working), tests/unit/test_config_limits.py (NUL, 10,000-level
nesting, alias bombs, huge files, room names LiveKit refuses), tests/fuzz (R10).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from livekit import rtc

from tests.faults.checker import Leg, parse
from tests.faults.harness import (
    BridgeProc,
    MqttPublisher,
    bridge_head,
    bridge_in_room,
    bridge_section,
    free_port,
    mqtt_section,
    sdk_room,
    settle,
    shut_down,
)
from tests.services import LiveKitServer, Mosquitto

SIZES = [15 * 1024, 16 * 1024, 64000, 64 * 1024, 256 * 1024, 1024 * 1024 - 1024]
PACKET_LIMIT = 64000  # the bridge's own check is on the encoded packet: a bit less fits


async def test_r9_size_limits_are_delivered_as_streams_or_rejected_and_counted(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    stream = Leg("R9", "mqtt→room oversize: byte_stream")
    reject = Leg("R9", "mqtt→room oversize: reject")
    port = free_port()
    config = (
        bridge_head(livekit_server, room_name)
        + bridge_section(tmp_path / "state", port)
        + mqtt_section(mosquitto.port, f"roombus-{room_name[-20:]}")
        + "connectors:\n"
        "  - name: stream\n"
        '    from: {mqtt: bus, topic: "faults/r9/stream", qos: 1}\n'
        f'    to: {{room: "{room_name}", packet: {{topic: "r9s"}}}}\n'
        "  - name: reject\n"
        '    from: {mqtt: bus, topic: "faults/r9/reject", qos: 1}\n'
        f'    to: {{room: "{room_name}", packet: {{topic: "r9r", oversize: reject}}}}\n'
    )
    bridge = BridgeProc(tmp_path, config, port)
    legs = {leg.source: leg for leg in (stream, reject)}
    tasks: set[asyncio.Task[None]] = set()

    def deliver(data: bytes) -> None:
        head = parse(data)
        (legs.get(head.source, stream) if head else stream).deliver(data)

    async def read(reader: rtc.ByteStreamReader) -> None:
        deliver(b"".join([chunk async for chunk in reader]))

    def on_stream(reader: rtc.ByteStreamReader, _identity: str) -> None:
        tasks.add(asyncio.ensure_future(read(reader)))

    publishers = {
        name: MqttPublisher(mosquitto.port, leg)
        for name, leg in (("stream", stream), ("reject", reject))
    }
    oversize = 0
    try:
        async with sdk_room(livekit_server, room_name, "observer") as observer:
            observer.on("data_received", lambda p: deliver(p.data))
            observer.register_byte_stream_handler("r9s", on_stream)
            observer.register_byte_stream_handler("r9r", on_stream)
            bridge.start()
            await bridge.wait_ready()
            await bridge_in_room(observer)
            for size in SIZES:
                for name, pub in publishers.items():
                    pub.publish(f"faults/r9/{name}", f"s{size}", size)
                    pub.publish(f"faults/r9/{name}", "sentinel", 0)
                    if name == "reject" and size > PACKET_LIMIT - 200:
                        oversize += 1
                await asyncio.sleep(0.5)
            for pub in publishers.values():
                await pub.all_acked(60)
            await settle([stream, reject], timeout=60, quiet=10)
            m = await bridge.metrics()
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge, *publishers.values())
    too_large = int(m.get("roombus_route_rejected_total", route="reject", reason="too_large"))
    dropped = int(m.get("roombus_route_dropped_total", route="reject"))
    load = f"{len(SIZES)} sizes 15 KiB-1 MiB, each + a sentinel"
    r1 = stream.check(
        fault="payloads at/over the packet limits",
        load=load,
        expected="everything delivered (packets or byte streams), every sentinel after",
    )
    r2 = reject.check(
        fault="payloads at/over the packet limits",
        load=load,
        expected="over-limit rejected = rejected{too_large} counter; the rest + sentinels arrive",
    )
    sentinels_lost = sum(1 for key, _ in reject.missing_acked() if key == "sentinel")
    r2.account("too_large", r2.lost, too_large)
    r2.account("dropped", r2.lost, dropped)
    r2.notes.append(f"{oversize} sent over {PACKET_LIMIT - 200} B; sentinels lost {sentinels_lost}")
    r1.verdict = "pass" if r1.lost == 0 and r1.unexpected == 0 else "FAIL"
    r2.verdict = "pass" if r2.lost == too_large == dropped and sentinels_lost == 0 else "FAIL"
    r1.write()
    r2.write()
    assert r1.lost == 0, f"{r1.summary()}\nlost: {r1.lost_sample}\n{bridge.tail()}"
    assert sentinels_lost == 0, r2.summary()
    assert r2.lost == too_large == dropped, f"{r2.summary()}\n{bridge.tail()}"
    assert too_large >= 3, r2.summary()  # 64 KiB, 256 KiB, 1 MiB at least
