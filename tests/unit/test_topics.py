"""Topic filters with captures, templates and value checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.topics import (
    Target,
    TemplateError,
    TemplateValueError,
    glob_match,
    parse_filter,
    parse_template,
)


def test_filter_with_captures_renders_subscription_and_matches() -> None:
    flt = parse_filter("devices/{site}/{device}/telemetry")
    assert flt.mqtt_filter == "devices/+/+/telemetry"
    assert flt.captures == ("site", "device")
    assert flt.match("devices/berlin/d7/telemetry") == {"site": "berlin", "device": "d7"}
    assert flt.match("devices/berlin/d7/status") is None
    assert flt.match("devices/berlin/telemetry") is None
    assert flt.match("devices/berlin/d7/telemetry/x") is None


def test_filter_rest_capture_and_hash() -> None:
    assert parse_filter("a/{rest...}").mqtt_filter == "a/#"
    assert parse_filter("a/{rest...}").match("a/b/c") == {"rest": "b/c"}
    assert parse_filter("a/{rest...}").match("a") is None
    assert parse_filter("a/#").match("a") == {}
    assert parse_filter("a/#").match("a/b/c") == {}
    assert parse_filter("+/x").match("$SYS/x") is None  # MQTT: $ topics never match wildcards


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty topic filter"),
        ("a/#/b", "'#' must be the last level"),
        ("a/b+/c", "mixes wildcards and text"),
        ("{x}/{x}", "capture {x} appears twice"),
        ("{rest...}/a", "must be the last level"),
        ("{1x}/a", "invalid capture"),
    ],
)
def test_bad_filters(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("+", r"\+").replace("{", r"\{")):
        parse_filter(text)


def test_template_unknown_placeholder_lists_the_known_ones() -> None:
    with pytest.raises(TemplateError) as err:
        parse_template("rooms/{rom}", ["room", "topic"], Target.MQTT_TOPIC)
    assert str(err.value) == "unknown placeholder {rom} (known: room, topic)"


def test_template_literals_are_checked_for_the_target() -> None:
    with pytest.raises(TemplateError, match="contains a wildcard"):
        parse_template("rooms/+/{room}", ["room"], Target.MQTT_TOPIC)
    with pytest.raises(TemplateError, match="topic names allow only"):
        parse_template("livekit/{room}", ["room"], Target.KAFKA_TOPIC)
    with pytest.raises(TemplateError, match="unbalanced"):
        parse_template("a{room", ["room"], Target.TEXT)


@pytest.mark.parametrize("value", ["a/b", "+", "#", "x+y", "$SYS", "", "nul\x00"])
def test_participant_values_never_become_mqtt_wildcards_or_levels(value: str) -> None:
    template = parse_template(
        "rooms/{room}/{participant}", ["room", "participant"], Target.MQTT_TOPIC
    )
    with pytest.raises(TemplateValueError):
        template.render({"room": "r", "participant": value}, Target.MQTT_TOPIC)


@pytest.mark.parametrize("value", ["a/b", "with space", "ü", "", "x" * 250])
def test_values_never_make_invalid_kafka_topics(value: str) -> None:
    template = parse_template("lk.{room}", ["room"], Target.KAFKA_TOPIC)
    with pytest.raises(TemplateValueError):
        template.render({"room": value}, Target.KAFKA_TOPIC)


def test_render_ok() -> None:
    template = parse_template(
        "rooms/{room}/{participant}", ["room", "participant"], Target.MQTT_TOPIC
    )
    assert (
        template.render({"room": "lobby", "participant": "alice"}, Target.MQTT_TOPIC)
        == "rooms/lobby/alice"
    )
    assert (
        parse_template("lk.{room}", ["room"], Target.KAFKA_TOPIC).render(
            {"room": "a-b_c.d"}, Target.KAFKA_TOPIC
        )
        == "lk.a-b_c.d"
    )


@given(st.text(min_size=1, max_size=40))
def test_any_rendered_mqtt_topic_has_exactly_the_template_levels(value: str) -> None:
    template = parse_template("rooms/{room}/state", ["room"], Target.MQTT_TOPIC)
    try:
        topic = template.render({"room": value}, Target.MQTT_TOPIC)
    except TemplateValueError:
        return
    levels = topic.split("/")
    assert len(levels) == 3 and levels[1] == value
    assert "+" not in topic and "#" not in topic and not levels[1].startswith("$")


def test_glob_match() -> None:
    assert glob_match("plant-*", "plant-berlin")
    assert not glob_match("plant-*", "office")
    assert glob_match("*", "")
    assert glob_match("a?c", "abc")
