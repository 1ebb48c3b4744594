"""Fixtures shared by every test: the real servers, started once per session on demand.

A server that cannot be started fails the tests that need it, with the service's name, command
and log tail (never a skip). The whole session runs inside the namespace `scripts/netns` makes;
`in_test_namespace` checks that before any server starts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
from livekit import api

from tests.services import (
    Kafka,
    LiveKitServer,
    Mosquitto,
    Service,
    ServiceError,
    livekit_binary,
    livekit_binary_version,
)


def pytest_report_header(config: pytest.Config) -> str:
    """Which livekit-server this run tests (scripts/test runs tests/interop against two)."""
    binary = livekit_binary()
    version = livekit_binary_version(binary)
    said = "v" + ".".join(map(str, version)) if version else "not installed or no version"
    return f"livekit-server: {said} ({binary})"


def _run(service: Service) -> Iterator[Service]:
    error: ServiceError | None = None
    try:
        service.start()
    except ServiceError as exc:
        error = exc
    if error is not None:  # outside the except block: the message alone, no chained traceback
        pytest.fail(str(error), pytrace=False)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session", autouse=True)
async def _room_closes_finish() -> AsyncIterator[None]:
    """Let rooms' background closes finish before the session's event loop ends.

    A Room finishes closing its peer connections in the background (`bridge.room.room`:
    aiortc's close can take long when it deallocates a TURN allocation). A close still
    running when the loop closes leaves its UDP socket to the GC, which warnings-as-errors
    turns into a session error although every test passed.
    """
    yield
    closing = [
        t for t in asyncio.all_tasks() if t.get_name().startswith("lk-close-") and not t.done()
    ]
    if closing:
        await asyncio.wait(closing, timeout=30)


@pytest.fixture(scope="session")
def in_test_namespace() -> None:
    """Refuse to start servers outside the isolated test network (see scripts/netns)."""
    if not os.environ.get("ROOMBUS_NETNS"):
        pytest.fail(
            "tests must run inside the test network namespace: use scripts/test "
            "(or scripts/netns .venv/bin/python -m pytest ...)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def livekit_server(
    in_test_namespace: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveKitServer]:
    server = LiveKitServer(name="livekit-server", workdir=tmp_path_factory.mktemp("livekit"))
    yield from _run(server)  # type: ignore[misc]


@pytest.fixture(scope="session")
def kafka(in_test_namespace: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    yield from _run(Kafka(name="kafka", workdir=tmp_path_factory.mktemp("kafka")))  # type: ignore[misc]


@pytest.fixture(scope="session")
def mosquitto(
    in_test_namespace: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mosquitto]:
    yield from _run(Mosquitto(name="mosquitto", workdir=tmp_path_factory.mktemp("mosquitto")))  # type: ignore[misc]


def make_token(
    server: LiveKitServer,
    room: str,
    identity: str,
    *,
    name: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    grants: api.VideoGrants | None = None,
    attributes: dict[str, str] | None = None,
    metadata: str | None = None,
) -> str:
    """A join token for `room` signed with the test server's dev key."""
    token = (
        api.AccessToken(server.api_key, server.api_secret)
        .with_identity(identity)
        .with_ttl(ttl)
        .with_grants(
            grants
            or api.VideoGrants(
                room_join=True,
                room=room,
                can_publish=True,
                can_subscribe=True,
                can_publish_data=True,
                can_update_own_metadata=True,
            )
        )
    )
    if name is not None:
        token = token.with_name(name)
    if attributes:
        token = token.with_attributes(attributes)
    if metadata is not None:
        token = token.with_metadata(metadata)
    jwt: str = token.to_jwt()
    return jwt


@pytest.fixture
def room_name(request: pytest.FixtureRequest) -> str:
    """A room name unique to the test, so tests never see each other's participants."""
    name: str = request.node.name
    return "t-" + name.replace("[", "-").replace("]", "")[:60]
