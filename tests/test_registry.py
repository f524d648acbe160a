"""Trust files read by content: the registry (and the agent's pins, and the truststore cache, which share the rule)
notice a rewrite that keeps the size and the mtime, and a registry that does not parse is never used."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from coordinator.agent.filecache import FileCache
from coordinator.agent.service import CoordinatorPins
from coordinator.auth import Principal
from coordinator.pki import fingerprint, make_identity
from coordinator.registry import RegisteredIdentity, RegisteredMember, Registry, UnreadableRegistry, write_registry
from coordinator.watched_file import SETTLE_MARGIN, Stamp, WatchedFile


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Rewrites path with data, same inode, and puts its mtime back: what `cp -p` onto it, or a careful editor,
    does. The size must not change either: the test pads data to it."""
    before = os.stat(path)
    assert len(data) == before.st_size, "the rewrite must keep the size"
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def _padded(document: object, size: int) -> bytes:
    data = json.dumps(document, indent=2).encode()
    assert len(data) <= size
    return data + b" " * (size - len(data))  # JSON allows trailing whitespace


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    path = tmp_path / "registry.json"
    identities = [
        RegisteredIdentity(name, Principal.OPERATOR, make_identity(name).certificate_pem.decode())
        for name in ("alice", "bob")
    ]
    member = make_identity("n1")
    write_registry(path, [RegisteredMember("n1", "127.0.0.1:1", member.certificate_pem.decode())], identities)
    return path


def _operators(registry: Registry) -> set[str]:
    return {p.name for p in registry.peers().values() if p.principal is Principal.OPERATOR}


def test_a_same_size_rewrite_with_the_mtime_kept_is_noticed_at_the_next_call(registry_file: Path) -> None:
    registry = Registry.open(registry_file)
    assert _operators(registry) == {"alice", "bob"}
    document = json.loads(registry_file.read_text())
    document["identities"] = [i for i in document["identities"] if i["name"] != "bob"]
    _rewrite_in_place(registry_file, _padded(document, registry_file.stat().st_size))
    assert _operators(registry) == {"alice"}, "bob is refused at the very next call"


def test_a_settled_version_costs_one_stat_and_a_change_still_shows(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    clock = [os.stat(path).st_ctime_ns / 1e9 + SETTLE_MARGIN + 1]  # long after the write: settled at once
    watched = WatchedFile(path, clock=lambda: clock[0])
    first = watched.current()
    assert watched.current() is first, "unchanged: the same version, from the stat alone"
    _rewrite_in_place(path, b"two")  # a new ctime, which no writer can set back
    assert watched.current().data == b"two"


def test_a_version_read_within_the_margin_is_read_again_until_it_settles() -> None:
    stamp = Stamp(device=1, inode=2, size=3, mtime_ns=0, ctime_ns=1_000 * 10**9)
    assert not stamp.settled(read_at=1_000.0), "a write in the same clock tick could share this stamp"
    assert not stamp.settled(read_at=1_000.0 + SETTLE_MARGIN / 2)
    assert stamp.settled(read_at=1_000.0 + SETTLE_MARGIN + 0.01)


@pytest.mark.parametrize(
    "damage",
    [b'{"members": [{"name": "n1", "agent_', b"\x00" * 10, b"[]", b'{"identities": [{"name": "x"}]}'],
    ids=["torn", "zeros", "not an object", "missing fields"],
)
def test_a_registry_that_does_not_parse_keeps_the_last_good_contents_and_says_so(
    registry_file: Path, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry.open(registry_file)
    good = dict(registry.peers())
    intact = registry_file.read_bytes()
    registry_file.write_bytes(damage)
    with caplog.at_level(logging.INFO, "memberguard.registry"):
        assert registry.peers() == good
        assert registry.peers() == good
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, "once per bad version, not once per call"
        assert str(registry_file) in errors[0].getMessage()
        registry_file.write_bytes(intact)
        assert registry.peers() == good
        assert any("parses again" in r.getMessage() for r in caplog.records)


def test_a_registry_that_does_not_parse_at_start_is_refused_precisely(registry_file: Path) -> None:
    registry_file.write_bytes(b'{"members": [')
    with pytest.raises(UnreadableRegistry, match=r"registry\.json: not JSON \(Expecting value: line 1 column 14"):
        Registry.open(registry_file)


def test_the_writers_refuse_to_rewrite_a_registry_that_does_not_parse(registry_file: Path) -> None:
    registry = Registry.open(registry_file)
    registry_file.write_bytes(b'{"members": [')
    with pytest.raises(UnreadableRegistry):
        registry.forget("n1")
    assert registry_file.read_bytes() == b'{"members": [', "an operator's edit is not replaced"


def test_the_agents_coordinator_pins_are_read_by_content(tmp_path: Path) -> None:
    first = make_identity("c1")
    # Another coordinator's certificate of the same size (a signature's DER length varies by a byte or two).
    second = next(
        other
        for other in (make_identity("c1") for _ in range(100))
        if len(other.certificate_pem) == len(first.certificate_pem)
    )
    pins = tmp_path / "coordinators.pem"
    pins.write_bytes(first.certificate_pem)
    trust = CoordinatorPins(pins)
    assert set(trust.peers()) == {fingerprint(first.certificate_pem)}
    _rewrite_in_place(pins, second.certificate_pem)
    assert set(trust.peers()) == {fingerprint(second.certificate_pem)}


def test_the_truststore_cache_is_read_by_content(tmp_path: Path) -> None:
    path = tmp_path / "n1.yaml"
    path.write_bytes(b"address: one")
    cache = FileCache(lambda _, data: data)
    assert cache.load(str(path)).content == b"address: one"
    _rewrite_in_place(path, b"address: two")
    assert cache.load(str(path)).content == b"address: two"
