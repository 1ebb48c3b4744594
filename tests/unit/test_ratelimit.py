"""Rate limits: token buckets per key, the three policies, counts, bounds, and config errors.

The limiter's clock is injected, so these tests step time by hand: no sleeps, no timing.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.config import ConfigError, parse_config
from bridge.room.types import Counters
from bridge.runtime.ratelimit import Decision, RateLimiter, RateSpec, rate_specs
from bridge.topics import Target, parse_template
from tests.unit.configs import head


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limiter(
    policy: str = "latest",
    *,
    rate: float = 1.0,
    burst: int = 1,
    queue: int = 100,
    max_keys: int = 10_000,
    key: str | None = None,
    track: bool = False,
) -> tuple[RateLimiter[str], Clock, Counters, list[tuple[str, str]], list[str]]:
    clock, counters = Clock(), Counters()
    released: list[tuple[str, str]] = []
    discarded: list[str] = []
    template = parse_template(key, ("participant", "key"), Target.TEXT) if key else None
    spec = RateSpec(rate, burst, policy, queue, max_keys, template)
    lim: RateLimiter[str] = RateLimiter(
        "r",
        spec,
        counters,
        release=lambda k, item: released.append((k, item)),
        discard=discarded.append,
        track_release=track,
        clock=clock,
    )
    return lim, clock, counters, released, discarded


def test_latest_sends_the_first_at_once_and_the_last_when_the_window_allows() -> None:
    lim, clock, counters, released, discarded = limiter("latest", rate=2.0)
    decisions = [lim.admit({}, f"v{i}") for i in range(10)]
    assert decisions[0] is Decision.PASS
    assert decisions[1:] == [Decision.HELD] * 9
    assert lim.held == 1
    assert counters["route.r.coalesced"] == 8
    assert discarded == [f"v{i}" for i in range(1, 9)]
    lim.release_due()  # not due yet: the bucket refills at 2 tokens/s
    assert released == []
    clock.now += 0.5
    lim.release_due()
    assert released == [("", "v9")]
    assert lim.held == 0
    assert counters["route.r.dropped.rate_limited"] == 0


def test_drop_newest_drops_and_counts_what_is_over_the_rate() -> None:
    lim, clock, counters, released, _ = limiter("drop_newest", rate=1.0, burst=3)
    decisions = [lim.admit({}, f"v{i}") for i in range(5)]
    assert decisions == [Decision.PASS] * 3 + [Decision.DROPPED] * 2
    assert counters["route.r.dropped.rate_limited"] == 2
    clock.now += 1.0
    assert lim.admit({}, "later") is Decision.PASS
    assert lim.held == 0 and released == []


def test_drop_oldest_holds_a_bounded_queue_in_order() -> None:
    lim, clock, counters, released, discarded = limiter("drop_oldest", rate=1.0, queue=2)
    assert lim.admit({}, "a") is Decision.PASS
    for item in "bcde":
        assert lim.admit({}, item) is Decision.HELD
    assert discarded == ["b", "c"]
    assert counters["route.r.dropped.rate_limited"] == 2
    clock.now += 1.0
    lim.release_due()
    assert [i for _, i in released] == ["d"]
    clock.now += 1.0
    lim.release_due()
    assert [i for _, i in released] == ["d", "e"]


def test_keys_have_their_own_buckets() -> None:
    lim, clock, counters, released, _ = limiter("latest", key="{participant}")
    assert lim.admit({"participant": "a"}, "a1") is Decision.PASS
    assert lim.admit({"participant": "b"}, "b1") is Decision.PASS
    assert lim.admit({"participant": "a"}, "a2") is Decision.HELD
    assert lim.admit({"participant": "a"}, "a3") is Decision.HELD
    assert lim.admit({"participant": "b"}, "b2") is Decision.HELD
    clock.now += 1.0
    lim.release_due()
    assert sorted(released) == [("a", "a3"), ("b", "b2")]
    assert counters["route.r.coalesced"] == 1


def test_a_held_key_keeps_order_even_with_tokens_and_busy_until_settled() -> None:
    lim, clock, _, released, _ = limiter("latest", rate=1.0, track=True)
    assert lim.admit({}, "a") is Decision.PASS
    assert lim.admit({}, "b") is Decision.HELD
    clock.now += 1.0
    lim.release_due()
    assert released == [("", "b")]
    clock.now += 5.0  # tokens are back, but "b" is still being delivered
    assert lim.admit({}, "c") is Decision.HELD
    lim.release_due()
    assert released == [("", "b")]
    lim.settled("")
    lim.release_due()
    assert released == [("", "b"), ("", "c")]


def test_flush_releases_everything_at_once() -> None:
    lim, _, _, released, _ = limiter("drop_oldest", rate=0.1, key="{key}")
    for i in range(3):
        lim.admit({"key": "x"}, f"x{i}")
        lim.admit({"key": "y"}, f"y{i}")
    lim.flush()
    assert [i for _, i in released] == ["x1", "x2", "y1", "y2"]
    assert lim.held == 0


def test_keys_are_bounded_least_recently_used_idle_first() -> None:
    lim, _, counters, _, _ = limiter("latest", key="{key}", max_keys=2)
    assert lim.admit({"key": "a"}, "a") is Decision.PASS
    assert lim.admit({"key": "a"}, "a2") is Decision.HELD  # "a" now holds a value
    assert lim.admit({"key": "b"}, "b") is Decision.PASS
    # The table is full and its oldest key holds a value: the new key cannot be tracked.
    assert lim.admit({"key": "c"}, "c") is Decision.DROPPED
    assert counters["route.r.dropped.rate_limited"] == 1
    lim.flush()
    assert lim.admit({"key": "c"}, "c") is Decision.PASS  # "a" idle now: forgotten
    assert counters["route.r.rate_keys_evicted"] == 1


async def test_the_timer_task_releases_and_can_be_cancelled() -> None:
    released: list[str] = []
    lim: RateLimiter[str] = RateLimiter(
        "r",
        RateSpec(1000.0, 1, "latest", 1, 10, None),
        Counters(),
        release=lambda _k, item: released.append(item),
    )
    task = asyncio.create_task(lim.run())
    assert lim.admit({}, "a") is Decision.PASS
    assert lim.admit({}, "b") is Decision.HELD
    for _ in range(500):  # bounded: the release is due 1 ms later
        if released:
            break
        await asyncio.sleep(0.005)
    assert released == ["b"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


BASE = (
    head()
    + """\
  - name: in
    from: {mqtt: plant, topic: "devices/{device}/state"}
    to: {room: lobby, attribute: {key: "{device}"}}
    rate: RATE
"""
)


def test_rate_config_compiles_with_defaults() -> None:
    config = parse_config(BASE.replace("RATE", '{max: 0.5, key: "{device}"}'))
    spec = rate_specs(config.connectors)["in"]
    assert (spec.rate, spec.burst, spec.policy, spec.queue) == (0.5, 1, "latest", 100)
    assert spec.key is not None and spec.key.fields == {"device"}


@pytest.mark.parametrize(
    ("rate", "problem"),
    [
        (
            '{max: 1, key: "{devic}"}',
            "bad.yaml:13: connectors[0].rate.key: unknown placeholder {devic}",
        ),
        ("{max: 0}", "bad.yaml:13: connectors[0].rate.max: Input should be greater than 0 (got 0)"),
        ("{max: 1, policy: newest}", "bad.yaml:13: connectors[0].rate.policy:"),
        ("{max: 1, per: x}", "bad.yaml:13: connectors[0].rate.per:"),
    ],
)
def test_rate_config_errors_are_located(rate: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE.replace("RATE", rate), "bad.yaml")
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_rate_limits_do_not_apply_to_rpc_connectors() -> None:
    text = BASE.replace(
        'to: {room: lobby, attribute: {key: "{device}"}}',
        'to: {room: lobby, rpc: {destination: "{device}", method: m}}',
    ).replace('"devices/{device}/state"}', '"devices/{device}/state", reply: {}}')
    text = text.replace("RATE", "{max: 1}")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml")
    assert "bad.yaml:13: connectors[0].rate: rate limits do not apply to rpc connectors" in (
        err.value.problems
    )
