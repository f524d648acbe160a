"""The lifecycle of a guarded operation and of its steps, as data (docs/design.md, "Operations" and "The journal
and recovery").

An operation is a journaled list of idempotent steps. `apply(record, event, now)` is the only way a record changes:
it returns the next record or raises IllegalTransition. Everything that decides whether an event is legal lives in
this module, in two places read together: TRANSITIONS ((state, event) → state) and `_refusal` (what the steps must
look like for a transition the table allows). The rules they encode:

- A record is journaled QUEUED (waiting for the membership lock) with every step PENDING; Start makes it RUNNING.
- Write-ahead intent: a step is marked SENT (StepSent) and journaled before it is sent, so a step that an agent
  applied but whose completion was never recorded is known to be possibly applied. Steps go forward in order:
  StepSent(i) and StepDone(i) are legal only for the next steps (`next_steps`): the first PENDING or SENT one, so
  that before the commit point the steps, read in order, match DONE* (SENT | PENDING) PENDING*.
- Past the commit point, the next step comes with the steps right after it that each change one node's truststore,
  on a node of its own: they are independent (none reads what another writes, each on its own agent) and none is
  ever undone, so they are sent together and may finish in any order; recovery re-sends whichever is not DONE.
- Once the commit-point step is DONE the operation only goes forward: every undo and RollBack are illegal.
  (A committed join cannot be unjoined by undoing; a SENT commit step is not committed: recovery looks at the
  sources to tell which it was.)
- Before it, a rollback reverses each DONE or SENT step, in the order the recovery module (core/recovery.py) chose:
  StepUndone(i) once its undo was applied, StepSkipped(i) when its node is gone and the undo cannot be applied
  there (the operation's error says what must be reset). Once a step is undone or skipped nothing goes forward
  again. RollBack(error) records the outcome, and is illegal while any step is still DONE or SENT.
- A QUEUED operation may be rolled back before it starts (its guard refused it, or its caller's deadline passed).
- Park(error, plan) sets aside a RUNNING operation that can neither finish nor roll back now; it stays visible and
  blocks mutations until the reconciler picks it up again with Resume (RUNNING again, its error kept as the cause,
  its plan cleared). Each Park counts one failed attempt, so a parked operation's error never grows with retries.
- Abandon(error) ends a PARKED operation at an operator's explicit request (whether it may is the guard's
  business, core/guard.py): ABANDONED is final, its steps as they were.
- Deferred steps are a removal's remainder: planned, after its commit point, on a node whose agent did not answer.
  The operation goes forward and succeeds without them (next_step passes them by; Succeed wants every other step
  DONE). Once SUCCEEDED, each deferred step is sent, done or skipped (its node left the cluster since) on its own, in
  any order, when its node answers again (`remaining_deferred`); nothing else happens to a succeeded operation.
- Succeed requires every step that is not deferred DONE. ROLLED_BACK and ABANDONED are final: they accept no event,
  and SUCCEEDED accepts only its deferred steps' events.
- Every applied event sets updated_at to `now`, the caller's clock reading (nothing here reads a clock); a clock set
  back cannot move updated_at back, so updated_at never decreases. A step's finished_at is the same reading.
- Errors and plans are cut to MAX_TEXT characters: whatever a failure says, a record stays small enough to quote.

Pure: the journal (coordinator/journal.py) stores records; the enums carry the protobuf numbers of
protos/memberguard/v1/operation.proto, so adapters convert by number as they do for coordinator/core/model.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from types import MappingProxyType

from coordinator.core.limits import cut
from coordinator.core.model import Member
from coordinator.core.plan import COORDINATOR, Action, EnsureTruststoreRecord, RemoveTruststoreRecord

# The longest error or plan a record keeps: several can be quoted in one refusal, within gRPC's metadata limit.
MAX_TEXT = 512


class OperationKind(IntEnum):
    """What an operation changes (the guard's policy table has one column per kind)."""

    ISSUE_TOKEN = 1
    JOIN = 2
    REMOVE = 3
    FORCE_REMOVE = 4  # the member is broken; what is broken about it may be acknowledged
    REPAIR = 5  # a repair plan's chosen actions (core/repair.py); member is empty: it may repair several

    @property
    def removes(self) -> bool:
        return self in (OperationKind.REMOVE, OperationKind.FORCE_REMOVE)


class OperationState(IntEnum):
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    ROLLED_BACK = 4
    PARKED = 5
    ABANDONED = 6  # ended by an operator while parked: what it had done stays as it was

    @property
    def finished(self) -> bool:
        """A finished operation accepts no event; the reconciler looks only at the others."""
        return self in (OperationState.SUCCEEDED, OperationState.ROLLED_BACK, OperationState.ABANDONED)


class StepState(IntEnum):
    PENDING = 1
    DONE = 2
    UNDONE = 3
    SENT = 4  # journaled as sent, its outcome not recorded: it may have been applied
    SKIPPED = 5  # its undo could not be applied: its node is gone

    @property
    def maybe_applied(self) -> bool:
        """What a rollback must reverse: a step done, or sent without its outcome recorded."""
        return self in (StepState.DONE, StepState.SENT)


@dataclass(frozen=True)
class Step:
    """One idempotent step. commit_point marks the step after which the operation rolls forward, never back.

    target and action are what plan.py decided (PlannedStep): who applies the step and what it does. They travel with
    the step into the journal because after a crash the journal is all that is left of the plan, and recovery
    re-sends the remaining steps from it. The lifecycle reads them only to tell which steps may go together
    (`next_steps`).
    """

    name: str
    commit_point: bool
    state: StepState = StepState.PENDING
    finished_at: float | None = None  # seconds since the epoch when it was applied or undone; None while pending
    target: str = COORDINATOR  # the node whose agent applies it; COORDINATOR for the coordinator's own steps
    action: Action | None = None  # None for a step built without a plan: the lifecycle needs none
    deferred: bool = False  # applied after the operation succeeded, once its node answers (see the module docstring)


@dataclass(frozen=True, kw_only=True)
class Audit:
    """Who asked for an operation and what the guard decided (the audit trail)."""

    requested_by: str
    certificate_fingerprint: str
    request_id: str  # the caller's id: a retry with the same id gets this operation back instead of a new one
    verdict: str
    fingerprint: str  # the diff fingerprint the guard decided on
    acknowledged: tuple[str, ...] = ()  # the discrepancy ids the decision relied on


@dataclass(frozen=True, kw_only=True)
class OperationRecord:
    """An operation as the journal holds it. Times are seconds since the epoch."""

    id: str
    kind: OperationKind
    member: Member  # for ISSUE_TOKEN, only the name the token is for
    state: OperationState
    steps: tuple[Step, ...]
    error: str  # why it was rolled back or parked; empty otherwise
    plan: str  # what is left to do: what would clear a parked operation, or what a removal could not reach
    audit: Audit
    epoch: int  # the journal epoch of the coordinator that last wrote it
    created_at: float
    updated_at: float
    attempts: int = 0  # how many times it was parked: failures are counted, not appended to the error

    def __post_init__(self) -> None:
        # "The" commit point: with two, committed() and the rollback rule would disagree about where it is.
        if sum(step.commit_point for step in self.steps) > 1:
            raise ValueError(f"operation {self.id} has more than one commit point")
        # A deferred step runs after success, which only a committed operation reaches with steps left over.
        index = commit_index(self)
        if any(step.deferred and (index is None or i <= index) for i, step in enumerate(self.steps)):
            raise ValueError(f"operation {self.id} has a deferred step that does not follow its commit point")


# --- events ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The operation got the membership lock and its guard let it run."""


@dataclass(frozen=True)
class StepSent:
    """The step is about to be sent: from now on it may have been applied."""

    index: int


@dataclass(frozen=True)
class StepDone:
    index: int


@dataclass(frozen=True)
class StepUndone:
    index: int


@dataclass(frozen=True)
class StepSkipped:
    """A rollback could not reverse the step: its node is gone."""

    index: int


@dataclass(frozen=True)
class Succeed:
    pass


@dataclass(frozen=True)
class RollBack:
    error: str

    def __post_init__(self) -> None:
        if not self.error:
            raise ValueError("a rollback must say why, in one sentence")


@dataclass(frozen=True)
class Park:
    error: str
    plan: str

    def __post_init__(self) -> None:
        if not (self.error and self.plan):
            raise ValueError("a parked operation must say why, and what would clear it")


@dataclass(frozen=True)
class Resume:
    """The reconciler picks a parked operation up again."""


@dataclass(frozen=True)
class Abandon:
    """An operator ends a parked operation; error says who and why."""

    error: str

    def __post_init__(self) -> None:
        if not self.error:
            raise ValueError("an abandoned operation must say who ended it, and why")


Event = Start | StepSent | StepDone | StepUndone | StepSkipped | Succeed | RollBack | Park | Resume | Abandon


class IllegalTransition(Exception):
    """An event that the lifecycle does not allow in the operation's state, or with its steps as they are."""

    def __init__(self, operation_id: str, state: OperationState, event: Event, reason: str) -> None:
        super().__init__(f"operation {operation_id}: {event!r} is illegal when {state.name}: {reason}")
        self.operation_id = operation_id
        self.state = state
        self.event = event
        self.reason = reason


# --- the table ------------------------------------------------------------------------------------------------------

_S = OperationState
__ = None  # illegal: IllegalTransition
_EVENTS: tuple[type[Event], ...] = (
    Start,
    StepSent,
    StepDone,
    StepUndone,
    StepSkipped,
    Succeed,
    RollBack,
    Park,
    Resume,
    Abandon,
)
_R, _P, _D = _S.RUNNING, _S.PARKED, _S.SUCCEEDED  # _D: a deferred step's event, which leaves it SUCCEEDED
# fmt: off
_ROWS: dict[OperationState, tuple[OperationState | None, ...]] = {
    #               Start Sent Done Undone Skipped Succeed       RollBack        Park Resume Abandon
    _S.QUEUED:      (_R,  __,  __,  __,    __,     __,           _S.ROLLED_BACK, __,  __,    __),
    _S.RUNNING:     (__,  _R,  _R,  _R,    _R,     _S.SUCCEEDED, _S.ROLLED_BACK, _P,  __,    __),
    _S.PARKED:      (__,  __,  __,  __,    __,     __,           __,             __,  _R,    _S.ABANDONED),
    _S.SUCCEEDED:   (__,  _D,  _D,  __,    _D,     __,           __,             __,  __,    __),
    _S.ROLLED_BACK: (__,  __,  __,  __,    __,     __,           __,             __,  __,    __),
    _S.ABANDONED:   (__,  __,  __,  __,    __,     __,           __,             __,  __,    __),
}
# fmt: on

TRANSITIONS: Mapping[tuple[OperationState, type[Event]], OperationState] = MappingProxyType(
    {
        (state, event): new
        for state, row in _ROWS.items()
        for event, new in zip(_EVENTS, row, strict=True)
        if new is not None
    }
)


def apply(record: OperationRecord, event: Event, now: float) -> OperationRecord:
    """The record after event, at the clock reading now; IllegalTransition if the lifecycle does not allow it."""
    new_state = TRANSITIONS.get((record.state, type(event)))
    if new_state is None:
        why = "it is finished" if record.state.finished else f"no {type(event).__name__} from {record.state.name}"
        raise IllegalTransition(record.id, record.state, event, why)
    refusal = _refusal(record, event)
    if refusal is not None:
        raise IllegalTransition(record.id, record.state, event, refusal)
    at = max(record.updated_at, now)
    steps, error, plan, attempts = record.steps, record.error, record.plan, record.attempts
    match event:
        case StepSent(index=index):
            steps = _mark(steps, index, StepState.SENT, None)
        case StepDone(index=index):
            steps = _mark(steps, index, StepState.DONE, at)
        case StepUndone(index=index):
            steps = _mark(steps, index, StepState.UNDONE, at)
        case StepSkipped(index=index):
            steps = _mark(steps, index, StepState.SKIPPED, at)
        case RollBack() | Abandon():
            error = cut(event.error, MAX_TEXT)
        case Park():
            error, plan, attempts = cut(event.error, MAX_TEXT), cut(event.plan, MAX_TEXT), attempts + 1
        case Resume():
            plan = ""
        case Succeed():
            error = ""  # a parked cause that was cleared; the plan stays: a removal's remainder is reported
    return replace(record, state=new_state, steps=steps, error=error, plan=plan, attempts=attempts, updated_at=at)


def _refusal(record: OperationRecord, event: Event) -> str | None:
    """Why the steps forbid an event the table allows in this state; None when they do not."""
    match event:
        case StepSent(index=index) | StepDone(index=index) | StepUndone(index=index) | StepSkipped(index=index) if (
            not 0 <= index < len(record.steps)
        ):
            return f"there is no step {index}"
        case StepSent(index=index) | StepDone(index=index) | StepSkipped(index=index) if (
            record.state is OperationState.SUCCEEDED
        ):
            if index not in remaining_deferred(record):
                return f"it is finished, and step {index} is not a deferred step still to apply"
        case StepSent(index=index) | StepDone(index=index) if record.steps[index].deferred:
            return f"step {index} is deferred: it is applied once the operation has succeeded"
        case StepSent(index=index) | StepDone(index=index):
            if rolling_back(record):
                return "it is rolling back: no step is applied any more"
            following = next_steps(record)
            if not following:
                return "every step is done"
            if index not in following:
                if len(following) == 1:
                    return f"steps go forward in order: the next one is step {following[0]}"
                return f"steps go forward in order: the next are steps {', '.join(map(str, following))}, together"
        case StepUndone(index=index) | StepSkipped(index=index):
            if committed(record):
                return "its commit point is done: it only goes forward"
            if not record.steps[index].state.maybe_applied:
                return f"step {index} is neither done nor sent: there is nothing to undo"
        case Succeed():
            pending = [
                i for i, step in enumerate(record.steps) if step.state is not StepState.DONE and not step.deferred
            ]
            if pending:
                return f"steps {pending} are not done"
        case RollBack():
            if committed(record):
                return "its commit point is done: it only goes forward"
            order = undo_order(record)
            if order:
                return f"steps {order} may still be applied: undo them first"
    return None


def _mark(steps: tuple[Step, ...], index: int, state: StepState, at: float | None) -> tuple[Step, ...]:
    return (*steps[:index], replace(steps[index], state=state, finished_at=at), *steps[index + 1 :])


# --- what the coordinator and the reconciler ask ---------------------------------------------------------------------


def committed(record: OperationRecord) -> bool:
    """True once the commit-point step is done: from then on the operation only rolls forward."""
    return any(step.commit_point and step.state is StepState.DONE for step in record.steps)


def rolling_back(record: OperationRecord) -> bool:
    """True once a rollback has reversed (or skipped) a step: nothing goes forward after that."""
    return any(step.state in (StepState.UNDONE, StepState.SKIPPED) for step in record.steps)


def commit_index(record: OperationRecord) -> int | None:
    return next((i for i, step in enumerate(record.steps) if step.commit_point), None)


def next_step(record: OperationRecord) -> int | None:
    """The index of the step to apply next (the first not done and not deferred: pending, or sent and unconfirmed);
    None when the operation is finished, rolling back, or has none left."""
    if record.state.finished or rolling_back(record):
        return None
    return next(
        (i for i, step in enumerate(record.steps) if step.state is not StepState.DONE and not step.deferred), None
    )


def next_steps(record: OperationRecord) -> tuple[int, ...]:
    """The steps to send next, together: the next step, and, once the operation is committed, the steps after it
    that change one truststore each, on distinct nodes (the module docstring says why those may go together); the
    ones among them already DONE are left out. Empty when next_step is None."""
    first = next_step(record)
    if first is None:
        return ()
    if not (committed(record) and _one_truststore(record.steps[first])):
        return (first,)
    batch, nodes = [first], {record.steps[first].target}
    for index in range(first + 1, len(record.steps)):
        step = record.steps[index]
        if step.deferred or not _one_truststore(step) or step.target in nodes:
            break
        nodes.add(step.target)
        if step.state is not StepState.DONE:
            batch.append(index)
    return tuple(batch)


def _one_truststore(step: Step) -> bool:
    return step.target != COORDINATOR and isinstance(step.action, EnsureTruststoreRecord | RemoveTruststoreRecord)


def remaining_deferred(record: OperationRecord) -> list[int]:
    """A succeeded operation's deferred steps that are neither done nor skipped: what is left of its remainder."""
    if record.state is not OperationState.SUCCEEDED:
        return []
    return [
        i
        for i, step in enumerate(record.steps)
        if step.deferred and step.state not in (StepState.DONE, StepState.SKIPPED)
    ]


def undo_order(record: OperationRecord) -> list[int]:
    """The steps a rollback must still reverse (done, or sent and maybe applied), last first; empty once committed
    (nothing is undone then) or finished."""
    if record.state.finished or committed(record):
        return []
    return [i for i in reversed(range(len(record.steps))) if record.steps[i].state.maybe_applied]
