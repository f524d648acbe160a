"""Reaching a microcluster member's dqlite the way the other members do.

microd has no dqlite port: dqlite's traffic rides on the member's one HTTPS address. A member dialling a peer
(microcluster's internal/db/dqlite.go and internal/rest/client/dqlite.go):

1. opens TLS to the peer's address, presenting its own server.crt and server.key, and trusts only the cluster
   certificate, cluster.crt, which every member holds and every initialised member's listener serves;
2. sends `POST /core/internal/database` with `Upgrade: dqlite` and `X-Dqlite-Version: 1`; the peer answers only a
   request whose Host is the peer's own address and whose client certificate is in the peer's truststore;
3. reads go-dqlite's `101 Switching Protocols` with `Upgrade: dqlite`, then speaks dqlite's wire protocol on the
   same stream.

The agent dials as its member: with the member's own identity, from the member's state directory as it is at each
dial, so that a member initialised, re-keyed or re-addressed (`cluster edit`) after the agent started is dialled as
it is then.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

from coordinator.agent.filecache import FileCache, MalformedFile, load_yaml
from coordinator.dqlite import (
    Connection,
    ConnectionClosed,
    DqliteError,
    RemoteProtocolError,
    Stream,
    Timeout,
    Unreachable,
    connect_stream,
    open_stream,
)

# An answer's head and the error it carries are a few hundred bytes; more is not microd.
_HEAD_LIMIT = 16 * 1024
_QUOTED = 200


class UnusableStateDir(DqliteError):
    """The state directory lacks what a member dials with, or holds it unreadable: daemon.yaml (the member's
    address), server.crt and server.key (its identity), cluster.crt (the cluster it trusts)."""


class UpgradeRefused(Unreachable):
    """The daemon answered the upgrade with something other than dqlite's stream: it does not trust this member
    (403), is not initialised, or is not microd. Unreachable, because waiting for an election will not change it."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The keys of `daemon.yaml` that say who the member is; microd writes both first thing at init."""

    name: str
    address: str


def _parse_daemon_config(path: str, data: bytes) -> DaemonConfig:
    document = load_yaml(data)
    if not isinstance(document, dict):
        raise MalformedFile("not a YAML mapping")
    name, address = document.get("name"), document.get("address")
    if not isinstance(name, str) or not name or not isinstance(address, str) or not address:
        raise MalformedFile("name or address missing or empty")
    return DaemonConfig(name, address)


class MemberDial:
    """Dials the daemons of one member's cluster as that member, from its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._daemon_yaml = state_dir / "daemon.yaml"
        self._configs = FileCache(_parse_daemon_config)

    def daemon_config(self) -> DaemonConfig:
        """The member's name and address, as daemon.yaml holds them now."""
        try:
            cached = self._configs.load(str(self._daemon_yaml))
        except OSError as exc:
            raise UnusableStateDir(f"{self._daemon_yaml}: {exc.strerror or exc} (not an initialised member)") from exc
        if isinstance(cached.content, MalformedFile):
            raise UnusableStateDir(f"{self._daemon_yaml}: {cached.content}")
        return cached.content

    def context(self) -> ssl.SSLContext:
        """TLS as the member: its server.crt and server.key presented, cluster.crt the only certificate trusted.

        No hostname check: only cluster.crt is trusted, so a verified handshake already proves that the peer holds
        the cluster's key, which is all microcluster's members check of each other (they match the name in
        cluster.crt itself, which says nothing about the peer).
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False
        cluster_crt = self._state_dir / "cluster.crt"
        try:
            context.load_verify_locations(cafile=cluster_crt)
        except (OSError, ssl.SSLError) as exc:
            raise UnusableStateDir(f"{cluster_crt}: {exc.strerror or exc} (not an initialised member)") from exc
        server_crt, server_key = self._state_dir / "server.crt", self._state_dir / "server.key"
        try:
            context.load_cert_chain(server_crt, server_key)
        except (OSError, ssl.SSLError) as exc:
            raise UnusableStateDir(f"{server_crt} with {server_key}: {exc.strerror or exc}") from exc
        return context

    async def dial(self, address: str, timeout: float) -> Connection:
        """A dqlite connection to the member's daemon at `address`, with a context made now."""
        return await upgrade(address, timeout, self.context())


async def upgrade(address: str, timeout: float, context: ssl.SSLContext) -> Connection:
    """TLS to `address`, the upgrade, then the dqlite handshake. `timeout` bounds each of the three (as `connect`
    bounds its dial and its handshake) and is the connection's default call timeout."""
    stream = await open_stream(address, timeout=timeout, ssl=context)
    answered = False
    try:
        async with asyncio.timeout(timeout):
            await stream.send(_request(address))
            head, rest = await _head(stream, address)
            answered = True
            status, headers = _parse_head(head, address)
            if not status.startswith("101 ") or headers.get("upgrade", "").lower() != "dqlite":
                why = await _refusal(stream, status, headers, rest)
                raise UpgradeRefused(f"{address} refused the dqlite upgrade: {why}")
            if rest:
                # dqlite speaks only when spoken to: anything here would be taken for the first answer.
                raise RemoteProtocolError(f"{address} sent {len(rest)} bytes after its 101, before any request")
    except TimeoutError:
        _close(stream, answered)
        raise Timeout(f"{address} did not complete the dqlite upgrade within {timeout}s") from None
    except OSError as exc:
        _close(stream, answered)
        raise ConnectionClosed(f"{address} failed during the dqlite upgrade: {exc}") from exc
    except BaseException:
        _close(stream, answered)
        raise
    return await connect_stream(stream, address, timeout=timeout)


# Streams given up on before their answer came, each closed once it comes (see _close).
_LINGERING: set[asyncio.Task[None]] = set()
LINGER = 10.0


def _close(stream: Stream, answered: bool) -> None:
    """Closes a stream whose upgrade failed, but not before the daemon has written its answer: go-dqlite v3.0.4 (its
    app.go, the upgrade's accept loop) panics, taking the whole microd down, when writing its 101 to a connection the
    client already closed. A stream given up on between the request and the answer lingers until the answer arrives
    (or LINGER seconds pass, or the daemon closes it), then closes."""
    if answered:
        stream.close()
        return
    task = asyncio.get_running_loop().create_task(_close_when_answered(stream))
    _LINGERING.add(task)
    task.add_done_callback(_LINGERING.discard)


async def _close_when_answered(stream: Stream) -> None:
    try:
        async with asyncio.timeout(LINGER):
            await stream.recv()
    except (TimeoutError, OSError, DqliteError):
        pass
    finally:
        stream.close()


def _request(address: str) -> bytes:
    # microd checks the Host against its own address: the peer's address, exactly as the cluster spells it.
    return (
        f"POST /core/internal/database HTTP/1.1\r\nHost: {address}\r\nUpgrade: dqlite\r\nConnection: Upgrade\r\n"
        "X-Dqlite-Version: 1\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def _head(stream: Stream, address: str) -> tuple[bytes, bytes]:
    """The answer's status line and headers, and whatever arrived after them."""
    received = b""
    while (end := received.find(b"\r\n\r\n")) < 0:
        if len(received) > _HEAD_LIMIT:
            raise RemoteProtocolError(f"{address} answered the dqlite upgrade with no end of headers")
        data = await stream.recv()
        if not data:
            raise UpgradeRefused(f"{address} closed the connection instead of answering the dqlite upgrade")
        received += data
    return received[:end], received[end + 4 :]


def _parse_head(head: bytes, address: str) -> tuple[str, dict[str, str]]:
    """The status ("101 Switching Protocols") and the headers, by lower-case name."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, status = status_line.partition(" ")
    if not version.startswith("HTTP/") or not status[:3].isdigit():
        raise RemoteProtocolError(f"{address} answered the dqlite upgrade with {status_line[:_QUOTED]!r}, not HTTP")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _refusal(stream: Stream, status: str, headers: dict[str, str], body: bytes) -> str:
    """The status and the error microd's JSON body gives. Only a body of announced length is waited for: a peer may
    keep the connection open after an answer of unknown length."""
    length = headers.get("content-length", "")
    wanted = min(int(length), _HEAD_LIMIT) if length.isdigit() else 0
    while len(body) < wanted and (data := await stream.recv()):
        body += data
    text = body.decode(errors="replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    detail = str(error) if error else " ".join(text.split())[:_QUOTED]
    return f"HTTP {status}" + (f": {detail}" if detail and detail != status.partition(" ")[2] else "")
