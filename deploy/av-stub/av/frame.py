"""av.frame."""

from av import Frame

__all__ = ["Frame"]
