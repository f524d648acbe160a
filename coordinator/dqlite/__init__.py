"""A native asyncio client for dqlite's wire protocol v1 (libdqlite 1.11), with no dependencies.

``wire`` is the sans-I/O codec, ``client`` the asyncio connection and leader discovery,
``errors`` the typed errors. Typical use::

    conn = await connect_leader(["10.0.0.1:9001", "10.0.0.2:9001"], timeout=5)
    members = await conn.cluster()          # the leader's view is the authoritative one
"""

from coordinator.dqlite.client import (
    Connection,
    Dial,
    Rowset,
    Stream,
    connect,
    connect_leader,
    connect_stream,
    open_stream,
)
from coordinator.dqlite.errors import (
    Busy,
    ConnectionClosed,
    DqliteError,
    FailureError,
    LeadershipLost,
    LocalProtocolError,
    NoLeader,
    NotLeader,
    OutcomeUnknown,
    ProtocolError,
    RemoteProtocolError,
    Timeout,
    Unreachable,
)
from coordinator.dqlite.wire import Metadata, NodeInfo, Result, Role, Row, Server, Value

__all__ = [
    "Busy",
    "Connection",
    "ConnectionClosed",
    "Dial",
    "DqliteError",
    "FailureError",
    "LeadershipLost",
    "LocalProtocolError",
    "Metadata",
    "NoLeader",
    "NodeInfo",
    "NotLeader",
    "OutcomeUnknown",
    "ProtocolError",
    "RemoteProtocolError",
    "Result",
    "Role",
    "Row",
    "Rowset",
    "Server",
    "Stream",
    "Timeout",
    "Unreachable",
    "Value",
    "connect",
    "connect_leader",
    "connect_stream",
    "open_stream",
]
