"""How many failed attempts a source may make: a token bucket per source, and the table of sources.

Pure: the caller passes `now` (seconds on any steady clock) and keeps the table. A source starts with `burst`
attempts; each failed attempt spends one; the bucket refills at `per_second` up to `burst`. A source with less than
one attempt left is refused until it has one again, whatever it sends: telling a good request from a bad one is the
work a flood must not get for free. Only failures spend, so a source that keeps succeeding is never refused.

The table holds at most `capacity` sources. When it is full, the source that failed longest ago is forgotten: its
bucket has had the longest to refill, and a flood from many addresses costs the table its oldest memories, never
unbounded memory (nor more than constant time per attempt).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    burst: int
    per_second: float
    capacity: int = 10_000

    def __post_init__(self) -> None:
        if self.burst < 1 or not 0 < self.per_second < float("inf") or self.capacity < 1:
            raise ValueError(f"a limit needs burst >= 1, 0 < per_second < inf and capacity >= 1, not {self}")


@dataclass(frozen=True)
class Bucket:
    """The attempts a source has left, as of `at`."""

    left: float
    at: float


def refilled(bucket: Bucket, limit: Limit, now: float) -> Bucket:
    """The bucket as of now. A clock that went back refills nothing."""
    elapsed = max(0.0, now - bucket.at)
    return Bucket(min(float(limit.burst), bucket.left + elapsed * limit.per_second), max(now, bucket.at))


def allows(bucket: Bucket | None, limit: Limit, now: float) -> bool:
    return bucket is None or refilled(bucket, limit, now).left >= 1


def spent(bucket: Bucket | None, limit: Limit, now: float) -> Bucket:
    """The bucket after one failed attempt. It never goes below zero: a refused source that keeps failing is not
    refused for longer than one that stopped, so the refusal ends a known time after the flood does."""
    current = Bucket(float(limit.burst), now) if bucket is None else refilled(bucket, limit, now)
    return Bucket(max(0.0, current.left - 1), current.at)


def retry_after(bucket: Bucket | None, limit: Limit, now: float) -> float:
    """Seconds until the source has one attempt again (0 if it has one now)."""
    if bucket is None:
        return 0.0
    return max(0.0, (1 - refilled(bucket, limit, now).left) / limit.per_second)


class Sources:
    """The buckets of the sources that failed lately, at most `limit.capacity` of them. No I/O, no clock."""

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()  # least recently failed first

    def __len__(self) -> int:
        return len(self._buckets)

    def allows(self, source: str, now: float) -> bool:
        return allows(self._buckets.get(source), self.limit, now)

    def retry_after(self, source: str, now: float) -> float:
        return retry_after(self._buckets.get(source), self.limit, now)

    def rested(self, source: str, now: float) -> bool:
        """Whether the source's bucket is full again (or was forgotten): its failures are behind it."""
        bucket = self._buckets.get(source)
        return bucket is None or refilled(bucket, self.limit, now).left >= self.limit.burst

    def failed(self, source: str, now: float) -> None:
        bucket = spent(self._buckets.pop(source, None), self.limit, now)
        if len(self._buckets) >= self.limit.capacity:
            self._buckets.popitem(last=False)
        self._buckets[source] = bucket
