"""The one definition of a member's address (core/addresses.py), which tokens, join requests and steps share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.addresses import address_problem


@pytest.mark.parametrize("address", ["10.0.0.1:9000", "[::1]:7443", "[fe80::1]:1", "n1.lan:65535"])
def test_an_address_is_host_colon_port(address: str) -> None:
    assert address_problem(address) is None


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("10.0.0.1:0", "host:port"),  # nothing is reached on port 0
        ("10.0.0.1:65536", "host:port"),
        ("10.0.0.1", "host:port"),
        (":9000", "host:port"),
        ("10.0.0.1:90a", "host:port"),
        ("::1:9000", "host:port"),  # an IPv6 host needs its brackets
        ("[1::2::3]:9000", "malformed IPv6"),
        ("", "host:port"),
        (9000, "not a string"),
    ],
)
def test_what_is_not_an_address_says_why(address: object, problem: str) -> None:
    found = address_problem(address)
    assert found is not None and problem in found


@given(st.integers(min_value=-10, max_value=70000))
def test_a_port_is_one_to_65535(port: int) -> None:
    assert (address_problem(f"127.0.0.1:{port}") is None) == (1 <= port <= 65535)
