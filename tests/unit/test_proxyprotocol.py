"""PROXY protocol v1/v2: exact vectors from haproxy's proxy-protocol.txt, byte-at-a-time feeding,
bounds under arbitrary input, round-trips and the trusted-peer policy. The listener wrapper over
real TCP: tests/integration/test_proxyprotocol_listener.py."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.proxyprotocol import (
    V1_MAX_HEADER,
    V1_PREFIX,
    V2_MAX_HEADER,
    V2_SIGNATURE,
    Endpoint,
    Expect,
    ProxyError,
    ProxyHeader,
    ProxyHeaderParser,
    TrustedProxies,
)
from tests.support.streams import split_at

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def parse(data: bytes):
    return ProxyHeaderParser().receive_data(data)


def feed_bytewise(data: bytes):
    """Feed one octet at a time; return (index of the octet that decided, result)."""
    parser = ProxyHeaderParser()
    for i in range(len(data)):
        result = parser.receive_data(data[i : i + 1])
        if result is not None:
            return i, result
    return None, None


# --- exact vectors: v1 --------------------------------------------------------------------------


def test_signature_constant_is_the_one_in_the_spec():
    assert V2_SIGNATURE == SIG


def test_v1_tcp4_example_from_the_spec():
    r = parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n")
    assert r == ProxyHeader(
        version=1,
        protocol="TCP4",
        source=Endpoint("192.168.0.1", 56324),
        destination=Endpoint("192.168.0.11", 443),
        remaining=b"GET / HTTP/1.1\r\n",
        length=47,
    )
    assert not r.local


def test_v1_tcp6_longest_line_is_104_octets():
    ff = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {ff} {ff} 65535 65535\r\n".encode()
    assert len(line) == 104
    r = parse(line + b"a1 NOOP\r\n")
    assert r.protocol == "TCP6"
    assert r.source == Endpoint("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    assert r.remaining == b"a1 NOOP\r\n"


def test_v1_tcp6_compressed_addresses_are_normalised():
    r = parse(b"PROXY TCP6 2001:DB8::1 ::1 0 25\r\n")
    assert r.source == Endpoint("2001:db8::1", 0)
    assert r.destination == Endpoint("::1", 25)


def test_v1_unknown_short_form_means_use_the_real_peer():
    r = parse(b"PROXY UNKNOWN\r\nEHLO x\r\n")
    assert r == ProxyHeader(1, "UNKNOWN", None, None, b"EHLO x\r\n", 15)
    assert r.local


def test_v1_unknown_worst_case_107_octets_ignores_the_rest_of_the_line():
    ff = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {ff} {ff} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_HEADER == 107
    r = parse(line)
    assert r.local and r.length == 107 and r.remaining == b""


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "bare LF"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX", "CR not followed by LF"),
        (b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n", "expected PROXY"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n", "expected PROXY"),
        (b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 192.168.0.256 192.168.0.11 56324 443\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 ::1 192.168.0.11 56324 443\r\n", "bad TCP4 address"),
        (b"PROXY TCP6 192.168.0.1 ::1 56324 443\r\n", "bad TCP6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 56324 443\r\n", "bad TCP6 address"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "bad port"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "bad port"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n", "bad port"),
        (b"PROXY UDP4 192.168.0.1 192.168.0.11 1 443\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 192.168.0.1 192.168.0.11 1 443\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n", "not a PROXY"),
        (b"PROXY\r\n", "not a PROXY"),
        (b"A1 LOGIN user pass\r\n", "not a PROXY"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not a PROXY"),  # a TLS ClientHello
        (b"PROXY UNKNOWN " + b"x" * 200, "no CRLF within 107"),
    ],
)
def test_v1_malformed_lines_are_errors(data, reason):
    r = parse(data)
    assert isinstance(r, ProxyError)
    assert reason in r.reason


def test_v1_crlf_at_octet_108_is_too_late():
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_HEADER - len(b"PROXY UNKNOWN ") - 1) + b"\r\n"
    assert len(line) == 108
    assert isinstance(parse(line), ProxyError)


# --- exact vectors: v2 --------------------------------------------------------------------------

V2_TCP4 = (
    SIG
    + b"\x21\x11\x00\x0c"
    + b"\xc0\xa8\x00\x01"  # 192.168.0.1
    + b"\xc0\xa8\x00\x0b"  # 192.168.0.11
    + b"\xdc\x04"  # 56324
    + b"\x01\xbb"  # 443
)
V2_TCP6 = (
    SIG
    + b"\x21\x21\x00\x24"
    + bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + b"\x30\x39"  # 12345
    + b"\x03\xe1"  # 993
)
V2_LOCAL = SIG + b"\x20\x00\x00\x00"


def test_v2_tcp4():
    r = parse(V2_TCP4 + b"* OK")
    assert r == ProxyHeader(
        2, "TCP4", Endpoint("192.168.0.1", 56324), Endpoint("192.168.0.11", 443), b"* OK", 28
    )


def test_v2_tcp6():
    r = parse(V2_TCP6 + b"x")
    assert r == ProxyHeader(
        2, "TCP6", Endpoint("2001:db8::1", 12345), Endpoint("2001:db8::2", 993), b"x", 52
    )


def test_v2_local_means_use_the_real_peer():
    r = parse(V2_LOCAL + b"EHLO")
    assert r == ProxyHeader(2, "LOCAL", None, None, b"EHLO", 16)
    assert r.local


def test_v2_local_skips_an_address_block_it_was_given_anyway():
    r = parse(SIG + b"\x20\x11\x00\x0c" + bytes(12) + b"rest")
    assert r.protocol == "LOCAL" and r.local and r.remaining == b"rest" and r.length == 28


def test_v2_tlvs_after_the_addresses_are_skipped():
    tlvs = b"\x04\x00\x03abc" + b"\x02\x00\x0bexample.com" + b"\xea\x00\x02\x00\x01"
    header = SIG + b"\x21\x11" + struct.pack("!H", 12 + len(tlvs)) + V2_TCP4[16:] + tlvs
    r = parse(header + b"tail")
    assert r.source == Endpoint("192.168.0.1", 56324)
    assert r.remaining == b"tail" and r.length == len(header)


@pytest.mark.parametrize(
    "family, address_length",
    [(0x00, 0), (0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216), (0x10, 12), (0x01, 0)],
)
def test_v2_proxy_with_a_family_we_do_not_relay_falls_back_to_the_real_peer(family, address_length):
    r = parse(
        SIG + bytes([0x21, family]) + struct.pack("!H", address_length) + bytes(address_length)
    )
    assert isinstance(r, ProxyHeader)
    assert r.protocol == "UNSPEC" and r.local


@pytest.mark.parametrize(
    "header, reason",
    [
        (SIG + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
        (SIG + b"\x31\x11\x00\x0c" + bytes(12), "version 3"),
        (SIG + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2"),
        (SIG + b"\x21\x41\x00\x0c" + bytes(12), "invalid address family"),
        (SIG + b"\x21\x13\x00\x0c" + bytes(12), "invalid address family"),
        (SIG + b"\x21\x11\x00\x08" + bytes(8), "family needs 12"),
        (SIG + b"\x21\x21\x00\x0c" + bytes(12), "family needs 36"),
        (SIG + b"\x21\x11\xff\xff", "exceeds 4096"),
        (SIG[:7] + b"X" + SIG[8:], "not a PROXY"),
    ],
)
def test_v2_malformed_headers_are_errors(header, reason):
    r = parse(header)
    assert isinstance(r, ProxyError)
    assert reason in r.reason


def test_v2_oversized_length_is_refused_before_the_body_arrives():
    length = V2_MAX_HEADER - 16 + 1
    assert isinstance(parse(SIG + b"\x21\x11" + struct.pack("!H", length)), ProxyError)
    assert parse(SIG + b"\x21\x11" + struct.pack("!H", length - 1)) is None  # still waiting


def test_v2_largest_allowed_header_is_accepted():
    length = V2_MAX_HEADER - 16
    r = parse(SIG + b"\x21\x11" + struct.pack("!H", length) + V2_TCP4[16:] + bytes(length - 12))
    assert isinstance(r, ProxyHeader) and r.length == V2_MAX_HEADER


# --- byte-at-a-time -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
        b"PROXY UNKNOWN\r\n",
        V2_TCP4,
        V2_TCP6,
        V2_LOCAL,
    ],
)
def test_byte_at_a_time_decides_exactly_on_the_last_header_octet(header):
    index, result = feed_bytewise(header + b"A1 NOOP\r\n")
    assert index == len(header) - 1
    whole = parse(header + b"A1 NOOP\r\n")
    assert result == ProxyHeader(
        whole.version, whole.protocol, whole.source, whole.destination, b"", whole.length
    )


@pytest.mark.parametrize(
    "data, at",
    [
        (b"PROXZ TCP4", 4),
        (b"GET / HTTP/1.0", 0),
        (SIG[:5] + b"\x01", 5),
        (SIG + b"\x11", 12),  # version 1 seen as soon as octet 13 arrives
        (SIG + b"\x21\x51", 13),
        (b"PROXY TCP4 1.2.3.4\n", 18),
    ],
)
def test_byte_at_a_time_refuses_as_soon_as_input_cannot_be_a_header(data, at):
    index, result = feed_bytewise(data)
    assert isinstance(result, ProxyError)
    assert index == at


def test_feeding_after_the_result_is_a_bug():
    parser = ProxyHeaderParser()
    assert parser.receive_data(V2_LOCAL) is not None
    with pytest.raises(RuntimeError):
        parser.receive_data(b"more")


# --- hypothesis: arbitrary input ----------------------------------------------------------------

prefixes = st.sampled_from(
    [
        b"",
        V1_PREFIX,
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        b"PROXY UNKNOWN",
        SIG,
        SIG + b"\x21\x11",
        SIG + b"\x20",
        SIG + b"\x21\x21\x00\x24",
        SIG + b"\x21\x11\x0f\xf0",
    ]
)
arbitrary = st.builds(lambda p, r: p + r, prefixes, st.binary(max_size=5000))


@settings(max_examples=500)
@given(arbitrary, st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_arbitrary_bytes_never_raise_and_never_read_past_the_bound(data, cuts):
    parser = ProxyHeaderParser()
    fed = 0
    result = None
    for chunk in split_at(data, cuts):
        fed += len(chunk)
        result = parser.receive_data(chunk)
        if result is not None:
            break
    bound = V1_MAX_HEADER if data[:1] == b"P" else V2_MAX_HEADER
    if result is None:
        assert fed == len(data) and fed < bound  # undecided only while under the bound
    elif isinstance(result, ProxyHeader):
        assert result.length <= bound
        assert data[: result.length] + result.remaining == data[:fed]
    else:
        assert isinstance(result, ProxyError) and result.reason


# --- hypothesis: round-trips of generated headers -----------------------------------------------

ipv4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(min_value=0, max_value=2**128 - 1).map(ipaddress.IPv6Address)
port = st.integers(min_value=0, max_value=65535)
tlv = st.builds(
    lambda t, v: bytes([t]) + struct.pack("!H", len(v)) + v,
    st.integers(min_value=0, max_value=255),
    st.binary(max_size=300),
)


@st.composite
def headers(draw):
    """(encoded header, expected protocol, source, destination)."""
    version = draw(st.sampled_from([1, 2]))
    family = draw(st.sampled_from(["TCP4", "TCP6", "LOCAL"]))
    addr = ipv4 if family == "TCP4" else ipv6
    src, dst, sport, dport = draw(addr), draw(addr), draw(port), draw(port)
    if version == 1:
        if family == "LOCAL":
            return b"PROXY UNKNOWN\r\n", "UNKNOWN", None, None
        text = f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()
        return text, family, Endpoint(str(src), sport), Endpoint(str(dst), dport)
    tlvs = b"".join(draw(st.lists(tlv, max_size=5)))
    if family == "LOCAL":
        block = tlvs
        return SIG + b"\x20\x00" + struct.pack("!H", len(block)) + block, "LOCAL", None, None
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport) + tlvs
    fam = b"\x11" if family == "TCP4" else b"\x21"
    header = SIG + b"\x21" + fam + struct.pack("!H", len(block)) + block
    return header, family, Endpoint(str(src), sport), Endpoint(str(dst), dport)


@settings(max_examples=300)
@given(headers(), st.binary(max_size=200), st.lists(st.integers(0, 3000), max_size=8))
def test_generated_valid_headers_round_trip(case, payload, cuts):
    header, proto, source, destination = case
    data = header + payload
    parser = ProxyHeaderParser()
    fed, result = 0, None
    for chunk in split_at(data, cuts):
        fed += len(chunk)
        result = parser.receive_data(chunk)
        if result is not None:
            break
    assert isinstance(result, ProxyHeader), result
    assert (result.protocol, result.source, result.destination) == (proto, source, destination)
    assert result.length == len(header)
    assert result.remaining == data[len(header) : fed]


# --- trusted peers ------------------------------------------------------------------------------


def test_trusted_peer_must_send_a_header_others_are_direct():
    trusted = TrustedProxies.parse(["10.0.0.0/8", "2001:db8::/32"])
    assert trusted.expect("10.1.2.3") is Expect.HEADER
    assert trusted.expect("2001:db8::7") is Expect.HEADER
    assert trusted.expect("192.0.2.1") is Expect.DIRECT
    assert trusted.expect("2001:db9::1") is Expect.DIRECT


def test_untrusted_peer_is_refused_when_the_listener_requires_the_balancer():
    trusted = TrustedProxies.parse(["10.0.0.0/8"], required=True)
    assert trusted.expect("10.0.0.1") is Expect.HEADER
    assert trusted.expect("192.0.2.1") is Expect.REFUSE


def test_ipv4_mapped_peer_on_a_dual_stack_socket_matches_an_ipv4_network():
    trusted = TrustedProxies.parse(["10.0.0.0/8"])
    assert trusted.expect("::ffff:10.0.0.5") is Expect.HEADER
    assert trusted.expect("::ffff:11.0.0.5") is Expect.DIRECT


def test_peer_without_an_ip_address_is_never_trusted():
    assert TrustedProxies.parse(["0.0.0.0/0"]).expect("/run/apppass.sock") is Expect.DIRECT


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.0.0.1/8", "example.com", ""])
def test_bad_cidr_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="not a network in CIDR form"):
        TrustedProxies.parse(["127.0.0.0/8", bad])
