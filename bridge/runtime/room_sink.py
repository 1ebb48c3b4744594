"""Bus-to-room deliveries: a `RoomDelivery` into the room it names.

`RoomSink.deliver` returns once livekit-server has the delivery: its SCTP acknowledgement covers
the packet (for a stream, the trailer), the server confirmed the attribute change, or the server
API answered (room metadata, another participant's attributes). Lossy packets are not tracked:
they are at most once by nature. Data-track frames neither: each track name is published on
first use (and again once a rejoin ended the publication), then a frame is pushed or, when
`LocalDataTrack.try_push` refuses it (channel congested or not open), dropped and counted
``route.<name>.dropped.data_track_full``; either way the delivery is over. A room
that is rejoining is waited for (a transient failure is never a rejection); what LiveKit
refuses for good (too large for a packet with ``oversize: reject``, a state update the server
refuses, invalid UTF-8 for text) raises `RejectedMessage`.

`RoomSink.send` is the pipelined form of the hot path (a reliable packet into a room that is
connected now): it returns once the packet is queued, in call order, with its `Delivery`, so a
caller can queue the next packet before livekit-server acknowledged this one, and calls
`confirmed` once the delivery resolved. Everything else takes `deliver`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from bridge.envelope import H_CONTENT_TYPE, Envelope
from bridge.errors import RejectedMessage
from bridge.logs import RateLimitedLog
from bridge.retry import delay
from bridge.room.data_tracks import DataTrackError, DataTrackFrame, LocalDataTrack
from bridge.room.delivery import Delivery
from bridge.room.errors import (
    DataPacketTooLargeError,
    NotConnectedError,
    RoomError,
    StateUpdateError,
)
from bridge.room.room import Room
from bridge.room.server_api import ServerApi
from bridge.router import RoomDelivery
from bridge.rules import Access, Participant, RouteRules
from bridge.runtime.latch import Latch
from bridge.runtime.room_link import RoomLink

log = logging.getLogger("roombus.deliver")
# Every delivery waiting on a failing room fails at once: one line per route, room, interval.
_limited = RateLimitedLog(log)


class RoomSink:
    """Delivers into the rooms the bridge joins."""

    def __init__(
        self,
        links: Mapping[str, RoomLink],
        server_api: ServerApi | None,
        latch: Latch | None = None,
    ) -> None:
        self.links = links
        self.server_api = server_api
        self.latch = latch  # keeps what latched routes delivered, for late joiners
        # Our data tracks by (room, track name), published on first use; the lock makes the
        # deliveries that need a track while it is being published wait for that publication.
        self._tracks: dict[tuple[str, str], LocalDataTrack] = {}
        self._publishing: dict[tuple[str, str], asyncio.Lock] = {}

    async def deliver(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None = None
    ) -> None:
        """Deliver `d`; wait while its room rejoins; `RejectedMessage` for a permanent refusal.

        With access rules (`rules.access`), a destination identity they deny rejects the whole
        delivery (reason ``denied``, also counted ``route.<name>.denied``): judged on the room's
        state when it is sent, so kind and attribute conditions see the participant as it is.
        """
        link = self.links.get(d.room)
        if link is None:
            raise RejectedMessage("unknown_room", f"room {d.room!r} is not one the bridge joins")
        # The link carries the bridge's counters: the end-to-end latency (from the bus's own
        # timestamp, else from when the bridge received the message) and the retries are
        # counted there.
        counters = link.counters
        attempt = 0
        while True:
            room = await link.ready()
            if rules is not None and rules.access is not None:
                denied = _denied(rules.access, room, d)
                if denied is not None:
                    counters.inc(f"route.{route}.denied")
                    raise RejectedMessage(
                        "denied", f"the route's allow/deny rules refuse destination {denied!r}"
                    )
            try:
                if await self._deliver_once(room, d, envelope):
                    self._delivered(link, route, d, envelope)
                else:
                    counters.inc(f"route.{route}.dropped.data_track_full")
                return
            except NotConnectedError:
                pass  # the room is rejoining: wait for it and try again
            except StateUpdateError as exc:
                raise RejectedMessage("refused", str(exc)) from exc
            except RoomError as exc:
                if not exc.retriable:
                    raise RejectedMessage("refused", str(exc)) from exc
                if attempt == 0:
                    counters.note_error(route, f"delivery into {d.room} failed, retrying: {exc}")
                    _limited.warning(
                        (route, d.room),
                        "%s: delivery into %s failed (%s); retrying",
                        route,
                        d.room,
                        exc,
                        extra={"route": route, "room": d.room},
                    )
            counters.inc(f"route.{route}.delivery_retries")
            await asyncio.sleep(delay(attempt))
            attempt += 1

    async def send(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None = None
    ) -> Delivery | None:
        """Queue reliable packet `d` into its room now; None (nothing sent): use `deliver`.

        The returned `Delivery` resolves once livekit-server has the packet, or fails
        (`NotConnectedError`) when the session was lost first: the caller then sends it again
        with `deliver`, and calls `confirmed` after a success. None for anything `deliver`
        must decide or wait for: another kind, a room not connected now, a packet too large,
        a destination the access rules deny.
        """
        if d.kind != "packet" or not d.reliable:
            return None
        link = self.links.get(d.room)
        room = None if link is None else link.room
        if room is None or not room.isconnected:
            return None
        access = None if rules is None else rules.access
        if access is not None and _denied(access, room, d) is not None:
            return None
        try:
            return await room.local_participant.publish_data_tracked(
                d.payload, destination_identities=d.destinations, topic=d.topic
            )
        except RoomError:
            return None  # raised before anything was sent (too large, not connected)

    def confirmed(self, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        """A packet `send` queued was acknowledged: what `deliver` does after a delivery."""
        link = self.links.get(d.room)
        if link is not None:
            self._delivered(link, route, d, envelope)

    def _delivered(self, link: RoomLink, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        if self.latch is not None:
            self.latch.keep(route, d, envelope)
        # The link carries the bridge's counters: the end-to-end latency from the bus's own
        # timestamp, else from when the bridge received the message.
        start = envelope.sent_at or envelope.received_at
        link.counters.observe(f"route.{route}.latency", max(0.0, time.time() - start))

    async def _deliver_once(self, room: Room, d: RoomDelivery, envelope: Envelope) -> bool:
        """Deliver `d` once; False: a data-track frame was dropped (lossy, not retried)."""
        lp = room.local_participant
        if d.kind == "data_track":
            assert d.name is not None
            track = await self._data_track(room, d.room, d.name)
            return track.try_push(DataTrackFrame(d.payload))
        if d.kind == "packet":
            try:
                # Returns once livekit-server acknowledged the packet (SCTP), so the bus
                # acknowledgement that follows never covers a packet still on this machine.
                await lp.publish_data(
                    d.payload,
                    reliable=d.reliable,
                    destination_identities=d.destinations,
                    topic=d.topic,
                    wait_delivered=True,
                )
                return True
            except DataPacketTooLargeError:
                if not d.oversize_as_stream:
                    raise RejectedMessage(
                        "too_large", f"{len(d.payload)} bytes exceed the data packet limit"
                    ) from None
            await lp.send_bytes(
                d.payload,
                name=d.topic or "message",
                topic=d.topic or "",
                destination_identities=d.destinations,
                attributes=_provenance(d, envelope),
                wait_delivered=True,
            )
        elif d.kind == "text_stream":
            try:
                text = d.payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RejectedMessage("invalid_utf8", str(exc)) from exc
            await lp.send_text(
                text,
                topic=d.topic or "",
                destination_identities=d.destinations,
                attributes={**_provenance(d, envelope), **d.attributes},
                wait_delivered=True,
            )
        elif d.kind == "byte_stream":
            await lp.send_bytes(
                d.payload,
                name=d.name or "message",
                mime_type=d.content_type or d.mime_type,
                topic=d.topic or "",
                destination_identities=d.destinations,
                attributes={**_provenance(d, envelope), **d.attributes},
                wait_delivered=True,
            )
        elif d.kind == "attribute":
            assert d.key is not None
            await lp.set_attributes({d.key: _text(d)})
        elif d.kind == "room_metadata":
            await self._api().update_room_metadata(d.room, _text(d))
        elif d.kind == "participant_attribute":
            assert d.identity is not None and d.key is not None
            await self._api().update_participant(d.room, d.identity, attributes={d.key: _text(d)})
        return True

    async def _data_track(self, room: Room, room_name: str, name: str) -> LocalDataTrack:
        """Our data track `name` in `room`: published now if it is not (any more).

        A publication ends with the session, so after a rejoin the next frame publishes the
        track again. Raises `NotConnectedError` (the room is rejoining: the caller waits) or
        `RejectedMessage` (the server refuses the name).
        """
        key = (room_name, name)
        track = self._tracks.get(key)
        if track is not None and track.is_published():
            return track
        lock = self._publishing.setdefault(key, asyncio.Lock())
        async with lock:
            track = self._tracks.get(key)
            if track is not None and track.is_published():
                return track  # published by the delivery we waited for
            try:
                track = await room.local_participant.publish_data_track(name)
            except DataTrackError as exc:
                if exc.retriable:
                    raise
                raise RejectedMessage("refused", str(exc)) from exc
            self._tracks[key] = track
            return track

    def _api(self) -> ServerApi:
        if self.server_api is None:
            raise RejectedMessage(
                "no_server_api", "this delivery needs livekit.api_key and api_secret"
            )
        return self.server_api


def _denied(access: Access, room: Room, d: RoomDelivery) -> str | None:
    """The first destination identity of `d` that `access` refuses, or None."""
    for identity in d.destinations or ((d.identity,) if d.identity else ()):
        info = room.participant_info(identity) if access.needs_state else None
        if not access.permits(Participant.of(identity, info)):
            return identity
    return None


def _provenance(d: RoomDelivery, envelope: Envelope) -> dict[str, str]:
    provenance = {"bus-source": envelope.source, "bus-topic": envelope.topic}
    if d.content_type:
        provenance[H_CONTENT_TYPE] = d.content_type
    return provenance


def _text(d: RoomDelivery) -> str:
    try:
        return d.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedMessage("invalid_utf8", str(exc)) from exc
