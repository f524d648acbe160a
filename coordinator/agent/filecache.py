"""Parsed files cached by stat identity, and the atomic write that keeps that identity honest.

An agent re-reads every source on every check; for a truststore of 100 members, parsing YAML and hashing
certificates costs ~5 ms a read, one os.stat per file ~0.2 ms (research/performance.md). So a file is
parsed once per (inode, mtime, size) and a hit costs one stat. Every writer in this package replaces files
by rename, which gives each version a new inode: a rewrite cannot hide behind an unchanged mtime and size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Generic, TypeVar

import yaml

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # PyYAML built without libyaml: ~9x slower, still correct
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

T = TypeVar("T")


class MalformedFile(ValueError):
    """The file was read but its content is not what the source holds; the message says why."""


@dataclass(frozen=True, slots=True)
class CachedFile(Generic[T]):
    """One version of a file: what it parsed to, or why it did not."""

    content: T | MalformedFile
    mtime: float


_Identity = tuple[int, int, int]


class FileCache(Generic[T]):
    """Maps a path to its parsed content, re-parsing only when the file's stat identity changes.

    `parse(path, data)` returns the content or raises MalformedFile; it gets the path so that what it builds
    can name its entry once, at parse time, instead of on every hit.
    """

    def __init__(self, parse: Callable[[str, bytes], T]) -> None:
        self._parse = parse
        self._entries: dict[str, tuple[_Identity, CachedFile[T]]] = {}

    def load(self, path: str) -> CachedFile[T]:
        """The file's current content. Raises OSError when the file cannot be read."""
        st = os.stat(path)
        cached = self._entries.get(path)
        if cached is not None and cached[0] == (st.st_ino, st.st_mtime_ns, st.st_size):
            return cached[1]
        with open(path, "rb") as handle:
            # Key by the opened file's own stat: if the path was replaced after os.stat above, the content
            # read here must not be cached under the older identity.
            st = os.fstat(handle.fileno())
            data = handle.read()
        content: T | MalformedFile
        try:
            content = self._parse(path, data)
        except MalformedFile as exc:
            content = exc.with_traceback(None)  # kept for as long as the file is: not with the parser's frames
        entry = CachedFile(content, st.st_mtime_ns / 1e9)
        self._entries[path] = ((st.st_ino, st.st_mtime_ns, st.st_size), entry)
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


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PEM certificates) as literal blocks, as microcluster's files hold them."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(value: object) -> bytes:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=False).encode()
