"""canonical/microcluster's own example daemon and CLI, run as an N-member cluster on loopback for the tests.

The binaries are build/bin/microd and build/bin/microctl, built by `make go` from the microcluster version pinned in
coordinator/lab/go/microcluster/go.mod. A cluster comes up the way microcluster's example/test/main.sh brings one up:
one microd per member, each with its own `--state-dir` and waited for with `microctl waitready`; `init c1 ADDRESS
--bootstrap` on the first; for each other member a token from the first (`tokens add NAME`) and `init NAME ADDRESS
--token TOKEN` on its own state dir; then `cluster list` is polled until no member is PENDING, because dqlite assigns
roles, and microcluster writes them to core_cluster_members, only a heartbeat or so after the joins. Members are
named c1..cN, as there. It goes down the way main.sh takes it down: `microctl shutdown` on each member in turn, a
grace period, then SIGKILL, by pid, for whatever still runs (a daemon whose shutdown hangs is not rare there either).

microd serves its REST API and dqlite's traffic on the one address it is initialised with: one free loopback port per
member. A member's log is DIR/<name>.log, beside its state dir, so that the state dir holds only what microd wrote.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.lab.ports import loopback_addresses

_ROOT = Path(__file__).resolve().parents[2]
MICROD = _ROOT / "build" / "bin" / "microd"
MICROCTL = _ROOT / "build" / "bin" / "microctl"

# main.sh runs its daemons with 2 s heartbeats: roles settle within a few of them.
HEARTBEAT = 2.0
START_TIMEOUT = 60.0
STOP_GRACE = 5.0
_LOG_TAIL = 4000


# What microctl prints when microcluster's own dqlite client gives up its leader search: on a loaded machine it does
# now and then while the cluster has a leader, and asked again a heartbeat later it finds it.
NO_LEADER = "no available dqlite leader server found"


class MicroclusterError(RuntimeError):
    """microd or microctl did not do what bringing the cluster up needs; the message carries the logs' tails."""


def microctl(
    state_dir: Path | str, *args: str, timeout: float = 30.0, leader_within: float = 0.0
) -> subprocess.CompletedProcess[str]:
    """`microctl --state-dir STATE_DIR ARGS` as it exits; asked again, for up to LEADER_WITHIN seconds, while it
    says NO_LEADER (a caller that studies a leaderless cluster leaves it at 0, and sees that answer)."""
    deadline = time.monotonic() + leader_within
    while True:
        done = subprocess.run(
            [str(MICROCTL), "--state-dir", str(state_dir), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if NO_LEADER not in done.stderr or time.monotonic() >= deadline:
            return done
        time.sleep(HEARTBEAT / 2)


@dataclass(frozen=True)
class Member:
    name: str
    address: str
    state_dir: Path
    log: Path

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-_LOG_TAIL:]
        except FileNotFoundError:
            return ""


@dataclass(frozen=True)
class ListedMember:
    """One row of `microctl cluster list`: core_cluster_members as the daemon reports it."""

    name: str
    address: str
    role: str
    status: str


@dataclass
class Cluster:
    members: list[Member]
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def microctl(self, member: Member, *args: str, timeout: float = 30.0) -> str:
        """Run `microctl --state-dir <member's> ARGS`; its stdout, or MicroclusterError when it fails."""
        try:
            result = microctl(member.state_dir, *args, timeout=timeout, leader_within=timeout)
        except subprocess.TimeoutExpired as exc:
            raise MicroclusterError(
                f"microctl {' '.join(args)} on {member.name} took over {timeout}s\n{member.log_tail()}"
            ) from exc
        if result.returncode != 0:
            raise MicroclusterError(
                f"microctl {' '.join(args)} on {member.name} exited {result.returncode}: {result.stderr.strip()}\n"
                f"{member.log_tail()}"
            )
        return result.stdout

    def cluster_list(self, member: Member | None = None) -> list[ListedMember]:
        """`microctl cluster list` on MEMBER (default the first), sorted by name."""
        rows = json.loads(self.microctl(member or self.members[0], "cluster", "list", "--format", "json"))
        listed = [ListedMember(row["name"], row["address"], row["role"], row["status"]) for row in rows]
        return sorted(listed, key=lambda row: row.name)

    def pid(self, member: Member) -> int:
        return self._processes[member.name].pid

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return list(self._processes.values())

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Shut each member down in turn, give them GRACE seconds, then SIGKILL whatever still runs."""
        for member in self.members:
            process = self._processes.get(member.name)
            if process is None or process.poll() is not None:
                continue
            # The daemon answers its own shutdown by closing the connection (microctl says EOF and exits 1), as
            # main.sh's `|| true` expects: whether it stopped is judged by its pid below.
            try:
                subprocess.run(
                    [str(MICROCTL), "--state-dir", str(member.state_dir), "shutdown"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=grace,
                )
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + grace
        for process in self._processes.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
        self._processes.clear()

    def _spawn(self, member: Member, heartbeat: float) -> None:
        member.state_dir.mkdir(parents=True)
        self._processes[member.name] = spawn(member.state_dir, member.log, heartbeat=heartbeat)

    def _wait_settled(self, deadline: float) -> None:
        while True:
            listed = self.cluster_list()
            pending = [row.name for row in listed if row.role == "PENDING"]
            if len(listed) == len(self.members) and not pending:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {member.name}\n{member.log_tail()}" for member in self.members)
                raise MicroclusterError(f"members still PENDING or missing: {listed}\n{logs}")
            time.sleep(0.5)


def spawn(state_dir: Path, log: Path, *, heartbeat: float = HEARTBEAT) -> subprocess.Popen[bytes]:
    """A microd on state_dir (which exists), its output appended to log; not waited for (see wait_ready)."""
    with log.open("ab") as output:
        return subprocess.Popen(
            [str(MICROD), "--state-dir", str(state_dir), "--heartbeat", f"{heartbeat}s"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,  # a Ctrl-C meant for pytest must not reach the daemons before stop() does
        )


def wait_ready(state_dir: Path, timeout: float = 30.0) -> None:
    """Returns once the microd on state_dir answers (`microctl waitready`); MicroclusterError if it does not."""
    try:
        result = subprocess.run(
            [str(MICROCTL), "--state-dir", str(state_dir), "waitready", "--timeout", str(int(timeout))],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )
    except subprocess.TimeoutExpired:
        raise MicroclusterError(f"the microd on {state_dir} was not ready within {timeout:g} s") from None
    if result.returncode != 0:
        raise MicroclusterError(f"the microd on {state_dir} was not ready: {result.stderr.strip()}")


def start(
    directory: Path,
    count: int,
    *,
    heartbeat: float = HEARTBEAT,
    timeout: float = START_TIMEOUT,
    names: Sequence[str] = (),
    logs: Path | None = None,
) -> Cluster:
    """Bring up COUNT members under DIRECTORY (DIRECTORY/<name> state dirs, <name>.log in LOGS, by default DIRECTORY
    too), named c1..cN unless NAMES says otherwise; stopped on failure."""
    for binary in (MICROD, MICROCTL):
        if not binary.is_file():
            raise MicroclusterError(f"{binary} is missing: build it with `make go`")
    names = list(names) or [f"c{i}" for i in range(1, count + 1)]
    if len(names) != count:
        raise ValueError(f"{count} members, {len(names)} names")
    addresses = loopback_addresses(count)
    logs = logs or directory
    cluster = Cluster(
        [
            Member(name, address, directory / name, logs / f"{name}.log")
            for name, address in zip(names, addresses, strict=True)
        ]
    )
    deadline = time.monotonic() + timeout
    try:
        for member in cluster.members:
            cluster._spawn(member, heartbeat)
            cluster.microctl(member, "waitready", "--timeout", str(int(timeout)), timeout=timeout)
        first, *joiners = cluster.members
        cluster.microctl(first, "init", first.name, first.address, "--bootstrap")
        for member in joiners:
            token = cluster.microctl(first, "tokens", "add", member.name).strip()
            cluster.microctl(member, "init", member.name, member.address, "--token", token, timeout=timeout)
        cluster._wait_settled(deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def running(directory: Path, count: int, *, heartbeat: float = HEARTBEAT) -> Iterator[Cluster]:
    """A started cluster, stopped on leaving the block."""
    cluster = start(directory, count, heartbeat=heartbeat)
    try:
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def uninitialised(state_dir: Path, log: Path) -> Iterator[Path]:
    """A microd started on state_dir and never initialised, once it is ready: it has made its server.crt and its
    truststore, but has no daemon.yaml and no database. Stopped on leaving the block."""
    state_dir.mkdir(parents=True)
    daemon = spawn(state_dir, log)
    try:
        wait_ready(state_dir)
        yield state_dir
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
