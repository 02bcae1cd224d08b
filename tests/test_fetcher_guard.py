"""The SSRF guard's decisions, without I/O: which addresses and host spellings are refused,
what the allow-list opens, and X-Robots-Tag / Retry-After parsing.

The same decisions are exercised over real connections in test_fetcher.py (loopback) and
test_fetcher_netns.py (every other range, inside a loopback-only network namespace).
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from imagestream.common.guard import (
    AddressPolicy,
    BlockedAddressError,
    guarded_socket_factory,
    literal_address,
    parse_cidrs,
)
from imagestream.common.settings import SettingsError, load
from imagestream.fetcher.politeness import opts_out, retry_after_s
from imagestream.fetcher.settings import FetcherSettings

IETF = "IETF protocol assignment (Teredo, benchmarking, ORCHID)"
REFUSED = {
    # IPv4
    "0.0.0.0": "unspecified",
    "0.1.2.3": "unspecified",
    "10.0.0.1": "private",
    "10.255.255.255": "private",
    "100.64.0.1": "carrier-grade NAT",
    "100.127.255.254": "carrier-grade NAT",
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "169.254.169.254": "link-local (cloud metadata)",
    "169.254.0.1": "link-local (cloud metadata)",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.0.0.192": "IETF protocol assignment",  # Oracle Cloud's metadata address
    "192.0.2.1": "documentation",
    "192.88.99.1": "6to4 relay anycast",
    "192.168.1.1": "private",
    "198.18.0.1": "benchmarking",
    "198.51.100.7": "documentation",
    "203.0.113.9": "documentation",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    # IPv6
    "::": "unspecified",
    "::1": "loopback",
    "fd00::1": "unique local",
    "fc00::1": "unique local",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fec0::1": "site-local (deprecated)",
    "ff02::1": "multicast",
    "ff0e::1": "multicast",
    "100::1": "discard-only",
    "2001:db8::1": "documentation",
    "2001::1": IETF,
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": IETF,  # Teredo
    "3fff::1": "documentation",
    "64:ff9b:1::a00:1": "local-use NAT64",
    "4000::1": "reserved",
    # IPv4 in IPv6: mapped, compatible, 6to4, NAT64
    "::ffff:127.0.0.1": "IPv4-mapped loopback",
    "::ffff:10.1.2.3": "IPv4-mapped private",
    "::ffff:169.254.169.254": "IPv4-mapped link-local (cloud metadata)",
    "::ffff:100.64.0.1": "IPv4-mapped carrier-grade NAT",
    "::ffff:0.0.0.0": "IPv4-mapped unspecified",
    "::127.0.0.1": "IPv4-compatible (deprecated)",
    "::10.0.0.1": "IPv4-compatible (deprecated)",
    "::8.8.8.8": "IPv4-compatible (deprecated)",
    "2002:7f00:1::1": "127.0.0.1 (loopback) embedded in IPv6",
    "2002:a9fe:a9fe::": "169.254.169.254 (link-local (cloud metadata)) embedded in IPv6",
    "2002:c0a8:101::1": "192.168.1.1 (private) embedded in IPv6",
    "64:ff9b::7f00:1": "127.0.0.1 (loopback) embedded in IPv6",
    "64:ff9b::a9fe:a9fe": "169.254.169.254 (link-local (cloud metadata)) embedded in IPv6",
    "64:ff9b::a00:1": "10.0.0.1 (private) embedded in IPv6",
}
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above
    "172.32.0.1",  # just above 172.16/12
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "2002:808:808::1",  # 6to4 of a public address
    "64:ff9b::808:808",  # NAT64 of a public address
]


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(("address", "why"), REFUSED.items())
def test_refused_addresses(address: str, why: str) -> None:
    policy = AddressPolicy()
    assert policy.refusal(ip(address)) == why
    with pytest.raises(BlockedAddressError, match="is not public"):
        policy.check(ip(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert AddressPolicy().refusal(ip(address)) is None


def test_the_allow_list_opens_exactly_its_ranges() -> None:
    policy = AddressPolicy(parse_cidrs(["127.0.0.2/32", "10.1.0.0/16", "fd00:1::/32"]))
    for allowed in ("127.0.0.2", "::ffff:127.0.0.2", "10.1.2.3", "fd00:1::5"):
        assert policy.permits(ip(allowed)), allowed
    for refused in (
        "127.0.0.1",
        "127.0.0.3",
        "10.2.0.1",
        "169.254.169.254",
        "fd00:2::1",
        "::1",
        # A tunnel form of an allowed IPv4 address is another host: still refused.
        "2002:7f00:2::1",
        "64:ff9b::7f00:2",
        "::127.0.0.2",
    ):
        assert not policy.permits(ip(refused)), refused


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",  # integer
        "0x7f000001",  # hex integer
        "0x7f.1",  # hex, short
        "0X7F.0.0.1",
        "017700000001",  # octal integer
        "0177.0.0.1",  # octal octet
        "127.000.000.001",  # leading zeros
        "127.1",  # short
        "127.0.1",
        "127.0.0.1.",  # trailing dot
        "1.2.3.4.5",
        "256.0.0.1",
        "example.123",  # ends in a number: an IPv4 address to a browser
        "a.0x10",
        "0x",
        "\uff11\uff12\uff17.0.0.1",  # full-width digits
        "%31%32%37.0.0.1",  # percent-encoded
    ],
)
def test_numeric_spellings_other_than_dotted_quads_are_refused(host: str) -> None:
    with pytest.raises(BlockedAddressError, match="only the dotted form"):
        literal_address(host)


def test_literal_addresses_and_names() -> None:
    assert literal_address("8.8.8.8") == ip("8.8.8.8")
    assert literal_address("127.0.0.1") == ip("127.0.0.1")
    assert literal_address("::ffff:127.0.0.1") == ip("::ffff:7f00:1")
    assert literal_address("fe80::1%25eth0") == ip("fe80::1%eth0")
    for name in (
        "example.com",
        "example.com.",
        "img.cdn-1.example",
        "1.example.com",
        "xn--bcher-kva.de",
    ):
        assert literal_address(name) is None, name
    with pytest.raises(BlockedAddressError, match="not a valid IPv6"):
        literal_address("::zz")


def test_the_socket_factory_refuses_what_the_policy_refuses() -> None:
    """The last check before connect(): the exact address aiohttp is about to use."""
    factory = guarded_socket_factory(AddressPolicy(parse_cidrs(["127.0.0.2/32"])))
    tcp = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    for address in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "0.0.0.0"):
        with pytest.raises(BlockedAddressError, match="is not public"):
            factory((socket.AF_INET, *tcp, (address, 80)))
    for address in ("::1", "fd00::1", "::ffff:127.0.0.1"):
        with pytest.raises(BlockedAddressError, match="is not public"):
            factory((socket.AF_INET6, *tcp, (address, 80, 0, 0)))
    with factory((socket.AF_INET, *tcp, ("127.0.0.2", 80))) as sock:
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM


def test_bad_allowed_cidrs_stop_the_service_with_one_line() -> None:
    with pytest.raises(SettingsError, match="FETCH_ALLOWED_CIDRS"):
        load(FetcherSettings, {"FETCH_ALLOWED_CIDRS": "127.0.0.2/32, not-a-range"})
    settings = load(FetcherSettings, {"FETCH_ALLOWED_CIDRS": "127.0.0.2/32, ::1/128"})
    assert settings.fetch_allowed_cidrs == ("127.0.0.2/32", "::1/128")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], "noai"),
        (["NoImageAI"], "NoImageAI"),
        (["noindex, nofollow, noai"], "noai"),
        (["noindex", "noimageai"], "noimageai"),  # two headers
        (["imagestream: noai"], "imagestream: noai"),
        (["ImageStream: noindex, noimageai"], "noimageai"),  # the scope runs to the end
        (["otherbot: noai, imagestream: noimageai"], "imagestream: noimageai"),
        (["otherbot: noai"], None),
        (["otherbot: noindex, noai"], None),
        (["otherbot: noai", "noindex"], None),
        (["noindex, nofollow"], None),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], "noai"),
        (["max-image-preview: large"], None),
        (["noaisomething, ai"], None),
        ([], None),
    ],
)
def test_x_robots_tag(values: list[str], expected: str | None) -> None:
    assert opts_out(values, "imagestream") == expected


def test_retry_after() -> None:
    assert retry_after_s("120") == 120.0
    assert retry_after_s(" 3 ") == 3.0
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = retry_after_s("Fri, 31 Dec 9999 23:59:59 GMT")
    assert future is not None and future > 1e9
