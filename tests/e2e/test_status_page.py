"""The status page in a real headless Chromium while traffic flows through a real bridge.

Debian's ``chromium`` (installed by scripts/services/install), driven by Playwright for Python
with that executable — never a browser Playwright downloads. The page polls ``/status``; the
test reads its numbers from the DOM and checks that they move while messages flow and that
each lies between a ``/status`` read before and one after (the totals only grow). A screenshot
goes to ``$ROOMBUS_TEST_OUTPUT`` (default ``.test-output/`` at the repository root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright

from bridge.health import HealthServer
from tests.e2e.conftest import MqttPeer, bridge_yaml, run_bridge
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LiveKitServer, Mosquitto

CHROMIUM = "/usr/bin/chromium"
# What this machine's Chromium needs to run headless inside the test namespace, quietly: no
# sandbox (root), no GPU, no QUIC, no first-run UI, nothing fetched in the background.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]
MESSAGES = 600  # at most this many, paced: the page must see the totals move
PACE = 0.02  # seconds between messages (~50/s: 12 s or more of traffic)


def output_dir() -> Path:
    path = Path(os.environ.get("ROOMBUS_TEST_OUTPUT") or REPO / ".test-output")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def chromium_path() -> str:
    """Debian's chromium; a clear failure (never a skip) when it is not installed."""
    found = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if found is None:
        pytest.fail(
            f"{CHROMIUM} not found: run scripts/services/install (installs Debian's chromium)",
            pytrace=False,
        )
    return found


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[BrowserContext]:
    executable = chromium_path()
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(profile),  # a fresh --user-data-dir
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            await context.close()


async def status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/status") as r:
        body: dict[str, Any] = await r.json()
        return body


async def dom_route(page: Page, route: str) -> dict[str, str]:
    """The route row's cells, by their data-field (numbers as the page rendered them)."""
    cells: dict[str, str] = await page.eval_on_selector_all(
        f'#routes tr[data-route="{route}"] td',
        "tds => Object.fromEntries(tds.map(td => [td.dataset.field, td.dataset.value ??"
        " td.textContent]))",
    )
    return cells


async def polls(page: Page) -> int:
    return int(await page.evaluate("Number(document.body.dataset.polls || 0)"))


async def test_status_page_shows_live_numbers_that_match_status(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    mqtt_peer: MqttPeer,
    room_name: str,
    tmp_path: Path,
) -> None:
    body = f"""\
connectors:
  - name: telemetry
    from: {{mqtt: bus, topic: "page/{{dev}}", format: json}}
    to: {{room: "{room_name}", packet: {{topic: "tele"}}}}
  - name: commands
    from: {{room: "*", packet: {{topic: "cmd"}}}}
    to: {{mqtt: bus, topic: "page-out/{{participant}}"}}
"""
    port = free_port()
    config = bridge_yaml(livekit_server, mosquitto, None, room_name, body)
    async with (
        sdk_peer(livekit_server, room_name, "viewer") as viewer,
        run_bridge(config) as bridge,
        chromium(tmp_path / "profile") as browser,
    ):
        server = HealthServer(bridge, port)
        await server.start()
        try:
            await eventually(lambda: "bridge" in viewer.remote_participants, what="bridge")
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/")
            await eventually_async(lambda: _polled(page, 1), "the page's first poll")
            assert await page.get_attribute("#ready", "data-ready") == "true"
            assert (await page.text_content("#bridge-id")) == bridge.bridge_id

            # One bad message: its error must show as the route's last error.
            await mqtt_peer.publish("page/bad", b"{not json")
            await mqtt_peer.publish("page/d0", b'{"payload": "warm-up"}')
            await viewer.local_participant.publish_data(b"go", topic="cmd")

            sender = asyncio.create_task(_send(mqtt_peer))
            try:
                seen, rates = await _watch_totals(page, port, sender)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            assert len(set(seen)) >= 3, f"the page's delivered total did not move: {seen}"
            assert seen == sorted(seen)
            assert max(rates) > 0, f"the page never showed a message rate: {rates}"

            # Once traffic stops and the bridge has settled every message it took, the page
            # shows exactly what /status says.
            await eventually_async(lambda: _settled(port), "the bridge to settle its messages")
            final = (await status(port))["routes"]["telemetry"]["counts"]["delivered"]
            await eventually_async(
                lambda: _dom_equals(page, "telemetry", "delivered", final), "the final total"
            )
            cells = await dom_route(page, "telemetry")
            assert cells["rejected"] == cells["dropped"] == "1"
            assert "malformed_json" in cells["last_error"]
            commands = await dom_route(page, "commands")
            assert commands["received"] == commands["published"] == "1"
            room = page.locator(f'#rooms tr[data-room="{room_name}"]')
            assert "viewer" in (
                await room.locator('[data-field="participants"]').text_content() or ""
            )
            assert await room.locator(".pill").get_attribute("data-connected") == "true"
            connection = page.locator('#connections tr[data-connection="mqtt:bus"]')
            assert await connection.get_attribute("data-connected") == "true"
            assert "malformed_json" in (await page.text_content("#errors") or "")

            shot = output_dir() / "status-page.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"status page screenshot: {shot}")
            assert shot.stat().st_size > 0
        finally:
            await server.stop()


async def _send(peer: MqttPeer) -> None:
    for n in range(MESSAGES):
        await peer.publish(f"page/d{n % 7}", b'{"payload": "m%d"}' % n)
        await asyncio.sleep(PACE)


async def _watch_totals(
    page: Page, port: int, sender: asyncio.Task[None]
) -> tuple[list[int], list[float]]:
    """While messages flow, read the page's delivered total and rate, bracketed by /status.

    `low` is read before the page's next-but-one poll, so the page's numbers then come from a
    fetch that started after `low` (each fetch starts after the previous render); `high` is
    read after the DOM. Totals only grow, so low <= shown <= high. Returns the totals and
    rates shown.
    """
    seen: list[int] = []
    rates: list[float] = []
    for _ in range(30):  # bounded: ~2 s each
        if sender.done() or len(set(seen)) >= 4:
            break
        low = (await status(port))["routes"]["telemetry"]["counts"]["delivered"]
        start = await polls(page)
        await eventually_async(lambda n=start + 2: _polled(page, n), "two more polls")
        cells = await dom_route(page, "telemetry")
        high = (await status(port))["routes"]["telemetry"]["counts"]["delivered"]
        shown = int(cells["delivered"])
        assert low <= shown <= high, (low, shown, high)
        seen.append(shown)
        rates.append(float(cells["rate"]))
    return seen, rates


async def _polled(page: Page, n: int) -> bool:
    return await polls(page) >= n


async def _dom_equals(page: Page, route: str, field: str, want: int) -> bool:
    cells = await dom_route(page, route)
    return cells.get(field) == str(want)


async def _settled(port: int) -> bool:
    body = await status(port)
    counts = body["routes"]["telemetry"]["counts"]
    idle = all(s["in_flight"] == 0 for s in body["sources"].values())
    return bool(idle and counts["delivered"] + counts["rejected"] == counts["received"])


async def eventually_async(check: Any, what: str, timeout: float = 15.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None
