"""av.video.frame."""

from av import PictureType, VideoFrame

__all__ = ["PictureType", "VideoFrame"]
