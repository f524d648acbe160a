"""Typed errors of the dqlite client.

    DqliteError
    ├── ProtocolError            the byte stream broke the rules; the connection is unusable
    │   ├── LocalProtocolError   we were about to break them (nothing was sent)
    │   └── RemoteProtocolError  the peer broke them (or is not a dqlite node at all)
    ├── ConnectionClosed         the stream ended or failed, or close() was called
    ├── Timeout                  a call ran out of time; the connection was closed
    ├── NoLeader                 leader discovery found no leader in time
    ├── OutcomeUnknown           a write may or may not have been applied; re-read before retrying
    └── FailureError             the server answered FAILURE; the connection stays usable
        ├── NotLeader            10250: the node is not the leader; nothing was applied
        ├── LeadershipLost       10506: leadership went away while the request ran
        └── Busy                 5: e.g. another configuration change is still in progress

Pure module (no I/O) so that the sans-I/O codec can raise these too.
"""

from __future__ import annotations

# Extended SQLite result codes that dqlite uses for Raft leadership (SQLITE_IOERR | n << 8).
SQLITE_BUSY = 5
SQLITE_IOERR_NOT_LEADER = 10 | (40 << 8)
SQLITE_IOERR_LEADERSHIP_LOST = 10 | (41 << 8)


class DqliteError(Exception):
    """Base class of every error this package raises."""


class ProtocolError(DqliteError):
    """The conversation is out of step; the connection must be closed."""


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol cannot express (nothing was sent)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid dqlite response."""


class ConnectionClosed(DqliteError):
    """The connection is gone: closed by the peer, failed, or closed by us."""


class Unreachable(ConnectionClosed):
    """Nothing answered at the address: the connection was refused, or its TLS handshake failed."""


class Timeout(DqliteError):
    """A call did not finish in time. If it had started talking, the connection was closed."""


class NoLeader(DqliteError):
    """No node named a reachable leader before the discovery deadline.

    ``attempts`` maps each address tried to why it was not the leader (last attempt wins).
    """

    def __init__(self, message: str, attempts: dict[str, str]) -> None:
        super().__init__(message)
        self.attempts = attempts


class OutcomeUnknown(DqliteError):
    """A write was sent but its effect is unknown (leadership lost, connection died, timeout).

    The write may have been committed. Never retry it blindly: read the state from the leader
    first. The original error is ``__cause__``.
    """


class FailureError(DqliteError):
    """A FAILURE response. The request was refused; the connection is still in step."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


class NotLeader(FailureError):
    """The node is not the leader. Nothing was applied: rediscover the leader and retry."""


class LeadershipLost(FailureError):
    """Leadership was lost while the request ran. Reads may be retried; writes surface as
    OutcomeUnknown instead, because the entry may still be committed by the next leader."""


class Busy(FailureError):
    """SQLITE_BUSY. Raft maps "a configuration change is still in progress" (CANTCHANGE) here,
    and a second OPEN on one connection gets it too. Nothing was applied."""


_FAILURE_CLASSES: dict[int, type[FailureError]] = {
    SQLITE_IOERR_NOT_LEADER: NotLeader,
    SQLITE_IOERR_LEADERSHIP_LOST: LeadershipLost,
    SQLITE_BUSY: Busy,
}


def failure_error(code: int, message: str) -> FailureError:
    """The most specific FailureError for a FAILURE code."""
    return _FAILURE_CLASSES.get(code, FailureError)(code, message)
