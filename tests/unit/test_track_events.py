"""Track events of RoomState: published and unpublished from successive ParticipantInfo
records, around arrivals and departures, and in the state diff of a rejoin."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from livekit.protocol import models, rtc

from bridge.room.state import (
    ParticipantConnected,
    ParticipantDisconnected,
    ParticipantMetadataChanged,
    RoomState,
    TrackPublished,
    TrackUnpublished,
    diff_participants,
)

ACTIVE = models.ParticipantInfo.State.ACTIVE
DISCONNECTED = models.ParticipantInfo.State.DISCONNECTED
Reason = models.DisconnectReason
TrackEvent = (TrackPublished, TrackUnpublished)
ParticipantEvent = (ParticipantConnected, ParticipantDisconnected)


def track(sid: str, *, name: str = "", muted: bool = False) -> models.TrackInfo:
    return models.TrackInfo(
        sid=sid,
        name=name or sid,
        type=models.TrackType.AUDIO,
        source=models.TrackSource.MICROPHONE,
        muted=muted,
    )


def pinfo(
    identity: str,
    *tracks: models.TrackInfo,
    sid: str | None = None,
    version: int = 1,
    state: models.ParticipantInfo.State = ACTIVE,
    metadata: str = "",
    reason: models.DisconnectReason = Reason.UNKNOWN_REASON,
) -> models.ParticipantInfo:
    return models.ParticipantInfo(
        sid=sid or f"PA_{identity}",
        identity=identity,
        version=version,
        state=state,
        metadata=metadata,
        tracks=list(tracks),
        joined_at_ms=1_000,
        disconnect_reason=reason,
    )


def join(*others: models.ParticipantInfo) -> rtc.JoinResponse:
    return rtc.JoinResponse(
        room=models.Room(sid="RM_1", name="r"),
        participant=pinfo("bridge"),
        other_participants=list(others),
    )


def summary(events: Sequence[object]) -> list[tuple[str, str, str]]:
    """(event type, identity, track sid or '') of each event."""
    out = []
    for event in events:
        info = getattr(event, "info", None)
        identity = info.identity if info is not None else getattr(event, "identity", "")
        sid = event.track.sid if isinstance(event, (TrackPublished, TrackUnpublished)) else ""
        out.append((type(event).__name__, identity, sid))
    return out


def joined_state(*others: models.ParticipantInfo) -> RoomState:
    state = RoomState()
    assert state.reset(join(*others)) == []
    return state


def test_a_track_in_a_later_record_is_published_and_one_gone_is_unpublished() -> None:
    state = joined_state(pinfo("alice"))
    events = state.apply_participant_update([pinfo("alice", track("TR_a"), version=2)])
    assert summary(events) == [("TrackPublished", "alice", "TR_a")]
    published = events[0]
    assert isinstance(published, TrackPublished)
    assert published.info.version == 2 and published.track.type == models.TrackType.AUDIO

    events = state.apply_participant_update([pinfo("alice", track("TR_b"), version=3)])
    assert summary(events) == [
        ("TrackUnpublished", "alice", "TR_a"),
        ("TrackPublished", "alice", "TR_b"),
    ]


def test_a_changed_track_with_the_same_sid_is_no_event() -> None:
    state = joined_state(pinfo("alice", track("TR_a")))
    events = state.apply_participant_update(
        [pinfo("alice", track("TR_a", muted=True), version=2, metadata="m")]
    )
    assert summary(events) == [("ParticipantMetadataChanged", "alice", "")]


def test_a_stale_record_yields_no_track_event() -> None:
    state = joined_state(pinfo("alice", version=5))
    assert state.apply_participant_update([pinfo("alice", track("TR_a"), version=4)]) == []


def test_a_participant_arriving_with_tracks_is_connected_then_its_tracks_published() -> None:
    state = joined_state()
    events = state.apply_participant_update([pinfo("alice", track("TR_a"), track("TR_v"))])
    assert summary(events) == [
        ("ParticipantConnected", "alice", ""),
        ("TrackPublished", "alice", "TR_a"),
        ("TrackPublished", "alice", "TR_v"),
    ]


def test_a_participant_leaving_with_tracks_has_them_unpublished_first() -> None:
    state = joined_state(pinfo("alice", track("TR_a")))
    events = state.apply_participant_update(
        [pinfo("alice", version=2, state=DISCONNECTED, reason=Reason.CLIENT_INITIATED)]
    )
    assert summary(events) == [
        ("TrackUnpublished", "alice", "TR_a"),
        ("ParticipantDisconnected", "alice", ""),
    ]
    left = events[-1]
    assert isinstance(left, ParticipantDisconnected) and left.reason == Reason.CLIENT_INITIATED


def test_a_new_session_of_an_identity_unpublishes_the_old_tracks_and_publishes_the_new() -> None:
    state = joined_state(pinfo("alice", track("TR_old")))
    events = state.apply_participant_update([pinfo("alice", track("TR_new"), sid="PA_alice2")])
    assert summary(events) == [
        ("TrackUnpublished", "alice", "TR_old"),
        ("ParticipantDisconnected", "alice", ""),
        ("ParticipantConnected", "alice", ""),
        ("TrackPublished", "alice", "TR_new"),
    ]
    sids = [e.info.sid for e in events if isinstance(e, TrackEvent + ParticipantEvent)]
    assert sids == ["PA_alice", "PA_alice", "PA_alice2", "PA_alice2"]


def test_the_rejoin_diff_is_consistent_for_tracks() -> None:
    state = joined_state(
        pinfo("stays", track("TR_kept"), track("TR_dropped")),
        pinfo("leaves", track("TR_l")),
        pinfo("rejoins", track("TR_r1")),
    )
    events = state.reset(
        join(
            pinfo("stays", track("TR_kept"), track("TR_added"), version=2),
            pinfo("rejoins", track("TR_r2"), sid="PA_rejoins2"),
            pinfo("arrives", track("TR_n")),
        )
    )
    assert summary(events) == [
        ("TrackUnpublished", "leaves", "TR_l"),
        ("ParticipantDisconnected", "leaves", ""),
        ("TrackUnpublished", "rejoins", "TR_r1"),
        ("ParticipantDisconnected", "rejoins", ""),
        ("ParticipantConnected", "rejoins", ""),
        ("TrackPublished", "rejoins", "TR_r2"),
        ("ParticipantConnected", "arrives", ""),
        ("TrackPublished", "arrives", "TR_n"),
        ("TrackUnpublished", "stays", "TR_dropped"),
        ("TrackPublished", "stays", "TR_added"),
    ]
    reasons = [e.reason for e in events if isinstance(e, ParticipantDisconnected)]
    assert reasons == [Reason.UNKNOWN_REASON, Reason.DUPLICATE_IDENTITY]


def test_every_published_track_is_unpublished_once_over_any_history() -> None:
    """Replaying the events of updates and rejoins gives exactly the tracks the state holds."""
    state = joined_state(pinfo("a", track("T1")))
    live: set[tuple[str, str]] = {("a", "T1")}
    steps: list[Callable[[], Sequence[object]]] = [
        lambda: state.apply_participant_update([pinfo("b", track("T2"), track("T3"))]),
        lambda: state.apply_participant_update([pinfo("a", track("T4"), version=2)]),
        lambda: state.reset(join(pinfo("b", track("T3"), version=2), pinfo("c", track("T5")))),
        lambda: state.apply_participant_update([pinfo("c", version=2, state=DISCONNECTED)]),
        lambda: state.reset(join()),
    ]
    for step in steps:
        for event in step():
            if isinstance(event, TrackPublished):
                key = (event.info.identity, event.track.sid)
                assert key not in live
                live.add(key)
            elif isinstance(event, TrackUnpublished):
                live.remove((event.info.identity, event.track.sid))
            elif isinstance(event, ParticipantDisconnected):
                assert not any(who == event.info.identity for who, _ in live)
        held = {
            (identity, t.sid)
            for identity, info in state.remote_participants.items()
            for t in info.tracks
        }
        assert live == held


def test_diff_participants_from_nothing_is_every_arrival() -> None:
    events = diff_participants({}, {"a": pinfo("a", track("T1"))})
    assert [type(e) for e in events] == [ParticipantConnected, TrackPublished]


def test_diff_participants_includes_the_other_changes() -> None:
    events = diff_participants({"a": pinfo("a")}, {"a": pinfo("a", metadata="m", version=2)})
    assert [type(e) for e in events] == [ParticipantMetadataChanged]
