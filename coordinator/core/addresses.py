"""What a member's address is: "host:port" or "[ipv6]:port", the one definition every request and file is held to.

Port 0 is refused: an address names where a member is reached, and nothing is reached on port 0.
"""

from __future__ import annotations

import ipaddress
import re

_ADDRESS = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"  # [ipv6], ipv4 or DNS name
    r":(?P<port>[1-9][0-9]{0,4})"
)


def address_problem(address: object) -> str | None:
    """What is wrong with address, or None; the text completes a sentence that begins with the field's name."""
    if not isinstance(address, str):
        return "is not a string"
    found = _ADDRESS.fullmatch(address)
    if found is None or int(found["port"]) > 65535:
        return 'is not "host:port" or "[ipv6]:port"'
    host = found["host"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "has a malformed IPv6 address"
    return None
