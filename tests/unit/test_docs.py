"""The README documents every configuration key and every metric (both tables are generated)."""

from __future__ import annotations

from pathlib import Path

from bridge.config import Config
from bridge.docs import METRICS_BEGIN, METRICS_END, metrics_table, reference, splice
from bridge.metrics import METRICS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current() -> None:
    text = README.read_text()
    assert splice(text) == text, (
        "README is stale: run .venv/bin/python -m bridge.docs --write README.md"
    )


def test_readme_metrics_table_is_current() -> None:
    """The metrics table between its markers is what `bridge.metrics.METRICS` generates."""
    text = README.read_text()
    start, end = text.index(METRICS_BEGIN), text.index(METRICS_END) + len(METRICS_END)
    assert text[start:end] == metrics_table(), (
        "README metrics table is stale: run .venv/bin/python -m bridge.docs --write README.md"
    )
    assert text.index("## Operating roombus") < start < text.index("## Configuration reference")
    for metric in METRICS:
        assert f"| `{metric.name}` |" in text


def test_reference_names_every_top_level_and_livekit_key() -> None:
    ref = reference()
    for key in Config.model_fields:
        assert f"| `{key}` |" in ref
    for key in Config.model_fields["livekit"].annotation.model_fields:  # type: ignore[union-attr]
        assert f"| `livekit.{key}` |" in ref


def test_readme_connector_examples_are_valid() -> None:
    """Every ```yaml block of the README that lists connectors validates as written."""
    import re

    from bridge.config import parse_config

    secret = "a-secret-of-at-least-32-characters!"
    head = f"""\
livekit: {{url: ws://127.0.0.1:7880, api_key: k, api_secret: {secret}, rooms: [plant-berlin]}}
mqtt: {{plant: {{host: 127.0.0.1}}}}
kafka: {{main: {{bootstrap_servers: [127.0.0.1:9092]}}}}
"""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    checked = 0
    for block in blocks:
        body = block if block.startswith("connectors:") else "connectors:\n" + block
        parse_config(head + body, "README.md")
        checked += 1
    assert checked >= 3
