"""The command line: check and its summary, routes, schema, options, exit codes, closed pipes."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.cli import EX_CONFIG, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main` sets up logging (root handlers, levels): put it back for the other tests."""
    root, own = logging.getLogger(), logging.getLogger("roombus")
    handlers, levels = root.handlers[:], (root.level, own.level)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    own.setLevel(levels[1])


def test_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "config.example.yaml")]) == 0
    assert "valid (8 connectors" in capsys.readouterr().out


def test_check_exits_78_with_located_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("livekit:\n  url: nope\n")
    assert main(["check", str(bad)]) == EX_CONFIG == 78
    err = capsys.readouterr().err.splitlines()
    assert f"{bad}:2: livekit.url: expected ws://host:port, wss://, http:// or https://" in err
    assert f"{bad}:1: connectors: required key is missing" in err


def test_run_with_a_bad_file_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("[not a mapping]\n")
    assert main(["run", str(bad)]) == 78


def test_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "roombus configuration"
    assert "connectors" in schema["required"]


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "--log-format", "json", "run", "c.yaml"],
        ["run", "--log-level", "debug", "--log-format", "json", "c.yaml"],
        ["run", "c.yaml", "--log-level", "debug", "--log-format", "json"],
        ["--log-level", "debug", "run", "c.yaml", "--log-format", "json"],
    ],
)
def test_global_options_go_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.config, args.log_level, args.log_format) == (
        "run",
        "c.yaml",
        "debug",
        "json",
    )


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOMBUS_LOG_LEVEL", "trace")
    args = build_parser().parse_args(["check", "c.yaml"])
    assert (args.log_level, args.log_format) == ("trace", "text")
    assert build_parser().parse_args(["check", "c.yaml", "--log-level", "error"]).log_level == (
        "error"
    )


def test_run_takes_watch() -> None:
    assert build_parser().parse_args(["run", "--watch", "c.yaml"]).watch is True
    assert build_parser().parse_args(["run", "c.yaml"]).watch is False


def test_a_bad_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["schema", "--log-level", "loud"])
    assert exit_.value.code == 2


def test_schema_into_a_closed_pipe_exits_quietly() -> None:
    # The shell pipeline of the issue: `roombus schema | head -1`.
    out = subprocess.run(
        f"{shlex.quote(sys.executable)} -m bridge schema | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        executable="/bin/bash",
    )
    assert out.stdout == "{\n"
    assert "Traceback" not in out.stderr
    assert "BrokenPipeError" not in out.stderr
    assert out.stderr == ""


@pytest.mark.parametrize("command", [["schema"], ["check", "config.example.yaml"]])
def test_a_pipe_closed_before_the_first_write_exits_0_quietly(command: list[str]) -> None:
    # The reader is gone before roombus writes anything: every write fails (EPIPE).
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bridge", *command],
            stdout=write,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            check=False,
        )
    finally:
        os.close(write)
    assert (out.returncode, out.stderr) == (0, b"")


# ----------------------------------------------------------------------------- check summary


def test_check_prints_a_summary_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("roombus-test-secret-0123456789abcdef\n")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "roombus-test-secret-0123456789abcdef")
    text = (ROOT / "config.example.yaml").read_text()
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{config}: valid (8 connectors, 1 MQTT brokers, 1 Kafka clusters)"
    assert "rooms    plant-berlin" in lines
    assert "mqtt     plant: 127.0.0.1:1883 (MQTT 5)" in lines
    assert "kafka    main: 127.0.0.1:9092" in lines
    assert lines.index("routes room → bus (5)") < lines.index("routes bus → room (1)")
    assert "routes RPC (2)" in lines
    assert any(
        line.split()
        == [
            "telemetry-in",
            "mqtt",
            "plant",
            "devices/{site}/{device}/telemetry",
            "→",
            "room",
            "plant-{site}",
            "packet",
            "topic",
            "telemetry.{device}",
        ]
        for line in lines
    )
    assert len(lines) < 25  # one screen
    assert "roombus-test-secret" not in out


SECRETS_YAML = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: ${{file:{secret}}}
  rooms: [lobby]
mqtt:
  plant: {{host: 127.0.0.1, username: u, password: "${{RB_TEST_MQTT_PASSWORD}}"}}
connectors:
  - name: leak
    from: {{room: lobby, packet: {{topic: "*"}}}}
    to: {{mqtt: plant, topic: "x/${{file:{secret}}}/{{room}}"}}
"""


def test_check_and_routes_redact_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("file-secret-0123456789abcdef-0123456789\n")
    monkeypatch.setenv("RB_TEST_MQTT_PASSWORD", "mqtt-password-from-env")
    config = tmp_path / "c.yaml"
    config.write_text(SECRETS_YAML.format(secret=secret))
    assert main(["check", str(config)]) == 0
    assert (
        main(["routes", str(config), "--event", "packet", "--room", "lobby", "--topic", "t"]) == 0
    )
    out = capsys.readouterr().out
    assert "file-secret" not in out
    assert "mqtt-password-from-env" not in out
    assert "mqtt plant x/***/{room}" in out
    assert "topic 'x/***/lobby'" in out


# ----------------------------------------------------------------------------- routes


def routes(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(["routes", str(ROOT / "config.example.yaml"), *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_routes_of_an_mqtt_topic(capsys: pytest.CaptureFixture[str]) -> None:
    out = routes(capsys, "--topic", "devices/berlin/d1/telemetry", "--payload", '{"t": 1}')
    assert out == [
        "telemetry-in: mqtt plant devices/{site}/{device}/telemetry",
        "  values   site='berlin' device='d1' topic='devices/berlin/d1/telemetry' broker='plant'",
        "  → room plant-berlin: packet topic 'telemetry.d1' (reliable)",
        "  payload  '{\"t\": 1}'",
    ]


def test_routes_filter_by_bus(capsys: pytest.CaptureFixture[str]) -> None:
    assert routes(capsys, "--topic", "devices/berlin/d1/telemetry", "--kafka", "main") == [
        "no route takes it"
    ]
    assert routes(capsys, "--topic", "devices/berlin/d1/telemetry", "--mqtt", "plant")[0] == (
        "telemetry-in: mqtt plant devices/{site}/{device}/telemetry"
    )


def test_routes_of_a_room_event(capsys: pytest.CaptureFixture[str]) -> None:
    out = routes(
        capsys,
        "--event",
        "packet",
        "--room",
        "plant-berlin",
        "--topic",
        "command/valve-7",
        "--payload",
        "open",
    )
    assert out[0] == "commands-out: room plant-{site} packet command/{device}"
    assert "  → mqtt plant: topic 'devices/berlin/valve-7/commands' (QoS 1)" in out
    assert out[-1] == "  payload  'open'"


def test_routes_of_a_room_event_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = routes(
        capsys,
        "--event",
        "text_stream",
        "--room",
        "plant-berlin",
        "--participant",
        "alice",
        "--topic",
        "chat",
        "--payload",
        "hi",
    )
    assert out[0] == "chat-to-kafka: room plant-* text_stream chat"
    assert "  → kafka main: topic 'livekit.chat', key 'plant-berlin/alice'" in out
    payload = json.loads(eval(out[-1].removeprefix("  payload  ")))
    assert payload["payload"] == "hi"
    assert payload["lk-participant"] == "alice"


def test_routes_show_a_rejection(capsys: pytest.CaptureFixture[str]) -> None:
    out = routes(capsys, "--topic", "rpc/berlin/dev1/reboot")
    assert out[-1] == (
        "  rejected no_reply_address: MQTT request without a response topic (on_reject: drop)"
    )
    out = routes(capsys, "--topic", "rpc/berlin/dev1/reboot", "--response-topic", "r/1")
    assert "  → room plant-berlin: RPC 'reboot' on 'dev1', timeout 10 s" in out


def test_routes_of_a_room_rpc(capsys: pytest.CaptureFixture[str]) -> None:
    out = routes(capsys, "--event", "rpc", "--room", "plant-berlin", "--value", "method=backend.x")
    assert out[0] == "backend-rpc: room plant-* rpc backend.*"
    assert routes(capsys, "--event", "rpc", "--room", "plant-berlin", "--value", "method=x") == [
        "no route takes it"
    ]


def test_routes_needs_a_sample(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["routes", str(ROOT / "config.example.yaml")])
    assert exit_.value.code == 2


def test_http_address_from_the_config_else_the_environment() -> None:
    from bridge.cli import http_address
    from bridge.config import ConfigError, parse_config

    head = (ROOT / "config.example.yaml").read_text()
    without = parse_config(head.replace("  http_port: 8081\n", ""), "c.yaml")
    with_port = parse_config(head, "c.yaml")
    assert http_address(without, {}) is None
    assert http_address(without, {"ROOMBUS_HTTP_PORT": "8081"}) == ("127.0.0.1", 8081)
    env = {"ROOMBUS_HTTP_PORT": "9000", "ROOMBUS_HTTP_HOST": "0.0.0.0"}
    assert http_address(without, env) == ("0.0.0.0", 9000)
    assert http_address(with_port, env) == ("0.0.0.0", 8081)  # the config's port wins
    with pytest.raises(ConfigError, match="ROOMBUS_HTTP_PORT"):
        http_address(without, {"ROOMBUS_HTTP_PORT": "http"})
