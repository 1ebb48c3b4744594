"""The Markdown report of a fault run: `python -m tests.faults.report RESULTS_DIR [--out FILE]`.

`scripts/faults` runs the scenarios with `$ROOMBUS_FAULTS_RESULTS` set (each leg writes its
`checker.Result` there as JSON, the soak its samples) and then calls this: one table row per
scenario and leg (fault, load, acknowledged / delivered / lost / duplicated, recovery, verdict),
the deliberate drops against the bridge's counters, the notes, and the soak's figures. With
`--out FILE`, whatever FILE holds below the `KEEP` marker (the findings) is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.faults.checker import load_results

ROOT = Path(__file__).resolve().parents[2]
KEEP = "<!-- hand-written below: kept when scripts/faults --report rewrites this file -->"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.node()}: {os.cpu_count()} cores {cpu}{mem}, {platform.platform()}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _recovery(r: dict[str, Any]) -> str:
    faults = r["faults"]
    if not faults:
        return "-"
    rec = [f["recovery_s"] for f in faults if f["recovery_s"] is not None]
    drain = [f["drain_s"] for f in faults if f["drain_s"] is not None]
    missing = sum(1 for f in faults if f["recovery_s"] is None and f.get("sent_after", True))
    text = f"{max(rec):.1f} s" if rec else ("none" if missing else "n/a (load ended)")
    if drain:
        text += f" (drain {max(drain):.1f} s)"
    if missing:
        text += f", {missing} never"
    return text


def render(results: list[dict[str, Any]], soak: list[dict[str, Any]], full: bool) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
    lines = [
        "# Reliability report",
        "",
        f"Run {now}, commit `{commit}`{dirty}, {'full' if full else 'short (CI)'} versions, on"
        f" {_machine()}. Produced by `scripts/faults{' --full' if full else ''}` (the"
        " scenarios are `tests/faults/`; how results are judged: bridge-expectations (f)).",
        "",
        "*Acknowledged*: an MQTT message PUBACKed by the broker to the test publisher (the bridge"
        " holds a persistent QoS 1 session); a room packet received by the bridge participant"
        " (sends from 1 s before the bridge left until 1 s after it was back are not"
        " acknowledged: LiveKit holds nothing for absent participants). *Lost*: acknowledged,"
        " never delivered. *Recovery*: the longest, over the scenario's faults, from the end of"
        " a fault to the first delivery after it; *drain*: until the last message sent before"
        " the end arrived.",
        "",
        "| scenario | leg | fault | load | acknowledged | delivered | lost | duplicated |"
        " out of order | p99 ms | recovery | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['leg']} | {r['fault']} | {r['load']} | {r['acknowledged']}"
            f" | {r['delivered']} | {r['lost']} | {r['duplicated']} | {r['out_of_order']} |"
            f" {_s(r['latency_p99_ms'])} | {_recovery(r)} | {r['verdict']} |"
        )
    lines += ["", "## Deliberate drops against the bridge's counters", ""]
    drops = [(r, k, v) for r in results for k, v in r.get("accounted", {}).items()]
    if not drops:
        lines.append("No scenario of this run dropped on purpose.")
    else:
        lines += ["| scenario | leg | drop | checker | bridge counter |", "|---|---|---|---|---|"]
        for r, k, v in drops:
            lines.append(
                f"| {r['scenario']} | {r['leg']} | {k} | {v['checker']} | {v['counter']} |"
            )
    lines += ["", "## Expected figures and notes", ""]
    for r in results:
        note = "; ".join(r.get("notes", []))
        extra = (
            f" Out of order: {', '.join(r['out_of_order_sample'])}."
            if r.get("out_of_order_sample")
            else ""
        )
        lines.append(
            f"- **{r['scenario']} {r['leg']}**: expected {r['expected']}."
            + (f" {note}." if note else "")
            + (
                f" Unacknowledged and missing: {r['unacknowledged_missing']}."
                if r["unacknowledged_missing"]
                else ""
            )
            + extra
        )
    if soak:
        lines += ["", "## Soak", ""]
        for s in soak:
            lines += _soak(s)
    return "\n".join(lines) + "\n"


def _soak(s: dict[str, Any]) -> list[str]:
    out = [
        f"{s['load']}; faults: {', '.join(s['faults']) or 'none'}.",
        "",
        "| window | RSS MB (end) | RSS growth MB | fds | threads | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for w in s["windows"]:
        out.append(
            f"| {w['name']} | {w['rss_mb']:.1f} | {w['growth_mb']:+.1f} | {w['fds']} |"
            f" {w['threads']} | {_s(w['p99_ms'])} |"
        )
    out += ["", s.get("summary", ""), ""]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--full", action="store_true")
    args = p.parse_args(argv)
    soak = [json.loads(x.read_text()) for x in sorted(args.results.glob("soak-*.data"))]
    text = render(load_results(args.results), soak, args.full)
    if args.out:
        # What people wrote below the marker (findings, causes) survives a new report.
        if args.out.exists():
            old = args.out.read_text()
            if KEEP in old:
                text += "\n" + KEEP + old.split(KEEP, 1)[1]
        args.out.write_text(text)
        print(f"faults: report written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
