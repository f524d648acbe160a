"""Writing files so that a crash leaves either the old content or the new, never a torn file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

_durable: ContextVar[bool] = ContextVar("durable", default=True)


@contextmanager
def throwaway() -> Iterator[None]:
    """Within it, write_atomically skips its fsyncs (in this thread or task only): for a directory that is laid out
    anew whenever it is needed, a lab's, where one fsync per file is most of the time a large lab takes to lay out
    and a crash costs nothing but laying it out again. The writes stay atomic to their readers."""
    token = _durable.set(False)
    try:
        yield
    finally:
        _durable.reset(token)


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replaces path with data: readers see the old file or the new one, never a partial one; durably, unless within
    throwaway().

    Missing parent directories are created 0700, as microcluster's state subdirectories are. The temporary
    file lives in the same directory, since a rename is atomic only within one filesystem.
    """
    durable = _durable.get()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    if not durable:
        return
    # The rename itself is durable only once the directory is synced.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Replaces path with document as indented JSON (a configuration an operator may read), atomically."""
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode())
