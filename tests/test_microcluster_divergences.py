"""microcluster's own membership tests (its PR #515: example/test/main.sh's membership, force-removal and
parallel-join tests) and real divergences (a joiner killed during microcluster's join, a removal interrupted, the
ghost Raft member of microcluster #774), driven with microctl against real microd, with memberguard checking the same
cluster at each step.

Each comparison prints one line, `scenario | microcluster's answer | memberguard's diff` (visible with -s; the whole
table again at the end of the module), and asserts how the two relate rather than what either said in one run:

- microcluster refuses with its consistency check: memberguard's diff is blocking, its blocking discrepancies are
  about every address on which microcluster's three address lists disagree, and memberguard's guard refuses too;
- microcluster proceeds: memberguard's guard proceeds, or each blocking discrepancy is one microcluster's check cannot
  see (it reads the members table, dqlite and the truststore of the one member asked, where memberguard reads every
  node's own sources), which the line says.

main.sh's prejoin test is not ported: microcluster's example daemon (example/cmd/microd) has a PreJoin hook that only
logs, and no flag to make it fail (microcluster #784 reports such a failure in MicroOVN). The joiner killed at random
moments during its join covers the moment that hook runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from memberguard import Client, DirtyMembership, MemberguardError, MembershipRefused, NotFound
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2 as o

from coordinator.agent.dqlite_sources import close_readers
from coordinator.agent.microcluster_sources import microcluster_backend
from coordinator.core.model import Source
from coordinator.lab import lab as labs
from coordinator.lab import microcluster
from coordinator.lab.ports import loopback_addresses
from tests.microcluster_members import heartbeat_after

_NOBODY_READ = (pb.DISCREPANCY_KIND_NO_LEADER, pb.DISCREPANCY_KIND_SOURCE_UNREADABLE)

pytestmark = pytest.mark.microcluster

SETTLE = 30.0  # seconds for a cluster to settle after a join or a removal: roles, then the truststores, follow
# main.sh's own waits are 2 s polls; microcluster's consistency check retries for 5 s before it refuses.
MICROCTL_TIMEOUT = 60.0
# dqlite refuses a removal while a configuration change is in progress: a dead joiner's promotion stays in progress
# until raft gives up catching it up.
PARKED_TIMEOUT = 90.0

# microcluster's refusal by its consistency check: CheckMembershipConsistency's three sorted address lists.
_INCONSISTENT = re.compile(
    r"core_cluster_members \(\[([^\]]*)\]\), truststore \(\[([^\]]*)\]\) and dqlite \(\[([^\]]*)\]\)"
)

TABLE: list[tuple[str, str, str]] = []


def record(scenario: str, theirs: str, ours: str) -> None:
    """One line of the side-by-side table: printed now, and again with the whole table at the end of the module."""
    TABLE.append((scenario, theirs, ours))
    print(f"\n{scenario} | {theirs} | {ours}")


@pytest.fixture(scope="module", autouse=True)
def side_by_side() -> Iterator[None]:
    yield
    width = max((len(scenario) for scenario, _, _ in TABLE), default=0)
    print("\n\nscenario | microcluster's answer | memberguard's diff")
    for scenario, theirs, ours in TABLE:
        print(f"{scenario:<{width}} | {theirs} | {ours}")


# --- microcluster's side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What microcluster answered to one microctl command."""

    command: str
    proceeded: bool
    said: str  # its error, when it refused
    seconds: float

    @property
    def lists(self) -> tuple[set[str], set[str], set[str]] | None:
        """The table's, the truststore's and dqlite's addresses, when its consistency check refused; else None."""
        found = _INCONSISTENT.search(self.said)
        if found is None:
            return None
        table, trust, raft = (set(group.split()) for group in found.groups())
        return table, trust, raft

    @property
    def disputed(self) -> set[str]:
        """The addresses on which the three lists disagree (empty unless its consistency check refused)."""
        if self.lists is None:
            return set()
        table, trust, raft = self.lists
        return (table | trust | raft) - (table & trust & raft)

    def brief(self, names: dict[str, str]) -> str:
        if self.proceeded:
            return f"{self.command}: proceeds ({self.seconds:.1f} s)"
        lists = self.lists
        if lists is not None:
            table, trust, raft = ({names.get(a, a) for a in addresses} for addresses in lists)
            return (
                f"{self.command}: refused after {self.seconds:.1f} s, inconsistent: table {sorted(table)}, "
                f"truststore {sorted(trust)}, dqlite {sorted(raft)}"
            )
        said = self.said.removeprefix("Error: ")
        for address, name in names.items():
            said = said.replace(address, f"<{name}>")
        return f"{self.command}: refused after {self.seconds:.1f} s: {said}"


def microctl(state_dir: Path | str, *args: str, timeout: float = MICROCTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """microctl's own answer, leaderless or not: these scenes record what microcluster says."""
    return microcluster.microctl(state_dir, *args, timeout=timeout)


def answer(state_dir: Path | str, *args: str) -> Answer:
    start = time.monotonic()
    done = microctl(state_dir, *args)
    said = done.stderr.strip().splitlines()[-1] if done.returncode and done.stderr.strip() else ""
    return Answer(" ".join(args[:2]), done.returncode == 0, said, time.monotonic() - start)


class Daemon:
    """A microd outside the lab, not yet a member: a joiner, which a test may SIGKILL at any moment of its join."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        [self.address] = loopback_addresses(1)
        self.state_dir = directory / name
        self.state_dir.mkdir(parents=True)
        self.log = directory / f"{name}.log"
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [
                    str(microcluster.MICROD),
                    "--state-dir",
                    str(self.state_dir),
                    "--heartbeat",
                    f"{microcluster.HEARTBEAT}s",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        ready = microctl(self.state_dir, "waitready", "--timeout", "30", timeout=35)
        assert ready.returncode == 0, f"{name}'s microd never got ready: {ready.stderr}"

    def init(self, token: str) -> subprocess.Popen[str]:
        """`microctl init NAME ADDRESS --token TOKEN`, started: microcluster's join, on the joiner's control socket."""
        return subprocess.Popen(
            [
                str(microcluster.MICROCTL),
                "--state-dir",
                str(self.state_dir),
                "init",
                self.name,
                self.address,
                "--token",
                token,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=microcluster.STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()


# --- the two side by side -------------------------------------------------------------------------------------------


def _found(diff: pb.MembershipDiff, names: dict[str, str], severity: int = pb.SEVERITY_BLOCKING) -> str:
    def about(d: pb.Discrepancy) -> str:
        member = d.member.name or names.get(d.member.address, d.member.address) or "-"
        where = f" on {d.node}" if d.node else ""
        kind = pb.DiscrepancyKind.Name(d.kind).removeprefix("DISCREPANCY_KIND_")
        return f"{kind} {pb.Source.Name(d.source).removeprefix('SOURCE_')}{where} about {member}"

    found = [about(d) for d in diff.discrepancies if d.severity >= severity]
    return "; ".join(found) or "nothing blocking"


class Scene:
    """A microcluster lab (real microd members, memberguard's agents and coordinator), and the joiners a test started
    beside it."""

    def __init__(self, lab: labs.Lab) -> None:
        self.lab = lab
        self.client = Client(lab.endpoint)
        self.daemons: list[Daemon] = []
        self._probes = 0

    @property
    def nodes(self) -> dict[str, dict[str, object]]:
        return {node["name"]: node for node in self.lab.document["nodes"]}

    def state_dir(self, name: str) -> Path:
        return Path(str(self.nodes[name]["state_dir"]))

    def names(self) -> dict[str, str]:
        """Address to name, for every member and joiner this test knows of: to print names, not ports."""
        known = {str(node["address"]): name for name, node in self.nodes.items()}
        return known | {daemon.address: daemon.name for daemon in self.daemons}

    def member(self, name: str) -> microcluster.Member:
        node = self.nodes[name]
        return microcluster.Member(name, str(node["address"]), self.state_dir(name), Path(str(node["log"])))

    def kill(self, name: str) -> None:
        os.kill(int(self.nodes[name]["microcluster"]["pid"]), signal.SIGKILL)  # type: ignore[index]

    def joiner(self, name: str) -> Daemon:
        daemon = Daemon(self.lab.dir / "joiners", name)
        self.daemons.append(daemon)
        return daemon

    def listed(self, via: str) -> dict[str, tuple[str, str]]:
        """`microctl cluster list` on via: name to (role, status)."""
        done = microctl(self.state_dir(via), "cluster", "list", "--format", "json")
        assert done.returncode == 0, done.stderr
        return {row["name"]: (row["role"], row["status"]) for row in json.loads(done.stdout)}

    def leader(self, via: str) -> str:
        """The name of the member that leads dqlite, as via's own dqlite client finds it."""

        async def read() -> str:
            readers = microcluster_backend(self.state_dir(via))
            try:
                [config] = [reader for reader in readers if reader.source is Source.RAFT_CONFIG]
                return (await config.read(include_certificates=False)).leader_address
            finally:
                await close_readers(readers)

        address = asyncio.run(read())
        assert address, f"{via} found no dqlite leader"
        return self.names()[address]

    @staticmethod
    def settle() -> None:
        """Two heartbeats: by then the leader has spread the members table to every member it reaches (and a new
        leader, if one was killed, has been elected and done so), and its next round changes nothing more."""
        time.sleep(2 * microcluster.HEARTBEAT)

    def stable(self) -> None:
        """Until memberguard's fingerprint stays the same over a heartbeat: after a leader's death, once dqlite has
        elected another or has none to elect."""
        deadline = time.monotonic() + SETTLE
        seen = self.diff().fingerprint
        while True:
            time.sleep(microcluster.HEARTBEAT)
            now = self.diff().fingerprint
            if now == seen or time.monotonic() > deadline:
                return
            seen = now

    def diff(self) -> pb.MembershipDiff:
        return self.client.check_membership(timeout=15).diff

    def probe_name(self) -> str:
        self._probes += 1
        return f"probe{self._probes}"

    def guard_issues_token(self) -> tuple[set[str], str]:
        """memberguard's guard asked for a token on the same state: what it refused for (its violations' types, or
        its reason; empty when it proceeded), and what it said."""
        try:
            issued = self.client.issue_token(self.probe_name(), ttl=60, timeout=60)
        except MembershipRefused as refused:
            kinds = {kind for kind, _, _ in refused.violations} or {refused.reason}
            return kinds, f"guard refuses a token: {', '.join(sorted(kinds))}"
        except MemberguardError as refused:
            return {
                refused.reason or refused.code.name
            }, f"guard refuses a token: {refused.reason or refused.code.name}"
        assert issued.state == o.OPERATION_STATE_SUCCEEDED, issued
        return set(), "guard issues a token"

    def compare(self, scenario: str, via: str, *also: Answer) -> tuple[Answer, pb.MembershipDiff]:
        """memberguard's diff and guard against microcluster's `tokens add` on via, on the same state; the line
        printed, and the relationship asserted. ALSO: other answers of microcluster's on this state, printed."""
        diff = self.diff()
        refusals, guard = self.guard_issues_token()
        tokens = answer(self.state_dir(via), "tokens", "add", self.probe_name())
        names = self.names()
        theirs = "; ".join(a.brief(names) for a in (tokens, *also))
        blocking = [d for d in diff.discrepancies if d.severity == pb.SEVERITY_BLOCKING]
        ours = f"{_found(diff, names)}; {guard}"
        # What no agent of memberguard's could read from a leader within its per-agent deadline (1 s): right after a
        # leader's death microcluster's own commands wait longer for the next one.
        unread = [d for d in blocking if not d.node and d.kind in _NOBODY_READ]
        if tokens.proceeded and unread:
            ours += " (stricter: no leader was reached within memberguard's per-agent deadline)"
        elif tokens.proceeded and blocking:
            listed = self.listed(via)
            unseen = [d for d in blocking if d.node and (d.node != via or d.node not in listed)]
            assert unseen == blocking, (
                f"{scenario}: microcluster proceeds, memberguard blocks on what it reads: {ours}; listed {listed}: "
                + " / ".join(f"{d.summary} [{'; '.join(e.detail for e in d.evidence)}]" for d in blocking)
            )
            nodes = ", ".join(sorted({d.node for d in unseen}))
            ours += f" (stricter: on {nodes}, whose own sources microcluster's check on {via} does not read)"
        elif tokens.proceeded and refusals:
            # memberguard is stricter in two more ways: its own half-done operation is finished before another starts,
            # and a member no agent of memberguard's speaks for counts as not answering in its quorum rule.
            agentless = sorted({member.name for member in diff.members} - set(self.nodes))
            allowed = {"PARKED_OPERATION"} | ({"QUORUM"} if agentless else set())
            assert refusals <= allowed, f"{scenario}: microcluster proceeds, nothing blocks, yet: {guard}"
            if "QUORUM" in refusals:
                ours += f" (stricter: no agent of memberguard's answers for {', '.join(agentless)})"
        record(scenario, theirs, ours)
        checked = [a for a in (tokens, *also) if a.lists is not None]
        for refused in checked:
            covered = {d.member.address for d in blocking}
            assert refused.disputed <= covered, (
                f"{scenario}: microcluster disputes {refused.disputed}, memberguard {ours}"
            )
        if checked:
            assert refusals, f"{scenario}: microcluster's consistency check refuses, memberguard's guard proceeds"
        return tokens, diff

    def remove_by_force(self, name: str, via: str = "n1", *, wait: bool = True) -> o.Operation:
        """memberguard's forced removal of name, acknowledging what its fresh diff says about it (as an operator
        would): microcluster's forced DELETE, under memberguard's guard and journal. One that microcluster leaves
        half-done is parked, compared on that state, and (WAIT) finished by memberguard's reconciler."""
        diff = self.diff()
        about = [d.id for d in diff.discrepancies if name in (d.member.name, d.node)]
        try:
            removed = self.client.remove_member(name, force=True, acknowledged=about, timeout=60)
        except DirtyMembership as refused:
            raise AssertionError(f"{name}'s forced removal refused: {refused.violations}") from refused
        if removed.state == o.OPERATION_STATE_PARKED:
            parked = time.monotonic()
            self.compare(f"{name}'s forced removal parked: {removed.error.split(': ', 1)[-1]}", via)
            if not wait:
                return removed
            deadline = time.monotonic() + PARKED_TIMEOUT
            while removed.state == o.OPERATION_STATE_PARKED and time.monotonic() < deadline:
                removed = self.client.wait_operation(removed.id, wait=5, timeout=10)
            record(
                f"{name}'s parked removal", "", f"finished by the reconciler {time.monotonic() - parked:.1f} s later"
            )
        assert removed.state == o.OPERATION_STATE_SUCCEEDED, (removed.error, removed.plan, removed.steps)
        return removed

    def wait_consistent(self, via: str, members: int) -> None:
        """Until microcluster lists MEMBERS members none PENDING, and memberguard's diff has nothing blocking."""
        deadline = time.monotonic() + SETTLE
        while True:
            listed = self.listed(via)
            diff = self.diff()
            blocking = [d for d in diff.discrepancies if d.severity == pb.SEVERITY_BLOCKING]
            if len(listed) == members and all(role != "PENDING" for role, _ in listed.values()) and not blocking:
                return
            assert time.monotonic() < deadline, f"not settled: {listed}; {_found(diff, self.names())}"
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()
        for daemon in self.daemons:
            daemon.stop()


@pytest.fixture
def scene(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scene]:
    size = getattr(request, "param", 3)
    running = Scene(labs.up(tmp_path / "lab", size, backend="microcluster"))
    try:
        running.wait_consistent("n1", size)
        yield running
    finally:
        running.close()
        labs.down(running.lab.dir)


# --- microcluster PR #515's own tests, from its example/test/main.sh ----------------------------------------------


def _about(diff: pb.MembershipDiff, name: str) -> set[tuple[int, int, str]]:
    return {(d.kind, d.source, d.node) for d in diff.discrepancies if d.member.name == name}


def test_membership_consistency(scene: Scene) -> None:
    """main.sh's test_membership_consistency: n2's row deleted through `microctl sql` while dqlite and the
    truststores still hold it. microcluster refuses to remove n2, to let n4 join with a token issued before, and to
    issue a token; memberguard's diff blocks on the missing row, and its guard refuses a token and n2's removal.
    Forced (memberguard's forced removal is microcluster's forced DELETE, under the guard), n2 goes; both proceed."""
    joiner = scene.joiner("n4")
    issued = microctl(scene.state_dir("n1"), "tokens", "add", "n4")
    assert issued.returncode == 0, issued.stderr
    scene.compare("healthy, 3 members", "n1")

    deleted = microctl(scene.state_dir("n1"), "sql", "DELETE FROM core_cluster_members WHERE name = 'n2'")
    assert deleted.returncode == 0, deleted.stderr
    assert (pb.DISCREPANCY_KIND_MISSING, pb.SOURCE_MEMBERS_TABLE, "") in _about(scene.diff(), "n2")
    # The joiner's daemon retries its refused join until microctl's 30 s are up: the rest is compared meanwhile.
    with ThreadPoolExecutor(2) as pool:
        join = pool.submit(answer, joiner.state_dir, "init", "n4", joiner.address, "--token", issued.stdout.strip())
        removal = pool.submit(answer, scene.state_dir("n1"), "cluster", "remove", "n2")
        with pytest.raises(DirtyMembership) as refused:
            scene.client.remove_member("n2", timeout=60)
        assert "MISSING" in {kind for kind, _, _ in refused.value.violations}
        tokens, _ = scene.compare("n2's row deleted through microctl sql", "n1", removal.result())
        assert not tokens.proceeded and not removal.result().proceeded
        record("n2's row deleted: n4 joins with a token issued before", join.result().brief(scene.names()), "-")
    assert not join.result().proceeded and "n4" not in scene.listed("n1")

    scene.remove_by_force("n2")
    scene.wait_consistent("n1", 2)
    tokens, _ = scene.compare("n2 then force-removed under memberguard's guard", "n1")
    assert tokens.proceeded


def _restored(record: Path, until: threading.Event) -> list[float]:
    """Watches for record to be back (microcluster's heartbeat rewrites every truststore from the table): the
    monotonic time it was first seen again, once the returned list is not empty."""
    seen: list[float] = []

    def watch() -> None:
        while not until.is_set() and not seen:
            if record.exists():
                seen.append(time.monotonic())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def test_truststore_records_removed_and_the_heartbeat(scene: Scene) -> None:
    """A record removed from one member's truststore, then (main.sh's test_truststore_force_removal) a member's
    record removed from every truststore. memberguard's diff blocks at once, its first remedy being the heartbeat,
    which rewrites every truststore from the members table; microcluster's check, which retries for 5 s, refuses
    only while the heartbeat has not put the record back on the member it asks, and proceeds after."""
    unknown = answer(scene.state_dir("n1"), "cluster", "remove", "nonexist", "--force", "--address", "127.0.0.1:9")
    with pytest.raises(NotFound):
        scene.client.remove_member("nonexist", force=True, timeout=30)
    assert not unknown.proceeded
    record("an unknown member force-removed", unknown.brief(scene.names()), "guard: NOT_FOUND")

    leader = scene.leader("n1")
    holder, other = sorted(set(scene.nodes) - {leader})
    kept = scene.state_dir(holder) / "truststore" / f"{other}.yaml"
    for _ in range(3):  # a loaded machine may read the diff after the next heartbeat restored the record
        heartbeat_after(scene.member(holder))
        kept.unlink()
        removed = time.monotonic()
        done = threading.Event()
        back = _restored(kept, done)
        diff = scene.diff()
        if not back:
            break
        done.set()
    assert not back, "the heartbeat restored the record before memberguard's diff was read, three times"
    [missing] = [d for d in diff.discrepancies if d.severity == pb.SEVERITY_BLOCKING]
    assert (missing.kind, missing.source, missing.node, missing.member.name) == (
        pb.DISCREPANCY_KIND_MISSING,
        pb.SOURCE_TRUSTSTORE,
        holder,
        other,
    )
    assert "heartbeat" in missing.remedies[0].action
    with ThreadPoolExecutor(2) as pool:
        asked_holder = pool.submit(answer, scene.state_dir(holder), "tokens", "add", scene.probe_name())
        asked_leader = pool.submit(answer, scene.state_dir(leader), "tokens", "add", scene.probe_name())
    done.set()
    theirs = [asked_holder.result(), asked_leader.result()]
    assert asked_leader.result().proceeded, "the leader's own truststore was not touched"
    if asked_holder.result().proceeded:
        assert back and back[0] <= removed + asked_holder.result().seconds + 1, "proceeded before the heartbeat"
    else:
        assert asked_holder.result().disputed == {scene.nodes[other]["address"]}
    names = scene.names()
    ours = f"{_found(diff, names)}, first remedy: wait for the heartbeat; record back after {back[0] - removed:.1f} s"
    record(
        f"{other}'s record removed from {holder}'s truststore",
        f"on {holder}: {theirs[0].brief(names)}; on {leader}: {theirs[1].brief(names)}",
        ours,
    )
    scene.wait_consistent("n1", 3)
    scene.compare(f"{other}'s record, after the heartbeat", holder)

    victim = other
    heartbeat_after(scene.member(leader))
    for name in scene.nodes:
        (scene.state_dir(name) / "truststore" / f"{victim}.yaml").unlink()
    removed = time.monotonic()
    done = threading.Event()
    back = _restored(scene.state_dir(leader) / "truststore" / f"{victim}.yaml", done)
    diff = scene.diff()
    with pytest.raises(DirtyMembership):
        scene.client.remove_member(victim, timeout=60)
    address = str(scene.nodes[victim]["address"])
    plain = answer(scene.state_dir(leader), "cluster", "remove", victim, "--address", address)
    done.set()
    missing_on = {
        d.node for d in diff.discrepancies if d.kind == pb.DISCREPANCY_KIND_MISSING and d.member.name == victim
    }
    if not back:  # the diff was read before the heartbeat came
        assert missing_on == set(scene.nodes), _found(diff, names)
    if plain.proceeded:
        assert back and back[0] <= removed + plain.seconds, "microcluster proceeded before the heartbeat restored it"
        ours = f"{_found(diff, names)}; guard refuses a removal; the record back after {back[0] - removed:.1f} s"
    else:
        assert plain.disputed <= {address}
        ours = f"{_found(diff, names)}; guard refuses a removal"
        scene.remove_by_force(victim)
    record(f"{victim}'s record removed from every truststore", plain.brief(names), ours)
    scene.wait_consistent("n1", 2)
    tokens, _ = scene.compare(f"{victim} removed", leader)
    assert tokens.proceeded


def test_parallel_joins(scene: Scene) -> None:
    """main.sh's test_parallel_joins: three tokens, then three `microctl init --token` at once. The tokens are
    microcluster's own issued behind memberguard's guard, three requests at once (they queue under its membership
    lock); every join succeeds, as main.sh expects, and the six members are consistent by both."""
    names = ["n4", "n5", "n6"]
    joiners = [scene.joiner(name) for name in names]
    with ThreadPoolExecutor(len(names)) as pool:
        issued = list(
            pool.map(lambda name: scene.client.issue_token(name, ttl=600, microcluster=True, timeout=90), names)
        )
    assert [operation.state for operation in issued] == [o.OPERATION_STATE_SUCCEEDED] * len(names), issued
    joins = [joiner.init(operation.token) for joiner, operation in zip(joiners, issued, strict=True)]
    outcomes = [(join.wait(timeout=MICROCTL_TIMEOUT), join.communicate()[1].strip()) for join in joins]
    assert [code for code, _ in outcomes] == [0] * len(names), outcomes
    scene.wait_consistent("n1", 6)
    assert set(scene.listed("n1")) == {"n1", "n2", "n3", *names}
    assert {member.name for member in scene.diff().members} == {"n1", "n2", "n3", *names}
    tokens, _ = scene.compare("n4, n5, n6 joined in parallel through microctl", "n1")
    assert tokens.proceeded


# --- a joiner killed during microcluster's join, and the ghost Raft member of microcluster #774 ---------------------


def _kill_during_join(scene: Scene, name: str, delay: float | None) -> tuple[Daemon, str, float]:
    """name's microd started and its join begun with a token from n1; SIGKILLed DELAY seconds into
    `microctl init --token` (None: once the join returned). What microctl init said, and how long it ran."""
    joiner = scene.joiner(name)
    issued = microctl(scene.state_dir("n1"), "tokens", "add", name)
    assert issued.returncode == 0, issued.stderr
    start = time.monotonic()
    join = joiner.init(issued.stdout.strip())
    if delay is None:
        join.wait(timeout=MICROCTL_TIMEOUT)
    else:
        time.sleep(delay)
    joiner.kill()
    _, err = join.communicate(timeout=MICROCTL_TIMEOUT)
    took = time.monotonic() - start
    said = "joined" if join.returncode == 0 else err.strip().splitlines()[-1]
    return joiner, said, took


def _ours(scene: Scene, name: str) -> str:
    """memberguard's plain removal of name, on the state microcluster just refused to remove it from."""
    try:
        removed = scene.client.remove_member(name, timeout=60)
    except DirtyMembership as refused:
        return f"guard refuses its removal: {', '.join(sorted({kind for kind, _, _ in refused.violations}))}"
    except MemberguardError as refused:
        return f"its removal: {refused.reason or refused.code.name}"
    return f"its removal {o.OperationState.Name(removed.state).removeprefix('OPERATION_STATE_')}"


def test_a_joiner_killed_during_its_join(scene: Scene) -> None:
    """A joiner's microd SIGKILLed at random moments of `microctl init --token`, spread over the time a whole join
    takes (measured first, on n4): before the leader recorded it, with a PENDING row only, or in dqlite too. Each
    state is compared once the heartbeat spread it; a PENDING row is cleared by memberguard's forced removal, a dead
    spare left (both find it consistent). Then n4 killed and its row deleted: the ghost Raft member of microcluster
    #774. Last, a dead spare's forced removal, which dqlite refuses while it still tries to promote it."""
    _, said, took = _kill_during_join(scene, "n4", None)
    assert said == "joined"
    seed = random.SystemRandom().randrange(2**32)  # pytest's plugins seed `random` the same for every run
    rng = random.Random(seed)
    trials = 3
    print(f"\na whole join took {took:.2f} s; kill delays drawn with seed {seed}")
    spares = []
    for trial in range(trials):
        name = f"n{5 + trial}"
        delay = rng.uniform(took * trial / trials, took * (trial + 1) / trials)
        _, said, _ = _kill_during_join(scene, name, delay)
        scene.settle()
        listed = scene.listed("n1")
        removal = answer(scene.state_dir("n1"), "cluster", "remove", name)
        what = f"{name} killed {delay:.2f} s into its join ({said[:60]}); listed as {listed.get(name, 'nothing')}"
        tokens, diff = scene.compare(what, "n1", removal)
        assert not removal.proceeded, "microcluster ran a dead member's pre-remove hook"
        pending = {d.member.name for d in diff.discrepancies if d.kind == pb.DISCREPANCY_KIND_MISSING}
        if name in pending:
            scene.remove_by_force(name)
        elif name in listed:
            spares.append(name)
        else:
            assert tokens.proceeded and name not in {m.name for m in diff.members}, "no record, yet not consistent"

    ghost = next(daemon for daemon in scene.daemons if daemon.name == "n4")
    ghost.kill()
    deleted = microctl(scene.state_dir("n1"), "sql", "DELETE FROM core_cluster_members WHERE name = 'n4'")
    assert deleted.returncode == 0, deleted.stderr
    scene.settle()
    plain = answer(scene.state_dir("n1"), "cluster", "remove", "n4", "--address", ghost.address)
    tokens, diff = scene.compare("#774: n4 joined, was killed, and its row deleted", "n1", plain)
    [missing] = [d for d in diff.discrepancies if d.member.address == ghost.address]
    assert (missing.kind, missing.source, missing.severity) == (
        pb.DISCREPANCY_KIND_MISSING,
        pb.SOURCE_MEMBERS_TABLE,
        pb.SEVERITY_BLOCKING,
    )
    assert not tokens.proceeded and not plain.proceeded
    # A ghost has no name once the heartbeat dropped its truststore records, and microcluster removes by name (by the
    # address it is given only when forced): memberguard removes its Raft entry through dqlite, microcluster not asked.
    try:
        ours = scene.client.remove_member("", address=ghost.address, force=True, acknowledged=[missing.id])
        if ours.state != o.OPERATION_STATE_SUCCEEDED:
            # dqlite may refuse while it still tries to promote a dead spare ("a configuration change is already in
            # progress"): the operation parks, and the reconciler retries it.
            ours = scene.client.wait_operation(ours.id, wait=60, timeout=75)
        state = o.OperationState.Name(ours.state).removeprefix("OPERATION_STATE_")
        said = f"its forced removal by address, its Raft entry through dqlite: {state} {ours.error}".strip()
        record("#774 ghost, forced by address", "not asked", said)
    except MemberguardError as refused:
        said = f"its forced removal by address: {refused.reason or refused.code.name}: {refused.message}"
        # Whatever microcluster answers (dqlite refuses while a configuration change is in progress, a dead member's
        # post-remove hook cannot run), the state it leaves is compared next.
        forced = answer(scene.state_dir("n1"), "cluster", "remove", "n4", "--force", "--address", ghost.address)
        record("#774 ghost, forced by address", forced.brief(scene.names()), said)
    scene.compare("#774 ghost, after its forced removal", "n1")

    if spares:  # the removal a dead spare's promotion interrupts: the last state of this lab
        scene.remove_by_force(spares[0], wait=False)


# --- a removal interrupted ------------------------------------------------------------------------------------------


def _kill_during_removal(scene: Scene, via: str, target: str, killed: str, delay: float) -> Answer:
    """`microctl cluster remove TARGET` on via, with killed's microd SIGKILLed DELAY seconds in."""
    start = time.monotonic()
    removal = subprocess.Popen(
        [str(microcluster.MICROCTL), "--state-dir", str(scene.state_dir(via)), "cluster", "remove", target],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    scene.kill(killed)
    _, err = removal.communicate(timeout=MICROCTL_TIMEOUT)
    said = err.strip().splitlines()[-1] if removal.returncode else ""
    return Answer("cluster remove", removal.returncode == 0, said, time.monotonic() - start)


@pytest.mark.parametrize("scene", [5], indirect=True)
def test_a_removal_interrupted(scene: Scene) -> None:
    """`microctl cluster remove` with the member's microd killed at a random moment of it, then with the leader's
    killed during another member's removal. microcluster deletes the row, then the Raft entry, then resets the
    member: killed in between, it leaves a ghost Raft member or a removed member that still believes it is one."""
    seed = random.SystemRandom().randrange(2**32)  # pytest's plugins seed `random` the same for every run
    rng = random.Random(seed)
    print(f"\nkill delays drawn with seed {seed}")
    leader = scene.leader("n1")
    target, via, *_ = sorted(set(scene.nodes) - {leader})
    delay = rng.uniform(0.0, 0.5)
    removal = _kill_during_removal(scene, via, target, target, delay)
    scene.settle()
    _, diff = scene.compare(f"{target}'s removal, its microd killed {delay:.2f} s in", via, removal)
    if target in {member.name for member in diff.members}:
        scene.remove_by_force(target, via)

    other = min(set(scene.nodes) - {leader, target, via})
    delay = rng.uniform(0.0, 0.5)
    removal = _kill_during_removal(scene, via, other, leader, delay)
    scene.stable()
    scene.compare(f"{other}'s removal, the leader {leader}'s microd killed {delay:.2f} s in", via, removal)
