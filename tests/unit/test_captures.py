"""Room and participant captures: matching, values in templates, located config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config, parse_config
from bridge.errors import RejectedMessage
from bridge.router import RoomMessage, ToBusRoute, compile_routes
from bridge.topics import TemplateError, parse_name_pattern
from tests.unit.configs import head

HEAD = head("plant-berlin", kafka=True)


def config(route: str) -> str:
    return HEAD + route


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml")
    return err.value.problems


def route_of(text: str) -> ToBusRoute:
    (route,) = compile_routes(parse_config(text))
    assert isinstance(route, ToBusRoute)
    return route


def packet(room: str, participant: str, topic: str, payload: bytes = b"x") -> RoomMessage:
    values = {
        "room": room,
        "room_sid": "RM_1",
        "participant": participant,
        "participant_sid": "PA_1",
        "kind": "packet-reliable",
        "topic": topic,
    }
    return RoomMessage("packet", payload, values, {})


# ----------------------------------------------------------------------------- the pattern


def test_a_capture_takes_one_or_more_characters() -> None:
    pattern = parse_name_pattern("plant-{site}")
    assert pattern.captures == ("site",)
    assert pattern.match("plant-berlin") == {"site": "berlin"}
    assert pattern.match("plant-berlin-2") == {"site": "berlin-2"}
    assert pattern.match("plant-") is None
    assert pattern.match("factory-berlin") is None


def test_earlier_captures_take_as_few_characters_as_possible() -> None:
    assert parse_name_pattern("{a}-{b}").match("x-y-z") == {"a": "x", "b": "y-z"}


def test_globs_beside_captures_keep_their_meaning() -> None:
    pattern = parse_name_pattern("site-{site}-line?-*")
    assert pattern.match("site-berlin-line3-anything") == {"site": "berlin"}
    assert pattern.match("site-berlin-line33-x") is None  # ? is exactly one character
    assert parse_name_pattern("plant-[ab]*").match("plant-b1") == {}
    assert parse_name_pattern("*").match("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plant-{}", "empty capture {} in 'plant-{}'"),
        ("{a}-{a}", "capture {a} appears twice in '{a}-{a}'"),
        ("{1a}", "invalid capture {1a} in '{1a}'"),
        ("{a.b}", "invalid capture {a.b} in '{a.b}'"),
        ("plant-{site", "unbalanced braces in 'plant-{site'"),
        ("plant-[{x}]", "cannot use captures inside [...] in 'plant-[{x}]'"),
    ],
)
def test_bad_patterns(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as err:
        parse_name_pattern(text)
    assert str(err.value).startswith(message)


# ----------------------------------------------------------------------------- routes


ROOM_CAPTURE = """\
  - name: cmd
    from: {room: "plant-{site}", participant: "op-{operator}", packet: {topic: "command/{device}"}}
    to:
      kafka: main
      topic: "cmd.{site}"
      key: "{site}/{device}"
      headers: {operator: "{operator}"}
"""


def test_room_and_participant_captures_reach_every_template() -> None:
    route = route_of(config(ROOM_CAPTURE))
    assert route.wants_room("plant-berlin")
    assert not route.wants_room("lobby")
    message = packet("plant-berlin", "op-alice", "command/valve-7")
    assert route.wants(message)
    values = route.values(message)
    assert values["site"] == "berlin"
    assert values["operator"] == "alice"
    assert values["device"] == "valve-7"
    out = route.target.outbound(
        b"open", values, {}, content_type=None, default_key=None, bridge_id="b1"
    )
    assert out.topic == "cmd.berlin"
    assert out.key == b"berlin/valve-7"
    assert ("operator", "alice") in out.headers


def test_a_participant_that_does_not_match_the_capture_pattern_is_not_wanted() -> None:
    route = route_of(config(ROOM_CAPTURE))
    assert not route.wants(packet("plant-berlin", "alice", "command/valve-7"))
    assert not route.wants(packet("plant-", "op-alice", "command/valve-7"))


def test_a_captured_value_gets_the_checks_of_its_target() -> None:
    route = route_of(
        config(
            """\
  - name: cmd
    from: {room: "plant-{site}", packet: {topic: "*"}}
    to: {mqtt: plant, topic: "devices/{site}/commands"}
"""
        )
    )
    message = packet("plant-a/b", "x", "t")
    values = route.values(message)
    with pytest.raises(RejectedMessage) as err:
        route.target.outbound(b"", values, {}, content_type=None, default_key=None, bridge_id="b")
    assert err.value.reason == "bad_template_value"


def test_the_example_config_captures_the_site() -> None:
    root = Path(__file__).resolve().parents[2]
    routes = {r.name: r for r in compile_routes(load_config(root / "config.example.yaml"))}
    route = routes["commands-out"]
    assert isinstance(route, ToBusRoute)
    message = packet("plant-paris", "dashboard", "command/d1")
    out = route.target.outbound(
        b"on", route.values(message), {}, content_type=None, default_key=None, bridge_id="b"
    )
    assert out.topic == "devices/paris/d1/commands"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            '  - name: r\n    from: {room: "plant-{}", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x"}\n',
            "bad.yaml:14: connectors[0].from.room: empty capture {} in 'plant-{}'",
        ),
        (
            '  - name: r\n    from: {room: "{site}-{site}", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x"}\n',
            "bad.yaml:14: connectors[0].from.room: capture {site} appears twice in '{site}-{site}'",
        ),
        (
            '  - name: r\n    from: {room: "plant-{participant}", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x"}\n',
            "bad.yaml:14: connectors[0].from.room: capture {participant} has the name of a"
            " built-in placeholder",
        ),
        (
            '  - name: r\n    from: {room: "plant-{topic}", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x"}\n',
            "bad.yaml:14: connectors[0].from.room: capture {topic} has the name of a"
            " built-in placeholder",
        ),
        (
            '  - name: r\n    from: {room: "p-{d}", participant: "{d}", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x"}\n',
            "bad.yaml:14: connectors[0].from.participant: capture {d} is captured twice"
            " (room, participant, topic)",
        ),
        (
            '  - name: r\n    from: {room: "p-{d}", packet: {topic: "c/{d}"}}\n'
            '    to: {mqtt: plant, topic: "x"}\n',
            "bad.yaml:14: connectors[0].from.room: capture {d} is captured twice"
            " (room, participant, topic)",
        ),
        (
            '  - name: r\n    from: {room: "p-{site}", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x/{sitx}"}\n',
            "bad.yaml:15: connectors[0].to.topic: unknown placeholder {sitx} (known: kind,"
            " participant, participant_sid, room, room_sid, site, topic)",
        ),
        (
            '  - name: r\n    from: {room: "plant-{room}", rpc: {methods: [a], reply_topic: r}}\n'
            '    to: {mqtt: plant, topic: "x/{room}"}\n',
            "bad.yaml:14: connectors[0].from.room: capture {room} has the name of a built-in"
            " placeholder",
        ),
        (
            '  - name: r\n    from: {room: "*", participant: "d-{d}", room_metadata: {}}\n'
            '    to: {mqtt: plant, topic: "x"}\n',
            "bad.yaml:14: connectors[0].from.participant: room_metadata has no participant",
        ),
    ],
)
def test_bad_captures_are_located_config_errors(route: str, message: str) -> None:
    problems = errors(config(route))
    assert any(p.startswith(message) for p in problems), problems


def test_a_glob_without_captures_still_matches_as_before() -> None:
    route = route_of(
        config(
            '  - name: r\n    from: {room: "plant-*", participant: "dev-?", packet: {}}\n'
            '    to: {mqtt: plant, topic: "x/{room}"}\n'
        )
    )
    assert route.wants(packet("plant-a", "dev-1", "t"))
    assert not route.wants(packet("plant-a", "dev-12", "t"))
    assert route.values(packet("plant-a", "dev-1", "t"))["room"] == "plant-a"
