"""The Python package as pip users get it: the wheel's contents and metadata, and a clean install.

The wheel is built here offline (`pip wheel --no-build-isolation`, hatchling from the test
extras). The clean install takes the dependencies from the wheelhouse that
`scripts/services/install` downloads with the lock file (deploy/constraints.txt), `--no-index`,
so what runs is what pyproject.toml declares and nothing that .venv happens to hold.
"""

from __future__ import annotations

import email.parser
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

import bridge
from bridge.room import sctp
from tests.deploy.tools import ROOT, pinned, run
from tests.services import Kafka, LiveKitServer, Mosquitto


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--no-index",
            "-w",
            str(out),
            str(ROOT),
        ],
        timeout=180,
    )
    (built,) = out.glob("roombus-*.whl")
    return built


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode())


def test_wheel_holds_only_the_two_packages_with_their_data_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"bridge", "connectors", f"roombus-{bridge.__version__}.dist-info"}, tops
    # Data files the code reads at run time (the status page) or tools read (PEP 561 marker).
    assert "bridge/static/status.html" in names
    assert "bridge/room/py.typed" in names
    assert f"roombus-{bridge.__version__}.dist-info/licenses/LICENSE" in names
    # Every module of the source tree is in it (nothing left out by the include rules).
    for package in ("bridge", "connectors"):
        for source in (ROOT / package).rglob("*.py"):
            assert source.relative_to(ROOT).as_posix() in names, source


def test_metadata_licence_urls_classifiers_and_single_sourced_version(wheel: Path) -> None:
    meta = metadata(wheel)
    assert meta["Version"] == bridge.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    urls = meta.get_all("Project-URL") or []
    assert {u.split(",")[0] for u in urls} >= {"Homepage", "Source", "Issues"}, urls
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    # PEP 639: a licence expression replaces the licence classifiers.
    assert not [c for c in classifiers if c.startswith("License ::")]
    # `roombus --version` tells the same version as the metadata.
    done = run([str(Path(sys.executable).parent / "roombus"), "--version"])
    assert done.stdout.strip() == f"roombus {bridge.__version__}"


def test_declared_dependencies_cover_every_config_option(wheel: Path) -> None:
    requires = metadata(wheel).get_all("Requires-Dist") or []
    names = {r.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip() for r in requires}
    # Kafka's compression: zstd | lz4 | snappy need cramjam (aiokafka imports it for them).
    assert "cramjam" in names, requires
    # aiortc is pinned to the minor version whose SCTP internals bridge/room/sctp.py patches:
    # any version the range admits must be one it was checked against (or a patch release of
    # it, which the lead re-checks by adding it to SUPPORTED_VERSIONS).
    (aiortc,) = [r for r in requires if r.startswith("aiortc")]
    minors = {".".join(v.split(".")[:2]) for v in sctp.SUPPORTED_VERSIONS}
    assert len(minors) == 1, sctp.SUPPORTED_VERSIONS
    (minor,) = minors
    major, minor_no = (int(x) for x in minor.split("."))
    assert f"<{major}.{minor_no + 1}" in aiortc, aiortc
    assert f">={min(sctp.SUPPORTED_VERSIONS)}" in aiortc, aiortc


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheelhouse = Path(pinned("ROOMBUS_WHEELHOUSE"))
    if not (wheelhouse / ".complete").exists():
        pytest.fail(
            f"no wheelhouse at {wheelhouse}: scripts/services/install downloads it", pytrace=False
        )
    venv = tmp_path_factory.mktemp("clean") / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
            str(wheelhouse),
            str(wheel),
        ],
        timeout=300,
    )
    return venv


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_clean_install_checks_and_runs_the_example(
    clean_venv: Path,
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    kafka: Kafka,
    tmp_path: Path,
) -> None:
    roombus = str(clean_venv / "bin" / "roombus")
    env = {
        "PATH": os.environ["PATH"],
        "LIVEKIT_URL": livekit_server.url,
        "LIVEKIT_API_KEY": livekit_server.api_key,
        "LIVEKIT_API_SECRET": livekit_server.api_secret,
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(mosquitto.port),
        "KAFKA_BOOTSTRAP": kafka.bootstrap,
    }
    example = str(ROOT / "config.example.yaml")
    run([roombus, "check", example], env=env)
    # The log goes to a file, not a pipe: nobody reads a pipe while the test waits.
    log = tmp_path / "roombus.log"
    with (
        log.open("wb") as err,
        subprocess.Popen(
            [roombus, "run", example], env=env, stdout=subprocess.DEVNULL, stderr=err
        ) as proc,
    ):
        try:
            for _ in range(120):  # bounded: ~60 s for the rooms to be joined, the buses up
                if _ready(8081) or proc.poll() is not None:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert _ready(8081), "the cleanly installed bridge never became ready"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    # The stock SCTP fallback warns: the installed aiortc must be the patched one.
    assert "stock SCTP" not in log.read_text(), log.read_text()[-3000:]
