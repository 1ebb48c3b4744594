"""connectors/mqtt.py when things are not as they should be at start, against a real Mosquitto.

* The broker is down when the connector starts: `start()` returns, not connected, and the
  connector connects by itself once the broker is up, logging once, not once per attempt.
* A persistent session with a backlog of thousands of QoS 1 messages, larger than the receive
  queue: the connector starts, takes them at the consumer's pace with a bounded queue, and a
  restart in the middle loses none (at-least-once: duplicates allowed).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bridge.envelope import Outbound
from connectors.mqtt import MqttConnector, MqttSettings, MqttUnreachableError
from tests.integration.test_mqtt import (
    PROTOCOLS,
    ConfiguredMosquitto,
    Inbox,
    Protocol,
    eventually,
    free_port,
    running,
    settings,
    uid,
)
from tests.services import Mosquitto

BACKLOG = 3000
QUEUE = 100


async def test_broker_down_at_start_connects_by_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = ConfiguredMosquitto(
        name="mosquitto-late", workdir=tmp_path / "mosquitto-late", port=free_port()
    )
    caplog.set_level(logging.INFO, logger="roombus.mqtt")
    bridge = MqttConnector("mqtt:plant", settings(broker.port, client_id=f"b-{uid()}"))
    bridge.add_subscription("in/#", 1)
    try:
        await bridge.start()  # the broker is not running: no error, a degraded connector
        assert not bridge.connected
        assert isinstance(bridge.last_error, MqttUnreachableError)
        pending = asyncio.create_task(bridge.publish(Outbound(topic="out/early", payload=b"e")))
        await eventually(lambda: bridge.counters["mqtt.connect_failed"] >= 4, what="retrying")
        warnings = [
            r for r in caplog.records if r.name == "roombus.mqtt" and r.levelno >= logging.WARNING
        ]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # not one per attempt
        assert "connection refused; retrying in the background" in warnings[0].getMessage()
        assert not pending.done()

        await asyncio.to_thread(broker.start)
        await eventually(lambda: bridge.connected, timeout=20, what="connected by itself")
        assert bridge.last_error is None
        await asyncio.wait_for(pending, 10)  # the publish waited for the broker, then went out

        async with running(
            "mqtt:device", settings(broker.port, client_id=f"d-{uid()}"), ("out/#", 1)
        ) as device:
            bridge_inbox, device_inbox = Inbox(bridge), Inbox(device)
            await device.publish(Outbound(topic="in/telemetry", payload=b"t", qos=1))
            await bridge.publish(Outbound(topic="out/command", payload=b"c", qos=1))
            await bridge_inbox.wait_for(1)
            await device_inbox.wait_for(1)
            await bridge_inbox.close()
            await device_inbox.close()
        assert bridge_inbox.payloads() == [b"t"]
        assert device_inbox.payloads() == [b"c"]
    finally:
        await bridge.stop()
        await asyncio.to_thread(broker.stop)


async def _queue_backlog(
    mosquitto: Mosquitto, protocol: Protocol, sub_settings: MqttSettings, topic: str
) -> None:
    """Create the subscriber's persistent session, leave, and queue `BACKLOG` messages in it."""
    async with running("mqtt:bridge", sub_settings, (topic, 1)):
        pass
    async with (
        running(
            "mqtt:devices", settings(mosquitto.port, protocol=protocol, client_id=f"d-{uid()}")
        ) as devices,
        asyncio.TaskGroup() as tg,
    ):
        for i in range(BACKLOG):
            tg.create_task(devices.publish(Outbound(topic=topic, payload=b"%d" % i, qos=1)))


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_backlog_larger_than_the_receive_queue_does_not_keep_the_connector_from_starting(
    mosquitto: Mosquitto, protocol: Protocol
) -> None:
    topic = f"backlog/{uid()}"
    sub_settings = settings(
        mosquitto.port, protocol=protocol, client_id=f"b-{uid()}", receive_queue_size=QUEUE
    )
    await _queue_backlog(mosquitto, protocol, sub_settings, topic)
    async with running("mqtt:bridge", sub_settings, (topic, 1)) as bridge:
        assert bridge.connected
        # Nobody consumes yet: the queue fills to its bound and reading pauses there.
        await eventually(lambda: bridge.reading_paused, what="reading paused at the bound")
        inbox = Inbox(bridge)
        await inbox.wait_for(BACKLOG, timeout=90)
        # The subscription is live too (its SUBACK was read once the queue had room).
        async with running(
            "mqtt:device", settings(mosquitto.port, protocol=protocol, client_id=f"d-{uid()}")
        ) as device:
            await device.publish(Outbound(topic=topic, payload=b"live", qos=1))
        await inbox.wait_for(BACKLOG + 1)
        await inbox.close()
        assert bridge.receive_queue_peak <= QUEUE + 10  # the queue size plus one read batch
        if protocol == "5":
            assert bridge.counters["mqtt.suback_deferred"] == 1
    assert inbox.payloads() == [b"%d" % i for i in range(BACKLOG)] + [b"live"]
    assert bridge.counters["mqtt.connect_failed"] == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_backlog_survives_a_restart_in_the_middle(
    mosquitto: Mosquitto, protocol: Protocol
) -> None:
    topic = f"backlog/{uid()}"
    sub_settings = settings(
        mosquitto.port, protocol=protocol, client_id=f"b-{uid()}", receive_queue_size=QUEUE
    )
    await _queue_backlog(mosquitto, protocol, sub_settings, topic)
    received: list[bytes] = []
    async with running("mqtt:bridge", sub_settings, (topic, 1)) as bridge:
        inbox = Inbox(bridge)
        await inbox.wait_for(BACKLOG // 3, timeout=60)
        await inbox.close()  # stop in the middle: some taken but not yet acknowledged
    received += inbox.payloads()
    async with running("mqtt:bridge", sub_settings, (topic, 1)) as bridge2:
        assert bridge2.connected
        inbox2 = Inbox(bridge2)
        expected = {b"%d" % i for i in range(BACKLOG)}
        await eventually(
            lambda: set(received) | set(inbox2.payloads()) >= expected,
            timeout=90,
            what="every message of the backlog delivered",
        )
        await inbox2.close()
        assert bridge2.receive_queue_peak <= QUEUE + 10
    received += inbox2.payloads()
    assert set(received) == expected  # none lost
    print(f"{len(received)} deliveries for {BACKLOG} messages ({len(received) - BACKLOG} again)")
