"""What a watch tells its watchers, on plain values: the changes between real diffs of broken clusters, and properties
checked with hypothesis (a change applied to what was seen gives what is seen now; a token stands for exactly that)."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.diff import compute_diff
from coordinator.core.inflight import explain_in_flight
from coordinator.core.model import ClusterView, Severity
from coordinator.core.watch import Change, Seen, Transition, change, resume_token

from .test_diff import broken_views, shuffled, stale_cache, truststore_file_deleted
from .test_inflight import member, operation, removal_half_done
from .views import consistent_view

T = Transition


def seen(view: ClusterView) -> Seen:
    return Seen.of(compute_diff(view))


def apply(before: Seen, found: Change | None) -> Seen:
    """What a watcher that saw before knows once told found, checking that each transition fits what it saw."""
    if found is None:
        return before
    assert found.previous_fingerprint == before.fingerprint
    severities = dict(before.severities)
    for item in found.discrepancies:
        assert severities.get(item.id) == item.before
        assert item.transition is {(False, True): T.APPEARED, (True, True): T.SEVERITY_CHANGED}.get(
            (item.before is not None, item.after is not None), T.CLEARED
        )
        if item.after is None:
            del severities[item.id]
        else:
            severities[item.id] = item.after
    return Seen(found.fingerprint, severities)


def test_a_divergence_appears_and_its_repair_clears_it() -> None:
    clean, broken = seen(consistent_view(3)), seen(truststore_file_deleted())
    appeared = change(clean, broken)
    assert appeared is not None and appeared.fingerprint != appeared.previous_fingerprint
    assert [(c.id, c.transition, c.after) for c in appeared.discrepancies] == [
        (id_, T.APPEARED, severity) for id_, severity in broken.severities.items()
    ]
    cleared = change(broken, clean)
    assert cleared is not None and (cleared.previous_fingerprint, cleared.fingerprint) == (
        broken.fingerprint,
        clean.fingerprint,
    )
    assert {(c.id, c.transition, c.before) for c in cleared.discrepancies} == {
        (id_, T.CLEARED, severity) for id_, severity in broken.severities.items()
    }


def test_a_lagging_cache_changes_what_a_watcher_sees_but_not_the_fingerprint() -> None:
    """The reason the resume token is not the fingerprint: cluster.yaml is outside it."""
    clean, young, old = seen(consistent_view(3)), seen(stale_cache(2.0)), seen(stale_cache(60.0))
    assert clean.fingerprint == young.fingerprint == old.fingerprint
    assert len({resume_token(clean), resume_token(young), resume_token(old)}) == 3
    appeared, aged = change(clean, young), change(young, old)
    assert appeared is not None and [c.transition for c in appeared.discrepancies] == [T.APPEARED]
    assert aged is not None
    assert [(c.transition, c.before, c.after) for c in aged.discrepancies] == [
        (T.SEVERITY_CHANGED, Severity.INFO, Severity.WARNING)
    ]


def test_an_operation_in_flight_changes_severities_only() -> None:
    diff = compute_diff(removal_half_done())
    explained = explain_in_flight(diff, [operation(member(3))])
    before = Seen.of(diff).severities
    found = change(Seen.of(diff), Seen.of(explained))
    assert found is not None and found.fingerprint == found.previous_fingerprint
    assert {(c.id, c.transition, c.before, c.after) for c in found.discrepancies} == {
        (d.id, T.SEVERITY_CHANGED, before[d.id], Severity.INFO)
        for d in explained.discrepancies
        if d.explained_by and before[d.id] is not Severity.INFO
    }
    assert found.discrepancies


def test_an_equal_diff_later_is_nothing_to_tell() -> None:
    view = truststore_file_deleted()
    later = replace(view, now=view.now + 3600)
    assert change(seen(view), seen(later)) is None
    assert resume_token(seen(view)) == resume_token(seen(later))


@given(broken_views(), broken_views())
def test_the_change_between_two_diffs_takes_a_watcher_from_one_to_the_other(a: ClusterView, b: ClusterView) -> None:
    before, after = seen(a), seen(b)
    found = change(before, after)
    assert apply(before, found) == after
    assert (found is None) == (before == after) == (resume_token(before) == resume_token(after))


@given(broken_views(), st.randoms(use_true_random=False))
def test_the_token_does_not_depend_on_the_order_of_the_gather(view: ClusterView, rnd: random.Random) -> None:
    assert resume_token(seen(shuffled(view, rnd))) == resume_token(seen(view))


IDS = st.sampled_from([f"d{i}" for i in range(6)])
SEVERITIES = st.sampled_from(Severity)
SEENS = st.builds(Seen, st.sampled_from(["f1", "f2", "f3"]), st.dictionaries(IDS, SEVERITIES))


@given(st.lists(SEENS, min_size=1, max_size=8))
def test_changes_replayed_in_order_end_where_the_last_diff_is(history: list[Seen]) -> None:
    """What a resumed watch relies on: the changes between consecutive states, applied in turn."""
    current = history[0]
    for before, after in itertools.pairwise(history):
        current = apply(current, change(before, after))
    assert current == history[-1]


@given(SEENS, SEENS)
def test_changes_are_listed_once_each_most_severe_first(before: Seen, after: Seen) -> None:
    found = change(before, after)
    if found is None:
        assert before == after
        return
    ids = [c.id for c in found.discrepancies]
    assert len(ids) == len(set(ids))
    order = [(-(c.after or c.before or 0), c.id) for c in found.discrepancies]
    assert order == sorted(order)
    # Nothing unchanged is told.
    assert set(ids) == {
        i for i in {*before.severities, *after.severities} if before.severities.get(i) != after.severities.get(i)
    }


@given(SEENS, st.randoms(use_true_random=False))
def test_a_token_stands_for_the_fingerprint_and_every_severity(seen_: Seen, rnd: random.Random) -> None:
    reordered = Seen(seen_.fingerprint, dict(rnd.sample(list(seen_.severities.items()), len(seen_.severities))))
    assert resume_token(reordered) == resume_token(seen_)
    assert resume_token(replace(seen_, fingerprint=seen_.fingerprint + "x")) != resume_token(seen_)
    for id_, severity in seen_.severities.items():
        other = Severity.INFO if severity is not Severity.INFO else Severity.BLOCKING
        assert resume_token(Seen(seen_.fingerprint, {**seen_.severities, id_: other})) != resume_token(seen_)
