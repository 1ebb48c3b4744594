"""Route rules: `where:` (CEL) compile errors located, evaluation without raising; allow/deny."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bridge.config import ConfigError, parse_config
from bridge.router import ToBusRoute, ToRoomRoute, compile_routes
from bridge.rules import Access, Condition, Participant, RuleError, Where, compile_rules
from tests.unit.configs import head

HEAD = head()

MQTT_IN = """\
  - name: in
    from: {mqtt: plant, topic: "devices/{site}/{device}/telemetry"}
    to: {room: "lobby", packet: {topic: "t.{device}", destinations: ["device-{device}"]}}
"""

ROOM_OUT = """\
  - name: out
    from: {room: "*", packet: {topic: "command/{device}"}}
    to: {mqtt: plant, topic: "devices/{device}/commands"}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml")
    return err.value.problems


def connector(base: str, extra: str) -> str:
    return HEAD + base + extra


# ----------------------------------------------------------------------------- config errors


def test_unknown_name_is_located_with_the_known_names() -> None:
    text = connector(MQTT_IN, "    where: 'payload.temp > 30 && devic == \"d7\"'\n")
    assert errors(text) == [
        "bad.yaml:13: connectors[0].where: column 22: undeclared reference to 'devic'"
        " (known: broker, device, site, topic, headers, payload)"
    ]


def test_syntax_error_is_located() -> None:
    (problem,) = errors(connector(ROOM_OUT, "    where: 'participant =='\n"))
    assert problem.startswith("bad.yaml:13: connectors[0].where: column 15: Syntax error:")


def test_type_error_known_at_compile_time_and_a_non_bool() -> None:
    (problem,) = errors(connector(ROOM_OUT, "    where: 'device + 1 == 2'\n"))
    assert problem.startswith("bad.yaml:13: connectors[0].where: column 8: found no matching")
    assert errors(connector(ROOM_OUT, "    where: 'device'\n")) == [
        "bad.yaml:13: connectors[0].where: the expression is a string, not a bool"
    ]
    assert errors(connector(ROOM_OUT, "    where: ' '\n")) == [
        "bad.yaml:13: connectors[0].where: an empty expression (leave `where` out to take"
        " every message)"
    ]


def test_payload_on_a_stream_route_is_refused() -> None:
    text = HEAD + (
        "  - name: chat\n"
        "    from: {room: '*', text_stream: {topic: chat}}\n"
        "    to: {mqtt: plant, topic: chat}\n"
        "    where: 'payload.x == 1'\n"
    )
    (problem,) = errors(text)
    assert problem.startswith("bad.yaml:13: connectors[0].where: a text_stream route chooses")


def test_access_rules_need_someone_to_judge() -> None:
    no_destinations = HEAD + (
        "  - name: in\n"
        "    from: {mqtt: plant, topic: 'a/{device}'}\n"
        "    to: {room: lobby, packet: {topic: t}}\n"
        "    allow: [{identity: 'device-*'}]\n"
    )
    assert errors(no_destinations) == [
        "bad.yaml:13: connectors[0].allow: on a bus-to-room connector allow/deny judge the"
        " destination identities: the packet target needs destinations (or an identity)"
    ]
    room_metadata = HEAD + (
        "  - name: meta\n"
        "    from: {room: '*', room_metadata: {}}\n"
        "    to: {mqtt: plant, topic: meta}\n"
        "    deny: [{kind: agent}]\n"
    )
    assert errors(room_metadata) == [
        "bad.yaml:13: connectors[0].deny: room_metadata has no participant for allow/deny to judge"
    ]


def test_bad_conditions_are_located() -> None:
    assert errors(connector(ROOM_OUT, "    deny: [{}]\n")) == [
        "bad.yaml:13: connectors[0].deny[0]: a condition needs identity, kind or attributes"
    ]
    assert errors(connector(ROOM_OUT, "    allow: [{kind: robot}]\n")) == [
        "bad.yaml:13: connectors[0].allow[0].kind[0]: Input should be 'standard', 'agent',"
        " 'sip', 'egress' or 'ingress' (got 'robot')"
    ]
    assert errors(connector(ROOM_OUT, "    allow: [{idenity: x}]\n")) == [
        "bad.yaml:13: connectors[0].allow[0].idenity: unknown key (check its spelling and its"
        " section)"
    ]


def test_rules_compile_onto_the_routes() -> None:
    text = HEAD + MQTT_IN.rstrip("\n") + "\n    where: 'device == \"d7\"'\n"
    text += ROOM_OUT + "    allow: [{kind: [standard, agent], attributes: {role: 'op*'}}]\n"
    inbound, outbound = compile_routes(parse_config(text))
    assert isinstance(inbound, ToRoomRoute) and isinstance(outbound, ToBusRoute)
    assert inbound.rules is not None and inbound.rules.where is not None
    assert inbound.rules.access is None
    assert outbound.rules is not None and outbound.rules.access is not None
    assert outbound.rules.access.allow == (
        Condition(None, frozenset({"standard", "agent"}), (("role", "op*"),)),
    )
    assert compile_routes(parse_config(HEAD + ROOM_OUT))[0].rules is None


# ----------------------------------------------------------------------------- where


NAMES = ("room", "participant", "topic", "device", "kind")


def test_where_passes_and_says_why_not() -> None:
    where = Where('payload.temp > 30 && device == "d7"', NAMES)
    assert where.uses_payload and not where.uses_headers
    values = {"device": "d7"}
    assert where.test(values, {}, b'{"temp": 31.5}') is None
    assert where.test(values, {}, b'{"temp": 30}') == "false"
    assert where.test({"device": "d8"}, {}, b'{"temp": 31}') == "false"
    # Evaluation errors filter, never raise: a type mismatch, a missing field, not JSON.
    assert where.test(values, {}, b'{"temp": "hot"}') == (
        "error: UNKNOWN: No matching overloads found : _>_(string, int64)"
    )
    assert (where.test(values, {}, b"{}") or "").startswith("error: NOT_FOUND")
    assert (where.test(values, {}, b"not json") or "").startswith("payload is not JSON")
    assert (where.test(values, {}, None) or "").startswith("error:")
    assert (where.test(values, {}, b'{"temp": 1' + b"0" * 30 + b"}") or "").startswith("error")


def test_where_without_payload_never_decodes_it() -> None:
    where = Where('topic.startsWith("command/") && headers["lk-kind"] == "packet-reliable"', NAMES)
    assert not where.uses_payload and where.uses_headers
    headers = {"lk-kind": "packet-reliable"}
    assert where.test({"topic": "command/x"}, headers, b"\xff not json") is None
    # "payload" only inside a string literal is no use of the payload.
    literal = Where('topic == "payload" // payload', NAMES)
    assert not literal.uses_payload
    assert literal.test({"topic": "payload"}, {}, b"\xff") is None


def test_where_dyn_result_that_is_not_bool() -> None:
    where = Where("payload.ok", NAMES)
    assert where.test({}, {}, b'{"ok": true}') is None
    assert where.test({}, {}, b'{"ok": "yes"}') == "error: the expression gave a string, not a bool"


def test_where_compile_errors() -> None:
    with pytest.raises(RuleError, match="undeclared reference to 'x'"):
        Where("x == 1", NAMES)
    # Names that are not identifiers (header.NAME placeholders) are not declared.
    with pytest.raises(RuleError, match="undeclared reference"):
        Where("header == 'a'", (*NAMES, "header.reply"))


def test_no_rules_compile_to_none() -> None:
    assert compile_rules(None, [], [], NAMES) is None


# ----------------------------------------------------------------------------- access


def info(kind: int, **attributes: str) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, attributes=attributes)


def test_participant_from_livekit_info() -> None:
    assert Participant.of("a", info(4, role="x")) == Participant("a", "agent", {"role": "x"})
    assert Participant.of("a", info(3)).kind == "sip"
    assert Participant.of("a", None) == Participant("a")


def test_allow_and_deny() -> None:
    access = Access(
        allow=(Condition(identity="device-*"), Condition(kinds=frozenset({"standard"}))),
        deny=(Condition(attributes=(("banned", "yes"),)),),
    )
    assert access.permits(Participant.of("device-1", info(4)))
    assert access.permits(Participant.of("alice", info(0)))
    assert not access.permits(Participant.of("bot", info(4)))
    assert not access.permits(Participant.of("device-1", info(0, banned="yes")))


def test_conditions_on_state_fail_closed_for_unknown_participants() -> None:
    by_identity = Access(allow=(Condition(identity="device-*"),))
    assert by_identity.permits(Participant("device-9"))
    assert not by_identity.needs_state
    by_kind = Access(deny=(Condition(kinds=frozenset({"agent"})),))
    assert by_kind.needs_state
    assert not by_kind.permits(Participant("someone"))  # unknown: cannot tell it is no agent
    assert by_kind.permits(Participant.of("someone", info(0)))
    allow_kind = Access(allow=(Condition(kinds=frozenset({"standard"})),))
    assert not allow_kind.permits(Participant("someone"))


def test_attribute_globs_and_unset_attributes() -> None:
    access = Access(allow=(Condition(identity="op-*", attributes=(("role", "oper*"),)),))
    assert access.permits(Participant.of("op-1", info(0, role="operator")))
    assert not access.permits(Participant.of("op-1", info(0)))  # unset is ""
    assert not access.permits(Participant.of("x-1", info(0, role="operator")))
