"""The command line: check exits 78 on a bad file and names the problem; schema prints JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.cli import EX_CONFIG, main

ROOT = Path(__file__).resolve().parents[2]


def test_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "config.example.yaml")]) == 0
    assert "valid (7 connectors" in capsys.readouterr().out


def test_check_exits_78_with_located_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("livekit:\n  url: nope\n")
    assert main(["check", str(bad)]) == EX_CONFIG == 78
    err = capsys.readouterr().err.splitlines()
    assert f"{bad}:2: livekit.url: expected ws://host:port, wss://, http:// or https://" in err
    assert f"{bad}:1: connectors: required key is missing" in err


def test_run_with_a_bad_file_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("[not a mapping]\n")
    assert main(["run", str(bad)]) == 78


def test_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "roombus configuration"
    assert "connectors" in schema["required"]
