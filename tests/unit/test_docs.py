"""The README documents every configuration key (its reference section is generated)."""

from __future__ import annotations

from pathlib import Path

from bridge.config import Config
from bridge.docs import reference, splice

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current() -> None:
    text = README.read_text()
    assert splice(text) == text, (
        "README is stale: run .venv/bin/python -m bridge.docs --write README.md"
    )


def test_reference_names_every_top_level_and_livekit_key() -> None:
    ref = reference()
    for key in Config.model_fields:
        assert f"| `{key}` |" in ref
    for key in Config.model_fields["livekit"].annotation.model_fields:  # type: ignore[union-attr]
        assert f"| `livekit.{key}` |" in ref
