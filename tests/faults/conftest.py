"""Fixtures of the fault scenarios: a Kafka of their own behind the TCP fault proxy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import ProxiedKafka, free_port
from tests.services import ServiceError


@pytest.fixture(scope="session")
def proxied_kafka(
    in_test_namespace: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxiedKafka]:
    """A Kafka whose advertised listener is `advertised_port`: a `FaultProxy` listening there
    carries every connection of its clients (the session Kafka keeps serving other tests)."""
    server = ProxiedKafka(
        name="kafka-proxied",
        workdir=tmp_path_factory.mktemp("kafka-proxied"),
        port=free_port(),
        controller_port=free_port(),
        advertised_port=free_port(),
    )
    error: ServiceError | None = None
    try:
        server.start()
    except ServiceError as exc:
        error = exc
    if error is not None:  # outside the except block: the message alone
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
