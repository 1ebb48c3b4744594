"""Participant and room state between our participant and official-SDK peers, both directions.

Covers our own attributes/metadata/name as the SDK sees them (and as our own ``is_local``
events report them), the SDK's as we see them, room metadata and other participants' state
changed through the server API, the server's refusals (permission, size limits, as measured on
the pinned livekit-server 1.13.5) and presence events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from livekit import api, rtc
from livekit.protocol import models

from bridge.room.errors import StateUpdateError
from bridge.room.events import Subscription
from bridge.room.room import Room
from bridge.room.server_api import ServerApi
from bridge.room.state import (
    ParticipantAttributesChanged,
    ParticipantConnected,
    ParticipantDisconnected,
    ParticipantMetadataChanged,
    ParticipantNameChanged,
    RoomMetadataChanged,
)
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LiveKitServer

STATE_EVENTS = (
    ParticipantAttributesChanged,
    ParticipantMetadataChanged,
    ParticipantNameChanged,
    RoomMetadataChanged,
)

# Limits of the pinned server, in UTF-8 bytes (measured: the next byte is refused).
MAX_ATTRIBUTES_UPDATE_BYTES = 64 * 1024  # keys + values of one update, not of the merged map
MAX_NAME_BYTES = 256
MAX_METADATA_BYTES = 512 * 1024


@dataclass
class Pair:
    """Our participant ("ours") and an SDK participant ("sdk") that see each other."""

    ours: Room
    sdk: rtc.Room
    sdk_events: asyncio.Queue[tuple[Any, ...]]


@asynccontextmanager
async def pair(server: LiveKitServer, room: str, **our_token: Any) -> AsyncIterator[Pair]:
    """Ours and an SDK peer that see each other; the SDK's state events are queued as tuples."""
    async with (
        our_peer(server, room, "ours", **our_token) as ours,
        sdk_peer(server, room, "sdk") as sdk,
    ):
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        for name in (
            "participant_attributes_changed",
            "participant_metadata_changed",
            "participant_name_changed",
            "room_metadata_changed",
        ):
            sdk.on(name, lambda *args, name=name: events.put_nowait((name, *args)))
        await eventually(lambda: "sdk" in ours.remote_participants, what="we see the SDK")
        await eventually(lambda: "ours" in sdk.remote_participants, what="the SDK sees us")
        yield Pair(ours, sdk, events)


async def _next(source: Subscription | asyncio.Queue[Any], timeout: float = 10) -> Any:
    if isinstance(source, asyncio.Queue):
        return await asyncio.wait_for(source.get(), timeout)
    return await asyncio.wait_for(anext(source), timeout)


async def _no_more(source: Subscription | asyncio.Queue[Any], wait: float = 0.3) -> None:
    try:
        extra = await _next(source, wait)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected event: {extra!r}")


# --------------------------------------------------------------------------- attributes


async def test_our_attributes_seen_by_sdk_and_by_ourselves(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        pair(livekit_server, room_name, attributes={"initial": "from token"}) as p,
        p.ours.events(*STATE_EVENTS) as ours_events,
    ):
        assert p.sdk.remote_participants["ours"].attributes == {"initial": "from token"}
        steps = [
            ({"a": "1", "b": "ü 2"}, {"a": "1", "b": "ü 2"}),  # added
            ({"a": "10"}, {"a": "10"}),  # changed; untouched keys stay
            ({"b": ""}, {"b": ""}),  # an empty value deletes the key
        ]
        expected = {"initial": "from token"}
        for update, changed in steps:
            await p.ours.local_participant.set_attributes(update)
            expected = {**expected, **update}
            expected = {k: v for k, v in expected.items() if v}

            local = await _next(ours_events)
            assert local == ParticipantAttributesChanged("ours", changed, expected, is_local=True)
            assert p.ours.local_participant.attributes == expected

            name, sdk_changed, participant = await _next(p.sdk_events)
            assert name == "participant_attributes_changed"
            assert participant.identity == "ours"
            assert sdk_changed == changed
            assert dict(participant.attributes) == expected
        assert expected == {"initial": "from token", "a": "10"}
        # Setting a value it already has changes nothing, and nobody hears of it.
        await p.ours.local_participant.set_attributes({"a": "10"})
        await _no_more(ours_events)
        await _no_more(p.sdk_events)


async def test_sdk_attributes_seen_by_us(livekit_server: LiveKitServer, room_name: str) -> None:
    async with (
        pair(livekit_server, room_name) as p,
        p.ours.events(*STATE_EVENTS) as ours_events,
    ):
        await p.sdk.local_participant.set_attributes({"x": "1", "y": "ÿ"})
        event = await _next(ours_events)
        assert event == ParticipantAttributesChanged(
            "sdk", {"x": "1", "y": "ÿ"}, {"x": "1", "y": "ÿ"}, is_local=False
        )
        await p.sdk.local_participant.set_attributes({"x": "2", "y": ""})
        event = await _next(ours_events)
        assert event == ParticipantAttributesChanged(
            "sdk", {"x": "2", "y": ""}, {"x": "2"}, is_local=False
        )
        assert p.ours.remote_participants["sdk"].attributes == {"x": "2"}
        await _no_more(ours_events)


# --------------------------------------------------------------------------- metadata and name


async def test_our_metadata_and_name_seen_by_sdk(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        pair(livekit_server, room_name, name="Old Name", metadata="old meta") as p,
        p.ours.events(*STATE_EVENTS) as ours_events,
    ):
        seen = p.sdk.remote_participants["ours"]
        assert (seen.name, seen.metadata) == ("Old Name", "old meta")

        await p.ours.local_participant.set_metadata('{"status": "bereit ✓"}')
        local = await _next(ours_events)
        assert local == ParticipantMetadataChanged(
            "ours", "old meta", '{"status": "bereit ✓"}', is_local=True
        )
        name, participant, old, new = await _next(p.sdk_events)
        assert (name, participant.identity) == ("participant_metadata_changed", "ours")
        assert old == "old meta"
        assert new == participant.metadata == '{"status": "bereit ✓"}'

        await p.ours.local_participant.set_name("Nöuveau Nom")
        local = await _next(ours_events)
        assert local == ParticipantNameChanged("ours", "Old Name", "Nöuveau Nom", is_local=True)
        name, participant, old, new = await _next(p.sdk_events)
        assert (name, participant.identity) == ("participant_name_changed", "ours")
        # The SDK reads `old` from its own participant record just before applying the event
        # (livekit/rtc/room.py); seen once in a full-suite run, that record already held the
        # new name. What our side sent is checked exactly above (our own event's old name).
        assert old in ("Old Name", "Nöuveau Nom")
        assert new == participant.name == "Nöuveau Nom"
        assert (p.ours.local_participant.name, p.ours.local_participant.metadata) == (
            "Nöuveau Nom",
            '{"status": "bereit ✓"}',
        )
        # Empty means "unchanged" to the server: nothing changes, nobody hears of it.
        await p.ours.local_participant.set_metadata("")
        await p.ours.local_participant.set_name("")
        await _no_more(ours_events)
        await _no_more(p.sdk_events)
        assert p.ours.local_participant.metadata == '{"status": "bereit ✓"}'


async def test_sdk_metadata_and_name_seen_by_us(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        pair(livekit_server, room_name) as p,
        p.ours.events(*STATE_EVENTS) as ours_events,
    ):
        await p.sdk.local_participant.set_metadata("sdk meta ✓")
        assert await _next(ours_events) == ParticipantMetadataChanged(
            "sdk", "", "sdk meta ✓", is_local=False
        )
        await p.sdk.local_participant.set_name("SDK Näme")
        assert await _next(ours_events) == ParticipantNameChanged(
            "sdk", "", "SDK Näme", is_local=False
        )
        await p.sdk.local_participant.set_metadata("sdk meta 2")
        assert await _next(ours_events) == ParticipantMetadataChanged(
            "sdk", "sdk meta ✓", "sdk meta 2", is_local=False
        )
        remote = p.ours.remote_participants["sdk"]
        assert (remote.name, remote.metadata) == ("SDK Näme", "sdk meta 2")


# --------------------------------------------------------------------------- server API


async def test_room_metadata_from_server_api_seen_by_us_and_sdk(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        pair(livekit_server, room_name) as p,
        p.ours.events(*STATE_EVENTS) as ours_events,
        ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as server,
    ):
        assert p.ours.metadata == ""
        await server.update_room_metadata(room_name, "room ✓ 1")
        assert await _next(ours_events) == RoomMetadataChanged("", "room ✓ 1")
        name, old, new = await _next(p.sdk_events)
        assert (name, old, new) == ("room_metadata_changed", "", "room ✓ 1")
        await server.update_room_metadata(room_name, "room 2")
        assert await _next(ours_events) == RoomMetadataChanged("room ✓ 1", "room 2")
        name, old, new = await _next(p.sdk_events)
        assert (name, old, new) == ("room_metadata_changed", "room ✓ 1", "room 2")
        assert p.ours.metadata == p.sdk.metadata == "room 2"
        # A participant joining now gets it in its JoinResponse.
        async with our_peer(livekit_server, room_name, "late") as late:
            assert late.metadata == "room 2"


async def test_other_participants_state_from_server_api_seen_by_us(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        pair(livekit_server, room_name) as p,
        p.ours.events(*STATE_EVENTS) as ours_events,
        ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as server,
    ):
        await server.update_participant(room_name, "sdk", attributes={"role": "admin", "z": "1"})
        assert await _next(ours_events) == ParticipantAttributesChanged(
            "sdk", {"role": "admin", "z": "1"}, {"role": "admin", "z": "1"}, is_local=False
        )
        await server.update_participant(
            room_name, "sdk", attributes={"z": ""}, metadata="by server", name="Served"
        )
        got = [await _next(ours_events) for _ in range(3)]
        assert sorted(got, key=lambda e: type(e).__name__) == [
            ParticipantAttributesChanged("sdk", {"z": ""}, {"role": "admin"}, is_local=False),
            ParticipantMetadataChanged("sdk", "", "by server", is_local=False),
            ParticipantNameChanged("sdk", "", "Served", is_local=False),
        ]
        # The server may change our own state too: our local events say so.
        await server.update_participant(room_name, "ours", attributes={"set": "by server"})
        assert await _next(ours_events) == ParticipantAttributesChanged(
            "ours", {"set": "by server"}, {"set": "by server"}, is_local=True
        )
        assert p.ours.local_participant.attributes == {"set": "by server"}
        await _no_more(ours_events)


# --------------------------------------------------------------------------- refusals


async def test_update_without_permission_is_refused(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    grants = api.VideoGrants(
        room_join=True, room=room_name, can_update_own_metadata=False, can_publish_data=True
    )
    async with our_peer(livekit_server, room_name, "ours", grants=grants) as ours:
        async with ours.events(*STATE_EVENTS) as events:
            with pytest.raises(StateUpdateError, match="permission to update own metadata") as info:
                await ours.local_participant.set_attributes({"a": "1"})
            assert info.value.reason == "NOT_ALLOWED"
            with pytest.raises(StateUpdateError) as info:
                await ours.local_participant.set_metadata("m")
            assert info.value.reason == "NOT_ALLOWED"
            with pytest.raises(StateUpdateError) as info:
                await ours.local_participant.set_name("n")
            assert info.value.reason == "NOT_ALLOWED"
            await _no_more(events)
        assert ours.local_participant.attributes == {}
        assert ours.isconnected  # a refusal is no reason to drop the session
        await ours.local_participant.publish_data(b"still works")


async def test_updates_over_the_size_limits_are_refused(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with our_peer(livekit_server, room_name, "ours") as ours:
        # Attributes: keys + values of one update, in UTF-8 bytes.
        fits = {"ü": "ü" * (MAX_ATTRIBUTES_UPDATE_BYTES // 2 - 1)}
        assert sum(len(k.encode()) + len(v.encode()) for k, v in fits.items()) == 65_536
        await ours.local_participant.set_attributes(fits)
        with pytest.raises(StateUpdateError, match="exceeds attributes size limit") as info:
            await ours.local_participant.set_attributes({"ü": fits["ü"] + "x"})
        assert info.value.reason == "LIMIT_EXCEEDED"
        with pytest.raises(StateUpdateError, match="exceeds attributes size limit"):
            await ours.local_participant.set_attributes({"a": "x" * 40_000, "b": "y" * 40_000})
        # The limit is per update: the merged map may grow beyond it.
        await ours.local_participant.set_attributes({"a": "x" * 40_000})
        await ours.local_participant.set_attributes({"b": "y" * 40_000})
        await eventually(lambda: len(ours.local_participant.attributes) == 3, what="merged map")

        await ours.local_participant.set_name("n" * MAX_NAME_BYTES)
        with pytest.raises(StateUpdateError, match="exceeds name length limit") as info:
            await ours.local_participant.set_name("n" * (MAX_NAME_BYTES - 1) + "é")
        assert info.value.reason == "LIMIT_EXCEEDED"

        await ours.local_participant.set_metadata("m" * MAX_METADATA_BYTES)
        with pytest.raises(StateUpdateError, match="exceeds metadata size limit") as info:
            await ours.local_participant.set_metadata("m" * MAX_METADATA_BYTES + "!")
        assert info.value.reason == "LIMIT_EXCEEDED"

        await eventually(
            lambda: len(ours.local_participant.metadata) == MAX_METADATA_BYTES,
            what="the accepted metadata",
        )
        assert ours.local_participant.name == "n" * MAX_NAME_BYTES
        assert ours.isconnected


# --------------------------------------------------------------------------- presence


async def test_sdk_joins_and_leaves_are_reported_in_order(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        ours.events(ParticipantConnected, ParticipantDisconnected) as events,
    ):
        async with sdk_peer(livekit_server, room_name, "alice", attributes={"k": "v"}):
            joined = await _next(events)
            assert isinstance(joined, ParticipantConnected)
            assert joined.info.identity == "alice"
            assert dict(joined.info.attributes) == {"k": "v"}
            assert joined.info.client_protocol == 2
            async with sdk_peer(livekit_server, room_name, "bob"):
                joined = await _next(events)
                assert isinstance(joined, ParticipantConnected)
                assert joined.info.identity == "bob"
                assert set(ours.remote_participants) == {"alice", "bob"}
            left = await _next(events)
            assert isinstance(left, ParticipantDisconnected)
            assert left.info.identity == "bob"
            assert left.reason == models.DisconnectReason.CLIENT_INITIATED
            assert set(ours.remote_participants) == {"alice"}
        left = await _next(events)
        assert isinstance(left, ParticipantDisconnected)
        assert left.info.identity == "alice"
        assert left.reason == models.DisconnectReason.CLIENT_INITIATED
        assert ours.remote_participants == {}
        # The same identity again is a new session: connected again.
        async with sdk_peer(livekit_server, room_name, "alice"):
            again = await _next(events)
            assert isinstance(again, ParticipantConnected)
            assert again.info.identity == "alice"
            assert again.info.sid != joined.info.sid
        assert isinstance(await _next(events), ParticipantDisconnected)
        await _no_more(events)


async def test_same_identity_joining_again_replaces_the_old_session(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """The server drops the old session; we report it gone (DUPLICATE_IDENTITY), then the new."""
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        ours.events(ParticipantConnected, ParticipantDisconnected) as events,
        sdk_peer(livekit_server, room_name, "dup", attributes={"session": "1"}),
    ):
        first = await _next(events)
        assert isinstance(first, ParticipantConnected)
        async with sdk_peer(livekit_server, room_name, "dup", attributes={"session": "2"}):
            got = [await _next(events), await _next(events)]
            assert isinstance(got[0], ParticipantDisconnected)
            assert got[0].info.sid == first.info.sid
            assert got[0].reason == models.DisconnectReason.DUPLICATE_IDENTITY
            assert isinstance(got[1], ParticipantConnected)
            assert got[1].info.sid != first.info.sid
            assert dict(got[1].info.attributes) == {"session": "2"}
            assert ours.remote_participants["dup"].sid == got[1].info.sid
            await _no_more(events)
