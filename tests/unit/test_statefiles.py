"""State on disk is owner-only, whatever the umask (the spool and reply cache hold payloads)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.rpcbridge import ReplyCache
from bridge.spool import Spool


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: 0755 directories, 0644 files
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_spool_directory_and_files_are_owner_only(tmp_path: Path, open_umask: None) -> None:
    state = tmp_path / "state" / "nested"
    spool = Spool.open(state / "spool.sqlite3", max_bytes=1 << 20, max_age=None)
    try:
        route = spool.route("r")
        route.append_many([("k", b"payload")])
        assert mode(state) == 0o700
        files = [p for p in state.iterdir() if p.name.startswith("spool.sqlite3")]
        assert files and all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
    finally:
        spool.close()


def test_reply_cache_file_is_owner_only_also_when_it_existed(
    tmp_path: Path, open_umask: None
) -> None:
    (tmp_path / "rpc-replies.sqlite3").touch(mode=0o644)
    cache = ReplyCache(str(tmp_path), window=60, max_entries=10)
    try:
        assert mode(tmp_path / "rpc-replies.sqlite3") == 0o600
    finally:
        cache.close()
