"""Which addresses are one client (``addresses.address_key``) and the per-address counts."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from sidecar.addresses import PerAddress, address_key


def test_ipv4_is_one_client_per_address() -> None:
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("192.0.2.1") != address_key("192.0.2.2")


def test_ipv6_counts_by_its_64() -> None:
    a = address_key("2001:db8:1:2:aaaa::1")
    assert a == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == a
    assert address_key("2001:db8:1:3::1") != a
    assert address_key("fe80::1%eth0") == "fe80::/64"


def test_ipv4_mapped_is_the_ipv4_client() -> None:
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_no_address_is_not_counted() -> None:
    counts = PerAddress()
    assert address_key(None) is None and address_key("") is None
    assert all(counts.take(None, 1) for _ in range(5))
    assert len(counts) == 0


@given(st.integers(min_value=0, max_value=(1 << 128) - 1), st.integers(0, (1 << 64) - 1))
def test_every_address_of_a_64_is_the_same_client(address: int, host: int) -> None:
    ip = ipaddress.IPv6Address(address)
    if ip.ipv4_mapped is not None:
        return
    sibling = ipaddress.IPv6Address((address >> 64 << 64) | host)
    assert address_key(str(ip)) == address_key(str(sibling))


def test_per_address_bound_and_give_back() -> None:
    counts = PerAddress()
    assert counts.take("a", 2) and counts.take("a", 2)
    assert not counts.take("a", 2)
    assert counts.take("b", 2)
    counts.give("a")
    assert counts.held("a") == 1 and counts.take("a", 2)
    counts.give("a")
    counts.give("a")
    counts.give("b")
    assert len(counts) == 0  # nothing kept for an address that holds nothing
