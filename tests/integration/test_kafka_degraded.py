"""Kafka endpoints with the cluster away: degraded, not dead (issue 8).

A private broker (own ports, auto-created topics) that the tests stop and start: endpoints
entered while it is down connect by themselves once it is up; while it is down, an open source
and sink neither spin (CPU) nor flood the log, and traffic resumes when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from bridge.envelope import Outbound
from connectors.kafka import KafkaDeliveryError, KafkaSettings, KafkaSink, KafkaSource
from tests.integration.test_kafka import consuming
from tests.services import Kafka

OUTAGE = 10.0  # seconds the broker stays down in the outage test


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def broker(in_test_namespace: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    """A broker of its own, NOT started: each test starts and stops it as it needs."""
    kafka = Kafka(
        name="kafka-degraded",
        workdir=tmp_path_factory.mktemp("kafka-degraded"),
        port=29092,
        controller_port=29093,
    )
    try:
        yield kafka
    finally:
        kafka.stop()


def settings_for(broker: Kafka, *, delivery_timeout: float) -> KafkaSettings:
    # A lower cap than the default keeps the tests short; the bound on log lines and CPU must
    # hold all the same.
    return KafkaSettings(
        [broker.bootstrap],
        connect_timeout=3.0,
        reconnect_backoff_max=3.0,
        delivery_timeout=delivery_timeout,
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 90.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.1)


async def test_endpoints_started_while_kafka_is_down_connect_by_themselves(
    broker: Kafka,
) -> None:
    assert broker.process is None  # down at start
    topic = unique("late")
    settings = settings_for(broker, delivery_timeout=2.0)
    sink = KafkaSink("kafka:out", settings)
    source = KafkaSource("kafka:in", settings, [topic], unique("g"), auto_offset_reset="earliest")
    async with sink, consuming(source) as pump:  # neither raises
        assert not sink.connected and not source.connected
        with pytest.raises(KafkaDeliveryError) as err:
            await sink.publish(Outbound(topic=topic, payload=b"too early"))
        assert err.value.retriable
        with pytest.raises(TimeoutError):
            await pump.get(timeout=0.5)

        await asyncio.to_thread(broker.start)
        await wait_until(lambda: sink.connected and source.connected)
        sink.settings = settings_for(broker, delivery_timeout=60.0)  # no more "too early"
        await sink.publish(Outbound(topic=topic, payload=b"on time"))
        assert (await pump.get(timeout=60)).message.payload == b"on time"
        assert sink.counters["kafka.connect_retry"] >= 1


async def test_outage_costs_no_cpu_and_no_log_flood_and_recovers(
    broker: Kafka, caplog: pytest.LogCaptureFixture
) -> None:
    if broker.process is None:
        await asyncio.to_thread(broker.start)
    topic = unique("outage")
    settings = settings_for(broker, delivery_timeout=120.0)
    source = KafkaSource("kafka:in", settings, [topic], unique("g"), auto_offset_reset="earliest")
    async with KafkaSink("kafka:out", settings) as sink, consuming(source) as pump:
        await sink.publish(Outbound(topic=topic, payload=b"before"))
        assert (await pump.get(timeout=60)).message.payload == b"before"
        assert sink.connected and source.connected

        caplog.set_level(logging.INFO)
        caplog.clear()
        await asyncio.to_thread(broker.stop)
        # A publish in flight during the outage: what made aiokafka's sender spin.
        during = asyncio.create_task(sink.publish(Outbound(topic=topic, payload=b"during")))
        cpu0, wall0 = time.process_time(), time.monotonic()
        await wait_until(lambda: not sink.connected and not source.connected, 30)
        await asyncio.sleep(OUTAGE)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        records = [
            r
            for r in caplog.records
            if r.name.split(".")[0] in ("aiokafka", "connectors", "roombus", "bridge")
        ]
        lines = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in records)
        print(f"outage: {len(records)} log records, cpu {cpu:.2f} s in {wall:.1f} s\n{lines}")
        assert len(records) <= 20, lines
        assert cpu < 0.3 * wall, (cpu, wall)
        assert not during.done()  # waiting for the cluster, not failed
        unreachable = [r for r in records if "unreachable" in r.getMessage()]
        assert {r.getMessage().split(":")[1] for r in unreachable} == {"out", "in"}

        await asyncio.to_thread(broker.start)
        try:
            async with asyncio.timeout(120):
                await during
        finally:
            during.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await during
        await sink.publish(Outbound(topic=topic, payload=b"after"))
        got = [(await pump.get(timeout=60)).message.payload for _ in range(2)]
        assert got == [b"during", b"after"]
        await wait_until(lambda: sink.connected and source.connected)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
