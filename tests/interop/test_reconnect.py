"""Recovery: a livekit-server restart mid-session is followed by a working rejoin."""

from __future__ import annotations

import asyncio
from pathlib import Path

from livekit import rtc

from bridge.room.events import DataReceived, Reconnected, Reconnecting
from bridge.room.room import Room, RoomOptions
from tests.conftest import make_token
from tests.interop.conftest import eventually, our_peer, private_livekit_server, sdk_peer


async def test_server_restart_then_rejoin_and_data_flows_again(
    tmp_path: Path, room_name: str, in_test_namespace: None
) -> None:
    options = RoomOptions(reconnect_initial_delay=0.2, reconnect_max_delay=2.0)
    async with (
        private_livekit_server(tmp_path) as server,
        our_peer(server, room_name, "ours", options=options) as ours,
    ):
        seen: list[object] = []
        ours.on(Reconnecting, seen.append)
        ours.on(Reconnected, seen.append)
        first_sid = ours.local_participant.sid

        await asyncio.to_thread(server.restart)

        await eventually(
            lambda: any(isinstance(e, Reconnected) for e in seen),
            timeout=60,
            what="rejoin after the server restart",
        )
        assert isinstance(seen[0], Reconnecting)
        assert ours.isconnected
        assert ours.local_participant.sid != first_sid  # a full rejoin: new session
        assert ours.counters["events.dropped"] == 0

        # Data flows both ways with a peer that joined the restarted server.
        async with sdk_peer(server, room_name, "sdk") as sdk:
            got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
            sdk.on("data_received", got.put_nowait)
            await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
            async with ours.events(DataReceived) as events:
                await ours.local_participant.publish_data(b"after restart")
                await sdk.local_participant.publish_data(b"hello again")
                assert (await asyncio.wait_for(got.get(), 10)).data == b"after restart"
                event = await asyncio.wait_for(anext(events), 10)
                assert event.packet.data == b"hello again"


async def test_a_full_rejoin_uses_a_freshly_minted_token(
    tmp_path: Path, room_name: str, in_test_namespace: None
) -> None:
    options = RoomOptions(reconnect_initial_delay=0.2, reconnect_max_delay=2.0)
    minted: list[str] = []

    def renew() -> str:
        # The name claim tells which token the server saw at the rejoin.
        minted.append(f"renewed-{len(minted)}")
        return make_token(server, room_name, "ours", name=minted[-1])

    async with private_livekit_server(tmp_path) as server:
        ours = Room(options)
        await ours.connect(
            server.url, make_token(server, room_name, "ours", name="first"), renew_token=renew
        )
        try:
            seen: list[object] = []
            ours.on(Reconnected, seen.append)
            await asyncio.to_thread(server.restart)
            await eventually(lambda: bool(seen), timeout=60, what="rejoin after the server restart")
            assert minted, "the rejoin did not ask for a fresh token"
            async with sdk_peer(server, room_name, "sdk") as sdk:
                await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
                assert sdk.remote_participants["ours"].name == minted[-1]
        finally:
            await ours.disconnect()
