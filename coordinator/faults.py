"""Fault injection for the crash tests: a hook the runner is given, inert unless a test arms it.

A test arms it through the coordinator's environment, MEMBERGUARD_FAULT (`Faults.from_environment`):
- "before-step:N" / "after-step:N": the process exits at that step boundary of every operation, as kill -9 would:
  before step N is journaled SENT, or once its completion is (in the write that also marks the next step SENT, or
  records the outcome); "applied-step:N" exits once step N's agent has applied it and before its completion is
  journaled. Steps sent together pass their before-step boundaries one after the other, then their applied-step ones;
- "stop-before-step:N" / "stop-after-step:N": it stops itself (SIGSTOP) there, once, so that a test can act while
  it is frozen and then continue it (SIGCONT);
- "fail-step:N": step N fails every time it is sent.
Kills at arbitrary moments, not at boundaries, need no hook: the random-kill tests send SIGKILL from outside.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENVIRONMENT = "MEMBERGUARD_FAULT"


@dataclass
class Faults:
    armed: str = ""

    @classmethod
    def from_environment(cls) -> Faults:
        return cls(os.environ.get(ENVIRONMENT, ""))

    def at(self, boundary: str, index: int) -> None:
        """Called by the runner at each step boundary ("before-step", "applied-step" or "after-step")."""
        if self.armed == f"{boundary}:{index}":
            os._exit(137)
        if self.armed == f"stop-{boundary}:{index}":
            # Once: a coordinator that the reconciler froze again at the same boundary would never finish.
            self.armed = ""
            os.kill(os.getpid(), signal.SIGSTOP)

    def fails(self, index: int) -> bool:
        """Whether step `index` is to fail instead of being sent."""
        return self.armed == f"fail-step:{index}"
