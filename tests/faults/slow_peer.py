"""A slow LiveKit subscriber in a process of its own (R8): an official-SDK participant that
spends `--work` seconds of blocking work on every packet it receives, so that it falls behind
while the test process (and its fast peers) stay unaffected.

    python -m tests.faults.slow_peer URL TOKEN --work 0.02 --seconds 30

Prints {"packets": N} (the count so far) every second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from livekit import rtc


async def main(url: str, token: str, work: float, seconds: float) -> int:
    room = rtc.Room()
    count = 0

    def on_data(_packet: rtc.DataPacket) -> None:
        nonlocal count
        count += 1
        time.sleep(work)

    room.on("data_received", on_data)
    await room.connect(url, token)
    print(json.dumps({"joined": True}), flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # the count so far, every second (it may be terminated)
        await asyncio.sleep(1)
        print(json.dumps({"packets": count}), flush=True)
    await room.disconnect()
    print(json.dumps({"packets": count}), flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("token")
    p.add_argument("--work", type=float, default=0.02)
    p.add_argument("--seconds", type=float, default=30)
    a = p.parse_args()
    sys.exit(asyncio.run(main(a.url, a.token, a.work, a.seconds)))
