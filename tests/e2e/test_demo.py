"""The README's run command works: the demo (scripts/demo.py) passes every leg end to end."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def test_demo_runs_every_leg_and_the_bridge_drains(in_test_namespace: None) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "demo.py"),
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    for leg in (
        "ok    telemetry reached the dashboard",
        "ok    command reached the device",
        "ok    chat reached Kafka",
        "ok    attribute reached MQTT",
        "ok    bridge drained and exited 0",
    ):
        assert leg in text, text[-4000:]
    assert "demo: OK" in text
