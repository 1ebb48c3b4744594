"""Hot reload, the triggers: SIGHUP and ``roombus run --watch`` re-read the configuration file.

Every reload reads and validates the whole file first; an invalid file, or one whose changes
need a restart, is refused with every problem logged (``file:line``) and the bridge keeps
running on the last good configuration. Each attempt is counted as
``config.reloads.<result>``: ``applied`` (including "no changes"), ``rejected`` (invalid, or
needs a restart) or ``failed`` (applying raised: the bridge runs on what was applied so far).
Reloads never overlap: a trigger while one runs waits for it, and triggers that pile up in the
meantime become a single reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import watchfiles

from bridge.config import Config, ConfigError, load_config
from bridge.runtime.reload import ReloadRefused

if TYPE_CHECKING:
    from bridge.runtime.bridge import Bridge

log = logging.getLogger("roombus.reload")


class Reloader:
    """Reloads `bridge` from `path` whenever `trigger` is called or `watch` sees a change."""

    def __init__(
        self,
        bridge: Bridge,
        path: str | Path,
        *,
        load: Callable[[str | Path], Config] = load_config,
        on_load: Callable[[Config], None] | None = None,
    ) -> None:
        self.bridge = bridge
        self.path = Path(path)
        self.load = load
        self.on_load = on_load  # sees each valid file before it is applied (new secrets)
        self._wanted = asyncio.Event()

    def trigger(self) -> None:
        """Ask for a reload (signal-handler safe: it only sets an event)."""
        self._wanted.set()

    async def run(self) -> None:
        """Reload on every trigger, one at a time, until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.reload()

    async def watch(self) -> None:
        """Trigger a reload whenever the file changes, until cancelled.

        Watches the file's directory: editors and Kubernetes ConfigMaps replace the file
        (rename, symlink swap) rather than write it in place.
        """
        seen = self._digest()
        async for _changes in watchfiles.awatch(self.path.parent, debounce=200, step=50):
            # Any change in the directory may be ours (a symlink swap names other files):
            # reload when what the path reads has changed.
            now = self._digest()
            if now != seen:
                seen = now
                self.trigger()

    def _digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None  # gone for a moment during a replace: the next change tells

    async def reload(self) -> str:
        """One reload attempt; its result (``applied``, ``rejected``, ``failed``)."""
        started = time.time()
        try:
            config = self.load(self.path)
            if self.on_load is not None:
                self.on_load(config)
            plan = await self.bridge.reload(config)
        except ConfigError as exc:
            return self._done(started, "rejected", [f"invalid: {p}" for p in exc.problems])
        except ReloadRefused as exc:
            return self._done(started, "rejected", exc.problems)
        except Exception as exc:
            log.error("reload: %s: applying failed", self.path, exc_info=exc)
            return self._done(started, "failed", [f"{type(exc).__name__}: {exc}"])
        log.info("reload: %s: applied: %s", self.path, plan.summary())
        return self._done(started, "applied", [], plan.summary())

    def _done(self, started: float, result: str, problems: list[str], summary: str = "") -> str:
        self.bridge.counters.inc(f"config.reloads.{result}")
        if result == "rejected":
            log.error("reload: %s: refused, still running the previous configuration:", self.path)
            for problem in problems:
                log.error("reload:   %s", problem)
        self.bridge.last_reload = {
            "at": started,
            "file": str(self.path),
            "result": result,
            "summary": summary,
            "problems": problems,
        }
        return result

    @property
    def last(self) -> dict[str, object]:
        """The last attempt: when, which file, its result, summary and problems."""
        return self.bridge.last_reload
