"""The `roombus` command line: the composition root that wires config, room and buses together."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bridge import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `roombus`."""
    parser = argparse.ArgumentParser(
        prog="roombus", description="Bridge LiveKit rooms to Kafka and MQTT."
    )
    parser.add_argument("--version", action="version", version=f"roombus {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    build_parser().parse_args(argv)
    return 0
