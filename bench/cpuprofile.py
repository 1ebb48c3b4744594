"""Run a Python module under cProfile timed by CPU, switched on and off by signals.

``python -m bench.cpuprofile OUT -- MODULE [ARGS...]`` runs ``MODULE`` as ``python -m`` would.
SIGUSR1 starts the profiler, SIGUSR2 stops it and writes OUT (`pstats` format). The timer is
the process's CPU time (`time.process_time`), so waiting in epoll or being descheduled on a busy
machine does not count: a wall-clock sampler (py-spy) charges a process for the time it waited
for a core after a ``sendto`` woke its peer, which on a saturated 2-core machine made one UDP
send look like 100 µs (it costs about 4). cProfile's own cost inflates small calls, so read the
profile for where the time goes, not for how much the process needs.

`bench.fleet_bench --profile DIR` uses this for both targets, over the load window.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
import time
from types import FrameType


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m bench.cpuprofile OUT -- MODULE [ARGS...]")
    out, module, args = argv[0], argv[2], argv[3:]
    profiler = cProfile.Profile(time.process_time)

    def start(_sig: int, _frame: FrameType | None) -> None:
        profiler.enable()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = [module, *args]
    # As `python -m` does: the working directory first (run as a script, sys.path[0] is bench/).
    sys.path[0] = os.getcwd()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
