"""Reliability scenarios of bridge-expectations (f): each fault under load, judged by a checker.

* `checker.py`: the test header `(run, source, key, seq, t_send)`, a `Leg` per direction, and
  the verdict: lost / unacknowledged / duplicated / unexpected / out of order per key, recovery
  and drain per fault, latency; deliberate drops against the bridge's counters.
* `proxy.py`: the asyncio TCP fault proxy (down, reset, blackhole, latency with jitter,
  bandwidth, sliced writes).
* `harness.py`: the bridge as a process (SIGKILL, SIGTERM, restart with the same state, its
  /metrics), loads and collectors on MQTT, Kafka and in the room, packet faults with iptables.
* `test_*.py`: R1-R9 and R11, each with its expected figures in its docstring; short versions
  by default (CI), long ones with `$ROOMBUS_FAULTS_FULL=1` (`scripts/faults --full`).
* `report.py`: the Markdown report (`scripts/faults --report docs/reliability.md`).
"""
