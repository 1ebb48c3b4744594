"""The image's stand-in for PyAV (deploy/av-stub/av) covers what aiortc takes from PyAV.

The image carries no media codecs: its build replaces PyAV (~100 MB of FFmpeg libraries, all
linked at `import av`) by deploy/av-stub/av, because roombus bridges data only and aiortc
imports PyAV just for its codecs and media tracks (Dockerfile, README "Deployment"). Here,
without Docker: every PyAV name that aiortc's modules import or reach as `av.x.y` (its
`contrib` media helpers aside, which roombus never imports) resolves in the stand-in; aiortc's
modules and the bridge import with it in place of PyAV; and whatever would touch media raises
av.FFmpegError, the error aiortc's receiver already handles. test_image runs the bridge on it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

from tests.deploy.tools import ROOT, run

STUB = ROOT / "deploy" / "av-stub"


def aiortc_dir() -> Path:
    spec = importlib.util.find_spec("aiortc")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent


def aiortc_modules() -> list[str]:
    """aiortc's modules but aiortc.contrib (media files and players, never imported here)."""
    base = aiortc_dir()
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = ("aiortc", *path.relative_to(base).with_suffix("").parts)
        if "contrib" in parts:
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def av_references() -> tuple[set[str], set[str]]:
    """What aiortc takes from PyAV: modules it imports, and dotted names it reaches."""
    modules: set[str] = set()
    names: set[str] = set()
    for module in aiortc_modules():
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        tree = ast.parse(Path(spec.origin).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "av":
                assert node.module is not None
                modules.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                modules.update(a.name for a in node.names if a.name.split(".")[0] == "av")
            elif isinstance(node, ast.Attribute):
                chain: list[str] = []
                inner: ast.expr = node
                while isinstance(inner, ast.Attribute):
                    chain.insert(0, inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "av":
                    names.add(".".join(["av", *chain]))
    return modules, names


# Run with the stand-in first on sys.path, so it shadows the real PyAV of .venv.
PROBE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
refs = json.loads(sys.stdin.read())
import av
assert av.__file__.startswith(sys.argv[1]), av.__file__
for name in refs["modules"]:
    importlib.import_module(name)
missing = []
for dotted in refs["names"]:
    obj = av
    for part in dotted.split(".")[1:]:
        if not hasattr(obj, part):
            missing.append(dotted)
            break
        obj = getattr(obj, part)
for name in refs["aiortc"] + ["bridge.room", "bridge.cli"]:
    importlib.import_module(name)
errors = []
for make in (lambda: av.CodecContext.create("opus", "r"), lambda: av.AudioFrame(),
             lambda: av.VideoFrame(), lambda: av.Packet(b""), lambda: av.AudioResampler()):
    try:
        make()
    except av.FFmpegError as exc:
        errors.append(str(exc))
print(json.dumps({"missing": missing, "errors": errors}))
"""


def test_aiortc_references_are_found() -> None:
    # The collector finds what aiortc is known to use (so an empty result cannot pass).
    modules, names = av_references()
    assert {"av", "av.frame", "av.packet", "av.video.codeccontext"} <= modules
    assert {"av.CodecContext.create", "av.FFmpegError", "av.frame.Frame"} <= names


def test_stub_covers_aiortc_and_the_bridge_imports_on_it() -> None:
    modules, names = av_references()
    refs = {"modules": sorted(modules), "names": sorted(names), "aiortc": aiortc_modules()}
    out = run(
        [sys.executable, "-B", "-c", PROBE, str(STUB)], input_text=json.dumps(refs), timeout=60
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["missing"] == [], "names aiortc uses that deploy/av-stub/av lacks"
    assert len(result["errors"]) == 5
    assert all("no media codecs" in e for e in result["errors"]), result["errors"]


def test_stub_is_small() -> None:
    files = [p for p in STUB.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert all(p.suffix == ".py" for p in files), files
    assert sum(p.stat().st_size for p in files) < 8_000
