"""Fleet benchmark: MQTT devices and SDK observers through the bridge, against a bare relay.

    scripts/netns .venv/bin/python -m bench.fleet_bench [--quick]
        [--case fleet|room-kafka|text-kafka|all]
        [--devices 200] [--rooms 20] [--rate 5] [--duration 120] [--report FILE]

Starts livekit-server, Mosquitto and (for the Kafka cases) Kafka inside the test namespace, then
runs the same load against each *target* in turn, each a separate process measured from
``/proc``:

* ``bridge``: the real daemon, ``.venv/bin/roombus run <generated config.yaml>``;
* ``relay``: the bare relay baseline (`bench.fleet_relay`): the same libraries with no routing
  (paho -> our participant's ``publish_data``; our participant's packets or text stream
  handler -> aiokafka, pipelined).

Cases:

* ``fleet``: N MQTT devices (`bench.fleet_devices`, many per process on one event loop, a
  minimal MQTT 3.1.1 client) publish QoS 1 telemetry at ``--rate`` to
  ``fleet/{room}/{device}/telemetry``; the target delivers it as a reliable packet
  ``telemetry.{device}`` into the room; one official-SDK observer per room
  (`bench.fleet_observer`, a few rooms per process) receives it and sends commands back on
  ``command/{device}`` at ``--cmd-rate`` per room, which the target publishes to
  ``fleet/{room}/{device}/commands`` for the device.
* ``room-kafka``: SDK participants publish packets paced at ``--kafka-rate`` in total into the
  rooms; the target produces them to a Kafka topic; a consumer (`bench.fleet_observer`
  ``--mode kafka``) checks them.
* ``text-kafka``: the same with text streams: SDK participants call ``send_text`` (``--text-size``
  characters each) on topic ``bench-text`` paced at ``--text-rate`` in total; the target produces
  each whole stream as one record.

Every message carries a fixed header (`HEADER`: run id, sender, sequence number, send time on
the system-wide monotonic clock) padded to ``--size`` bytes (in text streams: hex-encoded, see
`pack_text`), so every receiver computes one-way
latency, losses, duplicates and order per sender. Per direction the report gives sent /
acknowledged / delivered / lost / duplicated / out of order, latency p50 / p99 / max, the
largest gap between two deliveries of one sender, and each target's CPU µs per forwarded
message (utime + stime deltas over the load window) and RSS; plus every process's CPU share
over the window, so a shortfall can be attributed. The machine is shared: compare the bridge
with the relay of the same run, not figures across runs.

This module also holds what the generator scripts share (message header, names, control
protocol): they import it, it never imports them (they run as subprocesses).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- shared protocol

ROOT = Path(__file__).resolve().parent.parent

# kind (1 B), run id (8 B), sender (24 B, NUL padded), sequence (u32), send time (u64 ns of
# time.monotonic_ns(): CLOCK_MONOTONIC is system-wide, so it compares across processes).
HEADER = struct.Struct("!B8s24sIQ")
KIND_DATA = 1
KIND_PROBE = 2
PEER_BRIDGE = "bridge"
PEER_RELAY = "relay"
KAFKA_PACKET_TOPIC = "bench"
KAFKA_TEXT_TOPIC = "bench-text"
KAFKA_CASES = ("room-kafka", "text-kafka")
ROOMBUS = str(Path(sys.executable).parent / "roombus")


def room_names(count: int) -> list[str]:
    """The benchmark's rooms."""
    return [f"fleet-{i:02d}" for i in range(count)]


def device_name(index: int) -> str:
    """Device `index`'s id."""
    return f"d{index:04d}"


def room_of(index: int, rooms: int) -> int:
    """The room of device `index` (round robin: devices 0..rooms-1 are each room's first)."""
    return index % rooms


def pack(run: str, kind: int, sender: str, seq: int, size: int) -> bytes:
    """A message: the header, stamped now, padded to `size` bytes."""
    head = HEADER.pack(kind, run.encode(), sender.encode(), seq, time.monotonic_ns())
    return head + b"." * max(0, size - HEADER.size)


def pack_text(run: str, kind: int, sender: str, seq: int, size: int) -> str:
    """A text message: the header, stamped now, in hex, padded to `size` characters."""
    head = pack(run, kind, sender, seq, HEADER.size).hex()
    return head + "." * max(0, size - len(head))


def unpack(data: bytes) -> tuple[int, bytes, str, int, int] | None:
    """(kind, run, sender, seq, sent_ns) of a message (binary or `pack_text`), or None."""
    if data[:1] not in (bytes([KIND_DATA]), bytes([KIND_PROBE])):
        # Hex digits are never a kind byte: a text message.
        try:
            data = bytes.fromhex(data[: HEADER.size * 2].decode("ascii"))
        except ValueError:
            return None
    if len(data) < HEADER.size:
        return None
    kind, run, sender, seq, sent = HEADER.unpack_from(data)
    return kind, run, sender.rstrip(b"\0").decode(errors="replace"), seq, sent


def emit(event: str, **values: object) -> None:
    """Tell the orchestrator something (one JSON line on stdout)."""
    sys.stdout.write(json.dumps({"ev": event, **values}) + "\n")
    sys.stdout.flush()


async def control_lines() -> AsyncIterator[str]:
    """The orchestrator's commands, one per stdin line (ends when stdin closes)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield line.decode().strip()


@dataclass
class Deliveries:
    """What one receiver saw of one sender, in arrival order: (seq, latency µs, at µs after t0)."""

    seen: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, seq: int, sent_ns: int, now_ns: int, t0_ns: int) -> None:
        self.seen.append((seq, (now_ns - sent_ns) // 1000, (now_ns - t0_ns) // 1000))


def write_result(path: str, result: dict[str, Any]) -> None:
    """Write a generator's result file (atomically: the orchestrator reads it after `done`)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(result, out)
    os.replace(tmp, path)


def common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every generator takes from the orchestrator."""
    parser.add_argument("--run", required=True, help="run id (8 characters)")
    parser.add_argument("--rooms", required=True, help="comma-separated room names")
    parser.add_argument("--size", type=int, default=128, help="message bytes")
    parser.add_argument("--duration", type=float, required=True, help="load seconds")
    parser.add_argument("--drain-quiet", type=float, default=2.0, help="quiet seconds = drained")
    parser.add_argument("--drain-max", type=float, default=15.0, help="drain seconds at most")
    parser.add_argument("--out", required=True, help="result file")


async def wait_drained(
    last_arrival: Callable[[], float], end: float, quiet: float, cap: float
) -> None:
    """After the load (`end`, monotonic s), wait until nothing arrived for `quiet` s (or `cap`)."""
    while True:
        now = time.monotonic()
        if now >= end + cap or (now >= end and now - max(last_arrival(), end) >= quiet):
            return
        await asyncio.sleep(0.1)


async def pace(t0: float, count: int, interval: float, phase: float) -> AsyncIterator[int]:
    """Yield 0..count-1, the k-th at t0 + phase + k * interval (monotonic s); bounded catch-up."""
    for k in range(count):
        delay = t0 + phase + k * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield k


# ----------------------------------------------------------------------------- /proc sampling

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (utime + stime, all threads) of `pid`, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of stat(5)


def proc_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB; zeros if it is gone."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over cores."""
    parts = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])  # without guest time (already in user)
    return (total - idle) / _TICK, total / _TICK


# ----------------------------------------------------------------------------- analysis


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Direction:
    """The figures of one direction of one target."""

    target: str
    direction: str
    sent: int = 0
    acked: int = 0
    delivered: int = 0  # distinct messages seen
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    max_gap_ms: float = float("nan")
    rate: float = 0.0  # distinct deliveries per second of the load window
    in_window: int = 0  # deliveries inside the load window (the CPU figures divide by it)


def analyse(
    target: str,
    direction: str,
    sent: dict[str, int],
    acked: int,
    seen: dict[str, list[tuple[int, int, int]]],
    window_s: float,
) -> Direction:
    """Figures of one direction: `sent[sender]` messages (seqs 0..n-1), `seen[sender]` arrivals."""
    d = Direction(target, direction, sent=sum(sent.values()), acked=acked)
    latencies: list[float] = []
    max_gap = 0
    for sender, count in sent.items():
        arrivals = seen.get(sender, [])
        distinct: set[int] = set()
        highest = -1
        previous_at: int | None = None
        for seq, latency_us, at_us in arrivals:
            if seq in distinct:
                d.duplicated += 1
                continue
            distinct.add(seq)
            if seq < highest:
                d.out_of_order += 1
            highest = max(highest, seq)
            latencies.append(latency_us / 1000)
            if 0 <= at_us <= window_s * 1e6:
                d.in_window += 1
            if previous_at is not None:
                max_gap = max(max_gap, at_us - previous_at)
            previous_at = at_us
        d.delivered += len(distinct)
        d.lost += count - len({s for s in distinct if s < count})
    latencies.sort()
    if latencies:
        d.p50_ms = _quantile(latencies, 0.5)
        d.p99_ms = _quantile(latencies, 0.99)
        d.max_ms = latencies[-1]
        d.max_gap_ms = max_gap / 1000
    d.rate = d.in_window / window_s if window_s > 0 else 0.0
    return d


@dataclass
class ProcessUse:
    """One process's share of the machine over the load window."""

    name: str
    cpu_s: float
    share: float  # fraction of one core
    rss_mb: float
    hwm_mb: float


@dataclass
class TargetRun:
    """One target (bridge or relay) under one case's load."""

    case: str
    target: str
    error: str = ""
    directions: list[Direction] = field(default_factory=list)
    processes: list[ProcessUse] = field(default_factory=list)
    window_s: float = 0.0
    target_cpu_us_per_msg: float = float("nan")
    target_rss_mb: float = 0.0
    target_idle_share: float = float("nan")  # of one core, with no traffic, just before t0
    machine_busy_cores: float = 0.0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- orchestration


class Child:
    """A subprocess of the benchmark with a JSON-line control channel (stdin/stdout)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(), name=f"read-{name}")

    @classmethod
    async def start(
        cls,
        name: str,
        argv: list[str],
        workdir: Path,
        control: bool,
        cwd: Path = ROOT,
        log_name: str = "",
    ) -> Child:
        log_path = workdir / f"{log_name or name}.log"
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                stdin=asyncio.subprocess.PIPE if control else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if control else log,
                stderr=log,
                start_new_session=True,
            )
        return cls(name, proc, log_path)

    async def _read(self) -> None:
        if self.proc.stdout is None:
            return
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    await self.events.put(event)
        await self.events.put({"ev": "exit"})

    def send(self, line: str) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write((line + "\n").encode())

    async def expect(self, event: str, within: float) -> dict[str, Any]:
        """The next event named `event` (others are skipped); raises if the child exits first."""
        async with asyncio.timeout(within):
            while True:
                got = await self.events.get()
                if got["ev"] == event:
                    return got
                if got["ev"] == "exit":
                    raise RuntimeError(f"{self.name} exited: {self.log_tail()}")

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(log empty)"

    async def stop(self, kill_after: float = 20.0, grace: float = 0.0) -> int | None:
        """Wait `grace` s for it to exit, then TERM, then KILL after `kill_after`; the status."""
        if grace and self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), kill_after)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return self.proc.returncode


@dataclass
class Servers:
    """The real servers of this run."""

    livekit: Any
    mosquitto: Any
    kafka: Any | None


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def bridge_config(
    args: argparse.Namespace,
    servers: Servers,
    case: str,
    run: str,
    kafka_topic: str,
    replica: int = 0,
) -> str:
    """The bridge's config.yaml for `case` (of replica number `replica` with --replicas)."""
    lk = servers.livekit
    port = args.health_port + replica
    bridge = f"bridge:\n  http_port: {port}\n"
    if args.replicas > 1:
        assert servers.kafka is not None
        bridge += (
            f"  replicas: {{kafka: ctl, group_id: fleet-{run}, control_topic: fleet-rooms-{run},"
            f" session_timeout: 6, heartbeat_interval: 1, replica_id: r{replica}}}\n"
        )
        bridge = (
            f'kafka:\n  ctl: {{bootstrap_servers: ["{servers.kafka.bootstrap}"],'
            f" client_id: fleet-ctl-{run}}}\n" + bridge
        )
    rooms = ", ".join(room_names(args.rooms))
    head = f"""\
livekit:
  url: {lk.url}
  api_key: {lk.api_key}
  api_secret: {lk.api_secret}
  identity: {PEER_BRIDGE}
  rooms: [{rooms}]
"""
    if case == "fleet":
        return (
            head
            + f"""\
mqtt:
  bus: {{host: 127.0.0.1, port: {servers.mosquitto.port}, client_id: fleet-bridge-{run},
        clean_start: true}}
connectors:
  - name: telemetry
    from: {{mqtt: bus, topic: "fleet/{{room}}/{{device}}/telemetry", qos: 1}}
    to: {{room: "{{room}}", packet: {{topic: "telemetry.{{device}}", reliable: true}}}}
  - name: commands
    from: {{room: "fleet-*", packet: {{topic: "command/{{device}}"}}}}
    to: {{mqtt: bus, topic: "fleet/{{room}}/{{device}}/commands", qos: 1}}
"""
            + bridge
        )
    assert servers.kafka is not None
    source = (
        f'packet: {{topic: "{KAFKA_PACKET_TOPIC}"}}'
        if case == "room-kafka"
        else f'text_stream: {{topic: "{KAFKA_TEXT_TOPIC}", mode: whole}}'
    )
    return (
        head
        + f"""\
kafka:
  main: {{bootstrap_servers: ["{servers.kafka.bootstrap}"], client_id: fleet-bridge, acks: all}}
connectors:
  - name: to-kafka
    from: {{room: "fleet-*", {source}}}
    to: {{kafka: main, topic: "{kafka_topic}", key: "{{room}}"}}
"""
        + bridge
    )


async def _wait_http_ready(url: str, child: Child, within: float) -> None:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if child.proc.returncode is not None:
            raise RuntimeError(f"bridge exited with {child.proc.returncode}: {child.log_tail()}")
        if await asyncio.to_thread(probe):
            return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"bridge not ready within {within:.0f} s: {child.log_tail()}")


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _sum_cpu(pids: list[int]) -> float | None:
    """CPU seconds of all `pids` together (None if one is gone)."""
    total = 0.0
    for pid in pids:
        cpu = proc_cpu(pid)
        if cpu is None:
            return None
        total += cpu
    return total


def _profiled(args: argparse.Namespace, argv: list[str], target: str, case: str) -> list[str]:
    """With --profile, `argv` (a ``python -m`` or roombus command) under `bench.cpuprofile`."""
    if not args.profile:
        return argv
    out = Path(args.profile).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if argv[0] == ROOMBUS:
        module, rest = "bridge", argv[1:]
    else:
        assert argv[1] == "-m", argv
        module, rest = argv[2], argv[3:]
    prof = str(out / f"{target}-{case}.prof")
    # As a script: the bridge runs outside the checkout, where `bench` is not importable.
    return [sys.executable, str(ROOT / "bench" / "cpuprofile.py"), prof, "--", module, *rest]


async def run_target(
    args: argparse.Namespace, servers: Servers, case: str, target: str, workdir: Path
) -> TargetRun:
    """Run `case`'s load against `target` once and measure it."""
    result = TargetRun(case, target)
    run = uuid.uuid4().hex[:8]
    rooms = room_names(args.rooms)
    peer = PEER_BRIDGE if target == "bridge" else PEER_RELAY
    if target == "bridge" and args.replicas > 1:
        peer = f"{PEER_BRIDGE}-{{room}}"  # bridge.replicas' default identity: one per room
    lk = servers.livekit
    kafka_topic = f"fleet.{target}.{run}"
    duration = args.duration if case == "fleet" else args.kafka_duration
    text = case == "text-kafka"
    children: list[Child] = []
    target_child: Child | None = None
    replicas: list[Child] = []  # the bridge's processes (several with --replicas)
    outs: list[tuple[Child, Path]] = []
    try:
        if case in KAFKA_CASES:
            assert servers.kafka is not None
            await _create_topic(servers.kafka.bootstrap, kafka_topic, args.kafka_partitions)
        # --- the target
        if target == "bridge":
            for replica in range(args.replicas):
                suffix = f"-r{replica}" if args.replicas > 1 else ""
                config = workdir / f"bridge-{case}{suffix}.yaml"
                config.write_text(bridge_config(args, servers, case, run, kafka_topic, replica))
                command = shlex.split(args.bridge_cmd) if args.bridge_cmd else [ROOMBUS]
                argv = [*command, "--log-level", args.bridge_log_level, "run", str(config)]
                if replica == 0:
                    argv = _profiled(args, argv, target, case)
                # Not from the checkout's directory: --bridge-cmd may run another copy.
                child = await Child.start(
                    f"bridge-{case}{suffix}", argv, workdir, control=False, cwd=workdir
                )
                replicas.append(child)
                target_child = target_child or child
            for replica, child in enumerate(replicas):
                await _wait_http_ready(
                    f"http://127.0.0.1:{args.health_port + replica}/ready",
                    child,
                    args.ready_timeout,
                )
        else:
            argv = _py(
                "bench.fleet_relay",
                "--mode",
                {"fleet": "fleet", "room-kafka": "kafka", "text-kafka": "text"}[case],
                "--url",
                lk.url,
                "--api-key",
                lk.api_key,
                "--api-secret",
                lk.api_secret,
                "--identity",
                peer,
                "--rooms",
                ",".join(rooms),
                "--mqtt-port",
                str(servers.mosquitto.port),
                "--kafka",
                servers.kafka.bootstrap if servers.kafka else "",
                "--kafka-topic",
                kafka_topic,
                "--out",
                str(workdir / f"relay-{case}.json"),
            )
            argv = _profiled(args, argv, target, case)
            target_child = await Child.start(f"relay-{case}", argv, workdir, control=True)
            await target_child.expect("ready", args.ready_timeout)
        assert target_child is not None
        # --- the load generators
        size = args.text_size if text else args.size
        common = ["--run", run, "--size", str(size), "--duration", str(duration)]
        common += ["--drain-quiet", str(args.drain_quiet), "--drain-max", str(args.drain_max)]
        lk_args = ["--url", lk.url, "--api-key", lk.api_key, "--api-secret", lk.api_secret]
        for i, group in enumerate(_chunks(rooms, args.rooms_per_observer)):
            out = workdir / f"{target}-{case}-observer{i}-{run}.json"
            argv = _py(
                "bench.fleet_observer",
                "--mode",
                "fleet" if case == "fleet" else "send",
                *common,
                *lk_args,
                "--rooms",
                ",".join(group),
                "--all-rooms",
                str(args.rooms),
                "--devices",
                str(args.devices),
                "--peer",
                peer,
                "--cmd-rate",
                str(args.cmd_rate),
                "--send-rate",
                str((args.text_rate if text else args.kafka_rate) / args.rooms),
                "--send-kind",
                "text" if text else "packet",
                "--window",
                str(args.text_window if text else 8),
                "--out",
                str(out),
            )
            children.append(
                await Child.start(
                    f"observer{i}",
                    argv,
                    workdir,
                    control=True,
                    log_name=f"{target}-{case}-observer{i}",
                )
            )
            outs.append((children[-1], out))
        if case == "fleet":
            for first in range(0, args.devices, args.devices_per_process):
                count = min(args.devices_per_process, args.devices - first)
                i = first // args.devices_per_process
                out = workdir / f"{target}-{case}-devices{i}-{run}.json"
                argv = _py(
                    "bench.fleet_devices",
                    *common,
                    "--rooms",
                    ",".join(rooms),
                    "--mqtt-port",
                    str(servers.mosquitto.port),
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--total",
                    str(args.devices),
                    "--rate",
                    str(args.rate),
                    "--out",
                    str(out),
                )
                children.append(
                    await Child.start(
                        f"devices{i}",
                        argv,
                        workdir,
                        control=True,
                        log_name=f"{target}-{case}-devices{i}",
                    )
                )
                outs.append((children[-1], out))
        else:
            assert servers.kafka is not None
            out = workdir / f"{target}-{case}-consumer-{run}.json"
            argv = _py(
                "bench.fleet_observer",
                "--mode",
                "kafka",
                *common,
                "--rooms",
                ",".join(rooms),
                "--kafka",
                servers.kafka.bootstrap,
                "--kafka-topic",
                kafka_topic,
                "--partitions",
                str(args.kafka_partitions),
                "--out",
                str(out),
            )
            children.append(
                await Child.start(
                    "consumer",
                    argv,
                    workdir,
                    control=True,
                    log_name=f"{target}-{case}-consumer",
                )
            )
            outs.append((children[-1], out))
        await asyncio.gather(*(c.expect("ready", args.ready_timeout) for c in children))
        # --- probes: every path of every room carries traffic before the clock starts
        await _probe(children, rooms, args, case)
        # --- the measured window
        shares = (
            [target] if len(replicas) <= 1 else [f"{target}-r{i}" for i in range(len(replicas))]
        )
        pids = (
            {target: target_child.proc.pid}
            if len(replicas) <= 1
            else {name: child.proc.pid for name, child in zip(shares, replicas, strict=True)}
        )
        pids.update({c.name: c.proc.pid for c in children})
        pids["livekit-server"] = lk.process.pid
        if case == "fleet":
            pids["mosquitto"] = servers.mosquitto.process.pid
        elif servers.kafka is not None:
            pids["kafka"] = servers.kafka.process.pid
        # The generators stop probing at once; the target's idle cost is sampled before t0.
        idle_from = time.monotonic() + 1.0
        t0 = idle_from + args.idle
        for child in children:
            child.send(f"start {int(t0 * 1e9)}")
        await asyncio.sleep(max(0.0, idle_from - time.monotonic()))
        idle_before = _sum_cpu([pids[name] for name in shares])
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        idle_after = _sum_cpu([pids[name] for name in shares])
        if idle_before is not None and idle_after is not None and args.idle > 0:
            result.target_idle_share = (idle_after - idle_before) / (t0 - idle_from)
        if args.profile:
            target_child.proc.send_signal(signal.SIGUSR1)
        before = {name: proc_cpu(pid) for name, pid in pids.items()}
        machine_before = machine_cpu()
        wall_before = time.monotonic()
        await asyncio.sleep(max(0.0, t0 + duration - time.monotonic()))
        after = {name: proc_cpu(pid) for name, pid in pids.items()}
        machine_after = machine_cpu()
        window = time.monotonic() - wall_before
        result.window_s = window
        if args.profile:
            target_child.proc.send_signal(signal.SIGUSR2)
        for name, pid in pids.items():
            start, end = before[name], after[name]
            cpu = (end - start) if start is not None and end is not None else float("nan")
            rss, hwm = proc_rss_mb(pid)
            result.processes.append(ProcessUse(name, cpu, cpu / window, rss, hwm))
        ours = sum(p.cpu_s for p in result.processes if p.cpu_s == p.cpu_s)
        busy = machine_after[0] - machine_before[0]
        result.machine_busy_cores = busy / window
        result.processes.append(
            ProcessUse("other (not this bench)", busy - ours, (busy - ours) / window, 0, 0)
        )
        # --- drain and collect
        await asyncio.gather(*(c.expect("done", duration + args.drain_max + 60) for c in children))
        results = [json.loads(path.read_text()) for _, path in outs]
        relay_stats: dict[str, Any] = {}
        if target == "relay" and target_child is not None:
            target_child.send("quit")
            with contextlib.suppress(TimeoutError, RuntimeError):
                await target_child.expect("done", 20)
                relay_path = workdir / f"relay-{case}.json"
                relay_stats = json.loads(relay_path.read_text())
        result.directions = _directions(case, target, results, duration)
        forwarded = sum(d.in_window for d in result.directions)
        target_uses = [p for p in result.processes if p.name in shares]
        target_cpu = sum(p.cpu_s for p in target_uses)
        result.target_cpu_us_per_msg = target_cpu / max(forwarded, 1) * 1e6
        result.target_rss_mb = sum(p.rss_mb for p in target_uses)
        for r in results:
            result.notes.extend(r.get("notes", []))
        if relay_stats.get("errors"):
            result.notes.append(f"relay errors: {relay_stats['errors']}")
    except Exception as exc:  # noqa: BLE001 - a failed target is reported, the next one runs
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for child in children:
            child.send("quit")
        await asyncio.gather(*(c.stop(grace=10) for c in children), return_exceptions=True)
        for child in replicas if target == "bridge" else [target_child] if target_child else []:
            rc = await child.stop()
            if target == "bridge" and rc not in (0, None):
                result.notes.append(f"{child.name} exit status {rc}: {child.log_tail(6)}")
            elif target == "bridge":
                warnings = [
                    line
                    for line in child.log_path.read_text(errors="replace").splitlines()
                    if " ERROR " in line or "Traceback" in line
                ]
                if warnings:
                    result.notes.append(
                        f"{child.name} logged {len(warnings)} ERROR lines: {warnings[0]}"
                    )
    return result


async def _probe(
    children: list[Child], rooms: list[str], args: argparse.Namespace, case: str
) -> None:
    """Send probes until every room's paths are seen end to end (they are not counted)."""
    want = {f"room:{r}" for r in rooms}
    if case == "fleet":
        # Each room's first device must get a command back, too.
        want |= {f"device:{device_name(i)}" for i in range(min(args.rooms, args.devices))}
    for child in children:
        child.send("probe")
    merged: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def forward(child: Child) -> None:
        while True:
            event = await child.events.get()
            if event["ev"] == "exit":
                event = {"ev": "exit", "what": f"{child.name} exited: {child.log_tail()}"}
            await merged.put(event)

    tasks = [asyncio.create_task(forward(c)) for c in children]
    try:
        async with asyncio.timeout(args.ready_timeout):
            while want:
                event = await merged.get()
                if event["ev"] == "seen":
                    want.discard(str(event["what"]))
                elif event["ev"] == "exit":
                    raise RuntimeError(str(event["what"]))
    except TimeoutError:
        raise RuntimeError(
            f"probes not seen within {args.ready_timeout:.0f} s: {sorted(want)[:6]}"
        ) from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Forwarded events are consumed; nothing after `seen` matters before `start`.


def _directions(
    case: str, target: str, results: list[dict[str, Any]], window: float
) -> list[Direction]:
    def merge(key: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for r in results:
            merged.update(r.get(key, {}))
        return merged

    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in results)

    if case == "fleet":
        return [
            analyse(
                target,
                "MQTT→room (telemetry)",
                merge("telemetry_sent"),
                total("telemetry_acked"),
                merge("telemetry_seen"),
                window,
            ),
            analyse(
                target,
                "room→MQTT (commands)",
                merge("commands_sent"),
                total("commands_acked"),
                merge("commands_seen"),
                window,
            ),
        ]
    return [
        analyse(
            target,
            "room→Kafka (text streams)" if case == "text-kafka" else "room→Kafka (packets)",
            merge("kafka_sent"),
            total("kafka_acked"),
            merge("kafka_seen"),
            window,
        )
    ]


# ----------------------------------------------------------------------------- report


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def render(runs: list[TargetRun], args: argparse.Namespace) -> str:
    """The Markdown report."""

    def load(case: str) -> str:
        if case == "fleet":
            return (
                f"fleet: {args.devices} devices x {args.rooms} rooms x {args.rate:g} msg/s for "
                f"{args.duration:g} s, commands {args.cmd_rate:g}/s per room, {args.size} B"
            )
        if case == "text-kafka":
            return (
                f"text-kafka: {args.rooms} rooms, {args.text_rate:g} send_text/s in total for "
                f"{args.kafka_duration:g} s, {args.text_size} characters, "
                f"{args.text_window} in flight per room"
            )
        return (
            f"room-kafka: {args.rooms} rooms, {args.kafka_rate:g} msg/s in total for "
            f"{args.kafka_duration:g} s, {args.size} B"
        )

    lines = [
        f"# fleet_bench ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "; ".join(load(case) for case in dict.fromkeys(r.case for r in runs))
        + f"; {os.cpu_count()} cores.",
        "",
    ]
    for run in runs:
        if run.error:
            lines.append(f"**{run.case} / {run.target}: failed**: {run.error}")
            lines.append("")
    lines += [
        "| case | target | direction | sent | acked | delivered | lost | dup | ooo "
        "| p50 ms | p99 ms | max ms | max gap ms | msg/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for d in run.directions:
            lines.append(
                f"| {run.case} | {run.target} | {d.direction} | {d.sent} | {d.acked} "
                f"| {d.delivered} | {d.lost} | {d.duplicated} | {d.out_of_order} "
                f"| {_f(d.p50_ms)} | {_f(d.p99_ms)} | {_f(d.max_ms)} | {_f(d.max_gap_ms, 0)} "
                f"| {_f(d.rate, 0)} |"
            )
    lines += [
        "",
        "| case | hot path | bridge µs/msg | relay µs/msg | bridge/relay | bridge idle % "
        "| relay idle % | bridge RSS MB | relay RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in dict.fromkeys(r.case for r in runs):
        by = {r.target: r for r in runs if r.case == case and not r.error}
        b, r = by.get("bridge"), by.get("relay")
        path = {
            "fleet": "MQTT→room (+ commands)",
            "room-kafka": "room packet→Kafka",
            "text-kafka": "text stream→Kafka",
        }[case]
        bu = b.target_cpu_us_per_msg if b else float("nan")
        ru = r.target_cpu_us_per_msg if r else float("nan")
        ratio = bu / ru if b and r else float("nan")
        b_rss = b.target_rss_mb if b else float("nan")
        r_rss = r.target_rss_mb if r else float("nan")
        b_idle = b.target_idle_share * 100 if b else float("nan")
        r_idle = r.target_idle_share * 100 if r else float("nan")
        lines.append(
            f"| {case} | {path} | {_f(bu, 0)} | {_f(ru, 0)} | {_f(ratio, 2)} "
            f"| {_f(b_idle)} | {_f(r_idle)} | {_f(b_rss)} | {_f(r_rss)} |"
        )
    lines += ["", "CPU share of one core over the load window (and RSS at its end):", ""]
    for run in runs:
        if run.error or not run.processes:
            continue
        lines.append(
            f"- **{run.case} / {run.target}** (window {run.window_s:.1f} s, machine busy "
            f"{run.machine_busy_cores:.2f} of {os.cpu_count()} cores): "
            + ", ".join(
                f"{p.name} {p.share * 100:.0f} %" + (f" ({p.rss_mb:.0f} MB)" if p.rss_mb else "")
                for p in run.processes
            )
        )
        for note in run.notes:
            lines.append(f"  - note: {note}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    """Start the servers, run every case against every target, report; the exit status."""
    if not os.environ.get("ROOMBUS_NETNS"):
        print(
            "fleet_bench: run inside the test namespace: "
            "scripts/netns .venv/bin/python -m bench.fleet_bench"
        )
        return 2
    from tests.services import Kafka, LiveKitServer, Mosquitto

    cases = ["fleet", *KAFKA_CASES] if args.case == "all" else [args.case]
    keep = Path(args.workdir) if args.workdir else None
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        lk = LiveKitServer(
            name="livekit-fleet-bench",
            workdir=workdir / "livekit",
            port=args.port,
            udp_port=args.port + 2,
            turn_port=args.port + 4,
        )
        mq = Mosquitto(name="mosquitto-fleet-bench", workdir=workdir / "mqtt", port=args.mqtt_port)
        kafka = None
        if any(case in KAFKA_CASES for case in cases) or args.replicas > 1:
            kafka = Kafka(
                name="kafka-fleet-bench",
                workdir=workdir / "kafka",
                port=args.kafka_port,
                controller_port=args.kafka_port + 1,
            )
        started: list[Any] = []
        runs: list[TargetRun] = []
        try:
            for service in (lk, mq, kafka):
                if service is not None:
                    await asyncio.to_thread(service.start)
                    started.append(service)
            servers = Servers(lk, mq, kafka)
            for case in cases:
                for target in args.targets:
                    print(f"fleet_bench: {case} / {target} ...", file=sys.stderr, flush=True)
                    runs.append(await run_target(args, servers, case, target, workdir))
                    if runs[-1].error:
                        print(
                            f"fleet_bench: {case} / {target} failed: {runs[-1].error}",
                            file=sys.stderr,
                        )
        finally:
            for service in reversed(started):
                await asyncio.to_thread(service.stop)
        report = render(runs, args)
        print(report)
        if args.report:
            await asyncio.to_thread(Path(args.report).write_text, report)
        if args.json:
            figures = json.dumps([asdict(r) for r in runs], indent=1, default=str)
            await asyncio.to_thread(Path(args.json).write_text, figures)
        if keep:
            print(f"fleet_bench: logs in {workdir}", file=sys.stderr)
        bad = any(r.error or any(d.lost or d.out_of_order for d in r.directions) for r in runs)
        return 1 if bad else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick`` overrides the sizes with a small preset)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--case", choices=["fleet", *KAFKA_CASES, "all"], default="all")
    p.add_argument("--targets", nargs="+", choices=["bridge", "relay"], default=["bridge", "relay"])
    p.add_argument("--quick", action="store_true", help="20 devices x 4 rooms x 5 msg/s x 15 s")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="bridge processes sharing the rooms (bridge.replicas on the bench's Kafka)",
    )
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--rate", type=float, default=5.0, help="msg/s per device")
    p.add_argument("--duration", type=float, default=120.0, help="fleet load seconds")
    p.add_argument("--cmd-rate", type=float, default=1.0, help="commands/s per room")
    p.add_argument("--kafka-rate", type=float, default=500.0, help="room→Kafka msg/s in total")
    p.add_argument("--kafka-duration", type=float, default=60.0, help="room→Kafka load seconds")
    p.add_argument("--kafka-partitions", type=int, default=4)
    p.add_argument("--text-rate", type=float, default=100.0, help="text-kafka send_text/s in total")
    p.add_argument("--text-size", type=int, default=200, help="text-kafka characters per stream")
    p.add_argument(
        "--text-window",
        type=int,
        default=1,
        help="send_text calls in flight per room (1: the SDK cannot reorder them)",
    )
    p.add_argument("--size", type=int, default=128, help="message bytes (header + padding)")
    p.add_argument("--devices-per-process", type=int, default=50)
    p.add_argument("--rooms-per-observer", type=int, default=4)
    p.add_argument(
        "--drain-quiet", type=float, default=2.0, help="seconds without arrivals = drained"
    )
    p.add_argument("--drain-max", type=float, default=15.0, help="drain seconds at most")
    p.add_argument("--ready-timeout", type=float, default=90.0)
    p.add_argument("--idle", type=float, default=3.0, help="seconds of idle sampling before t0")
    p.add_argument("--bridge-log-level", default="warning")
    p.add_argument(
        "--bridge-cmd",
        default="",
        help=f"command that runs the bridge (default {ROOMBUS}; 'run CONFIG' is appended)",
    )
    p.add_argument("--port", type=int, default=7960, help="livekit-server port (+2 UDP, +4 TURN)")
    p.add_argument("--mqtt-port", type=int, default=18850)
    p.add_argument("--kafka-port", type=int, default=19392, help="Kafka port (+1 controller)")
    p.add_argument("--health-port", type=int, default=18191, help="the bridge's /ready port")
    p.add_argument(
        "--profile",
        help="cProfile (CPU time) each target over the load window into DIR/<target>-<case>.prof",
    )
    p.add_argument("--report", help="also write the Markdown report here")
    p.add_argument("--json", help="write every figure as JSON here")
    p.add_argument("--workdir", help="keep configs, logs and result files here")
    if p.parse_known_args(argv)[0].quick:  # the preset changes defaults; flags still win
        p.set_defaults(devices=20, rooms=4, rate=5.0, duration=15.0, kafka_rate=100.0)
        p.set_defaults(kafka_duration=15.0)
    args = p.parse_args(argv)
    if args.size < HEADER.size:
        p.error(f"--size must be at least {HEADER.size}")
    if args.text_size < HEADER.size * 2:
        p.error(f"--text-size must be at least {HEADER.size * 2} (the header in hex)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
