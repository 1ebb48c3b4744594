"""Data-track routes without servers: the config (and its located errors), the router, the
room sink's lazy publication and drops, the subscription filter of room-to-bus routes."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from bridge.config import ConfigError, parse_config
from bridge.envelope import Envelope
from bridge.errors import RejectedMessage
from bridge.room.data_tracks import DataTrackError, DataTrackFrame
from bridge.room.errors import NotConnectedError
from bridge.room.types import Counters
from bridge.router import RoomMessage, ToBusRoute, ToRoomRoute, compile_routes
from bridge.runtime.room_link import RoomLink
from bridge.runtime.room_sink import RoomSink

HEAD = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: a-secret-of-at-least-32-characters!
  rooms: [lobby]
mqtt:
  plant:
    host: 127.0.0.1
connectors:
"""
TO_ROOM = """\
  - name: telemetry
    from: {mqtt: plant, topic: "devices/{device}/telemetry", qos: 0}
    to: {room: lobby, data_track: {name: "telemetry-{device}"}}
"""
FROM_ROOM = """\
  - name: imu
    from: {room: "*", participant: "robot-{unit}", data_track: {name: "imu-*"}}
    to: {mqtt: plant, topic: "lk/{room}/{unit}/{track}", qos: 0}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml")
    return err.value.problems


def _routes() -> tuple[ToRoomRoute, ToBusRoute]:
    to_room, to_bus = compile_routes(parse_config(HEAD + TO_ROOM + FROM_ROOM))
    assert isinstance(to_room, ToRoomRoute) and isinstance(to_bus, ToBusRoute)
    return to_room, to_bus


def test_bus_to_data_track_renders_the_track_name_per_device() -> None:
    route, _ = _routes()
    envelope = Envelope(b"t=21.5", "mqtt:plant", "devices/d7/telemetry")
    values = route.match(envelope)
    assert values is not None
    d = route.delivery(envelope, values)
    assert (d.room, d.kind, d.name, d.payload) == ("lobby", "data_track", "telemetry-d7", b"t=21.5")


def test_room_data_track_route_filters_on_name_and_participant_and_renders_track() -> None:
    _, route = _routes()
    assert route.kind == "data_track"

    def message(participant: str, track: str) -> RoomMessage:
        values = {"room": "lobby", "participant": participant, "track": track, "kind": "x"}
        return RoomMessage("data_track", b"accel", values, {"lk-track": track})

    assert route.wants(message("robot-7", "imu-left"))
    assert not route.wants(message("robot-7", "camera"))
    assert not route.wants(message("dash", "imu-left"))
    values = route.values(message("robot-7", "imu-left"))
    out = route.target.outbound(
        b"accel", values, {"lk-track": "imu-left"}, content_type=None, default_key=None,
        bridge_id="b",
    )  # fmt: skip
    assert out.topic == "lk/lobby/7/imu-left"
    assert ("lk-track", "imu-left") in out.headers


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            TO_ROOM.replace("telemetry-{device}", "telemetry-{devic}"),
            "bad.yaml:12: connectors[0].to.data_track.name: unknown placeholder {devic} "
            "(known: broker, device, topic)",
        ),
        (
            FROM_ROOM.replace("{track}", "{topic}"),
            "bad.yaml:12: connectors[0].to.topic: unknown placeholder {topic} (known: kind,"
            " participant, participant_sid, room, room_sid, track, track_sid, unit)",
        ),
        (
            TO_ROOM.replace('{name: "telemetry-{device}"}', "{}"),
            "bad.yaml:12: connectors[0].to.data_track.name: required key is missing",
        ),
        (
            TO_ROOM + "    allow: [{identity: dash}]\n",
            "bad.yaml:13: connectors[0].allow: on a bus-to-room connector allow/deny judge the"
            " destination identities: a data_track target has none (its subscribers choose"
            " themselves)",
        ),
        (
            TO_ROOM + "    latched: true\n",
            "bad.yaml:13: connectors[0].latched: applies only to a bus-to-room connector whose"
            " target is a packet",
        ),
    ],
)
def test_config_errors_name_the_path(body: str, problem: str) -> None:
    assert errors(HEAD + body) == [problem]


# ----------------------------------------------------------------------------- the room sink


class FakeTrack:
    def __init__(self, name: str, accept: bool = True) -> None:
        self.name = name
        self.accept = accept
        self.published = True
        self.frames: list[DataTrackFrame] = []

    def is_published(self) -> bool:
        return self.published

    def try_push(self, frame: DataTrackFrame) -> bool:
        if not self.published:
            raise NotConnectedError("not published")
        if self.accept:
            self.frames.append(frame)
        return self.accept


class FakeParticipant:
    def __init__(self) -> None:
        self.tracks: list[FakeTrack] = []
        self.refuse: DataTrackError | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def publish_data_track(self, name: str) -> FakeTrack:
        await self.gate.wait()
        if self.refuse is not None:
            raise self.refuse
        track = FakeTrack(name)
        self.tracks.append(track)
        return track


class FakeRoom:
    def __init__(self) -> None:
        self.local_participant = FakeParticipant()


class FakeLink:
    def __init__(self) -> None:
        self.name = "lobby"
        self.room = FakeRoom()
        self.counters = Counters()

    async def ready(self) -> FakeRoom:
        return self.room


def _sink() -> tuple[RoomSink, FakeLink, ToRoomRoute]:
    link = FakeLink()
    route, _ = _routes()
    return RoomSink({"lobby": cast(RoomLink, link)}, None), link, route


async def _deliver(sink: RoomSink, route: ToRoomRoute, device: str, payload: bytes) -> None:
    envelope = Envelope(payload, "mqtt:plant", f"devices/{device}/telemetry")
    values = route.match(envelope)
    assert values is not None
    await sink.deliver(route.name, route.delivery(envelope, values), envelope)


async def test_tracks_are_published_on_first_use_once_per_name_and_kept() -> None:
    sink, link, route = _sink()
    participant = link.room.local_participant
    participant.gate.clear()  # concurrent first frames wait for one publication
    first = [asyncio.create_task(_deliver(sink, route, "d1", b"%d" % i)) for i in range(3)]
    await asyncio.sleep(0)
    participant.gate.set()
    await asyncio.gather(*first)
    await _deliver(sink, route, "d2", b"x")
    await _deliver(sink, route, "d1", b"3")
    assert [t.name for t in participant.tracks] == ["telemetry-d1", "telemetry-d2"]
    assert [f.payload for f in participant.tracks[0].frames] == [b"0", b"1", b"2", b"3"]
    assert link.counters["route.telemetry.dropped.data_track_full"] == 0


async def test_a_track_that_ended_with_its_session_is_published_again() -> None:
    sink, link, route = _sink()
    participant = link.room.local_participant
    await _deliver(sink, route, "d1", b"before")
    participant.tracks[0].published = False  # the session was lost (rejoin)
    await _deliver(sink, route, "d1", b"after")
    assert len(participant.tracks) == 2
    assert [f.payload for f in participant.tracks[1].frames] == [b"after"]


async def test_a_refused_frame_is_dropped_and_counted_never_retried() -> None:
    sink, link, route = _sink()
    await _deliver(sink, route, "d1", b"ok")
    participant = link.room.local_participant
    participant.tracks[0].accept = False  # channel congested or not open
    await _deliver(sink, route, "d1", b"late")  # returns: the bus message is settled
    assert link.counters["route.telemetry.dropped.data_track_full"] == 1
    assert link.counters["route.telemetry.delivery_retries"] == 0
    assert [f.payload for f in participant.tracks[0].frames] == [b"ok"]


async def test_a_publication_the_server_refuses_rejects_the_message() -> None:
    sink, link, route = _sink()
    link.room.local_participant.refuse = DataTrackError("DUPLICATE_NAME", reason="DUPLICATE_NAME")
    with pytest.raises(RejectedMessage) as err:
        await _deliver(sink, route, "d1", b"x")
    assert err.value.reason == "refused"


# ----------------------------------------------------------------------------- subscriptions


def test_room_events_subscribe_to_the_tracks_a_route_wants() -> None:
    from bridge.runtime.room_events import RoomEvents

    _, route = _routes()

    class Outbox:
        def __init__(self, route: ToBusRoute) -> None:
            self.route = route

    link = FakeLink()
    events = RoomEvents(cast(RoomLink, link), [cast(Any, Outbox(route))], Counters())
    assert events._wants_data_track("robot-7", "imu-left")
    assert not events._wants_data_track("robot-7", "camera")
    assert not events._wants_data_track("dash", "imu-left")


class FakeChannel:
    readyState = "open"
    bufferedAmount = 0


def test_the_manager_subscribes_to_matching_tracks_now_later_and_after_a_rejoin() -> None:
    from livekit.protocol import models, rtc

    from bridge.room.data_tracks import DataTrackManager

    sent: list[str] = []
    remote: list[tuple[str, str, models.DataTrackInfo]] = []

    def send(request: rtc.SignalRequest) -> asyncio.Future[None]:
        sent.extend(u.track_sid for u in request.update_data_subscription.updates if u.subscribe)
        raise NotConnectedError("not sent in this test")  # the manager copes (next session)

    manager = DataTrackManager(
        Counters(),
        send_signal=send,
        post_event=lambda _e: None,
        remote_tracks=lambda: remote,
        request_timeout=lambda: 1.0,
    )
    manager.session_started(cast(Any, FakeChannel()))
    remote.append(("robot-7", "PA_1", models.DataTrackInfo(sid="DTR_a", name="imu-left")))
    forget = manager.subscribe_matching(lambda who, name: name.startswith("imu-"))
    assert sent == ["DTR_a"]
    remote.append(("robot-7", "PA_1", models.DataTrackInfo(sid="DTR_b", name="camera")))
    remote.append(("robot-8", "PA_2", models.DataTrackInfo(sid="DTR_c", name="imu-right")))
    manager.sync_subscriptions()  # a participant update
    assert sent == ["DTR_a", "DTR_c"]
    manager.session_lost("rejoin")
    manager.session_started(cast(Any, FakeChannel()))
    assert sent == ["DTR_a", "DTR_c", "DTR_a", "DTR_c"]
    forget()
    manager.session_lost("rejoin")
    manager.session_started(cast(Any, FakeChannel()))
    assert len(sent) == 4
