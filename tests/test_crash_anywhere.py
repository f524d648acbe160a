"""Crash anywhere, lose nothing: kill -9 at a random moment of a guarded join or removal, not at a step boundary.

On each backend (local, and dqlite marked `dqlite`), one lab per kill target:
- `join-coordinator`: a join (a joining node laid out as `lab add-node` does, its token, its own request, in a thread)
  with the coordinator killed with SIGKILL at a delay drawn uniformly from the whole duration of a join, measured
  once on that lab first;
- `remove-coordinator`: the same with a guarded removal (of a node joined for the trial);
- `join-joiner-agent`: a join with the joiner's agent killed at such a delay, then restarted half a second later in
  half of the trials (`lab restart NAME`) and left dead in the others until the cluster has settled.
A killed coordinator is restarted with `lab restart coordinator` (same ports: the join token still names it).

Each trial then asserts, within SETTLE_TIMEOUT: nothing WARNING or worse in the diff, no operation unfinished and no
member PENDING (tests/settling.py), the member wholly in or wholly out (the diff's members and, on dqlite, the
leader's Raft configuration and members table), and that the same join (or removal) asked again succeeds: with its
token if it is still usable, else a new one; a fenced joiner reset first, as an operator would. A trial's lab is
left as it was found (what a trial joined is removed), and is replaced by a fresh one after a failed trial, so that
trials are independent.

MEMBERGUARD_CRASH_TRIALS: trials per backend and target (default 3); `make crash-anywhere` runs 17 (51 per
backend). The delays come from a seed, by default today's date (so `make test` rotates through them day by day),
MEMBERGUARD_CRASH_SEED to replay one; it is printed with every trial and on failure. Run with -s to see each trial:
backend, target, delay, outcome. A target's failures are counted and reported together at its end.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from memberguard import Client
from memberguard.v1 import operation_pb2 as o

from coordinator.agent.raft_files import write_node_info, write_raft_config
from coordinator.core.model import Role
from coordinator.lab import lab as labs
from tests.engines import leader_view
from tests.restarts import kill_agent
from tests.settling import FINISHED, settled

TRIALS_ENV = "MEMBERGUARD_CRASH_TRIALS"
SEED_ENV = "MEMBERGUARD_CRASH_SEED"
DEFAULT_TRIALS = 3
SETTLE_TIMEOUT = 30.0
RESTART_AFTER = 0.5  # seconds between killing the joiner's agent and restarting it
ROLES_INTERVAL = 0.5
# A joiner's agent is not gathered before it is registered, so only the reconciler's periodic pass notices that it
# is back; kept short, as in the crash matrices.
RECONCILE_INTERVAL = 0.5
STAYS = "n2"  # a member no trial removes, whose certificate reads the dqlite cluster
TARGETS = ("join-coordinator", "remove-coordinator", "join-joiner-agent")


def _trials() -> int:
    return int(os.environ.get(TRIALS_ENV, DEFAULT_TRIALS))


def _seed() -> str:
    return os.environ.get(SEED_ENV) or datetime.date.today().isoformat()


def _state(operation: o.Operation) -> str:
    return o.OperationState.Name(operation.state).removeprefix("OPERATION_STATE_").lower().replace("_", "-")


class TrialFailed(Exception):
    """A trial's outcome broke the promise; the message says how."""


@dataclass
class Trials:
    """One backend's lab for one target, rebuilt after a failed trial, and the outcomes so far."""

    directory: Path
    backend: str
    target: str
    lab: labs.Lab | None = None
    rebuilt: int = 0
    outcomes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def up(self) -> labs.Lab:
        lab = labs.up(self.directory / f"lab{self.rebuilt}", 3, backend=self.backend, roles_interval=ROLES_INTERVAL)
        # The reconciler's interval is a setting of the lab's coordinator configuration.
        config = lab.dir / "coordinator" / "coordinator.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "reconcile_interval": RECONCILE_INTERVAL}))
        labs.restart(lab.dir, "coordinator")
        self.lab = labs.Lab.load(lab.dir)
        return self.lab

    def down(self) -> None:
        if self.lab is not None:
            labs.down(self.lab.dir)
            self.lab = None

    def rebuild(self) -> labs.Lab:
        self.down()
        self.rebuilt += 1
        return self.up()

    @property
    def current(self) -> labs.Lab:
        assert self.lab is not None
        return labs.Lab.load(self.lab.dir)


# --- the cluster, as every source says -------------------------------------------------------------------------------


def _wholly(lab: labs.Lab, client: Client, name: str, address: str) -> bool:
    """True if name is wholly in, False if wholly out, once the lab has settled; TrialFailed if it is half in."""
    try:
        diff = settled(client, SETTLE_TIMEOUT)
    except pytest.fail.Exception as failure:
        raise TrialFailed(str(failure)) from None
    members = {m.name for m in diff.members}
    nodes = set(diff.nodes)
    if (name in members) != (name in nodes):
        raise TrialFailed(f"{name} is half in: members {sorted(members)}, nodes answering {sorted(nodes)}")
    if lab.document["backend"] == "dqlite":
        addresses = [n["address"] for n in lab.entries()] + [address]
        view = leader_view(addresses, Path(lab.node(STAYS)["state_dir"]))
        if view.holds(address) != (name in members) or (name in view.rows) != (name in members):
            raise TrialFailed(
                f"the diff says {name} is {'in' if name in members else 'out'}, the leader's configuration holds "
                f"{[n.address for n in view.nodes]} and its members table {view.rows}"
            )
    return name in members


def _reset(joiner: labs.JoiningNode) -> None:
    """What an operator does to a node whose join is over without it, before it comes back: its processes stopped,
    its engine's data and its truststore emptied, a fresh engine identity. A fenced node has had some of this done;
    one whose join was rolled back while its agent was away, none."""
    joiner.stop()
    for part in ("database", "truststore"):
        shutil.rmtree(joiner.state_dir / part, ignore_errors=True)
    (joiner.state_dir / "truststore").mkdir(mode=0o700)
    database = joiner.state_dir / "database"
    write_node_info(database / "info.yaml", random.SystemRandom().getrandbits(63), joiner.address, Role.VOTER)
    write_raft_config(database / "cluster.yaml", [])


def _running(pid: int) -> bool:
    return labs._is_ours(pid)


# --- killing -----------------------------------------------------------------------------------------------------


def _kill_coordinator(lab: labs.Lab) -> None:
    """kill -9 the lab's coordinator; returns once it is gone (reaped, if this process started it)."""
    pid = labs.Lab.load(lab.dir).document["coordinator"]["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _running(pid):
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.005)
    child = labs._children.pop(pid, None)
    if child is not None:
        child.wait()


def _at(delay: float, started: float, kill: Callable[[], None]) -> None:
    """Runs kill at delay seconds after started (time.monotonic())."""
    remaining = started + delay - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    kill()


def _finished(client: Client) -> None:
    """Returns once no operation is unfinished (a parked one is not finished); TrialFailed after SETTLE_TIMEOUT."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while unfinished := [op for op in client.list_operations().operations if op.state not in FINISHED]:
        if time.monotonic() > deadline:
            raise TrialFailed(
                f"unfinished {SETTLE_TIMEOUT:g} s on, without the joiner: "
                + ", ".join(f"{op.id} {_state(op)} ({op.error[:300]})" for op in unfinished)
            )
        time.sleep(0.1)


def _said(error: BaseException) -> str:
    """An error in one line: a gRPC error by its code and details."""
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
    return str(error)


def _first_outcome(running: Future[o.Operation]) -> str:
    try:
        return _state(running.result(timeout=60))
    except grpc.RpcError as error:
        return f"cut short ({error.code().name})"  # type: ignore[attr-defined]
    except Exception as error:  # the call's own failure, however the client reports it
        return f"cut short ({type(error).__name__})"


# --- one trial of each target ----------------------------------------------------------------------------------------


def _join_once(lab: labs.Lab, client: Client) -> tuple[labs.JoiningNode, str]:
    """A joining node and its token, not yet asked for."""
    joiner = labs.start_joining_node(lab)
    return joiner, client.issue_token(joiner.name).token


def _retry_join(lab: labs.Lab, client: Client, joiner: labs.JoiningNode, token: str) -> str:
    """The same join asked again, by the same node, reset; its token if still usable, else a new one."""
    _reset(joiner)
    labs.restart(lab.dir, joiner.name)
    if joiner.name not in {t.name for t in client.list_tokens()}:
        token = client.issue_token(joiner.name).token
    retried = joiner.join(token)
    if retried.state != o.OPERATION_STATE_SUCCEEDED:
        raise TrialFailed(f"the join asked again {_state(retried)}: {retried.error}")
    return "retried: succeeded"


def _remove_quietly(client: Client, name: str) -> None:
    """Takes a trial's member out again, leaving the lab as the trial found it."""
    removed = client.remove_member(name)
    if removed.state != o.OPERATION_STATE_SUCCEEDED:
        raise TrialFailed(f"removing {name} after the trial {_state(removed)}: {removed.error}")


def _measure(lab: labs.Lab, target: str) -> float:
    """How long the target's operation takes on this lab, once, undisturbed (what is joined goes again)."""
    with Client(lab.endpoint) as client:
        joiner, token = _join_once(lab, client)
        started = time.monotonic()
        joined = joiner.join(token)
        join = time.monotonic() - started
        assert joined.state == o.OPERATION_STATE_SUCCEEDED, joined
        started = time.monotonic()
        _remove_quietly(client, joiner.name)
        removal = time.monotonic() - started
        joiner.stop()
    return removal if target == "remove-coordinator" else join


def _trial(lab: labs.Lab, target: str, delay: float, rng: random.Random) -> str:
    """One trial; its outcome in a few words, or TrialFailed."""
    outcome: list[str] = []
    with Client(lab.endpoint) as client, ThreadPoolExecutor(1) as pool:
        joiner, token = _join_once(lab, client)
        try:
            if target == "remove-coordinator":
                setup = joiner.join(token)
                assert setup.state == o.OPERATION_STATE_SUCCEEDED, setup
                started = time.monotonic()
                running = pool.submit(client.remove_member, joiner.name)
            else:
                started = time.monotonic()
                running = pool.submit(joiner.join, token)
            if target == "join-joiner-agent":
                _at(delay, started, lambda: kill_agent(joiner.agent_pid))
                restart = rng.random() < 0.5
                if restart:
                    time.sleep(RESTART_AFTER)
                    labs.restart(lab.dir, joiner.name)
                outcome.append(f"joiner's agent killed, {'restarted' if restart else 'left dead'}")
            else:
                _at(delay, started, lambda: _kill_coordinator(lab))
                outcome.append("coordinator killed")
            outcome.append(f"first: {_first_outcome(running)}")
            if target != "join-joiner-agent":
                labs.restart(lab.dir, "coordinator")
        except (labs.LabError, grpc.RpcError) as error:
            raise TrialFailed(f"{'; '.join(outcome)}; {_said(error)}") from None
        with Client(lab.endpoint) as fresh:
            try:
                if not _running(joiner.agent_pid):
                    # Left dead: the operation must end without the joiner (nothing may wait for it for ever), and
                    # only then does it come back, for the sources to be compared.
                    _finished(fresh)
                    labs.restart(lab.dir, joiner.name)
                inside = _wholly(lab, fresh, joiner.name, joiner.address)
                outcome.append("wholly in" if inside else "wholly out")
                if target == "remove-coordinator":
                    if inside:
                        _remove_quietly(fresh, joiner.name)
                        outcome.append("retried: succeeded")
                else:
                    if not inside:
                        outcome.append(_retry_join(lab, fresh, joiner, token))
                    if not _wholly(lab, fresh, joiner.name, joiner.address):
                        raise TrialFailed(f"{joiner.name} is out after it joined")
                    _remove_quietly(fresh, joiner.name)
                if _wholly(lab, fresh, joiner.name, joiner.address):
                    raise TrialFailed(f"{joiner.name} is in after it was removed")
            except (TrialFailed, labs.LabError, grpc.RpcError) as failed:
                raise TrialFailed(f"{'; '.join(outcome)}; {_said(failed)}") from None
            finally:
                joiner.stop()
    return "; ".join(outcome)


# --- the tests ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _trials_of(tmp_path: Path, backend: str, target: str) -> Iterator[Trials]:
    trials = Trials(tmp_path, backend, target)
    trials.up()
    try:
        yield trials
    finally:
        trials.down()
        for pid, child in list(labs._children.items()):  # engines their agents fenced: reap them here
            if child.poll() is not None:
                del labs._children[pid]


def _run(tmp_path: Path, backend: str, target: str) -> None:
    seed = _seed()
    rng = random.Random(f"{seed}/{backend}/{target}")
    count = _trials()
    with _trials_of(tmp_path, backend, target) as trials:
        duration = _measure(trials.current, target)
        for number in range(1, count + 1):
            delay = rng.uniform(0.0, duration)
            label = f"CRASH {backend} {target} trial {number}/{count} seed {seed}: delay {delay * 1000:.1f} ms of "
            label += f"{duration * 1000:.1f} ms"
            try:
                outcome = _trial(trials.current, target, delay, rng)
            except (TrialFailed, AssertionError, labs.LabError, grpc.RpcError) as failed:
                trials.failures.append(f"{label}: FAILED: {failed}")
                print(f"\n{trials.failures[-1]}", end="")
                trials.rebuild()
                continue
            trials.outcomes.append(f"{label}: ok: {outcome}")
            print(f"\n{trials.outcomes[-1]}", end="")
    if trials.failures:
        pytest.fail(
            f"{len(trials.failures)} of {count} trials failed ({backend}, {target}; seed {seed}, replay with "
            f"{SEED_ENV}={seed}):\n" + "\n".join(trials.failures),
            pytrace=False,
        )


@pytest.mark.parametrize("target", TARGETS)
def test_a_kill_anywhere_leaves_the_member_wholly_in_or_out_local(tmp_path: Path, target: str) -> None:
    _run(tmp_path, "local", target)


@pytest.mark.dqlite
@pytest.mark.parametrize("target", TARGETS)
def test_a_kill_anywhere_leaves_the_member_wholly_in_or_out_dqlite(tmp_path: Path, target: str) -> None:
    _run(tmp_path, "dqlite", target)
