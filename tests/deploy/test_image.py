"""The container image, built by scripts/image and run against the real servers of the namespace.

Debian's dockerd runs here inside the test network namespace (so containers on its host network
reach livekit-server, Mosquitto and Kafka on 192.0.2.1/127.0.0.1 and nothing else), with its
data root, socket and log under the cache (`scripts/image daemon-start`). The build is
scripts/image's own, offline (the lock's wheels in the context, `--no-index`), so it is the
command the README gives; its layer cache makes the second run cheap.

The container runs the image's default configuration (config.example.yaml at
/etc/roombus/config.yaml) read-only, and the test checks what a deployment relies on: one
message each way (MQTT telemetry into the room, a room command out to MQTT) and chat into
Kafka, the HEALTHCHECK turning healthy, JSON logs, a non-root user, labels that tell the
version, and a clean drain on SIGTERM (exit 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from livekit import rtc

import bridge
from tests.conftest import make_token
from tests.deploy.tools import ROOT, pinned, run
from tests.e2e.conftest import MqttPeer
from tests.services import Kafka, LiveKitServer, Mosquitto

IMAGE = f"roombus:{bridge.__version__}"
ROOM = "plant-berlin"  # the example configuration's room


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    return run(["docker", *args], timeout=timeout, check=check).stdout.strip()


def _net_ns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.fixture(scope="module")
def dockerd(in_test_namespace: None) -> Iterator[None]:
    """The project's dockerd, started in this namespace for the module and stopped after it."""
    sock_dir = Path(pinned("ROOMBUS_DOCKER"))
    pidfile = sock_dir / "dockerd.pid"
    pid = pidfile.read_text().strip() if pidfile.exists() else ""
    # One data root, one daemon: a daemon outside this namespace (a scripts/image build still
    # running, say) would run the containers on the wrong network.
    if pid and Path(f"/proc/{pid}").exists() and _net_ns(pid) != _net_ns("self"):
        pytest.fail(
            f"dockerd {pid} (data root {sock_dir}) is running outside the test network "
            "namespace: stop it (scripts/image daemon-stop) and run the tests again",
            pytrace=False,
        )
    done = run([str(ROOT / "scripts" / "image"), "daemon-start"], timeout=60)
    host = done.stdout.strip().removeprefix("DOCKER_HOST=")
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host
    try:
        pid = pidfile.read_text().strip()
        assert _net_ns(pid) == _net_ns("self"), "dockerd is not in the test namespace"
        yield
    finally:
        run([str(ROOT / "scripts" / "image"), "daemon-stop"], timeout=60, check=False)
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous


@pytest.fixture(scope="module")
def image(dockerd: None) -> str:
    """The image as the README builds it (scripts/image: the Debian-made base by default)."""
    run([str(ROOT / "scripts" / "image"), "build"], timeout=900)
    return IMAGE


def test_image_metadata_user_and_version(image: str) -> None:
    config: dict[str, Any] = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", image))
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == bridge.__version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["roombus"]
    assert config["Cmd"] == ["run", "/etc/roombus/config.yaml"]
    assert "ROOMBUS_LOG_FORMAT=json" in config["Env"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    # roombus --version = package metadata = image label.
    assert docker("run", "--rm", "--network", "none", image, "--version") == (
        f"roombus {bridge.__version__}"
    )
    # The runtime installs nothing: neither pip nor the build backend is in the image.
    probe = "import importlib.util as u; print([m for m in ('pip', 'hatchling') if u.find_spec(m)])"
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", probe)
    assert out == "[]"


# The size budget of issue 14 (README "Deployment" has the sizes layer by layer).
SIZE_BUDGET = 250_000_000

# What the build stage leaves in the venv, checked inside the image: PyAV is the stand-in
# (deploy/av-stub) and no FFmpeg library is left; every extension module still imports after
# `strip --strip-unneeded`; CEL compiles and evaluates a `where:` rule without its ext/ modules.
VENV_PROBE = """
import importlib, json, pathlib, sysconfig
site = pathlib.Path(sysconfig.get_path("purelib"))
failed = {}
modules = []
for so in sorted(site.rglob("*.so")):
    if so.parent.name.endswith(".libs"):
        continue
    name = ".".join(so.relative_to(site).parts).split(".cpython-")[0].split(".abi3")[0]
    modules.append(name)
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
import aiortc, av
from bridge import rules
from cel_expr_python import cel
env = cel.NewEnv(variables={"participant": cel.Type.STRING})
where = env.compile('!participant.startsWith("agent-")')
print(json.dumps({
    "modules": modules, "failed": failed, "av": av.__file__, "av_version": av.__version__,
    "ffmpeg": sorted(p.name for p in site.glob("av*.libs/*")),
    "cel_ext": (site / "cel_expr_python" / "ext").exists(),
    "where": [where.eval(data={"participant": p}).value() for p in ("agent-1", "dashboard")],
}))
"""


def test_image_size_is_within_budget(image: str) -> None:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image))
    layers = docker("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image)
    assert size <= SIZE_BUDGET, f"{size / 1e6:.0f} MB > {SIZE_BUDGET / 1e6:.0f} MB:\n{layers}"


def test_image_venv_holds_what_the_runtime_loads(image: str) -> None:
    args = ["run", "--rm", "--network", "none", "--read-only", "--entrypoint", "python3"]
    result = json.loads(docker(*args, image, "-c", VENV_PROBE).splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert any(m.startswith("cel_expr_python.") for m in result["modules"]), result["modules"]
    assert result["av"].endswith("/site-packages/av/__init__.py")
    assert result["av_version"] == "0+roombus.no-codecs"
    assert result["ffmpeg"] == []
    assert result["cel_ext"] is False
    assert result["where"] == [False, True]


def test_the_bridge_enables_no_cel_extension() -> None:
    # The image leaves cel_expr_python/ext out: the bridge must not start using it unnoticed.
    sources = [p.read_text() for d in ("bridge", "connectors") for p in (ROOT / d).rglob("*.py")]
    assert not [s for s in sources if "cel_expr_python.ext" in s or "extensions=" in s]


@pytest.fixture
async def container(
    image: str,
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    kafka: Kafka,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    name = f"roombus-test-{uuid.uuid4().hex[:8]}"
    # The example without its HTTP port: the image's HEALTHCHECK must hold with any config
    # ($ROOMBUS_HTTP_PORT, set by the image, is the port then).
    config = tmp_path_factory.mktemp("image-config") / "config.yaml"
    example = (ROOT / "config.example.yaml").read_text()
    assert "  http_port: 8081\n" in example
    config.write_text(example.replace("  http_port: 8081\n", ""))
    config.chmod(0o644)
    config.parent.chmod(0o755)
    env = {
        "LIVEKIT_URL": livekit_server.url,
        "LIVEKIT_API_KEY": livekit_server.api_key,
        "LIVEKIT_API_SECRET": livekit_server.api_secret,
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(mosquitto.port),
        "KAFKA_BOOTSTRAP": kafka.bootstrap,
    }
    args = ["run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    args += ["-v", f"{config}:/etc/roombus/config.yaml:ro"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    docker(*args, image)
    try:
        yield name
    finally:
        logs = run(["docker", "logs", name], check=False)
        print(logs.stdout[-3000:], logs.stderr[-3000:])  # shown when the test failed
        docker("rm", "-f", name, check=False)


async def wait_healthy(name: str) -> None:
    status = ""
    for _ in range(90):  # bounded: the first check runs 10 s after start, then every 10 s
        status = docker("inspect", "-f", "{{.State.Health.Status}}", name)
        running = docker("inspect", "-f", "{{.State.Running}}", name)
        if status == "healthy" or running != "true":
            break
        await asyncio.sleep(1)
    assert status == "healthy", docker("inspect", "-f", "{{json .State}}", name)


async def test_container_bridges_both_ways_healthy_read_only_and_drains(
    container: str, livekit_server: LiveKitServer, mosquitto: Mosquitto, kafka: Kafka
) -> None:
    await wait_healthy(container)
    # Non-root, and the root filesystem cannot be written.
    assert docker("exec", container, "id", "-u") == "10001"
    assert docker("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", container) == "true"
    denied = run(["docker", "exec", container, "touch", "/opt/roombus/x"], check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied

    dashboard = rtc.Room()
    packets: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    dashboard.on("data_received", packets.put_nowait)
    device = MqttPeer(mosquitto.port, client_id="device-d1")
    consumer = AIOKafkaConsumer(
        "livekit.chat", bootstrap_servers=kafka.bootstrap, auto_offset_reset="latest"
    )
    await consumer.start()
    try:
        await dashboard.connect(livekit_server.url, make_token(livekit_server, ROOM, "dashboard"))
        for _ in range(100):  # bounded: the bridge joined before it was ready
            if "roombus" in dashboard.remote_participants:
                break
            await asyncio.sleep(0.2)
        assert "roombus" in dashboard.remote_participants
        await device.subscribe("devices/berlin/d1/commands")
        # Make sure the consumer has its partitions (a latest offset) before the chat is sent.
        await asyncio.wait_for(consumer.getmany(timeout_ms=500), 30)

        # MQTT -> room: telemetry reaches the dashboard as a packet on telemetry.d1.
        await device.publish("devices/berlin/d1/telemetry", b'{"t": 21.5}')
        packet = await asyncio.wait_for(packets.get(), 30)
        assert (packet.topic, packet.data) == ("telemetry.d1", b'{"t": 21.5}')

        # room -> MQTT: a command from the dashboard reaches the device.
        await dashboard.local_participant.publish_data(b'{"fan": "high"}', topic="command/d1")
        command = await device.next(30)
        assert command.payload == b'{"fan": "high"}'

        # room -> Kafka: chat lands in livekit.chat.
        await dashboard.local_participant.send_text("from the container", topic="chat")
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert b"from the container" in (record.value or b"")
    finally:
        await consumer.stop()
        device.close()
        await dashboard.disconnect()

    # Every log line is one JSON object (ROOMBUS_LOG_FORMAT=json in the image).
    logs = run(["docker", "logs", container]).stderr.splitlines()
    assert logs, "the bridge logged nothing"
    assert all(isinstance(json.loads(line), dict) for line in logs), logs[:5]

    # SIGTERM: the bridge drains and exits 0 (not killed by docker: no timeout involved).
    docker("kill", "--signal", "TERM", container)
    code = await asyncio.to_thread(
        subprocess.run, ["docker", "wait", container], capture_output=True, text=True, timeout=60
    )
    assert code.stdout.strip() == "0", docker("logs", container)
