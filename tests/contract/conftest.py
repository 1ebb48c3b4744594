"""The `endpoint` fixture: each contract test runs once per endpoint type.

The servers are only asked for by the MQTT and Kafka parameters, so ``-k memory`` runs without
the test namespace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contract.harness import Harness, KafkaHarness, MemoryHarness, MqttHarness

KINDS = ["memory", "mqtt", "kafka"]


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest) -> Harness:
    kind: str = request.param
    if kind == "mqtt":
        return MqttHarness(request.getfixturevalue("mosquitto"))
    if kind == "kafka":
        return KafkaHarness(request.getfixturevalue("kafka"))
    return MemoryHarness()


@pytest.fixture
async def endpoint(harness: Harness) -> AsyncIterator[Harness]:
    """A sink and a source of one endpoint type, open, with a reader on the source."""
    await harness.open()
    try:
        yield harness
    finally:
        await harness.close()
