"""Hot reload, the decision: what a new configuration changes, connector by connector.

`plan_reload(old, new)` compares two *validated* configurations and says which connectors
were added, removed or changed (by name: a connector is its name), which rooms to join and to
leave, and what cannot change without a restart. The `Bridge` applies a plan that needs no
restart (`Bridge.reload`); one that does is refused as a whole and the bridge keeps running on
the old configuration.

Needs a restart, because a running bridge holds it in long-lived state:
* the LiveKit section except ``rooms`` (identity, URL, credentials, token: every room's
  connection was made with them; room patterns: the discovery loop);
* a change to a bus connection that is in use (its address, credentials, client id, TLS):
  every route of that bus shares the connection (a new bus, or dropping an unused one, is fine);
* the ``bridge`` runtime settings (queue sizes, spool, in-flight limits, the HTTP port);
* routes that need a token grant the rooms were joined without (`bridge.runtime.grants`);
* RPC connectors, in either direction: calls in progress, the reply cache and the
  reply-topic subscriptions span them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bridge.config import Config, ConnectorConfig, RoomFrom
from bridge.runtime.grants import Grants, needed_grants


@dataclass(frozen=True)
class ReloadPlan:
    """What applying a new configuration does (see the module docstring)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    rooms_joined: tuple[str, ...] = ()
    rooms_left: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()  # one line per change that a reload cannot apply

    @property
    def empty(self) -> bool:
        """Nothing to do: the new configuration runs as the old one does."""
        return not (
            self.added or self.removed or self.changed or self.rooms_joined or self.rooms_left
        )

    def summary(self) -> str:
        """One line for the log."""
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("joining", self.rooms_joined),
                ("leaving", self.rooms_left),
            )
            if names
        ]
        return "; ".join(parts) or "no changes"


class ReloadRefused(Exception):
    """The new configuration needs a restart (or is invalid); the old one keeps running.

    Attributes:
        problems: One line each, located where the file gives a location.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def plan_reload(old: Config, new: Config, running: Grants | None = None) -> ReloadPlan:
    """What reloading from `old` to `new` does, and what of it needs a restart.

    `running`: the grants of the rooms' tokens (default: what `old` needs).
    """
    restart = list(_livekit_changes(old, new))
    lacking = needed_grants(new).missing(running or needed_grants(old))
    if lacking:
        restart.append(f"connectors: the new routes need the token grants {', '.join(lacking)}")
    restart += _bus_changes("mqtt", old.mqtt, new.mqtt, _buses_in_use(old, "mqtt"))
    restart += _bus_changes("kafka", old.kafka, new.kafka, _buses_in_use(old, "kafka"))
    restart += [f"bridge.{path}: changed" for path in _diff(old.bridge, new.bridge)]
    before = {c.name: c for c in old.connectors}
    after = {c.name: c for c in new.connectors}
    added = tuple(n for n in after if n not in before)
    removed = tuple(n for n in before if n not in after)
    changed = tuple(n for n in after if n in before and after[n] != before[n])
    for name in (*added, *removed, *changed):
        connector = after.get(name) or before[name]
        if _is_rpc(connector) or (name in before and _is_rpc(before[name])):
            restart.append(f"connectors.{name}: an RPC connector (added, removed or changed)")
    old_rooms, new_rooms = old.livekit.rooms, new.livekit.rooms
    return ReloadPlan(
        added=added,
        removed=removed,
        changed=changed,
        rooms_joined=tuple(r for r in new_rooms if r not in old_rooms),
        rooms_left=tuple(r for r in old_rooms if r not in new_rooms),
        needs_restart=tuple(f"{line} (needs a restart)" for line in restart),
    )


def _is_rpc(connector: ConnectorConfig) -> bool:
    source = connector.from_
    if isinstance(source, RoomFrom) and source.rpc is not None:
        return True
    return getattr(connector.to, "kind", None) == "rpc"


def _livekit_changes(old: Config, new: Config) -> Iterator[str]:
    for path in _diff(old.livekit, new.livekit):
        if path != "rooms" and not path.startswith("rooms."):
            yield f"livekit.{path}: changed"


def _buses_in_use(config: Config, bus: str) -> set[str]:
    """Names of the `bus` ("mqtt" or "kafka") connections some connector of `config` uses."""
    used: set[str] = set()
    for connector in config.connectors:
        for end in (connector.from_, connector.to, connector.dead_letter):
            name = getattr(end, bus, None)
            if isinstance(name, str):
                used.add(name)
    return used


def _bus_changes(
    bus: str, old: Mapping[str, BaseModel], new: Mapping[str, BaseModel], in_use: set[str]
) -> list[str]:
    out: list[str] = []
    for name in sorted(in_use):
        if name not in new:
            continue  # the new file's connectors do not use it (validated): dropped with them
        out += [f"{bus}.{name}.{path}: changed" for path in _diff(old[name], new[name])]
    return out


def _diff(old: BaseModel, new: BaseModel) -> list[str]:
    """Dotted paths of the fields that differ (secrets are compared, never printed)."""
    return sorted(_paths(old.model_dump(), new.model_dump(), ""))


def _paths(old: Any, new: Any, prefix: str) -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _paths(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip(".")
