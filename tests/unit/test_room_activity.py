"""RoomActivity: the bridge's view of a room as `events` messages — started once per room sid,
participants and tracks announced once, left implies unpublished, finished only when the server
closes the room."""

from __future__ import annotations

import json
from typing import Any, cast

from livekit.protocol import models

from bridge.room.events import Disconnected
from bridge.room.room import Room
from bridge.room.state import (
    ParticipantConnected,
    ParticipantDisconnected,
    TrackPublished,
    TrackUnpublished,
    arrival,
)
from bridge.router import RoomMessage
from bridge.runtime.room_activity import RoomActivity

Reason = models.DisconnectReason
Kind = models.ParticipantInfo.Kind


class FakeRoom:
    """What RoomActivity reads of a `Room`, and its event handlers."""

    def __init__(self, sid: str, *others: models.ParticipantInfo, created_at_ms: int = 0) -> None:
        self.sid = sid
        self.created_at_ms = created_at_ms
        self.remote = {info.identity: info for info in others}
        self.handlers: list[tuple[type[Any], Any]] = []

    def on(self, event_type: type[Any], handler: Any) -> None:
        self.handlers.append((event_type, handler))

    def remote_identities(self) -> list[str]:
        return list(self.remote)

    def participant_info(self, identity: str) -> models.ParticipantInfo | None:
        return self.remote.get(identity)

    def publish(self, *events: object) -> None:
        for event in events:
            for event_type, handler in self.handlers:
                if isinstance(event, event_type):
                    handler(event)


def track(sid: str) -> models.TrackInfo:
    return models.TrackInfo(
        sid=sid, name="mic", type=models.TrackType.AUDIO, source=models.TrackSource.MICROPHONE
    )


def pinfo(identity: str, *tracks: models.TrackInfo, sid: str = "") -> models.ParticipantInfo:
    return models.ParticipantInfo(
        sid=sid or f"PA_{identity}",
        identity=identity,
        name=identity.title(),
        kind=Kind.AGENT if identity.startswith("agent") else Kind.STANDARD,
        tracks=list(tracks),
        joined_at_ms=5_000,
    )


class Recorder:
    def __init__(self) -> None:
        self.messages: list[RoomMessage] = []
        self.held: list[models.ParticipantInfo | None] = []

    def __call__(self, message: RoomMessage, held: models.ParticipantInfo | None) -> None:
        self.messages.append(message)
        self.held.append(held)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload or b"") for m in self.messages]

    def summary(self) -> list[tuple[str, str]]:
        """(event, participant identity or track sid) of each message."""
        out = []
        for body in self.bodies():
            who = body.get("track", {}).get("sid") or body.get("participant", {}).get("identity")
            out.append((body["event"], who or body["room_sid"]))
        return out


def activity(room: FakeRoom) -> tuple[RoomActivity, Recorder]:
    recorder = Recorder()
    act = RoomActivity("plant-1", recorder)
    act.attach(cast(Room, room))
    return act, recorder


def test_a_join_announces_the_room_then_who_and_what_is_there() -> None:
    room = FakeRoom("RM_1", pinfo("alice", track("TR_a")), created_at_ms=1_234)
    act, rec = activity(room)
    act.joined(cast(Room, room))
    assert rec.summary() == [
        ("room_started", "RM_1"),
        ("participant_joined", "alice"),
        ("track_published", "TR_a"),
    ]
    started, joined, published = rec.bodies()
    assert started == {"event": "room_started", "room": "plant-1", "room_sid": "RM_1", "time": 1234}
    assert joined["participant"] == {
        "identity": "alice",
        "sid": "PA_alice",
        "name": "Alice",
        "kind": "standard",
    }
    assert joined["time"] == 5_000
    assert published["track"] == {
        "sid": "TR_a",
        "name": "mic",
        "type": "audio",
        "source": "microphone",
        "muted": False,
    }
    message = rec.messages[2]
    assert message.kind == "events" and message.content_type == "application/json"
    assert message.default_key == "plant-1"
    assert message.values["event"] == "track_published"
    assert message.values["track_sid"] == "TR_a"
    assert message.values["participant_kind"] == "standard"
    assert message.headers["lk-kind"] == "room-event"


def test_state_events_already_reflected_at_join_are_not_repeated() -> None:
    room = FakeRoom("RM_1", pinfo("alice", track("TR_a")))
    act, rec = activity(room)
    act.joined(cast(Room, room))
    room.publish(*arrival(room.remote["alice"]))  # queued before the join's snapshot was read
    room.publish(ParticipantDisconnected(pinfo("ghost"), Reason.CLIENT_INITIATED))
    assert len(rec.messages) == 3


def test_leaving_with_tracks_unpublishes_them_first_with_the_reason() -> None:
    room = FakeRoom("RM_1")
    act, rec = activity(room)
    act.joined(cast(Room, room))
    agent = pinfo("agent-1", track("TR_x"))
    room.publish(ParticipantConnected(pinfo("agent-1")), TrackPublished(agent, track("TR_x")))
    room.publish(ParticipantDisconnected(agent, Reason.CLIENT_INITIATED))  # no unpublish seen
    assert rec.summary()[1:] == [
        ("participant_joined", "agent-1"),
        ("track_published", "TR_x"),
        ("track_unpublished", "TR_x"),
        ("participant_left", "agent-1"),
    ]
    left = rec.bodies()[-1]
    assert left["reason"] == "CLIENT_INITIATED" and left["participant"]["kind"] == "agent"
    assert rec.held[-1] is agent  # the access rules judge who left by its last record


def test_a_track_unpublished_twice_is_announced_once() -> None:
    room = FakeRoom("RM_1", pinfo("alice", track("TR_a")))
    act, rec = activity(room)
    act.joined(cast(Room, room))
    room.publish(*[TrackUnpublished(pinfo("alice"), track("TR_a"))] * 2)
    assert [e for e, _ in rec.summary()].count("track_unpublished") == 1


def test_a_new_session_of_the_same_room_is_diffed_not_restarted() -> None:
    room = FakeRoom("RM_1", pinfo("stays", track("T1")), pinfo("goes", track("T2")))
    act, rec = activity(room)
    act.joined(cast(Room, room))
    rec.messages.clear()
    again = FakeRoom("RM_1", pinfo("stays"), pinfo("new"))
    act.attach(cast(Room, again))
    act.joined(cast(Room, again))
    assert rec.summary() == [
        ("track_unpublished", "T2"),
        ("participant_left", "goes"),
        ("participant_joined", "new"),
        ("track_unpublished", "T1"),
    ]
    assert rec.bodies()[1]["reason"] == "UNKNOWN_REASON"


def test_a_new_room_sid_finishes_the_old_room_first() -> None:
    room = FakeRoom("RM_1", pinfo("alice"))
    act, rec = activity(room)
    act.joined(cast(Room, room))
    rec.messages.clear()
    act.joined(cast(Room, FakeRoom("RM_2", pinfo("alice", sid="PA_alice2"))))
    assert rec.summary() == [
        ("participant_left", "alice"),
        ("room_finished", "RM_1"),
        ("room_started", "RM_2"),
        ("participant_joined", "alice"),
    ]


def test_the_server_closing_the_room_finishes_it_the_bridge_stopping_does_not() -> None:
    room = FakeRoom("RM_1", pinfo("alice", track("TR_a")))
    act, rec = activity(room)
    act.joined(cast(Room, room))
    room.publish(Disconnected("bridge stopping"))
    room.publish(Disconnected("removed", server_reason=Reason.PARTICIPANT_REMOVED))
    assert len(rec.messages) == 3
    room.publish(Disconnected("server asked us to leave", server_reason=Reason.ROOM_DELETED))
    assert rec.summary()[3:] == [
        ("track_unpublished", "TR_a"),
        ("participant_left", "alice"),
        ("room_finished", "RM_1"),
    ]
    assert rec.bodies()[-1]["reason"] == "ROOM_DELETED"
    assert rec.bodies()[-2]["reason"] == "ROOM_DELETED"
    # The same name joined again is a new room: started again.
    rec.messages.clear()
    act.joined(cast(Room, FakeRoom("RM_3")))
    assert rec.summary() == [("room_started", "RM_3")]
