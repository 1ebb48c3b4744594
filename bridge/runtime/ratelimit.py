"""Per-route rate limits: a token bucket per key, coalescing or dropping what is over the rate.

A connector's ``rate: {max, burst, key, policy, queue, max_keys}`` becomes a `RateSpec`, and
the stage that enforces it a `RateLimiter`: the outbox of a room-to-bus route asks it before
rendering, the pump of a bus-to-room route before delivering. `admit` says what happens to a
message, in a few hundred nanoseconds:

* ``PASS``: the key's bucket had a token (``max`` tokens per second, at most ``burst``): go.
* ``HELD`` (policies ``latest`` and ``drop_oldest``): the limiter keeps it and hands it to the
  ``release`` callback once the bucket allows. With ``latest`` a key holds one message and a
  newer one replaces it (the replaced one goes to ``discard``, counted
  ``route.<name>.coalesced``): latest value wins. With ``drop_oldest`` a key holds up to
  ``queue`` messages in order, the oldest dropped when full (``dropped.rate_limited``).
* ``DROPPED`` (``drop_newest``, or no room to track one more key): counted
  ``route.<name>.dropped.rate_limited``; the caller settles the message.

Messages of one key keep their order: while a key holds messages (or, for callers that deliver
released messages asynchronously, while a released one is still being delivered: `settled`),
newer ones queue behind them instead of passing.

`run` is the timer that releases held messages when they are due; it runs inside the task of
the outbox or pump that owns the limiter (supervised by the bridge, cancelled with it) and
sleeps while nothing is held. `flush` hands over everything held at once, ignoring the rate:
at shutdown and when a reload replaces the limiter.

The keys are bounded by ``max_keys``: the least recently used key that holds nothing is
forgotten (``route.<name>.rate_keys_evicted``; its next message starts with a full bucket).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import heapq
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from bridge.config import ConnectorConfig, RateLimit, route_placeholders
from bridge.room.types import Counters
from bridge.topics import Target, Template, parse_template

T = TypeVar("T")

# Float slack when a bucket refilled exactly to its due time.
_EPSILON = 1e-9


class Decision(enum.Enum):
    """What `RateLimiter.admit` did with a message."""

    PASS = "pass"  # noqa: S105 (a decision, not a password)
    HELD = "held"
    DROPPED = "dropped"


@dataclass(frozen=True)
class RateSpec:
    """A connector's rate limit, compiled (the key template parsed)."""

    rate: float  # tokens per second
    burst: int
    policy: str  # latest | drop_oldest | drop_newest
    queue: int  # drop_oldest: held per key
    max_keys: int
    key: Template | None  # None: one key for the route

    @classmethod
    def of(cls, connector: ConnectorConfig) -> RateSpec | None:
        """The connector's rate limit, or None (the config was validated: the key parses)."""
        spec: RateLimit | None = connector.rate
        if spec is None:
            return None
        key = None
        if spec.key is not None:
            key = parse_template(spec.key, route_placeholders(connector), Target.TEXT)
        return cls(spec.max, spec.burst, spec.policy, spec.queue, spec.max_keys, key)


def rate_specs(connectors: Iterable[ConnectorConfig]) -> dict[str, RateSpec]:
    """The rate limits of `connectors`, by connector name (rate-limited ones only)."""
    out: dict[str, RateSpec] = {}
    for connector in connectors:
        spec = RateSpec.of(connector)
        if spec is not None:
            out[connector.name] = spec
    return out


class _Bucket(Generic[T]):
    __slots__ = ("busy", "held", "scheduled", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.held: collections.deque[T] = collections.deque()
        self.scheduled = False  # an entry of this key is in the timer's heap
        self.busy = 0  # released, not yet `settled`


class RateLimiter(Generic[T]):
    """The token buckets of one route (see the module docstring)."""

    def __init__(
        self,
        route: str,
        spec: RateSpec,
        counters: Counters,
        *,
        release: Callable[[str, T], None],
        discard: Callable[[T], None] | None = None,
        track_release: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Limit `route` by `spec`.

        `release(key, item)` takes a held message that is due; `discard(item)` one that was
        replaced or dropped while held. With `track_release`, a released key stays busy until
        `settled(key)` (for callers that deliver released messages asynchronously).
        """
        self.route = route
        self.spec = spec
        self.counters = counters
        self._release = release
        self._discard = discard
        self._track = track_release
        self._clock = clock
        self._buckets: collections.OrderedDict[str, _Bucket[T]] = collections.OrderedDict()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._wake = asyncio.Event()
        self._held = 0
        self._coalesced = f"route.{route}.coalesced"
        self._dropped = f"route.{route}.dropped.rate_limited"

    @property
    def held(self) -> int:
        """Messages held for later."""
        return self._held

    def key_of(self, values: Mapping[str, str]) -> str:
        """The bucket key of a message with placeholder `values`.

        Rendered without the target checks of a topic: the key names a bucket, it is never
        published, and a missing value is simply empty.
        """
        template = self.spec.key
        if template is None:
            return ""
        return "".join(p if isinstance(p, str) else values.get(p[0], "") for p in template.parts)

    def admit(self, values: Mapping[str, str], item: T) -> Decision:
        """Decide on `item` now (see the module docstring)."""
        key = self.key_of(values)
        now = self._clock()
        spec = self.spec
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= spec.max_keys and not self._evict_one():
                self.counters.inc(self._dropped)
                return Decision.DROPPED
            bucket = self._buckets[key] = _Bucket(float(spec.burst), now)
        else:
            self._buckets.move_to_end(key)
            self._refill(bucket, now)
        if not bucket.held and not bucket.busy and bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens -= 1.0
            return Decision.PASS
        if spec.policy == "drop_newest":
            self.counters.inc(self._dropped)
            return Decision.DROPPED
        held = bucket.held
        if spec.policy == "latest" and held:
            old = held.pop()
            self.counters.inc(self._coalesced)
            held.append(item)
            if self._discard is not None:
                self._discard(old)
            return Decision.HELD
        held.append(item)
        self._held += 1
        if len(held) > spec.queue:
            old = held.popleft()
            self._held -= 1
            self.counters.inc(self._dropped)
            if self._discard is not None:
                self._discard(old)
        if not bucket.busy:
            self._schedule(key, bucket, now)
        return Decision.HELD

    def settled(self, key: str) -> None:
        """A released message of `key` was delivered or decided (with `track_release`)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        bucket.busy -= 1
        if not bucket.busy and bucket.held:
            self._schedule(key, bucket, self._clock())

    def flush(self) -> None:
        """Release everything held now, ignoring the rate (shutdown, replacement)."""
        self._heap.clear()
        for key, bucket in list(self._buckets.items()):
            bucket.scheduled = False
            while bucket.held:
                self._hand_over(key, bucket)

    async def run(self) -> None:
        """Release held messages when their key's bucket allows, until cancelled."""
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._heap[0][0] - self._clock()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            self.release_due()

    def release_due(self) -> None:
        """Hand over what is due now (the timer's step; also called directly by tests)."""
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now + _EPSILON:
            _, _, key = heapq.heappop(heap)
            bucket = self._buckets.get(key)
            if bucket is None:
                continue
            bucket.scheduled = False
            self._refill(bucket, now)
            while bucket.held and not bucket.busy and bucket.tokens >= 1.0 - _EPSILON:
                bucket.tokens -= 1.0
                self._hand_over(key, bucket)
            if bucket.held and not bucket.busy:
                self._schedule(key, bucket, now)

    # ------------------------------------------------------------------ internals

    def _refill(self, bucket: _Bucket[T], now: float) -> None:
        spec = self.spec
        bucket.tokens = min(float(spec.burst), bucket.tokens + (now - bucket.stamp) * spec.rate)
        bucket.stamp = now

    def _schedule(self, key: str, bucket: _Bucket[T], now: float) -> None:
        if bucket.scheduled:
            return
        bucket.scheduled = True
        due = now + max(0.0, 1.0 - bucket.tokens) / self.spec.rate
        self._seq += 1
        if not self._heap or due < self._heap[0][0]:
            self._wake.set()
        heapq.heappush(self._heap, (due, self._seq, key))

    def _hand_over(self, key: str, bucket: _Bucket[T]) -> None:
        item = bucket.held.popleft()
        self._held -= 1
        if self._track:
            bucket.busy += 1
        self._release(key, item)

    def _evict_one(self) -> bool:
        """Forget the least recently used key that holds nothing; False if every key holds."""
        # Only the oldest is looked at, so a full table costs O(1) per message, not a scan.
        key, bucket = next(iter(self._buckets.items()))
        if bucket.held or bucket.busy:
            return False
        del self._buckets[key]
        self.counters.inc(f"route.{self.route}.rate_keys_evicted")
        return True
