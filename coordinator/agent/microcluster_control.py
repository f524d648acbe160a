"""microd's control socket, `<state>/control.socket`: microcluster's API as `microctl` calls it, HTTP over a Unix
socket with no TLS (the socket's file mode is what admits a caller).

The agent uses it for what only microcluster may do to its own membership, never to read a source. Answers are
microcluster's (LXD's) envelope: `{"type": "sync", ...}` on success, `{"type": "error", "error_code": 404, "error":
"..."}` otherwise (microcluster internal/rest/types, rendered by lxd's response package).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from pathlib import Path
from urllib.parse import quote, urlencode

from coordinator.agent.microcluster_dial import MemberDial, UnusableStateDir
from coordinator.errors import EngineRefused, EngineUnavailable

# A removal waits on microcluster's leader, its hooks and its reset of the removed member: seconds on a healthy
# cluster, and the caller's deadline bounds it anyway.
REQUEST_TIMEOUT = 30.0
# What remove_member takes to mean "microcluster holds no such member": clusterMemberDelete's NotFound when neither
# dqlite nor the members table has the address (microcluster v3 internal/rest/resources/cluster.go).
_NOT_FOUND = "not found in dqlite or database"
# controlPost's refusal of a daemon whose database is no longer "not yet initialized" but online: it has joined
# (internal/rest/resources/control.go, with microcluster/types/database.go's status text).
_JOINED = "Unable to initialize cluster: Database is online"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("control.socket", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _request(
    control_socket: Path, method: str, path: str, body: object = None, timeout: float = REQUEST_TIMEOUT
) -> tuple[int, str, object]:
    """(error_code, error, metadata) of microcluster's answer; error_code 0 and error "" for success."""
    connection = _UnixConnection(control_socket, timeout)
    try:
        if body is None:
            connection.request(method, path)
        else:
            connection.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    except OSError as error:
        raise EngineUnavailable(f"microcluster's control socket {control_socket}: {error}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(raw)
        kind, code, text = answer["type"], int(answer.get("error_code") or 0), str(answer.get("error") or "")
    except (ValueError, KeyError, TypeError):
        raise EngineUnavailable(f"microcluster answered HTTP {response.status} with no envelope") from None
    if kind == "error" or response.status >= 400:
        return code or response.status, text or f"HTTP {response.status}", None
    return 0, "", answer.get("metadata")


async def _call(state_dir: Path, method: str, path: str, body: object = None) -> tuple[int, str, object]:
    return await asyncio.to_thread(_request, state_dir / "control.socket", method, path, body)


async def remove_member(state_dir: Path, name: str, address: str, *, force: bool) -> bool:
    """Has microcluster remove the member at address (DELETE core/1.0/cluster/{name}); False when it holds no member
    at that address. A refusal is EngineRefused with microcluster's words; no answer is EngineUnavailable."""
    query = {"address": address, **({"force": "1"} if force else {})}
    code, error, _ = await _call(state_dir, "DELETE", f"/core/1.0/cluster/{quote(name, safe='')}?{urlencode(query)}")
    if code == 0:
        return True
    if code == 404 and _NOT_FOUND in error:
        return False
    raise EngineRefused(f"microcluster refused to remove {name}: {error}")


async def revoke_token(state_dir: Path, name: str) -> bool:
    """Has microcluster delete the join token for name (DELETE core/control/tokens/{name}); False when it held none."""
    code, error, _ = await _call(state_dir, "DELETE", f"/core/control/tokens/{quote(name, safe='')}")
    if code == 0:
        return True
    if code == 404:
        return False
    raise EngineRefused(f"microcluster refused to revoke {name}'s join token: {error}")


async def issue_token(state_dir: Path, name: str, expire_after: float) -> str:
    """A new join token for name from microcluster (POST core/control/tokens, valid expire_after seconds). microcluster
    runs its own consistency check first, and refuses with EngineRefused if that fails."""
    body = {"name": name, "expire_after": int(expire_after * 1e9)}  # a Go time.Duration: nanoseconds
    code, error, token = await _call(state_dir, "POST", "/core/control/tokens", body)
    if code != 0:
        raise EngineRefused(f"microcluster refused to issue {name}'s join token: {error}")
    if not isinstance(token, str) or not token:
        raise EngineUnavailable("microcluster answered a token request with no token")
    return token


async def join_cluster(state_dir: Path, name: str, address: str, token: str) -> bool:
    """Has this member's daemon join the cluster as name at address with microcluster's join token (POST core/control,
    as `microctl init NAME ADDRESS --token TOKEN` does); it answers once it has joined. False when the daemon had
    already joined as name (a re-sent step). A refusal is EngineRefused with microcluster's words."""
    body = {"bootstrap": False, "name": name, "address": address, "join_token": token}
    code, error, _ = await _call(state_dir, "POST", "/core/control", body)
    if code == 0:
        return True
    # A daemon still joining is refused too, with another status: that is no answer yet (EngineRefused below).
    if _JOINED in error:
        try:
            joined_as = MemberDial(state_dir).daemon_config().name
        except UnusableStateDir:
            joined_as = ""
        if joined_as == name:
            return False
    raise EngineRefused(f"microcluster refused to join {name}: {error}")
