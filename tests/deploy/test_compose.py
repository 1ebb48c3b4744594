"""deploy/compose.yaml: valid for Compose, and consistent with the example and the image.

It needs public images, so CI does not run it: `docker-compose config` (Debian's Compose, which
validates against the Compose file schema and resolves paths, without a daemon) checks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tools import ROOT, run, tool

COMPOSE = ROOT / "deploy" / "compose.yaml"


def resolved() -> dict[str, Any]:
    compose = tool("docker-compose", "docker-compose (Debian package)")
    out = run([compose, "-f", str(COMPOSE), "config"], timeout=60).stdout
    config: dict[str, Any] = yaml.safe_load(out)
    return config


def test_compose_config_validates_and_has_the_stack() -> None:
    services = resolved()["services"]
    assert set(services) == {"livekit", "mosquitto", "kafka", "roombus", "prometheus"}
    roombus = services["roombus"]
    # The bridge runs the shipped example, read-only, pointed at the stack's servers.
    (mount,) = roombus["volumes"]
    source, target, mode = mount.split(":")  # Compose v1 prints volumes in the short form
    assert (Path(source), target, mode) == (
        ROOT / "config.example.yaml",
        "/etc/roombus/config.yaml",
        "ro",
    )
    assert roombus["read_only"] is True
    # On the host network, with the stack's Kafka on its host listener.
    assert roombus["network_mode"] == "host"
    assert roombus["environment"]["KAFKA_BOOTSTRAP"] == "127.0.0.1:9094"
    kafka_env = services["kafka"]["environment"]
    assert "EXTERNAL://localhost:9094" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert Path(roombus["build"]["context"]) == ROOT


def test_prometheus_scrapes_the_bridge_http_port() -> None:
    services = resolved()["services"]
    assert services["prometheus"]["network_mode"] == "host"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    port = example["bridge"]["http_port"]
    assert job["static_configs"] == [{"targets": [f"127.0.0.1:{port}"]}]
