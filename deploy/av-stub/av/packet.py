"""av.packet."""

from av import Packet

__all__ = ["Packet"]
