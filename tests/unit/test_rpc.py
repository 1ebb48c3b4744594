"""RpcManager: both sides of LiveKit RPC, v1 packets and v2 streams, without sockets.

Participants are RpcManagers wired through a fake network: packets are serialised and parsed
(so only what is on the wire crosses), stamped with the sender identity like the SFU does, and
delivered in order to each receiver's dispatcher task; text streams travel as a header item and
an end item on the same ordered queue, so a reader only completes after the dispatcher moved on.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from livekit.protocol import models

from bridge.room.errors import NotConnectedError, RpcError, StreamError
from bridge.room.rpc import (
    ATTR_METHOD,
    ATTR_REQUEST_ID,
    ATTR_RESPONSE_TIMEOUT_MS,
    ATTR_VERSION,
    RPC_REQUEST_TOPIC,
    RPC_RESPONSE_TOPIC,
    RpcInvocationData,
    RpcManager,
    RpcTextStreamHandler,
)
from bridge.room.types import Counters

# --------------------------------------------------------------------------- fakes


@dataclass
class FakeInfo:
    topic: str
    attributes: dict[str, str]
    stream_id: str = field(default_factory=lambda: str(uuid.uuid4()))


class FakeReader:
    """A text stream whose content becomes readable when its end item is dispatched."""

    def __init__(self, info: FakeInfo, text: str, error: Exception | None = None) -> None:
        self.info = info
        self._text = text
        self._error = error
        self._ended = asyncio.Event()

    def end(self) -> None:
        self._ended.set()

    async def read_all(self) -> str:
        await self._ended.wait()
        if self._error is not None:
            raise self._error
        return self._text


@dataclass
class SentStream:
    text: str
    topic: str
    destinations: list[str]
    attributes: dict[str, str]


class FakeStreams:
    """Same API as bridge.room.streams.StreamManager, the part RPC uses."""

    def __init__(self, net: Network, identity: str) -> None:
        self.net = net
        self.identity = identity
        self.handlers: dict[str, RpcTextStreamHandler] = {}
        self.sent: list[SentStream] = []
        self.fail = False

    def register_text_stream_handler(self, topic: str, handler: RpcTextStreamHandler) -> None:
        if topic in self.handlers:
            raise ValueError(f"handler for {topic} already registered")
        self.handlers[topic] = handler

    def unregister_text_stream_handler(self, topic: str) -> None:
        self.handlers.pop(topic, None)

    async def send_text(
        self,
        text: str,
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        reply_to_id: str | None = None,
    ) -> FakeInfo:
        if self.fail:
            raise StreamError("stream send failed: channel closed")
        attrs = dict(attributes or {})
        self.sent.append(SentStream(text, topic, list(destination_identities), attrs))
        info = FakeInfo(topic, attrs)
        for dest in destination_identities:
            self.net.deliver_stream(self.identity, dest, FakeInfo(topic, dict(attrs)), text)
        await asyncio.sleep(0)
        return info


class FakeTransport:
    """PacketTransport over the fake network."""

    def __init__(self, net: Network, identity: str) -> None:
        self.net = net
        self.identity = identity
        self._counters = Counters()
        self.sent: list[models.DataPacket] = []
        self.fail = False

    @property
    def local_identity(self) -> str:
        return self.identity

    @property
    def counters(self) -> Counters:
        return self._counters

    async def send_packet(self, packet: models.DataPacket, *, reliable: bool = True) -> None:
        assert reliable, "RPC packets are always reliable"
        if self.fail:
            raise NotConnectedError("room is reconnecting")
        wire = models.DataPacket.FromString(packet.SerializeToString())
        wire.participant_identity = self.identity  # the SFU stamps the sender
        wire.participant_sid = f"PA_{self.identity}"
        self.sent.append(wire)
        self.net.deliver_packet(self.identity, wire)
        await asyncio.sleep(0)

    def participant_info(self, identity: str) -> models.ParticipantInfo | None:
        peer = self.net.endpoints.get(identity)
        if peer is None or identity == self.identity:
            return None
        return models.ParticipantInfo(identity=identity, client_protocol=peer.client_protocol)

    def remote_identities(self) -> Sequence[str]:
        return [i for i in self.net.endpoints if i != self.identity]


class Endpoint:
    def __init__(
        self, net: Network, identity: str, client_protocol: int, **rpc_kwargs: Any
    ) -> None:
        self.identity = identity
        self.client_protocol = client_protocol
        self.transport = FakeTransport(net, identity)
        self.streams = FakeStreams(net, identity)
        self.rpc = RpcManager(self.transport, self.streams, **rpc_kwargs)
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.deaf = False  # drops everything addressed to it (an unresponsive peer)
        self.task = asyncio.get_running_loop().create_task(self._dispatch())

    @property
    def counters(self) -> Counters:
        return self.transport.counters

    async def _dispatch(self) -> None:
        # Like the room's dispatcher: one item at a time, in arrival order.
        while True:
            kind, item = await self.inbox.get()
            if kind == "packet":
                await self.rpc.on_packet(item)
            elif kind == "stream":
                reader, sender = item
                handler = self.streams.handlers.get(reader.info.topic)
                if handler is None:
                    continue
                result = handler(reader, sender)
                if inspect.isawaitable(result):
                    await result
            elif kind == "end":
                item.end()


class Network:
    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.outside: list[tuple[str, models.DataPacket]] = []  # to identities not in the room

    def add(self, identity: str, client_protocol: int = 0, **rpc_kwargs: Any) -> Endpoint:
        rpc_kwargs.setdefault("ack_timeout", 2.0)
        ep = Endpoint(self, identity, client_protocol, **rpc_kwargs)
        self.endpoints[identity] = ep
        return ep

    def deliver_packet(self, sender: str, packet: models.DataPacket) -> None:
        for dest in packet.destination_identities:
            ep = self.endpoints.get(dest)
            if ep is None:
                self.outside.append((dest, packet))
            elif dest != sender and not ep.deaf:
                ep.inbox.put_nowait(("packet", packet))

    def deliver_stream(
        self, sender: str, dest: str, info: FakeInfo, text: str, error: Exception | None = None
    ) -> FakeReader:
        reader = FakeReader(info, text, error)
        ep = self.endpoints.get(dest)
        if ep is not None and dest != sender and not ep.deaf:
            ep.inbox.put_nowait(("stream", (reader, sender)))
            ep.inbox.put_nowait(("end", reader))
        return reader

    async def aclose(self) -> None:
        for ep in self.endpoints.values():
            await ep.rpc.aclose()
            ep.task.cancel()
        await asyncio.gather(*(ep.task for ep in self.endpoints.values()), return_exceptions=True)


@pytest.fixture
async def net() -> AsyncIterator[Network]:
    network = Network()
    yield network
    await network.aclose()


async def echo(data: RpcInvocationData) -> str:
    return data.payload


def responses(ep: Endpoint) -> list[models.RpcResponse]:
    return [p.rpc_response for p in ep.transport.sent if p.WhichOneof("value") == "rpc_response"]


def acks(ep: Endpoint) -> list[models.DataPacket]:
    return [p for p in ep.transport.sent if p.WhichOneof("value") == "rpc_ack"]


async def until(predicate: Any, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def request_packet(
    caller: str,
    *,
    request_id: str | None = None,
    method: str = "echo",
    payload: str = "hi",
    timeout_ms: int = 10_000,
    version: int = 1,
) -> models.DataPacket:
    return models.DataPacket(
        participant_identity=caller,
        destination_identities=["b"],
        rpc_request=models.RpcRequest(
            id=request_id if request_id is not None else str(uuid.uuid4()),
            method=method,
            payload=payload,
            response_timeout_ms=timeout_ms,
            version=version,
        ),
    )


# --------------------------------------------------------------------------- success paths


async def test_v1_calls_both_ways_use_packets_only(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    seen: list[RpcInvocationData] = []

    async def upper(data: RpcInvocationData) -> str:
        seen.append(data)
        return data.payload.upper()

    a.rpc.register_rpc_method("upper", upper)
    b.rpc.register_rpc_method("upper", upper)

    assert await b.rpc.perform_rpc(destination_identity="a", method="upper", payload="x") == "X"
    out = await a.rpc.perform_rpc(
        destination_identity="b", method="upper", payload="héllo", response_timeout=2.0
    )
    assert out == "HÉLLO"

    req = next(p for p in a.transport.sent if p.WhichOneof("value") == "rpc_request")
    assert list(req.destination_identities) == ["b"]
    assert req.rpc_request.version == 1
    assert req.rpc_request.method == "upper"
    assert req.rpc_request.payload == "héllo"
    assert req.rpc_request.response_timeout_ms == 8_000  # max(2 s, 8 s), as the JS SDK sends
    assert seen[1] == RpcInvocationData(req.rpc_request.id, "a", "héllo", 8.0, "upper")
    assert seen[0].response_timeout == 15.0  # the default
    # b acked then answered with a v1 payload, both to a only; no streams anywhere.
    kinds_to_a = [
        p.WhichOneof("value") for p in b.transport.sent if list(p.destination_identities) == ["a"]
    ]
    assert kinds_to_a == ["rpc_request", "rpc_ack", "rpc_response"]
    assert responses(b)[-1].payload == "HÉLLO"
    assert a.streams.sent == [] and b.streams.sent == []
    assert a.rpc.pending_calls == 0 and b.rpc.pending_calls == 0


@pytest.mark.parametrize("protocol", [1, 2])
async def test_v2_calls_both_ways_use_streams_and_ack_packets(net: Network, protocol: int) -> None:
    a, b = net.add("a", protocol), net.add("b", protocol)
    a.rpc.register_rpc_method("echo", echo)
    b.rpc.register_rpc_method("echo", echo)

    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="ping") == (
        "ping"
    )
    assert await b.rpc.perform_rpc(destination_identity="a", method="echo", payload="") == ""

    request = a.streams.sent[0]
    assert request.topic == RPC_REQUEST_TOPIC
    assert request.destinations == ["b"]
    assert request.text == "ping"
    assert set(request.attributes) == {
        ATTR_REQUEST_ID,
        ATTR_METHOD,
        ATTR_RESPONSE_TIMEOUT_MS,
        ATTR_VERSION,
    }
    assert request.attributes[ATTR_METHOD] == "echo"
    assert request.attributes[ATTR_RESPONSE_TIMEOUT_MS] == "15000"
    assert request.attributes[ATTR_VERSION] == "2"
    request_id = request.attributes[ATTR_REQUEST_ID]
    uuid.UUID(request_id)

    response = b.streams.sent[0]
    assert response.topic == RPC_RESPONSE_TOPIC
    assert response.destinations == ["a"]
    assert response.attributes == {ATTR_REQUEST_ID: request_id}
    assert response.text == "ping"
    # Acks stay packets; no rpc_request / rpc_response packet was used.
    assert [p.rpc_ack.request_id for p in acks(b)] == [request_id]
    kinds = {p.WhichOneof("value") for ep in (a, b) for p in ep.transport.sent}
    assert kinds == {"rpc_ack"}


async def test_v2_request_to_v1_callee_and_back(net: Network) -> None:
    """Each side picks the format from the *other* side's client_protocol."""
    new, old = net.add("new", 2), net.add("old", 0)
    new.rpc.register_rpc_method("echo", echo)
    old.rpc.register_rpc_method("echo", echo)

    # new -> old: v1 request packet; old answers by stream since new speaks v2.
    assert await new.rpc.perform_rpc(destination_identity="old", method="echo", payload="1") == "1"
    assert [p.WhichOneof("value") for p in new.transport.sent] == ["rpc_request"]
    assert [s.topic for s in old.streams.sent] == [RPC_RESPONSE_TOPIC]

    # old -> new: v2 request stream (new speaks v2); new answers by stream too.
    assert await old.rpc.perform_rpc(destination_identity="new", method="echo", payload="2") == "2"
    assert [s.topic for s in old.streams.sent][-1] == RPC_REQUEST_TOPIC
    assert [s.topic for s in new.streams.sent] == [RPC_RESPONSE_TOPIC]


async def test_v2_large_payloads_have_no_limit(net: Network) -> None:
    a, b = net.add("a", 2), net.add("b", 2)
    b.rpc.register_rpc_method("echo", echo)
    big = "ü" * 60_000  # 120,000 UTF-8 bytes
    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload=big) == big


async def test_handler_may_be_registered_with_a_decorator(net: Network) -> None:
    a, b = net.add("a"), net.add("b")

    @b.rpc.register_rpc_method("twice")
    async def twice(data: RpcInvocationData) -> str:
        return data.payload * 2

    assert await a.rpc.perform_rpc(destination_identity="b", method="twice", payload="ab") == "abab"
    with pytest.raises(ValueError, match="already has a handler"):
        b.rpc.register_rpc_method("twice", echo)
    with pytest.raises(ValueError, match="already has a handler"):
        b.rpc.register_rpc_method("twice")(echo)
    b.rpc.unregister_rpc_method("twice")
    b.rpc.unregister_rpc_method("never-registered")
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="twice", payload="ab")
    assert err.value.code == RpcError.UNSUPPORTED_METHOD


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("protocol", [0, 2])
async def test_application_error_keeps_code_message_and_data(net: Network, protocol: int) -> None:
    a, b = net.add("a", protocol), net.add("b", protocol)

    @b.rpc.register_rpc_method("fail")
    async def fail(data: RpcInvocationData) -> str:
        raise RpcError(2001, "bad thing", "details")

    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="fail", payload="x")
    assert (err.value.code, err.value.message, err.value.data) == (2001, "bad thing", "details")
    # Errors always go back as v1 packets, whatever the transport of the request.
    assert responses(b)[0].WhichOneof("value") == "error"
    assert [s.topic for s in b.streams.sent] == []


async def test_error_message_and_data_are_truncated(net: Network) -> None:
    a, b = net.add("a"), net.add("b")

    @b.rpc.register_rpc_method("fail")
    async def fail(data: RpcInvocationData) -> str:
        raise RpcError(3000, "é" * 200, "d" * 20_000)

    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="fail", payload="x")
    assert err.value.message == "é" * 128  # 256 bytes, cut on a character boundary
    assert err.value.data == "d" * 15_360


async def test_other_exception_becomes_application_error(
    net: Network, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = net.add("a"), net.add("b", 2)

    @b.rpc.register_rpc_method("boom")
    async def boom(data: RpcInvocationData) -> str:
        raise KeyError("secret internals")

    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="boom", payload="x")
    assert err.value.code == RpcError.APPLICATION_ERROR
    assert err.value.message == "Application error in method handler"
    assert err.value.data is None  # internals stay local
    assert b.counters["rpc.handler_error"] == 1
    assert any("secret internals" in (r.exc_text or "") for r in caplog.records)
    assert all(r.name == "roombus.room.rpc" for r in caplog.records)


@pytest.mark.parametrize("protocol", [0, 2])
async def test_unsupported_method(net: Network, protocol: int) -> None:
    a, b = net.add("a", protocol), net.add("b", protocol)
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="nope", payload="x")
    assert err.value.code == RpcError.UNSUPPORTED_METHOD
    assert err.value.message == "Method not supported at destination"
    assert b.counters["rpc.unsupported_method"] == 1
    assert len(acks(b)) == 1  # acked before the lookup


async def test_unsupported_version_of_packet_request(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    b.rpc.register_rpc_method("echo", echo)
    packet = request_packet("a", request_id="r-1", version=2)
    await b.rpc.on_packet(packet)
    assert [p.WhichOneof("value") for p in b.transport.sent] == ["rpc_ack", "rpc_response"]
    assert all(list(p.destination_identities) == ["a"] for p in b.transport.sent)
    assert b.transport.sent[0].rpc_ack.request_id == "r-1"
    err = responses(b)[0].error
    assert (err.code, err.message) == (RpcError.UNSUPPORTED_VERSION, "Unsupported RPC version")
    # a never made that call: it drops both and counts them.
    await until(lambda: a.counters["rpc.late_response"] == 1)
    assert a.counters["rpc.unknown_ack"] == 1


@pytest.mark.parametrize("version", ["1", "3", None])
async def test_unsupported_version_of_stream_request(net: Network, version: str | None) -> None:
    _a, b = net.add("a", 2), net.add("b", 2)
    b.rpc.register_rpc_method("echo", echo)
    attrs = {ATTR_REQUEST_ID: "r-2", ATTR_METHOD: "echo", ATTR_RESPONSE_TIMEOUT_MS: "5000"}
    if version is not None:
        attrs[ATTR_VERSION] = version
    net.deliver_stream("a", "b", FakeInfo(RPC_REQUEST_TOPIC, attrs), "payload")
    await until(lambda: len(responses(b)) == 1)
    assert acks(b)[0].rpc_ack.request_id == "r-2"
    assert responses(b)[0].error.code == RpcError.UNSUPPORTED_VERSION
    assert b.streams.sent == []


async def test_malformed_stream_request_gets_application_error(net: Network) -> None:
    _a, b = net.add("a", 2), net.add("b", 2)
    b.rpc.register_rpc_method("echo", echo)
    for attrs in (
        {ATTR_REQUEST_ID: "m-1", ATTR_RESPONSE_TIMEOUT_MS: "5000", ATTR_VERSION: "2"},
        {ATTR_REQUEST_ID: "m-2", ATTR_METHOD: "echo", ATTR_VERSION: "2"},
        {
            ATTR_REQUEST_ID: "m-3",
            ATTR_METHOD: "echo",
            ATTR_RESPONSE_TIMEOUT_MS: "soon",
            ATTR_VERSION: "2",
        },
    ):
        net.deliver_stream("a", "b", FakeInfo(RPC_REQUEST_TOPIC, attrs), "x")
    # No request id: nothing can be answered, only counted.
    net.deliver_stream("a", "b", FakeInfo(RPC_REQUEST_TOPIC, {ATTR_METHOD: "echo"}), "x")
    await until(lambda: b.counters["rpc.malformed_request"] == 4)
    await until(lambda: len(responses(b)) == 3)
    for response, rid in zip(responses(b), ["m-1", "m-2", "m-3"], strict=True):
        assert response.request_id == rid
        assert (response.error.code, response.error.message) == (
            RpcError.APPLICATION_ERROR,
            "RPC data stream malformed",
        )
    assert b.rpc.running_handlers == 0


async def test_stream_request_ending_abnormally(net: Network) -> None:
    _a, b = net.add("a", 2), net.add("b", 2)
    called = []

    @b.rpc.register_rpc_method("echo")
    async def record(data: RpcInvocationData) -> str:
        called.append(data)
        return ""

    attrs = {
        ATTR_REQUEST_ID: "s-1",
        ATTR_METHOD: "echo",
        ATTR_RESPONSE_TIMEOUT_MS: "5000",
        ATTR_VERSION: "2",
    }
    net.deliver_stream(
        "a", "b", FakeInfo(RPC_REQUEST_TOPIC, attrs), "", StreamError("sender left mid-stream")
    )
    await until(lambda: len(responses(b)) == 1)
    err = responses(b)[0].error
    assert err.code == RpcError.APPLICATION_ERROR
    assert "sender left mid-stream" in err.data
    assert called == []


async def test_response_stream_ending_abnormally_fails_the_call(net: Network) -> None:
    a, b = net.add("a", 2), net.add("b", 2)
    b.rpc.register_rpc_method("echo", echo)

    original = net.deliver_stream

    def broken(
        sender: str, dest: str, info: FakeInfo, text: str, error: Exception | None = None
    ) -> FakeReader:
        if info.topic == RPC_RESPONSE_TOPIC:
            error = StreamError("trailer reason: cancelled")
        return original(sender, dest, info, text, error)

    net.deliver_stream = broken  # type: ignore[method-assign]
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="x")
    assert err.value.code == RpcError.APPLICATION_ERROR
    assert "cancelled" in (err.value.data or "")


# --------------------------------------------------------------------------- limits


async def test_v1_request_payload_too_large_is_refused_before_sending(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    b.rpc.register_rpc_method("echo", echo)
    exact = "x" * 15_360
    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload=exact) == exact
    sent_before = len(a.transport.sent)
    for payload in ("x" * 15_361, "é" * 7_681):  # the second: 7,681 characters, 15,362 bytes
        with pytest.raises(RpcError) as err:
            await a.rpc.perform_rpc(destination_identity="b", method="echo", payload=payload)
        assert err.value.code == RpcError.REQUEST_PAYLOAD_TOO_LARGE
    assert len(a.transport.sent) == sent_before
    assert a.rpc.pending_calls == 0


async def test_v1_response_payload_too_large(net: Network) -> None:
    a, b = net.add("a"), net.add("b")

    @b.rpc.register_rpc_method("big")
    async def big(data: RpcInvocationData) -> str:
        return "y" * int(data.payload)

    assert len(
        await a.rpc.perform_rpc(destination_identity="b", method="big", payload="15360")
    ) == (15_360)
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="big", payload="15361")
    assert err.value.code == RpcError.RESPONSE_PAYLOAD_TOO_LARGE
    assert b.counters["rpc.response_too_large"] == 1


async def test_method_name_limits(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    with pytest.raises(ValueError, match="1-64 bytes"):
        b.rpc.register_rpc_method("m" * 65, echo)
    with pytest.raises(ValueError, match="1-64 bytes"):
        b.rpc.register_rpc_method("", echo)
    b.rpc.register_rpc_method("é" * 32, echo)  # exactly 64 bytes
    assert await a.rpc.perform_rpc(destination_identity="b", method="é" * 32, payload="ok") == "ok"
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="m" * 65, payload="x")
    assert err.value.code == RpcError.UNSUPPORTED_METHOD
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="", method="echo", payload="x")
    assert err.value.code == RpcError.RECIPIENT_NOT_FOUND
    with pytest.raises(ValueError, match="positive"):
        await a.rpc.perform_rpc(
            destination_identity="b", method="echo", payload="x", response_timeout=0
        )
    assert a.rpc.pending_calls == 0


# --------------------------------------------------------------------------- timeouts, failures


async def test_ack_timeout_for_unknown_or_silent_participant(net: Network) -> None:
    a = net.add("a", ack_timeout=0.1)
    deaf = net.add("deaf", 2)
    deaf.deaf = True
    for dest in ("ghost", "deaf"):
        started = time.monotonic()
        with pytest.raises(RpcError) as err:
            await a.rpc.perform_rpc(destination_identity=dest, method="echo", payload="x")
        assert err.value.code == RpcError.CONNECTION_TIMEOUT
        assert 0.09 < time.monotonic() - started < 5  # the configured ack timeout, not 7 s
    # The unknown identity got a v1 request (like the SDKs), the v2 participant a stream.
    assert [dest for dest, _ in net.outside] == ["ghost"]
    assert net.outside[0][1].rpc_request.version == 1
    assert [s.destinations for s in a.streams.sent] == [["deaf"]]
    assert a.rpc.pending_calls == 0


async def test_response_timeout_then_late_response_is_counted(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    release = asyncio.Event()

    @b.rpc.register_rpc_method("slow")
    async def slow(data: RpcInvocationData) -> str:
        await release.wait()
        return "finally"

    started = time.monotonic()
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(
            destination_identity="b", method="slow", payload="x", response_timeout=0.2
        )
    assert err.value.code == RpcError.RESPONSE_TIMEOUT
    assert 0.19 < time.monotonic() - started < 5  # the 0.2 s timeout, not 15 s
    assert a.counters["rpc.late_response"] == 0
    release.set()
    await until(lambda: a.counters["rpc.late_response"] == 1)
    assert responses(b)[0].payload == "finally"


async def test_handler_cancelled_past_its_deadline(net: Network) -> None:
    _a, b = net.add("a"), net.add("b", handler_grace=0.0)
    cancelled = asyncio.Event()

    @b.rpc.register_rpc_method("forever")
    async def forever(data: RpcInvocationData) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    await b.rpc.on_packet(request_packet("a", method="forever", timeout_ms=100))
    await until(lambda: len(responses(b)) == 1)
    assert cancelled.is_set()
    assert responses(b)[0].error.code == RpcError.RESPONSE_TIMEOUT
    assert b.counters["rpc.handler_timeout"] == 1
    # The slot is released by the cancelled task's done callback, a loop turn after the reply.
    await until(lambda: b.rpc.running_handlers == 0)


async def test_handler_raising_timeout_error_itself_is_an_application_error(
    net: Network,
) -> None:
    a, b = net.add("a"), net.add("b")

    @b.rpc.register_rpc_method("t")
    async def t(data: RpcInvocationData) -> str:
        raise TimeoutError("upstream service timed out")

    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="t", payload="")
    assert err.value.code == RpcError.APPLICATION_ERROR
    assert b.counters["rpc.handler_timeout"] == 0


@pytest.mark.parametrize("protocol", [0, 2])
async def test_send_failure_is_send_failed(net: Network, protocol: int) -> None:
    a, _ = net.add("a"), net.add("b", protocol)
    a.transport.fail = True
    a.streams.fail = True
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="x")
    assert err.value.code == RpcError.SEND_FAILED
    assert err.value.data
    assert isinstance(err.value.__cause__, (NotConnectedError, StreamError))
    assert a.counters["rpc.send_failed"] == 1
    assert a.rpc.pending_calls == 0


async def test_callee_send_failure_does_not_crash(net: Network) -> None:
    a, b = net.add("a", ack_timeout=0.1), net.add("b")
    b.rpc.register_rpc_method("echo", echo)
    b.transport.fail = True
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="x")
    assert err.value.code == RpcError.CONNECTION_TIMEOUT
    await until(lambda: b.counters["rpc.send_failed"] == 2)  # the ack and the response
    b.transport.fail = False
    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="y") == "y"


async def test_v2_response_send_failure_becomes_send_failed_packet(net: Network) -> None:
    a, b = net.add("a", 2), net.add("b", 2)
    b.rpc.register_rpc_method("echo", echo)
    b.streams.fail = True
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="x")
    assert err.value.code == RpcError.SEND_FAILED


# --------------------------------------------------------------------------- server-initiated


async def test_server_initiated_request_is_answered_with_v1_packets(net: Network) -> None:
    b = net.add("b", 2)
    server_id = str(uuid.uuid4())
    got: list[RpcInvocationData] = []

    @b.rpc.register_rpc_method("status")
    async def status(data: RpcInvocationData) -> str:
        got.append(data)
        return "x" * int(data.payload)

    await b.rpc.on_packet(
        request_packet(server_id, request_id=server_id, method="status", payload="3")
    )
    await until(lambda: len(net.outside) == 2)
    assert [(dest, p.WhichOneof("value")) for dest, p in net.outside] == [
        (server_id, "rpc_ack"),
        (server_id, "rpc_response"),
    ]
    assert net.outside[1][1].rpc_response.payload == "xxx"
    assert net.outside[1][1].rpc_response.request_id == server_id
    assert got[0].caller_identity == server_id
    assert got[0].response_timeout == 10.0
    assert b.streams.sent == []

    # A response too large for v1 is an error, never a stream, for an identity not in the room.
    await b.rpc.on_packet(request_packet(server_id, method="status", payload="20000"))
    await until(lambda: len(net.outside) == 4)
    assert net.outside[3][1].rpc_response.error.code == RpcError.RESPONSE_PAYLOAD_TOO_LARGE
    assert b.streams.sent == []


# --------------------------------------------------------------------------- lifecycle


async def test_participant_left_fails_its_pending_calls(net: Network) -> None:
    a, b, c = net.add("a"), net.add("b", 2), net.add("c")
    release = asyncio.Event()

    async def blocked(data: RpcInvocationData) -> str:
        await release.wait()
        return "done"

    b.rpc.register_rpc_method("wait", blocked)
    c.rpc.register_rpc_method("wait", blocked)
    to_b = asyncio.create_task(
        a.rpc.perform_rpc(destination_identity="b", method="wait", payload="")
    )
    to_c = asyncio.create_task(
        a.rpc.perform_rpc(destination_identity="c", method="wait", payload="")
    )
    await until(lambda: b.rpc.running_handlers == 1 and c.rpc.running_handlers == 1)
    a.rpc.on_participant_left("b")
    with pytest.raises(RpcError) as err:
        await to_b
    assert err.value.code == RpcError.RECIPIENT_DISCONNECTED
    assert not to_c.done()
    release.set()
    assert await to_c == "done"


async def test_fail_all(net: Network) -> None:
    a, b = net.add("a"), net.add("b", 2)
    release = asyncio.Event()

    @b.rpc.register_rpc_method("wait")
    async def blocked(data: RpcInvocationData) -> str:
        await release.wait()
        return "done"

    calls = [
        asyncio.create_task(a.rpc.perform_rpc(destination_identity=d, method="wait", payload=""))
        for d in ("b", "b", "ghost")
    ]
    await until(lambda: b.rpc.running_handlers == 2)
    a.rpc.fail_all(RpcError(RpcError.SEND_FAILED, "room reconnecting"))
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        assert isinstance(result, RpcError)
        assert (result.code, result.message) == (RpcError.SEND_FAILED, "room reconnecting")
    assert a.rpc.pending_calls == 0
    release.set()
    await until(lambda: a.counters["rpc.late_response"] == 2)


async def test_aclose_cancels_handlers_and_fails_pending_calls(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    cancelled = asyncio.Event()

    @b.rpc.register_rpc_method("wait")
    async def blocked(data: RpcInvocationData) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    a.rpc.register_rpc_method("wait", blocked)
    call = asyncio.create_task(
        a.rpc.perform_rpc(destination_identity="b", method="wait", payload="")
    )
    await until(lambda: b.rpc.running_handlers == 1)
    await b.rpc.aclose()
    assert cancelled.is_set()
    assert b.rpc.running_handlers == 0
    assert RPC_REQUEST_TOPIC not in b.streams.handlers
    await b.rpc.aclose()  # idempotent
    await a.rpc.aclose()
    with pytest.raises(RpcError) as err:
        await call
    assert err.value.code == RpcError.RECIPIENT_DISCONNECTED
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="wait", payload="")
    assert err.value.code == RpcError.SEND_FAILED


async def test_cancelled_caller_leaves_nothing_pending(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    release = asyncio.Event()

    @b.rpc.register_rpc_method("wait")
    async def blocked(data: RpcInvocationData) -> str:
        await release.wait()
        return "done"

    call = asyncio.create_task(
        a.rpc.perform_rpc(destination_identity="b", method="wait", payload="")
    )
    await until(lambda: b.rpc.running_handlers == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert a.rpc.pending_calls == 0
    release.set()
    await until(lambda: a.counters["rpc.late_response"] == 1)


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("protocols", [(0, 0), (2, 2), (0, 2)])
async def test_200_concurrent_calls_both_ways(net: Network, protocols: tuple[int, int]) -> None:
    a, b = net.add("a", protocols[0]), net.add("b", protocols[1])
    rng = random.Random(7)

    async def jittered(data: RpcInvocationData) -> str:
        await asyncio.sleep(rng.random() / 100)  # finish out of order
        return f"{data.caller_identity}:{data.payload}"

    a.rpc.register_rpc_method("who", jittered)
    b.rpc.register_rpc_method("who", jittered)
    calls = []
    for i in range(100):
        calls.append(a.rpc.perform_rpc(destination_identity="b", method="who", payload=str(i)))
        calls.append(b.rpc.perform_rpc(destination_identity="a", method="who", payload=str(i)))
    results = await asyncio.gather(*calls)
    expected = [f"{caller}:{i}" for i in range(100) for caller in ("a", "b")]
    assert results == expected
    assert a.rpc.pending_calls == 0 and b.rpc.pending_calls == 0
    for ep in (a, b):
        assert not any(k.startswith("rpc.") for k in ep.counters), dict(ep.counters)


async def test_slow_handler_does_not_block_other_calls(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    release = asyncio.Event()

    @b.rpc.register_rpc_method("slow")
    async def slow(data: RpcInvocationData) -> str:
        await release.wait()
        return "slow"

    b.rpc.register_rpc_method("echo", echo)
    slow_call = asyncio.create_task(
        a.rpc.perform_rpc(destination_identity="b", method="slow", payload="")
    )
    await until(lambda: b.rpc.running_handlers == 1)
    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="f") == "f"
    assert not slow_call.done()
    release.set()
    assert await slow_call == "slow"


@pytest.mark.parametrize("protocol", [0, 2])
async def test_too_many_concurrent_handlers_are_refused_not_queued(
    net: Network, protocol: int
) -> None:
    a, b = net.add("a", protocol), net.add("b", protocol, max_concurrent_handlers=2)
    release = asyncio.Event()

    @b.rpc.register_rpc_method("wait")
    async def blocked(data: RpcInvocationData) -> str:
        await release.wait()
        return "done"

    held = [
        asyncio.create_task(a.rpc.perform_rpc(destination_identity="b", method="wait", payload=""))
        for _ in range(2)
    ]
    await until(lambda: b.rpc.running_handlers == 2)
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="wait", payload="")
    assert (err.value.code, err.value.message) == (
        RpcError.APPLICATION_ERROR,
        "Too many concurrent RPC requests",
    )
    assert b.counters["rpc.overloaded"] == 1
    release.set()
    assert await asyncio.gather(*held) == ["done", "done"]
    assert await a.rpc.perform_rpc(destination_identity="b", method="wait", payload="") == "done"


def test_max_concurrent_handlers_must_be_positive() -> None:
    net = Network()
    with pytest.raises(ValueError, match="max_concurrent_handlers"):
        RpcManager(FakeTransport(net, "x"), FakeStreams(net, "x"), max_concurrent_handlers=0)


# --------------------------------------------------------------------------- malformed input


async def test_malformed_packets_are_counted_not_fatal(net: Network) -> None:
    a, b = net.add("a"), net.add("b")
    b.rpc.register_rpc_method("echo", echo)
    bad = [
        models.DataPacket(
            participant_identity="a",
            rpc_response=models.RpcResponse(request_id="nobody", payload="x"),
        ),
        models.DataPacket(participant_identity="a", rpc_response=models.RpcResponse()),
        models.DataPacket(participant_identity="a", rpc_ack=models.RpcAck(request_id="nobody")),
        request_packet("a", request_id=""),  # no id: nothing to answer with
        request_packet("", request_id="r"),  # no caller: nobody to answer
        models.DataPacket(participant_identity="a", rpc_request=models.RpcRequest(id="r-9")),
        models.DataPacket(participant_identity="a"),  # no value at all
    ]
    for packet in bad:
        await b.rpc.on_packet(packet)
    assert b.counters["rpc.late_response"] == 2
    assert b.counters["rpc.unknown_ack"] == 1
    assert b.counters["rpc.malformed_request"] == 2
    # The request with only an id (version 0) was acked and refused, not run.
    assert acks(b)[0].rpc_ack.request_id == "r-9"
    assert responses(b)[0].error.code == RpcError.UNSUPPORTED_VERSION
    # Still works afterwards.
    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="ok") == "ok"


async def test_response_streams_from_wrong_sender_or_without_id_are_ignored(
    net: Network,
) -> None:
    a, b, mallory = net.add("a", 2), net.add("b", 2), net.add("mallory", 2)
    release = asyncio.Event()

    @b.rpc.register_rpc_method("wait")
    async def blocked(data: RpcInvocationData) -> str:
        await release.wait()
        return "genuine"

    call = asyncio.create_task(
        a.rpc.perform_rpc(destination_identity="b", method="wait", payload="")
    )
    await until(lambda: b.rpc.running_handlers == 1)
    request_id = a.streams.sent[0].attributes[ATTR_REQUEST_ID]
    net.deliver_stream(
        "mallory", "a", FakeInfo(RPC_RESPONSE_TOPIC, {ATTR_REQUEST_ID: request_id}), "forged"
    )
    net.deliver_stream("b", "a", FakeInfo(RPC_RESPONSE_TOPIC, {}), "no id")
    net.deliver_stream("b", "a", FakeInfo(RPC_RESPONSE_TOPIC, {ATTR_REQUEST_ID: "unknown"}), "late")
    await until(lambda: a.counters["rpc.response_wrong_sender"] == 1)
    await until(lambda: a.counters["rpc.malformed_response"] == 1)
    await until(lambda: a.counters["rpc.late_response"] == 1)
    assert not call.done()
    release.set()
    assert await call == "genuine"
    assert mallory.rpc.pending_calls == 0


async def test_handler_returning_none_or_non_string(net: Network) -> None:
    a, b = net.add("a"), net.add("b")

    async def nothing(data: RpcInvocationData) -> str:
        return None  # type: ignore[return-value]

    async def number(data: RpcInvocationData) -> str:
        return 42  # type: ignore[return-value]

    b.rpc.register_rpc_method("nothing", nothing)
    b.rpc.register_rpc_method("number", number)
    assert await a.rpc.perform_rpc(destination_identity="b", method="nothing", payload="") == ""
    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="number", payload="")
    assert err.value.code == RpcError.APPLICATION_ERROR


@pytest.mark.parametrize(("text", "accepted"), [("2500", True), ("2500.0", True), ("-5", False)])
async def test_stream_request_timeout_attribute_parsing(
    net: Network, text: str, accepted: bool
) -> None:
    net.add("a", 2)
    b = net.add("b", 2)
    seen: list[float] = []

    @b.rpc.register_rpc_method("echo")
    async def record(data: RpcInvocationData) -> str:
        seen.append(data.response_timeout)
        return data.payload

    attrs = {
        ATTR_REQUEST_ID: "t-1",
        ATTR_METHOD: "echo",
        ATTR_RESPONSE_TIMEOUT_MS: text,
        ATTR_VERSION: "2",
    }
    net.deliver_stream("a", "b", FakeInfo(RPC_REQUEST_TOPIC, attrs), "x")
    if accepted:
        await until(lambda: len(b.streams.sent) == 1)
        assert seen == [2.5]
        assert b.streams.sent[0].attributes == {ATTR_REQUEST_ID: "t-1"}
    else:
        await until(lambda: len(responses(b)) == 1)
        assert responses(b)[0].error.message == "RPC data stream malformed"
        assert seen == []
