"""Configuration text unit tests start from: the livekit section and the buses, then connectors.

Line for line the same in every test, so the locations in expected error messages
(``bad.yaml:14: connectors[0]...``) stay where the tests say.
"""

from __future__ import annotations


def head(room: str = "lobby", *, kafka: bool = False) -> str:
    """``livekit`` (joining `room`), ``mqtt.plant``, optionally ``kafka.main``, ``connectors:``."""
    text = f"""\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: a-secret-of-at-least-32-characters!
  rooms: [{room}]
mqtt:
  plant:
    host: 127.0.0.1
"""
    if kafka:
        text += "kafka:\n  main:\n    bootstrap_servers: [127.0.0.1:9092]\n"
    return text + "connectors:\n"
