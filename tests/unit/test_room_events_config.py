"""The `events` room-to-bus kind in the configuration: its options, located errors, the
placeholders its templates may use, and which messages its routes take."""

from __future__ import annotations

import pytest

from bridge.config import ROOM_EVENT_KINDS, ConfigError, EventsFrom, parse_config
from bridge.router import RoomMessage, ToBusRoute, compile_routes

HEAD = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: a-secret-of-at-least-32-characters!
  rooms: [plant-berlin]
kafka:
  main: {bootstrap_servers: ["127.0.0.1:9092"]}
connectors:
"""


def errors(body: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(HEAD + body, "bad.yaml")
    return err.value.problems


def route(body: str) -> ToBusRoute:
    (compiled,) = compile_routes(parse_config(HEAD + body, "ok.yaml"))
    assert isinstance(compiled, ToBusRoute)
    return compiled


def message(event: str, participant: str = "") -> RoomMessage:
    values = {"room": "plant-berlin", "participant": participant, "event": event}
    return RoomMessage("events", b"{}", values, {}, "application/json", "plant-berlin")


def test_kinds_default_to_every_event() -> None:
    compiled = route(
        '  - name: ev\n    from: {room: "plant-*", events: {}}\n'
        '    to: {kafka: main, topic: room-events, key: "{room}"}\n'
    )
    spec = compiled.source.events
    assert isinstance(spec, EventsFrom)
    assert tuple(spec.kinds) == ROOM_EVENT_KINDS
    assert compiled.kind == "events"


def test_an_unknown_event_kind_is_a_located_error() -> None:
    body = (
        "  - name: ev\n"
        '    from: {room: "plant-*", events: {kinds: [participant_joined, room_exploded]}}\n'
        "    to: {kafka: main, topic: room-events}\n"
    )
    (problem,) = errors(body)
    assert problem.startswith("bad.yaml:10: connectors[0].from.events.kinds[1]: Input should be")
    assert "(got 'room_exploded')" in problem


def test_an_empty_list_of_kinds_is_a_located_error() -> None:
    body = (
        '  - name: ev\n    from: {room: "plant-*", events: {kinds: []}}\n'
        "    to: {kafka: main, topic: room-events}\n"
    )
    (problem,) = errors(body)
    assert problem.startswith("bad.yaml:10: connectors[0].from.events.kinds: List should have")


def test_an_unknown_option_is_a_located_error() -> None:
    body = (
        '  - name: ev\n    from: {room: "plant-*", events: {kind: [room_started]}}\n'
        "    to: {kafka: main, topic: room-events}\n"
    )
    (problem,) = errors(body)
    assert problem.startswith("bad.yaml:10: connectors[0].from.events")
    assert "kind" in problem


def test_templates_know_the_event_placeholders_and_no_others() -> None:
    body = (
        '  - name: ev\n    from: {room: "plant-*", events: {}}\n'
        '    to: {kafka: main, topic: "ev.{evnt}"}\n'
    )
    assert errors(body) == [
        "bad.yaml:11: connectors[0].to.topic: unknown placeholder {evnt} (known: event, kind,"
        " participant, participant_kind, participant_sid, room, room_sid, track_sid)"
    ]
    route(
        '  - name: ev\n    from: {room: "plant-{site}", events: {}}\n'
        '    to: {kafka: main, topic: "ev.{site}",'
        ' key: "{room}/{event}/{participant}/{participant_kind}/{track_sid}"}\n'
        '    where: event != "track_published" && participant_kind != "agent"\n'
    )


def test_a_participant_capture_is_refused_room_events_have_no_participant() -> None:
    body = (
        '  - name: ev\n    from: {room: "plant-*", participant: "dev-{device}", events: {}}\n'
        "    to: {kafka: main, topic: room-events}\n"
    )
    assert errors(body) == [
        "bad.yaml:10: connectors[0].from.participant: room_started and room_finished have no"
        " participant to capture from"
    ]


def test_a_misspelt_name_in_where_is_located() -> None:
    body = (
        '  - name: ev\n    from: {room: "plant-*", events: {}}\n'
        "    to: {kafka: main, topic: room-events}\n"
        '    where: evnt == "room_started"\n'
    )
    (problem,) = errors(body)
    assert problem.startswith("bad.yaml:12: connectors[0].where: column 1: undeclared reference")


def test_a_route_takes_the_kinds_it_lists() -> None:
    compiled = route(
        "  - name: ev\n"
        '    from: {room: "plant-*", events: {kinds: [room_started, participant_left]}}\n'
        "    to: {kafka: main, topic: room-events}\n"
    )
    assert compiled.wants(message("room_started"))
    assert compiled.wants(message("participant_left", "alice"))
    assert not compiled.wants(message("participant_joined", "alice"))
    assert not compiled.wants(message("track_published", "alice"))


def test_the_participant_glob_judges_participant_events_only() -> None:
    compiled = route(
        '  - name: ev\n    from: {room: "plant-*", participant: "dev-*", events: {}}\n'
        "    to: {kafka: main, topic: room-events}\n"
    )
    assert compiled.wants(message("room_started"))
    assert compiled.wants(message("room_finished"))
    assert compiled.wants(message("participant_joined", "dev-7"))
    assert not compiled.wants(message("participant_joined", "alice"))
    assert not compiled.wants(message("track_published", "alice"))


def test_the_room_glob_judges_every_event() -> None:
    compiled = route(
        '  - name: ev\n    from: {room: "lab-*", events: {}}\n'
        "    to: {kafka: main, topic: room-events}\n"
    )
    assert not compiled.wants(message("room_started"))
