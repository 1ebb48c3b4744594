"""Joining and leaving a real livekit-server, seen by an official-SDK participant."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from livekit import api, rtc

from bridge.room.errors import AuthError, InvalidUrlError, ServerUnreachableError
from bridge.room.events import Disconnected
from bridge.room.room import Room, RoomOptions
from tests.conftest import make_token
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LiveKitServer


async def test_join_is_seen_by_sdk_peer_and_leave_is_immediate(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with sdk_peer(livekit_server, room_name, "sdk-alice") as alice:
        ours = Room()
        token = make_token(
            livekit_server, room_name, "roombus", name="Bridge", attributes={"role": "bridge"}
        )
        await ours.connect(livekit_server.url, token)
        try:
            await eventually(lambda: "roombus" in alice.remote_participants, what="SDK sees us")
            seen = alice.remote_participants["roombus"]
            assert seen.name == "Bridge"
            assert dict(seen.attributes) == {"role": "bridge"}
            assert ours.local_participant.identity == "roombus"
            assert ours.local_participant.sid.startswith("PA_")
            assert ours.name == room_name
            assert set(ours.remote_participants) == {"sdk-alice"}
            assert ours.isconnected
        finally:
            left_at = time.monotonic()
            await ours.disconnect()
        # We send `leave`, so the server drops us at once instead of after ICE timeouts (~20 s).
        await eventually(
            lambda: "roombus" not in alice.remote_participants, timeout=5, what="SDK sees us leave"
        )
        assert time.monotonic() - left_at < 5
        assert not ours.isconnected


async def test_sdk_peer_joining_later_is_reported(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with our_peer(livekit_server, room_name, "roombus") as ours:
        async with sdk_peer(livekit_server, room_name, "late", attributes={"k": "v"}):
            await eventually(lambda: "late" in ours.remote_participants, what="late joiner")
            assert ours.remote_participants["late"].attributes == {"k": "v"}
        await eventually(lambda: "late" not in ours.remote_participants, what="late joiner left")


async def test_invalid_url_is_rejected_at_once() -> None:
    with pytest.raises(InvalidUrlError, match="invalid LiveKit URL 'ftp://x'"):
        await Room().connect("ftp://x", "token")


async def test_bad_signature_is_an_auth_error(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    token = (
        api.AccessToken(livekit_server.api_key, "another-secret-that-is-32-chars-long!")
        .with_identity("x")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    started = time.monotonic()
    with pytest.raises(AuthError, match=r"rejected: HTTP 401"):
        await Room().connect(livekit_server.url, token)
    assert time.monotonic() - started < 10


async def test_expired_token_is_an_auth_error(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    # The verifier allows one minute of leeway, so expire it well beyond that.
    token = make_token(livekit_server, room_name, "late", ttl=timedelta(minutes=-5))
    with pytest.raises(AuthError):
        await Room().connect(livekit_server.url, token)


async def test_missing_room_join_grant_is_an_auth_error(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    grants = api.VideoGrants(room_join=False, room=room_name)
    token = make_token(livekit_server, room_name, "nojoin", grants=grants)
    with pytest.raises(AuthError):
        await Room().connect(livekit_server.url, token)


async def test_unreachable_server_fails_within_the_join_timeout(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    token = make_token(livekit_server, room_name, "x")
    started = time.monotonic()
    with pytest.raises(
        ServerUnreachableError, match=r"connect to ws://127\.0\.0\.1:1/rtc(/v1)? failed"
    ):
        await Room(RoomOptions(join_timeout=3)).connect("ws://127.0.0.1:1", token)
    assert time.monotonic() - started < 5


async def test_server_removing_us_ends_the_room_with_a_reason(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    ours = Room()
    closed: asyncio.Future[Disconnected] = asyncio.get_running_loop().create_future()

    def on_closed(event: Disconnected) -> None:
        if not closed.done():
            closed.set_result(event)

    ours.on(Disconnected, on_closed)
    await ours.connect(livekit_server.url, make_token(livekit_server, room_name, "victim"))
    async with api.LiveKitAPI(
        livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
    ) as lkapi:
        await lkapi.room.remove_participant(
            api.RoomParticipantIdentity(room=room_name, identity="victim")
        )
    event = await asyncio.wait_for(closed, 10)
    assert "PARTICIPANT_REMOVED" in event.reason
    await ours.wait_closed()
    assert not ours.isconnected


async def test_peer_sdk_sees_our_data_after_join(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    async with sdk_peer(livekit_server, room_name, "sdk") as sdk:
        sdk.on("data_received", got.put_nowait)
        async with our_peer(livekit_server, room_name, "ours") as ours:
            await ours.local_participant.publish_data(b"first", topic="t")
            packet = await asyncio.wait_for(got.get(), 10)
            assert (packet.data, packet.topic) == (b"first", "t")


async def test_token_without_subscribe_grant_still_exchanges_data(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    # No canSubscribe: the server runs the publisher-primary flow (no subscriber offer) and
    # sends downstream data on our own publisher channels.
    grants = api.VideoGrants(
        room_join=True, room=room_name, can_subscribe=False, can_publish_data=True
    )
    async with sdk_peer(livekit_server, room_name, "sdk") as sdk:
        ours = Room()
        await ours.connect(
            livekit_server.url, make_token(livekit_server, room_name, "nosub", grants=grants)
        )
        try:
            got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
            sdk.on("data_received", got.put_nowait)
            await eventually(lambda: "nosub" in sdk.remote_participants, what="sdk sees us")
            await ours.local_participant.publish_data(b"up", topic="t")
            assert (await asyncio.wait_for(got.get(), 10)).data == b"up"
        finally:
            await ours.disconnect()


async def test_ice_sockets_get_a_large_receive_buffer(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """At full speed the default UDP buffer overflowed (1 s SCTP recovery gaps in the bench)."""
    import os
    import socket

    from bridge.room.transport import UDP_RECEIVE_BUFFER

    rmem_max = _rmem_max()
    wanted = UDP_RECEIVE_BUFFER if os.geteuid() == 0 else min(UDP_RECEIVE_BUFFER, rmem_max)
    async with our_peer(livekit_server, room_name, "ours") as ours:
        session = ours._session
        assert session is not None and session.subscriber is not None
        sctp = session.subscriber.pc.sctp
        assert sctp is not None
        protocols = sctp.transport.transport.iceGatherer._connection._protocols
        # Host candidates' sockets (TURN relay protocols have none of their own).
        socks = [
            p.transport.get_extra_info("socket")
            for p in protocols
            if getattr(p, "transport", None) is not None
        ]
        sizes = [s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in socks if s is not None]
        assert sizes and all(size >= wanted for size in sizes), (sizes, wanted)


def _rmem_max() -> int:
    from pathlib import Path

    return int(Path("/proc/sys/net/core/rmem_max").read_text())
