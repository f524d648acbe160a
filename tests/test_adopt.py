"""`memberguard adopt` against canonical/microcluster's own microd: three members adopted into one configuration
directory, the coordinator and the agents started from what adopt wrote and with the commands it printed, and
`memberguard check` run with nothing but the profile; then bad input, each refused naming the path or the member
with the configuration directory left exactly as it was, and adopting again.

One cluster serves the module. The bad-input and re-adopt tests work on copies of the members' files (what adopt
reads), so that breaking one leaves the cluster alone; the test that starts processes uses the real state directories.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from coordinator import pki
from coordinator.agent.microcluster_dial import MemberDial
from coordinator.dqlite import connect_leader
from coordinator.lab import microcluster
from coordinator.lab.ports import loopback_addresses
from tests.microcluster_members import copy_member, heartbeat_after

pytestmark = pytest.mark.microcluster

MEMBERGUARD = Path(sys.executable).parent / "memberguard"
# The coordinator and three agents start, and the joiners' roles settle (a few heartbeats).
SETTLE_TIMEOUT = 60.0
HEARTBEAT = f"{microcluster.HEARTBEAT:g}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[microcluster.Cluster]:
    with microcluster.running(tmp_path_factory.mktemp("microcluster"), 3) as running:
        yield running


def memberguard(*args: str, profile: Path | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "MEMBERGUARD_PROFILE": str(profile)} if profile else None
    return subprocess.run(
        [str(MEMBERGUARD), *args], capture_output=True, text=True, env=environment, timeout=60, stdin=subprocess.DEVNULL
    )


def adopt(state_dir: Path, out: Path, agent_listen: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return memberguard(
        "adopt", "--state-dir", str(state_dir), "--config-dir", str(out), "--agent-listen", agent_listen, *extra
    )


def adopted(state_dir: Path, out: Path, agent_listen: str, *extra: str) -> dict[str, Any]:
    """adopt's document (-o json), once it succeeded."""
    result = adopt(state_dir, out, agent_listen, "-o", "json", *extra)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def listing(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under directory: its mode and content, by relative path."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): (path.stat().st_mode, path.read_bytes())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def coordinator_port() -> int:
    """A free loopback port whose next port is free too, for the coordinator and its join listener."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


@contextmanager
def running(commands: list[str], logs: Path) -> Iterator[None]:
    """The commands as processes, from another directory than the checkout; stopped by pid on leaving."""
    with ExitStack() as stack:
        processes = []
        for number, command in enumerate(commands):
            log = stack.enter_context((logs / f"process-{number}.log").open("wb"))
            processes.append(
                subprocess.Popen(
                    shlex.split(command),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=logs,
                    start_new_session=True,
                )
            )
        try:
            yield
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def eventually_exits_0(profile: Path) -> dict[str, Any]:
    """`memberguard check -o json` once it exits 0: once every process serves and the roles have settled."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (result := memberguard("check", "-o", "json", profile=profile)).returncode != 0:
        assert time.monotonic() < deadline, f"check still exits {result.returncode}: {result.stdout}{result.stderr}"
        time.sleep(0.5)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def kinds(diff: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    return [
        (d["kind"], d["severity"], d.get("source", ""), d.get("node", ""), d.get("member", {}).get("name", ""))
        for d in diff.get("discrepancies", [])
    ]


async def leader_address(cluster: microcluster.Cluster) -> str:
    dial = MemberDial(cluster.members[0].state_dir)
    async with await connect_leader([m.address for m in cluster.members], timeout=5, dial=dial.dial) as connection:
        return connection.address


# --- three members adopted, started as adopt says, checked with the profile alone ------------------------------------


async def test_adopted_members_run_as_printed_and_check_with_the_profile_alone(
    cluster: microcluster.Cluster, tmp_path: Path
) -> None:
    out = tmp_path / "memberguard"
    port = coordinator_port()
    coordinator = f"127.0.0.1:{port}"
    agents = dict(zip((m.name for m in cluster.members), loopback_addresses(len(cluster.members)), strict=True))
    documents = [
        adopted(m.state_dir, out, agents[m.name], "--heartbeat", HEARTBEAT, "--coordinator-listen", coordinator)
        for m in cluster.members
    ]
    first, *others = documents
    assert {str(out / name) for name in ("coordinator.json", "registry.json", "profile.json", "operator.key")} <= set(
        first["wrote"]
    )
    for member, document in zip(cluster.members[1:], others, strict=True):
        assert document["wrote"] == [str(out / "agents" / member.name / "agent.json"), str(out / "registry.json")]
    for key in ("coordinator.key", "operator.key"):
        assert (out / key).stat().st_mode & 0o777 == 0o600
    config = json.loads((out / "coordinator.json").read_text())
    assert (config["listen"], config["join_listen"]) == (coordinator, f"127.0.0.1:{port + 1}")
    assert not Path(config["journal"]).exists()

    registry = json.loads((out / "registry.json").read_text())
    pinned = {(m["name"], m["agent_address"], pki.fingerprint(m["certificate"])) for m in registry["members"]}
    certificates = {m.name: pki.fingerprint((m.state_dir / "server.crt").read_bytes()) for m in cluster.members}
    assert pinned == {(name, agents[name], certificates[name]) for name in agents}

    commands = [first["commands"]["coordinator"], *(document["commands"]["agent"] for document in documents)]
    assert first["commands"]["check"] == f"MEMBERGUARD_PROFILE={out / 'profile.json'} memberguard check"
    profile = out / "profile.json"
    with running(commands, tmp_path):
        diff = eventually_exits_0(profile)["diff"]
        listed = cluster.cluster_list()
        assert sorted((m["name"], m["address"], m["certificateFingerprint"]) for m in diff["members"]) == [
            (row.name, row.address, certificates[row.name]) for row in listed
        ]
        assert diff["nodes"] == [row.name for row in listed]
        plain = memberguard("check", profile=profile)
        assert (plain.returncode, plain.stdout.splitlines()[0]) == (0, "consistent"), plain.stderr

        # One follower's record of the other removed, as tests/test_microcluster_backend.py's drift does: the
        # leader's heartbeat is what restores it.
        leader = await leader_address(cluster)
        holder, removed = [m for m in cluster.members if m.address != leader]
        record = holder.state_dir / "truststore" / f"{removed.name}.yaml"
        for _ in range(3):
            heartbeat_after(holder)
            record.unlink()
            drifted = memberguard("check", "-o", "json", profile=profile)
            if not record.exists():
                break  # the check returned before the heartbeat restored it: it read the drift
        assert not record.exists(), "the heartbeat restored the record before each check returned"
        assert drifted.returncode == 1, drifted.stderr
        found = json.loads(drifted.stdout)["diff"]
        assert kinds(found) == [
            ("DISCREPANCY_KIND_MISSING", "SEVERITY_BLOCKING", "SOURCE_TRUSTSTORE", holder.name, removed.name)
        ]
        print(f"\n{removed.name}.yaml removed on {holder.name}: {found['discrepancies'][0]['summary']}")
        assert f"every {HEARTBEAT} s" in found["discrepancies"][0]["summary"]

        deadline = time.monotonic() + 3 * microcluster.HEARTBEAT
        while not record.exists():
            assert time.monotonic() < deadline, f"the heartbeat did not restore {record}"
            time.sleep(0.05)
        assert not [k for k in kinds(eventually_exits_0(profile)["diff"]) if k[2] == "SOURCE_TRUSTSTORE"]


# --- bad input: exit 2, the path or member named, OUT as it was ------------------------------------------------------


def _not_a_state_dir(state_dir: Path) -> tuple[Path, str]:
    shutil.rmtree(state_dir)
    state_dir.mkdir()
    (state_dir / "notes.txt").write_text("not microcluster's")
    return state_dir, "is not a microcluster state directory"


def _unreadable_server_key(state_dir: Path) -> tuple[Path, str]:
    # The tests run as root, whom chmod 000 does not stop: a directory in the key's place cannot be read by anyone.
    key = state_dir / "server.key"
    key.unlink()
    key.mkdir()
    return key, "cannot be read: Is a directory"


def _another_key(state_dir: Path) -> tuple[Path, str]:
    (state_dir / "server.key").write_bytes(pki.make_identity(state_dir.name).key_pem)
    return state_dir / "server.key", f"not the key of {state_dir / 'server.crt'}"


def _garbage_cluster_certificate(state_dir: Path) -> tuple[Path, str]:
    (state_dir / "cluster.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    return state_dir / "cluster.crt", "not a PEM certificate"


def _missing_from_its_own_truststore(state_dir: Path) -> tuple[Path, str]:
    record = state_dir / "truststore" / f"{state_dir.name}.yaml"
    record.unlink()
    return record, f"{state_dir.name} is not in its own truststore"


BREAKAGES = [
    _not_a_state_dir,
    _unreadable_server_key,
    _another_key,
    _garbage_cluster_certificate,
    _missing_from_its_own_truststore,
]


def assert_refused(state_dir: Path, outs: list[Path], named: Path, says: str) -> None:
    """Adopting state_dir into each of outs exits 2 with one line naming `named`, and leaves each out as it was."""
    for out in outs:
        before = listing(out)
        result = adopt(state_dir, out, "127.0.0.1:7601")
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and str(named) in lines[0] and says in lines[0], lines
        assert listing(out) == before
        assert out.exists() == bool(before)
    print(f"\n{lines[0]}")


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.__name__.strip("_"))
def test_a_bad_state_dir_is_refused_naming_it_and_nothing_is_written(
    cluster: microcluster.Cluster, tmp_path: Path, breakage: Callable[[Path], tuple[Path, str]]
) -> None:
    good, bad = (copy_member(member, tmp_path) for member in cluster.members[:2])
    populated = tmp_path / "populated"
    adopted(good, populated, "127.0.0.1:7600")
    named, says = breakage(bad)
    assert_refused(bad, [tmp_path / "new", populated], named, says)


def test_an_uninitialised_member_is_refused(tmp_path: Path) -> None:
    """A real microd, started and never initialised: it has made its server.crt and its truststore, but has no
    daemon.yaml and no database yet."""
    with microcluster.uninitialised(tmp_path / "fresh", tmp_path / "fresh.log") as state_dir:
        assert (state_dir / "server.crt").exists()
        assert_refused(state_dir, [tmp_path / "out"], state_dir / "daemon.yaml", "not an initialised member")


# --- adopting again -------------------------------------------------------------------------------------------------


def test_adopting_again_changes_nothing_and_other_settings_need_replace(
    cluster: microcluster.Cluster, tmp_path: Path
) -> None:
    first, second = (copy_member(member, tmp_path) for member in cluster.members[:2])
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is set up as an absent one is
    adopted(first, out, "127.0.0.1:7600")
    adopted(second, out, "127.0.0.1:7602")
    before = listing(out)

    again = adopt(first, out, "127.0.0.1:7600")
    assert again.returncode == 0 and "nothing written" in again.stdout.splitlines()[0], again.stderr
    document = adopted(first, out, "127.0.0.1:7600")
    assert "wrote" not in document and document["member"] == first.name
    assert listing(out) == before

    elsewhere = adopt(first, out, "127.0.0.1:7601")
    assert elsewhere.returncode == 2
    assert f"{first.name} is adopted into {out} with other settings" in elsewhere.stderr
    assert "listen '127.0.0.1:7600', not '127.0.0.1:7601'" in elsewhere.stderr and "--replace" in elsewhere.stderr
    taken = adopt(first, out, "127.0.0.1:7602", "--replace")
    assert taken.returncode == 2 and f"127.0.0.1:7602 is {second.name}'s agent address" in taken.stderr
    moved = adopt(first, out, "127.0.0.1:7600", "--coordinator-listen", "127.0.0.1:7999")
    assert moved.returncode == 2 and str(out / "coordinator.json") in moved.stderr
    assert listing(out) == before

    replaced = adopted(first, out, "127.0.0.1:7601", "--replace")
    assert replaced["wrote"] == [str(out / "agents" / first.name / "agent.json"), str(out / "registry.json")]
    assert json.loads((out / "agents" / first.name / "agent.json").read_text())["listen"] == "127.0.0.1:7601"
    registry = json.loads((out / "registry.json").read_text())
    assert {(m["name"], m["agent_address"]) for m in registry["members"]} == {
        (first.name, "127.0.0.1:7601"),
        (second.name, "127.0.0.1:7602"),
    }
    assert [i["principal"] for i in registry["identities"]] == ["operator"]


def test_a_directory_that_is_not_memberguards_configuration_is_refused(
    cluster: microcluster.Cluster, tmp_path: Path
) -> None:
    out = tmp_path / "etc"
    out.mkdir()
    (out / "hosts").write_text("127.0.0.1 localhost\n")
    state_dir = copy_member(cluster.members[0], tmp_path)
    assert_refused(state_dir, [out], out, "is neither empty nor memberguard's configuration")


def test_a_member_of_another_cluster_is_refused(cluster: microcluster.Cluster, tmp_path: Path) -> None:
    """The first adopt keeps the cluster's certificate; a member that holds another cluster.crt is another cluster's,
    and adopting it would have one coordinator guard two clusters as one."""
    first, stranger = (copy_member(member, tmp_path) for member in cluster.members[:2])
    out = tmp_path / "out"
    adopted(first, out, "127.0.0.1:7600")
    assert (out / "cluster.crt").read_bytes() == (first / "cluster.crt").read_bytes()
    (stranger / "cluster.crt").write_bytes(pki.make_identity("another-cluster").certificate_pem)
    assert_refused(stranger, [out], stranger / "cluster.crt", "a member of another cluster")


def test_adopts_into_one_directory_at_once_each_get_their_member_in(
    cluster: microcluster.Cluster, tmp_path: Path
) -> None:
    """Three adopts started together into a directory none has set up: one sets it up, and the registry ends with
    every member, none lost to another's read-modify-write (they take turns)."""
    members = [copy_member(member, tmp_path) for member in cluster.members]
    out = tmp_path / "out"
    with ThreadPoolExecutor(len(members)) as pool:
        results = list(pool.map(lambda i: adopt(members[i], out, f"127.0.0.1:{7600 + i}"), range(len(members))))
    assert [r.returncode for r in results] == [0] * len(members), [r.stderr for r in results]
    registry = json.loads((out / "registry.json").read_text())
    assert sorted(m["name"] for m in registry["members"]) == sorted(member.name for member in cluster.members)
