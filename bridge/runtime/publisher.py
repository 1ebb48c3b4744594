"""Publishing one message to a sink: retriable failures wait and retry, permanent ones reject.

A sink raises `ConnectorError` with ``retriable`` set (see `bridge.endpoint`). Retriable errors
(broker down, timeout, room rejoining) are retried with `bridge.retry.backoff` until the sink
accepts the message or the caller is cancelled (shutdown): the message is ours, nobody else
will resend it. A non-retriable error (record too large, refused by the broker's ACL) becomes a
`RejectedMessage` at once, so the caller decides once — dead letter, drop or hold — and the
route goes on with the next message instead of looping forever.

An exception that is not a `ConnectorError` is a bug at an endpoint's boundary (an unwrapped
third-party error): it is retried a few times, logged with its traceback, then rejected.

`publish` is `attempt` followed, if that failed retriably, by `retry`. A caller that keeps
several publishes in flight and must keep their order (`bridge.runtime.outbox`) calls the two
halves itself: `attempt` for every message, and `retry` for the failed ones one at a time, in
order, instead of one independent retry loop per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from bridge.endpoint import Sink
from bridge.envelope import H_TIMESTAMP
from bridge.errors import ConnectorError, RejectedMessage
from bridge.logs import RateLimitedLog
from bridge.retry import backoff, delay
from bridge.room.types import Counters

log = logging.getLogger("roombus.publish")
# Every message in flight to a failing broker fails at once: one line per route and interval.
_limited = RateLimitedLog(log)

T = TypeVar("T")

# The header a dead-letter copy carries (`bridge.runtime.dead_letter`).
H_ERROR = "roombus-error"

# Attempts for an exception that is not a ConnectorError (see the module docstring).
UNEXPECTED_ATTEMPTS = 5


def _worth_retrying(exc: BaseException) -> bool:
    if isinstance(exc, ConnectorError):
        return exc.retriable
    return isinstance(exc, Exception)


class Publisher:
    """Publishes with the bridge's retry policy and counts what happened."""

    def __init__(self, counters: Counters, *, initial: float = 0.2, maximum: float = 10.0) -> None:
        self.counters = counters
        self._initial, self._maximum = initial, maximum
        self._wait = backoff(initial, maximum)

    async def publish(self, sink: Sink[T], message: T, *, route: str, where: str) -> None:
        """Publish `message` to `sink`, retrying while that can help.

        Args:
            sink: Where to.
            message: What.
            route: The route's name, for logs and counters.
            where: The destination for log lines (topic, room).

        Raises:
            RejectedMessage: the sink refused the message for good (reason ``refused``, or
                ``publish_failed`` for an unexpected error).
        """
        failed = await self.attempt(sink, message, route=route, where=where)
        if failed is not None:
            await self.retry(sink, message, route=route, where=where)

    async def attempt(
        self, sink: Sink[T], message: T, *, route: str, where: str
    ) -> Exception | None:
        """Publish `message` once: the fast path, no retry machinery.

        Returns:
            None once the sink accepted the message; otherwise the error, which waiting may
            cure (a retriable `ConnectorError`, or an unexpected exception): the message is for
            `retry` then. The failure is counted (``publish_retries``) and logged already.

        Raises:
            RejectedMessage: the sink refused the message for good (reason ``refused``).
        """
        try:
            await sink.publish(message)
        except ConnectorError as exc:
            if not exc.retriable:
                raise RejectedMessage("refused", str(exc)) from exc
            first: Exception = exc
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            first = exc
        else:
            self._published(route, message)
            return None
        self.counters.inc(f"route.{route}.publish_retries")
        self.counters.note_error(route, f"publish to {where} failed, retrying: {first}")
        _limited.warning(
            (route, "failed"),
            "%s: publish to %s failed (%s); retrying with backoff",
            route,
            where,
            first,
            extra={"route": route},
        )
        return first

    async def retry(self, sink: Sink[T], message: T, *, route: str, where: str) -> None:
        """Publish `message`, whose `attempt` failed, with backoff until it is accepted.

        Waits before each try (`bridge.retry.backoff`, from the first step), until the sink
        accepts the message or the caller is cancelled; an unexpected exception is given
        `UNEXPECTED_ATTEMPTS` tries.

        Raises:
            RejectedMessage: the sink refused the message for good (reason ``refused``, or
                ``publish_failed`` for an unexpected error).
        """
        failures = 1
        await asyncio.sleep(delay(0, self._initial, self._maximum))

        def stop(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            unexpected = not isinstance(exc, ConnectorError)
            return unexpected and state.attempt_number >= UNEXPECTED_ATTEMPTS

        def before_sleep(state: RetryCallState) -> None:
            nonlocal failures
            failures += 1
            self.counters.inc(f"route.{route}.publish_retries")
            exc = state.outcome.exception() if state.outcome else None
            # One line when a route starts failing (in `attempt`), then quiet until it recovers.
            log.debug("%s: publish to %s failed (%s); retrying with backoff", route, where, exc)

        retrying = AsyncRetrying(
            retry=retry_if_exception(_worth_retrying),
            wait=self._wait,
            stop=stop,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await sink.publish(message)
        except ConnectorError as exc:
            raise RejectedMessage("refused", str(exc)) from exc
        except Exception as exc:
            log.error("%s: publish to %s failed unexpectedly", route, where, exc_info=exc)
            raise RejectedMessage("publish_failed", f"{type(exc).__name__}: {exc}") from exc
        self._published(route, message)
        _limited.log(
            logging.INFO,
            (route, "recovered"),
            "%s: publish to %s succeeded after %d retries",
            route,
            where,
            failures,
            extra={"route": route},
        )

    def _published(self, route: str, message: object) -> None:
        """Observe the route's end-to-end latency once the broker acknowledged `message`.

        Measured from the room event (``lk-timestamp``, ms). Dead-letter copies
        (``roombus-error``) are not the route's traffic, and a message without a timestamp has
        nothing to measure.
        """
        stamp = None
        for name, value in getattr(message, "headers", ()):
            if name == H_TIMESTAMP:
                stamp = value
            elif name == H_ERROR:
                return
        if stamp is None:
            return
        try:
            since = int(stamp) / 1000
        except ValueError:
            return
        self.counters.observe(f"route.{route}.latency", max(0.0, time.time() - since))
