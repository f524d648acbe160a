"""coordinator/files.py: an atomic write is durable (its file and its directory synced) except within throwaway(),
which only the thread or task that entered it sees; and write_json's output."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from coordinator.files import throwaway, write_atomically, write_json


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors os.fsync is called with, from now on."""
    synced: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return synced


def test_a_write_syncs_its_file_and_its_directory(tmp_path: Path, fsyncs: list[int]) -> None:
    write_atomically(tmp_path / "a" / "file", b"new", mode=0o600)
    assert len(fsyncs) == 2
    assert (tmp_path / "a" / "file").read_bytes() == b"new"
    assert (tmp_path / "a" / "file").stat().st_mode & 0o777 == 0o600


def test_a_throwaway_write_syncs_nothing_and_is_still_whole(tmp_path: Path, fsyncs: list[int]) -> None:
    (tmp_path / "file").write_bytes(b"old")
    with throwaway():
        write_atomically(tmp_path / "file", b"new")
    assert fsyncs == []
    assert (tmp_path / "file").read_bytes() == b"new"
    assert [path.name for path in tmp_path.iterdir()] == ["file"]  # no temporary file left beside it
    write_atomically(tmp_path / "file", b"after")
    assert len(fsyncs) == 2, "durable again once the block is left"


def test_throwaway_is_the_entering_threads_only(tmp_path: Path, fsyncs: list[int]) -> None:
    with throwaway():
        other = threading.Thread(target=write_atomically, args=(tmp_path / "file", b"durable"))
        other.start()
        other.join()
    assert len(fsyncs) == 2


def test_write_json_writes_indented_json_ending_in_a_newline(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"name": "n1", "listen": "127.0.0.1:0"})
    text = (tmp_path / "config.json").read_text()
    assert text == json.dumps({"name": "n1", "listen": "127.0.0.1:0"}, indent=2) + "\n"
