"""Reading the server name from a ClientHello before OpenSSL does (``sidecar.sni``), and the
servername callback that refuses a handshake when OpenSSL reads another (``tls``)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.hosts import ServerNames
from sidecar.sni import MAX_BUFFER, ClientHelloReader, requested_name
from sidecar.tls import ServerContexts

from .conftest import Certs


def client_hello(server_hostname: str | None, version: ssl.TLSVersion) -> bytes:
    """The first flight of a real client (OpenSSL through Python's ssl)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message in records of at most ``size`` bytes each."""
    assert hello[0] == 22
    message = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    records = b""
    for start in range(0, len(message), size):
        piece = message[start : start + size]
        records += hello[:3] + len(piece).to_bytes(2, "big") + piece
    return records


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("name", ["app.example", "a" * 63 + ".example", "xn--bcher-kva.example"])
def test_the_name_of_a_real_client_hello_at_its_last_byte(
    name: str, version: ssl.TLSVersion
) -> None:
    hello = client_hello(name, version)
    for cut in range(len(hello)):
        assert requested_name(hello[:cut]) == (False, None), cut
    assert requested_name(hello) == (True, name)
    assert requested_name(hello + b"\x17\x03\x03") == (True, name)  # what follows is OpenSSL's


@pytest.mark.parametrize("size", [1, 3, 100])
def test_a_client_hello_across_records(size: int) -> None:
    hello = refragment(client_hello("api.example", ssl.TLSVersion.TLSv1_3), size)
    assert requested_name(hello[:-1]) == (False, None)
    assert requested_name(hello) == (True, "api.example")


def test_no_server_name() -> None:
    assert requested_name(client_hello(None, ssl.TLSVersion.TLSv1_3)) == (True, None)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # plain HTTP on the TLS port
        b"\x80\x2e\x01\x03\x01",  # an SSLv2-style hello
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x40\x01" + b"\x00" * 10,  # a record longer than 2^14
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a ClientHello too large to wait for
    ],
)
def test_what_is_no_client_hello_gets_the_first_server(data: bytes) -> None:
    assert requested_name(data) == (True, None)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.binary(max_size=600))
def test_any_bytes_are_read_without_failing(data: bytes) -> None:
    done, name = requested_name(b"\x16\x03\x01" + data)
    assert name is None or done


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(min_value=1, max_value=16384), st.integers(min_value=1, max_value=5000))
def test_a_bounded_wait(record: int, chunk: int) -> None:
    """However a client spreads a huge ClientHello over records and reads, it is given up on
    (the first server) before more than MAX_BUFFER bytes are held."""
    message = b"\x01\x00\xff\xff" + b"\x00" * 0xFFFF  # the largest ClientHello waited for
    records = b"".join(
        b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
        for piece in (message[i : i + record] for i in range(0, len(message), record))
    )
    reader = ClientHelloReader()
    done = False
    for start in range(0, len(records), chunk):
        done, _ = reader.feed(records[start : start + chunk])
        if done:
            break
    assert done and len(reader.data) <= MAX_BUFFER + chunk


def test_a_hello_fed_a_byte_at_a_time_in_one_byte_records() -> None:
    hello = refragment(client_hello("api.example", ssl.TLSVersion.TLSv1_3), 1)
    reader = ClientHelloReader()
    answers = [reader.feed(hello[i : i + 1]) for i in range(len(hello))]
    assert answers[-1] == (True, "api.example")
    assert all(answer == (False, None) for answer in answers[:-1])
    assert bytes(reader.data) == hello


def test_the_servername_callback_refuses_another_servers_connection(certs: Certs) -> None:
    """Should OpenSSL ever read another name than ``sni`` did, the connection made with one
    server's context is not completed under another's name."""
    folder_contexts = []
    for _ in range(2):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        folder_contexts.append(context)
    contexts = ServerContexts(
        folder_contexts, [ServerNames(["app.example"]), ServerNames(["www.example"])]
    )
    conn = contexts.contexts[0].wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert contexts._check(conn, "app.example", conn.context) is None
    assert contexts._check(conn, None, conn.context) is None  # no SNI: the first server
    assert contexts._check(conn, "unknown.example", conn.context) is None  # so is any other
    assert (
        contexts._check(conn, "www.example", conn.context)
        == ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    )
    other = contexts.contexts[1].wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert contexts._check(other, "WWW.example.", other.context) is None
    assert contexts._check(other, None, other.context) == ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def test_names_read_from_a_client_hello_are_remembered_only_when_short() -> None:
    from sidecar.hosts import ServerChoice

    choice = ServerChoice([ServerNames(["app.example"]), ServerNames(["*.www.example"])])
    long_name = "a" * 60 + "." + "b" * 70_000 + ".www.example"
    assert choice.index(long_name) == 0  # no such host name: the first server
    assert choice.index("x.www.example") == 1 and choice.index(None) == 0
    assert long_name not in choice._memo and "x.www.example" in choice._memo
