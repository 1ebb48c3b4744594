"""Background tasks of the room side that never fail silently (livekit-rtc's `task_done_logger`).

`spawn` starts a task, keeps a strong reference to it in the owner's set until it ends (asyncio
keeps only weak ones), and logs it with its cause if it fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

_R = TypeVar("_R")

log = logging.getLogger("roombus.room")


def task_done_logger(
    task: asyncio.Task[Any], *, owner: set[asyncio.Task[Any]] | None = None
) -> None:
    """Done callback: forget `task` in `owner` and log it if it failed (cancelling is fine)."""
    if owner is not None:
        owner.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("room: task %s failed: %r", task.get_name(), exc, exc_info=exc)


def spawn(
    coro: Coroutine[Any, Any, _R], *, name: str, owner: set[asyncio.Task[Any]]
) -> asyncio.Task[_R]:
    """Run `coro` as a task named `name`, held in `owner` while it runs, logged if it fails."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    owner.add(task)
    task.add_done_callback(functools.partial(task_done_logger, owner=owner))
    return task


__all__ = ["spawn", "task_done_logger"]
