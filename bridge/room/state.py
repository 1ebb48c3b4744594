"""Room and participant state, kept from the server's signalling, and the change events it yields.

Pure logic, no I/O. The connection feeds `RoomState` the `JoinResponse` of every (re)join and
every `update` (ParticipantUpdate) and `room_update` signal message; each call returns the typed
change events (named as in the official SDKs) that the room then publishes to subscribers.

Rules (livekit-protocol.md §5.2, §5.3):

* Updates carry full `ParticipantInfo` records with a per-participant (per sid) `version`; an
  update older than the one held for the same sid is ignored (counted `state.stale_update`).
* `state == DISCONNECTED` removes the participant. It is looked up by sid, because old servers
  sent disconnect updates with an empty identity.
* A new sid for an identity already held means that participant rejoined under the same
  identity: the old session is reported disconnected and the new one connected. Sids that left
  are remembered (boundedly), so a late update about an old session cannot bring it back.
* Our own `ParticipantInfo` (same sid as ours) updates `local` and yields events with
  ``is_local=True``.
* A remote participant's published tracks are the `tracks` of its successive records: a track
  sid that appears is `TrackPublished`, one that goes is `TrackUnpublished` (as the SDKs do).
  A participant that arrives with tracks is connected first, then each track published; one
  that leaves with tracks has each unpublished first, then is disconnected — so every
  published track is unpublished once, and never outlives its participant. (The bridge itself
  publishes no media: there are no local track events.)
* On a rejoin after a reconnect, `reset` returns the difference between what was held before and
  the new `JoinResponse`, so subscribers re-sync with what happened during the outage.

Protobuf messages handed to `RoomState` become its property: callers must not mutate them, nor
the messages it returns or puts into events.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from livekit.protocol import models, rtc

from bridge.room.types import Counters

logger = logging.getLogger("roombus.room.state")

# How many departed participant sids are remembered to reject late updates about them.
_DEPARTED_SIDS_KEPT = 1024

_DISCONNECTED = models.ParticipantInfo.State.DISCONNECTED


@dataclass(frozen=True, slots=True)
class ParticipantConnected:
    """A remote participant joined the room (or was found in it after a rejoin)."""

    info: models.ParticipantInfo


@dataclass(frozen=True, slots=True)
class ParticipantDisconnected:
    """A remote participant left the room.

    `info` is the last state held for it; `reason` is a `models.DisconnectReason` value
    (UNKNOWN_REASON when it left while we were reconnecting, DUPLICATE_IDENTITY when a new
    session of the same identity replaced it).
    """

    info: models.ParticipantInfo
    reason: int


@dataclass(frozen=True, slots=True)
class TrackPublished:
    """A remote participant published a track (or arrived, or was found after a rejoin, with it).

    `info` is the participant's record that has the track; `track` is the track as published.
    """

    info: models.ParticipantInfo
    track: models.TrackInfo


@dataclass(frozen=True, slots=True)
class TrackUnpublished:
    """A remote participant's track is gone: unpublished, or its participant left.

    `info` is the participant's record as held (the latest, or the last before it left);
    `track` is the track as it was last held.
    """

    info: models.ParticipantInfo
    track: models.TrackInfo


@dataclass(frozen=True, slots=True)
class ParticipantAttributesChanged:
    """Attributes of a participant changed.

    `changed` holds every key whose value differs, with its new value; a deleted key appears
    with the value ``""`` (as the JS SDK's ``diffAttributes``). `attributes` is the full new map.
    """

    identity: str
    changed: dict[str, str]
    attributes: dict[str, str]
    is_local: bool


@dataclass(frozen=True, slots=True)
class ParticipantMetadataChanged:
    """The metadata string of a participant changed."""

    identity: str
    old: str
    new: str
    is_local: bool


@dataclass(frozen=True, slots=True)
class ParticipantNameChanged:
    """The display name of a participant changed."""

    identity: str
    old: str
    new: str
    is_local: bool


@dataclass(frozen=True, slots=True)
class RoomMetadataChanged:
    """The room's metadata string changed."""

    old: str
    new: str


RoomEvent = (
    ParticipantConnected
    | ParticipantDisconnected
    | TrackPublished
    | TrackUnpublished
    | ParticipantAttributesChanged
    | ParticipantMetadataChanged
    | ParticipantNameChanged
    | RoomMetadataChanged
)


def diff_attributes(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
    """Every key whose value differs between `old` and `new`, with its new value.

    Keys present in `old` only (deleted) map to ``""``, so applying the result to `old` (setting
    each key, deleting those set to ``""``) gives `new` whenever `new` holds no empty values.
    """
    changed: dict[str, str] = {}
    for key in old.keys() | new.keys():
        value = new.get(key, "")
        if old.get(key, "") != value or (key in old) != (key in new):
            changed[key] = value
    return changed


def diff_tracks(old: models.ParticipantInfo, new: models.ParticipantInfo) -> list[RoomEvent]:
    """Tracks of `old` that `new` lacks (unpublished, first), then those new in `new` (by sid)."""
    old_sids = {t.sid for t in old.tracks}
    new_sids = {t.sid for t in new.tracks}
    events: list[RoomEvent] = [
        TrackUnpublished(new, t) for t in old.tracks if t.sid not in new_sids
    ]
    events.extend(TrackPublished(new, t) for t in new.tracks if t.sid not in old_sids)
    return events


def arrival(info: models.ParticipantInfo) -> list[RoomEvent]:
    """A remote participant connected: `ParticipantConnected`, then each of its tracks published."""
    return [ParticipantConnected(info), *(TrackPublished(info, t) for t in info.tracks)]


def departure(info: models.ParticipantInfo, reason: int) -> list[RoomEvent]:
    """A remote participant left: each of its tracks unpublished, then `ParticipantDisconnected`."""
    return [
        *(TrackUnpublished(info, t) for t in info.tracks),
        ParticipantDisconnected(info, reason),
    ]


def diff_participants(
    old: Mapping[str, models.ParticipantInfo], new: Mapping[str, models.ParticipantInfo]
) -> list[RoomEvent]:
    """The events that turn remote participants `old` into `new` (both by identity).

    Departures first (gone: reason UNKNOWN_REASON; the same identity under a new sid:
    DUPLICATE_IDENTITY), then arrivals (the new sessions, then new identities), then the changes
    of those still there, tracks included.
    """
    gone: list[RoomEvent] = []
    arrived: list[RoomEvent] = []
    changed: list[RoomEvent] = []
    for identity, held in old.items():
        now = new.get(identity)
        if now is None:
            gone.extend(departure(held, models.DisconnectReason.UNKNOWN_REASON))
        elif now.sid != held.sid:
            gone.extend(departure(held, models.DisconnectReason.DUPLICATE_IDENTITY))
            arrived.extend(arrival(now))
        else:
            changed.extend(_changes(held, now, is_local=False))
    for identity, now in new.items():
        if identity not in old:
            arrived.extend(arrival(now))
    return gone + arrived + changed


def _changes(
    old: models.ParticipantInfo, new: models.ParticipantInfo, *, is_local: bool
) -> list[RoomEvent]:
    """Metadata, name, attribute and (remote) track events between two states of a participant."""
    events: list[RoomEvent] = []
    identity = new.identity or old.identity
    if old.metadata != new.metadata:
        events.append(ParticipantMetadataChanged(identity, old.metadata, new.metadata, is_local))
    if old.name != new.name:
        events.append(ParticipantNameChanged(identity, old.name, new.name, is_local))
    changed = diff_attributes(old.attributes, new.attributes)
    if changed:
        events.append(
            ParticipantAttributesChanged(identity, changed, dict(new.attributes), is_local)
        )
    if not is_local:
        events.extend(diff_tracks(old, new))
    return events


def _room_version(room: models.Room) -> tuple[int, int] | None:
    if not room.HasField("version"):
        return None
    return (room.version.unix_micro, room.version.ticks)


class RoomState:
    """The room, our own participant and the remote participants, as the server reported them."""

    def __init__(self, *, counters: Counters | None = None) -> None:
        """Create an empty state (no room joined yet).

        Args:
            counters: where ignored input is counted; a private `Counters` if None.
        """
        self._counters = counters if counters is not None else Counters()
        self._room = models.Room()
        self._local = models.ParticipantInfo()
        self._joined = False
        self._remote: dict[str, models.ParticipantInfo] = {}  # by identity
        self._sid_identity: dict[str, str] = {}  # remote sid -> identity
        self._departed: OrderedDict[str, None] = OrderedDict()

    # ----------------------------------------------------------------------------- queries

    @property
    def room(self) -> models.Room:
        """The latest Room record (empty before the first join)."""
        return self._room

    @property
    def local(self) -> models.ParticipantInfo:
        """Our own latest ParticipantInfo (empty before the first join)."""
        return self._local

    @property
    def remote_participants(self) -> Mapping[str, models.ParticipantInfo]:
        """Remote participants currently in the room, by identity (a read-only live view)."""
        return MappingProxyType(self._remote)

    def participant_by_sid(self, sid: str) -> models.ParticipantInfo | None:
        """The participant (remote, or ourselves) with session id `sid`, None if unknown."""
        if not sid:
            return None
        if sid == self._local.sid:
            return self._local
        identity = self._sid_identity.get(sid)
        return None if identity is None else self._remote.get(identity)

    # ----------------------------------------------------------------------------- updates

    def reset(self, join: rtc.JoinResponse) -> list[RoomEvent]:
        """Install the state of a JoinResponse: on the first join and on every rejoin.

        Returns:
            Nothing on the first join. On a rejoin, the changes since the state held before:
            room metadata, our own name/metadata/attributes, then `diff_participants`:
            participants that left during the outage (disconnected, reason UNKNOWN_REASON),
            participants that rejoined with a new sid (disconnected then connected), new
            participants, and changed ones — with their tracks unpublished and published.
        """
        old_room, old_local, old_remote = self._room, self._local, self._remote
        was_joined = self._joined

        self._room = join.room
        self._local = join.participant
        self._joined = True
        self._remote = {}
        self._sid_identity = {}
        for info in join.other_participants:
            if not info.identity or not info.sid or info.state == _DISCONNECTED:
                self._counters.inc("state.malformed_update")
                logger.debug("join response: ignoring participant %r/%r", info.identity, info.sid)
                continue
            if info.identity == self._local.identity or info.sid == self._local.sid:
                # An old session of ours, still listed: never a peer (as in `_apply_remote`).
                self._counters.inc("state.stale_update")
                continue
            if info.identity in self._remote or info.sid in self._sid_identity:
                # One record per identity and per sid (found by fuzzing); the first one wins.
                self._counters.inc("state.malformed_update")
                continue
            self._remote[info.identity] = info
            self._sid_identity[info.sid] = info.identity
        if old_local.sid and old_local.sid != self._local.sid:
            self._forget(old_local.sid)

        if not was_joined:
            return []

        events: list[RoomEvent] = []
        if old_room.metadata != self._room.metadata:
            events.append(RoomMetadataChanged(old_room.metadata, self._room.metadata))
        events.extend(_changes(old_local, self._local, is_local=True))
        for identity, old in old_remote.items():
            new = self._remote.get(identity)
            if new is None or new.sid != old.sid:
                self._forget(old.sid)
        return events + diff_participants(old_remote, self._remote)

    def apply_participant_update(self, infos: Sequence[models.ParticipantInfo]) -> list[RoomEvent]:
        """Apply the ParticipantInfo records of one `update` signal message, in order."""
        events: list[RoomEvent] = []
        for info in infos:
            if not info.sid:
                self._counters.inc("state.malformed_update")
                logger.debug("participant update without sid (identity %r) ignored", info.identity)
            elif self._local.sid and info.sid == self._local.sid:
                events.extend(self._apply_local(info))
            elif info.state == _DISCONNECTED:
                events.extend(self._apply_disconnect(info))
            else:
                events.extend(self._apply_remote(info))
        return events

    def apply_room_update(self, room: models.Room) -> list[RoomEvent]:
        """Apply the Room record of a `room_update` signal message."""
        held, incoming = _room_version(self._room), _room_version(room)
        if held is not None and incoming is not None and incoming < held:
            self._counters.inc("state.stale_update")
            logger.debug("room update version %s older than held %s, ignored", incoming, held)
            return []
        old = self._room.metadata
        self._room = room
        return [RoomMetadataChanged(old, room.metadata)] if old != room.metadata else []

    # ----------------------------------------------------------------------------- internals

    def _stale(self, held: models.ParticipantInfo, info: models.ParticipantInfo) -> bool:
        if info.version < held.version:
            self._counters.inc("state.stale_update")
            logger.debug(
                "update for %s version %d older than held %d, ignored",
                info.sid,
                info.version,
                held.version,
            )
            return True
        return False

    def _apply_local(self, info: models.ParticipantInfo) -> list[RoomEvent]:
        if self._stale(self._local, info):
            return []
        if info.state == _DISCONNECTED:
            # The server says our own session is over; the connection learns that from `leave`
            # and rejoins or closes, so the state keeps the last good record.
            return []
        old, self._local = self._local, info
        return _changes(old, info, is_local=True)

    def _apply_disconnect(self, info: models.ParticipantInfo) -> list[RoomEvent]:
        identity = self._sid_identity.get(info.sid)
        if identity is None:
            if info.sid not in self._departed:
                # A participant we never saw (a session replaced before we learnt of it is
                # remembered in `_departed` and not counted).
                self._counters.inc("state.unknown_disconnect")
                logger.debug("disconnect for unknown sid %s (%r) ignored", info.sid, info.identity)
                self._forget(info.sid)
            return []
        held = self._remote[identity]
        if self._stale(held, info):
            return []
        del self._remote[identity]
        del self._sid_identity[info.sid]
        self._forget(info.sid)
        return departure(held, info.disconnect_reason)

    def _apply_remote(self, info: models.ParticipantInfo) -> list[RoomEvent]:
        if not info.identity:
            self._counters.inc("state.malformed_update")
            logger.debug("participant update for %s without identity ignored", info.sid)
            return []
        if info.sid in self._departed:
            self._counters.inc("state.stale_update")
            logger.debug("update for departed participant %s (%r) ignored", info.sid, info.identity)
            return []
        if info.identity == self._local.identity:
            # Our identity under another sid: a previous session of ours, never a peer.
            self._counters.inc("state.stale_update")
            logger.debug("update for an old session of ours (%s) ignored", info.sid)
            return []
        owner = self._sid_identity.get(info.sid)
        if owner is not None and owner != info.identity:
            # One sid under two identities: the server never sends that (found by fuzzing);
            # the first record stays.
            self._counters.inc("state.malformed_update")
            logger.debug(
                "update gives sid %s to %r, held by %r: ignored", info.sid, info.identity, owner
            )
            return []
        held = self._remote.get(info.identity)
        if held is None:
            self._install(info)
            return arrival(info)
        if held.sid == info.sid:
            if self._stale(held, info):
                return []
            self._remote[info.identity] = info
            return _changes(held, info, is_local=False)
        # The same identity under a new sid: the participant rejoined. Unless the update is about
        # an older session that we have not seen leave yet.
        if info.joined_at_ms and held.joined_at_ms and info.joined_at_ms < held.joined_at_ms:
            self._counters.inc("state.stale_update")
            self._forget(info.sid)
            logger.debug("update for older session %s of %r ignored", info.sid, info.identity)
            return []
        del self._sid_identity[held.sid]
        self._forget(held.sid)
        self._install(info)
        return [*departure(held, models.DisconnectReason.DUPLICATE_IDENTITY), *arrival(info)]

    def _install(self, info: models.ParticipantInfo) -> None:
        self._remote[info.identity] = info
        self._sid_identity[info.sid] = info.identity

    def _forget(self, sid: str) -> None:
        """Remember that session `sid` is over, so later updates about it are ignored."""
        self._departed[sid] = None
        self._departed.move_to_end(sid)
        while len(self._departed) > _DEPARTED_SIDS_KEPT:
            self._departed.popitem(last=False)
