"""Room events as `RoomMessage`s for the room-to-bus routes that want them.

`RoomEvents` attaches to every `Room` a link creates and turns what happens there — data
packets, text and byte streams, frames of remote data tracks (subscribed as the tracks a
`data_track` route matches are published, and again after rejoins), attribute and metadata
changes, room metadata, participants joining and leaving, and (through `RoomActivity`) the
room's own events — into `RoomMessage`s with provenance headers, offered to each route's
`Outbox` whose filters they pass. Offering never blocks the room's event dispatch. At join the
state found in the room (participants, attributes, metadata) is announced the same way, and a
participant's published attribute state is cleared when it leaves (retained topic emptied,
Kafka tombstone).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from bridge.envelope import (
    H_KIND,
    H_PARTICIPANT,
    H_PARTICIPANT_SID,
    H_ROOM,
    H_ROOM_SID,
    H_STREAM_ID,
    H_TIMESTAMP,
    H_TOPIC,
    H_TRACK,
    H_TRACK_SID,
    H_USER_TIMESTAMP,
)
from bridge.room.data_tracks import DataTrackFrameReceived
from bridge.room.errors import RoomError
from bridge.room.events import DataReceived
from bridge.room.room import Room
from bridge.room.state import (
    ParticipantAttributesChanged,
    ParticipantConnected,
    ParticipantDisconnected,
    ParticipantMetadataChanged,
    RoomMetadataChanged,
)
from bridge.room.streams import ByteStreamReader, TextStreamReader
from bridge.room.types import Counters, DataPacketKind
from bridge.router import RoomMessage, ToBusRoute
from bridge.rules import Participant
from bridge.runtime.outbox import Outbox
from bridge.runtime.room_activity import RoomActivity
from bridge.runtime.room_link import RoomLink
from bridge.runtime.stream_fanout import ByteStreamFanout

log = logging.getLogger("roombus.room")

# Largest text a "whole" text-stream route buffers before giving up on that stream.
MAX_WHOLE_TEXT_BYTES = 16 * 1024 * 1024


class RoomEvents:
    """The room-to-bus side of one joined room (see the module docstring)."""

    def __init__(self, link: RoomLink, outboxes: Sequence[Outbox], counters: Counters) -> None:
        self.link = link
        self.name = link.name
        self.routes = [o for o in outboxes if o.route.wants_room(link.name)]
        self.counters = counters
        # (participant identity) -> attribute keys published, to clear them on leave.
        self.published_attributes: dict[str, set[str]] = {}
        # The room whose events we listen to, and for which route kinds (`attach`).
        self._listening: tuple[Room | None, set[str]] = (None, set())
        # What `events` routes publish: the room's, participants' and tracks' events.
        self.activity = RoomActivity(link.name, self._offer)
        # Forgets the data-track subscription filter given to the current room.
        self._forget_data_tracks: Callable[[], None] | None = None

    @property
    def room(self) -> Room | None:
        """The link's current room."""
        return self.link.room

    def attach(self, link: RoomLink, room: Room) -> None:
        """Subscribe to the events of `room` that some route wants."""
        self._listen(room)

    def set_routes(self, outboxes: Sequence[Outbox]) -> None:
        """Offer to `outboxes` from now on (a reload); listens for new kinds without a rejoin."""
        self.routes = [o for o in outboxes if o.route.wants_room(self.name)]
        room = self.room
        if room is not None:
            self._listen(room)
            if room.isconnected and self._wants("events"):
                self.activity.joined(room)  # a new events route: announce the room as it is
            if self._forget_data_tracks is not None:
                self._subscribe_data_tracks(room)  # the new routes may want more tracks

    def _wants(self, kind: str) -> bool:
        return any(o.route.kind == kind for o in self.routes)

    def _listen(self, room: Room) -> None:
        listening, done = self._listening
        if listening is not room:
            done = set()  # a new connection: nothing subscribed on it yet
        wanted = {o.route.kind for o in self.routes}
        kinds = wanted - done
        # presence and attributes share their events
        if "presence" in done or "attributes" in done:
            kinds -= {"presence", "attributes"}
        self._listening = (room, done | wanted)
        if "packet" in kinds:
            room.on(DataReceived, self._on_data)
        if "text_stream" in kinds:
            room.set_fallback_text_stream_handler(self._on_text_stream)
        if "byte_stream" in kinds:
            room.set_fallback_byte_stream_handler(self._on_byte_stream)
        if kinds & {"attributes", "presence"}:
            room.on(ParticipantAttributesChanged, self._on_attributes)
            room.on(ParticipantConnected, self._on_joined)
            room.on(ParticipantDisconnected, self._on_left)
        if "metadata" in kinds:
            room.on(ParticipantMetadataChanged, self._on_metadata)
        if "room_metadata" in kinds:
            room.on(RoomMetadataChanged, self._on_room_metadata)
        if "events" in kinds:
            self.activity.attach(room)
        if "data_track" in kinds:
            room.on(DataTrackFrameReceived, self._on_data_track)
            self._subscribe_data_tracks(room)

    def _subscribe_data_tracks(self, room: Room) -> None:
        """Subscribe to the remote data tracks some `data_track` route wants (now and later)."""
        if self._forget_data_tracks is not None:
            self._forget_data_tracks()
        self._forget_data_tracks = room.subscribe_data_tracks(self._wants_data_track)

    def _wants_data_track(self, identity: str, name: str) -> bool:
        probe = RoomMessage(
            "data_track", None, {"room": self.name, "participant": identity, "track": name}, {}
        )
        return any(o.route.kind == "data_track" and o.route.wants(probe) for o in self.routes)

    async def joined(self, link: RoomLink, room: Room) -> None:
        """Announce the state found at join."""
        if self._wants("events"):
            self.activity.joined(room)
        await self._announce_initial_state(room)

    def _values(self, room: Room, identity: str, sid: str, kind: str) -> dict[str, str]:
        return {
            "room": self.name,
            "room_sid": room.sid,
            "participant": identity,
            "participant_sid": sid,
            "kind": kind,
        }

    def _headers(self, values: Mapping[str, str], topic: str | None = None) -> dict[str, str]:
        headers = {
            H_ROOM: values["room"],
            H_ROOM_SID: values.get("room_sid", ""),
            H_KIND: values["kind"],
            H_TIMESTAMP: str(int(time.time() * 1000)),
        }
        if values.get("participant"):
            headers[H_PARTICIPANT] = values["participant"]
            headers[H_PARTICIPANT_SID] = values.get("participant_sid", "")
        if topic:
            headers[H_TOPIC] = topic
        return headers

    def _offer(self, message: RoomMessage, info: object | None = None) -> None:
        for worker in self.routes:
            route = worker.route
            if (
                route.kind == message.kind
                and route.wants(message)
                and (route.rules is None or self._passes(route, message, info))
            ):
                worker.offer(message)

    def _passes(self, route: ToBusRoute, message: RoomMessage, info: object | None = None) -> bool:
        """Whether `message` passes the route's access rules and `where` (counted when not).

        `info`: the sender's ParticipantInfo when the room's state no longer has it (left).
        """
        rules = route.rules
        assert rules is not None
        # Access rules judge participants: the room's own events (started, finished) have none.
        about_room = message.kind == "events" and not message.values.get("participant")
        if rules.access is not None and not about_room:
            identity = message.values.get("participant", "")
            if info is None and rules.access.needs_state and self.room is not None:
                info = self.room.participant_info(identity)
            if not rules.permits(Participant.of(identity, info)):
                self.counters.inc(f"route.{route.name}.denied")
                return False
        if rules.where is not None:
            why = rules.filtered(route.values(message), message.headers, message.payload)
            if why is not None:
                self.counters.inc(f"route.{route.name}.filtered")
                if why != "false":
                    self.counters.note_error(route.name, f"filtered: {why}")
                return False
        return True

    async def _on_data(self, event: DataReceived) -> None:
        packet = event.packet
        room = self.room
        if room is None:
            return
        reliability = "reliable" if packet.kind == DataPacketKind.KIND_RELIABLE else "lossy"
        values = self._values(
            room, packet.participant_identity, packet.participant_sid, f"packet-{reliability}"
        )
        values["topic"] = packet.topic or ""
        self._offer(
            RoomMessage(
                kind="packet",
                payload=packet.data,
                values=values,
                headers=self._headers(values, packet.topic),
            )
        )

    async def _on_data_track(self, event: DataTrackFrameReceived) -> None:
        room = self.room
        if room is None:
            return
        identity = event.publisher_identity
        values = self._values(room, identity, self._sender_sid(identity), "data-track")
        values.update(track=event.track_name, track_sid=event.track_sid)
        headers = self._headers(values) | {H_TRACK: event.track_name, H_TRACK_SID: event.track_sid}
        if event.frame.user_timestamp is not None:
            headers[H_USER_TIMESTAMP] = str(event.frame.user_timestamp)
        self._offer(RoomMessage("data_track", event.frame.payload, values, headers))

    def _sender_sid(self, identity: str) -> str:
        return self.link.sender_sid(identity)

    async def _on_text_stream(self, reader: TextStreamReader, identity: str) -> None:
        room = self.room
        if room is None:
            return
        info = reader.info
        sid = info.sender_sid or self._sender_sid(identity)
        values = self._values(room, identity, sid, "text-stream")
        values.update(topic=info.topic, stream_id=info.stream_id)
        base = self._headers(values, info.topic) | {H_STREAM_ID: info.stream_id}
        base |= {f"lk-attr-{k}": v for k, v in info.attributes.items()}
        probe = RoomMessage("text_stream", b"", values, base)
        routes = [w for w in self.routes if w.route.kind == "text_stream" and w.route.wants(probe)]
        routes = [w for w in routes if w.route.rules is None or self._passes(w.route, probe)]
        if not routes:
            return
        incremental = [w for w in routes if w.route.source.text_stream.mode == "incremental"]  # type: ignore[union-attr]
        whole = [w for w in routes if w not in incremental]
        parts: list[str] = []
        size = 0
        index = 0
        try:
            async for piece in reader:
                for worker in incremental:
                    headers = base | {"lk-chunk-index": str(index), "lk-final": "false"}
                    worker.offer(
                        RoomMessage(
                            "text_stream",
                            piece.encode(),
                            values,
                            headers,
                            "text/plain; charset=utf-8",
                            info.stream_id,
                        )
                    )
                index += 1
                if whole:
                    size += len(piece.encode())
                    if size > MAX_WHOLE_TEXT_BYTES:
                        self.counters.inc("rooms.text_stream_too_large")
                        log.warning(
                            "room %s: text stream %s over %d bytes: not forwarded whole",
                            self.name,
                            info.stream_id,
                            MAX_WHOLE_TEXT_BYTES,
                        )
                        whole = []
                        parts = []
                    parts.append(piece)
        except RoomError as exc:
            self.counters.inc("rooms.stream_aborted")
            log.warning(
                "room %s: text stream %s from %s aborted: %s",
                self.name,
                info.stream_id,
                identity,
                exc,
            )
            return
        for worker in incremental:
            headers = base | {"lk-chunk-index": str(index), "lk-final": "true"}
            worker.offer(
                RoomMessage(
                    "text_stream", b"", values, headers, "text/plain; charset=utf-8", info.stream_id
                )
            )
        text = "".join(parts).encode()
        for worker in whole:
            worker.offer(
                RoomMessage("text_stream", text, values, base, "text/plain; charset=utf-8")
            )

    async def _on_byte_stream(self, reader: ByteStreamReader, identity: str) -> None:
        room = self.room
        if room is None:
            return
        info = reader.info
        sid = info.sender_sid or self._sender_sid(identity)
        values = self._values(room, identity, sid, "byte-stream")
        values.update(
            topic=info.topic, stream_id=info.stream_id, name=info.name, mime_type=info.mime_type
        )
        base = self._headers(values, info.topic) | {
            H_STREAM_ID: info.stream_id,
            "lk-stream-name": info.name,
        }
        if info.total_size is not None:
            base["lk-stream-size"] = str(info.total_size)
        base |= {f"lk-attr-{k}": v for k, v in info.attributes.items()}
        probe = RoomMessage("byte_stream", b"", values, base)
        routes = [w for w in self.routes if w.route.kind == "byte_stream" and w.route.wants(probe)]
        routes = [w for w in routes if w.route.rules is None or self._passes(w.route, probe)]
        if not routes:
            return
        await ByteStreamFanout(
            self.name, self.counters, routes, values, base, info.mime_type, info.stream_id
        ).run(reader, info.total_size)

    async def _on_attributes(self, event: ParticipantAttributesChanged) -> None:
        room = self.room
        if room is None or event.is_local:
            return
        values0 = self._values(room, event.identity, self._sender_sid(event.identity), "attributes")
        keys = self.published_attributes.setdefault(event.identity, set())
        for key, value in event.changed.items():
            values = values0 | {"key": key}
            payload = value.encode() if value != "" else None
            if payload is None:
                keys.discard(key)
            else:
                keys.add(key)
            self._offer(
                RoomMessage(
                    "attributes",
                    payload,
                    values,
                    self._headers(values) | {"lk-attribute": key},
                    "text/plain; charset=utf-8",
                    f"{self.name}/{event.identity}/{key}",
                )
            )

    def _presence(
        self, identity: str, sid: str, name: str, event: str
    ) -> tuple[dict[str, str], bytes]:
        assert self.room is not None
        values = self._values(self.room, identity, sid, "presence") | {"event": event}
        body = json.dumps(
            {"event": event, "identity": identity, "sid": sid, "name": name, "room": self.name}
        ).encode()
        return values, body

    async def _on_joined(self, event: ParticipantConnected) -> None:
        if self.room is None:
            return
        info = event.info
        values, body = self._presence(info.identity, info.sid, info.name, "joined")
        self._offer(
            RoomMessage(
                "presence",
                body,
                values,
                self._headers(values),
                "application/json",
                f"{self.name}/{info.identity}",
            )
        )
        changed = dict(info.attributes)
        if changed:
            await self._on_attributes(
                ParticipantAttributesChanged(info.identity, changed, changed, False)
            )

    async def _on_left(self, event: ParticipantDisconnected) -> None:
        if self.room is None:
            return
        info = event.info
        values, body = self._presence(info.identity, info.sid, info.name, "left")
        key = f"{self.name}/{info.identity}"
        # A retained or compacted presence topic is cleared (payload None); others get the event.
        for worker in self.routes:
            if worker.route.kind != "presence":
                continue
            target = worker.route.target
            payload = None if (target.retain or target.bus == "kafka") else body
            message = RoomMessage(
                "presence", payload, values, self._headers(values), "application/json", key
            )
            if worker.route.wants(message) and (
                worker.route.rules is None or self._passes(worker.route, message, info)
            ):
                worker.offer(message)
        # Clear the attribute state we published for this participant.
        keys = self.published_attributes.pop(info.identity, set())
        values0 = self._values(self.room, info.identity, info.sid, "attributes")
        for attr in sorted(keys):
            values = values0 | {"key": attr}
            self._offer(
                RoomMessage(
                    "attributes",
                    None,
                    values,
                    self._headers(values) | {"lk-attribute": attr},
                    None,
                    f"{self.name}/{info.identity}/{attr}",
                ),
                info,
            )

    async def _on_metadata(self, event: ParticipantMetadataChanged) -> None:
        if self.room is None or event.is_local:
            return
        values = self._values(
            self.room, event.identity, self._sender_sid(event.identity), "metadata"
        )
        self._offer(
            RoomMessage(
                "metadata",
                event.new.encode(),
                values,
                self._headers(values),
                None,
                f"{self.name}/{event.identity}",
            )
        )

    async def _on_room_metadata(self, event: RoomMetadataChanged) -> None:
        if self.room is None:
            return
        values = self._values(self.room, "", "", "room-metadata")
        self._offer(
            RoomMessage(
                "room_metadata", event.new.encode(), values, self._headers(values), None, self.name
            )
        )

    async def _announce_initial_state(self, room: Room) -> None:
        """Publish the state found at join: present participants, their attributes, metadata."""
        for identity, participant in room.remote_participants.items():
            info = room.participant_info(identity)
            if info is not None:
                await self._on_joined(ParticipantConnected(info))
            if participant.metadata:
                await self._on_metadata(
                    ParticipantMetadataChanged(identity, "", participant.metadata, False)
                )
        if room.metadata:
            await self._on_room_metadata(RoomMetadataChanged("", room.metadata))
