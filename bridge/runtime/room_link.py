"""One room's life in the bridge: join, rejoin whenever it is lost, leave at shutdown.

The pure-Python participant cannot resume a session (no ICE restart), so every loss is a full
rejoin with a freshly minted token. Listeners given to the link attach to each new `Room`
before it connects (room events, RPC methods) and hear when it joined, so nothing of the new
session is missed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from livekit.protocol import models

from bridge.retry import CONNECT_MAX, delay
from bridge.room.e2ee import DataCryptor
from bridge.room.errors import ConnectError
from bridge.room.events import Disconnected
from bridge.room.room import Room, RoomOptions
from bridge.room.types import Counters

log = logging.getLogger("roombus.room")

# (link, room) before the room connects: subscribe to its events, register RPC methods.
Attach = Callable[["RoomLink", Room], None]
# (link, room) once joined: announce the state found there.
Joined = Callable[["RoomLink", Room], Awaitable[None]]


class RoomLink:
    """Keeps the bridge in one room (see the module docstring)."""

    def __init__(
        self,
        name: str,
        url: str,
        token: Callable[[str], str],
        counters: Counters,
        *,
        attach: Sequence[Attach] = (),
        joined: Sequence[Joined] = (),
        renew_token: bool = True,
        single_peer_connection: bool | Literal["auto"] = "auto",
        turn_ca_file: str | None = None,
        e2ee: DataCryptor | None = None,
        evicted: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self._single_pc = single_peer_connection  # `livekit.single_peer_connection`
        self._e2ee = e2ee  # `livekit.e2ee`
        self._turn_ca_file = turn_ca_file  # `livekit.turn_ca_file`
        self._token = token
        self._renew = renew_token  # False for a ready-made token: rejoin with refresh tokens
        self.counters = counters
        self._attach = list(attach)
        self._joined = list(joined)
        self.room: Room | None = None
        self.connected = asyncio.Event()
        self.stopping = False
        self.last_error: str | None = None
        # Replicas (bridge.runtime.ownership): a session ended by DUPLICATE_IDENTITY means
        # another owner joined; this says (after backing off) whether to rejoin.
        self._evicted = evicted

    def add_listeners(
        self, *, attach: Sequence[Attach] = (), joined: Sequence[Joined] = ()
    ) -> None:
        """More listeners for the next session (see the module docstring)."""
        self._attach.extend(attach)
        self._joined.extend(joined)

    async def run(self) -> None:
        """Join, and rejoin with backoff whenever the room is lost, until stopped."""
        attempt = 0
        while not self.stopping:
            room = Room(
                RoomOptions(
                    single_peer_connection=self._single_pc,
                    turn_ca_file=self._turn_ca_file,
                    e2ee=self._e2ee,
                )
            )
            for attach in self._attach:
                attach(self, room)
            closed: list[Disconnected] = []
            room.on(Disconnected, closed.append)
            room.on(Disconnected, lambda e: log.info("room %s: closed: %s", self.name, e.reason))
            try:
                renew = functools.partial(self._token, self.name) if self._renew else None
                await room.connect(self.url, self._token(self.name), renew_token=renew)
            except ConnectError as exc:
                wait = delay(attempt, maximum=CONNECT_MAX)
                attempt += 1
                self.counters.inc("rooms.join_failed")
                self.last_error = str(exc)
                # A rejected token or a missing room needs someone to act: say so loudly, but
                # keep trying (credentials get rotated, rooms get created).
                level = logging.WARNING if exc.retriable else logging.ERROR
                if attempt == 1 or not exc.retriable:
                    log.log(level, "room %s: join failed (%s); retrying", self.name, exc)
                await room.disconnect()
                await asyncio.sleep(wait)
                continue
            attempt = 0
            self.last_error = None
            self.room = room
            self.connected.set()
            self.counters.inc("rooms.joined")
            log.info("room %s: joined as %s", self.name, room.local_participant.identity)
            for joined in self._joined:
                await joined(self, room)
            await room.wait_closed()
            self.connected.clear()
            self.room = None
            duplicate = models.DisconnectReason.DUPLICATE_IDENTITY
            if self._evicted is not None and any(e.server_reason == duplicate for e in closed):
                self.last_error = "evicted by another owner"
                if not await self._evicted(self.name):
                    self.stopping = True
                    break
            if not self.stopping:
                self.counters.inc("rooms.lost")
                self.last_error = "lost; rejoining"
                log.warning("room %s: lost; rejoining", self.name)
                await asyncio.sleep(delay(0))

    async def stop(self) -> None:
        """Leave the room for good (with `leave`, so peers see us go at once)."""
        self.stopping = True
        if self.room is not None:
            await self.room.disconnect("bridge stopping")

    async def ready(self) -> Room:
        """The connected room (waits while it is rejoining)."""
        room = self.room
        if room is not None and room.isconnected:  # the hot path: no wait at all
            return room
        while True:
            await self.connected.wait()
            room = self.room
            if room is not None and room.isconnected:
                return room
            await asyncio.sleep(0.05)

    def sender_sid(self, identity: str) -> str:
        """The sid of participant `identity` in the current session, or ''."""
        room = self.room
        if room is None:
            return ""
        info = room.participant_info(identity)
        return info.sid if info else ""
