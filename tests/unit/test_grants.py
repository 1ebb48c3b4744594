"""The bridge's join token grants exactly what its routes need (R12), and lives briefly."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from bridge.app import build_bridge
from bridge.config import parse_config
from bridge.runtime.reload import plan_reload

HEAD = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: key
  api_secret: secret-secret-secret-secret-secret
  identity: bridge
  rooms: [lobby]
mqtt:
  plant: {host: broker}
connectors:
"""
FROM_ROOM = """\
  - name: up
    from: {room: "*", packet: {topic: up}}
    to: {mqtt: plant, topic: up}
"""
TO_ROOM = """\
  - name: down
    from: {mqtt: plant, topic: down}
    to: {room: lobby, packet: {topic: down}}
"""
OWN_ATTRIBUTE = """\
  - name: status
    from: {mqtt: plant, topic: status}
    to: {room: lobby, attribute: {key: status}}
"""
SERVES_RPC = """\
  - name: serve
    from: {room: "*", rpc: {methods: [ask], reply_topic: answers}}
    to: {mqtt: plant, topic: "ask/{method}"}
"""


def claims(connectors: str) -> dict[str, Any]:
    bridge = build_bridge(parse_config(HEAD + connectors, "test.yaml"))
    token = bridge._token("lobby")
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def grants(connectors: str) -> dict[str, Any]:
    video = claims(connectors)["video"]
    return {k: video.get(k) for k in ("canPublish", "canPublishData", "canUpdateOwnMetadata")}


@pytest.mark.parametrize(
    ("connectors", "publish_data", "update_own"),
    [
        (FROM_ROOM, False, False),  # only listens
        (TO_ROOM, True, False),
        (FROM_ROOM + OWN_ATTRIBUTE, True, True),
        (SERVES_RPC, True, False),  # answers calls: responses are data packets
    ],
)
def test_grants_follow_the_routes(connectors: str, publish_data: bool, update_own: bool) -> None:
    got = grants(connectors)
    assert got["canPublish"] is False  # no media, ever (LiveKit's default would be True)
    assert bool(got["canPublishData"]) is publish_data
    assert bool(got["canUpdateOwnMetadata"]) is update_own
    video = claims(connectors)["video"]
    assert (video["room"], video["roomJoin"], video.get("canSubscribe", True)) == (
        "lobby",
        True,
        True,
    )


def test_tokens_are_short_lived() -> None:
    token = claims(FROM_ROOM)
    assert token["exp"] - time.time() <= 900 + 5


def test_a_reload_needing_more_grants_needs_a_restart() -> None:
    old = parse_config(HEAD + FROM_ROOM, "test.yaml")
    new = parse_config(HEAD + FROM_ROOM + TO_ROOM, "test.yaml")
    assert plan_reload(old, new).needs_restart == (
        "connectors: the new routes need the token grants canPublishData (needs a restart)",
    )
    # Fewer grants than the rooms hold is fine.
    assert plan_reload(new, old).needs_restart == ()
