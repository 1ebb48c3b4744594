"""connectors/mqtt.py against a real Mosquitto: QoS 0/1/2 on MQTT 5 and 3.1.1, properties,
retained messages, manual acknowledgement, nacks and redelivery, broker restarts, connect
errors, publishes the broker refuses (ACL), a publish-only connector, conformance to the
`Source` / `Sink` seam, and the bounds (max in flight, receive queue, Receive Maximum, Maximum
Packet Size). Starting degraded and starting with a backlog: test_mqtt_degraded.py.

Connection drops and stalls go through `TcpProxy`, a small asyncio proxy the test can cut
(every connection reset) or hold (bytes stop flowing, like a blackholed link).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from bridge.endpoint import Inbound, Sink, Source
from bridge.envelope import Envelope, Outbound
from bridge.errors import RejectedMessage
from connectors.mqtt import (
    MqttAuthError,
    MqttConnector,
    MqttConnectTimeoutError,
    MqttInbound,
    MqttPacketTooLargeError,
    MqttPublishError,
    MqttSettings,
    MqttStoppedError,
    MqttTlsError,
    MqttUnreachableError,
    publish_packet_size,
)
from tests.services import HERE as SERVICES_DIR
from tests.services import Mosquitto

Protocol = Literal["5", "3.1.1"]
PROTOCOLS: list[Protocol] = ["5", "3.1.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def uid() -> str:
    return uuid.uuid4().hex[:10]


def settings(port: int, **kw: Any) -> MqttSettings:
    kw.setdefault("reconnect_min_delay", 0.1)
    kw.setdefault("reconnect_max_delay", 1.0)
    kw.setdefault("connect_timeout", 5.0)
    return MqttSettings(host="127.0.0.1", port=port, **kw)


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what}")
        await asyncio.sleep(0.02)


class Inbox:
    """Collects a connector's messages in a background task (acknowledging or not)."""

    def __init__(self, connector: MqttConnector, *, auto_ack: bool = True) -> None:
        self.connector = connector
        self.auto_ack = auto_ack
        self.items: list[MqttInbound] = []
        self._task = asyncio.create_task(self._run(), name=f"inbox:{connector.name}")

    async def _run(self) -> None:
        async for inbound in self.connector.messages():
            assert isinstance(inbound, MqttInbound)
            self.items.append(inbound)
            if self.auto_ack:
                await inbound.ack()

    def payloads(self) -> list[bytes]:
        return [i.message.payload for i in self.items]

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[MqttInbound]:
        await eventually(
            lambda: len(self.items) >= n, timeout, f"{n} messages (have {len(self.items)})"
        )
        return self.items[:n]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def running(
    name: str, s: MqttSettings, *subscriptions: tuple[str, int]
) -> AsyncIterator[MqttConnector]:
    connector = MqttConnector(name, s)
    for topic_filter, qos in subscriptions:
        connector.add_subscription(topic_filter, qos)
    await connector.start()
    try:
        yield connector
    finally:
        await connector.stop()


class TcpProxy:
    """127.0.0.1:port → 127.0.0.1:target. `cut()` resets every connection; `hold()` stalls them."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        self._tasks.difference_update(pumps)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.release()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def barrier(connector: MqttConnector, topic: str) -> None:
    """Return once the broker processed every packet `connector` sent before.

    The broker handles one connection's packets in order, so the PUBACK of a QoS 1 publish
    sent now follows the processing of the PUBACKs queued before it. Stopping the connector
    without this may lose them: when the next connection with the same client id arrives,
    Mosquitto closes the old one without reading what is still in its socket buffer.
    """
    await connector.publish(Outbound(topic=f"{topic}/barrier", payload=b"", qos=1))


@contextlib.asynccontextmanager
async def proxy_to(port: int) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


@dataclass
class ConfiguredMosquitto(Mosquitto):
    """A private Mosquitto whose config the test extends (auth, packet limits).

    The base config (tests/services/mosquitto.conf) already keeps Mosquitto running as root, so
    it can use the root-owned test directory for persistence and the password file.
    """

    extra_config: str = ""
    anonymous: bool = True

    def prepare(self) -> None:
        super().prepare()
        path = self.workdir / "mosquitto.conf"
        text = path.read_text()
        if not self.anonymous:
            text = text.replace("allow_anonymous true", "allow_anonymous false")
        path.write_text(text + "\n" + self.extra_config + "\n")


@contextlib.asynccontextmanager
async def private_broker(tmp_path: Path, name: str, **kw: Any) -> AsyncIterator[Mosquitto]:
    broker = ConfiguredMosquitto(name=name, workdir=tmp_path / name, port=free_port(), **kw)
    await asyncio.to_thread(broker.start)
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)


# ---- QoS, properties, retained ------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_publish_and_receive_each_qos(
    mosquitto: Mosquitto, protocol: Protocol, qos: int
) -> None:
    base = f"rt/{uid()}"
    async with (
        running(
            "mqtt:sub",
            settings(mosquitto.port, protocol=protocol, client_id=f"s-{uid()}"),
            (f"{base}/#", qos),
        ) as sub,
        running(
            "mqtt:pub", settings(mosquitto.port, protocol=protocol, client_id=f"p-{uid()}")
        ) as pub,
    ):
        inbox = Inbox(sub)
        for i in range(5):
            await pub.publish(Outbound(topic=f"{base}/{i}", payload=f"m{i}".encode(), qos=qos))
        got = await inbox.wait_for(5)
        await inbox.close()
    assert [g.message.payload for g in got] == [f"m{i}".encode() for i in range(5)]
    env = got[3].message
    assert (env.topic, env.qos, env.source, env.retain) == (f"{base}/3", qos, "mqtt:sub", False)
    assert (got[3].mid == 0) == (qos == 0)
    assert pub.counters["mqtt.published"] == 5
    assert sub.counters["mqtt.received"] == 5


async def test_mqtt5_properties_round_trip(mosquitto: Mosquitto) -> None:
    topic = f"props/{uid()}"
    async with (
        running("mqtt:sub", settings(mosquitto.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
        running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub,
    ):
        inbox = Inbox(sub)
        await pub.publish(
            Outbound(
                topic=topic,
                payload=b"\x00\xffbinary",
                headers=(("lk-room", "lobby"), ("lk-participant", "José ✓")),
                content_type="application/octet-stream",
                message_expiry=600,
                response_topic=f"{topic}/reply",
                correlation_data=b"\x01\x02corr",
            )
        )
        (got,) = await inbox.wait_for(1)
        await inbox.close()
    env = got.message
    assert env.payload == b"\x00\xffbinary"
    assert dict(env.headers) == {"lk-room": "lobby", "lk-participant": "José ✓"}
    assert env.content_type == "application/octet-stream"
    assert env.expiry is not None and 590 <= env.expiry <= 600
    assert env.response_topic == f"{topic}/reply"
    assert env.correlation_data == b"\x01\x02corr"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_qos0_and_qos1_take_the_fast_decoder_and_qos2_paho(
    mosquitto: Mosquitto, protocol: Protocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QoS 0 and 1 bypass paho's per-message objects (`connectors.mqtt_publish`); QoS 2 does not.

    Counted through paho's own `_handle_publish`, which only the fallback reaches.
    """
    import paho.mqtt.client as paho_client

    calls: list[int] = []
    original = paho_client.Client._handle_publish

    def counting(self: paho_client.Client) -> Any:
        calls.append(self._in_packet["command"])
        return original(self)

    monkeypatch.setattr(paho_client.Client, "_handle_publish", counting)
    base = f"fast/{uid()}"
    async with (
        running(
            "mqtt:sub",
            settings(mosquitto.port, protocol=protocol, client_id=f"s-{uid()}"),
            (f"{base}/#", 2),
        ) as sub,
        running(
            "mqtt:pub", settings(mosquitto.port, protocol=protocol, client_id=f"p-{uid()}")
        ) as pub,
    ):
        inbox = Inbox(sub)
        for qos in (0, 1, 2):
            await pub.publish(
                Outbound(
                    topic=f"{base}/{qos}",
                    payload=f"q{qos}".encode(),
                    qos=qos,
                    headers=(("k", "v"),),
                    content_type="text/plain",
                )
            )
        got = await inbox.wait_for(3)
        await inbox.close()
    by_qos = {g.message.qos: g.message for g in got}
    assert {q: m.payload for q, m in by_qos.items()} == {0: b"q0", 1: b"q1", 2: b"q2"}
    if protocol == "5":
        assert all(dict(m.headers) == {"k": "v"} for m in by_qos.values())
        assert all(m.content_type == "text/plain" for m in by_qos.values())
    assert [(c & 0x06) >> 1 for c in calls] == [2]  # only the QoS 2 message went through paho


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_successful_pubacks_bypass_paho_decoding(
    mosquitto: Mosquitto, protocol: Protocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker's bare success PUBACK resolves the publish without paho's decoder objects.

    Counted through paho's own `_handle_pubackcomp`, which only the fallback reaches (a PUBACK
    with a failure code or properties: the ACL tests below).
    """
    import paho.mqtt.client as paho_client

    calls: list[str] = []
    original = paho_client.Client._handle_pubackcomp

    def counting(self: paho_client.Client, cmd: Any) -> Any:
        calls.append(cmd)
        return original(self, cmd)

    monkeypatch.setattr(paho_client.Client, "_handle_pubackcomp", counting)
    async with running(
        "mqtt:pub", settings(mosquitto.port, protocol=protocol, client_id=f"p-{uid()}")
    ) as pub:
        for _ in range(5):
            await pub.publish(Outbound(topic=f"puback/{uid()}", payload=b"x", qos=1))
        assert pub.counters["mqtt.published"] == 5
    assert calls == []


async def test_mqtt311_drops_mqtt5_fields_and_counts_them(mosquitto: Mosquitto) -> None:
    topic = f"v311/{uid()}"
    async with (
        running("mqtt:sub", settings(mosquitto.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
        running(
            "mqtt:pub", settings(mosquitto.port, protocol="3.1.1", client_id=f"p-{uid()}")
        ) as pub,
    ):
        inbox = Inbox(sub)
        for _ in range(2):
            await pub.publish(
                Outbound(topic=topic, payload=b"x", headers=(("a", "1"),), correlation_data=b"c")
            )
        got = await inbox.wait_for(2)
        await inbox.close()
    assert dict(got[0].message.headers) == {} and got[0].message.correlation_data is None
    assert pub.counters["mqtt.v5_field_dropped.headers"] == 2
    assert pub.counters["mqtt.v5_field_dropped.correlation_data"] == 2
    assert pub.counters["mqtt.v5_field_dropped.content_type"] == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_retained_set_and_clear(mosquitto: Mosquitto, protocol: Protocol) -> None:
    topic = f"state/{uid()}"
    async with running(
        "mqtt:pub", settings(mosquitto.port, protocol=protocol, client_id=f"p-{uid()}")
    ) as pub:
        await pub.publish(Outbound(topic=topic, payload=b"on", retain=True))
        async with running(
            "mqtt:late",
            settings(mosquitto.port, protocol=protocol, client_id=f"l-{uid()}"),
            (topic, 1),
        ) as late:
            inbox = Inbox(late)
            (got,) = await inbox.wait_for(1)
            assert (got.message.payload, got.message.retain) == (b"on", True)
            # A live message on the same topic is not "retained" to an existing subscriber.
            await pub.publish(Outbound(topic=topic, payload=None, retain=True))
            live = (await inbox.wait_for(2))[1]
            assert (live.message.payload, live.message.retain) == (b"", False)
            await inbox.close()
        async with running(
            "mqtt:later",
            settings(mosquitto.port, protocol=protocol, client_id=f"l2-{uid()}"),
            (topic, 1),
        ) as later:
            inbox = Inbox(later)
            await asyncio.sleep(0.5)
            await inbox.close()
            assert inbox.items == [], "the empty retained publish must clear the retained message"


async def test_resubscribe_on_reconnect_does_not_replay_retained(mosquitto: Mosquitto) -> None:
    topic = f"state/{uid()}"
    async with running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub:
        await pub.publish(Outbound(topic=topic, payload=b"v1", retain=True))
        async with (
            proxy_to(mosquitto.port) as proxy,
            running("mqtt:sub", settings(proxy.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
        ):
            inbox = Inbox(sub)
            await inbox.wait_for(1)
            await asyncio.sleep(0.3)  # the PUBACK of v1 reaches the broker before the cut
            proxy.cut()
            await eventually(lambda: sub.counters["mqtt.connected"] == 2, what="reconnected")
            await pub.publish(Outbound(topic=topic, payload=b"v2", retain=True))
            await inbox.wait_for(2)
            await asyncio.sleep(0.3)
            await inbox.close()
        await pub.publish(Outbound(topic=topic, payload=None, retain=True))
    # A redelivery (DUP) is legitimate; a retained replay (not DUP) would be the bug.
    assert [i.message.payload for i in inbox.items if not i.dup] == [b"v1", b"v2"]
    assert sub.counters["mqtt.subscribed"] == 2  # subscribed again after the reconnect


# ---- manual acknowledgement and redelivery ------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unacked_message_is_redelivered_after_connection_drop(
    mosquitto: Mosquitto, protocol: Protocol
) -> None:
    topic = f"ack/{uid()}"
    async with (
        proxy_to(mosquitto.port) as proxy,
        running(
            "mqtt:sub", settings(proxy.port, protocol=protocol, client_id=f"s-{uid()}"), (topic, 1)
        ) as sub,
        running(
            "mqtt:pub", settings(mosquitto.port, protocol=protocol, client_id=f"p-{uid()}")
        ) as pub,
    ):
        inbox = Inbox(sub, auto_ack=False)
        await pub.publish(Outbound(topic=topic, payload=b"one", qos=1))
        await pub.publish(Outbound(topic=topic, payload=b"two", qos=1))
        first = await inbox.wait_for(2)
        await first[0].ack()  # only "one" is acknowledged
        await eventually(lambda: sub.counters["mqtt.acked"] == 1)
        await asyncio.sleep(0.2)  # let the PUBACK reach the broker
        proxy.cut()
        again = (await inbox.wait_for(3))[2]
        assert again.message.payload == b"two"
        assert again.dup and not first[1].dup
        await first[1].ack()  # stale: from the old connection; the redelivered copy counts
        assert sub.counters["mqtt.ack_stale"] == 1
        await again.ack()
        await asyncio.sleep(0.2)
        proxy.cut()
        await eventually(lambda: sub.counters["mqtt.connected"] == 3, what="second reconnect")
        await asyncio.sleep(0.5)
        await inbox.close()
    assert inbox.payloads() == [b"one", b"two", b"two"], "acknowledged messages must not come back"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unacked_messages_survive_a_connector_restart(
    mosquitto: Mosquitto, protocol: Protocol
) -> None:
    topic = f"restart/{uid()}"
    sub_settings = settings(mosquitto.port, protocol=protocol, client_id=f"s-{uid()}")
    async with running(
        "mqtt:pub", settings(mosquitto.port, protocol=protocol, client_id=f"p-{uid()}")
    ) as pub:
        async with running("mqtt:sub", sub_settings, (topic, 1)) as sub:
            inbox = Inbox(sub, auto_ack=False)
            for i in range(4):
                await pub.publish(Outbound(topic=topic, payload=b"%d" % i, qos=1))
            got = await inbox.wait_for(4)
            await got[0].ack()
            await got[1].ack()
            await asyncio.sleep(0.2)
            await inbox.close()
        # Published while the subscriber is away: queued in its session.
        await pub.publish(Outbound(topic=topic, payload=b"4", qos=1))
        async with running("mqtt:sub", sub_settings, (topic, 1)) as sub2:
            inbox2 = Inbox(sub2)
            await inbox2.wait_for(3)
            await asyncio.sleep(0.3)
            await inbox2.close()
    assert inbox2.payloads() == [b"2", b"3", b"4"]
    assert [i.dup for i in inbox2.items] == [True, True, False]


async def test_puback_is_sent_in_arrival_order(mosquitto: Mosquitto) -> None:
    """Acknowledging the second message first sends nothing until the first is acknowledged."""
    topic = f"order/{uid()}"
    sub_settings = settings(mosquitto.port, client_id=f"s-{uid()}")
    async with running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub:
        async with running("mqtt:sub", sub_settings, (topic, 1)) as sub:
            inbox = Inbox(sub, auto_ack=False)
            await pub.publish(Outbound(topic=topic, payload=b"a", qos=1))
            await pub.publish(Outbound(topic=topic, payload=b"b", qos=1))
            _a, b = await inbox.wait_for(2)
            await b.ack()  # held back: "a" is still unacknowledged
            await asyncio.sleep(0.2)
            await inbox.close()
        async with running("mqtt:sub", sub_settings, (topic, 1)) as sub2:
            inbox2 = Inbox(sub2)
            await inbox2.wait_for(2)
            await inbox2.close()
    assert inbox2.payloads() == [b"a", b"b"]


# ---- broker restart ---------------------------------------------------------------------


async def test_broker_restart_mid_stream_loses_no_acknowledged_message(tmp_path: Path) -> None:
    async with private_broker(tmp_path, "mosquitto-restart") as broker:
        topic = f"stream/{uid()}"
        async with (
            running("mqtt:sub", settings(broker.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
            running(
                "mqtt:pub", settings(broker.port, client_id=f"p-{uid()}", max_inflight=10)
            ) as pub,
        ):
            inbox = Inbox(sub)
            acknowledged: list[int] = []

            async def send(seq: int) -> None:
                await pub.publish(Outbound(topic=topic, payload=b"%d" % seq, qos=1))
                acknowledged.append(seq)

            async def producer() -> None:
                async with asyncio.TaskGroup() as tg:
                    for seq in range(300):
                        tg.create_task(send(seq))
                        await asyncio.sleep(0.005)

            producing = asyncio.create_task(producer())
            await eventually(lambda: len(acknowledged) >= 50, what="50 acknowledged before restart")
            await asyncio.to_thread(broker.restart)
            await asyncio.wait_for(producing, 60)
            assert "Error saving" not in broker.log_tail(400), "the broker lost its persistence"

            assert sorted(acknowledged) == list(range(300))
            try:
                await eventually(
                    lambda: {int(p) for p in inbox.payloads()} >= set(range(300)),
                    timeout=30,
                    what="every acknowledged message received",
                )
            except AssertionError:
                missing = set(range(300)) - {int(p) for p in inbox.payloads()}
                raise AssertionError(
                    f"lost {sorted(missing)}; sub {dict(sub.counters)}; pub {dict(pub.counters)}"
                    f"\n{broker.log_tail(60)}"
                ) from None
            await inbox.close()
        assert (
            pub.counters["mqtt.connection_lost"] >= 1 and sub.counters["mqtt.connection_lost"] >= 1
        )
        received = [int(p) for p in inbox.payloads()]
        print(f"received {len(received)} for 300 sent ({len(received) - 300} duplicates)")


async def test_publish_while_broker_down_waits_then_completes(tmp_path: Path) -> None:
    async with private_broker(tmp_path, "mosquitto-down") as broker:
        topic = f"down/{uid()}"
        async with (
            running("mqtt:sub", settings(broker.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
            running("mqtt:pub", settings(broker.port, client_id=f"p-{uid()}")) as pub,
        ):
            inbox = Inbox(sub)
            await asyncio.to_thread(broker.stop)
            await eventually(lambda: not pub.connected, what="publisher noticed the broker left")
            pending = asyncio.create_task(
                pub.publish(Outbound(topic=topic, payload=b"late", qos=1))
            )
            await asyncio.sleep(1.0)
            assert not pending.done(), "publish must not complete without a PUBACK"
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(pending, 15)
            await inbox.wait_for(1, timeout=15)
            await inbox.close()
        assert inbox.payloads() == [b"late"]


# ---- errors -------------------------------------------------------------------------------


async def test_unreachable_broker_at_start_is_degraded_not_an_error() -> None:
    port = free_port()
    connector = MqttConnector("mqtt:plant", settings(port))
    await connector.start()  # returns: the broker may come later
    try:
        assert not connector.connected
        error = connector.last_error
        assert isinstance(error, MqttUnreachableError)
        assert (
            str(error)
            == f"mqtt:plant: connect to mqtt://127.0.0.1:{port} failed: connection refused"
        )
        assert error.retriable
        await eventually(
            lambda: connector.counters["mqtt.connect_failed"] >= 3, what="keeps retrying"
        )
    finally:
        await connector.stop()
    assert not connector.connected


async def test_connect_timeout_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers CONNECT
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        connector = MqttConnector("mqtt:plant", settings(port, connect_timeout=0.5))
        async with connector:  # the first attempt timed out: started, not connected
            assert not connector.connected
            error = connector.last_error
            assert isinstance(error, MqttConnectTimeoutError)
            assert "no answer within 0.5 s" in str(error) and error.retriable
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_to_a_plain_port_is_a_tls_error(mosquitto: Mosquitto) -> None:
    connector = MqttConnector("mqtt:plant", settings(mosquitto.port, tls=True))
    with pytest.raises(MqttTlsError) as info:
        await connector.start()
    assert str(info.value).startswith(
        f"mqtt:plant: connect to mqtts://127.0.0.1:{mosquitto.port} failed: TLS handshake"
    )
    assert not info.value.retriable


@pytest.mark.parametrize(("protocol", "code"), [("5", 135), ("3.1.1", 5)])
async def test_bad_credentials_error(tmp_path: Path, protocol: Protocol, code: int) -> None:
    passwords = tmp_path / "passwd"
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_passwd", "-b", "-c", str(passwords), "bridge", "s3cret"],
        check=True,
        capture_output=True,
    )
    async with private_broker(
        tmp_path, "mosquitto-auth", anonymous=False, extra_config=f"password_file {passwords}"
    ) as broker:
        bad = MqttConnector(
            "mqtt:plant",
            settings(broker.port, protocol=protocol, username="bridge", password="wrong"),
        )
        with pytest.raises(MqttAuthError) as info:
            await bad.start()
        url = f"mqtt://127.0.0.1:{broker.port}"
        assert (
            str(info.value)
            == f"mqtt:plant: connect to {url} failed: not authorized (CONNACK {code})"
        )
        assert not info.value.retriable
        assert "wrong" not in str(info.value)
        anonymous = MqttConnector("mqtt:anon", settings(broker.port, protocol=protocol))
        with pytest.raises(MqttAuthError):
            await anonymous.start()
        good = MqttConnector(
            "mqtt:plant",
            settings(broker.port, protocol=protocol, username="bridge", password="s3cret"),
        )
        async with good:
            assert good.connected


async def test_invalid_publishes_are_refused_before_sending(mosquitto: Mosquitto) -> None:
    async with running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub:
        for topic in ("a/+/b", "a/#", ""):
            with pytest.raises(MqttPublishError):
                await pub.publish(Outbound(topic=topic, payload=b"x"))
        with pytest.raises(MqttPublishError, match="response topic"):
            await pub.publish(Outbound(topic="ok", payload=b"x", response_topic="r/#"))
        assert pub.counters["mqtt.publish_invalid"] == 4
        assert pub.connected
    with pytest.raises(MqttStoppedError):
        await pub.publish(Outbound(topic="ok", payload=b"x"))


async def test_payload_over_broker_maximum_packet_size_is_refused(tmp_path: Path) -> None:
    async with private_broker(
        tmp_path, "mosquitto-small", extra_config="max_packet_size 2000"
    ) as broker:
        topic = f"big/{uid()}"
        async with (
            running("mqtt:sub", settings(broker.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
            running("mqtt:pub", settings(broker.port, client_id=f"p-{uid()}")) as pub,
        ):
            assert pub.max_packet_size == 2000
            inbox = Inbox(sub)
            # The largest payload whose PUBLISH is exactly 2000 bytes passes the broker, one
            # more byte is refused here, before it could make the broker drop the connection.
            fits = max(
                n for n in range(2000) if publish_packet_size(topic, n, 1, None, mqtt5=True) <= 2000
            )
            with pytest.raises(MqttPacketTooLargeError) as info:
                await pub.publish(Outbound(topic=topic, payload=b"x" * (fits + 1)))
            assert (
                "packet of 2001 bytes exceeds the broker's Maximum Packet Size of 2000 bytes"
                in str(info.value)
            )
            assert not info.value.retriable
            await pub.publish(Outbound(topic=topic, payload=b"y" * fits))
            (got,) = await inbox.wait_for(1)
            await inbox.close()
            assert len(got.message.payload) == fits and pub.connected


# ---- bounds and backpressure --------------------------------------------------------------


async def test_publish_backpressure_bounded_by_max_inflight(mosquitto: Mosquitto) -> None:
    topic = f"bp/{uid()}"
    async with (
        proxy_to(mosquitto.port) as proxy,
        running("mqtt:sub", settings(mosquitto.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
        running("mqtt:pub", settings(proxy.port, client_id=f"p-{uid()}", max_inflight=3)) as pub,
    ):
        inbox = Inbox(sub)
        proxy.hold()  # the broker's PUBACKs stop arriving
        tasks = [
            asyncio.create_task(pub.publish(Outbound(topic=topic, payload=b"%d" % i, qos=1)))
            for i in range(10)
        ]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in tasks)
        assert (pub.in_flight, pub.publish_waiting) == (3, 7)
        proxy.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await inbox.wait_for(10)
        await inbox.close()
    assert sorted(inbox.payloads()) == sorted(b"%d" % i for i in range(10))


async def test_full_receive_queue_pauses_reading_and_loses_nothing(mosquitto: Mosquitto) -> None:
    topic = f"rq/{uid()}"
    async with (
        running(
            "mqtt:sub",
            settings(mosquitto.port, client_id=f"s-{uid()}", receive_queue_size=5),
            (topic, 0),
        ) as sub,
        running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub,
    ):
        for i in range(200):
            await pub.publish(Outbound(topic=topic, payload=b"%d" % i, qos=0))
        await eventually(lambda: sub.reading_paused, what="reading paused")
        await asyncio.sleep(0.3)
        assert sub.receive_queued < 5 + 10  # the queue size plus at most one read batch
        inbox = Inbox(sub)
        await inbox.wait_for(200)
        await inbox.close()
    assert inbox.payloads() == [b"%d" % i for i in range(200)]
    assert sub.counters["mqtt.receive_paused"] >= 1


async def test_receive_maximum_bounds_unacknowledged_messages(mosquitto: Mosquitto) -> None:
    topic = f"rm/{uid()}"
    async with (
        running(
            "mqtt:sub",
            settings(mosquitto.port, client_id=f"s-{uid()}", receive_queue_size=5),
            (topic, 1),
        ) as sub,
        running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub,
    ):
        inbox = Inbox(sub, auto_ack=False)
        for i in range(12):
            await pub.publish(Outbound(topic=topic, payload=b"%d" % i, qos=1))
        await inbox.wait_for(5)
        await asyncio.sleep(0.5)
        assert len(inbox.items) == 5, "the broker must respect our Receive Maximum"
        assert not sub.reading_paused
        for item in inbox.items[:5]:
            await item.ack()
        await inbox.wait_for(10)
        for item in inbox.items[5:10]:
            await item.ack()
        await inbox.wait_for(12)
        await inbox.close()
    assert inbox.payloads() == [b"%d" % i for i in range(12)]


async def test_start_and_stop_are_idempotent(mosquitto: Mosquitto) -> None:
    connector = MqttConnector("mqtt:x", settings(mosquitto.port, client_id=f"x-{uid()}"))
    await connector.start()
    await connector.start()
    assert connector.connected
    await connector.stop()
    await connector.stop()
    assert not connector.connected
    messages: list[Inbound[Envelope]] = [m async for m in connector.messages()]
    assert messages == []


async def test_throughput_qos1(mosquitto: Mosquitto) -> None:
    """Not a benchmark: a floor that catches a badly broken I/O path, and a printed figure."""
    topic = f"tp/{uid()}"
    n = 3000
    async with (
        running("mqtt:sub", settings(mosquitto.port, client_id=f"s-{uid()}"), (topic, 1)) as sub,
        running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub,
    ):
        inbox = Inbox(sub)
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(pub.publish(Outbound(topic=topic, payload=b"%d" % i, qos=1)))
        await inbox.wait_for(n, timeout=60)
        elapsed = time.monotonic() - started
        await inbox.close()
    print(f"QoS 1 publish+receive+ack: {n / elapsed:.0f} msg/s")
    assert n / elapsed > 300


# ---- the seam ------------------------------------------------------------------------------


async def test_connector_is_a_source_and_a_sink(mosquitto: Mosquitto) -> None:
    topic = f"seam/{uid()}"
    connector = MqttConnector("mqtt:seam", settings(mosquitto.port, client_id=f"c-{uid()}"))
    connector.add_subscription(topic, 1)
    # mypy checks these assignments: the connector conforms to bridge/endpoint.py.
    source: Source[Envelope] = connector
    sink: Sink[Outbound] = connector
    assert not source.connected
    async with source as entered:
        assert entered is connector and sink.connected
        await sink.publish(Outbound(topic=topic, payload=b"hello", qos=1))
        async for inbound in source.messages():
            assert (inbound.message.payload, inbound.key) == (b"hello", topic)
            await inbound.ack()
            break
    assert not connector.connected
    await connector.__aexit__(None, None, None)  # closing twice is harmless
    assert [m async for m in source.messages()] == []


# ---- nack -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_nack_settles_the_message_with_a_reason_code(
    tmp_path: Path, protocol: Protocol
) -> None:
    # log_type all: Mosquitto logs each PUBACK it receives with its reason code.
    async with private_broker(tmp_path, "mosquitto-nack", extra_config="log_type all") as broker:
        topic = f"nack/{uid()}"
        client_id = f"s-{uid()}"
        sub_settings = settings(broker.port, protocol=protocol, client_id=client_id)
        async with running(
            "mqtt:pub", settings(broker.port, protocol=protocol, client_id=f"p-{uid()}")
        ) as pub:
            async with running("mqtt:sub", sub_settings, (topic, 1)) as sub:
                inbox = Inbox(sub, auto_ack=False)
                for i in range(4):
                    await pub.publish(Outbound(topic=topic, payload=b"%d" % i, qos=1))
                got = await inbox.wait_for(4)
                await got[0].ack()
                await got[1].ack(RejectedMessage("malformed_json", "expected an object"))
                await got[2].ack(RejectedMessage("unknown_room", "no room 'x'"))
                await got[3].ack()
                await inbox.close()
                assert (sub.counters["mqtt.acked"], sub.counters["mqtt.nacked"]) == (4, 2)
                await barrier(sub, topic)
            # The same persistent session again: nothing comes back, acked or nacked.
            async with running("mqtt:sub", sub_settings, (topic, 1)) as sub2:
                inbox2 = Inbox(sub2)
                await pub.publish(Outbound(topic=topic, payload=b"after", qos=1))
                await inbox2.wait_for(1)
                await inbox2.close()
    # Read after the broker exited: Mosquitto buffers its stdout log until then.
    pubacks = [
        line.rsplit("RC:", 1)[1].rstrip(")")
        for line in broker.log_since_start().splitlines()
        if f"Received PUBACK from {client_id}" in line
    ]
    assert inbox2.payloads() == [b"after"]
    # Arrival order; 0x99 payload format invalid, 0x80 unspecified error. 3.1.1: plain PUBACKs.
    expected = ["0", "153", "128", "0"] if protocol == "5" else ["0", "0", "0", "0"]
    assert pubacks[:4] == expected


async def test_nack_releases_its_place_in_the_puback_order(mosquitto: Mosquitto) -> None:
    """A nacked head of the queue lets the acknowledged messages behind it go out."""
    topic = f"nackorder/{uid()}"
    sub_settings = settings(mosquitto.port, client_id=f"s-{uid()}")
    async with running("mqtt:pub", settings(mosquitto.port, client_id=f"p-{uid()}")) as pub:
        async with running("mqtt:sub", sub_settings, (topic, 1)) as sub:
            inbox = Inbox(sub, auto_ack=False)
            for payload in (b"a", b"b", b"c"):
                await pub.publish(Outbound(topic=topic, payload=payload, qos=1))
            a, b, c = await inbox.wait_for(3)
            await c.ack()
            await b.ack()
            await a.ack(RejectedMessage("invalid_utf8", "bad byte"))
            await a.ack()  # settling twice is a no-op
            assert (sub.counters["mqtt.acked"], sub.counters["mqtt.nacked"]) == (3, 1)
            await barrier(sub, topic)
            await inbox.close()
        async with running("mqtt:sub", sub_settings, (topic, 1)) as sub2:
            inbox2 = Inbox(sub2)
            await pub.publish(Outbound(topic=topic, payload=b"d", qos=1))
            await inbox2.wait_for(1)
            await inbox2.close()
    assert inbox2.payloads() == [b"d"]


# ---- publishes the broker refuses ----------------------------------------------------------


@contextlib.asynccontextmanager
async def acl_broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """A Mosquitto where user `bridge` may publish anywhere but under ``denied/``."""
    passwords = tmp_path / "passwd"
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_passwd", "-b", "-c", str(passwords), "bridge", "s3cret"],
        check=True,
        capture_output=True,
    )
    acl = SERVICES_DIR / "mosquitto.acl"
    async with private_broker(
        tmp_path,
        "mosquitto-acl",
        anonymous=False,
        extra_config=f"password_file {passwords}\nacl_file {acl}",
    ) as broker:
        yield broker


@pytest.mark.parametrize("qos", [1, 2])
async def test_publish_refused_by_the_acl_is_not_retriable(tmp_path: Path, qos: int) -> None:
    async with acl_broker(tmp_path) as broker:
        creds: dict[str, Any] = {"username": "bridge", "password": "s3cret"}
        topic = f"allowed/{uid()}"
        async with (
            running(
                "mqtt:sub", settings(broker.port, client_id=f"s-{uid()}", **creds), (topic, 1)
            ) as sub,
            running("mqtt:pub", settings(broker.port, client_id=f"p-{uid()}", **creds)) as pub,
        ):
            inbox = Inbox(sub)
            denied = Outbound(topic=f"denied/{uid()}", payload=b"x", qos=qos)
            with pytest.raises(MqttPublishError) as info:
                await asyncio.wait_for(pub.publish(denied), 10)
            error = info.value
            assert not error.retriable and error.reason_code == 0x87
            assert f"publish to {denied.topic!r} refused by the broker: not authorized" in str(
                error
            )
            assert pub.counters["mqtt.publish_rejected"] == 1  # sent once, not retried
            # The connection is fine: the next publish goes through.
            await pub.publish(Outbound(topic=topic, payload=b"ok", qos=qos))
            await inbox.wait_for(1)
            await inbox.close()
            assert pub.connected and pub.counters["mqtt.connection_lost"] == 0
        assert inbox.payloads() == [b"ok"]


async def test_mqtt311_cannot_report_an_acl_refusal(tmp_path: Path) -> None:
    """MQTT 3.1.1 has no reason codes: Mosquitto acknowledges a denied publish and drops it."""
    async with acl_broker(tmp_path) as broker:
        s = settings(broker.port, protocol="3.1.1", username="bridge", password="s3cret")
        async with running("mqtt:pub", s) as pub:
            await pub.publish(Outbound(topic=f"denied/{uid()}", payload=b"x", qos=1))
            assert pub.counters["mqtt.publish_rejected"] == 0


# ---- a publish-only connector --------------------------------------------------------------


async def test_publish_only_connector_is_not_held_up_by_an_inbound_backlog(
    mosquitto: Mosquitto,
) -> None:
    """A subscriber sitting on thousands of unacknowledged messages does not delay publishes
    on the broker's separate publish-only connection (the bridge's ``<client_id>-pub``)."""
    telemetry = f"telemetry/{uid()}"
    commands = f"commands/{uid()}"
    bridge_id = f"bridge-{uid()}"
    async with (
        running(
            "mqtt:bridge",
            settings(mosquitto.port, client_id=bridge_id, receive_queue_size=100),
            (telemetry, 1),
        ) as bridge_sub,
        running(
            "mqtt:bridge-pub",
            settings(mosquitto.port, client_id=bridge_id).for_publishing("mqtt:bridge"),
        ) as bridge_pub,
        running("mqtt:devices", settings(mosquitto.port, client_id=f"d-{uid()}")) as devices,
        running(
            "mqtt:device", settings(mosquitto.port, client_id=f"dc-{uid()}"), (commands, 1)
        ) as device,
    ):
        held = Inbox(bridge_sub, auto_ack=False)  # takes messages, never acknowledges
        async with asyncio.TaskGroup() as tg:
            for i in range(3000):
                tg.create_task(devices.publish(Outbound(topic=telemetry, payload=b"%d" % i, qos=1)))
        await held.wait_for(100)  # the subscriber's whole Receive Maximum is unacknowledged
        command_inbox = Inbox(device)
        await asyncio.wait_for(
            bridge_pub.publish(Outbound(topic=commands, payload=b"reboot", qos=1)), 10
        )
        await command_inbox.wait_for(1)
        await command_inbox.close()
        assert len(held.items) == 100 and bridge_sub.counters["mqtt.acked"] == 0
        assert bridge_pub.receive_queued == 0 and bridge_pub.counters["mqtt.received"] == 0
        for item in held.items:
            await item.ack()
        await held.close()
    assert command_inbox.payloads() == [b"reboot"]
