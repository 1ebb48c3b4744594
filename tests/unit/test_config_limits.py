"""Malformed files that used to crash or hang the loader get a located ConfigError (R9)."""

from __future__ import annotations

import pytest

from bridge.config import MAX_PROBLEMS, ConfigError, parse_config

HEAD = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: key
  api_secret: secret-secret-secret-secret-secret
  rooms: [lobby]
connectors:
  - name: c
    from: {room: "*", packet: {topic: t}}
    to: {mqtt: plant, topic: t}
mqtt:
  plant: {host: broker}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "bad.yaml")
    return caught.value.problems


def test_nul_byte() -> None:
    assert problems("livekit:\n  url: ws://x\x00\n") == [
        "bad.yaml:2: invalid YAML: character 0x0000 is not allowed"
    ]


@pytest.mark.parametrize("depth", [100, 10_000])
def test_deep_nesting(depth: int) -> None:
    (problem,) = problems("a: " + "[" * depth + "]" * depth + "\n")
    assert problem.startswith("bad.yaml:1: ") and "nest" in problem


def test_huge_integer() -> None:
    (problem,) = problems(
        HEAD.replace("rooms: [lobby]", "rooms: [lobby]\n  token_ttl: " + "9" * 5001)
    )
    assert problem.startswith("bad.yaml:6: livekit.token_ttl: unreadable value: ")


def test_alias_bomb() -> None:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    (problem,) = problems(text)
    assert "what aliases repeat" in problem and problem.startswith("bad.yaml:")


def test_aliases_of_normal_size_still_work() -> None:
    config = parse_config(
        HEAD.replace("rooms: [lobby]", "rooms: &rooms [lobby, hall]\n  room_patterns: *rooms"),
        "ok.yaml",
    )
    assert config.livekit.room_patterns == ["lobby", "hall"]


def test_many_duplicate_keys_are_reported_once_with_a_count() -> None:
    found = problems("".join(f"k: {i}\n" for i in range(5_000)))
    assert len(found) == MAX_PROBLEMS + 1
    assert found[0] == "bad.yaml:2: k: duplicate key 'k'"
    assert found[-1] == f"... and {4_999 - MAX_PROBLEMS} more problems"


def test_a_huge_file_is_refused_before_parsing() -> None:
    (problem,) = problems("# " + "x" * (1 << 20) + "\n")
    assert problem.startswith("bad.yaml: larger than ")


@pytest.mark.parametrize(
    ("rooms", "expected"),
    [
        ("[" + "r" * 300 + "]", "room name of 300 bytes: livekit-server allows 256"),
        ('["lob\\u0007by"]', "contains control characters"),
    ],
)
def test_room_names_livekit_would_refuse(rooms: str, expected: str) -> None:
    (problem,) = problems(HEAD.replace("rooms: [lobby]", f"rooms: {rooms}"))
    assert problem.startswith("bad.yaml:5: livekit.rooms") and expected in problem


def test_mqtt_password_without_username() -> None:
    (problem,) = problems(HEAD.replace("{host: broker}", "{host: broker, password: pw}"))
    assert problem.startswith("bad.yaml:11: mqtt.plant") and "username" in problem
    assert "'pw'" not in problem  # a secret field's value is never echoed
