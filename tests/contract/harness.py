"""Adapters that give the contract suite one endpoint type each: memory, MQTT, Kafka.

A `Harness` opens a sink to publish with and a source subscribed to `topic` (bounded by
`BOUND`: the memory inbox, the MQTT receive queue and Receive Maximum, the Kafka in-flight
window), reads the source with a `Reader`, and restarts the source the way its session or group
survives a restart (memory: `MemoryBus.reconnect`; MQTT: a new connector with the same client id
and a persistent session; Kafka: a new member of the same consumer group). The suite itself
(`test_contract.py`) only talks to the seam of `bridge/endpoint.py`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.endpoint import Endpoint, Inbound, Sink, Source
from bridge.envelope import Envelope, Outbound
from connectors.kafka import KafkaSettings, KafkaSink, KafkaSource
from connectors.memory import MemoryBroker, MemoryBus
from connectors.mqtt import MqttConnector, MqttSettings
from tests.services import Kafka, Mosquitto

#: The bound every source of the suite is configured with.
BOUND = 50


def uid() -> str:
    return uuid.uuid4().hex[:10]


async def eventually(
    check: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Wait until `check()` is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.01)


async def enter(endpoint: Endpoint) -> None:
    await endpoint.__aenter__()


async def leave(endpoint: Endpoint) -> None:
    await endpoint.__aexit__(None, None, None)


class Reader:
    """Reads a source's `messages()` in a task (cancelling ``anext`` would close the generator).

    Items are kept in `items` unacknowledged unless `auto_ack` is set; `take` hands them out
    in arrival order.
    """

    def __init__(self, source: Source[Envelope]) -> None:
        self.items: list[Inbound[Envelope]] = []
        self.auto_ack = False
        self.error: BaseException | None = None
        self._cursor = 0
        self.task = asyncio.create_task(self._run(source), name=f"reader:{source.name}")

    async def _run(self, source: Source[Envelope]) -> None:
        try:
            async for inbound in source.messages():
                self.items.append(inbound)
                if self.auto_ack:
                    await inbound.ack()
        except Exception as exc:
            self.error = exc  # reported by take(), not lost in a task nobody awaits
            raise

    def _check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"messages() raised {self.error!r}") from self.error

    async def take(self, n: int, timeout: float = 30.0) -> list[Inbound[Envelope]]:
        """The next `n` items."""
        want = self._cursor + n

        def ready() -> bool:
            self._check()
            return len(self.items) >= want

        await eventually(ready, timeout, f"{n} more messages (have {len(self.items)})")
        got = self.items[self._cursor : want]
        self._cursor = want
        return got

    async def until(self, payload: bytes, timeout: float = 30.0) -> list[Inbound[Envelope]]:
        """The next items up to and including the first whose payload is `payload`."""
        got: list[Inbound[Envelope]] = []
        while not got or got[-1].message.payload != payload:
            got += await self.take(1, timeout)
        return got

    @property
    def ended(self) -> bool:
        """Whether `messages()` returned (or raised)."""
        return self.task.done()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class Harness(abc.ABC):
    """One endpoint type under the contract."""

    kind: str
    #: Whether `Envelope.key` carries the published key (MQTT has no record key).
    carries_key = True
    sink: Sink[Outbound]
    source: Source[Envelope]
    reader: Reader

    def __init__(self) -> None:
        self.topic = f"contract-{uid()}"

    @abc.abstractmethod
    def _new_sink(self) -> Sink[Outbound]: ...

    @abc.abstractmethod
    def _new_source(self) -> Source[Envelope]: ...

    async def open(self) -> None:
        self.sink = self._new_sink()
        self.source = self._new_source()
        await enter(self.sink)
        await enter(self.source)
        self.reader = Reader(self.source)

    async def restart_source(self) -> None:
        """Close the source and open it again on the same session / group; a new reader."""
        await self.reader.close()
        await leave(self.source)
        self.source = self._new_source()
        await enter(self.source)
        self.reader = Reader(self.source)

    async def close(self) -> None:
        """Close whatever `open` got to (closing twice is part of the contract: harmless)."""
        if hasattr(self, "reader"):
            await self.reader.close()
        for name in ("source", "sink"):
            if hasattr(self, name):
                await leave(getattr(self, name))

    @property
    def ordering_key(self) -> str:
        """The `Inbound.key` of a message on `topic` (the topic: MQTT, memory)."""
        return self.topic

    def queued(self) -> int:
        """Messages the source buffers that no reader took yet."""
        return 0

    def publish_blocked(self) -> bool:
        """Whether a publish is waiting on the source's bound (only where the bus is in-process)."""
        return False


class MemoryHarness(Harness):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.broker = MemoryBroker()
        self.bus = MemoryBus(
            "memory:sub", self.broker, subscriptions=[self.topic], inbox_size=BOUND
        )

    def _new_sink(self) -> Sink[Outbound]:
        return MemoryBus("memory:pub", self.broker)

    def _new_source(self) -> Source[Envelope]:
        return self.bus

    async def restart_source(self) -> None:
        # The same bus across a reconnect: its "session" is the bus itself.
        await self.reader.close()
        self.bus.reconnect()
        self.reader = Reader(self.bus)

    def queued(self) -> int:
        return self.bus.queued

    def publish_blocked(self) -> bool:
        return self.bus.publishes_waiting > 0


class MqttHarness(Harness):
    kind = "mqtt"
    carries_key = False

    def __init__(self, broker: Mosquitto) -> None:
        super().__init__()
        self.port = broker.port
        self.client_id = f"contract-sub-{uid()}"
        self.connector: MqttConnector | None = None

    def _settings(self, client_id: str) -> MqttSettings:
        return MqttSettings(
            host="127.0.0.1",
            port=self.port,
            client_id=client_id,
            reconnect_min_delay=0.1,
            reconnect_max_delay=1.0,
            connect_timeout=5.0,
            receive_queue_size=BOUND,
        )

    def _new_sink(self) -> Sink[Outbound]:
        return MqttConnector("mqtt:pub", self._settings(f"contract-pub-{uid()}"))

    def _new_source(self) -> Source[Envelope]:
        # The same client id each time: the broker keeps the session (QoS 1, persistent).
        self.connector = MqttConnector("mqtt:sub", self._settings(self.client_id))
        self.connector.add_subscription(self.topic, 1)
        return self.connector

    def queued(self) -> int:
        return self.connector.receive_queued if self.connector is not None else 0


class KafkaHarness(Harness):
    kind = "kafka"

    def __init__(self, broker: Kafka) -> None:
        super().__init__()
        self.bootstrap = broker.bootstrap
        self.settings = KafkaSettings([broker.bootstrap])
        self.group = f"contract-{uid()}"
        self.consumer: KafkaSource | None = None

    async def open(self) -> None:
        # The topic exists before the group forms, as in a deployment: a member that subscribes
        # to a topic not created yet is only assigned its partition at the next metadata
        # refresh (aiokafka's metadata_max_age, 5 minutes).
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic, 1, 1)])
        finally:
            await admin.close()
        await super().open()

    def _new_sink(self) -> Sink[Outbound]:
        return KafkaSink("kafka:pub", self.settings)

    def _new_source(self) -> Source[Envelope]:
        # The same group each time: a new member starts at the first uncommitted record.
        self.consumer = KafkaSource(
            "kafka:sub",
            self.settings,
            [self.topic],
            self.group,
            max_in_flight=BOUND,
            auto_offset_reset="earliest",
            commit_interval=0.1,
        )
        return self.consumer

    @property
    def ordering_key(self) -> str:
        return f"{self.topic}/0"  # auto-created topics have one partition (kafka-server.properties)
