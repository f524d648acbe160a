"""microcluster's own integration tests (example/test/main.sh, PR #515; docs/scenarios.md), ported to
memberguard and run on both backends. `membership` and `force-removal` are in tests/test_operations.py.

* parallel-join: a one-member cluster, three tokens issued, three nodes joining at once: all succeed, nothing is
  left PENDING, the cluster has four members. (microcluster absorbs the skew of concurrent joins with a 5 s retry in
  its check; memberguard queues the joins on its membership lock, so each is guarded against a settled cluster.)
* prejoin: a join that fails leaves nothing behind, so that the same node, with a new token, then joins.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from memberguard import Client
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2 as o

from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests.restarts import start_coordinator
from tests.settling import settled

BACKENDS = ["local", pytest.param("dqlite", marks=pytest.mark.dqlite)]
SETTLE = 10.0


def _settled(client: Client) -> pb.MembershipDiff:
    return settled(client, SETTLE)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def joiners() -> Iterator[list[labs.JoiningNode]]:
    """The nodes a test starts joining; stopped at the end (a lab's `down` knows only the nodes lab.json lists)."""
    started: list[labs.JoiningNode] = []
    yield started
    for joiner in started:
        joiner.stop()


def test_parallel_joins(tmp_path: Path, backend: str, joiners: list[labs.JoiningNode]) -> None:
    lab = labs.up(tmp_path / "lab", 1, backend=backend)
    try:
        joiners += [labs.start_joining_node(lab, f"n{i}") for i in (2, 3, 4)]
        with Client(lab.endpoint) as client:
            tokens = [client.issue_token(joiner.name).token for joiner in joiners]
            with ThreadPoolExecutor(len(joiners)) as pool:
                operations = list(pool.map(lambda pair: pair[0].join(pair[1]), zip(joiners, tokens, strict=True)))
            assert [op.state for op in operations] == [o.OPERATION_STATE_SUCCEEDED] * 3, operations
            diff = _settled(client)
            assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3", "n4"]
            assert client.list_tokens() == [], "every token was consumed"
    finally:
        labs.down(lab.dir)


def test_prejoin_failure_leaves_nothing_and_the_node_joins_later(
    tmp_path: Path, backend: str, joiners: list[labs.JoiningNode]
) -> None:
    lab = labs.up(tmp_path / "lab", 3, backend=backend)
    labs._stop([lab.document["coordinator"]["pid"]])
    try:
        # The join's engine step (its commit point) fails: microcluster's FAIL_PREJOIN, one stage later.
        failing, endpoint = start_coordinator(lab, {FAULT_ENV: "fail-step:8"})
        try:
            joiner = labs.start_joining_node(lab, "n4")
            joiners.append(joiner)
            with Client(endpoint) as client:
                before = _settled(client).fingerprint
                failed = joiner.join(client.issue_token("n4").token)
                assert failed.state == o.OPERATION_STATE_ROLLED_BACK, failed
                assert _settled(client).fingerprint == before, "the failed join left nothing behind"
        finally:
            failing.terminate()
            failing.wait(10)
        joiner.stop()
        shutil.rmtree(joiner.state_dir)  # the node is reset, as microcluster's test restarts c4 afresh
        working, endpoint = start_coordinator(lab, {})
        try:
            with Client(endpoint) as client:
                joiner = labs.start_joining_node(lab, "n4")
                joiners.append(joiner)
                joined = joiner.join(client.issue_token("n4").token)  # a new token replaces the released one
                assert joined.state == o.OPERATION_STATE_SUCCEEDED, joined
                assert sorted(m.name for m in _settled(client).members) == ["n1", "n2", "n3", "n4"]
        finally:
            working.terminate()
            working.wait(10)
    finally:
        labs.down(lab.dir)
