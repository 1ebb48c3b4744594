"""JavaScript LiveKit peers for the interop tests: the official JS SDKs against our participant.

Two peers, one protocol (`tests/js/peer_core.mjs`): commands ``{op, args}`` answered with
``{result}`` or ``{error}``, and room events pushed as ``{event, ...}``.

* ``browser``: livekit-client (its UMD bundle from ``tests/js/node_modules``) in Debian's headless
  Chromium, driven by Playwright for Python with that executable — never a downloaded browser.
  The page and the bundle are served by a small aiohttp server on 127.0.0.1 (a secure context,
  so ``crypto.subtle`` works); the page joins livekit-server on the namespace address.
* ``node``: @livekit/rtc-node (LiveKit's Rust core, prebuilt native binary from npm) in a Node
  process speaking line JSON over stdin/stdout (`tests/js/node_peer.mjs`).

`scripts/services/install` runs ``npm ci`` in ``tests/js``. A missing node, npm package or
chromium fails the test with what to run — never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import ConsoleMessage, Page, async_playwright

from tests.conftest import make_token
from tests.services import LiveKitServer

REPO = Path(__file__).resolve().parents[2]
JS_DIR = REPO / "tests" / "js"
NODE_MODULES = JS_DIR / "node_modules"
UMD_BUNDLE = NODE_MODULES / "livekit-client" / "dist" / "livekit-client.umd.js"
RTC_NODE = NODE_MODULES / "@livekit" / "rtc-node" / "package.json"
CHROMIUM = "/usr/bin/chromium"
# Headless inside the test namespace as root, quietly: no sandbox, GPU, QUIC, first-run UI or
# background fetches. Host ICE candidates as plain addresses, not mDNS names the server cannot
# resolve.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
PEERS = ["browser", "node"]
INSTALL_HINT = "run scripts/services/install (it runs `npm ci` in tests/js)"


class JsPeerError(AssertionError):
    """A command failed in the JS peer (its message carries the JS stack)."""


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        pytest.fail(f"{what} not found at {path}: {INSTALL_HINT}", pytrace=False)


def node_path() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found on PATH: install Node.js 20 (npm comes with it)", pytrace=False)
    return node


def chromium_path() -> str:
    found = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if found is None:
        pytest.fail(
            f"{CHROMIUM} not found: run scripts/services/install (installs Debian's chromium)",
            pytrace=False,
        )
    return found


class JsPeer:
    """One JS participant: `run` a command, wait for `next_event`; `log` keeps its output."""

    kind = ""

    def __init__(self) -> None:
        self.identity = ""
        self.log: deque[str] = deque(maxlen=200)
        self._events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def _push(self, event: dict[str, Any]) -> None:
        self._events.append(event)
        self._changed.set()

    def _tail(self) -> str:
        return "\n".join(list(self.log)[-40:])

    async def _send(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def run(self, op: str, **args: Any) -> Any:
        """Run `op` in the peer; its result, or `JsPeerError` with the JS error."""
        reply = await self._send(op, args)
        if "error" in reply:
            raise JsPeerError(
                f"{self.kind} peer: {reply['error']}\n--- peer log ---\n{self._tail()}"
            )
        return reply.get("result")

    async def next_event(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda _e: True,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        """The first unconsumed event of kind `event` matching `predicate` (removed)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev.get("event") == event and predicate(ev):
                    del self._events[i]
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.kind} peer: no {event!r} event within {timeout:.0f} s; unconsumed: "
                    f"{[e.get('event') for e in self._events]}\n--- peer log ---\n{self._tail()}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def events_of(self, event: str) -> list[dict[str, Any]]:
        """Unconsumed events of kind `event` (left in place)."""
        return [e for e in self._events if e.get("event") == event]


class NodePeer(JsPeer):
    """@livekit/rtc-node in a Node process (tests/js/node_peer.mjs)."""

    kind = "node"

    def __init__(self) -> None:
        super().__init__()
        self.proc: asyncio.subprocess.Process | None = None
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()

    async def start(self) -> None:
        node = node_path()
        _require(RTC_NODE, "@livekit/rtc-node")
        self.proc = await asyncio.create_subprocess_exec(
            node,
            str(JS_DIR / "node_peer.mjs"),
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name="node-peer-stdout"),
            asyncio.create_task(self._read_stderr(), name="node-peer-stderr"),
        ]
        try:
            await asyncio.wait_for(self._ready.wait(), 30)
        except TimeoutError:
            raise AssertionError(f"node peer did not start\n{self._tail()}") from None

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if not line.startswith("@rb "):
                self.log.append(line)
                continue
            msg: dict[str, Any] = json.loads(line[4:])
            if "id" in msg:
                future = self._waiting.pop(msg["id"], None)
                if future is not None and not future.done():
                    future.set_result(msg)
            elif msg.get("event") == "ready":
                self._ready.set()
            else:
                self._push(msg)
        rc = await self.proc.wait()
        self.log.append(f"[node peer exited with {rc}]")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(AssertionError(f"node peer exited ({rc})\n{self._tail()}"))
        self._waiting.clear()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.log.append("stderr: " + raw.decode(errors="replace").rstrip("\n"))

    async def _send(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"node peer exited ({self.proc.returncode})\n{self._tail()}")
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = future
        line = json.dumps({"id": self._next_id, "op": op, "args": args}) + "\n"
        self.proc.stdin.write(line.encode())
        await self.proc.stdin.drain()
        return await future

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()  # the peer leaves the room and exits
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class BrowserPeer(JsPeer):
    """livekit-client in headless Chromium (tests/js/browser_peer.html)."""

    kind = "browser"

    def __init__(self, page: Page) -> None:
        super().__init__()
        self.page = page

    async def _send(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await self.page.evaluate(
            "([op, args]) => window.peer.run(op, args)", [op, args]
        )
        return reply


async def _static_server() -> tuple[web.AppRunner, str]:
    """Serves the peer page, the shared peer code and livekit-client's bundle on 127.0.0.1."""
    _require(UMD_BUNDLE, "livekit-client's UMD bundle")
    files = {
        "/": (JS_DIR / "browser_peer.html", "text/html; charset=utf-8"),
        "/peer_core.mjs": (JS_DIR / "peer_core.mjs", "text/javascript; charset=utf-8"),
        "/livekit-client.umd.js": (UMD_BUNDLE, "text/javascript; charset=utf-8"),
    }

    async def serve(request: web.Request) -> web.StreamResponse:
        found = files.get(request.path)
        if found is None:
            raise web.HTTPNotFound()
        path, content_type = found
        return web.Response(body=path.read_bytes(), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{port}/"


@asynccontextmanager
async def _browser_peer(profile: Path) -> AsyncIterator[JsPeer]:
    executable = chromium_path()
    runner, url = await _static_server()
    try:
        async with async_playwright() as p:
            context = await p.chromium.launch_persistent_context(
                str(profile),  # a fresh --user-data-dir
                executable_path=executable,
                headless=True,
                args=CHROMIUM_ARGS,
            )
            try:
                page = await context.new_page()
                peer = BrowserPeer(page)

                def on_console(message: ConsoleMessage) -> None:
                    peer.log.append(f"console.{message.type}: {message.text}")

                page.on("console", on_console)
                page.on("pageerror", lambda error: peer.log.append(f"pageerror: {error}"))
                await page.expose_function(
                    "__roombus_emit", lambda text: peer._push(json.loads(text))
                )
                await page.goto(url)
                await page.wait_for_function("window.peer !== undefined", timeout=30_000)
                yield peer
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(peer.run("disconnect"), 10)
            finally:
                await context.close()
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _node_peer() -> AsyncIterator[JsPeer]:
    peer = NodePeer()
    try:
        await peer.start()
        yield peer
    finally:
        await peer.stop()


@asynccontextmanager
async def js_peer(
    kind: str,
    server: LiveKitServer,
    room: str,
    identity: str,
    workdir: Path,
    **token_args: Any,
) -> AsyncIterator[JsPeer]:
    """A JS participant of `kind` ("browser" or "node") joined to `room`; gone on exit."""
    opened: contextlib.AbstractAsyncContextManager[JsPeer] = (
        _browser_peer(workdir / f"chromium-{identity}") if kind == "browser" else _node_peer()
    )
    async with opened as peer:
        joined = await peer.run(
            "connect", url=server.url, token=make_token(server, room, identity, **token_args)
        )
        peer.identity = joined["identity"]
        yield peer


def js_versions() -> dict[str, str]:
    """The installed SDK versions (from their package.json), for messages and reports."""
    out = {}
    for name in ("livekit-client", "@livekit/rtc-node"):
        meta = NODE_MODULES / name / "package.json"
        if meta.is_file():
            out[name] = str(json.loads(meta.read_text())["version"])
    return out
