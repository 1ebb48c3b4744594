"""Bus-to-room RPC round trip through the bridge, against a direct SDK-to-SDK RPC baseline.

    scripts/netns .venv/bin/python -m bench.rpc_bench [--calls 300] [--concurrency 1]

Starts its own livekit-server and Mosquitto on ports of its own (beside a running test session),
runs the whole bridge in-process with one MQTT 5 bus-to-room RPC route, and measures:

* ``bridge``: MQTT 5 request (response topic + correlation data) -> bridge -> SDK handler ->
  MQTT reply, timed at the requesting MQTT client;
* ``direct``: the same method called SDK participant to SDK participant (`perform_rpc`).

Prints p50/p99/mean in milliseconds and the bridge/direct ratios, as text and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from livekit import rtc
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.app import build_bridge
from bridge.config import parse_config
from tests.conftest import make_token
from tests.services import LiveKitServer, Mosquitto

ROOM = "rpc-bench"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stats(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "p50": _quantile(ms, 0.5),
        "p99": _quantile(ms, 0.99),
        "mean": statistics.fmean(ms),
        "n": float(len(ms)),
    }


class Requester:
    """MQTT 5 client timing request -> reply by correlation data."""

    def __init__(self, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.waiting: dict[bytes, asyncio.Future[float]] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.ready = threading.Event()

        def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            now = time.perf_counter()
            props: Any = message.properties
            corr = bytes(props.CorrelationData)
            self.loop.call_soon_threadsafe(self._done, corr, now)

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: self.ready.set()
        self.client.connect("127.0.0.1", port)
        # paho leaves Nagle on: its PUBACK and the next request would wait for a delayed ACK
        # (~40 ms), which would be charged to the bridge.
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe("bench/replies", 1)

    def _done(self, corr: bytes, at: float) -> None:
        future = self.waiting.pop(corr, None)
        if future is not None and not future.done():
            future.set_result(at)

    async def call(self, payload: bytes) -> float:
        corr = uuid.uuid4().bytes
        future: asyncio.Future[float] = self.loop.create_future()
        self.waiting[corr] = future
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "bench/replies"
        props.CorrelationData = corr
        start = time.perf_counter()
        self.client.publish("bench/rpc/callee/echo", payload, qos=1, properties=props)
        end = await asyncio.wait_for(future, 30)
        return end - start

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def _measure(call: Any, calls: int, concurrency: int) -> list[float]:
    samples: list[float] = []
    queue = list(range(calls))

    async def worker() -> None:
        while queue:
            queue.pop()
            samples.append(await call())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit code."""
    if not os.environ.get("ROOMBUS_NETNS"):
        print("bench: run inside the test namespace: scripts/netns .venv/bin/python -m bench...")
        return 2
    with tempfile.TemporaryDirectory(prefix="rpc-bench-") as tmp:
        workdir = Path(tmp)
        server = LiveKitServer(
            name="livekit-rpc-bench",
            workdir=workdir / "livekit",
            port=args.port,
            udp_port=args.port + 2,
            turn_port=args.port + 4,
        )
        broker = Mosquitto(
            name="mosquitto-rpc-bench", workdir=workdir / "mqtt", port=args.mqtt_port
        )
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(broker.start)
        try:
            return await _bench(args, server, broker)
        finally:
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(server.stop)


async def _bench(args: argparse.Namespace, server: LiveKitServer, broker: Mosquitto) -> int:
    config = parse_config(
        f"""\
livekit:
  url: {server.url}
  api_key: {server.api_key}
  api_secret: {server.api_secret}
  identity: bridge
  rooms: [{ROOM}]
mqtt:
  bus: {{host: 127.0.0.1, port: {broker.port}, client_id: bench-bridge, clean_start: true}}
connectors:
  - name: rpc
    from: {{mqtt: bus, topic: "bench/rpc/{{who}}/{{method}}", reply: {{qos: 1}}}}
    to: {{room: {ROOM}, rpc: {{destination: "{{who}}", method: "{{method}}"}}}}
""",
        "bench.yaml",
    )
    payload = b"x" * args.size
    callee, caller = rtc.Room(), rtc.Room()
    await callee.connect(server.url, make_token(server, ROOM, "callee"))
    await caller.connect(server.url, make_token(server, ROOM, "caller"))

    async def echo(data: rtc.RpcInvocationData) -> str:
        return data.payload

    callee.local_participant.register_rpc_method("echo", echo)
    bridge = build_bridge(config)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    requester = Requester(broker.port)
    try:
        deadline = time.monotonic() + 30
        while not (
            (link := bridge.links.get(ROOM)) is not None
            and link.room is not None
            and "callee" in link.room.remote_participants
            and requester.ready.is_set()
        ):
            if time.monotonic() > deadline or task.done():
                raise RuntimeError("bridge not ready")
            await asyncio.sleep(0.05)
        text = payload.decode()

        async def direct() -> float:
            start = time.perf_counter()
            await caller.local_participant.perform_rpc(
                destination_identity="callee", method="echo", payload=text
            )
            return time.perf_counter() - start

        async def via_bridge() -> float:
            return await requester.call(payload)

        await _measure(direct, 20, 1)  # warm-up of both paths
        await _measure(via_bridge, 20, 1)
        results = {}
        for name, fn in (("direct", direct), ("bridge", via_bridge)):
            results[name] = _stats(await _measure(fn, args.calls, args.concurrency))
        ratios = {k: results["bridge"][k] / results["direct"][k] for k in ("p50", "p99", "mean")}
        for name, s in results.items():
            print(
                f"{name:7s} n={int(s['n'])} p50={s['p50']:.2f} ms p99={s['p99']:.2f} ms "
                f"mean={s['mean']:.2f} ms"
            )
        print(
            f"ratio bridge/direct: p50 {ratios['p50']:.2f}x p99 {ratios['p99']:.2f}x "
            f"mean {ratios['mean']:.2f}x (payload {args.size} B, concurrency {args.concurrency})"
        )
        print(json.dumps({"results": results, "ratios": ratios, "size": args.size}))
        return 0
    finally:
        requester.close()
        stop.set()
        await asyncio.wait_for(task, 30)
        await caller.disconnect()
        await callee.disconnect()


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=300, help="calls per path")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight per path")
    parser.add_argument("--size", type=int, default=64, help="payload bytes")
    parser.add_argument("--port", type=int, default=7990, help="livekit-server port (+2, +4)")
    parser.add_argument("--mqtt-port", type=int, default=18830, help="Mosquitto port")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
