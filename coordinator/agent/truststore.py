"""A node's truststore, `<state>/truststore/<name>.yaml`, read as microcluster loads it, the certificates it
makes a node trust, and its writers.

Each file holds `name`, `address` ("ip:port") and `certificate` (the member's server.crt PEM). Microcluster
keys its in-memory map by the YAML `name`, not the file name, so a misnamed file still trusts its member:
it is reported both as a record and as an invalid entry. A file microcluster would reject (no certificate)
or choke on (a stray file or subdirectory makes its Replace fail, aborting the heartbeat) is an invalid entry. So is
the temporary file of an interrupted write, but not while that write may still be in flight.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from coordinator import pki
from coordinator.agent.dirwatch import Watch, reliable
from coordinator.agent.filecache import (
    FileCache,
    MalformedFile,
    dump_yaml,
    load_yaml,
)
from coordinator.core.model import InvalidEntry, MemberRecord, Source, SourceReport
from coordinator.files import write_atomically

_SUFFIX = ".yaml"
# microcluster writes each record with renameio.WriteFile: into ".<name>.yaml<digits>" beside it, then renamed over it;
# memberguard's own writers (files.write_atomically) into ".<name>.yaml.<random>.tmp". Such a file is a write in flight
# for moments, and left behind for good by a crash during the write.
_TEMPORARY = re.compile(r"\..+\.yaml(?:[0-9]+|\.[a-z0-9_]+\.tmp)")
IN_FLIGHT = 5.0  # seconds a temporary file may be a write in flight: either writer's writes of a record take far less


@dataclass(frozen=True, slots=True)
class _Entry:
    """One parsed file, in both forms a report may want, so a cache hit allocates nothing."""

    with_certificate: MemberRecord
    without_certificate: MemberRecord
    misnamed: InvalidEntry | None


def _required_text(document: dict[object, object], key: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedFile(f"{key} missing or empty")
    return value


def _parse_entry(path: str, data: bytes) -> _Entry:
    document = load_yaml(data)
    if not isinstance(document, dict):
        raise MalformedFile("not a YAML mapping")
    name = _required_text(document, "name")
    address = _required_text(document, "address")
    certificate = _required_text(document, "certificate")
    try:
        fingerprint = pki.fingerprint(certificate)
    except ValueError as exc:
        raise MalformedFile(f"certificate does not parse: {exc}") from exc
    file_name = os.path.basename(path)
    record = MemberRecord(
        name=name,
        address=address,
        certificate_fingerprint=fingerprint,
        certificate_pem=certificate,
        entry=file_name,
    )
    misnamed = None
    if file_name != name + _SUFFIX:
        misnamed = InvalidEntry(file_name, f"misnamed: file {file_name} holds name {name}")
    return _Entry(record, replace(record, certificate_pem=""), misnamed)


class TruststoreReader:
    """Reads one truststore directory; a hit on an unchanged file costs one stat, and an unchanged directory none
    while its watch can vouch for it (dirwatch.py)."""

    source = Source.TRUSTSTORE

    def __init__(self, directory: Path) -> None:
        self._directory = str(directory)
        self._cache = FileCache(_parse_entry)
        self._last: tuple[tuple[object, ...], SourceReport] | None = None
        self._watch = Watch(self._directory)
        # The last full read's report, by include_certificates, for as long as the watch sees no change.
        self._quiet: dict[bool, SourceReport] = {}

    async def read(self, *, include_certificates: bool, within: float | None = None) -> SourceReport:
        if not self._watch.unchanged():
            self._quiet.clear()
        elif (quiet := self._quiet.get(include_certificates)) is not None:
            return quiet
        try:
            # The directory's mtime moves on every add, replace (rename) and removal: the truststore's age.
            mtime = os.stat(self._directory).st_mtime
            with os.scandir(self._directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            return SourceReport(self.source, error=str(exc))
        records: list[MemberRecord] = []
        invalid: list[InvalidEntry] = []
        # What this read saw, entry by entry; the cache returns the same objects for unchanged files, so an
        # unchanged truststore yields an equal key and the same report object (see MembersTableReader.read).
        seen: list[object] = [mtime, include_certificates]
        in_flight = False  # a temporary file skipped now is an invalid entry later, with no event to tell
        for entry in entries:
            if _TEMPORARY.fullmatch(entry.name):
                if _younger(entry, IN_FLIGHT):
                    in_flight = True
                    continue
                seen.append(entry.name)
                invalid.append(InvalidEntry(entry.name, "the temporary file of an interrupted write"))
                continue
            if not entry.name.endswith(_SUFFIX) or not entry.is_file():
                seen.append(entry.name)
                invalid.append(InvalidEntry(entry.name, "not a .yaml file"))
                continue
            try:
                content = self._cache.load(entry.path).content
            except FileNotFoundError:
                continue  # removed since the listing: it is no longer part of the truststore
            except OSError as exc:
                seen.append(f"{entry.name}: {exc}")
                invalid.append(InvalidEntry(entry.name, f"unreadable: {exc}"))
                continue
            seen.append(content)
            if isinstance(content, MalformedFile):
                invalid.append(InvalidEntry(entry.name, str(content)))
                continue
            records.append(content.with_certificate if include_certificates else content.without_certificate)
            if content.misnamed is not None:
                invalid.append(content.misnamed)
        self._cache.retain({entry.path for entry in entries})
        key = tuple(seen)
        if self._last is None or self._last[0] != key:
            report = SourceReport(self.source, records=tuple(records), invalid_entries=tuple(invalid), changed_at=mtime)
            self._last = (key, report)
        if self._watch.watching is not None and not in_flight and reliable(entries):
            self._quiet[include_certificates] = self._last[1]
        return self._last[1]


def _younger(entry: os.DirEntry[str], seconds: float) -> bool:
    try:
        return time.time() - entry.stat().st_mtime < seconds
    except FileNotFoundError:
        return True  # renamed since the listing: the write is done


def trusted_certificates(directory: Path) -> list[str]:
    """The PEM certificates a node with this truststore trusts, as the directory is now: those of its records, in
    file-name order. What is not a record (no certificate, not a YAML mapping, not a .yaml file) adds none; a
    missing or unreadable directory trusts nobody."""
    try:
        paths = sorted(path for path in directory.iterdir() if path.name.endswith(_SUFFIX))
    except OSError:
        return []
    certificates = []
    for path in paths:
        try:
            entry = _parse_entry(str(path), path.read_bytes())
        except (OSError, MalformedFile):
            continue
        certificates.append(entry.with_certificate.certificate_pem)
    return certificates


def file_name_problem(name: str) -> str | None:
    """Why `name` cannot name a truststore file, or None: a member name becomes a file name, and nothing may land
    outside the directory."""
    if not name:
        return "must not be empty"
    if "/" in name or "\0" in name or name in (".", ".."):
        return f"{name!r} is not usable as a file name"
    return None


def _entry_path(directory: Path, name: str) -> Path:
    problem = file_name_problem(name)
    if problem is not None:
        raise ValueError(f"not a member name usable as a file name: {problem}")
    return directory / f"{name}{_SUFFIX}"


def write_truststore_entry(directory: Path, name: str, address: str, certificate_pem: str) -> None:
    """Writes (or replaces) `<name>.yaml`: directory 0700, file 0644, as microcluster keeps them."""
    document = {"name": name, "address": address, "certificate": certificate_pem}
    write_atomically(_entry_path(directory, name), dump_yaml(document))


def remove_truststore_entry(directory: Path, name: str) -> None:
    """Removes `<name>.yaml`; removing an absent entry is done already."""
    _entry_path(directory, name).unlink(missing_ok=True)
