"""The per-message cost of a `where:` filter and of access rules, against the same route without.

    .venv/bin/python -m bench.rules_bench [--iterations 20000] [--rounds 5]

Pure CPU, no servers: each case is what the runtime does for one message on a route — the
bus-to-room route's `match` and delivery rendering, plus `rules.filtered` (bus to room), or a
room-to-bus route's `wants` and `values`, plus the rules (room to bus). Cases alternate in
rounds so machine noise hits them alike; the best round of each is reported, in µs per
message, with the extra cost over the case without rules of the same run. Bounded: iterations
x rounds x cases evaluations, a few seconds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from bridge.config import parse_config
from bridge.envelope import Envelope
from bridge.router import RoomMessage, ToBusRoute, ToRoomRoute, compile_routes
from bridge.rules import Participant

HEAD = """\
livekit: {url: "ws://127.0.0.1:9", api_key: k, api_secret: "0123456789abcdef0123456789abcdef",
  rooms: [lobby]}
mqtt: {bus: {host: 127.0.0.1}}
connectors:
"""
IN = """\
  - name: NAME
    from: {mqtt: bus, topic: "devices/{site}/{device}/telemetry"}
    to: {room: lobby, packet: {topic: "telemetry.{device}", destinations: ["dash"]}}
"""
OUT = """\
  - name: NAME
    from: {room: "*", packet: {topic: "command/{device}"}}
    to: {mqtt: bus, topic: "devices/{device}/commands"}
"""
CASES = {
    "mqtt->room": ("IN", ""),
    'mqtt->room where: payload.temp > 30 && device == "d7"': (
        "IN",
        "    where: 'payload.temp > 30 && device == \"d7\"'\n",
    ),
    'mqtt->room where: device == "d7" (no payload)': ("IN", "    where: 'device == \"d7\"'\n"),
    "room->mqtt": ("OUT", ""),
    'room->mqtt where: participant.startsWith("op-")': (
        "OUT",
        '    where: \'participant.startsWith("op-") && device != "locked"\'\n',
    ),
    "room->mqtt deny: [{kind: agent}, {identity: guest-*}]": (
        "OUT",
        "    deny: [{kind: agent}, {identity: 'guest-*'}]\n",
    ),
}


def _case(name: str, kind: str, extra: str) -> Callable[[], object]:
    text = (IN if kind == "IN" else OUT).replace("NAME", "r") + extra
    (route,) = compile_routes(parse_config(HEAD + text, "bench.yaml"))
    if isinstance(route, ToRoomRoute):
        envelope = Envelope(
            b'{"temp": 31.5, "unit": "C"}', "mqtt:bus", "devices/berlin/d7/telemetry"
        )

        def bus_to_room() -> object:
            values = route.match(envelope)
            assert values is not None
            rules = route.rules
            if rules is not None and rules.filtered(values, envelope.headers, envelope.payload):
                return None
            return route.delivery(envelope, values)

        return bus_to_room
    assert isinstance(route, ToBusRoute)
    values = {
        "room": "lobby",
        "room_sid": "RM_x",
        "participant": "op-1",
        "participant_sid": "PA_x",
        "kind": "packet-reliable",
        "topic": "command/v7",
    }
    message = RoomMessage("packet", b"open", values, {"lk-room": "lobby"})
    info = type("Info", (), {"kind": 0, "attributes": {"role": "op"}})()

    def room_to_bus() -> object:
        if not route.wants(message):
            return None
        rules = route.rules
        if rules is not None:
            if rules.access is not None and not rules.permits(
                Participant.of("op-1", info if rules.access.needs_state else None)
            ):
                return None
            if rules.filtered(route.values(message), message.headers, message.payload):
                return None
        return route.values(message)

    return room_to_bus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    fns = {name: _case(name, *spec) for name, spec in CASES.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(args.rounds):
        for name, fn in fns.items():
            for _ in range(min(1000, args.iterations)):
                fn()
            start = time.perf_counter()
            for _ in range(args.iterations):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / args.iterations * 1e6)
    base = {"IN": best["mqtt->room"], "OUT": best["room->mqtt"]}
    print("| case | µs/message | extra µs vs. no rules |\n|---|---:|---:|")
    for name, (kind, _extra) in CASES.items():
        print(f"| {name} | {best[name]:.2f} | {best[name] - base[kind]:+.2f} |")


if __name__ == "__main__":
    main()
