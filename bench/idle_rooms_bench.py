"""Idle rooms: what N joined rooms with no traffic cost the bridge, and where that CPU goes.

    scripts/netns .venv/bin/python -m bench.idle_rooms_bench [--rooms 50 200 300] [--window 60]
        [--settle 10] [--single-peer-connection auto true false] [--profile FILE]
        [--profile-rooms N] [--report FILE] [--json FILE]

Starts livekit-server (port 7970) and Mosquitto (18860) inside the test namespace. For each
room count N of ``--rooms`` it creates N rooms through the server API, runs the real bridge
(``.venv/bin/roombus run <generated config.yaml>``) joining all of them by name with one
room→MQTT route (packets on ``telemetry``) and one MQTT→room route (``idle/{room}/command``),
waits until ``/ready`` answers 200 (every room joined, the bus connected), lets it settle for
``--settle`` s and then measures, over ``--window`` s with no traffic at all:

With several values of ``--single-peer-connection`` (``livekit.single_peer_connection`` of
the bridge: ``true`` one peer connection per room, ``false`` two, ``auto`` the default) every
room count runs once per value, the values alternating, so that the modes see the same server
and about the same load on the machine.

* the bridge's CPU (utime + stime of all threads from ``/proc/<pid>/stat``) as a share of one
  core, also per thread (``/proc/<pid>/task``);
* its RSS (total and per room), number of threads and UDP sockets (each ICE agent has its
  own host candidate sockets: the socket count shows how many peer connections there are);
* livekit-server's CPU share over the same window, the machine's busy cores and the load
  average (the machine is shared: other work shows up there, not in the bridge's figures).

With ``--profile FILE`` one more bridge runs at ``--profile-rooms`` rooms (default: the largest
N) under cProfile, enabled for the measured window only (joining 200 rooms would otherwise fill
the profile): the process is ``python -m bench.idle_rooms_bench profiled-bridge FILE -- <roombus
arguments>``, which runs `bridge.cli.main` with SIGUSR1 enabling and SIGUSR2 disabling the
profiler and writing FILE (`pstats` format; the timer is the main thread's CPU time, so the
wait in epoll does not count). The report lists the top functions by cumulative
and by total time, and total time per package. The profiler slows the process: its CPU share is
reported on its own line, not as the idle cost.

The acceptance target (issue 8) is ≤ 5 % of a core at 200 rooms. A benchmark is not a test:
the exit status is 1 only if a run failed (the bridge did not start or get ready).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import pstats
import shlex
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.fleet_bench import (
    ROOMBUS,
    ROOT,
    Child,
    _wait_http_ready,
    machine_cpu,
    proc_cpu,
    proc_rss_mb,
)

_TICK = os.sysconf("SC_CLK_TCK")
TARGET_SHARE = 0.05  # issue 8: at most 5 % of one core with 200 idle rooms


def room_names(count: int) -> list[str]:
    """The rooms of a run with `count` rooms (a prefix per count: runs never share rooms)."""
    return [f"idle{count}-{i:03d}" for i in range(count)]


def bridge_config(
    args: argparse.Namespace, lk: Any, mqtt_port: int, rooms: list[str], single_pc: str = "auto"
) -> str:
    """A config joining `rooms` by name, with one room→MQTT and one MQTT→room route."""
    prefix = rooms[0].rsplit("-", 1)[0]
    return f"""\
livekit:
  url: {lk.url}
  api_key: {lk.api_key}
  api_secret: {lk.api_secret}
  identity: bridge
  rooms: [{", ".join(rooms)}]
  single_peer_connection: {single_pc}
mqtt:
  bus: {{host: 127.0.0.1, port: {mqtt_port}, client_id: idle-bridge-{uuid.uuid4().hex[:8]},
        clean_start: true}}
connectors:
  - name: telemetry-out
    from: {{room: "{prefix}-*", packet: {{topic: telemetry}}}}
    to: {{mqtt: bus, topic: "idle/{{room}}/telemetry", qos: 1}}
  - name: commands-in
    from: {{mqtt: bus, topic: "idle/{{room}}/command", qos: 1}}
    to: {{room: "{{room}}", packet: {{topic: command, reliable: true}}}}
bridge:
  http_port: {args.health_port}
"""


# ----------------------------------------------------------------------------- /proc


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of `pid`: ``main`` (the event loop's), the others by name and id.

    Python does not name its OS threads, so most share the process's name; the id tells them
    apart.
    """
    by_thread: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                stat = (task / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                key = "main" if task.name == str(pid) else f"{name}[{task.name}]"
                by_thread[key] = (int(fields[11]) + int(fields[12])) / _TICK
    return by_thread


def user_sys(pid: int) -> tuple[float, float]:
    """(utime, stime) CPU seconds of `pid` (all threads); zeros if it is gone."""
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) / _TICK, int(fields[12]) / _TICK
    return 0.0, 0.0


def udp_sockets(pid: int) -> int:
    """UDP sockets `pid` holds (those of its network namespace's UDP tables); 0 if it is gone."""
    inodes: set[str] = set()
    for table in ("udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9:
                    inodes.add(fields[9])
    count = 0
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    count += 1
    return count


def thread_count(pid: int) -> int:
    """Threads of `pid` (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------- one run


@dataclass
class IdleRun:
    """One bridge with `rooms` joined rooms, measured idle."""

    rooms: int
    profiled: bool = False
    single_pc: str = "auto"  # livekit.single_peer_connection of the bridge
    error: str = ""
    join_s: float = float("nan")  # start of the process to /ready 200
    window_s: float = 0.0
    bridge_share: float = float("nan")  # of one core
    user_share: float = float("nan")  # of which in user mode
    sys_share: float = float("nan")  # and in the kernel (system calls: sendto, recvfrom, epoll)
    livekit_share: float = float("nan")
    rss_mb: float = 0.0
    hwm_mb: float = 0.0
    threads: int = 0
    udp_sockets: int = 0
    thread_shares: dict[str, float] = field(default_factory=dict)
    machine_busy_cores: float = float("nan")
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: list[str] = field(default_factory=list)


async def _create_rooms(lk: Any, names: list[str]) -> None:
    from bridge.room.server_api import ServerApi

    gate = asyncio.Semaphore(16)
    async with ServerApi(lk.url, lk.api_key, lk.api_secret) as server:

        async def one(name: str) -> None:
            async with gate:
                await server.create_room(name, empty_timeout=900)

        await asyncio.gather(*(one(n) for n in names))


async def _delete_rooms(lk: Any, names: list[str]) -> None:
    from bridge.room.server_api import ServerApi

    gate = asyncio.Semaphore(16)
    async with ServerApi(lk.url, lk.api_key, lk.api_secret) as server:

        async def one(name: str) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    await server.delete_room(name)

        await asyncio.gather(*(one(n) for n in names))


def _wait_for_file(path: str, within: float) -> bool:
    """Whether `path` exists within `within` s (the profiled bridge writes it on SIGUSR2)."""
    deadline = time.monotonic() + within
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


async def measure(
    args: argparse.Namespace,
    lk: Any,
    mqtt_port: int,
    count: int,
    workdir: Path,
    profile: str,
    single_pc: str = "auto",
) -> IdleRun:
    """Run the bridge with `count` idle rooms and measure it (profiled if `profile` is set)."""
    result = IdleRun(count, profiled=bool(profile), single_pc=single_pc)
    rooms = room_names(count)
    tag = f"{count}-spc-{single_pc}{'-profiled' if profile else ''}"
    config = workdir / f"bridge-{tag}.yaml"
    config.write_text(bridge_config(args, lk, mqtt_port, rooms, single_pc))
    roombus_args = ["--log-level", args.bridge_log_level, "run", str(config)]
    if profile:
        argv = [sys.executable, "-m", "bench.idle_rooms_bench", "profiled-bridge", profile]
        argv += ["--", *roombus_args]
        cwd = ROOT  # the wrapper is a module of this checkout
    else:
        command = shlex.split(args.bridge_cmd) if args.bridge_cmd else [ROOMBUS]
        argv = [*command, *roombus_args]
        cwd = workdir  # as in fleet_bench: --bridge-cmd may run another copy of `bridge`
    bridge: Child | None = None
    try:
        await _create_rooms(lk, rooms)
        started = time.monotonic()
        bridge = await Child.start(f"bridge-{tag}", argv, workdir, control=False, cwd=cwd)
        within = args.ready_timeout or 60 + 2.0 * count
        await _wait_http_ready(f"http://127.0.0.1:{args.health_port}/ready", bridge, within)
        result.join_s = time.monotonic() - started
        await asyncio.sleep(args.settle)
        if bridge.proc.returncode is not None:
            raise RuntimeError(f"bridge exited: {bridge.log_tail()}")
        pid, lk_pid = bridge.proc.pid, lk.process.pid
        if profile:
            os.kill(pid, signal.SIGUSR1)
        result.load_before = os.getloadavg()
        threads_before, us_before = thread_cpu(pid), user_sys(pid)
        cpu_before, lk_before, machine_before = proc_cpu(pid), proc_cpu(lk_pid), machine_cpu()
        wall_before = time.monotonic()
        await asyncio.sleep(args.window)
        cpu_after, lk_after, machine_after = proc_cpu(pid), proc_cpu(lk_pid), machine_cpu()
        window = time.monotonic() - wall_before
        threads_after, us_after = thread_cpu(pid), user_sys(pid)
        result.load_after = os.getloadavg()
        if profile:
            os.kill(pid, signal.SIGUSR2)
        if cpu_before is None or cpu_after is None:
            raise RuntimeError(f"bridge exited during the window: {bridge.log_tail()}")
        result.window_s = window
        result.bridge_share = (cpu_after - cpu_before) / window
        result.user_share = (us_after[0] - us_before[0]) / window
        result.sys_share = (us_after[1] - us_before[1]) / window
        if lk_before is not None and lk_after is not None:
            result.livekit_share = (lk_after - lk_before) / window
        result.machine_busy_cores = (machine_after[0] - machine_before[0]) / window
        result.rss_mb, result.hwm_mb = proc_rss_mb(pid)
        result.threads = thread_count(pid)
        result.udp_sockets = udp_sockets(pid)
        result.thread_shares = {
            name: (cpu - threads_before.get(name, 0.0)) / window
            for name, cpu in sorted(threads_after.items(), key=lambda kv: -kv[1])
        }
        if profile and not await asyncio.to_thread(_wait_for_file, profile, 30):
            result.notes.append(f"profile {profile} not written within 30 s")
    except Exception as exc:  # noqa: BLE001 - a failed run is reported, the next one runs
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if bridge is not None:
            rc = await bridge.stop(kill_after=60)
            if rc not in (0, None, -signal.SIGTERM):
                result.notes.append(f"bridge exit status {rc}: {bridge.log_tail(4)}")
            errors = [
                line
                for line in bridge.log_path.read_text(errors="replace").splitlines()
                if " ERROR " in line or "Traceback" in line
            ]
            if errors:
                result.notes.append(f"bridge logged {len(errors)} ERROR lines: {errors[0]}")
        await _delete_rooms(lk, rooms)
    return result


# ----------------------------------------------------------------------------- profile


def _where(filename: str) -> str:
    """A short location: the path inside site-packages, the checkout or the standard library."""
    if filename.startswith("~"):
        return ""
    for marker in ("site-packages/", f"{ROOT}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    if "/lib/python3" in filename:
        return "stdlib/" + filename.split("/lib/python3", 1)[1].split("/", 1)[1]
    return filename


def _package(filename: str, name: str) -> str:
    """The package a profile entry belongs to (built-ins by what they are)."""
    if filename == "~":
        # A C function: "<method 'poll' of 'select.epoll' objects>", "<built-in method ...>".
        if " of '" in name:
            return "C: " + name.split(" of '", 1)[1].split("'", 1)[0]
        return "C: " + name.strip("<>").replace("built-in method ", "").split(" ")[0]
    where = _where(filename)
    if where.startswith("stdlib/"):
        return "stdlib " + where.removeprefix("stdlib/").split("/", 1)[0].removesuffix(".py")
    head = where.split("/", 1)[0]
    if head in ("bridge", "connectors"):
        parts = where.split("/")
        return "/".join(parts[:2]).removesuffix(".py") if len(parts) > 2 else head
    return head.removesuffix(".py")


def profile_summary(path: str, top: int, window: float) -> str:
    """Markdown tables: top functions by cumulative and by total time; total time per package."""
    stats = pstats.Stats(path)
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(e[2] for e in entries.values())

    def label(key: tuple[str, int, str]) -> str:
        filename, line, name = key
        where = _where(filename)
        return f"`{where}:{line}({name})`" if where else f"`{name}`"

    def table(title: str, index: int) -> list[str]:
        rows = sorted(entries.items(), key=lambda kv: -kv[1][index])[:top]
        lines = [
            f"**{title}** (profiled window {window:.0f} s; profiled CPU {total:.2f} s)",
            "",
            "| function | calls | calls/s | tottime s | cumtime s |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, (_cc, nc, tt, ct, _callers) in rows:
            lines.append(f"| {label(key)} | {nc} | {nc / window:.0f} | {tt:.3f} | {ct:.3f} |")
        return [*lines, ""]

    packages: dict[str, float] = collections.defaultdict(float)
    for (filename, _line, name), entry in entries.items():
        packages[_package(filename, name)] += entry[2]
    lines = table(f"Top {top} by cumulative time", 3) + table(f"Top {top} by total time", 2)
    lines += ["**Total time per package**", "", "| package | tottime s | share |"]
    lines.append("|---|---:|---:|")
    for package, tt in sorted(packages.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {package} | {tt:.3f} | {tt / max(total, 1e-9) * 100:.1f} % |")
    return "\n".join(lines) + "\n"


def profiled_bridge(out: str, argv: list[str]) -> int:
    """Run the bridge's command line with cProfile switched by SIGUSR1 (on) / SIGUSR2 (off+dump).

    The event loop runs on the main thread, where the signal handlers run, so the profiler
    (per thread in Python 3.11) sees every callback of the loop.
    """
    import cProfile

    from bridge.cli import main as bridge_main

    # CPU time of the loop's thread, not wall time: idle, wall time is all in epoll's wait.
    profiler = cProfile.Profile(time.thread_time)

    def start(_signum: int, _frame: object) -> None:
        profiler.enable()

    def stop(_signum: int, _frame: object) -> None:
        profiler.disable()
        tmp = out + ".tmp"
        profiler.dump_stats(tmp)
        os.replace(tmp, out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return bridge_main(argv)


# ----------------------------------------------------------------------------- report


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def render(runs: list[IdleRun], args: argparse.Namespace, profile: str) -> str:
    """The Markdown report."""
    lines = [
        f"# idle_rooms_bench ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Idle bridge: no traffic; settle {args.settle:g} s after /ready, window "
        f"{args.window:g} s; {os.cpu_count()} cores. Target: ≤ {TARGET_SHARE * 100:g} % of one "
        "core at 200 rooms.",
        "",
    ]
    for run in runs:
        if run.error:
            kind = "profiled " if run.profiled else ""
            lines += [
                f"**{kind}{run.rooms} rooms (single_peer_connection {run.single_pc}): failed**: "
                f"{run.error}",
                "",
            ]
    lines += [
        "| rooms | single PC | run | join s | bridge % core | user / sys % | % per 100 rooms "
        "| ≤ 5 % | RSS MB | RSS MB/room | marginal MB/room | threads | UDP sockets "
        "| livekit-server % core | machine busy cores "
        "| load avg before → after |",
        "|---:|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    # Per mode, the smallest plain run is the base the marginal memory per room is counted from.
    bases: dict[str, IdleRun] = {}
    for mode in {r.single_pc for r in runs}:
        plain = sorted(
            (r for r in runs if not r.error and not r.profiled and r.single_pc == mode),
            key=lambda r: r.rooms,
        )
        if len({r.rooms for r in plain}) > 1:
            bases[mode] = plain[0]
    for run in runs:
        if run.error:
            continue
        share = run.bridge_share * 100
        marginal = float("nan")
        base = bases.get(run.single_pc)
        if base is not None and run.rooms > base.rooms and not run.profiled:
            marginal = (run.rss_mb - base.rss_mb) / (run.rooms - base.rooms)
        meets = "-" if run.profiled else ("yes" if run.bridge_share <= TARGET_SHARE else "no")
        lines.append(
            f"| {run.rooms} | {run.single_pc} | {'cProfile' if run.profiled else 'plain'} "
            f"| {_f(run.join_s)} "
            f"| {_f(share, 2)} | {_f(run.user_share * 100, 2)} / {_f(run.sys_share * 100, 2)} "
            f"| {_f(share / run.rooms * 100, 2)} | {meets} | {_f(run.rss_mb)} "
            f"| {_f(run.rss_mb / run.rooms, 2)} | {_f(marginal, 2)} | {run.threads} "
            f"| {run.udp_sockets} "
            f"| {_f(run.livekit_share * 100, 2)} "
            f"| {_f(run.machine_busy_cores, 2)} "
            f"| {' / '.join(f'{v:.2f}' for v in run.load_before)} → "
            f"{' / '.join(f'{v:.2f}' for v in run.load_after)} |"
        )
    lines += ["", "Bridge CPU per thread (% of one core over the window):", ""]
    for run in runs:
        if run.error:
            continue
        busy = [(n, s) for n, s in run.thread_shares.items() if s > 0 or n == "main"]
        shown = ", ".join(f"{name} {share * 100:.2f} %" for name, share in busy[:8]) or "none"
        kind = " (cProfile)" if run.profiled else ""
        lines.append(f"- {run.rooms} rooms, single PC {run.single_pc}{kind}: {shown}")
        for note in run.notes:
            lines.append(f"  - note: {note}")
    if profile and Path(profile).exists():
        window = next((r.window_s for r in runs if r.profiled and not r.error), args.window)
        lines += ["", profile_summary(profile, args.top, window)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    """Start the servers, measure every room count (and the profile), report; the exit status."""
    if not os.environ.get("ROOMBUS_NETNS"):
        print(
            "idle_rooms_bench: run inside the test namespace: "
            "scripts/netns .venv/bin/python -m bench.idle_rooms_bench"
        )
        return 2
    from tests.services import LiveKitServer, Mosquitto

    keep = Path(args.workdir) if args.workdir else None
    runs: list[IdleRun] = []
    with tempfile.TemporaryDirectory(prefix="idle-rooms-bench-") as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        profile = args.profile
        lk = LiveKitServer(
            name="livekit-idle-bench",
            workdir=workdir / "livekit",
            port=args.port,
            udp_port=args.port + 2,
            turn_port=args.port + 4,
        )
        mq = Mosquitto(name="mosquitto-idle-bench", workdir=workdir / "mqtt", port=args.mqtt_port)
        started: list[Any] = []
        try:
            for service in (lk, mq):
                await asyncio.to_thread(service.start)
                started.append(service)
            for count in args.rooms:
                for mode in args.single_peer_connection:
                    what = f"{count} rooms, single_peer_connection {mode}"
                    print(f"idle_rooms_bench: {what} ...", file=sys.stderr, flush=True)
                    runs.append(await measure(args, lk, mq.port, count, workdir, "", mode))
                    if runs[-1].error:
                        print(f"idle_rooms_bench: {what}: {runs[-1].error}", file=sys.stderr)
            if profile:
                count = args.profile_rooms or max(args.rooms)
                mode = args.single_peer_connection[0]
                print(f"idle_rooms_bench: {count} rooms, profiled ...", file=sys.stderr)
                runs.append(await measure(args, lk, mq.port, count, workdir, profile, mode))
        finally:
            for service in reversed(started):
                await asyncio.to_thread(service.stop)
        report = render(runs, args, profile)
        print(report)
        if args.report:
            await asyncio.to_thread(Path(args.report).write_text, report)
        if args.json:
            figures = json.dumps([asdict(r) for r in runs], indent=1)
            await asyncio.to_thread(Path(args.json).write_text, figures)
        if keep:
            print(f"idle_rooms_bench: logs in {workdir}", file=sys.stderr)
    return 1 if any(r.error for r in runs) else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rooms", type=int, nargs="+", default=[200], help="room counts to measure")
    p.add_argument("--window", type=float, default=60.0, help="measured idle seconds")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after /ready, unmeasured")
    p.add_argument(
        "--single-peer-connection",
        nargs="+",
        choices=["auto", "true", "false"],
        default=["auto"],
        help="the bridge's livekit.single_peer_connection; several: each room count once per "
        "value (the profiled run uses the first)",
    )
    p.add_argument("--profile", default="", help="also run once under cProfile; pstats file")
    p.add_argument("--profile-rooms", type=int, default=0, help="rooms of the profiled run")
    p.add_argument("--top", type=int, default=15, help="functions per profile table")
    p.add_argument(
        "--ready-timeout", type=float, default=0.0, help="seconds to /ready (0: 60 + 2 per room)"
    )
    p.add_argument("--bridge-log-level", default="warning")
    p.add_argument(
        "--bridge-cmd",
        default="",
        help=f"command that runs the bridge (default {ROOMBUS}; 'run CONFIG' is appended)",
    )
    p.add_argument("--port", type=int, default=7970, help="livekit-server port (+2 UDP, +4 TURN)")
    p.add_argument("--mqtt-port", type=int, default=18860)
    p.add_argument("--health-port", type=int, default=18192, help="the bridge's /ready port")
    p.add_argument("--report", help="also write the Markdown report here")
    p.add_argument("--json", help="write every figure as JSON here")
    p.add_argument("--workdir", help="keep configs and logs here")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.rooms):
        p.error("--rooms must be at least 1")
    if args.profile:  # absolute: the profiled bridge runs in another directory
        args.profile = os.path.abspath(args.profile)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.profile)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``profiled-bridge OUT -- ARGS`` is the profiled bridge's own process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profiled-bridge"]:
        out, rest = argv[1], argv[2:]
        return profiled_bridge(out, rest[1:] if rest[:1] == ["--"] else rest)
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
