"""The join listener's gate: which sources may still try a token, and what the operator sees of those that fail.

The join listener answers callers without a certificate, so anyone who can reach it may send garbage or guess tokens.
Each source (a peer's IP address; an IPv6 peer's /64, the block one host usually holds) gets the failed attempts the
limit allows (coordinator/core/throttle.py); past them it is refused with RESOURCE_EXHAUSTED, before its request is
even decoded, until its bucket refills. What counts as a failed attempt: a request that does not decode, a request
that is not a join, and a join whose token or fields are refused, i.e. everything that fails before a valid token.

A refused request is answered only after a pause (`hold`, up to HOLD seconds, at most MAX_HELD at a time): a
sleeping coroutine costs next to nothing, and a flooder that waits for its answers (most do) is slowed to its number
of requests in flight per HOLD, instead of being answered as fast as the coordinator can refuse.

The operator sees it in the log, once per episode and never once per request (a flood must not become a flood of
log lines): a WARNING when a source starts being refused, with its failures and the totals, and an INFO line when it
comes back with its failures behind it (its bucket full again), with how many of its requests were refused
meanwhile. `failed_attempts`, `refused` and `throttled_sources` are the running totals, for an exporter of metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

from coordinator.core.throttle import Limit, Sources
from coordinator.errors import TooManyAttempts

log = logging.getLogger("memberguard.join_gate")

# A joiner that mistypes its token retries a few times; a flood spends the burst at once and then gets one attempt a
# second. Tokens hold 256 random bits, so the limit is about load, not guessing.
DEFAULT_LIMIT = Limit(burst=20, per_second=1.0)
HOLD = 1.0  # seconds, at most, before a refused request is answered
MAX_HELD = 1024  # refused requests waiting at once; past that they are answered at once


def source_of(peer: str) -> str:
    """The source a gRPC peer string ("ipv4:10.0.0.1:5000", "ipv6:[2001:db8::1]:5000") is counted under."""
    kind, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0].strip("[]")
    try:
        if kind == "ipv4":
            return str(ipaddress.IPv4Address(host))
        if kind == "ipv6":
            return str(ipaddress.IPv6Network(f"{host.partition('%')[0]}/64", strict=False))
    except ValueError:
        pass
    return peer  # a unix socket, or a form gRPC may add: counted as it is


class JoinGate:
    def __init__(self, limit: Limit = DEFAULT_LIMIT, clock: Callable[[], float] = time.monotonic) -> None:
        self._sources = Sources(limit)
        self._clock = clock
        self._refused_since: dict[str, int] = {}  # sources in an episode → how many of their requests were refused
        self._held = 0
        self.failed_attempts = 0
        self.refused = 0

    @property
    def throttled_sources(self) -> int:
        return len(self._refused_since)

    def admit(self, peer: str) -> str:
        """The peer's source, or TooManyAttempts if it has no attempt left."""
        source = source_of(peer)
        now = self._clock()
        if self._sources.allows(source, now):
            # The episode ends when the source's failures are behind it, not at each single attempt it gets back:
            # a source that keeps flooding stays in one episode, and is logged once.
            if source in self._refused_since and self._sources.rested(source, now):
                refused = self._refused_since.pop(source)
                log.info("join listener: %s is back; %d of its requests were refused meanwhile", source, refused)
            return source
        self.refused += 1
        if source not in self._refused_since:
            if len(self._refused_since) >= self._sources.limit.capacity:
                # Bounded like the table: the oldest episode is forgotten (it is no longer in the table either).
                del self._refused_since[next(iter(self._refused_since))]
            self._refused_since[source] = 0
            log.warning(
                "join listener: refusing %s for now, too many failed token attempts (in all: %d failed, %d refused)",
                source,
                self.failed_attempts,
                self.refused,
            )
        self._refused_since[source] += 1
        wait = self._sources.retry_after(source, now)
        raise TooManyAttempts(f"too many failed attempts from this address: retry in {wait:.1f} s", wait)

    async def hold(self, refusal: TooManyAttempts) -> None:
        """Waits before a refusal is answered (see the module's docstring)."""
        if self._held >= MAX_HELD:
            return
        self._held += 1
        try:
            await asyncio.sleep(min(refusal.retry_after, HOLD))
        finally:
            self._held -= 1

    def failed(self, source: str) -> None:
        self.failed_attempts += 1
        self._sources.failed(source, self._clock())
