"""``${...}`` interpolation: every supported form, every refused one, and the secret set."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, parse_config

BASE = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: SECRET_LINE
  rooms: [lobby]
mqtt:
  plant:
    host: HOST_LINE
    username: device
    password: PASSWORD_LINE
kafka:
  main:
    bootstrap_servers: [127.0.0.1:9092]
    sasl: {mechanism: PLAIN, username: bridge, password: sasl-password-1}
connectors:
  - name: in
    from: {mqtt: plant, topic: "devices/{site}/{device}/telemetry"}
    to: {room: "lobby", packet: {topic: "t.{device}"}}
"""
LONG_SECRET = "a-secret-of-at-least-32-characters!"


def config_text(
    secret: str = LONG_SECRET, host: str = "127.0.0.1", password: str = "mqtt-password-1"
) -> str:
    return (
        BASE.replace("SECRET_LINE", secret)
        .replace("HOST_LINE", host)
        .replace("PASSWORD_LINE", password)
    )


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.yaml")
    return err.value.problems


# ----------------------------------------------------------------------------- supported forms


def test_plain_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RB_HOST", "broker.example")
    assert parse_config(config_text(host="${RB_HOST}")).mqtt["plant"].host == "broker.example"


def test_variable_inside_a_longer_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RB_DOMAIN", "example")
    config = parse_config(config_text(host="mqtt.${RB_DOMAIN}.org"))
    assert config.mqtt["plant"].host == "mqtt.example.org"


def test_unset_variable_is_a_located_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RB_UNSET", raising=False)
    assert errors(config_text(host="${RB_UNSET}")) == [
        "c.yaml:8: mqtt.plant.host: environment variable RB_UNSET is not set "
        "(use ${RB_UNSET:-default} for a default)"
    ]


@pytest.mark.parametrize(("value", "expected"), [(None, "fallback"), ("", "fallback"), ("x", "x")])
def test_default_when_unset_or_empty(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str
) -> None:
    if value is None:
        monkeypatch.delenv("RB_HOST", raising=False)
    else:
        monkeypatch.setenv("RB_HOST", value)
    assert parse_config(config_text(host="${RB_HOST:-fallback}")).mqtt["plant"].host == expected


def test_default_may_hold_colons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RB_URL", raising=False)
    text = config_text().replace("ws://127.0.0.1:7880", "${RB_URL:-ws://10.0.0.1:7880}")
    assert parse_config(text).livekit.url == "ws://10.0.0.1:7880"


def test_required_variable_is_taken_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RB_HOST", "broker.example")
    config = parse_config(config_text(host="${RB_HOST:?set RB_HOST to the broker}"))
    assert config.mqtt["plant"].host == "broker.example"


@pytest.mark.parametrize("value", [None, ""])
def test_required_variable_unset_or_empty_names_the_message(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("RB_HOST", raising=False)
    else:
        monkeypatch.setenv("RB_HOST", value)
    assert errors(config_text(host="${RB_HOST:?set RB_HOST to the broker}")) == [
        "c.yaml:8: mqtt.plant.host: environment variable RB_HOST is not set or empty: "
        "set RB_HOST to the broker"
    ]


def test_file_content_without_its_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET + "\n")
    config = parse_config(config_text(secret=f"${{file:{secret}}}"))
    assert config.livekit.api_secret == LONG_SECRET


def test_file_keeps_all_but_one_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "meta"
    path.write_text("line one\nline two\n\n")
    text = config_text().replace(
        "  rooms: [lobby]", f"  metadata: ${{file:{path}}}\n  rooms: [lobby]"
    )
    assert parse_config(text).livekit.metadata == "line one\nline two\n"


def test_unreadable_file_is_named_without_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert errors(config_text(secret=f"${{file:{missing}}}")) == [
        f"c.yaml:4: livekit.api_secret: cannot read ${{file:{missing}}}: No such file or directory"
    ]


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    (problem,) = errors(config_text(secret=f"${{file:{tmp_path}}}"))
    assert problem.startswith(f"c.yaml:4: livekit.api_secret: cannot read ${{file:{tmp_path}}}: ")


def test_a_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bin"
    path.write_bytes(b"\xff\xfe secret")
    assert errors(config_text(secret=f"${{file:{path}}}")) == [
        f"c.yaml:4: livekit.api_secret: ${{file:{path}}} is not UTF-8 text"
    ]


def test_escaped_dollar_brace_is_literal() -> None:
    config = parse_config(config_text(host="$${NOT_A_VAR}"))
    assert config.mqtt["plant"].host == "${NOT_A_VAR}"


def test_a_lone_dollar_stays() -> None:
    config = parse_config(config_text(password="pa$$word-$HOME"))
    assert config.mqtt["plant"].password == "pa$$word-$HOME"


# ----------------------------------------------------------------------------- refused forms


@pytest.mark.parametrize(
    "form",
    [
        "${HOST:127.0.0.1}",
        "${X:+y}",
        "${}",
        "${1ABC}",
        "${file:}",
        "${X:=y}",
        "${A:-${B}}",
        "${X-y}",
    ],
)
def test_other_forms_are_located_errors(form: str) -> None:
    (problem,) = errors(config_text(host=f'"{form}"'))
    shown = form if form != "${A:-${B}}" else "${A:-${B}"
    assert problem == (
        f"c.yaml:8: mqtt.plant.host: unsupported interpolation {shown}; "
        "use ${VAR}, ${VAR:-default}, ${VAR:?message} or ${file:PATH}"
    )


def test_unterminated_form_is_an_error() -> None:
    (problem,) = errors(config_text(host='"${HOST"'))
    assert problem.startswith("c.yaml:8: mqtt.plant.host: unsupported interpolation ${ ")


def test_every_bad_form_of_a_file_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RB_A", raising=False)
    text = config_text(host="${RB_A}", password="${X:+y}")
    assert [p.split(": ")[1] for p in errors(text)] == ["mqtt.plant.host", "mqtt.plant.password"]


# ----------------------------------------------------------------------------- secrets


def test_secrets_hold_secret_fields_and_file_values(tmp_path: Path) -> None:
    path = tmp_path / "host"
    path.write_text("broker.internal\n")
    config = parse_config(config_text(host=f"${{file:{path}}}"))
    assert config.secrets() == {
        LONG_SECRET,
        "mqtt-password-1",
        "sasl-password-1",
        "broker.internal",
    }


def test_secret_fields_are_not_in_repr() -> None:
    config = parse_config(config_text())
    assert LONG_SECRET not in repr(config)
    assert "mqtt-password-1" not in repr(config)


def test_a_token_is_a_secret() -> None:
    text = (
        config_text()
        .replace("  api_key: devkey\n", "")
        .replace(f"  api_secret: {LONG_SECRET}\n", "  token: header.payload.signature\n")
    )
    assert "header.payload.signature" in parse_config(text).secrets()


def test_type_errors_of_secret_fields_never_echo_the_value() -> None:
    (problem,) = errors(config_text(password="[hunter22]"))
    assert "hunter22" not in problem
    assert problem == (
        "c.yaml:10: mqtt.plant.password: Input should be a valid string (value not shown: a secret)"
    )


def test_a_short_api_secret_is_not_echoed() -> None:
    (problem,) = errors(config_text(secret="tooshort"))
    assert "tooshort" not in problem


def test_file_values_are_redacted_from_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "name"
    path.write_text("private-broker-name")
    text = config_text().replace("{mqtt: plant,", f"{{mqtt: '${{file:{path}}}',")
    (problem,) = errors(text)
    assert "private-broker-name" not in problem
    assert problem == "c.yaml:17: connectors[0].from.mqtt: unknown MQTT broker '***' (plant)"


def test_file_values_are_redacted_from_pydantic_inputs(tmp_path: Path) -> None:
    path = tmp_path / "port"
    path.write_text("not-a-port-secret")
    text = config_text().replace("    username: device\n", f"    port: ${{file:{path}}}\n")
    (problem,) = errors(text)
    assert "not-a-port-secret" not in problem
    assert "(got '***')" in problem
