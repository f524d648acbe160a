"""The coordinator's registry: the member certificates it pins (and where their agents listen), and the
certificates of operators and other coordinators, each with its principal.

It is a JSON file, replaced atomically by whoever changes it and re-read by the coordinator when its content changes
(coordinator/watched_file.py: a same-size rewrite that keeps the mtime is noticed too), so a certificate removed from
it is refused at the next call, without a restart (see coordinator/auth.py). Operator and coordinator certificates
live only here, never in the cluster's truststores.

A registry that does not parse (torn by a writer that does not replace it atomically, or a hand edit gone wrong) or
cannot be read is not used: the coordinator keeps the last contents that parsed, and logs an ERROR naming the file
and what is wrong, once per bad version; the next good version is used at the next call. Refusing every call instead
would turn an operator's half-saved edit into an outage of every agent's and operator's trust, while the last good
contents are what the operator last declared. At start there is nothing to keep: `Registry.open` refuses an
unreadable registry with the same precise error, and the coordinator does not start. The writers (`register`,
`forget`) refuse to rewrite a registry that does not parse, rather than replace an operator's edit.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.auth import Peer, Principal
from coordinator.files import write_atomically
from coordinator.pki import fingerprint
from coordinator.watched_file import Version, WatchedFile

log = logging.getLogger("memberguard.registry")


class UnreadableRegistry(Exception):
    """The registry cannot be read or does not hold a registry; the message names the file and what is wrong."""


@dataclass(frozen=True)
class RegisteredMember:
    """A member, the address of its agent, and the certificate the coordinator pins for it ("" when it pins
    none and trusts what the cluster's truststores record under the member's name)."""

    name: str
    agent_address: str
    certificate_pem: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate_pem)


@dataclass(frozen=True)
class RegisteredIdentity:
    """An operator's or coordinator's certificate and the principal it acts as."""

    name: str
    principal: Principal
    certificate_pem: str


@dataclass(frozen=True)
class _Contents:
    members: tuple[RegisteredMember, ...]
    peers: Mapping[str, Peer]
    bundle: bytes


class Registry:
    """The registry file, read lazily and re-read only when its content changes (one stat per use, once settled)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file = WatchedFile(path)
        self._contents = _Contents((), {}, b"")
        self._parsed: Version | None = None  # the version _contents came from
        self._refused: Version | None = None  # the last version that did not parse
        self._why = ""  # why the file is not in use, while it is not (logged once per reason)
        # The TLS stack asks for the bundle from its own threads.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> Registry:
        """The registry, read once now: UnreadableRegistry if it cannot be used (there are no last good contents to
        keep yet)."""
        registry = cls(path)
        registry._current()
        return registry

    def _current(self) -> _Contents:
        with self._lock:
            self._read()
            return self._contents

    def _read(self) -> None:
        try:
            version = self._file.current()
        except OSError as error:
            self._refuse(f"{self._path}: cannot be read: {error.strerror or error}")
            return
        if version is self._parsed:
            return
        if version is not self._refused:
            try:
                contents = _parse(self._path, version.data)
            except UnreadableRegistry as error:
                self._refused = version
                self._refuse(str(error))
                return
            if self._why:
                log.info("%s: parses again; its contents are in use", self._path)
            self._contents, self._parsed, self._refused, self._why = contents, version, None, ""
        elif self._parsed is None:
            raise UnreadableRegistry(self._why)

    def _refuse(self, why: str) -> None:
        """Keeps the last good contents, or raises if there are none; logs each new reason once."""
        if why != self._why:
            self._why = why
            if self._parsed is not None:
                log.error("%s; the last contents that parsed stay in use until it is fixed", why)
        if self._parsed is None:
            raise UnreadableRegistry(why)

    def members(self) -> tuple[RegisteredMember, ...]:
        return self._current().members

    def peers(self) -> Mapping[str, Peer]:
        return self._current().peers

    def bundle(self) -> bytes:
        return self._current().bundle

    def register(self, member: RegisteredMember) -> None:
        """Adds (or replaces) a member's agent address and pinned certificate in the file."""
        with self._lock:
            document = self._document()
            members = [m for m in document.get("members", []) if m["name"] != member.name]
            members.append(
                {"name": member.name, "agent_address": member.agent_address, "certificate": member.certificate_pem}
            )
            document["members"] = members
            write_atomically(self._path, json.dumps(document, indent=2).encode())

    def forget(self, name: str) -> bool:
        """Drops member `name` (its agent address and pinned certificate) from the file; True if it was there.
        Its agent is no longer asked, and its certificate is trusted only where a truststore still holds it."""
        with self._lock:
            document = self._document()
            members = document.get("members", [])
            kept = [m for m in members if m["name"] != name]
            if len(kept) == len(members):
                return False
            document["members"] = kept
            write_atomically(self._path, json.dumps(document, indent=2).encode())
            return True

    def _document(self) -> dict[str, Any]:
        """The file's document as it is now, checked whole before a writer changes it."""
        try:
            data = self._path.read_bytes()
        except OSError as error:
            raise UnreadableRegistry(f"{self._path}: cannot be read: {error.strerror or error}") from None
        _parse(self._path, data)
        document: dict[str, Any] = json.loads(data)
        return document


def _parse(path: Path, data: bytes) -> _Contents:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableRegistry(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise UnreadableRegistry(f"{path}: not a JSON object")
    try:
        members = tuple(
            RegisteredMember(_text(m, "name"), _text(m, "agent_address"), _text(m, "certificate", optional=True))
            for m in _entries(document, "members")
        )
        identities = tuple(
            RegisteredIdentity(_text(i, "name"), Principal(_text(i, "principal")), _text(i, "certificate"))
            for i in _entries(document, "identities")
        )
        return _contents(members, identities)
    except ValueError as error:  # a field that is missing or not a string, an unknown principal, a bad certificate
        raise UnreadableRegistry(f"{path}: {error}") from None


def _entries(document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    entries = document.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{key} is not a list of objects")
    return entries


def _text(entry: dict[str, Any], key: str, *, optional: bool = False) -> str:
    value = entry.get(key, "" if optional else None)
    if not isinstance(value, str):
        raise ValueError(f"an entry's {key} is missing or not a string")
    return value


def _contents(members: tuple[RegisteredMember, ...], identities: tuple[RegisteredIdentity, ...]) -> _Contents:
    peers: dict[str, Peer] = {}
    for member in members:
        if member.certificate_pem:
            peers[member.fingerprint] = Peer(Principal.MEMBER, member.name, member.fingerprint)
    for identity in identities:
        fp = fingerprint(identity.certificate_pem)
        peers[fp] = Peer(identity.principal, identity.name, fp)
    pems = [m.certificate_pem for m in members] + [i.certificate_pem for i in identities]
    return _Contents(members, peers, "".join(pems).encode())


def write_registry(path: Path, members: Sequence[RegisteredMember], identities: Sequence[RegisteredIdentity]) -> None:
    document = {
        "members": [
            {"name": m.name, "agent_address": m.agent_address, "certificate": m.certificate_pem} for m in members
        ],
        "identities": [
            {"name": i.name, "principal": i.principal.value, "certificate": i.certificate_pem} for i in identities
        ],
    }
    write_atomically(path, json.dumps(document, indent=2).encode())
