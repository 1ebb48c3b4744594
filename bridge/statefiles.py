"""Owner-only state on disk: the spool and the RPC reply cache hold message payloads.

Directories the bridge creates are 0700 and its SQLite files 0600 (SQLite gives its -wal and
-shm files the database file's mode), whatever the process umask; an existing file of ours is
narrowed to 0600, an existing directory is left as its owner made it.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """`path` as a directory, created owner-only (with its missing parents) if absent."""
    directory = Path(path)
    if not directory.is_dir():
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # mkdir's mode is filtered by the umask
    return directory


def private_file(path: str | os.PathLike[str]) -> Path:
    """`path` exists and is owner-only (read and write), before SQLite opens it."""
    file = Path(path)
    os.close(os.open(file, os.O_CREAT | os.O_RDWR, FILE_MODE))
    os.chmod(file, FILE_MODE)
    return file
