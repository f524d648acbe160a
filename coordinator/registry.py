"""The coordinator's registry: the member certificates it pins (and where their agents listen), and the
certificates of operators and other coordinators, each with its principal.

It is a JSON file, replaced atomically by whoever changes it and re-read by the coordinator when its stat
identity changes, so a certificate removed from it is refused without a restart (see coordinator/auth.py).
Operator and coordinator certificates live only here, never in the cluster's truststores.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.auth import Peer, Principal
from coordinator.files import write_atomically
from coordinator.pki import fingerprint


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
    """The registry file, read lazily and re-read only when it changes (one stat per use)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stat: tuple[int, int, int] | None = None
        self._contents = _Contents((), {}, b"")
        # The TLS stack asks for the bundle from its own threads.
        self._lock = threading.Lock()

    def _current(self) -> _Contents:
        with self._lock:
            st = os.stat(self._path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._stat:
                self._contents = _parse(json.loads(self._path.read_text()))
                self._stat = key
            return self._contents

    def members(self) -> tuple[RegisteredMember, ...]:
        return self._current().members

    def peers(self) -> Mapping[str, Peer]:
        return self._current().peers

    def bundle(self) -> bytes:
        return self._current().bundle

    def register(self, member: RegisteredMember) -> None:
        """Adds (or replaces) a member's agent address and pinned certificate in the file."""
        with self._lock:
            document = json.loads(self._path.read_text())
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
            document = json.loads(self._path.read_text())
            members = document.get("members", [])
            kept = [m for m in members if m["name"] != name]
            if len(kept) == len(members):
                return False
            document["members"] = kept
            write_atomically(self._path, json.dumps(document, indent=2).encode())
            return True


def _parse(document: dict[str, list[dict[str, str]]]) -> _Contents:
    members = tuple(
        RegisteredMember(m["name"], m["agent_address"], m.get("certificate", "")) for m in document.get("members", [])
    )
    identities = tuple(
        RegisteredIdentity(i["name"], Principal(i["principal"]), i["certificate"])
        for i in document.get("identities", [])
    )
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
