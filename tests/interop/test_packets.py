"""Data packets between our participant and official-SDK peers, both directions."""

from __future__ import annotations

import asyncio

import pytest
from livekit import rtc

from bridge.room.errors import DataPacketTooLargeError
from bridge.room.events import DataReceived
from bridge.room.types import MAX_DATA_PACKET_BYTES, DataPacketKind
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LiveKitServer


def _collect(sdk: rtc.Room) -> asyncio.Queue[rtc.DataPacket]:
    queue: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    sdk.on("data_received", queue.put_nowait)
    return queue


async def test_reliable_packets_ours_to_sdk_in_order_with_topic(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        # The SDK attributes packets to participants it already knows.
        await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
        for i in range(200):
            await ours.local_participant.publish_data(f"m{i}".encode(), topic="seq")
        received = [await asyncio.wait_for(got.get(), 10) for _ in range(200)]
        assert [p.data for p in received] == [f"m{i}".encode() for i in range(200)]
        assert {p.topic for p in received} == {"seq"}
        assert {p.kind for p in received} == {rtc.DataPacketKind.KIND_RELIABLE}
        assert {p.participant.identity if p.participant else None for p in received} == {"ours"}


async def test_reliable_packets_sdk_to_ours(livekit_server: LiveKitServer, room_name: str) -> None:
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        async with ours.events(DataReceived) as events:
            await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
            for i in range(100):
                await sdk.local_participant.publish_data(f"s{i}".encode(), topic="up")
            received = [(await asyncio.wait_for(anext(events), 10)).packet for _ in range(100)]
        assert [p.data for p in received] == [f"s{i}".encode() for i in range(100)]
        first = received[0]
        assert first.topic == "up"
        assert first.kind == DataPacketKind.KIND_RELIABLE
        assert first.participant_identity == "sdk"
        assert first.participant_sid.startswith("PA_")
        assert ours.counters["packets.duplicate"] == 0


async def test_lossy_packets_both_ways(livekit_server: LiveKitServer, room_name: str) -> None:
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        got = _collect(sdk)
        async with ours.events(DataReceived) as events:
            await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
            for i in range(20):
                await ours.local_participant.publish_data(f"l{i}".encode(), reliable=False)
                await sdk.local_participant.publish_data(f"k{i}".encode(), reliable=False)
                await asyncio.sleep(0.01)
            to_sdk = [await asyncio.wait_for(got.get(), 10)]
            to_ours = [(await asyncio.wait_for(anext(events), 10)).packet]
            await asyncio.sleep(0.5)
            while not got.empty():
                to_sdk.append(got.get_nowait())
        # Lossy means no retransmission, not loss by design: on this link nearly all arrive.
        assert {p.kind for p in to_sdk} == {rtc.DataPacketKind.KIND_LOSSY}
        assert to_ours[0].kind == DataPacketKind.KIND_LOSSY
        assert {p.data for p in to_sdk} <= {f"l{i}".encode() for i in range(20)}
        assert len(to_sdk) >= 10, f"only {len(to_sdk)} of 20 lossy packets arrived"


async def test_destination_filtering_both_ways(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        sdk_peer(livekit_server, room_name, "bob") as bob,
        sdk_peer(livekit_server, room_name, "carol") as carol,
    ):
        to_bob, to_carol = _collect(bob), _collect(carol)
        await eventually(lambda: len(ours.remote_participants) == 2, what="both peers")
        await eventually(
            lambda: "ours" in bob.remote_participants and "ours" in carol.remote_participants,
            what="peers see us",
        )
        await ours.local_participant.publish_data(
            b"for bob", destination_identities=["bob"], topic="dm"
        )
        # Reliable delivery is ordered per sender: once carol has the later broadcast,
        # the earlier packet addressed to bob alone can no longer reach her.
        await ours.local_participant.publish_data(b"for all", topic="all")
        assert (await asyncio.wait_for(to_bob.get(), 10)).data == b"for bob"
        assert (await asyncio.wait_for(to_bob.get(), 10)).data == b"for all"
        assert (await asyncio.wait_for(to_carol.get(), 10)).data == b"for all"
        assert to_carol.empty()

        async with ours.events(DataReceived) as events:
            await bob.local_participant.publish_data(b"to carol", destination_identities=["carol"])
            await bob.local_participant.publish_data(b"to ours", destination_identities=["ours"])
            packet = (await asyncio.wait_for(anext(events), 10)).packet
        assert packet.data == b"to ours"
        assert packet.destination_identities == ("ours",)
        assert (await asyncio.wait_for(to_carol.get(), 10)).data == b"to carol"


async def test_oversized_packet_is_refused_and_the_channel_keeps_working(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        with pytest.raises(DataPacketTooLargeError, match="over the 64000-byte limit"):
            await ours.local_participant.publish_data(b"x" * MAX_DATA_PACKET_BYTES)
        # The largest payload that fits still goes through, and so does what follows.
        await ours.local_participant.publish_data(b"y" * (MAX_DATA_PACKET_BYTES - 100))
        await ours.local_participant.publish_data(b"after")
        assert len((await asyncio.wait_for(got.get(), 10)).data) == MAX_DATA_PACKET_BYTES - 100
        assert (await asyncio.wait_for(got.get(), 10)).data == b"after"
