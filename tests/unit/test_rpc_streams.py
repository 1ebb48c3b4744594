"""RpcManager over the real StreamManager: v2 RPC as it really travels, as DataPackets.

Each participant has a packet transport on a fake network (serialised packets, sender identity
stamped like the SFU does, per-receiver ordered dispatch), a real `StreamManager` and an
`RpcManager`, wired the way the room wires them: stream packets to the stream manager, RPC
packets to the RPC manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from livekit.protocol import models

from bridge.room.errors import RpcError
from bridge.room.rpc import (
    ATTR_METHOD,
    ATTR_REQUEST_ID,
    ATTR_RESPONSE_TIMEOUT_MS,
    ATTR_VERSION,
    RPC_REQUEST_TOPIC,
    RPC_RESPONSE_TOPIC,
    RpcInvocationData,
    RpcManager,
    RpcStreams,
)
from bridge.room.streams import StreamManager
from bridge.room.types import Counters

CAP_DEFLATE = models.ClientInfo.Capability.CAP_COMPRESSION_DEFLATE_RAW


class Peer:
    def __init__(self, net: Net, identity: str, client_protocol: int, **rpc_kwargs: Any) -> None:
        self.net = net
        self.identity = identity
        self.client_protocol = client_protocol
        self._counters = Counters()
        self.sent: list[models.DataPacket] = []
        self.streams = StreamManager(self)
        as_protocol: RpcStreams = self.streams  # the real manager has the API rpc.py expects
        self.rpc = RpcManager(self, as_protocol, **rpc_kwargs)
        self.inbox: asyncio.Queue[models.DataPacket] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._dispatch())

    # PacketTransport
    @property
    def local_identity(self) -> str:
        return self.identity

    @property
    def counters(self) -> Counters:
        return self._counters

    async def send_packet(self, packet: models.DataPacket, *, reliable: bool = True) -> None:
        wire = models.DataPacket.FromString(packet.SerializeToString())
        wire.participant_identity = self.identity
        self.sent.append(wire)
        for dest in wire.destination_identities or list(self.net.peers):
            peer = self.net.peers.get(dest)
            if peer is not None and dest != self.identity:
                peer.inbox.put_nowait(wire)
        await asyncio.sleep(0)

    def participant_info(self, identity: str) -> models.ParticipantInfo | None:
        peer = self.net.peers.get(identity)
        if peer is None or identity == self.identity:
            return None
        caps = [CAP_DEFLATE] if peer.client_protocol >= 2 else []
        return models.ParticipantInfo(
            identity=identity, client_protocol=peer.client_protocol, capabilities=caps
        )

    def remote_identities(self) -> Sequence[str]:
        return [i for i in self.net.peers if i != self.identity]

    async def _dispatch(self) -> None:
        while True:
            packet = await self.inbox.get()
            if str(packet.WhichOneof("value")).startswith("stream_"):
                await self.streams.on_packet(packet)
            else:
                await self.rpc.on_packet(packet)

    def kinds_sent(self) -> list[str]:
        return [str(p.WhichOneof("value")) for p in self.sent]


class Net:
    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}

    def add(self, identity: str, client_protocol: int, **rpc_kwargs: Any) -> Peer:
        peer = Peer(self, identity, client_protocol, **rpc_kwargs)
        self.peers[identity] = peer
        return peer

    async def aclose(self) -> None:
        for peer in self.peers.values():
            await peer.rpc.aclose()
            await peer.streams.aclose()
            peer.task.cancel()
        await asyncio.gather(*(p.task for p in self.peers.values()), return_exceptions=True)


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    network = Net()
    yield network
    await network.aclose()


async def echo(data: RpcInvocationData) -> str:
    return data.payload


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize("size", [0, 10, 15_000, 200_000])
async def test_v2_calls_over_real_streams(net: Net, protocol: int, size: int) -> None:
    a, b = net.add("a", protocol), net.add("b", protocol)
    b.rpc.register_rpc_method("echo", echo)
    payload = "".join(chr(0x41 + i % 26) if i % 7 else "é" for i in range(size))
    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload=payload) == (
        payload
    )
    header = next(p.stream_header for p in a.sent if p.WhichOneof("value") == "stream_header")
    assert header.topic == RPC_REQUEST_TOPIC
    assert header.attributes[ATTR_METHOD] == "echo"
    assert header.attributes[ATTR_VERSION] == "2"
    assert header.attributes[ATTR_RESPONSE_TIMEOUT_MS] == "15000"
    request_id = header.attributes[ATTR_REQUEST_ID]
    reply = next(p.stream_header for p in b.sent if p.WhichOneof("value") == "stream_header")
    assert reply.topic == RPC_RESPONSE_TOPIC
    assert dict(reply.attributes) == {ATTR_REQUEST_ID: request_id}
    assert "rpc_request" not in a.kinds_sent() and "rpc_response" not in b.kinds_sent()
    assert b.kinds_sent()[0] == "rpc_ack"
    for peer in (a, b):
        bad = {k: v for k, v in peer.counters.items() if k.startswith("rpc.")}
        assert bad == {}
        assert peer.counters["streams.unread_dropped"] == 0


async def test_v2_error_comes_back_as_packet(net: Net) -> None:
    a, b = net.add("a", 2), net.add("b", 2)

    @b.rpc.register_rpc_method("fail")
    async def fail(data: RpcInvocationData) -> str:
        raise RpcError(4242, "nope", data.payload[:10])

    with pytest.raises(RpcError) as err:
        await a.rpc.perform_rpc(destination_identity="b", method="fail", payload="x" * 50_000)
    assert (err.value.code, err.value.message, err.value.data) == (4242, "nope", "x" * 10)
    assert b.kinds_sent() == ["rpc_ack", "rpc_response"]


async def test_refused_stream_requests_release_their_readers(net: Net) -> None:
    """Unsupported method: the unread request stream is dropped, not left blocking."""
    a, b = net.add("a", 2), net.add("b", 2)
    for _ in range(3):
        with pytest.raises(RpcError) as err:
            await a.rpc.perform_rpc(destination_identity="b", method="none", payload="y" * 40_000)
        assert err.value.code == RpcError.UNSUPPORTED_METHOD
    b.rpc.register_rpc_method("echo", echo)
    assert await a.rpc.perform_rpc(destination_identity="b", method="echo", payload="z") == "z"


async def test_many_concurrent_v2_and_v1_calls(net: Net) -> None:
    a, b, c = net.add("a", 2), net.add("b", 2), net.add("c", 0)

    async def tag(data: RpcInvocationData) -> str:
        await asyncio.sleep(0)
        return f"{data.caller_identity}>{data.payload}"

    for peer in (a, b, c):
        peer.rpc.register_rpc_method("tag", tag)
    calls = []
    expected = []
    for i in range(70):
        for caller, callee in (("a", "b"), ("b", "a"), ("a", "c"), ("c", "b")):
            calls.append(
                net.peers[caller].rpc.perform_rpc(
                    destination_identity=callee, method="tag", payload=f"{i}" * (i * 50)
                )
            )
            expected.append(f"{caller}>{f'{i}' * (i * 50)}")
    assert await asyncio.gather(*calls) == expected
