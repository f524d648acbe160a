"""go-dqlite's node-store files, `cluster.yaml` (a list of {ID, Address, Role}) and `info.yaml` (one of them).

The local backend keeps its authoritative Raft configuration in a file of the cluster.yaml format, and each
node's `database/cluster.yaml` is that node's cached copy, as go-dqlite's is. Roles are dqlite's codes:
0 voter, 1 stand-by, 2 spare.

What is an error and what is an invalid entry: a file that cannot be read, is empty (the mark of an
interrupted write) or is not YAML holds no records we could judge, so the report carries an error; an
item that is not a well-formed node is an invalid entry, and the other items still count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeGuard

from coordinator.agent.filecache import CachedFile, FileCache, MalformedFile, dump_yaml, load_yaml
from coordinator.core.model import InvalidEntry, MemberRecord, Role, Source, SourceReport
from coordinator.files import write_atomically

_ROLES = {0: Role.VOTER, 1: Role.STAND_BY, 2: Role.SPARE}
_CODES = {role: code for code, role in _ROLES.items()}

_Nodes = tuple[tuple[MemberRecord, ...], tuple[InvalidEntry, ...]]


def _is_int(value: object) -> TypeGuard[int]:
    # YAML's true/false load as bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


def _node_record(item: object, entry: str) -> MemberRecord:
    if not isinstance(item, dict):
        raise MalformedFile("not a mapping of ID, Address and Role")
    node_id, address, code = item.get("ID"), item.get("Address"), item.get("Role")
    if not _is_int(node_id) or not 0 <= node_id < 2**64:
        raise MalformedFile(f"ID {node_id!r} is not a dqlite node ID (an unsigned 64-bit integer)")
    if not isinstance(address, str) or not address:
        raise MalformedFile("Address missing or empty")
    role = _ROLES.get(code) if _is_int(code) else None
    if role is None:
        raise MalformedFile(f"Role {code!r} is not 0 (voter), 1 (stand-by) or 2 (spare)")
    return MemberRecord(address=address, node_id=node_id, role=role, entry=entry)


def _load_document(data: bytes) -> object:
    document = load_yaml(data)
    if document is None:
        raise MalformedFile("empty file")
    return document


def _parse_cluster(path: str, data: bytes) -> _Nodes:
    document = _load_document(data)
    if not isinstance(document, list):
        raise MalformedFile("not a YAML list of nodes")
    records: list[MemberRecord] = []
    invalid: list[InvalidEntry] = []
    for index, item in enumerate(document, start=1):
        entry = f"entry {index}"
        try:
            records.append(_node_record(item, entry))
        except MalformedFile as exc:
            invalid.append(InvalidEntry(entry, str(exc)))
    return tuple(records), tuple(invalid)


def _parse_info(path: str, data: bytes) -> _Nodes:
    document = _load_document(data)
    entry = os.path.basename(path)
    try:
        return (_node_record(document, entry),), ()
    except MalformedFile as exc:
        return (), (InvalidEntry(entry, str(exc)),)


class _NodeFileReader:
    def __init__(self, path: Path, source: Source, parse: Callable[[str, bytes], _Nodes]) -> None:
        self.source = source
        self._path = str(path)
        self._cache = FileCache(parse)
        self._last: tuple[object, SourceReport] | None = None

    async def read(self, *, include_certificates: bool, within: float | None = None) -> SourceReport:
        try:
            cached = self._cache.load(self._path)
        except OSError as exc:
            return SourceReport(self.source, error=str(exc))
        if self._last is not None and self._last[0] is cached:
            return self._last[1]  # an unchanged file: the same report object (see MembersTableReader.read)
        report = self._report(cached)
        self._last = (cached, report)
        return report

    def _report(self, cached: CachedFile[_Nodes]) -> SourceReport:
        if isinstance(cached.content, MalformedFile):
            return SourceReport(self.source, error=f"{self._path}: {cached.content}", changed_at=cached.mtime)
        records, invalid = cached.content
        leader = ""
        if self.source is Source.RAFT_CONFIG:
            # The local backend has no election: the file's first voter stands for the leader, so a
            # configuration without voters is a cluster without a leader, as it would be for real.
            leader = next((record.address for record in records if record.role is Role.VOTER), "")
        return SourceReport(
            self.source, records=records, invalid_entries=invalid, changed_at=cached.mtime, leader_address=leader
        )


class RaftConfigFileReader(_NodeFileReader):
    """A cluster.yaml-format file: the local authoritative configuration (RAFT_CONFIG, which names a
    leader) or a node's cached `database/cluster.yaml` (RAFT_CACHE, which does not)."""

    def __init__(self, path: Path, source: Source) -> None:
        if source not in (Source.RAFT_CONFIG, Source.RAFT_CACHE):
            raise ValueError(f"a cluster.yaml file is the RAFT_CONFIG or RAFT_CACHE source, not {source.name}")
        super().__init__(path, source, _parse_cluster)


class NodeInfoReader(_NodeFileReader):
    """A node's `database/info.yaml`: its own ID, address and role, as one record."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, Source.NODE_INFO, _parse_info)


def _node_document(node_id: int, address: str, role: Role) -> dict[str, object]:
    if role not in _CODES:
        raise ValueError(f"{role.name} has no dqlite role code")
    return {"ID": node_id, "Address": address, "Role": _CODES[role]}


def write_raft_config(path: Path, entries: Iterable[tuple[int, str, Role]]) -> None:
    """Replaces a cluster.yaml-format file with entries of (node ID, address, role), in that order."""
    write_atomically(path, dump_yaml([_node_document(*entry) for entry in entries]))


def write_node_info(path: Path, node_id: int, address: str, role: Role) -> None:
    write_atomically(path, dump_yaml(_node_document(node_id, address, role)))
