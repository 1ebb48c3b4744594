"""RoomState: join, rejoin diffs, participant and room updates, attribute diffs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from livekit.protocol import models, rtc

from bridge.room.state import (
    ParticipantAttributesChanged,
    ParticipantConnected,
    ParticipantDisconnected,
    ParticipantMetadataChanged,
    ParticipantNameChanged,
    RoomMetadataChanged,
    RoomState,
    diff_attributes,
)
from bridge.room.types import Counters

ACTIVE = models.ParticipantInfo.State.ACTIVE
DISCONNECTED = models.ParticipantInfo.State.DISCONNECTED
Reason = models.DisconnectReason


def pinfo(
    identity: str,
    sid: str | None = None,
    *,
    version: int = 1,
    state: models.ParticipantInfo.State = ACTIVE,
    name: str = "",
    metadata: str = "",
    attributes: dict[str, str] | None = None,
    joined_at_ms: int = 1_000,
    disconnect_reason: models.DisconnectReason = Reason.UNKNOWN_REASON,
) -> models.ParticipantInfo:
    return models.ParticipantInfo(
        sid=sid if sid is not None else f"PA_{identity}",
        identity=identity,
        version=version,
        state=state,
        name=name,
        metadata=metadata,
        attributes=attributes or {},
        joined_at_ms=joined_at_ms,
        disconnect_reason=disconnect_reason,
    )


def join(
    local: models.ParticipantInfo,
    *others: models.ParticipantInfo,
    room_metadata: str = "",
) -> rtc.JoinResponse:
    return rtc.JoinResponse(
        room=models.Room(sid="RM_1", name="r", metadata=room_metadata),
        participant=local,
        other_participants=list(others),
    )


def joined(*others: models.ParticipantInfo, counters: Counters | None = None) -> RoomState:
    state = RoomState(counters=counters)
    assert state.reset(join(pinfo("me"), *others)) == []
    return state


# ---------------------------------------------------------------------------------- first join


def test_empty_state_before_join() -> None:
    state = RoomState()
    assert state.room == models.Room()
    assert state.local == models.ParticipantInfo()
    assert dict(state.remote_participants) == {}
    assert state.participant_by_sid("") is None
    assert state.participant_by_sid("PA_x") is None


def test_first_join_installs_everything_and_emits_nothing() -> None:
    state = RoomState()
    events = state.reset(join(pinfo("me"), pinfo("a"), pinfo("b"), room_metadata="rm"))
    assert events == []
    assert state.room.metadata == "rm" and state.room.sid == "RM_1"
    assert state.local.identity == "me"
    assert set(state.remote_participants) == {"a", "b"}
    assert state.participant_by_sid("PA_a") is state.remote_participants["a"]
    assert state.participant_by_sid("PA_me") is state.local


def test_remote_participants_view_is_read_only() -> None:
    state = joined(pinfo("a"))
    view = state.remote_participants
    with pytest.raises(TypeError):
        view["x"] = pinfo("x")  # type: ignore[index]
    assert "x" not in state.remote_participants


def test_join_response_with_bogus_participants_skips_and_counts() -> None:
    counters = Counters()
    state = RoomState(counters=counters)
    state.reset(
        join(pinfo("me"), pinfo("", sid="PA_x"), pinfo("y", sid=""), pinfo("ok")),
    )
    assert list(state.remote_participants) == ["ok"]
    assert counters["state.malformed_update"] == 2


# ---------------------------------------------------------------------------- connect/disconnect


def test_new_participant_connects() -> None:
    state = joined()
    a = pinfo("a")
    assert state.apply_participant_update([a]) == [ParticipantConnected(a)]
    assert state.remote_participants["a"] is a
    assert state.participant_by_sid("PA_a") is a


def test_disconnect_removes_with_reason() -> None:
    state = joined(pinfo("a"))
    held = state.remote_participants["a"]
    gone = pinfo("a", version=2, state=DISCONNECTED, disconnect_reason=Reason.CLIENT_INITIATED)
    assert state.apply_participant_update([gone]) == [
        ParticipantDisconnected(held, Reason.CLIENT_INITIATED)
    ]
    assert "a" not in state.remote_participants
    assert state.participant_by_sid("PA_a") is None


def test_disconnect_with_empty_identity_is_mapped_by_sid() -> None:
    state = joined(pinfo("a"))
    held = state.remote_participants["a"]
    gone = pinfo("", sid="PA_a", version=2, state=DISCONNECTED)
    events = state.apply_participant_update([gone])
    assert events == [ParticipantDisconnected(held, Reason.UNKNOWN_REASON)]
    assert isinstance(events[0], ParticipantDisconnected)
    assert events[0].info.identity == "a"  # the held record names who left
    assert "a" not in state.remote_participants


def test_disconnect_for_unknown_sid_is_counted_once() -> None:
    counters = Counters()
    state = joined(pinfo("a"), counters=counters)
    ghost = pinfo("ghost", state=DISCONNECTED)
    assert state.apply_participant_update([ghost]) == []
    assert state.apply_participant_update([ghost]) == []
    assert counters["state.unknown_disconnect"] == 1
    assert set(state.remote_participants) == {"a"}


def test_duplicate_disconnect_is_not_reported_twice() -> None:
    counters = Counters()
    state = joined(pinfo("a"), counters=counters)
    gone = pinfo("a", version=2, state=DISCONNECTED)
    assert len(state.apply_participant_update([gone])) == 1
    assert state.apply_participant_update([gone]) == []
    assert counters["state.unknown_disconnect"] == 0


def test_late_update_for_departed_sid_does_not_resurrect() -> None:
    counters = Counters()
    state = joined(pinfo("a"), counters=counters)
    state.apply_participant_update([pinfo("a", version=3, state=DISCONNECTED)])
    assert state.apply_participant_update([pinfo("a", version=2, metadata="late")]) == []
    assert "a" not in state.remote_participants
    assert counters["state.stale_update"] == 1


def test_same_identity_new_sid_is_disconnect_then_connect() -> None:
    state = joined(pinfo("a", sid="PA_old", joined_at_ms=1_000))
    old = state.remote_participants["a"]
    new = pinfo("a", sid="PA_new", version=1, joined_at_ms=2_000)
    assert state.apply_participant_update([new]) == [
        ParticipantDisconnected(old, Reason.DUPLICATE_IDENTITY),
        ParticipantConnected(new),
    ]
    assert state.remote_participants["a"] is new
    assert state.participant_by_sid("PA_old") is None
    assert state.participant_by_sid("PA_new") is new
    # The old session's own disconnect, arriving late, changes nothing and is not an anomaly.
    counters_before = state.apply_participant_update(
        [pinfo("a", sid="PA_old", version=9, state=DISCONNECTED)]
    )
    assert counters_before == []
    assert state.remote_participants["a"] is new


def test_update_for_older_session_of_held_identity_is_ignored() -> None:
    counters = Counters()
    state = joined(pinfo("a", sid="PA_new", joined_at_ms=2_000), counters=counters)
    stale = pinfo("a", sid="PA_old", version=7, joined_at_ms=1_000, metadata="old")
    assert state.apply_participant_update([stale]) == []
    assert state.remote_participants["a"].sid == "PA_new"
    assert counters["state.stale_update"] == 1


def test_batch_is_applied_in_order() -> None:
    state = joined()
    a1, a2 = pinfo("a", version=1), pinfo("a", version=2, metadata="m")
    b = pinfo("b")
    events = state.apply_participant_update([a1, b, a2])
    assert events == [
        ParticipantConnected(a1),
        ParticipantConnected(b),
        ParticipantMetadataChanged("a", "", "m", is_local=False),
    ]


def test_malformed_updates_are_counted_not_applied() -> None:
    counters = Counters()
    state = joined(counters=counters)
    assert state.apply_participant_update([pinfo("x", sid=""), pinfo("", sid="PA_y")]) == []
    assert dict(state.remote_participants) == {}
    assert counters["state.malformed_update"] == 2


# ------------------------------------------------------------------------------------- changes


def test_metadata_name_and_attribute_changes_of_a_remote() -> None:
    state = joined(pinfo("a", name="A", metadata="m1", attributes={"k": "1", "gone": "x"}))
    new = pinfo("a", version=2, name="A2", metadata="m2", attributes={"k": "2", "add": "y"})
    assert state.apply_participant_update([new]) == [
        ParticipantMetadataChanged("a", "m1", "m2", is_local=False),
        ParticipantNameChanged("a", "A", "A2", is_local=False),
        ParticipantAttributesChanged(
            "a", {"k": "2", "add": "y", "gone": ""}, {"k": "2", "add": "y"}, is_local=False
        ),
    ]
    assert state.remote_participants["a"] is new


def test_unchanged_update_emits_nothing_but_is_held() -> None:
    state = joined(pinfo("a", metadata="m", attributes={"k": "v"}))
    same = pinfo("a", version=2, metadata="m", attributes={"k": "v"})
    assert state.apply_participant_update([same]) == []
    assert state.remote_participants["a"].version == 2


def test_lower_version_is_ignored_and_counted() -> None:
    counters = Counters()
    state = joined(pinfo("a", version=5, metadata="new"), counters=counters)
    assert state.apply_participant_update([pinfo("a", version=4, metadata="old")]) == []
    assert state.remote_participants["a"].metadata == "new"
    assert counters["state.stale_update"] == 1
    # A stale disconnect is ignored too.
    assert state.apply_participant_update([pinfo("a", version=3, state=DISCONNECTED)]) == []
    assert "a" in state.remote_participants
    assert counters["state.stale_update"] == 2


def test_equal_version_is_applied() -> None:
    state = joined(pinfo("a", version=5, metadata="x"))
    events = state.apply_participant_update([pinfo("a", version=5, metadata="y")])
    assert events == [ParticipantMetadataChanged("a", "x", "y", is_local=False)]


def test_local_update_changes_local_and_is_local_events() -> None:
    state = joined(pinfo("a"))
    me = pinfo("me", version=2, name="Me", metadata="mm", attributes={"role": "bridge"})
    events = state.apply_participant_update([me])
    assert events == [
        ParticipantMetadataChanged("me", "", "mm", is_local=True),
        ParticipantNameChanged("me", "", "Me", is_local=True),
        ParticipantAttributesChanged("me", {"role": "bridge"}, {"role": "bridge"}, is_local=True),
    ]
    assert state.local is me
    assert "me" not in state.remote_participants


def test_stale_local_update_is_ignored() -> None:
    counters = Counters()
    state = RoomState(counters=counters)
    state.reset(join(pinfo("me", version=4, metadata="now")))
    assert state.apply_participant_update([pinfo("me", version=3, metadata="then")]) == []
    assert state.local.metadata == "now"
    assert counters["state.stale_update"] == 1


def test_local_disconnected_keeps_last_record() -> None:
    state = joined()
    before = state.local
    assert state.apply_participant_update([pinfo("me", version=9, state=DISCONNECTED)]) == []
    assert state.local is before


def test_own_identity_under_other_sid_is_never_a_remote() -> None:
    counters = Counters()
    state = joined(counters=counters)
    assert state.apply_participant_update([pinfo("me", sid="PA_previous")]) == []
    assert dict(state.remote_participants) == {}
    assert counters["state.stale_update"] == 1


def test_room_update_metadata_change() -> None:
    state = joined()
    room = models.Room(sid="RM_1", name="r", metadata="hello")
    assert state.apply_room_update(room) == [RoomMetadataChanged("", "hello")]
    assert state.room is room
    assert state.apply_room_update(models.Room(sid="RM_1", name="r", metadata="hello")) == []


def test_older_room_version_is_ignored() -> None:
    counters = Counters()
    state = joined(counters=counters)
    newer = models.Room(metadata="new", version=models.TimedVersion(unix_micro=20, ticks=0))
    older = models.Room(metadata="old", version=models.TimedVersion(unix_micro=10, ticks=5))
    assert state.apply_room_update(newer) == [RoomMetadataChanged("", "new")]
    assert state.apply_room_update(older) == []
    assert state.room.metadata == "new"
    assert counters["state.stale_update"] == 1
    same_micro_more_ticks = models.Room(
        metadata="newer", version=models.TimedVersion(unix_micro=20, ticks=1)
    )
    assert state.apply_room_update(same_micro_more_ticks) == [RoomMetadataChanged("new", "newer")]


# ---------------------------------------------------------------------------------------- rejoin


def test_rejoin_reports_what_changed_during_the_outage() -> None:
    state = RoomState()
    state.reset(
        join(
            pinfo("me", sid="PA_me1", metadata="lm", attributes={"x": "1"}),
            pinfo("stays", metadata="s1", attributes={"a": "1"}),
            pinfo("leaves"),
            pinfo("rejoins", sid="PA_r1"),
            room_metadata="old",
        )
    )
    leaves, rejoins_old = state.remote_participants["leaves"], state.remote_participants["rejoins"]
    stays2 = pinfo("stays", version=2, metadata="s2", attributes={"b": "2"})
    rejoins_new = pinfo("rejoins", sid="PA_r2")
    arrives = pinfo("arrives")
    events = state.reset(
        join(
            pinfo("me", sid="PA_me2", metadata="lm", attributes={"x": "2"}),
            stays2,
            rejoins_new,
            arrives,
            room_metadata="new",
        )
    )
    assert events == [
        RoomMetadataChanged("old", "new"),
        ParticipantAttributesChanged("me", {"x": "2"}, {"x": "2"}, is_local=True),
        ParticipantDisconnected(leaves, Reason.UNKNOWN_REASON),
        ParticipantDisconnected(rejoins_old, Reason.DUPLICATE_IDENTITY),
        ParticipantConnected(rejoins_new),
        ParticipantConnected(arrives),
        ParticipantMetadataChanged("stays", "s1", "s2", is_local=False),
        ParticipantAttributesChanged("stays", {"a": "", "b": "2"}, {"b": "2"}, is_local=False),
    ]
    assert state.local.sid == "PA_me2"
    assert set(state.remote_participants) == {"stays", "rejoins", "arrives"}
    assert state.participant_by_sid("PA_r1") is None
    assert state.participant_by_sid("PA_leaves") is None
    # Updates about sessions that ended during the outage stay ignored.
    assert state.apply_participant_update([pinfo("leaves", version=9)]) == []
    assert state.apply_participant_update([pinfo("rejoins", sid="PA_r1", version=9)]) == []
    # And our own previous session never shows up as a remote.
    assert state.apply_participant_update([pinfo("me", sid="PA_me1", version=9)]) == []
    assert set(state.remote_participants) == {"stays", "rejoins", "arrives"}


def test_rejoin_with_nothing_changed_is_silent() -> None:
    state = RoomState()
    state.reset(join(pinfo("me", sid="PA_1"), pinfo("a"), room_metadata="m"))
    assert state.reset(join(pinfo("me", sid="PA_2"), pinfo("a"), room_metadata="m")) == []


def test_versions_restart_after_rejoin_for_new_sessions() -> None:
    # After a rejoin our new local sid starts at a low version again: it must be applied.
    state = RoomState()
    state.reset(join(pinfo("me", sid="PA_1", version=40)))
    state.reset(join(pinfo("me", sid="PA_2", version=1)))
    events = state.apply_participant_update([pinfo("me", sid="PA_2", version=2, metadata="m")])
    assert events == [ParticipantMetadataChanged("me", "", "m", is_local=True)]


def test_events_are_frozen() -> None:
    event = RoomMetadataChanged("a", "b")
    with pytest.raises(AttributeError):
        event.new = "c"  # type: ignore[misc]
    assert event.new == "b"


# ------------------------------------------------------------------------------ attribute diffs

_keys = st.text(min_size=1, max_size=6)
_values = st.text(min_size=1, max_size=6)  # the server deletes keys set to "": never stored
_maps = st.dictionaries(_keys, _values, max_size=8)


def _apply(old: dict[str, str], changed: dict[str, str]) -> dict[str, str]:
    out = dict(old)
    for key, value in changed.items():
        if value == "":
            out.pop(key, None)
        else:
            out[key] = value
    return out


@given(old=_maps, new=_maps)
def test_diff_applied_to_old_gives_new(old: dict[str, str], new: dict[str, str]) -> None:
    assert _apply(old, diff_attributes(old, new)) == new


@given(old=_maps, new=_maps)
def test_diff_holds_exactly_the_differing_keys(old: dict[str, str], new: dict[str, str]) -> None:
    changed = diff_attributes(old, new)
    assert set(changed) == {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    for key, value in changed.items():
        assert value == new.get(key, "")


@given(attrs=_maps)
def test_diff_of_equal_maps_is_empty(attrs: dict[str, str]) -> None:
    assert diff_attributes(attrs, dict(attrs)) == {}


@given(old=_maps, new=_maps)
def test_attribute_event_through_state_matches_diff(
    old: dict[str, str], new: dict[str, str]
) -> None:
    state = joined(pinfo("a", attributes=old))
    events = state.apply_participant_update([pinfo("a", version=2, attributes=new)])
    attr_events = [e for e in events if isinstance(e, ParticipantAttributesChanged)]
    if old == new:
        assert attr_events == []
    else:
        assert attr_events == [
            ParticipantAttributesChanged("a", diff_attributes(old, new), new, False)
        ]
        assert _apply(old, attr_events[0].changed) == new


def test_diff_reports_deletion_as_empty_string() -> None:
    assert diff_attributes({"a": "1", "b": "2"}, {"b": "2"}) == {"a": ""}
    assert diff_attributes({}, {"a": "1"}) == {"a": "1"}
