"""Room → bus order across a bus outage: what was in flight when the broker went away is
published again in its original order, before anything newer (issue 10).

The sink is a `MemoryBus` whose broker can go away: every publish in flight then, or made while
it is away, fails with a retriable error after its round trip, as a broker connection that drops
fails every unacknowledged publish. With one retry loop per message (the old outbox) the
window's messages went out again in the order their jittered backoffs expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path

from bridge.config import parse_config
from bridge.envelope import Outbound
from bridge.errors import ConnectorError
from bridge.room.types import Counters
from bridge.router import RoomMessage, ToBusRoute, compile_routes
from bridge.runtime.dead_letter import Rejections
from bridge.runtime.outbox import DurableQueue, OutboundCodec, Outbox
from bridge.runtime.publisher import Publisher
from bridge.spool import Spool, SpoolCodec
from connectors.memory import MemoryBus

CONFIG = """\
livekit: {url: "ws://127.0.0.1:9", api_key: k, api_secret: "0123456789abcdef0123456789abcdef",
  room_patterns: ["none-*"], room_discovery_interval: 3600}
mqtt: {bus: {host: 127.0.0.1}}
connectors:
  - name: out
    from: {room: "*", packet: {}}
    to: {mqtt: bus, topic: "rooms/{room}/{topic}"}
"""

WINDOW = 16


class OutageBus(MemoryBus):
    """A bus whose broker goes away and comes back (`away`); records what it accepted."""

    def __init__(self, round_trip: float = 0.003) -> None:
        super().__init__("mqtt:bus")
        self.round_trip = round_trip
        self.away = False
        self.refuse: set[int] = set()  # payloads refused for good once the broker is back
        self.accepted: list[tuple[str, int]] = []  # (topic, n) in the order accepted
        self.in_flight = 0
        self.most_in_flight_failing = 0  # in flight together when the broker went away

    async def publish(self, message: Outbound) -> None:
        self.in_flight += 1
        try:
            await asyncio.sleep(self.round_trip)
            if self.away:
                self.most_in_flight_failing = max(self.most_in_flight_failing, self.in_flight)
                raise ConnectorError(f"{self.name}: broker unreachable", retriable=True)
            n = int(message.payload or b"")
            if n in self.refuse:
                raise ConnectorError(f"{self.name}: record too large", retriable=False)
            self.accepted.append((message.topic, n))
        finally:
            self.in_flight -= 1


def _outbox(
    sink: MemoryBus,
    counters: Counters,
    spool: DurableQueue | None = None,
    codec: OutboundCodec | None = None,
) -> Outbox:
    route = next(
        r for r in compile_routes(parse_config(CONFIG, "t.yaml")) if isinstance(r, ToBusRoute)
    )
    publisher = Publisher(counters, initial=0.02, maximum=0.1)
    return Outbox(
        route,
        sink,
        publisher,
        Rejections({"mqtt:bus": sink}, publisher, counters, "me"),
        counters,
        bridge_id="me",
        queue_size=10_000,
        overflow="drop_newest",
        window=WINDOW,
        spool=spool,
        codec=codec,
    )


def _message(n: int) -> RoomMessage:
    topic = "a" if n % 3 else "b"  # two ordering keys, interleaved
    values = {"room": "r", "participant": "p", "kind": "packet-reliable", "topic": topic}
    return RoomMessage("packet", b"%d" % n, values, {"lk-room": "r"})


async def eventually(check: Callable[[], object], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


async def _load_across_outages(outbox: Outbox, sink: OutageBus, outages: int = 2) -> int:
    """Offer ~1 message per ms; the broker goes away `outages` times for 50 ms meanwhile.

    Returns:
        How many were offered.
    """
    n = 0
    for phase in range(2 * outages + 1):
        sink.away = phase % 2 == 1
        for _ in range(100 if phase % 2 == 0 else 50):
            outbox.offer(_message(n))
            n += 1
            await asyncio.sleep(0.001)
    sink.away = False
    return n


def _disorder(ns: list[int]) -> list[str]:
    return [f"{b} after {a}" for a, b in itertools.pairwise(ns) if b < a]


def _assert_in_order(sink: OutageBus, total: int) -> None:
    got = [n for _, n in sink.accepted]
    assert sorted(got) == list(range(total)), "lost or duplicated"
    for key in ("rooms/r/a", "rooms/r/b"):
        per_key = [n for topic, n in sink.accepted if topic == key]
        assert not _disorder(per_key), f"{key} out of order: {_disorder(per_key)[:10]}"
    assert not _disorder(got), f"the route's order: {_disorder(got)[:10]}"


async def test_what_was_in_flight_when_the_broker_went_away_is_published_in_order() -> None:
    counters = Counters()
    async with OutageBus(round_trip=0.02) as sink:  # a full window in flight at 1 msg/ms
        outbox = _outbox(sink, counters)
        task = asyncio.create_task(outbox.run())
        total = await _load_across_outages(outbox, sink, outages=3)
        await eventually(lambda: len(sink.accepted) == total)
        assert sink.most_in_flight_failing >= 4, "no window in flight at the outage"
        _assert_in_order(sink, total)
        assert counters["route.out.published"] == total
        assert counters["route.out.publish_retries"] >= 2
        assert outbox.depth == 0 and outbox.in_flight == 0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_spool_keeps_the_retried_messages_until_acknowledged_and_in_order(
    tmp_path: Path,
) -> None:
    counters = Counters()
    total = 400
    spool = Spool.open(tmp_path / "spool.sqlite3", max_bytes=10_000_000, max_age=None)
    route_spool = spool.route("out")
    async with OutageBus() as sink:
        outbox = _outbox(sink, counters, spool=route_spool, codec=SpoolCodec())
        task = asyncio.create_task(outbox.run())
        for n in range(100):
            outbox.offer(_message(n))
        await asyncio.sleep(0.01)  # a window in flight
        sink.away = True
        for n in range(100, 200):
            outbox.offer(_message(n))
        await asyncio.sleep(0.2)
        assert sink.most_in_flight_failing > 1
        # Nothing left the spool that the broker did not take.
        assert route_spool.count == 200 - len(sink.accepted)
        sink.away = False
        for n in range(200, total):
            outbox.offer(_message(n))
            await asyncio.sleep(0)
        await eventually(lambda: len(sink.accepted) == total)
        _assert_in_order(sink, total)
        await eventually(lambda: route_spool.count == 0)
        assert counters["route.out.published"] == total
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    spool.close()


async def test_a_retried_message_refused_for_good_is_rejected_once_and_the_rest_follow() -> None:
    counters = Counters()
    async with OutageBus() as sink:
        outbox = _outbox(sink, counters)
        sink.away = True
        sink.refuse = {0}  # the oldest of the window: retried first, then refused
        task = asyncio.create_task(outbox.run())
        for n in range(40):
            outbox.offer(_message(n))
        await eventually(lambda: counters["route.out.publish_retries"] >= WINDOW)
        sink.away = False
        await eventually(lambda: len(sink.accepted) == 39)
        assert [n for _, n in sink.accepted] == list(range(1, 40))
        assert counters["route.out.rejected.refused"] == 1
        assert counters["route.out.dropped.refused"] == 1
        assert counters["route.out.published"] == 39
        await eventually(lambda: outbox.depth == 0 and outbox.in_flight == 0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
