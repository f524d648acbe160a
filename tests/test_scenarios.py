"""The divergence scenarios of docs/scenarios.md, made for real in a running lab and checked through
the coordinator: scenario → the exact discrepancies (kind, severity, source, node) it must produce.

Each scenario writes the files the real system would leave behind; the coordinator learns of them only
through its agents, over mutual TLS.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
from memberguard import Client
from memberguard.v1 import membership_pb2 as pb

from coordinator.agent.raft_files import write_raft_config
from coordinator.core.model import Role
from coordinator.lab.lab import Lab
from tests import divergence as d

Expected = list[tuple[str, str, str, str]]  # (kind, severity, source, node) with the enum prefixes dropped


def _ghost_raft_member(lab: Lab) -> None:
    """S1: a node added itself to Raft, then failed and was wiped: no row, no truststore record anywhere."""
    d.set_raft(lab, [*d.raft_entries(lab), (random.getrandbits(63), "127.0.0.1:1", Role.SPARE)])


def _pending_row_only(lab: Lab) -> None:
    """S2: the leader wrote the PENDING row and crashed before anything else."""
    d.add_row(lab, *d.new_member("j1", "127.0.0.1:2"), "PENDING")


def _pending_row_and_leader_trust(lab: Lab) -> None:
    """S3: the joiner died after the leader trusted it, before it added itself to Raft."""
    name, address, certificate = d.new_member("j1", "127.0.0.1:2")
    d.add_row(lab, name, address, certificate, "PENDING")
    d.trust(lab, "n1", name, address, certificate)


def _partial_truststore_fan_out(lab: Lab) -> None:
    """S4: the joiner is in the table and in Raft, but only n1 trusts it yet."""
    name, address, certificate = d.new_member("j1", "127.0.0.1:2")
    d.add_row(lab, name, address, certificate, "spare")
    d.set_raft(lab, [*d.raft_entries(lab), (random.getrandbits(63), address, Role.SPARE)])
    d.trust(lab, "n1", name, address, certificate)


def _row_deleted_while_in_raft(lab: Lab) -> None:
    """S6: n2's row was deleted (by hand, or by a removal that crashed after its first step)."""
    d.delete_row(lab, "n2")


def _removal_crashed_after_raft_remove(lab: Lab) -> None:
    """S7/S8: n3 left the table and Raft; the truststores still hold it, and n3 still believes it is a member."""
    d.delete_row(lab, "n3")
    d.set_raft(lab, [e for e in d.raft_entries(lab) if e[1] != lab.node("n3")["address"]], caches=["n1", "n2"])


def _truststore_record_deleted(node: str) -> Callable[[Lab], None]:
    """S9 (on a follower) and S10 (on n1, whose config lists it first: the local backend's leader)."""

    def scenario(lab: Lab) -> None:
        d.distrust(lab, node, "n3")

    return scenario


def _duplicate_address(lab: Lab) -> None:
    """S12: n2 rejoined under a new name while its old row stayed; every truststore got both."""
    name, _, certificate = d.new_member("n2-new", "")
    address = lab.node("n2")["address"]
    d.add_row(lab, name, address, certificate, "voter")
    for node in ("n1", "n2", "n3"):
        d.trust(lab, node, name, address, certificate)


def _ghost_row(lab: Lab) -> None:
    """S15: a non-PENDING row for a member Raft does not have (the heartbeat set its role to "")."""
    name, address, certificate = d.new_member("x1", "127.0.0.1:3")
    d.add_row(lab, name, address, certificate, "")
    for node in ("n1", "n2", "n3"):
        d.trust(lab, node, name, address, certificate)


def _stale_cluster_cache(lab: Lab) -> None:
    """n2's cluster.yaml lacks n3, and nothing has rewritten it for an hour."""
    cache = d.state_dir(lab, "n2") / "database" / "cluster.yaml"
    write_raft_config(cache, [e for e in d.raft_entries(lab) if e[1] != lab.node("n3")["address"]])
    d.age(cache, 3600)


def _row_with_another_certificate(lab: Lab) -> None:
    """n2's row holds a certificate that is neither in any truststore nor the one n2's agent serves."""
    _, _, certificate = d.new_member("n2", "")
    d.add_row(lab, "n2", lab.node("n2")["address"], certificate, "voter")


def _junk_in_a_truststore(lab: Lab) -> None:
    """A stray file, a file that is not YAML, and a misnamed record in n1's truststore."""
    store = d.truststore(lab, "n1")
    (store / "notes.txt").write_text("not a record")
    (store / "broken.yaml").write_text("name: [unclosed")
    (store / "n2.yaml").rename(store / "old-n2.yaml")


def _truststore_gone(lab: Lab) -> None:
    """n3's truststore directory cannot be read at all."""
    import shutil

    shutil.rmtree(d.truststore(lab, "n3"))


SCENARIOS: dict[str, tuple[Callable[[Lab], None], Expected]] = {
    "S1 ghost Raft member": (_ghost_raft_member, [("MISSING", "BLOCKING", "MEMBERS_TABLE", "")]),
    "S2 PENDING row only": (_pending_row_only, [("MISSING", "BLOCKING", "RAFT_CONFIG", "")]),
    "S3 PENDING row and leader trust": (_pending_row_and_leader_trust, [("MISSING", "BLOCKING", "RAFT_CONFIG", "")]),
    "S4 partial truststore fan-out": (
        _partial_truststore_fan_out,
        [
            ("MISSING", "BLOCKING", "TRUSTSTORE", "n2"),
            ("MISSING", "BLOCKING", "TRUSTSTORE", "n3"),
            ("UNWATCHED_MEMBER", "WARNING", "AGENT", "j1"),
        ],
    ),
    "S6 row deleted, still in Raft": (_row_deleted_while_in_raft, [("MISSING", "BLOCKING", "MEMBERS_TABLE", "")]),
    "S7 removal crashed after Raft remove": (
        _removal_crashed_after_raft_remove,
        [
            ("ORPHAN", "BLOCKING", "TRUSTSTORE", "n1"),
            ("ORPHAN", "BLOCKING", "TRUSTSTORE", "n2"),
            ("ORPHAN", "BLOCKING", "TRUSTSTORE", "n3"),
            ("NODE_INFO_MISMATCH", "BLOCKING", "NODE_INFO", "n3"),
            ("VIEW_DIFFERS", "WARNING", "RAFT_CACHE", "n3"),
        ],
    ),
    "S9 truststore record deleted on a follower": (
        _truststore_record_deleted("n2"),
        [("MISSING", "BLOCKING", "TRUSTSTORE", "n2")],
    ),
    "S10 truststore record deleted on the leader": (
        _truststore_record_deleted("n1"),
        [("MISSING", "BLOCKING", "TRUSTSTORE", "n1")],
    ),
    "S12 duplicate address": (_duplicate_address, [("DUPLICATE_ADDRESS", "BLOCKING", "MEMBERS_TABLE", "")]),
    "S15 ghost row": (_ghost_row, [("MISSING", "BLOCKING", "RAFT_CONFIG", "")]),
    "stale cluster.yaml": (_stale_cluster_cache, [("VIEW_DIFFERS", "WARNING", "RAFT_CACHE", "n2")]),
    "row with another certificate": (
        _row_with_another_certificate,
        [
            ("CERTIFICATE_MISMATCH", "BLOCKING", "TRUSTSTORE", "n1"),
            ("CERTIFICATE_MISMATCH", "BLOCKING", "TRUSTSTORE", "n2"),
            ("CERTIFICATE_MISMATCH", "BLOCKING", "TRUSTSTORE", "n3"),
            ("AGENT_CERTIFICATE_MISMATCH", "BLOCKING", "AGENT", "n2"),
        ],
    ),
    "junk in a truststore": (
        _junk_in_a_truststore,
        [
            ("INVALID_ENTRY", "WARNING", "TRUSTSTORE", "n1"),
            ("INVALID_ENTRY", "WARNING", "TRUSTSTORE", "n1"),
            ("INVALID_ENTRY", "WARNING", "TRUSTSTORE", "n1"),
        ],
    ),
    "truststore unreadable": (_truststore_gone, [("SOURCE_UNREADABLE", "BLOCKING", "TRUSTSTORE", "n3")]),
}


def _observed(client: Client) -> Counter[tuple[str, str, str, str]]:
    diff = client.check_membership(timeout=10).diff
    return Counter(
        (
            pb.DiscrepancyKind.Name(x.kind).removeprefix("DISCREPANCY_KIND_"),
            pb.Severity.Name(x.severity).removeprefix("SEVERITY_"),
            pb.Source.Name(x.source).removeprefix("SOURCE_"),
            x.node,
        )
        for x in diff.discrepancies
    )


def test_the_lab_starts_consistent(lab: Lab, client: Client) -> None:
    response = client.check_membership(timeout=10)
    assert list(response.diff.discrepancies) == []
    assert list(response.diff.nodes) == ["n1", "n2", "n3"]
    assert sorted(m.name for m in response.diff.members) == ["n1", "n2", "n3"]
    assert len(response.diff.fingerprint) == 64


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_produces_its_discrepancies(name: str, pristine: Lab, client: Client) -> None:
    before = client.check_membership(timeout=10).diff.fingerprint
    make, expected = SCENARIOS[name]
    make(pristine)
    assert _observed(client) == Counter(expected)
    diff = client.check_membership(timeout=10).diff
    # The fingerprint covers identities, not the caches that lag by design: a stale cluster.yaml alone must not
    # make a guarded operation race the next cache rewrite.
    lagging_only = all(source in ("RAFT_CACHE", "RAFT_NODE_VIEW") for _, _, source, _ in expected)
    assert (diff.fingerprint == before) is lagging_only
    assert all(x.summary and x.id for x in diff.discrepancies)
    blocking = [x for x in diff.discrepancies if x.severity == pb.SEVERITY_BLOCKING]
    assert all(x.evidence for x in blocking), "every blocking discrepancy shows its evidence"
