"""Malformed signalling frames never break the session: logged, counted, skipped.

A scripted WebSocket server on loopback plays the LiveKit server's side, since a real one never
sends garbage.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from livekit.protocol import models, rtc

from bridge.room.signal import JoinParams, SignalClient, SignalClosedError
from bridge.room.types import Counters


async def test_garbage_frames_are_counted_and_the_next_message_arrives(
    unused_tcp_port: int,
) -> None:
    async def rtc_endpoint(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        join = rtc.SignalResponse(
            join=rtc.JoinResponse(participant=models.ParticipantInfo(identity="me", sid="PA_1"))
        )
        await ws.send_bytes(join.SerializeToString())
        await ws.send_bytes(b"\xff\xff\xff\xff not protobuf")
        await ws.send_str('{"some": "json"}')
        await ws.send_bytes(b"\xfa\x06\x03abc")  # field 111: a message kind newer than us
        update = rtc.SignalResponse(room_update=rtc.RoomUpdate(room=models.Room(metadata="m")))
        await ws.send_bytes(update.SerializeToString())
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/rtc", rtc_endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    counters = Counters()
    client = SignalClient(counters)
    try:
        join = await client.connect(f"ws://127.0.0.1:{unused_tcp_port}", "token", JoinParams())
        assert join.participant.identity == "me"
        message = await client.recv()
        assert message.room_update.room.metadata == "m"
        with pytest.raises(SignalClosedError):
            await client.recv()
    finally:
        await client.close()
        await runner.cleanup()
    assert counters["signal.malformed"] == 1
    assert counters["signal.unexpected_text"] == 1
    assert counters["signal.unknown_message"] == 1
