"""The per-message cost of routing with room captures, ``{payload.x}`` fields and `map`.

Each case compiles one route from a configuration and times, per message, exactly what the
runtime calls for it (`time.perf_counter_ns` over `--messages` messages, best of `--repeat`
runs, after a warm-up):

* room to bus: `ToBusRoute.wants` + `ToBusRoute.values` + `BusTarget.outbound` (rendering the
  topic, key and headers) for a 60-byte JSON packet;
* bus to room: `ToRoomRoute.match` + `ToRoomRoute.delivery` for the same payload on Kafka.

The baseline of each direction is the same route without captures or payload fields, in the
same run; the table gives µs per message and the ratio to that baseline. No servers needed::

    .venv/bin/python -m bench.templates_bench [--messages 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from bridge.config import parse_config
from bridge.envelope import Envelope
from bridge.router import RoomMessage, ToBusRoute, ToRoomRoute, compile_routes

HEAD = """\
livekit: {url: "ws://127.0.0.1:7880", api_key: k, api_secret: a-secret-of-at-least-32-characters!,
          rooms: [plant-berlin]}
kafka: {main: {bootstrap_servers: ["127.0.0.1:9092"]}}
connectors:
"""

TO_BUS = {
    "baseline": '{room: "plant-*", packet: {topic: "*"}}',
    "room capture": '{room: "plant-{site}", participant: "dev-{device}", packet: {topic: "*"}}',
}
TO_BUS_TARGET = {
    "baseline": '{kafka: main, topic: "lk.{room}", key: "{participant}", headers: {t: "{topic}"}}',
    "room capture": '{kafka: main, topic: "lk.{site}", key: "{device}", headers: {t: "{topic}"}}',
    "payload fields": '{kafka: main, topic: "lk.{room}", key: "{payload.device_id}",'
    ' headers: {t: "{payload.pos.line}"}}',
}
TO_ROOM_TARGET = {
    "baseline": '{room: "plant-berlin", packet: {topic: "cmd.{key}", destinations: ["{key}"]}}',
    "payload fields": '{room: "plant-{payload.site}", packet: {topic: "cmd.{payload.kind}",'
    ' destinations: ["{payload.device_id}"]}}',
}
MAP = '{id: "{payload.device_id}", v: "{payload.value}", where: "{topic}"}'
PAYLOAD = json.dumps(
    {"device_id": "d1", "site": "berlin", "kind": "open", "value": 21.5, "pos": {"line": 3}}
).encode()


def route(source: str, target: str, mapping: str | None = None) -> ToBusRoute | ToRoomRoute:
    text = HEAD + f"  - name: r\n    from: {source}\n    to: {target}\n"
    if mapping:
        text += f"    map: {mapping}\n"
    (compiled,) = compile_routes(parse_config(text))
    return compiled


def bus_case(r: ToBusRoute) -> Callable[[], object]:
    values = {
        "room": "plant-berlin",
        "room_sid": "RM_x",
        "participant": "dev-d1",
        "participant_sid": "PA_x",
        "kind": "packet-reliable",
        "topic": "telemetry",
    }
    message = RoomMessage("packet", PAYLOAD, values, {"lk-room": "plant-berlin"})

    def one() -> object:
        assert r.wants(message)
        return r.target.outbound(
            message.payload,
            r.values(message),
            message.headers,
            content_type=None,
            default_key=None,
            bridge_id="bench",
        )

    return one


def room_case(r: ToRoomRoute) -> Callable[[], object]:
    envelope = Envelope(PAYLOAD, "kafka:main", "commands", key=b"d1", partition=0)

    def one() -> object:
        values = r.match(envelope)
        assert values is not None
        return r.delivery(envelope, values)

    return one


def per_message_us(one: Callable[[], object], messages: int, repeat: int) -> float:
    for _ in range(min(messages, 2000)):
        one()
    best = None
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(messages):
            one()
        elapsed = time.perf_counter_ns() - start
        best = elapsed if best is None else min(best, elapsed)
    assert best is not None
    return best / messages / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, k = max(1, min(args.messages, 1_000_000)), max(1, min(args.repeat, 50))

    bus_routes = {
        "baseline": route(TO_BUS["baseline"], TO_BUS_TARGET["baseline"]),
        "room capture": route(TO_BUS["room capture"], TO_BUS_TARGET["room capture"]),
        "payload fields": route(TO_BUS["baseline"], TO_BUS_TARGET["payload fields"]),
        "payload fields + map": route(TO_BUS["baseline"], TO_BUS_TARGET["payload fields"], MAP),
    }
    kafka = "{kafka: main, topics: [commands]}"
    room_routes = {
        "baseline": route(kafka, TO_ROOM_TARGET["baseline"]),
        "payload fields": route(kafka, TO_ROOM_TARGET["payload fields"]),
        "payload fields + map": route(kafka, TO_ROOM_TARGET["payload fields"], MAP),
    }
    print(f"{n} messages, best of {k} runs; {len(PAYLOAD)}-byte JSON payload")
    print(f"{'direction':<12} {'case':<22} {'us/msg':>8} {'ratio':>7}")
    for direction, cases, make in (
        ("room -> bus", bus_routes, bus_case),
        ("bus -> room", room_routes, room_case),
    ):
        base = None
        for name, r in cases.items():
            us = per_message_us(make(r), n, k)  # type: ignore[arg-type]
            base = base or us
            print(f"{direction:<12} {name:<22} {us:>8.2f} {us / base:>6.2f}x")


if __name__ == "__main__":
    main()
