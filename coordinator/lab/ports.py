"""Free loopback addresses for the lab's processes."""

from __future__ import annotations

import contextlib
import socket


def loopback_addresses(count: int) -> list[str]:
    """`count` distinct free "127.0.0.1:PORT" addresses. The probes stay bound until all are chosen: a port probed
    and released at once may well be handed out again by the next probe (it was, in a lab of 100 members)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{probe.getsockname()[1]}" for probe in probes]
