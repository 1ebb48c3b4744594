"""The Kafka connector: a `Sink` that produces records and a `Source` that consumes them (aiokafka).

`KafkaSink.publish` returns only once the broker acknowledged the record (idempotent producer,
`acks=all` by default); while the cluster is unreachable it keeps retrying until the settings'
`delivery_timeout` runs out and then raises — it never reports success without an ack.

`KafkaSource.messages` yields records in partition order with an `ack` each. Offsets are committed
manually: the highest *contiguous* acknowledged offset per partition (acks may arrive out of
order), periodically, when partitions are revoked in a rebalance, and on `stop`. At most
`max_in_flight` records are unacknowledged at any time; beyond that the source pauses its
partitions until acks arrive. Whatever was not committed is delivered again after a restart (at
least once; duplicates bounded by the in-flight window).

Errors (``retriable`` is data on every one; messages say "who: what failed: why")::

    ConnectorError (bridge/errors.py)
    └── KafkaConnectorError        anything this connector raises (alias KafkaError)
        ├── KafkaConfigError       settings that can never work (bad combination, no library)
        ├── KafkaConnectError      bootstrap failed: unreachable, refused, TLS (retriable)
        │   └── KafkaAuthError     SASL credentials or mechanism rejected (not retriable)
        ├── KafkaUnknownTopicError the topic does not exist and the cluster will not create it
        ├── KafkaRecordTooLargeError  over max_request_size or the broker's limit
        ├── KafkaInvalidMessageError  not a possible record (e.g. a tombstone without a key)
        ├── KafkaDeliveryError     no ack within delivery_timeout (retriable), or refused
        └── KafkaClosedError       publish or messages() on a connector not started

Inbound record headers are decoded as UTF-8. A header whose value is not valid UTF-8 is dropped
(not base64-encoded: a changed encoding under the same name would mislead every later reader)
and counted as ``kafka.header_undecodable``; a null header value becomes ``""``; of repeated
header names the last one wins (as Kafka's ``Headers.lastHeader``), counted as
``kafka.header_duplicate``. A tombstone (null value) arrives as an empty payload with the header
``kafka-tombstone: true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import errors as kerrors
from aiokafka.conn import create_conn
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from bridge.endpoint import Ack, Inbound
from bridge.envelope import H_CONTENT_TYPE, Envelope, Outbound
from bridge.errors import ConnectorError, RejectedMessage

log = logging.getLogger(__name__)

#: Header set on an inbound envelope whose record was a tombstone (null value).
H_KAFKA_TOMBSTONE = "kafka-tombstone"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]


# --------------------------------------------------------------------------------------- errors


class KafkaConnectorError(ConnectorError):
    """Base of every error the Kafka connector raises."""


# The name bridge/errors.py draws in its tree (ours avoids a clash with aiokafka's).
KafkaError = KafkaConnectorError


class KafkaConfigError(KafkaConnectorError):
    """Settings that cannot work, whatever the cluster does."""


class KafkaConnectError(KafkaConnectorError):
    """Bootstrapping failed: no broker could be reached (or TLS failed)."""

    retriable = True


class KafkaAuthError(KafkaConnectError):
    """The cluster rejected the SASL credentials or mechanism."""

    retriable = False


class KafkaUnknownTopicError(KafkaConnectorError):
    """The topic does not exist and the cluster does not create topics automatically."""


class KafkaRecordTooLargeError(KafkaConnectorError):
    """The record is larger than the producer's max_request_size or the broker's limit."""


class KafkaInvalidMessageError(KafkaConnectorError):
    """The message cannot be turned into a Kafka record."""


class KafkaDeliveryError(KafkaConnectorError):
    """The record was not acknowledged: timed out, or refused by the broker."""

    retriable = True


class KafkaClosedError(KafkaConnectorError):
    """The connector is not started (or already stopped)."""


# ------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach one Kafka cluster, and the producer's delivery options.

    Attributes:
        bootstrap_servers: ``host:port`` of one or more brokers.
        client_id: Sent to the brokers (their logs and quotas).
        security_protocol: Kafka's ``security.protocol``.
        sasl_mechanism: Required for the SASL protocols.
        username: SASL user name.
        password: SASL password (never shown in ``repr``).
        ca_file: CA bundle for SSL/SASL_SSL (default: the system store).
        cert_file: Client certificate (PEM) for mutual TLS.
        key_file: Key of ``cert_file``.
        acks: Producer acks; anything but ``"all"`` needs ``enable_idempotence=False``.
        enable_idempotence: The idempotent producer (no duplicates from producer retries).
        compression: Record batch compression.
        max_request_size: Largest record (serialized) the producer accepts, in bytes.
        request_timeout: Seconds for one request, and how long a batch may wait for a broker.
        connect_timeout: Seconds ``start`` may take to bootstrap.
        delivery_timeout: Seconds ``publish`` keeps retrying while the cluster is unreachable.
        retry_backoff: Seconds between retries (metadata, produce, publish).
    """

    bootstrap_servers: Sequence[str]
    client_id: str = "roombus"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    acks: Literal["all", 1, 0] = "all"
    enable_idempotence: bool = True
    compression: Compression = "none"
    max_request_size: int = 1048576
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    delivery_timeout: float = 120.0
    retry_backoff: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.bootstrap_servers, str):
            # A bare string is a sequence of characters: accept "a:9092,b:9092" as a list.
            object.__setattr__(
                self,
                "bootstrap_servers",
                tuple(s.strip() for s in self.bootstrap_servers.split(",") if s.strip()),
            )
        else:
            object.__setattr__(self, "bootstrap_servers", tuple(self.bootstrap_servers))
        if not self.bootstrap_servers:
            raise KafkaConfigError("bootstrap_servers: at least one host:port is required")
        for server in self.bootstrap_servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise KafkaConfigError(f"bootstrap_servers: {server!r} is not host:port")
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise KafkaConfigError(
                    f"sasl_mechanism: required with security_protocol {self.security_protocol}"
                )
            if not self.username or self.password is None:
                raise KafkaConfigError(
                    f"username/password: required with sasl_mechanism {self.sasl_mechanism}"
                )
        elif self.sasl_mechanism is not None:
            raise KafkaConfigError(
                f"sasl_mechanism: set, but security_protocol {self.security_protocol} "
                "does not use SASL (use SASL_SSL or SASL_PLAINTEXT)"
            )
        if self.enable_idempotence and self.acks != "all":
            raise KafkaConfigError(
                f"acks: {self.acks!r} is not allowed with enable_idempotence (use 'all')"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise KafkaConfigError("cert_file/key_file: give both or neither")
        for name in ("request_timeout", "connect_timeout", "delivery_timeout"):
            if getattr(self, name) <= 0:
                raise KafkaConfigError(f"{name}: must be positive")
        if self.max_request_size <= 0:
            raise KafkaConfigError("max_request_size: must be positive")

    @property
    def cluster(self) -> str:
        """The bootstrap list as one string, for messages."""
        return ",".join(self.bootstrap_servers)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for SSL/SASL_SSL, None for the plaintext protocols."""
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaConfigError(f"ca_file/cert_file/key_file: cannot load: {exc}") from exc
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's producer, consumer and connections."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context(),
            "request_timeout_ms": int(self.request_timeout * 1000),
            "retry_backoff_ms": int(self.retry_backoff * 1000),
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.username
            kwargs["sasl_plain_password"] = self.password
        return kwargs


# ------------------------------------------------------------------------------ offset tracking

K = TypeVar("K", bound=Hashable)


class PartitionOffsets:
    """Delivered and acknowledged offsets of one partition, in delivery order.

    Offsets are delivered in increasing order but need not be consecutive (compaction and
    transaction markers leave gaps), so "contiguous" means contiguous in delivery order: the
    commit position is one past the last offset of the longest fully acknowledged prefix.
    """

    __slots__ = ("_acked", "_pending", "commit_position", "revoked")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # delivered, not yet below the commit position
        self._acked: set[int] = set()  # acknowledged, still in _pending
        self.commit_position: int | None = None  # next offset to read; None: nothing acked yet
        self.revoked = False

    @property
    def in_flight(self) -> int:
        """How many delivered offsets are not acknowledged."""
        return len(self._pending) - len(self._acked)

    def delivered(self, offset: int) -> None:
        """Record that `offset` was handed out (offsets must increase)."""
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} delivered after {self._pending[-1]}")
        self._pending.append(offset)

    def ack(self, offset: int) -> bool:
        """Mark `offset` done; return False if it was not outstanding (duplicate or unknown)."""
        if not self._pending or offset < self._pending[0] or offset in self._acked:
            return False
        if offset > self._pending[-1]:
            return False
        self._acked.add(offset)
        # Advance over the acknowledged prefix. Each offset is popped once: amortised O(1).
        while self._pending and self._pending[0] in self._acked:
            done = self._pending.popleft()
            self._acked.discard(done)
            self.commit_position = done + 1
        return True


class OffsetTracker(Generic[K]):
    """`PartitionOffsets` for every partition this consumer owns, plus the in-flight total."""

    def __init__(self) -> None:
        self._partitions: dict[K, PartitionOffsets] = {}
        self._committed: dict[K, int] = {}

    def partition(self, key: K) -> PartitionOffsets:
        """The live state of `key`, created on first use."""
        state = self._partitions.get(key)
        if state is None:
            state = self._partitions[key] = PartitionOffsets()
        return state

    def partitions(self) -> list[K]:
        """The partitions being tracked."""
        return list(self._partitions)

    def get(self, key: K) -> PartitionOffsets | None:
        """The live state of `key`, None if it is not tracked."""
        return self._partitions.get(key)

    def drop(self, keys: Iterable[K]) -> None:
        """Forget partitions (revoked); late acks for them become no-ops."""
        for key in keys:
            state = self._partitions.pop(key, None)
            if state is not None:
                state.revoked = True
            self._committed.pop(key, None)

    @property
    def in_flight(self) -> int:
        """Unacknowledged messages over all partitions."""
        return sum(p.in_flight for p in self._partitions.values())

    def to_commit(self, keys: Iterable[K] | None = None) -> dict[K, int]:
        """Commit positions that moved since `mark_committed` (all partitions, or `keys`)."""
        wanted = self._partitions.keys() if keys is None else keys
        out: dict[K, int] = {}
        for key in wanted:
            state = self._partitions.get(key)
            if state is None or state.commit_position is None:
                continue
            if self._committed.get(key) != state.commit_position:
                out[key] = state.commit_position
        return out

    def mark_committed(self, positions: Mapping[K, int]) -> None:
        """Record that `positions` reached the broker."""
        for key, position in positions.items():
            if key in self._partitions:
                self._committed[key] = position


# ----------------------------------------------------------------------------- error mapping


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


async def _diagnose_bootstrap(settings: KafkaSettings) -> BaseException | None:
    """Why bootstrap failed: aiokafka logs the reason but raises a generic error.

    Opens (and closes) one connection per bootstrap server with the same settings and returns
    the first failure, or None if every server answered.
    """
    kwargs = settings.client_kwargs()
    first: BaseException | None = None
    for server in settings.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            async with asyncio.timeout(settings.connect_timeout):
                conn = await create_conn(
                    host.strip("[]"),
                    int(port),
                    client_id=kwargs["client_id"],
                    request_timeout_ms=kwargs["request_timeout_ms"],
                    ssl_context=kwargs["ssl_context"],
                    security_protocol=settings.security_protocol,
                    sasl_mechanism=settings.sasl_mechanism,
                    sasl_plain_username=settings.username,
                    sasl_plain_password=settings.password,
                )
            conn.close()
        except (OSError, TimeoutError, kerrors.KafkaError) as exc:
            first = first or exc
    return first


_AUTH_ERRORS: tuple[type[BaseException], ...] = (
    kerrors.SaslAuthenticationFailed,
    kerrors.AuthenticationFailedError,
    kerrors.AuthenticationMethodNotSupported,
    kerrors.UnsupportedSaslMechanismError,
    kerrors.IllegalSaslStateError,
)


# The idempotent producer's sequence state no longer matches the broker's: only a new producer
# (a new producer id) gets out of it.
_PRODUCER_STATE_ERRORS: tuple[type[kerrors.KafkaError], ...] = (
    kerrors.OutOfOrderSequenceNumber,
    kerrors.UnknownProducerId,
    kerrors.InvalidProducerEpoch,
)


async def _start_error(
    who: str, settings: KafkaSettings, exc: BaseException
) -> KafkaConnectorError:
    """Turn a failed aiokafka `start()` into one of our errors, with the real reason."""
    where = f"{who}: connect to {settings.cluster} failed"
    cause: BaseException = exc
    if not isinstance(exc, _AUTH_ERRORS):
        cause = await _diagnose_bootstrap(settings) or exc
    if isinstance(cause, _AUTH_ERRORS):
        return KafkaAuthError(
            f"{where}: authentication rejected ({settings.sasl_mechanism} as "
            f"{settings.username!r}): {_why(cause)}"
        )
    if isinstance(cause, TimeoutError):
        return KafkaConnectError(f"{where}: no answer within {settings.connect_timeout:g} s")
    return KafkaConnectError(f"{where}: {_why(cause)}")


# ------------------------------------------------------------------------------------------ sink


class KafkaSink:
    """Publishes `Outbound` messages as Kafka records; implements `bridge.endpoint.Sink`.

    Use as ``async with KafkaSink("kafka:main", settings) as sink: await sink.publish(msg)``.
    """

    def __init__(self, name: str, settings: KafkaSettings) -> None:
        self.name = name
        self.settings = settings
        self.counters: Counter[str] = Counter()
        self._producer: AIOKafkaProducer | None = None
        self._generation = 0  # bumped whenever the producer is replaced
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def started(self) -> bool:
        """Whether the producer is running."""
        return self._producer is not None

    async def start(self) -> None:
        """Bootstrap the producer; idempotent.

        Raises:
            KafkaConnectError: no broker reachable within ``connect_timeout``.
            KafkaAuthError: SASL rejected.
            KafkaConfigError: e.g. the compression library is missing.
        """
        async with self._lock:
            if self._producer is not None:
                return
            self._producer = await self._new_producer(self.settings.connect_timeout)
            self._generation += 1
            log.info("%s: producer connected to %s", self.name, self.settings.cluster)

    async def _new_producer(self, start_within: float) -> AIOKafkaProducer:
        s = self.settings
        try:
            producer = AIOKafkaProducer(
                **s.client_kwargs(),
                acks=-1 if s.acks == "all" else s.acks,
                enable_idempotence=s.enable_idempotence,
                compression_type=None if s.compression == "none" else s.compression,
                max_request_size=s.max_request_size,
            )
        except (RuntimeError, ValueError) as exc:
            raise KafkaConfigError(f"{self.name}: producer settings: {exc}") from exc
        try:
            async with asyncio.timeout(start_within):
                await producer.start()
        except (OSError, TimeoutError, kerrors.KafkaError) as exc:
            await producer.stop()
            error = await _start_error(self.name, s, exc)
            raise error from exc
        return producer

    async def _reset_producer(self, generation: int, start_within: float) -> None:
        """Replace the producer after its idempotence state broke (once per generation).

        aiokafka drops a batch that could not be delivered within ``request_timeout`` without
        resetting the idempotent producer's sequence numbers, so after a long outage the broker
        answers every later batch with OUT_OF_ORDER_SEQUENCE_NUMBER. A new producer gets a new
        producer id; the records of the failed batches were reported failed and are retried by
        their publishers.
        """
        async with self._lock:
            if generation != self._generation or self._producer is None:
                return  # another publish already replaced it (or the sink stopped)
            fresh = await self._new_producer(start_within)
            old, self._producer = self._producer, fresh
            self._generation += 1
            self.counters["kafka.producer_reset"] += 1
            log.warning("%s: producer sequence state broken: replaced the producer", self.name)
        # Its pending batches fail with the same error; their publishers retry on `fresh`.
        await old.stop()

    async def stop(self) -> None:
        """Flush what is queued and close; idempotent."""
        async with self._lock:
            producer, self._producer = self._producer, None
            if producer is not None:
                await producer.stop()

    async def publish(self, message: Outbound) -> None:
        """Produce `message` and return once the broker acknowledged it.

        ``payload=None`` produces a tombstone (which needs a key). Headers become record headers
        (values UTF-8 encoded); ``content_type`` becomes a ``content-type`` header unless one is
        already present. While the cluster is unreachable this retries until
        ``delivery_timeout``.

        Raises:
            KafkaClosedError: the sink is not started.
            KafkaInvalidMessageError: a tombstone without a key.
            KafkaRecordTooLargeError: larger than ``max_request_size`` or the broker's limit.
            KafkaUnknownTopicError: the topic does not exist and is not created automatically.
            KafkaDeliveryError: no acknowledgement within ``delivery_timeout`` (retriable), or
                the broker refused the record.
        """
        if self._producer is None:
            raise KafkaClosedError(f"{self.name}: publish to {message.topic}: sink not started")
        if message.payload is None and message.key is None:
            self.counters["kafka.invalid_message"] += 1
            raise KafkaInvalidMessageError(
                f"{self.name}: publish to {message.topic}: a tombstone (payload None) needs a key"
            )
        headers = [(k, v.encode()) for k, v in message.headers]
        if message.content_type is not None and not any(
            k.lower() == H_CONTENT_TYPE for k, _ in message.headers
        ):
            headers.append((H_CONTENT_TYPE, message.content_type.encode()))
        s = self.settings
        what = f"{self.name}: publish to {message.topic} on {s.cluster}"
        deadline = time.monotonic() + s.delivery_timeout
        attempt = 0
        last: BaseException | None = None
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.counters["kafka.delivery_timeout"] += 1
                raise KafkaDeliveryError(
                    f"{what} failed: no acknowledgement within {s.delivery_timeout:g} s "
                    f"({attempt - 1} attempts; last error: {_why(last) if last else 'none'})"
                ) from last
            producer, generation = self._producer, self._generation
            if producer is None:
                raise KafkaClosedError(f"{what} failed: sink stopped")
            try:
                async with asyncio.timeout(remaining):
                    # Cancelling send() itself drops the record; once queued it may still be
                    # written after we gave up, which at-least-once delivery allows.
                    future = await producer.send(
                        message.topic, message.payload, key=message.key, headers=headers
                    )
                    await future
            except TimeoutError as exc:
                last = exc
                continue
            except kerrors.MessageSizeTooLargeError as exc:
                self.counters["kafka.record_too_large"] += 1
                size = len(message.payload or b"") + len(message.key or b"")
                raise KafkaRecordTooLargeError(
                    f"{what} failed: record too large ({size} bytes of key and payload; "
                    f"max_request_size {s.max_request_size}): {_why(exc)}"
                ) from exc
            except kerrors.UnknownTopicOrPartitionError as exc:
                # aiokafka raises this both for a missing topic and when no metadata could be
                # fetched at all; only the first is final.
                if await self._cluster_reachable(producer):
                    self.counters["kafka.unknown_topic"] += 1
                    raise KafkaUnknownTopicError(
                        f"{what} failed: topic does not exist and the cluster does not "
                        "create it automatically"
                    ) from exc
                last = exc
            except _PRODUCER_STATE_ERRORS as exc:
                last = exc
                try:
                    await self._reset_producer(
                        generation, max(0.1, min(s.connect_timeout, deadline - time.monotonic()))
                    )
                except KafkaConnectError as reset_exc:
                    last = reset_exc  # the cluster is still away: keep trying until the deadline
            except kerrors.TopicAuthorizationFailedError as exc:
                raise KafkaDeliveryError(
                    f"{what} failed: not authorised for this topic", retriable=False
                ) from exc
            except kerrors.ProducerClosed as exc:
                last = exc  # replaced under us by a reset: retry on the new producer
            except kerrors.KafkaError as exc:
                if not exc.retriable and not isinstance(
                    exc, kerrors.KafkaTimeoutError | kerrors.KafkaConnectionError
                ):
                    self.counters["kafka.delivery_failed"] += 1
                    raise KafkaDeliveryError(
                        f"{what} failed: {_why(exc)}", retriable=False
                    ) from exc
                last = exc
            else:
                self.counters["kafka.published"] += 1
                return
            self.counters["kafka.publish_retry"] += 1
            log.debug("%s: attempt %d: %s; retrying", what, attempt, _why(last))
            await asyncio.sleep(min(s.retry_backoff, max(0.0, deadline - time.monotonic())))

    async def _cluster_reachable(self, producer: AIOKafkaProducer) -> bool:
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                ok: bool = await producer.client.fetch_all_metadata() is not None
                return ok
        except (OSError, TimeoutError, kerrors.KafkaError):
            return False


# ---------------------------------------------------------------------------------------- source


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits acknowledged offsets of partitions before they go to another member."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._source._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._source._on_assigned(list(assigned))


class KafkaSource:
    """Consumes Kafka topics as a group member; implements `bridge.endpoint.Source`.

    Use as ``async with KafkaSource(...) as source: async for item in source.messages(): ...;
    await item.ack()``.
    """

    def __init__(
        self,
        name: str,
        settings: KafkaSettings,
        topics: Sequence[str],
        group_id: str,
        *,
        max_in_flight: int = 1000,
        auto_offset_reset: Literal["earliest", "latest"] = "latest",
        commit_interval: float = 1.0,
        poll_timeout: float = 0.2,
    ) -> None:
        if not topics:
            raise KafkaConfigError(f"{name}: topics: at least one topic is required")
        if max_in_flight < 1:
            raise KafkaConfigError(f"{name}: max_in_flight: must be at least 1")
        self.name = name
        self.settings = settings
        self.topics = tuple(topics)
        self.group_id = group_id
        self.max_in_flight = max_in_flight
        self.auto_offset_reset = auto_offset_reset
        self.commit_interval = commit_interval
        self.poll_timeout = poll_timeout
        self.counters: Counter[str] = Counter()
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._consumer: AIOKafkaConsumer | None = None
        # Partitions whose fetch position is known (committed offset or the reset policy):
        # until then a record produced now may still fall before a "latest" position.
        self._positioned: frozenset[TopicPartition] = frozenset()
        self._position_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._commit_lock = asyncio.Lock()
        self._lifecycle = asyncio.Lock()
        self._acked = asyncio.Event()
        self._paused = False
        self._stopping = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def in_flight(self) -> int:
        """Messages handed out and not yet acknowledged."""
        return self._tracker.in_flight

    @property
    def paused(self) -> bool:
        """Whether fetching is paused because `max_in_flight` messages are unacknowledged."""
        return self._paused

    @property
    def assigned(self) -> bool:
        """Whether this member has partitions and knows where it reads them from.

        From then on every record produced to them is consumed.
        """
        if self._consumer is None:
            return False
        assignment = self._consumer.assignment()
        return bool(assignment) and assignment <= self._positioned

    async def start(self) -> None:
        """Connect, check the topics exist, and join the group; idempotent.

        Raises:
            KafkaConnectError: no broker reachable within ``connect_timeout``.
            KafkaAuthError: SASL rejected.
            KafkaUnknownTopicError: a topic does not exist (and is not auto-created) within
                ``request_timeout``.
        """
        async with self._lifecycle:
            if self._consumer is not None:
                return
            s = self.settings
            consumer = AIOKafkaConsumer(
                **s.client_kwargs(),
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset=self.auto_offset_reset,
                # Never let Kafka hand out uncommitted transactional data.
                isolation_level="read_committed",
            )
            try:
                async with asyncio.timeout(s.connect_timeout):
                    await consumer.start()
            except (OSError, TimeoutError, kerrors.KafkaError) as exc:
                await consumer.stop()
                error = await _start_error(self.name, s, exc)
                raise error from exc
            try:
                consumer.subscribe(list(self.topics), listener=_Rebalance(self))
                await self._await_topics(consumer)
            except BaseException:
                await consumer.stop()
                raise
            self._consumer = consumer
            self._stopping = False
            self._commit_task = asyncio.create_task(self._commit_loop(), name=f"{self.name}:commit")
            log.info(
                "%s: consuming %s as group %s", self.name, ",".join(self.topics), self.group_id
            )

    async def _await_topics(self, consumer: AIOKafkaConsumer) -> None:
        # The subscription's own metadata requests create the topics where the cluster
        # auto-creates them; the full listing (which creates nothing) then shows them.
        deadline = time.monotonic() + self.settings.request_timeout
        while True:
            try:
                known: set[str] = await consumer.topics()
            except kerrors.KafkaError:
                known = set()
            missing = [t for t in self.topics if t not in known]
            if not missing:
                return
            if time.monotonic() >= deadline:
                self.counters["kafka.unknown_topic"] += 1
                raise KafkaUnknownTopicError(
                    f"{self.name}: subscribe on {self.settings.cluster} failed: "
                    f"topic {', '.join(missing)} does not exist and the cluster does not create "
                    "it automatically"
                )
            await asyncio.sleep(self.settings.retry_backoff)

    async def stop(self) -> None:
        """Commit every acknowledged offset and leave the group cleanly; idempotent."""
        await self._close(commit=True)

    async def abort(self) -> None:
        """Leave the group without committing anything more, as a crash would; idempotent.

        Whatever the last periodic commit did not cover is delivered again to the next member.
        """
        await self._close(commit=False)

    async def _close(self, *, commit: bool) -> None:
        async with self._lifecycle:
            consumer = self._consumer
            if consumer is None:
                return
            self._stopping = True
            self._acked.set()  # wake messages() if it waits for acks
            for task in (self._commit_task, self._position_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._commit_task = self._position_task = None
            self._positioned = frozenset()
            if commit:
                await self.commit()
            self._consumer = None
            # Leaving the group: aiokafka sends LeaveGroup, so the partitions move at once.
            await consumer.stop()
            self._tracker.drop(self._tracker.partitions())
            log.info("%s: stopped%s", self.name, "" if commit else " without committing")

    async def commit(self) -> None:
        """Commit the contiguous acknowledged offsets now (also done periodically)."""
        await self._commit(None)

    async def _commit(self, partitions: Sequence[TopicPartition] | None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        async with self._commit_lock:
            positions = self._tracker.to_commit(partitions)
            if not positions:
                return
            try:
                await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in positions.items()})
            except kerrors.CommitFailedError as exc:
                # The group rebalanced away from us: the new owner re-reads from the last commit.
                self.counters["kafka.commit_failed"] += 1
                log.warning("%s: commit failed (rebalanced): %s", self.name, _why(exc))
                return
            except (kerrors.KafkaError, OSError) as exc:
                self.counters["kafka.commit_retry"] += 1
                log.warning("%s: commit failed, will retry: %s", self.name, _why(exc))
                return
            self._tracker.mark_committed(positions)
            self.counters["kafka.commits"] += 1
            log.debug("%s: committed %s", self.name, positions)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            await self.commit()

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._commit(revoked)
        dropped = sum(s.in_flight for tp in revoked if (s := self._tracker.get(tp)) is not None)
        if dropped:
            # They will be delivered again to whoever gets the partition.
            self.counters["kafka.revoked_in_flight"] += dropped
        self._tracker.drop(revoked)
        self._acked.set()

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info(
            "%s: assigned %s", self.name, ", ".join(f"{t.topic}-{t.partition}" for t in assigned)
        )
        self._positioned = frozenset()
        if self._position_task is not None:
            self._position_task.cancel()
        self._position_task = asyncio.create_task(
            self._establish_positions(assigned), name=f"{self.name}-positions"
        )

    async def _establish_positions(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            for tp in assigned:
                await consumer.position(tp)  # resolves the committed offset or the reset policy
        except Exception as exc:  # noqa: BLE001 - a revoked partition or a stopping consumer
            log.debug("%s: positions not established: %r", self.name, exc)
            return
        self._positioned = frozenset(assigned)

    async def messages(self) -> AsyncIterator[Inbound[Envelope]]:
        """Records as `Inbound` messages, in order per partition, until `stop`.

        Raises:
            KafkaClosedError: the source is not started.
        """
        if self._consumer is None:
            raise KafkaClosedError(f"{self.name}: messages(): source not started")
        while not self._stopping:
            consumer = self._consumer
            if consumer is None:
                return
            room = self.max_in_flight - self._tracker.in_flight
            self._set_paused(consumer, room <= 0)
            if room <= 0:
                # Wait for an ack (or a revocation) rather than sleeping a whole poll period.
                self._acked.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_timeout):
                        await self._acked.wait()
            try:
                # Keep polling even while paused (paused partitions return nothing): aiokafka
                # counts the time between polls against max_poll_interval and would leave the
                # group otherwise.
                batch = await consumer.getmany(
                    timeout_ms=0 if room <= 0 else int(self.poll_timeout * 1000),
                    max_records=max(room, 1),
                )
            except kerrors.ConsumerStoppedError:
                return
            except kerrors.KafkaError as exc:
                self.counters["kafka.fetch_error"] += 1
                log.warning("%s: fetch failed: %s", self.name, _why(exc))
                await asyncio.sleep(self.settings.retry_backoff)
                continue
            if batch and room <= 0:
                # A partition assigned after the pause delivered before it was paused too;
                # at most one record over the limit.
                self.counters["kafka.fetched_while_paused"] += 1
            for tp, records in batch.items():
                state = self._tracker.partition(tp)
                for record in records:
                    if state.revoked or self._stopping:
                        break
                    state.delivered(record.offset)
                    self.counters["kafka.received"] += 1
                    yield Inbound(
                        self._envelope(tp, record),
                        self._make_ack(state, record.offset),
                        f"{tp.topic}/{tp.partition}",
                    )

    def _set_paused(self, consumer: AIOKafkaConsumer, pause: bool) -> None:
        if pause and not self._paused:
            consumer.pause(*consumer.assignment())
            self._paused = True
            self.counters["kafka.paused"] += 1
            log.debug("%s: %d in flight: pausing", self.name, self._tracker.in_flight)
        elif not pause and self._paused:
            consumer.resume(*consumer.paused())
            self._paused = False
        elif pause:
            # Partitions assigned while paused start unpaused: pause them too.
            consumer.pause(*consumer.assignment())

    def _make_ack(self, state: PartitionOffsets, offset: int) -> Ack:
        async def ack(error: RejectedMessage | None = None) -> None:
            # A nack settles the record too: the bridge gave up on it (dead-lettered or
            # dropped), so the commit moves past it instead of freezing the partition.
            if error is not None:
                self.counters["kafka.nacked"] += 1
            if state.revoked:
                self.counters["kafka.ack_after_revoke"] += 1
                return
            if not state.ack(offset):
                self.counters["kafka.ack_duplicate"] += 1
                return
            self._acked.set()

        return ack

    def _envelope(self, tp: TopicPartition, record: Any) -> Envelope:
        headers: dict[str, str] = {}
        for key, raw in record.headers or ():
            if raw is None:
                value = ""
            else:
                try:
                    value = bytes(raw).decode("utf-8")
                except UnicodeDecodeError:
                    self.counters["kafka.header_undecodable"] += 1
                    log.debug(
                        "%s: %s-%d@%d: header %r is not UTF-8: dropped",
                        self.name,
                        tp.topic,
                        tp.partition,
                        record.offset,
                        key,
                    )
                    continue
            if key in headers:
                self.counters["kafka.header_duplicate"] += 1
            headers[key] = value
        payload: bytes | None = record.value
        if payload is None:
            self.counters["kafka.tombstones"] += 1
            headers[H_KAFKA_TOMBSTONE] = "true"
        content_type = next((v for k, v in headers.items() if k.lower() == H_CONTENT_TYPE), None)
        return Envelope(
            payload=payload or b"",
            source=self.name,
            topic=tp.topic,
            key=record.key,
            headers=headers,
            content_type=content_type,
            # The record's coordinates: unique, and what an operator greps the logs for.
            id=f"{tp.topic}-{tp.partition}@{record.offset}",
        )
