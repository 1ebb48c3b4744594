"""Pipelined lanes (`bridge.runtime.pump`): packets queued ahead of their acknowledgement.

A lane queues reliable packets without waiting for livekit-server's acknowledgement of the one
before, settles them in order as their deliveries resolve, delivers again (in order) what a lost
session took with it, and lets nothing overtake what it has in flight.
"""

from __future__ import annotations

import asyncio

from bridge.room.errors import NotConnectedError
from tests.unit.test_runtime import ROUTE, FakeRooms, _out, eventually, running_pump


async def test_a_lane_queues_packets_before_the_first_is_acknowledged_settles_in_order() -> None:
    rooms = FakeRooms()
    rooms.pipelined = True
    async with running_pump(ROUTE, rooms) as (source, sink, counters):
        for i in range(5):
            await sink.publish(_out("dev/r/1", b'{"payload": "m%d"}' % i))
        await eventually(lambda: len(rooms.sent) == 5, "all five queued")
        assert [p for _, p, _ in rooms.sent] == [b"m%d" % i for i in range(5)]
        assert source.acked == [] and rooms.delivered == []  # nothing acknowledged yet
        rooms.sent[2][2]._resolve()  # out of order: settles nothing before 0 and 1
        await asyncio.sleep(0.05)
        assert source.acked == []
        rooms.sent[0][2]._resolve()
        rooms.sent[1][2]._resolve()
        await eventually(lambda: len(source.acked) == 3, "the first three acknowledged")
        assert [e.payload for e in source.acked] == [b'{"payload": "m%d"}' % i for i in range(3)]
        for _, _, delivery in rooms.sent[3:]:
            delivery._resolve()
        await eventually(lambda: len(source.acked) == 5, "all acknowledged")
        assert rooms.delivered == [("r", b"m%d" % i) for i in range(5)]
        assert counters["route.in.delivered"] == 5
        assert counters["route.in.received"] == 5
        assert rooms.started == []  # no one-by-one delivery was needed


async def test_packets_lost_with_the_session_go_again_in_order() -> None:
    rooms = FakeRooms()
    rooms.pipelined = True
    async with running_pump(ROUTE, rooms) as (source, sink, counters):
        for i in range(4):
            await sink.publish(_out("dev/r/1", b'{"payload": "m%d"}' % i))
        await eventually(lambda: len(rooms.sent) == 4, "all four queued")
        rooms.sent[0][2]._resolve()
        for _, _, delivery in rooms.sent[1:]:
            delivery._fail(NotConnectedError("lost"))
        await eventually(lambda: len(source.acked) == 4, "all acknowledged")
        assert rooms.started == [b"m1", b"m2", b"m3"]  # again, one by one, in order
        assert rooms.delivered == [("r", b"m%d" % i) for i in range(4)]
        assert counters["source.mqtt:bus.resent_after_loss"] == 3
        assert counters["route.in.delivered"] == 4
        assert counters["route.in.received"] == 4


async def test_a_one_by_one_delivery_waits_for_what_the_lane_has_in_flight() -> None:
    rooms = FakeRooms()
    rooms.pipelined = True
    async with running_pump(ROUTE, rooms) as (source, sink, _):
        for i in range(2):
            await sink.publish(_out("dev/r/1", b'{"payload": "m%d"}' % i))
        await eventually(lambda: len(rooms.sent) == 2, "two queued")
        rooms.gates["r"] = asyncio.Event()  # the room rejoins: the next one goes one by one
        await sink.publish(_out("dev/r/1", b'{"payload": "m2"}'))
        await asyncio.sleep(0.05)
        assert rooms.started == []  # not before the two in flight are settled
        for _, _, delivery in rooms.sent:
            delivery._resolve()
        await eventually(lambda: rooms.started == [b"m2"], "then the one-by-one delivery")
        rooms.gates["r"].set()
        await eventually(lambda: len(source.acked) == 3, "all acknowledged")
        assert rooms.delivered == [("r", b"m%d" % i) for i in range(3)]
