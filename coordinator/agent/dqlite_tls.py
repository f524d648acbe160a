"""The agent's TLS towards the dqlite nodes of its cluster, trusting exactly its truststore's certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

from coordinator.agent.truststore import trusted_certificates


def client_ssl_context(cert: Path, key: Path, truststore: Path) -> ssl.SSLContext:
    """TLS towards a dqlite node: present (cert, key); trust a server whose certificate is one of the truststore's,
    as the directory is now (a context does not follow later changes: make one per dial).

    Member certificates are self-signed CAs, so they serve as CA data; an empty or unreadable truststore trusts
    nobody. No hostname check: nodes are dialled by IP and their certificates name the member, not the address
    (as the nodes do among themselves).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if certificates := trusted_certificates(truststore):
        # One per line: a PEM without its final newline would otherwise run into the next one's BEGIN line.
        context.load_verify_locations(cadata="\n".join(certificates))
    context.load_cert_chain(cert, key)
    return context
