"""The one retry policy of the bridge: retriable errors wait with capped full-jitter backoff.

Everything that retries — publishing to a bus, delivering into a room, joining a room,
re-entering an endpoint that was unreachable at start, restarting a crashed task — waits with
`backoff`, AWS's "full jitter" (a uniform draw below an exponentially growing cap), so that many
bridges or routes that failed together do not retry together. `retriable` decides whether an
error is worth waiting for at all (see `bridge.errors`).
"""

from __future__ import annotations

import random

from tenacity import wait_random_exponential

from bridge.errors import ConnectorError

# Waits start below 200 ms and never exceed 10 s for messages (a room or a bus coming back is
# seen quickly) or 30 s for connections (R6: capped at 30 s, jittered).
MESSAGE_INITIAL = 0.2
MESSAGE_MAX = 10.0
CONNECT_MAX = 30.0


def backoff(
    initial: float = MESSAGE_INITIAL, maximum: float = MESSAGE_MAX
) -> wait_random_exponential:
    """A tenacity wait strategy: full jitter below min(maximum, initial * 2**attempt)."""
    return wait_random_exponential(multiplier=initial, max=maximum)


def delay(attempt: int, initial: float = MESSAGE_INITIAL, maximum: float = MESSAGE_MAX) -> float:
    """The full-jitter wait before retry number `attempt` (0-based), for hand-written loops."""
    return random.uniform(0.0, min(maximum, initial * 2 ** min(attempt, 30)))  # noqa: S311


def is_retriable(exc: BaseException) -> bool:
    """Whether waiting may help: a `ConnectorError` says so itself; anything else does not."""
    return isinstance(exc, ConnectorError) and exc.retriable
