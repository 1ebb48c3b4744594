"""Request/reply across the bridge: bus requests become room RPC calls, room RPC reaches the bus.

Bus to room (a connector ``from: {mqtt|kafka: ..., reply: ...}`` ``to: {room: ..., rpc: ...}``):
each request runs in its own task (at most ``rpc.max_in_flight`` per route; the bus reader waits
for a slot, so the bound is also backpressure) and is acknowledged on the bus only after its
reply was published. Acknowledgements may thus complete out of order; the MQTT connector sends
PUBACKs in arrival order and the Kafka source commits contiguous offsets, so nothing is
acknowledged before everything earlier was answered.

Request conventions:

* MQTT 5: the request's Response Topic and Correlation Data properties; the payload is the RPC
  payload (decoded per the route's ``format``).
* MQTT 3.1.1 (``reply.reply_topic`` set): the payload is a JSON object; the correlation id is
  in ``reply.correlation_field`` (string or number, echoed unchanged), the RPC payload in
  ``reply.payload_field`` (a string, or any JSON value sent as its JSON text); top-level
  scalar fields are placeholders ``{field.NAME}``.
* Kafka: reply topic and correlation id in record headers (names from ``reply.preset``).
* Every request header (Kafka header, MQTT 5 user property) is a placeholder
  ``{header.NAME}``, so destination identity and method can come from topic captures, headers
  or payload fields.

Reply format (status ``ok`` or ``error``):

* MQTT 5: published to the response topic with the same correlation data, user properties
  ``rpc-status``, and on error ``rpc-error-code``, ``rpc-error-message``, ``rpc-error-data``;
  payload = the RPC response, or on error the JSON ``{"code", "message", "data"}``.
* Kafka: produced to the reply-to topic with the same key, the correlation header copied, the
  same ``rpc-*`` headers and payload as MQTT 5.
* MQTT 3.1.1: ``{"<correlation_field>": <same>, "status": "ok", "<payload_field>": "..."}`` or
  ``{"<correlation_field>": <same>, "status": "error", "error": {"code", "message", "data"}}``.

Error codes are LiveKit's, one to one (1400-1404, 1500-1505, and a handler's own codes). The
bridge answers some itself: an identity not in the room gets 1401 RECIPIENT_NOT_FOUND at once
(the SFU would drop the call silently and the caller see 1501 after 7 s); a room the bridge does
not join 1401 too; a request over ``max_request_bytes`` 1402; a response over
``max_response_bytes`` 1504; a request whose deadline passed before it could run 1502. A call
the route's ``allow``/``deny`` rules refuse (a room-to-bus caller, a bus-to-room destination)
gets 1400 UNSUPPORTED_METHOD with data ``permission denied`` (LiveKit has no permission code;
counted ``route.<name>.denied``), and a room-to-bus call its ``where:`` filters out 1400 too.

Deadline: min(``rpc.timeout``, the MQTT 5 message expiry left, the ``rpc-deadline`` header or
field in epoch milliseconds). The callee is told max(deadline, 8 s) like the JS SDK does (our
`RpcManager`), the bridge itself waits only the deadline; answers arriving later are dropped by
the RpcManager and counted there (``rpc.late_response``).

Duplicates: a request is keyed by (route, reply address, correlation id). Its outcome is stored
in a `ReplyCache` before the reply is published; a redelivered request gets the cached reply
again without a second call, also after a restart when ``bridge.state_dir`` is set (SQLite file
``rpc-replies.sqlite3``, entries kept ``rpc_dedup_window`` seconds, at most
``rpc_dedup_max_entries``). A duplicate arriving while the first copy runs waits for it.
Requests without a correlation id are not de-duplicated.

Room to bus (``from: {room: ..., rpc: {methods: [...], reply_topic: ...}}`` ``to: {mqtt|kafka}``):
the bridge serves the methods (exact names registered, globs through the RPC fallback
resolver), publishes each call as a bus request (MQTT 5: response topic + correlation data;
Kafka: reply-to + correlation headers; both with the ``rpc-deadline`` header and provenance),
and answers with the bus reply's payload, or an `RpcError` from its ``rpc-*`` headers. No reply
within min(timeout, what the caller waits): RESPONSE_TIMEOUT (1502). A caller announces less
than it waits (the Rust core of the Python and Node SDKs: max(T - 7 s, 1 s) for a wait of T), so
"what it waits" is its announced response timeout plus 7 s, the room's handler grace. Replies
for calls already answered are dropped and counted ``rpc.late_reply``; unknown ones
``rpc.unknown_reply``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.config import (
    FIELD_PREFIX,
    HEADER_PREFIX,
    BridgeSettings,
    KafkaFrom,
    KafkaReply,
    MqttFrom,
    MqttReply,
    RpcTo,
)
from bridge.endpoint import Inbound, JoinedRoom, Sink
from bridge.envelope import (
    H_PARTICIPANT,
    H_PARTICIPANT_SID,
    H_ROOM,
    H_ROOM_SID,
    H_SOURCE,
    H_TIMESTAMP,
    Envelope,
    Outbound,
)
from bridge.errors import RejectedMessage
from bridge.room.errors import RpcError
from bridge.room.rpc import DEFAULT_HANDLER_GRACE, RpcHandler, RpcInvocationData
from bridge.room.types import Counters
from bridge.router import MAX_JSON_BYTES, ToBusRoute, ToRoomRoute, decode_payload
from bridge.rules import Participant
from bridge.runtime.dead_letter import Rejected, Rejections
from bridge.statefiles import private_dir, private_file
from bridge.topics import Target, TemplateValueError, glob_match

if TYPE_CHECKING:
    from bridge.room.room import Room


log = logging.getLogger("roombus.rpc")

H_RPC_STATUS = "rpc-status"
H_RPC_CODE = "rpc-error-code"
H_RPC_MESSAGE = "rpc-error-message"
H_RPC_DATA = "rpc-error-data"
H_RPC_METHOD = "lk-rpc-method"
H_RPC_REQUEST_ID = "lk-rpc-request-id"
STATE_FILE = "rpc-replies.sqlite3"
REPLY_ATTEMPTS = 5
LATE_MEMORY = 10_000  # correlation ids of timed-out room-to-bus calls remembered
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_GLOB_CHARS = set("*?[")
# The data of the 1400 UNSUPPORTED_METHOD error a route's allow/deny rules answer with: LiveKit
# has no permission code, and "not supported for you" is the built-in code that fits.
PERMISSION_DENIED = "permission denied"


# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class RpcOutcome:
    """What a call came to: a payload, or an error code, message and data."""

    ok: bool
    payload: str = ""
    code: int = 0
    message: str = ""
    data: str | None = None

    @classmethod
    def error(cls, exc: RpcError) -> RpcOutcome:
        """The outcome of a failed call."""
        return cls(False, "", exc.code, exc.message, exc.data)

    @classmethod
    def builtin(cls, code: int, message: str | None = None) -> RpcOutcome:
        """A built-in LiveKit error, with its standard message unless one is given."""
        return cls.error(RpcError(code, message))

    def to_json(self) -> str:
        """For the reply cache."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RpcOutcome:
        """From the reply cache."""
        return cls(**json.loads(text))

    def error_doc(self) -> dict[str, Any]:
        """The error as a JSON object."""
        return {"code": self.code, "message": self.message, "data": self.data}

    def headers(self) -> list[tuple[str, str]]:
        """The ``rpc-*`` headers / user properties of a reply."""
        if self.ok:
            return [(H_RPC_STATUS, "ok")]
        out = [(H_RPC_STATUS, "error"), (H_RPC_CODE, str(self.code)), (H_RPC_MESSAGE, self.message)]
        if self.data is not None:
            out.append((H_RPC_DATA, self.data))
        return out


# ----------------------------------------------------------------------------- reply cache


class ReplyCache:
    """Outcomes of bus requests by key, bounded by age and count; SQLite file or memory.

    Args:
        state_dir: Directory of the SQLite file; None keeps the cache in memory.
        window: Seconds an entry is kept.
        max_entries: Entries at most; the oldest go first.
    """

    def __init__(self, state_dir: str | None, window: float, max_entries: int) -> None:
        self.window = window
        self.max_entries = max_entries
        if state_dir is not None:
            self.path = str(private_file(private_dir(state_dir) / STATE_FILE))
        else:
            self.path = ":memory:"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        if self.path != ":memory:":
            # WAL + NORMAL: a committed entry survives a process crash (not a power loss).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, at REAL, outcome TEXT)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS replies_at ON replies (at)")
        self._puts = 0
        self.prune()

    def get(self, key: str) -> RpcOutcome | None:
        """The outcome stored for `key` within the window, or None."""
        row = self._db.execute(
            "SELECT outcome FROM replies WHERE key = ? AND at >= ?",
            (key, time.time() - self.window),
        ).fetchone()
        return RpcOutcome.from_json(row[0]) if row else None

    def put(self, key: str, outcome: RpcOutcome) -> None:
        """Store `outcome` for `key` (pruning now and then)."""
        self._db.execute(
            "INSERT OR REPLACE INTO replies (key, at, outcome) VALUES (?, ?, ?)",
            (key, time.time(), outcome.to_json()),
        )
        self._puts += 1
        if self._puts % 256 == 0:
            self.prune()

    def prune(self) -> None:
        """Drop entries older than the window and the oldest beyond `max_entries`."""
        self._db.execute("DELETE FROM replies WHERE at < ?", (time.time() - self.window,))
        self._db.execute(
            "DELETE FROM replies WHERE key IN (SELECT key FROM replies ORDER BY at DESC "
            "LIMIT -1 OFFSET ?)",
            (self.max_entries,),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class BusRequest:
    """A bus request, parsed: where its reply goes and what it asks."""

    payload_bytes: bytes
    reply_topic: str
    correlation: bytes | None  # MQTT 5 correlation data, Kafka correlation header (UTF-8)
    json_correlation: object  # MQTT 3.1.1: the JSON value to echo
    values: dict[str, str]
    timeout: float
    key: bytes | None = None
    json_style: bool = False

    @property
    def dedup_key(self) -> str | None:
        """(reply address, correlation) as one string, or None without a correlation id."""
        if self.json_style:
            corr = json.dumps(self.json_correlation, sort_keys=True)
        elif self.correlation is not None:
            corr = self.correlation.hex()
        else:
            return None
        return f"{self.reply_topic}\x00{corr}"


def _deadline_from(value: str | None, now: float) -> float | None:
    """Seconds left until an epoch-milliseconds deadline, or None if absent or malformed."""
    if not value:
        return None
    try:
        at = float(value) / 1000
    except ValueError:
        return None
    return at - now if math.isfinite(at) else None


def parse_request(route: ToRoomRoute, envelope: Envelope, values: dict[str, str]) -> BusRequest:
    """Parse a bus request along `route`; raises `RejectedMessage` when it cannot be answered."""
    spec = _rpc_spec(route)
    source = route.source
    now = time.time()
    values = dict(values)
    for name, value in envelope.headers.items():
        values[f"{HEADER_PREFIX}{name}"] = value
    timeout = spec.timeout
    if envelope.expiry is not None:
        timeout = min(timeout, envelope.received_at + envelope.expiry - now)
    if isinstance(source, MqttFrom):
        reply = source.reply or MqttReply()
        if reply.reply_topic is not None:
            doc = _json_object(envelope.payload)
            if reply.correlation_field not in doc:
                raise RejectedMessage(
                    "no_correlation", f"JSON request lacks {reply.correlation_field!r}"
                )
            corr = doc[reply.correlation_field]
            if not isinstance(corr, (str, int)) or isinstance(corr, bool):
                raise RejectedMessage("no_correlation", "correlation id must be string or number")
            for name, value in doc.items():
                if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    values[f"{FIELD_PREFIX}{name}"] = str(value)
            body = doc.get(reply.payload_field, "")
            text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
            left = _deadline_from(str(doc.get(reply.deadline_header) or ""), now)
            if left is not None:
                timeout = min(timeout, left)
            assert route.reply_topic is not None
            try:
                topic = route.reply_topic.render(values, Target.MQTT_TOPIC)
            except TemplateValueError as exc:
                raise RejectedMessage("bad_reply_topic", str(exc)) from exc
            return BusRequest(text.encode(), topic, None, corr, values, timeout, json_style=True)
        if not envelope.response_topic:
            raise RejectedMessage("no_reply_address", "MQTT request without a response topic")
        left = _deadline_from(envelope.headers.get(reply.deadline_header), now)
        if left is not None:
            timeout = min(timeout, left)
        return BusRequest(
            envelope.payload,
            envelope.response_topic,
            envelope.correlation_data,
            None,
            values,
            timeout,
        )
    assert isinstance(source, KafkaFrom)
    kreply = source.reply or KafkaReply()
    reply_header, corr_header = kreply.header_names
    reply_to = envelope.headers.get(reply_header, "")
    if not _KAFKA_TOPIC.fullmatch(reply_to) or reply_to in (".", ".."):
        raise RejectedMessage(
            "no_reply_address", f"Kafka request without a valid {reply_header!r} header"
        )
    corr_text = envelope.headers.get(corr_header)
    left = _deadline_from(envelope.headers.get(kreply.deadline_header), now)
    if left is not None:
        timeout = min(timeout, left)
    return BusRequest(
        envelope.payload,
        reply_to,
        corr_text.encode() if corr_text is not None else None,
        None,
        values,
        timeout,
        key=envelope.key,
    )


def _json_object(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_JSON_BYTES:
        raise RejectedMessage("json_too_large", f"{len(body)} bytes")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RejectedMessage("malformed_json", str(exc)[:200]) from exc
    if not isinstance(doc, dict):
        raise RejectedMessage("malformed_json", "expected a JSON object")
    return doc


def _rpc_spec(route: ToRoomRoute) -> RpcTo:
    spec = route.target.rpc
    assert spec is not None
    return spec


def parse_reply(headers: Mapping[str, str], payload: bytes) -> str | RpcError:
    """A bus reply (``rpc-*`` headers, payload) as the RPC response or error."""
    status = headers.get(H_RPC_STATUS, "ok").lower()
    if status != "error":
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return RpcError(RpcError.APPLICATION_ERROR, "Bus reply payload is not UTF-8")
    try:
        code = int(headers.get(H_RPC_CODE, str(RpcError.APPLICATION_ERROR)))
    except ValueError:
        code = RpcError.APPLICATION_ERROR
    return RpcError(code, headers.get(H_RPC_MESSAGE), headers.get(H_RPC_DATA))


# ----------------------------------------------------------------------------- the component


@dataclass(eq=False)
class _OutCall:
    future: asyncio.Future[str | RpcError]


class RpcBridge:
    """Both RPC directions for one `Bridge` (see the module docstring)."""

    def __init__(
        self,
        in_routes: list[ToRoomRoute],
        out_routes: list[ToBusRoute],
        *,
        rooms: Mapping[str, JoinedRoom],
        sinks: Mapping[str, Sink[Outbound]],
        rejections: Rejections,
        counters: Counters,
        settings: BridgeSettings,
        bridge_id: str,
        mqtt5: Mapping[str, bool],
    ) -> None:
        self.in_routes = in_routes
        self.out_routes = out_routes
        self.rooms = rooms
        self.sinks = sinks
        self.rejections = rejections
        self.bridge_id = bridge_id
        self.mqtt5 = mqtt5
        self.c = counters
        self.cache = ReplyCache(
            settings.state_dir, settings.rpc_dedup_window, settings.rpc_dedup_max_entries
        )
        self._slots = {r.name: asyncio.Semaphore(_rpc_spec(r).max_in_flight) for r in in_routes}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Future[RpcOutcome]] = {}
        self._out_pending: dict[str, _OutCall] = {}
        self._out_count: dict[str, int] = {r.name: 0 for r in out_routes}
        self._late: OrderedDict[str, None] = OrderedDict()
        # Bus endpoint ("mqtt:plant", "kafka:main") -> reply topic -> the Kafka header holding
        # the correlation id (None on MQTT: correlation data), for room-to-bus calls.
        self.reply_topics: dict[str, dict[str, str | None]] = {}
        for route in out_routes:
            spec = route.source.rpc
            assert spec is not None
            corr = spec.kafka_reply.header_names[1] if route.target.bus == "kafka" else None
            self.reply_topics.setdefault(route.target.endpoint, {})[spec.reply_topic] = corr

    # ------------------------------------------------------------------ lifecycle

    async def drain(self, within: float) -> None:
        """Let running bus requests finish within `within` seconds, then cancel the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Fail calls still waiting, close the cache."""
        for call in self._out_pending.values():
            if not call.future.done():
                call.future.set_result(RpcError(RpcError.RECIPIENT_DISCONNECTED, "Bridge stopping"))
        self.cache.close()

    # ------------------------------------------------------------------ bus to room

    async def submit(
        self,
        route: ToRoomRoute,
        envelope: Envelope,
        values: dict[str, str],
        inbound: Inbound[Envelope],
        *,
        ack: bool,
    ) -> None:
        """Start answering a request (waits for a free slot of the route)."""
        slot = self._slots[route.name]
        await slot.acquire()
        task = asyncio.create_task(
            self._serve(route, envelope, values, inbound, ack), name=f"rpc-{route.name}"
        )
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            slot.release()
            if not t.cancelled() and t.exception() is not None:
                log.error("rpc: request task failed", exc_info=t.exception())

        task.add_done_callback(done)

    async def _serve(
        self,
        route: ToRoomRoute,
        envelope: Envelope,
        values: dict[str, str],
        inbound: Inbound[Envelope],
        ack: bool,
    ) -> None:
        prefix = f"route.{route.name}"
        try:
            request = parse_request(route, envelope, values)
        except RejectedMessage as exc:
            # Counted (route.<name>.rejected.<reason>) by the decision below, once.
            log.warning("%s: cannot answer a request on %s: %s", route.name, envelope.topic, exc)
            # Like every undeliverable message: decided once by the route's on_reject.
            settle, error = await self.rejections.decide(
                route.name,
                route.on_reject,
                route.dead_letter,
                exc,
                Rejected(
                    envelope.payload,
                    values,
                    dict(envelope.headers),
                    envelope.content_type,
                    None,
                    envelope.topic,
                ),
            )
            if settle and ack:
                await inbound.ack(error)
            return
        key = request.dedup_key
        if key is not None:
            key = f"{route.name}\x00{key}"
            cached = self.cache.get(key)
            if cached is None and key in self._running:
                self.c.inc(f"{prefix}.rpc_duplicate_waited")
                cached = await asyncio.shield(self._running[key])
            if cached is not None:
                self.c.inc(f"{prefix}.rpc_duplicate")
                log.info(
                    "%s: duplicate request on %s: cached reply sent", route.name, envelope.topic
                )
                if await self._reply(route, request, cached) and ack:
                    await inbound.ack()
                return
            running: asyncio.Future[RpcOutcome] = asyncio.get_running_loop().create_future()
            self._running[key] = running
        started = time.monotonic()
        try:
            outcome = await self._call(route, request)
        except asyncio.CancelledError:
            if key is not None:
                self._running.pop(key, None)
            raise
        self._record(route.name, started, outcome.code if not outcome.ok else None)
        if key is not None:
            self.cache.put(key, outcome)
            self._running.pop(key, None)
            running.set_result(outcome)
        self.c.inc(f"{prefix}.rpc_{'ok' if outcome.ok else 'error'}")
        if await self._reply(route, request, outcome) and ack:
            await inbound.ack()
        self.c.inc(f"{prefix}.delivered")

    async def _call(self, route: ToRoomRoute, request: BusRequest) -> RpcOutcome:
        spec = _rpc_spec(route)
        target = route.target
        prefix = f"route.{route.name}"
        if request.timeout <= 0:
            self.c.inc(f"{prefix}.rpc_expired")
            return RpcOutcome.builtin(RpcError.RESPONSE_TIMEOUT, "Request expired before the call")
        try:
            room_name = target.room.render(request.values, Target.ROOM)
            destination = target.destination.render(request.values, Target.TEXT)  # type: ignore[union-attr]
        except TemplateValueError as exc:
            return RpcOutcome.builtin(RpcError.RECIPIENT_NOT_FOUND, f"No destination: {exc}")
        try:
            method = target.method.render(request.values, Target.TEXT)  # type: ignore[union-attr]
        except TemplateValueError as exc:
            return RpcOutcome.builtin(RpcError.UNSUPPORTED_METHOD, f"No method: {exc}")
        try:
            raw = request.payload_bytes
            if not request.json_style:
                raw = decode_payload(raw, route.source.format)[0]
            text = raw.decode("utf-8")
        except (RejectedMessage, UnicodeDecodeError) as exc:
            self.c.inc(f"{prefix}.rpc_bad_payload")
            return RpcOutcome.error(
                RpcError(RpcError.APPLICATION_ERROR, "Request payload is not valid", str(exc)[:200])
            )
        if len(text.encode()) > spec.max_request_bytes:
            self.c.inc(f"{prefix}.rpc_request_too_large")
            return RpcOutcome.builtin(RpcError.REQUEST_PAYLOAD_TOO_LARGE)
        link = self.rooms.get(room_name)
        if link is None:
            return RpcOutcome.builtin(
                RpcError.RECIPIENT_NOT_FOUND, f"Room {room_name!r} is not joined by the bridge"
            )
        started = time.monotonic()
        try:
            room = await asyncio.wait_for(link.ready(), request.timeout)
        except TimeoutError:
            return RpcOutcome.builtin(RpcError.SEND_FAILED, "Room not connected")
        left = request.timeout - (time.monotonic() - started)
        info = room.participant_info(destination)
        if info is None:
            self.c.inc(f"{prefix}.rpc_unknown_participant")
            return RpcOutcome.builtin(RpcError.RECIPIENT_NOT_FOUND)
        if route.rules is not None and not route.rules.permits(Participant.of(destination, info)):
            self.c.inc(f"{prefix}.denied")
            return RpcOutcome.builtin(RpcError.UNSUPPORTED_METHOD, PERMISSION_DENIED)
        if left <= 0:
            return RpcOutcome.builtin(RpcError.RESPONSE_TIMEOUT)
        try:
            response = await room.local_participant.perform_rpc(
                destination_identity=destination,
                method=method,
                payload=text,
                response_timeout=left,
            )
        except RpcError as exc:
            return RpcOutcome.error(exc)
        if len(response.encode()) > spec.max_response_bytes:
            self.c.inc(f"{prefix}.rpc_response_too_large")
            return RpcOutcome.builtin(RpcError.RESPONSE_PAYLOAD_TOO_LARGE)
        return RpcOutcome(True, response)

    def _reply_outbound(self, route: ToRoomRoute, request: BusRequest, o: RpcOutcome) -> Outbound:
        source = route.source
        guard = (H_SOURCE, self.bridge_id)
        if isinstance(source, MqttFrom):
            reply = source.reply or MqttReply()
            mqtt5 = self.mqtt5.get(source.mqtt, True)
            if request.json_style:
                doc: dict[str, Any] = {reply.correlation_field: request.json_correlation}
                if o.ok:
                    doc |= {"status": "ok", reply.payload_field: o.payload}
                else:
                    doc |= {"status": "error", "error": o.error_doc()}
                return Outbound(
                    topic=request.reply_topic,
                    payload=json.dumps(doc, ensure_ascii=False).encode(),
                    headers=(*o.headers(), guard) if mqtt5 else (),
                    content_type="application/json" if mqtt5 else None,
                    qos=reply.qos,
                )
            return Outbound(
                topic=request.reply_topic,
                payload=self._body(o),
                headers=(*o.headers(), guard),
                qos=reply.qos,
                correlation_data=request.correlation,
            )
        kreply = source.reply or KafkaReply()
        corr_header = kreply.header_names[1]
        headers = [*o.headers(), guard]
        if request.correlation is not None:
            headers.insert(0, (corr_header, request.correlation.decode()))
        return Outbound(
            topic=request.reply_topic,
            payload=self._body(o),
            key=request.key,
            headers=tuple(headers),
        )

    @staticmethod
    def _body(o: RpcOutcome) -> bytes:
        if o.ok:
            return o.payload.encode()
        return json.dumps(o.error_doc(), ensure_ascii=False).encode()

    async def _reply(self, route: ToRoomRoute, request: BusRequest, outcome: RpcOutcome) -> bool:
        """Publish the reply; True once the bus took it (or it can never be published)."""
        out = self._reply_outbound(route, request, outcome)
        source = route.source
        sink = self.sinks[
            f"mqtt:{source.mqtt}" if isinstance(source, MqttFrom) else f"kafka:{source.kafka}"
        ]
        prefix = f"route.{route.name}"
        for attempt in range(REPLY_ATTEMPTS):
            try:
                await sink.publish(out)
                self.c.inc(f"{prefix}.rpc_replied")
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified by `retriable`
                if not getattr(exc, "retriable", False):
                    self.c.inc(f"{prefix}.rpc_reply_refused")
                    log.warning("%s: reply to %s refused: %s", route.name, out.topic, exc)
                    return True
                self.c.inc(f"{prefix}.rpc_reply_retries")
                log.warning("%s: reply to %s failed (%s); retrying", route.name, out.topic, exc)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        self.c.inc(f"{prefix}.rpc_reply_failed")
        return False  # not acknowledged: the redelivered request gets the cached reply

    # ------------------------------------------------------------------ room to bus

    def attach(self, link: JoinedRoom, room: Room) -> None:
        """Serve this room's room-to-bus RPC methods on its participant."""
        routes = [r for r in self.out_routes if r.wants_room(link.name)]
        if not routes:
            return
        handler = self._handler(link)
        exact: set[str] = set()
        globs = False
        for route in routes:
            for method in route.source.rpc.methods:  # type: ignore[union-attr]
                if _GLOB_CHARS & set(method):
                    globs = True
                else:
                    exact.add(method)
        for method in sorted(exact):
            room.local_participant.register_rpc_method(method, handler)
        if globs:

            def resolve(method: str) -> RpcHandler | None:
                return handler if self._route_for(routes, method, None) else None

            room.set_fallback_rpc_handler(resolve)

    @staticmethod
    def _route_for(routes: list[ToBusRoute], method: str, caller: str | None) -> ToBusRoute | None:
        for route in routes:
            if caller is not None and not route.participant_pattern.matches(caller):
                continue
            if any(glob_match(m, method) for m in route.source.rpc.methods):  # type: ignore[union-attr]
                return route
        return None

    def _handler(self, link: JoinedRoom) -> RpcHandler:
        async def handle(data: RpcInvocationData) -> str:
            routes = [r for r in self.out_routes if r.wants_room(link.name)]
            route = self._route_for(routes, data.method, data.caller_identity)
            if route is None:
                raise RpcError.builtin(RpcError.UNSUPPORTED_METHOD)
            if route.rules is not None and not self._admits(link, route, data):
                raise RpcError.builtin(RpcError.UNSUPPORTED_METHOD, PERMISSION_DENIED)
            started = time.monotonic()
            try:
                result = await self._call_bus(link, route, data)
            except RpcError as exc:
                self._record(route.name, started, exc.code)
                raise
            self._record(route.name, started, None)
            return result

        return handle

    def _admits(self, link: JoinedRoom, route: ToBusRoute, data: RpcInvocationData) -> bool:
        """Whether the route's access rules and `where` let this call through (counted if not)."""
        rules = route.rules
        assert rules is not None
        caller = data.caller_identity
        room = link.room
        if rules.access is not None:
            info = room.participant_info(caller) if room is not None else None
            if not rules.permits(Participant.of(caller, info)):
                self.c.inc(f"route.{route.name}.denied")
                self._record(route.name, time.monotonic(), RpcError.UNSUPPORTED_METHOD)
                return False
        if rules.where is not None:
            values = {
                "room": link.name,
                "room_sid": room.sid if room else "",
                "participant": caller,
                "participant_sid": link.sender_sid(caller),
                "kind": "rpc",
                "method": data.method,
                "request_id": data.request_id,
            }
            why = rules.filtered(values, {}, data.payload.encode())
            if why is not None:
                self.c.inc(f"route.{route.name}.filtered")
                if why != "false":
                    self.c.note_error(route.name, f"filtered: {why}")
                self._record(route.name, time.monotonic(), RpcError.UNSUPPORTED_METHOD)
                return False
        return True

    def _record(self, route: str, started: float, code: int | None) -> None:
        """Count one call's outcome (`code` None: ok) and observe how long it took."""
        outcome = "ok" if code is None else f"error.{code}"
        self.c.inc(f"route.{route}.rpc_calls.{outcome}")
        self.c.observe(f"route.{route}.rpc_seconds", time.monotonic() - started)

    async def _call_bus(self, link: JoinedRoom, route: ToBusRoute, data: RpcInvocationData) -> str:
        spec = route.source.rpc
        assert spec is not None
        prefix = f"route.{route.name}"
        if self._out_count[route.name] >= spec.max_in_flight:
            self.c.inc(f"{prefix}.rpc_overloaded")
            raise RpcError(RpcError.APPLICATION_ERROR, "Too many bus requests in flight")
        # What the caller really waits: the Rust core (the Python and Node SDKs) announces
        # max(T - 7 s, 1 s) but waits T; JS announces max(T, 8 s). The room's own handler
        # deadline allows the same grace (bridge.room.rpc), so a backend gets the route's
        # timeout whenever the caller waits that long.
        timeout = min(spec.timeout, data.response_timeout + DEFAULT_HANDLER_GRACE)
        room = link.room
        values = {
            "room": link.name,
            "room_sid": room.sid if room else "",
            "participant": data.caller_identity,
            "participant_sid": link.sender_sid(data.caller_identity),
            "kind": "rpc",
            "method": data.method,
            "request_id": data.request_id,
        }
        # The route's room and caller captures (plant-{site}, device-{device}).
        values.update(route.room_pattern.match(link.name) or {})
        values.update(route.participant_pattern.match(data.caller_identity) or {})
        deadline_ms = int((time.time() + timeout) * 1000)
        headers = {
            H_ROOM: link.name,
            H_ROOM_SID: values["room_sid"],
            H_PARTICIPANT: data.caller_identity,
            H_PARTICIPANT_SID: values["participant_sid"],
            H_TIMESTAMP: str(int(time.time() * 1000)),
            H_RPC_METHOD: data.method,
            H_RPC_REQUEST_ID: data.request_id,
        }
        corr = uuid.uuid4().hex
        try:
            out = route.target.outbound(
                data.payload.encode(),
                values,
                headers,
                content_type=None,
                default_key=f"{link.name}/{data.caller_identity}",
                bridge_id=self.bridge_id,
            )
        except RejectedMessage as exc:
            self.c.inc(f"{prefix}.rejected.{exc.reason}")
            raise RpcError(
                RpcError.APPLICATION_ERROR, "Cannot build the bus request", exc.detail
            ) from exc
        if route.target.bus == "mqtt":
            out = dataclasses.replace(
                out,
                headers=(*out.headers, ("rpc-deadline", str(deadline_ms))),
                response_topic=spec.reply_topic,
                correlation_data=corr.encode(),
                message_expiry=max(1, math.ceil(timeout)),
            )
        else:
            reply_header, corr_header = spec.kafka_reply.header_names
            out = dataclasses.replace(
                out,
                headers=(
                    *out.headers,
                    (reply_header, spec.reply_topic),
                    (corr_header, corr),
                    (spec.kafka_reply.deadline_header, str(deadline_ms)),
                ),
            )
        call = _OutCall(asyncio.get_running_loop().create_future())
        self._out_pending[corr] = call
        self._out_count[route.name] += 1
        sink = self.sinks[route.target.endpoint]
        try:
            async with asyncio.timeout(timeout):
                try:
                    await sink.publish(out)
                except (asyncio.CancelledError, TimeoutError):
                    raise
                except Exception as exc:
                    self.c.inc(f"{prefix}.rpc_send_failed")
                    raise RpcError(RpcError.SEND_FAILED, None, str(exc)) from exc
                self.c.inc(f"{prefix}.published")
                result = await call.future
        except TimeoutError:
            self.c.inc(f"{prefix}.rpc_timeout")
            self._late[corr] = None
            while len(self._late) > LATE_MEMORY:
                self._late.popitem(last=False)
            raise RpcError.builtin(RpcError.RESPONSE_TIMEOUT) from None
        finally:
            self._out_pending.pop(corr, None)
            self._out_count[route.name] -= 1
        if isinstance(result, RpcError):
            self.c.inc(f"{prefix}.rpc_error")
            raise result
        self.c.inc(f"{prefix}.rpc_ok")
        return result

    def take_reply(self, endpoint: str, envelope: Envelope) -> bool:
        """Whether `envelope`, read from bus `endpoint`, answers a room-to-bus call (consumed)."""
        topics = self.reply_topics.get(endpoint)
        if not topics or envelope.topic not in topics:
            return False
        header = topics[envelope.topic]
        if header is None:
            corr = (envelope.correlation_data or b"").decode("utf-8", "replace")
        else:
            corr = envelope.headers.get(header, "")
        self._resolve(corr, envelope.headers, envelope.payload)
        return True

    def _resolve(self, corr: str, headers: Mapping[str, str], payload: bytes) -> None:
        call = self._out_pending.get(corr)
        if call is None or call.future.done():
            if corr in self._late:
                self.c.inc("rpc.late_reply")
                log.info("rpc: late bus reply %s dropped", corr)
            else:
                self.c.inc("rpc.unknown_reply")
                log.debug("rpc: bus reply with unknown correlation %r dropped", corr[:64])
            return
        call.future.set_result(parse_reply(headers, payload))


__all__ = [
    "H_RPC_CODE",
    "H_RPC_DATA",
    "H_RPC_MESSAGE",
    "H_RPC_STATUS",
    "BusRequest",
    "ReplyCache",
    "RpcBridge",
    "RpcOutcome",
    "parse_reply",
    "parse_request",
]
