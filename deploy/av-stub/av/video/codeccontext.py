"""av.video.codeccontext."""

from av import VideoCodecContext

__all__ = ["VideoCodecContext"]
