"""Room events as data: what an `events` route publishes about one room, in order.

`RoomActivity` keeps the bridge's own view of a room — which room (by sid) it announced
started, which participants joined and which of their tracks are published — and turns every
change of that view into one JSON `RoomMessage` (kind ``events``), offered in the order the
room's events arrive, keyed by the room name so one room's events stay in order on the bus:

* ``room_started`` when the bridge first joins a room (at the room's creation time when the
  server gives it). A rejoin after a lost session is the same room unless its sid changed;
  then the old room is finished (its participants left) and the new one started.
* ``room_finished`` when the server closes the room under the bridge (its `leave` says
  ROOM_DELETED or ROOM_CLOSED), after every participant still in it left. Not when the bridge
  stops or loses the room: a restarted bridge announces the room started again (same
  ``room_sid``).
* ``participant_joined`` / ``participant_left`` and ``track_published`` /
  ``track_unpublished`` from the room's state events (`bridge.room.state`): a participant that
  leaves with tracks has them unpublished first.

The view makes the stream consistent whatever the timing: the state found at a join is
diffed against it (`diff_participants`), so participants present are announced once, those
that left while the bridge was away are announced left, and an event already reflected (a
state event queued before the join's snapshot was read) changes nothing and is not repeated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from livekit.protocol import models

from bridge.envelope import (
    H_KIND,
    H_PARTICIPANT,
    H_PARTICIPANT_SID,
    H_ROOM,
    H_ROOM_SID,
    H_TIMESTAMP,
)
from bridge.room.events import Disconnected
from bridge.room.room import Room
from bridge.room.state import (
    ParticipantConnected,
    ParticipantDisconnected,
    TrackPublished,
    TrackUnpublished,
    departure,
    diff_participants,
)
from bridge.router import RoomMessage
from bridge.rules import PARTICIPANT_KINDS

KIND = "events"
H_KIND_VALUE = "room-event"
# The server reasons that mean the room itself is over (not just our session).
_ROOM_OVER = frozenset({models.DisconnectReason.ROOM_DELETED, models.DisconnectReason.ROOM_CLOSED})

# (message, the participant's record when the room's state may no longer have it)
Offer = Callable[[RoomMessage, models.ParticipantInfo | None], None]


@dataclass
class _Seen:
    """A participant as announced: its latest record, and the tracks announced published."""

    info: models.ParticipantInfo
    tracks: dict[str, models.TrackInfo] = field(default_factory=dict)

    def as_info(self) -> models.ParticipantInfo:
        """The record with exactly the announced tracks (to diff against the room's state)."""
        out = models.ParticipantInfo()
        out.CopyFrom(self.info)
        del out.tracks[:]
        out.tracks.extend(self.tracks.values())
        return out


def participant_kind(info: models.ParticipantInfo) -> str:
    """LiveKit's participant kind by name: standard, agent, sip, egress, ingress, ..."""
    return PARTICIPANT_KINDS.get(int(info.kind), f"kind-{int(info.kind)}")


def _enum_name(enum: object, value: int) -> str:
    try:
        return str(enum.Name(value)).lower()  # type: ignore[attr-defined]
    except ValueError:
        return str(value)


def _participant_json(info: models.ParticipantInfo) -> dict[str, object]:
    return {
        "identity": info.identity,
        "sid": info.sid,
        "name": info.name,
        "kind": participant_kind(info),
    }


def _track_json(track: models.TrackInfo) -> dict[str, object]:
    return {
        "sid": track.sid,
        "name": track.name,
        "type": _enum_name(models.TrackType, track.type),
        "source": _enum_name(models.TrackSource, track.source),
        "muted": track.muted,
    }


def _now_ms() -> int:
    return int(time.time() * 1000)


class RoomActivity:
    """The `events` side of one room, across its sessions (see the module docstring)."""

    def __init__(self, name: str, offer: Offer) -> None:
        self.name = name
        self._offer = offer
        self._sid: str | None = None  # the room announced started and not finished
        self._seen: dict[str, _Seen] = {}  # by identity

    def attach(self, room: Room) -> None:
        """Follow the events of `room` (a new session of this room, before it connects)."""

        def on_state(event: object) -> None:
            self._current(room)
            self._apply(event)

        for event_type in (
            ParticipantConnected,
            ParticipantDisconnected,
            TrackPublished,
            TrackUnpublished,
        ):
            room.on(event_type, on_state)
        room.on(Disconnected, self._on_disconnected)

    def joined(self, room: Room) -> None:
        """`room` is joined: announce it (if new) and bring the view up to its state.

        Idempotent: also what a reload that adds an `events` route calls.
        """
        self._current(room)
        self._sync(room)

    # ----------------------------------------------------------------------------- view

    def _current(self, room: Room) -> None:
        """Make `room`'s sid the announced room: finish another one first, start it."""
        sid = room.sid
        if self._sid == sid or not sid:
            return
        if self._sid is not None:
            # The room was deleted and made again while we were away: a new room.
            self._finish(models.DisconnectReason.UNKNOWN_REASON)
        self._sid = sid
        self._emit("room_started", time_ms=room.created_at_ms or _now_ms())
        self._sync(room)

    def _sync(self, room: Room) -> None:
        held = {identity: seen.as_info() for identity, seen in self._seen.items()}
        current = {
            identity: info
            for identity in room.remote_identities()
            if (info := room.participant_info(identity)) is not None
        }
        for event in diff_participants(held, current):
            self._apply(event)

    def _finish(self, reason: int) -> None:
        """Everyone still seen leaves (for `reason`), then the announced room finishes."""
        for seen in list(self._seen.values()):
            for event in departure(seen.as_info(), reason):
                self._apply(event)
        self._emit("room_finished", reason=models.DisconnectReason.Name(reason))
        self._sid = None

    def _on_disconnected(self, event: Disconnected) -> None:
        # Only the server closing the room finishes it: a session ending (the bridge stopping,
        # removed, giving up) leaves the view as it is for the next session to diff against.
        if event.server_reason in _ROOM_OVER and self._sid is not None:
            self._finish(event.server_reason)

    def _apply(self, event: object) -> None:
        """Change the view by `event` and announce it, unless the view already reflects it."""
        if isinstance(event, ParticipantConnected):
            info = event.info
            seen = self._seen.get(info.identity)
            if seen is not None and seen.info.sid == info.sid:
                seen.info = info
                return
            if seen is not None:  # a new session of an identity we hold: the old one is over
                for ev in departure(seen.as_info(), models.DisconnectReason.DUPLICATE_IDENTITY):
                    self._apply(ev)
            self._seen[info.identity] = _Seen(info)
            joined = info.joined_at_ms or info.joined_at * 1000
            self._emit("participant_joined", info, time_ms=joined or _now_ms())
        elif isinstance(event, ParticipantDisconnected):
            info = event.info
            seen = self._seen.get(info.identity)
            if seen is None or seen.info.sid != info.sid:
                return
            for track in list(seen.tracks.values()):  # left implies unpublished: say so first
                self._apply(TrackUnpublished(info, track))
            del self._seen[info.identity]
            reason = models.DisconnectReason.Name(event.reason)
            self._emit("participant_left", info, held=info, reason=reason)
        elif isinstance(event, TrackPublished):
            seen = self._seen.get(event.info.identity)
            if seen is None or seen.info.sid != event.info.sid or event.track.sid in seen.tracks:
                return
            seen.info = event.info
            seen.tracks[event.track.sid] = event.track
            self._emit("track_published", event.info, event.track)
        elif isinstance(event, TrackUnpublished):
            seen = self._seen.get(event.info.identity)
            if seen is None or seen.info.sid != event.info.sid:
                return
            if seen.tracks.pop(event.track.sid, None) is None:
                return
            self._emit("track_unpublished", event.info, event.track, held=event.info)

    # ----------------------------------------------------------------------------- messages

    def _emit(
        self,
        event: str,
        info: models.ParticipantInfo | None = None,
        track: models.TrackInfo | None = None,
        *,
        time_ms: int | None = None,
        reason: str | None = None,
        held: models.ParticipantInfo | None = None,
    ) -> None:
        sid = self._sid or ""
        now = _now_ms()
        body: dict[str, object] = {
            "event": event,
            "room": self.name,
            "room_sid": sid,
            "time": time_ms if time_ms is not None else now,
        }
        values = {
            "room": self.name,
            "room_sid": sid,
            "participant": "",
            "participant_sid": "",
            "kind": H_KIND_VALUE,
            "event": event,
            "participant_kind": "",
            "track_sid": "",
        }
        headers = {H_ROOM: self.name, H_ROOM_SID: sid, H_KIND: H_KIND_VALUE, H_TIMESTAMP: str(now)}
        if info is not None:
            body["participant"] = _participant_json(info)
            values.update(
                participant=info.identity,
                participant_sid=info.sid,
                participant_kind=participant_kind(info),
            )
            headers |= {H_PARTICIPANT: info.identity, H_PARTICIPANT_SID: info.sid}
        if track is not None:
            body["track"] = _track_json(track)
            values["track_sid"] = track.sid
        if reason is not None:
            body["reason"] = reason
        message = RoomMessage(
            KIND,
            json.dumps(body, separators=(",", ":")).encode(),
            values,
            headers,
            "application/json",
            self.name,
        )
        self._offer(message, held)
