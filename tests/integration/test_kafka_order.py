"""KafkaSink keeps call order per partition when it re-sends records after a Kafka outage.

R3 (tests/faults/test_kafka_outage.py) in small: publishes keep arriving while a private broker
is stopped for longer than ``request_timeout``, so aiokafka expires the oldest batches when the
broker comes back; that breaks the idempotent producer's sequence, the sink replaces its
producer, and every record whose batch failed is re-sent from inside `KafkaSink.publish`. The
re-sends must land in call order: the records of the one key are consumed in the order the
publishes were made, none lost (duplicates are allowed: at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest

from bridge.envelope import Outbound
from connectors.kafka import KafkaSettings, KafkaSink, KafkaSource
from tests.integration.test_kafka import consuming, create_topic
from tests.services import Kafka

TOTAL = 300  # publishes, one every INTERVAL: ~200 of them in flight during the outage
INTERVAL = 0.03
BEFORE = 1.0  # seconds of publishing before the broker stops
OUTAGE = 8.0  # seconds the broker stays stopped: well over request_timeout


@pytest.fixture(scope="module")
def broker(in_test_namespace: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    """A broker of its own (the test stops and starts it)."""
    kafka = Kafka(
        name="kafka-order",
        workdir=tmp_path_factory.mktemp("kafka-order"),
        port=39092,
        controller_port=39093,
    )
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


def first_deliveries(values: list[int]) -> tuple[list[int], int]:
    """The values in order of their first delivery, and how many deliveries were duplicates."""
    seen: set[int] = set()
    first: list[int] = []
    for value in values:
        if value not in seen:
            seen.add(value)
            first.append(value)
    return first, len(values) - len(first)


async def test_records_resent_after_an_outage_keep_call_order(broker: Kafka) -> None:
    topic = f"order-outage-{uuid.uuid4().hex[:8]}"
    await create_topic(broker.bootstrap, topic)  # one partition
    # request_timeout 3 s: batches older than that expire once the broker is back (R3: 30 s).
    settings = KafkaSettings(
        [broker.bootstrap],
        request_timeout=3.0,
        delivery_timeout=90.0,
        reconnect_backoff_max=2.0,
    )
    calls: list[asyncio.Task[None]] = []
    async with KafkaSink("kafka:order", settings) as sink:
        await sink.publish(Outbound(topic=topic, payload=b"-1", key=b"k"))  # topic metadata

        async def pace() -> None:
            # Tasks start in the order they are created: call order = i.
            for i in range(TOTAL):
                record = Outbound(topic=topic, payload=str(i).encode(), key=b"k")
                calls.append(asyncio.create_task(sink.publish(record), name=f"publish-{i}"))
                await asyncio.sleep(INTERVAL)

        pacing = asyncio.create_task(pace(), name="pace")
        try:
            await asyncio.sleep(BEFORE)
            await asyncio.to_thread(broker.stop)
            stopped = time.monotonic()
            await asyncio.sleep(OUTAGE)
            in_flight = sum(not c.done() for c in calls)
            await asyncio.to_thread(broker.start)
            down = time.monotonic() - stopped
            async with asyncio.timeout(120):
                await pacing
                results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for task in (pacing, *calls):
                task.cancel()
            for task in (pacing, *calls):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        counters = dict(sink.counters)
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    print(f"broker down {down:.1f} s, {in_flight} publishes in flight; counters {counters}")
    assert not failed, failed[:5]
    assert counters["kafka.published"] == TOTAL + 1
    assert counters.get("kafka.publish_retry", 0) > 0  # the sink did re-send records

    source = KafkaSource(
        "kafka:in", settings, [topic], f"g-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest"
    )
    values: list[int] = []
    async with consuming(source) as pump:
        async with asyncio.timeout(60):
            while len(set(values)) < TOTAL + 1:
                item = await pump.get()
                values.append(int(item.message.payload))
                await item.ack()
    first, duplicates = first_deliveries(values)
    late: list[str] = []  # first deliveries after a later call's record (as tests/faults)
    top = -2
    for value in first:
        if value < top:
            late.append(f"{value} after {top}")
        top = max(top, value)
    print(f"consumed {len(values)}, {duplicates} duplicates; out of order: {late[:10]}")
    assert first == list(range(-1, TOTAL)), f"{len(late)} out of order: {late[:10]}"
