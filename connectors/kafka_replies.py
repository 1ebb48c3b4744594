"""Kafka reply topics of room-to-bus RPC calls, read without a consumer group.

Every bridge instance reads every reply on the topic (no group: replicas never steal each
other's replies) from the end of the topic as it was when the reader started, and keeps those
it waits for. A `Source[Envelope]` like the others; its acknowledgements are no-ops (nothing is
committed: a reply that arrives while nobody waits is of no use later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError as AioKafkaError
from aiokafka.structs import TopicPartition

from bridge.endpoint import Inbound, no_ack
from bridge.envelope import Envelope
from bridge.errors import ConnectorError

# The cluster-reachability tracking and reconnect throttle of the Kafka connector: one
# behaviour for every aiokafka client the bridge runs (no busy loop, one log line per outage).
from connectors.kafka import KafkaSettings, _Reachability, _throttle_reconnects, tame_aiokafka_logs

log = logging.getLogger("roombus.kafka")


class KafkaReplySource:
    """Reads reply topics from their current end (see the module docstring)."""

    def __init__(self, name: str, settings: KafkaSettings, topics: list[str]) -> None:
        self.name = name
        self.settings = settings
        self.topics = sorted(set(topics))
        self._consumer: AIOKafkaConsumer | None = None
        self._closed = False
        self._reach = _Reachability(name, settings.cluster)

    @property
    def connected(self) -> bool:
        """True while positioned at the end of the reply topics and the cluster answers."""
        return self._consumer is not None and not self._closed and self._reach.connected

    async def __aenter__(self) -> Self:
        """Start reading at the current end of the reply topics.

        Raises:
            ConnectorError: retriable when the cluster or a topic is not there (yet).
        """
        if self._consumer is not None:
            return self
        tame_aiokafka_logs()
        consumer = AIOKafkaConsumer(
            **self.settings.client_kwargs(), group_id=None, enable_auto_commit=False
        )
        _throttle_reconnects(consumer._client, self._reach, self.settings)
        try:
            await consumer.start()
            self._reach.up()
            deadline = time.monotonic() + self.settings.request_timeout
            tps: list[TopicPartition] = []
            for topic in self.topics:
                while True:
                    await consumer._client.force_metadata_update()
                    partitions = consumer.partitions_for_topic(topic)
                    if partitions:
                        break
                    if time.monotonic() > deadline:
                        raise ConnectorError(
                            f"{self.name}: reply topic {topic!r} does not exist", retriable=True
                        )
                    await asyncio.sleep(0.2)
                tps += [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)  # resolved now: no reply after this is missed
        except AioKafkaError as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise ConnectorError(f"{self.name}: start failed: {exc}", retriable=True) from exc
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        self._consumer = consumer
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop reading. Idempotent."""
        self._closed = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def messages(self) -> AsyncIterator[Inbound[Envelope]]:
        """The replies, as envelopes whose headers are the record's (UTF-8) headers."""
        while not self._closed:
            consumer = self._consumer
            if consumer is None:
                await asyncio.sleep(0.2)
                continue
            batch: dict[Any, list[Any]] = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    headers: dict[str, str] = {}
                    for key, raw in record.headers or ():
                        with contextlib.suppress(UnicodeDecodeError):
                            headers[key] = bytes(raw or b"").decode("utf-8")
                    envelope = Envelope(
                        payload=record.value or b"",
                        source=self.name,
                        topic=tp.topic,
                        key=record.key,
                        headers=headers,
                    )
                    yield Inbound(envelope, no_ack, f"{tp.topic}/{tp.partition}")
