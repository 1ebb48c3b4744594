"""Start, check and stop the real servers the tests run against.

`scripts/services/install` builds and caches the binaries; this module runs them for one test
session, each in a fresh working directory with its own log file, inside the test network
namespace that `scripts/netns` made (no traffic can leave it). A server that is missing, fails to
start or is not ready in time raises `ServiceError` with the service name, the command and the
tail of its log, which the fixtures turn into a failing test, never a skip.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

LIVEKIT_API_KEY = "roombus-devkey"
# livekit-server refuses secrets shorter than 32 characters.
LIVEKIT_API_SECRET = "roombus-test-secret-0123456789abcdef"


class ServiceError(RuntimeError):
    """A server could not be found, started or reached."""


def _pinned(name: str) -> str:
    """A path or version from scripts/services/versions (the single place they are pinned).

    scripts/test exports them; a bare pytest run reads them from the file the same way.
    """
    if name not in os.environ:
        versions = ROOT / "scripts" / "services" / "versions"
        out = subprocess.run(
            ["/bin/bash", "-c", f'. "{versions}"; env -0'], capture_output=True, check=True
        ).stdout.decode()
        for entry in out.split("\0"):
            key, _, value = entry.partition("=")
            if key in (
                "ROOMBUS_CACHE",
                "LIVEKIT_VERSION",
                "LIVEKIT_OLDEST_VERSION",
                "ROOMBUS_LIVEKIT_VERSION",
                "LIVEKIT_BIN",
                "LIVEKIT_OLDEST_BIN",
                "KAFKA_VERSION",
                "KAFKA_LIBS",
            ):
                os.environ.setdefault(key, value)
    return os.environ[name]


def livekit_binary() -> Path:
    """The livekit-server the tests run: LIVEKIT_BIN, else the cached build of
    ROOMBUS_LIVEKIT_VERSION, else the newest pin (scripts/services/versions).

    scripts/test runs the whole suite against the newest pin and tests/interop once more with
    ROOMBUS_LIVEKIT_VERSION (and LIVEKIT_BIN) set to the oldest supported release.
    """
    return Path(_pinned("LIVEKIT_BIN"))


def livekit_binary_version(binary: Path | None = None) -> tuple[int, ...] | None:
    """The release `binary` (default: `livekit_binary()`) reports, e.g. (1, 13, 11); None when
    it is missing or says something else."""
    binary = binary or livekit_binary()
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except OSError:
        return None
    found = re.search(r"version v?(\d+(?:\.\d+)+)", out)
    return tuple(int(part) for part in found.group(1).split(".")) if found else None


def test_ip() -> str:
    """The non-loopback address of the test namespace (where livekit-server listens)."""
    return os.environ.get("ROOMBUS_TEST_IP", "192.0.2.1")


def _fill(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ServiceError(f"{template}: placeholders left unfilled: {', '.join(left)}")
    return text


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class Service:
    """One server process with a working directory, a log file and a readiness check."""

    name: str
    workdir: Path
    ready_timeout: float = 60.0
    command: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    _log_start: int = 0

    def log_since_start(self) -> str:
        """What the current process has logged so far."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:]) or "(log empty)"

    def fail(self, why: str) -> ServiceError:
        return ServiceError(
            f"{self.name}: {why}\n  command: {' '.join(self.command) or '(not started)'}\n"
            f"  log: {self.log_path}\n  log tail:\n{self.log_tail()}"
        )

    # Subclasses fill these in.
    def prepare(self) -> None:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def tcp_ports(self) -> list[int]:
        """TCP ports the server listens on on 127.0.0.1 (checked free before starting)."""
        return []

    def start(self) -> None:
        """Start the process and wait until it is ready; raise `ServiceError` otherwise."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        busy = [p for p in self.tcp_ports() if _port_open("127.0.0.1", p)]
        if busy:
            raise self.fail(f"port {busy[0]} is already taken by another process")
        log = self.log_path.open("ab")
        self._log_start = log.tell()  # readiness looks only at what this start logged
        try:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise self.fail(f"could not execute: {exc}") from exc
        finally:
            log.close()
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise self.fail(f"exited with status {self.process.returncode} before ready")
            try:
                if self.is_ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise self.fail(f"not ready within {self.ready_timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (TERM, then KILL after `timeout`); safe to call twice."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def kill(self) -> None:
        """Kill the process at once (a crash, for fault tests)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ServiceError(
            f"{what}: {path} not found; run scripts/services/install (scripts/test does it)"
        )
    return path


@dataclass
class LiveKitServer(Service):
    """livekit-server on the test address with dev keys, one UDP port and no TCP fallback."""

    port: int = 7880
    udp_port: int = 7882
    turn_port: int = 3478
    webhook_url: str | None = None
    # Merged over tests/services/livekit.yaml (nested mappings key by key, anything else
    # replaced), e.g. {"turn": {"tls_port": 443, "cert_file": ...}} for TURN/TLS.
    overrides: dict[str, Any] = field(default_factory=dict)
    api_key: str = LIVEKIT_API_KEY
    api_secret: str = LIVEKIT_API_SECRET

    @property
    def url(self) -> str:
        return f"ws://{test_ip()}:{self.port}"

    def tcp_ports(self) -> list[int]:
        return [self.port]

    @property
    def http_url(self) -> str:
        return f"http://{test_ip()}:{self.port}"

    def prepare(self) -> None:
        binary = _require(livekit_binary(), self.name)
        webhook = ""
        if self.webhook_url:
            webhook = f"webhook:\n  api_key: {self.api_key}\n  urls:\n    - {self.webhook_url}\n"
        config = _fill(
            HERE / "livekit.yaml",
            {
                "PORT": str(self.port),
                "UDP_PORT": str(self.udp_port),
                "TURN_PORT": str(self.turn_port),
                "IP": test_ip(),
                "API_KEY": self.api_key,
                "API_SECRET": self.api_secret,
                "WEBHOOK": webhook,
            },
        )
        if self.overrides:
            config = yaml.safe_dump(_merged(yaml.safe_load(config), self.overrides))
        (self.workdir / "livekit.yaml").write_text(config)
        self.command = [str(binary), "--config", str(self.workdir / "livekit.yaml")]

    def is_ready(self) -> bool:
        with urllib.request.urlopen(self.http_url + "/", timeout=1) as resp:
            return bool(resp.status == 200)


@dataclass
class Kafka(Service):
    """Apache Kafka in KRaft mode (one node); storage formatted fresh on every start."""

    port: int = 9092
    controller_port: int = 9093
    ready_timeout: float = 90.0
    format_storage: bool = True

    def tcp_ports(self) -> list[int]:
        return [self.port, self.controller_port]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, libs: Path) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise ServiceError(f"{self.name}: java not found on PATH")
        return [
            java,
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={HERE / 'kafka-log4j2.properties'}",
            "-cp",
            f"{libs}/*",
        ]

    def prepare(self) -> None:
        libs = _require(Path(_pinned("KAFKA_LIBS")), self.name)
        config = _fill(
            HERE / "kafka-server.properties",
            {
                "PORT": str(self.port),
                "CONTROLLER_PORT": str(self.controller_port),
                "DATA_DIR": str(self.workdir),
            },
        )
        props = self.workdir / "server.properties"
        props.write_text(config)
        if self.format_storage:
            shutil.rmtree(self.workdir / "data", ignore_errors=True)
            cluster_id = "-"
            while cluster_id.startswith("-"):  # StorageTool would read "-..." as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            fmt = [*self._java(libs), "kafka.tools.StorageTool", "format", "-t", cluster_id]
            fmt += ["-c", str(props)]
            done = subprocess.run(fmt, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                self.command = fmt
                with self.log_path.open("a") as log:
                    log.write(done.stdout + done.stderr)
                raise self.fail(f"storage format failed with status {done.returncode}")
            self.format_storage = False  # a restart keeps the data
        self.command = [*self._java(libs), "kafka.Kafka", str(props)]

    def is_ready(self) -> bool:
        # The broker logs this once the KRaft controller and broker are both up and serving.
        return (
            _port_open("127.0.0.1", self.port) and "Kafka Server started" in self.log_since_start()
        )


@dataclass
class Mosquitto(Service):
    """Mosquitto from Debian, MQTT 3.1.1 and 5 on one listener, persistence on."""

    port: int = 1883
    ready_timeout: float = 20.0

    def prepare(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        _require(Path(binary), self.name)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        config = _fill(HERE / "mosquitto.conf", {"PORT": str(self.port), "DATA_DIR": str(data)})
        (self.workdir / "mosquitto.conf").write_text(config)
        self.command = [binary, "-c", str(self.workdir / "mosquitto.conf")]

    def tcp_ports(self) -> list[int]:
        return [self.port]

    def is_ready(self) -> bool:
        return _port_open("127.0.0.1", self.port)
