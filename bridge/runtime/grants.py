"""What the bridge's join token grants: exactly what its routes need (least privilege, R12).

* ``canPublish`` (audio/video): never; the bridge publishes no media.
* ``canPublishData``: when something sends into the room: a bus-to-room route (packets,
  streams, RPC calls) or a room-to-bus RPC route (its responses are data packets).
* ``canUpdateOwnMetadata``: when a route writes the bridge's own attributes. The initial
  name, metadata and attributes are claims of the token itself and need no grant.
* ``canSubscribe``: always; it is what receives the room's data and state.

A reload that needs more than the running token grants needs a restart
(`bridge.runtime.reload`): the rooms were joined with the old grants.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.config import Config, RoomFrom, RoomTo


@dataclass(frozen=True)
class Grants:
    """The grants a join token carries (besides joining its one room)."""

    can_publish_data: bool
    can_update_own_metadata: bool
    can_subscribe: bool = True

    def missing(self, running: Grants) -> list[str]:
        """The grants this needs that `running` lacks, by their LiveKit names."""
        out = []
        if self.can_publish_data and not running.can_publish_data:
            out.append("canPublishData")
        if self.can_update_own_metadata and not running.can_update_own_metadata:
            out.append("canUpdateOwnMetadata")
        return out


def needed_grants(config: Config) -> Grants:
    """What the routes of `config` need (see the module docstring)."""
    publish = update_own = False
    for connector in config.connectors:
        target = connector.to
        if isinstance(target, RoomTo):
            publish = True
            update_own = update_own or target.kind == "attribute"
        source = connector.from_
        if isinstance(source, RoomFrom) and source.rpc is not None:
            publish = True
    return Grants(can_publish_data=publish, can_update_own_metadata=update_own)
