"""The journal on real files: what is journaled is on disk for the next process, whole, even after kill -9; one owner
at a time; the epoch counts owners; request ids, paging and tokens behave as the contract needs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import get_args

import pytest

from coordinator.core.model import Member, Role
from coordinator.core.operation import (
    Audit,
    OperationKind,
    OperationRecord,
    OperationState,
    Park,
    Start,
    Step,
    StepDone,
    StepState,
    apply,
)
from coordinator.core.plan import (
    COORDINATOR,
    Action,
    EnsureMemberRow,
    EnsureRaftEntry,
    EnsureTruststoreRecord,
    FenceNode,
    ForgetMember,
    IssueMicroclusterToken,
    JoinThroughMicrocluster,
    RegisterMember,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveThroughMicrocluster,
    RemoveTruststoreRecord,
    RevokeMicroclusterToken,
)
from coordinator.core.tokens import TokenRecord, TokenState
from coordinator.journal import (
    DuplicateRequest,
    InvalidPageToken,
    Journal,
    JournalLocked,
    UnknownOperation,
    UnknownToken,
)
from tests.core.test_operation import invariant_violations

ROOT = Path(__file__).resolve().parent.parent


def operation(number: int, created_at: float = 1000.0) -> OperationRecord:
    """A queued join of n<number>, planned in four steps with the commit point third."""
    return OperationRecord(
        id=f"op-{number}",
        kind=OperationKind.JOIN,
        member=Member(name=f"n{number}", certificate_fingerprint="ab" * 32, address=f"10.0.0.{number % 250}:9000"),
        state=OperationState.QUEUED,
        steps=(
            Step(f"reserve row n{number}", commit_point=False),
            Step(f"engine join n{number}", commit_point=False),
            Step(f"n{number} in the leader's configuration", commit_point=True),
            Step(f"trust n{number} everywhere", commit_point=False),
        ),
        error="",
        plan="",
        audit=Audit(
            requested_by="join token",
            certificate_fingerprint="ab" * 32,
            request_id=f"request-{number}",
            verdict="forced, acknowledged 2 discrepancies",
            fingerprint="cd" * 32,
            acknowledged=("d1", "d2"),
        ),
        epoch=0,
        created_at=created_at,
        updated_at=created_at,
    )


def python(code: str, *args: str) -> subprocess.Popen[str]:
    """A child process running code, from the repository root (so `tests` imports) with args in sys.argv[1:]."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def output_of(code: str, *args: str) -> str:
    child = python(code, *args)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, out
    return out.strip()


# --- durability -----------------------------------------------------------------------------------------------------


def test_the_plan_is_on_disk_when_create_returns(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    # The child journals an operation and dies at once, before running a step and without closing anything.
    child = python(
        """
        import os, signal, sys
        from coordinator.journal import Journal
        from tests.test_journal import operation
        Journal.open(sys.argv[1]).create(operation(1))
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(path),
    )
    child.communicate(timeout=60)
    assert child.returncode == -9
    with Journal.open(path) as journal:
        assert journal.get("op-1") == replace(operation(1), epoch=1)


def test_another_process_reads_back_what_was_journaled(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal.open(path) as journal:
        created = journal.create(operation(1))
        saved = journal.save(
            replace(
                apply(apply(created, Start(), 1001.0), StepDone(0), 1002.0),
                member=replace(created.member, node_id=0xF000_0000_0000_0007),
            )
        )
    read_back = output_of(
        """
        import sys
        from coordinator.journal import Journal
        with Journal.open(sys.argv[1]) as journal:
            print(repr(journal.get("op-1")))
        """,
        str(path),
    )
    assert read_back == repr(saved)
    # A join learns the node ID half-way; dqlite's IDs are uint64, above SQLite's signed INTEGER.
    assert saved.member.node_id == 0xF000_0000_0000_0007 and saved.steps[0].finished_at == 1002.0


def test_a_crash_mid_write_leaves_whole_operations(tmp_path: Path) -> None:
    """kill -9 a writer in a tight loop, three times on one journal: every operation read back has its whole plan and
    a legal state, and every operation the writer reported journaled is there."""
    path = tmp_path / "journal.db"
    writer = """
        import sys
        from coordinator.core.operation import Start, StepDone, Succeed, apply
        from coordinator.journal import Journal
        from tests.test_journal import operation
        journal = Journal.open(sys.argv[1])
        number = int(sys.argv[2])
        while True:
            record = journal.create(operation(number))
            print(number, flush=True)
            for event in (Start(), StepDone(0), StepDone(1), StepDone(2), StepDone(3), Succeed()):
                record = journal.save(apply(record, event, 2000.0))
            number += 1
        """
    reported: list[int] = []
    for attempt in range(3):
        # Its own numbers each time: an operation journaled just before the kill may not have been reported.
        child = python(writer, str(path), str(1000 * attempt + 1))
        assert child.stdout is not None
        reported += [int(child.stdout.readline()) for _ in range(20)]
        child.kill()
        child.communicate(timeout=60)  # reaps it and closes its pipe
    with Journal.open(path) as journal:
        records, _ = journal.page(10_000)
        assert journal.epoch == 4
    assert {f"op-{n}" for n in reported} <= {r.id for r in records}
    for record in records:
        number = int(record.id.removeprefix("op-"))
        assert [s.name for s in record.steps] == [s.name for s in operation(number).steps]
        assert invariant_violations(record) == []


# --- ownership and epoch --------------------------------------------------------------------------------------------

OPEN_FROM_ANOTHER_PROCESS = """
    import sys
    from coordinator.journal import Journal, JournalLocked
    try:
        with Journal.open(sys.argv[1]) as journal:
            print("opened", journal.epoch)
    except JournalLocked as locked:
        print("locked:", locked)
    """


def test_one_coordinator_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal.open(path):
        answer = output_of(OPEN_FROM_ANOTHER_PROCESS, str(path))
        assert answer.startswith("locked:") and "held by another coordinator" in answer
        with pytest.raises(JournalLocked):  # the lock is the open file's, so a second open here is refused too
            Journal.open(path)
    assert output_of(OPEN_FROM_ANOTHER_PROCESS, str(path)) == "opened 2"


def test_every_open_bumps_the_epoch(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    epochs = []
    for _ in range(3):
        with Journal.open(path) as journal:
            epochs.append(journal.epoch)
    assert epochs == [1, 2, 3]
    with Journal.open(path) as journal:
        assert journal.create(operation(1)).epoch == 4  # the journal stamps what it writes with its owner's epoch


# --- operations -----------------------------------------------------------------------------------------------------


def test_a_request_id_starts_one_operation(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as journal:
        first = journal.create(operation(1))
        retry = replace(operation(2), audit=operation(1).audit)
        with pytest.raises(DuplicateRequest) as duplicate:
            journal.create(retry)
        assert duplicate.value.existing == first
        assert journal.by_request_id("request-1") == first
        assert journal.get("op-2") is None and journal.by_request_id("request-2") is None


def test_save_records_a_transition_and_nothing_else(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as journal:
        created = journal.create(operation(1))
        parked = apply(apply(created, Start(), 1001.0), Park("n1 does not answer", "bring n1 back"), 1002.0)
        journal.save(replace(parked, member=replace(parked.member, role=Role.PENDING)))
        stored = journal.get("op-1")
        assert stored is not None
        assert (stored.state, stored.error, stored.plan, stored.updated_at, stored.member.role) == (
            OperationState.PARKED,
            "n1 does not answer",
            "bring n1 back",
            1002.0,
            Role.PENDING,
        )
        with pytest.raises(ValueError, match="cannot change the plan"):
            journal.save(replace(stored, steps=stored.steps[:2], state=OperationState.RUNNING))
        assert journal.get("op-1") == stored  # the refused save left nothing behind
        with pytest.raises(UnknownOperation):
            journal.save(operation(2))


def test_steps_keep_what_they_do(tmp_path: Path) -> None:
    """Recovery re-sends steps from the journal alone, so each step's target and action come back as planned."""
    actions: list[Action] = [
        EnsureTruststoreRecord("n4", "10.0.0.4:9000", "-----BEGIN CERTIFICATE-----\n..."),
        RemoveTruststoreRecord("n4"),
        EnsureMemberRow("n4", "10.0.0.4:9000", "-----BEGIN CERTIFICATE-----\n...", "PENDING"),
        RemoveMemberRow("n4"),
        EnsureRaftEntry(0x8000_0000_0000_0001, "10.0.0.4:9000", Role.SPARE),
        RemoveRaftEntry(7, "10.0.0.4:9000", Role.STAND_BY),
        RemoveRaftEntry(7, "10.0.0.4:9000"),
        FenceNode(),
        FenceNode("10.0.0.4:9100", "-----BEGIN CERTIFICATE-----\n..."),
        ForgetMember("n4"),
        RegisterMember("n4", "10.0.0.4:9100", "-----BEGIN CERTIFICATE-----\n..."),
        RemoveThroughMicrocluster("n4", "10.0.0.4:9000", 7, force=True),
        IssueMicroclusterToken("n4", 3600.0),
        RevokeMicroclusterToken("n4"),
        JoinThroughMicrocluster("n4", "127.0.0.1:7004"),
    ]
    assert {type(action) for action in actions} == set(get_args(Action)), "journal every kind of action here"
    steps = tuple(
        Step(
            f"step {i}",
            commit_point=i == 4,
            target=COORDINATOR if i in (9, 10) else "n1",
            action=action,
            deferred=i == 8,  # the pinned fence, as a removal defers it
        )
        for i, action in enumerate(actions)
    )
    with Journal.open(tmp_path / "journal.db") as journal:
        created = journal.create(replace(operation(1), steps=steps))
        assert journal.get("op-1") == created
        stored = journal.get("op-1")
        assert stored is not None and stored.steps == steps
        assert type(stored.steps[4].action) is EnsureRaftEntry and stored.steps[4].action.role is Role.SPARE
        removal = stored.steps[5].action
        assert type(removal) is RemoveRaftEntry and removal.role is Role.STAND_BY  # an optional enum comes back typed
        other = (replace(steps[0], action=RemoveTruststoreRecord("n5")), *steps[1:])
        with pytest.raises(ValueError, match="cannot change the plan"):
            journal.save(replace(created, steps=other))


def test_unfinished_operations_in_journal_order(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as journal:
        states = [
            OperationState.RUNNING,
            OperationState.SUCCEEDED,
            OperationState.PARKED,
            OperationState.ROLLED_BACK,
            OperationState.QUEUED,
        ]
        for number, state in enumerate(states, 1):
            journal.create(replace(operation(number), state=state))
        assert [r.id for r in journal.unfinished()] == ["op-1", "op-3", "op-5"]


def _removal(number: int, deferred: StepState) -> OperationRecord:
    """A succeeded removal whose last step, deferred, is in the given state."""
    steps = (
        Step("remove from Raft", commit_point=True, state=StepState.DONE, target="n1", action=RemoveRaftEntry(3, "a")),
        Step("n2's truststore", False, state=deferred, target="n2", action=RemoveTruststoreRecord("n3"), deferred=True),
    )
    return replace(operation(number), kind=OperationKind.REMOVE, state=OperationState.SUCCEEDED, steps=steps)


def test_succeeded_operations_with_a_remainder_in_journal_order(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as journal:
        for number, state in enumerate([StepState.PENDING, StepState.DONE, StepState.SENT, StepState.SKIPPED], 1):
            journal.create(_removal(number, state))
        journal.create(replace(operation(5), state=OperationState.RUNNING))
        assert [r.id for r in journal.with_remainder()] == ["op-1", "op-3"]
        assert journal.with_remainder()[0].steps[1].deferred


def test_a_version_2_journal_opens_with_no_step_deferred(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal.open(path) as journal:
        journal.create(operation(1))
    # What a version-2 journal is: the same tables without steps.deferred.
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE steps DROP COLUMN deferred")
        db.execute("UPDATE schema_version SET version = 2")
    with Journal.open(path) as journal:
        stored = journal.get("op-1")
        assert stored is not None and not any(step.deferred for step in stored.steps)
        assert stored.steps == operation(1).steps
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone() == (3,)


def test_pages_run_newest_first_and_inserts_do_not_shift_them(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as journal:
        for number in range(1, 6):
            journal.create(operation(number))
        first, page_token = journal.page(2)
        assert [r.id for r in first] == ["op-5", "op-4"] and page_token
        journal.create(operation(6))
        journal.create(operation(7))
        second, page_token = journal.page(2, page_token)
        third, last = journal.page(2, page_token)
        assert [r.id for r in second] == ["op-3", "op-2"]
        assert [r.id for r in third] == ["op-1"] and last == ""
        assert [r.id for r in journal.page(2)[0]] == ["op-7", "op-6"]
        assert journal.page(7)[1] == ""  # exactly full: no empty page follows
        for bad in ("not a token", "b3AtMQ==", page_token + "x"):
            with pytest.raises(InvalidPageToken):
                journal.page(2, bad)
        with pytest.raises(ValueError, match="at least one"):
            journal.page(0)


# --- tokens ---------------------------------------------------------------------------------------------------------


def token(name: str, issued_at: float = 1000.0, expires_at: float = 4600.0) -> TokenRecord:
    return TokenRecord(
        name=name,
        secret_digest=f"sha256:{name}-{issued_at}",
        expires_at=expires_at,
        issued_by="operator",
        issued_at=issued_at,
    )


def test_tokens_put_replace_update_delete(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as journal:
        journal.put_token(token("n4"))
        journal.put_token(token("n5", expires_at=2000.0))
        journal.put_token(token("n6"))
        assert [t.name for t in journal.tokens(now=1500.0)] == ["n4", "n5", "n6"]
        assert [t.name for t in journal.tokens(now=2000.0)] == ["n4", "n6"]  # n5 expired

        again = token("n4", issued_at=1100.0)
        journal.put_token(again)  # issuing for a name again replaces its token
        assert journal.token("n4") == again

        journal.update_token(replace(again, state=TokenState.REVOKED))
        journal.update_token(replace(token("n6"), state=TokenState.CONSUMED, bound_fingerprint="ef" * 32))
        assert journal.tokens(now=1500.0) == [token("n5", expires_at=2000.0)]
        assert journal.token("n6") == replace(token("n6"), state=TokenState.CONSUMED, bound_fingerprint="ef" * 32)
        with pytest.raises(UnknownToken):
            journal.update_token(token("n7"))

        assert journal.delete_tokens_of("n4") == 1
        assert journal.delete_tokens_of("n4") == 0
        assert journal.token("n4") is None and journal.token("n7") is None


def test_counts_by_kind_and_state(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as journal:
        assert journal.counts() == {}
        states = [OperationState.RUNNING, OperationState.SUCCEEDED, OperationState.SUCCEEDED, OperationState.PARKED]
        for number, state in enumerate(states, 1):
            journal.create(replace(operation(number), state=state))
        journal.create(_removal(9, StepState.DONE))
        assert journal.counts() == {
            (OperationKind.JOIN, OperationState.RUNNING): 1,
            (OperationKind.JOIN, OperationState.SUCCEEDED): 2,
            (OperationKind.JOIN, OperationState.PARKED): 1,
            (OperationKind.REMOVE, OperationState.SUCCEEDED): 1,
        }
