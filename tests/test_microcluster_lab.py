"""`memberguard lab up --backend microcluster`: real microd daemons with memberguard's agents and coordinator, checked
through the same CLI as the other backends, and a divergence made through microcluster itself seen by both."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from memberguard import Client

from coordinator.lab import lab as labs
from coordinator.lab import microcluster

pytestmark = pytest.mark.microcluster

MEMBERGUARD = str(Path(sys.executable).parent / "memberguard")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path_factory.mktemp("lab"), 3, backend="microcluster")
    # The lab is up once the members are voters in the members table; the new roles reach every node's cluster.yaml
    # a heartbeat or so later (an INFO VIEW_DIFFERS meanwhile). The tests start from the settled cluster.
    try:
        _wait_until_clean(running)
        yield running
    finally:
        labs.down(running.dir)


def _wait_until_clean(lab: labs.Lab, within: float = 30.0) -> None:
    """Returns once the diff has no discrepancy at all, INFO included: the state each test of the module starts
    from."""
    with Client(lab.endpoint) as client:
        deadline = time.monotonic() + within
        while discrepancies := client.check_membership().diff.discrepancies:
            assert time.monotonic() < deadline, (
                f"the microcluster lab did not settle within {within:g} s: {discrepancies}"
            )
            time.sleep(0.2)


def memberguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEMBERGUARD, *args], capture_output=True, text=True, timeout=60)


def microctl(node: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    """microctl on NODE; this lab always has a leader, so microcluster's leader search is given time to find it."""
    return microcluster.microctl(str(node["state_dir"]), *args, timeout=60, leader_within=30)


def test_lab_json_names_each_daemon_and_its_state_directory(lab: labs.Lab) -> None:
    assert lab.document["backend"] == "microcluster"
    listed = json.loads(microctl(lab.document["nodes"][0], "cluster", "list", "--format", "json").stdout)
    assert sorted((row["name"], row["address"]) for row in listed) == sorted(
        (node["name"], node["address"]) for node in lab.document["nodes"]
    )
    for node in lab.document["nodes"]:
        state_dir = Path(node["state_dir"])
        assert (state_dir / "daemon.yaml").is_file() and (state_dir / "truststore").is_dir()
        assert node["microcluster"]["address"] == node["address"]
        assert node["microcluster"]["pid"] in lab.running()


def test_check_is_clean_on_a_healthy_cluster(lab: labs.Lab) -> None:
    checked = memberguard("check", "--lab", str(lab.dir), "-o", "json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    diff = json.loads(checked.stdout)["diff"]
    assert sorted(member["name"] for member in diff["members"]) == sorted(n["name"] for n in lab.document["nodes"])
    assert "discrepancies" not in diff


def test_a_node_is_added_through_the_lab_by_microclusters_own_join(lab: labs.Lab) -> None:
    """`lab add-node` starts a microd that was never initialised and its agent; memberguard's join has that daemon
    join through microcluster. lab.json then names the daemon, and microctl lists the member."""
    added = memberguard("lab", "add-node", "--dir", str(lab.dir))
    assert added.returncode == 0, added.stderr
    entry = labs.Lab.load(lab.dir).node("n4")
    assert entry["microcluster"]["pid"] in labs.Lab.load(lab.dir).running()
    listed = microctl(entry, "cluster", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(row["name"] for row in json.loads(listed.stdout)) == ["n1", "n2", "n3", "n4"]
    removed = memberguard("remove", "n4", "--lab", str(lab.dir))
    assert removed.returncode == 0, removed.stderr
    # microcluster's heartbeat takes n4 out of the other nodes' files a little after the removal returns.
    _wait_until_clean(lab)


def test_a_row_deleted_through_microctl_is_blocking_here_and_refused_there(lab: labs.Lab) -> None:
    """Side by side, on the same state: memberguard's diff names the member, the source and the remedy;
    microcluster's own `tokens add` refuses with its consistency check's address lists."""
    first, _, third = lab.document["nodes"]
    deleted = microctl(first, "sql", f"DELETE FROM core_cluster_members WHERE name='{third['name']}'")
    assert deleted.returncode == 0, deleted.stderr
    checked = memberguard("check", "--lab", str(lab.dir), "-o", "json")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    [missing] = json.loads(checked.stdout)["diff"]["discrepancies"]
    assert (missing["kind"], missing["severity"], missing["source"]) == (
        "DISCREPANCY_KIND_MISSING",
        "SEVERITY_BLOCKING",
        "SOURCE_MEMBERS_TABLE",
    )
    assert missing["member"]["name"] == third["name"]
    refused = microctl(first, "tokens", "add", "n9")
    assert refused.returncode != 0 and "Membership consistency check failed" in refused.stderr
    print(
        f"\nrow of {third['name']} deleted: memberguard: {missing['summary']} | microcluster: "
        f"{refused.stderr.strip().splitlines()[-1]}"
    )


def test_lab_down_stops_the_daemons_too(tmp_path: Path) -> None:
    running = labs.up(tmp_path / "lab", 1, backend="microcluster")
    daemons = [node["microcluster"]["pid"] for node in running.document["nodes"]]
    stopped = labs.down(running.dir)
    assert set(daemons) <= set(stopped)
    deadline = time.monotonic() + 10
    while any(pid in labs.Lab.load(running.dir).running() for pid in daemons):
        assert time.monotonic() < deadline, "a daemon outlived lab down"
        time.sleep(0.2)
