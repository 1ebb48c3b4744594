"""What `connectors/memory.py` offers beyond the contract: routing by filter, the envelope's
fields, the recorded outcomes, and the failure injection the runtime tests use."""

from __future__ import annotations

import asyncio

import pytest

from bridge.envelope import Outbound
from bridge.errors import ConnectorError, RejectedMessage
from connectors.memory import MemoryBroker, MemoryBus, MemoryInbound
from tests.contract.harness import Reader, eventually


async def test_delivery_follows_mqtt_filters_to_every_matching_bus() -> None:
    broker = MemoryBroker()
    pub = MemoryBus("memory:pub", broker)
    plus = MemoryBus("memory:plus", broker, subscriptions=["plant/+/temp"])
    hash_ = MemoryBus("memory:hash", broker, subscriptions=["plant/#"])
    other = MemoryBus("memory:other", broker, subscriptions=["office/#"])
    async with pub, plus, hash_, other:
        readers = {bus.name: Reader(bus) for bus in (plus, hash_, other)}
        await pub.publish(
            Outbound(
                topic="plant/a/temp",
                payload=b"21",
                key=b"a",
                headers=(("h", "1"),),
                content_type="text/plain",
                qos=2,
                retain=True,
                message_expiry=60,
                response_topic="plant/a/reply",
                correlation_data=b"c",
            )
        )
        await pub.publish(Outbound(topic="plant/a/humidity", payload=None))
        (got,) = await readers["memory:plus"].take(1)
        both = await readers["memory:hash"].take(2)
        assert readers["memory:other"].items == []
        for reader in readers.values():
            await reader.close()
    env = got.message
    assert env.source == "memory:plus" and got.key == "plant/a/temp"
    assert (env.payload, env.key, dict(env.headers), env.content_type) == (
        b"21",
        b"a",
        {"h": "1"},
        "text/plain",
    )
    assert (env.qos, env.retain, env.expiry) == (2, True, 60.0)
    assert (env.response_topic, env.correlation_data) == ("plant/a/reply", b"c")
    assert [b.message.payload for b in both] == [b"21", b""]  # payload None: empty
    assert len(broker.published) == 2 and pub.published == broker.published


async def test_outcomes_are_recorded_and_redeliveries_marked() -> None:
    broker = MemoryBroker()
    async with (
        MemoryBus("memory:pub", broker) as pub,
        MemoryBus("memory:sub", broker, subscriptions=["t"]) as sub,
    ):
        reader = Reader(sub)
        for p in (b"a", b"b", b"c"):
            await pub.publish(Outbound(topic="t", payload=p))
        a, b, c = await reader.take(3)
        rejection = RejectedMessage("invalid_json", "x")
        await a.ack()
        await b.ack(rejection)
        await b.ack()  # a second ack changes nothing, and is counted
        assert [e.payload for e in sub.acked] == [b"a"]
        assert sub.nacked == [(b.message, rejection)] and sub.duplicate_acks == 1
        assert sub.unsettled == [c.message] and sub.held == 1
        sub.reconnect()
        (again,) = await reader.take(1)
        assert isinstance(again, MemoryInbound) and isinstance(c, MemoryInbound)
        assert again.message is c.message and again.redelivered and not c.redelivered
        await reader.close()


async def test_failure_injection_and_disconnection() -> None:
    broker = MemoryBroker()
    async with (
        MemoryBus("memory:pub", broker) as pub,
        MemoryBus("memory:sub", broker, subscriptions=["t"]) as sub,
    ):
        reader = Reader(sub)
        reader.auto_ack = True  # acknowledged: a reconnect redelivers nothing
        pub.fail_publish(ConnectorError("memory:pub: timeout", retriable=True), times=2)
        for _ in range(2):
            with pytest.raises(ConnectorError) as info:
                await pub.publish(Outbound(topic="t", payload=b"x"))
            assert info.value.retriable
        await pub.publish(Outbound(topic="t", payload=b"1"))  # the third one goes through
        await reader.take(1)

        pub.set_connected(False)
        assert not pub.connected
        pending = asyncio.create_task(pub.publish(Outbound(topic="t", payload=b"2")))
        await asyncio.sleep(0)  # it runs up to its wait for the link
        assert not pending.done() and len(broker.published) == 1
        pub.set_connected(True)
        await pending
        await reader.take(1)

        sub.set_connected(False)  # nothing is read while down; it waits in the session
        await pub.publish(Outbound(topic="t", payload=b"3"))
        assert sub.queued == 1 and not sub.connected
        sub.set_connected(True)
        assert [i.message.payload for i in await reader.take(1)] == [b"3"]
        await reader.close()

        pub.fail_publish(ConnectorError("memory:pub: refused", retriable=False))
        with pytest.raises(ConnectorError) as info:
            await pub.publish(Outbound(topic="t", payload=b"x"))
        assert not info.value.retriable


async def test_publish_delay_and_closing_releases_waiting_publishers() -> None:
    broker = MemoryBroker()
    pub = MemoryBus("memory:pub", broker, publish_delay=0.01)
    sub = MemoryBus("memory:sub", broker, subscriptions=["t"], inbox_size=1)
    async with pub, sub:
        await pub.publish(Outbound(topic="t", payload=b"1"))
        blocked = asyncio.create_task(pub.publish(Outbound(topic="t", payload=b"2")))
        await eventually(lambda: sub.publishes_waiting == 1, what="publish blocked")
        await sub.__aexit__(None, None, None)  # the subscriber goes away: nothing to wait for
        await blocked
        assert sub.queued == 1  # the second never reached the closed inbox
        disconnected = asyncio.create_task(pub.publish(Outbound(topic="t", payload=b"3")))
        pub.set_connected(False)
        await asyncio.sleep(0)
    # Closing fails a publish that waits for the connection, non-retriably.
    with pytest.raises(ConnectorError) as info:
        await disconnected
    assert not info.value.retriable
    with pytest.raises(ConnectorError):
        await sub.__aenter__()  # a closed bus stays closed
    with pytest.raises(ConnectorError, match="not a topic name"):
        async with MemoryBus("memory:x") as bus:
            await bus.publish(Outbound(topic="a/+", payload=b""))
