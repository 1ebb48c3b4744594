"""R5 and R7: livekit-server restarted, the bridge's WebRTC flows cut for 10 s, and random loss
on the bridge's UDP traffic; MQTT → room and room → MQTT.

Everything in the test namespace talks over local addresses, so the traffic never crosses the
veth pair `scripts/netns` makes (the kernel routes local addresses over `lo`): shaping the veth
would change nothing. The faults are iptables rules on the OUTPUT chain (every local packet
passes it) matching only the bridge process's own UDP ports (and, for the flap, its TCP
connections to livekit-server), found with `ss`; so the SDK peers and the buses are untouched.
`tc netem` would add delay as well, but this kernel has no netem qdisc (`netem_available()`
says so; loss is what R7 asks for, and iptables' `statistic` match gives it).

Acknowledgement: MQTT → room on the broker's PUBACK; room → MQTT when the bridge received the
packet — a packet sent while the bridge was away (from 1 s before the fault until 1 s after the
bridge was back) is LiveKit's best effort, not acknowledged.

Expected (short / full):

* R5 restart: livekit-server killed and started once during 16 s / 5 min at 50 msg/s each way:
  the bridge is back in the room within 10 s of the server (asserted with a generous 30 s);
  MQTT → room: lost 0 — what the bridge held during the outage reaches the observer once both
  are back (when the observer came back after the bridge, what the bridge delivered before is
  LiveKit's and not acknowledged); the bridge's counters balance (received = delivered +
  expired); room → MQTT: lost 0.
* R5 flap: every packet of the bridge's WebRTC and signalling flows dropped for 10 s: MQTT →
  room lost 0 (the observer never leaves); room → MQTT lost 0 outside the flap window.
* R7: 1 % then 5 % random loss on the bridge's UDP for 10 s / 5 min each, reliable and lossy
  packets both ways at 25 msg/s each: reliable paths lost 0 and never wedged; lossy paths' loss
  reported (the network's, which no counter can see: a lossy packet lost on the way is never
  known to its receiver) with tail latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from livekit import rtc

from tests.faults.checker import Leg, Result
from tests.faults.harness import (
    BridgeProc,
    Dispatch,
    Metrics,
    MqttCollector,
    MqttPublisher,
    PacketFilter,
    RoomObserver,
    RoomPublisher,
    bridge_head,
    bridge_in_room,
    bridge_section,
    connect_sdk_room,
    device_load,
    free_port,
    mqtt_section,
    netem_available,
    pick,
    process_ports,
    room_load,
    settle,
    shut_down,
    two_way_load,
)
from tests.services import LiveKitServer, Mosquitto

DEVICES = 5
GREY = 1.0


def _config(livekit: LiveKitServer, mosquitto: Mosquitto, room: str, tmp: Path, port: int) -> str:
    return (
        bridge_head(livekit, room)
        + bridge_section(tmp / "state", port)
        + mqtt_section(mosquitto.port, f"roombus-{room[-20:]}")
        + "connectors:\n"
        "  - name: rel\n"
        '    from: {mqtt: bus, topic: "faults/lk/rel/{device}", qos: 1}\n'
        f'    to: {{room: "{room}", packet: {{topic: "rel.{{device}}"}}}}\n'
        "  - name: lossy\n"
        '    from: {mqtt: bus, topic: "faults/lk/lossy/{device}", qos: 1}\n'
        f'    to: {{room: "{room}", packet: {{topic: "lossy.{{device}}", reliable: false}}}}\n'
        "  - name: uprel\n"
        '    from: {room: "*", packet: {topic: up, reliability: reliable}}\n'
        '    to: {mqtt: bus, topic: "faults/lkup/{participant}/rel", qos: 1}\n'
        "  - name: uplossy\n"
        '    from: {room: "*", packet: {topic: up, reliability: lossy}}\n'
        '    to: {mqtt: bus, topic: "faults/lkup/{participant}/lossy", qos: 1}\n'
    )


class Peers:
    """The observer and the sender (official SDK), reconnectable after a server restart."""

    def __init__(self, livekit: LiveKitServer, room: str, sink: Dispatch) -> None:
        self.livekit = livekit
        self.room = room
        self.sink = sink
        self.observer: rtc.Room | None = None
        self.sender: rtc.Room | None = None

    async def connect(self) -> None:
        self.observer = await connect_sdk_room(self.livekit, self.room, "observer")
        RoomObserver(self.observer, self.sink)
        self.sender = await connect_sdk_room(self.livekit, self.room, "sender")

    async def start_bridge(self, bridge: BridgeProc) -> None:
        """Join both peers, then start `bridge` and wait until it is ready and in the room."""
        await self.connect()
        bridge.start()
        await bridge.wait_ready()
        assert self.observer is not None
        await bridge_in_room(self.observer)

    async def close(self) -> None:
        for peer in (self.observer, self.sender):
            if peer is not None:
                with contextlib.suppress(Exception):
                    await peer.disconnect()
        self.observer = self.sender = None


async def _send(peers: Peers, leg: Leg, reliable: bool) -> None:
    if peers.sender is None:
        leg.next("sender")  # sent while the sender itself is away: never acknowledged
        return
    await RoomPublisher(peers.sender, leg, "up", reliable).send("sender")


def _r5_setup(
    scenario: str, livekit: LiveKitServer, mosquitto: Mosquitto, room: str, tmp: Path
) -> tuple[Leg, Leg, BridgeProc, MqttCollector, MqttPublisher, Peers]:
    """What both R5 scenarios run on: the two legs (MQTT → room, room → MQTT), the bridge
    (not started), the room → MQTT collector, the device publisher and the SDK peers (not
    connected)."""
    down = Leg(scenario, "mqtt→room")
    up = Leg(scenario, "room→mqtt")
    port = free_port()
    bridge = BridgeProc(tmp, _config(livekit, mosquitto, room, tmp, port), port)
    collector = MqttCollector(mosquitto.port, "faults/lkup/#", Dispatch(up))
    publisher = MqttPublisher(mosquitto.port, down)
    peers = Peers(livekit, room, Dispatch(down))
    return down, up, bridge, collector, publisher, peers


def _r5_loads(
    rate: float, seconds: float, publisher: MqttPublisher, peers: Peers, up: Leg
) -> asyncio.Future[tuple[int, int]]:
    """The R5 load: devices on the reliable MQTT → room route, the sender's reliable packets."""

    async def room_send(_i: int) -> None:
        await _send(peers, up, True)

    device = device_load(publisher, "faults/lk/rel/d{d}", DEVICES)
    return two_way_load(rate, seconds, device, room_send)


async def _r5_finish(bridge: BridgeProc, publisher: MqttPublisher, down: Leg, up: Leg) -> Metrics:
    """The end of an R5 scenario once its load ran: every device publish acknowledged, both
    legs settled, the bridge's counters read (returned), then a graceful stop that exits 0."""
    await publisher.all_acked(90)
    await settle([down, up], timeout=60)
    m = await bridge.metrics()
    assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    return m


async def test_r5_livekit_server_restart(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    down, up, bridge, collector, publisher, peers = _r5_setup(
        "R5-restart", livekit_server, mosquitto, room_name, tmp_path
    )
    rate, seconds = 50, pick(16, 300)
    back = 0.0
    absent_until = 0.0
    try:
        await collector.ready()
        await peers.start_bridge(bridge)
        loads = _r5_loads(rate, seconds, publisher, peers, up)
        await asyncio.sleep(seconds / 3)
        f1, f2 = down.fault("livekit-server restart"), up.fault("livekit-server restart")
        gone = time.time()
        # Killed: SIGTERM makes livekit-server drain (it waits for the participants to leave,
        # then tests/services kills it after 10 s), which is a slow kill with extra steps.
        await asyncio.to_thread(livekit_server.kill)
        await peers.close()
        await asyncio.to_thread(livekit_server.start)
        server_back = time.time()
        f1.end = f2.end = server_back

        async def bridge_back() -> float:
            await asyncio.sleep(1)  # /ready goes 503 once the bridge saw the loss
            await bridge.wait_ready(60)
            return time.time()

        async def peers_back() -> float:
            await peers.connect()
            return time.time()

        t_bridge, t_peers = await asyncio.gather(bridge_back(), peers_back())
        back = t_bridge - server_back
        # LiveKit holds nothing for absent participants: while the observer (or the sender)
        # was away, neither direction acknowledges.
        absent_until = max(t_bridge, t_peers) + GREY
        up.unacked_window(gone - GREY, absent_until)
        if t_peers > t_bridge:
            # The bridge delivered what it held before the observer was back: LiveKit's.
            down.unacked_window(gone - GREY, absent_until)
        await loads
        m = await _r5_finish(bridge, publisher, down, up)
    finally:
        await peers.close()
        shut_down(bridge, publisher, collector)
    took = m.get("roombus_route_received_total", route="rel")
    gave = m.get("roombus_route_delivered_total", route="rel")
    expired = m.get("roombus_route_expired_total", route="rel")
    load = f"{rate} msg/s each way, {seconds:.0f} s"
    results: list[Result] = []
    for leg in (down, up):
        r = leg.check(
            fault="livekit-server SIGKILL + start",
            load=load,
            expected="back ≤ 10 s; bus→room all delivered or expired (counters); room→bus lost 0",
        )
        r.notes.append(f"bridge back in the room {back:.1f} s after the server")
        if leg is down:
            missing = leg.missing_acked()
            late = sum(1 for mid in missing if leg.sent[mid] > absent_until)
            r.notes.append(f"of the {len(missing)} missing, {late} were sent after both were back")
            r.notes.append(
                f"bridge received {took:.0f}, delivered {gave:.0f}, expired {expired:.0f};"
                f" observer back {t_peers - server_back:.1f} s after the server"
            )
        ok = r.unexpected == 0 and back <= 30 and (leg is not down or took == gave + expired)
        ok = ok and r.lost == 0
        r.verdict = "pass" if ok else "FAIL"
        r.write()
        results.append(r)
    assert back <= 30, results[0].summary()
    assert took == gave + expired, f"{results[0].summary()}\n{bridge.tail()}"
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
    for r in results:
        assert r.unexpected == 0, r.summary()


async def test_r5_webrtc_flap_of_10_s_loses_nothing_acknowledged(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    down, up, bridge, collector, publisher, peers = _r5_setup(
        "R5-flap", livekit_server, mosquitto, room_name, tmp_path
    )
    rules = PacketFilter()
    rate, seconds, flap = 50, pick(20, 300), 10.0
    try:
        await collector.ready()
        await peers.start_bridge(bridge)
        m0 = await bridge.metrics()
        loads = _r5_loads(rate, seconds, publisher, peers, up)
        await asyncio.sleep(5)
        udp = process_ports(bridge.pid, "udp")
        own = (bridge.http_port, mosquitto.port)
        tcp = [p for p in process_ports(bridge.pid, "tcp") if p not in own]
        assert udp, "found no UDP socket of the bridge"
        f1, f2 = down.fault("WebRTC flap 10 s"), up.fault("WebRTC flap 10 s")
        gone = time.time()
        await asyncio.to_thread(rules.drop, "udp", udp)
        await asyncio.to_thread(rules.drop, "tcp", tcp)
        await asyncio.sleep(flap)
        await asyncio.to_thread(rules.clear)
        f1.end = f2.end = time.time()
        await asyncio.sleep(1)
        await bridge.wait_ready(60)
        up.unacked_window(gone - GREY, time.time() + GREY)
        await loads
        m = await _r5_finish(bridge, publisher, down, up)
    finally:
        rules.clear()
        await peers.close()
        shut_down(bridge, publisher, collector)
    lost_sessions = m.get("roombus_room_losses_total") - m0.get("roombus_room_losses_total")
    results = []
    for leg in (down, up):
        r = leg.check(
            fault=f"bridge's UDP + signalling dropped {flap:.0f} s (iptables)",
            load=f"{rate} msg/s each way, {seconds:.0f} s",
            expected="lost 0 (room→bus: outside the flap window)",
        )
        r.notes.append(f"room sessions lost {lost_sessions:.0f}; {len(udp)} UDP, {len(tcp)} TCP")
        r.verdict = "pass" if r.lost == 0 and r.unexpected == 0 else "FAIL"
        r.write()
        results.append(r)
    for r in results:
        assert r.lost == 0, f"{r.summary()}\nlost: {r.lost_sample}\n{bridge.tail()}"
        assert r.unexpected == 0, r.summary()


async def test_r7_webrtc_packet_loss_reliable_loses_nothing(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    port = free_port()
    bridge = BridgeProc(
        tmp_path, _config(livekit_server, mosquitto, room_name, tmp_path, port), port
    )
    levels = (0.01, 0.05)
    legs = {
        (p, kind): Leg(f"R7-{p:.0%}", kind)
        for p in levels
        for kind in (
            "mqtt→room reliable",
            "mqtt→room lossy",
            "room→mqtt reliable",
            "room→mqtt lossy",
        )
    }
    to_room = Dispatch(*[leg for (_, k), leg in legs.items() if k.startswith("mqtt")])
    to_bus = Dispatch(*[leg for (_, k), leg in legs.items() if k.startswith("room")])
    collector = MqttCollector(mosquitto.port, "faults/lkup/#", to_bus)
    publishers = {kind: MqttPublisher(mosquitto.port, Leg("x", "x")) for kind in ("rel", "lossy")}
    peers = Peers(livekit_server, room_name, to_room)
    rules = PacketFilter()
    rate, seconds = 25, pick(10, 300)
    notes = [] if netem_available() else ["netem not in this kernel: loss by iptables statistic"]
    try:
        await collector.ready()
        await peers.start_bridge(bridge)
        assert peers.sender is not None
        for p in levels:
            rel_leg, lossy_leg = legs[(p, "mqtt→room reliable")], legs[(p, "mqtt→room lossy")]
            publishers["rel"].leg, publishers["lossy"].leg = rel_leg, lossy_leg
            up_rel = RoomPublisher(peers.sender, legs[(p, "room→mqtt reliable")], "up", True)
            up_lossy = RoomPublisher(peers.sender, legs[(p, "room→mqtt lossy")], "up", False)
            udp = process_ports(bridge.pid, "udp")
            marks = [leg.fault(f"{p:.0%} loss") for (q, _), leg in legs.items() if q == p]
            await asyncio.to_thread(rules.loss, udp, p)

            rel = device_load(publishers["rel"], "faults/lk/rel/d{d}", DEVICES)
            lossy = device_load(publishers["lossy"], "faults/lk/lossy/d{d}", DEVICES)
            await asyncio.gather(
                two_way_load(rate, seconds, rel, room_load(up_rel.send)),
                two_way_load(rate, seconds, lossy, room_load(up_lossy.send)),
            )
            await asyncio.to_thread(rules.clear)
            for mark in marks:
                mark.end = time.time()
            for pub in publishers.values():
                await pub.all_acked(60)
            reliable = [leg for (q, k), leg in legs.items() if q == p and "reliable" in k]
            await settle(reliable, timeout=60)
        m = await bridge.metrics()
        assert await asyncio.to_thread(bridge.stop) == 0, bridge.tail()
    finally:
        rules.clear()
        await peers.close()
        shut_down(bridge, *publishers.values(), collector)
    results = []
    for (p, kind), leg in legs.items():
        r = leg.check(
            fault=f"{p:.0%} random loss on the bridge's UDP",
            load=f"{rate} msg/s per leg, {seconds:.0f} s",
            expected="reliable: lost 0, never wedged; lossy: loss reported",
        )
        r.notes += notes
        if "lossy" in kind:
            route = "lossy" if kind.startswith("mqtt") else "uplossy"
            counted = m.get("roombus_route_dropped_total", route=route)
            r.notes.append(f"bridge counted {counted:.0f} dropped on route {route} (whole run)")
            missing = r.sent - r.delivered
            r.notes.append(
                f"lossy: {missing} of {r.sent} not delivered ({missing / max(1, r.sent):.1%})"
            )
            r.verdict = "pass" if r.unexpected == 0 else "FAIL"
        else:
            r.verdict = "pass" if r.lost == 0 and r.unexpected == 0 else "FAIL"
        r.write()
        results.append((kind, r))
    sessions_lost = m.get("roombus_room_losses_total")
    for kind, r in results:
        assert r.unexpected == 0, r.summary()
        if "reliable" in kind:
            assert r.lost == 0, (
                f"{r.summary()}\nlost: {r.lost_sample}\nroom sessions lost {sessions_lost}\n"
                f"{bridge.tail()}"
            )
