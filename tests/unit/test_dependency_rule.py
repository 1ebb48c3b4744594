"""The official LiveKit SDK (`livekit.rtc`) is a test peer only: roombus itself never loads it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import bridge
import connectors


def _all_modules() -> list[str]:
    names = []
    for pkg in (bridge, connectors):
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return [n for n in names if not n.endswith("__main__")]


def test_bridge_and_connectors_never_import_the_official_sdk() -> None:
    modules = _all_modules()
    assert "bridge.cli" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] == ['livekit', 'rtc'])\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"livekit.rtc loaded by roombus: {out.stdout}"
