"""Recovery: a livekit-server restart mid-session is followed by a working rejoin."""

from __future__ import annotations

import asyncio
from pathlib import Path

from livekit import rtc

from bridge.room.events import DataReceived, Reconnected, Reconnecting
from bridge.room.room import RoomOptions
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
