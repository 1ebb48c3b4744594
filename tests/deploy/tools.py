"""Shared helpers of the deployment tests: the pinned tools, and running them with clear errors.

The tools (Helm, kubeconform, the Kubernetes schemas, Debian's dockerd and docker-compose) are
installed and cached by `scripts/services/install`; a missing one fails the test that needs it
with what to run, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ROOT / "scripts" / "services" / "versions"


def pinned(name: str) -> str:
    """A version or cache path from scripts/services/versions (scripts/test exports them)."""
    if name not in os.environ:
        out = subprocess.run(
            ["/bin/bash", "-c", f'. "{VERSIONS}"; printf %s "${name}"'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if not out:
            pytest.fail(f"{name} is not set by {VERSIONS}", pytrace=False)
        os.environ[name] = out
    return os.environ[name]


def tool(path_or_name: str, what: str) -> str:
    """The executable, or a failed test saying how to install it."""
    found = shutil.which(path_or_name)
    if found is None:
        pytest.fail(
            f"{what} not found ({path_or_name}): scripts/services/install installs it",
            pytrace=False,
        )
    return found


def run(
    argv: list[str],
    *,
    timeout: float = 120,
    check: bool = True,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure, a test failure with the command, status and output."""
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=input_text,
        env=env,
        cwd=cwd,
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited {done.returncode}\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}",
            pytrace=False,
        )
    return done
