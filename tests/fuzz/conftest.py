"""Fuzzing (R10): hypothesis-driven inputs against the decoders, plus a fixed corpus.

Two speeds. CI runs every fuzzer with a small example budget (`FUZZ_EXAMPLES`, default 200) and
replays the committed corpus in ``tests/fuzz/corpus/`` (inputs that once crashed or hung
something, or sit at a limit); ``scripts/fuzz`` runs the same fuzzers with a large budget
(``ROOMBUS_FUZZ_EXAMPLES``). A failure hypothesis finds is shrunk and printed; add it to the
corpus when it is fixed.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

CORPUS = Path(__file__).parent / "corpus"
FUZZ_EXAMPLES = int(os.environ.get("ROOMBUS_FUZZ_EXAMPLES", "200"))

settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # the machine is shared: no per-example time limit
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("ROOMBUS_FUZZ_EXAMPLES") is None,  # CI: the same inputs each run
)
FUZZ = settings.get_profile("fuzz")


def corpus(kind: str) -> list[Path]:
    """The committed inputs of one fuzzer, sorted (pytest ids are their file names)."""
    return sorted((CORPUS / kind).iterdir())
