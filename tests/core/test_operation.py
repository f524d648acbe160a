"""The operation lifecycle on plain values: the transition table row by row, the step rules as named tests, then
hypothesis (as h2's test_state_machines.py does): any sequence of events gives a legal record or IllegalTransition.

Row tests do not read TRANSITIONS: LEGAL below restates the table from DESIGN.md and the module's rules.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memberguard.v1 import operation_pb2

from coordinator.core.model import Member
from coordinator.core.operation import (
    Audit,
    Event,
    IllegalTransition,
    OperationKind,
    OperationRecord,
    OperationState,
    Park,
    Resume,
    RollBack,
    Start,
    Step,
    StepDone,
    StepState,
    StepUndone,
    Succeed,
    apply,
    committed,
    next_step,
    undo_order,
)

S = OperationState
_LETTER = {"P": StepState.PENDING, "D": StepState.DONE, "U": StepState.UNDONE}


def record(
    steps: str = "PPP",
    commit: int | None = 1,
    state: OperationState = S.QUEUED,
    error: str = "",
    plan: str = "",
    updated_at: float = 100.0,
) -> OperationRecord:
    """A join of n4 whose steps are written one letter each (P pending, D done, U undone); commit marks a step."""
    return OperationRecord(
        id="op-1",
        kind=OperationKind.JOIN,
        member=Member(name="n4", address="10.0.0.4:9000"),
        state=state,
        steps=tuple(
            Step(
                f"step {i}",
                commit_point=i == commit,
                state=_LETTER[letter],
                finished_at=None if letter == "P" else updated_at,
            )
            for i, letter in enumerate(steps)
        ),
        error=error,
        plan=plan,
        audit=Audit(
            requested_by="join token",
            certificate_fingerprint="ab" * 32,
            request_id="r1",
            verdict="consistent",
            fingerprint="cd" * 32,
        ),
        epoch=1,
        created_at=updated_at,
        updated_at=updated_at,
    )


def letters(r: OperationRecord) -> str:
    return "".join({v: k for k, v in _LETTER.items()}[step.state] for step in r.steps)


def run(r: OperationRecord, *events: Event, now: float = 200.0) -> OperationRecord:
    for event in events:
        r = apply(r, event, now)
    return r


# --- the table, row by row ------------------------------------------------------------------------------------------

LEGAL: dict[tuple[OperationState, type[Event]], OperationState] = {
    (S.QUEUED, Start): S.RUNNING,
    (S.QUEUED, RollBack): S.ROLLED_BACK,  # dropped before it ran: its guard refused it or its deadline passed
    (S.RUNNING, StepDone): S.RUNNING,
    (S.RUNNING, StepUndone): S.RUNNING,
    (S.RUNNING, Succeed): S.SUCCEEDED,
    (S.RUNNING, RollBack): S.ROLLED_BACK,
    (S.RUNNING, Park): S.PARKED,
    (S.PARKED, Resume): S.RUNNING,
}
EVENT_TYPES: list[type[Event]] = [Start, StepDone, StepUndone, Succeed, RollBack, Park, Resume]


def ready(state: OperationState, event_type: type[Event]) -> tuple[OperationRecord, Event]:
    """A record in state whose steps satisfy the step rules for event_type as far as the state allows, and the event:
    so a refusal in the row test comes from the table, not from the steps."""
    steps = {
        S.QUEUED: "PPP",
        S.SUCCEEDED: "DDD",
        S.ROLLED_BACK: "UPP",
    }.get(state, {Succeed: "DDD", RollBack: "UPP"}.get(event_type, "DPP"))
    error, plan = {S.PARKED: ("stuck", "bring n4 back"), S.ROLLED_BACK: ("gone", "")}.get(state, ("", ""))
    r = record(steps, state=state, error=error, plan=plan)
    events: dict[type[Event], Event] = {
        Start: Start(),
        StepDone: StepDone(next_step(r) or 0),
        StepUndone: StepUndone((undo_order(r) or [0])[0]),
        Succeed: Succeed(),
        RollBack: RollBack("the joiner's engine did not start"),
        Park: Park("the joiner does not answer", "bring n4 back, or force-remove it"),
        Resume: Resume(),
    }
    return r, events[event_type]


@pytest.mark.parametrize("state", list(S), ids=lambda state: state.name)
@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_table_row(state: OperationState, event_type: type[Event]) -> None:
    r, event = ready(state, event_type)
    expected = LEGAL.get((state, event_type))
    if expected is None:
        with pytest.raises(IllegalTransition) as raised:
            apply(r, event, 200.0)
        assert (raised.value.state, raised.value.event) == (state, event)
        assert state.name in str(raised.value) and type(event).__name__ in str(raised.value)
    else:
        assert apply(r, event, 200.0).state is expected


# --- the step rules -------------------------------------------------------------------------------------------------


def test_a_join_runs_forward_to_success() -> None:
    done = run(record(), Start(), StepDone(0), StepDone(1), StepDone(2), Succeed())
    assert (done.state, letters(done), done.error, done.plan) == (S.SUCCEEDED, "DDD", "", "")
    assert all(step.finished_at == 200.0 for step in done.steps)


def test_steps_complete_in_order() -> None:
    r = run(record(), Start())
    for index in (1, 2):
        with pytest.raises(IllegalTransition, match="the next one is step 0"):
            apply(r, StepDone(index), 200.0)
    r = apply(r, StepDone(0), 200.0)
    with pytest.raises(IllegalTransition, match="the next one is step 1"):
        apply(r, StepDone(0), 200.0)  # done already: recording it twice is a bug, not a retry


def test_every_step_done_leaves_nothing_to_apply() -> None:
    with pytest.raises(IllegalTransition, match="every step is done"):
        apply(record("DDD", state=S.RUNNING), StepDone(2), 200.0)


@pytest.mark.parametrize("index", [-1, 3])
def test_a_step_out_of_range_is_refused(index: int) -> None:
    for event in (StepDone(index), StepUndone(index)):
        with pytest.raises(IllegalTransition, match=f"there is no step {index}"):
            apply(record("DPP", state=S.RUNNING), event, 200.0)


def test_rollback_before_the_commit_point_undoes_done_steps_last_first() -> None:
    r = record("DDPP", commit=2, state=S.RUNNING)
    assert not committed(r) and undo_order(r) == [1, 0]
    with pytest.raises(IllegalTransition, match=re.escape("steps [1, 0] are still done")):
        apply(r, RollBack("fencing n4 failed"), 200.0)
    with pytest.raises(IllegalTransition, match="reverse order: the next one is step 1"):
        apply(r, StepUndone(0), 200.0)
    r = run(r, StepUndone(1))
    assert (letters(r), undo_order(r)) == ("DUPP", [0])
    with pytest.raises(IllegalTransition, match="it is rolling back"):
        apply(r, StepDone(2), 200.0)  # the forward path is abandoned once a step is undone
    r = run(r, StepUndone(0), RollBack("fencing n4 failed"))
    assert (r.state, letters(r), r.error) == (S.ROLLED_BACK, "UUPP", "fencing n4 failed")


def test_undoing_needs_a_done_step() -> None:
    with pytest.raises(IllegalTransition, match="no step is done"):
        apply(record("UPP", state=S.RUNNING), StepUndone(0), 200.0)


def test_past_the_commit_point_an_operation_only_goes_forward() -> None:
    r = record("DDP", commit=1, state=S.RUNNING)
    assert committed(r) and undo_order(r) == []
    for event in (RollBack("the leader changed"), StepUndone(1), StepUndone(0)):
        with pytest.raises(IllegalTransition, match="its commit point is done: it only goes forward"):
            apply(r, event, 200.0)
    assert run(r, StepDone(2), Succeed()).state is S.SUCCEEDED


def test_an_operation_without_a_commit_point_can_roll_back_until_it_succeeds() -> None:
    r = record("DDD", commit=None, state=S.RUNNING)
    assert not committed(r) and undo_order(r) == [2, 1, 0]
    assert run(r, StepUndone(2), StepUndone(1), StepUndone(0), RollBack("revoked")).state is S.ROLLED_BACK


def test_succeed_requires_every_step_done() -> None:
    with pytest.raises(IllegalTransition, match=re.escape("steps [2] are not done")):
        apply(record("DDP", state=S.RUNNING), Succeed(), 200.0)


def test_a_queued_operation_rolls_back_without_running() -> None:
    r = apply(record(), RollBack("its caller's deadline passed in the queue"), 200.0)
    assert (r.state, letters(r), r.error) == (S.ROLLED_BACK, "PPP", "its caller's deadline passed in the queue")


def test_park_then_resume() -> None:
    r = run(record("DDP", state=S.RUNNING), Park("n4 does not answer", "bring n4 back, or force-remove it"))
    assert (r.state, r.error, r.plan) == (S.PARKED, "n4 does not answer", "bring n4 back, or force-remove it")
    assert next_step(r) == 2  # what the reconciler would do once it resumes
    for event in (StepDone(2), RollBack("no"), Park("again", "again"), Succeed()):
        with pytest.raises(IllegalTransition, match="from PARKED"):
            apply(r, event, 200.0)
    r = apply(r, Resume(), 300.0)
    assert (r.state, r.error, r.plan, r.updated_at) == (S.RUNNING, "", "", 300.0)


def test_a_finished_operation_accepts_nothing() -> None:
    for r in (record("DDD", state=S.SUCCEEDED), record("UUP", state=S.ROLLED_BACK, error="gone")):
        assert next_step(r) is None and undo_order(r) == []
        for event_type in EVENT_TYPES:
            with pytest.raises(IllegalTransition, match="it is finished"):
                apply(r, ready(S.RUNNING, event_type)[1], 200.0)


def test_every_event_bumps_updated_at_and_a_clock_set_back_does_not_move_it_back() -> None:
    r = apply(record(updated_at=100.0), Start(), 150.0)
    assert r.updated_at == 150.0
    r = apply(r, StepDone(0), 120.0)  # the clock went back
    assert r.updated_at == 150.0 and r.steps[0].finished_at == 150.0
    assert r.created_at == 100.0


def test_rollback_and_park_must_say_why() -> None:
    with pytest.raises(ValueError, match="must say why"):
        RollBack("")
    with pytest.raises(ValueError, match="must say why"):
        Park("stuck", "")


def test_an_operation_has_one_commit_point_at_most() -> None:
    r = record()
    with pytest.raises(ValueError, match="more than one commit point"):
        OperationRecord(**{**vars(r), "steps": (Step("a", True), Step("b", True))})


@pytest.mark.parametrize(
    ("core", "proto", "prefix"),
    [
        (OperationKind, operation_pb2.OperationKind, "OPERATION_KIND_"),
        (OperationState, operation_pb2.OperationState, "OPERATION_STATE_"),
        (StepState, operation_pb2.StepState, "STEP_STATE_"),
    ],
)
def test_enums_carry_the_proto_numbers(core: type, proto: object, prefix: str) -> None:
    proto_values = {
        name.removeprefix(prefix): number
        for name, number in proto.items()  # type: ignore[attr-defined]
        if number != 0
    }
    assert {member.name: member.value for member in core} == proto_values  # type: ignore[attr-defined]


# --- properties -----------------------------------------------------------------------------------------------------


def invariant_violations(r: OperationRecord) -> list[str]:
    """What no reachable record may show (the module docstring's rules, restated as checks on one record)."""
    found = []
    if not re.fullmatch("D*U*P*", letters(r)):
        found.append(f"steps out of order: {letters(r)}")
    if r.state is S.SUCCEEDED and "D" * len(r.steps) != letters(r):
        found.append("succeeded with a step not done")
    if r.state is S.ROLLED_BACK and "D" in letters(r):
        found.append("rolled back with a step still done")
    # Stricter than "nothing at or before the commit point is undone": in order, nothing after it was ever done.
    if committed(r) and "U" in letters(r):
        found.append("a step undone in a committed operation")
    if r.state is S.QUEUED and set(letters(r)) - {"P"}:
        found.append("a queued operation with a step that ran")
    if bool(r.error) != (r.state in (S.ROLLED_BACK, S.PARKED)):
        found.append(f"error {r.error!r} when {r.state.name}")
    if bool(r.plan) != (r.state is S.PARKED):
        found.append(f"plan {r.plan!r} when {r.state.name}")
    if any((step.finished_at is None) != (step.state is StepState.PENDING) for step in r.steps):
        found.append("finished_at set on a pending step or missing on a finished one")
    return found


@st.composite
def fresh_records(draw: st.DrawFn) -> OperationRecord:
    size = draw(st.integers(0, 5))
    commit = draw(st.none() | st.integers(0, max(0, size - 1)))
    return record("P" * size, commit=commit, updated_at=draw(st.floats(0, 1e6)))


# An event is drawn as (type, index, now) before the record it applies to is known: one list per example keeps the
# encoding small. Lists hold at least 20 draws, as hypothesis keeps them short unless told (each prefix is checked
# anyway). Step events and Start are drawn more often than the others, and the index None means "the one the rules
# expect next", so that sequences reach deep states (a long operation succeeding, a rollback after several steps)
# before an event ends them.
EVENT_DRAWS = st.tuples(
    st.sampled_from([StepDone] * 5 + [StepUndone] * 2 + [Start] * 3 + [Succeed, RollBack, Park, Resume]),
    st.sampled_from([None] * 4 + list(range(-1, 6))),
    st.floats(0, 2e6),
)


def event_from(r: OperationRecord, event_type: type[Event], index: int | None) -> Event:
    if event_type is StepDone:
        return StepDone(next_step(r) or 0 if index is None else index)
    if event_type is StepUndone:
        return StepUndone((undo_order(r) or [0])[0] if index is None else index)
    # What an error or a plan says does not matter here, only that it says something.
    others: dict[type[Event], Event] = {
        Start: Start(),
        Succeed: Succeed(),
        RollBack: RollBack("failed"),
        Park: Park("stuck", "wait"),
        Resume: Resume(),
    }
    return others[event_type]


@given(fresh_records(), st.lists(EVENT_DRAWS, min_size=20, max_size=60))
@settings(max_examples=500)  # deep states are a small share of the draws
def test_any_event_sequence_yields_a_legal_record_or_illegal_transition(
    r: OperationRecord, draws: list[tuple[type[Event], int | None, float]]
) -> None:
    assert invariant_violations(r) == []
    for event_type, index, now in draws:
        event = event_from(r, event_type, index)
        try:
            after = apply(r, event, now)
        except IllegalTransition as refused:
            assert (refused.state, refused.event) == (r.state, event)
            continue
        assert not r.state.finished, "a finished operation accepted an event"
        assert invariant_violations(after) == [], (r, event, after)
        assert after.updated_at == max(r.updated_at, now)
        assert committed(after) or not committed(r)
        assert (after.id, after.kind, after.audit, after.created_at) == (r.id, r.kind, r.audit, r.created_at)
        assert [(s.name, s.commit_point) for s in after.steps] == [(s.name, s.commit_point) for s in r.steps]
        r = after


@given(fresh_records())
def test_every_fresh_operation_can_succeed_and_can_roll_back(r: OperationRecord) -> None:
    started = apply(r, Start(), 0.0)
    forward = started
    while (index := next_step(forward)) is not None:
        forward = apply(forward, StepDone(index), 0.0)
    assert apply(forward, Succeed(), 0.0).state is S.SUCCEEDED
    back = started
    while (index := next_step(back)) is not None and not back.steps[index].commit_point:
        back = apply(back, StepDone(index), 0.0)
    for index in undo_order(back):
        back = apply(back, StepUndone(index), 0.0)
    assert apply(back, RollBack("stopped"), 0.0).state is S.ROLLED_BACK
