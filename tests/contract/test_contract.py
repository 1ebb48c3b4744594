"""The contract of `bridge/endpoint.py`, written once and run against memory, MQTT and Kafka.

Every test gets `endpoint` (see conftest.py and harness.py): a sink, a source subscribed to its
topic with a reader, and a way to restart the source on the same session or group. Absence of
a redelivery is checked without sleeping: after the restart a sentinel is published on the same
topic and key, and everything the source delivers before the sentinel is what it redelivered
(per-key order puts redeliveries first).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from bridge.endpoint import Inbound
from bridge.envelope import Envelope, Outbound
from bridge.errors import ConnectorError, RejectedMessage
from tests.contract.harness import BOUND, Harness, eventually, leave

KEY = b"device-1"


def message(h: Harness, payload: bytes) -> Outbound:
    return Outbound(topic=h.topic, payload=payload, key=KEY, qos=1)


def payloads(items: list[Inbound[Envelope]]) -> list[bytes]:
    return [item.message.payload for item in items]


async def redelivered_after_restart(h: Harness) -> list[bytes]:
    """Restart the source; the payloads it delivers before a sentinel published afterwards."""
    await h.restart_source()
    sentinel = b"sentinel"
    await h.sink.publish(message(h, sentinel))
    got = await h.reader.until(sentinel)
    for item in got:
        await item.ack()
    return payloads(got[:-1])


async def test_publish_then_receive_round_trips_payload_key_and_headers(endpoint: Harness) -> None:
    h = endpoint
    headers = (("lk-room", "lobby"), ("lk-participant", "ålice ✓"))
    await h.sink.publish(
        Outbound(
            topic=h.topic,
            payload=b"\x00\xffhello",
            key=KEY,
            headers=headers,
            content_type="application/octet-stream",
            qos=1,
        )
    )
    (got,) = await h.reader.take(1)
    env = got.message
    assert env.payload == b"\x00\xffhello"
    assert (env.topic, env.source) == (h.topic, h.source.name)
    assert env.key == (KEY if h.carries_key else None)
    assert dict(headers).items() <= dict(env.headers).items()  # Kafka adds content-type
    assert env.content_type == "application/octet-stream"
    assert got.key == h.ordering_key
    await got.ack()


async def test_acked_message_is_not_redelivered_after_restart(endpoint: Harness) -> None:
    h = endpoint
    await h.sink.publish(message(h, b"done"))
    (got,) = await h.reader.take(1)
    await got.ack()
    assert await redelivered_after_restart(h) == []


async def test_nacked_message_is_not_redelivered_after_restart(endpoint: Harness) -> None:
    h = endpoint
    await h.sink.publish(message(h, b"bad"))
    (got,) = await h.reader.take(1)
    await got.ack(RejectedMessage("invalid_json", "x"))
    assert await redelivered_after_restart(h) == []


async def test_unacknowledged_message_is_redelivered_after_restart(endpoint: Harness) -> None:
    h = endpoint
    await h.sink.publish(message(h, b"first"))
    await h.sink.publish(message(h, b"second"))
    first, _second = await h.reader.take(2)
    await first.ack()  # "second" is never acknowledged
    again = await redelivered_after_restart(h)
    assert b"second" in again, "an unacknowledged message must come again (at least once)"
    assert b"first" not in again


async def test_order_is_kept_per_key(endpoint: Harness) -> None:
    h = endpoint
    n = 200
    h.reader.auto_ack = True  # acknowledged as they arrive: the source's bound never fills

    async def produce() -> None:
        for i in range(n):
            await h.sink.publish(message(h, b"%d" % i))

    producing = asyncio.create_task(produce())
    got = await h.reader.take(n, timeout=60)
    await producing
    assert payloads(got) == [b"%d" % i for i in range(n)]
    assert {item.key for item in got} == {h.ordering_key}


async def test_close_is_idempotent_and_ends_the_source(endpoint: Harness) -> None:
    h = endpoint
    await leave(h.sink)
    await leave(h.sink)  # harmless
    with pytest.raises(ConnectorError) as info:
        await h.sink.publish(message(h, b"late"))
    assert not info.value.retriable, "a closed sink can never publish"

    await leave(h.source)
    await leave(h.source)
    await eventually(lambda: h.reader.ended, what="messages() ended when the source closed")
    assert h.reader.error is None, f"messages() raised on close: {h.reader.error!r}"
    assert [item async for item in h.source.messages()] == []


async def test_connected_follows_the_lifecycle(endpoint: Harness) -> None:
    h = endpoint
    await eventually(lambda: h.source.connected and h.sink.connected, what="both connected")
    await leave(h.source)
    await leave(h.sink)
    assert not h.source.connected and not h.sink.connected


async def test_source_that_is_not_read_stays_within_its_bound(endpoint: Harness) -> None:
    """2,000 messages wait for a consumer that reads without acknowledging: the source holds
    at most BOUND of them (read and unacknowledged, plus buffered) and loses none."""
    h = endpoint
    n = 2000
    most = 0

    def holding() -> int:
        return len(h.reader.items) + h.queued()

    async def sample() -> None:
        nonlocal most
        while True:
            most = max(most, holding())
            await asyncio.sleep(0.005)

    async def produce() -> None:
        window = 100  # publishes in flight at once
        for start in range(0, n, window):
            await asyncio.gather(
                *(h.sink.publish(message(h, b"%d" % i)) for i in range(start, start + window))
            )

    sampler = asyncio.create_task(sample())
    producing = asyncio.create_task(produce())
    try:
        await eventually(lambda: holding() >= BOUND, timeout=60, what=f"{BOUND} held")
        # Memory: the publisher blocks on the full inbox; MQTT/Kafka: the broker keeps the rest.
        await eventually(
            lambda: producing.done() or h.publish_blocked(), timeout=120, what="backlog built"
        )
        if producing.done():
            producing.result()
        most = max(most, holding())
        assert most <= BOUND, f"the source held {most} messages, over its bound of {BOUND}"
        assert len(h.reader.items) < n, "everything was handed out: nothing held back"
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    # Acknowledging lets the rest through; nothing was lost.
    h.reader.auto_ack = True
    for item in list(h.reader.items):
        await item.ack()
    await eventually(
        lambda: {item.message.payload for item in h.reader.items} >= {b"%d" % i for i in range(n)},
        timeout=120,
        what=f"all {n} messages received",
    )
    await producing
