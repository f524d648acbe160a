"""Which cases of a crash matrix a run takes: all of them with MEMBERGUARD_CRASH_MATRIX=full (`make crash-matrix`),
otherwise one per row, so that `make test` covers every step of every plan in a bounded time.

A row is one place in a plan (a step, or a step boundary) and its variants what may happen there (the moment of the
kill, or the process killed). In a partial run the variants take turns from row to row, shifted by one at every round,
so that a variant does not keep meeting rows of one kind (with two variants over boundaries that alternate before and
after a step, plain turns would kill one target only ever before a step).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

ENVIRONMENT = "MEMBERGUARD_CRASH_MATRIX"

T = TypeVar("T")


def full() -> bool:
    return os.environ.get(ENVIRONMENT) == "full"


def chosen(variants: Sequence[T], rows: int) -> list[list[T]]:
    """For each of `rows` rows, the variants a run takes there."""
    if full():
        return [list(variants) for _ in range(rows)]
    n = len(variants)
    return [[variants[(row + row // n) % n]] for row in range(rows)]
