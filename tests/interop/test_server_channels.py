"""Which data channels the server makes for a participant that claims signalling protocol 17.

livekit-server v1.13.11 speaks protocol 18, whose one addition is pre-negotiated data channels
(`NegotiatedDataChannelID`: NDCI_RELIABLE=100, NDCI_LOSSY=101, NDCI_DATA_TRACK=102, created
without a DCEP OPEN, so a client must create them itself with those ids). The server uses them
only for a client that claims protocol > 17 *and* joins over `/rtc/v1` (single peer connection).
We claim 17, so on every server we support the channels the server makes are in-band (DCEP): in
dual mode `_reliable`, `_lossy` (and `_data_track`) on the subscriber connection, which is where
downstream data arrives. If a server ever used negotiated ids with us, downstream data would
silently never arrive; these tests say so at once instead.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiortc import RTCDataChannel

from bridge.room.events import DataReceived
from bridge.room.room import Room, RoomOptions
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LiveKitServer, livekit_binary_version

NDCI_IDS = {100, 101, 102}


def _record_server_channels(room: Room, seen: list[tuple[str, int | None, bool]]) -> None:
    """Record (label, SCTP stream id, negotiated) of every channel the server opens to us."""
    original = room._on_datachannel

    def recording(session: Any, channel: RTCDataChannel) -> None:
        seen.append((channel.label, channel.id, channel.negotiated))
        original(session, channel)

    room._on_datachannel = recording  # type: ignore[method-assign]


async def test_dual_mode_gets_in_band_reliable_and_lossy_from_the_server(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    seen: list[tuple[str, int | None, bool]] = []
    options = RoomOptions(single_peer_connection=False)
    async with (
        our_peer(
            livekit_server,
            room_name,
            "roombus",
            options,
            setup=lambda room: _record_server_channels(room, seen),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk-alice") as alice,
    ):
        assert ours.single_peer_connection is False
        session = ours._session
        assert session is not None
        # The server's own protocol level: 17 up to v1.13.10, 18 from v1.13.11. We claim 17.
        version = livekit_binary_version()
        assert version is not None
        expected = 18 if version >= (1, 13, 11) else 17
        assert session.join.server_info.protocol == expected, session.join.server_info
        await eventually(
            lambda: {"_reliable", "_lossy"} <= {label for label, _, _ in seen},
            what="the server's _reliable and _lossy on the subscriber connection",
        )
        assert all(not negotiated for _, _, negotiated in seen), seen
        assert not NDCI_IDS & {sid for _, sid, _ in seen}, seen
        assert {label for label, _, _ in seen} <= {"_reliable", "_lossy", "_data_track"}, seen
        # And downstream data does arrive on them.
        got: list[bytes] = []
        ours.on(DataReceived, lambda event: got.append(event.packet.data))
        await eventually(lambda: "sdk-alice" in ours.remote_participants, what="alice")
        await alice.local_participant.publish_data(b"over-in-band", reliable=True)
        await eventually(lambda: b"over-in-band" in got, what="alice's packet")


@pytest.mark.parametrize("mode", [True, False], ids=["single", "dual"])
async def test_no_pre_negotiated_channels_for_protocol_17(
    livekit_server: LiveKitServer, room_name: str, mode: bool
) -> None:
    """Neither join path gives a protocol-17 client channels with NDCI ids or negotiated ones."""
    seen: list[tuple[str, int | None, bool]] = []
    async with our_peer(
        livekit_server,
        room_name,
        "roombus",
        RoomOptions(single_peer_connection=mode),
        setup=lambda room: _record_server_channels(room, seen),
    ) as ours:
        assert ours.single_peer_connection is mode
        session = ours._session
        assert session is not None and session.reliable is not None
        assert session.reliable.is_open
        # Whatever the server opened to us came by DCEP, never pre-negotiated (dual: its three
        # subscriber channels; single: none on v1.13.5 and v1.13.11, the channels are ours).
        assert all(not negotiated for _, _, negotiated in seen), seen
        assert not NDCI_IDS & {sid for _, sid, _ in seen}, seen
