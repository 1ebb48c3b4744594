"""LiveKit RPC between participants: calling remote methods and serving our own.

Two wire formats exist (livekit-protocol.md §4) and a participant must speak both:

* v1: `rpc_request` / `rpc_ack` / `rpc_response` DataPackets, payloads ≤ 15,360 UTF-8 bytes.
* v2 (peers with ``client_protocol >= 1``): the request is a text stream on ``lk.rpc_request``
  whose attributes carry id, method, timeout and version ``"2"``; a successful response is a text
  stream on ``lk.rpc_response`` with the request id; acks and *all* errors stay v1 packets.

The caller picks the request format from the callee's ``client_protocol``, the callee picks the
response format from the caller's (a request that came as a stream is always answered by one,
like the Rust SDK does). An identity that is not a room participant counts as
``client_protocol`` 0; this is what makes server-initiated RPC (``RoomService.PerformRpc``, sent
from a random UUID identity) work: it always gets v1 packets back.

`RpcManager` is fed inbound packets by the room's dispatcher (`on_packet`) and inbound text
streams by the stream manager; it never awaits a method handler on those paths, so one slow
handler blocks neither other calls nor the room.

Choices where the SDKs differ or say nothing (documented for callers):

* ``response_timeout_ms`` sent to the callee is ``max(response_timeout, 8 s)`` like the JS SDK
  (Rust sends ``max(timeout - 7 s, 1 s)``); the caller's own wait is ``response_timeout`` counted
  from when the request was handed to the transport, the ack must arrive within ``ack_timeout``
  (7 s) of the same moment.
* Calling an identity that is not in the room uses the v1 packet path like the SDKs; the SFU drops
  it silently, so the call fails with CONNECTION_TIMEOUT (1501), never RECIPIENT_NOT_FOUND.
* A method name longer than 64 UTF-8 bytes (or empty) is refused locally with UNSUPPORTED_METHOD
  (1400); an empty destination with RECIPIENT_NOT_FOUND (1401).
* A handler runs for at most the caller's ``response_timeout_ms`` plus ``handler_grace`` (7 s,
  which covers the Rust SDK's subtraction of its round-trip allowance); past that it is cancelled
  and RESPONSE_TIMEOUT (1502) is sent back.
* More than ``max_concurrent_handlers`` running handlers: the request is acked and answered at
  once with APPLICATION_ERROR (1500) "Too many concurrent RPC requests" (counted
  ``rpc.overloaded``) instead of being queued.
* An error's empty ``data`` is reported as ``None``. Acks and v1 responses are matched by request
  id only (as in the SDKs); v2 response streams must also come from the callee.

Counters (all ``rpc.*``): ``late_response``, ``unknown_ack``, ``malformed_request``,
``malformed_response``, ``response_wrong_sender``, ``duplicate_response``, ``unsupported_method``,
``unsupported_version``, ``overloaded``, ``handler_error``, ``handler_timeout``,
``response_too_large``, ``send_failed``, ``request_stream_failed``, ``response_stream_failed``,
``compressed_unsupported``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

from livekit.protocol import models

from bridge.room.errors import RpcError
from bridge.room.types import (
    CLIENT_PROTOCOL_DATA_STREAM_RPC,
    MAX_RPC_V1_PAYLOAD_BYTES,
    PacketTransport,
)

logger = logging.getLogger("roombus.room.rpc")

RPC_REQUEST_TOPIC = "lk.rpc_request"
RPC_RESPONSE_TOPIC = "lk.rpc_response"
ATTR_REQUEST_ID = "lk.rpc_request_id"
ATTR_METHOD = "lk.rpc_request_method"
ATTR_RESPONSE_TIMEOUT_MS = "lk.rpc_request_response_timeout_ms"
ATTR_VERSION = "lk.rpc_request_version"
RPC_VERSION_V1 = 1
RPC_VERSION_V2 = 2

MAX_METHOD_BYTES = 64
MAX_ERROR_MESSAGE_BYTES = 256
MAX_ERROR_DATA_BYTES = 15_360
DEFAULT_ACK_TIMEOUT = 7.0
DEFAULT_RESPONSE_TIMEOUT = 15.0
# The JS SDK never tells a callee less than 8 s, whatever the caller waits itself.
MIN_SENT_RESPONSE_TIMEOUT = 8.0
DEFAULT_HANDLER_GRACE = 7.0

OVERLOADED_MESSAGE = "Too many concurrent RPC requests"
MALFORMED_STREAM_MESSAGE = "RPC data stream malformed"


# --- What we need from the stream manager (bridge/room/streams.py), typed structurally so this
# --- module does not depend on it.


class RpcStreamInfo(Protocol):
    """The part of a text stream's info RPC reads."""

    @property
    def topic(self) -> str:
        """The stream's topic."""
        ...

    @property
    def attributes(self) -> Mapping[str, str]:
        """The stream's attributes (header merged with trailer)."""
        ...


class RpcTextStreamReader(Protocol):
    """The part of an incoming text stream RPC uses."""

    @property
    def info(self) -> RpcStreamInfo:
        """Header information of the stream."""
        ...

    async def read_all(self) -> str:
        """The whole text; raises `StreamError` when the stream ends abnormally."""
        ...


RpcTextStreamHandler = Callable[[RpcTextStreamReader, str], Awaitable[None] | None]


class RpcStreams(Protocol):
    """The part of `StreamManager` RPC uses (text streams on the ``lk.rpc_*`` topics)."""

    def register_text_stream_handler(self, topic: str, handler: RpcTextStreamHandler) -> None:
        """Call `handler(reader, sender_identity)` for each text stream on `topic`."""
        ...

    def unregister_text_stream_handler(self, topic: str) -> None:
        """Stop handling text streams on `topic`."""
        ...

    async def send_text(
        self,
        text: str,
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
    ) -> object:
        """Send `text` as one text stream."""
        ...


# --- Public types


@dataclass(frozen=True)
class RpcInvocationData:
    """One incoming call, as given to a method handler.

    Attributes:
        request_id: The caller's request id (a UUID).
        caller_identity: Who called; a random UUID for server-initiated calls.
        payload: The request payload.
        response_timeout: Seconds the caller said it waits for the answer.
        method: The method called (lets one handler serve several methods; as in the
            official Python SDK, whose field has the same name and position).
    """

    request_id: str
    caller_identity: str
    payload: str
    response_timeout: float
    method: str = ""


RpcHandler = Callable[[RpcInvocationData], Awaitable[str]]
# Given a method name no handler is registered for, the handler to serve it, or None (the
# caller then gets UNSUPPORTED_METHOD). Lets one component serve methods by pattern.
RpcFallbackHandler = Callable[[str], RpcHandler | None]


@dataclass(eq=False)
class _PendingCall:
    """An outgoing call waiting for its ack and response."""

    request_id: str
    destination: str
    future: asyncio.Future[str]
    acked: bool = False
    ack_timer: asyncio.TimerHandle | None = None
    response_timer: asyncio.TimerHandle | None = None
    reader_task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _IncomingCall:
    """An incoming call accepted for a handler."""

    request_id: str
    caller: str
    method: str
    handler: RpcHandler
    response_timeout: float  # seconds, as the caller announced it
    payload: str = ""
    reader: RpcTextStreamReader | None = None  # v2: the payload is still to be read
    stream_request: bool = False


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _truncate_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, on a character boundary."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


class RpcManager:
    """Both sides of LiveKit RPC for one room: `perform_rpc` and registered method handlers.

    Args:
        transport: Sends packets and knows the room's participants.
        streams: The room's stream manager (v2 requests and responses travel as text streams).
        max_concurrent_handlers: Handlers allowed to run at once; beyond that requests are
            answered immediately with APPLICATION_ERROR.
        ack_timeout: Seconds a caller waits for the callee's ack (CONNECTION_TIMEOUT after).
        handler_grace: Seconds a handler may run past the caller's announced response timeout
            before it is cancelled.
    """

    def __init__(
        self,
        transport: PacketTransport,
        streams: RpcStreams,
        *,
        max_concurrent_handlers: int = 256,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        handler_grace: float = DEFAULT_HANDLER_GRACE,
    ) -> None:
        if max_concurrent_handlers < 1:
            raise ValueError("max_concurrent_handlers must be at least 1")
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        if handler_grace < 0:
            raise ValueError("handler_grace must not be negative")
        self._transport = transport
        self._streams = streams
        self._max_handlers = max_concurrent_handlers
        self._ack_timeout = ack_timeout
        self._handler_grace = handler_grace
        self._methods: dict[str, RpcHandler] = {}
        self._fallback: RpcFallbackHandler | None = None
        self._pending: dict[str, _PendingCall] = {}
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._reader_tasks: set[asyncio.Task[None]] = set()  # v2 response streams being read
        self._closed = False
        streams.register_text_stream_handler(RPC_REQUEST_TOPIC, self._on_request_stream)
        streams.register_text_stream_handler(RPC_RESPONSE_TOPIC, self._on_response_stream)

    # ------------------------------------------------------------------ registration

    @overload
    def register_rpc_method(self, method: str, handler: RpcHandler) -> RpcHandler: ...

    @overload
    def register_rpc_method(
        self, method: str, handler: None = None
    ) -> Callable[[RpcHandler], RpcHandler]: ...

    def register_rpc_method(
        self, method: str, handler: RpcHandler | None = None
    ) -> RpcHandler | Callable[[RpcHandler], RpcHandler]:
        """Serve `method` with `handler`; without `handler`, a decorator that does so.

        The handler gets an `RpcInvocationData` and returns the response payload, or raises
        `RpcError` to send that error back (any other exception becomes APPLICATION_ERROR).

        Raises:
            ValueError: `method` is empty, longer than 64 UTF-8 bytes, or already registered.
        """
        if not method or _utf8_len(method) > MAX_METHOD_BYTES:
            raise ValueError(f"RPC method name must be 1-{MAX_METHOD_BYTES} bytes: {method!r}")

        def register(fn: RpcHandler) -> RpcHandler:
            if method in self._methods:
                raise ValueError(
                    f"RPC method {method!r} already has a handler; unregister it first"
                )
            self._methods[method] = fn
            return fn

        if handler is None:
            return register
        return register(handler)

    def unregister_rpc_method(self, method: str) -> None:
        """Stop serving `method` (no error if it was not registered)."""
        self._methods.pop(method, None)

    def set_fallback_handler(self, fallback: RpcFallbackHandler | None) -> None:
        """Consult `fallback(method)` for methods without a registered handler (None: stop).

        It returns the handler to run, or None to answer UNSUPPORTED_METHOD. It is called on
        the dispatch path, so it must be quick and must not block.
        """
        self._fallback = fallback

    # ------------------------------------------------------------------ caller side

    async def perform_rpc(
        self,
        *,
        destination_identity: str,
        method: str,
        payload: str,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
    ) -> str:
        """Call `method` on participant `destination_identity` and return its response payload.

        Args:
            destination_identity: The callee's identity.
            method: The method name (at most 64 UTF-8 bytes).
            payload: The request payload; at most 15,360 UTF-8 bytes unless the callee
                speaks RPC v2 (``client_protocol >= 1``).
            response_timeout: Seconds to wait for the response.

        Raises:
            RpcError: The callee's error, or a built-in one: CONNECTION_TIMEOUT (no ack),
                RESPONSE_TIMEOUT, RECIPIENT_DISCONNECTED, REQUEST_PAYLOAD_TOO_LARGE,
                SEND_FAILED, UNSUPPORTED_METHOD (bad method name), RECIPIENT_NOT_FOUND (empty
                destination).
            ValueError: `response_timeout` is not positive.
        """
        if response_timeout <= 0:
            raise ValueError("response_timeout must be positive")
        if self._closed:
            raise RpcError(RpcError.SEND_FAILED, "RPC manager is closed")
        if not destination_identity:
            raise RpcError(RpcError.RECIPIENT_NOT_FOUND, "Destination identity is empty")
        if not method or _utf8_len(method) > MAX_METHOD_BYTES:
            raise RpcError(
                RpcError.UNSUPPORTED_METHOD, f"Method name must be 1-{MAX_METHOD_BYTES} bytes"
            )
        info = self._transport.participant_info(destination_identity)
        use_v2 = info is not None and info.client_protocol >= CLIENT_PROTOCOL_DATA_STREAM_RPC
        if not use_v2 and _utf8_len(payload) > MAX_RPC_V1_PAYLOAD_BYTES:
            raise RpcError.builtin(RpcError.REQUEST_PAYLOAD_TOO_LARGE)

        loop = asyncio.get_running_loop()
        request_id = str(uuid.uuid4())
        call = _PendingCall(request_id, destination_identity, loop.create_future())
        # Registered before sending: the ack may arrive while a v2 stream is still being sent.
        self._pending[request_id] = call
        sent_timeout_ms = int(max(response_timeout, MIN_SENT_RESPONSE_TIMEOUT) * 1000)
        try:
            try:
                if use_v2:
                    await self._streams.send_text(
                        payload,
                        topic=RPC_REQUEST_TOPIC,
                        destination_identities=[destination_identity],
                        attributes={
                            ATTR_REQUEST_ID: request_id,
                            ATTR_METHOD: method,
                            ATTR_RESPONSE_TIMEOUT_MS: str(sent_timeout_ms),
                            ATTR_VERSION: str(RPC_VERSION_V2),
                        },
                    )
                else:
                    request = models.RpcRequest(
                        id=request_id,
                        method=method,
                        payload=payload,
                        response_timeout_ms=sent_timeout_ms,
                        version=RPC_VERSION_V1,
                    )
                    await self._send_packet(
                        models.DataPacket(
                            kind=models.DataPacket.Kind.RELIABLE,
                            destination_identities=[destination_identity],
                            rpc_request=request,
                        )
                    )
            except Exception as exc:
                self._transport.counters.inc("rpc.send_failed")
                logger.warning(
                    "rpc: sending request %s (%s) to %s failed: %s",
                    request_id,
                    method,
                    destination_identity,
                    exc,
                )
                raise RpcError(RpcError.SEND_FAILED, None, str(exc)) from exc
            if not call.future.done():
                if not call.acked:
                    call.ack_timer = loop.call_later(self._ack_timeout, self._on_ack_timeout, call)
                call.response_timer = loop.call_later(
                    response_timeout,
                    self._settle,
                    call,
                    RpcError.builtin(RpcError.RESPONSE_TIMEOUT),
                )
            return await call.future
        finally:
            self._forget(call)

    def _forget(self, call: _PendingCall) -> None:
        if self._pending.get(call.request_id) is call:
            del self._pending[call.request_id]
        for timer in (call.ack_timer, call.response_timer):
            if timer is not None:
                timer.cancel()
        if call.reader_task is not None and not call.reader_task.done():
            call.reader_task.cancel()
        if call.future.done() and not call.future.cancelled():
            call.future.exception()  # mark retrieved: the caller may have been cancelled
        elif not call.future.done():
            call.future.cancel()

    def _settle(self, call: _PendingCall, outcome: str | RpcError) -> None:
        """Resolve `call` once; later outcomes are ignored."""
        if call.future.done():
            return
        if isinstance(outcome, RpcError):
            call.future.set_exception(outcome)
        else:
            call.future.set_result(outcome)
        if call.ack_timer is not None:
            call.ack_timer.cancel()
        if call.response_timer is not None:
            call.response_timer.cancel()

    def _on_ack_timeout(self, call: _PendingCall) -> None:
        if not call.acked:
            logger.debug("rpc: no ack for %s from %s", call.request_id, call.destination)
            self._settle(call, RpcError.builtin(RpcError.CONNECTION_TIMEOUT))

    def _on_ack(self, request_id: str) -> None:
        call = self._pending.get(request_id)
        if call is None:
            self._transport.counters.inc("rpc.unknown_ack")
            logger.debug("rpc: ack for unknown request %r dropped", request_id)
            return
        call.acked = True
        if call.ack_timer is not None:
            call.ack_timer.cancel()
            call.ack_timer = None

    def _on_response_packet(self, response: models.RpcResponse) -> None:
        call = self._pending.get(response.request_id)
        if call is None or call.future.done():
            self._transport.counters.inc("rpc.late_response")
            logger.debug("rpc: response for unknown request %r dropped", response.request_id)
            return
        call.acked = True  # a response implies the ack (which an ordered channel delivered)
        which = response.WhichOneof("value")
        if which == "error":
            err = response.error
            self._settle(call, RpcError(err.code, err.message, err.data or None))
        elif which == "compressed_payload":
            # No SDK release sends it yet (livekit-protocol.md §4.1); fail loudly, not wrongly.
            self._transport.counters.inc("rpc.compressed_unsupported")
            self._settle(
                call,
                RpcError(RpcError.APPLICATION_ERROR, "Compressed RPC responses not supported"),
            )
        else:  # "payload", or nothing set: an empty response (as the Rust SDK reads it)
            self._settle(call, response.payload)

    def _on_response_stream(self, reader: RpcTextStreamReader, sender: str) -> None:
        request_id = reader.info.attributes.get(ATTR_REQUEST_ID, "")
        if not request_id:
            self._transport.counters.inc("rpc.malformed_response")
            logger.warning("rpc: %s stream from %s has no request id", RPC_RESPONSE_TOPIC, sender)
            return
        call = self._pending.get(request_id)
        if call is None or call.future.done():
            self._transport.counters.inc("rpc.late_response")
            logger.debug("rpc: response stream for unknown request %r dropped", request_id)
            return
        if sender != call.destination:
            # Only the callee may answer (the JS SDK checks this too).
            self._transport.counters.inc("rpc.response_wrong_sender")
            logger.warning(
                "rpc: response to %s from %s ignored, expected %s",
                request_id,
                sender,
                call.destination,
            )
            return
        if call.reader_task is not None:
            self._transport.counters.inc("rpc.duplicate_response")
            return
        call.acked = True
        # Read in a task: the stream's chunks arrive through the dispatcher that called us.
        task = asyncio.get_running_loop().create_task(
            self._read_response(call, reader), name=f"rpc-response-{request_id}"
        )
        call.reader_task = task
        self._track(self._reader_tasks, task)

    async def _read_response(self, call: _PendingCall, reader: RpcTextStreamReader) -> None:
        try:
            text = await reader.read_all()
        except Exception as exc:  # noqa: BLE001 - whatever the reason, the caller gets an answer
            self._transport.counters.inc("rpc.response_stream_failed")
            logger.warning("rpc: reading response to %s failed: %s", call.request_id, exc)
            self._settle(
                call,
                RpcError(
                    RpcError.APPLICATION_ERROR,
                    "Failed to read response stream",
                    str(exc),
                ),
            )
            return
        self._settle(call, text)

    def on_participant_left(self, identity: str) -> None:
        """Fail every pending call to `identity` with RECIPIENT_DISCONNECTED (1503)."""
        for call in list(self._pending.values()):
            if call.destination == identity:
                self._settle(call, RpcError.builtin(RpcError.RECIPIENT_DISCONNECTED))

    def fail_all(self, error: RpcError) -> None:
        """Fail every pending call with `error` (the room closed or is reconnecting)."""
        for call in list(self._pending.values()):
            # One instance per caller: a shared exception would collect everyone's tracebacks.
            self._settle(call, RpcError(error.code, error.message, error.data))

    # ------------------------------------------------------------------ inbound packets

    async def on_packet(self, packet: models.DataPacket) -> None:
        """Handle an inbound ``rpc_request``, ``rpc_ack`` or ``rpc_response`` packet.

        Never waits for a method handler: only for the transport to take the ack (and, when
        the request is refused at once, its error response).
        """
        if self._closed:
            return
        which = packet.WhichOneof("value")
        if which == "rpc_ack":
            self._on_ack(packet.rpc_ack.request_id)
        elif which == "rpc_response":
            self._on_response_packet(packet.rpc_response)
        elif which == "rpc_request":
            await self._on_request_packet(packet.participant_identity, packet.rpc_request)

    async def _on_request_packet(self, caller: str, request: models.RpcRequest) -> None:
        if not caller or not request.id:
            # Nobody to answer, or nothing to answer with.
            self._transport.counters.inc("rpc.malformed_request")
            logger.warning("rpc: request without caller or id dropped (caller %r)", caller)
            return
        await self._send_ack(caller, request.id)
        if request.version != RPC_VERSION_V1:
            self._transport.counters.inc("rpc.unsupported_version")
            await self._send_error(
                caller, request.id, RpcError.builtin(RpcError.UNSUPPORTED_VERSION)
            )
            return
        await self._accept(
            caller,
            request.id,
            request.method,
            request.response_timeout_ms,
            payload=request.payload,
            reader=None,
        )

    async def _on_request_stream(self, reader: RpcTextStreamReader, caller: str) -> None:
        if self._closed:
            return
        attrs = reader.info.attributes
        request_id = attrs.get(ATTR_REQUEST_ID, "")
        method = attrs.get(ATTR_METHOD, "")
        if not caller or not request_id:
            self._transport.counters.inc("rpc.malformed_request")
            logger.warning("rpc: %s stream from %r without request id", RPC_REQUEST_TOPIC, caller)
            return
        await self._send_ack(caller, request_id)
        timeout_ms = _parse_timeout_ms(attrs.get(ATTR_RESPONSE_TIMEOUT_MS, ""))
        if not method or timeout_ms < 0:
            self._transport.counters.inc("rpc.malformed_request")
            logger.warning(
                "rpc: %s stream %s from %s lacks %s / %s",
                RPC_REQUEST_TOPIC,
                request_id,
                caller,
                ATTR_METHOD,
                ATTR_RESPONSE_TIMEOUT_MS,
            )
            await self._send_error(
                caller, request_id, RpcError(RpcError.APPLICATION_ERROR, MALFORMED_STREAM_MESSAGE)
            )
            return
        if attrs.get(ATTR_VERSION, "") != str(RPC_VERSION_V2):
            self._transport.counters.inc("rpc.unsupported_version")
            await self._send_error(
                caller, request_id, RpcError.builtin(RpcError.UNSUPPORTED_VERSION)
            )
            return
        await self._accept(caller, request_id, method, timeout_ms, payload="", reader=reader)

    async def _accept(
        self,
        caller: str,
        request_id: str,
        method: str,
        timeout_ms: int,
        *,
        payload: str,
        reader: RpcTextStreamReader | None,
    ) -> None:
        """Start the handler of an acked request, or answer at once with an error.

        Refusals are sent here rather than from a task, so a flood of bad requests is slowed
        by the transport's flow control instead of piling up tasks.
        """
        handler = self._methods.get(method)
        if handler is None and self._fallback is not None:
            try:
                handler = self._fallback(method)
            except Exception:  # a broken resolver means "not served"
                logger.exception("rpc: fallback handler failed for %s", method)
                handler = None
        if handler is None:
            self._transport.counters.inc("rpc.unsupported_method")
            logger.debug("rpc: %s from %s: no such method", method, caller)
            await self._send_error(
                caller, request_id, RpcError.builtin(RpcError.UNSUPPORTED_METHOD)
            )
            return
        if len(self._handler_tasks) >= self._max_handlers:
            self._transport.counters.inc("rpc.overloaded")
            logger.warning("rpc: %s from %s refused: %s", method, caller, OVERLOADED_MESSAGE)
            await self._send_error(
                caller, request_id, RpcError(RpcError.APPLICATION_ERROR, OVERLOADED_MESSAGE)
            )
            return
        # A timeout of 0 means the caller did not say: assume the SDKs' default.
        timeout = timeout_ms / 1000 if timeout_ms > 0 else DEFAULT_RESPONSE_TIMEOUT
        incoming = _IncomingCall(
            request_id=request_id,
            caller=caller,
            method=method,
            handler=handler,
            response_timeout=timeout,
            payload=payload,
            reader=reader,
            stream_request=reader is not None,
        )
        task = asyncio.get_running_loop().create_task(
            self._serve(incoming), name=f"rpc-handler-{request_id}"
        )
        self._track(self._handler_tasks, task)

    async def _serve(self, call: _IncomingCall) -> None:
        """Run one handler under its deadline and send its outcome back."""
        outcome: str | RpcError
        deadline = asyncio.timeout(call.response_timeout + self._handler_grace)
        try:
            async with deadline:
                payload = call.payload
                if call.reader is not None:
                    try:
                        payload = await call.reader.read_all()
                    except Exception as exc:  # noqa: BLE001 - the caller gets an answer
                        self._transport.counters.inc("rpc.request_stream_failed")
                        logger.warning(
                            "rpc: reading request %s from %s failed: %s",
                            call.request_id,
                            call.caller,
                            exc,
                        )
                        await self._send_error(
                            call.caller,
                            call.request_id,
                            RpcError(
                                RpcError.APPLICATION_ERROR,
                                "Failed to read request stream",
                                str(exc),
                            ),
                        )
                        return
                data = RpcInvocationData(
                    request_id=call.request_id,
                    caller_identity=call.caller,
                    payload=payload,
                    response_timeout=call.response_timeout,
                    method=call.method,
                )
                result: object = await call.handler(data)
            if result is None:  # a handler that forgot to return: an empty response, as in JS
                result = ""
            outcome = result if isinstance(result, str) else _bad_result(call, result)
        except RpcError as exc:
            outcome = exc
        except Exception:
            if deadline.expired():
                self._transport.counters.inc("rpc.handler_timeout")
                logger.warning(
                    "rpc: handler for %s (request %s from %s) ran past its deadline",
                    call.method,
                    call.request_id,
                    call.caller,
                )
                outcome = RpcError.builtin(RpcError.RESPONSE_TIMEOUT)
            else:
                self._transport.counters.inc("rpc.handler_error")
                logger.exception(
                    "rpc: handler for %s (request %s from %s) failed; returning APPLICATION_ERROR",
                    call.method,
                    call.request_id,
                    call.caller,
                )
                outcome = RpcError.builtin(RpcError.APPLICATION_ERROR)
        if isinstance(outcome, RpcError):
            await self._send_error(call.caller, call.request_id, outcome)
        else:
            await self._send_result(call, outcome)

    async def _send_result(self, call: _IncomingCall, payload: str) -> None:
        info = self._transport.participant_info(call.caller)
        caller_v2 = info is not None and info.client_protocol >= CLIENT_PROTOCOL_DATA_STREAM_RPC
        if call.stream_request or caller_v2:
            try:
                await self._streams.send_text(
                    payload,
                    topic=RPC_RESPONSE_TOPIC,
                    destination_identities=[call.caller],
                    attributes={ATTR_REQUEST_ID: call.request_id},
                )
            except Exception as exc:  # noqa: BLE001 - reported to the caller as SEND_FAILED
                self._transport.counters.inc("rpc.send_failed")
                logger.warning(
                    "rpc: sending response stream for %s to %s failed: %s",
                    call.request_id,
                    call.caller,
                    exc,
                )
                await self._send_error(
                    call.caller, call.request_id, RpcError(RpcError.SEND_FAILED, None, str(exc))
                )
            return
        if _utf8_len(payload) > MAX_RPC_V1_PAYLOAD_BYTES:
            self._transport.counters.inc("rpc.response_too_large")
            logger.warning(
                "rpc: response to %s for %s is over %d bytes",
                call.caller,
                call.request_id,
                MAX_RPC_V1_PAYLOAD_BYTES,
            )
            await self._send_error(
                call.caller, call.request_id, RpcError.builtin(RpcError.RESPONSE_PAYLOAD_TOO_LARGE)
            )
            return
        await self._send_response(
            call.caller, models.RpcResponse(request_id=call.request_id, payload=payload)
        )

    async def _send_ack(self, caller: str, request_id: str) -> None:
        try:
            await self._send_packet(
                models.DataPacket(
                    kind=models.DataPacket.Kind.RELIABLE,
                    destination_identities=[caller],
                    rpc_ack=models.RpcAck(request_id=request_id),
                )
            )
        except Exception as exc:  # noqa: BLE001 - a failed send must not stop the dispatcher
            self._transport.counters.inc("rpc.send_failed")
            logger.warning("rpc: ack for %s to %s failed: %s", request_id, caller, exc)

    async def _send_error(self, caller: str, request_id: str, error: RpcError) -> None:
        """Send `error` as a v1 ``rpc_response`` (errors never travel as streams)."""
        proto_error = models.RpcError(
            code=error.code,
            message=_truncate_utf8(error.message, MAX_ERROR_MESSAGE_BYTES),
            data=_truncate_utf8(error.data or "", MAX_ERROR_DATA_BYTES),
        )
        await self._send_response(
            caller, models.RpcResponse(request_id=request_id, error=proto_error)
        )

    async def _send_response(self, caller: str, response: models.RpcResponse) -> None:
        try:
            await self._send_packet(
                models.DataPacket(
                    kind=models.DataPacket.Kind.RELIABLE,
                    destination_identities=[caller],
                    rpc_response=response,
                )
            )
        except Exception as exc:  # noqa: BLE001 - a failed send must not stop the dispatcher
            self._transport.counters.inc("rpc.send_failed")
            logger.warning(
                "rpc: response for %s to %s failed: %s", response.request_id, caller, exc
            )

    async def _send_packet(self, packet: models.DataPacket) -> None:
        await self._transport.send_packet(packet, reliable=True)

    # ------------------------------------------------------------------ lifecycle

    def _track(self, tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @property
    def pending_calls(self) -> int:
        """Outgoing calls waiting for an answer."""
        return len(self._pending)

    @property
    def running_handlers(self) -> int:
        """Handlers running now."""
        return len(self._handler_tasks)

    async def aclose(self) -> None:
        """Stop: cancel running handlers and fail every pending call (RECIPIENT_DISCONNECTED).

        Idempotent. Pending calls fail like the SDKs fail them when the room disconnects (every
        participant is gone).
        """
        if self._closed:
            return
        self._closed = True
        for topic in (RPC_REQUEST_TOPIC, RPC_RESPONSE_TOPIC):
            try:
                self._streams.unregister_text_stream_handler(topic)
            except Exception as exc:  # noqa: BLE001 - closing must finish whatever happens
                logger.debug("rpc: unregistering %s: %s", topic, exc)
        self.fail_all(RpcError(RpcError.RECIPIENT_DISCONNECTED, "Room closed"))
        tasks = [*self._handler_tasks, *self._reader_tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _parse_timeout_ms(text: str) -> int:
    """The stream attribute's milliseconds; -1 when missing or not a finite number >= 0."""
    try:
        value = float(text)  # SDKs send an integer; be lenient with "1500.0"
    except ValueError:
        return -1
    if not math.isfinite(value) or value < 0:
        return -1
    return int(value)


def _bad_result(call: _IncomingCall, result: object) -> RpcError:
    """A handler returned something other than a string (typing aside, it can happen)."""
    logger.error(
        "rpc: handler for %s returned %s, not str; returning APPLICATION_ERROR",
        call.method,
        type(result).__name__,
    )
    return RpcError.builtin(RpcError.APPLICATION_ERROR)
