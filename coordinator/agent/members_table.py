"""The local backend's members table: one SQLite file holding microcluster's `core_cluster_members`.

All nodes of a local cluster read the same file; it stands in for the replicated table. The schema is
microcluster's, including what it does not enforce: `address` is not unique, and `role` is free text (the
heartbeat writes "" for a row whose address is not in dqlite), so both are reported verbatim.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path

from coordinator import pki
from coordinator.core.model import InvalidEntry, MemberRecord, Role, Source, SourceReport

_SCHEMA = """
CREATE TABLE IF NOT EXISTS core_cluster_members (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    certificate TEXT NOT NULL,
    schema_internal INTEGER NOT NULL,
    schema_external INTEGER NOT NULL,
    heartbeat DATETIME NOT NULL,
    role TEXT NOT NULL,
    api_extensions TEXT NOT NULL DEFAULT '[]',
    UNIQUE (name),
    UNIQUE (certificate)
)
"""

# microcluster writes PENDING until the heartbeat replaces it with go-dqlite's NodeRole.String().


class MemberRows:
    """Turns `core_cluster_members` rows (id, name, address, certificate, role) into records, for the local and
    the dqlite backend alike. Parsing and hashing a certificate costs ~50 us; rows rarely change, so
    fingerprints are kept by PEM from one call to the next."""

    def __init__(self) -> None:
        self._fingerprints: dict[str, tuple[str, str]] = {}

    def records(
        self, rows: Iterable[Sequence[object]], *, include_certificates: bool
    ) -> tuple[tuple[MemberRecord, ...], tuple[InvalidEntry, ...]]:
        records: list[MemberRecord] = []
        invalid: list[InvalidEntry] = []
        fingerprints: dict[str, tuple[str, str]] = {}
        for row_id, name, address, certificate, role_text in rows:
            entry = f"row {row_id}"
            if not (
                isinstance(name, str)
                and isinstance(address, str)
                and isinstance(certificate, str)
                and isinstance(role_text, str)
            ):
                # SQLite's column types are advisory: a BLOB or NULL written by hand is not a member.
                invalid.append(InvalidEntry(entry, "a column holds a value that is not text"))
                continue
            fingerprint, problem = fingerprints[certificate] = self._fingerprint(certificate)
            if problem:
                # The row is still a member to microcluster (it never parses the column), so it is
                # reported, without a fingerprint, next to the invalid entry.
                invalid.append(InvalidEntry(entry, problem))
            records.append(
                MemberRecord(
                    name=name,
                    address=address,
                    certificate_fingerprint=fingerprint,
                    role=Role.from_text(role_text),
                    role_text=role_text,
                    entry=entry,
                    certificate_pem=certificate if include_certificates else "",
                )
            )
        self._fingerprints = fingerprints
        return tuple(records), tuple(invalid)

    def _fingerprint(self, certificate: str) -> tuple[str, str]:
        """(fingerprint, "") or ("", why the certificate does not parse)."""
        known = self._fingerprints.get(certificate)
        if known is None:
            try:
                known = (pki.fingerprint(certificate), "")
            except ValueError as exc:
                known = ("", f"certificate does not parse: {exc}")
        return known


class MembersTableReader:
    """Reads the table over one kept read-only connection (a SELECT of 100 rows then costs ~0.1 ms)."""

    source = Source.MEMBERS_TABLE

    def __init__(self, path: Path) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None
        self._opened: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the connection holds
        self._rows = MemberRows()
        self._last: tuple[tuple[int, int, bool], SourceReport] | None = None

    async def read(self, *, include_certificates: bool, within: float | None = None) -> SourceReport:
        try:
            version = self._version()
            if self._last is not None and self._last[0] == (*version, include_certificates):
                # Nothing was committed since: the same report, as the same object, which the agent compares by
                # identity before it reuses its last answer.
                return self._last[1]
            rows, mtime = self._select()
        except (OSError, sqlite3.Error) as exc:
            self._close()  # whatever went wrong, the next read starts from a fresh connection
            # An OSError names the file itself; SQLite's errors do not.
            reason = str(exc) if isinstance(exc, OSError) else f"{self._path}: {exc}"
            return SourceReport(self.source, error=reason)
        records, invalid = self._rows.records(rows, include_certificates=include_certificates)
        report = SourceReport(self.source, records=records, invalid_entries=invalid, changed_at=mtime)
        self._last = ((*version, include_certificates), report)
        return report

    def _version(self) -> tuple[int, int]:
        """(the file's inode, SQLite's data_version): the pair changes whenever the table may have changed."""
        connection = self._connect()
        (version,) = connection.execute("PRAGMA data_version").fetchone()
        return self._opened[1] if self._opened else 0, int(version)

    def _connect(self) -> sqlite3.Connection:
        # A kept connection would go on reading a file that was deleted or replaced: reopen when the
        # path's identity changes. The stat also turns a missing file into a clear error, where opening
        # read-only would only say "unable to open database file".
        st = os.stat(self._path)
        if self._connection is None or self._opened != (st.st_dev, st.st_ino):
            self._close()
            self._connection = sqlite3.connect(f"{self._path.resolve().as_uri()}?mode=ro", uri=True)
            self._opened = (st.st_dev, st.st_ino)
        return self._connection

    def _select(self) -> tuple[list[tuple[object, ...]], float]:
        rows = (
            self._connect()
            .execute("SELECT id, name, address, certificate, role FROM core_cluster_members ORDER BY id")
            .fetchall()
        )
        return rows, os.stat(self._path).st_mtime

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._opened = None


def _execute(path: Path, sql: str, parameters: tuple[str, ...] = ()) -> None:
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(sql, parameters)


def create_members_table(path: Path) -> None:
    """Creates the file and the table; an existing table is left as it is."""
    _execute(path, _SCHEMA)


# The statements steps write rows with, on either backend. memberguard reads neither the schema versions nor the
# heartbeat; they are filled as a live row's are. Parameters: (name, address, certificate, role text).
UPSERT_MEMBER = (
    "INSERT INTO core_cluster_members"
    " (name, address, certificate, schema_internal, schema_external, heartbeat, role)"
    " VALUES (?, ?, ?, 0, 0, CURRENT_TIMESTAMP, ?)"
    " ON CONFLICT (name) DO UPDATE SET"
    " address = excluded.address, certificate = excluded.certificate, role = excluded.role"
)
DELETE_MEMBER = "DELETE FROM core_cluster_members WHERE name = ?"


def upsert_member(path: Path, name: str, address: str, certificate_pem: str, role_text: str) -> None:
    """Inserts the member's row, or updates the row of that name. role_text is stored verbatim.

    Raises sqlite3.IntegrityError when another row holds the same certificate (the column is UNIQUE).
    """
    _execute(path, UPSERT_MEMBER, (name, address, certificate_pem, role_text))


def delete_member(path: Path, name: str) -> None:
    """Deletes the member's row; deleting an absent row is done already."""
    _execute(path, DELETE_MEMBER, (name,))
