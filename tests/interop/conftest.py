"""Helpers for interop tests: our `Room` and official-SDK peers in the same real room."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from livekit import rtc

from bridge.room.room import Room, RoomOptions
from tests.conftest import make_token
from tests.services import LiveKitServer


async def eventually(
    predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Wait until `predicate()` holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def sdk_peer(
    server: LiveKitServer, room: str, identity: str, **token_args: Any
) -> AsyncIterator[rtc.Room]:
    """An official-SDK participant in `room`, disconnected on exit."""
    peer = rtc.Room()
    await peer.connect(server.url, make_token(server, room, identity, **token_args))
    try:
        yield peer
    finally:
        await peer.disconnect()


@asynccontextmanager
async def our_peer(
    server: LiveKitServer,
    room: str,
    identity: str,
    options: RoomOptions | None = None,
    setup: Callable[[Room], None] | None = None,
    **token_args: Any,
) -> AsyncIterator[Room]:
    """Our participant in `room`, disconnected on exit."""
    ours = Room(options)
    if setup is not None:
        setup(ours)
    await ours.connect(server.url, make_token(server, room, identity, **token_args))
    try:
        yield ours
    finally:
        await ours.disconnect()


@asynccontextmanager
async def private_livekit_server(workdir: Path) -> AsyncIterator[LiveKitServer]:
    """A livekit-server of the test's own (other ports), for tests that stop or restart it."""
    server = LiveKitServer(
        name="livekit-private", workdir=workdir, port=7980, udp_port=7982, turn_port=3578
    )
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def sdk_frames(remote: rtc.RemoteDataTrack) -> AsyncIterator[list[rtc.DataTrackFrame]]:
    """Subscribe the SDK to `remote`; the frames it reads, appended as they arrive."""
    stream = remote.subscribe()
    received: list[rtc.DataTrackFrame] = []

    async def read() -> None:
        async for frame in stream:
            received.append(frame)

    reader = asyncio.create_task(read())
    try:
        yield received
    finally:
        stream.close()
        reader.cancel()
