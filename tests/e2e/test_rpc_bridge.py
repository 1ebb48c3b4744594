"""Request/reply across the bridge, end to end: real servers, official-SDK participants as peers.

Bus to room: MQTT 5 (response topic + correlation data), MQTT 3.1.1 (JSON convention) and Kafka
(reply-to + correlation headers) requests become RPC calls on an SDK participant; the replies
come back with status, error code, message and data. Room to bus: an SDK participant calls the
bridge, a bus backend answers. Each test shares one room and bridge across its cases.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from livekit import rtc
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.runtime.bridge import Bridge
from tests.e2e.conftest import KafkaPeer, bridge_yaml, run_bridge, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto

BIG = "x" * 16_000  # over LiveKit's 15,360-byte RPC limit


class Device:
    """An SDK participant serving the methods the tests call."""

    def __init__(self, room: rtc.Room) -> None:
        self.calls: dict[str, int] = {}
        lp = room.local_participant

        def counted(name: str, fn: Callable[[rtc.RpcInvocationData], Any]) -> None:
            async def handler(data: rtc.RpcInvocationData) -> str:
                self.calls[data.payload] = self.calls.get(data.payload, 0) + 1
                result = fn(data)
                if asyncio.iscoroutine(result):
                    result = await result
                return str(result)

            lp.register_rpc_method(name, handler)

        def fail(data: rtc.RpcInvocationData) -> str:
            raise rtc.RpcError(4001, "device says no", '{"why": "busy"}')

        async def slow(data: rtc.RpcInvocationData) -> str:
            await asyncio.sleep(8)
            return "too late"

        counted("echo", lambda d: f"echo:{d.payload}")
        counted("fail", fail)
        counted("slow", slow)
        counted("big", lambda d: BIG)


class Mqtt5Requester:
    """An MQTT client sending requests and collecting replies by correlation."""

    def __init__(self, port: int, protocol: MQTTProtocolVersion) -> None:
        self.loop = asyncio.get_running_loop()
        self.replies: dict[Any, mqtt.MQTTMessage] = {}
        self.arrived = asyncio.Event()
        self.v5 = protocol == MQTTProtocolVersion.MQTTv5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"req-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        self._subscribed = threading.Event()

        def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            if self.v5:
                key: Any = bytes(getattr(message.properties, "CorrelationData", b""))
            else:
                key = json.loads(message.payload)["correlation_id"]
            self.loop.call_soon_threadsafe(self._store, key, message)

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _store(self, key: Any, message: mqtt.MQTTMessage) -> None:
        self.replies.setdefault(key, message)
        self.arrived.set()

    async def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, 1)
        assert await asyncio.to_thread(self._subscribed.wait, 10), "no SUBACK"

    def send(
        self, topic: str, payload: bytes, *, reply_to: str = "", corr: bytes = b"", expiry: int = 0
    ) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = reply_to
            props.CorrelationData = corr
            if expiry:
                props.MessageExpiryInterval = expiry
        self.client.publish(topic, payload, qos=1, properties=props)

    async def reply(self, key: Any, timeout: float = 20) -> mqtt.MQTTMessage:
        async with asyncio.timeout(timeout):
            while key not in self.replies:
                self.arrived.clear()
                await self.arrived.wait()
        return self.replies[key]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def props5(message: mqtt.MQTTMessage) -> dict[str, str]:
    return dict(getattr(message.properties, "UserProperty", []))


@asynccontextmanager
async def requester(port: int, protocol: MQTTProtocolVersion) -> AsyncIterator[Mqtt5Requester]:
    peer = Mqtt5Requester(port, protocol)
    try:
        yield peer
    finally:
        peer.close()


async def _bridge_sees(bridge: Bridge, room_name: str, identity: str) -> None:
    await eventually(
        lambda: (
            (room := bridge.links[room_name].room) is not None
            and identity in room.remote_participants
        ),
        what=f"the bridge to see {identity}",
    )


# ----------------------------------------------------------------------------- MQTT 5


async def test_mqtt5_requests_become_room_rpc(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    body = f"""\
bridge:
  state_dir: {tmp_path}
connectors:
  - name: rpc-in
    from: {{mqtt: bus, topic: "rpc/{{device}}/{{method}}", reply: {{}}}}
    to: {{room: "{room_name}",
          rpc: {{destination: "{{device}}", method: "{{method}}", timeout: 3}}}}
"""
    text = bridge_yaml(livekit_server, mosquitto, None, room_name, body)
    async with (
        sdk_peer(livekit_server, room_name, "dev1") as dev_room,
        requester(mosquitto.port, MQTTProtocolVersion.MQTTv5) as req,
    ):
        device = Device(dev_room)
        await req.subscribe("answers/#")
        async with run_bridge(text) as bridge:
            await _bridge_sees(bridge, room_name, "dev1")

            async def call(topic: str, payload: bytes, corr: bytes) -> mqtt.MQTTMessage:
                req.send(topic, payload, reply_to="answers/me", corr=corr)
                return await req.reply(corr)

            ok = await call("rpc/dev1/echo", b"hello", b"c-ok")
            assert (ok.topic, ok.payload, props5(ok)["rpc-status"]) == (
                "answers/me",
                b"echo:hello",
                "ok",
            )
            err = await call("rpc/dev1/fail", b"f", b"c-fail")
            p = props5(err)
            assert (p["rpc-status"], p["rpc-error-code"], p["rpc-error-message"]) == (
                "error",
                "4001",
                "device says no",
            )
            assert p["rpc-error-data"] == '{"why": "busy"}'
            assert json.loads(err.payload) == {
                "code": 4001,
                "message": "device says no",
                "data": '{"why": "busy"}',
            }
            assert props5(await call("rpc/dev1/nosuch", b"", b"c-m"))["rpc-error-code"] == "1400"
            assert props5(await call("rpc/ghost/echo", b"", b"c-g"))["rpc-error-code"] == "1401"
            started = asyncio.get_running_loop().time()
            assert props5(await call("rpc/dev1/slow", b"s", b"c-t"))["rpc-error-code"] == "1502"
            assert asyncio.get_running_loop().time() - started < 6
            assert (
                props5(await call("rpc/dev1/echo", BIG.encode(), b"c-big"))["rpc-error-code"]
                == "1402"
            )
            assert props5(await call("rpc/dev1/big", b"b", b"c-bigr"))["rpc-error-code"] == "1504"

            # A redelivered request (same correlation) runs once; the reply is sent again.
            first = await call("rpc/dev1/echo", b"once", b"c-dup")
            del req.replies[b"c-dup"]
            again = await call("rpc/dev1/echo", b"once", b"c-dup")
            assert first.payload == again.payload == b"echo:once"
            assert device.calls["once"] == 1
            assert bridge.counters["route.rpc-in.rpc_duplicate"] == 1

            # 200 at once, each answered with its own correlation.
            for i in range(200):
                req.send("rpc/dev1/echo", f"n{i}".encode(), reply_to="answers/me", corr=b"m%d" % i)
            for i in range(200):
                assert (await req.reply(b"m%d" % i, 60)).payload == f"echo:n{i}".encode()

        # Across a restart: the cache is in state_dir, the call is not repeated.
        del req.replies[b"c-dup"]
        async with run_bridge(text) as bridge:
            await _bridge_sees(bridge, room_name, "dev1")
            again = await call("rpc/dev1/echo", b"once", b"c-dup")
            assert again.payload == b"echo:once"
            assert device.calls["once"] == 1
            assert bridge.counters["route.rpc-in.rpc_duplicate"] == 1


# ----------------------------------------------------------------------------- MQTT 3.1.1


async def test_mqtt311_json_requests_become_room_rpc(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str
) -> None:
    body = f"""\
mqtt:
  old:
    host: 127.0.0.1
    port: {mosquitto.port}
    protocol: "3.1.1"
    client_id: bridge311-{uuid.uuid4().hex[:8]}
connectors:
  - name: rpc311
    from:
      mqtt: old
      topic: "req311/{{device}}"
      reply: {{reply_topic: "res311/{{device}}/{{field.client}}"}}
    to: {{room: "{room_name}", rpc: {{destination: "{{device}}", method: "{{field.method}}",
          timeout: 3}}}}
"""
    text = bridge_yaml(livekit_server, None, None, room_name, body)
    async with (
        sdk_peer(livekit_server, room_name, "dev1") as dev_room,
        requester(mosquitto.port, MQTTProtocolVersion.MQTTv311) as req,
    ):
        device = Device(dev_room)
        await req.subscribe("res311/#")
        async with run_bridge(text) as bridge:
            await _bridge_sees(bridge, room_name, "dev1")

            async def call(device_id: str, method: str, payload: Any, corr: Any) -> dict[str, Any]:
                doc = {"correlation_id": corr, "method": method, "client": "c1", "payload": payload}
                req.send(f"req311/{device_id}", json.dumps(doc).encode())
                message = await req.reply(corr)
                assert message.topic == f"res311/{device_id}/c1"
                reply: dict[str, Any] = json.loads(message.payload)
                return reply

            assert await call("dev1", "echo", "hi", "a1") == {
                "correlation_id": "a1",
                "status": "ok",
                "payload": "echo:hi",
            }
            # A structured payload is passed as its JSON text; numeric correlation ids echo.
            assert (await call("dev1", "echo", {"k": 1}, 7))["payload"] == 'echo:{"k": 1}'
            err = await call("dev1", "fail", "", "a2")
            assert err["status"] == "error"
            assert err["error"] == {
                "code": 4001,
                "message": "device says no",
                "data": '{"why": "busy"}',
            }
            assert (await call("dev1", "nosuch", "", "a3"))["error"]["code"] == 1400
            assert (await call("ghost", "echo", "", "a4"))["error"]["code"] == 1401
            assert (await call("dev1", "slow", "", "a5"))["error"]["code"] == 1502
            assert (await call("dev1", "echo", BIG, "a6"))["error"]["code"] == 1402
            assert (await call("dev1", "big", "", "a7"))["error"]["code"] == 1504
            await call("dev1", "echo", "one", "a8")
            del req.replies["a8"]
            assert (await call("dev1", "echo", "one", "a8"))["payload"] == "echo:one"
            assert device.calls["one"] == 1
            for i in range(200):
                doc = {"correlation_id": f"p{i}", "method": "echo", "client": "c1", "payload": i}
                req.send("req311/dev1", json.dumps(doc).encode())
            for i in range(200):
                reply = json.loads((await req.reply(f"p{i}", 60)).payload)
                assert reply["payload"] == f"echo:{i}"


# ----------------------------------------------------------------------------- Kafka


async def test_kafka_requests_become_room_rpc(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    requests, replies = unique("rpc-req"), unique("rpc-rep")
    spring_req = unique("rpc-spring")
    for topic in (requests, replies, spring_req):
        await kafka_peer.create_topic(topic)
    body = f"""\
connectors:
  - name: krpc
    from: {{kafka: main, topics: [{requests}], reply: {{preset: faststream}}}}
    to: {{room: "{room_name}", rpc: {{destination: "{{key}}", method: "{{header.method}}",
          timeout: 3}}}}
  - name: kspring
    from: {{kafka: main, topics: [{spring_req}], reply: {{preset: spring}}}}
    to: {{room: "{room_name}", rpc: {{destination: "{{key}}", method: "{{header.method}}"}}}}
"""
    text = bridge_yaml(livekit_server, None, kafka, room_name, body)
    async with sdk_peer(livekit_server, room_name, "dev1") as dev_room:
        device = Device(dev_room)
        consumer = await kafka_peer.consumer(replies)
        got: dict[str, Any] = {}

        async def collect() -> None:
            async for record in consumer:
                headers = {k: v.decode() for k, v in record.headers}
                corr = headers.get("correlation_id") or headers.get("kafka_correlationId", "")
                got[corr] = (record, headers)

        collector = asyncio.create_task(collect())
        try:
            async with run_bridge(text) as bridge:
                await _bridge_sees(bridge, room_name, "dev1")
                await asyncio.sleep(3)  # the bridge's consumer group gets its partitions

                async def call(
                    key: str, method: str, payload: bytes, corr: str, topic: str = requests
                ) -> tuple[Any, dict[str, str]]:
                    names = (
                        ("kafka_replyTopic", "kafka_correlationId")
                        if topic == spring_req
                        else ("reply_to", "correlation_id")
                    )
                    headers = [
                        (names[0], replies.encode()),
                        (names[1], corr.encode()),
                        ("method", method.encode()),
                    ]
                    await kafka_peer.produce(topic, payload, key=key.encode(), headers=headers)
                    await eventually(lambda: corr in got, timeout=30, what=f"reply {corr}")
                    result: tuple[Any, dict[str, str]] = got[corr]
                    return result

                record, h = await call("dev1", "echo", b"hi", "k1")
                assert (record.value, record.key, h["rpc-status"]) == (b"echo:hi", b"dev1", "ok")
                _, h = await call("dev1", "echo", b"spring", "s1", spring_req)
                assert h["rpc-status"] == "ok" and h["kafka_correlationId"] == "s1"
                _, h = await call("dev1", "fail", b"", "k2")
                assert (h["rpc-error-code"], h["rpc-error-message"], h["rpc-error-data"]) == (
                    "4001",
                    "device says no",
                    '{"why": "busy"}',
                )
                assert (await call("dev1", "nosuch", b"", "k3"))[1]["rpc-error-code"] == "1400"
                assert (await call("ghost", "echo", b"", "k4"))[1]["rpc-error-code"] == "1401"
                assert (await call("dev1", "slow", b"", "k5"))[1]["rpc-error-code"] == "1502"
                assert (await call("dev1", "echo", BIG.encode(), "k6"))[1][
                    "rpc-error-code"
                ] == "1402"
                assert (await call("dev1", "big", b"", "k7"))[1]["rpc-error-code"] == "1504"
                await call("dev1", "echo", b"uno", "k8")
                del got["k8"]
                assert (await call("dev1", "echo", b"uno", "k8"))[0].value == b"echo:uno"
                assert device.calls["uno"] == 1
                for i in range(200):
                    await kafka_peer.producer.send(
                        requests,
                        f"v{i}".encode(),
                        key=b"dev1",
                        headers=[
                            ("reply_to", replies.encode()),
                            ("correlation_id", f"b{i}".encode()),
                            ("method", b"echo"),
                        ],
                    )
                await eventually(
                    lambda: all(f"b{i}" in got for i in range(200)), timeout=60, what="200"
                )
                for i in range(200):
                    assert got[f"b{i}"][0].value == f"echo:v{i}".encode()
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)


# ----------------------------------------------------------------------------- room to bus


class MqttBackend:
    """A bus service answering MQTT 5 requests (response topic + correlation data)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"svc-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.seen: list[str] = []
        self.topics: list[str] = []
        self._subscribed = threading.Event()

        def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            method = message.topic.rsplit("/", 1)[1]
            self.seen.append(method)
            self.topics.append(message.topic)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            request_props: Any = message.properties
            props.CorrelationData = request_props.CorrelationData
            body = message.payload
            if method == "bus.slow":
                return
            if method.startswith("bus.sleep-"):  # answer after that many milliseconds
                delay = int(method.removeprefix("bus.sleep-")) / 1000
                reply = (request_props.ResponseTopic, b"svc:" + message.payload)
                threading.Timer(
                    delay, lambda: self.client.publish(*reply, qos=1, properties=props)
                ).start()
                return
            if method == "bus.fail":
                props.UserProperty = [
                    ("rpc-status", "error"),
                    ("rpc-error-code", "4002"),
                    ("rpc-error-message", "backend says no"),
                    ("rpc-error-data", "d"),
                ]
                body = b""
            else:
                body = b"svc:" + body
            self.client.publish(request_props.ResponseTopic, body, qos=1, properties=props)

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def _room_to_bus_cases(caller: rtc.Room, bridge: Bridge) -> None:
    lp = caller.local_participant
    assert await lp.perform_rpc(destination_identity="bridge", method="bus.echo", payload="x") == (
        "svc:x"
    )
    try:
        await lp.perform_rpc(destination_identity="bridge", method="bus.fail", payload="")
        raise AssertionError("no error")
    except rtc.RpcError as exc:
        assert (exc.code, exc.message, exc.data) == (4002, "backend says no", "d")
    try:
        await lp.perform_rpc(destination_identity="bridge", method="other", payload="")
        raise AssertionError("no error")
    except rtc.RpcError as exc:
        assert exc.code == 1400
    try:
        await lp.perform_rpc(destination_identity="bridge", method="bus.slow", payload="")
        raise AssertionError("no error")
    except rtc.RpcError as exc:
        assert exc.code == 1502
    results = await asyncio.gather(
        *(
            lp.perform_rpc(destination_identity="bridge", method="bus.echo", payload=f"q{i}")
            for i in range(200)
        )
    )
    assert results == [f"svc:q{i}" for i in range(200)]


async def test_room_rpc_reaches_mqtt5_backend(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str
) -> None:
    # Room and caller captures work on RPC routes too: {slug} and {who} rebuild the room name.
    body = f"""\
connectors:
  - name: rpc-out
    from: {{room: "t-{{slug}}", participant: "call{{who}}",
            rpc: {{methods: ["bus.*"], reply_topic: "replies/{room_name}", timeout: 3}}}}
    to: {{mqtt: bus, topic: "svc/t-{{slug}}/{{who}}/{{method}}"}}
"""
    backend = MqttBackend(mosquitto.port)
    backend.client.subscribe(f"svc/{room_name}/#", 1)
    assert await asyncio.to_thread(backend._subscribed.wait, 10)
    try:
        async with (
            run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)) as bridge,
            sdk_peer(livekit_server, room_name, "caller") as caller,
        ):
            await eventually(lambda: "bridge" in caller.remote_participants, what="bridge")
            await _room_to_bus_cases(caller, bridge)
            assert bridge.counters["route.rpc-out.rpc_timeout"] == 1
            assert f"svc/{room_name}/er/bus.echo" in backend.topics  # the captures, rendered
    finally:
        backend.close()


async def test_room_rpc_reaches_kafka_backend(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    requests, replies = unique("svc-req"), unique("svc-rep")
    for topic in (requests, replies):
        await kafka_peer.create_topic(topic)
    body = f"""\
connectors:
  - name: rpc-kout
    from: {{room: "*", rpc: {{methods: ["bus.echo", "bus.fail", "bus.slow"],
            reply_topic: {replies}, timeout: 3, kafka_reply: {{preset: zilla}}}}}}
    to: {{kafka: main, topic: {requests}}}
"""
    consumer = AIOKafkaConsumer(
        requests, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()

    async def serve() -> None:
        async for record in consumer:
            h = {k: v.decode() for k, v in record.headers}
            method = h["lk-rpc-method"]
            if method == "bus.slow":
                continue
            headers = [("zilla:correlation-id", h["zilla:correlation-id"].encode())]
            value = b"svc:" + record.value
            if method == "bus.fail":
                headers += [
                    ("rpc-status", b"error"),
                    ("rpc-error-code", b"4002"),
                    ("rpc-error-message", b"backend says no"),
                    ("rpc-error-data", b"d"),
                ]
            await kafka_peer.produce(h["zilla:reply-to"], value, headers=headers)

    server = asyncio.create_task(serve())
    try:
        async with (
            run_bridge(bridge_yaml(livekit_server, None, kafka, room_name, body)) as bridge,
            sdk_peer(livekit_server, room_name, "caller") as caller,
        ):
            await eventually(lambda: "bridge" in caller.remote_participants, what="bridge")
            await _room_to_bus_cases(caller, bridge)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        await consumer.stop()


async def test_room_rpc_bus_deadline_is_what_the_caller_really_waits(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str
) -> None:
    """The Python SDK (Rust core) announces max(T - 7 s, 1 s) but waits T: a backend must get
    the route's 5 s whenever the caller waits that long (it used to get 1 s at T <= 8 s)."""
    body = f"""\
connectors:
  - name: rpc-out
    from: {{room: "*", rpc: {{methods: ["bus.*"], reply_topic: "replies/{room_name}",
            timeout: 5}}}}
    to: {{mqtt: bus, topic: "svc/{{room}}/{{method}}"}}
"""
    backend = MqttBackend(mosquitto.port)
    backend.client.subscribe(f"svc/{room_name}/#", 1)
    assert await asyncio.to_thread(backend._subscribed.wait, 10)
    try:
        async with (
            run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)),
            sdk_peer(livekit_server, room_name, "caller") as caller,
        ):
            await eventually(lambda: "bridge" in caller.remote_participants, what="bridge")
            lp = caller.local_participant

            async def call(wait: float, answer_ms: int) -> str | int:
                try:
                    return await lp.perform_rpc(
                        destination_identity="bridge",
                        method=f"bus.sleep-{answer_ms}",
                        payload=f"{wait}/{answer_ms}",
                        response_timeout=wait,
                    )
                except rtc.RpcError as exc:
                    return exc.code

            cases = [(wait, ms) for wait in (3, 5, 8, 10) for ms in (1000, 2000, 4000)]
            got = await asyncio.gather(*(call(w, ms) for w, ms in cases))
            # Answered whenever the backend is faster than both the route (5 s) and the
            # caller's own wait, with a second of margin either way; else 1502.
            want = [f"svc:{w}/{ms}" if ms / 1000 + 1 <= min(5, w) else 1502 for w, ms in cases]
            assert dict(zip(cases, got, strict=True)) == dict(zip(cases, want, strict=True))
    finally:
        backend.close()
