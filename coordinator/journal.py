"""The journal: every guarded operation with its plan and each step's outcome, and the join tokens' digests, in one
SQLite file that survives a crash of the coordinator (DESIGN.md, "The journal and recovery").

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

Failures, one class each:

JournalError
├── JournalLocked       another process holds the journal
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, replace
from enum import Enum
from types import TracebackType
from typing import get_args, get_type_hints

from coordinator.core.model import Member, Role
from coordinator.core.operation import Audit, OperationKind, OperationRecord, OperationState, Step, StepState
from coordinator.core.plan import Action
from coordinator.core.tokens import TokenRecord, TokenState

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    # One row: how many times the journal has been opened (DESIGN.md: recovery bumps the epoch).
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
    def open(cls, path: str | os.PathLike[str]) -> Journal:
        """Lock the journal at path (creating it and its schema if missing) and bump its epoch."""
        lock_path = f"{os.fspath(path)}.lock"
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise JournalLocked(f"journal {os.fspath(path)} is held by another coordinator (pid {holder})") from None
        try:
            # For the message above, when the next coordinator is turned away.
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            db.row_factory = sqlite3.Row
            # WAL: a commit is one append to the log, fsynced (FULL) before COMMIT returns; a torn append is
            # discarded on the next open, so a transaction survives a crash whole or not at all.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN IMMEDIATE")
            try:
                epoch = _migrate_and_bump_epoch(db, os.fspath(path))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except BaseException:
            db.close()
            os.close(lock_fd)
            raise
        return cls(db, lock_fd, epoch)

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
                "INSERT INTO steps (operation_id, position, name, commit_point, target, action, state, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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


# --- rows ⇄ values --------------------------------------------------------------------------------------------------


def _migrate_and_bump_epoch(db: sqlite3.Connection, path: str) -> int:
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if exists is None:
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        db.execute("INSERT INTO epoch (value) VALUES (0)")
    (version,) = db.execute("SELECT version FROM schema_version").fetchone()
    if version != SCHEMA_VERSION:
        raise JournalError(f"journal {path} has schema version {version}; this coordinator reads {SCHEMA_VERSION}")
    (epoch,) = db.execute("UPDATE epoch SET value = value + 1 RETURNING value").fetchone()
    return int(epoch)


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


def _decode_page_token(token: str) -> int:
    try:
        text = base64.b64decode(token, altchars=b"-_", validate=True).decode()  # urlsafe, and nothing else
        if text.startswith(_PAGE_TOKEN_PREFIX):
            return int(text.removeprefix(_PAGE_TOKEN_PREFIX))
    except (binascii.Error, UnicodeError, ValueError):
        pass
    raise InvalidPageToken(f"{token!r} is not a page token this journal handed out")
