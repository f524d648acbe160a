"""Parsed files cached by content, with a stat to rule a change out cheaply.

An agent re-reads every source on every check; for a truststore of 100 members, parsing YAML and hashing
certificates costs ~5 ms a read, one os.stat per file ~0.2 ms. So a file is parsed once per content and a hit
costs one stat: the writers are not all memberguard's (microcluster, an operator, a restore), and a same-size
rewrite that restores the mtime must not hide, so a stat rules a change out only as coordinator/watched_file.py
says (its ctime included, once settled); otherwise the file is read and its digest compared, and only a changed
content is parsed again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Generic, TypeVar

import yaml

from coordinator.watched_file import Stamp

try:
    from yaml import CSafeDumper as _SafeDumper
    from yaml import CSafeLoader as _Loader
except ImportError:  # PyYAML built without libyaml: ~9x slower to load and ~6x to dump, the same YAML
    from yaml import SafeDumper as _SafeDumper  # type: ignore[assignment]
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

T = TypeVar("T")


class MalformedFile(ValueError):
    """The file was read but its content is not what the source holds; the message says why."""


@dataclass(frozen=True, slots=True)
class CachedFile(Generic[T]):
    """One version of a file: what it parsed to, or why it did not."""

    content: T | MalformedFile
    mtime: float


@dataclass(frozen=True, slots=True)
class _Seen(Generic[T]):
    stamp: Stamp
    settled: bool
    digest: bytes
    file: CachedFile[T]


class FileCache(Generic[T]):
    """Maps a path to its parsed content, re-parsing only when the file's content changes.

    `parse(path, data)` returns the content or raises MalformedFile; it gets the path so that what it builds
    can name its entry once, at parse time, instead of on every hit.
    """

    def __init__(self, parse: Callable[[str, bytes], T]) -> None:
        self._parse = parse
        self._entries: dict[str, _Seen[T]] = {}

    def load(self, path: str) -> CachedFile[T]:
        """The file's current content. Raises OSError when the file cannot be read."""
        read_at = time.time()
        stamp = Stamp.of(os.stat(path))
        cached = self._entries.get(path)
        if cached is not None and cached.settled and cached.stamp == stamp:
            return cached.file
        with open(path, "rb") as handle:
            # Keep the opened file's own stamp: if the path was replaced after os.stat above, the content read here
            # must not be kept under the older one.
            stamp = Stamp.of(os.fstat(handle.fileno()))
            data = handle.read()
        digest = hashlib.sha256(data).digest()
        mtime = stamp.mtime_ns / 1e9
        if cached is not None and cached.digest == digest:
            # The same content: the same object, so that an unchanged source yields the same report.
            entry = cached.file if cached.file.mtime == mtime else CachedFile(cached.file.content, mtime)
        else:
            content: T | MalformedFile
            try:
                content = self._parse(path, data)
            except MalformedFile as exc:
                content = exc.with_traceback(None)  # kept for as long as the file is: not with the parser's frames
            entry = CachedFile(content, mtime)
        self._entries[path] = _Seen(stamp, stamp.settled(read_at), digest, entry)
        return entry

    def retain(self, paths: Collection[str]) -> None:
        """Forgets every path not in `paths` (files that were removed), so the cache does not grow forever."""
        for path in self._entries.keys() - paths:
            del self._entries[path]


def load_yaml(data: bytes) -> object:
    """The YAML document in data. Raises MalformedFile when it does not parse."""
    try:
        return yaml.load(data, Loader=_Loader)
    except yaml.YAMLError as exc:
        # PyYAML's messages span lines (problem, then position); a report entry reads better on one.
        raise MalformedFile("YAML does not parse: " + " ".join(str(exc).split())) from exc


class _Dumper(_SafeDumper):
    """Writes multi-line strings (PEM certificates) as literal blocks, as microcluster's files hold them."""


def _represent_str(dumper: _SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(value: object) -> bytes:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=False).encode()
