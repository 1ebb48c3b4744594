"""`plan_reload`: what a new configuration changes, and what of it needs a restart."""

from __future__ import annotations

from bridge.config import Config, parse_config
from bridge.runtime.reload import plan_reload

HEAD = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: key
  api_secret: secret-secret-secret-secret-secret
  identity: bridge
  rooms: [{rooms}]
mqtt:
  plant: {{host: {host}}}
{extra}connectors:
"""
TELEMETRY = """\
  - name: telemetry
    from: {mqtt: plant, topic: "devices/{device}"}
    to: {room: lobby, packet: {topic: "t.{device}"}}
"""
CHAT = """\
  - name: chat
    from: {room: "*", packet: {topic: chat}}
    to: {mqtt: plant, topic: "chat/%s"}
"""
RPC = """\
  - name: ask
    from: {mqtt: plant, topic: "ask/{who}", reply: {}}
    to: {room: lobby, rpc: {method: ask, destination: "{who}"}}
"""


def config(*connectors: str, rooms: str = "lobby", host: str = "broker", extra: str = "") -> Config:
    text = HEAD.format(rooms=rooms, host=host, extra=extra) + "".join(connectors)
    return parse_config(text, "test.yaml")


def test_connectors_are_compared_by_name() -> None:
    old = config(TELEMETRY, CHAT % "a")
    plan = plan_reload(old, config(CHAT % "b", RPC.replace("ask", "ask2")))
    assert plan.removed == ("telemetry",)
    assert plan.changed == ("chat",)
    assert plan.added == ("ask2",)
    # An RPC connector is not reloaded: the whole plan is refused.
    assert plan.needs_restart == (
        "connectors.ask2: an RPC connector (added, removed or changed) (needs a restart)",
    )


def test_unchanged_is_empty() -> None:
    plan = plan_reload(config(TELEMETRY), config(TELEMETRY))
    assert plan.empty and not plan.needs_restart
    assert plan.summary() == "no changes"


def test_rooms_are_joined_and_left_without_a_restart() -> None:
    plan = plan_reload(config(TELEMETRY, rooms="lobby, a"), config(TELEMETRY, rooms="lobby, b"))
    assert (plan.rooms_joined, plan.rooms_left, plan.needs_restart) == (("b",), ("a",), ())


def test_what_needs_a_restart_is_listed() -> None:
    old = config(TELEMETRY)
    new = parse_config(
        (HEAD.format(rooms="lobby", host="other", extra="bridge: {queue_size: 5}\n") + TELEMETRY)
        .replace("identity: bridge", "identity: b2")
        .replace("secret-secret-secret-secret-secret", "another-secret-another-secret-xyz-0"),
        "test.yaml",
    )
    assert plan_reload(old, new).needs_restart == (
        "livekit.api_secret: changed (needs a restart)",
        "livekit.identity: changed (needs a restart)",
        "mqtt.plant.host: changed (needs a restart)",
        "bridge.queue_size: changed (needs a restart)",
    )


def test_a_new_bus_and_an_unused_one_need_no_restart() -> None:
    extra = "  spare: {host: spare}\n"
    with_spare = parse_config(
        HEAD.format(rooms="lobby", host="broker", extra="").replace(
            "mqtt:\n  plant: {host: broker}\n", "mqtt:\n  plant: {host: broker}\n" + extra
        )
        + TELEMETRY,
        "test.yaml",
    )
    assert not plan_reload(config(TELEMETRY), with_spare).needs_restart
    changed_spare = with_spare.model_copy(
        update={
            "mqtt": {
                **with_spare.mqtt,
                "spare": with_spare.mqtt["spare"].model_copy(update={"host": "x"}),
            }
        }
    )
    assert not plan_reload(with_spare, changed_spare).needs_restart
