"""deploy/roombus.service: a unit systemd accepts, for the venv layout the README installs.

`systemd-analyze verify` parses the unit as systemd would (unknown keys, bad values, missing
executables) without running it; the unit's /opt/roombus venv is pointed at this checkout's
roombus so that its commands exist.
"""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

from tests.deploy.tools import ROOT, run, tool

UNIT = ROOT / "deploy" / "roombus.service"


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd-analyze (Debian package systemd)")
    roombus = Path(sys.executable).parent / "roombus"
    unit = tmp_path / "roombus.service"
    unit.write_text(UNIT.read_text().replace("/opt/roombus/bin/roombus", str(roombus)))
    done = run([analyze, "verify", str(unit)], check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_unit_checks_first_drains_and_does_not_restart_a_bad_config() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["ExecStartPre"].endswith("roombus check /etc/roombus/config.yaml")
    assert service["ExecStart"].endswith("roombus run /etc/roombus/config.yaml")
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["RestartPreventExitStatus"] == "78"  # EX_CONFIG
    # More than the drain's default (bridge.shutdown_timeout: 10 s).
    assert int(service["TimeoutStopSec"]) > 10
