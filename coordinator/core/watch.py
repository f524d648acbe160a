"""What a watch of the membership tells its watchers: the changes between two diffs, and the token that resumes it.

A watcher is told when the fingerprint moves and when a discrepancy appears, changes severity or clears; nothing else
is an event. A discrepancy whose summary or evidence reads differently from one check to the next (an age that grew)
is the same fact at the same severity, and telling it at every check would bury the changes that matter.

What a watcher has seen of a diff (`Seen`) is therefore its fingerprint and each discrepancy's severity, by id, and the
resume token is a digest of exactly that. The fingerprint alone would not do: it leaves out the lagging Raft views
(diff.py) and every severity (inflight.py makes a discrepancy INFO while an operation explains it), so a discrepancy
can appear, clear or change severity while the fingerprint stays the same, and a watcher resuming by it would miss it.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from coordinator.core.model import MembershipDiff, Severity

# Tokens are compared across coordinators and releases: change the encoding only together with its version.
_TOKEN_VERSION = "memberguard-watch-v1"


class Transition(IntEnum):
    """What happened to a discrepancy between two diffs; the numbers are the protobuf DiscrepancyTransition's."""

    APPEARED = 1
    SEVERITY_CHANGED = 2
    CLEARED = 3


@dataclass(frozen=True)
class Seen:
    """What a watcher has seen of a diff: its fingerprint and each discrepancy's severity, by discrepancy id."""

    fingerprint: str
    severities: Mapping[str, Severity]

    @classmethod
    def of(cls, diff: MembershipDiff) -> Seen:
        return cls(diff.fingerprint, {d.id: d.severity for d in diff.discrepancies})


@dataclass(frozen=True)
class DiscrepancyChange:
    """One discrepancy's transition: `before` is None for one that appeared, `after` None for one that cleared."""

    id: str
    transition: Transition
    before: Severity | None
    after: Severity | None


@dataclass(frozen=True)
class Change:
    """Everything a watcher that has seen one diff must be told to have seen the next."""

    previous_fingerprint: str
    fingerprint: str
    discrepancies: tuple[DiscrepancyChange, ...]


def change(before: Seen, after: Seen) -> Change | None:
    """What changed from before to after, most severe first (a cleared discrepancy by its last severity), then by id;
    None when nothing did."""
    found = []
    for id_, severity in after.severities.items():
        previous = before.severities.get(id_)
        if previous is None:
            found.append(DiscrepancyChange(id_, Transition.APPEARED, None, severity))
        elif previous != severity:
            found.append(DiscrepancyChange(id_, Transition.SEVERITY_CHANGED, previous, severity))
    for id_, severity in before.severities.items():
        if id_ not in after.severities:
            found.append(DiscrepancyChange(id_, Transition.CLEARED, severity, None))
    if not found and before.fingerprint == after.fingerprint:
        return None
    found.sort(key=lambda c: (-(c.after or c.before or 0), c.id))
    return Change(before.fingerprint, after.fingerprint, tuple(found))


def resume_token(seen: Seen) -> str:
    """SHA-256 (hex) of what a watcher has seen: equal for equal `Seen`, whatever order its discrepancies came in."""
    severities = sorted((id_, int(severity)) for id_, severity in seen.severities.items())
    encoded = json.dumps([_TOKEN_VERSION, seen.fingerprint, severities], separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()
