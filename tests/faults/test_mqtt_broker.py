"""R1 and R2: the MQTT broker restarted gracefully, and killed, under load in both directions.

One bridge with two routes: MQTT → room (devices publish QoS 1; a message is acknowledged when
the broker PUBACKs it to the device, the bridge holding a persistent QoS 1 session) and room →
MQTT (an SDK participant sends reliable packets; acknowledged when the bridge received them —
the bridge stays in the room throughout; the bus side is read by a QoS 1 subscriber with a
persistent session). Mosquitto runs with persistence (`autosave_interval 1`).

Expected (short / full):

* R1, graceful restart x3 (down 2 s each) during 24 s / 5 min at 100 / 50 msg/s per direction:
  lost 0 both ways; duplicates allowed and reported; forwarding resumes within 5 s of the
  broker's return (asserted with a generous 15 s bound on this shared machine).
* R2, kill -9 x2 during 16 s / 5 min at 100 / 50 msg/s per direction: everything the bridge
  received reaches the other side (its counters: MQTT → room `received` = `delivered`, room →
  MQTT `received` = `published`, nothing dropped, buffers empty); what the broker itself lost
  (acknowledged but not yet saved: its 1 s autosave) is reported, not blamed on the bridge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.faults.checker import Leg
from tests.faults.harness import (
    BridgeProc,
    Metrics,
    MqttCollector,
    MqttPublisher,
    bridge_head,
    bridge_section,
    bridged_peers,
    device_load,
    free_port,
    pick,
    room_load,
    settle,
    shut_down,
    two_way_load,
)
from tests.services import LiveKitServer, Mosquitto

DEVICES = 10


def _config(livekit: LiveKitServer, mosquitto: Mosquitto, room: str, tmp: Path, port: int) -> str:
    return (
        bridge_head(livekit, room)
        + bridge_section(tmp / "state", port)
        + f"mqtt:\n  bus:\n    host: 127.0.0.1\n    port: {mosquitto.port}\n"
        f"    client_id: roombus-{room[-20:]}\n    keepalive: 5\n"
        "connectors:\n"
        "  - name: down\n"
        '    from: {mqtt: bus, topic: "faults/dev/{device}/t", qos: 1}\n'
        f'    to: {{room: "{room}", packet: {{topic: "t.{{device}}"}}}}\n'
        "  - name: up\n"
        '    from: {room: "*", packet: {topic: up}}\n'
        '    to: {mqtt: bus, topic: "faults/up/{participant}", qos: 1}\n'
    )


async def _both_ways(
    scenario: str,
    livekit: LiveKitServer,
    mosquitto: Mosquitto,
    room: str,
    tmp: Path,
    fault: Callable[[Leg, Leg], Awaitable[None]],
    seconds: float,
    rate: float,
) -> tuple[Leg, Leg, BridgeProc, Metrics]:
    """Run both directions for `seconds` at `rate` while `fault` runs; settle; read the
    bridge's counters; stop it (SIGTERM, exit 0)."""
    down = Leg(scenario, "mqtt→room")
    up = Leg(scenario, "room→mqtt")
    port = free_port()
    bridge = BridgeProc(tmp, _config(livekit, mosquitto, room, tmp, port), port)
    collector = MqttCollector(mosquitto.port, "faults/up/#", up)
    publisher = MqttPublisher(mosquitto.port, down)
    try:
        await collector.ready()
        async with bridged_peers(livekit, room, bridge, down, up, sender_sees_bridge=True) as peers:
            loads = two_way_load(
                rate,
                seconds,
                device_load(publisher, "faults/dev/d{d}/t", DEVICES),
                room_load(peers.publisher.send),
            )
            await fault(down, up)
            await loads
            await publisher.all_acked(90)
            await settle([down, up])
            await bridge.drained(30)
            metrics = await bridge.metrics()
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        shut_down(bridge, publisher, collector)
    return down, up, bridge, metrics


def _broker_outages(
    mosquitto: Mosquitto,
    take_down: Callable[[], None],
    times: int,
    every: float,
    label: str,
    away: float,
) -> Callable[[Leg, Leg], Awaitable[None]]:
    """The fault of R1 and R2: `times` times, `every` seconds apart from the start, mark a fault
    "<label> <n>" on both legs, take the broker down with `take_down` (`mosquitto.stop` or
    `.kill`) and start it again `away` seconds later."""

    async def outages(down: Leg, up: Leg) -> None:
        t0 = time.monotonic()
        for n in range(times):
            await asyncio.sleep(max(0.0, t0 + every * (n + 1) - time.monotonic()))
            f1, f2 = down.fault(f"{label} {n + 1}"), up.fault(f"{label} {n + 1}")
            await asyncio.to_thread(take_down)
            await asyncio.sleep(away)
            await asyncio.to_thread(mosquitto.start)
            f1.end = f2.end = time.time()

    return outages


async def test_r1_mqtt_broker_graceful_restarts_lose_nothing_either_way(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    seconds, rate, restarts, down_s = pick(24, 300), pick(100, 50), 3, 2.0
    every = seconds / (restarts + 1)
    # SIGTERM: Mosquitto saves its database.
    restart_3x = _broker_outages(mosquitto, mosquitto.stop, restarts, every, "restart", down_s)

    down, up, bridge, _ = await _both_ways(
        "R1", livekit_server, mosquitto, room_name, tmp_path, restart_3x, seconds, rate
    )
    load = f"{rate:.0f} msg/s each way, {seconds:.0f} s"
    fault = f"Mosquitto SIGTERM x{restarts}, {down_s:.0f} s down"
    expected = "lost 0 both ways; duplicates reported; resumes ≤ 5 s after the broker is back"
    results = [leg.check(fault=fault, load=load, expected=expected) for leg in (down, up)]
    for r in results:
        slow = [f for f in r.faults if f.recovery_s is None or f.recovery_s > 15]
        r.verdict = "pass" if r.lost == 0 and not slow and r.unexpected == 0 else "FAIL"
        r.write()
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
        assert r.unexpected == 0, r.summary()
        for f in r.faults:
            assert f.recovery_s is not None and f.recovery_s <= 15, r.summary()


async def test_r2_mqtt_broker_kill_loses_nothing_the_bridge_received(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    seconds, rate, kills = pick(16, 300), pick(100, 50), 2
    every = seconds / (kills + 1)
    kill_2x = _broker_outages(mosquitto, mosquitto.kill, kills, every, "kill", 1)

    down, up, bridge, m = await _both_ways(
        "R2", livekit_server, mosquitto, room_name, tmp_path, kill_2x, seconds, rate
    )
    load = f"{rate:.0f} msg/s each way, {seconds:.0f} s"
    fault = f"Mosquitto SIGKILL x{kills}, restarted after 1 s"
    expected = (
        "the bridge loses nothing it received (its counters balance); what the broker lost"
        " (acknowledged before its 1 s autosave) reported apart"
    )
    # The bridge's side of the books: everything it took was delivered / published.
    took_down = m.get("roombus_route_received_total", route="down")
    gave_down = m.get("roombus_route_delivered_total", route="down")
    took_up = m.get("roombus_route_received_total", route="up")
    gave_up = m.get("roombus_route_published_total", route="up")
    dropped = m.get("roombus_route_dropped_total") + m.get("roombus_route_rejected_total")
    results = [leg.check(fault=fault, load=load, expected=expected) for leg in (down, up)]
    books = {"mqtt→room": (took_down, gave_down), "room→mqtt": (took_up, gave_up)}
    for r in results:
        took, gave = books[r.leg]
        r.notes.append(f"bridge received {took:.0f}, forwarded {gave:.0f}")
        r.notes.append(f"broker lost {r.lost} acknowledged" if r.lost else "broker lost none")
        r.account("dropped+rejected", 0, int(dropped))
        r.verdict = "pass" if r.unexpected == 0 and took == gave and dropped == 0 else "FAIL"
        r.write()
    assert dropped == 0, results[0].summary()
    for r in results:
        took, gave = books[r.leg]
        assert r.unexpected == 0, r.summary()
        assert took == gave, f"{r.summary()}\n{bridge.tail()}"
