"""The failed-attempt limit, with plain values and hypothesis: a source gets its burst, then one attempt per refill."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.throttle import Bucket, Limit, Sources, allows, refilled, retry_after, spent

LIMIT = Limit(burst=3, per_second=2.0)


def test_a_source_gets_its_burst_then_waits_for_the_refill() -> None:
    sources = Sources(LIMIT)
    for _ in range(3):
        assert sources.allows("a", 10.0)
        sources.failed("a", 10.0)
    assert not sources.allows("a", 10.0)
    assert sources.retry_after("a", 10.0) == pytest.approx(0.5)
    assert not sources.allows("a", 10.49)
    assert sources.allows("a", 10.5)
    assert sources.allows("b", 10.0), "another source is not affected"


def test_failures_while_refused_do_not_prolong_the_refusal() -> None:
    sources = Sources(LIMIT)
    for _ in range(50):
        sources.failed("a", 0.0)
    assert sources.retry_after("a", 0.0) == pytest.approx(0.5)


def test_a_clock_that_goes_back_refills_nothing() -> None:
    bucket = Bucket(0.0, 100.0)
    assert refilled(bucket, LIMIT, 50.0) == Bucket(0.0, 100.0)
    assert not allows(bucket, LIMIT, 50.0)


def test_the_table_forgets_the_source_that_failed_longest_ago() -> None:
    sources = Sources(Limit(burst=1, per_second=0.001, capacity=2))
    sources.failed("a", 0.0)
    sources.failed("b", 1.0)
    sources.failed("c", 2.0)
    assert len(sources) == 2
    assert sources.allows("a", 2.0), "a was forgotten"
    assert not sources.allows("b", 2.0) and not sources.allows("c", 2.0)


@pytest.mark.parametrize("bad", [{"burst": 0, "per_second": 1.0}, {"burst": 1, "per_second": 0.0}])
def test_a_limit_that_would_refuse_everyone_or_nobody_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Limit(**bad)  # type: ignore[arg-type]


@given(
    burst=st.integers(1, 20),
    per_second=st.floats(0.01, 100.0),
    times=st.lists(st.floats(0.0, 1000.0), min_size=1, max_size=60).map(sorted),
)
def test_never_more_failures_admitted_than_burst_plus_refill(burst: int, per_second: float, times: list[float]) -> None:
    """Over any run of attempts, the admitted failures are at most the burst plus what refilled meanwhile, and a
    refused source is told a wait after which it is admitted."""
    limit = Limit(burst=burst, per_second=per_second)
    bucket: Bucket | None = None
    admitted = 0
    for now in times:
        if allows(bucket, limit, now):
            admitted += 1
            bucket = spent(bucket, limit, now)
        else:
            wait = retry_after(bucket, limit, now)
            assert wait > 0
            assert allows(bucket, limit, now + wait + 1e-9)
    assert admitted <= burst + (times[-1] - times[0]) * per_second + 1e-6
