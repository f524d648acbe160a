"""Guarded operations: one at a time under the membership lock, gather → diff → decide → journal → steps.

A request waits for the lock (bounded by its deadline: one whose deadline passed while it queued is dropped before
its guard runs), then the guard decides on a fresh diff. A refused request changes nothing. An admitted one is
journaled whole — every step, before the first runs — and its steps are applied one by one, each completion
recorded. A step that fails before the commit point rolls the operation back; after it, the step is retried and,
if it keeps failing, the operation is parked: visible, blocking, with what would clear it.

The run belongs to the coordinator, not to the request: a caller whose deadline runs out gets the operation as it
stands and can follow it with WaitOperation. After a crash, `reconcile` decides each unfinished operation from a
fresh observation, never from the journal alone: the commit step may have been applied and not yet recorded.

MEMBERGUARD_FAULT ("before-step:N" or "after-step:N") makes the coordinator process exit at that step boundary of
every operation, and "fail-step:N" makes step N fail every time: the tests arm it; unset, it does nothing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from memberguard.v1 import agent_pb2, coordinator_pb2, operation_pb2
from memberguard.v1 import membership_pb2 as pb

from coordinator.core import tokens
from coordinator.core.diff import compute_diff
from coordinator.core.guard import Proceed, Refused, Request, Stale, decide
from coordinator.core.model import DiscrepancyKind, Member, MembershipDiff
from coordinator.core.operation import (
    Audit,
    OperationKind,
    OperationRecord,
    OperationState,
    Park,
    Resume,
    RollBack,
    Start,
    Step,
    StepDone,
    Succeed,
    apply,
    committed,
    next_step,
)
from coordinator.core.plan import (
    COORDINATOR,
    Action,
    CannotPlan,
    EnsureMemberRow,
    EnsureRaftEntry,
    EnsureTruststoreRecord,
    FenceNode,
    ForgetMember,
    PlannedStep,
    RegisterMember,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveTruststoreRecord,
    plan_removal,
)
from coordinator.errors import (
    AlreadyExists,
    DirtyMembership,
    FieldViolation,
    InvalidRequest,
    NotFound,
    NotImplementedYet,
    PreconditionViolation,
    StaleFingerprint,
)
from coordinator.gather import Agents
from coordinator.journal import Journal
from coordinator.messages import diff_to_proto
from coordinator.registry import Registry

FAULT_ENV = "MEMBERGUARD_FAULT"
STEP_TIMEOUT = 5.0
# After the commit point a failing step is retried this many times before the operation is parked.
STEP_ATTEMPTS = 3
MAX_REQUEST_ID = 128


class DeadlinePassed(Exception):
    """The request's deadline passed while it waited for the membership lock: it was dropped, nothing ran."""


@dataclass(frozen=True)
class Caller:
    """Who asks: for the audit trail."""

    name: str
    certificate_fingerprint: str


@dataclass(frozen=True)
class Outcome:
    record: OperationRecord
    token: str = ""  # the token text, for the request that issued it; never stored


class Operations:
    def __init__(
        self,
        *,
        journal: Journal,
        agents: Agents,
        registry: Registry,
        cluster_id: str,
        certificate_fingerprint: str,
        agent_timeout: float,
    ) -> None:
        self._journal = journal
        self._agents = agents
        self._registry = registry
        self._cluster_id = cluster_id
        self._fingerprint = certificate_fingerprint
        self._join_addresses: tuple[str, ...] = ()
        self._agent_timeout = agent_timeout
        self._lock = asyncio.Lock()
        self._runs: dict[str, asyncio.Future[OperationRecord]] = {}  # running now, for WaitOperation
        self._fault = os.environ.get(FAULT_ENV, "")

    def listening_on(self, addresses: Sequence[str]) -> None:
        """Where joiners reach this coordinator (tokens carry it); known once the server is bound."""
        self._join_addresses = tuple(addresses)

    # --- requests ------------------------------------------------------------------------------------------------

    async def submit(
        self, request: coordinator_pb2.GuardedOperationRequest, caller: Caller, deadline: float | None
    ) -> Outcome:
        """Runs the request under the guard and waits for its outcome until the deadline (loop time)."""
        kind, target = _validate(request)
        known = self._journal.by_request_id(request.request_id)
        if known is not None:
            return Outcome(known)
        admitted: asyncio.Future[OperationRecord] = asyncio.get_running_loop().create_future()
        run = asyncio.create_task(self._execute(request, kind, target, caller, deadline, admitted))
        wait = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.shield(run), wait)
        except TimeoutError:
            if admitted.done():
                return Outcome(self._journal.get(admitted.result().id) or admitted.result())
            raise

    async def wait(self, operation_id: str, timeout: float | None) -> OperationRecord:
        record = self._journal.get(operation_id)
        if record is None:
            raise NotFound(f"no operation {operation_id}")
        if not record.state.finished:
            try:
                async with asyncio.timeout(timeout):
                    run = self._runs.get(operation_id)
                    if run is None:
                        # Not running yet: whoever holds the lock (the reconciler, after a restart) takes it up next.
                        async with self._lock:
                            pass
                        run = self._runs.get(operation_id)
                    if run is not None:
                        await asyncio.shield(run)
            except TimeoutError:
                pass
        found = self._journal.get(operation_id)
        assert found is not None
        return found

    async def _execute(
        self,
        request: coordinator_pb2.GuardedOperationRequest,
        kind: OperationKind,
        target: str,
        caller: Caller,
        deadline: float | None,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        async with self._lock:
            loop = asyncio.get_running_loop()
            if deadline is not None and loop.time() >= deadline:
                raise DeadlinePassed(f"request {request.request_id} waited past its deadline for the membership lock")
            # A retry that queued behind the original must not run twice.
            known = self._journal.by_request_id(request.request_id)
            if known is not None:
                return Outcome(known)
            diff = compute_diff(await self._agents.gather(self._agent_timeout))
            parked = [r for r in self._journal.unfinished() if r.state is OperationState.PARKED]
            if parked:
                # A half-done change must be finished before another starts on top of it.
                raise DirtyMembership(
                    f"{len(parked)} parked operation(s) must be finished first",
                    diff_to_proto(diff),
                    [PreconditionViolation("PARKED_OPERATION", r.id, f"{r.error}; {r.plan}") for r in parked],
                )
            # An unknown member is NOT_FOUND, not a dirty diff: there is nothing to clear.
            member = _resolve(diff, target, request.remove_member.address) if kind.removes else None
            verdict = decide(
                Request(
                    kind,
                    target,
                    request.expected_fingerprint,
                    frozenset(request.acknowledged_discrepancy_ids),
                ),
                diff,
            )
            if isinstance(verdict, Refused):
                violations = [PreconditionViolation(v.type, v.subject, v.description) for v in verdict.violations]
                raise DirtyMembership(
                    f"membership may not change: {len(violations)} violation(s); clear them first",
                    diff_to_proto(diff),
                    violations,
                )
            if isinstance(verdict, Stale):
                raise StaleFingerprint(
                    "the membership changed since the caller's diff: re-read it and retry", diff_to_proto(diff)
                )
            assert isinstance(verdict, Proceed)
            audit = Audit(
                requested_by=caller.name,
                certificate_fingerprint=caller.certificate_fingerprint,
                request_id=request.request_id,
                verdict=_verdict(verdict, request),
                fingerprint=diff.fingerprint,
                acknowledged=tuple(sorted(verdict.acknowledged_used)),
            )
            if kind is OperationKind.ISSUE_TOKEN:
                return self._issue_token(request.issue_token, diff, audit, admitted)
            assert member is not None
            return await self._remove(kind, member, diff, audit, admitted)

    # --- tokens --------------------------------------------------------------------------------------------------

    def _issue_token(
        self,
        operation: operation_pb2.IssueTokenOperation,
        diff: MembershipDiff,
        audit: Audit,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        if any(m.name == operation.name for m in diff.members):
            raise AlreadyExists(f"{operation.name} is already a member")
        now = time.time()
        ttl = operation.ttl.ToNanoseconds() / 1e9 if operation.HasField("ttl") else None
        try:
            text, token = tokens.issue(
                operation.name,
                secrets.token_bytes(32),
                now=now,
                ttl=ttl,
                issued_by=audit.requested_by,
                coordinator_fingerprint=self._fingerprint,
                cluster_id=self._cluster_id,
                join_addresses=self._join_addresses,
            )
        except tokens.InvalidTokenRequest as error:
            raise InvalidRequest([FieldViolation(f"issue_token.{error.field}", error.reason)]) from None
        record = self._new_record(OperationKind.ISSUE_TOKEN, Member(name=operation.name), (), audit, now)
        record = self._journal.create(record)
        admitted.set_result(record)
        # One token per name: issuing again replaces the earlier one (a stale token never blocks a re-issue).
        self._journal.put_token(token)
        record = self._save(apply(apply(record, Start(), now), Succeed(), now))
        return Outcome(record, text)

    # --- removals ------------------------------------------------------------------------------------------------

    async def _remove(
        self,
        kind: OperationKind,
        member: Member,
        diff: MembershipDiff,
        audit: Audit,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        reachable = {node for node in diff.nodes if not _unreachable(diff, node)}
        try:
            plan = plan_removal(diff, member, reachable=reachable)
        except CannotPlan as error:
            raise DirtyMembership(
                str(error),
                diff_to_proto(diff),
                [PreconditionViolation("NO_REACHABLE_NODE", member.name or member.address, str(error))],
            ) from None
        now = time.time()
        record = self._new_record(kind, member, plan.steps, audit, now)
        record = replace(record, plan=plan.remainder)
        record = self._journal.create(record)
        admitted.set_result(record)
        return Outcome(await self._follow(record))

    async def _follow(self, record: OperationRecord) -> OperationRecord:
        """Runs the operation as a task WaitOperation can wait for."""
        run = asyncio.ensure_future(self._run(record))
        self._runs[record.id] = run
        run.add_done_callback(lambda _: self._runs.pop(record.id, None))
        return await run

    async def _run(self, record: OperationRecord) -> OperationRecord:
        """Applies the record's pending steps in order; rolls back, parks or succeeds."""
        if record.state is OperationState.QUEUED:
            record = self._save(apply(record, Start(), time.time()))
        while (index := next_step(record)) is not None:
            self._die_if_armed("before-step", index)
            step = record.steps[index]
            error = await self._apply_with_retries(record, index, step)
            if error is not None:
                if committed(record):
                    remaining = ", ".join(s.name for s in record.steps[index:])
                    return self._save(apply(record, Park(error, f"finish the removal: {remaining}"), time.time()))
                return self._save(apply(record, RollBack(error), time.time()))
            record = self._save(apply(record, StepDone(index), time.time()))
            self._die_if_armed("after-step", index)
        return self._save(apply(record, Succeed(), time.time()))

    async def _apply_with_retries(self, record: OperationRecord, index: int, step: Step) -> str | None:
        attempts = STEP_ATTEMPTS if committed(record) or step.commit_point else 1
        error = ""
        for attempt in range(attempts):
            try:
                await self._apply(record, index, step)
                return None
            except StepFailed as failure:
                error = f"{step.name}: {failure}"
                await asyncio.sleep(0.2 * (attempt + 1))
        return error

    async def _apply(self, record: OperationRecord, index: int, step: Step) -> None:
        assert step.action is not None
        if self._fault == f"fail-step:{index}":
            raise StepFailed("failure injected by MEMBERGUARD_FAULT")
        if step.target == COORDINATOR:
            assert isinstance(step.action, ForgetMember)
            self._registry.forget(step.action.name)
            self._journal.delete_tokens_of(step.action.name)
            return
        request = _step_request(step.action)
        request.operation_id, request.step_index, request.epoch = record.id, index, self._journal.epoch
        try:
            await self._agents.apply_step(step.target, request, STEP_TIMEOUT)
        except Exception as error:
            raise StepFailed(str(error)) from error

    # --- recovery ------------------------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Finishes or rolls back what a crash left unfinished, deciding from a fresh observation."""
        async with self._lock:
            for record in self._journal.unfinished():
                if record.state is OperationState.PARKED:
                    # Past its commit point: try again to finish it (whatever stopped it may have been fixed).
                    await self._follow(self._save(apply(record, Resume(), time.time())))
                    continue
                diff = compute_diff(await self._agents.gather(self._agent_timeout))
                if record.state is OperationState.QUEUED:
                    self._save(apply(record, RollBack("the coordinator stopped before it ran"), time.time()))
                    continue
                if not committed(record) and _commit_applied(record, diff):
                    # The commit step ran but its completion was not recorded: the operation is past its commit
                    # point, whatever the journal says.
                    index = next(i for i, s in enumerate(record.steps) if s.commit_point)
                    record = self._save(apply(record, StepDone(index), time.time()))
                if committed(record):
                    await self._follow(record)
                else:
                    self._save(apply(record, RollBack("interrupted before its commit point"), time.time()))

    # --- helpers -------------------------------------------------------------------------------------------------

    def _new_record(
        self,
        kind: OperationKind,
        member: Member,
        steps: Sequence[PlannedStep],
        audit: Audit,
        now: float,
    ) -> OperationRecord:
        return OperationRecord(
            id=uuid.uuid4().hex,
            kind=kind,
            member=member,
            state=OperationState.QUEUED,
            steps=tuple(Step(s.name, s.commit_point, target=s.target, action=s.action) for s in steps),
            error="",
            plan="",
            audit=audit,
            epoch=self._journal.epoch,
            created_at=now,
            updated_at=now,
        )

    def _save(self, record: OperationRecord) -> OperationRecord:
        self._journal.save(record)
        return record

    def _die_if_armed(self, boundary: str, index: int) -> None:
        if self._fault == f"{boundary}:{index}":
            os._exit(137)  # what kill -9 does, at a chosen moment


class StepFailed(Exception):
    """A step could not be applied (the agent refused, failed or did not answer)."""


def _validate(request: coordinator_pb2.GuardedOperationRequest) -> tuple[OperationKind, str]:
    violations = []
    if not request.request_id:
        violations.append(FieldViolation("request_id", "is required"))
    elif len(request.request_id) > MAX_REQUEST_ID:
        violations.append(FieldViolation("request_id", f"must be at most {MAX_REQUEST_ID} characters"))
    which = request.WhichOneof("operation")
    kind, target = OperationKind.ISSUE_TOKEN, ""
    if which is None:
        violations.append(FieldViolation("operation", "exactly one operation must be set"))
    elif which == "join":
        raise NotImplementedYet("joins arrive on the join listener, which is not built yet")
    elif which == "issue_token":
        target = request.issue_token.name
        problem = tokens.dns_name_problem(target)
        if problem is not None:
            violations.append(FieldViolation("issue_token.name", f"a member name {problem}"))
    else:
        removal = request.remove_member
        kind = OperationKind.FORCE_REMOVE if removal.force else OperationKind.REMOVE
        target = removal.name or removal.address
        if not target:
            violations.append(FieldViolation("remove_member.name", "a name, or an address, is required"))
    if violations:
        raise InvalidRequest(violations)
    return kind, target


def _resolve(diff: MembershipDiff, target: str, address: str) -> Member:
    found = [m for m in diff.members if target in (m.name, m.address)]
    if address:
        found = [m for m in found if m.address == address]
    if not found:
        raise NotFound(f"no member {target!r} in the members table or the Raft configuration")
    return found[0]


def _unreachable(diff: MembershipDiff, node: str) -> bool:
    return any(
        d.node == node and d.kind in (DiscrepancyKind.AGENT_UNREACHABLE, DiscrepancyKind.AGENT_UNTRUSTED)
        for d in diff.discrepancies
    )


def _commit_applied(record: OperationRecord, diff: MembershipDiff) -> bool:
    commit = next((s for s in record.steps if s.commit_point), None)
    if commit is None:
        return False
    match commit.action:
        case RemoveRaftEntry(node_id=node_id, address=address):
            return not any(m.node_id == node_id and m.address == address for m in diff.members)
        case RemoveMemberRow(name=name):
            return not any(m.name == name for m in diff.members)
        case _:
            return False


def _verdict(verdict: Proceed, request: coordinator_pb2.GuardedOperationRequest) -> str:
    used = len(verdict.acknowledged_used)
    base = "consistent" if not used else f"acknowledged {used} discrepancy(ies)"
    return f"{base}; fingerprint {'checked' if request.expected_fingerprint else 'not given'}"


def _step_request(action: Action) -> agent_pb2.ApplyStepRequest:
    match action:
        case EnsureTruststoreRecord(name=name, address=address, certificate_pem=pem):
            return agent_pb2.ApplyStepRequest(
                ensure_truststore_record=agent_pb2.TruststoreRecord(name=name, address=address, certificate_pem=pem)
            )
        case RemoveTruststoreRecord(name=name):
            return agent_pb2.ApplyStepRequest(remove_truststore_record=name)
        case EnsureMemberRow(name=name, address=address, certificate_pem=pem, role=role):
            return agent_pb2.ApplyStepRequest(
                ensure_member_row=agent_pb2.MemberRow(name=name, address=address, certificate_pem=pem, role=role)
            )
        case RemoveMemberRow(name=name):
            return agent_pb2.ApplyStepRequest(remove_member_row=name)
        case EnsureRaftEntry(node_id=node_id, address=address, role=role):
            return agent_pb2.ApplyStepRequest(
                ensure_raft_entry=agent_pb2.RaftEntry(node_id=node_id, address=address, role=pb.Role.ValueType(role))
            )
        case RemoveRaftEntry(node_id=node_id, address=address):
            return agent_pb2.ApplyStepRequest(remove_raft_entry=agent_pb2.RaftEntry(node_id=node_id, address=address))
        case FenceNode():
            return agent_pb2.ApplyStepRequest(fence_node=True)
        case ForgetMember() | RegisterMember():
            raise AssertionError("the coordinator applies its own steps itself")
