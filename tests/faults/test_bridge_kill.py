"""R4: the bridge killed hard (SIGKILL) N times under load, and stopped gracefully (SIGTERM),
restarted each time with the same config and state dir; MQTT → room and room → Kafka (spool).

* MQTT → room: devices publish QoS 1 (acknowledged on the broker's PUBACK; the bridge holds a
  persistent session, so what it had not acknowledged is redelivered to the restarted bridge).
* Room → Kafka: an SDK participant sends reliable packets. LiveKit holds nothing for a
  participant that is not in the room, so a packet sent from 1 s before a kill (or before the
  stopping bridge left the room) until 1 s after the restarted bridge is ready is not
  acknowledged (best effort upstream of the
  bridge, reported as "unacked-missing" when it did not arrive); every other one is.

Expected (short / full):

* SIGKILL x4 in 32 s / x10 in 5 min, 100 / 50 msg/s per direction: lost 0 both ways;
  duplicates at most the in-flight window per kill (`bridge.max_in_flight` 256 per MQTT
  source; `publish_window` 64 for room → Kafka); forwarding again within 5 s of the restart
  (reported).
* SIGTERM x2 in 16 s / x5 in 5 min with the spool, x1 in 10 s / x5 in 5 min with the in-memory
  buffer: lost 0 and duplicated 0 both ways (a graceful stop drains and commits).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from livekit import rtc

from tests.faults.checker import Leg, Result
from tests.faults.harness import (
    BridgeProc,
    MqttPublisher,
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
    settle,
    shut_down,
    two_way_load,
    wait_for,
)
from tests.services import Kafka, LiveKitServer, Mosquitto

DEVICES = 10
GREY = 1.0  # seconds around the bridge's absence in which room sends are not acknowledged


async def _left(peer: rtc.Room) -> float:
    """When the participant `bridge` left the room (as `peer` sees it)."""
    await wait_for(lambda: "bridge" not in peer.remote_participants, 60, "the bridge to leave")
    return time.time()


async def _run(
    scenario: str,
    livekit: LiveKitServer,
    mosquitto: Mosquitto,
    kafka: Kafka,
    room: str,
    tmp: Path,
    *,
    graceful: bool,
    stops: int,
    seconds: float,
    rate: float,
    spool: bool = True,
) -> tuple[list[Result], BridgeProc, list[float]]:
    topic = f"faults-{scenario.lower()}-{int(time.time())}"
    await create_topic(kafka, topic)
    down = Leg(scenario, "mqtt→room")
    up = Leg(scenario, "room→kafka")
    port = free_port()
    config = (
        bridge_head(livekit, room)
        + bridge_section(tmp / "state", port, "  spool: {max_bytes: 104857600}\n" if spool else "")
        + mqtt_section(mosquitto.port, f"roombus-{room[-20:]}")
        + kafka_section(kafka.bootstrap)
        + "connectors:\n"
        "  - name: down\n"
        '    from: {mqtt: bus, topic: "faults/kill/{device}", qos: 1}\n'
        f'    to: {{room: "{room}", packet: {{topic: "t.{{device}}"}}}}\n'
        "  - name: up\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        f'    to: {{kafka: main, topic: "{topic}", key: "{{participant}}"}}\n'
    )
    bridge = BridgeProc(tmp, config, port)
    publisher = MqttPublisher(mosquitto.port, down)
    what = "SIGTERM" if graceful else "SIGKILL"
    stop_times: list[float] = []  # how long each graceful stop took
    sdk_lag: list[float] = []  # how much later the sender's SDK saw the bridge leave
    try:
        async with bridged_peers(livekit, room, bridge, down, up) as peers:
            loads = two_way_load(
                rate,
                seconds,
                device_load(publisher, "faults/kill/d{d}", DEVICES),
                room_load(peers.publisher.send),
            )
            t0 = time.monotonic()
            every = seconds / (stops + 1)
            rng = random.Random(4)
            for n in range(stops):
                at = every * (n + 1) + rng.uniform(-every / 4, every / 4)
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                f1, f2 = down.fault(f"{what} {n + 1}"), up.fault(f"{what} {n + 1}")
                gone = time.time()
                if graceful:
                    # The bridge owns what it received until it left the room (a graceful stop
                    # leaves after the bus-to-room drain): the window starts when it left, by
                    # its own log (the peers' SDK hears of it up to ~2 s later).
                    left = asyncio.create_task(_left(peers.sender))
                    t_stop = time.monotonic()
                    assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
                    stop_times.append(round(time.monotonic() - t_stop, 1))
                    seen_gone = await left
                    gone = bridge.left_room_at() or seen_gone
                    sdk_lag.append(round(seen_gone - gone, 1))
                else:
                    await asyncio.to_thread(bridge.kill)
                bridge.start()
                await bridge.wait_ready()
                f1.end = f2.end = time.time()
                up.unacked_window(gone - GREY, f1.end + GREY)
            await loads
            await publisher.all_acked(90)
            await read_kafka(
                kafka.bootstrap,
                topic,
                up,
                lambda: down.seen_all_acked() and up.seen_all_acked(),
                120,
            )
            await settle([down, up], timeout=60)
            await bridge.drained(30)
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge, publisher)
    load = f"{rate:.0f} msg/s each way, {seconds:.0f} s"
    fault = f"bridge {what} x{stops}, restarted at once" + ("" if spool else " (no spool)")
    if graceful:
        expected = "lost 0, duplicated 0 both ways"
    else:
        expected = "lost 0; duplicates ≤ in-flight window per kill (256 MQTT, 64 Kafka)"
    results = [leg.check(fault=fault, load=load, expected=expected) for leg in (down, up)]
    if stop_times:
        for r in results:
            r.notes.append(f"graceful stops took {', '.join(f'{t:.1f}' for t in stop_times)} s")
            r.notes.append(f"the sender saw the bridge leave {sdk_lag} s after it left")
    return results, bridge, stop_times


KNOWN_DRAIN_BUG = (
    "known bug: after stop_reading a bus pump's busy lanes park on a new waiter nobody resolves"
    " (bridge/runtime/pump.py: BusPump._lane / run), so Bridge._drain spends the whole"
    " shutdown_timeout in its first step and the room-to-bus drain gets no time left"
)


def graceful_verdict(results: list[Result], bridge: BridgeProc, stop_times: list[float]) -> None:
    """lost 0 and duplicated 0; while the known drain bug makes a stop take the whole
    shutdown_timeout (10 s), what it causes is an expected failure, anything else fails."""
    bad = [r for r in results if r.lost or r.duplicated]
    hung = any(t >= 9.5 for t in stop_times)
    for r in results:
        if r in bad:
            r.verdict = "FAIL (known drain bug)" if hung else "FAIL"
        else:
            r.verdict = "pass"
        r.write()
    if bad and hung:
        pytest.xfail(f"{KNOWN_DRAIN_BUG}: {'; '.join(r.summary() for r in bad)}")
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
        assert r.duplicated == 0, f"{r.summary()}\n{bridge.tail()}"


async def test_r4_bridge_sigkills_lose_nothing_acknowledged(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    kafka: Kafka,
    room_name: str,
    tmp_path: Path,
) -> None:
    kills = int(pick(4, 10))
    results, bridge, _ = await _run(
        "R4",
        livekit_server,
        mosquitto,
        kafka,
        room_name,
        tmp_path,
        graceful=False,
        stops=kills,
        seconds=pick(32, 300),
        rate=pick(100, 50),
    )
    window = {"mqtt→room": 256, "room→kafka": 64}
    for r in results:
        r.verdict = "pass" if r.lost == 0 and r.duplicated <= kills * window[r.leg] else "FAIL"
        r.write()
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
        assert r.unexpected == 0, r.summary()
        assert r.duplicated <= kills * window[r.leg], r.summary()


@pytest.mark.parametrize(
    ("scenario", "stops", "seconds", "spool"),
    [
        pytest.param("R4-graceful", int(pick(2, 5)), pick(16, 300), True, id="spool"),
        # The in-memory buffer: a graceful stop publishes what it holds (within the 10 s
        # shutdown_timeout, plenty at this load), so nothing is lost or duplicated either way.
        pytest.param("R4-graceful-nospool", int(pick(1, 5)), pick(10, 300), False, id="no-spool"),
    ],
)
async def test_r4_graceful_bridge_restarts_lose_nothing_and_duplicate_nothing(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    kafka: Kafka,
    room_name: str,
    tmp_path: Path,
    scenario: str,
    stops: int,
    seconds: float,
    spool: bool,
) -> None:
    """With the spool, and with the in-memory buffer only."""
    results, bridge, stop_times = await _run(
        scenario,
        livekit_server,
        mosquitto,
        kafka,
        room_name,
        tmp_path,
        graceful=True,
        stops=stops,
        seconds=seconds,
        rate=pick(100, 50),
        spool=spool,
    )
    graceful_verdict(results, bridge, stop_times)
