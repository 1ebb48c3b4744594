"""Replica membership through Kafka's consumer-group protocol (`bridge.runtime.ownership`).

Each replica runs one aiokafka consumer in the replicas' group, subscribed to the control topic
(created if missing, with ``partitions`` partitions). The group coordinator (a Kafka broker)
keeps the membership — heartbeats, ``session_timeout`` — and the group leader assigns the
partitions with the sticky assignor, so a rebalance moves as few partitions as it can. The
consumer reads nothing that matters (nobody writes to the control topic); it polls because the
classic protocol counts a member that stops polling as gone (``max_poll_interval``).

aiokafka calls the listener inside the rebalance: `revoked` before the member rejoins,
`assigned` once the new assignment is known; the group waits for both (up to the rebalance
timeout, aiokafka's ``max_poll_interval_ms``), which is what lets a leaving owner drain first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import errors as kerrors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.structs import TopicPartition

from bridge.retry import CONNECT_MAX, delay
from bridge.runtime.ownership import Assignment
from connectors.kafka import KafkaSettings

log = logging.getLogger("roombus.kafka.replicas")

# The rebalance timeout of the classic protocol is max_poll_interval_ms: how long the group
# waits for members to finish their revocation (a drain) and rejoin.
REBALANCE_TIMEOUT = 120.0


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, membership: KafkaMembership, listener: Assignment) -> None:
        self._membership = membership
        self._listener = listener

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._listener.revoked(frozenset(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        mine = frozenset(tp.partition for tp in assigned)
        await self._listener.assigned(mine, self._membership.partition_count)


class KafkaMembership:
    """A replica's membership in the replicas' consumer group (see the module docstring)."""

    def __init__(
        self,
        name: str,
        settings: KafkaSettings,
        *,
        group_id: str,
        topic: str,
        partitions: int,
        replication_factor: int | None,
        session_timeout: float,
        heartbeat_interval: float,
        instance: str,
    ) -> None:
        self.name = name
        self.settings = settings
        self.group_id = group_id
        self.topic = topic
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.session_timeout = session_timeout
        self.heartbeat_interval = heartbeat_interval
        self.instance = instance
        self.partition_count = 0  # of the control topic as it is
        self.connected = False
        self._consumer: AIOKafkaConsumer | None = None
        self._left = asyncio.Event()

    async def _ensure_topic(self) -> int:
        """Create the control topic if missing; its partition count."""
        kwargs = self.settings.client_kwargs()
        admin = AIOKafkaAdminClient(**kwargs)
        await admin.start()
        try:
            replication = self.replication_factor
            if replication is None:  # as many copies as the cluster allows, at most 3
                cluster = await admin.describe_cluster()
                replication = max(1, min(3, len(cluster.get("brokers", ()))))
            try:
                await admin.create_topics([NewTopic(self.topic, self.partitions, replication)])
                log.info(
                    "%s: created control topic %s with %d partitions",
                    self.name,
                    self.topic,
                    self.partitions,
                )
            except kerrors.TopicAlreadyExistsError:
                pass
            described = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        count = len(described[0].get("partitions", ())) if described else 0
        if count == 0:
            raise kerrors.KafkaError(f"control topic {self.topic} has no partitions yet")
        return count

    async def run(self, listener: Assignment) -> None:
        """Join the group and report assignments until `leave` (reconnects with backoff)."""
        attempt = 0
        while not self._left.is_set():
            try:
                self.partition_count = await self._ensure_topic()
                consumer = AIOKafkaConsumer(
                    **self.settings.client_kwargs(),
                    group_id=self.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset="latest",
                    partition_assignment_strategy=(StickyPartitionAssignor,),
                    session_timeout_ms=int(self.session_timeout * 1000),
                    heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
                    max_poll_interval_ms=int(REBALANCE_TIMEOUT * 1000),
                    rebalance_timeout_ms=int(REBALANCE_TIMEOUT * 1000),
                )
                await consumer.start()
            except (OSError, TimeoutError, kerrors.KafkaError) as exc:
                self.connected = False
                wait = delay(attempt, 0.5, CONNECT_MAX)
                attempt += 1
                if attempt == 1:
                    log.warning("%s: cannot join the group (%s); retrying", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._left.wait(), wait)
                continue
            self._consumer = consumer
            attempt = 0
            self.connected = True
            log.info(
                "%s: replica %s joins group %s on %s (%d partitions)",
                self.name,
                self.instance,
                self.group_id,
                self.topic,
                self.partition_count,
            )
            try:
                consumer.subscribe([self.topic], listener=_Listener(self, listener))
                while not self._left.is_set():
                    # Nothing is produced there; polling keeps the membership (and runs the
                    # rebalances, whose callbacks the consumer awaits).
                    await consumer.getmany(timeout_ms=1000)
            except kerrors.KafkaError as exc:
                log.warning("%s: group membership failed (%s); rejoining", self.name, exc)
            finally:
                self.connected = False
                if self._consumer is consumer:
                    self._consumer = None
                    await consumer.stop()

    async def leave(self) -> None:
        """Leave the group (LeaveGroup: the others rebalance at once, no session timeout)."""
        self._left.set()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            self.connected = False
            await consumer.stop()
            log.info("%s: replica %s left group %s", self.name, self.instance, self.group_id)
