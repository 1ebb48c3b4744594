"""A missing or broken server is a clear error naming the service, the command and its log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services import Kafka, LiveKitServer, Mosquitto, ServiceError


def test_missing_livekit_binary_names_service_and_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVEKIT_BIN", str(tmp_path / "nowhere" / "livekit-server"))
    with pytest.raises(ServiceError) as err:
        LiveKitServer(name="livekit-server", workdir=tmp_path / "lk").start()
    text = str(err.value)
    assert "livekit-server" in text and "nowhere" in text
    assert "scripts/services/install" in text


def test_missing_kafka_jars_names_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_LIBS", str(tmp_path / "no-libs"))
    with pytest.raises(ServiceError, match=r"kafka: .*no-libs not found"):
        Kafka(name="kafka", workdir=tmp_path / "k").start()


def test_server_that_exits_reports_status_command_and_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "mosquitto" that prints a complaint and exits 3: the error must carry all of it.
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\necho 'Error: unable to open config' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(ServiceError) as err:
        Mosquitto(name="mosquitto", workdir=tmp_path / "m", port=1).start()
    text = str(err.value)
    assert "mosquitto: exited with status 3 before ready" in text
    assert str(fake) in text
    assert "Error: unable to open config" in text


def test_server_never_ready_is_stopped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\necho still starting\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    service = Mosquitto(name="mosquitto", workdir=tmp_path / "m", port=1, ready_timeout=1.0)
    with pytest.raises(ServiceError, match=r"not ready within 1 s[\s\S]*still starting"):
        service.start()
    assert service.process is None  # stopped, not leaked


def test_port_taken_by_another_process_is_reported(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServiceError, match=rf"mosquitto: port {port} is already taken"):
            Mosquitto(name="mosquitto", workdir=tmp_path / "m", port=port).start()
