"""``frontproxy``: who is a trusted proxy and which client address it speaks for (pure).

The client address behind a trusted proxy is the rightmost ``X-Forwarded-For`` entry that is
not a trusted hop, whatever the entries, their split over header lines, ports or spacing;
never an entry further left (a client writes whatever it likes there).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import FrontProxyConfig, TLSConfig
from sidecar.frontproxy import FrontProxy

from .pki import PKI

TRUSTED = ["10.0.0.0/8", "2001:db8::/32"]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> FrontProxy:
    folder = tmp_path_factory.mktemp("front")
    pki = PKI.create()
    pki.server.write(folder, "server")
    (folder / "client-ca.pem").write_bytes(pki.client_root.pem + pki.client_intermediate.pem)
    tls = TLSConfig.model_validate(
        {"certificate": "server.pem", "key": "server.key", "client_ca": ["client-ca.pem"]},
        context={"base_dir": folder},
    )
    return FrontProxy(FrontProxyConfig(trusted=tuple(TRUSTED)), tls)


trusted_ip = st.one_of(
    st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address((10 << 24) + n))),
    st.integers(0, 2**96 - 1).map(lambda n: str(ipaddress.IPv6Address((0x20010DB8 << 96) + n))),
)


def _not_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return False  # read as its IPv4 address: generated as such instead
    return not any(ip in ipaddress.ip_network(n) for n in TRUSTED)


other_ip = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(_not_trusted).map(str)


def written(ip: str, style: int) -> str:
    """An entry as proxies write it: bare, with a port, bracketed, padded."""
    if style == 1:
        return f"[{ip}]:443" if ":" in ip else f"{ip}:443"
    if style == 2 and ":" in ip:
        return f"[{ip}]"
    if style == 3:
        return f"  {ip} "
    return ip


@given(
    entries=st.lists(
        st.tuples(st.one_of(trusted_ip, other_ip), st.integers(0, 3)), min_size=0, max_size=8
    ),
    lines=st.integers(1, 3),
)
def test_the_rightmost_untrusted_entry_is_the_client(
    front: FrontProxy, entries: list[tuple[str, int]], lines: int
) -> None:
    texts = [written(ip, style) for ip, style in entries]
    # the list split over up to three header lines, in order
    cut = max(1, len(texts) // lines) if texts else 1
    chunks = [texts[i : i + cut] for i in range(0, len(texts), cut)]
    raw: list[tuple[bytes, bytes]] = [(b"X-Forwarded-For", ", ".join(c).encode()) for c in chunks]
    got = front.client_address("10.1.1.1", raw)
    ips = [ip for ip, _ in entries]
    untrusted = [
        ip
        for ip in ips
        if not any(ipaddress.ip_address(ip) in ipaddress.ip_network(n) for n in TRUSTED)
    ]
    if untrusted:
        assert got == str(ipaddress.ip_address(untrusted[-1]))
    elif ips:
        assert got == str(ipaddress.ip_address(ips[0]))  # every entry a hop: the last read
    else:
        assert got == "10.1.1.1"


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        ("198.51.100.1, garbage, 10.0.0.9", "10.0.0.9"),  # cannot read past it: the last hop
        ("unknown", "10.1.1.1"),
        ("203.0.113.9, 10.0.0.9, ::ffff:10.0.0.8", "203.0.113.9"),  # mapped IPv4 is a hop
    ],
)
def test_an_entry_that_is_no_address_stops_the_walk(
    front: FrontProxy, xff: str, client: Any
) -> None:
    assert front.client_address("10.1.1.1", [(b"x-forwarded-for", xff.encode())]) == client


def test_trust_by_address(front: FrontProxy) -> None:
    assert front.trusts("10.2.3.4", None)
    assert front.trusts("::ffff:10.2.3.4", None)
    assert front.trusts("2001:db8::1", None)
    assert not front.trusts("192.0.2.1", None)
    assert not front.trusts(None, None)
    assert not front.trusts("not an address", None)
