"""The reliability checker of the fault scenarios (bridge-expectations (f), how results are
judged).

Every test message carries `(run, source, key, seq, t_send)` (`stamp` / `parse`: a small JSON
object, so it passes unchanged through every `format` of the bridge, padded to a size). A `Leg`
is one direction of one scenario (e.g. MQTT → room): its sender records what it sent and which
messages were *acknowledged* under the bridge's contract, its receiver what arrived, and the
scenario the windows of its faults. `Leg.check()` sorts the messages, per key, into

* **lost**: acknowledged and never delivered (what the bridge promises against),
* **unacknowledged missing**: sent but never acknowledged (e.g. what LiveKit dropped while the
  bridge was away — best effort upstream of the bridge), and never delivered: reported, not blamed,
* **duplicated**: extra copies of a delivered message (allowed on at-least-once paths, reported),
* **unexpected**: deliveries of this run that no sender sent (or of another key/source),
* **out of order**: first deliveries that arrived after a later message of the same key,

and measures per fault the **recovery** (first delivery after the fault ended) and the **drain**
(when the last message sent before the fault's end arrived), both from the fault's end, plus the
latency quantiles. Deliberate drops are compared with the bridge's own counters by the
scenario (`Result.accounted`): "nothing unaccounted" means the checker's count of a kind of drop
equals the counter the bridge keeps for it.

The checker never fails a test itself; scenarios assert on the `Result` and write it (as JSON)
for `scripts/faults`' report.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Id = tuple[str, int]  # (key, seq)


def run_id() -> str:
    return uuid.uuid4().hex[:8]


def stamp(run: str, source: str, key: str, seq: int, size: int = 0) -> bytes:
    """The test header as a JSON object, padded with a `pad` field to at least `size` bytes."""
    head = {"r": run, "s": source, "k": key, "q": seq, "t": time.time()}
    data = json.dumps(head, separators=(",", ":")).encode()
    if len(data) < size:
        head["pad"] = "." * (size - len(data) - 9)
        data = json.dumps(head, separators=(",", ":")).encode()
    return data


@dataclass(frozen=True)
class Header:
    run: str
    source: str
    key: str
    seq: int
    t_send: float


def parse(data: bytes | str) -> Header | None:
    """The header of a test message, or None for anything else."""
    try:
        head = json.loads(data)
        return Header(str(head["r"]), str(head["s"]), str(head["k"]), int(head["q"]), head["t"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Fault:
    """One injected fault: what, and when it started and ended (time.time())."""

    name: str
    start: float
    end: float = 0.0


@dataclass
class FaultFigures:
    name: str
    duration_s: float
    recovery_s: float | None  # first delivery after the fault ended (None: nothing came)
    drain_s: float | None  # last delivery of a message sent before the end, after the end
    sent_after: bool = True  # whether anything was sent after the end (else no recovery to see)


@dataclass
class Result:
    """What one leg of one scenario measured (the report's row)."""

    scenario: str
    leg: str
    fault: str
    load: str
    sent: int
    acknowledged: int
    delivered: int
    lost: int
    unacknowledged_missing: int
    duplicated: int
    unexpected: int
    out_of_order: int
    faults: list[FaultFigures]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    accounted: dict[str, dict[str, int]] = field(default_factory=dict)  # drop: checker, counter
    notes: list[str] = field(default_factory=list)
    lost_sample: list[Id] = field(default_factory=list)
    out_of_order_sample: list[str] = field(default_factory=list)
    expected: str = ""
    verdict: str = ""

    def account(self, what: str, checker: int, counter: int) -> None:
        """Record a deliberate drop: the checker's count and the bridge's counter for it."""
        self.accounted[what] = {"checker": checker, "counter": counter}

    def summary(self) -> str:
        rec = ", ".join(
            f"{f.name}: recovery {_s(f.recovery_s)} drain {_s(f.drain_s)}" for f in self.faults
        )
        acc = ", ".join(f"{k} {v['checker']}={v['counter']}" for k, v in self.accounted.items())
        return (
            f"[{self.scenario} {self.leg}] sent {self.sent}, acknowledged {self.acknowledged},"
            f" delivered {self.delivered}, lost {self.lost}, unacked-missing"
            f" {self.unacknowledged_missing}, duplicated {self.duplicated}, unexpected"
            f" {self.unexpected}, out of order {self.out_of_order}; p50/p99/max"
            f" {_ms(self.latency_p50_ms)}/{_ms(self.latency_p99_ms)}/{_ms(self.latency_max_ms)}"
            + (f"; {rec}" if rec else "")
            + (f"; drops {acc}" if acc else "")
            + (f"; {'; '.join(self.notes)}" if self.notes else "")
            + (
                f"; out of order: {', '.join(self.out_of_order_sample)}"
                if self.out_of_order
                else ""
            )
        )

    def write(self) -> None:
        """Print the summary; with $ROOMBUS_FAULTS_RESULTS, also save it there as JSON."""
        print(self.summary())
        out = os.environ.get("ROOMBUS_FAULTS_RESULTS")
        if out:
            path = Path(out)
            path.mkdir(parents=True, exist_ok=True)
            name = f"{self.scenario}-{self.leg}-{uuid.uuid4().hex[:6]}.json".replace("/", "_")
            (path / name).write_text(json.dumps(asdict(self), indent=1))


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Leg:
    """One direction of a scenario: what was sent and acknowledged, what arrived, the faults.

    Thread-safe: paho's callbacks record from their own threads.
    """

    def __init__(self, scenario: str, leg: str, run: str | None = None) -> None:
        self.scenario = scenario
        self.name = leg
        self.run = run or run_id()
        self.source = f"{scenario}/{leg}"
        self._lock = threading.Lock()
        self.sent: dict[Id, float] = {}
        self.acked: set[Id] = set()
        self.received: list[tuple[Id, float, float]] = []  # (id, t_send, t_recv) in order
        self.unexpected = 0
        self.foreign = 0  # other runs' messages (not counted)
        self.faults: list[Fault] = []
        # Windows in which sends are not acknowledged by the contract (the bridge was not in
        # the room: LiveKit holds nothing for absent participants).
        self.unacked_windows: list[tuple[float, float]] = []
        self._seq: dict[str, int] = defaultdict(int)
        self.last_delivery = 0.0  # time.monotonic() of the latest delivery

    # sender side -----------------------------------------------------------------------------
    def next(self, key: str, size: int = 0) -> tuple[Id, bytes]:
        """A new message for `key`: its id and payload; recorded as sent."""
        with self._lock:
            seq = self._seq[key]
            self._seq[key] = seq + 1
        payload = stamp(self.run, self.source, key, seq, size)
        with self._lock:
            self.sent[(key, seq)] = time.time()
        return (key, seq), payload

    def ack(self, mid: Id) -> None:
        with self._lock:
            self.acked.add(mid)

    # receiver side ---------------------------------------------------------------------------
    def deliver(self, data: bytes | str, t_recv: float | None = None) -> None:
        head = parse(data)
        now = time.time() if t_recv is None else t_recv
        with self._lock:
            if head is None or head.run != self.run:
                self.foreign += 1
                return
            if head.source != self.source:
                self.unexpected += 1
                return
            self.received.append(((head.key, head.seq), head.t_send, now))
            self.last_delivery = time.monotonic()

    # faults -----------------------------------------------------------------------------------
    def fault(self, name: str) -> Fault:
        f = Fault(name, time.time())
        self.faults.append(f)
        return f

    def unacked_window(self, start: float, end: float) -> None:
        self.unacked_windows.append((start, end))

    def delivered_ids(self) -> set[Id]:
        with self._lock:
            return {mid for mid, _, _ in self.received}

    def acknowledged(self) -> set[Id]:
        """The acknowledged messages: acked by their sender, outside the unacked windows."""
        with self._lock:
            acked = set(self.acked)
            sent = dict(self.sent)
        return {
            mid
            for mid in acked
            if not any(a <= sent.get(mid, 0.0) <= b for a, b in self.unacked_windows)
        }

    def missing_acked(self) -> set[Id]:
        return self.acknowledged() - self.delivered_ids()

    def seen_all_acked(self) -> bool:
        return not self.missing_acked()

    # verdict ----------------------------------------------------------------------------------
    def check(self, *, fault: str, load: str, expected: str = "") -> Result:
        # A send inside an unacknowledged window is not acknowledged whatever the sender saw.
        acked = self.acknowledged()
        with self._lock:
            sent = dict(self.sent)
            received = list(self.received)
        copies: dict[Id, int] = defaultdict(int)
        first: list[tuple[Id, float, float]] = []
        unexpected = self.unexpected
        for mid, t_send, t_recv in received:
            if mid not in sent:
                unexpected += 1
                continue
            copies[mid] += 1
            if copies[mid] == 1:
                first.append((mid, t_send, t_recv))
        top: dict[str, int] = {}
        out_of_order = 0
        disorder: list[str] = []
        for (key, seq), _, _ in first:
            if seq < top.get(key, -1):
                out_of_order += 1
                if len(disorder) < 10:
                    disorder.append(f"{key}:{seq} after {top[key]}")
            else:
                top[key] = seq
        delivered = set(copies)
        lost = sorted(acked - delivered)
        latencies = sorted((t_recv - t_send) * 1000 for _, t_send, t_recv in first)
        figures = []
        for f in self.faults:
            end = f.end or f.start
            after = [t_recv for _, _, t_recv in received if t_recv >= end]
            before_end = [t_recv for _, t_send, t_recv in first if t_send <= end]
            figures.append(
                FaultFigures(
                    f.name,
                    round(end - f.start, 2),
                    round(min(after) - end, 2) if after else None,
                    round(max(0.0, max(before_end) - end), 2) if before_end else None,
                    any(t >= end for t in sent.values()),
                )
            )
        return Result(
            scenario=self.scenario,
            leg=self.name,
            fault=fault,
            load=load,
            sent=len(sent),
            acknowledged=len(acked),
            delivered=len(delivered),
            lost=len(lost),
            unacknowledged_missing=len(set(sent) - acked - delivered),
            duplicated=sum(c - 1 for c in copies.values()),
            unexpected=unexpected,
            out_of_order=out_of_order,
            faults=figures,
            latency_p50_ms=round(quantile(latencies, 0.5), 1) if latencies else None,
            latency_p99_ms=round(quantile(latencies, 0.99), 1) if latencies else None,
            latency_max_ms=round(latencies[-1], 1) if latencies else None,
            lost_sample=lost[:20],
            out_of_order_sample=disorder,
            expected=expected,
        )


def load_results(directory: Path) -> list[dict[str, Any]]:
    """The results a run wrote (for the report), in scenario order."""
    out = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]

    def order(r: dict[str, Any]) -> tuple[int, str, str]:
        digits = "".join(c for c in r["scenario"][1:3] if c.isdigit())
        return (int(digits or 99), r["scenario"], r["leg"])

    return sorted(out, key=order)
