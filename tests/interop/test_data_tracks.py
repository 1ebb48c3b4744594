"""Data tracks between our participant and the official Python SDK, both directions.

Our `_data_track` packets must parse in the SDK (livekit 1.2.1) and the SDK's in ours, through
a real livekit-server, in both join modes; frames larger than one packet are cut and joined
again; the user timestamp extension survives; nothing is received without an explicit
subscription; and what is lost is counted (`docs/data-tracks.md`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from livekit import rtc

from bridge.room.data_tracks import (
    TRANSPORT_MTU,
    DataTrackError,
    DataTrackFrame,
    DataTrackFrameReceived,
    DataTrackPacket,
    Depacketizer,
    Packetizer,
    decode_packet,
    encode_packet,
)
from bridge.room.room import Room, RoomOptions
from bridge.room.types import Counters
from tests.interop.conftest import eventually, our_peer, sdk_frames, sdk_peer
from tests.services import LiveKitServer

MODES = pytest.mark.parametrize("single", [True, False], ids=["single", "dual"])


async def _push_until(
    push: Callable[[], object], arrived: Callable[[], bool], what: str, timeout: float = 15.0
) -> None:
    """Push a frame every 0.2 s until `arrived()`; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not arrived():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        push()
        for _ in range(10):
            await asyncio.sleep(0.02)
            if arrived():
                return


def _frames(ours: Room) -> list[DataTrackFrameReceived]:
    got: list[DataTrackFrameReceived] = []
    ours.on(DataTrackFrameReceived, got.append)
    return got


@MODES
async def test_sdk_track_to_ours_with_extensions_and_fragmentation(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    async with (
        our_peer(
            livekit_server, room_name, "ours", RoomOptions(single_peer_connection=single)
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        got = _frames(ours)
        track = await sdk.local_participant.publish_data_track(name="telemetry")
        await eventually(
            lambda: ours.remote_data_tracks.get("sdk") == ["telemetry"], what="the sdk's track"
        )
        # Not subscribed: the server sends nothing (auto_subscribe_data_track is off).
        assert ours.counters["data_tracks.packets_received"] == 0
        ours.subscribe_data_track("sdk", "telemetry")
        big = bytes(range(256)) * 150  # 38,400 bytes: three packets at the SDK's 16,000 MTU
        # Lossy all the way: the server drops what would wait over its 100 ms target latency
        # (its log says "data dropped due to high buffered amount"), so each frame is pushed
        # again until one copy arrives whole. The first also covers the subscription's
        # signal round trip.
        for frame in (
            rtc.DataTrackFrame(payload=b"first", user_timestamp=0x0102030405060708),
            rtc.DataTrackFrame(payload=big),
            rtc.DataTrackFrame(payload=b"last"),
        ):
            await _push_until(
                lambda f=frame: track.try_push(f),  # type: ignore[misc]
                lambda p=frame.payload: any(e.frame.payload == p for e in got),  # type: ignore[misc]
                what=f"a {len(frame.payload)}-byte frame from the sdk",
            )
        by_payload = {e.frame.payload: e for e in got}
        first = by_payload[b"first"]
        assert first.frame.user_timestamp == 0x0102030405060708
        assert (first.publisher_identity, first.track_name) == ("sdk", "telemetry")
        assert first.track_sid == track.info.sid
        assert by_payload[big].frame.user_timestamp is None
        assert ours.counters["data_tracks.malformed"] == 0
        assert ours.counters["data_tracks.e2ee_dropped"] == 0
        # What the server dropped shows as sequence gaps, counted (never hidden).
        assert ours.counters["data_tracks.frames_received"] == len(got)


@MODES
async def test_our_track_to_sdk_with_user_timestamp_and_fragmentation(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(
            livekit_server, room_name, "ours", RoomOptions(single_peer_connection=single)
        ) as ours,
    ):
        published: asyncio.Queue[rtc.RemoteDataTrack] = asyncio.Queue()
        sdk.on("data_track_published", published.put_nowait)
        track = await ours.local_participant.publish_data_track("ours-telemetry")
        assert track.info.name == "ours-telemetry" and track.info.sid.startswith("DTR_")
        remote = await asyncio.wait_for(published.get(), 15)
        assert (remote.publisher_identity, remote.info.name) == ("ours", "ours-telemetry")
        async with sdk_frames(remote) as received:
            big = bytes(range(256)) * 200  # 51,200 bytes: four packets
            # Pushed until a copy arrives: the server may drop a burst (see above), and the
            # SDK's subscription takes a round trip. Drops are counted by the server, not us.
            for frame in (
                DataTrackFrame(b"stamped", user_timestamp=1_796_000_000_123),
                DataTrackFrame(big),
                DataTrackFrame(b"last"),
            ):
                await _push_until(
                    lambda f=frame: track.try_push(f),  # type: ignore[misc]
                    lambda p=frame.payload: any(r.payload == p for r in received),  # type: ignore[misc]
                    what=f"a {len(frame.payload)}-byte frame at the sdk",
                )
        by_payload = {f.payload: f for f in received}
        assert by_payload[b"stamped"].user_timestamp == 1_796_000_000_123
        assert by_payload[big].user_timestamp is None
        assert ours.counters["data_tracks.frames_sent"] >= 3
        await track.unpublish()
        assert not track.is_published()


async def test_subscription_before_publication_and_unsubscribe(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        got = _frames(ours)
        ours.subscribe_data_track("sdk", "later")
        await eventually(lambda: "sdk" in ours.remote_participants, what="the sdk")
        track = await sdk.local_participant.publish_data_track(name="later")
        other = await sdk.local_participant.publish_data_track(name="unwanted")

        def push_both() -> None:
            track.try_push(rtc.DataTrackFrame(payload=b"x"))
            other.try_push(rtc.DataTrackFrame(payload=b"y"))

        await _push_until(push_both, lambda: bool(got), what="a frame of the wanted track")
        assert {e.track_name for e in got} == {"later"}
        ours.unsubscribe_data_track("sdk", "later")
        await asyncio.sleep(0.5)
        count = len(got)
        for _ in range(10):
            track.try_push(rtc.DataTrackFrame(payload=b"after"))
        await asyncio.sleep(0.5)
        assert len(got) == count


async def test_duplicate_name_is_refused(livekit_server: LiveKitServer, room_name: str) -> None:
    async with our_peer(livekit_server, room_name, "ours") as ours:
        await ours.local_participant.publish_data_track("same")
        with pytest.raises(DataTrackError) as caught:
            await ours.local_participant.publish_data_track("same")
        assert caught.value.reason == "DUPLICATE_NAME", caught.value


def test_packet_layout_matches_the_sdk_bytes() -> None:
    """The bytes the SDK sent (captured against livekit-server, see docs/data-tracks.md)."""
    raw = bytes.fromhex("1c000076000100010ada353400020208010203040506070868656c6c6f")
    packet = decode_packet(raw)
    assert (packet.handle, packet.sequence, packet.frame_number) == (0x76, 1, 1)
    assert packet.start and packet.final
    assert packet.user_timestamp == 0x0102030405060708
    assert packet.payload == b"hello"
    assert encode_packet(packet) == raw


def test_packetizer_and_depacketizer_count_losses() -> None:
    counters = Counters()
    packets = Packetizer(5).packetize(DataTrackFrame(b"a" * (TRANSPORT_MTU * 2)))
    assert len(packets) == 3 and all(len(p) <= TRANSPORT_MTU for p in packets)
    depack = Depacketizer(counters)
    parsed = [decode_packet(p) for p in packets]
    assert depack.push(parsed[0]) is None
    assert depack.push(parsed[2]) is None  # the middle one was lost
    assert counters["data_tracks.packets_lost"] == 1
    assert counters["data_tracks.frames_incomplete"] == 1
    single = DataTrackPacket(5, 10, 9, 0, True, True, b"ok")
    assert depack.push(single) == DataTrackFrame(b"ok")
