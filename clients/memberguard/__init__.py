"""Python client for the memberguard coordinator: a blocking `Client` and an asyncio `AsyncClient`.

    from memberguard import Client, Endpoint, DirtyMembership

    with Client(Endpoint.from_lab("/tmp/lab")) as client:
        diff = client.check_membership().diff

Both clients keep one mTLS channel open, have the same methods, and raise the typed errors of
`memberguard.errors` (re-exported here). The messages are those of `memberguard.v1`.
"""

from memberguard._async import AsyncClient, AsyncMembershipWatch
from memberguard._base import (
    DEFAULT_HEARTBEAT_INTERVAL,
    MAX_AGENT_TIMEOUT,
    MAX_HEARTBEAT_INTERVAL,
    MIN_HEARTBEAT_INTERVAL,
    Endpoint,
    error_from_rpc,
)
from memberguard._sync import Client, MembershipWatch
from memberguard.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    DirtyMembership,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemberguardError,
    MembershipRefused,
    NotAbandonable,
    NotFound,
    OperationParked,
    PermissionDenied,
    ResourceExhausted,
    StaleFingerprint,
    TokenExpired,
    TokenInUse,
    TokenRefused,
    TooManyAttempts,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "MAX_AGENT_TIMEOUT",
    "MAX_HEARTBEAT_INTERVAL",
    "MIN_HEARTBEAT_INTERVAL",
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AsyncMembershipWatch",
    "Client",
    "DeadlineExceeded",
    "DirtyMembership",
    "Endpoint",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "MemberguardError",
    "MembershipRefused",
    "MembershipWatch",
    "NotAbandonable",
    "NotFound",
    "OperationParked",
    "PermissionDenied",
    "ResourceExhausted",
    "StaleFingerprint",
    "TokenExpired",
    "TokenInUse",
    "TokenRefused",
    "TooManyAttempts",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_from_rpc",
]
