"""R3: Kafka stopped under room → Kafka load, with the spool, and with a small in-memory buffer
that drops (deliberate drops equal to the bridge's counter).

An SDK participant sends reliable packets; a message is acknowledged when the bridge received
it (the bridge stays in the room throughout). The topic uses LogAppendTime, so a record's
timestamp is when Kafka appended it: read at the end, it still gives recovery and drain times.

Expected (short / full):

* R3 spool: Kafka down 30 s / 5 min at 100 / 50 msg/s (5 s / 30 s of load before and after):
  lost 0; no drop counted; the backlog drains within 60 s of Kafka's return (asserted with a
  generous 120 s bound).
* R3 drop: no spool, `queue_size: 300`, `overflow: drop_newest`; Kafka down 6 s / 60 s at 100
  msg/s: the checker's lost count equals `roombus_route_dropped_total{reason="overflow"}`
  exactly; nothing else lost; no duplicates.
* Both: out of order 0 (one key, one partition) — see `order_verdict`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.faults.checker import Leg, Result
from tests.faults.harness import (
    BridgeProc,
    Metrics,
    bridge_head,
    bridge_section,
    bridged_sender,
    create_topic,
    free_port,
    kafka_section,
    pace,
    pick,
    read_kafka,
    room_load,
    shut_down,
)
from tests.services import Kafka, LiveKitServer


def order_verdict(r: Result, m: Metrics, bridge: BridgeProc) -> None:
    """Out of order 0 on room → Kafka (per key: one key, one partition; issue 10).

    The outbox keeps the order of what fails back to it (`bridge/runtime/outbox.py`: the
    window closes, the failed messages are retried in order), and the Kafka sink that of the
    records it appends again itself after the outage (connectors/kafka.py `KafkaSink.publish`:
    in call order per topic): any disorder fails.
    """
    if r.out_of_order == 0:
        return
    retries = int(m.get("roombus_route_retries_total", route="up"))
    detail = f"{r.summary()}; the outbox retried {retries} publishes"
    raise AssertionError(f"out of order {r.out_of_order}: {detail}\n{bridge.tail()}")


async def _outage(
    scenario: str,
    livekit: LiveKitServer,
    kafka: Kafka,
    room: str,
    tmp: Path,
    bridge_extra: str,
    outage: float,
    rate: float,
    around: float,
    quiet: float = 15,
) -> tuple[Leg, BridgeProc, Metrics]:
    topic = f"faults-{scenario.lower()}-{int(time.time())}"
    await create_topic(kafka, topic)
    leg = Leg(scenario, "room→kafka")
    port = free_port()
    config = (
        bridge_head(livekit, room)
        + bridge_section(tmp / "state", port, bridge_extra)
        + kafka_section(kafka.bootstrap)
        + "connectors:\n"
        "  - name: up\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        f'    to: {{kafka: main, topic: "{topic}", key: "{{participant}}"}}\n'
    )
    bridge = BridgeProc(tmp, config, port)
    try:
        async with bridged_sender(livekit, room, bridge, leg) as pub:
            load = asyncio.create_task(pace(rate, around * 2 + outage, room_load(pub.send)))
            await asyncio.sleep(around)
            f = leg.fault(f"Kafka down {outage:.0f} s")
            await asyncio.to_thread(kafka.stop)
            await asyncio.sleep(outage)
            await asyncio.to_thread(kafka.start)
            f.end = time.time()
            await load
            await read_kafka(kafka.bootstrap, topic, leg, leg.seen_all_acked, 150, quiet)
            await bridge.drained(30)
            metrics = await bridge.metrics()
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge)
    return leg, bridge, metrics


async def test_r3_kafka_outage_with_the_spool_loses_nothing(
    livekit_server: LiveKitServer, kafka: Kafka, room_name: str, tmp_path: Path
) -> None:
    outage, rate, around = pick(30, 300), pick(100, 50), pick(5, 30)
    leg, bridge, m = await _outage(
        "R3",
        livekit_server,
        kafka,
        room_name,
        tmp_path,
        "  spool: {max_bytes: 104857600}\n",
        outage,
        rate,
        around,
    )
    r = leg.check(
        fault=f"Kafka stopped {outage:.0f} s (spool)",
        load=f"{rate:.0f} msg/s, {outage + 2 * around:.0f} s",
        expected="lost 0; no drops; backlog drained ≤ 60 s after Kafka is back",
    )
    dropped = int(m.get("roombus_route_dropped_total", route="up"))
    r.account("dropped", 0, dropped)
    drain = r.faults[0].drain_s
    r.verdict = "pass" if r.lost == 0 and dropped == 0 and drain is not None else "FAIL"
    if r.out_of_order:
        r.verdict = "FAIL (out of order)"
    r.write()
    assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
    assert dropped == 0, r.summary()
    assert drain is not None and drain <= 120, r.summary()
    order_verdict(r, m, bridge)


async def test_r3_kafka_outage_with_a_dropping_buffer_counts_every_drop(
    livekit_server: LiveKitServer, kafka: Kafka, room_name: str, tmp_path: Path
) -> None:
    outage, rate, around = pick(6, 60), 100, 3
    leg, bridge, m = await _outage(
        "R3-drop",
        livekit_server,
        kafka,
        room_name,
        tmp_path,
        "  queue_size: 300\n  overflow: drop_newest\n",
        outage,
        rate,
        around,
        quiet=8,
    )
    r: Result = leg.check(
        fault=f"Kafka stopped {outage:.0f} s (queue 300, drop_newest)",
        load=f"{rate:.0f} msg/s, {outage + 2 * around:.0f} s",
        expected="lost = dropped{overflow} counter exactly; no duplicates",
    )
    dropped = int(m.get("roombus_route_dropped_total", route="up", reason="overflow"))
    r.account("overflow", r.lost, dropped)
    r.verdict = "pass" if r.lost == dropped and r.duplicated == 0 and dropped > 0 else "FAIL"
    if r.out_of_order:
        r.verdict = "FAIL (out of order)"
    r.write()
    assert dropped > 0, f"the buffer never overflowed: {r.summary()}"
    assert r.lost == dropped, f"{r.summary()}\n{bridge.tail()}"
    assert r.duplicated == 0, r.summary()
    order_verdict(r, m, bridge)
