"""The journal: every guarded operation with its plan and each step's outcome, and the join tokens' digests, in one
SQLite file that survives a crash of the coordinator (docs/design.md, "The journal and recovery").

An adapter: it stores OperationRecords (coordinator/core/operation.py) and decides nothing about them.

- One coordinator owns a journal. `Journal.open` takes an exclusive, non-blocking flock on `<path>.lock` and holds it
  through the open file until `close` (or the process's death, which the kernel turns into a release): a second
  coordinator gets JournalLocked at once instead of interleaving its steps with ours.
- Each open bumps the journal's epoch. Every step the coordinator sends carries it and agents refuse older ones, so a
  paused former owner cannot act once a successor has opened the journal.
- Every write is one transaction, committed with `synchronous=FULL` in WAL mode: fsynced before the call returns, and
  all or nothing across a crash. `create` writes the operation with all its steps, so the plan is on disk before
  step one runs.
- Tokens are stored as the digest the caller computed, never the secret.

A journal cannot vanish quietly. Beside it, `<path>.id` (its marker: the journal's id and the epoch of its latest
open) is written, fsynced, after each epoch bump commits and before the coordinator serves, so it never names an epoch
the journal does not hold. At open, `diagnose` reads the files without changing them (SQLite opened read-only: a
read-write connection would checkpoint a WAL into a damaged file and delete the WAL when it closed) and finds the
journal damaged when:
- it is missing or empty while its marker, a WAL of its own, or an agent's epoch says there was one;
- it is not SQLite, is shorter than its header says, fails `PRAGMA integrity_check`, or lacks its tables or its one
  epoch row;
- it is another journal than its marker names;
- it holds an older epoch than its marker: committed transactions were lost. SQLite reads a WAL only up to the first
  frame whose checksum fails, so a damaged WAL tail silently drops the epoch bump and everything after it. Taking the
  larger epoch would restore fencing but not the lost operations, whose steps may have run: refused instead;
- an agent has admitted a step of an epoch the journal never reached (a restored copy, or lost transactions).
`Journal.open` then raises JournalDamaged and changes nothing; `recover` (`memberguard journal recover`) moves every
file of the damaged journal aside, never deleting one, and starts a new journal above every epoch known, recording
who recovered it, when and from what in its `recoveries` table. An agent that does not answer is evidence not
counted: a coordinator starting cannot wait for every agent.

Failures, one class each:

JournalError
├── JournalLocked       another process holds the journal
├── JournalDamaged      the journal is missing, empty, corrupt or behind its evidence (see above)
├── JournalHealthy      recovery was asked for a journal that passes every check
├── DuplicateRequest    a request id is journaled already (carries the operation it started)
├── UnknownOperation    no operation has this id
├── UnknownToken        no token has this name
└── InvalidPageToken    a page token this journal did not hand out
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import get_args, get_type_hints

from coordinator.core.model import Member, Role
from coordinator.core.operation import Audit, OperationKind, OperationRecord, OperationState, Step, StepState
from coordinator.core.plan import Action
from coordinator.core.tokens import TokenRecord, TokenState
from coordinator.files import write_atomically

SCHEMA_VERSION = 3  # 2: operations.attempts; 3: steps.deferred

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    # One row: how many times the journal has been opened (docs/design.md: each open bumps the epoch).
    "CREATE TABLE epoch (value INTEGER NOT NULL)",
    """CREATE TABLE operations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- journal order, never reused: pages are cut by it
        id TEXT NOT NULL UNIQUE,
        request_id TEXT NOT NULL UNIQUE,  -- a retry with the same id gets this operation back
        kind INTEGER NOT NULL,  -- OperationKind, the protobuf number
        state INTEGER NOT NULL,  -- OperationState
        member_name TEXT NOT NULL,
        member_certificate_fingerprint TEXT NOT NULL,
        member_address TEXT NOT NULL,
        member_node_id TEXT NOT NULL,  -- in decimal: a dqlite node ID is a uint64, beyond SQLite's signed INTEGER
        member_role INTEGER,  -- Role; NULL when the member has none yet
        error TEXT NOT NULL,
        plan TEXT NOT NULL,
        attempts INTEGER NOT NULL,  -- how many times it was parked
        requested_by TEXT NOT NULL,
        certificate_fingerprint TEXT NOT NULL,
        verdict TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        acknowledged TEXT NOT NULL,  -- a JSON array of discrepancy ids
        epoch INTEGER NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX operations_by_state ON operations (state)",
    """CREATE TABLE steps (
        operation_id TEXT NOT NULL REFERENCES operations (id),
        position INTEGER NOT NULL,  -- 0-based place in the plan
        name TEXT NOT NULL,
        commit_point INTEGER NOT NULL,  -- 0 or 1
        target TEXT NOT NULL,  -- the node whose agent applies it; '' for the coordinator itself
        action TEXT,  -- what it does, as JSON: {"type": "RemoveRaftEntry", "node_id": 5, ...}; NULL for none
        state INTEGER NOT NULL,  -- StepState
        finished_at REAL,
        deferred INTEGER NOT NULL DEFAULT 0,  -- 0 or 1: applied after the operation succeeded
        PRIMARY KEY (operation_id, position)
    ) WITHOUT ROWID""",
    """CREATE TABLE tokens (
        name TEXT PRIMARY KEY,  -- one token per member name: issuing again replaces it
        secret_digest TEXT NOT NULL,
        expires_at REAL NOT NULL,
        issued_by TEXT NOT NULL,
        bound_fingerprint TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('active', 'consumed', 'revoked')),
        issued_at REAL NOT NULL
    )""",
)

# Created at every open where missing, whatever the schema version: they hold the journal's evidence, not its content.
_EVIDENCE_SCHEMA = (
    # One row: the journal's id, which its marker names too, so that a journal put in another's place is told apart.
    "CREATE TABLE IF NOT EXISTS identity (journal_id TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS recoveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        recovered_at REAL NOT NULL,
        requested_by TEXT NOT NULL,  -- who ran the recovery (user@host)
        damage TEXT NOT NULL,  -- what was wrong with the journal this one replaced
        moved_to TEXT NOT NULL,  -- the directory its files were moved into ('' when there was no file to move)
        moved TEXT NOT NULL,  -- a JSON array of the names of the files moved there
        agents TEXT NOT NULL,  -- a JSON array of [name, newest epoch seen or null when unknown, how it was learned]
        epoch INTEGER NOT NULL  -- the epoch this journal started from: every one known, its first open bumps above
    )""",
)
MARKER_SUFFIX = ".id"
_SIDE_SUFFIXES = ("-wal", "-shm")  # SQLite's files beside a WAL-mode database
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 100
_TABLES = ("schema_version", "epoch", "operations", "steps", "tokens")
_INTEGRITY_LINES = 3  # of PRAGMA integrity_check's report, quoted in the refusal

# What save() writes: a transition changes these; identity, request and audit stay as create() journaled them. The
# member is among them because a join learns its node ID half-way (the joiner's engine picks it), and a rollback
# after a crash must know which ID to remove.
_SAVED = ", ".join(
    f"{column} = :{column}"
    for column in (
        "state",
        "member_name",
        "member_certificate_fingerprint",
        "member_address",
        "member_node_id",
        "member_role",
        "error",
        "plan",
        "attempts",
        "epoch",
        "updated_at",
    )
)
_UNFINISHED = tuple(int(state) for state in OperationState if not state.finished)
_NEWEST = (1 << 63) - 1  # above every seq SQLite can assign: the first page starts below it


class JournalError(Exception):
    """Base of the journal's failures."""


class JournalLocked(JournalError):
    """Another process (another coordinator) holds the journal."""


class JournalDamaged(JournalError):
    """The journal cannot be trusted: `found` says what is wrong, in a sentence. Nothing was changed."""

    def __init__(self, path: str, found: str) -> None:
        super().__init__(f"journal {path} {found}")
        self.path = path
        self.found = found

    def refusal(self, config: str) -> str:
        """What a coordinator started with the configuration file config says when it refuses to start."""
        return (
            f"refusing to start: journal {self.path} {self.found}. Starting afresh would lose its operations and "
            f"tokens and reuse epochs the agents have admitted. To start a new journal above every agent's epoch "
            f"(the damaged files are moved aside, never deleted), run: memberguard journal recover --config {config}"
        )


class JournalHealthy(JournalError):
    """Recovery was asked for a journal that passes every check: recovering it would only throw its history away."""


class DuplicateRequest(JournalError):
    """The request id was journaled already: `existing` is the operation it started, whose outcome the retry gets."""

    def __init__(self, existing: OperationRecord) -> None:
        super().__init__(f"request {existing.audit.request_id} started operation {existing.id} already")
        self.existing = existing


class UnknownOperation(JournalError):
    pass


class UnknownToken(JournalError):
    pass


class InvalidPageToken(JournalError):
    pass


class Journal:
    """An open journal, owned by this process until `close`. Safe to call from several threads (asyncio.to_thread):
    one mutex keeps each call's transaction whole on the single connection."""

    def __init__(self, db: sqlite3.Connection, lock_fd: int, epoch: int) -> None:
        self._db = db
        self._lock_fd = lock_fd
        self._epoch = epoch
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, seen_epochs: Mapping[str, int] | None = None) -> Journal:
        """Lock the journal at path, check it (`diagnose`; seen_epochs: agent name -> the newest epoch it admitted,
        for the agents that answered), create it and its schema if there is none and no evidence of one, bump its
        epoch and record the new epoch in its marker. JournalDamaged, changing nothing, if the check fails.

        The bump commits (fsynced) before the marker is written, and both before this returns, so no step can carry
        an epoch the journal might lose, and the marker never names one that the journal does not hold."""
        path = os.fspath(path)
        lock_fd = _lock(path)
        try:
            damage = diagnose(path, seen_epochs).damage
            if damage:
                raise JournalDamaged(path, damage)
            db = _connect(path)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                marker = _migrate_and_bump_epoch(db, path)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            _write_marker(path, marker)
        except BaseException:
            db.close()
            os.close(lock_fd)
            raise
        return cls(db, lock_fd, marker.epoch)

    @property
    def epoch(self) -> int:
        """This owner's epoch: one more than the previous owner's."""
        return self._epoch

    def close(self) -> None:
        with self._mutex:
            self._db.close()
            os.close(self._lock_fd)  # releases the lock: the next coordinator may open the journal

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- operations ---------------------------------------------------------------------------------------------

    def create(self, record: OperationRecord) -> OperationRecord:
        """Journal a new operation and all its steps in one transaction, before any step runs; returns it as stored
        (stamped with this owner's epoch). DuplicateRequest if its request id started an operation already."""
        record = replace(record, epoch=self._epoch)
        with self._transaction() as db:
            existing = _one(db, "request_id = ?", record.audit.request_id)
            if existing is not None:
                raise DuplicateRequest(existing)
            columns = _operation_columns(record)
            names = ", ".join(columns)
            db.execute(f"INSERT INTO operations ({names}) VALUES ({', '.join(':' + c for c in columns)})", columns)
            db.executemany(
                "INSERT INTO steps (operation_id, position, name, commit_point, target, action, state, finished_at,"
                " deferred) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        record.id,
                        position,
                        step.name,
                        step.commit_point,
                        step.target,
                        _action_json(step.action),
                        int(step.state),
                        step.finished_at,
                        step.deferred,
                    )
                    for position, step in enumerate(record.steps)
                ],
            )
        return record

    def save(self, record: OperationRecord) -> OperationRecord:
        """Persist a transition of a journaled operation (its state, member, steps' states, error, plan, times) in one
        transaction; returns it as stored (stamped with this owner's epoch). The plan itself never changes."""
        record = replace(record, epoch=self._epoch)
        with self._transaction() as db:
            updated = db.execute(f"UPDATE operations SET {_SAVED} WHERE id = :id", _operation_columns(record))
            if updated.rowcount == 0:
                raise UnknownOperation(f"operation {record.id} is not journaled")
            planned = [_step(row) for row in _step_rows(db, record.id)]
            if [_planned(step) for step in planned] != [_planned(step) for step in record.steps]:
                raise ValueError(f"operation {record.id}: a transition cannot change the plan")  # rolls back
            db.executemany(
                "UPDATE steps SET state = ?, finished_at = ? WHERE operation_id = ? AND position = ?",
                [
                    (int(step.state), step.finished_at, record.id, position)
                    for position, step in enumerate(record.steps)
                ],
            )
        return record

    def get(self, operation_id: str) -> OperationRecord | None:
        with self._transaction() as db:
            return _one(db, "id = ?", operation_id)

    def by_request_id(self, request_id: str) -> OperationRecord | None:
        with self._transaction() as db:
            return _one(db, "request_id = ?", request_id)

    def unfinished(self) -> list[OperationRecord]:
        """The operations the reconciler must look at (QUEUED, RUNNING, PARKED), in the order they were journaled."""
        with self._transaction() as db:
            marks = ", ".join("?" * len(_UNFINISHED))
            rows = db.execute(f"SELECT * FROM operations WHERE state IN ({marks}) ORDER BY seq", _UNFINISHED)
            return [_record(db, row) for row in rows.fetchall()]

    def counts(self) -> dict[tuple[OperationKind, OperationState], int]:
        """How many operations the journal holds, by kind and state."""
        with self._transaction() as db:
            rows = db.execute("SELECT kind, state, COUNT(*) FROM operations GROUP BY kind, state").fetchall()
        return {(OperationKind(kind), OperationState(state)): count for kind, state, count in rows}

    def with_remainder(self) -> list[OperationRecord]:
        """The succeeded operations with deferred steps neither done nor skipped, in the order they were journaled."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM operations WHERE state = ? AND id IN (SELECT operation_id FROM steps WHERE deferred = 1"
                " AND state NOT IN (?, ?)) ORDER BY seq",
                (int(OperationState.SUCCEEDED), int(StepState.DONE), int(StepState.SKIPPED)),
            )
            return [_record(db, row) for row in rows.fetchall()]

    def page(self, size: int, token: str = "") -> tuple[list[OperationRecord], str]:
        """Up to size operations, newest first, after the page that returned token ("" starts with the newest), and
        the token of the next page ("" after the last). Pages are cut by journal order, so operations journaled
        meanwhile never shift a later page: they are newer than its start."""
        if size < 1:
            raise ValueError(f"a page holds at least one operation, not {size}")
        before = _decode_page_token(token) if token else _NEWEST
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM operations WHERE seq < ? ORDER BY seq DESC LIMIT ?", (before, size + 1)
            ).fetchall()
            records = [_record(db, row) for row in rows[:size]]
        more = len(rows) > size
        return records, _encode_page_token(rows[size - 1]["seq"]) if more else ""

    # --- tokens -------------------------------------------------------------------------------------------------

    def put_token(self, row: TokenRecord) -> None:
        """Store a name's token, replacing any earlier one: one token per name, so issuing again never collides."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO tokens (name, secret_digest, expires_at, issued_by, bound_fingerprint, state,"
                " issued_at) VALUES (:name, :secret_digest, :expires_at, :issued_by, :bound_fingerprint, :state,"
                " :issued_at)",
                _token_columns(row),
            )

    def token(self, name: str) -> TokenRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM tokens WHERE name = ?", (name,)).fetchone()
        return None if row is None else _token(row)

    def tokens(self, now: float) -> list[TokenRecord]:
        """The tokens that can still be used at now (active and unexpired), by name."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM tokens WHERE state = 'active' AND expires_at > ? ORDER BY name", (now,)
            ).fetchall()
        return [_token(row) for row in rows]

    def update_token(self, row: TokenRecord) -> None:
        """Record a token's new state (bound, consumed, released, revoked); UnknownToken if its name has none."""
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE tokens SET secret_digest = :secret_digest, expires_at = :expires_at, issued_by = :issued_by,"
                " bound_fingerprint = :bound_fingerprint, state = :state, issued_at = :issued_at WHERE name = :name",
                _token_columns(row),
            )
            if updated.rowcount == 0:
                raise UnknownToken(f"no token is stored for {row.name}")

    def delete_tokens_of(self, name: str) -> int:
        """Delete the tokens of a removed member; returns how many there were."""
        with self._transaction() as db:
            return db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount

    # --- recoveries ---------------------------------------------------------------------------------------------

    def recoveries(self) -> list[Recovery]:
        """The recoveries that started this journal (one, if any), oldest first."""
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM recoveries ORDER BY seq").fetchall()
        return [_recovery(row) for row in rows]


# --- evidence, diagnosis and recovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """`<journal>.id`: the journal's id and the epoch of its latest open."""

    journal_id: str
    epoch: int


@dataclass(frozen=True)
class Diagnosis:
    """What the journal's files say, read without changing them."""

    marker: Marker | None
    epoch: int | None  # the epoch the journal holds, when it could be read
    damage: str  # what is wrong, in a sentence after "journal PATH"; "" when it can be trusted (or there is none,
    # and no evidence of one)


@dataclass(frozen=True)
class AgentEpoch:
    """The newest epoch an agent has admitted (None: not learned) and how it was learned, or why not."""

    name: str
    epoch: int | None
    how: str


@dataclass(frozen=True)
class Recovery:
    """A recovery, as the journal it started records it."""

    recovered_at: float
    requested_by: str
    damage: str
    moved_to: str
    moved: tuple[str, ...]
    agents: tuple[AgentEpoch, ...]
    epoch: int


def marker_path(path: str | os.PathLike[str]) -> str:
    return f"{os.fspath(path)}{MARKER_SUFFIX}"


def diagnose(path: str | os.PathLike[str], seen_epochs: Mapping[str, int] | None = None) -> Diagnosis:
    """Whether the journal at path can be trusted, from its files, its marker and the epochs agents have admitted
    (seen_epochs). Reads only; the caller holds the journal's lock, or the answer may be out of date at once."""
    path = os.fspath(path)
    seen = {name: epoch for name, epoch in (seen_epochs or {}).items() if epoch > 0}
    try:
        marker = _read_marker(path)
    except ValueError as error:
        return Diagnosis(None, None, str(error))
    size = _size(path)
    if not size:
        found = "is missing" if size is None else "is empty (0 bytes)"
        if wal := _size(f"{path}-wal"):
            return Diagnosis(marker, None, f"{found}, yet its write-ahead log {path}-wal holds {wal} bytes")
        evidence = _evidence(path, marker, seen)
        return Diagnosis(marker, None, f"{found}, yet {evidence}" if evidence else "")
    damage, epoch, journal_id = _read_checked(path, size)
    if damage or epoch is None:
        return Diagnosis(marker, epoch, damage)
    if marker is not None and journal_id is not None and journal_id != marker.journal_id:
        return Diagnosis(
            marker,
            epoch,
            f"is journal {journal_id}, but its marker {marker_path(path)} names journal {marker.journal_id}: "
            "another journal was put in its place",
        )
    if marker is not None and epoch < marker.epoch:
        return Diagnosis(
            marker,
            epoch,
            f"holds epoch {epoch}, but its marker {marker_path(path)} says epoch {marker.epoch} was opened: "
            "transactions it committed are lost (SQLite reads a write-ahead log only up to its first frame whose "
            "checksum fails)",
        )
    ahead = sorted((name, seen_epoch) for name, seen_epoch in seen.items() if seen_epoch > epoch)
    if ahead:
        agents = ", ".join(f"{name} epoch {seen_epoch}" for name, seen_epoch in ahead)
        return Diagnosis(
            marker,
            epoch,
            f"holds epoch {epoch}, but agents have admitted steps of later epochs ({agents}): it is older than "
            "the cluster's journal (a restored copy, or it lost transactions)",
        )
    return Diagnosis(marker, epoch, "")


def recover(
    path: str | os.PathLike[str], *, agents: Sequence[AgentEpoch], requested_by: str, now: float | None = None
) -> Recovery:
    """Replaces a damaged journal (see diagnose) by a new one, under the journal's lock: moves every file of the old
    one (the database, its WAL and shared memory, its marker) into `<path>.damaged-<UTC time>/`, never deleting
    one, and creates the new journal at the highest epoch known (the marker's, the old journal's if it can still
    be read, every agent's), so that its first open bumps above all of them. The recovery is the new journal's
    first row (`recoveries`), and its marker is written before this returns.

    JournalLocked while a coordinator holds the journal; JournalHealthy, changing nothing, if it passes every check.
    """
    path = os.fspath(path)
    now = time.time() if now is None else now
    lock_fd = _lock(path)
    try:
        known = {agent.name: agent.epoch for agent in agents if agent.epoch is not None}
        diagnosis = diagnose(path, known)
        if not diagnosis.damage:
            raise JournalHealthy(f"journal {path} passes every check: there is nothing to recover")
        moved_to, moved = _move_aside(path, now)
        epoch = max(0, *known.values(), diagnosis.epoch or 0, diagnosis.marker.epoch if diagnosis.marker else 0)
        recovery = Recovery(now, requested_by, diagnosis.damage, moved_to, moved, tuple(agents), epoch)
        db = _connect(path)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                marker = _create_schema(db, epoch)
                db.execute(
                    "INSERT INTO recoveries (recovered_at, requested_by, damage, moved_to, moved, agents, epoch)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        recovery.recovered_at,
                        recovery.requested_by,
                        recovery.damage,
                        recovery.moved_to,
                        json.dumps(list(recovery.moved)),
                        json.dumps([[a.name, a.epoch, a.how] for a in recovery.agents]),
                        recovery.epoch,
                    ),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()
        _write_marker(path, marker)
        return recovery
    finally:
        os.close(lock_fd)


def _lock(path: str) -> int:
    """An exclusive flock on `<path>.lock`, held through the returned descriptor; JournalLocked if it is taken."""
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(lock_fd)
        raise JournalLocked(f"journal {path} is held by another coordinator (pid {holder})") from None
    try:
        # For the message above, when the next coordinator is turned away.
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        # WAL: a commit is one append to the log, fsynced (FULL) before COMMIT returns; a torn append is discarded
        # on the next open, so a transaction survives a crash whole or not at all.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        db.close()
        raise
    return db


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _read_marker(path: str) -> Marker | None:
    """The marker, None if there is none; ValueError (the damage, as a sentence) if it holds anything else."""
    where = marker_path(path)
    try:
        with open(where, "rb") as marker:
            text = marker.read()
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(text)
        return Marker(str(fields["journal_id"]), int(fields["epoch"]))
    except (ValueError, TypeError, KeyError):
        # Written atomically, a marker is whole or absent: anything else was damaged, and still says a journal was.
        raise ValueError(f"has a marker {where} that does not hold a journal id and an epoch") from None


def _write_marker(path: str, marker: Marker) -> None:
    document = {"journal_id": marker.journal_id, "epoch": marker.epoch}
    write_atomically(Path(marker_path(path)), (json.dumps(document) + "\n").encode(), mode=0o600)


def _evidence(path: str, marker: Marker | None, seen: Mapping[str, int]) -> str:
    """What says that a journal was here, as a phrase; "" when nothing does."""
    evidence = []
    if marker is not None:
        evidence.append(
            f"its marker {marker_path(path)} names journal {marker.journal_id}, opened at epoch {marker.epoch}"
        )
    if seen:
        agents = ", ".join(f"{name} epoch {epoch}" for name, epoch in sorted(seen.items()))
        evidence.append(f"agents have admitted steps of a journal ({agents})")
    return " and ".join(evidence)


def _read_checked(path: str, size: int) -> tuple[str, int | None, str | None]:
    """(damage, epoch, journal id) of a journal file that has content, read through a read-only connection."""
    with open(path, "rb") as journal:
        header = journal.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or not header.startswith(_SQLITE_MAGIC):
        return f"is not an SQLite database: its {size} bytes do not start with SQLite's header", None, None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is valid only while the change counter it was written with is current.
    if header[24:28] == header[92:96] and pages * page_size > size:
        return (
            f"is cut short: its header counts {pages} pages of {page_size} bytes ({pages * page_size} bytes), "
            f"the file holds {size}",
            None,
            None,
        )
    # Without a WAL, immutable: a read-only connection would create an empty WAL and shared memory beside the file.
    access = "mode=ro" if os.path.exists(f"{path}-wal") else "immutable=1"
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?{access}", uri=True)
    except sqlite3.Error as error:
        return f"cannot be opened by SQLite: {error}", None, None
    try:
        report = [str(line) for (line,) in db.execute(f"PRAGMA integrity_check({_INTEGRITY_LINES})")]
        if report != ["ok"]:
            return f"fails SQLite's integrity check: {'; '.join(' '.join(line.split()) for line in report)}", None, None
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [table for table in _TABLES if table not in tables]
        if missing:
            return f"lacks the journal's table(s) {', '.join(missing)}", None, None
        epochs = db.execute("SELECT value FROM epoch").fetchall()
        if len(epochs) != 1 or not isinstance(epochs[0][0], int):
            return f"holds {len(epochs)} epoch rows instead of one number", None, None
        identity = db.execute("SELECT journal_id FROM identity").fetchall() if "identity" in tables else []
        return "", int(epochs[0][0]), str(identity[0][0]) if identity else None
    except sqlite3.Error as error:
        return f"cannot be read by SQLite: {error}", None, None
    finally:
        db.close()


def _move_aside(path: str, now: float) -> tuple[str, tuple[str, ...]]:
    """Moves the journal's files into a new directory beside it; that directory ("" if none moved) and their names."""
    present = [
        candidate
        for candidate in (path, *(f"{path}{suffix}" for suffix in _SIDE_SUFFIXES), marker_path(path))
        if os.path.lexists(candidate)
    ]
    if not present:
        return "", ()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = f"{path}.damaged-{stamp}"
    suffix = 1
    while True:
        try:
            os.mkdir(target, 0o700)
            break
        except FileExistsError:
            suffix += 1
            target = f"{path}.damaged-{stamp}-{suffix}"
    for source in present:
        os.rename(source, os.path.join(target, os.path.basename(source)))
    # The renames are durable only once both directories are synced.
    for directory in (target, os.path.dirname(os.path.abspath(path))):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target, tuple(os.path.basename(source) for source in present)


def _recovery(row: sqlite3.Row) -> Recovery:
    return Recovery(
        recovered_at=row["recovered_at"],
        requested_by=row["requested_by"],
        damage=row["damage"],
        moved_to=row["moved_to"],
        moved=tuple(json.loads(row["moved"])),
        agents=tuple(AgentEpoch(name, epoch, how) for name, epoch, how in json.loads(row["agents"])),
        epoch=row["epoch"],
    )


# --- rows ⇄ values --------------------------------------------------------------------------------------------------


def _create_schema(db: sqlite3.Connection, epoch: int) -> Marker:
    """A new journal's tables, at epoch (its first open bumps above it), and its new id."""
    for statement in (*_SCHEMA, *_EVIDENCE_SCHEMA):
        db.execute(statement)
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    db.execute("INSERT INTO epoch (value) VALUES (?)", (epoch,))
    marker = Marker(uuid.uuid4().hex, epoch)
    db.execute("INSERT INTO identity (journal_id) VALUES (?)", (marker.journal_id,))
    return marker


def _migrate_and_bump_epoch(db: sqlite3.Connection, path: str) -> Marker:
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if exists is None:
        _create_schema(db, 0)
    (version,) = db.execute("SELECT version FROM schema_version").fetchone()
    if version == 2:
        # Every step of a version-2 journal was planned before deferred steps existed: none is deferred.
        db.execute("ALTER TABLE steps ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0")
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        version = SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise JournalError(f"journal {path} has schema version {version}; this coordinator reads {SCHEMA_VERSION}")
    for statement in _EVIDENCE_SCHEMA:
        db.execute(statement)
    identity = db.execute("SELECT journal_id FROM identity").fetchone()
    if identity is None:
        # A journal from before markers: it gets its id now, and its marker from this open on.
        identity = (uuid.uuid4().hex,)
        db.execute("INSERT INTO identity (journal_id) VALUES (?)", identity)
    (epoch,) = db.execute("UPDATE epoch SET value = value + 1 RETURNING value").fetchone()
    return Marker(str(identity[0]), int(epoch))


def _operation_columns(record: OperationRecord) -> dict[str, object]:
    member, audit = record.member, record.audit
    return {
        "id": record.id,
        "request_id": audit.request_id,
        "kind": int(record.kind),
        "state": int(record.state),
        "member_name": member.name,
        "member_certificate_fingerprint": member.certificate_fingerprint,
        "member_address": member.address,
        "member_node_id": str(member.node_id),
        "member_role": None if member.role is None else int(member.role),
        "error": record.error,
        "plan": record.plan,
        "attempts": record.attempts,
        "requested_by": audit.requested_by,
        "certificate_fingerprint": audit.certificate_fingerprint,
        "verdict": audit.verdict,
        "fingerprint": audit.fingerprint,
        "acknowledged": json.dumps(list(audit.acknowledged)),
        "epoch": record.epoch,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def _one(db: sqlite3.Connection, where: str, value: str) -> OperationRecord | None:
    row = db.execute(f"SELECT * FROM operations WHERE {where}", (value,)).fetchone()
    return None if row is None else _record(db, row)


def _step_rows(db: sqlite3.Connection, operation_id: str) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM steps WHERE operation_id = ? ORDER BY position", (operation_id,)).fetchall()


def _record(db: sqlite3.Connection, row: sqlite3.Row) -> OperationRecord:
    return OperationRecord(
        id=row["id"],
        kind=OperationKind(row["kind"]),
        member=Member(
            name=row["member_name"],
            certificate_fingerprint=row["member_certificate_fingerprint"],
            address=row["member_address"],
            node_id=int(row["member_node_id"]),
            role=None if row["member_role"] is None else Role(row["member_role"]),
        ),
        state=OperationState(row["state"]),
        steps=tuple(_step(step) for step in _step_rows(db, row["id"])),
        error=row["error"],
        plan=row["plan"],
        attempts=row["attempts"],
        audit=Audit(
            requested_by=row["requested_by"],
            certificate_fingerprint=row["certificate_fingerprint"],
            request_id=row["request_id"],
            verdict=row["verdict"],
            fingerprint=row["fingerprint"],
            acknowledged=tuple(json.loads(row["acknowledged"])),
        ),
        epoch=row["epoch"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _step(row: sqlite3.Row) -> Step:
    return Step(
        row["name"],
        commit_point=bool(row["commit_point"]),
        state=StepState(row["state"]),
        finished_at=row["finished_at"],
        target=row["target"],
        action=_action(row["action"]),
        deferred=bool(row["deferred"]),
    )


def _planned(step: Step) -> Step:
    """The step as planned, whatever has happened to it since."""
    return replace(step, state=StepState.PENDING, finished_at=None)


# An action is stored as its fields plus its class's name; JSON keeps an enum field (Role) as its number, and the
# field's declared type turns it back.
_ACTIONS: Mapping[str, Callable[..., Action]] = {kind.__name__: kind for kind in get_args(Action)}


def _action_json(action: Action | None) -> str | None:
    return None if action is None else json.dumps({"type": type(action).__name__, **asdict(action)})


def _action(text: str | None) -> Action | None:
    if text is None:
        return None
    fields = json.loads(text)
    kind = _ACTIONS[fields.pop("type")]
    declared = get_type_hints(kind)
    return kind(**{name: _typed(declared[name], value) for name, value in fields.items()})


def _typed(declared: object, value: object) -> object:
    # An optional enum (Role | None) is declared as a union: the enum is the first of its arguments.
    kind = next(iter(get_args(declared)), declared)
    return kind(value) if value is not None and isinstance(kind, type) and issubclass(kind, Enum) else value


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        name=row["name"],
        secret_digest=row["secret_digest"],
        expires_at=row["expires_at"],
        issued_by=row["issued_by"],
        bound_fingerprint=row["bound_fingerprint"],
        state=TokenState[row["state"].upper()],  # the table's CHECK admits only the three states
        issued_at=row["issued_at"],
    )


def _token_columns(record: TokenRecord) -> dict[str, object]:
    return {**vars(record), "state": record.state.value.lower()}


# A page token is the seq of the last operation on the page, wrapped so that callers treat it as opaque.
_PAGE_TOKEN_PREFIX = "before:"


def _encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_PAGE_TOKEN_PREFIX}{seq}".encode()).decode()


# The seqs a page token can name: SQLite's INTEGER PRIMARY KEY values, which start at 1.
_SEQ_RANGE = range(1, 2**63)


def _decode_page_token(token: str) -> int:
    """The seq a page token names. Only what `_encode_page_token` makes is one: the digits of a seq SQLite can hold
    (an int too large for it would fail in the query, with the driver's words), written as it writes them."""
    try:
        text = base64.b64decode(token, altchars=b"-_", validate=True).decode()  # urlsafe, and nothing else
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    digits = text.removeprefix(_PAGE_TOKEN_PREFIX) if text.startswith(_PAGE_TOKEN_PREFIX) else ""
    # ASCII digits alone, without a leading zero: int() would also take "+1", " 1", "1_0" and other scripts' digits.
    if digits.isascii() and digits.isdigit() and not digits.startswith("0") and len(digits) <= 19:
        seq = int(digits)
        if seq in _SEQ_RANGE:
            return seq
    raise InvalidPageToken("not a page token this journal handed out")
