"""The Kafka connector: a `Sink` that produces records and a `Source` that consumes them (aiokafka).

Both implement `bridge.endpoint` (``Sink[Outbound]``, ``Source[Envelope]``): async context
managers with a ``connected`` property; ``start``/``stop`` do the same as entering and leaving.

Degraded, not dead: entering an endpoint whose cluster is unreachable does not fail. It reports
``connected`` False, connects in the background with capped full-jitter exponential backoff
(``reconnect_backoff`` .. ``reconnect_backoff_max``, tenacity) and becomes connected by itself.
Only what no retry can fix raises at start: SASL rejected, TLS verification failed, settings
that cannot work (and, on a cluster that answers, a topic that does not exist). aiokafka's own
reconnects get the same backoff (it has none: while a broker is down it retried at once, in a
loop that burnt a core), and its per-attempt log lines are filtered out: the connector logs one
line when the cluster becomes unreachable and one when it is reachable again.

`KafkaSink.publish` returns only once the broker acknowledged the record (idempotent producer,
`acks=all` by default); while the cluster is unreachable (or not connected yet) it waits and
retries until the settings' `delivery_timeout` runs out (or the caller cancels) and then raises
a retriable error — it never reports success without an ack. Concurrent publishes share batches
(``linger``) and keep their call order per partition, also when the sink appends records again
after a failure (batches expired in an outage, a replaced producer): those go again in call
order, and later publishes wait for them (``kafka.ordered_waits`` counts the waits).

`KafkaSource.messages` yields records in partition order with an `ack` each; ``ack(rejection)``
(a nack) settles the record like an ack (the commit moves past it) and counts
``kafka.nacked``. Offsets are committed
manually: the highest *contiguous* acknowledged offset per partition (acks may arrive out of
order), periodically, when partitions are revoked in a rebalance, and on `stop`. At most
`max_in_flight` records are unacknowledged at any time; beyond that the source pauses its
partitions until acks arrive. Whatever was not committed is delivered again after a restart (at
least once; duplicates bounded by the in-flight window).

Errors (``retriable`` is data on every one; messages say "who: what failed: why")::

    ConnectorError (bridge/errors.py)
    └── KafkaConnectorError        anything this connector raises (alias KafkaError)
        ├── KafkaConfigError       settings that can never work (bad combination, no library)
        ├── KafkaConnectError      bootstrap failed: unreachable, refused (retriable)
        │   ├── KafkaAuthError     SASL credentials or mechanism rejected (not retriable)
        │   └── KafkaTlsError      TLS verification failed (not retriable)
        ├── KafkaUnknownTopicError the topic does not exist and the cluster will not create it
        ├── KafkaRecordTooLargeError  over max_request_size or the broker's limit (not retriable)
        ├── KafkaInvalidMessageError  not a possible record: a tombstone without a key, an
        │                             invalid topic name (not retriable)
        ├── KafkaDeliveryError     no ack within delivery_timeout (retriable), or refused, e.g.
        │                          topic authorization failed (not retriable)
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
import copy
import itertools
import logging
import re
import ssl
import time
from collections import Counter, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import errors as kerrors
from aiokafka.conn import create_conn
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from bridge.endpoint import Ack, Inbound
from bridge.envelope import H_CONTENT_TYPE, Envelope, Outbound
from bridge.errors import ConnectorError, RejectedMessage
from bridge.retry import is_retriable

log = logging.getLogger("roombus.kafka")

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

    retriable = False


class KafkaConnectError(KafkaConnectorError):
    """Bootstrapping failed: no broker could be reached (or TLS failed)."""

    retriable = True


class KafkaAuthError(KafkaConnectError):
    """The cluster rejected the SASL credentials or mechanism."""

    retriable = False


class KafkaTlsError(KafkaConnectError):
    """The TLS handshake failed verification (certificate, host name, protocol)."""

    retriable = False


class KafkaUnknownTopicError(KafkaConnectorError):
    """The topic does not exist and the cluster does not create topics automatically."""

    retriable = False


class KafkaRecordTooLargeError(KafkaConnectorError):
    """The record is larger than the producer's max_request_size or the broker's limit."""

    retriable = False


class KafkaInvalidMessageError(KafkaConnectorError):
    """The message cannot be turned into a Kafka record (also: an invalid topic name)."""

    retriable = False


class KafkaDeliveryError(KafkaConnectorError):
    """The record was not acknowledged: timed out (retriable), or refused by the broker.

    A refusal (e.g. topic authorization failed) is raised with ``retriable=False``.
    """

    retriable = True


class KafkaClosedError(KafkaConnectorError):
    """The connector is not started (or already stopped)."""

    retriable = False


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
        linger: Seconds the producer waits to fill a batch: concurrent publishes share
            batches (one request, one socket write for many records).
        batch_size: Largest record batch per partition, in bytes.
        request_timeout: Seconds for one request, and how long a batch may wait for a broker.
        connect_timeout: Seconds one connection attempt of ``start`` may take.
        delivery_timeout: Seconds ``publish`` keeps retrying while the cluster is unreachable.
        retry_backoff: Seconds between retries (metadata, produce, publish).
        reconnect_backoff: Scale of the reconnect backoff: after the n-th failed attempt to
            reach a broker the next waits a random time in [0, min(max, this * 2^(n-1))] (capped
            full-jitter exponential backoff), at start and around aiokafka's own reconnects.
        reconnect_backoff_max: Cap of that backoff, in seconds.
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
    linger: float = 0.005
    batch_size: int = 65536
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    delivery_timeout: float = 120.0
    retry_backoff: float = 0.2
    reconnect_backoff: float = 0.2
    reconnect_backoff_max: float = 10.0

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
        for name in (
            "request_timeout",
            "connect_timeout",
            "delivery_timeout",
            "reconnect_backoff",
            "max_request_size",
            "batch_size",
        ):
            if getattr(self, name) <= 0:
                raise KafkaConfigError(f"{name}: must be positive")
        if self.linger < 0 or self.retry_backoff < 0:
            raise KafkaConfigError("linger/retry_backoff: must not be negative")
        if self.reconnect_backoff_max < self.reconnect_backoff:
            raise KafkaConfigError("reconnect_backoff_max: must be at least reconnect_backoff")

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
    if isinstance(cause, ssl.SSLCertVerificationError):
        return KafkaTlsError(f"{where}: TLS verification failed: {_why(cause)}")
    if isinstance(cause, TimeoutError):
        return KafkaConnectError(f"{where}: no answer within {settings.connect_timeout:g} s")
    return KafkaConnectError(f"{where}: {_why(cause)}")


# ------------------------------------------------------------------ reachability, backoff, logs

# aiokafka's connection-failure lines: the connector reports reachability itself, once per state
# change, so these add nothing but volume (thousands per second during an outage otherwise).
_CONNECTIVITY_NOISE = frozenset(
    {
        'Unable connect to "%s:%s": %s',
        'Unable to request metadata from "%s:%s": %s',
        "Unable to request metadata from node with id %s: %r",
        "Unable to update metadata from %s",
        "Unable connect to node with id %s: %s",
    }
)

#: Endpoints whose cluster is unreachable right now (aiokafka's warnings are symptoms then).
_outages: set[_Reachability] = set()


class _OutageLogFilter(logging.Filter):
    """Drops aiokafka's per-attempt connectivity lines; the connector logs the state changes.

    Always dropped: aiokafka's "unable to connect / to update metadata" lines. While any Kafka
    endpoint of this process reports its cluster unreachable, every other aiokafka WARNING and
    ERROR (coordinator dead, heartbeat failed, produce error...) is dropped too: they are
    consequences of the outage. Records with a traceback and CRITICAL ones always pass, and
    everything passes when the ``aiokafka`` logger is set to DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.CRITICAL:
            return True
        if record.exc_info is not None:
            return True
        if logging.getLogger("aiokafka").isEnabledFor(logging.DEBUG):
            return True
        if record.msg in _CONNECTIVITY_NOISE:
            return False
        return not _outages


_OUTAGE_FILTER = _OutageLogFilter()


def tame_aiokafka_logs() -> None:
    """Install `_OutageLogFilter` on every aiokafka logger; idempotent.

    A filter on a logger sees only the records logged on that very logger (not those of its
    children), so it goes on each of aiokafka's module loggers. Called by every endpoint.
    """
    names = [n for n in logging.root.manager.loggerDict if n.split(".", 1)[0] == "aiokafka"]
    for name in ("aiokafka", *names):
        logger = logging.getLogger(name)
        if _OUTAGE_FILTER not in logger.filters:
            logger.addFilter(_OUTAGE_FILTER)


class _Reachability:
    """Whether one endpoint's cluster answers; logs each change of state, once.

    ``down`` is called on every failed attempt but logs only the first of a run; ``up`` logs
    the recovery with the outage's duration.
    """

    def __init__(self, who: str, cluster: str) -> None:
        self.who = who
        self.cluster = cluster
        self.connected = False
        self.outages = 0
        self._down_since: float | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()

    def up(self) -> None:
        if self.connected:
            return
        self.connected = True
        self._up.set()
        self._down.clear()
        _outages.discard(self)
        if self._down_since is not None:
            log.info(
                "%s: cluster %s reachable again after %.1f s",
                self.who,
                self.cluster,
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    def down(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            log.warning(
                "%s: cluster %s unreachable: %s; retrying with backoff", self.who, self.cluster, why
            )
        self.connected = False
        self._up.clear()
        self._down.set()
        _outages.add(self)

    def reset(self) -> None:
        """Closed: neither up nor down (no outage to report)."""
        self.connected = False
        self._down_since = None
        self._up.clear()
        self._down.clear()
        _outages.discard(self)

    async def wait_down(self) -> None:
        await self._down.wait()


def backoff_delay(settings: KafkaSettings, attempt: int) -> float:
    """Capped full-jitter exponential backoff before retry `attempt` (1-based), in seconds."""
    wait = wait_random_exponential(
        multiplier=settings.reconnect_backoff, max=settings.reconnect_backoff_max
    )
    state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return float(wait(state))


def _throttle_reconnects(client: Any, reach: _Reachability, settings: KafkaSettings) -> None:
    """Give aiokafka's client the reconnect backoff it lacks (0.14 has no reconnect_backoff_ms).

    aiokafka retries a failed connection as soon as anyone asks again, and while the cluster is
    down its sender asks in a loop (unknown leader → metadata update → connection refused at
    once → again): a full core and thousands of log lines per second. Wrapping the client's
    ``_get_conn`` makes every caller wait, after a node's failed attempt, for a capped jittered
    exponential delay before the next attempt to that node; a success clears it. The same hook
    reports reachability: a failed attempt means down, a connection means up again.
    """
    original = client._get_conn
    loop = asyncio.get_running_loop()
    failures: dict[Any, int] = {}
    not_before: dict[Any, float] = {}

    async def get_conn(node_id: Any, **kwargs: Any) -> Any:
        # A deadline, not an event: a later failure may push it further while we sleep.
        while (delay := not_before.get(node_id, 0.0) - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)
        conn = await original(node_id, **kwargs)
        if conn is None:
            attempt = failures[node_id] = failures.get(node_id, 0) + 1
            not_before[node_id] = loop.time() + backoff_delay(settings, attempt)
            broker = client.cluster.broker_metadata(node_id)
            where = f"{broker.host}:{broker.port}" if broker is not None else f"node {node_id}"
            reach.down(f"cannot connect to broker {where}")
        else:
            failures.pop(node_id, None)
            not_before.pop(node_id, None)
            if failures:  # forget nodes that left the cluster
                known = {b.nodeId for b in client.cluster.brokers()}
                for gone in [n for n in failures if n not in known]:
                    failures.pop(gone)
                    not_before.pop(gone, None)
            if not failures:
                reach.up()
        return conn

    client._get_conn = get_conn


async def _probe_while_down(
    client_of: Callable[[], Any], reach: _Reachability, settings: KafkaSettings
) -> None:
    """While the cluster is unreachable, refresh metadata now and then.

    An idle producer would otherwise not try again until its next publish, and ``connected``
    would stay False after the cluster came back. The throttled reconnects pace the attempts;
    the sleep only guards against a metadata update that fails without trying a connection.
    """
    loop = asyncio.get_running_loop()
    while True:
        await reach.wait_down()
        began = loop.time()
        client = client_of()  # the current one: a sink may have replaced its producer
        with contextlib.suppress(Exception):
            async with asyncio.timeout(settings.request_timeout):
                await client.force_metadata_update()
        await asyncio.sleep(max(0.0, settings.reconnect_backoff - (loop.time() - began)))


_Client = TypeVar("_Client")


async def _connect_with_backoff(
    settings: KafkaSettings, counters: Counter[str], connect: Callable[[], Awaitable[_Client]]
) -> _Client:
    """`connect()` until it succeeds, waiting capped full-jitter backoff between attempts.

    Retries only what `bridge.retry.is_retriable` says may succeed later; anything else is
    raised at once (the endpoint records it as fatal).
    """

    def count(_: RetryCallState) -> None:
        counters["kafka.connect_retry"] += 1

    async for attempt in AsyncRetrying(
        wait=wait_random_exponential(
            multiplier=settings.reconnect_backoff, max=settings.reconnect_backoff_max
        ),
        retry=retry_if_exception(is_retriable),
        before_sleep=count,
        reraise=True,
    ):
        with attempt:
            return await connect()
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")


async def _stop_task(task: asyncio.Task[Any] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _detail(error: KafkaConnectorError) -> str:
    """The "why" of a "who: what failed: why" message."""
    return str(error).split(" failed: ", 1)[-1]


# Kafka's own rule for topic names (kafka.common.internals.Topic).
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _invalid_topic(topic: str) -> str | None:
    if topic in (".", "..") or not _TOPIC_NAME.fullmatch(topic):
        return (
            f"{topic!r} is not a valid Kafka topic name (1 to 249 of A-Z a-z 0-9 . _ -, "
            "not '.' or '..')"
        )
    return None


_TOO_LARGE: tuple[type[BaseException], ...] = (
    kerrors.MessageSizeTooLargeError,  # producer's max_request_size, or broker MESSAGE_TOO_LARGE
    kerrors.RecordListTooLargeError,
    kerrors.RecordTooLargeError,
)


# Lane mark of a publish whose record is not in the producer: not appended yet, or its append
# failed and it is to be appended again.
_UNSENT = -1


class _Lane:
    """The live publishes to one topic in call order, and the gate their re-sends go through.

    Records of a topic are appended in call order (``lock``, held only while ``send`` appends).
    After a failure that alone is not enough: the record is appended again, and must not land
    after records of later calls. So a lane tracks, for each live publish (by call sequence,
    oldest first), the ``epoch`` of its latest append, or ``_UNSENT``. Every retried failure
    in the lane and every change of producer starts a new epoch and puts the lane in
    ``ordering`` mode: then a publish may append (first time or again) only once every older
    live publish of the lane appended *in the current epoch* (after the last failure, on the
    current producer), or settled. An older one still in flight from before may yet fail and
    go again; it is waited for. Waiters get their turn oldest first (`advance`), so re-sends
    are appended in call order. Once every live publish appended in the current epoch, the
    lane is out of ordering mode: publishes append at once again (the hot path, no waiting).
    """

    __slots__ = ("calls", "epoch", "lock", "ordering", "turns")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.calls: dict[int, int] = {}  # live publishes, oldest first: epoch of their append
        self.turns: dict[int, asyncio.Future[None]] = {}  # publishes waiting for their turn
        self.epoch = 0
        self.ordering = False

    def disturbed(self) -> None:
        """A failure or a new producer: what is in flight may not land; order from here."""
        self.epoch += 1
        self.ordering = True

    def failed(self, call: int) -> None:
        """`call`'s record did not make it: it is to be appended again."""
        self.calls[call] = _UNSENT
        self.disturbed()

    def may_append(self, call: int) -> bool:
        """Whether every older live publish appended in the current epoch."""
        epoch = self.epoch
        for other, mark in self.calls.items():
            if other == call:
                return True
            if mark != epoch:
                return False
        return True

    def advance(self) -> None:
        """Give the oldest publish not appended in this epoch its turn, if it waits for it.

        When every live publish appended in this epoch, ordering mode ends.
        """
        epoch = self.epoch
        for call, mark in self.calls.items():
            if mark == epoch:
                continue
            turn = self.turns.get(call)
            if turn is not None and not turn.done():
                turn.set_result(None)
            return
        self.ordering = False

    def wake(self) -> None:
        """Wake every waiting publish (the sink's state changed): each looks again."""
        for turn in self.turns.values():
            if not turn.done():
                turn.set_result(None)


# ------------------------------------------------------------------------------------------ sink


class KafkaSink:
    """Publishes `Outbound` messages as Kafka records; implements `bridge.endpoint.Sink`.

    Use as ``async with KafkaSink("kafka:main", settings) as sink: await sink.publish(msg)``.

    Entering never fails because the cluster is unreachable: the sink then reports
    ``connected`` False and connects in the background with capped jittered backoff. Only what
    no retry can fix raises there (`KafkaAuthError`, `KafkaTlsError`, `KafkaConfigError`).

    Concurrent ``publish`` calls share the producer's batches (``linger``); records of one topic
    are appended in the order the calls were made, and with ``acks=all`` plus the idempotent
    producer each partition keeps that order on the broker. That holds across failures inside
    ``publish`` too (an outage long enough for batches to expire, a replaced producer): records
    appended again are appended in call order, and later calls wait for them (`_Lane`). A
    publish that fails and is retried by its caller is a new append: it may land after later
    ones.
    """

    def __init__(self, name: str, settings: KafkaSettings) -> None:
        tame_aiokafka_logs()
        self.name = name
        self.settings = settings
        self.counters: Counter[str] = Counter()
        self._producer: AIOKafkaProducer | None = None
        self._generation = 0  # bumped whenever the producer is replaced
        self._lock = asyncio.Lock()
        self._opened = False  # between start() and stop()
        self._fatal: KafkaConnectorError | None = None  # a background connect no retry can fix
        self._reach = _Reachability(name, settings.cluster)
        self._connect_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # replaced on every change of producer or state
        # One lane per topic with live publishes: its lock, held only while send() appends the
        # record, makes call order = append order, even when send() has to wait (metadata, a
        # full batch); its gate keeps that order for records appended again after a failure.
        self._lanes: dict[str, _Lane] = {}
        self._calls = itertools.count()  # call sequence of publishes

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
        """Whether the sink is open (between `start` and `stop`), connected or not."""
        return self._opened

    @property
    def connected(self) -> bool:
        """True while the producer runs and the cluster answers."""
        return self._producer is not None and self._reach.connected

    async def start(self) -> None:
        """Start the producer, or start connecting in the background; idempotent.

        Waits for the first attempt (at most ``connect_timeout``); if the cluster is
        unreachable it returns anyway and keeps trying.

        Raises:
            KafkaAuthError: SASL rejected.
            KafkaTlsError: the TLS handshake failed verification.
            KafkaConfigError: e.g. the compression library is missing.
        """
        async with self._lock:
            if self._opened:
                return
            self._fatal = None
            try:
                producer = await self._new_producer(self.settings.connect_timeout)
            except KafkaConnectorError as exc:
                if not exc.retriable:
                    raise
                self._reach.down(_detail(exc))
                self._opened = True
                self._connect_task = asyncio.create_task(
                    self._connect_in_background(), name=f"{self.name}:connect"
                )
                return
            self._opened = True
            self._install(producer)

    def _install(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._generation += 1
        self._producer_changed()
        self._reach.up()
        if self._probe_task is None:
            self._probe_task = asyncio.create_task(
                _probe_while_down(self._current_client, self._reach, self.settings),
                name=f"{self.name}:probe",
            )
        self._notify()
        log.info("%s: producer connected to %s", self.name, self.settings.cluster)

    def _current_client(self) -> Any:
        return None if self._producer is None else self._producer.client

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for lane in self._lanes.values():
            lane.wake()

    def _producer_changed(self) -> None:
        # What is in flight on the old producer may still fail: nothing on the new one may
        # overtake it.
        for lane in self._lanes.values():
            lane.disturbed()

    async def _connect_in_background(self) -> None:
        try:
            producer = await _connect_with_backoff(
                self.settings,
                self.counters,
                lambda: self._new_producer(self.settings.connect_timeout),
            )
        except KafkaConnectorError as exc:
            self._fatal = exc
            self._notify()
            log.error("%s; not retrying", exc)
            return
        if not self._opened:  # stop() won the race
            await producer.stop()
            return
        self._install(producer)

    async def _new_producer(self, start_within: float) -> AIOKafkaProducer:
        s = self.settings
        try:
            producer = AIOKafkaProducer(
                **s.client_kwargs(),
                acks=-1 if s.acks == "all" else s.acks,
                enable_idempotence=s.enable_idempotence,
                compression_type=None if s.compression == "none" else s.compression,
                max_request_size=s.max_request_size,
                linger_ms=int(s.linger * 1000),
                max_batch_size=s.batch_size,
            )
        except (RuntimeError, ValueError) as exc:
            raise KafkaConfigError(f"{self.name}: producer settings: {exc}") from exc
        _throttle_reconnects(producer.client, self._reach, s)
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
        their publishers, in call order (`_Lane`).
        """
        async with self._lock:
            if generation != self._generation or self._producer is None:
                return  # another publish already replaced it (or the sink stopped)
            fresh = await self._new_producer(start_within)
            old, self._producer = self._producer, fresh
            self._generation += 1
            self._producer_changed()
            self.counters["kafka.producer_reset"] += 1
            log.warning("%s: producer sequence state broken: replaced the producer", self.name)
            self._notify()
        # Its pending batches fail with the same error; their publishers retry on `fresh`.
        await old.stop()

    async def stop(self) -> None:
        """Flush what is queued and close; idempotent."""
        connect, self._connect_task = self._connect_task, None
        await _stop_task(connect)
        probe, self._probe_task = self._probe_task, None
        await _stop_task(probe)
        async with self._lock:
            self._opened = False
            producer, self._producer = self._producer, None
            self._reach.reset()
            self._notify()
            if producer is not None:
                await producer.stop()

    async def publish(self, message: Outbound) -> None:
        """Produce `message` and return once the broker acknowledged it.

        ``payload=None`` produces a tombstone (which needs a key). Headers become record headers
        (values UTF-8 encoded); ``content_type`` becomes a ``content-type`` header unless one is
        already present.

        While the cluster is unreachable (also before the sink ever connected) the call waits
        and retries, until ``delivery_timeout`` or until the caller cancels it, and then raises
        a retriable `KafkaDeliveryError`: it never fails at once because Kafka is away.

        Raises:
            KafkaClosedError: the sink is not started.
            KafkaInvalidMessageError: a tombstone without a key, an invalid topic name.
            KafkaRecordTooLargeError: larger than ``max_request_size`` or the broker's limit.
            KafkaUnknownTopicError: the topic does not exist and is not created automatically.
            KafkaDeliveryError: no acknowledgement within ``delivery_timeout`` (retriable), or
                the broker refused the record (not retriable).
            KafkaAuthError, KafkaTlsError: the background connect met an error no retry fixes.
        """
        if not self._opened:
            raise KafkaClosedError(f"{self.name}: publish to {message.topic}: sink not started")
        what = f"{self.name}: publish to {message.topic} on {self.settings.cluster}"
        if message.payload is None and message.key is None:
            self.counters["kafka.invalid_message"] += 1
            raise KafkaInvalidMessageError(
                f"{self.name}: publish to {message.topic}: a tombstone (payload None) needs a key"
            )
        invalid = _invalid_topic(message.topic)
        if invalid is not None:
            self.counters["kafka.invalid_topic"] += 1
            raise KafkaInvalidMessageError(f"{what} failed: {invalid}")
        headers = [(k, v.encode()) for k, v in message.headers]
        if message.content_type is not None and not any(
            k.lower() == H_CONTENT_TYPE for k, _ in message.headers
        ):
            headers.append((H_CONTENT_TYPE, message.content_type.encode()))
        lane = self._lanes.get(message.topic)
        if lane is None:
            lane = self._lanes[message.topic] = _Lane()
        call = next(self._calls)
        lane.calls[call] = _UNSENT
        try:
            await self._deliver(lane, call, message, headers, what)
        finally:
            del lane.calls[call]
            if not lane.calls:
                if self._lanes.get(message.topic) is lane:
                    del self._lanes[message.topic]
            elif lane.ordering:
                lane.advance()

    async def _deliver(
        self,
        lane: _Lane,
        call: int,
        message: Outbound,
        headers: list[tuple[str, bytes]],
        what: str,
    ) -> None:
        """`publish` past the checks: append (in turn), wait for the ack, retry."""
        s = self.settings
        deadline = time.monotonic() + s.delivery_timeout
        attempt = 0
        last: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.counters["kafka.delivery_timeout"] += 1
                state = "" if self.connected else "; cluster unreachable"
                raise KafkaDeliveryError(
                    f"{what} failed: no acknowledgement within {s.delivery_timeout:g} s "
                    f"({attempt} attempts{state}; last error: "
                    f"{_why(last) if last else 'none'})"
                ) from last
            if self._fatal is not None:
                raise copy.copy(self._fatal) from self._fatal
            if not self._opened:
                raise KafkaClosedError(f"{what} failed: sink stopped")
            producer, generation = self._producer, self._generation
            if producer is None:
                # Not connected yet: wait for the background connect (or stop, or the deadline).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                continue
            if lane.ordering and not lane.may_append(call):
                # An older publish of the topic is to be appended (again) first.
                self.counters["kafka.ordered_waits"] += 1
                await self._wait_turn(lane, call, remaining)
                continue
            future: Awaitable[Any] | None = None
            try:
                async with asyncio.timeout(remaining):
                    async with lane.lock:
                        # Looked at again: an older publish may have failed in the meantime.
                        if not lane.ordering or lane.may_append(call):
                            attempt += 1
                            epoch = lane.epoch
                            try:
                                # Cancelling send() itself drops the record; once queued it may
                                # still be written after we gave up, which at-least-once allows.
                                future = await producer.send(
                                    message.topic, message.payload, key=message.key, headers=headers
                                )
                            except Exception:
                                lane.failed(call)  # before the next one takes the lock
                                raise
                            # Appended in `epoch`; a failure during send() made that an old one.
                            lane.calls[call] = epoch
                            if lane.ordering:
                                lane.advance()
                    if future is None:
                        continue
                    try:
                        await future
                    except Exception:
                        lane.failed(call)
                        raise
            except TimeoutError as exc:
                last = exc
                continue
            except _TOO_LARGE as exc:
                self.counters["kafka.record_too_large"] += 1
                size = len(message.payload or b"") + len(message.key or b"")
                raise KafkaRecordTooLargeError(
                    f"{what} failed: record too large ({size} bytes of key and payload; "
                    f"max_request_size {s.max_request_size}): {_why(exc)}"
                ) from exc
            except kerrors.InvalidTopicError as exc:
                self.counters["kafka.invalid_topic"] += 1
                raise KafkaInvalidMessageError(
                    f"{what} failed: the broker refused the topic name: {_why(exc)}"
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
                    if not reset_exc.retriable:
                        raise
                    last = reset_exc  # the cluster is still away: keep trying until the deadline
            except kerrors.TopicAuthorizationFailedError as exc:
                self.counters["kafka.not_authorized"] += 1
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

    async def _wait_turn(self, lane: _Lane, call: int, within: float) -> None:
        """Wait (at most `within` seconds) until `call` may be appended, or the sink changed."""
        turn = lane.turns[call] = asyncio.get_running_loop().create_future()
        try:
            lane.advance()  # it may be its turn already
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await turn
        finally:
            del lane.turns[call]

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
        tame_aiokafka_logs()
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
        self._opened = False  # between start() and stop()
        self._fatal: KafkaConnectorError | None = None  # a background connect no retry can fix
        self._reach = _Reachability(name, settings.cluster)
        self._connect_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # replaced on every change of consumer or state

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

    @property
    def connected(self) -> bool:
        """True while the consumer runs and the cluster answers."""
        return self._consumer is not None and self._reach.connected

    async def start(self) -> None:
        """Connect, check the topics exist, and join the group; idempotent.

        Waits for the first attempt (at most ``connect_timeout``, plus ``request_timeout`` for
        the topics to appear); if the cluster is unreachable it returns anyway, reports
        ``connected`` False and keeps connecting in the background with capped jittered
        backoff. `messages` yields nothing until then.

        Raises:
            KafkaAuthError: SASL rejected.
            KafkaTlsError: the TLS handshake failed verification.
            KafkaUnknownTopicError: a topic does not exist (and is not auto-created) within
                ``request_timeout``, on a cluster that answers.
        """
        async with self._lifecycle:
            if self._opened:
                return
            self._fatal = None
            self._stopping = False
            try:
                consumer = await self._connect_once()
            except KafkaConnectorError as exc:
                if not exc.retriable:
                    raise
                self._reach.down(_detail(exc))
                self._opened = True
                self._connect_task = asyncio.create_task(
                    self._connect_in_background(), name=f"{self.name}:connect"
                )
                return
            self._opened = True
            self._install(consumer)

    async def _connect_once(self) -> AIOKafkaConsumer:
        s = self.settings
        try:
            consumer = AIOKafkaConsumer(
                **s.client_kwargs(),
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset=self.auto_offset_reset,
                # Never let Kafka hand out uncommitted transactional data.
                isolation_level="read_committed",
            )
        except (RuntimeError, ValueError) as exc:
            raise KafkaConfigError(f"{self.name}: consumer settings: {exc}") from exc
        _throttle_reconnects(consumer._client, self._reach, s)
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
        return consumer

    async def _connect_in_background(self) -> None:
        try:
            consumer = await _connect_with_backoff(self.settings, self.counters, self._connect_once)
        except KafkaConnectorError as exc:
            self._fatal = exc
            self._notify()
            log.error("%s; not retrying", exc)
            return
        if not self._opened:  # stop() won the race
            await consumer.stop()
            return
        self._install(consumer)

    def _install(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._reach.up()
        self._commit_task = asyncio.create_task(self._commit_loop(), name=f"{self.name}:commit")
        self._probe_task = asyncio.create_task(
            _probe_while_down(lambda: consumer._client, self._reach, self.settings),
            name=f"{self.name}:probe",
        )
        self._notify()
        log.info("%s: consuming %s as group %s", self.name, ",".join(self.topics), self.group_id)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _await_topics(self, consumer: AIOKafkaConsumer) -> None:
        # The subscription's own metadata requests create the topics where the cluster
        # auto-creates them; the full listing (which creates nothing) then shows them.
        deadline = time.monotonic() + self.settings.request_timeout
        while True:
            try:
                known: set[str] = await consumer.topics()
            except kerrors.KafkaError:
                known = set()
            # Listed is not enough: the group assigns only partitions that are in this
            # consumer's own metadata, which aiokafka otherwise refreshes every 5 minutes.
            missing = [
                t for t in self.topics if t not in known or not consumer.partitions_for_topic(t)
            ]
            if not missing:
                return
            if time.monotonic() >= deadline:
                self.counters["kafka.unknown_topic"] += 1
                raise KafkaUnknownTopicError(
                    f"{self.name}: subscribe on {self.settings.cluster} failed: "
                    f"topic {', '.join(missing)} does not exist and the cluster does not create "
                    "it automatically"
                )
            with contextlib.suppress(kerrors.KafkaError):
                await consumer._client.force_metadata_update()
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
            if not self._opened:
                return
            self._opened = False
            self._stopping = True
            self._acked.set()  # wake messages() if it waits for acks
            self._notify()
            tasks = (self._connect_task, self._probe_task, self._commit_task, self._position_task)
            for task in tasks:
                await _stop_task(task)
            self._connect_task = self._probe_task = None
            self._commit_task = self._position_task = None
            self._positioned = frozenset()
            consumer = self._consumer
            if consumer is None:  # never connected
                self._reach.reset()
                log.info("%s: stopped (never connected)", self.name)
                return
            if commit:
                # Bounded: with the cluster away the commit could otherwise wait for ever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.request_timeout):
                        await self.commit()
            self._consumer = None
            self._reach.reset()
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
                # During an outage the reachability line says it all: no line per attempt.
                level = logging.WARNING if self._reach.connected else logging.DEBUG
                log.log(level, "%s: commit failed, will retry: %s", self.name, _why(exc))
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
        # The first assignment can arrive while the connect that made the consumer is still
        # running (before `_consumer` is set): wait for it instead of giving up on positions.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.request_timeout):
                while self._consumer is None and not self._stopping:
                    await self._changed.wait()  # replaced and set on every change of consumer
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

        While the source has not connected yet it yields nothing (and waits).

        Raises:
            KafkaClosedError: the source was never started (a closed one just ends).
            KafkaAuthError, KafkaTlsError, KafkaUnknownTopicError: the background connect met
                an error no retry fixes.
        """
        if not self._opened:
            if self._stopping:
                return  # closed: the contract says messages() ends
            raise KafkaClosedError(f"{self.name}: messages(): source not started")
        while not self._stopping:
            consumer = self._consumer
            if consumer is None:
                if self._fatal is not None:
                    raise copy.copy(self._fatal) from self._fatal
                if not self._opened:
                    return
                await self._changed.wait()  # connected, failed for good, or stopped
                continue
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
                level = logging.WARNING if self._reach.connected else logging.DEBUG
                log.log(level, "%s: fetch failed: %s", self.name, _why(exc))
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
            partition=tp.partition,
            sent_at=record.timestamp / 1000 if record.timestamp and record.timestamp > 0 else None,
            # The record's coordinates: unique, and what an operator greps the logs for.
            id=f"{tp.topic}-{tp.partition}@{record.offset}",
        )
