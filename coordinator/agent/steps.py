"""Applying a journaled operation's steps to one node's sources, and refusing the steps of a superseded coordinator.

Every step is idempotent: it compares what the source holds (read through the same readers that build the node's
view) with what the step wants, and writes only the difference, so a step repeated after a crash, a retry or a
recovery is harmless and answers changed=False. Files are replaced atomically, and removals are synced, so a crash
leaves a source either as it was or as the step wants it.

Epochs: every step carries the journal's epoch, and recovery bumps it. `EpochGuard` remembers the newest epoch the
node has seen in a file, written before the step runs, so that a coordinator paused through a recovery cannot act
when it wakes up, even after this agent restarts.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple, Protocol

from memberguard.v1 import agent_pb2, membership_pb2

from coordinator import pki
from coordinator.agent.members_table import delete_member, upsert_member
from coordinator.agent.raft_files import write_raft_config
from coordinator.agent.sources import SourceReader, local_backend
from coordinator.agent.truststore import TruststoreReader, file_name_problem, write_truststore_entry
from coordinator.core.addresses import address_problem
from coordinator.core.model import Role, Source, SourceReport
from coordinator.errors import AlreadyExists, FieldViolation, InvalidRequest, SourceNotRewritable, StaleEpoch
from coordinator.files import write_atomically

log = logging.getLogger("memberguard.agent")

EPOCH_FILE = "memberguard-epoch"

# The role column's texts the contract allows: microcluster's PENDING, then go-dqlite's role names.
_ROW_ROLES = tuple(role.text for role in Role)

_RaftEntry = tuple[int, str, Role]  # (node ID, address, role), as write_raft_config takes them


class EpochGuard:
    """The newest journal epoch this node has seen, kept in `<directory>/memberguard-epoch` (a missing file is 0): the
    node's state directory, or beside agent.json where the state directory is not the agent's (microcluster).

    One guard per directory: it reads the file once and is then the file's only writer. A file that does not
    hold a number makes every admission fail, rather than be read as 0 and let any old coordinator in.
    """

    def __init__(self, directory: Path) -> None:
        self._path = directory / EPOCH_FILE
        self._lock = asyncio.Lock()
        self._newest: int | None = None

    def newest(self) -> int:
        if self._newest is None:
            try:
                self._newest = int(self._path.read_text())
            except FileNotFoundError:
                self._newest = 0
        return self._newest

    async def admit(self, epoch: int) -> None:
        """Raises StaleEpoch if epoch is older than the newest seen; records a newer one durably before returning."""
        async with self._lock:
            self._admit(epoch)

    @asynccontextmanager
    async def admitted(self, epoch: int) -> AsyncIterator[None]:
        """admit(epoch), then hold the guard until the step is done: a newer coordinator's step waits, so no step of
        an older epoch can run after a newer epoch was admitted. Steps of one agent therefore run one at a time."""
        async with self._lock:
            self._admit(epoch)
            yield

    def _admit(self, epoch: int) -> None:
        newest = self.newest()
        if epoch < newest:
            raise StaleEpoch(
                f"the step's epoch {epoch} is older than epoch {newest}, which this agent has seen: "
                "a newer coordinator has taken over the journal"
            )
        if epoch > newest:
            write_atomically(self._path, f"{epoch}\n".encode())
            self._newest = epoch


class Applied(NamedTuple):
    """What applying a step did."""

    changed: bool  # False when the node already was as the step wants it (a repeated step)
    detail: str  # what was done, in a few words: logged, and kept with the operation
    token: str = ""  # the join token a step obtained (issue_microcluster_token): for the caller only, never logged


class StepApplier(Protocol):
    async def apply(self, request: agent_pb2.ApplyStepRequest) -> Applied:
        """Applies the request's step to this node's sources. Raises InvalidRequest for a malformed step or one the
        backend cannot apply. Callers run one step at a time (EpochGuard.admitted)."""
        ...


def _usable_name(field: str, name: str) -> list[FieldViolation]:
    problem = file_name_problem(name)
    return [] if problem is None else [FieldViolation(field, problem)]


def _address(field: str, address: str) -> list[FieldViolation]:
    problem = address_problem(address)
    return [] if problem is None else [FieldViolation(field, problem)]


def _certificate(field: str, pem: str) -> list[FieldViolation]:
    try:
        pki.fingerprint(pem)
    except ValueError as exc:
        return [FieldViolation(field, f"is not a PEM certificate: {exc}")]
    return []


def _raft_entry(field: str, entry: agent_pb2.RaftEntry) -> list[FieldViolation]:
    violations = [FieldViolation(f"{field}.node_id", "must be set")] if entry.node_id == 0 else []
    return violations + _address(f"{field}.address", entry.address)


# The roles a Raft entry may take: those with a dqlite code (unset means voter), never PENDING.
_RAFT_ROLES = (
    membership_pb2.ROLE_UNSPECIFIED,
    membership_pb2.ROLE_VOTER,
    membership_pb2.ROLE_STAND_BY,
    membership_pb2.ROLE_SPARE,
)


def _raft_role(entry: agent_pb2.RaftEntry) -> Role:
    """The entry's role; the request was checked, so it has a dqlite code."""
    return Role.VOTER if entry.role == membership_pb2.ROLE_UNSPECIFIED else Role(entry.role)


def _check_ensure_truststore_record(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    record, field = request.ensure_truststore_record, "ensure_truststore_record"
    return (
        _usable_name(f"{field}.name", record.name)
        + _address(f"{field}.address", record.address)
        + _certificate(f"{field}.certificate_pem", record.certificate_pem)
    )


def _check_remove_truststore_record(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    return _usable_name("remove_truststore_record", request.remove_truststore_record)


def _check_ensure_member_row(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    row, field = request.ensure_member_row, "ensure_member_row"
    roles = (
        [] if row.role in _ROW_ROLES else [FieldViolation(f"{field}.role", f"must be one of {', '.join(_ROW_ROLES)}")]
    )
    return (
        _usable_name(f"{field}.name", row.name)
        + _address(f"{field}.address", row.address)
        + _certificate(f"{field}.certificate_pem", row.certificate_pem)
        + roles
    )


def _check_remove_member_row(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    # Any non-empty name: an orphan row written by hand under a strange name must still be removable.
    return [] if request.remove_member_row else [FieldViolation("remove_member_row", "must not be empty")]


def _check_ensure_raft_entry(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    entry, field = request.ensure_raft_entry, "ensure_raft_entry"
    roles = [] if entry.role in _RAFT_ROLES else [FieldViolation(f"{field}.role", "must be voter, stand-by or spare")]
    return _raft_entry(field, entry) + roles


def _check_remove_raft_entry(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    return _raft_entry("remove_raft_entry", request.remove_raft_entry)


def _check_fence_node(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    return [] if request.fence_node else [FieldViolation("fence_node", "must be true")]


def _check_remove_through_microcluster(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    removal, field = request.remove_through_microcluster, "remove_through_microcluster"
    return _usable_name(f"{field}.name", removal.name) + _address(f"{field}.address", removal.address)


def _check_issue_microcluster_token(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    token, field = request.issue_microcluster_token, "issue_microcluster_token"
    expiry = (
        [] if token.expire_after.ToNanoseconds() > 0 else [FieldViolation(f"{field}.expire_after", "must be positive")]
    )
    return _usable_name(f"{field}.name", token.name) + expiry


def _check_revoke_microcluster_token(request: agent_pb2.ApplyStepRequest) -> list[FieldViolation]:
    return _usable_name("revoke_microcluster_token", request.revoke_microcluster_token)


# Step → every way it can be malformed.
_CHECKS: dict[str, Callable[[agent_pb2.ApplyStepRequest], list[FieldViolation]]] = {
    "ensure_truststore_record": _check_ensure_truststore_record,
    "remove_truststore_record": _check_remove_truststore_record,
    "ensure_member_row": _check_ensure_member_row,
    "remove_member_row": _check_remove_member_row,
    "ensure_raft_entry": _check_ensure_raft_entry,
    "remove_raft_entry": _check_remove_raft_entry,
    "fence_node": _check_fence_node,
    "remove_through_microcluster": _check_remove_through_microcluster,
    "issue_microcluster_token": _check_issue_microcluster_token,
    "revoke_microcluster_token": _check_revoke_microcluster_token,
}


def checked_step(request: agent_pb2.ApplyStepRequest) -> str:
    """The name of the request's step, or InvalidRequest listing every way it is malformed. Backend-independent: a
    malformed step is refused as such on any backend."""
    kind = request.WhichOneof("step")
    if kind is None:
        raise InvalidRequest([FieldViolation("step", "exactly one step must be set")])
    check = _CHECKS.get(kind)
    violations = check(request) if check is not None else []
    if violations:
        raise InvalidRequest(violations)
    return kind


def _remove_files(paths: Iterable[Path]) -> list[str]:
    """Unlinks each file that exists and syncs the directories, so the removal survives a crash; the names removed."""
    removed = []
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    for directory in {path.parent for path in removed}:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return [path.name for path in removed]


def _entries(report: SourceReport) -> list[_RaftEntry] | None:
    """A cluster.yaml-format file's entries in order, or None when it does not parse whole (an error, or an item
    that is not a node)."""
    if report.error or report.invalid_entries:
        return None
    return [(r.node_id, r.address, r.role) for r in report.records if r.role is not None]


class TruststoreSteps:
    """The truststore's two steps, the same on every backend: a truststore is a directory of files on its node."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        # The reader the node's view is built with, so that a step judges the records exactly as the diff will.
        self._reader = TruststoreReader(directory)

    async def ensure(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Writes `<name>.yaml` unless it already holds exactly this name, address and certificate (a file that
        does not parse is rewritten)."""
        record = request.ensure_truststore_record
        report = await self._reader.read(include_certificates=True)
        held = next((r for r in report.records if r.entry == f"{record.name}.yaml"), None)
        if held is not None and (held.name, held.address, held.certificate_pem) == (
            record.name,
            record.address,
            record.certificate_pem,
        ):
            return False, f"the truststore already holds {record.name}"
        write_truststore_entry(self._directory, record.name, record.address, record.certificate_pem)
        return True, f"wrote {record.name} into the truststore"

    async def remove(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Removes `<name>.yaml` and any misnamed file that holds the member (microcluster trusts by the name inside
        a file, so a misnamed copy would keep trusting it); nothing to remove is unchanged."""
        name = request.remove_truststore_record
        report = await self._reader.read(include_certificates=True)
        copies = [self._directory / r.entry for r in report.records if r.name == name and r.entry != f"{name}.yaml"]
        removed = _remove_files([self._directory / f"{name}.yaml", *copies])
        if not removed:
            return False, f"the truststore holds no {name}"
        return True, f"removed {', '.join(removed)} from the truststore"


class NodeSteps(abc.ABC):
    """What every backend's steps share: the truststore's steps, and the table from a request's step to the method
    that applies it. A backend writes the other five."""

    def __init__(self, truststore: Path) -> None:
        self._truststore = TruststoreSteps(truststore)
        self._steps: dict[str, Callable[[agent_pb2.ApplyStepRequest], Awaitable[tuple[bool, str]]]] = {
            "ensure_truststore_record": self._truststore.ensure,
            "remove_truststore_record": self._truststore.remove,
            "ensure_member_row": self._ensure_member_row,
            "remove_member_row": self._remove_member_row,
            "ensure_raft_entry": self._ensure_raft_entry,
            "remove_raft_entry": self._remove_raft_entry,
            "fence_node": self._fence_node,
        }

    async def _step(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Checks the request, then applies its step."""
        kind = checked_step(request)
        if kind not in self._steps:
            raise InvalidRequest([FieldViolation("step", f"this backend applies no {kind} step")])
        return await self._steps[kind](request)

    @abc.abstractmethod
    async def _ensure_member_row(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]: ...

    @abc.abstractmethod
    async def _remove_member_row(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]: ...

    @abc.abstractmethod
    async def _ensure_raft_entry(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]: ...

    @abc.abstractmethod
    async def _remove_raft_entry(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]: ...

    @abc.abstractmethod
    async def _fence_node(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]: ...


class LocalSteps(NodeSteps):
    """The `local` backend's steps, on the files `local_backend` reads (same arguments).

    After each step, this node's `database/cluster.yaml` catches up with the shared Raft configuration file: the
    local backend's stand-in for the engine's tick, which on a real node rewrites the cache from the leader. A node's
    cache so catches up whenever its agent applies a step, and when its agent starts (`started`: a real engine
    starting loads the configuration from the leader), and only then: GetNodeView stays read-only, and a cache
    nothing has touched still lags, as a real one may. A node whose engine would not be told (fenced: no info.yaml;
    or no longer in the configuration) keeps its cache as it is.
    """

    def __init__(self, state_dir: Path, members_table: Path, raft_config: Path) -> None:
        # The readers the node's view is built with, so that a step judges the sources exactly as the diff will.
        self._readers: dict[Source, SourceReader] = {
            reader.source: reader for reader in local_backend(state_dir, members_table, raft_config)
        }
        super().__init__(state_dir / "truststore")
        self._members_table = members_table
        self._raft_config = raft_config
        database = state_dir / "database"
        self._cache = database / "cluster.yaml"
        self._engine_files = (database / "info.yaml", self._cache, database / "join")

    async def apply(self, request: agent_pb2.ApplyStepRequest) -> Applied:
        changed, detail = await self._step(request)
        if await self._catch_up_cache():
            detail += "; cluster.yaml caught up with the Raft configuration"
        return Applied(changed, detail)

    async def _read(self, source: Source) -> SourceReport:
        return await self._readers[source].read(include_certificates=True)

    async def _ensure_member_row(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Upserts the row by name unless a row of that name already holds exactly this address, certificate and
        role. Another row holding the same certificate (the column is UNIQUE) is AlreadyExists."""
        row = request.ensure_member_row
        report = await self._read(Source.MEMBERS_TABLE)
        wanted = (row.address, row.certificate_pem, row.role)
        if [(r.address, r.certificate_pem, r.role_text) for r in report.records if r.name == row.name] == [wanted]:
            return False, f"the members table already holds {row.name}"
        try:
            upsert_member(self._members_table, row.name, row.address, row.certificate_pem, row.role)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"another row of the members table holds {row.name}'s certificate: {exc}") from exc
        return True, f"wrote {row.name}'s row ({row.role})"

    async def _remove_member_row(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Deletes the row of that name; no such row is unchanged."""
        name = request.remove_member_row
        report = await self._read(Source.MEMBERS_TABLE)
        if not any(r.name == name for r in report.records):
            return False, f"the members table holds no {name}"
        delete_member(self._members_table, name)
        return True, f"deleted {name}'s row"

    async def _raft_entries(self) -> list[_RaftEntry]:
        """The shared Raft configuration's entries, in order; SourceNotRewritable if it does not parse whole."""
        report = await self._read(Source.RAFT_CONFIG)
        entries = _entries(report)
        if entries is None:
            why = report.error or "; ".join(f"{e.entry}: {e.reason}" for e in report.invalid_entries)
            raise SourceNotRewritable(f"the Raft configuration {self._raft_config} is not rewritten: {why}")
        return entries

    async def _ensure_raft_entry(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Puts (node_id, address, role) into the shared Raft configuration: the entry of that node ID is updated in
        place (later duplicates of the ID dropped), or the entry is appended; an equal entry is unchanged."""
        entry = request.ensure_raft_entry
        wanted = (entry.node_id, entry.address, _raft_role(entry))
        entries = await self._raft_entries()
        position = next((i for i, (node_id, _, _) in enumerate(entries) if node_id == entry.node_id), len(entries))
        # Entries before the first of this ID are all of other IDs, so `position` is also its place among `others`.
        others = [e for e in entries if e[0] != entry.node_id]
        updated = [*others[:position], wanted, *others[position:]]
        if updated == entries:
            return False, f"the Raft configuration already holds node {entry.node_id} at {entry.address}"
        write_raft_config(self._raft_config, updated)
        verb = "updated" if position < len(entries) else "added"
        return True, f"{verb} node {entry.node_id} at {entry.address} in the Raft configuration"

    async def _remove_raft_entry(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Takes out the entries of exactly (node_id, address): the same ID at another address is another fact
        than the one the coordinator decided on, and is left alone. None there is unchanged."""
        entry = request.remove_raft_entry
        entries = await self._raft_entries()
        kept = [e for e in entries if (e[0], e[1]) != (entry.node_id, entry.address)]
        if kept == entries:
            return False, f"the Raft configuration holds no node {entry.node_id} at {entry.address}"
        write_raft_config(self._raft_config, kept)
        return True, f"removed node {entry.node_id} at {entry.address} from the Raft configuration"

    async def _fence_node(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        """Removes database/info.yaml, cluster.yaml and the join flag, so that nothing can restart this node's engine
        as a member; none of them left is unchanged."""
        removed = _remove_files(self._engine_files)
        if not removed:
            return False, "the node is fenced already"
        return True, f"fenced: removed {', '.join(removed)}"

    async def started(self) -> None:
        """What the node's engine does when it starts: its cache catches up. An agent killed between a step's write
        of the Raft configuration and the catch-up after it would otherwise leave a cache that nothing rewrites."""
        if await self._catch_up_cache():
            log.info("cluster.yaml caught up with the Raft configuration at start")

    async def _catch_up_cache(self) -> bool:
        """Rewrites this node's cluster.yaml from the shared Raft configuration when they differ and the node's
        engine would be told (info.yaml names an entry of the configuration); True if it was rewritten."""
        info = await self._read(Source.NODE_INFO)
        entries = _entries(await self._read(Source.RAFT_CONFIG))
        if entries is None or info.error or not info.records:
            return False
        me = info.records[0]
        if not any((node_id, address) == (me.node_id, me.address) for node_id, address, _ in entries):
            return False
        if _entries(await self._read(Source.RAFT_CACHE)) == entries:
            return False
        write_raft_config(self._cache, entries)
        return True
