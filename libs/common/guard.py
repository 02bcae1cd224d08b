"""The server-side request forgery guard: which addresses a service may connect to when a
user chose the URL (the fetcher's images; any service reaching user-chosen URLs).

Public unicast addresses only, unless the service's allow-list (``FETCH_ALLOWED_CIDRS``
for the fetcher) allows a range. Three layers, each enough on its own for what it covers:

1. **The URL's host, by syntax** (``literal_address``), on every hop before any I/O. A
   host that ends in a number is an IPv4 address to browsers (WHATWG URL) and to
   ``inet_aton``: only the canonical dotted quad is accepted; integer (``2130706433``),
   hex (``0x7f.1``), octal (``0177.0.0.1``) and short (``127.1``) spellings are refused
   outright, whatever they decode to, because parsers disagree on what they mean. A
   literal address is judged by the policy here, since aiohttp does not resolve it.
2. **DNS answers** (``GuardedResolver``): aiohttp connects only to the addresses its
   resolver returns, so the resolver drops every refused address. The connector's DNS
   cache (``ttl_dns_cache``) stores what the resolver *returned*, i.e. checked addresses
   only; a rebinding answer on the next lookup goes through the same check. Happy
   eyeballs tries exactly this list.
3. **The socket itself** (``guarded_socket_factory``): the connector creates every socket
   through this factory, which is handed the exact address about to be connected to and
   refuses it if the policy does. This is the backstop should a future aiohttp reach an
   address some other way (a literal form it parses differently, a new code path).

The policy (``AddressPolicy.refusal``) follows IANA's special-purpose address registries:
loopback, private, link-local (with the cloud metadata address 169.254.169.254),
carrier-grade NAT, multicast, unspecified, reserved, documentation and benchmarking
ranges; for IPv6 only global unicast (2000::/3) is eligible, less its special ranges
(Teredo and other IETF assignments, documentation), and an IPv4 address embedded in an
IPv6 one (IPv4-mapped, 6to4, NAT64) is judged as that IPv4 address. The allow-list applies
to the address as written and, for IPv4-mapped addresses (the same host), to the IPv4
address; it never opens a tunnel form (6to4, NAT64) of an allowed IPv4 range.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (family, type, proto, canonname, sockaddr), as getaddrinfo returns and aiohttp passes.
AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]

_REFUSED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # with the broadcast address 255.255.255.255
    )
)
_REFUSED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignment (Teredo, benchmarking, ORCHID)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# WHATWG URL "ends in a number": the last label is decimal digits or 0x-prefixed hex.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


class BlockedAddressError(OSError):
    """A guarded client must not connect to this address (or host spelling)."""


def parse_cidrs(values: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def _refused_v4(address: ipaddress.IPv4Address) -> str | None:
    for net, why in _REFUSED_V4:
        if address in net:
            return why
    return None


class AddressPolicy:
    def __init__(self, allowed: Sequence[Network] = ()) -> None:
        self.allowed = tuple(allowed)

    def _allowed(self, address: IPAddress) -> bool:
        return any(address in net for net in self.allowed)

    def refusal(self, address: IPAddress) -> str | None:
        """Why a guarded client must not connect to ``address``, or None when it may."""
        if self._allowed(address):
            return None
        if isinstance(address, ipaddress.IPv4Address):
            return _refused_v4(address)
        mapped = address.ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket
            why = self.refusal(mapped)
            return f"IPv4-mapped {why}" if why else None
        embedded = None
        if address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        elif address.sixtofour is not None:
            embedded = address.sixtofour
        if embedded is not None:
            why = _refused_v4(embedded)
            return f"{embedded} ({why}) embedded in IPv6" if why else None
        for net, why in _REFUSED_V6:
            if address in net:
                return why
        if address not in _GLOBAL_UNICAST_V6:
            return "reserved"
        return None

    def permits(self, address: IPAddress) -> bool:
        return self.refusal(address) is None

    def check(self, address: IPAddress) -> None:
        why = self.refusal(address)
        if why is not None:
            raise BlockedAddressError(f"address {address} is not public ({why})")


def literal_address(host: str) -> IPAddress | None:
    """The IP address a URL host spells, or None when the host is a domain name.

    ``host`` is the host as the HTTP client will use it (yarl's ``raw_host``, without
    brackets). Raises BlockedAddressError for a numeric host that is not a canonical
    dotted-quad IPv4 or a valid IPv6 address (see the module docstring).
    """
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.replace("%25", "%"))
        except ValueError:
            raise BlockedAddressError(f"host {host!r} is not a valid IPv6 address") from None
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # a fully qualified name's trailing dot
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    try:
        return ipaddress.IPv4Address(host)  # exactly four decimal octets, no leading zeros
    except ValueError:
        raise BlockedAddressError(
            f"host {host!r} is an integer, hex, octal or shortened IPv4 spelling; "
            "only the dotted form a.b.c.d is accepted"
        ) from None


def check_url(url: URL, policy: AddressPolicy) -> None:
    """BlockedAddressError unless ``url`` is http(s) with a host the policy allows by syntax
    (a literal address judged here; a name is judged after resolution, at connect time).
    Check every hop: a redirect is a new URL."""
    host = url.raw_host
    if url.scheme not in ("http", "https") or not host:
        raise BlockedAddressError(f"not an http(s) URL: {url.scheme or '?'}://")
    address = literal_address(host)
    if address is not None:
        policy.check(address)


def guarded_connector(policy: AddressPolicy, **options: Any) -> aiohttp.TCPConnector:
    """An aiohttp connector that reaches only addresses the policy allows (layers 2 and 3);
    ``options`` are the TCPConnector's (limits, DNS cache). Pair it with ``check_url`` on
    every URL requested, and a session with ``trust_env=False`` (no proxy the guard cannot
    see)."""
    return aiohttp.TCPConnector(
        resolver=GuardedResolver(policy),
        socket_factory=guarded_socket_factory(policy),
        **options,
    )


class GuardedResolver(AbstractResolver):
    """DNS resolution that drops every address the policy refuses."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        allowed = []
        refused = []
        for result in results:
            try:
                why = self.policy.refusal(ipaddress.ip_address(result["host"]))
            except ValueError:
                why = "not an IP address"
            if why is None:
                allowed.append(result)
            else:
                refused.append(f"{result['host']} ({why})")
        if not allowed:
            shown = ", ".join(sorted(set(refused))) or "no address"
            raise BlockedAddressError(f"{host} resolves to non-public {shown}")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def guarded_socket_factory(policy: AddressPolicy) -> Callable[[AddrInfo], socket.socket]:
    """A socket factory for aiohttp's connector that refuses to make a socket for a
    connection to an address the policy refuses (the last check before connect())."""

    def factory(addr_info: AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        try:
            address = ipaddress.ip_address(sockaddr[0])
        except ValueError:
            raise BlockedAddressError(f"not an IP address: {sockaddr[0]!r}") from None
        policy.check(address)
        return socket.socket(family, type_, proto)

    return factory


def blocked_cause(exc: BaseException) -> BlockedAddressError | None:
    """The BlockedAddressError behind an aiohttp connection error, if that is what it is."""
    seen: Any = exc
    while seen is not None:
        if isinstance(seen, BlockedAddressError):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None
